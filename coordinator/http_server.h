/* http_server.h - the coordinator's OpenAI-compatible HTTP front end (issue 10), on
 * libmicrohttpd: POST /v1/completions and /v1/chat/completions (JSON or SSE streaming),
 * GET /v1/models, /health and /metrics. Requests go through the same request module
 * (request.h) and router (coord.h) as gRPC's Generate. docs/API.md documents every
 * endpoint, field, status and the SSE framing.
 *
 * libmicrohttpd runs one thread per connection: a handler blocks (on a condition
 * variable) until its request's tokens arrive from the router's thread, and watches its
 * socket meanwhile, so a client that goes away cancels its request. */
#ifndef KVR_HTTP_SERVER_H
#define KVR_HTTP_SERVER_H

#include <stddef.h>

#include "coord.h"
#include "metrics.h"
#include "tokenizer.h"

/* How chat messages become a prompt (docs/API.md, "Chat templates"). Values are the
 * --chat-template names in order. */
enum coord_chat_template {
    COORD_CHAT_LLAMA2 = 0, /* [INST] ... [/INST], <<SYS>> block, BOS/EOS ids between turns */
    COORD_CHAT_CHATML = 1, /* <|im_start|>role\n...<|im_end|> as text */
    COORD_CHAT_PLAIN = 2,  /* the contents joined by newlines (for base models) */
};

/* The template called name ("llama2", "chatml", "plain"), or -1. */
int coord_chat_template_from_name(const char *name);

struct coord_http_params {
    const char *addr;                /* "HOST:PORT" or "[V6]:PORT"; port 0 picks a free port */
    struct coord_router *router;     /* borrowed until coord_http_stop returns */
    const struct kvr_tokenizer *tok; /* borrowed until coord_http_stop returns */
    int seq_len;                     /* model context (tokens) */
    int vocab_size;
    const char *model_name;                 /* the served model's id (/v1/models; copied) */
    enum coord_chat_template chat_template; /* the default; a request may pick another */
    struct coord_metrics *metrics;          /* borrowed; rendered by /metrics and fed by refusals */
    size_t max_body_bytes;                  /* larger request bodies get 400; 0: 4 MiB */
    /* Optional: judges the Authorization header (value NULL when absent) of /v1/ calls;
     * returns 0 to allow. /health and /metrics are never checked. */
    int (*authorize)(void *ctx, const char *value);
    void *authorize_ctx;
};

struct coord_http;

/* Binds addr and starts serving. KVR_EINVAL (bad params or address), KVR_EIO (cannot
 * bind; logged), KVR_ENOMEM. Returns owned *out, stop and free with coord_http_stop. */
int coord_http_start(const struct coord_http_params *p, struct coord_http **out);

/* The bound TCP port (useful with port 0). */
int coord_http_port(const struct coord_http *h);

/* Stops accepting, ends every open connection (their requests are cancelled), joins the
 * threads and frees h. Accepts NULL. The router must keep delivering finish calls until
 * this returns. */
void coord_http_stop(struct coord_http *h);

/* The callbacks the router uses for this server's streams (through coord_front_ops). */
extern const struct coord_stream_ops coord_http_stream_ops;

#endif /* KVR_HTTP_SERVER_H */
