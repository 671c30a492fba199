"""Run a sweep (scripts × env ids × seeds × named flag variants) locally or on Slurm, skipping finished runs
and resuming stopped ones, so the same command can be re-issued until the sweep is complete.

    python -m common.benchmark benchmarks/toys.toml --workers 2 --threads-per-run 1      # local processes
    python -m common.benchmark benchmarks/toys.toml --dry-run                            # what would run
    python -m common.benchmark benchmarks/toys.toml --status                             # done / stopped / ...
    python -m common.benchmark benchmarks/hopper_random_cpu.toml --backend slurm \\
        --partition gpu --time 24:00:00 --cpus-per-task 4 --mem 16 --gpus 1               # one Slurm array job
    python -m common.report results/toys                                                 # tables and plots

A sweep file (TOML) names the runs; every run is `python <script> --env-id E --seed S --exp-name VARIANT
<sweep flags> <experiment flags> <variant flags>` (later flags win), started with the results folder as its
working directory, so its run folder is `RESULTS/runs/{env_id}__{variant}__{seed}__{unix time}/`:

    seeds = [1, 2, 3, 4, 5]
    flags = "--no-progress"                       # shared by every run
    order = "experiments"                         # optional: experiment by experiment (default: seed by seed)
    [experiments.td3]                             # experiments group variants that are compared with each other
    env_ids = ["hopper-random-v2"]
    flags = "--embed-dim 128 --online-steps 10000"
    [experiments.td3.variants]                    # variant name = --exp-name = run folder; unique in the file
    odt_td3 = "odt_td3.py"
    odt_td3_alpha0 = "odt_td3.py --alpha-online 0"

The state of a (env, variant, seed) cell is read from its run folders: `summary.json` → done (skipped); a
`checkpoint.pt` → stopped (continued with `--resume <folder>`); a folder with neither → removed and started
fresh. Exit statuses of a script: 0 finished, 3 stopped by SIGTERM/SIGINT after checkpointing (resumable),
2 configuration error, anything else a crash. Local runs write `RESULTS/logs/<cell>.log`; a failed cell also
leaves `RESULTS/logs/<cell>.failed` (exit status and the log's tail) until it is started again.

On Slurm (through submitit) all pending cells go out as one array job. Slurm sends USR2 `--signal-delay`
seconds before the time limit; the task then sends SIGTERM to the script, which checkpoints and exits 3 within
seconds, and submitit requeues the task, which continues the run with `--resume`. Preemption by Slurm itself
(SIGTERM to every process of the job) reaches the script directly; a requeued task resumes the same way.
`--backend submitit-local` runs the same code path with submitit's local executor (used by the tests).

One runner per cell: whoever runs a cell (a local worker, a Slurm task) first takes `RESULTS/logs/<cell>.lock`
(fcntl.flock, exclusive, non-blocking) and holds it until the script has ended and its end is recorded; a cell
whose lock is held is skipped as running elsewhere, so two runners started on one sweep folder (or a local runner
beside a Slurm array) never run the same cell twice. The kernel drops the lock of a killed runner.

For a GPU cluster (the papers' tables are benchmarks/paper_*.toml):
    python -m common.benchmark benchmarks/paper_odt_td3.toml --preflight   # datasets: here / to fetch / missing
    python -m common.benchmark benchmarks/paper_odt_td3.toml --cost        # GPU-hours from common.bench --cuda
    python -m common.benchmark benchmarks/paper_odt_td3.toml --backend slurm --gpus 1 --cpus-per-task 4 \
        --runs-per-gpu 2 --time 24:00:00 --compact                          # 2 cells side by side per GPU task
Before anything runs, the preflight looks up every cell's dataset without loading or fetching it: on disk (the
Minari cache, the D4RL folder, a dataset generated earlier), generated at first use (a *-random-v2 stand-in), can be
downloaded (`python -m common.datasets --download-all --names ...`), or cannot be had (e.g. D4RL's 111-dim ant
files); cells whose data is not on disk (nor generated) are refused, all listed in one message, and the others go
ahead (exit status 1 at the end; `--no-preflight` skips the check). `--runs-per-gpu k` makes each array task run
k cells side by side, each its own script process on the task's GPU (--cpus-per-task defaults to k x
--threads-per-run); on USR2 the task stops all k (they checkpoint) and the requeued task resumes them. `--cost`
(also printed by `--dry-run` and before a Slurm submission) multiplies each script's updates and env steps per cell
(from its own per-dataset tables) by the GPU time per update and per env step read from saved outputs of
`python -m common.bench --script S --shape paper --cuda` in `--bench-dir` (default results/bench/*.txt); where a
figure was never measured on a GPU it says which, and the command that measures it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import functools
import importlib.util
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
STOPPED_EXIT = 3  # the scripts' exit status after a SIGTERM/SIGINT checkpoint: resumable
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STALE_AFTER_S = 15 * 60  # a "running" marker from another node whose run wrote nothing for this long is stale
STATES = ("done", "running", "failed", "stopped", "started", "pending")


class SweepError(Exception):
    """A problem with the sweep file or the command line, reported as one paragraph without a traceback."""


# ---------------------------------------------------------------------------------------------------------
# sweep file → grid of runs
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One cell of the grid: a script, its flags, and the (env_id, variant, seed) that name its run folder."""

    experiment: str
    variant: str
    script: str
    env_id: str
    seed: int
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The run-folder prefix the scripts use: env id with '/' replaced by '-', exp name, seed."""
        return f"{self.env_id.replace('/', '-')}__{self.variant}__{self.seed}"

    def command(self, python: str = sys.executable, scripts_dir: Path = REPO) -> list[str]:
        return [python, str(scripts_dir / self.script), "--env-id", self.env_id, "--seed", str(self.seed),
                "--exp-name", self.variant, *self.flags]

    def resume_command(self, folder: Path, python: str = sys.executable, scripts_dir: Path = REPO) -> list[str]:
        # a resumed run takes its saved configuration; only the display flag is read from the command line
        quiet = ["--no-progress"] if "--no-progress" in self.flags else []
        return [python, str(scripts_dir / self.script), "--resume", str(folder), *quiet]


@dataclass
class Sweep:
    path: Path
    runs: list[Run]
    experiments: dict[str, dict] = field(default_factory=dict)


def _split(flags, where: str) -> list[str]:
    if isinstance(flags, list) and all(isinstance(f, str) for f in flags):
        return list(flags)
    if isinstance(flags, str):
        return shlex.split(flags)
    raise SweepError(f"{where}: flags must be a string (\"--a 1 --b 2\") or a list of strings, got {flags!r}.")


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
        raise SweepError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds = [1, 2, 3], got {value!r}.")
    if len(set(value)) != len(value):
        raise SweepError(f"{where}: seeds {value} has duplicates.")
    return value


def load_sweep(path: str | Path, scripts_dir: Path = REPO) -> Sweep:
    """Parse a sweep file and expand it into its grid, seeds outermost (so early seeds of every variant finish
    first and a half-done sweep is already comparable); with `order = "experiments"`, one experiment after the
    other, seeds outermost within each (so the first experiment reaches all its seeds, and its verdicts, first)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist. Sweep files live in benchmarks/ (e.g. "
                         f"benchmarks/toys.toml); see `python -m common.benchmark --help` for the format.")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"sweep file {path} is not valid TOML: {exc}.") from exc
    unknown = set(spec) - {"seeds", "flags", "experiments", "title", "description", "claims", "order"}
    if unknown:
        raise SweepError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: seeds, flags, experiments, "
                         f"title, description, claims, order.")
    if spec.get("order", "seeds") not in ("seeds", "experiments"):
        raise SweepError(f"{path}: order = {spec['order']!r}; allowed: \"seeds\" (every variant's seed 1 first, "
                         f"the default) or \"experiments\" (the file's experiments one after the other).")
    experiments = spec.get("experiments")
    if not isinstance(experiments, dict) or not experiments:
        raise SweepError(f"{path}: no [experiments.NAME] table. Each experiment needs env_ids and a "
                         f"[experiments.NAME.variants] table of name = \"script.py --flags\".")
    top_flags = _split(spec.get("flags", []), f"{path}: flags")
    runs: list[tuple[int, Run]] = []
    seen_variants: dict[str, str] = {}
    for exp_name, exp in experiments.items():
        where = f"{path}: [experiments.{exp_name}]"
        if not isinstance(exp, dict):
            raise SweepError(f"{where} must be a table.")
        unknown = set(exp) - {"env_ids", "seeds", "flags", "variants", "title", "description", "claims"}
        if unknown:
            raise SweepError(f"{where}: unknown keys {sorted(unknown)}; allowed: env_ids, seeds, flags, variants, "
                             f"title, description, claims.")
        env_ids = exp.get("env_ids")
        if not isinstance(env_ids, list) or not env_ids or not all(isinstance(e, str) and e for e in env_ids):
            raise SweepError(f"{where}: env_ids must be a non-empty list of dataset names, e.g. "
                             f"env_ids = [\"hopper-random-v2\"].")
        seeds = _seeds(exp.get("seeds", spec.get("seeds")), where)
        exp_flags = _split(exp.get("flags", []), f"{where} flags")
        variants = exp.get("variants")
        if not isinstance(variants, dict) or not variants:
            raise SweepError(f"{where}: needs a variants table: [experiments.{exp_name}.variants] with lines "
                             f"like odt_td3_alpha0 = \"odt_td3.py --alpha-online 0\".")
        for variant, line in variants.items():
            if not NAME.match(variant) or "__" in variant:
                raise SweepError(f"{where}: variant name {variant!r} must be letters, digits, '_', '-', '.' "
                                 f"without '__' (it becomes --exp-name and part of the run folder name).")
            if variant in seen_variants:
                raise SweepError(f"{where}: variant {variant!r} is also defined in [experiments."
                                 f"{seen_variants[variant]}]; variant names must be unique in a sweep file "
                                 f"because they name the run folders.")
            seen_variants[variant] = exp_name
            words = _split(line, f"{where} variant {variant}")
            if not words or not words[0].endswith(".py"):
                raise SweepError(f"{where}: variant {variant} = {line!r} must start with a script, e.g. "
                                 f"\"odt_td3.py --alpha-online 0\".")
            script, variant_flags = words[0], words[1:]
            if not (scripts_dir / script).is_file():
                raise SweepError(f"{where}: variant {variant}: script {script} not found in {scripts_dir}.")
            reserved = {"--env-id", "--seed", "--exp-name", "--resume"} & {
                f.split("=")[0] for f in top_flags + exp_flags + variant_flags}
            if reserved:
                raise SweepError(f"{where}: variant {variant}: {sorted(reserved)} are set by the sweep (env_ids, "
                                 f"seeds, the variant name); remove them from the flags.")
            for env_id in env_ids:
                for seed in seeds:
                    runs.append((seed, Run(exp_name, variant, script, env_id, seed,
                                           tuple(top_flags + exp_flags + variant_flags))))
    order = {s: i for i, s in enumerate(dict.fromkeys(s for s, _ in runs))}
    experiment = {e: i for i, e in enumerate(experiments)} if spec.get("order") == "experiments" else {}
    # stable: (the experiment,) then the seed, then the file's order
    runs.sort(key=lambda sr: (experiment.get(sr[1].experiment, 0), order[sr[0]]))
    return Sweep(path, [r for _, r in runs], experiments)


