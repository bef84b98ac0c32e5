/* metrics.c - Prometheus metrics of the coordinator (see metrics.h): counters and
 * histograms fed by the router's thread through coord_front_ops and by the front ends'
 * refusals, rendered with the cluster's gauges for GET /metrics. One mutex guards all;
 * the router's thread holds it for a few additions per token. */
#include "metrics.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "status.h"

/* vLLM's buckets (vllm/v1/metrics/loggers.py), so that histogram_quantile() rules and
 * dashboards written for vLLM see the same le labels. */
static const double ttft_buckets[] = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                      0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                      20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
static const double itl_buckets[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                     0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double latency_buckets[] = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                         5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                         60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

#define N_BUCKETS_MAX 24

struct histogram {
    const double *le; /* (n) upper bounds, ascending; +Inf is implied */
    int n;
    uint64_t count[N_BUCKETS_MAX + 1]; /* per bucket (not cumulative); [n] = above the last */
    double sum;
    uint64_t total;
};

enum { FIN_STOP, FIN_LENGTH, FIN_ABORT, FIN_COUNT };
static const char *const fin_names[FIN_COUNT] = {"stop", "length", "abort"};
static const char *const reject_names[COORD_REJECT_COUNT] = {
    "invalid", "too_large", "queue_full", "queue_timeout", "unavailable", "unauthenticated"};

struct coord_metrics {
    pthread_mutex_t mu;
    char *model_name; /* escaped for a label value */
    uint64_t prompt_tokens, generation_tokens;
    uint64_t success[FIN_COUNT];
    uint64_t rejected[COORD_REJECT_COUNT];
    uint64_t failed; /* ended with an error status after admission */
    struct histogram ttft, itl, e2e, queue;
};

static void hist_init(struct histogram *h, const double *le, int n) {
    memset(h, 0, sizeof *h);
    h->le = le;
    h->n = n;
}

static void hist_observe(struct histogram *h, double v) {
    int i = 0;
    while (i < h->n && v > h->le[i])
        i++;
    h->count[i]++;
    h->sum += v;
    h->total++;
}

/* A label value with \, " and newline escaped (exposition format 0.0.4). */
static char *label_escape(const char *s) {
    size_t n = 0;
    for (const char *p = s; *p; p++)
        n += (*p == '\\' || *p == '"' || *p == '\n') ? 2 : 1;
    char *out = malloc(n + 1), *o = out;
    if (!out)
        return NULL;
    for (const char *p = s; *p; p++) {
        if (*p == '\\' || *p == '"' || *p == '\n') {
            *o++ = '\\';
            *o++ = *p == '\n' ? 'n' : *p;
        } else {
            *o++ = *p;
        }
    }
    *o = '\0';
    return out;
}

int coord_metrics_create(const char *model_name, struct coord_metrics **out) {
    *out = NULL;
    struct coord_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return KVR_ENOMEM;
    if (!(m->model_name = label_escape(model_name ? model_name : ""))) {
        free(m);
        return KVR_ENOMEM;
    }
    pthread_mutex_init(&m->mu, NULL);
    hist_init(&m->ttft, ttft_buckets, (int)(sizeof ttft_buckets / sizeof ttft_buckets[0]));
    hist_init(&m->itl, itl_buckets, (int)(sizeof itl_buckets / sizeof itl_buckets[0]));
    hist_init(&m->e2e, latency_buckets, (int)(sizeof latency_buckets / sizeof latency_buckets[0]));
    hist_init(&m->queue, latency_buckets,
              (int)(sizeof latency_buckets / sizeof latency_buckets[0]));
    *out = m;
    return KVR_OK;
}

void coord_metrics_free(struct coord_metrics *m) {
    if (!m)
        return;
    pthread_mutex_destroy(&m->mu);
    free(m->model_name);
    free(m);
}

enum coord_reject coord_reject_from_status(int status) {
    switch (status) {
    case KVR_ENOSPC:
        return COORD_REJECT_TOO_LARGE;
    case KVR_EFULL:
        return COORD_REJECT_QUEUE_FULL;
    case KVR_ETIMEDOUT:
        return COORD_REJECT_QUEUE_TIMEOUT;
    case KVR_EUNAVAIL:
    case KVR_EMPI:
        return COORD_REJECT_UNAVAILABLE;
    default:
        return COORD_REJECT_INVALID;
    }
}

void coord_metrics_reject(struct coord_metrics *m, enum coord_reject why) {
    if (!m || (int)why < 0 || why >= COORD_REJECT_COUNT)
        return;
    pthread_mutex_lock(&m->mu);
    m->rejected[why]++;
    pthread_mutex_unlock(&m->mu);
}

/* ---- the forwarding callbacks (router thread) -------------------------------------------- */

static void front_tokens(struct coord_stream *s, const int *ids, int n) {
    struct coord_stream_head *h = (struct coord_stream_head *)s;
    if (h->metrics && n > 0) {
        double now = kvr_clock_now();
        struct coord_metrics *m = h->metrics;
        pthread_mutex_lock(&m->mu);
        m->generation_tokens += (uint64_t)n;
        if (h->n_tokens == 0)
            hist_observe(&m->ttft, now - h->t_arrival);
        else
            hist_observe(&m->itl, now - h->t_last);
        /* Tokens that arrive together are n - 1 gaps of zero: the router hands them over
         * one by one today, so this only matters for a future batched hand-over. */
        for (int i = 1; i < n; i++)
            hist_observe(&m->itl, 0.0);
        pthread_mutex_unlock(&m->mu);
        h->t_last = now;
    }
    h->n_tokens += n;
    h->ops->tokens(s, ids, n);
}

static void front_finish(struct coord_stream *s, int status, enum coord_finish reason,
                         const struct coord_usage *u, const char *msg) {
    struct coord_stream_head *h = (struct coord_stream_head *)s;
    struct coord_metrics *m = h->metrics;
    if (m) {
        pthread_mutex_lock(&m->mu);
        if (status == KVR_ETIMEDOUT && u->generated_tokens == 0) {
            m->rejected[COORD_REJECT_QUEUE_TIMEOUT]++;
        } else {
            int fin = FIN_ABORT;
            if (status == KVR_OK && reason == COORD_FINISH_STOP)
                fin = FIN_STOP;
            else if (status == KVR_OK &&
                     (reason == COORD_FINISH_LENGTH || reason == COORD_FINISH_CONTEXT))
                fin = FIN_LENGTH;
            else if (status == KVR_OK && reason == COORD_FINISH_CANCELLED && h->stopped_by_text)
                fin = FIN_STOP;
            m->success[fin]++;
            if (status != KVR_OK)
                m->failed++;
            /* End to end: every admitted request that did not time out in the queue (that
             * one is a refusal, counted above). */
            hist_observe(&m->e2e, u->total_ms * 1e-3);
        }
        /* A prompt counts once it was prefilled: its request was placed, or it produced. */
        if (u->prefill_rank >= 0 || u->generated_tokens > 0) {
            m->prompt_tokens += (uint64_t)(u->prompt_tokens > 0 ? u->prompt_tokens : 0);
            hist_observe(&m->queue, u->queue_ms * 1e-3);
        }
        pthread_mutex_unlock(&m->mu);
    }
    h->ops->finish(s, status, reason, u, msg);
}

const struct coord_stream_ops coord_front_ops = {.tokens = front_tokens, .finish = front_finish};

/* ---- rendering ---------------------------------------------------------------------------- */

static void put_help(FILE *f, const char *name, const char *type, const char *help) {
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void put_hist(FILE *f, const char *name, const char *help, const struct histogram *h,
                     const char *model) {
    put_help(f, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->count[i];
        fprintf(f, "%s_bucket{le=\"%g\",model_name=\"%s\"} %llu\n", name, h->le[i], model,
                (unsigned long long)cum);
    }
    cum += h->count[h->n];
    fprintf(f, "%s_bucket{le=\"+Inf\",model_name=\"%s\"} %llu\n", name, model,
            (unsigned long long)cum);
    fprintf(f, "%s_sum{model_name=\"%s\"} %.9g\n", name, model, h->sum);
    fprintf(f, "%s_count{model_name=\"%s\"} %llu\n", name, model, (unsigned long long)h->total);
}

int coord_cluster_serving(const struct coord_cluster_status *st, int stopping, char *why,
                          size_t why_len) {
    int n_pre = 0, n_dec = 0, n_dead = 0;
    for (int i = 0; i < st->n_nodes; i++) {
        const struct coord_node_status *ns = &st->nodes[i];
        if (!ns->alive) {
            n_dead++;
            continue;
        }
        n_pre += strncmp(ns->role, "decode", sizeof ns->role) != 0;
        n_dec += strncmp(ns->role, "prefill", sizeof ns->role) != 0;
    }
    int serving = !stopping && n_pre > 0 && n_dec > 0;
    snprintf(why, why_len,
             "%s%d prefill and %d decode nodes alive, %d down; %d waiting, %d running requests",
             stopping  ? "stopping; "
             : serving ? ""
                       : "cannot serve Generate: ",
             n_pre, n_dec, n_dead, st->waiting_requests, st->running_requests);
    return serving;
}

int coord_metrics_render(struct coord_metrics *m, const struct coord_cluster_status *st,
                         char **text, size_t *len) {
    *text = NULL;
    *len = 0;
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f)
        return KVR_ENOMEM;
    const char *mn = m->model_name;
    uint64_t kv_used = 0, kv_total = 0;
    for (int i = 0; i < st->n_nodes; i++) {
        const struct coord_node_status *ns = &st->nodes[i];
        if (ns->alive && strncmp(ns->role, "prefill", sizeof ns->role) != 0) {
            kv_used += ns->kv_bytes_used;
            kv_total += ns->kv_bytes_total;
        }
    }
    put_help(f, "vllm:num_requests_running", "gauge",
             "Requests generating now (placed on a decode node).");
    fprintf(f, "vllm:num_requests_running{model_name=\"%s\"} %d\n", mn, st->running_requests);
    put_help(f, "vllm:num_requests_waiting", "gauge",
             "Admitted requests waiting for KV memory on a decode node.");
    fprintf(f, "vllm:num_requests_waiting{model_name=\"%s\"} %d\n", mn, st->waiting_requests);
    put_help(f, "vllm:kv_cache_usage_perc", "gauge",
             "Fraction (0 to 1) of the live decode nodes' KV block pools in use, as the nodes last "
             "reported it.");
    fprintf(f, "vllm:kv_cache_usage_perc{model_name=\"%s\"} %.9g\n", mn,
            kv_total ? (double)kv_used / (double)kv_total : 0.0);

    pthread_mutex_lock(&m->mu);
    put_help(f, "vllm:prompt_tokens_total", "counter",
             "Prompt tokens (BOS included) of requests that ended after their prompt was "
             "prefilled; counted when "
             "the request ends.");
    fprintf(f, "vllm:prompt_tokens_total{model_name=\"%s\"} %llu\n", mn,
            (unsigned long long)m->prompt_tokens);
    put_help(f, "vllm:generation_tokens_total", "counter",
             "Tokens generated by the decode nodes and received by the coordinator (including "
             "tokens a client "
             "never saw because it left or a stop string ended the text).");
    fprintf(f, "vllm:generation_tokens_total{model_name=\"%s\"} %llu\n", mn,
            (unsigned long long)m->generation_tokens);
    put_help(f, "vllm:request_success_total", "counter",
             "Admitted requests that ended, by finish reason: stop (end of text or a stop string), "
             "length "
             "(max_tokens or the context), abort (cancelled, client gone, or failed).");
    for (int i = 0; i < FIN_COUNT; i++)
        fprintf(f, "vllm:request_success_total{finished_reason=\"%s\",model_name=\"%s\"} %llu\n",
                fin_names[i], mn, (unsigned long long)m->success[i]);
    put_hist(
        f, "vllm:time_to_first_token_seconds",
        "Arrival of the request at the coordinator to its first token reaching the coordinator.",
        &m->ttft, mn);
    put_hist(f, "vllm:inter_token_latency_seconds",
             "Time between consecutive tokens of one request, as they reach the coordinator.",
             &m->itl, mn);
    put_hist(f, "vllm:e2e_request_latency_seconds",
             "Arrival to the end of every admitted request (but those that timed out waiting for "
             "KV memory: refusals).",
             &m->e2e, mn);
    put_hist(f, "vllm:request_queue_time_seconds",
             "Arrival to the start of the request's prefill (waiting for KV memory included).",
             &m->queue, mn);
    put_help(f, "kvrelay_requests_rejected_total", "counter",
             "Requests refused at the edge before they ran, by reason.");
    for (int i = 0; i < COORD_REJECT_COUNT; i++)
        fprintf(f, "kvrelay_requests_rejected_total{reason=\"%s\"} %llu\n", reject_names[i],
                (unsigned long long)m->rejected[i]);
    put_help(f, "kvrelay_requests_failed_total", "counter",
             "Admitted requests that ended with an error (a node died past its re-runs, a "
             "deadline, a corrupt "
             "transfer).");
    fprintf(f, "kvrelay_requests_failed_total %llu\n", (unsigned long long)m->failed);
    pthread_mutex_unlock(&m->mu);

    put_help(f, "kvrelay_requests_finished_total", "counter",
             "Requests the router finished, any way.");
    fprintf(f, "kvrelay_requests_finished_total %llu\n", (unsigned long long)st->finished_requests);
    put_help(f, "kvrelay_node_deaths_total", "counter",
             "Nodes the coordinator declared dead (silent past --node-timeout, or MPI errors).");
    fprintf(f, "kvrelay_node_deaths_total %llu\n", (unsigned long long)st->node_deaths);
    put_help(f, "kvrelay_request_reruns_total", "counter",
             "Request attempts started again from the prompt after their node died or their drain timed out.");
    fprintf(f, "kvrelay_request_reruns_total %llu\n", (unsigned long long)st->reruns);

    static const struct {
        const char *name, *help;
        int kind;
    } node_metrics[] = {
        {"kvrelay_node_alive", "1 while the node reports, 0 once it was declared dead.", 0},
        {"kvrelay_node_kv_bytes_used", "KV pool bytes in use, as the node last reported it.", 1},
        {"kvrelay_node_kv_bytes_reserved", "KV pool bytes promised by placement and not yet used.",
         2},
        {"kvrelay_node_kv_bytes_total", "KV pool bytes of the node.", 3},
        {"kvrelay_node_running", "Sequences decoding (decode) or prompts in the pass (prefill).",
         4},
        {"kvrelay_node_queued", "Requests waiting at the node.", 5},
    };
    for (size_t k = 0; k < sizeof node_metrics / sizeof node_metrics[0]; k++) {
        put_help(f, node_metrics[k].name, "gauge", node_metrics[k].help);
        for (int i = 0; i < st->n_nodes; i++) {
            const struct coord_node_status *ns = &st->nodes[i];
            char role[sizeof ns->role + 1], host_raw[sizeof ns->host + 1];
            memcpy(role, ns->role, sizeof ns->role);
            role[sizeof ns->role] = '\0';
            memcpy(host_raw, ns->host, sizeof ns->host);
            host_raw[sizeof ns->host] = '\0';
            char *host = label_escape(host_raw), *rl = label_escape(role);
            unsigned long long v = 0;
            switch (node_metrics[k].kind) {
            case 0:
                v = (unsigned long long)(ns->alive != 0);
                break;
            case 1:
                v = ns->kv_bytes_used;
                break;
            case 2:
                v = ns->kv_bytes_reserved;
                break;
            case 3:
                v = ns->kv_bytes_total;
                break;
            case 4:
                v = (unsigned long long)(ns->running > 0 ? ns->running : 0);
                break;
            default:
                v = (unsigned long long)(ns->queued > 0 ? ns->queued : 0);
                break;
            }
            fprintf(f, "%s{rank=\"%d\",role=\"%s\",host=\"%s\"} %llu\n", node_metrics[k].name,
                    ns->rank, rl ? rl : "", host ? host : "", v);
            free(host);
            free(rl);
        }
    }
    if (fclose(f) != 0) {
        free(buf);
        return KVR_ENOMEM;
    }
    *text = buf;
    *len = n;
    return KVR_OK;
}
