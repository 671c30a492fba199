"""Online Decision Transformer + TD3 gradients ("RL gradients as vitamin").

Paper: K. Yan, A. G. Schwing, Y.-X. Wang, "Reinforcement Learning Gradients as Vitamin for Online Finetuning
Decision Transformers", NeurIPS 2024, arXiv 2410.24108 (§3-4, App. H, Table 9). ODT (arXiv 2202.05607) with a
deterministic tanh action head trained by masked MSE, a twin-Q critic trained by TD3 on every valid window
position, and a down-weighted TD3 actor term: L = MSE + α·(−mean Q1(s_t, μ_t)). One update (--pretrain-updates,
--updates-per-round) is one actor update after `policy_interval` critic updates.

Usage:
    python odt_td3.py --env-id hopper-random-v2          # paper hyperparameters (Table 9), 500k online steps
    python odt_td3.py --env-id toy-vitamin-v0            # the motivation toy (paper §3.1)
    python odt_td3.py --env-id hopper-random-v2 --alpha-online 0        # baseline: deterministic ODT
    python odt_td3.py --resume runs/<run folder>         # continue a stopped run

Deliberate differences from the authors' reference implementation (built on the ODT code):
- Time-limit truncations bootstrap (done = 1 at true terminations only); the reference's terminals bias Q.
- Next states from the dataset's next_observations: a window's last position is a full transition too.
- Target actor in eval mode under bf16 autocast: half the cost, actions change by ~0.005 (--no-bf16-targets).
- Budgets count actor updates, so the actor gets as much supervised pretraining as in odt.py.
- Toys default to α_online = 1 (MuJoCo: 0.1): their Q values are ~1000× smaller.
- Critic optimiser: AdamW with torch's default weight decay 0.01; no gradient clipping (TD3).
- As odt.py: LAMB without weight decay for vectors, compact pre-LN GPT, fixed evaluation seeds, Gymnasium data.
- Dropout masks on CPU draw 16-bit uniforms (p rounded to a multiple of 2^-16), see the `Dropout` class;
  attention is computed explicitly on CPU. Both for speed.
Details and measurements: docs/odt_td3.md
"""

from __future__ import annotations

