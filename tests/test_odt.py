"""Unit tests for the parts of odt.py that are easy to get wrong, and end-to-end runs of its CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import odt
from conftest import (
    TINY_HOPPER,
    TINY_MODEL,
    assert_clear_error,
    assert_consistent_hopper_evals,
    episode,
    only_run_dir,
    read_metrics,
    run_and_interrupt,
    run_and_read,
    run_script,
)


def make_replay(capacity=10, rtg_scale=1.0):
    return odt.TrajectoryReplay(capacity, np.zeros(3, np.float32), np.ones(3, np.float32), rtg_scale, 1000,
                                torch.device("cpu"))


# --- returns-to-go and hindsight relabeling -------------------------------------------------------
def test_returns_to_go_are_suffix_sums():
    np.testing.assert_allclose(odt.returns_to_go(np.array([1.0, 2.0, 3.0])), [6.0, 5.0, 3.0])
    np.testing.assert_allclose(odt.returns_to_go(np.array([-1.0])), [-1.0])


def test_replay_relabels_online_trajectories_with_achieved_returns():
    """An online episode rolled out with target 7200 is trained on the return it achieved (Alg. 2)."""
    replay = make_replay(rtg_scale=0.001)
    replay.add(episode([10.0, 20.0, 30.0]))
    batch = replay.sample(64, 3, np.random.default_rng(0))
    full = batch["valid"].all(dim=1)
    assert full.any()
    # Full windows start at t=0: RTG tokens are the achieved suffix sums × scale, not the target.
    np.testing.assert_allclose(batch["rtg"][full][0].numpy(), [0.060, 0.050, 0.030], rtol=1e-6)


def test_fifo_replaces_oldest_and_top_n_initialisation_order():
    replay = make_replay(capacity=3)
    for i in range(3):
        replay.add(episode([float(i)] * 2))
    replay.add(episode([9.0] * 2))  # evicts slot 0 (the first added)
    assert [t["rewards"][0] for t in replay.trajectories] == [9.0, 1.0, 2.0]
    replay.add(episode([8.0] * 2))
    assert [t["rewards"][0] for t in replay.trajectories] == [9.0, 8.0, 2.0]


# --- window sampling and padding ------------------------------------------------------------------
def test_sampler_is_length_proportional_with_uniform_starts():
    replay = make_replay(capacity=10)
    lengths = [1, 3, 6]
    for i, n in enumerate(lengths):
        replay.add(episode([1.0] * n, start=100.0 * i))
    rng = np.random.default_rng(0)
    idx, valid = replay.sample_indices(200_000, 4, rng)
    last = idx[:, -1]  # the last position is always valid
    traj = np.searchsorted(replay.offsets, last, side="right") - 1
    freq = np.bincount(traj, minlength=3) / len(traj)
    np.testing.assert_allclose(freq, np.array(lengths) / sum(lengths), atol=0.005)
    # start index uniform inside the 6-step trajectory: the first valid step of each window
    first = np.where(valid, idx, 10**9).min(axis=1)[traj == 2] - replay.offsets[2]
    np.testing.assert_allclose(np.bincount(first, minlength=6) / len(first), np.full(6, 1 / 6), atol=0.01)


def test_windows_are_left_padded_and_contiguous():
    replay = make_replay()
    replay.add(episode([1.0, 2.0, 3.0, 4.0, 5.0]))
    batch = replay.sample(512, 4, np.random.default_rng(1))
    valid = batch["valid"].numpy()
    # left padding: once valid, stays valid to the end of the window
    assert (np.diff(valid.astype(int), axis=1) >= 0).all()
    steps = batch["states"][..., 0].numpy()  # observation value == timestep in this episode
    for row, mask in zip(steps, valid, strict=True):
        assert np.all(np.diff(row[mask]) == 1)
        assert np.all(row[~mask] == 0)
    # windows starting at t=3 hold steps 3,4 and two pads
    n_valid = valid.sum(1)
    assert set(n_valid.tolist()) == {1, 2, 3, 4}


def test_attention_mask_blocks_padding_and_future():
    valid = torch.tensor([[False, True, True]])
    mask = odt.attention_mask(valid)[0, 0]
    assert mask.shape == (9, 9)
    assert not mask[3:, :3].any()  # valid tokens never see the padded step's tokens
    assert mask.diagonal().all()  # padded rows keep themselves: no all-masked softmax rows
    assert not mask.triu(1).any()  # causal


def test_padded_inputs_do_not_change_valid_outputs():
    torch.manual_seed(0)
    model = odt.DecisionTransformer(3, 2, 32, 2, 2, 0.0, 100, True).eval()
    valid = torch.tensor([[False, False, True, True]])
    rtg, states, actions = torch.randn(1, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 2)
    steps = torch.arange(4)[None]
    out1 = model(rtg, states, actions, steps, valid)
    rtg2, states2, actions2 = rtg.clone(), states.clone(), actions.clone()
    rtg2[:, :2], states2[:, :2], actions2[:, :2] = 99.0, 99.0, 99.0
    out2 = model(rtg2, states2, actions2, steps, valid)
    torch.testing.assert_close(out1[:, 2:], out2[:, 2:])
    assert torch.isfinite(out1).all()


def test_action_at_state_token_ignores_the_same_steps_action():
    torch.manual_seed(0)
    model = odt.DecisionTransformer(3, 2, 32, 2, 2, 0.0, 100, False).eval()
    valid = torch.ones(1, 3, dtype=torch.bool)
    rtg, states, actions = torch.randn(1, 3), torch.randn(1, 3, 3), torch.randn(1, 3, 2)
    out1 = model(rtg, states, actions, torch.arange(3)[None], valid)
    actions[:, -1] += 5.0  # a_t comes after s_t: the prediction of a_t cannot see it
    out2 = model(rtg, states, actions, torch.arange(3)[None], valid)
    torch.testing.assert_close(out1[:, -1], out2[:, -1])


# --- tanh-Gaussian ----------------------------------------------------------------------------------
def test_tanh_normal_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mu, log_std = torch.randn(64, 3), odt.squash_log_std(torch.randn(64, 3) * 3)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mu.double(), log_std.double().exp()),
        [torch.distributions.TanhTransform(cache_size=1)])
    actions = torch.tanh(mu + log_std.exp() * torch.randn(64, 3)).clamp(-0.999, 0.999)
    reference = dist.log_prob(actions.double()).sum(-1)
    torch.testing.assert_close(odt.tanh_normal_log_prob(mu, log_std, actions).double(), reference,
                               rtol=1e-4, atol=1e-3)


def test_tanh_normal_handles_boundary_actions_and_rsample():
    mu, log_std = torch.zeros(2, 1), torch.zeros(2, 1)
    lp = odt.tanh_normal_log_prob(mu, log_std, torch.tensor([[1.0], [-1.0]]))
    assert torch.isfinite(lp).all()
    torch.manual_seed(0)
    a, lp = odt.tanh_normal_rsample(torch.zeros(20000, 1), torch.zeros(20000, 1))
    assert a.abs().max() < 1
    # H of tanh(N(0,1)) = H(N(0,1)) + E[log(1 − tanh² x)] = 1.4189 − 0.7494 (numerical integration)
    assert abs(-lp.mean().item() - (1.4189 - 0.7494)) < 0.02


def test_log_std_is_squashed_into_paper_range():
    x = torch.tensor([-1e4, 0.0, 1e4])
    torch.testing.assert_close(odt.squash_log_std(x), torch.tensor([-5.0, -1.5, 2.0]))


# --- temperature ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target_entropy,direction", [(100.0, +1), (-100.0, -1)])
def test_temperature_moves_towards_the_entropy_constraint(target_entropy, direction):
    """Through odt.update: λ rises while the entropy is below its bound β and falls while it is above."""
    torch.manual_seed(0)
    replay = make_replay()
    replay.add(episode([1.0] * 6))
    model = odt.DecisionTransformer(3, 2, 16, 1, 1, 0.0, 100, False)
    args = odt.Args(target_entropy=target_entropy, grad_clip=0.25)
    optimizer = odt.Lamb(odt.lamb_param_groups(model, 5e-4), lr=1e-4)
    scheduler = odt.warmup_schedule(optimizer, 10)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    t_opt = torch.optim.Adam([log_t], lr=1e-2)
    rng = np.random.default_rng(0)
    temps = [odt.update(model, optimizer, scheduler, log_t, t_opt, replay.sample(8, 4, rng), args)["train/temperature"]
             .item() for _ in range(5)] + [log_t.exp().item()]  # each row holds λ before its step
    assert np.all(np.sign(np.diff(temps)) == direction), temps
    assert abs(math.log(log_t.exp().item() / 0.1)) == pytest.approx(0.05, rel=0.05)  # 5 Adam steps of 1e-2


def test_odt_losses_temperature_gradient_sign():
    torch.manual_seed(0)
    replay = make_replay()
    replay.add(episode([1.0] * 6))
    model = odt.DecisionTransformer(3, 2, 16, 1, 1, 0.0, 100, False)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    batch = replay.sample(8, 4, np.random.default_rng(0))
    _, t_loss, stats = odt.odt_losses(model, log_t, batch, target_entropy=100.0)  # β far above H
    t_loss.backward()
    assert log_t.grad < 0  # gradient descent raises λ when the entropy is below its bound


# --- LAMB -------------------------------------------------------------------------------------------------
def test_lamb_first_step_is_trust_ratio_scaled_only_with_weight_decay():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = odt.Lamb([w], lr=0.1, weight_decay=0.01)
    w.grad = torch.tensor([0.1, -0.2])  # global norm < 1: the internal clip does nothing
    opt.step()
    # bias-corrected first Adam step is sign(g) (up to eps), plus wd·w; trust ratio ‖w‖/‖update‖
    update = torch.tensor([1.0, -1.0]) + 0.01 * torch.tensor([3.0, 4.0])
    expected = torch.tensor([3.0, 4.0]) - 0.1 * (5 / update.norm()) * update
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-5)
    v = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = odt.Lamb([v], lr=0.1, weight_decay=0.0)  # no weight decay: no trust ratio, Adam's step lr·sign(g)
    v.grad = torch.tensor([0.1, -0.2])
    opt.step()
    torch.testing.assert_close(v.detach(), torch.tensor([2.9, 4.1]), rtol=1e-5, atol=1e-5)
    assert opt.param_groups[0]["step"] == 1


def test_lamb_param_groups_put_vectors_in_a_no_decay_group():
    model = odt.DecisionTransformer(3, 2, 16, 1, 2, 0.0, 10, False)
    decay, no_decay = odt.lamb_param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.embed_ln.bias for p in no_decay["params"])


def test_lamb_solves_least_squares():
    torch.manual_seed(0)
    x, true_w = torch.randn(256, 8), torch.randn(8, 1)
    y = x @ true_w
    layer = torch.nn.Linear(8, 1)
    opt = odt.Lamb(layer.parameters(), lr=0.02, weight_decay=0.0)
    for _ in range(800):
        opt.zero_grad()
        loss = ((layer(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2


def test_warmup_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = odt.warmup_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


# --- per-dataset defaults -------------------------------------------------------------------------------
class FakeData:
    def __init__(self, family, kind, act_dim=3, ref_max=None, episodes=None):
        self.family, self.dataset_kind, self.act_dim, self.ref_max_score = family, kind, act_dim, ref_max
        self.episodes = episodes if episodes is not None else [episode([1.0, 2.0]), episode([3.0] * 3)]


def test_paper_defaults_apply_and_flags_win():
    args = odt.apply_dataset_defaults(odt.Args(env_id="hopper-medium-replay-v2"), FakeData("hopper", "medium-replay"))
    assert (args.learning_rate, args.weight_decay, args.pretrain_updates) == (2e-3, 1e-4, 5000)
    assert (args.g_eval, args.g_online, args.eval_context_len, args.context_len) == (3600, 7200, 5, 20)
    assert args.target_entropy == -3.0 and args.use_timestep_embedding is False and args.rtg_scale == 1e-3
    args = odt.apply_dataset_defaults(odt.Args(learning_rate=3e-4), FakeData("ant", "medium", act_dim=8))
    assert args.learning_rate == 3e-4 and args.eval_context_len == 1 and args.target_entropy == -8.0
    args = odt.apply_dataset_defaults(odt.Args(), FakeData("antmaze", "umaze-diverse", act_dim=8))
    assert args.embed_dim == 1024 and args.buffer_size == 1500 and args.use_timestep_embedding and args.rtg_scale == 1


@pytest.mark.parametrize("family,ref_max", [("toy-vitamin", None), ("hopper", None), ("other", 2.0)])
def test_one_step_data_get_data_derived_defaults_under_any_id(family, ref_max):
    """Issue 9: a one-step dataset (every episode one step) gets context 1, an RTG scale that maps |R| ≤ 1 and the
    best return as target, whatever its id; the target is the env's max score where it states one."""
    data = FakeData(family, "whatever", act_dim=1, ref_max=ref_max, episodes=[episode([r]) for r in (-4.0, 0.5, 1.5)])
    args = odt.apply_dataset_defaults(odt.Args(), data)
    best = 1.5 if ref_max is None else ref_max
    assert (args.context_len, args.eval_context_len, args.pretrain_updates) == (1, 1, 1000)
    assert args.rtg_scale == pytest.approx(1 / 4.0) and args.g_eval == best and args.g_online == best
    assert odt.apply_dataset_defaults(odt.Args(rtg_scale=0.5, g_eval=9.0), data).rtg_scale == 0.5  # flags win


