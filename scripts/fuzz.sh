#!/usr/bin/env bash
# fuzz.sh - builds the libFuzzer harnesses with clang (ASan + UBSan) in their own build
# directory and runs each for a bounded time on a seed corpus generated at run time:
# fuzz_kv_wire (the KV block decoder), fuzz_msg (the MPI message parsers) and fuzz_gguf
# (the GGUF reader and model loader).
# Usage: scripts/fuzz.sh [SECONDS]   (default 20 per harness)
# Environment: KVR_FUZZ_BUILD build directory (default <repo>/build-fuzz), JOBS (default 2).
# Exit status: 0 when no harness found a crash; crash inputs are kept in
# $KVR_FUZZ_BUILD/fuzz-artifacts/ (reproduce: <harness> <file>).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-20}
bdir=${KVR_FUZZ_BUILD:-$root/build-fuzz}
jobs=${JOBS:-2}

CC=clang cmake -S "$root" -B "$bdir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVR_FUZZ=ON \
    -DKVR_SANITIZE=address,undefined >/dev/null
cmake --build "$bdir" -j"$jobs" --target fuzz_kv_wire fuzz_kv_wire_seeds fuzz_msg fuzz_msg_seeds \
    fuzz_gguf fuzz_gguf_seeds

mkdir -p "$bdir/fuzz-artifacts"
# Corpora are kept between runs in the build tree; never committed.
run() { # harness seeds max_len
    local corpus="$bdir/fuzz-corpus/$1"
    mkdir -p "$corpus"
    "$bdir/tests/bin/$2" "$corpus"
    echo "== $1: $secs s"
    "$bdir/tests/bin/$1" -max_total_time="$secs" -max_len="$3" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$bdir/fuzz-artifacts/$1-" "$corpus"
}
run fuzz_kv_wire fuzz_kv_wire_seeds 40000
run fuzz_msg fuzz_msg_seeds 4096
run fuzz_gguf fuzz_gguf_seeds 65536
