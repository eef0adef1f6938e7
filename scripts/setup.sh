#!/usr/bin/env bash
# One setup step for natctl: system packages, the venv, the package, the BPF object.
# Idempotent; when everything is there it only checks, in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nftables python3-nftables iproute2 conntrack ethtool procps kmod
  clang llvm libbpf-dev libbpf1 bpftool linux-libc-dev make
  python3-venv python3-pip
  socat iperf3 curl wireguard-go wireguard-tools openvpn openssl util-linux
  python3-zeroconf
  # The fleet's store: psycopg 3 for the venv (system site-packages), the server for a throwaway
  # cluster (natctl/lab/postgres.py). In a chroot or container the package's own 15/main cluster
  # is created but not started (no init system): nothing here needs it.
  postgresql python3-psycopg
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: run as root (or install sudo): natctl changes the kernel's network state" >&2; exit 1
  fi
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # No recommends: wireguard-tools would otherwise pull in a kernel image.
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The nftables binding ships with Debian's python3, so the venv sees system site-packages.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import nftables" 2>/dev/null; then
  echo "setup: creating .venv from $PY (with system site-packages)"
  rm -rf .venv
  "$PY" -m venv --system-site-packages .venv
fi
stamp=.venv/.natctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing natctl and its Python dependencies into .venv"
  # bench: matplotlib for the bench's chart. compat: a plain path file, not the import finder a modern
  # editable install loads into every Python start (12 ms of each natctl command).
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]' --config-settings editable_mode=compat
  touch "$stamp"
fi

# Bytecode ahead of time: a natctl command starts faster, also where PYTHONDONTWRITEBYTECODE is set.
.venv/bin/python -m compileall -q -j 0 natctl >/dev/null

# The XDP program is compiled ahead of time (no kernel headers needed).
if [ -f bpf/Makefile ]; then
  make -s -C bpf
fi
echo "setup: ready (.venv/bin/natctl)"
