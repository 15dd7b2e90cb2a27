"""`annotate --backend ray`: request preparation on a Ray cluster, the engine's guarantees on the driver.

Where the time goes in a run against a fast teacher is preparation: reading and decoding frames,
choosing keyframes, JPEG-encoding them and hashing the episode (~6 ms of CPU per request, so one
process prepares ~170 requests/s on 2 cores). That work moves to the cluster: a Ray Data pipeline
from the selected episodes (in chunks, each read by a task with the run's own source reader) to
prepared requests, streamed to the driver as they are ready.

What stays on the driver, and why:
- The dispatch: the one `Engine` the local backend runs, over the prepared stream. Global RPM and
  TPM limits, `--max-cost`, a 429's `Retry-After` pausing every new request, re-asks with the
  validation errors and rejects with reasons are then exact — one dispatcher, one count — and a
  dataset annotated on Ray is the local one by construction (same keys, prompts, checks, records).
  Asking is I/O: one asyncio loop keeps thousands of requests in flight at no CPU to speak of.
  (Ray Data's own HTTP stage was measured here at 4-19 requests/s, aborting the whole job on a
  non-JSON 500; it is not used.)
- The durable store: the run's SQLite file in `OUT/.refine/` on the driver's disk. Every answer
  arrives at the driver, and is committed there before it is used, so no storage shared by all
  nodes is needed and a lost worker node loses no answer at all (it held only preparation work,
  which Ray runs again on the nodes left). A killed driver loses at most the requests in flight and
  the answers being committed (--concurrency of each), exactly as a killed local run does; the same
  command then resumes.

The anti-join: keys the store has settled (answered or rejected) are sent to the tasks, which hash
each episode's request key before building its prompt (the keyframe steps follow from the states,
stored frames are hashed as they are stored) and skip a settled one before decoding a frame; it
travels back without prompt or images (the driver only assembles its record). A rerun of a finished
run therefore decodes and encodes nothing. (A video-backed source has no stored frame bytes: its
key hashes the shown frames' pixels, on every backend, so those are decoded to hash them.)

A bug in a task (anything but a `RefineError`) ends the run with its traceback, the task's own
frames included (Ray's error carries them); a `RefineError` there (a source a node cannot open, a bad
episode) travels back as a row and is one line, as on the local backend. On GPU clusters,
`--teacher vllm` asks through `ray.data.llm`'s vLLM replicas instead (`ray_vllm`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .episode import FrameSequence
from .errors import RefineError

if TYPE_CHECKING:
    import numpy as np

    from .episode import Episode
    from .part import AnnotateArgs, RunSetup
    from .prompts import EpisodeFacts, PromptTemplate
    from .teacher_requests import PreparedRequest

RAY_EXTRA = "pip install 'refinevla[ray]'"
CHUNK_MAX = 32  # episodes per preparation task at most (a lost task re-prepares at most this many)
# Test hook: a directory every node can write (the tests' cluster is one machine). When the driver's
# environment names one, each preparation task appends what it did to DIR/tasks.log (one JSON object
# a line: its chunk, node and pid when it starts; the frames it decoded and the prompts it built when
# it ends) and, while DIR/hold exists, waits after starting: a node can then be killed under running
# tasks. Unset (production), the tasks do none of this.
JOURNAL_ENV = "REFINEVLA_RAY_JOURNAL"


def import_ray() -> Any:
    """The ray module, or one line saying how to get it."""
    # Never a cluster by accident: a Ray call after `ray.shutdown()` (a straggling thread) must fail,
    # not start a private cluster in this process. Read by ray when imported; the run calls ray.init.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RefineError(f"--backend ray needs the [ray] extra: {RAY_EXTRA} ({exc})") from None
    # Ray's INFO/WARNING lines (dataset finished, progress bars off, a private cluster's token) would
    # break the one live progress line; its errors still show.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return ray


@dataclass(frozen=True)
class TeacherIdentity:
    """What a request key needs of the teacher (name, model, sampling): no client, no API key on the cluster."""

    name: str
    model: str
    sampling_params: tuple[tuple[str, Any], ...]

    def sampling(self) -> dict[str, Any]:
        return dict(self.sampling_params)

    @classmethod
    def of(cls, teacher: Any) -> TeacherIdentity:
        return cls(teacher.name, teacher.model, tuple(sorted(teacher.sampling().items())))


@dataclass(frozen=True)
class PrepareSpec:
    """Everything a preparation task needs to rebuild the run's requests, picklable (no secrets)."""

    source: tuple[Any, ...]  # open_cli_source's arguments
    teacher: TeacherIdentity
    template: str
    frames: Any  # FrameOptions
    schema_id: str
    schema_detail: str
    schema_backend: str
    journal: str | None = None  # JOURNAL_ENV's directory (tests only)


