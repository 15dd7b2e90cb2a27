"""`refine-data export --to lerobot`: a LeRobot v3.0 dataset with the rationale as language columns,
read back through the project's own LeRobot source."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.annotate.sources import ReadOptions, open_source

# LeRobot's language columns, written out here independently of the exporter: huggingface/lerobot
# `src/lerobot/datasets/language.py` (`language_persistent_arrow_type`, `language_events_arrow_type`,
# the `*_column_feature` and `language_feature_info` functions). `tool_calls` items are JSON; on disk
# its storage type, `string`.
PERSISTENT_ROW = [
    pa.field("role", pa.string(), nullable=False),
    pa.field("content", pa.string()),
    pa.field("style", pa.string()),
    pa.field("timestamp", pa.float32(), nullable=False),
    pa.field("camera", pa.string()),
    pa.field("tool_calls", pa.list_(pa.string())),
]
EVENT_ROW = [f for f in PERSISTENT_ROW if f.name != "timestamp"]


def lerobot_hf_features() -> datasets.Features:
    """What LeRobot's `get_hf_features_from_features` gives for the two language columns."""
    text = datasets.Value("string")
    row = {"role": text, "content": text, "style": text, "timestamp": datasets.Value("float32"), "camera": text}
    row["tool_calls"] = datasets.List(datasets.Json())
    event = {k: v for k, v in row.items() if k != "timestamp"}
    return datasets.Features({"language_persistent": datasets.List(row), "language_events": datasets.List(event)})


@pytest.fixture(scope="module")
def exported(annotated_out, source_uri, tmp_path_factory):  # type: ignore[no-untyped-def]
    dest = tmp_path_factory.mktemp("lerobot") / "ds"
    r = CliRunner().invoke(
        app, ["export", str(annotated_out), "--to", "lerobot", "--source", source_uri, "--out", str(dest)]
    )
    assert r.exit_code == 0, r.output
    assert "3 episodes, 33 frames" in r.output
    return dest


