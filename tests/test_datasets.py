"""common/datasets.py: every resolution branch, the readers' edge cases, the clear errors and the toys.

Every test points MINARI_DATASETS_PATH, D4RL_DATASET_DIR and HOME at a temporary folder, so the real caches are
never read or written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec

from common import datasets
from common.datasets import DatasetError, DatasetInterrupted, known_env_ids, load_dataset, make_env
from common.toys import ag_reward, vitamin_reward
from conftest import REPO, TINY_MODEL, PressCtrlCWhenFinalised, assert_clear_error, run_script

GEN_STEPS = 3000


def isolate(monkeypatch, root: Path) -> Path:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(root / "d4rl"))
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("D4RL_DATASET_URL", "off")  # no D4RL download (tests/test_download.py covers it)
    return root


@pytest.fixture
def caches(tmp_path, monkeypatch) -> Path:
    return isolate(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A tiny generated hopper-random-v2 (GEN_STEPS steps) in its own Minari root; returns the dataset folder."""
    root = tmp_path_factory.mktemp("gen")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        load_dataset("hopper-random-v2", generate_steps=GEN_STEPS, progress=False)
    return root / "minari" / f"generated/hopper/random-{GEN_STEPS}-v2"


# A D4RL-layout file: episodes of 5 (terminal), 4 (timeout), 3 (terminal and timeout) steps, then an incomplete
# remainder of 2 steps with neither flag.
LENGTHS, REMAINDER = (5, 4, 3), 2


def write_d4rl(path: Path, obs_dim=11, act_dim=3, next_obs=True, timeouts=True, **overrides) -> dict:
    n = sum(LENGTHS) + REMAINDER
    arrays = {
        "observations": np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim),
        "actions": np.linspace(-1, 1, n * act_dim, dtype=np.float32).reshape(n, act_dim),
        "rewards": np.arange(n, dtype=np.float32)[:, None] / 10,  # (N, 1) as in some D4RL files
        "terminals": np.zeros(n, bool),
        "timeouts": np.zeros(n, bool),
    }
    arrays["next_observations"] = arrays["observations"] + 0.5
    ends = np.cumsum(LENGTHS) - 1
    arrays["terminals"][[ends[0], ends[2]]] = True
    arrays["timeouts"][[ends[1], ends[2]]] = True
    if not next_obs:
        del arrays["next_observations"]
    if not timeouts:
        del arrays["timeouts"]
    arrays.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        f.create_dataset("infos/qpos", data=np.zeros((n, 6)))
    return arrays


# --- 1. explicit D4RL file ------------------------------------------------------------------------------------
def test_d4rl_file_splits_episodes_and_drops_remainder(caches):
    path = caches / "files" / "my_hopper.hdf5"
    raw = write_d4rl(path)
    data = load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)
    assert [len(e.rewards) for e in data.episodes] == list(LENGTHS)
    assert [bool(e.terminals[-1]) for e in data.episodes] == [True, False, True]
    assert [bool(e.truncations[-1]) for e in data.episodes] == [False, True, False]  # terminal wins over timeout
    for e in data.episodes:
        assert not e.terminals[:-1].any() and not e.truncations[:-1].any()
        assert e.rewards.dtype == np.float32 and e.rewards.ndim == 1
        assert e.observations.dtype == np.float32 and e.actions.shape == (len(e.rewards), 3)
    np.testing.assert_allclose(data.episodes[1].rewards, raw["rewards"][5:9, 0])
    np.testing.assert_array_equal(data.episodes[2].next_observations, raw["next_observations"][9:12])
    used = raw["observations"][: sum(LENGTHS)]
    np.testing.assert_allclose(data.state_mean, used.mean(0), rtol=1e-6)
    np.testing.assert_allclose(data.state_std, used.std(0) + 1e-6, rtol=1e-5)
    assert (data.env_id, data.gym_id, data.family, data.dataset_kind) == ("hopper-medium-v2", "Hopper-v5",
                                                                          "hopper", "medium")
    assert (data.obs_dim, data.act_dim) == (11, 3)
    assert str(path) in data.source
    np.testing.assert_allclose(data.normalized_score([-20.272305, 3234.3]), [0.0, 100.0])
    env = data.make_env()
    assert env.spec.id == "Hopper-v5" and env.spec.max_episode_steps == 1000
    env.close()


def test_d4rl_file_without_next_observations(caches):
    path = caches / "files" / "antmaze_like.hdf5"
    raw = write_d4rl(path, obs_dim=17, act_dim=6, next_obs=False)
    data = load_dataset("walker2d-medium-replay-v2", dataset_path=str(path), progress=False)
    obs = raw["observations"]
    first = data.episodes[0]
    np.testing.assert_array_equal(first.next_observations[:-1], obs[1:5])
    np.testing.assert_array_equal(first.next_observations[-1], obs[4])  # last step repeats its observation
    np.testing.assert_array_equal(data.episodes[1].next_observations[-1], obs[8])  # not the next episode's start


