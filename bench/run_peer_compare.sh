#!/usr/bin/env bash
# run_peer_compare.sh - kvrelay against llama.cpp and llama2.c on the same weights, in the
# same run, interleaved (issue 13's evidence). Never a dependency of the product: the
# peers are used only when their binaries are present (built from their own sources
# outside the repo, e.g. under /work/peers; see docs/PERFORMANCE.md), and each missing
# one is named and skipped.
#
# What runs, per round and per weight type (f32 f16 bf16 q8_0 by default), in turn:
#   kvrelay bench engine --json    prefill 128/512, decode at batch 1/8/32 (from position 128),
#                                  and this run's read-bandwidth and sgemm ceilings
#                                  (weights as its default: a copy in huge pages, what a
#                                  node alone on its host runs with --weights auto)
#   kvrelay bench engine --decode-only --decode-ctx 1 --reps 2
#                                  batch-1 decode from position 1, as llama-bench's tg64
#                                  (batch 1 also against a probe of its own weights just
#                                  before and after each repetition: the paired fraction)
#   kvrelay bench engine --decode-only --kv-type f16
#                                  decode at batch 1/8/32 with an f16 KV cache, llama.cpp's
#                                  default cache type: batch 32 like for like
#   kvrelay bench engine --ceilings-only
#                                  the read ceiling just before llama-bench (the memory mode
#                                  its run sees; the batch-1 pairs table uses it)
#   llama-bench                    pp512 and tg64 (llama.cpp's own prompt / generation test),
#                                  with its weights mmapped and not (-mmp 0,1): the better
#                                  of the two is its number
#   llama-batched-bench            decode of 1 and 32 parallel sequences after 128-token prompts
#   llama2.c run (OpenMP build)    256 tokens, f32 only (its own format, the same weights)
#   at context 2048 (CTX2048=1, the default): kvrelay bench engine --decode-only
#                                  --decode-ctx 2048 --kv-type f16 (batch 1) against
#                                  llama-batched-bench -npp 2048 -ntg 32 -npl 1 (its KV
#                                  cache is f16 by default): f16 KV on both sides
# then a table of medians over the rounds with the ratios, and kvrelay's batch-1 decode as
# a fraction of the bandwidth ceiling measured in the same round.
#
# Weights: the 110M shape from `kvrelay synth-model` (llama2.c format, what llama2.c
# reads), converted to GGUF by llama.cpp's convert-llama2c-to-ggml and quantized by
# llama-quantize, so all three read the same numbers. TINYLLAMA=1 adds the TinyLlama
# 1.1B shape (GQA 32/4; 4.4 GB at f32, slow). llama.cpp's convert-llama2c-to-ggml (build
# of 2025-02) works in a fixed 2 GiB ggml context and aborts on the 4.4 GB file: our peer
# build raises its params.mem_model_gb from 2 to 8 (a local edit of the peer, not ours).
#
# Environment: KVR (kvrelay binary, default build/bin/kvrelay), PEERS (/work/peers),
# MODELS (/tmp/kvrelay-bench-models), OUT (/tmp/kvrelay-peer-compare), ROUNDS (2),
# TYPES ("f32 f16 bf16 q8_0"), THREADS (2), TINYLLAMA (0), SHAPES (the shapes to run,
# e.g. "1.1b" alone; default 110m, or "110m 1.1b" with TINYLLAMA=1).
# Run it alone on the machine (e.g. `flock -x /tmp/kvr-cpu.lock bench/run_peer_compare.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."

KVR=${KVR:-build/bin/kvrelay}
PEERS=${PEERS:-/work/peers}
MODELS=${MODELS:-/tmp/kvrelay-bench-models}
OUT=${OUT:-/tmp/kvrelay-peer-compare}
ROUNDS=${ROUNDS:-2}
TYPES=${TYPES:-"f32 f16 bf16 q8_0"}
THREADS=${THREADS:-2}
TINYLLAMA=${TINYLLAMA:-0}
CTX2048=${CTX2048:-1}
SHARED=$(cd .. && pwd)/shared
TOKENIZER=$SHARED/models/llama2_tokenizer.bin
LCPP=$PEERS/llama.cpp/build/bin
L2C=$PEERS/llama2.c

