"""Unit tests for the GRPO parts of dt_grpo.py (the pretraining code is odt.py's, tested there) and
end-to-end runs of its CLI, including the toy where pure RL gradients find the hidden peak."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import dt_grpo
from conftest import (
    TINY_HOPPER,
    TINY_MODEL,
    assert_clear_error,
    episode,
    only_run_dir,
    read_metrics,
    run_and_interrupt,
    run_and_read,
    run_script,
)


def tiny_model(state_dim=11, act_dim=3, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return dt_grpo.DecisionTransformer(state_dim, act_dim, 32, 1, 2, dropout, 1000, False)


def grpo_args(**kw):
    args = dict(env_id="hopper-random-v2", group_size=4, sub_len=5, cont_len=6, groups_per_round=2, clip_eps=0.2,
                eval_context_len=3, rtg_scale=1e-3, g_online=3600.0, entropy_coef=0.0, target_entropy=-3.0)
    args.update(kw)
    return dt_grpo.Args(**args)


class FakeData:
    def __init__(self, family, kind, act_dim=3, ref_max=None, one_step=False):
        self.family, self.dataset_kind, self.act_dim, self.ref_max_score = family, kind, act_dim, ref_max
        self.episodes = ([episode([r], act_dim=act_dim) for r in (0.2, 0.9, 0.5)] if one_step
                         else [episode([1.0] * 20, act_dim=act_dim)])


def loss_kw(args):
    """grpo_losses' coefficients, read from the flags as Trainer.grpo_step reads them."""
    return dict(ratio=args.ratio, clip_eps=args.clip_eps, max_log_ratio=args.max_log_ratio,
                entropy_coef=args.entropy_coef, kl_coef=args.kl_coef, target_entropy=args.target_entropy)


def update_kw(args):
    return dict(loss_kw(args), grad_clip=args.grad_clip, dropout=args.online_dropout)


def batch_kw(args):
    return dict(group_size=args.group_size, adv_eps=args.adv_eps, relabel=args.relabel, rtg_scale=args.rtg_scale)


def roll_kw(args):
    return dict(group_size=args.group_size, sub_len=args.sub_len, cont_len=args.cont_len, relabel=args.relabel)


def window_agent(model, n, args):
    return dt_grpo.WindowAgent(model, n, args.eval_context_len, np.zeros(11, np.float32), np.ones(11, np.float32),
                               args.rtg_scale, 1000, torch.device("cpu"))


def collect(model, args, seed=3):
    """One reference episode of Hopper-v5 and its groups, as one round of main() does it."""
    ref_env = gym.make("Hopper-v5")
    envs = [gym.make("Hopper-v5") for _ in range(args.groups_per_round * args.group_size)]
    ref = dt_grpo.reference_rollout(ref_env, window_agent(model, 1, args), seed, args.g_online * args.rtg_scale,
                                    sample=True)
    t0s = dt_grpo.branch_points(ref["var"], args.groups_per_round, "variance", np.random.default_rng(0))
    groups = dt_grpo.rollout_groups(envs, window_agent(model, len(envs), args), ref, t0s, seed, **roll_kw(args))
    return ref, t0s, groups


# --- group advantages ---------------------------------------------------------------------------------
def test_group_advantages_match_hand_computation():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    adv = dt_grpo.group_advantages(scores, eps=1e-6)
    # group 1: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    expected = (torch.tensor([1.0, 2.0, 3.0, 6.0]) - 3.0) / (math.sqrt(3.5) + 1e-6)
    torch.testing.assert_close(adv[0], expected)
    torch.testing.assert_close(adv[1], torch.zeros(4))  # equal scores: no signal, no NaN


