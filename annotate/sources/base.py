"""What every episode source shares: read options, counters, and the source protocol."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..episode import Episode


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

    def __len__(self) -> int: ...

    def iter_episodes(self, options: ReadOptions | None = None) -> Iterator[Episode]: ...
