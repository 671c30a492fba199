"""The papers' tables as sweeps (benchmarks/paper_*.toml) and what a GPU cluster needs around them: the grids at
the papers' settings, `--dry-run` listing every cell, the dataset preflight and the refusal of cells without data,
the GPU-hours estimate from `common.bench --cuda` figures, one lock per cell (two runners on one sweep folder run
every cell exactly once), and k cells side by side in one array task (`--runs-per-gpu`) through submitit's local
executor and a real single-node Slurm."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import benchmark
from common.benchmark import (
    REPO,
    Run,
    SweepError,
    cell_state,
    cell_work,
    claim_cell,
    groups_of,
    load_sweep,
    preflight,
    release,
)

PAPERS = {  # file → (cells, seeds, datasets, variants)
    "paper_odt.toml": (100, 10, 10, {"odt": "odt.py", "odt_antmaze": "odt.py"}),
    "paper_odt_td3.toml": (420, 5, 28, {"odt": "odt.py", "td3": "odt_td3.py", "odt_td3": "odt_td3.py"}),
    "paper_reinformer_ag.toml": (45, 5, 9, {"rf_ag": "reinformer_ag.py"}),
    "paper_dt_grpo.toml": (108, 3, 12, {"dt_grpo": "dt_grpo.py", "odt": "odt.py", "odt_td3": "odt_td3.py"}),
}
TINY = ("--embed-dim 16 --n-layers 1 --n-heads 1 --batch-size 8 --eval-episodes 1 --no-progress "
        "--checkpoint-interval 10")


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """Empty dataset folders, D4RL downloads on (as on a machine with internet): nothing is on disk."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.delenv("D4RL_DATASET_URL", raising=False)
    return tmp_path


def sweep_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}


# ---------------------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file", PAPERS)
def test_paper_tables_are_the_papers_grids(file):
    cells, seeds, datasets, variants = PAPERS[file]
    runs = load_sweep(REPO / "benchmarks" / file).runs
    assert len(runs) == cells and len({r.name for r in runs}) == cells
    assert len({r.seed for r in runs}) == seeds and len({r.env_id for r in runs}) == datasets
    for variant, script in variants.items():
        assert {r.script for r in runs if r.variant == variant} == {script}
    # per-dataset values come from the scripts' own tables: the sweeps set budgets and evaluation only
    allowed = {"--no-progress", "--online-steps", "--eval-episodes", "--supervised-coef", "--min-steps-per-round"}
    assert {f for r in runs for f in r.flags if f.startswith("--")} <= allowed
    budget = {r.env_id.split("-")[0]: benchmark.flag_value(r.flags, "--online-steps") for r in runs}
    if file == "paper_odt.toml":  # ODT Table 5.1: 200k online steps; 100 evaluation episodes on AntMaze
        assert set(budget.values()) == {"200000"}
        assert {benchmark.flag_value(r.flags, "--eval-episodes") for r in runs if "antmaze" in r.env_id} == {"100"}
    if file == "paper_odt_td3.toml":  # 500k MuJoCo, 1M Adroit / AntMaze; TD3-only = no supervised term
        assert budget["hopper"] == "500000" and budget["pen"] == budget["antmaze"] == "1000000"
        td3_only = [r for r in runs if r.variant.split("_")[0] == "td3"]
        assert len(td3_only) == 140 and all(benchmark.flag_value(r.flags, "--supervised-coef") == "0" for r in td3_only)
        assert not any("--supervised-coef" in r.flags for r in runs if r not in td3_only)
    if file in ("paper_odt_td3.toml", "paper_dt_grpo.toml"):  # ODT+TD3's rounds of ≥ 1000 env steps (App. H) ...
        sparse = {r for r in runs if r.env_id.split("-")[0] in ("pen", "hammer", "door", "relocate", "antmaze")
                  or "-random-" in r.env_id}
        for r in runs:  # ... for ODT too where ODT+TD3's table has them (and ODT+TD3's own value is the same)
            rounds = benchmark.flag_value(r.flags, "--min-steps-per-round")
            assert rounds == ("1000" if r in sparse and (r.script == "odt.py" or file == "paper_odt_td3.toml")
                              else None), r
    if file == "paper_dt_grpo.toml":
        assert set(budget.values()) == {"500000"}


