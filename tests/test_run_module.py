"""common/run.py as one unit: the plumbing every script calls (exit statuses, run folders, --resume checks, stop
signals, checkpoint files, metric rows, intervals, flag checks). In-process and fast; the scripts' end-to-end use
of it is in test_runs.py and test_chaos.py."""

from __future__ import annotations

import errno
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from common import run
from common.datasets import DatasetError


@dataclass
class Flags:
    env_id: str = "hopper-random-v2"
    exp_name: str = "exp"
    seed: int = 7
    resume: str | None = None
    progress: bool = True
    preset: str = "paper"
    batch_size: int = 256
    n_layers: int = 4
    dropout: float = 0.1
    embed_dim: int | None = None
    n_heads: int = 4
    capture_video: bool = False
    pretrain_updates: int = 10
    track: bool = False


# --- cli: the exit statuses the README and the sweep runner rely on --------------------------------------------
@pytest.mark.parametrize("outcome,status,stream,needle", [
    (run.UserError("bad flag --x"), 2, "err", "error: bad flag --x"),
    (DatasetError("no such dataset"), 2, "err", "error: no such dataset"),
    (run.RunFinished("that run has finished"), 0, "out", "that run has finished"),
    (KeyboardInterrupt(), 130, "err", "nothing was saved after the last checkpoint"),
    ({"stopped": True}, run.EXIT_STOPPED, None, None),
    ({"eval/return_mean": 1.0}, 0, None, None),
])
def test_cli_maps_each_ending_to_its_exit_status(outcome, status, stream, needle, monkeypatch, capsys):
    seen = {}

    def main(args, typed):
        seen.update(args=args, typed=typed)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(sys, "argv", ["script.py", "--seed", "3", "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        run.cli(main, Flags)
    assert exit_.value.code == status and run.EXIT_STOPPED == 3
    assert seen["args"].seed == 3 and seen["args"].progress is False
    assert seen["typed"] == {"seed", "progress"}  # what the user typed, for presets and --cuda
    out, err = capsys.readouterr()
    if needle:
        assert needle in (err if stream == "err" else out) and "Traceback" not in err


# --- run folders and --resume -----------------------------------------------------------------------------------
def test_a_new_run_names_its_folder_without_creating_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, run_dir, checkpoint = run.prepare_run(Flags(env_id="D4RL/door/human-v2"), "odt.py")
    assert checkpoint is None and args.env_id == "D4RL/door/human-v2"
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("D4RL-door-human-v2__exp__7__")
    assert not Path("runs").exists()  # no partial folder before the dataset has loaded
    run.start_run_folder(run_dir, {"script": "odt.py", "args": {"seed": 7}})
    assert json.loads((run_dir / "config.json").read_text())["script"] == "odt.py"
    run.start_run_folder(run_dir, {"script": "other"})  # an existing config (a resume) is never overwritten
    assert json.loads((run_dir / "config.json").read_text())["script"] == "odt.py"


def make_stopped_run(folder: Path, script: str = "odt.py", saved: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"script": script, "args": saved or {"seed": 5, "batch_size": 9,
                                                                                        "unknown_old_flag": 1}}))
    run.save_checkpoint(folder, {"counters": {"updates": 4}})
    (folder / "STOPPED").write_text("stopped")
    return folder


def test_resume_returns_the_saved_flags_and_checkpoint_and_clears_stopped(tmp_path):
    folder = make_stopped_run(tmp_path / "r")
    args, run_dir, checkpoint = run.prepare_run(Flags(resume=str(folder), progress=False, seed=1), "odt.py")
    assert run_dir == folder and checkpoint == {"counters": {"updates": 4}}
    assert args.seed == 5 and args.batch_size == 9  # the run's own flags, not today's command line
    assert args.resume == str(folder) and args.progress is False  # these two come from the command line
    assert not (folder / "STOPPED").exists()


