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
    groups = dt_grpo.rollout_groups(envs, window_agent(model, len(envs), args), ref, t0s, seed, args)
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


def test_sequence_ratio_and_clipping_match_hand_computation():
    model = tiny_model().eval()
    win, mask = fake_batch(model)
    with torch.no_grad():
        logp = dt_grpo.step_log_probs(model, win)[0]
    seq = (logp * mask).sum(1)  # joint likelihood over each member's valid steps
    target_ratio = torch.tensor([0.5, 1.0, 1.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    batch = {"windows": win, "mask": mask, "old_seq_log_prob": seq - target_ratio.log(), "advantages": adv}
    args = grpo_args(clip_eps=0.2)
    loss, _, stats = dt_grpo.grpo_losses(model, None, torch.tensor(math.log(0.1)), batch, torch.arange(4), args)
    # min(ρA, clip(ρ, 0.8, 1.2)A): 0.5, −1.0, 1.2 (clipped), −1.1 (unclipped for A < 0 and ρ > 1)
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 1.2 - 1.1) / 4, abs=1e-5)
    assert stats["train/ratio_mean"].item() == pytest.approx(target_ratio.mean().item(), abs=1e-5)
    assert stats["train/ratio_max"].item() == pytest.approx(1.5, abs=1e-5)
    assert stats["train/clip_fraction"].item() == pytest.approx(0.5)
    # the masked step (member 1, step 2) does not enter the ratio
    win2 = {k: v.clone() for k, v in win.items()}
    win2["actions"][1, 2, -1] = 0.0
    batch2 = {**batch, "windows": win2}
    loss2, _, _ = dt_grpo.grpo_losses(model, None, torch.tensor(math.log(0.1)), batch2, torch.arange(4), args)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)


def test_clipped_member_gets_no_gradient():
    model = tiny_model().eval()
    win, mask = fake_batch(model, m=1)
    with torch.no_grad():
        seq = (dt_grpo.step_log_probs(model, win)[0] * mask).sum(1)
    args = grpo_args(clip_eps=0.2)
    for ratio, expect_grad in ((1.5, False), (1.1, True)):  # A > 0: ρ above 1 + ε is clipped
        batch = {"windows": win, "mask": mask, "old_seq_log_prob": seq - math.log(ratio),
                 "advantages": torch.ones(1)}
        model.zero_grad()
        loss, _, _ = dt_grpo.grpo_losses(model, None, torch.tensor(0.0), batch, torch.arange(1), args)
        loss.backward()
        norm = sum(p.grad.norm() for p in model.parameters() if p.grad is not None)
        assert (norm > 0) == expect_grad


# --- the paper's thesis: relabeling breaks the importance ratio -------------------------------------------
@pytest.mark.parametrize("relabel", [False, True])
def test_fresh_data_ratio_is_one_only_without_relabeling(relabel):
    model = tiny_model(dropout=0.1)  # dropout on in the module: eval mode must switch it off for both
    args = grpo_args(relabel=relabel)
    ref, _, groups = collect(model, args)
    batch = dt_grpo.make_grpo_batch(model, groups, ref, args)
    model.train(args.online_dropout)
    with torch.no_grad():
        _, _, stats = dt_grpo.grpo_losses(model, None, torch.tensor(math.log(0.1)), batch,
                                          torch.arange(len(batch["advantages"])), args)
        seq_new = (dt_grpo.step_log_probs(model, batch["windows"])[0] * batch["mask"]).sum(1)
    ratio = (seq_new - batch["old_seq_log_prob"]).exp()
    if relabel:  # π_θ(a | s, R_achieved) vs π_old(a | s, R_intended): not the same conditional
        assert (ratio - 1).abs().max() > 1e-3
        assert not torch.equal(batch["windows"]["rtg"], groups["windows"]["rtg"])
    else:  # on-policy, same windows, no dropout: exactly 1
        assert torch.equal(ratio, torch.ones_like(ratio))
        assert stats["train/ratio_mean"].item() == 1.0 and stats["train/clip_fraction"].item() == 0.0


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
def test_active_sampler_picks_highest_variance_steps():
    var = np.array([0.1, 0.9, 0.3, 0.9, 0.05, 0.7], np.float32)
    rng = np.random.default_rng(0)
    assert dt_grpo.branch_points(var, 3, "variance", rng).tolist() == [1, 3, 5]  # ties: earliest first
    uniform = dt_grpo.branch_points(var, 4, "uniform", rng)
    assert len(set(uniform.tolist())) == 4 and uniform.max() < 6
    assert dt_grpo.branch_points(np.array([0.2]), 4, "variance", rng).tolist() == [0, 0, 0, 0]  # toys