@pytest.mark.parametrize("file", PAPERS)
def test_dry_run_lists_every_cell_then_the_preflight_and_the_cost(file, no_data, capsys):
    assert benchmark.main([str(REPO / "benchmarks" / file), "--dry-run", "--results", str(no_data / "res"),
                           "--bench-dir", str(no_data / "bench")]) == 0
    out = capsys.readouterr().out
    for run in load_sweep(REPO / "benchmarks" / file).runs:
        assert f"pending  {run.name}\n" in out
    assert out.count("           $ python ") == PAPERS[file][0]
    assert "[preflight] the datasets of" in out and "[cost] " in out and "GPU-hours: unknown" in out
    assert not (no_data / "res").exists()  # a dry run writes nothing


# ---------------------------------------------------------------------------------------------------------
# preflight and refusal
# ---------------------------------------------------------------------------------------------------------
def test_preflight_says_where_each_dataset_is(no_data):
    (no_data / "d4rl").mkdir()
    (no_data / "d4rl" / "hopper_medium-v2.hdf5").write_bytes(b"")
    (no_data / "minari" / "D4RL" / "antmaze" / "umaze-v1" / "data").mkdir(parents=True)
    (no_data / "minari" / "D4RL" / "antmaze" / "umaze-v1" / "data" / "metadata.json").write_text("{}")
    env_ids = ["hopper-medium-v2", "walker2d-medium-v2", "hopper-random-v2", "ant-medium-v2", "toy-ag-v0",
               "antmaze-umaze-v2", "antmaze-medium-play-v2", "no-such-v2"]
    runs = [Run("e", "v", "odt.py", e, s) for e in env_ids for s in (1, 2)]
    runs.append(Run("e", "w", "odt.py", "walker2d-medium-v2", 1, ("--dataset-path", str(no_data / "d4rl"))))
    got = {(s.env_id, s.status, len(s.runs)) for s in preflight(no_data, runs)}
    assert got == {("hopper-medium-v2", "on disk", 2), ("walker2d-medium-v2", "download", 2),
                   ("hopper-random-v2", "generated", 2), ("ant-medium-v2", "missing", 2), ("toy-ag-v0", "on disk", 2),
                   ("antmaze-umaze-v2", "on disk", 2), ("antmaze-medium-play-v2", "download", 2),
                   ("no-such-v2", "missing", 2), ("walker2d-medium-v2", "on disk", 1)}
    text = benchmark.preflight_report(preflight(no_data, runs))
    assert ("python -m common.datasets --download-all --names walker2d-medium-v2 antmaze-medium-play-v2" in text)
    assert "111-dim" in text and "Unknown dataset 'no-such-v2'" in text


def test_run_refuses_cells_without_data_in_one_message(no_data, monkeypatch, capsys):
    sweep = no_data / "s.toml"
    sweep.write_text('seeds = [1, 2]\n[experiments.a]\nenv_ids = ["toy-ag-v0", "ant-medium-v2", "hopper-medium-v2"]'
                     '\n[experiments.a.variants]\nodt = "odt.py"\n')
    started = []
    monkeypatch.setattr(benchmark, "run_local", lambda results, runs, *a, **k: started.append(runs) or 0)
    assert benchmark.main([str(sweep), "--results", str(no_data / "res")]) == 1
    out = capsys.readouterr().out
    assert [r.name for r in started[0]] == ["toy-ag-v0__odt__1", "toy-ag-v0__odt__2"]
    assert out.count("[preflight] refused 4 of 6 cells") == 1
    assert "ant-medium-v2 (cannot be had: " in out and "ant-medium-v2__odt__{1,2}" in out
    assert "hopper-medium-v2 (not here, can be downloaded): hopper-medium-v2__odt__{1,2}" in out
    assert "python -m common.datasets --download-all --names hopper-medium-v2\n" in out
    # nothing left to run: nothing is started; --no-preflight submits everything
    sweep.write_text(sweep.read_text().replace('"toy-ag-v0", ', ""))
    started.clear()
    assert benchmark.main([str(sweep), "--results", str(no_data / "res")]) == 2 and not started
    assert benchmark.main([str(sweep), "--results", str(no_data / "res"), "--no-preflight"]) == 0
    assert len(started[0]) == 4


