"""Equations and mechanisms of reinformer_ag.py checked by hand on tiny inputs.

Reinformer (arXiv 2405.08740, §4): max-return expectile loss, Gaussian NLL and entropy terms with their signs
and padding masks, the predicted return-to-go at evaluation. IQL critic (AG, arXiv 2510.05285, §3.3 eqs. 4-5):
the value expectile, the bootstrap target and which network computes each term, the Polyak update, time limits.
Action Gradient (AG eqs. 1-2, 6-8, Alg. 1): the critic output it climbs, η and n, both clip bounds, the argmax
iterate, the flags an agent, an evaluation and an --eval-only sweep pass through. Per-dataset table values for
every family, seeds, and the training wiring (sizes and intervals) of one update.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_reinformer_ag import FixedModel  # fixed R̂ and action mean: the losses by hand

import reinformer_ag as rf
from common.datasets import Episode

CPU = torch.device("cpu")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class FakeData:
    """What apply_dataset_defaults / OfflineDataset / Trainer read from an OfflineData."""

    def __init__(self, episodes, family="hopper", kind="medium", obs_dim=3, act_dim=2, ref_max=None,
                 mean=None, std=None):
        self.episodes, self.family, self.dataset_kind = episodes, family, kind
        self.obs_dim, self.act_dim, self.ref_max_score = obs_dim, act_dim, ref_max
        self.state_mean = np.zeros(obs_dim, np.float32) if mean is None else np.asarray(mean, np.float32)
        self.state_std = np.ones(obs_dim, np.float32) if std is None else np.asarray(std, np.float32)

    def normalized_score(self, returns):
        return np.asarray(returns, np.float64)


def make_episode(rewards, obs_dim=3, act_dim=2, start=0.0, truncated=False) -> Episode:
    """Observations start, start+1, ... in every dimension; actions 0.1·(t+1); ends by a terminal or a time limit."""
    n = len(rewards)
    obs = (start + np.arange(n, dtype=np.float32))[:, None].repeat(obs_dim, 1)
    last = np.eye(n, dtype=bool)[-1]
    return Episode(observations=obs, actions=(0.1 * np.arange(1, n + 1, dtype=np.float32))[:, None].repeat(act_dim, 1),
                   rewards=np.asarray(rewards, np.float32),
                   terminals=np.zeros(n, bool) if truncated else last,
                   truncations=last if truncated else np.zeros(n, bool),
                   next_observations=obs + 1)


class Fn(torch.nn.Module):
    """A hand-written network: forward(x) = f(x) with a trailing unit dimension, like the critic's MLPs."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # so that optimisers and Polyak have something

    def forward(self, x):
        return (self.f(x) + 0.0 * self.dummy).unsqueeze(-1)


# --- Reinformer losses (arXiv 2405.08740 §4) ----------------------------------------------------------------
def three_token_batch():
    """Two valid tokens and one padded token whose target, prediction and action are far off: padding must not
    count in the loss, in the mean |R| normaliser, nor in the NLL."""
    return {"rtg": torch.tensor([[1.0, 3.0, 7.0]]), "states": torch.zeros(1, 3, 3),
            "actions": torch.tensor([[[0.5, -0.5], [0.0, 1.0], [5.0, 5.0]]]),
            "timesteps": torch.zeros(1, 3, dtype=torch.long), "valid": torch.tensor([[True, True, False]])}


def test_max_return_loss_both_sides_and_valid_only_normaliser():
    """Reinformer eq. (6): u = (R − R̂)/mean_valid|R| and L = mean_valid |τ − 1(u<0)|·u². R = (1, 3) → mean|R| = 2
    (the padded R = 7 excluded); R̂ = (2, 1): u = (−0.5, +1) weighted (1 − τ, τ), τ = 0.99; the mean is over the
    2 valid tokens (not 3)."""
    model = FixedModel(torch.tensor([[2.0, 1.0, -40.0]]), torch.zeros(1, 3, 2), [0.0, 0.0])
    _, _, stats = rf.reinformer_losses(model, torch.tensor(math.log(0.1)), three_token_batch(), rf.Args().expectile,
                                       target_entropy=-2.0)
    expected = (0.01 * 0.25 + 0.99 * 1.0) / 2
    assert stats["train/rtg_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_max_return_loss_uses_the_expectile_it_is_given():
    """The max-return τ is the one passed (the run passes --expectile, not IQL's τ: test_train_passes_each_value...):
    τ = 0.8 weights u > 0 by 0.8 and u < 0 by 0.2."""
    model = FixedModel(torch.tensor([[2.0, 1.0, 0.0]]), torch.zeros(1, 3, 2), [0.0, 0.0])
    _, _, stats = rf.reinformer_losses(model, torch.tensor(math.log(0.1)), three_token_batch(), expectile=0.8,
                                       target_entropy=-2.0)
    assert stats["train/rtg_loss"].item() == pytest.approx((0.2 * 0.25 + 0.8 * 1.0) / 2, rel=1e-6)


def test_losses_over_a_batch_of_two_rows_with_negative_returns():
    """Masks and means run over every valid token of the whole batch (rows of 2 and 1 valid tokens: n = 3), and the
    normaliser is mean |R| (returns of both signs: |−2|, |1|, |−3| → 2)."""
    batch = {"rtg": torch.tensor([[-2.0, 1.0, 9.0], [-3.0, 9.0, 9.0]]), "states": torch.zeros(2, 3, 3),
             "actions": torch.tensor([[[1.0], [0.0], [7.0]], [[2.0], [7.0], [7.0]]]),
             "timesteps": torch.zeros(2, 3, dtype=torch.long),
             "valid": torch.tensor([[True, True, False], [True, False, False]])}
    model = FixedModel(torch.tensor([[-1.0, 1.0, 0.0], [-5.0, 0.0, 0.0]]), torch.zeros(2, 3, 1), [0.0])
    _, _, stats = rf.reinformer_losses(model, torch.tensor(math.log(0.1)), batch, rf.Args().expectile, -1.0)
    u = np.array([-1.0, 0.0, 2.0]) / 2.0  # (R − R̂)/mean|R|
    assert stats["train/rtg_loss"].item() == pytest.approx(np.mean(np.where(u < 0, 0.01, 0.99) * u ** 2), rel=1e-6)
    assert stats["train/nll"].item() == pytest.approx(np.mean(0.5 * np.array([1.0, 0.0, 4.0])) + HALF_LOG_2PI,
                                                      rel=1e-6)


def test_gaussian_nll_and_entropy_with_nonzero_log_std_two_dims():
    """Reinformer §4 (ODT eqs. 3-5): −log N(a; μ, σ) = ½((a−μ)/σ)² + log σ + ½log 2π summed over action dims and
    averaged over valid tokens; H = Σ_dims (log σ + ½(1 + log 2π)); loss = L_R + NLL − λ·H, λ not trained by it;
    the temperature loss λ·(H − β) with H detached."""
    log_std = [0.5, -1.0]
    model = FixedModel(torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[[0.0, 0.0], [0.2, 0.5], [-9.0, 9.0]]]),
                       log_std)
    log_t = torch.tensor(math.log(0.2), requires_grad=True)
    loss, t_loss, stats = rf.reinformer_losses(model, log_t, three_token_batch(), 0.99, target_entropy=-2.0)
    sig = np.exp(log_std)
    actions, mu = np.array([[0.5, -0.5], [0.0, 1.0]]), np.array([[0.0, 0.0], [0.2, 0.5]])
    nll_tok = (0.5 * ((actions - mu) / sig) ** 2 + np.array(log_std) + HALF_LOG_2PI).sum(-1)
    nll = nll_tok.mean()
    entropy = sum(ls + 0.5 * (1 + math.log(2 * math.pi)) for ls in log_std)
    assert stats["train/rtg_loss"].item() == pytest.approx(0.0, abs=1e-12)  # R̂ = R on the valid tokens
    assert stats["train/nll"].item() == pytest.approx(nll, rel=1e-6)
    assert stats["train/entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert loss.item() == pytest.approx(nll - 0.2 * entropy, rel=1e-6)
    assert t_loss.item() == pytest.approx(0.2 * (entropy + 2.0), rel=1e-6)
    # d loss / d log σ_j = −Σ_valid ((a−μ)/σ)²/n + 1 − λ: the NLL pulls log σ to the residual, the entropy bonus up
    loss.backward()
    grad = (-(((actions - mu) / sig) ** 2).mean(0) + 1.0 - 0.2)
    np.testing.assert_allclose(model.log_std.grad.numpy(), grad, rtol=1e-5)
    assert log_t.grad is None  # λ enters θ's loss as a constant


def test_temperature_loss_gradient_reaches_only_log_lambda():
    """ODT eq. (7) dual step: ∂/∂log λ of λ·(H − β) = λ·(H − β); H is detached, so log σ gets nothing from it."""
    model = FixedModel(torch.tensor([[1.0, 3.0, 0.0]]), torch.zeros(1, 3, 2), [0.3, 0.3])
    log_t = torch.tensor(math.log(0.5), requires_grad=True)
    _, t_loss, stats = rf.reinformer_losses(model, log_t, three_token_batch(), 0.99, target_entropy=1.0)
    t_loss.backward()
    assert model.log_std.grad is None
    assert log_t.grad.item() == pytest.approx(0.5 * (stats["train/entropy"].item() - 1.0), rel=1e-6)


def test_log_std_clamp_both_bounds():
    """Reinformer: σ = exp(clamp(log σ, −20, 2)); in-range values pass unchanged."""
    model = FixedModel(None, None, [-25.0, 3.0, 0.7])
    torch.testing.assert_close(model.clamped_log_std(), torch.tensor([-20.0, 2.0, 0.7]))
    assert (rf.LOG_STD_MIN, rf.LOG_STD_MAX) == (-20.0, 2.0)


# --- IQL critic (AG §3.3, eqs. 4-5) ------------------------------------------------------------------------
def linear_critic():
    """Hand-written nets on x = (s, a) ∈ R^3 × R^2 (s index 0-2, a index 3-4). Online and target Qs differ, and
    V depends on the state, so every term says which network and which state computed it."""
    critic = rf.IQLCritic(3, 2, 8)
    critic.q1 = Fn(lambda x: 1.0 + x[..., 3])
    critic.q2 = Fn(lambda x: 2.0 + x[..., 4])
    critic.q1_target = Fn(lambda x: 3.0 + x[..., 0] + x[..., 3])
    critic.q2_target = Fn(lambda x: 4.0 - x[..., 0])
    critic.v = torch.nn.Linear(3, 1)
    with torch.no_grad():
        critic.v.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        critic.v.bias.fill_(0.5)
    return critic


def critic_batch():
    return {"states": torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]),
            "actions": torch.tensor([[0.5, 0.0], [0.0, -1.0], [1.0, 1.0]]),
            "rewards": torch.tensor([1.0, -1.0, 0.5]),
            "next_states": torch.tensor([[3.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [5.0, 0.0, 0.0]]),
            "dones": torch.tensor([0.0, 0.0, 1.0])}