@pytest.mark.parametrize("spoil,error,needle", [
    (lambda f: (f / "config.json").unlink(), run.UserError, "no config.json"),
    (lambda f: (f / "config.json").write_text(json.dumps({"script": "dt_grpo.py", "args": {}})), run.UserError,
     "made by dt_grpo.py"),
    (lambda f: (f / "summary.json").write_text("{}"), run.RunFinished, "has finished"),
    (lambda f: (f / "checkpoint.pt").unlink(), run.UserError, "no checkpoint.pt"),
    (lambda f: (f / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip"), run.UserError, "cannot be read"),
])
def test_resume_refuses_what_it_cannot_continue(spoil, error, needle, tmp_path):
    folder = make_stopped_run(tmp_path / "r")
    spoil(folder)
    with pytest.raises(error, match=needle):
        run.prepare_run(Flags(resume=str(folder)), "odt.py")
    assert (folder / "STOPPED").exists()  # a refused resume leaves the folder as it was


def test_an_unwritable_place_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(run.UserError, match="Cannot write the run folder"):
        run.check_writable(blocker / "runs" / "x", "the run folder")
    run.check_writable(tmp_path / "new" / "deeper", "the run folder")  # a missing folder: its parent decides
    assert not list(tmp_path.glob(".write-test-*")) and not (tmp_path / "new").exists()


def test_mark_stopped_leaves_the_command_that_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "odt.py")])
    (tmp_path / "runs" / "a").mkdir(parents=True)
    run.mark_stopped(Path("runs/a"), {"updates": 12, "env_steps": 345})
    text = (tmp_path / "runs" / "a" / "STOPPED").read_text()
    assert "update 12, env step 345" in text and "python odt.py --resume runs/a" in text
    assert "python odt.py --resume runs/a" in capsys.readouterr().out


# --- checkpoint files --------------------------------------------------------------------------------------------
def test_checkpoint_is_replaced_whole_and_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    run.save_checkpoint(tmp_path, {"step": 1})
    real_save = torch.save

    def full_disk(obj, path):
        real_save(obj, path)  # the bytes land in the staging file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(run.UserError, match="No space left on device.*untouched and loadable"):
        run.save_checkpoint(tmp_path, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "checkpoint.pt") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no staging file left
    run.save_checkpoint(tmp_path, {"step": 3})
    assert torch.load(tmp_path / "checkpoint.pt") == {"step": 3}


