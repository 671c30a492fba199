"""Mechanism tests shared by the decision-transformer scripts (issue 9): return conditioning and state
magnitude reach the policy, LAMB moves tensors that start at zero and equals the reference rule, hindsight
relabeling, the rollout's RTG countdown, the entropy term's sign and padding outside the losses.

Every test goes through the scripts' own classes and functions (models, replays, `update`, agents,
`common.evaluation.rollout`); only the reference LAMB rule is transcribed here, to compare against.
"""

from __future__ import annotations

import copy
import json
import math
import signal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import dt_grpo
import odt
import odt_td3
import reinformer_ag as rf
from common import run
from common.datasets import Episode
from common.evaluation import make_vector_env, rollout
from common.toys import vitamin_reward

CPU = torch.device("cpu")
ONE, ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


# --- helpers: a one-step dataset r = c + a, and a multi-step env with known rewards ---------------------------
def one_step_episodes(n=256, offset=1.0, seed=0) -> list[Episode]:
    """n one-step episodes, observation [1], action a ~ U[0, 1], reward offset + a (issue 9's problem)."""
    actions = np.random.default_rng(seed).uniform(0.0, 1.0, n).astype(np.float32)
    obs = np.ones((1, 1), np.float32)
    return [Episode(observations=obs, actions=np.array([[a]], np.float32), rewards=np.array([offset + a], np.float32),
                    terminals=np.ones(1, bool), truncations=np.zeros(1, bool), next_observations=obs) for a in actions]


class OffsetEnv(gym.Env):
    """The environment of `one_step_episodes`: one step, reward offset + a."""

    def __init__(self, offset=1.0):
        self.offset = offset
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.ones(1, np.float32), {}

    def step(self, action):
        return np.ones(1, np.float32), self.offset + float(np.asarray(action).reshape(-1)[0]), True, False, {}


class CountEnv(gym.Env):
    """Six steps, observation [t, 1], reward 1 + t + a_0 (depends on the action, so the achieved return is not
    known in advance); terminates after the sixth step."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 1.0], np.float32), {}

    def step(self, action):
        reward = 1.0 + self.t + float(np.asarray(action).reshape(-1)[0])
        self.t += 1
        return np.array([self.t, 1.0], np.float32), reward, self.t == 6, False, {}


def suffix_sums(rewards) -> np.ndarray:
    return np.cumsum(np.asarray(rewards, np.float64)[::-1])[::-1]


TINY = dict(embed_dim=32, n_layers=1, n_heads=2, batch_size=64, learning_rate=3e-3, weight_decay=5e-4,
            warmup_steps=10, grad_clip=0.25, context_len=1, eval_context_len=1, dropout=0.0)


def odt_setup(seed=0, rtg_scale=0.5, **kw):
    torch.manual_seed(seed)
    args = odt.Args(**{**TINY, "rtg_scale": rtg_scale, "target_entropy": -1.0, **kw})
    model = odt.DecisionTransformer(1, 1, args.embed_dim, args.n_layers, args.n_heads, args.dropout, 10, False)
    optimizer = odt.Lamb(odt.lamb_param_groups(model, args.weight_decay), lr=args.learning_rate, eps=1e-8)  # as main
    scheduler = odt.warmup_schedule(optimizer, args.warmup_steps)
    log_t = torch.tensor(math.log(args.init_temperature), requires_grad=True)
    t_opt = torch.optim.Adam([log_t], lr=args.temperature_lr, betas=(0.9, 0.999))
    return args, model, optimizer, scheduler, log_t, t_opt


def odt_replay(episodes, rtg_scale, obs_dim=1):
    replay = odt.TrajectoryReplay(len(episodes), np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32),
                                  rtg_scale, 10, CPU)
    for e in episodes:
        replay.add(e)
    return replay


def td3_setup(seed=0, rtg_scale=0.5, **kw):
    torch.manual_seed(seed)
    args = odt_td3.Args(**{**TINY, "rtg_scale": rtg_scale, "policy_interval": 1, "gamma": 0.99, "q_normalize": False,
                           "supervised_coef": 1.0, "reward_shift": 0.0, "critic_lr": 1e-3, **kw})
    model = odt_td3.DecisionTransformer(1, 1, args.embed_dim, args.n_layers, args.n_heads, args.dropout, 10, False)
    critic = odt_td3.Critic(1, 1, 32, layer_norm=False)
    optimizer = odt_td3.Lamb(odt_td3.lamb_param_groups(model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
    scheduler = odt_td3.warmup_schedule(optimizer, args.warmup_steps)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr)
    return args, model, copy.deepcopy(model), critic, copy.deepcopy(critic), optimizer, scheduler, critic_optimizer


def td3_hyper(args, alpha: float) -> dict:
    """odt_td3.td3_update's hyperparameters, as odt_td3's Trainer passes them from its flags."""
    return dict(alpha=alpha, supervised_coef=args.supervised_coef, q_normalize=args.q_normalize, gamma=args.gamma,
                tau=args.tau, policy_noise=args.policy_noise, noise_clip=args.noise_clip, grad_clip=args.grad_clip,
                bf16_targets=args.bf16_targets)


def td3_replay(episodes, rtg_scale, obs_dim=1, reward_shift=0.0):
    replay = odt_td3.TrajectoryReplay(len(episodes), np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32),
                                      rtg_scale, 10, CPU, reward_shift)
    for e in episodes:
        replay.add(e)
    return replay


class RFData:
    """What reinformer_ag.OfflineDataset reads from an OfflineData."""

    def __init__(self, episodes):
        self.episodes, self.state_mean, self.state_std = episodes, ZERO, ONE


def rf_setup(seed=0, rtg_scale=0.5, **kw):
    torch.manual_seed(seed)
    args = rf.Args(**{**TINY, "rtg_scale": rtg_scale, "target_entropy": -1.0, "critic_batch_size": 64, **kw})
    model = rf.Reinformer(1, 1, args.embed_dim, args.n_layers, args.n_heads, args.dropout, 10, False)
    critic = rf.IQLCritic(1, 1, 32)
    optimizer = rf.Lamb(rf.lamb_param_groups(model, args.weight_decay), lr=args.learning_rate, eps=1e-8)  # as main
    scheduler = rf.warmup_schedule(optimizer, args.warmup_steps)
    log_t = torch.tensor(math.log(args.init_temperature), requires_grad=True)
    t_opt = torch.optim.Adam([log_t], lr=args.temperature_lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    return args, model, critic, optimizer, scheduler, log_t, t_opt, critic_optimizer


def rf_update(model, optimizer, scheduler, log_t, t_opt, critic, critic_opt, data, rng, args):
    """One update as reinformer_ag's training loop makes it: Reinformer on windows, then IQL on transitions."""
    windows = data.sample(args.batch_size, args.context_len, rng)
    rf.reinformer_update(model, optimizer, scheduler, log_t, t_opt, windows, expectile=args.expectile,
                         target_entropy=args.target_entropy, grad_clip=args.grad_clip)
    for _ in range(args.critic_updates):
        rf.iql_update(critic, critic_opt, data.sample_transitions(args.critic_batch_size, rng), gamma=args.gamma,
                      expectile=args.iql_expectile, polyak=args.polyak)


