"""Equation-level tests of odt.py (Online Decision Transformer, Zheng et al., arXiv 2202.05607) and of the blocks
it shares by design with dt_grpo.py / odt_td3.py / reinformer_ag.py (tests/test_shared_blocks.py).

Each test recomputes one equation or mechanism by hand on tiny inputs (or checks a behaviour with a margin):
the tanh-Gaussian policy (§4, eq. 2), the losses of eq. (7) and the dual (temperature) step, the update step
(grad-norm clip, warm-up, fresh gradients), the trajectory replay (Alg. 1, App. F Alg. 3: top-N init, FIFO
eviction, windows, padding, hindsight RTGs), the trainer's phases (Alg. 1: which replay each phase samples,
rounds, targets g_online / g_eval, seeds, evaluation schedule, checkpoints), the agent (RTG-conditioned
rollout) and the per-dataset table (App. C, Table C.4).
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import odt
from common.datasets import Episode, OfflineData

CPU = torch.device("cpu")


def tiny_model(seed=0, obs_dim=3, act_dim=2, timestep=False, max_ep_len=10) -> odt.DecisionTransformer:
    torch.manual_seed(seed)
    return odt.DecisionTransformer(obs_dim, act_dim, 16, 1, 2, 0.0, max_ep_len, timestep)


def padded_batch(obs_dim=3, act_dim=2, junk=True) -> dict[str, torch.Tensor]:
    """Three left-padded windows of K = 4 (2, 3 and 4 valid steps); the padded slots hold junk when `junk`."""
    gen = torch.Generator().manual_seed(0)
    valid = torch.tensor([[False, False, True, True], [False, True, True, True], [True, True, True, True]])
    rtg, states = torch.rand(3, 4, generator=gen), torch.randn(3, 4, obs_dim, generator=gen)
    actions = torch.rand(3, 4, act_dim, generator=gen) * 1.8 - 0.9
    steps = torch.arange(4).expand(3, -1)
    fill = (lambda x, v, value: torch.where(v, x, value)) if junk else (lambda x, v, value: x * v)
    return {"rtg": fill(rtg, valid, 5.0), "states": fill(states, valid[..., None], 5.0),
            "actions": fill(actions, valid[..., None], 0.99), "timesteps": steps * valid, "valid": valid}


# --- the tanh-squashed Gaussian policy (ODT §4, eq. 2) ------------------------------------------------------------
def test_gaussian_log_prob_is_the_diagonal_normal_density():
    """log N(x; μ, σ²) = Σ_d −½((x−μ)/σ)² − log σ − ½ log 2π, summed over action dimensions."""
    x, mu, log_std = [0.3, -1.2], [0.1, 0.4], [-0.5, 0.7]
    expected = sum(-0.5 * ((xi - m) / math.exp(s)) ** 2 - s - 0.5 * math.log(2 * math.pi)
                   for xi, m, s in zip(x, mu, log_std, strict=True))
    got = odt.gaussian_log_prob(torch.tensor([x]), torch.tensor([mu]), torch.tensor([log_std]))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tanh_log_det_is_log_of_one_minus_tanh_squared():
    """The change of variables of a = tanh(x): log |da/dx| = log(1 − tanh² x), at negative and positive x."""
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)
    torch.testing.assert_close(odt.tanh_log_det(x), torch.log(1 - torch.tanh(x) ** 2), rtol=1e-9, atol=1e-9)


def test_tanh_normal_log_prob_by_hand_and_both_sides_of_the_action_clamp():
    """log π(a) = Σ_d [log N(atanh a; μ, σ²) − log(1 − a²)]; actions are clamped into (−1+ε, 1−ε) on BOTH sides
    (ε = 1e-6) before atanh, so ±1 give the finite values of ±(1−ε)."""
    a, mu, log_std = [0.5, -0.25], [0.2, -0.1], [-0.3, 0.1]
    expected = sum(-0.5 * ((math.atanh(ai) - m) / math.exp(s)) ** 2 - s - 0.5 * math.log(2 * math.pi)
                   - math.log(1 - ai * ai) for ai, m, s in zip(a, mu, log_std, strict=True))
    lp = odt.tanh_normal_log_prob(torch.tensor([mu]), torch.tensor([log_std]), torch.tensor([a]))
    assert lp.item() == pytest.approx(expected, rel=1e-5)
    mu1, ls1 = torch.zeros(1, 1), torch.zeros(1, 1)
    lp_of = lambda v: odt.tanh_normal_log_prob(mu1, ls1, torch.tensor([[v]])).item()
    eps = odt.ACTION_EPS
    assert eps == 1e-6
    for edge in (1.0, -1.0):
        assert math.isfinite(lp_of(edge))
        assert lp_of(edge) == lp_of(math.copysign(1 - eps, edge))
        assert lp_of(math.copysign(1.5, edge)) == lp_of(edge)  # out-of-range data actions: clamped too
    # inside the clamp nothing changes: a = ±0.999 equals the hand formula
    for v in (0.999, -0.999):
        hand = -0.5 * math.atanh(v) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(1 - v * v)
        assert lp_of(v) == pytest.approx(hand, rel=1e-3)


def test_rsample_is_a_reparameterised_tanh_gaussian_with_its_own_log_prob():
    """a = tanh(μ + σ·ε), ε ~ N(0, I) drawn from torch's stream; its log-prob equals log π(a) of the same policy;
    the sample is differentiable in μ (da/dμ = 1 − a²)."""
    n = 4000
    mu = torch.tensor([0.3, -0.6]).repeat(n, 1).requires_grad_(True)
    log_std = torch.tensor([math.log(0.5), math.log(0.2)]).repeat(n, 1)
    torch.manual_seed(0)
    eps = torch.randn(n, 2)
    torch.manual_seed(0)
    a, lp = odt.tanh_normal_rsample(mu, log_std)
    torch.testing.assert_close(a, torch.tanh(mu + log_std.exp() * eps), rtol=1e-6, atol=1e-6)
    inside = (a.abs() < 0.99).all(-1)
    torch.testing.assert_close(lp[inside], odt.tanh_normal_log_prob(mu, log_std, a)[inside], rtol=1e-4, atol=1e-3)
    x = torch.atanh(a.detach())
    np.testing.assert_allclose(x.std(0).numpy(), [0.5, 0.2], rtol=0.05)
    a.sum().backward()
    torch.testing.assert_close(mu.grad, 1 - a.detach() ** 2, rtol=1e-5, atol=1e-6)


def test_log_std_squash_by_hand_and_its_two_bounds():
    """log σ = −5 + ½·(2 − (−5))·(tanh(x) + 1) (eq. 2): inside (−5, 2), reaching each bound on its own side."""
    x = torch.tensor([-0.7, 0.0, 0.3])
    expected = torch.tensor([-5 + 3.5 * (math.tanh(v) + 1) for v in (-0.7, 0.0, 0.3)])
    torch.testing.assert_close(odt.squash_log_std(x), expected)
    assert (odt.LOG_STD_MIN, odt.LOG_STD_MAX) == (-5.0, 2.0)
    assert odt.squash_log_std(torch.tensor(-50.0)).item() == pytest.approx(-5.0)
    assert odt.squash_log_std(torch.tensor(50.0)).item() == pytest.approx(2.0)
    model = tiny_model()
    h = torch.randn(5, 16) * 30  # large pre-activations: the squash must hold them inside the range
    mu, log_std = model.action_dist(h)
    torch.testing.assert_close(mu, model.mu_head(h))
    torch.testing.assert_close(log_std, odt.squash_log_std(model.log_std_head(h)))
    assert log_std.min() >= -5.0 and log_std.max() <= 2.0


def test_heads_start_small_and_embeddings_keep_their_default_init():
    """Init (docs/odt.md): μ and log-σ heads N(0, 0.02) with zero bias (not the reference's orthogonal init); GPT-2
    init inside the blocks (zero biases); the token embeddings keep PyTorch's default init (non-zero biases)."""
    torch.manual_seed(0)
    model = odt.DecisionTransformer(11, 3, 128, 2, 2, 0.0, 10, False)
    for head in (model.mu_head, model.log_std_head):
        assert not head.bias.any() and 0.015 < head.weight.std().item() < 0.025
    for block in model.blocks:
        assert not block.attn.qkv.bias.any() and not block.mlp[0].bias.any()
        assert 0.015 < block.attn.qkv.weight.std().item() < 0.025
    for emb in (model.embed_rtg, model.embed_state, model.embed_action):
        assert emb.bias.abs().min() > 0


# --- the transformer (shared): mask, attention, pre-LN blocks ----------------------------------------------------
def test_attention_mask_by_hand():
    """Token j is visible from token i iff j ≤ i (causal) and (j is a valid step's token or j = i), per window."""
    valid = torch.tensor([[False, True, True], [True, True, False]])
    mask = odt.attention_mask(valid)
    assert mask.shape == (2, 1, 9, 9)
    for b in range(2):
        tok = valid[b].repeat_interleave(3)
        expected = torch.tensor([[j <= i and (bool(tok[j]) or i == j) for j in range(9)] for i in range(9)])
        assert torch.equal(mask[b, 0], expected)


def test_dropout_is_inverted_dropout_in_training_only():
    """Dropout p (0.1 in the paper): in training each element is zeroed with probability p and the kept ones scaled
    by 1/(1 − p), so E[y] = x; in evaluation it is the identity."""
    torch.manual_seed(0)
    drop = odt.Dropout(0.25).train()
    y = drop(torch.ones(40_000))
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 4 / 3))
    x = torch.randn(5)
    assert torch.equal(drop.eval()(x), x)


