#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for forkd development: system packages, a
# virtualenv in .venv with forkd installed editable. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the runtime and tests use (installed only when missing).
APT_PACKAGES=(util-linux gcc iproute2 procps mmdebstrap ca-certificates nftables qemu-system-x86 qemu-utils busybox-static e2fsprogs)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