def test_d4rl_v0_file_without_timeouts_is_cut_every_1000_steps(caches):
    path = caches / "files" / "v0.hdf5"
    n = 2500  # one long run that never terminates, like halfcheetah: 1000 + 1000 + an incomplete 500
    write_d4rl(path, obs_dim=17, act_dim=6, timeouts=False, observations=np.zeros((n, 17), np.float32),
               next_observations=np.zeros((n, 17), np.float32), actions=np.zeros((n, 6), np.float32),
               rewards=np.ones(n, np.float32), terminals=np.zeros(n, bool))
    data = load_dataset("halfcheetah-medium-v0", dataset_path=str(path), progress=False)
    assert [len(e.rewards) for e in data.episodes] == [1000, 1000]
    assert all(e.truncations[-1] and not e.terminals.any() for e in data.episodes)


# --- 2. local Minari cache and explicit Minari folder ----------------------------------------------------------
def test_minari_folder_explicit_path(caches, generated):
    reference = load_dataset("hopper-random-v2", dataset_path=str(generated), progress=False)
    for path in (generated / "data", generated / "data" / "main_data.hdf5"):
        data = load_dataset("hopper-random-v2", dataset_path=str(path), progress=False)
        assert data.num_steps == reference.num_steps == GEN_STEPS
        np.testing.assert_array_equal(data.episodes[-1].observations, reference.episodes[-1].observations)
    assert "--dataset-path" in reference.source


