"""Chaos test of the sweep runner and the scripts' checkpoints (issue 20, item 8). A tiny three-cell sweep (odt.py
on hopper-random-v2 with a 2000-step dataset generated at first use, odt_td3.py on toy-vitamin-v0, reinformer_ag.py on
toy-ag-v0; a checkpoint after every update) runs once without interruption (A, beside B), and once (B) while its
scripts are SIGKILLed at seeded random instants and the sweep is re-issued until every cell is done: at least 20
kills, at least one while a checkpoint's staging file was being written, at least one while the generated dataset
was being written (its staging folder was there), some with the runner killed too. On top of that, each script of
B SIGKILLs itself once at two worst-case instants (see INJECT). Every run of B must end with A's metrics rows,
summary.json and model tensors, wall-clock entries aside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.benchmark import cell_state, load_sweep
from conftest import REPO

MIN_KILLS = 20
MAX_CYCLES = 30  # kill cycles; each restarts every unfinished cell once
DEADLINE_S = 1500  # a hang fails with a message instead of blocking the suite
GENERATE_STEPS = 2000
COMMON = ("--no-progress --embed-dim 16 --n-layers 1 --n-heads 1 --batch-size 16 --warmup-steps 10 --context-len 5 "
          "--eval-context-len 3 --eval-episodes 1 --learning-rate 1e-3 --log-interval 1 --checkpoint-interval 1")
SWEEP = f"""
seeds = [1]
flags = "{COMMON}"
[experiments.gen]
env_ids = ["hopper-random-v2"]
flags = ["--generate-steps", "{GENERATE_STEPS}", "--pretrain-updates", "40", "--online-steps", "40",
         "--updates-per-round", "5", "--eval-interval", "40"]