def test_causal_self_attention_is_scaled_dot_product_softmax_by_hand():
    """y = proj(concat_h softmax(q_h k_hᵀ / √d_h, masked) v_h), computed in float64 by hand."""
    torch.manual_seed(0)
    attn = odt.CausalSelfAttention(8, 2, 0.0).double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = odt.attention_mask(torch.tensor([[False, True], [True, True]]))
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0  # √4
        logits = logits.masked_fill(~mask[:, 0], float("-inf"))
        heads.append(logits.softmax(-1) @ v[..., sl])
    expected = attn.proj(torch.cat(heads, -1))
    torch.testing.assert_close(attn(x, mask), expected)
    torch.testing.assert_close(attn(x, mask, slice(1, None, 3)), expected[:, 1::3])


def test_block_is_a_pre_layernorm_residual_block():
    """x' = x + attn(LN1 x); out = x' + MLP(LN2 x') (pre-LN GPT, Table C.1); `rows` only selects output rows."""
    torch.manual_seed(0)
    block = odt.Block(8, 2, 0.0).eval()
    for module in block.modules():  # non-trivial LayerNorm affine parameters
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    x = torch.randn(2, 6, 8) * 3 + 1
    mask = odt.attention_mask(torch.ones(2, 2, dtype=torch.bool))
    with torch.no_grad():
        h = x + block.attn(block.ln1(x), mask)
        expected = h + block.mlp(block.ln2(h))
        torch.testing.assert_close(block(x, mask), expected)
        torch.testing.assert_close(block(x, mask, rows=slice(1, None, 3)), expected[:, 1::3])
    relu = [m for m in block.mlp if isinstance(m, torch.nn.ReLU)]
    assert len(relu) == 1 and block.mlp[0].out_features == 32  # MLP 4·d with ReLU


