"""What batch mode needs from a provider's Batch API, whichever provider it is.

A provider turns a `TeacherRequest` into one line of its batch input file, uploads a file,
creates a batch from it, reports a batch's state and reads its result lines back as
`TeacherResponse`s. Every object batch mode creates remotely carries a *tag* — the run's id and
the local batch number — in the provider's own metadata (file name / display name / batch
metadata), so that a file or batch created just before a crash is found again by `find_file` /
`find_batch` on the rerun instead of being created twice.

Calls are synchronous: batch mode spends its time waiting for the provider, not on I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from ..teachers.base import TeacherRequest, TeacherResponse

# The provider's many states, in the few that matter to a run.
State = Literal["pending", "running", "completed", "failed", "expired", "cancelled"]
FINAL_STATES: tuple[State, ...] = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchState:
    """A remote batch as last seen."""

    id: str  # the provider's batch id (OpenAI `batch_...`, Gemini `batches/...`)
    state: State
    provider_status: str  # the provider's own word ("in_progress", "JOB_STATE_RUNNING", ...)
    output_file: str | None = None  # file id of the answers, once there are any
    error_file: str | None = None  # file id of the failed lines (OpenAI); None where errors are inline
    counts: dict[str, int] = field(default_factory=dict)  # total / completed / failed, as reported
    errors: list[str] = field(default_factory=list)  # why the whole batch failed (validation errors, ...)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class LineResult:
    """One request's outcome in a batch's results: an answer, or why there is none."""

    key: str  # the request key (custom_id / key)
    response: TeacherResponse | None
    error: str | None = None  # provider-side failure of this line (HTTP status, expired, ...)
    status: int | None = None  # the line's HTTP status where the provider gives one (400 is never resubmitted)


class BatchProvider(Protocol):
    """A provider's Batch API, as batch mode drives it."""

    name: str  # "openai" | "gemini"
    max_requests: int  # requests per input file (the provider's documented limit, or less)
    max_bytes: int  # bytes per input file (ditto)

    def request_line(self, key: str, request: TeacherRequest) -> bytes:
        """One JSONL line (without the newline) asking exactly what live mode would ask."""
        ...

    def upload(self, path: Path, tag: str) -> str:
        """Upload an input file, named/tagged with `tag`; returns the file id."""
        ...

    def find_file(self, tag: str) -> str | None:
        """The id of an input file uploaded earlier with `tag`, if any."""
        ...

    def create(self, file_id: str, tag: str) -> str:
        """Create a batch over an uploaded file, tagged with `tag`; returns the batch id."""
        ...

    def find_batch(self, tag: str) -> str | None:
        """The id of a batch created earlier with `tag`, if any."""
        ...

    def get(self, batch_id: str) -> BatchState: ...

    def results(self, state: BatchState) -> Iterator[LineResult]:
        """Every result line of a finished batch (answers and per-line errors)."""
        ...

    def cancel(self, batch_id: str) -> None: ...

    def close(self) -> None: ...
