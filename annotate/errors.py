"""User-facing errors: one clear line naming the file/episode/field, no traceback.

The CLI catches `RefineError` and prints its message in red with a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator


class RefineError(Exception):
    """Base for errors a user can act on (bad input, bad flags, missing data)."""


class SourceError(RefineError):
    """An episode source cannot be opened or read (missing dir, unknown layout, bad episode)."""


class CorruptRecordError(SourceError):
    """A record failed its CRC or is truncated. Carries the shard path and byte offset."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"{path}: corrupt record at byte offset {offset}: {reason} "
            "(re-download the shard, or pass --skip-corrupt to skip and count such records)"
        )


class Interrupted(Exception):
    """A run stopped on a signal (Ctrl-C, SIGTERM) after saving what it had.

    Not a `RefineError`: nothing was wrong. The message says what was saved and the command that
    continues; the CLI prints it and exits 128 + the signal number (130 for Ctrl-C), as shells do.
    """

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it (`raise … from`, or the error being handled), each once (cycle-safe)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
