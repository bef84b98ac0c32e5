#!/usr/bin/env bash
# demo.sh - the main job: builds kvrelay (installing what is missing), starts a local
# cluster (1 coordinator, 1 prefill node, 1 decode node under mpirun) serving the bundled
# TinyStories model, sends it a prompt through the gRPC client, shows the cluster's
# status, and stops the cluster.
#   scripts/demo.sh ["prompt"]      (env: PORT, PREFILL, DECODE, MAX_TOKENS, MODEL, TOKENIZER)
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-"Once upon a time"}
PORT=${PORT:-50051}
SHARED=$(cd .. && pwd)/shared
MODEL=${MODEL:-$SHARED/models/stories260K.bin}
TOKENIZER=${TOKENIZER:-$SHARED/models/tok512.bin}
if [ ! -r "$MODEL" ] || [ ! -r "$TOKENIZER" ]; then
  echo "demo: cannot read $MODEL / $TOKENIZER" >&2
  echo "demo: get stories260K.bin and tok512.bin from Karpathy's tinyllamas (see README) and set MODEL/TOKENIZER" >&2
  exit 1
fi
scripts/build.sh
BIN=build/bin
LOG=$(mktemp /tmp/kvrelay-demo.XXXXXX)
"$BIN/kvrelay" up --model "$MODEL" --tokenizer "$TOKENIZER" --prefill "${PREFILL:-1}" --decode "${DECODE:-1}" \
  --port "$PORT" > "$LOG" 2>&1 &
UP=$!
cleanup() { kill -TERM "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; rm -f "$LOG"; }
trap cleanup EXIT
for _ in $(seq 1 600); do
  grep -q "ready at" "$LOG" && break
  if ! kill -0 "$UP" 2>/dev/null; then cat "$LOG" >&2; echo "demo: the cluster did not start" >&2; exit 1; fi
  sleep 0.2
done
grep -q "ready at" "$LOG" || { cat "$LOG" >&2; echo "demo: the cluster did not get ready" >&2; exit 1; }
grep "ready at" "$LOG"
echo "--- kvrelay submit --prompt \"$PROMPT\" (greedy)"
"$BIN/kvrelay" submit --addr "127.0.0.1:$PORT" --prompt "$PROMPT" --max-tokens "${MAX_TOKENS:-200}" --temperature 0
echo "--- kvrelay status"
"$BIN/kvrelay" status --addr "127.0.0.1:$PORT"
echo "--- stopping the cluster"
