"""Offline datasets: resolve a name, find, fetch or make the data, check it, load it as episodes.

`load_dataset(env_id)` accepts a D4RL-style name (`hopper-random-v2`, `antmaze-umaze-v2`, `pen-human-v1`,
`maze2d-umaze-v1`, ...), a Minari id (`mujoco/hopper/medium-v0`, `D4RL/door/human-v2`, ...) or a toy
(`toy-vitamin-v0`, `toy-ag-v0`, built in memory, see `common/toys.py`), and looks for the data in this order:

1. `dataset_path` (`--dataset-path`): a D4RL `.hdf5` file, or a Minari dataset folder (the folder holding
   `data/main_data.hdf5`, or that `data/` folder itself). Any problem with it is an error (no fall-through).
2. On disk, without any network access, in this order: the name's Minari dataset in the local Minari cache
   (`$MINARI_DATASETS_PATH`, default `~/.minari/datasets`); D4RL's own file in `$D4RL_DATASET_DIR`, default
   `~/.d4rl/datasets` (D4RL's file name, e.g. `hopper_medium_replay-v2.hdf5`, read with h5py alone); for
   `*-random-v2` the dataset this module generated earlier (`generated/<env>/random-v2` in the Minari cache, or
   `generated/<env>/random-<steps>-v2` for a size other than 1M, so sizes never collide).
3. A D4RL download, for the locomotion names `{hopper,halfcheetah,walker2d}-{random,medium,medium-replay,
   medium-expert,expert}-v2`: D4RL's own `.hdf5` from the URL d4rl used (`D4RL_BASE_URL`, overridden by
   `$D4RL_DATASET_URL`; `D4RL_DATASET_URL=off` disables it) into step 2's D4RL folder, as d4rl did. A progress
   bar; the bytes go to `<file>.part` (locked while written, resumed with an HTTP Range request after a broken
   connection, a Ctrl-C or a kill); the size is checked against the server's Content-Length and the file
   against D4RL's keys before it is renamed into place, and a bad file is removed. Offline it costs nothing:
   a failed name lookup is immediate, a connection gets `D4RL_CONNECT_TIMEOUT` (10 s), and the resolution
   goes on. Not for `ant-*` (D4RL's 111-dim Ant files cannot run on Ant-v5) nor for a `*-random-v2` asked with
   a non-default `generate_steps` (that asks for a generated dataset of that size). `download=False`
   (`--no-download`) turns off this step and the next.
   Why before generation: D4RL's file is the data the papers used, a generated random dataset is only a
   stand-in; so with internet `hopper-random-v2` is D4RL's file. What is already on disk (step 2) is still used
   first, so a machine that generated its data keeps training on the same data, and offline nothing changes.
4. A Minari download (`download=True`), for the names Minari holds (AntMaze, Adroit, Maze2d ports and Minari
   ids), skipped at once when it cannot work: no `huggingface_hub`, `HF_HUB_OFFLINE` set, or the remote host
   unreachable within 2 s. Every exception is caught.
5. Local generation for every locomotion `*-random-v2`: D4RL's protocol (uniform random actions, 1000-step
   TimeLimit, `generate_steps` env steps, 1M by default) on the Gymnasium v5 env, written to the Minari cache
   as a standard Minari dataset (with both reference scores), so it happens once. The cache folder is checked
   for writability before anything is generated.
6. Otherwise a `DatasetError` that names the dataset, says why each of 1-5 failed and how to provide it.

Checks at load, for every source, before any training (each failure is a `DatasetError` naming the field, the
number of bad steps and the first one): observations, next observations, actions and rewards must be finite;
observation and action sizes must match the env; actions must lie in the env's action space up to an absolute
tolerance of `ACTION_TOLERANCE` (1e-3; D4RL's data sits exactly at +-1, which is inside). Values within the
tolerance are clipped to the bounds. `$ONLINE_DT_ACTION_TOLERANCE` raises the tolerance for data known to be
slightly out of bounds (it is then clipped too).

Nothing half-written survives: generation writes into `.staging-<pid>-<host>-<id>` in the Minari cache and
renames it into place; every load removes staging folders (and temporary files) of this host whose process is
gone, so a `kill -9` leaves nothing behind after the next start. Ctrl-C during a load, a generation or a download
raises `DatasetInterrupted` (a `DatasetError`) after cleaning up; only a download's `.part` file is kept, on
purpose, so that the next attempt resumes it. A load that fails its checks removes what it created (a dataset
it generated, a file it downloaded) and writes no derived cache.

Choices worth knowing:
- Envs are Gymnasium `*-v5` (`Hopper-v5`, ...). D4RL's Ant files are 111-dim (old Ant with contact forces),
  Ant-v5 is 105-dim: such a file is refused with an explanation. D4RL AntMaze and Maze2d files are refused
  too: their observations (ant/point position, goal not observed) mean something else than the
  gymnasium-robotics observations used here; the Minari ports `D4RL/antmaze/*`, `D4RL/pointmaze/*` are the
  supported sources.
- Minari datasets with dict observations (AntMaze, PointMaze) are flattened to
  `concat(observation, desired_goal)`; `make_env` applies the same flattening to the env.
- Generation: N envs (at most 8, fewer when the budget holds fewer 1000-step episodes) step in lockstep
  with one batched draw of actions; an episode still running when the step budget is spent is kept and
  marked truncated, so the dataset has exactly `generate_steps` steps. The generation seed only matters when
  the dataset is first made (like D4RL's fixed files).
- D4RL files without `next_observations`: the next observation is `observations[i+1]` inside an episode;
  the last step of an episode repeats its own observation (no successor is recorded; a terminal's next
  observation is never bootstrapped from). Files without `timeouts` (D4RL v0) are split every
  `max_episode_steps` (1000) steps as D4RL's `sequence_dataset` did. The trailing remainder that ends with
  neither flag is an incomplete episode and is dropped.
- D4RL medium/expert names are never silently replaced by Minari's regenerated `mujoco/<env>/*-v0` data; the
  error message suggests them, and they can be used explicitly by their Minari id (normalised with the D4RL
  reference scores of their family, which `source` says).
- Reading Minari's HDF5 costs ~0.1 ms per array (~25 s for the ~45k short episodes of a 1M-step random
  dataset, even with h5py's low-level API used here; more through `MinariDataset`). So the first successful
  load writes a float32 copy of the episodes, `data/.online_dt_episodes.npz`, next to `main_data.hdf5`
  (derived, keyed by that file's size and mtime, safe to delete); later loads take about a second.

CLI: `python -m common.datasets hopper-random-v2 [--steps N]` pre-builds (or fetches) and inspects a dataset;
`python -m common.datasets --download-all [--kinds random medium ...] [--families hopper ...]` fetches the D4RL
locomotion files the papers use (`PAPER_D4RL`) and prints what it fetched, skipped or could not get.
"""

from __future__ import annotations

import argparse
import difflib
import http.client
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
from gymnasium.envs.registration import EnvSpec
from tqdm import tqdm

from common.toys import TOYS, ToyIdError, parse_toy, register_toy, toy_offline_actions


class DatasetError(Exception):
    """Raised with a complete, user-facing paragraph as its message (what failed, what was tried, how to fix)."""


class DatasetInterrupted(DatasetError):
    """Ctrl-C (KeyboardInterrupt) during a load, generation or download, after cleaning up; the message says
    what was kept. Catching `DatasetError` catches it too; exit code 130 is the shell's convention for it."""


class _CtrlC:
    """A Ctrl-C that cannot be lost inside a `with` block. Python runs the SIGINT handler wherever the main thread
    is; when that is a weakref callback or a `__del__` (h5py and the garbage collector run them all through a
    write), the KeyboardInterrupt it raises is printed as "Exception ignored" and dropped, and the work goes on to
    the end: about 1 in 10 Ctrl-Cs during a generation's write was lost that way. Here the handler records the press,
    and `check()` raises KeyboardInterrupt from our own code at safe points. `defer=False` also raises at once (a
    blocking network read must be woken; `check()` catches a press that was dropped). Outside the main thread, or
    with no handler of Python's own installed, the block changes nothing."""

    def __init__(self, *, defer: bool):
        self.defer, self.pressed, self.previous = defer, False, None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a caller's own handler wins
                self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.pressed = True
        if not self.defer:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if exc_type is None:
            self.check()  # pressed after the last check


class D4RLDownloadError(DatasetError):
    """A D4RL download that could not be done; `offline` when the server could not be reached at all."""

    def __init__(self, message: str, offline: bool = False):
        super().__init__(message)
        self.offline = offline


@dataclass
class Episode:
    observations: np.ndarray  # (T, S) float32
    actions: np.ndarray  # (T, A) float32
    rewards: np.ndarray  # (T,) float32
    terminals: np.ndarray  # (T,) bool, true termination (fell over, reached the goal)
    truncations: np.ndarray  # (T,) bool, time limit / step budget; only the last step can be True
    next_observations: np.ndarray  # (T, S) float32


# --- names, environments and reference scores ------------------------------------------------------------
LOCOMOTION_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
LOCOMOTION_KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert")
ANTMAZE_KINDS = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ADROIT_ENVS = {"pen": "AdroitHandPen-v1", "hammer": "AdroitHandHammer-v1", "door": "AdroitHandDoor-v1",
               "relocate": "AdroitHandRelocate-v1"}  # gymnasium-robotics
