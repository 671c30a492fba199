"""Decision Transformer + GRPO: online finetuning with pure RL gradients.

Paper: J. Luo, Y. Zhu, "Online Finetuning Decision Transformers with Pure RL Gradients", arXiv 2601.00167;
(R) marks what the public reviews of its ICLR 2026 submission (OpenReview UPeqfbXgvf) state. Pretraining is ODT's
(arXiv 2202.05607 Alg. 1; differences in odt.py). A round: a reference episode; branch points ∝ the predicted
action variance (R); per point G members restored to that state, L_traj sampled + L_eval mean-action steps each
(R: L_eval ≈ 400); advantages normalised in the group (R); PPO-clipped updates of each member's sequence ratio.
Q-GRPO (R, Fig. 3c): where the env cannot restore a state, G sampled actions scored by a TD3 twin-Q critic.

Usage:
    python dt_grpo.py --env-id hopper-random-v2 --preset cpu     # CPU-scale protocol
    python dt_grpo.py --env-id hopper-medium-v2 --advantage critic  # Q-GRPO
    python dt_grpo.py --resume runs/<run folder>                  # continue a stopped run

Unknown in the paper (only its abstract is public), chosen here, each a flag:
- G 8, L_traj 10, 4 groups per round, 4 epochs × 8-member minibatches: no published values.
- ε 0.2 and Adam 2e-5 on the paper's joint ratio: at 5e-5 it leaves the clip range within 1-3 updates.
- No relabeling (abstract, R): RTG_{t+1} = RTG_t − r_t·scale in the continuation too and g_online = g_eval,
  so π_old and π_θ are one conditional (ρ = 1 exactly on fresh data). --relabel is ODT's, as an ablation.
- Mean-action reference episode (--reference-sample): the policy evaluation measures; Q-GRPO samples it.
- Entropy bonus: ODT's learned λ, its dual update continued (--entropy-coef); k3 KL to the pretrained policy
  optional (--kl-coef, off).
- Groups roll one at a time: --online-steps and --eval-interval hold to within one group.
- CPU speed: dropout masks draw 16-bit uniforms (p rounded to a multiple of 2^-16), see the `Dropout` class;
  attention is computed explicitly on CPU (torch's fused kernels cannot take those masks).
Details and measurements: docs/dt_grpo.md
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.datasets import Episode, OfflineData, load_dataset
from common.evaluation import evaluate, make_vector_env
from common.run import (
    Interval,
    RunLogger,
    StatsMeter,
    StopFlag,
    UserError,
    apply_preset,
    atomic_save,
    check_finite,
    cli,
    mark_stopped,
    pick_device,
    prepare_run,
    print_cost_estimate,
    record_video,
    resolve_precision,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    start_run_folder,
    validate_args,
    write_atomic,
)


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
    """offline gradient updates before finetuning (None: per-dataset default, Table C.4)"""
    online_steps: int = 200_000
    """online environment steps of finetuning (paper Table 5.1: 200k)"""
    updates_per_round: int = 300
    """gradient updates after each online rollout (Table C.3)"""
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
    """paper: the paper's model and budgets; cpu: a CPU-scale protocol (small model, short budgets; values
    printed at start-up, see PRESETS) for every flag left at its default"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """transformer forward/backward and rollouts under bf16 autocast, or fp32; auto: bf16 where the hardware
    has native bf16 (recent GPUs, AVX512-BF16 CPUs). Weights, optimiser state and losses are fp32 either way"""

    # Algorithm specific arguments
    embed_dim: int | None = None
    """transformer width (None: per-dataset default, 512; 1024 for antmaze-umaze-diverse)"""
    n_layers: int = 4
    """transformer blocks"""
    n_heads: int = 4
    """attention heads"""
    dropout: float = 0.1
    """dropout in embeddings, attention and MLP"""
    context_len: int | None = None
    """training context length K (None: per-dataset default, 20)"""
    eval_context_len: int | None = None
    """context length for evaluation and online rollouts (None: per-dataset default, Table C.4)"""
    batch_size: int = 256
    """windows per gradient update"""
    learning_rate: float | None = None
    """LAMB learning rate (None: per-dataset default, Table C.4)"""
    weight_decay: float | None = None
    """LAMB weight decay (None: per-dataset default, Table C.4)"""
    warmup_steps: int = 10_000
    """linear learning-rate warm-up (gradient steps), continued from pretraining into finetuning"""
    grad_clip: float = 0.25
    """global gradient-norm clip"""
    init_temperature: float = 0.1
    """initial entropy temperature λ (log λ is learned)"""
    temperature_lr: float = 1e-4
    """Adam learning rate of log λ"""
    target_entropy: float | None = None
    """entropy lower bound β (None: −dim(A))"""
    buffer_size: int | None = None
    """replay capacity in trajectories (None: per-dataset default, 1000 Gym / 1500 AntMaze)"""
    rtg_scale: float | None = None
    """multiplier of return-to-go tokens (None: 0.001 locomotion, 1 AntMaze)"""
    g_eval: float | None = None
    """target return for evaluation (None: per-dataset default, Table C.4)"""
    g_online: float | None = None
    """target return for exploration rollouts (None: per-dataset default, Table C.4)"""
    use_timestep_embedding: bool | None = None
    """learned absolute timestep embedding (None: off for Gym, on for AntMaze, Table C.4)"""
    # GRPO online finetuning (arXiv 2601.00167); None: per-dataset default from GRPO_DEFAULTS
    group_size: int | None = None
    """G: members per group (sub-trajectories branched from one simulator state, or actions scored by Q)"""
    sub_len: int | None = None
    """L_traj: sampled steps per member (the steps the sequence-level ratio covers)"""
    cont_len: int | None = None
    """L_eval: mean-action continuation steps added to each member's score (paper: ≈ 400 on MuJoCo)"""
    groups_per_round: int | None = None
    """groups (branch points) per round"""
    ratio: Literal["joint", "geometric"] = "joint"
    """sequence ratio of a member: exp(Σ_t log π_θ/π_old), the joint likelihood, or exp(mean_t ...) (GSPO)"""
    clip_eps: float | None = None
    """PPO clip ε of the sequence ratio (None: 0.2 joint, 0.05 geometric)"""
    online_learning_rate: float | None = None
    """Adam learning rate of the GRPO phase"""
    grpo_epochs: int | None = None
    """passes over each round's members"""
    grpo_minibatch: int | None = None
    """members per gradient update (0: all members of the round, one update per epoch)"""
    entropy_coef: float | None = None
    """entropy bonus weight (None: ODT's learned temperature λ, its dual update continued)"""
    kl_coef: float = 0.0
    """weight of the KL to the frozen pretrained policy (k3 estimator); 0 switches it off"""
    adv_eps: float = 1e-6
    """ε of the group normalisation (R_i − mean) / (std + ε)"""
    max_log_ratio: float = 20.0
    """clamp of the sequence log-ratio before exp (numerical guard only)"""
    branch_sampling: Literal["variance", "top", "uniform"] = "variance"
    """branch points: drawn ∝ predicted action variance, the highest-variance steps, or uniformly (ablation)"""
    branch_gap: int | None = None
    """minimum distance in steps between a round's branch points (None: L_traj)"""
    reference_sample: bool = False
    """roll the per-round reference episode with sampled actions (default: mean action; critic mode samples)"""
    online_dropout: bool = False
    """keep dropout on in GRPO updates (off: π_θ equals π_old on fresh data)"""
    relabel: bool = False
    """ablation: relabel the RTG tokens of online windows with the achieved return-to-go (ODT)"""
    advantage: Literal["auto", "group", "critic"] = "auto"
    """group returns after a state restore, or Q-GRPO's twin-Q critic (auto: critic iff the env cannot restore)"""
    critic_lr: float = 3e-4
    """Q-GRPO: Adam learning rate of the twin-Q critic"""
    critic_updates_per_step: float = 1.0
    """Q-GRPO: critic updates per online env step (TD3: 1)"""
    critic_warmup: int = 2000
    """Q-GRPO: online env steps (critic trained, policy fixed) before the first policy update"""
    critic_buffer: int = 200_000
    """Q-GRPO: transitions kept for the critic (FIFO)"""
    gamma: float = 0.99
    """Q-GRPO: discount of the critic"""
    tau: float = 0.005
    """Q-GRPO: Polyak rate of the critic's target networks"""