# --- losses (eq. 7) and the dual step --------------------------------------------------------------------------
def test_odt_losses_equal_eq7_by_hand_with_padding_masked_in_every_statistic():
    """NLL = −Σ_valid log π(a|·)/n_valid, H = −Σ_valid log π(ã|·)/n_valid (one reparameterised sample ã per position),
    policy loss = NLL − λ·H with λ detached, dual loss = λ·(H − β) with H detached (raises λ when H < β). The
    padded slots hold junk: neither statistic may see them."""
    model = tiny_model()
    batch, beta, lam = padded_batch(), -2.0, 0.3
    log_t = torch.tensor(math.log(lam), requires_grad=True)
    with torch.no_grad():
        mu, log_std = model.action_dist(model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"],
                                              batch["valid"]))
    v = batch["valid"].float()
    nll = -(odt.tanh_normal_log_prob(mu, log_std, batch["actions"]) * v).sum() / v.sum()
    torch.manual_seed(7)
    entropy = -(odt.tanh_normal_rsample(mu, log_std)[1] * v).sum() / v.sum()
    torch.manual_seed(7)
    policy_loss, temperature_loss, stats = odt.odt_losses(model, log_t, batch, beta)
    assert stats["train/nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert stats["train/entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    assert stats["train/temperature"].item() == pytest.approx(lam, rel=1e-6)
    assert policy_loss.item() == pytest.approx((nll - lam * entropy).item(), rel=1e-5)
    assert temperature_loss.item() == pytest.approx(lam * (entropy.item() - beta), rel=1e-5)
    # dual gradient: d/d log λ [λ·(H − β)] = λ·(H − β); nothing of it reaches θ
    temperature_loss.backward(retain_graph=True)
    assert log_t.grad.item() == pytest.approx(lam * (entropy.item() - beta), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # the policy loss does not move λ (λ is detached in it)
    log_t.grad = None
    policy_loss.backward()
    assert log_t.grad is None or log_t.grad.item() == 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def update_setup(grad_clip=0.01, learning_rate=1e-3, warmup_steps=10, temperature_lr=0.01, beta=-2.0):
    model = tiny_model()
    args = odt.Args(grad_clip=grad_clip, target_entropy=beta)
    optimizer = odt.Lamb(odt.lamb_param_groups(model, 1e-3), lr=learning_rate)
    scheduler = odt.warmup_schedule(optimizer, warmup_steps)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    t_opt = torch.optim.Adam([log_t], lr=temperature_lr)
    return model, optimizer, scheduler, log_t, t_opt, args


@pytest.mark.parametrize("grad_clip", [0.01, 1e6])
def test_update_uses_this_batchs_policy_gradient_clipped_to_grad_clip(grad_clip):
    """update(): fresh gradients of this batch's policy loss (zeroed first, not accumulated over updates), global-norm
    clipped at --grad-clip (0.25 in the paper; 1e6: inactive), then the LAMB step and one warm-up scheduler step.
    Checked on the second update."""
    model, optimizer, scheduler, log_t, t_opt, args = update_setup(grad_clip=grad_clip)
    batch = padded_batch(junk=False)
    torch.manual_seed(1)
    odt.update(model, optimizer, scheduler, log_t, t_opt, batch, args)
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.grad = None  # deepcopy keeps the first update's gradients: the reference is this batch's loss alone
    torch.manual_seed(2)
    loss = odt.odt_losses(reference, log_t.detach().clone(), batch, args.target_entropy)[0]
    loss.backward()
    raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    assert 2 * 0.01 < raw < 1e6 / 2  # the small clip is active, the large one is not
    torch.manual_seed(2)
    odt.update(model, optimizer, scheduler, log_t, t_opt, batch, args)
    scale = min(1.0, grad_clip / raw.item())
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad * scale, rtol=1e-3, atol=1e-7)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(min(grad_clip, raw.item()), rel=1e-3)


def test_update_steps_warmup_and_takes_one_adam_step_on_log_temperature():
    """Each update steps the linear warm-up once (lr·min(1, (n+1)/W), App. C) and takes one Adam step on log λ
    (lr 1e-4 in the paper; here 0.01): the first Adam step moves log λ by −lr·sign(λ·(H − β))."""
    for beta, direction in ((-50.0, -1), (50.0, +1)):
        model, optimizer, scheduler, log_t, t_opt, args = update_setup(warmup_steps=10, beta=beta)
        stats = odt.update(model, optimizer, scheduler, log_t, t_opt, padded_batch(junk=False), args)
        assert stats["train/temperature"].item() == pytest.approx(0.1)  # λ before its step
        assert log_t.item() == pytest.approx(math.log(0.1) + direction * 0.01, abs=1e-6)
    for _ in range(2):
        odt.update(model, optimizer, scheduler, log_t, t_opt, padded_batch(junk=False), args)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * 4 / 10] * 2)


