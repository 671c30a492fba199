"""Speed benchmark of odt.py's training step and batch sampler on synthetic data.

    python -m common.bench --shape small          # embed 128, 3 layers, 1 head, B 64, K 20
    python -m common.bench --shape paper --steps 3  # embed 512, 4 layers, 4 heads, B 256, K 20

Synthetic replay: 1000 trajectories × 1000 steps of Hopper-sized data (S=11, A=3), the shape of
../shared/specs/performance.md. Reports the median time of one gradient update (sampling included), of
sampling alone, and the sampling share. Times are medians over `--steps` after `--warmup` untimed steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

SHAPES = {
    "small": dict(embed_dim=128, n_layers=3, n_heads=1, batch_size=64, context_len=20),
    "paper": dict(embed_dim=512, n_layers=4, n_heads=4, batch_size=256, context_len=20),
}


def synthetic_replay(module, n_traj: int, length: int, obs_dim: int, act_dim: int, device: torch.device):
    from common.datasets import Episode

    rng = np.random.default_rng(0)
    replay = module.TrajectoryReplay(n_traj, np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32), 1e-3,
                                     1000, device)
    for _ in range(n_traj):
        replay.add(Episode(observations=rng.standard_normal((length, obs_dim), dtype=np.float32),
                           actions=rng.uniform(-1, 1, (length, act_dim)).astype(np.float32),
                           rewards=rng.standard_normal(length, dtype=np.float32),
                           terminals=np.zeros(length, bool), truncations=np.eye(length, dtype=bool)[-1],
                           next_observations=rng.standard_normal((length, obs_dim), dtype=np.float32)))
    return replay


def median_time(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cuda", action="store_true")
    opts = parser.parse_args()
    import odt

    device = torch.device("cuda" if opts.cuda and torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = SHAPES[opts.shape]
    args = odt.Args(**{k: v for k, v in shape.items()}, learning_rate=1e-4, weight_decay=5e-4, target_entropy=-3.0)
    replay = synthetic_replay(odt, 1000, 1000, 11, 3, device)
    rng = np.random.default_rng(0)
    replay.sample(shape["batch_size"], shape["context_len"], rng)  # builds the flat tensors once
    model = odt.DecisionTransformer(11, 3, args.embed_dim, args.n_layers, args.n_heads, 0.1, 1000, False).to(device)
    optimizer = odt.Lamb(model.parameters(), lr=1e-4, weight_decay=5e-4)
    scheduler = odt.warmup_schedule(optimizer, 10_000)
    log_temperature = torch.tensor(math.log(0.1), device=device, requires_grad=True)
    temperature_optimizer = torch.optim.Adam([log_temperature], lr=1e-4)

    def step():
        batch = replay.sample(shape["batch_size"], shape["context_len"], rng)
        odt.update(model, optimizer, scheduler, log_temperature, temperature_optimizer, batch, args)

    t_sample = median_time(lambda: replay.sample(shape["batch_size"], shape["context_len"], rng),
                           max(opts.steps, 50), 5, sync)
    t_update = median_time(step, opts.steps, opts.warmup, sync)
    print(f"odt.py {opts.shape} shape {shape} on {device} ({torch.get_num_threads()} threads)")
    print(f"  update step (sampling included): {t_update * 1e3:.1f} ms  →  {1 / t_update:.2f} updates/s")
    print(f"  sampling one batch:              {t_sample * 1e3:.2f} ms  ({100 * t_sample / t_update:.1f}% of the step)")


if __name__ == "__main__":
    main()
