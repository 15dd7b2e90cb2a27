"""A checker of OpenAI Structured Outputs' documented rules for `strict: true` schemas.

From platform.openai.com/docs/guides/structured-outputs ("Supported schemas"): the root is an
object and not `anyOf`; every object sets `additionalProperties: false` and lists every property
in `required`; only the supported types and keywords; at most 10 levels of nesting and 5000
object properties; at most 1000 enum values; at most 120,000 characters of property names,
definition names, enum values and const values. A schema that breaks one is answered with a 400.
"""

from __future__ import annotations

from typing import Any

TYPES = {"string", "number", "boolean", "integer", "object", "array", "null"}
KEYWORDS = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "anyOf",
    "$defs",
    "$ref",
    "description",
    "title",
    # type-specific constraints
    "pattern",
    "format",
    "multipleOf",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "minItems",
    "maxItems",
}
MAX_DEPTH, MAX_PROPERTIES, MAX_ENUM_VALUES, MAX_CHARS = 10, 5000, 1000, 120_000


def strict_mode_problems(schema: dict[str, Any]) -> list[str]:
    """Every rule `schema` breaks, as 'path: problem' lines (empty: OpenAI accepts it)."""
    problems: list[str] = []
    totals = {"properties": 0, "enum": 0, "chars": 0, "depth": 0}
    if schema.get("type") != "object" or "anyOf" in schema:
        problems.append("$: the root must be an object, not anyOf")

    def visit(node: Any, path: str, depth: int) -> None:
        if not isinstance(node, dict):
            problems.append(f"{path}: a schema must be an object")
            return
        totals["depth"] = max(totals["depth"], depth)
        for key in set(node) - KEYWORDS:
            problems.append(f"{path}: keyword {key!r} is not supported")
        types = node.get("type")
        for t in [types] if isinstance(types, str) else types or []:
            if t not in TYPES:
                problems.append(f"{path}: type {t!r} is not supported")
        if "enum" in node:
            totals["enum"] += len(node["enum"])
            totals["chars"] += sum(len(str(v)) for v in node["enum"])
        if "const" in node:
            totals["chars"] += len(str(node["const"]))
        if "properties" in node:
            props = node["properties"]
            totals["properties"] += len(props)
            totals["chars"] += sum(len(k) for k in props)
            if node.get("additionalProperties") is not False:
                problems.append(f"{path}: additionalProperties must be false")
            if sorted(node.get("required", [])) != sorted(props):
                problems.append(f"{path}: every property must be required")
            for name, sub in props.items():
                visit(sub, f"{path}.{name}", depth + 1)
        elif types == "object" or (isinstance(types, list) and "object" in types):
            problems.append(f"{path}: an object must declare its properties")
        if "items" in node:
            visit(node["items"], f"{path}[]", depth + 1)
        for i, sub in enumerate(node.get("anyOf", [])):
            visit(sub, f"{path}|{i}", depth + 1)
        for name, sub in node.get("$defs", {}).items():
            totals["chars"] += len(name)
            visit(sub, f"{path}/$defs/{name}", depth + 1)

    visit(schema, "$", 0)
    if totals["depth"] > MAX_DEPTH:
        problems.append(f"$: {totals['depth']} levels of nesting (at most {MAX_DEPTH})")
    if totals["properties"] > MAX_PROPERTIES:
        problems.append(f"$: {totals['properties']} object properties (at most {MAX_PROPERTIES})")
    if totals["enum"] > MAX_ENUM_VALUES:
        problems.append(f"$: {totals['enum']} enum values (at most {MAX_ENUM_VALUES})")
    if totals["chars"] > MAX_CHARS:
        problems.append(f"$: {totals['chars']} characters of names and values (at most {MAX_CHARS})")
    return problems
