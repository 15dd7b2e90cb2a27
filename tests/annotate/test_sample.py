"""`annotate --sample N`: N episodes spread evenly over the selection, the same on every run."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.annotate.part import sample_indices
from tests.annotate.conftest import SECRET


def annotate(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["annotate", *args, "--progress", "none"], env={"OPENAI_API_KEY": SECRET})


def live(uri: str, url: str, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    args = ("--teacher", "openai-compatible", "--base-url", url, "--model", "fake-model", "--out", str(out))
    return annotate(uri, *args, *extra)


def test_sample_indices_spread_over_the_range_and_a_too_large_sample_is_one_line() -> None:
    assert sample_indices(0, 10, 3) == (0, 3, 6)
    assert sample_indices(5, 9, 4) == (5, 6, 7, 8)
    assert sample_indices(0, 1000, 4) == (0, 250, 500, 750)


def test_a_sample_reads_those_episodes_records_them_and_its_rerun_asks_nothing(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(10)
    out = tmp_path / "out"
    r = live(uri, teacher_server.url, out, "--sample", "3")
    assert r.exit_code == 0, r.output
    episodes = pl.read_parquet(out / "episodes" / "train-00000-of-00001.parquet")
    assert sorted(int(e.rsplit("#", 1)[-1]) for e in episodes["episode_id"]) == [0, 3, 6]
    assert sorted(q.seed for q in teacher_server.requests) == [0, 3, 6]
    manifest = json.loads((out / "refinevla.json").read_text())
    assert manifest["selection"]["sample"] == [0, 3, 6] and manifest["counts"]["selected"] == 3
    before = len(teacher_server.requests)
    again = live(uri, teacher_server.url, out, "--sample", "3")
    assert again.exit_code == 0, again.output
    assert len(teacher_server.requests) == before  # the same episodes: all in the store


def test_a_sample_larger_than_the_source_and_a_sample_with_a_limit_are_one_line(tiny_rlds, tmp_path):
    uri = tiny_rlds(4)
    r = annotate(uri, "--out", str(tmp_path / "a"), "--sample", "5")
    assert r.exit_code != 0 and "--sample 5: the selection holds only 4 episode(s)" in r.output
    r = annotate(uri, "--out", str(tmp_path / "b"), "--sample", "2", "--limit", "3")
    assert r.exit_code != 0 and "--sample and --limit" in r.output
    assert "Traceback" not in r.output