# Per-dataset defaults. Keys: "<family>-<kind>" first, then "<family>". ODT paper Table C.4
# (finetuning); datasets the paper does not list use their family's medium row.
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
# GRPO phase. L_eval ≈ 400 is the paper's (Tab. 6 per its reviews); the rest are our choices (module docstring).
GRPO_DEFAULTS: dict[str, dict] = {
    "one-step": dict(group_size=16, sub_len=1, cont_len=0, groups_per_round=4, online_learning_rate=1e-3,
                     grpo_epochs=4, grpo_minibatch=0),
    "antmaze": dict(sub_len=20),
}
GRPO_COMMON_DEFAULTS = dict(group_size=8, sub_len=10, cont_len=400, groups_per_round=4, online_learning_rate=2e-5,
                            grpo_epochs=4, grpo_minibatch=8)
CLIP_EPS = {"joint": 0.2, "geometric": 0.05}  # ε per --ratio (measured: module docstring)


# The CPU-scale protocol (--preset cpu): ODT's CPU-scale pretraining, then 20k online env steps of GRPO.
PRESETS: dict[str, dict] = {
    "cpu": dict(embed_dim=128, n_layers=3, n_heads=1, batch_size=64, warmup_steps=1000, pretrain_updates=1000,
                online_steps=20_000, eval_interval=5000, eval_episodes=5),
}
# Smallest valid value of each numeric flag (checked before any work; GRPO's own settings in load_and_check()).
VALID_MIN = dict(generate_steps=1, pretrain_updates=0, online_steps=0, updates_per_round=1, min_steps_per_round=0,
                 eval_interval=1, eval_episodes=1, log_interval=1, checkpoint_interval=1, embed_dim=1, n_layers=1,
                 n_heads=1, context_len=1, eval_context_len=1, batch_size=1, learning_rate=0.0, weight_decay=0.0,
                 warmup_steps=1, grad_clip=0.0, init_temperature=1e-8, temperature_lr=0.0, rtg_scale=1e-12)


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
             **DATASET_DEFAULTS.get(f"{family}-{data.dataset_kind}", {}),
             **GRPO_COMMON_DEFAULTS, **GRPO_DEFAULTS.get(family, {}),
             **GRPO_DEFAULTS.get(f"{family}-{data.dataset_kind}", {})}
    if one_step:  # data-derived return scale and targets (one_step_defaults)
        table.update({k: v for k, v in one_step_defaults(data).items() if hasattr(args, k)})
    if family not in DATASET_DEFAULTS and data.ref_max_score is not None:
        # Unknown family: condition on the expert return (paper App. D).
        table.update(g_eval=data.ref_max_score)
    # No relabeling: the conditional that GRPO improves is the rollout one, so roll out at g_eval.
    table["g_online"] = args.g_eval if args.g_eval is not None else table.get("g_eval")
    table.setdefault("clip_eps", CLIP_EPS[args.ratio])
    table.setdefault("target_entropy", -float(data.act_dim))  # β = −dim(A) (Table C.1)
    filled = {k: v for k, v in table.items() if hasattr(args, k) and getattr(args, k) is None}
    for key, value in filled.items():
        setattr(args, key, value)
    if filled:  # nothing to fill on --resume: the run's config.json holds every value
        print(f"per-dataset defaults ({data.family}-{data.dataset_kind}): "
              + ", ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                          for k, v in filled.items()))
    missing = [f.name for f in dataclasses.fields(args) if f.name in ("g_eval", "g_online")
               and getattr(args, f.name) is None]
    if missing:
        raise UserError(f"No default target return is known for '{args.env_id}' (family '{data.family}', "
                        f"no reference score). Pass {' and '.join('--' + m.replace('_', '-') for m in missing)}.")
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
        batch["states"] = batch["states"] * valid.unsqueeze(-1)  # padded steps are zeros
        batch["actions"] = batch["actions"] * valid.unsqueeze(-1)
        batch["rtg"] = batch["rtg"] * valid
        batch["timesteps"] = batch["timesteps"] * valid
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


# ALGO LOGIC: branched group rollouts (arXiv 2601.00167)
WINDOW_KEYS = ("rtg", "states", "actions", "timesteps", "valid")  # model input order


class WindowAgent:
    """Left-padded K-step contexts for N envs that may sit at different timesteps, so groups branched at
    different steps act in one forward pass. Same tokens as DTAgent: normalised states, actions and
    RTG_{t+1} = RTG_t − r_t·scale; the last slot is the current step."""

    def __init__(self, model: DecisionTransformer, n: int, k: int, state_mean, state_std, rtg_scale: float,
                 max_ep_len: int, device: torch.device):
        self.model, self.k, self.rtg_scale, self.max_ep_len, self.device = model, k, rtg_scale, max_ep_len, device
        self.mean = torch.as_tensor(state_mean, device=device)
        self.std = torch.as_tensor(state_std, device=device)
        s, a = self.mean.shape[0], model.mu_head.out_features
        self.win = {"states": torch.zeros(n, k, s, device=device), "actions": torch.zeros(n, k, a, device=device),
                    "rtg": torch.zeros(n, k, device=device), "timesteps": torch.zeros(n, k, dtype=torch.long,
                                                                                     device=device),
                    "valid": torch.zeros(n, k, dtype=torch.bool, device=device)}

    def normalise(self, obs) -> torch.Tensor:
        return (torch.as_tensor(obs, device=self.device, dtype=torch.float32) - self.mean) / self.std

    def push(self, obs: np.ndarray, rtg: torch.Tensor, t: torch.Tensor) -> None:
        """Append step t (observation, RTG token) to every window; the oldest step drops out."""
        for key in WINDOW_KEYS:
            self.win[key] = self.win[key].roll(-1, dims=1)
        self.win["states"][:, -1] = self.normalise(obs)
        self.win["actions"][:, -1] = 0.0
        self.win["rtg"][:, -1] = rtg
        self.win["timesteps"][:, -1] = t.clamp(max=self.max_ep_len - 1)
        self.win["valid"][:, -1] = True

    @torch.inference_mode()
    def act(self, sample: bool) -> tuple[np.ndarray, torch.Tensor]:
        """Action at the current step (sampled or tanh(μ)) and Σ_dims σ² of the pre-tanh Gaussian."""
        self.model.eval()
        h = self.model(*(self.win[k] for k in WINDOW_KEYS))[:, -1]
        mu, log_std = self.model.action_dist(h)
        action = tanh_normal_rsample(mu, log_std)[0] if sample else torch.tanh(mu)
        self.win["actions"][:, -1] = action
        return action.cpu().numpy(), (2 * log_std).exp().sum(-1)

    def next_rtg(self, rewards: np.ndarray) -> torch.Tensor:
        r = torch.as_tensor(rewards, device=self.device, dtype=torch.float32)
        return self.win["rtg"][:, -1] - r * self.rtg_scale


def can_restore(env) -> bool:
    return hasattr(env.unwrapped, "set_state")


def sim_state(env) -> np.ndarray:
    """qpos, qvel, the solver's warm start and the time: set_state(qpos, qvel) alone reproduces the next
    step only up to ~1e-6 when contacts are active, because MuJoCo warm-starts its solver from qacc."""
    d = env.unwrapped.data
    return np.concatenate((d.qpos, d.qvel, d.qacc_warmstart, [d.time]))


def restore(env, seed: int, state: np.ndarray | None, t: int) -> None:
    """Put `env` in the state the reference episode had at step t: reset with the episode's seed (this also
    restores goals and anything else drawn at reset), then the MuJoCo state and the TimeLimit counter."""
    env.reset(seed=seed)
    if t == 0:
        return
    u = env.unwrapped
    nq, nv = u.data.qpos.size, u.data.qvel.size
    u.set_state(state[:nq], state[nq:nq + nv])
    u.data.qacc_warmstart[:] = state[nq + nv:nq + 2 * nv]
    u.data.time = state[-1]
    wrapper = env
    while wrapper is not None:
        if hasattr(wrapper, "_elapsed_steps"):
            wrapper._elapsed_steps = t
        wrapper = getattr(wrapper, "env", None)


def reference_rollout(env, agent: WindowAgent, seed: int, target: float, sample: bool) -> dict[str, np.ndarray]:
    """One episode; records per step the observation, action, RTG token, reward, simulator state and σ²."""
    obs, _ = env.reset(seed=seed)
    restorable = can_restore(env)
    rec: dict[str, list] = {k: [] for k in ("obs", "actions", "rtg", "rewards", "sim", "var")}
    rtg, t, done = torch.full((1,), target, device=agent.device), 0, False
    while not done:
        if restorable:
            rec["sim"].append(sim_state(env))
        agent.push(obs[None], rtg, torch.full((1,), t, device=agent.device))
        action, var = agent.act(sample)
        rec["obs"].append(np.asarray(obs, np.float32))
        rec["actions"].append(action[0])
        rec["rtg"].append(float(rtg[0]))
        rec["var"].append(float(var[0]))
        obs, reward, terminated, truncated, _ = env.step(action[0])
        rec["rewards"].append(float(reward))
        rtg, t, done = agent.next_rtg(np.array([reward])), t + 1, terminated or truncated
    out = {k: np.asarray(v, np.float64 if k == "sim" else np.float32) for k, v in rec.items()}
    # s_T and RTG_T after the last step, and whether the episode terminated (Q-GRPO's TD targets)
    out.update(last_obs=np.asarray(obs, np.float32), last_rtg=np.float32(rtg[0]), terminated=bool(terminated))
    return out


def branch_points(variance: np.ndarray, n: int, mode: str, rng: np.random.Generator, gap: int = 1) -> np.ndarray:
    """Active sampling: n steps of the reference, at least `gap` apart, drawn without replacement with
    probability ∝ the predicted action variance Σσ² ("variance"), taken greedily by variance ("top"; ties:
    earliest first) or drawn uniformly. When the episode is too short for n points, they repeat (one-step
    episodes: every group branches at t = 0)."""
    weight = np.asarray(variance, np.float64).clip(min=0) + 1e-12
    free = np.ones(len(weight), bool)
    picked: list[int] = []
    while len(picked) < n and free.any():
        if mode == "top":
            t = int(np.argmax(np.where(free, weight, -1.0)))
        else:
            p = free * (weight if mode == "variance" else 1.0)
            t = int(rng.choice(len(p), p=p / p.sum()))
        picked.append(t)
        free[max(0, t - gap + 1):t + gap] = False
    return np.resize(np.array(picked, np.int64), n)


def group_advantages(scores: torch.Tensor, eps: float) -> torch.Tensor:
    """GRPO advantages: (R_i − mean) / (std + ε) within each group; scores (n_groups, G), population std."""
    return (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, unbiased=False, keepdim=True) + eps)