def test_iql_losses_by_hand_with_distinct_networks():
    """Eq. (4): Q target r + γ(1 − done)·V(s') with V at the NEXT state; eq. (5): L2^τ(min(Q1', Q2')(s, a) − V(s))
    with the TARGET Qs and IQL's τ on the side where Q' > V. Both online Qs regress on the target."""
    critic, b = linear_critic(), critic_batch()
    loss, stats = rf.iql_losses(critic, b, gamma=0.9, expectile=0.7)
    s, a, r, s2, d = (b[k].numpy() for k in ("states", "actions", "rewards", "next_states", "dones"))
    v_s, v_s2 = s[:, 0] + 0.5, s2[:, 0] + 0.5
    backup = r + 0.9 * (1 - d) * v_s2
    q1, q2 = 1.0 + a[:, 0], 2.0 + a[:, 1]
    q_loss = np.mean((q1 - backup) ** 2) + np.mean((q2 - backup) ** 2)
    q_target = np.minimum(3.0 + s[:, 0] + a[:, 0], 4.0 - s[:, 0])
    u = q_target - v_s  # (3, 1.5, −0.5): both sides of the expectile
    v_loss = np.mean(np.where(u < 0, 0.3, 0.7) * u ** 2)
    assert stats["train/critic_q_loss"].item() == pytest.approx(q_loss, rel=1e-6)
    assert stats["train/critic_v_loss"].item() == pytest.approx(v_loss, rel=1e-6)
    assert loss.item() == pytest.approx(q_loss + v_loss, rel=1e-6)


def test_iql_value_expectile_lower_side_and_gradients():
    """Eq. (5) on the other side: where min(Q1', Q2') < V the weight is 1 − τ. The Q target is a constant (no
    gradient into V through r + γV(s')), so V's gradient is exactly that of the expectile loss."""
    critic, b = linear_critic(), critic_batch()
    with torch.no_grad():
        critic.v.bias.fill_(6.0)  # V(s) = s0 + 6 > Q'(s, a) everywhere
    loss, stats = rf.iql_losses(critic, b, gamma=0.9, expectile=0.7)
    s, a = b["states"].numpy(), b["actions"].numpy()
    u = np.minimum(3.0 + s[:, 0] + a[:, 0], 4.0 - s[:, 0]) - (s[:, 0] + 6.0)
    assert (u < 0).all()
    assert stats["train/critic_v_loss"].item() == pytest.approx(np.mean(0.3 * u ** 2), rel=1e-6)
    loss.backward()
    # ∂/∂bias of mean(0.3·u²) with u = Q' − V: −2·0.3·mean(u)
    assert critic.v.bias.grad.item() == pytest.approx(-2 * 0.3 * u.mean(), rel=1e-5)


def test_target_q_is_the_min_of_the_target_networks():
    """IQL / AG: Q(s, a) = min(Q1', Q2') of the Polyak TARGET copies, not the online Qs."""
    critic, b = linear_critic(), critic_batch()
    s, a = b["states"], b["actions"]
    expected = torch.minimum(3.0 + s[:, 0] + a[:, 0], 4.0 - s[:, 0])
    torch.testing.assert_close(critic.target_q(s, a), expected)


