/* metrics.h - the coordinator's Prometheus metrics (issue 10): vLLM's names and buckets
 * (vllm:*) so that dashboards and autoscaler rules written for vLLM read kvrelay unchanged,
 * and kvrelay's own (kvrelay_*), rendered in the text exposition format 0.0.4 for GET
 * /metrics (http_server.c). docs/API.md lists every metric and what it counts.
 *
 * Requests are counted where both front ends meet: the router reports tokens and ends
 * through coord_front_ops, which records them here and then calls the owning front end's
 * own callbacks. Every stream therefore starts with a struct coord_stream_head. */
#ifndef KVR_COORD_METRICS_H
#define KVR_COORD_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "coord.h"

struct coord_metrics;

/* The first member of every front end's struct coord_stream (gRPC and HTTP): what the
 * forwarding callbacks need. The front end fills ops, metrics and t_arrival before it
 * submits; the rest belongs to the router's thread. */
struct coord_stream_head {
    const struct coord_stream_ops *ops; /* the front end's own callbacks */
    struct coord_metrics *metrics;      /* NULL: not counted */
    double t_arrival;                   /* kvr_clock_now() when the request arrived */
    double t_last;                      /* arrival of the previous token (router thread) */
    int n_tokens;                       /* tokens seen so far (router thread) */
    _Atomic int stopped_by_text;        /* set (before the front end cancels) when a stop
                                         * string ended it: counted as "stop", not "abort" */
};

/* Forwards to head->ops after counting (tokens, time to first token, inter-token latency,
 * end-to-end latency, queue time, finish reasons). Give this to the router. */
extern const struct coord_stream_ops coord_front_ops;

/* Why the edge refused a request before it ran (kvrelay_requests_rejected_total{reason}). */
enum coord_reject {
    COORD_REJECT_INVALID = 0,       /* malformed or out of range (400 / INVALID_ARGUMENT) */
    COORD_REJECT_TOO_LARGE = 1,     /* no node could ever hold it */
    COORD_REJECT_QUEUE_FULL = 2,    /* the admission queue was full (429) */
    COORD_REJECT_QUEUE_TIMEOUT = 3, /* no decode memory before the queue timeout */
    COORD_REJECT_UNAVAILABLE = 4,   /* no nodes, or stopping (503) */
    COORD_REJECT_UNAUTHENTICATED = 5,
    COORD_REJECT_COUNT
};

/* The reason a kvr_status refusal is counted under. */
enum coord_reject coord_reject_from_status(int status);

/* model_name: the label value of every vllm:* series (copied). KVR_OK or KVR_ENOMEM;
 * *out owned, free with coord_metrics_free. */
int coord_metrics_create(const char *model_name, struct coord_metrics **out);
void coord_metrics_free(struct coord_metrics *m);

/* Counts one refusal. Thread-safe; m may be NULL. */
void coord_metrics_reject(struct coord_metrics *m, enum coord_reject why);

/* Renders every metric, the cluster's gauges taken from st (coord_router_status), as
 * text exposition format 0.0.4. Returns KVR_OK with *text owned (free()) of *len bytes,
 * or KVR_ENOMEM. Thread-safe. */
int coord_metrics_render(struct coord_metrics *m, const struct coord_cluster_status *st,
                         char **text, size_t *len);

/* Whether the cluster in st can serve Generate now: not stopping and at least one live node
 * that can prefill and one that can decode (a role other than "prefill"/"decode", such as a
 * colocated node, counts as both). why receives a one-line reason either way. */
int coord_cluster_serving(const struct coord_cluster_status *st, int stopping, char *why,
                          size_t why_len);

#endif /* KVR_COORD_METRICS_H */
