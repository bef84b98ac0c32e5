#!/usr/bin/env python3
"""test_bench_engine.py - `kvrelay bench engine --json` keeps its word: the numbers it
prints are consistent with each other (recomputed here from the fields it reports), it
names the kernel it ran, `--ceilings-only` measures the ceilings and no model, and a bad
--models list is a usage error (exit 2). No speed is asserted.

usage: test_bench_engine.py <dir of the kvrelay binary> <shared dir>
"""
import json
import os
import subprocess
import sys
import tempfile

BIN, SHARED = sys.argv[1], sys.argv[2]
KVR = os.path.join(BIN, "kvrelay")
failed = 0


def check(cond, what):
    global failed
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failed += 1


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def run(args):
    p = subprocess.run([KVR, "bench", "engine"] + args, capture_output=True, text=True, timeout=240)
    return p.returncode, p.stdout, p.stderr


# --ceilings-only: the probes once, no model, no rows.
rc, out, err = run(["--ceilings-only", "--threads", "2", "--json"])
check(rc == 0, "--ceilings-only exits 0 (%d: %s)" % (rc, err.strip()[-200:]))
j = json.loads(out)
check(j["bw_gbs"] > 0 and j["sgemm_gflops"] > 0, "ceilings measured: %.1f GB/s, %.1f GFLOP/s" % (j["bw_gbs"], j["sgemm_gflops"]))
check(j["ceiling_runs"] == 1 and j["bw_gbs_min"] == j["bw_gbs"], "one ceiling run")
check(j["models"] == [] and j["results"] == [], "no model, no rows")
check(j["kernel"] in ("avx512", "avx2", "scalar"), "kernel named: %s" % j["kernel"])

# The bundled model, decode only: every row's derived numbers from its own fields.
with tempfile.TemporaryDirectory(prefix="kvr-bench-engine-") as d:
    rc, out, err = run(["--models", "260k", "--quick", "--threads", "2", "--json", "--decode-only",
                        "--models-dir", d, "--bundled-model", os.path.join(SHARED, "models/stories260K.bin")])
check(rc == 0, "bundled model decode-only exits 0 (%d: %s)" % (rc, err.strip()[-200:]))
j = json.loads(out)
check(j["ceiling_runs"] == 2, "ceilings before and after the model (%d)" % j["ceiling_runs"])
check(j["bw_gbs_min"] <= j["bw_gbs"], "lowest ceiling <= best")
m = j["models"][0] if j["models"] else {}
check(m.get("model") == "stories260K" and m.get("model_params", 0) > 250000, "model reported: %s" % m.get("model"))
# stories260K: 5 layers, kv_dim 32, f32 cache: 2 * 5 * 32 * 4 bytes per token.
check(m.get("kv_bytes_per_token") == 1280, "KV bytes per token 1280 (%s)" % m.get("kv_bytes_per_token"))
rows = [r for r in j["results"] if r["phase"] == "decode"]
check(sorted(r["batch"] for r in rows) == [1, 8, 32], "decode rows at batch 1, 8, 32")
check(not any(r["phase"] == "prefill" for r in j["results"]), "--decode-only: no prefill row")
for r in rows:
    B, tok = r["batch"], r["decode_tok_s"]
    check(tok > 0 and r["decode_tok_s_median"] <= tok * (1 + 1e-6), "batch %d: best %.1f >= median %.1f tok/s" % (B, tok, r["decode_tok_s_median"]))
    # Bytes per step: the weights once plus every sequence's keys and values; the mean
    # number of keys lies between the context before the first timed step and after the last.
    kv = (r["bytes_per_step"] - m["weight_bytes_per_step"]) / (B * m["kv_bytes_per_token"])
    check(r["prompt_len"] <= kv <= r["prompt_len"] + r["decode_steps"] + 2,
          "batch %d: bytes per step = weights + %.1f keys per sequence (context %d)" % (B, kv, r["prompt_len"]))
    check(close(r["gbs"], r["bytes_per_step"] * tok / B / 1e9, 2e-3), "batch %d: GB/s = bytes per step x steps/s" % B)
    check(close(r["decode_bw_fraction"], r["gbs"] / j["bw_gbs"], 2e-3), "batch %d: fraction = GB/s / best ceiling" % B)
    if B != 1:
        check("decode_bw_fraction_paired" not in r, "batch %d: no paired probes (batch 1 only)" % B)
        continue
    # Batch 1: a probe of the step's own weights before each repetition and after the
    # last; the paired fraction is the median of each repetition's GB/s over the larger
    # of its two neighbouring probes.
    reps, probes = r.get("rep_gbs", []), r.get("paired_probe_gbs", [])
    check(len(reps) == j["reps"] and len(probes) == len(reps) + 1 and min(probes + [1]) > 0,
          "batch 1: %d repetitions between %d probes of its own weights" % (len(reps), len(probes)))
    if reps and len(probes) == len(reps) + 1:
        fr = sorted(g / max(probes[i], probes[i + 1]) for i, g in enumerate(reps))
        med = fr[len(fr) // 2] if len(fr) % 2 else 0.5 * (fr[len(fr) // 2 - 1] + fr[len(fr) // 2])
        check(close(r["decode_bw_fraction_paired"], med, 2e-3),
              "batch 1: paired fraction %.4f = median of repetition / neighbouring probe" % r["decode_bw_fraction_paired"])
        check(close(max(reps), r["gbs"], 2e-3), "batch 1: the best repetition's GB/s is the row's (%.3f)" % max(reps))

# A model that is not one of the benchmark's: a usage error, nothing measured.
rc, out, err = run(["--models", "260k,nope", "--json"])
check(rc == 2 and "unknown model 'nope'" in err and out == "", "unknown --models entry: exit 2 (%d), named, no output" % rc)

print("test_bench_engine: %d failed" % failed)
sys.exit(1 if failed else 0)