# --- trajectory replay (Alg. 1, App. F) ---------------------------------------------------------------------------
def counting_episode(n, start=0.0, reward=None) -> Episode:
    """obs_t = [start + t, 10 + t], action [t/10], reward_t = t + 1 (or `reward`), terminal at the end."""
    t = np.arange(n, dtype=np.float32)
    obs = np.stack([start + t, 10 + t], axis=1)
    rewards = t + 1 if reward is None else np.full(n, reward, np.float32)
    return Episode(observations=obs, actions=(t / 10)[:, None], rewards=rewards.astype(np.float32),
                   terminals=np.eye(n, dtype=bool)[-1], truncations=np.zeros(n, bool), next_observations=obs + 1)


def test_replay_windows_hold_normalised_states_scaled_rtgs_clipped_timesteps_and_zero_padding():
    """A window (App. F, Alg. 3): contiguous steps of ONE trajectory; states (s − mean)/std with the frozen offline
    statistics, the stored actions, RTG = suffix sum of that trajectory's achieved rewards × rtg_scale, timesteps
    clipped to max_ep_len − 1; padded slots (left) are zero in every field, not only masked."""
    mean, std = np.array([1.0, 2.0], np.float32), np.array([2.0, 4.0], np.float32)
    replay = odt.TrajectoryReplay(4, mean, std, 0.1, 3, CPU)
    replay.add(counting_episode(5))
    replay.add(counting_episode(4, start=100.0))
    batch = replay.sample(400, 3, np.random.default_rng(0))
    valid = batch["valid"].numpy()
    obs0 = np.rint(batch["states"][..., 0].numpy() * 2 + 1).astype(int)  # invert the normalisation of obs[0]
    suffix = {0: np.array([15.0, 14.0, 12.0, 9.0, 5.0]), 1: np.array([10.0, 9.0, 7.0, 4.0])}
    for b in range(400):
        traj, s = obs0[b][valid[b]] // 100, obs0[b][valid[b]] % 100
        n = len(suffix[traj[0]])
        assert (traj == traj[0]).all() and np.array_equal(s, np.arange(s[0], s[0] + len(s)))
        assert len(s) == min(3, n - s[0])
        np.testing.assert_allclose(batch["states"][b][valid[b]].numpy(),
                                   (np.stack([100 * traj + s, 10 + s], 1) - mean) / std, rtol=1e-6)
        np.testing.assert_allclose(batch["actions"][b, valid[b], 0].numpy(), s / 10, rtol=1e-6)
        np.testing.assert_allclose(batch["rtg"][b][valid[b]].numpy(), 0.1 * suffix[traj[0]][s], rtol=1e-6)
        assert np.array_equal(batch["timesteps"][b][valid[b]].numpy(), np.minimum(s, 2))
    pad = ~valid
    assert pad.any() and set(np.unique(obs0[valid])) == set(range(5)) | set(range(100, 104))
    for key in ("states", "actions"):
        assert not batch[key].numpy()[pad].any(), key
    assert not batch["rtg"].numpy()[pad].any() and not batch["timesteps"].numpy()[pad].any()


def test_replay_samples_trajectories_added_after_a_sample():
    """The flat tensors are rebuilt after every add: a trajectory that arrived (or replaced another) since the last
    batch is sampled, the evicted one never again."""
    replay = odt.TrajectoryReplay(2, np.zeros(2, np.float32), np.ones(2, np.float32), 1.0, 10, CPU)
    replay.add(counting_episode(3, start=0.0))
    replay.add(counting_episode(3, start=100.0))
    rng = np.random.default_rng(0)
    replay.sample(8, 2, rng)
    replay.add(counting_episode(3, start=200.0))  # evicts the first (start 0)
    starts = replay.sample(256, 1, rng)["states"][:, 0, 0].numpy() // 100
    assert set(starts.tolist()) == {1.0, 2.0}


def test_fifo_eviction_replaces_the_oldest_over_several_wraps():
    """§4.1: new trajectories replace the oldest entries, first in first out, wrapping around the capacity."""
    replay = odt.TrajectoryReplay(3, np.zeros(2, np.float32), np.ones(2, np.float32), 1.0, 10, CPU)
    order = []
    for i in range(8):
        replay.add(counting_episode(2, reward=float(i)))
        order = (order + [i])[-3:]
        assert sorted(t["rewards"][0] for t in replay.trajectories) == order
    assert [t["rewards"][0] for t in replay.trajectories] == [6.0, 7.0, 5.0]


