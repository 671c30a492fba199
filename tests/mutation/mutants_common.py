"""Plausible one-line bugs in common/ (evaluation, datasets, toys, benchmark runner, report)."""

from tests.mutation.catalogue import mutant

EQ = "tests/test_common_equations.py"
EVAL = [EQ, "tests/test_evaluation.py"]
# the data-semantics tests of test_datasets.py (not its Ctrl-C / kill -9 timing tests, which only slow a run)
DATA = [EQ] + [
    f"tests/test_datasets.py::{t}"
    for t in (
        "test_d4rl_file_splits_episodes_and_drops_remainder",
        "test_d4rl_file_without_next_observations",
        "test_d4rl_v0_file_without_timeouts_is_cut_every_1000_steps",
        "test_minari_folder_explicit_path",
        "test_local_minari_cache_hit_and_reference_scores",
        "test_generation_is_cached_as_minari_dataset",
        "test_generation_small_budget_keeps_whole_long_episodes",
        "test_generation_follows_d4rl_s_random_protocol_exactly_to_the_budget",
        "test_vitamin_toy",
        "test_ag_toy_and_vector_env",
        "test_known_ids_and_env_mapping",
        "test_actions_outside_the_action_space_are_refused",
        "test_actions_at_the_bounds_and_within_the_tolerance_are_accepted",
        "test_action_tolerance_holds_on_both_sides_and_clips_to_both_bounds",
    )
]
TOY = DATA + ["tests/test_toy_families.py"]
DOWN = [
    EQ,
    "tests/test_download.py::test_broken_connection_is_resumed_with_range",
    "tests/test_download.py::test_partial_file_of_an_earlier_run_is_resumed",
]
BENCH = [EQ, "tests/test_benchmark.py"]
REPORT = [EQ, "tests/test_report.py", "tests/test_report_claims.py"]

