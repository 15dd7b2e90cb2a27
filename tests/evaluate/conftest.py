"""Tiny refine-train checkpoints for the refine-eval tests, made by `refine-train` itself.

The models are the train tests' offline ones (random weights from configs, a tokenizer trained
here); the dataset is a Bridge-layout RLDS source annotated by `refine-data annotate` with the
rule-based teacher, so the checkpoints are `bridge_orig` / WidowX policies exactly as a user's
would be. Nothing is downloaded. Also here: the simulator's environment, the demos, and the two local
runs that several test files read (`carrot_run`, `replay_run`), made once per session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds
from tests.conftest import tiny_episode
from tests.train.conftest import EPISODES, IMAGE, STEPS, build_idefics3, build_paligemma


@pytest.fixture(scope="session")
def eval_published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate

    root = tmp_path_factory.mktemp("eval-src")
    eps = [tiny_episode(i, STEPS[i], size=IMAGE) for i in range(EPISODES)]
    d = write_rlds(root, specs.bridge_features(cameras=1, image_size=(IMAGE, IMAGE)), eps, name="bridge_orig")
    out = tmp_path_factory.mktemp("eval-published") / "out"
    assert run_annotate(AnnotateArgs(source=f"rlds:{d}", out=out, progress="none", license="apache-2.0")) == 0
    return out


def train_checkpoint(published: Path, model: Path, output: Path, cache: Path, *extra: str) -> Path:
    """`refine-train` through its CLI, a few steps: a real, self-describing policy folder."""
    from typer.testing import CliRunner

    from refinevla.train.cli import app

    args = ["--dataset", str(published), "--model", str(model), "--output", str(output), "--cache-dir", str(cache)]
    args += ["--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--val-fraction", "0", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="session")
def paligemma_policy(tmp_path_factory: pytest.TempPathFactory, eval_published: Path) -> Path:
    """A PaliGemma WidowX policy (rationale + action), trained 2 steps by refine-train."""
    model = build_paligemma(tmp_path_factory.mktemp("eval-paligemma-model"))
    root = tmp_path_factory.mktemp("eval-paligemma")
    return train_checkpoint(eval_published, model, root / "ckpt", root / "cache")


@pytest.fixture(scope="session")
def idefics3_policy(tmp_path_factory: pytest.TempPathFactory, eval_published: Path) -> Path:
    """An Idefics3 WidowX policy, trained 2 steps by refine-train."""
    model = build_idefics3(tmp_path_factory.mktemp("eval-idefics3-model"))
    root = tmp_path_factory.mktemp("eval-idefics3")
    return train_checkpoint(eval_published, model, root / "ckpt", root / "cache")


def _find_simpler_assets() -> Path | None:
    """The workplace's ready MS_ASSET_DIR: $REFINEVLA_SIMPLER_ASSETS, else a `shared/simpler_assets`
    beside the checkout or one of its parents (tests read it there; it is never copied in)."""
    import os

    given = os.environ.get("REFINEVLA_SIMPLER_ASSETS")
    if given:
        return Path(given)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "simpler_assets"
        if (candidate / "data").is_dir():
            return candidate
    fallback = Path("/work/shared/simpler_assets")
    return fallback if (fallback / "data").is_dir() else None


@pytest.fixture(scope="session")
def sim_env() -> dict[str, str]:
    """Environment for a `refine-eval run` subprocess on ManiSkill3: MS_ASSET_DIR at the shared
    SimplerEnv assets, CPU physics and rendering. Skips (or fails in CI) when a piece is missing."""
    import importlib.util
    import os

    if importlib.util.find_spec("mani_skill") is None:
        pytest.skip("ManiSkill3 is not installed (pip install 'refinevla[sim]')")
    assets = _find_simpler_assets()
    if assets is None:
        pytest.skip("no shared/simpler_assets found (set REFINEVLA_SIMPLER_ASSETS)")
    if not any(Path(d).glob("*lvp*") for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d")):
        pytest.skip("no Vulkan lavapipe ICD (run scripts/install_cpu_vulkan.sh)")
    env = dict(os.environ)
    env.update({"MS_ASSET_DIR": str(assets), "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"})
    return env


@pytest.fixture(scope="session")
def demos_dir(sim_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two carrot demonstrations by `refine-eval demos --video` (with their truth file): shared by the demos
    tests and the audit against the simulator's truth."""
    out = tmp_path_factory.mktemp("demos") / "carrot"
    cmd = [sys.executable, "-m", "refinevla.evaluate", "demos", "--tasks", "carrot_on_plate", "--episodes", "2"]
    r = subprocess.run([*cmd, "--video", "--out", str(out)], capture_output=True, text=True, env=sim_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "carrot_on_plate: 2/2 tries kept" in r.stdout
    return out


def refine_eval(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refinevla.evaluate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def episodes(results: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (results / "episodes.jsonl").read_text().splitlines()]


# The carrot_run's episodes: capped at a third of the task's own 60 steps (the tests read what an episode
# records, not a success rate), so the run, its Ray twin and its rerun cost a third as much.
CARROT_TASK_STEPS = 60  # PutCarrotOnPlateInScene-v1's own step limit (SimplerEnv: 60 steps at 5 Hz)
CARROT_STEPS = 20
CARROT_RUN = ("--max-rationale-tokens", "6", "--max-steps", str(CARROT_STEPS))  # every run over its folder


@pytest.fixture(scope="session")
def carrot_run(tmp_path_factory: pytest.TempPathFactory, paligemma_policy: Path, sim_env: dict[str, str]) -> Path:
    """3 carrot episodes with video and action logs: killed (SIGKILL) after the first, then resumed (the
    run tests read it; the Ray tests compare theirs with it)."""
    out = tmp_path_factory.mktemp("carrot") / "results"
    args = ["run", "--policy", str(paligemma_policy), "--suite", "widowx", "--tasks", "carrot_on_plate"]
    args += ["--max-episodes", "3", *CARROT_RUN, "--video", "--log-actions", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "refinevla.evaluate", *args],
        env=sim_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = out / "episodes.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.communicate()[0]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = episodes(out)
    assert len(killed) == 1, "the kill came after the first episode and before the run could finish another"
    (out / "killed_first_line.json").write_text(json.dumps(killed[0]))

    resumed = refine_eval(sim_env, *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "2 episodes to run, 1 already done" in resumed.stdout
    return out


@pytest.fixture(scope="session")
def replay_run(demos_dir: Path, sim_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`--policy replay:DEMOS --episodes-from DEMOS`, run locally: the demos' own two carrot scenes (the demos
    tests check it; the Ray tests compare theirs with it)."""
    out = tmp_path_factory.mktemp("replay") / "results"
    args = ["run", "--policy", f"replay:{demos_dir}", "--suite", "widowx", "--tasks", "carrot_on_plate"]
    r = refine_eval(sim_env, *args, "--episodes-from", str(demos_dir), "--out", str(out), "--no-report")
    assert r.returncode == 0, r.stderr[-3000:]
    return out
