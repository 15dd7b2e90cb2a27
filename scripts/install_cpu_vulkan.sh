#!/usr/bin/env bash
# CPU rendering for the simulator (refine-eval on ManiSkill3 / SAPIEN 3): Vulkan through Mesa's
# lavapipe. Debian bookworm's own Mesa 22.3 lavapipe is too old ("Failed to find a supported
# physical device"); Mesa >= 24.3 from bookworm-backports works. Needs root (apt). Idempotent.
# On a GPU machine you want the NVIDIA driver's Vulkan ICD instead, not this.
set -euo pipefail
if command -v vulkaninfo >/dev/null 2>&1 && vulkaninfo --summary 2>/dev/null | grep -q "llvmpipe"; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install_cpu_vulkan.sh: needs root for apt-get (run it with sudo)" >&2
  exit 1
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  list=/etc/apt/sources.list.d/refinevla-bookworm-backports.sources
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$list"
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
else
  # newer Debian/Ubuntu ship a recent enough Mesa
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
