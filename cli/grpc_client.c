/* grpc_client.c - blocking client of kvrelay.v1.Inference over gRPC's C core.
 * Each call owns a completion queue and runs on the caller's thread: one batch sends the
 * request and half-closes, one waits for the status, and one RECV_MESSAGE at a time reads
 * the stream. Callers: cmd_submit.c, cmd_status.c, tests, the cluster benchmark. */
#include "grpc_client.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "kvrelay.pb-c.h"
#include "status.h"

struct kvr_client {
    grpc_channel *ch;
    grpc_metadata md[1]; /* sent with every call: authorization (when n_md is 1) */
    size_t n_md;
};

const char *kvr_gen_finish_name(int reason) {
    switch (reason) {
    case COORD_FINISH_LENGTH:
        return "length";
    case COORD_FINISH_STOP:
        return "stop";
    case COORD_FINISH_CONTEXT:
        return "context";
    case COORD_FINISH_CANCELLED:
        return "cancelled";
    case COORD_FINISH_ERROR:
        return "error";
    default:
        return "unspecified";
    }
}

int kvr_client_create(const char *addr, struct kvr_client **out) {
    return kvr_client_create_opts(addr, NULL, out, NULL, 0);
}

/* A whole small file, NUL-terminated (owned), or NULL with the reason in err. */
static char *read_small(const char *what, const char *path, char *err, size_t err_len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (err)
            snprintf(err, err_len, "%s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 20;
    char *buf = malloc(cap + 1);
    size_t n = buf ? fread(buf, 1, cap + 1, f) : 0;
    fclose(f);
    if (!buf || n > cap) {
        if (err)
            snprintf(err, err_len, "%s %s: %s", what, path,
                     buf ? "larger than 1 MiB" : "out of memory");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

int kvr_client_read_token(const char *path, char *buf, size_t len, char *err, size_t err_len) {
    char *text = read_small("token file", path, err, err_len);
    if (!text)
        return KVR_EIO;
    int rc = KVR_EINVAL;
    snprintf(err, err_len, "token file %s holds no token", path);
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        char *b = line, *e = line + strlen(line);
        while (*b == ' ' || *b == '\t' || *b == '\r')
            b++;
        while (e > b && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r'))
            e--;
        if (e > b && *b != '#') {
            if ((size_t)(e - b) >= len) {
                snprintf(err, err_len, "token file %s: the token is longer than %zu bytes", path,
                         len - 1);
            } else {
                memcpy(buf, b, (size_t)(e - b));
                buf[e - b] = '\0';
                rc = KVR_OK;
            }
            break;
        }
        line = nl ? nl + 1 : NULL;
    }
    memset(text, 0, strlen(text));
    free(text);
    return rc;
}

int kvr_client_create_opts(const char *addr, const struct kvr_client_opts *o,
                           struct kvr_client **out, char *err, size_t err_len) {
    *out = NULL;
    if (err && err_len)
        err[0] = '\0';
    if (!addr || !*addr)
        return KVR_EINVAL;
    struct kvr_client_opts none = {0};
    if (!o)
        o = &none;
    char *ca = NULL, *cert = NULL, *key = NULL;
    if ((o->tls_ca_file && !(ca = read_small("TLS CA", o->tls_ca_file, err, err_len))) ||
        (o->tls_cert_file &&
         !(cert = read_small("TLS certificate", o->tls_cert_file, err, err_len))) ||
        (o->tls_key_file && !(key = read_small("TLS key", o->tls_key_file, err, err_len)))) {
        free(ca);
        free(cert);
        free(key);
        return KVR_EIO;
    }
    struct kvr_client *c = calloc(1, sizeof *c);
    if (!c) {
        free(ca);
        free(cert);
        free(key);
        return KVR_ENOMEM;
    }
    grpc_init();
    grpc_channel_credentials *creds;
    if (o->tls || ca || cert) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        creds = grpc_ssl_credentials_create(ca, cert && key ? &pair : NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    grpc_arg args[3];
    size_t n_args = 0;
    if (o->tls_server_name) {
        args[n_args].type = GRPC_ARG_STRING;
        args[n_args].key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[n_args].value.string = (char *)(uintptr_t)o->tls_server_name;
        n_args++;
    }
    if (o->recv_window_bytes > 0) {
        args[n_args].type = GRPC_ARG_INTEGER;
        args[n_args].key = GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES;
        args[n_args].value.integer = o->recv_window_bytes;
        n_args++;
        args[n_args].type = GRPC_ARG_INTEGER;
        args[n_args].key = GRPC_ARG_HTTP2_BDP_PROBE;
        args[n_args].value.integer = 0;
        n_args++;
    }
    grpc_channel_args cargs = {.num_args = n_args, .args = args};
    c->ch = creds ? grpc_channel_create(addr, creds, n_args ? &cargs : NULL) : NULL;
    if (creds)
        grpc_channel_credentials_release(creds);
    free(ca);
    free(cert);
    if (key) {
        memset(key, 0, strlen(key));
        free(key);
    }
    if (c->ch && o->token) {
        size_t tlen = strlen(o->token);
        char *v = malloc(tlen + 8);
        if (v) {
            memcpy(v, "Bearer ", 7);
            memcpy(v + 7, o->token, tlen + 1);
            c->md[0].key = grpc_slice_from_static_string("authorization");
            c->md[0].value = grpc_slice_from_copied_string(v);
            memset(v, 0, tlen + 7);
            free(v);
            c->n_md = 1;
        } else {
            grpc_channel_destroy(c->ch);
            c->ch = NULL;
        }
    }
    if (!c->ch) {
        if (err && err_len && !err[0])
            snprintf(err, err_len, "cannot create a gRPC channel to %s", addr);
        free(c);
        grpc_shutdown();
        return KVR_EGRPC;
    }
    *out = c;
    return KVR_OK;
}

void kvr_client_free(struct kvr_client *c) {
    if (!c)
        return;
    grpc_channel_destroy(c->ch);
    if (c->n_md)
        grpc_slice_unref(c->md[0].value);
    free(c);
    grpc_shutdown();
}

static void set_status(struct kvr_rpc_status *st, int code, int reached, const char *msg) {
    st->code = code;
    st->reached = reached;
    snprintf(st->message, sizeof st->message, "%s", msg);
}

/* The server marks every answer with this initial metadata key (grpc_server.c). */
static int has_server_mark(const grpc_metadata_array *md) {
    for (size_t i = 0; i < md->count; i++) {
        grpc_slice k = md->metadata[i].key;
        if (GRPC_SLICE_LENGTH(k) == 10 && !memcmp(GRPC_SLICE_START_PTR(k), "kvr-server", 10))
            return 1;
    }
    return 0;
}

/* Per message: return 0 to go on, 1 to cancel (CANCELLED), -1 for an unparseable message
 * (INTERNAL). data is borrowed for the call. */
typedef int (*on_message_fn)(void *ud, const uint8_t *data, size_t len);

enum { TAG_START = 1, TAG_STATUS = 2, TAG_MSG = 3 };

/* One call: sends req (taking nothing: req is copied), reads every message into on_msg,
 * and fills st. Returns st->code. */
static int run_call(struct kvr_client *c, const char *method, const void *req, size_t req_len,
                    double timeout_s, on_message_fn on_msg, void *ud, struct kvr_rpc_status *st) {
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    if (!cq) {
        set_status(st, GRPC_STATUS_INTERNAL, 0, "client: cannot create a completion queue");
        return st->code;
    }
    gpr_timespec deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    if (timeout_s > 0)
        deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                gpr_time_from_millis((int64_t)(timeout_s * 1000.0), GPR_TIMESPAN));
    grpc_slice mslice = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, mslice,
                                               NULL, deadline, NULL);
    grpc_slice_unref(mslice);

    grpc_slice req_slice = grpc_slice_from_copied_buffer(req, req_len);
    grpc_byte_buffer *req_bb = grpc_raw_byte_buffer_create(&req_slice, 1);
    grpc_slice_unref(req_slice);
    grpc_byte_buffer *resp_bb = NULL;
    grpc_metadata_array imd, tmd;
    grpc_metadata_array_init(&imd);
    grpc_metadata_array_init(&tmd);
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    int pending = 0, cancelled = 0, n_msgs = 0, bad = 0;

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = c->n_md;
    ops[0].data.send_initial_metadata.metadata = c->n_md ? c->md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
    grpc_call_error e = grpc_call_start_batch(call, ops, 4, (void *)(intptr_t)TAG_START, NULL);
    if (e == GRPC_CALL_OK) {
        pending++;
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[0].data.recv_status_on_client.trailing_metadata = &tmd;
        ops[0].data.recv_status_on_client.status = &code;
        ops[0].data.recv_status_on_client.status_details = &details;
        e = grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)TAG_STATUS, NULL);
    }
    if (e == GRPC_CALL_OK) {
        pending++;
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_MESSAGE;
        ops[0].data.recv_message.recv_message = &resp_bb;
        e = grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)TAG_MSG, NULL);
    }
    if (e == GRPC_CALL_OK) {
        pending++;
    } else {
        /* Ends the batches already started; their completions are drained below. */
        grpc_call_cancel_with_status(call, GRPC_STATUS_INTERNAL, "client: cannot start the call",
                                     NULL);
    }

    /* The call's deadline (if any) bounds this loop: gRPC completes every batch by then. */
    while (pending > 0) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        pending--;
        if ((intptr_t)ev.tag != TAG_MSG)
            continue;
        if (!ev.success || !resp_bb)
            continue; /* end of stream or a failed call: the status says which */
        grpc_byte_buffer *bb = resp_bb;
        resp_bb = NULL;
        int verdict = -1;
        grpc_byte_buffer_reader r;
        if (grpc_byte_buffer_reader_init(&r, bb)) {
            grpc_slice s = grpc_byte_buffer_reader_readall(&r);
            grpc_byte_buffer_reader_destroy(&r);
            n_msgs++;
            verdict = cancelled ? 1 : on_msg(ud, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s));
            grpc_slice_unref(s);
        }
        grpc_byte_buffer_destroy(bb);
        if (verdict == 0) {
            memset(ops, 0, sizeof ops);
            ops[0].op = GRPC_OP_RECV_MESSAGE;
            ops[0].data.recv_message.recv_message = &resp_bb;
            if (grpc_call_start_batch(call, ops, 1, (void *)(intptr_t)TAG_MSG, NULL) ==
                GRPC_CALL_OK)
                pending++;
            else
                grpc_call_cancel_with_status(call, GRPC_STATUS_INTERNAL, "client: cannot read on",
                                             NULL);
        } else if (!cancelled) {
            cancelled = 1;
            if (verdict < 0) {
                bad = 1;
                grpc_call_cancel_with_status(call, GRPC_STATUS_INTERNAL,
                                             "client: cannot parse a response message", NULL);
            } else {
                grpc_call_cancel(call, NULL);
            }
        }
    }

    int mark = has_server_mark(&imd) || has_server_mark(&tmd);
    char msg[256];
    size_t dlen =
        GRPC_SLICE_LENGTH(details) < sizeof msg - 1 ? GRPC_SLICE_LENGTH(details) : sizeof msg - 1;
    memcpy(msg, GRPC_SLICE_START_PTR(details), dlen);
    msg[dlen] = '\0';
    if (bad)
        snprintf(msg, sizeof msg, "client: cannot parse a response message");
    /* Codes a server sends are its verdict; UNAVAILABLE or DEADLINE_EXCEEDED without any
     * sign of a kvrelay server mean nothing answered. */
    int reached = mark || n_msgs > 0 ||
                  (code != GRPC_STATUS_UNAVAILABLE && code != GRPC_STATUS_DEADLINE_EXCEEDED);
    set_status(st, (int)code, reached, msg);

    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&imd);
    grpc_metadata_array_destroy(&tmd);
    grpc_byte_buffer_destroy(req_bb);
    if (resp_bb)
        grpc_byte_buffer_destroy(resp_bb);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    return st->code;
}

