#!/usr/bin/env bash
# run_autoscale.sh - the elastic decode pool under a bursty trace (issue 14): the same load
# schedule (PHASES: "rate:seconds" steps, low -> high -> low by default) against a fixed pool
# of MIN decode nodes, a fixed pool of MAX, and the autoscaled pool (kvrelay up --decode MIN
# --decode-max MAX). KV memory is the scarce resource (KV_MEMORY per decode node, small), so
# the pool's size decides how many requests run at once on 2 cores. Each phase is one
# `kvrelay bench cluster` run (open loop, Poisson; the next phase starts when the previous
# one's requests ended); a poller samples ClusterStatus every 0.2 s for node-seconds.
# Prints one table: goodput (requests meeting fixed TTFT/TPOT SLOs per second of the whole
# trace), TTFT/TPOT p50/p99, decode node-seconds, time from the load step to a new node
# serving, and drain time (from the coordinator's "elastic:" log lines).
#
# Knobs (environment): BIN (build/bin), MIN (1), MAX (3), KV_MEMORY (400000: 19 blocks of the
# bundled model, one 256-token request), PHASES ("4:8 40:8 4:12"), PROMPT_MIN/MAX (16/64),
# OUT_MIN/MAX (128/240), TTFT_SLO_MS (1000), TPOT_SLO_MS (50), SEED (1), COORD_ARGS (extra
# coordinator options), MODES ("min max auto"), OUT_DIR (new temporary directory). Needs jq.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$here/build/bin}
MODEL=${MODEL:-$here/../shared/models/stories260K.bin}
TOKENIZER=${TOKENIZER:-$here/../shared/models/tok512.bin}
MIN=${MIN:-1}
MAX=${MAX:-3}
KV_MEMORY=${KV_MEMORY:-400000}
PHASES=${PHASES:-"4:8 40:8 4:12"}
PROMPT_MIN=${PROMPT_MIN:-16}
PROMPT_MAX=${PROMPT_MAX:-64}
OUT_MIN=${OUT_MIN:-128}
OUT_MAX=${OUT_MAX:-240}
TTFT_SLO_MS=${TTFT_SLO_MS:-1000}
TPOT_SLO_MS=${TPOT_SLO_MS:-50}
SEED=${SEED:-1}
COORD_ARGS=${COORD_ARGS:-}
MODES=${MODES:-"min max auto"}
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/elastic-autoscale.XXXXXX)}
command -v jq >/dev/null || { echo "run_autoscale.sh: needs jq" >&2; exit 2; }
mkdir -p "$OUT_DIR"

