/* grpc_server.c - the coordinator's gRPC front end on gRPC's C core API.
 * One thread runs the completion queue: it accepts calls (a request_call is always armed),
 * drives each call's state machine, validates Generate requests and hands them to the
 * router. The router thread calls back through coord_grpc_stream_ops. This file is the one
 * edge where kvr_status becomes a gRPC status (style.md sections 5 and 10). */
#include "clock.h"
#include "grpc_server.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "auth.h"
#include "grpc_codes.h"
#include "kvrelay.pb-c.h"
#include "log.h"
#include "metrics.h"
#include "request.h"
#include "status.h"

/* The proto enums mirror C enums; peers rely on equal values. */
_Static_assert(KVRELAY__V1__KV_POLICY__KV_POLICY_DENSE == (int)KVR_KV_DENSE, "KvPolicy");
_Static_assert(KVRELAY__V1__KV_POLICY__KV_POLICY_WINDOW == (int)KVR_KV_WINDOW, "KvPolicy");
_Static_assert(KVRELAY__V1__KV_POLICY__KV_POLICY_RECOMPUTE == (int)KVR_KV_RECOMPUTE, "KvPolicy");
_Static_assert(KVRELAY__V1__KV_POLICY__KV_POLICY_SINK == (int)KVR_KV_SINK, "KvPolicy");
_Static_assert(KVRELAY__V1__FINISH_REASON__FINISH_REASON_LENGTH == (int)COORD_FINISH_LENGTH,
               "FinishReason");
_Static_assert(KVRELAY__V1__FINISH_REASON__FINISH_REASON_STOP == (int)COORD_FINISH_STOP,
               "FinishReason");
_Static_assert(KVRELAY__V1__FINISH_REASON__FINISH_REASON_CONTEXT == (int)COORD_FINISH_CONTEXT,
               "FinishReason");
_Static_assert(KVRELAY__V1__FINISH_REASON__FINISH_REASON_CANCELLED == (int)COORD_FINISH_CANCELLED,
               "FinishReason");
_Static_assert(KVRELAY__V1__FINISH_REASON__FINISH_REASON_ERROR == (int)COORD_FINISH_ERROR,
               "FinishReason");

#define KVR_GRPC_MSG_LEN 256 /* status messages: one line, at most this many bytes */

/* ---------------------------------------------------------------------------------------
 * Status mapping: the one table (docs/API.md repeats it; change both together).
 * ------------------------------------------------------------------------------------- */

static const struct {
    int status;
    grpc_status_code code;
} status_map[] = {
    {KVR_OK, GRPC_STATUS_OK},
    {KVR_EINVAL, GRPC_STATUS_INVALID_ARGUMENT},
    {KVR_ERANGE, GRPC_STATUS_INVALID_ARGUMENT},
    {KVR_ECONTEXT, GRPC_STATUS_INVALID_ARGUMENT},
    {KVR_EFULL, GRPC_STATUS_RESOURCE_EXHAUSTED},     /* admission queue full */
    {KVR_ETIMEDOUT, GRPC_STATUS_RESOURCE_EXHAUSTED}, /* no decode memory before the deadline */
    {KVR_ENOSPC, GRPC_STATUS_RESOURCE_EXHAUSTED},    /* can never fit on any decode node */
    {KVR_ENOMEM, GRPC_STATUS_RESOURCE_EXHAUSTED},
    {KVR_EUNAVAIL, GRPC_STATUS_UNAVAILABLE}, /* node died, no nodes, shutting down */
    {KVR_EMPI, GRPC_STATUS_UNAVAILABLE},
    {KVR_ECANCELED, GRPC_STATUS_CANCELLED},
    {KVR_ENOTSUP, GRPC_STATUS_UNIMPLEMENTED},
    {KVR_ECHECKSUM, GRPC_STATUS_DATA_LOSS}, /* corrupt KV transfer */
    {KVR_EFORMAT, GRPC_STATUS_DATA_LOSS},
    {KVR_ETRUNC, GRPC_STATUS_DATA_LOSS},
    {KVR_EMAGIC, GRPC_STATUS_DATA_LOSS},
    {KVR_EVERSION, GRPC_STATUS_DATA_LOSS},
    {KVR_ELENGTH, GRPC_STATUS_DATA_LOSS},
    {KVR_EOVERFLOW, GRPC_STATUS_DATA_LOSS},
    {KVR_ECOMPRESS, GRPC_STATUS_DATA_LOSS},
    {KVR_EFINGERPRINT, GRPC_STATUS_INTERNAL}, /* nodes run different models */
    {KVR_ESHAPE, GRPC_STATUS_INTERNAL},
    {KVR_EIO, GRPC_STATUS_INTERNAL},
    {KVR_ENOENT, GRPC_STATUS_INTERNAL},
    {KVR_EGRPC, GRPC_STATUS_INTERNAL},
    {KVR_EAGAIN, GRPC_STATUS_INTERNAL},
    {KVR_EINTERNAL, GRPC_STATUS_INTERNAL},       /* a node refused what the edge admitted */
    {KVR_EDEADLINE, GRPC_STATUS_DEADLINE_EXCEEDED}, /* the deadline or the maximum age passed */
    {KVR_EABORTED, GRPC_STATUS_ABORTED},         /* a node ran out of room; a message was lost */
};

int coord_grpc_code_from_status(int status) {
    for (size_t i = 0; i < sizeof status_map / sizeof status_map[0]; i++)
        if (status_map[i].status == status)
            return (int)status_map[i].code;
    return (int)GRPC_STATUS_INTERNAL;
}

/* ---------------------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------------------- */

enum rpc_method {
    RPC_UNKNOWN = 0,
    RPC_GENERATE,
    RPC_CLUSTER_STATUS,
    RPC_HEALTH,
    RPC_HEALTH_CHECK, /* grpc.health.v1 */
    RPC_HEALTH_WATCH,
    RPC_SCALE,
    RPC_DRAIN,
};

static const struct {
    const char *path;
    enum rpc_method method;
} methods[] = {
    {"/kvrelay.v1.Inference/Generate", RPC_GENERATE},
    {"/kvrelay.v1.Inference/ClusterStatus", RPC_CLUSTER_STATUS},
    {"/kvrelay.v1.Inference/Health", RPC_HEALTH},
    {"/grpc.health.v1.Health/Check", RPC_HEALTH_CHECK},
    {"/grpc.health.v1.Health/Watch", RPC_HEALTH_WATCH},
    {"/kvrelay.v1.Inference/Scale", RPC_SCALE},
    {"/kvrelay.v1.Inference/Drain", RPC_DRAIN},
};

enum tag_kind {
    TAG_NEW_CALL,
    TAG_SHUTDOWN,
    TAG_RECV,  /* RECV_MESSAGE of the request */
    TAG_SEND,  /* any batch that sends (message, status or both); one in flight per call */
    TAG_CLOSE, /* RECV_CLOSE_ON_SERVER, armed at accept: completes when the call is over */
};

struct rpc_call;

/* Completion-queue tags point at these, embedded in their owner. */
struct tag {
    enum tag_kind kind;
    struct rpc_call *call; /* NULL for server tags */
};

/* What the router holds: a handle to the call it streams to (behind the head that
 * coord_front_ops forwards through). */
struct coord_stream {
    struct coord_stream_head head; /* first: coord_front_ops casts to it */
    struct rpc_call *call;
};

/* One RPC. Lifetime: freed when the gRPC side is released (no outstanding batch, which
 * implies the call is over since RECV_CLOSE_ON_SERVER is outstanding until then) and the
 * router no longer holds the stream (finish delivered, or never submitted). */
struct rpc_call {
    struct coord_grpc *g; /* used only while call != NULL */
    const struct kvr_tokenizer *tok;
    uint64_t serial; /* server-local number for logs */
    enum rpc_method method;
    struct tag t_recv, t_send, t_close;
    struct coord_stream stream;
    double t_arrival; /* kvr_clock_now() at accept */
    double t_deadline; /* the client's deadline on the same clock; 0 = none */