def test_a_full_disk_before_any_checkpoint_says_to_start_again(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, path: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(run.UserError, match="no earlier checkpoint"):
        run.save_checkpoint(tmp_path, {"step": 1})
    assert not list(tmp_path.iterdir())


# --- stop signals ------------------------------------------------------------------------------------------------
def test_first_signal_asks_for_a_safe_stop_and_the_second_aborts():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = run.StopFlag()
        assert not stop.requested
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the handler the process would run
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# --- metric rows ---------------------------------------------------------------------------------------------------
def test_resumed_logger_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    logger = run.RunLogger(tmp_path, Flags(), None)
    for step in (1, 2, 2, 3):
        logger.log({"global_step": step})
    logger.close()
    by_step = run.RunLogger(tmp_path, Flags(), {"updates": 2})  # older checkpoints: rows up to their step
    by_step.close()
    assert [json.loads(x)["global_step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]
    by_count = run.RunLogger(tmp_path, Flags(), {"updates": 2, "metrics_rows": 2})  # the checkpoint's row count wins
    assert by_count.rows == 2
    by_count.log({"global_step": 3})
    by_count.close()
    assert [json.loads(x)["global_step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert by_count.rows == 3



def test_logger_carries_the_wall_time_and_row_count_across_a_resume(tmp_path, monkeypatch):
    clock = iter([1000.0, 1030.0, 1030.0, 5000.0, 5012.5])
    monkeypatch.setattr(run.time, "time", lambda: next(clock))
    logger = run.RunLogger(tmp_path, Flags(), None)  # starts at t = 1000
    logger.log({"global_step": 1})
    counters = {"updates": 1}
    logger.stamp(counters)  # t = 1030: what the next checkpoint saves
    assert counters == {"updates": 1, "wall_time_s": 30.0, "metrics_rows": 1}
    logger.close()
    resumed = run.RunLogger(tmp_path, Flags(), counters)  # a new process at t = 1030 ... then 5000
    assert resumed.wall_time() == pytest.approx(30.0 + 5000.0 - 1030.0)  # the stopped time does not count twice
    assert resumed.wall_time() == pytest.approx(30.0 + 5012.5 - 1030.0) and resumed.rows == 1
    resumed.close()


class Meter(run.StatsMeter):
    def __init__(self, stats: dict):
        super().__init__()
        self.stats = stats

    def pop(self) -> dict:
        return dict(self.stats)


def test_a_training_row_holds_the_position_and_the_means_and_a_non_finite_one_is_never_written(tmp_path):
    logger = run.RunLogger(tmp_path, Flags(), None)
    counters = {"updates": 40, "env_steps": 3000, "rounds": 3, "round_updates_left": 7}
    logger.log_stats(counters, Meter({"train/loss": 0.25}), {"phase": "online"})
    with pytest.raises(run.NonFiniteLossError, match=r"\(train/loss\) at update 40"):
        logger.log_stats(counters, Meter({"train/loss": float("nan")}), {"phase": "online"})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"global_step": 40, "env_steps": 3000, "rounds": 3, "train/loss": 0.25, "phase": "online"}]


@dataclass
class Data:
    family: str = "hopper"
    dataset_kind: str = "random"


@dataclass
class Targets:
    env_id: str = "hopper-random-v2"
    learning_rate: float | None = None
    batch_size: int | None = 32  # typed on the command line
    g_eval: float | None = None
    g_online: float | None = None


def test_dataset_defaults_fill_only_unset_flags_say_so_and_a_missing_target_is_one_clear_error(capsys):
    args = Targets()
    filled = run.fill_defaults(args, {"learning_rate": 1e-4, "batch_size": 256, "g_eval": 3600.0, "g_online": 7200.0,
                                      "not_a_flag": 1}, Data(), required=("g_eval", "g_online"))
    assert (args.learning_rate, args.batch_size, args.g_eval, args.g_online) == (1e-4, 32, 3600.0, 7200.0)
    assert filled == {"learning_rate": 1e-4, "g_eval": 3600.0, "g_online": 7200.0}
    assert capsys.readouterr().out.strip() == ("per-dataset defaults (hopper-random): --learning-rate 0.0001, "
                                               "--g-eval 3600, --g-online 7200")
    assert run.fill_defaults(args, {"learning_rate": 1.0}, Data()) == {} and capsys.readouterr().out == ""
    missing = r"'unknown-v0' \(family 'hopper', no reference score\)\. Pass --g-online\."
    with pytest.raises(run.UserError, match=missing):
        run.fill_defaults(Targets(env_id="unknown-v0", g_eval=1.0), {}, Data(), required=("g_eval", "g_online"))
    run.fill_defaults(Targets(), {}, Data())  # nothing required: no error


class Model(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 1)


def test_a_finished_run_writes_its_model_then_summary_and_closes_the_metrics(tmp_path, capsys):
    logger = run.RunLogger(tmp_path, Flags(), None)
    summary = {"eval/return_mean": 12.0, "eval/return_std": 1.5, "eval/normalized_score_mean": 3.25,
               "eval/normalized_score_std": 0.5}
    assert run.finish_run(tmp_path, logger, summary, Model().state_dict()) == summary
    assert logger.file.closed and json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(torch.load(tmp_path / "model.pt")) == {"weight", "bias"}
    assert "final: return 12 ± 1.5, normalized score 3.25 ± 0.5" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    run.finish_run(other, run.RunLogger(other, Flags(), None), {"rows": []}, None, report=False)  # --no-save-model
    assert not (other / "model.pt").exists() and (other / "summary.json").exists() and capsys.readouterr().out == ""

def test_interval_fires_once_per_multiple_passed_counted_from_the_resume_point():
    every_10 = run.Interval(10, start=0)
    assert [n for n in (3, 9, 10, 12, 19, 25, 31, 40, 40) if every_10.due(n)] == [10, 25, 31, 40]
    resumed = run.Interval(10, start=23)  # a run resumed at 23 already evaluated at 20
    assert [n for n in (25, 29, 30, 33) if resumed.due(n)] == [30]


def test_non_finite_statistics_stop_with_what_to_do(tmp_path):
    run.check_finite({"loss": 1.0}, {"updates": 5}, tmp_path)
    with pytest.raises(run.NonFiniteLossError, match=r"\(loss, q\) at update 5.*no checkpoint had been written"):
        run.check_finite({"loss": float("inf"), "q": float("nan"), "ok": 0.0}, {"updates": 5}, tmp_path)
    run.save_checkpoint(tmp_path, {})
    with pytest.raises(run.NonFiniteLossError, match="last good checkpoint .* was kept"):
        run.check_finite({"loss": float("nan")}, {"updates": 6}, tmp_path)
    assert issubclass(run.NonFiniteLossError, run.UserError)  # so cli ends it with exit 2 and one paragraph


# --- flag checks ---------------------------------------------------------------------------------------------------
def test_validate_args_names_every_flag_below_its_minimum_at_once():
    run.validate_args(Flags(batch_size=1, n_layers=1), {"batch_size": 1, "n_layers": 1})
    with pytest.raises(run.UserError) as err:
        run.validate_args(Flags(batch_size=0, n_layers=-1), {"batch_size": 1, "n_layers": 1, "embed_dim": 1})
    assert "--batch-size must be ≥ 1 (got 0)" in str(err.value) and "--n-layers must be ≥ 1 (got -1)" in str(err.value)
    with pytest.raises(run.UserError, match="--dropout must be in"):
        run.validate_args(Flags(dropout=1.0), {})
    with pytest.raises(run.UserError, match="divisible by --n-heads"):
        run.validate_args(Flags(embed_dim=30, n_heads=4), {})


def test_preset_fills_only_what_was_not_typed_and_says_what_it_set(capsys):
    presets = {"cpu": {"batch_size": 64, "n_layers": 2}}
    args = run.apply_preset(Flags(preset="cpu", batch_size=256), {"batch_size", "preset"}, presets)
    assert (args.batch_size, args.n_layers) == (256, 2)
    assert "--n-layers 2" in capsys.readouterr().out
    from_python = run.apply_preset(Flags(preset="cpu", batch_size=100), None, presets)  # non-defaults count as set
    assert (from_python.batch_size, from_python.n_layers) == (100, 2)
    assert run.apply_preset(Flags(), None, presets) == Flags()  # "paper": nothing changes


def test_cost_estimate_scales_with_the_budget_and_points_to_the_cpu_preset(capsys):
    run.print_cost_estimate(0.5, Flags(pretrain_updates=7200), online_updates=36000)
    text = capsys.readouterr().out
    assert "pretraining 7200 updates ≈ 1 h" in text and "36000 updates ≈ 5 h" in text and "--preset cpu" in text
    run.print_cost_estimate(0.5, Flags(pretrain_updates=3600), online_updates=0)
    text = capsys.readouterr().out
    assert "≈ 30 min" in text and "finetuning" not in text and "--preset cpu" not in text


def test_a_progress_bar_advances_to_a_position_and_shows_the_latest_return(capsys):
    with run.progress_bar("finetuning", 10, 100, "step", True) as bar:  # resumed at 10
        run.advance(bar, 40, ret="12.5")
        run.advance(bar, 95, ret="30")
        assert (bar.n, bar.postfix) == (95, "ret=30")
    assert "ret=30" in capsys.readouterr().err
