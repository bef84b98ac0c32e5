/* router.h - the coordinator's cluster side (runs on the MPI thread): admission,
 * placement of caches on decode nodes by free KV memory, routing of prompts to prefill
 * nodes by queued prompt tokens, the waiting queue with its deadline, liveness of nodes
 * and re-running the requests of a node that died. It implements coord.h's
 * coord_router_submit/cancel/status for the gRPC thread. */
#ifndef KVR_ROUTER_H
#define KVR_ROUTER_H

#include "coord.h"

struct kvr_xfer;

struct coord_router_params {
    struct kvr_xfer *xfer;               /* borrowed; used from the router's thread only */
    const struct coord_stream_ops *ops;  /* how streams hear of their requests */
    int queue_max;                       /* admitted requests waiting at most (then KVR_EFULL) */
    double queue_timeout_s;              /* wait for decode memory at most (then KVR_ETIMEDOUT) */
    double node_timeout_s;               /* a node silent this long is dead */
    int max_retries;                     /* re-runs of a request whose node died */
};

/* Creates the router. KVR_ENOMEM. Returns owned *out, free with coord_router_free. */
int coord_router_create(const struct coord_router_params *p, struct coord_router **out);

/* Frees the router; every request must have finished (coord_router_shutdown). NULL ok. */
void coord_router_free(struct coord_router *r);

/* Waits up to timeout_s for every node's HELLO and checks they serve the same model
 * (fingerprint, context, vocabulary) and that each set up its pool. On success
 * *seq_len and *vocab receive the model's. KVR_ETIMEDOUT, KVR_EFINGERPRINT, KVR_EINVAL
 * (a node failed to set up, or no decode node / no prefill capacity), each logged. */
int coord_router_wait_nodes(struct coord_router *r, double timeout_s, uint64_t fingerprint,
                            int *seq_len, int *vocab);

/* One turn of the loop: new requests and cancels from the gRPC thread, MPI messages,
 * dispatch, deadlines, liveness, the status snapshot. Returns 1 if it did something
 * (the caller sleeps a little when it returns 0). */
int coord_router_poll(struct coord_router *r);

/* Stops admitting (submit returns KVR_EUNAVAIL), finishes every request with
 * KVR_EUNAVAIL and tells every live node to shut down. */
void coord_router_shutdown(struct coord_router *r);

#endif /* KVR_ROUTER_H */