# --- the trainer: phases, replays, targets, seeds (Alg. 1) -------------------------------------------------------
class StepsEnv(gym.Env):
    """Never terminates (the registered TimeLimit of 5 steps ends it: a truncation); obs [t, 1], reward 1 + a."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 1.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t, 1.0], np.float32), 1.0 + float(np.asarray(action).reshape(-1)[0]), False, False, {}


STEPS_ENV = "OdtEquationsSteps-v0"
if STEPS_ENV not in gym.registry:
    gym.register(id=STEPS_ENV, entry_point=StepsEnv, max_episode_steps=5)
OFFLINE_REWARDS = [[1, 1], [5, 5, 5], [0, 0, 0, 0], [3, 3, 3], [9, 9]]  # returns 2, 15, 0, 9, 18


def steps_data() -> OfflineData:
    episodes = []
    for rewards in OFFLINE_REWARDS:
        n = len(rewards)
        obs = np.stack([np.arange(n), np.ones(n)], 1).astype(np.float32)
        episodes.append(Episode(observations=obs, actions=np.zeros((n, 1), np.float32),
                                rewards=np.array(rewards, np.float32), terminals=np.eye(n, dtype=bool)[-1],
                                truncations=np.zeros(n, bool), next_observations=obs + 1))
    return OfflineData(env_id="odt-equations-steps", gym_id=STEPS_ENV, family="other", dataset_kind="",
                       episodes=episodes, state_mean=np.zeros(2, np.float32), state_std=np.ones(2, np.float32),
                       ref_min_score=None, ref_max_score=None, source="test")


TRAINER_ARGS = dict(embed_dim=16, n_layers=1, n_heads=1, dropout=0.0, batch_size=8, context_len=3, eval_context_len=2,
                    learning_rate=1e-3, weight_decay=1e-3, warmup_steps=4, buffer_size=3, rtg_scale=0.1, g_eval=7.0,
                    g_online=11.0, use_timestep_embedding=False, eval_episodes=2, updates_per_round=2,
                    online_steps=15, eval_interval=10, pretrain_updates=3, progress=False, save_model=False,
                    target_entropy=-1.0, cuda=False, precision="fp32", init_temperature=0.2, temperature_lr=3e-3,
                    seed=3, checkpoint_interval=1000)


def make_trainer(run_dir, **kw) -> odt.Trainer:
    return odt.Trainer(odt.Args(**{**TRAINER_ARGS, **kw}), steps_data(), CPU, run_dir, None)


def returns_of(replay) -> list[float]:
    return [float(t["rewards"].sum()) for t in replay.trajectories]


def test_trainer_builds_the_papers_optimisers_and_top_n_replay(tmp_path):
    """Trainer init: LAMB with the weight decay on matrices only and the warm-up's first lr (1/W of the base), log λ
    at log init_temperature with its own Adam (lr --temperature-lr), the offline replay holding every offline
    trajectory, the online replay of --buffer-size holding the top-N by return in ascending order (§4.1), so FIFO
    evicts the worst first; max_ep_len from the env's time limit."""
    t = make_trainer(tmp_path)
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [1e-3, 0.0]
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([1e-3 / 4] * 2)
    assert t.log_temperature.item() == pytest.approx(math.log(0.2))
    assert t.temperature_optimizer.param_groups[0]["params"][0] is t.log_temperature
    assert t.temperature_optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)
    assert returns_of(t.offline) == [2.0, 15.0, 0.0, 9.0, 18.0]
    assert t.replay.capacity == 3 and returns_of(t.replay) == [9.0, 15.0, 18.0]
    assert t.max_ep_len == 5
    t.replay.add(counting_episode(2, reward=100.0))
    t.replay.add(counting_episode(2, reward=200.0))
    assert sorted(returns_of(t.replay)) == [18.0, 200.0, 400.0]  # the two worst offline ones went first


def test_trainer_model_follows_the_flags_and_window_sampling_follows_the_seed(tmp_path):
    """The model is built from --embed-dim/--n-layers/--n-heads/--dropout and the per-dataset timestep-embedding
    switch (App. B: off for Gym, on for AntMaze; max_ep_len rows); windows are drawn from a generator seeded with
    --seed: the same seed gives the same batches, another seed others."""
    t = make_trainer(tmp_path, embed_dim=8, n_layers=2, n_heads=2, dropout=0.25, use_timestep_embedding=True)
    assert len(t.model.blocks) == 2 and t.model.blocks[0].attn.n_heads == 2
    assert t.model.embed_ln.normalized_shape == (8,)
    assert t.model.drop.p == 0.25 and t.model.blocks[0].mlp[-1].p == 0.25
    assert t.model.embed_timestep is not None and t.model.embed_timestep.num_embeddings == 5
    t.logger.close()
    assert make_trainer(tmp_path).model.embed_timestep is None
    trainers = [make_trainer(tmp_path, seed=s) for s in (4, 4, 5)]
    batches = [tr.offline.sample_indices(16, 3, tr.rng)[0] for tr in trainers]
    assert np.array_equal(batches[0], batches[1]) and not np.array_equal(batches[0], batches[2])


def test_args_defaults_are_the_papers_common_hyperparameters():
    """Tables C.1/C.3 and §4: 4 layers, 4 heads, dropout 0.1, batch 256, grad clip 0.25, 10k warm-up steps, 300 updates
    between rollouts, λ₀ = 0.1 with Adam lr 1e-4 on log λ, 200k online steps (Table 5.1), one episode per round."""
    a = odt.Args()
    assert (a.n_layers, a.n_heads, a.dropout, a.batch_size) == (4, 4, 0.1, 256)
    assert (a.grad_clip, a.warmup_steps) == (0.25, 10_000)
    assert (a.updates_per_round, a.init_temperature, a.temperature_lr, a.online_steps) == (300, 0.1, 1e-4, 200_000)
    assert a.min_steps_per_round is None and a.target_entropy is None and a.eval_episodes == 10


def test_mixed_length_data_is_not_a_one_step_dataset():
    """Only data whose every episode is one step gets the one-step defaults (context 1, data-derived scale)."""
    data = TableData("hopper", "medium")
    data.episodes = data.episodes + [Episode(observations=np.zeros((1, 1), np.float32),
                                             actions=np.zeros((1, 3), np.float32), rewards=np.ones(1, np.float32),
                                             terminals=np.ones(1, bool), truncations=np.zeros(1, bool),
                                             next_observations=np.zeros((1, 1), np.float32))]
    args = odt.apply_dataset_defaults(odt.Args(), data)
    assert (args.context_len, args.rtg_scale, args.g_eval) == (20, 1e-3, 3600)