# --- (a) return conditioning after pretraining, on r = c + a --------------------------------------------------
C = 1.0
UPDATES = 250  # at lr 3e-3: the gap between the two targets' actions is > 0.5 from ~200 updates on
TARGETS = (C + 0.25, C + 0.85)


def conditioned_returns(make_agent) -> list[float]:
    """Deterministic one-step rollouts in OffsetEnv conditioned on each target: the return is c + action."""
    envs = make_vector_env(OffsetEnv, 1)
    return [float(rollout(envs, make_agent(target), [0]).returns[0]) for target in TARGETS]


def assert_follows_the_target(returns):
    gap = returns[1] - returns[0]
    assert gap > 0.3 and all(abs(r - t) < 0.15 for r, t in zip(returns, TARGETS, strict=True)), returns


def test_odt_action_follows_the_return_it_is_conditioned_on():
    args, model, optimizer, scheduler, log_t, t_opt = odt_setup()
    replay, rng = odt_replay(one_step_episodes(), args.rtg_scale), np.random.default_rng(0)
    for _ in range(UPDATES):
        odt.update(model, optimizer, scheduler, log_t, t_opt, replay.sample(args.batch_size, 1, rng), args)
    assert_follows_the_target(conditioned_returns(
        lambda target: odt.DTAgent(model, args, ZERO, ONE, target, sample=False, device=CPU, max_ep_len=10)))


def test_odt_td3_action_follows_the_return_it_is_conditioned_on():
    args, model, model_t, critic, critic_t, optimizer, scheduler, critic_opt = td3_setup()
    replay, rng = td3_replay(one_step_episodes(), args.rtg_scale), np.random.default_rng(0)
    for _ in range(UPDATES):  # pretraining: α = 0 (Table 9), the transformer is trained by the MSE alone
        odt_td3.td3_update(model, model_t, critic, critic_t, optimizer, scheduler, critic_opt,
                           [replay.sample(args.batch_size, 1, rng)], **td3_hyper(args, alpha=0.0))
    assert_follows_the_target(conditioned_returns(
        lambda target: odt_td3.DTAgent(model, args, ZERO, ONE, target, noise=0.0, device=CPU, max_ep_len=10)))


def test_reinformer_target_conditioning_follows_the_target():
    args, model, critic, optimizer, scheduler, log_t, t_opt, critic_opt = rf_setup()
    data, rng = rf.OfflineDataset(RFData(one_step_episodes()), args.rtg_scale, 10, CPU), np.random.default_rng(0)
    for _ in range(UPDATES):
        rf_update(model, optimizer, scheduler, log_t, t_opt, critic, critic_opt, data, rng, args)

    def agent(target):
        a = copy.copy(args)
        a.conditioning, a.g_eval = "target", target
        return rf.RFAgent(model, critic, a, ZERO, ONE, CPU, 10, -ONE, ONE, 0, 0.0)

    assert_follows_the_target(conditioned_returns(agent))


# --- (a) at the paper's size, at initialisation: the return token and the state's norm reach the policy -------
def paper_size_model(script):
    torch.manual_seed(0)
    if script is rf:
        return rf.Reinformer(11, 3, 256, 4, 8, 0.1, 1000, False).eval()  # Reinformer's hopper size
    return script.DecisionTransformer(11, 3, 512, 4, 4, 0.1, 1000, False).eval()  # ODT Table C.1


