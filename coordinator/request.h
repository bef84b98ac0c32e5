/* request.h - a generation request at the coordinator's edge, free of any wire format:
 * its fields, their defaults, and every check against what the cluster can hold now,
 * in one place. coordinator/grpc_server.c fills a coord_gen_input from a protobuf; an
 * HTTP front end fills one from JSON; both get the same coord_request or the same
 * one-line refusal. The router uses the same block arithmetic for placement.
 *
 * Every limit is checked here, once, before the request is admitted: a request that no
 * node of the cluster could ever run is refused before its first token. */
#ifndef KVR_COORD_REQUEST_H
#define KVR_COORD_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "coord.h"

struct kvr_tokenizer;

/* Defaults and limits (docs/API.md). */
#define COORD_REQ_DEFAULT_WINDOW 256        /* kv_window when absent (at most the context) */
#define COORD_REQ_DEFAULT_SINKS 4           /* kv_sinks when absent (below the window) */
#define COORD_REQ_DEFAULT_TEMPERATURE 1.0   /* temperature when absent */
#define COORD_REQ_MAX_TOKENS (1 << 24)      /* max_tokens at most */

struct coord_opt_i64 {
    int present;
    int64_t v;
};

struct coord_opt_f64 {
    int present;
    double v;
};

/* One request as a front end read it: each field present or absent, values as wide as
 * any wire format carries, so that the module (not the front end) judges them. */
struct coord_gen_input {
    /* The prompt as text, prompt_len bytes (not NUL-terminated). Absent when prompt is NULL
     * or prompt_len is 0. A NUL byte inside is refused (it would truncate the prompt). */
    const char *prompt;
    size_t prompt_len;
    /* The prompt as ids: one of the two arrays (n_prompt_tokens > 0), or absent. */
    const int32_t *prompt_tokens32;
    const int64_t *prompt_tokens64;
    size_t n_prompt_tokens;
    struct coord_opt_i64 max_tokens;   /* absent or 0: until prompt + output fill the context */
    struct coord_opt_f64 temperature;  /* absent: 1.0; 0: greedy */
    struct coord_opt_f64 top_p;        /* absent, 0 or 1: off */
    int has_seed;
    uint64_t seed;                     /* absent or 0: the server picks (coord_request.seed 0) */
    int has_ignore_eos;
    int ignore_eos;                    /* absent: 0 (BOS or EOS ends the text) */
    struct coord_opt_i64 kv_policy;    /* enum kvr_kv_policy; absent: dense */
    struct coord_opt_i64 kv_window;    /* absent: min(256, context); ignored under dense */
    struct coord_opt_i64 kv_sinks;     /* absent: min(4, window - 1); sink only */
};

/* What the module needs of the model's tokenizer, computed once. */
struct coord_req_ctx {
    const struct kvr_tokenizer *tok; /* borrowed */
    int max_piece_len;               /* longest vocabulary piece in bytes (>= 1) */
};

/* Fills cx for tok (borrowed for cx's life) of vocab pieces. */
void coord_req_ctx_init(struct coord_req_ctx *cx, const struct kvr_tokenizer *tok, int vocab);

/* Checks in against the cluster's limits and builds *out (tokens owned by the caller,
 * free(out->tokens); seed 0 = the caller picks one; t_arrival, t_deadline and stream are
 * the caller's to set). Returns KVR_OK, or with a one-line reason in err:
 *   KVR_EINVAL   the request is malformed or out of range (INVALID_ARGUMENT);
 *   KVR_ENOSPC   no node of the cluster could ever hold it (RESOURCE_EXHAUSTED);
 *   KVR_EUNAVAIL no node can decode it, or none can prefill it (UNAVAILABLE);
 *   KVR_ENOMEM. */
int coord_request_build(const struct coord_req_ctx *cx, const struct coord_gen_input *in,
                        const struct coord_limits *lim, struct coord_request *out, char *err, size_t err_len);

/* KV blocks decode node d must reserve for q at worst (never more than q's tokens fill;
 * 64-bit, no overflow for any field values). */
int64_t coord_request_blocks(const struct coord_request *q, const struct coord_node_limits *d);

/* Whether decode node d (role decode) could ever hold and run q: its blocks fit the pool,
 * a recompute window fits one call, a window's keys fit what one query may attend. */
int coord_request_fits_decode(const struct coord_request *q, const struct coord_node_limits *d);

/* Whether prefill node p could ever prefill q's prompt in one pass. */
int coord_request_fits_prefill(const struct coord_request *q, const struct coord_node_limits *p);

#endif /* KVR_COORD_REQUEST_H */
