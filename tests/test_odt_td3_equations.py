"""What each equation and mechanism of odt_td3.py means, checked by hand computations on tiny inputs or by
behaviours with a margin (ODT+TD3, Yan, Schwing & Wang, arXiv 2410.24108, §4 and App. H; TD3, Fujimoto et al.,
arXiv 1802.09477, Alg. 1; ODT, Zheng et al., arXiv 2202.05607, Alg. 1). Every test is fast (no CLI run)."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import odt_td3
from common.datasets import Episode, load_dataset
from common.evaluation import RolloutResult

CPU = torch.device("cpu")


def ep(obs_start: float, rewards, terminal: bool, obs_dim: int = 2, act_dim: int = 1) -> Episode:
    """obs_t = obs_start + t (every dim), next_obs_t = obs_t + 1, a_t = sin(t + obs_start) (distinct per step)."""
    n = len(rewards)
    obs = (obs_start + np.arange(n, dtype=np.float32))[:, None].repeat(obs_dim, 1)
    acts = np.sin(np.arange(n, dtype=np.float32)[:, None] + obs_start + np.arange(act_dim, dtype=np.float32))
    last, never = np.eye(n, dtype=bool)[-1], np.zeros(n, dtype=bool)
    return Episode(observations=obs, actions=acts.astype(np.float32), rewards=np.asarray(rewards, np.float32),
                   terminals=last if terminal else never, truncations=never if terminal else last,
                   next_observations=obs + 1)


def replay_of(episodes, capacity: int = 10, rtg_scale: float = 0.1, reward_shift: float = 0.0, obs_dim: int = 2):
    replay = odt_td3.TrajectoryReplay(capacity, np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32),
                                      rtg_scale, 1000, CPU, reward_shift)
    for e in episodes:
        replay.add(e)
    return replay


def nets(obs_dim: int = 2, act_dim: int = 1, seed: int = 0):
    """A tiny actor, its (different) target, a critic and its (different) target."""
    torch.manual_seed(seed)
    model = odt_td3.DecisionTransformer(obs_dim, act_dim, 16, 1, 2, 0.0, 1000, True)
    model_target = odt_td3.DecisionTransformer(obs_dim, act_dim, 16, 1, 2, 0.0, 1000, True).eval()
    critic = odt_td3.Critic(obs_dim, act_dim, 16, layer_norm=False)
    critic_target = odt_td3.Critic(obs_dim, act_dim, 16, layer_norm=False)
    # Larger weights than the GPT init, so that every input token (each shifted action, RTG, timestep) moves the
    # actions by far more than the test tolerances.
    perturb(model, scale=0.3, seed=7)
    perturb(model_target, scale=0.3, seed=8)
    return model, model_target, critic, critic_target


def padded_batch(act_dim: int = 1, seed: int = 0):
    """Windows of K = 4 over a terminal 3-step and a truncated 2-step episode: most windows are left-padded."""
    replay = replay_of([ep(0.0, [1.0, 2.0, 3.0], True, act_dim=act_dim),
                        ep(10.0, [5.0, 6.0], False, act_dim=act_dim)])
    batch = replay.sample(16, 4, np.random.default_rng(seed))
    assert (~batch["valid"]).any() and batch["valid"].any()
    return batch


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return x[valid].mean()


def hand_targets(critic_target, model_target, batch, gamma):
    """y = r + γ(1 − done)·min(Q1', Q2')(s', μ'(window one step later)) with no smoothing noise."""
    valid = batch["valid"]
    next_actions = torch.cat((batch["actions"][:, 1:], torch.zeros_like(batch["actions"][:, :1])), 1) * valid[..., None]
    with torch.no_grad():
        h = model_target(batch["next_rtg"], batch["next_states"], next_actions, batch["next_timesteps"], valid)
        a_next = model_target.act(h).clamp(-1, 1)
        q1, q2 = critic_target(batch["next_states"], a_next)
    return batch["rewards"] + gamma * (1 - batch["dones"]) * torch.minimum(q1, q2)


def hand_critic_loss(critic, critic_target, model_target, batch, gamma):
    """Σ_i mean_valid (Q_i(s, a) − y)² against the hand targets."""
    y = hand_targets(critic_target, model_target, batch, gamma)
    q1, q2 = critic(batch["states"], batch["actions"])
    return masked_mean((q1 - y) ** 2 + (q2 - y) ** 2, batch["valid"])


def hand_actor_loss(model, critic, batch, alpha, supervised_coef=1.0):
    """(c·MSE + α·RL, MSE, RL) with MSE = mean_valid mean_a (μ − a)² and RL = −mean_valid Q1(s, μ)."""
    valid = batch["valid"]
    mu = model.act(model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"], valid))
    sup = masked_mean(((mu - batch["actions"]) ** 2).mean(-1), valid)
    rl = -masked_mean(critic.q1(torch.cat((batch["states"], mu), -1)).squeeze(-1), valid)
    return supervised_coef * sup + alpha * rl, sup, rl


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def optimisers(model, critic, actor_lr=1e-3, critic_lr=1e-3):
    optimizer = odt_td3.Lamb(odt_td3.lamb_param_groups(model, 5e-4), lr=actor_lr)
    return optimizer, odt_td3.warmup_schedule(optimizer, 10), torch.optim.AdamW(critic.parameters(), lr=critic_lr)


# td3_update's hyperparameters in these tests (each test overrides what it checks)
HYPER = dict(alpha=0.1, supervised_coef=1.0, q_normalize=False, gamma=0.9, tau=0.005, policy_noise=0.0,
             noise_clip=0.5, grad_clip=0.25, bf16_targets=False)


def td3_step(model, model_target, critic, critic_target, batches, actor_lr=1e-3, critic_lr=1e-3, **hyper):
    """One odt_td3.td3_update with fresh optimisers (LAMB for the actor, AdamW for the critic); its statistics."""
    optimizer, scheduler, critic_optimizer = optimisers(model, critic, actor_lr, critic_lr)
    return odt_td3.td3_update(model, model_target, critic, critic_target, optimizer, scheduler, critic_optimizer,
                              batches, **{**HYPER, **hyper})


def record_targets(monkeypatch, model_target, critic_target, batch, obs_dim=2, act_dim=1, **hyper) -> dict:
    """What one td3_update computes for `batch` in its critic step, recorded where it is made: the TD targets y
    (B, K) returned by td_target and the smoothed target actions ã (B, K, A) the target critic is asked about.
    Stand-in targets may have no parameters, so the targets' Polyak step is skipped here (tested on its own)."""
    seen, td_target = {}, odt_td3.td_target

    def record_y(*a, **kw):
        seen["y"] = td_target(*a, **kw)
        return seen["y"]

    def target_critic(states, actions):
        seen["next_actions"] = actions.clone()
        return critic_target(states, actions)

    monkeypatch.setattr(odt_td3, "td_target", record_y)
    monkeypatch.setattr(odt_td3, "polyak_update", lambda target, source, tau: None)
    model, _, critic, _ = nets(obs_dim, act_dim)
    td3_step(model, model_target, critic, target_critic, [batch], **hyper)
    return seen


