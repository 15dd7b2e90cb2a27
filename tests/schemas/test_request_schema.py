"""The structured-output schema sent to each backend: strict-mode rules, constraints carried, episode facts."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from refinevla.schemas import (
    BACKENDS,
    SemanticContext,
    default_detail,
    teacher_response_format,
    teacher_schema,
    validate_teacher_answer,
)
from tests.schemas import answers
from tests.schemas.openai_strict import strict_mode_problems

CTX = SemanticContext(num_steps=10, num_segments=3, image_size=(64, 48))


def good_answer() -> dict[str, Any]:
    return answers.good_answer(segments=3)


@pytest.mark.parametrize("backend", ["openai", "gemini"])
def test_static_schemas_of_strict_providers_pass_openai_strict_mode_rules(backend):
    schema = teacher_schema(backend=backend)
    assert strict_mode_problems(schema) == []
    Draft202012Validator.check_schema(schema)
    fmt = teacher_response_format(backend=backend)
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "refinevla_rationale_v1"
    assert set(schema["properties"]) == {
        "observation",
        "situation_analysis",
        "spatial_reasoning",
        "task_plan",
        "objects",
        "move_reasons",
    }
    assert schema["properties"]["objects"]["type"] == ["array", "null"], "optional became nullable"


def test_the_strict_checker_catches_what_openai_answers_with_a_400():
    schema = teacher_schema(backend="openai")
    broken = copy.deepcopy(schema)
    broken["properties"]["task_plan"]["items"]["required"].pop()
    broken["properties"]["observation"]["minLength"] = 1
    del broken["properties"]["task_plan"]["items"]["additionalProperties"]
    problems = strict_mode_problems(broken)
    assert any("every property must be required" in p for p in problems)
    assert any("'minLength' is not supported" in p for p in problems)
    assert any("additionalProperties must be false" in p for p in problems)
    assert strict_mode_problems({"anyOf": [schema]})
    deep: dict[str, Any] = {"type": "string", "description": "leaf"}
    for i in range(11):
        deep = {"type": "object", "properties": {f"p{i}": deep}, "required": [f"p{i}"], "additionalProperties": False}
    assert any("levels of nesting" in p for p in strict_mode_problems(deep))


def test_static_schemas_keep_every_constraint_of_the_file_the_backend_can_express():
    for backend in ("openai", "gemini", "vllm", "openai-compatible"):
        props = teacher_schema(backend=backend)["properties"]
        box = props["objects"]["items"]["properties"]["box"]
        assert (box["minItems"], box["maxItems"]) == (4, 4), backend
        assert props["task_plan"]["minItems"] == 1
        assert props["task_plan"]["items"]["properties"]["start_step"]["minimum"] == 0
        assert props["move_reasons"]["items"]["properties"]["segment"]["minimum"] == 0
    # String lengths only where the backend enforces them (OpenAI strict mode rejects minLength).
    assert "minLength" not in teacher_schema(backend="openai")["properties"]["observation"]
    assert teacher_schema(backend="vllm")["properties"]["observation"]["pattern"]
    assert "minItems" not in str(teacher_schema(backend="structural")), "the bare shape, as sent before"


def test_episode_schema_carries_the_step_range_segments_and_image_size():
    schema = teacher_schema(backend="vllm", context=CTX)
    Draft202012Validator.check_schema(schema)
    v = Draft202012Validator(schema)
    assert v.is_valid(good_answer())
    assert validate_teacher_answer(good_answer()) == []

    def invalid(mutate) -> bool:  # type: ignore[no-untyped-def]
        answer = good_answer()
        mutate(answer)
        return not v.is_valid(answer)

    assert invalid(lambda a: a["task_plan"][1].update(end_step=10)), "past the last step"
    assert invalid(lambda a: a["task_plan"][1].update(end_step=8)), "the last subtask must end at the last step"
    assert invalid(lambda a: a["task_plan"][0].update(start_step=1)), "the first subtask starts at 0"
    assert invalid(lambda a: a["move_reasons"].pop()), "one reason per segment"
    assert invalid(lambda a: a["move_reasons"].reverse()), "segments in order"
    assert invalid(lambda a: a["objects"][0].update(box=[1, 2, 65, 40])), "x beyond the 64-px width"
    assert invalid(lambda a: a["objects"][0].update(box=[1, 2, 30, 49])), "y beyond the 48-px height"
    assert invalid(lambda a: a["objects"][0].update(box=[64, 2, 64, 40])), "x_min at the right edge"
    # What JSON Schema cannot relate stays for the semantic check: a gap between subtasks.
    assert not invalid(lambda a: a["task_plan"][1].update(start_step=6))
    # A single subtask spanning the episode, and plans up to the longest spelled out, are allowed.
    one = good_answer()
    one["task_plan"] = [{"subtask": "do it", "reason": "the task", "start_step": 0, "end_step": 9}]
    assert v.is_valid(one)


def test_backends_without_prefix_items_get_the_bounds_they_can_express():
    schema = teacher_schema(backend="openai", context=CTX)
    assert strict_mode_problems(schema) == [], "episode detail stays within strict mode for OpenAI too"
    props = schema["properties"]
    reasons = props["move_reasons"]
    assert (reasons["minItems"], reasons["maxItems"]) == (3, 3)
    assert reasons["items"]["properties"]["segment"]["maximum"] == 2
    assert props["task_plan"]["items"]["properties"]["end_step"]["maximum"] == 9


def test_default_detail_is_episode_where_a_grammar_per_schema_is_cheap():
    assert default_detail("vllm") == default_detail("openai-compatible") == "episode"
    assert default_detail("openai") == default_detail("gemini") == "static"
    assert default_detail("rule-based") == "episode"  # no decoder: nothing to pay either way
    assert set(BACKENDS) >= {"openai", "gemini", "vllm", "openai-compatible"}