# --- end to end through the CLI -------------------------------------------------------------------------
E2E = [*TINY_HOPPER, *TINY_MODEL, "--pretrain-updates", "150", "--online-steps", "120", "--updates-per-round", "10",
       "--eval-interval", "60", "--log-interval", "25", "--checkpoint-interval", "50", "--learning-rate", "1e-3"]


@pytest.mark.slow
def test_odt_end_to_end(tiny_hopper, tmp_path):
    result, run_dir, rows = run_and_read("odt.py", *E2E, cwd=tmp_path, env=tiny_hopper)
    pre = [r for r in rows if r["phase"] == "pretrain" and "train/nll" in r]
    online = [r for r in rows if r["phase"] == "online"]
    assert [r["global_step"] for r in pre] == [1, 25, 50, 75, 100, 125, 150] and online, rows  # first row early
    for r in pre + online:
        assert all(math.isfinite(r[k]) for k in ("train/nll", "train/entropy", "train/temperature"))
    assert pre[-1]["train/nll"] < pre[0]["train/nll"] - 0.5  # the policy fits the data
    assert online[-1]["env_steps"] >= 120 and online[-1]["global_step"] == 150 + 10 * online[-1]["rounds"]
    evals = [r for r in rows if "eval/return_mean" in r]
    assert len(evals) >= 3  # after pretraining, during finetuning, final
    assert_consistent_hopper_evals(evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["g_eval"] == 3600 and config["args"]["g_online"] == 7200  # paper's hopper targets
    assert summary["counters"]["updates"] == online[-1]["global_step"]
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "model.pt").exists()
    assert "final: return" in result.stdout


