/* fake_router.h - a stand-in for coordinator/router.c in the gRPC tests: implements
 * coord.h's coord_router_submit/cancel/status. Each admitted request gets a thread that
 * streams canned tokens through coord_grpc_stream_ops and then finishes as configured, or
 * stalls until it is cancelled. Counts every call so tests can assert exact numbers. */
#ifndef KVR_FAKE_ROUTER_H
#define KVR_FAKE_ROUTER_H

#include <stdint.h>

#include "coord.h"

struct fake_router_cfg {
    int submit_status; /* != KVR_OK: submit refuses with it (no callbacks) */
    const int *tokens; /* (n_tokens) ids to stream, borrowed; NULL: 3 + (seed + i) % 500 */
    int n_tokens;
    int emit;          /* tokens to stream; -1 = max_tokens (capped by n_tokens if set) */
    int per_call;      /* ids per tokens() call (>= 1) */
    int delay_us;      /* pause before each tokens() call */
    int stall;         /* 1: after streaming, wait for a cancel (at most 30 s) */
    int finish_status; /* status of the finish call */
    enum coord_finish finish_reason;
    const char *finish_msg;   /* borrowed */
    struct coord_usage usage; /* reported at finish (generated_tokens = tokens streamed) */
};

/* Replaces the configuration used by later submits (copied; tokens stays borrowed). */
void fake_router_configure(const struct fake_router_cfg *cfg);

/* The snapshot coord_router_status returns (copied, nodes included). */
void fake_router_set_status(const struct coord_cluster_status *st);

/* The limits coord_router_limits returns (lim->nodes borrowed until the next call);
 * default: context 512, vocab 512, one prefill and one large decode node. */
void fake_router_set_limits(const struct coord_limits *lim);

/* The router handle to give coord_grpc_start (the fake is a process-wide singleton). */
struct coord_router *fake_router_get(void);

struct fake_router_stats {
    int n_submits; /* calls to coord_router_submit, refused ones included */
    int n_admitted;
    int n_cancels;             /* calls to coord_router_cancel */
    int n_cancel_unknown;      /* ... with an id that was never admitted */
    int n_cancel_after_finish; /* ... for a request that had already finished */
    int n_finishes;            /* finish callbacks delivered */
    int n_running;             /* request threads not yet done */
};
void fake_router_stats(struct fake_router_stats *out);

/* Cancels received for request id (0 if unknown). */
int fake_router_cancels_of(uint64_t id);

/* A snapshot of the last submitted request (tokens copied, up to 4096); valid until the
 * next call. For the test's main thread. */
const struct coord_request *fake_router_last(void);

/* Waits until every request thread ended and joins them. 0, or -1 on timeout. */
int fake_router_wait_idle(double timeout_s);

/* Joins everything and forgets all requests and counters (keeps cfg and status); the
 * next admitted request gets id 100, then 101, ... */
void fake_router_reset(void);

#endif /* KVR_FAKE_ROUTER_H */
