"""Gemini, OpenAI and any OpenAI-compatible server (vLLM, SGLang, Ollama) through the official
`openai` async client, with structured output via `response_format` json_schema.

The client's own retries are switched off (`max_retries=0`): the engine retries, so that
backoff, `Retry-After`, budgets and counters live in one place and a 400 is never retried.
Keys come from the environment only and are never put into messages or errors.
"""

from __future__ import annotations

import email.utils
import json
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..errors import RefineError
from ..prompts import DataURL
from .base import (
    PermanentTeacherError,
    TeacherAuthError,
    TeacherConfigError,
    TeacherRequest,
    TeacherResponse,
    TeacherUnreachableError,
    TransientTeacherError,
    redact,
    unreachable_reason,
)
from .refusals import setup_refusal
from .server_info import ServerInfo, ask_server, check_context_window

FORMATS_SERIALISED = 256  # response formats whose JSON is kept (episode detail: one per distinct episode context)


@dataclass(frozen=True)
class Provider:
    """Where a named provider lives and how it is authenticated."""

    name: str
    base_url: str | None  # None: --base-url is required
    key_env: str | None  # environment variable holding the API key
    key_required: bool
    default_model: str | None
    max_tokens_field: str  # "max_completion_tokens" (OpenAI) or "max_tokens" (widest support)