def test_local_minari_cache_hit_and_reference_scores(caches, generated):
    target = caches / "minari" / "mujoco" / "hopper" / "medium-v0"
    shutil.copytree(generated, target)
    meta_path = target / "data" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for key in ("ref_min_score", "ref_max_score"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    data = load_dataset("mujoco/hopper/medium-v0", download=False, progress=False)
    assert data.family == "hopper" and data.dataset_kind == "medium" and data.gym_id == "Hopper-v5"
    assert data.num_steps == GEN_STEPS
    assert "local Minari dataset" in data.source and "not D4RL's data" in data.source
    assert (data.ref_min_score, data.ref_max_score) == (-20.272305, 3234.3)  # from the table, by family
    assert make_env("mujoco/hopper/medium-v0").spec.id == "Hopper-v5"


# --- 3. D4RL directory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("file", ["hopper_medium_replay-v2.hdf5", "hopper_medium-replay-v2.hdf5"])
def test_d4rl_dir_hit(caches, file):
    """D4RL's own file name (`_` for every `-` of the kind), and the older one-underscore spelling."""
    write_d4rl(caches / "d4rl" / file)
    data = load_dataset("hopper-medium-replay-v2", progress=False)
    assert data.source.startswith("D4RL file") and file in data.source
    assert len(data.episodes) == len(LENGTHS)
    assert datasets._d4rl_file_names(datasets._parse("hopper-medium-replay-v2"))[0] == "hopper_medium_replay-v2.hdf5"


def test_d4rl_dir_defaults_to_home(caches, monkeypatch):
    monkeypatch.delenv("D4RL_DATASET_DIR")
    write_d4rl(caches / "home" / ".d4rl" / "datasets" / "walker2d_expert-v2.hdf5", obs_dim=17, act_dim=6)
    assert load_dataset("walker2d-expert-v2", progress=False).obs_dim == 17


# --- 5. generation, cached as a Minari dataset ---------------------------------------------------------------
def test_generation_is_cached_as_minari_dataset(caches, monkeypatch):
    data = load_dataset("hopper-random-v2", generate_steps=GEN_STEPS, progress=False)
    folder = caches / "minari" / "generated" / "hopper" / f"random-{GEN_STEPS}-v2"
    assert (folder / "data" / "main_data.hdf5").is_file()
    assert not list((caches / "minari").glob(".staging*"))
    assert data.num_steps == GEN_STEPS and "generated" in data.source
    returns = np.array([e.rewards.sum() for e in data.episodes])
    lengths = np.array([len(e.rewards) for e in data.episodes])
    assert 8 < returns.mean() < 35 and 10 < lengths.mean() < 40  # uniform random on Hopper-v5: 17.2, ~22 steps
    assert all(e.terminals[-1] or e.truncations[-1] for e in data.episodes)
    assert (data.ref_min_score, data.ref_max_score) == (-20.272305, 3234.3)
    meta = json.loads((folder / "data" / "metadata.json").read_text())
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (-20.272305, 3234.3)
    assert meta["total_steps"] == GEN_STEPS

    def no_generation(*args, **kwargs):
        raise AssertionError("should have loaded the cached dataset")

    monkeypatch.setattr(datasets, "_generate_random", no_generation)
    again = load_dataset("hopper-random-v2", generate_steps=GEN_STEPS, progress=False)
    assert len(again.episodes) == len(data.episodes)
    for a, b in zip(again.episodes[::17], data.episodes[::17], strict=True):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
    (folder / "data" / datasets.FLAT_CACHE).write_bytes(b"garbage")  # a broken derived cache is just rebuilt
    assert load_dataset("hopper-random-v2", generate_steps=GEN_STEPS, progress=False).num_steps == GEN_STEPS

    import minari  # the result is a standard Minari dataset

    ds = minari.load_dataset(f"generated/hopper/random-{GEN_STEPS}-v2")
    assert ds.total_steps == GEN_STEPS and ds.total_episodes == len(data.episodes)


def test_generation_small_budget_keeps_whole_long_episodes(caches):
    # HalfCheetah never terminates: with 2000 steps, two envs play one full 1000-step episode each.
    data = load_dataset("halfcheetah-random-v2", generate_steps=2000, progress=False)
    assert [len(e.rewards) for e in data.episodes] == [1000, 1000]
    assert all(e.truncations[-1] and not e.terminals.any() for e in data.episodes)


def test_generation_follows_d4rl_s_random_protocol_exactly_to_the_budget(caches, tmp_path):
    """D4RL's random protocol (module docstring, "Generation"): uniform random actions within the action space,
    exactly `generate_steps` env steps even when the budget is not a multiple of the number of envs, env i reset
    first with seed + i (so no two envs replay the same episodes), episodes ended by the env terminal (random
    Hopper always falls) except the ones still running when the budget was spent: kept, marked truncated, not
    terminal. The same seed makes the same data."""
    data = load_dataset("hopper-random-v2", generate_steps=1001, progress=False, seed=5)
    assert data.num_steps == 1001  # 2 envs in lockstep, the last step taken by one env only
    ends = [(bool(e.terminals[-1]), bool(e.truncations[-1])) for e in data.episodes]
    assert ends.count((False, True)) == 2 and ends.count((True, False)) == len(ends) - 2
    assert all(not e.terminals[:-1].any() and not e.truncations[:-1].any() for e in data.episodes)
    starts = np.stack([e.observations[0] for e in data.episodes])
    assert len(np.unique(starts, axis=0)) == len(starts)  # every episode starts from its own reset
    env = gym.make("Hopper-v5")
    for seed in (5, 6):
        first = env.reset(seed=seed)[0].astype(np.float32)
        assert (np.abs(starts - first).max(axis=1) == 0).sum() == 1, seed
    env.close()
    actions = np.concatenate([e.actions for e in data.episodes])
    assert actions.min() >= -1 and actions.max() <= 1 and abs(actions.mean()) < 0.05 and actions.std() > 0.5
    other = tmp_path / "again"
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, other)
        again = load_dataset("hopper-random-v2", generate_steps=1001, progress=False, seed=5)
    np.testing.assert_array_equal(np.concatenate([e.actions for e in again.episodes]), actions)
    np.testing.assert_array_equal(np.stack([e.observations[0] for e in again.episodes]), starts)


# --- 6. errors -----------------------------------------------------------------------------------------------
def test_unknown_id_suggests_close_names(caches):
    with pytest.raises(DatasetError, match="hopper-random-v2"):
        load_dataset("hoper-random-v2")
    with pytest.raises(DatasetError, match="Unknown dataset"):
        make_env("not-a-dataset")


def test_missing_dataset_lists_every_branch(caches):
    with pytest.raises(DatasetError) as info:
        load_dataset("hopper-medium-v2", progress=False)
    msg = str(info.value)
    for part in ("'hopper-medium-v2'", "1. --dataset-path", "2. on disk: no D4RL file at",
                 str(caches / "d4rl" / "hopper_medium-v2.hdf5"), "3. D4RL download: disabled (D4RL_DATASET_URL=off)",
                 "4. Minari download", "5. local generation", "--dataset-path /path/to/hopper_medium-v2.hdf5",
                 "gym_mujoco_v2/hopper_medium-v2.hdf5", "mujoco/hopper/medium-v0"):
        assert part in msg, (part, msg)