ADROIT_KINDS = ("human", "cloned", "expert")
MAZE2D_KINDS = ("umaze", "medium", "large", "umaze-dense", "medium-dense", "large-dense", "open", "open-dense")
ROBOTICS_FAMILIES = ("antmaze", "maze2d", *ADROIT_ENVS)

# D4RL infos.py (normalised score = 100 * (R - min) / (max - min)); keys "<family>-<kind>" win over "<family>".
REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "pen": (96.262799, 3076.8331017826877),
    "hammer": (-274.856578, 12794.134825156867),
    "door": (-56.512833, 2880.5693087298737),
    "relocate": (-6.425911, 4233.877797728884),
    "maze2d-umaze": (23.85, 161.86),
    "maze2d-medium": (13.13, 277.39),
    "maze2d-large": (6.7, 273.99),
    "maze2d-umaze-dense": (68.537689, 193.66285642381482),
    "maze2d-medium-dense": (44.264742, 297.4552547777125),
    "maze2d-large-dense": (30.569041, 303.4857382709002),
    "maze2d-open": (0.01, 20.66),
    "maze2d-open-dense": (11.17817, 27.166538620695782),
    **{toy.removesuffix("-v0"): (lo, hi) for toy, (_, lo, hi) in TOYS.items()},
}
DEFAULT_GENERATE_STEPS = 1_000_000
MAX_GENERATION_ENVS = 8

# Actions may lie outside the env's Box by at most this much (absolute, per value) and are then clipped; beyond it
# the dataset is refused. D4RL's data sits exactly at +-1. $ONLINE_DT_ACTION_TOLERANCE overrides it.
ACTION_TOLERANCE = 1e-3

# D4RL's own locomotion v2 files, where d4rl downloaded them from (file name: hopper_medium_replay-v2.hdf5).
D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
D4RL_CONNECT_TIMEOUT = 10.0  # seconds; also the longest silence tolerated while reading (then resume)
D4RL_REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")  # every v2 locomotion file
D4RL_DOWNLOAD_ATTEMPTS = 5  # consecutive broken connections without progress before giving up (resumable)
# The D4RL locomotion datasets of the papers (ODT, ODT+TD3, Reinformer+AG tables). The papers' ant-* runs used
# D4RL's 111-dim Ant, which Ant-v5 cannot run, so ant is left out (ant-random-v2 is generated locally).
PAPER_D4RL = tuple(f"{env}-{kind}-v2" for env in ("hopper", "halfcheetah", "walker2d")
                   for kind in ("random", "medium", "medium-replay", "medium-expert"))


@dataclass(frozen=True)
class _Name:
    env_id: str
    family: str
    kind: str
    minari_id: str | None  # the Minari dataset holding exactly this data (local cache or remote)
    d4rl: bool  # a D4RL-style name: D4RL files may hold it
    gym_id: str | None  # env when no Minari metadata defines it


def _d4rl_names() -> tuple[dict[str, _Name], list[str]]:
    """All accepted D4RL-style names (aliases for other versions included) and the canonical ones."""
    names: dict[str, _Name] = {}
    canonical: list[str] = []

    def add(family, kind, versions, minari_id, gym_id):
        for i, v in enumerate(versions):
            env_id = f"{family}-{kind}-v{v}"
            names[env_id] = _Name(env_id, family, kind, minari_id, True, gym_id)
            if i == 0:
                canonical.append(env_id)

    for family, gym_id in LOCOMOTION_ENVS.items():
        for kind in LOCOMOTION_KINDS:
            add(family, kind, (2, 1, 0), None, gym_id)
    for kind in ANTMAZE_KINDS:
        add("antmaze", kind, (2, 1, 0), f"D4RL/antmaze/{kind}-v1", None)
    for task, gym_id in ADROIT_ENVS.items():
        for kind in ADROIT_KINDS:
            add(task, kind, (1, 0), f"D4RL/{task}/{kind}-v2", gym_id)
    for kind in MAZE2D_KINDS:
        add("maze2d", kind, (0,) if kind.startswith("open") else (1, 0), f"D4RL/pointmaze/{kind}-v2", None)
    return names, canonical


_D4RL_NAMES, _CANONICAL = _d4rl_names()
_MINARI_ID = re.compile(r"^(?:[\w.-]+/)+[\w.-]+-v\d+$")
_MINARI_FAMILIES = {**{f: f for f in (*LOCOMOTION_ENVS, "antmaze", *ADROIT_ENVS)}, "pointmaze": "maze2d",
                    "maze2d": "maze2d"}


def known_env_ids() -> list[str]:
    """Every accepted D4RL-style and toy name (older D4RL versions such as `-v0` are accepted as aliases)."""
    return [*_CANONICAL, *TOYS]


