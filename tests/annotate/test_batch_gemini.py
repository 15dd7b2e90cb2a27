"""The Gemini Batch provider, driven through the real `google-genai` client against a local fake of the API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from refinevla.annotate.batch import gemini
from refinevla.annotate.batch.emulator.gemini_api import (
    FakeGeminiBatch,
    FakeGeminiBatchProcess,
    gemini_response,
    request_problem,
)
from refinevla.annotate.batch.gemini import GeminiBatch
from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.errors import RefineError
from refinevla.annotate.prompts import reask_messages
from refinevla.annotate.sources import open_source
from refinevla.annotate.store import ResultStore
from refinevla.annotate.teacher_requests import teacher_request
from refinevla.annotate.teachers.base import TeacherAuthError, TeacherRequest
from refinevla.annotate.teachers.openai_compat import OpenAICompatTeacher

SECRET = "AIza-test-GEMINI-SECRET-4242"
MODEL = "gemini-2.5-flash"


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> OpenAICompatTeacher:
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    return OpenAICompatTeacher.for_provider("gemini", model=MODEL, temperature=0.3, max_tokens=2048)


@pytest.fixture
def requests(teacher: OpenAICompatTeacher, tiny_rlds: Callable[..., str], tmp_path: Path) -> list[TeacherRequest]:
    """Three first asks built by the engine, as batch mode builds them, and a re-ask of the first."""
    engine = Engine(teacher, ResultStore(tmp_path / "s.sqlite"), EngineOptions())
    prepared = [engine.prepare(e) for e in open_source(tiny_rlds(3)).iter_episodes()]
    asks = [teacher_request(p, p.bundle.messages, 1) for p in prepared]
    raw = '{"observation": "caf\u00e9 \\"x\\"\n"}'
    reask = [*prepared[0].bundle.messages, *reask_messages(engine.template, raw, ["spatial_reasoning is missing"])]
    return [*asks, teacher_request(prepared[0], reask, 2)]


@pytest.fixture
def fake() -> Iterator[FakeGeminiBatch]:
    with FakeGeminiBatch(api_key=SECRET) as server:
        yield server


@pytest.fixture
def provider(teacher: OpenAICompatTeacher, fake: FakeGeminiBatch) -> Iterator[GeminiBatch]:
    batch = GeminiBatch(teacher, base_url=fake.base_url)
    yield batch
    batch.close()


def _write(tmp_path: Path, provider: GeminiBatch, requests: list[TeacherRequest], name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(provider.request_line(f"k{i}", r) + b"\n" for i, r in enumerate(requests)))
    return path


def _run(provider: GeminiBatch, path: Path, tag: str) -> str:
    return provider.create(provider.upload(path, tag), tag)


def _finish(provider: GeminiBatch, batch: str) -> Any:
    for _ in range(10):
        state = provider.get(batch)
        if state.final:
            return state
    raise AssertionError("the batch never finished")


def test_request_line_is_the_native_request_for_the_chat_messages(provider, requests, teacher):
    first, reask = requests[0], requests[-1]
    line = json.loads(provider.request_line("key-1", first))
    assert line["key"] == "key-1" and set(line) == {"key", "request"}
    body = line["request"]
    system, user = first.messages
    assert body["systemInstruction"] == {"parts": [{"text": system["content"]}]}
    assert len(body["contents"]) == 1 and body["contents"][0]["role"] == "user"
    parts = body["contents"][0]["parts"]
    assert parts[0] == {"text": user["content"][0]["text"]}
    images = [p["image_url"]["url"] for p in user["content"] if p["type"] == "image_url"]
    assert len(images) >= 2 and len(parts) == 1 + len(images)
    for part, url in zip(parts[1:], images, strict=True):
        header, data = url.split(",", 1)
        assert header == "data:image/jpeg;base64"
        assert part == {"inlineData": {"mimeType": "image/jpeg", "data": data}}  # the base64 as it was
    assert body["generationConfig"] == {
        "temperature": 0.3,
        "maxOutputTokens": 2048,
        "responseMimeType": "application/json",
        "responseJsonSchema": first.response_format["json_schema"]["schema"],
    }
    schema = body["generationConfig"]["responseJsonSchema"]
    assert schema["additionalProperties"] is False and "task_plan" in schema["properties"]

    # a re-ask: the teacher's answer as a model turn, then the errors as a user turn
    contents = json.loads(provider.request_line("key-1", reask))["request"]["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    assert contents[0] == body["contents"][0]
    assert contents[1]["parts"] == [{"text": reask.messages[2]["content"]}]
    assert contents[2]["parts"] == [{"text": reask.messages[3]["content"]}]
    assert "spatial_reasoning is missing" in contents[2]["parts"][0]["text"]
    # what Gemini would accept (the fake checks field names, roles, base64)
    assert request_problem(body) is None and request_problem({"contents": contents}) is None


def test_request_line_splices_keyframes_and_schema_as_the_bytes_json_would_write(provider, requests, monkeypatch):
    serialised: list[bytes] = []
    dumps = gemini.compact_json
    monkeypatch.setattr(gemini, "compact_json", lambda value: serialised.append(dumps(value)) or serialised[-1])
    for i, request in enumerate(requests):
        line = provider.request_line(f"k{i}", request)
        assert line == dumps({"key": f"k{i}", "request": provider.request_body(request)})
        assert b"\n" not in line
        text = serialised[-1]  # the line without images and schema
        assert b"base64" not in text and b"/9j/" not in text and b"additionalProperties" not in text
    assert len(serialised) == len(requests) + 1  # the run's (static) schema was serialised once


def test_a_non_data_url_image_is_a_clear_error(provider, requests):
    request = requests[0]
    messages = [
        request.messages[0],
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]},
    ]
    with pytest.raises(RefineError, match="base64 data: URL"):
        provider.request_line("k", TeacherRequest(**{**request.__dict__, "messages": messages}))


def test_upload_then_find_file_by_tag(provider, fake, requests, tmp_path):
    fake.page_size = 1  # the files are found across pages
    path = _write(tmp_path, provider, requests)
    first = provider.upload(path, "refinevla-run1-1")
    other = provider.upload(_write(tmp_path, provider, requests[:1], "b.jsonl"), "refinevla-run1-2")
    assert first.startswith("files/") and first != other
    assert fake.content(first) == path.read_bytes()
    assert fake.files[first]["displayName"] == "refinevla-run1-1"
    assert provider.find_file("refinevla-run1-1") == first
    assert provider.find_file("refinevla-run1-2") == other
    assert provider.find_file("refinevla-run2-1") is None
    start = next(r for r in fake.requests if r.path == "/upload/v1beta/files")
    assert start.headers["x-goog-upload-protocol"] == "resumable"
    assert start.headers["x-goog-upload-header-content-length"] == str(path.stat().st_size)


def test_create_then_find_batch_by_tag(provider, fake, requests, tmp_path):
    fake.page_size = 1
    path = _write(tmp_path, provider, requests)
    batch = _run(provider, path, "refinevla-run1-1")
    second = _run(provider, path, "refinevla-run1-2")
    assert batch.startswith("batches/") and batch != second
    created = next(r for r in fake.requests if r.path.endswith(":batchGenerateContent"))
    assert created.path == f"/v1beta/models/{MODEL}:batchGenerateContent"
    assert fake.batches[batch]["displayName"] == "refinevla-run1-1"
    assert provider.find_batch("refinevla-run1-1") == batch
    assert provider.find_batch("refinevla-run1-2") == second
    assert provider.find_batch("refinevla-other-1") is None
    assert fake.submitted == ["k0", "k1", "k2", "k3"] * 2


def test_get_follows_pending_running_succeeded_with_counts(provider, fake, requests, tmp_path):
    fake.pending_polls, fake.running_polls = 2, 1
    batch = _run(provider, _write(tmp_path, provider, requests), "t")
    seen = [provider.get(batch) for _ in range(4)]
    assert [s.state for s in seen] == ["pending", "pending", "running", "completed"]
    assert [s.provider_status for s in seen] == [
        "JOB_STATE_PENDING",
        "JOB_STATE_PENDING",
        "JOB_STATE_RUNNING",
        "JOB_STATE_SUCCEEDED",
    ]
    assert seen[0].counts == {"total": 4, "pending": 4} and not seen[0].final
    done = seen[-1]
    assert done.final and done.id == batch and done.errors == []
    assert done.output_file == f"files/batch-{batch.removeprefix('batches/')}"
    assert done.counts == {"total": 4, "completed": 4, "failed": 0}


def test_results_carry_answers_line_errors_truncation_and_thinking_tokens(provider, fake, requests, tmp_path):
    def answer(key: str, request: dict[str, Any]) -> Any:
        return {
            "k0": gemini_response('{"ok": 1}', prompt_tokens=1500, output_tokens=300, thoughts_tokens=700),
            "k1": gemini_response('{"ok": ', finish_reason="MAX_TOKENS", output_tokens=2048),
            "k2": (400, "Request contains an invalid argument."),
            "k3": {"status": {"code": 8, "message": "Resource has been exhausted"}},
        }[key]

    fake.answer = answer
    state = _finish(provider, _run(provider, _write(tmp_path, provider, requests), "t"))
    lines = {line.key: line for line in provider.results(state)}
    assert sorted(lines) == ["k0", "k1", "k2", "k3"]  # the file lists them in reverse order
    good = lines["k0"].response
    assert good is not None and lines["k0"].error is None
    assert (good.text, good.finish_reason, good.model) == ('{"ok": 1}', "stop", MODEL)
    assert (good.prompt_tokens, good.completion_tokens) == (1500, 300 + 700)  # thoughts are billed as output
    cut = lines["k1"].response
    assert cut is not None and cut.finish_reason == "length" and cut.text == '{"ok": '
    bad = lines["k2"]
    assert bad.response is None and bad.status == 400
    assert bad.error is not None and bad.error.startswith("HTTP 400") and "invalid argument" in bad.error
    busy = lines["k3"]
    assert busy.response is None and busy.status == 429 and "exhausted" in (busy.error or "")
    assert fake.answered == ["k0", "k1"]


def test_other_finish_reasons_and_a_blocked_prompt_are_not_answers(provider, fake, requests, tmp_path):
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 900}}
    fake.answer = lambda key, request: blocked if key == "k0" else gemini_response("", finish_reason="SAFETY")
    state = _finish(provider, _run(provider, _write(tmp_path, provider, requests[:2]), "t"))
    lines = {line.key: line.response for line in provider.results(state)}
    assert lines["k0"] is not None and lines["k0"].finish_reason == "prompt_blocked_safety"
    assert lines["k0"].prompt_tokens == 900 and lines["k0"].text == ""
    assert lines["k1"] is not None and lines["k1"].finish_reason == "safety"


def test_a_request_gemini_refuses_is_a_400_line(provider, fake, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"key": "bad", "request": {"contents": [{"parts": [{"txt": "hi"}]}]}}) + "\n")
    state = _finish(provider, _run(provider, path, "t"))
    [line] = provider.results(state)
    assert (line.key, line.response, line.status) == ("bad", None, 400)
    assert 'Unknown name "txt"' in (line.error or "")


def test_an_expired_batch_has_no_results(provider, fake, requests, tmp_path):
    fake.expire_batch = True
    state = _finish(provider, _run(provider, _write(tmp_path, provider, requests), "t"))
    assert (state.state, state.provider_status, state.output_file) == ("expired", "JOB_STATE_EXPIRED", None)
    assert list(provider.results(state)) == []


def test_a_failed_batch_says_why(provider, fake, requests, tmp_path):
    fake.fail_batch = "the input file could not be processed"
    state = _finish(provider, _run(provider, _write(tmp_path, provider, requests), "t"))
    assert state.state == "failed" and state.output_file is None
    assert state.errors == ["HTTP 500: the input file could not be processed"]


def test_cancel(provider, fake, requests, tmp_path):
    batch = _run(provider, _write(tmp_path, provider, requests), "t")
    assert provider.get(batch).state == "pending"
    provider.cancel(batch)
    state = provider.get(batch)
    assert (state.state, state.provider_status) == ("cancelled", "JOB_STATE_CANCELLED")
    assert list(provider.results(state)) == []
    with pytest.raises(RefineError, match="cancelling the batch failed: HTTP 400"):
        provider.cancel(batch)


def test_a_refused_key_is_an_auth_error_naming_the_variable_not_the_key(teacher, requests, tmp_path, monkeypatch):
    with FakeGeminiBatch(api_key="AIza-the-right-one") as fake:
        provider = GeminiBatch(teacher, base_url=fake.base_url)
        path = _write(tmp_path, provider, requests)
        for call in (
            lambda: provider.upload(path, "t"),
            lambda: provider.find_batch("t"),
            lambda: provider.get("batches/x"),
        ):
            with pytest.raises(TeacherAuthError) as caught:
                call()
            message = str(caught.value)
            assert "GEMINI_API_KEY" in message and "API key not valid" in message and SECRET not in message
        assert fake.files == {} and fake.batches == {}


def test_the_key_goes_only_into_the_api_key_header(provider, fake, requests, tmp_path):
    # a server echoing the key back in a line's error: the error is redacted
    fake.answer = lambda key, request: (400, f"bad request from {SECRET}") if key == "k0" else gemini_response("{}")
    path = _write(tmp_path, provider, requests)
    batch = _run(provider, path, "t")
    assert provider.find_file("t") and provider.find_batch("t") == batch
    lines = {line.key: line for line in provider.results(_finish(provider, batch))}
    assert len(lines) == len(requests) and lines["k0"].error == "HTTP 400: bad request from ***"
    provider.close()
    assert SECRET.encode() not in path.read_bytes()
    assert fake.leaks(SECRET) == []
    keyed = [r for r in fake.requests if "upload_id" not in r.path]  # upload chunks carry no key at all
    assert keyed and all(r.headers["x-goog-api-key"] == SECRET for r in keyed)
    with pytest.raises(RefineError) as caught:  # an error names no key either
        GeminiBatch(provider.teacher, base_url=fake.base_url).get("batches/missing")
    assert "HTTP 404" in str(caught.value) and SECRET not in str(caught.value)


def test_create_is_never_retried_but_reads_are(provider, fake, requests, tmp_path):
    file_id = provider.upload(_write(tmp_path, provider, requests), "t")
    fake.fail_next("POST", "/v1beta/models/", 503)
    with pytest.raises(RefineError, match="creating the batch failed: HTTP 503"):
        provider.create(file_id, "t")
    assert sum(r.path.endswith(":batchGenerateContent") for r in fake.requests) == 1  # a retry could pay twice
    assert provider.find_batch("t") is None
    batch = provider.create(file_id, "t")
    fake.fail_next("GET", f"/v1beta/{batch}", 503)
    assert provider.get(batch).state == "pending"  # the SDK retried the 503


def test_a_create_answer_lost_on_the_way_back_is_found_by_its_tag(provider, fake, requests, tmp_path):
    file_id = provider.upload(_write(tmp_path, provider, requests), "refinevla-run-7")
    fake.fail_next("POST", "/v1beta/models/", 0)  # created, then the connection drops before the answer
    with pytest.raises(RefineError, match="creating the batch failed: cannot reach the server"):
        provider.create(file_id, "refinevla-run-7")
    [created] = fake.batches
    assert provider.find_file("refinevla-run-7") == file_id  # what the rerun does before creating again
    assert provider.find_batch("refinevla-run-7") == created
    assert len(fake.batches) == 1 and fake.submitted == ["k0", "k1", "k2", "k3"]


def test_without_the_sdks_private_transport_get_still_reads_state_and_results(provider, fake, requests, tmp_path):
    provider._operation = lambda batch_id: None  # as if a new google-genai had moved it
    batch = _run(provider, _write(tmp_path, provider, requests), "t")
    seen = [provider.get(batch) for _ in range(3)]
    assert [s.state for s in seen] == ["pending", "running", "completed"]
    assert seen[-1].counts == {} and seen[-1].output_file == f"files/batch-{batch.removeprefix('batches/')}"
    assert sorted(line.key for line in provider.results(seen[-1])) == ["k0", "k1", "k2", "k3"]


def test_a_missing_sdk_is_one_line_with_the_install_command(teacher, monkeypatch):
    monkeypatch.setitem(sys.modules, "google.genai", None)
    with pytest.raises(RefineError, match=r"pip install 'google-genai>=2\.21'"):
        GeminiBatch(teacher, base_url="http://127.0.0.1:9").get("batches/x")


def test_out_of_process_fake_keeps_its_state_across_a_restart(teacher, requests, tmp_path):
    with FakeGeminiBatchProcess(tmp_path / "api", api_key=SECRET, pending_polls=1, running_polls=0) as server:
        provider = GeminiBatch(teacher, base_url=server.base_url)
        batch = _run(provider, _write(tmp_path, provider, requests), "refinevla-x-1")
        provider.close()
        server.kill()
        server.start()  # a new process, on a new port, on the same state
        again = GeminiBatch(teacher, base_url=server.base_url)
        assert again.find_batch("refinevla-x-1") == batch
        server.set(answer="refinevla.annotate.batch.emulator.gemini_api:echo_answer")
        state = _finish(again, batch)
        keys = sorted(line.key for line in again.results(state))
        again.close()
        records = server.records()
    assert keys == ["k0", "k1", "k2", "k3"]
    assert records.submitted == keys and sorted(records.answered) == keys
    assert records.leaks(SECRET) == []
