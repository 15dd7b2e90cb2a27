"""`refine-data view`: an annotated dataset's episodes in Rerun — frames, actions and the rationale on one timeline.

Before paying for 125k trajectories a user looks: does the teacher's box sit on the object, does the
subtask change when the gripper closes. Each selected episode is logged under `episodes/<index>/`
on the `step` timeline:

- `camera/<name>`: the frames, read from the source the manifest records, as training reads them
  (RLDS / LeRobot video / the embedded sample); stored JPEG/PNG bytes are logged as they are;
- `camera/<primary>/objects`: the rationale's boxes (`Boxes2D`), scaled from the first keyframe the
  teacher saw (`frames.max_side` in the manifest) to the frame's pixels, shown at step 0, where
  they were drawn, and cleared after;
- `state`, `action`: 7 scalars each (x, y, z, roll, pitch, yaw, gripper);
- `rationale/step`: the step's subtask, subtask reason, move and move reason, every step;
- `rationale/episode`: observation, situation analysis, spatial reasoning and task plan, one document
  (or why the episode was rejected, or that OUT does not hold it);
- `events`: where a motion segment starts and where the gripper closes or opens.

Where the recording goes (a file, the native viewer, the web viewer) and what `refine-eval view` shares with this
command live in `viewer.py`; Rerun (`rerun-sdk`, the `[viz]` extra) is imported only when the command runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..schemas.dataset_layout import manifest_path
from ..schemas.truth import EpisodeTruth
from .annotated import Annotated, open_annotated
from .errors import RefineError
from .viewer import Recording, ViewSummary, ViewTarget, import_rerun, log_series

STEP_PARTS = (
    ("SUBTASK", "subtask"),
    ("SUBTASK REASON", "subtask_reason"),
    ("MOVE", "move"),
    ("MOVE REASON", "move_reason"),
)


@dataclass
class Selection:
    """The selected episodes of the manifest's source: indices [start, stop) in its split order; with `ranked`,
    only the episodes it names (`worst:N`: the audit's worst, episode id -> its line in the audit's ranking)."""

    source: Any
    start: int
    stop: int
    ranked: dict[str, str] | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        from .sources import ReadOptions

        left = None if self.ranked is None else set(self.ranked)
        for offset, episode in enumerate(self.source.iter_episodes(ReadOptions(start=self.start, stop=self.stop))):
            if left is not None:
                if episode.episode_id not in left:
                    continue
                left.discard(episode.episode_id)
            yield self.start + offset, episode
            if left is not None and not left:
                return  # every ranked episode found: the rest of the source is not read


def select(data: Annotated, selection: str | None, data_dir: str | None) -> Selection:
    """The selection, checked before anything is written (one line when it matches nothing)."""
    from .source_args import open_cli_source, parse_range, recorded_cameras

    src = data.manifest.get("source") or {}
    if not src.get("uri"):
        raise RefineError(f"{manifest_path(data.root)}: no source.uri to read the frames from")
    cameras = recorded_cameras(src) or None  # the teacher's view, whose boxes the viewer draws
    source = open_cli_source(src["uri"], data_dir, src.get("split") or "train", cameras, None, None, None)
    if selection is not None and selection.startswith(WORST):
        return _worst(data, source, selection)
    start, stop = parse_range(selection or "0")
    stop = len(source) if stop is None else min(stop, len(source))
    if start >= stop:
        raise RefineError(
            f"--episodes {selection}: selects no episode of {src['uri']} "
            f"(it has {len(source)}, indices 0:{len(source)})"
        )
    return Selection(source, start, stop)


WORST = "worst:"  # `--episodes worst:N`: the audit's N worst episodes


def _worst(data: Annotated, source: Any, selection: str) -> Selection:
    """The N worst episodes by `refine-data audit`'s ranking (against the source's truth when the source is a
    `refine-eval demos` folder), found in the annotated range of the source."""
    from .audit import audit_output

    count = selection.removeprefix(WORST)
    if not count.isdigit() or int(count) < 1:
        raise RefineError(f"--episodes {selection}: expected worst:N with N >= 1, e.g. worst:10")
    result = audit_output(str(data.root), truth=source_truth_dir(data))
    ranked = {
        a.episode_id: f"audit rank {a.rank} of {len(result.episodes)}, score {a.score:.2f}"
        for a in result.episodes[: int(count)]
    }
    annotated = data.manifest.get("selection") or {}  # the range annotate read (merged shards: their union)
    start = int(annotated.get("start") or 0)
    stop = min(len(source), int(annotated.get("stop") or len(source)))
    return Selection(source, start, stop, ranked)


def source_truth_dir(data: Annotated) -> Path | None:
    """The manifest's source folder when it holds a simulator truth file (`refine-eval demos` writes one)."""
    from ..schemas.truth import truth_path

    uri = str((data.manifest.get("source") or {}).get("uri") or "")
    if not uri.startswith("rlds:"):
        return None
    folder = Path(uri.removeprefix("rlds:"))
    return folder if truth_path(folder).is_file() else None


