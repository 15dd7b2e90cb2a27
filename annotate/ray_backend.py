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
  which Ray retries elsewhere). A killed driver loses at most the requests in flight, exactly as
  a killed local run does; the same command then resumes.

The anti-join: keys the store has settled (answered or rejected) are sent to the tasks; such an
episode travels back without its prompt and images (the driver only assembles its record). On
GPU clusters, `--teacher vllm` asks through `ray.data.llm`'s vLLM replicas instead (`ray_vllm`).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import RefineError, SourceError

if TYPE_CHECKING:
    from .part import AnnotateArgs, RunSetup
    from .teacher_requests import PreparedRequest

RAY_EXTRA = "pip install 'refinevla[ray]'"
CHUNK_MAX = 32  # episodes per preparation task at most (a lost task re-prepares at most this many)


def import_ray() -> Any:
    """The ray module, or one line saying how to get it."""
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


def check_address(address: str, timeout: float = 5.0) -> None:
    """One line, quickly, when nothing listens at HOST:PORT (ray.init would wait a minute, then trace back)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RefineError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 127.0.0.1:6379), 'auto' or 'local'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RefineError(
            f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
            "`ray start --head` or give the head's address"
        ) from None


def connect(address: str | None) -> Any:
    """ray.init for the run: 'local'/None starts a private cluster on this machine; 'auto' or HOST:PORT joins one."""
    ray = import_ray()
    if address and address not in ("auto", "local"):
        check_address(address.removeprefix("ray://"))
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False, "include_dashboard": False}
    if not address or address == "local":
        kwargs["address"] = "local"
        kwargs["_node_ip_address"] = "127.0.0.1"  # never bind a private cluster to the network
    else:
        kwargs["address"] = address
        if address.removeprefix("ray://").rpartition(":")[0] in ("127.0.0.1", "localhost"):
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


def prepare_chunk(batch: dict[str, Any], spec: PrepareSpec, settled: Any) -> dict[str, list[Any]]:
    """One preparation task: read a chunk of episodes and prepare their requests (runs on the cluster).

    A settled request (the store has its answer or its reject) goes back without its prompt and
    keyframes: the driver only assembles its record. An episode the engine cannot ask (a bad
    state) becomes an error row, raised as the local backend would raise it, in one line.
    """
    from ..schemas import teacher_response_format
    from .prompts import load_template
    from .source_args import open_cli_source
    from .sources import ReadOptions
    from .teacher_requests import prepare_request

    if not isinstance(settled, frozenset):  # an ObjectRef: resolved once per task
        import ray

        settled = ray.get(settled)

    source = open_cli_source(*spec.source)
    template = load_template(spec.template)
    response_format = teacher_response_format(spec.schema_id, spec.schema_backend)
    rows: dict[str, list[Any]] = {"payload": [], "error": []}
    for start, stop in zip(batch["start"], batch["stop"], strict=True):
        for episode in source.iter_episodes(ReadOptions(start=int(start), stop=int(stop))):
            try:
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
            except SourceError as exc:
                rows["payload"].append(b"")
                rows["error"].append(str(exc))
                continue
            # the keyframes' bytes are in the messages already (base64): never ship them twice; a settled
            # request needs neither, only the facts its record is assembled from
            messages = [] if item.key in settled else item.bundle.messages
            item.bundle = replace(item.bundle, keyframes=[], messages=messages)
            rows["payload"].append(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
            rows["error"].append("")
    return rows


def prepared_dataset(ray: Any, setup: RunSetup, args: AnnotateArgs, cluster: Cluster, settled: frozenset[str]) -> Any:
    """The Ray dataset of the selection's prepared requests (rows: payload, error), or None if empty."""
    from ..schemas import backend_for

    spec = PrepareSpec(
        source=args.source_args(),
        teacher=TeacherIdentity.of(setup.teacher),
        template=setup.options.template,
        frames=setup.options.frames,
        schema_id=setup.options.schema_id,
        schema_detail=setup.options.schema_detail,
        schema_backend=setup.options.schema_backend or backend_for(setup.teacher.name).name,
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


def prepared_stream(ds: Any, expected: int) -> Iterator[PreparedRequest]:
    """The prepared requests of `prepared_dataset`, unpickled on the driver in the order they are ready.

    Every selected episode must come back: a shortfall is an error, never a smaller dataset.
    """
    if ds is None:
        return
    rows = iter(ds.iter_rows())
    seen = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            if seen != expected:
                raise RefineError(f"the Ray cluster prepared {seen} of the {expected} selected episodes") from None
            return
        except Exception as exc:  # a task's own error, wrapped by Ray: one line, not its traceback
            raise task_error(exc) from None
        seen += 1
        if row["error"]:
            raise SourceError(row["error"])
        yield pickle.loads(row["payload"])


def task_error(exc: BaseException) -> RefineError:
    """The RefineError a preparation task raised (opening the source on a node), or one line for anything else."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, RefineError):
            return cause
        inner = getattr(cause, "cause", None)  # RayTaskError keeps the task's exception here
        cause = inner if isinstance(inner, BaseException) else (cause.__cause__ or cause.__context__)
    last = str(exc).strip().splitlines()
    return RefineError(
        f"preparing requests on the Ray cluster failed: {type(exc).__name__}: {last[-1] if last else ''}"
    )


def settled_keys(setup: RunSetup) -> frozenset[str]:
    """Keys the store has answered or rejected (the anti-join's right side)."""
    from .store import ResultStore

    if not setup.store_path.exists():
        return frozenset()
    with ResultStore(setup.store_path) as store:
        return store.settled_keys()


def run_on_ray(args: AnnotateArgs, setup: RunSetup) -> tuple[Any, Cluster]:
    """The run's engine pass with preparation on the cluster; returns (PartResult, the cluster used)."""
    from .part import run_part

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray = connect(args.ray_address)
    try:
        cluster = cluster_of(ray, args.ray_address, args.ray_workers)
        started = time.monotonic()
        if setup.teacher.name == "vllm":  # the replicas answer into the store; the engine then writes from it
            from .ray_vllm import run_replicas

            ds = prepared_dataset(ray, setup, args, cluster, frozenset())
            if ds is not None:
                cluster.replies = run_replicas(ray, args, setup, ds)
            setup.options = replace(
                setup.options, ask=False, unasked_reason="no answer from the vLLM replicas; rerun to ask again"
            )
        ds = prepared_dataset(ray, setup, args, cluster, settled_keys(setup))
        stream = prepared_stream(ds, setup.total)
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
        ray.shutdown()
