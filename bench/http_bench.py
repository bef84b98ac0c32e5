#!/usr/bin/python3
"""http_bench.py - what the HTTP front end costs against gRPC (issue 10), and what scraping
/metrics costs: a benchmark, not a test (docs/PERFORMANCE.md, "HTTP front end").

Starts one local cluster (`kvrelay up`), then, in ROUNDS interleaved rounds, runs STREAMS
concurrent greedy streams of TOKENS tokens each through gRPC (grpcio, raw protobuf bytes)
and through HTTP (SSE over http.client), and reports client-side TTFT p50/p90 and the
per-token time (last token - first token) / (tokens - 1) for each path. Then it runs the
HTTP load again with and without a scraper reading /metrics every 100 ms and reports the
token throughput of both. Both clients are Python threads in one process, so client-side
costs weigh on both paths alike.

Usage: bench/http_bench.py [BIN_DIR] (default build/bin); env STREAMS (16), TOKENS (128),
ROUNDS (5), SCRAPE_S (6)."""
import http.client
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "bin")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
STREAMS = int(os.environ.get("STREAMS", 16))
TOKENS = int(os.environ.get("TOKENS", 128))
ROUNDS = int(os.environ.get("ROUNDS", 5))
SCRAPE_S = float(os.environ.get("SCRAPE_S", 6))
PROMPT = "Once upon a time"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def varint(v):
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def generate_request():
    p = PROMPT.encode()
    # prompt (1), max_tokens (3), temperature (4) = 0, ignore_eos (7) = true
    return b"\x0a" + varint(len(p)) + p + b"\x18" + varint(TOKENS) + b"\x38\x01"


def grpc_one(stub, out):
    t0 = time.perf_counter()
    times = []
    for _ in stub(generate_request(), timeout=120):
        times.append(time.perf_counter())
    # The last message is the final one (done, no token).
    out.append((times[0] - t0, times[-2] - times[0], len(times) - 1))


def http_one(port, out, stop_at=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
                       "stream": True})
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    times = []
    buf = b""
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            if line.startswith(b"data: [DONE]"):
                break
            j = json.loads(line[6:])
            if j["choices"] and j["choices"][0]["text"]:
                times.append(time.perf_counter())
        buf = line
    c.close()
    del buf
    # SSE events carry the text that was safe to send: with no stop strings, one per token.
    out.append((times[0] - t0, times[-1] - times[0], len(times)))


def run(kind, gport, hport):
    out = []
    if kind == "grpc":
        ch = grpc.insecure_channel("127.0.0.1:%d" % gport)
        stub = ch.unary_stream("/kvrelay.v1.Inference/Generate")
        th = [threading.Thread(target=grpc_one, args=(stub, out)) for _ in range(STREAMS)]
    else:
        th = [threading.Thread(target=http_one, args=(hport, out)) for _ in range(STREAMS)]
    t0 = time.perf_counter()
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.perf_counter() - t0
    if kind == "grpc":
        ch.close()
    return out, wall


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    gport, hport = free_port(), free_port()
    up = subprocess.Popen([os.path.join(BIN, "kvrelay"), "up", "--model", os.path.join(SHARED, "models",
                           "stories260K.bin"), "--tokenizer", os.path.join(SHARED, "models", "tok512.bin"),
                           "--port", str(gport), "--http-port", str(hport)], stdout=subprocess.PIPE)
    try:
        out = b""
        while b"ready at" not in out:
            r, _, _ = select.select([up.stdout], [], [], 120)
            if not r:
                raise SystemExit("not ready")
            out += os.read(up.stdout.fileno(), 4096)
        run("grpc", gport, hport)  # warm-up
        run("http", gport, hport)
        res = {"grpc": [], "http": []}
        for _ in range(ROUNDS):
            for kind in ("grpc", "http"):
                o, _ = run(kind, gport, hport)
                res[kind] += o
        for kind in ("grpc", "http"):
            ttft = [x[0] * 1e3 for x in res[kind]]
            tpot = [x[1] / (x[2] - 1) * 1e3 for x in res[kind] if x[2] > 1]
            print("%-4s streams=%d tokens=%d n=%d  TTFT p50 %.2f ms p90 %.2f ms  per-token p50 %.3f ms mean %.3f ms"
                  % (kind, STREAMS, TOKENS, len(ttft), pct(ttft, 0.5), pct(ttft, 0.9), pct(tpot, 0.5),
                     statistics.mean(tpot)))

        # /metrics every 100 ms under load: tokens per second with and without.
        def load(seconds, scrape):
            stop = time.perf_counter() + seconds
            n_tok = [0]
            n_scr = [0]
            done = threading.Event()

            def scraper():
                while not done.is_set():
                    c = http.client.HTTPConnection("127.0.0.1", hport, timeout=10)
                    c.request("GET", "/metrics")
                    c.getresponse().read()
                    c.close()
                    n_scr[0] += 1
                    done.wait(0.1)

            def worker():
                while time.perf_counter() < stop:
                    o = []
                    http_one(hport, o)
                    n_tok[0] += o[0][2]

            ts = [threading.Thread(target=worker) for _ in range(STREAMS)]
            s = threading.Thread(target=scraper) if scrape else None
            t0 = time.perf_counter()
            if s:
                s.start()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            done.set()
            if s:
                s.join()
            return n_tok[0] / (time.perf_counter() - t0), n_scr[0]

        rates = {False: [], True: []}
        for _ in range(3):
            for scrape in (False, True):
                r, n = load(SCRAPE_S / 3, scrape)
                rates[scrape].append(r)
        a, b = statistics.mean(rates[False]), statistics.mean(rates[True])
        print("metrics scrape every 100 ms: %.0f tok/s without, %.0f tok/s with (%+.2f%%)" % (a, b,
                                                                                              (b - a) / a * 100))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


if __name__ == "__main__":
    main()
