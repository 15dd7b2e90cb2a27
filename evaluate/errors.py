"""Errors a `refine-eval` user can act on: one line naming the checkpoint, task, file or missing piece."""

from __future__ import annotations

from ..annotate.errors import RefineError


class EvalError(RefineError):
    """Bad evaluation input or a missing backend/asset: the message says what to install or fix."""


__all__ = ["EvalError", "RefineError"]
