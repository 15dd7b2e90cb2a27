"""Where `refine-data annotate`'s time goes, per stage, from a py-spy recording of the whole command.

`engine_throughput.py --cli --profile DIR` runs the command under `py-spy record --subprocesses
--threads --idle --format raw` (every process and thread, 100 samples a second each, idle ones
included) and this module sorts every sample into one stage by the deepest frame that names one:

    read       TFRecord framing, record parsing, the Episode built from it
    decode     frames decoded to pixels
    keyframes  choosing, resizing, JPEG-encoding, base64 of the keyframes
    request    prompt, facts, response schema, request key, the body's JSON
    ask        the HTTP client and the event loop around it
    validate   parsing and checking answers
    store      the SQLite store (lookups, commits, and the commits' fsyncs: a thread in a C call looks busy)
    write      records assembled, Parquet rows buffered and written
    start/end  imports, setup, worker start-up, manifest, card, merging worker parts
    idle       a thread waiting (for an answer, a queue, a lock)

Two views, per request: busy time (non-idle samples of every thread of every process, the whole
command from start-up to the card: a thread running, or waiting for the GIL or in a C call such as an
fsync inside that stage, so it exceeds the CPU time, printed beside it from rusage), and the event
loop's wall time while the engine ran (the engine processes' main threads in `run_part`'s event loop,
idle included): each stage's share of the loop's samples times the engine's measured time (the
manifest's `this_run.seconds`), since py-spy drops samples on a loaded machine; how much of that time
the samples covered is printed with it.
"""

from __future__ import annotations

import html
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RATE = 100  # py-spy samples per second per thread
STAGES = ("read", "decode", "keyframes", "request", "ask", "validate", "store", "write", "start/end", "other")

# A frame is "Function (path:line)"; the first marker (in this order) contained in the deepest frame that has one.
MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode", ("decode_image", "FrameSequence.__getitem__", "decode_all")),
    ("keyframes", ("encode_keyframe", "select_keyframes", "DataURL.jpeg", "_jpeg_size", "keyframe")),
    (
        "read",
        (
            "read_records",
            "iter_shard_records",
            "RecordDecoder",
            "_decode_task",
            "iter_episodes",
            "_read_task",
            "read_source",
        ),
    ),
    (
        "request",
        (
            "prepare_request",
            "build_prompt",
            "episode_facts",
            "content_digest",
            "request_key",
            "teacher_response_format",
            "estimate_prompt_tokens",
            "OpenAICompatTeacher.encode",
            "encode_body",
            "teacher_request",
            "Engine.prepare",
            "prepared_",
        ),
    ),
    ("validate", ("check_answer",)),
    ("store", ("ResultStore", "commit_response", "Engine._db", "_from_store", "_store_")),
    ("write", ("DatasetWriter", "_PartWriter", "assemble_record", "Engine._finish", "Engine._accept", "_rows")),
    (
        "ask",
        ("Engine._ask", "OpenAICompatTeacher.complete", "Engine._annotate", "Engine.run", "aiohttp/", "openai/"),
    ),
    (
        "start/end",
        (
            "_find_and_load",
            "setup_run",
            "_finalize",
            "run_processes",
            "concat_parquet_parts",
            "_write_card",
            "hold_output",
            "spawn_main",
            "OpenAICompatTeacher.start",
            "ask_server",
            "Engine.__init__",
        ),
    ),
)
# A leaf (innermost frame) that means the thread is waiting, not working.
IDLE_LEAVES = (
    "select (selectors.py",
    "Condition.wait",
    "Event.wait",
    "_worker (concurrent/futures/thread.py",
    "Semaphore.acquire",
    "Thread.join",
    "_wait_for_tstate_lock",
    "Queue.get",
    "sleep",
    "poll (multiprocessing",
    "_recv",
    "wait (subprocess",
    "main (multiprocessing/resource_tracker.py",  # the tracker process reading its pipe
)
ENGINE_SPAN = ("Runner.run ", "DatasetWriter.close", "ResultStore.close")  # frames of run_part the clock covers
HEADER_RE = re.compile(r'^process (\d+):"(.*)"$')
THREAD_RE = re.compile(r"^thread \((\d+)\): ?(.*)$")


@dataclass
class Profile:
    """A py-spy raw recording sorted into stages."""

    rate: float  # samples per second per thread
    cpu: Counter[str] = field(default_factory=Counter)  # stage -> busy samples, all threads and processes
    loop: Counter[str] = field(default_factory=Counter)  # stage (or "idle") -> samples of the engines' main threads
    loops: int = 0  # engine processes (main threads running an event loop)

    def busy_ms(self, stage: str, requests: int) -> float:
        return 1000.0 * self.cpu[stage] / self.rate / max(1, requests)

    def loop_ms(self, stage: str, requests: int, engine_s: float) -> float:
        """The loops' wall ms per request spent in `stage`, over all engine processes (each runs its share): the
        stage's share of the loops' samples times the engine's measured time. A loaded machine makes py-spy miss
        samples (`covered_s` says how many it kept); the shares stay right, the totals come from the clock."""
        sampled = sum(self.loop.values())
        return 1000.0 * self.loops * engine_s * self.loop[stage] / max(1, sampled) / max(1, requests)

    @property
    def covered_s(self) -> float:
        """Wall seconds each engine loop was sampled for while it ran (`run_part`): the engine's time
        (the manifest's `this_run.seconds`) if no sample was missed. Only roughly: py-spy's intervals are
        random (exponential) and its schedule absolute, so a lag is followed by samples taken back to back."""
        return sum(self.loop.values()) / self.rate / max(1, self.loops)