def test_download_fails_fast_offline(caches):
    start = time.time()
    with pytest.raises(DatasetError) as info:
        load_dataset("antmaze-umaze-v2", progress=False)
    assert time.time() - start < 5
    msg = str(info.value)
    assert "4. Minari download of D4RL/antmaze/umaze-v1: download unavailable" in msg
    assert "minari download D4RL/antmaze/umaze-v1" in msg


@pytest.mark.parametrize("content", ["garbage", "truncated", "wrong-keys"])
def test_corrupt_hdf5_is_a_clear_error(caches, content):
    path = caches / "files" / "bad.hdf5"
    if content == "garbage":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not an hdf5 file" * 100)
    elif content == "truncated":
        good = caches / "files" / "good.hdf5"
        write_d4rl(good)
        path.write_bytes(good.read_bytes()[:3000])
    else:
        path.parent.mkdir(parents=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("obs", data=np.zeros((3, 11)))
    with pytest.raises(DatasetError, match="bad.hdf5"):
        load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)


def test_missing_dataset_path(caches):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("hopper-medium-v2", dataset_path=str(caches / "nope.hdf5"))


def test_d4rl_ant_file_shape_mismatch(caches):
    path = caches / "files" / "ant_medium-v2.hdf5"
    write_d4rl(path, obs_dim=111, act_dim=8)
    with pytest.raises(DatasetError) as info:
        load_dataset("ant-medium-v2", dataset_path=str(path), progress=False)
    msg = str(info.value)
    assert "111" in msg and "105" in msg and "ant-random-v2" in msg and "mujoco/ant" in msg


def test_d4rl_antmaze_file_is_refused(caches):
    path = caches / "files" / "Ant_maze_u-maze.hdf5"
    write_d4rl(path, obs_dim=29, act_dim=8, next_obs=False)
    with pytest.raises(DatasetError, match="D4RL/antmaze/umaze-v1"):
        load_dataset("antmaze-umaze-v2", dataset_path=str(path), progress=False)


def test_minari_dict_observations_are_flattened(caches):
    """A D4RL/antmaze-like Minari dataset (dict observations, gymnasium-robotics env) in the local cache."""
    folder = caches / "minari" / "D4RL" / "antmaze" / "umaze-v1" / "data"
    folder.mkdir(parents=True)
    spec = EnvSpec(id="AntMaze_UMaze-v5", entry_point="gymnasium_robotics.envs.maze.ant_maze_v5:AntMazeEnv",
                   max_episode_steps=700)
    lengths = (4, 6)
    (folder / "metadata.json").write_text(json.dumps({
        "dataset_id": "D4RL/antmaze/umaze-v1", "total_episodes": len(lengths), "total_steps": sum(lengths),
        "data_format": "hdf5", "env_spec": spec.to_json(), "ref_min_score": 0.0, "ref_max_score": 1.0}))
    with h5py.File(folder / "main_data.hdf5", "w") as f:
        for i, t in enumerate(lengths):
            g = f.create_group(f"episode_{i}")
            g.create_dataset("observations/observation", data=np.full((t + 1, 27), i, np.float64))
            g.create_dataset("observations/achieved_goal", data=np.full((t + 1, 2), 5.0))
            g.create_dataset("observations/desired_goal", data=np.full((t + 1, 2), 7.0))
            g.create_dataset("actions", data=np.zeros((t, 8), np.float32))
            g.create_dataset("rewards", data=np.zeros(t))
            g.create_dataset("terminations", data=np.eye(t, dtype=bool)[-1] if i == 0 else np.zeros(t, bool))
            g.create_dataset("truncations", data=np.zeros(t, bool))
    episodes, meta, _ = datasets._read_minari(folder.parent, progress=False)
    assert [len(e.rewards) for e in episodes] == list(lengths)
    assert episodes[0].observations.shape == (4, 29)  # concat(observation, desired_goal)
    np.testing.assert_array_equal(episodes[1].observations[0, 27:], [7.0, 7.0])
    assert episodes[0].terminals[-1] and episodes[1].truncations[-1]  # unflagged end counts as truncated
    try:
        import gymnasium_robotics  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="pip install gymnasium-robotics"):
            load_dataset("antmaze-umaze-v2", download=False, progress=False)


def test_goal_observation_wrapper():
    class GoalEnv(gym.Env):
        observation_space = gym.spaces.Dict({
            "achieved_goal": gym.spaces.Box(-1, 1, (2,)), "desired_goal": gym.spaces.Box(-1, 1, (2,)),
            "observation": gym.spaces.Box(-1, 1, (3,))})
        action_space = gym.spaces.Box(-1, 1, (1,))

        def reset(self, *, seed=None, options=None):
            return {"achieved_goal": np.zeros(2), "desired_goal": np.ones(2), "observation": np.full(3, 0.5)}, {}

    env = datasets.GoalObservation(GoalEnv(), datasets._goal_keys(GoalEnv.observation_space.spaces))
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs, [0.5, 0.5, 0.5, 1.0, 1.0])
    assert env.observation_space.shape == (5,)


