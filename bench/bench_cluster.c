/* bench_cluster.c - `kvrelay bench cluster`: an open-loop load generator against a running
 * coordinator (issue 6). Arrivals are a Poisson process (exponential gaps from a seeded
 * generator) and every request is sent on its own thread at its scheduled time, whatever
 * the earlier ones are doing. Prompts are token ids cut from the TinyStories text to exact
 * lengths; outputs have exact lengths (ignore_eos). Reports throughput, TTFT, TPOT and
 * end-to-end percentiles measured at the client, the server's own usage numbers, and
 * goodput under TTFT and TPOT SLOs. Owns its threads and the one gRPC client they share. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "bench.h"
#include "cli.h"
#include "clock.h"
#include "grpc_client.h"
#include "json.h"
#include "kv_cache.h"
#include "options.h"
#include "status.h"
#include "tokenizer.h"

#ifndef KVR_SHARED_DIR
#define KVR_SHARED_DIR "../shared"
#endif

#define MAX_REQUESTS 100000        /* schedule length cap (a typo in --rate must not fork-bomb) */
#define THREAD_STACK_NBYTES (1u << 20) /* per request thread; gRPC core runs on it */
#define MONITOR_PERIOD_S 0.25      /* ClusterStatus sampling period during the load */
#define N_CODES 18                 /* gRPC codes 0..16, plus CODE_CLIENT */
#define CODE_CLIENT 17             /* the client could not start the request (no thread) */

struct cb_cfg {
    const char *addr;
    float rate;
    float duration;
    int requests;
    int prompt_min, prompt_max;
    int out_min, out_max;
    float ttft_slo_ms, tpot_slo_ms;
    float max_itl_slo_ms;
    float slo_scale;
    int probes;
    uint64_t seed;
    const char *text;
    const char *tokenizer;
    float timeout;
    const char *per_request;
    int json;
};

/* clang-format off */
static const struct kvr_opt cb_opts[] = {
    {"addr", KVR_OPT_STRING, offsetof(struct cb_cfg, addr), "127.0.0.1:50051", 0, -1, NULL, 0, "coordinator address HOST:PORT"},
    {"rate", KVR_OPT_FLOAT, offsetof(struct cb_cfg, rate), "1", 0.001, 1000, NULL, 0, "mean arrival rate (requests/s, Poisson)"},
    {"duration", KVR_OPT_FLOAT, offsetof(struct cb_cfg, duration), "0", 0, 86400, NULL, 0, "seconds of arrivals (0: 60 unless --requests is given)"},
    {"requests", KVR_OPT_INT, offsetof(struct cb_cfg, requests), "0", 0, MAX_REQUESTS, NULL, 0, "number of arrivals instead of --duration (same seed, same requests)"},
    {"prompt-min", KVR_OPT_INT, offsetof(struct cb_cfg, prompt_min), "256", 1, 1 << 20, NULL, 0, "shortest prompt in tokens, BOS included"},
    {"prompt-max", KVR_OPT_INT, offsetof(struct cb_cfg, prompt_max), "512", 1, 1 << 20, NULL, 0, "longest prompt in tokens, BOS included"},
    {"out-min", KVR_OPT_INT, offsetof(struct cb_cfg, out_min), "64", 1, 1 << 20, NULL, 0, "shortest output in tokens (exact: ignore_eos)"},
    {"out-max", KVR_OPT_INT, offsetof(struct cb_cfg, out_max), "128", 1, 1 << 20, NULL, 0, "longest output in tokens"},
    {"ttft-slo-ms", KVR_OPT_FLOAT, offsetof(struct cb_cfg, ttft_slo_ms), "0", 0, 1e9, NULL, 0, "TTFT SLO at the client (0: --slo-scale x the unloaded TTFT)"},
    {"tpot-slo-ms", KVR_OPT_FLOAT, offsetof(struct cb_cfg, tpot_slo_ms), "0", 0, 1e9, NULL, 0, "TPOT SLO at the client (0: --slo-scale x the unloaded TPOT)"},
    {"max-itl-slo-ms", KVR_OPT_FLOAT, offsetof(struct cb_cfg, max_itl_slo_ms), "0", 0, 1e9, NULL, 0, "also require every gap between two tokens of a request to be at most this (a stall SLO; 0: off)"},
    {"slo-scale", KVR_OPT_FLOAT, offsetof(struct cb_cfg, slo_scale), "3", 1, 1000, NULL, 0, "derived SLO = this x the unloaded latency of a --prompt-max/--out-max request"},
    {"probes", KVR_OPT_INT, offsetof(struct cb_cfg, probes), "3", 0, 100, NULL, 0, "unloaded requests (prompt-max, out-max) run one at a time before the load; median reported"},
    {"seed", KVR_OPT_U64, offsetof(struct cb_cfg, seed), "1", 0, -1, NULL, 0, "seed of arrivals, prompt cuts and lengths"},
    {"text", KVR_OPT_STRING, offsetof(struct cb_cfg, text), KVR_SHARED_DIR "/data/tinystories_valid_100.txt", 0, -1, NULL, 0, "text the prompts are cut from (stories split at <|endoftext|>)"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct cb_cfg, tokenizer), KVR_SHARED_DIR "/models/llama2_tokenizer.bin", 0, -1, NULL, 0, "tokenizer.bin of the served model"},
    {"timeout", KVR_OPT_FLOAT, offsetof(struct cb_cfg, timeout), "600", 1, 86400, NULL, 0, "deadline of each request in seconds"},
    {"per-request", KVR_OPT_STRING, offsetof(struct cb_cfg, per_request), NULL, 0, -1, NULL, 0, "also write one JSON line per request to this file (to re-score other SLOs)"},
    {"json", KVR_OPT_FLAG, offsetof(struct cb_cfg, json), "0", 0, -1, NULL, 0, "print one JSON object instead of a table"},
};
/* clang-format on */

