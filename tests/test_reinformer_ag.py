"""Unit tests for the parts of reinformer_ag.py that are easy to get wrong, and end-to-end runs of its CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import reinformer_ag as rf
from conftest import (
    TINY_HOPPER,
    assert_clear_error,
    assert_consistent_hopper_evals,
    episode,
    only_run_dir,
    read_metrics,
    run_and_interrupt,
    run_and_read,
    run_script,
)


class FakeData:
    def __init__(self, episodes, family="hopper", kind="random", act_dim=2, ref_max=None):
        self.episodes, self.family, self.dataset_kind, self.act_dim = episodes, family, kind, act_dim
        self.ref_max_score = ref_max
        self.state_mean, self.state_std = np.zeros(3, np.float32), np.ones(3, np.float32)


def tiny_model(separate=False, seed=0):
    torch.manual_seed(seed)
    return rf.Reinformer(3, 2, 32, 2, 2, 0.0, 100, separate).eval()


# --- losses against hand computations ----------------------------------------------------------------
def test_expectile_loss_hand_computation():
    u = torch.tensor([-2.0, 0.5, 0.0])
    torch.testing.assert_close(rf.expectile_loss(u, 0.99), torch.tensor([0.01 * 4, 0.99 * 0.25, 0.0]))
    torch.testing.assert_close(rf.expectile_loss(u, 0.7), torch.tensor([0.3 * 4, 0.7 * 0.25, 0.0]))


class FixedModel(torch.nn.Module):
    """Returns fixed predictions, so the loss can be checked by hand."""

    def __init__(self, rtg_pred, mu, log_std):
        super().__init__()
        self.rtg_pred, self.mu = rtg_pred, mu
        self.log_std = torch.nn.Parameter(torch.tensor(log_std))

    def forward(self, *args):
        return self.rtg_pred, self.mu

    clamped_log_std = rf.Reinformer.clamped_log_std


def test_max_return_loss_and_nll_hand_computation():
    # two valid tokens (R = 1, 3) and one padded token that must not count anywhere
    batch = {"rtg": torch.tensor([[1.0, 3.0, 0.0]]), "states": torch.zeros(1, 3, 3),
             "actions": torch.tensor([[[0.5], [0.0], [0.0]]]), "timesteps": torch.zeros(1, 3, dtype=torch.long),
             "valid": torch.tensor([[True, True, False]])}
    model = FixedModel(torch.tensor([[2.0, 2.0, 50.0]]), torch.tensor([[[0.0], [0.0], [9.0]]]), [0.0])
    loss, t_loss, stats = rf.reinformer_losses(model, torch.tensor(math.log(0.1)), batch, rf.Args().expectile, -1.0)
    # mean|R| = 2 → u = (−0.5, +0.5); L = mean(0.01·0.25, 0.99·0.25) = 0.125
    assert stats["train/rtg_loss"].item() == pytest.approx(0.125, rel=1e-6)
    # N(0, 1): −log p(0.5) = 0.5·0.25 + 0.5·log 2π, −log p(0) = 0.5·log 2π
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    assert stats["train/nll"].item() == pytest.approx((0.125 + 2 * half_log_2pi) / 2, rel=1e-6)
    entropy = 0.5 + half_log_2pi  # closed form, log σ = 0
    assert stats["train/entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert loss.item() == pytest.approx(0.125 + stats["train/nll"].item() - 0.1 * entropy, rel=1e-6)
    assert t_loss.item() == pytest.approx(0.1 * (entropy + 1.0), rel=1e-6)


def one_token_batch(rtg):
    return {"rtg": torch.tensor([[rtg]]), "states": torch.zeros(1, 1, 3), "actions": torch.zeros(1, 1, 1),
            "timesteps": torch.zeros(1, 1, dtype=torch.long), "valid": torch.ones(1, 1, dtype=torch.bool)}


@pytest.mark.parametrize("predicted,weight", [(0.5, 0.99), (1.5, 0.01)])
def test_max_return_loss_weights_underprediction_by_tau(predicted, weight):
    """Reinformer eq. (6), in the script's direction: residual u = (R − R̂)/mean|R|; u > 0 (R̂ below the return,
    which a max-return predictor must push up) is weighted by τ = 0.99, u < 0 by 1 − τ. Asymmetric residuals,
    so τ ↔ 1 − τ or a flipped residual cannot pass."""
    model = FixedModel(torch.tensor([[predicted]]), torch.zeros(1, 1, 1), [0.0])
    _, _, stats = rf.reinformer_losses(model, torch.tensor(math.log(0.1)), one_token_batch(1.0), rf.Args().expectile,
                                       -1.0)
    assert stats["train/rtg_loss"].item() == pytest.approx(weight * 0.25, rel=1e-6)


def test_max_return_loss_drives_the_prediction_above_the_mean_return():
    """A few steps on R̂ alone, returns 0 and 1 equally often: the τ = 0.99 expectile sits near the maximum."""
    pred = torch.nn.Parameter(torch.tensor(0.5))
    batch = {"rtg": torch.tensor([[0.0, 1.0]]), "states": torch.zeros(1, 2, 3), "actions": torch.zeros(1, 2, 1),
             "timesteps": torch.zeros(1, 2, dtype=torch.long), "valid": torch.ones(1, 2, dtype=torch.bool)}
    opt = torch.optim.SGD([pred], lr=0.5)
    for _ in range(300):
        model = FixedModel(pred.expand(1, 2), torch.zeros(1, 2, 1), [0.0])
        _, _, stats = rf.reinformer_losses(model, torch.tensor(math.log(0.1)), batch, rf.Args().expectile, -1.0)
        opt.zero_grad()
        stats["train/rtg_loss"].backward()
        opt.step()
    assert pred.item() == pytest.approx(0.99, abs=0.01)  # expectile: τ(1 − R̂) = (1 − τ)R̂ → R̂ = τ


def test_log_std_clamp_and_temperature_gradient_sign():
    model = FixedModel(None, None, [-30.0, 5.0])
    torch.testing.assert_close(model.clamped_log_std(), torch.tensor([-20.0, 2.0]))
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    batch = {"rtg": torch.ones(1, 1), "states": torch.zeros(1, 1, 3), "actions": torch.zeros(1, 1, 1),
             "timesteps": torch.zeros(1, 1, dtype=torch.long), "valid": torch.ones(1, 1, dtype=torch.bool)}
    model = FixedModel(torch.ones(1, 1), torch.zeros(1, 1, 1), [0.0])
    _, t_loss, _ = rf.reinformer_losses(model, log_t, batch, 0.99, target_entropy=100.0)  # β far above H
    t_loss.backward()
    assert log_t.grad < 0  # descent raises λ when the entropy is below its bound


def test_iql_losses_hand_computation():
    critic = rf.IQLCritic(3, 2, 8)
    for net, value in ((critic.q1, 1.0), (critic.q2, 2.0), (critic.v, 0.5), (critic.q1_target, 1.0),
                       (critic.q2_target, 2.0)):
        torch.nn.init.zeros_(net[-1].weight)
        torch.nn.init.constant_(net[-1].bias, value)
    batch = {"states": torch.zeros(2, 3), "actions": torch.zeros(2, 2), "rewards": torch.tensor([1.0, 1.0]),
             "next_states": torch.zeros(2, 3), "dones": torch.tensor([0.0, 1.0])}
    args = rf.Args()  # the defaults: γ = 0.99, IQL's τ = 0.7
    loss, stats = rf.iql_losses(critic, batch, args.gamma, args.iql_expectile)
    backup = np.array([1 + 0.99 * 0.5, 1.0])  # eq. (4); no bootstrap after a terminal
    q_loss = np.mean((1 - backup) ** 2) + np.mean((2 - backup) ** 2)
    assert stats["train/critic_q_loss"].item() == pytest.approx(q_loss, rel=1e-6)
    # eq. (5): u = min(Q1', Q2') − V = 1 − 0.5 > 0 → weight τ = 0.7
    assert stats["train/critic_v_loss"].item() == pytest.approx(0.7 * 0.25, rel=1e-6)
    assert loss.item() == pytest.approx(q_loss + 0.175, rel=1e-6)


def test_polyak_update():
    critic = rf.IQLCritic(3, 2, 8)
    with torch.no_grad():
        for p in critic.q1.parameters():
            p.fill_(1.0)
        for p in critic.q1_target.parameters():
            p.fill_(0.0)
    critic.update_targets(0.1)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in critic.q1_target.parameters())


# --- token order: R̂ at the state token, the action at the RTG token --------------------------------------
@pytest.mark.parametrize("separate", [False, True])
def test_rtg_head_reads_the_state_token(separate):
    model = tiny_model(separate)
    rtg, states, actions = torch.randn(1, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 2)
    steps = torch.arange(4)[None]
    r1, mu1 = model(rtg, states, actions, steps)
    rtg2, actions2, states2 = rtg.clone(), actions.clone(), states.clone()
    rtg2[:, 2:] += 5.0  # R_t and later: after s_t
    actions2[:, 2:] += 5.0
    states2[:, 3] += 5.0
    r2, mu2 = model(rtg2, states2, actions2, steps)
    torch.testing.assert_close(r1[:, :3], r2[:, :3])  # R̂_t (t ≤ 2) cannot see R_t, a_t or s_{t+1}
    torch.testing.assert_close(r1[:, :2], r2[:, :2])
    assert not torch.allclose(mu1[:, 2], mu2[:, 2])  # the action at t reads R_t
    torch.testing.assert_close(mu1[:, :2], mu2[:, :2])
    states3 = states.clone()
    states3[:, 2] += 5.0
    r3, _ = model(rtg, states3, actions, steps)
    assert not torch.allclose(r1[:, 2], r3[:, 2])  # ... but does read s_t
    # the action of step t ignores a_t itself
    actions4 = actions.clone()
    actions4[:, 2] += 5.0
    _, mu4 = model(rtg, states, actions4, steps)
    torch.testing.assert_close(mu1[:, 2], mu4[:, 2])
    torch.testing.assert_close(model.predict_rtg(rtg, states, actions, steps), r1)
    torch.testing.assert_close(model.predict_action(rtg, states, actions, steps), mu1)


def test_separate_networks_have_independent_trunks():
    model = tiny_model(separate=True)
    assert model.action_trunk is not None
    assert not any(p is q for p in model.trunk.parameters() for q in model.action_trunk.parameters())
    assert tiny_model(separate=False).action_trunk is None


# --- sampling ----------------------------------------------------------------------------------------------
def test_sampler_uniform_trajectories_full_windows_and_right_padding():
    eps = [episode([1.0] * 2, start=0.0), episode([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=100.0)]
    data = rf.OfflineDataset(FakeData(eps), 0.1, 1000, torch.device("cpu"))
    idx, valid = data.sample_indices(60_000, 4, np.random.default_rng(0))
    traj = (idx[:, 0] >= data.offsets[1]).astype(int)
    np.testing.assert_allclose(np.bincount(traj) / len(traj), [0.5, 0.5], atol=0.01)  # uniform, not ∝ length
    long = traj == 1
    assert valid[long].all()  # T ≥ K: always a full window, start uniform in [0, T−K]
    starts = idx[long, 0] - data.offsets[1]
    np.testing.assert_allclose(np.bincount(starts) / long.sum(), np.full(3, 1 / 3), atol=0.01)
    assert (valid[~long] == [True, True, False, False]).all()  # short trajectory: padding on the right
    batch = data.sample(256, 4, np.random.default_rng(1))
    short = ~batch["valid"][:, -1]
    assert (batch["states"][short][:, 2:] == 0).all() and (batch["rtg"][short][:, 2:] == 0).all()
    full = batch["valid"].all(1) & (batch["states"][:, 0, 0] == 100.0)
    torch.testing.assert_close(batch["rtg"][full][0], torch.tensor([2.1, 2.0, 1.8, 1.5]))  # suffix sums × 0.1
    tr = data.sample_transitions(64, np.random.default_rng(2))
    assert tr["dones"].sum() > 0 and set(tr["dones"].tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(tr["next_states"], tr["states"] + 1)


# --- evaluation: two passes, conditioning, adaptive context ----------------------------------------------
def make_agent(model, conditioning="predicted", ag_steps=0, adaptive=False, eval_context_len=3):
    args = rf.Args(conditioning=conditioning, g_eval=100.0, rtg_scale=0.01, eval_context_len=eval_context_len,
                   adaptive_context=adaptive)
    critic = rf.IQLCritic(3, 2, 8)
    return rf.RFAgent(model, critic, args, np.zeros(3, np.float32), np.ones(3, np.float32), torch.device("cpu"),
                      100, -np.ones(2), np.ones(2), ag_steps, 0.1)


def test_two_pass_evaluation_writes_the_prediction_into_the_rtg_slot():
    model = tiny_model()
    agent = make_agent(model)
    obs = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    agent.reset(obs)
    for t in range(4):
        action = agent.act(obs + t)
        lo = max(0, t + 1 - 3)
        window = (agent.rtg[:, lo:t + 1], agent.states[:, lo:t + 1], agent.actions[:, lo:t + 1],
                  torch.arange(lo, t + 1)[None].expand(2, -1))
        with torch.no_grad():
            r_hat = model.predict_rtg(*window)[:, -1]
            mu = model.predict_action(*window)[:, -1]
        torch.testing.assert_close(agent.rtg[:, t], r_hat)  # pass 1 filled the slot ...
        np.testing.assert_allclose(action, mu.numpy(), rtol=1e-5, atol=1e-6)  # ... pass 2 read it
        agent.observe(np.array([1.0, 2.0], np.float32))
    assert (agent.rtg[:, :4] != 0).all()


def test_target_conditioning_counts_down_like_dt():
    agent = make_agent(tiny_model(), conditioning="target")
    obs = np.zeros((2, 3), np.float32)
    agent.reset(obs)
    agent.act(obs)
    agent.observe(np.array([10.0, 30.0], np.float32))
    agent.act(obs)
    torch.testing.assert_close(agent.rtg[:, :2], torch.tensor([[1.0, 0.9], [1.0, 0.7]]))  # g_eval · 0.01 − r · 0.01


def test_adaptive_context_keeps_steps_while_rtg_decreases():
    agent = make_agent(tiny_model(), adaptive=True, eval_context_len=4)
    agent.reset(np.zeros((2, 3), np.float32))
    agent.rtg[:, :4] = torch.tensor([[5.0, 4.0, 6.0, 3.0], [9.0, 8.0, 7.0, 6.0]])
    valid = agent._adaptive_valid(0, 3)
    assert valid.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert agent._adaptive_valid(0, 0).tolist() == [[True], [True]]  # the first step: a window of one
    fresh = make_agent(tiny_model(), adaptive=True, eval_context_len=4)
    fresh.reset(np.zeros((2, 3), np.float32))
    for t in range(5):
        assert np.isfinite(fresh.act(np.full((2, 3), float(t), np.float32))).all()
        fresh.observe(np.ones(2, np.float32))
    # masked steps do not influence the action: same output as the shorter window
    model = agent.model
    args = (agent.rtg[:1, :4], torch.randn(1, 4, 3), torch.randn(1, 4, 2), torch.arange(4)[None])
    masked = model.predict_action(*args, valid[:1])[:, -1]
    short = model.predict_action(*(x[:, 2:] for x in args))[:, -1]
    torch.testing.assert_close(masked, short)


# --- Action Gradient -----------------------------------------------------------------------------------
C = torch.tensor([0.3, -0.2])


def quad_q(states, actions):  # Q(s, a) = −‖a − c‖², ∇_a Q = −2(a − c)
    return -((actions - C) ** 2).sum(-1)


LOW, HIGH = -torch.ones(2), torch.ones(2)


def test_plain_action_gradient_matches_hand_computation():
    a0 = torch.tensor([[0.8, 0.4]])
    a, best = rf.action_gradient(quad_q, torch.zeros(1, 3), a0, 2, 0.1, "sgd", LOW, HIGH)
    a1 = a0 + 0.1 * (-2) * (a0 - C)  # eq. (1)
    a2 = a1 + 0.1 * (-2) * (a1 - C)
    torch.testing.assert_close(a, a2)
    assert best.tolist() == [2]


def test_momentum_rmsprop_adam_first_steps_by_hand():
    a0 = torch.tensor([[0.8, 0.4]])
    g0 = -2 * (a0 - C)
    s = torch.zeros(1, 3)
    # momentum (eq. 6 as printed): v0 = ζ g0, a1 = a0 + η v0; v1 = v0 + ζ g1, a2 = a1 + η v1
    a1 = a0 + 0.1 * 0.9 * g0
    a2 = a1 + 0.1 * (0.9 * g0 + 0.9 * (-2) * (a1 - C))
    torch.testing.assert_close(rf.action_gradient(quad_q, s, a0, 2, 0.1, "momentum", LOW, HIGH)[0], a2)
    # RMSProp (eq. 7): r0 = (1 − ζ) g0², a1 = a0 + η g0 / (√r0 + ε)
    a1 = a0 + 0.01 * g0 / ((0.001 * g0**2).sqrt() + 1e-8)
    torch.testing.assert_close(rf.action_gradient(quad_q, s, a0, 1, 0.01, "rmsprop", LOW, HIGH, 0.9, 0.999)[0], a1)
    # Adam (eq. 8): the first step is η·sign(g)
    a1 = a0 + 0.01 * g0.sign()
    torch.testing.assert_close(rf.action_gradient(quad_q, s, a0, 1, 0.01, "adam", LOW, HIGH)[0], a1)


@pytest.mark.parametrize("method,lr", [("sgd", 0.1), ("momentum", 0.05), ("rmsprop", 0.02), ("adam", 0.05)])
def test_every_variant_ascends_q_vectorised_over_envs(method, lr):
    a0 = torch.tensor([[0.8, 0.4], [-0.9, -0.9], [0.3, -0.2]])  # the last is already optimal
    a, best = rf.action_gradient(quad_q, torch.zeros(3, 3), a0, 20, lr, method, LOW, HIGH)
    q0, q = quad_q(None, a0), quad_q(None, a)
    assert (q >= q0).all() and (q[:2] > q0[:2] + 0.2).all()
    assert best[2].item() == 0  # zero gradient: every iterate equals a⁰, the argmax keeps a⁰
    torch.testing.assert_close(a[2], a0[2])


def test_argmax_keeps_a0_when_every_step_makes_q_worse():
    a0 = torch.tensor([[0.35, -0.25]])  # near the optimum; η = 2 overshoots further every step
    a, best = rf.action_gradient(quad_q, torch.zeros(1, 3), a0, 5, 2.0, "sgd", -10 * HIGH, 10 * HIGH)
    assert best.item() == 0
    torch.testing.assert_close(a, a0)


def test_iterates_are_clipped_to_the_action_range():
    a, best = rf.action_gradient(lambda s, x: x.sum(-1), torch.zeros(2, 3), torch.zeros(2, 2), 3, 0.7, "sgd",
                                 LOW, HIGH)
    torch.testing.assert_close(a, torch.ones(2, 2))
    assert best.tolist() == [2, 2]  # the first iterate that reaches the bound


# --- per-dataset defaults -------------------------------------------------------------------------------
def test_defaults_table():
    args = rf.apply_dataset_defaults(rf.Args(), FakeData([], "halfcheetah", "medium", act_dim=6, ref_max=12135.0))
    assert args.rtg_scale == 2e-4 and args.context_len == 5 and args.eval_context_len == 5
    assert args.pretrain_updates == 50_000 and args.warmup_steps == 5000 and args.target_entropy == -6.0
    assert args.g_eval == 12135.0 and (args.embed_dim, args.n_layers, args.n_heads, args.batch_size) == (256, 4, 8, 128)
    one_step = [episode([r]) for r in (0.25, -2.0, 1.0)]
    args = rf.apply_dataset_defaults(rf.Args(rtg_scale=0.5), FakeData(one_step, "hopper", "random", act_dim=1))
    assert args.rtg_scale == 0.5 and args.context_len == 1 and args.pretrain_updates == 1500  # one-step, any id
    args = rf.apply_dataset_defaults(rf.Args(), FakeData(one_step, "other", "", act_dim=1, ref_max=1.5))
    assert args.rtg_scale == pytest.approx(0.5) and args.g_eval == 1.5  # |R|·scale ≤ 1; the env's max score
    with pytest.raises(rf.run.UserError, match="--g-eval"):
        rf.apply_dataset_defaults(rf.Args(conditioning="target"), FakeData([], "other", ""))


# --- end to end through the CLI -------------------------------------------------------------------------
TINY = ["--embed-dim", "32", "--n-layers", "1", "--n-heads", "2", "--batch-size", "16", "--context-len", "5",
        "--warmup-steps", "10", "--critic-hidden", "32", "--no-progress"]
E2E = [*TINY_HOPPER, *TINY, "--pretrain-updates", "150", "--eval-interval", "75", "--log-interval", "25",
       "--checkpoint-interval", "50", "--learning-rate", "1e-3", "--ag-steps", "3", "--ag-lr", "0.01"]


@pytest.mark.slow
def test_end_to_end_and_eval_only_sweep(tiny_hopper, tmp_path):
    result, run_dir, rows = run_and_read("reinformer_ag.py", *E2E, cwd=tmp_path, env=tiny_hopper)
    train = [r for r in rows if "train/rtg_loss" in r]
    assert [r["global_step"] for r in train] == [1, 25, 50, 75, 100, 125, 150]  # first row early
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("train/rtg_loss", "train/nll", "train/critic_q_loss",
                                                 "train/critic_v_loss", "train/temperature"))
    assert train[-1]["train/rtg_loss"] < 0.5 * train[0]["train/rtg_loss"]  # R̂ fits the returns
    assert train[-1]["train/nll"] < train[0]["train/nll"]  # (σ stays ≈ 1 under LAMB: the NLL is ~MSE/2 + c)
    assert train[-1]["train/critic_q_loss"] < train[0]["train/critic_q_loss"]
    evals = [r for r in rows if "eval/return_mean" in r]
    assert [r["global_step"] for r in evals] == [75, 150, 150]  # periodic, the last one, and the final row
    assert_consistent_hopper_evals(evals, "eval_rf")  # both scores from the same model
    assert_consistent_hopper_evals(evals, "eval")
    for r in evals:
        assert 0 <= r["eval/ag_changed_frac"] <= 1 and r["eval/ag_q_gain"] >= 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counters"]["updates"] == 150 and "eval_rf/return_mean" in summary
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "model.pt").exists()
    assert "final: RF return" in result.stdout
    # evaluation-only sweep of the same model: n = 0 plus the 2 × 1 grid
    out = run_script("reinformer_ag.py", "--eval-only", str(run_dir), "--sweep-ag-steps", "0", "2",
                     "--sweep-ag-lr", "0.05", "--eval-episodes", "2", "--no-progress", cwd=tmp_path, env=tiny_hopper)
    sweep_dir = next(p for p in (tmp_path / "runs").iterdir() if p != run_dir)
    sweep_rows = read_metrics(sweep_dir)
    assert [(r["ag/steps"], r["ag/lr"]) for r in sweep_rows] == [(0, 0.0), (0, 0.05), (2, 0.05)]
    assert sweep_rows[0]["return_mean"] == pytest.approx(sweep_rows[1]["return_mean"])  # n = 0 is plain RF
    assert sweep_rows[0]["return_mean"] == pytest.approx(evals[-1]["eval_rf/return_mean"])  # same model, seeds
    assert "n=  2" in out.stdout


@pytest.mark.slow
def test_stop_and_resume_continues_counters(tiny_hopper, tmp_path):
    args = [*E2E, "--pretrain-updates", "200", "--eval-interval", "200", "--checkpoint-interval", "25",
            "--ag-steps", "0"]
    out = run_and_interrupt("reinformer_ag.py", *args, cwd=tmp_path, env=tiny_hopper, timeout=120)
    assert "--resume" in out
    run_dir = only_run_dir(tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert 0 < ckpt["counters"]["updates"] < 200 and "critic" in ckpt and "critic_optimizer" in ckpt
    run_script("reinformer_ag.py", "--resume", str(run_dir), "--no-progress", cwd=tmp_path, env=tiny_hopper)
    rows = read_metrics(run_dir)
    steps = [r["global_step"] for r in rows if "train/nll" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 200
    final = [r for r in rows if r["phase"] == "final"][-1]
    assert final["eval/return_mean"] == final["eval_rf/return_mean"]  # --ag-steps 0 is plain Reinformer


@pytest.mark.slow
@pytest.mark.parametrize("extra,needle", [
    (["--env-id", "hoper-medium-v2"], "hopper-medium-v2"),
    (["--resume", "does/not/exist"], "no config.json"),
    (["--eval-only", "does/not/exist"], "model.pt"),
    (["--env-id", "toy-ag-v0", "--ag-steps", "-1"], "--ag-steps"),
])
def test_bad_input_gives_one_clear_message(tiny_hopper, tmp_path, extra, needle):
    result = run_script("reinformer_ag.py", *extra, "--no-progress", cwd=tmp_path, env=tiny_hopper, check=False)
    assert_clear_error(result, needle)


@pytest.mark.slow
def test_nan_loss_stops_with_message(tiny_hopper, tmp_path):
    args = [*E2E, "--learning-rate", "1e30", "--critic-lr", "1e30", "--warmup-steps", "1", "--log-interval", "5"]
    result = run_script("reinformer_ag.py", *args, cwd=tmp_path, env=tiny_hopper, check=False)
    assert_clear_error(result, "Non-finite")


# --- the AG toy (AG §3.1, Figure 2): one state, r(a) = 1 − a², no data with |a| < 0.5 ---------------------
TOY = ["--env-id", "toy-ag-v0", "--seed", "1", "--embed-dim", "32", "--n-layers", "1", "--n-heads", "1",
       "--batch-size", "64", "--eval-interval", "5000", "--eval-episodes", "1", "--no-progress"]
# the toy's own defaults otherwise: 1500 updates, lr 1e-3, critic 256-256, AG n = 10, η = 0.3.
# Seeds 1 / 2 / 3 measured RF 0.56 / 0.53 / 0.55 and RF+AG 1.00 / 0.98 / 1.00.


@pytest.mark.slow
def test_toy_ag_rf_stays_in_the_data_ag_leaves_it(tmp_path):
    run_script("reinformer_ag.py", *TOY, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    final = [r for r in read_metrics(only_run_dir(tmp_path)) if r["phase"] == "final"][0]
    assert final["eval_rf/return_mean"] <= 0.8  # token prediction stays at a data action near a = 0.5
    assert final["eval/return_mean"] >= 0.95  # AG climbs the critic out of the data to the optimum a = 0
