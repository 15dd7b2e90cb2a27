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

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..schemas.dataset_layout import EPISODE_FILES, MANIFEST, PRIVATE_DIR, STEP_FILES, manifest_path, read_manifest
from .errors import RefineError
from .viewer import Recording, ViewSummary, ViewTarget, import_rerun, log_series

STEP_PARTS = (
    ("SUBTASK", "subtask"),
    ("SUBTASK REASON", "subtask_reason"),
    ("MOVE", "move"),
    ("MOVE REASON", "move_reason"),
)


@dataclass
class Annotated:
    """An OUT: its manifest and reject reasons; an episode's rows are read when it is logged (a dataset
    of a million steps is never loaded to show a few episodes)."""

    root: Path
    manifest: dict[str, Any]
    rejects: dict[str, str]

    def _rows(self, pattern: str, episode_id: str) -> list[dict[str, Any]]:
        import polars as pl

        files = sorted(self.root.glob(pattern))
        if not files:
            return []
        rows = pl.scan_parquet(files).filter(pl.col("episode_id") == episode_id).collect()
        return rows.sort("step").to_dicts() if "step" in rows.columns else rows.to_dicts()

    def episode(self, episode_id: str) -> dict[str, Any] | None:
        """The episode's row (the episode-level rationale), or None when OUT does not hold it."""
        rows = self._rows(EPISODE_FILES, episode_id)
        return rows[0] if rows else None

    def steps(self, episode_id: str) -> list[dict[str, Any]]:
        """The episode's step rows, in step order."""
        return self._rows(STEP_FILES, episode_id)


def open_annotated(name: str) -> Annotated:
    """A local OUT folder or a Hub dataset id ORG/NAME (its manifest and Parquet only)."""
    root = Path(name)
    if not root.exists():
        if name.count("/") != 1 or name.startswith((".", "/")):
            raise RefineError(f"{name}: no such folder (and not an ORG/NAME Hub id)")
        root = _download(name)
    if not manifest_path(root).is_file():
        raise RefineError(f"{manifest_path(root)}: missing (not a refine-data dataset)")
    manifest = read_manifest(root)
    rejects: dict[str, str] = {}
    for f in sorted((root / PRIVATE_DIR).glob("rejects*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                rejects[r["episode_id"]] = r["reason"]
    return Annotated(root, manifest, rejects)


def _download(repo: str) -> Path:
    from .publish.push import hf_api, resolve_token

    try:
        return Path(
            hf_api(resolve_token()).snapshot_download(
                repo, repo_type="dataset", allow_patterns=[MANIFEST, STEP_FILES, EPISODE_FILES]
            )
        )
    except Exception as exc:  # the client's errors run over several lines
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RefineError(f"{repo}: cannot download from the Hub ({type(exc).__name__}: {first})") from None


@dataclass
class Selection:
    """The selected episodes of the manifest's source: indices [start, stop) in its split order."""

    source: Any
    start: int
    stop: int

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        from .sources import ReadOptions

        for offset, episode in enumerate(self.source.iter_episodes(ReadOptions(start=self.start, stop=self.stop))):
            yield self.start + offset, episode


def select(data: Annotated, selection: str | None, data_dir: str | None) -> Selection:
    """The selection, checked before anything is written (one line when it matches nothing)."""
    from .source_args import open_cli_source, parse_range

    src = data.manifest.get("source") or {}
    if not src.get("uri"):
        raise RefineError(f"{manifest_path(data.root)}: no source.uri to read the frames from")
    source = open_cli_source(src["uri"], data_dir, src.get("split") or "train", None, None, None, None)
    start, stop = parse_range(selection or "0")
    stop = len(source) if stop is None else min(stop, len(source))
    if start >= stop:
        raise RefineError(
            f"--episodes {selection}: selects no episode of {src['uri']} "
            f"(it has {len(source)}, indices 0:{len(source)})"
        )
    return Selection(source, start, stop)


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


def log_episode(rec: Any, rr: Any, index: int, episode: Any, data: Annotated) -> int:
    """Log one episode under episodes/<index>; returns the boxes drawn."""
    root = f"episodes/{index}"
    record = data.episode(episode.episode_id)
    rows = data.steps(episode.episode_id)
    reject = data.rejects.get(episode.episode_id)
    rec.log(
        f"{root}/rationale/episode",
        rr.TextDocument(episode_document(record, reject), media_type="text/markdown"),
        static=True,
    )
    rec.log(f"{root}/info", rr.TextDocument(f"{episode.episode_id}\n\n{episode.instruction}"), static=True)
    log_series(rec, rr, f"{root}/state", episode.states[: episode.num_steps])
    log_series(rec, rr, f"{root}/action", episode.actions[: episode.num_steps])
    primary = episode.cameras[0]
    boxes = _boxes(rr, record, episode, primary, data)
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
        if t == 0 and boxes is not None:
            rec.log(f"{root}/camera/{primary}/objects", boxes[0])
        elif t == 1 and boxes is not None:
            rec.log(f"{root}/camera/{primary}/objects", rr.Clear(recursive=False))
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


def view_dataset(out: str, selection: str | None, target: ViewTarget, data_dir: str | None) -> ViewSummary:
    """Log the selection of OUT (or ORG/NAME) to the target: a .rrd file, or a native viewer."""
    rr = import_rerun()
    data = open_annotated(out)
    chosen = select(data, selection, data_dir)
    recording = Recording(rr, f"refine-data-view:{data.root.name}", target)
    episodes = steps = boxes = 0
    for index, episode in chosen:
        boxes += log_episode(recording.stream, rr, index, episode, data)
        episodes += 1
        steps += episode.num_steps
    return ViewSummary(episodes, recording.close(), steps=steps, boxes=boxes)
