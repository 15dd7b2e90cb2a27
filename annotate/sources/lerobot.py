"""LeRobot datasets (codebase v2.1 and v3.0), local or on the Hugging Face Hub, read without `lerobot`.

Why not `lerobot.LeRobotDataset`: it pulls torch, decodes every camera of every frame it
serves, and downloads whole repositories. Annotation needs one episode at a time, the
numbers always, and the pixels of one camera only when a stage asks. So:

* metadata (`meta/info.json`, the episode table, the task table) is read once at open;
  layouts are validated there, naming the features found and the flag that maps them;
* an episode's rows are read from its parquet file alone: v2.1 has one file per episode,
  v3.0 locates the episode inside a shared file by the row offsets in `meta/episodes`
  and reads only the parquet row groups overlapping those rows (the last groups read are
  cached, so consecutive episodes of one file do not re-read them);
* video cameras are decoded lazily with PyAV: seek to the episode's `from_timestamp` in the
  (possibly shared) mp4, decode forward, keep the decoded frames of the episode so
  sequential access decodes each frame once; image-stored cameras stay encoded bytes;
* from the Hub, `huggingface_hub.snapshot_download` fetches the metadata at open and, per
  read, only the data files and the selected cameras' videos of the requested range.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..episode import Episode, FrameSequence
from ..errors import SourceError
from .base import ReadCounters, ReadOptions, SourceOverrides, read_declaration
from .lerobot_writer import CAMERA_PREFIX
from .libero_layout import (
    LIBERO_DECLARATION,
    LIBERO_STATE_KEY,
    LIBERO_STATE_TRANSFORM,
    is_libero_layout,
    libero_state,
)

SUPPORTED_VERSIONS = ("v2.1", "v3.0")
CAMERA_DTYPES = ("video", "image")
META_PATTERNS = ["meta/info.json", "meta/episodes.jsonl", "meta/tasks.jsonl", "meta/episodes/*", "meta/tasks.parquet"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FLAGS = "Map them with --camera, --state-key, --action-key, --instruction-key."


@dataclass
class EpisodeRef:
    """Where one episode lives: its data file and row range, its videos and timestamps."""

    index: int
    length: int
    tasks: list[str]
    data_file: str  # relative to the dataset root
    row_offset: int | None  # first row inside data_file (v3.0); None: the whole file (v2.1)
    videos: dict[str, tuple[str, float]] = field(default_factory=dict)  # feature -> (mp4, from_timestamp)


class LeRobotSource:
    """A LeRobot v2.1 / v3.0 dataset as an `EpisodeSource`.

    `path_or_repo` is a local dataset folder (the one holding `meta/`) or a Hub dataset repo id
    (`lerobot/pusht`); `revision` pins a Hub revision. Episodes are read in episode-index order;
    `ReadOptions.start/stop` are positions in that order (equal to episode indices in any
    dataset written by LeRobot). `ReadOptions.workers` is not used: one episode costs one
    parquet slice, and decoding is deferred to whoever asks for pixels.
    """

    def __init__(
        self, path_or_repo: str, *, overrides: SourceOverrides | None = None, revision: str | None = None
    ) -> None:
        self.counters = ReadCounters()
        self._overrides = overrides or SourceOverrides()
        self._revision = revision
        self._source = path_or_repo
        self._repo_id: str | None = None
        if os.path.isdir(path_or_repo):
            self.root = Path(path_or_repo)
            self.name = self.root.resolve().name
        elif _REPO_ID.fullmatch(path_or_repo) and not path_or_repo.startswith("."):
            self._repo_id = path_or_repo
            self.name = path_or_repo
            self.root = self._download(META_PATTERNS)
        else:
            raise SourceError(
                f"{path_or_repo}: no such directory (give a LeRobot dataset folder holding meta/info.json, "
                "or a Hub dataset repo id such as lerobot/pusht)"
            )
        self.info = _read_info(self.root)
        # what the folder says about itself (refinevla_source.json: transform, robot), as the RLDS reader reads it
        self.declared = read_declaration(str(self.root)) if self._repo_id is None else {}
        self.version: str = self.info["codebase_version"]
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        self.fps = float(self.info.get("fps") or 0) or None
        self.cameras = self._select_cameras()
        # the state: --state-key, else the features the folder declares as its 7-d eef state, else LeRobot's own
        # (LIBERO's 8-D one converted to 7-D: libero_layout)
        chosen_state = self._overrides.state_key or tuple(self.declared.get("state_key") or ())
        self.state_keys = self._select_keys(chosen_state or ("observation.state",), "state", "--state-key")
        self.state_transform: str | None = None  # the conversion applied to the state on read
        if is_libero_layout(self.info):
            # LIBERO's actions drive libero_panda as stored, whatever the state; the folder's own word wins
            self.declared = {**LIBERO_DECLARATION, **self.declared}
            self.state_transform = None if chosen_state else LIBERO_STATE_TRANSFORM
        self.action_keys = self._select_keys(self._overrides.action_key or ("action",), "action", "--action-key")
        if self._overrides.instruction_key:
            self._select_keys((self._overrides.instruction_key,), "instruction", "--instruction-key")
        self.tasks = _read_tasks(self.root, self.version) if not self._overrides.instruction_key else {}
        self.episodes = self._read_episode_table()

    # ------------------------------------------------------------------ protocol

    def __len__(self) -> int:
        return len(self.episodes)

    def iter_episodes(self, options: ReadOptions | None = None) -> Iterator[Episode]:
        """Stream episodes [start, stop) one at a time, reading only their rows and files."""
        options = options or ReadOptions()
        refs = self.episodes[options.start : options.stop]
        if self._repo_id is not None:
            self._fetch(refs)
        rows = _RowReader(self.root)
        columns = self._columns()
        for ref in refs:
            table = rows.read(ref, columns)
            yield self._episode(ref, table)

    # ------------------------------------------------------------------ layout

    def layout(self) -> dict[str, Any]:
        """Which features became the episodes' fields (and the state's conversion): what a published dataset
        records as read from this source."""
        return {
            "state": list(self.state_keys),
            "state_transform": self.state_transform,
            "cameras": list(self.cameras.values()),
            "action": list(self.action_keys),
            "instruction": self._overrides.instruction_key or "task_index",
        }

    def _select_cameras(self) -> dict[str, str]:
        """Camera name (suffix after `observation.images.`) -> feature key. Default: the first camera."""
        found = [k for k, v in self.features.items() if v.get("dtype") in CAMERA_DTYPES]
        if not self._overrides.cameras:
            return {_camera_name(found[0]): found[0]} if found else {}
        out = {}
        for wanted in self._overrides.cameras:
            key = wanted if wanted in found else CAMERA_PREFIX + wanted
            if key not in found:
                raise SourceError(
                    f"{self.root / 'meta/info.json'}: no camera feature {wanted!r} (--camera). "
                    f"Camera features found: {', '.join(found) or 'none'}"
                )
            out[_camera_name(key)] = key
        return out

    def _select_keys(self, keys: Sequence[str], what: str, flag: str) -> tuple[str, ...]:
        for key in keys:
            if key not in self.features:
                raise SourceError(
                    f"{self.root / 'meta/info.json'}: no feature {key!r} for the {what} ({flag}). "
                    f"Features found: {_describe_features(self.features)}. {_FLAGS}"
                )
        return tuple(keys)

    def _columns(self) -> list[str]:
        """The parquet columns an Episode needs (video cameras live in mp4 files, not here)."""
        cols = [*self.state_keys, *self.action_keys]
        cols += [k for k in self.cameras.values() if self.features[k]["dtype"] == "image"]
        cols.append(self._overrides.instruction_key or "task_index")
        cols += ["frame_index", "episode_index"]
        if "next.reward" in self.features:
            cols.append("next.reward")
        return list(dict.fromkeys(cols))

    def _read_episode_table(self) -> list[EpisodeRef]:
        refs = _read_v21_episodes(self) if self.version == "v2.1" else _read_v30_episodes(self)
        refs.sort(key=lambda r: r.index)
        return refs

    def _video_keys(self) -> list[str]:
        return [k for k in self.cameras.values() if self.features[k]["dtype"] == "video"]

    def _path_template(self, key: str) -> str:
        template = self.info.get(key)
        if not isinstance(template, str):
            raise SourceError(f"{self.root / 'meta/info.json'}: missing {key!r} (the file path template)")
        return template

    # ------------------------------------------------------------------ episodes

    def _episode(self, ref: EpisodeRef, table: pa.Table) -> Episode:
        where = f"{self.root / ref.data_file} episode {ref.index}"
        n = table.num_rows
        frame_index = _numpy(table["frame_index"], where, "frame_index").reshape(-1)
        if np.any(np.diff(frame_index) <= 0):
            raise SourceError(f"{where}: frame_index is not increasing; rows are out of order")
        is_first = frame_index == frame_index.min()
        is_last = np.zeros(n, bool)
        is_last[-1] = True
        rewards = (
            _numpy(table["next.reward"], where, "next.reward").reshape(-1).astype(np.float32)
            if "next.reward" in table.column_names
            else np.zeros(n, np.float32)
        )
        return Episode(
            episode_id=f"{self.name}:episode_{ref.index}",
            dataset=self.name,
            instruction=self._instruction(ref, table, where),
            actions=self._concat(table, self.action_keys, where),
            states=self._states(table, where),
            frames=self._frames(ref, table, where),
            is_first=is_first,
            is_last=is_last,
            is_terminal=is_last.copy(),
            rewards=rewards,
            metadata={
                "episode_index": ref.index,
                "source": self._source,
                "codebase_version": self.version,
                "fps": self.fps,
                "data_file": ref.data_file,
                "tasks": list(ref.tasks),
                "camera_features": dict(self.cameras),
            },
        )

    def _states(self, table: pa.Table, where: str) -> np.ndarray:
        """The episode's states as refinevla reads them: the state features, converted where the layout needs."""
        states = self._concat(table, self.state_keys, where)
        if self.state_transform == LIBERO_STATE_TRANSFORM:
            return libero_state(states, f"{where}: {LIBERO_STATE_KEY}")
        return states

    def _concat(self, table: pa.Table, keys: Sequence[str], where: str) -> np.ndarray:
        parts = [_numpy(table[k], where, k).reshape(table.num_rows, -1) for k in keys]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _instruction(self, ref: EpisodeRef, table: pa.Table, where: str) -> str:
        key = self._overrides.instruction_key
        if key:
            value = table[key][0].as_py()
            if not isinstance(value, str) or not value.strip():
                raise SourceError(f"{where}: column {key!r} (--instruction-key) holds no text in the first frame")
            return value
        task_index = int(table["task_index"][0].as_py())
        task = self.tasks.get(task_index)
        if task is None:
            task = ref.tasks[0] if ref.tasks else None
        if not task:
            raise SourceError(
                f"{where}: no task (task_index {task_index} is not in the task table and the episode lists no "
                "tasks); give --instruction-key to read the instruction from a column"
            )
        return task

    def _frames(self, ref: EpisodeRef, table: pa.Table, where: str) -> dict[str, FrameSequence]:
        out = {}
        for name, key in self.cameras.items():
            if self.features[key]["dtype"] == "image":
                out[name] = FrameSequence(_image_bytes(table[key], self.root, where, key))
                continue
            rel, start = ref.videos[key]
            path = self.root / rel
            if not path.is_file():
                raise SourceError(f"{path}: missing video file for {key} of episode {ref.index}")
            clip = _VideoClip(path, start, table.num_rows, self.fps or 0.0, f"{path} episode {ref.index}")
            out[name] = FrameSequence(loader=clip, length=table.num_rows)
        return out

    # ------------------------------------------------------------------ Hub

    def _download(self, patterns: list[str]) -> Path:
        import huggingface_hub

        assert self._repo_id is not None
        try:
            local = huggingface_hub.snapshot_download(
                self._repo_id, repo_type="dataset", revision=self._revision, allow_patterns=patterns
            )
        except Exception as exc:  # network, auth, missing repo: all user-actionable
            raise SourceError(
                f"{self._repo_id}: cannot download from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
                "check the repo id, your network and HF_TOKEN, or give a local folder"
            ) from exc
        return Path(local)

    def _fetch(self, refs: list[EpisodeRef]) -> None:
        """Download the data files and selected cameras' videos of `refs`, if not already here."""
        files = list(dict.fromkeys([r.data_file for r in refs] + [v[0] for r in refs for v in r.videos.values()]))
        if all((self.root / f).is_file() for f in files):
            return
        if len(refs) == len(self.episodes):  # everything: globs keep the pattern list short
            v21 = self.version == "v2.1"
            patterns = ["data/*"] + [f"videos/*/{k}/*" if v21 else f"videos/{k}/*" for k in self._video_keys()]
        else:
            patterns = files
        self.root = self._download(patterns)