import contextlib
import copy
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
    """offline actor updates before finetuning (None: Table 9, 5000; 10000 walker2d, 40000 Adroit/AntMaze)"""
    online_steps: int = 500_000
    """online environment steps of finetuning (paper: 500k MuJoCo, 1M Adroit/AntMaze/Maze2d)"""
    updates_per_round: int = 300
    """actor updates after each online rollout, each after `policy_interval` critic updates (ODT Table C.3: 300)"""
    min_steps_per_round: int | None = None
    """collect episodes until at least this many new env steps per round (None: per-dataset default, 1000 for
    random datasets, Adroit, AntMaze, Maze2d, else one episode; 0: one episode)"""
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
    """transformer width (None: 512 as ODT's Table C.3; 1024 for antmaze-umaze-diverse)"""
    n_layers: int = 4
    """transformer blocks (ODT Table C.3: 4)"""
    n_heads: int = 4
    """attention heads (ODT Table C.3: 4)"""
    dropout: float = 0.1
    """dropout in embeddings, attention and MLP (ODT Table C.3: 0.1)"""
    context_len: int | None = None
    """training context length K (None: Table 9, 20 MuJoCo, 5 Adroit/AntMaze)"""
    eval_context_len: int | None = None
    """context length for evaluation and online rollouts (None: Table 9, 5; 1 ant/pen/door/relocate/AntMaze)"""
    batch_size: int = 256
    """windows per gradient update, every valid position a transition for the critic (ODT Table C.3: 256)"""
    learning_rate: float | None = None
    """LAMB learning rate of the actor (None: Table 9, 1e-4; 1e-3 walker2d/ant/AntMaze)"""
    weight_decay: float | None = None
    """LAMB weight decay of the actor (None: Table 9, 5e-4 hopper; 1e-4 halfcheetah/ant/Adroit, 1e-3 walker2d)"""
    warmup_steps: int = 10_000
    """linear warm-up of the actor's learning rate (actor updates), pretraining into finetuning (ODT: 10^4)"""
    grad_clip: float = 0.25
    """global gradient-norm clip of the actor (ODT Table C.3: 0.25)"""
    buffer_size: int | None = None
    """replay capacity in trajectories (None: Table 9, 1000; 5000 Adroit, 2000 AntMaze)"""
    rtg_scale: float | None = None
    """multiplier of return-to-go tokens (None: 0.001 locomotion, 1 AntMaze, as ODT)"""
    g_eval: float | None = None
    """target return for evaluation (None: Table 9, e.g. 3600 hopper, 12000 pen, −100 AntMaze)"""
    g_online: float | None = None
    """target return for exploration rollouts (None: Table 9, 2 × g_eval on MuJoCo, g_eval elsewhere)"""
    use_timestep_embedding: bool | None = None
    """learned absolute timestep embedding (None: off for Gym, on for AntMaze, as ODT's Table C.4)"""
    alpha_pretrain: float | None = None
    """weight α of the RL actor loss during pretraining (None: Table 9, 0; 0.1 AntMaze)"""
    alpha_online: float | None = None
    """weight α of the RL actor loss during finetuning (None: Table 9, 0.1; 0 gives a deterministic ODT)"""
    supervised_coef: float = 1.0
    """weight of the supervised MSE actor loss (0: the paper's "TD3" baseline, DT actor trained by TD3 only)"""
    q_normalize: bool = False
    """divide α by mean|Q| of the batch (TD3+BC's normalisation; off in the paper)"""
    gamma: float | None = None
    """discount of the critic (None: Table 9, 0.99; 0.998 AntMaze)"""
    tau: float = 0.005
    """Polyak rate of the actor and critic targets (TD3: 0.005)"""
    policy_interval: int | None = None
    """critic updates per actor/target update (None: 2 as TD3; 1 for Adroit, AntMaze, Maze2d, App. H)"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (TD3: 0.2)"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise (TD3: 0.5)"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise added to the deterministic action during online rollouts (TD3: 0.1)"""
    critic_lr: float | None = None
    """AdamW learning rate of the critic (None: Table 9, 1e-3 MuJoCo, 2e-4 others)"""
    critic_hidden: int = 256
    """width of the two hidden layers of each Q network (App. H: 256)"""
    critic_layer_norm: bool | None = None
    """parameter-free LayerNorm after the critic's hidden layers (None: on for Adroit, AntMaze, Maze2d, App. H)"""
    reward_shift: float | None = None
    """added to every reward the agent trains on and conditions on (None: 0; −1 AntMaze, Table 9)"""
    bf16_targets: bool = True
    """run the target actor under bfloat16 autocast (~2× faster on AVX512-BF16 CPUs and Ampere+ GPUs; turn it
    off on hardware without native bf16)"""


# Per-dataset defaults: ODT+TD3 paper Table 9, one row per family ("<family>-<kind>" overrides "<family>"); what
# Table 9 does not list (AntMaze actor lr/wd, RTG scale, timestep embedding) keeps ODT's Table C.4 value.
SPARSE = dict(critic_lr=2e-4, critic_layer_norm=True, policy_interval=1, min_steps_per_round=1000)  # non-MuJoCo
ADROIT = dict(SPARSE, context_len=5, eval_context_len=1, learning_rate=1e-4, weight_decay=1e-4,
              pretrain_updates=40000, buffer_size=5000)
