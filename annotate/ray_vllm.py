"""`--teacher vllm --backend ray`: vLLM engine replicas on a GPU cluster through `ray.data.llm`.

The open teacher runs where the GPUs are: one engine replica per GPU (or per
`--tensor-parallel-size` group), fed by the cluster's prepared requests (`ray_backend`), each
request constrained to its own schema (`structured_outputs: {"json": schema}`, as the local vllm
teacher asks), images included (`prepare_multimodal_stage`). A request that fails in the engine
becomes a row with `__inference_error__` (`should_continue_on_error=True`), never the job's end.

Every answer streams back to the driver, which checks it and commits it to the run's store before
anything uses it, exactly as the engine does; an invalid answer is re-asked with its errors in the
next pass (new replicas: a pass is one Ray Data job), up to `--max-attempts`, then rejected with
its reason. The dataset is then written from the store by the ordinary engine (ask=False), so it
is the same dataset a local vllm run writes for the same answers. A request whose key has earlier
attempts (an interrupted run) continues its re-ask sequence where it stopped.

Each request is prepared once (`ray_backend` holds the prepared rows on the cluster for both the
replicas and the writing), and the replicas admit exactly as many images per prompt as the run's
largest prompt has: vLLM sizes its memory for that many, and a prompt with more fails in the engine
(a guess too small fails the same busy episode on every rerun; one too large wastes GPU memory).
When nothing is left to ask (a finished run's rerun), no replica is started at all.
"""

from __future__ import annotations

import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import RefineError

if TYPE_CHECKING:
    from .store import ResultStore
    from .teacher_requests import PreparedRequest

ERROR_COLUMN = "__inference_error__"  # ray.data.llm's per-row error (should_continue_on_error=True)
BATCH_SIZE = 16  # requests per engine call: small batches lose little when a replica dies
REPORT_EVERY = 5.0  # seconds between progress lines while the replicas answer


@dataclass(frozen=True)
class Sampling:
    """The run's sampling, as every request carries it (the schema is per request)."""

    temperature: float
    max_tokens: int


def replicas_for(gpus: float, tensor_parallel_size: int) -> int:
    """Engine replicas the cluster holds: one per `tensor_parallel_size` GPUs."""
    replicas = int(gpus) // max(1, tensor_parallel_size)
    if replicas < 1:
        raise RefineError(
            f"--teacher vllm --backend ray needs GPUs: the cluster has {gpus:g}, and one replica needs "
            f"--tensor-parallel-size {tensor_parallel_size}; on CPUs serve the model elsewhere and use "
            "--teacher openai-compatible --base-url URL"
        )
    return replicas


