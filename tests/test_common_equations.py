"""What the shared helpers in common/ MEAN, checked by hand computations on tiny inputs.

- common/evaluation.py: every place an episode ends in `rollout` (termination, the env's time limit,
  `max_steps`), the terminal / truncation flags recorded per step, finished slots ignored, the seed of each
  slot, and the statistics `evaluate` reports.
- common/datasets.py: D4RL's reference scores of every family (D4RL `infos.py`), the normalised score
  100 * (R - min) / (max - min), the episode splitting of D4RL files (terminals vs timeouts, v0 files cut every
  `max_episode_steps` counted from the last episode end) and of Minari files (T+1 observations, an end without
  any flag is a truncation).
- common/benchmark.py: every value a sweep passes (flags, seeds, env ids, variants, threads, workers, Slurm
  resources) reaches the command or the executor; which run folder a cell resumes or counts as done.
- common/report.py: which evaluations form a curve and its x axis, which runs are grouped and compared,
  when two IQM intervals count as a difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from common import benchmark, datasets, report
from common.evaluation import evaluate, rollout

# ---------------------------------------------------------------------------------------------------------
# common/evaluation.py
# ---------------------------------------------------------------------------------------------------------


class CountEnv(gym.Env):
    """obs = [start, t] where `start` is drawn from the reset seed; the step-t reward is t + 100 * action;
    terminates at step `term_at`. A TimeLimit around it truncates."""

    def __init__(self, term_at: int = 10**6):
        self.term_at = term_at
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.start, self.t = float(self.np_random.uniform()), 0
        return np.array([self.start, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        reward = self.t + 100.0 * float(np.asarray(action).reshape(-1)[0])
        return np.array([self.start, self.t], np.float32), reward, self.t >= self.term_at, False, {}


def count_envs(*slots: tuple[int, int]) -> gym.vector.SyncVectorEnv:
    """One slot per (term_at, time_limit)."""
    return gym.vector.SyncVectorEnv(
        [lambda term_at=term_at, limit=limit: gym.wrappers.TimeLimit(CountEnv(term_at), limit)
         for term_at, limit in slots])


class RecordingPolicy:
    """Acts 0 (or `action`); records every observation batch and reward batch; refuses to run forever."""

    def __init__(self, action: float = 0.0, max_calls: int = 40):
        self.action, self.max_calls, self.seen, self.rewards, self.first = action, max_calls, [], [], None

    def reset(self, obs):
        self.first = obs.copy()

    def act(self, obs):
        assert len(self.seen) < self.max_calls, "rollout did not stop: an episode end was missed"
        self.seen.append(obs.copy())
        return np.full((obs.shape[0], 1), self.action, np.float32)

    def observe(self, rewards):
        self.rewards.append(rewards.copy())


def test_rollout_ends_each_slot_at_termination_or_the_env_time_limit_and_ignores_finished_slots():
    """ODT arXiv 2202.05607 §4 (online rollouts): an episode ends at a termination or at the env's time limit
    (a truncation). Slot 0 terminates at step 2, slot 1 is cut by its TimeLimit at step 4, slot 2 terminates at
    step 3 where its TimeLimit also fires. Returns sum t over each slot's own steps (1+2, 1+..+4, 1+2+3); steps of a
    finished slot (its autoreset, its next episode) never count. A terminal step is never marked truncated; the
    cut episode's last step is."""
    policy = RecordingPolicy()
    result = rollout(count_envs((2, 100), (10**6, 4), (3, 3)), policy, seeds=[0, 1, 2], record=True)
    assert len(policy.seen) == 4  # lockstep until the longest slot ends, not a step more
    np.testing.assert_array_equal(result.lengths, [2, 4, 3])
    np.testing.assert_array_equal(result.returns, [3.0, 10.0, 6.0])
    assert result.steps == 9
    ep0, ep1, ep2 = result.episodes
    assert ep0.terminals.tolist() == [False, True] and ep0.truncations.tolist() == [False, False]
    assert ep1.terminals.tolist() == [False] * 4 and ep1.truncations.tolist() == [False, False, False, True]
    assert ep2.terminals.tolist() == [False, False, True] and ep2.truncations.tolist() == [False, False, False]
    np.testing.assert_array_equal(ep1.rewards, [1, 2, 3, 4])


def test_rollout_max_steps_cuts_as_a_truncation_but_a_terminal_at_the_cut_stays_terminal():
    """`max_steps` ends every slot after that many steps as a truncation (bootstrap through it, ODT+TD3
    arXiv 2410.24108 §4); a slot that ended earlier keeps its own length; a slot that terminates exactly at the
    cut is terminal, not truncated."""
    policy = RecordingPolicy()
    result = rollout(count_envs((2, 100), (10**6, 100), (3, 100)), policy, seeds=[0, 1, 2], max_steps=3,
                     record=True)
    assert len(policy.seen) == 3
    np.testing.assert_array_equal(result.lengths, [2, 3, 3])
    np.testing.assert_array_equal(result.returns, [3.0, 6.0, 6.0])
    ep0, ep1, ep2 = result.episodes
    assert ep0.terminals.tolist() == [False, True] and not ep0.truncations.any()
    assert not ep1.terminals.any() and ep1.truncations.tolist() == [False, False, True]
    assert ep2.terminals.tolist() == [False, False, True] and not ep2.truncations.any()
    # max_steps = 1: one step each, every slot cut (none terminates at step 1)
    one = rollout(count_envs((2, 100), (5, 100)), RecordingPolicy(), seeds=[0, 1], max_steps=1, record=True)
    np.testing.assert_array_equal(one.lengths, [1, 1])
    assert all(e.truncations.tolist() == [True] and e.terminals.tolist() == [False] for e in one.episodes)


def test_rollout_records_aligned_transitions_and_the_policy_sees_the_current_observation():
    """Each recorded step t holds (s_t, a_t, r_t, s_{t+1}); the policy acts on s_t and is told r_t."""
    policy = RecordingPolicy(action=0.5)
    result = rollout(count_envs((3, 100), (10**6, 2)), policy, seeds=[4, 5], record=True)
    ep0, ep1 = result.episodes
    np.testing.assert_array_equal(ep0.observations[:, 1], [0, 1, 2])
    np.testing.assert_array_equal(ep0.next_observations[:, 1], [1, 2, 3])
    np.testing.assert_array_equal(ep1.observations[:, 1], [0, 1])
    np.testing.assert_array_equal(ep1.next_observations[:, 1], [1, 2])
    np.testing.assert_allclose(ep0.actions, np.full((3, 1), 0.5))
    np.testing.assert_allclose(ep0.rewards, [51, 52, 53])
    np.testing.assert_allclose(result.returns, [156.0, 103.0])
    assert [obs[0, 1] for obs in policy.seen] == [0, 1, 2]  # the policy always acts on the newest observation
    np.testing.assert_allclose(np.stack(policy.rewards)[:, 0], [51, 52, 53])
    np.testing.assert_array_equal(policy.first[:, 1], [0, 0])


