"""The Parquet writer: row groups written on a background thread, in order, errors not lost."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from refinevla.annotate import writer as writer_module
from refinevla.annotate.records import AnnotationOutcome
from refinevla.annotate.writer import DatasetWriter


def _result(i: int, steps: int) -> AnnotationOutcome:
    record = {
        "schema_id": "refinevla.rationale/1",
        "episode_id": f"ep{i}",
        "instruction": f"task {i}",
        "num_steps": steps,
        "observation": "o",
        "situation_analysis": "s",
        "spatial_reasoning": "r",
        "task_plan": [{"subtask": "a", "reason": "b", "start_step": 0, "end_step": steps - 1}],
        "objects": None,
        "move_reasons": [{"segment": 0, "reason": "m"}],
        "steps": [
            {"step": t, "subtask": "a", "subtask_reason": "b", "move": "stop", "move_reason": "m", "gripper": "open"}
            for t in range(steps)
        ],
    }
    actions = np.full((steps, 7), i, np.float32)
    return AnnotationOutcome(f"ep{i}", "ds", f"task {i}", actions, actions + 0.5, f"k{i}", "annotated", record, None, 1)


def test_many_row_groups_come_out_complete_and_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "ROWS_PER_FLUSH", 25)
    w = DatasetWriter(tmp_path, "refinevla.rationale/1", "rule-based", "rule-based/2")
    for i in range(40):
        w.add(_result(i, 7 + i % 5))
    counts = w.close()
    expected = sum(7 + i % 5 for i in range(40))
    assert counts == {"episodes": 40, "steps": expected}
    files = list((tmp_path / "data").glob("*.parquet"))
    assert len(files) == 1 and not list((tmp_path / "data").glob(".*partial"))
    parquet = pq.ParquetFile(files[0])
    assert parquet.metadata.num_row_groups > 5
    table = parquet.read()
    ids = table.column("episode_id").to_pylist()
    assert ids == [f"ep{i}" for i in range(40) for _ in range(7 + i % 5)]
    actions = np.array(table.column("action").to_pylist())
    assert np.array_equal(actions[:, 0], [float(i) for i in range(40) for _ in range(7 + i % 5)])


def test_a_failed_background_write_is_raised_by_close(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "ROWS_PER_FLUSH", 10)

    def full_disk(self, columns):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module._PartWriter, "_write_group", full_disk)
    w = DatasetWriter(tmp_path, "refinevla.rationale/1", "rule-based", "rule-based/2")
    with pytest.raises(OSError, match="No space left"):
        for i in range(5):
            w.add(_result(i, 12))
        w.close()
    assert not list((tmp_path / "data").glob("*.parquet"))
