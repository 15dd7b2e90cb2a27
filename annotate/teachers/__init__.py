"""Teacher backends behind one async interface (see `base.Teacher`), made by `make_teacher`.

Backends import their heavy stacks lazily: `vllm` only when the vLLM teacher starts, so a
user without vllm can still use the API teachers.
"""

from __future__ import annotations

from typing import Any

from ..errors import RefineError
from .base import (
    PermanentTeacherError,
    Teacher,
    TeacherAuthError,
    TeacherRequest,
    TeacherResponse,
    TransientTeacherError,
)

__all__ = [
    "TEACHERS",
    "PermanentTeacherError",
    "Teacher",
    "TeacherAuthError",
    "TeacherRequest",
    "TeacherResponse",
    "TransientTeacherError",
    "make_teacher",
]

TEACHERS = ("rule-based", "gemini", "openai", "openai-compatible", "vllm")


def make_teacher(
    name: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    temperature: float = 0.2,
    max_tokens: int = 4096,
    tensor_parallel_size: int = 1,
    engine_args: dict[str, Any] | None = None,
    **extra: Any,
) -> Teacher:
    """Build the named teacher. Raises RefineError for unknown names or missing settings.

    `engine_args` are `vllm.LLM`'s keyword arguments (`--teacher vllm` only; a served model takes its
    engine's arguments as `vllm serve` flags)."""
    if engine_args and name != "vllm":
        raise RefineError(
            f"--vllm-args are for --teacher vllm (the local engine); a server's engine takes them as its own flags, "
            f"not --teacher {name}"
        )
    if name == "rule-based":
        from .rule_based import RuleBasedTeacher

        return RuleBasedTeacher()
    if name in ("gemini", "openai", "openai-compatible"):
        from .openai_compat import OpenAICompatTeacher

        return OpenAICompatTeacher.for_provider(
            name,
            model=model,
            base_url=base_url,
            temperature=temperature,
            max_tokens=max_tokens,
            require_key=bool(extra.get("require_key", True)),
        )
    if name == "vllm":
        from .vllm import VllmTeacher

        if not model:
            raise RefineError("--teacher vllm needs --model (a Hugging Face model id or local path)")
        return VllmTeacher(
            model,
            tensor_parallel_size=tensor_parallel_size,
            temperature=temperature,
            max_tokens=max_tokens,
            engine_args=engine_args,
        )
    raise RefineError(f"unknown teacher {name!r}: choose one of {', '.join(TEACHERS)}")