def test_export_follows_the_v30_layout(exported):
    info = json.loads((exported / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 5.0
    assert info["total_episodes"] == 3 and info["total_frames"] == 33
    # LeRobot's `language_feature_info()`, nothing more (an extra key breaks `features_equal_for_merge`).
    for column in ("language_persistent", "language_events"):
        assert info["features"][column] == {"dtype": "language", "shape": [1], "names": None}
    assert (exported / "data" / "chunk-000" / "file-000.parquet").is_file()
    assert (exported / "meta" / "episodes" / "chunk-000" / "file-000.parquet").is_file()
    assert (exported / "meta" / "tasks.parquet").is_file() and (exported / "meta" / "stats.json").is_file()
    assert (exported / "videos" / "observation.images.image_0" / "chunk-000" / "file-000.mp4").is_file()


def test_rationale_is_in_language_persistent_with_plan_subtask_motion_and_reasoning(exported, annotated_out):
    table = pq.read_table(exported / "data" / "chunk-000" / "file-000.parquet")
    rows = table.to_pylist()
    first = [r for r in rows if r["episode_index"] == 0]
    assert len(first) == 10
    assert all(r["language_persistent"] == first[0]["language_persistent"] for r in first)  # broadcast
    entries = first[0]["language_persistent"]
    styles = [e["style"] for e in entries]
    assert {"plan", "subtask", "motion", "reasoning"} == set(styles)
    assert all(e["role"] == "assistant" and e["camera"] is None and e["tool_calls"] is None for e in entries)
    # LeRobot's writer order for a persistent slice: (timestamp, style, role).
    keys = [(e["timestamp"], e["style"], e["role"]) for e in entries]
    assert keys == sorted(keys) and [e["style"] for e in entries if e["timestamp"] == 0.0][:2] == ["motion", "plan"]
    assert all(r["language_events"] == [] for r in rows)  # a rationale has no events
    episodes = pq.read_table(annotated_out / "episodes").to_pylist()
    ep0 = next(e for e in episodes if e["episode_id"].endswith("#0"))
    subtasks = [(e["content"], e["timestamp"]) for e in entries if e["style"] == "subtask"]
    assert subtasks == [(s["subtask"], pytest.approx(s["start_step"] / 5.0)) for s in ep0["task_plan"]]
    assert any(e["content"] == f"observation: {ep0['observation']}" for e in entries)
    motions = [e for e in entries if e["style"] == "motion"]
    assert motions[0]["timestamp"] == 0.0 and motions[0]["content"].startswith("move")


def test_export_reads_back_through_the_lerobot_source(exported, source_uri):
    back = list(open_source(f"lerobot:{exported}").iter_episodes(ReadOptions()))
    orig = list(open_source(source_uri).iter_episodes(ReadOptions()))
    assert [len(e) for e in back] == [10, 11, 12]
    for a, b in zip(back, orig, strict=True):
        assert a.instruction == b.instruction
        np.testing.assert_allclose(a.states, b.states, atol=1e-6)
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-6)
        assert a.frames[next(iter(a.frames))][0].shape == (32, 32, 3)


def test_export_from_the_wrong_source_is_refused(annotated_out, tmp_path):
    r = CliRunner().invoke(
        app, ["export", str(annotated_out), "--to", "lerobot", "--source", "sample", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 1 and "not in sample" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_language_columns_have_lerobots_arrow_schema_and_load_with_its_features(exported, tmp_path):
    path = exported / "data" / "chunk-000" / "file-000.parquet"
    schema = pq.read_schema(path)
    assert schema.field("language_persistent").type == pa.list_(pa.struct(PERSISTENT_ROW))
    assert schema.field("language_events").type == pa.list_(pa.struct(EVENT_ROW))
    # The stored `tool_calls` strings are the storage of Arrow's JSON type: the exact type is a cast away.
    table = pq.read_table(path, columns=["language_persistent"])
    as_json = [f.with_type(pa.list_(pa.json_())) if f.name == "tool_calls" else f for f in PERSISTENT_ROW]
    exact = pa.list_(pa.struct(as_json))
    assert table["language_persistent"].cast(exact).type == exact
    # LeRobotDataset loads its parquet through `datasets` with these features: the columns must cast to them.
    ds = datasets.Dataset.from_parquet(
        str(path),
        features=lerobot_hf_features(),
        columns=["language_persistent", "language_events"],
        cache_dir=str(tmp_path / "hf_datasets"),
    )
    assert ds.num_rows == 33
    assert ds[0]["language_persistent"][0]["role"] == "assistant" and ds[0]["language_events"] == []


def test_export_carries_the_camera_annotate_read(tmp_path):
    """annotate --camera image_1: the export's frames are that camera's (what the rationales describe)."""
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate
    from refinevla.annotate.sources.lerobot_writer import write_lerobot
    from tests.sources.conftest import LEROBOT_FPS, lerobot_episode, lerobot_frame

    src = write_lerobot(
        tmp_path / "toy", [lerobot_episode(i, 6) for i in range(2)], fps=LEROBOT_FPS, camera_storage="image"
    )
    out = tmp_path / "out"
    args = AnnotateArgs(source=f"lerobot:{src}", out=out, progress="none", license="mit", camera=["image_1"])
    assert run_annotate(args) == 0
    dest = tmp_path / "exported"
    cmd = ["export", str(out), "--to", "lerobot", "--source", f"lerobot:{src}", "--out", str(dest)]
    r = CliRunner().invoke(app, [*cmd, "--camera-storage", "image"])
    assert r.exit_code == 0, r.output
    (first, _) = list(open_source(f"lerobot:{dest}").iter_episodes(ReadOptions()))
    assert first.cameras == ["image_1"]
    assert json.loads((dest / "meta" / "info.json").read_text())["fps"] == LEROBOT_FPS  # the source's own rate
    np.testing.assert_array_equal(np.asarray(first.frames["image_1"][2]), lerobot_frame(0 * 10 + 1, 2))
