"""`refine-data import-ecot`: Embodied-CoT's published Bridge reasoning as `refinevla.rationale/1` rows.

The input, `embodied_features_bridge.json` (~1.4 GB), is
`{file_path: {episode_id: {"reasoning": {step: {task, plan, subtask, subtask_reason, move, move_reason}},
"features": {state_3d, move_primitive, gripper_position, bboxes}, "metadata": {episode_id, file_path,
n_steps, language_instruction, caption}}}}`. It is streamed with `ijson` one `file_path` entry at a time
(never `json.load`ed whole), and rows are written a row group at a time.

Mapping (nothing is guessed; what ECoT does not have is reported):
* per-step subtasks -> `task_plan` segments with step ranges (consecutive equal subtasks), the segment's
  reason from the first step's `subtask_reason`; per step `subtask`, `subtask_reason`, `move`, `move_reason`;
* moves -> `move_reasons` per motion segment (consecutive equal moves);
* `caption` -> `observation`; ECoT has no situation analysis or spatial reasoning: those fields hold
  `NOT_PROVIDED` and the import report and the card say so;
* gripper open/closed is not in the file: it is read off ECoT's own move primitives (open until a
  "close gripper" primitive, closed until an "open gripper" one) and reported as derived;
* `gripper_position`, `bboxes`, `state_3d` are kept per step in `ecot_*` columns, step-0 boxes as `objects`;
* actions and states are not in the file: `action`/`state` are null (join with the source on `episode_id`).

An entry that cannot be converted (missing steps, wrong types, a record the schema rejects) is skipped and
reported with its key `file_path#episode_id`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ...schemas import DEFAULT_SCHEMA_ID, schema_digest, validate
from ...schemas.dataset_layout import EPISODES_DIR, PRIVATE_DIR, STEPS_DIR, part_name, write_manifest
from ..writer import episode_schema, step_schema, tool_version, utc_now

NOT_PROVIDED = "Not provided by Embodied-CoT."
TEACHER = "embodied-cot"
KNOWN_TOP = {"reasoning", "features", "metadata"}
KNOWN_REASONING = {"task", "plan", "subtask", "subtask_reason", "move", "move_reason"}
KNOWN_FEATURES = {"state_3d", "move_primitive", "gripper_position", "bboxes"}
KNOWN_METADATA = {"episode_id", "file_path", "n_steps", "language_instruction", "caption"}
ROWS_PER_GROUP = 20_000
_BOX = pa.struct([pa.field("name", pa.string()), pa.field("box", pa.list_(pa.float32()))])
ECOT_COLUMNS = [
    pa.field("ecot_gripper_position", pa.list_(pa.float32())),
    pa.field("ecot_objects", pa.list_(_BOX)),
    pa.field("ecot_state_3d", pa.list_(pa.float32())),
]


class EntryError(ValueError):
    """One ECoT entry cannot be converted; the message says why."""


@dataclass
class ImportReport:
    episodes: int = 0
    steps: int = 0
    malformed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    unknown_fields: Counter[str] = field(default_factory=Counter)  # dotted name -> entries holding it
    not_in_ecot: dict[str, str] = field(
        default_factory=lambda: {
            "situation_analysis": f"not in the file; set to {NOT_PROVIDED!r}",
            "spatial_reasoning": f"not in the file; set to {NOT_PROVIDED!r}",
            "gripper": "open/closed not in the file; derived from ECoT's move primitives",
            "action, state": "not in the file; null (join with the source dataset on episode_id)",
        }
    )


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EntryError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _floats(value: Any, where: str, length: int | None = None) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
        raise EntryError(f"{where}: expected a list of numbers, got {value!r}")
    if length is not None and len(value) != length:
        raise EntryError(f"{where}: expected {length} numbers, got {len(value)}")
    return [float(v) for v in value]


def _boxes(value: Any, where: str) -> list[dict[str, Any]]:
    """ECoT boxes of one step: entries `[name, box]`, `[score, name, box]` or `{name/label, box/bbox}`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise EntryError(f"{where}: expected a list of boxes, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            name, box = item.get("name", item.get("label")), item.get("box", item.get("bbox"))
        elif isinstance(item, list | tuple) and len(item) in (2, 3):
            name, box = item[-2], item[-1]
        else:
            raise EntryError(f"{where}[{i}]: unrecognised box entry {item!r}")
        out.append({"name": _text(name, f"{where}[{i}] name"), "box": _floats(box, f"{where}[{i}] box", 4)})
    return out


def _segments(values: list[str]) -> list[tuple[int, int, str]]:
    """(start, end inclusive, value) runs of equal consecutive values."""
    runs: list[tuple[int, int, str]] = []
    for t, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], t, v)
        else:
            runs.append((t, t, v))
    return runs


def gripper_from_moves(moves: list[str]) -> list[str]:
    """Open/closed per step from ECoT primitives: starts open, flips at 'close gripper' / 'open gripper'."""
    state, out = "open", []
    for move in moves:
        if "close gripper" in move:
            state = "closed"
        elif "open gripper" in move:
            state = "open"
        out.append(state)
    return out


