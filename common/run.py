"""Run plumbing shared by the four scripts: nothing here can change a learned number.

The run folder (`prepare_run`, `start_run_folder`, `mark_stopped`), checkpoint file I/O (`save_checkpoint`,
`atomic_save`, `write_atomic`), stop signals and exit statuses (`StopFlag`, `cli`), metric sinks (`RunLogger`,
`StatsMeter`, `Interval`), flag checks and their messages (`validate_args`, `apply_preset`, `typed_fields`), the
device (`pick_device`, `resolve_precision`), the cost estimate and video. Plain functions and small classes the
scripts call: the training loop, the model, the losses, the RNG streams and the list of state a checkpoint holds
stay in each script.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A problem the user can fix; printed as one paragraph without a traceback."""


class NonFiniteLossError(UserError):
    pass


class RunFinished(Exception):
    """--resume of a run that has already finished: nothing to do."""


EXIT_STOPPED = 3  # exit status of a run stopped by Ctrl-C / SIGTERM after checkpointing (resumable)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" → bf16 autocast where the hardware runs bfloat16 natively (CUDA with bf16, CPUs with
    AVX512-BF16/AMX), else fp32. Weights, optimiser state and losses stay fp32 in both cases."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def apply_preset(args, typed: set[str] | None, presets: dict[str, dict]):
    """--preset NAME: the script's `presets[NAME]` (e.g. the CPU-scale protocol) for every field the command line
    did not set (`typed`, from typed_fields); called from Python (typed=None), for every field at its default."""
    if args.preset == "paper":
        return args
    if typed is None:
        typed = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}
    changed = {k: v for k, v in presets[args.preset].items() if k not in typed}
    for key, value in changed.items():
        setattr(args, key, value)
    print(f"--preset {args.preset}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()))
    return args


def check_writable(folder: Path, what: str) -> None:
    """Fail before any work if `folder` (or the nearest existing parent, where it would be created) is not
    writable: a probe file is created and removed, which also catches read-only file systems."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"Cannot write {what} to {folder.absolute()} ({exc}). Run from a writable directory "
                        f"or make {existing} writable.") from None


def check_video_support() -> None:
    """--capture-video needs imageio and imageio-ffmpeg: checked before any work, not after training."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--capture-video needs imageio and imageio-ffmpeg ({exc}). Install them with "
                        "pip install -e '.[video]', or run without --capture-video.") from None
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless: MuJoCo renders off-screen through EGL


def validate_args(args, valid_min: dict[str, float]) -> None:
    """Budgets and sizes (`valid_min`: the smallest valid value of each numeric flag), checked before the
    dataset is loaded."""
    at_least = {name: low for name, low in valid_min.items() if getattr(args, name, None) is not None
                and getattr(args, name) < low}
    if at_least:
        raise UserError("Invalid flags: " + "; ".join(f"--{k.replace('_', '-')} must be ≥ {v} (got {getattr(args, k)})"
                                                     for k, v in at_least.items()) + ".")
    if not 0 <= args.dropout < 1:
        raise UserError(f"Invalid flags: --dropout must be in [0, 1) (got {args.dropout}).")
    if args.embed_dim is not None and args.embed_dim % args.n_heads:
        raise UserError(f"Invalid flags: --embed-dim ({args.embed_dim}) must be divisible by --n-heads "
                        f"({args.n_heads}).")
    if args.capture_video:
        check_video_support()