def test_polyak_moves_both_targets_towards_the_online_nets():
    """θ' ← θ' + ρ(θ − θ') for Q1' and Q2' (each towards its own online net); the online nets do not move."""
    critic = rf.IQLCritic(3, 2, 8)
    with torch.no_grad():
        for net, value in ((critic.q1, 1.0), (critic.q2, -2.0), (critic.q1_target, 0.0), (critic.q2_target, 4.0)):
            for p in net.parameters():
                p.fill_(value)
    critic.update_targets(0.25)
    for net, value in ((critic.q1_target, 0.25), (critic.q2_target, 2.5), (critic.q1, 1.0), (critic.q2, -2.0)):
        assert all(torch.allclose(p, torch.full_like(p, value)) for p in net.parameters()), value
    critic.update_targets(0.0)  # ρ = 0 keeps the targets
    assert all(torch.allclose(p, torch.full_like(p, 2.5)) for p in critic.q2_target.parameters())


# --- offline data: time limits, normalisation, padding, transitions ---------------------------------------------
def test_transitions_time_limits_bootstrap_and_next_states_are_normalised():
    """IQL eq. (4): only true terminals stop the bootstrap; a time-limit truncation keeps done = 0. s and s' are
    normalised with the same dataset mean/std (frozen), and every transition can be drawn (the last one too)."""
    eps = [make_episode([1.0, 2.0, 3.0], truncated=True), make_episode([4.0, 5.0], start=10.0)]
    mean, std = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 0.5])
    data = rf.OfflineDataset(FakeData(eps, mean=mean, std=std), 1.0, 1000, CPU)
    np.testing.assert_array_equal(data.flat["dones"].numpy(), [0, 0, 0, 0, 1])  # truncated episode: no terminal
    obs = np.concatenate([e.observations for e in eps])
    np.testing.assert_allclose(data.flat["states"].numpy(), (obs - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(data.flat["next_states"].numpy(), (obs + 1 - mean) / std, rtol=1e-6)
    tr = data.sample_transitions(2000, np.random.default_rng(0))
    seen = {round(x, 4) for x in tr["rewards"].tolist()}
    assert seen == {1.0, 2.0, 3.0, 4.0, 5.0}  # uniform over all 5 transitions, the last included
    assert tr["dones"].sum().item() == pytest.approx((tr["rewards"] == 5.0).sum().item())


def test_windows_zero_every_padded_input_and_keep_timesteps():
    """Reinformer's right padding: a trajectory shorter than K yields valid = (1, 1, 0, 0) and zeros in every
    padded input (state, action, RTG, timestep); valid steps keep their actions and timesteps t, t+1, ..."""
    eps = [make_episode([1.0, 1.0], start=50.0), make_episode([1.0] * 6, start=100.0)]
    data = rf.OfflineDataset(FakeData(eps), 1.0, 1000, CPU)
    batch = data.sample(64, 4, np.random.default_rng(3))
    short = ~batch["valid"][:, -1]
    assert short.any() and (~short).any()
    for key in ("states", "actions", "rtg", "timesteps"):
        assert (batch[key][short][:, 2:] == 0).all(), key
    torch.testing.assert_close(batch["actions"][short][:, :2], torch.tensor([[0.1, 0.1], [0.2, 0.2]]).expand(
        int(short.sum()), 2, 2))
    full = batch["timesteps"][~short]
    assert (full[:, 1:] - full[:, :-1] == 1).all()


def test_timesteps_are_clipped_to_the_embedding_range():
    """Steps past max_ep_len − 1 share the last timestep embedding (no index error on long trajectories)."""
    data = rf.OfflineDataset(FakeData([make_episode([1.0] * 6)]), 1.0, 4, CPU)
    assert data.flat["timesteps"].tolist() == [0, 1, 2, 3, 3, 3]


# --- one update: sizes, intervals, schedule ---------------------------------------------------------------------
class RecordingData:
    """Wraps OfflineDataset and records the sizes each update asks for."""

    def __init__(self, inner):
        self.inner, self.windows, self.transitions = inner, [], []

    def sample(self, batch_size, context_len, rng):
        self.windows.append((batch_size, context_len))
        return self.inner.sample(batch_size, context_len, rng)

    def sample_transitions(self, batch_size, rng):
        self.transitions.append(batch_size)
        return self.inner.sample_transitions(batch_size, rng)


def test_update_honours_critic_updates_sizes_and_polyak_per_critic_step(monkeypatch, tmp_path):
    """AG Alg. 1 training: one Reinformer step on B windows of length K (not the evaluation length), one warm-up
    scheduler step, one dual step on log λ (Adam's first step: −lr·sign(λ(H − β)) with H > β), then
    --critic-updates IQL steps on --critic-batch-size transitions, each followed by one Polyak step of ρ."""
    eps = [make_episode([1.0, 0.5, 2.0, 1.0, 0.0]), make_episode([0.3, 0.2, 0.1], start=5.0)]
    trainer = make_trainer(monkeypatch, tmp_path, eps, seed=0, dropout=0.0, batch_size=4, context_len=2,
                           eval_context_len=3, critic_batch_size=6, critic_updates=3, polyak=0.25, learning_rate=1e-3,
                           warmup_steps=4, temperature_lr=1e-4, pretrain_updates=1)
    monkeypatch.setattr(rf.Trainer, "evaluate", lambda self: {"eval_rf/return_mean": 0.0, "eval/return_mean": 0.0})
    monkeypatch.setattr(rf.run, "save_checkpoint", lambda run_dir, state: None)
    critic = trainer.critic
    with torch.no_grad():
        for p in critic.q1_target.parameters():
            p.add_(1.0)  # target − online = 1 everywhere before the update
    trainer.critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)  # only Polyak moves the targets
    data = trainer.offline = RecordingData(trainer.offline)
    trainer.train(type("Stop", (), {"requested": False})())
    assert data.windows == [(4, 2)]
    assert data.transitions == [6, 6, 6]
    gap = [(pt - p).abs().max().item() for pt, p in zip(critic.q1_target.parameters(), critic.q1.parameters(),
                                                          strict=True)]
    assert gap == pytest.approx([0.75 ** 3] * len(gap), rel=1e-5)  # three Polyak steps of ρ = 0.25
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)  # warm-up step 2 of 4
    assert trainer.log_temperature.item() == pytest.approx(math.log(0.1) - 1e-4, abs=1e-7)
    trainer.logger.close()


def test_train_passes_each_value_to_its_update(monkeypatch, tmp_path):
    """The loop hands each update the flag it reads: Reinformer --expectile (not IQL's τ), β and --grad-clip;
    IQL γ, --iql-expectile (not the max-return τ) and ρ, on the batches drawn for each."""
    calls = []
    monkeypatch.setattr(rf, "reinformer_update", lambda *a, **kw: calls.append(("rf", a[5]["rtg"].shape, kw)) or {
        "train/nll": torch.zeros(())})
    monkeypatch.setattr(rf, "iql_update", lambda critic, opt, batch, **kw: calls.append(
        ("iql", batch["rewards"].shape, kw)) or {"train/critic_q_loss": torch.zeros(())})
    monkeypatch.setattr(rf.Trainer, "evaluate", lambda self: {"eval_rf/return_mean": 0.0, "eval/return_mean": 0.0})
    monkeypatch.setattr(rf.run, "save_checkpoint", lambda run_dir, state: None)
    trainer = make_trainer(monkeypatch, tmp_path, seed=1, pretrain_updates=1, batch_size=3, critic_batch_size=5,
                           critic_updates=2, expectile=0.95, iql_expectile=0.6, gamma=0.8, polyak=0.3, grad_clip=0.7,
                           target_entropy=-1.5)
    trainer.train(type("Stop", (), {"requested": False})())
    iql = ("iql", (5,), dict(gamma=0.8, expectile=0.6, polyak=0.3))
    assert calls == [("rf", (3, 2), dict(expectile=0.95, target_entropy=-1.5, grad_clip=0.7)), iql, iql]
    trainer.logger.close()