def test_download_all_names_fetches_only_what_is_missing_and_says_what_cannot_be_had(no_data, capsys):
    from common.datasets import _main

    (no_data / "d4rl").mkdir()
    (no_data / "d4rl" / "hopper_medium-v2.hdf5").write_bytes(b"")
    assert _main(["--download-all", "--names", "hopper-medium-v2", "ant-medium-v2", "toy-ag-v0"]) == 0
    out = capsys.readouterr().out
    assert f"skipped  hopper-medium-v2: already there ({no_data / 'd4rl' / 'hopper_medium-v2.hdf5'})" in out
    assert "skipped  ant-medium-v2: cannot be downloaded: " in out and "111-dim" in out
    assert "skipped  toy-ag-v0: a toy, built in memory" in out and "0 fetched, 3 skipped, 0 failed" in out
    with pytest.raises(SystemExit):
        _main(["--names", "hopper-medium-v2"])


# ---------------------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------------------
GPU_LOG = """\
odt.py paper [embed_dim=512 n_layers=4 n_heads=4 batch_size=256 context_len=20] cuda 16 threads | [fp32] update step \
(sampling included): median 40.00 ms → 25.00 updates/s
odt.py paper [embed_dim=512 n_layers=4 n_heads=4 batch_size=256 context_len=20] cuda 16 threads | [bf16] update step \
(sampling included): median 20.00 ms → 50.00 updates/s
odt.py paper [embed_dim=512 n_layers=4 n_heads=4 batch_size=256 context_len=20] cpu 2 threads | [bf16] update step \
(sampling included): median 9000.00 ms → 0.11 updates/s
dt_grpo.py paper [embed_dim=512 n_layers=4 n_heads=4 context_len=20] cuda 16 threads | [bf16] one round's rollouts: \
reference + 4×8 members, L 10, L_eval 400, K 5 (untrained model): median 5000.00 ms → 1000.00 env steps/s, 5000 per call
dt_grpo.py paper [embed_dim=512 n_layers=4 n_heads=4 context_len=20] cuda 16 threads | [fp32] one round's rollouts: \
reference + 4×8 members, L 10, L_eval 400, K 5 (untrained model): median 2500.00 ms → 2000.00 env steps/s, 5000 per call
"""


