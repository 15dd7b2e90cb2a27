"""User-facing errors: one clear line naming the file/episode/field, no traceback.

The CLI catches `RefineError` and prints its message in red with a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
