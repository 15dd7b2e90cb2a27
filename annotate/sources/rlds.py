"""RLDS datasets in TFDS form, read without TensorFlow.

TFDS stores an RLDS episode as one serialized `tf.train.Example` per record; the
`steps` sequence is flattened into per-feature lists (`steps/observation/image_0` is a
bytes list with one JPEG per step, `steps/action` a float list of T*7 values). We:

* take the feature spec from the builder directory with TFDS itself
  (`tfds.builder_from_directory`: `features.json` + `dataset_info.json`);
* read the shard framing ourselves (TFRecord with CRC checks, or the array_record /
  parquet files TFDS also writes) and parse each record with TFDS's `tf_example_pb2`;
* turn the flat lists into numpy arrays using the spec's dtypes and shapes, and keep
  the images *encoded* (decoded lazily by `FrameSequence`).

This reads the same data `as_dataset()` would, without a 1.8 GB TensorFlow install,
and without decoding frames nobody looks at.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from ...schemas.truth import EpisodeTruth, TruthError, read_truth
from ..episode import Episode, FrameSequence
from ..errors import CorruptRecordError, SourceError
from . import tfrecord
from .base import ReadCounters, ReadOptions, read_declaration
from .remote import remote_errors

_STEPS = "steps/"


@dataclass(frozen=True)
class RldsMapping:
    """Which RLDS features become an Episode's fields. Presets fill this; flags override it.

    Keys are paths inside `steps` (``observation/image_0``) or at the episode level
    (``episode_metadata/file_path``), exactly as in the TFDS feature spec.
    """

    dataset: str  # name used in episode ids and statistics keys, e.g. "bridge_orig"
    cameras: tuple[str, ...]  # step-level image features; the first is the primary camera
    instruction: str  # step-level text feature holding the language instruction
    state: tuple[str, ...]  # step-level features concatenated into the proprio state
    action: tuple[str, ...]  # step-level features concatenated into the 7-d action
    episode_keys: tuple[str, ...] = ()  # episode-level features forming the stable id
    state_transform: str = "none"  # "none" | "pos_quat_closed" (Fractal: xyz+quat+closed -> xyz+rpy+open)

    def camera_names(self) -> list[str]:
        return [c.rsplit("/", 1)[-1] for c in self.cameras]


@dataclass
class ShardTask:
    """A contiguous run of records in one shard: the unit of parallel reading."""

    path: str
    file_format: str
    skip: int  # records to pass over at the start of the shard
    count: int  # records to read
    first_index: int  # global episode index of the first record read


@dataclass
class RldsBuilder:
    """A TFDS builder directory: its spec, splits and shards (no data read yet)."""

    directory: str
    split: str = "train"
    _builder: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from etils import epath

        with remote_errors(self.directory):
            self._open(epath.Path(self.directory))

    def _open(self, d: Any) -> None:
        import tensorflow_datasets as tfds

        if not d.exists():
            raise SourceError(f"{self.directory}: no such directory")
        if not (d / "features.json").exists() or not (d / "dataset_info.json").exists():
            raise SourceError(
                f"{self.directory}: not a TFDS builder directory (expected features.json and "
                "dataset_info.json beside the shards, e.g. .../bridge_orig/1.0.0)"
            )
        try:
            self._builder = tfds.builder_from_directory(str(d))
        except Exception as exc:  # TFDS raises many types for bad metadata
            raise SourceError(f"{self.directory}: cannot read TFDS metadata: {exc}") from exc
        if self.split not in self._builder.info.splits:
            known = ", ".join(sorted(self._builder.info.splits)) or "none"
            raise SourceError(f"{self.directory}: no split {self.split!r} (splits: {known})")

    @property
    def name(self) -> str:
        return str(self._builder.info.name)

    @property
    def features(self) -> Any:
        return self._builder.info.features

    @property
    def file_format(self) -> str:
        return str(self._builder.info.file_format.value)

    @property
    def num_episodes(self) -> int:
        return int(self._builder.info.splits[self.split].num_examples)

    @property
    def shards(self) -> list[tuple[str, int]]:
        """(path, number of episodes) per shard of the split, in order."""
        info = self._builder.info.splits[self.split]
        return [(str(p), int(n)) for p, n in zip(info.filepaths, info.shard_lengths, strict=True)]

    @cached_property
    def flat_features(self) -> dict[str, Any]:
        """Flat feature path ("steps/observation/image_0") -> TFDS feature connector."""
        return _flatten_features(self.features)

    def describe_features(self) -> str:
        """The feature paths, for error messages about unknown layouts."""
        return ", ".join(f"{k} {_describe(v)}" for k, v in self.flat_features.items())

    def tasks(self, start: int = 0, stop: int | None = None, chunk: int = 32) -> list[ShardTask]:
        """Split the episode range [start, stop) into per-shard chunks of `chunk` episodes."""
        stop = self.num_episodes if stop is None else min(stop, self.num_episodes)
        out: list[ShardTask] = []
        base = 0
        for path, n in self.shards:
            lo, hi = max(start, base), min(stop, base + n)
            pos = lo
            while pos < hi:
                count = min(chunk, hi - pos)
                out.append(ShardTask(path, self.file_format, pos - base, count, pos))
                pos += count
            base += n
        return out


def _flatten_features(feature: Any, prefix: str = "") -> dict[str, Any]:
    import tensorflow_datasets as tfds

    out: dict[str, Any] = {}
    if isinstance(feature, tfds.features.FeaturesDict):
        for key, sub in feature.items():
            out.update(_flatten_features(sub, f"{prefix}{key}/"))
    elif isinstance(feature, tfds.features.Dataset):
        out.update(_flatten_features(feature.feature, prefix))
    else:
        out[prefix.rstrip("/")] = feature
    return out


def _describe(feature: Any) -> str:
    import tensorflow_datasets as tfds

    kind = type(feature).__name__
    if isinstance(feature, tfds.features.Image):
        return f"[Image {tuple(feature.shape)}]"
    if isinstance(feature, tfds.features.Text):
        return "[Text]"
    return f"[{kind} {tuple(feature.shape)} {np.dtype(feature.np_dtype).name}]"


def _quat_xyzw_to_rpy(q: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) in x, y, z, w order -> roll, pitch, yaw (extrinsic XYZ)."""
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.stack([roll, pitch, yaw], axis=-1)


