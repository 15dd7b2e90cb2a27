"""What the simulator knows about a recorded episode: the file `refine-eval demos` writes beside its RLDS
files and `refine-data audit` scores a teacher's rationales against.

```
DEMOS/
  features.json, dataset_info.json, *.tfrecord-*   the episodes (Bridge RLDS)
  refinevla_source.json                            what the dataset declares (transform, robot)
  refinevla_truth.json                             this: one entry per episode, by episode id
```

Why here, in `refinevla.schemas`: `evaluate` writes it and `annotate` reads it, and the import rules
let them meet only in the bottom package. Like the layout beside it, it is data: dataclasses, their
JSON form and its checks, nothing but the standard library.

Conventions (the same as the teacher's answer, `rationale-v1.json`):
- steps are 0-based indices into the episode; a leg's `end_step` is inclusive;
- a box is `[x_min, y_min, x_max, y_max]` in pixels of the episode's stored first frame (step 0 of its
  primary camera, `image_size` = (width, height)), origin at the top-left corner, edges continuous (a
  box over pixel columns 3..5 is x 3.0..6.0). `refine-data annotate` sends that frame as the first
  keyframe, resized so its longest side is at most `--image-size` (default 256, never upscaled; its size:
  `annotate.prompts.keyframes.keyframe_size`): `scale_box` maps a truth box onto the keyframe the teacher saw;
- `grasp_step` / `release_step` are the first steps in the new gripper state (closed / open again), the
  convention of the episode's own gripper events (`annotate.primitives.GripperEvent`): a step's state
  holds the command in force before its action, so they fall one step after the `grasp` / `release`
  legs start.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRUTH_FILE = "refinevla_truth.json"
TRUTH_FORMAT = "refinevla-truth/1"
# The expert's legs, in the order it drives them; `hold` is the still tail after the last leg.
PHASES = ("approach", "descend", "grasp", "lift", "transport", "place", "release", "retreat", "hold")
ROLES = ("source", "target")  # a task object's role: the one moved, the one it is moved onto/into


class TruthError(ValueError):
    """A truth file that does not hold what this module writes (the message names the file and field)."""


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Leg:
    """One leg of the expert's plan: `phase` over steps start_step..end_step (inclusive)."""

    phase: str
    start_step: int
    end_step: int


@dataclass(frozen=True)
class TruthObject:
    """A task object as the task names it ("carrot", "plate"), its role, and its tight box on the first
    frame (None when the camera does not see it)."""

    name: str
    role: str
    box: Box | None


