"""Gemini's Batch API through its official SDK, `google-genai`: the requests live mode sends to
Gemini's OpenAI-compatible endpoint, written as native `GenerateContentRequest`s.

The wire protocol, as the SDK speaks it (checked against google-genai 2.21 and 3.6):

* input: a JSONL file, one `{"key": ..., "request": GenerateContentRequest}` per line (REST JSON,
  camelCase), uploaded with the Files API's resumable upload (`files.upload`, display name = tag);
* `batches.create(model, src="files/...", config={"display_name": tag})` posts
  `models/{model}:batchGenerateContent` and returns an Operation named `batches/...`;
* `batches.get` / `batches.list` read the Operation: its state (the SDK maps `BATCH_STATE_*` to
  `JOB_STATE_*`), display name and result file (`metadata.output.responsesFile`); the SDK drops the
  Operation's `error` and `metadata.batchStats`, which are read from the same JSON here;
* results: a JSONL file (`files.download`), one `{"key", "response": GenerateContentResponse}` or
  `{"key", "error"|"status": google.rpc.Status}` per request, in any order.

Structured output uses `responseJsonSchema` (JSON Schema, `additionalProperties` and nullable types
included): the schema live mode sends as `response_format`, unchanged.

Creating a batch is not idempotent (Google's own warning), so `create` is never retried: a lost
answer surfaces as an error, and the rerun finds the batch by its tag. Every other call is retried
by the SDK on 408/429/5xx with exponential backoff.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RefineError
from ..teachers.base import TeacherAuthError, TeacherRequest, TeacherResponse, redact
from ..teachers.openai_compat import BLOB_MARK, OpenAICompatTeacher, compact_json, splice_blobs, spliceable_url_json
from .provider import BatchState, LineResult, State

if TYPE_CHECKING:
    from google import genai

API_VERSION = "v1beta"  # the version the Batch API is documented under (the SDK's own default moves)
KEY_ENV = "GEMINI_API_KEY"
# The Batch API's documented input limit is 2 GB per file; it documents no request count, the
# enqueued-token quota of the project's tier binds first (~3M tokens for Flash on Tier 1).
MAX_BYTES = 1_800_000_000
MAX_REQUESTS = 10_000
TIMEOUT_MS = 300_000  # per HTTP request (the SDK's default is none: a dead connection would hang a poll)
ATTEMPTS = 5  # tries of an idempotent call on 408/429/5xx (the SDK's backoff: 1 s doubling, jittered)
PAGE_SIZE = 100  # the Files API's maximum page

_STATES: dict[str, State] = {
    "JOB_STATE_PENDING": "pending",
    "JOB_STATE_QUEUED": "pending",
    "JOB_STATE_UNSPECIFIED": "pending",
    "JOB_STATE_SUCCEEDED": "completed",
    "JOB_STATE_PARTIALLY_SUCCEEDED": "completed",
    "JOB_STATE_FAILED": "failed",
    "JOB_STATE_CANCELLED": "cancelled",
    "JOB_STATE_EXPIRED": "expired",
}  # anything else (RUNNING, CANCELLING, UPDATING, PAUSED, a new word) is "running": not final, polled again
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}
_BATCH_NAME = re.compile(r"batches/[A-Za-z0-9_-]+")
# google.rpc.Code -> the HTTP status Google maps it to (a result line's Status carries the gRPC code)
_GRPC_HTTP = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400}
_GRPC_HTTP |= {12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


class GeminiBatch:
    """`BatchProvider` for `--teacher gemini --batch`."""

    name = "gemini"

    def __init__(
        self,
        teacher: OpenAICompatTeacher,
        *,
        base_url: str | None = None,  # None: Google's endpoint (tests point it at a local fake)
        max_requests: int = MAX_REQUESTS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.teacher = teacher
        self.model = teacher.model
        self.base_url = base_url
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self._client_: genai.Client | None = None
        self._format: Any = None  # the last response schema serialised, and its JSON
        self._format_json = b""

    # ----------------------------------------------------------------- requests
    def request_body(self, request: TeacherRequest) -> dict[str, Any]:
        """The `GenerateContentRequest` (REST JSON) equivalent to live mode's chat request."""
        return self._request(request, None)

    def request_line(self, key: str, request: TeacherRequest) -> bytes:
        """`{"key", "request"}` as JSON bytes; the keyframes' base64 and the schema are joined in as bytes
        (as `openai_compat.encode_body` does): the same bytes `json.dumps` would write, for a tenth of the CPU."""
        blobs: list[bytes] = []
        marked = self._request(request, blobs)
        spliced = splice_blobs(compact_json({"key": key, "request": marked}), blobs)
        if spliced is None:  # only if a text held the random marker
            return compact_json({"key": key, "request": self.request_body(request)})
        return spliced

    def _request(self, request: TeacherRequest, blobs: list[bytes] | None) -> dict[str, Any]:
        """The request; with `blobs`, each image's data and the schema are a marker, their JSON in `blobs`."""
        system: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        for message in request.messages:
            role = message.get("role")
            parts = _parts(message.get("content"), blobs)
            if role in ("system", "developer"):
                if any("text" not in p for p in parts):
                    raise RefineError("a system message with images cannot be sent to Gemini")
                system += parts
            elif role in ("user", "assistant"):
                if parts:  # Gemini refuses a turn without parts (an empty answer being re-asked)
                    contents.append({"role": "user" if role == "user" else "model", "parts": parts})
            else:
                raise RefineError(f"a {role!r} chat message has no Gemini equivalent")
        config: dict[str, Any] = {"temperature": self.teacher.temperature, "maxOutputTokens": self.teacher.max_tokens}
        fmt = request.response_format or {}
        if fmt.get("type") in ("json_schema", "json_object"):
            config["responseMimeType"] = "application/json"
        if fmt.get("type") == "json_schema":
            schema = fmt["json_schema"]["schema"]
            if blobs is None:
                config["responseJsonSchema"] = schema
            else:
                if self._format is not schema:  # one response format per run (`static`): serialised once
                    self._format, self._format_json = schema, compact_json(schema)
                blobs.append(self._format_json)
                config["responseJsonSchema"] = BLOB_MARK
        # in the order the markers were made: the images (contents), then the schema (generationConfig)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": system}
        body["generationConfig"] = config
        return body

    # ----------------------------------------------------------------- files and batches
    def upload(self, path: Path, tag: str) -> str:
        config = {"display_name": tag, "mime_type": "jsonl"}
        try:
            file = self._call("uploading the input file", self._client.files.upload, file=path, config=config)
        except (KeyError, ValueError) as exc:  # the upload session did not finalise
            raise RefineError(redact(f"Gemini Files API: the upload of {path.name} did not complete: {exc}")) from None
        if not file.name:
            raise RefineError("Gemini Files API: the upload returned no file name")
        return str(file.name)

    def find_file(self, tag: str) -> str | None:
        def scan() -> str | None:
            for file in self._client.files.list(config={"page_size": PAGE_SIZE}):
                state = getattr(file.state, "value", file.state)
                if file.display_name == tag and file.name and state != "FAILED":
                    return str(file.name)
            return None

        found: str | None = self._call("listing files", scan)
        return found

    def create(self, file_id: str, tag: str) -> str:
        config = {"display_name": tag, "http_options": {"retry_options": {"attempts": 1}}}
        job = self._call(
            "creating the batch", self._client.batches.create, model=self.model, src=file_id, config=config
        )
        if not job.name:
            raise RefineError("Gemini Batch API: the new batch has no name")
        return str(job.name)

    def find_batch(self, tag: str) -> str | None:
        def scan() -> str | None:
            for job in self._client.batches.list(config={"page_size": PAGE_SIZE}):
                if job.display_name == tag and job.name:
                    return str(job.name)
            return None

        found: str | None = self._call("listing batches", scan)
        return found

    def get(self, batch_id: str) -> BatchState:
        if not _BATCH_NAME.fullmatch(batch_id):
            raise RefineError(f"{batch_id!r} is not a Gemini batch name (batches/...)")
        raw = self._operation(batch_id)
        if raw is None:  # the SDK's transport changed: what its public BatchJob carries (no counts)
            job = self._call("reading the batch", self._client.batches.get, name=batch_id)
            word = getattr(job.state, "value", None) or str(job.state or "JOB_STATE_UNSPECIFIED")
            error = {"code": job.error.code, "message": job.error.message} if job.error is not None else None
            output = job.dest.file_name if job.dest is not None else None
            name, counts = job.name, {}
        else:
            meta = raw.get("metadata") or {}
            # the Batch API says BATCH_STATE_*; the SDK (and the docs) JOB_STATE_*
            word = str(meta.get("state") or "JOB_STATE_UNSPECIFIED").replace("BATCH_STATE_", "JOB_STATE_")
            error = raw.get("error")
            output = (meta.get("output") or {}).get("responsesFile") or (raw.get("response") or {}).get("responsesFile")
            name, counts = raw.get("name"), _counts(meta.get("batchStats") or {})
        return BatchState(
            id=str(name or batch_id),
            state=_STATES.get(word, "running"),
            provider_status=word,
            output_file=str(output) if output else None,
            counts=counts,
            errors=[redact(_status_text(error))] if isinstance(error, dict) else [],
        )

    def results(self, state: BatchState) -> Iterator[LineResult]:
        """Every line of the result file, streamed through a temporary file (it can be large)."""
        if state.output_file is None:
            return
        with tempfile.TemporaryDirectory(prefix="refinevla-gemini-") as folder:
            path = Path(folder) / "results.jsonl"
            self._call("downloading the results", self._client.files.download, file=state.output_file, destination=path)
            with path.open("rb") as fh:
                for raw in fh:
                    line = _line(raw, self.model)
                    if line is not None:
                        yield line

    def cancel(self, batch_id: str) -> None:
        self._call("cancelling the batch", self._client.batches.cancel, name=batch_id)

    def close(self) -> None:
        if self._client_ is not None:
            self._client_.close()
            self._client_ = None

    # ----------------------------------------------------------------- the SDK
    @property
    def _client(self) -> genai.Client:
        if self._client_ is None:
            try:
                from google import genai
                from google.genai import types
            except ImportError:
                raise RefineError(
                    "--batch with --teacher gemini needs the google-genai package: pip install 'google-genai>=2.21'"
                ) from None
            key = getattr(self.teacher, "_api_key", None)
            if not key:
                raise RefineError(f"--teacher gemini --batch needs an API key in the environment variable {KEY_ENV}")
            options = types.HttpOptions(
                base_url=self.base_url,
                api_version=API_VERSION,
                timeout=TIMEOUT_MS,
                retry_options=types.HttpRetryOptions(attempts=ATTEMPTS),
            )
            # vertexai=False: GOOGLE_GENAI_USE_VERTEXAI in the environment must not send the key elsewhere.
            self._client_ = genai.Client(api_key=key, vertexai=False, http_options=options)
        return self._client_

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """`fn(...)`, its failures as one line: TeacherAuthError for a refused key, else RefineError."""
        from google.genai import errors

        try:
            return fn(*args, **kwargs)
        except errors.APIError as exc:
            summary = _short(f"HTTP {exc.code} {exc.status or ''}: {exc.message or exc}")
            # Google answers a bad key with 400 API_KEY_INVALID; a 403 is a key without access, unless it is
            # the Files API's way of saying a file does not exist ("...or it may not exist").
            refused = exc.code == 401 or (exc.code == 403 and "may not exist" not in summary)
            if refused or "API_KEY_INVALID" in str(exc.details) or "API key not valid" in summary:
                raise TeacherAuthError(
                    redact(f"the Gemini API refused the API key while {what} ({summary}); check {KEY_ENV}")
                ) from None
            raise RefineError(redact(f"Gemini Batch API: {what} failed: {summary}")) from None
        except _transport_errors() as exc:
            raise RefineError(
                redact(f"Gemini Batch API: {what} failed: cannot reach the server ({type(exc).__name__}: {exc})")
            ) from None

    def _operation(self, batch_id: str) -> dict[str, Any] | None:
        """The batch's Operation as the API sends it, read through the SDK's (private) transport: the
        SDK's BatchJob drops its `error` and `batchStats` for Gemini. None where that call is gone."""
        request = getattr(getattr(self._client, "_api_client", None), "request", None)
        if request is None:
            return None
        response = self._call("reading the batch", request, "get", batch_id, {}, None)
        body = getattr(response, "body", None)
        try:
            raw = json.loads(body or "{}") if isinstance(body, str | bytes | None) else None
        except ValueError:
            raise RefineError(f"Gemini Batch API: reading the batch answered no JSON: {_short(str(body))}") from None
        return raw if isinstance(raw, dict) else None


