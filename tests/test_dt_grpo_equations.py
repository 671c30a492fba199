"""What each GRPO equation and mechanism of dt_grpo.py MEANS, checked by hand computations on tiny inputs or by
behaviours with a margin (arXiv 2601.00167 as its abstract and public reviews describe it; docs/dt_grpo.md):
group-relative advantages, the sequence ratio, both sides of the PPO clip, the entropy bonus and its dual,
the k3 KL to the frozen reference policy, member rollouts (sampled then mean-action steps, where a member
ends, RTG tokens without relabeling), the reference windows, Q-GRPO's critic (TD target, Polyak, replay),
the per-dataset table and the round's plumbing (seeds, targets, gaps, minibatches, the reference anchor)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers import TimeLimit
from test_dt_grpo import batch_kw, loss_kw, roll_kw, update_kw  # the call sites' keyword sets, shared

import dt_grpo
from conftest import episode

S, A = 11, 3  # Hopper's observation and action sizes


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return dt_grpo.DecisionTransformer(S, A, 32, 1, 2, dropout, 1000, False)


def grpo_args(**kw):
    args = dict(env_id="hopper-random-v2", group_size=3, sub_len=3, cont_len=2, groups_per_round=1, clip_eps=0.2,
                eval_context_len=2, rtg_scale=1e-3, g_online=3600.0, entropy_coef=0.0, target_entropy=-3.0)
    args.update(kw)
    return dt_grpo.Args(**args)


def window_agent(model, n, args, mean=0.0, std=1.0):
    return dt_grpo.WindowAgent(model, n, args.eval_context_len, np.full(S, mean, np.float32),
                               np.full(S, std, np.float32), args.rtg_scale, 1000, torch.device("cpu"))


def random_windows(m, steps, k=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"rtg": torch.rand(m, steps, k, generator=g, dtype=dtype),
            "states": torch.randn(m, steps, k, S, generator=g, dtype=dtype),
            "actions": torch.rand(m, steps, k, A, generator=g, dtype=dtype) * 1.8 - 0.9,
            "timesteps": torch.zeros(m, steps, k, dtype=torch.long),
            "valid": torch.ones(m, steps, k, dtype=torch.bool)}


def ratio_batch(model, log_ratio, adv, mask):
    """A batch whose members' joint log-ratio log ρ_i = `log_ratio[i]`, all of it on the first step."""
    win = random_windows(len(adv), mask.shape[1])
    with torch.no_grad():
        logp = dt_grpo.step_log_probs(model, win)[0]
    first = torch.zeros_like(mask)
    first[:, 0] = 1.0
    old = (logp - first * torch.as_tensor(log_ratio, dtype=torch.float64)[:, None]) * mask
    return {"windows": win, "mask": mask, "old_log_prob": old, "advantages": torch.as_tensor(adv, dtype=torch.float64)}


def losses(model, batch, args, ref_model=None, log_t=math.log(0.1), idx=None):
    idx = torch.arange(len(batch["advantages"])) if idx is None else idx
    return dt_grpo.grpo_losses(model, ref_model, torch.tensor(log_t, dtype=torch.float64), batch, idx,
                               **loss_kw(args))


