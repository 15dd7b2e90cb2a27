"""`refine-data audit ORG/NAME`: a pushed output is read from the Hub (fake Hub, real client) as `view` reads it;
and the report without matplotlib (the core install) is still complete."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from refinevla.annotate.audit import audit_output, write_report
from refinevla.annotate.cli import app
from tests.publish.conftest import annotated_out, fake_hub, out_copy, source_uri  # noqa: F401  (fixtures)

TOKEN = "hf_test_SECRET_audit_never_printed"
REPO = "org/spoons"


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"HF_TOKEN": TOKEN})


def test_a_hub_dataset_is_audited_from_its_snapshot_and_reported_in_the_working_folder(
    out_copy: Path,  # noqa: F811
    fake_hub: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cli("card", str(out_copy)).exit_code == 0
    pushed = cli("push", str(out_copy), "--repo-id", REPO)
    assert pushed.exit_code == 0, pushed.output
    local = json.loads(cli("audit", str(out_copy), "--json").stdout.strip().splitlines()[-1])
    monkeypatch.chdir(tmp_path)

    r = cli("audit", REPO, "--json")
    assert r.exit_code == 0, r.output
    hub = json.loads(r.stdout.strip().splitlines()[-1])
    assert TOKEN not in r.output
    # the same rows give the same numbers; the spend comes from the manifest (the store is never uploaded)
    for key in ("episodes", "event_recall", "boundary_precision", "grounding", "duplicate_rate", "tokens"):
        assert hub[key] == local[key], key
    assert hub["episodes"] == 3 and hub["spend_from"] == "manifest" and local["spend_from"] == "store"
    assert (tmp_path / "audit-spoons" / "audit.md").is_file()  # not in the download cache


def test_without_matplotlib_the_report_has_text_histograms_and_says_why(
    out_copy: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    files = write_report(audit_output(str(out_copy)), tmp_path / "report")
    assert files.charts == [] and files.charts_note is not None and "pip install matplotlib" in files.charts_note
    markdown = files.markdown.read_text()
    assert "### gripper-event recall" in markdown and "| 0.9–1.0 | 3 |" in markdown and ".png" not in markdown
    assert not (tmp_path / "report" / "histograms").exists()
