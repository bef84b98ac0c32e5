/* coord.h - the contract between the coordinator's two halves.
 *
 * grpc_server.c (the gRPC thread) turns Generate calls into coord_requests and hands
 * them to the router; router.c (the MPI thread) places them on prefill and decode nodes
 * and reports back through coord_stream_ops, which grpc_server.c implements. The router
 * never builds client-facing text beyond a short reason; grpc_server.c maps kvr_status to
 * gRPC status codes (the one edge, see style.md section 5). */
#ifndef KVR_COORD_H
#define KVR_COORD_H

#include <stdint.h>
#include <stdlib.h>

#include "kv_cache.h"

/* Why a generation ended. Values travel in MPI messages: append only. */
enum coord_finish {
    COORD_FINISH_NONE = 0,
    COORD_FINISH_LENGTH = 1,    /* max_tokens generated */
    COORD_FINISH_STOP = 2,      /* the model produced BOS or EOS (and stop_at_eos) */
    COORD_FINISH_CONTEXT = 3,   /* the dense cache reached the model's context */
    COORD_FINISH_CANCELLED = 4, /* the client went away */
    COORD_FINISH_ERROR = 5,     /* see the status */
};

struct coord_usage {
    int prompt_tokens;    /* including BOS */
    int generated_tokens;
    double queue_ms;      /* arrival to the start of its prefill */
    double ttft_ms;       /* arrival to the first generated token reaching the coordinator */
    double tpot_ms;       /* mean time between later tokens */
    double total_ms;      /* arrival to finish */
    int prefill_rank;     /* -1 if never placed */
    int decode_rank;
};

struct coord_stream; /* owned by grpc_server.c; opaque to the router */

/* Called by the router on its own thread. Each stream gets any number of tokens calls
 * and then exactly one finish call, after which the router never touches it again. */
struct coord_stream_ops {
    /* ids: n new token ids in order; borrowed for the call. */
    void (*tokens)(struct coord_stream *s, const int *ids, int n);
    /* status: KVR_OK for a normal end (reason LENGTH, STOP, CONTEXT, CANCELLED), else the
     * failure (KVR_ETIMEDOUT: no decode node had room before the queue deadline;
     * KVR_ENOSPC: the request can never fit; KVR_EUNAVAIL: a node died or the cluster is
     * stopping; KVR_EDEADLINE: the request's deadline or the server's maximum request age
     * passed; KVR_EABORTED: a node ran out of room or a message was lost; KVR_EINTERNAL: a
     * node refused what the edge admitted; KVR_ECHECKSUM & co: a corrupt KV transfer).
     * Node-side failures never come as the client's KVR_EINVAL. msg is one line without a
     * newline (a node's reason when it failed there), borrowed for the call. u is never
     * NULL. */
    void (*finish)(struct coord_stream *s, int status, enum coord_finish reason,
                   const struct coord_usage *u, const char *msg);
};

struct coord_request {
    int *tokens;          /* (n_tokens) prompt ids, BOS first; the router takes ownership (free) */
    int n_tokens;
    int max_tokens;       /* >= 1, and n_tokens + max_tokens <= context under dense */
    float temperature;    /* >= 0; 0 = greedy */
    float top_p;          /* (0, 1]; 1 = off */
    uint64_t seed;
    int stop_at_eos;      /* 1: BOS or EOS ends the generation; 0: neither (fixed length) */
    struct kvr_kv_policy_params policy;
    double t_arrival;     /* kvr_clock_now() when the call arrived */
    double t_deadline;    /* kvr_clock_now() time by which it must end (the client's
                           * deadline); 0 = none (the server's maximum age still applies) */
    struct coord_stream *stream; /* receives the events */
};

/* What one live node can hold, as it advertised in its HELLO. */
struct coord_node_limits {
    int rank;
    int role;             /* enum kvr_role */
    int colocated;
    int block_tokens;     /* >= 1 */
    int n_blocks;         /* KV blocks in its pool, >= 1 */
    int max_batch_tokens; /* tokens per forward call */
    int n_ctx_max;        /* keys one query may attend */
};

/* What the cluster can hold now: the edge checks every request against it (docs/API.md,
 * "Limits"). */