class RunLogger:
    """Appends one JSON object per log step to metrics.jsonl (mirrored to W&B with --track) and keeps the run's
    wall time. `resumed`: the loop's position (`counters`) in the checkpoint a resumed run continues from."""

    def __init__(self, run_dir: Path, args, resumed: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.rows = 0  # rows in the file; the checkpoint records it, so a resume keeps exactly the rows before it
        resumed = resumed or {}
        self.start_time = time.time() - resumed.get("wall_time_s", 0.0)  # wall time accumulates over resumes
        resume_step, resume_rows = resumed.get("updates"), resumed.get("metrics_rows")
        if resume_step is not None and self.path.exists():  # drop rows written after the checkpoint
            lines = [line for line in self.path.read_text().splitlines() if line]
            rows = (lines[:resume_rows] if resume_rows is not None  # a row logged after a checkpoint at its step too
                    else [line for line in lines if json.loads(line)["global_step"] <= resume_step])
            write_atomic(self.path, "".join(r + "\n" for r in rows))  # a kill mid-rewrite must not lose rows
            self.rows = len(rows)
        self.file = self.path.open("a")
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                                    name=run_dir.name, id=run_dir.name.replace("/", "_"), resume="allow",
                                    dir=str(run_dir))

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows += 1
        if self.wandb is not None:
            self.wandb.log(row, step=row["global_step"])

    def wall_time(self) -> float:
        return time.time() - self.start_time

    def stamp(self, counters: dict) -> None:
        """Record in `counters` (saved by the next checkpoint) what a resume continues from: the wall time so far
        and the number of rows in metrics.jsonl."""
        counters.update(wall_time_s=self.wall_time(), metrics_rows=self.rows)

    def log_stats(self, counters: dict, meter: StatsMeter, extra: dict) -> None:
        """A training row: the loop's position (`counters`), the mean statistics `meter` gathered since the last row,
        and `extra`. A non-finite statistic stops the run (check_finite) before the row is written."""
        stats = meter.pop()
        check_finite(stats, counters, self.path.parent)
        self.log({"global_step": counters["updates"], "env_steps": counters["env_steps"], "rounds": counters["rounds"],
                  **stats, **extra})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def prepare_run(args, script: str) -> tuple[object, Path, dict | None]:
    """Name a fresh run folder, or validate --resume (a folder `script` made) and load its config and checkpoint;
    on --resume the returned args are the run's saved ones."""
    if args.resume is None:  # the folder itself is made once the dataset has loaded (start_run_folder)
        run_dir = Path("runs") / f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        check_writable(run_dir, "the run folder")
        return args, run_dir, None
    run_dir = Path(args.resume)
    config_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoint.pt"
    if not config_path.is_file():
        raise UserError(f"--resume {run_dir}: no config.json there. Pass a run folder created by {script} "
                        f"(runs/<env>__<exp>__<seed>__<time>/).")
    config = json.loads(config_path.read_text())
    if config.get("script") != script:
        raise UserError(f"--resume {run_dir}: that run was made by {config.get('script', 'another script')}, "
                        f"not {script}. Resume it with that script.")
    if (run_dir / "summary.json").is_file():
        raise RunFinished(f"--resume {run_dir}: that run has finished (summary.json is there); nothing to do. "
                          f"Start a new run to train again.")
    check_writable(run_dir, "checkpoints and metrics")
    if not ckpt_path.is_file():
        raise UserError(f"--resume {run_dir}: no checkpoint.pt (the run stopped before its first checkpoint, "
                        f"or was started with --no-save-model). Start a new run instead.")
    fields = {f.name for f in dataclasses.fields(args)}
    saved = type(args)(**{k: v for k, v in config["args"].items() if k in fields})
    saved.resume, saved.progress = args.resume, args.progress
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or corrupt file
        raise UserError(f"--resume {run_dir}: checkpoint.pt cannot be read ({exc}). Start a new run.") from exc
    (run_dir / "STOPPED").unlink(missing_ok=True)  # only once the resume goes ahead
    at = checkpoint.get("counters", {}) if isinstance(checkpoint, dict) else {}
    print(f"Resuming from {ckpt_path} at update {at.get('updates', 0)}, env step {at.get('env_steps', 0)}")
    return saved, run_dir, checkpoint


