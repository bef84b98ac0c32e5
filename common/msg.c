/* msg.c - writers and validating parsers of kvrelay's MPI messages (see msg.h). Pure
 * functions on bytes: xfer.c moves them over MPI, the coordinator's transport and the
 * tests call them directly. */
#include "msg.h"

#include <limits.h>
#include <math.h>
#include <string.h>

#include "log.h"
#include "status.h"

const char *kvr_role_name(int role) {
    switch (role) {
    case KVR_ROLE_COORD:
        return "coordinator";
    case KVR_ROLE_PREFILL:
        return "prefill";
    case KVR_ROLE_DECODE:
        return "decode";
    }
    return "?";
}

static int role_known(int role) { return role >= KVR_ROLE_COORD && role <= KVR_ROLE_DECODE; }

const char *kvr_msg_kind_name(int kind) {
    switch (kind) {
    case KVR_MSG_HELLO:
        return "HELLO";
    case KVR_MSG_STATUS:
        return "STATUS";
    case KVR_MSG_TOKENS:
        return "TOKENS";
    case KVR_MSG_PREFILL_DONE:
        return "PREFILL_DONE";
    case KVR_MSG_PREFILL_REQ:
        return "PREFILL_REQ";
    case KVR_MSG_CANCEL:
        return "CANCEL";
    case KVR_MSG_SHUTDOWN:
        return "SHUTDOWN";
    case KVR_MSG_PING:
        return "PING";
    case KVR_MSG_RESET:
        return "RESET";
    case KVR_MSG_SEQ_BEGIN:
        return "SEQ_BEGIN";
    case KVR_MSG_KV:
        return "KV";
    case KVR_MSG_SEQ_READY:
        return "SEQ_READY";
    case KVR_MSG_SEQ_ABORT:
        return "SEQ_ABORT";
    case KVR_MSG_LINK_PORT:
        return "LINK_PORT";
    case KVR_MSG_LINKED:
        return "LINKED";
    case KVR_MSG_BYE:
        return "BYE";
    case KVR_MSG_DRAIN_ME:
        return "DRAIN_ME";
    case KVR_MSG_LINK:
        return "LINK";
    case KVR_MSG_UNLINK:
        return "UNLINK";
    case KVR_MSG_LEAVE:
        return "LEAVE";
    case KVR_MSG_JOIN_INFO:
        return "JOIN_INFO";
    case KVR_MSG_LINK_HELLO:
        return "LINK_HELLO";
    }
    return NULL;
}

char *kvr_reason_line(char *out, size_t out_len, const char *reason, size_t len) {
    if (!out_len)
        return out;
    size_t i = 0;
    for (; reason && i < len && i + 1 < out_len && reason[i]; i++) {
        unsigned char c = (unsigned char)reason[i];
        out[i] = (c < 0x20 || c == 0x7f) ? ' ' : (char)c;
    }
    out[i] = '\0';
    return out;
}

/* ---- writing ---------------------------------------------------------------------- */

static void write_header(struct kvr_wbuf *w, int kind, uint64_t req_id) {
    kvr_w_u32(w, KVR_MSG_MAGIC);
    kvr_w_u16(w, KVR_MSG_VERSION);
    kvr_w_u16(w, (uint16_t)kind);
    kvr_w_u64(w, req_id);
}

/* u16 length, then the bytes (at most KVR_REASON_MAX; a NUL ends it early). */
static void write_reason(struct kvr_wbuf *w, const char *reason, int len) {
    size_t n = 0;
    if (reason && len > 0) {
        n = (size_t)len < KVR_REASON_MAX ? (size_t)len : KVR_REASON_MAX;
        n = strnlen(reason, n);
    }
    kvr_w_u16(w, (uint16_t)n);
    kvr_w_bytes(w, reason, n);
}

