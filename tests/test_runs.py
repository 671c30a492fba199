"""Run-folder behaviour shared by the four scripts, through their CLIs: bad input ends before any work with one
message and no run folder; a stop request checkpoints within one update wherever the run is, exits 3 and marks
the folder; the resumed run is identical to one that was never stopped; a finished run is never re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_HOPPER, TINY_MODEL, assert_clear_error, only_run_dir, read_metrics, run_script

SCRIPTS = ["odt.py", "odt_td3.py", "dt_grpo.py", "reinformer_ag.py"]
TOY_TINY = ["--embed-dim", "16", "--n-layers", "1", "--n-heads", "1", "--batch-size", "16", "--warmup-steps", "10",
            "--eval-episodes", "2", "--no-progress", "--learning-rate", "1e-3"]
# Online scripts: a toy run with rounds of 1 env step and 25 updates, so a stop lands inside a round.
ONLINE_TOY = ["--env-id", "toy-vitamin-v0", *TOY_TINY, "--pretrain-updates", "20", "--online-steps", "12",
              "--updates-per-round", "25", "--eval-interval", "6", "--checkpoint-interval", "100000"]
TIMING = ("charts/updates_per_second", "charts/SPS")


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# --- bad input: one paragraph, exit 2, nothing left behind ---------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags,needle", [
    (["--pretrain-updates", "-1"], "--pretrain-updates must be ≥ 0"),
    (["--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--context-len", "0"], "--context-len must be ≥ 1"),
    (["--embed-dim", "30", "--n-heads", "4"], "divisible by --n-heads"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
])
def test_bad_flags_fail_before_any_work(script, flags, needle, tmp_path, data_env):
    t0 = time.time()
    result = run_script(script, "--env-id", "toy-vitamin-v0", *flags, cwd=tmp_path, env=data_env, check=False)
    assert_clear_error(result, needle)
    assert not (tmp_path / "runs").exists()  # no run folder for a failed start
    assert time.time() - t0 < 30


@pytest.mark.parametrize("script", ["odt.py", "odt_td3.py", "dt_grpo.py"])
def test_negative_online_budget_is_refused(script, tmp_path, data_env):
    result = run_script(script, "--env-id", "toy-vitamin-v0", "--online-steps", "-5", cwd=tmp_path, env=data_env,
                        check=False)
    assert_clear_error(result, "--online-steps must be ≥ 0")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_dataset_leaves_no_run_folder(script, tmp_path, data_env):
    result = run_script(script, "--env-id", "hoper-medium-v2", cwd=tmp_path, env=data_env, check=False)
    assert_clear_error(result, "hopper-medium-v2")  # the closest name is suggested
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unwritable_working_directory_fails_before_loading(tmp_path, data_env):
    """A read-only file system (a real read-only tmpfs mount) as the working directory."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "none", str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = run_script("odt.py", "--env-id", "toy-vitamin-v0", cwd=ro, env=data_env, check=False)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert_clear_error(result, "Cannot write the run folder")
    assert "Read-only file system" in result.stderr


# --- stop, resume, finish ----------------------------------------------------------------------------
def interrupt_when(script: str, args: list[str], cwd: Path, env: dict, ready, sig=signal.SIGTERM) -> tuple:
    """Start the script, send `sig` once `ready(rows)` holds for its metrics rows; return (rc, seconds from
    the signal to the exit, stdout)."""
    proc = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while True:
        runs = list((cwd / "runs").glob("*/metrics.jsonl")) if (cwd / "runs").exists() else []
        if runs and ready(read_metrics(runs[0].parent)):
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{script} never reached the point to interrupt:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, time.time() - t0, out + err


@pytest.mark.slow
@pytest.mark.parametrize("script", ["odt.py", "odt_td3.py", "dt_grpo.py"])
def test_stop_inside_a_round_resumes_exactly(script, tmp_path, data_env):
    """SIGTERM in the online phase: checkpoint within seconds, exit 3, STOPPED in the folder; the resumed run's
    metrics equal those of a run that was never stopped (wall-clock columns aside)."""
    # dt_grpo's toy round is 4 groups × 16 members: a longer budget gives it several rounds
    args = [*ONLINE_TOY, "--online-steps", "400", "--eval-interval", "130"] if script == "dt_grpo.py" else ONLINE_TOY
    (tmp_path / "a").mkdir()
    fresh = run_script(script, *args, cwd=tmp_path / "a", env=data_env)
    assert "per-dataset defaults (toy-" in fresh.stdout
    reference = without_timing(read_metrics(only_run_dir(tmp_path / "a")))

    (tmp_path / "b").mkdir()
    online_started = lambda rows: any(r.get("phase") == "online" for r in rows)
    rc, seconds, out = interrupt_when(script, args, tmp_path / "b", data_env, online_started)
    assert rc == 3, out
    assert seconds < 10, seconds  # Slurm's KillWait is 30 s
    run_dir = only_run_dir(tmp_path / "b")
    assert (run_dir / "STOPPED").exists() and not (run_dir / "summary.json").exists()
    assert f"--resume runs/{run_dir.name}" in (run_dir / "STOPPED").read_text()
    resumed = run_script(script, "--resume", str(run_dir), "--no-progress", cwd=tmp_path / "b", env=data_env)
    assert "per-dataset defaults" not in resumed.stdout  # every value comes from the run's config.json
    assert not (run_dir / "STOPPED").exists() and (run_dir / "summary.json").exists()
    assert without_timing(read_metrics(run_dir)) == reference


