#!/usr/bin/env bash
# install-deps.sh - installs the Debian packages kvrelay needs, if any are missing.
# Unattended (no prompts); uses sudo when not root. Safe to run again.
set -euo pipefail

PKGS=(build-essential cmake pkg-config
      libopenblas-dev libzstd-dev libxxhash-dev
      libopenmpi-dev openmpi-bin
      libgrpc-dev libprotobuf-c-dev protobuf-c-compiler
      clang libclang-rt-14-dev
      openssl python3-grpcio python3-protobuf protobuf-compiler)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
