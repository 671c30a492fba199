"""The two single-state, single-step toy problems used to explain *why* RL gradients help a DT.

- `toy-vitamin-v0` — ODT+TD3 ("RL gradients as vitamin", arXiv 2410.24108) §3.1: r(a) = (a+1)² for a < 0,
  1 − 2a for a ≥ 0 (peak r = 1 at a = 0). Offline data sits on the two feet of the reward, far from the peak.
- `toy-ag-v0` — Reinformer + Action Gradient §3.1, Figure 2: r(a) = 1 − a², offline data only has |a| ≥ 0.5.
  The paper gives no distribution beyond |a| > 0.5. We put the best data actions (|a| ≈ 0.5, r ≈ 0.75) on one
  side only: with two symmetric modes a Gaussian policy conditioned on the best return averages them onto
  a ≈ 0, the optimum, and the toy would show nothing (plain Reinformer measured 0.99 there).

Both: one constant observation [1.0], action a ∈ [−1, 1] (Box shape (1,)), the episode terminates after one
step. The envs are registered with Gymnasium (`gym.make("toy-vitamin-v0")`, TimeLimit of 1 step), so the
scripts treat them like any other env. Their offline datasets are built in memory by `common.datasets`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


def vitamin_reward(a):
    """ODT+TD3 §3.1: (a+1)² left of 0, 1 − 2a right of 0; r(−1) = 0, r(0) = 1, r(1) = −1."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(a < 0, (a + 1.0) ** 2, 1.0 - 2.0 * a)


def ag_reward(a):
    """AG paper §3.1: 1 − a²; r(0) = 1, r(±1) = 0."""
    a = np.asarray(a, dtype=np.float64)
    return 1.0 - a**2


class OneStepToyEnv(gym.Env):
    """One state, one step, reward `reward_fn(a)`; terminates after the single step."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}
    reward_fn = staticmethod(vitamin_reward)

    def __init__(self, render_mode: str | None = None):
        assert render_mode is None or render_mode in self.metadata["render_modes"], render_mode
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._last_action: float | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._last_action = None
        return np.ones(1, dtype=np.float32), {}

    def step(self, action):
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        self._last_action = a
        return np.ones(1, dtype=np.float32), float(self.reward_fn(a)), True, False, {}

    def render(self):
        """A 64×64 strip: grey reward curve, red tick at the last action (enough for --capture-video)."""
        if self.render_mode != "rgb_array":
            return None
        img = np.full((64, 64, 3), 255, dtype=np.uint8)
        xs = np.linspace(-1.0, 1.0, 64)
        ys = np.clip(((1.0 - (self.reward_fn(xs) + 1.0) / 2.0) * 63).round().astype(int), 0, 63)
        img[ys, np.arange(64)] = 128
        if self._last_action is not None:
            img[:, int(round((self._last_action + 1.0) / 2.0 * 63))] = (220, 30, 30)
        return img


class VitaminToyEnv(OneStepToyEnv):
    reward_fn = staticmethod(vitamin_reward)


class AGToyEnv(OneStepToyEnv):
    reward_fn = staticmethod(ag_reward)


# env id → (env class, reference min, reference max). Min/max are the worst/best reachable rewards.
TOYS: dict[str, tuple[type[OneStepToyEnv], float, float]] = {
    "toy-vitamin-v0": (VitaminToyEnv, -1.0, 1.0),
    "toy-ag-v0": (AGToyEnv, 0.0, 1.0),
}

for _toy_id, (_cls, _, _) in TOYS.items():
    if _toy_id not in gym.registry:
        gym.register(id=_toy_id, entry_point=_cls, max_episode_steps=1)


def toy_offline_actions(env_id: str, seed: int = 0) -> np.ndarray:
    """The 128 offline actions (128, 1) float32 of a toy, deterministic in `seed`.

    vitamin: 100 uniform in [−1, −0.95] then 28 uniform in [0.5, 1] (ODT+TD3 §3.1).
    ag: 64 uniform in [0.5, 1] and 64 uniform in [−1, −0.8], so |a| ≥ 0.5 (AG §3.1) and the best data
    actions (a ≈ 0.5, r ≈ 0.75) lie on one side of the optimum (see the module docstring).
    """
    rng = np.random.default_rng(seed)
    if env_id == "toy-vitamin-v0":
        a = np.concatenate([rng.uniform(-1.0, -0.95, 100), rng.uniform(0.5, 1.0, 28)])
    elif env_id == "toy-ag-v0":
        a = np.concatenate([rng.uniform(0.5, 1.0, 64), rng.uniform(-1.0, -0.8, 64)])
    else:
        raise KeyError(env_id)
    return a.astype(np.float32)[:, None]
