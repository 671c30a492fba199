"""Fixed-seed fingerprint of every script's outputs, to check that a refactor leaves them bit-identical.

What it covers: tiny fixed-seed CPU runs (one thread, the 4000-step locally generated hopper-random-v2 dataset in a
private cache) of odt.py, odt_td3.py, dt_grpo.py (group advantage, and --advantage critic), reinformer_ag.py (and
an --eval-only action-gradient sweep of the trained model), each at --precision fp32 and bf16. Every run goes
through pretraining, online rounds with a small --buffer-size (so the replay fills and evicts; dt_grpo's critic
also a small --critic-buffer), periodic and final evaluations. Each configuration runs twice: once straight
through, and once stopped with SIGINT part-way (the script checkpoints and exits 3) and resumed with the command
it printed; the stop point varies with timing, which is fine because a resumed run must equal an uninterrupted
one (the tool also checks that, as its own line `<run>-resume vs <run>`).

A run's fingerprint: its metrics.jsonl rows and summary.json without the time-derived values (wall time,
updates/s, SPS, env steps/s, rollout/eval seconds) and paths, and every tensor of model.pt and checkpoint.pt
(the resumed run: model.pt only, its checkpoint is the stop's or the last one's), plus the checkpoint's
non-tensor values (counters, RNG states, optimiser settings). Tensors are stored with torch.save, so a
comparison names the first differing tensor and its max |difference|.

Commands (run from the repository root; OMP_NUM_THREADS=1 is set for the runs):

    python -m tests.fingerprint save DIR              # run the working tree, store its fingerprint in DIR
    python -m tests.fingerprint compare DIR           # run the working tree, compare with the one in DIR
    python -m tests.fingerprint --against COMMIT      # run COMMIT (a temporary `git worktree`) and the working
                                                      # tree, compare; the worktree is removed afterwards
    ... --scripts odt,odt_td3 --precision fp32        # restrict (scripts: odt, odt_td3, dt_grpo, reinformer_ag)
    ... --keep DIR                                    # keep the run folders (default: a temporary folder)

Output: one line per run, `identical` or `DIFFERENT: <first differing metric row/key, summary key or tensor>`;
exit code 0 only if every run is identical. This is NOT a correctness test (it is not part of the test suite and
says nothing about whether the outputs are right), only a guard that a refactor changed nothing: a change that
is meant to alter results will, of course, show as DIFFERENT. The runs are deterministic on CPU with one thread;
fingerprints taken with another thread count, torch version or CPU may not be comparable. --against runs both
trees with this file's run settings (a configuration whose flag COMMIT lacks is reported as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("odt", "odt_td3", "dt_grpo", "reinformer_ag")
PRECISIONS = ("fp32", "bf16")

# Time-derived values, wherever they appear (metrics rows, summary.json, the checkpoint's counters/meter/round
# state): wall_time_s, charts/updates_per_second, charts/SPS, eval*/env_steps_per_second, meter.seconds,
# rollout_time, eval_time.
TIMING = re.compile(r"(^|[/_.])(wall_time_s|seconds|rollout_time|eval_time|SPS)$|per_second$")
PATH_KEYS = {"run_dir", "evaluated"}  # summary.json fields that hold paths

# --- the runs ------------------------------------------------------------------------------------------------
DATA = ["--env-id", "hopper-random-v2", "--generate-steps", "4000", "--eval-episodes", "2"]
TINY = ["--embed-dim", "32", "--n-layers", "1", "--n-heads", "2", "--batch-size", "16", "--context-len", "5",
        "--warmup-steps", "10", "--no-progress", "--no-cuda", "--seed", "1", "--learning-rate", "1e-3",
        "--log-interval", "10", "--checkpoint-interval", "20"]
ONLINE = [*DATA, *TINY, "--eval-context-len", "3", "--pretrain-updates", "40", "--buffer-size", "20"]


def online_started(rows: list[dict]) -> bool:
    return any(r.get("phase") == "online" for r in rows)


def policy_updated_online(rows: list[dict]) -> bool:
    return any(r.get("phase") == "online" and r.get("rollout/groups") for r in rows)


def past_first_eval(rows: list[dict]) -> bool:
    return any("eval/return_mean" in r for r in rows)


@dataclass
class Config:
    name: str  # e.g. dt_grpo-critic (the precision is appended)
    script: str
    args: list[str]
    stop_when: object  # rows -> bool: when to send SIGINT in the stop/resume run
    requires: str = ""  # a regex the script's source must match (a flag that older commits may lack)
    eval_only: bool = False  # reinformer_ag: an --eval-only sweep of the straight run's model.pt
    extra: list[str] = field(default_factory=list)


CONFIGS = [
    Config("odt", "odt", [*ONLINE, "--online-steps", "400", "--updates-per-round", "5", "--eval-interval", "200"],
           online_started),
    Config("odt_td3", "odt_td3", [*ONLINE, "--online-steps", "400", "--updates-per-round", "5", "--eval-interval",
                                  "200", "--min-steps-per-round", "0", "--critic-hidden", "32"], online_started),
    Config("dt_grpo", "dt_grpo", [*ONLINE, "--online-steps", "500", "--eval-interval", "250", "--group-size", "4",
                                  "--sub-len", "3", "--cont-len", "20", "--groups-per-round", "2",
                                  "--grpo-epochs", "2", "--grpo-minibatch", "4"], online_started),
    Config("dt_grpo-critic", "dt_grpo", [*ONLINE, "--online-steps", "300", "--eval-interval", "150",
                                         "--advantage", "critic", "--critic-warmup", "60", "--critic-buffer", "120",
                                         "--group-size", "4", "--groups-per-round", "2", "--grpo-epochs", "2",
                                         "--grpo-minibatch", "4"], policy_updated_online, requires=r"\n\s*advantage:"),
    Config("reinformer_ag", "reinformer_ag", [*DATA, *TINY, "--critic-hidden", "32", "--critic-batch-size", "32",
                                              "--pretrain-updates", "60", "--eval-interval", "30", "--ag-steps", "2",
                                              "--ag-lr", "0.01"], past_first_eval),
]
EVAL_ONLY = ["--sweep-ag-steps", "0", "2", "--sweep-ag-lr", "0.05", "--eval-episodes", "2", "--no-progress",
             "--no-cuda"]


# --- fingerprints --------------------------------------------------------------------------------------------
def clean(value, run_dir_name: str):
    """JSON-able copy without time-derived keys; the run folder's name (it holds a Unix time) becomes <run>."""
    if isinstance(value, dict):
        return {str(k): clean(v, run_dir_name) for k, v in value.items() if not TIMING.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [clean(v, run_dir_name) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir_name, "<run>")
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def flatten(obj, prefix: str, tensors: dict, values: dict) -> None:
    """Split a loaded .pt object into named tensors (numpy arrays too) and JSON-able leaves; time-derived keys
    are dropped."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not TIMING.search(str(k)):
                flatten(v, f"{prefix}.{k}", tensors, values)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor, np.ndarray))
                                               for v in obj):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}", tensors, values)
    elif isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
    elif isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj).copy())
    elif isinstance(obj, (str, int, float, bool, type(None), np.generic, list, tuple)):
        values[prefix] = clean(obj, "\0")
    else:
        values[prefix] = f"<{type(obj).__name__}>"


def fingerprint(run_dir: Path, with_checkpoint: bool) -> dict:
    name = run_dir.name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if k not in PATH_KEYS}
    tensors, values = {}, {}
    files = ["model.pt", "checkpoint.pt"] if with_checkpoint else ["model.pt"]
    for file in files:
        if (run_dir / file).exists():
            flatten(torch.load(run_dir / file, map_location="cpu", weights_only=False), file, tensors, values)
    return {"metrics": clean(rows, name), "summary": clean(summary, name), "values": values, "tensors": tensors}


def store(fp: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "outputs.json").write_text(json.dumps({k: fp[k] for k in ("metrics", "summary", "values")}))
    torch.save(fp["tensors"], folder / "tensors.pt")


def load(folder: Path) -> dict:
    fp = json.loads((folder / "outputs.json").read_text())
    fp["tensors"] = torch.load(folder / "tensors.pt", weights_only=True)
    return fp


def canon(value) -> str:
    return json.dumps(value, sort_keys=True)  # exact: floats round-trip, NaN compares equal to NaN


def first_difference(a: dict, b: dict) -> str | None:
    """The first thing that differs between two fingerprints (a: reference, b: new), or None."""
    ra, rb = a["metrics"], b["metrics"]
    for i, (x, y) in enumerate(zip(ra, rb, strict=False)):
        for key in list(x) + [k for k in y if k not in x]:
            if canon(x.get(key, "<absent>")) != canon(y.get(key, "<absent>")):
                return (f"metrics row {i} (step {x.get('global_step')}, {x.get('phase')}) {key}: "
                        f"{x.get(key, '<absent>')!r} vs {y.get(key, '<absent>')!r}")
    if len(ra) != len(rb):
        return f"metrics: {len(ra)} rows vs {len(rb)}"
    for key in list(a["summary"]) + [k for k in b["summary"] if k not in a["summary"]]:
        x, y = a["summary"].get(key, "<absent>"), b["summary"].get(key, "<absent>")
        if canon(x) != canon(y):
            return f"summary.json {key}: {str(x)[:80]} vs {str(y)[:80]}"
    ta, tb = a["tensors"], b["tensors"]
    for key in list(ta) + [k for k in tb if k not in ta]:
        if key not in ta or key not in tb:
            where = ("absent", "present")
            return f"tensor {key}: {where[key in ta]} vs {where[key in tb]}"
        x, y = ta[key], tb[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"tensor {key}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        if not torch.equal(x, y):
            if x.dtype == torch.bool:
                return f"tensor {key}: {int((x != y).sum())} of {x.numel()} elements differ"
            diff = (x.double() - y.double()).abs()
            return (f"tensor {key}: max |diff| {diff.nan_to_num(float('inf')).max().item():.3g}, "
                    f"{int((x != y).sum())} of {x.numel()} elements differ")
    va, vb = a["values"], b["values"]
    for key in list(va) + [k for k in vb if k not in va]:
        x, y = va.get(key, "<absent>"), vb.get(key, "<absent>")
        if canon(x) != canon(y):
            return f"{key}: {str(x)[:80]} vs {str(y)[:80]}"
    return None


# --- running a tree ------------------------------------------------------------------------------------------
def read_rows(cwd: Path) -> list[dict]:
    files = list((cwd / "runs").glob("*/metrics.jsonl")) if (cwd / "runs").exists() else []
    if not files:
        return []
    lines = files[0].read_text().splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written
            break
    return rows


def only_run(cwd: Path) -> Path:
    runs = sorted(p for p in (cwd / "runs").iterdir() if p.is_dir())
    if len(runs) != 1:
        raise RuntimeError(f"expected one run folder in {cwd / 'runs'}, found {[p.name for p in runs]}")
    return runs[0]


class RunFailed(Exception):
    pass


def run(tree: Path, cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RunFailed(f"{' '.join(cmd)} exited {result.returncode}: {(result.stderr or result.stdout)[-600:]}")
    return result


def stop_and_resume(tree: Path, config: Config, args: list[str], cwd: Path, env: dict) -> str:
    """Start the run, SIGINT it once `config.stop_when(rows)`, resume it with the printed command; a note."""
    cwd.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, str(tree / f"{config.script}.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while proc.poll() is None and not config.stop_when(read_rows(cwd)) and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the tool itself was stopped
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        return "the stop came after the end: not resumed"
    if proc.returncode != 3:
        raise RunFailed(f"stopped {config.script}.py exited {proc.returncode} (expected 3): {err[-600:]}")
    match = re.search(r"python \S+\.py --resume (\S+)", out)
    if not match:
        raise RunFailed(f"no resume command in the output of the stopped run: {out[-600:]}")
    stopped_at = re.search(r"Stopped at (update \d+, env step \d+)", out)
    run(tree, [str(tree / f"{config.script}.py"), "--resume", match.group(1), "--no-progress"], cwd, env)
    return f"stopped at {stopped_at.group(1) if stopped_at else '?'}"


def dataset_env(root: Path, tree: Path) -> dict:
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root / "minari"), "D4RL_DATASET_DIR": str(root / "d4rl"),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return env


def run_tree(tree: Path, work: Path, scripts: list[str], precisions: list[str], label: str) -> dict:
    """Run every selected configuration in `tree`; returns {run name: fingerprint or an error string}, with
    the notes of the stop/resume runs under key '__notes__'."""
    work.mkdir(parents=True, exist_ok=True)
    env = dataset_env(work / "datasets", tree)
    t0 = time.time()
    run(tree, ["-m", "common.datasets", "hopper-random-v2", "--steps", "4000"], work, env)
    print(f"[{label}] dataset generated in {time.time() - t0:.0f} s", flush=True)
    results, notes = {}, {}
    for config in (c for c in CONFIGS if c.script in scripts):
        source = (tree / f"{config.script}.py").read_text()
        for precision in precisions:
            name = f"{config.name}-{precision}"
            if config.requires and not re.search(config.requires, source):
                results[name] = results[f"{name}-resume"] = "skipped: the flag does not exist in this tree"
                continue
            args = [*config.args, "--precision", precision]
            t1 = time.time()
            try:
                cwd = work / name
                cwd.mkdir(parents=True)
                run(tree, [str(tree / f"{config.script}.py"), *args], cwd, env)
                run_dir = only_run(cwd)
                results[name] = fingerprint(run_dir, with_checkpoint=True)
                if config.script == "reinformer_ag" and "eval_only:" in source:
                    (cwd / "sweep").mkdir()
                    run(tree, [str(tree / "reinformer_ag.py"), "--eval-only", str(run_dir), *EVAL_ONLY,
                               "--precision", precision], cwd / "sweep", env)
                    results[f"{name}-evalonly"] = fingerprint(only_run(cwd / "sweep"), with_checkpoint=False)
            except (RunFailed, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                results[name] = f"FAILED: {exc}"
            try:
                notes[f"{name}-resume"] = stop_and_resume(tree, config, args, work / f"{name}-resume", env)
                results[f"{name}-resume"] = fingerprint(only_run(work / f"{name}-resume"), with_checkpoint=False)
            except (RunFailed, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                results[f"{name}-resume"] = f"FAILED: {exc}"
            print(f"[{label}] {name}: {time.time() - t1:.0f} s", flush=True)
    results["__notes__"] = notes
    return results


# --- comparing -----------------------------------------------------------------------------------------------
def without_checkpoint(fp: dict) -> dict:
    return {**fp, "values": {k: v for k, v in fp["values"].items() if not k.startswith("checkpoint.pt")},
            "tensors": {k: v for k, v in fp["tensors"].items() if not k.startswith("checkpoint.pt")}}


def report(reference: dict, new: dict, ref_label: str) -> bool:
    """One line per run; True if every run is identical (and every resumed run equals its straight run)."""
    ok, notes = True, new.get("__notes__", {})
    names = [n for n in new if n != "__notes__"] + [n for n in reference if n not in new and n != "__notes__"]
    width = max(len(n) for n in names) + 2 if names else 10
    for name in names:
        a, b = reference.get(name), new.get(name)
        note = f"  ({notes[name]})" if name in notes else ""
        if a is None or b is None:
            line, ok = f"DIFFERENT: only in {'the working tree' if a is None else ref_label}", False
        elif isinstance(a, str) or isinstance(b, str):
            same_skip = isinstance(a, str) and a == b and a.startswith("skipped")
            shown = [x[:300] if isinstance(x, str) else "fingerprint" for x in (a, b)]
            line = a if same_skip else f"DIFFERENT: {ref_label}: {shown[0]} | working tree: {shown[1]}"
            ok = ok and same_skip
        else:
            diff = first_difference(a, b)
            line, ok = ("identical", ok) if diff is None else (f"DIFFERENT: {diff}", False)
        print(f"{name:<{width}}{line}{note}", flush=True)
    return resume_check(new) and ok


def resume_check(new: dict) -> bool:
    """Within one tree: every stopped-and-resumed run equals its straight run (the checkpoint aside)."""
    ok = True
    for name, fp in new.items():
        base = name.removesuffix("-resume")
        if name.endswith("-resume") and isinstance(fp, dict) and isinstance(new.get(base), dict):
            diff = first_difference(without_checkpoint(new[base]), fp)
            print(f"{name + ' vs ' + base:<50}{'identical' if diff is None else 'DIFFERENT: ' + diff}", flush=True)
            ok = ok and diff is None
    return ok


def save(results: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"runs": {}, "notes": results.get("__notes__", {}), "torch": torch.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0], "configs": {
                    c.name: c.args for c in CONFIGS}}
    for name, fp in results.items():
        if name == "__notes__":
            continue
        if isinstance(fp, str):
            manifest["runs"][name] = fp
        else:
            manifest["runs"][name] = "stored"
            store(fp, folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def load_saved(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("configs") != {c.name: c.args for c in CONFIGS}:
        print(f"warning: {folder} was saved with other run settings; expect differences", flush=True)
    if manifest.get("torch") != torch.__version__:
        print(f"warning: {folder} was saved with torch {manifest.get('torch')}, this is {torch.__version__}")
    return {name: load(folder / name) if state == "stored" else state for name, state in manifest["runs"].items()}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fingerprint", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", choices=["save", "compare"])
    parser.add_argument("dir", nargs="?", type=Path)
    parser.add_argument("--against", metavar="COMMIT", help="compare the working tree with this commit")
    parser.add_argument("--scripts", default=",".join(SCRIPTS))
    parser.add_argument("--precision", default=",".join(PRECISIONS))
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    opts = parser.parse_args(argv)
    scripts, precisions = opts.scripts.split(","), opts.precision.split(",")
    if bad := [s for s in scripts if s not in SCRIPTS] + [p for p in precisions if p not in PRECISIONS]:
        parser.error(f"unknown script/precision {bad}; choose from {SCRIPTS} and {PRECISIONS}")
    if (opts.command is None) == (opts.against is None) or (opts.command and opts.dir is None):
        parser.error("give `save DIR`, `compare DIR` or `--against COMMIT`")
    if opts.command == "compare" and not (opts.dir / "manifest.json").is_file():
        parser.error(f"{opts.dir} holds no fingerprint (manifest.json)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the worktree and the runs
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="fingerprint-")) if opts.keep is None else opts.keep.resolve()
    worktree = None
    try:
        if opts.against:
            commit = git("rev-parse", "--verify", f"{opts.against}^{{commit}}").strip()
            worktree = work / "worktree"
            git("worktree", "add", "--detach", str(worktree), commit)
            reference = run_tree(worktree, work / "reference", scripts, precisions, commit[:10])
            ref_label = commit[:10]
        elif opts.command == "compare":
            reference, ref_label = load_saved(opts.dir), str(opts.dir)
        new = run_tree(REPO, work / "working-tree", scripts, precisions, "working tree")
        if opts.command == "save":
            save(new, opts.dir)
            print(f"fingerprint of {len(new) - 1} runs saved in {opts.dir}")
            ok = True
            for name, fp in new.items():
                if name != "__notes__":
                    note = f"  ({new['__notes__'][name]})" if name in new["__notes__"] else ""
                    print(f"{name}: {'stored' if isinstance(fp, dict) else fp}{note}")
                    ok = ok and (isinstance(fp, dict) or fp.startswith("skipped"))
            ok = resume_check(new) and ok
        else:
            if opts.against:
                print(f"--- {ref_label} (reference) vs the working tree")
            ok = report(reference, new, ref_label)
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
        if opts.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{'all identical' if ok else 'NOT all identical'}; {time.time() - t0:.0f} s wall, "
          f"{usage.ru_utime + usage.ru_stime:.0f} s CPU of the runs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