# --- sequence-level ratio and clipping ----------------------------------------------------------------
def fake_batch(model, m=4, steps=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    win = {"rtg": torch.rand(m, steps, k, generator=g), "states": torch.randn(m, steps, k, 11, generator=g),
           "actions": torch.rand(m, steps, k, 3, generator=g) * 1.8 - 0.9,
           "timesteps": torch.zeros(m, steps, k, dtype=torch.long), "valid": torch.ones(m, steps, k, dtype=torch.bool)}
    mask = torch.ones(m, steps)
    if m > 1:
        mask[1, 2] = 0.0  # member 1 terminated after 2 steps
    return win, mask


def hand_batch(model, log_ratio_on_last_step, adv):
    """Members whose whole log-ratio sits on their last valid step: the joint, the length-normalised and a
    per-step (token-level) ratio all differ, so a test on one of them catches a swap to another."""
    win, mask = fake_batch(model)
    win = {k: v.double() if v.is_floating_point() else v for k, v in win.items()}
    with torch.no_grad():
        logp = dt_grpo.step_log_probs(model, win)[0]
    last = torch.zeros_like(mask)
    last[torch.arange(len(mask)), mask.long().sum(1) - 1] = 1.0
    old = (logp - last * log_ratio_on_last_step[:, None]) * mask
    return {"windows": win, "mask": mask.double(), "old_log_prob": old, "advantages": adv.double()}


@pytest.mark.parametrize("mode", ["joint", "geometric"])
def test_sequence_ratio_and_clipping_match_hand_computation(mode):
    model = tiny_model().double().eval()  # float64: log-likelihoods of ~1e3 leave float32 ~1e-4 ratio error
    target = torch.tensor([0.5, 1.0, 1.5, 1.1], dtype=torch.float64)  # joint ratio of each member
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batch = hand_batch(model, target.log(), adv)
    n_steps = torch.tensor([3.0, 2.0, 3.0, 3.0], dtype=torch.float64)  # member 1 terminated after 2 steps
    rho = target if mode == "joint" else target ** (1 / n_steps)  # exp(Σ_t) or exp(mean_t) of the log-ratio
    eps = 0.2 if mode == "joint" else 0.05
    args = grpo_args(clip_eps=eps, ratio=mode)
    loss, _, stats = dt_grpo.grpo_losses(model, None, torch.tensor(math.log(0.1)), batch, torch.arange(4),
                                         **loss_kw(args))
    surrogate = torch.min(rho * batch["advantages"], rho.clamp(1 - eps, 1 + eps) * batch["advantages"])
    assert loss.item() == pytest.approx(-surrogate.mean().item(), abs=1e-9)
    if mode == "joint":  # 0.5, −1.0, 1.2 (clipped), −1.1 (A < 0 and ρ > 1: unclipped)
        assert loss.item() == pytest.approx(-(0.5 - 1.0 + 1.2 - 1.1) / 4, abs=1e-9)
    assert stats["train/ratio_mean"].item() == pytest.approx(rho.mean().item(), abs=1e-9)
    assert stats["train/ratio_max"].item() == pytest.approx(rho.max().item(), abs=1e-9)
    assert stats["train/clip_fraction"].item() == pytest.approx(((rho - 1).abs() > eps).double().mean().item())
    assert stats["train/approx_kl"].item() == pytest.approx((target - 1 - target.log()).mean().item(), abs=1e-9)
    # the masked step (member 1, step 2) does not enter the ratio
    batch["windows"]["actions"][1, 2, -1] = 0.0
    loss2, _, _ = dt_grpo.grpo_losses(model, None, torch.tensor(math.log(0.1)), batch, torch.arange(4), **loss_kw(args))
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-9)


def test_clipped_member_gets_no_gradient():
    model = tiny_model().double().eval()
    args = grpo_args(clip_eps=0.2, ratio="joint")
    for ratio, expect_grad in ((1.5, False), (1.1, True)):  # A > 0: ρ above 1 + ε is clipped
        batch = hand_batch(model, torch.full((4,), math.log(ratio)), torch.ones(4))
        model.zero_grad()
        loss, _, stats = dt_grpo.grpo_losses(model, None, torch.tensor(0.0), batch, torch.arange(1), **loss_kw(args))
        loss.backward()
        norm = sum(p.grad.norm() for p in model.parameters() if p.grad is not None)
        assert (norm > 0) == expect_grad
        assert stats["train/effective_update"].item() == float(expect_grad)


