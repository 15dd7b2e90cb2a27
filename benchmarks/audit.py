"""How long `refine-data audit` takes on an output of N episodes: printed as a table.

The output is written by the project's own writers (`annotate.writer.DatasetWriter`, the manifest,
an annotation store with one attempt per episode), with Bridge-sized episodes (40 steps, a grasp
and a release, the arm moving) and teacher answers that vary as real ones do: subtask boundaries a
few steps off the gripper events, two or three named objects with boxes (some over the whole image),
an observation repeated by one episode in ten. Then, in this process:

1. read — the lazy Parquet scans (only the audited columns), the store's sums;
2. score — every episode's metrics (events and motion segments recomputed from the states), duplicates,
   the rank;
3. report — audit.md with its histograms, audit.json, episodes.parquet;

each timed (wall and CPU seconds), and the whole audit against the target (30 s for 10,000 episodes
on 2 cores).

    python benchmarks/audit.py                    # 10,000 episodes
    python benchmarks/audit.py --episodes 2000
"""

from __future__ import annotations

import argparse
import resource
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_SECONDS = 30.0  # for 10,000 episodes on 2 cores
STEPS = 40  # BridgeData V2's episodes are ~38 steps on average
TASKS = (
    ("put the spoon on the towel", ("spoon", "towel")),
    ("put carrot on plate", ("carrot", "plate")),
    ("stack the green block on the yellow block", ("green block", "yellow block")),
    ("put eggplant into yellow basket", ("eggplant", "basket")),
)
IMAGE = 256
# words a teacher varies its texts with (digits do not count: the audit drops them before comparing)
_WORDS = (
    "near far left right behind beside close wide narrow tilted upright shiny matte bright dark worn clean "
    "dusty wet dry small large round flat tall short heavy light soft hard smooth rough red blue green white "
    "black grey striped plain folded open closed empty full corner edge centre middle"
)
WORDS = _WORDS.split(" ")


def phrase(rng: np.random.Generator, n: int = 4) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def episode_states(rng: np.random.Generator, steps: int) -> tuple[np.ndarray, int, int]:
    """Reach, grasp, lift and carry, release: (states, grasp step, release step)."""
    grasp = steps // 3 + int(rng.integers(-3, 4))
    release = steps - 6 + int(rng.integers(-2, 3))
    t = np.arange(steps)
    states = np.zeros((steps, 7), np.float32)
    states[:, 0] = np.linspace(0.2, 0.35, steps) + rng.normal(0, 1e-3, steps)
    states[:, 1] = 0.05 * np.sin(t / 7.0)
    states[:, 2] = np.where(t < grasp, 0.05, np.minimum(0.2, 0.05 + 0.01 * (t - grasp)))
    states[:, 6] = np.where((t >= grasp) & (t < release), 0.0, 1.0)
    return states, grasp, release


def answer(k: int, rng: np.random.Generator, steps: int, grasp: int, release: int) -> dict[str, Any]:
    """A teacher's answer for episode k: boundaries near the events, boxes, texts with some duplicates."""
    instruction, objects = TASKS[k % len(TASKS)]
    starts = [0, grasp + int(rng.integers(-4, 5)), release + int(rng.integers(-4, 5))]
    starts = sorted(set(min(max(s, 1), steps - 1) for s in starts[1:]) | {0})
    ends = [*(s - 1 for s in starts[1:]), steps - 1]
    boxes = []
    for name in objects:
        x, y = (float(v) for v in rng.uniform(0, IMAGE * 0.7, 2))
        side = float(rng.uniform(20, IMAGE * 0.3))
        boxes.append({"name": name, "box": [x, y, x + side, y + side]})
    if k % 7 == 0:
        boxes.append({"name": "table", "box": [0.0, 0.0, float(IMAGE), float(IMAGE)]})
    observation = (
        "A robot arm above a table with objects."
        if k % 10 == 0
        else f"The {objects[0]} lies {int(rng.integers(5, 40))} cm from the {objects[1]}, {phrase(rng)}."
    )
    return {
        "instruction": instruction,
        "observation": observation,
        "situation_analysis": f"The {objects[0]} must be moved to the {objects[1]}.",
        "spatial_reasoning": "The gripper moves forward, down, then up and left.",
        "task_plan": [
            {
                "subtask": f"subtask {i}: {phrase(rng, 2)}",
                "reason": phrase(rng),
                "start_step": s,
                "end_step": e,
            }
            for i, (s, e) in enumerate(zip(starts, ends, strict=True))
        ],
        "objects": boxes,
    }