[ -x "$KVR" ] || { echo "run_peer_compare: no kvrelay binary at $KVR (scripts/build.sh)" >&2; exit 1; }
mkdir -p "$MODELS/gguf" "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.jsonl "$OUT"/*.txt

have_lcpp=1; have_l2c=1
for b in llama-bench llama-batched-bench llama-convert-llama2c-to-ggml llama-quantize; do
    [ -x "$LCPP/$b" ] || { echo "run_peer_compare: $LCPP/$b missing: llama.cpp skipped" >&2; have_lcpp=0; }
done
[ -x "$L2C/runomp" ] || { echo "run_peer_compare: $L2C/runomp missing (gcc -Ofast -fopenmp -march=native run.c -lm -o runomp): llama2.c skipped" >&2; have_l2c=0; }

# shape name -> synth-model arguments
declare -A SHAPE=(
    [110m]="--dim 768 --hidden 2048 --layers 12 --heads 12 --vocab 32000 --seq-len 2048"
    [1.1b]="--dim 2048 --hidden 5632 --layers 22 --heads 32 --kv-heads 4 --vocab 32000 --seq-len 2048 --shared-classifier=0"
)
declare -A FILE=([110m]=synth-110m.bin [1.1b]=synth-tinyllama-1.1b.bin)
shapes=${SHAPES:-110m}
[ "$TINYLLAMA" = 1 ] && [ -z "${SHAPES:-}" ] && shapes="110m 1.1b"

for s in $shapes; do
    bin=$MODELS/${FILE[$s]}
    [ -f "$bin" ] || "$KVR" synth-model --out "$bin" ${SHAPE[$s]}
    if [ $have_lcpp = 1 ]; then
        g=$MODELS/gguf/$s-f32.gguf
        [ -f "$g" ] || "$LCPP/llama-convert-llama2c-to-ggml" --copy-vocab-from-model "$TOKENIZER" \
            --llama2c-model "$bin" --llama2c-output-model "$g" > "$OUT/convert-$s.log" 2>&1
        for t in $TYPES; do
            [ "$t" = f32 ] && continue
            q=$MODELS/gguf/$s-$t.gguf
            [ -f "$q" ] || "$LCPP/llama-quantize" "$g" "$q" "$(echo "$t" | tr a-z A-Z)" "$THREADS" > "$OUT/quantize-$s-$t.log" 2>&1
        done
    fi
done

