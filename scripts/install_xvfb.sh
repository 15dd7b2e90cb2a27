#!/usr/bin/env bash
# Xvfb, a virtual X display: the tests of `refine-data view` / `refine-eval view` without --save/--serve open
# Rerun's native viewer on one (drawing through lavapipe, scripts/install_cpu_vulkan.sh) and check that it listens
# on 127.0.0.1 only; without Xvfb they skip (under CI's REFINEVLA_REQUIRE_ALL=1, fail). Needs root (apt).
# Idempotent.
set -euo pipefail
if command -v Xvfb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install_xvfb.sh: needs root for apt-get (run it with sudo)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb >/dev/null
