"""Versioned JSON Schemas for refinevla rationales, and helpers to load and validate them.

The schema file is the single source of truth: the teacher's structured-output schema
(`teacher_schema`), answer validation (`validate`), the dataset features and the card's
field table are all derived from it. A published schema file is never edited; a new
field means a new file and a new id.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from typing import Any

from .request import (
    BACKENDS,
    SCHEMA_DETAILS,
    Backend,
    SchemaDetail,
    backend_for,
    default_detail,
    request_schema,
    teacher_part,
)
from .semantic import SemanticContext, semantic_errors

__all__ = [
    "BACKENDS",
    "DEFAULT_SCHEMA_ID",
    "SCHEMA_DETAILS",
    "SCHEMA_FILES",
    "Backend",
    "SchemaDetail",
    "SemanticContext",
    "backend_for",
    "default_detail",
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

    # $refs inlined: jsonschema's reference resolution dominated validation time (~1 ms an answer).
    part = {"$schema": load_schema(schema_id)["$schema"], **_teacher_part(schema_id), "additionalProperties": False}
    part.pop("description", None)
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


@cache
def _teacher_part(schema_id: str) -> dict[str, Any]:
    return teacher_part(load_schema(schema_id))


@cache
def _static_teacher_schema_json(schema_id: str, backend: str) -> str:
    return json.dumps(request_schema(_teacher_part(schema_id), BACKENDS[backend]))


def teacher_schema(
    schema_id: str = DEFAULT_SCHEMA_ID, backend: str = "openai", context: SemanticContext | None = None
) -> dict[str, Any]:
    """The schema sent to a teacher behind `backend` (a key of `BACKENDS`): the teacher-written
    properties of the file, $refs inlined, `additionalProperties: false` on every object, every
    property required (optional ones nullable), and every constraint that backend enforces; with
    `context`, also the facts of that one episode (`--schema-detail episode`)."""
    if context is None:
        return json.loads(_static_teacher_schema_json(schema_id, backend))  # type: ignore[no-any-return]
    return request_schema(_teacher_part(schema_id), BACKENDS[backend], context)


def teacher_response_format(
    schema_id: str = DEFAULT_SCHEMA_ID, backend: str = "openai", context: SemanticContext | None = None
) -> dict[str, Any]:
    """The `response_format` of an OpenAI-style chat completion request for this schema."""
    name = "refinevla_" + schema_id.replace("refinevla.", "").replace("/", "_v").replace(".", "_")
    schema = teacher_schema(schema_id, backend, context)
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


def schema_id_of(schema: dict[str, Any]) -> str:
    """The refinevla id a schema document declares."""
    return str(schema["x-refinevla-schema-id"])
