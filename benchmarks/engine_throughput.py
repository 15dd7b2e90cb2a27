"""Engine throughput against a fixed-latency OpenAI-compatible server.

An ideal client with C requests in flight against a server answering in L seconds achieves
C / L requests per second. This runs the real pipeline — keyframe selection on real JPEG
frames, request keys, the `openai` async client, answer validation, the SQLite store
(`synchronous=FULL`) and the Parquet writer — and reports the achieved rate against that
ideal, plus the engine's CPU time per request. The server runs in another process so its
CPU is not counted as the engine's (it does share the machine's cores).

Two rates are printed: the whole run (start signal to every row written: client start-up,
new connections and closing the Parquet files included) and the steady state (episodes
finished per second once every slot has turned over once), which is what a run over
hundreds of thousands of episodes sees.

    python benchmarks/engine_throughput.py                 # 2560 requests, C=64, L=0.2 s, 1 and 2 processes
    python benchmarks/engine_throughput.py --requests 2000 --concurrency 128 --processes 1 2 4
    python benchmarks/engine_throughput.py --cli           # and `refine-data annotate` over RLDS shards
    python benchmarks/engine_throughput.py --processes 1 --ray 1 2 4   # local vs --backend ray, by workers

Each configuration runs the engine in worker processes (1 = the plain single-process engine)
sharing the concurrency and one SQLite store, as `refine-data annotate --processes P` does.

Episodes are built in memory from a pool of real 256x256 JPEG frames (reading the source
is the source's own benchmark); each has a distinct id, so every request has its own key.
`--cli` also writes them as 8 RLDS TFRecord shards and runs `refine-data annotate` on them,
reading included, timing it by the manifest's `this_run.seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import io
import json
import multiprocessing as mp
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import cli_stages
import numpy as np
from PIL import Image

from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.episode import Episode, FrameSequence
from refinevla.annotate.store import ResultStore
from refinevla.annotate.teachers.openai_compat import OpenAICompatTeacher
from refinevla.annotate.writer import DatasetWriter

STEPS_RE = re.compile(rb"The episode has (\d+) steps")
SEGMENT_RE = re.compile(rb"\\n(\d+)\. steps \d+\.\.\d+:")
CONTENT_LENGTH_RE = re.compile(rb"(?i)content-length:\s*(\d+)")


@functools.cache
def _answer(steps: int, segments: int) -> bytes:
    """A valid chat-completion body for an episode of `steps` steps and `segments` motion segments."""
    from refinevla.annotate.batch.emulator.answers import rationale

    answer = rationale(steps, segments)
    body = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": json.dumps(answer)}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 2500, "completion_tokens": 400, "total_tokens": 2900},
    }
    return json.dumps(body).encode()


def _answer_for(head: bytes) -> bytes:
    """The answer to a request whose body starts with `head` (the prompt text comes before the images); a
    request that is no rationale prompt (a client's probe of the server) gets a one-step answer."""
    found = STEPS_RE.search(head)
    if found is None:
        return _answer(1, 1)
    steps = int(found.group(1))
    segments = max(int(m) for m in SEGMENT_RE.findall(head)) + 1 if SEGMENT_RE.search(head) else 1
    return _answer(steps, segments)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: read a request, answer it `latency` seconds later.

    A bare asyncio protocol rather than a web framework: the server shares the engine's cores,
    and aiohttp's server spends ~0.75 ms of CPU parsing each 80 KB request, which this
    benchmark would otherwise count against the engine (a real teacher runs elsewhere).
    """

    def __init__(self, latency: float, jitter: float) -> None:
        self.latency, self.jitter = latency, jitter
        self.buffer = bytearray()
        self.body_start = -1  # offset of the body of the request being read
        self.length = 0  # its Content-Length

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.body_start < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                match = CONTENT_LENGTH_RE.search(bytes(self.buffer[:end]))
                self.body_start, self.length = end + 4, int(match.group(1)) if match else 0
            if len(self.buffer) < self.body_start + self.length:
                return
            head = bytes(self.buffer[self.body_start : self.body_start + min(self.length, 16384)])
            post = self.buffer.startswith(b"POST ")
            del self.buffer[: self.body_start + self.length]
            self.body_start = -1
            if not post:  # the client asks what the server is (GET /v1/models): it says nothing
                self._respond(b'{"error": {"message": "not found"}}', b"404 Not Found")
                continue
            # jitter J: latency uniform in [L(1-J), L(1+J)], same mean (real servers' latency varies)
            delay = self.latency * (1.0 + self.jitter * (2.0 * random.random() - 1.0))
            asyncio.get_running_loop().call_later(delay, self._respond, _answer_for(head))

    def _respond(self, body: bytes, status: bytes = b"200 OK") -> None:
        if not self.transport.is_closing():
            head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            self.transport.write(head % (status, len(body)) + body)


def serve(port_queue: Any, latency: float, cpu_queue: Any, stop: Any, jitter: float = 0.0) -> None:
    """The fixed-latency server (runs in its own process, one asyncio thread)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(latency, jitter), "127.0.0.1", 0, backlog=1024)
        port_queue.put(server.sockets[0].getsockname()[1])
        while not stop.is_set():
            await asyncio.sleep(0.05)
        cpu_queue.put(time.process_time())
        server.close()

    asyncio.run(main())


