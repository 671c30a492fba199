"""common.bench: the interleaved timer, and one fp32 + bf16 round of the odt benchmark through its CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.bench import interleaved

REPO = Path(__file__).resolve().parents[1]


def test_interleaved_alternates_the_order_and_keeps_each_functions_values():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in "ab"}
    medians, values = interleaved(fns, steps=3, warmup=1, sync=lambda: None)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warmup, then A B, B A, A B
    assert values == {"a": ["a"] * 3, "b": ["b"] * 3}
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())


def test_odt_fp32_and_bf16_in_one_run():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "common.bench", "--script", "odt", "--shape", "small", "--steps", "1",
                           "--warmup", "0", "--threads", "1", "--precision", "both"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for tag in ("[fp32] update step", "[bf16] update step", "[bf16 / fp32] update:", "sampling one batch"):
        assert any(tag in line for line in lines), (tag, proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("script,extra,tags", [
    ("odt_td3", [], ("one update = 2 critic + 1 actor step", "1 critic + 1 actor step", "target actions")),
    ("reinformer_ag", ["--ag-steps", "0"], ("update = model step + 1 IQL step", "ag_steps 0")),
    ("dt_grpo", [], ("[bf16]",)),
])
def test_every_scripts_benchmark_runs_against_its_current_functions(script, extra, tags):
    """The benchmark calls each script's own update functions: a refactor that renames them must update it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "common.bench", "--script", script, "--shape", "small", "--steps",
                           "1", "--warmup", "0", "--threads", "1", "--precision", "bf16", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for tag in tags:
        assert tag in proc.stdout, (tag, proc.stdout)