# --- group-relative advantages (GRPO; paper R: (R_i − mean)/(std + ε) within each group) ----------------------
def test_advantages_are_normalised_within_each_group_with_the_given_epsilon():
    """Advantage of member i of group g = (R_i − mean_g) / (std_g + ε), population std, ε = --adv-eps; members
    i·G … i·G + G − 1 form a group (the order rollout_groups writes them in); π_old = eval-mode log-probs."""
    model = tiny_model(dropout=0.3).double()  # left in train mode: π_old must still be taken without dropout
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[4, 1] = False
    groups = {"windows": random_windows(6, 2), "step_valid": mask, "scores": scores, "t0": np.zeros(6, np.int64),
              "rewards": np.zeros((6, 2), np.float32)}
    args = grpo_args(adv_eps=0.5)
    batch = dt_grpo.make_grpo_batch(model, groups, None, **batch_kw(args))
    std0, std1 = math.sqrt(2 / 3), math.sqrt(200.0)
    expected = [(-1) / (std0 + 0.5), 0.0, 1 / (std0 + 0.5), -10 / (std1 + 0.5), -10 / (std1 + 0.5), 20 / (std1 + 0.5)]
    np.testing.assert_allclose(batch["advantages"].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert batch["group_return_std"].item() == pytest.approx((std0 + std1) / 2, rel=1e-5)
    assert all(torch.equal(batch["windows"][k], groups["windows"][k]) for k in groups["windows"])  # no relabeling
    model.eval()
    with torch.no_grad():
        logp = dt_grpo.step_log_probs(model, groups["windows"])[0]
    torch.testing.assert_close(batch["old_log_prob"], logp * mask)
    torch.testing.assert_close(batch["mask"], mask.float())


def test_equal_scores_give_zero_advantage_and_no_gradient():
    """A group whose members all score the same carries no signal: zero advantage (ε keeps it finite)."""
    adv = dt_grpo.group_advantages(torch.tensor([[7.0, 7.0, 7.0], [0.0, 3.0, 6.0]]), eps=1e-6)
    assert torch.equal(adv[0], torch.zeros(3))
    np.testing.assert_allclose(adv[1].numpy(), [-1.2247, 0.0, 1.2247], atol=1e-4)


# --- the sequence ratio (paper §3.3: joint likelihood; GSPO's length-normalised form as the alternative) --------
def test_sequence_log_ratio_hand_computation():
    """log ρ_i = Σ_t mask·(log π_θ − log π_old) (joint) or that sum / the member's valid step count (geometric)."""
    logp = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(dt_grpo.sequence_log_ratio(logp, old, mask, "joint"), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(dt_grpo.sequence_log_ratio(logp, old, mask, "geometric"),
                               torch.tensor([1.5, 5.0 / 3.0]))


# --- PPO clip, both sides (ρ clipped to [1 − ε, 1 + ε], the min of clipped and unclipped) -----------------------
RHO = [0.5, 1.5, 0.5, 1.5, 0.9, 1.1]
ADV = [-1.0, 1.0, 1.0, -1.0, -2.0, 0.0]


@pytest.mark.parametrize("eps", [0.2, 0.3])
def test_ppo_clip_both_sides_loss_and_live_members(eps):
    """L = −mean_i min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i): A < 0 with ρ < 1 − ε takes the lower bound, A > 0 with
    ρ > 1 + ε the upper one; such members (and A = 0) get no gradient, all others do (train/live_fraction)."""
    model = tiny_model().double().eval()
    mask = torch.ones(6, 2, dtype=torch.float64)
    batch = ratio_batch(model, np.log(RHO), ADV, mask)
    args = grpo_args(clip_eps=eps)
    loss, _, stats = losses(model, batch, args)
    lo, hi = 1 - eps, 1 + eps
    terms = [lo * -1.0, hi * 1.0, 0.5, -1.5, -1.8, 0.0]  # by hand: lower clip, upper clip, then unclipped
    assert loss.item() == pytest.approx(-sum(terms) / 6, abs=1e-9)
    live = [False, False, True, True, True, False]
    assert stats["train/live_fraction"].item() == pytest.approx(np.mean(live))
    assert stats["train/clip_fraction"].item() == pytest.approx(4 / 6)
    assert stats["train/effective_update"].item() == 1.0
    for i, expect in enumerate(live):
        model.zero_grad()
        loss_i, _, stats_i = losses(model, batch, args, idx=torch.tensor([i]))
        loss_i.backward()
        norm = sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None)
        assert (norm > 1e-8) == expect, (i, norm)
        assert stats_i["train/live_fraction"].item() == float(expect)


def test_ppo_clip_a_member_just_inside_the_range_is_unclipped():
    """ρ = 1 ± 0.9ε lies inside [1 − ε, 1 + ε]: the surrogate is ρ·A on both sides, with a gradient."""
    model = tiny_model().double().eval()
    eps = 0.25
    rho = [1 - 0.9 * eps, 1 + 0.9 * eps, 1 - 0.9 * eps, 1 + 0.9 * eps]
    adv = [1.0, 1.0, -1.0, -1.0]
    batch = ratio_batch(model, np.log(rho), adv, torch.ones(4, 2, dtype=torch.float64))
    loss, _, stats = losses(model, batch, grpo_args(clip_eps=eps))
    assert loss.item() == pytest.approx(-np.mean(np.array(rho) * adv), abs=1e-9)
    assert stats["train/live_fraction"].item() == 1.0 and stats["train/clip_fraction"].item() == 0.0


def test_log_ratio_guard_clamps_both_sides():
    """log ρ is clamped to [−max_log_ratio, max_log_ratio] before exp (both sides; a non-default bound)."""
    model = tiny_model().double().eval()
    batch = ratio_batch(model, [-1.0, 1.0, 0.2], [1.0, 1.0, 1.0], torch.ones(3, 2, dtype=torch.float64))
    _, _, stats = losses(model, batch, grpo_args(max_log_ratio=0.5, clip_eps=10.0))
    expect = np.exp([-0.5, 0.5, 0.2])
    assert stats["train/ratio_mean"].item() == pytest.approx(expect.mean(), rel=1e-9)
    assert stats["train/ratio_max"].item() == pytest.approx(math.exp(0.5), rel=1e-9)


def test_approx_kl_is_k3_of_the_joint_ratio_over_valid_steps():
    """train/approx_kl = mean_i (ρ_i − 1 − log ρ_i) with the JOINT log-ratio over the valid steps only."""
    model = tiny_model().double().eval()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    win = random_windows(2, 3)
    with torch.no_grad():
        logp = dt_grpo.step_log_probs(model, win)[0]
    shift = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.1, 5.0]], dtype=torch.float64)  # 5.0 sits on a padded step
    batch = {"windows": win, "mask": mask, "old_log_prob": (logp - shift) * mask,
             "advantages": torch.ones(2, dtype=torch.float64)}
    _, _, stats = losses(model, batch, grpo_args(ratio="geometric", clip_eps=0.05))
    joint = np.array([0.6, 0.3])
    assert stats["train/approx_kl"].item() == pytest.approx(np.mean(np.exp(joint) - 1 - joint), rel=1e-9)
    assert stats["train/ratio_mean"].item() == pytest.approx(np.mean(np.exp(joint / [3, 2])), rel=1e-9)


# --- entropy bonus and its dual (ODT's λ continued, or a fixed --entropy-coef) ---------------------------------
def entropy_batch(model):
    win = random_windows(3, 3, seed=1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        logp = dt_grpo.step_log_probs(model, win)[0]
    return {"windows": win, "mask": mask, "old_log_prob": logp * mask,
            "advantages": torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)}


def test_entropy_bonus_sign_mask_and_coefficient():
    """loss = L_clip − c·H with H = −Σ_valid log π(ã)/n_valid (one sample ã per step, as in pretraining);
    c = --entropy-coef, or λ = exp(log λ) when it is None; padded steps do not enter H."""
    model = tiny_model().double().eval()
    batch = entropy_batch(model)
    mask = batch["mask"]
    torch.manual_seed(5)
    loss, t_loss, stats = losses(model, batch, grpo_args(entropy_coef=0.3))
    torch.manual_seed(5)
    with torch.no_grad():
        _, mu, log_std = dt_grpo.step_log_probs(model, batch["windows"])
        sample_logp = dt_grpo.tanh_normal_rsample(mu, log_std)[1].view_as(mask)
    entropy = -(sample_logp * mask).sum() / mask.sum()
    assert stats["train/entropy"].item() == pytest.approx(entropy.item(), rel=1e-9)
    assert loss.item() == pytest.approx(stats["train/policy_loss"].item() - 0.3 * entropy.item(), rel=1e-9)
    assert stats["train/policy_loss"].item() == pytest.approx(0.0 - np.mean([1.0, -1.0, 0.5]), abs=1e-9)  # ρ = 1
    # padded steps: their windows can be anything
    batch["windows"]["states"][1, 1:] = 50.0
    batch["windows"]["states"][2, 2] = -50.0
    torch.manual_seed(5)
    _, _, stats2 = losses(model, batch, grpo_args(entropy_coef=0.3))
    assert stats2["train/entropy"].item() == pytest.approx(entropy.item(), rel=1e-9)
    # learned temperature: c = λ, and the dual loss λ·(H − β) (raises λ when H < β)
    torch.manual_seed(5)
    loss, t_loss, stats = losses(model, batch, grpo_args(entropy_coef=None, target_entropy=2.0), log_t=math.log(0.7))
    assert loss.item() == pytest.approx(stats["train/policy_loss"].item() - 0.7 * entropy.item(), rel=1e-9)
    assert t_loss.item() == pytest.approx(0.7 * (entropy.item() - 2.0), rel=1e-9)