# ---------------------------------------------------------------------------------------------------------
# the state of a cell, read from disk
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CellState:
    state: str  # one of STATES
    folder: Path | None = None  # the finished run, or the one to resume
    stale: list[Path] = field(default_factory=list)  # folders with no checkpoint: removed before a fresh start
    detail: str = ""


def _folders(results: Path, run: Run) -> list[Path]:
    found = [p for p in (results / "runs").glob(f"{run.name}__*") if p.is_dir()]
    stamp = lambda p: int(p.name.rsplit("__", 1)[-1]) if p.name.rsplit("__", 1)[-1].isdigit() else 0
    return sorted(found, key=lambda p: (stamp(p), p.name))  # oldest first


def _marker(results: Path, run: Run, kind: str) -> Path:
    return results / "logs" / f"{run.name}.{kind}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped yet: its runner was killed) is not running
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cell_state(results: Path, run: Run) -> CellState:
    """done (a summary.json), running (a live process of this sweep owns it), failed (the last attempt crashed),
    stopped (a checkpoint to resume), started (a folder without checkpoint: a run that died early), pending."""
    folders = _folders(results, run)
    finished = [f for f in folders if (f / "summary.json").is_file()]
    if finished:
        return CellState("done", finished[-1])
    running = _marker(results, run, "running")
    if running.is_file():
        host, _, pid = running.read_text().strip().partition(":")
        if host == os.uname().nodename:
            alive = pid.isdigit() and _pid_alive(int(pid))
        else:  # another node: trust the marker while the run's log or metrics keep changing
            touched = [p.stat().st_mtime for p in [_marker(results, run, "log"), running]
                       + [f / "metrics.jsonl" for f in folders] if p.is_file()]
            alive = time.time() - max(touched) < STALE_AFTER_S
        if alive:
            return CellState("running", folders[-1] if folders else None, detail=f"{host}:{pid}")
    resumable = [f for f in folders if (f / "checkpoint.pt").is_file()]
    stale = [f for f in folders if f not in resumable]
    failed = _marker(results, run, "failed")
    if failed.is_file():
        lines = failed.read_text().strip().splitlines()
        return CellState("failed", resumable[-1] if resumable else None, stale, lines[0] if lines else "")
    if resumable:
        return CellState("stopped", resumable[-1], stale)
    if stale:
        return CellState("started", None, stale)
    return CellState("pending")