struct coord_limits {
    int seq_len;          /* model context; 0 until the nodes are up */
    int vocab_size;
    int max_tokens;       /* most tokens one request may generate */
    int n_nodes;
    struct coord_node_limits *nodes; /* (n_nodes) live nodes that set up, owned */
};

static inline void coord_limits_deinit(struct coord_limits *l) {
    free(l->nodes);
    l->nodes = NULL;
    l->n_nodes = 0;
}

struct coord_node_status {
    int rank;
    char role[16];            /* "prefill" or "decode" */
    char state[12];           /* "serving", "joining", "draining", "leaving", "parked", "dead" */
    char host[64];
    int alive;                /* 0 once the node stopped reporting or failed */
    uint64_t kv_bytes_total;
    uint64_t kv_bytes_used;   /* as the node reports it */
    uint64_t kv_bytes_free;
    uint64_t kv_bytes_reserved; /* promised by placement, not yet used */
    int running;              /* sequences decoding (decode) or prompts in the pass (prefill) */
    int queued;               /* waiting at the node */
    uint64_t queued_prompt_tokens;
    double report_age_ms;     /* since its last report */
};

struct coord_cluster_status {
    int n_nodes;
    struct coord_node_status *nodes; /* (n_nodes) owned: free with coord_cluster_status_deinit */
    int waiting_requests;     /* admitted, waiting for decode memory */
    int running_requests;
    uint64_t finished_requests;
    uint64_t node_deaths;     /* nodes declared dead since start */
    uint64_t reruns;          /* attempts started again after a node died or a drain timed out */
    int seq_len;              /* model context */
    int vocab_size;
    int decode_desired;       /* the decode pool's target size */
    int decode_min, decode_max;
    int autoscale;            /* the autoscaler is on */
    char last_decision[256];  /* the elastic pool's last decision and why ("" none) */
};

struct coord_router;

/* Thread-safe. Takes ownership of req->tokens (also on error) and copies the rest. On
 * KVR_OK the request is admitted and *id is its id; the stream will get its events. On
 * KVR_EFULL (admission queue full) or KVR_EUNAVAIL (shutting down, no nodes) the stream
 * gets no callbacks: the caller answers the client itself. */
int coord_router_submit(struct coord_router *r, struct coord_request *req, uint64_t *id);

/* Thread-safe. Asks the router to drop request id (the client cancelled or went away);
 * its blocks are freed on the decode node and its stream still gets one finish call
 * (CANCELLED), unless it already finished. Unknown ids are ignored. */
void coord_router_cancel(struct coord_router *r, uint64_t id);

/* Thread-safe. Sets the decode pool's target size (Scale RPC): nodes join (spawned, or
 * parked ones come back) or drain until it holds. KVR_OK, KVR_EINVAL (outside [1 or
 * --decode-min, --decode-max]), KVR_ENOTSUP (must grow and cannot start nodes); msg: one
 * line for the client. */
int coord_router_scale(struct coord_router *r, int n_decode, char *msg, size_t len);

/* Thread-safe. Drains decode node `rank` (Drain RPC): no new placements, its requests
 * finish (or re-run elsewhere after the drain timeout), then it leaves (spawned) or parks.
 * KVR_OK, KVR_EINVAL (not a serving decode node, or the last one), KVR_ENOMEM. */
int coord_router_drain(struct coord_router *r, int rank, char *msg, size_t len);

static inline void coord_cluster_status_deinit(struct coord_cluster_status *s) {
    free(s->nodes);
    s->nodes = NULL;
    s->n_nodes = 0;
}

/* Thread-safe snapshot of the cluster, every node it knows (no fixed maximum). KVR_OK or
 * KVR_ENOMEM; *out is owned by the caller (coord_cluster_status_deinit). */
int coord_router_status(struct coord_router *r, struct coord_cluster_status *out);

/* Thread-safe copy of what the cluster can hold now. KVR_OK or KVR_ENOMEM; *out owned by
 * the caller (coord_limits_deinit). */
int coord_router_limits(struct coord_router *r, struct coord_limits *out);

#endif /* KVR_COORD_H */