    pthread_mutex_t mu;        /* guards all below; held around every start_batch of the call */
    grpc_call *call;           /* NULL once released */
    int n_batches;             /* started and not yet completed */
    int router_holds;          /* the router may still call tokens/finish */
    int closed;                /* RECV_CLOSE_ON_SERVER completed */
    int close_cancelled;       /* its out-param: 1 = cancelled, deadline, disconnect */
    int md_sent;               /* initial metadata started */
    int status_sent;           /* the status has been started: nothing more to send */
    int send_busy;             /* a TAG_SEND batch is in flight */
    grpc_byte_buffer *recv_bb; /* the request, owned until parsed */
    grpc_byte_buffer *send_bb; /* the message in flight, destroyed at its completion */

    /* Generate only. */
    int submitted; /* the router accepted it; req_id is valid */
    uint64_t req_id;
    int *q;          /* (q_cap) token ids received, not yet sent: q[q_head..q_tail) */
    int q_head, q_tail, q_cap;
    int prev_token;    /* the token before the next one to render */
    int n_sent;        /* token messages started */
    char *prompt_text; /* owned until the first message goes out (then NULL) */
    uint64_t seed;
    int overflowed; /* ended for holding more than max_pending_tokens: drop later tokens */
    int finished;   /* finish() arrived; fields below valid */
    int fin_status;
    enum coord_finish fin_reason;
    struct coord_usage fin_usage;
    char fin_msg[KVR_GRPC_MSG_LEN];

    /* grpc.health.v1 Watch only (CQ thread). */
    int watch_sent;              /* the last status sent (0: none yet) */
    struct rpc_call *watch_next; /* in g->watchers while the call is open */
};

struct coord_grpc {
    grpc_server *server;
    grpc_completion_queue *cq;
    pthread_t thread;
    struct coord_router *router;
    const struct kvr_tokenizer *tok;
    int seq_len, vocab_size;
    struct coord_req_ctx req_ctx; /* the request module's view of the tokenizer */
    int port;
    int grace_ms;
    const struct coord_auth *auth; /* NULL: no token needed */
    int max_pending;               /* tokens a call may hold (max_pending_tokens) */
    atomic_llong pending_now, pending_max, n_overflowed;
    grpc_metadata md[1]; /* initial metadata every call sends: "kvr-server: kvrelay" */

    /* The armed request_call (CQ thread only). */
    grpc_call *nc_call;
    grpc_call_details nc_details;
    grpc_metadata_array nc_md;
    struct tag tag_new, tag_shutdown;
    int armed;
    int cq_shut;
    uint64_t n_accepted;

    atomic_int stopping;
    atomic_int n_calls; /* calls not yet released */
    pthread_mutex_t mu; /* guards shutdown_seen */
    pthread_cond_t cv;
    int shutdown_seen;

    struct coord_metrics *metrics; /* borrowed; NULL: nothing counted */
    struct rpc_call *watchers;     /* open grpc.health.v1 Watch calls (CQ thread only) */
};

/* protobuf-c string fields are char * even when only read (packing). */
static char *mutable_str(const char *s) {
    union {
        const char *c;
        char *m;
    } u = {.c = s};
    return u.m;
}

/* Copies msg into out as one line (newlines become spaces), truncated to len. */
static void one_line(char *out, size_t len, const char *msg) {
    size_t i = 0;
    for (; msg && msg[i] && i + 1 < len; i++)
        out[i] = (msg[i] == '\n' || msg[i] == '\r') ? ' ' : msg[i];
    out[i] = '\0';
}

/* Packs m into a byte buffer (owned, destroy with grpc_byte_buffer_destroy); NULL on ENOMEM.
 * Token messages are a few bytes and pack on the stack; the slice and byte buffer are gRPC's
 * own allocations, which the C core API has no way to avoid. */
static grpc_byte_buffer *pack_message(const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t small[512];
    grpc_slice slice;
    if (n <= sizeof small) {
        protobuf_c_message_pack(m, small);
        slice = grpc_slice_from_copied_buffer((const char *)small, n);
    } else {
        uint8_t *buf = malloc(n);
        if (!buf)
            return NULL;
        protobuf_c_message_pack(m, buf);
        slice = grpc_slice_new(buf, n, free);
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

/* Reads bb whole into a slice (unref it after use). Returns 0 when the reader fails
 * (e.g. a message compressed with an algorithm we cannot undo). */
static int read_message(grpc_byte_buffer *bb, grpc_slice *out) {
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return 0;
    *out = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * Call lifetime
 * ------------------------------------------------------------------------------------- */

static void call_free(struct rpc_call *c) {
    if (c->recv_bb)
        grpc_byte_buffer_destroy(c->recv_bb);
    if (c->send_bb)
        grpc_byte_buffer_destroy(c->send_bb);
    free(c->q);
    free(c->prompt_text);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* With c->mu held: releases the gRPC side once no batch is outstanding. Returns 1 when
 * the caller must call_free(c) after unlocking (nobody else can reach c any more). */
static int call_settle(struct rpc_call *c) {
    if (c->call && c->n_batches == 0) {
        /* Nothing can be sent any more: the queue no longer counts. */
        atomic_fetch_sub(&c->g->pending_now, (long long)(c->q_tail - c->q_head));
        c->q_head = c->q_tail = 0;
        grpc_call_unref(c->call);
        c->call = NULL;
        /* The last touch of g: after this the server may be destroyed. */
        atomic_fetch_sub(&c->g->n_calls, 1);
        c->g = NULL;
    }
    return c->call == NULL && !c->router_holds;
}

/* With c->mu held: starts ops under tag; counts it, or on failure logs and returns 0 (no
 * completion will come, so nothing is counted). */
static int call_start(struct rpc_call *c, const grpc_op *ops, size_t n, struct tag *t) {
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, t, NULL);
    if (e != GRPC_CALL_OK) {
        KVR_LOG_ERROR("call=%llu grpc_call_start_batch (%zu ops, tag %d): %s",
                      (unsigned long long)c->serial, n, (int)t->kind, grpc_call_error_to_string(e));
        return 0;
    }
    c->n_batches++;
    return 1;
}

static void add_initial_md(struct rpc_call *c, grpc_op *ops, size_t *n) {
    if (c->md_sent)
        return;
    grpc_op *op = &ops[(*n)++];
    memset(op, 0, sizeof *op);
    op->op = GRPC_OP_SEND_INITIAL_METADATA;
    op->data.send_initial_metadata.count = 1;
    op->data.send_initial_metadata.metadata = c->g->md;
}

/* With c->mu held: sends an optional last message (takes ownership of bb) and the status.
 * On failure the call is cancelled so that RECV_CLOSE_ON_SERVER still ends it. */
static void call_finish(struct rpc_call *c, grpc_byte_buffer *bb, grpc_status_code code,
                        const char *msg) {
    if (!c->call || c->closed || c->status_sent) {
        if (bb)
            grpc_byte_buffer_destroy(bb);
        return;
    }
    char line[KVR_GRPC_MSG_LEN];
    one_line(line, sizeof line, msg);
    grpc_slice details = grpc_slice_from_copied_string(line);
    grpc_op ops[3];
    size_t n = 0;
    add_initial_md(c, ops, &n);
    if (bb) {
        grpc_op *op = &ops[n++];
        memset(op, 0, sizeof *op);
        op->op = GRPC_OP_SEND_MESSAGE;
        op->data.send_message.send_message = bb;
    }
    grpc_op *op = &ops[n++];
    memset(op, 0, sizeof *op);
    op->op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    op->data.send_status_from_server.status = code;
    op->data.send_status_from_server.status_details = &details;
    if (call_start(c, ops, n, &c->t_send)) {
        c->md_sent = c->status_sent = c->send_busy = 1;
        c->send_bb = bb;
        if (code != GRPC_STATUS_OK)
            KVR_LOG_INFO("call=%llu req=%llu -> %s: %s", (unsigned long long)c->serial,
                         (unsigned long long)c->req_id, kvr_grpc_code_name((int)code), line);
    } else {
        if (bb)
            grpc_byte_buffer_destroy(bb);
        grpc_call_cancel(c->call, NULL);
    }
    grpc_slice_unref(details);
}

/* With c->mu held: the last message of a call (bb from pack_message, which is NULL when
 * it could not allocate) with OK, or no message and RESOURCE_EXHAUSTED without one. */
static void call_finish_reply(struct rpc_call *c, grpc_byte_buffer *bb) {
    if (bb)
        call_finish(c, bb, GRPC_STATUS_OK, "");
    else
        call_finish(c, NULL, GRPC_STATUS_RESOURCE_EXHAUSTED, "coordinator out of memory");
}

/* ---------------------------------------------------------------------------------------
 * Generate: validation at the edge
 * ------------------------------------------------------------------------------------- */

/* Reads a protobuf varint at *p (< end). Returns 0 when it runs past end or is too long. */
static int pb_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*p >= end)
            return 0;
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 1;
    }
    return 0;
}