def prepare(results: Path, run: Run, python: str = sys.executable, scripts_dir: Path = REPO) -> list[str] | None:
    """Decide what to do with a cell: None if done, else the command (fresh or --resume); removes run folders
    that have no checkpoint (nothing in them can be continued) and the previous failure marker."""
    st = cell_state(results, run)
    if st.state == "done":
        return None
    for folder in st.stale:
        shutil.rmtree(folder, ignore_errors=True)
    _marker(results, run, "failed").unlink(missing_ok=True)
    if st.folder is not None:
        return run.resume_command(st.folder.relative_to(results), python, scripts_dir)
    return run.command(python, scripts_dir)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _ignore_usr2() -> None:
    # Slurm's --signal (USR2 before the time limit) goes to every process of the job step; an ignored signal
    # stays ignored across exec, so the script is not killed by it: the task stops it with SIGTERM instead.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def launch(results: Path, run: Run, cmd: list[str], threads: int) -> subprocess.Popen:
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"{run.name}.log", "a")  # noqa: SIM115 — closed when the process is reaped
    log.write(f"\n$ {shlex.join(cmd)}   # cwd {results}, {threads} thread(s), {time.strftime('%F %T')}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=results, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_ignore_usr2)
    proc.log = log  # type: ignore[attr-defined]
    _marker(results, run, "running").write_text(f"{os.uname().nodename}:{proc.pid}")
    return proc


def finish(results: Path, run: Run, returncode: int) -> str:
    """Record how a process ended: done, stopped (exit 3, resumable) or failed (marker with the log's tail)."""
    _marker(results, run, "running").unlink(missing_ok=True)
    if returncode == 0 and cell_state(results, run).state == "done":
        return "done"
    st = cell_state(results, run)
    if returncode == STOPPED_EXIT or (returncode == 0 and st.state == "stopped"):  # exit 0: scripts before exit 3
        return "stopped"
    log = _marker(results, run, "log")
    tail = log.read_text(errors="replace").strip().splitlines()[-15:] if log.is_file() else []
    why = ("exited 0 without writing summary.json" if returncode == 0 else
           "configuration error (exit 2)" if returncode == 2 else f"crashed (exit status {returncode})")
    _marker(results, run, "failed").write_text(f"{why}\n" + "\n".join(tail) + "\n")
    return "failed"


# ---------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------
def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(counts: dict[str, int], elapsed: float, durations: list[float], workers: int) -> str:
    """`[sweep] 3/10 done | 2 running, 1 failed, 4 pending | elapsed 5m00s | ETA 12m30s`; the ETA is the mean
    wall time of the runs finished so far times the runs left, spread over the workers."""
    done, running, failed, pending = (counts.get(k, 0) for k in ("done", "running", "failed", "pending"))
    left = running + pending
    if not left:
        eta = "complete" if not failed else "finished with failures"
    elif durations:
        eta = "ETA " + _hms(sum(durations) / len(durations) * left / max(1, min(workers, left)))
    else:
        eta = "ETA after the first run finishes"
    return (f"[sweep] {done}/{done + left + failed} done | {running} running, {failed} failed, {pending} pending | "
            f"elapsed {_hms(elapsed)} | {eta}")


def status_counts(results: Path, runs: list[Run]) -> dict[str, int]:
    """done / running / failed / pending (pending includes stopped and started cells: they will be continued)."""
    counts, _ = status_table(results, runs)
    return {"done": counts["done"], "running": counts["running"], "failed": counts["failed"],
            "pending": counts["pending"] + counts["stopped"] + counts["started"]}


def status_table(results: Path, runs: list[Run]) -> tuple[dict[str, int], list[str]]:
    counts = {s: 0 for s in STATES}
    lines = []
    for run in runs:
        st = cell_state(results, run)
        counts[st.state] += 1
        where = f"  {st.folder.relative_to(results)}" if st.folder else ""
        lines.append(f"  {st.state:8s} {run.name}{where}{'  ' + st.detail if st.detail else ''}")
    return counts, lines


# ---------------------------------------------------------------------------------------------------------
# local backend
# ---------------------------------------------------------------------------------------------------------
def run_local(results: Path, runs: list[Run], workers: int, threads: int, python: str = sys.executable,
              scripts_dir: Path = REPO, compact: bool = False, out=sys.stdout) -> int:
    """Run every unfinished cell with `workers` processes of `threads` threads each. Ctrl-C / SIGTERM stops all
    running scripts at their next safe point (they checkpoint and exit 3); re-issuing the command resumes them.
    Returns 0 when every cell is done, 1 when some failed, 3 when stopped."""
    states = {r: cell_state(results, r).state for r in runs}
    todo = [r for r in runs if states[r] not in ("done", "running")]
    elsewhere = [r for r in runs if states[r] == "running"]  # a live process (another runner, a Slurm task)
    counts = {"done": len(runs) - len(todo) - len(elsewhere), "running": 0, "failed": 0, "pending": len(todo)}
    print(f"[sweep] {len(runs)} runs, {counts['done']} already done, {len(todo)} to run with {workers} worker(s) "
          f"x {threads} thread(s); logs in {results / 'logs'}", file=out, flush=True)
    if elsewhere:
        print(f"[sweep] {len(elsewhere)} run(s) are running in another process and are left alone: "
              f"{', '.join(r.name for r in elsewhere)}", file=out, flush=True)
    stop = {"requested": False}

    def on_signal(signum, frame):
        if stop["requested"]:
            return
        stop["requested"] = True
        print(f"\n[sweep] {signal.Signals(signum).name}: stopping {len(active)} running script(s); they "
              f"checkpoint and exit. Re-issue the same command to resume.", file=out, flush=True)
        for proc, _, _ in active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    active: dict[int, tuple[subprocess.Popen, Run, float]] = {}
    durations: list[float] = []
    failed: list[Run] = []
    start, last_print = time.time(), 0.0
    queue = list(todo)
    try:
        while queue or active:
            while queue and len(active) < workers and not stop["requested"]:
                run = queue.pop(0)
                taken = claim_cell(results, run)
                if taken != "ours":  # another runner (or a Slurm task) holds the cell's lock, or finished it
                    counts["pending"] -= 1
                    counts["done"] += taken == "done"
                    if taken != "done":
                        elsewhere.append(run)
                        print(f"[sweep] skip {run.name}: {taken} in another process", file=out, flush=True)
                    continue
                cmd = prepare(results, run, python, scripts_dir)
                counts["pending"] -= 1
                if cmd is None:
                    release(results, run)
                    counts["done"] += 1
                    continue
                proc = launch(results, run, cmd, threads)
                active[proc.pid] = (proc, run, time.time())
                counts["running"] += 1
                print(f"[sweep] start {run.name}: {shlex.join(cmd[1:])}", file=out, flush=True)
            if stop["requested"] and not active:
                break
            changed = False
            for pid, (proc, run, t0) in list(active.items()):
                if proc.poll() is None:
                    continue
                proc.log.close()
                del active[pid]
                counts["running"] -= 1
                outcome = finish(results, run, proc.returncode)
                release(results, run)
                if outcome == "done":
                    counts["done"] += 1
                    durations.append(time.time() - t0)
                    if compact:
                        compact_run(cell_state(results, run).folder)
                elif outcome == "stopped":
                    counts["pending"] += 1
                else:
                    counts["failed"] += 1
                    failed.append(run)
                    print(f"[sweep] FAILED {run.name}: {_marker(results, run, 'failed').read_text().splitlines()[0]}"
                          f" — see {_marker(results, run, 'log')}", file=out, flush=True)
                changed = True
            now = time.time()
            if changed or now - last_print > 30:
                print(progress_line(counts, now - start, durations, workers), file=out, flush=True)
                last_print = now
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stop["requested"]:
        print(f"[sweep] stopped: {counts['done']}/{len(runs)} done. Re-issue the same command to resume.",
              file=out, flush=True)
        return STOPPED_EXIT
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {', '.join(r.name for r in failed)}. Their logs are in "
              f"{results / 'logs'}; re-issuing the command retries them (resuming from their checkpoints).",
              file=out, flush=True)
        return 1
    unfinished = [r for r in runs if cell_state(results, r).state != "done"]
    if unfinished:  # running in another process: not complete yet
        print(f"[sweep] not complete: {len(unfinished)} run(s) still running elsewhere: "
              f"{', '.join(r.name for r in unfinished)}. Re-issue the command once they end.", file=out, flush=True)
        return STOPPED_EXIT
    print(f"[sweep] complete: {len(runs)} runs in {results / 'runs'}. Report: python -m common.report {results}",
          file=out, flush=True)
    return 0


