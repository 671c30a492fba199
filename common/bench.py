"""Speed benchmark of the four scripts' real training/rollout functions (imported as modules, not reimplemented).

    python -m common.bench --script odt --shape small                  # update step + batch sampling
    python -m common.bench --script odt_td3 --shape paper --steps 3    # policy_interval critic + 1 actor step
    python -m common.bench --script reinformer_ag --shape small        # update/s, eval env steps/s for n = 0, 3, 10
    python -m common.bench --script dt_grpo --shape small --threads 1  # one GRPO round: rollouts + updates

Shapes (embed, layers, heads, batch B, context K): odt / odt_td3 small 128/3/1/64/20, paper 512/4/4/256/20;
reinformer_ag small 128/3/4/64/5, paper 256/4/8/128/5; dt_grpo small 128/3/1/-/20, paper 512/4/4/-/20 (its
rollouts use the hopper default eval context 5 and the GRPO defaults: 4 groups × 8 members, L 10, L_eval 40).
Offline data is synthetic: 1000 trajectories × 1000 Hopper-sized steps (S=11, A=3), state normalisation 0/1.
Environments (reinformer_ag evaluation, dt_grpo rollouts) are real Hopper-v5 with freshly initialised models.
Every figure is a median over `--steps` timed calls after `--warmup` untimed ones; each printed line names the
script, shape, device and thread count. `--threads` (default 2) sets torch.set_num_threads.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import statistics
import time

import numpy as np
import torch

from common.datasets import Episode, OfflineData, _table_ref

TRANSFORMER = {"small": dict(embed_dim=128, n_layers=3, n_heads=1, batch_size=64, context_len=20),
               "paper": dict(embed_dim=512, n_layers=4, n_heads=4, batch_size=256, context_len=20)}
SHAPES = {"odt": TRANSFORMER, "odt_td3": TRANSFORMER,
          "reinformer_ag": {"small": dict(embed_dim=128, n_layers=3, n_heads=4, batch_size=64, context_len=5),
                            "paper": dict(embed_dim=256, n_layers=4, n_heads=8, batch_size=128, context_len=5)},
          "dt_grpo": {"small": dict(embed_dim=128, n_layers=3, n_heads=1, context_len=20),
                      "paper": dict(embed_dim=512, n_layers=4, n_heads=4, context_len=20)}}


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


def synthetic_replay(module, data: OfflineData, device: torch.device):
    replay = module.TrajectoryReplay(len(data.episodes), data.state_mean, data.state_std, 1e-3, 1000, device)
    for episode in data.episodes:
        replay.add(episode)
    return replay


def timed(fn, steps: int, warmup: int, sync) -> tuple[float, list]:
    """Median seconds of `fn()` over `steps` calls after `warmup` calls, and the values it returned."""
    for _ in range(warmup):
        fn()
    times, values = [], []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        values.append(fn())
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), values


def bench_odt(odt, opts, shape, device, sync, report) -> None:
    args = odt.Args(**shape, learning_rate=1e-4, weight_decay=5e-4, target_entropy=-3.0)
    replay, rng = synthetic_replay(odt, synthetic_data(), device), np.random.default_rng(0)
    sample = lambda: replay.sample(shape["batch_size"], shape["context_len"], rng)  # noqa: E731
    sample()  # builds the flat tensors once
    model = odt.DecisionTransformer(11, 3, args.embed_dim, args.n_layers, args.n_heads, 0.1, 1000, False).to(device)
    optimizer = odt.Lamb(model.parameters(), lr=1e-4, weight_decay=5e-4)
    scheduler = odt.warmup_schedule(optimizer, 10_000)
    log_temperature = torch.tensor(math.log(0.1), device=device, requires_grad=True)
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=1e-4)
    t_sample, _ = timed(sample, max(opts.steps, 50), 5, sync)
    t_update, _ = timed(lambda: odt.update(model, optimizer, scheduler, log_temperature, temperature_optimizer,
                                           sample(), args), opts.steps, opts.warmup, sync)
    report("update step (sampling included)", t_update, 1 / t_update, "updates/s")
    report(f"sampling one batch ({100 * t_sample / t_update:.1f}% of the step)", t_sample, 1 / t_sample, "batches/s")


def bench_odt_td3(odt_td3, opts, shape, device, sync, report) -> None:
    args = odt_td3.Args(**shape, learning_rate=1e-4, weight_decay=5e-4, gamma=0.99,
                        policy_interval=opts.policy_interval)
    replay, rng = synthetic_replay(odt_td3, synthetic_data(), device), np.random.default_rng(0)
    sample = lambda: replay.sample(shape["batch_size"], shape["context_len"], rng)  # noqa: E731
    batch = sample()  # also builds the flat tensors once
    model = odt_td3.DecisionTransformer(11, 3, args.embed_dim, args.n_layers, args.n_heads, 0.1, 1000, False).to(device)
    model_target = copy.deepcopy(model).requires_grad_(False).eval()
    critic = odt_td3.Critic(11, 3, 256, False).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    optimizer = odt_td3.Lamb(model.parameters(), lr=1e-4, weight_decay=5e-4)
    scheduler = odt_td3.warmup_schedule(optimizer, 10_000)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-3)

    def critic_step():
        loss, _ = odt_td3.critic_loss(critic, critic_target, model_target, batch, args)
        critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        critic_optimizer.step()

    def actor_step():
        model.train()
        loss, _ = odt_td3.actor_loss(model, critic, batch, 0.1, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()

    k = args.policy_interval
    t_target, _ = timed(lambda: odt_td3.critic_targets(critic_target, model_target, batch, args), opts.steps,
                        opts.warmup, sync)
    t_critic, _ = timed(critic_step, opts.steps, opts.warmup, sync)
    t_actor, _ = timed(actor_step, opts.steps, opts.warmup, sync)
    t_update, _ = timed(lambda: odt_td3.update(model, model_target, critic, critic_target, optimizer, scheduler,
                                               critic_optimizer, [sample() for _ in range(k)], 0.1, args),
                        opts.steps, opts.warmup, sync)
    report(f"one update = {k} critic + 1 actor step, sampling included ({k / t_update:.2f} batches/s)", t_update,
           1 / t_update, "actor updates/s")
    report(f"target actions + y, no_grad, one batch ({100 * t_target / t_actor:.0f}% of an actor step, "
           f"{100 * k * t_target / t_update:.0f}% of the update)", t_target, 1 / t_target, "batches/s")
    report("critic step incl. targets, one batch", t_critic, 1 / t_critic, "steps/s")
    report("actor step (fwd + bwd + LAMB), one batch", t_actor, 1 / t_actor, "steps/s")


def bench_reinformer_ag(rf, opts, shape, device, sync, report) -> None:
    from common.evaluation import make_vector_env, rollout

    data = synthetic_data()
    args = rf.apply_dataset_defaults(rf.Args(**shape, critic_updates=opts.critic_updates), data)
    offline, rng = rf.OfflineDataset(data, args.rtg_scale, 1000, device), np.random.default_rng(0)
    model = rf.Reinformer(data.obs_dim, data.act_dim, args.embed_dim, args.n_layers, args.n_heads, args.dropout,
                          1000, args.separate_networks).to(device)
    optimizer = rf.Lamb(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, eps=1e-8)
    scheduler = rf.warmup_schedule(optimizer, args.warmup_steps)
    log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=args.temperature_lr)
    critic = rf.IQLCritic(data.obs_dim, data.act_dim, args.critic_hidden).to(device)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    t_update, _ = timed(lambda: rf.update(model, optimizer, scheduler, log_temperature, temperature_optimizer, critic,
                                          critic_optimizer, offline, rng, args), opts.steps, opts.warmup, sync)
    report(f"update = model step + {args.critic_updates} IQL step(s), sampling included", t_update, 1 / t_update,
           "updates/s")
    envs = make_vector_env(data.make_env, 10)
    max_ep_len = envs.envs[0].spec.max_episode_steps or 1000
    space, seeds = envs.single_action_space, [10_000 + i for i in range(10)]
    for n in opts.ag_steps:
        def evaluate_once(n=n):
            agent = rf.RFAgent(model, critic, args, data.state_mean, data.state_std, device, max_ep_len, space.low,
                               space.high, n, args.ag_lr)
            return rollout(envs, agent, seeds).steps  # episode steps, as evaluate_both counts them

        t_eval, counted = timed(evaluate_once, opts.steps, opts.warmup, sync)
        report(f"evaluation, 10 Hopper-v5 envs, ag_steps {n}, {counted[0]} episode steps (untrained model)",
               t_eval, counted[0] / t_eval, "env steps/s")


def bench_dt_grpo(dg, opts, shape, device, sync, report) -> None:
    data = synthetic_data(n_traj=1)
    args = dg.apply_dataset_defaults(dg.Args(**shape), data)
    model = dg.DecisionTransformer(data.obs_dim, data.act_dim, args.embed_dim, args.n_layers, args.n_heads,
                                   args.dropout, 1000, args.use_timestep_embedding).to(device)
    ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    online_optimizer = torch.optim.Adam(model.parameters(), lr=args.online_learning_rate)
    log_temperature = torch.tensor(math.log(args.init_temperature), device=device, requires_grad=True)
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=args.temperature_lr)
    n_members, rng = args.groups_per_round * args.group_size, np.random.default_rng(0)
    ref_env, member_envs = data.make_env(), [data.make_env() for _ in range(n_members)]
    agent = lambda n: dg.WindowAgent(model, n, args.eval_context_len, data.state_mean, data.state_std,  # noqa: E731
                                     args.rtg_scale, 1000, device)
    rounds = []

    def one_round():  # reference episode + all groups, as in dt_grpo.main's online loop
        ref = dg.reference_rollout(ref_env, agent(1), 100, args.g_online * args.rtg_scale, args.reference_sample)
        t0s = dg.branch_points(ref["var"], args.groups_per_round, args.branch_sampling, rng)
        groups = dg.rollout_groups(member_envs, agent(n_members), ref, t0s, 100, args)
        rounds.append((groups, ref))
        return len(ref["rewards"]) + groups["env_steps"]

    t_round, counted = timed(one_round, opts.steps, opts.warmup, sync)
    report(f"one round's rollouts: reference + {args.groups_per_round}×{args.group_size} members, L {args.sub_len}, "
           f"L_eval {args.cont_len}, K {args.eval_context_len}, {counted[0]} env steps (untrained model)", t_round,
           statistics.median(counted) / t_round, "env steps/s")
    groups, ref = rounds[-1]
    t_batch, batches = timed(lambda: dg.make_grpo_batch(model, groups, ref, args), opts.steps, opts.warmup, sync)
    report(f"make_grpo_batch (π_old over {n_members} members)", t_batch, 1 / t_batch, "batches/s")
    minibatch = args.grpo_minibatch or n_members
    idx = torch.as_tensor(rng.permutation(n_members)[:minibatch], device=device)
    t_update, _ = timed(lambda: dg.grpo_update(model, ref_model, online_optimizer, log_temperature,
                                               temperature_optimizer, batches[-1], idx, args),
                        opts.steps, opts.warmup, sync)
    per_round = args.grpo_epochs * math.ceil(n_members / minibatch)
    report(f"GRPO update, {minibatch} members × L {args.sub_len} windows ({per_round} per round: "
           f"{per_round * t_update:.2f} s)", t_update, 1 / t_update, "updates/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", choices=SHAPES, default="odt")
    parser.add_argument("--shape", choices=("small", "paper"), default="small")
    parser.add_argument("--steps", type=int, default=20, help="timed calls per figure (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each figure")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--cuda", action="store_true", help="run on CUDA when available")
    parser.add_argument("--policy-interval", type=int, default=2, help="odt_td3: critic steps per actor step")
    parser.add_argument("--critic-updates", type=int, default=1, help="reinformer_ag: IQL steps per update")
    parser.add_argument("--ag-steps", type=int, nargs="+", default=[0, 3, 10], help="reinformer_ag: evaluated n")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if opts.cuda and torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = SHAPES[opts.script][opts.shape]
    tag = (f"{opts.script}.py {opts.shape} [{' '.join(f'{k}={v}' for k, v in shape.items())}] {device} "
           f"{torch.get_num_threads()} threads")

    def report(what: str, seconds: float, rate: float, unit: str) -> None:
        print(f"{tag} | {what}: median {seconds * 1e3:.2f} ms → {rate:.2f} {unit}", flush=True)

    module = importlib.import_module(opts.script)
    globals()[f"bench_{opts.script}"](module, opts, shape, device, sync, report)


if __name__ == "__main__":
    main()