def test_cost_is_cells_times_measured_gpu_time_per_run(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text('seeds = [1, 2, 3]\nflags = "--pretrain-updates 1000 --online-steps 10000 --eval-interval 5000 '
                     '--eval-episodes 2 --updates-per-round 100"\n[experiments.a]\nenv_ids = ["hopper-medium-v2"]\n'
                     '[experiments.a.variants]\nodt = "odt.py"\n')
    runs = load_sweep(sweep).runs
    # 1000 + (10000 / 1000-step episodes) × 100 updates; 10000 online + (2 + 2) evaluations × 2 × 1000 env steps
    assert cell_work(runs[0]) == {"odt update": 2000, "rollout env step": 18000}
    (tmp_path / "bench").mkdir()
    text = benchmark.cost_report(sweep, runs, tmp_path / "bench")
    assert "GPU-hours: unknown: 2 GPU figure(s) missing" in text
    assert "python -m common.bench --script odt --shape paper --cuda --precision auto" in text
    assert "python -m common.bench --script dt_grpo --shape paper --cuda --precision auto" in text
    (tmp_path / "bench" / "h100.txt").write_text(GPU_LOG)
    text = benchmark.cost_report(sweep, runs, tmp_path / "bench")
    hours = 3 * (2000 * 0.020 + 18000 * 0.001) / 3600  # 3 cells × (updates × bf16 s/update + env steps × s/step)
    assert f"GPU-hours: {hours:.3g} in all (3 cells × {hours / 3:.3g} h per cell" in text
    fp32 = benchmark.cost_report(sweep, [Run("a", "odt", "odt.py", "hopper-medium-v2", 1, r.flags + (
        "--precision", "fp32")) for r in runs], tmp_path / "bench")
    assert f"GPU-hours: {3 * (2000 * 0.040 + 18000 * 0.0005) / 3600:.3g} in all" in fp32


def test_cell_counts_follow_each_scripts_tables():
    odt_td3 = cell_work(Run("e", "v", "odt_td3.py", "hopper-random-v2", 1, ("--online-steps", "500000")))
    assert odt_td3["odt_td3 update"] == 5000 + 500 * 300  # Table 9 pretraining; random data: ≥ 1000 steps a round
    pen = cell_work(Run("e", "v", "odt_td3.py", "pen-human-v1", 1, ("--online-steps", "1000000")))
    assert pen["odt_td3 update"] == 40000 + 1_000_000 / 1000 * 300
    rf = cell_work(Run("e", "v", "reinformer_ag.py", "hopper-medium-v2", 1))
    assert rf == {"reinformer_ag update": 50_000, "ag_steps 3": 5 * 10 * 1000, "ag_steps 0": 5 * 10 * 1000}
    grpo = cell_work(Run("e", "v", "dt_grpo.py", "walker2d-medium-v2", 1))
    assert grpo["odt update"] == 10000 and grpo["dt_grpo update"] == pytest.approx(200_000 / 14120 * 16)


# ---------------------------------------------------------------------------------------------------------
# one lock per cell; groups of k cells
# ---------------------------------------------------------------------------------------------------------
TRY_LOCK = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('got it')\n"
            "except BlockingIOError:\n    print('held')")


def test_a_cell_lock_is_held_by_one_process_at_a_time(tmp_path):
    run = Run("e", "odt", "odt.py", "toy-ag-v0", 1)
    lock = tmp_path / "logs" / f"{run.name}.lock"
    other = lambda: subprocess.run([sys.executable, "-c", TRY_LOCK, str(lock)], capture_output=True,  # noqa: E731
                                   text=True, timeout=30).stdout.strip()
    assert claim_cell(tmp_path, run) == "ours" and claim_cell(tmp_path, run) == "ours"
    assert other() == "held"
    release(tmp_path, run)
    assert other() == "got it" and lock.is_file()
    # a cell found done once the lock is ours is given back at once
    folder = tmp_path / "runs" / f"{run.name}__100"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    assert claim_cell(tmp_path, run) == "done" and other() == "got it"
    assert cell_state(tmp_path, run).state == "done"


def test_runs_per_gpu_groups_and_options(tmp_path):
    runs = [Run("e", "v", "odt.py", "toy-ag-v0", s) for s in range(5)]
    assert [[r.seed for r in g] for g in groups_of(runs, 2)] == [[0, 1], [2, 3], [4]]
    sweep = tmp_path / "s.toml"
    sweep.write_text('seeds = [1]\n[experiments.a]\nenv_ids = ["toy-ag-v0"]\n[experiments.a.variants]\n'
                     'odt = "odt.py"\n')
    with pytest.raises(SweepError, match="--workers runs cells side by side"):
        benchmark.main([str(sweep), "--runs-per-gpu", "2", "--results", str(tmp_path / "r")])
    with pytest.raises(SweepError, match="at least 1"):
        benchmark.main([str(sweep), "--runs-per-gpu", "0", "--backend", "submitit-local"])


# ---------------------------------------------------------------------------------------------------------
# real runs
# ---------------------------------------------------------------------------------------------------------
def toy_sweep(path: Path, seeds: list[int], pretrain: int) -> Path:
    path.write_text(f"""
seeds = {seeds}
flags = "{TINY}"
[experiments.toy]
env_ids = ["toy-vitamin-v0"]
flags = "--pretrain-updates {pretrain} --online-steps 4 --updates-per-round 5"
[experiments.toy.variants]
odt = "odt.py"
""")
    return path


