"""Errors a `refine-train` user can act on: one line naming the file, episode or field.

They subclass the project's `RefineError`, so the CLI prints them in red and exits non-zero
without a traceback, as `refine-data` does.
"""

from __future__ import annotations

from ..annotate.errors import RefineError


class TrainError(RefineError):
    """Bad training input: an unknown schema, a missing episode, an empty dataset, a bad flag."""


__all__ = ["RefineError", "TrainError"]
