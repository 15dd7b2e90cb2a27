"""One part of an `annotate` run: the parsed flags, the shared setup, and the engine over a range.

Both the command (`commands.annotate`, one process) and the worker runner (`parallel`, many) build on
this module, so their dependencies point one way: command -> parallel -> part, command -> part.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..schemas.dataset_layout import PRIVATE_DIR
from .cli_options import (
    ACTION_KEY_FLAG,
    CAMERA_FLAG,
    DATA_DIR_FLAG,
    INSTRUCTION_KEY_FLAG,
    RAY_ADDRESS_FLAG,
    SOURCE_FLAG,
    SPLIT_FLAG,
    STATE_KEY_FLAG,
    option,
)
from .errors import RefineError
from .processes import ProcessChoice, choose_processes, parse_processes
from .sources.base import ReadOptions
from .teachers.refusals import DEFAULT_REFUSALS_TO_STOP


@dataclass
class AnnotateArgs:
    """Everything `annotate` was asked to do: one field per flag (its help is the field's documentation)."""

    source: str = option(help=SOURCE_FLAG)
    teacher: str = option("rule-based", "rule-based | gemini | openai | openai-compatible | vllm.")
    model: str | None = option(None, "Model id (default per teacher).")
    base_url: str | None = option(None, "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    out: Path | None = option(None, "Output dir (default runs/<source>-<teacher>).")
    data_dir: str | None = option(None, DATA_DIR_FLAG)  # layout flags, as for inspect/stats
    split: str = option("train", SPLIT_FLAG)
    camera: list[str] | None = option(None, CAMERA_FLAG)
    instruction_key: str | None = option(None, INSTRUCTION_KEY_FLAG)
    state_key: str | None = option(None, STATE_KEY_FLAG)
    action_key: str | None = option(None, ACTION_KEY_FLAG)
    frames: int = option(
        6,
        "K evenly spaced keyframes (+ gripper events). 0: a text-only prompt, no image at all (a teacher "
        "without vision, or vLLM's CPU build); the answers then carry no object boxes.",
    )
    image_size: int = option(256, "Longest keyframe side in pixels.")
    prompt_template: str | None = option(
        None, "Prompt template version (default: rationale-v1; with --frames 0 rationale-v1-text: no image sent)."
    )
    schema_id: str = "refinevla.rationale/1"  # not a flag: the schema the teacher answers in
    concurrency: int = option(16, "Requests in flight at most.")
    rpm: float | None = option(None, "Requests per minute limit.")
    tpm: float | None = option(None, "Tokens per minute limit.")
    timeout: float = option(120.0, "Seconds per request.")
    max_attempts: int = option(3, "Answers per episode (ask + re-asks with the errors).")
    max_retries: int = option(6, "Retries per ask on 429/5xx/timeouts (never on a 400).")
    retry_rejected: bool = option(
        False,
        "Ask again the episodes the output's store holds as rejected: those the teacher refused (an HTTP 400 "
        "of an earlier run or setup) always, those whose answers failed the checks only while --max-attempts "
        "allows more answers than they got (the re-asks go on from the stored answers). An old reject is "
        "replaced only once the new ask settles the episode.",
    )
    refusals_to_stop: int = option(
        DEFAULT_REFUSALS_TO_STOP,
        "Identical refusals (same HTTP status and message, numbers and ids aside) of this many distinct "
        "episodes in a row stop the run as a setup error, storing no reject for them; 0: never (each "
        "refusal rejects its episode). Refusals that name the setup (a model without images, a schema the "
        "server cannot compile, an unknown parameter) stop at the first; those that name one episode (its "
        "context length, its content) never do.",
    )
    retry_base: float = option(1.0, "First backoff in seconds (doubles).")
    max_cost: float | None = option(None, "Stop cleanly at this spend (USD).")
    limit: int | None = option(None, "At most N episodes (of this shard).")
    sample: int | None = option(
        None,
        "N episodes spread evenly over the selection (episode start + i*span//N: the same N on every run), "
        "e.g. a pilot of a teacher before the whole source.",
    )
    shard: str = option("0/1", "i/n: this machine's contiguous part.")
    dry_run: bool = option(False, "Print the first request and a token/cost estimate; ask nothing.")
    temperature: float = option(0.2, "Sampling temperature.")
    max_tokens: int = option(4096, "Completion token limit.")
    prices: Path | None = option(None, "JSON price table overriding the packaged one.")
    tensor_parallel_size: int = option(1, "GPUs for --teacher vllm.")
    vllm_args: str | None = option(
        None,
        "--teacher vllm: the engine's arguments as a JSON object, what `vllm serve` takes as flags, e.g. "
        '\'{"max_model_len": 16384, "gpu_memory_utilization": 0.85}\'. How the engine runs, not what is asked: '
        "recorded in the manifest, not in the request keys.",
    )
    progress: str = option("auto", "auto | rich | plain | none.")
    license: str | None = option(None, "Card license (Hub id); required where the source's is not known.")
    processes: str = option(
        "auto",
        "Engine processes on this machine, limits shared: auto = one per core (at most 4, each with 256+ "
        "episodes) for --teacher openai-compatible (a self-hosted server: vLLM, SGLang), 1 for a rate-limited "
        "API, a local vLLM engine, rule-based, --batch and --backend ray; or a number.",
    )
    backend: str = option(
        "local",
        "local | ray. ray: episodes are read and requests prepared (frames decoded, keyframes encoded) on a Ray "
        "cluster's CPUs; this process asks the teacher and commits every answer to OUT's store, as local does. "
        "Needs the \\[ray] extra.",
    )
    ray_address: str | None = option(None, RAY_ADDRESS_FLAG)
    ray_workers: int | None = option(None, "--backend ray: preparation tasks at once (default: the cluster's CPUs).")
    schema_detail: str | None = option(
        None,
        "static | episode. What the structured-output schema says: static = every constraint of the "
        "schema file the backend can express (lengths, bounds); episode = also this episode's facts (step "
        "range, one move reason per motion segment, box within the keyframe), so a constrained decoder "
        "cannot write an answer the checks reject. Default: episode for vllm and openai-compatible (they "
        "compile and cache a grammar per schema), static for openai and gemini (a new schema on every "
        "request costs those providers schema-processing latency).",
    )
    batch: bool = option(
        False,
        "Ask through the provider's Batch API (openai, gemini): half price, answers within 24 h. "
        "Same requests, validation and output; Ctrl-C leaves the batches running, the same command resumes.",
    )
    reask: str = option("batch", "--batch: re-ask invalid answers in the next batch, or live at the end.")
    poll_interval: float = option(30.0, "--batch: seconds between looks at the batches in flight.")
    max_resubmits: int = option(3, "--batch: times a request whose line expired or failed is resent.")
    batch_requests: int | None = option(None, "--batch: requests per batch file (default: the provider's limit).")
    argv: list[str] = field(default_factory=list)  # not a flag: the command line, for the resume command

    def source_args(self) -> tuple[Any, ...]:
        """`open_cli_source`'s arguments: the source as the user named and laid it out (picklable, for workers)."""
        return (
            self.source,
            self.data_dir,
            self.split,
            self.camera,
            self.instruction_key,
            self.state_key,
            self.action_key,
        )


# runs that are one engine process whatever --processes says (auto then picks 1): the reason, the flag
_ONE_PROCESS = (
    ("--batch: the provider answers in parallel", "batch"),
    ("--backend ray: the cluster prepares", "backend"),
    ("--dry-run asks nothing", "dry_run"),
)


def parse_shard(value: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise RefineError(f"--shard {value!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_range(num_episodes: int, shard: tuple[int, int], limit: int | None) -> tuple[int, int]:
    """Contiguous, deterministic episode range of a shard (like TFDS shards), cut to --limit."""
    i, n = shard
    start, stop = i * num_episodes // n, (i + 1) * num_episodes // n
    if limit is not None:
        stop = min(stop, start + max(0, limit))
    return start, stop


def sample_indices(start: int, stop: int, n: int) -> tuple[int, ...]:
    """`n` episode indices spread evenly over [start, stop): deterministic, so a rerun (or another teacher
    in a pilot) reads the same episodes; one line when the range holds fewer than `n`."""
    span = stop - start
    if n < 1:
        raise RefineError(f"--sample {n}: must be at least 1")
    if n > span:
        raise RefineError(f"--sample {n}: the selection holds only {span} episode(s)")
    return tuple(start + (i * span) // n for i in range(n))


def parse_vllm_args(text: str | None) -> dict[str, Any] | None:
    """`--vllm-args`: a JSON object of `vllm.LLM` keyword arguments (None when not given)."""
    if text is None:
        return None
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RefineError(f"--vllm-args: not JSON ({exc.msg} at character {exc.pos}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise RefineError(f"--vllm-args: expected a JSON object of engine arguments, got {text[:80]!r}")
    return value


def default_out(source: str, teacher: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rsplit("/", 1)[-1] if ":" in source else source).strip("-")
    return Path("runs") / f"{slug or 'source'}-{teacher}"


@dataclass
class RunSetup:
    """What every part of a run shares: the opened source, the selection, the teacher, the limits."""

    source: Any
    start: int
    stop: int
    teacher: Any
    prices: Any
    options: Any
    out: Path
    shard: tuple[int, int]
    suffix: str  # "" for a single shard, "-i-of-n" otherwise: names the store, manifest and rejects
    indices: tuple[int, ...] | None = None  # --sample: the episodes of [start, stop) the run reads
    processes: ProcessChoice = field(default_factory=lambda: ProcessChoice(1, "1", "as given"))  # engine processes

    @property
    def total(self) -> int:
        return self.count(self.start, self.stop)

    def count(self, start: int, stop: int) -> int:
        """Episodes of the run within [start, stop) (a process's part of the range)."""
        if self.indices is None:
            return stop - start
        return sum(1 for i in self.indices if start <= i < stop)

    def read(self, start: int, stop: int) -> Iterator[Any]:
        """The run's episodes within [start, stop), streamed from the source in index order."""
        if self.indices is None:
            yield from self.source.iter_episodes(ReadOptions(start=start, stop=stop))
            return
        for i in self.indices:  # each a seek: a sample of a large source reads N episodes, not the range
            if start <= i < stop:
                yield from self.source.iter_episodes(ReadOptions(start=i, stop=i + 1))

    @property
    def store_path(self) -> Path:
        return self.out / PRIVATE_DIR / f"store{self.suffix}.sqlite"


@dataclass
class PartResult:
    """What one engine run over a range did: the numbers the manifest and the exit code need."""

    counters: dict[str, Any]  # Counters fields (this run)
    statuses: dict[str, int]  # episodes by final status, as written
    reject_reasons: dict[str, int]
    counts: dict[str, int]  # rows written: episodes, steps
    stop_reason: str | None
    seconds: float = 0.0  # how long the engine ran (the rate in the summary line is per this)
    failure_reasons: dict[str, int] = field(default_factory=dict)  # why episodes failed this run (retry later)


def setup_run(args: AnnotateArgs) -> RunSetup:
    """Validate flags, open the source, build the teacher and engine options (no request sent)."""
    from ..schemas import SCHEMA_DETAILS, default_detail
    from .engine import EngineOptions
    from .pricing import PriceTable
    from .prompts import FrameOptions, default_template, load_template
    from .source_args import open_cli_source
    from .teachers import make_teacher

    shard = parse_shard(args.shard)
    requested = parse_processes(args.processes)  # None: auto, chosen once the teacher and selection are known
    for name, value in (("--concurrency", args.concurrency), ("--max-attempts", args.max_attempts)):
        if value < 1:
            raise RefineError(f"{name} must be at least 1")
    if args.frames < 0:
        raise RefineError("--frames must be at least 0 (0: a text-only prompt)")
    template = args.prompt_template or default_template(args.frames)
    try:
        shows_images = load_template(template).images
    except ValueError as exc:
        raise RefineError(f"--prompt-template: {exc}") from None
    if shows_images != (args.frames > 0):
        raise RefineError(
            f"--prompt-template {template} is asked with images: use it with --frames 1 or more"
            if shows_images
            else f"--prompt-template {template} sends no image: use it with --frames 0"
        )
    if args.backend not in ("local", "ray"):
        raise RefineError(f"--backend must be local or ray, not {args.backend!r}")
    if args.backend == "ray":
        if requested is not None and requested > 1:
            raise RefineError("--processes is for the local backend; on Ray the cluster prepares (--ray-workers)")
        if args.batch:
            raise RefineError("--batch asks through the provider's Batch API; it does not run on --backend ray")
        if args.ray_workers is not None and args.ray_workers < 1:
            raise RefineError("--ray-workers must be at least 1")
    elif args.ray_address or args.ray_workers:
        raise RefineError("--ray-address and --ray-workers need --backend ray")
    if args.sample is not None:
        if args.limit is not None:
            raise RefineError("--sample and --limit: give one (--sample N spreads N episodes over the selection)")
        if args.backend == "ray":
            raise RefineError("--sample reads a few episodes here; it does not run on --backend ray")
    source = open_cli_source(*args.source_args())
    start, stop = shard_range(len(source), shard, args.limit)
    indices = None if args.sample is None else sample_indices(start, stop, args.sample)
    teacher = make_teacher(
        args.teacher,
        model=args.model,
        base_url=args.base_url,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        engine_args=parse_vllm_args(args.vllm_args),
        require_key=not args.dry_run,  # a dry run sends nothing: estimate before setting up keys
    )
    prices = PriceTable.load(args.prices)
    detail = args.schema_detail or default_detail(teacher.name)
    if detail not in SCHEMA_DETAILS:
        raise RefineError(f"--schema-detail must be one of {', '.join(SCHEMA_DETAILS)}, not {detail!r}")
    options = EngineOptions(
        concurrency=args.concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        max_retries=args.max_retries,
        retry_rejected=args.retry_rejected,
        refusals_to_stop=args.refusals_to_stop,
        retry_base=args.retry_base,
        max_cost=args.max_cost,
        schema_id=args.schema_id,
        schema_detail=detail,  # checked against SCHEMA_DETAILS above
        template=template,
        frames=FrameOptions(count=args.frames, camera=None, max_side=args.image_size),
        expected_completion_tokens=min(args.max_tokens, 1200),
    )
    alone = next((why for why, flag in _ONE_PROCESS if getattr(args, flag) not in (False, "local")), None)
    processes = choose_processes(
        args.processes, teacher.name, stop - start if indices is None else len(indices), alone=alone
    )
    i, n = shard
    return RunSetup(
        processes=processes,
        source=source,
        start=start,
        stop=stop,
        teacher=teacher,
        prices=prices,
        options=options,
        out=args.out or default_out(args.source, args.teacher),
        shard=shard,
        suffix="" if n == 1 else f"-{i:05d}-of-{n:05d}",
        indices=indices,
    )


def run_part(
    args: AnnotateArgs,
    setup: RunSetup,
    start: int,
    stop: int,
    rows_root: Path,
    *,
    live_progress: bool,
    stop_signal: int = signal.SIGINT,
    on_counters: Any = None,
    items: Iterable[Any] | None = None,
) -> PartResult:
    """Annotate episodes [start, stop) into `rows_root`'s Parquet files; answers go to the run's store.

    `stop_signal` is the signal that asks for a clean stop (SIGINT in the foreground process;
    worker processes get theirs from the parent). `on_counters`, when given, is called with the live
    Counters about twice a second (the parent of worker processes aggregates them). `items`, when
    given, replaces the source's episodes [start, stop): the same episodes, prepared on a cluster.
    """
    from dataclasses import asdict

    from .engine import Engine
    from .store import ResultStore
    from .writer import DatasetWriter

    episodes = items if items is not None else setup.read(start, stop)
    store = ResultStore(setup.store_path)
    writer = DatasetWriter(rows_root, args.schema_id, setup.teacher.name, setup.teacher.model, setup.shard)
    engine = Engine(setup.teacher, store, setup.options, setup.prices, sink=writer.add)
    live = args.progress == "rich" or (args.progress == "auto" and sys.stderr.isatty())
    show = live_progress and args.progress != "none"

    async def report() -> None:
        while True:
            on_counters(engine.counters)
            await asyncio.sleep(0.5)

    async def main() -> None:
        from .progress import show_progress

        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests) / Windows
            loop.add_signal_handler(stop_signal, engine.request_stop, "interrupted")
        tasks = []
        if show:
            tasks.append(asyncio.create_task(show_progress(engine.counters, live)))
        if on_counters is not None:
            tasks.append(asyncio.create_task(report()))
        try:
            await engine.run(episodes, total=setup.count(start, stop))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(stop_signal)

    try:
        asyncio.run(main())
    except BaseException:  # a failure (a full disk), not a clean stop: keep the files of earlier runs whole
        writer.abort()
        store.close()
        raise
    try:
        counts = writer.close()
    finally:
        store.close()
    counters = asdict(engine.counters)
    seconds = time.monotonic() - counters.pop("started")
    return PartResult(
        counters=counters,
        seconds=seconds,
        statuses=dict(writer.statuses),
        reject_reasons=dict(writer.reject_reasons),
        failure_reasons=dict(writer.failure_reasons),
        counts=counts,
        stop_reason=engine.stop_reason,
    )
