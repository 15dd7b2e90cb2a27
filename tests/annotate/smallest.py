"""The smallest answer a JSON Schema allows: what a grammar-constrained local model tends to write.

A constrained decoder with a weak model takes the shortest way through the grammar — the first
alternative, the fewest items, the shortest strings, the lowest numbers. A server that answers so shows
whether the request's schema alone keeps an answer valid, with no help from the model's sense.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator


def smallest_instance(schema: dict[str, Any]) -> Any:
    """The minimal instance of the structured-output subset the request schemas use; checked against it."""
    value = _smallest(schema)
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(value)]
    if errors:
        raise ValueError(f"smallest instance is not valid against its own schema: {errors[:3]}")
    return value


def _smallest(node: dict[str, Any]) -> Any:
    if "anyOf" in node:
        return _smallest(node["anyOf"][0])
    if "enum" in node:
        return node["enum"][0]
    kind = node.get("type")
    if isinstance(kind, list):  # prefer the real type over null: the optional part is written, minimally
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {k: _smallest(v) for k, v in node.get("properties", {}).items()}
    if kind == "array":
        prefix = node.get("prefixItems", [])
        closed = len(prefix) if node.get("items") is False else 0  # a closed tuple has all its items
        n = max(node.get("minItems", 0), min(1, node.get("maxItems", 1)), closed)
        items = [_smallest(p) for p in prefix[:n]]
        while len(items) < n:
            items.append(_smallest(node.get("items") or {"type": "string"}))
        return items
    if kind == "string":
        return "x" * max(node.get("minLength", 0), 1 if "pattern" in node else 0)
    if kind in ("integer", "number"):
        if "minimum" in node:
            return node["minimum"]
        if "exclusiveMinimum" in node:
            return node["exclusiveMinimum"] + 1
        return 0
    if kind == "boolean":
        return False
    return None
