#!/usr/bin/env bash
# run_hosts_kv.sh - what moving the KV cache between machines costs: time to first token
# (TTFT) of single requests on emulated hosts (tests/deploy/emuhosts.sh), the prefill node
# and the decode node on separate hosts whose links are shaped with tc tbf, against the
# same prompt with no transfer at all (a colocated node prefilling it itself).
#
#   h1: coordinator (and mpirun)   h2: prefill node   h3: decode node   (disaggregated)
#   h4: one colocated decode node that prefills itself                    (the reference)
#
# For each model, wire option, link rate and prompt length: REPS requests one after the
# other (unloaded), greedy, one generated token, random prompt token ids; TTFT is the
# coordinator's (docs/API.md: arrival to first token). transfer share = (TTFT - TTFT of the
# colocated node) / TTFT: the part of TTFT that the transfer and its codec add, after
# whatever layer-wise shipping hides behind the prefill's later layers. Zero latency and
# no loss on these links (no netem on this kernel): real networks only add to it.
#
# Knobs (environment): BIN (build/bin), MODELS ("110m 1.1b"), RATES ("1gbit 10gbit
# 25gbit"), PROMPTS ("128 512 2048"), WIRES ("f32 bf16": the prefill node's --kv-dtype; f32
# is lossless, shuffle + zstd level 1), REPS (3), THREADS (threads of the prefill node and
# of the colocated node: 2), TOKENIZER (llama2_tokenizer.bin of ../shared), MODELS_DIR (/tmp/kvrelay-bench-models: synthetic checkpoints,
# written once), OUT (JSON file; default: a new file under /tmp), PREFILL_ARGS.
# Prints one JSON object per measurement to stderr as it goes and a table at the end.
# Needs root (namespaces) and jq. Run measured runs under the exclusive CPU lock:
#   flock -x /tmp/kvr-cpu.lock bench/run_hosts_kv.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
EMU=$here/tests/deploy/emuhosts.sh
BIN=$(cd "${BIN:-$here/build/bin}" && pwd)
MODELS=${MODELS:-"110m 1.1b"}
RATES=${RATES:-"1gbit 10gbit 25gbit"}
PROMPTS=${PROMPTS:-"128 512 2048"}
WIRES=${WIRES:-"f32 bf16"}
REPS=${REPS:-3}
THREADS=${THREADS:-2}
MODELS_DIR=${MODELS_DIR:-/tmp/kvrelay-bench-models}
TOKENIZER_SET=${TOKENIZER:-}
OUT=${OUT:-$(mktemp /tmp/kvrelay-hosts-kv.XXXXXX.json)}
PREFILL_ARGS=${PREFILL_ARGS:-}
PORT=50051
command -v jq >/dev/null || { echo "run_hosts_kv.sh: needs jq" >&2; exit 2; }
"$EMU" check >/dev/null || { "$EMU" check; exit 2; }

P="bk$$"
P=${P:0:11}
W=$(mktemp -d "/tmp/kvr-$P.XXXXXX")
export EMUHOSTS_OWNER=$$
JOB=""
stop_job() {
    [ -n "$JOB" ] || return 0
    kill -TERM "$JOB" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$JOB" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$JOB" 2>/dev/null && kill -KILL "$JOB" 2>/dev/null || true
    wait "$JOB" 2>/dev/null || true
    JOB=""
}
cleanup() { stop_job; "$EMU" down "$P" || true; rm -rf "$W"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$W/logs"
"$EMU" up "$P" 4 >"$W/env"
. "$W/env"
MPIENV=(env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "OMPI_MCA_plm_rsh_agent=$AGENT"
        OMPI_MCA_btl=tcp,self "OMPI_MCA_btl_tcp_if_include=$SUBNET" "OMPI_MCA_oob_tcp_if_include=$SUBNET"
        OMPI_MCA_pml=ob1)

model_path() { # shape -> checkpoint (written once, like kvrelay bench)
    local f
    case "$1" in
    110m) f=$MODELS_DIR/synth-110m.bin
        [ -s "$f" ] || "$BIN/kvrelay" synth-model --out "$f" --dim 768 --hidden 2048 --layers 12 --heads 12 \
            --kv-heads 12 --vocab 32000 --seq-len 2048 >&2 ;;
    1.1b) f=$MODELS_DIR/synth-tinyllama-1.1b.bin
        [ -s "$f" ] || "$BIN/kvrelay" synth-model --out "$f" --dim 2048 --hidden 5632 --layers 22 --heads 32 \
            --kv-heads 4 --vocab 32000 --seq-len 2048 >&2 ;;
    260k) f=$here/../shared/models/stories260K.bin ;; # the bundled model: a quick check of the script
    *) echo "run_hosts_kv.sh: unknown model $1 (110m, 1.1b, 260k)" >&2; exit 2 ;;
    esac
    echo "$f"
}