void kvr_msg_write_hello(struct kvr_wbuf *w, const struct kvr_hello *h) {
    char host[64] = {0};
    memcpy(host, h->host, strnlen(h->host, 63));
    write_header(w, KVR_MSG_HELLO, 0);
    kvr_w_i32(w, h->role);
    kvr_w_i32(w, h->colocated);
    kvr_w_u32(w, h->epoch);
    kvr_w_i32(w, h->setup_status);
    kvr_w_bytes(w, host, 64);
    kvr_w_i32(w, h->n_layers);
    kvr_w_i32(w, h->kv_dim);
    kvr_w_i32(w, h->block_tokens);
    kvr_w_i32(w, h->seq_len);
    kvr_w_i32(w, h->vocab_size);
    kvr_w_u64(w, h->fingerprint);
    kvr_w_u64(w, h->kv_bytes_total);
    kvr_w_i32(w, h->n_blocks_total);
    kvr_w_i32(w, h->n_threads);
    kvr_w_i32(w, h->max_batch);
    kvr_w_i32(w, h->max_batch_tokens);
    kvr_w_i32(w, h->n_ctx_max);
    kvr_w_i32(w, h->kv_type);
}

void kvr_msg_write_status(struct kvr_wbuf *w, const struct kvr_node_report *r) {
    write_header(w, KVR_MSG_STATUS, 0);
    kvr_w_u64(w, r->kv_bytes_total);
    kvr_w_u64(w, r->kv_bytes_used);
    kvr_w_u64(w, r->kv_bytes_free);
    kvr_w_i32(w, r->n_blocks_total);
    kvr_w_i32(w, r->n_blocks_free);
    kvr_w_i32(w, r->running);
    kvr_w_i32(w, r->queued);
    kvr_w_u64(w, r->queued_prompt_tokens);
    kvr_w_u64(w, r->steps);
    kvr_w_u64(w, r->tokens_out);
}

void kvr_msg_write_tokens(struct kvr_wbuf *w, const struct kvr_tok_event *ev, int n) {
    write_header(w, KVR_MSG_TOKENS, 0);
    kvr_w_i32(w, n);
    for (int i = 0; i < n; i++) {
        kvr_w_u64(w, ev[i].req_id);
        kvr_w_i32(w, ev[i].token);
        kvr_w_i32(w, ev[i].finish);
        kvr_w_i32(w, ev[i].status);
        kvr_w_i32(w, ev[i].n_generated);
        write_reason(w, ev[i].finish != KVR_FINISH_NONE ? ev[i].reason : NULL, ev[i].reason_len);
    }
}

void kvr_msg_write_prefill_done(struct kvr_wbuf *w, uint64_t req_id, const struct kvr_prefill_done *d) {
    write_header(w, KVR_MSG_PREFILL_DONE, req_id);
    kvr_w_i32(w, d->status);
    kvr_w_i32(w, d->n_prompt);
    kvr_w_f64(w, d->queue_ms);
    kvr_w_f64(w, d->prefill_ms);
    write_reason(w, d->reason, d->reason_len);
}

void kvr_msg_write_req(struct kvr_wbuf *w, int kind, const struct kvr_req_params *p, const int *prompt) {
    write_header(w, kind, p->req_id);
    kvr_w_u64(w, p->req_id);
    kvr_w_u64(w, p->begin_no);
    kvr_w_i32(w, p->n_prompt);
    kvr_w_i32(w, p->max_tokens);
    kvr_w_f32(w, p->temperature);
    kvr_w_f32(w, p->top_p);
    kvr_w_u64(w, p->seed);
    kvr_w_i32(w, p->stop_at_eos);
    kvr_w_i32(w, (int32_t)p->policy.policy);
    kvr_w_i32(w, p->policy.window);
    kvr_w_i32(w, p->policy.sinks);
    kvr_w_i32(w, p->prefill_rank);
    kvr_w_i32(w, p->decode_rank);
    kvr_w_f64(w, p->t_coord_ms);
    for (int i = 0; i < p->n_prompt; i++)
        kvr_w_i32(w, prompt[i]);
}