# --- KL to the frozen pretrained policy (k3 estimator, --kl-coef > 0 only) ------------------------------------
def test_kl_to_reference_is_k3_masked_and_penalised():
    """kl_ref = Σ_valid (e^d − d − 1)/n_valid with d = log π_ref(a) − log π_θ(a) (k3 of KL(π_θ ‖ π_ref)), added
    to the loss as +kl_coef·kl_ref; --kl-coef 0 leaves it out."""
    model, ref = tiny_model(0).double().eval(), tiny_model(1).double().eval()
    batch = entropy_batch(model)
    mask = batch["mask"]
    with torch.no_grad():
        d = dt_grpo.step_log_probs(ref, batch["windows"])[0] - dt_grpo.step_log_probs(model, batch["windows"])[0]
    kl = (((d.exp() - d - 1) * mask).sum() / mask.sum()).item()
    reverse = (((-d).exp() + d - 1) * mask).sum() / mask.sum()
    assert abs(kl - reverse.item()) > 0.05 * kl  # the two directions differ materially here
    loss0, _, stats0 = losses(model, batch, grpo_args(kl_coef=0.0), ref_model=None)  # no reference needed
    assert stats0["train/kl_ref"].item() == 0.0
    loss1, _, stats1 = losses(model, batch, grpo_args(kl_coef=0.5), ref_model=ref)
    assert stats1["train/kl_ref"].item() == pytest.approx(kl, rel=1e-9)
    assert loss1.item() - loss0.item() == pytest.approx(0.5 * kl, rel=1e-7)


