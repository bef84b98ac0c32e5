#!/usr/bin/env bash
# chaos.sh - the chaos run (issue 15): builds kvrelay (Release), starts a local cluster of
# 3 prefill and 6 decode nodes from the test builds of the roles, measures its capacity
# for a mixed load (greedy golden prompts, window/sink and sampled generations, clients
# that cancel or set short deadlines, invalid requests), then runs that load at 80% of
# the capacity while a node is SIGKILLed or SIGSTOPped past the node timeout (and
# continued) every period. Prints requests sent, completed, failed with a clean status,
# lost (must be 0) and wrong (must be 0), and whether the pools ended empty.
#   scripts/chaos.sh                 10 minutes, a node struck every minute
#   scripts/chaos.sh 90 15           a short run: 90 s, every 15 s
# Extra arguments go to build/tests/bin/chaos (e.g. --json). Exit status 0 when nothing
# was lost or wrong and the pools ended empty.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
period=${2:-60}
shift $(( $# > 2 ? 2 : $# ))
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
scripts/build.sh > /dev/null
exec build/tests/bin/chaos --seconds "$secs" --period "$period" "$@"
