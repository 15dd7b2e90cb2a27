"""The rationale schema file, the teacher schema derived from it, and the semantic checks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from refinevla.schemas import (
    SemanticContext,
    load_schema,
    schema_id_of,
    semantic_errors,
    teacher_schema,
    validate,
    validate_teacher_answer,
)
from tests.schemas.answers import good_answer

CTX = SemanticContext(num_steps=10, num_segments=2, image_size=(64, 64))


def walk(node: Any, path: str = "$"):  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        yield path, node
        for k, v in node.get("properties", {}).items():
            yield from walk(v, f"{path}.{k}")
        if "items" in node:
            yield from walk(node["items"], f"{path}[]")


def test_schema_file_is_valid_2020_12_with_an_id_and_every_field_described():
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("rationale-v1.json") and schema_id_of(schema) == "refinevla.rationale/1"
    nodes = list(walk(schema))
    for d in schema["$defs"].values():
        nodes += list(walk(d))
    for path, node in nodes:
        if path != "$" and "$ref" not in node:
            assert node.get("description"), f"{path} has no description"
    for k in ("observation", "situation_analysis", "spatial_reasoning", "task_plan"):
        assert schema["properties"][k]["x-refinevla-source"] == "teacher"
    assert set(schema["$defs"]["step"]["required"]) == {
        "step",
        "subtask",
        "subtask_reason",
        "move",
        "move_reason",
        "gripper",
    }


def test_a_good_answer_passes_the_derived_schema_the_full_constraints_and_the_semantic_checks():
    answer = good_answer()
    assert Draft202012Validator(teacher_schema()).is_valid(answer)
    assert validate_teacher_answer(answer) == []
    assert semantic_errors(answer, CTX) == []
    assert validate_teacher_answer({**answer, "objects": None}) == []


def test_full_constraints_catch_what_a_bare_structural_schema_lets_through():
    answer = good_answer()
    answer["observation"] = ""
    answer["task_plan"][0]["start_step"] = -1
    errors = validate_teacher_answer(answer)
    assert any(e.startswith("observation:") for e in errors)
    assert any(e.startswith("task_plan/0/start_step") for e in errors)
    assert validate_teacher_answer({**good_answer(), "surprise": 1})


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda a: a["task_plan"][1].update(start_step=6), "uncovered"),
        (lambda a: a["task_plan"][1].update(start_step=4), "overlapping"),
        (lambda a: a["task_plan"][1].update(end_step=12), "outside the episode"),
        (lambda a: a["task_plan"][1].update(end_step=8), "every step must be covered"),
        (lambda a: a["task_plan"][0].update(start_step=3, end_step=2), "after end_step"),
        (lambda a: a.update(spatial_reasoning="   "), "spatial_reasoning: must be a non-empty text"),
        (lambda a: a["task_plan"][0].update(reason=" "), "task_plan/0/reason"),
        (lambda a: a["objects"][0].update(box=[1, 2, 80, 40]), "outside the 64x64 image"),
        (lambda a: a["objects"][0].update(box=[30, 2, 1, 40]), "inverted"),
        (lambda a: a["move_reasons"].pop(), "one entry per motion segment"),
    ],
)
def test_semantic_checks_name_what_to_fix(mutate, expected):
    answer = copy.deepcopy(good_answer())
    mutate(answer)
    errors = semantic_errors(answer, CTX)
    assert any(expected in e for e in errors), errors


def test_full_record_validation_rejects_a_bad_step():
    record = {
        "schema_id": "refinevla.rationale/1",
        "episode_id": "d:1",
        "instruction": "do it",
        "num_steps": 1,
        **{k: v for k, v in good_answer().items()},
        "steps": [
            {"step": 0, "subtask": "s", "subtask_reason": "r", "move": "stop", "move_reason": "m", "gripper": "open"}
        ],
    }
    assert validate(record) == []
    record["steps"][0]["gripper"] = "ajar"
    assert any("steps/0/gripper" in e for e in validate(record))


def _mutations(node: Any, path: tuple[Any, ...] = ()):  # type: ignore[no-untyped-def]
    """Every single-place change a sloppy teacher could make: wrong types, nulls, blanks, extras, gaps."""
    if isinstance(node, dict):
        yield path, "extra", None
        for k in node:
            yield (*path, k), "drop", None
            yield from _mutations(node[k], (*path, k))
    elif isinstance(node, list):
        yield path, "empty", None
        for i, item in enumerate(node):
            yield from _mutations(item, (*path, i))
    for value in (None, True, 1.5, -1, "", "x", [], {}):
        yield path, "set", value


def _apply(answer: dict[str, Any], path: tuple[Any, ...], kind: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(answer)
    if not path:
        return out
    parent = out
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    target = parent[last]
    if kind == "drop":
        del parent[last]
    elif kind == "extra" and isinstance(target, dict):
        target["unexpected"] = 1
    elif kind == "empty" and isinstance(target, list):
        target.clear()
    elif kind == "set":
        parent[last] = value
    return out


def test_the_fast_path_never_accepts_what_the_full_validator_rejects():
    from refinevla.schemas import _format_errors, _teacher_validator

    full = _teacher_validator("refinevla.rationale/1")
    checked = 0
    for path, kind, value in _mutations(good_answer()):
        answer = _apply(good_answer(), path, kind, value)
        expected = _format_errors(full, answer)
        got = validate_teacher_answer(answer)
        assert (got == []) == (expected == []), (path, kind, value, expected)
        if expected:
            assert got == expected  # the re-ask gets jsonschema's complete list
        checked += 1
    assert checked > 200
