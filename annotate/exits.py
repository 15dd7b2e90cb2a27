"""How every refinevla command ends on an error: one line and an exit status, never a traceback.

`refine-data`, `refine-train` and `refine-eval` wrap their commands in `user_errors`:
- `RefineError` (bad input, a busy output, a missing piece): its message in red, exit 1;
- a full disk (ENOSPC, quota, SQLite's "database or disk is full"): the path and the room left, exit 1;
- `Interrupted` (a run that caught Ctrl-C / SIGTERM, saved what it had): its resume line, exit 130 / 143;
- a bare Ctrl-C: exit 130 (the last resort of commands that have nothing to save).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer

from .errors import Interrupted, RefineError
from .outputs import disk_full_message, is_disk_full

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print `message` as one red line; the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(EXIT_ERROR)


def user_errors(fn: F) -> F:
    """Decorate a Typer command: user errors and full disks as one red line, Ctrl-C as exit 130."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RefineError as exc:
            raise fail(str(exc)) from None
        except Interrupted as exc:
            if str(exc):
                typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if is_disk_full(exc):
                raise fail(disk_full_message(exc)) from None
            raise

    return wrapper  # type: ignore[return-value]