def write_output(out: Path, n: int, seed: int = 0) -> None:
    """N annotated episodes through the project's writer, its manifest and a store of their attempts."""
    from refinevla.annotate.primitives import gripper_positions, motion_primitives, motion_segments
    from refinevla.annotate.records import AnnotationOutcome
    from refinevla.annotate.store import ResultStore
    from refinevla.annotate.writer import DatasetWriter
    from refinevla.schemas import DEFAULT_SCHEMA_ID as SCHEMA_ID
    from refinevla.schemas.dataset_layout import PRIVATE_DIR, write_manifest

    rng = np.random.default_rng(seed)
    writer = DatasetWriter(out, SCHEMA_ID, "openai-compatible", "bench-model")
    attempts = []
    for k in range(n):
        states, grasp, release = episode_states(rng, STEPS)
        a = answer(k, rng, STEPS, grasp, release)
        moves = motion_primitives(states)
        segments = motion_segments(moves)
        gripper = gripper_positions(states)
        subtask_at = {t: s for s in a["task_plan"] for t in range(s["start_step"], s["end_step"] + 1)}
        reason_at = {t: f"segment {i}" for i, seg in enumerate(segments) for t in range(seg.start, seg.end + 1)}
        episode_id = f"bridge_orig:/bench/traj{k}.pkl#{k}"
        record = {
            "schema_id": SCHEMA_ID,
            "episode_id": episode_id,
            "num_steps": STEPS,
            **a,
            "move_reasons": [{"segment": i, "reason": f"segment {i}"} for i in range(len(segments))],
            "steps": [
                {
                    "step": t,
                    "subtask": subtask_at[t]["subtask"],
                    "subtask_reason": subtask_at[t]["reason"],
                    "move": moves[t],
                    "move_reason": reason_at[t],
                    "gripper": gripper[t],
                }
                for t in range(STEPS)
            ],
        }
        key = f"{k:064x}"
        writer.add(
            AnnotationOutcome(
                episode_id, "bridge_orig", a["instruction"], np.zeros((STEPS, 7), np.float32), states, key,
                "annotated", record, attempts=1 + (k % 13 == 0),
            )
        )  # fmt: skip
        attempts.append((key, 1, episode_id, "{}", "stop", "[]", 1000, 200, 0.0006, "bench-model", time.time()))
    counts = writer.close()
    store = out / PRIVATE_DIR / "store.sqlite"
    ResultStore(store).close()  # the store's tables, as annotate creates them
    with sqlite3.connect(store) as db:  # one transaction: the benchmark times the audit, not 10,000 fsyncs
        db.executemany(
            "INSERT INTO attempts (key, attempt, episode_id, raw, finish_reason, errors, prompt_tokens, "
            "completion_tokens, cost, model, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            attempts,
        )
    write_manifest(
        out,
        {
            "source": {"uri": "rlds:/bench", "dataset": "bridge_orig", "split": "train"},
            "teacher": {"name": "openai-compatible", "model": "bench-model"},
            "frames": {"count": 6, "max_side": IMAGE},
            "schema": {"id": SCHEMA_ID},
            "counts": {**counts, "rejected": 0},
            "tokens": {"prompt": 1000 * n, "completion": 200 * n, "requests": n},
            "cost_usd": 0.0006 * n,
        },
    )


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=10_000)
    opts = parser.parse_args()

    from refinevla.annotate.audit import audit_output, read_output, write_report

    with tempfile.TemporaryDirectory(prefix="refinevla-audit-bench-") as tmp:
        out = Path(tmp) / "out"
        _, build_wall, _ = timed(write_output, out, opts.episodes)
        data, read_wall, read_cpu = timed(read_output, str(out))
        result, audit_wall, audit_cpu = timed(audit_output, str(out))
        files, report_wall, report_cpu = timed(write_report, result, Path(tmp) / "report")
        total_wall, total_cpu = audit_wall + report_wall, audit_cpu + report_cpu
        steps = len(data.states)
        target = TARGET_SECONDS * opts.episodes / 10_000
        rows = [
            ("build the output (not timed by the target)", build_wall, None),
            ("read (lazy scans of the audited columns, the store)", read_wall, read_cpu),
            ("read + score + rank (audit_output)", audit_wall, audit_cpu),
            ("report (audit.md, histograms, audit.json, episodes.parquet)", report_wall, report_cpu),
            ("audit total (what `refine-data audit` spends)", total_wall, total_cpu),
        ]
        print(f"\nrefine-data audit on {opts.episodes:,} episodes, {steps:,} steps ({len(files.charts)} histograms)\n")
        print(f"| {'phase':<62} | wall s | CPU s |")
        print(f"|{'-' * 64}|-------:|------:|")
        for name, wall, cpu in rows:
            print(f"| {name:<62} | {wall:6.2f} | {'' if cpu is None else f'{cpu:5.2f}':>5} |")
        per = 1000 * total_wall / opts.episodes
        verdict = "within" if total_wall <= target else "OVER"
        print(f"\n{per:.2f} ms per episode; {verdict} the target of {target:.0f} s")
        s = result.summary
        print(
            f"summary: event recall {s['event_recall']:.3f}, boundary precision {s['boundary_precision']:.3f}, "
            f"grounding {s['grounding']:.3f}, duplicates {s['duplicate_rate']:.3f}, "
            f"large boxes {s['large_box_rate']:.3f}, tokens {s['tokens']:,}"
        )


if __name__ == "__main__":
    main()
