#!/usr/bin/env bash
# run_cluster_compare.sh - disaggregated (1 prefill + 1 decode node) vs colocated (2 nodes
# that both prefill and decode) on the same machine and cores, 110M synthetic shape.
# For each rate and mode: `kvrelay up` on a free port, wait for its ready line, `kvrelay
# bench cluster --json`, stop the cluster; then print one table.
# Every process it starts is stopped on exit (trap). See docs/perf/cluster.md.
#
# Knobs (environment): BIN (dir of kvrelay, default build/bin), MODEL, TOKENIZER, RATES
# ("0.125 0.25 0.5 1 2"), REQUESTS (Poisson arrivals per rate, 20), PROMPT_MIN/MAX (256/512),
# OUT_MIN/MAX (64/128), SEED (1), KV_TOTAL_MIB (2048: KV pool memory in all, split evenly
# over the decode nodes), THREADS (1 per node), MODES ("disagg coloc"), SLO_SCALE (3),
# TTFT_SLO_MS/TPOT_SLO_MS (default: SLO_SCALE x the unloaded latency measured on the first
# mode), STALL_SLO_MS (500: the table's second goodput also requires every gap between two
# tokens of a request to be at most this; re-scored from the per-request lines), DECODE_ARGS / PREFILL_ARGS (extra node options, e.g. DECODE_ARGS="--max-batch-tokens
# 128"), OUT_DIR (JSON, per-request lines and logs; default a new temporary directory),
# TABLE_ONLY=1 (print the table of an existing OUT_DIR, run nothing). Needs jq.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$here/build/bin}
MODEL=${MODEL:-/tmp/kvrelay-bench-models/synth-110m.bin}
TOKENIZER=${TOKENIZER:-$here/../shared/models/llama2_tokenizer.bin}
RATES=${RATES:-"0.125 0.25 0.5 1 2"}
REQUESTS=${REQUESTS:-20}
PROMPT_MIN=${PROMPT_MIN:-256}
PROMPT_MAX=${PROMPT_MAX:-512}
OUT_MIN=${OUT_MIN:-64}
OUT_MAX=${OUT_MAX:-128}
SEED=${SEED:-1}
KV_TOTAL_MIB=${KV_TOTAL_MIB:-2048}
THREADS=${THREADS:-1}
MODES=${MODES:-"disagg coloc"}
SLO_SCALE=${SLO_SCALE:-3}
TTFT_SLO_MS=${TTFT_SLO_MS:-}
TPOT_SLO_MS=${TPOT_SLO_MS:-}
STALL_SLO_MS=${STALL_SLO_MS:-500}
DECODE_ARGS=${DECODE_ARGS:-}
PREFILL_ARGS=${PREFILL_ARGS:-}
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/kvrelay-cluster-compare.XXXXXX)}
TABLE_ONLY=${TABLE_ONLY:-0}

command -v jq >/dev/null || { echo "run_cluster_compare.sh: needs jq" >&2; exit 2; }
[ -x "$BIN/kvrelay" ] || { echo "run_cluster_compare.sh: no $BIN/kvrelay (set BIN)" >&2; exit 2; }
mkdir -p "$OUT_DIR"

if [ ! -s "$MODEL" ]; then
    echo "writing the 110M-shape checkpoint to $MODEL" >&2
    mkdir -p "$(dirname "$MODEL")"
    "$BIN/kvrelay" synth-model --out "$MODEL" --dim 768 --hidden 2048 --layers 12 --heads 12 \
        --vocab 32000 --seq-len 1024
fi

up_pid=""
job_pids="" # mpirun, the guards and the ranks (each in its own process group)
alive_pid() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
stop_cluster() {
    [ -n "$up_pid" ] || return 0
    if kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid" 2>/dev/null || true
        # kvrelay up stops mpirun (which stops the ranks) and escalates after 15 s itself.
        for _ in $(seq 1 250); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$up_pid" 2>/dev/null || true
    fi
    wait "$up_pid" 2>/dev/null || true
    # The ranks may take a moment more to finalize; a zombie counts as gone.
    local p
    for _ in $(seq 1 50); do
        alive=0
        for p in $job_pids; do alive_pid "$p" && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in $job_pids; do
        if alive_pid "$p"; then
            echo "run_cluster_compare.sh: pid $p outlived kvrelay up; killing it" >&2
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    up_pid=""
    job_pids=""
}
bench_pid=""
on_signal() {
    [ -z "$bench_pid" ] || kill -TERM "$bench_pid" 2>/dev/null || true
    exit 130
}
trap 'stop_cluster' EXIT
trap 'on_signal' INT TERM

free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    return 1
}

