"""The mutant type of the mutation catalogue (`python -m tests.mutation`).

A mutant is one plausible bug: a one-line description and exact text edits. Every edit's `old` text must
occur exactly once in its file, so a mutant whose target text has gone (a refactor moved or changed it)
fails loudly instead of silently testing nothing. A block copied by design into several scripts is mutated
in every copy at once (one edit per file), so the block-identity test cannot be what kills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    id: str  # unique, e.g. "odt_td3/td-target-online-critic"
    description: str  # what the bug does, in one line
    edits: tuple[tuple[str, str, str], ...]  # (file relative to the repo root, old text, new text)
    tests: tuple[str, ...] = field(default=())  # pytest paths / node ids that can see it; () = the file's default

    def __post_init__(self):
        assert self.edits, f"{self.id}: no edits"
        for path, old, new in self.edits:
            assert old != new, f"{self.id}: edit of {path} changes nothing"


def mutant(id: str, description: str, *edits: tuple[str, str, str], tests: tuple[str, ...] | list[str] = ()):
    """Shorthand: mutant("odt/x", "what breaks", ("odt.py", "old", "new"), tests=["tests/test_odt.py"])."""
    return Mutant(id=id, description=description, edits=tuple(edits), tests=tuple(tests))


def everywhere(files: list[str], old: str, new: str) -> tuple[tuple[str, str, str], ...]:
    """The same edit in every copy of a shared block."""
    return tuple((f, old, new) for f in files)