void kvr_msg_write_empty(struct kvr_wbuf *w, int kind, uint64_t req_id) {
    write_header(w, kind, req_id);
}

void kvr_msg_write_reset(struct kvr_wbuf *w, uint32_t epoch) {
    write_header(w, KVR_MSG_RESET, 0);
    kvr_w_u32(w, epoch);
}

void kvr_msg_write_kv(struct kvr_wbuf *w, uint64_t req_id, uint64_t begin_no, const void *wire, size_t len) {
    write_header(w, KVR_MSG_KV, req_id);
    kvr_w_u64(w, begin_no);
    kvr_w_bytes(w, wire, len);
}

void kvr_msg_write_seq_ready(struct kvr_wbuf *w, uint64_t req_id, const struct kvr_seq_ready *r) {
    write_header(w, KVR_MSG_SEQ_READY, req_id);
    kvr_w_u64(w, r->begin_no);
    kvr_w_i32(w, r->first_token);
    kvr_w_u64(w, r->rng);
    kvr_w_i32(w, r->n_kv_msgs);
    kvr_w_f64(w, r->prefill_ms);
}

void kvr_msg_write_seq_abort(struct kvr_wbuf *w, uint64_t req_id, const struct kvr_seq_abort *a) {
    write_header(w, KVR_MSG_SEQ_ABORT, req_id);
    kvr_w_u64(w, a->begin_no);
    kvr_w_i32(w, a->status);
    write_reason(w, a->reason, a->reason_len);
}

void kvr_msg_write_link(struct kvr_wbuf *w, int kind, const struct kvr_link *l) {
    size_t n = strnlen(l->port, KVR_PORT_MAX - 1);
    write_header(w, kind, 0);
    kvr_w_i32(w, l->peer);
    kvr_w_i32(w, l->value);
    kvr_w_u16(w, (uint16_t)n);
    kvr_w_bytes(w, l->port, n);
}

void kvr_msg_write_join_info(struct kvr_wbuf *w, const struct kvr_join_info *j) {
    write_header(w, KVR_MSG_JOIN_INFO, 0);
    kvr_w_i32(w, j->self);
    kvr_w_i32(w, j->coord);
    kvr_w_i32(w, j->n_peers);
    for (int i = 0; i < j->n_peers; i++) {
        char host[64] = {0};
        memcpy(host, j->peers[i].host, strnlen(j->peers[i].host, 63));
        kvr_w_i32(w, j->peers[i].id);
        kvr_w_i32(w, j->peers[i].role);
        kvr_w_bytes(w, host, 64);
    }
}

/* ---- parsing ---------------------------------------------------------------------- */

int kvr_msg_parse_header(const unsigned char *bytes, size_t len, struct kvr_msg *m) {
    struct kvr_rbuf r = {.p = bytes, .len = len};
    uint32_t magic = kvr_r_u32(&r);
    uint16_t version = kvr_r_u16(&r);
    uint16_t kind = kvr_r_u16(&r);
    uint64_t req_id = kvr_r_u64(&r);
    if (r.err || magic != KVR_MSG_MAGIC || version != KVR_MSG_VERSION || !kvr_msg_kind_name(kind)) {
        KVR_LOG_ERROR("malformed %zu-byte message from rank %d (magic %08x version %u kind %u)", len, m->src,
                      magic, version, kind);
        return KVR_EFORMAT;
    }
    m->kind = kind;
    m->req_id = req_id;
    m->body = bytes + KVR_MSG_HDR_NBYTES;
    m->body_len = len - KVR_MSG_HDR_NBYTES;
    return KVR_OK;
}

static int bad(const struct kvr_msg *m, const char *what) {
    KVR_LOG_ERROR("bad %s from rank %d: %s", kvr_msg_kind_name(m->kind) ? kvr_msg_kind_name(m->kind) : "message",
                  m->src, what);
    return KVR_EFORMAT;
}