def compact_run(folder: Path | None) -> None:
    """Drop the weights of a finished run (checkpoint.pt, model.pt): what is left is what the report reads."""
    if folder is not None and (folder / "summary.json").is_file():
        for name in ("checkpoint.pt", "model.pt"):
            (folder / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Slurm backend (submitit)
# ---------------------------------------------------------------------------------------------------------
def wait_or_kill(proc: subprocess.Popen, deadline: float) -> None:
    """Wait for a script that was sent SIGTERM to exit (it checkpoints first); SIGKILL it past `deadline` (its last
    periodic checkpoint is still there to resume from). waitid(WNOWAIT) peeks without reaping, so it cannot race
    with the poll() loop of the task that launched it."""
    try:
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.time() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
    except (ProcessLookupError, ChildProcessError):
        pass


class SweepTask:
    """What one array task runs: decide the cell's state, start the script (fresh or `--resume`), wait.
    On USR2 (Slurm's warning before the time limit, or a preemption notice) submitit calls `checkpoint`, which
    stops the script with SIGTERM (it checkpoints and exits 3) and hands back the same call, which submitit
    requeues; the requeued call finds the checkpoint and resumes."""

    def __init__(self, results: str, threads: int, scripts_dir: str = str(REPO), stop_timeout_s: float = 60.0,
                 compact: bool = False):
        self.results, self.threads, self.scripts_dir = results, threads, scripts_dir
        self.stop_timeout_s, self.compact = stop_timeout_s, compact
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._proc = None

    def __call__(self, run: Run) -> str:
        results = Path(self.results)
        taken = claim_cell(results, run)
        if taken != "ours":
            return f"{run.name}: {'already done' if taken == 'done' else taken + ' in another process, skipped'}"
        cmd = prepare(results, run, sys.executable, Path(self.scripts_dir))
        if cmd is None:
            release(results, run)
            return f"{run.name}: already done"
        print(f"[task] {run.name}: {shlex.join(cmd)}", flush=True)
        self._proc = launch(results, run, cmd, self.threads)
        # poll instead of wait(): the signal handler (checkpoint) may run while we are here
        while self._proc.poll() is None:
            time.sleep(0.5)
        self._proc.log.close()
        outcome = finish(results, run, self._proc.returncode)
        release(results, run)
        if outcome == "done":
            if self.compact:
                compact_run(cell_state(results, run).folder)
            return f"{run.name}: done"
        if outcome == "stopped":
            raise RuntimeError(f"{run.name}: the script was stopped by a signal (exit 3) and checkpointed; a "
                               f"requeued task or a re-issued sweep resumes it.")
        raise RuntimeError(f"{run.name}: {_marker(results, run, 'failed').read_text()}")

    def checkpoint(self, run: Run):
        import submitit

        proc = self._proc
        if proc is not None:
            print(f"[task] {run.name}: preempted or timing out; stopping the script so it checkpoints", flush=True)
            t0 = time.time()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            wait_or_kill(proc, t0 + self.stop_timeout_s)
            _marker(Path(self.results), run, "running").unlink(missing_ok=True)
            release(Path(self.results), run)
            code = proc.poll()
            print(f"[task] {run.name}: script stopped {time.time() - t0:.1f} s after SIGTERM (exit {code}); "
                  f"requeueing to continue with --resume", flush=True)
        return submitit.helpers.DelayedSubmission(SweepTask(self.results, self.threads, self.scripts_dir,
                                                            self.stop_timeout_s, self.compact), run)


def _minutes(text: str) -> float:
    """Slurm time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS → minutes (fractions kept)."""
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if days:
            h, m, sec = (parts + [0, 0])[:3]
        elif len(parts) == 3:
            h, m, sec = parts
        else:
            h, m, sec = 0, parts[0], (parts[1] if len(parts) > 1 else 0)
        if len(parts) > 3 or min(parts) < 0:
            raise ValueError(text)
        return int(days or 0) * 1440 + h * 60 + m + sec / 60
    except ValueError as exc:
        raise SweepError(f"--time {text!r}: use minutes (90), HH:MM:SS (24:00:00) or D-HH:MM:SS.") from exc


def make_executor(backend: str, results: Path, args: argparse.Namespace):
    try:
        import submitit
    except ModuleNotFoundError as exc:
        raise SweepError("the slurm backends need submitit: pip install -e \".[benchmark]\".") from exc
    if backend == "slurm":
        if shutil.which("sbatch") is None:
            raise SweepError("--backend slurm: sbatch is not on PATH (not a Slurm login node?). Use --backend "
                             "local here, or --backend submitit-local to try the Slurm code path without Slurm.")
        executor = submitit.AutoExecutor(folder=results / "submitit" / "%j", cluster="slurm",
                                         slurm_max_num_timeout=args.max_requeues)
    else:  # submitit's local executor: same pickling, signals and requeue logic, processes on this machine
        executor = submitit.LocalExecutor(folder=results / "submitit", max_num_timeout=args.max_requeues)
        params = dict(timeout_min=_minutes(args.time), signal_delay_s=args.signal_delay)
        if args.gpus:
            params["gpus_per_node"] = args.gpus
        executor.update_parameters(**params)
        return executor
    params: dict = dict(timeout_min=math.ceil(_minutes(args.time)),
                        cpus_per_task=args.cpus_per_task or args.threads_per_run,
                        name=f"sweep-{results.name}", slurm_signal_delay_s=args.signal_delay,
                        slurm_array_parallelism=args.workers)
    if args.mem is not None:
        params["mem_gb"] = args.mem
    if args.gpus:
        params["gpus_per_node"] = args.gpus
    for key, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                       ("constraint", args.constraint)):
        if value:
            params[f"slurm_{key}"] = value
    if args.setup:
        params["slurm_setup"] = args.setup
    extra = {}
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--slurm-extra {item!r}: use KEY=VALUE, e.g. --slurm-extra exclude=node3.")
        extra[key] = value
    if extra:
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def run_submitit(results: Path, runs: list[Run], args: argparse.Namespace, out=sys.stdout) -> int:
    if getattr(args, "runs_per_gpu", 1) > 1:
        return run_submitit_groups(results, runs, args, out)
    todo = [r for r in runs if cell_state(results, r).state not in ("done", "running")]
    skipped = len(runs) - len(todo)
    if not todo:
        print(f"[sweep] nothing to submit: {skipped} of {len(runs)} runs are done or running.", file=out)
        return 0
    executor = make_executor(args.backend, results, args)
    threads = args.threads_per_run or args.cpus_per_task or 1
    task = SweepTask(str(results), threads, str(REPO), stop_timeout_s=max(5.0, args.signal_delay * 2 / 3),
                     compact=args.compact)
    jobs = executor.map_array(task, todo)
    print(f"[sweep] submitted {len(jobs)} task(s) as array job {jobs[0].job_id.split('_')[0]} ({args.backend}); "
          f"{skipped} already done or running. Logs: {results / 'submitit'}, {results / 'logs'}.", file=out,
          flush=True)
    if args.backend == "slurm" and not args.wait:
        print(f"[sweep] follow it with: python -m common.benchmark {args.sweep} --results {results} --status",
              file=out)
        return 0
    # without Slurm accounting submitit warns on every status poll ("Bypassing sacct error") and uses squeue
    logging.getLogger("submitit").setLevel(logging.ERROR)
    start, last, rc = time.time(), "", 0
    ended: dict[int, float] = {}
    while True:
        for i, job in enumerate(jobs):
            if i not in ended and job.done():
                ended[i] = time.time() - start
        counts = status_counts(results, runs)
        # array tasks start together, so a finished task's wall time is a fair guess for the others
        line = progress_line(counts, time.time() - start, list(ended.values()), args.workers)
        if line.split("| elapsed")[0] != last or time.time() - start > 30 * (1 + len(ended)):
            print(line, file=out, flush=True)
            last = line.split("| elapsed")[0]
        if len(ended) == len(jobs):
            break
        time.sleep(2)
    for job, run in zip(jobs, todo, strict=True):
        try:
            job.result()
        except Exception as exc:  # submitit wraps the task's exception; one line per failed task
            rc = 1
            text = str(exc).strip().splitlines()
            print(f"[sweep] FAILED {run.name} (job {job.job_id}): {text[-1] if text else exc}", file=out)
    return rc


# ---------------------------------------------------------------------------------------------------------
# one runner per cell: a lock per cell (two runners on one sweep folder never run the same cell twice)
# ---------------------------------------------------------------------------------------------------------
_HELD: dict[str, int] = {}  # lock file → the descriptor through which this process holds it


