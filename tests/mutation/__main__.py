"""Mutation harness: does the fast suite tell a faithful script from a broken one?

    python -m tests.mutation                      # every mutant, 2 at a time, prints the score and survivors
    python -m tests.mutation --only odt_td3/      # mutants whose id starts with a prefix (comma-separated)
    python -m tests.mutation --list               # the catalogue, checked against the tree, nothing run
    python -m tests.mutation --json out.json      # also write each mutant's outcome

The catalogue is `tests/mutation/mutants_*.py` (each defines MUTANTS, see catalogue.py): plausible one-line bugs
of the kind a researcher makes when editing a copied script, each with exact edits. Before anything runs, every
edit is checked against the working tree: its old text must occur exactly once, else the harness stops (a
refactor moved the code; update the mutant). Each worker holds a scratch copy of the tree (git's tracked and
untracked, non-ignored files); a mutant is applied to that copy, the fast tests that can see it (`-m "not slow"`,
the mutant's `tests` or its files' defaults) run with `-x`, and the copy is restored. A mutant is killed when a
test fails; the test and the first line of its error are printed, and a kill by an error that checks no
mechanism (an import, a name, a key, a shape, or the block-identity test) is flagged as weak and counted apart.
The unmutated tree is run first over the union of the tests: a failing baseline would make every mutant look
killed.

Speed: a mutant first runs only the test that killed it last time (KILLERS, a git-ignored cache the harness keeps
up to date; `--fresh` ignores it), and the whole selection only when that test passes. A run from a warm cache
therefore costs about one test per mutant, and the score is the same: a mutant counts as killed only by a test
that fails on it now.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.mutation.catalogue import Mutant

REPO = Path(__file__).resolve().parents[2]
KILLERS = REPO / ".mutation-killers.json"  # mutant id → the test that killed it last time

# The fast tests that can see a change in a file, when a mutant does not name its own.
DEFAULT_TESTS = {
    "odt.py": ["tests/test_odt.py", "tests/test_odt_equations.py", "tests/test_mechanisms.py"],
    "odt_td3.py": ["tests/test_odt_td3.py", "tests/test_odt_td3_equations.py", "tests/test_mechanisms.py"],
    "dt_grpo.py": ["tests/test_dt_grpo.py", "tests/test_dt_grpo_equations.py", "tests/test_mechanisms.py"],
    "reinformer_ag.py": ["tests/test_reinformer_ag.py", "tests/test_reinformer_ag_equations.py",
                         "tests/test_mechanisms.py"],
    "common/evaluation.py": ["tests/test_evaluation.py", "tests/test_common_equations.py"],
    "common/datasets.py": ["tests/test_datasets.py", "tests/test_download.py", "tests/test_common_equations.py"],
    "common/benchmark.py": ["tests/test_benchmark.py", "tests/test_common_equations.py"],
    "common/report.py": ["tests/test_report.py", "tests/test_common_equations.py"],
    "common/toys.py": ["tests/test_common_equations.py"],
}
# Kills that check no mechanism: the code stopped importing or running, or the copies of a block differ.
WEAK = re.compile(r"\b(KeyError|AttributeError|NameError|ImportError|ModuleNotFoundError|SyntaxError|"
                  r"IndentationError|TypeError|IndexError)\b|shape|size of tensor|test_shared_blocks")


def load_catalogue() -> list[Mutant]:
    mutants: list[Mutant] = []
    package = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda i: i.name):
        if info.name.startswith("mutants_"):
            mutants += importlib.import_module(f"tests.mutation.{info.name}").MUTANTS
    ids = [m.id for m in mutants]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        sys.exit(f"error: duplicate mutant ids: {duplicates}")
    return mutants


def check_targets(mutants: list[Mutant], root: Path) -> list[str]:
    """Every edit's old text occurs exactly once in its file: the mutant still targets real code."""
    problems = []
    for m in mutants:
        for path, old, _ in m.edits:
            file = root / path
            count = file.read_text().count(old) if file.exists() else -1
            if count != 1:
                where = "file missing" if count < 0 else f"found {count}×"
                problems.append(f"{m.id}: {path}: target text {where}: {old[:70]!r}")
        for test in tests_of(m):
            if not (root / test.split("::")[0]).exists():
                problems.append(f"{m.id}: test file missing: {test}")
    return problems


def tests_of(m: Mutant) -> list[str]:
    if m.tests:
        return list(m.tests)
    files = []
    for path, _, _ in m.edits:
        files += [t for t in DEFAULT_TESTS.get(path, []) if t not in files]
    return [t for t in files if (REPO / t).exists()] or ["tests"]


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (root / f).is_file() and not f.startswith("results/")]


def make_scratch(files: list[str]) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="mutation-"))
    for f in files:
        (scratch / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, scratch / f)
    return scratch


