"""Write LeRobot datasets (v2.1 and v3.0) from `Episode`s, without the `lerobot` package.

Why our own writer: test fixtures, conversions (RLDS -> LeRobot) and the rationale export
need the published on-disk layouts exactly, and `lerobot` drags in torch. The layouts:

* v2.1 — one parquet and one mp4 per camera per episode
  (`data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet`,
  `videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4`), with
  `meta/episodes.jsonl`, `meta/tasks.jsonl`, `meta/episodes_stats.jsonl`.
* v3.0 — many episodes per file (`data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet`,
  `videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4`), episodes located by
  `meta/episodes/chunk-000/file-000.parquet` (row offsets and video timestamps), tasks in
  `meta/tasks.parquet` (index = task string), global stats in `meta/stats.json`.

Episodes are consumed as a stream: v2.1 writes each episode as it arrives; v3.0 holds only the
current data file's rows and encodes video frames straight into the open mp4 files.

Videos are encoded by `annotate.video` (the first codec the installed PyAV can both encode and
decode); the codec is recorded in each video feature's `info["video.codec"]`. Statistics are
accumulated by `annotate.stats.RunningStats`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..episode import Episode
from ..stats import RunningStats
from ..video import CODEC_CANDIDATES, VideoEncoder, pick_codec

V21 = "v2.1"
V30 = "v3.0"
V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CAMERA_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"

_POSE_NAMES = {
    STATE_KEY: ["x", "y", "z", "roll", "pitch", "yaw", "gripper"],
    ACTION_KEY: ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"],
}
_IMAGE_STATS_FRAMES = 16  # frames sampled per episode for camera statistics (LeRobot samples too)


@dataclass
class ExtraColumn:
    """An extra per-frame column: values per episode (in iteration order), one per frame.

    `arrow_type` pins the column type (needed for list-of-struct columns such as LeRobot's
    `language_persistent` / `language_events`, where inference from Python values is ambiguous:
    empty lists, null fields). `feature` is the column's `info.json` entry.
    """

    values: Sequence[Sequence[Any]]
    arrow_type: pa.DataType | None = None
    feature: dict[str, Any] | None = None


def camera_feature(camera: str) -> str:
    """`image_0` -> `observation.images.image_0`; a dotted feature name is kept as is."""
    return camera if "." in camera else CAMERA_PREFIX + camera


def write_lerobot(
    root: str | os.PathLike[str],
    episodes: Iterable[Episode],
    *,
    version: str = V30,
    fps: float,
    robot_type: str = "unknown",
    camera_storage: str = "video",
    extra_columns: Mapping[str, ExtraColumn | Sequence[Sequence[Any]]] | None = None,
    chunks_size: int = 1000,
    episodes_per_file: int | None = None,
    data_files_size_in_mb: float = 100,
    video_files_size_in_mb: float = 500,
    row_group_size: int | None = None,
    codec: str | None = None,
) -> Path:
    """Write `episodes` as a LeRobot dataset at `root` and return the root.

    Cameras become `observation.images.<camera>` features, states `observation.state`, actions
    `action`, rewards `next.reward`, terminal flags `next.done`. Each episode's task is its
    instruction. `extra_columns` adds per-frame columns (name -> values per episode per frame, or
    an `ExtraColumn`). v3.0 starts a new data/video file when `episodes_per_file` is reached or a
    file passes its size budget; `row_group_size` bounds parquet row groups so readers can fetch
    an episode's rows without reading a whole file. `codec` forces an encoder (see
    `annotate.video.CODEC_CANDIDATES`).
    """
    if version not in (V21, V30):
        raise ValueError(f"version must be {V21!r} or {V30!r}, not {version!r}")
    if camera_storage not in ("video", "image"):
        raise ValueError(f"camera_storage must be 'video' or 'image', not {camera_storage!r}")
    extras = {k: v if isinstance(v, ExtraColumn) else ExtraColumn(v) for k, v in (extra_columns or {}).items()}
    cls = _V21Writer if version == V21 else _V30Writer
    writer = cls(
        root=Path(root),
        fps=float(fps),
        robot_type=robot_type,
        camera_storage=camera_storage,
        extras=extras,
        chunks_size=chunks_size,
        episodes_per_file=episodes_per_file,
        data_mb=data_files_size_in_mb,
        video_mb=video_files_size_in_mb,
        row_group_size=row_group_size,
        codec=codec,
    )
    for position, episode in enumerate(episodes):
        writer.add(episode, position)
    writer.finish()
    return Path(root)


# --------------------------------------------------------------------------- writers


@dataclass
class _Schema:
    """The features, fixed by the first episode; later episodes must match."""

    cameras: dict[str, str]  # episode camera name -> feature key
    image_shapes: dict[str, tuple[int, int, int]]
    state_dim: int
    action_dim: int
    extra_types: dict[str, pa.DataType]


@dataclass
class _Writer:
    root: Path
    fps: float
    robot_type: str
    camera_storage: str
    extras: dict[str, ExtraColumn]
    chunks_size: int
    episodes_per_file: int | None
    data_mb: float
    video_mb: float
    row_group_size: int | None
    codec: str | None
    version: str = ""
    schema: _Schema | None = None
    tasks: dict[str, int] = field(default_factory=dict)
    total_frames: int = 0
    episodes: int = 0
    global_stats: dict[str, RunningStats] = field(default_factory=dict)
    codec_used: str | None = None

    def __post_init__(self) -> None:
        """Subclasses set up their layout state here (the generated __init__ calls it)."""

    # -- per episode

    def add(self, episode: Episode, position: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def _prepare(self, episode: Episode) -> tuple[int, int]:
        """Validate the episode against the schema; return (episode index, task index)."""
        n = len(episode)
        if n == 0:
            raise ValueError(f"episode {episode.episode_id!r} has no frames; LeRobot episodes need at least one")
        if self.schema is None:
            self.schema = self._make_schema(episode)
        schema = self.schema
        if set(episode.frames) != set(schema.cameras):
            raise ValueError(
                f"episode {episode.episode_id!r} cameras {sorted(episode.frames)} != {sorted(schema.cameras)}"
            )
        if episode.states.shape != (n, schema.state_dim) or episode.actions.shape != (n, schema.action_dim):
            raise ValueError(f"episode {episode.episode_id!r}: states/actions shapes differ from the first episode's")
        task = self.tasks.setdefault(episode.instruction, len(self.tasks))
        return self.episodes, task

    def _make_schema(self, episode: Episode) -> _Schema:
        shapes = {}
        for cam, seq in episode.frames.items():
            first = np.asarray(seq[0])
            if first.ndim != 3 or first.shape[2] != 3:
                raise ValueError(f"camera {cam!r}: frames must be HxWx3, got {first.shape}")
            shapes[cam] = tuple(int(x) for x in first.shape)
        extra_types = {}
        for name, col in self.extras.items():
            if col.arrow_type is not None:
                extra_types[name] = col.arrow_type
            else:
                extra_types[name] = pa.array(list(col.values[0])).type
        return _Schema(
            cameras={cam: camera_feature(cam) for cam in episode.frames},
            image_shapes=shapes,  # type: ignore[arg-type]
            state_dim=int(episode.states.shape[1]),
            action_dim=int(episode.actions.shape[1]),
            extra_types=extra_types,
        )

    def _frame_table(self, episode: Episode, position: int, index: int, task: int) -> pa.Table:
        """The episode's parquet rows (everything except video-stored cameras)."""
        assert self.schema is not None
        n = len(episode)
        frame_index = np.arange(n, dtype=np.int64)
        columns: dict[str, pa.Array] = {}
        if self.camera_storage == "image":
            for cam, key in self.schema.cameras.items():
                columns[key] = _image_column(episode.frames[cam])
        columns[STATE_KEY] = _vector_column(episode.states)
        columns[ACTION_KEY] = _vector_column(episode.actions)
        columns["next.reward"] = pa.array(np.asarray(episode.rewards, np.float32))
        columns["next.done"] = pa.array(np.asarray(episode.is_terminal, bool))
        columns["timestamp"] = pa.array((frame_index / self.fps).astype(np.float32))
        columns["frame_index"] = pa.array(frame_index)
        columns["episode_index"] = pa.array(np.full(n, index, np.int64))
        columns["index"] = pa.array(np.arange(self.total_frames, self.total_frames + n, dtype=np.int64))
        columns["task_index"] = pa.array(np.full(n, task, np.int64))
        for name, col in self.extras.items():
            values = list(col.values[position])
            if len(values) != n:
                raise ValueError(f"extra column {name!r}: episode {position} has {len(values)} values for {n} frames")
            columns[name] = pa.array(values, type=self.schema.extra_types[name])
        return pa.table(columns)

    def _episode_stats(self, episode: Episode, table: pa.Table) -> dict[str, RunningStats]:
        """Per-episode statistics (numeric columns, and sampled camera frames in [0, 1])."""
        assert self.schema is not None
        stats: dict[str, RunningStats] = {}
        for key in (
            STATE_KEY,
            ACTION_KEY,
            "next.reward",
            "timestamp",
            "frame_index",
            "episode_index",
            "index",
            "task_index",
        ):
            values = _column_numpy(table[key])
            stats[key] = RunningStats()
            stats[key].add(values.reshape(len(values), -1))
        n = len(episode)
        picks = np.unique(np.linspace(0, n - 1, min(n, _IMAGE_STATS_FRAMES)).round().astype(int))
        for cam, key in self.schema.cameras.items():
            sample = np.stack([np.asarray(episode.frames[cam][int(i)]) for i in picks]).astype(np.float32) / 255.0
            stats[key] = RunningStats()
            stats[key].add(sample.reshape(-1, 3), count=len(picks))
        for key, value in stats.items():
            self.global_stats.setdefault(key, RunningStats()).merge(value)
        return stats

    def _encode_camera(self, encoder: VideoEncoder, frames: Sequence[np.ndarray]) -> None:
        for i in range(len(frames)):
            encoder.add(frames[i])

    def _new_encoder(self, path: Path, cam: str) -> VideoEncoder:
        assert self.schema is not None
        h, w, _ = self.schema.image_shapes[cam]
        if self.codec_used is None:
            self.codec_used = pick_codec(w, h, self.codec)
        path.parent.mkdir(parents=True, exist_ok=True)
        return VideoEncoder(path, self.fps, w, h, self.codec_used)

    # -- metadata

    def _features(self) -> dict[str, Any]:
        assert self.schema is not None
        feats: dict[str, Any] = {}
        for cam, key in self.schema.cameras.items():
            h, w, c = self.schema.image_shapes[cam]
            entry: dict[str, Any] = {
                "dtype": self.camera_storage,
                "shape": [h, w, c],
                "names": ["height", "width", "channels"],
            }
            if self.camera_storage == "video":
                entry["info"] = {
                    "video.height": h,
                    "video.width": w,
                    "video.codec": CODEC_CANDIDATES.get(self.codec_used or "", (self.codec_used,))[0],
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "video.fps": self.fps,
                    "video.channels": c,
                    "has_audio": False,
                }
            feats[key] = entry
        for key, dim in ((STATE_KEY, self.schema.state_dim), (ACTION_KEY, self.schema.action_dim)):
            generic = [f"{key.rsplit('.', 1)[-1]}_{i}" for i in range(dim)]
            names = _POSE_NAMES[key] if dim == len(_POSE_NAMES[key]) else generic
            feats[key] = {"dtype": "float32", "shape": [dim], "names": names}
        feats["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
        feats["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
        feats["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for key in ("frame_index", "episode_index", "index", "task_index"):
            feats[key] = {"dtype": "int64", "shape": [1], "names": None}
        for name, col in self.extras.items():
            feats[name] = col.feature or _default_feature(name, self.schema.extra_types[name])
        return feats

    def _info(self, **layout: Any) -> dict[str, Any]:
        return {
            "codebase_version": self.version,
            "robot_type": self.robot_type,
            "total_episodes": self.episodes,
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            **layout,
            "fps": self.fps,
            "splits": {"train": f"0:{self.episodes}"},
            "features": self._features() if self.schema else {},
        }

    def _write_json(self, rel: str, payload: Any) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=4))

    def _write_parquet(self, table: pa.Table, rel: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        default = 256 if self.camera_storage == "image" and self.schema and self.schema.cameras else 4096
        pq.write_table(table, path, row_group_size=self.row_group_size or default)

    def _global_stats_json(self) -> dict[str, Any]:
        assert self.schema is not None
        cams = set(self.schema.cameras.values())
        return {k: v.as_json(image=k in cams) for k, v in self.global_stats.items()}


class _V21Writer(_Writer):
    """One parquet (and one mp4 per camera) per episode; jsonl metadata written at the end."""

    def __post_init__(self) -> None:
        self.version = V21
        self._episode_lines: list[dict[str, Any]] = []
        self._stats_lines: list[dict[str, Any]] = []

    def add(self, episode: Episode, position: int) -> None:
        index, task = self._prepare(episode)
        assert self.schema is not None
        chunk = index // self.chunks_size
        table = self._frame_table(episode, position, index, task)
        self._write_parquet(table, V21_DATA_PATH.format(episode_chunk=chunk, episode_index=index))
        if self.camera_storage == "video":
            for cam, key in self.schema.cameras.items():
                rel = V21_VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=index)
                encoder = self._new_encoder(self.root / rel, cam)
                self._encode_camera(encoder, episode.frames[cam])
                encoder.close()
        stats = self._episode_stats(episode, table)
        cams = set(self.schema.cameras.values())
        self._episode_lines.append({"episode_index": index, "tasks": [episode.instruction], "length": len(episode)})
        self._stats_lines.append(
            {"episode_index": index, "stats": {k: v.as_json(image=k in cams) for k, v in stats.items()}}
        )
        self.total_frames += len(episode)
        self.episodes += 1

    def finish(self) -> None:
        meta = self.root / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        _write_jsonl(meta / "episodes.jsonl", self._episode_lines)
        _write_jsonl(meta / "episodes_stats.jsonl", self._stats_lines)
        _write_jsonl(meta / "tasks.jsonl", [{"task_index": i, "task": t} for t, i in self.tasks.items()])
        videos = self.camera_storage == "video" and self.schema is not None and bool(self.schema.cameras)
        n_cams = len(self.schema.cameras) if self.schema else 0
        info = self._info(
            total_chunks=(max(self.episodes - 1, 0) // self.chunks_size) + 1 if self.episodes else 0,
            total_videos=self.episodes * n_cams if videos else 0,
            chunks_size=self.chunks_size,
            data_path=V21_DATA_PATH,
            video_path=V21_VIDEO_PATH if videos else None,
        )
        self._write_json("meta/info.json", info)


class _V30Writer(_Writer):
    """Many episodes per file; holds the current data file's rows, streams frames into its mp4s."""

    def __post_init__(self) -> None:
        self.version = V30
        self._chunk, self._file = 0, 0
        self._tables: list[pa.Table] = []
        self._bytes = 0
        self._encoders: dict[str, VideoEncoder] = {}
        self._video_paths: dict[str, Path] = {}
        self._file_frames = 0
        self._episode_rows: list[dict[str, Any]] = []

    def add(self, episode: Episode, position: int) -> None:
        index, task = self._prepare(episode)
        assert self.schema is not None
        if self._tables and self._file_full():
            self._flush()
            self._file += 1
            if self._file >= self.chunks_size:
                self._chunk, self._file = self._chunk + 1, 0
        table = self._frame_table(episode, position, index, task)
        n = len(episode)
        row: dict[str, Any] = {
            "episode_index": index,
            "tasks": [episode.instruction],
            "length": n,
            "data/chunk_index": self._chunk,
            "data/file_index": self._file,
            "dataset_from_index": self.total_frames,
            "dataset_to_index": self.total_frames + n,
        }
        if self.camera_storage == "video":
            for cam, key in self.schema.cameras.items():
                encoder = self._encoders.get(key)
                if encoder is None:
                    rel = V30_VIDEO_PATH.format(video_key=key, chunk_index=self._chunk, file_index=self._file)
                    self._video_paths[key] = self.root / rel
                    encoder = self._encoders[key] = self._new_encoder(self.root / rel, cam)
                row[f"videos/{key}/chunk_index"] = self._chunk
                row[f"videos/{key}/file_index"] = self._file
                row[f"videos/{key}/from_timestamp"] = encoder.frames / self.fps
                self._encode_camera(encoder, episode.frames[cam])
                row[f"videos/{key}/to_timestamp"] = encoder.frames / self.fps
        for key, stats in self._episode_stats(episode, table).items():
            for name, value in stats.as_json().items():
                row[f"stats/{key}/{name}"] = np.asarray(value, dtype=np.float64).reshape(-1).tolist()
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
        self._episode_rows.append(row)
        self._tables.append(table)
        self._bytes += table.nbytes
        self.total_frames += n
        self.episodes += 1

    def _file_full(self) -> bool:
        if self.episodes_per_file is not None:
            return len(self._tables) >= self.episodes_per_file
        if self._bytes >= self.data_mb * 1e6:
            return True
        return any(p.exists() and p.stat().st_size >= self.video_mb * 1e6 for p in self._video_paths.values())

    def _flush(self) -> None:
        if self._tables:
            rel = V30_DATA_PATH.format(chunk_index=self._chunk, file_index=self._file)
            self._write_parquet(pa.concat_tables(self._tables), rel)
        for encoder in self._encoders.values():
            encoder.close()
        self._tables, self._bytes, self._encoders, self._video_paths = [], 0, {}, {}

    def finish(self) -> None:
        self._flush()
        if self._episode_rows:
            self._write_parquet(pa.Table.from_pylist(self._episode_rows), "meta/episodes/chunk-000/file-000.parquet")
        tasks = pa.table(
            {"task_index": pa.array(list(self.tasks.values()), pa.int64()), "task": pa.array(list(self.tasks))}
        )
        # Written like pandas' DataFrame.to_parquet with the task string as the named index, as LeRobot does.
        pandas_meta = {
            "index_columns": ["task"],
            "column_indexes": [],
            "columns": [
                {
                    "name": "task_index",
                    "field_name": "task_index",
                    "pandas_type": "int64",
                    "numpy_type": "int64",
                    "metadata": None,
                },
                {
                    "name": "task",
                    "field_name": "task",
                    "pandas_type": "unicode",
                    "numpy_type": "object",
                    "metadata": None,
                },
            ],
            "pandas_version": "2.0.0",
        }
        tasks = tasks.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
        (self.root / "meta").mkdir(parents=True, exist_ok=True)
        pq.write_table(tasks, self.root / "meta" / "tasks.parquet")
        if self.schema is not None:
            self._write_json("meta/stats.json", self._global_stats_json())
        info = self._info(
            chunks_size=self.chunks_size,
            data_files_size_in_mb=self.data_mb,
            video_files_size_in_mb=self.video_mb,
            data_path=V30_DATA_PATH,
            video_path=V30_VIDEO_PATH if self.camera_storage == "video" else None,
        )
        self._write_json("meta/info.json", info)


# --------------------------------------------------------------------------- helpers


def _vector_column(values: np.ndarray) -> pa.Array:
    """(T, D) -> a list<float32> column, the shape HF `datasets` writes for Sequence features."""
    arr = np.ascontiguousarray(values, dtype=np.float32)
    flat = pa.array(arr.reshape(-1))
    offsets = pa.array(np.arange(0, arr.size + 1, arr.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_column(frames: Sequence[np.ndarray]) -> pa.Array:
    """Frames -> HF `Image` structs {bytes: PNG, path: null}; stored PNG bytes are kept, not re-encoded."""
    encoded = []
    for i in range(len(frames)):
        raw = frames.encoded(i) if hasattr(frames, "encoded") else None
        encoded.append(raw if raw is not None and raw[:8] == b"\x89PNG\r\n\x1a\n" else encode_png(frames[i]))
    return pa.StructArray.from_arrays(
        [pa.array(encoded, pa.binary()), pa.array([None] * len(encoded), pa.string())], names=["bytes", "path"]
    )


def _column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        return np.asarray(arr.flatten().to_numpy(zero_copy_only=False)).reshape(len(arr), -1)
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _default_feature(name: str, arrow_type: pa.DataType) -> dict[str, Any]:
    if name in ("language_persistent", "language_events"):
        return {"dtype": "language", "shape": [1], "names": None}
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        dtype = "string"
    elif pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type):
        dtype = str(arrow_type.to_pandas_dtype().__name__) if not pa.types.is_boolean(arrow_type) else "bool"
    else:
        dtype = str(arrow_type)
    return {"dtype": dtype, "shape": [1], "names": None}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