@dataclass(frozen=True)
class EpisodeTruth:
    episode_id: str  # as the RLDS reader names it (the annotated output's `episode_id`)
    file_path: str  # the episode's `episode_metadata/file_path`
    task: str  # SimplerEnv's task name (carrot_on_plate, ...)
    instruction: str
    num_steps: int
    legs: tuple[Leg, ...]
    grasp_step: int | None
    release_step: int | None
    image_size: tuple[int, int]  # (width, height) of the frame the boxes are in
    objects: tuple[TruthObject, ...]  # the task's objects, source first
    scene_objects: tuple[str, ...]  # every object in the scene, by the same names (the robot and table aside)

    def boundaries(self) -> list[int]:
        """The steps where a new leg starts (the first leg's start excluded): the plan's boundaries."""
        return [leg.start_step for leg in self.legs[1:]]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["legs"] = [asdict(leg) for leg in self.legs]
        out["objects"] = [{**asdict(o), "box": list(o.box) if o.box is not None else None} for o in self.objects]
        out["image_size"] = list(self.image_size)
        out["scene_objects"] = list(self.scene_objects)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> EpisodeTruth:
        if not isinstance(data, dict):
            raise TruthError(f"{where}: expected an object")
        try:
            episode_id = str(data["episode_id"])
            where = f"{where} ({episode_id})"
            num_steps = _int(data["num_steps"], f"{where}: num_steps")
            legs = tuple(
                Leg(str(leg["phase"]), _int(leg["start_step"], where), _int(leg["end_step"], where))
                for leg in data["legs"]
            )
            objects = tuple(
                TruthObject(str(o["name"]), str(o["role"]), _box(o.get("box"), f"{where}: objects/{i}/box"))
                for i, o in enumerate(data["objects"])
            )
            w, h = (_int(v, f"{where}: image_size") for v in data["image_size"])
            truth = cls(
                episode_id=episode_id,
                file_path=str(data["file_path"]),
                task=str(data["task"]),
                instruction=str(data["instruction"]),
                num_steps=num_steps,
                legs=legs,
                grasp_step=_step(data.get("grasp_step"), f"{where}: grasp_step"),
                release_step=_step(data.get("release_step"), f"{where}: release_step"),
                image_size=(w, h),
                objects=objects,
                scene_objects=tuple(str(s) for s in data["scene_objects"]),
            )
        except KeyError as exc:
            raise TruthError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, TruthError):
                raise
            raise TruthError(f"{where}: {exc}") from None
        truth.check(where)
        return truth

    def check(self, where: str) -> None:
        """Raise TruthError unless the legs tile the episode in PHASES' order and the rest is in range."""
        unknown = [leg.phase for leg in self.legs if leg.phase not in PHASES]
        if unknown:
            raise TruthError(f"{where}: legs: unknown phase {unknown[0]!r} (one of {', '.join(PHASES)})")
        at = 0
        for leg in self.legs:
            if leg.start_step != at or leg.end_step < leg.start_step:
                raise TruthError(f"{where}: legs: {leg} does not continue at step {at}")
            at = leg.end_step + 1
        if self.legs and at != self.num_steps:
            raise TruthError(f"{where}: legs end at step {at - 1}, the episode at {self.num_steps - 1}")
        for name, step in (("grasp_step", self.grasp_step), ("release_step", self.release_step)):
            if step is not None and not 0 <= step < self.num_steps:
                raise TruthError(f"{where}: {name} {step} is outside the episode's {self.num_steps} steps")
        bad_roles = [o.role for o in self.objects if o.role not in ROLES]
        if bad_roles:
            raise TruthError(f"{where}: objects: unknown role {bad_roles[0]!r} (one of {', '.join(ROLES)})")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TruthError(f"{where}: {value!r} is not an integer")
    return value


def _step(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _box(value: Any, where: str) -> Box | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(isinstance(v, int | float) for v in value):
        raise TruthError(f"{where}: {value!r} is not [x_min, y_min, x_max, y_max]")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (x0 < x1 and y0 < y1):
        raise TruthError(f"{where}: {value!r} is empty or inverted")
    return (x0, y0, x1, y1)


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """`box` (pixels of a from_size (w, h) image) in pixels of the same image resized to to_size."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def truth_path(directory: str | Path) -> Path:
    return Path(directory) / TRUTH_FILE


def write_truth(directory: str | Path, episodes: list[EpisodeTruth]) -> Path:
    """Write the truth file of `directory` atomically (tmp + rename)."""
    for e in episodes:
        e.check(f"{TRUTH_FILE}: episode {e.episode_id}")
    path = truth_path(directory)
    tmp = path.with_name("." + path.name + ".partial")
    body = {"format": TRUTH_FORMAT, "episodes": [e.to_json() for e in episodes]}
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_truth(directory: str | Path) -> dict[str, EpisodeTruth] | None:
    """The truth of `directory` by episode id; None when it has no truth file (older demos folders)."""
    path = truth_path(directory)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TruthError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != TRUTH_FORMAT:
        got = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise TruthError(f"{path}: format {got!r}, expected {TRUTH_FORMAT!r}")
    episodes = body.get("episodes")
    if not isinstance(episodes, list):
        raise TruthError(f"{path}: 'episodes' must be a list")
    out: dict[str, EpisodeTruth] = {}
    for i, data in enumerate(episodes):
        truth = EpisodeTruth.from_json(data, f"{path}: episodes/{i}")
        if truth.episode_id in out:
            raise TruthError(f"{path}: episode {truth.episode_id} appears twice")
        out[truth.episode_id] = truth
    return out
