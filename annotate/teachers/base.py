"""The one async interface every teacher backend implements.

The engine owns scheduling, retries, re-asks, validation and the store; a teacher only
turns one request into one raw answer (text + token usage), or raises a
`TransientTeacherError` (worth retrying: 429, 5xx, timeouts, dropped connections) or a
`PermanentTeacherError` (never retried: 400 and other client errors). That split is
what lets the engine retry a 429 and never a 400. A refusal of the setup rather than of the
episode (`refusals`) is a `TeacherConfigError` instead: it stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ...schemas import SemanticContext
from ..errors import RefineError, causes
from ..prompts import EpisodeFacts


@dataclass
class TeacherRequest:
    """One question to a teacher: the messages and the schema the answer must follow."""

    key: str  # the request key (hash of everything that changes the answer)
    episode_id: str
    messages: list[dict[str, Any]]  # OpenAI chat format; re-asks append to a copy
    response_format: dict[str, Any]  # {"type": "json_schema", "json_schema": {...}}
    facts: EpisodeFacts  # what the data says (rule-based teachers answer from this alone)
    context: SemanticContext  # what the answer is checked against
    attempt: int = 1  # 1 for the first ask, 2.. for re-asks


@dataclass
class TeacherResponse:
    """A raw answer, before any parsing or validation."""

    text: str
    finish_reason: str | None  # "stop", "length" (truncated), ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""  # the model the server says answered
    headers: dict[str, str] = field(default_factory=dict)  # rate-limit headers, if any
    latency: float | None = None  # seconds the answered request took, retries and waits excluded (the engine's)


class TransientTeacherError(Exception):
    """Worth retrying after a pause: rate limits, server errors, timeouts, connection drops."""

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said
        self.status = status


class TeacherUnreachableError(TransientTeacherError):
    """No connection to the teacher at all (refused, DNS, TLS): retried like any transient failure (a
    server may be restarting), but named as what it is when the retries run out, never as a rate limit."""


def unreachable_reason(exc: BaseException) -> str | None:
    """Why a request never reached the server ("connection refused", DNS, TLS...), read from the
    error's causes; None when it did connect (a timeout, a dropped connection mid-answer).

    HTTP clients report these their own ways (the openai client raises even a refused connection
    as `APITimeoutError` over aiohttp), so the OS-level cause decides.
    """
    import socket
    import ssl

    for cause in causes(exc):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"host name not resolved ({cause.strerror or cause})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({cause.reason or cause})"
        if isinstance(cause, (ConnectionResetError, ConnectionAbortedError)) and "connect" in str(exc).lower():
            return "connection reset while connecting"
    return None


class PermanentTeacherError(Exception):
    """The request itself is wrong (HTTP 400, 404, 422...): asking again gives the same answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TeacherAuthError(RefineError):
    """The credentials were refused (401/403): stops the run, no episode is rejected for it."""


class TeacherConfigError(RefineError):
    """The teacher refuses the run's setup, not an episode: no such model or endpoint (404), a model that
    takes no images, a response schema it cannot compile, a parameter it does not know (`refusals`).
    Every request would fail alike, so the run stops instead of rejecting (and caching the rejection
    of) every episode."""


@runtime_checkable
class Teacher(Protocol):
    """A backend that answers rationale requests."""

    name: str  # "gemini", "openai", "openai-compatible", "vllm", "rule-based"
    model: str  # model id; part of the request key and the manifest
    paid: bool  # whether answers cost money (accounting, --max-cost)

    def sampling(self) -> dict[str, Any]:
        """Sampling parameters that change the answer (part of the request key)."""
        ...

    async def start(self) -> None:
        """Connect / load / self-check. Raise RefineError with a clear message on failure."""
        ...

    async def complete(self, request: TeacherRequest, timeout: float) -> TeacherResponse:
        """One answer for one request (no retries here: the engine owns them)."""
        ...

    async def close(self) -> None: ...


SECRET_ENV_VARS = ("GEMINI_API_KEY", "OPENAI_API_KEY", "GOOGLE_API_KEY")


def redact(text: str) -> str:
    """Blank out any API key from the environment that a message might carry.

    Keys are never put into messages on purpose; this guards against a server or a library
    echoing a header or URL back in an error that then ends up in a log or the rejects table.
    """
    import os

    for var in SECRET_ENV_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return text
