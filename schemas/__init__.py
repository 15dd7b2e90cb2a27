"""Versioned JSON Schemas for refinevla rationales, and helpers to load and validate them.

The schema file is the single source of truth: the teacher's structured-output schema
(`teacher_schema`), answer validation (`validate`), the dataset features and the card's
field table are all derived from it. A published schema file is never edited; a new
field means a new file and a new id.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import cache
from importlib import resources
from typing import Any

from .semantic import SemanticContext, semantic_errors

__all__ = [
    "DEFAULT_SCHEMA_ID",
    "SCHEMA_FILES",
    "SemanticContext",
    "load_schema",
    "schema_digest",
    "semantic_errors",
    "teacher_response_format",
    "teacher_schema",
    "validate",
    "validate_teacher_answer",
]

DEFAULT_SCHEMA_ID = "refinevla.rationale/1"
SCHEMA_FILES = {"refinevla.rationale/1": "rationale-v1.json"}  # schema id -> file in this package

# Keywords kept when deriving a teacher schema. OpenAI's strict structured outputs and
# Gemini's OpenAI-compatible endpoint both accept this subset; length/format/range
# constraints are rejected (OpenAI) or silently ignored (some servers), so they are
# enforced by `validate` after the answer arrives instead.
_TEACHER_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "description"}


@cache
def _load(schema_id: str) -> str:
    try:
        name = SCHEMA_FILES[schema_id]
    except KeyError:
        known = ", ".join(sorted(SCHEMA_FILES))
        raise ValueError(f"unknown schema id {schema_id!r} (known: {known})") from None
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def load_schema(schema_id: str = DEFAULT_SCHEMA_ID) -> dict[str, Any]:
    """The schema document for an id (a fresh copy: callers may mutate it)."""
    return json.loads(_load(schema_id))  # type: ignore[no-any-return]


def schema_digest(schema_id: str = DEFAULT_SCHEMA_ID) -> str:
    """sha256 of the schema file's bytes: goes into request keys, so any edit makes new keys."""
    return hashlib.sha256(_load(schema_id).encode()).hexdigest()


@cache
def _validator(schema_id: str) -> Any:
    from jsonschema import Draft202012Validator

    schema = load_schema(schema_id)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@cache
def _teacher_validator(schema_id: str) -> Any:
    """Validates a teacher's answer against the *full* constraints of the teacher-written part."""
    from jsonschema import Draft202012Validator

    schema = load_schema(schema_id)
    defs = schema.get("$defs", {})
    teacher = [k for k, v in schema["properties"].items() if v.get("x-refinevla-source") == "teacher"]
    # $refs inlined: jsonschema's reference resolution dominated validation time (~1 ms an answer).
    part = {
        "$schema": schema["$schema"],
        "type": "object",
        "additionalProperties": False,
        "required": [k for k in schema["required"] if k in teacher],
        "properties": {k: _resolve(schema["properties"][k], defs) for k in teacher},
    }
    return Draft202012Validator(part)


def _format_errors(validator: Any, instance: Any) -> list[str]:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    out = []
    for err in errors:
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{where}: {err.message}")
    return out


def validate(record: Any, schema_id: str = DEFAULT_SCHEMA_ID) -> list[str]:
    """JSON Schema errors of a full rationale record, as 'path: message' lines (empty when valid)."""
    return _format_errors(_validator(schema_id), record)


def validate_teacher_answer(answer: Any, schema_id: str = DEFAULT_SCHEMA_ID) -> list[str]:
    """JSON Schema errors of a teacher answer (the teacher-written properties only), with every
    constraint of the file (minLength, minItems...), including those the teacher schema drops."""
    fast = _fast_teacher_validator(schema_id)
    if fast is not None:
        try:
            fast(answer)
            return []
        except Exception:  # invalid (or a case the compiled check does not cover): full report below
            pass
    return _format_errors(_teacher_validator(schema_id), answer)


@cache
def _fast_teacher_validator(schema_id: str) -> Any:
    """The same teacher-part schema compiled to Python by fastjsonschema, ~20x faster than jsonschema.

    Only its *accept* is trusted: whatever it rejects is validated again by jsonschema, whose complete
    error list is what a re-ask sends back (a test checks, mutation by mutation, that it never accepts
    what jsonschema rejects). Validation was the largest cost per answer after the HTTP client.
    """
    try:
        import fastjsonschema
    except ImportError:
        return None
    schema = dict(_teacher_validator(schema_id).schema)
    schema.pop("$schema", None)  # it knows drafts 4-7; the keywords used here mean the same there
    return fastjsonschema.compile(schema)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
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


def _strict(node: dict[str, Any], required: bool = True) -> dict[str, Any]:
    """Rewrite one (resolved) schema node into the strict subset."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _TEACHER_KEYWORDS and key != "const":
            continue
        if key == "const":  # not in every provider's subset; an enum of one says the same
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {name: _strict(sub, name in node.get("required", [])) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _strict(value)
        elif key in ("required", "additionalProperties"):
            continue  # rewritten below
        else:
            out[key] = copy.deepcopy(value)
    types = out.get("type")
    if "properties" in out:
        # Strict mode: every property listed as required, no extras; optional -> nullable.
        out["type"] = types or "object"
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    if not required:
        if types is None:
            raise ValueError("an optional property needs an explicit type to become nullable")
        if isinstance(types, str):
            types = [types]
        out["type"] = [*types, "null"] if "null" not in types else types
    return out


@cache
def _teacher_schema_json(schema_id: str) -> str:
    schema = load_schema(schema_id)
    defs = schema.get("$defs", {})
    props = {k: _resolve(v, defs) for k, v in schema["properties"].items() if v.get("x-refinevla-source") == "teacher"}
    root = {
        "type": "object",
        "description": "The teacher-written part of a refinevla rationale for one robot episode.",
        "properties": props,
        "required": [k for k in schema["required"] if k in props],
    }
    return json.dumps(_strict(root))  # property order kept: models write fields in this order


def teacher_schema(schema_id: str = DEFAULT_SCHEMA_ID) -> dict[str, Any]:
    """The schema sent to a teacher: the teacher-written properties of the file, with $refs
    inlined, `additionalProperties: false` on every object, every property required (optional
    ones nullable via a type union) and only keywords that OpenAI strict mode and Gemini accept."""
    return json.loads(_teacher_schema_json(schema_id))  # type: ignore[no-any-return]


def teacher_response_format(schema_id: str = DEFAULT_SCHEMA_ID) -> dict[str, Any]:
    """The `response_format` of an OpenAI-style chat completion request for this schema."""
    name = "refinevla_" + schema_id.replace("refinevla.", "").replace("/", "_v").replace(".", "_")
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": teacher_schema(schema_id)}}


def schema_id_of(schema: dict[str, Any]) -> str:
    """The refinevla id a schema document declares."""
    return str(schema["x-refinevla-schema-id"])