@pytest.mark.slow
def test_dt_grpo_stopped_in_pretraining_anchors_the_kl_to_the_pretrained_policy(tmp_path, data_env):
    """--kl-coef > 0 anchors GRPO to the frozen pretrained policy: a run stopped during pretraining must resume
    to the same metrics as one never stopped (the anchor must not be the half-pretrained model)."""
    args = [*ONLINE_TOY, "--pretrain-updates", "300", "--online-steps", "100", "--eval-interval", "100",
            "--kl-coef", "1.0"]
    (tmp_path / "a").mkdir()
    run_script("dt_grpo.py", *args, cwd=tmp_path / "a", env=data_env)
    reference = without_timing(read_metrics(only_run_dir(tmp_path / "a")))
    (tmp_path / "b").mkdir()
    pretraining = lambda rows: any(r.get("phase") == "pretrain" for r in rows)
    rc, _, out = interrupt_when("dt_grpo.py", args, tmp_path / "b", data_env, pretraining)
    assert rc == 3, out
    run_dir = only_run_dir(tmp_path / "b")
    rows = read_metrics(run_dir)
    assert max(r["global_step"] for r in rows) < 300, "the stop did not land in pretraining"
    run_script("dt_grpo.py", "--resume", str(run_dir), "--no-progress", cwd=tmp_path / "b", env=data_env)
    assert without_timing(read_metrics(run_dir)) == reference


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing(tmp_path, data_env):
    run_script("reinformer_ag.py", "--env-id", "toy-ag-v0", *TOY_TINY, "--pretrain-updates", "5", "--eval-interval",
               "5", "--ag-steps", "1", cwd=tmp_path, env=data_env)
    run_dir = only_run_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = run_script("reinformer_ag.py", "--resume", str(run_dir), cwd=tmp_path, env=data_env)
    assert "has finished" in result.stdout
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.slow
def test_first_metric_row_after_one_update_with_a_cost_estimate(tmp_path, data_env):
    result = run_script("odt.py", "--env-id", "toy-vitamin-v0", *TOY_TINY, "--pretrain-updates", "5",
                        "--online-steps", "0", cwd=tmp_path, env=data_env)
    rows = read_metrics(only_run_dir(tmp_path))
    assert rows[0]["global_step"] == 1 and "train/nll" in rows[0]
    assert "cost estimate:" in result.stdout


@pytest.mark.slow
def test_preset_cpu_prints_and_applies_its_values_and_flags_win(tmp_path, data_env):
    result = run_script("odt.py", "--env-id", "toy-vitamin-v0", "--preset", "cpu", "--embed-dim", "16",
                        "--pretrain-updates", "2", "--online-steps", "0", "--eval-episodes", "1", "--no-progress",
                        cwd=tmp_path, env=data_env)
    config = json.loads((only_run_dir(tmp_path) / "config.json").read_text())["args"]
    assert "--preset cpu:" in result.stdout and "--n-layers 3" in result.stdout
    assert config["n_layers"] == 3 and config["batch_size"] == 64  # from the preset
    assert config["embed_dim"] == 16 and config["pretrain_updates"] == 2  # explicit flags win


@pytest.mark.parametrize("script", SCRIPTS)
def test_typed_flags_win_over_the_preset_even_at_their_default_value(script):
    """`--preset cpu` fills only the flags the user did not type: `--n-layers 4` (the paper default) and
    `--eval-interval 10000` stay, the untyped fields take the preset's values (README: explicit flags win)."""
    import importlib

    import tyro

    from common.run import typed_fields

    module = importlib.import_module(script.removesuffix(".py"))
    argv = ["--env-id", "hopper-random-v2", "--preset", "cpu", "--n-layers", "4", "--eval-interval", "10000",
            "--batch-size=256"]
    defaults = module.Args()
    assert defaults.n_layers == 4 and module.PRESETS["cpu"]["n_layers"] != 4  # the case the old rule lost
    args = module.run.apply_preset(tyro.cli(module.Args, args=argv), typed_fields(argv, module.Args), module.PRESETS)
    assert (args.n_layers, args.eval_interval, args.batch_size) == (4, 10000, 256)
    untyped = {k: v for k, v in module.PRESETS["cpu"].items() if k not in ("n_layers", "eval_interval", "batch_size")}
    assert untyped and all(getattr(args, k) == v for k, v in untyped.items())
    # From Python (no command line), a field away from its default counts as set.
    args = module.run.apply_preset(module.Args(env_id="hopper-random-v2", preset="cpu", batch_size=7), None,
                                   module.PRESETS)
    assert args.batch_size == 7 and args.n_layers == module.PRESETS["cpu"]["n_layers"]