@dataclass
class Cluster:
    """The cluster a run used, for the manifest and the summary."""

    address: str
    nodes: int
    cpus: float
    workers: int  # preparation tasks at once
    replies: Any = None  # --teacher vllm: what the replicas did (ray_vllm.PassSummary)

    def manifest(self) -> dict[str, Any]:
        out = {"name": "ray", "address": self.address, "nodes": self.nodes, "cpus": self.cpus, "workers": self.workers}
        if self.replies is not None:
            r = self.replies
            out["vllm"] = {"passes": r.passes, "answers": r.answers, "invalid": r.invalid, "errors": dict(r.errors)}
        return out


def check_address(address: str, timeout: float = 5.0, given: str | None = None) -> None:
    """One line, quickly, when nothing listens at HOST:PORT (ray.init would wait a minute, then trace back).

    `given`: how the user named it, when not as HOST:PORT (`--ray-address auto` through $RAY_ADDRESS)."""
    flag = f"--ray-address {given or address}"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RefineError(f"{flag}: expected HOST:PORT (e.g. 127.0.0.1:6379), 'auto' or 'local'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RefineError(
            f"{flag}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
            "`ray start --head` or give the head's address"
        ) from None


def joined_address(address: str) -> str:
    """What `--ray-address` joins: 'auto' is Ray's own `RAY_ADDRESS` when that is set (so it is checked and
    recognised as a loopback cluster like a HOST:PORT given), else left to Ray (the cluster `ray start` on
    this machine recorded)."""
    if address == "auto":
        return os.environ.get("RAY_ADDRESS", "").strip() or "auto"
    return address


def connect(address: str | None) -> Any:
    """ray.init for the run: 'local'/None starts a private cluster on this machine; 'auto' or HOST:PORT joins one."""
    ray = import_ray()
    target = joined_address(address) if address else None
    if target and target not in ("auto", "local"):
        check_address(
            target.removeprefix("ray://"), given=None if target == address else f"auto ($RAY_ADDRESS={target})"
        )
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False, "include_dashboard": False}
    if not target or target == "local":
        kwargs["address"] = "local"
        kwargs["_node_ip_address"] = "127.0.0.1"  # never bind a private cluster to the network
    else:
        kwargs["address"] = target
        if target.removeprefix("ray://").rpartition(":")[0] in ("127.0.0.1", "localhost"):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a loopback cluster: else Ray picks the network address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "no running cluster found (start one with `ray start --head`)" if address == "auto" else str(exc)
        raise RefineError(f"--ray-address {address}: cannot join the Ray cluster: {where.splitlines()[0]}") from None
    return ray


def cluster_of(ray: Any, address: str | None, workers: int | None) -> Cluster:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return Cluster(
        address=address or "local",
        nodes=len(nodes),
        cpus=cpus,
        workers=max(1, workers if workers else int(cpus)),
    )


