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
# Overlap (layer-wise shipping): the prefill node runs with KVR_LOG_LEVEL=debug, which
# makes it log when each layer's compute ended and when its KV had been encoded and handed
# to MPI ("kvtrace" lines, CLOCK_MONOTONIC), and bench/netsample.py samples the bytes that
# reach the decode host's cable every millisecond on the same clock (one machine: the
# emulated hosts share CLOCK_MONOTONIC). Per request: wire_mb (KV bytes on the wire),
# hidden = fraction of them that had reached the decode host when the prefill pass ended,
# tail_ms = last KV byte at the decode host minus the pass's end (the transfer TTFT
# waits for), encode_pct = time the compute thread spent encoding and posting KV, as a
# share of the pass. TIMELINE=1 keeps each request's per-layer timeline in the JSON.
#
# Knobs (environment): BIN (build/bin), MODELS ("110m 1.1b"), RATES ("1gbit 10gbit
# 25gbit"), PROMPTS ("128 512 2047"), WIRES ("f32 raw bf16": f32 = lossless, shuffle + zstd
# level 1; raw = f32 with no transform and no compression (--kv-compress none); bf16 =
# bfloat16, shuffle + zstd), REPS (3), THREADS (threads of the prefill node and
# of the colocated node: 2), MCA (extra Open MPI settings, "name=value ..."), TOKENIZER (llama2_tokenizer.bin of ../shared), MODELS_DIR (/var/tmp/kvrelay-bench-models:
# synthetic checkpoints, written once; not under /tmp, which each emulated host has its own), OUT (JSON file; default: a new file under /tmp), PREFILL_ARGS.
# Prints one JSON object per measurement to stderr as it goes and a table at the end.
# Needs root (namespaces) and jq. Run measured runs under the exclusive CPU lock:
#   flock -x /tmp/kvr-cpu.lock bench/run_hosts_kv.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
EMU=$here/tests/deploy/emuhosts.sh
BIN=$(cd "${BIN:-$here/build/bin}" && pwd)
MODELS=${MODELS:-"110m 1.1b"}
RATES=${RATES:-"1gbit 10gbit 25gbit"}
PROMPTS=${PROMPTS:-"128 512 2047"} # 2047 + the one generated token = the synthetic shapes' 2048 context
WIRES=${WIRES:-"f32 raw bf16"}
TIMELINE=${TIMELINE:-0}
LINKS=${LINKS:-unshaped}
REPS=${REPS:-3}
THREADS=${THREADS:-2}
MODELS_DIR=${MODELS_DIR:-/var/tmp/kvrelay-bench-models} # not /tmp: each emulated host has its own
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
cleanup() {
    [ -z "$SAMPLER" ] || kill -TERM "$SAMPLER" 2>/dev/null || true
    stop_job
    "$EMU" down "$P" || true
    [ -n "${KEEP:-}" ] && echo "kept $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$W/logs"
"$EMU" up "$P" 4 >"$W/env"
. "$W/env"
MPIENV=(env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "OMPI_MCA_plm_rsh_agent=$AGENT"
        OMPI_MCA_btl=tcp,self "OMPI_MCA_btl_tcp_if_include=$SUBNET" "OMPI_MCA_oob_tcp_if_include=$SUBNET"
        OMPI_MCA_pml=ob1)
for kv in ${MCA:-}; do MPIENV+=("OMPI_MCA_$kv"); done # e.g. MCA="btl_tcp_eager_limit=1048576"

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

# --node-timeout 600 / --coord-timeout 600: a node busy in one long pass (a 2047-token
# prompt on a loaded machine, ~30 s for the colocated node) answers no ping meanwhile; with
# the defaults (10 s / 15 s) the colocated node left and was declared dead mid-prompt.
# start_job MODEL "prefill args": the disaggregated cluster (h1-h3) and the colocated
# reference (h4, its own coordinator on h4) as one MPI job each.
ADDR="$IP1:$PORT"
REF_ADDR="$IP4:$PORT"
start_jobs() {
    local m=$1 pargs=$2

    "$EMU" exec "$P" h1 "${MPIENV[@]}" mpirun --enable-recovery --bind-to none --oversubscribe \
        -np 1 -host "$HOST1" "$BIN/kvrelay-coordinator" --model "$m" --tokenizer "$TOKENIZER" \
        --listen "0.0.0.0:$PORT" --queue-timeout 600 --node-timeout 600 \
        : -np 1 -host "$HOST2" env KVR_LOG_LEVEL=debug "$BIN/kvrelay-prefill" --coord-timeout 600 --model "$m" --threads "$THREADS" \
        --weights mmap $pargs \
        : -np 1 -host "$HOST3" "$BIN/kvrelay-decode" --coord-timeout 600 --model "$m" --threads 1 --weights mmap --kv-memory 2GiB \
        >"$W/logs/disagg.log" 2>&1 &
    JOB=$!
    wait_serving "$ADDR" 2 "$JOB"
}
REF=""
start_ref() {
    local m=$1
    "$EMU" exec "$P" h4 "${MPIENV[@]}" mpirun --enable-recovery --bind-to none --oversubscribe \
        -np 1 -host "$HOST4" "$BIN/kvrelay-coordinator" --model "$m" --tokenizer "$TOKENIZER" \
        --listen "0.0.0.0:$PORT" --queue-timeout 600 --node-timeout 600 \
        : -np 1 -host "$HOST4" "$BIN/kvrelay-decode" --coord-timeout 600 --model "$m" --threads "$THREADS" --weights mmap \
        --kv-memory 2GiB --colocated --max-batch-tokens 4096 \
        >"$W/logs/ref.log" 2>&1 &
    REF=$!
    wait_serving "$REF_ADDR" 1 "$REF"
}
stop_ref() {
    [ -n "$REF" ] || return 0
    kill -TERM "$REF" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$REF" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$REF" 2>/dev/null && kill -KILL "$REF" 2>/dev/null || true
    wait "$REF" 2>/dev/null || true
    REF=""
}
wait_serving() { # addr n_nodes mpirun_pid
    for _ in $(seq 1 3000); do
        kill -0 "$3" 2>/dev/null || break
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
# traced n rep -> one JSON object: TTFT and the overlap of the request's one prefill pass
# (the kvtrace lines it added to the log, the wire samples of its time span).
SAMPLER=""
traced() {
    local from t_ms
    from=$(wc -l <"$W/logs/disagg.log")
    t_ms=$(ttft "$ADDR" "$1" "$2")
    sleep 0.05 # the sampler's last period
    tail -n +"$((from + 1))" "$W/logs/disagg.log" | grep -a 'kvtrace' | sed 's/.*kvtrace //' >"$W/trace" || true
    python3 - "$W/trace" "$W/wire" "$t_ms" "$TIMELINE" <<'PY'
import json, sys
trace, wire, ttft, timeline = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
kv = lambda line: dict(f.split("=", 1) for f in line.split() if "=" in f)
layers, passes = [], []
for line in open(trace):
    d = kv(line)
    (layers if "layer" in d else passes).append(d)
out = {"ttft_ms": ttft}
if len(passes) == 1:
    p = passes[0]
    t0, t1, nbytes = float(p["start"]), float(p["end"]), int(p["bytes"])
    ls = [l for l in layers if t0 <= float(l["computed"]) <= t1 + 1e-6]
    samples = [tuple(map(float, l.split())) for l in open(wire)]
    base = max([b for t, b in samples if t <= t0] or [samples[0][1]])
    got = lambda t: max([b for s, b in samples if s <= t] or [base]) - base
    total = got(float("inf"))
    # The last KV byte: when the decode host had received the pass's bytes (headers of
    # the packets and other messages make the wire count a little larger).
    t_last = next((s for s, b in samples if b - base >= nbytes), samples[-1][0])
    enc = sum(float(l["shipped"]) - float(l["computed"]) for l in ls)
    out.update(pass_ms=round((t1 - t0) * 1e3, 3), wire_mb=round(nbytes / 1e6, 3),
               hidden=round(min(got(t1), nbytes) / nbytes, 3) if nbytes else None,
               tail_ms=round(max(0.0, t_last - t1) * 1e3, 3), encode_pct=round(100 * enc / (t1 - t0), 2))
    if timeline:
        out["timeline"] = [{"layer": int(l["layer"]), "computed_ms": round((float(l["computed"]) - t0) * 1e3, 3),
                            "shipped_ms": round((float(l["shipped"]) - t0) * 1e3, 3),
                            "handed_to_mpi_mb": round(int(l["bytes"]) / 1e6, 3),
                            "at_decode_host_mb": round(got(float(l["computed"])) / 1e6, 3)} for l in ls]
        out["timeline"].append({"pass_end_ms": round((t1 - t0) * 1e3, 3), "at_decode_host_mb": round(got(t1) / 1e6, 3),
                                "last_byte_ms": round((t_last - t0) * 1e3, 3)})
print(json.dumps(out))
PY
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
        raw) pargs="--kv-dtype f32 --kv-compress none $PREFILL_ARGS" ;;
        *) echo "run_hosts_kv.sh: unknown wire option $wire" >&2; exit 2 ;;
        esac
        start_jobs "$m" "$pargs"
        python3 "$here/bench/netsample.py" "${PREFIX}v3" tx "$W/wire" 1 &
        SAMPLER=$!
        for _ in $(seq 1 100); do [ -s "$W/wire" ] && break; sleep 0.05; done
        warm=1
        for rate in $LINKS $RATES; do
            for h in h2 h3; do "$EMU" shape "$P" "$h" "$([ "$rate" = unshaped ] && echo none || echo "$rate")"; done
            for n in $PROMPTS; do
                [ $warm -eq 0 ] || ttft "$ADDR" "$n" 0 >/dev/null # once per job and prompt length
                runs=$(for r in $(seq 1 "$REPS"); do traced "$n" "$r"; done | jq -cs .)
                med=$(echo "$runs" | jq -r '.[].ttft_ms' | median)
                # the run whose TTFT is the median (REPS odd) or the one just above it
                mid=$(echo "$runs" | jq -c --argjson med "$med" 'sort_by(.ttft_ms) | map(select(.ttft_ms >= $med)) | .[0]')
                emit "$(jq -cn --arg model "$model" --arg wire "$wire" --arg link "$rate" --argjson n "$n" --argjson runs "$runs" \
                    --argjson med "$med" --argjson ref "${ref[$n]}" --argjson mid "$mid" \
                    '{model:$model, mode:"disaggregated", wire:$wire, link:$link, prompt_tokens:$n,
                      ttft_ms:($runs|map(.ttft_ms)), ttft_ms_median:$med, colocated_ttft_ms:$ref,
                      transfer_share:((($med-$ref)/$med*1000|round)/1000)} + ($mid|del(.ttft_ms))')"
            done
            warm=0
        done
        kill -TERM "$SAMPLER" 2>/dev/null || true
        wait "$SAMPLER" 2>/dev/null || true
        SAMPLER=""
        stop_job
    done
done
echo "]" >>"$OUT"
echo "results: $OUT" >&2
jq -r '.[] | select(.mode=="disaggregated") | [.model, .wire, .link, .prompt_tokens, .ttft_ms_median, .colocated_ttft_ms,
    .transfer_share, .wire_mb, .pass_ms, .hidden, .tail_ms, .encode_pct] | @tsv' "$OUT" |
    (echo -e "model\twire\tlink\tprompt\tttft_ms\tcoloc_ms\tshare\twire_mb\tpass_ms\thidden\ttail_ms\tencode%"; cat) | column -t
