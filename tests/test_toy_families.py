"""The toy problems as families (common/toys.py): each instance's reward by hand at its peak, ends and kink, its
reference scores, where its data lies, the papers' instances unchanged, and instances reaching the scripts."""

from __future__ import annotations

import numpy as np
import pytest

from common.datasets import DatasetError, load_dataset
from common.toys import ToySpec, ag_reward, parse_toy, toy_offline_actions, vitamin_reward


def test_vitamin_instance_by_hand():
    """peak p = 0.4, offset c = 1: r(−1) = c, r(p) = c + 1, r(1) = c − 1; quadratic left, linear right."""
    spec = parse_toy("toy-vitamin-peak0.4-offset1-v0")
    assert spec == ToySpec("vitamin", 0.4, 1.0, 0.5)
    r = spec.reward(np.array([-1.0, -0.3, 0.4, 0.7, 1.0]))
    np.testing.assert_allclose(r, [1.0, 1.0 + (0.7 / 1.4) ** 2, 2.0, 2.0 - 2 * 0.3 / 0.6, 0.0])
    assert spec.ref_scores == (0.0, 2.0)
    grid = np.linspace(-1, 1, 2001)
    assert grid[np.argmax(spec.reward(grid))] == pytest.approx(0.4, abs=1e-3)  # the optimum moved


def test_ag_instance_by_hand():
    """peak p = −0.2, offset c = 0.5: r(p) = c + 1 and the far end (a = 1, distance 1 + |p|) has r = c."""
    spec = parse_toy("toy-ag-peak-0.2-offset0.5-v0")
    np.testing.assert_allclose(spec.reward(np.array([-0.2, 1.0, 0.4])), [1.5, 0.5, 1.5 - (0.6 / 1.2) ** 2])
    assert spec.ref_scores == (0.5, 1.5)


def test_the_papers_instances_are_unchanged():
    """Defaults give the papers' functions and the exact offline actions of before the families."""
    a = np.linspace(-1, 1, 11)
    np.testing.assert_array_equal(vitamin_reward(a), np.where(a < 0, (a + 1.0) ** 2, 1.0 - 2.0 * a))
    np.testing.assert_array_equal(ag_reward(a), 1.0 - a**2)
    rng = np.random.default_rng(7)
    old = np.concatenate([rng.uniform(-1.0, -0.95, 100), rng.uniform(0.5, 1.0, 28)]).astype(np.float32)
    np.testing.assert_array_equal(toy_offline_actions("toy-vitamin-v0", 7)[:, 0], old)
    rng = np.random.default_rng(7)
    old = np.concatenate([rng.uniform(0.5, 1.0, 64), rng.uniform(-1.0, -0.8, 64)]).astype(np.float32)
    np.testing.assert_array_equal(toy_offline_actions("toy-ag-v0", 7)[:, 0], old)


@pytest.mark.parametrize("env_id", ["toy-vitamin-peak0.4-gap0.3-v0", "toy-vitamin-peak-0.4-v0"])
def test_vitamin_data_lies_on_the_feet(env_id):
    """100 actions in the left 5 % of [−1, p], 28 from p + g(1 − p) to 1: none near the peak."""
    spec = parse_toy(env_id)
    a = toy_offline_actions(env_id, 3)[:, 0]
    left, right = a[:100], a[100:]
    assert left.min() >= -1 and left.max() <= -1 + 0.05 * (1 + spec.peak)
    assert right.min() >= spec.peak + spec.gap * (1 - spec.peak) - 1e-6 and right.max() <= 1
    assert np.abs(a - spec.peak).min() >= min(spec.gap * (1 - spec.peak), 0.95 * (1 + spec.peak)) - 1e-6


def test_ag_data_keeps_its_gap_on_one_side():
    """The nearest data lies g above the peak; the other cluster is farther, on the other side."""
    spec = parse_toy("toy-ag-peak0.2-gap0.6-v0")
    a = toy_offline_actions("toy-ag-peak0.2-gap0.6-v0", 0)[:, 0]
    near, far = a[:64], a[64:]
    assert near.min() >= 0.8 - 1e-6 and far.max() <= -1 + 0.2 * 1.2 + 1e-6
    assert np.abs(a - spec.peak).min() == pytest.approx(np.abs(near - spec.peak).min())


def test_instances_load_with_their_own_scores_and_env(data_env):
    """An instance is a dataset like any other: family toy-vitamin, its reference scores, an env whose reward at
    the peak is the best one (normalised score 100)."""
    data = load_dataset("toy-vitamin-peak0.4-offset1-v0", None)
    assert (data.family, data.dataset_kind, data.ref_min_score, data.ref_max_score) == ("toy-vitamin", "toy", 0.0, 2.0)
    env = data.make_env()
    env.reset(seed=0)
    _, reward, terminated, truncated, _ = env.step(np.array([0.4], np.float32))
    assert reward == pytest.approx(2.0, abs=1e-6)  # float32 action 0.4
    assert terminated  # (the 1-step TimeLimit also flags truncated; a terminal step is never "cut")
    assert data.normalized_score(np.array([reward]))[0] == pytest.approx(100.0, abs=1e-5)
    rewards = np.array([e.rewards[0] for e in data.episodes])
    actions = np.array([e.actions[0, 0] for e in data.episodes])
    np.testing.assert_allclose(rewards, parse_toy(data.env_id).reward(actions), rtol=1e-6)


@pytest.mark.parametrize("bad", ["toy-vitamin-peak0.9-v0", "toy-ag-peak0.4-gap0.6-v0", "toy-vitamin-gap0.1-v0"])
def test_instances_out_of_range_are_refused_with_one_message(bad):
    with pytest.raises(DatasetError, match="peak must lie in"):
        load_dataset(bad, None)