def record_calls(monkeypatch, name):
    calls, original = [], getattr(odt, name)

    def wrapper(envs, agent, seeds, *a, **kw):
        calls.append({"sample": agent.sample, "target": agent.target, "seeds": list(seeds),
                      "context": agent.context_len})
        return original(envs, agent, seeds, *a, **kw)

    monkeypatch.setattr(odt, name, wrapper)
    return calls


def test_explore_rolls_out_sampled_actions_on_g_online_with_fresh_seeds(tmp_path, monkeypatch):
    """Alg. 1 line 4: each round rolls out whole episodes (ended by the 5-step time limit) with SAMPLED actions,
    conditioned on g_online × rtg_scale, until --min-steps-per-round new steps; episode i of round r resets with
    online_episode_seed(seed, r, i), never an evaluation seed; the round and its env steps are counted."""
    calls = record_calls(monkeypatch, "rollout")
    t = make_trainer(tmp_path, min_steps_per_round=7)
    episodes = t.explore()
    assert [len(e.rewards) for e in episodes] == [5, 5] and len(t.replay) == 3  # the loop adds them, not explore
    assert t.counters["env_steps"] == 10 and t.counters["rounds"] == 1 and t.counters["round_updates_left"] == 0
    assert t.counters["round"]["rollout/length"] == 5.0
    assert t.counters["round"]["rollout/return"] == pytest.approx(np.mean([e.rewards.sum() for e in episodes]))
    t.explore()
    assert [c["seeds"] for c in calls] == [[odt.online_episode_seed(3, r, i)] for r in (0, 1) for i in (0, 1)]
    assert all(c["sample"] and c["target"] == pytest.approx(11.0 * 0.1) and c["context"] == 2 for c in calls)
    assert not {c["seeds"][0] for c in calls} & set(odt.eval_seeds(3, 2))


def test_a_round_adds_every_episode_to_the_fifo_replay_then_takes_updates_per_round_steps(tmp_path, monkeypatch):
    """Alg. 1 lines 4-6: every episode of a round enters the online FIFO replay (not the offline data), evicting
    the oldest (here the worst offline ones, 9 and 15); then exactly --updates-per-round updates on that replay,
    however many episodes the round took; a stop mid-round leaves the rest of the round's updates to do, which the
    resumed loop does without a new rollout or a second evaluation of the pretrained policy."""
    t = make_trainer(tmp_path, min_steps_per_round=7, pretrain_updates=0, online_steps=10, updates_per_round=3)
    seen, evaluated, stop = [], [], type("Stop", (), {"requested": False})()

    def train_step(source):
        seen.append((source is t.replay, returns_of(source)))
        t.counters["updates"] += 1
        stop.requested = len(seen) == 2

    monkeypatch.setattr(t, "train_step", train_step)
    monkeypatch.setattr(t, "evaluate", lambda: evaluated.append(t.counters["env_steps"]) or {
        "eval/return_mean": 0.0, "eval/normalized_score_mean": 0.0})
    odt.train(t, stop)
    assert [s[0] for s in seen] == [True, True] and t.counters["round_updates_left"] == 1 and evaluated == [0]
    online = seen[0][1]
    assert len(online) == 3 and 18.0 in online and 9.0 not in online and 15.0 not in online
    assert all(len(tr["rewards"]) == 5 for tr in t.replay.trajectories[:2]) and len(t.offline) == 5
    stop.requested = False
    odt.train(t, stop)  # the resumed loop finishes the round: one update, no new episode
    assert len(seen) == 3 and t.counters["round_updates_left"] == 0 and t.counters["rounds"] == 1
    assert t.counters["env_steps"] == 10 and evaluated == [0, 10]  # after pretraining, after the last round


def test_evaluation_uses_the_mean_action_on_g_eval_and_the_same_fixed_seeds(tmp_path, monkeypatch):
    """Evaluation (§4): deterministic tanh(μ), conditioned on g_eval × rtg_scale, one episode per fixed seed
    eval_seeds(seed, n), the same at every evaluation."""
    calls = record_calls(monkeypatch, "evaluate")
    t = make_trainer(tmp_path)
    first, second = t.evaluate(), t.evaluate()
    assert first["eval/return_mean"] == second["eval/return_mean"] and first["eval/length_mean"] == 5
    assert [c["seeds"] for c in calls] == [odt.eval_seeds(3, 2)] * 2
    assert all(not c["sample"] and c["target"] == pytest.approx(7.0 * 0.1) for c in calls)


def test_phases_sample_their_replays_with_k_and_rounds_do_updates_per_round(tmp_path, monkeypatch):
    """Alg. 1: pretraining samples the offline data (all of it), finetuning the online FIFO replay; windows of the
    training context K; each round (one episode here) is followed by --updates-per-round updates; evaluations after
    pretraining, whenever the env-step counter passes a multiple of --eval-interval, and at the end."""
    t = make_trainer(tmp_path)
    sampled, evaluated = [], []
    original = odt.TrajectoryReplay.sample

    def sample(self, batch_size, context_len, rng):
        sampled.append(("offline" if self is t.offline else "online" if self is t.replay else "?", context_len))
        return original(self, batch_size, context_len, rng)

    monkeypatch.setattr(odt.TrajectoryReplay, "sample", sample)
    monkeypatch.setattr(t, "evaluate", lambda: evaluated.append(t.counters["env_steps"]) or {
        "eval/return_mean": 0.0, "eval/return_std": 0.0, "eval/normalized_score_mean": 0.0,
        "eval/normalized_score_std": 0.0, "eval/length_mean": 5.0})
    stop = type("Stop", (), {"requested": False})()
    odt.train(t, stop)
    t.logger.close()
    assert sampled == [("offline", 3)] * 3 + [("online", 3)] * 6
    assert (t.counters["updates"], t.counters["rounds"], t.counters["env_steps"]) == (9, 3, 15)
    assert evaluated == [0, 10, 15]