def start_run_folder(run_dir: Path, config: dict) -> None:
    """Create a new run's folder and write config.json (after the dataset and defaults are resolved)."""
    if not (run_dir / "config.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))


def mark_stopped(run_dir: Path, counters: dict) -> None:
    """A stopped run's folder says so: STOPPED holds the command that continues it (removed on resume)."""
    command = resume_command(sys.argv[0], run_dir)
    (run_dir / "STOPPED").write_text(f"stopped at update {counters['updates']}, env step {counters['env_steps']}; "
                                     f"continue with:\n  {command}\n")
    print(f"Stopped at update {counters['updates']}, env step {counters['env_steps']}. Continue with:\n  {command}")


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Atomic (staging file + rename): a crash or a full disk never leaves a half-written checkpoint."""
    try:
        atomic_save(state, run_dir / "checkpoint.pt")
    except OSError as exc:  # e.g. ENOSPC: stop with one message, the last checkpoint still resumes
        raise UserError(checkpoint_write_failure(run_dir, exc, sys.argv[0])) from None


def rng_state(rng: np.random.Generator) -> dict:
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop at the next safe point and checkpoint there."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping at the next safe point (Ctrl-C again to abort without saving)...", file=sys.stderr)


class StatsMeter:
    """Sums each update's training statistics on the device (no host sync per update) until a metrics row
    takes their mean; part of the checkpoint, so a row spanning a stop/resume averages the same updates."""

    def __init__(self):
        self.keys: list[str] = []
        self.sum: torch.Tensor | None = None
        self.n, self.seconds = 0, 0.0

    def add(self, stats: dict[str, torch.Tensor], seconds: float) -> None:
        self.keys = list(stats)
        vec = torch.stack([stats[k].float() for k in self.keys])
        self.sum = vec if self.sum is None else self.sum + vec
        self.n, self.seconds = self.n + 1, self.seconds + seconds

    def updates_per_second(self) -> float:
        return self.n / max(self.seconds, 1e-9)

    def pop(self) -> dict[str, float]:
        means = dict(zip(self.keys, (self.sum / self.n).tolist(), strict=True)) if self.n else {}
        self.sum, self.n, self.seconds = None, 0, 0.0
        return means

    def state_dict(self) -> dict:
        return {"keys": self.keys, "sum": self.sum, "n": self.n, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.sum, self.n, self.seconds = state["keys"], state["sum"], state["n"], state["seconds"]


def print_cost_estimate(seconds_per_update: float, args, online_updates: float) -> None:
    """What the whole run costs on this device at this size, from the time of the first few updates."""
    hours = lambda n: f"{n * seconds_per_update / 3600:.3g} h" if n * seconds_per_update >= 3600 else \
        f"{n * seconds_per_update / 60:.3g} min"
    text = f"cost estimate: {seconds_per_update:.3g} s per update; pretraining {args.pretrain_updates} updates ≈ " \
           f"{hours(args.pretrain_updates)}"
    if online_updates:
        text += f", finetuning ≥ {online_updates:.0f} updates ≈ {hours(online_updates)} (more if episodes end early)"
    if (args.pretrain_updates + online_updates) * seconds_per_update > 4 * 3600 and args.preset == "paper":
        text += ". For a CPU-scale run add --preset cpu (values in PRESETS, printed when used)"
    print(text + ".")


def check_finite(stats: dict[str, float], counters: dict, run_dir: Path) -> None:
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        kept = (f"the last good checkpoint in {run_dir} was kept (it was saved before this happened); lower "
                f"--learning-rate or --grad-clip and continue with --resume {run_dir}, or start a new run"
                if (run_dir / "checkpoint.pt").exists() else "no checkpoint had been written yet; start a new run "
                "with a lower --learning-rate or --grad-clip")
        raise NonFiniteLossError(f"Non-finite values ({', '.join(bad)}) at update {counters['updates']}. "
                                 f"Training stopped: {kept}.")


class Interval:
    """`due(n)` is True once each time the counter n passes a multiple of `every` (counted from `start`)."""

    def __init__(self, every: int, start: int):
        self.every, self.last = every, start // every

    def due(self, n: int) -> bool:
        if n // self.every <= self.last:
            return False
        self.last = n // self.every
        return True


def record_video(make_env, agent, seed: int, path: Path) -> None:
    """--capture-video: one deterministic evaluation episode as an mp4. Headless MuJoCo renders through EGL
    (check_video_support); a rendering failure only warns, the trained model is saved already."""
    try:
        import imageio.v2 as imageio

        env = make_env(render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        agent.reset(obs[None].astype(np.float32))
        frames, done = [env.render()], False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs[None].astype(np.float32))[0])
            agent.observe(np.array([reward], dtype=np.float32))
            frames.append(env.render())
            done = terminated or truncated
        imageio.mimsave(path, frames, fps=30)
        print(f"video of one evaluation episode ({len(frames)} frames): {path}")
    except Exception as exc:  # e.g. no GL backend: MUJOCO_GL=egl needs libEGL, MUJOCO_GL=osmesa libOSMesa
        print(f"warning: --capture-video failed ({exc}); try MUJOCO_GL=egl or MUJOCO_GL=osmesa", file=sys.stderr)



def typed_fields(argv: list[str], cls) -> set[str]:
    """The fields of dataclass `cls` that a command line sets explicitly (`--name v`, `--name=v`, `--no-name`).

    A preset fills only the other fields: a flag the user typed wins even when its value equals the default."""
    names = {f.name for f in dataclasses.fields(cls)}
    typed = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in names:
            typed.add(name)
        elif name.startswith("no_") and name[3:] in names:
            typed.add(name[3:])
    return typed


def pick_device(cuda: bool, precision: str, typed: set[str] | None) -> tuple[torch.device, str]:
    """The CUDA GPU when there is one and --cuda (the default) asks for it, else the CPU, and the precision used on
    it (resolve_precision). A --cuda typed on a machine without a GPU is told so instead of silently running on
    the CPU."""
    if cuda and torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        if cuda and typed and "cuda" in typed:
            print("--cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); running on the CPU")
    return device, resolve_precision(precision, device)


def resume_command(script: str, run_dir: Path) -> str:
    """The command that continues a stopped run, runnable from the folder the user started it in: the script's
    path as seen from there (not assuming the repository root) and the run folder as it was given."""
    return f"python {shlex.quote(os.path.relpath(Path(script).resolve()))} --resume {shlex.quote(str(run_dir))}"


def atomic_save(state: dict, path: Path) -> None:
    """torch.save to `path` through a staging file and an atomic rename: a crash or a full disk mid-write never
    leaves a half-written file at `path`, and a failed write removes its staging file before re-raising."""
    staging = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def checkpoint_write_failure(run_dir: Path, exc: OSError, script: str) -> str:
    """The one paragraph a failed checkpoint write ends with (ENOSPC and friends)."""
    previous = run_dir / "checkpoint.pt"
    kept = (f"The previous checkpoint {previous} is untouched and loadable: free space, then continue with "
            f"`{resume_command(script, run_dir)}`" if previous.is_file() else
            "There was no earlier checkpoint: free space and start the run again")
    return f"Could not write the checkpoint to {run_dir} ({exc.strerror or exc}). Training stopped. {kept}."


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a staging file and an atomic rename: a kill mid-write leaves the old file (or
    none), never a half-written one that a sweep would take for a finished run's summary."""
    staging = path.with_name(path.name + ".tmp")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def cli(main, args_cls) -> None:
    """The scripts' entry point: parse the flags into `args_cls` (tyro), run `main(args, typed)` and exit with the
    documented status: 0 finished (or --resume of a finished run), 2 a problem the user can fix (one paragraph,
    no traceback), 3 stopped by Ctrl-C / SIGTERM after checkpointing (resumable), 130 aborted by a second Ctrl-C."""
    import tyro

    from common.datasets import DatasetError

    try:
        result = main(tyro.cli(args_cls), typed=typed_fields(sys.argv[1:], args_cls))
    except (UserError, DatasetError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFinished as done:
        print(done)
        sys.exit(0)
    except KeyboardInterrupt:
        print("\nInterrupted: nothing was saved after the last checkpoint.", file=sys.stderr)
        sys.exit(130)
    sys.exit(EXIT_STOPPED if result.get("stopped") else 0)


# Progress bars, and the end of a stopped or finished run.
def progress_bar(desc: str, done: int, total: int, unit: str, enabled: bool):
    """A tqdm bar over `total` that starts at `done` (a resumed run), or a silent one (--no-progress)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=min(done, total), desc=desc, disable=not enabled, unit=unit, dynamic_ncols=True)


def advance(bar, to: int, **postfix) -> None:
    """Move a progress bar to position `to` and show `postfix` beside it (e.g. the latest rollout's return)."""
    bar.set_postfix(postfix, refresh=False)
    bar.update(to - bar.n)


def stop_run(run_dir: Path, logger: RunLogger, counters: dict) -> dict:
    """After the stop's checkpoint: close the metrics file and leave STOPPED with the command that continues."""
    logger.close()
    mark_stopped(run_dir, counters)
    return {"stopped": True, "run_dir": str(run_dir)}


def finish_run(run_dir: Path, logger: RunLogger, summary: dict, model_state: dict | None = None,
               video: tuple | None = None, report: bool = True) -> dict:
    """A finished run's files: model.pt (`model_state`; None: --no-save-model), the --capture-video episode
    (`video` = (make_env, agent, seed)), then summary.json, which marks the run finished (--resume refuses it, a
    sweep skips it); closes the metrics file and, with `report`, prints the final evaluation."""
    if model_state is not None:
        atomic_save(model_state, run_dir / "model.pt")
    if video is not None:
        record_video(*video, path=run_dir / "eval.mp4")
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    logger.close()
    if report:
        print(f"final: return {summary['eval/return_mean']:.3g} ± {summary['eval/return_std']:.3g}, normalized "
              f"score {summary['eval/normalized_score_mean']:.3g} ± {summary['eval/normalized_score_std']:.3g} → "
              f"{run_dir}")
    return summary


# A trained run read back (--eval-only), and a finished run's files when there is more than one network.
def read_finished_run(run: Path, script: str, fields: tuple[str, ...], args) -> Path:
    """--eval-only RUN: check that RUN is a finished run folder of `script` (config.json and model.pt), copy the
    `fields` its model needs (the network's shape and input convention) from its config into `args` (every other
    flag stays the command line's) and return the path of its model.pt."""
    model_path, config_path = run / "model.pt", run / "config.json"
    if not config_path.is_file() or not model_path.is_file():
        raise UserError(f"--eval-only {run}: expected a finished run folder of {script} with config.json and "
                        f"model.pt (runs/<env>__<exp>__<seed>__<time>/).")
    config = json.loads(config_path.read_text())
    if config.get("script") != script:
        raise UserError(f"--eval-only {run}: that run was made by {config.get('script', 'another script')}.")
    for key in fields:
        setattr(args, key, config["args"][key])
    return model_path


def load_states(path: Path, modules: dict, device: torch.device, context: str) -> None:
    """Load each module of `modules` ({key in the file: module}) from the torch file at `path`; a wrong file, or
    networks of another shape, stop with one message."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        for key, module in modules.items():
            module.load_state_dict(state[key])
    except Exception as exc:  # wrong file, or a model of another shape
        raise UserError(f"{context}: {path} does not hold this script's networks ({exc}).") from exc


def open_run_folder(run_dir: Path, script: str, args, data, device: torch.device) -> None:
    """A new run's folder and config.json (the flags as resolved, the dataset, the device), and the line that
    announces the run (a resumed run keeps its folder and config)."""
    start_run_folder(run_dir, {"script": script, "args": dataclasses.asdict(args), "dataset": data.source,
                               "obs_dim": data.obs_dim, "act_dim": data.act_dim, "device": str(device)})
    print(f"{script}: {args.env_id} ({data.source}), {len(data.episodes)} trajectories, device {device} "
          f"({args.precision}), run folder {run_dir}")


def fill_defaults(args, table: dict, data, required: tuple[str, ...] = ()) -> dict:
    """Set every field of `args` left at None (not given on the command line) to its value in the script's
    per-dataset `table`, print what was filled as the flags that would set it, and stop with one message when a
    `required` target return has no value; returns what was filled (nothing on --resume: config.json holds all)."""
    filled = {k: v for k, v in table.items() if hasattr(args, k) and getattr(args, k) is None}
    for key, value in filled.items():
        setattr(args, key, value)
    if filled:
        print(f"per-dataset defaults ({data.family}-{data.dataset_kind}): " + ", ".join(
            f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
            for k, v in filled.items()))
    missing = [key for key in required if getattr(args, key) is None]
    if missing:
        raise UserError(f"No default target return is known for '{args.env_id}' (family '{data.family}', no "
                        f"reference score). Pass {' and '.join('--' + m.replace('_', '-') for m in missing)}.")
    return filled
