#!/usr/bin/env bash
# test.sh - the test command (README, .ci/run): installs missing packages, builds with
# warnings as errors, runs every ctest test, then builds and runs them all again under
# AddressSanitizer + UndefinedBehaviorSanitizer (LeakSanitizer included), then runs the
# KV wire decoder's fuzzer for a bounded time.
#   KVR_TEST_QUICK=1   only the Release build and its tests (for a quick local check)
#   KVR_FUZZ_SECONDS   fuzzing time (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
JOBS=$(nproc)
t0=$(date +%s)

echo "== build (Release, -Werror)"
scripts/build.sh
echo "== tests (Release)"
ctest --test-dir build --output-on-failure -j "$JOBS" --timeout 600

if [ "${KVR_TEST_QUICK:-0}" = "1" ]; then
  echo "== quick mode: sanitizer build and fuzzing skipped ($(( $(date +%s) - t0 )) s)"
  exit 0
fi

echo "== build (ASan + UBSan)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVR_WERROR=ON \
      -DKVR_SANITIZE=address,undefined > /dev/null
cmake --build build-asan -j "$JOBS"
echo "== tests (ASan + UBSan + LeakSanitizer)"
# No leak suppressions: every test, cluster processes included, must exit leak-free.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir build-asan --output-on-failure -j "$JOBS" --timeout 1200

if [ -x scripts/fuzz.sh ]; then
  echo "== fuzzing the KV wire decoder (${KVR_FUZZ_SECONDS:-60} s)"
  scripts/fuzz.sh "${KVR_FUZZ_SECONDS:-60}"
fi
echo "== all tests passed in $(( $(date +%s) - t0 )) s"