def _parts(content: Any, blobs: list[bytes] | None) -> list[dict[str, Any]]:
    """Gemini `parts` from an OpenAI chat message's content (a string, or text and image_url parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append({"inlineData": _inline_data(part["image_url"]["url"], blobs)})
        else:
            raise RefineError(f"a {kind!r} message part has no Gemini batch equivalent")
    return parts


def _inline_data(url: str, blobs: list[bytes] | None) -> dict[str, str]:
    """`{"mimeType", "data"}` from a base64 data: URL; the base64 kept as it is (never decoded)."""
    header, comma, data = url.partition(",")
    if not (comma and header.startswith("data:") and header.endswith(";base64")):
        raise RefineError(f"batch mode sends images inline: {url[:40]!r}... is not a base64 data: URL")
    mime = header[len("data:") :].split(";")[0]
    if blobs is not None:
        whole = spliceable_url_json(url)  # '"data:<mime>;base64,<data>"' when it can be spliced verbatim
        if whole is not None:
            blobs.append(b'"' + whole[len(header) + 2 :])
            return {"mimeType": mime, "data": BLOB_MARK}
    return {"mimeType": mime, "data": data}


def _line(raw: bytes, model: str) -> LineResult | None:
    """One result line; None for a blank or unreadable line (its key then has no result)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
        return None
    key = obj["key"]
    response = obj.get("response")
    if isinstance(response, dict) and response:
        return LineResult(key, _response(response, model))
    problem = obj.get("error") or obj.get("status")
    if isinstance(problem, dict):
        return LineResult(key, None, error=redact(_status_text(problem)), status=_http_status(problem))
    return LineResult(key, None, error=redact(f"no response: {_short(str(problem or obj))}"))


