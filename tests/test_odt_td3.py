"""Unit tests for the TD3 parts of odt_td3.py (targets, shifted windows, delays, Polyak), and CLI runs:
the motivation toy against odt.py, hopper end to end, resume and bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from test_odt_td3_equations import HYPER, record_targets

import odt_td3
from common.datasets import Episode
from conftest import (
    TINY_HOPPER,
    TINY_MODEL,
    assert_clear_error,
    assert_consistent_hopper_evals,
    only_run_dir,
    read_metrics,
    run_and_interrupt,
    run_and_read,
    run_script,
)


def episode(obs_start: float, rewards, terminal: bool, obs_dim=2, act_dim=1) -> Episode:
    """obs_t = obs_start + t in every dim, next_obs_t = obs_t + 1; a_t = t / 10; last step terminal or truncated."""
    n = len(rewards)
    obs = (obs_start + np.arange(n, dtype=np.float32))[:, None].repeat(obs_dim, 1)
    last, never = np.eye(n, dtype=bool)[-1], np.zeros(n, dtype=bool)
    return Episode(observations=obs, actions=(np.arange(n, dtype=np.float32) / 10)[:, None].repeat(act_dim, 1),
                   rewards=np.asarray(rewards, np.float32), terminals=last if terminal else never,
                   truncations=never if terminal else last, next_observations=obs + 1)


def make_replay(episodes, rtg_scale=1.0, reward_shift=0.0, obs_dim=2):
    replay = odt_td3.TrajectoryReplay(10, np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32), rtg_scale,
                                      1000, torch.device("cpu"), reward_shift)
    for e in episodes:
        replay.add(e)
    return replay


class ConstantActor(torch.nn.Module):
    """Stands in for the target transformer: records its inputs, always proposes the action 0.5."""

    def forward(self, rtg, states, actions, timesteps, valid):
        self.seen = dict(rtg=rtg, states=states, actions=actions, timesteps=timesteps, valid=valid)
        return states

    def act(self, h):
        return torch.full((*h.shape[:2], 1), 0.5)


class StateCritic(torch.nn.Module):
    """Q1(s, a) = s_0 + a_0, Q2 = Q1 + 1, so min(Q1, Q2) = s_0 + a_0."""

    def forward(self, states, actions):
        q = states[..., 0] + actions[..., 0]
        return q, q + 1


# --- TD3 target -----------------------------------------------------------------------------------------
def test_td_target_formula():
    y = odt_td3.td_target(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([10.0, 10.0]),
                          torch.tensor([8.0, 3.0]), gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * 8.0, 2.0]))  # min(Q1', Q2'); no bootstrap at done


def test_critic_targets_terminal_vs_truncation_by_hand(monkeypatch):
    """Episode A (3 steps) ends in a terminal, episode B (2 steps) is cut by the time limit: B's last step
    bootstraps from its next observation, A's does not. y = r + γ(1 − done)(s'_0 + 0.5)."""
    replay = make_replay([episode(0.0, [1.0, 2.0, 3.0], terminal=True), episode(10.0, [5.0, 6.0], terminal=False)])
    batch = replay.sample(256, 3, np.random.default_rng(0))
    y = record_targets(monkeypatch, ConstantActor(), StateCritic(), batch, gamma=0.99)["y"]
    g = 0.99
    expected = {0.0: 1 + g * 1.5, 1.0: 2 + g * 2.5, 2.0: 3.0, 10.0: 5 + g * 11.5, 11.0: 6 + g * 12.5}
    states, valid = batch["states"][..., 0], batch["valid"]
    for s, y_hand in expected.items():
        hits = (states == s) & valid
        assert hits.any(), s
        torch.testing.assert_close(y[hits], torch.full_like(y[hits], y_hand))
    dones = batch["dones"]
    assert (dones[valid & (states == 2.0)] == 1).all() and (dones[valid & (states == 11.0)] == 0).all()


def test_target_policy_smoothing_is_clipped_then_clamped(monkeypatch):
    """ã = clamp(μ' + clip(ε, −c, c), −1, 1), ε ~ N(0, σ²) (TD3 §5.3), with --policy-noise σ and --noise-clip c."""
    replay = make_replay([episode(0.0, [1.0] * 4, terminal=True)])
    batch = replay.sample(512, 4, np.random.default_rng(0))
    a = record_targets(monkeypatch, ConstantActor(), StateCritic(), batch, policy_noise=10.0,
                       noise_clip=0.5)["next_actions"]
    assert a.min() >= 0.0 - 1e-6 and a.max() == 1.0  # 0.5 ± 0.5, then clamp to [−1, 1]
    a = record_targets(monkeypatch, ConstantActor(), StateCritic(), batch, policy_noise=0.2,
                       noise_clip=0.5)["next_actions"]
    assert 0.15 < (a - 0.5).std() < 0.25


# --- the shifted window ---------------------------------------------------------------------------------
def test_target_actor_sees_the_window_shifted_by_one_step(monkeypatch):
    """The target actor's input is the window one step later: (R_{t+1}, s_{t+1}, a_{t+1}, t+1) at every position."""
    replay = make_replay([episode(0.0, [1.0, 2.0, 3.0, 4.0], terminal=False)], rtg_scale=0.1)
    batch = replay.sample(256, 3, np.random.default_rng(0))
    actor = ConstantActor()
    record_targets(monkeypatch, actor, StateCritic(), batch)
    seen, valid = actor.seen, batch["valid"]
    torch.testing.assert_close(seen["states"][valid], batch["states"][valid] + 1)  # s_{t+1}, incl. the last step
    rtg_next = {0.0: 0.9, 1.0: 0.7, 2.0: 0.4, 3.0: 0.0}  # R_{t+1} · 0.1 for rewards 1..4
    for s, r in rtg_next.items():
        torch.testing.assert_close(seen["rtg"][valid & (batch["states"][..., 0] == s)], torch.tensor(r).expand(
            int((valid & (batch["states"][..., 0] == s)).sum())))
    torch.testing.assert_close(seen["timesteps"][valid], batch["timesteps"][valid] + 1)
    # a_{t+1} at every position but the last (never visible at the state token), padding stays zero
    torch.testing.assert_close(seen["actions"][:, :-1][valid[:, :-1]], batch["actions"][:, 1:][valid[:, :-1]])
    assert (seen["actions"][:, -1] == 0).all() and (seen["actions"][~valid] == 0).all()
    assert torch.equal(seen["valid"], valid)


def test_shifted_window_target_equals_acting_one_step_later(monkeypatch):
    """With target = online copy, eval mode and no noise, the target action at window position j equals the
    action the transformer outputs for the real window that ends one step later (at s_{t+1})."""
    torch.manual_seed(0)
    model = odt_td3.DecisionTransformer(2, 1, 16, 1, 2, 0.0, 1000, True).eval()
    replay = make_replay([episode(0.0, [1.0, 0.5, 2.0, 1.5, 3.0], terminal=False)], rtg_scale=0.1)
    batch = replay.sample(64, 3, np.random.default_rng(0))
    full = batch["valid"].all(1)
    target = record_targets(monkeypatch, model, StateCritic(), batch)["next_actions"]
    flat = replay._flat
    start = int(batch["timesteps"][full][0, 0])  # a full window t0..t0+2 → steps t0+1..t0+3 one step later
    for j in range(3):
        idx = torch.arange(start + 1, start + 2 + j)
        states = flat["states"][idx].clone()
        if start + 1 + j == 5:  # past the end of the data: the next state comes from next_observations
            states[-1] = flat["next_states"][start + j]
        rtg = torch.cat((flat["rtg"], torch.zeros(1)))[idx]
        actions = torch.cat((flat["actions"], torch.zeros(1, 1)))[idx]
        h = model(rtg[None], states[None], actions[None], idx[None], torch.ones(1, j + 1, dtype=torch.bool))
        torch.testing.assert_close(target[full][0, j], model.act(h)[0, -1])


# --- replay extras ----------------------------------------------------------------------------------------
def test_replay_stores_raw_rewards_dones_and_next_states():
    replay = make_replay([episode(0.0, [100.0, 200.0], terminal=False)], rtg_scale=0.001, reward_shift=-1.0)
    batch = replay.sample(64, 2, np.random.default_rng(0))
    full = batch["valid"].all(1)
    torch.testing.assert_close(batch["rewards"][full][0], torch.tensor([99.0, 199.0]))  # raw (+ shift), unscaled
    torch.testing.assert_close(batch["rtg"][full][0], torch.tensor([0.298, 0.199]))  # scaled RTG of shifted r
    torch.testing.assert_close(batch["next_states"][full][0, :, 0], torch.tensor([1.0, 2.0]))
    assert (batch["dones"] == 0).all()  # a truncated trajectory has no terminal


# --- delayed updates and Polyak averaging -------------------------------------------------------------
def test_polyak_update():
    source, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in target.parameters()]
    odt_td3.polyak_update(target, source, 0.25)
    for b, t, s in zip(before, target.parameters(), source.parameters(), strict=True):
        torch.testing.assert_close(t.detach(), 0.75 * b + 0.25 * s.detach())


