"""The training table: one row per training step, materialised once as memory-mapped Arrow.

OpenVLA and Octo feed training through TFDS shuffle buffers whose RAM grows with the buffer
(their trackers are full of CPU OOM reports). Here the first run joins the published step rows
to the source's frames and writes `steps.arrow` — encoded frame bytes (as stored: no re-encode
for RLDS JPEGs), prompt, rationale parts, target text, the transformed action — in fixed-size
record batches; every later run, and every other rank, maps the same file. Samples are then
drawn by shuffled index and decoded in DataLoader workers: memory is one batch of pages, not
the dataset or a shuffle buffer.

The table's folder name is a hash of everything that changes a row: the dataset's content
(its Parquet files and manifest), the source, split, camera, transform, schema id and the table
format version. `episodes.arrow` keeps each episode's raw actions and states, from which the
statistics of any split are computed with `refine-data stats`' own function.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..annotate.episode import Episode, FrameSequence
from ..annotate.errors import SourceError
from ..annotate.stats import TRANSFORMS, auto_transform, transform_episode
from ..schemas.dataset_layout import (
    EPISODE_FILES,
    EPISODES_DIR,
    MANIFEST,
    STEP_FILES,
    STEPS_DIR,
    episode_files,
    manifest_path,
    read_manifest,
    step_files,
)
from .errors import TrainError
from .targets import dumps_parts, prompt_text, rationale_parts, serialisation_for, target_text

TABLE_VERSION = 1
ROWS_PER_BATCH = 64  # rows per Arrow record batch: row i is in batch i // ROWS_PER_BATCH

STEP_SCHEMA = pa.schema(
    [
        pa.field("episode_id", pa.string()),
        pa.field("step", pa.int32()),  # step index in the source episode
        pa.field("instruction", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("parts", pa.string()),  # JSON [[tag, text], ...]
        pa.field("target", pa.string()),  # the full rationale text up to ACTION:
        pa.field("action", pa.list_(pa.float32(), 7)),  # after the transform, before normalisation
        pa.field("frame", pa.binary()),  # encoded image (JPEG/PNG)
    ]
)
EPISODE_SCHEMA = pa.schema(
    [
        pa.field("episode_id", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("actions", pa.list_(pa.list_(pa.float32(), 7))),  # raw, as the source reads them
        pa.field("states", pa.list_(pa.list_(pa.float32(), 7))),
    ]
)


def default_cache_dir() -> Path:
    env = os.environ.get("REFINEVLA_CACHE")
    return Path(env) / "train" if env else Path.home() / ".cache" / "refinevla" / "train"


# --------------------------------------------------------------------------- the published dataset


@dataclass
class PublishedDataset:
    """A `refine-data` output folder (local, or downloaded from the Hub): Parquet + manifest."""

    root: Path
    name: str  # what the user passed (folder or ORG/NAME)
    manifest: dict[str, Any]
    schema_id: str

    @property
    def step_files(self) -> list[Path]:
        return step_files(self.root)

    @property
    def episode_files(self) -> list[Path]:
        return episode_files(self.root)

    def fingerprint(self) -> str:
        """sha256 of the data that makes the rows: every Parquet file's bytes."""
        h = hashlib.sha256()
        for f in self.step_files + self.episode_files:
            h.update(str(f.relative_to(self.root)).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def open_published(dataset: str, revision: str | None = None) -> PublishedDataset:
    """A local `OUT/` folder or a Hub dataset repo id (only its manifest and Parquet are fetched)."""
    root = Path(dataset)
    if not root.exists():
        if dataset.count("/") != 1 or dataset.startswith((".", "/")):
            raise TrainError(f"--dataset {dataset}: no such folder (and not an ORG/NAME Hub id)")
        from huggingface_hub.errors import HfHubHTTPError

        from ..annotate.publish.push import hf_api, resolve_token

        # The client `refine-data push` and `validate` use: HF_ENDPOINT read now, HF_TOKEN or the saved login.
        try:
            root = Path(
                hf_api(resolve_token()).snapshot_download(
                    dataset,
                    repo_type="dataset",
                    revision=revision,
                    allow_patterns=[MANIFEST, STEP_FILES, EPISODE_FILES],
                )
            )
        except (HfHubHTTPError, OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]  # the client's messages run over several lines
            raise TrainError(
                f"--dataset {dataset}: cannot download from the Hub ({type(exc).__name__}: {first})"
            ) from None
    if not manifest_path(root).is_file():
        raise TrainError(f"{manifest_path(root)}: missing (not a refine-data dataset; run refine-data annotate first)")
    try:
        manifest = read_manifest(root)
        schema_id = str(manifest["schema"]["id"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TrainError(f"{manifest_path(root)}: unreadable manifest ({exc})") from None
    ds = PublishedDataset(root, dataset, manifest, schema_id)
    if not ds.step_files or not ds.episode_files:
        raise TrainError(f"{root}: no {STEP_FILES} or {EPISODE_FILES} (an empty or partial dataset)")
    return ds


# --------------------------------------------------------------------------- table building


@dataclass(frozen=True)
class TableSpec:
    """Everything that changes a row of the table (its hash names the table's folder)."""

    fingerprint: str  # PublishedDataset.fingerprint()
    source: str  # source URI (the manifest's unless --source)
    data_dir: str | None
    split: str
    camera: str | None  # None: the source's primary camera
    transform: str  # bridge_orig | fractal | none | auto
    schema_id: str

    def key(self) -> str:
        payload = json.dumps({"v": TABLE_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def resolve_transform(transform: str, source: Any) -> str:
    """`auto` as `refine-data stats` resolves it (Fractal by name, Bridge by layout, else none)."""
    if transform != "auto":
        if transform not in TRANSFORMS:
            raise TrainError(f"--transform {transform!r}: choose from {', '.join(TRANSFORMS)}, auto")
        return transform
    return auto_transform(source)


def step_offset(transform: str) -> int:
    """Source step of transformed row 0: `bridge_orig` drops step 0 (its all-zero action)."""
    return 1 if transform == "bridge_orig" else 0


def encoded_frame(seq: FrameSequence, step: int) -> bytes:
    raw = seq.encoded(step)
    if raw is not None:
        return bytes(raw)
    from PIL import Image

    buf = io.BytesIO()  # video-backed sources: keep a JPEG, as RLDS stores its frames
    Image.fromarray(seq[step]).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _read_rows(files: list[Path], columns: list[str] | None = None) -> pa.Table:
    try:
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise TrainError(f"{files[0].parent}: unreadable Parquet ({exc})") from None


class StepRows:
    """The published step rows, read one Parquet row group at a time as their episodes arrive.

    Building the table must not hold a whole Bridge-sized dataset's rationale text in memory: only an
    index (episode id -> the row groups holding its rows) is kept, and the few most recently read row
    groups. The writer appends an episode's rows together and the source is read in the same order,
    so each row group is read about once.
    """

    CACHED_GROUPS = 4

    def __init__(self, files: list[Path], columns: list[str]) -> None:
        self.columns = ["episode_id", "step", *columns]
        self.where: dict[str, list[tuple[int, int]]] = {}
        self.num_rows = 0
        self._cache: OrderedDict[tuple[int, int], dict[str, dict[int, dict[str, Any]]]] = OrderedDict()
        self._files: list[pq.ParquetFile] = []
        self._paths = files
        try:
            for fi, f in enumerate(files):
                pf = pq.ParquetFile(f)
                self._files.append(pf)
                absent = [c for c in self.columns if c not in pf.schema_arrow.names]
                if absent:
                    raise TrainError(f"{f}: step rows have no column {absent[0]!r} (the schema's step parts need it)")
                self.num_rows += pf.metadata.num_rows
                for rg in range(pf.num_row_groups):
                    ids = pf.read_row_group(rg, columns=["episode_id"]).column(0).unique().to_pylist()
                    for eid in ids:
                        self.where.setdefault(eid, []).append((fi, rg))
        except (pa.ArrowInvalid, KeyError, OSError) as exc:
            raise TrainError(f"{files[0].parent}: unreadable Parquet ({exc})") from None

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self.where

    def episode_ids(self) -> list[str]:
        return list(self.where)

    def rows(self, episode_id: str) -> dict[int, dict[str, Any]]:
        """Step number -> row, for one episode (read from its row groups, or the cache)."""
        out: dict[int, dict[str, Any]] = {}
        for place in self.where.get(episode_id, []):
            out.update(self._group(place).get(episode_id, {}))
        return out

    def _group(self, place: tuple[int, int]) -> dict[str, dict[int, dict[str, Any]]]:
        if place in self._cache:
            self._cache.move_to_end(place)
            return self._cache[place]
        fi, rg = place
        try:
            rows = self._files[fi].read_row_group(rg, columns=self.columns).to_pylist()
        except (pa.ArrowInvalid, KeyError, OSError) as exc:
            raise TrainError(f"{self._paths[fi]}: unreadable row group {rg} ({exc})") from None
        grouped: dict[str, dict[int, dict[str, Any]]] = {}
        for r in rows:
            grouped.setdefault(r["episode_id"], {})[int(r["step"])] = r
        self._cache[place] = grouped
        while len(self._cache) > self.CACHED_GROUPS:
            self._cache.popitem(last=False)
        return grouped


def annotated_camera(source: dict[str, Any]) -> str | None:
    """The camera annotate read (the teacher's view): a policy learns from the frames its rationales describe
    unless `--camera` says otherwise. None for a dataset without a recorded layout: the source's primary."""
    from ..annotate.source_args import recorded_cameras

    cameras = recorded_cameras(source)
    return cameras[0] if cameras else None


def build_table(
    ds: PublishedDataset,
    *,
    source: str | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    camera: str | None = None,
    transform: str = "auto",
    cache_dir: Path | None = None,
) -> TrainingTable:
    """Open the table for these settings, building it first if no run has (atomic: tmp + rename)."""
    from ..annotate.sources import SourceOverrides, open_source

    ser = serialisation_for(ds.schema_id, where=str(manifest_path(ds.root)))
    src_info = ds.manifest.get("source", {})
    uri = source or src_info.get("uri")
    if not uri:
        raise TrainError(f"{manifest_path(ds.root)}: no source.uri; pass --source")
    split = split or src_info.get("split") or "train"
    camera = camera or annotated_camera(src_info)
    spec = TableSpec(ds.fingerprint(), uri, data_dir, split, camera, transform, ds.schema_id)
    cache = cache_dir or default_cache_dir()
    final = cache / spec.key()
    if (final / "meta.json").is_file():
        return TrainingTable(final)

    step_rows = StepRows(ds.step_files, list(ser.step_parts))
    if step_rows.num_rows == 0:
        raise TrainError(f"{ds.root / STEPS_DIR}: the dataset has no step rows (nothing to train on)")
    episodes = _read_rows(ds.episode_files)
    if "schema_id" in episodes.column_names:
        other = set(episodes.column("schema_id").to_pylist()) - {ds.schema_id}
        if other:
            serialisation_for(sorted(other)[0], where=str(ds.root / EPISODES_DIR))
    episode_rows = {r["episode_id"]: r for r in episodes.to_pylist()}
    for eid in step_rows.episode_ids():
        if eid not in episode_rows:
            raise TrainError(f"{ds.root / STEPS_DIR}: step rows of episode {eid!r} have no row in {EPISODES_DIR}/")

    try:
        overrides = SourceOverrides(cameras=(camera,)) if camera else None
        src = open_source(uri, data_dir=data_dir, split=split, overrides=overrides)
    except SourceError as exc:
        raise TrainError(f"source of {ds.name}: {exc}") from None
    transform = resolve_transform(transform, src)
    offset = step_offset(transform)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{spec.key()}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seen: set[str] = set()
    n_rows = 0
    camera_name = None
    try:
        with (
            pa.OSFile(str(tmp / "steps.arrow"), "wb") as sink,
            pa.ipc.new_file(sink, STEP_SCHEMA) as writer,
            pa.OSFile(str(tmp / "episodes.arrow"), "wb") as esink,
            pa.ipc.new_file(esink, EPISODE_SCHEMA) as ewriter,
        ):
            buffer: list[dict[str, Any]] = []
            for ep in _episodes(src, uri):
                if ep.episode_id not in step_rows:
                    continue
                rows_of = step_rows.rows(ep.episode_id)
                seen.add(ep.episode_id)
                if not ep.frames:
                    raise TrainError(f"{uri}: episode {ep.episode_id!r} has no camera frames")
                camera_name = next(iter(ep.frames))
                frames = ep.frames[camera_name]
                actions, _ = transform_episode(ep, transform)
                ep_row = episode_rows[ep.episode_id]
                for i, action in enumerate(actions):
                    s = i + offset
                    row = rows_of.get(s)
                    if row is None:
                        raise TrainError(f"{ds.root / 'data'}: episode {ep.episode_id!r} has no step row for step {s}")
                    parts = rationale_parts(ser, ep_row, row)
                    buffer.append(
                        {
                            "episode_id": ep.episode_id,
                            "step": s,
                            "instruction": ep.instruction,
                            "prompt": prompt_text(ep.instruction),
                            "parts": dumps_parts(parts),
                            "target": target_text(parts),
                            "action": np.asarray(action, np.float32).tolist(),
                            "frame": encoded_frame(frames, s),
                        }
                    )
                    if len(buffer) == ROWS_PER_BATCH:
                        writer.write_batch(pa.RecordBatch.from_pylist(buffer, schema=STEP_SCHEMA))
                        n_rows += len(buffer)
                        buffer = []
                ewriter.write_batch(
                    pa.RecordBatch.from_pylist(
                        [
                            {
                                "episode_id": ep.episode_id,
                                "dataset": ep.dataset,
                                "instruction": ep.instruction,
                                "actions": np.asarray(ep.actions, np.float32).tolist(),
                                "states": np.asarray(ep.states, np.float32).tolist(),
                            }
                        ],
                        schema=EPISODE_SCHEMA,
                    )
                )
            if buffer:
                writer.write_batch(pa.RecordBatch.from_pylist(buffer, schema=STEP_SCHEMA))
                n_rows += len(buffer)
        missing = sorted(set(step_rows.episode_ids()) - seen)
        if missing:
            raise TrainError(
                f"{ds.root / 'data'}: step rows of episode {missing[0]!r} have no episode in source {uri} "
                f"({len(missing)} such episodes; wrong --source / --split / --data-dir?)"
            )
        if n_rows == 0:
            raise TrainError(f"{ds.name}: no training steps after the {transform} transform (episodes too short?)")
        meta = {
            "version": TABLE_VERSION,
            "spec": spec.__dict__,
            "dataset": ds.name,
            "source_name": src.name,
            "transform": transform,
            "robot": getattr(src, "declared", {}).get("robot"),  # a dataset may declare the robot it drives
            "camera": camera_name or camera,  # as the source names it (a LeRobot layout records feature keys)
            "schema_id": ds.schema_id,
            "serialisation": ser.describe(),
            "rows": n_rows,
            "episodes": len(seen),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same table first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TrainingTable(final)


def _episodes(src: Any, uri: str) -> Iterator[Episode]:
    try:
        yield from src.iter_episodes()
    except SourceError as exc:
        raise TrainError(f"{uri}: {exc}") from None


# --------------------------------------------------------------------------- reading


class TrainingTable:
    """A built table, memory-mapped. Cheap to open; safe to open in every worker and rank."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        self._reader: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-map the file themselves
        return {"path": self.path, "meta": self.meta, "_reader": None, "_pid": None}

    def __len__(self) -> int:
        return int(self.meta["rows"])

    @property
    def reader(self) -> Any:
        if self._reader is None or self._pid != os.getpid():
            self._reader = pa.ipc.open_file(pa.memory_map(str(self.path / "steps.arrow"), "r"))
            self._pid = os.getpid()
        return self._reader

    def row(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        batch = self.reader.get_batch(index // ROWS_PER_BATCH)
        return batch.slice(index % ROWS_PER_BATCH, 1).to_pylist()[0]  # type: ignore[no-any-return]

    def column(self, name: str) -> list[Any]:
        return self.reader.read_all().column(name).to_pylist()  # type: ignore[no-any-return]

    def actions(self) -> np.ndarray:
        col = self.reader.read_all().column("action").combine_chunks()
        return np.asarray(col.values.to_numpy(), np.float32).reshape(-1, 7)

    def episodes(self, ids: set[str] | None = None) -> Iterator[Episode]:
        """The raw episodes (no frames), for `refine-data stats`' statistics of a split."""
        reader = pa.ipc.open_file(pa.memory_map(str(self.path / "episodes.arrow"), "r"))
        for b in range(reader.num_record_batches):
            for r in reader.get_batch(b).to_pylist():
                if ids is not None and r["episode_id"] not in ids:
                    continue
                actions = np.asarray(r["actions"], np.float32).reshape(-1, 7)
                n = len(actions)
                idx = np.arange(n)
                yield Episode(
                    episode_id=r["episode_id"],
                    dataset=r["dataset"],
                    instruction=r["instruction"],
                    actions=actions,
                    states=np.asarray(r["states"], np.float32).reshape(-1, 7),
                    frames={},
                    is_first=idx == 0,
                    is_last=idx == n - 1,
                    is_terminal=idx == n - 1,
                    rewards=np.zeros(n, np.float32),
                )