def return_tokens(script, model, rtg):
    """The embedded, LayerNormed RTG tokens (what the first block sees), one per value of `rtg`."""
    if script is rf:
        trunk = model.trunk
        return trunk.embed_ln(trunk.embed_rtg(rtg[:, None]) + trunk.embed_timestep(torch.zeros_like(rtg).long()))
    return model.embed_ln(model.embed_rtg(rtg[:, None]))


def policy_mean(script, model, rtg, states):
    """The action mean for one-step windows (B,) rtg, (B, S) states."""
    steps = torch.zeros(len(rtg), 1, dtype=torch.long)
    actions = torch.zeros(len(rtg), 1, 3)
    if script is rf:
        return model.predict_action(rtg[:, None], states[:, None], actions, steps)[:, 0]
    h = model(rtg[:, None], states[:, None], actions, steps, torch.ones(len(rtg), 1, dtype=torch.bool))[:, 0]
    return model.mu_head(h)


SCRIPTS = [pytest.param(m, id=m.__name__) for m in (odt, odt_td3, dt_grpo, rf)]


@pytest.mark.parametrize("script", SCRIPTS)
@torch.no_grad()
def test_return_and_state_norm_reach_the_policy_at_initialisation(script):
    """Issue 9: with zero-bias embeddings LayerNorm(W·R) = LayerNorm(W·cR), so R = 0.01 and R = 3.6 (hopper's
    10 and 3600 × 0.001) gave the same token (cosine 1.0) and |μ(s) − μ(2s)| ≈ 2e-5."""
    model = paper_size_model(script)
    for small in (0.01, 0.25):
        low, high = return_tokens(script, model, torch.tensor([small, 3.6]))
        assert torch.nn.functional.cosine_similarity(low, high, dim=0) < 0.95, small
    states = torch.randn(64, 11, generator=torch.Generator().manual_seed(1))
    rtg = torch.full((64,), 1.0)
    mu1, mu2 = policy_mean(script, model, rtg, states), policy_mean(script, model, rtg, 2 * states)
    assert (mu1 - mu2).abs().mean() > 1e-2  # ≥ 0.02 measured; 2.5e-4 with zero-bias embeddings
    mu_low = policy_mean(script, model, torch.full((64,), 0.25), states)
    mu_high = policy_mean(script, model, torch.full((64,), 3.6), states)
    assert (mu_low - mu_high).abs().mean() > 1e-2


# --- (b) LAMB: tensors that start at zero move, and the multi-tensor step is the reference rule --------------
def zero_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if not p.detach().any()}


def assert_moved(zeros: dict[str, torch.Tensor], lr: float, n_steps: int):
    """Each tensor that started at zero has moved by > 10·lr·√numel after `n_steps` Adam-sized steps (under the
    trust ratio it moves by lr·‖w‖ per step after the first, i.e. stays at ≈ lr·√numel)."""
    assert zeros
    small = {name: round(p.norm().item() / (lr * math.sqrt(p.numel())), 2) for name, p in zeros.items()
             if p.norm() <= 10 * lr * math.sqrt(p.numel())}
    assert not small, f"in units of lr·√numel after {n_steps} steps: {small}"


N_LAMB = 60


def target_action_episodes() -> list[Episode]:
    """One-step data whose action is always 0.9, far from the initial policy's: a gradient of constant sign."""
    episodes = one_step_episodes(n=64)
    for e in episodes:
        e.actions[:] = 0.9
    return episodes


def test_lamb_moves_zero_initialised_tensors_odt():
    args, model, optimizer, scheduler, log_t, t_opt = odt_setup(learning_rate=1e-3, warmup_steps=1)
    zeros = zero_tensors(model)
    assert any("ln" in n for n in zeros) and any("head.bias" in n for n in zeros)  # LayerNorm and head biases
    batch = odt_replay(target_action_episodes(), args.rtg_scale).sample(64, 1, np.random.default_rng(0))
    for _ in range(N_LAMB):
        odt.update(model, optimizer, scheduler, log_t, t_opt, batch, args)
    assert_moved(zeros, args.learning_rate, N_LAMB)


def test_lamb_moves_zero_initialised_tensors_odt_td3():
    args, model, model_t, critic, critic_t, optimizer, scheduler, critic_opt = td3_setup(learning_rate=1e-3,
                                                                                         warmup_steps=1)
    zeros = zero_tensors(model)
    batch = td3_replay(target_action_episodes(), args.rtg_scale).sample(64, 1, np.random.default_rng(0))
    for _ in range(N_LAMB):
        odt_td3.td3_update(model, model_t, critic, critic_t, optimizer, scheduler, critic_opt, [batch],
                           **td3_hyper(args, alpha=0.0))
    assert_moved(zeros, args.learning_rate, N_LAMB)


def test_lamb_moves_zero_initialised_tensors_reinformer():
    """Includes the state-independent log-std, which starts at 0 (issue 9: the same trap under LAMB)."""
    args, model, critic, optimizer, scheduler, log_t, t_opt, critic_opt = rf_setup(learning_rate=1e-3, warmup_steps=1)
    zeros = zero_tensors(model)
    assert "log_std" in zeros
    data = rf.OfflineDataset(RFData(target_action_episodes()), args.rtg_scale, 10, CPU)
    for _ in range(N_LAMB):
        rf_update(model, optimizer, scheduler, log_t, t_opt, critic, critic_opt, data, np.random.default_rng(0), args)
    assert_moved(zeros, args.learning_rate, N_LAMB)