def test_warmup_schedule_linear_from_the_first_step():
    """Reinformer: lr · min(1, (step + 1)/warm-up): the first update already uses lr/warm-up, full lr from the end."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = rf.warmup_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


# --- Action Gradient (AG eqs. 1-2, 6-8, Algorithm 1) ---------------------------------------------------------------
def test_clip_holds_both_bounds_per_dimension():
    """a^{i+1} = clip(a^i + η∇Q, low, high): a Q increasing in a_0 and decreasing in a_1 drives a_0 to its upper and
    a_1 to its lower bound (asymmetric box), never past either."""
    low, high = torch.tensor([-0.5, -0.3]), torch.tensor([0.4, 2.0])
    a, best = rf.action_gradient(lambda s, x: x[:, 0] - x[:, 1], torch.zeros(1, 3), torch.zeros(1, 2), 4, 0.2,
                                 "sgd", low, high)
    torch.testing.assert_close(a, torch.tensor([[0.4, -0.3]]))
    assert best.item() == 2  # the first iterate at both bounds (ties keep the earliest)


def test_argmax_returns_the_best_iterate_not_the_last():
    """Eq. (2): â = argmax_i Q(s, a^i) over {a⁰, ..., aⁿ}. Q = sin(3a), η = 0.3 from a⁰ = 0: a¹ = 0.9 (Q 0.43),
    a² ≈ 0.087 (Q 0.26), a³ ≈ 0.96 (Q 0.26): a¹ is executed."""
    q = lambda s, x: torch.sin(3 * x[:, 0])  # noqa: E731
    a, best = rf.action_gradient(q, torch.zeros(1, 1), torch.zeros(1, 1), 3, 0.3, "sgd", -5 * torch.ones(1),
                                 5 * torch.ones(1))
    assert best.item() == 1
    assert a.item() == pytest.approx(0.9, rel=1e-6)


def test_step_count_and_step_size():
    """Eq. (1) with n steps of η on a linear Q (∇Q = 1): aⁿ = a⁰ + nη, for several (n, η); n = 0 returns a⁰."""
    for n, eta in ((1, 0.1), (3, 0.05), (5, 0.01)):  # three envs at once: each gets its own full gradient
        a, best = rf.action_gradient(lambda s, x: x.sum(-1), torch.zeros(3, 3), torch.zeros(3, 2), n, eta, "sgd",
                                     -torch.ones(2), torch.ones(2))
        torch.testing.assert_close(a, torch.full((3, 2), n * eta))
        assert best.tolist() == [n] * 3
    a, best = rf.action_gradient(lambda s, x: x.sum(-1), torch.zeros(1, 3), torch.full((1, 2), 0.3), 0, 0.1, "sgd",
                                 -torch.ones(2), torch.ones(2))
    torch.testing.assert_close(a, torch.full((1, 2), 0.3))


def test_adam_and_rmsprop_two_steps_as_printed():
    """Eq. (8) as printed: m ← ζ₁m + (1−ζ₁)g, v ← ζ₂v + (1−ζ₂)g², step (m/(1−ζ₁))/(√(v/(1−ζ₂)) + ε); eq. (7):
    r ← ζ₂r + (1−ζ₂)g², step g/(√r + ε). With a constant gradient g = 2 and ζ₁ = 0.5, ζ₂ = 0.8 the two Adam
    steps are 1 and (1+ζ₁)/√(1+ζ₂); RMSProp's are 1/√(1−ζ₂) and 1/√(1−ζ₂²)."""
    q = lambda s, x: 2.0 * x.sum(-1)  # noqa: E731
    box = (-10 * torch.ones(1), 10 * torch.ones(1))
    a, _ = rf.action_gradient(q, torch.zeros(1, 1), torch.zeros(1, 1), 2, 0.1, "adam", *box, zeta1=0.5, zeta2=0.8)
    assert a.item() == pytest.approx(0.1 * (1 + 1.5 / math.sqrt(1.8)), rel=1e-5)
    a, _ = rf.action_gradient(q, torch.zeros(1, 1), torch.zeros(1, 1), 2, 0.1, "rmsprop", *box, zeta1=0.5,
                              zeta2=0.8)
    assert a.item() == pytest.approx(0.1 * (1 / math.sqrt(0.2) + 1 / math.sqrt(1 - 0.64)), rel=1e-5)
    a, _ = rf.action_gradient(q, torch.zeros(1, 1), torch.zeros(1, 1), 2, 0.1, "momentum", *box, zeta1=0.5)
    assert a.item() == pytest.approx(0.1 * (0.5 * 2 + 2 * 0.5 * 2), rel=1e-5)  # v: ζg, then ζg + ζg (no decay)


# --- the agent: which critic, which state, which flags, which action enters the context ----------------------------
def tiny_model(seed=0):
    torch.manual_seed(seed)
    return rf.Reinformer(3, 2, 16, 1, 2, 0.0, 50, False).eval()


def make_agent(critic, n, eta, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), high=(1.0, 1.0), **kw):
    args = rf.Args(rtg_scale=0.01, context_len=2, eval_context_len=3, **kw)  # the agent's window: eval's
    return rf.RFAgent(tiny_model(), critic, args, np.asarray(mean, np.float32), np.asarray(std, np.float32), CPU,
                      50, -np.asarray(high), np.asarray(high), n, eta)


def model_action(agent, obs):
    """a⁰ of a fresh episode's first step, from the model alone."""
    with torch.no_grad():
        s = (torch.as_tensor(obs) - agent.mean) / agent.std
        rtg = agent.model.predict_rtg(torch.zeros(len(obs), 1), s[:, None], torch.zeros(len(obs), 1, 2),
                                      torch.zeros(len(obs), 1, dtype=torch.long))
        return agent.model.predict_action(rtg, s[:, None], torch.zeros(len(obs), 1, 2),
                                          torch.zeros(len(obs), 1, dtype=torch.long))[:, -1]


def test_agent_climbs_the_min_of_the_target_critics_with_its_own_eta_and_n():
    """AG Alg. 1 inference: ascent on min(Q1', Q2'). Here Q2' = 4 − s0 − a0 is the min (Q1' = 10 + a0) and the
    online Qs rise in a0: the executed action must have a0 lowered by n·η with the agent's n = 2, η = 0.1 (a sweep's
    values, not the run's --ag-steps 7 / --ag-lr 0.5), a1 unchanged; it is the action written into the context."""
    critic = rf.IQLCritic(3, 2, 8)
    critic.q1, critic.q2 = Fn(lambda x: 5.0 * x[..., 3]), Fn(lambda x: 5.0 * x[..., 3])
    critic.q1_target, critic.q2_target = Fn(lambda x: 10.0 + x[..., 3]), Fn(lambda x: 4.0 - x[..., 0] - x[..., 3])
    agent = make_agent(critic, 2, 0.1, ag_steps=7, ag_lr=0.5)
    obs = np.array([[0.1, 0.2, 0.3], [-0.2, 0.0, 0.4]], np.float32)
    agent.reset(obs)
    action = agent.act(obs)
    a0 = model_action(agent, obs)
    expected = torch.stack((torch.clamp(a0[:, 0] - 0.2, -1, 1), a0[:, 1]), -1)
    np.testing.assert_allclose(action, expected.numpy(), atol=1e-5)
    torch.testing.assert_close(agent.actions[:, 0], torch.as_tensor(action))  # the executed action, not a⁰
    assert agent.stats["changed"] == 2 and agent.stats["n"] == 2
    assert agent.stats["q_gain"] == pytest.approx(0.4, rel=1e-4)  # Q'(a) − Q'(a⁰) = 2 envs × 0.2
    assert agent.stats["shift"] == pytest.approx(0.4, rel=1e-4)