def claim_cell(results: Path, run: Run) -> str:
    """Take the cell's lock, `RESULTS/logs/<cell>.lock` (fcntl.flock, exclusive, non-blocking), before anything
    about the cell is decided. Returns "ours" (this process holds it until `release`, or until it exits: the
    kernel drops the lock of a killed process), "locked" (another runner or Slurm task holds it: running there),
    "done" or "running" (found so once the lock was ours: finished meanwhile, or a live script of an earlier
    runner still owns it; the lock is given back). flock is atomic, also between nodes on NFS (Linux maps it to
    an NFS byte-range lock)."""
    lock = _marker(results, run, "lock")
    if str(lock) in _HELD:
        return "ours"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return "locked"
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.uname().nodename}:{os.getpid()}\n".encode())
    _HELD[str(lock)] = fd
    state = cell_state(results, run).state
    if state in ("done", "running"):
        release(results, run)
        return state
    return "ours"


def release(results: Path, run: Run) -> None:
    """Give the cell's lock back (the file stays: removing it would let two runners lock two different files)."""
    fd = _HELD.pop(str(_marker(results, run, "lock")), None)
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# several runs per GPU: k cells side by side in one array task
# ---------------------------------------------------------------------------------------------------------
class SweepGroupTask(SweepTask):
    """What one array task runs with `--runs-per-gpu k`: its k cells side by side, each a script process of its
    own on the task's GPU (a plain process pool: the task starts them, polls them and records each one's end as
    the one-cell task does). Each cell is locked, prepared (fresh or `--resume`) and finished exactly as alone.
    On USR2 `checkpoint` stops every running script with SIGTERM (each checkpoints and exits 3) and hands back
    the same group, which submitit requeues; the requeued task resumes the stopped cells and skips done ones."""

    def __init__(self, results: str, threads: int, scripts_dir: str = str(REPO), stop_timeout_s: float = 60.0,
                 compact: bool = False, runs_per_gpu: int = 2):
        super().__init__(results, threads, scripts_dir, stop_timeout_s, compact)
        self.runs_per_gpu = runs_per_gpu
        self._active: dict[Run, subprocess.Popen] = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_active")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._proc, self._active = None, {}

    def __call__(self, runs: list[Run]) -> str:  # type: ignore[override]
        results, queue, lines, problems = Path(self.results), list(runs), [], []
        while queue or self._active:
            while queue and len(self._active) < self.runs_per_gpu:
                run = queue.pop(0)
                taken = claim_cell(results, run)
                cmd = prepare(results, run, sys.executable, Path(self.scripts_dir)) if taken == "ours" else None
                if cmd is None:
                    release(results, run)
                    lines.append(f"{run.name}: {'already done' if taken in ('ours', 'done') else taken + ' elsewhere'}")
                    print(f"[task] {lines[-1]}, skipped", flush=True)
                    continue
                print(f"[task] {run.name}: {shlex.join(cmd)}", flush=True)
                self._active[run] = launch(results, run, cmd, self.threads)
            for run, proc in list(self._active.items()):
                if proc.poll() is None:
                    continue
                proc.log.close()
                del self._active[run]
                outcome = finish(results, run, proc.returncode)
                release(results, run)
                print(f"[task] {run.name}: {outcome} (exit {proc.returncode})", flush=True)
                if outcome == "done" and self.compact:
                    compact_run(cell_state(results, run).folder)
                if outcome == "failed":
                    problems.append(f"{run.name}: {_marker(results, run, 'failed').read_text().splitlines()[0]}")
                elif outcome == "stopped":
                    problems.append(f"{run.name}: stopped by a signal (exit 3) and checkpointed; a requeued task "
                                    f"or a re-issued sweep resumes it")
                lines.append(f"{run.name}: {outcome}")
            time.sleep(0.5)
        if problems:
            raise RuntimeError(f"{len(problems)} of {len(runs)} cells did not finish: " + "; ".join(problems))
        return "; ".join(lines)

    def checkpoint(self, runs: list[Run]):  # type: ignore[override]
        import submitit

        active = dict(self._active)
        print(f"[task] preempted or timing out; stopping {len(active)} script(s) so they checkpoint", flush=True)
        t0 = time.time()
        for proc in active.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = t0 + self.stop_timeout_s
        for run, proc in active.items():
            wait_or_kill(proc, deadline)
            _marker(Path(self.results), run, "running").unlink(missing_ok=True)
            release(Path(self.results), run)
            print(f"[task] {run.name}: script stopped {time.time() - t0:.1f} s after SIGTERM (exit {proc.poll()}); "
                  f"requeueing to continue with --resume", flush=True)
        return submitit.helpers.DelayedSubmission(
            SweepGroupTask(self.results, self.threads, self.scripts_dir, self.stop_timeout_s, self.compact,
                           self.runs_per_gpu), runs)


def groups_of(runs: list[Run], k: int) -> list[list[Run]]:
    """Consecutive groups of k cells (seeds stay outermost: the first groups hold the first seed of every cell)."""
    return [runs[i:i + k] for i in range(0, len(runs), k)]


def run_submitit_groups(results: Path, runs: list[Run], args: argparse.Namespace, out=sys.stdout) -> int:
    """`--runs-per-gpu k`: the pending cells in groups of k, one array task per group (SweepGroupTask)."""
    todo = [r for r in runs if cell_state(results, r).state not in ("done", "running")]
    skipped = len(runs) - len(todo)
    if not todo:
        print(f"[sweep] nothing to submit: {skipped} of {len(runs)} runs are done or running.", file=out)
        return 0
    k = args.runs_per_gpu
    executor = make_executor(args.backend, results, args)
    task = SweepGroupTask(str(results), args.threads_per_run, str(REPO),
                          stop_timeout_s=max(5.0, args.signal_delay * 2 / 3), compact=args.compact, runs_per_gpu=k)
    groups = groups_of(todo, k)
    jobs = executor.map_array(task, groups)
    print(f"[sweep] submitted {len(todo)} run(s) as {len(jobs)} task(s) of up to {k} side by side "
          f"(--runs-per-gpu {k}, {args.threads_per_run} thread(s) each) as array job {jobs[0].job_id.split('_')[0]} "
          f"({args.backend}); {skipped} already done or running. Logs: {results / 'submitit'}, {results / 'logs'}.",
          file=out, flush=True)
    if args.backend == "slurm" and not args.wait:
        print(f"[sweep] follow it with: python -m common.benchmark {args.sweep} --results {results} --status",
              file=out)
        return 0
    logging.getLogger("submitit").setLevel(logging.ERROR)
    start, last, last_print, rc = time.time(), "", 0.0, 0
    ended: dict[int, float] = {}
    while len(ended) < len(jobs):
        for i, job in enumerate(jobs):
            if i not in ended and job.done():
                ended[i] = time.time() - start
        counts = status_counts(results, runs)
        line = progress_line(counts, time.time() - start, list(ended.values()), args.workers * k)
        if line.split("| elapsed")[0] != last or time.time() - last_print > 30:
            print(line, file=out, flush=True)
            last, last_print = line.split("| elapsed")[0], time.time()
        if len(ended) < len(jobs):
            time.sleep(2)
    for job, group in zip(jobs, groups, strict=True):
        try:
            job.result()
        except Exception as exc:  # submitit wraps the task's exception; one line per failed task
            rc = 1
            text = str(exc).strip().splitlines()
            print(f"[sweep] FAILED task {job.job_id} ({', '.join(r.name for r in group)}): "
                  f"{text[-1] if text else exc}", file=out)
    return rc


# ---------------------------------------------------------------------------------------------------------
# preflight: is every cell's dataset on this machine?
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DataStatus:
    """The data of one dataset as the cells would use it. status: "on disk", "generated" (a *-random-v2 stand-in
    made at first use), "download" (not here, can be fetched: `command`), "missing" (cannot be had here)."""

    env_id: str
    status: str
    detail: str
    runs: list[Run] = field(default_factory=list)
    command: str = ""