def episode_document(record: dict[str, Any] | None, reject: str | None) -> str:
    """The episode-level rationale as one Markdown document."""
    if record is None:
        return f"**Rejected**: {reject}" if reject else "Not annotated in this dataset."
    plan = "\n".join(
        f"{k + 1}. {s['subtask']} (steps {s['start_step']}-{s['end_step']}): {s['reason']}"
        for k, s in enumerate(record.get("task_plan") or [])
    )
    return (
        f"## {record.get('instruction', '')}\n\n**Observation**: {record.get('observation', '')}\n\n"
        f"**Situation analysis**: {record.get('situation_analysis', '')}\n\n"
        f"**Spatial reasoning**: {record.get('spatial_reasoning', '')}\n\n**Task plan**:\n\n{plan}\n\n"
        f"_teacher_: {record.get('teacher', '')} ({record.get('model', '')})"
    )


def step_text(row: dict[str, Any]) -> str:
    return "\n".join(f"{tag}: {row.get(key) or ''}" for tag, key in STEP_PARTS)


def _image(rr: Any, frames: Any, t: int) -> Any:
    data = frames.encoded(t)
    if isinstance(data, bytes | bytearray):
        if data[:2] == b"\xff\xd8":
            return rr.EncodedImage(contents=bytes(data), media_type="image/jpeg")
        if data[:4] == b"\x89PNG":
            return rr.EncodedImage(contents=bytes(data), media_type="image/png")
    return rr.Image(np.asarray(frames[t], dtype=np.uint8))


def log_episode(
    rec: Any,
    rr: Any,
    index: int,
    episode: Any,
    data: Annotated,
    truth: EpisodeTruth | None = None,
    note: str | None = None,
) -> int:
    """Log one episode under episodes/<index> (with `truth`, the simulator's boxes beside the teacher's; `note`
    goes into its info, e.g. its audit rank); returns the teacher's boxes drawn."""
    root = f"episodes/{index}"
    record = data.episode(episode.episode_id)
    rows = data.steps(episode.episode_id)
    reject = data.rejects.get(episode.episode_id)
    rec.log(
        f"{root}/rationale/episode",
        rr.TextDocument(episode_document(record, reject), media_type="text/markdown"),
        static=True,
    )
    info = f"{episode.episode_id}\n\n{episode.instruction}" + (f"\n\n{note}" if note else "")
    rec.log(f"{root}/info", rr.TextDocument(info), static=True)
    log_series(rec, rr, f"{root}/state", episode.states[: episode.num_steps])
    log_series(rec, rr, f"{root}/action", episode.actions[: episode.num_steps])
    primary = episode.cameras[0]
    boxes = _boxes(rr, record, episode, primary, data)
    truth_boxes = None if truth is None else _truth_boxes(rr, truth, episode, primary)
    by_step = {int(r["step"]): r for r in rows}
    previous: dict[str, Any] | None = None
    for t in range(episode.num_steps):
        rec.set_time("step", sequence=t)
        for camera in episode.cameras:
            rec.log(f"{root}/camera/{camera}", _image(rr, episode.frames[camera], t))
        row = by_step.get(t)
        if row is not None:
            rec.log(f"{root}/rationale/step", rr.TextDocument(step_text(row)))
            for event in _events(previous, row):
                rec.log(f"{root}/events", rr.TextLog(event, level="INFO"))
            previous = row
        for name, drawn in (("objects", None if boxes is None else boxes[0]), ("truth", truth_boxes)):
            if t == 0 and drawn is not None:
                rec.log(f"{root}/camera/{primary}/{name}", drawn)
            elif t == 1 and drawn is not None:
                rec.log(f"{root}/camera/{primary}/{name}", rr.Clear(recursive=False))
    return 0 if boxes is None else boxes[1]