def test_agent_critic_sees_the_normalised_state():
    """The critic trained on normalised states (OfflineDataset), so AG evaluates Q at (s − mean)/std: with
    Q' = −(a0 − s0)², many small steps bring a0 to the normalised s0 = 0.5, not to the raw 3 (clipped to 1)."""
    critic = rf.IQLCritic(3, 2, 8)
    q = Fn(lambda x: -(x[..., 3] - x[..., 0]) ** 2)
    critic.q1_target, critic.q2_target = q, q
    agent = make_agent(critic, 60, 0.1, mean=(2.0, 0.0, 0.0), std=(2.0, 1.0, 1.0))
    obs = np.array([[3.0, 0.0, 0.0]], np.float32)
    agent.reset(obs)
    assert agent.act(obs)[0, 0] == pytest.approx(0.5, abs=1e-3)


def test_agent_passes_method_and_zetas_through():
    """--ag-method and ζ₁, ζ₂, ε reach action_gradient: Adam with ζ₁ = 0.5, ζ₂ = 0.8 on a linear Q' (gradient 1 in
    a0) moves a0 by η(1 + 1.5/√1.8) in two steps (SGD would move 2η, swapped ζs η(1 + 1.5/√1.5))."""
    critic = rf.IQLCritic(3, 2, 8)
    critic.q1_target = critic.q2_target = Fn(lambda x: x[..., 3])
    agent = make_agent(critic, 2, 0.05, high=(5.0, 5.0), ag_method="adam", ag_zeta1=0.5, ag_zeta2=0.8)
    obs = np.array([[0.1, 0.2, 0.3]], np.float32)
    agent.reset(obs)
    action = agent.act(obs)
    a0 = model_action(agent, obs)
    assert action[0, 0] - a0[0, 0].item() == pytest.approx(0.05 * (1 + 1.5 / math.sqrt(1.8)), rel=1e-4)
    assert action[0, 1] == pytest.approx(a0[0, 1].item(), abs=1e-6)


def test_agent_without_improvement_keeps_a0_and_counts_no_change():
    """Eq. (2) when a⁰ already maximises Q': every iterate ties with a⁰, â = a⁰ is kept, changed = 0, gain 0."""
    critic = rf.IQLCritic(3, 2, 8)
    agent = make_agent(critic, 3, 0.1)
    obs = np.array([[0.1, 0.2, 0.3]], np.float32)
    a0 = model_action(agent, obs)
    q = Fn(lambda x: -50.0 * ((x[..., 3:] - a0) ** 2).sum(-1))
    critic.q1_target = critic.q2_target = q
    agent.reset(obs)
    action = agent.act(obs)
    np.testing.assert_allclose(action, a0.numpy(), atol=1e-6)
    assert agent.stats["changed"] == 0 and agent.stats["q_gain"] == pytest.approx(0.0, abs=1e-6)


class ScriptedRTG:
    """Replaces pass 1 (R̂) by a script, so the adaptive context can be checked by hand."""

    def __init__(self, values):
        self.values, self.calls = values, 0

    def __call__(self, rtg, *rest, **kw):
        value = self.values[self.calls]
        self.calls += 1
        return torch.full(rtg.shape, value)


@pytest.mark.parametrize("rtgs,kept", [((1.0, 3.0, 2.0), 2), ((3.0, 2.0, 2.0), 1), ((3.0, 2.0, 1.0), 3)])
def test_adaptive_context_action_pass_sees_only_the_kept_steps(rtgs, kept):
    """AG §4.1: the action pass keeps step t−j only while R̂_{t−j} > R̂_{t−j+1} (strictly) back from t; the action
    equals the model's on that shorter window (R̂ ties drop the earlier step)."""
    agent = make_agent(rf.IQLCritic(3, 2, 8), 0, 0.0, adaptive_context=True)
    agent.model.predict_rtg = ScriptedRTG(rtgs)
    obs = np.random.default_rng(0).normal(size=(1, 3)).astype(np.float32)
    agent.reset(obs)
    for t in range(3):
        action = agent.act(obs + t)
        agent.observe(np.ones(1, np.float32))
    lo = 3 - kept
    with torch.no_grad():
        expected = agent.model.predict_action(agent.rtg[:, lo:3], agent.states[:, lo:3], agent.actions[:, lo:3],
                                              torch.arange(lo, 3)[None])[:, -1]
    np.testing.assert_allclose(action, expected.numpy(), atol=1e-5)


# --- evaluate_both and --eval-only ----------------------------------------------------------------------------------
class FakeEnvs:
    class single_action_space:  # noqa: N801
        low, high = -np.ones(2, np.float32), np.ones(2, np.float32)


class RecordingEvaluate:
    def __init__(self):
        self.calls = []

    def __call__(self, envs, agent, seeds, normalized_score):
        self.calls.append((agent.ag_steps, agent.ag_lr, list(seeds)))
        value = 1.0 + agent.ag_steps
        return {"eval/return_mean": value, "eval/return_std": 0.0, "eval/normalized_score_mean": value,
                "eval/normalized_score_std": 0.0, "eval/length_mean": 5.0}


def test_evaluate_both_same_seeds_and_the_swept_eta_n(monkeypatch):
    """Alg. 1 inference, both ways on the same episodes: RF (n = 0) and RF+AG with the (n, η) passed in (a sweep's
    values, not args'), reset seeds eval_seeds(--seed, --eval-episodes); with n = 0 eval/ is a copy of eval_rf/."""
    rec = RecordingEvaluate()
    monkeypatch.setattr(rf, "evaluate", rec)
    args = rf.Args(seed=7, eval_episodes=3, ag_steps=9, ag_lr=0.9, rtg_scale=0.01, eval_context_len=2)
    data = FakeData([], mean=np.zeros(3), std=np.ones(3))
    metrics = rf.evaluate_both(tiny_model(), rf.IQLCritic(3, 2, 8), args, data, FakeEnvs, CPU, 50, ag_steps=2,
                               ag_lr=0.05)
    seeds = rf.eval_seeds(7, 3)
    assert seeds != rf.eval_seeds(1, 3)
    assert rec.calls == [(0, 0.05, seeds), (2, 0.05, seeds)]
    assert metrics["eval_rf/return_mean"] == 1.0 and metrics["eval/return_mean"] == 3.0
    rec.calls.clear()
    metrics = rf.evaluate_both(tiny_model(), rf.IQLCritic(3, 2, 8), args, data, FakeEnvs, CPU, 50, ag_steps=0,
                               ag_lr=0.05)
    assert [c[0] for c in rec.calls] == [0]
    assert metrics["eval/return_mean"] == metrics["eval_rf/return_mean"] == 1.0