/* ---------------------------------------------------------------------------------------
 * Generate
 * ------------------------------------------------------------------------------------- */

struct gen_state {
    kvr_gen_fn fn;
    void *ud;
    struct kvr_gen_usage usage;
    int n_msgs;
    int got_done;
};

static int gen_on_message(void *ud, const uint8_t *data, size_t len) {
    struct gen_state *gs = ud;
    Kvrelay__V1__GenerateResponse *m = kvrelay__v1__generate_response__unpack(NULL, len, data);
    if (!m || gs->got_done)
        goto bad;
    struct kvr_gen_msg msg = {
        .prompt_text = gs->n_msgs == 0 ? m->prompt_text : NULL,
        .has_token = m->done == NULL,
        .token_id = m->done ? -1 : m->token_id,
        .index = m->index,
        .text = m->done ? "" : m->text,
        .done = NULL,
    };
    if (m->done) {
        const Kvrelay__V1__Completion *d = m->done;
        struct kvr_gen_usage *u = &gs->usage;
        memset(u, 0, sizeof *u);
        u->finish_reason = (int)d->finish_reason;
        u->seed = d->seed;
        u->prefill_rank = u->decode_rank = -1;
        if (d->usage) {
            u->prompt_tokens = d->usage->prompt_tokens;
            u->generated_tokens = d->usage->generated_tokens;
            u->queue_ms = d->usage->queue_ms;
            u->ttft_ms = d->usage->ttft_ms;
            u->tpot_ms = d->usage->tpot_ms;
            u->total_ms = d->usage->total_ms;
            u->prefill_rank = d->usage->prefill_rank;
            u->decode_rank = d->usage->decode_rank;
        }
        msg.done = u;
        gs->got_done = 1;
    }
    gs->n_msgs++;
    int r = gs->fn ? gs->fn(gs->ud, &msg) : 0;
    kvrelay__v1__generate_response__free_unpacked(m, NULL);
    return r ? 1 : 0;
bad:
    if (m)
        kvrelay__v1__generate_response__free_unpacked(m, NULL);
    return -1;
}

