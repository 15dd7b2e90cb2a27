"""The published dataset's Parquet step rows and episode rows (layout and manifest: `schemas.dataset_layout`).

Column types are derived from the rationale schema (the single source of truth), so a new
schema version changes the dataset features without touching this module. Files are written
under a hidden name and renamed when complete: a crashed run never leaves a half-written
`train-*.parquet` for `datasets.load_dataset` to trip over. The store, not these files, is
the durable record; every run rewrites them from the store and the source.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..schemas import load_schema
from ..schemas.dataset_layout import EPISODES_DIR, STEPS_DIR, part_name
from .records import AnnotationOutcome

ROWS_PER_FLUSH = 20_000  # step rows buffered before a row group is written


def arrow_type(node: dict[str, Any], defs: dict[str, Any]) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of a JSON Schema node (local $refs resolved)."""
    if "$ref" in node:
        return arrow_type(defs[node["$ref"].removeprefix("#/$defs/")], defs)
    kind = node.get("type")
    if kind is None and "const" in node:
        kind = {str: "string", int: "integer", float: "number", bool: "boolean"}[type(node["const"])]
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    nullable = "null" in kinds
    kinds = [k for k in kinds if k != "null"]
    if len(kinds) != 1:
        raise ValueError(f"cannot map JSON Schema type {kind!r} to one Arrow type")
    k = kinds[0]
    if k == "string":
        return pa.string(), nullable
    if k == "integer":
        return pa.int64(), nullable
    if k == "number":
        return pa.float32(), nullable
    if k == "boolean":
        return pa.bool_(), nullable
    if k == "array":
        item, _ = arrow_type(node["items"], defs)
        return pa.list_(item), nullable
    if k == "object":
        return pa.struct(object_fields(node, defs)), nullable
    raise ValueError(f"unsupported JSON Schema type {k!r}")


def object_fields(node: dict[str, Any], defs: dict[str, Any], skip: tuple[str, ...] = ()) -> list[pa.Field]:
    required = set(node.get("required", []))
    out = []
    for name, sub in node["properties"].items():
        if name in skip:
            continue
        typ, nullable = arrow_type(sub, defs)
        out.append(pa.field(name, typ, nullable=nullable or name not in required))
    return out


def step_schema(schema_id: str) -> pa.Schema:
    """Columns of `data/`: one row per step."""
    schema = load_schema(schema_id)
    defs = schema["$defs"]
    step_props = object_fields(defs["step"], defs)
    by_name = {f.name: f for f in step_props}
    fields = [pa.field("episode_id", pa.string(), nullable=False), by_name.pop("step")]
    fields.append(pa.field("instruction", pa.string(), nullable=False))
    fields += list(by_name.values())
    fields += [
        pa.field("action", pa.list_(pa.float32(), 7), nullable=False),
        pa.field("state", pa.list_(pa.float32(), 7), nullable=False),
    ]
    return pa.schema(fields, metadata={"refinevla.schema_id": schema_id})


PROVENANCE = [
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("request_key", pa.string(), nullable=False),
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("attempts", pa.int64(), nullable=False),
]


def episode_schema(schema_id: str) -> pa.Schema:
    """Columns of `episodes/`: the episode-level rationale plus provenance."""
    schema = load_schema(schema_id)
    fields = object_fields(schema, schema["$defs"], skip=("steps",))
    return pa.schema(fields + PROVENANCE, metadata={"refinevla.schema_id": schema_id})


