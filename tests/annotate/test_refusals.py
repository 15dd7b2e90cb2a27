"""Refusals (HTTP 400) of the run's setup stop the run and settle nothing; refusals of one episode reject it;
`--retry-rejected` asks the store's rejects again. Live mode against the fake OpenAI-compatible server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.annotate.teachers.refusals import (
    is_episode_refusal,
    refusal_signature,
    setup_refusal,
)

MODEL = "fake-model"


def annotate(uri: str, url: str, out: Path, *extra: str) -> Any:
    args = ["annotate", uri, "--teacher", "openai-compatible", "--base-url", url, "--model", MODEL]
    args += ["--out", str(out), "--progress", "none", "--license", "mit", *extra]
    return CliRunner().invoke(app, args)


def stored(out: Path) -> dict[str, dict[str, str]]:
    """seed -> reason of each stored reject, and seed -> "answered" of each stored answer."""
    db = out / ".refine" / "store.sqlite"
    if not db.exists():
        return {"answers": {}, "rejects": {}}
    with sqlite3.connect(db) as conn:
        answers = {e.rsplit("#", 1)[-1]: "answered" for (e,) in conn.execute("SELECT episode_id FROM answers")}
        rejects = {e.rsplit("#", 1)[-1]: r for e, r in conn.execute("SELECT episode_id, reason FROM rejects")}
    return {"answers": answers, "rejects": rejects}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def asked(server: Any) -> dict[int | None, int]:
    return {seed: len(requests) for seed, requests in server.by_seed().items()}


# ----------------------------------------------------------------------------- the classification


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (400, "Qwen/Qwen2.5-0.5B-Instruct is not a multimodal model", "no-images"),
        (400, "Invalid content type. image_url is only supported by certain models.", "no-images"),
        (400, "At most 1 image(s) may be provided in one request.", "too-many-images"),
        (400, "The provided JSON schema contains features not supported by xgrammar.", "schema"),
        (400, "The JSON schema is nested too deeply (max depth 32).", "schema"),
        (
            400,
            "Invalid schema for response_format 'rationale': In context=(), 'additionalProperties' is required",
            "schema",
        ),
        (400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.", "schema"),
        (
            400,
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens'.",
            "request-shape",
        ),
        (
            400,
            'Invalid JSON payload received. Unknown name "max_completion_tokens": Cannot find field.',
            "request-shape",
        ),
        (422, "Extra inputs are not permitted", "request-shape"),
        (400, "prompt too long: 9000 tokens for episode 3", None),
        (400, "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens", None),
        (400, "bad request: invalid image", None),
        (404, "Qwen is not a multimodal model", None),  # only a 400/422 is judged a setup refusal
    ],
)
def test_setup_refusals_are_named_by_their_message(status: int, message: str, kind: str | None) -> None:
    found = setup_refusal(status, message)
    assert (found.name if found else None) == kind


def test_a_refusal_signature_blanks_what_differs_per_request() -> None:
    a = refusal_signature(400, "request req-000012 rejected by the gateway policy")
    assert a == refusal_signature(400, "Request  req-000013 rejected by the gateway policy")
    assert a != refusal_signature(422, "request req-000012 rejected by the gateway policy")
    assert is_episode_refusal("prompt too long: 9000 tokens for episode 3")
    assert is_episode_refusal("Your request was flagged by our content policy")
    assert not is_episode_refusal("request req-000012 rejected by the gateway policy")


# ----------------------------------------------------------------------------- refusals of the setup


@pytest.mark.parametrize(
    ("behaviour", "cause", "fix"),
    [
        ("not-multimodal", "takes no images", "serve a vision-language model"),
        ("uncompilable-schema", "cannot constrain its answers to the response schema", "--schema-detail static"),
    ],
)
def test_a_refusal_of_the_setup_stops_the_run_in_one_line_and_settles_nothing(
    tiny_rlds, teacher_server, tmp_path, behaviour, cause, fix
):
    uri = tiny_rlds(8)
    out = tmp_path / "out"
    teacher_server.default = behaviour
    r = annotate(uri, teacher_server.url, out, "--concurrency", "2")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    (line,) = error_lines(r.output)
    assert f"the model '{MODEL}' at {teacher_server.url} {cause}" in line and fix in line, line
    assert "HTTP 400" in line  # the server's own words
    assert len(teacher_server.requests) <= 3  # the first refusal stops it (plus what was in flight)
    assert stored(out) == {"answers": {}, "rejects": {}}
    assert not (out / "refinevla.json").exists()
    # the setup fixed, the same command asks every episode
    teacher_server.default = "ok"
    again = annotate(uri, teacher_server.url, out)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "refinevla.json").read_text())["counts"]["episodes"] == 8


def test_the_same_unknown_refusal_for_n_episodes_stops_the_run_at_the_nth(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(6)
    out = tmp_path / "out"
    teacher_server.default = "refused-alike"  # the same message but for a request id
    r = annotate(uri, teacher_server.url, out, "--concurrency", "1")
    assert r.exit_code == 1, r.output
    (line,) = error_lines(r.output)
    assert "refused 3 episodes in a row alike" in line and "rejected by the gateway policy" in line, line
    assert "--refusals-to-stop 0" in line
    assert len(teacher_server.requests) == 3  # one at a time: the third refusal stops it
    assert stored(out) == {"answers": {}, "rejects": {}}  # the two held before it were not stored either
    # --refusals-to-stop 0: the user says they are refusals of the episodes; each is rejected
    teacher_server.requests.clear()
    r = annotate(uri, teacher_server.url, out, "--refusals-to-stop", "0")
    assert r.exit_code == 0, r.output
    assert len(stored(out)["rejects"]) == 6 and len(teacher_server.requests) == 6


def test_a_refusal_that_names_the_episode_rejects_it_however_often_it_repeats(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(5)
    out = tmp_path / "out"
    teacher_server.default = "too-long"  # "prompt too long: 900N tokens for episode N", every episode
    r = annotate(uri, teacher_server.url, out, "--concurrency", "1")
    assert r.exit_code == 0, r.output
    rejects = stored(out)["rejects"]
    assert set(rejects) == {"0", "1", "2", "3", "4"}
    assert rejects["3"] == "the teacher refused the request: HTTP 400: prompt too long: 9003 tokens for episode 3"


def test_refusals_held_in_a_streak_an_answer_breaks_become_rejects(tiny_rlds, teacher_server, tmp_path):
    """One at a time: 0 ok, 1 and 2 refused alike (held), 3 answered (1 and 2 are rejected), 4 ok, 5 refused
    (held; the run's end rejects it)."""
    uri = tiny_rlds(6)
    out = tmp_path / "out"
    teacher_server.scripts = {1: ["refused-alike"], 2: ["refused-alike"], 5: ["refused-alike"]}
    r = annotate(uri, teacher_server.url, out, "--concurrency", "1")
    assert r.exit_code == 0, r.output
    s = stored(out)
    assert set(s["rejects"]) == {"1", "2", "5"} and set(s["answers"]) == {"0", "3", "4"}
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["rejected"] == 3 and manifest["counts"]["episodes"] == 3


# ----------------------------------------------------------------------------- --retry-rejected


def test_retry_rejected_asks_the_refused_episodes_again_and_nothing_answered(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(5)
    out = tmp_path / "out"
    teacher_server.scripts = {1: ["too-long"], 3: ["too-long"]}  # refused one by one: rejects (as before the fix)
    assert annotate(uri, teacher_server.url, out).exit_code == 0
    assert set(stored(out)["rejects"]) == {"1", "3"}
    teacher_server.requests.clear()
    # without the flag a rerun asks nothing: the rejects are settled
    again = annotate(uri, teacher_server.url, out)
    assert again.exit_code == 0 and teacher_server.requests == [], again.output
    # with it, the refused ones are asked again; 1 fails for this run (500s) and keeps its reject
    teacher_server.scripts = {1: ["500", "500"]}
    r = annotate(uri, teacher_server.url, out, "--retry-rejected", "--max-retries", "1", "--retry-base", "0.01")
    assert r.exit_code == 1, r.output  # an episode failed after retries: rerun to retry it
    assert asked(teacher_server) == {1: 2, 3: 1}  # never the answered ones
    s = stored(out)
    assert set(s["rejects"]) == {"1"} and set(s["answers"]) == {"0", "2", "3", "4"}
    teacher_server.requests.clear()
    r = annotate(uri, teacher_server.url, out, "--retry-rejected")
    assert r.exit_code == 0, r.output
    assert asked(teacher_server) == {1: 1}
    assert stored(out)["rejects"] == {} and len(stored(out)["answers"]) == 5
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 5 and manifest["counts"]["rejected"] == 0
    assert (out / ".refine" / "rejects.jsonl").read_text() == ""


def test_retry_rejected_goes_on_with_invalid_answers_only_when_more_attempts_are_allowed(
    tiny_rlds, teacher_server, tmp_path
):
    uri = tiny_rlds(3)
    out = tmp_path / "out"
    teacher_server.scripts = {2: ["schema", "schema"]}
    assert annotate(uri, teacher_server.url, out, "--max-attempts", "2").exit_code == 0
    assert stored(out)["rejects"]["2"].startswith("invalid after 2 attempt(s)")
    teacher_server.requests.clear()
    # the same --max-attempts: both answers it allows were received (and paid for); nothing is asked
    r = annotate(uri, teacher_server.url, out, "--max-attempts", "2", "--retry-rejected")
    assert r.exit_code == 0 and teacher_server.requests == [], r.output
    # one more attempt allowed: the third answer is asked with the two stored ones and their errors
    r = annotate(uri, teacher_server.url, out, "--max-attempts", "3", "--retry-rejected")
    assert r.exit_code == 0, r.output
    (request,) = teacher_server.requests
    roles = [m["role"] for m in request.body["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "spatial_reasoning" in json.dumps(request.body["messages"][-1])
    assert stored(out)["rejects"] == {} and set(stored(out)["answers"]) == {"0", "1", "2"}