# --- the critic: TD target and loss (TD3 Alg. 1; ODT+TD3 §3.2) ------------------------------------------------
def test_critic_loss_by_hand_target_networks_and_valid_positions():
    """L_Q = Σ_i mean_valid (Q_i(s, a) − y)², y = r + γ(1 − done)·min(Q1', Q2')(s', ã) with the TARGET critic
    and the TARGET actor on the shifted window (TD3 Alg. 1); padded positions count in neither the loss nor
    the q_mean statistic (both reported as the networks stood before the step)."""
    model, model_target, critic, critic_target = nets()
    batch = padded_batch()
    valid = batch["valid"]
    expected = hand_critic_loss(critic, critic_target, model_target, batch, 0.9).detach()
    q1 = critic(batch["states"], batch["actions"])[0].detach()
    # the online networks give a different target: the check below can tell them apart
    y, y_online = hand_targets(critic_target, model_target, batch, 0.9), hand_targets(critic, model, batch, 0.9)
    assert (y_online - y)[valid].abs().max() > 1e-3
    assert abs(q1[~valid].mean().item() - q1[valid].mean().item()) > 1e-3  # padding would move q_mean
    stats = td3_step(model, model_target, critic, critic_target, [batch], gamma=0.9)
    torch.testing.assert_close(stats["train/critic_loss"], expected)
    torch.testing.assert_close(stats["train/q_mean"], masked_mean(q1, valid))


def test_critic_targets_use_next_state_and_bootstrap_through_time_limits(monkeypatch):
    """y_t bootstraps from s'_t (not s_t) with the discount γ given; done = 1 only at the terminal step, the
    time-limit step of a truncated trajectory bootstraps (ODT+TD3 docs: time limits are not terminals)."""
    _, model_target, _, critic_target = nets()
    batch = padded_batch()
    valid = batch["valid"]
    hand = hand_targets(critic_target, model_target, batch, 0.5)
    y = record_targets(monkeypatch, model_target, critic_target, batch, gamma=0.5)["y"]
    torch.testing.assert_close(y[valid], hand[valid])
    s = batch["states"][..., 0]
    terminal, truncated = valid & (s == 2.0), valid & (s == 11.0)
    assert terminal.any() and truncated.any()
    torch.testing.assert_close(y[terminal], batch["rewards"][terminal])  # r only
    assert (y[truncated] - batch["rewards"][truncated]).abs().min() > 1e-4  # r + γ·min Q'


def test_bf16_targets_flag_is_honoured(monkeypatch):
    """--no-bf16-targets: the target actor runs in fp32 and the targets equal the fp32 hand computation; with
    bf16 they differ slightly (docs: actions change by ~0.005)."""
    _, model_target, _, critic_target = nets()
    batch = padded_batch()
    valid = batch["valid"]
    hand = hand_targets(critic_target, model_target, batch, 0.9)[valid]
    fp32 = record_targets(monkeypatch, model_target, critic_target, batch, bf16_targets=False)["y"][valid]
    bf16 = record_targets(monkeypatch, model_target, critic_target, batch, bf16_targets=True)["y"][valid]
    torch.testing.assert_close(fp32, hand)
    assert (bf16 - hand).abs().max() > 1e-6


class ConstantActor(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, rtg, states, actions, timesteps, valid):
        return states

    def act(self, h):
        return torch.full((*h.shape[:2], 1), self.value)


class ActionCritic(torch.nn.Module):
    """Q1(s, a) = a_0, Q2 = Q1 + 1: min(Q1', Q2') is the target action itself."""

    def forward(self, states, actions):
        return actions[..., 0], actions[..., 0] + 1


def test_target_smoothing_noise_is_clipped_on_both_sides(monkeypatch):
    """ã = clamp(μ' + clip(ε, −c, c), −1, 1), ε ~ N(0, σ²) (TD3 §5.3): with μ' = 0 and a huge σ the noise
    reaches exactly −c and +c and never beyond; σ is the std of ε."""
    batch = replay_of([ep(0.0, [1.0] * 4, True)]).sample(256, 4, np.random.default_rng(0))
    a = record_targets(monkeypatch, ConstantActor(0.0), ActionCritic(), batch, policy_noise=10.0,
                       noise_clip=0.3)["next_actions"]
    assert a.min().item() == pytest.approx(-0.3) and a.max().item() == pytest.approx(0.3)
    a = record_targets(monkeypatch, ConstantActor(0.0), ActionCritic(), batch, policy_noise=0.1,
                       noise_clip=10.0)["next_actions"]
    assert 0.08 < a.std().item() < 0.12


def test_critic_targets_pass_the_smoothing_flags_through(monkeypatch):
    """The TD target uses the smoothed action: with μ' = 0, Q' = ã and γ = 0.5, (y − r)/γ spans exactly [−c, c] at
    every bootstrapped position; a small σ stays far inside the clip."""
    batch = padded_batch()
    boot = batch["valid"] & (batch["dones"] == 0)
    y = record_targets(monkeypatch, ConstantActor(0.0), ActionCritic(), batch, gamma=0.5, policy_noise=10.0,
                       noise_clip=0.3)["y"]
    a = (y - batch["rewards"])[boot] / 0.5
    assert a.min().item() == pytest.approx(-0.3) and a.max().item() == pytest.approx(0.3)
    y = record_targets(monkeypatch, ConstantActor(0.0), ActionCritic(), batch, gamma=0.5, policy_noise=0.02,
                       noise_clip=1.0)["y"]
    a = (y - batch["rewards"])[boot] / 0.5
    assert 0 < a.abs().max().item() < 0.1  # σ = 0.02, far inside the clip


@pytest.mark.parametrize("mu", [0.9, -0.9])
def test_target_action_is_clamped_to_the_action_range_on_both_sides(monkeypatch, mu):
    """The smoothed target action is clamped to [−1, 1] (TD3 §5.3): μ' = ±0.9 plus noise up to ±0.5 stays in
    range and reaches the bound it is near."""
    batch = replay_of([ep(0.0, [1.0] * 4, True)]).sample(256, 4, np.random.default_rng(0))
    a = record_targets(monkeypatch, ConstantActor(mu), ActionCritic(), batch, policy_noise=10.0,
                       noise_clip=0.5)["next_actions"]
    assert a.min().item() >= -1.0 and a.max().item() <= 1.0
    assert (a.abs() == 1.0).float().mean() > 0.3
    assert a.min().item() == pytest.approx(mu - 0.5) if mu > 0 else a.max().item() == pytest.approx(mu + 0.5)


