"""`refine-data push` against a recording fake of the Hub HTTP API (the real `huggingface_hub` code path)."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import yaml
from typer.testing import CliRunner

from refinevla.annotate.cli import app

TOKEN = "hf_test_SECRET_never_printed_91c3"


def push(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["push", *args], env={"HF_TOKEN": TOKEN, **(env or {})})


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def test_push_creates_repo_uploads_all_but_refine_and_tags_the_commit(out_copy, fake_hub):
    (out_copy / "card_license").touch()  # any user file is pushed; only .refine/ is excluded
    r = CliRunner().invoke(app, ["card", str(out_copy)])
    assert r.exit_code == 0, r.output
    r = push(str(out_copy), "--repo-id", "org/spoons", "--private")
    assert r.exit_code == 0, r.output
    assert TOKEN not in r.output

    create = fake_hub.calls("POST", "/api/repos/create")
    assert len(create) == 1 and create[0].json()["type"] == "dataset"
    assert create[0].json()["visibility"] == "private" and fake_hub.repos["org/spoons"]["private"]
    assert all(
        req.headers.get("authorization") == f"Bearer {TOKEN}"
        for req in fake_hub.requests
        if req.path.startswith("/api/")
    )

    files = fake_hub.files("org/spoons")
    assert set(files) == {
        "README.md",
        "refinevla.json",
        "card_license",
        "data/train-00000-of-00001.parquet",
        "episodes/train-00000-of-00001.parquet",
    }
    assert not any(p.startswith(".refine") for p in files)
    # Parquet went through the LFS batch + PUT path, byte-identical; text files as regular blobs.
    (commit,) = fake_hub.commits
    kinds = {op["value"]["path"]: op["key"] for op in commit["ops"][1:]}
    assert kinds["data/train-00000-of-00001.parquet"] == "lfsFile" and kinds["refinevla.json"] == "file"
    assert len(fake_hub.calls("PUT", "/lfs-upload/")) == 2
    local = (out_copy / "data/train-00000-of-00001.parquet").read_bytes()
    assert files["data/train-00000-of-00001.parquet"] == local
    assert pq.read_table(io.BytesIO(files["episodes/train-00000-of-00001.parquet"])).num_rows == 3
    assert fake_hub.tags["org/spoons"] == {"refinevla.rationale-v1": commit["oid"]}
    # The pushed card is OUT's card, with the loading example pointing at the Hub repo.
    pushed = files["README.md"].decode()
    assert 'load_dataset("org/spoons", "steps"' in pushed and str(out_copy) not in pushed
    local_card = (out_copy / "README.md").read_text()
    assert pushed == local_card.replace(f'load_dataset("{out_copy}"', 'load_dataset("org/spoons"')


def test_push_merges_an_existing_readme_yaml_instead_of_overwriting_it(out_copy, fake_hub):
    CliRunner().invoke(app, ["card", str(out_copy)])
    remote_yaml = {
        "license": "cc-by-4.0",
        "pretty_name": "Spoons by hand",
        "configs": [
            {"config_name": "steps", "data_files": [{"split": "train", "path": "old/*.parquet"}]},
            {"config_name": "frames", "data_files": [{"split": "train", "path": "frames/*.parquet"}]},
        ],
        "dataset_info": {
            "config_name": "frames",
            "features": [{"name": "image", "dtype": "image"}],
            "splits": [{"name": "train", "num_examples": 7}],
        },
    }
    remote = "---\n" + yaml.safe_dump(remote_yaml) + "---\n# old body\n"
    fake_hub.add_repo("org/spoons", {"README.md": remote.encode()})
    r = push(str(out_copy), "--repo-id", "org/spoons")
    assert r.exit_code == 0, r.output
    assert fake_hub.calls("POST", "/api/repos/create")[0].json().get("visibility") != "private"
    readme = fake_hub.files("org/spoons")["README.md"].decode()
    meta = front_matter(readme)
    configs = {c["config_name"]: c for c in meta["configs"]}
    assert set(configs) == {"steps", "episodes", "frames"}
    assert configs["steps"]["data_files"][0]["path"] == "data/train-*.parquet"  # ours wins for our configs
    assert configs["frames"]["data_files"][0]["path"] == "frames/*.parquet"  # theirs kept
    assert meta["dataset_info"]["config_name"] == "frames"  # kept, not dropped
    assert meta["pretty_name"] == "bridge_orig rationales" and "refinevla" in meta["tags"]
    assert "# old body" not in readme and "## Provenance" in readme
    # The local card is left as rendered.
    assert "frames/*.parquet" not in (out_copy / "README.md").read_text()


def test_repush_moves_the_schema_tag_and_branch_revision_is_created(out_copy, fake_hub):
    CliRunner().invoke(app, ["card", str(out_copy)])
    assert push(str(out_copy), "--repo-id", "org/spoons").exit_code == 0
    first = fake_hub.tags["org/spoons"]["refinevla.rationale-v1"]
    manifest = json.loads((out_copy / "refinevla.json").read_text())
    manifest["created"] = "2030-01-01T00:00:00Z"
    (out_copy / "refinevla.json").write_text(json.dumps(manifest))
    r = push(str(out_copy), "--repo-id", "org/spoons", "--revision", "v2-work")
    assert r.exit_code == 0, r.output
    assert fake_hub.calls("POST", "/api/datasets/org/spoons/branch/v2-work")
    assert fake_hub.commits[-1]["revision"] == "v2-work"
    assert fake_hub.tags["org/spoons"]["refinevla.rationale-v1"] == fake_hub.commits[-1]["oid"] != first


def test_dry_run_lists_operations_and_sizes_and_sends_nothing(out_copy, fake_hub):
    CliRunner().invoke(app, ["card", str(out_copy)])
    r = push(str(out_copy), "--repo-id", "org/spoons", "--dry-run")
    assert r.exit_code == 0, r.output
    assert fake_hub.requests == []
    assert "upload data/train-00000-of-00001.parquet (" in r.output and "KB)" in r.output
    assert "tag the commit refinevla.rationale-v1" in r.output and ".refine/" in r.output
    assert "store.sqlite" not in r.output


def test_push_without_token_is_one_line_error(out_copy, fake_hub, monkeypatch):
    CliRunner().invoke(app, ["card", str(out_copy)])
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    r = CliRunner().invoke(app, ["push", str(out_copy), "--repo-id", "org/x"], env={"HF_TOKEN": ""})
    assert r.exit_code == 1 and "HF_TOKEN" in r.output and "Traceback" not in r.output
    assert fake_hub.requests == []
