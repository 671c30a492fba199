"""The report: aggregation numbers against a hand computation, the bootstrap intervals on known data, the
files it writes, and one-paragraph errors for folders it cannot report on."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.report import ReportError, iqm, iqm_ci, iqm_curve, main, write_report

pytest.importorskip("rliable")
REPO = Path(__file__).resolve().parents[1]


def make_run(results: Path, variant: str, env_id: str, seed: int, score: float | None, *, script: str = "odt.py",
             curve: list[tuple[int, float]] = (), extra_args: dict | None = None, rf: float | None = None,
             updates: int = 100, env_steps: int = 30, stamp: int = 1000) -> Path:
    folder = results / "runs" / f"{env_id}__{variant}__{seed}__{stamp}"
    folder.mkdir(parents=True)
    args = {"exp_name": variant, "seed": seed, "env_id": env_id, "embed_dim": 32, "progress": seed % 2 == 0,
            **(extra_args or {})}
    (folder / "config.json").write_text(json.dumps({"script": script, "args": args, "dataset": "toy"}))
    rows = [{"global_step": i * 10, "env_steps": x, "phase": "online", "eval/normalized_score_mean": y,
             **({"eval_rf/normalized_score_mean": y - 40} if rf is not None else {})} for i, (x, y) in enumerate(curve)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if score is not None:
        summary = {"eval/normalized_score_mean": score, "eval/return_mean": score / 100,
                   "counters": {"updates": updates, "env_steps": env_steps}, "wall_time_s": 10.0 + seed}
        if rf is not None:
            summary.update({"eval_rf/normalized_score_mean": rf, "eval_rf/return_mean": rf / 100})
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_iqm_and_intervals_on_known_data():
    assert iqm(np.array([1, 2, 3, 4, 10])) == pytest.approx(3.0)  # trims one run each side: mean(2, 3, 4)
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)  # trims two each side: mean(3, 4, 5, 6)
    # identical runs: every resample is the same, the interval has zero width
    assert iqm_ci(np.full(5, 7.0)) == (7.0, 7.0, 7.0)
    # two runs {0, 1}: resampled IQMs (= means for n = 2) are 0, 0.5, 1 w.p. 1/4, 1/2, 1/4 → 95 % CI [0, 1]
    point, lo, hi = iqm_ci(np.array([0.0, 1.0]), reps=4000)
    assert (point, lo, hi) == (0.5, 0.0, 1.0)
    # the interval holds the estimate, lies within the data, and is reproducible from its seed
    data = np.array([3.0, 9.0, 4.0, 8.0, 5.0, 30.0, 6.0])
    a, b = iqm_ci(data, seed=1), iqm_ci(data, seed=1)
    assert a == b and 3.0 <= a[1] <= a[0] <= a[2] <= 30.0 and a[2] - a[1] > 0
    mid, lo, hi = iqm_curve(np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0], [0.0, 2.0, 2.0]]), reps=500)
    np.testing.assert_allclose(mid, [0.0, 2.0, 2.0])
    np.testing.assert_allclose(lo[[0, 2]], [0.0, 2.0])
    np.testing.assert_allclose(hi[[0, 2]], [0.0, 2.0])
    assert lo[1] < 2.0 < hi[1]


def test_report_numbers_tables_curves_and_csv(tmp_path):
    res = tmp_path / "res"
    a_scores = [1.0, 2.0, 3.0, 4.0, 10.0]
    for seed, s in enumerate(a_scores, 1):
        make_run(res, "odt", "toy-vitamin-v0", seed, s, curve=[(0, 0.0), (10, s / 2), (20 + seed, s)])
        make_run(res, "odt_td3", "toy-vitamin-v0", seed, 50.0, script="odt_td3.py", updates=100 + seed,
                 curve=[(0, 0.0), (10, 25.0), (30, 50.0)])
        make_run(res, "rf", "toy-ag-v0", seed, 90.0 + seed, script="reinformer_ag.py", rf=50.0 + seed, env_steps=0,
                 curve=[(0, 45.0), (0, 70.0), (0, 90.0 + seed)])  # offline: curves against gradient updates
    make_run(res, "odt", "toy-vitamin-v0", 6, None, stamp=2000)  # unfinished: listed, not counted
    (res / "runs" / "toy-vitamin-v0__odt__6__2000" / "checkpoint.pt").write_text("")
    out = tmp_path / "out"
    path = write_report(res, out, reps=1000)
    md = path.read_text()
    # odt: mean 4, std (n−1) = sqrt(50 / 4) = 3.54, IQM 3; odt_td3: all 50 → zero-width interval
    assert "| `odt` | `odt.py` | 5 | 4.00 ± 3.54 | **3.00** [" in md
    assert ("| `odt_td3` | `odt_td3.py` | 5 | 50.00 ± 0.00 | **50.00** [50.00, 50.00] | 50.00 [50.00, 50.00] | "
            "0.500 | 30 | 101–105 |") in md
    assert "`odt_td3` > `odt`" in md
    # Reinformer+AG: the AG row and the plain-RF row from the same runs, and their difference
    assert "| `rf` | `reinformer_ag.py` | 5 | 93.00 ± 1.58 | **93.00**" in md
    assert "| `rf [RF, no AG]` | `reinformer_ag.py` | 5 | 53.00 ± 1.58 | **53.00**" in md
    assert "`rf` > `rf [RF, no AG]`" in md
    assert "toy-vitamin-v0__odt__6__2000` (checkpoint.pt: resumable)" in md
    assert "13.0 s" in md  # mean wall time of seeds 1..5 = 10 + 3
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 16 and sum(r["finished"] == "False" for r in rows) == 1
    row = next(r for r in rows if r["variant"] == "rf" and r["seed"] == "2")
    assert (float(row["normalized_score_mean"]), float(row["rf_normalized_score_mean"])) == (92.0, 52.0)
    pngs = sorted(p.name for p in out.glob("curves_*.png"))
    assert pngs == ["curves_toy-ag-v0.png", "curves_toy-vitamin-v0.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "![toy-vitamin-v0](curves_toy-vitamin-v0.png)" in md and "![toy-ag-v0](curves_toy-ag-v0.png)" in md


def test_sweep_file_groups_variants_into_experiments(tmp_path):
    res = tmp_path / "res"
    for seed in (1, 2):
        make_run(res, "a", "toy-vitamin-v0", seed, 10.0 * seed, curve=[(0, 0.0), (5, 1.0)])
        make_run(res, "b", "toy-vitamin-v0", seed, 20.0, curve=[(0, 0.0), (5, 1.0)])
        make_run(res, "c", "toy-vitamin-v0", seed, 30.0, curve=[(0, 0.0), (5, 1.0)])
    (res / "sweep.toml").write_text('title = "demo"\nseeds = [1, 2]\nflags = "--no-progress"\n'
                                    '[experiments.one]\ntitle = "First"\nenv_ids = ["toy-vitamin-v0"]\n'
                                    'flags = "--embed-dim 32"\n[experiments.one.variants]\na = "odt.py"\n'
                                    'b = "odt.py --x 1"\n[experiments.two]\nenv_ids = ["toy-vitamin-v0"]\n'
                                    '[experiments.two.variants]\nc = "odt.py"\n')
    md = write_report(res, res, reps=500).read_text()
    assert md.startswith("# Results: demo")
    first, second = md.index("## First — `toy-vitamin-v0`"), md.index("## two — `toy-vitamin-v0`")
    assert first < md.index("| `a` |") < md.index("| `b` |") < second < md.index("| `c` |")
    assert "Flags of every run: `--no-progress --embed-dim 32`" in md and "- `b`: `odt.py --x 1`" in md
    assert {p.name for p in res.glob("curves_*.png")} == {"curves_one_toy-vitamin-v0.png",
                                                          "curves_two_toy-vitamin-v0.png"}


@pytest.mark.parametrize("case, words", [
    ("missing", "is not a folder"),
    ("empty", "holds no run folders"),
    ("partial", "none of them finished"),
    ("unknown", "not runs (no config.json)"),
    ("foreign", "not a run configuration"),
    ("mixed", "different settings (--embed-dim 32 vs 64"),
    ("scripts", "mixes scripts"),
    ("duplicate", "more than one finished run for seed(s) [1]"),
])
def test_clear_errors(tmp_path, case, words):
    res = tmp_path / "res"
    if case != "missing":
        (res / "runs").mkdir(parents=True)
    if case == "partial":
        make_run(res, "odt", "toy-vitamin-v0", 1, None)
    if case == "unknown":
        make_run(res, "odt", "toy-vitamin-v0", 1, 5.0)
        (res / "runs" / "notes").mkdir()
    if case == "foreign":
        (res / "runs" / "x").mkdir()
        (res / "runs" / "x" / "config.json").write_text('{"lr": 3}')
    if case == "mixed":
        make_run(res, "odt", "toy-vitamin-v0", 1, 5.0)
        make_run(res, "odt", "toy-vitamin-v0", 2, 5.0, extra_args={"embed_dim": 64})
    if case == "scripts":
        make_run(res, "odt", "toy-vitamin-v0", 1, 5.0)
        make_run(res, "odt", "toy-vitamin-v0", 2, 5.0, script="dt_grpo.py")
    if case == "duplicate":
        make_run(res, "odt", "toy-vitamin-v0", 1, 5.0)
        make_run(res, "odt", "toy-vitamin-v0", 1, 6.0, stamp=2000)
    with pytest.raises(ReportError, match=words.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")):
        main([str(res)])


def test_cli_error_is_one_paragraph_without_traceback(tmp_path):
    (tmp_path / "runs").mkdir()
    out = subprocess.run([sys.executable, "-m", "common.report", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "holds no run folders" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