def test_delayed_update_schedule():
    """One update = policy_interval critic steps, then one actor step and one Polyak step of both targets."""
    torch.manual_seed(0)
    model = odt_td3.DecisionTransformer(2, 1, 16, 1, 1, 0.0, 1000, False)
    critic = odt_td3.Critic(2, 1, 32, layer_norm=True)
    model_target, critic_target = copy.deepcopy(model), copy.deepcopy(critic)
    optimizer = odt_td3.Lamb(odt_td3.lamb_param_groups(model, 5e-4), lr=1e-3)
    scheduler = odt_td3.warmup_schedule(optimizer, 10)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    replay = make_replay([episode(0.0, [1.0] * 6, terminal=True)])
    rng = np.random.default_rng(0)
    batches = [replay.sample(8, 4, rng) for _ in range(3)]
    critic_before = [p.detach().clone() for p in critic.parameters()]
    ct_before = [p.detach().clone() for p in critic_target.parameters()]
    stats = odt_td3.td3_update(model, model_target, critic, critic_target, optimizer, scheduler, critic_optimizer,
                               batches, **HYPER)
    assert critic_optimizer.state[next(critic.parameters())]["step"] == 3
    assert [g["step"] for g in optimizer.param_groups] == [1, 1] and scheduler.last_epoch == 1
    for b, t, s in zip(ct_before, critic_target.parameters(), critic.parameters(), strict=True):
        torch.testing.assert_close(t.detach(), b + 0.005 * (s.detach() - b))  # one Polyak step, after the critic
    assert any(not torch.equal(b, p) for b, p in zip(critic_before, critic.parameters(), strict=True))
    assert set(stats) >= {"train/critic_loss", "train/q_mean", "train/actor_rl_loss", "train/supervised_loss"}
    assert all(math.isfinite(v.item()) for v in stats.values())