def test_rollout_resets_slot_i_with_seeds_i():
    """Fixed evaluation seeds: slot i starts from env.reset(seed=seeds[i]), whatever the other seeds are."""
    def start(seed):
        return CountEnv().reset(seed=seed)[0][0]

    policy = RecordingPolicy()
    rollout(count_envs((1, 5), (1, 5), (1, 5)), policy, seeds=[11, 3, 11])
    np.testing.assert_allclose(policy.first[:, 0], [start(11), start(3), start(11)], rtol=1e-6)
    assert start(11) != start(3) and start(12) != start(3)


def test_evaluate_reports_mean_and_population_std_of_returns_scores_and_lengths():
    """`evaluate`: one episode per slot; the normaliser maps each return to a score; means and (population)
    standard deviations over the episodes, the mean length."""
    seen = []

    def normalize(returns):
        seen.append(np.array(returns))
        return 2.0 * np.asarray(returns) + 1.0

    metrics = evaluate(count_envs((2, 100), (10**6, 4), (3, 3)), RecordingPolicy(), [0, 1, 2], normalize)
    returns = np.array([3.0, 10.0, 6.0])
    np.testing.assert_array_equal(seen[0], returns)
    assert metrics == pytest.approx({
        "eval/return_mean": returns.mean(), "eval/return_std": returns.std(),
        "eval/normalized_score_mean": (2 * returns + 1).mean(), "eval/normalized_score_std": (2 * returns).std(),
        "eval/length_mean": 3.0})


# ---------------------------------------------------------------------------------------------------------
# common/datasets.py: reference scores and normalisation
# ---------------------------------------------------------------------------------------------------------
# D4RL infos.py REF_MIN_SCORE / REF_MAX_SCORE, copied independently of the code under test.
D4RL_REF = {
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
}


def expected_ref(env_id: str) -> tuple[float, float]:
    family = env_id.split("-")[0]
    if family == "maze2d":
        return D4RL_REF[env_id.rsplit("-v", 1)[0]]
    return D4RL_REF[family]


@pytest.mark.parametrize("env_id", [n for n in datasets.known_env_ids() if not n.startswith("toy")])
def test_every_d4rl_name_is_normalised_with_d4rl_s_reference_scores(env_id):
    """D4RL normalised score (Fu et al. 2020, infos.py): every family's (and maze2d task's) reference min and max;
    the name's family and kind select them (`_table_ref`), for every accepted D4RL-style name."""
    name = datasets._parse(env_id)
    assert datasets._table_ref(name.family, name.kind) == expected_ref(env_id)


def test_every_family_runs_on_its_own_environment():
    """Each D4RL family is played on its Gymnasium (v5 / gymnasium-robotics) counterpart; maze families come with
    their Minari port, which defines the env."""
    envs = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5",
            "pen": "AdroitHandPen-v1", "hammer": "AdroitHandHammer-v1", "door": "AdroitHandDoor-v1",
            "relocate": "AdroitHandRelocate-v1"}
    for env_id in datasets.known_env_ids():
        name = datasets._parse(env_id)
        if name.family in envs:
            assert name.gym_id == envs[name.family], env_id
        elif name.family in ("antmaze", "maze2d"):
            assert name.gym_id is None and name.minari_id.startswith(
                "D4RL/antmaze/" if name.family == "antmaze" else "D4RL/pointmaze/"), env_id
    assert datasets._parse("mujoco/walker2d/expert-v0").gym_id == "Walker2d-v5"
    assert datasets._parse("D4RL/hammer/cloned-v2").gym_id == "AdroitHandHammer-v1"


def test_minari_ids_and_toys_get_their_family_s_reference_scores():
    """A Minari id is normalised with its family's D4RL scores (pointmaze → maze2d task); a toy with its
    worst / best reachable reward."""
    for minari_id, family in [("mujoco/walker2d/medium-v0", "walker2d"), ("mujoco/halfcheetah/expert-v0",
                                                                         "halfcheetah"),
                              ("D4RL/door/human-v2", "door"), ("D4RL/antmaze/large-diverse-v1", "antmaze")]:
        name = datasets._parse(minari_id)
        assert datasets._table_ref(name.family, name.kind) == D4RL_REF[family], minari_id
    name = datasets._parse("D4RL/pointmaze/medium-dense-v2")
    assert datasets._table_ref(name.family, name.kind) == D4RL_REF["maze2d-medium-dense"]
    assert datasets._table_ref("toy-vitamin", "toy") == (-1.0, 1.0)
    assert datasets._table_ref("toy-ag", "toy") == (0.0, 1.0)
    assert datasets._table_ref("other", "x") == (None, None)


def test_normalized_score_is_100_times_return_minus_min_over_range():
    """normalised score = 100 * (R - min) / (max - min): 0 at min, 100 at max, linear in between and beyond."""
    data = datasets.OfflineData("x", "Hopper-v5", "hopper", "medium", [], np.zeros(1, np.float32),
                                np.ones(1, np.float32), 2.0, 12.0, "test")
    np.testing.assert_allclose(data.normalized_score([2.0, 12.0, 7.0, -3.0, 22.0]), [0, 100, 50, -50, 200])
    lo, hi = D4RL_REF["walker2d"]
    data.ref_min_score, data.ref_max_score = lo, hi
    np.testing.assert_allclose(data.normalized_score(1000.0), 100 * (1000.0 - lo) / (hi - lo))


