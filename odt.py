"""Online Decision Transformer (ODT).

Paper: Q. Zheng, A. Zhang, A. Grover, "Online Decision Transformer", ICML 2022, arXiv 2202.05607 (§4, Alg. 1-2,
App. C). Offline pretraining of a stochastic, return-conditioned decision transformer, then online finetuning:
roll out an episode conditioned on a high target return, store it in a trajectory FIFO replay with its achieved
returns-to-go (hindsight relabeling), and take 300 max-entropy sequence-modeling updates (eqs. 3-7) per rollout.

Usage:
    python odt.py --env-id hopper-medium-v2              # paper hyperparameters (Tables C.1-C.4)
    python odt.py --env-id hopper-random-v2 --help       # every flag, with its per-dataset default
    python odt.py --resume runs/<run folder>             # continue a stopped run

Deliberate differences from the reference implementation (github.com/facebookresearch/online-dt):
- Compact pre-LN GPT instead of HuggingFace GPT-2, initialised as the reference; no state/return heads
  (loss weight 0 there).
- μ and log-σ heads: N(0, 0.02) weights, zero biases; the reference's orthogonal init starts the NLL near 1e4.
- LAMB: vectors (biases, LayerNorm gains) get no weight decay or trust ratio, which keeps zero-init ones near 0.
- The entropy term averages over valid positions only (the reference includes padding).
- Checkpoints hold log λ, its optimiser, the replay and RNG states: a stopped run resumes exactly.
- Fixed evaluation seeds; online episode seeds from the round counter: the same episodes after a resume.
- Data: Minari / D4RL files / local generation on Gymnasium MuJoCo v5, not D4RL on mujoco-py.
- Dropout masks on CPU draw 16-bit uniforms (p rounded to a multiple of 2^-16), see the `Dropout` class;
  attention is computed explicitly on CPU. Both for speed.
Details and measurements: docs/odt.md
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import run
from common.datasets import Episode, OfflineData, load_dataset
from common.evaluation import evaluate, make_vector_env, rollout


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run folder name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and environment resets)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """mirror metrics to Weights & Biases (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "online-dt"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team)"""
    capture_video: bool = False
    """record videos of the first final-evaluation episode into the run folder"""
    save_model: bool = True
    """write checkpoints (needed for --resume) and the final model"""
    env_id: str = "hopper-random-v2"
    """dataset/environment: a D4RL name (hopper-medium-v2, antmaze-umaze-v2, ...), a Minari id, or a toy; the
    default works offline (every *-random-v2 is generated locally when it cannot be found)"""
    dataset_path: str | None = None
    """explicit D4RL .hdf5 file or Minari dataset folder (overrides the lookup)"""
    generate_steps: int = 1_000_000
    """size of a locally generated *-random-v2 dataset (env steps)"""
    pretrain_updates: int | None = None
    """offline gradient updates before finetuning (None: Table C.4, 5000; 10000 walker2d/ant, 7000 AntMaze)"""
    online_steps: int = 200_000
    """online environment steps of finetuning (paper Table 5.1: 200k)"""
    updates_per_round: int = 300
    """gradient updates after each online rollout (Table C.3: 300)"""
    min_steps_per_round: int | None = None
    """collect episodes until at least this many new env steps per round (None: one episode, Alg. 1)"""
    eval_interval: int = 10_000
    """online env steps between evaluations (also evaluated after pretraining and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes (one vector-env slot each, fixed seeds)"""
    log_interval: int = 100
    """gradient updates between metric rows during pretraining (online: one row per round)"""
    checkpoint_interval: int = 1000
    """gradient updates between checkpoints (online: rounded up to whole rounds)"""
    resume: str | None = None
    """continue the run in this folder from its last checkpoint (its saved config is used)"""
    progress: bool = True
    """show progress bars"""
    preset: Literal["paper", "cpu"] = "paper"
    """paper: the paper's model and budgets; cpu: the CPU-scale protocol (PRESETS, printed) for each flag not typed"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """transformer forward/backward and rollouts under bf16 autocast, or fp32; auto: bf16 where the hardware
    has native bf16 (recent GPUs, AVX512-BF16 CPUs). Weights, optimiser state and losses are fp32 either way"""

    # Algorithm specific arguments
    embed_dim: int | None = None
    """transformer width (None: Table C.3, 512; 1024 for antmaze-umaze-diverse)"""
    n_layers: int = 4
    """transformer blocks (Table C.3: 4)"""
    n_heads: int = 4
    """attention heads (Table C.3: 4)"""
    dropout: float = 0.1
    """dropout in embeddings, attention and MLP (Table C.3: 0.1)"""
    context_len: int | None = None
    """training context length K (None: Table C.3, 20)"""
    eval_context_len: int | None = None
    """context length for evaluation and online rollouts (None: Table C.4, 5; 1 ant)"""
    batch_size: int = 256
    """windows per gradient update (Table C.3: 256)"""
    learning_rate: float | None = None
    """LAMB learning rate (None: Table C.4, 1e-4; 2e-3 hopper-m-r, 1e-3 walker2d/AntMaze, 1.5e-3 ant-medium)"""
    weight_decay: float | None = None
    """LAMB weight decay (None: Table C.4, 5e-4; 1e-4 hopper-m-r/ant-medium, 1e-3 walker2d, 0 AntMaze)"""
    warmup_steps: int = 10_000
    """linear learning-rate warm-up (gradient steps), continued from pretraining into finetuning (Table C.3: 10^4)"""
    grad_clip: float = 0.25
    """global gradient-norm clip (Table C.3: 0.25)"""
    init_temperature: float = 0.1
    """initial entropy temperature λ (log λ is learned; 0.1 as in the reference code)"""
    temperature_lr: float = 1e-4
    """Adam learning rate of log λ (1e-4 as in the reference code)"""
    target_entropy: float | None = None
    """entropy lower bound β (None: −dim(A), Table C.3)"""
    buffer_size: int | None = None
    """replay capacity in trajectories (None: Table C.4, 1000; 1500 AntMaze)"""
    rtg_scale: float | None = None
    """multiplier of return-to-go tokens (None: 0.001 locomotion, 1 AntMaze, as in the reference code)"""
    g_eval: float | None = None
    """target return for evaluation (None: Table C.4, 3600 hopper, 5000 walker2d, 6000 halfcheetah/ant, 1 AntMaze)"""
    g_online: float | None = None
    """target return for exploration rollouts (None: Table C.4, 2 × g_eval)"""
    use_timestep_embedding: bool | None = None
    """learned absolute timestep embedding (None: Table C.4 "position", off for Gym, on for AntMaze)"""


# Per-dataset defaults: ODT paper Table C.4 (finetuning), one row per family (its -medium row) and the rows that
# differ ("<family>-<kind>" overrides "<family>"); datasets the paper does not list use their family's row.
DATASET_DEFAULTS: dict[str, dict] = {
    "hopper": dict(pretrain_updates=5000, learning_rate=1e-4, weight_decay=5e-4, g_eval=3600, g_online=7200),
    "hopper-medium-replay": dict(learning_rate=2e-3, weight_decay=1e-4),
    "walker2d": dict(pretrain_updates=10000, learning_rate=1e-3, weight_decay=1e-3, g_eval=5000, g_online=10000),
    "halfcheetah": dict(pretrain_updates=5000, learning_rate=1e-4, weight_decay=5e-4, g_eval=6000, g_online=12000),
    "ant": dict(pretrain_updates=10000, learning_rate=1.5e-3, weight_decay=1e-4, eval_context_len=1,
                g_eval=6000, g_online=12000),
    "ant-medium-replay": dict(learning_rate=1e-4, weight_decay=5e-4),
    "antmaze": dict(pretrain_updates=7000, buffer_size=1500, learning_rate=1e-3, weight_decay=0.0,
                    rtg_scale=1.0, g_eval=1, g_online=2, use_timestep_embedding=True),
    "antmaze-umaze-diverse": dict(embed_dim=1024),
    # One-step datasets (the toys of ODT+TD3 §3.1 and AG §3.1, under any id); return scale and targets
    # come from the data (one_step_defaults).
    "one-step": dict(pretrain_updates=1000, context_len=1, eval_context_len=1, buffer_size=1000),
}
COMMON_DEFAULTS = dict(embed_dim=512, context_len=20, eval_context_len=5, pretrain_updates=5000,
                       learning_rate=1e-4, weight_decay=5e-4, buffer_size=1000, rtg_scale=1e-3,
                       use_timestep_embedding=False)


# The CPU-scale protocol (--preset cpu): the paper's settings except model size and budgets, ~20 min on a CPU.
PRESETS: dict[str, dict] = {
    "cpu": dict(embed_dim=128, n_layers=3, n_heads=1, batch_size=64, warmup_steps=1000, pretrain_updates=1000,
                online_steps=10_000, min_steps_per_round=1000, eval_interval=2000, eval_episodes=5),
}
# Smallest valid value of each numeric flag (checked before any work).
VALID_MIN = dict(generate_steps=1, pretrain_updates=0, online_steps=0, updates_per_round=1, min_steps_per_round=0,
                 eval_interval=1, eval_episodes=1, log_interval=1, checkpoint_interval=1, embed_dim=1, n_layers=1,
                 n_heads=1, context_len=1, eval_context_len=1, batch_size=1, learning_rate=0.0, weight_decay=0.0,
                 warmup_steps=1, grad_clip=0.0, init_temperature=1e-8, temperature_lr=0.0, buffer_size=1,
                 rtg_scale=1e-12)


def one_step_defaults(data: OfflineData) -> dict:
    """Return scale and target return of a one-step dataset (every episode a single step, such as the papers'
    toys under any id), derived from its data: RTG tokens scaled so that |R| ≤ 1, and the target is the best
    reachable return where the env states one (its reference max score), else the best return in the data."""
    returns = np.array([float(e.rewards.sum()) for e in data.episodes])
    best = float(data.ref_max_score) if data.ref_max_score is not None else float(returns.max())
    return dict(rtg_scale=1.0 / max(float(np.abs(returns).max()), abs(best), 1e-8), g_eval=best, g_online=best)


def apply_dataset_defaults(args: Args, data: OfflineData) -> Args:
    """Fill every field left at None from the per-dataset table; explicit flags always win."""
    one_step = bool(data.episodes) and all(len(e.rewards) == 1 for e in data.episodes)
    family = "one-step" if one_step else data.family
    table = {**COMMON_DEFAULTS, **DATASET_DEFAULTS.get(family, {}),
             **DATASET_DEFAULTS.get(f"{family}-{data.dataset_kind}", {})}
    if one_step:  # data-derived return scale and targets (one_step_defaults)
        table.update({k: v for k, v in one_step_defaults(data).items() if hasattr(args, k)})
    if "g_eval" not in table and data.ref_max_score is not None:
        # Unknown family: condition on the expert return, explore with twice that (ODT paper App. D).
        table.update(g_eval=data.ref_max_score, g_online=2 * data.ref_max_score)
    table.setdefault("target_entropy", -float(data.act_dim))  # β = −dim(A) (Table C.1)
    run.fill_defaults(args, table, data, required=("g_eval", "g_online"))  # prints what it filled
    return args


# ALGO LOGIC: the decision transformer
class Dropout(nn.Module):
    """Inverted dropout whose CPU masks cost a quarter of torch's: nn.Dropout draws one 32-bit random number
    per element (about a fifth of a small-shape CPU update); here one 64-bit draw gives four 16-bit uniforms,
    so p is rounded to a multiple of 2^-16 (|error| < 8e-6). CUDA keeps torch's fused kernel."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # full 64-bit range
        drop = bits.view(torch.int16)[: x.numel()].view(x.shape) < round(self.p * 65536) - 32768
        return x.masked_fill(drop, 0.0) * (1.0 / (1.0 - self.p))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        assert dim % n_heads == 0, "embed_dim must be divisible by n_heads"
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.n_heads = n_heads
        self.attn_drop, self.resid_drop = Dropout(dropout), Dropout(dropout)
        self.fused: bool | None = None  # None: torch's fused kernel on accelerators, the explicit math on CPU

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, rows: slice | None = None) -> torch.Tensor:
        """attn_mask None: causal. rows: compute only these query positions (keys and values: all)."""
        b, t, c = x.shape
        explicit = x.device.type == "cpu" if self.fused is None else not self.fused
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is None and (rows is not None or explicit):
            attn_mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if rows is not None:
            q, attn_mask = q[:, :, rows], attn_mask[..., rows, :]
        if explicit:
            # Explicit attention: torch's fused kernels cannot take our cheaper dropout, and at these sizes (≤ 60
            # tokens) its CPU flash kernel is slower than two matmuls; this is the math of its CPU fallback.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            y = self.attn_drop(att.masked_fill(~attn_mask, float("-inf")).softmax(-1)) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, -1, c)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block with a ReLU MLP (Table C.1)."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim), Dropout(dropout))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """rows: only these positions leave the block (the last block: the state tokens the heads read)."""
        x = (x if rows is None else x[:, rows]) + self.attn(self.ln1(x), attn_mask, rows)
        return x + self.mlp(self.ln2(x))


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, 3K, 3K) mask, True where a token may attend: causal, and never to padding.

    valid: (B, K) step mask. Every token may also attend to itself, so rows of padded tokens are
    not empty (an all-masked row gives NaN in softmax); padded outputs are excluded from all losses.
    """
    tokens = valid.repeat_interleave(3, dim=1)  # (R, s, a) per step
    n = tokens.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    return (causal & (tokens[:, None, :] | eye))[:, None]


class DecisionTransformer(nn.Module):
    """GPT over interleaved (R_t, s_t, a_t) tokens; the action is read at the state token (§3.1)."""

    def __init__(self, state_dim: int, act_dim: int, embed_dim: int, n_layers: int, n_heads: int,
                 dropout: float, max_ep_len: int, use_timestep_embedding: bool, precision: str = "fp32"):
        super().__init__()
        self.bf16 = precision == "bf16"  # autocast of embeddings and blocks; heads and losses stay fp32
        self.embed_rtg = nn.Linear(1, embed_dim)
        self.embed_state = nn.Linear(state_dim, embed_dim)
        self.embed_action = nn.Linear(act_dim, embed_dim)
        # Off for Gym, on for AntMaze (App. B): without it only the causal mask orders tokens.
        self.embed_timestep = nn.Embedding(max_ep_len, embed_dim) if use_timestep_embedding else None
        self.embed_ln = nn.LayerNorm(embed_dim)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(embed_dim)
        self.mu_head = nn.Linear(embed_dim, act_dim)
        self.log_std_head = nn.Linear(embed_dim, act_dim)
        # GPT-2 init (N(0, 0.02) weights, zero biases) inside the blocks only. The token embeddings keep
        # PyTorch's default init, as in the ODT reference: with a zero bias LayerNorm(W·x) = LayerNorm(W·cx) for
        # every c > 0, so the return token would carry only the sign of R and every state would lose its norm.
        self.blocks.apply(self._init_weights)
        for head in (self.mu_head, self.log_std_head):  # small, not orthogonal as in the reference: see docstring
            self._init_weights(head)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, rtg, states, actions, timesteps, valid) -> torch.Tensor:
        """rtg (B,K), states (B,K,S), actions (B,K,A), timesteps (B,K), valid (B,K) → (B,K,d) at s_t."""
        b, k = states.shape[:2]
        # bf16 autocast only when asked; otherwise leave any caller's autocast alone (odt_td3's bf16 targets)
        with torch.autocast(states.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
            tokens = torch.stack(
                (self.embed_rtg(rtg.unsqueeze(-1)), self.embed_state(states), self.embed_action(actions)), dim=2
            )
            if self.embed_timestep is not None:
                tokens = tokens + self.embed_timestep(timesteps).unsqueeze(2)
            x = self.drop(self.embed_ln(tokens.reshape(b, 3 * k, -1)))
            mask = attention_mask(valid)
            for block in self.blocks[:-1]:
                x = block(x, mask)
            # Only the state tokens are read (the action at s_t): the last block computes just those rows,
            # the same values in a third of the attention-output and MLP work.
            x = self.ln_f(self.blocks[-1](x, mask, rows=slice(1, None, 3)))
        return x.to(states.dtype)  # fp32 out of a bf16 autocast

    def action_dist(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the pre-tanh Gaussian; log-std squashed into [−5, 2] (eq. 2)."""
        return self.mu_head(h), squash_log_std(self.log_std_head(h))