int kvr_client_generate(struct kvr_client *c, const struct kvr_gen_params *p, kvr_gen_fn fn,
                        void *ud, struct kvr_gen_usage *usage, struct kvr_rpc_status *st) {
    Kvrelay__V1__GenerateRequest r;
    kvrelay__v1__generate_request__init(&r);
    int32_t *ids = NULL;
    union {
        const char *c;
        char *m;
    } prompt = {.c = p->prompt ? p->prompt : ""};
    r.prompt = prompt.m;
    if (p->n_prompt_tokens > 0) {
        if (!(ids = malloc((size_t)p->n_prompt_tokens * sizeof *ids))) {
            set_status(st, GRPC_STATUS_INTERNAL, 0, "client: out of memory");
            return st->code;
        }
        for (int i = 0; i < p->n_prompt_tokens; i++)
            ids[i] = p->prompt_tokens[i];
        r.n_prompt_tokens = (size_t)p->n_prompt_tokens;
        r.prompt_tokens = ids;
    }
    r.max_tokens = p->max_tokens;
    r.temperature = p->temperature;
    r.top_p = p->top_p;
    r.seed = p->seed;
    r.ignore_eos = p->ignore_eos != 0;
    r.kv_policy = (Kvrelay__V1__KvPolicy)p->kv_policy;
    if (p->kv_window != 0) {
        r.kv_window_opt_case = KVRELAY__V1__GENERATE_REQUEST__KV_WINDOW_OPT_KV_WINDOW;
        r.kv_window = p->kv_window;
    }
    if (p->kv_sinks >= 0) {
        r.kv_sinks_opt_case = KVRELAY__V1__GENERATE_REQUEST__KV_SINKS_OPT_KV_SINKS;
        r.kv_sinks = p->kv_sinks;
    }
    size_t len = kvrelay__v1__generate_request__get_packed_size(&r);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        free(ids);
        set_status(st, GRPC_STATUS_INTERNAL, 0, "client: out of memory");
        return st->code;
    }
    kvrelay__v1__generate_request__pack(&r, buf);
    free(ids);

    struct gen_state gs = {.fn = fn, .ud = ud};
    run_call(c, "/kvrelay.v1.Inference/Generate", buf, len, p->timeout_s, gen_on_message, &gs, st);
    free(buf);
    if (st->code == GRPC_STATUS_OK && !gs.got_done)
        set_status(st, GRPC_STATUS_INTERNAL, 1,
                   "client: the stream ended without its final message");
    if (st->code == GRPC_STATUS_OK && usage)
        *usage = gs.usage;
    return st->code;
}

