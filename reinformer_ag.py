"""Reinformer + Action Gradient (RF+AG).

Papers: Z. Zhuang et al., "Reinformer: Max-Return Sequence Modeling for Offline RL", ICML 2024, arXiv 2405.08740
(§4), and R. Lin et al., "Adjusting the Output of Decision Transformer with Action Gradient", arXiv 2510.05285
(§3, Alg. 1). Offline only: Reinformer (R̂_t from the state token by expectile regression, the action from the RTG
token by Gaussian NLL + entropy) and an IQL critic train on the same data. At evaluation R̂_t fills the RTG slot, then
AG takes n ascent steps on Q from the action a⁰ and executes the best iterate. `eval/`: RF+AG, `eval_rf/`: plain RF.

Usage:
    python reinformer_ag.py --env-id hopper-medium-v2                  # paper hyperparameters
    python reinformer_ag.py --env-id toy-ag-v0                         # the AG toy (§3.1, Figure 2)
    python reinformer_ag.py --eval-only runs/<run> --sweep-ag-lr 0.01 0.1 --sweep-ag-steps 1 10  # tune η, n
    python reinformer_ag.py --resume runs/<run folder>                 # continue a stopped run

Deliberate differences from the reference implementations (github.com/Dragon-Zhuang/Reinformer, the AG paper):
- Post-LN GELU blocks as Reinformer's, default init for embeddings and heads: zero biases would lose |R| and |s|.
- LAMB keeps vectors out of weight decay and trust ratio: the zero-initialised log-std would stay ≈ 0.
- Max-return residual ÷ mean |R| and the NLL averaged over valid tokens only: padding is not data.
- The IQL critic trains in the same run (the paper: separately): the same critic, in one command.
- AG's momentum (eq. 6) and Adam (eq. 8) as printed (no decay; bias correction by 1 − ζ): the paper's rule.
- Default η, n from an evaluation-only sweep: the paper states none. Checkpoints add critic and log λ: exact resume.
- Data from Minari / D4RL files / local generation on Gymnasium MuJoCo v5 (`common/datasets.py`): works offline.
- CPU dropout masks draw 16-bit uniforms (p rounded to a multiple of 2^-16), see the `Dropout` class; attention is
  computed explicitly on CPU: speed.
Details and measurements: docs/reinformer_ag.md
"""

from __future__ import annotations

import contextlib
import copy
import itertools
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
from tqdm import tqdm

from common import run
from common.datasets import OfflineData, load_dataset
from common.evaluation import evaluate, make_vector_env


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
    """offline gradient updates (None: per-dataset default, 50k as in Reinformer)"""
    eval_interval: int = 10_000
    """gradient updates between evaluations (also evaluated at the end)"""
    eval_episodes: int = 10
    """evaluation episodes (one vector-env slot each, fixed seeds)"""
    log_interval: int = 100
    """gradient updates between metric rows"""
    checkpoint_interval: int = 1000
    """gradient updates between checkpoints"""
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
    embed_dim: int = 256
    """transformer width (Reinformer: 256)"""
    n_layers: int = 4
    """transformer blocks (Reinformer: 4)"""
    n_heads: int = 8
    """attention heads (Reinformer: 8)"""
    dropout: float = 0.1
    """dropout in embeddings, attention and MLP (Reinformer: 0.1)"""
    context_len: int | None = None
    """training context length K (None: per-dataset, DATASET_DEFAULTS: 5 as in Reinformer; 1 for one-step data)"""
    eval_context_len: int | None = None
    """evaluation context length (None: K); the upper limit of the adaptive context"""
    adaptive_context: bool = False
    """AG §4.1: the action pass keeps earlier steps only while the previous R̂ exceeds the current one (off:
    Reinformer's fixed window)"""
    separate_networks: bool = False
    """AG §4.1: independent transformers for RTG and action prediction (off: one shared trunk, as Reinformer)"""
    batch_size: int = 128
    """windows per gradient update (Reinformer: 128)"""
    learning_rate: float | None = None
    """LAMB learning rate (None: per-dataset, DATASET_DEFAULTS: 1e-4 as in Reinformer; 1e-3 for one-step data)"""
    weight_decay: float = 1e-4
    """LAMB weight decay (Reinformer: 1e-4)"""
    warmup_steps: int | None = None
    """linear learning-rate warm-up in updates (None: per-dataset: 5000 as in Reinformer; 100 for one-step data)"""
    grad_clip: float = 0.25
    """global gradient-norm clip (Reinformer, as ODT Table C.1: 0.25)"""
    init_temperature: float = 0.1
    """initial entropy temperature λ; log λ is learned (Reinformer: 0.1)"""
    temperature_lr: float = 1e-4
    """Adam learning rate of log λ (Reinformer, as ODT App. C: 1e-4)"""
    target_entropy: float | None = None
    """entropy lower bound β (None: −dim(A), as Reinformer and ODT Table C.1)"""
    expectile: float = 0.99
    """τ of the max-return (expectile) loss on the predicted RTG (Reinformer §4: 0.99)"""
    rtg_scale: float | None = None
    """multiplier of return-to-go tokens (None: per-dataset, DATASET_DEFAULTS: 1 / Reinformer's RTG divisor,
    1e-3 hopper/walker2d, 2e-4 halfcheetah, 1e-2 maze2d, 1e-4 Adroit, 1 AntMaze)"""
    conditioning: Literal["predicted", "target"] = "predicted"
    """RTG at evaluation: 'predicted' (Reinformer) or 'target' (fixed g_eval, DT-style: AG Table 3's DT+AG)"""
    g_eval: float | None = None
    """target return for --conditioning target (None: the dataset's D4RL expert reference return)"""
    critic_hidden: int = 256
    """width of the IQL critic's two hidden layers (IQL, arXiv 2110.06169: 256; AG §3.3 uses IQL)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the IQL critic, Q1, Q2 and V (IQL: 3e-4)"""
    critic_batch_size: int = 256
    """transitions per critic update (IQL: 256)"""
    critic_updates: int = 1
    """critic updates per model update (AG trains the critic separately, on the offline data only: §3.3)"""
    iql_expectile: float = 0.7
    """τ of IQL's V loss (AG eq. 5; IQL's MuJoCo value: 0.7)"""
    gamma: float = 0.99
    """discount of the critic (IQL: 0.99)"""
    polyak: float = 0.005
    """target-Q averaging rate ρ (IQL: 0.005)"""
    ag_steps: int | None = None
    """AG iterations n, 0: plain RF (None: per-dataset, DATASET_DEFAULTS: 3, one-step data 10; the paper states
    none, Fig. 3 ablates n: the values of the sweep in docs/reinformer_ag.md)"""
    ag_lr: float | None = None
    """AG step size η (None: per-dataset, DATASET_DEFAULTS: 1e-3, one-step data 0.3; the paper states none,
    Fig. 3 ablates η: the values of the sweep in docs/reinformer_ag.md)"""
    ag_method: Literal["sgd", "momentum", "rmsprop", "adam"] = "sgd"
    """AG update: eq. 1 (sgd), eq. 6 (momentum), eq. 7 (rmsprop) or eq. 8 (adam); AG Table 4 compares them"""
    ag_zeta1: float = 0.9
    """ζ of momentum (eq. 6) and ζ₁ of Adam (eq. 8) (not stated in AG; Adam's usual 0.9)"""
    ag_zeta2: float = 0.999
    """ζ of RMSProp (eq. 7) and ζ₂ of Adam (eq. 8) (not stated in AG; Adam's usual 0.999)"""
    ag_eps: float = 1e-8
    """ε of RMSProp / Adam (not stated in AG; Adam's usual 1e-8)"""
    eval_only: str | None = None
    """evaluate the trained model of this run folder (no training) for every (η, n) of the sweep lists"""
    sweep_ag_lr: tuple[float, ...] = ()
    """η values for --eval-only (empty: --ag-lr)"""
    sweep_ag_steps: tuple[int, ...] = ()
    """n values for --eval-only (empty: --ag-steps)"""