def run_pytest(scratch: Path, tests: list[str], timeout: float) -> tuple[int | None, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(scratch)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", "--no-header",
           "-rf", "--tb=line", "-o", "addopts=", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.perf_counter() - t0


def killer(output: str) -> str:
    """The failing test and the first line of its error, from pytest's -rf summary."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1][:220]
    tail = [line for line in output.splitlines() if line.strip()]
    return (tail[-1] if tail else "no output")[:220]


def read_killers() -> dict[str, str]:
    try:
        return json.loads(KILLERS.read_text())
    except (OSError, ValueError):
        return {}


def update_killers(mutant_id: str, node: str | None) -> None:
    """Record (or forget) one mutant's killing test; merged into the file, written atomically."""
    cache = read_killers()
    if node:
        cache[mutant_id] = node
    else:
        cache.pop(mutant_id, None)
    staging = KILLERS.with_name(f"{KILLERS.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(staging, KILLERS)


def run_mutant(m: Mutant, scratch: Path, timeout: float, first: str | None = None) -> dict:
    """Apply the mutant to the scratch copy, run `first` (last time's killer) alone, and the mutant's whole test
    selection unless that already failed; restore the copy."""
    originals = {}
    try:
        for path, old, new in m.edits:
            file = scratch / path
            text = file.read_text()
            originals.setdefault(path, text)
            file.write_text(text.replace(old, new, 1))
        rc, output, seconds = (run_pytest(scratch, [first], timeout) if first else (0, "", 0.0))
        if rc in (0, 4, 5):  # passed, or the cached test no longer exists: the whole selection decides
            rc, output, more = run_pytest(scratch, tests_of(m), timeout)
            seconds += more
    finally:
        for path, text in originals.items():
            (scratch / path).write_text(text)
    if rc == 0:
        status, by = "SURVIVED", ""
    elif rc is None:
        status, by = "KILLED-WEAK", f"timeout after {timeout:.0f} s"
    elif rc == 5:
        status, by = "ERROR", "no tests collected"
    else:
        by = killer(output)
        status = "KILLED-WEAK" if rc != 1 or WEAK.search(by) else "KILLED"
    return {"id": m.id, "description": m.description, "status": status, "by": by, "seconds": round(seconds, 1),
            "tests": tests_of(m)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated id prefixes (e.g. odt/,shared/)")
    parser.add_argument("--workers", type=int, default=2, help="mutants run at once (one core each)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as killed")
    parser.add_argument("--list", action="store_true", help="print the catalogue and check its targets, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated tree")
    parser.add_argument("--json", type=Path, help="write every outcome to this file")
    parser.add_argument("--fresh", action="store_true", help="ignore the cache of last time's killing tests")
    args = parser.parse_args()

    mutants = load_catalogue()
    if args.only:
        prefixes = tuple(p for p in args.only.split(",") if p)
        mutants = [m for m in mutants if m.id.startswith(prefixes)]
    problems = check_targets(mutants, REPO)
    if problems:
        print("error: the catalogue no longer matches the code (update these mutants):\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id:55s} {m.description}")
        print(f"{len(mutants)} mutants, every target found exactly once")
        return 0
    if not mutants:
        print("no mutants selected", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    files = repo_files(REPO)
    scratches = [make_scratch(files) for _ in range(max(1, args.workers))]
    try:
        if not args.no_baseline:
            union = sorted({t for m in mutants for t in tests_of(m)})
            rc, output, seconds = run_pytest(scratches[0], union, args.timeout * 2)
            if rc != 0:
                print(f"error: the unmutated tree fails its tests ({killer(output)}); fix that first",
                      file=sys.stderr)
                return 2
            print(f"baseline: {len(union)} test files pass on the unmutated tree ({seconds:.0f} s)", flush=True)

        todo: queue.Queue[Mutant] = queue.Queue()
        for m in mutants:
            todo.put(m)
        results: list[dict] = []
        lock = threading.Lock()
        cache = {} if args.fresh else read_killers()

        def worker(scratch: Path) -> None:
            while True:
                try:
                    m = todo.get_nowait()
                except queue.Empty:
                    return
                result = run_mutant(m, scratch, args.timeout, first=cache.get(m.id))
                with lock:
                    results.append(result)
                    node = result["by"].split(" - ")[0].strip()
                    update_killers(m.id, node if result["status"].startswith("KILLED") and "::" in node else None)
                    note = f" by {result['by']}" if result["by"] else f"  ({m.description})"
                    print(f"[{len(results)}/{len(mutants)}] {result['status']:11s} {m.id} ({result['seconds']} s)"
                          f"{note}", flush=True)

        threads = [threading.Thread(target=worker, args=(s,)) for s in scratches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s in scratches:
            shutil.rmtree(s, ignore_errors=True)

    elapsed = time.perf_counter() - t_start
    order = {m.id: i for i, m in enumerate(mutants)}
    results.sort(key=lambda r: order[r["id"]])
    killed = [r for r in results if r["status"] == "KILLED"]
    weak = [r for r in results if r["status"] == "KILLED-WEAK"]
    survivors = [r for r in results if r["status"] in ("SURVIVED", "ERROR")]
    n = len(results)
    print(f"\nscore: {len(killed) + len(weak)}/{n} killed ({100 * (len(killed) + len(weak)) / n:.1f} %), "
          f"{len(killed)} by a failing assertion, {len(weak)} weak (import/name/key/shape/identity/timeout), "
          f"{len(survivors)} survived; {elapsed / 60:.1f} min with {len(scratches)} worker(s)")
    for r in weak:
        print(f"  weak kill  {r['id']}: {r['by']}")
    for r in survivors:
        print(f"  {r['status'].lower():9s}  {r['id']}: {r['description']}")
    if args.json:
        args.json.write_text(json.dumps({"elapsed_s": round(elapsed, 1), "results": results}, indent=2))
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