MUTANTS = [
    # --- common/evaluation.py: where an episode ends, what is recorded, the seeds, the statistics ----------------
    mutant(
        "common/rollout-truncation-does-not-end-episode",
        "an env time-limit truncation does not end the slot's episode (only termination does)",
        ("common/evaluation.py", "done |= terminated | truncated", "done |= terminated"),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-termination-does-not-end-episode",
        "a termination does not end the slot's episode (only truncation does)",
        ("common/evaluation.py", "done |= terminated | truncated", "done |= truncated"),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-finished-slots-add-reward",
        "rewards of slots whose episode already ended keep being added to their return",
        ("common/evaluation.py", "returns[active] += rewards[active]", "returns += rewards"),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-finished-slots-add-length",
        "steps of slots whose episode already ended keep counting in their length",
        ("common/evaluation.py", "lengths[active] += 1", "lengths += 1"),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-max-steps-off-by-one",
        "max_steps cuts every episode one step early",
        (
            "common/evaluation.py",
            "if max_steps is not None and t >= max_steps:",
            "if max_steps is not None and t >= max_steps - 1:",
        ),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-terminal-step-also-truncated",
        "a step that is both terminal and time-limited is recorded as truncated too",
        (
            "common/evaluation.py",
            'stacked["trunc"][i, :length].astype(bool) & ~term',
            'stacked["trunc"][i, :length].astype(bool)',
        ),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-max-steps-cut-not-truncated",
        "the last step of an episode cut by max_steps is not marked truncated",
        ("common/evaluation.py", "trunc[-1] = True  # cut by a time limit", "pass  # cut by a time limit"),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-seed-of-first-slot-only",
        "every slot is reset from the first seed (gymnasium then uses seed, seed+1, ...) instead of seeds[i]",
        (
            "common/evaluation.py",
            "obs, _ = envs.reset(seed=[int(s) for s in seeds])",
            "obs, _ = envs.reset(seed=int(seeds[0]))",
        ),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-records-obs-as-next-obs",
        "the recorded next observation is the current observation",
        (
            "common/evaluation.py",
            "(obs, actions, rewards, terminated, truncated, next_obs)",
            "(obs, actions, rewards, terminated, truncated, obs)",
        ),
        tests=EVAL,
    ),
    mutant(
        "common/rollout-policy-sees-stale-obs",
        "the policy keeps acting on the first observation (obs is not advanced)",
        ("common/evaluation.py", "        obs = next_obs\n", "        obs = obs\n"),
        tests=EVAL,
    ),
    mutant(
        "common/evaluate-score-std-of-returns",
        "the normalised-score std reports the raw-return std",
        (
            "common/evaluation.py",
            '"eval/normalized_score_std": float(scores.std())',
            '"eval/normalized_score_std": float(result.returns.std())',
        ),
        tests=EVAL,
    ),
    mutant(
        "common/evaluate-length-max",
        "the mean episode length reports the longest episode",
        (
            "common/evaluation.py",
            '"eval/length_mean": float(result.lengths.mean())',
            '"eval/length_mean": float(result.lengths.max())',
        ),
        tests=EVAL,
    ),
    mutant(
        "common/evaluate-return-std-ddof1",
        "the return std is the sample std (n-1) instead of the population std of the other statistics",
        (
            "common/evaluation.py",
            '"eval/return_std": float(result.returns.std())',
            '"eval/return_std": float(result.returns.std(ddof=1))',
        ),
        tests=EVAL,
    ),
    # --- common/datasets.py: reference scores and normalisation ----------------------------------------------
    mutant(
        "common/ref-walker2d-min-sign",
        "walker2d's reference min has the wrong sign",
        ("common/datasets.py", '"walker2d": (1.629008, 4592.3)', '"walker2d": (-1.629008, 4592.3)'),
        tests=DATA,
    ),
    mutant(
        "common/ref-hammer-min-sign",
        "hammer's reference min has the wrong sign",
        ("common/datasets.py", '"hammer": (-274.856578,', '"hammer": (274.856578,'),
        tests=DATA,
    ),
    mutant(
        "common/ref-door-max-of-relocate",
        "door uses relocate's reference max",
        ("common/datasets.py", '"door": (-56.512833, 2880.5693087298737)', '"door": (-56.512833, 4233.877797728884)'),
        tests=DATA,
    ),
    mutant(
        "common/ref-antmaze-percent",
        "antmaze's reference max is 100 (success in percent) instead of 1",
        ("common/datasets.py", '"antmaze": (0.0, 1.0),', '"antmaze": (0.0, 100.0),'),
        tests=DATA,
    ),
    mutant(
        "common/ref-maze2d-large-dense-sparse",
        "maze2d-large-dense uses the sparse task's reference scores",
        (
            "common/datasets.py",
            '"maze2d-large-dense": (30.569041, 303.4857382709002)',
            '"maze2d-large-dense": (6.7, 273.99)',
        ),
        tests=DATA,
    ),
    mutant(
        "common/ref-pen-min-of-ant",
        "pen's reference min is a typo (ant's)",
        ("common/datasets.py", '"pen": (96.262799,', '"pen": (-325.6,'),
        tests=DATA,
    ),
    mutant(
        "common/ref-dense-maze2d-uses-sparse-key",
        "dense maze2d tasks look up the sparse task's scores (kind cut at its first '-')",
        (
            "common/datasets.py",
            'REF_SCORES.get(f"{family}-{kind}")',
            "REF_SCORES.get(f\"{family}-{kind.split('-')[0]}\")",
        ),
        tests=DATA,
    ),
    mutant(
        "common/normalized-score-no-min-shift",
        "the normalised score forgets to subtract the reference min",
        (
            "common/datasets.py",
            "100.0 * (returns - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)",
            "100.0 * returns / (self.ref_max_score - self.ref_min_score)",
        ),
        tests=DATA,
    ),
    mutant(
        "common/state-std-no-floor",
        "the state std loses its + 1e-6 floor (a constant feature divides by 0)",
        ("common/datasets.py", "(obs.std(0, dtype=np.float64) + 1e-6)", "obs.std(0, dtype=np.float64)"),
        tests=DATA,
    ),
    # --- common/datasets.py: episode splitting -------------------------------------------------------------------
    mutant(
        "common/d4rl-v0-split-ignores-terminal",
        "v0 files: the 1000-step cut is counted from the terminal row instead of the step after it",
        ("common/datasets.py", "            start = end + 1\n", "            start = end\n"),
        tests=DATA,
    ),
    mutant(
        "common/d4rl-v0-split-off-by-one",
        "v0 files: episodes are cut after 1001 steps",
        (
            "common/datasets.py",
            "np.arange(start + max_episode_steps - 1, end, max_episode_steps)",
            "np.arange(start + max_episode_steps, end, max_episode_steps)",
        ),
        tests=DATA,
    ),
    mutant(
        "common/d4rl-terminal-timeout-truncated",
        "a step with both terminal and timeout is also a truncation",
        ("common/datasets.py", "truncations = timeouts & ~terminals", "truncations = timeouts.copy()"),
        tests=DATA,
    ),
    mutant(
        "common/d4rl-timeouts-do-not-end-episodes",
        "timeouts do not end an episode in a D4RL file",
        ("common/datasets.py", "done = terminals | timeouts", "done = terminals"),
        tests=DATA,
    ),
    mutant(
        "common/d4rl-next-obs-crosses-episodes",
        "without next_observations, an episode's last step takes the next episode's first observation",
        (
            "common/datasets.py",
            "next_obs[ends] = obs[ends]  # no successor",
            "next_obs[-1] = obs[used - 1]  # no successor",
        ),
        tests=DATA,
    ),
    mutant(
        "common/minari-unflagged-end-terminal",
        "a Minari episode ending without any flag is made terminal instead of truncated",
        ("common/datasets.py", "truncs[-1] = True  # cut without a flag", "terms[-1] = True  # cut without a flag"),
        tests=DATA,
    ),
    mutant(
        "common/minari-next-obs-is-obs",
        "Minari episodes: next observations are the observations themselves",
        ("common/datasets.py", "obs[o + 1:o + t + 1]))", "obs[o:o + t]))"),
        tests=DATA,
    ),
    mutant(
        "common/minari-obs-offset-t",
        "Minari flat arrays: the observation offset advances by T instead of T+1",
        ("common/datasets.py", "s, o = s + t, o + t + 1", "s, o = s + t, o + t"),
        tests=DATA,
    ),
    mutant(
        "common/generate-overruns-budget",
        "generation steps every env in the last round, past the budget",
        ("common/datasets.py", "k = min(n_envs, steps - total)", "k = n_envs"),
        tests=DATA,
    ),
    mutant(
        "common/generate-same-seed-every-env",
        "every generation env is reset with the same seed",
        ("common/datasets.py", "env.reset(seed=seed + i)[0]", "env.reset(seed=seed)[0]"),
        tests=DATA,
    ),
    mutant(
        "common/generate-budget-cut-terminal",
        "an episode still running when the budget is spent is marked terminal instead of truncated",
        ("common/datasets.py", 'ep["trunc"][-1] = True', 'ep["term"][-1] = True'),
        tests=DATA,
    ),
    mutant(
        "common/generate-unseeded-actions",
        "the random actions of generation ignore the seed",
        (
            "common/datasets.py",
            "    rng = np.random.default_rng(seed)\n\n    def fresh",
            "    rng = np.random.default_rng()\n\n    def fresh",
        ),
        tests=DATA,
    ),
    mutant(
        "common/action-tolerance-low-side-only",
        "actions above the high bound are never refused",
        (
            "common/datasets.py",
            "outside = (actions < low - tolerance) | (actions > high + tolerance)",
            "outside = (actions < low - tolerance)",
        ),
        tests=DATA,
    ),
    mutant(
        "common/action-clip-low-side-only",
        "actions within the tolerance are clipped only when some lie below the low bound",
        ("common/datasets.py", "if ((actions < low) | (actions > high)).any():", "if (actions < low).any():"),
        tests=DATA,
    ),
    mutant(
        "common/toy-episode-truncated",
        "toy episodes are recorded as truncated instead of terminal",
        (
            "common/datasets.py",
            "np.ones(1, bool), np.zeros(1, bool), one.copy()",
            "np.zeros(1, bool), np.ones(1, bool), one.copy()",
        ),
        tests=DATA,
    ),
    mutant(
        "common/download-resume-any-range",
        "a resumed download accepts a Content-Range starting elsewhere",
        ("common/datasets.py", "if m and int(m[1]) == start:", "if m:"),
        tests=DOWN,
    ),
    # --- common/toys.py ----------------------------------------------------------------------------------------------
    mutant(
        "common/toy-clip-high-side-only",
        "the toy envs clip actions only at the high bound",
        (
            "common/toys.py",
            "a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))",
            "a = float(min(np.asarray(action, dtype=np.float64).reshape(-1)[0], 1.0))",
        ),
        tests=TOY,
    ),
    mutant(
        "common/toy-ag-data-range",
        "the AG toy's negative data actions reach -0.5 instead of stopping at -0.8",
        (
            "common/toys.py",
            "rng.uniform(-1.0, -1.0 + 0.2 * (1.0 + p), 64)",
            "rng.uniform(-1.0, -1.0 + 0.5 * (1.0 + p), 64)",
        ),
        tests=TOY,
    ),
    mutant(
        "common/toy-vitamin-right-slope",
        "the vitamin reward's right branch has slope -1 instead of -2",
        (
            "common/toys.py",
            "1.0 - 2.0 * (a - peak) / (1.0 - peak)",
            "1.0 - (a - peak) / (1.0 - peak)",
        ),
        tests=TOY,
    ),
    # --- common/benchmark.py -------------------------------------------------------------------------------------
    mutant(
        "common/sweep-experiment-seeds-ignored",
        "the sweep's seeds override an experiment's own seeds",
        ("common/benchmark.py", 'exp.get("seeds", spec.get("seeds"))', 'spec.get("seeds", exp.get("seeds"))'),
        tests=BENCH,
    ),
    mutant(
        "common/sweep-flag-order-reversed",
        "variant flags come first, so the sweep's shared flags win",
        (
            "common/benchmark.py",
            "tuple(top_flags + exp_flags + variant_flags)",
            "tuple(variant_flags + exp_flags + top_flags)",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/sweep-exp-name-is-experiment",
        "--exp-name is the experiment's name, not the variant's",
        (
            "common/benchmark.py",
            '"--exp-name", self.variant, *self.flags]',
            '"--exp-name", self.experiment, *self.flags]',
        ),
        tests=BENCH,
    ),
    mutant(
        "common/resume-oldest-checkpoint",
        "a stopped cell resumes its oldest checkpointed folder",
        (
            "common/benchmark.py",
            'CellState("stopped", resumable[-1], stale)',
            'CellState("stopped", resumable[0], stale)',
        ),
        tests=BENCH,
    ),
    mutant(
        "common/done-oldest-folder",
        "a done cell points at its oldest finished folder",
        ("common/benchmark.py", 'CellState("done", finished[-1])', 'CellState("done", finished[0])'),
        tests=BENCH,
    ),
    mutant(
        "common/folders-sorted-as-text",
        "run folders are ordered by name, so stamp 999 is newer than 1000",
        (
            "common/benchmark.py",
            "sorted(found, key=lambda p: (stamp(p), p.name))",
            "sorted(found, key=lambda p: p.name)",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/finish-exit0-checkpoint-failed",
        "a script that exits 0 after checkpointing (without summary) is counted failed, not stopped",
        (
            "common/benchmark.py",
            'if returncode == STOPPED_EXIT or (returncode == 0 and st.state == "stopped"):',
            "if returncode == STOPPED_EXIT:",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/compact-unfinished-runs",
        "--compact also deletes the checkpoint of unfinished runs",
        (
            "common/benchmark.py",
            'if folder is not None and (folder / "summary.json").is_file():',
            "if folder is not None:",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/run-local-skips-stopped",
        "the local runner only starts pending cells; stopped ones never resume",
        (
            "common/benchmark.py",
            'todo = [r for r in runs if states[r] not in ("done", "running")]',
            'todo = [r for r in runs if states[r] == "pending"]',
        ),
        tests=BENCH,
    ),
    mutant(
        "common/child-env-one-thread",
        "every child runs with one thread whatever --threads-per-run says",
        ("common/benchmark.py", "env[var] = str(threads)", 'env[var] = "1"'),
        tests=BENCH,
    ),
    mutant(
        "common/main-workers-threads-swapped",
        "main hands threads as workers and workers as threads",
        (
            "common/benchmark.py",
            "return run_local(results, sweep.runs, args.workers, threads, compact=args.compact)",
            "return run_local(results, sweep.runs, threads, args.workers, compact=args.compact)",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/main-compact-dropped",
        "--compact never reaches the local runner",
        (
            "common/benchmark.py",
            "return run_local(results, sweep.runs, args.workers, threads, compact=args.compact)",
            "return run_local(results, sweep.runs, args.workers, threads, compact=False)",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/slurm-cpus-ignore-threads",
        "Slurm tasks get 1 CPU unless --cpus-per-task is given",
        (
            "common/benchmark.py",
            "cpus_per_task=args.cpus_per_task or args.threads_per_run",
            "cpus_per_task=args.cpus_per_task or 1",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/slurm-time-rounded-down",
        "the Slurm time limit is rounded down to whole minutes",
        ("common/benchmark.py", "timeout_min=math.ceil(_minutes(args.time))", "timeout_min=int(_minutes(args.time))"),
        tests=BENCH,
    ),
    mutant(
        "common/slurm-parallelism-from-cpus",
        "the array parallelism is the CPUs per task, not --workers",
        ("common/benchmark.py", "slurm_array_parallelism=args.workers", "slurm_array_parallelism=args.cpus_per_task"),
        tests=BENCH,
    ),
    mutant(
        "common/submitit-threads-ignore-threads-per-run",
        "array tasks run their script with --cpus-per-task threads, ignoring --threads-per-run",
        (
            "common/benchmark.py",
            "threads = args.threads_per_run or args.cpus_per_task or 1",
            "threads = args.cpus_per_task or 1",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/submitit-resubmits-done",
        "the Slurm path submits done cells again",
        (
            "common/benchmark.py",
            'out)\n    todo = [r for r in runs if cell_state(results, r).state not in ("done", "running")]',
            'out)\n    todo = [r for r in runs if cell_state(results, r).state not in ("running",)]',
        ),
        tests=BENCH,
    ),
    # --- common/report.py ----------------------------------------------------------------------------------------
    mutant(
        "common/report-offline-if-any-row",
        "a run counts as offline (x = updates) when ANY row has 0 env steps",
        (
            "common/report.py",
            'offline = all(r.get("env_steps", 0) == 0 for r in rows)',
            'offline = any(r.get("env_steps", 0) == 0 for r in rows)',
        ),
        tests=REPORT,
    ),
    mutant(
        "common/report-curve-keeps-first-eval",
        "several evaluations at one x keep the first, not the last",
        (
            "common/report.py",
            'points[float(r[xkey])] = float(r[f"{prefix}{SCORE}"])',
            'points.setdefault(float(r[xkey]), float(r[f"{prefix}{SCORE}"]))',
        ),
        tests=REPORT,
    ),
    mutant(
        "common/report-point-estimate-vs-interval",
        "a difference is declared when one IQM point lies above the other's interval (intervals may overlap)",
        ("common/report.py", "            if a.lo > b.hi:", "            if a.iqm > b.hi:"),
        tests=REPORT,
    ),
    mutant(
        "common/report-single-seed-compared",
        "a single-seed row is compared when the other has two seeds",
        (
            "common/report.py",
            "if len(a.scores) < 2 or len(b.scores) < 2:",
            "if len(a.scores) < 2 and len(b.scores) < 2:",
        ),
        tests=REPORT,
    ),
    mutant(
        "common/report-groups-unfinished-runs",
        "unfinished runs are grouped with the finished ones",
        (
            "common/report.py",
            "        if run.finished:\n            groups.setdefault",
            "        if True:\n            groups.setdefault",
        ),
        tests=REPORT,
    ),
    mutant(
        "common/report-eval-episodes-neutral",
        "runs differing in --eval-episodes are grouped as seeds of one variant",
        (
            "common/report.py",
            '"checkpoint_interval", "eval_only"}',
            '"checkpoint_interval", "eval_only", "eval_episodes"}',
        ),
        tests=REPORT,
    ),
    mutant(
        "common/report-curve-to-longest-run",
        "curves are interpolated up to the LONGEST run (extrapolating the others)",
        ("common/report.py", "end = min(float(s[-1]) for s in steps)", "end = max(float(s[-1]) for s in steps)"),
        tests=REPORT,
    ),
    mutant(
        "common/report-curve-trim-10pct",
        "the curve IQM trims 10 % each side instead of 25 %",
        ("common/report.py", "proportiontocut=0.25, axis=0", "proportiontocut=0.1, axis=0"),
        tests=REPORT,
    ),
    mutant(
        "common/report-rf-row-ag-return",
        "the plain-Reinformer row shows the AG return",
        (
            "common/report.py",
            'r.summary.get(f"{prefix}{RETURN}", math.nan)',
            'r.summary.get(f"eval/{RETURN}", math.nan)',
        ),
        tests=REPORT,
    ),
    mutant(
        "common/report-std-ddof0",
        "the table's std over seeds uses n instead of n - 1",
        ("common/report.py", "std = float(np.std(row.scores, ddof=1))", "std = float(np.std(row.scores))"),
        tests=REPORT,
    ),
    mutant(
        "common/report-verdict-from-point",
        "a verdict is given when P(X > Y) > 1/2 although its interval holds 1/2",
        ("common/report.py", "elif lo > 0.5:", "elif p > 0.5:"),
        tests=REPORT,
    ),
    mutant(
        "common/report-min-seeds-larger-side",
        "the below-MIN_SEEDS warning looks at the larger side only",
        ("common/report.py", "if min(na, nb) < MIN_SEEDS:", "if max(na, nb) < MIN_SEEDS:"),
        tests=REPORT,
    ),
    mutant(
        "common/report-pairs-across-metric-sets",
        "unclaimed pairs also pair AG rows with plain-RF rows",
        ("common/report.py", "for b in rows[i + 1:] if a.prefix == b.prefix]", "for b in rows[i + 1:]]"),
        tests=REPORT,
    ),
    mutant(
        "common/report-best-is-last-eval",
        "best-during-training takes the last evaluation, not the highest",
        ("common/report.py", "max(float(np.max(c[1])), s)", "max(float(c[1][-1]), s)"),
        tests=REPORT,
    ),
    mutant(
        "common/report-aligned-grid-uncapped",
        "the aligned curve grid runs past the shortest seed's end",
        ("common/report.py", "xs = np.minimum(xs, end)", "xs = xs"),
        tests=REPORT,
    ),
    mutant(
        "common/evaluate-normalizes-mean-return",
        "evaluate normalises the mean return once, so the score std is 0",
        (
            "common/evaluation.py",
            "scores = np.asarray(normalize(result.returns), dtype=np.float64)",
            "scores = np.asarray(normalize(result.returns.mean()), dtype=np.float64)",
        ),
        tests=EVAL,
    ),
    mutant(
        "common/state-mean-of-next-observations",
        "state statistics are taken over the next observations",
        (
            "common/datasets.py",
            "obs = np.concatenate([e.observations for e in loaded.episodes])",
            "obs = np.concatenate([e.next_observations for e in loaded.episodes])",
        ),
        tests=DATA,
    ),
    mutant(
        "common/minari-ref-scores-ignored",
        "a dataset's own stored reference scores are replaced by the table",
        (
            "common/datasets.py",
            "    if ref_min is None or ref_max is None:\n        ref_min, ref_max = _table_ref(",
            "    if True:\n        ref_min, ref_max = _table_ref(",
        ),
        tests=DATA,
    ),
    mutant(
        "common/launch-cwd-repo",
        "runs start in the repository instead of the results folder",
        ("common/benchmark.py", "proc = subprocess.Popen(cmd, cwd=results,", "proc = subprocess.Popen(cmd, cwd=REPO,"),
        tests=BENCH,
    ),
    mutant(
        "common/running-marker-never-stale",
        "another node's running marker is trusted for ever",
        ("common/benchmark.py", "alive = time.time() - max(touched) < STALE_AFTER_S", "alive = True"),
        tests=BENCH,
    ),
    mutant(
        "common/flat-cache-key-size-only",
        "the derived float32 cache is keyed by the file size only (stale after a rewrite)",
        (
            "common/datasets.py",
            "np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)",
            "np.array([st.st_size, 0], dtype=np.int64)",
        ),
        tests=DATA,
    ),
    mutant(
        "common/toy-data-ignores-seed",
        "the toy offline data is always drawn from seed 0",
        ("common/datasets.py", "data = _toy_data(name, seed)", "data = _toy_data(name, 0)"),
        tests=DATA,
    ),
    mutant(
        "common/main-local-threads-from-cpus",
        "locally, --cpus-per-task sets the threads of every run",
        (
            "common/benchmark.py",
            'threads = args.threads_per_run or (args.cpus_per_task if args.backend != "local" else None) or 1',
            "threads = args.threads_per_run or args.cpus_per_task or 1",
        ),
        tests=BENCH,
    ),
    mutant(
        "common/main-slurm-default-one-worker",
        "on Slurm the default array parallelism is 1 instead of every run",
        ("common/benchmark.py", "else len(sweep.runs))", "else 1)"),
        tests=BENCH,
    ),
    mutant(
        "common/toy-ag-peak-distance-signed",
        "the AG family scales by 1 + peak instead of 1 + |peak|",
        ("common/toys.py", "((a - peak) / (1.0 + abs(peak))) ** 2", "((a - peak) / (1.0 + peak)) ** 2"),
        tests=TOY,
    ),
    mutant(
        "common/toy-vitamin-ref-min",
        "the vitamin family's worst reachable reward is taken as its offset",
        (
            "common/toys.py",
            "(self.offset - 1.0, self.offset + 1.0) if self.kind",
            "(self.offset, self.offset + 1.0) if self.kind",
        ),
        tests=TOY,
    ),
    mutant(
        "common/adroit-hammer-on-door-env",
        "hammer datasets are played on the door env",
        ("common/datasets.py", '"hammer": "AdroitHandHammer-v1"', '"hammer": "AdroitHandDoor-v1"'),
        tests=DATA,
    ),
]