/* ---------------------------------------------------------------------------------------
 * Unary calls
 * ------------------------------------------------------------------------------------- */

struct unary_state {
    uint8_t *data;
    size_t len;
    int n;
};

static int unary_on_message(void *ud, const uint8_t *data, size_t len) {
    struct unary_state *us = ud;
    if (us->n++ > 0)
        return -1; /* a unary call answers once */
    us->data = malloc(len ? len : 1);
    if (!us->data)
        return -1;
    memcpy(us->data, data, len);
    us->len = len;
    return 0;
}

int kvr_client_unary(struct kvr_client *c, const char *method, const void *req, size_t req_len,
                     double timeout_s, uint8_t **resp, size_t *resp_len,
                     struct kvr_rpc_status *st) {
    struct unary_state us = {0};
    *resp = NULL;
    *resp_len = 0;
    run_call(c, method, req, req_len, timeout_s, unary_on_message, &us, st);
    if (st->code == GRPC_STATUS_OK && us.data) {
        *resp = us.data;
        *resp_len = us.len;
    } else {
        if (st->code == GRPC_STATUS_OK)
            set_status(st, GRPC_STATUS_INTERNAL, 1, "client: the server sent no response message");
        free(us.data);
    }
    return st->code;
}

static void copy_str(char *dst, size_t len, const char *src) {
    snprintf(dst, len, "%s", src ? src : "");
}