def flag_value(flags, name: str, default: str | None = None) -> str | None:
    """The value of the last `--name V` or `--name=V` in a run's flags (the one the script reads)."""
    value = default
    for i, word in enumerate(flags):
        if word == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def data_status(env_id: str, results: Path, dataset_path: str | None = None,
                generate_steps: str | None = None) -> DataStatus:
    """Where the data of `env_id` would come from, without loading, downloading or generating anything."""
    from common import datasets as ds

    if dataset_path is not None:
        path = Path(dataset_path).expanduser()
        path = path if path.is_absolute() else results / path  # the scripts run in the results folder
        return (DataStatus(env_id, "on disk", f"--dataset-path {path}") if path.exists() else
                DataStatus(env_id, "missing", f"--dataset-path {path} does not exist"))
    try:
        name = ds._parse(env_id)
    except ds.DatasetError as err:
        return DataStatus(env_id, "missing", str(err).split(". Accepted")[0])
    if name.kind == "toy":
        return DataStatus(env_id, "on disk", "a toy, built in memory")
    robotics = "" if not ds._needs_robotics(name.family) or importlib.util.find_spec("gymnasium_robotics") else (
        "; its env needs gymnasium-robotics, not installed here (pip install -e \".[remote]\")")
    root, steps = ds._minari_root(), int(generate_steps or ds.DEFAULT_GENERATE_STEPS)
    if name.minari_id and ds._minari_data_dir(root / name.minari_id):
        return DataStatus(env_id, "on disk", f"{root / name.minari_id}{robotics}")
    for file in (ds._d4rl_file_names(name) if name.d4rl else []):
        if (ds._d4rl_dir() / file).is_file():
            return DataStatus(env_id, "on disk", f"{ds._d4rl_dir() / file}")
    generated = ds._generated_id(name, steps)
    if generated and ds._minari_data_dir(root / generated):
        return DataStatus(env_id, "on disk", f"{root / generated} (generated here)")
    fetch = f"python -m common.datasets --download-all --names {env_id}"
    why = ds._d4rl_download_skip(name, steps)
    if generated:
        build = f"python -m common.datasets {env_id}" + (f" --steps {steps}" if generated_size(steps) else "")
        paper = f"; D4RL's file (the papers' data): {fetch}" if why is None else ""
        return DataStatus(env_id, "generated", f"generated at first use ({steps} random steps); build it once "
                                              f"before a parallel sweep: {build}{paper}", command=build)
    if why is None:
        return DataStatus(env_id, "download", f"D4RL's file, into {ds._d4rl_dir()}", command=fetch)
    if name.minari_id:
        hf = "" if importlib.util.find_spec("huggingface_hub") else " (needs pip install \"minari[hf]\")"
        return DataStatus(env_id, "download", f"Minari's {name.minari_id}, into {root}{hf}{robotics}",
                          command=fetch)
    return DataStatus(env_id, "missing", why)


def generated_size(steps: int) -> bool:
    from common.datasets import DEFAULT_GENERATE_STEPS

    return steps != DEFAULT_GENERATE_STEPS


def preflight(results: Path, runs: list[Run]) -> list[DataStatus]:
    """One DataStatus per dataset of the sweep (per env id, --dataset-path and --generate-steps), with its cells."""
    found: dict[tuple, DataStatus] = {}
    for run in runs:
        key = (run.env_id, flag_value(run.flags, "--dataset-path"), flag_value(run.flags, "--generate-steps"))
        if key not in found:
            found[key] = data_status(run.env_id, results, key[1], key[2])
        found[key].runs.append(run)
    return list(found.values())


def preflight_report(statuses: list[DataStatus]) -> str:
    from common.datasets import _d4rl_dir, _minari_root

    cells = sum(len(s.runs) for s in statuses)
    lines = [f"[preflight] the datasets of {cells} cells (D4RL folder {_d4rl_dir()}, Minari cache {_minari_root()}):"]
    for status in ("on disk", "generated", "download", "missing"):
        for s in (s for s in statuses if s.status == status):
            label = {"download": "can download", "missing": "cannot be had"}.get(status, status)
            lines.append(f"  {label:14s} {s.env_id} ({len(s.runs)} cells): {s.detail}")
    fetch = [s.env_id for s in statuses if s.status == "download"]
    if fetch:
        lines.append(f"  to download them (on a machine with internet, into the same folders): python -m "
                     f"common.datasets --download-all --names {' '.join(fetch)}")
    return "\n".join(lines)


def cell_names(runs: list[Run]) -> str:
    """The cells of one dataset, compactly: `hopper-medium-v2__odt__{1,2,3}, hopper-medium-v2__td3__{1,2}`."""
    seeds: dict[str, list[int]] = {}
    for run in runs:
        seeds.setdefault(f"{run.env_id.replace('/', '-')}__{run.variant}", []).append(run.seed)
    return ", ".join(f"{prefix}__{s[0]}" if len(s) == 1 else f"{prefix}__{{{','.join(map(str, s))}}}"
                     for prefix, s in seeds.items())


