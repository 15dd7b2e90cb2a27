"""`refine-train` and `refine-train preview` as a user runs them: flags, --config, --json, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner

from refinevla.train.cli import app

ISSUE_FLAGS = [
    "--max-steps",
    "--epochs",
    "--batch-size",
    "--grad-accum",
    "--learning-rate",
    "--warmup-steps",
    "--save-every",
    "--eval-every",
    "--val-fraction",
    "--seed",
    "--transform",
    "--stats",
    "--camera",
    "--reasoning-weight",
    "--reasoning-dropout",
    "--trainable-layers",
    "--train-vision",
    "--lora-rank",
    "--bf16",
    "--no-bf16",
    "--gradient-checkpointing",
    "--resume",
    "--push-to-hub",
    "--config",
    "--dataset",
    "--model",
    "--output",
    "--source",
    "--data-dir",
    "--split",
]


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def test_help_documents_every_flag_and_is_fast():
    env = {**os.environ, "COLUMNS": "200"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "refinevla.train", "--help"], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    missing = [f for f in ISSUE_FLAGS if f not in r.stdout]
    assert not missing and "preview" in r.stdout
    assert elapsed < 2.0  # < 1 s on a quiet machine; the margin is for a loaded CI box
    code = "import sys, refinevla.train.cli; print('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_train_from_a_config_file_where_flags_win(published, paligemma_dir, tmp_path, cache_dir):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"dataset: {published}\nmodel: {paligemma_dir}\nmax-steps: 5\nbatch_size: 2\nnum-workers: 0\n"
        f"cache-dir: {cache_dir}\nval-fraction: 0.2\ntrainable-layers: 1\n"
    )
    out = tmp_path / "ckpt"
    r = run("--config", str(cfg), "--output", str(out), "--max-steps", "2")
    assert r.exit_code == 0, r.output
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]  # the flag won over the file's 5
    assert "action_token_accuracy" in steps[-1] and "val_loss" in steps[-1]  # validation ran at the end
    assert "trainable parameters:" in r.output
    assert list((out / "logs").glob("events.out.tfevents.*"))  # TensorBoard


def test_preview_json_lines_and_a_checkpoint_uses_its_own_statistics(published, paligemma_dir, tmp_path, cache_dir):
    common = ["--dataset", str(published), "--cache-dir", str(cache_dir), "--n", "2", "--json"]
    r = run("preview", *common, "--model", str(paligemma_dir))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"episode_id", "step", "prompt", "target", "action", "action_token_ids"} <= set(row)
        assert len(row["action"]) == 7 and len(row["action_token_ids"]) == 7
        assert row["target_token_ids"][-8:-1] == row["action_token_ids"]
    # a checkpoint trained with other statistics previews with those
    stats = json.loads(json.dumps({"bridge_orig": _wide_stats()}))
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps(stats))
    ckpt = tmp_path / "ckpt"
    args = ["--dataset", str(published), "--model", str(paligemma_dir), "--output", str(ckpt)]
    r = run(
        *args,
        "--cache-dir",
        str(cache_dir),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--stats",
        str(stats_file),
        "--val-fraction",
        "0",
    )
    assert r.exit_code == 0, r.output
    r = run("preview", *common, "--model", str(ckpt))
    assert r.exit_code == 0, r.output
    from refinevla.train.actions import ActionTokenizer

    tok = ActionTokenizer.from_statistics(stats["bridge_orig"], 512)
    for line, before in zip(r.stdout.splitlines(), rows, strict=True):
        row = json.loads(line)
        assert row["action_token_ids"] == tok.encode(row["action"]).tolist()
        assert row["action"] == before["action"] and row["action_token_ids"] != before["action_token_ids"]


def _wide_stats() -> dict:
    lo, hi = [-1.0] * 6 + [0.0], [1.0] * 6 + [1.0]
    block = {"mean": [0.0] * 7, "std": [1.0] * 7, "min": lo, "max": hi, "q01": lo, "q99": hi}
    return {
        "action": {**block, "mask": [True] * 6 + [False]},
        "proprio": block,
        "num_transitions": 1,
        "num_trajectories": 1,
    }


def _one_error_line(r) -> str:  # type: ignore[no-untyped-def]
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_bad_input_is_one_line_and_a_non_zero_exit(published, paligemma_dir, tmp_path, cache_dir):
    base = ["--cache-dir", str(cache_dir), "--output", str(tmp_path / "ckpt"), "--max-steps", "1"]
    # unknown schema id
    bad = tmp_path / "bad-schema"
    shutil.copytree(published, bad)
    manifest = json.loads((bad / "refinevla.json").read_text())
    manifest["schema"]["id"] = "refinevla.rationale/7"
    (bad / "refinevla.json").write_text(json.dumps(manifest))
    line = _one_error_line(run("--dataset", str(bad), "--model", str(paligemma_dir), *base))
    assert "refinevla.rationale/7" in line and "refinevla.json" in line
    # a model family without an adapter
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    line = _one_error_line(run("--dataset", str(published), "--model", str(llava), *base))
    assert "'llava'" in line and "paligemma" in line
    # an empty dataset
    empty = tmp_path / "empty"
    shutil.copytree(published, empty)
    for f in (empty / "data").glob("*.parquet"):
        pq.write_table(pq.read_table(f).slice(0, 0), f)
    line = _one_error_line(run("--dataset", str(empty), "--model", str(paligemma_dir), *base))
    assert "no step rows" in line and str(empty / "data") in line
    # a step row whose source episode is missing: the source was given another split's data
    other = tmp_path / "src-other"
    from refinevla.annotate.sources import specs
    from refinevla.annotate.sources.rlds_writer import write_rlds
    from tests.conftest import tiny_episode

    d = write_rlds(
        other, specs.bridge_features(cameras=1, image_size=(32, 32)), [tiny_episode(40, 10, 32)], name="bridge_orig"
    )
    line = _one_error_line(
        run("--dataset", str(published), "--model", str(paligemma_dir), "--source", f"rlds:{d}", *base)
    )
    assert "have no episode in source" in line
    # missing required flag, bad flag value
    assert "--output is required" in _one_error_line(run("--dataset", str(published), "--model", "x"))
    line = _one_error_line(
        run("--dataset", str(published), "--model", str(paligemma_dir), *base, "--reasoning-dropout", "1.5")
    )
    assert "--reasoning-dropout" in line