int kvr_client_cluster_status(struct kvr_client *c, double timeout_s,
                              struct coord_cluster_status *out, struct kvr_rpc_status *st) {
    uint8_t *resp = NULL;
    size_t len = 0;
    memset(out, 0, sizeof *out);
    if (kvr_client_unary(c, "/kvrelay.v1.Inference/ClusterStatus", "", 0, timeout_s, &resp, &len,
                         st) != 0)
        return st->code;
    Kvrelay__V1__ClusterStatusResponse *r =
        kvrelay__v1__cluster_status_response__unpack(NULL, len, resp);
    free(resp);
    if (!r) {
        set_status(st, GRPC_STATUS_INTERNAL, 1, "client: cannot parse ClusterStatusResponse");
        return st->code;
    }
    if (r->n_nodes > 0 && !(out->nodes = calloc(r->n_nodes, sizeof *out->nodes))) {
        kvrelay__v1__cluster_status_response__free_unpacked(r, NULL);
        set_status(st, GRPC_STATUS_RESOURCE_EXHAUSTED, 1, "client: out of memory");
        return st->code;
    }
    out->n_nodes = (int)r->n_nodes;
    for (int i = 0; i < out->n_nodes; i++) {
        const Kvrelay__V1__NodeStatus *p = r->nodes[i];
        struct coord_node_status *ns = &out->nodes[i];
        ns->rank = p->rank;
        copy_str(ns->role, sizeof ns->role, p->role);
        copy_str(ns->host, sizeof ns->host, p->host);
        ns->alive = p->alive;
        ns->kv_bytes_total = p->kv_bytes_total;
        ns->kv_bytes_used = p->kv_bytes_used;
        ns->kv_bytes_free = p->kv_bytes_free;
        ns->kv_bytes_reserved = p->kv_bytes_reserved;
        ns->running = p->running;
        ns->queued = p->queued;
        ns->queued_prompt_tokens = p->queued_prompt_tokens;
        ns->report_age_ms = p->report_age_ms;
        copy_str(ns->state, sizeof ns->state, p->state);
    }
    out->waiting_requests = r->waiting_requests;
    out->running_requests = r->running_requests;
    out->finished_requests = r->finished_requests;
    out->seq_len = r->seq_len;
    out->vocab_size = r->vocab_size;
    out->decode_desired = r->decode_target;
    out->decode_min = r->decode_min;
    out->decode_max = r->decode_max;
    out->autoscale = r->autoscale;
    copy_str(out->last_decision, sizeof out->last_decision, r->last_decision);
    kvrelay__v1__cluster_status_response__free_unpacked(r, NULL);
    return st->code;
}

int kvr_client_health(struct kvr_client *c, double timeout_s, int *serving, char *detail,
                      size_t detail_len, struct kvr_rpc_status *st) {
    uint8_t *resp = NULL;
    size_t len = 0;
    *serving = 0;
    if (detail && detail_len)
        detail[0] = '\0';
    if (kvr_client_unary(c, "/kvrelay.v1.Inference/Health", "", 0, timeout_s, &resp, &len, st) != 0)
        return st->code;
    Kvrelay__V1__HealthResponse *r = kvrelay__v1__health_response__unpack(NULL, len, resp);
    free(resp);
    if (!r) {
        set_status(st, GRPC_STATUS_INTERNAL, 1, "client: cannot parse HealthResponse");
        return st->code;
    }
    *serving = r->serving;
    if (detail && detail_len)
        copy_str(detail, detail_len, r->detail);
    kvrelay__v1__health_response__free_unpacked(r, NULL);
    return st->code;
}