/* One request of the schedule and what became of it. Written by its thread only, read by
 * the main thread after the join. */
struct breq {
    double t_sched;   /* s after the start of the load */
    int n_prompt;     /* tokens, BOS included */
    const int *prompt; /* (n_prompt) ids, borrowed from struct load */
    int n_out;        /* max_tokens (exact with ignore_eos) */
    uint64_t seed;
    /* results */
    double t_send, t_first, t_last, t_end; /* s, kvr_clock_now() */
    int n_tok;        /* tokens received */
    double *gaps;     /* (n_out - 1) s between consecutive tokens */
    int code;         /* gRPC status code, or CODE_CLIENT */
    struct kvr_gen_usage usage;
    char message[256]; /* the server's or the client's reason */
    struct kvr_client *client; /* borrowed: shared by every request thread */
    double timeout_s;
    pthread_t th;
    int started;
};

struct load {
    struct cb_cfg cfg;
    struct kvr_client *client;
    int *stream;      /* (n_stream) the stories' tokens back to back */
    int n_stream;
    int *starts;      /* (n_starts) index in stream where a story begins */
    int n_starts;
    struct breq *reqs; /* (n_reqs) */
    int n_reqs;
    int *prompts;     /* (n_reqs, prompt_max) */
    double t0;        /* kvr_clock_now() at the first arrival's origin */
    uint64_t rng;
    /* cluster shape and samples of ClusterStatus during the load */
    int n_prefill, n_decode, n_colocated, seq_len, vocab;
    atomic_int monitor_stop;
    int peak_waiting, peak_running, peak_decode_running, peak_decode_queued;
    uint64_t peak_prefill_queued_tokens, peak_kv_used;
    int n_samples;
};

/* ---- random numbers ---------------------------------------------------------------- */

