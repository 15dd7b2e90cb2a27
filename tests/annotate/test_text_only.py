"""`annotate --frames 0`: a text-only prompt, for a teacher without vision (or vLLM's CPU build).

No image part is sent, the prompt says so and asks for no boxes, the request key depends on no
frame, and an answer with boxes is re-asked (there is no keyframe they could be in). The same runs
against the real vLLM engine and server in `tests/vllm_cpu/`.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from refinevla.annotate.batch.emulator.answers import rationale_for_prompt
from refinevla.annotate.cli import app
from refinevla.annotate.prompts import FrameOptions, build_prompt, episode_facts, frame_choice, load_template
from refinevla.annotate.sources import open_source
from refinevla.annotate.teacher_requests import episode_request_key
from refinevla.annotate.teachers.rule_based import RuleBasedTeacher
from refinevla.schemas import SemanticContext, semantic_errors, teacher_schema

TEXT_ONLY = ("--frames", "0", "--teacher", "openai-compatible", "--model", "m")


def annotate(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["annotate", *args, "--progress", "none"])


def without_boxes(recorded) -> dict:  # type: ignore[no-untyped-def]
    """A correct answer for the prompt's episode, with no objects (nothing to put a box on)."""
    return {**rationale_for_prompt(recorded.user_text()), "objects": None}


def test_frames_0_sends_no_image_says_so_and_the_answers_validate(tiny_rlds, teacher_server, tmp_path):
    teacher_server.answer = without_boxes
    out = tmp_path / "out"
    r = annotate(tiny_rlds(3), *TEXT_ONLY, "--base-url", teacher_server.url, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert len(teacher_server.requests) == 3, "one valid answer per episode, no re-ask"
    for req in teacher_server.requests:
        system, user = req.body["messages"]
        assert [part["type"] for part in user["content"]] == ["text"], "no image part"
        assert "No images are sent with this episode." in user["content"][0]["text"]
        assert "Keyframes" not in user["content"][0]["text"]
        assert "No image of\nthe scene is sent" in system["content"]
        assert "Set objects to null" in system["content"]
        # episode detail (openai-compatible's default): the schema itself allows no box
        objects = req.body["response_format"]["json_schema"]["schema"]["properties"]["objects"]
        assert objects["type"] == ["null"]
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 3 and manifest["counts"]["rejected"] == 0
    assert manifest["frames"]["count"] == 0
    text = load_template("rationale-v1-text")
    assert manifest["prompt"] == {"template": "rationale-v1-text", "sha256": text.digest}
    episodes = pl.read_parquet(out / "episodes" / "train-00000-of-00001.parquet")
    assert episodes["objects"].to_list() == [None] * 3


def test_boxes_without_an_image_are_reasked_with_the_reason(tiny_rlds, teacher_server, tmp_path):
    """`--schema-detail static` lets a decoder write boxes; the semantic check refuses them."""

    def boxes_first(recorded) -> dict:  # type: ignore[no-untyped-def]
        answer = rationale_for_prompt(recorded.user_text())  # with a box in it
        return answer if len(recorded.body["messages"]) == 2 else {**answer, "objects": None}

    teacher_server.answer = boxes_first
    out = tmp_path / "out"
    args = ("--base-url", teacher_server.url, "--out", str(out), "--schema-detail", "static")
    r = annotate(tiny_rlds(2), *TEXT_ONLY, *args)
    assert r.exit_code == 0, r.output
    reasks = [req for req in teacher_server.requests if len(req.body["messages"]) > 2]
    assert len(reasks) == 2 and len(teacher_server.requests) == 4
    reason = reasks[0].body["messages"][-1]["content"]
    assert "objects: no image was sent, so there is nothing to put a box on" in reason
    assert json.loads((out / "refinevla.json").read_text())["counts"]["episodes"] == 2


def test_the_semantic_check_and_the_episode_schema_take_no_box_without_an_image():
    answer = rationale_for_prompt("The episode has 10 steps (0..9).\n0. steps 0..9: stop")
    no_image = SemanticContext(num_steps=10, num_segments=1, image_size=None)
    assert semantic_errors(answer, no_image) == [
        "objects: no image was sent, so there is nothing to put a box on; answer null"
    ]
    assert semantic_errors({**answer, "objects": None}, no_image) == []
    assert semantic_errors({**answer, "objects": []}, no_image) == []
    assert semantic_errors(answer, SemanticContext(10, 1, image_size=(64, 64))) == []
    schema = teacher_schema(backend="vllm", context=no_image)
    assert schema["properties"]["objects"]["type"] == ["null"] and "objects" in schema["required"]


def test_a_text_only_key_hashes_no_frame_and_ignores_the_image_options(tiny_rlds):
    episode = next(iter(open_source(tiny_rlds(1)).iter_episodes()))
    facts = episode_facts(episode)
    text = load_template("rationale-v1-text")
    teacher = RuleBasedTeacher()

    def key(frames: FrameOptions, template: str) -> str:
        choice = frame_choice(episode, facts, frames)
        return episode_request_key(episode, choice, teacher, load_template(template), "refinevla.rationale/1", "static")

    assert frame_choice(episode, facts, FrameOptions(count=0)) == {"count": 0, "camera": None, "steps": []}
    assert key(FrameOptions(count=0, max_side=128), text.version) == key(FrameOptions(count=0), text.version)
    assert key(FrameOptions(count=0), text.version) != key(FrameOptions(count=1), "rationale-v1")
    bundle = build_prompt(episode, FrameOptions(count=0), text)
    assert bundle.keyframes == [] and bundle.image_size is None
    with pytest.raises(ValueError, match="asked with images, but 0 keyframes"):
        build_prompt(episode, FrameOptions(count=0))
    with pytest.raises(ValueError, match="asked without images, but 2 keyframes"):
        build_prompt(episode, FrameOptions(count=2), text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--frames", "-1"), "--frames must be at least 0 (0: a text-only prompt)"),
        (("--frames", "0", "--prompt-template", "rationale-v1"), "is asked with images: use it with --frames 1"),
        (("--prompt-template", "rationale-v1-text"), "sends no image: use it with --frames 0"),
        (("--prompt-template", "rationale-v9"), "--prompt-template: unknown prompt template 'rationale-v9'"),
    ],
)
def test_a_template_that_does_not_fit_the_frames_is_one_line(tiny_rlds, tmp_path, args, message):
    r = annotate(tiny_rlds(1), "--out", str(tmp_path / "out"), *args)
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--teacher", "rule-based", "--vllm-args", "{}"), None),  # empty: nothing to refuse
        (("--teacher", "openai", "--vllm-args", '{"max_model_len": 512}'), "--vllm-args are for --teacher vllm"),
        (("--teacher", "vllm", "--model", "m", "--vllm-args", "max_model_len=512"), "--vllm-args: not JSON"),
        (("--teacher", "vllm", "--model", "m", "--vllm-args", "[1]"), "--vllm-args: expected a JSON object"),
    ],
)
def test_vllm_args_are_a_json_object_for_the_vllm_teacher(tiny_rlds, tmp_path, args, message):
    r = annotate(tiny_rlds(1), "--out", str(tmp_path / "out"), "--dry-run", *args)
    if message is None:
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output