def run_round(model, args, batch, n_members):
    """The round's updates exactly as main() takes them; returns each update's stats."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.online_learning_rate)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    t_opt = torch.optim.Adam([log_t], lr=1e-4)
    rng, rows = np.random.default_rng(0), []
    for _ in range(args.grpo_epochs):
        for idx in torch.as_tensor(rng.permutation(n_members)).split(args.grpo_minibatch or n_members):
            rows.append(dt_grpo.grpo_update(model, None, optimizer, log_t, t_opt, batch, idx, **update_kw(args)))
    return rows


def test_gradient_survives_the_rounds_updates_at_the_defaults():
    """At the default ratio, ε, learning rate, epochs and minibatch, every update of a round carries a policy
    gradient and a fair share of the members stay inside the clip range after the first pass (0.66 clipped
    here). The former learning rate (Adam 5e-5) clips 98 % of the members from the second pass on."""
    data = FakeData("hopper", "random")
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="hopper-random-v2"), data)
    args.cont_len, args.eval_context_len, args.entropy_coef = 10, 3, 0.0  # the continuation does not enter ρ
    model = tiny_model(dropout=0.0)
    ref, _, groups = collect(model, args, seed=4)
    batch = dt_grpo.make_grpo_batch(model, groups, ref, **batch_kw(args))
    rows = run_round(model, args, batch, len(groups["t0"]))
    per_epoch = len(rows) // args.grpo_epochs
    assert len(rows) == 16 and per_epoch == 4
    clipped = [r["train/clip_fraction"].item() for r in rows[per_epoch:]]  # after the first pass
    assert all(r["train/effective_update"].item() == 1.0 for r in rows), clipped
    assert np.mean(clipped) <= 0.8, clipped


@pytest.fixture(scope="module")
def return_conditioned_model():
    """The tiny DT pretrained with the script's own update() on data where the action follows the return
    (a = return/1000 − 1 in every dim, episodes of Hopper shape), so its policy depends on the RTG token as a
    pretrained DT's does. Dropout stays in the module (eval mode must switch it off for π_old and π_θ)."""
    model = tiny_model(dropout=0.1)
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(100):
        ret = rng.uniform(100, 1900)
        n = 20
        episodes.append(dt_grpo.Episode(observations=rng.standard_normal((n, 11)).astype(np.float32),
                                        actions=np.full((n, 3), ret / 1000 - 1, np.float32).clip(-0.95, 0.95),
                                        rewards=np.full(n, ret / n, np.float32), terminals=np.eye(n, dtype=bool)[-1],
                                        truncations=np.zeros(n, bool),
                                        next_observations=np.zeros((n, 11), np.float32)))
    replay = dt_grpo.OfflineWindows(episodes, np.zeros(11, np.float32), np.ones(11, np.float32), 1e-3, 1000,
                                    torch.device("cpu"))
    args = grpo_args(context_len=3, weight_decay=0.0, target_entropy=-3.0)
    optimizer = dt_grpo.Lamb(dt_grpo.lamb_param_groups(model, 0.0), lr=1e-3)
    scheduler = dt_grpo.warmup_schedule(optimizer, 10)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    t_opt = torch.optim.Adam([log_t], lr=1e-4)
    for _ in range(150):
        dt_grpo.update(model, optimizer, scheduler, log_t, t_opt, replay.sample(32, 3, rng), args)
    return model


# --- the paper's thesis: relabeling breaks the importance ratio -------------------------------------------
@pytest.mark.parametrize("relabel", [False, True])
def test_fresh_data_ratio_is_one_only_without_relabeling(relabel, return_conditioned_model):
    """Fresh data, no update yet: without relabeling ρ ≡ 1 exactly. With ODT's relabeling π_θ(a | s, R_achieved)
    is compared with π_old(a | s, R_intended), and the ratio is *materially* off-policy: at least a quarter of
    the members start outside the clip range [1 − ε, 1 + ε] (the threshold: a member outside it on fresh data
    has its gradient clipped or its update unbounded before the policy has moved at all)."""
    model = return_conditioned_model
    args = grpo_args(relabel=relabel, clip_eps=0.05)
    ref, _, groups = collect(model, args)
    batch = dt_grpo.make_grpo_batch(model, groups, ref, **batch_kw(args))
    model.train(args.online_dropout)
    with torch.no_grad():
        _, _, stats = dt_grpo.grpo_losses(model, None, torch.tensor(math.log(0.1)), batch,
                                          torch.arange(len(batch["advantages"])), **loss_kw(args))
    if relabel:
        assert stats["train/clip_fraction"].item() >= 0.25, stats
        assert not torch.equal(batch["windows"]["rtg"], groups["windows"]["rtg"])
    else:  # on-policy, same windows, no dropout: exactly 1
        assert stats["train/ratio_mean"].item() == 1.0 and stats["train/ratio_max"].item() == 1.0
        assert stats["train/clip_fraction"].item() == 0.0


