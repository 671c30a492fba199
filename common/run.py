"""Run plumbing shared by the four scripts: nothing here can change a learned number."""

from __future__ import annotations

import dataclasses


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
