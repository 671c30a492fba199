"""Speed benchmark of the four scripts' real training/rollout functions (imported as modules, not reimplemented).

    python -m common.bench --script odt --shape small --yardstick      # fp32 and bf16 update steps + stock step
    python -m common.bench --script odt_td3 --shape paper --steps 3    # policy_interval critic + 1 actor step
    python -m common.bench --script reinformer_ag --shape small        # update/s, eval env steps/s for n = 0, 3, 10
    python -m common.bench --script dt_grpo --shape small --threads 1  # one GRPO round: rollouts + updates
    python -m common.bench --script odt --shape paper --cuda --precision both   # the same on a GPU

Shapes (embed, layers, heads, batch B, context K): odt / odt_td3 small 128/3/1/64/20, paper 512/4/4/256/20;
reinformer_ag small 128/3/4/64/5, paper 256/4/8/128/5; dt_grpo small 128/3/1/-/20, paper 512/4/4/-/20 (its
rollouts use the hopper defaults: eval context 5 and dt_grpo's GRPO defaults, groups rolled one at a time as
dt_grpo.main does; the figure names G, L and L_eval).
Offline data is synthetic: 1000 trajectories × 1000 Hopper-sized steps (S=11, A=3), state normalisation 0/1.
Environments (reinformer_ag evaluation, dt_grpo rollouts) are real Hopper-v5 with freshly initialised models.
Models and optimisers are built as the scripts' main() builds them (dataset defaults of hopper-medium-v2,
lamb_param_groups, the `precision` constructor argument).

Variants (`--precision fp32|bf16|both|auto`, `--compile` adds a torch.compile'd copy of each) are measured
INTERLEAVED in one process: every timed round calls each variant once, in alternating order (A B, B A, ...), so
drift and load on a shared machine hit all of them alike; each line reports a variant's median and the ratios.
`--yardstick` adds a stock `torch.nn.TransformerEncoder` training step (pre-norm, ReLU, dropout 0.1, causal mask,
Adam, fp32; small: d 128, 1 head, FF 512, 3 layers, B 64 × 60 tokens; paper: d 512, 4 heads, FF 2048, 4 layers,
B 256 × 60) to the same rounds: the official ODT step is ≈ 0.82× that stock step at small shape (interleaved
on an idle 2-core machine), so "≥ 2× the official step" reads "≤ 0.41× the stock step of the same run".
`--profile` profiles one call of the main figure per variant (top ops by self time) and counts its matmul FLOPs.
Every figure is a median over `--steps` timed rounds after `--warmup` untimed ones; each printed line names the
script, shape, device, thread count and variant. `--threads` (default 2) sets torch.set_num_threads (set
OMP_NUM_THREADS to the same number).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import inspect
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.datasets import Episode, OfflineData, _table_ref
from common.run import resolve_precision

TRANSFORMER = {"small": dict(embed_dim=128, n_layers=3, n_heads=1, batch_size=64, context_len=20),
               "paper": dict(embed_dim=512, n_layers=4, n_heads=4, batch_size=256, context_len=20)}
SHAPES = {"odt": TRANSFORMER, "odt_td3": TRANSFORMER,
          "reinformer_ag": {"small": dict(embed_dim=128, n_layers=3, n_heads=4, batch_size=64, context_len=5),
                            "paper": dict(embed_dim=256, n_layers=4, n_heads=8, batch_size=128, context_len=5)},
          "dt_grpo": {"small": dict(embed_dim=128, n_layers=3, n_heads=1, context_len=20),
                      "paper": dict(embed_dim=512, n_layers=4, n_heads=4, context_len=20)}}
# The stock yardstick step at each shape: nn.TransformerEncoder over B × 60 tokens (K 20 × (R, s, a)).
YARDSTICK = {"small": dict(d_model=128, nhead=1, dim_feedforward=512, num_layers=3, batch=64, tokens=60),
             "paper": dict(d_model=512, nhead=4, dim_feedforward=2048, num_layers=4, batch=256, tokens=60)}
# (script, shape) → (official time per batch as a multiple of the stock step, target speed-up, where it comes from).
# Per batch: one odt update; odt_td3 "one batch" = a critic step every batch, an actor step every 2nd.
REFERENCE = {
    ("odt", "small"): (0.82, 2.0, "official ODT step ≈ 0.82× stock, interleaved on an idle 2-core "
                                  "AVX-512 CPU"),
    ("odt", "paper"): (12.5 / 15.9, 2.5, "official ODT step 12.5 s vs stock 15.9 s, each measured alone "
                                         "on an idle 2-core AVX-512 CPU"),
    ("odt_td3", "small"): (150 / 175 * 0.82, 2.0, "official ODT+TD3 batch ~150 ms vs official ODT step 175 ms, "
                                                  "both measured alone, × the interleaved 0.82 (an estimate)"),
    ("odt_td3", "paper"): (8.3 / 15.9, 2.5, "official ODT+TD3 batch 8.3 s vs stock 15.9 s, each measured alone "
                                            "(an estimate)"),
}


@functools.cache
def synthetic_data(n_traj: int = 1000, length: int = 1000, obs_dim: int = 11, act_dim: int = 3) -> OfflineData:
    """Hopper-sized random trajectories posing as hopper-medium-v2 (real Hopper-v5 env, reference scores)."""
    rng = np.random.default_rng(0)
    episodes = [Episode(observations=rng.standard_normal((length, obs_dim), dtype=np.float32),
                        actions=rng.uniform(-1, 1, (length, act_dim)).astype(np.float32),
                        rewards=rng.standard_normal(length, dtype=np.float32),
                        terminals=np.zeros(length, bool), truncations=np.eye(length, dtype=bool)[-1],
                        next_observations=rng.standard_normal((length, obs_dim), dtype=np.float32))
                for _ in range(n_traj)]
    return OfflineData("hopper-medium-v2", "Hopper-v5", "hopper", "medium", episodes, np.zeros(obs_dim, np.float32),
                       np.ones(obs_dim, np.float32), *_table_ref("hopper", "medium"), "synthetic (common.bench)")


@functools.cache
def synthetic_replay(module, device: torch.device):
    data = synthetic_data()
    replay = module.TrajectoryReplay(len(data.episodes), data.state_mean, data.state_std, 1e-3, 1000, device)
    for episode in data.episodes:
        replay.add(episode)
    return replay


@dataclasses.dataclass
class Variant:
    precision: str  # "fp32" or "bf16"
    compiled: bool = False

    @property
    def name(self) -> str:
        return self.precision + ("+compile" if self.compiled else "")


@dataclasses.dataclass
class Figure:
    """One timed quantity of one variant. `count(value)` turns a call's return value into work done
    (e.g. env steps); by default one call is one unit. `shared`: the same for every variant (timed once)."""
    key: str
    label: str
    fn: Callable[[], object]
    unit: str
    count: Callable[[object], float] | None = None
    shared: bool = False
    main: bool = False  # the figure compared with the yardstick and profiled


def timed(fn, steps: int, warmup: int, sync) -> tuple[float, list]:
    """Median seconds of `fn()` over `steps` calls after `warmup` calls, and the values it returned."""
    medians, values = interleaved({"": fn}, steps, warmup, sync)
    return medians[""], values[""]


def interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int, sync) -> tuple[dict, dict]:
    """Median seconds per named function; each round calls every function once, the order reversed every
    other round (A B, B A, ...), so slow drift and load spikes are shared fairly."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    values: dict[str, list] = {n: [] for n in names}
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            values[name].append(fns[name]())
            sync()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}, values


