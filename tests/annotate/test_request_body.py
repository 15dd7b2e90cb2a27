"""The request body the OpenAI-compatible teacher sends is byte for byte what the `openai` client would send."""

from __future__ import annotations

import json

from openai._utils._json import openapi_dumps

from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.prompts import reask_messages
from refinevla.annotate.sources import open_source
from refinevla.annotate.store import ResultStore
from refinevla.annotate.teacher_requests import teacher_request
from refinevla.annotate.teachers import openai_compat
from refinevla.annotate.teachers.openai_compat import BLOB_MARK, OpenAICompatTeacher, encode_body


def _teacher(name: str = "openai-compatible") -> OpenAICompatTeacher:
    return OpenAICompatTeacher.for_provider(name, model="m", base_url="http://127.0.0.1:9/v1", require_key=False)


def test_body_bytes_equal_the_clients_serialiser_for_real_prompts_and_reasks(tiny_rlds, tmp_path, monkeypatch):
    serialised: list[bytes] = []
    dumps = openai_compat.compact_json
    monkeypatch.setattr(openai_compat, "compact_json", lambda value: serialised.append(dumps(value)) or serialised[-1])
    teacher = _teacher()
    engine = Engine(teacher, ResultStore(tmp_path / "s.sqlite"), EngineOptions())
    episode = next(open_source(tiny_rlds(1)).iter_episodes())
    prepared = engine.prepare(episode)
    messages = list(prepared.bundle.messages)
    images = sum(1 for part in messages[1]["content"] if part["type"] == "image_url")
    assert images >= 2
    # a re-ask carries the teacher's raw text (quotes, backslashes, non-ASCII, control characters)
    messages += reask_messages(engine.template, '{"observation": "caf\u00e9 \\"x\\"\n\t\u0001 \u2603"}', ["bad"])
    for attempt, msgs in enumerate([prepared.bundle.messages, messages], start=1):
        request = teacher_request(prepared, msgs, attempt)
        body = teacher.request_body(request)
        sent = teacher.encode(request)
        assert sent == openapi_dumps(body)
        assert json.loads(sent) == body
        # the images and the (already serialised) schema were joined in as bytes
        text = serialised[-1]
        assert b"base64," not in text and b"additionalProperties" not in text
    assert len(serialised) == 3  # two bodies without images and schema, and the schema once


def test_odd_urls_and_a_text_holding_the_marker_are_still_serialised_exactly(monkeypatch):
    serialised: list[bytes] = []
    dumps = openai_compat.compact_json
    monkeypatch.setattr(openai_compat, "compact_json", lambda value: serialised.append(dumps(value)) or serialised[-1])
    plain = "data:image/jpeg;base64," + "QUJD" * 100
    odd = [
        "data:image/png;base64,\x01" + "A" * 300,  # a control character: JSON escapes it
        "https://example.org/\u00e9" + "x" * 300,  # not ASCII
        'data:image/png;base64,"broken\\' + "A" * 300,  # a quote and a backslash
        "data:image/jpeg;base64,QUJD",  # short: not worth splicing
    ]
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": "high"}} for url in [plain, *odd]]
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "plain"}, {"role": "user", "content": parts}],
        "temperature": 0.2,
    }
    assert encode_body(body) == openapi_dumps(body)
    assert encode_body(body, {"model": b'"m"', "temperature": b"0.2"}) == openapi_dumps(body)
    assert plain.encode() not in serialised[-1] and all(
        json.dumps(u, ensure_ascii=False)[1:-1].encode() in serialised[-1] for u in odd
    )

    # a text holding the (random) marker itself: everything is serialised by JSON instead
    body["messages"][0]["content"] = BLOB_MARK
    assert encode_body(body) == openapi_dumps(body)
    assert plain.encode() in serialised[-1]
    assert encode_body({"model": "m"}) == openapi_dumps({"model": "m"})
