"""Mutants of the run plumbing and evidence tools added in the 2026-12-06 round: presets and typed flags, the
resume row count, device and resume messages, toy families, the report's statistics."""

from tests.mutation.catalogue import mutant

SCRIPTS = ["odt.py", "odt_td3.py", "dt_grpo.py", "reinformer_ag.py"]
RUNS = ["tests/test_runs.py"]

MUTANTS = [
    mutant("run/preset-overrides-typed-flags", "--preset cpu replaces flags the user typed",
           ("common/run.py", "changed = {k: v for k, v in presets[args.preset].items() if k not in typed}",
            "changed = {k: v for k, v in presets[args.preset].items()}"), tests=RUNS),
    mutant("run/typed-fields-no-prefix", "--no-progress is not counted as a typed flag",
           ("common/run.py", 'elif name.startswith("no_") and name[3:] in names:', "elif False:"), tests=RUNS),
    mutant("run/resume-rows-ignored", "a resume keeps every row up to the checkpoint's step, duplicating rows",
           ("common/run.py", "rows = (lines[:resume_rows] if resume_rows is not None",
            "rows = (lines if resume_rows is not None"), tests=RUNS),
    mutant("run/logger-does-not-count", "the logger does not count the rows it writes",
           ("common/run.py", "        self.file.flush()\n        self.rows += 1\n", "        self.file.flush()\n"),
           tests=RUNS),
    mutant("run/resume-command-script-name", "the resume command assumes the repository root",
           ("common/run.py", "os.path.relpath(Path(script).resolve())", "Path(script).name"), tests=RUNS),
    mutant("run/cuda-silently-cpu", "a typed --cuda without a GPU says nothing",
           ("common/run.py", 'if cuda and typed and "cuda" in typed:', "if False:"), tests=RUNS),
    mutant("run/failed-write-keeps-staging", "a failed checkpoint write leaves its staging file",
           ("common/run.py", "    except BaseException:\n        staging.unlink(missing_ok=True)\n        raise\n\n\n"
            "def checkpoint_write_failure",
            "    except BaseException:\n        raise\n\n\ndef checkpoint_write_failure"),
           tests=RUNS),
    mutant("toys/vitamin-right-slope", "the vitamin toy's right side falls with 1 + p instead of 1 − p",
           ("common/toys.py", "1.0 - 2.0 * (a - peak) / (1.0 - peak)", "1.0 - 2.0 * (a - peak) / (1.0 + peak)"),
           tests=["tests/test_toy_families.py"]),
    mutant("toys/ag-gap-ignored", "the AG toy's near data ignores the gap",
           ("common/toys.py", "rng.uniform(min(p + g, 1.0), 1.0, 64)", "rng.uniform(min(p + 0.5, 1.0), 1.0, 64)"),
           tests=["tests/test_toy_families.py"]),
    mutant("report/verdict-below-five-seeds", "the report gives verdicts with 2 seeds a side",
           ("common/report.py", "        if min(na, nb) < MIN_SEEDS:", "        if min(na, nb) < 2:"),
           tests=["tests/test_report_claims.py"]),
    mutant("report/best-is-final", "best-during-training is the final score",
           ("common/report.py", "max(float(np.max(c[1])), s) for c, s in zip(curves, scores, strict=True)",
            "s for c, s in zip(curves, scores, strict=True)"), tests=["tests/test_report_claims.py"]),
]