def convert_entry(
    file_path: str, key: str, entry: Any, dataset: str, unknown: Counter[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(rationale record, per-step ecot columns) of one ECoT episode entry. Raises `EntryError`."""
    if not isinstance(entry, dict):
        raise EntryError(f"expected an object, got {type(entry).__name__}")
    for name in set(entry) - KNOWN_TOP:
        unknown[name] += 1
    reasoning = entry.get("reasoning")
    if not isinstance(reasoning, dict) or not reasoning:
        raise EntryError("no 'reasoning'")
    metadata = entry.get("metadata") or {}
    features = entry.get("features") or {}
    if not isinstance(metadata, dict) or not isinstance(features, dict):
        raise EntryError("'metadata' and 'features' must be objects")
    for name in set(metadata) - KNOWN_METADATA:
        unknown[f"metadata.{name}"] += 1
    for name in set(features) - KNOWN_FEATURES:
        unknown[f"features.{name}"] += 1
    try:
        by_step = {int(k): v for k, v in reasoning.items()}
    except ValueError:
        raise EntryError(f"reasoning keys must be step numbers, got {sorted(reasoning)[:3]}") from None
    n = metadata.get("n_steps", len(by_step))
    if not isinstance(n, int) or n < 1:
        raise EntryError(f"metadata.n_steps: expected a positive integer, got {n!r}")
    missing = [t for t in range(n) if t not in by_step]
    if missing:
        raise EntryError(f"reasoning missing for {len(missing)} of {n} steps (first: {missing[:5]})")
    if set(by_step) - set(range(n)):
        raise EntryError(f"reasoning for steps beyond n_steps={n}: {sorted(set(by_step) - set(range(n)))[:5]}")

    def per_step(name: str) -> list[Any]:
        values = features.get(name)
        if values is None:
            return [None] * n
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise EntryError(f"features.{name}: expected {n} entries, got {got}")
        return values

    prims = per_step("move_primitive")
    steps: list[dict[str, Any]] = []
    for t in range(n):
        r = by_step[t]
        if not isinstance(r, dict):
            raise EntryError(f"reasoning[{t}]: expected an object")
        for name in set(r) - KNOWN_REASONING:
            unknown[f"reasoning.{name}"] += 1
        move = r.get("move") or prims[t]
        steps.append(
            {
                "step": t,
                "subtask": _text(r.get("subtask"), f"reasoning[{t}].subtask"),
                "subtask_reason": _text(r.get("subtask_reason"), f"reasoning[{t}].subtask_reason"),
                "move": _text(move, f"reasoning[{t}].move"),
                "move_reason": _text(r.get("move_reason"), f"reasoning[{t}].move_reason"),
            }
        )
    for s, g in zip(steps, gripper_from_moves([s["move"] for s in steps]), strict=True):
        s["gripper"] = g
    boxes = [_boxes(b, f"features.bboxes[{t}]") for t, b in enumerate(per_step("bboxes"))]
    extras = [
        {
            "ecot_gripper_position": _floats(gp, f"features.gripper_position[{t}]"),
            "ecot_objects": boxes[t] if features.get("bboxes") is not None else None,
            "ecot_state_3d": _floats(s3, f"features.state_3d[{t}]"),
        }
        for t, (gp, s3) in enumerate(zip(per_step("gripper_position"), per_step("state_3d"), strict=True))
    ]
    instruction = metadata.get("language_instruction") or by_step[0].get("task")
    ep_id = metadata.get("episode_id", key)
    caption = metadata.get("caption")
    record = {
        "schema_id": DEFAULT_SCHEMA_ID,
        "episode_id": f"{dataset}:{metadata.get('file_path', file_path)}#{ep_id}",
        "instruction": _text(instruction, "metadata.language_instruction"),
        "num_steps": n,
        "observation": caption.strip() if isinstance(caption, str) and caption.strip() else NOT_PROVIDED,
        "situation_analysis": NOT_PROVIDED,
        "spatial_reasoning": NOT_PROVIDED,
        "task_plan": [
            {"subtask": sub, "reason": steps[a]["subtask_reason"], "start_step": a, "end_step": b}
            for a, b, sub in _segments([s["subtask"] for s in steps])
        ],
        "objects": boxes[0] if features.get("bboxes") is not None else None,
        "move_reasons": [
            {"segment": i, "reason": steps[a]["move_reason"]}
            for i, (a, _, _) in enumerate(_segments([s["move"] for s in steps]))
        ],
        "steps": steps,
    }
    errors = validate(record)
    if errors:
        raise EntryError("; ".join(errors[:3]))
    return record, extras


class _Parts:
    """The two Parquet outputs, written a row group at a time to hidden files renamed on close."""

    def __init__(self, out: Path, schema_id: str) -> None:
        base = step_schema(schema_id)
        fields = [
            pa.field(f.name, f.type, nullable=True) if f.name in ("action", "state") else f for f in base
        ] + ECOT_COLUMNS
        self.step_schema = pa.schema(fields, metadata=base.metadata)
        self.episode_schema = episode_schema(schema_id)
        name = part_name(0, 1)
        self.paths: dict[str, Path] = {"steps": out / STEPS_DIR / name, "episodes": out / EPISODES_DIR / name}
        self.rows: dict[str, list[dict[str, Any]]] = {"steps": [], "episodes": []}
        self.writers: dict[str, pq.ParquetWriter] = {}

    def _tmp(self, kind: str) -> Path:
        p = self.paths[kind]
        return p.with_name("." + p.name + ".partial")

    def add(self, kind: str, rows: list[dict[str, Any]]) -> None:
        self.rows[kind].extend(rows)
        if len(self.rows[kind]) >= ROWS_PER_GROUP:
            self._flush(kind)

    def _flush(self, kind: str) -> None:
        schema = self.step_schema if kind == "steps" else self.episode_schema
        if kind not in self.writers:
            self._tmp(kind).parent.mkdir(parents=True, exist_ok=True)
            self.writers[kind] = pq.ParquetWriter(self._tmp(kind), schema)
        self.writers[kind].write_table(pa.Table.from_pylist(self.rows[kind], schema=schema))
        self.rows[kind] = []

    def close(self) -> None:
        for kind in ("steps", "episodes"):
            self._flush(kind)
            self.writers[kind].close()
            os.replace(self._tmp(kind), self.paths[kind])


def iter_entries(path: Path) -> Any:
    """(file_path, episode key, entry) streamed from the file, one top-level entry in memory at a time."""
    import ijson

    with open(path, "rb") as fh:
        for file_path, episodes in ijson.kvitems(fh, "", use_float=True):
            if not isinstance(episodes, dict):
                yield file_path, "?", episodes
                continue
            for key, entry in episodes.items():
                yield file_path, key, entry


def import_ecot(
    path: str | Path, out: str | Path, *, dataset: str = "bridge_orig", limit: int | None = None
) -> ImportReport:
    """Convert an ECoT reasoning file into `out/` (data, episodes, manifest; the card is written by the caller)."""
    path, out = Path(path), Path(out)
    report = ImportReport()
    parts = _Parts(out, DEFAULT_SCHEMA_ID)
    reasons: Counter[str] = Counter()
    try:
        for file_path, key, entry in iter_entries(path):
            if limit is not None and report.episodes >= limit:
                break
            where = f"{file_path}#{key}"
            try:
                record, extras = convert_entry(file_path, key, entry, dataset, report.unknown_fields)
            except EntryError as exc:
                report.malformed.append((where, str(exc)))
                reasons[str(exc).split(":", 1)[0]] += 1
                continue
            digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()
            parts.add(
                "steps",
                [
                    {
                        "episode_id": record["episode_id"],
                        "instruction": record["instruction"],
                        **s,
                        "action": None,
                        "state": None,
                        **x,
                    }
                    for s, x in zip(record["steps"], extras, strict=True)
                ],
            )
            parts.add(
                "episodes",
                [
                    {
                        **{k: v for k, v in record.items() if k != "steps"},
                        "dataset": dataset,
                        "request_key": digest,
                        "teacher": TEACHER,
                        "model": "not recorded in the file",
                        "attempts": 0,
                    }
                ],
            )
            report.episodes += 1
            report.steps += record["num_steps"]
    except Exception as exc:
        if type(exc).__module__.startswith("ijson"):
            from ..errors import RefineError

            raise RefineError(f"{path}: not valid JSON after {report.episodes} episodes: {exc}") from None
        raise
    parts.close()
    refine = out / PRIVATE_DIR
    refine.mkdir(parents=True, exist_ok=True)
    with (refine / "import-rejects.jsonl").open("w", encoding="utf-8") as fh:
        for key, reason in report.malformed:
            fh.write(json.dumps({"key": key, "reason": reason}) + "\n")
    write_manifest(
        out,
        {
            "refinevla_version": tool_version(),
            "created": utc_now(),
            "source": {"uri": str(path), "dataset": dataset, "split": "train"},
            "teacher": {
                "name": TEACHER,
                "model": "not recorded in the file",
                "sampling": None,
                "written_by_model": True,
                "note": "reasoning written by the Embodied-CoT pipeline (arXiv 2407.08693) and imported by refinevla; "
                "situation analysis and spatial reasoning are not in it",
            },
            "prompt": None,
            "schema": {"id": DEFAULT_SCHEMA_ID, "sha256": schema_digest(DEFAULT_SCHEMA_ID)},
            "counts": {
                "episodes": report.episodes,
                "steps": report.steps,
                "rejected": len(report.malformed),
                "reject_reasons": dict(reasons),
            },
            "tokens": {"prompt": 0, "completion": 0, "requests": 0},
            "cost_usd": None,
            "import": {
                "format": "embodied_features_bridge.json",
                "malformed": len(report.malformed),
                "unknown_fields": dict(report.unknown_fields),
                "not_in_ecot": report.not_in_ecot,
            },
            "complete": True,
        },
    )
    return report