# --- the actor loss (ODT+TD3 §3.2; TD3+BC normalisation as an option) -----------------------------------------
def q_positive_critic(obs_dim=2, act_dim=2, seed=1):
    """A critic whose Q1 and Q2 are both > 0 everywhere (large output bias) and differ from each other."""
    torch.manual_seed(seed)
    critic = odt_td3.Critic(obs_dim, act_dim, 16, layer_norm=False)
    with torch.no_grad():
        critic.q1[-1].bias.fill_(5.0)
        critic.q2[-1].bias.fill_(-3.0)
    return critic


def actor_step(model, model_target, critic, batch, **hyper):
    """td3_update with the critic frozen (lr 0), on copies of the targets: the actor's statistics."""
    return td3_step(model, copy.deepcopy(model_target), critic, copy.deepcopy(critic), [batch], critic_lr=0.0,
                    **hyper)


def test_actor_loss_by_hand_with_q1_sign_coefficients_and_mask():
    """L = c·mean_valid mean_a (μ − a)² + α·(−mean_valid Q1(s, μ)) with Q1 (not Q2), the minus sign, the
    supervised coefficient c and α as given; padded positions count nowhere (act_dim 2: MSE is a mean over
    action dimensions)."""
    model, model_target, _, _ = nets(act_dim=2)
    critic = q_positive_critic()
    batch = padded_batch(act_dim=2)
    before = copy.deepcopy(model)
    loss, sup, rl = hand_actor_loss(before, critic, batch, 0.3, supervised_coef=0.5)
    stats = actor_step(model, model_target, critic, batch, alpha=0.3, supervised_coef=0.5)
    torch.testing.assert_close(stats["train/supervised_loss"], sup.detach())
    torch.testing.assert_close(stats["train/actor_rl_loss"], rl.detach())
    torch.testing.assert_close(stats["train/actor_loss"], loss.detach())
    assert rl.item() < -1.0  # Q1 ≈ 5 > 0: the RL term is negative (maximising Q1)
    mu = before.act(before(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"], batch["valid"]))
    q2 = critic.q2(torch.cat((batch["states"], mu), -1)).squeeze(-1)
    assert abs(masked_mean(q2, batch["valid"]).item() + rl.item()) > 1.0  # Q2 would give another value


def test_q_normalize_divides_alpha_by_detached_mean_abs_q():
    """--q-normalize: L = c·MSE + α/mean_valid|Q1| · (−mean_valid Q1), the normaliser detached (TD3+BC, Fujimoto
    & Gu 2021, Eq. 3). With Q1 > 0 everywhere the RL term's value is exactly −α, yet its gradient is α/mean|Q1|
    times the gradient of −mean Q1 (a non-detached normaliser would give a zero gradient)."""
    model, model_target, _, _ = nets(act_dim=2)
    critic = q_positive_critic()
    batch = padded_batch(act_dim=2)
    plain = copy.deepcopy(model)
    mean_q = -hand_actor_loss(copy.deepcopy(model), critic, batch, 0.0)[2].item()  # Q1 > 0: mean|Q1| = mean Q1
    stats = actor_step(model, model_target, critic, batch, alpha=0.4, supervised_coef=0.0, q_normalize=True,
                       grad_clip=1e9)
    torch.testing.assert_close(stats["train/actor_loss"], torch.tensor(-0.4))  # padded |Q| would change it
    actor_step(plain, model_target, critic, batch, alpha=0.4 / mean_q, supervised_coef=0.0, grad_clip=1e9)
    torch.testing.assert_close(model.mu_head.weight.grad, plain.mu_head.weight.grad)
    assert model.mu_head.weight.grad.abs().max() > 1e-4


# --- one update: delayed policy update, network routing, Polyak, gradient clipping ----------------------------
def run_update(policy_interval: int = 1, tau: float = 0.3, grad_clip: float = 0.25, seed: int = 0):
    """One odt_td3.td3_update (α 0.7) on tiny networks whose targets differ from the online copies; returns the
    state before (deep copies), the networks and optimisers after, the batches and the stats."""
    model, model_target, critic, critic_target = nets(seed=seed)
    model_target.load_state_dict(model.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    perturb(model_target, seed=1)
    perturb(critic_target, seed=2)
    replay = replay_of([ep(0.0, [1.0, 2.0, 3.0], True), ep(10.0, [5.0, 6.0], False)])
    rng = np.random.default_rng(seed)
    batches = [replay.sample(16, 4, rng) for _ in range(policy_interval)]
    before = dict(model=copy.deepcopy(model), model_target=copy.deepcopy(model_target), critic=copy.deepcopy(critic),
                  critic_target=copy.deepcopy(critic_target))
    optimizer, scheduler, critic_optimizer = optimisers(model, critic)
    stats = odt_td3.td3_update(model, model_target, critic, critic_target, optimizer, scheduler, critic_optimizer,
                               batches, **{**HYPER, "alpha": 0.7, "tau": tau, "grad_clip": grad_clip})
    after = dict(model=model, model_target=model_target, critic=critic, critic_target=critic_target,
                 optimizer=optimizer, critic_optimizer=critic_optimizer)
    return before, after, batches, stats


def test_update_critic_steps_use_target_networks_and_fresh_gradients():
    """TD3 Alg. 1: each of the `policy_interval` critic steps minimises L_Q of its own batch against targets from
    the TARGET actor and TARGET critic, from zeroed gradients: replaying those AdamW steps by hand gives the same
    critic and the same mean critic-loss statistic."""
    before, after, batches, stats = run_update(policy_interval=2)
    critic = copy.deepcopy(before["critic"])
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    losses = []
    for batch in batches:
        loss = hand_critic_loss(critic, before["critic_target"], before["model_target"], batch, 0.9)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p, q in zip(critic.parameters(), after["critic"].parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert stats["train/critic_loss"].item() == pytest.approx(np.mean(losses), rel=1e-5)
    # the online actor would give other targets (so the check above sees which actor computed them)
    online = hand_critic_loss(before["critic"], before["critic_target"], before["model"], batches[0], 0.9)
    target = hand_critic_loss(before["critic"], before["critic_target"], before["model_target"], batches[0], 0.9)
    assert abs(online.item() - target.item()) > 1e-4


def test_update_actor_step_uses_updated_online_critic_and_last_batch():
    """The actor loss is computed after the critic steps with the ONLINE critic's Q1 (not the target) on the
    latest batch (TD3 Alg. 1, delayed policy update)."""
    before, after, batches, stats = run_update(policy_interval=2)
    expected = hand_actor_loss(before["model"], after["critic"], batches[-1], 0.7)[0]
    torch.testing.assert_close(stats["train/actor_loss"], expected.detach())
    for other in (hand_actor_loss(before["model"], after["critic_target"], batches[-1], 0.7)[0],
                  hand_actor_loss(before["model"], after["critic"], batches[0], 0.7)[0],
                  hand_actor_loss(before["model"], before["critic"], batches[-1], 0.7)[0]):
        assert abs(other.item() - expected.item()) > 1e-5


@pytest.mark.parametrize("tau", [0.3, 0.05])
def test_update_polyak_moves_both_targets_towards_the_new_online_networks(tau):
    """θ' ← τ·θ + (1 − τ)·θ' for the actor target and the critic target, after the actor step, with the τ given
    (TD3 Alg. 1): the targets move a fraction τ towards the UPDATED online networks, which stay where their
    optimisers put them."""
    before, after, _, _ = run_update(tau=tau)
    for name, online in (("model_target", "model"), ("critic_target", "critic")):
        for b, t, s in zip(before[name].parameters(), after[name].parameters(), after[online].parameters(),
                           strict=True):
            torch.testing.assert_close(t, (1 - tau) * b + tau * s.detach(), rtol=1e-5, atol=1e-6)
    moved = [not torch.equal(b, a) for b, a in zip(before["model"].parameters(), after["model"].parameters(),
                                                   strict=True)]
    assert all(moved)  # the online actor took its own step (not pulled onto the target)


@pytest.mark.parametrize("policy_interval", [1, 2, 3])
def test_update_counts_policy_interval_critic_steps_per_actor_step(policy_interval):
    """Delayed policy update (TD3 §5.2): `policy_interval` critic steps, one actor step, one LR-schedule step."""
    _, after, _, _ = run_update(policy_interval=policy_interval)
    assert after["critic_optimizer"].state[next(after["critic"].parameters())]["step"] == policy_interval
    assert [g["step"] for g in after["optimizer"].param_groups] == [1, 1]


@pytest.mark.parametrize("grad_clip", [1e-3, 1e6])
def test_actor_gradient_is_clipped_to_grad_clip_global_norm(grad_clip):
    """--grad-clip: the actor's gradient is rescaled to global norm ≤ grad_clip before the LAMB step (ODT App. C,
    0.25); a large clip leaves it alone."""
    before, after, batches, _ = run_update(grad_clip=grad_clip)
    model = before["model"]
    hand_actor_loss(model, after["critic"], batches[-1], 0.7)[0].backward()
    raw = [p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw])).item()
    assert norm > 0.01
    scale = min(1.0, grad_clip / norm)
    for g, p in zip(raw, after["model"].parameters(), strict=True):
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-4, atol=1e-9)


def test_update_trains_the_actor_in_training_mode():
    """The actor is trained with dropout on (model.train()), the target stays in eval mode (no dropout)."""
    torch.manual_seed(0)
    model = odt_td3.DecisionTransformer(2, 1, 16, 1, 2, 0.1, 1000, False).eval()
    model_target = copy.deepcopy(model).requires_grad_(False).eval()
    critic = odt_td3.Critic(2, 1, 16, False)
    batch = replay_of([ep(0.0, [1.0, 2.0, 3.0], True)]).sample(8, 3, np.random.default_rng(0))
    td3_step(model, model_target, critic, copy.deepcopy(critic), [batch])
    assert model.training and not model_target.training


# --- the trajectory replay (ODT Alg. 1, §4.1: top-N at init, FIFO eviction) ---------------------------------
def test_replay_fifo_evicts_the_oldest_trajectory_and_keeps_its_capacity():
    """Once full, each new trajectory replaces the oldest one (ODT §4.1), cycling through the slots."""
    replay = replay_of([ep(float(10 * i), [float(i)], True) for i in range(3)], capacity=3)
    tags = lambda: [float(t["rewards"][0]) for t in replay.trajectories]
    assert tags() == [0.0, 1.0, 2.0]
    for i, expected in zip(range(3, 8), ([3, 1, 2], [3, 4, 2], [3, 4, 5], [6, 4, 5], [6, 7, 5]), strict=True):
        replay.add(ep(float(10 * i), [float(i)], True))
        assert tags() == [float(e) for e in expected] and len(replay) == 3
    batch = replay.sample(64, 1, np.random.default_rng(0))  # the flat arrays follow the eviction
    assert set(batch["rewards"][:, 0].tolist()) == {5.0, 6.0, 7.0}


def test_replay_rewards_rtg_and_dones_by_hand_with_reward_shift():
    """The critic's reward is r + shift (unscaled); RTG tokens are scale·Σ(r + shift) (hindsight relabeling);
    next RTG is the next step's (0 after the last); done marks true terminations only."""
    replay = replay_of([ep(0.0, [1.0, 2.0, 3.0], True), ep(10.0, [5.0, 6.0], False)], rtg_scale=0.5,
                       reward_shift=-1.0)
    replay._rebuild()
    flat = replay._flat
    torch.testing.assert_close(flat["rewards"], torch.tensor([0.0, 1.0, 2.0, 4.0, 5.0]))
    torch.testing.assert_close(flat["rtg"], 0.5 * torch.tensor([3.0, 3.0, 2.0, 9.0, 5.0]))
    torch.testing.assert_close(flat["next_rtg"], 0.5 * torch.tensor([3.0, 2.0, 0.0, 5.0, 0.0]))
    torch.testing.assert_close(flat["dones"], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(flat["next_timesteps"], torch.tensor([1, 2, 3, 1, 2]))


def test_replay_normalises_states_and_next_states_with_the_same_frozen_statistics():
    """Actor and critic see (s − mean)/std for s_t and for s'_t alike (the critic's next state is on the same
    scale as its state)."""
    replay = odt_td3.TrajectoryReplay(5, np.array([1.0, 2.0], np.float32), np.array([2.0, 4.0], np.float32), 1.0,
                                      1000, CPU)
    replay.add(ep(3.0, [1.0, 1.0], False))
    replay._rebuild()
    torch.testing.assert_close(replay._flat["states"], torch.tensor([[1.0, 0.25], [1.5, 0.5]]))
    torch.testing.assert_close(replay._flat["next_states"], torch.tensor([[1.5, 0.5], [2.0, 0.75]]))


def test_replay_samples_trajectories_in_proportion_to_their_length_and_left_pads():
    """ODT App. F: a trajectory is drawn with probability ∝ its length, a start uniformly within it; windows that
    run past the end are shifted right, padding on the left (valid = False there, values zero)."""
    replay = replay_of([ep(0.0, [1.0], True), ep(100.0, [1.0] * 9, True)])
    batch = replay.sample(4000, 3, np.random.default_rng(0))
    last = batch["states"][:, -1, 0]
    assert abs((last >= 100).float().mean().item() - 0.9) < 0.02
    valid = batch["valid"]
    assert (valid[:, -1]).all() and (valid.int().diff(dim=1) >= 0).all()  # valid steps are a right-aligned block
    assert (batch["states"][~valid] == 0).all() and (batch["rewards"][~valid] == 0).all()
    starts = batch["states"][valid.all(1)][:, 0, 0] - 100
    counts = np.bincount(starts.long().numpy(), minlength=7)
    assert counts.min() > 0.7 * counts.mean()  # every full window start in 0..6 about equally often


# --- exploration vs evaluation (TD3: Gaussian exploration noise online only) -------------------------------
def agent_for(noise: float, seed: int = 0):
    torch.manual_seed(seed)
    model = odt_td3.DecisionTransformer(2, 1, 16, 1, 2, 0.0, 100, False)
    args = odt_td3.Args(context_len=20, eval_context_len=2, rtg_scale=0.1, reward_shift=0.0)
    return odt_td3.DTAgent(model, args, np.zeros(2, np.float32), np.ones(2, np.float32), 5.0, noise=noise,
                           device=CPU, max_ep_len=100)


def test_exploration_noise_std_and_clamp_on_both_sides():
    """Online action = clamp(μ + N(0, σ²), −1, 1) (TD3 exploration): σ is the std of the added noise, and a
    huge σ reaches both bounds and never passes them."""
    obs = np.zeros((4000, 2), np.float32)
    clean = agent_for(0.0)
    clean.reset(obs)
    mu = clean.act(obs)
    noisy = agent_for(0.1)
    noisy.reset(obs)
    torch.manual_seed(1)
    d = noisy.act(obs) - mu
    assert 0.09 < d.std() < 0.11 and abs(d.mean()) < 0.01
    wild = agent_for(50.0)
    wild.reset(obs)
    a = wild.act(obs)
    assert a.min() == -1.0 and a.max() == 1.0 and (np.abs(a) == 1.0).mean() > 0.9


# --- the trainer: replay init, optimisers, targets, checkpoint, phases, seeds --------------------------------
@pytest.fixture
def trainer(tmp_path):
    """A real Trainer on the motivation toy, with six one-step episodes of distinct returns and buffer 3."""
    data = load_dataset("toy-vitamin-v0", None, generate_steps=1, progress=False)
    returns = [0.3, -0.5, 0.9, 0.1, 0.7, -0.2]
    episodes = [dataclasses.replace(data.episodes[0], rewards=np.array([r], np.float32),
                                    actions=np.array([[r / 2]], np.float32)) for r in returns]
    data = dataclasses.replace(data, episodes=episodes)
    args = odt_td3.Args(env_id="toy-vitamin-v0", embed_dim=16, n_layers=1, n_heads=1, eval_episodes=2,
                        progress=False, save_model=False, cuda=False, buffer_size=3, batch_size=4,
                        learning_rate=3e-4, critic_lr=7e-4, alpha_pretrain=0.25, alpha_online=0.75, seed=3,
                        exploration_noise=0.3, precision="fp32")
    args = odt_td3.apply_dataset_defaults(args, data)
    return odt_td3.Trainer(args, data, CPU, tmp_path, None)


def test_trainer_replay_keeps_the_best_trajectories_worst_first(trainer):
    """ODT §4.1: the online replay starts with the top-N offline trajectories by return, in ascending order so
    FIFO eviction drops the worst first; pretraining samples all offline data."""
    ret = lambda replay: [float(t["rewards"].sum()) for t in replay.trajectories]
    assert ret(trainer.replay) == pytest.approx([0.3, 0.7, 0.9])
    assert sorted(ret(trainer.offline)) == pytest.approx(sorted([0.3, -0.5, 0.9, 0.1, 0.7, -0.2]))
    trainer.replay.add(ep(0.0, [0.0], True, obs_dim=1))
    assert ret(trainer.replay) == pytest.approx([0.0, 0.7, 0.9])


def test_trainer_optimisers_and_targets(trainer):
    """Actor: LAMB at --learning-rate; critic: AdamW at --critic-lr with torch's weight decay 0.01 (docs); both
    targets start as exact copies, the actor target in eval mode (no dropout in the target actions)."""
    assert isinstance(trainer.optimizer, odt_td3.Lamb) and isinstance(trainer.critic_optimizer, torch.optim.AdamW)
    assert trainer.scheduler.base_lrs == [3e-4, 3e-4]
    assert [g["lr"] for g in trainer.critic_optimizer.param_groups] == [7e-4]
    assert [g["weight_decay"] for g in trainer.critic_optimizer.param_groups] == [0.01]
    assert {id(p) for p in trainer.critic_optimizer.param_groups[0]["params"]} == {
        id(p) for p in trainer.critic.parameters()}
    assert not trainer.model_target.training and trainer.model.training
    for a, b in ((trainer.model, trainer.model_target), (trainer.critic, trainer.critic_target)):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q) and p is not q and not q.requires_grad


def test_checkpoint_holds_each_network_under_its_own_name(trainer):
    """The checkpoint resumes everything (docs): actor, critic, both targets, both optimisers, the LR schedule, the
    replay, the loop's counters, the statistics meter and the RNG states; each under its own key, and loading puts
    each back where it came from (the window sampler continues the same stream)."""
    for i, net in enumerate((trainer.model, trainer.model_target, trainer.critic, trainer.critic_target)):
        perturb(net, seed=10 + i)
    trainer.train_step(trainer.replay, 0.5)
    state = copy.deepcopy(trainer.state_dict())
    assert set(state) == {"model", "model_target", "critic", "critic_target", "optimizer", "critic_optimizer",
                          "scheduler", "replay", "counters", "meter", "rng"}
    next_windows = copy.deepcopy(trainer.rng).random(5)
    trainer.rng.random(7)  # the sampler moves on after the checkpoint
    pairs = dict(model=trainer.model, model_target=trainer.model_target, critic=trainer.critic,
                 critic_target=trainer.critic_target)
    for key, net in pairs.items():
        for name, value in net.state_dict().items():
            assert torch.equal(state[key][name], value), key
    for net in pairs.values():
        perturb(net, seed=99)
    trainer.replay.add(ep(0.0, [5.0], True, obs_dim=1))
    trainer.load_state_dict(state)
    for key, net in pairs.items():
        for name, value in net.state_dict().items():
            assert torch.equal(state[key][name], value), key
    assert [float(t["rewards"].sum()) for t in trainer.replay.trajectories] == pytest.approx([0.3, 0.7, 0.9])
    assert trainer.critic_optimizer.state_dict()["state"][0]["step"] == state["critic_optimizer"]["state"][0]["step"]
    assert np.array_equal(trainer.rng.random(5), next_windows)


@pytest.mark.parametrize("policy_interval", [2, 3])
def test_train_step_samples_policy_interval_fresh_batches_and_passes_every_flag(trainer, monkeypatch,
                                                                                 policy_interval):
    """One update (--pretrain-updates, --updates-per-round) = `policy_interval` critic steps on fresh batches of
    --batch-size windows of --context-len steps, then one actor step; the Trainer's networks and optimisers, the
    phase's α and each TD3 flag reach td3_update under their own names."""
    seen = {}

    def fake_update(*nets_and_optimisers, **hyper):
        *objects, batches = nets_and_optimisers
        seen.update(objects=objects, hyper=hyper, n=len(batches), distinct=len({id(b) for b in batches}),
                    shape=tuple(batches[0]["valid"].shape))
        return {"x": torch.tensor(0.0)}

    monkeypatch.setattr(odt_td3, "td3_update", fake_update)
    a, odd = trainer.args, policy_interval == 3
    a.policy_interval, a.batch_size, a.context_len = policy_interval, 5, 2
    flags = dict(supervised_coef=0.6, q_normalize=odd, gamma=0.91, tau=0.02, policy_noise=0.3, noise_clip=0.4,
                 grad_clip=0.7, bf16_targets=not odd)
    for key, value in flags.items():
        setattr(a, key, value)
    trainer.train_step(trainer.offline, 0.125)
    assert seen["hyper"] == dict(alpha=0.125, **flags)
    t = trainer
    expected = [t.model, t.model_target, t.critic, t.critic_target, t.optimizer, t.scheduler, t.critic_optimizer]
    assert len(seen["objects"]) == len(expected) and all(x is y for x, y in zip(seen["objects"], expected, strict=True))
    assert seen["n"] == seen["distinct"] == policy_interval and seen["shape"] == (5, 2)
    assert trainer.counters["updates"] == 1


EVAL = {"eval/return_mean": 0.0, "eval/return_std": 0.0, "eval/normalized_score_mean": 0.0,
        "eval/normalized_score_std": 0.0}


def test_pretraining_and_finetuning_use_their_own_data_and_alpha(trainer, monkeypatch):
    """Alg. 1: pretraining updates on all offline data with α_pretrain, finetuning on the online replay with
    α_online; each round adds its rollout to the online FIFO replay (never the offline data) and then runs
    `updates_per_round` updates."""
    calls = []

    def train_step(source, alpha):
        calls.append((source, alpha, len(source), source.next_slot))
        trainer.counters["updates"] += 1

    trainer.train_step = train_step
    args = trainer.args
    args.pretrain_updates, args.online_steps, args.updates_per_round, args.min_steps_per_round = 2, 2, 3, 0
    monkeypatch.setattr(odt_td3, "evaluate", lambda *a, **k: EVAL)
    odt_td3.train(trainer, SimpleNamespace(requested=False))
    assert calls[:2] == [(trainer.offline, 0.25, 6, 0)] * 2
    assert calls[2:] == [(trainer.replay, 0.75, 3, 1)] * 3 + [(trainer.replay, 0.75, 3, 2)] * 3  # FIFO slots 0, 1
    assert trainer.counters["env_steps"] == 2 and trainer.counters["rounds"] == 2 and len(trainer.offline) == 6


def test_a_stop_mid_round_resumes_the_rest_of_that_round(trainer, monkeypatch):
    """A stop request between two updates leaves the round's remaining updates in the counters (the checkpoint's
    loop position): the loop continues them without a new rollout, then goes on with the next round."""
    stop, steps, evaluated = SimpleNamespace(requested=False), [], []

    def train_step(source, alpha):
        steps.append(trainer.counters["rounds"])
        trainer.counters["updates"] += 1
        stop.requested = len(steps) == 2

    trainer.train_step = train_step
    args = trainer.args
    args.pretrain_updates, args.online_steps, args.updates_per_round, args.min_steps_per_round = 0, 2, 3, 0
    monkeypatch.setattr(odt_td3, "evaluate", lambda *a, **k: evaluated.append(trainer.counters["env_steps"]) or EVAL)
    odt_td3.train(trainer, stop)
    assert steps == [1, 1] and trainer.counters["round_updates_left"] == 1 and evaluated == [0]
    stop.requested = False
    odt_td3.train(trainer, stop)
    assert steps == [1, 1, 1, 2, 2, 2] and trainer.counters["rounds"] == 2 and trainer.counters["env_steps"] == 2
    assert evaluated == [0, 2]  # the pretrained policy once, then after the last round


def test_evaluation_is_deterministic_on_g_eval_with_fixed_seeds(trainer, monkeypatch):
    """Evaluation acts with the deterministic action (no exploration noise), conditioned on g_eval, on the fixed
    evaluation seeds."""
    seen = {}

    def fake_evaluate(envs, agent, seeds, normalize):
        seen.update(noise=agent.noise, target=agent.target, seeds=list(seeds))
        return {}

    monkeypatch.setattr(odt_td3, "evaluate", fake_evaluate)
    trainer.args.g_eval, trainer.args.g_online, trainer.args.rtg_scale = 0.5, 2.0, 0.1
    trainer.evaluate()
    assert seen["noise"] == 0.0 and seen["target"] == pytest.approx(0.05)
    assert seen["seeds"] == odt_td3.eval_seeds(3, 2)


def test_explore_on_g_online_with_fresh_seeds_until_min_steps(trainer, monkeypatch):
    """Online rollouts add N(0, σ_explore²) to the action and condition on g_online; each episode of each round
    resets with its own seed online_episode_seed(seed, round, index); a round collects whole episodes until it
    has ≥ min_steps_per_round new steps (paper App. H) and counts them."""
    seen = []

    def fake_rollout(envs, agent, seeds, record=False, max_steps=None):
        seen.append(dict(noise=agent.noise, target=agent.target, seeds=list(seeds)))
        e = ep(0.0, [1.0] * 5, False, obs_dim=1)
        return RolloutResult(returns=np.array([5.0]), lengths=np.array([5]), episodes=[e])

    monkeypatch.setattr(odt_td3, "rollout", fake_rollout)
    trainer.args.g_eval, trainer.args.g_online, trainer.args.rtg_scale = 0.5, 2.0, 0.1
    trainer.args.min_steps_per_round, trainer.args.updates_per_round = 10, 7
    trainer.replay.capacity = 10
    assert [len(e.rewards) for e in trainer.explore()] == [5, 5]
    assert [len(e.rewards) for e in trainer.explore()] == [5, 5]
    assert [s["seeds"][0] for s in seen] == [odt_td3.online_episode_seed(3, r, i) for r in (0, 1) for i in (0, 1)]
    assert all(s["noise"] == 0.3 and s["target"] == pytest.approx(0.2) for s in seen)
    c = trainer.counters
    assert (c["env_steps"], c["rounds"], c["round_updates_left"], len(trainer.replay)) == (20, 2, 0, 3)
    assert c["round"]["rollout/return"] == 5.0 and c["round"]["rollout/length"] == 5.0


def test_end_round_evaluates_every_eval_interval_env_steps_and_after_the_last_round(trainer, monkeypatch):
    """Evaluations are due every --eval-interval ONLINE ENV STEPS (not updates) and after the last round."""
    calls = []
    monkeypatch.setattr(trainer, "evaluate", lambda: calls.append(trainer.counters["env_steps"]) or {})
    monkeypatch.setattr(trainer, "log_row", lambda extra, checkpoint=False: None)
    trainer.args.online_steps = 10
    trainer.evaluations = odt_td3.run.Interval(4, start=0)
    trainer.counters["round"] = {}
    for env_steps, updates in ((2, 100), (3, 200), (5, 300), (7, 400), (8, 500), (10, 600)):
        trainer.counters["env_steps"], trainer.counters["updates"] = env_steps, updates
        trainer.end_round()
    assert calls == [5, 8, 10]


def test_warmup_schedule_of_the_actor():
    """ODT App. C: the actor's learning rate is lr·min(1, (k + 1)/warmup) at update k, continued across phases."""
    model = odt_td3.DecisionTransformer(2, 1, 8, 1, 1, 0.0, 10, False)
    optimizer = odt_td3.Lamb(odt_td3.lamb_param_groups(model, 0.0), lr=0.5)
    scheduler = odt_td3.warmup_schedule(optimizer, 4)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


def test_agent_acts_on_the_last_eval_context_len_steps_and_keeps_the_executed_action():
    """Rollouts condition on the last K_eval steps (--eval-context-len, Table 9), with absolute timesteps, and the
    context holds the action that was executed (with its exploration noise), as the replay does."""
    torch.manual_seed(0)
    model = odt_td3.DecisionTransformer(2, 1, 16, 1, 2, 0.0, 100, True).eval()
    args = odt_td3.Args(context_len=20, eval_context_len=2, rtg_scale=0.1, reward_shift=0.0)
    agent = odt_td3.DTAgent(model, args, np.zeros(2, np.float32), np.ones(2, np.float32), 5.0, noise=0.2,
                            device=CPU, max_ep_len=100)
    obs = [np.full((1, 2), float(t), np.float32) for t in range(4)]
    agent.reset(obs[0])
    taken = []
    for t in range(4):
        taken.append(torch.as_tensor(agent.act(obs[t])))
        agent.observe(np.array([1.0], np.float32))
    torch.testing.assert_close(agent.actions[0, :4], torch.cat(taken))
    states = torch.stack([torch.as_tensor(o[0]) for o in obs[2:4]])[None]
    rtg = torch.tensor([[0.5 - 0.2, 0.5 - 0.3]])
    h = model(rtg, states, agent.actions[:, 2:4], torch.tensor([[2, 3]]), torch.ones(1, 2, dtype=torch.bool))
    mu = model.act(h)[0, -1]
    assert (taken[3][0] - mu).abs().max() > 1e-4  # noise was added ...
    assert (taken[3][0] - mu).abs().max() < 1.0  # ... to the action of the last two steps: checked exactly below
    clean = odt_td3.DTAgent(model, args, np.zeros(2, np.float32), np.ones(2, np.float32), 5.0, noise=0.0,
                            device=CPU, max_ep_len=100)
    clean.reset(obs[0])
    for t in range(3):
        clean.act(obs[t])
        clean.actions[:, t] = agent.actions[:, t]
        clean.observe(np.array([1.0], np.float32))
    torch.testing.assert_close(torch.as_tensor(clean.act(obs[3]))[0], mu)


def test_online_episode_seeds_are_distinct_and_never_evaluation_seeds():
    """Each online episode draws a fresh reset seed (per round and per episode within a round), never one of
    the evaluation episodes' seeds, and a different run seed gives a different stream."""
    seeds = {odt_td3.online_episode_seed(s, r, i) for s in (1, 2) for r in range(50) for i in range(5)}
    assert len(seeds) == 2 * 50 * 5
    assert not seeds & {x for s in (1, 2) for x in odt_td3.eval_seeds(s, 10)}


# --- the critic network ---------------------------------------------------------------------------------
def test_critic_layer_norm_makes_q_invariant_to_the_scale_of_its_hidden_layers():
    """--critic-layer-norm (on for Adroit/AntMaze/Maze2d): a parameter-free LayerNorm after each hidden layer,
    so scaling a hidden layer's weights and bias changes nothing; without it Q changes. Q1 and Q2 are separate
    networks."""
    torch.manual_seed(0)
    s, a = torch.randn(5, 3), torch.rand(5, 2)
    for layer_norm in (True, False):
        critic = odt_td3.Critic(3, 2, 32, layer_norm)
        q_before = critic(s, a)
        with torch.no_grad():
            for net in (critic.q1, critic.q2):
                net[0].weight.mul_(4.0)
                net[0].bias.mul_(4.0)
        q_after = critic(s, a)
        same = all(torch.allclose(x, y, atol=1e-4) for x, y in zip(q_before, q_after, strict=True))
        assert same == layer_norm
        assert not torch.allclose(*q_before)


# --- per-dataset defaults (paper Table 9; ODT Table C.4 for what Table 9 leaves out) --------------------
MUJOCO = dict(context_len=20, eval_context_len=5, alpha_pretrain=0.0, alpha_online=0.1, gamma=0.99, critic_lr=1e-3,
              buffer_size=1000, policy_interval=2, critic_layer_norm=False, rtg_scale=1e-3, reward_shift=0.0,
              use_timestep_embedding=False, embed_dim=512)
ADROIT = dict(context_len=5, eval_context_len=1, alpha_pretrain=0.0, alpha_online=0.1, gamma=0.99, critic_lr=2e-4,
              learning_rate=1e-4, weight_decay=1e-4, pretrain_updates=40000, buffer_size=5000, policy_interval=1,
              critic_layer_norm=True, min_steps_per_round=1000, rtg_scale=1e-3, reward_shift=0.0, embed_dim=512)
ANTMAZE = dict(context_len=5, eval_context_len=1, g_eval=-100, g_online=-100, alpha_pretrain=0.1, alpha_online=0.1,
               gamma=0.998, critic_lr=2e-4, learning_rate=1e-3, weight_decay=0.0, pretrain_updates=40000,
               buffer_size=2000, policy_interval=1, critic_layer_norm=True, min_steps_per_round=1000, rtg_scale=1.0,
               reward_shift=-1.0, use_timestep_embedding=True, embed_dim=512)
TABLE9 = [
    ("hopper", "medium", dict(MUJOCO, g_eval=3600, g_online=7200, learning_rate=1e-4, weight_decay=5e-4,
                              pretrain_updates=5000, min_steps_per_round=None)),
    ("hopper", "random", dict(MUJOCO, g_eval=3600, g_online=7200, min_steps_per_round=1000)),
    ("halfcheetah", "medium", dict(MUJOCO, g_eval=6000, g_online=12000, learning_rate=1e-4, weight_decay=1e-4,
                                   pretrain_updates=5000, min_steps_per_round=None)),
    ("walker2d", "medium-replay", dict(MUJOCO, g_eval=5000, g_online=10000, learning_rate=1e-3, weight_decay=1e-3,
                                       pretrain_updates=10000, min_steps_per_round=None)),
    ("ant", "medium", dict(MUJOCO, eval_context_len=1, g_eval=6000, g_online=12000, learning_rate=1e-3,
                           weight_decay=1e-4, pretrain_updates=5000, min_steps_per_round=None)),
    ("pen", "human", dict(ADROIT, g_eval=12000, g_online=12000)),
    ("hammer", "cloned", dict(ADROIT, eval_context_len=5, g_eval=16000, g_online=16000)),
    ("door", "human", dict(ADROIT, g_eval=4000, g_online=4000)),
    ("relocate", "expert", dict(ADROIT, g_eval=5000, g_online=5000)),
    ("antmaze", "umaze", ANTMAZE),
    ("antmaze", "medium-play", ANTMAZE),
    ("antmaze", "umaze-diverse", dict(ANTMAZE, embed_dim=1024)),
    ("maze2d", "umaze", dict(MUJOCO, critic_lr=2e-4, policy_interval=1, critic_layer_norm=True,
                             min_steps_per_round=1000, g_eval=100.0, g_online=200.0, pretrain_updates=5000)),
]


@pytest.mark.parametrize("family,kind,expected", TABLE9, ids=[f"{f}-{k}" for f, k, _ in TABLE9])
def test_per_dataset_defaults_table9(family, kind, expected):
    """Every per-dataset default of each family (paper Table 9: K, K_eval, g_eval, g_online, α_pre, α_online, γ,
    critic lr, actor lr, weight decay, pretraining updates, buffer; App. H: interval, LayerNorm, ≥ 1000 steps
    per round for random/Adroit/AntMaze/Maze2d; AntMaze: r − 1, RTG scale 1, timestep embedding)."""
    data = SimpleNamespace(family=family, dataset_kind=kind, act_dim=3, ref_max_score=100.0,
                           episodes=[ep(0.0, [1.0, 2.0], True)])
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(), data)
    got = {k: getattr(a, k) for k in expected}
    assert got == expected


