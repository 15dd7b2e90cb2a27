"""`refine-data validate`: a clean dataset passes; a tampered row and a count mismatch are named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.datacards.render import write_card

STEPS_FILE = "data/train-00000-of-00001.parquet"


def run(target) -> object:  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["validate", str(target)])


def test_clean_dataset_validates(out_copy):
    write_card(out_copy)
    r = run(out_copy)
    assert r.exit_code == 0, r.output
    assert "3 episodes, 33 steps" in r.output and "rows ok, counts ok, card ok" in r.output


def test_tampered_step_row_is_named_with_file_and_row(out_copy):
    write_card(out_copy)
    path = out_copy / STEPS_FILE
    table = pq.read_table(path)
    gripper = table["gripper"].to_pylist()
    gripper[14] = "half-open"
    table = table.set_column(table.schema.get_field_index("gripper"), "gripper", pa.array(gripper))
    pq.write_table(table, path)
    r = run(out_copy)
    assert r.exit_code == 1
    assert f"{STEPS_FILE} row 14" in r.output and "half-open" in r.output and "rows failed" in r.output


def test_count_mismatch_and_missing_card_are_reported(out_copy):
    (out_copy / "README.md").unlink()  # `annotate` wrote one
    manifest = json.loads((out_copy / "refinevla.json").read_text())
    manifest["counts"]["steps"] += 5
    (out_copy / "refinevla.json").write_text(json.dumps(manifest))
    r = run(out_copy)
    assert r.exit_code == 1
    assert "counts.steps is 38 but the files hold 33" in r.output
    assert "README.md: missing" in r.output


def test_episode_row_against_its_declared_schema(out_copy):
    write_card(out_copy)
    path = out_copy / "episodes/train-00000-of-00001.parquet"
    table = pq.read_table(path)
    obs = table["observation"].to_pylist()
    obs[1] = ""
    table = table.set_column(table.schema.get_field_index("observation"), "observation", pa.array(obs))
    pq.write_table(table, path)
    r = run(out_copy)
    assert r.exit_code == 1 and "episodes/train-00000-of-00001.parquet row 1" in r.output and "observation" in r.output