class RecordDecoder:
    """Turns one serialized RLDS episode into an `Episode`, using the TFDS spec.

    Built once per reader; validated against the spec at construction so an unknown
    layout fails before any data is read, naming the features found and the flags.
    """

    def __init__(self, flat_features: dict[str, Any], mapping: RldsMapping, where: str) -> None:
        import tensorflow_datasets as tfds

        self.mapping = mapping
        self.where = where
        missing = []
        for key in (*mapping.cameras, mapping.instruction, *mapping.state, *mapping.action):
            if _STEPS + key not in flat_features:
                missing.append(key)
        if missing:
            found = ", ".join(
                f"{k.removeprefix(_STEPS)} {_describe(v)}" for k, v in flat_features.items() if k.startswith(_STEPS)
            )
            raise SourceError(
                f"{where}: unknown layout for preset {mapping.dataset!r}: missing step feature(s) "
                f"{', '.join(missing)}. Step features found: {found}. Map them with --camera, "
                "--instruction-key, --state-key, --action-key."
            )
        for cam in mapping.cameras:
            if not isinstance(flat_features[_STEPS + cam], tfds.features.Image):
                raise SourceError(f"{where}: --camera {cam} is not an image feature")
        self.episode_keys = tuple(k for k in mapping.episode_keys if k in flat_features)
        self._spec: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        for key in (*mapping.state, *mapping.action, "is_first", "is_last", "is_terminal", "reward"):
            feat = flat_features.get(_STEPS + key)
            if feat is not None:
                self._spec[key] = (np.dtype(feat.np_dtype), tuple(int(s) for s in feat.shape))

    def _numeric(self, feats: Any, key: str, n_steps: int | None) -> np.ndarray:
        dtype, shape = self._spec[key]
        f = feats[_STEPS + key]
        kind = f.WhichOneof("kind")
        values = getattr(f, kind).value if kind else []
        arr = np.asarray(values, dtype=np.float32 if dtype.kind == "f" else np.int64).astype(dtype, copy=False)
        width = int(np.prod(shape)) if shape else 1
        if n_steps is not None and arr.size != n_steps * width:
            raise SourceError(f"{self.where}: field steps/{key} has {arr.size} values, expected {n_steps}x{width}")
        return arr.reshape(-1, width) if shape else arr

    def decode(self, record: bytes, fallback_id: str) -> Episode:
        from tensorflow_datasets.proto import tf_example_pb2

        example = tf_example_pb2.Example()
        example.ParseFromString(record)
        feats = example.features.feature
        m = self.mapping

        instr_values = feats[_STEPS + m.instruction].bytes_list.value if _STEPS + m.instruction in feats else []
        n_steps = len(instr_values)
        meta: dict[str, Any] = {}
        for key in self.episode_keys:
            f = feats[key]
            kind = f.WhichOneof("kind")
            vals = list(getattr(f, kind).value) if kind else []
            if vals:
                v = vals[0]
                meta[key.rsplit("/", 1)[-1]] = v.decode("utf-8") if isinstance(v, bytes) else int(v)
        source_key = "#".join(
            str(meta[k.rsplit("/", 1)[-1]]) for k in self.episode_keys if k.rsplit("/", 1)[-1] in meta
        )
        episode_id = f"{m.dataset}:{source_key or fallback_id}"
        where = f"{self.where}: episode {episode_id}"
        if n_steps == 0:
            raise SourceError(f"{where}: zero steps")
        instruction = next((v.decode("utf-8").strip() for v in instr_values if v.strip()), "")
        if not instruction:
            raise SourceError(f"{where}: no language instruction (field steps/{m.instruction} is empty)")

        def cat(keys: Sequence[str]) -> np.ndarray:
            parts = [self._numeric(feats, k, n_steps).astype(np.float32) for k in keys]
            parts = [p.reshape(n_steps, -1) for p in parts]
            return np.concatenate(parts, axis=1)

        try:
            actions = cat(m.action)
            states = cat(m.state)
        except SourceError as exc:
            raise SourceError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
        if m.state_transform == "pos_quat_closed":
            states = np.concatenate(
                [states[:, :3], _quat_xyzw_to_rpy(states[:, 3:7]), 1.0 - states[:, 7:8]], axis=1
            ).astype(np.float32)

        def flag(key: str, default: np.ndarray) -> np.ndarray:
            if key not in self._spec or _STEPS + key not in feats:
                return default
            return self._numeric(feats, key, n_steps).reshape(n_steps)

        idx = np.arange(n_steps)
        frames = {}
        for cam, name in zip(m.cameras, m.camera_names(), strict=True):
            enc = list(feats[_STEPS + cam].bytes_list.value)
            if len(enc) != n_steps:
                raise SourceError(f"{where}: camera {cam} has {len(enc)} frames for {n_steps} steps")
            frames[name] = FrameSequence(enc)
        meta["source"] = fallback_id
        return Episode(
            episode_id=episode_id,
            dataset=m.dataset,
            instruction=instruction,
            actions=actions,
            states=states,
            frames=frames,
            is_first=flag("is_first", idx == 0).astype(bool),
            is_last=flag("is_last", idx == n_steps - 1).astype(bool),
            is_terminal=flag("is_terminal", idx == n_steps - 1).astype(bool),
            rewards=flag("reward", np.zeros(n_steps, np.float32)).astype(np.float32),
            metadata=meta,
        )


