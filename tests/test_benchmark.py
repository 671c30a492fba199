"""The sweep runner: grid expansion, the skip / resume / restart decision per cell, progress, and real tiny runs
through the local backend (two workers, Ctrl-C + resume) and through submitit's local executor (a preemption
signal → SIGTERM to the script → requeue → --resume). A real Slurm test runs where sbatch and squeue work."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.benchmark import (
    REPO,
    Run,
    SweepError,
    _minutes,
    cell_state,
    child_env,
    load_sweep,
    prepare,
    progress_line,
    run_local,
    status_counts,
)

TINY = ("--embed-dim 16 --n-layers 1 --n-heads 1 --batch-size 8 --eval-episodes 1 --no-progress "
        "--checkpoint-interval 10")


def write_sweep(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def sweep_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}


# ---------------------------------------------------------------------------------------------------------
# grid expansion
# ---------------------------------------------------------------------------------------------------------
def test_grid_expansion_order_and_flags(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.toml", """
seeds = [1, 2]
flags = "--no-progress --eval-episodes 2"
[experiments.a]
env_ids = ["toy-vitamin-v0", "toy-ag-v0"]
flags = ["--eval-episodes", "3"]
[experiments.a.variants]
odt = "odt.py"
odt_td3_alpha0 = "odt_td3.py --alpha-online 0 --eval-episodes 4"
[experiments.b]
env_ids = ["toy-ag-v0"]
seeds = [7]
[experiments.b.variants]
rf = "reinformer_ag.py"
"""))
    names = [r.name for r in sweep.runs]
    assert len(names) == 2 * 2 * 2 + 1
    # seeds outermost, then the file's order: experiments, variants, env ids
    assert names[:4] == ["toy-vitamin-v0__odt__1", "toy-ag-v0__odt__1", "toy-vitamin-v0__odt_td3_alpha0__1",
                         "toy-ag-v0__odt_td3_alpha0__1"]
    assert all(n.endswith("__1") for n in names[:4]) and all(n.endswith("__2") for n in names[4:8])
    assert names[-1] == "toy-ag-v0__rf__7"
    run = next(r for r in sweep.runs if r.variant == "odt_td3_alpha0")
    cmd = run.command(python="python")
    assert cmd[:8] == ["python", str(REPO / "odt_td3.py"), "--env-id", run.env_id, "--seed", str(run.seed),
                       "--exp-name", "odt_td3_alpha0"]
    # sweep flags, then experiment flags, then variant flags: the last --eval-episodes (the variant's) wins
    assert cmd[8:] == ["--no-progress", "--eval-episodes", "2", "--eval-episodes", "3", "--alpha-online", "0",
                       "--eval-episodes", "4"]
    assert Run("e", "v", "odt.py", "mujoco/hopper/medium-v0", 3).name == "mujoco-hopper-medium-v0__v__3"


def test_order_experiments_runs_each_experiment_to_all_its_seeds_before_the_next(tmp_path):
    body = """