@pytest.mark.parametrize("slope", [1.0, -1.0])
def test_actor_update_moves_actions_along_dq_da(slope):
    """Pure RL actor (supervised_coef 0) through odt_td3.td3_update with the script's LAMB: with Q1(s, a) = slope·a,
    a few actor updates move μ in the direction of ∂Q/∂a = slope (the critic is frozen: lr 0)."""
    torch.manual_seed(0)
    model = odt_td3.DecisionTransformer(2, 1, 16, 1, 1, 0.0, 1000, False)
    critic = odt_td3.Critic(2, 1, 8, False)
    with torch.no_grad():  # Q1(s, a) = slope·a
        for p in critic.parameters():
            p.zero_()
        critic.q1[0].weight[0, 2] = 1.0 if slope > 0 else 0.0
        critic.q1[0].weight[1, 2] = 0.0 if slope > 0 else 1.0
        critic.q1[3].weight[0, 0] = critic.q1[3].weight[1, 1] = 1.0
        critic.q1[6].weight[0, 0] = 1.0
        critic.q1[6].weight[0, 1] = -1.0
        critic.q1[0].bias.fill_(1.0)  # hidden units a + 1 and 1 (ReLU-active on [−1, 1]): Q1 = ±((a + 1) − 1)
    batch = make_replay([episode(0.0, [1.0] * 4, terminal=True)]).sample(16, 4, np.random.default_rng(0))
    q = critic.q1(torch.cat((batch["states"], torch.zeros_like(batch["actions"])), -1))
    q_up = critic.q1(torch.cat((batch["states"], torch.full_like(batch["actions"], 0.5)), -1))
    torch.testing.assert_close(q_up - q, torch.full_like(q, 0.5 * slope))
    optimizer = odt_td3.Lamb(odt_td3.lamb_param_groups(model, 5e-4), lr=1e-2)
    scheduler = odt_td3.warmup_schedule(optimizer, 1)
    mu = lambda: model.act(model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"],
                                 batch["valid"]))[batch["valid"]].mean().item()
    before = mu()
    for _ in range(10):
        odt_td3.td3_update(model, copy.deepcopy(model), critic, copy.deepcopy(critic), optimizer, scheduler,
                           torch.optim.SGD(critic.parameters(), lr=0.0), [batch],
                           **{**HYPER, "alpha": 1.0, "supervised_coef": 0.0})
    assert slope * (mu() - before) > 0.3, (before, mu())