def test_kl_term_pulls_the_policy_towards_the_reference():
    """With zero advantages and no entropy bonus, GRPO updates with --kl-coef > 0 lower KL to π_ref."""
    model, ref = tiny_model(0).double(), tiny_model(0).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.03 * torch.randn_like(p))
    batch = entropy_batch(model)
    batch["advantages"] = torch.zeros(3, dtype=torch.float64)
    args = grpo_args(kl_coef=1.0, grad_clip=100.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    log_t = torch.tensor(math.log(0.1), dtype=torch.float64, requires_grad=True)
    kls = [dt_grpo.grpo_update(model, ref, opt, log_t, None, batch, torch.arange(3), **update_kw(args))[
        "train/kl_ref"].item() for _ in range(4)]
    assert kls[-1] < 0.95 * kls[0] and kls[1] < kls[0], kls


# --- the update step: dropout off, gradient clip, λ's dual update only without --entropy-coef ---------------------
def fresh_batch(model, args, m=4):
    groups = {"windows": random_windows(m, 2, dtype=torch.float32), "step_valid": torch.ones(m, 2, dtype=torch.bool),
              "scores": torch.arange(m, dtype=torch.float32) ** 2, "t0": np.zeros(m, np.int64),
              "rewards": np.zeros((m, 2), np.float32)}
    return dt_grpo.make_grpo_batch(model, groups, None, **batch_kw(args))


def test_fresh_data_ratio_is_exactly_one_with_dropout_in_the_model():
    """π_old and π_θ are one conditional: with dropout modules in the model (p = 0.5) the first update of a
    round still sees ρ ≡ 1 (dropout is off for π_old and, by default, for the GRPO update)."""
    model = tiny_model(dropout=0.5)
    model.train()
    args = grpo_args(group_size=2)
    batch = fresh_batch(model, args)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    stats = dt_grpo.grpo_update(model, None, opt, log_t, None, batch, torch.arange(4), **update_kw(args))
    assert stats["train/ratio_mean"].item() == 1.0 and stats["train/ratio_max"].item() == 1.0
    # --online-dropout keeps it on in the update: π_θ then differs from π_old on the same data
    torch.manual_seed(0)
    args.online_dropout = True
    stats = dt_grpo.grpo_update(model, None, opt, log_t, None, batch, torch.arange(4), **update_kw(args))
    assert abs(stats["train/ratio_max"].item() - 1.0) > 1e-3


def test_grpo_update_clips_the_gradient_norm():
    """One SGD step (lr 1) moves the parameters by the clipped gradient: ‖Δθ‖ ≤ --grad-clip."""
    model = tiny_model()
    args = grpo_args(group_size=2, grad_clip=1e-3, entropy_coef=0.05)
    batch = fresh_batch(model, args)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    dt_grpo.grpo_update(model, None, opt, log_t, None, batch, torch.arange(4), **update_kw(args))
    step = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    assert 1e-4 < step <= 1e-3 * 1.001, step


def test_temperature_dual_update_only_without_fixed_entropy_coef():
    """--entropy-coef None: ODT's dual step on log λ (λ grows when H < β); a fixed coefficient leaves λ alone."""
    model = tiny_model()
    for coef, moves in ((None, True), (0.1, False)):
        args = grpo_args(group_size=2, entropy_coef=coef, target_entropy=50.0)  # H < β: λ must grow
        batch = fresh_batch(model, args)
        log_t = torch.tensor(math.log(0.1), requires_grad=True)
        before = log_t.item()
        t_opt = torch.optim.Adam([log_t], lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dt_grpo.grpo_update(model, None, opt, log_t, t_opt, batch, torch.arange(4), **update_kw(args))
        if moves:
            assert log_t.item() == pytest.approx(before + 0.1, abs=1e-3)
        else:
            assert log_t.item() == before


# --- member rollouts: L sampled + L_eval mean-action steps, where a member ends, RTG tokens ------------------------
class ToyEnv(gym.Env):
    """Deterministic: obs = (t, …, t)/10, reward r_t = t + 1 whatever the action, terminates after `term_at`
    steps (None: never). Remembers the seeds it was reset with."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (S,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (A,), np.float32)

    def __init__(self, term_at=None):
        self.term_at, self.seeds, self.t = term_at, [], 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seeds.append(seed)
        self.t = 0
        return np.full(S, 0.0, np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.term_at is not None and self.t >= self.term_at
        return np.full(S, self.t / 10, np.float32), float(self.t), terminated, False, {}


def toy(term_at=None, limit=100):
    return TimeLimit(ToyEnv(term_at), max_episode_steps=limit)


def test_reference_episode_tokens_variance_and_termination_flag():
    """The reference episode: RTG_{t+1} = RTG_t − r_t·scale; σ² = Σ_dims exp(2·log σ) of the policy at the
    reference window (what branch points are drawn ∝); mean actions tanh(μ); `terminated` is False at a time
    limit (Q-GRPO bootstraps there) and True at a real termination."""
    model = tiny_model().eval()
    args = grpo_args(eval_context_len=3)
    ref = dt_grpo.reference_rollout(toy(limit=6), window_agent(model, 1, args), 7, 3.6, sample=False)
    assert len(ref["rewards"]) == 6 and ref["terminated"] is False and len(ref["sim"]) == 0
    np.testing.assert_allclose(ref["rtg"], 3.6 - 1e-3 * np.r_[0, np.cumsum(np.arange(1, 6))], rtol=1e-6)
    assert ref["last_rtg"] == pytest.approx(3.6 - 1e-3 * 21, rel=1e-6)
    np.testing.assert_allclose(ref["last_obs"], np.full(S, 0.6), rtol=1e-6)
    win = dt_grpo.reference_windows(window_agent(model, 1, args), ref, np.arange(6))
    with torch.no_grad():
        mu, log_std = model.action_dist(model(*(win[k] for k in dt_grpo.WINDOW_KEYS))[:, -1])
    np.testing.assert_allclose(ref["var"], (2 * log_std).exp().sum(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(ref["actions"], torch.tanh(mu).numpy(), rtol=1e-5, atol=1e-6)
    ended = dt_grpo.reference_rollout(toy(term_at=4, limit=6), window_agent(model, 1, args), 7, 3.6, sample=False)
    assert len(ended["rewards"]) == 4 and ended["terminated"] is True


def test_reference_windows_hand_computation():
    """The window at step t: steps t−K+1 … t, left-padded (valid False, tokens 0), states normalised
    (s − mean)/std, a_t's slot zero, timesteps absolute; step T uses s_T and RTG_T."""
    model = tiny_model()
    args = grpo_args(eval_context_len=3)
    agent = window_agent(model, 1, args, mean=1.0, std=2.0)
    ref = {"obs": np.arange(4, dtype=np.float32)[:, None].repeat(S, 1) * 2 + 1,  # normalised: 0, 1, 2, 3
           "actions": np.arange(1, 5, dtype=np.float32)[:, None].repeat(A, 1) / 10,
           "rtg": np.array([4.0, 3.0, 2.0, 1.0], np.float32), "last_obs": np.full(S, 9.0, np.float32),
           "last_rtg": np.float32(0.5)}
    win = dt_grpo.reference_windows(agent, ref, np.array([0, 2, 4]))
    assert win["valid"].tolist() == [[False, False, True], [True, True, True], [True, True, True]]
    np.testing.assert_allclose(win["rtg"].numpy(), [[0, 0, 4], [4, 3, 2], [2, 1, 0.5]])
    np.testing.assert_allclose(win["states"][..., 0].numpy(), [[0, 0, 0], [0, 1, 2], [2, 3, 4]])
    np.testing.assert_allclose(win["actions"][..., 0].numpy(), [[0, 0, 0], [0.1, 0.2, 0], [0.3, 0.4, 0]], atol=1e-7)
    assert win["timesteps"].tolist() == [[0, 0, 0], [0, 1, 2], [2, 3, 4]]


def record_sampling(monkeypatch):
    calls = []
    real = dt_grpo.WindowAgent.act

    def act(self, sample):
        calls.append(bool(sample))
        return real(self, sample)

    monkeypatch.setattr(dt_grpo.WindowAgent, "act", act)
    return calls


def test_members_sample_then_follow_the_mean_and_end_where_their_episode_ends(monkeypatch):
    """A member: L sampled steps (the ratio covers these), then up to L_eval mean-action steps; its score is the
    return of both parts; it ends at a termination AND at a time limit (no steps after either); padded steps are
    masked; every env step is counted; RTG tokens follow RTG_{t+1} = RTG_t − r_t·scale (no relabeling); every
    member is reset with the reference episode's seed."""
    model = tiny_model().eval()
    args = grpo_args(group_size=3, sub_len=3, cont_len=2, eval_context_len=2)
    ref = dt_grpo.reference_rollout(toy(limit=8), window_agent(model, 1, args), 7, 3.6, sample=True)
    envs = [toy(term_at=2), toy(limit=4), toy()]  # terminates in the sampled part / truncated in the continuation
    calls = record_sampling(monkeypatch)
    groups = dt_grpo.rollout_groups(envs, window_agent(model, 3, args), ref, np.array([0]), 7, **roll_kw(args))
    assert calls == [True, True, True, False, False]
    np.testing.assert_allclose(groups["rewards"], [[1, 2, 0, 0, 0], [1, 2, 3, 4, 0], [1, 2, 3, 4, 5]])
    np.testing.assert_allclose(groups["scores"].numpy(), [3, 10, 15])
    assert groups["step_valid"].tolist() == [[True, True, False], [True, True, True], [True, True, True]]
    assert groups["env_steps"] == 2 + 4 + 5
    assert [e.unwrapped.t for e in envs] == [2, 4, 5]
    assert all(e.unwrapped.seeds[-1] == 7 for e in envs)
    rtg = groups["windows"]["rtg"][:, :, -1].numpy()
    np.testing.assert_allclose(rtg[2], [3.6, 3.6 - 1e-3, 3.6 - 3e-3], rtol=1e-6)
    np.testing.assert_allclose(rtg[0, :2], [3.6, 3.6 - 1e-3], rtol=1e-6)
    assert groups["windows"]["timesteps"][:, :, -1].tolist() == [[0, 1, 2]] * 3
    # the window of each sampled step holds the action taken there in its last slot
    assert not torch.equal(groups["windows"]["actions"][1, 0, -1], groups["windows"]["actions"][2, 0, -1])


def test_relabel_members_run_on_but_the_score_keeps_its_length(monkeypatch):
    """--relabel: the continuation runs to the episode's end (ODT relabels with the full achieved return), still
    with mean actions; the score stays the return of the first L + L_eval steps."""
    model = tiny_model().eval()
    args = grpo_args(group_size=2, sub_len=2, cont_len=1, relabel=True)
    ref = dt_grpo.reference_rollout(toy(limit=8), window_agent(model, 1, args), 3, 3.6, sample=True)
    envs = [toy(limit=6), toy(term_at=9)]
    calls = record_sampling(monkeypatch)
    groups = dt_grpo.rollout_groups(envs, window_agent(model, 2, args), ref, np.array([0]), 3, **roll_kw(args))
    assert calls == [True, True] + [False] * 7
    np.testing.assert_allclose(groups["scores"].numpy(), [6, 6])
    np.testing.assert_allclose(groups["rewards"].sum(1), [21, 45])
    assert groups["env_steps"] == 6 + 9


# --- branch points ----------------------------------------------------------------------------------------------
def test_branch_points_gap_holds_on_both_sides():
    """Branch points are ≥ gap apart on BOTH sides of a pick ('top': highest variance first)."""
    var = np.array([0.0, 0.0, 0.8, 0.0, 1.0, 0.0, 0.9, 0.0, 0.0, 0.5, 0.0, 0.0, 0.4])
    rng = np.random.default_rng(0)
    assert dt_grpo.branch_points(var, 3, "top", rng, gap=3).tolist() == [4, 9, 12]
    assert dt_grpo.branch_points(var, 3, "top", rng, gap=1).tolist() == [4, 6, 2]
    picks = np.array([dt_grpo.branch_points(var, 2, "variance", rng, gap=3) for _ in range(200)])
    assert (np.abs(picks[:, 0] - picks[:, 1]) >= 3).all()
    assert not np.isin(picks, [0, 1, 3, 5, 7, 8, 10, 11]).any()  # zero-variance steps are (almost) never drawn


# --- Q-GRPO: critic replay, TD target, Polyak ---------------------------------------------------------------------
def hand_ref(rewards, terminated, start=0.0):
    n = len(rewards)
    return {"obs": (start + np.arange(n, dtype=np.float32))[:, None].repeat(S, 1),
            "actions": np.full((n, A), 0.5, np.float32), "rtg": np.linspace(1, 0, n).astype(np.float32),
            "rewards": np.asarray(rewards, np.float32), "last_obs": np.full(S, start + n, np.float32),
            "last_rtg": np.float32(0.0), "terminated": terminated}


def test_critic_replay_done_flags_and_fifo_eviction():
    """Transitions of an episode: done only on the last step of a TERMINATED episode (a time limit bootstraps);
    FIFO: the oldest transitions are overwritten, size ≤ capacity, samples only from filled slots."""
    agent = window_agent(tiny_model(), 1, grpo_args(eval_context_len=2), mean=1.0, std=2.0)
    replay = dt_grpo.CriticReplay(5)
    replay.add_episode(agent, hand_ref([1, 2, 3], terminated=True))
    assert replay.size == 3 and replay.ptr == 3
    assert replay.data["dones"][:3].tolist() == [0, 0, 1]
    rng = np.random.default_rng(0)
    assert set(replay.sample(64, rng)["rewards"].tolist()) == {1.0, 2.0, 3.0}
    replay.add_episode(agent, hand_ref([10, 20, 30, 40], terminated=False, start=100))
    assert replay.size == 5 and replay.ptr == 2
    assert replay.data["rewards"].tolist() == [30, 40, 3, 10, 20]
    assert replay.data["dones"].tolist() == [0, 0, 1, 0, 0]
    norm = lambda x: [(v - 1) / 2 for v in x]  # noqa: E731  (the critic sees normalised states, as the DT does)
    assert replay.data["states"][:, 0].tolist() == norm([102, 103, 2, 100, 101])
    assert replay.data["next_states"][:, -1, 0].tolist() == norm([103, 104, 3, 101, 102])  # s_{t+1}; s_T at the end
    replay.add_episode(agent, hand_ref([7], terminated=True, start=200))  # evicts the oldest: slot 2
    assert replay.data["rewards"].tolist() == [30, 40, 7, 10, 20] and replay.ptr == 3 and replay.size == 5


def constant_critic(values):
    critic = dt_grpo.Critic(S, A, 16, False)
    with torch.no_grad():
        for net, v in zip((critic.q1, critic.q2), values, strict=True):
            net[-1].weight.zero_()
            net[-1].bias.fill_(v)
    return critic


def test_critic_td_target_uses_the_target_twins_min_and_polyak_follows():
    """y = r + γ(1 − d)·min(Q1', Q2')(s', ã') from the TARGET critic; loss = MSE(Q1, y) + MSE(Q2, y); then
    θ' ← τθ + (1 − τ)θ' (non-default γ 0.5, τ 0.25)."""
    model = tiny_model()
    critic, target = constant_critic((1.0, 2.0)), constant_critic((3.0, 5.0))
    old_target = [p.detach().clone() for p in target.parameters()]
    win = {k: v[:, 0] for k, v in random_windows(2, 1, dtype=torch.float32).items()}
    batch = {"states": torch.randn(2, S), "actions": torch.zeros(2, A), "rewards": torch.tensor([1.0, 2.0]),
             "dones": torch.tensor([0.0, 1.0]), **{f"next_{k}": v for k, v in win.items()}}
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    args = grpo_args(gamma=0.5, tau=0.25)
    loss = dt_grpo.critic_update(critic, target, opt, model, batch, gamma=args.gamma, tau=args.tau)
    # y = [1 + 0.5·3, 2]: ((1 − 2.5)² + (1 − 2)²)/2 + ((2 − 2.5)² + (2 − 2)²)/2
    assert loss.item() == pytest.approx(1.75, abs=1e-5)
    for t_new, t_old, p in zip(target.parameters(), old_target, critic.parameters(), strict=True):
        torch.testing.assert_close(t_new, 0.75 * t_old + 0.25 * p.detach())
    assert any(not torch.equal(a, b) for a, b in zip(target.parameters(), old_target, strict=True))


def test_polyak_update_direction():
    """θ' ← τθ + (1 − τ)θ': the target moves a fraction τ towards the online net, which is untouched."""
    source, target = nn_const(1.0), nn_const(0.0)
    dt_grpo.polyak_update(target, source, 0.1)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in target.parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for p in source.parameters())


def action_reader(dims):
    """A critic whose twins return the given action dimensions: Q_k(s, a) = a[dims[k]] (a ∈ [−1, 1])."""
    critic = dt_grpo.Critic(S, A, 16, False)
    with torch.no_grad():
        for net, d in zip((critic.q1, critic.q2), dims, strict=True):
            for layer in (net[0], net[3], net[-1]):
                layer.weight.zero_()
                layer.bias.zero_()
            net[0].weight[0, S + d], net[0].bias[0] = 1.0, 2.0  # a_d + 2 > 0 passes both ReLUs
            net[3].weight[0, 0] = 1.0
            net[-1].weight[0, 0], net[-1].bias[0] = 1.0, -2.0
    return critic


def test_critic_target_action_is_the_mean_action_plus_clipped_noise():
    """TD3 target policy smoothing with the DT as target policy: ã' = clip(tanh(μ(window')) + clip(N(0, 0.2²),
    −0.5, 0.5), −1, 1), y = r + γ(1 − d)·min(Q1'(s', ã'), Q2'(s', ã')) (same noise draw, 512 transitions)."""
    model = tiny_model(seed=2).eval()
    n = 512
    win = {k: v[:, 0] for k, v in random_windows(n, 1, dtype=torch.float32).items()}
    g = torch.Generator().manual_seed(1)
    batch = {"states": torch.randn(n, S, generator=g), "actions": torch.zeros(n, A),
             "rewards": torch.rand(n, generator=g), "dones": (torch.rand(n, generator=g) < 0.3).float(),
             **{f"next_{k}": v for k, v in win.items()}}
    critic, target = constant_critic((0.3, -0.2)), action_reader((0, 1))
    args = grpo_args(gamma=0.9)
    torch.manual_seed(3)
    loss = dt_grpo.critic_update(critic, target, torch.optim.SGD(critic.parameters(), lr=0.0), model, batch,
                                 gamma=args.gamma, tau=args.tau)
    torch.manual_seed(3)
    with torch.no_grad():
        mu = model.action_dist(model(*(win[k] for k in dt_grpo.WINDOW_KEYS))[:, -1])[0]
        noise = 0.2 * torch.randn_like(mu)
        assert (noise < -0.5).sum() >= 2 and (noise > 0.5).sum() >= 2  # both sides of the noise clip are hit
        a = (torch.tanh(mu) + noise.clamp(-0.5, 0.5)).clamp(-1, 1)
        y = batch["rewards"] + 0.9 * (1 - batch["dones"]) * torch.min(a[:, 0], a[:, 1])
    expected = ((0.3 - y) ** 2).mean() + ((-0.2 - y) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_step_log_probs_score_the_last_slots_action_under_its_own_window():
    """log π(a_t | window_t): the policy head at the LAST slot of each (member, step) window, evaluated at the
    action stored in that slot (tanh-Gaussian, summed over action dims)."""
    model = tiny_model().double().eval()
    win = random_windows(2, 3, k=3)
    logp = dt_grpo.step_log_probs(model, win)[0]
    for i in range(2):
        for j in range(3):
            one = [win[k][i, j][None] for k in dt_grpo.WINDOW_KEYS]
            with torch.no_grad():
                mu, log_std = model.action_dist(model(*one)[:, -1])
                x = torch.atanh(one[2][0, -1])
                var = (2 * log_std[0]).exp()
                gauss = (-(x - mu[0]) ** 2 / (2 * var) - log_std[0] - 0.5 * math.log(2 * math.pi)).sum()
                expect = gauss - torch.log(1 - torch.tanh(x) ** 2).sum()
            assert logp[i, j].item() == pytest.approx(expect.item(), rel=1e-6, abs=1e-6)


def nn_const(value):
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def test_critic_groups_are_scored_by_the_twin_minimum():
    """Q-GRPO: G actions sampled from π_old at the branch state, each scored min(Q1, Q2)(s_t0, a_i)."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    args = grpo_args(eval_context_len=2)
    agent = window_agent(model, 1, args)
    critic = dt_grpo.Critic(S, A, 16, False)
    ref = hand_ref([1, 2, 3, 4], terminated=True)
    groups = dt_grpo.critic_groups(model, critic, agent, ref, np.array([2, 0]), g=4)
    acts = groups["windows"]["actions"][:, 0, -1]
    with torch.no_grad():
        q1, q2 = critic(groups["windows"]["states"][:, 0, -1], acts)
    torch.testing.assert_close(groups["scores"], torch.min(q1, q2))
    assert (q1 != q2).all()
    assert groups["t0"].tolist() == [2] * 4 + [0] * 4
    assert len({tuple(a.tolist()) for a in acts[:4]}) == 4  # sampled, not the mean action


# --- per-dataset table (ODT Table C.4 pretraining rows; GRPO's own rows) ----------------------------------------
def fake_data(family, kind, act_dim=3, ref_max=None, one_step=False):
    eps = ([episode([r], act_dim=act_dim) for r in (0.2, 0.9, -1.5)] if one_step
           else [episode([1.0] * 20, act_dim=act_dim)])
    return SimpleNamespace(family=family, dataset_kind=kind, act_dim=act_dim, ref_max_score=ref_max, episodes=eps)


@pytest.mark.parametrize("family,kind,expect", [
    ("hopper", "medium", dict(pretrain_updates=5000, learning_rate=1e-4, weight_decay=5e-4, g_eval=3600,
                              eval_context_len=5, embed_dim=512, buffer_size=1000, rtg_scale=1e-3)),
    ("hopper", "medium-replay", dict(learning_rate=2e-3, weight_decay=1e-4, g_eval=3600)),
    ("walker2d", "medium", dict(pretrain_updates=10000, learning_rate=1e-3, weight_decay=1e-3, g_eval=5000)),
    ("halfcheetah", "medium-replay", dict(pretrain_updates=5000, learning_rate=1e-4, weight_decay=5e-4,
                                          g_eval=6000)),
    ("ant", "medium", dict(pretrain_updates=10000, learning_rate=1.5e-3, weight_decay=1e-4, eval_context_len=1,
                           g_eval=6000)),
    ("ant", "medium-replay", dict(learning_rate=1e-4, weight_decay=5e-4, eval_context_len=1, g_eval=6000)),
    ("antmaze", "umaze", dict(pretrain_updates=7000, buffer_size=1500, learning_rate=1e-3, weight_decay=0.0,
                              rtg_scale=1.0, g_eval=1, use_timestep_embedding=True, embed_dim=512, sub_len=20)),
    ("antmaze", "umaze-diverse", dict(embed_dim=1024, g_eval=1, sub_len=20)),
])
def test_per_dataset_defaults(family, kind, expect):
    """ODT Table C.4 for pretraining, g_online = g_eval (no relabeling: the rollout conditional is the one
    improved), β = −dim(A), and GRPO's rows (L_traj 20 on AntMaze, else G 8, L 10, L_eval 400, 4 groups)."""
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id=f"{family}-{kind}-v2"), fake_data(family, kind, 8))
    for key, value in expect.items():
        assert getattr(args, key) == (pytest.approx(value) if isinstance(value, float) else value), key
    assert args.g_online == args.g_eval
    assert args.target_entropy == -8.0
    assert (args.group_size, args.cont_len, args.groups_per_round, args.grpo_epochs, args.grpo_minibatch) == \
        (8, 400, 4, 4, 8)
    if family != "antmaze":
        assert args.sub_len == 10 and args.use_timestep_embedding is False


