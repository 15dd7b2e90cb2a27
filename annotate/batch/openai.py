"""OpenAI's Batch API: the chat-completion bodies live mode sends, as lines of a JSONL input file.

Each line is `{"custom_id": <request key>, "method": "POST", "url": "/v1/chat/completions",
"body": <the exact bytes live mode POSTs>}`; the file is uploaded (purpose `batch`, named
`<tag>.jsonl`) and a batch created over it (metadata `refinevla_tag: <tag>`), which is how both are
found again after a crash. Answers come back in an output file, failed lines in an error file.

The official sync `openai` client is used. Lookups (GET, cancel) are retried by the client; the two
calls that create something (upload, create) are not retried blindly: after a failure whose
outcome is unknown (dropped connection, timeout, 5xx) the object is first looked up by its tag, so
a response lost on the way back never creates a second file or a second (paid) batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeVar

from ..errors import RefineError
from ..teachers.base import TeacherAuthError, TeacherRequest, TransientTeacherError, redact, unreachable_reason
from ..teachers.openai_compat import OpenAICompatTeacher, parse_completion, server_error_message
from .provider import BatchState, LineResult, State

if TYPE_CHECKING:
    from openai import OpenAI

ENDPOINT: Final[Literal["/v1/chat/completions"]] = "/v1/chat/completions"
TAG_KEY = "refinevla_tag"  # the batch metadata key holding the tag

# OpenAI's statuses in the few states a run tells apart.
STATES: dict[str, State] = {
    "validating": "pending",
    "in_progress": "running",
    "finalizing": "running",
    "cancelling": "running",
    "completed": "completed",
    "failed": "failed",
    "expired": "expired",
    "cancelled": "cancelled",
}

_T = TypeVar("_T")


class BatchAPIError(RefineError):
    """A Batch API call failed (one line; the server's words redacted). `transient`: worth trying later."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, if the server answered
        self.transient = transient  # 429, 5xx, timeouts, dropped connections


class BatchConnectionError(BatchAPIError):
    """The Batch API could not be reached (the message names the base URL)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class OpenAIBatch:
    """`BatchProvider` for OpenAI (and servers speaking its Files + Batch API), built from the live teacher."""

    name = "openai"

    def __init__(
        self,
        teacher: OpenAICompatTeacher,
        *,
        max_requests: int = 50_000,  # OpenAI's documented limit per input file
        max_bytes: int = 190 * 2**20,  # the limit is 200 MB per input file; a margin below it
        create_attempts: int = 3,  # tries of an upload / a batch creation whose outcome was unknown
        retry_delay: float = 2.0,  # seconds before the 2nd try, doubling after
        max_retries: int = 3,  # the client's own retries of lookups (connection errors, 429, 5xx)
    ) -> None:
        from openai import OpenAI

        self.teacher = teacher
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.base_url = teacher.base_url
        self.key_env = teacher.provider.key_env or "the API key"
        self.create_attempts = create_attempts
        self.retry_delay = retry_delay
        self._sleep: Callable[[float], None] = time.sleep
        # The key is read from the teacher's private field: it is never copied anywhere else.
        self._client: OpenAI = OpenAI(
            api_key=teacher._api_key or "EMPTY",
            base_url=teacher.base_url,
            max_retries=max_retries,  # lookups are idempotent; creating calls opt out (see `_create_once`)
            timeout=120.0,
        )

    # ------------------------------------------------------------------ input
    def request_line(self, key: str, request: TeacherRequest) -> bytes:
        """The JSONL line for `request`: live mode's body bytes, spliced in as they are."""
        body = self.teacher.encode(request)
        if b"\n" in body:  # cannot happen (JSON escapes newlines); a broken line would break the whole file
            raise ValueError(f"request {key}: the encoded body holds a raw newline")
        head = json.dumps(
            {"custom_id": key, "method": "POST", "url": ENDPOINT}, ensure_ascii=False, separators=(",", ":")
        )
        return head[:-1].encode() + b',"body":' + body + b"}"

    def upload(self, path: Path, tag: str) -> str:
        def once() -> str:
            with open(path, "rb") as fh:
                return (
                    self._client.with_options(max_retries=0)
                    .files.create(file=(f"{tag}.jsonl", fh), purpose="batch", timeout=600.0)
                    .id
                )

        return self._create_once(once, lambda: self.find_file(tag), f"uploading {path.name}")

    def find_file(self, tag: str) -> str | None:
        name = f"{tag}.jsonl"

        def find() -> str | None:
            # newest first, so a file uploaded again after an expiry is the one found
            for f in self._client.files.list(purpose="batch", order="desc"):
                if f.filename == name:
                    return f.id
            return None

        return self._call(find, f"looking up the input file {name}")

    def create(self, file_id: str, tag: str) -> str:
        def once() -> str:
            return (
                self._client.with_options(max_retries=0)
                .batches.create(
                    input_file_id=file_id,
                    endpoint=ENDPOINT,
                    completion_window="24h",
                    metadata={TAG_KEY: tag},
                )
                .id
            )

        return self._create_once(once, lambda: self.find_batch(tag), f"creating the batch {tag}")

    def find_batch(self, tag: str) -> str | None:
        """The newest batch tagged `tag` (whatever its state), if any."""

        def find() -> str | None:
            for b in self._client.batches.list(limit=100):  # newest first
                if (b.metadata or {}).get(TAG_KEY) == tag:
                    return b.id
            return None

        return self._call(find, f"looking up the batch {tag}")

    # ------------------------------------------------------------------ state
    def get(self, batch_id: str) -> BatchState:
        b = self._call(lambda: self._client.batches.retrieve(batch_id), f"reading the batch {batch_id}")
        counts = b.request_counts
        errors = []
        for e in (b.errors.data or []) if b.errors else []:
            text = f"{e.code}: {e.message}" if e.code else str(e.message)
            errors.append(redact(text + (f" (line {e.line})" if e.line is not None else "")))
        return BatchState(
            id=b.id,
            state=STATES.get(b.status, "running"),  # a status added later: keep polling
            provider_status=b.status,
            output_file=b.output_file_id,
            error_file=b.error_file_id,
            counts={"total": counts.total, "completed": counts.completed, "failed": counts.failed} if counts else {},
            errors=errors,
        )

    def results(self, state: BatchState) -> Iterator[LineResult]:
        """The output file's lines, then the error file's (failed, expired, cancelled lines), streamed."""
        for file_id in (state.output_file, state.error_file):
            if file_id:
                for number, line in self._lines(file_id):
                    yield self._line_result(line, file_id, number)

    def cancel(self, batch_id: str) -> None:
        """Ask for the batch to stop (it passes through `cancelling`); a batch already final is left as is."""
        try:
            self._call(lambda: self._client.batches.cancel(batch_id), f"cancelling the batch {batch_id}")
        except BatchAPIError as exc:
            if exc.status not in (400, 409) or not self.get(batch_id).final:
                raise

    def close(self) -> None:
        self._client.close()

    # -------------------------------------------------------------- internals
    def _lines(self, file_id: str) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of a file, streamed in chunks; a download cut short is resumed once or twice
        by reading the file again and skipping the lines already given."""
        import httpx2

        given = 0
        for attempt in range(3):
            number = 0
            try:
                with self._client.files.with_streaming_response.content(file_id) as response:
                    rest = b""
                    for chunk in response.iter_bytes():
                        lines = (rest + chunk).split(b"\n")
                        rest = lines.pop()
                        for line in lines:
                            number += 1
                            if number > given and line.strip():
                                given = number
                                yield number, line
                    if rest.strip():
                        number += 1
                        if number > given:
                            given = number
                            yield number, rest
                return
            except httpx2.TransportError as exc:
                if attempt == 2:
                    raise self._connection_error(exc, f"reading the file {file_id}") from None
            except Exception as exc:
                raise self._error(exc, f"reading the file {file_id}") from None

    def _line_result(self, line: bytes, file_id: str, number: int) -> LineResult:
        try:
            out = json.loads(line)
            key = out["custom_id"]
        except (ValueError, KeyError, TypeError):
            raise BatchAPIError(f"line {number} of the batch result file {file_id} is not a batch result") from None
        response, error = out.get("response"), out.get("error")
        if isinstance(response, dict) and response.get("status_code") == 200:
            try:
                answer = parse_completion(json.dumps(response.get("body")).encode(), self.teacher.model)
            except TransientTeacherError as exc:
                return LineResult(key, None, redact(str(exc)))
            return LineResult(key, answer)
        if isinstance(response, dict):
            body = response.get("body")
            err = body.get("error", body) if isinstance(body, dict) else body
            message = err.get("message") if isinstance(err, dict) else err
            return LineResult(key, None, redact(f"HTTP {response.get('status_code')}: {message}"))
        if isinstance(error, dict):
            return LineResult(key, None, redact(f"{error.get('code') or 'error'}: {error.get('message')}"))
        return LineResult(key, None, "the batch returned neither a response nor an error for this request")

    def _call(self, fn: Callable[[], _T], doing: str) -> _T:
        try:
            return fn()
        except Exception as exc:
            raise self._error(exc, doing) from None

    def _create_once(self, create: Callable[[], str], find: Callable[[], str | None], doing: str) -> str:
        """`create()`, retried only after looking up (`find()`) whether the failed try created it after all."""
        delay = self.retry_delay
        for attempt in range(1, self.create_attempts + 1):
            try:
                return create()
            except Exception as exc:
                error = self._error(exc, doing)
                if not (isinstance(error, BatchAPIError) and error.transient):
                    raise error from None
            found = find()
            if found is not None:
                return found
            if attempt == self.create_attempts:
                raise error
            self._sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _error(self, exc: Exception, doing: str) -> RefineError:
        """The one-line error for a failed API call (a RefineError passes through)."""
        import openai

        if isinstance(exc, RefineError):
            return exc
        if isinstance(exc, openai.APIConnectionError):  # timeouts included
            return self._connection_error(exc.__cause__ or exc, doing)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            summary = f"HTTP {status}: {server_error_message(exc)}"
            if status in (401, 403):
                return TeacherAuthError(
                    redact(f"the {self.teacher.name} Batch API refused the credentials {doing} ({summary}); ")
                    + f"check {self.key_env}"
                )
            transient = status in (408, 409, 429) or status >= 500
            return BatchAPIError(
                redact(f"the {self.teacher.name} Batch API failed {doing} ({summary})"),
                status=status,
                transient=transient,
            )
        if isinstance(exc, openai.OpenAIError):
            return BatchAPIError(redact(f"the {self.teacher.name} Batch API failed {doing}: {exc}"))
        raise exc

    def _connection_error(self, exc: BaseException, doing: str) -> BatchConnectionError:
        """The OS-level cause when there is one (a refused connection comes back from the client as a
        timeout), as the live teacher names it; else the error's type."""
        why = unreachable_reason(exc) or type(exc).__name__
        return BatchConnectionError(
            redact(f"cannot reach the {self.teacher.name} Batch API at {self.base_url} {doing}: {why}")
        )