def test_state_statistics_cover_the_used_steps_and_std_has_a_floor(tmp_path, monkeypatch):
    """State normalisation (ODT arXiv 2202.05607 §4, algorithms notes): mean and std over every observation of
    the loaded episodes (the dropped incomplete remainder excluded), std + 1e-6 so a constant feature divides by
    1e-6, not by 0."""
    for key, sub in (("MINARI_DATASETS_PATH", "m"), ("D4RL_DATASET_DIR", "d"), ("HOME", "h")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    n = 7
    obs = np.zeros((n, 11), np.float32)
    obs[:, 0] = [1, 2, 3, 4, 5, 100, 100]  # the last two rows are an incomplete remainder
    terminals = np.zeros(n, bool)
    terminals[[1, 4]] = True
    path = write_h5(tmp_path / "f.hdf5", observations=obs, actions=np.zeros((n, 3), np.float32),
                    rewards=np.zeros(n, np.float32), terminals=terminals, timeouts=np.zeros(n, bool))
    data = datasets.load_dataset("hopper-medium-v2", dataset_path=str(path), progress=False)
    assert data.state_mean[0] == pytest.approx(3.0) and data.state_std[0] == pytest.approx(np.sqrt(2.0) + 1e-6)
    np.testing.assert_array_equal(data.state_mean[1:], 0.0)
    np.testing.assert_allclose(data.state_std[1:], 1e-6, rtol=1e-6)


def test_reference_scores_stored_with_a_dataset_win_over_the_family_table(tmp_path, monkeypatch):
    """A dataset that stores both reference scores (a Minari dataset's metadata) is normalised with them; with
    none or only one stored, the family's D4RL scores apply."""
    for key, sub in (("MINARI_DATASETS_PATH", "m"), ("D4RL_DATASET_DIR", "d"), ("HOME", "h")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    for i, (meta, expected) in enumerate([({"ref_min_score": 5.0, "ref_max_score": 15.0}, (5.0, 15.0)),
                                          ({}, D4RL_REF["hopper"]),
                                          ({"ref_max_score": 15.0}, D4RL_REF["hopper"])]):
        ep = {"observations": np.zeros((4, 11), np.float32), "actions": np.zeros((3, 3), np.float32),
              "rewards": np.ones(3), "terminations": np.array([False, False, True]), "truncations": np.zeros(3, bool)}
        folder = write_minari(tmp_path / f"ds{i}", [ep])
        meta_path = folder / "data" / "metadata.json"
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **meta}))
        data = datasets.load_dataset("mujoco/hopper/medium-v0", dataset_path=str(folder), progress=False)
        assert (data.ref_min_score, data.ref_max_score) == expected, meta
        assert data.normalized_score(expected[1]) == pytest.approx(100.0)


def test_toy_dataset_draws_from_the_seed_it_is_given():
    """The toy offline data is drawn from the run's seed (load_dataset(seed=...)), like every seed stream."""
    from common.toys import toy_offline_actions

    for env_id in ("toy-ag-v0", "toy-vitamin-v0"):
        data = datasets.load_dataset(env_id, seed=7)
        np.testing.assert_array_equal(np.concatenate([e.actions for e in data.episodes]),
                                      toy_offline_actions(env_id, seed=7))
        assert not np.array_equal(data.episodes[0].actions, datasets.load_dataset(env_id, seed=8).episodes[0].actions)


def test_toy_envs_clip_actions_to_both_bounds_and_their_data_lies_where_the_papers_put_it():
    """Toys (ODT+TD3 arXiv 2410.24108 §3.1, AG arXiv 2510.05285 §3.1): an action outside [-1, 1] is clipped to
    the nearer bound before the reward; vitamin data: 100 actions in [-1, -0.95] then 28 in [0.5, 1]; AG data:
    64 in [0.5, 1] then 64 in [-1, -0.8]."""
    from common.toys import toy_offline_actions, vitamin_reward

    for env_id, low_r, high_r in (("toy-vitamin-v0", 0.0, -1.0), ("toy-ag-v0", 0.0, 0.0)):
        env = gym.make(env_id)
        env.reset(seed=0)
        assert env.step(np.array([-3.0], np.float32))[1] == pytest.approx(low_r), env_id
        env.reset(seed=0)
        assert env.step(np.array([3.0], np.float32))[1] == pytest.approx(high_r), env_id
        env.close()
    np.testing.assert_allclose(vitamin_reward([-1.0, -0.5, 0.0, 0.25, 1.0]), [0.0, 0.25, 1.0, 0.5, -1.0])
    v = toy_offline_actions("toy-vitamin-v0", seed=3)[:, 0]
    assert v.shape == (128,) and (v[:100] >= -1).all() and (v[:100] <= -0.95).all()
    assert (v[100:] >= 0.5).all() and (v[100:] <= 1).all()
    a = toy_offline_actions("toy-ag-v0", seed=3)[:, 0]
    assert (a[:64] >= 0.5).all() and (a[:64] <= 1).all() and (a[64:] >= -1).all() and (a[64:] <= -0.8).all()
    assert a[:64].min() < 0.55 and a[64:].max() > -0.85  # uniform over the whole ranges
    assert not np.array_equal(a, toy_offline_actions("toy-ag-v0", seed=4)[:, 0])