# --- per-dataset defaults ------------------------------------------------------------------------------------
class FakeData:
    def __init__(self, family, kind, act_dim=3, ref_max=None):
        self.family, self.dataset_kind, self.act_dim, self.ref_max_score = family, kind, act_dim, ref_max


def test_defaults_roll_out_at_the_evaluation_target():
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="hopper-random-v2"), FakeData("hopper", "random"))
    assert args.g_online == args.g_eval == 3600 and args.pretrain_updates == 5000  # ODT's pretraining row
    assert (args.group_size, args.sub_len, args.cont_len, args.clip_eps) == (8, 10, 40, 0.2)
    args = dt_grpo.apply_dataset_defaults(dt_grpo.Args(env_id="toy-vitamin-v0", g_online=2.0),
                                          FakeData("toy-vitamin", "toy", act_dim=1))
    assert args.g_online == 2.0 and args.sub_len == 1 and args.cont_len == 0 and args.grpo_minibatch == 0


# --- end to end through the CLI -------------------------------------------------------------------------------
E2E = [*TINY_HOPPER, *TINY_MODEL, "--pretrain-updates", "100", "--online-steps", "1200", "--eval-interval", "600",
       "--log-interval", "25", "--checkpoint-interval", "50", "--learning-rate", "1e-3"]


@pytest.mark.slow
def test_dt_grpo_end_to_end(tiny_hopper, tmp_path):
    result, run_dir, rows = run_and_read("dt_grpo.py", *E2E, cwd=tmp_path, env=tiny_hopper)
    pre = [r for r in rows if r["phase"] == "pretrain" and "train/nll" in r]
    online = [r for r in rows if r["phase"] == "online"]
    assert len(pre) == 4 and online, rows
    assert pre[-1]["train/nll"] < pre[0]["train/nll"]
    keys = ("train/ratio_mean", "train/ratio_max", "train/clip_fraction", "train/group_return_std",
            "train/approx_kl", "train/entropy", "train/policy_loss")
    for r in online:
        assert all(math.isfinite(r[k]) for k in keys), r
        assert 0.0 <= r["train/clip_fraction"] <= 1.0 and r["train/ratio_max"] >= r["train/ratio_mean"] > 0
        assert r["train/group_return_std"] > 0 and "train/nll" not in r  # no supervised term online
    # 4 groups × 8 members, minibatches of 8 members, 4 epochs: 16 updates per round
    assert online[-1]["global_step"] == 100 + 16 * online[-1]["rounds"]
    # every round: a reference episode plus 32 members of ≤ 10 + 40 steps, all counted
    steps = np.diff([0] + [r["env_steps"] for r in online])
    assert all(s > r["rollout/length"] for s, r in zip(steps, online, strict=True))
    assert all(s <= r["rollout/length"] + 32 * 50 for s, r in zip(steps, online, strict=True))
    assert online[-1]["env_steps"] >= 1200
    evals = [r for r in rows if "eval/return_mean" in r]
    assert len(evals) >= 3 and all(-5 < r["eval/normalized_score_mean"] < 60 for r in evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["g_online"] == config["args"]["g_eval"] == 3600 and config["args"]["relabel"] is False
    assert summary["counters"]["env_steps"] == online[-1]["env_steps"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["reference_model"] is not None and ckpt["online_optimizer"]["state"]
    assert "final: return" in result.stdout


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
    rows = [r for r in read_metrics(run_dir) if r["phase"] == "online"]
    rounds = [r["rounds"] for r in rows]
    assert rounds == list(range(1, len(rounds) + 1))  # no round lost or logged twice
    assert rows[-1]["global_step"] == 100 + 16 * rows[-1]["rounds"] and rows[-1]["env_steps"] >= 1800


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
    (["--env-id", "hopper-random-v2", "--group-size", "1"], "group size must be"),
    (["--resume", "does/not/exist"], "no config.json"),
])
def test_bad_input_gives_one_clear_message(tiny_hopper, tmp_path, extra, needle):
    result = run_script("dt_grpo.py", *extra, "--generate-steps", "4000", "--no-progress", cwd=tmp_path,
                        env=tiny_hopper, check=False)
    assert_clear_error(result, needle)
