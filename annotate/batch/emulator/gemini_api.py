"""A fake Gemini Files + Batch API on 127.0.0.1, speaking the REST protocol `google-genai` uses with
`HttpOptions(base_url=...)` (api version v1beta).

Routes: the Files API's resumable upload (`POST /upload/v1beta/files` with `X-Goog-Upload-Command:
start` -> `X-Goog-Upload-URL`; then `upload[, finalize]` chunks to that URL, which carry no API key,
answered with `X-Goog-Upload-Status` active/final and, at the end, `{"file": File}`), `GET
/v1beta/files` (`pageSize`, `pageToken`), `GET|DELETE /v1beta/files/{id}`, `GET
/v1beta/files/{id}:download?alt=media` (generated files only), `POST
/v1beta/models/{model}:batchGenerateContent`, `GET /v1beta/batches` (`{"operations": [...]}`, newest
first), `GET|DELETE /v1beta/batches/{id}`, `POST /v1beta/batches/{id}:cancel`. A batch is an
Operation: `{"name": "batches/..", "metadata": GenerateContentBatch, "done", "response" | "error"}`,
its state a `BATCH_STATE_*` word and its result file in `metadata.output.responsesFile`. Errors are
Google's `{"error": {"code", "message", "status"}}`; a wrong key is HTTP 400 API_KEY_INVALID, as at Google.

A batch moves on one step per `GET /v1beta/batches/{id}`: `BATCH_STATE_PENDING` for `pending_polls`
gets, `BATCH_STATE_RUNNING` for `running_polls`, then final. At that point every line of its input
file is answered by `answer(key, request)`: a GenerateContentResponse (`gemini_response`), a dict
with an `error` or `status` (written as the line as it is), or `(http_status, message)` (a failed line,
`{"key", "error": google.rpc.Status}` with the gRPC code). A line whose request Gemini would refuse
(unknown field, bad role, bad base64, both response schemas...) is an INVALID_ARGUMENT line; an input
file that is not JSONL of `{"key", "request"}` fails the batch. Result lines are written in reverse
order (Gemini promises none). `expire_batch=True` ends batches in BATCH_STATE_EXPIRED (no results, as
documented); `fail_batch="reason"` fails them after PENDING. Controls are read when a batch is
created (answers: when it finishes), so a test can change them between batches.

Everything is recorded: every request (method, path, headers, body) — `leaks(secret)` lists where a
key appears other than in the `x-goog-api-key` header; every key submitted (`submitted`, one entry
per line of every batch created) and every line answered with a response, i.e. billed (`answered`).

In-process: `with FakeGeminiBatch() as fake: ... GeminiBatch(teacher, base_url=fake.base_url)`. Out of
process, for tests that kill -9 a client and rerun it against the same server:

    python -m refinevla.annotate.batch.emulator.gemini_api --port 0 --state-dir D [--answer module:function] ...

(or `FakeGeminiBatchProcess(D, ...)`). The state is saved to D after every change: a test reads it
with `FakeGeminiBatch.load(D)`, a restarted server carries on where the last one stopped, and
controls are changed by writing D/controls.json (`write_controls`).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
import secrets
import string
import urllib.parse
from pathlib import Path
from typing import Any

from refinevla.annotate.batch.emulator.common import (
    NOT_JSON,
    Answer,
    FakeBatchAPI,
    FakeBatchProcess,
    Reply,
    jsonl_lines,
    serve,
)

API = "v1beta"
MAX_BYTES = 2_000_000_000  # the Batch API's documented limit per input file
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
FINAL = ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED")
CONTROLS = (
    "api_key",
    "answer",
    "pending_polls",
    "running_polls",
    "fail_batch",
    "expire_batch",
    "page_size",
    "faults",
)

# HTTP status -> (google.rpc.Code, its name)
STATUS = {
    400: (3, "INVALID_ARGUMENT"),
    401: (16, "UNAUTHENTICATED"),
    403: (7, "PERMISSION_DENIED"),
    404: (5, "NOT_FOUND"),
    409: (6, "ALREADY_EXISTS"),
    429: (8, "RESOURCE_EXHAUSTED"),
    499: (1, "CANCELLED"),
    500: (13, "INTERNAL"),
    503: (14, "UNAVAILABLE"),
    504: (4, "DEADLINE_EXCEEDED"),
}
# What a GenerateContentRequest may hold (REST names; proto JSON also takes the snake_case ones).
REQUEST_FIELDS = {
    "model",
    "contents",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
}
PART_FIELDS = {"text", "inlineData", "fileData", "thought", "thoughtSignature", "functionCall", "functionResponse"}
GENERATION_FIELDS = {
    "temperature",
    "topP",
    "topK",
    "candidateCount",
    "maxOutputTokens",
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "responseModalities",
    "mediaResolution",
}


def gemini_response(
    text: str,
    *,
    finish_reason: str = "STOP",
    prompt_tokens: int = 1000,
    output_tokens: int = 200,
    thoughts_tokens: int = 0,
    model: str = "gemini-2.5-flash",
) -> dict[str, Any]:
    """A GenerateContentResponse whose answer is `text`."""
    usage = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens + thoughts_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
    }
    if thoughts_tokens:
        usage["thoughtsTokenCount"] = thoughts_tokens
    return {
        "candidates": [
            {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish_reason, "index": 0}
        ],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": secrets.token_urlsafe(12),
    }


def echo_answer(key: str, request: dict[str, Any]) -> dict[str, Any]:
    """The default answer: a response whose text names the request (`{"key": ...}`)."""
    return gemini_response(json.dumps({"key": key}))


def rationale_answer(key: str, request: dict[str, Any]) -> dict[str, Any]:
    """A correct rationale for the request's episode (as the live fake teacher server answers)."""
    from refinevla.annotate.batch.emulator.answers import rationale_for_prompt

    user = next(c for c in request["contents"] if c.get("role", "user") == "user")
    text = next(p["text"] for p in user["parts"] if "text" in p)
    return gemini_response(json.dumps(rationale_for_prompt(text)))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _field(obj: dict[str, Any], name: str) -> Any:
    """A field under its REST name or its proto (snake_case) name."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return obj.get(name, obj.get(snake))


def _now(offset: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _id(n: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def _error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": STATUS.get(status, (2, "UNKNOWN"))[1]}
    if details:
        error["details"] = details
    return {"error": error}


def _rpc_status(status: int, message: str) -> dict[str, Any]:
    """A google.rpc.Status (what a result line and a failed Operation carry): the gRPC code."""
    return {"code": STATUS.get(status, (2, "UNKNOWN"))[0], "message": message}


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


def request_problem(request: Any) -> str | None:
    """Why Gemini would refuse this GenerateContentRequest, in its own words (None: it would not)."""

    def unknown(name: str, where: str) -> str:
        return f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': Cannot find field."

    if not isinstance(request, dict):
        return "Invalid JSON payload received. 'request' is not an object."
    for name in request:
        if _camel(name) not in REQUEST_FIELDS:
            return unknown(name, "request")
    contents = _field(request, "contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    system = _field(request, "systemInstruction")
    turns = [(f"contents[{i}]", c) for i, c in enumerate(contents)]
    if system is not None:
        turns.append(("system_instruction", system))
    for where, content in turns:
        if not isinstance(content, dict):
            return f"Invalid value at 'request.{where}': not an object"
        for name in content:
            if name not in ("role", "parts"):
                return unknown(name, f"request.{where}")
        if where != "system_instruction" and content.get("role", "user") not in ("user", "model"):
            return f"Please use a valid role: user, model. (request.{where}.role={content.get('role')!r})"
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty."
        for j, part in enumerate(parts):
            for name in part:
                if _camel(name) not in PART_FIELDS:
                    return unknown(name, f"request.{where}.parts[{j}]")
            data = _field(part, "inlineData")
            if data is not None:
                mime, blob = _field(data, "mimeType"), data.get("data")
                if not isinstance(mime, str) or not mime or not isinstance(blob, str):
                    return f"* GenerateContentRequest.{where}.parts[{j}].inline_data: mime_type and data are required"
                try:
                    base64.b64decode(blob, validate=True)
                except (binascii.Error, ValueError):
                    where = f"request.{where}.parts[{j}].inline_data.data"
                    return f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed"
    config = _field(request, "generationConfig") or {}
    for name in config:
        if _camel(name) not in GENERATION_FIELDS:
            return unknown(name, "request.generation_config")
    if _field(config, "responseSchema") is not None and _field(config, "responseJsonSchema") is not None:
        return "response_schema and response_json_schema cannot both be set"
    schema = _field(config, "responseJsonSchema")
    if schema is not None and not isinstance(schema, dict):
        return "Invalid value at 'request.generation_config.response_json_schema': not an object"
    return None


class FakeGeminiBatch(FakeBatchAPI):
    """The fake API's state and behaviour; `start()` (or `with`) serves it on 127.0.0.1 from a thread."""

    CONTROLS = CONTROLS
    KEY_HEADER = ("x-goog-api-key", "{}")
    JSON_TYPE = "application/json; charset=UTF-8"

    def __init__(
        self,
        *,
        api_key: str | None = None,  # the key accepted; None: any non-empty key
        answer: Answer | str = echo_answer,  # how each line is answered (or "module:function")
        pending_polls: int = 1,  # gets a new batch stays BATCH_STATE_PENDING
        running_polls: int = 1,  # then BATCH_STATE_RUNNING
        fail_batch: str | None = None,  # fail after PENDING, with this reason
        expire_batch: bool = False,  # end in BATCH_STATE_EXPIRED (no results) instead of succeeding
        page_size: int | None = None,  # the most items a list page holds (forces pagination)
        state_dir: Path | str | None = None,  # where the state is saved (and loaded from, if there)
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.pending_polls = pending_polls
        self.running_polls = running_polls
        self.fail_batch = fail_batch
        self.expire_batch = expire_batch
        self._sessions: dict[str, dict[str, Any]] = {}  # upload id -> file metadata, declared size, bytes so far
        super().__init__(api_key=api_key, answer=answer, page_size=page_size, state_dir=state_dir, host=host, port=port)

    def operation(self, batch: str) -> dict[str, Any]:
        """The Operation `GET /v1beta/{batch}` would answer (without moving the batch on)."""
        with self._lock:
            return self._operation(batch)

    # ------------------------------------------------------------- the API
    def _respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        url = urllib.parse.urlsplit(path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            if not _is_chunk(path):  # an upload URL is its own credential (the SDK sends no key with chunks)
                self._authenticate(headers, query)
            return self._route(method, url.path, query, headers, body)
        except ApiError as exc:
            return Reply(exc.status, _error(exc.status, exc.message, exc.details))

    def _error_body(self, status: int, message: str) -> dict[str, Any]:
        return _error(status, message)

    def _headers(self, path: str) -> dict[str, str]:
        return {"X-Goog-Upload-Status": "final"} if _is_chunk(path) else {}  # so the SDK does not retry a chunk

    def _fault_message(self, status: int) -> str:
        return STATUS.get(status, (2, "the fake's fault"))[1].lower().replace("_", " ")

    def _input_file(self, batch: dict[str, Any]) -> str:
        return str(batch["inputConfig"]["fileName"])

    def _is_upload(self, file: dict[str, Any]) -> bool:
        return file.get("source") == "UPLOADED"

    def _authenticate(self, headers: dict[str, str], query: dict[str, str]) -> None:
        given = headers.get("x-goog-api-key") or query.get("key")
        if not given:
            raise ApiError(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if self.api_key is not None and given != self.api_key:
            info = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
            raise ApiError(400, "API key not valid. Please pass a valid API key.", [info])

    def _route(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes) -> Reply:
        parts = path.strip("/").split("/")
        if parts[:3] == ["upload", API, "files"] and len(parts) == 3 and method == "POST":
            if "upload_id" in query:
                return self._upload_chunk(query["upload_id"], headers, body)
            return self._upload_start(headers, body)
        if parts[:1] != [API] or len(parts) < 2:
            raise ApiError(404, f"The requested URL {path} was not found on this server.")
        route, rest = parts[1], parts[2:]
        if route == "files" and not rest and method == "GET":
            items = list(reversed(self.files.values()))
            return Reply(200, self._page(items, "files", query, default=10))
        if route == "files" and len(rest) == 1:
            name, _, verb = rest[0].partition(":")
            file = self._file(f"files/{name}")
            if verb == "download" and method == "GET":
                if query.get("alt") != "media":
                    raise ApiError(400, "download needs alt=media")
                if file.get("source") != "GENERATED":
                    raise ApiError(400, "Only generated files can be downloaded.")
                return Reply(200, self.content(file["name"]))
            if not verb and method == "GET":
                return Reply(200, file)
            if not verb and method == "DELETE":
                self._delete_file(file["name"])
                return Reply(200, {})
        if route == "models" and len(rest) == 1 and rest[0].endswith(":batchGenerateContent") and method == "POST":
            return Reply(200, self._create_batch(rest[0].removesuffix(":batchGenerateContent"), body))
        if route == "batches" and not rest and method == "GET":
            items = [self._operation(name) for name in reversed(self.batches)]  # newest first
            return Reply(200, self._page(items, "operations", query, default=50))
        if route == "batches" and len(rest) == 1:
            name, _, verb = rest[0].partition(":")
            batch = f"batches/{name}"
            if batch not in self.batches:
                raise ApiError(404, f"Batch {batch} not found.")
            if not verb and method == "GET":
                return Reply(200, self._get(batch))
            if verb == "cancel" and method == "POST":
                return Reply(200, self._cancel(batch))
            if not verb and method == "DELETE":
                del self.batches[batch]
                self._save()
                return Reply(200, {})
        raise ApiError(404, f"The requested URL {path} was not found on this server ({method}).")

    def _page(self, items: list[dict[str, Any]], field: str, query: dict[str, str], default: int) -> dict[str, Any]:
        size = min(max(int(query.get("pageSize", default)), 1), 100, self.page_size or 100)
        start = int(query.get("pageToken") or 0)
        page: dict[str, Any] = {field: items[start : start + size]}
        if start + size < len(items):
            page["nextPageToken"] = str(start + size)
        return page

    def _file(self, name: str) -> dict[str, Any]:
        if name not in self.files:
            raise ApiError(403, f"You do not have permission to access the File {name} or it may not exist.")
        return self.files[name]

    def _new_file(self, name: str, display_name: str | None, mime: str, data: bytes, source: str) -> dict[str, Any]:
        file = {
            "name": name,
            "mimeType": mime,
            "sizeBytes": str(len(data)),
            "createTime": _now(),
            "updateTime": _now(),
            "expirationTime": _now(48 * 3600),
            "sha256Hash": base64.b64encode(hashlib.sha256(data).hexdigest().encode()).decode(),
            "uri": f"{self.base_url}/{API}/{name}",
            "state": "ACTIVE",
            "source": source,
        }
        if display_name:
            file["displayName"] = display_name
        if source == "GENERATED":
            file["downloadUri"] = f"{self.base_url}/download/{API}/{name}:download?alt=media"
        self.files[name] = file
        self._store_file(name, data)
        return file

    def _upload_start(self, headers: dict[str, str], body: bytes) -> Reply:
        if headers.get("x-goog-upload-protocol") != "resumable" or headers.get("x-goog-upload-command") != "start":
            raise ApiError(400, "Only the resumable upload protocol is supported by this fake.")
        try:
            size = int(headers["x-goog-upload-header-content-length"])
            meta = (json.loads(body) if body else {}).get("file") or {}
        except (KeyError, ValueError) as exc:
            raise ApiError(400, f"bad upload start: {exc}") from None
        if size > MAX_BYTES:
            raise ApiError(400, f"The file is larger than {MAX_BYTES} bytes.")
        mime = _field(meta, "mimeType") or headers.get("x-goog-upload-header-content-type") or ""
        upload_id = secrets.token_urlsafe(24)
        self._sessions[upload_id] = {
            "display_name": _field(meta, "displayName"),
            "name": meta.get("name"),
            "mime": mime,
            "size": size,
            "data": bytearray(),
        }
        url = f"{self.base_url}/upload/{API}/files?upload_id={upload_id}&upload_protocol=resumable"
        return Reply(200, b"", {"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})

    def _upload_chunk(self, upload_id: str, headers: dict[str, str], body: bytes) -> Reply:
        session = self._sessions.get(upload_id)
        if session is None:
            raise ApiError(404, "No such upload session.")
        command = [c.strip() for c in headers.get("x-goog-upload-command", "").split(",")]
        if int(headers.get("x-goog-upload-offset", -1)) != len(session["data"]):
            raise ApiError(400, f"Upload offset must be {len(session['data'])}.")
        if "upload" in command:
            session["data"] += body
        if "finalize" not in command:
            return Reply(200, b"", {"X-Goog-Upload-Status": "active"})
        del self._sessions[upload_id]
        data = bytes(session["data"])
        if len(data) != session["size"]:
            raise ApiError(400, f"The upload has {len(data)} bytes, {session['size']} were declared.")
        name = session["name"] or f"files/{_id(12)}"
        file = self._new_file(name, session["display_name"], session["mime"], data, "UPLOADED")
        self._save()
        return Reply(200, {"file": file}, {"X-Goog-Upload-Status": "final"})

    def _create_batch(self, model: str, body: bytes) -> dict[str, Any]:
        try:
            batch_in = json.loads(body)["batch"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, "Invalid JSON payload received: no 'batch'.") from None
        display_name = _field(batch_in, "displayName")
        if not display_name:
            raise ApiError(400, "* GenerateContentBatch.display_name: display_name is required")
        input_config = _field(batch_in, "inputConfig") or {}
        file_name = _field(input_config, "fileName")
        if not file_name:
            raise ApiError(400, "* GenerateContentBatch.input_config: a file_name or requests is required")
        file = self._file(file_name)
        if file.get("source") != "UPLOADED":
            raise ApiError(400, f"{file_name} is not an uploaded file.")
        lines, problems = self._parse_input(self.content(file_name))
        name = f"batches/{_id(36)}"
        batch = {
            "@type": BATCH_TYPE,
            "model": f"models/{model}",
            "displayName": display_name,
            "inputConfig": {"fileName": file_name},
            "createTime": _now(),
            "updateTime": _now(),
            "batchStats": {"requestCount": str(len(lines)), "pendingRequestCount": str(len(lines))},
            "state": "BATCH_STATE_PENDING",
            "name": name,
        }
        self.batches[name] = batch
        self._runs[name] = {
            "polls": 0,
            "problems": problems,
            "fail": self.fail_batch,
            "expire": self.expire_batch,
            "pending_polls": self.pending_polls,
            "running_polls": self.running_polls,
            "error": None,
        }
        self.submitted += [str(line["key"]) for line in lines]
        self._save()
        return self._operation(name)

    def _parse_input(self, data: bytes) -> tuple[list[dict[str, Any]], list[str]]:
        """The input file's lines, and what makes the whole file unreadable (empty if nothing)."""
        lines: list[dict[str, Any]] = []
        problems: list[str] = []
        for number, line in jsonl_lines(data):
            if line is NOT_JSON:
                problems.append(f"line {number}: not valid JSON")
                continue
            if not isinstance(line, dict) or not isinstance(line.get("key"), str) or "request" not in line:
                problems.append(f"line {number}: expected an object with 'key' and 'request'")
                continue
            lines.append(line)
        if not lines and not problems:
            problems.append("the input file is empty")
        return lines, problems

    def _operation(self, name: str) -> dict[str, Any]:
        batch, run = self.batches[name], self._runs[name]
        operation: dict[str, Any] = {"name": name, "metadata": batch}
        if batch["state"] in FINAL:
            operation["done"] = True
        if batch["state"] == "BATCH_STATE_SUCCEEDED":
            operation["response"] = {"@type": OUTPUT_TYPE, "responsesFile": batch["output"]["responsesFile"]}
        if run["error"] is not None:
            operation["error"] = run["error"]
        return operation

    def _get(self, name: str) -> dict[str, Any]:
        batch, run = self.batches[name], self._runs[name]
        if batch["state"] not in FINAL:
            run["polls"] += 1
            polls, pending, running = run["polls"], run["pending_polls"], run["running_polls"]
            if polls <= pending:
                pass
            elif run["problems"] or run["fail"]:
                reason = run["fail"] or "Invalid input file: " + "; ".join(run["problems"][:5])
                self._end(name, "BATCH_STATE_FAILED", error=_rpc_status(400 if run["problems"] else 500, reason))
            elif polls <= pending + running:
                batch.update(state="BATCH_STATE_RUNNING", updateTime=_now())
            elif run["expire"]:
                self._end(name, "BATCH_STATE_EXPIRED")
            else:
                self._finish(name)
            self._save()
        return self._operation(name)

    def _end(self, name: str, state: str, error: dict[str, Any] | None = None) -> None:
        batch = self.batches[name]
        batch.update(state=state, updateTime=_now(), endTime=_now())
        self._runs[name]["error"] = error

    def _finish(self, name: str) -> None:
        """Answer every line and write the result file."""
        out: list[dict[str, Any]] = []
        ok = failed = 0
        for line in self.batch_lines(name):
            key, request = line["key"], line["request"]
            problem = request_problem(request)
            result: dict[str, Any] | tuple[int, str] = (400, problem) if problem else self._answer(key, request)
            if isinstance(result, tuple):
                out.append({"key": key, "error": _rpc_status(*result)})
                failed += 1
            elif "error" in result or "status" in result:
                out.append({"key": key, **result})
                failed += 1
            else:
                out.append({"key": key, "response": result})
                self.answered.append(key)
                ok += 1
        data = b"".join(json.dumps(o).encode() + b"\n" for o in reversed(out))
        results = self._new_file(
            f"files/batch-{name.removeprefix('batches/')}", None, "application/jsonl", data, "GENERATED"
        )
        batch = self.batches[name]
        batch["output"] = {"responsesFile": results["name"]}
        batch["batchStats"] = {
            "requestCount": str(ok + failed),
            "successfulRequestCount": str(ok),
            "failedRequestCount": str(failed),
        }
        self._end(name, "BATCH_STATE_SUCCEEDED")

    def _cancel(self, name: str) -> dict[str, Any]:
        if self.batches[name]["state"] in FINAL:
            raise ApiError(400, f"Batch {name} is already in a final state and cannot be cancelled.")
        self._end(name, "BATCH_STATE_CANCELLED", error=_rpc_status(499, "The batch was cancelled."))
        self._save()
        return {}


def _is_chunk(path: str) -> bool:
    """Whether `path` is an upload URL (a chunk of a resumable upload)."""
    url = urllib.parse.urlsplit(path)
    return url.path.startswith("/upload/") and "upload_id" in urllib.parse.parse_qs(url.query)


write_controls = FakeGeminiBatch.write_controls


class FakeGeminiBatchProcess(FakeBatchProcess[FakeGeminiBatch]):
    """FakeGeminiBatch served by another process on `state_dir` (see `FakeBatchProcess`), e.g. `FakeGeminiBatchProcess(
    tmp_path / "api", api_key=KEY, answer="refinevla.annotate.batch.emulator.gemini_api:rationale_answer")`."""

    FAKE = FakeGeminiBatch


def main(argv: list[str] | None = None) -> None:
    numbers = ("pending_polls", "running_polls")
    serve(
        FakeGeminiBatch,
        argv,
        "A fake Gemini Files + Batch API (for tests).",
        numbers=numbers,
        switches=("expire_batch",),
    )


if __name__ == "__main__":
    main()
