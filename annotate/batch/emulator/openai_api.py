"""A fake OpenAI Files + Batch API on 127.0.0.1, speaking the wire protocol the real `openai` client uses.

Routes: `POST /v1/files` (multipart: file + purpose), `GET /v1/files` (`purpose`, `order`, `after`,
`limit`; `has_more`), `GET|DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`, `POST /v1/batches`,
`GET /v1/batches` (newest first, `after`, `limit`), `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`.

A batch moves on one step per *retrieve* (`GET /v1/batches/{id}`): `validating` for `validating_polls`
retrieves, then `in_progress` for `in_progress_polls`, `finalizing` for `finalizing_polls`, then
final. At that point every line of its input file is answered by `answer(custom_id, body)`: a
chat.completion body (HTTP 200, in the output file) or `(status, message)` (a failed line, in the
error file). `expire_after_lines=N` makes the batch expire with only its first N lines answered (the
rest are `batch_expired` lines in the error file); `fail_batch="reason"` makes it fail after
validating, with that reason in `errors`. An input file that breaks the Batch API's rules (bad JSON,
duplicate custom_id, wrong url, two models, ...) fails the same way, with the line numbers. Controls
are read when a batch is created (answers: when it finishes), so a test can change them between batches.

Everything is recorded: every request (method, path, headers, body) so a test can check the API key
appears in no other place than the Authorization header (`leaks`); every custom_id submitted
(`submitted`, one entry per line of every batch created) and every one answered with HTTP 200, i.e.
billed (`answered`); the files and batches.

In-process: `with FakeOpenAIBatch() as fake: ... fake.base_url` (ends in /v1). Out of process, for
tests that kill -9 a client and rerun it against the same server:

    python -m refinevla.annotate.batch.emulator.openai_api --port 0 --state-dir D [--answer module:function] ...

(or `FakeOpenAIBatchProcess(D, ...)`). The state is saved to D after every change, so the test reads
it with `FakeOpenAIBatch.load(D)` and a restarted server carries on where the last one stopped;
controls are changed by writing D/controls.json (`write_controls`), re-read when it changes.
"""

from __future__ import annotations

import email.message
import json
import secrets
import time
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
    resolve_answer,
    serve,
)
from refinevla.annotate.batch.emulator.common import Fault as Fault  # re-exported: what tests arm `faults` with

ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
MAX_LINES = 50_000  # the Batch API's documented limits per input file
MAX_BYTES = 200 * 1000 * 1000
FINAL = ("completed", "failed", "expired", "cancelled")
CONTROLS = (
    "api_key",
    "answer",
    "validating_polls",
    "in_progress_polls",
    "finalizing_polls",
    "expire_after_lines",
    "fail_batch",
    "page_size",
    "faults",
    "create_delay_ms",
)