def reference_windows(agent: WindowAgent, ref: dict, steps: np.ndarray) -> dict[str, torch.Tensor]:
    """The reference episode's DT window at each of `steps` (its K−1 previous steps, left-padded, then s_t and
    RTG_t with a zero action slot), exactly what the policy saw when acting there. Step T (after the last
    action) uses s_T and RTG_T."""
    k, dev = agent.k, agent.device
    obs = np.concatenate((ref["obs"], ref["last_obs"][None]))
    rtg = np.append(ref["rtg"], ref["last_rtg"])
    actions = np.concatenate((ref["actions"], np.zeros_like(ref["actions"][:1])))
    pos = np.asarray(steps)[:, None] + np.arange(-(k - 1), 1)[None]
    hist = np.clip(pos, 0, None)
    valid = torch.as_tensor(pos >= 0, device=dev)
    act = torch.as_tensor(actions[hist], device=dev)
    act[:, -1] = 0.0  # a_t is what the policy chooses
    return {"rtg": torch.as_tensor(rtg[hist], device=dev) * valid,
            "states": agent.normalise(obs[hist]) * valid[..., None], "actions": act * valid[..., None],
            "timesteps": torch.as_tensor(hist, device=dev).clamp(max=agent.max_ep_len - 1), "valid": valid}


