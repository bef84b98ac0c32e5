/* router.h - the coordinator's cluster side (runs on the MPI thread): the node table
 * (grown from HELLOs, no fixed size), admission, placement of caches on decode nodes by
 * free KV memory, routing of prompts to prefill nodes by queued prompt tokens, the
 * waiting queue, deadlines (the queue's, the client's, the server's maximum request age)
 * and the reaper that enforces them, liveness of nodes (and taking back a node that
 * spoke again after being declared dead), and re-running the requests of a node that
 * died. It implements coord.h's submit/cancel/status/limits for the front ends, and
 * talks to nodes only through a coord_transport (transport.h). */
#ifndef KVR_ROUTER_H
#define KVR_ROUTER_H

#include <stdint.h>

#include "autoscale.h"
#include "coord.h"
#include "transport.h"

struct coord_router_params {
    struct coord_transport tp;           /* how to reach nodes; used from the router's thread */
    const struct coord_stream_ops *ops;  /* how streams hear of their requests */
    int expected_nodes;                  /* nodes the job starts with (wait_nodes waits for them) */
    int kv_type;                         /* enum kvr_kv_type every node's pool must have */
    int queue_max;                       /* admitted requests waiting at most (then KVR_EFULL) */
    double queue_timeout_s;              /* wait for decode memory at most (then KVR_ETIMEDOUT),
                                          * counted from arrival and again from each re-run */
    double node_timeout_s;               /* a node silent this long is dead */
    int max_retries;                     /* re-runs of a request whose node died */
    double max_request_age_s;            /* every request ends by then (KVR_EDEADLINE); > 0 */
    double (*now)(void);                 /* the clock (seconds); NULL: kvr_clock_now */
    /* The elastic decode pool (issue 14; docs/ARCHITECTURE.md). */
    int autoscale;                       /* 1: the autoscaler sets the pool's size in [min, max] */
    int decode_min, decode_max;          /* bounds of the pool (max also bounds Scale) */
    int can_spawn;                       /* tp.spawn can start decode nodes (--decode-spawn) */
    const char *join_dir;                /* nodes started elsewhere leave their port here (borrowed) */
    struct coord_autoscale_params as;    /* the autoscaler's thresholds and windows */
    double drain_timeout_s;              /* a draining node's requests re-run elsewhere after this */
    double join_timeout_s;               /* a node that has not joined (or left) by then is given up */
};

/* Creates the router. KVR_EINVAL, KVR_ENOMEM. Returns owned *out, free with
 * coord_router_free. */
int coord_router_create(const struct coord_router_params *p, struct coord_router **out);

/* Frees the router; every request must have finished (coord_router_shutdown). NULL ok. */
void coord_router_free(struct coord_router *r);

/* Waits up to timeout_s for expected_nodes HELLOs and checks they serve the same model
 * (fingerprint, context, vocabulary), store their KV caches as p.kv_type (a prefill
 * node's blocks enter a decode node's pool unconverted), and that each set up. On success *seq_len and *vocab
 * receive the model's. KVR_ETIMEDOUT, KVR_EFINGERPRINT, KVR_EINVAL (a node failed to set
 * up or sent a bad HELLO, or no decode node / no way to prefill), each logged. */
int coord_router_wait_nodes(struct coord_router *r, double timeout_s, uint64_t fingerprint, int *seq_len,
                            int *vocab);

/* One turn of the loop: new requests and cancels from the front ends, every message that
 * waits (all of them before liveness is judged), the reaper, dispatch, liveness, pings
 * and the status snapshot. Returns 1 if it did something (the caller sleeps a little when
 * it returns 0). */
int coord_router_poll(struct coord_router *r);

/* Stops admitting (submit returns KVR_EUNAVAIL), finishes every request with
 * KVR_EUNAVAIL and tells every live node to shut down. */
void coord_router_shutdown(struct coord_router *r);

/* Counters for tests and logs (router thread only). */
struct coord_router_counters {
    uint64_t admitted, finished;
    uint64_t reruns;            /* attempts started again after a node died */
    uint64_t reaped;            /* ended by a deadline or the maximum age */
    uint64_t watchdog;          /* ended because no token came after the prefill */
    uint64_t nodes_died, nodes_rejoined, resets_sent;
    uint64_t stalls;            /* turns that came after the loop itself stalled */
    uint64_t cancels_pending;   /* cancels waiting for a retry now */
    uint64_t joins, leaves;     /* decode nodes that joined and left the running cluster */
};
void coord_router_counters(const struct coord_router *r, struct coord_router_counters *out);

#endif /* KVR_ROUTER_H */