# ---------------------------------------------------------------------- metadata readers


def _read_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise SourceError(f"{path}: not found; not a LeRobot dataset (expected meta/info.json, data/, videos/)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable JSON ({exc})") from exc
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise SourceError(
            f"{path}: codebase_version {version!r} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)}); "
            "convert the dataset with LeRobot's conversion scripts"
        )
    if not isinstance(info.get("features"), dict):
        raise SourceError(f"{path}: no 'features' mapping")
    return dict(info)


def _read_tasks(root: Path, version: str) -> dict[int, str]:
    if version == "v2.1":
        path = root / "meta" / "tasks.jsonl"
        rows = _read_jsonl(path)
        try:
            return {int(r["task_index"]): str(r["task"]) for r in rows}
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: each line needs task_index and task ({exc})") from exc
    path = root / "meta" / "tasks.parquet"
    if not path.is_file():
        raise SourceError(f"{path}: not found (the task table; or give --instruction-key)")
    table = pq.read_table(path)
    text_col = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if text_col is None or "task_index" not in table.column_names:
        raise SourceError(
            f"{path}: expected a task_index column and the task string as index (found {table.column_names})"
        )
    return dict(zip(table["task_index"].to_pylist(), table[text_col].to_pylist(), strict=True))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SourceError(f"{path}: not found")
    out = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as exc:
                    raise SourceError(f"{path}:{number}: bad JSON line ({exc})") from exc
    return out


