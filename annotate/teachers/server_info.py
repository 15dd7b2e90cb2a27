"""What an OpenAI-compatible server says about itself, asked once before the first request.

Two things a run needs from the server that the chat endpoint does not say:

- **Provenance.** A dataset annotated through `vllm serve` should name the vLLM that wrote it, as the
  in-process vLLM teacher does (`vllm_version` in the manifest). vLLM answers `GET /version` and marks
  its `/v1/models` cards `owned_by: "vllm"` with the model's `max_model_len`; other servers (SGLang,
  Ollama, llama.cpp) answer `/v1/models` without those, and are recorded as unknown.
- **A context window that `--max-tokens` alone fills.** vLLM refuses every request whose prompt plus
  `max_tokens` exceeds `max_model_len`, with the same "context length" message an over-long episode
  gets, which the refusal rules treat as that episode's reject. When `max_tokens` alone reaches the
  window, every episode would be rejected that way; the run stops before the first request instead
  (`check_context_window`), asks and stores nothing.

Asking is best effort: a server that answers neither route is recorded as unknown, and the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from .base import TeacherConfigError, redact

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ServerInfo:
    """The serving software as it describes itself; None where it does not say."""

    software: str | None = None  # "vllm" when its model cards say so
    version: str | None = None  # GET /version (vLLM)
    max_model_len: int | None = None  # the served model's context window, in tokens

    def record(self) -> dict[str, Any]:
        return asdict(self)


def server_root(base_url: str) -> str:
    """The server's root for its non-OpenAI routes: the base URL without its trailing `/v1`."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def model_card(listing: Any, model: str) -> dict[str, Any] | None:
    """The `/v1/models` card of `model` as a plain dict (the openai client keeps unknown fields)."""
    for card in getattr(listing, "data", None) or []:
        fields = card.model_dump() if hasattr(card, "model_dump") else dict(card)
        if fields.get("id") == model:
            return fields
    return None


async def ask_server(client: Any, base_url: str, model: str) -> ServerInfo:
    """`/v1/models` (the card of `model`) and, for vLLM, `/version`; unknown fields where a route fails."""
    try:
        card = model_card(await asyncio.wait_for(client.models.list(), PROBE_TIMEOUT_S), model) or {}
    except Exception as exc:  # any server, any failure: provenance is best effort
        log.debug("GET %s/models: %s", redact(base_url), redact(str(exc)))
        return ServerInfo()
    software = "vllm" if card.get("owned_by") == "vllm" else None
    length = card.get("max_model_len")
    version = None
    if software == "vllm":
        try:
            raw = await asyncio.wait_for(client.get(server_root(base_url) + "/version", cast_to=bytes), PROBE_TIMEOUT_S)
            answer = json.loads(raw)
            version = answer.get("version") if isinstance(answer, dict) else None
        except Exception as exc:
            log.debug("GET /version: %s", redact(str(exc)))
    return ServerInfo(software, str(version) if version else None, length if isinstance(length, int) else None)


def check_context_window(max_tokens: int, max_model_len: object, model: str, where: str) -> None:
    """Stop in one line when `--max-tokens` alone fills the model's context window (no room for a prompt);
    an unknown window (`max_model_len` not an int) passes."""
    if not isinstance(max_model_len, int) or max_tokens < max_model_len:
        return
    raise TeacherConfigError(
        redact(
            f"--max-tokens {max_tokens} leaves no room for the prompt: the model {model!r} at {where} has a "
            f"context window of {max_model_len} tokens, and every request would be refused; pass a --max-tokens "
            f"well below {max_model_len} (or serve the model with a larger --max-model-len)"
        )
    )


__all__ = ["ServerInfo", "ask_server", "check_context_window", "model_card", "server_root"]