def iter_shard_records(
    task: ShardTask,
    check_crc: bool = True,
    on_bad_data: Callable[[CorruptRecordError], None] | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Yield (location, serialized example) for the task's records, any TFDS file format.

    Locations are `<shard file>#<record index>`: the fallback episode key for datasets
    without episode metadata (Fractal), stable as long as the shards are.
    """
    base = os.path.basename(task.path)
    if task.file_format == "tfrecord":
        from etils import epath

        try:
            stream = epath.Path(task.path).open("rb")
        except FileNotFoundError:
            raise SourceError(f"{task.path}: shard listed in dataset_info.json is missing") from None
        with stream:
            offsets = tfrecord.read_records(
                stream, task.path, check_crc=check_crc, skip=task.skip, limit=task.count, on_bad_data=on_bad_data
            )
            index = task.skip
            for _, rec in offsets:
                yield f"{base}#{index}", rec
                index += 1
    elif task.file_format == "array_record":
        from array_record.python.array_record_module import ArrayRecordReader

        if not os.path.exists(task.path):
            raise SourceError(f"{task.path}: shard listed in dataset_info.json is missing")
        reader = ArrayRecordReader(task.path)
        try:
            stop = min(task.skip + task.count, reader.num_records())
            for i, rec in enumerate(reader.read(task.skip, stop)):
                yield f"{base}#{task.skip + i}", rec
        finally:
            reader.close()
    elif task.file_format == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(task.path)
        seen = 0
        for batch in pf.iter_batches(columns=["data"], batch_size=64):
            col = batch.column(0)
            for j in range(len(col)):
                if seen >= task.skip + task.count:
                    return
                if seen >= task.skip:
                    yield f"{base}#{seen}", col[j].as_py()
                seen += 1
    else:
        raise SourceError(f"{task.path}: unsupported TFDS file format {task.file_format!r}")


def _read_task(task: ShardTask, decoder: RecordDecoder, options: ReadOptions) -> tuple[list[Episode], list[str]]:
    counters = ReadCounters()
    episodes = list(_decode_task(task, decoder, options, counters))
    return episodes, counters.corrupt


def _decode_task(
    task: ShardTask, decoder: RecordDecoder, options: ReadOptions, counters: ReadCounters
) -> Iterator[Episode]:
    def note(exc: CorruptRecordError) -> None:
        counters.corrupt.append(f"{exc.path} @ byte {exc.offset}: {exc.reason}")

    try:
        for loc, rec in iter_shard_records(task, options.check_crc, note if options.skip_corrupt else None):
            yield decoder.decode(rec, loc)
    except CorruptRecordError as exc:
        if not options.skip_corrupt:
            raise
        # A broken frame: nothing after it in this shard can be located. Count it, go on.
        note(exc)


class RldsSource:
    """Streams Episodes from a TFDS builder directory.

    One episode (or, with workers, a bounded window of chunks) is in memory at a time. `declared` is
    what the directory's `refinevla_source.json` says about the data (see `read_declaration`); `truth()`
    what a simulator knew about its episodes (`refinevla_truth.json`).
    """

    def __init__(self, directory: str, mapping: RldsMapping, split: str = "train") -> None:
        self.builder = RldsBuilder(directory, split)
        if mapping.dataset == "":
            mapping = replace(mapping, dataset=self.builder.name)
        self.mapping = mapping
        self.decoder = RecordDecoder(self.builder.flat_features, mapping, directory)
        self.counters = ReadCounters()
        self.name = mapping.dataset
        self.declared = read_declaration(directory)

    def __len__(self) -> int:
        return self.builder.num_episodes

    def layout(self) -> dict[str, Any]:
        """Which features became the episodes' fields (and the state's conversion): what a published dataset
        records as read from this source."""
        m = self.mapping
        return {
            "state": list(m.state),
            "state_transform": None if m.state_transform == "none" else m.state_transform,
            "cameras": list(m.cameras),
            "action": list(m.action),
            "instruction": m.instruction,
        }

    def truth(self) -> dict[str, EpisodeTruth] | None:
        """The simulator's truth about the episodes, by episode id (`refinevla_truth.json`, which
        `refine-eval demos` writes beside its episodes; `refinevla.schemas.truth` defines it); None for a
        folder without one (any other dataset, or demos recorded before it existed). A broken file is a
        one-line SourceError naming it. Read from a local folder only (a gs:// dataset has none)."""
        try:
            return read_truth(self.builder.directory)
        except TruthError as exc:
            raise SourceError(str(exc)) from None

    def iter_episodes(self, options: ReadOptions | None = None) -> Iterator[Episode]:
        options = options or ReadOptions()
        # In-process: one task per shard (one open, one pass). Workers: small chunks.
        chunk = 16 if options.workers > 0 else 1 << 62
        tasks = self.builder.tasks(options.start, options.stop, chunk=chunk)
        if options.workers <= 0:
            for task in tasks:
                yield from _decode_task(task, self.decoder, options, self.counters)
            return
        yield from self._iter_parallel(tasks, options)

    def _iter_parallel(self, tasks: list[ShardTask], options: ReadOptions) -> Iterator[Episode]:
        # Ordered output with a bounded window: memory stays at ~2x workers chunks.
        window = max(2, 2 * options.workers)
        with ProcessPoolExecutor(max_workers=options.workers) as pool:
            pending: list[Future[tuple[list[Episode], list[str]]]] = []
            it = iter(tasks)
            for task in it:
                pending.append(pool.submit(_read_task, task, self.decoder, options))
                if len(pending) >= window:
                    break
            while pending:
                episodes, corrupt = pending.pop(0).result()
                self.counters.corrupt.extend(corrupt)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(_read_task, nxt, self.decoder, options))
                yield from episodes