# --- toys ----------------------------------------------------------------------------------------------------
def test_vitamin_toy():
    data = load_dataset("toy-vitamin-v0")
    actions = np.array([e.actions[0, 0] for e in data.episodes])
    rewards = np.array([e.rewards[0] for e in data.episodes])
    assert len(data.episodes) == 128 and all(len(e.rewards) == 1 and e.terminals[0] for e in data.episodes)
    assert not any(e.truncations.any() for e in data.episodes)  # the one step terminates: no bootstrap
    assert ((actions >= -1) & (actions <= -0.95)).sum() == 100 and ((actions >= 0.5) & (actions <= 1)).sum() == 28
    np.testing.assert_allclose(rewards, np.where(actions < 0, (actions + 1) ** 2, 1 - 2 * actions), rtol=1e-5)
    assert rewards.max() <= 0.0025 + 1e-6  # the data sits on the feet, never near the peak r(0) = 1
    assert (data.ref_min_score, data.ref_max_score) == (-1.0, 1.0)
    np.testing.assert_allclose(data.normalized_score([1.0, -1.0, 0.0]), [100.0, 0.0, 50.0])
    assert (data.obs_dim, data.act_dim, data.family, data.gym_id) == (1, 1, "toy-vitamin", "toy-vitamin-v0")
    np.testing.assert_array_equal(data.episodes[0].observations, [[1.0]])
    env = data.make_env()
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.tolist() == [1.0]
    _, reward, terminated, _, _ = env.step(np.zeros(1, np.float32))
    assert reward == pytest.approx(1.0) and terminated and env.spec.max_episode_steps == 1
    assert vitamin_reward(-1.0) == 0 and vitamin_reward(1.0) == -1


def test_ag_toy_and_vector_env():
    data = load_dataset("toy-ag-v0")
    actions = np.array([e.actions[0, 0] for e in data.episodes])
    assert len(actions) == 128 and (np.abs(actions) >= 0.5).all() and (np.abs(actions) <= 1).all()
    assert (actions > 0).any() and (actions < 0).any()
    np.testing.assert_allclose([e.rewards[0] for e in data.episodes], 1 - actions**2, rtol=1e-5)
    assert (data.ref_min_score, data.ref_max_score) == (0.0, 1.0)
    envs = gym.vector.SyncVectorEnv([data.make_env for _ in range(3)])
    envs.reset(seed=0)
    _, rewards, terminated, _, _ = envs.step(np.array([[0.0], [0.5], [-1.0]], np.float32))
    np.testing.assert_allclose(rewards, [1.0, 0.75, 0.0])
    assert terminated.all() and ag_reward(0.0) == 1
    assert make_env("toy-ag-v0").spec.id == "toy-ag-v0"
    np.testing.assert_array_equal(load_dataset("toy-ag-v0").episodes[5].actions, data.episodes[5].actions)


def test_normalized_score_is_nan_without_reference():
    data = load_dataset("toy-ag-v0")
    data.ref_min_score = data.ref_max_score = None
    assert np.isnan(data.normalized_score([1.0, 2.0])).all()


# --- names and CLI -------------------------------------------------------------------------------------------
def test_known_ids_and_env_mapping():
    ids = known_env_ids()
    for name in ("hopper-random-v2", "halfcheetah-medium-replay-v2", "walker2d-medium-expert-v2", "ant-expert-v2",
                 "antmaze-umaze-diverse-v2", "pen-human-v1", "door-cloned-v1", "maze2d-umaze-v1", "toy-vitamin-v0"):
        assert name in ids
    assert datasets._parse("antmaze-medium-play-v2").minari_id == "D4RL/antmaze/medium-play-v1"
    assert datasets._parse("relocate-expert-v1").minari_id == "D4RL/relocate/expert-v2"
    assert datasets._parse("maze2d-large-v1").minari_id == "D4RL/pointmaze/large-v2"
    assert datasets._parse("D4RL/pointmaze/umaze-dense-v2").family == "maze2d"
    assert datasets._table_ref("maze2d", "medium") == (13.13, 277.39)
    env = make_env("walker2d-medium-v2")
    assert env.spec.id == "Walker2d-v5" and env.observation_space.shape == (17,)
    env.close()