def test_relabeling_uses_the_full_achieved_return_to_go():
    """--relabel rolls each member on to the end of its episode (ODT relabels with the full achieved return,
    not the L + L_eval steps that are scored); the score still covers only L + L_eval steps."""
    model = tiny_model()
    for relabel in (False, True):
        args = grpo_args(relabel=relabel, cont_len=1, sub_len=2, group_size=3, groups_per_round=1)
        envs = [gym.make("Hopper-v5") for _ in range(3)]
        ref = dt_grpo.reference_rollout(gym.make("Hopper-v5"), window_agent(model, 1, args), 3, 3.6, sample=True)
        groups = dt_grpo.rollout_groups(envs, window_agent(model, 3, args), ref, np.array([0]), 3, **roll_kw(args))
        ended = [not e.unwrapped.is_healthy or e._elapsed_steps >= 1000 for e in envs]
        assert all(ended) == relabel, ended
        np.testing.assert_allclose(groups["scores"].numpy(), groups["rewards"][:, :3].sum(1), rtol=1e-6)
        if relabel:
            batch = dt_grpo.make_grpo_batch(model, groups, ref, **batch_kw(args))
            np.testing.assert_allclose(batch["windows"]["rtg"][:, 0, -1].numpy(),
                                       groups["rewards"].sum(1) * args.rtg_scale, rtol=1e-5)


def test_relabeled_rtg_hand_computation():
    ref = {"rewards": np.array([1.0, 2.0, 3.0], np.float32)}
    # one member branched at t0 = 2 with rewards 10, 20 (L = 1 sampled step + 1 continuation step)
    groups = {"t0": np.array([2]), "rewards": np.array([[10.0, 20.0]], np.float32),
              "step_valid": torch.ones(1, 1, dtype=torch.bool),
              "windows": {"valid": torch.tensor([[[False, True, True]]])}}
    rtg = dt_grpo.relabeled_rtg(groups, ref, k=3, rtg_scale=0.5)
    # window at t0 covers steps 0..2 (step 0 is padding here by construction): achieved suffixes 32, 30
    np.testing.assert_allclose(rtg.numpy(), [[[0.0, 0.5 * 32.0, 0.5 * 30.0]]])


# --- state restore ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [5, 6])  # seed 5: set_state(qpos, qvel) alone differs at 1e-6 there
def test_restore_reproduces_the_next_observation(seed):
    env = gym.make("Hopper-v5")
    env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(7):
        env.step(env.action_space.sample())
    state = dt_grpo.sim_state(env)
    a = np.array([0.3, -0.7, 0.5], np.float32)
    obs1, r1, *_ = env.step(a)
    for _ in range(5):
        env.step(env.action_space.sample())
    dt_grpo.restore(env, seed, state, 7)
    assert env._elapsed_steps == 7  # the TimeLimit counter follows the branch step
    obs2, r2, *_ = env.step(a)
    np.testing.assert_array_equal(obs1, obs2)
    assert r1 == r2


