"""Shared fixtures: an isolated dataset cache and a helper that runs a script through its CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from common.datasets import Episode

REPO = Path(__file__).resolve().parents[1]

# Small enough for 2 CPU cores, big enough to exercise every code path (context > 1, several heads).
TINY_MODEL = ["--embed-dim", "32", "--n-layers", "1", "--n-heads", "2", "--batch-size", "16",
              "--context-len", "5", "--eval-context-len", "3", "--warmup-steps", "10", "--no-progress"]
TINY_HOPPER = ["--env-id", "hopper-random-v2", "--generate-steps", "4000", "--eval-episodes", "2"]


@pytest.fixture(scope="session")
def data_env(tmp_path_factory) -> dict[str, str]:
    """Environment variables pointing every dataset cache at a temporary folder (never ~/.minari)."""
    root = tmp_path_factory.mktemp("datasets")
    env = {
        "MINARI_DATASETS_PATH": str(root / "minari"),
        "D4RL_DATASET_DIR": str(root / "d4rl"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    return env


@pytest.fixture(scope="session")
def tiny_hopper(data_env) -> dict[str, str]:
    """Generate the 4000-step hopper-random dataset once for the whole session; returns data_env."""
    result = subprocess.run([sys.executable, "-m", "common.datasets", "hopper-random-v2", "--steps", "4000"],
                            cwd=REPO, env={**os.environ, **data_env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return data_env


def episode(rewards, obs_dim=3, act_dim=2, start=0.0) -> Episode:
    """A terminal-ended episode with observations start, start+1, ... in every dimension and actions 0.5."""
    n = len(rewards)
    obs = (start + np.arange(n, dtype=np.float32))[:, None].repeat(obs_dim, 1)
    return Episode(observations=obs, actions=np.full((n, act_dim), 0.5, np.float32),
                   rewards=np.asarray(rewards, np.float32), terminals=np.eye(n, dtype=bool)[-1],
                   truncations=np.zeros(n, bool), next_observations=obs + 1)


def run_script(script: str, *args: str, cwd: Path, env: dict[str, str], timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python <repo>/<script> args...` in `cwd` (its runs/ folder lands there)."""
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def run_and_read(script: str, *args: str, cwd: Path, env: dict[str, str]):
    """Run a script to completion; return (its CompletedProcess, its run folder, its metrics rows)."""
    result = run_script(script, *args, cwd=cwd, env=env)
    run_dir = only_run_dir(cwd)
    return result, run_dir, read_metrics(run_dir)


def assert_clear_error(result: subprocess.CompletedProcess, needle: str) -> None:
    """Bad input ends with exit code 2 and one message on stderr that mentions `needle`, never a traceback."""
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def has_checkpoint(runs: Path) -> bool:
    return any(runs.glob("*/checkpoint.pt"))


def run_and_interrupt(script: str, *args: str, cwd: Path, env: dict[str, str],
                      ready: Callable[[Path], bool] = has_checkpoint, timeout: float = 240) -> str:
    """Start `python <repo>/<script> args...` in `cwd`, press Ctrl-C (SIGINT) once `ready(cwd / "runs")`,
    check that the script exits 3 (stopped, resumable) after checkpointing and return its stdout."""
    proc = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready(cwd / "runs"):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{script} never reached the point to interrupt:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    return out


class PressCtrlCWhenFinalised:
    """Sends SIGINT to this process from its finaliser. Python drops a KeyboardInterrupt raised inside a finaliser
    ("Exception ignored"), as happens when Ctrl-C lands while h5py or the garbage collector frees an object."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def assert_consistent_hopper_evals(rows: list[dict], prefix: str = "eval") -> None:
    """Evaluation rows of a hopper run are internally consistent: the normalised score is D4RL's
    100·(R − R_random)/(R_expert − R_random) of the mean return (hopper: −20.27, 3234.3), every episode ran at least
    one step, and the return per step is a hopper's (healthy reward 1 plus forward velocity minus a small control
    cost: between 0 and 4 for any policy that does not fall through the floor). A wrong normaliser, a rollout that
    drops rewards or an evaluation that never steps fails this; a weak policy does not."""
    from common.datasets import REF_SCORES

    low, high = REF_SCORES["hopper"]
    assert rows
    for r in rows:
        ret, length = r[f"{prefix}/return_mean"], r[f"{prefix}/length_mean"]
        assert r[f"{prefix}/normalized_score_mean"] == pytest.approx(100 * (ret - low) / (high - low), rel=1e-6)
        assert r[f"{prefix}/return_std"] >= 0 and length >= 1
        assert 0 < ret / length < 4, r