def test_cli(caches, capsys):
    assert datasets._main(["toy-vitamin-v0", "--no-progress"]) == 0
    assert "128 episodes" in capsys.readouterr().out
    assert datasets._main(["hopper-expert-v2", "--no-download", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not find the offline dataset 'hopper-expert-v2'") and "Traceback" not in err


# --- checks at load: bad data ends with one clear error before any training ------------------------------------
def minari_copy(generated: Path, root: Path) -> Path:
    """A copy of the generated dataset under the Minari id mujoco/hopper/medium-v0 in `root`'s cache."""
    target = root / "minari" / "mujoco" / "hopper" / "medium-v0"
    shutil.copytree(generated, target)
    (target / "data" / datasets.FLAT_CACHE).unlink(missing_ok=True)
    return target


def spoil_minari(folder: Path, episode: int, key: str, value: float) -> None:
    with h5py.File(folder / "data" / "main_data.hdf5", "r+") as f:
        f[f"episode_{episode}/{key}"][1] = value


@pytest.mark.parametrize("source", ["d4rl-path", "d4rl-dir", "minari"])
@pytest.mark.parametrize("key", ["rewards", "observations", "actions"])
def test_non_finite_values_are_refused(caches, generated, source, key):
    """Every source: the field, the number of bad steps and the first one are named; a Minari folder gets no
    derived cache from a failed load."""
    bad = {"rewards": np.nan, "observations": np.inf, "actions": np.nan}[key]
    if source == "minari":
        folder = minari_copy(generated, caches)
        spoil_minari(folder, 2, key, bad)
        episodes = datasets._read_minari(generated, progress=False)[0]
        first = sum(len(e.rewards) for e in episodes[:2]) + 1
        kwargs = {"env_id": "mujoco/hopper/medium-v0"}
    else:
        path = caches / ("d4rl/hopper_medium-v2.hdf5" if source == "d4rl-dir" else "files/bad.hdf5")
        n = sum(LENGTHS) + REMAINDER
        arrays = {"rewards": np.zeros(n, np.float32), "observations": np.zeros((n, 11), np.float32),
                  "actions": np.zeros((n, 3), np.float32)}
        arrays[key][[6, 7, 13]] = bad  # 13: in the dropped remainder, not counted
        write_d4rl(path, **{key: arrays[key]})
        first = 6
        kwargs = {"env_id": "hopper-medium-v2", "dataset_path": str(path) if source == "d4rl-path" else None}
    with pytest.raises(DatasetError) as info:
        load_dataset(**kwargs, progress=False)
    msg = str(info.value)
    assert f"non-finite {key} (NaN or +-inf) at {1 if source == 'minari' else 2} of its" in msg, msg
    assert f"the first is step {first} (episode" in msg and "nothing was trained" in msg, msg
    if source == "minari":
        assert not (folder / "data" / datasets.FLAT_CACHE).exists()  # a failed load writes no derived cache


def test_non_finite_next_observations_are_refused(caches):
    path = caches / "files" / "bad_next.hdf5"
    n = sum(LENGTHS) + REMAINDER
    next_obs = np.zeros((n, 11), np.float32)
    next_obs[3, 4] = np.nan
    write_d4rl(path, next_observations=next_obs)
    with pytest.raises(DatasetError, match=r"non-finite next_observations .* at 1 of its 12 steps; the first is "
                                           r"step 3 \(episode 0, its step 3\)"):
        load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)


def test_nan_rewards_through_cli(caches, data_env):
    """The issue's row: NaN rewards end with exit 2 and one paragraph, no traceback, no training."""
    path = caches / "files" / "nan.hdf5"
    n = sum(LENGTHS) + REMAINDER
    rewards = np.ones(n, np.float32)
    rewards[4] = np.nan
    write_d4rl(path, rewards=rewards)
    env = {**data_env, "MINARI_DATASETS_PATH": str(caches / "minari"), "D4RL_DATASET_DIR": str(caches / "d4rl"),
           "D4RL_DATASET_URL": "off"}
    result = subprocess.run([sys.executable, "-m", "common.datasets", "hopper-medium-v2", "--dataset-path", str(path)],
                            cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert_clear_error(result, "non-finite rewards (NaN or +-inf) at 1 of its 12 steps; the first is step 4")
    run = caches / "run"
    run.mkdir()
    result = run_script("odt.py", "--env-id", "hopper-medium-v2", "--dataset-path", str(path), *TINY_MODEL,
                        cwd=run, env=env, check=False, timeout=120)
    assert_clear_error(result, "non-finite rewards (NaN or +-inf)")
    assert not list(run.glob("runs/*/metrics.jsonl")), "training started on NaN rewards"


@pytest.mark.parametrize("source", ["d4rl", "minari"])
def test_actions_outside_the_action_space_are_refused(caches, generated, source):
    if source == "minari":
        folder = minari_copy(generated, caches)
        spoil_minari(folder, 0, "actions", 5.0)
        kwargs = {"env_id": "mujoco/hopper/medium-v0"}
    else:
        path = caches / "files" / "big_actions.hdf5"
        n = sum(LENGTHS) + REMAINDER
        write_d4rl(path, actions=np.linspace(-5, 5, n * 3, dtype=np.float32).reshape(n, 3))
        kwargs = {"env_id": "hopper-medium-v2", "dataset_path": str(path)}
    with pytest.raises(DatasetError) as info:
        load_dataset(**kwargs, progress=False)
    msg = str(info.value)
    for part in ("actions outside the action space of Hopper-v5 (low -1, high 1)", "the tolerance 0.001",
                 "the first at step ", "ONLINE_DT_ACTION_TOLERANCE"):
        assert part in msg, (part, msg)
    if source == "minari":
        assert "the first at step 1 (episode 0, its step 1)" in msg and "4 outside" in msg, msg


def test_actions_at_the_bounds_and_within_the_tolerance_are_accepted(caches, monkeypatch):
    path = caches / "files" / "edge_actions.hdf5"
    n = sum(LENGTHS) + REMAINDER
    actions = np.zeros((n, 3), np.float32)
    actions[0] = [-1.0, 1.0, 1.0005]  # D4RL's data sits exactly at +-1; 5e-4 outside is within the tolerance
    actions[1] = [0.5, -1.0009, 0.0]
    write_d4rl(path, actions=actions)
    data = load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)
    np.testing.assert_array_equal(data.episodes[0].actions[:2], [[-1, 1, 1], [0.5, -1, 0]])  # clipped into bounds
    actions[2] = [0.0, 0.0, -1.5]
    write_d4rl(path, actions=actions)
    with pytest.raises(DatasetError, match="the tolerance 0.001: 1 values at 1 of its 12 steps, the first at step 2"):
        load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)
    monkeypatch.setenv("ONLINE_DT_ACTION_TOLERANCE", "0.6")
    assert load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False).episodes[0].actions[2, 2] == -1
    monkeypatch.setenv("ONLINE_DT_ACTION_TOLERANCE", "lots")
    with pytest.raises(DatasetError, match="ONLINE_DT_ACTION_TOLERANCE must be a non-negative number"):
        load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)