def test_branches_start_exactly_where_the_reference_was():
    model = tiny_model()
    args = grpo_args(group_size=2, groups_per_round=1)
    agent = window_agent(model, 1, args)
    env = gym.make("Hopper-v5")
    ref = dt_grpo.reference_rollout(env, agent, 11, 3.6, sample=True)
    for t in (0, len(ref["rewards"]) // 2, len(ref["rewards"]) - 1):
        dt_grpo.restore(env, 11, ref["sim"][t], t)
        np.testing.assert_allclose(env.unwrapped._get_obs(), ref["obs"][t], rtol=0, atol=1e-6)
        obs, reward, *_ = env.step(ref["actions"][t])
        assert reward == pytest.approx(ref["rewards"][t], abs=1e-5)
        if t + 1 < len(ref["obs"]):
            np.testing.assert_allclose(obs, ref["obs"][t + 1], rtol=0, atol=1e-6)


def test_groups_share_context_and_count_steps():
    model = tiny_model()
    args = grpo_args()
    ref, t0s, groups = collect(model, args)
    win = groups["windows"]
    n = args.groups_per_round * args.group_size
    assert win["states"].shape == (n, args.sub_len, args.eval_context_len, 11)
    for g, t0 in enumerate(t0s):  # first window of every member = the reference's window at t0
        members = slice(g * args.group_size, (g + 1) * args.group_size)
        first = win["states"][members, 0]
        assert torch.equal(first, first[:1].expand_as(first))
        torch.testing.assert_close(first[0, -1], torch.as_tensor(ref["obs"][t0]))
        assert torch.allclose(win["rtg"][members, 0, -1], torch.tensor(float(ref["rtg"][t0])))
    # sampled actions differ inside a group
    assert not torch.equal(win["actions"][0, 0, -1], win["actions"][1, 0, -1])
    # every member step was a real env step: sampled + continuation, ≤ L + L_eval each
    assert groups["env_steps"] >= int(groups["step_valid"].sum())
    assert groups["env_steps"] <= n * (args.sub_len + args.cont_len)


# --- active sampling ----------------------------------------------------------------------------------------
def test_branch_points_follow_the_variance_and_keep_their_distance():
    var = np.array([0.1, 0.9, 0.3, 0.9, 0.05, 0.7, 0.2, 0.8], np.float32)
    rng = np.random.default_rng(0)
    assert dt_grpo.branch_points(var, 3, "top", rng).tolist() == [1, 3, 7]  # ties: earliest first
    assert dt_grpo.branch_points(var, 3, "top", rng, gap=3).tolist() == [1, 7, 4]  # ≥ 3 apart, then leftovers
    assert dt_grpo.branch_points(np.array([0.2]), 4, "variance", rng).tolist() == [0, 0, 0, 0]  # one-step
    # "variance": drawn ∝ σ² without replacement, at least `gap` apart
    var = np.r_[np.full(50, 1.0), np.full(50, 9.0)]
    picks = np.array([dt_grpo.branch_points(var, 4, "variance", rng, gap=10) for _ in range(300)])
    assert all(np.diff(np.sort(p)).min() >= 10 for p in picks)
    assert 0.6 < (picks >= 50).mean() < 0.95  # 9:1 density, but the gap spreads some picks to the low half
    uniform = np.array([dt_grpo.branch_points(var, 4, "uniform", rng, gap=10) for _ in range(300)])
    assert 0.4 < (uniform >= 50).mean() < 0.6


# --- Q-GRPO: advantages from a twin-Q critic when the env cannot restore a state ------------------------------
class NoRestore(gym.Wrapper):
    """A MuJoCo env whose set_state is out of reach (as for an env that cannot be reset to a state)."""

    @property
    def unwrapped(self):
        return self


def test_qgrpo_on_mujoco_without_set_state():
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0)
    args = grpo_args(group_size=6, groups_per_round=3, sub_len=1, batch_size=64, grpo_minibatch=6, grpo_epochs=2,
                     online_learning_rate=2e-4)
    env = NoRestore(gym.make("Hopper-v5"))
    assert not hasattr(env.unwrapped, "set_state")
    agent = window_agent(model, 1, args)
    ref = dt_grpo.reference_rollout(env, agent, 3, 3.6, sample=True)
    assert len(ref["sim"]) == 0 and ref["terminated"] == (len(ref["rewards"]) < 1000)
    replay = dt_grpo.CriticReplay(1000)
    replay.add_episode(agent, ref)
    assert replay.size == len(ref["rewards"])
    # the stored next window is the policy's window one step later: s_{t+1}, RTG_{t+1}, a_t in the slot before
    nxt = replay.data["next_states"][0]
    torch.testing.assert_close(nxt[-1], torch.as_tensor(ref["obs"][1]))
    torch.testing.assert_close(replay.data["next_actions"][0, -2], torch.as_tensor(ref["actions"][0]))
    assert replay.data["next_rtg"][0, -1].item() == pytest.approx(float(ref["rtg"][1]), abs=1e-6)
    critic = dt_grpo.Critic(11, 3, 256, False)
    target = __import__("copy").deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    losses = [dt_grpo.critic_update(critic, target, opt, model, replay.sample(64, rng), gamma=args.gamma,
                                    tau=args.tau).item()
              for _ in range(150)]
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10]), losses[::15]
    t0s = dt_grpo.branch_points(ref["var"], args.groups_per_round, "variance", rng, 1)
    groups = dt_grpo.critic_groups(model, critic, agent, ref, t0s, args.group_size)
    with torch.no_grad():  # scores are min(Q1, Q2) of (s_t0, a_i): G different actions at one state
        q = torch.min(*critic(groups["windows"]["states"][:, 0, -1], groups["windows"]["actions"][:, 0, -1]))
    torch.testing.assert_close(groups["scores"], q)
    first = groups["windows"]["states"][:args.group_size, 0]
    assert torch.equal(first, first[:1].expand_as(first))
    assert groups["scores"][:args.group_size].std() > 0
    batch = dt_grpo.make_grpo_batch(model, groups, ref, **batch_kw(args))
    rows = run_round(model, args, batch, len(groups["t0"]))
    assert all(r["train/effective_update"].item() == 1.0 for r in rows)
    with torch.no_grad():  # the policy moved towards the critic's preferred actions
        logp = dt_grpo.step_log_probs(model, batch["windows"])[0][:, 0]
    gain = ((logp - batch["old_log_prob"][:, 0]) * batch["advantages"]).mean()
    assert gain > 0, gain