for r in $(seq 1 "$ROUNDS"); do
    for s in $shapes; do
        for t in $TYPES; do
            g=$MODELS/gguf/$s-$t.gguf
            [ -f "$g" ] || { echo "run_peer_compare: $g missing (needs llama.cpp to convert): skipped" >&2; continue; }
            ctx=$([ "$s" = 110m ] && echo 1024 || echo 2048)
            echo "round $r: $s $t: kvrelay" >&2
            "$KVR" bench engine --models 260k --bundled-model "$g" --context "$ctx" --reps 1 \
                --threads "$THREADS" --json > "$OUT/kvr-$s-$t-$r.json"
            echo "round $r: $s $t: kvrelay decode from position 1 (tg64's positions)" >&2
            "$KVR" bench engine --models 260k --bundled-model "$g" --context "$ctx" --reps 2 --decode-only \
                --decode-ctx 1 --threads "$THREADS" --json > "$OUT/kvs-$s-$t-$r.json"
            echo "round $r: $s $t: kvrelay decode with an f16 KV cache (llama.cpp's default)" >&2
            "$KVR" bench engine --models 260k --bundled-model "$g" --context "$ctx" --reps 1 --decode-only \
                --kv-type f16 --threads "$THREADS" --json > "$OUT/kvf-$s-$t-$r.json"
            if [ $have_lcpp = 1 ]; then
                # The memory mode llama-bench's run sees (this VM's bandwidth moves
                # between ~35 and ~70 GB/s from minute to minute): a probe just before it.
                "$KVR" bench engine --ceilings-only --threads "$THREADS" --json > "$OUT/lbc-$s-$t-$r.json"
                echo "round $r: $s $t: llama-bench" >&2
                "$LCPP/llama-bench" -m "$g" -p 512 -n 64 -t "$THREADS" -r 2 -mmp 0,1 -o json \
                    > "$OUT/lb-$s-$t-$r.json" 2> "$OUT/lb-$s-$t-$r.err"
                echo "round $r: $s $t: llama-batched-bench" >&2
                "$LCPP/llama-batched-bench" -m "$g" -c 8192 -b 2048 -ub 512 -npp 128 -ntg 32 -npl 1,32 \
                    -t "$THREADS" --output-format jsonl > "$OUT/bb-$s-$t-$r.jsonl" 2> "$OUT/bb-$s-$t-$r.err"
            fi
            if [ "$CTX2048" = 1 ]; then
                echo "round $r: $s $t: kvrelay at context 2048 (f16 KV)" >&2
                "$KVR" bench engine --models 260k --bundled-model "$g" --context 2304 --reps 1 --decode-only \
                    --decode-ctx 2048 --kv-type f16 --threads "$THREADS" --json > "$OUT/kvc-$s-$t-$r.json"
                if [ $have_lcpp = 1 ]; then
                    echo "round $r: $s $t: llama-batched-bench at context 2048" >&2
                    "$LCPP/llama-batched-bench" -m "$g" -c 4096 -b 2048 -ub 512 -npp 2048 -ntg 32 -npl 1 \
                        -t "$THREADS" --output-format jsonl > "$OUT/bc-$s-$t-$r.jsonl" 2> "$OUT/bc-$s-$t-$r.err"
                fi
            fi
            if [ $have_l2c = 1 ] && [ "$t" = f32 ]; then
                echo "round $r: $s $t: llama2.c" >&2
                OMP_NUM_THREADS=$THREADS "$L2C/runomp" "$MODELS/${FILE[$s]}" -z "$TOKENIZER" -t 0 -n 256 \
                    -i "Once upon a time" > "$OUT/l2c-$s-$r.txt" 2>&1 || true
            fi
        done
    done
done

python3 - "$OUT" <<'EOF'
import glob, json, os, re, statistics, sys
out = sys.argv[1]
def med(v): return statistics.median(v) if v else None
rows = {}
def add(key, val):
    if val is not None: rows.setdefault(key, []).append(val)
bw_all = []
for f in sorted(glob.glob(os.path.join(out, "kvr-*.json"))):
    s, t, r = re.match(r".*/kvr-(.+?)-(.+)-(\d+)\.json$", f).groups()
    j = json.load(open(f))
    bw_all.append(j["bw_gbs"])
    add((s, t, "kernel"), j.get("kernel"))
    for x in j["results"]:
        if x["phase"] == "prefill" and x["prompt_len"] == 512: add((s, t, "kvr_pp512"), x["prefill_tok_s"])
        if x["phase"] == "decode":
            add((s, t, "kvr_tg_b%d" % x["batch"]), x["decode_tok_s"])
            if x["batch"] == 1: add((s, t, "kvr_bw_frac"), x["decode_bw_fraction"])
    add((s, t, "bw"), j["bw_gbs"])
# Batch 1 from position 1 (two repetitions of 64 steps, the better): the positions of
# llama-bench's tg64, which starts from an empty context.
for f in sorted(glob.glob(os.path.join(out, "kvs-*.json"))):
    s, t, r = re.match(r".*/kvs-(.+?)-(.+)-(\d+)\.json$", f).groups()
    for x in json.load(open(f))["results"]:
        if x["phase"] == "decode" and x["batch"] == 1:
            add((s, t, "kvr_tg_pos1"), x["decode_tok_s"])
            add((s, t, "kvr_bw_frac_pos1"), x["decode_bw_fraction"])
            add((s, t, "kvr_bw_paired_pos1"), x.get("decode_bw_fraction_paired"))