@pytest.mark.parametrize("value, refused", [(1.01, True), (-1.01, True), (1.0009, False), (-1.0009, False)])
def test_action_tolerance_holds_on_both_sides_and_clips_to_both_bounds(caches, value, refused):
    """Actions may exceed the action space by at most ACTION_TOLERANCE (1e-3) on EITHER side: beyond it (above
    the high bound or below the low one) the dataset is refused; within it the value is clipped to that bound."""
    path = caches / "files" / "one_side.hdf5"
    n = sum(LENGTHS) + REMAINDER
    actions = np.zeros((n, 3), np.float32)
    actions[3, 1] = value
    write_d4rl(path, actions=actions)
    if refused:
        with pytest.raises(DatasetError, match="1 values at 1 of its 12 steps, the first at step 3"):
            load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)
    else:
        data = load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)
        assert data.episodes[0].actions[3, 1] == np.sign(value)
        assert np.abs(np.concatenate([e.actions for e in data.episodes])).max() == 1.0


def test_generated_dataset_failing_its_checks_is_removed(caches, monkeypatch):
    def spoiled(env_id, source, episodes):
        raise DatasetError("spoiled on purpose")

    monkeypatch.setattr(datasets, "_check_finite", spoiled)
    with pytest.raises(DatasetError, match="spoiled on purpose"):
        load_dataset("hopper-random-v2", generate_steps=1000, progress=False)
    assert not (caches / "minari" / "generated" / "hopper" / "random-1000-v2").exists()
    assert not list((caches / "minari").glob(".staging*"))


# --- cache folders: writability first, nothing half-written survives ----------------------------------------------
def cli_env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MINARI_DATASETS_PATH": str(root / "minari"), "D4RL_DATASET_DIR": str(root / "d4rl"),
            "HOME": str(root / "home"), "HF_HUB_OFFLINE": "1", "D4RL_DATASET_URL": "off", "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("how", ["file-in-the-way", "read-only"])
