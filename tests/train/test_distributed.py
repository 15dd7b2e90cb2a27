"""refine-train on several processes, on the CPU: DDP, FSDP (the shipped config), two "nodes",
and a resume with another process count. Every run is the real `python -m refinevla.train` under
`torchrun`, as a user launches it; FSDP goes through `fsdp_cpu.py` (why: its docstring)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from refinevla.train.checkpoint import latest_checkpoint  # noqa: E402
from refinevla.train.errors import TrainError  # noqa: E402
from refinevla.train.trainer import train  # noqa: E402
from tests.train.conftest import config  # noqa: E402
from tests.train.fsdp_cpu import fsdp_env  # noqa: E402

HERE = Path(__file__).parent
REPO = HERE.parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
STEPS, BATCH, CLIP = 4, 2, 0.05  # a clip this small is active on every step
# every run's settings, as flags for torchrun and as TrainConfig fields in-process
RUN: dict[str, Any] = {
    "max_steps": STEPS,
    "batch_size": BATCH,
    "num_workers": 0,
    "val_fraction": 0.2,
    "trace_samples": True,
    "save_every": 2,
    "learning_rate": 1e-3,
    "warmup_steps": 1,
    "max_grad_norm": CLIP,
}


def train_args(published: Path, model: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    args = ["--dataset", str(published), "--model", str(model), "--output", str(out), "--cache-dir", str(cache)]
    for key, value in RUN.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return [*args, *extra]


def launch(cmd: list[str], env: dict[str, str] | None = None) -> None:
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300
    )
    assert r.returncode == 0, r.stderr[-4000:]


def losses(out: Path) -> list[float]:
    return [rec["loss"] for rec in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in rec]


def step_samples(out: Path, ranks: int) -> dict[int, set[int]]:
    """Optimizer step -> the samples all ranks used for it."""
    steps: dict[int, set[int]] = {}
    for k in range(ranks):
        for line in (out / "trace" / f"rank-{k}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"] + 1, set()).update(rec["indices"])
    return steps


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ddp(published: Path, paligemma_dir: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 data-parallel CPU processes (gloo), 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("ddp") / "ckpt"
    launch(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "refinevla.train",
            *train_args(published, paligemma_dir, out, cache),
        ]
    )
    return out


def test_two_processes_train_on_disjoint_samples_and_write_one_checkpoint(ddp: Path) -> None:
    traces = [[json.loads(x) for x in (ddp / "trace" / f"rank-{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
    seen = [{i for rec in t for i in rec["indices"]} for t in traces]
    assert len(traces[0]) == len(traces[1]) == STEPS and seen[0] and seen[1] and not seen[0] & seen[1]
    assert (ddp / "model.safetensors").is_file() and (
        ddp / "checkpoints" / "step-000004" / "trainer_state.json"
    ).is_file()
    state = json.loads((ddp / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["samples_seen"] == STEPS * BATCH * 2 and state["position"] == STEPS * BATCH * 2
    assert (state["processes"], state["batch_size"]) == (2, BATCH)
    assert len(losses(ddp)) == STEPS  # one log, written once (not once per rank)


def test_fsdp_with_the_shipped_config_trains_like_ddp_and_resumes_from_sharded_state(
    ddp: Path, published: Path, paligemma_dir: Path, cache: Path, tmp_path: Path
) -> None:
    """train/configs/fsdp.yaml (FSDP2, transformer-layer wrapping, rank-0 loading, sharded state) in fp32:
    the same losses and weights as DDP — clipping included, which FSDP applies only when handed the
    prepared (sharded) parameters — a full policy gathered from the shards, and an exact resume."""
    env = {**fsdp_env(REPO / "train" / "configs" / "fsdp.yaml"), "ACCELERATE_MIXED_PRECISION": "no"}
    assert env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    fsdp = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(HERE / "fsdp_cpu.py")]
    out = tmp_path / "fsdp"
    launch(fsdp + train_args(published, paligemma_dir, out, cache), env)
    assert losses(out) == pytest.approx(losses(ddp), rel=1e-6)
    assert step_samples(out, 2) == step_samples(ddp, 2)
    assert_same_weights(out, ddp, atol=1e-6)  # measured 7e-9; clipping the stale pre-FSDP parameters: 1e-3
    step2 = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (step2 / "state" / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # each rank wrote its own shard of the weights ...
    assert_same_weights(step2, ddp / "checkpoints" / "step-000002", atol=1e-6)  # ... the policy holds them all

    resumed = tmp_path / "resumed"
    shutil.copytree(step2, resumed / "checkpoints" / "step-000002")
    launch(fsdp + train_args(published, paligemma_dir, resumed, cache, "--resume"), env)
    assert losses(resumed) == pytest.approx(losses(out)[2:], rel=1e-5)
    assert_same_weights(resumed, out, atol=1e-6)

    # sharded state resumed without FSDP: one line naming both ways out, not accelerate's traceback
    refused = tmp_path / "refused"
    shutil.copytree(step2, refused / "checkpoints" / "step-000002")
    with pytest.raises(TrainError, match=r"written under FSDP and this run is without it.*--model .*step-000002"):
        train(config(published, paligemma_dir, refused, cache, **RUN, resume=True))


def test_fsdp_in_bf16_as_shipped(published: Path, paligemma_dir: Path, cache: Path, tmp_path: Path, ddp: Path) -> None:
    """The shipped config's mixed_precision (bf16) reaches the run: losses move off fp32's by bf16's error."""
    env = fsdp_env(REPO / "train" / "configs" / "fsdp.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    out = tmp_path / "bf16"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(HERE / "fsdp_cpu.py")]
    launch(cmd + train_args(published, paligemma_dir, out, cache, "--save-every", "0"), env)
    got, fp32 = losses(out), losses(ddp)
    assert got != pytest.approx(fp32, rel=1e-6)  # bf16 compute, not fp32
    assert got == pytest.approx(fp32, rel=2e-2)


def test_two_nodes_train_exactly_as_two_local_processes(
    ddp: Path, published: Path, paligemma_dir: Path, cache: Path, tmp_path: Path
) -> None:
    """Two torchrun agents (`--nnodes 2`, one process each) meeting over TCP on 127.0.0.1, as two machines
    would, writing to one shared output folder: the same ranks, samples, losses and weights as one node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                *(TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank)),
                *("--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "refinevla.train"),
                *train_args(published, paligemma_dir, out, cache),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert step_samples(out, 2) == step_samples(ddp, 2)
    assert losses(out) == pytest.approx(losses(ddp), rel=1e-6)
    assert_same_weights(out, ddp, atol=1e-6)


def test_resume_with_another_process_count_continues_at_the_same_sample(
    ddp: Path, published: Path, paligemma_dir: Path, cache: Path, tmp_path: Path
) -> None:
    """The 2-process run's step-2 checkpoint resumed by 1 process with --grad-accum 2 (the same global batch):
    every later optimizer step sees exactly the samples it saw in the 2-process run; nothing is replayed."""
    out = tmp_path / "one"
    shutil.copytree(ddp / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    assert latest_checkpoint(out) is not None
    result = train(config(published, paligemma_dir, out, cache, **RUN, grad_accum=2, resume=True))
    assert result.global_step == STEPS and len(result.losses) == STEPS - 2
    theirs = step_samples(ddp, 2)
    mine = step_samples(out, 1)
    assert mine == {3: theirs[3], 4: theirs[4]}
    # the same samples per step, grouped into micro-batches differently: the losses agree closely, not bitwise
    assert result.losses == pytest.approx(losses(ddp)[2:], rel=1e-2)
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert (state["position"], state["samples_seen"], state["processes"]) == (STEPS * BATCH * 2, STEPS * BATCH * 2, 1)


def test_mixed_precision_flag_then_launcher_config_then_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    from refinevla.train.trainer import mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert mixed_precision(None, cuda=False) == "no"
    assert (mixed_precision(True, cuda=False), mixed_precision(False, cuda=True)) == ("bf16", "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --config_file with fp16
    assert mixed_precision(None, cuda=True) is None  # accelerate reads the launcher's choice
    assert mixed_precision(False, cuda=True) == "no"  # the flag wins


def test_ctrl_c_under_torchrun_saves_one_checkpoint_on_every_rank_and_resume_continues(
    published: Path, paligemma_dir: Path, cache: Path, tmp_path: Path
) -> None:
    """Ctrl-C in the terminal: SIGINT to the whole process group (torchrun's agent forwards it again)."""
    import signal
    import time

    out = tmp_path / "ckpt"
    args = ["--dataset", str(published), "--model", str(paligemma_dir), "--output", str(out), "--cache-dir", str(cache)]
    args += ["--batch-size", str(BATCH), "--num-workers", "0", "--val-fraction", "0", "--max-steps", "100000"]
    proc = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "refinevla.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        t0 = time.monotonic()
        while not (out / "train_log.jsonl").is_file() or len(losses(out)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() - t0 < 240, "no progress"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, err[-4000:]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved = state["global_step"]
    assert saved >= 2 and state["processes"] == 2
    assert sorted(p.name for p in (ckpt / "state").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]  # every rank saved its part of the same step
    assert "Continue with the same launcher" in err and "--resume" in err

    resume = [*args[:-1], str(saved + 1), "--resume"]
    launch([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "refinevla.train", *resume])
    assert json.loads((out / "refinevla_policy.json").read_text())["training"]["step"] == saved + 1
    assert [rec["step"] for rec in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())][-1] == saved + 1