def frame_pool(n: int = 48, size: int = 256) -> list[bytes]:
    """Real JPEGs of synthetic table scenes (gradient + objects), ~10 KB each like Bridge frames."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        img = np.stack([(xx + i * 3) % 256, (yy + i * 5) % 256, (xx + yy) // 2 % 256], -1).astype(np.uint8)
        for _ in range(4):
            x, y, w, h = rng.integers(0, size - 60, 2).tolist() + rng.integers(20, 60, 2).tolist()
            img[y : y + h, x : x + w] = rng.integers(0, 255, 3)
        img = np.clip(img.astype(np.int16) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_episode(i: int, pool: list[bytes], steps: int) -> Episode:
    t = np.arange(steps)
    states = np.zeros((steps, 7), np.float32)
    states[:, 0] = np.linspace(0.2, 0.35, steps)
    states[:, 1] = 0.05 * np.sin(t / 5 + i)
    states[:, 2] = np.where(t < steps // 2, 0.05, np.linspace(0.05, 0.2, steps))
    states[:, 6] = np.where((t >= steps // 3) & (t < steps - 4), 0.0, 1.0)
    actions = np.zeros_like(states)
    actions[:-1, :6] = states[1:, :6] - states[:-1, :6]
    frames = FrameSequence([pool[(i * 7 + k) % len(pool)] for k in range(steps)])
    return Episode(
        episode_id=f"bench:{i}",
        dataset="bench",
        instruction=f"put the spoon {i} on the towel",
        actions=actions,
        states=states,
        frames={"image_0": frames},
        is_first=t == 0,
        is_last=t == steps - 1,
        is_terminal=t == steps - 1,
        rewards=np.zeros(steps, np.float32),
    )


def write_source(directory: str, n: int, steps: int, size: int = 256) -> str:
    """The same episodes as `make_episode`, written as a Bridge-layout RLDS dataset (8 TFRecord shards).

    `size` above the prompt's 256-px keyframes makes every keyframe a decode + resize + JPEG encode
    (a LeRobot or DROID camera), where at 256 (Bridge) the stored JPEG is sent as it is."""
    from refinevla.annotate.sources import specs
    from refinevla.annotate.sources.rlds_writer import write_rlds

    pool = frame_pool(size=size)

    def example(i: int) -> dict[str, Any]:
        ep = make_episode(i, pool, steps)
        frames = [ep.frames["image_0"].encoded(t) for t in range(steps)]
        return specs.bridge_example(
            i, ep.states, ep.actions, {"image_0": frames}, instruction=ep.instruction, file_path=f"bench/{i}.pkl"
        )

    features = specs.bridge_features(cameras=1, image_size=(size, size))
    return write_rlds(directory, features, (example(i) for i in range(n)), name="bridge_orig", num_shards=8)


def measure_cli(
    port: int,
    args: argparse.Namespace,
    processes: int | str,
    source: str,
    tmp: str,
    *extra: str,
    env: Any = None,
    spy: Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """`refine-data annotate rlds:SOURCE --teacher openai-compatible` as a user runs it (reading included).

    `cpu` is the command's own CPU (its process and the processes it waited for): with `--backend ray`
    against a running cluster, the driver's, since the cluster's workers are not its children.
    """
    import resource
    import subprocess
    import sys

    out = f"{tmp}/cli-p{processes}-{len(os.listdir(tmp))}"
    cmd = [
        *(sys.executable, "-m", "refinevla.annotate.cli", "annotate", f"rlds:{source}"),
        *("--teacher", "openai-compatible", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "bench-model"),
        *("--concurrency", str(args.concurrency), "--frames", str(args.frames), "--processes", str(processes)),
        *("--out", out, "--license", "mit", "--progress", "none", *extra),
        *(("--limit", str(limit)) if limit is not None else ()),
    ]
    if spy is not None:  # every process and thread, idle ones too, 100 samples a second each
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        record = (py_spy, "record", "--subprocesses", "--threads", "--idle", "--nonblocking", "--format", "raw")
        cmd = [*record, "--rate", str(cli_stages.RATE), "--output", str(spy), "--", *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, env=env, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {done.returncode}: {done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    manifest = json.loads(Path(out, "refinevla.json").read_text())
    run = manifest["this_run"]
    expected = args.requests if limit is None else limit
    assert manifest["counts"]["episodes"] == expected and run["requests"] == expected
    first = done.stderr.splitlines()[0] if done.stderr else ""
    return {"command": wall, "seconds": run["seconds"], "requests": run["requests"], "cpu": cpu, "first": first}


def with_steady_cpu(port: int, args: argparse.Namespace, source: str, tmp: str, row: dict[str, Any]) -> None:
    """Add `steady`: the row's CPU per request less what a run costs whatever its size (imports, start-up, the
    card), measured by the same command with the same process count over 2 episodes per process."""
    found = re.search(r"annotate: (\d+) engine process", row["first"])
    processes = int(found.group(1)) if found else 1
    small = measure_cli(port, args, processes, source, tmp, limit=2 * processes)
    row["fixed_cpu"] = small["cpu"]
    row["steady"] = (row["cpu"] - small["cpu"]) / max(1, row["requests"] - small["requests"])


def profile_cli(port: int, args: argparse.Namespace, source: str, tmp: str, measured: dict[str, Any]) -> str:
    """The first `--cli` row (by default the default options) again under py-spy: its per-stage table; the
    recording and its flame graph are written to `args.profile`."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    processes = args.cli_processes[0]
    raw = out / f"cli-{processes}.txt"
    spied = measure_cli(port, args, processes, source, tmp, spy=raw)
    title = f"refine-data annotate --processes {processes}, {args.requests} requests"
    cli_stages.write_flamegraph(raw, out / f"cli-{processes}.svg", title)
    prof = cli_stages.read_profile(raw, cli_stages.RATE)
    return cli_stages.format_table(prof, int(spied["requests"]), spied["seconds"], measured["cpu"])


