"""A teacher that writes only what the request's schema allows: `episode` detail is never rejected.

The local server answers every request with the smallest instance of the schema in its
`response_format` — the way a grammar-constrained weak model answers. With per-episode facts in the
schema that answer is valid; with the static schema it breaks the semantic checks and is re-asked.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app
from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.records import AnnotationOutcome
from refinevla.annotate.sources import open_source
from refinevla.annotate.store import ResultStore
from refinevla.annotate.teachers.openai_compat import OpenAICompatTeacher
from refinevla.schemas import validate


def run(uri: str, server: Any, store: Path, detail: str) -> tuple[Engine, dict[str, AnnotationOutcome]]:
    source = open_source(uri)
    teacher = OpenAICompatTeacher.for_provider("openai-compatible", model="m", base_url=server.url)
    results: dict[str, AnnotationOutcome] = {}
    opts = EngineOptions(concurrency=4, timeout=5.0, retry_base=0.01, schema_detail=detail)  # type: ignore[arg-type]
    with ResultStore(store) as s:
        engine = Engine(teacher, s, opts, sink=lambda r: results.__setitem__(r.episode_id, r))
        asyncio.run(engine.run(source.iter_episodes(), total=len(source)))
    return engine, results


def test_smallest_schema_answers_are_never_rejected_in_episode_mode(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(6)
    teacher_server.default = "smallest"
    engine, results = run(uri, teacher_server, tmp_path / "e.sqlite", "episode")
    assert [r.status for r in results.values()] == ["annotated"] * 6
    c = engine.counters
    assert (c.rejected, c.reasks, c.requests) == (0, 0, 6)
    assert all(validate(r.record) == [] for r in results.values() if r.record is not None)
    schemas = {json.dumps(r.body["response_format"]["json_schema"]["schema"]) for r in teacher_server.requests}
    assert len(schemas) == 3, "episodes of 10, 11 and 12 steps: one schema each"


def test_static_mode_gets_the_same_answers_rejected_after_paid_reasks(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(6)
    teacher_server.default = "smallest"
    engine, results = run(uri, teacher_server, tmp_path / "s.sqlite", "static")
    c = engine.counters
    assert c.rejected == 6 and c.annotated == 0
    assert c.reasks == 12 and c.requests == 18, "3 paid attempts per episode"
    reasons = [r.reason or "" for r in results.values()]
    assert all("every step must be covered" in x and "motion segment" in x for x in reasons), reasons[:2]


def test_the_cli_records_the_detail_in_the_manifest_and_the_card(tiny_rlds, teacher_server, tmp_path):
    uri = tiny_rlds(2)
    teacher_server.default = "smallest"
    out = tmp_path / "out"
    args = ["annotate", uri, "--teacher", "openai-compatible", "--base-url", teacher_server.url, "--model", "m"]
    r = CliRunner().invoke(app, [*args, "--out", str(out), "--progress", "none"])
    assert r.exit_code == 0, r.output
    schema = json.loads((out / "refinevla.json").read_text())["schema"]
    assert (schema["request_detail"], schema["request_backend"]) == ("episode", "openai-compatible")
    assert "episode" in (out / "README.md").read_text()
    # The detail is part of the request key: the same run in static mode pays again.
    before = len(teacher_server.requests)
    r = CliRunner().invoke(app, [*args, "--out", str(out), "--progress", "none", "--schema-detail", "static"])
    assert r.exit_code == 0, r.output
    assert len(teacher_server.requests) > before


@pytest.mark.parametrize("bad", ["grammar", "Episode"])
def test_an_unknown_detail_is_one_line(tiny_rlds, tmp_path, bad):
    r = CliRunner().invoke(app, ["annotate", tiny_rlds(1), "--out", str(tmp_path / "o"), "--schema-detail", bad])
    assert r.exit_code != 0
    assert "--schema-detail" in r.output and "static" in r.output and "Traceback" not in r.output