# Starts a cluster; sets up_pid, job_pids and addr. $1 = mode.
start_cluster() {
    local mode=$1 port log
    port=$(free_port)
    log="$OUT_DIR/up-$mode.log"
    local args=(--model "$MODEL" --tokenizer "$TOKENIZER" --port "$port" --threads "$THREADS"
                --decode-args "$DECODE_ARGS" --prefill-args "$PREFILL_ARGS")
    if [ "$mode" = disagg ]; then
        args+=(--prefill 1 --decode 1 --kv-memory "${KV_TOTAL_MIB}MiB")
    else
        args+=(--prefill 0 --decode 2 --colocated --kv-memory "$((KV_TOTAL_MIB / 2))MiB")
    fi
    "$BIN/kvrelay" up "${args[@]}" >"$log" 2>&1 &
    up_pid=$!
    for _ in $(seq 1 1200); do
        if grep -q "ready at" "$log"; then
            addr="127.0.0.1:$port"
            local mpirun_pid
            mpirun_pid=$(pgrep -P "$up_pid" | head -1)
            # mpirun's children are kvrelay-guard processes, each the parent of one rank.
            local guards
            guards=$(pgrep -P "$mpirun_pid" | tr '\n' ' ')
            job_pids="$mpirun_pid $guards $(for g in $guards; do pgrep -P "$g"; done | tr '\n' ' ')"
            return 0
        fi
        kill -0 "$up_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "run_cluster_compare.sh: the $mode cluster did not start; see $log" >&2
    cat "$log" >&2
    return 1
}

# CPU jiffies: busy time of the whole machine, and of the cluster's processes by role
# (kvrelay up and mpirun count as "launcher").
machine_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
role_busy() { # prints "launcher coordinator prefill decode" jiffies
    local p comm l=0 c=0 pf=0 d=0 t
    for p in $up_pid $job_pids; do
        [ -r "/proc/$p/stat" ] || continue
        comm=$(cat "/proc/$p/comm" 2>/dev/null || echo "?")
        t=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        case "$comm" in
        kvrelay-coordin*) c=$((c + t)) ;;
        kvrelay-prefill*) pf=$((pf + t)) ;;
        kvrelay-decode*) d=$((d + t)) ;;
        *) l=$((l + t)) ;;
        esac
    done
    echo "$l $c $pf $d"
}

hz=$(getconf CLK_TCK)
ncpu=$(nproc)
echo "nproc=$ncpu cpu=\"$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)\" out=$OUT_DIR" >&2

if [ "$TABLE_ONLY" != 1 ]; then
    # Rates outside, modes inside (a fresh cluster per run: starting one takes ~2 s), and the
    # mode order flips from rate to rate, so that both modes see the machine's background
    # load of the same minutes.
    order=$MODES
    declare -A probed=()
    for rate in $RATES; do
        for mode in $order; do
            start_cluster "$mode"
            out="$OUT_DIR/$mode-$rate.json"
            bench=(--addr "$addr" --rate "$rate" --requests "$REQUESTS" --prompt-min "$PROMPT_MIN"
                   --prompt-max "$PROMPT_MAX" --out-min "$OUT_MIN" --out-max "$OUT_MAX" --seed "$SEED"
                   --slo-scale "$SLO_SCALE" --timeout 600 --json
                   --per-request "$OUT_DIR/$mode-$rate.requests.jsonl")
            # The first run of each mode measures the unloaded latency (3 probes); the SLOs of
            # the first run's probes are then used for every run of every mode.
            [ -z "${probed[$mode]:-}" ] || bench+=(--probes 0)
            probed[$mode]=1
            if [ -n "$TTFT_SLO_MS" ] && [ -n "$TPOT_SLO_MS" ]; then
                bench+=(--ttft-slo-ms "$TTFT_SLO_MS" --tpot-slo-ms "$TPOT_SLO_MS")
            fi
            load0=$(cut -d' ' -f1 /proc/loadavg)
            m0=$(machine_busy); read -r l0 c0 p0 d0 < <(role_busy); t0=$(date +%s.%N)
            # In the background so that a signal reaches the trap at once (bash runs traps
            # only between foreground commands).
            "$BIN/kvrelay" bench cluster "${bench[@]}" >"$out" 2>"$OUT_DIR/$mode-$rate.err" &
            bench_pid=$!
            wait "$bench_pid" || { echo "bench failed; see $OUT_DIR/$mode-$rate.err" >&2; exit 1; }
            bench_pid=""
            m1=$(machine_busy); read -r l1 c1 p1 d1 < <(role_busy); t1=$(date +%s.%N)
            stop_cluster
            # CPU seconds by role while the run lasted (probes and warm-up included), and
            # the share of the machine used by anything else: other people's work on these
            # cores (noise).
            cpu=$(jq -r '.client_cpu_s' "$out" | awk -v m=$((m1 - m0)) -v l=$((l1 - l0)) \
                -v c=$((c1 - c0)) -v p=$((p1 - p0)) -v d=$((d1 - d0)) -v hz="$hz" -v n="$ncpu" \
                -v t0="$t0" -v t1="$t1" '{cl=$1; w=t1-t0; f=(m-l-c-p-d)/hz-cl; if(f<0)f=0;
                  printf "{\"wall_s\":%.2f,\"prefill\":%.2f,\"decode\":%.2f,\"coordinator\":%.2f,\"launcher\":%.2f,\"client\":%.2f,\"foreign\":%.2f,\"foreign_pct\":%.0f}",
                         w, p/hz, d/hz, c/hz, l/hz, cl, f, 100*f/(n*w)}')
            foreign=$(echo "$cpu" | jq -r '.foreign_pct')
            jq -c --arg mode "$mode" --argjson cpu "$cpu" --arg load "$load0" \
                '. + {mode:$mode, cpu_s:$cpu, foreign_cpu_pct:$cpu.foreign_pct, loadavg_before:($load|tonumber)}' \
                "$out" >"$out.tmp" && mv "$out.tmp" "$out"
            if [ -z "$TTFT_SLO_MS" ]; then
                TTFT_SLO_MS=$(jq -r '.slo.ttft_ms' "$out")
                TPOT_SLO_MS=$(jq -r '.slo.tpot_ms' "$out")
                echo "SLOs from the unloaded $mode probes: TTFT <= $TTFT_SLO_MS ms, TPOT <= $TPOT_SLO_MS ms" >&2
            fi
            echo "$mode rate=$rate: $(jq -r '"\(.requests.completed)/\(.requests.sent) ok, goodput \(.goodput_req_s) req/s"' "$out"), foreign CPU ${foreign}%" >&2
        done
        order=$(echo "$order" | awk '{for (i = NF; i > 0; i--) printf "%s%s", $i, (i > 1 ? " " : "")}')
    done
