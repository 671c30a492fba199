"""Speed benchmark of odt_td3.py's update (critic + delayed actor) on synthetic data.

    python -m common.bench_td3 --shape small            # embed 128, 3 layers, 1 head, B 64, K 20
    python -m common.bench_td3 --shape paper --steps 3  # embed 512, 4 layers, 4 heads, B 256, K 20

Same synthetic replay as `common.bench` (1000 trajectories × 1000 Hopper-sized steps). Reports medians of:
one update (= `policy_interval` critic updates on fresh batches + one actor update + Polyak, sampling
included), its parts (target-action forward, critic step, actor step), and the target-action share.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from common.bench import SHAPES, median_time, synthetic_replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--policy-interval", type=int, default=2)
    parser.add_argument("--cuda", action="store_true")
    opts = parser.parse_args()
    import odt_td3

    device = torch.device("cuda" if opts.cuda and torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = SHAPES[opts.shape]
    args = odt_td3.Args(**shape, learning_rate=1e-4, weight_decay=5e-4, gamma=0.99,
                        policy_interval=opts.policy_interval)
    replay = synthetic_replay(odt_td3, 1000, 1000, 11, 3, device)
    rng = np.random.default_rng(0)
    sample = lambda: replay.sample(shape["batch_size"], shape["context_len"], rng)  # noqa: E731
    sample()  # builds the flat tensors once
    model = odt_td3.DecisionTransformer(11, 3, args.embed_dim, args.n_layers, args.n_heads, 0.1, 1000, False).to(device)
    model_target = copy.deepcopy(model).requires_grad_(False).eval()
    critic = odt_td3.Critic(11, 3, 256, False).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    optimizer = odt_td3.Lamb(model.parameters(), lr=1e-4, weight_decay=5e-4)
    scheduler = odt_td3.warmup_schedule(optimizer, 10_000)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-3)

    def full_update():
        batches = [sample() for _ in range(args.policy_interval)]
        odt_td3.update(model, model_target, critic, critic_target, optimizer, scheduler, critic_optimizer, batches,
                       0.1, args)

    batch = sample()

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

    t_target = median_time(lambda: odt_td3.critic_targets(critic_target, model_target, batch, args), opts.steps,
                           opts.warmup, sync)
    t_critic = median_time(critic_step, opts.steps, opts.warmup, sync)
    t_actor = median_time(actor_step, opts.steps, opts.warmup, sync)
    t_update = median_time(full_update, opts.steps, opts.warmup, sync)
    k = args.policy_interval
    print(f"odt_td3.py {opts.shape} shape {shape}, policy interval {k}, on {device} "
          f"({torch.get_num_threads()} threads)")
    print(f"  one update ({k} critic + 1 actor, sampling included): {t_update * 1e3:.1f} ms  →  "
          f"{1 / t_update:.2f} actor updates/s, {k / t_update:.2f} batches/s ({t_update / k * 1e3:.1f} ms per batch)")
    print(f"  target actions + y (no_grad, one batch):  {t_target * 1e3:.1f} ms  "
          f"({100 * t_target / t_actor:.0f}% of an actor step, {100 * k * t_target / t_update:.0f}% of the update)")
    print(f"  critic step incl. targets (one batch):    {t_critic * 1e3:.1f} ms")
    print(f"  actor step (fwd + bwd + LAMB):            {t_actor * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