PROVIDERS = {
    "gemini": Provider(
        "gemini",
        "https://generativelanguage.googleapis.com/v1beta/openai/",
        "GEMINI_API_KEY",
        True,
        "gemini-2.5-flash",
        "max_tokens",
    ),
    "openai": Provider(
        "openai", "https://api.openai.com/v1", "OPENAI_API_KEY", True, "gpt-4.1-mini", "max_completion_tokens"
    ),
    "openai-compatible": Provider("openai-compatible", None, "OPENAI_API_KEY", False, None, "max_tokens"),
}


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` / `retry-after` (seconds or an HTTP date), if present."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


class OpenAICompatTeacher:
    """A teacher behind an OpenAI-compatible `/chat/completions` endpoint."""

    paid = True

    def __init__(
        self,
        provider: Provider,
        *,
        model: str,
        base_url: str,
        api_key: str | None,
        temperature: float = 0.2,
        max_tokens: int = 4096,
    ) -> None:
        self.name = provider.name
        self.provider = provider
        self.model = model
        self.base_url = base_url
        self._api_key = api_key  # kept private; never logged, never part of a key or manifest
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._client: Any = None
        self._endpoint = "/chat/completions"
        # response formats serialised, by identity (the object kept, so its id is not reused while cached)
        self._formats: OrderedDict[int, tuple[dict[str, Any], bytes]] = OrderedDict()
        self.server: ServerInfo | None = None  # what an openai-compatible server says of itself (start)
        # An openai-compatible server is often free (a local vLLM); a missing price is then not an error.
        self.paid = provider.name != "openai-compatible"

    @classmethod
    def for_provider(
        cls,
        name: str,
        *,
        model: str | None = None,
        base_url: str | None = None,
        temperature: float = 0.2,
        max_tokens: int = 4096,
        require_key: bool = True,
    ) -> OpenAICompatTeacher:
        """`require_key=False` (a dry run, which sends nothing) builds the teacher without a key."""
        provider = PROVIDERS[name]
        url = base_url or provider.base_url
        if not url:
            raise RefineError(f"--teacher {name} needs --base-url (e.g. http://localhost:8000/v1 for `vllm serve`)")
        chosen = model or provider.default_model
        if not chosen:
            raise RefineError(f"--teacher {name} needs --model (the model id the server serves)")
        key = os.environ.get(provider.key_env) if provider.key_env else None
        if provider.key_required and not key and require_key:
            raise RefineError(f"--teacher {name} needs an API key in the environment variable {provider.key_env}")
        return cls(provider, model=chosen, base_url=url, api_key=key, temperature=temperature, max_tokens=max_tokens)

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    async def start(self) -> None:
        from openai import AsyncOpenAI

        # "EMPTY" is the placeholder local servers (vllm serve) accept when no key is configured.
        self._client = AsyncOpenAI(
            api_key=self._api_key or "EMPTY",
            base_url=self.base_url,
            max_retries=0,
            http_client=_aiohttp_transport(),
        )
        # The endpoint as an absolute URL, joined once the way the client joins a relative path
        # to its base URL (which it keeps with a trailing slash): it then parses one URL per
        # request instead of parsing and re-joining two.
        base = str(self._client.base_url)
        self._endpoint = base + "chat/completions" if "?" not in base else "/chat/completions"
        if self.provider.name == "openai-compatible" and self.server is None:  # the hosted APIs are known
            self.server = await ask_server(self._client, self.base_url, self.model)
            check_context_window(self.max_tokens, self.server.max_model_len, self.model, self.base_url)

    def provenance(self) -> dict[str, Any]:
        """What the manifest records beyond name, model and sampling: for a self-hosted server, the serving
        software as it describes itself (vLLM: its version and the model's context window); nothing before
        the teacher started (a rerun settled from the store asks the server nothing)."""
        return {"server": self.server.record()} if self.server is not None else {}

    def request_body(self, request: TeacherRequest) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` (= the JSON body sent)."""
        return {
            "model": self.model,
            "messages": request.messages,
            "response_format": request.response_format,
            "temperature": self.temperature,
            self.provider.max_tokens_field: self.max_tokens,
        }

    def encode(self, request: TeacherRequest) -> bytes:
        """The JSON body sent for `request` (each response format object is serialised once per teacher).

        Response formats are treated as immutable: the engine derives one per run (`static`) or shares
        one per distinct episode context (`teacher_requests.episode_response_format`), never edited.
        """
        return encode_body(self.request_body(request), {"response_format": self._format_json(request.response_format)})

    def _format_json(self, fmt: dict[str, Any]) -> bytes:
        cached = self._formats.get(id(fmt))
        if cached is not None and cached[0] is fmt:
            self._formats.move_to_end(id(fmt))
            return cached[1]
        data = compact_json(fmt)
        self._formats[id(fmt)] = (fmt, data)
        if len(self._formats) > FORMATS_SERIALISED:
            self._formats.popitem(last=False)
        return data

    async def complete(self, request: TeacherRequest, timeout: float) -> TeacherResponse:
        import openai

        if self._client is None:
            await self.start()
        try:
            # `post` sends the body as built, skipping the client's per-call TypedDict transform of the
            # (large, already plain-JSON) messages and schema (~5 ms of CPU per request); the body is
            # serialised by `encode_body` (the same bytes the client would send, ~0.5 ms cheaper) and
            # the answer is read as bytes and parsed here rather than into pydantic models (~0.5 ms
            # more). Same endpoint, same wire format, same errors.
            raw = await self._client.post(
                self._endpoint,
                cast_to=bytes,
                content=self.encode(request),
                options={"timeout": timeout},
            )
        except openai.APIConnectionError as exc:  # APITimeoutError too: over aiohttp a refused connection is one
            unreachable = unreachable_reason(exc)
            if unreachable is not None:
                raise TeacherUnreachableError(redact(f"cannot reach {self.base_url}: {unreachable}")) from exc
            if isinstance(exc, openai.APITimeoutError):
                raise TransientTeacherError(f"timed out after {timeout:g}s") from exc
            raise TransientTeacherError(f"connection error: {type(exc.__cause__ or exc).__name__}") from exc
        except openai.APIStatusError as exc:
            status = exc.status_code
            summary = f"HTTP {status}: {server_error_message(exc)}"
            if status in (401, 403):
                raise TeacherAuthError(
                    f"the {self.name} server refused the credentials ({summary}); "
                    f"check {self.provider.key_env or 'the key'}"
                ) from None
            if status == 404:
                raise TeacherConfigError(
                    redact(
                        f"the {self.name} server at {self.base_url} has no model {self.model!r} or no such "
                        f"endpoint ({summary}); check --model and --base-url"
                    )
                ) from None
            if status == 429 or status >= 500 or status in (408, 409):
                raise TransientTeacherError(
                    summary, retry_after=parse_retry_after(exc.response.headers), status=status
                ) from exc
            setup = setup_refusal(status, summary)
            if setup is not None:  # every request would be refused alike: stop, reject nothing
                raise TeacherConfigError(redact(setup.explain(self.model, self.base_url, summary))) from None
            raise PermanentTeacherError(summary, status=status) from exc
        return parse_completion(raw, self.model)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# The characters JSON writes as they are: printable ASCII except the quote and the backslash.
_VERBATIM = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')
_SPLICE_MIN = 256  # shorter URLs are not worth splicing
# Stands in for each spliced value while the rest of the body is serialised; random, so no text holds it.
# Public because batch mode (`batch.gemini`) marks its request lines' blobs with it too.
BLOB_MARK = f"refinevla-blob-{secrets.token_hex(12)}"


def encode_body(body: dict[str, Any], serialised: dict[str, bytes] | None = None) -> bytes:
    """`body` as JSON bytes, exactly as the `openai` client serialises a request body.

    The client's serialiser (`json.dumps(..., ensure_ascii=False, separators=(",", ":"))` then
    `.encode()`) scans every character of the base64 keyframes twice, ~80 KB per request, and
    the response schema every time: at hundreds of requests per second that is a tenth of the
    engine's CPU. Base64 needs no JSON escaping, so each image URL is replaced by a marker, as
    is each top-level field given already serialised in `serialised`; the rest (the prompt) is
    serialised the same way and the pieces are joined back in as bytes. A test checks the
    result byte for byte against the client's own serialiser.
    """
    blobs: list[bytes] = []  # JSON text of each marked value, in the order it appears in the body
    marked: dict[str, Any] = {}
    for key, value in body.items():
        if serialised is not None and key in serialised:
            blobs.append(serialised[key])
            marked[key] = BLOB_MARK
        elif key == "messages" and isinstance(value, list):
            marked[key] = [_mark_images(m, blobs) for m in value]
        else:
            marked[key] = value
    text = compact_json(marked)
    if not blobs:
        return text
    spliced = splice_blobs(text, blobs)
    return spliced if spliced is not None else compact_json(body)  # a text held the marker: serialise it all


def splice_blobs(text: bytes, blobs: list[bytes]) -> bytes | None:
    """`text` with each quoted `BLOB_MARK` replaced by the next of `blobs`, in order.

    None when the markers and the blobs do not pair up, which happens only if a text in the body
    held the random marker itself: the caller then serialises the whole body instead.
    """
    pieces = text.split(f'"{BLOB_MARK}"'.encode())
    if len(pieces) != len(blobs) + 1:
        return None
    out = [pieces[0]]
    for blob, piece in zip(blobs, pieces[1:], strict=True):
        out += (blob, piece)
    return b"".join(out)


def compact_json(value: Any) -> bytes:
    """`value` as the `openai` client serialises a body: compact, UTF-8 unescaped, NaN refused.

    Batch mode writes its lines with it too, so a batch request holds the same bytes as the live one.
    """
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _mark_images(message: Any, blobs: list[bytes]) -> Any:
    """A copy of a chat message with each plain image data URL swapped for the marker (its JSON in `blobs`)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        image = part.get("image_url") if isinstance(part, dict) else None
        blob = spliceable_url_json(image.get("url")) if isinstance(image, dict) else None
        if blob is not None:
            blobs.append(blob)
            part = {**part, "image_url": {**image, "url": BLOB_MARK}}  # type: ignore[dict-item]
        parts.append(part)
    return {**message, "content": parts}


