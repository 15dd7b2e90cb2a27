"""From a teacher's raw answer to the rationale record the dataset is written from.

An answer is checked before anything uses it (truncation, JSON, the schema, then the episode's
facts), committed to the store with the outcome of that check, and only then assembled into a
record aligned to the episode's steps. Live mode (the engine) and batch mode share these steps,
so an answer is judged and stored the same way whichever mode received it. `AnnotationOutcome`
is what the engine hands its sink (the Parquet writer) for each episode it settles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..schemas import SemanticContext, semantic_errors, validate_teacher_answer
from .prompts import EpisodeFacts
from .store import REFUSED, Attempt, ResultStore
from .teacher_requests import PreparedRequest
from .teachers.base import TeacherResponse, redact

Status = Literal["annotated", "cached", "rejected", "failed", "stopped"]


@dataclass
class AnnotationOutcome:
    """What happened to one episode; `record` is the full rationale when annotated or cached."""

    episode_id: str
    dataset: str
    instruction: str
    actions: np.ndarray
    states: np.ndarray
    key: str
    status: Status
    record: dict[str, Any] | None = None
    reason: str | None = None
    attempts: int = 0


def check_answer(
    response: TeacherResponse, context: SemanticContext, schema_id: str
) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse and validate a raw answer: (answer, []) when usable, (None, errors) when not.

    Truncation is detected from `finish_reason` *before* parsing: a cut-off answer can
    still parse (or a lenient server can close the braces), and must not be used.
    """
    if response.finish_reason == "length":
        return None, ["the answer was cut off at the token limit (finish_reason=length); answer more concisely"]
    if response.finish_reason not in (None, "stop", "eos", "end_turn"):
        return None, [f"the answer ended with finish_reason={response.finish_reason!r}, not a completed answer"]
    try:
        answer = json.loads(response.text)
    except json.JSONDecodeError as exc:
        return None, [f"the answer is not valid JSON ({exc.msg} at character {exc.pos}); answer with one JSON object"]
    errors = validate_teacher_answer(answer, schema_id)
    if errors:
        return None, errors
    errors = semantic_errors(answer, context)
    return (answer, []) if not errors else (None, errors)


def commit_response(
    store: ResultStore,
    key: str,
    episode_id: str,
    model: str,
    attempt: int,
    response: TeacherResponse,
    answer: dict[str, Any] | None,
    errors: list[str],
    cost: float,
) -> Attempt:
    """Persist one raw answer before anything uses it: with its validated answer (one transaction)
    when it passed the checks, as an attempt with its errors when not. Live and batch mode alike."""
    stored = Attempt(
        attempt,
        response.text,
        response.finish_reason,
        errors,
        response.prompt_tokens,
        response.completion_tokens,
        cost,
        response.latency,
    )
    if answer is not None:
        store.record_answer(key, episode_id, model, stored, answer)
    else:
        store.record_attempt(key, episode_id, model, stored)
    return stored


def refused_reason(error: str) -> str:
    """The reject reason of an episode the teacher refused (`--retry-rejected` asks these again)."""
    return redact(REFUSED + error)


def invalid_reason(attempts: int, errors: list[str]) -> str:
    """The reject reason of an episode whose every answer failed the checks."""
    return redact(f"invalid after {attempts} attempt(s): " + "; ".join(errors[:5]))


def assemble_record(prepared: PreparedRequest, answer: dict[str, Any], schema_id: str) -> dict[str, Any]:
    """The full rationale record: the teacher's answer plus the step-level view aligned to time."""
    facts: EpisodeFacts = prepared.bundle.facts
    step_subtask: list[tuple[str, str]] = []
    for sub in answer["task_plan"]:
        step_subtask.extend([(sub["subtask"], sub["reason"])] * (sub["end_step"] - sub["start_step"] + 1))
    reasons = [r["reason"] for r in answer["move_reasons"]]
    step_reason: list[str] = []
    for i, seg in enumerate(facts.segments):
        step_reason.extend([reasons[i]] * (seg.end - seg.start + 1))
    steps = [
        {
            "step": t,
            "subtask": step_subtask[t][0],
            "subtask_reason": step_subtask[t][1],
            "move": facts.moves[t],
            "move_reason": step_reason[t],
            "gripper": facts.gripper[t],
        }
        for t in range(facts.num_steps)
    ]
    return {
        "schema_id": schema_id,
        "episode_id": prepared.episode_id,
        "instruction": prepared.instruction,
        "num_steps": facts.num_steps,
        "observation": answer["observation"],
        "situation_analysis": answer["situation_analysis"],
        "spatial_reasoning": answer["spatial_reasoning"],
        "task_plan": answer["task_plan"],
        "objects": answer.get("objects"),
        "move_reasons": answer["move_reasons"],
        "steps": steps,
    }