# --- per-dataset defaults ----------------------------------------------------------------------------
class FakeData:
    def __init__(self, family, kind, act_dim=3, ref_max=None, episodes=None):
        self.family, self.dataset_kind, self.act_dim, self.ref_max_score = family, kind, act_dim, ref_max
        self.episodes = episodes if episodes is not None else [episode(0.0, [1.0, 2.0], True)]


def test_paper_table9_defaults():
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(), FakeData("hopper", "random"))
    assert (a.min_steps_per_round, a.policy_interval, a.gamma, a.critic_lr, a.critic_layer_norm) == (
        1000, 2, 0.99, 1e-3, False)
    assert (a.alpha_pretrain, a.alpha_online, a.g_eval, a.g_online, a.context_len, a.eval_context_len) == (
        0.0, 0.1, 3600, 7200, 20, 5)
    assert a.online_steps == 500_000
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(), FakeData("hopper", "medium"))
    assert a.min_steps_per_round is None  # one episode per round
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(), FakeData("antmaze", "umaze", act_dim=8))
    assert (a.gamma, a.alpha_pretrain, a.policy_interval, a.critic_layer_norm, a.reward_shift, a.g_eval) == (
        0.998, 0.1, 1, True, -1.0, -100)
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(min_steps_per_round=0), FakeData("pen", "human", act_dim=24))
    assert (a.context_len, a.eval_context_len, a.g_eval, a.pretrain_updates, a.critic_lr) == (5, 1, 12000, 40000, 2e-4)
    assert a.min_steps_per_round == 0  # explicit flags win


def test_one_step_data_get_data_derived_defaults_under_any_id():
    """Issue 9: one-step episodes under a non-toy id get context 1, |R|·scale ≤ 1 and the best return as target."""
    data = FakeData("hopper", "random", act_dim=1, episodes=[episode(0.0, [r], True) for r in (-0.5, 2.0)])
    a = odt_td3.apply_dataset_defaults(odt_td3.Args(), data)
    assert (a.context_len, a.eval_context_len, a.alpha_online) == (1, 1, 1.0)
    assert a.rtg_scale == pytest.approx(0.5) and a.g_eval == a.g_online == 2.0


# --- the motivation toy through both CLIs (paper §3.1) -----------------------------------------------
TOY = ["--env-id", "toy-vitamin-v0", "--embed-dim", "32", "--n-layers", "1", "--n-heads", "1",
       "--batch-size", "32", "--warmup-steps", "10", "--learning-rate", "1e-3", "--pretrain-updates", "300",
       "--online-steps", "100", "--updates-per-round", "10", "--eval-interval", "50", "--eval-episodes", "5",
       "--no-progress"]


def toy_evals(script: str, cwd, env, *extra: str) -> list[float]:
    cwd.mkdir()
    run_script(script, *TOY, *extra, cwd=cwd, env=env)
    return [r["eval/return_mean"] for r in read_metrics(only_run_dir(cwd)) if "eval/return_mean" in r]


@pytest.mark.slow
def test_toy_td3_finds_the_hidden_peak_its_control_does_not(data_env, tmp_path):
    """Paper §3.1: data on the two feet of r(a), peak r = 1 at a = 0. The critic's ∂Q/∂a leads ODT+TD3 to the
    peak on two seeds; the paper's control — the same script, model, data and budget with the RL term off
    (--alpha-online 0: a deterministic ODT) — stays on the data's returns. Measured: ODT+TD3 ends at 0.99 / 0.99
    (seeds 1 / 2), the control at 0.000 / 0.001; both start at 0.14."""
    for seed in ("1", "2"):
        td3 = toy_evals("odt_td3.py", tmp_path / f"td3_{seed}", data_env, "--seed", seed)
        assert td3[0] < 0.3 and td3[-1] >= 0.9, td3  # starts at the data's returns, ends at the peak
    control = toy_evals("odt_td3.py", tmp_path / "control", data_env, "--seed", "1", "--alpha-online", "0")
    assert control[-1] <= 0.3, control