/* splitmix64: small, seedable, good enough for arrival times and lengths. */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static double rng_unit(uint64_t *s) {
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform integer in [lo, hi]. */
static int rng_range(uint64_t *s, int lo, int hi) {
    return lo + (int)(rng_unit(s) * (double)(hi - lo + 1));
}

/* ---- statistics ------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

struct dist {
    int n;
    double p50, p90, p99, mean, max;
};

/* Sorts v in place. Percentiles interpolate linearly between order statistics (numpy's
 * default), so with few samples p99 is close to the maximum. */
static struct dist dist_of(double *v, int n) {
    struct dist d = {.n = n};
    if (n == 0)
        return d;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += v[i];
    const double ps[3] = {50, 90, 99};
    double out[3];
    for (int k = 0; k < 3; k++) {
        double pos = ps[k] / 100.0 * (double)(n - 1);
        int lo = (int)pos;
        int hi = lo + 1 < n ? lo + 1 : lo;
        out[k] = v[lo] + (v[hi] - v[lo]) * (pos - (double)lo);
    }
    d.p50 = out[0];
    d.p90 = out[1];
    d.p99 = out[2];
    d.mean = sum / (double)n;
    d.max = v[n - 1];
    return d;
}

static void sleep_until(double t) {
    double s = t - kvr_clock_now();
    if (s <= 0)
        return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* ---- prompts -------------------------------------------------------------------------- */

/* Reads the text, splits it into stories at "<|endoftext|>" and encodes each (no BOS)
 * into one stream of ids; prompts are cut from a story's start, running on into the next
 * stories (and around) when the story is shorter than the prompt. */
static int load_text(struct load *L, const struct kvr_tokenizer *tok) {
    FILE *f = fopen(L->cfg.text, "rb");
    char *buf = NULL;
    int rc = KVR_EIO;
    if (!f) {
        fprintf(stderr, "kvrelay bench cluster: cannot open %s: %s\n", L->cfg.text, strerror(errno));
        return rc;
    }
    if (fseek(f, 0, SEEK_END) != 0)
        goto out;
    long size = ftell(f);
    if (size <= 0 || fseek(f, 0, SEEK_SET) != 0)
        goto out;
    rc = KVR_ENOMEM;
    buf = malloc((size_t)size + 1);
    /* A story encodes to at most its bytes + 3 ids; the stream is never longer. */
    L->stream = malloc(((size_t)size + 3) * sizeof *L->stream);
    L->starts = malloc(((size_t)size / 2 + 2) * sizeof *L->starts);
    if (!buf || !L->stream || !L->starts)
        goto out;
    rc = KVR_EIO;
    if (fread(buf, 1, (size_t)size, f) != (size_t)size)
        goto out;
    buf[size] = '\0';
    static const char sep[] = "<|endoftext|>";
    char *p = buf;
    while (p && *p) {
        char *end = strstr(p, sep);
        if (end)
            *end = '\0';
        while (*p == '\n' || *p == ' ' || *p == '\r')
            p++;
        size_t len = strlen(p);
        while (len > 0 && (p[len - 1] == '\n' || p[len - 1] == ' ' || p[len - 1] == '\r'))
            p[--len] = '\0';
        if (len > 0) {
            int n = 0;
            rc = kvr_tokenizer_encode(tok, p, 0, 0, L->stream + L->n_stream,
                                      (int)((size_t)size + 3 - (size_t)L->n_stream), &n);
            if (rc != KVR_OK) {
                fprintf(stderr, "kvrelay bench cluster: cannot tokenize %s: %s\n", L->cfg.text,
                        kvr_status_str(rc));
                goto out;
            }
            L->starts[L->n_starts++] = L->n_stream;
            L->n_stream += n;
        }
        p = end ? end + sizeof sep - 1 : NULL;
    }
    rc = KVR_OK;
    if (L->n_stream < L->cfg.prompt_max) {
        fprintf(stderr, "kvrelay bench cluster: %s has %d tokens, fewer than --prompt-max %d\n",
                L->cfg.text, L->n_stream, L->cfg.prompt_max);
        rc = KVR_EINVAL;
    }
out:
    free(buf);
    fclose(f);
    return rc;
}

/* Fills dst with BOS and the n - 1 ids that follow a random story start. */
static void cut_prompt(struct load *L, int *dst, int n) {
    int at = L->starts[rng_range(&L->rng, 0, L->n_starts - 1)];
    dst[0] = KVR_TOKEN_BOS;
    for (int j = 1; j < n; j++)
        dst[j] = L->stream[(at + j - 1) % L->n_stream];
}

/* The whole schedule, drawn before the first request so that one seed gives the same
 * requests at the same times to every cluster under comparison. */
static int make_schedule(struct load *L) {
    const struct cb_cfg *c = &L->cfg;
    int cap = c->requests > 0 ? c->requests : MAX_REQUESTS;
    double duration = c->requests > 0 ? 0.0 : (c->duration > 0 ? (double)c->duration : 60.0);
    L->reqs = calloc((size_t)cap, sizeof *L->reqs);
    if (!L->reqs)
        return KVR_ENOMEM;
    double t = 0;
    int n = 0;
    while (n < cap) {
        t += -log(1.0 - rng_unit(&L->rng)) / (double)c->rate;
        if (c->requests == 0 && t >= duration)
            break;
        struct breq *q = &L->reqs[n++];
        q->t_sched = t;
        q->n_prompt = rng_range(&L->rng, c->prompt_min, c->prompt_max);
        q->n_out = rng_range(&L->rng, c->out_min, c->out_max);
        q->seed = rng_next(&L->rng) | 1;
    }
    if (n == 0) {
        fprintf(stderr, "kvrelay bench cluster: no arrival within --duration %.1f s at --rate %g\n",
                duration, (double)c->rate);
        return KVR_EINVAL;
    }
    L->n_reqs = n;
    L->prompts = malloc((size_t)n * (size_t)c->prompt_max * sizeof *L->prompts);
    if (!L->prompts)
        return KVR_ENOMEM;
    for (int i = 0; i < n; i++) {
        struct breq *q = &L->reqs[i];
        int *dst = L->prompts + (size_t)i * (size_t)c->prompt_max;
        cut_prompt(L, dst, q->n_prompt);
        q->prompt = dst;
        q->gaps = malloc((size_t)(q->n_out > 1 ? q->n_out - 1 : 1) * sizeof *q->gaps);
        if (!q->gaps)
            return KVR_ENOMEM;
    }
    return KVR_OK;
}

/* ---- one request -------------------------------------------------------------------- */

static int on_message(void *ud, const struct kvr_gen_msg *m) {
    struct breq *q = ud;
    if (!m->has_token)
        return 0;
    double t = kvr_clock_now();
    if (q->n_tok == 0)
        q->t_first = t;
    else if (q->n_tok - 1 < q->n_out - 1)
        q->gaps[q->n_tok - 1] = t - q->t_last;
    q->t_last = t;
    q->n_tok++;
    return 0;
}

static void run_request(struct breq *q) {
    struct kvr_gen_params p = {.prompt_tokens = q->prompt, .n_prompt_tokens = q->n_prompt,
                               .max_tokens = q->n_out, .temperature = 0.0f, .top_p = 0.0f,
                               .seed = q->seed, .ignore_eos = 1, .kv_policy = KVR_KV_DENSE,
                               .kv_window = 0, .kv_sinks = -1, .timeout_s = q->timeout_s};
    struct kvr_rpc_status st;
    q->t_send = kvr_clock_now();
    kvr_client_generate(q->client, &p, on_message, q, &q->usage, &st);
    q->t_end = kvr_clock_now();
    q->code = st.code >= 0 && st.code < CODE_CLIENT ? st.code : 2 /* UNKNOWN */;
    snprintf(q->message, sizeof q->message, "%s", st.message);
}


static void *request_thread(void *arg) {
    run_request(arg);
    return NULL;
}

/* Starts q on its own thread. On failure q ends at once with CODE_CLIENT. */
static void launch(struct breq *q) {
    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc == 0) {
        pthread_attr_setstacksize(&attr, THREAD_STACK_NBYTES);
        rc = pthread_create(&q->th, &attr, request_thread, q);
        pthread_attr_destroy(&attr);
    }
    if (rc != 0) {
        q->t_send = q->t_end = kvr_clock_now();
        q->code = CODE_CLIENT;
        snprintf(q->message, sizeof q->message, "client: cannot start a thread: %s", strerror(rc));
        return;
    }
    q->started = 1;
}

static void join(struct breq *q) {
    if (q->started) {
        pthread_join(q->th, NULL);
        q->started = 0;
    }
}

/* A request that ran to its exact length with the exact prompt the server counted. */
static int request_ok(const struct breq *q) {
    return q->code == 0 && q->usage.finish_reason == COORD_FINISH_LENGTH && q->n_tok == q->n_out &&
           q->usage.generated_tokens == q->n_out && q->usage.prompt_tokens == q->n_prompt;
}

static double ttft_ms(const struct breq *q) {
    return (q->t_first - q->t_send) * 1000.0;
}

static double tpot_ms(const struct breq *q) {
    return q->n_tok > 1 ? (q->t_last - q->t_first) * 1000.0 / (double)(q->n_tok - 1) : 0.0;
}

/* The longest gap between two consecutive tokens of q (the worst stall a reader saw). */
static double max_itl_ms(const struct breq *q) {
    double m = 0;
    for (int g = 0; g < q->n_tok - 1 && g < q->n_out - 1; g++)
        if (q->gaps[g] > m)
            m = q->gaps[g];
    return m * 1000.0;
}

static const char *code_name(int code) {
    return code == CODE_CLIENT ? "CLIENT_ERROR" : kvr_grpc_code_name(code);
}

/* ---- cluster status ------------------------------------------------------------------ */

static int is_decode_role(const struct coord_node_status *n) {
    return !strcmp(n->role, "decode") || !strcmp(n->role, "colocated");
}

/* Samples ClusterStatus until monitor_stop and keeps the peaks: how deep the queues got
 * tells where a saturated cluster saturates. */
static void *monitor_thread(void *arg) {
    struct load *L = arg;
    struct coord_cluster_status *s = malloc(sizeof *s);
    if (!s)
        return NULL;
    while (!atomic_load(&L->monitor_stop)) {
        double t = kvr_clock_now();
        struct kvr_rpc_status st;
        if (kvr_client_cluster_status(L->client, 2.0, s, &st) == 0) {
            L->n_samples++;
            if (s->waiting_requests > L->peak_waiting)
                L->peak_waiting = s->waiting_requests;
            if (s->running_requests > L->peak_running)
                L->peak_running = s->running_requests;
            int dr = 0, dq = 0;
            uint64_t pq = 0, used = 0;
            for (int i = 0; i < s->n_nodes; i++) {
                const struct coord_node_status *n = &s->nodes[i];
                if (is_decode_role(n)) {
                    dr += n->running;
                    dq += n->queued;
                    used += n->kv_bytes_used;
                } else {
                    pq += n->queued_prompt_tokens;
                }
            }
            if (dr > L->peak_decode_running)
                L->peak_decode_running = dr;
            if (dq > L->peak_decode_queued)
                L->peak_decode_queued = dq;
            if (pq > L->peak_prefill_queued_tokens)
                L->peak_prefill_queued_tokens = pq;
            if (used > L->peak_kv_used)
                L->peak_kv_used = used;
        }
        coord_cluster_status_deinit(s);
        sleep_until(t + MONITOR_PERIOD_S);
    }
    free(s);
    return NULL;
}

/* The cluster's shape and context. Returns the gRPC code (0 OK). */
static int cluster_shape(struct load *L, struct kvr_rpc_status *st) {
    struct coord_cluster_status *s = malloc(sizeof *s);
    if (!s) {
        st->code = 13;
        st->reached = 0;
        snprintf(st->message, sizeof st->message, "out of memory");
        return st->code;
    }
    int code = kvr_client_cluster_status(L->client, 10.0, s, st);
    if (code == 0) {
        for (int i = 0; i < s->n_nodes; i++) {
            if (!strcmp(s->nodes[i].role, "colocated"))
                L->n_colocated++;
            if (is_decode_role(&s->nodes[i]))
                L->n_decode++;
            else if (!strcmp(s->nodes[i].role, "prefill"))
                L->n_prefill++;
        }
        L->seq_len = s->seq_len;
        L->vocab = s->vocab_size;
    }
    coord_cluster_status_deinit(s);
    free(s);
    return code;
}

/* After the load: KV bytes still used on the decode nodes and requests the coordinator
 * still runs (both must be 0 once every request has finished). */
static void leftovers(struct load *L, uint64_t *kv_used, int *running, int *waiting) {
    *kv_used = 0;
    *running = *waiting = -1;
    struct coord_cluster_status *s = malloc(sizeof *s);
    if (!s)
        return;
    /* Nodes report every 50 ms; give the last reports time to arrive. */
    sleep_until(kvr_clock_now() + 0.3);
    struct kvr_rpc_status st;
    if (kvr_client_cluster_status(L->client, 5.0, s, &st) == 0) {
        for (int i = 0; i < s->n_nodes; i++)
            if (is_decode_role(&s->nodes[i]))
                *kv_used += s->nodes[i].kv_bytes_used;
        *running = s->running_requests;
        *waiting = s->waiting_requests;
    }
    coord_cluster_status_deinit(s);
    free(s);
}

/* ---- warm-up and unloaded probes --------------------------------------------------- */

/* Runs n requests at once (prompt_len, n_out tokens each), cut with their own generator
 * so that the schedule does not depend on them. Fills out[0..n). Returns the number OK. */
static int run_batch(struct load *L, uint64_t *rng, int n, int prompt_len, int n_out,
                     struct breq *out, int *prompts) {
    int ok = 0;
    uint64_t saved = L->rng;
    L->rng = *rng;
    for (int i = 0; i < n; i++) {
        struct breq *q = &out[i];
        memset(q, 0, sizeof *q);
        q->n_prompt = prompt_len;
        q->n_out = n_out;
        q->prompt = prompts + (size_t)i * (size_t)prompt_len;
        cut_prompt(L, prompts + (size_t)i * (size_t)prompt_len, prompt_len);
        q->seed = rng_next(&L->rng) | 1;
        q->client = L->client;
        q->timeout_s = L->cfg.timeout;
        q->gaps = malloc((size_t)(n_out > 1 ? n_out - 1 : 1) * sizeof *q->gaps);
    }
    *rng = L->rng;
    L->rng = saved;
    for (int i = 0; i < n; i++) {
        if (out[i].gaps)
            launch(&out[i]);
        else
            out[i].code = CODE_CLIENT;
    }
    for (int i = 0; i < n; i++) {
        join(&out[i]);
        ok += request_ok(&out[i]);
    }
    return ok;
}

static double median_of(double *v, int n) {
    return n > 0 ? dist_of(v, n).p50 : 0.0;
}

struct probe_result {
    int n, n_ok;
    double ttft_ms, tpot_ms, e2e_ms, server_ttft_ms, server_tpot_ms; /* medians */
};

/* Warm-up (one request per decode node, at once, so that every node has run a pass
 * before the clock starts; not counted), then the unloaded probes one at a time. */
static int warm_and_probe(struct load *L, struct probe_result *pr) {
    const struct cb_cfg *c = &L->cfg;
    uint64_t rng = c->seed ^ 0x5ca1ab1e0ddba11ull;
    int n_warm = L->n_decode > 0 ? L->n_decode : 1;
    int n_buf = n_warm > c->probes ? n_warm : c->probes;
    int rc = KVR_OK;
    struct breq *b = calloc((size_t)n_buf, sizeof *b);
    int *prompts = malloc((size_t)n_buf * (size_t)c->prompt_max * sizeof *prompts);
    double *v[5] = {NULL};
    memset(pr, 0, sizeof *pr);
    if (!b || !prompts)
        goto oom;
    int warm_out = c->out_min < 16 ? c->out_min : 16;
    if (run_batch(L, &rng, n_warm, c->prompt_min, warm_out, b, prompts) != n_warm) {
        for (int i = 0; i < n_warm; i++)
            if (!request_ok(&b[i]))
                fprintf(stderr, "kvrelay bench cluster: warm-up request failed: %s: %s\n",
                        code_name(b[i].code), b[i].code ? b[i].message : "wrong token count");
        rc = KVR_EUNAVAIL;
        goto out;
    }
    for (int i = 0; i < n_warm; i++)
        free(b[i].gaps);
    memset(b, 0, (size_t)n_buf * sizeof *b);
    pr->n = c->probes;
    for (int k = 0; k < 5; k++)
        if (c->probes > 0 && !(v[k] = malloc((size_t)c->probes * sizeof *v[k])))
            goto oom;
    for (int i = 0; i < c->probes; i++) {
        struct breq *q = &b[i];
        run_batch(L, &rng, 1, c->prompt_max, c->out_max, q, prompts);
        if (!request_ok(q)) {
            fprintf(stderr, "kvrelay bench cluster: probe request failed: %s: %s\n",
                    code_name(q->code), q->code ? q->message : "wrong token count");
            continue;
        }
        v[0][pr->n_ok] = ttft_ms(q);
        v[1][pr->n_ok] = tpot_ms(q);
        v[2][pr->n_ok] = (q->t_end - q->t_send) * 1000.0;
        v[3][pr->n_ok] = q->usage.ttft_ms;
        v[4][pr->n_ok] = q->usage.tpot_ms;
        pr->n_ok++;
    }
    if (c->probes > 0 && pr->n_ok == 0) {
        rc = KVR_EUNAVAIL;
        goto out;
    }
    pr->ttft_ms = median_of(v[0], pr->n_ok);
    pr->tpot_ms = median_of(v[1], pr->n_ok);
    pr->e2e_ms = median_of(v[2], pr->n_ok);
    pr->server_ttft_ms = median_of(v[3], pr->n_ok);
    pr->server_tpot_ms = median_of(v[4], pr->n_ok);
    goto out;
oom:
    rc = KVR_ENOMEM;
out:
    if (b)
        for (int i = 0; i < n_buf; i++)
            free(b[i].gaps);
    for (int k = 0; k < 5; k++)
        free(v[k]);
    free(b);
    free(prompts);
    return rc;
}

/* ---- the load ------------------------------------------------------------------------ */

static void run_load(struct load *L) {
    L->t0 = kvr_clock_now() + 0.05; /* the first gap counts from here */
    for (int i = 0; i < L->n_reqs; i++) {
        struct breq *q = &L->reqs[i];
        q->client = L->client;
        q->timeout_s = L->cfg.timeout;
        sleep_until(L->t0 + q->t_sched);
        launch(q);
    }
    for (int i = 0; i < L->n_reqs; i++)
        join(&L->reqs[i]);
}

/* ---- the report ---------------------------------------------------------------------- */

struct report {
    int n_sent, n_ok, n_failed, n_wrong, n_slo;
    int by_code[N_CODES];
    double span_s, offered_req_s;
    double out_tok_s, prompt_tok_s, req_s, goodput_req_s, attainment;
    struct dist ttft, tpot, e2e, itl, lag, s_queue, s_ttft, s_tpot, s_total;
    int by_rank[64];
    uint64_t kv_used_after;
    int running_after, waiting_after;
    double client_cpu_s; /* user + system time of this process (its share of the cores) */
};

/* itl_slo <= 0: no stall SLO. */
static int make_report(struct load *L, double ttft_slo, double tpot_slo, double itl_slo,
                       struct report *r) {
    memset(r, 0, sizeof *r);
    int n = L->n_reqs;
    long n_gaps = 0;
    for (int i = 0; i < n; i++)
        n_gaps += L->reqs[i].n_out - 1;
    double *v[8], *gaps = malloc((size_t)(n_gaps > 0 ? n_gaps : 1) * sizeof *gaps);
    int ok_alloc = gaps != NULL;
    for (int k = 0; k < 8; k++)
        ok_alloc &= (v[k] = malloc((size_t)n * sizeof *v[k])) != NULL;
    if (!ok_alloc) {
        free(gaps);
        for (int k = 0; k < 8; k++)
            free(v[k]);
        return KVR_ENOMEM;
    }
    double t_first_send = L->t0 + L->reqs[0].t_sched, t_last_end = t_first_send;
    long prompt_tokens = 0, out_tokens = 0;
    int n_lag = 0;
    n_gaps = 0;
    r->n_sent = n;
    for (int i = 0; i < n; i++) {
        struct breq *q = &L->reqs[i];
        if (q->t_end > t_last_end)
            t_last_end = q->t_end;
        if (q->code != CODE_CLIENT)
            v[7][n_lag++] = (q->t_send - (L->t0 + q->t_sched)) * 1000.0;
        if (q->code != 0) {
            r->n_failed++;
            r->by_code[q->code]++;
            continue;
        }
        if (!request_ok(q)) {
            r->n_wrong++;
            continue;
        }
        int k = r->n_ok++;
        v[0][k] = ttft_ms(q);
        v[1][k] = tpot_ms(q);
        v[2][k] = (q->t_end - q->t_send) * 1000.0;
        v[3][k] = q->usage.queue_ms;
        v[4][k] = q->usage.ttft_ms;
        v[5][k] = q->usage.tpot_ms;
        v[6][k] = q->usage.total_ms;
        if (v[0][k] <= ttft_slo && v[1][k] <= tpot_slo && (itl_slo <= 0 || max_itl_ms(q) <= itl_slo))
            r->n_slo++;
        for (int g = 0; g < q->n_tok - 1; g++)
            gaps[n_gaps++] = q->gaps[g] * 1000.0;
        prompt_tokens += q->n_prompt;
        out_tokens += q->n_tok;
        if (q->usage.decode_rank >= 0 && q->usage.decode_rank < 64)
            r->by_rank[q->usage.decode_rank]++;
    }
    r->span_s = t_last_end - t_first_send;
    double window = L->cfg.requests > 0 ? L->reqs[n - 1].t_sched
                                        : (L->cfg.duration > 0 ? (double)L->cfg.duration : 60.0);
    r->offered_req_s = window > 0 ? (double)n / window : 0.0;
    if (r->span_s > 0) {
        r->out_tok_s = (double)out_tokens / r->span_s;
        r->prompt_tok_s = (double)prompt_tokens / r->span_s;
        r->req_s = (double)r->n_ok / r->span_s;
        r->goodput_req_s = (double)r->n_slo / r->span_s;
    }
    r->attainment = (double)r->n_slo / (double)n;
    r->ttft = dist_of(v[0], r->n_ok);
    r->tpot = dist_of(v[1], r->n_ok);
    r->e2e = dist_of(v[2], r->n_ok);
    r->s_queue = dist_of(v[3], r->n_ok);
    r->s_ttft = dist_of(v[4], r->n_ok);
    r->s_tpot = dist_of(v[5], r->n_ok);
    r->s_total = dist_of(v[6], r->n_ok);
    r->lag = dist_of(v[7], n_lag);
    r->itl = dist_of(gaps, (int)n_gaps);
    free(gaps);
    for (int k = 0; k < 8; k++)
        free(v[k]);
    return KVR_OK;
}

static void json_dist(const char *name, const struct dist *d, int last) {
    printf("\"%s\":{\"n\":%d,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"mean\":%.3f,\"max\":%.3f}%s",
           name, d->n, d->p50, d->p90, d->p99, d->mean, d->max, last ? "" : ",");
}

static void print_json(const struct load *L, const struct probe_result *pr, double ttft_slo,
                       double tpot_slo, const char *slo_source, const struct report *r) {
    const struct cb_cfg *c = &L->cfg;
    printf("{\"bench\":\"cluster\",\"addr\":");
    kvr_json_write_string(stdout, c->addr);
    printf(",\"config\":{\"rate\":%g,\"duration_s\":%g,\"requests\":%d,\"prompt_min\":%d,"
           "\"prompt_max\":%d,\"out_min\":%d,\"out_max\":%d,\"seed\":%llu,\"timeout_s\":%g,"
           "\"prompt_mode\":\"prompt_tokens\",\"temperature\":0,\"ignore_eos\":true,\"text\":",
           (double)c->rate, (double)c->duration, c->requests, c->prompt_min, c->prompt_max,
           c->out_min, c->out_max, (unsigned long long)c->seed, (double)c->timeout);
    kvr_json_write_string(stdout, c->text);
    printf("},\"cluster\":{\"prefill_nodes\":%d,\"decode_nodes\":%d,\"colocated_nodes\":%d,"
           "\"seq_len\":%d},",
           L->n_prefill, L->n_decode, L->n_colocated, L->seq_len);
    printf("\"unloaded\":{\"probes\":%d,\"ok\":%d,\"prompt_tokens\":%d,\"output_tokens\":%d,"
           "\"ttft_ms\":%.3f,\"tpot_ms\":%.3f,\"e2e_ms\":%.3f,\"server_ttft_ms\":%.3f,"
           "\"server_tpot_ms\":%.3f},",
           pr->n, pr->n_ok, c->prompt_max, c->out_max, pr->ttft_ms, pr->tpot_ms, pr->e2e_ms,
           pr->server_ttft_ms, pr->server_tpot_ms);
    printf("\"slo\":{\"ttft_ms\":%.3f,\"tpot_ms\":%.3f,\"max_itl_ms\":%.3f,\"source\":\"%s\"},",
           ttft_slo, tpot_slo, (double)c->max_itl_slo_ms, slo_source);
    printf("\"requests\":{\"sent\":%d,\"completed\":%d,\"failed\":%d,\"wrong_length\":%d,"
           "\"met_slo\":%d,\"by_status\":{",
           r->n_sent, r->n_ok, r->n_failed, r->n_wrong, r->n_slo);
    int first = 1;
    for (int k = 1; k < N_CODES; k++) {
        if (!r->by_code[k])
            continue;
        printf("%s\"%s\":%d", first ? "" : ",", code_name(k), r->by_code[k]);
        first = 0;
    }
    printf("},\"by_decode_rank\":{");
    first = 1;
    for (int k = 0; k < 64; k++) {
        if (!r->by_rank[k])
            continue;
        printf("%s\"%d\":%d", first ? "" : ",", k, r->by_rank[k]);
        first = 0;
    }
    printf("}},\"offered_req_s\":%.4f,\"span_s\":%.3f,", r->offered_req_s, r->span_s);
    printf("\"throughput\":{\"output_tok_s\":%.3f,\"prompt_tok_s\":%.3f,\"req_s\":%.4f},",
           r->out_tok_s, r->prompt_tok_s, r->req_s);
    printf("\"goodput_req_s\":%.4f,\"slo_attainment\":%.4f,", r->goodput_req_s, r->attainment);
    json_dist("ttft_ms", &r->ttft, 0);
    json_dist("tpot_ms", &r->tpot, 0);
    json_dist("e2e_ms", &r->e2e, 0);
    json_dist("itl_ms", &r->itl, 0);
    printf("\"server\":{");
    json_dist("queue_ms", &r->s_queue, 0);
    json_dist("ttft_ms", &r->s_ttft, 0);
    json_dist("tpot_ms", &r->s_tpot, 0);
    json_dist("total_ms", &r->s_total, 1);
    printf("},");
    json_dist("send_lag_ms", &r->lag, 0);
    printf("\"peak\":{\"samples\":%d,\"coord_waiting\":%d,\"coord_running\":%d,"
           "\"decode_running\":%d,\"decode_queued\":%d,\"prefill_queued_tokens\":%llu,"
           "\"kv_bytes_used\":%llu},",
           L->n_samples, L->peak_waiting, L->peak_running, L->peak_decode_running,
           L->peak_decode_queued, (unsigned long long)L->peak_prefill_queued_tokens,
           (unsigned long long)L->peak_kv_used);
    printf("\"after\":{\"kv_bytes_used\":%llu,\"coord_running\":%d,\"coord_waiting\":%d},",
           (unsigned long long)r->kv_used_after, r->running_after, r->waiting_after);
    printf("\"client_cpu_s\":%.3f}\n", r->client_cpu_s);
}

static void text_dist(const char *name, const struct dist *d) {
    printf("  %-22s %10.1f %10.1f %10.1f %10.1f %10.1f\n", name, d->p50, d->p90, d->p99, d->mean,
           d->max);
}

static void print_text(const struct load *L, const struct probe_result *pr, double ttft_slo,
                       double tpot_slo, const char *slo_source, const struct report *r) {
    const struct cb_cfg *c = &L->cfg;
    printf("kvrelay bench cluster: %s (%d prefill, %d decode, %d colocated; context %d)\n",
           c->addr, L->n_prefill, L->n_decode, L->n_colocated, L->seq_len);
    printf("load: Poisson %.3g req/s (offered %.3f), %d requests, prompts %d-%d tokens "
           "(prompt_tokens, BOS included), outputs %d-%d tokens (ignore_eos), temperature 0, "
           "seed %llu\n",
           (double)c->rate, r->offered_req_s, r->n_sent, c->prompt_min, c->prompt_max,
           c->out_min, c->out_max, (unsigned long long)c->seed);
    if (pr->n_ok > 0)
        printf("unloaded (%d of %d probes, %d-token prompt, %d tokens): TTFT %.1f ms, TPOT %.2f "
               "ms, end-to-end %.1f ms\n",
               pr->n_ok, pr->n, c->prompt_max, c->out_max, pr->ttft_ms, pr->tpot_ms, pr->e2e_ms);
    printf("SLO (%s): TTFT <= %.1f ms and TPOT <= %.2f ms", slo_source, ttft_slo, tpot_slo);
    if (c->max_itl_slo_ms > 0)
        printf(" and every inter-token gap <= %.1f ms", (double)c->max_itl_slo_ms);
    printf("\n");
    printf("requests: %d sent, %d completed, %d failed, %d wrong length", r->n_sent, r->n_ok,
           r->n_failed, r->n_wrong);
    for (int k = 1; k < N_CODES; k++)
        if (r->by_code[k])
            printf(", %s %d", code_name(k), r->by_code[k]);
    printf("\n");
    printf("throughput: %.1f output tok/s, %.1f prompt tok/s, %.3f req/s over %.1f s\n",
           r->out_tok_s, r->prompt_tok_s, r->req_s, r->span_s);
    printf("goodput: %.3f req/s (%d requests met both SLOs, attainment %.1f%%)\n",
           r->goodput_req_s, r->n_slo, 100.0 * r->attainment);
    printf("  %-22s %10s %10s %10s %10s %10s\n", "ms", "p50", "p90", "p99", "mean", "max");
    text_dist("TTFT (client)", &r->ttft);
    text_dist("TPOT (client)", &r->tpot);
    text_dist("end-to-end (client)", &r->e2e);
    text_dist("inter-token (client)", &r->itl);
    text_dist("queue (server)", &r->s_queue);
    text_dist("TTFT (server)", &r->s_ttft);
    text_dist("TPOT (server)", &r->s_tpot);
    text_dist("total (server)", &r->s_total);
    text_dist("send lag", &r->lag);
    printf("peaks (%d samples): coordinator waiting %d, running %d; decode running %d, queued %d; "
           "prefill queued %llu tokens\n",
           L->n_samples, L->peak_waiting, L->peak_running, L->peak_decode_running,
           L->peak_decode_queued, (unsigned long long)L->peak_prefill_queued_tokens);
    printf("after the load: %llu KV bytes used, %d running, %d waiting; client CPU %.1f s\n",
           (unsigned long long)r->kv_used_after, r->running_after, r->waiting_after,
           r->client_cpu_s);
}

/* One JSON object per line and request: its shape, outcome and latencies (ms), so that
 * goodput can be re-scored offline under other SLOs. */
static int write_per_request(const struct load *L, const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "kvrelay bench cluster: cannot write %s: %s\n", path, strerror(errno));
        return KVR_EIO;
    }
    for (int i = 0; i < L->n_reqs; i++) {
        const struct breq *q = &L->reqs[i];
        int ok = request_ok(q);
        fprintf(f,
                "{\"i\":%d,\"t_sched_s\":%.4f,\"prompt_tokens\":%d,\"max_tokens\":%d,"
                "\"status\":\"%s\",\"ok\":%s,\"tokens\":%d,\"send_lag_ms\":%.3f,"
                "\"ttft_ms\":%.3f,\"tpot_ms\":%.3f,\"e2e_ms\":%.3f,\"max_itl_ms\":%.3f,"
                "\"server_queue_ms\":%.3f,\"server_ttft_ms\":%.3f,\"server_tpot_ms\":%.3f,"
                "\"decode_rank\":%d}\n",
                i, q->t_sched, q->n_prompt, q->n_out, code_name(q->code), ok ? "true" : "false",
                q->n_tok, (q->t_send - (L->t0 + q->t_sched)) * 1000.0,
                q->n_tok > 0 ? ttft_ms(q) : -1.0, tpot_ms(q), (q->t_end - q->t_send) * 1000.0,
                max_itl_ms(q), ok ? q->usage.queue_ms : -1.0, ok ? q->usage.ttft_ms : -1.0,
                ok ? q->usage.tpot_ms : -1.0, ok ? q->usage.decode_rank : -1);
    }
    int rc = ferror(f) ? KVR_EIO : KVR_OK;
    if (fclose(f) != 0)
        rc = KVR_EIO;
    return rc;
}