# start_job MODEL "prefill args": the disaggregated cluster (h1-h3) and the colocated
# reference (h4, its own coordinator on h4) as one MPI job each.
ADDR="$IP1:$PORT"
REF_ADDR="$IP4:$PORT"
start_jobs() {
    local m=$1 pargs=$2

    "$EMU" exec "$P" h1 "${MPIENV[@]}" mpirun --enable-recovery --bind-to none --oversubscribe \
        -np 1 -host "$HOST1" "$BIN/kvrelay-coordinator" --model "$m" --tokenizer "$TOKENIZER" \
        --listen "0.0.0.0:$PORT" --queue-timeout 600 \
        : -np 1 -host "$HOST2" "$BIN/kvrelay-prefill" --model "$m" --threads "$THREADS" --weights mmap $pargs \
        : -np 1 -host "$HOST3" "$BIN/kvrelay-decode" --model "$m" --threads 1 --weights mmap --kv-memory 2GiB \
        >"$W/logs/disagg.log" 2>&1 &
    JOB=$!
    wait_serving "$ADDR" 2
}
REF=""
start_ref() {
    local m=$1
    "$EMU" exec "$P" h4 "${MPIENV[@]}" mpirun --enable-recovery --bind-to none --oversubscribe \
        -np 1 -host "$HOST4" "$BIN/kvrelay-coordinator" --model "$m" --tokenizer "$TOKENIZER" \
        --listen "0.0.0.0:$PORT" --queue-timeout 600 \
        : -np 1 -host "$HOST4" "$BIN/kvrelay-decode" --model "$m" --threads "$THREADS" --weights mmap \
        --kv-memory 2GiB --colocated --max-batch-tokens 4096 \
        >"$W/logs/ref.log" 2>&1 &
    REF=$!
    wait_serving "$REF_ADDR" 1
}
stop_ref() {
    [ -n "$REF" ] || return 0
    kill -TERM "$REF" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$REF" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$REF" 2>/dev/null && kill -KILL "$REF" 2>/dev/null || true
    wait "$REF" 2>/dev/null || true
    REF=""
}
wait_serving() {
    for _ in $(seq 1 3000); do
        if "$BIN/kvrelay" status --addr "$1" --timeout 2 --json >"$W/st.json" 2>/dev/null &&
            [ "$(grep -o '"alive":true' "$W/st.json" | wc -l)" -eq "$2" ]; then return 0; fi
        sleep 0.2
    done
    echo "run_hosts_kv.sh: cluster at $1 not serving" >&2
    tail -n 20 "$W"/logs/*.log >&2
    exit 1
}

VOCAB=32000
prompt_ids() { # n seed -> "1,id,id,..." (BOS + n-1 ids in 3..VOCAB-1)
    awk -v n="$1" -v s="$2" -v v="$VOCAB" 'BEGIN{srand(s); printf "1"; for(i=1;i<n;i++) printf ",%d", 3+int(rand()*(v-3)); print ""}'
}
ttft() { # addr n rep -> ms
    "$BIN/kvrelay" submit --addr "$1" --prompt-tokens "$(prompt_ids "$2" "$3")" --max-tokens 1 --temperature 0 \
        --ignore-eos --json --timeout 600 | jq -r 'select(.type=="done") | .ttft_ms'
}
median() { sort -g | awk '{a[NR]=$1} END{if(NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

echo "[" >"$OUT"
first=1
emit() {
    [ $first -eq 1 ] || echo "," >>"$OUT"
    first=0
    echo "$1" >>"$OUT"
    echo "$1" >&2
}
for model in $MODELS; do
    m=$(model_path "$model")
    TOKENIZER=${TOKENIZER_SET:-$here/../shared/models/llama2_tokenizer.bin}
    VOCAB=32000
    [ "$model" = 260k ] && TOKENIZER=$here/../shared/models/tok512.bin VOCAB=512
    # The reference: no transfer (the node prefills what it decodes), full speed.
    start_ref "$m"
    declare -A ref=()
    for n in $PROMPTS; do
        ttft "$REF_ADDR" "$n" 0 >/dev/null # warm-up (page cache, first pass)
        vals=$(for r in $(seq 1 "$REPS"); do ttft "$REF_ADDR" "$n" "$r"; done)
        ref[$n]=$(echo "$vals" | median)
        emit "$(jq -cn --arg model "$model" --argjson n "$n" --arg v "$vals" --argjson med "${ref[$n]}" \
            '{model:$model, mode:"colocated", prompt_tokens:$n, ttft_ms:($v|split("\n")|map(tonumber)), ttft_ms_median:$med}')"
    done
    stop_ref
    for wire in $WIRES; do
        case "$wire" in
        f32 | f16 | bf16) pargs="--kv-dtype $wire $PREFILL_ARGS" ;;
        *) echo "run_hosts_kv.sh: unknown wire option $wire" >&2; exit 2 ;;
        esac
        start_jobs "$m" "$pargs"
        for rate in unshaped $RATES; do
            for h in h2 h3; do "$EMU" shape "$P" "$h" "$([ "$rate" = unshaped ] && echo none || echo "$rate")"; done
            for n in $PROMPTS; do
                ttft "$ADDR" "$n" 0 >/dev/null
                vals=$(for r in $(seq 1 "$REPS"); do ttft "$ADDR" "$n" "$r"; done)
                med=$(echo "$vals" | median)
                emit "$(jq -cn --arg model "$model" --arg wire "$wire" --arg link "$rate" --argjson n "$n" --arg v "$vals" \
                    --argjson med "$med" --argjson ref "${ref[$n]}" \
                    '{model:$model, mode:"disaggregated", wire:$wire, link:$link, prompt_tokens:$n,
                      ttft_ms:($v|split("\n")|map(tonumber)), ttft_ms_median:$med, colocated_ttft_ms:$ref,
                      transfer_share:((($med-$ref)/$med*1000|round)/1000)}')"
            done
        done
        stop_job
    done
done
echo "]" >>"$OUT"
echo "results: $OUT" >&2
jq -r '.[] | select(.mode=="disaggregated") | [.model, .wire, .link, .prompt_tokens, .ttft_ms_median, .colocated_ttft_ms, .transfer_share] | @tsv' "$OUT" |
    (echo -e "model\twire\tlink\tprompt\tttft_ms\tcoloc_ms\tshare"; cat) | column -t