for f in sorted(glob.glob(os.path.join(out, "kvf-*.json"))):
    s, t, r = re.match(r".*/kvf-(.+?)-(.+)-(\d+)\.json$", f).groups()
    for x in json.load(open(f))["results"]:
        if x["phase"] == "decode" and x["batch"] == 32: add((s, t, "kvr_tg_b32_f16kv"), x["decode_tok_s"])
for f in sorted(glob.glob(os.path.join(out, "lb-*.json"))):
    s, t, r = re.match(r".*/lb-(.+?)-(.+)-(\d+)\.json$", f).groups()
    try: j = json.load(open(f))
    except Exception: continue
    # Its better of mmap on and off (-mmp 0,1), per test and round.
    pp = [x["avg_ts"] for x in j if x.get("n_prompt") == 512 and x.get("n_gen") == 0]
    tg = [x["avg_ts"] for x in j if x.get("n_gen") == 64 and x.get("n_prompt") == 0]
    if pp: add((s, t, "lcpp_pp512"), max(pp))
    if tg: add((s, t, "lcpp_tg"), max(tg))
for f in sorted(glob.glob(os.path.join(out, "bb-*.jsonl"))):
    s, t, r = re.match(r".*/bb-(.+?)-(.+)-(\d+)\.jsonl$", f).groups()
    for line in open(f):
        line = line.strip()
        if not line.startswith("{"): continue
        x = json.loads(line)
        if "speed_tg" in x: add((s, t, "lcpp_bb_b%d" % x["pl"]), x["speed_tg"])
for f in sorted(glob.glob(os.path.join(out, "kvc-*.json"))):
    s, t, r = re.match(r".*/kvc-(.+?)-(.+)-(\d+)\.json$", f).groups()
    for x in json.load(open(f))["results"]:
        if x["phase"] == "decode" and x["batch"] == 1: add((s, t, "kvr_tg2048"), x["decode_tok_s"])
for f in sorted(glob.glob(os.path.join(out, "bc-*.jsonl"))):
    s, t, r = re.match(r".*/bc-(.+?)-(.+)-(\d+)\.jsonl$", f).groups()
    for line in open(f):
        line = line.strip()
        if line.startswith("{") and "speed_tg" in line: add((s, t, "lcpp_tg2048"), json.loads(line)["speed_tg"])
for f in sorted(glob.glob(os.path.join(out, "l2c-*.txt"))):
    s, r = re.match(r".*/l2c-(.+?)-(\d+)\.txt$", f).groups()
    m = re.search(r"achieved tok/s: ([0-9.]+)", open(f).read())
    if m: add((s, "f32", "l2c_tg"), float(m.group(1)))
def g(s, t, k):
    v = rows.get((s, t, k))
    if not v: return None
    return v[0] if isinstance(v[0], str) else med(v)