class SetupData(FakeData):
    def __init__(self, restorable, one_step=False):
        super().__init__("hopper" if not one_step else "other", "random" if not one_step else "", one_step=one_step)
        self.restorable, self.source, self.obs_dim = restorable, "fake", 11
        self.state_mean, self.state_std = np.zeros(11, np.float32), np.ones(11, np.float32)

    def make_env(self, render_mode=None):
        env = gym.make("Hopper-v5")
        return env if self.restorable else NoRestore(env)


@pytest.mark.parametrize("restorable,one_step,advantage,expect", [
    (True, False, "auto", "group"), (False, False, "auto", "critic"), (True, False, "critic", "critic"),
    (False, True, "auto", "group"),  # a single start state: branching is a reset, whatever the id
    (False, False, "group", "error"),
])
def test_advantage_source_follows_the_env(monkeypatch, tmp_path, restorable, one_step, advantage, expect):
    monkeypatch.setattr(dt_grpo, "load_dataset", lambda *a, **k: SetupData(restorable, one_step))
    monkeypatch.chdir(tmp_path)
    args = dt_grpo.Args(env_id="anything-v0", advantage=advantage, g_eval=1.0, cuda=False)
    if expect == "error":
        with pytest.raises(dt_grpo.run.UserError, match="--advantage critic"):
            dt_grpo.set_up(args)
        assert not (tmp_path / "runs").exists()  # refused before a run folder is made
    else:
        assert dt_grpo.set_up(args)[5] == (expect == "critic")


# --- per-dataset defaults ------------------------------------------------------------------------------------
def test_defaults_follow_the_paper_where_known():
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="hopper-random-v2"), FakeData("hopper", "random"))
    assert args.g_online == args.g_eval == 3600 and args.pretrain_updates == 5000  # ODT's pretraining row
    assert (args.group_size, args.sub_len, args.cont_len) == (8, 10, 400)  # L_eval ≈ 400 (paper Tab. 6)
    assert (args.ratio, args.clip_eps, args.online_learning_rate) == ("joint", 0.2, 2e-5)
    geometric = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="hopper-random-v2", ratio="geometric"),
                                               FakeData("hopper", "random"))
    assert geometric.clip_eps == 0.05
    # a one-step dataset under any id: data-derived targets, one-step GRPO settings
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="my-bandit-v0"),
                                          FakeData("other", "", act_dim=1, one_step=True))
    assert args.sub_len == 1 and args.cont_len == 0 and args.grpo_minibatch == 0
    assert args.g_online == args.g_eval == pytest.approx(0.9)