def _read_v21_episodes(src: LeRobotSource) -> list[EpisodeRef]:
    path = src.root / "meta" / "episodes.jsonl"
    chunks = int(src.info.get("chunks_size") or 1000)
    data_t = src._path_template("data_path")
    video_t = src._path_template("video_path") if src._video_keys() else ""
    refs = []
    for number, row in enumerate(_read_jsonl(path), 1):
        try:
            index, length = int(row["episode_index"]), int(row["length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}:{number}: each line needs episode_index and length ({exc})") from exc
        chunk = index // chunks
        data = _format(data_t, src, episode_chunk=chunk, episode_index=index)
        videos = {
            k: (_format(video_t, src, episode_chunk=chunk, video_key=k, episode_index=index), 0.0)
            for k in src._video_keys()
        }
        refs.append(EpisodeRef(index, length, list(row.get("tasks") or []), data, None, videos))
    return refs


def _read_v30_episodes(src: LeRobotSource) -> list[EpisodeRef]:
    files = sorted((src.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise SourceError(f"{src.root / 'meta/episodes'}: no episode table (expected chunk-000/file-000.parquet)")
    videos = src._video_keys()
    needed = ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index"]
    for key in videos:
        needed += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
    rows: list[dict[str, Any]] = []
    for path in files:
        names = pq.read_schema(path).names
        missing = [c for c in needed if c not in names]
        if missing:
            raise SourceError(f"{path}: missing column(s) {', '.join(missing)} in the episode table")
        rows += pq.read_table(path, columns=needed).to_pylist()
    data_t = src._path_template("data_path")
    video_t = src._path_template("video_path") if videos else ""
    file_start: dict[str, int] = {}
    refs = []
    for row in rows:
        data = _format(data_t, src, chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
        start = int(row["dataset_from_index"])
        file_start[data] = min(file_start.get(data, start), start)
        vids = {
            k: (
                _format(
                    video_t,
                    src,
                    video_key=k,
                    chunk_index=row[f"videos/{k}/chunk_index"],
                    file_index=row[f"videos/{k}/file_index"],
                ),
                float(row[f"videos/{k}/from_timestamp"]),
            )
            for k in videos
        }
        refs.append(
            EpisodeRef(int(row["episode_index"]), int(row["length"]), list(row["tasks"] or []), data, start, vids)
        )
    for ref in refs:  # a file's first row is its lowest global index
        assert ref.row_offset is not None
        ref.row_offset -= file_start[ref.data_file]
    return refs


def _format(template: str, src: LeRobotSource, **keys: Any) -> str:
    try:
        return template.format(**keys)
    except (KeyError, IndexError, ValueError) as exc:
        raise SourceError(
            f"{src.root / 'meta/info.json'}: path template {template!r} does not fit codebase "
            f"{src.version} (unknown field {exc})"
        ) from exc


# ---------------------------------------------------------------------- rows


class _RowReader:
    """Reads an episode's rows: a whole v2.1 file, or the row groups of a v3.0 file that hold it.

    Keeps the current file open and the row groups last read, so walking the episodes of a
    shared file in order reads each row group once.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._path: Path | None = None
        self._file: pq.ParquetFile | None = None
        self._starts: list[int] = []
        self._groups: dict[int, pa.Table] = {}

    def read(self, ref: EpisodeRef, columns: list[str]) -> pa.Table:
        where = f"{self.root / ref.data_file} episode {ref.index}"
        if ref.length <= 0:
            raise SourceError(f"{where}: episode has zero frames (length {ref.length} in the episode table)")
        pf = self._open(self.root / ref.data_file, ref.index)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise SourceError(
                f"{self.root / ref.data_file}: missing column(s) {', '.join(missing)} "
                f"(columns: {', '.join(pf.schema_arrow.names)}). {_FLAGS}"
            )
        total = self._starts[-1]
        if ref.row_offset is None:  # v2.1: the file is the episode
            table = self._rows(pf, 0, total, columns)
            if total != ref.length:
                raise SourceError(f"{where}: file has {total} rows but meta/episodes.jsonl says length {ref.length}")
            return table
        lo, hi = ref.row_offset, ref.row_offset + ref.length
        if lo < 0 or hi > total:
            raise SourceError(f"{where}: rows [{lo}, {hi}) from meta/episodes are outside the file's {total} rows")
        table = self._rows(pf, lo, hi, [*columns, "episode_index"] if "episode_index" not in columns else columns)
        owners = np.unique(table["episode_index"].to_numpy())
        if owners.tolist() != [ref.index]:
            raise SourceError(
                f"{where}: rows [{lo}, {hi}) belong to episode(s) {owners.tolist()}; "
                "meta/episodes offsets (dataset_from_index) disagree with the data file"
            )
        return table

    def _open(self, path: Path, index: int) -> pq.ParquetFile:
        if path != self._path:
            if not path.is_file():
                raise SourceError(f"{path}: missing data file for episode {index}")
            try:
                self._file = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as exc:
                raise SourceError(f"{path}: unreadable parquet file ({exc})") from exc
            meta = self._file.metadata
            self._starts = [0]
            for i in range(meta.num_row_groups):
                self._starts.append(self._starts[-1] + meta.row_group(i).num_rows)
            self._path, self._groups = path, {}
        assert self._file is not None
        return self._file

    def _rows(self, pf: pq.ParquetFile, lo: int, hi: int, columns: list[str]) -> pa.Table:
        """Rows [lo, hi) of the file, reading only the row groups that overlap them."""
        groups = [g for g in range(len(self._starts) - 1) if self._starts[g] < hi and self._starts[g + 1] > lo]
        if not groups:
            return pf.schema_arrow.empty_table().select(columns)
        self._groups = {g: t for g, t in self._groups.items() if g >= groups[0] and t.column_names == columns}
        for g in groups:
            if g not in self._groups:
                self._groups[g] = pf.read_row_group(g, columns=columns)
        table = pa.concat_tables([self._groups[g] for g in groups])
        return table.slice(lo - self._starts[groups[0]], hi - lo)


def _numpy(column: pa.ChunkedArray, where: str, key: str) -> np.ndarray:
    """A numeric or list-of-numeric column -> (rows,) or (rows, D) numpy."""
    arr = column.combine_chunks()
    if arr.null_count:
        raise SourceError(f"{where}: column {key!r} has {arr.null_count} null value(s)")
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        flat = arr.flatten()
        if len(arr) and len(flat) % len(arr):
            raise SourceError(f"{where}: column {key!r} holds vectors of different lengths")
        return np.asarray(flat.to_numpy(zero_copy_only=False)).reshape(len(arr), -1)
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise SourceError(f"{where}: column {key!r} is {arr.type}, not numeric")
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _image_bytes(column: pa.ChunkedArray, root: Path, where: str, key: str) -> list[bytes]:
    """HF `Image` structs {bytes, path} -> encoded bytes (read from `path` when bytes are absent)."""
    out = []
    for i, item in enumerate(column.to_pylist()):
        raw = item.get("bytes") if isinstance(item, dict) else None
        if raw is None and isinstance(item, dict) and item.get("path"):
            path = root / item["path"]
            if not path.is_file():
                raise SourceError(f"{where}: {key} frame {i} points to missing image {path}")
            raw = path.read_bytes()
        if raw is None:
            raise SourceError(f"{where}: {key} frame {i} has no image bytes")
        out.append(raw)
    return out


# ---------------------------------------------------------------------- video


class _VideoClip:
    """One episode's frames in an mp4, decoded on first use and kept for the episode's lifetime.

    Decoding starts at the keyframe before `start` (v3.0 episodes share files) and runs forward;
    a frame already decoded is served from the cache, so sequential access decodes each once.
    """

    def __init__(self, path: Path, start: float, length: int, fps: float, where: str) -> None:
        self.path, self.start, self.length, self.fps, self.where = path, start, length, fps, where
        self._frames: list[np.ndarray] = []
        self._decoder: Iterator[np.ndarray] | None = None

    def __call__(self, index: int) -> np.ndarray:
        while len(self._frames) <= index:
            if self._decoder is None:
                self._decoder = self._decode()
            try:
                self._frames.append(next(self._decoder))
            except StopIteration:
                raise SourceError(
                    f"{self.where}: video ends after {len(self._frames)} of the episode's {self.length} frames "
                    f"(from_timestamp {self.start:.3f}s)"
                ) from None
        return self._frames[index]

    def _decode(self) -> Iterator[np.ndarray]:
        import av

        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                tolerance = 0.5 / self.fps if self.fps else 1e-3
                if self.start > tolerance and stream.time_base:
                    container.seek(int(self.start / stream.time_base), stream=stream, backward=True)
                emitted = 0
                for frame in container.decode(stream):
                    if frame.time is not None and frame.time < self.start - tolerance:
                        continue
                    yield frame.to_ndarray(format="rgb24")
                    emitted += 1
                    if emitted == self.length:
                        return
        except av.error.FFmpegError as exc:
            raise SourceError(f"{self.where}: cannot decode video ({exc})") from exc


# ---------------------------------------------------------------------- helpers


def _camera_name(key: str) -> str:
    return key.removeprefix(CAMERA_PREFIX)


def _describe_features(features: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k} [{v.get('dtype')} {tuple(v.get('shape') or ())}]" for k, v in features.items())
