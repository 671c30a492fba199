"""What the report says a sample supports (issue: evidence as the field reports it): best-during-training next
to final score, rliable's probability of improvement with seeds per side, a warning instead of a verdict below
5 seeds, and seeds evaluated at slightly different steps aligned on one grid."""

from __future__ import annotations

import numpy as np
import pytest
from test_report import make_run

from common.report import MIN_SEEDS, aligned_curves, aligned_steps, probability_of_improvement, write_report

pytest.importorskip("rliable")


def test_probability_of_improvement_by_hand():
    """P(X > Y) = #{(i, j): x_i > y_j} / (n_x n_y), ties ½ (Mann-Whitney): 19 of 25 pairs here."""
    x, y = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.0, 0.5, 1.5, 2.5, 3.5])
    p, lo, hi = probability_of_improvement(x, y, reps=100)
    assert p == pytest.approx(19 / 25) and lo <= p <= hi and hi <= 1.0
    assert probability_of_improvement(y, x, reps=20)[0] == pytest.approx(6 / 25)
    assert probability_of_improvement(np.array([1.0, 2.0]), np.array([1.0, 2.0]), reps=20)[0] == 0.5  # ties: ½


def test_best_during_training_is_each_runs_highest_evaluation(tmp_path):
    """A run that peaks at 40 mid-training and ends at 10: final 10, best 40; IQM over 5 seeds of each."""
    res = tmp_path / "res"
    for seed in range(1, 6):
        make_run(res, "a", "toy-vitamin-v0", seed, 10.0 + seed, curve=[(0, 0.0), (10, 40.0 + seed), (20, 10.0 + seed)])
    md = write_report(res, tmp_path / "out", reps=300).read_text()
    # final: 11..15, IQM of 5 = mean(12, 13, 14) = 13; best: 41..45 → 43
    assert "| **13.00** [" in md and "| 43.00 [" in md
    rows = (tmp_path / "out" / "runs.csv").read_text().splitlines()
    header = rows[0].split(",")
    best = sorted(float(r.split(",")[header.index("best_normalized_score")]) for r in rows[1:])
    assert best == [41.0, 42.0, 43.0, 44.0, 45.0]


def test_fewer_than_five_seeds_warn_instead_of_a_verdict(tmp_path):
    """3 seeds each, fully separated: the report names the seeds per side and gives no 'non-overlapping' verdict."""
    assert MIN_SEEDS == 5
    res = tmp_path / "res"
    for seed in (1, 2, 3):
        make_run(res, "good", "toy-vitamin-v0", seed, 50.0 + seed, curve=[(0, 0.0), (10, 50.0)])
        make_run(res, "bad", "toy-vitamin-v0", seed, 1.0 + seed, curve=[(0, 0.0), (10, 1.0)])
    md = write_report(res, tmp_path / "out", reps=300).read_text()
    assert "3 vs 3 seeds" in md and "fewer than 5 seeds" in md and "no verdict" in md
    assert "Non-overlapping" not in md and "better" not in md


def test_claims_of_the_sweep_file_get_a_verdict_with_five_seeds(tmp_path):
    """With 5 seeds per side, a claimed pair whose P(X > Y) interval excludes ½ is reported as a difference;
    an unclaimed pair is not listed when the sweep file names its claims."""
    res = tmp_path / "res"
    for seed in range(1, 6):
        make_run(res, "x", "toy-vitamin-v0", seed, 50.0 + seed, curve=[(0, 0.0), (10, 50.0)])
        make_run(res, "y", "toy-vitamin-v0", seed, 1.0 + seed, curve=[(0, 0.0), (10, 1.0)])
        make_run(res, "z", "toy-vitamin-v0", seed, 1.5 + seed, curve=[(0, 0.0), (10, 1.0)])
    (res / "sweep.toml").write_text('title = "t"\nseeds = [1, 2, 3, 4, 5]\n[experiments.e]\nenv_ids = '
                                    '["toy-vitamin-v0"]\nclaims = [["x", "y"]]\n[experiments.e.variants]\n'
                                    'x = "odt.py"\ny = "odt.py"\nz = "odt.py"\n')
    md = write_report(res, tmp_path / "out", reps=200).read_text()
    assert "P(`x` > `y`) = 1.00 [1.00, 1.00] (5 vs 5 seeds, final score): `x` better." in md
    assert "P(`y` > `z`)" not in md and "P(`x` > `z`)" not in md


def test_seeds_evaluated_at_slightly_different_steps_share_one_grid():
    """Two seeds evaluated at 0, ~2000, ~4000: three aligned points (median step), not five doubled ones."""
    xs = aligned_steps([np.array([0.0, 2003.0, 4011.0]), np.array([0.0, 2010.0, 4002.0])])
    np.testing.assert_allclose(xs, [0.0, 2006.5, 4002.0])  # the last point capped at the shorter curve's end
    # different schedules: an even grid with as many points as the shortest curve, within every curve's range
    xs = aligned_steps([np.array([0.0, 1000.0, 2000.0, 3000.0]), np.array([0.0, 1500.0, 2900.0])])
    np.testing.assert_allclose(xs, [0.0, 1450.0, 2900.0])


def test_curves_with_as_many_evaluations_end_at_every_seeds_final_score():
    """Rounds end past the budget at different steps (60.3k vs 63.2k): the curve's last point holds each seed's
    final score (what the table's IQM is computed from), not a score interpolated at the shorter run's end."""
    a = (np.array([0.0, 55880.0, 60269.0]), np.array([4.1, 31.6, 8.3]))
    b = (np.array([0.0, 55784.0, 63193.0]), np.array([4.1, 14.3, 31.6]))
    xs, ys = aligned_curves([a, b])
    np.testing.assert_allclose(xs, [0.0, 55832.0, 61731.0])
    np.testing.assert_allclose(ys[:, -1], [8.3, 31.6])  # interpolating b at 60269 would give 24.8
    np.testing.assert_allclose(ys, [a[1], b[1]])
    # a seed with one evaluation fewer: interpolated onto the shared grid, within every curve's range
    xs, ys = aligned_curves([a, (b[0][:2], b[1][:2])])
    np.testing.assert_allclose(xs, [0.0, 55784.0])
    np.testing.assert_allclose(ys[:, -1], [np.interp(55784.0, a[0], a[1]), 14.3])
