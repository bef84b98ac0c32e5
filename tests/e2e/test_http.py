#!/usr/bin/python3
"""test_http.py - the coordinator's HTTP API, /metrics and grpc.health.v1 end to end (issue 10),
against independent clients: the official `openai` npm package (http_openai.cjs), curl for the
raw SSE bytes and error statuses, Python's prometheus_client text parser for /metrics, and
grpcio for grpc.health.v1.Health. One real cluster (`kvrelay up`: mpirun, a prefill and a decode
process, the decode node's test build failing one chosen seed mid-stream).

Usage: test_http.py BIN_DIR SHARED_DIR SOURCE_DIR. Waits on state (lines, HTTP answers,
metric values) with deadlines, never on sleeps. The openai part installs the package with npm
into ~/.cache/kvrelay-http-node (KVR_NPM_CACHE) once; if npm cannot reach its registry the
test prints why and skips only that part."""
import glob
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

BIN, SHARED, SRC = sys.argv[1], sys.argv[2], sys.argv[3]
FAIL_SEED = 777  # the decode node's test build fails this seed at its 4th step
failures = 0


def check(cond, what, detail=None):
    global failures
    if cond:
        print("ok   " + what, flush=True)
    else:
        failures += 1
        print("FAIL " + what + ("" if detail is None else ": " + str(detail)[:600]), flush=True)


