"""`vllm serve` + `--teacher openai-compatible` for real: vLLM's OpenAI-compatible server (CPU build) serves
the tiny model on 127.0.0.1 and `refine-data annotate` asks it exactly as it asks any server, with its
`response_format` json_schema; the server's grammar backend constrains the answers.

The server runs with compact JSON (`--structured-outputs-config '{"disable_any_whitespace": true}'`,
for the random model, see `test_local_engine`); refinevla's request is what it sends everywhere.
A refusal of the setup by the real server (images for a text-only model; a schema its grammar backend
cannot compile) stops a run in one line (`annotate/teachers/refusals.py`, matched against vLLM's real
error messages here).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from refinevla.annotate.teachers.base import TeacherConfigError, TeacherRequest
from refinevla.annotate.teachers.openai_compat import OpenAICompatTeacher
from refinevla.schemas import SemanticContext
from tests.vllm_cpu.conftest import (
    EPISODES,
    Server,
    annotate_sample,
    assert_every_answer_follows_the_schema,
    assert_settled_and_counted,
    refine_data,
)


def server_teacher(served: Server) -> tuple[str, ...]:
    return ("--teacher", "openai-compatible", "--base-url", served.base_url, "--model", served.model)


def test_the_served_model_annotates_text_only_episodes_and_a_rerun_asks_nothing(served, tiny_model, tmp_path):
    out = tmp_path / "out"
    args = annotate_sample(out, *server_teacher(served))
    first = refine_data(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = assert_settled_and_counted(out, EPISODES)
    assert manifest["teacher"]["base_url"] == served.base_url and manifest["teacher"]["model"] == served.model
    assert manifest["schema"]["request_detail"] == "episode"  # a grammar per episode: the default for a server
    import vllm  # the server's own description of itself: GET /version and the model's card in /v1/models

    window = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    assert manifest["teacher"]["server"] == {"software": "vllm", "version": vllm.__version__, "max_model_len": window}
    attempts = assert_every_answer_follows_the_schema(out)
    assert manifest["this_run"]["requests"] == len(attempts) >= EPISODES

    again = refine_data(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = assert_settled_and_counted(out, EPISODES)
    assert rerun["this_run"]["requests"] == 0, "a rerun asks nothing"
    assert rerun["teacher"] == manifest["teacher"], "and still names the server that wrote the rows"
    assert len(assert_every_answer_follows_the_schema(out)) == len(attempts)


def test_max_tokens_that_fill_the_served_context_window_stop_the_run_before_any_request(served, tiny_model, tmp_path):
    out = tmp_path / "out"
    window = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    r = refine_data(*annotate_sample(out, *server_teacher(served)), "--max-tokens", str(window))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert f"--max-tokens {window} leaves no room for the prompt" in last, r.stderr[-3000:]
    assert f"context window of {window} tokens" in last and "Traceback" not in r.stderr
    assert not (out / "refinevla.json").exists(), "nothing annotated, nothing stored"


def test_keyframes_for_a_text_only_model_stop_the_run_in_one_line(served, tmp_path):
    out = tmp_path / "out"
    r = refine_data(*annotate_sample(out, *server_teacher(served), frames=1))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "takes no images" in last and "--frames 0" in last, r.stderr[-3000:]  # vLLM's own 400, read as a setup error
    assert "Traceback" not in r.stderr
    assert not (out / "refinevla.json").exists(), "no dataset from a run the setup refused"


def test_a_schema_the_server_cannot_compile_is_a_refusal_of_the_setup(served):
    """What exists now: the live teacher raises the setup refusal for vLLM's own message (xgrammar, the
    server's backend here, compiles no `uniqueItems`); the engine stops a run on it (tests/annotate)."""
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
        "required": ["tags"],
        "additionalProperties": False,
    }
    request = TeacherRequest(
        key="k",
        episode_id="e",
        messages=[{"role": "user", "content": "List tags."}],
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}},
        facts=None,
        context=SemanticContext(num_steps=1, num_segments=1),
        attempt=1,
    )
    teacher = OpenAICompatTeacher.for_provider(
        "openai-compatible", model=served.model, base_url=served.base_url, max_tokens=32
    )

    async def ask() -> None:
        try:
            await teacher.complete(request, timeout=60)
        finally:
            await teacher.close()

    with pytest.raises(TeacherConfigError, match="cannot constrain its answers to the response schema") as err:
        asyncio.run(ask())
    assert "xgrammar" in str(err.value) and "\n" not in str(err.value)