def write_run(folder, **config_args):
    folder.mkdir(parents=True)
    base = {f: getattr(rf.Args(), f) for f in rf.MODEL_FIELDS}
    (folder / "config.json").write_text(json.dumps({"script": "reinformer_ag.py", "args": {
        **base, "seed": 99, "eval_episodes": 99, "ag_method": "momentum", "ag_steps": 99, "ag_lr": 0.99,
        "adaptive_context": False, "conditioning": "predicted", **config_args}}))
    (folder / "model.pt").write_bytes(b"")
    return folder


def test_eval_only_takes_the_model_fields_from_the_run_and_the_rest_from_the_cli(tmp_path):
    """--eval-only: the network's shape and its input convention (MODEL_FIELDS: env, sizes, K, separate trunks,
    RTG scale, critic width) come from the trained run; evaluation flags (seed, episodes, AG method, n, η,
    adaptive context, conditioning) are the command line's."""
    run = write_run(tmp_path / "run", env_id="walker2d-medium-v2", embed_dim=48, n_layers=3, n_heads=4,
                    context_len=7, separate_networks=True, rtg_scale=0.004, critic_hidden=64, dropout=0.2)
    cli = rf.Args(eval_only=str(run), seed=3, eval_episodes=4, ag_method="adam", ag_steps=2, ag_lr=0.02,
                  adaptive_context=True, conditioning="target")
    model_path = rf.run.read_finished_run(run, "reinformer_ag.py", rf.MODEL_FIELDS, cli)
    args = cli
    assert model_path == run / "model.pt"
    assert (args.env_id, args.embed_dim, args.n_layers, args.n_heads, args.context_len) == (
        "walker2d-medium-v2", 48, 3, 4, 7)
    assert (args.separate_networks, args.rtg_scale, args.critic_hidden, args.dropout) == (True, 0.004, 64, 0.2)
    assert (args.seed, args.eval_episodes, args.ag_method, args.ag_steps, args.ag_lr) == (3, 4, "adam", 2, 0.02)
    assert args.adaptive_context and args.conditioning == "target" and args.eval_only == str(run)


def test_eval_only_sweeps_the_grid_of_n_and_eta(monkeypatch, tmp_path):
    """AG §5 / docs: --eval-only evaluates (0, 0) (plain RF) and then every (n, η) of --sweep-ag-steps ×
    --sweep-ag-lr, in that order, passing each to the evaluation, and each row reports RF+AG (`eval/`); empty lists
    fall back to --ag-steps / --ag-lr. It loads both networks from model.pt: AG needs the trained critic."""
    calls, loaded = [], []
    data = FakeData([], mean=np.zeros(3), std=np.ones(3))

    def fake_evaluate_both(model, critic, args, data, envs, device, max_ep_len, *, ag_steps, ag_lr):
        calls.append((ag_steps, ag_lr))
        return {"eval/return_mean": 10.0 * ag_steps + ag_lr, "eval/return_std": 0.0,
                "eval/normalized_score_mean": 0.0, "eval/env_steps_per_second": 1.0,
                "eval_rf/return_mean": -1.0, "eval_rf/return_std": 0.0, "eval_rf/normalized_score_mean": 0.0,
                "eval_rf/env_steps_per_second": 1.0}

    monkeypatch.setattr(rf.run, "read_finished_run", lambda run, script, fields, args: tmp_path / "model.pt")
    monkeypatch.setattr(rf, "set_up", lambda args: (args, data, CPU, tmp_path, None))
    monkeypatch.setattr(rf, "make_eval_envs", lambda args, data: (FakeEnvs, 50))
    monkeypatch.setattr(rf, "make_model", lambda args, data, device, max_ep_len: tiny_model())
    monkeypatch.setattr(rf.run, "load_states", lambda path, modules, device, context: loaded.append(
        {k: type(m).__name__ for k, m in modules.items()}))
    monkeypatch.setattr(rf, "evaluate_both", fake_evaluate_both)
    args = rf.Args(eval_only="x", progress=False, critic_hidden=8, ag_steps=3, ag_lr=0.001,
                   sweep_ag_steps=(1, 4), sweep_ag_lr=(0.01, 0.2, 0.5))
    summary = rf.evaluate_only(args)
    grid = [(0, 0.0), (1, 0.01), (1, 0.2), (1, 0.5), (4, 0.01), (4, 0.2), (4, 0.5)]
    assert calls == grid
    assert loaded == [{"model": "Reinformer", "critic": "IQLCritic"}]
    assert [(r["ag/steps"], r["ag/lr"], r["return_mean"]) for r in summary["rows"]] == [
        (n, eta, 10.0 * n + eta) for n, eta in grid]
    calls.clear()
    rf.evaluate_only(rf.Args(eval_only="x", progress=False, critic_hidden=8, ag_steps=3, ag_lr=0.001))
    assert calls == [(0, 0.0), (3, 0.001)]
    calls.clear()
    rf.evaluate_only(rf.Args(eval_only="x", progress=False, critic_hidden=8, ag_steps=3, ag_lr=0.001,
                             sweep_ag_lr=(0.03,)))
    assert calls == [(0, 0.0), (3, 0.03)]


# --- per-dataset defaults -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,kind,scale", [
    ("hopper", "medium", 1e-3), ("walker2d", "medium-replay", 1e-3), ("halfcheetah", "medium-expert", 2e-4),
    ("maze2d", "umaze", 1e-2), ("pen", "human", 1e-4), ("hammer", "cloned", 1e-4), ("door", "expert", 1e-4),
    ("relocate", "human", 1e-4), ("antmaze", "umaze", 1.0), ("ant", "medium", 1e-3)])
def test_rtg_scale_per_family(family, kind, scale):
    """Reinformer's RTG divisors (docs: 1/1000 hopper/walker2d, 1/5000 halfcheetah, 1/100 maze2d, 1/10000 Adroit;
    AntMaze's 0/1 returns unscaled), the common defaults elsewhere: K 5, 50k updates, lr 1e-4, warm-up 5000, and the
    AG defaults n = 3, η = 1e-3; β = −dim(A); g_eval the reference max score."""
    eps = [make_episode([1.0]), make_episode([1.0, 2.0])]  # not every episode one step: not the toy defaults
    args = rf.apply_dataset_defaults(rf.Args(), FakeData(eps, family, kind, obs_dim=11, act_dim=3, ref_max=321.0))
    assert args.rtg_scale == pytest.approx(scale)
    assert (args.context_len, args.eval_context_len, args.pretrain_updates, args.learning_rate,
            args.warmup_steps) == (5, 5, 50_000, 1e-4, 5000)
    assert (args.ag_steps, args.ag_lr) == (3, 1e-3)
    assert args.target_entropy == -3.0 and args.g_eval == 321.0


def test_one_step_defaults_and_explicit_flags_win():
    """The AG toy's defaults (any id, one-step episodes): n = 10, η = 0.3, K 1, 1500 updates, lr 1e-3, warm-up 100;
    explicit flags are never overwritten; the evaluation context defaults to K."""
    one_step = [make_episode([r], act_dim=1) for r in (0.5, -1.0, 0.25)]
    args = rf.apply_dataset_defaults(rf.Args(), FakeData(one_step, "toy-ag", "toy", act_dim=1))
    assert (args.ag_steps, args.ag_lr, args.context_len, args.pretrain_updates) == (10, 0.3, 1, 1500)
    assert (args.learning_rate, args.warmup_steps, args.eval_context_len) == (1e-3, 100, 1)
    assert args.rtg_scale == pytest.approx(1.0) and args.g_eval == 0.5
    args = rf.apply_dataset_defaults(rf.Args(ag_steps=0, ag_lr=0.7, rtg_scale=0.5, context_len=4, eval_context_len=9,
                                             target_entropy=1.0),
                                     FakeData([make_episode([1.0, 2.0])], "halfcheetah", "medium"))
    assert (args.ag_steps, args.ag_lr, args.rtg_scale, args.context_len, args.eval_context_len,
            args.target_entropy) == (0, 0.7, 0.5, 4, 9, 1.0)


