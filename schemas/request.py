"""The schema sent to a teacher's structured-output decoder, as tight as that backend can take.

A grammar-constrained decoder (vLLM's xgrammar, SGLang, OpenAI strict mode) writes exactly what
the request schema allows. Every constraint the validator holds an answer to, but the request
schema leaves out, is a paid answer that must be rejected and re-asked. So the request schema is
derived from `rationale-v1.json` keeping every constraint keyword the backend enforces
(`BACKENDS`, from each backend's documentation and, for xgrammar, measured), and in `episode`
detail it also carries the facts of the one episode the semantic checks use: the step range,
the number and numbers of the motion segments, the size of the first keyframe (or, where none
was sent, `objects` must be null).

What no backend can express stays a semantic check with a re-ask: consecutive subtasks that
tile the episode without gaps or overlaps (a relation between two values), x_min < x_max.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from .semantic import SemanticContext

SchemaDetail = Literal["static", "episode"]
SCHEMA_DETAILS: tuple[SchemaDetail, ...] = ("static", "episode")

# What every structured-output backend takes: the shape of the answer.
STRUCTURAL = frozenset({"type", "properties", "required", "additionalProperties", "items", "enum", "description"})

# A string that holds at least one non-space character; written so that it means the same under
# JSON Schema's search semantics and a grammar engine's whole-string match.
NONBLANK_PATTERN = r"[\s\S]*\S[\s\S]*"

# Longest plan the episode schema spells out (one alternative per plan length, see `_episode_plan`).
MAX_PLAN_SUBTASKS = 12


@dataclass(frozen=True)
class Backend:
    """What one structured-output backend enforces, beyond `STRUCTURAL`."""

    name: str
    keywords: frozenset[str]  # constraint keywords it honours (others are dropped from the request)
    nonblank_pattern: bool  # it takes NONBLANK_PATTERN as a `pattern` (then minLength is implied)
    per_request_default: bool  # it compiles and caches a grammar per schema: `episode` detail by default
    source: str  # where the subset comes from


# What xgrammar's JSON-schema converter enforces in generation (measured with xgrammar 0.2.9;
# `contains` is silently ignored, and a pattern makes it ignore minLength/maxLength on the same string).
XGRAMMAR_KEYWORDS = frozenset(
    {
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "prefixItems",
        "anyOf",
    }
)

BACKENDS: dict[str, Backend] = {
    # OpenAI Structured Outputs, strict mode ("Supported schemas"): every property required,
    # additionalProperties false, root an object; strings: pattern, format; numbers: minimum,
    # maximum, exclusiveMinimum, exclusiveMaximum, multipleOf; arrays: minItems, maxItems; anyOf
    # (not at the root). Not minLength/maxLength, not prefixItems. Limits: 5000 properties, 10
    # levels of nesting, 1000 enum values, 120,000 characters of names/enums/consts.
    "openai": Backend(
        "openai",
        frozenset({"minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
        nonblank_pattern=False,  # pattern is honoured, but a regex-heavy schema is slower to process
        per_request_default=False,  # every new schema costs schema-processing latency on the first request
        source="platform.openai.com/docs/guides/structured-outputs#supported-schemas",
    ),
    # Gemini through its OpenAI-compatible endpoint: the response schema is Gemini's JSON Schema
    # subset (type, properties, required, items, enum, minItems, maxItems, minimum, maximum,
    # anyOf, description); string lengths and patterns are not part of it.
    "gemini": Backend(
        "gemini",
        frozenset({"minItems", "maxItems", "minimum", "maximum"}),
        nonblank_pattern=False,
        per_request_default=False,
        source="ai.google.dev/gemini-api/docs/structured-output (JSON Schema support)",
    ),
    # vLLM's default structured-output backend, xgrammar.
    "vllm": Backend(
        "vllm",
        XGRAMMAR_KEYWORDS,
        nonblank_pattern=True,
        per_request_default=True,
        source="xgrammar JSON-schema converter (vLLM structured outputs)",
    ),
    # A generic OpenAI-compatible server: `vllm serve` and SGLang compile the schema with xgrammar
    # by default (llama.cpp's converter, behind Ollama, takes the same keywords); treated as vLLM.
    "openai-compatible": Backend(
        "openai-compatible",
        XGRAMMAR_KEYWORDS,
        nonblank_pattern=True,
        per_request_default=True,
        source="vllm serve / SGLang (xgrammar), llama.cpp json-schema-to-grammar",
    ),
    # Only the shape: what refinevla sent before constraints were carried (kept as the regression
    # baseline of the constrained-generation tests, and for a server known to reject keywords).
    "structural": Backend("structural", frozenset(), False, False, "the structural core only"),
}


def backend_for(teacher: str) -> Backend:
    """The backend a teacher's requests go to (a teacher with no decoder of its own: the widest)."""
    return BACKENDS.get(teacher, BACKENDS["openai-compatible"])