def _parse(env_id: str) -> _Name:
    try:
        toy = parse_toy(env_id)  # the papers' toys and every instance of their families (common/toys.py)
    except ToyIdError as err:
        raise DatasetError(str(err)) from None
    if toy is not None:
        register_toy(env_id)
        return _Name(env_id, toy.family, "toy", None, False, env_id)
    if env_id in _D4RL_NAMES:
        return _D4RL_NAMES[env_id]
    if _MINARI_ID.match(env_id):
        *namespaces, last = env_id.split("/")
        family = next((_MINARI_FAMILIES[p.lower()] for p in reversed(namespaces) if p.lower() in _MINARI_FAMILIES),
                      "other")
        kind = re.sub(r"-v\d+$", "", last)
        gym_id = LOCOMOTION_ENVS.get(family) or ADROIT_ENVS.get(family)
        return _Name(env_id, family, kind, env_id, False, gym_id)
    close = difflib.get_close_matches(env_id, known_env_ids(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise DatasetError(
        f"Unknown dataset '{env_id}'.{hint} Accepted are D4RL-style names (e.g. hopper-random-v2, "
        f"halfcheetah-medium-replay-v2, antmaze-umaze-v2, pen-human-v1, maze2d-umaze-v1), the toys "
        f"{', '.join(TOYS)} and their families' instances (e.g. toy-vitamin-peak0.4-v0), and Minari dataset "
        f"ids of the form namespace/name-vN (e.g. mujoco/hopper/medium-v0). "
        f"`python -m common.datasets --list` prints every D4RL-style name."
    )


def _table_ref(family: str, kind: str) -> tuple[float | None, float | None]:
    ref = REF_SCORES.get(f"{family}-{kind}") or REF_SCORES.get(family)
    return ref if ref else (None, None)


def _minari_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets").expanduser()


def _d4rl_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets").expanduser()


def _d4rl_file_names(name: _Name) -> list[str]:
    """Accepted file names in the D4RL folder, D4RL's own first (`hopper_medium_replay-v2.hdf5`)."""
    files = [name.env_id.replace("-", "_", 1) + ".hdf5", name.env_id + ".hdf5"]
    if name.family in LOCOMOTION_ENVS:  # d4rl: f"{env}_{kind.replace('-', '_')}-v{N}.hdf5"
        version = name.env_id.rsplit("-", 1)[1]
        files.insert(0, f"{name.family}_{name.kind.replace('-', '_')}-{version}.hdf5")
        files = list(dict.fromkeys(files))
    if name.family == "maze2d" and "dense" not in name.kind:  # D4RL's sparse maze2d files say so
        files.append(re.sub(r"-v(\d+)$", r"-sparse-v\1", name.env_id) + ".hdf5")
    return files


def _generated_id(name: _Name, steps: int) -> str | None:
    if not (name.d4rl and name.family in LOCOMOTION_ENVS and name.kind == "random" and name.env_id.endswith("-v2")):
        return None
    size = "" if steps == DEFAULT_GENERATE_STEPS else f"-{steps}"
    return f"generated/{name.family}/random{size}-v2"


# --- environments ----------------------------------------------------------------------------------------
class GoalObservation(gym.ObservationWrapper):
    """Flattens a goal-conditioned dict observation to concat(observation, desired_goal), as the data is."""

    def __init__(self, env: gym.Env, keys: tuple[str, ...]):
        super().__init__(env)
        self.keys = keys
        spaces = [env.observation_space[k] for k in keys]
        self.observation_space = gym.spaces.Box(
            np.concatenate([np.broadcast_to(s.low, s.shape).ravel() for s in spaces]).astype(np.float32),
            np.concatenate([np.broadcast_to(s.high, s.shape).ravel() for s in spaces]).astype(np.float32),
            dtype=np.float32)

    def observation(self, observation):
        return np.concatenate([np.asarray(observation[k], dtype=np.float32).ravel() for k in self.keys])


def _goal_keys(keys) -> tuple[str, ...]:
    keys = list(keys)
    if "observation" not in keys:
        raise DatasetError(f"Dict observations with keys {keys} are not supported: only goal-conditioned ones "
                           "(observation / desired_goal, as in AntMaze and PointMaze) are flattened.")
    return ("observation", "desired_goal") if "desired_goal" in keys else ("observation",)


def _needs_robotics(spec_or_family) -> bool:
    if isinstance(spec_or_family, EnvSpec):
        ep = spec_or_family.entry_point
        return isinstance(ep, str) and ep.startswith("gymnasium_robotics")
    return spec_or_family in ROBOTICS_FAMILIES


def _import_robotics(what: str) -> None:
    try:
        importlib.import_module("gymnasium_robotics")  # registers AntMaze / PointMaze / Adroit envs
    except ImportError as err:
        raise DatasetError(
            f"The environment of {what} comes from gymnasium-robotics, which is not installed ({err}). "
            f"Install it with `pip install gymnasium-robotics` (or `pip install -e \".[remote]\"` in this repo)."
        ) from err


def _make_env_from_spec(spec: EnvSpec, render_mode: str | None = None) -> gym.Env:
    if _needs_robotics(spec):
        _import_robotics(spec.id)
    env = gym.make(spec, **({} if render_mode is None else {"render_mode": render_mode}))
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = GoalObservation(env, _goal_keys(env.observation_space.spaces))
    return env


def _spec_from_json(text: str) -> EnvSpec:
    fields = json.loads(text)
    for stale in ("order_enforce", "apply_api_compatibility", "autoreset"):  # written by older gymnasium
        fields.pop(stale, None)
    return EnvSpec.from_json(json.dumps(fields))


def _spec_from_metadata(meta: dict) -> EnvSpec | None:
    text = meta.get("eval_env_spec") or meta.get("env_spec")
    if not text:
        return None
    try:
        return _spec_from_json(text)
    except Exception as err:  # noqa: BLE001 - any malformed spec: fall back to the name's env
        warnings.warn(f"Could not read the env spec stored with dataset {meta.get('dataset_id')}: {err}",
                      stacklevel=3)
        return None


def _static_spec(name: _Name) -> EnvSpec:
    if name.gym_id is None:
        where = (f"its Minari dataset {name.minari_id} stores no env spec"
                 if _minari_data_dir(_minari_root() / name.minari_id) else
                 f"it comes with its Minari dataset {name.minari_id}, which is not in {_minari_root()}")
        raise DatasetError(
            f"No environment is known for '{name.env_id}': {where}. Load the dataset first "
            f"(`python -m common.datasets {name.env_id}`; offline: `minari download {name.minari_id}` on a machine "
            f"with internet, then copy ~/.minari/datasets/{name.minari_id} to the same place here).")
    if _needs_robotics(name.family):
        _import_robotics(name.env_id)
    return gym.spec(name.gym_id)


def make_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    """The env of a dataset name without loading its data (same name mapping as `load_dataset`)."""
    name = _parse(env_id)
    spec = None
    if name.minari_id and (_minari_root() / name.minari_id / "data" / "metadata.json").exists():
        spec = _spec_from_metadata(json.loads((_minari_root() / name.minari_id / "data" / "metadata.json").read_text()))
    return _make_env_from_spec(spec or _static_spec(name), render_mode)


# --- the loaded dataset ----------------------------------------------------------------------------------
@dataclass
class OfflineData:
    env_id: str  # exactly what the user passed
    gym_id: str  # the Gymnasium env the data belongs to, e.g. "Hopper-v5"
    family: str  # hopper, halfcheetah, walker2d, ant, antmaze, pen, hammer, door, relocate, maze2d, toy-*, other
    dataset_kind: str  # random, medium, ..., human, cloned, umaze, ..., "toy"; "" if unknown
    episodes: list[Episode]
    state_mean: np.ndarray  # (S,) float32 over all offline observations
    state_std: np.ndarray  # (S,) float32, std + 1e-6
    ref_min_score: float | None
    ref_max_score: float | None
    source: str  # where the data came from, for logs and run configs
    env_spec: EnvSpec | None = field(default=None, repr=False)

    @property
    def obs_dim(self) -> int:
        return int(self.state_mean.shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.episodes[0].actions.shape[1])

    @property
    def num_steps(self) -> int:
        return sum(len(e.rewards) for e in self.episodes)

    def make_env(self, render_mode: str | None = None) -> gym.Env:
        """A fresh env matching the data, with its TimeLimit (and the dict-observation flattening if any)."""
        return _make_env_from_spec(self.env_spec or gym.spec(self.gym_id), render_mode)

    def normalized_score(self, returns) -> np.ndarray:
        """D4RL normalised score 100 * (R - min) / (max - min); NaN when the reference scores are unknown."""
        returns = np.asarray(returns, dtype=np.float64)
        if self.ref_min_score is None or self.ref_max_score is None:
            return np.full(returns.shape, np.nan)
        return 100.0 * (returns - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


@dataclass
class _Loaded:  # what a reader returns before the name's defaults are applied
    episodes: list[Episode]
    source: str
    env_spec: EnvSpec | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    created: list[Path] = field(default_factory=list)  # made by this load: removed if its checks fail
    on_success: list[Callable[[], None]] = field(default_factory=list)  # derived caches, written once it passed


# --- leftovers of dead processes, writability -----------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
_STAGING = re.compile(r"^\.staging-(\d+)-([A-Za-z0-9._]+)-")  # .staging-<pid>-<host>-<dataset id>
_LEGACY_STAGING = re.compile(r"^\.staging-.+-(\d+)$")  # .staging-<dataset id>-<pid> (before the host was added)


def _owner() -> str:
    """`<pid>-<host>`: names what this process writes, so that leftovers of dead processes can be recognised."""
    return f"{os.getpid()}-{_HOST}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would terminate it; never guess there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _stale(pid: int, host: str) -> bool:
    return host == _HOST and not _pid_alive(pid)  # another host's process (shared filesystem): not ours to judge


def _remove_stale_staging(root: Path) -> list[Path]:
    """Remove `.staging-*` folders in the Minari cache `root` left by dead processes of this host (kill -9)."""
    removed = []
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(".staging-")]
    except OSError:
        return removed
    for entry in entries:
        m = _STAGING.match(entry.name)
        pid, host = (int(m[1]), m[2]) if m else (None, _HOST)
        if m is None and (legacy := _LEGACY_STAGING.match(entry.name)):
            pid = int(legacy[1])
        if pid is not None and _stale(pid, host):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _unwritable(folder: Path, create: bool = True) -> str | None:
    """Why files cannot be written in `folder`, or None. With `create`, a missing folder is made; without, only
    its nearest existing ancestor is checked (nothing is made). A real file is written and removed: permission
    bits lie for root, read-only mounts and ACLs."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.exists():
            ancestor = next((a for a in folder.parents if a.exists()), None)
            if ancestor is None or not ancestor.is_dir():
                return f"{ancestor} is not a folder"
            return None if os.access(ancestor, os.W_OK | os.X_OK) else f"{ancestor} is not writable"
        if not folder.is_dir():
            return "it is not a folder"
        fd, probe = tempfile.mkstemp(prefix=f".write-test-{_owner()}-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- readers ---------------------------------------------------------------------------------------------
def _flat_obs(node) -> np.ndarray:
    """An (T+1, S) float32 array from a Minari observation node (array or goal-conditioned dict)."""
    if isinstance(node, dict):
        parts = [np.asarray(node[k], dtype=np.float32) for k in _goal_keys(node.keys())]
        return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
    obs = np.asarray(node, dtype=np.float32)
    return obs.reshape(len(obs), -1)


def _minari_data_dir(path: Path) -> Path | None:
    for candidate in (path, path / "data"):
        if (candidate / "metadata.json").is_file():
            return candidate
    return None


# Derived float32 copy of a Minari dataset's episodes (module docstring): keyed by main_data.hdf5's size and mtime.
FLAT_CACHE = ".online_dt_episodes.npz"
_FLAT_KEYS = ("observations", "actions", "rewards", "terminals", "truncations", "lengths")


def _h5_key(data_dir: Path) -> np.ndarray:
    st = (data_dir / "main_data.hdf5").stat()
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def _load_flat_cache(data_dir: Path) -> dict | None:
    try:
        with np.load(data_dir / FLAT_CACHE) as z:
            if not np.array_equal(z["key"], _h5_key(data_dir)):
                return None
            return {k: z[k] for k in _FLAT_KEYS}
    except Exception:  # noqa: BLE001 - absent, stale or unreadable: read the HDF5 file instead
        return None


_FLAT_TMP = re.compile(r"^" + re.escape(FLAT_CACHE) + r"\.(\d+)(?:-([A-Za-z0-9._]+))?\.tmp$")


def _save_flat_cache(data_dir: Path, flat: dict) -> None:
    for other in data_dir.glob(f"{FLAT_CACHE}.*.tmp"):  # left by a killed process
        m = _FLAT_TMP.match(other.name)
        if m and _stale(int(m[1]), m[2] or _HOST):
            other.unlink(missing_ok=True)
    tmp = data_dir / f"{FLAT_CACHE}.{_owner()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=_h5_key(data_dir), **flat)
        os.replace(tmp, data_dir / FLAT_CACHE)
    except OSError:  # read-only dataset folder: fine, just slower next time
        tmp.unlink(missing_ok=True)
    except BaseException:  # Ctrl-C while writing: no half file
        tmp.unlink(missing_ok=True)
        raise


def _h5_read(fid, path: str) -> np.ndarray:
    """Read one dataset with h5py's low-level API (about twice as fast as `group[name][()]`)."""
    dset = h5py.h5d.open(fid, path.encode())
    out = np.empty(dset.shape, dtype=dset.dtype)
    if out.size:
        dset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return out


def _iter_minari_episodes(data_dir: Path, meta: dict, total: int):
    """Yield (observations, actions, rewards, terminations, truncations) per episode, observations flattened."""
    if meta.get("data_format", "hdf5") == "hdf5":
        with h5py.File(data_dir / "main_data.hdf5", "r") as f:
            if total and f"episode_{total - 1}" not in f:
                raise DatasetError(f"{data_dir / 'main_data.hdf5'} has {len(f)} episodes, metadata.json says "
                                   f"{total}: the file is incomplete.")
            goal_keys = None  # dict observations: one dataset per key under observations/
            if total and isinstance(f["episode_0/observations"], h5py.Group):
                goal_keys = _goal_keys(f["episode_0/observations"].keys())
            fid = f.id
            for i in range(total):
                p = f"episode_{i}/"
                obs = (_h5_read(fid, p + "observations") if goal_keys is None
                       else {k: _h5_read(fid, f"{p}observations/{k}") for k in goal_keys})
                yield (_flat_obs(obs), _h5_read(fid, p + "actions"), _h5_read(fid, p + "rewards"),
                       _h5_read(fid, p + "terminations"), _h5_read(fid, p + "truncations"))
    else:  # e.g. arrow: Minari's own storage API (needs its optional dependencies)
        from minari.dataset.minari_storage import MinariStorage

        for d in MinariStorage.read(data_dir).get_episodes(range(total)):
            yield (_flat_obs(d["observations"]), d["actions"], d["rewards"], d["terminations"], d["truncations"])


def _read_minari_flat(data_dir: Path, meta: dict, progress: bool) -> dict:
    total = int(meta.get("total_episodes", 0))
    parts: dict[str, list] = {k: [] for k in _FLAT_KEYS}
    bar = tqdm(_iter_minari_episodes(data_dir, meta, total), total=total, unit="ep", leave=False,
               desc=f"reading {meta.get('dataset_id', data_dir.parent.name)}", disable=not progress or total < 2000,
               mininterval=1.0)
    for i, (obs, actions, rewards, terms, truncs) in enumerate(bar):
        rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
        t = len(rewards)
        if t == 0:
            continue
        if obs.shape[0] != t + 1:
            raise DatasetError(f"{data_dir} episode {i}: {obs.shape[0]} observations for {t} steps (Minari "
                               f"stores T+1); the dataset is malformed.")
        truncs = np.asarray(truncs, dtype=bool).reshape(-1).copy()
        terms = np.asarray(terms, dtype=bool).reshape(-1)
        truncs &= ~terms  # a terminal step is never "cut" (as in rollouts and the D4RL reader)
        if not (terms[-1] or truncs[-1]):
            truncs[-1] = True  # cut without a flag (the collection stopped): a truncation
        for key, value in zip(_FLAT_KEYS, (obs, np.asarray(actions, dtype=np.float32).reshape(t, -1), rewards,
                                           terms, truncs, t), strict=True):
            parts[key].append(value)
    if not parts["lengths"]:
        raise DatasetError(f"The Minari dataset in '{data_dir}' holds no episodes.")
    flat = {k: np.concatenate(v) for k, v in parts.items() if k != "lengths"}
    flat["lengths"] = np.asarray(parts["lengths"], dtype=np.int64)
    return flat


def _episodes_from_flat(flat: dict) -> list[Episode]:
    """Episodes as views into the concatenated arrays (observations hold T+1 rows per episode)."""
    episodes, s, o = [], 0, 0
    obs, actions, rewards, terms, truncs = (flat[k] for k in _FLAT_KEYS[:5])
    for t in flat["lengths"].tolist():
        episodes.append(Episode(obs[o:o + t], actions[s:s + t], rewards[s:s + t], terms[s:s + t], truncs[s:s + t],
                                obs[o + 1:o + t + 1]))
        s, o = s + t, o + t + 1
    return episodes


def _read_minari(path: Path, progress: bool) -> tuple[list[Episode], dict, Callable[[], None] | None]:
    """Episodes, metadata, and the writer of the derived float32 cache (None when it is current or not used),
    to be called only once the data has passed its checks."""
    data_dir = _minari_data_dir(path)
    if data_dir is None:
        raise DatasetError(f"'{path}' is not a Minari dataset folder: no data/metadata.json in it.")
    save = None
    try:
        meta = json.loads((data_dir / "metadata.json").read_text())
        flat = _load_flat_cache(data_dir) if meta.get("data_format", "hdf5") == "hdf5" else None
        if flat is None:
            flat = _read_minari_flat(data_dir, meta, progress)
            if meta.get("data_format", "hdf5") == "hdf5":
                save = lambda: _save_flat_cache(data_dir, flat)  # noqa: E731
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt / truncated / foreign files: explain, don't trace
        raise DatasetError(
            f"Could not read the Minari dataset in '{data_dir}' ({type(err).__name__}: {err}). The folder may be "
            f"incomplete (an interrupted download or generation) or written by an incompatible Minari version. "
            f"Delete '{data_dir.parent}' and load it again (a generated dataset is regenerated, a remote one "
            f"re-downloaded with `minari download ID`).") from err
    return _episodes_from_flat(flat), meta, save


def _read_d4rl(path: Path, max_episode_steps: int) -> list[Episode]:
    fix = "Re-download the file (an interrupted download leaves a truncated file) or pass another --dataset-path."
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
            if missing:
                raise DatasetError(f"'{path}' is an HDF5 file but not a D4RL dataset: it lacks {missing} "
                                   f"(found keys {sorted(f.keys())[:12]}). {fix}")
            obs = np.asarray(f["observations"][()], dtype=np.float32)
            actions = np.asarray(f["actions"][()], dtype=np.float32)
            rewards = np.asarray(f["rewards"][()], dtype=np.float32).reshape(-1)
            terminals = np.asarray(f["terminals"][()], dtype=bool).reshape(-1)
            timeouts = np.asarray(f["timeouts"][()], dtype=bool).reshape(-1) if "timeouts" in f else None
            next_obs = (np.asarray(f["next_observations"][()], dtype=np.float32)
                        if "next_observations" in f else None)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - OSError for non-HDF5/truncated files, KeyError/ValueError inside
        raise DatasetError(f"Could not read '{path}' as a D4RL HDF5 file ({type(err).__name__}: {err}). "
                           f"It is truncated, corrupt or not an HDF5 file. {fix}") from err
    n = len(obs)
    actions = actions.reshape(n, -1) if actions.ndim == 1 else actions
    lengths = {"observations": n, "actions": len(actions), "rewards": len(rewards), "terminals": len(terminals),
               **({"timeouts": len(timeouts)} if timeouts is not None else {}),
               **({"next_observations": len(next_obs)} if next_obs is not None else {})}
    if obs.ndim != 2 or len(set(lengths.values())) != 1:
        raise DatasetError(f"'{path}' has inconsistent array lengths {lengths} (observations shape {obs.shape}). "
                           f"{fix}")
    if timeouts is None:  # D4RL v0: cut every max_episode_steps since the last episode end (sequence_dataset)
        timeouts = np.zeros(n, dtype=bool)
        start = 0
        for end in [*np.flatnonzero(terminals).tolist(), n]:
            timeouts[np.arange(start + max_episode_steps - 1, end, max_episode_steps)] = True
            start = end + 1
    done = terminals | timeouts
    ends = np.flatnonzero(done)
    if len(ends) == 0:
        raise DatasetError(f"'{path}' holds no complete episode (no step has terminals or timeouts set). {fix}")
    used = int(ends[-1]) + 1  # the remainder after the last flag is an incomplete episode: dropped
    if next_obs is None:
        next_obs = np.empty_like(obs[:used])
        next_obs[:-1] = obs[1:used]
        next_obs[ends] = obs[ends]  # no successor recorded for an episode's last step: repeat it
    truncations = timeouts & ~terminals
    episodes = []
    for s, e in zip(np.concatenate([[0], ends[:-1] + 1]).tolist(), (ends + 1).tolist(), strict=True):
        episodes.append(Episode(obs[s:e], actions[s:e], rewards[s:e], terminals[s:e], truncations[s:e],
                                next_obs[s:e]))
    return episodes


def _load_minari_dir(path: Path, progress: bool, what: str) -> _Loaded:
    episodes, meta, save = _read_minari(path, progress)
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    if ref_min is None or ref_max is None:
        ref_min = ref_max = None
    return _Loaded(episodes, f"{what} ({meta.get('dataset_id', '?')}, {path})", _spec_from_metadata(meta),
                   ref_min, ref_max, on_success=[save] if save else [])


def _load_d4rl_file(name: _Name, path: Path, what: str) -> _Loaded:
    if name.family in ("antmaze", "maze2d"):
        old = ("29-dim observation (ant position and joints, goal not observed)" if name.family == "antmaze"
               else "4-dim observation (x, y, vx, vy; goal not observed)")
        raise DatasetError(
            f"'{path}' is a D4RL {name.family} file from the old mujoco-py env. Its {old} means something else "
            f"than the gymnasium-robotics observation used here (the goal is observed, the maze coordinates "
            f"differ), so it cannot be fed to that env. Use Minari's port instead: --env-id {name.env_id} without "
            f"--dataset-path loads {name.minari_id} (`minari download {name.minari_id}` on a machine with "
            f"internet; needs `pip install -e \".[remote]\"`).")
    spec = _static_spec(name)
    return _Loaded(_read_d4rl(path, spec.max_episode_steps or 1000), f"{what} ({path})", spec)


# --- generation ------------------------------------------------------------------------------------------
def _generate_random(name: _Name, cache_id: str, steps: int, seed: int, progress: bool) -> Path:
    """D4RL's random protocol on the v5 env, written as a Minari dataset under `cache_id`; returns its folder.
    The cache folder is checked for writability first (a 1M-step generation takes minutes); Ctrl-C or a write
    error leaves nothing in the cache."""
    root = _minari_root()
    why = _unwritable(root)
    if why is not None:
        where = ("MINARI_DATASETS_PATH" if os.environ.get("MINARI_DATASETS_PATH")
                 else "the default; set MINARI_DATASETS_PATH to choose another")
        raise DatasetError(
            f"Cannot generate '{name.env_id}': the Minari cache folder {root} ({where}) is not writable ({why}). "
            f"Nothing was generated. Point MINARI_DATASETS_PATH at a writable folder (e.g. `export "
            f"MINARI_DATASETS_PATH=$HOME/minari-datasets`), or pass --dataset-path to a dataset you already have.")
    try:
        return _collect_and_write(name, cache_id, steps, seed, progress, root)
    except KeyboardInterrupt:
        raise DatasetInterrupted(
            f"Interrupted (Ctrl-C) while generating '{name.env_id}': nothing was cached (the partly written "
            f"dataset was removed). Run again to generate it ({steps} steps).") from None
    except OSError as err:  # disk full, folder removed or made read-only meanwhile
        raise DatasetError(
            f"Writing the generated dataset '{name.env_id}' to {root} failed ({type(err).__name__}: {err}); "
            f"nothing was cached. Free some space (a 1M-step random dataset takes about 1 GB) or point "
            f"MINARI_DATASETS_PATH at another folder, then run again.") from err


def _collect_and_write(name: _Name, cache_id: str, steps: int, seed: int, progress: bool, root: Path) -> Path:
    import minari
    from minari.data_collector import EpisodeBuffer

    spec = gym.spec(name.gym_id)
    max_len = spec.max_episode_steps or 1000
    n_envs = max(1, min(MAX_GENERATION_ENVS, -(-steps // max_len)))  # whole episodes fit when steps is small
    envs = [gym.make(spec) for _ in range(n_envs)]
    low, high = envs[0].action_space.low, envs[0].action_space.high
    rng = np.random.default_rng(seed)

    def fresh(obs):
        return {"obs": [obs], "act": [], "rew": [], "term": [], "trunc": []}

    current = [fresh(env.reset(seed=seed + i)[0]) for i, env in enumerate(envs)]
    finished: list[dict] = []
    t0, total = time.time(), 0
    with tqdm(total=steps, desc=f"generating {name.env_id} ({n_envs} envs)", unit="step", disable=not progress,
              mininterval=1.0, unit_scale=True) as bar:
        while total < steps:
            k = min(n_envs, steps - total)
            actions = rng.uniform(low, high, size=(k, len(low))).astype(np.float32)  # uniform random policy
            for i in range(k):
                obs, reward, terminated, truncated, _ = envs[i].step(actions[i])
                ep = current[i]
                ep["obs"].append(obs)
                ep["act"].append(actions[i])
                ep["rew"].append(reward)
                ep["term"].append(terminated)
                ep["trunc"].append(truncated)
                if terminated or truncated:
                    finished.append(ep)
                    current[i] = fresh(envs[i].reset()[0])
            total += k
            bar.update(k)
    for ep in current:  # still running when the budget was spent: keep, marked truncated
        if ep["act"]:
            ep["trunc"][-1] = True
            finished.append(ep)
    for env in envs:
        env.close()
    t_collect = time.time() - t0
    buffers = [EpisodeBuffer(observations=np.asarray(ep["obs"]), actions=np.asarray(ep["act"]),
                             rewards=np.asarray(ep["rew"], dtype=np.float64),
                             terminations=np.asarray(ep["term"]), truncations=np.asarray(ep["trunc"]))
               for ep in finished]
    del finished, current
    ref_min, ref_max = _table_ref(name.family, name.kind)
    description = (f"D4RL-protocol random dataset for {name.env_id}: {steps} steps of uniform random actions on "
                   f"{spec.id} (TimeLimit {max_len}), {n_envs} envs in lockstep, seed {seed}; episodes still running "
                   f"when the budget was spent are marked truncated. Reference scores are D4RL's {name.family} ones. "
                   f"Generated by common/datasets.py.")

    # Write into a staging root, then move into place atomically: an interrupted run never leaves a half dataset
    # in the cache, and two concurrent generations do not collide. The name carries pid and host, so a staging
    # folder left by a kill -9 is recognised and removed by the next load (`_remove_stale_staging`).
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{_owner()}-{cache_id.replace('/', '_')}"
    shutil.rmtree(staging, ignore_errors=True)
    old_root = os.environ.get("MINARI_DATASETS_PATH")
    t1 = time.time()
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(staging)
        with warnings.catch_warnings(), _CtrlC(defer=True) as ctrl_c:
            warnings.simplefilter("ignore")  # author e-mail / code permalink nags

            def episodes():  # Minari writes them one at a time: Ctrl-C is honoured between two
                for buffer in buffers:
                    ctrl_c.check()
                    yield buffer

            minari.create_dataset_from_buffers(
                cache_id, tqdm(episodes(), total=len(buffers), desc="writing Minari dataset", unit="ep",
                               disable=not progress, mininterval=1.0),
                env=spec, eval_env=spec, algorithm_name="uniform random actions (D4RL random protocol)",
                author="online-dt common/datasets.py", description=description,
                ref_min_score=ref_min, ref_max_score=ref_max, requirements=["gymnasium[mujoco]>=1.0"])
        target = root / cache_id
        target.parent.mkdir(parents=True, exist_ok=True)
        for ns in Path(cache_id).parents:  # Minari's namespace markers (generated/, generated/<env>/)
            marker = staging / ns / "namespace_metadata.json"
            if str(ns) != "." and marker.exists() and not (root / ns / marker.name).exists():
                (root / ns).mkdir(parents=True, exist_ok=True)
                shutil.copy(marker, root / ns / marker.name)
        if not target.exists():
            os.replace(staging / cache_id, target)
    finally:
        if old_root is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old_root
        shutil.rmtree(staging, ignore_errors=True)
    print(f"common.datasets: generated {steps} steps ({len(buffers)} episodes) of {name.env_id} in {t_collect:.0f} s, "
          f"wrote {target} in {time.time() - t1:.0f} s", file=sys.stderr, flush=True)
    return target


# --- D4RL download ---------------------------------------------------------------------------------------
def _d4rl_url_base() -> str | None:
    base = os.environ.get("D4RL_DATASET_URL", "").strip() or D4RL_BASE_URL
    return None if base.lower() in ("off", "none", "0", "false", "no") else base.rstrip("/") + "/"


def d4rl_url(env_id: str) -> str:
    """The URL of D4RL's own file for a locomotion v2 name (`$D4RL_DATASET_URL` replaces the base)."""
    name = _parse(env_id)
    return (_d4rl_url_base() or D4RL_BASE_URL) + _d4rl_file_names(name)[0]


def _d4rl_download_skip(name: _Name, generate_steps: int = DEFAULT_GENERATE_STEPS) -> str | None:
    """Why step 3 does not apply to `name` (None: it does)."""
    if not (name.d4rl and name.family in LOCOMOTION_ENVS and name.env_id.endswith("-v2")):
        return "only D4RL's locomotion *-v2 files are downloaded"
    if name.family == "ant":
        return ("not downloaded: D4RL's ant files have 111-dim observations (old Ant), Gymnasium's Ant-v5 has 105, "
                "so they cannot be used here")
    if name.kind == "random" and generate_steps != DEFAULT_GENERATE_STEPS:
        return (f"skipped: a {generate_steps}-step generated dataset was asked for (--generate-steps); D4RL's file "
                f"has 1M steps")
    if _d4rl_url_base() is None:
        return "disabled (D4RL_DATASET_URL=off)"
    return None


def _verify_d4rl_file(path: Path) -> str | None:
    """Why `path` is not a complete D4RL locomotion file (None: it is): readable HDF5, D4RL's keys, equal lengths."""
    try:
        with h5py.File(path, "r", locking=False) as f:  # HDF5's own flock would clash with the .part file's lock
            missing = [k for k in D4RL_REQUIRED_KEYS if k not in f]
            if missing:
                return f"it lacks the keys {missing} (found {sorted(f.keys())[:12]})"
            lengths = {k: f[k].shape[0] if f[k].shape else 0 for k in D4RL_REQUIRED_KEYS}
            if len(set(lengths.values())) != 1:
                return f"its arrays have different lengths {lengths}"
    except Exception as err:  # noqa: BLE001 - OSError for a truncated or non-HDF5 file, anything else from h5py
        return f"it is not a readable HDF5 file ({type(err).__name__}: {err})"
    return None


class _Stop(Exception):
    """The download cannot go on (the message says why); the .part file is removed."""


def _size(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB"


def download_d4rl(env_id: str, progress: bool = True, wait: bool = True) -> Path:
    """Download D4RL's own `.hdf5` for a locomotion v2 name into `$D4RL_DATASET_DIR` (default `~/.d4rl/datasets`)
    and return its path (at once if it is already there). The bytes go to `<file>.part`, locked while written;
    a broken connection is resumed with an HTTP Range request (up to `D4RL_DOWNLOAD_ATTEMPTS` times in a row
    without progress, and again by the next call); the size must match the server's Content-Length and the file
    D4RL's keys, else it is removed; then it is renamed into place. Nothing is created before the server answers.
    If another process is downloading the same file, this waits for it (`wait`) or raises. Raises
    `D4RLDownloadError` (`.offline` when the server could not be reached) or `DatasetInterrupted` on Ctrl-C (the
    .part file is kept for the next call)."""
    name = _parse(env_id)
    why = _d4rl_download_skip(name)
    if why is not None:
        raise D4RLDownloadError(f"{env_id}: {why}")
    folder = _d4rl_dir()
    target = folder / _d4rl_file_names(name)[0]
    if target.is_file():
        return target
    url = d4rl_url(env_id)
    why = _unwritable(folder, create=False)
    if why is not None:
        raise D4RLDownloadError(f"the D4RL folder {folder} is not writable ({why}); point D4RL_DATASET_DIR at a "
                                f"writable folder")
    part = target.with_name(target.name + ".part")
    fh = bar = None
    with _CtrlC(defer=False) as ctrl_c:  # a Ctrl-C dropped inside a finaliser is caught at the next chunk
        try:
            if part.is_file():  # resume what an earlier attempt left (locked first: it may still be writing)
                fh = _open_locked(part, wait)
                if target.is_file():  # the other process finished it while we waited
                    return target
            start = part.stat().st_size if fh else 0
            failures, reason, connected = 0, "", False
            while True:
                ctrl_c.check()
                before = start
                try:
                    response = _open_d4rl(url, start)
                except urllib.error.HTTPError as err:
                    if err.code == 416 and start:  # the .part is not a prefix of the file: start over
                        fh.truncate(0)
                        start = 0
                        continue
                    raise D4RLDownloadError(f"{url} answered HTTP {err.code} {err.reason}") from None
                except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
                    reason = f"{getattr(err, 'reason', None) or err}"
                    if not connected:  # never reached in this call: offline, or the server is down
                        raise D4RLDownloadError(f"{url} is unreachable ({reason})", offline=True) from None
                else:
                    connected = True
                    with response:
                        start, total = _start_and_total(response, start)
                        if fh is None:
                            folder.mkdir(parents=True, exist_ok=True)
                            fh = _open_locked(part, wait)
                            if target.is_file():  # another process finished it meanwhile
                                return target
                        fh.truncate(start)
                        fh.seek(start)
                        if bar is None:
                            bar = tqdm(total=total, initial=start, desc=f"downloading {target.name}", unit="B",
                                       unit_scale=True, unit_divisor=1024, disable=not progress, mininterval=1.0)
                        bar.n = start
                        try:
                            while chunk := response.read1(1 << 20):  # what has arrived, up to 1 MiB
                                fh.write(chunk)
                                start += len(chunk)
                                bar.update(len(chunk))
                                ctrl_c.check()
                        except (OSError, http.client.HTTPException) as err:  # broken connection or a stall: resume
                            reason = f"{type(err).__name__}: {err}"
                        else:
                            reason = "the server closed the connection early"
                        fh.flush()
                    if total is None or start >= total:
                        bar.close()
                        if total is not None and start != total:
                            raise _Stop(f"{_size(start)} were received where the server announced {_size(total)}")
                        break
                failures = 0 if start > before else failures + 1
                if failures >= D4RL_DOWNLOAD_ATTEMPTS:
                    raise D4RLDownloadError(
                        f"the download of {url} broke {failures} times in a row without progress ({reason}); "
                        f"{_size(start)} are kept in {part} and the next attempt resumes from there")
                time.sleep(0.2 * failures)
            why = _verify_d4rl_file(part)
            if why is not None:
                raise _Stop(f"the downloaded file is not a D4RL dataset: {why}")
            ctrl_c.check()
            os.replace(part, target)  # atomic: the D4RL folder never holds a partial file under the real name
            print(f"common.datasets: downloaded {url} to {target} ({_size(target.stat().st_size)})", file=sys.stderr,
                  flush=True)
            return target
        except _Stop as err:
            part.unlink(missing_ok=True)
            raise D4RLDownloadError(f"{err}; it was removed. Run again to retry, or download {url} yourself and pass "
                                    f"--dataset-path") from None
        except KeyboardInterrupt:
            kept = part.stat().st_size if fh is not None and part.is_file() else 0
            raise DatasetInterrupted(
                f"Interrupted (Ctrl-C) while downloading {url}: nothing was cached."
                + (f" The {_size(kept)} received so far are kept in {part}; the next run resumes from there (delete it "
                   f"to start over)." if kept else "")) from None
        finally:
            if bar is not None:
                bar.close()
            if fh is not None:  # we hold the lock: an empty .part is worth nothing
                if part.is_file() and part.stat().st_size == 0:
                    part.unlink(missing_ok=True)
                fh.close()


def _open_locked(part: Path, wait: bool):
    """`part` opened for appending, with an exclusive lock (released by close or by the process's death). A lock
    held by another process is waited for (`wait`) or is an error; a file renamed or removed while we waited is
    reopened, so the lock is always on the file that `part` names."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent downloads of one file are the user's business
        return open(part, "ab")  # noqa: SIM115 - the caller closes it
    announced = False
    while True:
        fh = open(part, "ab")  # noqa: SIM115 - the caller closes it
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if not wait:
                    raise D4RLDownloadError(f"another process is downloading {part.name} right now ({part} is "
                                            f"locked); wait for it to finish and run again") from None
                if not announced:
                    print(f"common.datasets: another process is downloading {part.name}; waiting for it",
                          file=sys.stderr, flush=True)
                    announced = True
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if os.path.samestat(os.fstat(fh.fileno()), part.stat()):
                    return fh
            except OSError:
                pass
        except BaseException:
            fh.close()
            raise
        fh.close()


def _open_d4rl(url: str, start: int):
    headers = {"User-Agent": "online-dt common/datasets.py", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=D4RL_CONNECT_TIMEOUT)


def _start_and_total(response, start: int) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's size (None if the server does not say)."""
    if response.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if m and int(m[1]) == start:
            return start, None if m[2] == "*" else int(m[2])
        raise _Stop(f"the server answered the resume request with a wrong range "
                    f"({response.headers.get('Content-Range')!r} for bytes={start}-)")
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None  # 200: the whole file again


# --- Minari download -------------------------------------------------------------------------------------
def _download(minari_id: str) -> tuple[Path | None, str]:
    """Try a Minari download; return (folder, "") or (None, why it was skipped or failed). Never raises."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return None, "download unavailable: huggingface_hub is not installed (`pip install \"minari[hf]\"`)"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return None, "download unavailable: offline (HF_HUB_OFFLINE is set)"
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    host = "storage.googleapis.com" if remote.startswith("gcp://") else "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError as err:
        return None, f"download unavailable: offline ({host} unreachable: {err})"
    try:
        import minari

        minari.download_dataset(minari_id)
    except Exception as err:  # noqa: BLE001 - whatever the remote says, fall through to the next option
        return None, f"download failed: {type(err).__name__}: {err}"
    path = _minari_root() / minari_id
    return (path, "") if _minari_data_dir(path) else (None, f"download finished but {path} holds no dataset")


# --- resolution ------------------------------------------------------------------------------------------
def _toy_data(name: _Name, seed: int) -> OfflineData:
    actions = toy_offline_actions(name.env_id, seed)
    toy = register_toy(name.env_id)
    ref_min, ref_max = toy.ref_scores
    rewards = toy.reward(actions[:, 0]).astype(np.float32)
    one = np.ones((1, 1), dtype=np.float32)
    episodes = [Episode(one.copy(), a[None], r[None], np.ones(1, bool), np.zeros(1, bool), one.copy())
                for a, r in zip(actions, rewards, strict=True)]
    return OfflineData(name.env_id, name.env_id, name.family, "toy", episodes, np.ones(1, np.float32),
                       np.full(1, 1e-6, np.float32), ref_min, ref_max,
                       f"toy dataset built in memory ({len(episodes)} one-step episodes, seed {seed}; "
                       f"common/toys.py)", gym.spec(name.env_id))


def _resolve(name: _Name, dataset_path, generate_steps, download, progress, seed) -> _Loaded:
    # 1. explicit path: the user asked for this file, so any problem with it is an error (no fall-through)
    if dataset_path is not None:
        path = Path(dataset_path).expanduser()
        if path.is_dir():
            if _minari_data_dir(path) is None:
                raise DatasetError(f"--dataset-path '{path}' is a folder but not a Minari dataset (no "
                                   f"data/metadata.json in it). Pass a D4RL .hdf5 file or a Minari dataset folder "
                                   f"(the one holding data/main_data.hdf5).")
            return _load_minari_dir(path, progress, "Minari dataset at --dataset-path")
        if not path.is_file():
            raise DatasetError(f"--dataset-path '{path}' does not exist. Pass a D4RL .hdf5 file or a Minari "
                               f"dataset folder (the one holding data/main_data.hdf5).")
        if path.name == "main_data.hdf5" and (path.parent / "metadata.json").is_file():
            return _load_minari_dir(path.parent, progress, "Minari dataset at --dataset-path")
        return _load_d4rl_file(name, path, "D4RL file at --dataset-path")
    tried = ["1. --dataset-path: not given"]

    # 2. on disk, no network: the name's Minari dataset, D4RL's file, a dataset generated earlier
    root = _minari_root()
    generated_id = _generated_id(name, generate_steps)
    misses = []
    if name.minari_id:
        if _minari_data_dir(root / name.minari_id):
            return _load_minari_dir(root / name.minari_id, progress, "local Minari dataset")
        misses.append(f"no {name.minari_id} in the Minari cache {root}")
    d4rl_files = [_d4rl_dir() / f for f in _d4rl_file_names(name)] if name.d4rl else []
    for candidate in d4rl_files:
        if candidate.is_file():
            return _load_d4rl_file(name, candidate, "D4RL file")
    if d4rl_files:
        misses.append(f"no D4RL file at {d4rl_files[0]}")
    if generated_id:
        if _minari_data_dir(root / generated_id):
            return _load_minari_dir(root / generated_id, progress, "locally generated Minari dataset")
        misses.append(f"no earlier generated {generated_id} in {root}")
    tried.append("2. on disk: " + ("; ".join(misses) if misses else "no Minari or D4RL dataset corresponds to "
                                   "this name"))

    # 3. D4RL's own file, downloaded
    why = _d4rl_download_skip(name, generate_steps)
    if why is None and not download:
        why = "disabled (download=False / --no-download)"
    if why is None:
        try:
            path = download_d4rl(name.env_id, progress)
        except D4RLDownloadError as err:
            why = str(err)
            if not err.offline and generated_id:  # tell why a stand-in is generated although D4RL's file exists
                print(f"common.datasets: D4RL download failed ({why}); going on without it", file=sys.stderr,
                      flush=True)
        else:
            try:
                loaded = _load_d4rl_file(name, path, "D4RL file, downloaded")
            except DatasetError:
                path.unlink(missing_ok=True)
                raise
            loaded.created.append(path)
            return loaded
    tried.append(f"3. D4RL download: {why}")

    # 4. Minari download
    if name.minari_id is None:
        tried.append(f"4. Minari download: no remote Minari dataset holds D4RL's {name.env_id} (Minari has only "
                     f"regenerated mujoco/{name.family}/{{simple,medium,expert}}-v0, different data)")
    elif not download:
        tried.append("4. Minari download: disabled (download=False / --no-download)")
    else:
        path, why = _download(name.minari_id)
        if path is not None:
            return _load_minari_dir(path, progress, "Minari dataset, downloaded")
        tried.append(f"4. Minari download of {name.minari_id}: {why}")

    # 5. local generation
    if generated_id is not None:
        path = _generate_random(name, generated_id, generate_steps, seed, progress)
        loaded = _load_minari_dir(path, progress, "locally generated Minari dataset")
        loaded.created.append(path)
        return loaded
    tried.append("5. local generation: only defined for the locomotion *-random-v2 datasets")

    # 6. a clear error
    how = []
    if name.d4rl:
        d4rl_file = d4rl_files[0].name
        if name.family in LOCOMOTION_ENVS and name.family != "ant" and name.env_id.endswith("-v2"):
            how.append(f"on a machine with internet, `python -m common.datasets {name.env_id}` downloads D4RL's "
                       f"file ({d4rl_url(name.env_id)}) to {d4rl_files[0]}; copy it to the same place here")
        how.append(f"pass --dataset-path /path/to/{d4rl_file} (D4RL's file)")
        how.append(f"put that file at {d4rl_files[0]} (or point $D4RL_DATASET_DIR at its folder)")
    if name.minari_id:
        how.append(f"run `minari download {name.minari_id}` on a machine with internet (pip install "
                   f"\"minari[hf]\") and copy ~/.minari/datasets/{name.minari_id} to {root / name.minari_id}")
    if name.family in LOCOMOTION_ENVS and name.kind in ("medium", "expert"):
        alt = f"mujoco/{name.family}/{name.kind}-v0"
        have = " (already in your Minari cache)" if _minari_data_dir(root / alt) else ""
        how.append(f"or use Minari's regenerated, different (not D4RL) data explicitly: --env-id {alt}{have}")
    raise DatasetError(
        f"Could not find the offline dataset '{name.env_id}'. Tried, in order:\n  "
        + "\n  ".join(tried) + "\nTo provide it:\n  - " + "\n  - ".join(how))


def load_dataset(env_id: str, dataset_path: str | None = None, generate_steps: int = DEFAULT_GENERATE_STEPS,
                 download: bool = True, progress: bool = True, seed: int = 0) -> OfflineData:
    """Resolve `env_id` (module docstring: explicit path, on disk, D4RL download, Minari download, generation),
    load it as episodes with observation statistics, reference scores and a matching env factory, and check it
    (finite values, sizes, actions within the action space). Every failure is a `DatasetError` whose message is
    one complete paragraph; Ctrl-C is a `DatasetInterrupted` (a `DatasetError`) after cleaning up."""
    name = _parse(env_id)
    if name.kind == "toy":
        if dataset_path is not None:
            raise DatasetError(f"'{env_id}' is a toy whose dataset is built in memory; drop --dataset-path.")
        data = _toy_data(name, seed)
        _check_data(data)
        return data
    if generate_steps < 1:
        raise DatasetError(f"generate_steps must be positive, got {generate_steps}.")
    try:
        _remove_stale_staging(_minari_root())
        loaded = _resolve(name, dataset_path, int(generate_steps), download, progress, seed)
        try:
            data = _offline_data(name, loaded)
            _check_data(data)
        except DatasetError:
            for path in loaded.created:  # a failed load leaves no cache entry behind
                _remove(path)
            raise
        for write in loaded.on_success:
            write()
    except KeyboardInterrupt:
        raise DatasetInterrupted(f"Interrupted (Ctrl-C) while loading the dataset '{env_id}', before any training; "
                                 f"nothing half-written was left in the dataset caches.") from None
    return data


def _offline_data(name: _Name, loaded: _Loaded) -> OfflineData:
    spec = loaded.env_spec or _static_spec(name)
    if name.gym_id and spec.id != name.gym_id:
        raise DatasetError(f"The dataset loaded for '{name.env_id}' ({loaded.source}) was recorded on {spec.id}, "
                           f"but '{name.env_id}' is a {name.gym_id} dataset. Pass the matching --env-id or dataset.")
    ref_min, ref_max, source = loaded.ref_min_score, loaded.ref_max_score, loaded.source
    if ref_min is None or ref_max is None:
        ref_min, ref_max = _table_ref(name.family, name.kind)
        if ref_min is not None and not name.d4rl:
            source += f"; not D4RL's data, normalised with D4RL's {name.family} reference scores"
    _check_finite(name.env_id, source, loaded.episodes)
    obs = np.concatenate([e.observations for e in loaded.episodes])
    data = OfflineData(name.env_id, spec.id, name.family, name.kind, loaded.episodes,
                       obs.mean(0, dtype=np.float64).astype(np.float32),
                       (obs.std(0, dtype=np.float64) + 1e-6).astype(np.float32),
                       None if ref_min is None else float(ref_min), None if ref_max is None else float(ref_max),
                       source, spec)
    del obs
    return data


# --- checks ----------------------------------------------------------------------------------------------
def _step_of(episodes: list[Episode], step: int) -> str:
    lengths = np.fromiter((len(e.rewards) for e in episodes), dtype=np.int64, count=len(episodes))
    ep = int(np.searchsorted(np.cumsum(lengths), step, side="right"))
    return f"step {step} (episode {ep}, its step {step - int(lengths[:ep].sum())})"


def _check_finite(env_id: str, source: str, episodes: list[Episode]) -> None:
    """Every observation, next observation, action and reward must be finite (a NaN makes every loss NaN)."""
    for key in ("observations", "next_observations", "actions", "rewards"):
        values = np.concatenate([getattr(e, key) for e in episodes])
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            first = int(np.argmax(bad))
            raise DatasetError(
                f"The dataset '{env_id}' ({source}) has non-finite {key} (NaN or +-inf) at {int(bad.sum())} of its "
                f"{len(bad)} steps; the first is {_step_of(episodes, first)}, counting steps from 0 over the loaded "
                f"episodes (the row in a D4RL file). Training on it would turn every loss into NaN, so nothing was "
                f"trained. Fix or remove those steps in the data, or use another dataset.")


def _action_tolerance() -> float:
    text = os.environ.get("ONLINE_DT_ACTION_TOLERANCE", "").strip()
    if not text:
        return ACTION_TOLERANCE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and np.isfinite(value)):
        raise DatasetError(f"ONLINE_DT_ACTION_TOLERANCE must be a non-negative number, got {text!r}.")
    return value


def _fmt_bounds(values: np.ndarray) -> str:
    values = np.asarray(values, dtype=np.float64).ravel()
    return f"{values[0]:g}" if np.all(values == values[0]) else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _check_data(data: OfflineData) -> None:
    """Sizes against the env, then actions against its action space (within the tolerance; clipped inside it)."""
    env = data.make_env()
    try:
        env_obs, env_act = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
        space = env.action_space
    finally:
        env.close()
    _check_shapes(data, env_obs, env_act)
    if not isinstance(space, gym.spaces.Box):
        return
    tolerance = _action_tolerance()
    low = np.broadcast_to(space.low, space.shape).reshape(-1).astype(np.float64)
    high = np.broadcast_to(space.high, space.shape).reshape(-1).astype(np.float64)
    actions = np.concatenate([e.actions for e in data.episodes]).reshape(-1, env_act)
    outside = (actions < low - tolerance) | (actions > high + tolerance)
    if outside.any():
        steps = outside.any(axis=1)
        first = int(np.argmax(steps))
        worst = float(np.max(np.maximum(low - actions, actions - high)))
        raise DatasetError(
            f"The dataset '{data.env_id}' ({data.source}) has actions outside the action space of {data.gym_id} "
            f"(low {_fmt_bounds(low)}, high {_fmt_bounds(high)}) by more than the tolerance {tolerance:g}: "
            f"{int(outside.sum())} values at {int(steps.sum())} of its {len(steps)} steps, the first at "
            f"{_step_of(data.episodes, first)} (action {np.array2string(actions[first], precision=3)}), the "
            f"farthest {worst:.4g} outside. The policy can only output actions inside the bounds, so it cannot "
            f"imitate this data: the data was recorded with another action scaling or on another env. Rescale or "
            f"clip the actions in the data, or use the --env-id of the env it was recorded on (values up to "
            f"{tolerance:g} outside are accepted and clipped; set ONLINE_DT_ACTION_TOLERANCE to accept more).")
    if ((actions < low) | (actions > high)).any():  # within the tolerance: clip, so the bounds hold exactly
        for e in data.episodes:
            np.clip(e.actions, low.astype(np.float32).reshape(1, -1), high.astype(np.float32).reshape(1, -1),
                    out=e.actions)


def _check_shapes(data: OfflineData, env_obs: int, env_act: int) -> None:
    if (data.obs_dim, data.act_dim) == (env_obs, env_act):
        return
    msg = (f"The dataset for '{data.env_id}' ({data.source}) does not fit its environment {data.gym_id}: the data "
           f"has observations of size {data.obs_dim} and actions of size {data.act_dim}, the env {env_obs} and "
           f"{env_act}.")
    if data.family == "ant" and data.obs_dim == 111:
        msg += (" D4RL's Ant files come from the old Ant (gym v2/v3, mujoco-py) whose 111-dim observation includes "
                "contact forces; Gymnasium's Ant-v5 has 105. Use a v5 dataset instead: ant-random-v2 (generated "
                "locally by this project) or a Minari mujoco/ant/*-v0 dataset (e.g. --env-id mujoco/ant/medium-v0).")
    else:
        msg += " Make sure the dataset was recorded on this environment (Gymnasium v5 for MuJoCo locomotion)."
    raise DatasetError(msg)


# --- CLI: pre-build or inspect a dataset -----------------------------------------------------------------
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("env_id", nargs="?", help="D4RL-style name, Minari id or toy (e.g. hopper-random-v2)")
    parser.add_argument("--dataset-path", default=None, help="a D4RL .hdf5 file or a Minari dataset folder")
    parser.add_argument("--steps", type=int, default=DEFAULT_GENERATE_STEPS,
                        help="env steps when a *-random-v2 dataset is generated (default 1M, as D4RL)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (used only when generating)")
    parser.add_argument("--no-download", action="store_true", help="never try a Minari download")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="print every accepted D4RL-style and toy name")
    parser.add_argument("--download-all", action="store_true",
                        help=f"download D4RL's locomotion files the papers use ({', '.join(PAPER_D4RL)}) into "
                             f"$D4RL_DATASET_DIR (default ~/.d4rl/datasets); --kinds / --families choose others")
    parser.add_argument("--kinds", nargs="+", choices=LOCOMOTION_KINDS, metavar="KIND",
                        help=f"with --download-all: these kinds ({', '.join(LOCOMOTION_KINDS)}) for every family")
    parser.add_argument("--families", nargs="+", choices=tuple(LOCOMOTION_ENVS), metavar="FAMILY",
                        help=f"with --download-all: these families ({', '.join(LOCOMOTION_ENVS)})")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="with --download-all: exactly these datasets, each from where it can be had: D4RL's "
                             "locomotion files from D4RL, the AntMaze / Adroit / Maze2d ports from Minari (needs "
                             "minari[hf]); what is on disk already is skipped (python -m common.benchmark SWEEP "
                             "--preflight prints this command for a sweep)")
    args = parser.parse_args(argv)
    if args.names and not args.download_all:
        parser.error("--names goes with --download-all")
    if args.download_all and args.names:
        if args.kinds or args.families:
            parser.error("--names lists the datasets itself: leave out --kinds and --families")
        return _download_names(args.names, progress=not args.no_progress)
    if args.download_all:
        return _download_all(args.kinds, args.families, progress=not args.no_progress)
    if args.kinds or args.families:
        parser.error("--kinds and --families go with --download-all")
    if args.list or args.env_id is None:
        print("\n".join(known_env_ids()))
        return 0
    t0 = time.time()
    try:
        data = load_dataset(args.env_id, args.dataset_path, generate_steps=args.steps,
                            download=not args.no_download, progress=not args.no_progress, seed=args.seed)
    except DatasetInterrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 130
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    returns = np.array([e.rewards.sum() for e in data.episodes])
    lengths = np.array([len(e.rewards) for e in data.episodes])
    score = data.normalized_score(returns.mean())
    print(f"{data.env_id}: {lengths.sum()} steps in {len(data.episodes)} episodes on {data.gym_id} "
          f"(family {data.family}, kind {data.dataset_kind or '?'}; obs {data.obs_dim}, act {data.act_dim})\n"
          f"  return per episode: mean {returns.mean():.2f} ± {returns.std():.2f}, min {returns.min():.2f}, max "
          f"{returns.max():.2f}; length mean {lengths.mean():.1f}, max {lengths.max()}\n"
          f"  terminated {sum(bool(e.terminals[-1]) for e in data.episodes)}, truncated "
          f"{sum(bool(e.truncations[-1]) for e in data.episodes)}; normalised score of the mean return {score:.2f} "
          f"(reference min {data.ref_min_score}, max {data.ref_max_score})\n"
          f"  source: {data.source}\n  ready in {time.time() - t0:.1f} s")
    return 0


def _download_all(kinds: list[str] | None, families: list[str] | None, progress: bool) -> int:
    """Fetch D4RL's locomotion v2 files; print one line per name (fetched / skipped / failed) and a summary."""
    if kinds is None and families is None:
        names = list(PAPER_D4RL)
    else:
        names = [f"{f}-{k}-v2" for f in (families or [f for f in LOCOMOTION_ENVS if f != "ant"])
                 for k in (kinds or LOCOMOTION_KINDS)]
    print(f"D4RL locomotion files into {_d4rl_dir()} from {_d4rl_url_base() or 'nowhere (D4RL_DATASET_URL=off)'}")
    counts = {"fetched": 0, "skipped": 0, "failed": 0}
    for i, env_id in enumerate(names):
        name = _parse(env_id)
        target = _d4rl_dir() / _d4rl_file_names(name)[0]
        why = _d4rl_download_skip(name)
        if why is None and target.is_file():
            bad = _verify_d4rl_file(target)
            status, line = (("skipped", f"already there ({target})") if bad is None else
                            ("failed", f"{target} is there but not a D4RL file ({bad}); delete it and run again"))
        elif why is not None:
            status, line = "skipped", why
        else:
            t0 = time.time()
            try:
                path = download_d4rl(env_id, progress)
            except DatasetInterrupted as err:
                print(f"error: {err}", file=sys.stderr)
                return 130
            except D4RLDownloadError as err:
                status, line = "failed", str(err)
                if err.offline:
                    counts["failed"] += len(names) - i - 1
                    line += f" - offline, so the other {len(names) - i - 1} were not tried"
                    print(f"  {status:8s} {env_id}: {line}", flush=True)
                    counts[status] += 1
                    break
            else:
                status, line = "fetched", f"{path} ({_size(path.stat().st_size)}, {time.time() - t0:.0f} s)"
        counts[status] += 1
        print(f"  {status:8s} {env_id}: {line}", flush=True)
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    return 2 if counts["failed"] else 0


def _on_disk(name: _Name) -> Path | None:
    """Where the data of `name` already is on this machine (Minari cache or D4RL folder), or None."""
    if name.minari_id and _minari_data_dir(_minari_root() / name.minari_id):
        return _minari_root() / name.minari_id
    for file in (_d4rl_file_names(name) if name.d4rl else []):
        if (_d4rl_dir() / file).is_file():
            return _d4rl_dir() / file
    return None


def _download_names(names: list[str], progress: bool) -> int:
    """`--download-all --names ...`: each dataset from where it can be had (D4RL's locomotion files from D4RL,
    the Minari ports from Minari); one line per name (fetched / skipped / failed) and a summary."""
    counts = {"fetched": 0, "skipped": 0, "failed": 0}
    for env_id in names:
        try:
            name = _parse(env_id)
        except DatasetError as err:
            status, line = "failed", str(err).split(". ")[0]
        else:
            there = _on_disk(name) if name.kind != "toy" else None
            why = _d4rl_download_skip(name)
            if name.kind == "toy":
                status, line = "skipped", "a toy, built in memory"
            elif there is not None:
                status, line = "skipped", f"already there ({there})"
            elif why is None:
                t0 = time.time()
                try:
                    path = download_d4rl(env_id, progress)
                except DatasetInterrupted as err:
                    print(f"error: {err}", file=sys.stderr)
                    return 130
                except D4RLDownloadError as err:
                    status, line = "failed", str(err)
                else:
                    status, line = "fetched", f"{path} ({_size(path.stat().st_size)}, {time.time() - t0:.0f} s)"
            elif name.minari_id:
                path, failure = _download(name.minari_id)
                status, line = ("fetched", f"{path} (Minari {name.minari_id})") if path else ("failed", failure)
            else:
                status, line = "skipped", f"cannot be downloaded: {why}"
        counts[status] += 1
        print(f"  {status:8s} {env_id}: {line}", flush=True)
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    return 2 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(_main())
