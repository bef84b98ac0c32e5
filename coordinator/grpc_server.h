/* grpc_server.h - the coordinator's gRPC front end (service kvrelay.v1.Inference).
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

struct coord_grpc_params {
    const char *addr;                /* listen address, "0.0.0.0:50051"; port 0 picks a free port */
    struct coord_router *router;     /* borrowed until coord_grpc_stop returns */
    const struct kvr_tokenizer *tok; /* borrowed until coord_grpc_stop returns */
    int seq_len;                     /* model context (tokens) */
    int vocab_size;                  /* model vocabulary; prompt ids must be below it */
    int shutdown_grace_ms;           /* coord_grpc_stop lets calls finish this long, then cancels */
};

struct coord_grpc;

/* Starts listening and the completion-queue thread. Errors: KVR_EINVAL (bad params),
 * KVR_EGRPC (cannot bind addr; logged), KVR_ENOMEM. Calls grpc_init (balanced by stop).
 * Returns owned *out, stop and free with coord_grpc_stop. */
int coord_grpc_start(const struct coord_grpc_params *p, struct coord_grpc **out);

/* The bound TCP port (useful with port 0). */
int coord_grpc_port(const struct coord_grpc *g);

/* Calls whose gRPC side is still open (accepted and not yet released). Thread-safe. */
int coord_grpc_active_calls(const struct coord_grpc *g);

/* Stops accepting calls, waits up to shutdown_grace_ms for open calls to end, cancels the
 * rest (their router requests get coord_router_cancel), waits until every call is
 * released, joins the thread and frees g. Accepts NULL. The router must keep running
 * (and keep delivering finish calls) until this returns; a stream whose call is already
 * gone still gets its finish call afterwards, which only frees it. */
void coord_grpc_stop(struct coord_grpc *g);

/* The callbacks the router uses for streams it got from this server (thread-safe, one
 * router thread or many). */
extern const struct coord_stream_ops coord_grpc_stream_ops;

/* The gRPC status code (grpc_status_code value) a kvr_status maps to at this edge; the
 * one table, see docs/API.md. KVR_OK -> 0 (OK); unknown values -> INTERNAL. */
int coord_grpc_code_from_status(int status);


#endif /* KVR_GRPC_SERVER_H */