def default_detail(teacher: str) -> SchemaDetail:
    """`episode` where a per-request grammar is cheap (vllm, openai-compatible), else `static`."""
    return "episode" if backend_for(teacher).per_request_default else "static"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with every local `#/$defs/` reference inlined."""
    if isinstance(node, dict):
        if "$ref" in node:
            ref = node["$ref"]
            if not ref.startswith("#/$defs/"):
                raise ValueError(f"unsupported $ref {ref!r} (only local #/$defs/ references)")
            target = copy.deepcopy(defs[ref.removeprefix("#/$defs/")])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _resolve({**target, **extra}, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def teacher_part(schema: dict[str, Any]) -> dict[str, Any]:
    """The teacher-written properties of a schema document, $refs inlined, full constraints kept."""
    defs = schema.get("$defs", {})
    props = {k: _resolve(v, defs) for k, v in schema["properties"].items() if v.get("x-refinevla-source") == "teacher"}
    return {
        "type": "object",
        "description": "The teacher-written part of a refinevla rationale for one robot episode.",
        "properties": props,
        "required": [k for k in schema["required"] if k in props],
    }


def _strict(node: dict[str, Any], backend: Backend, required: bool = True) -> dict[str, Any]:
    """One resolved schema node rewritten into the backend's strict subset."""
    allowed = STRUCTURAL | backend.keywords
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "const":  # not in every provider's subset; an enum of one says the same
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {
                name: _strict(sub, backend, name in node.get("required", [])) for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = value if isinstance(value, bool) else _strict(value, backend)
        elif key == "prefixItems" and key in allowed:
            out["prefixItems"] = [_strict(sub, backend) for sub in value]
        elif key == "anyOf" and key in allowed:
            out["anyOf"] = [_strict(sub, backend) for sub in value]
        elif key in ("required", "additionalProperties"):
            continue  # rewritten below
        elif key in allowed:
            out[key] = copy.deepcopy(value)
    types = out.get("type")
    if "properties" in out:
        # Strict mode: every property listed as required, no extras; optional -> nullable.
        out["type"] = types or "object"
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    if backend.nonblank_pattern and out.get("type") == "string" and node.get("minLength", 0) >= 1:
        out["pattern"] = NONBLANK_PATTERN
        out.pop("minLength", None)  # a pattern already implies it (and xgrammar ignores lengths beside one)
    if not required:
        if types is None:
            raise ValueError("an optional property needs an explicit type to become nullable")
        if isinstance(types, str):
            types = [types]
        out["type"] = [*types, "null"] if "null" not in types else types
    return out


def _bounded(node: dict[str, Any], low: float, high: float) -> dict[str, Any]:
    return {**node, "minimum": low, "maximum": high}


def _episode_plan(plan: dict[str, Any], ctx: SemanticContext, backend: Backend) -> dict[str, Any]:
    """task_plan for one episode: every step in 0..T-1; the first subtask starts at 0 and the last ends
    at T-1 (one `anyOf` alternative per plan length, where the backend takes anyOf + prefixItems)."""
    last = ctx.num_steps - 1
    item = copy.deepcopy(plan["items"])
    props = item["properties"]
    props["start_step"] = _bounded(props["start_step"], 0, last)
    props["end_step"] = _bounded(props["end_step"], 0, last)
    out = {**plan, "items": item}
    if not {"anyOf", "prefixItems"} <= backend.keywords:
        return out
    first = copy.deepcopy(item)
    first["properties"]["start_step"] = {**props["start_step"], "enum": [0]}

    def ending(sub: dict[str, Any]) -> dict[str, Any]:
        sub = copy.deepcopy(sub)
        sub["properties"]["end_step"] = {**sub["properties"]["end_step"], "enum": [last]}
        return sub

    alternatives = []
    for n in range(1, min(ctx.num_steps, MAX_PLAN_SUBTASKS) + 1):
        items = [ending(first)] if n == 1 else [first, *[item] * (n - 2), ending(item)]
        alternatives.append({"type": "array", "prefixItems": items, "items": False, "minItems": n, "maxItems": n})
    description = plan.get("description", "")
    return {"description": description, "anyOf": alternatives}


def _episode_reasons(reasons: dict[str, Any], ctx: SemanticContext, backend: Backend) -> dict[str, Any]:
    """move_reasons for one episode: exactly one entry per motion segment, numbered 0..N-1 in order."""
    n = ctx.num_segments
    item = copy.deepcopy(reasons["items"])
    out = {**reasons, "minItems": n, "maxItems": n}
    if "prefixItems" in backend.keywords:
        entries = []
        for i in range(n):
            entry = copy.deepcopy(item)
            entry["properties"]["segment"] = {**entry["properties"]["segment"], "enum": [i]}
            entries.append(entry)
        return {**out, "prefixItems": entries, "items": False}
    item["properties"]["segment"] = _bounded(item["properties"]["segment"], 0, max(0, n - 1))
    return {**out, "items": item}


def _episode_objects(objects: dict[str, Any], ctx: SemanticContext, backend: Backend) -> dict[str, Any]:
    """objects for one episode: box coordinates within the first keyframe (x in 0..w, y in 0..h); null
    when no keyframe was sent (a text-only prompt: nothing to put a box on)."""
    if ctx.image_size is None:
        return {"type": "null", "description": "null: no image was sent, so there are no boxes."}
    w, h = ctx.image_size
    item = copy.deepcopy(objects["items"])
    box = item["properties"]["box"]
    coord = box["items"]
    if "prefixItems" in backend.keywords and {"exclusiveMinimum", "exclusiveMaximum"} <= backend.keywords:
        # A non-empty box inside the image: x_min in [0, w), y_min in [0, h), x_max in (0, w], y_max in (0, h].
        # (x_min < x_max relates two values: that stays a semantic check.)
        low = [{"minimum": 0, "exclusiveMaximum": w}, {"minimum": 0, "exclusiveMaximum": h}]
        high = [{"exclusiveMinimum": 0, "maximum": w}, {"exclusiveMinimum": 0, "maximum": h}]
        box["prefixItems"] = [{**coord, **bounds} for bounds in low + high]
        box["items"] = False
    else:
        box["items"] = _bounded(coord, 0, max(w, h))
    return {**objects, "items": item}


def _with_episode_facts(part: dict[str, Any], ctx: SemanticContext, backend: Backend) -> dict[str, Any]:
    props = dict(part["properties"])
    if "task_plan" in props:
        props["task_plan"] = _episode_plan(props["task_plan"], ctx, backend)
    if "move_reasons" in props:
        props["move_reasons"] = _episode_reasons(props["move_reasons"], ctx, backend)
    if "objects" in props:
        props["objects"] = _episode_objects(props["objects"], ctx, backend)
    return {**part, "properties": props}


def request_schema(part: dict[str, Any], backend: Backend, context: SemanticContext | None = None) -> dict[str, Any]:
    """The schema a teacher is asked to follow, from the `teacher_part` of a schema document: static
    (`context=None`) or with one episode's facts. `part` is not modified.

    Properties keep the file's order (models write fields in that order); every object has
    `additionalProperties: false` and every property required, optional ones nullable.
    """
    if context is not None:
        part = _with_episode_facts(part, context, backend)
    return _strict(part, backend)