def fmt(v, d=1): return "-" if v is None else ("%.*f" % (d, v))
def ratio(a, b): return None if a is None or b is None or b == 0 else a / b
print("# kvrelay vs llama.cpp vs llama2.c, medians of %d round(s); read-bandwidth ceiling per round: %s GB/s"
      % (max(1, len(bw_all) // max(1, len({(k[0], k[1]) for k in rows}))), ", ".join("%.1f" % b for b in bw_all)))
print("kvr tg B=1: batch-1 decode from position 1 (llama-bench tg64's positions; llama2.c's run starts there too);")
print("kvr tg B=1 @128: the same from position 128 (the engine benchmark's default). Ceiling fractions: both, against")
print("the best probe of the run; paired: against the probes of the step's own weights next to each repetition.")
print("kvr B=32: kvrelay's default f32 KV cache; (f16 KV): the cache type llama.cpp's batched-bench runs with.")
print("| shape | type | kernel | kvr tg B=1 | llama.cpp tg | llama2.c tg | vs llama.cpp | vs llama2.c | ceiling fraction | paired | kvr tg B=1 @128 | fraction @128 | kvr pp512 | llama.cpp pp512 | pp ratio | kvr B=32 | kvr B=32 (f16 KV) | llama.cpp B=32 | B=32 ratio | ratio (f16 KV) |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
def pct(v): return "-" if v is None else "%.0f%%" % (100 * v)
for (s, t) in sorted({(k[0], k[1]) for k in rows}):
    kt, lt, ct = g(s, t, "kvr_tg_pos1"), g(s, t, "lcpp_tg"), g(s, t, "l2c_tg")
    k128 = g(s, t, "kvr_tg_b1")
    kp, lp = g(s, t, "kvr_pp512"), g(s, t, "lcpp_pp512")
    k32, l32, k32h = g(s, t, "kvr_tg_b32"), g(s, t, "lcpp_bb_b32"), g(s, t, "kvr_tg_b32_f16kv")
    print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        s, t, g(s, t, "kernel") or "-", fmt(kt), fmt(lt), fmt(ct), fmt(ratio(kt, lt), 2), fmt(ratio(kt, ct), 2),
        pct(g(s, t, "kvr_bw_frac_pos1")), pct(g(s, t, "kvr_bw_paired_pos1")), fmt(k128), pct(g(s, t, "kvr_bw_frac")),
        fmt(kp), fmt(lp), fmt(ratio(kp, lp), 2), fmt(k32), fmt(k32h), fmt(l32), fmt(ratio(k32, l32), 2),
        fmt(ratio(k32h, l32), 2)))
print()
# Batch 1 round by round, each side with the read ceiling probed next to its own run:
# a ratio means something only where both ran in the same memory mode (ceilings within
# 20% of each other).
pairs = {}
for f in sorted(glob.glob(os.path.join(out, "kvs-*.json"))):
    s, t, r = re.match(r".*/kvs-(.+?)-(.+)-(\d+)\.json$", f).groups()
    j = json.load(open(f))
    k = [x["decode_tok_s"] for x in j["results"] if x["phase"] == "decode" and x["batch"] == 1]
    try:
        lb = json.load(open(os.path.join(out, "lb-%s-%s-%s.json" % (s, t, r))))
        lbc = json.load(open(os.path.join(out, "lbc-%s-%s-%s.json" % (s, t, r))))
    except Exception:
        continue
    tg = [x["avg_ts"] for x in lb if x.get("n_gen") == 64 and x.get("n_prompt") == 0]
    pf = [x.get("decode_bw_fraction_paired") for x in j["results"] if x["phase"] == "decode" and x["batch"] == 1]
    if k and tg: pairs[(s, t, int(r))] = (k[0], j["bw_gbs_min"], j["bw_gbs"], max(tg), lbc["bw_gbs"], pf[0] if pf else None)
if pairs:
    print("| shape | type | round | kvr tg B=1 | its ceilings (GB/s) | paired fraction | llama.cpp tg | ceiling before it | same mode | ratio |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    same = {}
    for (s, t, r), (k, kb0, kb1, l, lc, pf) in sorted(pairs.items()):
        ok = abs(lc - kb1) <= 0.2 * kb1 or abs(lc - kb0) <= 0.2 * kb0
        if ok: same.setdefault((s, t), []).append(k / l)
        print("| %s | %s | %d | %.1f | %.1f-%.1f | %s | %.1f | %.1f | %s | %.2f |" % (s, t, r, k, kb0, kb1, pct(pf), l, lc,
              "yes" if ok else "no", k / l))
    for (s, t), v in sorted(same.items()):
        print("%s %s: batch 1 vs llama.cpp in the same memory mode, %d round(s): median %.2fx (%s)" % (
            s, t, len(v), med(v), ", ".join("%.2f" % x for x in v)))
    print()
print("| shape | type | kvr tg B=1 @2048 (f16 KV) | llama.cpp tg B=1 @2048 (f16 KV) | ratio |")
print("| --- | --- | ---: | ---: | ---: |")
for (s, t) in sorted({(k[0], k[1]) for k in rows}):
    a, b = g(s, t, "kvr_tg2048"), g(s, t, "lcpp_tg2048")
    if a is None and b is None: continue
    print("| %s | %s | %s | %s | %s |" % (s, t, fmt(a), fmt(b), fmt(ratio(a, b), 2)))
EOF
