"""What every episode source shares: read options, counters, and the source protocol."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..episode import Episode
from ..errors import SourceError


@dataclass
class ReadOptions:
    """How to read: range, parallelism, corruption policy."""

    start: int = 0  # first episode index (in the source's order)
    stop: int | None = None  # one past the last episode index; None = to the end
    workers: int = 0  # 0: read in this process; N: N worker processes over shard chunks
    skip_corrupt: bool = False  # skip (and count) CRC-failing / truncated records instead of stopping
    check_crc: bool = True  # verify TFRecord CRCs (cheap; turn off only to salvage data)


@dataclass
class ReadCounters:
    """What a read skipped; reported by the CLI, never silently dropped."""

    corrupt: list[str] = field(default_factory=list)  # "<shard> @ byte N: reason" per skipped record


@dataclass(frozen=True)
class SourceOverrides:
    """User flags that remap a layout (`--camera`, `--instruction-key`, `--state-key`, `--action-key`)."""

    cameras: tuple[str, ...] = ()  # camera features, primary first
    instruction_key: str | None = None
    state_key: tuple[str, ...] = ()  # features concatenated into the state
    action_key: tuple[str, ...] = ()  # features concatenated into the action


class EpisodeSource(Protocol):
    """An ordered, streamable collection of episodes."""

    name: str
    counters: ReadCounters
    declared: dict[str, Any]  # what the dataset says about itself (robot, transform; see `read_declaration`)

    def __len__(self) -> int: ...

    def layout(self) -> dict[str, Any]: ...

    def iter_episodes(self, options: ReadOptions | None = None) -> Iterator[Episode]: ...


DECLARATION_FILE = "refinevla_source.json"  # beside features.json: what a dataset declares about itself


def read_declaration(directory: str) -> dict[str, Any]:
    """What the dataset in `directory` declares about itself (`refinevla_source.json`: e.g. the transform
    its actions need and the robot they drive — `refine-eval demos` writes one, for RLDS and LeRobot folders
    alike); {} where there is none."""
    from etils import epath

    path = epath.Path(directory) / DECLARATION_FILE
    try:
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return data
