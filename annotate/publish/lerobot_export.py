"""`refine-data export --to lerobot`: frames from the source + rationales as LeRobot language columns.

The rationale goes into LeRobot's language columns, as LeRobot's annotation pipeline writes them
(huggingface/lerobot `src/lerobot/datasets/language.py` for the types and feature entries,
`src/lerobot/annotations/steerable_pipeline/writer.py` for the layout):
* `language_persistent`: a list of `{role, content, style, timestamp, camera, tool_calls}` broadcast
  to every frame of an episode, each entry holding from its `timestamp` until superseded;
* `language_events`: per frame, the event rows firing at that frame (`{role, content, style, camera,
  tool_calls}`, no timestamp). A rationale has none, so every frame gets `[]`; the column is written
  because LeRobot's writer always writes both.
Mapping (all `role="assistant"`, `camera=None`, `tool_calls=None`):
* the task plan -> one `plan` entry at t=0 (numbered subtasks with their step ranges);
* time-aligned subtasks -> one `subtask` entry per plan segment at its first step;
* motion primitives -> one `motion` entry per motion segment at its first step;
* the other reasoning parts (observation, situation analysis, spatial reasoning at t=0; subtask and move
  reasons at their segments) -> the project style `reasoning`, content prefixed with the part's name.
LeRobot has no dataset-level registry of styles: a project style is registered in the reader's
process, before LeRobot routes rows, by adding it to `lerobot.datasets.language.EXTENDED_STYLES`
and to `PERSISTENT_STYLES` (which decides its column); without that, LeRobot's
`column_for_style("reasoning")` raises "Unknown language style". The `info.json` entries are
LeRobot's `language_feature_info()` exactly (`{"dtype": "language", "shape": [1], "names": null}`);
an extra key there would make LeRobot's `features_equal_for_merge` refuse to aggregate the dataset.

Episodes are streamed from the source (`open_source`) in the manifest's selection, joined to the
rationale rows on `episode_id`, and written by `lerobot_writer.write_lerobot` (v3.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ...schemas.dataset_layout import EPISODE_FILES, MANIFEST, STEP_FILES, manifest_path, read_manifest
from ..errors import RefineError

EXTENDED_STYLE = "reasoning"  # project style of the reasoning parts; a LeRobot reader registers it (above)
DEFAULT_FPS = {"bridge_orig": 5.0, "bridge_dataset": 5.0, "refinevla_sample": 10.0, "fractal20220817_data": 3.0}
# LeRobot's column types, field for field (names, order, types, nullability), as defined by
# `language_persistent_arrow_type()` / `language_events_arrow_type()` in huggingface/lerobot
# `src/lerobot/datasets/language.py` (commit 1683197862cb32aab1f9a0cfc0b2a7a2f5bdd047). `tool_calls`
# holds JSON values: Arrow's `json` extension type, or `string` on a pyarrow without it (LeRobot's
# own fallback).
_JSON = pa.json_() if hasattr(pa, "json_") else pa.string()
LANGUAGE_PERSISTENT = pa.list_(
    pa.struct(
        [
            pa.field("role", pa.string(), nullable=False),
            pa.field("content", pa.string()),
            pa.field("style", pa.string()),
            pa.field("timestamp", pa.float32(), nullable=False),
            pa.field("camera", pa.string()),
            pa.field("tool_calls", pa.list_(_JSON)),
        ]
    )
)
LANGUAGE_EVENTS = pa.list_(
    pa.struct(
        [
            pa.field("role", pa.string(), nullable=False),
            pa.field("content", pa.string()),
            pa.field("style", pa.string()),
            pa.field("camera", pa.string()),
            pa.field("tool_calls", pa.list_(_JSON)),
        ]
    )
)


def storage_type(arrow_type: pa.DataType) -> pa.DataType:
    """`arrow_type` with every extension type replaced by its storage type (`json` -> `string`).

    pyarrow cannot build extension values from Python objects (`pa.array(..., type=list<json>)` is
    not implemented; LeRobot's writer notes the same), so the columns are written with the storage
    type, which is the same bytes in Parquet. LeRobot loads them through `datasets` with its
    features (`List(Json())` for `tool_calls`), and `array.cast(LANGUAGE_PERSISTENT)` restores the
    exact type.
    """
    if isinstance(arrow_type, pa.BaseExtensionType):
        return storage_type(arrow_type.storage_type)
    if pa.types.is_list(arrow_type):
        return pa.list_(pa.field(arrow_type.value_field.name, storage_type(arrow_type.value_type)))
    if pa.types.is_struct(arrow_type):
        return pa.struct([f.with_type(storage_type(f.type)) for f in arrow_type])
    return arrow_type


@dataclass
class ExportResult:
    root: Path
    episodes: int
    frames: int


def _entry(content: str, style: str, timestamp: float) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": content,
        "style": style,
        "timestamp": timestamp,
        "camera": None,
        "tool_calls": None,
    }


def language_entries(episode: dict[str, Any], steps: list[dict[str, Any]], fps: float) -> list[dict[str, Any]]:
    """The `language_persistent` list of one episode (the same for all its frames), in time order."""
    plan = episode["task_plan"] or []
    out = [
        _entry(
            "\n".join(f"{i + 1}. {s['subtask']} (steps {s['start_step']}-{s['end_step']})" for i, s in enumerate(plan)),
            "plan",
            0.0,
        )
    ]
    for part in ("observation", "situation_analysis", "spatial_reasoning"):
        out.append(_entry(f"{part}: {episode[part]}", EXTENDED_STYLE, 0.0))
    for s in plan:
        t = s["start_step"] / fps
        out.append(_entry(s["subtask"], "subtask", t))
        out.append(_entry(f"subtask_reason: {s['reason']}", EXTENDED_STYLE, t))
    previous = None
    for row in steps:
        if row["move"] != previous:
            t = row["step"] / fps
            out.append(_entry(row["move"], "motion", t))
            out.append(_entry(f"move_reason: {row['move_reason']}", EXTENDED_STYLE, t))
            previous = row["move"]
    # LeRobot's writer orders a persistent slice by (timestamp, style, role) (`_row_persistent_sort_key`
    # in its steerable_pipeline/writer.py); the same order here, so a re-run of it changes nothing.
    return sorted(out, key=lambda e: (e["timestamp"], e["style"], e["role"]))


def export_lerobot(
    out: str | Path,
    source: str,
    dest: str | Path,
    *,
    data_dir: str | None = None,
    split: str = "train",
    fps: float | None = None,
    camera_storage: str = "video",
) -> ExportResult:
    """Write a LeRobot v3.0 dataset at `dest` with the episodes of `out` (frames from `source`)."""
    import polars as pl

    from ..source_args import recorded_cameras
    from ..sources import ReadOptions, SourceOverrides, open_source
    from ..sources.lerobot_writer import ExtraColumn, write_lerobot

    out, dest = Path(out), Path(dest)
    if not manifest_path(out).is_file():
        raise RefineError(f"{out}: no {MANIFEST}; export a directory written by `refine-data annotate`")
    if dest.exists() and any(dest.iterdir()):
        raise RefineError(f"{dest}: exists and is not empty")
    manifest = read_manifest(out)
    episodes = pl.read_parquet(out / EPISODE_FILES)
    steps = pl.read_parquet(out / STEP_FILES, columns=["episode_id", "step", "move", "move_reason", "subtask"])
    wanted = {row["episode_id"]: row for row in episodes.to_dicts()}
    step_rows: dict[str, list[dict[str, Any]]] = {}
    for row in steps.sort(["episode_id", "step"]).to_dicts():
        step_rows.setdefault(row["episode_id"], []).append(row)
    recorded = manifest.get("source") or {}
    cameras = tuple(recorded_cameras(recorded))  # the frames the rationales describe
    src = open_source(source, data_dir=data_dir, split=split, overrides=SourceOverrides(cameras=cameras))
    # the control rate: --fps, else the source's own (a LeRobot dataset states it), else the known datasets'
    rate = fps or getattr(src, "fps", None) or DEFAULT_FPS.get(src.name) or DEFAULT_FPS.get(recorded.get("dataset", ""))
    if not rate:
        raise RefineError(f"the control rate of {src.name!r} is not known; pass --fps")
    selection = manifest.get("selection") or {}
    options = ReadOptions(start=selection.get("start", 0), stop=selection.get("stop"))

    language: list[list[list[dict[str, Any]]]] = []  # per episode, per frame (filled as episodes stream)
    events: list[list[list[dict[str, Any]]]] = []  # the same shape; a rationale has no events
    found: set[str] = set()

    def matching() -> Any:
        for ep in src.iter_episodes(options):
            row = wanted.get(ep.episode_id)
            if row is None:
                continue
            own = step_rows.get(ep.episode_id, [])
            if row["num_steps"] != len(ep) or len(own) != len(ep):
                raise RefineError(
                    f"{ep.episode_id}: {len(ep)} frames in {source} but {row['num_steps']} steps in {out}; "
                    "is --source the source this dataset was annotated from?"
                )
            entries = language_entries(row, own, rate)
            language.append([entries] * len(ep))
            events.append([[] for _ in range(len(ep))])
            found.add(ep.episode_id)
            yield ep
            if len(found) == len(wanted):
                return

    created = not dest.exists()
    try:
        root = write_lerobot(
            dest,
            matching(),
            fps=rate,
            robot_type="widowx" if src.name.startswith("bridge") else "unknown",
            camera_storage=camera_storage,
            # No `feature`: the writer's default for the language columns is LeRobot's `language_feature_info()`.
            extra_columns={
                "language_persistent": ExtraColumn(language, storage_type(LANGUAGE_PERSISTENT)),
                "language_events": ExtraColumn(events, storage_type(LANGUAGE_EVENTS)),
            },
        )
        missing = sorted(set(wanted) - found)
        if missing:
            raise RefineError(f"{len(missing)} episodes of {out} are not in {source} (first: {missing[0]})")
    except RefineError:
        if created:  # no half-written dataset left behind for a LeRobot reader to trip over
            import shutil

            shutil.rmtree(dest, ignore_errors=True)
        raise
    return ExportResult(root, len(found), sum(len(v) for v in language))