def test_checkpoint_restores_temperature_its_optimiser_replay_and_counters(tmp_path):
    """Checkpoints hold log λ and its Adam state (the reference forgets them), the replay and the counters:
    a resumed trainer continues with the same λ, not init_temperature."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    t = make_trainer(tmp_path / "a")
    for episode in t.explore():
        t.replay.add(episode)
    for _ in range(2):
        t.train_step(t.replay)
    state = copy.deepcopy(t.state_dict())
    resumed = odt.Trainer(t.args, steps_data(), CPU, tmp_path / "b", state)
    assert resumed.log_temperature.item() == pytest.approx(t.log_temperature.item())
    assert resumed.log_temperature.item() != pytest.approx(math.log(0.2))
    assert resumed.temperature_optimizer.state_dict()["state"][0]["step"] == 2
    assert returns_of(resumed.replay) == returns_of(t.replay) and resumed.replay.next_slot == t.replay.next_slot
    assert resumed.counters["updates"] == 2 and resumed.counters["env_steps"] == 5
    for p, q in zip(resumed.model.parameters(), t.model.parameters(), strict=True):
        assert torch.equal(p, q)
    t.logger.close()
    resumed.logger.close()


# --- the agent (shared with dt_grpo): what the model sees during a rollout -------------------------------------------
def test_agent_normalises_states_windows_the_context_and_acts_with_tanh_mean_or_a_sample():
    """DTAgent: the model sees (s − mean)/std and the last eval_context_len steps with their timesteps; evaluation
    acts with tanh(μ), exploration with a = tanh(μ + σ·ε)."""
    torch.manual_seed(0)
    model = odt.DecisionTransformer(2, 1, 16, 1, 2, 0.0, 10, True)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append([x.clone() for x in inputs]))
    args = odt.Args(eval_context_len=2, rtg_scale=0.5)
    mean, std = np.array([1.0, -2.0], np.float32), np.array([2.0, 0.5], np.float32)
    for sample in (False, True):
        agent = odt.DTAgent(model, args, mean, std, 4.0, sample=sample, device=CPU, max_ep_len=10)
        obs_seq = [np.array([[t + 0.5, -t]], np.float32) for t in range(5)]
        agent.reset(obs_seq[0])
        seen.clear()
        executed = []
        for t, obs in enumerate(obs_seq):
            torch.manual_seed(100 + t)
            action = agent.act(obs)
            agent.observe(np.array([1.0], np.float32))
            rtg, states, actions, steps, valid = seen[-1]
            lo = max(0, t - 1)
            assert states.shape[1] == t + 1 - lo
            # the context holds the actions taken at the earlier steps (a_t itself is not known yet: zero)
            np.testing.assert_allclose(actions[0, :-1].numpy(), np.array(executed[lo:t]).reshape(-1, 1), rtol=1e-6)
            assert not actions[0, -1].any()
            executed.append(action[0].copy())
            expected_states = np.stack([(o[0] - mean) / std for o in obs_seq[lo:t + 1]])
            np.testing.assert_allclose(states[0].numpy(), expected_states, rtol=1e-6)
            assert steps[0].tolist() == list(range(lo, t + 1))
            with torch.no_grad():
                model.eval()
                mu, log_std = model.action_dist(model(rtg, states, actions, steps, valid)[:, -1])
            if sample:
                torch.manual_seed(100 + t)
                expected = odt.tanh_normal_rsample(mu, log_std)[0]
            else:
                expected = torch.tanh(mu)
            np.testing.assert_allclose(action, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_agent_plays_episodes_longer_than_max_ep_len_with_clipped_timesteps():
    """Envs without a time limit can run past max_ep_len: the agent's buffers grow and the timestep token stays at
    max_ep_len − 1 (the embedding's last row)."""
    from common.evaluation import make_vector_env, rollout

    torch.manual_seed(0)
    model = odt.DecisionTransformer(2, 1, 16, 1, 2, 0.0, 3, True)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[3].clone()))
    agent = odt.DTAgent(model, odt.Args(eval_context_len=2, rtg_scale=0.5), np.zeros(2, np.float32),
                        np.ones(2, np.float32), 4.0, sample=False, device=CPU, max_ep_len=3)
    result = rollout(make_vector_env(StepsEnv, 1), agent, [0], max_steps=7)
    assert result.lengths[0] == 7
    assert [s[0].tolist() for s in seen][-3:] == [[2, 2], [2, 2], [2, 2]]


class RenderSteps(StepsEnv):
    """StepsEnv that renders (its step count) and refuses to be stepped past twice its 5-step time limit."""

    def __init__(self, render_mode=None):
        super().__init__()
        self.render_mode = render_mode

    def render(self):
        return np.full((2, 2, 3), self.t, np.uint8)

    def step(self, action):
        assert self.t < 10, "stepped far past the time limit"
        return super().step(action)


