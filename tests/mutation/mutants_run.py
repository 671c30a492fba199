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

R = "common/run.py"
UNIT = ["tests/test_run_module.py"]

# The run module as one unit (issue 20: the plumbing moved out of the scripts is tested in one place).
MUTANTS += [
    mutant("run/cli-user-error-exit-1", "a problem the user can fix exits 1 (a crash to the sweep runner), not 2",
           (R, "        print(f\"\\nerror: {err}\", file=sys.stderr)\n        sys.exit(2)",
            "        print(f\"\\nerror: {err}\", file=sys.stderr)\n        sys.exit(1)"), tests=UNIT),
    mutant("run/cli-stopped-exit-0", "a stopped run exits 0, so a sweep takes it for finished",
           (R, "sys.exit(EXIT_STOPPED if result.get(\"stopped\") else 0)", "sys.exit(0)"), tests=UNIT),
    mutant("run/cli-finished-resume-fails", "--resume of a finished run exits 1",
           (R, "        print(done)\n        sys.exit(0)", "        print(done)\n        sys.exit(1)"), tests=UNIT),
    mutant("run/cli-typed-lost", "main is not told which flags were typed (presets override them)",
           (R, "typed=typed_fields(sys.argv[1:], args_cls)", "typed=None"), tests=UNIT),
    mutant("run/resume-uses-todays-flags", "--resume trains with today's command line instead of the run's flags",
           (R, "    return saved, run_dir, checkpoint", "    return args, run_dir, checkpoint"), tests=UNIT),
    mutant("run/resume-progress-from-config", "--resume takes --no-progress from the old config, not the command line",
           (R, "saved.resume, saved.progress = args.resume, args.progress", "saved.resume = args.resume"), tests=UNIT),
    mutant("run/resume-finished-run", "--resume of a finished run trains it again",
           (R, "    if (run_dir / \"summary.json\").is_file():\n        raise RunFinished",
            "    if False:\n        raise RunFinished"), tests=UNIT),
    mutant("run/resume-other-script", "a run folder of another script is resumed",
           (R, "    if config.get(\"script\") != script:\n        raise UserError(f\"--resume",
            "    if False:\n        raise UserError(f\"--resume"), tests=UNIT),
    mutant("run/resume-keeps-stopped", "a resumed run keeps its STOPPED marker",
           (R, "    (run_dir / \"STOPPED\").unlink(missing_ok=True)  # only once the resume goes ahead\n", ""),
           tests=UNIT),
    mutant("run/config-overwritten", "a resumed run's config.json is overwritten",
           (R, "    if not (run_dir / \"config.json\").exists():\n        run_dir.mkdir",
            "    if True:\n        run_dir.mkdir"), tests=UNIT),
    mutant("run/second-signal-waits", "a second Ctrl-C does not abort",
           (R, "        if self.requested:  # second Ctrl-C: stop now", "        if False:  # second Ctrl-C: stop now"),
           tests=UNIT),
    mutant("run/nan-passes", "NaN statistics pass the finiteness check (only ±inf stop)",
           (R, "bad = [k for k, v in stats.items() if not math.isfinite(v)]",
            "bad = [k for k, v in stats.items() if math.isinf(v)]"), tests=UNIT),
    mutant("run/minimum-exclusive", "a flag exactly at its smallest valid value is refused",
           (R, "and getattr(args, name) < low}", "and getattr(args, name) <= low}"), tests=UNIT),
    mutant("run/logger-drops-checkpoint-step", "a resume by step drops the rows logged at the checkpoint's step",
           (R, "if json.loads(line)[\"global_step\"] <= resume_step]",
            "if json.loads(line)[\"global_step\"] < resume_step]"),
           tests=UNIT),
    mutant("run/checkpoint-in-place", "the checkpoint is written in place, so a full disk corrupts the last good one",
           (R, "        torch.save(state, staging)\n        os.replace(staging, path)",
            "        torch.save(state, path)"),
           tests=UNIT),
    mutant("run/cost-hint-never", "the cost estimate never points a many-hour run to --preset cpu",
           (R, "* seconds_per_update > 4 * 3600", "* seconds_per_update > 400 * 3600"), tests=UNIT),
]