up_pid=""
poll_pid=""
cleanup() {
    [ -n "$poll_pid" ] && kill "$poll_pid" 2>/dev/null || true
    if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
    up_pid=""
    poll_pid=""
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

printf "%-5s %8s %8s %8s %8s %8s %8s %10s %10s %10s %10s\n" mode sent met goodput ttft_p50 ttft_p99 tpot_p50 \
    tpot_p99 node_s step_to_serve drain_s
for mode in $MODES; do
    port=$(free_port)
    addr=127.0.0.1:$port
    case $mode in
        min) pool=(--decode "$MIN") ;;
        max) pool=(--decode "$MAX") ;;
        auto) pool=(--decode "$MIN" --decode-max "$MAX") ;;
    esac
    "$BIN/kvrelay" up --model "$MODEL" --tokenizer "$TOKENIZER" --prefill 1 "${pool[@]}" --port "$port" \
        --kv-memory "$KV_MEMORY" --queue-timeout 300 --coordinator-args "$COORD_ARGS" > "$OUT_DIR/$mode.up.out" \
        2> "$OUT_DIR/$mode.up.log" &
    up_pid=$!
    for _ in $(seq 600); do grep -q "ready at" "$OUT_DIR/$mode.up.out" 2>/dev/null && break; sleep 0.1; done
    ( while :; do
          n=$("$BIN/kvrelay" status --addr "$addr" --json 2>/dev/null |
              jq '[.nodes[] | select(.role=="decode" and .state=="serving")] | length' 2>/dev/null || echo "")
          [ -n "$n" ] && echo "$(date +%s.%N) $n"
          sleep 0.2
      done ) > "$OUT_DIR/$mode.pool" &
    poll_pid=$!
    t_start=$(date +%s.%N)
    : > "$OUT_DIR/$mode.req"
    i=0
    t_step=""
    for ph in $PHASES; do
        rate=${ph%%:*}
        dur=${ph##*:}
        [ $i -eq 1 ] && t_step=$(date +%s.%N)
        "$BIN/kvrelay" bench cluster --addr "$addr" --rate "$rate" --duration "$dur" --seed $((SEED + i)) \
            --prompt-min "$PROMPT_MIN" --prompt-max "$PROMPT_MAX" --out-min "$OUT_MIN" --out-max "$OUT_MAX" \
            --ttft-slo-ms "$TTFT_SLO_MS" --tpot-slo-ms "$TPOT_SLO_MS" --probes 0 \
            --tokenizer "$TOKENIZER" --per-request "$OUT_DIR/$mode.phase$i.req" --json > "$OUT_DIR/$mode.phase$i.json"
        cat "$OUT_DIR/$mode.phase$i.req" >> "$OUT_DIR/$mode.req"
        i=$((i + 1))
    done
    t_end=$(date +%s.%N)
    kill "$poll_pid" 2>/dev/null || true
    poll_pid=""
    cleanup
    span=$(echo "$t_end - $t_start" | bc -l)
    sent=$(jq -s 'length' "$OUT_DIR/$mode.req")
    met=$(jq -s --argjson t "$TTFT_SLO_MS" --argjson p "$TPOT_SLO_MS" \
        '[.[] | select(.ok and .ttft_ms <= $t and .tpot_ms <= $p)] | length' "$OUT_DIR/$mode.req")
    pct() { jq -s --arg f "$1" --argjson q "$2" \
        '[.[] | select(.ok) | .[$f]] | sort | if length == 0 then -1 else .[((length - 1) * $q | floor)] end' \
        "$OUT_DIR/$mode.req"; }
    node_s=$(awk 'NR > 1 { s += (p_n) * ($1 - p_t) } { p_t = $1; p_n = $2 } END { printf "%.1f", s }' \
        "$OUT_DIR/$mode.pool")
    step_serve="-"
    drain="-"
    if [ "$mode" = auto ]; then
        first=$(cat "$OUT_DIR/$mode.up.log" "$OUT_DIR/$mode.up.out" | grep -m1 "serving .* after the decision" | cut -d' ' -f1 || true)
        if [ -n "$first" ] && [ -n "$t_step" ]; then
            ts=$(date -d "$first" +%s.%N)
            step_serve=$(printf "%.2f" "$(echo "$ts - $t_step" | bc -l)")
        fi
        drain=$(cat "$OUT_DIR/$mode.up.log" "$OUT_DIR/$mode.up.out" | grep -o "left: drained in [0-9.]*" | awk '{print $4}' | sort -n | tail -1 || true)
        drain=${drain:--}
    fi
    printf "%-5s %8d %8d %8.3f %8.1f %8.1f %8.2f %10.2f %10s %10s %10s\n" "$mode" "$sent" "$met" \
        "$(echo "$met / $span" | bc -l)" "$(pct ttft_ms 0.5)" "$(pct ttft_ms 0.99)" "$(pct tpot_ms 0.5)" \
        "$(pct tpot_ms 0.99)" "$node_s" "$step_serve" "$drain"
done
echo "(trace: PHASES=\"$PHASES\" rate:seconds; SLOs TTFT <= $TTFT_SLO_MS ms, TPOT <= $TPOT_SLO_MS ms; logs in $OUT_DIR)"