# --- end to end through the CLI -------------------------------------------------------------------------------
E2E = [*TINY_HOPPER, *TINY_MODEL, "--pretrain-updates", "100", "--online-steps", "1200", "--eval-interval", "600",
       "--log-interval", "25", "--checkpoint-interval", "50", "--learning-rate", "1e-3"]


def round_rows(rows):
    return [r for r in rows if r["phase"] == "online" and "rollout/return" in r]


@pytest.mark.slow
def test_dt_grpo_end_to_end(tiny_hopper, tmp_path):
    result, run_dir, rows = run_and_read("dt_grpo.py", *E2E, cwd=tmp_path, env=tiny_hopper)
    pre = [r for r in rows if r["phase"] == "pretrain" and "train/nll" in r]
    online = round_rows(rows)
    assert len(pre) == 5 and pre[0]["global_step"] == 1 and online, rows  # first row after one update
    assert pre[-1]["train/nll"] < pre[0]["train/nll"]
    keys = ("train/ratio_mean", "train/ratio_max", "train/clip_fraction", "train/group_return_std",
            "train/approx_kl", "train/entropy", "train/policy_loss", "train/live_fraction")
    for r in online:
        assert all(math.isfinite(r[k]) for k in keys), r
        assert 0.0 <= r["train/clip_fraction"] <= 1.0 and r["train/ratio_max"] >= r["train/ratio_mean"] > 0
        assert r["train/group_return_std"] > 0 and "train/nll" not in r  # no supervised term online
        assert 0 <= r["train/effective_updates"] <= 4 * r["rollout/groups"]
    # 8 members per group, minibatches of 8 members, 4 epochs: 4 updates per group collected
    assert online[-1]["global_step"] == 100 + 4 * sum(r["rollout/groups"] for r in online)
    # every round: a reference episode plus its groups of 8 members of ≤ 10 + 400 steps, all counted
    steps = np.diff([0] + [r["env_steps"] for r in online])
    assert all(s > r["rollout/length"] for s, r in zip(steps, online, strict=True))
    assert all(s <= r["rollout/length"] + 8 * 410 * r["rollout/groups"] for s, r in zip(steps, online, strict=True))
    # the budget holds to within one group (or the one reference episode that starts a round)
    one_group = 8 * 410
    assert 1200 <= online[-1]["env_steps"] < 1200 + one_group
    # an evaluation at every --eval-interval boundary, within one group of it, plus the final one
    evals = [r for r in rows if "eval/return_mean" in r and r["phase"] != "pretrain"]
    for boundary in (600, 1200):
        assert any(boundary <= r["env_steps"] < boundary + one_group for r in evals), (boundary, evals)
    assert all(math.isfinite(r["eval/normalized_score_mean"]) for r in evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["g_online"] == config["args"]["g_eval"] == 3600 and config["args"]["relabel"] is False
    assert config["args"]["cont_len"] == 400 and config["advantage"] == "group"
    assert summary["counters"]["env_steps"] == online[-1]["env_steps"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["reference_model"] is not None and ckpt["online_optimizer"]["state"]
    assert "final: return" in result.stdout


@pytest.mark.slow
def test_qgrpo_end_to_end(tiny_hopper, tmp_path):
    """--advantage critic on Hopper: no branching, only sampled episodes; the critic trains from the first
    round, the policy after --critic-warmup env steps."""
    _, run_dir, rows = run_and_read("dt_grpo.py", *E2E, "--advantage", "critic", "--critic-warmup", "300",
                                    "--online-steps", "900", cwd=tmp_path, env=tiny_hopper)
    online = round_rows(rows)
    steps = np.diff([0] + [r["env_steps"] for r in online])
    assert all(s == r["rollout/length"] for s, r in zip(steps, online, strict=True))  # no member steps
    assert all(math.isfinite(r["train/critic_loss"]) for r in online)
    warm = [r for r in online if r["env_steps"] >= 300]  # counted after the round's episode
    assert warm and all(r["rollout/groups"] == 4 and math.isfinite(r["train/policy_loss"]) for r in warm)
    assert online[-1]["global_step"] == 100 + 4 * 4 * len(warm)  # 4 groups × 8 one-step members, 4 epochs
    assert all(r["rollout/groups"] == 0 for r in online if r["env_steps"] < 300)
    assert json.loads((run_dir / "config.json").read_text())["advantage"] == "critic"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["critic"]["replay"]["size"] > 0


@pytest.mark.slow
def test_stop_in_online_phase_and_resume(tiny_hopper, tmp_path):
    args = [*E2E, "--online-steps", "1800", "--checkpoint-interval", "16"]

    def online_round_done(runs) -> bool:
        return any('"phase": "online"' in m.read_text() for m in runs.glob("*/metrics.jsonl"))

    out = run_and_interrupt("dt_grpo.py", *args, cwd=tmp_path, env=tiny_hopper, ready=online_round_done, timeout=120)
    assert "--resume" in out
    run_dir = only_run_dir(tmp_path)
    stopped = torch.load(run_dir / "checkpoint.pt", weights_only=False)["counters"]
    assert 0 < stopped["env_steps"] < 1800 and stopped["rounds"] >= 1
    run_script("dt_grpo.py", "--resume", str(run_dir), "--no-progress", cwd=tmp_path, env=tiny_hopper)
    rows = round_rows(read_metrics(run_dir))
    rounds = [r["rounds"] for r in rows]
    assert rounds == list(range(1, len(rounds) + 1))  # no round lost or logged twice
    assert rows[-1]["global_step"] == 100 + 4 * sum(r["rollout/groups"] for r in rows)
    assert rows[-1]["env_steps"] >= 1800


TOY = ["--env-id", "toy-vitamin-v0", "--seed", "1", "--embed-dim", "32", "--n-layers", "1", "--n-heads", "1",
       "--batch-size", "64", "--warmup-steps", "10", "--pretrain-updates", "300", "--learning-rate", "1e-3",
       "--online-steps", "512", "--eval-interval", "256", "--eval-episodes", "5", "--no-progress"]


@pytest.mark.slow
def test_toy_pure_rl_gradients_reach_the_hidden_peak_odt_does_not(tmp_path, data_env):
    """ODT+TD3 §3.1 toy: offline actions sit on the feet of r(a). With the same pretraining and the same 512
    online env steps, GRPO moves the action to the peak a = 0; ODT (64 env steps and 50 updates per round,
    conditioned on the same g = 1) stays near the data."""
    (tmp_path / "grpo").mkdir(), (tmp_path / "odt").mkdir()
    run_script("dt_grpo.py", *TOY, cwd=tmp_path / "grpo", env=data_env)
    evals = [r["eval/return_mean"] for r in read_metrics(only_run_dir(tmp_path / "grpo")) if "eval/return_mean" in r]
    assert evals[0] < 0.5  # after pretraining: on a foot of the reward
    assert evals[-1] >= 0.9, evals
    run_script("odt.py", *TOY, "--min-steps-per-round", "64", "--updates-per-round", "50", cwd=tmp_path / "odt",
               env=data_env)
    evals = [r["eval/return_mean"] for r in read_metrics(only_run_dir(tmp_path / "odt")) if "eval/return_mean" in r]
    assert max(evals) <= 0.6, evals


@pytest.mark.slow
@pytest.mark.parametrize("extra,needle", [
    (["--env-id", "hoper-random-v2"], "hopper-random-v2"),
    (["--env-id", "hopper-random-v2", "--group-size", "1"], "--group-size must be ≥ 2"),
    (["--resume", "does/not/exist"], "no config.json"),
])
def test_bad_input_gives_one_clear_message(tiny_hopper, tmp_path, extra, needle):
    result = run_script("dt_grpo.py", *extra, "--generate-steps", "4000", "--no-progress", cwd=tmp_path,
                        env=tiny_hopper, check=False)
    assert_clear_error(result, needle)
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made
