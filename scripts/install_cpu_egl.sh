#!/usr/bin/env bash
# CPU rendering for LIBERO (refine-eval --suite libero: MuJoCo through robosuite): EGL with Mesa's llvmpipe
# (libegl1 is the GL vendor-neutral dispatch, libegl-mesa0 Mesa's EGL). Needs root (apt). Idempotent.
# On a GPU machine the NVIDIA driver's EGL serves instead; without EGL, MUJOCO_GL=osmesa needs libosmesa6.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q "libEGL_mesa.so" && ldconfig -p 2>/dev/null | grep -q "libEGL.so.1"; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install_cpu_egl.sh: needs root for apt-get (run it with sudo)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 >/dev/null