def _response(body: dict[str, Any], model: str) -> TeacherResponse:
    """A GenerateContentResponse -> TeacherResponse; thinking tokens count as output (Gemini bills them so)."""
    usage = body.get("usageMetadata") or {}
    prompt = int(usage.get("promptTokenCount") or 0)
    completion = int(usage.get("candidatesTokenCount") or 0) + int(usage.get("thoughtsTokenCount") or 0)
    answered = str(body.get("modelVersion") or model)
    candidates = body.get("candidates") or []
    if not candidates:  # the prompt itself was blocked
        reason = (body.get("promptFeedback") or {}).get("blockReason")
        blocked = f"prompt_blocked_{str(reason).lower()}" if reason else "no_candidates"
        return TeacherResponse("", blocked, prompt, completion, answered)
    candidate = candidates[0]
    parts = (candidate.get("content") or {}).get("parts") or []
    text = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and not p.get("thought"))
    reason = candidate.get("finishReason")
    finish = _FINISH.get(reason, str(reason).lower()) if reason else None
    return TeacherResponse(text, finish, prompt, completion, answered)


def _http_status(status: dict[str, Any]) -> int | None:
    """The HTTP status of a google.rpc.Status (whose code is a gRPC code; an HTTP one is kept)."""
    code = status.get("code")
    if not isinstance(code, int):
        return None
    return _GRPC_HTTP.get(code) if code < 100 else code


def _status_text(status: dict[str, Any]) -> str:
    """A google.rpc.Status as one line: "HTTP 400 INVALID_ARGUMENT: message"."""
    http = _http_status(status)
    head = " ".join(str(p) for p in ("HTTP" if http else "code", http or status.get("code"), status.get("status")) if p)
    return _short(f"{head}: {status.get('message') or 'no message'}")


def _counts(stats: dict[str, Any]) -> dict[str, int]:
    """batchStats (int64 counts, sent as strings) as total / completed / failed / pending."""
    fields = {
        "total": "requestCount",
        "completed": "successfulRequestCount",
        "failed": "failedRequestCount",
        "pending": "pendingRequestCount",
    }
    return {name: int(stats[field]) for name, field in fields.items() if str(stats.get(field, "")).isdigit()}


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP libraries' connection and timeout errors (google-genai uses httpx or httpx2)."""
    found: list[type[BaseException]] = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found) or (OSError,)
