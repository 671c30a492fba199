"""Tables, learning curves and a CSV from a folder of finished runs (what `python -m common.benchmark` writes).

    python -m common.report results/toys                  # → results/toys/report.md, curves_*.png, runs.csv
    python -m common.report results/toys --out /tmp/rep    # somewhere else

Runs are the folders under RESULTS/runs/ (or RESULTS/ itself) with a config.json; a run is finished when it
has a summary.json. Runs are grouped by (variant = --exp-name, env id). When RESULTS/sweep.toml exists (the
benchmark runner copies the sweep file there) variants are grouped into its experiments, which are compared
among themselves; otherwise every variant on a dataset is compared with every other.

For each group the table gives the final normalised score (`eval/normalized_score_mean` of summary.json) as
mean ± std over seeds (std with n − 1), the interquartile mean (IQM: the mean of the middle 50 % of runs) with
a 95 % stratified-bootstrap confidence interval (rliable, percentile method, `--reps` resamples), the final
return, and per run env steps, gradient updates and wall time. Two variants whose IQM intervals do not overlap
are listed as a difference. Curves are the IQM and its 95 % interval per evaluation point, against online env
steps (against gradient updates for offline-only runs). Reinformer+AG runs also log plain Reinformer on the
same model and episodes (`eval_rf/…`); it is shown as an extra row `<variant> [RF, no AG]`.

Each row also gives the best-during-training score (the highest evaluation of each run's curve, IQM over seeds:
CORL reports both; "best" is optimistic, "final" is noisy, so read them together). Comparisons within a table are
rliable's probability of improvement P(X > Y) with a 95 % stratified-bootstrap interval, for the pairs the sweep
file lists as `claims = [["x", "y"], …]` (else every pair), each naming its seeds per side. Below MIN_SEEDS seeds
on a side the report prints a warning instead of a verdict: with 3 seeds a "non-overlapping" interval is little
more than the seeds' min-max. Seeds evaluated at slightly different env steps are aligned (point k of every
seed at the seeds' median step k) rather than drawn as doubled markers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# flags that do not change what a run computes: runs differing only in these still form one group
NEUTRAL_ARGS = {"seed", "resume", "progress", "track", "wandb_project_name", "wandb_entity", "capture_video",
                "save_model", "cuda", "dataset_path", "checkpoint_interval", "eval_only"}
IGNORED_DIRS = {"logs", "submitit", "wandb", "__pycache__"}
SCORE, RETURN = "normalized_score_mean", "return_mean"
METRIC_SETS = (("eval/", ""), ("eval_rf/", " [RF, no AG]"))  # summary prefix → row-label suffix
MIN_SEEDS = 5  # fewer seeds per side: a warning instead of a verdict


class ReportError(Exception):
    """A problem with the results folder, printed as one paragraph without a traceback."""


@dataclass
class RunResult:
    folder: Path
    script: str
    variant: str
    env_id: str
    seed: int
    args: dict
    summary: dict | None
    curve: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # prefix → (x, score)
    x_label: str = "env steps"

    @property
    def finished(self) -> bool:
        return self.summary is not None


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not readable JSON ({exc}); {what}.") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a JSON object; {what}.")
    return data


def _curves(folder: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """Evaluation points of metrics.jsonl per metric prefix; x = env steps (global_step if all are 0).
    Several evaluations at one x (pretraining evaluates at env step 0) keep the last one."""
    rows = []
    path = folder / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the rows before it are still good
    offline = all(r.get("env_steps", 0) == 0 for r in rows)
    xkey, label = ("global_step", "gradient updates") if offline else ("env_steps", "online env steps")
    out = {}
    for prefix, _ in METRIC_SETS:
        points: dict[float, float] = {}
        for r in rows:
            if f"{prefix}{SCORE}" in r and xkey in r:
                points[float(r[xkey])] = float(r[f"{prefix}{SCORE}"])
        if points:
            xs = np.array(sorted(points))
            out[prefix] = (xs, np.array([points[x] for x in xs]))
    return out, label


def load_runs(results: Path) -> tuple[list[RunResult], dict]:
    """All run folders under RESULTS (RESULTS/runs/* or RESULTS/*), and the sweep file if one was copied there."""
    if not results.is_dir():
        raise ReportError(f"{results} is not a folder. Pass the results folder of a sweep, e.g. "
                          f"`python -m common.report results/toys` after `python -m common.benchmark "
                          f"benchmarks/toys.toml`.")
    base = results / "runs" if (results / "runs").is_dir() else results
    candidates = [results] if (results / "config.json").is_file() else sorted(
        p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_DIRS)
    if not candidates:
        raise ReportError(f"{results} holds no run folders: expected {base}/<env>__<variant>__<seed>__<time>/ "
                          f"with config.json, metrics.jsonl and (when finished) summary.json. Run a sweep first: "
                          f"`python -m common.benchmark <sweep.toml> --results {results}`.")
    unknown = [p for p in candidates if not (p / "config.json").is_file()]
    if unknown:
        names = ", ".join(p.name for p in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ReportError(f"{base} mixes run folders with {len(unknown)} folder(s) that are not runs (no config.json):"
                          f" {names}. A results folder must hold only run folders written by the scripts (a run "
                          f"killed before writing its config leaves such a folder: delete it, or re-issue the sweep, "
                          f"which removes it).")
    runs = []
    for folder in candidates:
        config = _read_json(folder / "config.json", "every run folder needs the config.json its script wrote")
        args = config.get("args")
        if not isinstance(args, dict) or not {"env_id", "exp_name", "seed"} <= set(args) or "script" not in config:
            raise ReportError(f"{folder}/config.json is not a run configuration of this project (it needs 'script' "
                              f"and 'args' with env_id, exp_name and seed). The folder does not belong in {base}.")
        summary = (_read_json(folder / "summary.json", "a finished run's summary.json is written by its script")
                   if (folder / "summary.json").is_file() else None)
        if summary is not None and f"eval/{SCORE}" not in summary:
            raise ReportError(f"{folder}/summary.json has no eval/{SCORE}: it is not a training run's summary (an "
                              f"--eval-only summary?). Keep such files out of the results folder.")
        curve, label = _curves(folder)
        runs.append(RunResult(folder, str(config["script"]), str(args["exp_name"]), str(args["env_id"]),
                              int(args["seed"]), args, summary, curve, label))
    sweep = {}
    if (results / "sweep.toml").is_file():
        try:
            sweep = tomllib.loads((results / "sweep.toml").read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ReportError(f"{results}/sweep.toml is not valid TOML ({exc}).") from exc
    return runs, sweep


def check_groups(runs: list[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    """Group finished runs by (variant, env id); refuse duplicated seeds and groups whose runs differ."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        if run.finished:
            groups.setdefault((run.variant, run.env_id), []).append(run)
    for (variant, env_id), members in groups.items():
        seeds = [r.seed for r in members]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            folders = ", ".join(r.folder.name for r in members if r.seed in dup)
            raise ReportError(f"variant {variant} on {env_id} has more than one finished run for seed(s) {dup} "
                              f"({folders}). Each seed must count once: remove the extra folder(s).")
        first = members[0]
        for other in members[1:]:
            if other.script != first.script:
                raise ReportError(f"variant {variant} on {env_id} mixes scripts ({first.script} in "
                                  f"{first.folder.name}, {other.script} in {other.folder.name}). Give different "
                                  f"--exp-name values to different experiments.")
            keys = sorted(k for k in set(first.args) | set(other.args) if k not in NEUTRAL_ARGS
                          and first.args.get(k) != other.args.get(k))
            if keys:
                diff = "; ".join(f"--{k.replace('_', '-')} {first.args.get(k)!r} vs {other.args.get(k)!r}"
                                 for k in keys[:4])
                raise ReportError(f"variant {variant} on {env_id} mixes runs with different settings ({diff}; "
                                  f"{first.folder.name} vs {other.folder.name}), so they are not seeds of one "
                                  f"experiment. Use a different --exp-name per setting (one variant per line of the "
                                  f"sweep file) or separate results folders.")
    return groups


# ---------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int):
    """rliable's StratifiedBootstrap draws its indices from NumPy's global generator (its random_state argument
    does not reach them), so the report seeds that generator for the call and restores it afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of a flat set of scores (rliable's aggregate_iqm: scipy trim_mean, 25 % each side)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(scores, dtype=float).reshape(-1, 1)))


def iqm_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0, size: float = 0.95) -> tuple[float, float, float]:
    """IQM and its stratified-bootstrap confidence interval; scores is (runs,) or (runs, tasks)."""
    from rliable import library as rly
    from rliable import metrics

    scores = np.asarray(scores, dtype=float)
    scores = scores[:, None] if scores.ndim == 1 else scores
    with warnings.catch_warnings(), _seeded(seed):
        warnings.simplefilter("ignore")  # arch's FutureWarning about random_state
        point, ci = rly.get_interval_estimates({"x": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]),
                                               reps=reps, confidence_interval_size=size)
    return float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0])


def iqm_curve(curves: np.ndarray, reps: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM and 95 % interval at each point of (runs, points) curves, one stratified bootstrap per point."""
    from rliable import library as rly
    from scipy.stats import trim_mean

    scores = np.asarray(curves, dtype=float)[:, None, :]  # runs × 1 task × points
    # rliable's aggregate_iqm (trim_mean of 25 % each side) of every point at once
    fn = lambda s: trim_mean(s.reshape(-1, s.shape[-1]), proportiontocut=0.25, axis=0)
    with warnings.catch_warnings(), _seeded(seed):
        warnings.simplefilter("ignore")
        point, ci = rly.get_interval_estimates({"x": scores}, fn, reps=reps)
    return point["x"], ci["x"][0], ci["x"][1]


@dataclass
class Row:
    label: str
    variant: str
    env_id: str
    prefix: str
    runs: list[RunResult]
    scores: np.ndarray
    returns: np.ndarray
    iqm: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    best: np.ndarray | None = None  # per run: the highest evaluation during training (None: no curves)
    best_iqm: float = math.nan
    best_lo: float = math.nan
    best_hi: float = math.nan


def make_row(variant: str, env_id: str, prefix: str, suffix: str, runs: list[RunResult], reps: int,
             seed: int) -> Row | None:
    runs = sorted(runs, key=lambda r: r.seed)
    if not all(f"{prefix}{SCORE}" in r.summary for r in runs):
        return None
    scores = np.array([float(r.summary[f"{prefix}{SCORE}"]) for r in runs])
    returns = np.array([float(r.summary.get(f"{prefix}{RETURN}", math.nan)) for r in runs])
    row = Row(variant + suffix, variant, env_id, prefix, runs, scores, returns)
    row.iqm, row.lo, row.hi = iqm_ci(scores, reps, seed)
    curves = [r.curve.get(prefix) for r in runs]
    if all(c is not None and len(c[1]) for c in curves):
        row.best = np.array([max(float(np.max(c[1])), s) for c, s in zip(curves, scores, strict=True)])
        row.best_iqm, row.best_lo, row.best_hi = iqm_ci(row.best, reps, seed)
    return row


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int = 2000, seed: int = 0
                               ) -> tuple[float, float, float]:
    """rliable's P(X > Y) (Mann-Whitney U / (n_x n_y), ties count ½) and its 95 % stratified-bootstrap interval."""
    from rliable import library as rly
    from rliable import metrics

    x, y = np.asarray(x, dtype=float)[:, None], np.asarray(y, dtype=float)[:, None]
    with warnings.catch_warnings(), _seeded(seed):
        warnings.simplefilter("ignore")
        point, ci = rly.get_interval_estimates({"p": (x, y)}, metrics.probability_of_improvement, reps=reps)
    return float(point["p"]), float(ci["p"][0, 0]), float(ci["p"][1, 0])


def comparisons(rows: list[Row], claims: list | None, reps: int, seed: int) -> list[str]:
    """One line per claimed pair (or every pair): P(X > Y) with its interval and the seeds per side; a verdict
    (the interval excludes ½) only with ≥ MIN_SEEDS seeds on both sides, else a warning."""
    by_label = {r.label: r for r in rows}
    if claims:
        pairs = [(by_label.get(a), by_label.get(b)) for a, b in claims]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    else:
        pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:] if a.prefix == b.prefix]
    lines = []
    for a, b in pairs:
        na, nb = len(a.scores), len(b.scores)
        if na < 2 or nb < 2:
            lines.append(f"- `{a.label}` vs `{b.label}` ({na} vs {nb} seeds): too few seeds to compare.")
            continue
        p, lo, hi = probability_of_improvement(a.scores, b.scores, reps, seed)
        text = f"- P(`{a.label}` > `{b.label}`) = {_fmt(p)} [{_fmt(lo)}, {_fmt(hi)}] ({na} vs {nb} seeds, final score)"
        if min(na, nb) < MIN_SEEDS:
            text += f": **warning: fewer than {MIN_SEEDS} seeds on a side, no verdict**"
        elif lo > 0.5:
            text += ": `" + a.label + "` better"
        elif hi < 0.5:
            text += ": `" + b.label + "` better"
        else:
            text += ": inconclusive (the interval contains ½)"
        lines.append(text + ".")
    return lines


def non_overlapping(rows: list[Row]) -> list[tuple[Row, Row]]:
    """Pairs (better, worse) whose IQM confidence intervals do not overlap (only pairs with ≥ 2 seeds each)."""
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if len(a.scores) < 2 or len(b.scores) < 2:
                continue
            if a.lo > b.hi:
                pairs.append((a, b))
            elif b.lo > a.hi:
                pairs.append((b, a))
    return pairs


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------
def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean_counter(runs: list[RunResult], key: str) -> str:
    vals = [r.summary.get("counters", {}).get(key) for r in runs]
    vals = [v for v in vals if isinstance(v, int | float)]
    if not vals:
        return "n/a"
    return f"{int(vals[0])}" if min(vals) == max(vals) else f"{int(min(vals))}–{int(max(vals))}"


def _wall(runs: list[RunResult]) -> str:
    vals = [float(r.summary["wall_time_s"]) for r in runs if isinstance(r.summary.get("wall_time_s"), int | float)]
    if not vals:
        return "n/a"
    m = float(np.mean(vals))
    return f"{m:.1f} s" if m < 120 else f"{m / 60:.1f} min"


def table(rows: list[Row]) -> list[str]:
    out = ["| variant | script | seeds | final score, mean ± std | IQM [95% CI] | best during training, IQM [95% CI] "
           "| final return, mean | env steps | updates | wall time / run |", "|---" * 10 + "|"]
    for row in rows:
        std = float(np.std(row.scores, ddof=1)) if len(row.scores) > 1 else math.nan
        ci = f"[{_fmt(row.lo)}, {_fmt(row.hi)}]" if len(row.scores) > 1 else "(1 seed)"
        best = "n/a" if row.best is None else f"{_fmt(row.best_iqm)} " + (
            f"[{_fmt(row.best_lo)}, {_fmt(row.best_hi)}]" if len(row.best) > 1 else "(1 seed)")
        out.append(f"| `{row.label}` | `{row.runs[0].script}` | {len(row.scores)} | {_fmt(float(row.scores.mean()))} ± "
                   f"{_fmt(std)} | **{_fmt(row.iqm)}** {ci} | {best} | {_fmt(float(np.nanmean(row.returns)), 3)} | "
                   f"{_mean_counter(row.runs, 'env_steps')} | {_mean_counter(row.runs, 'updates')} | "
                   f"{_wall(row.runs)} |")
    return out


def aligned_steps(steps: list[np.ndarray], max_points: int = 60) -> np.ndarray:
    """One x grid for seeds evaluated at slightly different steps (a round ends past the interval): point k of
    the grid is the median over seeds of their k-th evaluation step, for the points every seed has; seeds with
    different schedules share an even grid up to the shortest curve's end. Never the union of all steps, which
    draws one seed's points and its neighbour's as doubled markers."""
    n = min(len(s) for s in steps)
    end = min(float(s[-1]) for s in steps)
    if all(len(s) == n for s in steps) or n > max_points:
        xs = np.median(np.stack([s[:n] for s in steps]), axis=0)
        xs = np.minimum(xs, end)
    else:
        xs = np.linspace(max(float(s[0]) for s in steps), end, n)
    if len(xs) > max_points:
        xs = np.linspace(float(xs[0]), float(xs[-1]), max_points)
    return np.unique(xs)


def aligned_curves(curves: list[tuple[np.ndarray, np.ndarray]], max_points: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of seeds' (steps, scores) curves on one grid. Seeds with as many evaluations (≤ max_points) whose
    k-th steps lie closer together than consecutive evaluations (a round ends a little past each interval) are
    aligned by index: point k holds every seed's k-th evaluation, drawn at their median step, so the last point
    is the seeds' final scores, as in the table (interpolating at the earliest final step would draw a score no
    seed had). Other schedules are interpolated onto `aligned_steps`, never extrapolated."""
    n = len(curves[0][0])
    if n <= max_points and all(len(c[0]) == n for c in curves):
        steps = np.stack([c[0] for c in curves])
        xs = np.median(steps, axis=0)
        spread = steps.max(0) - steps.min(0)
        if n == 1 or (spread < np.diff(xs).min()).all():
            return xs, np.stack([c[1] for c in curves])
    xs = aligned_steps([c[0] for c in curves], max_points)
    return xs, np.stack([np.interp(xs, c[0], c[1]) for c in curves])


def plot(rows: list[Row], title: str, path: Path, reps: int, seed: int) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    label = "online env steps"
    drawn = False
    for row in rows:
        curves = [r.curve.get(row.prefix) for r in row.runs]
        if any(c is None or len(c[0]) == 0 for c in curves):
            continue
        label = row.runs[0].x_label
        xs, ys = aligned_curves(curves)
        mid, lo, hi = iqm_curve(ys, reps, seed)
        if len(xs) == 1:  # evaluated only at the end: a point with its interval
            ax.errorbar(xs, mid, yerr=[mid - lo, hi - mid], fmt="o", capsize=5, label=f"{row.label} (n={len(ys)})")
        else:
            line, = ax.plot(xs, mid, marker="o" if len(xs) <= 12 else None, ms=3, label=f"{row.label} (n={len(ys)})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel(label)
    ax.set_ylabel("normalised score (IQM, 95% CI)")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sections(groups: dict[tuple[str, str], list[RunResult]], sweep: dict) -> list[tuple[str, str, dict, list]]:
    """(key, title, experiment spec, [(variant, env_id)]) per table: sweep experiments × env ids when the sweep
    file is there (variants it does not name go to their env id's own section), else one per env id."""
    out, placed = [], set()
    for name, exp in (sweep.get("experiments") or {}).items():
        variants = list((exp.get("variants") or {}).keys())
        for env_id in exp.get("env_ids", []):
            cells = [(v, env_id) for v in variants if (v, env_id) in groups]
            if cells:
                title = exp.get("title", name)
                out.append((f"{name}_{env_id}", f"{title} — `{env_id}`", exp, cells))
                placed.update(cells)
    for env_id in sorted({e for (_, e) in groups}):
        cells = sorted(c for c in groups if c[1] == env_id and c not in placed)
        if cells:
            out.append((env_id, f"`{env_id}`", {}, cells))
    return out


def write_report(results: Path, out: Path, reps: int = 2000, seed: int = 0, command: str | None = None) -> Path:
    runs, sweep = load_runs(results)
    unfinished = [r for r in runs if not r.finished]
    if not any(r.finished for r in runs):
        raise ReportError(f"{results} has {len(runs)} run folder(s) and none of them finished (no summary.json): "
                          f"they are partial runs (stopped, crashed or still running). Finish them first, e.g. by "
                          f"re-issuing the sweep, which resumes them; `python -m common.benchmark <sweep.toml> "
                          f"--results {results} --status` shows where each stands.")
    groups = check_groups(runs)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Results: {results.name}", "",
          f"Generated by `{command or f'python -m common.report {results}'}` from {sum(r.finished for r in runs)} "
          f"finished run(s) in `{results.name}/`" + (f" ({len(unfinished)} unfinished, listed at the end)" if
                                                     unfinished else "") + ".",
          "Final score = `eval/normalized_score_mean` of each run's summary.json; std over seeds with n − 1; IQM = "
          f"mean of the middle 50 % of runs, 95 % CI by stratified bootstrap (rliable, {reps} resamples, percentile)."
          " Best during training = each run's highest evaluation (optimistic). Env steps, updates: per run (a range "
          "when seeds differ). Curves: IQM and 95 % CI at each evaluation, seeds aligned by evaluation index.", ""]
    if sweep.get("title"):
        md[0] = f"# Results: {sweep['title']}"
    if sweep.get("description"):
        md += [str(sweep["description"]).strip(), ""]
    csv_rows = []
    for key, title, exp, cells in sections(groups, sweep):
        rows = []
        for variant, env_id in cells:
            for prefix, suffix in METRIC_SETS:
                row = make_row(variant, env_id, prefix, suffix, groups[(variant, env_id)], reps, seed)
                if row is not None:
                    rows.append(row)
        md += [f"## {title}", ""]
        if exp.get("description"):
            md += [str(exp["description"]).strip(), ""]
        if exp:
            flags = exp.get("flags", "")
            shared = sweep.get("flags", "")
            flags = " ".join(" ".join(f if isinstance(f, str) else " ".join(f) for f in (shared, flags)).split())
            md += ["Flags of every run: `" + flags + "`; variants:", ""]
            md += [f"- `{v}`: `{' '.join(str((exp.get('variants') or {}).get(v, '')).split())}`" for v, _ in cells]
            md += [""]
        md += table(rows) + [""]
        pairs = non_overlapping(rows)
        few = [r for r in rows if len(r.scores) < MIN_SEEDS]
        if len(rows) > 1:
            md += ["Comparisons (rliable probability of improvement, 95 % CI):", ""]
            md += comparisons(rows, exp.get("claims") or sweep.get("claims"), reps, seed) + [""]
        if few and len(rows) > 1:
            md += [f"**Warning: {', '.join(f'`{r.label}`' for r in few)} "
                   f"{'has' if len(few) == 1 else 'have'} fewer than {MIN_SEEDS} seeds "
                   f"({', '.join(str(len(r.scores)) for r in few)}): the intervals are close to the seeds' min-max, "
                   "so no interval separation is reported as a difference.**", ""]
        elif pairs:
            md += ["Non-overlapping 95 % IQM intervals: " + "; ".join(
                f"`{a.label}` > `{b.label}` ({_fmt(a.iqm)} [{_fmt(a.lo)}, {_fmt(a.hi)}], {len(a.scores)} seeds vs "
                f"{_fmt(b.iqm)} [{_fmt(b.lo)}, {_fmt(b.hi)}], {len(b.scores)} seeds)" for a, b in pairs) + ".", ""]
        elif len(rows) > 1 and all(len(r.scores) > 1 for r in rows):
            md += ["All 95 % IQM intervals overlap: no difference is established at this number of seeds.", ""]
        elif len(rows) > 1:
            md += ["Variants with a single seed have no interval and are not compared.", ""]
        png = out / f"curves_{_slug(key)}.png"
        if plot(rows, title.replace("`", ""), png, max(200, reps // 2), seed):
            md += [f"![{title.replace('`', '')}]({png.name})", ""]
    for run in sorted(runs, key=lambda r: (r.env_id, r.variant, r.seed)):
        s = run.summary or {}
        c = s.get("counters", {}) if isinstance(s.get("counters"), dict) else {}
        csv_rows.append({"run_folder": run.folder.name, "script": run.script, "variant": run.variant,
                         "env_id": run.env_id, "seed": run.seed, "finished": run.finished,
                         "normalized_score_mean": s.get(f"eval/{SCORE}", ""),
                         "best_normalized_score": (max(float(np.max(run.curve["eval/"][1])),
                                                       float(s.get(f"eval/{SCORE}", -math.inf)))
                                                   if run.finished and "eval/" in run.curve else ""),
                         "return_mean": s.get(f"eval/{RETURN}", ""),
                         "rf_normalized_score_mean": s.get(f"eval_rf/{SCORE}", ""),
                         "rf_return_mean": s.get(f"eval_rf/{RETURN}", ""), "env_steps": c.get("env_steps", ""),
                         "updates": c.get("updates", ""), "wall_time_s": s.get("wall_time_s", "")})
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    if unfinished:
        md += ["## Unfinished runs (not in the tables)", "",
               "These have no summary.json: stopped (a checkpoint.pt is there; re-issuing the sweep resumes them), "
               "crashed, or still running.", ""]
        md += [f"- `{r.folder.name}`" + (" (checkpoint.pt: resumable)" if (r.folder / "checkpoint.pt").is_file()
                                         else "") for r in unfinished]
        md += [""]
    md += ["Every run's final numbers: [runs.csv](runs.csv).", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results folder (holding runs/) or a folder of run folders")
    p.add_argument("--out", help="where report.md, curves_*.png and runs.csv go (default: the results folder)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (the report is deterministic)")
    args = p.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results
    cmd = "python -m common.report " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_report(results, out, args.reps, args.seed, cmd)
    print(f"wrote {path}, {out / 'runs.csv'} and the curves next to them")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