# --- end to end on the tiny hopper dataset ---------------------------------------------------------------
E2E = [*TINY_HOPPER, *TINY_MODEL, "--pretrain-updates", "150", "--online-steps", "120", "--updates-per-round", "10",
       "--eval-interval", "60", "--log-interval", "25", "--checkpoint-interval", "50", "--learning-rate", "1e-3",
       "--min-steps-per-round", "0"]


@pytest.mark.slow
def test_odt_td3_end_to_end(tiny_hopper, tmp_path):
    result, run_dir, rows = run_and_read("odt_td3.py", *E2E, cwd=tmp_path, env=tiny_hopper)
    pre = [r for r in rows if r["phase"] == "pretrain" and "train/critic_loss" in r]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["global_step"] for r in pre] == [1, 25, 50, 75, 100, 125, 150] and online, rows  # first row early
    keys = ("train/critic_loss", "train/q_mean", "train/actor_rl_loss", "train/supervised_loss")
    for r in pre + online:
        assert all(math.isfinite(r[k]) for k in keys)
    assert pre[-1]["train/critic_loss"] < 0.5 * pre[0]["train/critic_loss"]  # the critic fits its targets
    assert pre[-1]["train/supervised_loss"] < pre[0]["train/supervised_loss"]
    assert pre[-1]["train/q_mean"] > pre[0]["train/q_mean"]  # hopper rewards ≈ 1/step: Q grows from 0
    assert online[-1]["env_steps"] >= 120 and online[-1]["global_step"] == 150 + 10 * online[-1]["rounds"]
    evals = [r for r in rows if "eval/return_mean" in r]
    assert len(evals) >= 3
    assert_consistent_hopper_evals(evals)
    config = json.loads((run_dir / "config.json").read_text())["args"]
    assert (config["g_eval"], config["g_online"], config["policy_interval"], config["gamma"]) == (3600, 7200, 2, 0.99)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert {"model", "model_target", "critic", "critic_target", "critic_optimizer"} <= set(ckpt)
    assert "next_observations" in ckpt["replay"]["trajectories"][0] and (run_dir / "model.pt").exists()
    assert "final: return" in result.stdout


@pytest.mark.slow
def test_odt_td3_stop_and_resume_restores_critic(tiny_hopper, tmp_path):
    args = [*E2E, "--pretrain-updates", "400", "--checkpoint-interval", "25", "--online-steps", "30"]
    out = run_and_interrupt("odt_td3.py", *args, cwd=tmp_path, env=tiny_hopper)
    run_dir = only_run_dir(tmp_path)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    stopped_at = saved["counters"]["updates"]
    assert 0 < stopped_at < 400 and "--resume" in out
    run_script("odt_td3.py", "--resume", str(run_dir), "--no-progress", cwd=tmp_path,
               env=tiny_hopper)
    rows = read_metrics(run_dir)
    steps = [r["global_step"] for r in rows if "train/critic_loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    # the critic went on from the saved one: its loss right after the resume is as low as before the stop
    before = [r["train/critic_loss"] for r in rows if "train/critic_loss" in r and r["global_step"] <= stopped_at]
    after = [r["train/critic_loss"] for r in rows if "train/critic_loss" in r and r["global_step"] > stopped_at]
    assert after[0] < 0.5 * before[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counters"]["updates"] >= 400 and summary["counters"]["env_steps"] >= 30


@pytest.mark.slow
@pytest.mark.parametrize("extra,needle", [
    (["--env-id", "hoper-random-v2"], "hopper-random-v2"),
    (["--resume", "does/not/exist"], "no config.json"),
])
def test_bad_input_gives_one_clear_message(tiny_hopper, tmp_path, extra, needle):
    result = run_script("odt_td3.py", *extra, "--no-progress", cwd=tmp_path, env=tiny_hopper, check=False)
    assert_clear_error(result, needle)