def chat_completion(
    text: str,
    *,
    model: str = "gpt-4.1-mini",
    prompt_tokens: int = 1000,
    completion_tokens: int = 200,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    """A valid chat.completion body whose answer is `text`."""
    return {
        "id": f"chatcmpl-{secrets.token_hex(8)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }


def echo_answer(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The default answer: a completion whose text names the request (`{"custom_id": ...}`)."""
    return chat_completion(json.dumps({"custom_id": custom_id}), model=str(body.get("model") or "gpt-4.1-mini"))


def rationale_answer(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A correct rationale for the request's episode (as the live fake teacher server answers)."""
    from refinevla.annotate.batch.emulator.answers import rationale_for_prompt

    user = next(m for m in body["messages"] if m["role"] == "user" and isinstance(m["content"], list))
    text = next(p["text"] for p in user["content"] if p["type"] == "text")
    return chat_completion(json.dumps(rationale_for_prompt(text)), model=str(body.get("model") or "gpt-4.1-mini"))


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    start = 0
    if after:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    data = items[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(items),
    }


def _error(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename or None, bytes)."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        raise ApiError(400, "multipart body without a boundary")
    # Every delimiter but the first is preceded by CRLF, which belongs to it, not to the part's data.
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary.encode())
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in parts[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(400, "malformed multipart part")
        headers = email.message.Message()
        for line in head.decode("utf-8").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        field_name = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        if not isinstance(field_name, str):
            raise ApiError(400, "multipart part without a name")
        fields[field_name] = (filename, data)
    return fields


class FakeOpenAIBatch(FakeBatchAPI):
    """The fake API's state and behaviour; `start()` (or `with`) serves it on 127.0.0.1 from a thread."""

    CONTROLS = CONTROLS
    BASE_PATH = "/v1"
    KEY_HEADER = ("authorization", "Bearer {}")

    def __init__(
        self,
        *,
        api_key: str | None = None,  # the key accepted; None: any non-empty bearer token
        answer: Answer | str = echo_answer,  # how each line is answered (or "module:function")
        validating_polls: int = 1,  # retrieves a new batch stays `validating`
        in_progress_polls: int = 1,  # then `in_progress`
        finalizing_polls: int = 0,  # then `finalizing`
        expire_after_lines: int | None = None,  # expire with only the first N lines answered
        fail_batch: str | None = None,  # fail after validating, with this reason
        page_size: int | None = None,  # the most items a list page holds (forces pagination)
        create_delay_ms: int = 0,  # a created batch's answer is held back this long (a window to kill the client)
        state_dir: Path | str | None = None,  # where the state is saved (and loaded from, if there)
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.create_delay_ms = create_delay_ms
        self.live: list[str] = []  # bodies answered on /v1/chat/completions (live mode), in order (not persisted)
        self.validating_polls = validating_polls
        self.in_progress_polls = in_progress_polls
        self.finalizing_polls = finalizing_polls
        self.expire_after_lines = expire_after_lines
        self.fail_batch = fail_batch
        super().__init__(api_key=api_key, answer=answer, page_size=page_size, state_dir=state_dir, host=host, port=port)

    # ------------------------------------------------------------- the API
    def _respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        auth = headers.get("authorization", "")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not given:
            return Reply(401, _error("You didn't provide an API key.", code="invalid_api_key"))
        if self.api_key is not None and given != self.api_key:
            # Echoes the whole key (OpenAI shows part of it): proves the client redacts server text.
            return Reply(401, _error(f"Incorrect API key provided: {given}.", code="invalid_api_key"))
        try:
            return Reply(*self._route(method, path, headers, body))
        except ApiError as exc:
            return Reply(exc.status, _error(exc.message, exc.kind))

    def _error_body(self, status: int, message: str) -> dict[str, Any]:
        return _error(message, "server_error" if status >= 500 else "invalid_request_error")

    def _headers(self, path: str) -> dict[str, str]:
        return {"x-request-id": f"req_{secrets.token_hex(8)}"}

    def _input_file(self, batch: dict[str, Any]) -> str:
        return str(batch["input_file_id"])

    def _is_upload(self, file: dict[str, Any]) -> bool:
        return bool(file["purpose"] != "batch_output")

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        url = urllib.parse.urlsplit(path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = url.path.rstrip("/").split("/")[1:]  # ["v1", "files", ...]
        if parts[:1] != ["v1"] or len(parts) < 2:
            raise ApiError(404, f"Invalid URL ({method} {url.path})")
        route = (method, parts[1], len(parts))
        if route == ("POST", "files", 2):
            return 200, self._upload(headers, body)
        if route == ("GET", "files", 2):
            return 200, self._list_files(query)
        if route[:2] == ("GET", "files") and len(parts) == 3:
            return 200, self._file(parts[2])
        if route[:2] == ("DELETE", "files") and len(parts) == 3:
            self._file(parts[2])
            self._delete_file(parts[2])
            return 200, {"id": parts[2], "object": "file", "deleted": True}
        if route[:2] == ("GET", "files") and len(parts) == 4 and parts[3] == "content":
            self._file(parts[2])
            return 200, self.content(parts[2])
        if route == ("POST", "batches", 2):
            batch = self._create_batch(body)
            if self.create_delay_ms:  # the batch exists (and is saved); its id is not told yet
                time.sleep(self.create_delay_ms / 1000)
            return 200, batch
        if route == ("POST", "chat", 3) and parts[2] == "completions":
            # live mode's endpoint (for --reask live): answered at once by the same `answer`
            answer = resolve_answer(self.answer)("live", json.loads(body))
            if isinstance(answer, tuple):
                raise ApiError(answer[0], answer[1])
            self.live.append(json.dumps(json.loads(body)))
            return 200, answer
        if route == ("GET", "batches", 2):
            items = list(reversed(self.batches.values()))  # newest first
            limit = min(max(int(query.get("limit", 20)), 1), 100, self.page_size or 100)
            return 200, _page(items, query.get("after"), limit)
        if route[:2] == ("GET", "batches") and len(parts) == 3:
            return 200, self._retrieve(parts[2])
        if route[:2] == ("POST", "batches") and len(parts) == 4 and parts[3] == "cancel":
            return 200, self._cancel(parts[2])
        raise ApiError(404, f"Invalid URL ({method} {url.path})")

    def _file(self, file_id: str) -> dict[str, Any]:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}")
        return self.files[file_id]

    def _new_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{secrets.token_hex(12)}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": int(time.time()) + 30 * 86400 if purpose.startswith("batch") else None,
        }
        self.files[file_id] = obj
        self._store_file(file_id, data)
        return obj

    def _upload(self, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        fields = parse_multipart(body, headers.get("content-type", ""))
        if "file" not in fields or "purpose" not in fields:
            raise ApiError(400, "Missing required parameter: 'file' and 'purpose' are required")
        filename, data = fields["file"]
        purpose = fields["purpose"][1].decode()
        if purpose not in ("assistants", "batch", "fine-tune", "vision", "user_data", "evals"):
            raise ApiError(400, f"Invalid purpose: {purpose!r}")
        obj = self._new_file(filename or "upload", purpose, data)
        self._save()
        return obj

    def _list_files(self, query: dict[str, str]) -> dict[str, Any]:
        items = [f for f in self.files.values() if "purpose" not in query or f["purpose"] == query["purpose"]]
        if query.get("order", "desc") == "desc":
            items.reverse()
        limit = min(max(int(query.get("limit", 10_000)), 1), 10_000, self.page_size or 10_000)
        return _page(items, query.get("after"), limit)

    def _create_batch(self, body: bytes) -> dict[str, Any]:
        params = json.loads(body)
        file_id = params.get("input_file_id")
        if file_id not in self.files:
            raise ApiError(400, f"Invalid 'input_file_id': {file_id!r}: no such file")
        if self.files[file_id]["purpose"] != "batch":
            raise ApiError(400, "The input file must be uploaded with purpose 'batch'")
        if params.get("endpoint") not in ENDPOINTS:
            raise ApiError(400, f"Invalid 'endpoint': {params.get('endpoint')!r}")
        if params.get("completion_window") != "24h":
            raise ApiError(400, "Invalid 'completion_window': only '24h' is supported")
        metadata = params.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or any(not isinstance(v, str) or len(k) > 64 or len(v) > 512 for k, v in metadata.items())
        ):
            raise ApiError(400, "Invalid 'metadata': at most 16 pairs, keys <= 64 and string values <= 512 chars")
        now = int(time.time())
        batch_id = f"batch_{secrets.token_hex(12)}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": params["endpoint"],
            "model": None,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        lines, problems = self._validate(self.content(file_id), params["endpoint"])
        self.batches[batch_id] = batch
        self._runs[batch_id] = {
            "polls": 0,
            "lines": len(lines),
            "problems": problems,
            "fail": self.fail_batch,
            "expire_after_lines": self.expire_after_lines,
            "validating_polls": self.validating_polls,
            "in_progress_polls": self.in_progress_polls,
            "finalizing_polls": self.finalizing_polls,
        }
        self.submitted += [line["custom_id"] for line in lines]
        self._save()
        return batch

    def _validate(self, data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The input file's lines, and what breaks the Batch API's rules (empty if nothing)."""
        lines: list[dict[str, Any]] = []
        problems: list[dict[str, Any]] = []
        seen: set[str] = set()
        models: set[str] = set()

        def problem(code: str, message: str, line: int | None, param: str | None = None) -> None:
            problems.append({"code": code, "message": message, "param": param, "line": line})

        if len(data) > MAX_BYTES:
            problem("file_too_large", f"The input file is larger than {MAX_BYTES} bytes", None)
        for number, line in jsonl_lines(data):
            if line is NOT_JSON:
                problem("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
                problem("missing_required_parameter", "Missing 'custom_id'", number, "custom_id")
                continue
            if line["custom_id"] in seen:
                problem("duplicate_custom_id", "The custom_id for this request is a duplicate.", number, "custom_id")
            seen.add(line["custom_id"])
            if line.get("method") != "POST":
                problem("invalid_request", "Only POST is supported", number, "method")
            if line.get("url") != endpoint:
                problem("invalid_url", f"The url must match the batch endpoint {endpoint}", number, "url")
            body = line.get("body")
            if not isinstance(body, dict):
                problem("invalid_request", "'body' must be an object", number, "body")
            else:
                models.add(str(body.get("model")))
            lines.append(line)
        if len(lines) > MAX_LINES:
            problem("too_many_requests", f"The input file has more than {MAX_LINES} requests", None)
        if len(models) > 1:
            problem("mismatched_model", "All requests in a batch must use the same model", None, "body.model")
        if not lines and not problems:
            problem("empty_file", "The input file is empty", None)
        return lines, problems

    def _retrieve(self, batch_id: str) -> dict[str, Any]:
        if batch_id not in self.batches:
            raise ApiError(404, f"No batch found with id '{batch_id}'.")
        batch, run = self.batches[batch_id], self._runs[batch_id]
        if batch["status"] in FINAL:
            return batch
        now = int(time.time())
        if batch["status"] == "cancelling":
            self._finish(batch_id, "cancelled", now)
            return batch
        run["polls"] += 1
        polls, validating, in_progress = run["polls"], run["validating_polls"], run["in_progress_polls"]
        if polls <= validating:
            status = "validating"
        elif run["problems"] or run["fail"]:
            errors = run["problems"] or [{"code": "batch_failed", "message": run["fail"], "param": None, "line": None}]
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            status = "failed"
        elif polls <= validating + in_progress:
            status = "in_progress"
        elif polls <= validating + in_progress + run["finalizing_polls"]:
            status = "finalizing"
        else:
            expire = run["expire_after_lines"]
            self._finish(batch_id, "expired" if expire is not None and expire < run["lines"] else "completed", now)
            return batch
        if status in ("in_progress", "finalizing") and batch["status"] != status:
            batch.update(status=status, request_counts={"total": run["lines"], "completed": 0, "failed": 0})
            batch[f"{status}_at"] = now
        self._save()
        return batch

    def _finish(self, batch_id: str, status: str, now: int) -> None:
        """Answer the batch's lines (those it reaches) and write its output and error files."""
        batch, run = self.batches[batch_id], self._runs[batch_id]
        reached = {"completed": run["lines"], "expired": run["expire_after_lines"], "cancelled": 0}[status]
        unreached = {
            "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
            "cancelled": ("batch_cancelled", "This request was cancelled before it executed."),
        }.get(status)
        output, errors = [], []
        counts = {"total": run["lines"], "completed": 0, "failed": 0}
        lines = self.batch_lines(batch_id)
        for number, line in enumerate(lines):
            out: dict[str, Any] = {"id": f"batch_req_{secrets.token_hex(8)}", "custom_id": line["custom_id"]}
            if number >= reached and unreached is not None:
                out.update(response=None, error={"code": unreached[0], "message": unreached[1]})
                errors.append(out)
                counts["failed"] += 1
                continue
            result = self._answer(line["custom_id"], line["body"])
            request_id = f"req_{secrets.token_hex(8)}"
            if isinstance(result, tuple):
                code, message = result
                kind = "server_error" if code >= 500 else "invalid_request_error"
                out.update(response={"status_code": code, "request_id": request_id, "body": _error(message, kind)})
                out["error"] = None
                errors.append(out)
                counts["failed"] += 1
            else:
                out.update(response={"status_code": 200, "request_id": request_id, "body": result}, error=None)
                output.append(out)
                counts["completed"] += 1
                self.answered.append(line["custom_id"])
        if output:
            data = b"".join(json.dumps(o).encode() + b"\n" for o in output)
            batch["output_file_id"] = self._new_file(f"{batch_id}_output.jsonl", "batch_output", data)["id"]
        if errors:
            data = b"".join(json.dumps(o).encode() + b"\n" for o in errors)
            batch["error_file_id"] = self._new_file(f"{batch_id}_error.jsonl", "batch_output", data)["id"]
        batch.update(status=status, request_counts=counts, model=lines[0]["body"].get("model") if lines else None)
        batch[f"{status}_at"] = now
        if status in ("completed", "expired"):
            batch["finalizing_at"] = batch["finalizing_at"] or now
        self._save()

    def _cancel(self, batch_id: str) -> dict[str, Any]:
        if batch_id not in self.batches:
            raise ApiError(404, f"No batch found with id '{batch_id}'.")
        batch = self.batches[batch_id]
        if batch["status"] in FINAL:
            raise ApiError(400, f"Cannot cancel a batch with status '{batch['status']}'.")
        if batch["status"] != "cancelling":
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            self._save()
        return batch


write_controls = FakeOpenAIBatch.write_controls


class FakeOpenAIBatchProcess(FakeBatchProcess[FakeOpenAIBatch]):
    """FakeOpenAIBatch served by another process on `state_dir` (see `FakeBatchProcess`), e.g. `FakeOpenAIBatchProcess(
    tmp_path / "api", api_key=KEY, answer="refinevla.annotate.batch.emulator.openai_api:rationale_answer")`."""

    FAKE = FakeOpenAIBatch


def main(argv: list[str] | None = None) -> None:
    numbers = ("validating_polls", "in_progress_polls", "finalizing_polls", "expire_after_lines", "create_delay_ms")
    serve(FakeOpenAIBatch, argv, "A fake OpenAI Files + Batch API (for tests).", numbers=numbers)


if __name__ == "__main__":
    main()