def test_unwritable_minari_cache_fails_fast_before_generating(caches, monkeypatch, how):
    if how == "file-in-the-way":  # works as root too: nothing can be created below a regular file
        (caches / "blocker").write_text("a file, not a folder")
        root = caches / "blocker" / "minari"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        root = caches / "readonly"
        root.mkdir()
        root.chmod(0o555)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setattr(datasets, "_collect_and_write", lambda *a: pytest.fail("generation started"))
    start = time.time()
    with pytest.raises(DatasetError) as info:
        load_dataset("hopper-random-v2", generate_steps=GEN_STEPS, progress=False)
    assert time.time() - start < 1.0
    msg = str(info.value)
    assert f"the Minari cache folder {root} (MINARI_DATASETS_PATH) is not writable" in msg, msg
    assert "Nothing was generated" in msg and "export MINARI_DATASETS_PATH=" in msg


def test_unwritable_minari_cache_through_cli(caches):
    (caches / "blocker").write_text("a file, not a folder")
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "common.datasets", "hopper-random-v2"], cwd=REPO,
                            env=cli_env(caches, MINARI_DATASETS_PATH=str(caches / "blocker" / "minari")),
                            capture_output=True, text=True, timeout=60)
    assert time.time() - start < 10  # the process start-up (imports) included; the check itself is instant
    assert_clear_error(result, "is not writable")
    assert "generating" not in result.stderr and "Nothing was generated" in result.stderr


def test_stale_staging_folders_of_dead_processes_are_removed(caches):
    root = caches / "minari"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = datasets._HOST
    folders = {
        f".staging-{dead.pid}-{host}-generated_hopper_random-v2": False,  # dead here: removed
        f".staging-generated_hopper_random-v2-{dead.pid}": False,  # the older naming, dead: removed
        f".staging-{os.getpid()}-{host}-generated_hopper_random-v2": True,  # alive: kept
        f".staging-{dead.pid}-otherhost-generated_hopper_random-v2": True,  # another host's: kept
    }
    for name in folders:
        (root / name / "generated").mkdir(parents=True)
        (root / name / "generated" / "junk.hdf5").write_bytes(b"x" * 100)
    result = subprocess.run([sys.executable, "-m", "common.datasets", "hopper-medium-v2"], cwd=REPO,
                            env=cli_env(caches), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2  # any start, even one that fails, cleans up
    for name, kept in folders.items():
        assert (root / name).exists() == kept, name


def start_generation(root: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "common.datasets", "hopper-random-v2", "--steps", str(steps),
                             "--no-progress"], cwd=REPO, env=cli_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_staging(proc: subprocess.Popen, root: Path, timeout: float = 60) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in (root / "minari").glob(".staging-*") if (p / "generated").exists()]
        if found:
            return found[0]
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no staging folder appeared: {proc.communicate()}")


def test_kill_9_while_writing_leaves_nothing_after_the_next_start(caches):
    proc = start_generation(caches, 6000)
    staging = wait_for_staging(proc, caches)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert staging.exists()  # what kill -9 leaves ...
    assert staging.name.startswith(f".staging-{proc.pid}-")
    result = subprocess.run([sys.executable, "-m", "common.datasets", "hopper-medium-v2"], cwd=REPO,
                            env=cli_env(caches), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert not staging.exists()  # ... does not survive the next start
    assert not (caches / "minari" / "generated" / "hopper" / "random-6000-v2").exists()


def test_ctrl_c_during_generation_ends_cleanly_and_caches_nothing(caches):
    proc = start_generation(caches, 6000)
    wait_for_staging(proc, caches)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted (Ctrl-C) while generating 'hopper-random-v2': nothing was cached" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not list((caches / "minari").glob(".staging*"))
    assert not (caches / "minari" / "generated" / "hopper" / "random-6000-v2").exists()



def test_ctrl_c_inside_a_finaliser_during_the_write_still_interrupts(caches, monkeypatch):
    """Python drops a KeyboardInterrupt raised inside a finaliser ("Exception ignored"); a Ctrl-C landing there
    during the write must still stop the generation, and nothing may be cached."""
    import minari

    create = minari.create_dataset_from_buffers

    def create_with_ctrl_c_in_a_finaliser(dataset_id, buffers, **kwargs):
        def episodes():
            for i, buffer in enumerate(buffers):
                if i == 3:
                    PressCtrlCWhenFinalised()  # freed at once: the signal arrives inside __del__
                yield buffer
        return create(dataset_id, episodes(), **kwargs)

    monkeypatch.setattr(minari, "create_dataset_from_buffers", create_with_ctrl_c_in_a_finaliser)
    with pytest.raises(DatasetInterrupted, match="Interrupted .Ctrl-C. while generating 'hopper-random-v2': nothing "
                                                 "was cached"):
        load_dataset("hopper-random-v2", generate_steps=GEN_STEPS, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the block restored Python's handler
    assert not list((caches / "minari").glob(".staging*"))
    assert not (caches / "minari" / "generated" / "hopper" / f"random-{GEN_STEPS}-v2").exists()