def launches(res: Path) -> dict[str, int]:
    """How many times each cell's script was started (one `$ ...` line per start in its log)."""
    return {log.stem: sum(line.startswith("$ ") for line in log.read_text().splitlines())
            for log in sorted((res / "logs").glob("*.log"))}


def runner(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "common.benchmark", *args], cwd=REPO, env=sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_runners_on_one_sweep_folder_run_every_cell_exactly_once(tmp_path):
    sweep = toy_sweep(tmp_path / "s.toml", [1, 2], 5)
    res = tmp_path / "res"
    first, second = (runner(str(sweep), "--results", str(res), "--workers", "1") for _ in range(2))
    outs = [p.communicate(timeout=240)[0] for p in (first, second)]
    # A runner whose last cell finished while the other runner's was still going says so (exit 3), else 0.
    assert all(p.returncode == 0 or (p.returncode == 3 and "still running elsewhere" in o)
               for p, o in zip((first, second), outs, strict=True)), outs
    names = [r.name for r in load_sweep(sweep).runs]
    assert launches(res) == {n: 1 for n in names}
    assert [cell_state(res, r).state for r in load_sweep(sweep).runs] == ["done"] * 2
    assert sum(o.count("[sweep] start ") for o in outs) == 2


def checkpoints(res: Path) -> list[Path]:
    return sorted((res / "runs").glob("*/checkpoint.pt")) if (res / "runs").is_dir() else []


def wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_submitit_local_runs_k_cells_side_by_side_in_one_task(tmp_path):
    """--runs-per-gpu 2 through submitit's local executor: two cells, one array task that runs both at the same
    time (both scripts are children of the one task process)."""
    pytest.importorskip("submitit")
    sweep = toy_sweep(tmp_path / "s.toml", [1, 2], 5)
    res = tmp_path / "res"
    proc = runner(str(sweep), "--results", str(res), "--backend", "submitit-local", "--time", "60",
                  "--runs-per-gpu", "2")
    parents: set[int] = set()
    try:
        def both_running() -> bool:
            markers = list((res / "logs").glob("*.running")) if (res / "logs").is_dir() else []
            for m in markers:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = int(m.read_text().split(":")[1])
                    parents.add(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]))
            return len(markers) == 2
        wait_for(both_running, 150, "cells 1 and 2 running at once")
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "submitted 2 run(s) as 1 task(s) of up to 2 side by side (--runs-per-gpu 2" in out
    assert len(parents) == 1  # one task process started both scripts
    assert launches(res) == {f"toy-vitamin-v0__odt__{s}": 1 for s in (1, 2)}
    assert all(cell_state(res, r).state == "done" for r in load_sweep(sweep).runs)


FAKE_SCRIPT = """\
import json, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
if args[0] == "--resume":
    folder = Path(args[1])
    n = json.loads((folder / "checkpoint.pt").read_text())["n"]
else:
    value = lambda flag: args[args.index(flag) + 1]
    folder = Path("runs") / f"{value('--env-id')}__{value('--exp-name')}__{value('--seed')}__{time.time_ns()}"
    folder.mkdir(parents=True)
    n = 0
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
while n < 40:
    if stop:
        sys.exit(3)
    n += 1
    (folder / "checkpoint.pt").write_text(json.dumps({"n": n}))
    time.sleep(0.05)
(folder / "summary.json").write_text(json.dumps({"n": n}))
"""