/* The bytes of the last occurrence of length-delimited field `field` in a message that
 * protobuf-c already parsed: protobuf-c hands strings over NUL-terminated, which hides a
 * NUL byte inside them, so the prompt's true length is read from the wire. */
static void pb_last_bytes(const uint8_t *data, size_t len, uint32_t field, const uint8_t **val, size_t *vlen) {
    const uint8_t *p = data, *end = data + len;
    *val = NULL;
    *vlen = 0;
    while (p < end) {
        uint64_t key, n;
        if (!pb_varint(&p, end, &key))
            return;
        switch (key & 7) {
        case 0:
            if (!pb_varint(&p, end, &n))
                return;
            break;
        case 1:
            if ((size_t)(end - p) < 8)
                return;
            p += 8;
            break;
        case 2:
            if (!pb_varint(&p, end, &n) || n > (uint64_t)(end - p))
                return;
            if ((key >> 3) == field) {
                *val = p;
                *vlen = (size_t)n;
            }
            p += n;
            break;
        case 5:
            if ((size_t)(end - p) < 4)
                return;
            p += 4;
            break;
        default:
            return;
        }
    }
}

/* The request as the request module's input: proto3 scalars are always present (their
 * zero means what docs/API.md says: max_tokens 0 = to the context, temperature 0 = greedy,
 * top_p 0 = off, seed 0 = the server picks); kv_window and kv_sinks have presence. */
static void generate_input(const Kvrelay__V1__GenerateRequest *req, const uint8_t *data, size_t len,
                           struct coord_gen_input *in) {
    memset(in, 0, sizeof *in);
    const uint8_t *prompt;
    pb_last_bytes(data, len, 1, &prompt, &in->prompt_len);
    in->prompt = (const char *)prompt;
    in->prompt_tokens32 = req->prompt_tokens;
    in->n_prompt_tokens = req->n_prompt_tokens;
    in->max_tokens = (struct coord_opt_i64){1, req->max_tokens};
    in->temperature = (struct coord_opt_f64){1, req->temperature};
    in->top_p = (struct coord_opt_f64){1, req->top_p};
    in->has_seed = 1;
    in->seed = req->seed;
    in->has_ignore_eos = 1;
    in->ignore_eos = req->ignore_eos;
    in->kv_policy = (struct coord_opt_i64){1, (int64_t)req->kv_policy};
    in->kv_window = (struct coord_opt_i64){
        req->kv_window_opt_case == KVRELAY__V1__GENERATE_REQUEST__KV_WINDOW_OPT_KV_WINDOW, req->kv_window};
    in->kv_sinks = (struct coord_opt_i64){
        req->kv_sinks_opt_case == KVRELAY__V1__GENERATE_REQUEST__KV_SINKS_OPT_KV_SINKS, req->kv_sinks};
}

/* The prompt as llama2.c's run prints it: each token's piece after its predecessor. */
static char *render_prompt(const struct kvr_tokenizer *tok, const int *t, int n) {
    size_t len = 0;
    for (int i = 1; i < n; i++)
        len += strlen(kvr_tokenizer_piece_safe(tok, t[i - 1], t[i]));
    char *s = malloc(len + 1), *p = s;
    if (!s)
        return NULL;
    for (int i = 1; i < n; i++) {
        const char *piece = kvr_tokenizer_piece_safe(tok, t[i - 1], t[i]);
        size_t k = strlen(piece);
        memcpy(p, piece, k);
        p += k;
    }
    *p = '\0';
    return s;
}

static uint64_t pick_seed(uint64_t serial) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t s = ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^
                 (serial * 0x9E3779B97F4A7C15ull);
    return s ? s : 1;
}

/* ---------------------------------------------------------------------------------------
 * Generate: streaming (any thread, c->mu held)
 * ------------------------------------------------------------------------------------- */

/* With c->mu held and no send in flight: sends bb (owned) as the call's next streamed
 * message, with the initial metadata if not sent yet. Returns 1 if it went out; on a
 * failure bb is destroyed, the call cancelled and 0 returned. */
static int stream_send(struct rpc_call *c, grpc_byte_buffer *bb) {
    grpc_op ops[2];
    size_t n = 0;
    add_initial_md(c, ops, &n);
    grpc_op *op = &ops[n++];
    memset(op, 0, sizeof *op);
    op->op = GRPC_OP_SEND_MESSAGE;
    op->data.send_message.send_message = bb;
    if (!call_start(c, ops, n, &c->t_send)) {
        grpc_byte_buffer_destroy(bb);
        grpc_call_cancel(c->call, NULL);
        return 0;
    }
    c->md_sent = c->send_busy = 1;
    c->send_bb = bb;
    return 1;
}

/* Starts the next send if none is in flight: the oldest queued token, else, once the
 * router finished, the final message and the status. */
static void generate_pump(struct rpc_call *c) {
    if (!c->call || c->closed || c->status_sent || c->send_busy)
        return;
    Kvrelay__V1__GenerateResponse m;
    kvrelay__v1__generate_response__init(&m);
    if (c->prompt_text)
        m.prompt_text = c->prompt_text;

    if (c->q_head < c->q_tail) {
        int id = c->q[c->q_head];
        m.token_id = id;
        m.text = mutable_str(kvr_tokenizer_piece_safe(c->tok, c->prev_token, id));
        m.index = c->n_sent;
        grpc_byte_buffer *bb = pack_message(&m.base);
        if (!bb) {
            KVR_LOG_ERROR("call=%llu req=%llu: out of memory for a message",
                          (unsigned long long)c->serial, (unsigned long long)c->req_id);
            grpc_call_cancel(c->call, NULL);
            return;
        }
        if (!stream_send(c, bb))
            return;
        c->q_head++;
        atomic_fetch_sub(&c->g->pending_now, 1);
        c->prev_token = id;
        c->n_sent++;
        free(c->prompt_text);
        c->prompt_text = NULL;
        return;
    }
    if (!c->finished)
        return;

    if (c->fin_status == KVR_OK && c->fin_reason != COORD_FINISH_CANCELLED &&
        c->fin_reason != COORD_FINISH_ERROR) {
        Kvrelay__V1__Usage u;
        Kvrelay__V1__Completion done;
        kvrelay__v1__usage__init(&u);
        kvrelay__v1__completion__init(&done);
        const struct coord_usage *cu = &c->fin_usage;
        u.prompt_tokens = cu->prompt_tokens;
        u.generated_tokens = cu->generated_tokens;
        u.queue_ms = cu->queue_ms;
        u.ttft_ms = cu->ttft_ms;
        u.tpot_ms = cu->tpot_ms;
        u.total_ms = cu->total_ms;
        u.prefill_rank = cu->prefill_rank;
        u.decode_rank = cu->decode_rank;
        done.finish_reason = (Kvrelay__V1__FinishReason)c->fin_reason;
        done.usage = &u;
        done.seed = c->seed;
        m.done = &done;
        call_finish_reply(c, pack_message(&m.base));
        return;
    }
    grpc_status_code code;
    const char *msg = c->fin_msg;
    if (c->fin_status != KVR_OK) {
        code = (grpc_status_code)coord_grpc_code_from_status(c->fin_status);
        if (!msg[0])
            msg = kvr_status_str(c->fin_status);
    } else if (c->fin_reason == COORD_FINISH_CANCELLED) {
        code = GRPC_STATUS_CANCELLED;
        if (!msg[0])
            msg = "the request was cancelled by the cluster";
    } else {
        code = GRPC_STATUS_INTERNAL;
        if (!msg[0])
            msg = "the generation failed";
    }
    call_finish(c, NULL, code, msg);
}

