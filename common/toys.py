"""The two single-state, single-step toy problems used to explain *why* RL gradients help a DT, as families.

- `toy-vitamin-v0` — ODT+TD3 ("RL gradients as vitamin", arXiv 2410.24108) §3.1: r(a) = (a+1)² for a < 0,
  1 − 2a for a ≥ 0 (peak r = 1 at a = 0). Offline data sits on the two feet of the reward, far from the peak.
- `toy-ag-v0` — Reinformer + Action Gradient §3.1, Figure 2: r(a) = 1 − a², offline data only has |a| ≥ 0.5.
  The paper gives no distribution beyond |a| > 0.5. We put the best data actions (|a| ≈ 0.5, r ≈ 0.75) on one
  side only: with two symmetric modes a Gaussian policy conditioned on the best return averages them onto
  a ≈ 0, the optimum, and the toy would show nothing (plain Reinformer measured 0.99 there).

Both: one constant observation [1.0], action a ∈ [−1, 1] (Box shape (1,)), the episode terminates after one
step. The envs are registered with Gymnasium (`gym.make("toy-vitamin-v0")`, TimeLimit of 1 step), so the
scripts treat them like any other env. Their offline datasets are built in memory by `common.datasets`.

Families. A claim shown on one instance may only hold because of where that instance put its optimum, so each
toy is a family with three parameters, written into the env id (`toy-vitamin-peak0.4-offset1-gap0.6-v0`; any
part may be left out, the paper's instance is `toy-vitamin-v0`):
- `peak` p ∈ [−0.5, 0.5]: where the optimum is. Vitamin: r(a) = c + ((a+1)/(p+1))² for a < p, c + 1 − 2(a−p)/(1−p)
  for a ≥ p (r(−1) = c, r(p) = c + 1, r(1) = c − 1). AG: r(a) = c + 1 − ((a−p)/(1+|p|))² (r(p) = c + 1, the far end
  of [−1, 1] has r = c).
- `offset` c: added to every reward (return scales and targets move; the normalised score does not).
- `gap` g ∈ [0.2, 0.8]: where the data lies. Vitamin: the right foot's data starts g of the way from the peak to
  +1 (paper: 0.5), the left foot keeps the paper's 5 % of [−1, p]. AG: the nearest data lies g above the peak
  (paper: 0.5), the other cluster on the far side, as in the paper's instance.
With the defaults (p = 0, c = 0, g = 0.5) both functions and both datasets are the papers' exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gymnasium as gym
import numpy as np


def vitamin_reward(a, peak: float = 0.0, offset: float = 0.0):
    """ODT+TD3 §3.1 at peak 0: (a+1)² left of 0, 1 − 2a right of 0; r(−1) = 0, r(0) = 1, r(1) = −1."""
    a = np.asarray(a, dtype=np.float64)
    return offset + np.where(a < peak, ((a + 1.0) / (peak + 1.0)) ** 2, 1.0 - 2.0 * (a - peak) / (1.0 - peak))


def ag_reward(a, peak: float = 0.0, offset: float = 0.0):
    """AG paper §3.1 at peak 0: 1 − a²; r(0) = 1, r(±1) = 0."""
    a = np.asarray(a, dtype=np.float64)
    return offset + 1.0 - ((a - peak) / (1.0 + abs(peak))) ** 2


@dataclass(frozen=True)
class ToySpec:
    """One instance of a toy family (module docstring)."""

    kind: str  # "vitamin" or "ag"
    peak: float = 0.0
    offset: float = 0.0
    gap: float = 0.5

    def reward(self, a):
        fn = vitamin_reward if self.kind == "vitamin" else ag_reward
        return fn(a, peak=self.peak, offset=self.offset)

    @property
    def ref_scores(self) -> tuple[float, float]:
        """(worst, best) reachable reward: the normalised score is 0 at the worst action and 100 at the peak."""
        return (self.offset - 1.0, self.offset + 1.0) if self.kind == "vitamin" else (self.offset, self.offset + 1.0)

    @property
    def family(self) -> str:
        return f"toy-{self.kind}"


_NUM = r"(-?\d+(?:\.\d+)?)"
_TOY_ID = re.compile(rf"^toy-(vitamin|ag)(?:-peak{_NUM})?(?:-offset{_NUM})?(?:-gap{_NUM})?-v0$")
PEAK_RANGE, GAP_RANGE = (-0.5, 0.5), (0.2, 0.8)


class ToyIdError(ValueError):
    """A toy id that names a family but parameters outside its range."""


def parse_toy(env_id: str) -> ToySpec | None:
    """The instance an env id names, None if it is no toy id; ToyIdError for parameters out of range."""
    m = _TOY_ID.match(env_id)
    if m is None:
        return None
    kind, peak, offset, gap = m.groups()
    spec = ToySpec(kind, float(peak or 0.0), float(offset or 0.0), float(gap or 0.5))
    if not (PEAK_RANGE[0] <= spec.peak <= PEAK_RANGE[1] and GAP_RANGE[0] <= spec.gap <= GAP_RANGE[1]) or (
            kind == "ag" and spec.peak + spec.gap > 0.9):  # AG: room for the near cluster above the peak
        raise ToyIdError(f"'{env_id}': a toy's peak must lie in [{PEAK_RANGE[0]}, {PEAK_RANGE[1]}] and its gap in "
                         f"[{GAP_RANGE[0]}, {GAP_RANGE[1]}], and for toy-ag peak + gap ≤ 0.9 (got peak {spec.peak}, "
                         f"gap {spec.gap}); e.g. toy-vitamin-peak0.4-v0 or toy-ag-peak-0.2-offset1-v0.")
    return spec


class OneStepToyEnv(gym.Env):
    """One state, one step, reward `spec.reward(a)`; terminates after the single step."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(self, kind: str = "vitamin", peak: float = 0.0, offset: float = 0.0, gap: float = 0.5,
                 render_mode: str | None = None):
        assert render_mode is None or render_mode in self.metadata["render_modes"], render_mode
        self.spec_ = ToySpec(kind, peak, offset, gap)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._last_action: float | None = None

    def reward_fn(self, a):
        return self.spec_.reward(a)

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
        lo, hi = self.spec_.ref_scores
        ys = np.clip(((1.0 - (self.reward_fn(xs) - lo) / (hi - lo)) * 63).round().astype(int), 0, 63)
        img[ys, np.arange(64)] = 128
        if self._last_action is not None:
            img[:, int(round((self._last_action + 1.0) / 2.0 * 63))] = (220, 30, 30)
        return img