def free_ports(n):
    """n distinct TCP ports that were free a moment ago (held together, so never the same)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def curl(args, body=None, timeout=60):
    """curl -s with -w status; returns (status, body bytes, headers text)."""
    cmd = ["curl", "-sS", "-D", "-", "--max-time", str(timeout)] + args
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    p = subprocess.run(cmd, input=body if isinstance(body, (bytes, type(None))) else body.encode(),
                       capture_output=True, timeout=timeout + 10)
    raw = p.stdout
    head, _, rest = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # "Expect: 100-continue" answered first
        head, _, rest = rest.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return status, rest, head.decode("latin-1")


def cluster_env():
    """The environment of `kvrelay up`, as tests/e2e/cluster_harness.c gives it: under ASan
    every rank is leak-checked at exit and up's stop fails on a leak; the MPI stack's own
    leaks are suppressed (tests/lsan_mpi.supp), which needs full unwinding and plugins kept
    loaded so that every frame has a name."""
    env = dict(os.environ)
    asan = env.get("ASAN_OPTIONS", "")
    env["ASAN_OPTIONS"] = asan + (":" if asan else "") + "fast_unwind_on_malloc=0:malloc_context_size=16"
    env["LSAN_OPTIONS"] = "suppressions=%s:print_suppressions=0" % os.path.join(SRC, "tests", "lsan_mpi.supp")
    env["OMPI_MCA_mca_base_component_disable_dlclose"] = "1"
    env["PMIX_MCA_mca_base_component_disable_dlclose"] = "1"
    return env


def start_cluster():
    """`kvrelay up` on free ports; returns (process, grpc port, http port). Another program
    may take a port between the choice and the bind (the machine is shared): then the
    cluster exits before it is ready, and it is started again on other ports (3 tries)."""
    model = os.path.join(SHARED, "models", "stories260K.bin")
    tok = os.path.join(SHARED, "models", "tok512.bin")
    for attempt in range(3):
        port, hport = free_ports(2)
        up = subprocess.Popen([os.path.join(BIN, "kvrelay"), "up", "--model", model, "--tokenizer", tok, "--port",
                               str(port), "--http-port", str(hport), "--decode-args",
                               "--fault-step-fail-seed %d" % FAIL_SEED], stdout=subprocess.PIPE,
                              env=cluster_env())
        out = b""
        deadline = time.monotonic() + 120
        while b"ready at" not in out:
            r, _, _ = select.select([up.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                up.kill()
                up.wait()
                raise SystemExit("the cluster did not get ready in 120 s: %r" % out)
            chunk = os.read(up.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
        if b"ready at" in out:
            print(out.decode().strip(), flush=True)
            check(("HTTP at http://127.0.0.1:%d" % hport).encode() in out, "kvrelay up prints the HTTP address")
            return up, port, hport
        rc = up.wait()
        print("kvrelay up exited before it was ready (exit %d, ports %d and %d; see its log above): trying "
              "other ports" % (rc, port, hport), flush=True)
    raise SystemExit("kvrelay up did not start three times")


def main():
    up, port, hport = start_cluster()
    base = "http://127.0.0.1:%d" % hport
    try:
        run_all(base, port)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            rc = up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            rc = up.wait()
        check(rc == 0, "kvrelay up stops cleanly (exit 0)", rc)
    if failures:
        print("%d checks failed" % failures)
        sys.exit(1)
    print("all HTTP checks passed")


def metrics(base):
    from prometheus_client.parser import text_string_to_metric_families
    st, body, head = curl([base + "/metrics"])
    assert st == 200, (st, body)
    vals = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            key = s.name + "{" + ",".join("%s=%s" % kv for kv in sorted(s.labels.items()) if kv[0] != "model_name") + "}"
            vals[key] = s.value
    return vals, head


def wait_metric(base, pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        m, _ = metrics(base)
        if pred(m):
            return m
        if time.monotonic() > deadline:
            check(False, what, {k: v for k, v in m.items() if "bucket" not in k})
            return m
        # Poll the state again: the router publishes its snapshot every few milliseconds.
        select.select([], [], [], 0.02)


def run_all(base, grpc_port):
    model = "stories260K.bin"

    # ---- /health, /v1/models --------------------------------------------------------------
    st, body, _ = curl([base + "/health"])
    check(st == 200 and json.loads(body)["status"] == "ok", "GET /health is 200 while serving", body)
    st, body, _ = curl([base + "/v1/models"])
    j = json.loads(body)
    check(st == 200 and j["data"][0]["id"] == model and j["data"][0]["max_model_len"] == 512,
          "GET /v1/models: the model and its context", j)

    # ---- the openai npm package ------------------------------------------------------------
    golden = []
    for p in sorted(glob.glob(os.path.join(SHARED, "golden", "greedy_*.txt"))):
        d = {}
        for line in open(p, encoding="utf-8"):
            if line.startswith("prompt:"):
                d["prompt"] = line[len("prompt:"):].rstrip("\n").lstrip(" ")
            elif line.startswith("text: "):
                d["text"] = line[len("text: "):].rstrip("\n").replace("\\n", "\n")
        golden.append(d)
    check(len(golden) >= 5, "five golden runs found")
    cache = os.environ.get("KVR_NPM_CACHE", os.path.expanduser("~/.cache/kvrelay-http-node"))
    pkg = os.path.join(cache, "node_modules", "openai", "package.json")
    if not os.path.exists(pkg):
        os.makedirs(cache, exist_ok=True)
        r = subprocess.run(["npm", "install", "--prefix", cache, "--no-audit", "--no-fund", "--loglevel=error",
                            "openai@4"], capture_output=True, timeout=300)
        if r.returncode != 0:
            print("SKIP the openai npm checks: npm cannot install the openai package (%s)" %
                  r.stderr.decode()[-300:].strip(), flush=True)
    if os.path.exists(pkg):
        env = dict(os.environ, KVR_HTTP_BASE=base, KVR_MODEL=model, KVR_GOLDEN=json.dumps(golden),
                   NODE_PATH=os.path.join(cache, "node_modules"))
        r = subprocess.run(["node", os.path.join(SRC, "tests", "e2e", "http_openai.cjs")], env=env,
                           capture_output=True, timeout=300)
        sys.stdout.write(r.stdout.decode())
        check(r.returncode == 0, "the openai npm client checks pass", r.stderr.decode()[-800:])

    # ---- raw SSE bytes (curl -N) ------------------------------------------------------------
    req = {"model": model, "prompt": golden[0]["prompt"], "max_tokens": 12, "temperature": 0, "stream": True,
           "stream_options": {"include_usage": True}}
    st, body, head = curl(["-N", base + "/v1/completions"], json.dumps(req))
    check(st == 200 and "content-type: text/event-stream" in head.lower(), "SSE: 200 and text/event-stream", head)
    events = body.split(b"\n\n")
    check(events[-1] == b"" and all(e.startswith(b"data: ") and b"\n" not in e for e in events[:-1]),
          "SSE: every event is one 'data: ...' line ended by a blank line", body[:400])
    check(events[-2] == b"data: [DONE]", "SSE: the stream ends with data: [DONE]", events[-2:])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    fin = chunks[-2]
    check(fin["choices"][0]["finish_reason"] == "length" and fin["choices"][0]["text"] == "",
          "SSE: a final chunk carries the finish reason", fin)
    check(chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12,
          "SSE: the usage chunk has choices [] and the usage", chunks[-1])
    check(all(c["usage"] is None for c in chunks[:-1]) and all(c["object"] == "text_completion" for c in chunks),
          "SSE: other chunks carry usage null (include_usage)", chunks[0])
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    check(golden[0]["text"][len(golden[0]["prompt"]):].startswith(text) and len(text) > 20,
          "SSE: the streamed text is the golden text", text)
    req.pop("stream_options")
    st, body, _ = curl(["-N", base + "/v1/completions"], json.dumps(req))
    check(b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n"), "SSE: no usage without include_usage",
          body[-300:])

    # ---- errors: status and shape, and the server keeps serving -----------------------------
    cases = [
        ("/v1/completions", b'{"prompt": "x",', 400, None, "invalid_json"),
        ("/v1/completions", b'{"prompt": "x"} trailing', 400, None, "invalid_json"),
        ("/v1/completions", b'[1, 2]', 400, None, "invalid_type"),
        ("/v1/completions", b'{"prompt": 5}', 400, "prompt", "invalid_type"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "7"}', 400, "max_tokens", "invalid_type"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 1.5}', 400, "max_tokens", "invalid_type"),
        ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', 400, "temperature", "invalid_type"),
        ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400, "temperature", "invalid_value"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream", "invalid_type"),
        ("/v1/completions", b'{"prompt": "x", "stop": [1]}', 400, "stop", "invalid_type"),
        ("/v1/completions", b'{"prompt": "x", "stop": ["a","b","c","d","e"]}', 400, "stop", "invalid_value"),
        ("/v1/completions", b'{"prompt": "x", "frobnicate": 1}', 400, "frobnicate", "unsupported_field"),
        ("/v1/completions", b'{"prompt": "x", "n": 2}', 400, "n", "unsupported_value"),
        ("/v1/completions", b'{"prompt": "x", "logprobs": 0}', 400, "logprobs", "unsupported_value"),
        ("/v1/completions", b'{"prompt": "x", "echo": true}', 400, "echo", "unsupported_value"),
        ("/v1/completions", b'{"prompt": "x", "best_of": 2}', 400, "best_of", "unsupported_value"),
        ("/v1/completions", b'{"prompt": "x", "suffix": "y"}', 400, "suffix", "unsupported_value"),
        ("/v1/completions", b'{"prompt": "x", "presence_penalty": 0.5}', 400, "presence_penalty",
         "unsupported_value"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "prompt", "unsupported_value"),
        ("/v1/completions", b'{"prompt": [1, 99999]}', 400, "prompt", "invalid_value"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', 400, "max_tokens", "invalid_value"),
        ("/v1/completions", b'{"prompt": "x", "kv_policy": "lru"}', 400, "kv_policy", "invalid_value"),
        ("/v1/completions", b'{"prompt": "x", "kv_policy": "window", "kv_window": 9999}', 400, "kv_window",
         "invalid_value"),
        ("/v1/completions", b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options",
         "invalid_value"),
        ("/v1/completions", b'{"prompt": "a\\u0000b"}', 400, "prompt", "invalid_value"),
        ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model", "model_not_found"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages", "invalid_value"),
        ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "messages",
         "invalid_value"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
         b'"content": "y"}]}', 400, "messages", "invalid_value"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true}', 400,
         "logprobs", "unsupported_value"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": []}', 400, "tools",
         "unsupported_field"),
        ("/v1/chat/completions", b'{"prompt": "x"}', 400, "prompt", "unsupported_field"),
        ("/v1/nothing", b'{}', 404, None, "unknown_url"),
    ]
    for path, body, want, param, code in cases:
        st, got, _ = curl([base + path], body)
        try:
            e = json.loads(got)["error"]
            shape = set(e) == {"message", "type", "param", "code"} and isinstance(e["message"], str) and e["message"]
        except (ValueError, KeyError, TypeError):
            e, shape = got, False
        check(st == want and shape and e["param"] == param and e["code"] == code,
              "%s %s -> %d %s" % (path, body[:60].decode(errors="replace"), want, code), (st, e))
    st, got, _ = curl(["-X", "GET", base + "/v1/completions"])
    check(st == 405, "GET on a POST endpoint is 405", st)
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    st, got, _ = curl([base + "/v1/completions"], big)
    check(st == 400 and json.loads(got)["error"]["code"] == "body_too_large", "a 5 MiB body is refused with 400",
          (st, got[:200]))
    st, got, _ = curl([base + "/v1/completions"], json.dumps({"prompt": "Once", "max_tokens": 3}))
    check(st == 200 and json.loads(got)["usage"]["completion_tokens"] == 3, "the server still serves after them")

    # ---- /metrics: counters and histogram counts equal what was sent -------------------------
    m0, head = metrics(base)
    check("text/plain; version=0.0.4" in head, "/metrics is exposition format 0.0.4", head)
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:request_success_total{finished_reason=stop}",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"]:
        key = name if "{" in name else name + "{}"
        check(key in m0, "/metrics has " + name, sorted(k for k in m0 if "bucket" not in k)[:80])
    sent = [("Once upon a time", 7), ("Lily and Tom", 11), ("The sun", 5)]
    prompt_tokens = gen = itl = 0
    for p, n in sent:
        st, got, _ = curl([base + "/v1/completions"], json.dumps({"prompt": p, "max_tokens": n,
                                                                   "ignore_eos": True}))
        u = json.loads(got)["usage"]
        prompt_tokens += u["prompt_tokens"]
        gen += u["completion_tokens"]
        itl += u["completion_tokens"] - 1
    st, got, _ = curl([base + "/v1/completions"], json.dumps({"prompt": "x", "n": 3}))
    m1 = wait_metric(base, lambda m: m["vllm:e2e_request_latency_seconds_count{}"] >=
                     m0["vllm:e2e_request_latency_seconds_count{}"] + 3, "three more requests end")

    def d(k):
        return m1.get(k, 0) - m0.get(k, 0)
    check(d("vllm:prompt_tokens_total{}") == prompt_tokens, "prompt_tokens_total grew by the prompts' tokens",
          (d("vllm:prompt_tokens_total{}"), prompt_tokens))
    check(d("vllm:generation_tokens_total{}") == gen, "generation_tokens_total grew by the tokens generated",
          (d("vllm:generation_tokens_total{}"), gen))
    check(d("vllm:request_success_total{finished_reason=length}") == 3 and
          d("vllm:request_success_total{finished_reason=stop}") == 0, "request_success_total{length} grew by 3")
    check(d("vllm:time_to_first_token_seconds_count{}") == 3 and
          d("vllm:time_to_first_token_seconds_bucket{le=+Inf}") == 3, "TTFT histogram counted 3")
    check(d("vllm:inter_token_latency_seconds_count{}") == itl, "inter-token latency counted tokens - 1 each",
          (d("vllm:inter_token_latency_seconds_count{}"), itl))
    check(d("vllm:request_queue_time_seconds_count{}") == 3, "queue time histogram counted 3")
    check(d("kvrelay_requests_rejected_total{reason=invalid}") == 1, "the refused request counted as invalid")
    check("kvrelay_node_deaths_total{}" in m1 and "kvrelay_request_reruns_total{}" in m1 and
          d("kvrelay_node_deaths_total{}") == 0 and d("kvrelay_request_reruns_total{}") == 0,
          "node deaths and re-runs exported, none while every node lives")
    buckets = sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in m1.items()
                     if k.startswith("vllm:time_to_first_token_seconds_bucket"))
    check([b for b, _ in buckets][:3] == [0.001, 0.005, 0.01] and buckets[-1][0] == float("inf") and
          all(buckets[i][1] <= buckets[i + 1][1] for i in range(len(buckets) - 1)),
          "TTFT buckets are vLLM's, cumulative", buckets[:4])
    check(m1.get("kvrelay_node_alive{host=%s,rank=1,role=prefill}" % socket.gethostname()) == 1 or
          any(k.startswith("kvrelay_node_alive{") and v == 1 for k, v in m1.items()),
          "kvrelay_node_alive per node")

    # ---- grpc.health.v1 with grpcio (no generated stubs: the messages by hand) ---------------
    import grpc
    ch = grpc.insecure_channel("127.0.0.1:%d" % grpc_port)
    check_rpc = ch.unary_unary("/grpc.health.v1.Health/Check")
    check(check_rpc(b"", timeout=10) == b"\x08\x01", "grpc.health.v1 Check(\"\") is SERVING")
    svc = b"kvrelay.v1.Inference"
    check(check_rpc(b"\x0a" + bytes([len(svc)]) + svc, timeout=10) == b"\x08\x01",
          "grpc.health.v1 Check(kvrelay.v1.Inference) is SERVING")
    try:
        check_rpc(b"\x0a\x03foo", timeout=10)
        check(False, "an unknown service is NOT_FOUND")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, "an unknown service is NOT_FOUND", e.code())
    watch = ch.unary_stream("/grpc.health.v1.Health/Watch")(b"", timeout=10)
    check(next(watch) == b"\x08\x01", "grpc.health.v1 Watch sends SERVING first")
    watch.cancel()
    ch.close()

    # ---- a client that leaves mid-stream cancels its request; its blocks come back ------------
    req = {"prompt": "Once upon a time", "max_tokens": 1000000, "kv_policy": "window", "kv_window": 64,
           "ignore_eos": True, "stream": True}
    c = subprocess.Popen(["curl", "-sN", base + "/v1/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(req)], stdout=subprocess.PIPE)
    got = b""
    while got.count(b"\n\n") < 3:
        k = os.read(c.stdout.fileno(), 4096)
        if not k:
            break
        got += k
    check(got.count(b"\n\n") >= 3, "the endless stream started", got[:200])
    m_run = wait_metric(base, lambda m: m["vllm:num_requests_running{}"] == 1 and
                        any(k.startswith("kvrelay_node_kv_bytes_used{") and "role=decode" in k and v > 0
                            for k, v in m.items()), "it runs and holds KV blocks")
    c.kill()
    c.wait()
    c.stdout.close()
    m_end = wait_metric(base, lambda m: m["vllm:num_requests_running{}"] == 0 and
                        all(v == 0 for k, v in m.items() if k.startswith("kvrelay_node_kv_bytes_used{")) and
                        m["vllm:request_success_total{finished_reason=abort}"] ==
                        m_run["vllm:request_success_total{finished_reason=abort}"] + 1,
                        "after the client left: nothing runs, the pool is empty, one abort")
    check(m_end["vllm:num_requests_running{}"] == 0, "a disconnect cancels the request and frees its blocks")
    st = subprocess.run([os.path.join(BIN, "kvrelay"), "status", "--addr", "127.0.0.1:%d" % grpc_port],
                        capture_output=True, timeout=30)
    print(st.stdout.decode().strip())

    # ---- an error after the stream began: one data: {"error": ...} event, then the end --------
    req = {"prompt": "Once upon a time", "max_tokens": 50, "seed": FAIL_SEED, "temperature": 1, "stream": True}
    st, body, _ = curl(["-N", base + "/v1/completions"], json.dumps(req))
    events = [e for e in body.split(b"\n\n") if e]
    last = json.loads(events[-1][6:]) if events and events[-1].startswith(b"data: {") else {}
    check(st == 200 and len(events) >= 2 and "error" in last and set(last["error"]) ==
          {"message", "type", "param", "code"} and b"[DONE]" not in body,
          "a failure mid-stream is one data: {\"error\": ...} event and no [DONE]", body[-400:])
    check(all("choices" in json.loads(e[6:]) for e in events[:-1]), "text chunks came before the error")
    req["stream"] = False
    st, body, _ = curl([base + "/v1/completions"], json.dumps(req))
    check(st >= 500 and "error" in json.loads(body), "the same failure without streaming is a 5xx error",
          (st, body[:300]))
    st, got, _ = curl([base + "/health"])
    check(st == 200, "still healthy after the failures")


if __name__ == "__main__":
    main()