seeds = [1, 2, 3]
[experiments.a]
env_ids = ["toy-vitamin-v0"]
[experiments.a.variants]
odt = "odt.py"
odt_td3 = "odt_td3.py"
[experiments.b]
env_ids = ["toy-ag-v0"]
seeds = [4, 1]
[experiments.b.variants]
rf = "reinformer_ag.py"
"""
    default = [r.name for r in load_sweep(write_sweep(tmp_path / "s.toml", body)).runs]
    assert default[:3] == ["toy-vitamin-v0__odt__1", "toy-vitamin-v0__odt_td3__1", "toy-ag-v0__rf__1"]
    by_experiment = [r.name for r in load_sweep(write_sweep(tmp_path / "e.toml", 'order = "experiments"' + body)).runs]
    assert by_experiment == ["toy-vitamin-v0__odt__1", "toy-vitamin-v0__odt_td3__1", "toy-vitamin-v0__odt__2",
                             "toy-vitamin-v0__odt_td3__2", "toy-vitamin-v0__odt__3", "toy-vitamin-v0__odt_td3__3",
                             "toy-ag-v0__rf__1", "toy-ag-v0__rf__4"]  # seeds in the sweep's first-seen order
    assert sorted(by_experiment) == sorted(default)
    with pytest.raises(SweepError, match="order = 'variants'; allowed"):
        load_sweep(write_sweep(tmp_path / "v.toml", 'order = "variants"\n' + body))

@pytest.mark.parametrize("body, words", [
    ('seeds = [1]\n[experiments.a]\nenv_ids = ["x"]\n[experiments.a.variants]\nodt = "odt.py"\n'
     '[experiments.b]\nenv_ids = ["y"]\n[experiments.b.variants]\nodt = "odt.py"\n', "unique"),
    ('seeds = [1]\n[experiments.a]\nenv_ids = ["x"]\n[experiments.a.variants]\nodt = "odt.py --seed 3"\n', "--seed"),
    ('seeds = [1]\n[experiments.a]\nenv_ids = ["x"]\n[experiments.a.variants]\nodt = "nothere.py"\n', "not found"),
    ('seeds = [1]\n[experiments.a]\nenv_ids = ["x"]\n[experiments.a.variants]\n"a__b" = "odt.py"\n', "'__'"),
    ('seeds = [1, 1]\n[experiments.a]\nenv_ids = ["x"]\n[experiments.a.variants]\nodt = "odt.py"\n', "duplicates"),
    ('[experiments.a]\nenv_ids = ["x"]\n[experiments.a.variants]\nodt = "odt.py"\n', "seeds"),
    ('seeds = [1]\n[experiments.a]\nenv_ids = ["x"]\n', "variants"),
    ('seeds = [1]\nseed = 3\n', "unknown top-level"),
    ('seeds = [1\n', "not valid TOML"),
])
def test_bad_sweep_files_are_refused_with_a_reason(tmp_path, body, words):
    with pytest.raises(SweepError, match=words.replace("[", r"\[")):
        load_sweep(write_sweep(tmp_path / "s.toml", body))


def test_threads_per_run_reach_the_child_environment():
    env = child_env(3)
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["OPENBLAS_NUM_THREADS"]) == ("3", "3", "3")


def test_time_formats():
    assert _minutes("90") == 90
    assert _minutes("24:00:00") == 1440
    assert _minutes("0:00:30") == 0.5
    assert _minutes("1-02:00:00") == 1560
    assert _minutes("1-2") == 1560
    with pytest.raises(SweepError):
        _minutes("soon")


# ---------------------------------------------------------------------------------------------------------
# skip / resume / restart on fabricated run folders
# ---------------------------------------------------------------------------------------------------------
def fabricate(results: Path, run: Run, stamp: int, *files: str) -> Path:
    folder = results / "runs" / f"{run.name}__{stamp}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"script": run.script, "args": {}}))
    for name in files:
        (folder / name).write_text("{}")
    return folder


def test_skip_resume_restart_decisions(tmp_path):
    res = tmp_path
    run = lambda v, s: Run("e", v, "odt.py", "toy-vitamin-v0", s, ("--no-progress",))
    done, stopped, dead, fresh, both = run("a", 1), run("a", 2), run("a", 3), run("a", 4), run("a", 5)
    fabricate(res, done, 100, "summary.json", "checkpoint.pt")
    ckpt = fabricate(res, stopped, 100, "checkpoint.pt")
    empty = fabricate(res, dead, 100)
    old = fabricate(res, both, 100, "checkpoint.pt")  # an older attempt with a checkpoint ...
    newer = fabricate(res, both, 200)  # ... and a newer one that died before its first checkpoint
    # a variant whose name starts like another must not pick up that one's folders
    fabricate(res, run("a_b", 4), 100, "checkpoint.pt")

    assert [cell_state(res, r).state for r in (done, stopped, dead, fresh, both)] == [
        "done", "stopped", "started", "pending", "stopped"]
    assert prepare(res, done, python="python") is None
    assert prepare(res, stopped, python="python") == [
        "python", str(REPO / "odt.py"), "--resume", str(ckpt.relative_to(res)), "--no-progress"]
    assert prepare(res, dead, python="python") == fresh_cmd(dead) and not empty.exists()
    assert prepare(res, fresh, python="python") == fresh_cmd(fresh)
    assert prepare(res, both, python="python")[2:4] == ["--resume", str(old.relative_to(res))]
    assert old.exists() and not newer.exists()
    # a failed attempt is reported as failed until the cell is started again
    (res / "logs").mkdir()
    (res / "logs" / f"{stopped.name}.failed").write_text("crashed (exit status 1)\nTraceback ...\n")
    st = cell_state(res, stopped)
    assert (st.state, st.detail, st.folder) == ("failed", "crashed (exit status 1)", ckpt)
    assert status_counts(res, [done, stopped, dead, fresh]) == {"done": 1, "running": 0, "failed": 1, "pending": 2}
    assert prepare(res, stopped, python="python")[2] == "--resume"
    assert cell_state(res, stopped).state == "stopped"
    # a live process of this machine owns a cell: running; a dead one: the marker is ignored
    (res / "logs" / f"{fresh.name}.running").write_text(f"{os.uname().nodename}:{os.getpid()}")
    assert cell_state(res, fresh).state == "running"
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    (res / "logs" / f"{fresh.name}.running").write_text(f"{os.uname().nodename}:{dead_pid.pid}")
    assert cell_state(res, fresh).state == "pending"


def fresh_cmd(run: Run) -> list[str]:
    return ["python", str(REPO / "odt.py"), "--env-id", run.env_id, "--seed", str(run.seed), "--exp-name",
            run.variant, *run.flags]


def test_progress_line_counts_and_eta():
    line = progress_line({"done": 3, "running": 2, "failed": 1, "pending": 4}, 300, [60.0, 120.0], workers=2)
    # 6 runs left (2 running + 4 pending) × 90 s mean / 2 workers = 270 s
    assert line == "[sweep] 3/10 done | 2 running, 1 failed, 4 pending | elapsed 5m00s | ETA 4m30s"
    assert "ETA after the first run finishes" in progress_line({"done": 0, "running": 1, "pending": 0}, 5, [], 2)
    assert progress_line({"done": 4, "running": 0, "failed": 0, "pending": 0}, 5, [1.0], 2).endswith("complete")


# ---------------------------------------------------------------------------------------------------------
# real runs
# ---------------------------------------------------------------------------------------------------------
def benchmark(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.benchmark", *args], cwd=REPO, env=sweep_env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoints(res: Path) -> list[Path]:
    return sorted((res / "runs").glob("*/checkpoint.pt")) if (res / "runs").is_dir() else []


LONGER = f"""
seeds = [1]
flags = "{TINY}"
[experiments.toy]
env_ids = ["toy-vitamin-v0"]
flags = "--pretrain-updates PRE --online-steps 6 --updates-per-round 5"
[experiments.toy.variants]
odt = "odt.py"
"""


@pytest.mark.slow
def test_local_backend_two_real_runs_ctrl_c_resume_then_skip(tmp_path):
    """Two workers run two real runs; Ctrl-C stops both with a checkpoint (exit 3); re-issuing the command resumes
    both to the end; re-issuing it again starts nothing."""
    sweep = write_sweep(tmp_path / "two.toml", LONGER.replace("seeds = [1]", "seeds = [1, 2]").replace("PRE", "300"))
    res = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "common.benchmark", str(sweep), "--results", str(res),
                             "--workers", "2", "--threads-per-run", "1"], cwd=REPO, env=sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(checkpoints(res)) == 2, 120, "both runs' first checkpoints")
        proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the runner; it stops its scripts
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, out
    assert "2 worker(s) x 1 thread(s)" in out and "Re-issue the same command to resume" in out
    folders = sorted((res / "runs").iterdir())
    assert [f.name.rsplit("__", 1)[0] for f in folders] == ["toy-vitamin-v0__odt__1", "toy-vitamin-v0__odt__2"]
    assert all((f / "checkpoint.pt").is_file() and not (f / "summary.json").exists() for f in folders)
    runs = load_sweep(sweep).runs
    assert [cell_state(res, r).state for r in runs] == ["stopped", "stopped"]
    assert status_counts(res, runs) == {"done": 0, "running": 0, "failed": 0, "pending": 2}

    again = benchmark(str(sweep), "--results", str(res), "--workers", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(f"--resume runs/{f.name}" in again.stdout for f in folders)
    assert "[sweep] 2/2 done | 0 running, 0 failed, 0 pending" in again.stdout
    assert sorted((res / "runs").iterdir()) == folders
    for f in folders:
        summary = json.loads((f / "summary.json").read_text())
        assert summary["counters"]["updates"] == 300 + 6 * 5 and summary["counters"]["env_steps"] == 6
    log = (res / "logs" / "toy-vitamin-v0__odt__1.log").read_text()
    assert "1 thread(s)" in log and "--resume" in log and "final:" in log
    assert (res / "sweep.toml").read_text() == sweep.read_text()

    buf = io.StringIO()
    assert run_local(res, runs, workers=2, threads=1, out=buf) == 0
    assert "2 already done, 0 to run" in buf.getvalue() and "start " not in buf.getvalue()


@pytest.mark.slow
def test_submitit_local_preemption_requeues_and_resumes(tmp_path):
    """USR2 to the task (what Slurm sends before a time limit or on preemption) → the task SIGTERMs the script,
    which checkpoints and exits 3 → submitit requeues the task → it continues the run with --resume."""
    pytest.importorskip("submitit")
    sweep = write_sweep(tmp_path / "one.toml", LONGER.replace("PRE", "600"))  # long enough that USR2 lands mid-run
    res = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "common.benchmark", str(sweep), "--results", str(res),
                             "--backend", "submitit-local", "--time", "60"], cwd=REPO, env=sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: checkpoints(res), 120, "the run's first checkpoint")
        marker = next((res / "logs").glob("*.running"))
        script_pid = int(marker.read_text().split(":")[1])
        task_pid = int(Path(f"/proc/{script_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(task_pid, signal.SIGUSR2)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    (folder,) = (res / "runs").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["counters"]["updates"] == 600 + 6 * 5
    task_log = "".join(p.read_text() for p in (res / "submitit").glob("*_log.out"))
    assert "this job is preempted" in "".join(p.read_text() for p in (res / "submitit").glob("*_log.err"))
    assert "script stopped" in task_log and "(exit 3)" in task_log, task_log
    assert f"--resume runs/{folder.name}" in task_log
    assert "Requeued job" in task_log


def slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return False
    try:
        if subprocess.run(["squeue", "-h"], capture_output=True, timeout=10).returncode != 0:
            return False
        # and a node that can take a job now, so that the test does not wait on a drained cluster
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
        return any(s.strip() in ("idle", "mixed") for s in states.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not slurm_answers(), reason="needs a Slurm cluster (sbatch on PATH and squeue answering)")
def test_real_slurm_array_job(tmp_path):
    sweep = write_sweep(tmp_path / "two.toml", f"""
seeds = [1, 2]
flags = "{TINY} --pretrain-updates 5"
[experiments.toy]
env_ids = ["toy-vitamin-v0"]
flags = "--online-steps 2 --updates-per-round 2"
[experiments.toy.variants]
odt = "odt.py"
""")
    res = tmp_path / "res"
    out = benchmark(str(sweep), "--results", str(res), "--backend", "slurm", "--time", "10", "--cpus-per-task", "1",
                    "--wait", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "submitted 2 task(s) as array job" in out.stdout
    assert len(list((res / "runs").glob("*/summary.json"))) == 2