def test_explicit_flags_win_over_the_table_and_unknown_families_use_the_reference_score():
    """Explicit flags are never overwritten; an unknown family conditions on its expert return and explores with
    twice that (ODT App. D)."""
    data = SimpleNamespace(family="antmaze", dataset_kind="umaze", act_dim=8, ref_max_score=1.0,
                           episodes=[ep(0.0, [1.0, 2.0], True)])
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(gamma=0.9, alpha_pretrain=0.0, reward_shift=0.0), data)
    assert (a.gamma, a.alpha_pretrain, a.reward_shift, a.buffer_size) == (0.9, 0.0, 0.0, 2000)
    data = SimpleNamespace(family="swimmer", dataset_kind="medium", act_dim=2, ref_max_score=300.0,
                           episodes=[ep(0.0, [1.0, 2.0], True)])
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(), data)
    assert (a.g_eval, a.g_online, a.policy_interval, a.gamma) == (300.0, 600.0, 2, 0.99)


def test_agent_rtg_counts_the_shifted_reward():
    """AntMaze conditions on shifted rewards too: RTG_{t+1} = RTG_t − (r_t + shift)·scale (the same r − 1 the
    replay's RTG tokens are computed from)."""
    torch.manual_seed(0)
    model = odt_td3.DecisionTransformer(2, 1, 16, 1, 2, 0.0, 100, False)
    args = odt_td3.Args(eval_context_len=2, rtg_scale=0.5, reward_shift=-1.0)
    agent = odt_td3.DTAgent(model, args, np.zeros(2, np.float32), np.ones(2, np.float32), -10.0, noise=0.0,
                            device=CPU, max_ep_len=100)
    obs = np.zeros((1, 2), np.float32)
    agent.reset(obs)
    agent.act(obs)
    agent.observe(np.array([0.0], np.float32))
    agent.act(obs)
    agent.observe(np.array([1.0], np.float32))
    torch.testing.assert_close(agent.rtg[0, :3], torch.tensor([-5.0, -4.5, -4.5]))
    assert math.isclose(agent.target, -5.0)