/* ---- entry ------------------------------------------------------------------------- */

static void free_load(struct load *L) {
    if (L->reqs)
        for (int i = 0; i < L->n_reqs; i++)
            free(L->reqs[i].gaps);
    free(L->reqs);
    free(L->prompts);
    free(L->stream);
    free(L->starts);
    kvr_client_free(L->client);
}

int kvr_bench_cluster(int argc, char **argv) {
    struct load *L = calloc(1, sizeof *L);
    struct kvr_tokenizer *tok = NULL;
    if (!L)
        return KVR_EXIT_RUNTIME;
    int done;
    int ex = kvr_cli_parse("bench cluster",
                           "Open-loop load (Poisson arrivals) against a running cluster: "
                           "throughput, TTFT, TPOT and goodput under SLOs.",
                           cb_opts, (int)(sizeof cb_opts / sizeof cb_opts[0]), &L->cfg, argc, argv,
                           &done);
    struct cb_cfg *c = &L->cfg;
    if (done)
        goto out;
    ex = KVR_EXIT_USAGE;
    if (c->prompt_min > c->prompt_max || c->out_min > c->out_max) {
        fprintf(stderr, "kvrelay bench cluster: --prompt-min/--out-min above their maximum\n");
        goto out;
    }
    if (c->requests > 0 && c->duration > 0) {
        fprintf(stderr, "kvrelay bench cluster: give --duration or --requests, not both\n");
        goto out;
    }
    if ((c->ttft_slo_ms <= 0 || c->tpot_slo_ms <= 0) && c->probes == 0) {
        fprintf(stderr, "kvrelay bench cluster: without --probes give both --ttft-slo-ms and "
                        "--tpot-slo-ms\n");
        goto out;
    }
    if (kvr_client_create(c->addr, &L->client) != KVR_OK) {
        fprintf(stderr, "kvrelay bench cluster: bad address '%s'\n", c->addr);
        goto out;
    }
    struct kvr_rpc_status st;
    if (cluster_shape(L, &st) != 0) {
        fprintf(stderr, "kvrelay bench cluster: ClusterStatus at %s: %s: %s\n", c->addr,
                kvr_grpc_code_name(st.code), st.message);
        ex = st.reached ? KVR_EXIT_REJECTED : KVR_EXIT_UNREACHABLE;
        goto out;
    }
    if (L->seq_len > 0 && c->prompt_max + c->out_max > L->seq_len) {
        fprintf(stderr, "kvrelay bench cluster: --prompt-max %d + --out-max %d exceed the model "
                        "context of %d\n", c->prompt_max, c->out_max, L->seq_len);
        goto out;
    }
    ex = KVR_EXIT_RUNTIME;
    int rc = kvr_tokenizer_load(c->tokenizer, L->vocab > 0 ? L->vocab : 32000, &tok);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay bench cluster: cannot load tokenizer %s for a vocabulary of %d: "
                        "%s\n", c->tokenizer, L->vocab, kvr_status_str(rc));
        goto out;
    }
    L->rng = c->seed;
    if ((rc = load_text(L, tok)) != KVR_OK || (rc = make_schedule(L)) != KVR_OK) {
        ex = rc == KVR_EINVAL ? KVR_EXIT_USAGE : KVR_EXIT_RUNTIME;
        goto out;
    }
    struct probe_result pr;
    if ((rc = warm_and_probe(L, &pr)) != KVR_OK) {
        ex = rc == KVR_ENOMEM ? KVR_EXIT_RUNTIME : KVR_EXIT_REJECTED;
        goto out;
    }
    double ttft_slo = c->ttft_slo_ms, tpot_slo = c->tpot_slo_ms;
    char slo_source[96];
    if (ttft_slo > 0 && tpot_slo > 0) {
        snprintf(slo_source, sizeof slo_source, "given");
    } else {
        if (ttft_slo <= 0)
            ttft_slo = (double)c->slo_scale * pr.ttft_ms;
        if (tpot_slo <= 0)
            tpot_slo = (double)c->slo_scale * pr.tpot_ms;
        snprintf(slo_source, sizeof slo_source, "%g x unloaded", (double)c->slo_scale);
    }
    if (!c->json)
        fprintf(stderr, "kvrelay bench cluster: %d requests over %.1f s at %g req/s...\n",
                L->n_reqs, L->reqs[L->n_reqs - 1].t_sched, (double)c->rate);
    pthread_t mon;
    int mon_ok = pthread_create(&mon, NULL, monitor_thread, L) == 0;
    run_load(L);
    atomic_store(&L->monitor_stop, 1);
    if (mon_ok)
        pthread_join(mon, NULL);
    struct report r;
    if (make_report(L, ttft_slo, tpot_slo, (double)c->max_itl_slo_ms, &r) != KVR_OK)
        goto out;
    leftovers(L, &r.kv_used_after, &r.running_after, &r.waiting_after);
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        r.client_cpu_s = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
                         (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
    if (c->per_request && write_per_request(L, c->per_request) != KVR_OK)
        goto out;
    if (c->json)
        print_json(L, &pr, ttft_slo, tpot_slo, slo_source, &r);
    else
        print_text(L, &pr, ttft_slo, tpot_slo, slo_source, &r);
    fflush(stdout);
    ex = KVR_EXIT_OK;
out:
    kvr_tokenizer_free(tok);
    free_load(L);
    free(L);
    return ex;
}
