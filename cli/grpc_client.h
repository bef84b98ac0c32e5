/* grpc_client.h - a small blocking client of kvrelay.v1.Inference (gRPC C core, protobuf-c).
 * Used by `kvrelay submit`, `kvrelay status`, the end-to-end tests and the cluster
 * benchmark. One client (one channel) may be shared by many threads: each call runs on
 * the calling thread with its own completion queue. No call outlives its function. */
#ifndef KVR_GRPC_CLIENT_H
#define KVR_GRPC_CLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "coord.h"
#include "grpc_codes.h"

struct kvr_client;

/* Opens a channel to addr ("host:port"; plaintext, no token). Connecting is lazy: an
 * unreachable server shows up as the first call's status. Calls grpc_init (balanced by
 * free). Errors: KVR_EINVAL (NULL/empty addr), KVR_EGRPC, KVR_ENOMEM. Returns owned *out,
 * free with kvr_client_free. */
int kvr_client_create(const char *addr, struct kvr_client **out);

/* How to reach a server that uses TLS or bearer tokens (docs/API.md, "Security"). */
struct kvr_client_opts {
    int tls;                     /* 1: TLS (implied by tls_ca_file) */
    const char *tls_ca_file;     /* PEM certificates to trust; NULL: gRPC's default roots */
    const char *tls_server_name; /* name the server's certificate must carry (default: the
                                  * host part of addr); for tests and IP addresses */
    const char *tls_cert_file;   /* client certificate (mTLS), with tls_key_file; optional */
    const char *tls_key_file;
    const char *token;           /* sent as "authorization: Bearer <token>" on every call */
    int recv_window_bytes;       /* bytes a call reads ahead of its caller; 0 = gRPC's
                                  * default (64 KiB, grown by BDP probing); a small value
                                  * makes a slow reader slow on the wire too (tests) */
};

/* kvr_client_create with options (o may be NULL). Files are read here: a missing or
 * unreadable one is KVR_EIO with the reason in err (one line). */
int kvr_client_create_opts(const char *addr, const struct kvr_client_opts *o,
                           struct kvr_client **out, char *err, size_t err_len);

/* Reads the first token of a token file (the coordinator's --auth-token-file format: one
 * per line, blank and '#' lines skipped, spaces trimmed) into buf. Returns KVR_OK, KVR_EIO
 * or KVR_EINVAL (no token, or longer than len - 1) with the reason in err. */
int kvr_client_read_token(const char *path, char *buf, size_t len, char *err, size_t err_len);

/* Closes the channel. No call may be running on it. Accepts NULL. */
void kvr_client_free(struct kvr_client *c);

/* How a call ended. */
struct kvr_rpc_status {
    int code;          /* grpc_status_code: 0 OK, 3 INVALID_ARGUMENT, 14 UNAVAILABLE, ... */
    int reached;       /* 1: a kvrelay server answered; 0: no server seen (refused, no route,
                        * deadline before any answer, local failure) */
    char message[256]; /* the server's one-line message, or the client's reason */
};


struct kvr_gen_params {
    const char *prompt;       /* text (tokenized by the server), or NULL */
    const int *prompt_tokens; /* (n_prompt_tokens) ids instead of text, or NULL */
    int n_prompt_tokens;
    int max_tokens;    /* 0 = until prompt + generated reach the model's context */
    float temperature; /* 0 = greedy */
    float top_p;       /* 0 or 1 = off */
    uint64_t seed;     /* 0 = chosen by the server */
    int ignore_eos;    /* 1: only BOS ends the generation */
    int kv_policy;     /* enum kvr_kv_policy value (sent as is, even if unknown) */
    int kv_window;     /* L; 0 = server default */
    int kv_sinks;      /* S; < 0 = server default */
    double timeout_s;  /* deadline of the whole call; 0 = none */
};

/* The final message's content. finish_reason is a FinishReason value (coord_finish). */
struct kvr_gen_usage {
    int finish_reason;
    int prompt_tokens; /* including BOS */
    int generated_tokens;
    double queue_ms, ttft_ms, tpot_ms, total_ms;
    int prefill_rank, decode_rank;
    uint64_t seed;
};

/* "length", "stop", "context", "cancelled", "error", or "unspecified". */
const char *kvr_gen_finish_name(int reason);

/* One streamed message, borrowed for the callback. */
struct kvr_gen_msg {
    const char *prompt_text; /* first message only (else NULL): the prompt as run prints it */
    int has_token;           /* 0 only in the final message */
    int token_id;
    int index;                        /* 0-based among generated tokens */
    const char *text;                 /* the token's text as run prints it ("" without a token) */
    const struct kvr_gen_usage *done; /* final message only (else NULL) */
};

/* Called for every message in order; a non-zero return cancels the call (its status is
 * then CANCELLED). */
typedef int (*kvr_gen_fn)(void *ud, const struct kvr_gen_msg *m);

/* Runs one Generate call to its end. fn may be NULL. usage (may be NULL) receives the
 * final message's content when the call ends OK. Returns st->code (0 OK). */
int kvr_client_generate(struct kvr_client *c, const struct kvr_gen_params *p, kvr_gen_fn fn,
                        void *ud, struct kvr_gen_usage *usage, struct kvr_rpc_status *st);

/* ClusterStatus into *out (every node; out->nodes is owned by the caller on return, also
 * on failure (then NULL): free with coord_cluster_status_deinit). Returns st->code. */
int kvr_client_cluster_status(struct kvr_client *c, double timeout_s,
                              struct coord_cluster_status *out, struct kvr_rpc_status *st);

/* Health: *serving and a one-line detail (detail may be NULL). Returns st->code. */
int kvr_client_health(struct kvr_client *c, double timeout_s, int *serving, char *detail,
                      size_t detail_len, struct kvr_rpc_status *st);

/* Any unary call with raw request bytes (for tests and tools): method is the full path
 * "/kvrelay.v1.Inference/Health". On OK with a response, *resp is owned (free with free)
 * and *resp_len its size; otherwise *resp is NULL. Returns st->code. */
int kvr_client_unary(struct kvr_client *c, const char *method, const void *req, size_t req_len,
                     double timeout_s, uint8_t **resp, size_t *resp_len, struct kvr_rpc_status *st);

#endif /* KVR_GRPC_CLIENT_H */
