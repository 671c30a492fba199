"""Run plumbing shared by the four scripts: nothing here can change a learned number."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import torch


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


def pick_device(cuda: bool, typed: set[str] | None) -> torch.device:
    """The CUDA GPU when there is one and --cuda (the default) asks for it, else the CPU. A --cuda typed on a
    machine without a GPU is told so instead of silently running on the CPU."""
    if cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if cuda and typed and "cuda" in typed:
        print("--cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); running on the CPU")
    return torch.device("cpu")


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