def processor_config(
    model: str,
    tensor_parallel_size: int,
    replicas: int,
    images_per_prompt: int,
    engine_args: dict[str, Any] | None = None,
) -> Any:
    """The `vLLMEngineProcessorConfig` of the run (imports ray.data.llm, not vllm: buildable on any machine).
    `engine_args` (`--vllm-args`) go to every replica's engine, as to the local teacher's."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={
            **(engine_args or {}),
            "tensor_parallel_size": tensor_parallel_size,
            "limit_mm_per_prompt": {"image": images_per_prompt},
        },
        concurrency=replicas,
        batch_size=BATCH_SIZE,
        prepare_multimodal_stage={"enabled": True},  # the keyframes, as OpenAI-style image_url parts
        should_continue_on_error=True,
    )


def request_row(
    item: PreparedRequest, messages: list[dict[str, Any]], attempt: int, sampling: Sampling
) -> dict[str, Any]:
    """One request as the processor's input row: chat messages, and sampling with this request's schema."""
    return {
        "key": item.key,
        "attempt": attempt,
        "payload": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL),
        "messages": messages,
        "sampling_params": {
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_tokens,
            "structured_outputs": {"json": item.response_format["json_schema"]["schema"]},
        },
    }


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """An engine output row reduced to what the driver commits (error rows never reach here)."""
    return {
        "key": row["key"],
        "attempt": int(row["attempt"]),
        "payload": row["payload"],
        "text": row.get("generated_text") or "",
        "prompt_tokens": int(row.get("num_input_tokens") or 0),
        "completion_tokens": int(row.get("num_generated_tokens") or 0),
        ERROR_COLUMN: "",
    }


@dataclass
class PassSummary:
    """What the replicas did in this run (all passes)."""

    passes: int = 0
    answers: int = 0  # valid answers committed
    invalid: int = 0  # answers that failed the checks (re-asked or rejected)
    rejected: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # engine errors by message (episodes left for a rerun)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self, total: int) -> str:
        """The progress line while the replicas answer (the engine's own line follows, settling from the store)."""
        done = self.answers + self.rejected + sum(self.errors.values())
        rate = (self.answers + self.invalid) / max(1e-6, time.monotonic() - self.started)
        return (
            f"vllm replicas, pass {self.passes}: episodes {done}/{total} | answers {self.answers}, invalid "
            f"{self.invalid}, rejected {self.rejected}, engine errors {sum(self.errors.values())} | tokens "
            f"{self.prompt_tokens}+{self.completion_tokens} | {rate:.1f} req/s"
        )


def ask_in_passes(
    first: Iterable[dict[str, Any]],
    process: Callable[[Any], Any],
    from_rows: Callable[[list[dict[str, Any]]], Any],
    store: ResultStore,
    *,
    model: str,
    schema_id: str,
    template: Any,
    max_attempts: int,
    sampling: Sampling,
    report: Callable[[PassSummary], None] | None = None,
) -> PassSummary:
    """Run the processor over the requests, commit every answer, re-ask the invalid ones in later passes.

    `first` is the first pass's dataset (or rows), `process` the processor (dataset -> output rows),
    `from_rows` makes a dataset of re-ask rows. Nothing is used before it is committed.
    """
    from .prompts import reask_messages
    from .records import check_answer, commit_response, invalid_reason
    from .teachers.base import TeacherResponse

    summary = PassSummary()
    pending: Any = first
    shown = time.monotonic()
    while pending is not None:
        summary.passes += 1
        reasks: list[dict[str, Any]] = []
        for row in _rows(process(pending)):
            if report is not None and time.monotonic() - shown >= REPORT_EVERY:
                report(summary)
                shown = time.monotonic()
            item: PreparedRequest = pickle.loads(row["payload"])
            attempt = int(row["attempt"])
            if row.get(ERROR_COLUMN):
                summary.errors[str(row[ERROR_COLUMN]).strip().splitlines()[-1][:200]] += 1
                continue
            response = TeacherResponse(
                text=row["text"],
                finish_reason=None,
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                model=model,
            )
            answer, errors = check_answer(response, item.context, schema_id)
            commit_response(store, item.key, item.episode_id, model, attempt, response, answer, errors, 0.0)
            summary.prompt_tokens += response.prompt_tokens
            summary.completion_tokens += response.completion_tokens
            if answer is not None:
                summary.answers += 1
                continue
            summary.invalid += 1
            if attempt >= max_attempts:
                store.commit_reject(item.key, item.episode_id, invalid_reason(attempt, errors), response.text, attempt)
                summary.rejected += 1
                continue
            earlier = [(a.raw, a.errors) for a in store.attempts(item.key)[:-1]]  # the last is this answer
            messages = with_history(item, earlier, template) + reask_messages(template, response.text, errors)
            reasks.append(request_row(item, messages, attempt + 1, sampling))
        pending = from_rows(reasks) if reasks else None
    if report is not None:
        report(summary)
    return summary


def with_history(
    item: PreparedRequest, attempts: Iterable[tuple[str, list[str]]], template: Any
) -> list[dict[str, Any]]:
    """The request's messages followed by the re-ask turn of each earlier (raw answer, errors)."""
    from .prompts import reask_messages

    messages = list(item.bundle.messages)
    for raw, errors in attempts:
        messages += reask_messages(template, raw, list(errors))
    return messages


def _rows(output: Any) -> Iterator[dict[str, Any]]:
    return iter(output.iter_rows()) if hasattr(output, "iter_rows") else iter(output)


def first_requests(batch: dict[str, Any], history: Any, sampling: Sampling, template: str) -> dict[str, list[Any]]:
    """Prepared rows -> the first pass's request rows (on the cluster): settled ones (prepared without a
    prompt) dropped, an interrupted re-ask sequence continued from its stored attempts (`history`: key ->
    [(raw, errors), ...]). Rows with an error never get here (`request_summary` raised them)."""
    from .prompts import load_template

    if not isinstance(history, dict):
        import ray

        history = ray.get(history)
    tmpl = load_template(template)
    out: dict[str, list[Any]] = {"key": [], "attempt": [], "payload": [], "messages": [], "sampling_params": []}
    for payload, ask in zip(batch["payload"], batch["ask"], strict=True):
        if not ask:  # settled before this run
            continue
        item = pickle.loads(payload)
        earlier = history.get(item.key, [])
        row = request_row(item, with_history(item, earlier, tmpl), len(earlier) + 1, sampling)
        for k in out:
            out[k].append(row[k])
    return out


@dataclass(frozen=True)
class RequestSummary:
    """What the prepared rows hold for the replicas."""

    to_ask: int  # requests with a prompt (not settled before this run)
    images: int  # the most image parts in one of their prompts (re-ask turns add text only)
    error: str  # the first episode the engine cannot ask ("" if none)


def summarize(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """One block's part of `RequestSummary` (on the cluster)."""
    images = [int(n) for n, ask in zip(batch["images"], batch["ask"], strict=True) if ask]
    errors = (str(e) for e in batch["error"] if e)
    return {"to_ask": [len(images)], "images": [max(images, default=0)], "error": [next(errors, "")]}


def request_summary(prepared: Any) -> RequestSummary:
    """How many requests the prepared rows hold to ask, and their largest prompt's images: one small row per block."""
    parts = prepared.select_columns(["ask", "images", "error"]).map_batches(summarize, batch_size=None, num_cpus=0.1)
    rows = parts.take_all()
    return RequestSummary(
        to_ask=sum(int(r["to_ask"]) for r in rows),
        images=max((int(r["images"]) for r in rows), default=0),
        error=next((str(r["error"]) for r in rows if r["error"]), ""),
    )


def run_replicas(ray: Any, args: Any, setup: Any, prepared: Any, replicas: int) -> PassSummary:
    """Ask every unsettled request of `prepared` (the cluster's prepared rows, materialized) through vLLM replicas."""
    from ray.data.llm import build_processor

    from .prompts import load_template
    from .store import ResultStore

    teacher = setup.teacher
    report = None if args.progress == "none" else lambda r: print(r.line(setup.total), file=sys.stderr)
    wanted = request_summary(prepared)
    if wanted.error:  # a user's error in a task (`prepare_chunk`): one line, before anything is asked
        raise RefineError(wanted.error)
    if not wanted.to_ask:  # a finished run's rerun: no replica to start
        return PassSummary()
    if report is not None:
        print(
            f"vllm replicas: {replicas} x {args.tensor_parallel_size} GPU(s) for {wanted.to_ask} request(s), "
            f"up to {wanted.images} image(s) per prompt",
            file=sys.stderr,
        )
    config = processor_config(
        teacher.model, args.tensor_parallel_size, replicas, wanted.images, getattr(teacher, "engine_args", None)
    )
    processor = build_processor(config, postprocess=postprocess)
    sampling = Sampling(args.temperature, args.max_tokens)
    with ResultStore(setup.store_path) as store:
        first = prepared.map_batches(
            first_requests,
            batch_size=8,
            fn_kwargs={
                "history": ray.put(
                    store.open_attempts(setup.options.max_attempts if setup.options.retry_rejected else None)
                ),
                "sampling": sampling,
                "template": setup.options.template,
            },
            num_cpus=0.1,  # CPU stages ask for little, or a fixed pool can wait forever on a small cluster
        )
        return ask_in_passes(
            first,
            processor,
            lambda rows: ray.data.from_items(rows),
            store,
            model=teacher.model,
            schema_id=setup.options.schema_id,
            template=load_template(setup.options.template),
            max_attempts=setup.options.max_attempts,
            sampling=sampling,
            report=report,
        )