/* Raises *max to v if v is larger (any thread). */
static void atomic_max_ll(atomic_llong *max, long long v) {
    long long cur = atomic_load(max);
    while (v > cur && !atomic_compare_exchange_weak(max, &cur, v)) {
    }
}

/* Queues generated tokens for the call. The queue is bounded: a client that reads slower
 * than the cluster writes (gRPC's flow control stops our sends once the client's window
 * is full) would otherwise make it grow for as long as the generation runs. Past
 * max_pending tokens the call ends with RESOURCE_EXHAUSTED; on_close then cancels the
 * request in the cluster, which frees its KV blocks. docs/API.md ("Slow readers"). */
static void stream_tokens(struct coord_stream *s, const int *ids, int n) {
    struct rpc_call *c = s->call;
    if (n <= 0)
        return;
    pthread_mutex_lock(&c->mu);
    if (c->call && !c->closed && !c->status_sent && !c->overflowed) {
        struct coord_grpc *g = c->g;
        int held = c->q_tail - c->q_head;
        if ((long long)held + n > (long long)g->max_pending) {
            char msg[KVR_GRPC_MSG_LEN];
            snprintf(msg, sizeof msg,
                     "the client reads too slowly: %d generated tokens are waiting to be sent "
                     "(limit %d)",
                     held + n, g->max_pending);
            KVR_LOG_WARN("call=%llu req=%llu -> RESOURCE_EXHAUSTED: %s",
                         (unsigned long long)c->serial, (unsigned long long)c->req_id, msg);
            c->overflowed = 1;
            atomic_fetch_add(&g->n_overflowed, 1);
            atomic_fetch_sub(&g->pending_now, (long long)held);
            c->q_head = c->q_tail = 0;
            /* Not call_finish: a send may be in flight, and the status must reach the
             * client even though its window is full (it travels as HEADERS, not DATA). */
            grpc_call_cancel_with_status(c->call, GRPC_STATUS_RESOURCE_EXHAUSTED, msg, NULL);
            pthread_mutex_unlock(&c->mu);
            return;
        }
        if (c->q_tail + n > c->q_cap && c->q_head > 0) {
            memmove(c->q, c->q + c->q_head, (size_t)(c->q_tail - c->q_head) * sizeof *c->q);
            c->q_tail -= c->q_head;
            c->q_head = 0;
        }
        if (c->q_tail + n > c->q_cap) {
            /* Only when the client reads slower than the cluster generates; bounded by
             * max_pending above. */
            int cap = c->q_cap * 2 > c->q_tail + n ? c->q_cap * 2 : c->q_tail + n;
            if (cap > g->max_pending)
                cap = g->max_pending;
            int *q = realloc(c->q, (size_t)cap * sizeof *q);
            if (!q) {
                KVR_LOG_ERROR("req=%llu: out of memory queueing %d tokens; cancelling",
                              (unsigned long long)c->req_id, n);
                grpc_call_cancel(c->call, NULL);
                pthread_mutex_unlock(&c->mu);
                return;
            }
            c->q = q;
            c->q_cap = cap;
        }
        memcpy(c->q + c->q_tail, ids, (size_t)n * sizeof *ids);
        c->q_tail += n;
        atomic_fetch_add(&g->pending_now, (long long)n);
        atomic_max_ll(&g->pending_max, (long long)(c->q_tail - c->q_head));
        generate_pump(c);
    }
    pthread_mutex_unlock(&c->mu);
}

static void stream_finish(struct coord_stream *s, int status, enum coord_finish reason,
                          const struct coord_usage *u, const char *msg) {
    struct rpc_call *c = s->call;
    pthread_mutex_lock(&c->mu);
    c->finished = 1;
    c->fin_status = status;
    c->fin_reason = reason;
    if (u)
        c->fin_usage = *u;
    one_line(c->fin_msg, sizeof c->fin_msg, msg ? msg : "");
    c->router_holds = 0;
    generate_pump(c);
    int dead = call_settle(c);
    pthread_mutex_unlock(&c->mu);
    if (dead)
        call_free(c);
}

const struct coord_stream_ops coord_grpc_stream_ops = {
    .tokens = stream_tokens,
    .finish = stream_finish,
};

/* ---------------------------------------------------------------------------------------
 * Request handlers (CQ thread)
 * ------------------------------------------------------------------------------------- */

/* Handles the request of a Generate call; c->mu is not held; c is alive (its
 * RECV_CLOSE_ON_SERVER is outstanding and only this thread completes it). */
static void generate_start(struct rpc_call *c, const uint8_t *data, size_t len) {
    struct coord_grpc *g = c->g;
    char err[KVR_GRPC_MSG_LEN] = "";
    struct coord_request req;
    Kvrelay__V1__GenerateRequest *pb = kvrelay__v1__generate_request__unpack(NULL, len, data);
    if (!pb) {
        snprintf(err, sizeof err, "cannot parse GenerateRequest (%zu bytes)", len);
        pthread_mutex_lock(&c->mu);
        call_finish(c, NULL, GRPC_STATUS_INVALID_ARGUMENT, err);
        pthread_mutex_unlock(&c->mu);
        return;
    }
    struct coord_gen_input in;
    struct coord_limits lim;
    generate_input(pb, data, len, &in);
    int rc = coord_router_limits(g->router, &lim);
    if (rc == KVR_OK)
        rc = coord_request_build(&g->req_ctx, &in, &lim, &req, err, sizeof err);
    coord_limits_deinit(&lim);
    kvrelay__v1__generate_request__free_unpacked(pb, NULL);
    if (rc != KVR_OK) {
        coord_metrics_reject(g->metrics, coord_reject_from_status(rc));
        pthread_mutex_lock(&c->mu);
        call_finish(c, NULL, (grpc_status_code)coord_grpc_code_from_status(rc),
                    err[0] ? err : kvr_status_str(rc));
        pthread_mutex_unlock(&c->mu);
        return;
    }
    uint64_t seed_in = req.seed;
    c->seed = seed_in ? seed_in : pick_seed(c->serial);
    req.seed = c->seed;
    req.t_arrival = c->t_arrival;
    req.t_deadline = c->t_deadline;
    req.stream = &c->stream;
    c->stream.head.ops = &coord_grpc_stream_ops;
    c->stream.head.metrics = g->metrics;
    c->stream.head.t_arrival = c->t_arrival;
    c->prev_token = req.tokens[req.n_tokens - 1];
    c->prompt_text = render_prompt(g->tok, req.tokens, req.n_tokens);
    c->q_cap = (req.max_tokens < 256 ? req.max_tokens : 256) + 1;
    c->q = malloc((size_t)c->q_cap * sizeof *c->q);
    if (!c->prompt_text || !c->q) {
        free(req.tokens);
        pthread_mutex_lock(&c->mu);
        call_finish(c, NULL, GRPC_STATUS_RESOURCE_EXHAUSTED, "coordinator out of memory");
        pthread_mutex_unlock(&c->mu);
        return;
    }
    KVR_LOG_DEBUG("call=%llu Generate prompt_tokens=%d max_tokens=%d temperature=%g top_p=%g "
                  "policy=%s window=%d sinks=%d",
                  (unsigned long long)c->serial, req.n_tokens, req.max_tokens,
                  (double)req.temperature, (double)req.top_p, kvr_kv_policy_name(req.policy.policy),
                  req.policy.window, req.policy.sinks);

    /* The router may call tokens/finish on its thread before submit returns. */
    pthread_mutex_lock(&c->mu);
    c->router_holds = 1;
    pthread_mutex_unlock(&c->mu);
    uint64_t id = 0;
    rc = coord_router_submit(g->router, &req, &id);
    pthread_mutex_lock(&c->mu);
    if (rc != KVR_OK) {
        c->router_holds = 0;
        coord_metrics_reject(g->metrics, coord_reject_from_status(rc));
        call_finish(c, NULL, (grpc_status_code)coord_grpc_code_from_status(rc),
                    rc == KVR_EFULL      ? "the admission queue is full; retry later"
                    : rc == KVR_EUNAVAIL ? "the cluster is not serving (no nodes, or shutting down)"
                                         : kvr_status_str(rc));
    } else {
        c->submitted = 1;
        c->req_id = id;
    }
    pthread_mutex_unlock(&c->mu);
}