def rollout_groups(envs: list, agent: WindowAgent, ref: dict[str, np.ndarray], t0s: np.ndarray, seed: int,
                   args: Args) -> dict:
    """G members per branch point t0: shared reference context up to t0, then L sampled steps recorded
    as training windows, then up to L_eval mean-action steps; score = return over both parts. With --relabel
    the continuation runs on to the end of the episode (ODT relabels with the full achieved return-to-go);
    the score still covers L + L_eval steps; every step is counted."""
    g, n = args.group_size, len(envs)
    t0 = np.repeat(t0s, g)  # member i belongs to group i // G
    for env, t in zip(envs, t0, strict=True):
        restore(env, seed, ref["sim"][t] if len(ref["sim"]) else None, int(t))
    agent.win = reference_windows(agent, ref, t0)  # the shared context of each group
    t = torch.as_tensor(t0, device=agent.device)
    obs = ref["obs"][t0].copy()
    scored = args.sub_len + args.cont_len
    horizon = max(scored, agent.max_ep_len - int(t0.min())) if args.relabel else scored
    windows: dict[str, list] = {key: [] for key in WINDOW_KEYS}
    active, scores = np.ones(n, bool), np.zeros(n, np.float64)
    step_valid, rewards = np.zeros((n, args.sub_len), bool), np.zeros((n, horizon), np.float32)
    env_steps = 0
    for j in range(horizon):
        if not active.any():
            break
        action, _ = agent.act(sample=j < args.sub_len)
        if j < args.sub_len:
            for key in WINDOW_KEYS:
                windows[key].append(agent.win[key].clone())
            step_valid[:, j] = active
        r = np.zeros(n, np.float32)
        for i in np.flatnonzero(active):  # MuJoCo steps one env at a time anyway
            obs[i], r[i], terminated, truncated, _ = envs[i].step(action[i])
            active[i] = not (terminated or truncated)
            env_steps += 1
        rewards[:, j] = r
        if j < scored:
            scores += r
        t = t + 1
        agent.push(obs, agent.next_rtg(r), t)
    while len(windows["valid"]) < args.sub_len:  # every member ended early: pad (masked by step_valid)
        for key in WINDOW_KEYS:
            windows[key].append(torch.zeros_like(windows[key][-1]))
    win = {key: torch.stack(v, dim=1) for key, v in windows.items()}  # (N, L, K, ·)
    return {"windows": win, "step_valid": torch.as_tensor(step_valid, device=agent.device),
            "scores": torch.as_tensor(scores, dtype=torch.float32, device=agent.device), "rewards": rewards,
            "t0": t0, "env_steps": env_steps}


def concat_groups(parts: list[dict]) -> dict:
    """Join groups rolled out one after another (main rolls one group at a time to honour budgets)."""
    width = max(p["rewards"].shape[1] for p in parts)
    cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
    return {"windows": {k: torch.cat([p["windows"][k] for p in parts]) for k in WINDOW_KEYS},
            "step_valid": cat("step_valid"), "scores": cat("scores"),
            "rewards": np.concatenate([np.pad(p["rewards"], ((0, 0), (0, width - p["rewards"].shape[1])))
                                       for p in parts]),
            "t0": np.concatenate([p["t0"] for p in parts]), "env_steps": sum(p["env_steps"] for p in parts)}


def relabeled_rtg(groups: dict, ref: dict[str, np.ndarray], k: int, rtg_scale: float) -> torch.Tensor:
    """ODT's hindsight relabeling (ablation only): RTG token at absolute step τ of a member = what the
    member achieved from τ on (reference rewards before t0, then its own L + L_eval steps), × scale."""
    t0, member_rewards = groups["t0"], groups["rewards"]
    n, horizon = member_rewards.shape
    tau = np.arange(t0.max() + horizon)[None]
    ref_r = np.asarray(ref["rewards"], np.float32)
    before = np.where(tau < t0[:, None], ref_r[np.clip(tau, 0, len(ref_r) - 1)], 0.0)
    after_idx = tau - t0[:, None]
    after = np.where((after_idx >= 0) & (after_idx < horizon),
                     member_rewards[np.arange(n)[:, None], np.clip(after_idx, 0, horizon - 1)], 0.0)
    suffix = np.cumsum((before + after)[:, ::-1], axis=1)[:, ::-1]
    sub_len = groups["step_valid"].shape[1]
    abs_pos = t0[:, None, None] + np.arange(sub_len)[None, :, None] + np.arange(-(k - 1), 1)[None, None, :]
    rtg = suffix[np.arange(n)[:, None, None], np.clip(abs_pos, 0, None)] * rtg_scale
    return torch.as_tensor(rtg, dtype=torch.float32) * groups["windows"]["valid"].cpu()


def step_log_probs(model: DecisionTransformer, win: dict[str, torch.Tensor]):
    """log π(a_t | window_t) of the action in the last slot of each window: (M, L, K, ·) → (M, L)."""
    shape = win["valid"].shape[:2]
    flat = [win[key].flatten(0, 1) for key in WINDOW_KEYS]
    mu, log_std = model.action_dist(model(*flat)[:, -1])
    return tanh_normal_log_prob(mu, log_std, flat[2][:, -1]).view(shape), mu, log_std


@torch.no_grad()
def make_grpo_batch(model, groups: dict, ref: dict, args: Args) -> dict:
    """Advantages and π_old for a round. π_old is evaluated on the rollout windows (the RTGs the actions
    were sampled with); π_θ is trained on `windows` — the same tensors unless --relabel."""
    model.eval()
    win, mask = groups["windows"], groups["step_valid"].float()
    old, _, _ = step_log_probs(model, win)
    train_win = dict(win)
    if args.relabel:
        train_win["rtg"] = relabeled_rtg(groups, ref, win["valid"].shape[2], args.rtg_scale).to(mask.device)
    scores = groups["scores"].view(-1, args.group_size)
    return {"windows": train_win, "mask": mask, "old_log_prob": old * mask,
            "advantages": group_advantages(scores, args.adv_eps).flatten(),
            "group_return_std": scores.std(-1, unbiased=False).mean()}


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """log ρ_i of each member over its valid steps: Σ_t (log π_θ − log π_old) (joint likelihood, paper §3.3) or
    its mean over the steps (GSPO's length-normalised s_i(θ), arXiv 2507.18071). (M, L) → (M,)."""
    total = ((logp - old_logp) * mask).sum(1)
    return total if mode == "joint" else total / mask.sum(1).clamp(min=1)


def grpo_losses(model, ref_model, log_temperature, batch: dict, idx: torch.Tensor, args: Args):
    """Clipped surrogate on the sequence ratio ρ_i of member i (`sequence_log_ratio`), one advantage per member."""
    win = {key: v[idx] for key, v in batch["windows"].items()}
    mask, adv = batch["mask"][idx], batch["advantages"][idx]
    logp, mu, log_std = step_log_probs(model, win)
    raw = sequence_log_ratio(logp, batch["old_log_prob"][idx], mask, args.ratio)
    log_ratio = raw.clamp(-args.max_log_ratio, args.max_log_ratio)
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - args.clip_eps, 1 + args.clip_eps) * adv)  # PPO clip
    pg_loss = -surrogate.mean()
    # members whose term still has a gradient (the unclipped branch of the min, A ≠ 0)
    live = (adv != 0) & ~((adv > 0) & (ratio > 1 + args.clip_eps)) & ~((adv < 0) & (ratio < 1 - args.clip_eps))
    n_valid = mask.sum().clamp(min=1)
    _, sample_log_prob = tanh_normal_rsample(mu, log_std)
    entropy = -(sample_log_prob.view_as(mask) * mask).sum() / n_valid  # one-sample estimate, as in pretraining
    temperature = log_temperature.exp()
    coef = temperature.detach() if args.entropy_coef is None else args.entropy_coef
    loss = pg_loss - coef * entropy
    kl_ref = torch.zeros((), device=mask.device)
    if args.kl_coef > 0:  # k3 estimator of KL(π_θ ‖ π_ref) on the taken actions
        with torch.no_grad():
            ref_logp = step_log_probs(ref_model, win)[0]
        d = ref_logp - logp
        kl_ref = ((d.exp() - d - 1) * mask).sum() / n_valid
        loss = loss + args.kl_coef * kl_ref
    temperature_loss = temperature * (entropy - args.target_entropy).detach()
    with torch.no_grad():  # k3 estimate of KL(π_old ‖ π_θ) of the joint sub-trajectory, whatever --ratio is
        joint = sequence_log_ratio(logp, batch["old_log_prob"][idx], mask, "joint").clamp(max=args.max_log_ratio)
        approx_kl = (joint.exp() - 1 - joint).mean()
    stats = {"train/policy_loss": pg_loss, "train/entropy": entropy, "train/temperature": temperature,
             "train/ratio_mean": ratio.mean(), "train/ratio_max": ratio.max(),
             "train/clip_fraction": ((ratio - 1).abs() > args.clip_eps).float().mean(),
             "train/approx_kl": approx_kl, "train/kl_ref": kl_ref, "train/advantage_abs": adv.abs().mean(),
             "train/live_fraction": live.float().mean(), "train/effective_update": live.any().float()}
    return loss, temperature_loss, stats