# --- the run: seeds and optimiser settings --------------------------------------------------------------------------
def make_trainer(monkeypatch, tmp_path, episodes=None, **kw):
    monkeypatch.setattr(rf, "make_eval_envs", lambda args, data: (FakeEnvs, 50))
    args = rf.Args(**{**dict(embed_dim=16, n_layers=1, n_heads=2, batch_size=4, context_len=2, eval_context_len=2,
                             critic_hidden=8, critic_batch_size=4, learning_rate=3e-3, warmup_steps=10,
                             target_entropy=-2.0, rtg_scale=0.1, progress=False), **kw})
    data = FakeData(episodes or [make_episode([1.0, 0.5, 2.0]), make_episode([0.3, 0.2], start=4.0)])
    tmp_path.mkdir(parents=True, exist_ok=True)
    return rf.Trainer(args, data, CPU, tmp_path, None)


def test_trainer_seeds_and_optimiser_settings(monkeypatch, tmp_path):
    """The sampling stream is default_rng(--seed); log λ starts at log(--init-temperature) with Adam(--temperature-lr);
    the critic's Adam uses --critic-lr, LAMB --learning-rate with the warm-up."""
    trainer = make_trainer(monkeypatch, tmp_path, seed=5, init_temperature=0.3, temperature_lr=2e-3, critic_lr=7e-4)
    assert trainer.rng.random() == np.random.default_rng(5).random()
    assert trainer.log_temperature.item() == pytest.approx(math.log(0.3))
    assert trainer.temperature_optimizer.param_groups[0]["lr"] == 2e-3
    assert trainer.critic_optimizer.param_groups[0]["lr"] == 7e-4
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 / 10)  # warm-up step 1 of 10
    trainer.logger.close()


def test_trainer_logs_evaluates_and_checkpoints_on_schedule(monkeypatch, tmp_path):
    """AG Alg. 1 training loop: a metrics row after update 1, every --log-interval updates and after the last; an
    evaluation on rows at multiples of --eval-interval and at the last update; a checkpoint at the first row past each
    multiple of --checkpoint-interval and at the end. finish() reuses the last evaluation and saves model + critic."""
    evals, saves = [], []
    trainer = make_trainer(monkeypatch, tmp_path, seed=1, pretrain_updates=7, log_interval=2, eval_interval=4,
                           checkpoint_interval=3)
    monkeypatch.setattr(rf.Trainer, "evaluate", lambda self: evals.append(self.counters["updates"]) or {
        "eval_rf/return_mean": 1.0, "eval_rf/normalized_score_mean": 1.0, "eval/return_mean": 2.0,
        "eval/return_std": 0.0, "eval/normalized_score_mean": 2.0, "eval/normalized_score_std": 0.0})
    monkeypatch.setattr(rf.run, "save_checkpoint", lambda run_dir, state: saves.append(state["counters"]["updates"]))
    trainer.train(type("Stop", (), {"requested": False})())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 4, 6, 7]
    assert [r["global_step"] for r in rows if "eval/return_mean" in r] == [4, 7] and evals == [4, 7]
    assert saves == [4, 6, 7]
    summary = trainer.finish()
    assert evals == [4, 7] and summary["counters"]["updates"] == 7 and summary["eval/return_mean"] == 2.0
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert set(saved) == {"model", "critic"} and "q1_target.0.weight" in saved["critic"]


def test_resume_from_a_checkpoint_continues_exactly(monkeypatch, tmp_path):
    """Checkpoints hold model, LAMB, schedule, log λ and its Adam, the critic and its Adam, counters and every RNG
    (docs: exact resume): 3 + 2 updates in one process equal 3 updates, a checkpoint, and 2 after loading it."""
    import io

    monkeypatch.setattr(rf.Trainer, "evaluate", lambda self: {"eval_rf/return_mean": 0.0, "eval/return_mean": 0.0})
    monkeypatch.setattr(rf.run, "save_checkpoint", lambda run_dir, state: None)
    stop = type("Stop", (), {"requested": False})()
    a = make_trainer(monkeypatch, tmp_path / "a", seed=3, pretrain_updates=3, log_interval=100, critic_lr=1e-2,
                     temperature_lr=1e-1)
    a.train(stop)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    a.args.pretrain_updates = 5
    a.train(stop)
    buf.seek(0)
    b = make_trainer(monkeypatch, tmp_path / "b", seed=99, pretrain_updates=5, log_interval=100, critic_lr=1e-2,
                     temperature_lr=1e-1)
    b.load_state_dict(torch.load(buf, weights_only=False))
    b.train(stop)
    assert a.counters["updates"] == b.counters["updates"] == 5
    for net_a, net_b in ((a.model, b.model), (a.critic, b.critic)):
        for (name, pa), pb in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
            torch.testing.assert_close(pa, pb, msg=name)
    assert a.log_temperature.item() == pytest.approx(b.log_temperature.item(), rel=1e-6)
    a.logger.close()
    b.logger.close()


# --- the Reinformer network (arXiv 2405.08740 §4; the reference's blocks) -------------------------------------------
def test_trunk_embeds_s_r_a_with_the_timestep_on_every_token():
    """Tokens per step in the order (s_t, R_t, a_t), each its own linear embedding plus the learned timestep
    embedding, then one LayerNorm over the stacked tokens (checked with no blocks: the output is the embedding)."""
    torch.manual_seed(0)
    trunk = rf.Trunk(3, 2, 8, 0, 2, 0.0, 10).eval()
    rtg, states, actions = torch.randn(1, 2), torch.randn(1, 2, 3), torch.randn(1, 2, 2)
    timesteps = torch.tensor([[3, 7]])
    out = trunk(rtg, states, actions, timesteps)
    t_emb = trunk.embed_timestep(timesteps)
    for i, emb in enumerate((trunk.embed_state(states), trunk.embed_rtg(rtg[..., None]), trunk.embed_action(actions))):
        torch.testing.assert_close(out[:, :, i], trunk.embed_ln(emb + t_emb))


def test_block_is_post_layernorm_with_gelu_mlp():
    """The Reinformer reference's block: y = LN1(x + Attn(x)), out = LN2(y + MLP(y)), MLP = Linear-GELU-Linear."""
    torch.manual_seed(0)
    block = rf.Block(8, 2, 0.0).eval()
    x = torch.randn(1, 6, 8)
    y = block.ln1(x + block.attn(x, None))
    h = block.mlp[2](torch.nn.functional.gelu(block.mlp[0](y)))
    torch.testing.assert_close(block(x, None), block.ln2(y + h))