def measure_curator(port: int, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """bespokelabs-curator (`args.curator`: a Python with it installed) asking the same server the prompts
    refinevla builds for the same episodes (`curator_row.py`); wall and CPU of its whole process."""
    import base64
    import resource
    import subprocess

    from refinevla.annotate.prompts import FrameOptions, build_prompt

    pool = frame_pool(size=args.frame_size)
    rows_path, pool_path = Path(tmp, "curator-rows.jsonl"), Path(tmp, "curator-pool.json")
    pool_path.write_text(json.dumps(["data:image/jpeg;base64," + base64.b64encode(f).decode() for f in pool]))
    with rows_path.open("w") as fh:
        for i in range(args.requests):
            bundle = build_prompt(make_episode(i, pool, args.steps), FrameOptions(count=args.frames))
            system, user = bundle.messages[0]["content"], bundle.messages[1]["content"][0]["text"]
            images = [(i * 7 + k.step) % len(pool) for k in bundle.keyframes]  # make_episode's frame order
            fh.write(json.dumps({"episode": i, "system": system, "user": user, "images": images}) + "\n")
    cache = tempfile.mkdtemp(prefix="curator-cache-", dir=tmp)  # its own each time: a cached run asks nothing
    env = {**os.environ, "OPENAI_API_KEY": "EMPTY", "CURATOR_CACHE_DIR": cache}
    env["CURATOR_DISABLE_RICH_DISPLAY"] = "1"
    env["TELEMETRY_ENABLED"] = "false"  # the machine may have no network: nothing is sent anywhere
    script = Path(__file__).with_name("curator_row.py")
    cmd = [args.curator, str(script), str(rows_path), str(pool_path), f"http://127.0.0.1:{port}/v1"]
    cmd.append(str(args.concurrency))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"curator exited {done.returncode}: {(done.stdout + done.stderr)[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["requests"] == args.requests, result
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": wall, "seconds": result["seconds"], "requests": result["requests"], "cpu": cpu}


def measure_ray(port: int, args: argparse.Namespace, source: str, tmp: str) -> list[tuple[str, dict[str, Any]]]:
    """The local command beside `--backend ray` on a one-node cluster on 127.0.0.1, per preparation worker count."""
    from refinevla.annotate.ray_local import local_cluster

    rows = [("local", measure_cli(port, args, 1, source, tmp))]
    with local_cluster(head_cpus=max(args.ray), worker_cpus=0) as cluster:
        for workers in args.ray:
            flags = ("--backend", "ray", "--ray-address", cluster.address, "--ray-workers", str(workers))
            row = measure_cli(port, args, 1, source, tmp, *flags, env=cluster.driver_env)
            rows.append((f"ray, {workers} workers", row))
    return rows


def run_engine(
    port: int,
    lo: int,
    hi: int,
    steps: int,
    frames: int,
    concurrency: int,
    store_path: str,
    rows: str,
    queue: Any,
    go: Any,
) -> None:
    """Annotate episodes [lo, hi) with the real engine; put (wall, cpu, requests, annotated, rows) on `queue`.

    The same building blocks `refine-data annotate` uses (Engine, ResultStore, DatasetWriter); with
    several processes they share one store file, as `annotate --processes` does.
    """
    pool = frame_pool()
    episodes = [make_episode(i, pool, steps) for i in range(lo, hi)]
    teacher = OpenAICompatTeacher.for_provider(
        "openai-compatible", model="bench-model", base_url=f"http://127.0.0.1:{port}/v1"
    )
    store = ResultStore(store_path)
    writer = DatasetWriter(rows, "refinevla.rationale/1", teacher.name, teacher.model)
    opts = EngineOptions(concurrency=concurrency, timeout=30.0)
    opts.frames = type(opts.frames)(count=frames)
    finished: list[float] = []  # when each episode was written (CLOCK_MONOTONIC: comparable across processes)

    def sink(result: Any) -> None:
        writer.add(result)
        finished.append(time.perf_counter())

    engine = Engine(teacher, store, opts, sink=sink)
    import openai  # noqa: F401  (one-time import, ~0.4 s: not what a long run's rate depends on)

    # A real run streams its episodes; these are all built up front, so they are moved out of the
    # garbage collector's sight (its full collections would walk ~100k frame objects a real run never holds).
    gc.collect()
    gc.freeze()
    queue.put("ready")
    go.wait()  # all processes start together
    cpu0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(engine.run(iter(episodes), total=len(episodes)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    counts = writer.close()
    store.close()
    queue.put(
        (wall, cpu, engine.counters.requests, engine.counters.annotated, counts["steps"], counts["episodes"], finished)
    )


def _get(q: Any, procs: list[Any], timeout: float) -> Any:
    """The next message from a worker, failing at once (not after `timeout`) if a worker died."""
    import queue as queue_module

    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=1.0)
        except queue_module.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"engine process exited with code {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no message from the engine processes in {timeout:.0f} s") from None


def measure(ctx: Any, port: int, args: argparse.Namespace, processes: int, tmp: str) -> dict[str, float]:
    """One configuration: `processes` engine processes sharing the concurrency and one store."""
    bounds = [k * args.requests // processes for k in range(processes + 1)]
    queues, procs = [], []
    go = ctx.Event()
    for k in range(processes):
        q = ctx.Queue()
        proc = ctx.Process(
            target=run_engine,
            args=(
                port,
                bounds[k],
                bounds[k + 1],
                args.steps,
                args.frames,
                max(1, args.concurrency // processes),
                f"{tmp}/p{processes}/store.sqlite",
                f"{tmp}/p{processes}/part-{k}",
                q,
                go,
            ),
        )
        proc.start()
        queues.append(q)
        procs.append(proc)
    for q in queues:
        assert _get(q, procs, 300) == "ready"
    t0 = time.perf_counter()
    go.set()
    results = [_get(q, procs, 900) for q in queues]
    wall = time.perf_counter() - t0
    for proc in procs:
        proc.join(timeout=30)
    requests = sum(r[2] for r in results)
    annotated = sum(r[3] for r in results)
    assert annotated == args.requests, f"only {annotated} of {args.requests} annotated"
    # Steady state: from the moment the first `concurrency` episodes are done (every slot has
    # turned over once: connections open, caches warm) to the last one; start-up (client,
    # connections) and shut-down (closing the Parquet files) are left out, as they are for a
    # long run where they are paid once.
    done = sorted(t for r in results for t in r[6])
    first = min(args.concurrency, len(done) - 1) - 1
    return {
        "steady": (len(done) - 1 - first) / (done[-1] - done[first]),
        "wall": wall,
        "cpu": sum(r[1] for r in results),
        "requests": requests,
        "steps": sum(r[4] for r in results),
        "episodes": sum(r[5] for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2560)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--jitter", type=float, default=0.0, help="latency spread: uniform in L*(1±J), same mean")
    ap.add_argument("--steps", type=int, default=38, help="steps per episode (Bridge averages ~38)")
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=[1, 2],
        help="engine process counts to measure (none: no engine row)",
    )
    ap.add_argument(
        "--cli",
        action="store_true",
        help="also run `refine-data annotate` on the same episodes written as RLDS shards (reading included)",
    )
    ap.add_argument(
        "--frame-size",
        type=int,
        default=256,
        help="--cli/--ray: side of the stored frames (above 256 every keyframe is re-encoded when preparing)",
    )
    ap.add_argument(
        "--ray",
        type=int,
        nargs="+",
        metavar="WORKERS",
        help="also run `refine-data annotate --backend ray` (a Ray head on 127.0.0.1) with these preparation "
        "worker counts, beside the local command on the same RLDS shards",
    )
    ap.add_argument(
        "--cli-processes",
        nargs="+",
        default=["auto", "1", "2"],
        help="--cli: the command's --processes values to measure (auto: its default)",
    )
    ap.add_argument(
        "--curator",
        metavar="PYTHON",
        help="--cli: also run bespokelabs-curator (installed for this Python, in an environment of its own) on "
        "the same prompts against the same server (benchmarks/curator_row.py)",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="--cli: also run the first --cli-processes row (default: auto) under py-spy (every process and thread), "
        "print its time per request by stage, and write the recording (DIR/cli-P.txt) and flame graph (DIR/cli-P.svg)",
    )
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    port_q, cpu_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(port_q, args.latency, cpu_q, stop, args.jitter), daemon=True)
    proc.start()
    port = port_q.get(timeout=120)
    ideal = args.concurrency / args.latency
    rows = []
    stages = ""
    curator_row: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            r = measure(ctx, port, args, processes, tmp)
            rows.append((processes, r))
        cli_rows, ray_rows = [], []
        if args.cli or args.ray:
            source = write_source(f"{tmp}/src", args.requests, args.steps, args.frame_size)
        if args.cli:
            cli_rows = [(p, measure_cli(port, args, p, source, tmp)) for p in args.cli_processes]
            for _, row in cli_rows:
                with_steady_cpu(port, args, source, tmp, row)
            if args.curator:
                curator_row = measure_curator(port, args, tmp)
            if args.profile:
                stages = profile_cli(port, args, source, tmp, cli_rows[0][1])
        if args.ray:
            ray_rows = measure_ray(port, args, source, tmp)
    stop.set()
    server_cpu = cpu_q.get(timeout=120)
    proc.join(timeout=10)

    print(
        f"{args.requests} requests (each annotated, validated, stored, written), concurrency {args.concurrency}, "
        f"server latency {args.latency:.2f} s, {args.frames} keyframes (+ gripper events) of real 256x256 JPEGs, "
        f"{args.steps} steps per episode; ideal = concurrency / latency = {ideal:.0f} requests/s; "
        f"{os.cpu_count()} cores (the server shares them; its CPU over all runs: {server_cpu:.2f} s)"
    )
    print(
        "whole run: from the start signal to every row written, start-up and shut-down included; "
        "steady state: episodes finished per second once every slot has turned over once"
    )
    header = f"{'processes':>9} {'wall s':>7} {'req/s':>7} {'vs ideal':>9} {'steady req/s':>13} {'vs ideal':>9}"
    print(f"\n{header} {'CPU ms/req':>11} {'rows (steps/episodes)':>22}")
    for processes, r in rows:
        rate = r["requests"] / r["wall"]
        print(
            f"{processes:>9} {r['wall']:>7.2f} {rate:>7.1f} {rate / ideal:>9.3f} {r['steady']:>13.1f} "
            f"{r['steady'] / ideal:>9.3f} {1000 * r['cpu'] / r['requests']:>11.2f} "
            f"{int(r['steps']):>13} / {int(r['episodes'])}"
        )
    if cli_rows:
        print(
            "\n`refine-data annotate rlds:... --teacher openai-compatible` on the same episodes as 8 TFRecord shards; "
            "engine s: the run's own clock (manifest this_run.seconds: reading, asking, storing, writing); "
            "command s: the whole process (Python start-up, imports, worker processes, card)"
        )
        print(
            f"\n{'processes':>9} {'command s':>10} {'engine s':>9} {'req/s':>7} {'vs ideal':>9} {'CPU ms/req':>11} "
            f"{'fixed CPU s':>12} {'steady CPU ms/req':>18}"
        )
        for processes, r in cli_rows:
            rate = r["requests"] / r["seconds"]
            print(
                f"{processes:>9} {r['command']:>10.2f} {r['seconds']:>9.2f} {rate:>7.1f} {rate / ideal:>9.3f} "
                f"{1000 * r['cpu'] / r['requests']:>11.2f} {r['fixed_cpu']:>12.2f} {1000 * r['steady']:>18.2f}   "
                f"{r['first']}"
            )
        if curator_row is not None:
            r = curator_row
            rate = r["requests"] / r["seconds"]
            print(
                f"{'curator':>9} {r['command']:>10.2f} {r['seconds']:>9.2f} {rate:>7.1f} {rate / ideal:>9.3f} "
                f"{1000 * r['cpu'] / r['requests']:>11.2f}   bespokelabs-curator, the same prompts and server "
                "(engine s: its LLM call)"
            )
        print(
            "CPU: the whole command, every process (rusage of the command and the processes it waited for); fixed: "
            "the same command over 2 episodes per process (imports, start-up, card); steady: the rest per request"
        )
    if stages:
        print(
            f"\nwhere the `--cli` row's time goes (--processes {args.cli_processes[0]}, under py-spy: "
            f"{args.profile}/cli-{args.cli_processes[0]}.svg), per "
            "request: busy = samples of every thread of every process not waiting (running, or waiting for the GIL "
            "or in a C call inside that stage), the whole command; loop = the engine processes' event-loop threads "
            "while the engine ran, idle included, so that column sums to the engine's wall time (the last line)"
        )
        print(stages)
    if ray_rows:
        local = ray_rows[0][1]
        print(
            "\n`refine-data annotate ... --backend ray` against a Ray head on this machine (preparation on its "
            "workers, asking and storing in the driver) beside the local command; engine s as above; "
            "driver CPU: the command's own process (the cluster's workers are not its children)"
        )
        print(
            f"\n{'backend':<16} {'command s':>10} {'engine s':>9} {'req/s':>7} {'vs local':>9} "
            f"{'driver CPU ms/req':>18}"
        )
        for name, r in ray_rows:
            rate = r["requests"] / r["seconds"]
            vs = rate / (local["requests"] / local["seconds"])
            print(
                f"{name:<16} {r['command']:>10.2f} {r['seconds']:>9.2f} {rate:>7.1f} {vs:>9.2f} "
                f"{1000 * r['cpu'] / r['requests']:>18.2f}"
            )


if __name__ == "__main__":
    main()
