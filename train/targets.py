"""What the model reads and what it must write: the prompt, the rationale target, the loss mask.

Prompt: the image plus `What action should the robot take to {instruction}?` (OpenVLA's and
ECoT's wording). Target: the rationale in a fixed order — the episode parts, then the step's
subtask, move and their reasons — each as `TAG: text` on its own line, then `ACTION:` and the 7
action token ids, then end-of-sequence. The order is derived from the rationale schema (a known
schema id maps to which of its properties are serialised; their order is the schema's own), so
a policy's `refinevla_policy.json` can say exactly what it was taught to write.

Token kinds drive the joint loss: the prompt is never in the loss, rationale tokens are weighted
by λ (`--reasoning-weight`), and `ACTION:` + the action tokens + EOS are the action loss (the tag
belongs with the actions so that an action-only policy, λ = 0, still learns to open its answer).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..schemas import load_schema
from .errors import TrainError

PROMPT_TEMPLATE = "What action should the robot take to {instruction}?"
ACTION_TAG = "ACTION:"

PROMPT, RATIONALE, ACTION = 0, 1, 2  # token kinds
IGNORE_INDEX = -100  # label of tokens outside the loss (the prompt, padding)


@dataclass(frozen=True)
class Serialisation:
    """Which schema properties make up the rationale target, in the schema's order."""

    schema_id: str
    episode_parts: tuple[str, ...]  # episode-level properties (written once per episode)
    step_parts: tuple[str, ...]  # properties of the step rows (what holds at this step)

    @property
    def parts(self) -> tuple[str, ...]:
        return self.episode_parts + self.step_parts

    def describe(self) -> dict[str, Any]:
        return {
            "schema_id": self.schema_id,
            "episode_parts": list(self.episode_parts),
            "step_parts": list(self.step_parts),
            "tags": {p: tag(p) for p in self.parts},
            "action_tag": ACTION_TAG,
            "format": "TAG: text per line, then ACTION: and the action tokens, then EOS",
        }


# The properties a known schema contributes; which ones is a choice (the plan is serialised
# once, `move_reasons` is already carried per step as `move_reason`, optional `objects` are not
# reliably present), the order is the schema's. A new schema id needs an entry here.
_SELECTED: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "refinevla.rationale/1": (
        frozenset({"observation", "situation_analysis", "spatial_reasoning", "task_plan"}),
        frozenset({"subtask", "subtask_reason", "move", "move_reason"}),
    ),
}


def serialisation_for(schema_id: str, where: str = "the dataset") -> Serialisation:
    """The serialisation of a schema id, or one line naming the ids refine-train knows."""
    if schema_id not in _SELECTED:
        known = ", ".join(sorted(_SELECTED))
        raise TrainError(f"{where}: schema id {schema_id!r} is not one refine-train knows (known: {known})")
    episode_sel, step_sel = _SELECTED[schema_id]
    schema = load_schema(schema_id)
    episode = tuple(p for p in schema["properties"] if p in episode_sel)
    step = tuple(p for p in schema["$defs"]["step"]["properties"] if p in step_sel)
    return Serialisation(schema_id, episode, step)


def tag(part: str) -> str:
    """`situation_analysis` -> `SITUATION ANALYSIS`."""
    return part.upper().replace("_", " ")


def prompt_text(instruction: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=instruction.strip().rstrip(".?!").strip())


def part_text(part: str, value: Any) -> str:
    """One rationale part as plain text (the task plan as `subtask (steps a-b); ...`)."""
    if part == "task_plan":
        return "; ".join(f"{s['subtask']} (steps {s['start_step']}-{s['end_step']})" for s in value)
    return str(value).strip()


def rationale_parts(ser: Serialisation, episode_row: dict[str, Any], step_row: dict[str, Any]) -> list[list[str]]:
    """[[tag, text], ...] for one step, in the serialisation's order (JSON-friendly)."""
    out = [[tag(p), part_text(p, episode_row[p])] for p in ser.episode_parts]
    out += [[tag(p), part_text(p, step_row[p])] for p in ser.step_parts]
    return out


def drop_parts(parts: Sequence[Sequence[str]], p: float, rng: random.Random) -> list[Sequence[str]]:
    """ECoT-Lite reasoning dropout: each whole part is left out with probability p."""
    if p <= 0:
        return list(parts)
    return [part for part in parts if rng.random() >= p]


def rationale_text(parts: Sequence[Sequence[str]]) -> str:
    """The rationale as the model writes it: one `TAG: text` line per part."""
    return "".join(f"{t}: {text}\n" for t, text in parts)


def target_text(parts: Sequence[Sequence[str]]) -> str:
    """The rationale as the model writes it, up to and including `ACTION:`."""
    return rationale_text(parts) + ACTION_TAG


def target_ids(
    tokenizer: Any, parts: Sequence[Sequence[str]], action_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(token ids, kinds) of the target: rationale text, `ACTION:`, the action ids, EOS."""
    rationale = rationale_text(parts)
    r_ids = tokenizer(rationale, add_special_tokens=False)["input_ids"] if rationale else []
    a_ids = tokenizer(ACTION_TAG, add_special_tokens=False)["input_ids"] + [int(i) for i in action_ids]
    if tokenizer.eos_token_id is not None:
        a_ids.append(int(tokenizer.eos_token_id))
    return list(r_ids) + a_ids, [RATIONALE] * len(r_ids) + [ACTION] * len(a_ids)


def longest_rationale(tokenizer: Any, parts_column: Iterable[str]) -> int:
    """The longest rationale of the training rows in tokens (`parts` as the table stores them, JSON).

    The policy records it: decoding must give the model at least this many tokens before it forces
    `ACTION:`, or every step's action follows a rationale cut short, a context it was never trained on.
    """
    longest = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal longest
        if batch:
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            longest = max(longest, *(len(i) for i in ids))
            batch.clear()

    for text in dict.fromkeys(parts_column):  # steps of one segment share their parts
        parts = loads_parts(text)
        if parts:
            batch.append(rationale_text(parts))
        if len(batch) >= 512:
            flush()
    flush()
    return longest


def action_positions(kinds: Sequence[int], n_actions: int = 7, has_eos: bool = True) -> list[int]:
    """Indices (within the target) of the action tokens proper: after `ACTION:`, before EOS."""
    end = len(kinds) - (1 if has_eos else 0)
    return list(range(end - n_actions, end))


def dumps_parts(parts: Sequence[Sequence[str]]) -> str:
    return json.dumps(parts, ensure_ascii=False)


def loads_parts(text: str) -> list[list[str]]:
    return json.loads(text)  # type: ignore[no-any-return]