@pytest.mark.parametrize("separate", [False, True])
def test_heads_and_init(separate):
    """R̂ = Linear(h at s_t); μ = tanh(Linear(h at R_t)) (so |μ| < 1), σ state-independent (one log σ per action
    dim, initialised at 0); GPT-2 init (zero biases, N(0, 0.02)) inside every trunk's blocks, PyTorch's default init
    (non-zero biases) for the embeddings and heads."""
    torch.manual_seed(0)
    model = rf.Reinformer(3, 2, 16, 1, 2, 0.0, 10, separate).eval()
    with torch.no_grad():
        model.mu_head[0].bias.fill_(4.0)
    rtg, states, actions, steps = torch.randn(1, 3), torch.randn(1, 3, 3), torch.randn(1, 3, 2), torch.arange(3)[None]
    r_hat, mu = model(rtg, states, actions, steps)
    h = model.trunk(rtg, states, actions, steps)
    ha = h if model.action_trunk is None else model.action_trunk(rtg, states, actions, steps)
    torch.testing.assert_close(r_hat, model.rtg_head(h[:, :, 0]).squeeze(-1))
    torch.testing.assert_close(mu, torch.tanh(model.mu_head[0](ha[:, :, 1])))
    assert (mu.abs() < 1).all()
    assert model.log_std.shape == (2,) and (model.log_std == 0).all()
    for trunk in [model.trunk] + ([model.action_trunk] if separate else []):
        linears = [m for m in trunk.blocks.modules() if isinstance(m, torch.nn.Linear)]
        assert all((m.bias == 0).all() for m in linears)
        assert all(abs(m.weight.std().item() - 0.02) < 0.006 for m in linears)
        for emb in (trunk.embed_state, trunk.embed_rtg, trunk.embed_action):
            assert (emb.bias != 0).any()
    assert (model.rtg_head.bias != 0).any() and (model.mu_head[0].weight.std() > 0.05)


# --- flags: ranges, what each phase passes on ---------------------------------------------------------------------
def test_flag_ranges_allow_plain_rf_and_reject_negative_ag():
    """--ag-steps 0 is plain Reinformer (allowed), as are γ = 0 and ρ = 0; negative n or η, zero critic updates or
    batch sizes are refused before any work."""
    rf.run.validate_args(rf.Args(ag_steps=0, ag_lr=0.0, gamma=0.0, polyak=0.0, critic_updates=1), rf.VALID_MIN)
    for bad in (dict(ag_steps=-1), dict(ag_lr=-0.1), dict(critic_updates=0), dict(critic_batch_size=0),
                dict(critic_hidden=0)):
        with pytest.raises(rf.run.UserError):
            rf.run.validate_args(rf.Args(**bad), rf.VALID_MIN)
    data = FakeData([make_episode([1.0, 2.0])])
    for bad in (dict(ag_steps=-1), dict(ag_lr=-0.1)):
        with pytest.raises(rf.run.UserError, match="--ag-steps and --ag-lr"):
            rf.apply_dataset_defaults(rf.Args(**bad), data)


def test_trainer_builds_what_the_flags_say(monkeypatch, tmp_path):
    """The run's networks and data follow the flags: --separate-networks (AG §4.1) gives two trunks, the critic's
    width is --critic-hidden, LAMB's decay --weight-decay, and RTG tokens are suffix sums × --rtg-scale."""
    trainer = make_trainer(monkeypatch, tmp_path, seed=1, separate_networks=True, weight_decay=3e-3)
    assert trainer.model.action_trunk is not None
    assert trainer.critic.q1[0].out_features == 8 and trainer.critic.v[0].out_features == 8
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 3e-3
    np.testing.assert_allclose(trainer.offline.flat["rtg"].numpy(), [0.35, 0.25, 0.2, 0.05, 0.02], rtol=1e-5)
    seen = []
    monkeypatch.setattr(rf, "evaluate_both", lambda *a, ag_steps, ag_lr: seen.append((ag_steps, ag_lr)) or {})
    trainer.args.ag_steps, trainer.args.ag_lr = 4, 0.02
    trainer.evaluate()
    assert seen == [(4, 0.02)]  # the run's own n, η
    trainer.logger.close()


def test_model_pt_round_trip_restores_model_and_critic(tmp_path):
    """--eval-only loads both the transformer and the IQL critic (AG needs the trained Q) from model.pt."""
    torch.manual_seed(0)
    model, critic = tiny_model(1), rf.IQLCritic(3, 2, 8)
    with torch.no_grad():
        for p in critic.q1_target.parameters():
            p.add_(1.0)
    torch.save({"model": model.state_dict(), "critic": critic.state_dict()}, tmp_path / "model.pt")
    model2, critic2 = tiny_model(2), rf.IQLCritic(3, 2, 8)
    rf.run.load_states(tmp_path / "model.pt", {"model": model2, "critic": critic2}, CPU, "--eval-only")
    for a, b in ((model, model2), (critic, critic2)):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(pa, pb, msg=name)


def test_evaluate_both_reports_ag_statistics_per_env_step(monkeypatch):
    """eval/ag_changed_frac = (steps where AG's argmax left a⁰)/(env steps), eval/ag_q_gain and eval/ag_shift the
    mean Q'(â) − Q'(a⁰) and ‖â − a⁰‖ per env step: here Q' = a0, n = 2, η = 0.05, every step moves a0 by 0.1."""
    def one_step(envs, agent, seeds, normalized_score):
        obs = np.zeros((len(seeds), 3), np.float32)
        agent.reset(obs)
        agent.act(obs)
        return {"eval/return_mean": 0.0, "eval/length_mean": 1.0}

    monkeypatch.setattr(rf, "evaluate", one_step)
    critic = rf.IQLCritic(3, 2, 8)
    critic.q1_target = critic.q2_target = Fn(lambda x: x[..., 3])
    args = rf.Args(seed=1, eval_episodes=3, rtg_scale=0.01, eval_context_len=2)
    metrics = rf.evaluate_both(tiny_model(), critic, args, FakeData([]), FakeEnvs, CPU, 50, ag_steps=2, ag_lr=0.05)
    assert metrics["eval/ag_changed_frac"] == pytest.approx(1.0)
    assert metrics["eval/ag_q_gain"] == pytest.approx(0.1, rel=1e-4)
    assert metrics["eval/ag_shift"] == pytest.approx(0.1, rel=1e-4)
    assert "eval_rf/ag_changed_frac" not in metrics


def test_set_up_seeds_every_generator_and_fills_the_defaults(monkeypatch, tmp_path):
    """Seeds: python, numpy and torch are seeded with --seed before the run (dropout masks, initial weights); the
    per-dataset defaults are applied and recorded in config.json."""
    monkeypatch.chdir(tmp_path)
    data = FakeData([make_episode([1.0, 2.0])], "walker2d", "medium", obs_dim=3, act_dim=2, ref_max=100.0)
    data.source, data.env_id = "fake", "walker2d-medium-v2"
    monkeypatch.setattr(rf, "load_dataset", lambda *a, **k: data)
    args, _, _, run_dir, checkpoint = rf.set_up(rf.Args(env_id="walker2d-medium-v2", seed=11, cuda=False,
                                                        progress=False))
    assert checkpoint is None
    drawn = (torch.rand(1).item(), np.random.rand(), __import__("random").random())
    torch.manual_seed(11)
    np.random.seed(11)
    __import__("random").seed(11)
    assert drawn == (torch.rand(1).item(), np.random.rand(), __import__("random").random())
    config = json.loads((run_dir / "config.json").read_text())["args"]
    assert config["rtg_scale"] == 1e-3 and config["ag_steps"] == 3 and config["g_eval"] == 100.0