def model_kwargs(cls, precision: str) -> dict:
    """`precision=` only where the model's constructor takes it (fp32 is every model's default)."""
    return {"precision": precision} if "precision" in inspect.signature(cls).parameters else {}


def finish_model(model: torch.nn.Module, variant: Variant) -> torch.nn.Module:
    if variant.compiled:
        model.compile()  # in place: same module, same parameters, compiled forward
    return model


def stock_step(device: torch.device, shape: str) -> Callable[[], float]:
    """One training step of a stock nn.TransformerEncoder (fp32, Adam): the in-process yardstick."""
    y = YARDSTICK[shape]
    layer = torch.nn.TransformerEncoderLayer(y["d_model"], y["nhead"], y["dim_feedforward"], dropout=0.1,
                                             activation="relu", batch_first=True, norm_first=True)
    encoder = torch.nn.TransformerEncoder(layer, y["num_layers"], enable_nested_tensor=False).to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(y["batch"], y["tokens"], y["d_model"], generator=gen).to(device)
    target = torch.randn(y["batch"], y["tokens"], y["d_model"], generator=gen).to(device)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(y["tokens"], device=device)
    encoder.train()

    def step() -> float:
        loss = F.mse_loss(encoder(x, mask=mask, is_causal=True), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return 0.0

    return step


# One builder per script: (module, opts, shape, device, variant) → figures. Built once per variant.
def bench_odt(odt, opts, shape, device, variant) -> list[Figure]:
    data = synthetic_data()
    args = odt.apply_dataset_defaults(odt.Args(**shape, precision=variant.precision), data)
    replay, rng = synthetic_replay(odt, device), np.random.default_rng(0)
    sample = lambda: replay.sample(shape["batch_size"], shape["context_len"], rng)  # noqa: E731
    sample()  # builds the flat tensors once
    model = odt.DecisionTransformer(data.obs_dim, data.act_dim, args.embed_dim, args.n_layers, args.n_heads,
                                    args.dropout, 1000, args.use_timestep_embedding,
                                    **model_kwargs(odt.DecisionTransformer, variant.precision)).to(device)
    model = finish_model(model, variant)
    optimizer = odt.Lamb(odt.lamb_param_groups(model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
    scheduler = odt.warmup_schedule(optimizer, args.warmup_steps)
    log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=args.temperature_lr, betas=(0.9, 0.999))
    update = lambda: odt.update(model, optimizer, scheduler, log_temperature, temperature_optimizer,  # noqa: E731
                                sample(), args)
    return [Figure("update", "update step (sampling included)", update, "updates/s", main=True),
            Figure("sample", "sampling one batch", sample, "batches/s", shared=True)]


def bench_odt_td3(odt_td3, opts, shape, device, variant) -> list[Figure]:
    data = synthetic_data()
    args = odt_td3.apply_dataset_defaults(odt_td3.Args(**shape, precision=variant.precision,
                                                       policy_interval=opts.policy_interval), data)
    replay, rng = synthetic_replay(odt_td3, device), np.random.default_rng(0)
    sample = lambda: replay.sample(shape["batch_size"], shape["context_len"], rng)  # noqa: E731
    batch = sample()  # also builds the flat tensors once
    model = odt_td3.DecisionTransformer(data.obs_dim, data.act_dim, args.embed_dim, args.n_layers, args.n_heads,
                                        args.dropout, 1000, args.use_timestep_embedding,
                                        **model_kwargs(odt_td3.DecisionTransformer, variant.precision)).to(device)
    model_target = copy.deepcopy(model).requires_grad_(False).eval()  # copied before compiling: two compiled forwards
    model, model_target = finish_model(model, variant), finish_model(model_target, variant)
    critic = odt_td3.Critic(data.obs_dim, data.act_dim, args.critic_hidden, args.critic_layer_norm).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    optimizer = odt_td3.Lamb(odt_td3.lamb_param_groups(model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
    scheduler = odt_td3.warmup_schedule(optimizer, args.warmup_steps)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr)

    hyper = dict(alpha=0.1, supervised_coef=args.supervised_coef, q_normalize=args.q_normalize, gamma=args.gamma,
                 tau=args.tau, policy_noise=args.policy_noise, noise_clip=args.noise_clip, grad_clip=args.grad_clip,
                 bf16_targets=args.bf16_targets)

    def update(k: int):  # one td3_update: k critic steps (k batches), one actor step, both Polyak steps
        return lambda: odt_td3.td3_update(model, model_target, critic, critic_target, optimizer, scheduler,
                                          critic_optimizer, [sample() for _ in range(k)], **hyper)

    def targets():  # the target transformer's forward pass on the shifted window: TD3's costliest no-grad part
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16_targets):
            return model_target.act(model_target(*odt_td3.shifted_window(batch))).float()

    k = args.policy_interval
    return [Figure("update", f"one update = {k} critic + 1 actor step = {k} batches, sampling included", update(k),
                   "actor updates/s", main=True),
            Figure("update1", f"1 critic + 1 actor step = 1 batch, sampling included (bf16_targets="
                   f"{args.bf16_targets}); a critic step costs (update − update1)/{max(k - 1, 1)}", update(1),
                   "updates/s"),
            Figure("targets", f"target actions, no_grad, one batch (bf16_targets={args.bf16_targets})", targets,
                   "batches/s")]


def bench_reinformer_ag(rf, opts, shape, device, variant) -> list[Figure]:
    from common.evaluation import make_vector_env, rollout

    data = synthetic_data()
    args = rf.apply_dataset_defaults(rf.Args(**shape, critic_updates=opts.critic_updates,
                                             precision=variant.precision), data)
    offline, rng = rf.OfflineDataset(data, args.rtg_scale, 1000, device), np.random.default_rng(0)
    model = rf.Reinformer(data.obs_dim, data.act_dim, args.embed_dim, args.n_layers, args.n_heads, args.dropout,
                          1000, args.separate_networks, **model_kwargs(rf.Reinformer, variant.precision)).to(device)
    model = finish_model(model, variant)
    optimizer = rf.Lamb(rf.lamb_param_groups(model, args.weight_decay), lr=args.learning_rate, eps=1e-8)
    scheduler = rf.warmup_schedule(optimizer, args.warmup_steps)
    log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=args.temperature_lr, betas=(0.9, 0.999))
    critic = rf.IQLCritic(data.obs_dim, data.act_dim, args.critic_hidden).to(device)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    def update():  # one update as reinformer_ag's training loop makes it
        rf.reinformer_update(model, optimizer, scheduler, log_temperature, temperature_optimizer,
                             offline.sample(args.batch_size, args.context_len, rng), expectile=args.expectile,
                             target_entropy=args.target_entropy, grad_clip=args.grad_clip)
        for _ in range(args.critic_updates):
            rf.iql_update(critic, critic_optimizer, offline.sample_transitions(args.critic_batch_size, rng),
                          gamma=args.gamma, expectile=args.iql_expectile, polyak=args.polyak)

    figures = [Figure("update", f"update = model step + {args.critic_updates} IQL step(s), sampling included",
                      update, "updates/s", main=True)]
    envs = make_vector_env(data.make_env, 10)
    max_ep_len = envs.envs[0].spec.max_episode_steps or 1000
    space, seeds = envs.single_action_space, [10_000 + i for i in range(10)]
    for n in opts.ag_steps:
        def evaluate_once(n=n):
            agent = rf.RFAgent(model, critic, args, data.state_mean, data.state_std, device, max_ep_len, space.low,
                               space.high, n, args.ag_lr)
            return rollout(envs, agent, seeds).steps  # episode steps, as evaluate_both counts them

        figures.append(Figure(f"eval{n}", f"evaluation, 10 Hopper-v5 envs, ag_steps {n} (untrained model)",
                              evaluate_once, "env steps/s", count=float))
    return figures


def bench_dt_grpo(dg, opts, shape, device, variant) -> list[Figure]:
    data = synthetic_data(n_traj=1)
    args = dg.apply_dataset_defaults(dg.Args(**shape), data)
    if hasattr(args, "precision"):
        args.precision = variant.precision
    model = dg.DecisionTransformer(data.obs_dim, data.act_dim, args.embed_dim, args.n_layers, args.n_heads,
                                   args.dropout, 1000, args.use_timestep_embedding,
                                   **model_kwargs(dg.DecisionTransformer, variant.precision)).to(device)
    ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    model, ref_model = finish_model(model, variant), finish_model(ref_model, variant)
    online_optimizer = torch.optim.Adam(model.parameters(), lr=args.online_learning_rate)
    log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=args.temperature_lr)
    n_members, rng = args.groups_per_round * args.group_size, np.random.default_rng(0)
    ref_env, member_envs = data.make_env(), [data.make_env() for _ in range(args.group_size)]
    agent = lambda n: dg.WindowAgent(model, n, args.eval_context_len, data.state_mean, data.state_std,  # noqa: E731
                                     args.rtg_scale, 1000, device)
    state: dict = {}

    def one_round():  # reference episode, then the groups one at a time, as in dt_grpo.main's online loop
        ref = dg.reference_rollout(ref_env, agent(1), 100, args.g_online * args.rtg_scale, args.reference_sample)
        gap = args.sub_len if args.branch_gap is None else args.branch_gap
        t0s = dg.branch_points(ref["var"], args.groups_per_round, args.branch_sampling, rng, gap)
        parts = [dg.rollout_groups(member_envs, agent(args.group_size), ref, t[None], seed=100,
                                   group_size=args.group_size, sub_len=args.sub_len, cont_len=args.cont_len,
                                   relabel=args.relabel) for t in t0s]
        groups = dg.concat_groups(parts)
        state["groups"], state["ref"] = groups, ref
        return len(ref["rewards"]) + groups["env_steps"]

    def make_batch():
        if "groups" not in state:
            one_round()
        state["batch"] = dg.make_grpo_batch(model, state["groups"], state["ref"], group_size=args.group_size,
                                            adv_eps=args.adv_eps, relabel=args.relabel, rtg_scale=args.rtg_scale)

    minibatch = args.grpo_minibatch or n_members
    idx = torch.as_tensor(rng.permutation(n_members)[:minibatch], device=device)

    def grpo_update():
        if "batch" not in state:
            make_batch()
        return dg.grpo_update(model, ref_model, online_optimizer, log_temperature, temperature_optimizer,
                              state["batch"], idx, ratio=args.ratio, clip_eps=args.clip_eps,
                              max_log_ratio=args.max_log_ratio, entropy_coef=args.entropy_coef, kl_coef=args.kl_coef,
                              target_entropy=args.target_entropy, grad_clip=args.grad_clip,
                              dropout=args.online_dropout)

    per_round = args.grpo_epochs * math.ceil(n_members / minibatch)
    return [Figure("round", f"one round's rollouts: reference + {args.groups_per_round}×{args.group_size} members, "
                            f"L {args.sub_len}, L_eval {args.cont_len}, K {args.eval_context_len} (untrained model)",
                   one_round, "env steps/s", count=float),
            Figure("batch", f"make_grpo_batch (π_old over {n_members} members)", make_batch, "batches/s"),
            Figure("update", f"GRPO update, {minibatch} members × L {args.sub_len} windows ({per_round} per round)",
                   grpo_update, "updates/s", main=True)]