def stage_of(frames: list[str]) -> str:
    """The stage of a stack (root first): the deepest frame naming one; "other" if none does."""
    for frame in reversed(frames):
        for stage, markers in MARKERS:
            if any(m in frame for m in markers):
                return stage
    return "other"


def is_idle(frames: list[str]) -> bool:
    """Whether a stack is a thread waiting (its innermost frame is a wait), or a process not yet running
    Python code (no frame)."""
    return not frames or any(m in frames[-1] for m in IDLE_LEAVES)


def read_profile(path: str | Path, rate: float) -> Profile:
    """Sort a `py-spy record --format raw --threads --idle [--subprocesses]` file into stages.

    The engine loops are the main threads of processes that ran `run_part`: the command itself with
    one process, its workers with several (the parent then only waits).
    """
    prof = Profile(rate)
    loop_pids: set[str] = set()
    rows: list[tuple[str, bool, list[str], int]] = []
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        # with --subprocesses a stack starts with the chain of processes down to its own, then its thread
        at = next((i for i, part in enumerate(parts) if THREAD_RE.match(part)), None)
        if at is None or at < 1 or not count.isdigit():
            continue
        head, thread = HEADER_RE.match(parts[at - 1]), THREAD_RE.match(parts[at])
        pid = head.group(1) if head else parts[at - 1]
        main = bool(thread and thread.group(2) == "MainThread")
        frames = parts[at + 1 :]
        # `run_part` (whose event loop runs the engine), not `Engine.run`: that coroutine is on the stack only
        # while its own task runs, between its awaits; ~300 samples can miss it (CI once found 0 loops)
        if main and any("run_part" in f for f in frames):
            loop_pids.add(pid)
        # the engine's span of that thread's life, as its clock counts it: run_part's event loop and the closing
        # of the dataset's files after it (not the imports and setup before it)
        main = main and any("run_part" in f for f in frames) and any(m in f for f in frames for m in ENGINE_SPAN)
        rows.append((pid, main, frames, int(count)))
    prof.loops = len(loop_pids)
    for pid, main, frames, n in rows:
        idle = is_idle(frames)
        stage = stage_of(frames)
        if not idle:
            prof.cpu[stage] += n
        if main and pid in loop_pids:
            prof.loop["idle" if idle else stage] += n
    return prof


def format_table(prof: Profile, requests: int, engine_s: float, cpu: float | None) -> str:
    """The per-request breakdown: busy time by stage (all threads, processes) and the event loops' wall by stage."""
    lines = [f"{'stage':<10} {'busy ms/req':>11} {'loop ms/req':>12}"]
    for stage in (*STAGES, "idle"):
        c = prof.busy_ms(stage, requests) if stage != "idle" else float("nan")
        lines.append(f"{stage:<10} {c:>11.2f} {prof.loop_ms(stage, requests, engine_s):>12.2f}")
    total_cpu = sum(prof.cpu.values()) / prof.rate
    measured = f"; CPU measured without py-spy {1000 * cpu / requests:.2f} ms/req (rusage)" if cpu is not None else ""
    lines.append(
        f"{'sum':<10} {1000 * total_cpu / requests:>11.2f} "
        f"{sum(prof.loop_ms(s, requests, engine_s) for s in prof.loop):>12.2f}   "
        f"(busy {total_cpu:.1f} s{measured}; {prof.loops} loop(s) over the engine's measured {engine_s:.2f} s, "
        f"each sampled for {prof.covered_s:.2f} s of it)"
    )
    return "\n".join(lines)


def write_flamegraph(raw: str | Path, svg: str | Path, title: str, min_share: float = 0.002) -> None:
    """An SVG flame graph of a py-spy raw recording (root at the bottom; hover a box for its samples).

    Frames under `min_share` of all samples are left out (a full recording draws tens of thousands).
    """
    counts: Counter[tuple[str, ...]] = Counter()
    total = 0
    for line in Path(raw).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = [p.split(":", 1)[0] if p.startswith("process ") else p for p in stack.split(";")]  # no command lines
        n = int(count)
        total += n
        for depth in range(1, len(parts) + 1):
            counts[tuple(parts[:depth])] += n
    width, row = 1600.0, 16
    kept = {path: n for path, n in counts.items() if n / max(1, total) >= min_share}
    depth = max((len(p) for p in kept), default=1)
    height = (depth + 2) * row
    boxes: list[str] = []
    x_of: dict[tuple[str, ...], float] = {(): 0.0}
    offset: dict[tuple[str, ...], float] = Counter()  # next free x inside each parent
    for path in sorted(kept, key=lambda p: (len(p), p)):
        parent = path[:-1]
        x = x_of[parent] + offset[parent]
        w = width * kept[path] / total
        offset[parent] += w
        x_of[path] = x
        y = height - (len(path) + 1) * row
        hue = 20 + zlib.crc32(path[-1].encode()) % 40  # warm colours, stable across runs
        label = html.escape(path[-1])
        text = label if w > 60 else ""
        boxes.append(
            f"<g><title>{label} ({kept[path]} samples, {100 * kept[path] / total:.1f}%)</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.1):.1f}" height="{row - 1}" fill="hsl({hue},90%,60%)"/>'
            f'<text x="{x + 2:.1f}" y="{y + row - 4}" font-size="11" font-family="monospace">'
            f"{text[: int(w / 7)]}</text></g>"
        )
    Path(svg).write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}">'
        f'<text x="4" y="14" font-size="13" font-family="sans-serif">{html.escape(title)} ({total} samples)</text>'
        + "".join(boxes)
        + "</svg>\n"
    )
