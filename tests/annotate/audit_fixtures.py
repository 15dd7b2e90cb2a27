"""Shared by the audit tests: a scriptable fake teacher's answers and a hand-made truth file for tiny_rlds's episodes.

tiny_rlds episodes (`annotate.sources.specs.tiny_bridge_episode`) of STEPS steps close the gripper at steps // 3 and
open it at steps - 2, and draw the spoon as a yellow square; the truth (`schemas.truth`, written by `write_truth`
until `refine-eval demos` writes one) puts the expert's legs around those events.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

from refinevla.schemas.truth import EpisodeTruth, Leg, TruthObject, write_truth
from tests.annotate.conftest import Recorded

STEPS = 40  # tiny_rlds episodes of 40, 41, 42 steps: the gripper closes at steps // 3, opens at steps - 2
SHIFT = 8  # the bad teacher's boundaries are this many steps early
SPOON_SIDE, SPOON_TOP = 16, 8  # the yellow square tiny_bridge_episode draws: 16 px, from y = 8, x = seed % 48
TOWEL = (40.0, 40.0, 60.0, 60.0)  # where the truth puts the towel (not drawn)

_STEPS_RE = re.compile(r"The episode has (\d+) steps")
_EVENT_RE = re.compile(r"step (\d+): gripper (?:closes|opens)")
_SEGMENT_RE = re.compile(r"^\d+\. steps \d+\.\.\d+:", flags=re.M)
_SIZE_RE = re.compile(r"first keyframe \((\d+) x (\d+),")


def teacher_answer(rec: Recorded, shift: int, full_boxes: bool) -> dict[str, Any]:
    """A schema-valid answer whose subtask boundaries are `shift` steps from the prompt's gripper events, naming the
    spoon by a plural and the towel by a synonym, with a banana (in no scene): boxes over the whole keyframe, or
    where the objects are (the spoon's square, seed from the instruction; the truth's towel)."""
    text = rec.user_text()
    steps = int(_STEPS_RE.search(text).group(1))  # type: ignore[union-attr]
    system = next(m["content"] for m in rec.body["messages"] if m["role"] == "system")
    w, h = (int(v) for v in _SIZE_RE.search(system).groups())  # type: ignore[union-attr]
    starts = [0, *(int(s) + shift for s in _EVENT_RE.findall(text))]
    ends = [*(s - 1 for s in starts[1:]), steps - 1]
    x = (rec.seed or 0) % 48
    spoon = [0, 0, w, h] if full_boxes else [x, SPOON_TOP, x + SPOON_SIDE, SPOON_TOP + SPOON_SIDE]
    towel = [0, 0, w, h] if full_boxes else list(TOWEL)
    return {
        "observation": "A table with some things on it.",
        "situation_analysis": "Something must be moved.",
        "spatial_reasoning": "The gripper moves.",
        "task_plan": [
            {"subtask": f"part {k}", "reason": "it comes next", "start_step": s, "end_step": e}
            for k, (s, e) in enumerate(zip(starts, ends, strict=True))
        ],
        "objects": [
            {"name": "spoons", "box": spoon},
            {"name": "cloth", "box": towel},
            {"name": "banana", "box": [0, 0, w, h] if full_boxes else [0, 0, 4, 4]},
        ],
        "move_reasons": [{"segment": i, "reason": "it moves"} for i in range(len(_SEGMENT_RE.findall(text)))],
    }


def shifted_full_image_answer(rec: Recorded) -> dict[str, Any]:
    """Boundaries SHIFT steps before the gripper events, every box over the whole keyframe."""
    return teacher_answer(rec, -SHIFT, full_boxes=True)


def hand_made_truth(demos: Path, out: Path) -> None:
    """The truth of OUT's episodes: the spoon's box where tiny_bridge_episode draws it, the legs around the
    gripper events, grasp and release one step after their legs start (schemas.truth's convention)."""
    episodes = pl.read_parquet(out / "episodes", columns=["episode_id", "instruction", "num_steps"])
    truths = []
    for e in episodes.iter_rows(named=True):
        n, seed = e["num_steps"], int(re.search(r"spoon (\d+)", e["instruction"]).group(1))  # type: ignore[union-attr]
        grasp, release = n // 3, n - 2
        legs = (
            Leg("approach", 0, grasp - 2),
            Leg("grasp", grasp - 1, grasp),
            Leg("transport", grasp + 1, release - 2),
            Leg("release", release - 1, n - 1),
        )
        x = seed % 48
        truths.append(
            EpisodeTruth(
                episode_id=e["episode_id"],
                file_path=f"simpler/Fake-v0/episode_{seed}/seed_0",
                task="spoon_on_towel",
                instruction=e["instruction"],
                num_steps=n,
                legs=legs,
                grasp_step=grasp,
                release_step=release,
                image_size=(64, 64),
                objects=(
                    TruthObject("spoon", "source", (x, SPOON_TOP, x + SPOON_SIDE, SPOON_TOP + SPOON_SIDE)),
                    TruthObject("towel", "target", TOWEL),
                ),
                scene_objects=("spoon", "towel"),
            )
        )
    demos.mkdir(parents=True, exist_ok=True)
    write_truth(demos, truths)