fi

first_json=$(ls "$OUT_DIR"/*.json | head -1)
TTFT_SLO_MS=$(jq -r '.slo.ttft_ms' "$first_json")
TPOT_SLO_MS=$(jq -r '.slo.tpot_ms' "$first_json")
REQUESTS=$(jq -r '.config.requests' "$first_json")
echo
echo "SLO: TTFT <= $TTFT_SLO_MS ms, TPOT <= $TPOT_SLO_MS ms (client side); prompts $PROMPT_MIN-$PROMPT_MAX, outputs $OUT_MIN-$OUT_MAX tokens; $REQUESTS Poisson arrivals per rate; seed $SEED"
echo "goodput+stall: the same SLOs and no gap between two tokens over $STALL_SLO_MS ms; maxITL p50 = median over requests of the longest gap"
printf '%-7s %5s %6s %7s %6s %8s %7s %8s %6s %8s %15s %15s %15s %8s %8s %5s\n' mode rate offer sent/ok fail \
    "out_tok/s" "req/s" goodput "slo%" "gp+stall" "TTFT p50/p99 s" "TPOT p50/p99 ms" "E2E p50/p99 s" "ITLp99ms" \
    "maxITL50" "noise"
for mode in $MODES; do
    for rate in $RATES; do
        # Re-score the per-request lines under the stall SLO too.
        stall=$(jq -rs --argjson t "$TTFT_SLO_MS" --argjson p "$TPOT_SLO_MS" --argjson s "$STALL_SLO_MS" \
            --argjson span "$(jq -r .span_s "$OUT_DIR/$mode-$rate.json")" \
            '[.[] | select(.ok)] as $ok | [($ok | map(select(.ttft_ms <= $t and .tpot_ms <= $p and .max_itl_ms <= $s)) | length) / $span,
              ($ok | map(.max_itl_ms) | sort | if length > 0 then .[length / 2 | floor] else 0 end)] | @tsv' \
            "$OUT_DIR/$mode-$rate.requests.jsonl")
        jq -r '[.mode, .config.rate, .offered_req_s, "\(.requests.sent)/\(.requests.completed)",
                .requests.failed, .throughput.output_tok_s, .throughput.req_s, .goodput_req_s,
                100*.slo_attainment, "\(.ttft_ms.p50/1000|.*100|round/100)/\(.ttft_ms.p99/1000|.*100|round/100)",
                "\(.tpot_ms.p50|round)/\(.tpot_ms.p99|round)",
                "\(.e2e_ms.p50/1000|.*10|round/10)/\(.e2e_ms.p99/1000|.*10|round/10)",
                .itl_ms.p99, "\(.foreign_cpu_pct)%"] | @tsv' "$OUT_DIR/$mode-$rate.json" |
            awk -F'\t' -v st="$stall" 'BEGIN{split(st, g, "\t")}
                 {printf "%-7s %5s %6.2f %7s %6s %8.1f %7.3f %8.3f %6.0f %8.3f %15s %15s %15s %8.0f %8.0f %5s\n",
                          $1,$2,$3,$4,$5,$6,$7,$8,$9,g[1],$10,$11,$12,$13,g[2],$14}'
    done
done
echo "(JSON per run and cluster logs in $OUT_DIR; noise = CPU share used by other processes during the run)"