DATASET_DEFAULTS: dict[str, dict] = {
    "hopper": dict(pretrain_updates=5000, learning_rate=1e-4, weight_decay=5e-4, g_eval=3600, g_online=7200),
    "walker2d": dict(pretrain_updates=10000, learning_rate=1e-3, weight_decay=1e-3, g_eval=5000, g_online=10000),
    "halfcheetah": dict(pretrain_updates=5000, learning_rate=1e-4, weight_decay=1e-4, g_eval=6000, g_online=12000),
    "ant": dict(pretrain_updates=5000, learning_rate=1e-3, weight_decay=1e-4, eval_context_len=1,
                g_eval=6000, g_online=12000),
    "pen": dict(ADROIT, g_eval=12000, g_online=12000),
    "hammer": dict(ADROIT, eval_context_len=5, g_eval=16000, g_online=16000),
    "door": dict(ADROIT, g_eval=4000, g_online=4000),
    "relocate": dict(ADROIT, g_eval=5000, g_online=5000),
    # AntMaze: rewards shifted to r − 1, so RTG −100 asks for the goal within 100 steps.
    "antmaze": dict(SPARSE, context_len=5, eval_context_len=1, pretrain_updates=40000, buffer_size=2000,
                    learning_rate=1e-3, weight_decay=0.0, rtg_scale=1.0, reward_shift=-1.0, g_eval=-100,
                    g_online=-100, gamma=0.998, alpha_pretrain=0.1, use_timestep_embedding=True),
    "antmaze-umaze-diverse": dict(embed_dim=1024),
    "maze2d": dict(SPARSE),
    # One-step datasets (the toys of ODT+TD3 §3.1 and AG §3.1, under any id); return scale and targets
    # come from the data (one_step_defaults). Rewards in
    # [−1, 1] make |Q| ≈ 0.1, ~1000× smaller than in MuJoCo; α = 1 keeps the RL term comparable.
    "one-step": dict(pretrain_updates=1000, context_len=1, eval_context_len=1, buffer_size=1000,
                     alpha_online=1.0),
}
COMMON_DEFAULTS = dict(embed_dim=512, context_len=20, eval_context_len=5, pretrain_updates=5000,
                       learning_rate=1e-4, weight_decay=5e-4, buffer_size=1000, rtg_scale=1e-3,
                       use_timestep_embedding=False, alpha_pretrain=0.0, alpha_online=0.1, gamma=0.99,
                       policy_interval=2, critic_lr=1e-3, critic_layer_norm=False, reward_shift=0.0)


# The CPU-scale protocol (--preset cpu): the paper's settings except model size and budgets, ~30 min on a CPU.
PRESETS: dict[str, dict] = {
    "cpu": dict(embed_dim=128, n_layers=3, n_heads=1, batch_size=64, warmup_steps=1000, pretrain_updates=1000,
                online_steps=10_000, eval_interval=2000, eval_episodes=5),
}
# Smallest valid value of each numeric flag (checked before any work).
VALID_MIN = dict(generate_steps=1, pretrain_updates=0, online_steps=0, updates_per_round=1, min_steps_per_round=0,
                 eval_interval=1, eval_episodes=1, log_interval=1, checkpoint_interval=1, embed_dim=1, n_layers=1,
                 n_heads=1, context_len=1, eval_context_len=1, batch_size=1, learning_rate=0.0, weight_decay=0.0,
                 warmup_steps=1, grad_clip=0.0, buffer_size=1, rtg_scale=1e-12, gamma=0.0, policy_noise=0.0,
                 noise_clip=0.0, exploration_noise=0.0, critic_lr=0.0, critic_hidden=1, policy_interval=1)


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
    if data.dataset_kind == "random":  # random data: collect ≥ 1000 new transitions per round (paper App. H)
        table.setdefault("min_steps_per_round", 1000)
    run.fill_defaults(args, table, data, required=("g_eval", "g_online"))  # prints what it filled
    if args.policy_interval < 1 or not 0 < args.tau <= 1:
        raise run.UserError(f"--policy-interval must be ≥ 1 (critic updates per actor update) and --tau in (0, 1]; "
                            f"got {args.policy_interval} and {args.tau}.")
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
        # GPT-2 init (N(0, 0.02) weights, zero biases) inside the blocks only. The token embeddings keep
        # PyTorch's default init, as in the ODT reference: with a zero bias LayerNorm(W·x) = LayerNorm(W·cx) for
        # every c > 0, so the return token would carry only the sign of R and every state would lose its norm.
        self.blocks.apply(self._init_weights)
        # The deterministic tanh head keeps PyTorch's default init (small pre-tanh values: the critic's gradient
        # reaches the weights from the first update).

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

    def act(self, h: torch.Tensor) -> torch.Tensor:
        """Deterministic action μ = tanh(Linear(h)) (the DT is the TD3 actor: no Gaussian, no entropy)."""
        return torch.tanh(self.mu_head(h))