@pytest.mark.slow
def test_odt_stop_and_resume_continues_counters(tiny_hopper, tmp_path):
    args = [*E2E, "--pretrain-updates", "400", "--checkpoint-interval", "25"]
    out = run_and_interrupt("odt.py", *args, cwd=tmp_path, env=tiny_hopper)
    assert "--resume" in out
    run_dir = only_run_dir(tmp_path)
    stopped_at = torch.load(run_dir / "checkpoint.pt", weights_only=False)["counters"]["updates"]
    assert 0 < stopped_at < 400
    run_script("odt.py", "--resume", str(run_dir), "--no-progress", cwd=tmp_path, env=tiny_hopper)
    rows = read_metrics(run_dir)
    steps = [r["global_step"] for r in rows if "train/nll" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated or lost rows
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counters"]["updates"] >= 400 and summary["counters"]["env_steps"] >= 120


@pytest.mark.slow
@pytest.mark.parametrize("extra,needle", [
    (["--env-id", "hoper-medium-v2"], "hopper-medium-v2"),
    (["--resume", "does/not/exist"], "no config.json"),
    (["--env-id", "hopper-random-v2", "--dataset-path", "missing.hdf5"], "missing.hdf5"),
])
def test_bad_input_gives_one_clear_message(tiny_hopper, tmp_path, extra, needle):
    result = run_script("odt.py", *extra, "--no-progress", cwd=tmp_path, env=tiny_hopper, check=False)
    assert_clear_error(result, needle)


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny_hopper, tmp_path):
    args = [*E2E, "--learning-rate", "1e30", "--warmup-steps", "1", "--checkpoint-interval", "25"]
    result = run_script("odt.py", *args, cwd=tmp_path, env=tiny_hopper, check=False)
    assert_clear_error(result, "Non-finite")


@pytest.mark.slow
def test_resume_refuses_another_scripts_run(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"script": "odt_td3.py", "args": {}}))
    result = run_script("odt.py", "--resume", str(run_dir), cwd=tmp_path, env={}, check=False)
    assert_clear_error(result, "odt_td3.py")
