"""refine-train's --output is safe: one run at a time, a trained model never silently replaced,
Ctrl-C ends in a checkpoint that --resume continues, a full disk leaves no torn policy."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refinevla.train.checkpoint import STATE_FILE, latest_checkpoint
from refinevla.train.errors import TrainError
from refinevla.train.policy import POLICY_FILE
from refinevla.train.trainer import train
from tests.train.conftest import config


def cli(published: Path, model: Path, output: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "refinevla.train",
        "--dataset",
        str(published),
        "--model",
        str(model),
        "--output",
        str(output),
        "--cache-dir",
        str(cache_dir),
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--val-fraction",
        "0",
        *extra,
    ]


def start_long_run(published: Path, model: Path, output: Path, cache_dir: Path) -> subprocess.Popen[str]:
    """A real `refine-train` process that runs until it is stopped."""
    cmd = cli(published, model, output, cache_dir, "--max-steps", "100000")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(output: Path) -> int:
    log = output / "train_log.jsonl"
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.strip().endswith("}") and '"loss"' in line)


def wait_for_steps(proc: subprocess.Popen[str], output: Path, n: int, deadline: float = 180.0) -> None:
    t0 = time.monotonic()
    while logged_steps(output) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < deadline, "training made no progress"
        time.sleep(0.1)


def test_a_trained_output_reused_without_resume_is_refused_and_its_weights_unchanged(
    published, paligemma_dir, tmp_path, cache_dir
):
    output = tmp_path / "ckpt"
    train(config(published, paligemma_dir, output, cache_dir, max_steps=3))
    weights = output / "model.safetensors"
    before = weights.read_bytes()
    log_before = (output / "train_log.jsonl").read_text()

    with pytest.raises(TrainError, match=r"already holds a trained policy.*--resume.*--overwrite"):
        train(config(published, paligemma_dir, output, cache_dir, max_steps=1))
    assert weights.read_bytes() == before
    assert (output / "train_log.jsonl").read_text() == log_before

    # the same through the command line: one red line, exit 1, no traceback
    r = subprocess.run(
        cli(published, paligemma_dir, output, cache_dir, "--max-steps", "1"), capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "already holds a trained policy" in r.stderr and "Traceback" not in r.stderr
    assert weights.read_bytes() == before

    with pytest.raises(TrainError, match="give one"):
        train(config(published, paligemma_dir, output, cache_dir, max_steps=1, resume=True, overwrite=True))

    # --overwrite replaces it: a fresh run (its log starts anew, the old checkpoints are gone)
    (output / "checkpoints" / "step-000009").mkdir(parents=True)
    result = train(config(published, paligemma_dir, output, cache_dir, max_steps=1, overwrite=True))
    assert result.global_step == 1
    assert weights.read_bytes() != before
    assert not (output / "checkpoints").exists()
    steps = [json.loads(x)["step"] for x in (output / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1]


def test_checkpoints_without_a_final_policy_are_protected_too(published, paligemma_dir, tmp_path, cache_dir):
    output = tmp_path / "ckpt"
    ckpt = output / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text("{}")
    with pytest.raises(TrainError, match=r"checkpoints \(latest complete: step-000004\)"):
        train(config(published, paligemma_dir, output, cache_dir, max_steps=1))
    assert (ckpt / STATE_FILE).read_text() == "{}"


def test_output_that_is_a_file_is_one_line(published, paligemma_dir, tmp_path, cache_dir):
    output = tmp_path / "afile"
    output.write_text("not a folder")
    r = subprocess.run(
        cli(published, paligemma_dir, output, cache_dir, "--max-steps", "1"), capture_output=True, text=True
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: --output {output}: is a file, not a folder; give a folder path"]


def test_two_trainings_on_one_output_the_second_is_refused(published, paligemma_dir, tmp_path, cache_dir):
    output = tmp_path / "ckpt"
    first = start_long_run(published, paligemma_dir, output, cache_dir)
    try:
        wait_for_steps(first, output, 1)
        with pytest.raises(TrainError, match=rf"--output {output} is in use by pid {first.pid} on "):
            train(config(published, paligemma_dir, output, cache_dir, max_steps=1))
        assert first.poll() is None  # the holder goes on
    finally:
        first.kill()
        first.wait(timeout=30)
    # killed with SIGKILL: the kernel dropped its lock, and it left nothing complete to protect: a rerun runs
    assert latest_checkpoint(output) is None
    result = train(config(published, paligemma_dir, output, cache_dir, max_steps=1))
    assert result.global_step == 1


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_at_that_step(published, paligemma_dir, tmp_path, cache_dir):
    output = tmp_path / "ckpt"
    proc = start_long_run(published, paligemma_dir, output, cache_dir)
    try:
        wait_for_steps(proc, output, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpt = latest_checkpoint(output)
    assert ckpt is not None
    saved = json.loads((ckpt / STATE_FILE).read_text())["global_step"]
    assert saved >= 2 and ckpt.name == f"step-{saved:06d}"
    assert (ckpt / POLICY_FILE).is_file()
    resume_line = next(line for line in err.splitlines() if "Continue with" in line)
    assert f"checkpoint saved in {ckpt}" in resume_line
    assert resume_line.rstrip().endswith("--resume")
    assert "--max-steps 100000" in resume_line

    result = train(config(published, paligemma_dir, output, cache_dir, max_steps=saved + 2, resume=True))
    assert result.global_step == saved + 2
    assert len(result.losses) == 2  # continued at the saved step: only the two missing steps ran


def disk_fills_at_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the weights are written (transformers' save_pretrained -> safetensors)."""
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def full(tensors, filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        real(tensors, filename, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(mu, "safe_save_file", full)


def run_command(cfg: object) -> int:
    """`train(cfg)` behind the CLI's one error handler; returns the exit status."""
    import typer

    from refinevla.annotate.exits import user_errors

    @user_errors
    def command() -> None:
        train(cfg)  # type: ignore[arg-type]

    try:
        command()
    except typer.Exit as exc:
        return int(exc.exit_code)
    return 0


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_torn_checkpoint(
    published, paligemma_dir, tmp_path, cache_dir, monkeypatch, capsys
):
    output = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        disk_fills_at_weights(m)
        assert run_command(config(published, paligemma_dir, output, cache_dir, max_steps=3, save_every=2)) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert line.startswith("error: disk full writing ") and " free of " in line and "run the same command" in line
    assert not (output / "checkpoints" / "step-000002").exists()  # no incomplete checkpoint left behind
    assert not list(output.rglob(".policy.partial"))
    # with room again, the same command runs (nothing complete was there to protect)
    result = train(config(published, paligemma_dir, output, cache_dir, max_steps=3, save_every=2))
    assert result.global_step == 3 and latest_checkpoint(output) == output / "checkpoints" / "step-000002"


def test_a_full_disk_at_the_final_save_leaves_the_earlier_policy_whole(
    published, paligemma_dir, tmp_path, cache_dir, monkeypatch
):
    output = tmp_path / "ckpt"
    train(config(published, paligemma_dir, output, cache_dir, max_steps=2, save_every=2))

    def policy_files() -> dict[str, bytes]:  # the log is a log: the resumed steps are appended to it
        return {p.name: p.read_bytes() for p in output.iterdir() if p.is_file() and p.name != "train_log.jsonl"}

    before = policy_files()
    assert POLICY_FILE in before and "model.safetensors" in before
    with monkeypatch.context() as m:
        disk_fills_at_weights(m)
        code = run_command(config(published, paligemma_dir, output, cache_dir, max_steps=3, resume=True))
    assert code == 1
    assert policy_files() == before
    assert not (output / ".policy.partial").exists()
    result = train(config(published, paligemma_dir, output, cache_dir, max_steps=3, resume=True))
    assert result.global_step == 3
    assert json.loads(before[POLICY_FILE])["training"]["step"] == 2
    assert json.loads((output / POLICY_FILE).read_text())["training"]["step"] == 3  # the new policy is in place