@pytest.mark.parametrize("script", SCRIPTS)
def test_lamb_without_weight_decay_is_adam(script):
    """weight_decay 0 (AntMaze, Table C.4): no trust ratio, so the step is bias-corrected Adam's: a tensor that
    starts at zero moves by ≈ lr per element per step under a constant gradient."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = script.Lamb([w], lr=0.01, weight_decay=0.0)
    for _ in range(20):
        w.grad = torch.tensor([0.1, -0.2, 0.3, -0.05])  # global norm < 1: no clipping
        opt.step()
    torch.testing.assert_close(w.detach(), -0.2 * w.grad.sign(), rtol=1e-5, atol=1e-6)


def reference_lamb_step(params, grads, state, groups, max_grad_norm=1.0, betas=(0.9, 0.999), eps=1e-8):
    """The LAMB rule as the ODT reference runs it (timm's Lamb: bias_correction, grad_averaging, no trust clip),
    one tensor at a time: global grad-norm clip, bias-corrected Adam, decoupled weight decay, trust ratio
    ‖w‖/‖update‖ only where weight decay ≠ 0 (1 where either norm is 0)."""
    beta1, beta2 = betas
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    clip = norm / max_grad_norm if norm > max_grad_norm else 1.0
    for group in groups:
        group["step"] = group.get("step", 0) + 1
        bc1, bc2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
        for i in group["idx"]:
            p, g = params[i], grads[i] / clip
            m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            state[i] = (m, v)
            update = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)
            if group["weight_decay"] != 0:
                update = update + group["weight_decay"] * p
                w_norm, u_norm = p.norm(), update.norm()
                update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            params[i] = p - group["lr"] * update


@pytest.mark.parametrize("script", SCRIPTS)
def test_multi_tensor_lamb_equals_the_reference_rule_float64(script):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4, 4), (6,), (3,), (2, 2)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    init[1].zero_()  # a matrix at zero in the decay group: trust ratio 1
    init[3].zero_()  # a bias at zero in the Adam group
    params = [torch.nn.Parameter(x.clone()) for x in init]
    groups = [{"idx": [0, 1, 4], "lr": 0.01, "weight_decay": 0.01}, {"idx": [2, 3], "lr": 0.02, "weight_decay": 0.0}]
    opt = script.Lamb([{"params": [params[i] for i in g["idx"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                       for g in groups], lr=1.0)
    ref_params, ref_state = [x.clone() for x in init], {}
    for step, scale in enumerate([0.1, 3.0, 0.5, 10.0, 0.01, 1.0]):  # global norms below and above the 1.0 clip
        grads = [scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        reference_lamb_step(ref_params, grads, ref_state, groups)
        for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
            torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12, msg=f"tensor {i}, step {step}")
    assert all(not torch.equal(p.detach(), x) for p, x in zip(params, init, strict=True))  # every tensor moved


# --- (c) hindsight relabeling and the rollout's RTG countdown ------------------------------------------------
TARGET = 1000.0  # far above anything CountEnv gives (≤ 6 + 15 + 6 = 27)
SCALE = 0.01


def count_agent(script, model):
    if script is odt:
        args = odt.Args(eval_context_len=3, rtg_scale=SCALE)
        return odt.DTAgent(model, args, np.zeros(2, np.float32), np.ones(2, np.float32), TARGET,
                           sample=True, device=CPU, max_ep_len=10)
    args = odt_td3.Args(eval_context_len=3, rtg_scale=SCALE, reward_shift=0.5)
    return odt_td3.DTAgent(model, args, np.zeros(2, np.float32), np.ones(2, np.float32), TARGET,
                           noise=0.3, device=CPU, max_ep_len=10)


def small_dt(script):
    torch.manual_seed(0)
    return script.DecisionTransformer(2, 1, 16, 1, 2, 0.0, 10, False)


DT_SCRIPTS = [pytest.param(odt, id="odt"), pytest.param(odt_td3, id="odt_td3")]


@pytest.mark.parametrize("script", DT_SCRIPTS)
def test_rollout_conditions_on_target_minus_rewards_so_far(script):
    """RTG_0 = g·scale, RTG_{t+1} = RTG_t − r_t·scale (odt_td3: r_t + reward_shift), as the model sees it at every
    step of a real 6-step rollout in two envs (window of 3)."""
    model = small_dt(script)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    agent = count_agent(script, model)
    result = rollout(make_vector_env(CountEnv, 2), agent, [0, 1], record=True)
    assert len(seen) == 6 and (result.lengths == 6).all()
    shift = getattr(agent, "reward_shift", 0.0)
    for env, ep in enumerate(result.episodes):
        expected = TARGET * SCALE - SCALE * np.concatenate(([0.0], np.cumsum(ep.rewards.astype(np.float64) + shift)))
        for t, rtg in enumerate(seen):
            lo = max(0, t - 2)
            np.testing.assert_allclose(rtg[env].numpy(), expected[lo:t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(result.episodes[0].rewards, result.episodes[1].rewards)  # the envs really differ


@pytest.mark.parametrize("script", DT_SCRIPTS)
def test_online_episode_is_replayed_with_its_achieved_returns_to_go(script):
    """Hindsight relabeling (ODT Alg. 2): an episode rolled out conditioned on g = 1000 is trained on the return
    it achieved: every RTG token the replay samples is the achieved suffix sum × scale, never the target's."""
    agent = count_agent(script, small_dt(script))
    episode = rollout(make_vector_env(CountEnv, 1), agent, [0], record=True).episodes[0]
    shift = getattr(agent, "reward_shift", 0.0)
    if script is odt:
        replay = odt_replay([episode], SCALE, obs_dim=2)
    else:
        replay = td3_replay([episode], SCALE, obs_dim=2, reward_shift=shift)
    batch = replay.sample(256, 4, np.random.default_rng(0))
    achieved = suffix_sums(episode.rewards + shift) * SCALE
    valid = batch["valid"]
    steps = batch["timesteps"][valid].numpy()
    assert set(steps.tolist()) == set(range(6))
    np.testing.assert_allclose(batch["rtg"][valid].numpy(), achieved[steps], rtol=1e-5, atol=1e-6)
    assert achieved[0] < 0.5 * TARGET * SCALE


@pytest.mark.parametrize("script", DT_SCRIPTS)
def test_main_trains_online_episodes_on_achieved_returns(script, tmp_path, monkeypatch):
    """The same through `main` on the vitamin toy (r = f(a), one step, target g_online = 1): every window the
    online phase trains on has RTG token = f(its action) × scale, never g_online × scale."""
    batches = []
    original = script.TrajectoryReplay.sample

    def recording_sample(self, *a, **kw):
        batch = original(self, *a, **kw)
        batches.append((self.capacity, batch))
        return batch

    monkeypatch.setattr(script.TrajectoryReplay, "sample", recording_sample)
    monkeypatch.chdir(tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = script.main(script.Args(
            env_id="toy-vitamin-v0", embed_dim=16, n_layers=1, n_heads=1, batch_size=32, pretrain_updates=2,
            online_steps=12, updates_per_round=1, eval_episodes=1, eval_interval=1000, warmup_steps=1,
            progress=False, save_model=False, cuda=False, **({"min_steps_per_round": 0} if script is odt_td3 else {})))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert summary["counters"]["env_steps"] >= 12
    online = [b for cap, b in batches if cap != 128]  # the offline replay holds exactly the 128 toy episodes
    assert len(online) >= 12
    actions = torch.cat([b["actions"][b["valid"]] for b in online])[:, 0].numpy()
    rtg = torch.cat([b["rtg"][b["valid"]] for b in online]).numpy()
    assert ((actions > -0.95) & (actions < 0.5)).any()  # online actions: the toy's data has none in (−0.95, 0.5)
    # rtg_scale of a one-step dataset with |r| ≤ 1 and max score 1 is 1 (one_step_defaults)
    np.testing.assert_allclose(rtg, vitamin_reward(np.clip(actions, -1, 1)), rtol=1e-4, atol=1e-4)
    assert not np.isclose(rtg, 1.0).any()


# --- (c) the entropy term's sign, and padding outside the losses -------------------------------------------
def test_odt_entropy_bonus_raises_the_policy_std():
    """Eq. (7): the policy minimises NLL − λ·H. With λ = 10 fixed (temperature lr 0) the entropy term dominates
    and a few updates raise log σ; with the sign flipped they would lower it."""
    args, model, optimizer, scheduler, log_t, _ = odt_setup(learning_rate=1e-3, warmup_steps=1)
    with torch.no_grad():
        log_t.fill_(math.log(10.0))
        model.log_std_head.bias.fill_(-0.5)  # σ ≈ 0.04: H of the tanh-Gaussian grows with σ (it would not near σ ≈ 1)
    frozen = torch.optim.Adam([log_t], lr=0.0)
    # a constant data action: the NLL alone would shrink σ
    batch = odt_replay(target_action_episodes(), args.rtg_scale).sample(64, 1, np.random.default_rng(0))

    def mean_log_std():
        with torch.no_grad():
            h = model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"], batch["valid"])
            return model.action_dist(h)[1].mean().item()

    before = mean_log_std()
    entropies = [odt.update(model, optimizer, scheduler, log_t, frozen, batch, args)["train/entropy"].item()
                 for _ in range(20)]
    assert mean_log_std() > before + 0.1
    assert np.mean(entropies[-5:]) > np.mean(entropies[:5])
    assert log_t.exp().item() == pytest.approx(10.0)


def test_reinformer_entropy_bonus_raises_the_log_std():
    args, model, critic, optimizer, scheduler, log_t, _, critic_opt = rf_setup(learning_rate=1e-3, warmup_steps=1)
    with torch.no_grad():
        log_t.fill_(math.log(10.0))
    data = rf.OfflineDataset(RFData(target_action_episodes()), args.rtg_scale, 10, CPU)  # NLL alone: σ shrinks
    frozen, rng = torch.optim.Adam([log_t], lr=0.0), np.random.default_rng(0)
    for _ in range(20):
        rf_update(model, optimizer, scheduler, log_t, frozen, critic, critic_opt, data, rng, args)
    assert model.log_std.item() > 0.01  # starts at 0; ≈ 20 Adam steps of lr 1e-3 upwards


def padded_batch(model_dim=3):
    """Two left-padded windows of 4 steps (2 and 3 valid), and the same windows without their padding."""
    gen = torch.Generator().manual_seed(0)
    rtg, states = torch.rand(2, 4, generator=gen), torch.randn(2, 4, model_dim, generator=gen)
    actions = torch.rand(2, 4, 1, generator=gen) * 1.8 - 0.9
    valid = torch.tensor([[False, False, True, True], [False, True, True, True]])
    steps = torch.arange(4).expand(2, -1)
    batch = {"rtg": rtg * valid, "states": states * valid[..., None], "actions": actions * valid[..., None],
             "timesteps": steps * valid, "valid": valid}
    trimmed = [{"rtg": rtg[i:i + 1, 4 - n:], "states": states[i:i + 1, 4 - n:], "actions": actions[i:i + 1, 4 - n:],
                "timesteps": steps[i:i + 1, 4 - n:], "valid": torch.ones(1, n, dtype=torch.bool)}
               for i, n in enumerate((2, 3))]
    filled = dict(batch, rtg=torch.where(valid, rtg, 5.0), states=torch.where(valid[..., None], states, 5.0),
                  actions=torch.where(valid[..., None], actions, 0.99))  # junk in the padded slots
    return batch, trimmed, filled


def test_odt_nll_counts_valid_steps_only():
    torch.manual_seed(0)
    model = odt.DecisionTransformer(3, 1, 16, 1, 2, 0.0, 10, False)
    log_t = torch.tensor(math.log(0.1))
    nll = lambda b: odt.odt_losses(model, log_t, b, -1.0)[2]["train/nll"].item()
    batch, trimmed, filled = padded_batch()
    expected = (2 * nll(trimmed[0]) + 3 * nll(trimmed[1])) / 5  # mean over the 5 valid steps
    assert nll(batch) == pytest.approx(expected, rel=1e-5)
    assert nll(filled) == pytest.approx(expected, rel=1e-5)


def test_odt_td3_losses_count_valid_steps_only():
    """Every loss and statistic of td3_update (actor MSE and RL term, critic loss, mean Q) averages over the valid
    steps only: padded windows give the step-weighted mean of their trimmed parts, junk in the padding changes
    nothing."""
    torch.manual_seed(0)
    model = odt_td3.DecisionTransformer(3, 1, 16, 1, 2, 0.0, 10, False)
    critic = odt_td3.Critic(3, 1, 16, False)
    args = odt_td3.Args(supervised_coef=1.0, q_normalize=False, gamma=0.9, policy_noise=0.0, bf16_targets=False)

    def stats(b):  # one td3_update at learning rate 0, on copies: the losses of batch b as the networks stand
        b = dict(b, rewards=b["rtg"] - 0.5, dones=torch.zeros_like(b["rtg"]), next_states=b["states"].flip(-1),
                 next_rtg=b["rtg"] * 0.5, next_timesteps=b["timesteps"] + 1)
        m, c = copy.deepcopy(model), copy.deepcopy(critic)
        opt = odt_td3.Lamb(odt_td3.lamb_param_groups(m, 0.0), lr=0.0)
        out = odt_td3.td3_update(m, copy.deepcopy(m).eval(), c, copy.deepcopy(c), opt, odt_td3.warmup_schedule(opt, 1),
                                 torch.optim.AdamW(c.parameters(), lr=0.0), [b], **td3_hyper(args, alpha=0.5))
        return {k: v.item() for k, v in out.items()}

    batch, trimmed, filled = padded_batch()
    parts = [stats(t) for t in trimmed]
    for key in ("train/supervised_loss", "train/actor_rl_loss", "train/critic_loss", "train/q_mean"):
        expected = (2 * parts[0][key] + 3 * parts[1][key]) / 5
        assert stats(batch)[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
        assert stats(filled)[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key


# --- the cheaper CPU dropout (issue 12): same distribution as nn.Dropout, same attention math -----------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_each_element_with_probability_1_minus_p_and_rescales(dtype):
    torch.manual_seed(0)
    drop = odt.Dropout(0.1).train()
    x = torch.ones(4, 250_000, dtype=dtype, requires_grad=True)
    y = drop(x)
    assert y.dtype == dtype
    kept = (y != 0).float()
    # Each of the four 16-bit lanes of a 64-bit draw must be uniform: a 63-bit draw leaves one lane never dropped.
    for lane in range(4):
        assert abs(kept.view(-1, 4)[:, lane].mean().item() - 0.9) < 0.003
    assert torch.allclose(y[y != 0].float(), torch.full_like(y[y != 0].float(), 1 / 0.9), rtol=1e-2)
    assert abs(y.float().mean().item() - 1.0) < 0.005  # inverted dropout: unbiased in expectation
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)  # the backward pass uses the forward's mask
    assert not torch.equal(drop(x) != 0, y != 0)  # a fresh mask per call
    drop.eval()
    assert drop(x) is x


def test_attention_without_dropout_equals_the_fused_kernel():
    """On CPU attention is computed explicitly (for the cheaper dropout, and faster at ≤ 60 tokens); it must
    equal torch's fused kernel, with the padding mask and without a mask (= causal, Reinformer's windows)."""
    torch.manual_seed(0)
    attn = odt.CausalSelfAttention(32, 4, dropout=1e-9)  # p rounds to 0 masks: nothing dropped, scale 1
    x = torch.randn(3, 12, 32)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1, :2] = False

    def fused(mask):
        q, k, v = attn.qkv(x).view(3, 12, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return attn.proj(y.transpose(1, 2).reshape(3, 12, 32))

    for mask in (odt.attention_mask(valid), None):
        for mode in (attn.train, attn.eval):
            assert torch.allclose(mode()(x, mask), fused(mask), atol=1e-5)
    assert torch.allclose(fused(None), fused(odt.attention_mask(torch.ones(3, 4, dtype=torch.bool))), atol=1e-5)
    # The accelerator path (torch's kernel, forced here on CPU), also with only some query rows computed.
    for mask in (odt.attention_mask(valid), None):
        for rows in (None, slice(1, None, 3)):
            explicit = attn.eval()(x, mask, rows)
            attn.fused = True
            assert torch.allclose(attn(x, mask, rows), explicit, atol=1e-5)
            attn.fused = None
    assert torch.allclose(attn(x, None, slice(1, None, 3)), attn(x, None)[:, 1::3], atol=1e-5)


@pytest.mark.parametrize("script", [odt, odt_td3, dt_grpo])
def test_last_block_computing_only_state_rows_changes_nothing(script):
    """The last block computes only the state-token rows (the heads read nothing else): the outputs must
    equal a full pass over every token, read at the state tokens."""
    torch.manual_seed(0)
    model = script.DecisionTransformer(4, 2, 32, 2, 2, 0.1, 100, True).eval()
    b, k = 3, 5
    rtg, states, actions = torch.randn(b, k), torch.randn(b, k, 4), torch.randn(b, k, 2)
    steps, valid = torch.arange(k).repeat(b, 1), torch.ones(b, k, dtype=torch.bool)
    valid[0, :2] = False
    tokens = torch.stack((model.embed_rtg(rtg.unsqueeze(-1)), model.embed_state(states),
                          model.embed_action(actions)), dim=2) + model.embed_timestep(steps).unsqueeze(2)
    x = model.embed_ln(tokens.reshape(b, 3 * k, -1))
    mask = script.attention_mask(valid)
    for block in model.blocks:
        x = block(x, mask)
    full = model.ln_f(x).reshape(b, k, 3, -1)[:, :, 1]
    assert torch.allclose(model(rtg, states, actions, steps, valid), full, atol=1e-5)


# --- shared bookkeeping: seeds, intervals, returns-to-go, one-step defaults (every script's copy) ---------------
ALL_SCRIPTS = [pytest.param(m, id=m.__name__) for m in (odt, odt_td3, dt_grpo, rf)]


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_evaluation_seeds_are_fixed_distinct_and_per_run(script):
    """Evaluation resets each of its n episodes with its own fixed seed (the same at every evaluation of a run);
    another run seed evaluates other episodes; online episodes (DT scripts) never reuse an evaluation seed and
    differ across rounds and across the episodes of a round (ODT Alg. 1, fixed-seed evaluation of docs/odt.md)."""
    seeds = script.eval_seeds(1, 10)
    assert seeds == script.eval_seeds(1, 10) and len(set(seeds)) == 10
    assert not set(seeds) & set(script.eval_seeds(2, 10))
    assert script.eval_seeds(1, 3) == seeds[:3]  # the first episodes keep their seeds when n grows
    if hasattr(script, "online_episode_seed"):
        online = [script.online_episode_seed(s, r, i) for s in (1, 2) for r in range(40) for i in range(4)]
        assert len(set(online)) == len(online)
        assert not set(online) & {x for s in (1, 2) for x in script.eval_seeds(s, 10)}
        assert script.online_episode_seed(1, 7, 2) == script.online_episode_seed(1, 7, 2)  # the same after a resume


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_interval_fires_once_per_multiple_counted_from_its_start(script):
    """`Interval(every, start).due(n)`: True once each time n passes a multiple of `every`, the multiples at or
    below `start` (already done before a resume) excluded."""
    interval = script.run.Interval(10, start=0)
    assert [interval.due(n) for n in (3, 9, 10, 10, 12, 19, 20, 35, 36, 40)] == \
        [False, False, True, False, False, False, True, True, False, True]
    resumed = script.run.Interval(10, start=25)
    assert [resumed.due(n) for n in (26, 29, 30, 31, 40)] == [False, False, True, False, True]


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_returns_to_go_are_exact_suffix_sums_accumulated_in_float64(script):
    """R_t = Σ_{t' ≥ t} r_t' (ODT §3), accumulated in float64: float32 sums would lose the 1 next to 1e8."""
    rewards = np.array([1e8, 1.0, -1e8, 2.0], np.float32)
    rtg = script.returns_to_go(rewards)
    assert rtg.dtype == np.float32
    np.testing.assert_array_equal(rtg, np.array([3.0, -1e8 + 3.0, -1e8 + 2.0, 2.0], np.float32))
    np.testing.assert_allclose(script.returns_to_go(np.array([0.5, -1.0, 2.0], np.float32)), [1.5, 1.0, 2.0])


class OneStepData:
    def __init__(self, returns, ref_max):
        self.episodes, self.ref_max_score = [Episode(observations=np.ones((1, 1), np.float32),
                                                     actions=np.zeros((1, 1), np.float32),
                                                     rewards=np.array([r], np.float32), terminals=np.ones(1, bool),
                                                     truncations=np.zeros(1, bool),
                                                     next_observations=np.ones((1, 1), np.float32))
                                             for r in returns], ref_max


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_one_step_defaults_scale_every_return_and_the_target_into_unit_range(script):
    """one_step_defaults: rtg_scale = 1/max(|R| over the data, |target|), the target = the env's max score where it
    states one, else the best data return; g_eval = g_online = the target."""
    d = script.one_step_defaults(OneStepData([0.1, 0.5, -0.25], ref_max=2.0))
    assert d == pytest.approx(dict(rtg_scale=0.5, g_eval=2.0, g_online=2.0))
    d = script.one_step_defaults(OneStepData([0.1, 0.5, -4.0], ref_max=None))
    assert d == pytest.approx(dict(rtg_scale=0.25, g_eval=0.5, g_online=0.5))


# --- shared run bookkeeping: validation, presets, metrics, RNG state, resumed logs -----------------------------
def test_validate_args_rejects_each_flag_below_its_minimum_and_accepts_it_at_the_minimum():
    """Every numeric flag is checked against VALID_MIN before any work (values at the minimum pass), dropout must be
    in [0, 1) and embed_dim divisible by n_heads."""
    odt.run.validate_args(odt.Args(**odt.VALID_MIN, dropout=0.0), odt.VALID_MIN)
    for name, low in odt.VALID_MIN.items():
        below = low - 1 if isinstance(low, int) else low / 2 if low > 0 else -1e-3
        with pytest.raises(odt.run.UserError, match=name.replace("_", "-")):
            odt.run.validate_args(odt.Args(**{name: below}), odt.VALID_MIN)
    for bad in (dict(dropout=1.0), dict(dropout=-0.1), dict(embed_dim=10, n_heads=4)):
        with pytest.raises(odt.run.UserError):
            odt.run.validate_args(odt.Args(**bad), odt.VALID_MIN)


def test_cpu_preset_changes_only_flags_left_at_their_defaults():
    """--preset cpu applies PRESETS["cpu"] to every field still at its default; explicit flags win."""
    args = odt.run.apply_preset(odt.Args(preset="cpu", batch_size=7), None, odt.PRESETS)
    assert args.batch_size == 7 and args.embed_dim == odt.PRESETS["cpu"]["embed_dim"]
    assert args.n_layers == odt.PRESETS["cpu"]["n_layers"] and args.online_steps == odt.PRESETS["cpu"]["online_steps"]
    assert odt.run.apply_preset(odt.Args(preset="paper"), None, odt.PRESETS).embed_dim is None
    typed = odt.run.apply_preset(odt.Args(preset="cpu", batch_size=256), {"batch_size"}, odt.PRESETS)  # at default
    assert typed.batch_size == 256 and typed.embed_dim == odt.PRESETS["cpu"]["embed_dim"]


def test_stats_meter_rows_are_means_over_the_updates_since_the_last_row():
    meter = odt.run.StatsMeter()
    for value, seconds in ((1.0, 0.5), (3.0, 1.5)):
        meter.add({"a": torch.tensor(value), "b": torch.tensor(2 * value)}, seconds)
    assert meter.updates_per_second() == pytest.approx(1.0)
    assert meter.pop() == pytest.approx({"a": 2.0, "b": 4.0})
    meter.add({"a": torch.tensor(5.0), "b": torch.tensor(0.0)}, 1.0)
    assert meter.pop() == pytest.approx({"a": 5.0, "b": 0.0})  # the previous row's updates are gone
    with pytest.raises(run.NonFiniteLossError):
        odt.run.check_finite({"a": 1.0, "b": float("nan")}, {"updates": 3}, Path("."))
    odt.run.check_finite({"a": 1.0}, {"updates": 3}, Path("."))


def test_rng_state_round_trip_replays_numpy_torch_and_python_draws():
    """Checkpoints carry the window generator and the global torch/python RNG: a resumed run draws the same."""
    import random

    rng = np.random.default_rng(0)
    state = copy.deepcopy(odt.run.rng_state(rng))
    first = (rng.random(3), torch.rand(3), random.random())
    odt.run.restore_rng_state(rng, state)
    second = (rng.random(3), torch.rand(3), random.random())
    np.testing.assert_array_equal(first[0], second[0])
    assert torch.equal(first[1], second[1]) and first[2] == second[2]


def test_resumed_run_logger_drops_rows_written_after_the_checkpoint(tmp_path):
    args = odt.Args()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"global_step": s}) + "\n" for s in (1, 5, 9, 12)))
    logger = odt.run.RunLogger(tmp_path, args, {"updates": 9})
    logger.log({"global_step": 10})
    logger.close()
    steps = [json.loads(line)["global_step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 5, 9, 10]


def test_update_puts_the_model_in_training_mode_and_the_agent_in_evaluation_mode():
    """Dropout is on while training (update() calls model.train() even after an evaluation) and off while acting
    (the agent calls model.eval()): the same observation gives the same deterministic action twice."""
    args, model, optimizer, scheduler, log_t, t_opt = odt_setup(dropout=0.5)
    batch = odt_replay(one_step_episodes(n=16), args.rtg_scale).sample(16, 1, np.random.default_rng(0))
    model.eval()
    odt.update(model, optimizer, scheduler, log_t, t_opt, batch, args)
    assert model.training
    agent = odt.DTAgent(model, args, ZERO, ONE, 1.0, sample=False, device=CPU, max_ep_len=10)
    actions = []
    for _ in range(2):
        agent.reset(np.ones((1, 1), np.float32))
        actions.append(agent.act(np.ones((1, 1), np.float32)))
    assert not model.training
    np.testing.assert_array_equal(actions[0], actions[1])