def gemm_rate(device: torch.device, dtype: torch.dtype, sync, n: int = 1024, reps: int = 5) -> float:
    """GFLOP/s of an n×n×n matmul at this run's thread count: the matmul limit as the machine stands now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def profile(fig: Figure, variant: Variant, device: torch.device, seconds: float, sync, say, top: int,
            calls: int) -> None:
    """Top ops by self time over `calls` calls, and one call's matmul FLOPs (torch.utils.flop_counter) against
    the matmul rate of a 1024³ GEMM measured now, in fp32 and bf16."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fig.fn()
    flops = counter.get_total_flops()
    by_op = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    with torch_profile(activities=activities) as prof:
        for _ in range(calls):
            fig.fn()
        sync()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    say(f"profile [{variant.name}] {fig.label}: top {top} ops by self time, {calls} calls")
    print(prof.key_averages().table(sort_by=sort, row_limit=top), flush=True)
    ops = ", ".join(f"{op} {n / 1e9:.2f}" for op, n in sorted(by_op.items(), key=lambda kv: -kv[1]))
    say(f"profile [{variant.name}] matmul FLOPs of one call (fwd + bwd): {flops / 1e9:.2f} GFLOP ({ops}) → "
        f"{flops / seconds / 1e9:.0f} GFLOP/s at the median {seconds * 1e3:.1f} ms")
    for dtype in (torch.float32, torch.bfloat16):
        rate = gemm_rate(device, dtype, sync)
        say(f"profile [{variant.name}] {str(dtype)[6:]} 1024³ matmul here and now: {rate:.0f} GFLOP/s → "
            f"these FLOPs at that rate take {flops / rate / 1e6:.1f} ms = {flops / rate / 1e9 / seconds:.0%} of the "
            f"median step (for scale: fp32 ≈ 176 GFLOP/s on 2 idle threads of a 2-core AVX-512 CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", choices=SHAPES, default="odt")
    parser.add_argument("--shape", choices=("small", "paper"), default="small")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per figure (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before each figure")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (match OMP_NUM_THREADS)")
    parser.add_argument("--cuda", action="store_true", help="run on CUDA when available")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both", "auto"), default="both",
                        help="model precision; both: fp32 and bf16 interleaved in one run; auto: the scripts' "
                             "default on this hardware")
    parser.add_argument("--compile", action="store_true",
                        help="also measure a torch.compile'd copy of each variant (interleaved with the eager one)")
    parser.add_argument("--yardstick", action="store_true",
                        help="interleave a stock nn.TransformerEncoder step (fp32, same shape family) with the "
                             "main figure and report the ratio to it")
    parser.add_argument("--profile", action="store_true",
                        help="profile one call of the main figure per variant; count its matmul FLOPs")
    parser.add_argument("--profile-top", type=int, default=15, help="ops listed by --profile")
    parser.add_argument("--profile-calls", type=int, default=3, help="calls profiled by --profile")
    parser.add_argument("--policy-interval", type=int, default=2, help="odt_td3: critic steps per actor step")
    parser.add_argument("--critic-updates", type=int, default=1, help="reinformer_ag: IQL steps per update")
    parser.add_argument("--ag-steps", type=int, nargs="*", default=[0, 3, 10], help="reinformer_ag: evaluated n")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if opts.cuda and torch.cuda.is_available() else "cpu")
    if opts.cuda and device.type != "cuda":
        print("common.bench: --cuda given but CUDA is not available; running on the CPU", flush=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = SHAPES[opts.script][opts.shape]
    module = importlib.import_module(opts.script)

    precisions = {"both": ["fp32", "bf16"], "fp32": ["fp32"], "bf16": ["bf16"]}.get(opts.precision)
    if precisions is None:  # auto: as the scripts resolve it
        precisions = [resolve_precision("auto", device)]
    builder = globals()[f"bench_{opts.script}"]
    if opts.script == "dt_grpo" and "precision" not in inspect.signature(module.DecisionTransformer).parameters:
        if "bf16" in precisions:
            print("common.bench: dt_grpo's DecisionTransformer takes no `precision` yet: measuring fp32 only",
                  flush=True)
        precisions = ["fp32"]
    variants = [Variant(p, c) for p in precisions for c in ((False, True) if opts.compile else (False,))]
    tag = (f"{opts.script}.py {opts.shape} [{' '.join(f'{k}={v}' for k, v in shape.items())}] {device} "
           f"{torch.get_num_threads()} threads")

    def say(text: str) -> None:
        print(f"{tag} | {text}", flush=True)

    figures = {}
    for v in variants:
        torch.manual_seed(0)  # the same initial weights in every variant
        figures[v.name] = builder(module, opts, shape, device, v)
    stock = stock_step(device, opts.shape) if opts.yardstick else None
    first = variants[0].name
    medians_main: dict[str, float] = {}
    for i, fig in enumerate(figures[first]):
        names = [first] if fig.shared else [v.name for v in variants]
        fns = {name: figures[name][i].fn for name in names}
        if fig.main and stock is not None:
            fns["stock"] = stock
        medians, values = interleaved(fns, opts.steps, opts.warmup, sync)
        for name in names:
            seconds = medians[name]
            work = statistics.median(fig.count(v) for v in values[name]) if fig.count else 1.0
            extra = f", {work:.0f} per call" if fig.count else ""
            say(f"[{name if not fig.shared else 'any precision'}] {fig.label}: median {seconds * 1e3:.2f} ms → "
                f"{work / seconds:.2f} {fig.unit}{extra}")
        if fig.main:
            medians_main = {name: medians[name] for name in names}
        for v in variants[1:]:
            if not fig.shared:
                ratio = medians[v.name] / medians[first]
                say(f"[{v.name} / {first}] {fig.key}: {ratio:.2f}× the time ({1 / ratio:.2f}× the speed)")
        if fig.main and stock is not None:
            say(f"[stock] nn.TransformerEncoder step ({' '.join(f'{k}={v}' for k, v in YARDSTICK[opts.shape].items())}"
                f", fp32, Adam): median {medians['stock'] * 1e3:.2f} ms (interleaved with the figure above)")
            ref = REFERENCE.get((opts.script, opts.shape))
            per = opts.policy_interval if opts.script == "odt_td3" else 1
            for name in names:
                ratio = medians[name] / medians["stock"]
                line = f"[{name}] {fig.key} = {ratio:.3f}× the stock step"
                if ref is not None and device.type == "cpu":
                    official, target, source = ref
                    line += (f"; the official code ≈ {per * official:.2f}× ({source}) → {per * official / ratio:.2f}× "
                             f"the official speed; target ≥ {target:g}× means ≤ {per * official / target:.3f}× stock: "
                             f"{'MET' if ratio <= per * official / target else 'not met'}")
                say(line)
        if fig.key == "sample" and "update" in medians_main:
            say(f"sampling = {100 * medians[first] / medians_main[first]:.1f}% of the [{first}] update step")
    if opts.profile:
        for v in variants:
            fig = next(f for f in figures[v.name] if f.main)
            profile(fig, v, device, medians_main.get(v.name, math.nan), sync, say, opts.profile_top,
                    opts.profile_calls)


if __name__ == "__main__":
    main()
