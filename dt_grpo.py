"""Decision Transformer + GRPO: online finetuning with pure RL gradients.

Paper: J. Luo, Y. Zhu, "Online Finetuning Decision Transformers with Pure RL Gradients", arXiv 2601.00167;
(R) marks what the public reviews of its ICLR 2026 submission (OpenReview UPeqfbXgvf) state. Pretraining is ODT's
(arXiv 2202.05607 Alg. 1; differences in odt.py). Then rounds (`train`): (1) a reference episode; (2) branch points
∝ the predicted action variance (R); (3) per point G members restored to that state, L_traj sampled + L_eval
mean-action steps each (R: L_eval ≈ 400); (4) advantages normalised in the group (R); (5) PPO-clipped updates of
each member's sequence ratio. Q-GRPO (R, Fig. 3c): no restore; G sampled actions scored by a TD3 twin-Q critic.

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
- Entropy bonus: ODT's learned λ, its dual update continued (--entropy-coef); optional k3 KL to the pretrained
  policy (--kl-coef, off). Groups roll one at a time: --online-steps and --eval-interval hold to within one group.
- CPU speed: dropout masks draw 16-bit uniforms (p rounded to a multiple of 2^-16), see the `Dropout` class;
  attention is computed explicitly on CPU (torch's fused kernels cannot take those masks).
Details, measurements and the algorithm box → code: docs/dt_grpo.md
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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

from common import run
from common.datasets import Episode, OfflineData, load_dataset
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
    """offline gradient updates before finetuning (None: per-dataset, ODT Table C.4: 5000-10000)"""
    online_steps: int = 200_000
    """online environment steps of finetuning (ODT Table 5.1: 200k; arXiv 2601.00167's budget is not public)"""
    updates_per_round: int = 300
    """ODT's updates per rollout (Table C.3: 300); unused here: a round takes --grpo-epochs × minibatches"""
    min_steps_per_round: int | None = None
    """ODT's minimum env steps per round; unused here: a round is its reference episode and its groups"""
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
    # Pretraining: ODT's (arXiv 2202.05607 Tables C.1, C.3, C.4; None: per-dataset, the table below Args)
    embed_dim: int | None = None
    """transformer width (None: per-dataset, ODT Table C.3: 512; 1024 for antmaze-umaze-diverse)"""
    n_layers: int = 4
    """transformer blocks (ODT Table C.3: 4)"""
    n_heads: int = 4
    """attention heads (ODT Table C.3: 4)"""
    dropout: float = 0.1
    """dropout in embeddings, attention and MLP (ODT Table C.3: 0.1)"""
    context_len: int | None = None
    """training context length K (None: per-dataset, ODT Table C.3: 20; 1 for one-step datasets)"""
    eval_context_len: int | None = None
    """context length of evaluation and online rollouts (None: per-dataset, ODT Table C.4: 5; 1 for Ant)"""
    batch_size: int = 256
    """windows per pretraining update; transitions per Q-GRPO critic update (ODT Table C.3: 256)"""
    learning_rate: float | None = None
    """LAMB learning rate of pretraining (None: per-dataset, ODT Table C.4: 1e-4 to 2e-3)"""
    weight_decay: float | None = None
    """LAMB weight decay (None: per-dataset, ODT Table C.4: 0 to 1e-3)"""
    warmup_steps: int = 10_000
    """linear learning-rate warm-up in gradient steps (ODT Table C.3: 10^4)"""
    grad_clip: float = 0.25
    """global gradient-norm clip, pretraining and GRPO (ODT Table C.3: 0.25)"""
    init_temperature: float = 0.1
    """initial entropy temperature λ, log λ learned (ODT reference implementation: 0.1)"""
    temperature_lr: float = 1e-4
    """Adam learning rate of log λ (ODT App. C: 1e-4)"""
    target_entropy: float | None = None
    """entropy lower bound β (None: −dim(A), ODT Table C.1)"""
    buffer_size: int | None = None
    """ODT's online replay (None: Table C.4: 1000 trajectories; 1500 AntMaze); unused here: GRPO is on-policy"""
    rtg_scale: float | None = None
    """multiplier of return-to-go tokens (None: 0.001 locomotion, 1 AntMaze, as ODT's reference code)"""
    g_eval: float | None = None
    """target return of evaluation (None: per-dataset, ODT Table C.4: 3600 / 5000 / 6000 / 6000 / 1)"""
    g_online: float | None = None
    """target return of online rollouts (None: g_eval, no relabeling (abstract); not ODT's 2·g_eval)"""
    use_timestep_embedding: bool | None = None
    """learned absolute timestep embedding (None: ODT Table C.4: off for Gym, on for AntMaze)"""
    # GRPO finetuning (arXiv 2601.00167; its Tables 5-6 are not public: "ours" below). None: GRPO_DEFAULTS
    group_size: int | None = None
    """G: members per group, from one restored state or scored by Q (None: ours, 8; 16 one-step)"""
    sub_len: int | None = None
    """L_traj: sampled steps per member, those the sequence ratio covers (None: ours, 10; 20 AntMaze; 1 one-step)"""
    cont_len: int | None = None
    """L_eval: mean-action steps added to a member's score (None: paper ≈ 400 on MuJoCo (R, Fig. 3b); 0 one-step)"""
    groups_per_round: int | None = None
    """groups (branch points) per round (None: ours, 4)"""
    ratio: Literal["joint", "geometric"] = "joint"
    """sequence ratio: exp(Σ_t log π_θ/π_old), the paper's joint likelihood (§3.3, R), or exp(mean_t …) (GSPO)"""
    clip_eps: float | None = None
    """PPO clip ε of the sequence ratio (None: ours, 0.2 joint, 0.05 geometric)"""
    online_learning_rate: float | None = None
    """Adam learning rate of the GRPO phase (None: ours, 2e-5; 1e-3 one-step)"""
    grpo_epochs: int | None = None
    """passes over each round's members (None: ours, 4)"""
    grpo_minibatch: int | None = None
    """members per gradient update, 0: all of the round's, one update per epoch (None: ours, 8; 0 one-step)"""
    entropy_coef: float | None = None
    """entropy bonus weight (None: ODT's learned temperature λ, its dual update continued; ours)"""
    kl_coef: float = 0.0
    """weight of the KL to the frozen pretrained policy, k3 estimator; 0 switches it off (paper: optional)"""
    adv_eps: float = 1e-6
    """ε of the group normalisation (R_i − mean) / (std + ε) (GRPO, arXiv 2402.03300 §4.1.2; ours: 1e-6)"""
    max_log_ratio: float = 20.0
    """clamp of the sequence log-ratio before exp (numerical guard only)"""
    branch_sampling: Literal["variance", "top", "uniform"] = "variance"
    """branch points: drawn ∝ the predicted action variance (paper, R), the highest-variance steps, or uniformly"""
    branch_gap: int | None = None
    """minimum distance in steps between a round's branch points (None: L_traj; ours)"""
    reference_sample: bool = False
    """roll the per-round reference episode with sampled actions (default: mean action; Q-GRPO samples)"""
    online_dropout: bool = False
    """keep dropout on in GRPO updates (off: π_θ equals π_old on fresh data)"""
    relabel: bool = False
    """ablation: relabel the RTG tokens of online windows with the achieved return-to-go (ODT)"""
    advantage: Literal["auto", "group", "critic"] = "auto"
    """group returns after a state restore, or Q-GRPO's twin-Q critic (auto: critic iff the env cannot restore)"""
    critic_lr: float = 3e-4
    """Q-GRPO: Adam learning rate of the twin-Q critic (TD3, arXiv 1802.09477: 3e-4)"""
    critic_updates_per_step: float = 1.0
    """Q-GRPO: critic updates per online env step (TD3: 1)"""
    critic_warmup: int = 2000
    """Q-GRPO: online env steps (critic trained, policy fixed) before the first policy update (ours)"""
    critic_buffer: int = 200_000
    """Q-GRPO: transitions kept for the critic, FIFO (ours)"""
    gamma: float = 0.99
    """Q-GRPO: discount of the critic (TD3: 0.99)"""
    tau: float = 0.005
    """Q-GRPO: Polyak rate of the critic's target networks (TD3: 0.005)"""

# Per-dataset defaults of pretraining: ODT's finetuning table (arXiv 2202.05607 Table C.4), a row per family
# ("<family>-<kind>" overrides "<family>"); datasets the paper does not list use their family's medium row.
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
# GRPO phase. arXiv 2601.00167 Tables 5-6 hold its values, not public: L_eval ≈ 400 on MuJoCo is the paper's
# (Tab. 6, per its reviews), the rest are our choices (module docstring; measurements in docs/dt_grpo.md).
GRPO_DEFAULTS: dict[str, dict] = {
    "one-step": dict(group_size=16, sub_len=1, cont_len=0, online_learning_rate=1e-3, grpo_minibatch=0),
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
# Smallest valid value of each numeric flag, checked before any work and with the defaults in (G ≥ 2: Â_i needs a group)
VALID_MIN = dict(generate_steps=1, pretrain_updates=0, online_steps=0, updates_per_round=1, min_steps_per_round=0,
                 eval_interval=1, eval_episodes=1, log_interval=1, checkpoint_interval=1, embed_dim=1, n_layers=1,
                 n_heads=1, context_len=1, eval_context_len=1, batch_size=1, learning_rate=0.0, weight_decay=0.0,
                 warmup_steps=1, grad_clip=0.0, init_temperature=1e-8, temperature_lr=0.0, rtg_scale=1e-12,
                 group_size=2, sub_len=1, cont_len=0, groups_per_round=1, grpo_epochs=1, grpo_minibatch=0, branch_gap=0)


def one_step_defaults(data: OfflineData) -> dict:
    """Return scale and target return of a one-step dataset (every episode a single step, such as the papers'
    toys under any id), derived from its data: RTG tokens scaled so that |R| ≤ 1, and the target is the best
    reachable return where the env states one (its reference max score), else the best return in the data."""
    returns = np.array([float(e.rewards.sum()) for e in data.episodes])
    best = float(data.ref_max_score) if data.ref_max_score is not None else float(returns.max())
    return dict(rtg_scale=1.0 / max(float(np.abs(returns).max()), abs(best), 1e-8), g_eval=best, g_online=best)


def is_one_step(data: OfflineData) -> bool:
    """Every episode a single step (the papers' toys, under any id): one start state, so a reset is a restore."""
    return bool(data.episodes) and all(len(e.rewards) == 1 for e in data.episodes)


def apply_dataset_defaults(args: Args, data: OfflineData) -> Args:
    """Fill every field left at None from the per-dataset tables; explicit flags always win."""
    one_step = is_one_step(data)
    family = "one-step" if one_step else data.family
    table = {**COMMON_DEFAULTS, **DATASET_DEFAULTS.get(family, {}),
             **DATASET_DEFAULTS.get(f"{family}-{data.dataset_kind}", {}),
             **GRPO_COMMON_DEFAULTS, **GRPO_DEFAULTS.get(family, {}),
             **GRPO_DEFAULTS.get(f"{family}-{data.dataset_kind}", {})}
    if one_step:  # data-derived return scale and targets (one_step_defaults)
        table.update({k: v for k, v in one_step_defaults(data).items() if hasattr(args, k)})
    if family not in DATASET_DEFAULTS and data.ref_max_score is not None:
        table.update(g_eval=data.ref_max_score)  # unknown family: condition on the expert return (ODT App. D)
    # No relabeling: the conditional that GRPO improves is the rollout one, so roll out at g_eval.
    table["g_online"] = args.g_eval if args.g_eval is not None else table.get("g_eval")
    table.setdefault("clip_eps", CLIP_EPS[args.ratio])
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


# ALGO LOGIC: the offline data and window sampling
def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted suffix sums R_t = Σ_{t'≥t} r_t'."""
    return np.cumsum(rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)


class OfflineWindows:
    """The offline trajectories that pretraining samples, windowed as ODT samples its replay (App. F, Alg. 3):
    flat tensors on the training device, so a batch is one fancy-indexing gather. GRPO keeps no online replay:
    it is on-policy, each round's groups are used for its updates and dropped."""

    def __init__(self, episodes: list[Episode], state_mean: np.ndarray, state_std: np.ndarray, rtg_scale: float,
                 max_ep_len: int, device: torch.device):
        self.device = device
        self.lengths = np.array([len(e.rewards) for e in episodes], dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        self.cdf = np.cumsum(self.lengths / self.lengths.sum())
        cat = lambda key: np.concatenate([getattr(e, key) for e in episodes]).astype(np.float32)  # noqa: E731
        flat = {"states": (cat("observations") - state_mean.astype(np.float32)) / state_std.astype(np.float32),
                "actions": cat("actions"),
                "rtg": np.concatenate([returns_to_go(e.rewards) for e in episodes]) * rtg_scale,
                "timesteps": np.concatenate([np.arange(n) for n in self.lengths]).clip(max=max_ep_len - 1)}
        self._flat = {k: torch.as_tensor(v).to(self.device) for k, v in flat.items()}

    def sample_indices(self, batch_size: int, context_len: int, rng: np.random.Generator):
        """Indices into the flat arrays (B, K) and the valid mask (B, K): a trajectory drawn ∝ its length, a start
        uniformly within it, up to K steps from there (App. F); short windows are left-padded."""
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
        idx, valid = (torch.as_tensor(x, device=self.device) for x in self.sample_indices(batch_size, context_len, rng))
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
    """Left-padded K-step contexts of N envs at different timesteps (groups branched at different steps act in one
    forward pass); DTAgent's tokens, RTG_{t+1} = RTG_t − r_t·scale; the last slot is the current step."""

    def __init__(self, model: DecisionTransformer, n: int, k: int, state_mean, state_std, rtg_scale: float,
                 max_ep_len: int, device: torch.device):
        self.model, self.k, self.rtg_scale, self.max_ep_len, self.device = model, k, rtg_scale, max_ep_len, device
        self.mean, self.std = torch.as_tensor(state_mean, device=device), torch.as_tensor(state_std, device=device)
        s, a = self.mean.shape[0], model.mu_head.out_features
        win = {"rtg": torch.zeros(n, k), "states": torch.zeros(n, k, s), "actions": torch.zeros(n, k, a),
               "timesteps": torch.zeros(n, k, dtype=torch.long), "valid": torch.zeros(n, k, dtype=torch.bool)}
        self.win = {key: v.to(device) for key, v in win.items()}

    def normalise(self, obs) -> torch.Tensor:
        return (torch.as_tensor(obs, device=self.device, dtype=torch.float32) - self.mean) / self.std

    def push(self, obs: np.ndarray, rtg: torch.Tensor, t: torch.Tensor) -> None:
        """Append step t (observation, RTG token) to every window; the oldest step drops out."""
        self.win = {key: v.roll(-1, dims=1) for key, v in self.win.items()}
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
    restorable = hasattr(env.unwrapped, "set_state")  # MuJoCo: the groups branch from saved states
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
    # s_T and RTG_T after the last step, and whether the episode terminated (Q-GRPO's TD targets)
    return {**{k: np.asarray(v, np.float64 if k == "sim" else np.float32) for k, v in rec.items()},
            "last_obs": np.asarray(obs, np.float32), "last_rtg": np.float32(rtg[0]), "terminated": bool(terminated)}


def branch_points(variance: np.ndarray, n: int, mode: str, rng: np.random.Generator, gap: int = 1) -> np.ndarray:
    """Active sampling: n steps of the reference ≥ `gap` apart, drawn without replacement ∝ the predicted action
    variance Σσ² ("variance"), greedily by variance ("top"; ties: earliest first) or uniformly. Too short an
    episode repeats its points (one-step episodes: every group branches at t = 0)."""
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
    """τ_ref's window at each of `steps` (K−1 previous steps, left-padded, then s_t, RTG_t and a zero action slot),
    exactly what the policy saw when acting there; step T (after the last action): s_T and RTG_T."""
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


def rollout_groups(envs: list, agent: WindowAgent, ref: dict[str, np.ndarray], t0s: np.ndarray, seed: int, *,
                   group_size: int, sub_len: int, cont_len: int, relabel: bool) -> dict:
    """G members per branch point t0: τ_ref's context up to t0, then L_traj sampled steps (the training windows),
    then up to L_eval mean-action steps; score R_i = the return of both. With relabel the continuation runs to
    the episode's end (ODT relabels with the full achieved return-to-go); the score keeps its L_traj + L_eval."""
    n, t0 = len(envs), np.repeat(t0s, group_size)  # member i belongs to group i // G
    for env, t in zip(envs, t0, strict=True):
        restore(env, seed, ref["sim"][t] if len(ref["sim"]) else None, int(t))
    agent.win = reference_windows(agent, ref, t0)  # the shared context of each group
    t = torch.as_tensor(t0, device=agent.device)
    obs = ref["obs"][t0].copy()
    scored = sub_len + cont_len
    horizon = max(scored, agent.max_ep_len - int(t0.min())) if relabel else scored
    windows: dict[str, list] = {key: [] for key in WINDOW_KEYS}
    active, scores = np.ones(n, bool), np.zeros(n, np.float64)
    step_valid, rewards = np.zeros((n, sub_len), bool), np.zeros((n, horizon), np.float32)
    env_steps = 0
    for j in range(horizon):
        if not active.any():
            break
        action, _ = agent.act(sample=j < sub_len)
        if j < sub_len:
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
    while len(windows["valid"]) < sub_len:  # every member ended early: pad (masked by step_valid)
        for key in WINDOW_KEYS:
            windows[key].append(torch.zeros_like(windows[key][-1]))
    win = {key: torch.stack(v, dim=1) for key, v in windows.items()}  # (N, L, K, ·)
    return {"windows": win, "step_valid": torch.as_tensor(step_valid, device=agent.device),
            "scores": torch.as_tensor(scores, dtype=torch.float32, device=agent.device), "rewards": rewards,
            "t0": t0, "env_steps": env_steps}


def concat_groups(parts: list[dict]) -> dict:
    """Join groups rolled out one after another (`train` rolls one group at a time to honour budgets)."""
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
def make_grpo_batch(model, groups: dict, ref: dict, *, group_size: int, adv_eps: float, relabel: bool = False,
                    rtg_scale: float = 1.0) -> dict:
    """Advantages Â_i (group_advantages) and π_old for a round. π_old is evaluated on the rollout windows (the
    RTGs the actions were sampled with); π_θ is trained on `windows`: the same tensors unless relabel."""
    model.eval()
    win, mask = groups["windows"], groups["step_valid"].float()
    old, _, _ = step_log_probs(model, win)
    train_win = dict(win)
    if relabel:
        train_win["rtg"] = relabeled_rtg(groups, ref, win["valid"].shape[2], rtg_scale).to(mask.device)
    scores = groups["scores"].view(-1, group_size)
    return {"windows": train_win, "mask": mask, "old_log_prob": old * mask,
            "advantages": group_advantages(scores, adv_eps).flatten(),
            "group_return_std": scores.std(-1, unbiased=False).mean()}


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """log ρ_i of each member over its valid steps: Σ_t (log π_θ − log π_old) (joint likelihood, paper §3.3) or
    its mean over the steps (GSPO's length-normalised s_i(θ), arXiv 2507.18071). (M, L) → (M,)."""
    total = ((logp - old_logp) * mask).sum(1)
    return total if mode == "joint" else total / mask.sum(1).clamp(min=1)


def grpo_losses(model, ref_model, log_temperature, batch: dict, idx: torch.Tensor, *, ratio: str, clip_eps: float,
                max_log_ratio: float, entropy_coef: float | None, kl_coef: float, target_entropy: float):
    """GRPO's objective (arXiv 2402.03300 eq. 3) on sub-trajectories: the PPO-clipped surrogate (arXiv 1707.06347
    eq. 7) of member i's sequence ratio ρ_i (`sequence_log_ratio`) times its one advantage Â_i, an entropy bonus
    (λ of ODT eq. 7, or entropy_coef), optionally kl_coef · k3 KL to π_ref (arXiv 2402.03300 eq. 4)."""
    win = {key: v[idx] for key, v in batch["windows"].items()}
    mask, adv = batch["mask"][idx], batch["advantages"][idx]
    logp, mu, log_std = step_log_probs(model, win)
    raw = sequence_log_ratio(logp, batch["old_log_prob"][idx], mask, ratio)
    rho = raw.clamp(-max_log_ratio, max_log_ratio).exp()
    surrogate = torch.min(rho * adv, rho.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # PPO clip
    pg_loss = -surrogate.mean()
    # members whose term still has a gradient (the unclipped branch of the min, A ≠ 0)
    live = (adv != 0) & ~((adv > 0) & (rho > 1 + clip_eps)) & ~((adv < 0) & (rho < 1 - clip_eps))
    n_valid = mask.sum().clamp(min=1)
    _, sample_log_prob = tanh_normal_rsample(mu, log_std)
    entropy = -(sample_log_prob.view_as(mask) * mask).sum() / n_valid  # one-sample estimate, as in pretraining
    temperature = log_temperature.exp()
    coef = temperature.detach() if entropy_coef is None else entropy_coef
    loss = pg_loss - coef * entropy
    kl_ref = torch.zeros((), device=mask.device)
    if kl_coef > 0:  # k3 estimator of KL(π_θ ‖ π_ref) on the taken actions
        with torch.no_grad():
            ref_logp = step_log_probs(ref_model, win)[0]
        d = ref_logp - logp
        kl_ref = ((d.exp() - d - 1) * mask).sum() / n_valid
        loss = loss + kl_coef * kl_ref
    dual_loss = temperature * (entropy - target_entropy).detach()  # ODT's dual loss of log λ, continued
    with torch.no_grad():  # k3 estimate of KL(π_old ‖ π_θ) of the joint sub-trajectory, whatever --ratio is
        joint = sequence_log_ratio(logp, batch["old_log_prob"][idx], mask, "joint").clamp(max=max_log_ratio)
        approx_kl = (joint.exp() - 1 - joint).mean()
    stats = {"train/policy_loss": pg_loss, "train/entropy": entropy, "train/temperature": temperature,
             "train/ratio_mean": rho.mean(), "train/ratio_max": rho.max(),
             "train/clip_fraction": ((rho - 1).abs() > clip_eps).float().mean(),
             "train/approx_kl": approx_kl, "train/kl_ref": kl_ref, "train/advantage_abs": adv.abs().mean(),
             "train/live_fraction": live.float().mean(), "train/effective_update": live.any().float()}
    return loss, dual_loss, stats


def grpo_update(model, ref_model, optimizer, log_temperature, temperature_optimizer, batch, idx, *, grad_clip: float,
                dropout: bool, **coefficients):
    """A gradient step on grpo_losses (its `coefficients` by name); λ's dual step unless entropy_coef is fixed."""
    model.train(dropout)
    loss, dual_loss, stats = grpo_losses(model, ref_model, log_temperature, batch, idx, **coefficients)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if coefficients["entropy_coef"] is None:  # keep ODT's dual update of λ (entropy ≥ β)
        temperature_optimizer.zero_grad(set_to_none=True)
        dual_loss.backward()
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


def critic_update(critic, critic_target, critic_optimizer, model, batch: dict, *, gamma: float, tau: float):
    """TD3 critic step (arXiv 1802.09477 Alg. 1): y = r + γ(1−d)·min Q'(s', ã'), ã' = tanh(μ_θ(window')) + clip(N(0,
    0.2²), ±0.5): the DT's mean action is the target policy, so Q scores an action then mean actions, as R_i does."""
    with torch.no_grad():
        model.eval()
        nxt = [batch[f"next_{k}"] for k in WINDOW_KEYS]
        mu, _ = model.action_dist(model(*nxt)[:, -1])
        noise = (0.2 * torch.randn_like(mu)).clamp(-0.5, 0.5)
        next_action = (torch.tanh(mu) + noise).clamp(-1, 1)
        q1_t, q2_t = critic_target(batch["next_states"][:, -1], next_action)
        y = batch["rewards"] + gamma * (1 - batch["dones"]) * torch.min(q1_t, q2_t)
    q1, q2 = critic(batch["states"], batch["actions"])
    loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
    critic_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    critic_optimizer.step()
    polyak_update(critic_target, critic, tau)
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
    return {"windows": {k: v[:, None] for k, v in win.items()}, "step_valid": torch.ones_like(win["valid"][:, -1:]),
            "scores": scores, "rewards": np.zeros((len(t0), 1), np.float32), "t0": t0, "env_steps": 0}


# TRY NOT TO MODIFY: run folder, metrics, checkpoints, errors
def eval_seeds(seed: int, n: int) -> list[int]:
    """Reset seeds of the n evaluation episodes: the same episodes at every evaluation of a run."""
    return [10_000 + seed * 1000 + i for i in range(n)]


def online_episode_seed(seed: int, round_: int, index: int = 0) -> int:
    """Reset seed of the index-th online episode of a round: a fresh one each time, the same after a resume."""
    return seed * 1_000_003 + round_ * 1000 + index


def set_up(args: Args, typed: set[str] | None = None) -> tuple[Args, OfflineData, torch.device, Path, dict | None,
                                                              bool]:
    """Flags, seeds, device, dataset, defaults, the GRPO settings and the env, then the run folder (a refused start
    leaves nothing behind); the checkpoint to resume from (None: a new run); whether Q-GRPO's critic is used."""
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
    run.validate_args(args, VALID_MIN)  # the GRPO settings too, now that their defaults are in
    env = data.make_env()
    restorable = hasattr(env.unwrapped, "set_state") or is_one_step(data)  # one start state: a reset restores
    env.close()
    use_critic = args.advantage == "critic" or (args.advantage == "auto" and not restorable)
    if args.advantage == "group" and not restorable:
        raise run.UserError(f"--advantage group branches each group from a saved simulator state, but the env of "
                            f"'{args.env_id}' has no set_state(qpos, qvel) and its episodes are longer than one "
                            f"step. Use --advantage critic (Q-GRPO) or auto.")
    if use_critic and args.relabel:
        raise run.UserError("--relabel relabels group rollouts with their achieved returns; Q-GRPO (--advantage "
                            "critic, or an env without set_state) has none. Drop one of the two.")
    if args.min_steps_per_round is not None or args.updates_per_round != Args.updates_per_round:
        print("warning: --min-steps-per-round / --updates-per-round are ODT's; dt_grpo.py ignores them (a round is "
              "--groups-per-round groups; updates per round = --grpo-epochs × minibatches).", file=sys.stderr)
    run.start_run_folder(run_dir, {"script": Path(__file__).name, "args": dataclasses.asdict(args),
                                   "dataset": data.source, "obs_dim": data.obs_dim, "act_dim": data.act_dim,
                                   "device": str(device), "advantage": "critic" if use_critic else "group"})
    print(f"{Path(__file__).name}: {args.env_id} ({data.source}), {len(data.episodes)} trajectories, device {device} "
          f"({args.precision}), advantages from {'a twin-Q critic (Q-GRPO)' if use_critic else 'group returns'}, "
          f"run folder {run_dir}")
    return args, data, device, run_dir, checkpoint, use_critic


class Trainer:
    """The run state: model, optimisers, offline data, the frozen pretrained policy π_ref, the Q-GRPO critic, the
    loop's position (`counters`; `round_state`, the round in progress) and metrics; `state_dict()` is the checkpoint."""

    def __init__(self, args: Args, data: OfflineData, device: torch.device, run_dir: Path, *, use_critic: bool,
                 checkpoint: dict | None):
        self.args, self.data, self.device, self.run_dir, self.use_critic = args, data, device, run_dir, use_critic
        self.rng = np.random.default_rng(args.seed)  # window sampling, branch points, minibatches, critic batches
        self.eval_envs = make_vector_env(data.make_env, args.eval_episodes)
        self.reference_env = data.make_env()
        self.member_envs = [data.make_env() for _ in range(0 if use_critic else args.group_size)]
        self.max_ep_len = self.eval_envs.envs[0].spec.max_episode_steps or 1000
        # ALGO LOGIC: model, optimisers, offline data, π_ref, the Q-GRPO critic
        self.model = DecisionTransformer(
            data.obs_dim, data.act_dim, embed_dim=args.embed_dim, n_layers=args.n_layers, n_heads=args.n_heads,
            dropout=args.dropout, max_ep_len=self.max_ep_len, use_timestep_embedding=args.use_timestep_embedding,
            precision=args.precision).to(device)
        self.optimizer = Lamb(lamb_param_groups(self.model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
        self.scheduler = warmup_schedule(self.optimizer, args.warmup_steps)
        self.log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
        self.temperature_optimizer = torch.optim.Adam([self.log_temperature], lr=args.temperature_lr,
                                                      betas=(0.9, 0.999))
        self.offline = OfflineWindows(data.episodes, state_mean=data.state_mean, state_std=data.state_std,
                                      rtg_scale=args.rtg_scale, max_ep_len=self.max_ep_len, device=device)
        self.online_optimizer = torch.optim.Adam(self.model.parameters(), lr=args.online_learning_rate)
        self.ref_model: DecisionTransformer | None = None  # frozen pretrained policy (KL anchor), after pretraining
        self.critic = Critic(data.obs_dim, data.act_dim, hidden=256, layer_norm=False).to(device)  # Q-GRPO only
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
        self.critic_replay = CriticReplay(args.critic_buffer)
        # The loop's position; round_state: τ_ref, the branch points still to roll, the groups, the minibatches left
        self.counters = {"updates": 0, "env_steps": 0, "rounds": 0, "pretrain_evaluated": False}
        self.round_state: dict = {}
        self.meter = run.StatsMeter()
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
        self.logger = run.RunLogger(run_dir, args, self.counters if self.resumed else None)
        self.checkpoints = run.Interval(args.checkpoint_interval, start=self.counters["updates"])
        self.evaluations = run.Interval(args.eval_interval, start=self.counters["env_steps"])
        self.final, self.final_at = {}, -1  # the latest evaluation's metrics and the update it was taken at

    # A checkpoint: these objects' state_dict(), log λ, π_ref, the Q-GRPO critic, the loop's position, the RNG states
    STATE = ("model", "optimizer", "scheduler", "temperature_optimizer", "online_optimizer", "meter")

    def state_dict(self) -> dict:
        critic = None if not self.use_critic else {
            "critic": self.critic.state_dict(), "target": self.critic_target.state_dict(),
            "optimizer": self.critic_optimizer.state_dict(), "replay": dict(self.critic_replay.__dict__)}
        return {**{key: getattr(self, key).state_dict() for key in self.STATE}, "counters": dict(self.counters),
                "log_temperature": self.log_temperature.detach().cpu(), "rng": run.rng_state(self.rng),
                "reference_model": None if self.ref_model is None else self.ref_model.state_dict(),
                "critic": critic, "round_state": self.round_state}

    def load_state_dict(self, checkpoint: dict) -> None:
        for key in self.STATE:
            getattr(self, key).load_state_dict(checkpoint[key])
        with torch.no_grad():
            self.log_temperature.copy_(checkpoint["log_temperature"])
        if checkpoint["reference_model"] is not None:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            self.ref_model.load_state_dict(checkpoint["reference_model"])
        if checkpoint["critic"] is not None:
            self.critic.load_state_dict(checkpoint["critic"]["critic"])
            self.critic_target.load_state_dict(checkpoint["critic"]["target"])
            self.critic_optimizer.load_state_dict(checkpoint["critic"]["optimizer"])
            self.critic_replay.__dict__.update(checkpoint["critic"]["replay"])
        self.counters.update(checkpoint["counters"])
        self.round_state = checkpoint["round_state"]
        run.restore_rng_state(self.rng, checkpoint["rng"])

    def save_checkpoint(self) -> None:
        self.logger.stamp(self.counters)  # the wall time and metrics rows a resume continues from
        if self.args.save_model:
            run.save_checkpoint(self.run_dir, self.state_dict())

    def eval_agent(self) -> DTAgent:
        """Evaluation acts with the mean action tanh(μ), conditioned on g_eval."""
        return DTAgent(self.model, self.args, state_mean=self.data.state_mean, state_std=self.data.state_std,
                       target_return=self.args.g_eval, sample=False, device=self.device, max_ep_len=self.max_ep_len)

    def evaluate(self) -> dict:
        seeds = eval_seeds(self.args.seed, self.args.eval_episodes)  # same every evaluation
        return evaluate(self.eval_envs, self.eval_agent(), seeds, self.data.normalized_score)

    def train_step(self, source: OfflineWindows) -> None:
        """Alg. 2 lines 4-9: a batch of windows from `source`, one gradient update of θ and log λ (eq. 7)."""
        t0 = time.perf_counter()
        stats = update(self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                       log_temperature=self.log_temperature, temperature_optimizer=self.temperature_optimizer,
                       batch=source.sample(self.args.batch_size, self.args.context_len, self.rng), args=self.args)
        self.counters["updates"] += 1
        self.meter.add(stats, time.perf_counter() - t0)

    def log_row(self, extra: dict, checkpoint: bool = False) -> None:
        """A metrics row (the loop's position, the mean training statistics since the last row, `extra`)."""
        self.logger.log_stats(self.counters, self.meter, extra)  # stops at a non-finite statistic
        if checkpoint:
            self.save_checkpoint()

    def log_pretraining(self) -> None:
        """A metrics row every --log-interval updates (and after the first and the last), with a checkpoint when
        one is due; the cost estimate after three updates (past the first calls' warm-up)."""
        args, n = self.args, self.counters["updates"]
        if n == 3 and not self.resumed:  # rounds ≥ online_steps / (groups × G × (L_traj + L_eval)) env steps
            members = args.groups_per_round * args.group_size
            rounds = args.online_steps / (members * (args.sub_len + args.cont_len))
            updates = rounds * args.grpo_epochs * math.ceil(members / (args.grpo_minibatch or members))
            run.print_cost_estimate(self.meter.seconds / max(self.meter.n, 1), args, updates)
        if n % args.log_interval == 0 or n in (1, args.pretrain_updates):
            self.log_row({"phase": "pretrain", "charts/updates_per_second": self.meter.updates_per_second()},
                         checkpoint=self.checkpoints.due(n))

    # ALGO LOGIC: the steps of a GRPO round (arXiv 2601.00167), in the order `train` takes them
    def window_agent(self, n: int) -> WindowAgent:
        return WindowAgent(self.model, n, self.args.eval_context_len, self.data.state_mean, self.data.state_std,
                           self.args.rtg_scale, self.max_ep_len, self.device)

    def count_steps(self, n: int, since: float) -> None:
        """Count a rollout's env steps and time (SPS); evaluate once an --eval-interval boundary is crossed."""
        at, rnd = self.counters, self.round_state
        rnd["rollout_time"] = rnd.get("rollout_time", 0.0) + time.perf_counter() - since
        at["env_steps"] += n
        if self.evaluations.due(at["env_steps"]):
            self.final, self.final_at = self.evaluate(), at["updates"]
            self.logger.log({"global_step": at["updates"], "env_steps": at["env_steps"], "rounds": at["rounds"],
                             "phase": "online", **self.final})

    def qgrpo_groups(self, agent: WindowAgent) -> None:
        """Q-GRPO: τ_ref's transitions train the critic (TD3, --critic-updates-per-step per env step); after
        --critic-warmup env steps, each branch point's group is G actions from π_old scored by min(Q1, Q2)."""
        args, rnd = self.args, self.round_state
        self.critic_replay.add_episode(agent, rnd["ref"])
        n_updates = max(1, round(len(rnd["ref"]["rewards"]) * args.critic_updates_per_step))
        losses = [critic_update(self.critic, self.critic_target, self.critic_optimizer, self.model,
                                self.critic_replay.sample(args.batch_size, self.rng), gamma=args.gamma, tau=args.tau)
                  for _ in range(n_updates)]
        rnd["critic_loss"] = float(torch.stack(losses).mean())
        if self.counters["env_steps"] >= min(args.critic_warmup, args.online_steps):
            rnd["parts"].append(critic_groups(self.model, self.critic, agent, rnd["ref"], rnd["t0s"], args.group_size))

    def grpo_step(self, idx: torch.Tensor) -> dict:
        """Step (5): one GRPO update on the members `idx` of the round's batch; the hyperparameters it reads."""
        args, t0 = self.args, time.perf_counter()
        stats = grpo_update(self.model, self.ref_model, self.online_optimizer, self.log_temperature,
                            self.temperature_optimizer, self.round_state["batch"], idx, ratio=args.ratio,
                            clip_eps=args.clip_eps, max_log_ratio=args.max_log_ratio, entropy_coef=args.entropy_coef,
                            kl_coef=args.kl_coef, target_entropy=args.target_entropy, grad_clip=args.grad_clip,
                            dropout=args.online_dropout)
        self.round_state["effective"] += float(stats["train/effective_update"])  # its objective still had a gradient
        self.counters["updates"] += 1
        self.meter.add(stats, time.perf_counter() - t0)
        return stats

    def end_round(self) -> None:
        """The round's metrics row (with the final evaluation once the budget is spent); a checkpoint when due."""
        at, rnd, last = self.counters, self.round_state, self.counters["env_steps"] >= self.args.online_steps
        ref, parts = rnd["ref"], rnd["parts"]
        at["rounds"] += 1
        steps = len(ref["rewards"]) + sum(p["env_steps"] for p in parts)
        extra = {"phase": "online", "rollout/return": float(ref["rewards"].sum()),
                 "rollout/length": float(len(ref["rewards"])),
                 "rollout/groups": sum(len(p["t0"]) for p in parts) // self.args.group_size,
                 "rollout/branch_step_mean": float(rnd["t0s"].mean()),
                 "charts/SPS": steps / max(rnd["rollout_time"], 1e-9)}
        if self.use_critic:
            extra["train/critic_loss"] = rnd["critic_loss"]
        if "batch" in rnd:
            extra.update({"rollout/group_return": float(torch.cat([p["scores"] for p in parts]).mean()),
                          "train/group_return_std": float(rnd["batch"]["group_return_std"]),
                          "train/effective_updates": rnd["effective"],
                          "charts/updates_per_second": self.meter.updates_per_second()})
        if last and self.final_at != at["updates"]:
            self.final, self.final_at = self.evaluate(), at["updates"]
            extra.update(self.final)
        rnd.clear()
        self.log_row(extra, checkpoint=self.checkpoints.due(at["updates"]) or last)

    def stopped(self) -> dict:
        self.save_checkpoint()
        return run.stop_run(self.run_dir, self.logger, self.counters)

    def finish(self) -> dict:
        """Final metrics row (evaluating unless no update followed the last evaluation), model.pt, the
        --capture-video episode, summary.json."""
        if self.final_at != self.counters["updates"]:  # the last round did not evaluate (or no online phase)
            self.final = self.evaluate()
        summary = {"run_dir": str(self.run_dir), "env_id": self.args.env_id, "counters": self.counters,
                   "wall_time_s": self.logger.wall_time(), **self.final}
        self.log_row({"phase": "final", **self.final})
        video = (self.data.make_env, self.eval_agent(), eval_seeds(self.args.seed, 1)[0])
        return run.finish_run(self.run_dir, self.logger, summary, self.model.state_dict() if self.args.save_model
                              else None, video if self.args.capture_video else None)


def train(t: Trainer, stop: run.StopFlag) -> None:
    """ODT's pretraining (arXiv 2202.05607 Alg. 1 lines 1-3), then GRPO rounds: steps (1)-(5) of the algorithm box
    (arXiv 2601.00167, docs/dt_grpo.md). The loop's position is `t.counters` and `t.round_state`, saved in every
    checkpoint: a stop request is honoured between any two groups or updates, and --resume continues from there."""
    args, at, rnd = t.args, t.counters, t.round_state
    # Input π_θ: pretrained by ODT on every offline trajectory (Table C.4: 5k-10k updates), then evaluated once
    bar = run.progress_bar("pretraining", at["updates"], args.pretrain_updates, "upd", args.progress)
    while at["updates"] < args.pretrain_updates and not stop.requested:
        t.train_step(t.offline)
        t.log_pretraining()
        bar.update(1)
    bar.close()
    if not stop.requested and not at["pretrain_evaluated"]:
        metrics, at["pretrain_evaluated"] = t.evaluate(), True
        print(f"after pretraining: return {metrics['eval/return_mean']:.3g}, "
              f"normalized score {metrics['eval/normalized_score_mean']:.3g}")
        t.log_row({"phase": "pretrain", **metrics}, checkpoint=True)
    if t.ref_model is None and not stop.requested:  # π_ref of the KL term: the pretrained policy, frozen
        t.ref_model = copy.deepcopy(t.model).requires_grad_(False).eval()
    bar = run.progress_bar("finetuning", at["env_steps"], args.online_steps, "step",
                           args.progress and not stop.requested)
    while not stop.requested and (rnd or at["env_steps"] < args.online_steps):  # a round per iteration
        if not rnd:  # a new round (after a resume the loop may be in the middle of one)
            # (1) round r's reference episode τ_ref ~ π_θ(·|g_online): mean action (Q-GRPO samples, for its critic)
            seed, agent, since = online_episode_seed(args.seed, at["rounds"]), t.window_agent(1), time.perf_counter()
            ref = reference_rollout(t.reference_env, agent, seed, args.g_online * args.rtg_scale,
                                    sample=args.reference_sample or t.use_critic)
            rnd.update(ref=ref, episode_seed=seed, parts=[])
            t.count_steps(len(ref["rewards"]), since)
            # (2) active sampling: branch points along τ_ref drawn ∝ the predicted action variance Σσ² (R)
            gap = args.sub_len if args.branch_gap is None else args.branch_gap
            rnd["t0s"] = branch_points(ref["var"], args.groups_per_round, args.branch_sampling, t.rng, gap=gap)
            rnd["todo"] = [] if t.use_critic else list(rnd["t0s"])  # the branch points whose group is to roll
            if t.use_critic:  # Q-GRPO (Fig. 3c): no restore; a TD3 critic learns from τ_ref and scores G actions
                t.qgrpo_groups(agent)
        # (3) a group per branch point t0, one at a time: G members from τ_ref's state at t0, L_traj + L_eval steps
        while rnd["todo"] and at["env_steps"] < args.online_steps and not stop.requested:
            since = time.perf_counter()
            rnd["parts"].append(rollout_groups(
                t.member_envs, t.window_agent(args.group_size), rnd["ref"], np.array([rnd["todo"].pop(0)]),
                seed=rnd["episode_seed"], group_size=args.group_size, sub_len=args.sub_len, cont_len=args.cont_len,
                relabel=args.relabel))
            t.count_steps(rnd["parts"][-1]["env_steps"], since)
            bar.update(at["env_steps"] - bar.n)
        if stop.requested:
            break
        if "perms" not in rnd:  # (4) advantages Â_i and π_old; every epoch's minibatches, drawn once per round
            rnd.update(perms=[], effective=0.0)
            if rnd["parts"]:
                groups = concat_groups(rnd["parts"])
                rnd["batch"] = make_grpo_batch(t.model, groups, rnd["ref"], group_size=args.group_size,
                                               adv_eps=args.adv_eps, relabel=args.relabel, rtg_scale=args.rtg_scale)
                for _ in range(args.grpo_epochs):
                    perm = torch.as_tensor(t.rng.permutation(len(groups["t0"])), device=t.device)
                    rnd["perms"] += perm.split(args.grpo_minibatch or len(groups["t0"]))
        while rnd["perms"] and not stop.requested:
            t.grpo_step(rnd["perms"].pop(0))  # (5) a step of the PPO-clipped objective of the sequence ratios
        if not rnd["perms"]:
            t.end_round()  # metrics row; the final evaluation after the last round; a checkpoint when due
            bar.update(at["env_steps"] - bar.n)
    bar.close()


def main(args: Args, typed: set[str] | None = None) -> dict:
    args, data, device, run_dir, checkpoint, use_critic = set_up(args, typed)  # flags, seeds, dataset, run folder
    trainer = Trainer(args, data, device, run_dir, use_critic=use_critic, checkpoint=checkpoint)  # resumes one
    stop = run.StopFlag()  # Ctrl-C / SIGTERM: checkpoint at the next safe point, exit 3
    train(trainer, stop)  # ODT's offline pretraining, then GRPO rounds with no supervised term
    return trainer.stopped() if stop.requested else trainer.finish()


if __name__ == "__main__":
    run.cli(main, Args)