def test_window_sampling_stream_follows_the_run_seed(trainer):
    """Window sampling draws from its own numpy stream seeded by --seed (3 here): reproducible per run seed."""
    assert trainer.rng.random(4) == pytest.approx(np.random.default_rng(3).random(4))


@pytest.mark.parametrize("flags,ok", [(dict(policy_interval=0), False), (dict(tau=0.0), False),
                                      (dict(tau=1.5), False), (dict(tau=1.0, policy_interval=1), True)])
def test_policy_interval_and_tau_ranges(flags, ok):
    """--policy-interval ≥ 1 (critic updates per actor update) and --tau in (0, 1] (τ = 1 copies the online
    networks), checked before any work."""
    data = SimpleNamespace(family="hopper", dataset_kind="medium", act_dim=3, ref_max_score=1.0,
                           episodes=[ep(0.0, [1.0, 2.0], True)])
    if ok:
        odt_td3.apply_dataset_defaults(odt_td3.Args(**flags), data)
    else:
        with pytest.raises(odt_td3.run.UserError, match="policy-interval"):
            odt_td3.apply_dataset_defaults(odt_td3.Args(**flags), data)


def test_action_at_s_t_sees_r_t_and_s_t_and_earlier_actions_but_not_a_t():
    """DT (arXiv 2106.01345 §3; ODT §3.1): tokens (R_t, s_t, a_t); μ_t is read at the state token, so it depends on
    R_t, s_t and a_{t−1} but never on a_t or anything later (causal mask); μ = tanh(·) lies in (−1, 1)."""
    model, _, _, _ = nets()
    model.eval()
    batch = replay_of([ep(0.0, [1.0, 2.0, 3.0, 4.0], True)]).sample(8, 4, np.random.default_rng(0))
    full = batch["valid"].all(1)
    b = {k: v[full][:1].clone() for k, v in batch.items()}
    mu = lambda x: model.act(model(x["rtg"], x["states"], x["actions"], x["timesteps"], x["valid"]))[0, :, 0]
    base = mu(b)
    for key, j in (("actions", 2), ("rtg", 2), ("states", 2)):
        changed = {**b, key: b[key].clone()}
        changed[key][0, j] += 0.7
        d = (mu(changed) - base).abs()
        assert d[:2].max() < 1e-6  # earlier positions never see a later token
        assert d[3] > 1e-3  # a later position does
        assert (d[2] > 1e-3) == (key != "actions"), key  # μ_2 sees R_2 and s_2, not a_2
    h = model(b["rtg"], b["states"], b["actions"], b["timesteps"], b["valid"])
    assert model.act(100 * h).abs().max() <= 1.0
