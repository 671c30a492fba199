"""Vectorised rollouts and evaluation shared by the four scripts.

Only environment bookkeeping lives here: stepping N environments in lockstep with fixed seeds,
recording what happened, and turning returns into D4RL-normalised scores. Everything a Decision
Transformer needs to act (its context window, the return-to-go it is conditioned on) stays inside
each script, behind the small `Policy` protocol below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import gymnasium as gym
import numpy as np

from common.datasets import Episode


class Policy(Protocol):
    """What `rollout` needs from a script's agent. All arrays are batched over the N envs."""

    def reset(self, obs: np.ndarray) -> None:
        """N new episodes start with first observations `obs` (N, S)."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Return actions (N, A) for the current observations (N, S)."""

    def observe(self, rewards: np.ndarray) -> None:
        """Rewards (N,) received for the actions just returned by `act`."""


@dataclass
class RolloutResult:
    returns: np.ndarray  # (N,) undiscounted episode returns
    lengths: np.ndarray  # (N,) episode lengths
    episodes: list[Episode] | None  # recorded transitions when record=True

    @property
    def steps(self) -> int:
        return int(self.lengths.sum())


def make_vector_env(make_env: Callable[[], gym.Env], num_envs: int) -> gym.vector.SyncVectorEnv:
    """Synchronous vector env. Each slot plays exactly one episode per `rollout`, so the subprocess
    overhead of AsyncVectorEnv would not pay off for MuJoCo-sized per-step costs on a few cores."""
    return gym.vector.SyncVectorEnv([make_env for _ in range(num_envs)])


def rollout(
    envs: gym.vector.VectorEnv,
    policy: Policy,
    seeds: Sequence[int],
    max_steps: int | None = None,
    record: bool = False,
) -> RolloutResult:
    """Play one episode in each of the `envs.num_envs` slots, reset with `seeds`, in lockstep.

    Slots whose episode ended keep being stepped (their outputs are ignored) so the batch stays
    rectangular for the policy; the loop stops when every slot has finished once.
    """
    n = envs.num_envs
    assert len(seeds) == n, f"need one seed per env ({n}), got {len(seeds)}"
    obs, _ = envs.reset(seed=[int(s) for s in seeds])
    obs = obs.astype(np.float32)
    policy.reset(obs)
    done = np.zeros(n, dtype=bool)
    returns = np.zeros(n, dtype=np.float64)
    lengths = np.zeros(n, dtype=np.int64)
    buf: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "term", "trunc", "next")}
    t = 0
    while not done.all() and (max_steps is None or t < max_steps):
        actions = np.asarray(policy.act(obs), dtype=np.float32)
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        next_obs = next_obs.astype(np.float32)
        rewards = np.asarray(rewards, dtype=np.float32)
        policy.observe(rewards)
        active = ~done
        returns[active] += rewards[active]
        lengths[active] += 1
        if record:
            for key, value in zip(
                buf, (obs, actions, rewards, terminated, truncated, next_obs), strict=True
            ):
                buf[key].append(value)
        t += 1
        if max_steps is not None and t >= max_steps:
            truncated = np.ones(n, dtype=bool)
        done |= terminated | truncated
        obs = next_obs
    episodes = None
    if record:
        stacked = {k: np.stack(v, axis=1) for k, v in buf.items()}  # (N, T, ...)
        episodes = []
        for i in range(n):
            length = int(lengths[i])
            term = stacked["term"][i, :length].astype(bool)
            trunc = stacked["trunc"][i, :length].astype(bool) & ~term  # a terminal step is never "cut"
            if length and not term[-1]:
                trunc[-1] = True  # cut by a time limit (env's or max_steps): bootstrap through it
            episodes.append(
                Episode(
                    observations=stacked["obs"][i, :length],
                    actions=stacked["act"][i, :length],
                    rewards=stacked["rew"][i, :length],
                    terminals=term,
                    truncations=trunc,
                    next_observations=stacked["next"][i, :length],
                )
            )
    return RolloutResult(returns=returns, lengths=lengths, episodes=episodes)


def evaluate(
    envs: gym.vector.VectorEnv,
    policy: Policy,
    seeds: Sequence[int],
    normalize: Callable[[np.ndarray], np.ndarray],
) -> dict[str, float]:
    """Evaluate over `len(seeds)` episodes (one per env slot) and summarise.

    `normalize` maps raw returns to D4RL-normalised scores (100 = expert, 0 = random); it may
    return NaN when the dataset has no reference scores.
    """
    result = rollout(envs, policy, seeds)
    scores = np.asarray(normalize(result.returns), dtype=np.float64)
    return {
        "eval/return_mean": float(result.returns.mean()),
        "eval/return_std": float(result.returns.std()),
        "eval/normalized_score_mean": float(scores.mean()),
        "eval/normalized_score_std": float(scores.std()),
        "eval/length_mean": float(result.lengths.mean()),
    }
