"""common/evaluation.py: lockstep vector rollouts, fixed seeds, recording, normalised scores."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from common.evaluation import evaluate, make_vector_env, rollout


class ConstantPolicy:
    """Acts `value` everywhere; records what rollout tells it (the Policy protocol)."""

    def __init__(self, value: float, act_dim: int):
        self.value, self.act_dim, self.rewards = value, act_dim, []

    def reset(self, obs):
        self.n = obs.shape[0]

    def act(self, obs):
        return np.full((obs.shape[0], self.act_dim), self.value, np.float32)

    def observe(self, rewards):
        self.rewards.append(rewards.copy())


class RandomPolicy(ConstantPolicy):
    def __init__(self, act_dim, seed):
        super().__init__(0.0, act_dim)
        self.rng = np.random.default_rng(seed)

    def act(self, obs):
        return self.rng.uniform(-1, 1, (obs.shape[0], self.act_dim)).astype(np.float32)


def test_toy_rollout_returns_reward_of_the_action():
    envs = make_vector_env(lambda: gym.make("toy-vitamin-v0"), 3)
    result = rollout(envs, ConstantPolicy(0.0, 1), seeds=[0, 1, 2], record=True)
    np.testing.assert_allclose(result.returns, [1.0, 1.0, 1.0])  # the hidden peak r(0) = 1
    np.testing.assert_array_equal(result.lengths, [1, 1, 1])
    ep = result.episodes[0]
    assert ep.terminals.tolist() == [True] and ep.truncations.tolist() == [False]
    assert ep.actions.shape == (1, 1) and ep.observations.shape == (1, 1)


def test_normalized_score_and_summary_keys():
    envs = make_vector_env(lambda: gym.make("toy-vitamin-v0"), 2)
    metrics = evaluate(envs, ConstantPolicy(-1.0, 1), [0, 1], normalize=lambda r: 100 * (r - (-1.0)) / 2.0)
    assert metrics["eval/return_mean"] == 0.0  # r(−1) = 0
    assert metrics["eval/normalized_score_mean"] == 50.0
    assert set(metrics) >= {"eval/return_mean", "eval/return_std", "eval/normalized_score_mean",
                            "eval/normalized_score_std", "eval/length_mean"}


def test_hopper_rollouts_are_reproducible_with_fixed_seeds_and_record_transitions():
    envs = make_vector_env(lambda: gym.make("Hopper-v5"), 4)
    first = rollout(envs, RandomPolicy(3, seed=0), seeds=[10, 11, 12, 13], record=True)
    second = rollout(envs, RandomPolicy(3, seed=0), seeds=[10, 11, 12, 13], record=True)
    np.testing.assert_array_equal(first.returns, second.returns)
    np.testing.assert_array_equal(first.lengths, second.lengths)
    assert len(set(first.lengths.tolist())) > 1  # different episodes end at different times
    for ep, length, ret in zip(first.episodes, first.lengths, first.returns, strict=True):
        assert len(ep.rewards) == length and abs(ep.rewards.sum() - ret) < 1e-3
        np.testing.assert_array_equal(ep.observations[1:], ep.next_observations[:-1])  # contiguous
        assert ep.terminals[-1] and not ep.terminals[:-1].any()  # random Hopper falls over
    # finished slots are ignored: no reward after an episode's end leaks into its return
    assert first.steps == int(first.lengths.sum())


def test_max_steps_cut_is_a_truncation_not_a_terminal():
    envs = make_vector_env(lambda: gym.make("Hopper-v5"), 2)
    result = rollout(envs, ConstantPolicy(0.0, 3), seeds=[0, 1], max_steps=5, record=True)
    np.testing.assert_array_equal(result.lengths, [5, 5])  # zero action: Hopper stands for > 5 steps
    for ep in result.episodes:
        assert ep.truncations[-1] and not ep.terminals.any()
