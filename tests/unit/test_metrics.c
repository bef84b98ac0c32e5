/* test_metrics.c - the coordinator's Prometheus metrics (coordinator/metrics.c): what the
 * forwarding callbacks count for each way a request ends, that they forward every call to
 * the front end's own callbacks, the serving rule, and the text they render (labels
 * escaped, histograms cumulative, one sample per node and metric). The end-to-end test
 * (tests/e2e/test_http.py) reads the same text with prometheus_client. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "clock.h"
#include "metrics.h"
#include "status.h"

struct fake_stream {
    struct coord_stream_head head; /* first, as in every front end */
    int n_tokens, n_finish, status;
    enum coord_finish reason;
};

static void f_tokens(struct coord_stream *s, const int *ids, int n) {
    (void)ids;
    ((struct fake_stream *)s)->n_tokens += n;
}

static void f_finish(struct coord_stream *s, int status, enum coord_finish reason,
                     const struct coord_usage *u, const char *msg) {
    (void)u;
    (void)msg;
    struct fake_stream *f = (struct fake_stream *)s;
    f->n_finish++;
    f->status = status;
    f->reason = reason;
}

static const struct coord_stream_ops fake_ops = {.tokens = f_tokens, .finish = f_finish};

/* The value of the sample line that starts with prefix (name and labels), or -1. */
static double sample(const char *text, const char *prefix) {
    const char *p = text;
    size_t n = strlen(prefix);
    while ((p = strstr(p, prefix)) != NULL) {
        if ((p == text || p[-1] == '\n') && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        p += n;
    }
    return -1;
}

/* Runs one request through coord_front_ops: n tokens, then the given end. */
static void run(struct coord_metrics *m, int n, int status, enum coord_finish reason, int by_text,
                int prompt, int placed) {
    struct fake_stream f = {.head = {.ops = &fake_ops, .metrics = m, .t_arrival = kvr_clock_now()}};
    f.head.stopped_by_text = by_text;
    int id = 7;
    for (int i = 0; i < n; i++)
        coord_front_ops.tokens((struct coord_stream *)&f, &id, 1);
    struct coord_usage u = {.prompt_tokens = prompt,
                            .generated_tokens = n,
                            .queue_ms = 2.0,
                            .total_ms = 500.0,
                            .prefill_rank = placed ? 1 : -1,
                            .decode_rank = placed ? 2 : -1};
    coord_front_ops.finish((struct coord_stream *)&f, status, reason, &u, "");
    CHECK_EQ(f.n_tokens, n); /* forwarded, every call */
    CHECK_EQ(f.n_finish, 1);
    CHECK_EQ(f.status, status);
    CHECK_EQ((int)f.reason, (int)reason);
}

int main(void) {
    struct coord_metrics *m = NULL;
    CHECK_EQ(coord_metrics_create("model \"x\"\\y", &m), KVR_OK);
    run(m, 5, KVR_OK, COORD_FINISH_LENGTH, 0, 4, 1);       /* length */
    run(m, 3, KVR_OK, COORD_FINISH_CONTEXT, 0, 6, 1);      /* length (the context) */
    run(m, 2, KVR_OK, COORD_FINISH_STOP, 0, 3, 1);         /* stop (EOS) */
    run(m, 4, KVR_OK, COORD_FINISH_CANCELLED, 1, 2, 1);    /* stop (a stop string, then cancel) */
    run(m, 1, KVR_OK, COORD_FINISH_CANCELLED, 0, 5, 1);    /* abort (client left) */
    run(m, 2, KVR_EINTERNAL, COORD_FINISH_ERROR, 0, 7, 1); /* abort, failed */
    run(m, 0, KVR_ETIMEDOUT, COORD_FINISH_ERROR, 0, 9, 0); /* never placed: a queue timeout */
    coord_metrics_reject(m, coord_reject_from_status(KVR_EFULL));
    coord_metrics_reject(m, coord_reject_from_status(KVR_EINVAL));
    coord_metrics_reject(m, coord_reject_from_status(KVR_EUNAVAIL));
    coord_metrics_reject(m, COORD_REJECT_COUNT); /* out of range: ignored */
    coord_metrics_reject(NULL, COORD_REJECT_INVALID);

    struct coord_node_status nodes[3] = {
        {.rank = 1,
         .role = "prefill",
         .host = "a\"b",
         .alive = 1,
         .kv_bytes_total = 100,
         .kv_bytes_used = 50},
        {.rank = 2,
         .role = "decode",
         .host = "h",
         .alive = 1,
         .kv_bytes_total = 1000,
         .kv_bytes_used = 250,
         .kv_bytes_reserved = 64,
         .running = 3,
         .queued = 1},
        {.rank = 3,
         .role = "decode",
         .host = "h",
         .alive = 0,
         .kv_bytes_total = 1000,
         .kv_bytes_used = 1000},
    };
    struct coord_cluster_status st = {.n_nodes = 3,
                                      .nodes = nodes,
                                      .waiting_requests = 2,
                                      .running_requests = 3,
                                      .finished_requests = 7, .node_deaths = 1, .reruns = 3};
    char *text = NULL;
    size_t len = 0;
    CHECK_EQ(coord_metrics_render(m, &st, &text, &len), KVR_OK);
    CHECK(text != NULL && strlen(text) == len);
#define M "{model_name=\"model \\\"x\\\"\\\\y\"}"
    CHECK_NEAR(sample(text, "vllm:num_requests_running" M), 3, 0);
    CHECK_NEAR(sample(text, "vllm:num_requests_waiting" M), 2, 0);
    /* Live decode pools only: 250 of 1000 (the dead node and the prefill node not counted). */
    CHECK_NEAR(sample(text, "vllm:kv_cache_usage_perc" M), 0.25, 1e-9);
    CHECK_NEAR(sample(text, "vllm:generation_tokens_total" M), 17, 0);
    CHECK_NEAR(sample(text, "vllm:prompt_tokens_total" M), 4 + 6 + 3 + 2 + 5 + 7,
               0); /* not the unplaced one */
    CHECK_NEAR(sample(text, "vllm:request_success_total{finished_reason=\"length\",model_name="
                            "\"model \\\"x\\\"\\\\y\"}"),
               2, 0);
    CHECK_NEAR(sample(text, "vllm:request_success_total{finished_reason=\"stop\",model_name="
                            "\"model \\\"x\\\"\\\\y\"}"),
               2, 0);
    CHECK_NEAR(sample(text, "vllm:request_success_total{finished_reason=\"abort\",model_name="
                            "\"model \\\"x\\\"\\\\y\"}"),
               2, 0);
    /* TTFT once per request that produced a token (6), ITL once per later token (17 - 6). */
    CHECK_NEAR(sample(text, "vllm:time_to_first_token_seconds_count" M), 6, 0);
    CHECK_NEAR(sample(text, "vllm:inter_token_latency_seconds_count" M), 11, 0);
    CHECK_NEAR(sample(text, "vllm:e2e_request_latency_seconds_count" M), 6, 0);
    /* 500 ms end to end: above the 0.3 and 0.5 s bounds? 0.5 is "<= 0.5": in it. */
    CHECK_NEAR(sample(text, "vllm:e2e_request_latency_seconds_bucket{le=\"0.3\",model_name=\"model "
                            "\\\"x\\\"\\\\y\"}"),
               0, 0);
    CHECK_NEAR(sample(text, "vllm:e2e_request_latency_seconds_bucket{le=\"0.5\",model_name=\"model "
                            "\\\"x\\\"\\\\y\"}"),
               6, 0);
    CHECK_NEAR(sample(text, "vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name="
                            "\"model \\\"x\\\"\\\\y\"}"),
               6, 0);
    CHECK_NEAR(sample(text, "vllm:e2e_request_latency_seconds_sum" M), 3.0, 1e-9);
    CHECK_NEAR(sample(text, "vllm:request_queue_time_seconds_bucket{le=\"0.3\",model_name=\"model "
                            "\\\"x\\\"\\\\y\"}"),
               6, 0);
    CHECK_NEAR(sample(text, "kvrelay_requests_rejected_total{reason=\"queue_timeout\"}"), 1, 0);
    CHECK_NEAR(sample(text, "kvrelay_requests_rejected_total{reason=\"queue_full\"}"), 1, 0);
    CHECK_NEAR(sample(text, "kvrelay_requests_rejected_total{reason=\"invalid\"}"), 1, 0);
    CHECK_NEAR(sample(text, "kvrelay_requests_rejected_total{reason=\"unavailable\"}"), 1, 0);
    CHECK_NEAR(sample(text, "kvrelay_requests_failed_total"), 1, 0);
    CHECK_NEAR(sample(text, "kvrelay_requests_finished_total"), 7, 0);
    CHECK_NEAR(sample(text, "kvrelay_node_deaths_total"), 1, 0);
    CHECK_NEAR(sample(text, "kvrelay_request_reruns_total"), 3, 0);
    CHECK_NEAR(sample(text, "kvrelay_node_alive{rank=\"1\",role=\"prefill\",host=\"a\\\"b\"}"), 1,
               0);
    CHECK_NEAR(sample(text, "kvrelay_node_alive{rank=\"3\",role=\"decode\",host=\"h\"}"), 0, 0);
    CHECK_NEAR(
        sample(text, "kvrelay_node_kv_bytes_reserved{rank=\"2\",role=\"decode\",host=\"h\"}"), 64,
        0);
    CHECK_NEAR(sample(text, "kvrelay_node_running{rank=\"2\",role=\"decode\",host=\"h\"}"), 3, 0);
    CHECK_NEAR(sample(text, "kvrelay_node_queued{rank=\"2\",role=\"decode\",host=\"h\"}"), 1, 0);
    CHECK(strstr(text, "# TYPE vllm:time_to_first_token_seconds histogram\n") != NULL);
    CHECK(strstr(text, "# TYPE vllm:request_success_total counter\n") != NULL);
    /* Histograms are cumulative: every bucket of TTFT is at most the next. */
    double prev = 0;
    int n_b = 0;
    for (const char *p = text; (p = strstr(p, "vllm:time_to_first_token_seconds_bucket{")) != NULL;
         p++) {
        double v = strtod(strchr(p, '}') + 2, NULL);
        CHECK(v >= prev);
        prev = v;
        n_b++;
    }
    CHECK_EQ(n_b, 23); /* vLLM's 22 bounds and +Inf */
    free(text);

    char why[256];
    CHECK_EQ(coord_cluster_serving(&st, 0, why, sizeof why), 1);
    CHECK(strstr(why, "1 prefill and 1 decode nodes alive, 1 down") != NULL);
    CHECK_EQ(coord_cluster_serving(&st, 1, why, sizeof why), 0); /* stopping */
    nodes[1].alive = 0;
    CHECK_EQ(coord_cluster_serving(&st, 0, why, sizeof why), 0);
    CHECK(strstr(why, "cannot serve Generate") != NULL);
    coord_metrics_free(m);
    coord_metrics_free(NULL);
    CHECK_DONE();
}