def test_defaults_for_unknown_and_one_step_datasets_and_explicit_flags():
    """An unknown family conditions on its expert (reference max) return; a one-step dataset scales RTGs so
    |R| ≤ 1 and targets its best return, with one-step GRPO settings; explicit flags always win."""
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="pen-human-v1"), fake_data("pen", "human", ref_max=3.1e3))
    assert args.g_eval == args.g_online == 3100 and args.rtg_scale == 1e-3
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="bandit-v0"), fake_data("x", "", 1, one_step=True))
    assert args.g_eval == args.g_online == pytest.approx(0.9) and args.rtg_scale == pytest.approx(1 / 1.5)
    assert (args.group_size, args.sub_len, args.cont_len, args.online_learning_rate) == (16, 1, 0, 1e-3)
    assert (args.context_len, args.eval_context_len, args.pretrain_updates) == (1, 1, 1000)
    args = dt_grpo.apply_dataset_defaults(
        dt_grpo.Args(env_id="walker2d-medium-v2", g_eval=4000.0, g_online=4500.0, group_size=5, learning_rate=3e-4,
                     ratio="geometric", target_entropy=-1.0), fake_data("walker2d", "medium"))
    assert (args.g_eval, args.g_online, args.group_size, args.learning_rate) == (4000.0, 4500.0, 5, 3e-4)
    assert args.clip_eps == 0.05 and args.target_entropy == -1.0 and args.pretrain_updates == 10000