[experiments.gen.variants]
odt = "odt.py"
[experiments.td3]
env_ids = ["toy-vitamin-v0"]
[experiments.td3.variants]
odt_td3 = "odt_td3.py --pretrain-updates 40 --online-steps 10 --updates-per-round 5 --eval-interval 5"
[experiments.rf]
env_ids = ["toy-ag-v0"]
[experiments.rf.variants]
rf = "reinformer_ag.py --pretrain-updates 80 --eval-interval 40 --ag-steps 1"
"""
WALL_CLOCK = {"charts/SPS", "wall_time_s", "run_dir"}  # and every "..._per_second" key (the scripts' speeds)
# On top of the random kills, each script of B SIGKILLs itself once at two instants chosen to be the worst (a
# `sitecustomize` on B's PYTHONPATH, through audit hooks; nothing in the repository changes): at the rename of the
# checkpoint that follows an evaluation row of the pretraining phase (the checkpoint is written, not yet in place),
# and when summary.json is opened for writing (the final metrics row and model.pt are written). A marker file per
# (instant, cell) in $CHAOS_INJECT_DIR makes each fire once.
INJECT = r'''
import os, signal, sys

_DIR = os.environ.get("CHAOS_INJECT_DIR")
_busy = False


def _cell(folder):
    return os.path.basename(os.path.abspath(folder)).rpartition("__")[0]


def _kill_once(tag):
    try:
        os.close(os.open(os.path.join(_DIR, tag), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _after_eval_row(folder):
    try:
        with open(os.path.join(folder, "metrics.jsonl"), "rb") as fh:
            last = fh.read().splitlines()[-1]
    except (OSError, IndexError):
        return False
    return b'"phase": "pretrain"' in last and b'"eval/return_mean"' in last


def _hook(event, args):
    global _busy
    if _busy or _DIR is None or event not in ("open", "os.rename"):
        return
    _busy = True
    try:
        if isinstance(args[0], int):  # open(fd)
            return
        path = os.fsdecode(os.fspath(args[1] if event == "os.rename" else args[0]))
        folder, name = os.path.split(path)
        if event == "os.rename" and name == "checkpoint.pt" and _after_eval_row(folder):
            _kill_once("checkpoint-after-eval__" + _cell(folder))
        elif event == "open" and name == "summary.json" and str(args[1]).startswith("w"):
            _kill_once("summary__" + _cell(folder))
    except TypeError:
        pass
    finally:
        _busy = False


sys.addaudithook(_hook)
'''


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, "MINARI_DATASETS_PATH": str(root / "minari"), "D4RL_DATASET_DIR": str(root / "d4rl"),
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start_sweep(sweep: Path, results: Path, env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "common.benchmark", str(sweep), "--workers", "3",
                             "--threads-per-run", "1", "--results", str(results), "--no-preflight"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None once it is gone (reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := proc_stat(int(entry.name))) and st[1] == pid and st[0] != "Z":
            found.append(int(entry.name))
    return found


def cell_of(pid: int) -> str | None:
    """The sweep cell a script process runs, from its command line (fresh: --env-id/--exp-name/--seed; resumed:
    the run folder's name)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    flag = lambda name: argv[argv.index(name) + 1] if name in argv else None
    if flag("--resume"):
        return Path(flag("--resume")).name.rpartition("__")[0]
    if flag("--env-id") and flag("--exp-name") and flag("--seed"):
        return f"{flag('--env-id').replace('/', '-')}__{flag('--exp-name')}__{flag('--seed')}"
    return None


def kill_scripts(runner: subprocess.Popen, kill_runner: bool) -> dict[int, str | None]:
    """SIGKILL every script the runner has started (and the runner too if asked); returns {pid: cell}."""
    os.kill(runner.pid, signal.SIGSTOP)  # frozen: it starts no script while its scripts are killed
    victims = {pid: cell_of(pid) for pid in children(runner.pid)}
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    os.kill(runner.pid, signal.SIGKILL if kill_runner else signal.SIGCONT)
    return victims


def reaped(pids, timeout: float = 20.0) -> None:
    """Wait until killed processes are gone from /proc: a zombie still counts as alive to the runner's
    `os.kill(pid, 0)`, so a re-issued sweep would take its cell for running elsewhere."""
    deadline = time.time() + timeout
    while any(proc_stat(p) is not None for p in pids) and time.time() < deadline:
        time.sleep(0.01)


def tmp_files(results: Path, name: str) -> dict[Path, tuple[int, int]]:
    found = {}
    for p in (results / "runs").glob(f"{name}__*/checkpoint.pt.tmp"):
        try:
            st = p.stat()
        except OSError:
            continue
        found[p] = (st.st_ino, st.st_mtime_ns)
    return found


def new_tmp(results: Path, name: str, before: dict[str, dict[Path, tuple[int, int]]]) -> bool:
    """A checkpoint staging file written since `before` is there: its writer is between open and rename (or died
    there). A staging file that went away with its folder (a run killed in its first checkpoint) is not one."""
    return any(before[name].get(p) != st for p, st in tmp_files(results, name).items())


def checkpoints(results: Path) -> set[tuple[Path, int]]:
    found = set()
    for p in (results / "runs").glob("*/checkpoint.pt"):
        try:
            found.add((p, p.stat().st_ino))  # a new checkpoint is a new inode (os.replace of the staging file)
        except OSError:
            pass
    return found


def staging(minari: Path) -> set[str]:
    return {p.name for p in minari.glob(".staging-*")} if minari.is_dir() else set()


def comparable(value):
    """Drop wall-clock entries (anywhere in a nested dict)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in WALL_CLOCK and not k.endswith("per_second")}
    return value


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    assert isinstance(obj, dict), f"{prefix}: unexpected {type(obj).__name__} in model.pt"
    out = {}
    for k, v in obj.items():
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def finished_runs(results: Path, sweep_file: Path) -> dict[str, Path]:
    runs = {}
    for run in load_sweep(sweep_file).runs:
        st = cell_state(results, run)
        assert st.state == "done", f"{run.name}: {st.state} {st.detail}"
        runs[run.name] = st.folder
    leftovers = sorted(p.name for p in (results / "runs").iterdir() if p not in runs.values())
    assert not leftovers, f"run folders besides the finished ones: {leftovers}"
    return runs


ACTIVE: list[subprocess.Popen] = []  # B's runner of the moment, for the clean-up of a failed test


@pytest.mark.slow
def test_sigkill_at_random_instants_then_resume_equals_an_uninterrupted_sweep(tmp_path):
    t_start = time.time()
    sweep_file = tmp_path / "chaos.toml"
    sweep_file.write_text(SWEEP)
    names = [r.name for r in load_sweep(sweep_file).runs]
    hopper = next(n for n in names if n.startswith("hopper"))

    # A: uninterrupted, beside B (nothing in a run depends on the machine's load), its own dataset cache
    a_log = open(tmp_path / "a.log", "w")  # noqa: SIM115
    sweep_a = start_sweep(sweep_file, tmp_path / "A", env_for(tmp_path / "a"), a_log)

    try:
        chaos_sweep_then_compare(tmp_path, sweep_file, names, hopper, sweep_a, t_start)
    finally:  # a failed test leaves no script running
        for proc in (sweep_a, *ACTIVE):
            if proc.poll() is None:
                kill_scripts(proc, kill_runner=True)
                proc.wait()
        a_log.close()


def chaos_sweep_then_compare(tmp_path: Path, sweep_file: Path, names: list[str], hopper: str,
                             sweep_a: subprocess.Popen, t_start: float) -> None:
    # B: kill -9 at random instants, re-issue until complete
    rng = np.random.default_rng(20)
    results, env, minari = tmp_path / "B", env_for(tmp_path / "b"), tmp_path / "b" / "minari"
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT)
    (tmp_path / "injected").mkdir()
    env.update(PYTHONPATH=f"{tmp_path / 'inject'}{os.pathsep}{REPO}", CHAOS_INJECT_DIR=str(tmp_path / "injected"))
    runs = load_sweep(sweep_file).runs
    kills = {"total": 0, "checkpoint write": 0, "dataset write": 0, "before the dataset was there": 0, "runner": 0}
    instants: list[str] = []
    false_complete = 0  # a runner that said "complete" (exit 0) while a cell was still not done
    issues = 0
    deadline = time.time() + DEADLINE_S
    while True:
        assert issues < MAX_CYCLES + 10, f"the sweep never completed; kills {kills}, instants {instants}"
        assert time.time() < deadline, f"over {DEADLINE_S} s; kills {kills}, instants {instants}"
        issues += 1
        log = open(tmp_path / f"b{issues}.log", "w")  # noqa: SIM115
        if (kills["total"] >= MIN_KILLS and kills["checkpoint write"]) or issues > MAX_CYCLES:  # let it finish
            ACTIVE[:] = [start_sweep(sweep_file, results, env, log)]
            code = ACTIVE[0].wait(timeout=max(1.0, deadline - time.time()))
            log.close()
            if all(cell_state(results, r).state == "done" for r in runs):
                break
            false_complete += code == 0
            time.sleep(0.5)
            continue
        # the instant of this cycle's kill
        if kills["dataset write"] == 0 and not (minari / "generated").exists() and issues <= 3:
            how = "dataset"  # when the generated dataset is being written (its staging folder appears)
        elif kills["checkpoint write"] == 0 and issues > 3:
            how = "checkpoint"  # until one kill has landed in a checkpoint write
        else:
            how = str(rng.choice(["checkpoint", "progress", "progress", "timer"]))
        delay = float(rng.uniform(0.0, 2.5) if how == "timer" else rng.uniform(0.0, 0.4))
        kill_runner = bool(rng.random() < 0.3)
        before_tmp = {n: tmp_files(results, n) for n in names}
        before_ckpt = checkpoints(results) if results.exists() else set()
        before_staging = staging(minari)
        runner = start_sweep(sweep_file, results, env, log)
        ACTIVE[:] = [runner]
        t0, fire_at, last_scan = None, None, 0.0
        victims: dict[int, str | None] = {}
        while runner.poll() is None and time.time() < deadline:
            now = time.time()
            if t0 is None and now - last_scan > 0.05:  # the instant the runner's first script started
                last_scan = now
                t0 = now if children(runner.pid) else None
            if fire_at is None and t0 is not None:
                if how == "timer":
                    fire_at = t0 + delay
                elif how == "dataset" and staging(minari) - before_staging:
                    fire_at = now
                elif how == "checkpoint" and (writing := [n for n in names if new_tmp(results, n, before_tmp)]):
                    fire_at = now
                    try:  # at once, before the write ends: the writer's pid from the runner's marker
                        pid = int((results / "logs" / f"{writing[0]}.running").read_text().rpartition(":")[2])
                        if (proc_stat(pid) or ("", 0))[1] == runner.pid:
                            os.kill(pid, signal.SIGKILL)
                            victims[pid] = writing[0]
                    except (OSError, ValueError):
                        pass
                elif how == "progress" and checkpoints(results) - before_ckpt:
                    fire_at = now + delay
            if fire_at is not None and now >= fire_at:
                break
            time.sleep(0.002)
        dataset_there = (minari / "generated").exists()
        if runner.poll() is None:
            victims.update(kill_scripts(runner, kill_runner))
            kills["runner"] += kill_runner
        reaped(victims)
        for name in victims.values():
            kills["total"] += 1
            if name in before_tmp and new_tmp(results, name, before_tmp):
                kills["checkpoint write"] += 1
            if name == hopper and staging(minari) - before_staging:  # its staging folder (named by its pid)
                kills["dataset write"] += 1
            if name == hopper and not dataset_there:
                kills["before the dataset was there"] += 1
        at = f"{fire_at - t0:.2f}s" if fire_at is not None and t0 is not None else "-"
        instants.append(f"{how}@{at}:{len(victims)}{'+runner' if kill_runner else ''}")
        runner.wait(timeout=max(1.0, deadline - time.time()))
        log.close()

    assert sweep_a.wait(timeout=max(1.0, deadline - time.time())) == 0, (tmp_path / "a.log").read_text()[-3000:]
    elapsed = time.time() - t_start
    injected = sorted(p.name for p in (tmp_path / "injected").iterdir())
    report = (f"random kills {kills}; injected kills {injected}; cycles {instants}; runner exits 0 with cells not "
              f"done: {false_complete}; {elapsed:.0f} s in all")
    print(report)
    assert kills["total"] >= MIN_KILLS, report
    assert kills["checkpoint write"] >= 1 and kills["dataset write"] >= 1, report

    a_runs, b_runs = finished_runs(tmp_path / "A", sweep_file), finished_runs(results, sweep_file)
    for name in names:
        a, b = a_runs[name], b_runs[name]
        rows = lambda folder: [comparable(json.loads(line)) for line in (folder / "metrics.jsonl").read_text()
                               .splitlines() if line]
        ra, rb = rows(a), rows(b)
        first = next((i for i in range(max(len(ra), len(rb))) if ra[i:i + 1] != rb[i:i + 1]), None)
        assert first is None, (f"{name}: metrics differ ({len(ra)} rows uninterrupted, {len(rb)} after the kills); "
                               f"first difference at row {first}: {ra[first:first + 2]} vs {rb[first:first + 2]}; "
                               f"{report}")
        summary = lambda folder: comparable(json.loads((folder / "summary.json").read_text()))
        assert summary(b) == summary(a), f"{name}: summary.json differs; {report}"
        ta = tensors(torch.load(a / "model.pt", map_location="cpu", weights_only=True))
        tb = tensors(torch.load(b / "model.pt", map_location="cpu", weights_only=True))
        assert ta.keys() == tb.keys(), name
        unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not unequal, f"{name}: model tensors differ: {unequal}; {report}"
