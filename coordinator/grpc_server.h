/* grpc_server.h - the coordinator's gRPC front end (service kvrelay.v1.Inference, and the
 * standard grpc.health.v1.Health: Check and Watch).
 *
 * One completion-queue thread owns the server: it accepts calls, validates Generate
 * requests at this edge (INVALID_ARGUMENT with a one-line message), hands valid ones to
 * the router (coord.h) and answers ClusterStatus and Health from coord_router_status.
 * The router reports tokens and the end of each request through coord_grpc_stream_ops
 * from its own thread. docs/API.md documents the RPCs, fields and status codes. */
#ifndef KVR_GRPC_SERVER_H
#define KVR_GRPC_SERVER_H

#include "coord.h"
#include "tokenizer.h"

struct coord_auth;

/* Defaults of the limits below (0 in the params means these); docs/API.md lists them. */
#define COORD_GRPC_DEFAULT_KEEPALIVE_TIME_MS    60000
#define COORD_GRPC_DEFAULT_KEEPALIVE_TIMEOUT_MS 20000
#define COORD_GRPC_DEFAULT_MAX_STREAMS          256
#define COORD_GRPC_DEFAULT_MAX_MESSAGE_BYTES    (4 << 20)
#define COORD_GRPC_DEFAULT_MAX_PENDING_TOKENS   65536

struct coord_grpc_params {
    const char *addr;                /* listen "127.0.0.1:50051"; port 0 picks a free one */
    struct coord_router *router;     /* borrowed until coord_grpc_stop returns */
    const struct kvr_tokenizer *tok; /* borrowed until coord_grpc_stop returns */
    int seq_len;                     /* model context (tokens) */
    int vocab_size;                  /* model vocabulary; prompt ids must be below it */
    int shutdown_grace_ms;           /* coord_grpc_stop lets calls finish this long, then cancels */

    /* TLS: PEM text (not paths), borrowed for the start call. cert and key together turn
     * TLS on; client_ca (needs TLS) makes the server require a client certificate signed
     * by it (mTLS). All NULL: plaintext. */
    const char *tls_cert_pem, *tls_key_pem, *tls_client_ca_pem;
    /* Bearer tokens every call but Health must present (NULL: none needed); borrowed
     * until coord_grpc_stop returns. */
    const struct coord_auth *auth;
    int keepalive_time_ms;      /* ping an idle connection this often; 0 = default, < 0 = never */
    int keepalive_timeout_ms;   /* close it if the ping is not answered in time; 0 = default */
    int max_concurrent_streams; /* calls at once per connection; 0 = default */
    int max_message_bytes;      /* largest message received or sent; 0 = default */
    /* Generated tokens a Generate call may hold for a client that reads slower than the
     * cluster writes; past it the call ends with RESOURCE_EXHAUSTED. 0 = default. */
    int max_pending_tokens;
    struct coord_metrics *metrics;   /* borrowed until stop; NULL: nothing counted (metrics.h) */
};

/* What the output queues hold (tokens generated, not yet handed to gRPC). */
struct coord_grpc_stream_stats {
    long long pending_tokens;     /* now, all calls */
    long long pending_tokens_max; /* the most any one call held at once, since start */
    long long overflowed_calls;   /* calls ended for holding more than max_pending_tokens */
};

struct coord_grpc;

/* Starts listening and the completion-queue thread. Errors: KVR_EINVAL (bad params),
 * KVR_EGRPC (cannot bind addr, or bad TLS material; logged), KVR_ENOMEM. Calls grpc_init (balanced
 * by stop). Returns owned *out, stop and free with coord_grpc_stop. */
int coord_grpc_start(const struct coord_grpc_params *p, struct coord_grpc **out);

/* The bound TCP port (useful with port 0). */
int coord_grpc_port(const struct coord_grpc *g);

/* Calls whose gRPC side is still open (accepted and not yet released). Thread-safe. */
int coord_grpc_active_calls(const struct coord_grpc *g);

/* Output-queue counters (thread-safe). */
void coord_grpc_stream_stats(const struct coord_grpc *g, struct coord_grpc_stream_stats *out);

/* Stops accepting calls, waits up to shutdown_grace_ms for open calls to end, cancels the
 * rest (their router requests get coord_router_cancel), waits until every call is
 * released, joins the thread and frees g. Accepts NULL. The router must keep running
 * (and keep delivering finish calls) until this returns; a stream whose call is already
 * gone still gets its finish call afterwards, which only frees it. */
void coord_grpc_stop(struct coord_grpc *g);

/* The callbacks the router uses for streams it got from this server (thread-safe, one
 * router thread or many). Every stream starts with a struct coord_stream_head whose ops
 * point here, so a router may be given coord_front_ops (metrics.h) instead. */
extern const struct coord_stream_ops coord_grpc_stream_ops;

/* The gRPC status code (grpc_status_code value) a kvr_status maps to at this edge; the
 * one table, see docs/API.md. KVR_OK -> 0 (OK); unknown values -> INTERNAL. */
int coord_grpc_code_from_status(int status);


#endif /* KVR_GRPC_SERVER_H */