class _PartWriter:
    """Columns buffered and written as row groups to a hidden file, renamed on close.

    Buffered column-wise (numeric columns as numpy blocks): building Arrow arrays from
    row dicts costs more CPU per episode than everything else the engine does. Row groups
    are converted and written on a background thread: the engine calls `add` from its event
    loop, and a ~30 ms Parquet write there would hold up every request in flight.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.tmp = path.with_name("." + path.name + ".partial")
        self.schema = schema
        self.columns: dict[str, list[Any]] = {f.name: [] for f in schema}
        self.pending = 0
        self.count = 0
        self._writer: pq.ParquetWriter | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._write: Future[None] | None = None  # the row group being written, at most one

    def add(self, rows: list[dict[str, Any]]) -> None:
        for name, values in self.columns.items():
            values.extend(row[name] for row in rows)
        self._added(len(rows))

    def add_columns(self, columns: dict[str, Any], n: int) -> None:
        """Append n rows given column-wise: a list of n values, or an (n, k) numpy block."""
        for name, values in self.columns.items():
            values.append(columns[name]) if isinstance(columns[name], np.ndarray) else values.extend(columns[name])
        self._added(n)

    def _added(self, n: int) -> None:
        self.pending += n
        if self.pending >= ROWS_PER_FLUSH:
            self.flush()

    def _array(self, field: pa.Field, values: list[Any]) -> pa.Array:
        if values and isinstance(values[0], np.ndarray):
            block = np.concatenate(values).astype(np.float32)
            return pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), block.shape[1])
        return pa.array(values, type=field.type)

    def _write_group(self, columns: dict[str, list[Any]]) -> None:
        if self._writer is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, self.schema)
        arrays = [self._array(f, columns[f.name]) for f in self.schema]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def _wait(self) -> None:
        """Wait for the row group being written; its error (a full disk) is raised here."""
        if self._write is not None:
            write, self._write = self._write, None
            write.result()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (waiting for the previous group first)."""
        if not self.pending:
            return
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refinevla-parquet")
        self._write = self._pool.submit(self._write_group, self.columns)
        self.count += self.pending
        self.pending = 0
        self.columns = {f.name: [] for f in self.schema}

    def close(self) -> None:
        """Write what is buffered and put the file in place; on any failure (a full disk) the
        hidden file is removed and the file from an earlier run, if any, stays as it was."""
        try:
            try:
                self.flush()
                self._wait()
            finally:
                self._stop_pool()
            if self._writer is None:  # no rows: still write a valid empty file, so the layout is complete
                self.tmp.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(self.schema.empty_table(), self.tmp)
            else:
                writer, self._writer = self._writer, None
                writer.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop this run's rows: nothing half-written is left, nothing finished is replaced."""
        with contextlib.suppress(Exception):
            self._wait()
        self._stop_pool()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                writer.close()
        self.tmp.unlink(missing_ok=True)

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class DatasetWriter:
    """Collects finished episodes into `OUT/data/` and `OUT/episodes/`."""

    def __init__(
        self, out: str | Path, schema_id: str, teacher: str, model: str, shard: tuple[int, int] = (0, 1)
    ) -> None:
        self.out = Path(out)
        self.schema_id = schema_id
        self.teacher = teacher
        self.model = model
        name = part_name(*shard)
        # pyarrow imports pandas on its first conversion of Python values (~0.2 s): pay that
        # now rather than in the middle of a run, where it would stall every request in flight
        pa.array([""], type=pa.string())
        self.steps = _PartWriter(self.out / STEPS_DIR / name, step_schema(schema_id))
        self.episodes = _PartWriter(self.out / EPISODES_DIR / name, episode_schema(schema_id))
        self.statuses: Counter[str] = Counter()
        self.reject_reasons: Counter[str] = Counter()
        self.failure_reasons: Counter[str] = Counter()  # whole reasons: they name the URL, the status...

    def add(self, result: AnnotationOutcome) -> None:
        self.statuses[result.status] += 1
        if result.status == "rejected" and result.reason:
            self.reject_reasons[result.reason.split(":", 1)[0]] += 1
        if result.status == "failed" and result.reason:
            self.failure_reasons[result.reason] += 1
        if result.record is None:
            return
        rec = result.record
        steps = rec["steps"]
        n = len(steps)
        columns: dict[str, Any] = {
            "episode_id": [result.episode_id] * n,
            "instruction": [result.instruction] * n,
            "action": np.asarray(result.actions, np.float32),
            "state": np.asarray(result.states, np.float32),
        }
        for name in steps[0]:
            columns[name] = [s[name] for s in steps]
        self.steps.add_columns(columns, n)
        self.episodes.add(
            [
                {
                    **{k: v for k, v in rec.items() if k != "steps"},
                    "dataset": result.dataset,
                    "request_key": result.key,
                    "teacher": self.teacher,
                    "model": self.model,
                    "attempts": result.attempts,
                }
            ]
        )

    def close(self) -> dict[str, int]:
        try:
            self.steps.close()
            self.episodes.close()
        except BaseException:
            self.abort()
            raise
        return {"episodes": self.episodes.count, "steps": self.steps.count}

    def abort(self) -> None:
        """The run failed: leave the dataset's files as they were before it (see `_PartWriter.abort`)."""
        self.steps.abort()
        self.episodes.abort()


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("refinevla")
    except PackageNotFoundError:
        return "unknown"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
