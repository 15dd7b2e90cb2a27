"""`refine-train --dataset ORG/NAME`: a dataset pushed to the Hub (the publish tests' fake Hub on
127.0.0.1, spoken to by the real `huggingface_hub` client) trains exactly as its local folder does."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner

from refinevla.annotate.cli import app as data_app
from refinevla.train.cli import app as train_app
from tests.publish.conftest import fake_hub  # noqa: F401  (the HTTP fake Hub of the publish tests)

TOKEN = "hf_test_train_from_hub_SECRET"
REPO = "lab/spoons-reasoning"


def train(dataset: str, model: str, out, cache) -> list[dict]:  # type: ignore[no-untyped-def]
    args = ["--dataset", dataset, "--model", model, "--output", str(out), "--cache-dir", str(cache)]
    args += ["--max-steps", "3", "--batch-size", "2", "--num-workers", "0", "--val-fraction", "0", "--seed", "3"]
    r = CliRunner().invoke(train_app, args, env={"HF_TOKEN": TOKEN})
    assert r.exit_code == 0, r.output
    assert TOKEN not in r.output
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_a_hub_dataset_trains_like_its_local_folder(published, paligemma_dir, tmp_path, fake_hub):  # noqa: F811
    local = tmp_path / "local-copy"
    shutil.copytree(published, local)
    pushed = CliRunner().invoke(data_app, ["push", str(local), "--repo-id", REPO], env={"HF_TOKEN": TOKEN})
    assert pushed.exit_code == 0, pushed.output
    fake_hub.requests.clear()

    from_hub = train(REPO, str(paligemma_dir), tmp_path / "hub-ckpt", tmp_path / "cache-hub")
    from_folder = train(str(local), str(paligemma_dir), tmp_path / "local-ckpt", tmp_path / "cache-local")
    losses = [r["loss"] for r in from_hub if "loss" in r and "step" in r]
    assert losses and losses == [r["loss"] for r in from_folder if "loss" in r and "step" in r]
    # the manifest and the Parquet came over the Hub's download protocol (frames from the manifest's source)
    assert fake_hub.calls("GET", f"/api/datasets/{REPO}/revision/main")
    assert fake_hub.calls("GET", "/lfs-objects/")  # the Parquet files (LFS)
    policy = json.loads((tmp_path / "hub-ckpt" / "refinevla_policy.json").read_text())
    assert REPO in json.dumps(policy["dataset"])


def test_a_hub_dataset_that_does_not_exist_is_one_line(paligemma_dir, tmp_path, fake_hub):  # noqa: F811
    args = ["--dataset", "lab/nothing-here", "--model", str(paligemma_dir), "--output", str(tmp_path / "o")]
    r = CliRunner().invoke(train_app, args, env={"HF_TOKEN": TOKEN})
    assert r.exit_code == 1
    (line,) = r.output.strip().splitlines()
    assert "lab/nothing-here" in line and "cannot download from the Hub" in line and TOKEN not in line


def test_revision_pins_the_hub_commit_trained_on(published, paligemma_dir, tmp_path, fake_hub):  # noqa: F811
    local = tmp_path / "local-copy"
    shutil.copytree(published, local)
    assert CliRunner().invoke(data_app, ["push", str(local), "--repo-id", REPO], env={"HF_TOKEN": TOKEN}).exit_code == 0
    first = fake_hub.repos[REPO]["heads"]["main"]
    manifest = json.loads((local / "refinevla.json").read_text())
    (local / "refinevla.json").write_text(json.dumps({**manifest, "comment": "a second commit"}))
    assert CliRunner().invoke(data_app, ["push", str(local), "--repo-id", REPO], env={"HF_TOKEN": TOKEN}).exit_code == 0
    assert fake_hub.repos[REPO]["heads"]["main"] != first
    fake_hub.requests.clear()
    args = ["--dataset", REPO, "--revision", first, "--model", str(paligemma_dir), "--output", str(tmp_path / "o")]
    args += ["--cache-dir", str(tmp_path / "c"), "--max-steps", "1", "--batch-size", "2", "--num-workers", "0"]
    r = CliRunner().invoke(train_app, [*args, "--val-fraction", "0"], env={"HF_TOKEN": TOKEN})
    assert r.exit_code == 0, r.output
    # a commit needs no resolving: the tree and every file are fetched at that commit, nothing at main
    assert fake_hub.calls("GET", f"/api/datasets/{REPO}/tree/{first}")
    fetched = fake_hub.calls("GET", f"/datasets/{REPO}/resolve/")
    assert fetched and all(f"/resolve/{first}/" in r.path for r in fetched)
    assert not any("main" in r.path for r in fake_hub.requests)