static void cluster_status_reply(struct rpc_call *c) {
    struct coord_cluster_status st;
    Kvrelay__V1__NodeStatus *nodes = NULL;
    Kvrelay__V1__NodeStatus **ptrs = NULL;
    grpc_byte_buffer *bb = NULL;
    if (coord_router_status(c->g->router, &st) == KVR_OK &&
        (st.n_nodes == 0 || ((nodes = calloc((size_t)st.n_nodes, sizeof *nodes)) &&
                             (ptrs = calloc((size_t)st.n_nodes, sizeof *ptrs))))) {
        Kvrelay__V1__ClusterStatusResponse r;
        kvrelay__v1__cluster_status_response__init(&r);
        int n = st.n_nodes < 0 ? 0 : st.n_nodes;
        for (int i = 0; i < n; i++) {
            struct coord_node_status *ns = &st.nodes[i];
            /* role and host are char arrays the router filled: make sure they end. */
            ns->role[sizeof ns->role - 1] = '\0';
            ns->host[sizeof ns->host - 1] = '\0';
            Kvrelay__V1__NodeStatus *p = &nodes[i];
            kvrelay__v1__node_status__init(p);
            p->rank = ns->rank;
            p->role = mutable_str(ns->role);
            p->host = mutable_str(ns->host);
            p->alive = ns->alive != 0;
            p->kv_bytes_total = ns->kv_bytes_total;
            p->kv_bytes_used = ns->kv_bytes_used;
            p->kv_bytes_free = ns->kv_bytes_free;
            p->kv_bytes_reserved = ns->kv_bytes_reserved;
            p->running = ns->running;
            p->queued = ns->queued;
            p->queued_prompt_tokens = ns->queued_prompt_tokens;
            p->report_age_ms = ns->report_age_ms;
            ns->state[sizeof ns->state - 1] = '\0';
            p->state = mutable_str(ns->state);
            ptrs[i] = p;
        }
        r.n_nodes = (size_t)n;
        r.nodes = ptrs;
        r.waiting_requests = st.waiting_requests;
        r.running_requests = st.running_requests;
        r.finished_requests = st.finished_requests;
        r.seq_len = st.seq_len;
        r.vocab_size = st.vocab_size;
        r.decode_target = st.decode_desired;
        r.decode_min = st.autoscale ? st.decode_min : 0;
        r.decode_max = st.autoscale ? st.decode_max : 0;
        r.autoscale = st.autoscale != 0;
        st.last_decision[sizeof st.last_decision - 1] = '\0';
        r.last_decision = mutable_str(st.last_decision);
        bb = pack_message(&r.base);
    }
    pthread_mutex_lock(&c->mu);
    call_finish_reply(c, bb);
    pthread_mutex_unlock(&c->mu);
    coord_cluster_status_deinit(&st);
    free(nodes);
    free(ptrs);
}

/* Serving means a Generate can be placed now (coord_cluster_serving, which /health and
 * grpc.health.v1 use too). */
static void health_reply(struct rpc_call *c) {
    struct coord_cluster_status st;
    grpc_byte_buffer *bb = NULL;
    if (coord_router_status(c->g->router, &st) == KVR_OK) {
        char detail[KVR_GRPC_MSG_LEN];
        Kvrelay__V1__HealthResponse r;
        kvrelay__v1__health_response__init(&r);
        r.serving = coord_cluster_serving(&st, atomic_load(&c->g->stopping), detail, sizeof detail);
        r.detail = detail;
        bb = pack_message(&r.base);
    }
    pthread_mutex_lock(&c->mu);
    call_finish_reply(c, bb);
    pthread_mutex_unlock(&c->mu);
    coord_cluster_status_deinit(&st);
}

/* ---------------------------------------------------------------------------------------
 * grpc.health.v1.Health (CQ thread): the standard service Kubernetes' gRPC probes call.
 * The messages are one field each, so they are read and written by hand:
 * HealthCheckRequest {string service = 1}, HealthCheckResponse {ServingStatus status = 1}.
 * ------------------------------------------------------------------------------------- */

enum { HEALTH_SERVING = 1, HEALTH_NOT_SERVING = 2, HEALTH_SERVICE_UNKNOWN = 3 };

/* SERVING exactly when the custom Health RPC says serving (coord_cluster_serving). */
static int health_v1_status(struct coord_grpc *g) {
    struct coord_cluster_status st;
    if (coord_router_status(g->router, &st) != KVR_OK)
        return HEALTH_NOT_SERVING;
    char why[KVR_GRPC_MSG_LEN];
    int serving = coord_cluster_serving(&st, atomic_load(&g->stopping), why, sizeof why);
    coord_cluster_status_deinit(&st);
    return serving ? HEALTH_SERVING : HEALTH_NOT_SERVING;
}