def refusal(statuses: list[DataStatus]) -> str:
    """The one message that lists the cells whose data is missing ("" when there are none)."""
    bad = [s for s in statuses if s.status in ("download", "missing")]
    if not bad:
        return ""
    total = sum(len(s.runs) for s in statuses)
    lines = [f"[preflight] refused {sum(len(s.runs) for s in bad)} of {total} cells: their data is not on this "
             f"machine (the other cells go ahead; --no-preflight skips this check):"]
    for s in bad:
        why = "not here, can be downloaded" if s.status == "download" else f"cannot be had: {s.detail}"
        lines.append(f"  {s.env_id} ({why}): {cell_names(s.runs)}")
    fetch = [s.env_id for s in bad if s.status == "download"]
    if fetch:
        lines.append(f"  download them with: python -m common.datasets --download-all --names {' '.join(fetch)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# cost: GPU-hours per table from the figures of `python -m common.bench --cuda`
# ---------------------------------------------------------------------------------------------------------
MAX_EP_LEN = {"pen": 100, "hammer": 200, "door": 200, "relocate": 200, "antmaze-umaze": 700,
              "antmaze-umaze-diverse": 700}  # every other dataset: 1000 (toys: 1)
# figure name → (common.bench --script, the start of the figure's label, what one count is)
FIGURES = {
    "odt update": ("odt", "update step", "update"),
    "odt_td3 update": ("odt_td3", "one update =", "update"),
    "dt_grpo update": ("dt_grpo", "GRPO update", "update"),
    "reinformer_ag update": ("reinformer_ag", "update =", "update"),
    "rollout env step": ("dt_grpo", "one round's rollouts", "env step"),
}
BENCH_LINE = re.compile(r"^(?P<script>\w+)\.py (?P<shape>\w+) \[[^\]]*\] (?P<device>\S+) \d+ threads \| "
                        r"\[(?P<variant>[^\]]+)\] (?P<label>.+?): median (?P<ms>[\d.]+) ms → (?P<rate>[\d.]+) "
                        r"(?P<unit>[^,]+?)(?:, (?P<per>[\d.]+) per call)?$")


def bench_command(script: str) -> str:
    return (f"mkdir -p results/bench && python -m common.bench --script {script} --shape paper --cuda "
            f"--precision auto > results/bench/{script}_paper_cuda.txt")


def read_bench_figures(folder: Path) -> dict[tuple[str, str, str], tuple[float, str]]:
    """GPU figures from saved `python -m common.bench --cuda` outputs (*.txt / *.log in `folder`):
    (script, label, variant) → (seconds per count, file). Seconds per count: the median time of one call for
    updates, 1 / rate for env steps. Lines measured on a CPU, or at the small shape, are not GPU figures."""
    figures: dict[tuple[str, str, str], tuple[float, str]] = {}
    for path in sorted(folder.glob("*.txt")) + sorted(folder.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            m = BENCH_LINE.match(line.strip())
            if m and m["device"].startswith("cuda") and m["shape"] == "paper":
                per_count = 1 / float(m["rate"]) if m["per"] else float(m["ms"]) / 1e3
                figures[(m["script"], m["label"], m["variant"])] = (per_count, str(path))
    return figures


def _figure(figures, name: str, env_label: str | None, precision: str) -> tuple[float, str] | None:
    script, start, _ = FIGURES[name] if env_label is None else ("reinformer_ag", env_label, "env step")
    found = {variant: value for (s, label, variant), value in figures.items() if s == script
             and label.startswith(start)}
    for variant in ((precision,) if precision in ("fp32", "bf16") else ("bf16", "fp32")):
        if variant in found:
            return found[variant]
    return None


TABLES = ("SPARSE", "ADROIT", "DATASET_DEFAULTS", "COMMON_DEFAULTS", "GRPO_DEFAULTS", "GRPO_COMMON_DEFAULTS",
          "PRESETS")


@functools.cache
def script_tables(path: str) -> types.SimpleNamespace:
    """A script's per-dataset tables (DATASET_DEFAULTS, COMMON_DEFAULTS, PRESETS, GRPO_*) and its Args defaults,
    read from its source without importing it (no torch): each top-level assignment of those names is evaluated
    in order (they are dict literals and dict() calls), and every literal default of `class Args`."""
    tree = ast.parse(Path(path).read_text())
    ns: dict = {"dict": dict}
    args: dict = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id in TABLES and node.value is not None:
                ns[target.id] = eval(compile(ast.Expression(node.value), path, "eval"), ns)
        elif isinstance(node, ast.ClassDef) and node.name == "Args":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    with contextlib.suppress(ValueError):
                        args[item.target.id] = ast.literal_eval(item.value)
    ns.setdefault("GRPO_DEFAULTS", {})
    return types.SimpleNamespace(Args=args, **{k: v for k, v in ns.items() if k in TABLES})


def cell_settings(run: Run) -> dict:
    """The budget settings a cell's script will use: its flag, else --preset, else the script's Args default,
    else its per-dataset table (COMMON_DEFAULTS / DATASET_DEFAULTS / GRPO_DEFAULTS, as apply_dataset_defaults)."""
    from common.datasets import _parse

    module = script_tables(str(REPO / run.script))
    name = _parse(run.env_id)
    family = "one-step" if name.kind == "toy" else name.family
    defaults = module.Args
    table = {**module.COMMON_DEFAULTS, **module.DATASET_DEFAULTS.get(family, {}),
             **module.DATASET_DEFAULTS.get(f"{family}-{name.kind}", {})}
    if hasattr(module, "GRPO_COMMON_DEFAULTS"):
        table = {**module.GRPO_COMMON_DEFAULTS, **module.GRPO_DEFAULTS.get(family, {}), **table}
    if Path(run.script).stem == "odt_td3" and name.kind == "random":
        table.setdefault("min_steps_per_round", 1000)
    preset = module.PRESETS.get(flag_value(run.flags, "--preset", "paper"), {})
    out = {}
    for key in ("pretrain_updates", "online_steps", "updates_per_round", "min_steps_per_round", "eval_interval",
                "eval_episodes", "group_size", "sub_len", "cont_len", "groups_per_round", "grpo_epochs",
                "grpo_minibatch", "ag_steps"):
        typed = flag_value(run.flags, "--" + key.replace("_", "-"))
        value = typed if typed is not None else preset.get(key, defaults.get(key))
        out[key] = int(value) if value is not None else table.get(key)
    out["precision"] = flag_value(run.flags, "--precision", "auto")
    out["max_ep_len"] = 1 if name.kind == "toy" else MAX_EP_LEN.get(f"{name.family}-{name.kind}",
                                                                     MAX_EP_LEN.get(name.family, 1000))
    return out


def cell_work(run: Run) -> dict[str, float]:
    """Counts of one cell: figure name → how many (updates, env steps). Finetuning rounds are counted with
    full-length episodes (the fewest rounds, as the scripts' own cost estimate); evaluations after pretraining,
    every eval_interval and at the end, each eval_episodes full-length episodes."""
    s, stem = cell_settings(run), Path(run.script).stem
    ep = s["max_ep_len"]
    if stem == "reinformer_ag":
        evals = math.ceil(s["pretrain_updates"] / s["eval_interval"])
        env = evals * s["eval_episodes"] * ep  # RF+AG and plain RF evaluate the same episodes
        return {"reinformer_ag update": s["pretrain_updates"], f"ag_steps {s['ag_steps']}": env, "ag_steps 0": env}
    online = s["online_steps"]
    env = online + (online // s["eval_interval"] + 2) * s["eval_episodes"] * ep
    if stem == "dt_grpo":
        per_round = s["groups_per_round"] * s["group_size"] * (s["sub_len"] + s["cont_len"]) + ep
        members = s["groups_per_round"] * s["group_size"]
        updates = online / per_round * s["grpo_epochs"] * math.ceil(members / (s["grpo_minibatch"] or members))
        return {"odt update": s["pretrain_updates"], "dt_grpo update": updates, "rollout env step": env}
    rounds = online / max(s["min_steps_per_round"] or 0, ep)
    return {f"{stem} update": s["pretrain_updates"] + rounds * s["updates_per_round"], "rollout env step": env}


def cost_report(sweep_path, runs: list[Run], bench_dir: Path, runs_per_gpu: int = 1) -> str:
    """GPU-hours of the sweep: Σ over cells of counts × the measured GPU seconds per count; names every missing
    figure with the command that measures it."""
    figures = read_bench_figures(bench_dir)
    per_script: dict[str, dict[str, float]] = {}
    cells: dict[str, int] = {}
    precision: dict[str, str] = {}
    for run in runs:
        work = cell_work(run)
        acc = per_script.setdefault(run.script, {})
        for key, n in work.items():
            acc[key] = acc.get(key, 0.0) + n
        cells[run.script] = cells.get(run.script, 0) + 1
        precision[run.script] = cell_settings(run)["precision"]
    lines = [f"[cost] {sweep_path}: {len(runs)} cells, one GPU each; counts per script from its own tables, with "
             f"full-length episodes (the fewest finetuning rounds) and evaluation env steps at the rollout rate; GPU "
             f"figures from {bench_dir}/*.txt ({len(figures)} GPU lines found)"]
    total, missing = 0.0, {}
    for script, acc in per_script.items():
        seconds, parts = 0.0, []
        for key, n in acc.items():
            env_label = f"evaluation, 10 Hopper-v5 envs, {key}" if key.startswith("ag_steps") else None
            name = "reinformer_ag evaluation " + key if env_label else key
            fig = _figure(figures, key if env_label is None else "rollout env step", env_label, precision[script])
            unit = "env steps" if env_label or "env step" in key else "updates"
            if fig is None:
                bench = "reinformer_ag" if env_label else FIGURES[key][0]
                missing[name] = bench
                parts.append(f"{n:.3g} {unit} ({name}: no GPU figure)")
                seconds = math.nan
            else:
                seconds += n * fig[0]
                parts.append(f"{n:.3g} {unit} × {fig[0] * 1e3:.3g} ms ({name}, {Path(fig[1]).name})")
        hours = seconds / 3600
        total += hours
        per_cell = f"{hours / cells[script]:.3g} GPU-h per cell → {hours:.3g} GPU-h" if not math.isnan(hours) else \
            "GPU-hours unknown"
        lines.append(f"  {script}: {cells[script]} cells; in all {'; '.join(parts)}: {per_cell}")
    if missing:
        lines.append(f"  GPU-hours: unknown: {len(missing)} GPU figure(s) missing (no GPU was measured for them). "
                     f"Measure on a GPU node, then re-run with --cost:")
        for bench in dict.fromkeys(missing.values()):
            what = ", ".join(n for n, b in missing.items() if b == bench)
            lines.append(f"    {what}: {bench_command(bench)}")
        if "rollout env step" in missing:
            lines.append("    (common.bench has no rollout figure of odt / odt_td3: dt_grpo's rollouts, the same "
                         "transformer at the same shape, stand in for their env steps)")
    else:
        lines.append(f"  GPU-hours: {total:.3g} in all ({len(runs)} cells × {total / len(runs):.3g} h per cell on "
                     f"average)" + (f"; with --runs-per-gpu {runs_per_gpu} on fewer GPUs, at most {runs_per_gpu}× "
                                   f"fewer GPU-hours if the GPU is not the bottleneck" if runs_per_gpu > 1 else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m common.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (TOML), e.g. benchmarks/toys.toml")
    p.add_argument("--results", help="results folder; runs go to RESULTS/runs (default: results/<sweep file name>)")
    p.add_argument("--backend", choices=("local", "slurm", "submitit-local"), default="local")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel runs (local: processes, default = CPU cores / threads; slurm: array parallelism)")
    p.add_argument("--threads-per-run", type=int, default=None,
                   help="OMP/MKL threads of each run (default 1 locally; on Slurm --cpus-per-task)")
    p.add_argument("--dry-run", action="store_true", help="print each run's state and command, run nothing")
    p.add_argument("--status", action="store_true", help="print how many runs are done / running / failed / ...")
    p.add_argument("--compact", action="store_true",
                   help="delete checkpoint.pt and model.pt of finished runs (keep config, metrics, summary)")
    p.add_argument("--preflight", action="store_true",
                   help="print where each dataset of the sweep is (on disk / generated at first use / can be "
                        "downloaded, with the command / cannot be had) and run nothing")
    p.add_argument("--no-preflight", action="store_true",
                   help="submit cells even when their data is not on this machine (e.g. it lives on the nodes only)")
    p.add_argument("--cost", action="store_true",
                   help="print the sweep's GPU-hours from the GPU figures of `python -m common.bench --cuda` saved "
                        "in --bench-dir (and which figure is missing, with the command that measures it)")
    p.add_argument("--bench-dir", default="results/bench",
                   help="folder of saved `python -m common.bench ... --cuda` outputs (*.txt) read by --cost")
    s = p.add_argument_group("Slurm (--backend slurm / submitit-local)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--constraint")
    s.add_argument("--time", default="24:00:00", help="time limit per task (minutes or [D-]HH:MM:SS)")
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--mem", type=int, default=None, help="memory per task in GB")
    s.add_argument("--gpus", type=int, default=0, help="GPUs per task")
    s.add_argument("--signal-delay", type=int, default=90,
                   help="seconds before the time limit at which USR2 asks the task to checkpoint and requeue")
    s.add_argument("--max-requeues", type=int, default=20, help="time-outs after which a task gives up")
    s.add_argument("--setup", action="append", default=[],
                   help="a shell line run before each task (e.g. 'source .venv/bin/activate'); repeatable")
    s.add_argument("--slurm-extra", action="append", default=[], help="any sbatch option as KEY=VALUE; repeatable")
    s.add_argument("--wait", action="store_true", help="slurm: stay and print progress until the array finishes")
    s.add_argument("--runs-per-gpu", type=int, default=1,
                   help="cells side by side in one array task (each its own script process on the task's GPU; "
                        "--cpus-per-task defaults to k x --threads-per-run); each cell resumes as alone")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sweep = load_sweep(args.sweep)
    results = Path(args.results or Path("results") / Path(args.sweep).stem).resolve()
    threads = args.threads_per_run or (args.cpus_per_task if args.backend != "local" else None) or 1
    if threads < 1 or (args.workers is not None and args.workers < 1):
        raise SweepError("--workers and --threads-per-run must be at least 1.")
    if args.runs_per_gpu < 1:
        raise SweepError("--runs-per-gpu must be at least 1.")
    if args.runs_per_gpu > 1:
        if args.backend == "local":
            raise SweepError("--runs-per-gpu is for --backend slurm / submitit-local (k cells per array task); "
                             "locally, --workers runs cells side by side.")
        threads = args.threads_per_run or max(1, (args.cpus_per_task or args.runs_per_gpu) // args.runs_per_gpu)
        args.cpus_per_task = args.cpus_per_task or threads * args.runs_per_gpu
    args.threads_per_run = threads
    args.workers = args.workers or (max(1, (os.cpu_count() or 1) // threads) if args.backend == "local"
                                    else len(sweep.runs))
    if args.preflight:
        statuses = preflight(results, sweep.runs)
        print(preflight_report(statuses))
        print(refusal(statuses).replace("[preflight] refused", "[preflight] a run now refuses", 1)
              or "[preflight] every cell's data is here.")
        return 0
    if args.cost:
        print(cost_report(args.sweep, sweep.runs, Path(args.bench_dir), args.runs_per_gpu))
        return 0
    if args.status or args.dry_run:
        counts, lines = status_table(results, sweep.runs)
        print(f"{sweep.path}: {len(sweep.runs)} runs in {results / 'runs'}"
              + (" (commands relative to the repository, run with the results folder as working directory)"
                 if args.dry_run else ""))
        if args.dry_run:
            for run, line in zip(sweep.runs, lines, strict=True):
                print(line)
                st = cell_state(results, run)
                if st.state != "done":
                    cmd = (run.resume_command(st.folder.relative_to(results), "python", Path("."))
                           if st.folder else run.command("python", Path(".")))
                    print(f"           $ {shlex.join(cmd)}")
        else:
            print("\n".join(line for line in lines if not line.strip().startswith("done")))
        print(" | ".join(f"{counts[s]} {s}" for s in STATES) +
              "   (stopped: checkpoint, will resume; started: no checkpoint, will restart)")
        if args.dry_run:
            statuses = preflight(results, sweep.runs)
            print(preflight_report(statuses))
            print(refusal(statuses).replace("[preflight] refused", "[preflight] a run now refuses", 1)
                  or "[preflight] every cell's data is here.")
            print(cost_report(args.sweep, sweep.runs, Path(args.bench_dir), args.runs_per_gpu))
        return 0
    results.mkdir(parents=True, exist_ok=True)
    copy = results / "sweep.toml"  # the report reads it to group variants into experiments
    if not copy.exists() or copy.read_text() != sweep.path.read_text():
        copy.write_text(sweep.path.read_text())
    refused = ""
    if not args.no_preflight:
        statuses = preflight(results, sweep.runs)
        refused = refusal(statuses)
        if refused:
            print(refused, flush=True)
            here = {r for s in statuses if s.status in ("on disk", "generated") for r in s.runs}
            sweep.runs = [r for r in sweep.runs if r in here]
            if not sweep.runs:
                print("[preflight] nothing to run.", flush=True)
                return 2
    if args.backend == "slurm":
        print(cost_report(args.sweep, sweep.runs, Path(args.bench_dir), args.runs_per_gpu), flush=True)
    if refused:
        rc = (run_local(results, sweep.runs, args.workers, threads, compact=args.compact)
              if args.backend == "local" else run_submitit(results, sweep.runs, args))
        print(f"[preflight] {len(load_sweep(args.sweep).runs) - len(sweep.runs)} cells were not run: their data "
              f"is missing (the list is above). Download what can be and re-issue the command.", flush=True)
        return rc or 1
    if args.backend == "local":
        return run_local(results, sweep.runs, args.workers, threads, compact=args.compact)
    return run_submitit(results, sweep.runs, args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