# The papers' instances: env id → (env class, reference min, reference max), the worst/best reachable rewards.
TOYS: dict[str, tuple[type[OneStepToyEnv], float, float]] = {
    "toy-vitamin-v0": (OneStepToyEnv, -1.0, 1.0),
    "toy-ag-v0": (OneStepToyEnv, 0.0, 1.0),
}


def register_toy(env_id: str) -> ToySpec:
    """Register a toy instance with Gymnasium (once) and return its spec."""
    spec = parse_toy(env_id)
    if spec is None:
        raise KeyError(env_id)
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=OneStepToyEnv, max_episode_steps=1,
                     kwargs=dict(kind=spec.kind, peak=spec.peak, offset=spec.offset, gap=spec.gap))
    return spec


for _toy_id in TOYS:
    register_toy(_toy_id)


def toy_offline_actions(env_id: str, seed: int = 0) -> np.ndarray:
    """The 128 offline actions (128, 1) float32 of a toy instance, deterministic in `seed`.

    vitamin (paper): 100 uniform in [−1, −0.95] then 28 uniform in [0.5, 1] (ODT+TD3 §3.1); in general 100 in the
    left 5 % of [−1, p] and 28 from p + g(1 − p) to 1.
    ag (paper): 64 uniform in [0.5, 1] and 64 uniform in [−1, −0.8], so |a| ≥ 0.5 (AG §3.1) and the best data
    actions (a ≈ 0.5, r ≈ 0.75) lie on one side of the optimum (see the module docstring); in general 64 in
    [p + g, 1] and 64 in the far 10 % of [−1, p].
    """
    spec = parse_toy(env_id)
    if spec is None:
        raise KeyError(env_id)
    p, g = spec.peak, spec.gap
    rng = np.random.default_rng(seed)
    if spec.kind == "vitamin":
        a = np.concatenate([rng.uniform(-1.0, -1.0 + 0.05 * (1.0 + p), 100), rng.uniform(p + g * (1.0 - p), 1.0, 28)])
    else:
        a = np.concatenate([rng.uniform(min(p + g, 1.0), 1.0, 64), rng.uniform(-1.0, -1.0 + 0.2 * (1.0 + p), 64)])
    return a.astype(np.float32)[:, None]