# ALGO LOGIC: twin-Q critic (poster "Practical Solution"; TD3, Fujimoto et al., 2018)
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
    For the critic every step also carries its raw reward (+ `reward_shift`), the done flag (true
    terminations only, never time limits) and the next step's state, RTG and timestep, taken from the
    dataset's next_observations, so the last step of a window is a full transition too.
    """

    def __init__(self, capacity: int, state_mean: np.ndarray, state_std: np.ndarray, rtg_scale: float,
                 max_ep_len: int, device: torch.device, reward_shift: float = 0.0):
        self.capacity, self.rtg_scale, self.max_ep_len, self.device = capacity, rtg_scale, max_ep_len, device
        self.reward_shift = reward_shift
        self.state_mean, self.state_std = state_mean.astype(np.float32), state_std.astype(np.float32)
        self.trajectories: list[dict[str, np.ndarray]] = []
        self.next_slot = 0  # FIFO pointer once full
        self._flat: dict[str, torch.Tensor] | None = None

    def add(self, episode: Episode) -> None:
        traj = {"observations": episode.observations, "actions": episode.actions, "rewards": episode.rewards,
                "terminals": episode.terminals, "next_observations": episode.next_observations}
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
        rtg = [returns_to_go(t["rewards"] + np.float32(self.reward_shift)) for t in trajs]
        steps = np.concatenate([np.arange(n) for n in self.lengths])
        flat = {
            "states": (cat("observations") - self.state_mean) / self.state_std,  # frozen normalisation
            "actions": cat("actions"),
            "rtg": np.concatenate(rtg) * self.rtg_scale,
            "timesteps": steps.clip(max=self.max_ep_len - 1),
            "rewards": cat("rewards") + np.float32(self.reward_shift),  # raw: the critic's rewards are unscaled
            "dones": cat("terminals"),  # time-limit truncations bootstrap: not terminal
            "next_states": (cat("next_observations") - self.state_mean) / self.state_std,
            "next_rtg": np.concatenate([np.append(r[1:], np.float32(0)) for r in rtg]) * self.rtg_scale,
            "next_timesteps": (steps + 1).clip(max=self.max_ep_len - 1),
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
def shifted_window(batch: dict) -> tuple[torch.Tensor, ...]:
    """The window one step later, (R_{t+1}, s_{t+1}, a_{t+1}) at every position t: the target actor's input.

    s_{t+1}, R_{t+1} and t+1 come from the sampler (next_observations), a_{t+1} is the window's next action.
    At the last position a_{t+1} is unknown but never seen: the action is read at the state token, which
    comes before a_{t+1} (causal mask), so zeros fill it.
    """
    valid, actions = batch["valid"], batch["actions"]
    next_actions = torch.cat((actions[:, 1:], torch.zeros_like(actions[:, :1])), dim=1) * valid.unsqueeze(-1)
    return batch["next_rtg"], batch["next_states"], next_actions, batch["next_timesteps"], valid


def td_target(rewards, dones, q1_next, q2_next, gamma: float) -> torch.Tensor:
    """y = r + γ(1 − done)·min(Q1', Q2')(s', ã): TD3's clipped double Q (§4.2). done = 1 only at true terminations."""
    return rewards + gamma * (1.0 - dones) * torch.minimum(q1_next, q2_next)


def td3_update(model, model_target, critic, critic_target, optimizer, scheduler, critic_optimizer, batches, *,
               alpha: float, supervised_coef: float, q_normalize: bool, gamma: float, tau: float, policy_noise: float,
               noise_clip: float, grad_clip: float, bf16_targets: bool) -> dict[str, torch.Tensor]:
    """One ODT+TD3 update (§3.2, App. H; TD3, Fujimoto et al. 2018, Alg. 1): a critic step on each batch, then one
    actor step on the last batch and a Polyak step of both targets. len(batches) = --policy-interval critic steps
    per actor step: TD3's delayed policy update (§5.2). Every valid position t of every window is a transition
    (s_t, a_t, r_t, s'_t, done_t); padded positions count in no loss and no statistic."""
    model.train()
    critic_stats = []
    for batch in batches:
        with torch.no_grad():  # the TD target, from the TARGET actor and the TARGET critic
            # ã_t = clamp(μ'(window one step later)_t + clip(ε, −c, c), −1, 1), ε ~ N(0, σ²): TD3 §5.3 smoothing
            with torch.autocast(batch["states"].device.type, dtype=torch.bfloat16, enabled=bf16_targets):
                mu_next = model_target.act(model_target(*shifted_window(batch))).float()
            noise = (torch.randn_like(mu_next) * policy_noise).clamp(-noise_clip, noise_clip)
            next_actions = (mu_next + noise).clamp(-1.0, 1.0)
            y = td_target(batch["rewards"], batch["dones"], *critic_target(batch["next_states"], next_actions), gamma)
        # Critic: Σ_i mean_valid (Q_i(s_t, a_t) − y_t)²
        q1, q2 = critic(batch["states"], batch["actions"])
        valid = batch["valid"].float()
        n_valid = valid.sum()
        critic_loss = (((q1 - y) ** 2 + (q2 - y) ** 2) * valid).sum() / n_valid
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_optimizer.step()
        critic_stats.append({"train/critic_loss": critic_loss, "train/q_mean": (q1.detach() * valid).sum() / n_valid})

    # Actor, on the last batch: c·MSE(μ_t, a_t) + α·(−mean_valid Q1(s_t, μ_t)) (§3.2), Q1 of the ONLINE critic as
    # in TD3; --q-normalize divides α by the detached mean|Q1| (TD3+BC, Fujimoto & Gu 2021).
    batch = batches[-1]
    valid = batch["valid"].float()
    n_valid = valid.sum()
    mu = model.act(model(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"], batch["valid"]))
    supervised = (((mu - batch["actions"]) ** 2).mean(-1) * valid).sum() / n_valid
    q = critic.q1(torch.cat((batch["states"], mu), dim=-1)).squeeze(-1)
    rl = -(q * valid).sum() / n_valid
    weight = alpha / ((q.abs() * valid).sum() / n_valid).detach().clamp(min=1e-6) if q_normalize else alpha
    actor_loss = supervised_coef * supervised + weight * rl
    optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()  # the critic's gradients from this loss are dropped: its next step starts with zero_grad
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    polyak_update(model_target, model, tau)  # both targets follow after the actor step (TD3 Alg. 1)
    polyak_update(critic_target, critic, tau)
    stats = {"train/supervised_loss": supervised, "train/actor_rl_loss": rl, "train/actor_loss": actor_loss}
    stats.update({k: torch.stack([s[k] for s in critic_stats]).mean() for k in critic_stats[0]})
    return {k: v.detach() for k, v in stats.items()}


# ALGO LOGIC: acting in the environment
class DTAgent:
    """Keeps the per-env context for rollouts (common.evaluation.Policy). All envs step in lockstep,
    so the window is simply the last `context_len` steps; RTG_{t+1} = RTG_t − r_t (scaled). Acts with the
    deterministic action plus N(0, noise²) exploration noise, clipped to the action range (TD3)."""

    def __init__(self, model: DecisionTransformer, args: Args, state_mean, state_std, target_return: float, *,
                 noise: float, device: torch.device, max_ep_len: int):
        self.model, self.noise, self.device = model, noise, device
        self.context_len, self.rtg_scale, self.max_ep_len = args.eval_context_len, args.rtg_scale, max_ep_len
        self.reward_shift = args.reward_shift
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
        action = self.model.act(h[:, -1])
        if self.noise > 0:
            action = (action + self.noise * torch.randn_like(action)).clamp(-1.0, 1.0)
        self.actions[:, t] = action  # the context holds the executed (noisy) action, as the replay does
        return action.cpu().numpy()

    @torch.inference_mode()  # like act(): buffers grown inside act() are inference tensors
    def observe(self, rewards: np.ndarray) -> None:
        r = torch.as_tensor(rewards, device=self.device, dtype=torch.float32)
        self.rtg[:, self.t + 1] = self.rtg[:, self.t] - (r + self.reward_shift) * self.rtg_scale
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
        self.model_target = copy.deepcopy(self.model).requires_grad_(False).eval()  # Polyak copy of the transformer
        self.critic = Critic(data.obs_dim, data.act_dim, hidden=args.critic_hidden,
                             layer_norm=args.critic_layer_norm).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=args.critic_lr)
        replay_kwargs = dict(state_mean=data.state_mean, state_std=data.state_std, rtg_scale=args.rtg_scale,
                             max_ep_len=self.max_ep_len, device=device, reward_shift=args.reward_shift)
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

    # What a checkpoint holds: these objects' state_dict(), plus the loop's position and the RNG states.
    STATE = ("model", "optimizer", "scheduler", "model_target", "critic", "critic_target", "critic_optimizer",
             "replay", "meter")

    def state_dict(self) -> dict:
        return {**{key: getattr(self, key).state_dict() for key in self.STATE}, "counters": dict(self.counters),
                "rng": run.rng_state(self.rng)}

    def load_state_dict(self, checkpoint: dict) -> None:
        for key in self.STATE:
            getattr(self, key).load_state_dict(checkpoint[key])
        self.counters.update(checkpoint["counters"])
        run.restore_rng_state(self.rng, checkpoint["rng"])

    def save_checkpoint(self) -> None:
        self.logger.stamp(self.counters)  # the wall time and metrics rows a resume continues from
        if self.args.save_model:
            run.save_checkpoint(self.run_dir, self.state_dict())

    def agent(self, target_return: float, *, explore: bool) -> DTAgent:
        """Evaluation acts with the deterministic action; exploration adds Gaussian noise to it (TD3)."""
        return DTAgent(self.model, self.args, state_mean=self.data.state_mean, state_std=self.data.state_std,
                       target_return=target_return, noise=self.args.exploration_noise if explore else 0.0,
                       device=self.device, max_ep_len=self.max_ep_len)

    def evaluate(self) -> dict:
        seeds = eval_seeds(self.args.seed, self.args.eval_episodes)  # same every evaluation
        return evaluate(self.eval_envs, self.agent(self.args.g_eval, explore=False), seeds, self.data.normalized_score)

    def train_step(self, source: TrajectoryReplay, alpha: float) -> None:
        """One update: `policy_interval` fresh batches of windows from `source`, a critic step on each, then one
        actor step with RL weight α and the Polyak step of both targets (td3_update)."""
        t0, args = time.perf_counter(), self.args
        batches = [source.sample(args.batch_size, args.context_len, self.rng) for _ in range(args.policy_interval)]
        stats = td3_update(self.model, self.model_target, self.critic, self.critic_target, self.optimizer,
                           self.scheduler, self.critic_optimizer, batches, alpha=alpha,
                           supervised_coef=args.supervised_coef, q_normalize=args.q_normalize, gamma=args.gamma,
                           tau=args.tau, policy_noise=args.policy_noise, noise_clip=args.noise_clip,
                           grad_clip=args.grad_clip, bf16_targets=args.bf16_targets)
        self.counters["updates"] += 1
        self.meter.add(stats, time.perf_counter() - t0)

    def explore(self) -> list[Episode]:
        """Alg. 1 line 4: episodes with the actor's action plus N(0, σ²) noise, conditioned on g_online, until the
        round has --min-steps-per-round new env steps (App. H: 1000 on random data, Adroit, AntMaze, Maze2d; else
        one episode); episode i of round r resets with online_episode_seed(seed, r, i). Counts the round's steps."""
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
    """ODT Alg. 1 as ODT+TD3 runs it (§3.2, App. H): the same loop, each update a TD3 step (`t.train_step`),
    with RL weight α_pretrain offline and α_online online. The loop's position is `t.counters` (updates, env steps,
    rounds, updates left in the round), saved in every checkpoint: a stop request is honoured between any two
    updates, and --resume continues from that point, mid-round included."""
    args, at = t.args, t.counters
    # Input π_θ: pretrained on every offline trajectory (Table 9: 5k-40k actor updates), then evaluated once
    with run.progress_bar("pretraining", at["updates"], args.pretrain_updates, "upd", args.progress) as bar:
        while at["updates"] < args.pretrain_updates and not stop.requested:
            t.train_step(t.offline, args.alpha_pretrain)  # the critic learns too; α_pretrain = 0 except AntMaze
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
                for episode in t.explore():  # line 4: roll out μ_θ(·|s, g_online) with exploration noise
                    t.replay.add(episode)  # line 5: FIFO (the oldest leaves); RTGs relabeled by achieved rewards
                at["round_updates_left"] = args.updates_per_round
                run.advance(bar, at["env_steps"], ret=f"{at['round']['rollout/return']:.4g}")  # the rollout's return
            while at["round_updates_left"] > 0 and not stop.requested:  # line 6: I iterations of Alg. 2
                t.train_step(t.replay, args.alpha_online)
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
