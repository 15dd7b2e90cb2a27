"""OpenAI batch mode's provider against a fake Files + Batch API, through the real `openai` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from refinevla.annotate.batch.emulator.openai_api import FakeOpenAIBatch, FakeOpenAIBatchProcess, Fault, chat_completion
from refinevla.annotate.batch.openai import BatchAPIError, BatchConnectionError, OpenAIBatch
from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.sources import open_source
from refinevla.annotate.store import ResultStore
from refinevla.annotate.teacher_requests import teacher_request
from refinevla.annotate.teachers.base import TeacherAuthError, TeacherRequest
from refinevla.annotate.teachers.openai_compat import OpenAICompatTeacher

SECRET = "sk-refinevla-test-SECRET-7f3a9c"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIBatch]:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAIBatch(api_key=SECRET) as server:
        yield server


def make_provider(base_url: str, **options: Any) -> OpenAIBatch:
    teacher = OpenAICompatTeacher.for_provider("openai", base_url=base_url)
    return OpenAIBatch(teacher, retry_delay=0.0, **options)


@pytest.fixture
def provider(fake: FakeOpenAIBatch) -> Iterator[OpenAIBatch]:
    p = make_provider(fake.base_url)
    yield p
    p.close()


@pytest.fixture
def requests(tiny_rlds: Any, tmp_path: Path, provider: OpenAIBatch) -> list[TeacherRequest]:
    """Four requests built the way the engine builds them (real prompts with keyframes and the schema)."""
    engine = Engine(provider.teacher, ResultStore(tmp_path / "s.sqlite"), EngineOptions())
    out = []
    for episode in open_source(tiny_rlds(4)).iter_episodes():
        prepared = engine.prepare(episode)
        out.append(teacher_request(prepared, list(prepared.bundle.messages), 1))
    return out


def submit(provider: OpenAIBatch, requests: list[TeacherRequest], tmp_path: Path, tag: str) -> str:
    path = tmp_path / f"{tag}.input.jsonl"
    path.write_bytes(b"".join(provider.request_line(r.key, r) + b"\n" for r in requests))
    return provider.create(provider.upload(path, tag), tag)


def poll(provider: OpenAIBatch, batch_id: str, limit: int = 20) -> list[tuple[str, str]]:
    """(state, provider status) of each `get` until the batch is final."""
    seen = []
    for _ in range(limit):
        state = provider.get(batch_id)
        seen.append((state.state, state.provider_status))
        if state.final:
            return seen
    raise AssertionError(f"not final after {limit} polls: {seen}")


def test_request_line_is_one_jsonl_line_around_the_live_body_bytes(provider, requests):
    request = requests[0]
    body = provider.teacher.encode(request)
    line = provider.request_line(request.key, request)
    assert b"\n" not in line
    assert line.endswith(b',"body":' + body + b"}")  # spliced as bytes, not re-serialised
    parsed = json.loads(line)
    assert parsed == {"custom_id": request.key, "method": "POST", "url": "/v1/chat/completions", "body": parsed["body"]}
    assert parsed["body"] == json.loads(body) == provider.teacher.request_body(request)
    assert parsed["body"]["model"] == "gpt-4.1-mini" and "max_completion_tokens" in parsed["body"]


def test_an_uploaded_file_is_found_again_by_its_tag_across_pages(fake, provider, tmp_path):
    fake.page_size = 2
    ids = {}
    for i in range(5):
        path = tmp_path / f"in{i}.jsonl"
        path.write_bytes(f'{{"n": {i}}}\n'.encode())
        ids[f"run1-b{i}"] = provider.upload(path, f"run1-b{i}")
        assert fake.content(ids[f"run1-b{i}"]) == path.read_bytes()
    assert all(
        fake.files[i]["purpose"] == "batch" and fake.files[i]["filename"] == f"{t}.jsonl" for t, i in ids.items()
    )
    lists_before = sum(r.method == "GET" and r.path.startswith("/v1/files?") for r in fake.requests)
    assert provider.find_file("run1-b0") == ids["run1-b0"]  # the oldest: on the last page
    assert {t: provider.find_file(t) for t in ids} == ids
    assert provider.find_file("run1-b9") is None
    assert provider.find_file("run1-b") is None  # names are matched whole
    lists = [r.path for r in fake.requests if r.method == "GET" and r.path.startswith("/v1/files?")]
    assert len(lists) - lists_before >= 3 + 3 and all("purpose=batch" in p for p in lists)


def test_a_batch_is_created_over_its_file_and_found_again_by_its_tag(fake, provider, requests, tmp_path):
    fake.page_size = 1
    first = submit(provider, requests[:2], tmp_path, "run1-b0")
    second = submit(provider, requests[2:], tmp_path, "run1-b1")
    batch = fake.batches[first]
    assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    assert batch["metadata"] == {"refinevla_tag": "run1-b0"}
    assert fake.submitted == [r.key for r in requests]
    assert provider.find_batch("run1-b0") == first  # the older one: on page 2
    assert provider.find_batch("run1-b1") == second
    assert provider.find_batch("run2-b0") is None


def test_get_maps_validating_in_progress_finalizing_to_pending_running_completed(fake, provider, requests, tmp_path):
    fake.validating_polls, fake.in_progress_polls, fake.finalizing_polls = 2, 2, 1
    batch_id = submit(provider, requests, tmp_path, "run1-b0")
    assert poll(provider, batch_id) == [
        ("pending", "validating"),
        ("pending", "validating"),
        ("running", "in_progress"),
        ("running", "in_progress"),
        ("running", "finalizing"),
        ("completed", "completed"),
    ]
    state = provider.get(batch_id)
    assert state.counts == {"total": 4, "completed": 4, "failed": 0}
    assert state.output_file and state.error_file is None and state.errors == []
    results = list(provider.results(state))
    assert [r.key for r in results] == [r.key for r in requests]
    assert all(r.error is None and json.loads(r.response.text) == {"custom_id": r.key} for r in results)
    assert results[0].response.prompt_tokens == 1000 and results[0].response.finish_reason == "stop"


def test_results_give_the_answers_and_each_failed_lines_reason(fake, provider, requests, tmp_path):
    keys = [r.key for r in requests]
    outcomes: dict[str, Any] = {
        keys[0]: chat_completion('{"ok": 1}', completion_tokens=7),
        keys[1]: (500, "The server had an error processing your request."),
        keys[2]: (400, "Invalid image data"),
        keys[3]: {"object": "chat.completion", "choices": []},  # HTTP 200, but no answer in it
    }
    fake.answer = lambda custom_id, body: outcomes[custom_id]
    batch_id = submit(provider, requests, tmp_path, "run1-b0")
    poll(provider, batch_id)
    state = provider.get(batch_id)
    assert state.state == "completed" and state.counts == {"total": 4, "completed": 2, "failed": 2}
    results = {r.key: r for r in provider.results(state)}
    assert results[keys[0]].response.text == '{"ok": 1}' and results[keys[0]].response.completion_tokens == 7
    assert results[keys[1]].response is None
    assert results[keys[1]].error == "HTTP 500: The server had an error processing your request."
    assert results[keys[2]].error == "HTTP 400: Invalid image data"
    assert results[keys[3]].response is None and "malformed response body" in results[keys[3]].error


def test_an_expired_batch_gives_the_lines_that_finished_and_the_rest_as_expired(fake, provider, requests, tmp_path):
    fake.expire_after_lines = 2
    batch_id = submit(provider, requests, tmp_path, "run1-b0")
    assert poll(provider, batch_id)[-1] == ("expired", "expired")
    state = provider.get(batch_id)
    results = list(provider.results(state))
    assert [r.key for r in results] == [r.key for r in requests]
    assert all(r.response is not None for r in results[:2])
    assert all(r.response is None and r.error.startswith("batch_expired: ") for r in results[2:])
    assert fake.answered == [r.key for r in requests[:2]]


def test_a_failed_batch_reports_why(fake, provider, requests, tmp_path):
    fake.fail_batch = "Enqueued token limit reached for gpt-4.1-mini"
    batch_id = submit(provider, requests[:2], tmp_path, "run1-b0")
    assert poll(provider, batch_id) == [("pending", "validating"), ("failed", "failed")]
    state = provider.get(batch_id)
    assert state.errors == ["batch_failed: Enqueued token limit reached for gpt-4.1-mini"]
    assert list(provider.results(state)) == [] and fake.answered == []

    # an input file breaking the Batch API's rules fails the same way, naming the line
    fake.fail_batch = None
    path = tmp_path / "dup.jsonl"
    line = provider.request_line("same-key", requests[0])
    path.write_bytes(line + b"\n" + line + b"\n")
    batch_id = provider.create(provider.upload(path, "run1-b1"), "run1-b1")
    poll(provider, batch_id)
    assert provider.get(batch_id).errors == [
        "duplicate_custom_id: The custom_id for this request is a duplicate. (line 2)"
    ]


def test_cancel_stops_a_running_batch_and_leaves_a_finished_one_alone(fake, provider, requests, tmp_path):
    fake.in_progress_polls = 5
    running = submit(provider, requests[:2], tmp_path, "run1-b0")
    assert provider.get(running).state == "pending"
    provider.cancel(running)
    assert provider.get(running).state == "cancelled"
    results = list(provider.results(provider.get(running)))
    assert [r.error.split(":")[0] for r in results] == ["batch_cancelled"] * 2 and fake.answered == []

    fake.in_progress_polls = 1
    done = submit(provider, requests[2:], tmp_path, "run1-b1")
    poll(provider, done)
    provider.cancel(done)  # the server says 400: nothing to cancel, and that is fine
    assert provider.get(done).state == "completed"


def test_a_refused_key_is_an_auth_error_naming_the_variable_never_the_key(fake, provider, tmp_path):
    fake.api_key = "sk-the-right-key"  # the fake echoes the refused key in its message, whole
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"{}\n")
    calls = [
        lambda: provider.upload(path, "run1-b0"),
        lambda: provider.find_file("run1-b0"),
        lambda: provider.create("file-x", "run1-b0"),
        lambda: provider.get("batch_x"),
    ]
    for call in calls:
        with pytest.raises(TeacherAuthError) as info:
            call()
        message = str(info.value)
        assert "HTTP 401" in message and "OPENAI_API_KEY" in message and SECRET not in message
        assert "\n" not in message and "***" in message


def test_the_key_travels_only_in_the_authorization_header(fake, provider, requests, tmp_path):
    fake.answer = lambda custom_id, body: (
        (500, f"upstream refused key {SECRET}") if custom_id == requests[0].key else chat_completion("{}")
    )
    batch_id = submit(provider, requests, tmp_path, "run1-b0")
    poll(provider, batch_id)
    results = list(provider.results(provider.get(batch_id)))
    assert fake.leaks(SECRET) == []
    assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in fake.requests)
    assert SECRET not in results[-1].error and "***" in results[-1].error  # server text is redacted
    assert provider.find_file("run1-b0") and SECRET not in repr(provider.get(batch_id))


def test_a_lost_response_creates_nothing_twice(fake, provider, requests, tmp_path):
    fake.fail_next("POST", "/v1/files", status=0)  # uploaded, but the response never arrives
    fake.fail_next("POST", "/v1/batches", status=0)  # created, ditto
    batch_id = submit(provider, requests, tmp_path, "run1-b0")
    assert list(fake.files) == [fake.batches[batch_id]["input_file_id"]] and list(fake.batches) == [batch_id]

    fake.fail_next("POST", "/v1/batches", status=503)  # refused before creating: tried again
    second = submit(provider, requests[:1], tmp_path, "run1-b1")
    assert len(fake.batches) == 2 and provider.find_batch("run1-b1") == second
    assert fake.submitted == [r.key for r in requests] + [requests[0].key]


def test_a_client_error_is_reported_once_and_not_retried(fake, provider, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"{}\n")
    file_id = provider.upload(path, "run1-b0")
    fake.fail_next("POST", "/v1/batches", status=400, message="Invalid 'metadata'")
    with pytest.raises(BatchAPIError) as info:
        provider.create(file_id, "run1-b0")
    assert info.value.status == 400 and not info.value.transient
    assert str(info.value) == "the openai Batch API failed creating the batch run1-b0 (HTTP 400: Invalid 'metadata')"
    assert sum(r.method == "POST" and r.path == "/v1/batches" for r in fake.requests) == 1
    with pytest.raises(BatchAPIError, match="HTTP 404"):
        provider.get("batch_unknown")


def test_an_unreachable_server_is_named_in_one_line(fake):
    fake.stop()
    provider = make_provider(fake.base_url, max_retries=0)
    with pytest.raises(BatchConnectionError) as info:
        provider.find_batch("run1-b0")
    assert fake.base_url in str(info.value) and info.value.transient and "\n" not in str(info.value)
    assert str(info.value).endswith(": connection refused"), str(info.value)  # not the client's "timeout"


def test_a_download_cut_short_is_resumed_without_repeating_lines(fake, provider, requests, tmp_path):
    batch_id = submit(provider, requests, tmp_path, "run1-b0")
    poll(provider, batch_id)
    state = provider.get(batch_id)
    fake.fail_next("GET", f"/v1/files/{state.output_file}/content", status=-1)
    assert [r.key for r in provider.results(state)] == [r.key for r in requests]
    assert sum(r.path == f"/v1/files/{state.output_file}/content" for r in fake.requests) == 2


def test_the_fake_in_another_process_keeps_its_state_across_a_kill(tmp_path, monkeypatch, requests):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    api = FakeOpenAIBatchProcess(tmp_path / "api", api_key=SECRET, in_progress_polls=2, expire_after_lines=3)
    with api as server:
        provider = make_provider(server.base_url)
        batch_id = submit(provider, requests, tmp_path, "run1-b0")
        assert provider.get(batch_id).state == "pending"
        provider.close()
        server.kill()  # kill -9: everything it knew is on disk
        server.set(expire_after_lines=None)  # controls apply to batches created later
        server.start()
        provider = make_provider(server.base_url)
        assert provider.find_batch("run1-b0") == batch_id and provider.find_file("run1-b0")
        assert [s for s, _ in poll(provider, batch_id)] == ["running", "running", "expired"]
        results = list(provider.results(provider.get(batch_id)))
        assert [r.response is not None for r in results] == [True, True, True, False]

        server.set(faults=[Fault("POST", "/v1/batches", status=0)])  # the next creation's response is lost
        again = submit(provider, requests[3:], tmp_path, "run1-b1")
        provider.close()
        records = server.records()
        assert list(records.batches) == [batch_id, again]
        assert records.submitted == [r.key for r in requests] + [requests[3].key]
        assert records.answered == records.submitted[:3] and records.leaks(SECRET) == []