def test_explicit_g_eval_is_also_the_rollout_target():
    """No relabeling: GRPO improves the conditional it rolls out, so g_online follows g_eval (docs/dt_grpo.md
    step 1), also when --g-eval is passed explicitly and --g-online is not."""
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="walker2d-medium-v2", g_eval=4000.0),
                                          fake_data("walker2d", "medium"))
    assert args.g_online == args.g_eval == 4000.0


# --- the round (train() and the Trainer's steps): seeds, targets, gaps, minibatches, the anchor, Q-GRPO -------------
def make_trainer(tmp_path, use_critic=False, **kw):
    """A Trainer past pretraining (0 updates, evaluated): train() goes straight to the GRPO rounds."""
    data = SimpleNamespace(
        family="hopper", dataset_kind="random", act_dim=A, obs_dim=S, ref_max_score=None, source="fake",
        episodes=[episode([1.0] * 20, obs_dim=S, act_dim=A)], state_mean=np.zeros(S, np.float32),
        state_std=np.ones(S, np.float32), make_env=lambda render_mode=None: gym.make("Hopper-v5"),
        normalized_score=lambda r: np.zeros_like(np.asarray(r, np.float64)))
    fields = dict(env_id="hopper-random-v2", embed_dim=16, n_layers=1, n_heads=1, eval_context_len=2, group_size=3,
                  sub_len=2, cont_len=3, groups_per_round=2, eval_episodes=1, eval_interval=10**9, progress=False,
                  save_model=False, cuda=False, precision="fp32", online_learning_rate=3e-5, batch_size=8,
                  online_steps=10**6, pretrain_updates=0)
    fields.update(kw)
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(**fields), data)
    torch.manual_seed(0)
    trainer = dt_grpo.Trainer(args, data, torch.device("cpu"), tmp_path, use_critic=use_critic, checkpoint=None)
    trainer.counters["pretrain_evaluated"] = True
    return trainer


