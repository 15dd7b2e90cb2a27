"""`refine-data validate ORG/NAME`: a pushed dataset is fetched from the Hub (fake, real client) and checked."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from refinevla.annotate.cli import app

TOKEN = "hf_test_SECRET_never_printed_5e27"
REPO = "org/spoons"
STEPS_FILE = "data/train-00000-of-00001.parquet"
TAG = "refinevla.rationale-v1"


def cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args), env={"HF_TOKEN": TOKEN})


@pytest.fixture
def pushed(out_copy, fake_hub):  # type: ignore[no-untyped-def]
    """The annotated OUT, with its card, pushed to the fake Hub as `org/spoons`; the request log cleared."""
    assert cli("card", str(out_copy)).exit_code == 0
    r = cli("push", str(out_copy), "--repo-id", REPO)
    assert r.exit_code == 0, r.output
    fake_hub.requests.clear()
    return fake_hub


def tampered_steps(content: bytes, row: int, gripper: str) -> bytes:
    table = pq.read_table(io.BytesIO(content))
    values = table["gripper"].to_pylist()
    values[row] = gripper
    table = table.set_column(table.schema.get_field_index("gripper"), "gripper", pa.array(values))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_pushed_dataset_validates_from_the_hub(pushed):
    r = cli("validate", REPO)
    assert r.exit_code == 0, r.output
    assert f"{REPO}: 3 episodes, 33 steps" in r.output and "rows ok, counts ok, card ok" in r.output
    assert TOKEN not in r.output

    # Fetched through the Hub's download protocol: repo info -> tree of that commit -> files at that commit.
    head = pushed.repos[REPO]["heads"]["main"]
    assert pushed.calls("GET", f"/api/datasets/{REPO}/revision/main")
    assert pushed.calls("GET", f"/api/datasets/{REPO}/tree/{head}")
    fetched = {r.path.split(f"/resolve/{head}/", 1)[1] for r in pushed.calls("GET", f"/datasets/{REPO}/resolve/")}
    assert fetched == {"README.md", "refinevla.json"}  # the parquet files are LFS: fetched from the CDN
    cdn = pushed.calls("GET", "/lfs-objects/")
    assert len(cdn) == 2
    # The token goes to the Hub and never to the CDN an LFS file is redirected to.
    hub_calls = [r for r in pushed.requests if not r.path.startswith("/lfs-objects/")]
    assert hub_calls and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub_calls)
    assert all("authorization" not in r.headers for r in cdn)


def test_tampered_row_on_the_hub_fails_naming_the_row_and_the_tag_still_validates(pushed):
    original = pushed.files(REPO)[STEPS_FILE]
    pushed.commit_files(REPO, {STEPS_FILE: tampered_steps(original, 14, "half-open")})

    r = cli("validate", REPO)
    assert r.exit_code == 1
    assert f"{STEPS_FILE} row 14" in r.output and "half-open" in r.output and "rows failed" in r.output
    assert "counts ok" in r.output  # the row was changed, not removed
    assert TOKEN not in r.output

    # The schema tag pins the pushed commit: validating at the tag reads the untampered files.
    r = cli("validate", REPO, "--revision", TAG)
    assert r.exit_code == 0, r.output
    assert pushed.calls("GET", f"/api/datasets/{REPO}/revision/{TAG}")


def test_count_mismatch_on_the_hub_is_reported(pushed):
    steps = pq.read_table(io.BytesIO(pushed.files(REPO)[STEPS_FILE]))
    buf = io.BytesIO()
    pq.write_table(steps.slice(0, steps.num_rows - 1), buf)
    pushed.commit_files(REPO, {STEPS_FILE: buf.getvalue()})
    r = cli("validate", REPO)
    assert r.exit_code == 1
    assert "counts.steps is 33 but the files hold 32" in r.output and "num_steps is" in r.output


def test_missing_repo_is_one_line_error_without_the_token(fake_hub):
    r = cli("validate", "org/nothing-here")
    assert r.exit_code == 1
    assert "org/nothing-here: cannot fetch the dataset from the Hub: RepositoryNotFoundError" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "Traceback" not in r.output and TOKEN not in r.output
    assert fake_hub.calls("GET", "/api/datasets/org/nothing-here/revision/main")


def test_view_reads_a_pushed_dataset_from_the_hub(pushed, tmp_path):
    """`refine-data view ORG/NAME`: the rows come from the Hub, the frames from the source the manifest names."""
    pytest.importorskip("rerun", reason="rerun: needs the [viz] extra")
    from rerun.chunk import RrdReader

    rrd = tmp_path / "hub.rrd"
    r = cli("view", REPO, "--episodes", "0:2", "--save", str(rrd))
    assert r.exit_code == 0, r.output
    assert "logged 2 episode(s)" in r.output and TOKEN not in r.output
    assert pushed.calls("GET", f"/api/datasets/{REPO}/revision/main")
    rows: dict[str, int] = {}
    for chunk in RrdReader(str(rrd)).stream():
        rows[chunk.entity_path] = rows.get(chunk.entity_path, 0) + chunk.num_rows
    for k in (0, 1):
        frames = rows[f"/episodes/{k}/camera/image_0"]
        assert frames > 0 and rows[f"/episodes/{k}/rationale/step"] == frames  # every step annotated, from the Hub
        assert rows[f"/episodes/{k}/rationale/episode"] == 1