/* Every body byte read, none missing; no request id on a kind that has none. */
static int parse_end(const struct kvr_msg *m, struct kvr_rbuf *r) {
    if (r->err)
        return bad(m, "body too short");
    if (r->off != r->len)
        return bad(m, "extra bytes after the body");
    int has_id = m->kind != KVR_MSG_HELLO && m->kind != KVR_MSG_STATUS && m->kind != KVR_MSG_TOKENS &&
                 m->kind != KVR_MSG_RESET && m->kind != KVR_MSG_PING && m->kind != KVR_MSG_SHUTDOWN &&
                 m->kind != KVR_MSG_LINK_PORT && m->kind != KVR_MSG_LINKED && m->kind != KVR_MSG_BYE &&
                 m->kind != KVR_MSG_DRAIN_ME && m->kind != KVR_MSG_LINK && m->kind != KVR_MSG_UNLINK &&
                 m->kind != KVR_MSG_LEAVE && m->kind != KVR_MSG_JOIN_INFO && m->kind != KVR_MSG_LINK_HELLO;
    if (!has_id && m->req_id != 0)
        return bad(m, "a request id on a message that has none");
    return KVR_OK;
}

static int read_reason(struct kvr_rbuf *r, const char **reason, int *len) {
    uint16_t n = kvr_r_u16(r);
    const unsigned char *p = kvr_r_take(r, n);
    *reason = n ? (const char *)p : NULL;
    *len = p ? n : 0;
    return !r->err && n <= KVR_REASON_MAX;
}

/* A kvr_status value a peer may send: OK or one of the failures (a new code from a newer
 * peer still parses; it is shown as "unknown status"). */
static int status_ok(int32_t s) { return s <= 0 && s > -4096; }

#define REQ_FIXED_NBYTES (8 + 8 + 4 * 4 + 8 + 4 * 6 + 8)

int kvr_msg_parse_req(const struct kvr_msg *m, struct kvr_req_params *p, int *prompt, int max_prompt,
                      int vocab) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    memset(p, 0, sizeof *p);
    p->req_id = kvr_r_u64(&r);
    p->begin_no = kvr_r_u64(&r);
    p->n_prompt = kvr_r_i32(&r);
    p->max_tokens = kvr_r_i32(&r);
    p->temperature = kvr_r_f32(&r);
    p->top_p = kvr_r_f32(&r);
    p->seed = kvr_r_u64(&r);
    p->stop_at_eos = kvr_r_i32(&r);
    int32_t pol = kvr_r_i32(&r);
    p->policy.window = kvr_r_i32(&r);
    p->policy.sinks = kvr_r_i32(&r);
    p->prefill_rank = kvr_r_i32(&r);
    p->decode_rank = kvr_r_i32(&r);
    p->t_coord_ms = kvr_r_f64(&r);
    if (r.err)
        return bad(m, "body too short");
    if (m->kind != KVR_MSG_PREFILL_REQ && m->kind != KVR_MSG_SEQ_BEGIN)
        return bad(m, "not a request");
    if (p->req_id != m->req_id)
        return bad(m, "request id differs from the header's");
    if (p->begin_no == 0)
        return bad(m, "begin number 0");
    if (p->n_prompt < 1 || p->n_prompt > KVR_MSG_MAX_PROMPT ||
        m->body_len - REQ_FIXED_NBYTES != 4 * (size_t)p->n_prompt)
        return bad(m, "prompt length disagrees with the body");
    if (p->max_tokens < 1)
        return bad(m, "max_tokens < 1");
    if (!isfinite(p->temperature) || p->temperature < 0.0f || !(p->top_p >= 0.0f && p->top_p <= 1.0f))
        return bad(m, "sampling parameters out of range");
    if (p->stop_at_eos != 0 && p->stop_at_eos != 1)
        return bad(m, "stop_at_eos is not 0 or 1");
    if (pol < KVR_KV_DENSE || pol > KVR_KV_SINK)
        return bad(m, "unknown kv policy");
    p->policy.policy = (enum kvr_kv_policy)pol;
    if (kvr_kv_policy_check(&p->policy, INT_MAX, NULL, 0) != KVR_OK)
        return bad(m, "kv policy parameters out of range");
    if (p->prefill_rank < 0 || p->decode_rank < 0)
        return bad(m, "negative rank");
    if (!isfinite(p->t_coord_ms))
        return bad(m, "time is not finite");
    if (p->n_prompt > max_prompt) {
        KVR_LOG_ERROR("req=%llu prompt of %d tokens exceeds %d", (unsigned long long)p->req_id, p->n_prompt,
                      max_prompt);
        return KVR_ERANGE;
    }
    for (int i = 0; i < p->n_prompt; i++) {
        prompt[i] = kvr_r_i32(&r);
        if (prompt[i] < 0 || prompt[i] >= vocab) {
            /* Refused here, for this request only: in a batch it would fail the whole
             * forward pass, and with it every other sequence of the step. */
            KVR_LOG_ERROR("req=%llu prompt token %d at %d is outside the vocabulary of %d",
                          (unsigned long long)p->req_id, prompt[i], i, vocab);
            return KVR_ERANGE;
        }
    }
    return parse_end(m, &r);
}