class StopWhen:
    """A stop flag raised once `condition()` holds: train() stops at its next safe point, as after Ctrl-C."""

    def __init__(self, condition):
        self.condition = condition

    @property
    def requested(self) -> bool:
        return self.condition()


def spy(monkeypatch, name):
    calls, real = [], getattr(dt_grpo, name)

    def wrapper(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    monkeypatch.setattr(dt_grpo, name, wrapper)
    return calls


def groups_rolled(trainer):
    return StopWhen(lambda: "todo" in trainer.round_state and not trainer.round_state["todo"])


def test_round_seed_target_gap_and_member_seeds(tmp_path, monkeypatch):
    """Round r's reference episode is reset with online_episode_seed(seed, r) (a fresh one per round), rolled
    with the mean action at g_online·scale; branch points ≥ --branch-gap apart (default L_traj); every group is
    restored with that episode's seed; all env steps are counted."""
    refs, points, rolls = (spy(monkeypatch, n) for n in ("reference_rollout", "branch_points", "rollout_groups"))
    trainer = make_trainer(tmp_path, seed=4, branch_gap=7)
    trainer.counters["rounds"] = 2
    dt_grpo.train(trainer, groups_rolled(trainer))  # steps (1)-(3) of round 2, then a stop
    rnd = trainer.round_state
    (seed, target), kw = refs[-1][0][2:4], refs[-1][1]
    assert seed == dt_grpo.online_episode_seed(4, 2) != dt_grpo.online_episode_seed(4, 1)
    assert seed not in dt_grpo.eval_seeds(4, 10)
    assert target == pytest.approx(3.6) and kw["sample"] is False
    assert points[-1][1]["gap"] == 7
    assert [c[1]["seed"] for c in rolls] == [seed, seed]
    assert [int(c[0][3][0]) for c in rolls] == rnd["t0s"].tolist()
    assert trainer.counters["env_steps"] == len(rnd["ref"]["rewards"]) + sum(p["env_steps"] for p in rnd["parts"])
    assert points[-1][0][1:3] == (2, "variance")  # --groups-per-round points, drawn ∝ σ² by default
    assert "perms" not in rnd and trainer.counters["updates"] == 0  # the stop came before step (4)
    rnd.clear()
    trainer.args.branch_gap, trainer.args.reference_sample, trainer.args.branch_sampling = None, True, "top"
    dt_grpo.train(trainer, groups_rolled(trainer))
    assert points[-1][1]["gap"] == trainer.args.sub_len == 2
    assert points[-1][0][2] == "top" and refs[-1][1]["sample"] is True  # the flags reach the round
    assert refs[-1][0][2] == dt_grpo.online_episode_seed(4, 2)


@pytest.mark.parametrize("minibatch,epochs,sizes", [(4, 3, [4, 2] * 3), (0, 2, [6, 6])])
def test_plan_updates_epochs_and_minibatches(tmp_path, minibatch, epochs, sizes):
    """Every epoch is one permutation of the round's members in minibatches of --grpo-minibatch (0: all);
    the online optimiser is Adam at --online-learning-rate; each planned minibatch is one update; the round is
    counted once its updates are done."""
    trainer = make_trainer(tmp_path, grpo_minibatch=minibatch, grpo_epochs=epochs, online_steps=10**6)
    assert trainer.online_optimizer.param_groups[0]["lr"] == 3e-5
    dt_grpo.train(trainer, StopWhen(lambda: "perms" in trainer.round_state))  # stops right after step (4)
    perms = list(trainer.round_state["perms"])
    assert [len(p) for p in perms] == sizes and trainer.counters["updates"] == 0
    per_epoch = len(sizes) // epochs
    for e in range(epochs):
        assert sorted(torch.cat(perms[e * per_epoch:(e + 1) * per_epoch]).tolist()) == list(range(6))
    assert trainer.round_state["batch"]["advantages"].shape == (6,)
    assert trainer.counters["rounds"] == 0
    dt_grpo.train(trainer, StopWhen(lambda: trainer.counters["rounds"] == 1))  # the round goes on where it was
    assert trainer.counters["updates"] == len(sizes) and trainer.round_state == {}


def test_round_passes_each_flag_to_the_step_that_reads_it(tmp_path, monkeypatch):
    """The round's calls take the flags by name: rollout_groups (G, L_traj, L_eval, --relabel), make_grpo_batch
    (G, --adv-eps, --relabel, the RTG scale), grpo_update (every coefficient of the loss, --grad-clip,
    --online-dropout) and, in Q-GRPO, critic_update (γ, τ); non-default values, so no two flags coincide."""
    rolls, batches, updates = (spy(monkeypatch, n) for n in ("rollout_groups", "make_grpo_batch", "grpo_update"))
    flags = dict(ratio="geometric", clip_eps=0.3, max_log_ratio=7.0, entropy_coef=0.01, kl_coef=0.5, grad_clip=0.7,
                 online_dropout=True, adv_eps=0.25, relabel=True, target_entropy=-2.5, group_size=3, sub_len=2,
                 cont_len=3, rtg_scale=2e-3, groups_per_round=1, grpo_minibatch=0, grpo_epochs=1)
    trainer = make_trainer(tmp_path, **flags)
    dt_grpo.train(trainer, StopWhen(lambda: trainer.counters["rounds"] == 1))
    assert {k: v for k, v in rolls[-1][1].items() if k != "seed"} == dict(group_size=3, sub_len=2, cont_len=3,
                                                                          relabel=True)
    assert batches[-1][1] == dict(group_size=3, adv_eps=0.25, relabel=True, rtg_scale=2e-3)
    assert updates[-1][1] == dict(ratio="geometric", clip_eps=0.3, max_log_ratio=7.0, entropy_coef=0.01, kl_coef=0.5,
                                  target_entropy=-2.5, grad_clip=0.7, dropout=True)
    critic_updates = spy(monkeypatch, "critic_update")
    (tmp_path / "q").mkdir()
    trainer = make_trainer(tmp_path / "q", use_critic=True, gamma=0.8, tau=0.1)
    dt_grpo.train(trainer, StopWhen(lambda: "todo" in trainer.round_state))
    assert critic_updates and all(c[1] == dict(gamma=0.8, tau=0.1) for c in critic_updates)


def test_reference_policy_is_a_frozen_copy_of_the_pretrained_model(tmp_path):
    """The KL anchor π_ref is the policy as pretraining left it: a separate frozen copy that GRPO updates do
    not move, and grpo_step measures KL against it (not against π_θ)."""
    trainer = make_trainer(tmp_path, online_steps=0, kl_coef=1.0)
    dt_grpo.train(trainer, StopWhen(lambda: False))
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), trainer.model.parameters(), strict=True))
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer.args.online_steps = 10**6
    dt_grpo.train(trainer, StopWhen(lambda: "perms" in trainer.round_state))
    stats = trainer.grpo_step(trainer.round_state["perms"][0])
    assert stats["train/kl_ref"].item() > 1e-3
    assert not all(torch.equal(a, b) for a, b in zip(ref.parameters(), trainer.model.parameters(), strict=True))