def grpo_update(model, ref_model, optimizer, log_temperature, temperature_optimizer, batch, idx, args):
    model.train(args.online_dropout)
    loss, temperature_loss, stats = grpo_losses(model, ref_model, log_temperature, batch, idx, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    if args.entropy_coef is None:  # keep ODT's dual update of λ (entropy ≥ β)
        temperature_optimizer.zero_grad(set_to_none=True)
        temperature_loss.backward()
        temperature_optimizer.step()
    return {k: v.detach() for k, v in stats.items()}


# ALGO LOGIC: Q-GRPO, advantages from a twin-Q critic when the env cannot be restored (paper Fig. 3c)
class Critic(nn.Module):
    """Q1, Q2: MLPs 2×256 ReLU on (normalised state, action) only — no RTG, no history. A parameter-free
    LayerNorm after each hidden layer stabilises the sparse-reward families (Adroit, AntMaze, Maze2d)."""

    def __init__(self, state_dim: int, act_dim: int, hidden: int, layer_norm: bool):
        super().__init__()

        def q_net() -> nn.Sequential:
            norm = (lambda: nn.LayerNorm(hidden, elementwise_affine=False)) if layer_norm else nn.Identity
            return nn.Sequential(nn.Linear(state_dim + act_dim, hidden), norm(), nn.ReLU(),
                                 nn.Linear(hidden, hidden), norm(), nn.ReLU(), nn.Linear(hidden, 1))

        self.q1, self.q2 = q_net(), q_net()

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat((states, actions), dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """θ' ← τ·θ + (1 − τ)·θ' (TD3, τ = 0.005)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)  # one multi-tensor op


class CriticReplay:
    """FIFO of online transitions (s_t, a_t, r_t, done_t, DT window at t+1) for the critic; the window gives the
    DT's own action at s_{t+1} for the TD target. Flat tensors, one gather per batch."""

    def __init__(self, capacity: int):
        self.capacity, self.data, self.size, self.ptr = capacity, None, 0, 0

    def add_episode(self, agent: WindowAgent, ref: dict) -> None:
        n = len(ref["rewards"])
        nxt = reference_windows(agent, ref, np.arange(1, n + 1))
        done = np.zeros(n, np.float32)
        done[-1] = float(ref["terminated"])  # a time-limit end bootstraps
        items = {"states": agent.normalise(ref["obs"]), "actions": torch.as_tensor(ref["actions"]),
                 "rewards": torch.as_tensor(ref["rewards"]), "dones": torch.as_tensor(done),
                 **{f"next_{k}": v for k, v in nxt.items()}}
        if self.data is None:
            self.data = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=agent.device)
                         for k, v in items.items()}
        slots = (self.ptr + np.arange(n)) % self.capacity
        for k, v in items.items():
            self.data[k][torch.as_tensor(slots)] = v.to(agent.device)
        self.ptr, self.size = int((self.ptr + n) % self.capacity), min(self.size + n, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(rng.integers(0, self.size, batch_size))
        return {k: v[idx.to(v.device)] for k, v in self.data.items()}


def critic_update(critic, critic_target, critic_optimizer, model, batch: dict, args: Args) -> torch.Tensor:
    """TD3 critic step (Fujimoto et al., 2018, arXiv 1802.09477, Alg. 1): y = r + γ(1−d)·min Q'(s', ã'), with
    ã' = tanh(μ_θ(window')) + clip(N(0, 0.2²), ±0.5). The target policy is the DT's mean action, so Q scores an
    action followed by the mean-action policy, as the group returns do (L sampled + L_eval mean steps)."""
    with torch.no_grad():
        model.eval()
        nxt = [batch[f"next_{k}"] for k in WINDOW_KEYS]
        mu, _ = model.action_dist(model(*nxt)[:, -1])
        noise = (0.2 * torch.randn_like(mu)).clamp(-0.5, 0.5)
        next_action = (torch.tanh(mu) + noise).clamp(-1, 1)
        q1_t, q2_t = critic_target(batch["next_states"][:, -1], next_action)
        y = batch["rewards"] + args.gamma * (1 - batch["dones"]) * torch.min(q1_t, q2_t)
    q1, q2 = critic(batch["states"], batch["actions"])
    loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
    critic_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    critic_optimizer.step()
    polyak_update(critic_target, critic, args.tau)
    return loss.detach()


@torch.no_grad()
def critic_groups(model, critic, agent: WindowAgent, ref: dict, t0s: np.ndarray, g: int) -> dict:
    """Q-GRPO groups without a reset: at each branch state s_t0 (the reference's window there), G actions
    sampled from π_old, scored by min(Q1, Q2)(s_t0, a_i). A member is one step (L_traj = 1): the ratio is over it."""
    t0 = np.repeat(t0s, g)
    win = reference_windows(agent, ref, t0)
    model.eval()
    mu, log_std = model.action_dist(model(*(win[k] for k in WINDOW_KEYS))[:, -1])
    actions = tanh_normal_rsample(mu, log_std)[0]
    win["actions"][:, -1] = actions
    scores = torch.min(*critic(win["states"][:, -1], actions))
    n = len(t0)
    return {"windows": {k: v[:, None] for k, v in win.items()},
            "step_valid": torch.ones(n, 1, dtype=torch.bool, device=agent.device), "scores": scores,
            "rewards": np.zeros((n, 1), np.float32), "t0": t0, "env_steps": 0}


# ALGO LOGIC: data and GRPO checks, before a run folder exists
def is_one_step(data: OfflineData) -> bool:
    """Every episode a single step (the papers' toys, under any id): one start state, so a reset is a restore."""
    return bool(data.episodes) and all(len(e.rewards) == 1 for e in data.episodes)


def load_and_check(args: Args) -> tuple[Args, OfflineData, bool]:
    """Load the data, fill the defaults and check the GRPO settings and the env; returns (args, data,
    use_critic). Called before the run folder exists, so a refused start leaves nothing behind."""
    data = load_dataset(args.env_id, args.dataset_path, generate_steps=args.generate_steps, progress=args.progress)
    args = apply_dataset_defaults(args, data)
    bad = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("group_size", "sub_len", "groups_per_round",
                                                                    "grpo_epochs") if getattr(args, k) < 1]
    bad += [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("cont_len", "grpo_minibatch", "branch_gap")
            if (getattr(args, k) or 0) < 0]
    if bad or args.group_size < 2:
        raise UserError(f"Invalid GRPO settings ({', '.join(bad) or f'--group-size {args.group_size}'}): group "
                        f"size must be ≥ 2 (advantages are normalised within a group), lengths and counts ≥ 1, "
                        f"--cont-len, --grpo-minibatch and --branch-gap ≥ 0.")
    env = data.make_env()
    restorable = can_restore(env) or is_one_step(data)  # one start state: a reset is the restore
    env.close()
    use_critic = args.advantage == "critic" or (args.advantage == "auto" and not restorable)
    if args.advantage == "group" and not restorable:
        raise UserError(f"--advantage group branches each group from a saved simulator state, but the env of "
                        f"'{args.env_id}' has no set_state(qpos, qvel) and its episodes are longer than one step. "
                        f"Use --advantage critic (Q-GRPO) or auto.")
    if use_critic and args.relabel:
        raise UserError("--relabel relabels group rollouts with their achieved returns; Q-GRPO (--advantage "
                        "critic, or an env without set_state) has none. Drop one of the two.")
    if args.min_steps_per_round is not None or args.updates_per_round != Args.updates_per_round:
        print("warning: --min-steps-per-round / --updates-per-round are ODT's; dt_grpo.py ignores them (a round is "
              "--groups-per-round groups; updates per round = --grpo-epochs × minibatches).", file=sys.stderr)
    return args, data, use_critic