def _events(previous: dict[str, Any] | None, row: dict[str, Any]) -> list[str]:
    """Markers where this step starts a motion segment or the gripper changes state."""
    out = []
    if previous is None or row.get("move") != previous.get("move"):
        out.append(f"segment: {row.get('move')}")
    if previous is not None and row.get("gripper") != previous.get("gripper"):
        out.append(f"gripper: {previous.get('gripper')} -> {row.get('gripper')}")
    return out


def _boxes(
    rr: Any, record: dict[str, Any] | None, episode: Any, camera: str, data: Annotated
) -> tuple[Any, int] | None:
    """The rationale's boxes on the primary camera's frame 0, in its pixels (None when there are none)."""
    objects = [o for o in (record or {}).get("objects") or [] if o.get("box") is not None]
    if not objects:
        return None
    frame = np.asarray(episode.frames[camera][0])
    height, width = frame.shape[:2]
    max_side = int((data.manifest.get("frames") or {}).get("max_side") or max(width, height))
    from .prompts.keyframes import keyframe_size

    kw, kh = keyframe_size(width, height, max_side)
    scale = np.array([width / kw, height / kh, width / kw, height / kh])
    xyxy = np.array([o["box"] for o in objects], dtype=np.float64) * scale
    return (
        rr.Boxes2D(array=xyxy, array_format=rr.Box2DFormat.XYXY, labels=[str(o["name"]) for o in objects]),
        len(objects),
    )


def _truth_boxes(rr: Any, truth: EpisodeTruth, episode: Any, camera: str) -> Any:
    """The simulator's task-object boxes on the primary camera's frame 0 (truth pixels scaled to the frame's),
    labelled '<name> (truth)'; None when the camera sees none of them."""
    from ..schemas.truth import scale_box

    seen = [o for o in truth.objects if o.box is not None]
    if not seen:
        return None
    height, width = np.asarray(episode.frames[camera][0]).shape[:2]
    xyxy = np.array([scale_box(o.box, truth.image_size, (width, height)) for o in seen if o.box is not None])
    return rr.Boxes2D(
        array=xyxy,
        array_format=rr.Box2DFormat.XYXY,
        labels=[f"{o.name} (truth)" for o in seen],
        colors=[(40, 220, 90)] * len(seen),
    )


def view_dataset(out: str, selection: str | None, target: ViewTarget, data_dir: str | None) -> ViewSummary:
    """Log the selection of OUT (or ORG/NAME) to the target: a .rrd file, or a native viewer."""
    rr = import_rerun()
    data = open_annotated(out)
    chosen = select(data, selection, data_dir)
    recording = Recording(rr, f"refine-data-view:{data.root.name}", target)
    episodes = steps = boxes = 0
    truth_of = getattr(chosen.source, "truth", None)  # the RLDS reader's accessor: a demos folder's truth
    truths: dict[str, EpisodeTruth] = (truth_of() if truth_of is not None else None) or {}
    for index, episode in chosen:
        note = None if chosen.ranked is None else chosen.ranked.get(episode.episode_id)
        boxes += log_episode(recording.stream, rr, index, episode, data, truths.get(episode.episode_id), note)
        episodes += 1
        steps += episode.num_steps
    return ViewSummary(episodes, recording.close(), steps=steps, boxes=boxes)