def test_qgrpo_round_critic_updates_warmup_and_sampled_reference(tmp_path, monkeypatch):
    """Q-GRPO: the reference episode is rolled with SAMPLED actions, all its transitions enter the critic's
    replay, max(1, round(T·--critic-updates-per-step)) critic updates follow; groups only once --critic-warmup
    env steps have passed (or the whole budget is shorter than the warm-up); no member is rolled out."""
    refs, updates = spy(monkeypatch, "reference_rollout"), spy(monkeypatch, "critic_update")
    trainer = make_trainer(tmp_path, use_critic=True, critic_updates_per_step=0.5, critic_warmup=10**6)
    dt_grpo.train(trainer, StopWhen(lambda: "todo" in trainer.round_state))  # steps (1)-(2) and the critic
    n = len(trainer.round_state["ref"]["rewards"])
    assert refs[-1][1]["sample"] is True
    assert trainer.critic_replay.size == n and len(updates) == max(1, round(n * 0.5))
    assert trainer.round_state["parts"] == [] and trainer.round_state["todo"] == []
    (tmp_path / "short").mkdir()  # a budget shorter than the warm-up: the policy is still updated
    trainer = make_trainer(tmp_path / "short", use_critic=True, critic_warmup=10**6, online_steps=1)
    dt_grpo.train(trainer, StopWhen(lambda: "todo" in trainer.round_state))
    (part,) = trainer.round_state["parts"]
    assert len(part["t0"]) == 2 * 3 and part["env_steps"] == 0
    with torch.no_grad():  # scored by the ONLINE critic's twin minimum (the target copy lags behind)
        states, actions = part["windows"]["states"][:, 0, -1], part["windows"]["actions"][:, 0, -1]
        online = torch.min(*trainer.critic(states, actions))
        lagging = torch.min(*trainer.critic_target(states, actions))
    torch.testing.assert_close(part["scores"], online)
    assert (part["scores"] - lagging).abs().max() > 1e-4


def test_evaluations_follow_env_steps_and_windows_use_the_eval_context(tmp_path):
    """--eval-interval counts online ENV steps (an evaluation as soon as a boundary is crossed, within one group);
    online rollouts act with the evaluation context length (Table C.4), not the training one."""
    trainer = make_trainer(tmp_path, eval_interval=50, context_len=5, eval_context_len=2)
    evaluations = []
    trainer.evaluate = lambda: evaluations.append(trainer.counters["env_steps"]) or {"eval/return_mean": 0.0}
    for n in (30, 15, 10, 40, 8):
        trainer.count_steps(n, since=0.0)
    assert evaluations == [55, 103]
    assert trainer.window_agent(3).k == 2 and trainer.window_agent(3).win["states"].shape == (3, 2, S)


def test_group_size_one_and_relabel_with_a_critic_are_refused(monkeypatch, tmp_path):
    """Advantages are normalised within a group, so G ≥ 2; Q-GRPO members have no achieved returns to relabel;
    both refused before a run folder is made."""
    data = SimpleNamespace(family="hopper", dataset_kind="random", act_dim=A, obs_dim=S, ref_max_score=None,
                           source="fake", episodes=[episode([1.0] * 20, act_dim=A)],
                           make_env=lambda: gym.make("Hopper-v5"))
    monkeypatch.setattr(dt_grpo, "load_dataset", lambda *a, **k: data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(dt_grpo.run.UserError, match="--group-size must be ≥ 2"):
        dt_grpo.set_up(dt_grpo.Args(env_id="hopper-random-v2", group_size=1, cuda=False))
    with pytest.raises(dt_grpo.run.UserError, match="--relabel"):
        dt_grpo.set_up(dt_grpo.Args(env_id="hopper-random-v2", advantage="critic", relabel=True, cuda=False))
    assert not (tmp_path / "runs").exists()
    assert dt_grpo.set_up(dt_grpo.Args(env_id="hopper-random-v2", group_size=2, cuda=False))[5] is False


def test_checkpoint_keeps_the_pretrained_anchor(tmp_path):
    """The checkpoint holds the frozen pretrained policy (the KL anchor), not a copy of the finetuned one: a
    resumed run anchors to the same π_ref."""
    (tmp_path / "a").mkdir()
    trainer = make_trainer(tmp_path / "a", online_steps=0)
    dt_grpo.train(trainer, StopWhen(lambda: False))
    anchor = [p.detach().clone() for p in trainer.ref_model.parameters()]
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.1)
    state = trainer.state_dict()
    (tmp_path / "b").mkdir()
    resumed = make_trainer(tmp_path / "b", online_steps=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(anchor, resumed.ref_model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True))