# TRY NOT TO MODIFY: run folder, metrics, checkpoints, errors
def eval_seeds(seed: int, n: int) -> list[int]:
    """Reset seeds of the n evaluation episodes: the same episodes at every evaluation of a run."""
    return [10_000 + seed * 1000 + i for i in range(n)]


def online_episode_seed(seed: int, round_: int, index: int = 0) -> int:
    """Reset seed of the index-th online episode of a round: a fresh one each time, the same after a resume."""
    return seed * 1_000_003 + round_ * 1000 + index


def set_up(args: Args, typed: set[str] | None = None) -> tuple[Args, OfflineData, torch.device, Path, dict | None,
                                                              bool]:
    """Flags, seeds, device, dataset and GRPO checks, then the run folder: a refused start leaves nothing behind.
    Returns (args, data, device, run_dir, checkpoint or None, use_critic)."""
    validate_args(args, VALID_MIN)
    args, run_dir, checkpoint = prepare_run(args, Path(__file__).name)
    args = apply_preset(args, typed, PRESETS) if checkpoint is None else args
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = pick_device(args.cuda, typed)
    args.precision = resolve_precision(args.precision, device)
    args, data, use_critic = load_and_check(args)  # before the folder exists
    validate_args(args, VALID_MIN)
    start_run_folder(run_dir, {"script": Path(__file__).name, "args": dataclasses.asdict(args), "dataset": data.source,
                               "obs_dim": data.obs_dim, "act_dim": data.act_dim, "device": str(device),
                               "advantage": "critic" if use_critic else "group"})
    print(f"{Path(__file__).name}: {args.env_id} ({data.source}), {len(data.episodes)} trajectories, "
          f"device {device} ({args.precision}), advantages from "
          f"{'a twin-Q critic (Q-GRPO)' if use_critic else 'group returns'}, run folder {run_dir}")
    return args, data, device, run_dir, checkpoint, use_critic