def spliceable_url_json(url: Any) -> bytes | None:
    """The JSON text of an image URL when it can be spliced in verbatim, else None.

    Verbatim: the URL in quotes is its JSON (printable ASCII, nothing to escape), and it is long
    enough to be worth it, as the keyframes' base64 data URLs that make up most of a request are.
    """
    if type(url) is DataURL:  # made by the prompt builder, its JSON text with it
        return url.json
    if isinstance(url, str) and len(url) >= _SPLICE_MIN and url.isascii():
        text = url.encode("ascii")
        if not text.translate(None, _VERBATIM):  # a C scan, ~10 us for a 256 px keyframe
            return b'"' + text + b'"'
    return None


def parse_completion(raw: bytes, default_model: str) -> TeacherResponse:
    """A chat-completion body -> TeacherResponse; a body that is not one is a transient error.

    A refusal is reported with finish_reason "refusal" so the engine does not parse it as an answer.
    """
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
        finish = choice.get("finish_reason")
        usage = body.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise TransientTeacherError(f"malformed response body: {raw[:200]!r}") from None
    if not isinstance(text, str):
        raise TransientTeacherError("malformed response body: message content is not text")
    if message.get("refusal"):
        text, finish = str(message["refusal"]), "refusal"
    return TeacherResponse(
        text=text,
        finish_reason=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=body.get("model") or default_model,
    )


def _aiohttp_transport() -> Any:
    """openai's own aiohttp transport (`openai[aiohttp]`), or None for the default httpx one.

    At 64+ requests in flight httpx's pool scans every connection per request; aiohttp costs
    less CPU per request, which is what keeps a fast teacher saturated.
    """
    try:
        from openai import DefaultAioHttpClient
    except ImportError:  # openai releases before the aiohttp transport
        return None
    try:
        return DefaultAioHttpClient()
    except RuntimeError:  # the `aiohttp` extra is not installed
        return None


def server_error_message(exc: Exception, limit: int = 300) -> str:
    """The server's error message from an `openai` status error, bounded (bodies can be long).

    The message inside the error body when there is one, else the exception's text: one line for
    reporting an OpenAI-compatible server's refusal, in live and batch mode alike.
    """
    body = getattr(exc, "body", None)
    msg = None
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else str(err)
    text = str(msg or exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."
