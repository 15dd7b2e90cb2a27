"""`refine-data merge`: the shards of a multi-machine run become one dataset."""

from __future__ import annotations

import json

import datasets
import polars as pl
from typer.testing import CliRunner

from refinevla.annotate.cli import app


def cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def test_shards_from_two_machines_merge_into_one_valid_dataset(tiny_rlds, tmp_path):
    uri = tiny_rlds(5)
    machines = [tmp_path / "m0", tmp_path / "m1"]
    for i, out in enumerate(machines):
        r = cli("annotate", uri, "--out", str(out), "--shard", f"{i}/2", "--progress", "none")
        assert r.exit_code == 0, r.output
        assert "refine-data merge" in r.output
        assert not (out / "refinevla.json").exists()  # a shard alone is not the dataset

    missing = cli("merge", str(machines[0]))
    assert missing.exit_code == 1 and "shard(s) 1/2 missing" in missing.output

    r = cli("merge", str(machines[0]), "--from", str(machines[1]))
    assert r.exit_code == 0, r.output
    manifest = json.loads((machines[0] / "refinevla.json").read_text())
    assert manifest["counts"]["episodes"] == 5 and manifest["selection"]["shard"] == "all 2"
    assert manifest["counts"]["steps"] == pl.read_parquet(machines[0] / "data").height
    assert [s["shard"] for s in manifest["shards"]] == ["0/2", "1/2"] and manifest["complete"] is True
    assert (machines[0] / "README.md").is_file()
    steps = datasets.load_dataset(str(machines[0]), "steps", split="train")
    assert steps.num_rows == manifest["counts"]["steps"]
    v = cli("validate", str(machines[0]))
    assert v.exit_code == 0, v.output


def test_shards_of_different_runs_are_refused(tiny_rlds, tmp_path):
    uri = tiny_rlds(4)
    out = tmp_path / "out"
    assert cli("annotate", uri, "--out", str(out), "--shard", "0/2", "--progress", "none").exit_code == 0
    r = cli("annotate", uri, "--out", str(out), "--shard", "1/2", "--progress", "none", "--frames", "3")
    assert r.exit_code == 0
    other = tmp_path / "other"
    assert cli("annotate", uri, "--out", str(other), "--shard", "1/2", "--progress", "none").exit_code == 0
    manifest = other / ".refine" / "manifest-00001-of-00002.json"
    data = json.loads(manifest.read_text())
    data["teacher"]["model"] = "another-model"
    manifest.write_text(json.dumps(data))
    r = cli("merge", str(out), "--from", str(other))
    assert r.exit_code == 1 and "teacher.model" in r.output and "not the same run" in r.output


def test_shards_with_different_keyframe_settings_are_refused(tiny_rlds, tmp_path):
    uri = tiny_rlds(4)
    out = tmp_path / "out"
    assert cli("annotate", uri, "--out", str(out), "--shard", "0/2", "--progress", "none").exit_code == 0
    r = cli("annotate", uri, "--out", str(out), "--shard", "1/2", "--progress", "none", "--frames", "3")
    assert r.exit_code == 0
    r = cli("merge", str(out))
    assert r.exit_code == 1 and "frames.count" in r.output
