"""How the commands name a source and a range of its episodes: the flags' meaning, shared.

`refine-data`'s commands, the annotate run (its parts, its Ray tasks) and `view` open sources and
read `--episodes START:STOP` the same way; they live here, below the CLI, so that library modules
never import the CLI module back.
"""

from __future__ import annotations

from typing import Any

from .errors import RefineError


def split_keys(value: str | None) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.split(",") if k.strip()) if value else ()


def parse_range(value: str | None, limit: int | None = None) -> tuple[int, int | None]:
    """ "START:STOP" (either side optional) plus --limit -> (start, stop)."""
    start, stop = 0, None
    if value:
        lo, sep, hi = value.partition(":")
        try:
            start = int(lo) if lo else 0
            stop = int(hi) if hi else None
            if not sep:
                stop = start + 1
        except ValueError:
            raise RefineError(f"--episodes {value!r}: expected START:STOP, e.g. 0:100") from None
    if limit is not None:
        stop = start + limit if stop is None else min(stop, start + limit)
    return start, stop


def recorded_cameras(source: dict[str, Any]) -> list[str]:
    """The cameras annotate read, primary first (`source.layout.cameras` of a published dataset's
    refinevla.json): what the teacher saw, so what the viewer and refine-train read by default. Empty for a
    dataset published before the layout was recorded (the source's own default camera then)."""
    return [str(c) for c in (source.get("layout") or {}).get("cameras") or []]


def open_cli_source(
    source: str,
    data_dir: str | None,
    split: str,
    camera: list[str] | None,
    instruction_key: str | None,
    state_key: str | None,
    action_key: str | None,
) -> Any:
    """Open a source with the user's layout overrides applied."""
    from .sources import SourceOverrides, open_source

    overrides = SourceOverrides(
        cameras=tuple(camera or ()),
        instruction_key=instruction_key,
        state_key=split_keys(state_key),
        action_key=split_keys(action_key),
    )
    return open_source(source, data_dir=data_dir, split=split, overrides=overrides)
