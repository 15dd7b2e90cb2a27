"""The training table: built once, joined to the source frames, reused; bad datasets refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner

from refinevla.annotate.cli import app as data_app
from refinevla.annotate.sources import open_source
from refinevla.annotate.stats import transform_episode
from refinevla.train.actions import dataset_statistics
from refinevla.train.data import epoch_order, split_episodes
from refinevla.train.errors import TrainError
from refinevla.train.table import build_table, open_published

from .conftest import EPISODES, STEPS


def test_table_joins_frames_rationales_and_transformed_actions(published, rlds_uri, cache_dir):
    table = build_table(open_published(str(published)), cache_dir=cache_dir)
    assert table.meta["transform"] == "bridge_orig" and table.meta["camera"] == "image_0"
    assert len(table) == sum(n - 2 for n in STEPS)  # bridge_orig drops the first and the last step
    src = {ep.episode_id: ep for ep in open_source(rlds_uri).iter_episodes()}
    row = table.row(3)
    ep = src[row["episode_id"]]
    assert row["step"] == 4  # row 3 of episode 0 is source step 4 (step 0 dropped)
    assert row["frame"] == ep.frames["image_0"].encoded(4)  # stored bytes, no re-encode
    expect, _ = transform_episode(ep, "bridge_orig")
    assert np.allclose(row["action"], expect[3])
    assert row["prompt"] == f"What action should the robot take to {ep.instruction}?"
    assert row["target"].endswith("\nACTION:") and "SUBTASK:" in row["target"]
    # a second open reuses the table (same folder, not rebuilt)
    mtime = (table.path / "steps.arrow").stat().st_mtime_ns
    again = build_table(open_published(str(published)), cache_dir=cache_dir)
    assert again.path == table.path and (again.path / "steps.arrow").stat().st_mtime_ns == mtime
    # a different camera or transform is a different table
    other = build_table(open_published(str(published)), transform="none", cache_dir=cache_dir)
    assert other.path != table.path and len(other) == sum(STEPS)


def test_statistics_equal_refine_data_stats(published, rlds_uri, cache_dir, tmp_path):
    table = build_table(open_published(str(published)), cache_dir=cache_dir)
    ours = dataset_statistics(table.episodes(), "bridge_orig", "bridge_orig")
    out = tmp_path / "stats.json"
    r = CliRunner().invoke(data_app, ["stats", rlds_uri, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(json.dumps(ours)) == json.loads(out.read_text())


def test_split_is_by_episode_and_ranks_get_disjoint_samples():
    ids = [f"ep{i}" for i in range(10)]
    train, val = split_episodes(ids, 0.2, seed=1)
    assert len(val) == 2 and not train & val and train | val == set(ids)
    assert split_episodes(ids, 0.2, seed=1) == (train, val)
    a, b = epoch_order(range(11), 0, 0, 0, 2), epoch_order(range(11), 0, 0, 1, 2)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert not np.array_equal(epoch_order(range(11), 0, 1), epoch_order(range(11), 0, 0))


def _copy(published, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(published, out)
    return out


def test_unknown_schema_id_is_one_line(published, tmp_path, cache_dir):
    out = _copy(published, tmp_path)
    manifest = json.loads((out / "refinevla.json").read_text())
    manifest["schema"]["id"] = "someone.else/3"
    (out / "refinevla.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match=r"schema id 'someone.else/3' is not one refine-train knows"):
        build_table(open_published(str(out)), cache_dir=cache_dir)


def test_step_rows_whose_source_episode_is_missing_are_one_line(published, tmp_path, cache_dir):
    out = _copy(published, tmp_path)
    for sub in ("data", "episodes"):
        f = next((out / sub).glob("*.parquet"))
        t = pq.read_table(f)
        first = t.slice(0, 1 if sub == "episodes" else STEPS[0])
        ids = pa.array(["bridge_orig:/nowhere#7"] * first.num_rows)
        first = first.set_column(first.column_names.index("episode_id"), t.schema.field("episode_id"), ids)
        pq.write_table(pa.concat_tables([t, first]), f)
    with pytest.raises(TrainError) as exc:
        build_table(open_published(str(out)), cache_dir=cache_dir)
    assert "'bridge_orig:/nowhere#7' have no episode in source" in str(exc.value) and "\n" not in str(exc.value)
    assert not list(cache_dir.glob(".*partial"))  # nothing half-built is left


def test_an_empty_dataset_is_one_line(published, tmp_path, cache_dir):
    out = _copy(published, tmp_path)
    f = next((out / "data").glob("*.parquet"))
    pq.write_table(pq.read_table(f).slice(0, 0), f)
    with pytest.raises(TrainError, match="no step rows"):
        build_table(open_published(str(out)), cache_dir=cache_dir)
    with pytest.raises(TrainError, match=r"refinevla\.json: missing"):
        open_published(str(tmp_path))


def test_all_episodes_are_in_the_table(published, cache_dir):
    table = build_table(open_published(str(published)), cache_dir=cache_dir)
    assert table.meta["episodes"] == EPISODES and len({*table.column("episode_id")}) == EPISODES
