#!/usr/bin/env bash
# install-deps.sh - installs the Debian packages kvrelay needs, if any are missing.
# Unattended (no prompts); uses sudo when not root. Safe to run again.
set -euo pipefail

PKGS=(build-essential cmake pkg-config
      libopenblas-dev libzstd-dev libxxhash-dev
      libopenmpi-dev openmpi-bin
      libgrpc-dev libprotobuf-c-dev protobuf-c-compiler
      libmicrohttpd-dev libjson-c-dev
      clang libclang-rt-14-dev
      # The HTTP test's independent clients (tests/e2e/test_http.py): curl, Python's
      # prometheus_client and grpcio; node and npm below.
      openssl curl python3-prometheus-client python3-grpcio python3-protobuf protobuf-compiler)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and npm run the openai npm package in the HTTP test. A node that came from elsewhere
# (e.g. NodeSource, which bundles npm) is kept: Debian's npm would conflict with it.
command -v npm > /dev/null 2>&1 || missing+=(nodejs npm)
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