# Per-dataset defaults, for every field left at None; keys "<family>-<kind>" first, then "<family>", then
# COMMON_DEFAULTS. RTG scale = 1 / Reinformer's RTG divisor per domain (arXiv 2405.08740, its public code).
DATASET_DEFAULTS: dict[str, dict] = {
    # family       RTG scale
    "hopper":      dict(rtg_scale=1e-3),  # 1/1000
    "walker2d":    dict(rtg_scale=1e-3),  # 1/1000
    "halfcheetah": dict(rtg_scale=2e-4),  # 1/5000
    "maze2d":      dict(rtg_scale=1e-2),  # 1/100
    **{adroit: dict(rtg_scale=1e-4) for adroit in ("pen", "hammer", "door", "relocate")},  # Adroit: 1/10000
    "antmaze":     dict(rtg_scale=1.0),  # 0/1 returns: unscaled
    # one-step datasets (AG §3.1's toy, under any id): one token per window, return scale and target from the data
    "one-step": dict(pretrain_updates=1500, context_len=1, learning_rate=1e-3, warmup_steps=100,
                     ag_steps=10, ag_lr=0.3),
}
# Reinformer's common settings (AG §4.1 also uses one set for every dataset); AG's n and η are not stated in the
# paper (Fig. 3 ablates them): the values of the evaluation-only sweep in docs/reinformer_ag.md.
COMMON_DEFAULTS = dict(pretrain_updates=50_000, context_len=5, learning_rate=1e-4, warmup_steps=5000, rtg_scale=1e-3,
                       ag_steps=3, ag_lr=1e-3)


# The CPU-scale protocol (--preset cpu): a small model and 6000 updates, ~25 min on a CPU.
PRESETS: dict[str, dict] = {
    "cpu": dict(embed_dim=128, n_layers=3, n_heads=4, batch_size=64, warmup_steps=1000, pretrain_updates=6000,
                critic_updates=2, eval_interval=2000, eval_episodes=10),
}
# Smallest valid value of each numeric flag (checked before any work).
VALID_MIN = dict(generate_steps=1, pretrain_updates=0, eval_interval=1, eval_episodes=1, log_interval=1,
                 checkpoint_interval=1, embed_dim=1, n_layers=1, n_heads=1, context_len=1, eval_context_len=1,
                 batch_size=1, learning_rate=0.0, weight_decay=0.0, warmup_steps=1, grad_clip=0.0,
                 init_temperature=1e-8, temperature_lr=0.0, rtg_scale=1e-12, critic_hidden=1, critic_lr=0.0,
                 critic_batch_size=1, critic_updates=1, gamma=0.0, polyak=0.0, ag_steps=0, ag_lr=0.0)


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
    table.setdefault("target_entropy", -float(data.act_dim))  # β = −dim(A) (ODT Table C.1, Reinformer)
    if data.ref_max_score is not None:
        table.setdefault("g_eval", data.ref_max_score)
    run.fill_defaults(args, table, data)
    args.eval_context_len = args.eval_context_len or args.context_len  # None: the training K
    if args.conditioning == "target" and args.g_eval is None:
        raise run.UserError(f"No default target return is known for '{args.env_id}' (no reference score). "
                            f"Pass --g-eval with --conditioning target.")
    if args.ag_steps < 0 or args.ag_lr < 0:
        raise run.UserError(f"--ag-steps and --ag-lr must be non-negative (got {args.ag_steps}, {args.ag_lr}).")
    return args