def test_video_episode_ends_at_the_time_limit(tmp_path, monkeypatch):
    """--capture-video records one evaluation episode: it ends when the env terminates OR is truncated by its time
    limit (here after 5 steps: 6 frames), and starts from the first evaluation seed's reset."""
    import imageio.v2

    saved = {}
    monkeypatch.setattr(imageio.v2, "mimsave", lambda path, frames, fps: saved.update(
        path=path, frames=[int(f[0, 0, 0]) for f in frames]))
    make_env = lambda render_mode=None: gym.wrappers.TimeLimit(RenderSteps(render_mode), max_episode_steps=5)
    agent = odt.DTAgent(tiny_model(obs_dim=2, act_dim=1), odt.Args(eval_context_len=2, rtg_scale=0.5),
                        np.zeros(2, np.float32), np.ones(2, np.float32), 4.0, sample=False, device=CPU, max_ep_len=5)
    odt.run.record_video(make_env, agent, seed=odt.eval_seeds(1, 1)[0], path=tmp_path / "eval.mp4")
    assert saved.get("frames") == [0, 1, 2, 3, 4, 5] and saved.get("path") == tmp_path / "eval.mp4"


# --- per-dataset defaults (App. C, Table C.4) ---------------------------------------------------------------------
TABLE_C4 = {  # pretraining updates, buffer, embedding, lr, weight decay, eval context, g_eval, g_online, position
    "hopper-medium": (5000, 1000, 512, 1e-4, 5e-4, 5, 3600, 7200, False),
    "hopper-medium-replay": (5000, 1000, 512, 2e-3, 1e-4, 5, 3600, 7200, False),
    "walker2d-medium": (10000, 1000, 512, 1e-3, 1e-3, 5, 5000, 10000, False),
    "walker2d-medium-replay": (10000, 1000, 512, 1e-3, 1e-3, 5, 5000, 10000, False),
    "halfcheetah-medium": (5000, 1000, 512, 1e-4, 5e-4, 5, 6000, 12000, False),
    "halfcheetah-medium-replay": (5000, 1000, 512, 1e-4, 5e-4, 5, 6000, 12000, False),
    "ant-medium": (10000, 1000, 512, 1.5e-3, 1e-4, 1, 6000, 12000, False),
    "ant-medium-replay": (10000, 1000, 512, 1e-4, 5e-4, 1, 6000, 12000, False),
    "antmaze-umaze": (7000, 1500, 512, 1e-3, 0.0, 5, 1, 2, True),
    "antmaze-umaze-diverse": (7000, 1500, 1024, 1e-3, 0.0, 5, 1, 2, True),
}
FIELDS = ("pretrain_updates", "buffer_size", "embed_dim", "learning_rate", "weight_decay", "eval_context_len",
          "g_eval", "g_online", "use_timestep_embedding")


class TableData:
    def __init__(self, family, kind, act_dim=3, ref_max=None):
        self.family, self.dataset_kind, self.act_dim, self.ref_max_score = family, kind, act_dim, ref_max
        obs = np.zeros((2, 1), np.float32)
        self.episodes = [Episode(observations=obs, actions=np.zeros((2, act_dim), np.float32),
                                 rewards=np.ones(2, np.float32), terminals=np.array([False, True]),
                                 truncations=np.zeros(2, bool), next_observations=obs)]


@pytest.mark.parametrize("name", list(TABLE_C4))
def test_per_dataset_defaults_are_table_c4(name):
    """Every row of Table C.4 (finetuning), plus K = 20, RTG scale 0.001 for Gym and 1 for AntMaze, β = −dim(A);
    any explicit flag wins over the table."""
    family, kind = name.split("-", 1)
    act_dim = 8 if family.startswith("ant") else 6
    args = odt.apply_dataset_defaults(odt.Args(), TableData(family, kind, act_dim))
    assert tuple(getattr(args, f) for f in FIELDS) == TABLE_C4[name]
    assert args.context_len == 20 and args.target_entropy == -act_dim
    assert args.rtg_scale == (1.0 if family == "antmaze" else 1e-3)
    explicit = dict(pretrain_updates=1, buffer_size=2, embed_dim=8, learning_rate=0.5, weight_decay=0.25,
                    eval_context_len=3, g_eval=-1.0, g_online=-2.0, use_timestep_embedding=not TABLE_C4[name][-1],
                    rtg_scale=0.125, context_len=4, target_entropy=0.5)
    args = odt.apply_dataset_defaults(odt.Args(**explicit), TableData(family, kind, act_dim))
    assert {k: getattr(args, k) for k in explicit} == explicit


@pytest.mark.parametrize("family,kind,row", [("hopper", "random", "hopper-medium"), ("walker2d", "expert",
                                                                                     "walker2d-medium"),
                                             ("halfcheetah", "medium-expert", "halfcheetah-medium"),
                                             ("antmaze", "large-play", "antmaze-umaze")])
def test_unlisted_datasets_use_their_family_row(family, kind, row):
    """Datasets Table C.4 does not list take their family's medium row (DATASET_DEFAULTS comment)."""
    args = odt.apply_dataset_defaults(odt.Args(), TableData(family, kind))
    assert tuple(getattr(args, f) for f in FIELDS) == TABLE_C4[row]


def test_unknown_family_conditions_on_the_expert_return_and_explores_at_twice_it():
    """App. D: without a table row, g_eval = the reference max score and g_online = 2 × it; without one, an error."""
    args = odt.apply_dataset_defaults(odt.Args(), TableData("pen", "human", act_dim=24, ref_max=3000.0))
    assert (args.g_eval, args.g_online, args.target_entropy) == (3000.0, 6000.0, -24.0)
    with pytest.raises(odt.run.UserError, match="g-eval"):
        odt.apply_dataset_defaults(odt.Args(), TableData("pen", "human"))
