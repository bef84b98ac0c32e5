#!/usr/bin/env bash
# build.sh - installs missing packages, then configures and builds kvrelay (Release,
# warnings as errors) into build/. Every executable lands in build/bin/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKVR_WERROR=ON > /dev/null
cmake --build build -j "$(nproc)"