int kvr_msg_parse_hello(const struct kvr_msg *m, struct kvr_hello *h) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    memset(h, 0, sizeof *h);
    h->role = kvr_r_i32(&r);
    h->colocated = kvr_r_i32(&r);
    h->epoch = kvr_r_u32(&r);
    h->setup_status = kvr_r_i32(&r);
    const unsigned char *host = kvr_r_take(&r, 64);
    if (host) {
        memcpy(h->host, host, 64);
        h->host[63] = '\0';
    }
    h->n_layers = kvr_r_i32(&r);
    h->kv_dim = kvr_r_i32(&r);
    h->block_tokens = kvr_r_i32(&r);
    h->seq_len = kvr_r_i32(&r);
    h->vocab_size = kvr_r_i32(&r);
    h->fingerprint = kvr_r_u64(&r);
    h->kv_bytes_total = kvr_r_u64(&r);
    h->n_blocks_total = kvr_r_i32(&r);
    h->n_threads = kvr_r_i32(&r);
    h->max_batch = kvr_r_i32(&r);
    h->max_batch_tokens = kvr_r_i32(&r);
    h->n_ctx_max = kvr_r_i32(&r);
    h->kv_type = kvr_r_i32(&r);
    int rc = parse_end(m, &r);
    if (rc != KVR_OK)
        return rc;
    if (h->role != KVR_ROLE_PREFILL && h->role != KVR_ROLE_DECODE)
        return bad(m, "role is neither prefill nor decode");
    if (h->colocated != 0 && h->colocated != 1)
        return bad(m, "colocated is not 0 or 1");
    if (h->kv_type < KVR_KV_F32 || h->kv_type > KVR_KV_BF16)
        return bad(m, "kv type out of range");
    if (h->colocated && h->role != KVR_ROLE_DECODE)
        return bad(m, "a colocated node must be a decode node");
    if (!status_ok(h->setup_status))
        return bad(m, "setup status out of range");
    if (h->setup_status != KVR_OK)
        return KVR_OK; /* "cannot serve": its limits mean nothing */
    /* Every limit placement divides by or multiplies with is positive and bounded, so
     * that the coordinator's arithmetic cannot overflow or divide by zero. */
    if (h->n_layers < 1 || h->n_layers > 4096 || h->kv_dim < 1 || h->kv_dim > KVR_MSG_MAX_DIM)
        return bad(m, "model shape out of range");
    if (h->block_tokens < 1 || h->block_tokens > KVR_MSG_MAX_BLOCK_TOKENS)
        return bad(m, "block_tokens out of range");
    if (h->seq_len < 1 || h->seq_len > KVR_MSG_MAX_DIM || h->vocab_size < 1 || h->vocab_size > KVR_MSG_MAX_DIM)
        return bad(m, "context or vocabulary out of range");
    if (h->n_blocks_total < 1 || h->kv_bytes_total == 0)
        return bad(m, "empty KV pool");
    if (h->n_threads < 0 || h->max_batch < 1 || h->max_batch > KVR_MSG_MAX_DIM || h->max_batch_tokens < 1 ||
        h->max_batch_tokens > KVR_MSG_MAX_DIM || h->n_ctx_max < 1 || h->n_ctx_max > INT_MAX / 2)
        return bad(m, "batch limits out of range");
    return KVR_OK;
}

