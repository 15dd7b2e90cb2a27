"""The table build reads published step rows a row group at a time, never the whole dataset."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinevla.train.errors import TrainError
from refinevla.train.table import StepRows


def _write(path, episodes, row_group_size):
    rows = [{"episode_id": e, "step": s, "move": f"{e}-{s}"} for e, n in episodes for s in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def test_an_episode_split_over_row_groups_and_files_comes_back_whole(tmp_path):
    _write(tmp_path / "a.parquet", [("e0", 3), ("e1", 4)], row_group_size=2)  # e1 spans groups 1..3
    _write(tmp_path / "b.parquet", [("e2", 2), ("e1", 1)], row_group_size=2)  # and one more row here
    rows = StepRows([tmp_path / "a.parquet", tmp_path / "b.parquet"], ["move"])
    assert rows.num_rows == 10 and set(rows.episode_ids()) == {"e0", "e1", "e2"}
    e1 = rows.rows("e1")
    assert sorted(e1) == [0, 1, 2, 3] and e1[3]["move"] == "e1-3"
    assert rows.rows("e2")[1]["move"] == "e2-1" and "e9" not in rows and rows.rows("e9") == {}


def test_only_a_few_row_groups_are_held_whatever_the_dataset_size(tmp_path):
    _write(tmp_path / "a.parquet", [(f"e{i}", 5) for i in range(100)], row_group_size=5)
    rows = StepRows([tmp_path / "a.parquet"], ["move"])
    for i in range(100):
        assert len(rows.rows(f"e{i}")) == 5
        assert len(rows._cache) <= StepRows.CACHED_GROUPS


def test_a_missing_column_is_one_line_naming_the_file(tmp_path):
    _write(tmp_path / "a.parquet", [("e0", 2)], row_group_size=2)
    with pytest.raises(TrainError, match=r"a\.parquet: step rows have no column 'subtask'"):
        StepRows([tmp_path / "a.parquet"], ["subtask"])