static grpc_byte_buffer *health_v1_message(int status) {
    char b[2] = {0x08, (char)status};
    grpc_slice slice = grpc_slice_from_copied_buffer(b, sizeof b);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

/* "" is the server as a whole; kvrelay.v1.Inference is the one service it has. */
static int health_v1_known(const uint8_t *data, size_t len) {
    const uint8_t *svc;
    size_t n;
    pb_last_bytes(data, len, 1, &svc, &n);
    static const char inference[] = "kvrelay.v1.Inference";
    return n == 0 || (n == sizeof inference - 1 && !memcmp(svc, inference, n));
}

/* With c->mu held: sends the current status on a Watch call if it changed and no send is
 * in flight (called at the start, after each send and on the CQ thread's periodic turn). */
static void health_watch_pump(struct rpc_call *c, int status) {
    if (!c->call || c->closed || c->status_sent || c->send_busy || status == c->watch_sent)
        return;
    if (stream_send(c, health_v1_message(status)))
        c->watch_sent = status;
}

static void health_v1_start(struct rpc_call *c, const uint8_t *data, size_t len) {
    struct coord_grpc *g = c->g;
    int known = health_v1_known(data, len);
    if (c->method == RPC_HEALTH_CHECK) {
        pthread_mutex_lock(&c->mu);
        if (!known)
            call_finish(c, NULL, GRPC_STATUS_NOT_FOUND,
                        "unknown service (serving \"\" and kvrelay.v1.Inference)");
        else
            call_finish_reply(c, health_v1_message(health_v1_status(g)));
        pthread_mutex_unlock(&c->mu);
        return;
    }
    /* Watch: the status now, then every change until the client leaves or the server
     * stops (the CQ thread re-checks every watcher each second). */
    int status = known ? health_v1_status(g) : HEALTH_SERVICE_UNKNOWN;
    pthread_mutex_lock(&c->mu);
    health_watch_pump(c, status);
    if (known && !c->closed && c->call) {
        c->watch_next = g->watchers;
        g->watchers = c;
    } else if (!known) {
        c->watch_sent = -1; /* SERVICE_UNKNOWN stays; the call stays open as the spec says */
    }
    pthread_mutex_unlock(&c->mu);
}

/* CQ thread: one turn over the watchers. */
static void health_watch_turn(struct coord_grpc *g) {
    if (!g->watchers)
        return;
    int status = atomic_load(&g->stopping) ? HEALTH_NOT_SERVING : health_v1_status(g);
    for (struct rpc_call *c = g->watchers; c; c = c->watch_next) {
        pthread_mutex_lock(&c->mu);
        health_watch_pump(c, status);
        pthread_mutex_unlock(&c->mu);
    }
}

/* Scale and Drain: the router checks and queues them; the reply says what will happen. */
static void admin_reply(struct rpc_call *c, const uint8_t *data, size_t len) {
    char detail[256] = "";
    int rc;
    grpc_byte_buffer *bb = NULL;
    if (c->method == RPC_SCALE) {
        Kvrelay__V1__ScaleRequest *q = kvrelay__v1__scale_request__unpack(NULL, len, data);
        if (!q) {
            pthread_mutex_lock(&c->mu);
            call_finish(c, NULL, GRPC_STATUS_INVALID_ARGUMENT, "cannot parse ScaleRequest");
            pthread_mutex_unlock(&c->mu);
            return;
        }
        rc = coord_router_scale(c->g->router, q->decode, detail, sizeof detail);
        protobuf_c_message_free_unpacked(&q->base, NULL);
        Kvrelay__V1__ScaleResponse r;
        kvrelay__v1__scale_response__init(&r);
        r.detail = detail;
        if (rc == KVR_OK)
            bb = pack_message(&r.base);
    } else {
        Kvrelay__V1__DrainRequest *q = kvrelay__v1__drain_request__unpack(NULL, len, data);
        if (!q) {
            pthread_mutex_lock(&c->mu);
            call_finish(c, NULL, GRPC_STATUS_INVALID_ARGUMENT, "cannot parse DrainRequest");
            pthread_mutex_unlock(&c->mu);
            return;
        }
        rc = coord_router_drain(c->g->router, q->rank, detail, sizeof detail);
        protobuf_c_message_free_unpacked(&q->base, NULL);
        Kvrelay__V1__DrainResponse r;
        kvrelay__v1__drain_response__init(&r);
        r.detail = detail;
        if (rc == KVR_OK)
            bb = pack_message(&r.base);
    }
    pthread_mutex_lock(&c->mu);
    if (rc == KVR_OK)
        call_finish_reply(c, bb);
    else
        call_finish(c, NULL,
                    rc == KVR_EINVAL ? GRPC_STATUS_INVALID_ARGUMENT
                    : rc == KVR_ENOTSUP ? GRPC_STATUS_FAILED_PRECONDITION
                                        : GRPC_STATUS_RESOURCE_EXHAUSTED,
                    detail);
    pthread_mutex_unlock(&c->mu);
}

static void on_recv(struct rpc_call *c, int success) {
    pthread_mutex_lock(&c->mu);
    c->n_batches--;
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    int gone = !success || c->closed || !c->call;
    if (gone) {
        int dead = call_settle(c);
        pthread_mutex_unlock(&c->mu);
        if (bb)
            grpc_byte_buffer_destroy(bb);
        if (dead)
            call_free(c);
        return;
    }
    if (!bb) {
        call_finish(c, NULL, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
        pthread_mutex_unlock(&c->mu);
        return;
    }
    pthread_mutex_unlock(&c->mu);

    grpc_slice s;
    if (!read_message(bb, &s)) {
        grpc_byte_buffer_destroy(bb);
        pthread_mutex_lock(&c->mu);
        call_finish(c, NULL, GRPC_STATUS_INVALID_ARGUMENT, "cannot read the request message");
        pthread_mutex_unlock(&c->mu);
        return;
    }
    grpc_byte_buffer_destroy(bb);
    const uint8_t *data = GRPC_SLICE_START_PTR(s);
    size_t len = GRPC_SLICE_LENGTH(s);
    switch (c->method) {
    case RPC_GENERATE:
        generate_start(c, data, len);
        break;
    case RPC_HEALTH_CHECK:
    case RPC_HEALTH_WATCH:
        health_v1_start(c, data, len);
        break;
    case RPC_CLUSTER_STATUS:
    case RPC_HEALTH: {
        /* Empty messages; still reject bytes that are not a protobuf at all. */
        ProtobufCMessage *m =
            c->method == RPC_HEALTH
                ? (ProtobufCMessage *)kvrelay__v1__health_request__unpack(NULL, len, data)
                : (ProtobufCMessage *)kvrelay__v1__cluster_status_request__unpack(NULL, len, data);
        if (!m) {
            pthread_mutex_lock(&c->mu);
            call_finish(c, NULL, GRPC_STATUS_INVALID_ARGUMENT,
                        c->method == RPC_HEALTH ? "cannot parse HealthRequest"
                                                : "cannot parse ClusterStatusRequest");
            pthread_mutex_unlock(&c->mu);
            break;
        }
        protobuf_c_message_free_unpacked(m, NULL);
        if (c->method == RPC_HEALTH)
            health_reply(c);
        else
            cluster_status_reply(c);
        break;
    }
    case RPC_SCALE:
    case RPC_DRAIN:
        admin_reply(c, data, len);
        break;
    case RPC_UNKNOWN:
        break;
    }
    grpc_slice_unref(s);
}

static void on_send(struct rpc_call *c, int success) {
    pthread_mutex_lock(&c->mu);
    c->n_batches--;
    c->send_busy = 0;
    if (c->send_bb) {
        grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
    }
    if (success && c->method == RPC_GENERATE)
        generate_pump(c);
    int dead = call_settle(c);
    pthread_mutex_unlock(&c->mu);
    if (dead)
        call_free(c);
}

/* The call is over: status sent, or cancelled, past its deadline or disconnected. */
static void on_close(struct rpc_call *c, int success) {
    (void)success;
    if (c->method == RPC_HEALTH_WATCH && c->g) {
        for (struct rpc_call **pp = &c->g->watchers; *pp; pp = &(*pp)->watch_next)
            if (*pp == c) {
                *pp = c->watch_next;
                break;
            }
    }
    pthread_mutex_lock(&c->mu);
    c->n_batches--;
    c->closed = 1;
    int cancel = c->submitted && c->router_holds; /* on_close runs once per call */
    uint64_t id = c->req_id;
    struct coord_router *router = c->g ? c->g->router : NULL;
    if (cancel) {
        KVR_LOG_INFO("call=%llu req=%llu: client %s; cancelling", (unsigned long long)c->serial,
                     (unsigned long long)id,
                     c->close_cancelled ? "cancelled or went away" : "closed");
    }
    int dead = call_settle(c);
    pthread_mutex_unlock(&c->mu);
    if (dead)
        call_free(c);
    /* Outside the lock: the router may deliver finish (and free c) from inside cancel. */
    if (cancel && router)
        coord_router_cancel(router, id);
}

/* ---------------------------------------------------------------------------------------
 * Accepting calls (CQ thread)
 * ------------------------------------------------------------------------------------- */

static int arm_request(struct coord_grpc *g) {
    g->nc_call = NULL;
    grpc_call_error e = grpc_server_request_call(g->server, &g->nc_call, &g->nc_details, &g->nc_md,
                                                 g->cq, g->cq, &g->tag_new);
    if (e != GRPC_CALL_OK) {
        KVR_LOG_ERROR("grpc_server_request_call: %s", grpc_call_error_to_string(e));
        return KVR_EGRPC;
    }
    g->armed = 1;
    return KVR_OK;
}

/* The verdict on a call's `authorization` metadata. */
static enum coord_auth_verdict call_credentials(const struct coord_grpc *g,
                                                const grpc_metadata_array *md) {
    const grpc_metadata *found = NULL;
    for (size_t i = 0; i < md->count; i++) {
        grpc_slice k = md->metadata[i].key;
        if (GRPC_SLICE_LENGTH(k) == 13 && !memcmp(GRPC_SLICE_START_PTR(k), "authorization", 13)) {
            if (found)
                return COORD_AUTH_MALFORMED; /* two credentials: accept neither */
            found = &md->metadata[i];
        }
    }
    if (!found)
        return coord_auth_check(g->auth, NULL, 0);
    return coord_auth_check(g->auth, (const char *)GRPC_SLICE_START_PTR(found->value),
                            GRPC_SLICE_LENGTH(found->value));
}

static void on_new_call(struct coord_grpc *g, int success) {
    g->armed = 0;
    grpc_call *call = success ? g->nc_call : NULL;
    enum rpc_method method = RPC_UNKNOWN;
    char path[128] = "";
    if (call) {
        grpc_slice m = g->nc_details.method;
        size_t len =
            GRPC_SLICE_LENGTH(m) < sizeof path - 1 ? GRPC_SLICE_LENGTH(m) : sizeof path - 1;
        memcpy(path, GRPC_SLICE_START_PTR(m), len);
        path[len] = '\0';
        for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
            if (GRPC_SLICE_LENGTH(m) == strlen(methods[i].path) && !strcmp(path, methods[i].path))
                method = methods[i].method;
    }
    /* Health stays open (load balancers and `kvrelay up` probe it without a secret; it
     * names no host); every other method, unknown ones included, needs a token when the
     * server has any. */
    enum coord_auth_verdict verdict = COORD_AUTH_OK;
    if (call && g->auth && method != RPC_HEALTH && method != RPC_HEALTH_CHECK && method != RPC_HEALTH_WATCH)
        verdict = call_credentials(g, &g->nc_md);
    /* The client's deadline, honoured by the router too (it ends the request by then
     * whatever message is lost), on our clock. Read before re-arming: once the next
     * request_call is armed, gRPC writes the next call's details into nc_details (its
     * deadline field is not reset by grpc_call_details_init), and a generate call read
     * afterwards could take the deadline of a status probe that arrived just after it. */
    double t_arrival = kvr_clock_now(), t_deadline = 0;
    if (call) {
        gpr_timespec dl = gpr_convert_clock_type(g->nc_details.deadline, GPR_CLOCK_MONOTONIC);
        if (gpr_time_cmp(dl, gpr_inf_future(GPR_CLOCK_MONOTONIC)) != 0) {
            double left = (double)gpr_timespec_to_micros(gpr_time_sub(dl, gpr_now(GPR_CLOCK_MONOTONIC))) * 1e-6;
            t_deadline = t_arrival + (left > 0 ? left : 0) + 1e-9;
        }
    }
    /* Re-arm first so that the server always has a request_call outstanding. */
    grpc_call_details_destroy(&g->nc_details);
    grpc_metadata_array_destroy(&g->nc_md);
    grpc_call_details_init(&g->nc_details);
    grpc_metadata_array_init(&g->nc_md);
    if (success && !atomic_load(&g->stopping))
        arm_request(g);
    if (!call)
        return;

    struct rpc_call *c = calloc(1, sizeof *c);
    if (!c || pthread_mutex_init(&c->mu, NULL) != 0) {
        KVR_LOG_ERROR("out of memory accepting a call to %s", path);
        free(c);
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                                     "coordinator out of memory", NULL);
        grpc_call_unref(call);
        return;
    }
    c->g = g;
    c->tok = g->tok;
    c->call = call;
    c->method = method;
    c->serial = ++g->n_accepted;
    c->t_arrival = t_arrival;
    c->t_deadline = t_deadline;
    c->t_recv = (struct tag){TAG_RECV, c};
    c->t_send = (struct tag){TAG_SEND, c};
    c->t_close = (struct tag){TAG_CLOSE, c};
    c->stream.call = c;
    atomic_fetch_add(&g->n_calls, 1);

    pthread_mutex_lock(&c->mu);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    if (!call_start(c, &op, 1, &c->t_close)) {
        grpc_call_cancel(c->call, NULL);
    } else if (verdict != COORD_AUTH_OK) {
        KVR_LOG_INFO("call=%llu %s: %s bearer token -> UNAUTHENTICATED",
                     (unsigned long long)c->serial, path, coord_auth_verdict_name(verdict));
        call_finish(
            c, NULL, GRPC_STATUS_UNAUTHENTICATED,
            verdict == COORD_AUTH_MISSING
                ? "this server needs a bearer token (metadata authorization: Bearer <token>)"
                : "invalid bearer token");
    } else if (method == RPC_UNKNOWN) {
        char msg[KVR_GRPC_MSG_LEN];
        snprintf(msg, sizeof msg, "unknown method %s", path);
        call_finish(c, NULL, GRPC_STATUS_UNIMPLEMENTED, msg);
    } else {
        /* Initial metadata goes out at once: a client then knows a kvrelay server took the
         * call even if its request waits long for a decode node. */
        grpc_op ops[2];
        size_t n = 0;
        add_initial_md(c, ops, &n);
        memset(&ops[n], 0, sizeof ops[n]);
        ops[n].op = GRPC_OP_RECV_MESSAGE;
        ops[n].data.recv_message.recv_message = &c->recv_bb;
        n++;
        if (call_start(c, ops, n, &c->t_recv))
            c->md_sent = 1;
        else
            grpc_call_cancel(c->call, NULL);
    }
    int dead = call_settle(c);
    pthread_mutex_unlock(&c->mu);
    if (dead)
        call_free(c);
}

static void *cq_thread(void *arg) {
    struct coord_grpc *g = arg;
    double t_watch = 0;
    for (;;) {
        /* While stopping, wake up now and then: the last call may be released by the
         * router's thread, which posts nothing to this queue. With Watch calls open, wake
         * up every second to send them changes of the serving status. */
        gpr_timespec deadline =
            atomic_load(&g->stopping)
                ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(50, GPR_TIMESPAN))
            : g->watchers ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(1000, GPR_TIMESPAN))
                          : gpr_inf_future(GPR_CLOCK_MONOTONIC);
        grpc_event ev = grpc_completion_queue_next(g->cq, deadline, NULL);
        if (g->watchers && kvr_clock_now() - t_watch >= 1.0) {
            health_watch_turn(g);
            t_watch = kvr_clock_now();
        }
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type == GRPC_OP_COMPLETE) {
            struct tag *t = ev.tag;
            switch (t->kind) {
            case TAG_NEW_CALL:
                on_new_call(g, ev.success);
                break;
            case TAG_SHUTDOWN:
                pthread_mutex_lock(&g->mu);
                g->shutdown_seen = 1;
                pthread_cond_broadcast(&g->cv);
                pthread_mutex_unlock(&g->mu);
                break;
            case TAG_RECV:
                on_recv(t->call, ev.success);
                break;
            case TAG_SEND:
                on_send(t->call, ev.success);
                break;
            case TAG_CLOSE:
                on_close(t->call, ev.success);
                break;
            }
        }
        if (!g->cq_shut && !g->armed && atomic_load(&g->n_calls) == 0) {
            pthread_mutex_lock(&g->mu);
            int seen = g->shutdown_seen;
            pthread_mutex_unlock(&g->mu);
            if (seen) {
                grpc_completion_queue_shutdown(g->cq);
                g->cq_shut = 1;
            }
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Start and stop
 * ------------------------------------------------------------------------------------- */

int coord_grpc_port(const struct coord_grpc *g) {
    return g->port;
}

int coord_grpc_active_calls(const struct coord_grpc *g) {
    return atomic_load(&g->n_calls);
}

void coord_grpc_stream_stats(const struct coord_grpc *g, struct coord_grpc_stream_stats *out) {
    /* The counters are only read here; atomic_load takes a non-const pointer in C11. */
    struct coord_grpc *m = (struct coord_grpc *)(uintptr_t)g;
    out->pending_tokens = atomic_load(&m->pending_now);
    out->pending_tokens_max = atomic_load(&m->pending_max);
    out->overflowed_calls = atomic_load(&m->n_overflowed);
}

int coord_grpc_start(const struct coord_grpc_params *p, struct coord_grpc **out) {
    *out = NULL;
    if (!p || !p->addr || !p->tok || p->seq_len < 1 || p->vocab_size < 1 ||
        p->shutdown_grace_ms < 0) {
        KVR_LOG_ERROR("bad parameters (addr, tokenizer, seq_len and vocab_size are required)");
        return KVR_EINVAL;
    }
    struct coord_grpc *g = calloc(1, sizeof *g);
    if (!g)
        return KVR_ENOMEM;
    int rc = KVR_EGRPC, started = 0;
    grpc_init();
    g->router = p->router;
    g->tok = p->tok;
    g->seq_len = p->seq_len;
    g->vocab_size = p->vocab_size;
    g->grace_ms = p->shutdown_grace_ms;
    g->metrics = p->metrics;
    g->tag_new = (struct tag){TAG_NEW_CALL, NULL};
    g->tag_shutdown = (struct tag){TAG_SHUTDOWN, NULL};
    coord_req_ctx_init(&g->req_ctx, p->tok, p->vocab_size);
    g->md[0].key = grpc_slice_from_static_string("kvr-server");
    g->md[0].value = grpc_slice_from_static_string("kvrelay");
    grpc_call_details_init(&g->nc_details);
    grpc_metadata_array_init(&g->nc_md);
    atomic_init(&g->stopping, 0);
    atomic_init(&g->n_calls, 0);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);

    /* Every limit is set here, explicitly, rather than left to gRPC's defaults (which
     * change between versions); docs/API.md ("Server options") lists them. */
    int ka_time =
        p->keepalive_time_ms ? p->keepalive_time_ms : COORD_GRPC_DEFAULT_KEEPALIVE_TIME_MS;
    int ka_timeout =
        p->keepalive_timeout_ms ? p->keepalive_timeout_ms : COORD_GRPC_DEFAULT_KEEPALIVE_TIMEOUT_MS;
    int max_streams =
        p->max_concurrent_streams ? p->max_concurrent_streams : COORD_GRPC_DEFAULT_MAX_STREAMS;
    int max_msg =
        p->max_message_bytes ? p->max_message_bytes : COORD_GRPC_DEFAULT_MAX_MESSAGE_BYTES;
    g->max_pending =
        p->max_pending_tokens > 0 ? p->max_pending_tokens : COORD_GRPC_DEFAULT_MAX_PENDING_TOKENS;
    g->auth = p->auth;
    atomic_init(&g->pending_now, 0);
    atomic_init(&g->pending_max, 0);
    atomic_init(&g->n_overflowed, 0);
    struct {
        const char *key;
        int value;
    } iargs[] = {
        /* No SO_REUSEPORT: a second coordinator on the same port must fail to bind, not share. */
        {GRPC_ARG_ALLOW_REUSEPORT, 0},
        /* Ping an idle connection every ka_time: a client that vanished without a FIN
         * (host down, NAT dropped) frees its calls and their KV blocks. INT_MAX = never. */
        {GRPC_ARG_KEEPALIVE_TIME_MS, ka_time < 0 ? INT32_MAX : ka_time},
        {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ka_timeout},
        {GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1},
        /* Clients may ping too, but not more often than every 10 s without data. */
        {GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000},
        {GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2},
        {GRPC_ARG_MAX_CONCURRENT_STREAMS, max_streams},
        {GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, max_msg},
        {GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, max_msg},
        /* Request metadata (the token included) is small: 16 KiB is plenty. */
        {GRPC_ARG_MAX_METADATA_SIZE, 16384},
    };
    grpc_arg args[sizeof iargs / sizeof iargs[0]];
    for (size_t i = 0; i < sizeof iargs / sizeof iargs[0]; i++) {
        args[i].type = GRPC_ARG_INTEGER;
        args[i].key = mutable_str(iargs[i].key);
        args[i].value.integer = iargs[i].value;
    }
    grpc_channel_args cargs = {.num_args = sizeof args / sizeof args[0], .args = args};
    g->cq = grpc_completion_queue_create_for_next(NULL);
    g->server = grpc_server_create(&cargs, NULL);
    if (!g->cq || !g->server)
        goto fail;
    grpc_server_register_completion_queue(g->server, g->cq, NULL);
    int tls = p->tls_cert_pem || p->tls_key_pem;
    grpc_server_credentials *creds;
    if (tls) {
        if (!p->tls_cert_pem || !p->tls_key_pem) {
            KVR_LOG_ERROR("TLS needs both a certificate and its private key");
            goto fail;
        }
        /* gRPC checks the PEM text when the first connection arrives, too late to tell the
         * operator: the caller (main.c) checks that the files look like PEM. */
        grpc_ssl_pem_key_cert_pair pair = {.private_key = p->tls_key_pem,
                                           .cert_chain = p->tls_cert_pem};
        creds = grpc_ssl_server_credentials_create_ex(
            p->tls_client_ca_pem, &pair, 1,
            p->tls_client_ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                 : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    } else if (p->tls_client_ca_pem) {
        KVR_LOG_ERROR("a client CA (mTLS) needs TLS: give the server certificate and key too");
        goto fail;
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    if (!creds) {
        KVR_LOG_ERROR("cannot create the server credentials");
        goto fail;
    }
    g->port = grpc_server_add_http2_port(g->server, p->addr, creds);
    grpc_server_credentials_release(creds);
    if (g->port <= 0) {
        KVR_LOG_ERROR("cannot listen on %s (address in use or invalid)", p->addr);
        goto fail;
    }
    grpc_server_start(g->server);
    started = 1;
    if (arm_request(g) != KVR_OK)
        goto fail;
    if ((errno = pthread_create(&g->thread, NULL, cq_thread, g)) != 0) {
        KVR_LOG_ERROR("pthread_create: %s", strerror(errno));
        goto fail;
    }
    KVR_LOG_INFO("listening on %s (port %d, %s%s%s), context %d, vocab %d", p->addr, g->port,
                 tls ? "TLS" : "plaintext", p->tls_client_ca_pem ? ", client certificates" : "",
                 g->auth ? ", bearer tokens" : "", g->seq_len, g->vocab_size);
    *out = g;
    return KVR_OK;

fail:
    if (started) {
        /* No thread yet: run the shutdown sequence on this one (no call can be open). */
        atomic_store(&g->stopping, 1);
        grpc_server_shutdown_and_notify(g->server, g->cq, &g->tag_shutdown);
        grpc_server_cancel_all_calls(g->server);
        cq_thread(g);
    } else if (g->cq) {
        grpc_completion_queue_shutdown(g->cq);
    }
    /* A server that never started has no listener and may be destroyed without shutdown. */
    if (g->server)
        grpc_server_destroy(g->server);
    if (g->cq) {
        while (grpc_completion_queue_next(g->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(g->cq);
    }
    grpc_call_details_destroy(&g->nc_details);
    grpc_metadata_array_destroy(&g->nc_md);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
    grpc_shutdown();
    return rc;
}

void coord_grpc_stop(struct coord_grpc *g) {
    if (!g)
        return;
    KVR_LOG_INFO("stopping: %d calls open, grace %d ms", atomic_load(&g->n_calls), g->grace_ms);
    atomic_store(&g->stopping, 1);
    grpc_server_shutdown_and_notify(g->server, g->cq, &g->tag_shutdown);
    if (g->grace_ms > 0) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += g->grace_ms / 1000;
        until.tv_nsec += (long)(g->grace_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&g->mu);
        while (!g->shutdown_seen)
            if (pthread_cond_timedwait(&g->cv, &g->mu, &until) == ETIMEDOUT)
                break;
        pthread_mutex_unlock(&g->mu);
    }
    grpc_server_cancel_all_calls(g->server);
    pthread_join(g->thread, NULL);
    grpc_server_destroy(g->server);
    grpc_completion_queue_destroy(g->cq);
    grpc_call_details_destroy(&g->nc_details);
    grpc_metadata_array_destroy(&g->nc_md);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
    grpc_shutdown();
}