int kvr_msg_parse_status(const struct kvr_msg *m, struct kvr_node_report *s) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    memset(s, 0, sizeof *s);
    s->kv_bytes_total = kvr_r_u64(&r);
    s->kv_bytes_used = kvr_r_u64(&r);
    s->kv_bytes_free = kvr_r_u64(&r);
    s->n_blocks_total = kvr_r_i32(&r);
    s->n_blocks_free = kvr_r_i32(&r);
    s->running = kvr_r_i32(&r);
    s->queued = kvr_r_i32(&r);
    s->queued_prompt_tokens = kvr_r_u64(&r);
    s->steps = kvr_r_u64(&r);
    s->tokens_out = kvr_r_u64(&r);
    int rc = parse_end(m, &r);
    if (rc != KVR_OK)
        return rc;
    if (s->kv_bytes_used > s->kv_bytes_total || s->kv_bytes_free > s->kv_bytes_total || s->n_blocks_total < 0 ||
        s->n_blocks_free < 0 || s->n_blocks_free > s->n_blocks_total || s->running < 0 || s->queued < 0)
        return bad(m, "pool or queue numbers out of range");
    return KVR_OK;
}

int kvr_msg_parse_tokens(const struct kvr_msg *m, struct kvr_tok_event *ev, int max_ev, int *n) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    int32_t cnt = kvr_r_i32(&r);
    *n = 0;
    if (r.err || cnt < 1 || cnt > max_ev)
        return bad(m, "event count out of range");
    for (int i = 0; i < cnt; i++) {
        struct kvr_tok_event *e = &ev[i];
        e->req_id = kvr_r_u64(&r);
        e->token = kvr_r_i32(&r);
        e->finish = kvr_r_i32(&r);
        e->status = kvr_r_i32(&r);
        e->n_generated = kvr_r_i32(&r);
        if (!read_reason(&r, &e->reason, &e->reason_len))
            return bad(m, r.err ? "body too short" : "reason too long");
        if (e->finish < KVR_FINISH_NONE || e->finish > KVR_FINISH_ERROR)
            return bad(m, "unknown finish reason");
        if (e->token < -1 || e->n_generated < 0 || !status_ok(e->status))
            return bad(m, "event values out of range");
        if (e->finish == KVR_FINISH_NONE && (e->token < 0 || e->status != KVR_OK || e->reason_len != 0))
            return bad(m, "a running event without a token, or with a status");
    }
    int rc = parse_end(m, &r);
    if (rc == KVR_OK)
        *n = cnt;
    return rc;
}

int kvr_msg_parse_prefill_done(const struct kvr_msg *m, struct kvr_prefill_done *d) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    memset(d, 0, sizeof *d);
    d->status = kvr_r_i32(&r);
    d->n_prompt = kvr_r_i32(&r);
    d->queue_ms = kvr_r_f64(&r);
    d->prefill_ms = kvr_r_f64(&r);
    if (!read_reason(&r, &d->reason, &d->reason_len) && !r.err)
        return bad(m, "reason too long");
    int rc = parse_end(m, &r);
    if (rc != KVR_OK)
        return rc;
    if (!status_ok(d->status) || d->n_prompt < 0 || !isfinite(d->queue_ms) || !isfinite(d->prefill_ms))
        return bad(m, "values out of range");
    return KVR_OK;
}