@pytest.mark.slow
def test_a_preempted_group_stops_all_its_scripts_and_the_requeued_task_resumes_them(tmp_path):
    """SweepGroupTask.checkpoint (what submitit calls on USR2) with k = 2 real processes (a stand-in script that
    checkpoints every step and exits 3 on SIGTERM): both are stopped, their locks given back, and the requeued
    task it returns resumes both from their checkpoints to the end."""
    submitit = pytest.importorskip("submitit")
    (tmp_path / "fake.py").write_text(FAKE_SCRIPT)
    res = tmp_path / "res"
    runs = [Run("e", "fake", "fake.py", "toy-ag-v0", s) for s in (1, 2)]
    task = benchmark.SweepGroupTask(str(res), 1, str(tmp_path), stop_timeout_s=20, runs_per_gpu=2)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_call(task, runs)))
    thread.start()
    wait_for(lambda: len(checkpoints(res)) == 2, 60, "both scripts' first checkpoints")
    again = task.checkpoint(runs)
    thread.join(60)
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.args == (runs,)
    assert not list((res / "logs").glob("*.running"))
    assert all(claim_cell(res, r) == "ours" for r in runs)  # the locks were given back
    for r in runs:
        release(res, r)
    assert [cell_state(res, r).state for r in runs] == ["stopped", "stopped"]
    assert "2 of 2 cells did not finish" in str(outcome[0]) and "exit 3" in str(outcome[0])
    assert sorted(again.function(*again.args).split("; ")) == ["toy-ag-v0__fake__1: done", "toy-ag-v0__fake__2: done"]
    for r in runs:
        (folder,) = (res / "runs").glob(f"{r.name}__*")
        assert json.loads((folder / "summary.json").read_text()) == {"n": 40}
        assert f"--resume runs/{folder.name}" in (res / "logs" / f"{r.name}.log").read_text()
    assert launches(res) == {r.name: 2 for r in runs}


def _call(task, runs):
    try:
        return task(runs)
    except RuntimeError as err:
        return err


SLURM_SCRIPT = REPO.parent / "shared" / "tools" / "start-local-slurm.sh"


def slurm_ready() -> str:
    """"" when a Slurm node takes jobs now; otherwise start the local one if it is installed and we are root, or
    say why not (the reason to skip)."""
    def answers() -> bool:
        try:
            states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
            return any(s.strip() in ("idle", "mixed") for s in states.splitlines())
        except (OSError, subprocess.TimeoutExpired):
            return False

    if shutil.which("sbatch") and answers():
        return ""
    if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged")):
        return f"no Slurm here (install and start one as root with {SLURM_SCRIPT})"
    if os.geteuid() != 0 or not SLURM_SCRIPT.is_file():
        return f"Slurm is installed but not running, and {SLURM_SCRIPT} cannot start it here (needs root)"
    subprocess.run(["bash", str(SLURM_SCRIPT)], capture_output=True, timeout=120)
    return "" if answers() else f"{SLURM_SCRIPT} did not bring up a Slurm node"


@pytest.mark.slow
def test_real_slurm_groups_of_cells_beside_a_local_runner_run_each_cell_once(tmp_path):
    """A real single-node Slurm: two cells as one array task that runs them side by side (--runs-per-gpu 2), while
    a local runner works on the same sweep folder: every cell runs exactly once, in one place or the other."""
    pytest.importorskip("submitit")
    why = slurm_ready()
    if why:
        pytest.skip(why)
    sweep = toy_sweep(tmp_path / "s.toml", [1, 2], 5)
    res = tmp_path / "res"
    slurm = runner(str(sweep), "--results", str(res), "--backend", "slurm", "--time", "10", "--threads-per-run", "1",
                   "--runs-per-gpu", "2", "--wait")
    time.sleep(1.0)
    local = runner(str(sweep), "--results", str(res), "--workers", "1")
    outs = [p.communicate(timeout=240)[0] for p in (slurm, local)]
    # The local runner is done when every cell is; a cell still running in the Slurm task makes it say so (exit 3).
    assert slurm.returncode == 0 and (local.returncode == 0 or (
        local.returncode == 3 and "still running elsewhere" in outs[1])), outs
    assert "submitted 2 run(s) as 1 task(s) of up to 2 side by side" in outs[0], outs[0]
    assert launches(res) == {f"toy-vitamin-v0__odt__{s}": 1 for s in (1, 2)}
    assert all(cell_state(res, r).state == "done" for r in load_sweep(sweep).runs)
    again = runner(str(sweep), "--results", str(res), "--workers", "1")
    assert again.communicate(timeout=120)[0].count("complete") and again.returncode == 0