# ---------------------------------------------------------------------------------------------------------
# common/datasets.py: episode splitting of D4RL and Minari files
# ---------------------------------------------------------------------------------------------------------
def write_h5(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def test_d4rl_v0_split_counts_max_episode_steps_from_the_last_terminal(tmp_path):
    """D4RL's sequence_dataset for files without `timeouts`: an episode also ends after `max_episode_steps`
    steps counted from the previous episode end, a terminal included. Terminal at row 299 → episodes of 300
    (terminal), 1000 and 1000 (both truncated), and the 5-row remainder is dropped."""
    n = 2305
    terminals = np.zeros(n, bool)
    terminals[299] = True
    path = write_h5(tmp_path / "v0.hdf5", observations=np.arange(n, dtype=np.float32)[:, None].repeat(2, 1),
                    actions=np.zeros((n, 1), np.float32), rewards=np.ones(n, np.float32), terminals=terminals)
    episodes = datasets._read_d4rl(path, 1000)
    assert [len(e.rewards) for e in episodes] == [300, 1000, 1000]
    assert episodes[0].terminals[-1] and not episodes[0].truncations.any()
    for e in episodes[1:]:
        assert not e.terminals.any() and e.truncations.tolist() == [False] * 999 + [True]
    assert episodes[1].observations[0, 0] == 300 and episodes[2].observations[-1, 0] == 2299
    # without next_observations: the successor inside an episode, the last step repeats its own observation
    np.testing.assert_array_equal(episodes[1].next_observations[:3, 0], [301, 302, 303])
    assert episodes[1].next_observations[-1, 0] == 1299 and episodes[0].next_observations[-1, 0] == 299


def test_d4rl_timeout_on_a_terminal_step_is_a_termination(tmp_path):
    """A step flagged both terminal and timeout ended by termination (no bootstrap); a timeout alone is a
    truncation; every flag ends an episode."""
    n = 6
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[[1, 5]] = True
    timeouts[[3, 5]] = True
    path = write_h5(tmp_path / "t.hdf5", observations=np.zeros((n, 2), np.float32), actions=np.zeros((n, 1)),
                    rewards=np.arange(n, dtype=np.float32), terminals=terminals, timeouts=timeouts)
    episodes = datasets._read_d4rl(path, 1000)
    assert [e.rewards.tolist() for e in episodes] == [[0, 1], [2, 3], [4, 5]]
    assert [(bool(e.terminals[-1]), bool(e.truncations[-1])) for e in episodes] == [(True, False), (False, True),
                                                                                     (True, False)]


def write_minari(folder: Path, episodes: list[dict]) -> Path:
    data = folder / "data"
    data.mkdir(parents=True)
    (data / "metadata.json").write_text(json.dumps({"dataset_id": "test/x-v0", "total_episodes": len(episodes),
                                                    "data_format": "hdf5"}))
    with h5py.File(data / "main_data.hdf5", "w") as f:
        for i, ep in enumerate(episodes):
            for key, value in ep.items():
                f.create_dataset(f"episode_{i}/{key}", data=value)
    return folder


def minari_episode(t: int, start: float, term: bool, trunc: bool) -> dict:
    flags = np.zeros(t, bool)
    return {"observations": (start + np.arange(t + 1, dtype=np.float32))[:, None],
            "actions": np.full((t, 1), 0.25, np.float32), "rewards": start + np.arange(t, dtype=np.float64),
            "terminations": np.where(np.arange(t) == t - 1, term, flags),
            "truncations": np.where(np.arange(t) == t - 1, trunc, flags)}


def test_minari_episodes_next_observations_and_an_unflagged_end_is_a_truncation(tmp_path):
    """Minari stores T+1 observations per episode: s'_t = s_{t+1}, the last one included; the flags are kept;
    an episode whose last step has neither flag (collection stopped) is a truncation. The derived float32
    cache gives the same episodes."""
    folder = write_minari(tmp_path / "ds", [minari_episode(3, 0.0, True, False), minari_episode(2, 10.0, False, False),
                                            minari_episode(2, 20.0, False, True)])
    for attempt in range(2):
        episodes, _, save = datasets._read_minari(folder, progress=False)
        assert [len(e.rewards) for e in episodes] == [3, 2, 2]
        np.testing.assert_array_equal(episodes[0].observations[:, 0], [0, 1, 2])
        np.testing.assert_array_equal(episodes[0].next_observations[:, 0], [1, 2, 3])
        np.testing.assert_array_equal(episodes[1].observations[:, 0], [10, 11])
        np.testing.assert_array_equal(episodes[1].next_observations[:, 0], [11, 12])
        np.testing.assert_array_equal(episodes[2].next_observations[:, 0], [21, 22])
        np.testing.assert_array_equal(episodes[2].rewards, [20, 21])
        assert [e.terminals.tolist() for e in episodes] == [[False, False, True], [False, False], [False, False]]
        assert [e.truncations.tolist() for e in episodes] == [[False, False, False], [False, True], [False, True]]
        if attempt == 0:
            assert save is not None
            save()
        else:
            assert save is None  # read from the cache written the first time
    # the data file is rewritten (same size, new values): the derived cache is stale and is not used
    with h5py.File(folder / "data" / "main_data.hdf5", "r+") as f:
        f["episode_1/rewards"][...] = [7.0, 8.0]
    os.utime(folder / "data" / "main_data.hdf5", ns=(1, 10**18))
    episodes, _, save = datasets._read_minari(folder, progress=False)
    np.testing.assert_array_equal(episodes[1].rewards, [7.0, 8.0])
    assert save is not None


def test_resumed_download_must_continue_exactly_where_the_part_file_ends():
    """Resuming a D4RL download with an HTTP Range request: a 206 answer counts only when its Content-Range
    starts at the bytes already kept (else the file would be spliced wrongly); a 200 answer is the whole file
    again from byte 0."""
    def response(status, **headers):
        return types.SimpleNamespace(status=status, headers=headers)

    assert datasets._start_and_total(response(206, **{"Content-Range": "bytes 100-199/200"}), 100) == (100, 200)
    assert datasets._start_and_total(response(206, **{"Content-Range": "bytes 100-199/*"}), 100) == (100, None)
    with pytest.raises(datasets._Stop):
        datasets._start_and_total(response(206, **{"Content-Range": "bytes 50-199/200"}), 100)
    assert datasets._start_and_total(response(200, **{"Content-Length": "200"}), 100) == (0, 200)
    assert datasets._start_and_total(response(200), 100) == (0, None)


# ---------------------------------------------------------------------------------------------------------
# common/benchmark.py
# ---------------------------------------------------------------------------------------------------------
SWEEP = """
seeds = [1, 2]
flags = "--no-progress"
[experiments.a]
env_ids = ["toy-vitamin-v0", "mujoco/hopper/medium-v0"]
flags = "--embed-dim 16"
[experiments.a.variants]
odt = "odt.py"
odt_big = "odt.py --embed-dim 64"
[experiments.b]
env_ids = ["toy-ag-v0"]
seeds = [3]
flags = ["--alpha", "0.5"]
[experiments.b.variants]
rf = "reinformer_ag.py --lr 1e-4"
"""


def test_every_sweep_value_reaches_the_command(tmp_path):
    """The sweep file's grid: every env id × seed × variant is one run whose command carries the script, its
    env id, seed and variant name (--exp-name), then the sweep's, the experiment's and the variant's flags in
    that order (later flags win); an experiment's own seeds replace the sweep's."""
    (tmp_path / "s.toml").write_text(SWEEP)
    runs = benchmark.load_sweep(tmp_path / "s.toml").runs
    cells = {(r.experiment, r.variant, r.script, r.env_id, r.seed) for r in runs}
    assert len(runs) == len(cells) == 2 * 2 * 2 + 1
    assert cells == {("a", v, "odt.py", e, s) for v in ("odt", "odt_big") for e in ("toy-vitamin-v0",
                     "mujoco/hopper/medium-v0") for s in (1, 2)} | {("b", "rf", "reinformer_ag.py", "toy-ag-v0", 3)}
    by = {(r.variant, r.env_id, r.seed): r for r in runs}
    cmd = by[("odt_big", "mujoco/hopper/medium-v0", 2)].command("py", Path("/s"))
    assert cmd == ["py", "/s/odt.py", "--env-id", "mujoco/hopper/medium-v0", "--seed", "2", "--exp-name", "odt_big",
                   "--no-progress", "--embed-dim", "16", "--embed-dim", "64"]
    assert by[("odt_big", "mujoco/hopper/medium-v0", 2)].name == "mujoco-hopper-medium-v0__odt_big__2"
    cmd = by[("rf", "toy-ag-v0", 3)].command("py", Path("/s"))
    assert cmd == ["py", "/s/reinformer_ag.py", "--env-id", "toy-ag-v0", "--seed", "3", "--exp-name", "rf",
                   "--no-progress", "--alpha", "0.5", "--lr", "1e-4"]
    resume = by[("rf", "toy-ag-v0", 3)].resume_command(Path("runs/x"), "py", Path("/s"))
    assert resume == ["py", "/s/reinformer_ag.py", "--resume", "runs/x", "--no-progress"]


def fake_run_folder(results: Path, run: benchmark.Run, stamp: int, *files: str) -> Path:
    folder = results / "runs" / f"{run.name}__{stamp}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("{}")
    return folder


def test_newest_attempt_wins_by_numeric_time_stamp(tmp_path):
    """A cell's finished run and the run it resumes are the NEWEST of its folders (unix time stamp compared as a
    number: 1000 is newer than 999); folders without checkpoint are removed before the resume."""
    run = benchmark.Run("e", "v", "odt.py", "toy-vitamin-v0", 1, ("--no-progress",))
    old = fake_run_folder(tmp_path, run, 999, "checkpoint.pt")
    new = fake_run_folder(tmp_path, run, 1000, "checkpoint.pt")
    empty = fake_run_folder(tmp_path, run, 1001)
    state = benchmark.cell_state(tmp_path, run)
    assert (state.state, state.folder, state.stale) == ("stopped", new, [empty])
    assert benchmark.prepare(tmp_path, run, "py", Path("/s")) == ["py", "/s/odt.py", "--resume",
                                                                 str(new.relative_to(tmp_path)), "--no-progress"]
    assert old.exists() and new.exists() and not empty.exists()
    done_old = fake_run_folder(tmp_path, run, 998, "summary.json")
    done_new = fake_run_folder(tmp_path, run, 1002, "summary.json")
    assert benchmark.cell_state(tmp_path, run).folder == done_new and done_old.exists()
    assert benchmark.prepare(tmp_path, run) is None


def test_finish_records_done_stopped_and_failed_by_exit_status(tmp_path):
    """Exit statuses: 0 with a summary.json → done; 3 (SIGTERM checkpoint) → stopped, resumable; 0 with only a
    checkpoint → stopped; 2 → a configuration error, any other → a crash, both leave a .failed marker; 0 without
    any output → failed. The .running marker is always removed."""
    mk = lambda s: benchmark.Run("e", "v", "odt.py", "toy-vitamin-v0", s)  # noqa: E731
    (tmp_path / "logs").mkdir()
    cases = {1: (0, ["summary.json"], "done"), 2: (3, ["checkpoint.pt"], "stopped"), 3: (3, [], "stopped"),
             4: (0, ["checkpoint.pt"], "stopped"), 5: (2, [], "failed"), 6: (1, ["checkpoint.pt"], "failed"),
             7: (0, [], "failed"), 8: (-9, [], "failed")}
    for seed, (code, files, outcome) in cases.items():
        run = mk(seed)
        fake_run_folder(tmp_path, run, 100, *files)
        (tmp_path / "logs" / f"{run.name}.running").write_text("x:1")
        (tmp_path / "logs" / f"{run.name}.log").write_text("line 1\nlast line\n")
        assert benchmark.finish(tmp_path, run, code) == outcome, seed
        assert not (tmp_path / "logs" / f"{run.name}.running").exists()
        failed = tmp_path / "logs" / f"{run.name}.failed"
        assert failed.exists() == (outcome == "failed"), seed
    first = lambda s: (tmp_path / "logs" / f"{mk(s).name}.failed").read_text().splitlines()  # noqa: E731
    assert first(5)[0] == "configuration error (exit 2)" and first(5)[-1] == "last line"
    assert first(6)[0] == "crashed (exit status 1)" and first(8)[0] == "crashed (exit status -9)"
    assert first(7)[0] == "exited 0 without writing summary.json"
    assert benchmark.cell_state(tmp_path, mk(6)).state == "failed"
    assert benchmark.cell_state(tmp_path, mk(2)).state == "stopped"


def test_compact_drops_weights_of_finished_runs_only(tmp_path):
    """--compact: a finished run (summary.json) loses checkpoint.pt and model.pt; an unfinished one keeps its
    checkpoint (it is what a resume needs)."""
    run = benchmark.Run("e", "v", "odt.py", "toy-vitamin-v0", 1)
    done = fake_run_folder(tmp_path, run, 1, "summary.json", "checkpoint.pt", "model.pt", "metrics.jsonl")
    stopped = fake_run_folder(tmp_path, run, 2, "checkpoint.pt", "model.pt")
    benchmark.compact_run(done)
    benchmark.compact_run(stopped)
    benchmark.compact_run(None)
    assert sorted(p.name for p in done.iterdir()) == ["metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in stopped.iterdir()) == ["checkpoint.pt", "model.pt"]


FAKE_SCRIPT = r"""
import json, os, sys, time
args = sys.argv[1:]
if "--resume" in args:
    folder = args[args.index("--resume") + 1]
else:
    get = lambda k: args[args.index(k) + 1]
    folder = f"runs/{get('--env-id').replace('/', '-')}__{get('--exp-name')}__{get('--seed')}__{time.time_ns()}"
    os.makedirs(folder)
with open(os.path.join(folder, "calls.jsonl"), "a") as fh:
    fh.write(json.dumps({"argv": args, "threads": os.environ.get("OMP_NUM_THREADS"), "cwd": os.getcwd()}) + "\n")
open(os.path.join(folder, "checkpoint.pt"), "w").close()
open(os.path.join(folder, "model.pt"), "w").close()
if "--fail" in args:
    sys.exit(1)
open(os.path.join(folder, "summary.json"), "w").write("{}")
"""


def test_run_local_launches_pending_resumes_stopped_skips_done_with_its_threads(tmp_path):
    """The local backend: pending cells start fresh with their full command in the results folder, a stopped
    cell continues with --resume <its folder>, a done cell is not started again; every child gets
    OMP_NUM_THREADS = --threads-per-run; --compact drops the weights of what finished; a crash is reported."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fake.py").write_text(FAKE_SCRIPT)
    res = tmp_path / "res"
    mk = lambda s, *f: benchmark.Run("e", "v", "fake.py", "mujoco/hopper/medium-v0", s, ("--x", "1", *f))  # noqa: E731
    pending, stopped, done, crash = mk(1), mk(2), mk(3), mk(4, "--fail")
    ckpt = fake_run_folder(res, stopped, 100, "checkpoint.pt")
    finished = fake_run_folder(res, done, 100, "summary.json")
    out = open(os.devnull, "w")  # noqa: SIM115
    try:
        rc = benchmark.run_local(res, [pending, stopped, done, crash], workers=1, threads=3,
                                 python=sys.executable, scripts_dir=scripts, compact=True, out=out)
    finally:
        out.close()
    assert rc == 1  # one crash
    calls = {}
    for f in sorted((res / "runs").glob("*/calls.jsonl")):
        calls[f.parent.name.split("__")[2]] = [json.loads(line) for line in f.read_text().splitlines()]
    assert sorted(calls) == ["1", "2", "4"]  # the done cell was not started
    assert calls["1"][0]["argv"] == ["--env-id", "mujoco/hopper/medium-v0", "--seed", "1", "--exp-name", "v",
                                     "--x", "1"]
    assert calls["2"][0]["argv"] == ["--resume", str(ckpt.relative_to(res))]
    assert all(c[0]["threads"] == "3" and Path(c[0]["cwd"]).resolve() == res.resolve() for c in calls.values())
    assert benchmark.cell_state(res, pending).state == "done" and benchmark.cell_state(res, stopped).state == "done"
    assert benchmark.cell_state(res, crash).state == "failed" and not (finished / "calls.jsonl").exists()
    first = benchmark.cell_state(res, pending).folder
    assert not (first / "checkpoint.pt").exists() and not (first / "model.pt").exists()  # compacted
    assert (benchmark.cell_state(res, crash).folder / "checkpoint.pt").exists()  # unfinished: kept


def test_main_passes_workers_threads_and_compact_to_the_local_backend(tmp_path, monkeypatch):
    """`python -m common.benchmark`: --workers, --threads-per-run and --compact reach the local runner; the
    default is 1 thread per run and CPU cores / threads workers; the sweep file is copied next to the results
    (the report groups by it)."""
    toys = SWEEP.replace("mujoco/hopper/medium-v0", "toy-ag-v0")  # data every machine has
    (tmp_path / "s.toml").write_text(toys)
    calls = []
    monkeypatch.setattr(benchmark, "run_local", lambda results, runs, workers, threads, **kw: calls.append(
        (results, len(runs), workers, threads, kw)) or 0)
    assert benchmark.main([str(tmp_path / "s.toml"), "--results", str(tmp_path / "r"), "--workers", "3",
                           "--threads-per-run", "2", "--compact"]) == 0
    assert calls[-1] == ((tmp_path / "r").resolve(), 9, 3, 2, {"compact": True})
    assert (tmp_path / "r" / "sweep.toml").read_text() == toys
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert benchmark.main([str(tmp_path / "s.toml"), "--results", str(tmp_path / "r"), "--threads-per-run", "2"]) == 0
    assert calls[-1][2:] == (4, 2, {"compact": False})
    assert benchmark.main([str(tmp_path / "s.toml"), "--results", str(tmp_path / "r")]) == 0
    assert calls[-1][2:4] == (8, 1)
    # --cpus-per-task sizes Slurm tasks; locally it does not change the threads of a run
    assert benchmark.main([str(tmp_path / "s.toml"), "--results", str(tmp_path / "r"), "--cpus-per-task", "4"]) == 0
    assert calls[-1][2:4] == (8, 1)
    seen = []
    monkeypatch.setattr(benchmark, "run_submitit", lambda results, runs, args, *a, **k: seen.append(
        (len(runs), args.workers, args.threads_per_run)) or 0)
    assert benchmark.main([str(tmp_path / "s.toml"), "--results", str(tmp_path / "r"), "--backend",
                           "submitit-local", "--cpus-per-task", "4"]) == 0
    assert seen[-1] == (9, 9, 4)  # on Slurm: every run at once by default, threads = the task's CPUs
    assert benchmark.main([str(tmp_path / "s.toml"), "--results", str(tmp_path / "r"), "--backend",
                           "submitit-local", "--cpus-per-task", "4", "--threads-per-run", "2", "--workers", "3"]) == 0
    assert seen[-1] == (9, 3, 2)


def test_a_running_marker_counts_only_while_its_owner_lives_or_its_run_keeps_writing(tmp_path):
    """A cell is "running" (left alone) when its marker names a live process of this machine, or, for another
    machine, while its log / metrics changed within STALE_AFTER_S; a dead or silent owner frees the cell."""
    run = benchmark.Run("e", "v", "odt.py", "toy-vitamin-v0", 1)
    (tmp_path / "logs").mkdir()
    marker = tmp_path / "logs" / f"{run.name}.running"
    marker.write_text(f"{os.uname().nodename}:{os.getpid()}")
    assert benchmark.cell_state(tmp_path, run).state == "running"
    marker.write_text("some-other-node:123")
    assert benchmark.cell_state(tmp_path, run).state == "running"  # just written: alive
    old = marker.stat().st_mtime - benchmark.STALE_AFTER_S - 60
    os.utime(marker, (old, old))
    assert benchmark.cell_state(tmp_path, run).state == "pending"
    log = tmp_path / "logs" / f"{run.name}.log"
    log.write_text("still writing")
    assert benchmark.cell_state(tmp_path, run).state == "running"
    os.utime(log, (old, old))
    assert benchmark.cell_state(tmp_path, run).state == "pending"


def test_slurm_task_runs_the_cell_and_compacts_what_finished(tmp_path):
    """What one array task does: prepare the cell (fresh or --resume), run the script in the results folder with
    its threads, record the outcome; --compact drops the weights of a finished run; a crash raises."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fake.py").write_text(FAKE_SCRIPT)
    res = tmp_path / "res"
    res.mkdir()
    ok = benchmark.Run("e", "v", "fake.py", "toy-vitamin-v0", 1, ("--x", "1"))
    task = benchmark.SweepTask(str(res), 2, str(scripts), compact=True)
    assert task(ok) == f"{ok.name}: done"
    folder = benchmark.cell_state(res, ok).folder
    call = json.loads((folder / "calls.jsonl").read_text())
    assert call["argv"][-2:] == ["--x", "1"] and call["threads"] == "2"
    assert not (folder / "checkpoint.pt").exists() and (folder / "summary.json").exists()
    assert task(ok) == f"{ok.name}: already done"
    bad = benchmark.Run("e", "v", "fake.py", "toy-vitamin-v0", 2, ("--fail",))
    with pytest.raises(RuntimeError, match="crashed"):
        benchmark.SweepTask(str(res), 1, str(scripts), compact=True)(bad)
    assert (benchmark.cell_state(res, bad).folder / "checkpoint.pt").exists()


def slurm_args(**kw) -> argparse.Namespace:
    args = benchmark.build_parser().parse_args(["s.toml"])
    args.workers, args.threads_per_run = 4, 2
    for k, v in kw.items():
        setattr(args, k, v)
    return args


class FakeExecutor:
    def __init__(self, **kw):
        self.init, self.params, self.submitted = kw, {}, []

    def update_parameters(self, **kw):
        self.params.update(kw)

    def map_array(self, fn, items):
        self.submitted.append((fn, list(items)))
        return [types.SimpleNamespace(job_id=f"7_{i}") for i in range(len(items))]


@pytest.fixture
def fake_submitit(monkeypatch):
    made = []
    mod = types.ModuleType("submitit")
    mod.AutoExecutor = lambda **kw: made.append(FakeExecutor(kind="slurm", **kw)) or made[-1]
    mod.LocalExecutor = lambda **kw: made.append(FakeExecutor(kind="local", **kw)) or made[-1]
    monkeypatch.setitem(sys.modules, "submitit", mod)
    monkeypatch.setattr(benchmark.shutil, "which", lambda name: "/usr/bin/" + name)
    return made


def test_slurm_resources_reach_the_executor(tmp_path, fake_submitit):
    """--backend slurm: time limit (whole minutes, rounded up), CPUs per task (default = threads per run), memory,
    GPUs, partition / account / qos / constraint, setup lines, extra sbatch options, the USR2 delay and the array
    parallelism (= --workers) all reach submitit; the local executor gets the time limit and signal delay."""
    args = slurm_args(time="0:10:30", mem=16, gpus=1, partition="p", account="acc", qos="q", constraint="c",
                      setup=["source venv"], slurm_extra=["exclude=node3"], signal_delay=45, max_requeues=7)
    ex = benchmark.make_executor("slurm", tmp_path, args)
    assert ex.init == {"kind": "slurm", "folder": tmp_path / "submitit" / "%j", "cluster": "slurm",
                       "slurm_max_num_timeout": 7}
    assert ex.params.items() >= {"timeout_min": 11, "cpus_per_task": 2, "name": f"sweep-{tmp_path.name}",
                         "slurm_signal_delay_s": 45, "slurm_array_parallelism": 4, "mem_gb": 16, "gpus_per_node": 1,
                         "slurm_partition": "p", "slurm_account": "acc", "slurm_qos": "q", "slurm_constraint": "c",
                         "slurm_setup": ["source venv"], "slurm_additional_parameters": {"exclude": "node3"}}.items()
    assert benchmark.make_executor("slurm", tmp_path, slurm_args(cpus_per_task=6)).params["cpus_per_task"] == 6
    local = benchmark.make_executor("submitit-local", tmp_path, slurm_args(time="90", signal_delay=30, gpus=0))
    assert local.init["max_num_timeout"] == 20
    assert local.params.items() >= {"timeout_min": 90.0, "signal_delay_s": 30}.items()
    assert "gpus_per_node" not in local.params


def test_run_submitit_submits_unfinished_cells_with_their_threads(tmp_path, fake_submitit):
    """The Slurm path submits every cell that is not done (one array task each), and each task runs with
    threads = --threads-per-run, the --compact choice and a stop timeout of 2/3 of the signal delay."""
    done = benchmark.Run("e", "v", "odt.py", "toy-vitamin-v0", 1)
    todo = benchmark.Run("e", "v", "odt.py", "toy-vitamin-v0", 2)
    fake_run_folder(tmp_path, done, 1, "summary.json")
    args = slurm_args(backend="slurm", signal_delay=90, compact=True, threads_per_run=3, sweep="s.toml")
    out = open(os.devnull, "w")  # noqa: SIM115
    try:
        assert benchmark.run_submitit(tmp_path, [done, todo], args, out=out) == 0
    finally:
        out.close()
    (task, items), = fake_submitit[-1].submitted
    assert items == [todo]
    assert (task.results, task.threads, task.compact, task.stop_timeout_s) == (str(tmp_path), 3, True, 60.0)


# ---------------------------------------------------------------------------------------------------------
# common/report.py
# ---------------------------------------------------------------------------------------------------------
def metrics_file(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_curves_use_env_steps_online_and_gradient_updates_offline_keeping_the_last_eval_per_x(tmp_path):
    """Learning curves (report docstring): x = online env steps, or gradient updates when every row has 0 env
    steps; several evaluations at one x keep the last; plain-Reinformer rows (eval_rf/) form their own curve."""
    online = metrics_file(tmp_path / "on", [
        {"global_step": 5, "env_steps": 0, "eval/normalized_score_mean": 1.0},
        {"global_step": 9, "env_steps": 0, "eval/normalized_score_mean": 2.0},
        {"global_step": 12, "env_steps": 40, "eval/normalized_score_mean": 3.0, "eval_rf/normalized_score_mean": 7.0},
        {"global_step": 13, "env_steps": 40, "train/loss": 1.0}])
    curves, label = report._curves(online)
    assert label == "online env steps"
    np.testing.assert_array_equal(curves["eval/"][0], [0, 40])
    np.testing.assert_array_equal(curves["eval/"][1], [2.0, 3.0])
    np.testing.assert_array_equal(curves["eval_rf/"][1], [7.0])
    offline = metrics_file(tmp_path / "off", [
        {"global_step": 10, "env_steps": 0, "eval/normalized_score_mean": 1.0},
        {"global_step": 20, "env_steps": 0, "eval/normalized_score_mean": 4.0}])
    curves, label = report._curves(offline)
    assert label == "gradient updates"
    np.testing.assert_array_equal(curves["eval/"][0], [10, 20])
    assert "eval_rf/" not in curves


def row(label: str, scores, lo: float, hi: float) -> report.Row:
    return report.Row(label, label, "e", "eval/", [], np.asarray(scores, float), np.zeros(len(scores)), (lo + hi) / 2,
                      lo, hi)


def test_a_difference_needs_disjoint_intervals_and_two_seeds_each():
    """Two variants differ only when their 95 % IQM intervals do not overlap (better first); intervals that
    touch or overlap on either side do not; single-seed rows are never compared."""
    a, b = row("a", [1, 2], 10.0, 20.0), row("b", [1, 2], 21.0, 30.0)
    c, d = row("c", [1, 2], 15.0, 25.0), row("d", [1], 40.0, 50.0)
    e = row("e", [1, 2], 5.0, 9.0)
    pairs = [(x.label, y.label) for x, y in report.non_overlapping([a, b, c, d, e])]
    assert sorted(pairs) == sorted([("b", "a"), ("a", "e"), ("b", "e"), ("c", "e")])
    assert report.non_overlapping([a, row("f", [1, 2], 20.0, 22.0)]) == []  # touching: overlap
    # a point estimate above the other's interval is not enough: the intervals overlap
    assert report.non_overlapping([row("x", [1, 2], 10.0, 40.0), row("y", [1, 2], 5.0, 20.0)]) == []
    assert report.non_overlapping([row("y", [1, 2], 5.0, 20.0), row("x", [1, 2], 10.0, 40.0)]) == []


def test_only_finished_runs_are_grouped_and_only_bookkeeping_flags_are_neutral(tmp_path):
    """Groups are (variant, env id) over finished runs; runs of one group must agree on every argument except
    the seed and the flags that do not change what a run computes."""
    assert report.NEUTRAL_ARGS == {"seed", "resume", "progress", "track", "wandb_project_name", "wandb_entity",
                                   "capture_video", "save_model", "cuda", "dataset_path", "checkpoint_interval",
                                   "eval_only"}
    mk = lambda seed, env, summary, **a: report.RunResult(  # noqa: E731
        tmp_path / f"{env}{seed}", "odt.py", "v", env, seed, {"seed": seed, "lr": 1, **a}, summary)
    runs = [mk(1, "x", {"s": 1}), mk(2, "x", {"s": 1}, cuda=False), mk(3, "x", None, lr=5), mk(1, "y", {"s": 1})]
    groups = report.check_groups(runs)
    assert {k: [r.seed for r in v] for k, v in groups.items()} == {("v", "x"): [1, 2], ("v", "y"): [1]}
    with pytest.raises(report.ReportError, match="different settings"):
        report.check_groups([mk(1, "x", {"s": 1}), mk(2, "x", {"s": 1}, eval_episodes=10)])


def test_sections_follow_the_sweep_experiments_and_unnamed_variants_get_their_env_s_section():
    """With a sweep file, one table per experiment × env id holding the experiment's variants in its order;
    variants the sweep does not name go to a section of their env id; without it, one section per env id."""
    groups = {("b", "e1"): [], ("a", "e1"): [], ("z", "e1"): [], ("a", "e2"): [], ("c", "e1"): []}
    sweep = {"experiments": {"one": {"title": "T", "env_ids": ["e1", "e2"], "variants": {"b": "", "a": ""}},
                             "two": {"env_ids": ["e1"], "variants": {"c": ""}}}}
    got = [(key, cells) for key, _, _, cells in report.sections(groups, sweep)]
    assert got == [("one_e1", [("b", "e1"), ("a", "e1")]), ("one_e2", [("a", "e2")]), ("two_e1", [("c", "e1")]),
                   ("e1", [("z", "e1")])]
    got = [(key, cells) for key, _, _, cells in report.sections(groups, {})]
    assert got == [("e1", [("a", "e1"), ("b", "e1"), ("c", "e1"), ("z", "e1")]), ("e2", [("a", "e2")])]


def test_curve_plot_aggregates_runs_up_to_the_shortest_run_at_shared_points(tmp_path, monkeypatch):
    """The IQM curve is taken at evaluation points up to where the SHORTEST run ends, each run linearly
    interpolated there (no extrapolation beyond a run's last evaluation). Run 0's score equals its x, so its
    interpolated row is the grid itself."""
    pytest.importorskip("matplotlib")
    seen = []

    def fake_iqm_curve(ys, reps, seed):
        seen.append(ys)
        return ys.mean(0), ys.min(0), ys.max(0)

    monkeypatch.setattr(report, "iqm_curve", fake_iqm_curve)
    runs = [report.RunResult(tmp_path, "odt.py", "v", "e", s, {}, {}, {"eval/": (np.array(x, float),
                                                                               np.array(y, float))})
            for s, (x, y) in enumerate([([0, 10, 20], [0, 10, 20]), ([0, 5, 30], [0, 50, 60])])]
    r = report.Row("v", "v", "e", "eval/", runs, np.zeros(2), np.zeros(2))
    assert report.plot([r], "t", tmp_path / "c.png", 10, 0)
    xs = seen[0][0]
    assert xs[0] == 0 and xs[-1] == 20 and len(xs) >= 3 and (np.diff(xs) > 0).all()
    np.testing.assert_allclose(seen[0][1], np.interp(xs, [0, 5, 30], [0, 50, 60]))


def test_iqm_curve_trims_a_quarter_of_the_runs_on_each_side():
    """IQM (Agarwal et al. 2021, rliable aggregate_iqm): the mean of the middle 50 % of runs, per evaluation
    point. With 8 runs, 2 are cut on each side: one outlier of 8 does not move the IQM."""
    curves = np.array([[0.0, float(i)] for i in range(7)] + [[100.0, 7.0]])
    mid, _, _ = report.iqm_curve(curves, reps=50)
    np.testing.assert_allclose(mid, [0.0, 3.5])
    assert report.iqm(curves[:, 0]) == 0.0


def test_a_row_takes_score_and_return_of_its_own_metric_set(tmp_path):
    """Reinformer+AG runs log plain Reinformer as eval_rf/: its row reads eval_rf/ score AND return, the AG row
    eval/; runs are ordered by seed."""
    runs = [report.RunResult(tmp_path, "reinformer_ag.py", "rf", "e", s, {}, {
        "eval/normalized_score_mean": 90.0 + s, "eval/return_mean": 9.0 + s,
        "eval_rf/normalized_score_mean": 50.0 + s, "eval_rf/return_mean": 5.0 + s}) for s in (2, 1)]
    ag = report.make_row("rf", "e", "eval/", "", runs, 100, 0)
    rf = report.make_row("rf", "e", "eval_rf/", " [RF, no AG]", runs, 100, 0)
    assert ag.label == "rf" and rf.label == "rf [RF, no AG]"
    np.testing.assert_array_equal(ag.scores, [91.0, 92.0])
    np.testing.assert_array_equal(ag.returns, [10.0, 11.0])
    np.testing.assert_array_equal(rf.scores, [51.0, 52.0])
    np.testing.assert_array_equal(rf.returns, [6.0, 7.0])
    assert report.make_row("x", "e", "eval_rf/", "", [report.RunResult(tmp_path, "odt.py", "x", "e", 1, {}, {
        "eval/normalized_score_mean": 1.0})], 100, 0) is None  # no plain-RF numbers: no such row


def test_comparison_verdict_needs_an_interval_excluding_one_half_and_enough_seeds_on_both_sides():
    """rliable's probability of improvement (Agarwal et al. 2021): a pair gets a verdict only when the 95 %
    interval of P(X > Y) excludes ½ AND both sides have ≥ MIN_SEEDS seeds; a better point estimate with an
    interval containing ½ is inconclusive; rows of different metric sets (AG vs plain RF) are not paired unless
    claimed; with claims, only the claimed pairs are listed."""
    n = report.MIN_SEEDS
    mk = lambda label, scores, prefix="eval/": report.Row(  # noqa: E731
        label, label, "e", prefix, [], np.asarray(scores, float), np.zeros(len(scores)))
    hi = mk("hi", [10.0 + i for i in range(n)])
    lo = mk("lo", [0.0 + i for i in range(n)])
    close = mk("close", [0.5 + i for i in range(n)])  # P(close > lo) = 0.6, its interval holds ½
    few = mk("few", [0.0, 1.0, 2.0])
    lines = report.comparisons([hi, lo], None, 100, 0)
    assert len(lines) == 1 and lines[0].endswith(": `hi` better.") and f"({n} vs {n} seeds" in lines[0]
    line, = report.comparisons([close, lo], None, 100, 0)
    assert "P(`close` > `lo`) = 0.60" in line and "inconclusive" in line and "better" not in line
    line, = report.comparisons([lo, hi], None, 100, 0)
    assert line.endswith(": `hi` better.")
    line, = report.comparisons([hi, few], None, 100, 0)
    assert f"({n} vs 3 seeds" in line and "no verdict" in line and "better" not in line
    line, = report.comparisons([few, hi], None, 100, 0)
    assert f"(3 vs {n} seeds" in line and "no verdict" in line
    line, = report.comparisons([hi, mk("one", [1.0])], None, 100, 0)
    assert "too few seeds" in line
    assert report.comparisons([hi, mk("hi [RF, no AG]", [0.0] * n, "eval_rf/")], None, 100, 0) == []
    lines = report.comparisons([hi, lo, close], [["close", "hi"]], 100, 0)
    assert len(lines) == 1 and lines[0].startswith("- P(`close` > `hi`)") and lines[0].endswith(": `hi` better.")