def test_typed_fields_reads_every_flag_spelling():
    import odt_td3
    from common.run import typed_fields

    argv = ["--env-id", "x", "--no-progress", "--eval_interval=5", "--n-layers", "4", "positional", "--not-a-field"]
    assert typed_fields(argv, odt_td3.Args) == {"env_id", "progress", "eval_interval", "n_layers"}


def test_resume_command_runs_from_the_folder_the_user_is_in(tmp_path, monkeypatch):
    """The printed resume command names the script as seen from the current folder, not the repository root."""
    import shlex

    from common.run import resume_command

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    words = shlex.split(resume_command(str(REPO / "odt_td3.py"), Path("runs/a b")))
    assert words[0] == "python" and words[2:] == ["--resume", "runs/a b"]
    assert (Path.cwd() / words[1]).resolve() == REPO / "odt_td3.py"
    monkeypatch.chdir(REPO)
    assert shlex.split(resume_command("odt_td3.py", Path("runs/x")))[1] == "odt_td3.py"


def test_typed_cuda_without_a_gpu_says_it_runs_on_the_cpu(capsys):
    import torch

    from common.run import pick_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert pick_device(True, "fp32", {"cuda"}) == (torch.device("cpu"), "fp32")
    assert "running on the CPU" in capsys.readouterr().out
    assert pick_device(True, "bf16", set())[0].type == "cpu" and capsys.readouterr().out == ""  # the default: silent


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_write_failing_for_lack_of_space_keeps_the_previous_one(script, tmp_path, monkeypatch):
    """ENOSPC during a checkpoint write (simulated: torch.save writes half the bytes, then the disk is full) ends
    with one message that says the previous checkpoint is intact; that checkpoint still loads, no staging file."""
    import errno
    import importlib

    import torch

    module = importlib.import_module(script.removesuffix(".py"))
    module.run.save_checkpoint(tmp_path, {"updates": 7, "w": torch.arange(1000.0)})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(module.run.UserError) as err:
        module.run.save_checkpoint(tmp_path, {"updates": 9, "w": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    message = str(err.value)
    assert "No space left on device" in message and "untouched and loadable" in message and "--resume" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    kept = torch.load(tmp_path / "checkpoint.pt")
    assert kept["updates"] == 7 and torch.equal(kept["w"], torch.arange(1000.0))


# --- --capture-video ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_capture_video_writes_the_evaluation_episode(script, tmp_path, tiny_hopper):
    """The final evaluation episode is encoded as eval.mp4 (headless: MuJoCo renders through EGL)."""
    imageio = pytest.importorskip("imageio.v2")
    egl = subprocess.run([sys.executable, "-c", "import mujoco; mujoco.GLContext(8, 8).make_current()"],
                         env={**os.environ, "MUJOCO_GL": "egl"}, capture_output=True)
    if egl.returncode != 0:
        pytest.skip("no EGL on this machine: MuJoCo cannot render headless")
    budget = ["--pretrain-updates", "3"] + (["--online-steps", "0"] if script != "reinformer_ag.py" else [])
    result = run_script(script, *TINY_HOPPER, *TINY_MODEL, *budget, "--capture-video", cwd=tmp_path,
                        env={**tiny_hopper, "DISPLAY": ""})
    assert "warning: --capture-video failed" not in result.stderr, result.stderr
    video = only_run_dir(tmp_path) / "eval.mp4"
    frames = [frame for frame in imageio.get_reader(video)]  # noqa: C416 (list() asks len(): inf for mp4)
    assert len(frames) > 5 and frames[0].shape[-1] == 3
    assert not all((f == frames[0]).all() for f in frames[1:])  # the hopper moves


def test_capture_video_without_imageio_ffmpeg_fails_before_any_work(tmp_path, data_env):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "imageio_ffmpeg.py").write_text("raise ImportError('No module named imageio_ffmpeg')\n")
    result = run_script("odt.py", "--env-id", "toy-vitamin-v0", "--capture-video", cwd=tmp_path, check=False,
                        env={**data_env, "PYTHONPATH": f"{shadow}{os.pathsep}{REPO}"})
    assert_clear_error(result, "pip install -e '.[video]'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_keeps_exactly_the_rows_its_checkpoint_counted(script, tmp_path):
    """A row logged after a checkpoint at the same update (the evaluation after pretraining, the final row) is
    dropped on resume: the checkpoint's row count decides, not the step; the logger keeps counting from there."""
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    rows = [{"global_step": s, "i": i} for i, s in enumerate((1, 5, 9, 9, 9))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"global_st')  # cut line
    logger = module.run.RunLogger(tmp_path, module.Args(), {"updates": 9, "metrics_rows": 3})
    assert logger.rows == 3
    logger.log({"global_step": 10})
    logger.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("i") for r in kept] == [0, 1, 2, None] and logger.rows == 4
    assert not list(tmp_path.glob("*.tmp"))