def chunks(start: int, stop: int, workers: int) -> list[dict[str, int]]:
    """Contiguous episode ranges, about 4 per worker (so a slow one is not the tail), each ≤ CHUNK_MAX."""
    n = stop - start
    if n <= 0:
        return []
    size = max(1, min(CHUNK_MAX, -(-n // (4 * workers))))
    return [{"start": a, "stop": min(stop, a + size)} for a in range(start, stop, size)]


class _CountedFrames(FrameSequence):
    """A camera's frames that count each frame decoded into a shared tally (the journal's, tests only)."""

    def __init__(self, frames: FrameSequence, tally: list[int]) -> None:  # no super().__init__: it delegates
        self._frames = frames
        self._tally = tally
        self._length = len(frames)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        self._tally[0] += 1
        return self._frames[index]

    def encoded(self, index: int) -> bytes | None:
        return self._frames.encoded(index)


@dataclass
class TaskJournal:
    """One chunk's lines in JOURNAL_ENV's DIR/tasks.log (a test hook: see JOURNAL_ENV)."""

    directory: Path
    chunk: int  # the chunk's first episode
    node: str  # the Ray node id the task runs on
    decoded: list[int]  # frames decoded so far, one cell shared with the episodes' frames
    prompts: int = 0  # prompts built (keyframes chosen, encoded)

    @classmethod
    def begin(cls, directory: str | None, chunk: int) -> TaskJournal | None:
        """None in production; in a test, the chunk's start noted, then held while DIR/hold exists."""
        if not directory:
            return None
        import ray

        journal = cls(Path(directory), chunk, ray.get_runtime_context().get_node_id(), [0])
        journal.note("start")
        while (journal.directory / "hold").exists():
            time.sleep(0.05)
        return journal

    def watch(self, episode: Episode) -> None:
        """Count the frames decoded from now on in `episode`."""
        episode.frames = {camera: _CountedFrames(frames, self.decoded) for camera, frames in episode.frames.items()}

    def note(self, event: str) -> None:
        line = {"event": event, "chunk": self.chunk, "node": self.node, "pid": os.getpid()}
        if event == "done":
            line |= {"decoded": self.decoded[0], "prompts": self.prompts}
        with open(self.directory / "tasks.log", "a") as f:  # one short append: whole lines from every task
            f.write(json.dumps(line) + "\n")


def request_key_of(
    episode: Episode, facts: EpisodeFacts, spec: PrepareSpec, template: PromptTemplate
) -> tuple[str, dict[str, Any]] | None:
    """The key (and frame choice) `prepare_request` gives the episode, without building its prompt: the
    same two functions compute them (`prompts.frame_choice`: the keyframe steps follow from the states;
    `teacher_requests.episode_request_key`: the shown frames hashed as stored), so nothing is decoded or
    encoded. None when the episode names no such camera: `prepare_request` then says so.
    """
    from .prompts import frame_choice
    from .teacher_requests import episode_request_key

    try:
        frame_key = frame_choice(episode, facts, spec.frames)
    except ValueError:
        return None
    detail: Any = spec.schema_detail  # checked against SCHEMA_DETAILS by setup_run
    key = episode_request_key(episode, frame_key, spec.teacher, template, spec.schema_id, detail)
    return key, frame_key


def prepare_unless_settled(
    episode: Episode,
    spec: PrepareSpec,
    template: PromptTemplate,
    response_format: dict[str, Any],
    settled: frozenset[str],
) -> tuple[PreparedRequest, bool]:
    """The episode's request, and whether its prompt was built: a settled one is returned without it.

    Raises SourceError, as `prepare_request` does, for an episode the engine cannot ask.
    """
    from ..schemas import SemanticContext
    from .episode import STATE_DIM
    from .prompts import PromptBundle, episode_facts
    from .teacher_requests import PreparedRequest, prepare_request

    # a state motion primitives cannot read: prepare_request says what is wrong with it
    askable = episode.states.ndim == 2 and episode.states.shape[1] == STATE_DIM
    facts = episode_facts(episode) if askable else None
    known = request_key_of(episode, facts, spec, template) if facts is not None else None
    if known is not None and facts is not None and known[0] in settled:
        key, frame_key = known
        return PreparedRequest(
            key=key,
            episode_id=episode.episode_id,
            dataset=episode.dataset,
            instruction=episode.instruction,
            actions=episode.actions,
            states=episode.states,
            bundle=PromptBundle([], facts, [], None, template, frame_key),
            estimated_prompt_tokens=0,
            context=SemanticContext(facts.num_steps, len(facts.segments)),  # settled: never checked again
            response_format=response_format,
        ), False
    item = prepare_request(
        episode,
        teacher=spec.teacher,  # type: ignore[arg-type]  # what a key needs of a Teacher
        template=template,
        frames=spec.frames,
        schema_id=spec.schema_id,
        schema_detail=spec.schema_detail,  # type: ignore[arg-type]
        schema_backend=spec.schema_backend,
        static_response_format=response_format,
    )
    if known is not None and item.key != known[0]:  # the two must never drift: a wrong match reuses an answer
        raise AssertionError(f"request_key_of gave {known[0]} where prepare_request gave {item.key}")
    return item, True


def images_in(messages: list[dict[str, Any]]) -> int:
    """Image parts in chat messages: what a vLLM replica must admit per prompt."""
    return sum(
        part.get("type") == "image_url" for m in messages if isinstance(m["content"], list) for part in m["content"]
    )


def prepare_chunk(batch: dict[str, Any], spec: PrepareSpec, settled: Any) -> dict[str, list[Any]]:
    """One preparation task: read a chunk of episodes and prepare their requests (runs on the cluster).

    Rows: `payload` (the pickled request; a settled one without prompt and images, which the driver
    does not need), `ask` (whether it has its prompt: not settled), `images` (image parts in its prompt)
    and `error`. A user's error (a source this node cannot open or read, an episode the engine cannot
    ask) ends the task as a last row with its message, raised on the driver in one line as the local
    backend raises it: raised here, Ray would deliver it wrapped, its class lost. A bug is raised, and
    reaches the driver with its traceback.
    """
    from ..schemas import teacher_response_format
    from .prompts import load_template
    from .source_args import open_cli_source
    from .sources import ReadOptions

    if not isinstance(settled, frozenset):  # an ObjectRef: resolved once per task
        import ray

        settled = ray.get(settled)

    rows: dict[str, list[Any]] = {"payload": [], "ask": [], "images": [], "error": []}

    def add(payload: bytes, ask: bool, images: int, error: str) -> None:
        for column, value in zip(rows, (payload, ask, images, error), strict=True):
            rows[column].append(value)

    try:
        source = open_cli_source(*spec.source)
        template = load_template(spec.template)
        response_format = teacher_response_format(spec.schema_id, spec.schema_backend)
        for start, stop in zip(batch["start"], batch["stop"], strict=True):
            journal = TaskJournal.begin(spec.journal, int(start))
            for episode in source.iter_episodes(ReadOptions(start=int(start), stop=int(stop))):
                if journal is not None:
                    journal.watch(episode)
                item, built = prepare_unless_settled(episode, spec, template, response_format, settled)
                if journal is not None:
                    journal.prompts += built
                # the keyframes' bytes are in the messages already (base64): never ship them twice
                item.bundle = replace(item.bundle, keyframes=[])
                add(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL), built, images_in(item.bundle.messages), "")
            if journal is not None:
                journal.note("done")
    except RefineError as exc:
        add(b"", False, 0, str(exc) or type(exc).__name__)
    return rows


def without_prompts(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """Prepared rows with their prompts and images dropped: what the driver needs to write a dataset from the
    store (runs on the cluster, so the images do not travel to the driver a second time)."""
    payloads = []
    for payload in batch["payload"]:
        item = pickle.loads(payload) if payload else None
        if item is not None and item.bundle.messages:
            item.bundle = replace(item.bundle, messages=[])
            payload = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        payloads.append(payload)
    return {"payload": payloads, "error": list(batch["error"])}


def prepared_dataset(ray: Any, setup: RunSetup, args: AnnotateArgs, cluster: Cluster, settled: frozenset[str]) -> Any:
    """The Ray dataset of the selection's prepared requests (rows: `prepare_chunk`'s), or None if empty."""
    from ..schemas import backend_for

    spec = PrepareSpec(
        source=args.source_args(),
        teacher=TeacherIdentity.of(setup.teacher),
        template=setup.options.template,
        frames=setup.options.frames,
        schema_id=setup.options.schema_id,
        schema_detail=setup.options.schema_detail,
        schema_backend=setup.options.schema_backend or backend_for(setup.teacher.name).name,
        journal=os.environ.get(JOURNAL_ENV) or None,
    )
    items = chunks(setup.start, setup.stop, cluster.workers)
    if not items:
        return None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False  # first ready, first asked
    ctx.print_on_execution_start = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        prepare_chunk,
        batch_size=1,
        fn_kwargs={"spec": spec, "settled": ray.put(settled)},
        compute=ray.data.TaskPoolStrategy(size=cluster.workers),
        num_cpus=1,
    )  # Ray Data retries a task lost with its node elsewhere (max_retries=-1 on system failures)
    return ds


# How long the driver waits, before `ray.shutdown()`, for a thread still inside Ray Data's iterator (the engine's
# producer, waiting for a block the cluster is still preparing when the run stopped): Ray ends the whole process
# (exit 1, "The core worker has already been shutdown") when a thread touches it after shutdown.
STREAM_IDLE_WAIT_S = 300.0


class PreparedStream:
    """The prepared requests of `prepared_dataset` (None: nothing to prepare), unpickled on the driver in the
    order they are ready.

    Every selected episode must come back: a shortfall is an error, never a smaller dataset. An iterator
    the driver can wait for before `ray.shutdown()`: a stopped run (max-cost, Ctrl-C, an error) leaves the
    engine's producer inside `next` while the cluster prepares the next block, and the engine waits for it
    only `engine.PRODUCER_CLOSE_S`; `wait_idle` lets `run_on_ray` wait until no thread is in Ray Data.
    """

    def __init__(self, ds: Any, expected: int) -> None:
        self._ds, self._expected, self._seen = ds, expected, 0
        self._rows: Iterator[dict[str, Any]] | None = None
        self._idle = threading.Event()  # set while no thread is inside Ray Data's iterator
        self._idle.set()
        self._closed = False

    def __iter__(self) -> PreparedStream:
        return self

    def __next__(self) -> PreparedRequest:
        if self._ds is None or self._closed:
            raise StopIteration
        self._idle.clear()
        try:
            if self._rows is None:
                self._rows = iter(self._ds.iter_rows())
            try:
                row = next(self._rows)
            except StopIteration:
                if self._seen != self._expected:
                    message = f"the Ray cluster prepared {self._seen} of the {self._expected} selected episodes"
                    raise RefineError(message) from None
                raise
            self._seen += 1
            if row["error"]:
                raise RefineError(row["error"])
            return pickle.loads(row["payload"])  # type: ignore[no-any-return]
        except BaseException:
            self._close_rows()  # an error stops the stream: its executor goes down now, not at garbage collection
            raise
        finally:
            self._idle.set()

    def close(self) -> None:
        """Shut Ray Data's executor down now. Left to the garbage collector, its scheduling thread outlives
        `ray.shutdown()` and its next `ray.wait` would start a private cluster in this process."""
        self._closed = True
        self._close_rows()

    def _close_rows(self) -> None:
        rows, self._rows = self._rows, None
        close = getattr(rows, "close", None)
        if close is not None:
            close()

    def wait_idle(self, timeout: float) -> bool:
        """Whether no thread is inside Ray Data's iterator, waiting up to `timeout` s for the one that is."""
        return self._idle.wait(timeout)


def shut_down(ray: Any, stream: PreparedStream | None) -> None:
    """`ray.shutdown()` once no thread is inside the stream (see STREAM_IDLE_WAIT_S) and its executor is down."""
    if stream is not None:
        if not stream.wait_idle(STREAM_IDLE_WAIT_S):
            print(f"a thread still waits on the Ray cluster after {STREAM_IDLE_WAIT_S:.0f} s", file=sys.stderr)
        else:
            stream.close()
    ray.shutdown()


def settled_keys(setup: RunSetup) -> frozenset[str]:
    """Keys the store has answered or rejected (the anti-join's right side), less the rejects
    --retry-rejected asks again."""
    from .store import ResultStore

    if not setup.store_path.exists():
        return frozenset()
    options = setup.options
    with ResultStore(setup.store_path) as store:
        return store.settled_keys(options.max_attempts if options.retry_rejected else None)


def run_on_ray(args: AnnotateArgs, setup: RunSetup) -> tuple[Any, Cluster]:
    """The run's engine pass with preparation on the cluster; returns (PartResult, the cluster used)."""
    from .part import run_part

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray = connect(args.ray_address)
    stream: PreparedStream | None = None
    try:
        cluster = cluster_of(ray, args.ray_address, args.ray_workers)
        started = time.monotonic()
        if setup.teacher.name == "vllm":
            from .ray_vllm import replicas_for

            # before anything is prepared: a cluster without GPUs is told so at once
            replicas = replicas_for(float(ray.cluster_resources().get("GPU", 0.0)), args.tensor_parallel_size)
        ds = prepared_dataset(ray, setup, args, cluster, settled_keys(setup))
        if setup.teacher.name == "vllm":  # the replicas answer into the store; the engine then writes from it
            from .ray_vllm import run_replicas

            if ds is not None:
                # prepared once, held by the cluster (spilled to its disks if need be): the replicas are
                # sized to its largest prompt, ask from it, and the dataset is written from it
                ds = ds.materialize()
                cluster.replies = run_replicas(ray, args, setup, ds, replicas)
                ds = ds.map_batches(without_prompts, batch_size=8, num_cpus=0.1)
            setup.options = replace(
                setup.options, ask=False, unasked_reason="no answer from the vLLM replicas; rerun to ask again"
            )
        stream = PreparedStream(ds, setup.total)
        part = run_part(args, setup, setup.start, setup.stop, setup.out, live_progress=True, items=stream)
        part.seconds = max(part.seconds, time.monotonic() - started)
        if cluster.replies is not None:  # answered by the replicas in this run, settled from the store after
            r, c = cluster.replies, part.counters
            c["annotated"], c["cached"] = c["annotated"] + r.answers, max(0, c["cached"] - r.answers)
            c["requests"] += r.answers + r.invalid
            c["reasks"] += r.invalid - r.rejected
            c["prompt_tokens"] += r.prompt_tokens
            c["completion_tokens"] += r.completion_tokens
        return part, cluster
    finally:
        shut_down(ray, stream)