# ALGO LOGIC: tanh-squashed Gaussian policy (paper §4)
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
ACTION_EPS = 1e-6


def squash_log_std(x: torch.Tensor) -> torch.Tensor:
    return LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(x) + 1)


def tanh_log_det(x: torch.Tensor) -> torch.Tensor:
    """log(1 − tanh(x)²), numerically stable: 2·(log 2 − x − softplus(−2x))."""
    return 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((x - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def tanh_normal_log_prob(mu: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log π(a) of a = tanh(x), x ~ N(μ, σ²), summed over action dims. Actions are clamped to
    (−1+ε, 1−ε) first because atanh(±1) is infinite."""
    x = torch.atanh(actions.clamp(-1 + ACTION_EPS, 1 - ACTION_EPS))
    return gaussian_log_prob(x, mu, log_std) - tanh_log_det(x).sum(-1)


def tanh_normal_rsample(mu: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised sample a = tanh(μ + σ·ε) and its log-probability (no atanh round trip)."""
    x = mu + log_std.exp() * torch.randn_like(mu)
    return torch.tanh(x), gaussian_log_prob(x, mu, log_std) - tanh_log_det(x).sum(-1)


# ALGO LOGIC: LAMB optimiser (You et al., 2019, arXiv 1904.00962, Alg. 2; ODT App. C)
def lamb_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices get weight decay and the trust ratio; vectors (biases, LayerNorm gains, a learned log-std)
    get neither and take plain Adam steps, as in LAMB's BERT recipe (You et al., 2019, §4). Under the trust
    ratio ‖w‖/‖update‖ a tensor that starts at zero moves by lr·‖w‖ per step, i.e. it stays near zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Lamb(torch.optim.Optimizer):
    """Bias-corrected Adam moments of the gradient (global norm clipped at `max_grad_norm`), decoupled weight
    decay, and in groups with weight decay ≠ 0 the per-tensor trust ratio ‖w‖ / ‖update‖ (1 where either
    norm is 0). One multi-tensor (torch._foreach_*) pass per group: no Python loop over parameters."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None):
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        grads = [p.grad for _, params in groups for p in params]
        if not grads:
            return
        global_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        clip = (global_norm / self.defaults["max_grad_norm"]).clamp(min=1.0)
        for group, params in groups:
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            grads = torch._foreach_div([p.grad for p in params], clip)
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1 - beta2 ** group["step"]))
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(m, 1 - beta1 ** group["step"])
            torch._foreach_div_(update, denom)
            if group["weight_decay"] != 0:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(update))
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(update, list(trust.unbind()))
            torch._foreach_add_(params, update, alpha=-group["lr"])


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr · min(1, (step+1)/warmup), one schedule from pretraining through finetuning (App. C)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


# ALGO LOGIC: trajectory replay and window sampling
def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted suffix sums R_t = Σ_{t'≥t} r_t'."""
    return np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)


class TrajectoryReplay:
    """Trajectory-level FIFO replay (Alg. 1) with length-proportional window sampling (App. F, Alg. 3).

    Trajectories are kept as a list (the state checkpoints save) and mirrored into flat tensors on
    the training device, rebuilt lazily after a change, so a batch is one fancy-indexing gather.
    RTGs are recomputed from the stored rewards when a trajectory is added: hindsight relabeling.
    """

    def __init__(self, capacity: int, state_mean: np.ndarray, state_std: np.ndarray, rtg_scale: float,
                 max_ep_len: int, device: torch.device):
        self.capacity, self.rtg_scale, self.max_ep_len, self.device = capacity, rtg_scale, max_ep_len, device
        self.state_mean, self.state_std = state_mean.astype(np.float32), state_std.astype(np.float32)
        self.trajectories: list[dict[str, np.ndarray]] = []
        self.next_slot = 0  # FIFO pointer once full
        self._flat: dict[str, torch.Tensor] | None = None

    def add(self, episode: Episode) -> None:
        traj = {"observations": episode.observations, "actions": episode.actions, "rewards": episode.rewards}
        if len(self.trajectories) < self.capacity:
            self.trajectories.append(traj)
        else:
            self.trajectories[self.next_slot] = traj  # replace the oldest (paper §4.1)
            self.next_slot = (self.next_slot + 1) % self.capacity
        self._flat = None

    def __len__(self) -> int:
        return len(self.trajectories)

    def state_dict(self) -> dict:
        return {"trajectories": self.trajectories, "next_slot": self.next_slot}

    def load_state_dict(self, state: dict) -> None:
        self.trajectories, self.next_slot, self._flat = state["trajectories"], state["next_slot"], None

    def _rebuild(self) -> None:
        trajs = self.trajectories
        self.lengths = np.array([len(t["rewards"]) for t in trajs], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        self.cdf = np.cumsum(self.lengths / self.lengths.sum())
        cat = lambda key: np.concatenate([t[key] for t in trajs]).astype(np.float32)
        flat = {
            "states": (cat("observations") - self.state_mean) / self.state_std,  # frozen normalisation
            "actions": cat("actions"),
            "rtg": np.concatenate([returns_to_go(t["rewards"]) for t in trajs]) * self.rtg_scale,
            "timesteps": np.concatenate([np.arange(n) for n in self.lengths]).clip(max=self.max_ep_len - 1),
        }
        self._flat = {k: torch.as_tensor(v).to(self.device) for k, v in flat.items()}

    def sample_indices(self, batch_size: int, context_len: int, rng: np.random.Generator):
        """Indices into the flat arrays (B, K) and the valid mask (B, K), left-padded.

        A trajectory is drawn with probability ∝ its length, a start uniformly within it, and up to
        K steps are taken from there (App. F). Short windows are shifted right: padding on the left.
        """
        if self._flat is None:
            self._rebuild()
        traj = np.searchsorted(self.cdf, rng.random(batch_size) * self.cdf[-1], side="right")
        traj = np.minimum(traj, len(self.lengths) - 1)
        length = self.lengths[traj]
        start = (rng.random(batch_size) * length).astype(np.int64)
        n_valid = np.minimum(context_len, length - start)
        pos = np.arange(context_len)
        pad = (context_len - n_valid)[:, None]
        valid = pos[None, :] >= pad
        step = np.where(valid, start[:, None] + pos[None, :] - pad, start[:, None])
        return self.offsets[traj][:, None] + step, valid

    def sample(self, batch_size: int, context_len: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx, valid = self.sample_indices(batch_size, context_len, rng)
        idx = torch.as_tensor(idx, device=self.device)
        valid = torch.as_tensor(valid, device=self.device)
        batch = {k: v[idx] for k, v in self._flat.items()}
        for key, value in batch.items():  # padded steps are zeros
            batch[key] = value * (valid.unsqueeze(-1) if value.dim() == 3 else valid)
        batch["valid"] = valid
        return batch


# ALGO LOGIC: losses and the update step
def odt_losses(model: DecisionTransformer, log_temperature: torch.Tensor, batch: dict, target_entropy: float):
    """Eq. (7) for θ: −E log π(a|·) − λ·H[π], and the dual loss for log λ; both masked to valid steps."""
    h = model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"], batch["valid"])
    mu, log_std = model.action_dist(h)
    valid = batch["valid"].float()
    n_valid = valid.sum()
    nll = -(tanh_normal_log_prob(mu, log_std, batch["actions"]) * valid).sum() / n_valid
    _, sample_log_prob = tanh_normal_rsample(mu, log_std)
    entropy = -(sample_log_prob * valid).sum() / n_valid  # one-sample estimate of H (§4)
    temperature = log_temperature.exp()
    policy_loss = nll - temperature.detach() * entropy
    temperature_loss = temperature * (entropy - target_entropy).detach()  # raises λ when H < β
    return policy_loss, temperature_loss, {"train/nll": nll, "train/entropy": entropy,
                                           "train/policy_loss": policy_loss, "train/temperature": temperature}


def update(model, optimizer, scheduler, log_temperature, temperature_optimizer, batch, args):
    model.train()
    policy_loss, temperature_loss, stats = odt_losses(model, log_temperature, batch, args.target_entropy)
    optimizer.zero_grad(set_to_none=True)
    policy_loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    scheduler.step()
    temperature_optimizer.zero_grad(set_to_none=True)
    temperature_loss.backward()
    temperature_optimizer.step()
    return {k: v.detach() for k, v in stats.items()}


# ALGO LOGIC: acting in the environment
class DTAgent:
    """Keeps the per-env context for rollouts (common.evaluation.Policy). All envs step in lockstep,
    so the window is simply the last `context_len` steps; RTG_{t+1} = RTG_t − r_t (scaled)."""

    def __init__(self, model: DecisionTransformer, args: Args, state_mean, state_std, target_return: float, *,
                 sample: bool, device: torch.device, max_ep_len: int):
        self.model, self.sample, self.device = model, sample, device
        self.context_len, self.rtg_scale, self.max_ep_len = args.eval_context_len, args.rtg_scale, max_ep_len
        self.target = target_return * args.rtg_scale
        self.mean = torch.as_tensor(state_mean, device=device)
        self.std = torch.as_tensor(state_std, device=device)
        self.act_dim = model.mu_head.out_features

    def reset(self, obs: np.ndarray) -> None:
        n, horizon = obs.shape[0], self.max_ep_len + 1
        self.t = 0
        self.states = torch.zeros(n, horizon, obs.shape[1], device=self.device)
        self.actions = torch.zeros(n, horizon, self.act_dim, device=self.device)
        self.rtg = torch.zeros(n, horizon, device=self.device)
        self.rtg[:, 0] = self.target

    def _grow(self) -> None:  # episodes longer than the env's time limit (max_steps=None envs)
        for name in ("states", "actions", "rtg"):
            buf = getattr(self, name)
            setattr(self, name, torch.cat((buf, torch.zeros_like(buf)), dim=1))

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.t + 1 >= self.states.shape[1]:
            self._grow()
        t = self.t
        self.states[:, t] = (torch.as_tensor(obs, device=self.device) - self.mean) / self.std
        lo = max(0, t + 1 - self.context_len)
        steps = torch.arange(lo, t + 1, device=self.device).clamp(max=self.max_ep_len - 1)
        n = obs.shape[0]
        self.model.eval()
        h = self.model(self.rtg[:, lo:t + 1], self.states[:, lo:t + 1], self.actions[:, lo:t + 1],
                       steps.expand(n, -1), torch.ones(n, t + 1 - lo, dtype=torch.bool, device=self.device))
        mu, log_std = self.model.action_dist(h[:, -1])
        action = tanh_normal_rsample(mu, log_std)[0] if self.sample else torch.tanh(mu)
        self.actions[:, t] = action
        return action.cpu().numpy()

    @torch.inference_mode()  # like act(): buffers grown inside act() are inference tensors
    def observe(self, rewards: np.ndarray) -> None:
        r = torch.as_tensor(rewards, device=self.device, dtype=torch.float32)
        self.rtg[:, self.t + 1] = self.rtg[:, self.t] - r * self.rtg_scale
        self.t += 1


# TRY NOT TO MODIFY: run folder, metrics, checkpoints, errors
def eval_seeds(seed: int, n: int) -> list[int]:
    """Reset seeds of the n evaluation episodes: the same episodes at every evaluation of a run."""
    return [10_000 + seed * 1000 + i for i in range(n)]


def online_episode_seed(seed: int, round_: int, index: int = 0) -> int:
    """Reset seed of the index-th online episode of a round: a fresh one each time, the same after a resume."""
    return seed * 1_000_003 + round_ * 1000 + index


# Training: set-up, the run state and its two phases (Alg. 1)
def set_up(args: Args, typed: set[str] | None = None) -> tuple[Args, OfflineData, torch.device, Path, dict | None]:
    """Flags, seeds, device, dataset and run folder; the checkpoint to resume from (None: a new run)."""
    run.validate_args(args, VALID_MIN)
    args, run_dir, checkpoint = run.prepare_run(args, Path(__file__).name)
    args = run.apply_preset(args, typed, PRESETS) if checkpoint is None else args
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device, args.precision = run.pick_device(args.cuda, args.precision, typed)

    data = load_dataset(args.env_id, args.dataset_path, generate_steps=args.generate_steps, progress=args.progress)
    args = apply_dataset_defaults(args, data)
    run.validate_args(args, VALID_MIN)
    run.open_run_folder(run_dir, Path(__file__).name, args, data, device)
    return args, data, device, run_dir, checkpoint


class Trainer:
    """The run state (networks, optimisers, replays, the loop's position `counters`) and the steps `train` takes."""

    def __init__(self, args: Args, data: OfflineData, device: torch.device, run_dir: Path, checkpoint: dict | None):
        self.args, self.data, self.device, self.run_dir = args, data, device, run_dir
        self.rng = np.random.default_rng(args.seed)  # window sampling
        self.eval_envs = make_vector_env(data.make_env, args.eval_episodes)
        self.train_envs = make_vector_env(data.make_env, 1)
        self.max_ep_len = self.eval_envs.envs[0].spec.max_episode_steps or 1000

        # ALGO LOGIC: model, optimisers, replay
        self.model = DecisionTransformer(
            data.obs_dim, data.act_dim, embed_dim=args.embed_dim, n_layers=args.n_layers, n_heads=args.n_heads,
            dropout=args.dropout, max_ep_len=self.max_ep_len, use_timestep_embedding=args.use_timestep_embedding,
            precision=args.precision).to(device)
        self.optimizer = Lamb(lamb_param_groups(self.model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
        self.scheduler = warmup_schedule(self.optimizer, args.warmup_steps)
        self.log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
        self.temperature_optimizer = torch.optim.Adam([self.log_temperature], lr=args.temperature_lr)
        replay_kwargs = dict(state_mean=data.state_mean, state_std=data.state_std, rtg_scale=args.rtg_scale,
                             max_ep_len=self.max_ep_len, device=device)
        self.offline = TrajectoryReplay(len(data.episodes), **replay_kwargs)  # pretraining samples all offline data
        for episode in data.episodes:
            self.offline.add(episode)
        self.replay = TrajectoryReplay(args.buffer_size, **replay_kwargs)
        # Alg. 1 line 2: the top-N offline trajectories by return, ascending so that FIFO evicts the worst first (§4.1)
        for episode in sorted(data.episodes, key=lambda e: float(e.rewards.sum()))[-args.buffer_size:]:
            self.replay.add(episode)

        # The loop's position. round_updates_left > 0: the round's rollout is in the replay, that many updates to go.
        self.counters = {"updates": 0, "env_steps": 0, "rounds": 0, "pretrain_evaluated": False,
                         "round_updates_left": 0, "round": {}}
        self.meter = run.StatsMeter()
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
        self.logger = run.RunLogger(run_dir, args, self.counters if self.resumed else None)
        self.checkpoints = run.Interval(args.checkpoint_interval, start=self.counters["updates"])
        self.evaluations = run.Interval(args.eval_interval, start=self.counters["env_steps"])
        self.final: dict = {}  # the metrics of finetuning's latest evaluation in this process

    # What a checkpoint holds: these objects' state_dict(), plus log λ, the loop's position and the RNG states.
    STATE = ("model", "optimizer", "scheduler", "temperature_optimizer", "replay", "meter")

    def state_dict(self) -> dict:
        return {**{key: getattr(self, key).state_dict() for key in self.STATE}, "counters": dict(self.counters),
                "log_temperature": self.log_temperature.detach().cpu(), "rng": run.rng_state(self.rng)}

    def load_state_dict(self, checkpoint: dict) -> None:
        for key in self.STATE:
            getattr(self, key).load_state_dict(checkpoint[key])
        with torch.no_grad():
            self.log_temperature.copy_(checkpoint["log_temperature"])
        self.counters.update(checkpoint["counters"])
        run.restore_rng_state(self.rng, checkpoint["rng"])

    def save_checkpoint(self) -> None:
        self.logger.stamp(self.counters)  # the wall time and metrics rows a resume continues from
        if self.args.save_model:
            run.save_checkpoint(self.run_dir, self.state_dict())

    def agent(self, target_return: float, *, explore: bool) -> DTAgent:
        """Evaluation acts with the mean action tanh(μ); exploration samples from the policy (§4)."""
        return DTAgent(self.model, self.args, state_mean=self.data.state_mean, state_std=self.data.state_std,
                       target_return=target_return, sample=explore, device=self.device, max_ep_len=self.max_ep_len)

    def evaluate(self) -> dict:
        seeds = eval_seeds(self.args.seed, self.args.eval_episodes)  # same every evaluation
        return evaluate(self.eval_envs, self.agent(self.args.g_eval, explore=False), seeds, self.data.normalized_score)

    def train_step(self, source: TrajectoryReplay) -> None:
        """Alg. 2 lines 4-9: a batch of windows from `source`, one gradient update of θ and log λ (eq. 7)."""
        t0 = time.perf_counter()
        stats = update(self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                       log_temperature=self.log_temperature, temperature_optimizer=self.temperature_optimizer,
                       batch=source.sample(self.args.batch_size, self.args.context_len, self.rng), args=self.args)
        self.counters["updates"] += 1
        self.meter.add(stats, time.perf_counter() - t0)

    def explore(self) -> list[Episode]:
        """Alg. 1 line 4: episodes with actions sampled from π_θ(·|s, g_online) until the round has
        --min-steps-per-round new env steps (default: one episode); episode i of round r resets with
        online_episode_seed(seed, r, i). Counts the round and its env steps."""
        args, counters = self.args, self.counters
        t0, agent, episodes, returns = time.perf_counter(), self.agent(args.g_online, explore=True), [], []
        while not episodes or sum(len(e.rewards) for e in episodes) < (args.min_steps_per_round or 0):
            episode_seed = online_episode_seed(args.seed, counters["rounds"], index=len(episodes))
            result = rollout(self.train_envs, agent, [episode_seed], record=True)
            episodes.append(result.episodes[0])
            returns.append(float(result.returns[0]))
        steps = sum(len(e.rewards) for e in episodes)
        counters["env_steps"] += steps
        counters["rounds"] += 1
        counters["round"] = {"rollout/return": float(np.mean(returns)), "rollout/length": steps / len(episodes),
                             "charts/SPS": steps / max(time.perf_counter() - t0, 1e-9)}
        return episodes

    def log_row(self, extra: dict, checkpoint: bool = False) -> None:
        """A metrics row (the loop's position, mean statistics since the last row, `extra`), a checkpoint if asked."""
        self.logger.log_stats(self.counters, self.meter, extra)  # stops at a non-finite statistic
        if checkpoint:
            self.save_checkpoint()

    def log_pretraining(self) -> None:
        """Rows every --log-interval updates (and the first, the last), checkpoints when due; the cost estimate."""
        args, n = self.args, self.counters["updates"]
        if n == 3 and not self.resumed:
            rounds = args.online_steps / max(args.min_steps_per_round or 0, self.max_ep_len)  # ≥ 1 episode each
            run.print_cost_estimate(self.meter.seconds / max(self.meter.n, 1), args, rounds * args.updates_per_round)
        if n % args.log_interval == 0 or n in (1, args.pretrain_updates):
            self.log_row({"phase": "pretrain", "charts/updates_per_second": self.meter.updates_per_second()},
                         checkpoint=self.checkpoints.due(n))

    def end_round(self) -> None:
        """The round's row; an evaluation every --eval-interval env steps, a checkpoint when due; both at the end."""
        at, last = self.counters, self.counters["env_steps"] >= self.args.online_steps
        extra = {"phase": "online", **at["round"], "charts/updates_per_second": self.meter.updates_per_second()}
        if self.evaluations.due(at["env_steps"]) or last:
            extra.update(self.evaluate())
            self.final = {k: v for k, v in extra.items() if k.startswith("eval/")}
        self.log_row(extra, checkpoint=self.checkpoints.due(at["updates"]) or last)

    def stopped(self) -> dict:
        self.save_checkpoint()
        return run.stop_run(self.run_dir, self.logger, self.counters)

    def finish(self) -> dict:
        """Final metrics row (evaluating unless the last round did), model.pt, the --capture-video episode, summary."""
        final = self.final or self.evaluate()  # the last round did not evaluate (or there was no online phase)
        summary = {"run_dir": str(self.run_dir), "env_id": self.args.env_id, "counters": self.counters,
                   "wall_time_s": self.logger.wall_time(), **final}
        self.log_row({"phase": "final", **final})
        video = (self.data.make_env, self.agent(self.args.g_eval, explore=False), eval_seeds(self.args.seed, 1)[0])
        return run.finish_run(self.run_dir, self.logger, summary, self.model.state_dict() if self.args.save_model
                              else None, video if self.args.capture_video else None)


def train(t: Trainer, stop: run.StopFlag) -> None:
    """ODT Alg. 1, with Alg. 2's gradient step as `t.train_step`. The loop's position is `t.counters` (updates,
    env steps, rounds, updates left in the round), saved in every checkpoint: a stop request is honoured between
    any two updates, and --resume continues from that point, mid-round included."""
    args, at = t.args, t.counters
    # Input π_θ: pretrained on every offline trajectory (Table C.4: 5k-10k updates), then evaluated once
    with run.progress_bar("pretraining", at["updates"], args.pretrain_updates, "upd", args.progress) as bar:
        while at["updates"] < args.pretrain_updates and not stop.requested:
            t.train_step(t.offline)
            t.log_pretraining()  # a metrics row every --log-interval updates, a checkpoint when due
            bar.update(1)
    if not stop.requested and not at["pretrain_evaluated"]:
        at["pretrain_evaluated"] = True
        t.log_row({"phase": "pretrain", **t.evaluate()}, checkpoint=True)
    # Line 2, T_replay ← the top-N offline trajectories, was done by Trainer()
    with run.progress_bar("finetuning", at["env_steps"], args.online_steps, "step",
                          args.progress and not stop.requested) as bar:
        while not stop.requested and (at["round_updates_left"] > 0 or at["env_steps"] < args.online_steps):  # l. 3
            if at["round_updates_left"] == 0:  # a new round (after a resume the loop may be in the middle of one)
                for episode in t.explore():  # line 4: roll out π_θ(·|s, g_online) with sampled actions
                    t.replay.add(episode)  # line 5: FIFO (the oldest leaves); RTGs relabeled by achieved rewards
                at["round_updates_left"] = args.updates_per_round
                run.advance(bar, at["env_steps"], ret=f"{at['round']['rollout/return']:.4g}")  # the rollout's return
            while at["round_updates_left"] > 0 and not stop.requested:  # line 6: I iterations of Alg. 2
                t.train_step(t.replay)
                at["round_updates_left"] -= 1
            if at["round_updates_left"] == 0:
                t.end_round()  # metrics row; evaluation every --eval-interval env steps and after the last round


def main(args: Args, typed: set[str] | None = None) -> dict:
    args, data, device, run_dir, checkpoint = set_up(args, typed)  # flags, seeds, dataset, run folder
    trainer = Trainer(args, data, device, run_dir, checkpoint)  # model, optimisers, replay; resumes a checkpoint
    stop = run.StopFlag()  # Ctrl-C / SIGTERM: checkpoint at the next safe point, exit 3
    train(trainer, stop)  # Alg. 1: offline pretraining, then rounds of exploration and updates
    return trainer.stopped() if stop.requested else trainer.finish()


if __name__ == "__main__":
    run.cli(main, Args)