int kvr_msg_parse_reset(const struct kvr_msg *m, uint32_t *epoch) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    *epoch = kvr_r_u32(&r);
    int rc = parse_end(m, &r);
    if (rc == KVR_OK && *epoch == 0)
        return bad(m, "epoch 0");
    return rc;
}

int kvr_msg_parse_kv(const struct kvr_msg *m, uint64_t *begin_no, const unsigned char **wire,
                     size_t *wire_len) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    *begin_no = kvr_r_u64(&r);
    if (r.err || *begin_no == 0 || m->body_len == 8)
        return bad(m, "no begin number or no block");
    *wire = m->body + 8;
    *wire_len = m->body_len - 8;
    return KVR_OK;
}

int kvr_msg_parse_seq_ready(const struct kvr_msg *m, struct kvr_seq_ready *s) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    memset(s, 0, sizeof *s);
    s->begin_no = kvr_r_u64(&r);
    s->first_token = kvr_r_i32(&r);
    s->rng = kvr_r_u64(&r);
    s->n_kv_msgs = kvr_r_i32(&r);
    s->prefill_ms = kvr_r_f64(&r);
    int rc = parse_end(m, &r);
    if (rc != KVR_OK)
        return rc;
    if (s->begin_no == 0 || s->first_token < 0 || s->n_kv_msgs < 0 || !isfinite(s->prefill_ms))
        return bad(m, "values out of range");
    return KVR_OK;
}

int kvr_msg_parse_seq_abort(const struct kvr_msg *m, struct kvr_seq_abort *a) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    memset(a, 0, sizeof *a);
    a->begin_no = kvr_r_u64(&r);
    a->status = kvr_r_i32(&r);
    if (!read_reason(&r, &a->reason, &a->reason_len) && !r.err)
        return bad(m, "reason too long");
    int rc = parse_end(m, &r);
    if (rc != KVR_OK)
        return rc;
    if (a->begin_no == 0 || a->status >= 0 || !status_ok(a->status))
        return bad(m, "values out of range");
    return KVR_OK;
}

int kvr_msg_parse_link(const struct kvr_msg *m, struct kvr_link *l) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    memset(l, 0, sizeof *l);
    l->peer = kvr_r_i32(&r);
    l->value = kvr_r_i32(&r);
    uint16_t n = kvr_r_u16(&r);
    const unsigned char *p = kvr_r_take(&r, n);
    int rc = parse_end(m, &r);
    if (rc != KVR_OK)
        return rc;
    if (l->peer < 0 || n >= KVR_PORT_MAX || memchr(p, 0, n))
        return bad(m, "values out of range");
    memcpy(l->port, p, n);
    l->port[n] = '\0';
    return KVR_OK;
}

int kvr_msg_parse_join_info(const struct kvr_msg *m, struct kvr_join_info *j) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    j->self = kvr_r_i32(&r);
    j->coord = kvr_r_i32(&r);
    j->n_peers = kvr_r_i32(&r);
    if (r.err || j->self < 0 || j->coord < 0 || j->n_peers < 1 || j->n_peers > KVR_JOIN_MAX_PEERS)
        return bad(m, "values out of range");
    for (int i = 0; i < j->n_peers; i++) {
        j->peers[i].id = kvr_r_i32(&r);
        j->peers[i].role = kvr_r_i32(&r);
        const unsigned char *h = kvr_r_take(&r, 64);
        if (r.err)
            break;
        memcpy(j->peers[i].host, h, 64);
        j->peers[i].host[63] = '\0';
        if (j->peers[i].id < 0 || j->peers[i].id == j->self || !role_known(j->peers[i].role))
            return bad(m, "bad peer");
    }
    return parse_end(m, &r);
}

int kvr_msg_parse_empty(const struct kvr_msg *m) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    return parse_end(m, &r);
}