class Trainer:
    """The run: model, optimisers, the offline replay, the frozen pretrained policy, the Q-GRPO critic, counters,
    the GRPO round in progress, the metrics meter and logger. `state_dict()` is the checkpoint."""

    def __init__(self, args: Args, data: OfflineData, device: torch.device, run_dir: Path, *, use_critic: bool,
                 checkpoint: dict | None):
        self.args, self.data, self.device, self.run_dir, self.use_critic = args, data, device, run_dir, use_critic
        self.rng = np.random.default_rng(args.seed)
        self.eval_envs = make_vector_env(data.make_env, args.eval_episodes)
        self.reference_env = data.make_env()
        self.member_envs = [data.make_env() for _ in range(0 if use_critic else args.group_size)]
        self.max_ep_len = self.eval_envs.envs[0].spec.max_episode_steps or 1000
        # ALGO LOGIC: model, optimisers, replay
        self.model = DecisionTransformer(
            data.obs_dim, data.act_dim, embed_dim=args.embed_dim, n_layers=args.n_layers, n_heads=args.n_heads,
            dropout=args.dropout, max_ep_len=self.max_ep_len, use_timestep_embedding=args.use_timestep_embedding,
            precision=args.precision).to(device)
        self.optimizer = Lamb(lamb_param_groups(self.model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
        self.scheduler = warmup_schedule(self.optimizer, args.warmup_steps)
        self.log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
        self.temperature_optimizer = torch.optim.Adam([self.log_temperature], lr=args.temperature_lr,
                                                      betas=(0.9, 0.999))
        self.offline = TrajectoryReplay(len(data.episodes), state_mean=data.state_mean, state_std=data.state_std,
                                        rtg_scale=args.rtg_scale, max_ep_len=self.max_ep_len,
                                        device=device)  # pretraining samples all offline data
        for episode in data.episodes:
            self.offline.add(episode)
        # GRPO is on-policy: each round's groups are used for its updates and dropped (no online replay).
        self.online_optimizer = torch.optim.Adam(self.model.parameters(), lr=args.online_learning_rate)
        self.ref_model: DecisionTransformer | None = None  # frozen pretrained policy (KL anchor), after pretraining
        self.critic = Critic(data.obs_dim, data.act_dim, hidden=256, layer_norm=False).to(device)  # Q-GRPO only
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
        self.critic_replay = CriticReplay(args.critic_buffer)
        self.counters = {"updates": 0, "env_steps": 0, "rounds": 0, "pretrain_evaluated": False}
        self.meter = StatsMeter()
        # The round in progress (reference episode, groups collected so far, then the minibatches still to train
        # on): part of the checkpoint, so a stop inside a round resumes it exactly. Empty between rounds.
        self.round_state: dict = {}
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
        self.logger = RunLogger(run_dir, args, self.counters["updates"] if self.resumed else None,
                                self.counters.get("metrics_rows"))
        self.checkpoints = Interval(args.checkpoint_interval, start=self.counters["updates"])
        self.evaluations = Interval(args.eval_interval, start=self.counters["env_steps"])
        self.final, self.final_at = {}, -1  # the latest evaluation's metrics and the update it was taken at
        self.start_time = time.time() - self.counters.get("wall_time_s", 0.0)  # wall time accumulates over resumes

    # --- checkpoint --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        critic = None if not self.use_critic else {
            "critic": self.critic.state_dict(), "target": self.critic_target.state_dict(),
            "optimizer": self.critic_optimizer.state_dict(), "replay": dict(self.critic_replay.__dict__)}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "log_temperature": self.log_temperature.detach().cpu(),
                "temperature_optimizer": self.temperature_optimizer.state_dict(),
                "online_optimizer": self.online_optimizer.state_dict(),
                "reference_model": None if self.ref_model is None else self.ref_model.state_dict(),
                "critic": critic, "counters": dict(self.counters), "meter": self.meter.state_dict(),
                "round_state": self.round_state, "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])
        self.temperature_optimizer.load_state_dict(state["temperature_optimizer"])
        self.online_optimizer.load_state_dict(state["online_optimizer"])
        if state["reference_model"] is not None:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            self.ref_model.load_state_dict(state["reference_model"])
        if state.get("critic") is not None:
            self.critic.load_state_dict(state["critic"]["critic"])
            self.critic_target.load_state_dict(state["critic"]["target"])
            self.critic_optimizer.load_state_dict(state["critic"]["optimizer"])
            self.critic_replay.__dict__.update(state["critic"]["replay"])
        self.counters.update(state["counters"])
        self.meter.load_state_dict(state["meter"])
        self.round_state = state["round_state"]
        restore_rng_state(self.rng, state["rng"])
        print(f"Resumed from {self.run_dir}/checkpoint.pt at update {self.counters['updates']}, "
              f"env step {self.counters['env_steps']}")

    def save_checkpoint(self) -> None:
        self.counters["wall_time_s"] = time.time() - self.start_time
        self.counters["metrics_rows"] = self.logger.rows  # what a resume keeps of metrics.jsonl
        if self.args.save_model:
            save_checkpoint(self.run_dir, self.state_dict())

    # --- shared steps ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        agent = DTAgent(self.model, self.args, state_mean=self.data.state_mean, state_std=self.data.state_std,
                        target_return=self.args.g_eval, sample=False, device=self.device, max_ep_len=self.max_ep_len)
        seeds = eval_seeds(self.args.seed, self.args.eval_episodes)  # same every evaluation
        return evaluate(self.eval_envs, agent, seeds, self.data.normalized_score)

    def row(self) -> dict:
        return {"global_step": self.counters["updates"], "env_steps": self.counters["env_steps"],
                "rounds": self.counters["rounds"]}

    def log_row(self, extra: dict) -> None:
        """A metrics row: the counters, the mean of the training statistics since the last row, then `extra`."""
        stats = self.meter.pop()
        check_finite(stats, self.counters, self.run_dir)
        self.logger.log({**self.row(), **stats, **extra})

    def train_step(self) -> dict:
        """One ODT update on an offline batch (pretraining)."""
        t0 = time.perf_counter()
        stats = update(self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                       log_temperature=self.log_temperature, temperature_optimizer=self.temperature_optimizer,
                       batch=self.offline.sample(self.args.batch_size, self.args.context_len, self.rng), args=self.args)
        return self.count_update(stats, t0)

    def grpo_step(self, idx: torch.Tensor) -> dict:
        """One GRPO update on the members `idx` of the round's batch."""
        t0 = time.perf_counter()
        stats = grpo_update(self.model, ref_model=self.ref_model, optimizer=self.online_optimizer,
                            log_temperature=self.log_temperature, temperature_optimizer=self.temperature_optimizer,
                            batch=self.round_state["batch"], idx=idx, args=self.args)
        return self.count_update(stats, t0)

    def count_update(self, stats: dict, t0: float) -> dict:
        self.counters["updates"] += 1
        self.meter.add(stats, time.perf_counter() - t0)
        return stats

    # --- offline pretraining (ODT, arXiv 2202.05607 Alg. 1 lines 1-3) ------------------------------------------
    def pretrain(self, stop: StopFlag) -> None:
        """ODT updates on the offline data (the first row after one update), then one evaluation."""
        args, counters = self.args, self.counters
        bar = tqdm(total=args.pretrain_updates, initial=min(counters["updates"], args.pretrain_updates),
                   desc="pretraining", disable=not args.progress, unit="upd", dynamic_ncols=True)
        while counters["updates"] < args.pretrain_updates and not stop.requested:
            self.train_step()
            bar.update(1)
            if counters["updates"] == 3 and not self.resumed:  # updates 2-3: past the first call's warm-up
                self.print_cost_estimate()
            if counters["updates"] % args.log_interval == 0 or counters["updates"] in (1, args.pretrain_updates):
                self.log_row({"phase": "pretrain", "charts/updates_per_second": self.meter.updates_per_second()})
                if self.checkpoints.due(counters["updates"]):
                    self.save_checkpoint()
        bar.close()
        if not stop.requested and not counters["pretrain_evaluated"]:
            metrics = self.evaluate()
            counters["pretrain_evaluated"] = True
            self.log_row({"phase": "pretrain", **metrics})
            print(f"after pretraining: return {metrics['eval/return_mean']:.3g}, "
                  f"normalized score {metrics['eval/normalized_score_mean']:.3g}")
            self.save_checkpoint()

    def print_cost_estimate(self) -> None:
        """rounds ≥ online_steps / (groups × G × (L + L_eval)) env steps; grpo_epochs × minibatches updates each."""
        args = self.args
        members = args.groups_per_round * args.group_size
        rounds = args.online_steps / (members * (args.sub_len + args.cont_len))
        online = rounds * args.grpo_epochs * math.ceil(members / (args.grpo_minibatch or members))
        print_cost_estimate(self.meter.seconds / max(self.meter.n, 1), args, online)

    # --- online finetuning with GRPO only (arXiv 2601.00167) ---------------------------------------------------
    def finetune(self, stop: StopFlag) -> None:
        """GRPO rounds until --online-steps: reference episode, groups (one at a time), then grpo_epochs ×
        minibatch updates. A stop request is honoured between two groups or two updates (`round_state`)."""
        if self.ref_model is None and not stop.requested:  # the KL anchor is the fully pretrained policy
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.bar = tqdm(total=self.args.online_steps, initial=min(self.counters["env_steps"], self.args.online_steps),
                        desc="finetuning", disable=not self.args.progress or stop.requested, unit="step",
                        dynamic_ncols=True)
        while not stop.requested:
            if not self.round_state:
                if self.counters["env_steps"] >= self.args.online_steps:
                    break
                self.start_round()
            if "perms" not in self.round_state:
                if not self.collect_groups(stop):
                    break  # stopped between two groups
                self.plan_updates()
            if not self.train_round(stop):
                break  # stopped between two updates
            self.end_round()
        self.bar.close()

    def window_agent(self, n: int) -> WindowAgent:
        return WindowAgent(self.model, n, k=self.args.eval_context_len, state_mean=self.data.state_mean,
                           state_std=self.data.state_std, rtg_scale=self.args.rtg_scale, max_ep_len=self.max_ep_len,
                           device=self.device)

    def count_steps(self, n: int) -> None:
        """Count env steps; evaluate as soon as an --eval-interval boundary is crossed (within one group)."""
        self.counters["env_steps"] += n
        self.bar.update(n)
        if self.evaluations.due(self.counters["env_steps"]):
            t_eval = time.perf_counter()
            self.final, self.final_at = self.evaluate(), self.counters["updates"]
            self.logger.log({**self.row(), "phase": "online", **self.final})
            self.round_state["eval_time"] += time.perf_counter() - t_eval

    def start_round(self) -> None:
        """The reference episode (steps 1-2), its branch points drawn ∝ the predicted action variance; Q-GRPO:
        the critic's updates on it and, after the warm-up, all of the round's groups at once (Fig. 3c)."""
        args, state = self.args, self.round_state
        t_ref = time.perf_counter()
        state.update(eval_time=0.0, rollout_time=0.0, parts=[], next_group=0, critic_loss=float("nan"))
        episode_seed = online_episode_seed(args.seed, self.counters["rounds"])
        ref_agent = self.window_agent(1)
        ref = reference_rollout(self.reference_env, ref_agent, episode_seed, args.g_online * args.rtg_scale,
                                sample=args.reference_sample or self.use_critic)  # Q-GRPO learns from samples
        state["rollout_time"] += time.perf_counter() - t_ref
        self.count_steps(len(ref["rewards"]))
        gap = args.sub_len if args.branch_gap is None else args.branch_gap
        t0s = branch_points(ref["var"], args.groups_per_round, args.branch_sampling, self.rng, gap=gap)
        state.update(ref=ref, t0s=t0s, episode_seed=episode_seed)
        if self.use_critic:
            self.critic_replay.add_episode(ref_agent, ref)
            n_updates = max(1, round(len(ref["rewards"]) * args.critic_updates_per_step))
            losses = [critic_update(self.critic, critic_target=self.critic_target,
                                    critic_optimizer=self.critic_optimizer, model=self.model,
                                    batch=self.critic_replay.sample(args.batch_size, self.rng), args=args)
                      for _ in range(n_updates)]
            state["critic_loss"] = float(torch.stack(losses).mean())
            if self.counters["env_steps"] >= min(args.critic_warmup, args.online_steps):
                state["parts"].append(critic_groups(self.model, self.critic, ref_agent, ref, t0s, g=args.group_size))
            state["next_group"] = len(t0s)

    def collect_groups(self, stop: StopFlag) -> bool:
        """Step 3: the groups still to roll, one at a time so budgets hold to within one group. False if stopped."""
        state, t0s = self.round_state, self.round_state["t0s"]
        t_collect = time.perf_counter()
        while state["next_group"] < len(t0s) and not stop.requested:
            if self.counters["env_steps"] >= self.args.online_steps:
                state["next_group"] = len(t0s)
                break
            t0 = t0s[state["next_group"]]
            state["parts"].append(rollout_groups(self.member_envs, self.window_agent(self.args.group_size),
                                                 state["ref"], t0[None], seed=state["episode_seed"], args=self.args))
            state["next_group"] += 1
            self.count_steps(state["parts"][-1]["env_steps"])
        state["rollout_time"] += time.perf_counter() - t_collect
        return state["next_group"] == len(t0s)

    def plan_updates(self) -> None:
        """Steps 4-5 set up: the round is counted, its rollout metrics fixed, the advantages and π_old computed
        and the minibatches of every epoch drawn (so a resumed round trains on the same ones)."""
        args, state, ref, parts = self.args, self.round_state, self.round_state["ref"], self.round_state["parts"]
        self.counters["rounds"] += 1
        state["extra"] = {
            "phase": "online", "rollout/return": float(ref["rewards"].sum()),
            "rollout/length": float(len(ref["rewards"])),
            "rollout/groups": sum(len(p["t0"]) for p in parts) // args.group_size,
            "rollout/branch_step_mean": float(state["t0s"].mean()),
            "charts/SPS": (len(ref["rewards"]) + sum(p["env_steps"] for p in parts)) / max(
                state["rollout_time"] - state["eval_time"], 1e-9)}
        if self.use_critic:
            state["extra"]["train/critic_loss"] = state["critic_loss"]
        state["perms"], state["effective"] = [], 0.0
        if parts:
            groups = concat_groups(parts)
            state["batch"] = make_grpo_batch(self.model, groups, ref, args)
            n_members = len(groups["t0"])
            for _ in range(args.grpo_epochs):
                perm = torch.as_tensor(self.rng.permutation(n_members), device=self.device)
                state["perms"] += list(perm.split(args.grpo_minibatch or n_members))
            state["extra"].update({"rollout/group_return": float(groups["scores"].mean()),
                                   "train/group_return_std": float(state["batch"]["group_return_std"])})

    def train_round(self, stop: StopFlag) -> bool:
        """Step 5: the round's remaining GRPO updates. False if stopped before the last."""
        state = self.round_state
        while state["perms"] and not stop.requested:
            stats = self.grpo_step(state["perms"].pop(0))
            state["effective"] += float(stats["train/effective_update"])
        return not state["perms"]

    def end_round(self) -> None:
        """The round's metrics row (with the final evaluation once the budget is spent), then a checkpoint when
        --checkpoint-interval updates have passed or at the end of the budget."""
        args, counters, extra = self.args, self.counters, self.round_state["extra"]
        if "batch" in self.round_state:
            extra.update({"train/effective_updates": self.round_state["effective"],
                          "charts/updates_per_second": self.meter.updates_per_second()})
        if counters["env_steps"] >= args.online_steps and self.final_at != counters["updates"]:
            self.final, self.final_at = self.evaluate(), counters["updates"]
            extra.update(self.final)
        self.log_row(extra)
        self.bar.set_postfix(ret=f"{extra['rollout/return']:.4g}")
        self.round_state.clear()
        if self.checkpoints.due(counters["updates"]) or counters["env_steps"] >= args.online_steps:
            self.save_checkpoint()

    # --- the end of a run --------------------------------------------------------------------------------------
    def stopped(self) -> dict:
        """Ctrl-C / SIGTERM: checkpoint, mark the folder STOPPED with the command that continues it."""
        self.save_checkpoint()
        self.logger.close()
        mark_stopped(self.run_dir, self.counters)
        return {"stopped": True, "run_dir": str(self.run_dir)}

    def finish(self) -> dict:
        """The final evaluation (unless the last round took it), model.pt and summary.json."""
        args, run_dir = self.args, self.run_dir
        if self.final_at != self.counters["updates"]:  # the last round did not evaluate (or no online phase)
            self.final = self.evaluate()
        final = self.final
        summary = {"run_dir": str(run_dir), "env_id": args.env_id, "counters": self.counters,
                   "wall_time_s": time.time() - self.start_time, **final}
        self.log_row({"phase": "final", **final})
        if args.save_model:
            atomic_save(self.model.state_dict(), run_dir / "model.pt")
        if args.capture_video:
            agent = DTAgent(self.model, args, state_mean=self.data.state_mean, state_std=self.data.state_std,
                            target_return=args.g_eval, sample=False, device=self.device, max_ep_len=self.max_ep_len)
            record_video(self.data.make_env, agent, seed=eval_seeds(args.seed, 1)[0], path=run_dir / "eval.mp4")
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        print(f"final: return {final['eval/return_mean']:.3g} ± {final['eval/return_std']:.3g}, normalized score "
              f"{final['eval/normalized_score_mean']:.3g} ± {final['eval/normalized_score_std']:.3g} → {run_dir}")
        return summary


def main(args: Args, typed: set[str] | None = None) -> dict:
    args, data, device, run_dir, checkpoint, use_critic = set_up(args, typed)  # flags, seeds, dataset, run folder
    trainer = Trainer(args, data, device, run_dir, use_critic=use_critic, checkpoint=checkpoint)
    stop = StopFlag()
    trainer.pretrain(stop)  # offline: ODT (arXiv 2202.05607 Alg. 1 lines 1-3)
    trainer.finetune(stop)  # online: GRPO rounds (arXiv 2601.00167), no supervised term
    return trainer.stopped() if stop.requested else trainer.finish()


if __name__ == "__main__":
    cli(main, Args)