# ALGO LOGIC: the Reinformer transformer
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
    """Post-LayerNorm transformer block with a GELU MLP (the Reinformer reference's block)."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Dropout(dropout))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, attn_mask))
        return self.ln2(x + self.mlp(x))


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, 3K, 3K) mask, True where a token may attend: causal, never to masked steps, always to itself
    (no empty softmax row). Only the adaptive evaluation context needs it: training windows are right-padded."""
    tokens = valid.repeat_interleave(3, dim=1)  # (s, R, a) per step
    n = tokens.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    return (causal & (tokens[:, None, :] | eye))[:, None]


class Trunk(nn.Module):
    """Embeddings + GPT over interleaved (s_t, R_t, a_t) tokens; returns the outputs per token type."""

    def __init__(self, state_dim: int, act_dim: int, embed_dim: int, n_layers: int, n_heads: int,
                 dropout: float, max_ep_len: int, precision: str = "fp32"):
        super().__init__()
        self.bf16 = precision == "bf16"  # autocast of embeddings and blocks; heads and losses stay fp32
        self.embed_state = nn.Linear(state_dim, embed_dim)
        self.embed_rtg = nn.Linear(1, embed_dim)
        self.embed_action = nn.Linear(act_dim, embed_dim)
        self.embed_timestep = nn.Embedding(max_ep_len, embed_dim)  # added to all three tokens (Reinformer)
        self.embed_ln = nn.LayerNorm(embed_dim)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, n_heads, dropout) for _ in range(n_layers))

    def forward(self, rtg, states, actions, timesteps, valid=None) -> torch.Tensor:
        """rtg (B,K), states (B,K,S), actions (B,K,A), timesteps (B,K) → (B,K,3,d); index 0 = s_t, 1 = R_t."""
        b, k = states.shape[:2]
        # bf16 autocast only when asked; otherwise leave any caller's autocast alone (odt_td3's bf16 targets)
        with torch.autocast(states.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
            tokens = torch.stack(
                (self.embed_state(states), self.embed_rtg(rtg.unsqueeze(-1)), self.embed_action(actions)), dim=2
            ) + self.embed_timestep(timesteps).unsqueeze(2)
            x = self.drop(self.embed_ln(tokens.reshape(b, 3 * k, -1)))
            mask = None if valid is None else attention_mask(valid)
            for block in self.blocks:
                x = block(x, mask)
        return x.to(states.dtype).reshape(b, k, 3, -1)  # fp32 out of a bf16 autocast


class Reinformer(nn.Module):
    """R̂_t from the state token, the action distribution from the RTG token (Reinformer §4); with `separate`
    (AG §4.1) the RTG and the action come from two independent trunks."""

    def __init__(self, state_dim: int, act_dim: int, embed_dim: int, n_layers: int, n_heads: int,
                 dropout: float, max_ep_len: int, separate: bool, precision: str = "fp32"):
        super().__init__()
        trunk_args = (state_dim, act_dim, embed_dim, n_layers, n_heads, dropout, max_ep_len, precision)
        self.trunk = Trunk(*trunk_args)
        self.action_trunk = Trunk(*trunk_args) if separate else None
        self.rtg_head = nn.Linear(embed_dim, 1)
        self.mu_head = nn.Sequential(nn.Linear(embed_dim, act_dim), nn.Tanh())  # tanh mean, Normal (not squashed)
        self.log_std = nn.Parameter(torch.zeros(act_dim))  # state-independent
        # GPT-2 init (N(0, 0.02) weights, zero biases) inside the blocks only; embeddings and heads keep
        # PyTorch's default init: with a zero bias LayerNorm(W·x) = LayerNorm(W·cx) for every c > 0, so the
        # RTG token would carry only the sign of R and every state would lose its norm.
        for trunk in (self.trunk, self.action_trunk):
            if trunk is not None:
                trunk.blocks.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, rtg, states, actions, timesteps, valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        """→ predicted RTG (B,K) read at s_t, action mean (B,K,A) read at R_t."""
        h = self.trunk(rtg, states, actions, timesteps, valid)
        ha = h if self.action_trunk is None else self.action_trunk(rtg, states, actions, timesteps, valid)
        return self.rtg_head(h[:, :, 0]).squeeze(-1), self.mu_head(ha[:, :, 1])

    def predict_rtg(self, rtg, states, actions, timesteps, valid=None) -> torch.Tensor:
        return self.rtg_head(self.trunk(rtg, states, actions, timesteps, valid)[:, :, 0]).squeeze(-1)

    def predict_action(self, rtg, states, actions, timesteps, valid=None) -> torch.Tensor:
        trunk = self.trunk if self.action_trunk is None else self.action_trunk
        return self.mu_head(trunk(rtg, states, actions, timesteps, valid)[:, :, 1])

    def clamped_log_std(self) -> torch.Tensor:
        return self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


# ALGO LOGIC: IQL critic (AG §3.3, eqs. 4-5)
def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class IQLCritic(nn.Module):
    def __init__(self, state_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.q1, self.q2 = mlp(state_dim + act_dim, hidden, 1), mlp(state_dim + act_dim, hidden, 1)
        self.v = mlp(state_dim, hidden, 1)
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        for p in itertools.chain(self.q1_target.parameters(), self.q2_target.parameters()):
            p.requires_grad_(False)

    def q_values(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat((states, actions), -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def target_q(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min of the target Qs: IQL's value of an action, and the Q that AG ascends."""
        x = torch.cat((states, actions), -1)
        return torch.min(self.q1_target(x), self.q2_target(x)).squeeze(-1)

    @torch.no_grad()
    def update_targets(self, polyak: float) -> None:
        targets = [*self.q1_target.parameters(), *self.q2_target.parameters()]
        torch._foreach_lerp_(targets, [*self.q1.parameters(), *self.q2.parameters()], polyak)  # θ' ← θ' + ρ(θ − θ')


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
    """lr · min(1, (step+1)/warmup) (Reinformer: 5000 warm-up steps)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


# ALGO LOGIC: offline data: trajectory windows for the transformer, transitions for the critic
def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted suffix sums R_t = Σ_{t'≥t} r_t'."""
    return np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)


class OfflineDataset:
    """All offline trajectories as flat tensors on the training device; a batch is one fancy-indexing gather."""

    def __init__(self, data: OfflineData, rtg_scale: float, max_ep_len: int, device: torch.device):
        eps = data.episodes
        self.lengths = np.array([len(e.rewards) for e in eps], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        mean, std = data.state_mean.astype(np.float32), data.state_std.astype(np.float32)
        cat = lambda key: np.concatenate([getattr(e, key) for e in eps]).astype(np.float32)
        flat = {
            "states": (cat("observations") - mean) / std,  # frozen dataset normalisation
            "next_states": (cat("next_observations") - mean) / std,
            "actions": cat("actions"),
            "rewards": cat("rewards"),
            "dones": np.concatenate([e.terminals for e in eps]).astype(np.float32),  # truncations bootstrap
            "rtg": np.concatenate([returns_to_go(e.rewards) for e in eps]) * rtg_scale,
            "timesteps": np.concatenate([np.arange(n) for n in self.lengths]).clip(max=max_ep_len - 1),
        }
        self.flat = {k: torch.as_tensor(v).to(device) for k, v in flat.items()}
        self.device = device

    def sample_indices(self, batch_size: int, context_len: int, rng: np.random.Generator):
        """Indices (B, K) and valid mask (B, K): trajectories uniformly, a start uniformly among the full
        windows (all of [0, T−K]), right padding when a trajectory is shorter than K (Reinformer's sampler)."""
        traj = rng.integers(0, len(self.lengths), batch_size)
        length = self.lengths[traj]
        start = (rng.random(batch_size) * np.maximum(length - context_len + 1, 1)).astype(np.int64)
        pos = np.arange(context_len)
        valid = pos[None, :] < np.minimum(context_len, length - start)[:, None]
        step = np.where(valid, start[:, None] + pos[None, :], start[:, None])
        return self.offsets[traj][:, None] + step, valid

    def sample(self, batch_size: int, context_len: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx, valid = self.sample_indices(batch_size, context_len, rng)
        idx = torch.as_tensor(idx, device=self.device)
        valid = torch.as_tensor(valid, device=self.device)
        batch = {k: self.flat[k][idx] for k in ("states", "actions", "rtg", "timesteps")}
        batch["states"] = batch["states"] * valid.unsqueeze(-1)  # padded steps are zeros
        batch["actions"] = batch["actions"] * valid.unsqueeze(-1)
        batch["rtg"] = batch["rtg"] * valid
        batch["timesteps"] = batch["timesteps"] * valid
        batch["valid"] = valid
        return batch

    def sample_transitions(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(rng.integers(0, len(self.flat["rewards"]), batch_size), device=self.device)
        return {k: self.flat[k][idx] for k in ("states", "actions", "rewards", "next_states", "dones")}


# ALGO LOGIC: the losses, and one update of each network (AG Alg. 1, "Training")
def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """L2^τ(u) = |τ − 1(u < 0)|·u² elementwise (AG eq. 5; Reinformer's max-return loss)."""
    return (tau - (u < 0).float()).abs() * u.square()


def reinformer_losses(model: Reinformer, log_temperature: torch.Tensor, batch: dict, expectile: float,
                      target_entropy: float):
    """Reinformer §4: max-return loss + NLL − λ·H for θ (ODT eq. 6 plus the max-return term), and the dual loss
    of log λ (ODT eq. 7); all masked to valid tokens."""
    rtg_pred, mu = model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"])
    valid = batch["valid"].float()
    n_valid = valid.sum()
    target = batch["rtg"]
    # Max-return loss: expectile regression of R̂ towards R, residual normalised by mean |R| (τ = 0.99).
    u = (target - rtg_pred) / ((target.abs() * valid).sum() / n_valid).clamp(min=1e-8)
    rtg_loss = (expectile_loss(u, expectile) * valid).sum() / n_valid
    log_std = model.clamped_log_std()
    log_prob = (-0.5 * ((batch["actions"] - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi))
    nll = -(log_prob.sum(-1) * valid).sum() / n_valid
    entropy = (log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum()  # closed form, the same at every token
    temperature = log_temperature.exp()
    loss = rtg_loss + nll - temperature.detach() * entropy
    temperature_loss = temperature * (entropy - target_entropy).detach()  # raises λ when H < β
    return loss, temperature_loss, {"train/rtg_loss": rtg_loss, "train/nll": nll, "train/entropy": entropy,
                                    "train/loss": loss, "train/temperature": temperature}


def reinformer_update(model, optimizer, scheduler, log_temperature, temperature_optimizer, batch: dict, *,
                      expectile: float, target_entropy: float, grad_clip: float) -> dict:
    """One LAMB step of θ (clipped gradient, warm-up schedule) and one Adam step of log λ on a batch of windows."""
    model.train()
    loss, temperature_loss, stats = reinformer_losses(model, log_temperature, batch, expectile, target_entropy)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    temperature_optimizer.zero_grad(set_to_none=True)
    temperature_loss.backward()
    temperature_optimizer.step()
    return {k: v.detach() for k, v in stats.items()}


def iql_losses(critic: IQLCritic, batch: dict, gamma: float, expectile: float) -> tuple[torch.Tensor, dict]:
    """AG eqs. (4)-(5) with IQL's twin Qs: both Qs regress on r + γV(s'), V on the τ-expectile of min Q'(s, a)."""
    s, a, r, s2, done = batch["states"], batch["actions"], batch["rewards"], batch["next_states"], batch["dones"]
    with torch.no_grad():
        q_target_sa = critic.target_q(s, a)
        q_backup = r + gamma * (1.0 - done) * critic.v(s2).squeeze(-1)  # eq. (4); no bootstrap at terminals
    v = critic.v(s).squeeze(-1)
    v_loss = expectile_loss(q_target_sa - v, expectile).mean()  # eq. (5)
    q1, q2 = critic.q_values(s, a)
    q_loss = F.mse_loss(q1, q_backup) + F.mse_loss(q2, q_backup)  # eq. (4), both Qs
    return v_loss + q_loss, {"train/critic_q_loss": q_loss, "train/critic_v_loss": v_loss,
                             "train/critic_q_mean": q1.mean()}


def iql_update(critic: IQLCritic, critic_optimizer, batch: dict, *, gamma: float, expectile: float,
               polyak: float) -> dict:
    """One Adam step of Q1, Q2 and V on a batch of transitions, then one Polyak step of the target Qs."""
    loss, stats = iql_losses(critic, batch, gamma, expectile)
    critic_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    critic_optimizer.step()
    critic.update_targets(polyak)
    return {k: v.detach() for k, v in stats.items()}


# ALGO LOGIC: Action Gradient (AG eqs. 1-2, 6-8), then acting in the environment (AG Alg. 1, "Inference")
def action_gradient(q_fn, states: torch.Tensor, a0: torch.Tensor, steps: int, lr: float, method: str,
                    low: torch.Tensor, high: torch.Tensor, zeta1: float = 0.9, zeta2: float = 0.999,
                    eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """n ascent steps on Q(s, ·) from a⁰ for every env at once, then the argmax-Q iterate among {a⁰, …, aⁿ}.

    Returns the chosen actions (N, A) and the index of the chosen iterate (N,) (0 = the model's action).
    """
    iterates, a = [a0], a0
    m = torch.zeros_like(a0)  # first moment (eq. 6: v; eq. 8: m)
    r = torch.zeros_like(a0)  # second moment (eq. 7: r; eq. 8: v)
    for _ in range(steps):
        with torch.enable_grad():
            a_var = a.detach().requires_grad_(True)
            g = torch.autograd.grad(q_fn(states, a_var).sum(), a_var)[0]  # ∇_a Q(s, aⁱ), per env
        if method == "sgd":
            step = g  # eq. (1)
        elif method == "momentum":
            m = m + zeta1 * g  # eq. (6) as printed: vⁱ = vⁱ⁻¹ + ζ∇Q
            step = m
        elif method == "rmsprop":
            r = zeta2 * r + (1 - zeta2) * g.square()  # eq. (7)
            step = g / (r.sqrt() + eps)
        elif method == "adam":
            m = zeta1 * m + (1 - zeta1) * g  # eq. (8) as printed: bias correction by (1 − ζ)
            r = zeta2 * r + (1 - zeta2) * g.square()
            step = (m / (1 - zeta1)) / ((r / (1 - zeta2)).sqrt() + eps)
        else:
            raise ValueError(method)
        a = torch.max(torch.min(a + lr * step, high), low)  # stay in the action range
        iterates.append(a)
    cand = torch.stack(iterates, dim=1)  # (N, n+1, A)
    n, k = cand.shape[:2]
    q = q_fn(states.repeat_interleave(k, 0), cand.reshape(n * k, -1)).reshape(n, k)
    best = q.argmax(dim=1)  # eq. (2); a tie keeps the earliest iterate, so a⁰ wins when nothing improves
    return cand[torch.arange(n, device=cand.device), best], best


class RFAgent:
    """Keeps the per-env context for rollouts (common.evaluation.Policy); all envs step in lockstep.

    Each step: pass 1 predicts R̂_t at the state token and writes it into the RTG slot; pass 2 reads the
    action mean at the RTG token (Reinformer); then Action Gradient on the IQL critic if ag_steps > 0.
    """

    def __init__(self, model: Reinformer, critic: IQLCritic, args: Args, state_mean, state_std, device,
                 max_ep_len: int, low: np.ndarray, high: np.ndarray, ag_steps: int, ag_lr: float):
        self.model, self.critic, self.args, self.device = model, critic, args, device
        self.context_len, self.max_ep_len = args.eval_context_len, max_ep_len
        self.ag_steps, self.ag_lr = ag_steps, ag_lr
        self.mean, self.std = torch.as_tensor(state_mean, device=device), torch.as_tensor(state_std, device=device)
        self.low, self.high = (torch.as_tensor(x, device=device, dtype=torch.float32) for x in (low, high))
        self.act_dim = model.log_std.shape[0]
        self.stats = {"changed": 0.0, "q_gain": 0.0, "shift": 0.0, "n": 0}

    def reset(self, obs: np.ndarray) -> None:
        n, horizon = obs.shape[0], self.max_ep_len + 1
        self.t = 0
        self.states = torch.zeros(n, horizon, obs.shape[1], device=self.device)
        self.actions = torch.zeros(n, horizon, self.act_dim, device=self.device)
        self.rtg = torch.zeros(n, horizon, device=self.device)
        self.rtg[:, 0] = (self.args.g_eval or 0.0) * self.args.rtg_scale  # used by --conditioning target only

    def _grow(self) -> None:  # episodes longer than the env's time limit
        for name in ("states", "actions", "rtg"):
            buf = getattr(self, name)
            setattr(self, name, torch.cat((buf, torch.zeros_like(buf)), dim=1))

    def _adaptive_valid(self, lo: int, t: int) -> torch.Tensor:
        """AG §4.1: step t−j stays while R̂_{t−j} > R̂_{t−j+1} for all j' ≤ j (up to the window)."""
        window = self.rtg[:, lo:t + 1]
        keep_prev = window[:, :-1] > window[:, 1:]  # (N, w−1): step i is kept if it beats step i+1
        chain = torch.cumprod(keep_prev.flip(1).int(), dim=1).flip(1).bool()  # unbroken back from t
        return torch.cat((chain, torch.ones(chain.shape[0], 1, dtype=torch.bool, device=chain.device)), dim=1)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.t + 1 >= self.states.shape[1]:
            self._grow()
        t = self.t
        s = (torch.as_tensor(obs, device=self.device) - self.mean) / self.std
        self.states[:, t] = s
        lo = max(0, t + 1 - self.context_len)
        steps = torch.arange(lo, t + 1, device=self.device).clamp(max=self.max_ep_len - 1).expand(obs.shape[0], -1)
        window = lambda: (self.rtg[:, lo:t + 1], self.states[:, lo:t + 1], self.actions[:, lo:t + 1], steps)
        self.model.eval()
        if self.args.conditioning == "predicted":  # pass 1: R̂_t from the state token (the R_t slot is unseen)
            self.rtg[:, t] = self.model.predict_rtg(*window())[:, -1]
        valid = self._adaptive_valid(lo, t) if self.args.adaptive_context else None
        a0 = self.model.predict_action(*window(), valid)[:, -1]  # pass 2: the mean at the R_t token
        action = a0
        if self.ag_steps > 0:
            a = self.args
            action, best = action_gradient(self.critic.target_q, s, a0, steps=self.ag_steps, lr=self.ag_lr,
                                           method=a.ag_method, low=self.low, high=self.high, zeta1=a.ag_zeta1,
                                           zeta2=a.ag_zeta2, eps=a.ag_eps)
            self.stats["changed"] += (best > 0).float().sum().item()
            self.stats["q_gain"] += (self.critic.target_q(s, action) - self.critic.target_q(s, a0)).sum().item()
            self.stats["shift"] += (action - a0).norm(dim=-1).sum().item()
            self.stats["n"] += obs.shape[0]
        self.actions[:, t] = action  # the executed action enters the context
        return action.cpu().numpy()

    def observe(self, rewards: np.ndarray) -> None:
        if self.args.conditioning == "target":  # DT: R_{t+1} = R_t − r_t
            r = torch.as_tensor(rewards, device=self.device, dtype=torch.float32)
            self.rtg[:, self.t + 1] = self.rtg[:, self.t] - r * self.args.rtg_scale
        self.t += 1


def evaluate_both(model, critic, args, data, eval_envs, device, max_ep_len, *, ag_steps: int, ag_lr: float) -> dict:
    """Plain RF (`eval_rf/...`) and RF+AG (`eval/...`) on the same episode seeds; with n = 0 both are RF."""
    seeds = eval_seeds(args.seed, args.eval_episodes)  # same every evaluation
    space, metrics = eval_envs.single_action_space, {}
    for prefix, steps in (("eval_rf", 0), ("eval", ag_steps)):
        if prefix == "eval" and steps == 0:
            metrics.update({k.replace("eval_rf/", "eval/"): v for k, v in metrics.items()})
            break
        agent = RFAgent(model, critic, args, state_mean=data.state_mean, state_std=data.state_std, device=device,
                        max_ep_len=max_ep_len, low=space.low, high=space.high, ag_steps=steps, ag_lr=ag_lr)
        t0 = time.perf_counter()
        result = evaluate(eval_envs, agent, seeds, data.normalized_score)
        elapsed = time.perf_counter() - t0
        metrics.update({k.replace("eval/", f"{prefix}/"): v for k, v in result.items()})
        metrics[f"{prefix}/env_steps_per_second"] = result["eval/length_mean"] * len(seeds) / max(elapsed, 1e-9)
        if steps:
            n = max(agent.stats["n"], 1)
            metrics.update({"eval/ag_changed_frac": agent.stats["changed"] / n,
                            "eval/ag_q_gain": agent.stats["q_gain"] / n, "eval/ag_shift": agent.stats["shift"] / n})
    return metrics


def eval_seeds(seed: int, n: int) -> list[int]:
    """Reset seeds of the n evaluation episodes: the same episodes at every evaluation of a run."""
    return [10_000 + seed * 1000 + i for i in range(n)]


# The run: set-up, the run state and the training loop (AG Alg. 1); --eval-only
def set_up(args: Args, typed: set[str] | None = None) -> tuple[Args, OfflineData, torch.device, Path, dict | None]:
    """Flags, seeds, device, dataset and run folder; the checkpoint to resume from (None: a new run)."""
    run.validate_args(args, VALID_MIN)
    args, run_dir, checkpoint = run.prepare_run(args, Path(__file__).name)
    args = run.apply_preset(args, typed, PRESETS) if checkpoint is None and args.eval_only is None else args
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device, args.precision = run.pick_device(args.cuda, args.precision, typed)

    data = load_dataset(args.env_id, args.dataset_path, generate_steps=args.generate_steps, progress=args.progress)
    args = apply_dataset_defaults(args, data)
    run.validate_args(args, VALID_MIN)
    run.open_run_folder(run_dir, Path(__file__).name, args, data, device)  # config.json, and the run's first line
    return args, data, device, run_dir, checkpoint


def make_eval_envs(args: Args, data: OfflineData):
    """One vector-env slot per evaluation episode, and the episode limit (the model's timestep range)."""
    eval_envs = make_vector_env(data.make_env, args.eval_episodes)
    return eval_envs, eval_envs.envs[0].spec.max_episode_steps or 1000


def make_model(args: Args, data: OfflineData, device: torch.device, max_ep_len: int) -> Reinformer:
    return Reinformer(data.obs_dim, data.act_dim, args.embed_dim, args.n_layers, args.n_heads, args.dropout,
                      max_ep_len, separate=args.separate_networks, precision=args.precision).to(device)


class Trainer:
    """The run state (networks, optimisers, data, counters): `state_dict()` is the checkpoint, `train()` Alg. 1."""

    def __init__(self, args: Args, data: OfflineData, device: torch.device, run_dir: Path, checkpoint: dict | None):
        self.args, self.data, self.device, self.run_dir = args, data, device, run_dir
        self.rng = np.random.default_rng(args.seed)  # window and transition sampling
        self.eval_envs, self.max_ep_len = make_eval_envs(args, data)

        # ALGO LOGIC: model, critic, optimisers, data
        self.model = make_model(args, data, device, self.max_ep_len)
        self.optimizer = Lamb(lamb_param_groups(self.model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
        self.scheduler = warmup_schedule(self.optimizer, args.warmup_steps)
        self.log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
        self.temperature_optimizer = torch.optim.Adam([self.log_temperature], lr=args.temperature_lr,
                                                      betas=(0.9, 0.999))
        self.critic = IQLCritic(data.obs_dim, data.act_dim, args.critic_hidden).to(device)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
        self.offline = OfflineDataset(data, args.rtg_scale, self.max_ep_len, device)

        self.counters = {"updates": 0, "env_steps": 0, "rounds": 0}
        self.meter = run.StatsMeter()
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
        self.logger = run.RunLogger(run_dir, args, self.counters if self.resumed else None)
        self.checkpoints = run.Interval(args.checkpoint_interval, start=self.counters["updates"])
        self.final, self.final_at = {}, -1  # the latest evaluation in this process, and its update

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "log_temperature": self.log_temperature.detach().cpu(),
                "temperature_optimizer": self.temperature_optimizer.state_dict(), "critic": self.critic.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "counters": dict(self.counters),
                "meter": self.meter.state_dict(), "rng": run.rng_state(self.rng)}

    def load_state_dict(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        with torch.no_grad():
            self.log_temperature.copy_(checkpoint["log_temperature"])
        self.temperature_optimizer.load_state_dict(checkpoint["temperature_optimizer"])
        self.critic.load_state_dict(checkpoint["critic"])
        self.critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
        self.counters.update(checkpoint["counters"])
        self.meter.load_state_dict(checkpoint["meter"])
        run.restore_rng_state(self.rng, checkpoint["rng"])

    def train(self, stop: run.StopFlag) -> None:
        """AG Alg. 1, "Training": train π_θ (Reinformer) and Q_φ (IQL) with D, one step of each per update; and its
        "Inference" (RF and RF+AG) on the rows at multiples of eval_interval and after the last update. A metrics row
        every log_interval updates and after the first; a checkpoint at the first row past each checkpoint_interval."""
        a, counters = self.args, self.counters
        bar = run.progress_bar("training", counters["updates"], a.pretrain_updates, "upd", a.progress)
        while counters["updates"] < a.pretrain_updates and not stop.requested:  # a stop: between two updates
            t0 = time.perf_counter()
            windows = self.offline.sample(a.batch_size, a.context_len, self.rng)  # train π_θ with D
            stats = reinformer_update(self.model, self.optimizer, self.scheduler, self.log_temperature,
                                      self.temperature_optimizer, windows, expectile=a.expectile,
                                      target_entropy=a.target_entropy, grad_clip=a.grad_clip)
            for _ in range(a.critic_updates):  # train Q_φ with D, never on AG-adjusted actions (AG §3.3)
                transitions = self.offline.sample_transitions(a.critic_batch_size, self.rng)
                stats |= iql_update(self.critic, self.critic_optimizer, transitions, gamma=a.gamma,
                                    expectile=a.iql_expectile, polyak=a.polyak)
            counters["updates"] += 1
            self.meter.add(stats, time.perf_counter() - t0)
            bar.update(1)
            updates, last = counters["updates"], counters["updates"] == a.pretrain_updates
            if updates == 3 and not self.resumed:  # updates 2-3: past the first call's warm-up
                run.print_cost_estimate(self.meter.seconds / max(self.meter.n, 1), a, 0)
            if updates % a.log_interval == 0 or updates == 1 or last:
                extra = {"phase": "pretrain", "charts/updates_per_second": self.meter.updates_per_second()}
                if updates % a.eval_interval == 0 or last:  # Inference: RF and RF+AG from the same model
                    self.final, self.final_at = self.evaluate(), updates
                    extra.update(self.final)
                    bar.set_postfix(rf=f"{extra['eval_rf/return_mean']:.3g}", ag=f"{extra['eval/return_mean']:.3g}")
                self.log_row(extra)
                if self.checkpoints.due(updates) or last:
                    self.save_checkpoint()
        bar.close()

    def evaluate(self) -> dict:
        """Plain RF (`eval_rf/...`) and RF+AG (`eval/...`) with the run's n and η (Alg. 1, "Inference")."""
        return evaluate_both(self.model, self.critic, self.args, self.data, self.eval_envs, self.device,
                             self.max_ep_len, ag_steps=self.args.ag_steps, ag_lr=self.args.ag_lr)

    def log_row(self, extra: dict) -> None:
        self.logger.log_stats(self.counters, self.meter, extra)  # stops at a non-finite statistic

    def save_checkpoint(self) -> None:
        self.logger.stamp(self.counters)  # the wall time and metrics rows a resume continues from
        if self.args.save_model:
            run.save_checkpoint(self.run_dir, self.state_dict())

    def stopped(self) -> dict:
        self.save_checkpoint()
        return run.stop_run(self.run_dir, self.logger, self.counters)

    def finish(self) -> dict:
        """Final metrics row (evaluating unless the last update did), model.pt, the --capture-video episode and
        summary.json."""
        a = self.args
        final = self.final if self.final_at == self.counters["updates"] else self.evaluate()  # resumed after it
        summary = {"run_dir": str(self.run_dir), "env_id": a.env_id, "counters": self.counters,
                   "wall_time_s": self.logger.wall_time(), **final}
        self.log_row({"phase": "final", **final})
        space = self.eval_envs.single_action_space
        agent = RFAgent(self.model, self.critic, a, self.data.state_mean, self.data.state_std, self.device,
                        self.max_ep_len, space.low, space.high, a.ag_steps, a.ag_lr)
        networks = {"model": self.model.state_dict(), "critic": self.critic.state_dict()}  # --eval-only needs both
        run.finish_run(self.run_dir, self.logger, summary, networks if a.save_model else None,
                       video=(self.data.make_env, agent, eval_seeds(a.seed, 1)[0]) if a.capture_video else None,
                       report=False)  # RF and RF+AG: the line below
        print(f"final: RF return {final['eval_rf/return_mean']:.3g}, RF+AG return {final['eval/return_mean']:.3g} ± "
              f"{final['eval/return_std']:.3g}, normalized {final['eval/normalized_score_mean']:.3g} → {self.run_dir}")
        return summary


# --eval-only: AG §5, tuning AG needs only the evaluation phase. Fields an --eval-only run takes from the trained
# run (the network's shape and its input convention); every other flag is the command line's.
MODEL_FIELDS = ("env_id", "dataset_path", "generate_steps", "embed_dim", "n_layers", "n_heads", "dropout",
                "context_len", "separate_networks", "rtg_scale", "critic_hidden")


def evaluate_only(args: Args) -> dict:
    """--eval-only: evaluate one trained model for every (η, n) of the sweep lists (AG §5: tuning AG needs
    only the evaluation phase). Rows go to metrics.jsonl (phase 'eval_only'), the table to summary.json."""
    model_path = run.read_finished_run(Path(args.eval_only), Path(__file__).name, MODEL_FIELDS, args)
    args, data, device, run_dir, _ = set_up(args)
    eval_envs, max_ep_len = make_eval_envs(args, data)
    model = make_model(args, data, device, max_ep_len)
    critic = IQLCritic(data.obs_dim, data.act_dim, args.critic_hidden).to(device)
    run.load_states(model_path, {"model": model, "critic": critic}, device, f"--eval-only ({args.env_id})")
    logger, rows = run.RunLogger(run_dir, args, None), []
    grid = [(0, 0.0), *itertools.product(args.sweep_ag_steps or (args.ag_steps,), args.sweep_ag_lr or (args.ag_lr,))]
    for steps, lr in tqdm(grid, desc="sweep", disable=not args.progress):
        metrics = evaluate_both(model, critic, args, data, eval_envs, device, max_ep_len, ag_steps=steps, ag_lr=lr)
        row = {"global_step": 0, "env_steps": 0, "rounds": 0, "phase": "eval_only", "ag/steps": steps, "ag/lr": lr,
               **{k.replace("eval/", ""): v for k, v in metrics.items() if k.startswith("eval/")}}
        logger.log(row)
        rows.append(row)
        print(f"n={steps:3d} eta={lr:<8g} {args.ag_method}: return {row['return_mean']:9.2f} ± {row['return_std']:.2f},"
              f" normalized {row['normalized_score_mean']:7.2f}, Q gain {row.get('ag_q_gain', 0.0):.4f}")
    summary = {"run_dir": str(run_dir), "evaluated": str(model_path), "env_id": args.env_id, "rows": rows}
    return run.finish_run(run_dir, logger, summary, report=False)  # the table above


def main(args: Args, typed: set[str] | None = None) -> dict:
    if args.eval_only is not None:
        return evaluate_only(args)  # no training: evaluate a finished run's model (AG §5)
    args, data, device, run_dir, checkpoint = set_up(args, typed)  # flags, seeds, dataset, run folder
    trainer = Trainer(args, data, device, run_dir, checkpoint)  # model, critic, optimisers; resumes a checkpoint
    stop = run.StopFlag()  # Ctrl-C / SIGTERM: checkpoint at the next safe point, exit 3
    trainer.train(stop)  # AG Alg. 1: offline Reinformer + IQL updates, evaluating RF and RF+AG
    return trainer.stopped() if stop.requested else trainer.finish()


if __name__ == "__main__":
    run.cli(main, Args)
