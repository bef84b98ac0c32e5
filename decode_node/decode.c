/* decode.c - the decode node's role in the node lifecycle (common/node.c): sequences
 * begin with the coordinator's SEQ_BEGIN (on the same ordered channel as their CANCEL),
 * their KV blocks and first token come from the prefill node (SEQ channel), and
 * continuous batching advances every running sequence by one token per step in one
 * kvr_engine_forward call; new sequences join at step boundaries and finished ones
 * leave. A failure inside a step fails only the sequence that caused it. Owns its pool,
 * engine and sequences; talks MPI only through node.h and xfer.h. */
#include "decode.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "idmap.h"
#include "kv_cache.h"
#include "kv_wire.h"
#include "log.h"
#include "model.h"
#include "node.h"
#include "sampler.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"
#include "xfer.h"

#define DEFERRED_MAX_NBYTES (64u << 20)

enum dseq_state {
    DS_WAIT_KV,  /* SEQ_BEGIN seen; blocks arriving from the prefill node */
    DS_PREFILL,  /* colocated: prompt not yet fully in the cache */
    DS_RUNNING,  /* decoding */
};

struct dseq {
    uint64_t id;           /* the attempt's wire id */
    enum dseq_state state;
    struct kvr_req_params p;
    struct kvr_kv_seq *kv;
    /* The tokens the next steps still read: the whole prompt until it is prefilled,
     * then the last max(1, L) under recompute or the last one otherwise. Compacted
     * when full, so a generation of any length holds at most hist_cap ids. */
    int *hist;             /* (hist_cap) */
    int n_hist, hist_cap, hist_keep;
    int n_prefilled;       /* colocated: prompt tokens already in the cache */
    int n_kv_msgs;         /* KV messages imported */
    int generated;
    int slot;              /* index in dnode.seqs */
    struct kvr_sampler sampler;
};

/* A SEQ-channel message that arrived before its SEQ_BEGIN (the coordinator's message
 * was still on its way): kept, in order, until the SEQ_BEGIN is in. */
struct deferred {
    struct deferred *next;
    uint64_t begin_no;
    struct kvr_msg m;      /* body points at bytes */
    unsigned char bytes[];
};

struct dnode {
    const struct decode_params *p;
    struct kvr_xfer *x;
    struct kvr_node node;
    const struct kvr_model_config *c;
    uint64_t fingerprint;
    int rank, coord;
    struct kvr_kv_pool *pool;
    struct kvr_engine *eng;
    struct kvr_wire_codec *codec;
    float *kbuf, *vbuf;    /* (kv_cap_floats) decoded K and V of one message */
    size_t kv_cap_floats;
    int *prompt_buf;       /* (seq_len) */
    struct dseq **seqs;    /* (n_seqs) live sequences, any order */
    int n_seqs, cap_seqs;
    struct kvr_idmap by_id;/* wire id -> struct dseq */
    uint64_t last_begun;   /* begin_no of the last SEQ_BEGIN taken */
    struct deferred *def_head, *def_tail;
    size_t def_nbytes;
    struct kvr_forward_item *items; /* (max_batch) */
    struct dseq **item_seq;         /* (max_batch) */
    float *logits;                  /* (max_batch, vocab) */
    void *sample_scratch;           /* (2 * vocab) ints */
    struct kvr_tok_event *events;   /* (cap_events) not yet sent, in order */
    char (*reasons)[KVR_REASON_MAX + 1]; /* (cap_events) reason of each finish event */
    int n_events, cap_events;
    int rr;
    uint64_t steps, tokens_out;
};

/* ---- events --------------------------------------------------------------------- */

/* Room for every event the sequences can emit before the next flush (two each: a token
 * and a finish), so that emit never needs memory on the token path. */
static int events_reserve(struct dnode *d, int n_seqs) {
    int need = d->n_events + 2 * n_seqs + 16;
    if (need <= d->cap_events)
        return KVR_OK;
    int cap = d->cap_events ? d->cap_events : 64;
    while (cap < need)
        cap *= 2;
    struct kvr_tok_event *e = realloc(d->events, (size_t)cap * sizeof *e);
    if (!e)
        return KVR_ENOMEM;
    d->events = e;
    char(*r)[KVR_REASON_MAX + 1] = realloc(d->reasons, (size_t)cap * sizeof *r);
    if (!r)
        return KVR_ENOMEM;
    d->reasons = r;
    d->cap_events = cap;
    return KVR_OK;
}

static void flush_events(void *ud);

static void emit(struct dnode *d, uint64_t id, int token, int finish, int status, int n_gen, const char *reason) {
    if (d->n_events == d->cap_events && events_reserve(d, 0) != KVR_OK) {
        /* No memory to grow: send what waits to make room. */
        flush_events(d);
        if (d->n_events == d->cap_events) {
            /* The coordinator's reaper ends this request within its deadline. */
            KVR_LOG_ERROR("req=%llu event lost: no memory and the coordinator channel is full",
                          (unsigned long long)id);
            return;
        }
    }
    int i = d->n_events++;
    d->events[i] = (struct kvr_tok_event){
        .req_id = id, .token = token, .finish = finish, .status = status, .n_generated = n_gen};
    snprintf(d->reasons[i], sizeof d->reasons[i], "%s", reason ? reason : "");
}

static void flush_events(void *ud) {
    struct dnode *d = ud;
    if (!d->n_events)
        return;
    for (int i = 0; i < d->n_events; i++) {
        d->events[i].reason = d->reasons[i];
        d->events[i].reason_len = (int)strlen(d->reasons[i]);
    }
    int sent = 0;
    int rc = kvr_xfer_send_tokens(d->x, d->coord, d->events, d->n_events, &sent);
    if (rc != KVR_OK)
        KVR_LOG_WARN("sent %d of %d token events (%s); the rest go with the next flush", sent, d->n_events,
                     kvr_status_str(rc));
    /* Unsent events stay, in order, for the next flush: none is ever dropped. */
    memmove(d->events, d->events + sent, (size_t)(d->n_events - sent) * sizeof *d->events);
    memmove(d->reasons, d->reasons + sent, (size_t)(d->n_events - sent) * sizeof *d->reasons);
    d->n_events -= sent;
}

/* ---- bookkeeping ---------------------------------------------------------------- */

static struct dseq *find_seq(struct dnode *d, uint64_t id) { return kvr_idmap_get(&d->by_id, id); }

static void seq_free(struct dseq *s) {
    if (!s)
        return;
    kvr_kv_seq_free(s->kv);
    free(s->hist);
    free(s);
}

static void seq_remove(struct dnode *d, struct dseq *s) {
    kvr_idmap_del(&d->by_id, s->id);
    struct dseq *last = d->seqs[--d->n_seqs];
    d->seqs[s->slot] = last;
    last->slot = s->slot;
    seq_free(s);
}

/* Ends a sequence: one finish event (with a one-line reason when it failed), blocks back
 * to the pool. */
static void finish_seq(struct dnode *d, struct dseq *s, int finish, int status, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void finish_seq(struct dnode *d, struct dseq *s, int finish, int status, const char *fmt, ...) {
    char reason[KVR_REASON_MAX + 1] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(reason, sizeof reason, fmt, ap);
        va_end(ap);
    }
    emit(d, s->id, -1, finish, status, s->generated, reason);
    if (status != KVR_OK)
        KVR_LOG_WARN("req=%llu failed: %s: %s", (unsigned long long)s->id, kvr_status_str(status), reason);
    kvr_node_report_soon(&d->node);
    seq_remove(d, s);
}

static void hist_push(struct dseq *s, int token) {
    if (s->n_hist == s->hist_cap) {
        /* Only what later steps read stays: the last hist_keep tokens. */
        int keep = s->hist_keep < s->n_hist ? s->hist_keep : s->n_hist;
        memmove(s->hist, s->hist + s->n_hist - keep, (size_t)keep * sizeof *s->hist);
        s->n_hist = keep;
    }
    s->hist[s->n_hist++] = token;
}

/* A sequence took its next token: stream it, or end it (stop token, length). */
static void take_token(struct dnode *d, struct dseq *s, int token) {
    /* BOS starts a new text (llama2.c's run stops there) and EOS ends one; a request
     * that ignores them (fixed-length outputs) keeps going. */
    if (s->p.stop_at_eos && (token == d->c->bos_id || token == d->c->eos_id)) {
        finish_seq(d, s, KVR_FINISH_STOP, KVR_OK, NULL);
        return;
    }
    hist_push(s, token);
    s->generated++;
    d->tokens_out++;
    emit(d, s->id, token, KVR_FINISH_NONE, KVR_OK, s->generated, NULL);
    if (s->generated >= s->p.max_tokens)
        finish_seq(d, s, KVR_FINISH_LENGTH, KVR_OK, NULL);
    else if (s->p.policy.policy == KVR_KV_DENSE && kvr_kv_seq_n_past(s->kv) + 1 >= d->c->seq_len)
        finish_seq(d, s, KVR_FINISH_CONTEXT, KVR_OK, NULL);
}

/* ---- messages ------------------------------------------------------------------- */

static struct dseq *new_seq(struct dnode *d, const struct kvr_req_params *p, const int *prompt, int *status) {
    struct dseq *s = calloc(1, sizeof *s);
    *status = KVR_ENOMEM;
    if (!s)
        return NULL;
    s->id = p->req_id;
    s->p = *p;
    s->hist_keep = p->policy.policy == KVR_KV_RECOMPUTE ? p->policy.window : 1;
    int base = p->n_prompt > s->hist_keep ? p->n_prompt : s->hist_keep;
    s->hist_cap = 2 * base + 2;
    s->hist = malloc((size_t)s->hist_cap * sizeof *s->hist);
    if (!s->hist || events_reserve(d, d->n_seqs + 1) != KVR_OK)
        goto fail;
    memcpy(s->hist, prompt, (size_t)p->n_prompt * sizeof *prompt);
    s->n_hist = p->n_prompt;
    struct kvr_kv_seq_params sp = {.policy = p->policy, .n_tokens_max = d->c->seq_len};
    if ((*status = kvr_kv_seq_create(d->pool, &sp, &s->kv)) != KVR_OK)
        goto fail;
    *status = KVR_ENOMEM;
    kvr_sampler_init(&s->sampler, p->temperature, p->top_p, p->seed);
    if (d->n_seqs == d->cap_seqs) {
        int cap = d->cap_seqs ? 2 * d->cap_seqs : 64;
        struct dseq **a = realloc(d->seqs, (size_t)cap * sizeof *a);
        if (!a)
            goto fail;
        d->seqs = a;
        d->cap_seqs = cap;
    }
    if (kvr_idmap_put(&d->by_id, s->id, s) != KVR_OK)
        goto fail;
    s->slot = d->n_seqs;
    d->seqs[d->n_seqs++] = s;
    *status = KVR_OK;
    return s;
fail:
    seq_free(s);
    return NULL;
}

/* The node's own limits (the coordinator checked the request against the limits this
 * node advertised; a mismatch here is a bug, answered as a failure of this request). */
static int check_req(struct dnode *d, const struct kvr_req_params *p, char *why, size_t why_len) {
    char err[160];
    if (p->decode_rank != d->rank) {
        snprintf(why, why_len, "sent to rank %d, this is rank %d", p->decode_rank, d->rank);
        return KVR_EINVAL;
    }
    if (p->prefill_rank == d->rank && !d->p->colocated) {
        snprintf(why, why_len, "a prompt sent to a decode node that does not prefill");
        return KVR_ENOTSUP;
    }
    if (p->n_prompt > d->c->seq_len) {
        snprintf(why, why_len, "prompt of %d tokens over the context %d", p->n_prompt, d->c->seq_len);
        return KVR_EINVAL;
    }
    if (kvr_kv_policy_check(&p->policy, d->c->seq_len, err, sizeof err) != KVR_OK) {
        snprintf(why, why_len, "this node refused the policy: %.150s", err);
        return KVR_EINVAL;
    }
    if (p->policy.policy == KVR_KV_RECOMPUTE && p->policy.window > d->p->max_batch_tokens) {
        snprintf(why, why_len, "recompute window %d exceeds this node's --max-batch-tokens %d", p->policy.window,
                 d->p->max_batch_tokens);
        return KVR_EINVAL;
    }
    return KVR_OK;
}

static void process_seq_msg(struct dnode *d, const struct kvr_msg *m, uint64_t begin_no);

/* SEQ-channel messages that waited for their SEQ_BEGIN, in arrival order. */
static void replay_deferred(struct dnode *d) {
    struct deferred **pp = &d->def_head, *prev = NULL;
    while (*pp) {
        struct deferred *f = *pp;
        if (f->begin_no > d->last_begun) {
            prev = f;
            pp = &f->next;
            continue;
        }
        *pp = f->next;
        d->def_nbytes -= f->m.body_len;
        process_seq_msg(d, &f->m, f->begin_no);
        free(f);
    }
    d->def_tail = prev;
    for (struct deferred *f = d->def_head; f; f = f->next)
        d->def_tail = f;
}

static void on_seq_begin(struct dnode *d, const struct kvr_msg *m) {
    struct kvr_req_params p;
    char why[KVR_REASON_MAX + 1] = "";
    if (m->src != d->coord) {
        KVR_LOG_ERROR("SEQ_BEGIN from rank %d, which is not the coordinator: ignored", m->src);
        return;
    }
    int rc = kvr_msg_parse_req(m, &p, d->prompt_buf, d->c->seq_len, d->c->vocab_size);
    if (rc != KVR_OK) {
        emit(d, m->req_id, -1, KVR_FINISH_ERROR, rc, 0, "decode node could not parse the request");
        return;
    }
    if (p.begin_no <= d->last_begun)
        KVR_LOG_ERROR("req=%llu SEQ_BEGIN number %llu after %llu: out of order", (unsigned long long)p.req_id,
                      (unsigned long long)p.begin_no, (unsigned long long)d->last_begun);
    else
        d->last_begun = p.begin_no;
    rc = check_req(d, &p, why, sizeof why);
    if (rc == KVR_OK && find_seq(d, p.req_id)) {
        snprintf(why, sizeof why, "a second SEQ_BEGIN for the same request");
        rc = KVR_EINVAL;
    }
    struct dseq *s = NULL;
    if (rc == KVR_OK && !(s = new_seq(d, &p, d->prompt_buf, &rc)))
        snprintf(why, sizeof why, "cannot create the sequence: %s", kvr_status_str(rc));
    if (!s) {
        KVR_LOG_ERROR("req=%llu refused: %s", (unsigned long long)p.req_id, why);
        emit(d, p.req_id, -1, KVR_FINISH_ERROR, rc, 0, why);
    } else if (p.prefill_rank == d->rank) {
        s->state = DS_PREFILL;
    } else {
        s->state = DS_WAIT_KV;
        /* Recompute rebuilds its window every step: it needs the tokens, not the blocks. */
        if (p.policy.policy != KVR_KV_RECOMPUTE && (rc = kvr_kv_seq_restore(s->kv, p.n_prompt)) != KVR_OK)
            finish_seq(d, s, KVR_FINISH_ERROR, rc, "no room for the prompt's KV blocks: %s", kvr_status_str(rc));
    }
    replay_deferred(d);
}

static void on_cancel(struct dnode *d, const struct kvr_msg *m) {
    /* The coordinator sends CANCEL after the SEQ_BEGIN on the same channel: the sequence
     * is here or has ended already (then there is nothing to do). */
    struct dseq *s = find_seq(d, m->req_id);
    if (s && m->src == d->coord)
        finish_seq(d, s, KVR_FINISH_CANCELLED, KVR_OK, NULL);
}

static void on_kv(struct dnode *d, struct dseq *s, const struct kvr_msg *m) {
    uint64_t begin_no;
    const unsigned char *wire;
    size_t wire_len;
    if (kvr_msg_parse_kv(m, &begin_no, &wire, &wire_len) != KVR_OK) {
        finish_seq(d, s, KVR_FINISH_ERROR, KVR_EFORMAT, "malformed KV message from rank %d", m->src);
        return;
    }
    if (s->state != DS_WAIT_KV) {
        finish_seq(d, s, KVR_FINISH_ERROR, KVR_EFORMAT, "KV block after the sequence started");
        return;
    }
    struct kvr_wire_block b;
    int rc = kvr_wire_decode(d->codec, wire, wire_len, d->fingerprint, &b, d->kbuf, d->vbuf, d->kv_cap_floats);
    if (rc == KVR_OK && (b.seq_id != s->id || b.layer_begin < 0 || b.n_layers < 1 ||
                         b.layer_begin + b.n_layers > d->c->n_layers || b.n_kv_heads * b.head_dim != d->c->kv_dim ||
                         b.token_begin < 0 || b.n_tokens < 1 || b.token_begin + b.n_tokens > s->p.n_prompt)) {
        KVR_LOG_ERROR("req=%llu KV block does not fit the sequence: seq %llu layers %d+%d tokens %d+%d "
                      "heads %d x %d", (unsigned long long)s->id, (unsigned long long)b.seq_id, b.layer_begin,
                      b.n_layers, b.token_begin, b.n_tokens, b.n_kv_heads, b.head_dim);
        rc = KVR_ESHAPE;
    }
    /* A half cache takes its own type only: the values are then exactly the sender's
     * cache (the coordinator refuses mixed --kv-type clusters at start). */
    if (rc == KVR_OK && d->p->kv_type != KVR_KV_F32 && (int)b.dtype != (int)d->p->kv_type) {
        KVR_LOG_ERROR("req=%llu KV block of %s values for a %s cache", (unsigned long long)s->id,
                      kvr_wire_dtype_name(b.dtype), kvr_kv_type_name(d->p->kv_type));
        rc = KVR_EFORMAT;
    }
    for (int l = 0; rc == KVR_OK && l < b.n_layers; l++) {
        size_t off = (size_t)l * (size_t)b.n_tokens * (size_t)d->c->kv_dim;
        rc = kvr_kv_seq_import(s->kv, b.layer_begin + l, b.token_begin, b.n_tokens, d->kbuf + off, d->vbuf + off);
    }
    if (rc != KVR_OK) {
        finish_seq(d, s, KVR_FINISH_ERROR, rc, "KV block %d from prefill rank %d: %s", s->n_kv_msgs, m->src,
                   kvr_status_str(rc));
        return;
    }
    s->n_kv_msgs++;
}

static void on_seq_ready(struct dnode *d, struct dseq *s, const struct kvr_msg *m) {
    struct kvr_seq_ready r;
    int rc = kvr_msg_parse_seq_ready(m, &r);
    if (rc != KVR_OK) {
        finish_seq(d, s, KVR_FINISH_ERROR, rc, "malformed SEQ_READY from rank %d", m->src);
        return;
    }
    if (s->state != DS_WAIT_KV) {
        finish_seq(d, s, KVR_FINISH_ERROR, KVR_EFORMAT, "a second SEQ_READY");
        return;
    }
    if (r.n_kv_msgs != s->n_kv_msgs) {
        finish_seq(d, s, KVR_FINISH_ERROR, KVR_ELENGTH, "got %d KV messages, the prefill node sent %d",
                   s->n_kv_msgs, r.n_kv_msgs);
        return;
    }
    if (r.first_token >= d->c->vocab_size) {
        finish_seq(d, s, KVR_FINISH_ERROR, KVR_EFORMAT, "first token %d outside the vocabulary", r.first_token);
        return;
    }
    s->sampler.rng = r.rng;
    s->state = DS_RUNNING;
    take_token(d, s, r.first_token);
}

static void on_seq_abort(struct dnode *d, struct dseq *s, const struct kvr_msg *m) {
    struct kvr_seq_abort a;
    char reason[KVR_REASON_MAX + 1];
    if (kvr_msg_parse_seq_abort(m, &a) != KVR_OK) {
        finish_seq(d, s, KVR_FINISH_ERROR, KVR_EFORMAT, "malformed SEQ_ABORT from rank %d", m->src);
        return;
    }
    kvr_reason_line(reason, sizeof reason, a.reason, (size_t)a.reason_len);
    if (a.status == KVR_ECANCELED)
        finish_seq(d, s, KVR_FINISH_CANCELLED, KVR_OK, NULL);
    else
        finish_seq(d, s, KVR_FINISH_ERROR, a.status, "%s", reason[0] ? reason : kvr_status_str(a.status));
}

/* A KV, SEQ_READY or SEQ_ABORT whose SEQ_BEGIN is in (begin_no <= last_begun). */
static void process_seq_msg(struct dnode *d, const struct kvr_msg *m, uint64_t begin_no) {
    struct dseq *s = find_seq(d, m->req_id);
    if (!s || s->p.begin_no != begin_no || s->p.prefill_rank != m->src) {
        /* It ended here already (cancelled, failed): the rest of its messages are moot. */
        KVR_LOG_DEBUG("req=%llu %s for no live sequence: dropped", (unsigned long long)m->req_id,
                      kvr_msg_kind_name(m->kind));
        return;
    }
    switch (m->kind) {
    case KVR_MSG_KV:
        on_kv(d, s, m);
        break;
    case KVR_MSG_SEQ_READY:
        on_seq_ready(d, s, m);
        break;
    case KVR_MSG_SEQ_ABORT:
        on_seq_abort(d, s, m);
        break;
    }
}

/* The begin_no a SEQ-channel message carries (its first body field), or 0. */
static uint64_t seq_msg_begin_no(const struct kvr_msg *m) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    uint64_t b = kvr_r_u64(&r);
    return r.err ? 0 : b;
}

static void defer(struct dnode *d, const struct kvr_msg *m, uint64_t begin_no) {
    if (d->def_nbytes + m->body_len > DEFERRED_MAX_NBYTES) {
        KVR_LOG_ERROR("req=%llu %s waits for a SEQ_BEGIN with %zu bytes already waiting: dropped",
                      (unsigned long long)m->req_id, kvr_msg_kind_name(m->kind), d->def_nbytes);
        return;
    }
    struct deferred *f = malloc(sizeof *f + m->body_len);
    if (!f) {
        KVR_LOG_ERROR("req=%llu no memory to keep an early %s: dropped", (unsigned long long)m->req_id,
                      kvr_msg_kind_name(m->kind));
        return;
    }
    f->next = NULL;
    f->begin_no = begin_no;
    f->m = *m;
    memcpy(f->bytes, m->body, m->body_len);
    f->m.body = f->bytes;
    if (d->def_tail)
        d->def_tail->next = f;
    else
        d->def_head = f;
    d->def_tail = f;
    d->def_nbytes += m->body_len;
}

static void on_msg(void *ud, const struct kvr_msg *m) {
    struct dnode *d = ud;
    /* Room for what this message can emit (a failed reserve is retried by emit). */
    events_reserve(d, d->n_seqs + 1);
    switch (m->kind) {
    case KVR_MSG_SEQ_BEGIN:
        on_seq_begin(d, m);
        return;
    case KVR_MSG_CANCEL:
        if (kvr_msg_parse_empty(m) == KVR_OK)
            on_cancel(d, m);
        return;
    case KVR_MSG_KV:
    case KVR_MSG_SEQ_READY:
    case KVR_MSG_SEQ_ABORT: {
        uint64_t b = seq_msg_begin_no(m);
        if (b == 0) {
            KVR_LOG_ERROR("%s from rank %d without a begin number: dropped", kvr_msg_kind_name(m->kind), m->src);
            return;
        }
        /* Messages of one prefill node carry non-decreasing begin numbers, so deferring
         * one defers every later one of its channel too: order is kept. */
        if (b > d->last_begun || d->def_head)
            defer(d, m, b);
        else
            process_seq_msg(d, m, b);
        if (d->def_head)
            replay_deferred(d);
        return;
    }
    default:
        KVR_LOG_WARN("unexpected %s message from rank %d", kvr_msg_kind_name(m->kind), m->src);
    }
}

/* ---- the step ------------------------------------------------------------------- */

static int has_work(const struct dnode *d) {
    for (int i = 0; i < d->n_seqs; i++)
        if (d->seqs[i]->state != DS_WAIT_KV)
            return 1;
    return 0;
}

/* Runs items [0, n) that are already checked; if the call fails anyway, runs each alone
 * so that only the item that fails ends. Returns the number of items that ran (their
 * logits are valid); failed ones are finished and marked NULL in item_seq. */
static int forward_isolated(struct dnode *d, int n_items) {
    int rc = kvr_engine_forward(d->eng, d->items, n_items);
    d->steps++;
    if (rc == KVR_OK)
        return n_items;
    KVR_LOG_ERROR("a step of %d sequences failed (%s): running them one by one", n_items, kvr_status_str(rc));
    int ok = 0;
    for (int i = 0; i < n_items; i++) {
        int rc1 = kvr_engine_forward(d->eng, &d->items[i], 1);
        if (rc1 == KVR_OK) {
            ok++;
            continue;
        }
        struct dseq *s = d->item_seq[i];
        d->item_seq[i] = NULL;
        finish_seq(d, s, KVR_FINISH_ERROR, rc1, "decode step failed for this sequence: %s", kvr_status_str(rc1));
    }
    return ok;
}

#ifdef KVR_FAULTS
static const int fault_bad_token[1] = {-1};
#endif

static int step(void *ud) {
    struct dnode *d = ud;
    if (!has_work(d))
        return 0;
    /* Events that could not be sent yet: wait for the channel rather than pile up. */
    if (events_reserve(d, d->n_seqs) != KVR_OK)
        return 0;
    const int V = d->c->vocab_size;
    int n_items = 0, n_tok = 0, n = d->n_seqs;
    int budget = d->p->max_batch_tokens;
    /* Round-robin start so that, past max_batch, every sequence gets its turn. */
    for (int k = 0; k < n && n_items < d->p->max_batch; k++) {
        struct dseq *s = d->seqs[(d->rr + k) % n];
        struct kvr_forward_item *it = &d->items[n_items];
        int recompute = s->p.policy.policy == KVR_KV_RECOMPUTE;
        int L = s->p.policy.window;
        if (s->state == DS_RUNNING) {
            int want = recompute ? (s->n_hist < L ? s->n_hist : L) : 1;
            if (n_tok + want > budget)
                continue;
            if (recompute)
                kvr_kv_seq_reset(s->kv);
            *it = (struct kvr_forward_item){.seq = s->kv, .tokens = s->hist + s->n_hist - want, .n_tokens = want};
        } else if (s->state == DS_PREFILL) {
            int want;
            const int *tok;
            if (recompute) {
                want = s->n_hist < L ? s->n_hist : L;
                if (n_tok + want > budget)
                    continue;
                kvr_kv_seq_reset(s->kv);
                tok = s->hist + s->n_hist - want;
            } else {
                want = s->p.n_prompt - s->n_prefilled;
                if (want > budget - n_tok)
                    want = budget - n_tok;
                if (want <= 0)
                    continue;
                tok = s->hist + s->n_prefilled;
            }
            *it = (struct kvr_forward_item){.seq = s->kv, .tokens = tok, .n_tokens = want, .prompt = 1};
        } else {
            continue;
        }
        /* Each sequence is checked alone before it joins the step: one that cannot run
         * (a context limit, a bad id, no block) ends by itself; the others step on. */
        int rc = kvr_engine_check_item(d->eng, it);
        const char *what = "cannot run its next step";
        if (rc == KVR_OK) {
            rc = kvr_kv_seq_reserve(s->kv, it->n_tokens);
            what = "cannot extend its cache"; /* placement reserved room: accounting is off */
        }
        if (rc != KVR_OK) {
            finish_seq(d, s, KVR_FINISH_ERROR, rc, "sequence %s: %s", what, kvr_status_str(rc));
            n = d->n_seqs;
            k = -1; /* the array changed: rescan (items taken so far stay valid) */
            n_items = 0;
            n_tok = 0;
            continue;
        }
#ifdef KVR_FAULTS
        if (d->p->faults.step_fail_seed && s->p.seed == d->p->faults.step_fail_seed && s->generated >= 3) {
            KVR_LOG_WARN("req=%llu fault injection: a bad token id in this step", (unsigned long long)s->id);
            it->tokens = fault_bad_token;
            it->n_tokens = 1;
        }
#endif
        /* A prompt chunk that does not end the prompt samples nothing: no classifier. */
        int mid_prompt = s->state == DS_PREFILL && !recompute && s->n_prefilled + it->n_tokens < s->p.n_prompt;
        it->logits = mid_prompt ? NULL : d->logits + (size_t)n_items * V;
        d->item_seq[n_items++] = s;
        n_tok += it->n_tokens;
    }
    d->rr++;
    if (n_items == 0)
        return 1;
    forward_isolated(d, n_items);
    for (int i = 0; i < n_items; i++) {
        struct dseq *s = d->item_seq[i];
        if (!s)
            continue; /* failed alone, already finished */
        if (s->state == DS_PREFILL) {
            if (s->p.policy.policy != KVR_KV_RECOMPUTE) {
                s->n_prefilled += d->items[i].n_tokens;
                if (s->n_prefilled < s->p.n_prompt)
                    continue; /* more chunks to go */
            }
            s->state = DS_RUNNING;
        }
        int tok = kvr_sampler_sample(&s->sampler, d->items[i].logits, V, d->sample_scratch);
        take_token(d, s, tok);
    }
#ifdef KVR_FAULTS
    if (d->p->faults.step_delay_ms > 0)
        kvr_sleep_ms(d->p->faults.step_delay_ms);
#endif
    return 1;
}

/* ---- lifecycle callbacks ---------------------------------------------------------- */

static void queues(void *ud, struct kvr_node_report *r) {
    struct dnode *d = ud;
    r->steps = d->steps;
    r->tokens_out = d->tokens_out;
    for (int i = 0; i < d->n_seqs; i++) {
        if (d->seqs[i]->state == DS_RUNNING) {
            r->running++;
        } else {
            r->queued++;
            r->queued_prompt_tokens += (uint64_t)(d->seqs[i]->p.n_prompt - d->seqs[i]->n_prefilled);
        }
    }
}

static void drop_deferred(struct dnode *d) {
    while (d->def_head) {
        struct deferred *f = d->def_head;
        d->def_head = f->next;
        free(f);
    }
    d->def_tail = NULL;
    d->def_nbytes = 0;
}

static void reset(void *ud) {
    struct dnode *d = ud;
    while (d->n_seqs > 0)
        seq_remove(d, d->seqs[0]);
    drop_deferred(d);
    d->n_events = 0; /* events of requests the coordinator already ended */
}

static int setup(struct dnode *d) {
    const struct decode_params *p = d->p;
    d->c = kvr_model_config(p->model);
    d->fingerprint = kvr_model_fingerprint(p->model);
    d->coord = kvr_xfer_coord_rank(d->x);
    d->rank = kvr_xfer_rank(d->x);
    int V = d->c->vocab_size;
    struct kvr_kv_pool_params pp = {.type = p->kv_type, .n_layers = d->c->n_layers, .kv_dim = d->c->kv_dim,
                                    .block_tokens = p->block_tokens, .budget_nbytes = p->kv_memory_nbytes};
    int rc = kvr_kv_pool_create(&pp, &d->pool);
    if (rc != KVR_OK)
        return rc;
    struct kvr_engine_params ep = {.model = p->model, .n_threads = p->n_threads,
                                   .n_batch_tokens_max = p->max_batch_tokens, .n_items_max = p->max_batch,
                                   .n_ctx_max = d->c->seq_len + p->max_batch_tokens};
    if ((rc = kvr_engine_create(&ep, &d->eng)) != KVR_OK)
        return rc;
    d->kv_cap_floats = (size_t)d->c->seq_len * (size_t)d->c->kv_dim;
    if ((rc = kvr_wire_codec_create(d->kv_cap_floats, &d->codec)) != KVR_OK)
        return rc;
    d->kbuf = malloc(d->kv_cap_floats * sizeof(float));
    d->vbuf = malloc(d->kv_cap_floats * sizeof(float));
    d->prompt_buf = malloc((size_t)d->c->seq_len * sizeof(int));
    d->items = calloc((size_t)p->max_batch, sizeof *d->items);
    d->item_seq = calloc((size_t)p->max_batch, sizeof *d->item_seq);
    d->logits = malloc((size_t)p->max_batch * (size_t)V * sizeof(float));
    d->sample_scratch = malloc((size_t)V * 2 * sizeof(int));
    if (!d->kbuf || !d->vbuf || !d->prompt_buf || !d->items || !d->item_seq || !d->logits || !d->sample_scratch ||
        events_reserve(d, 64) != KVR_OK)
        return KVR_ENOMEM;
    return KVR_OK;
}

static void teardown(struct dnode *d) {
    reset(d);
    free(d->seqs);
    kvr_idmap_deinit(&d->by_id);
    kvr_engine_free(d->eng);
    kvr_kv_pool_free(d->pool);
    kvr_wire_codec_free(d->codec);
    free(d->kbuf);
    free(d->vbuf);
    free(d->prompt_buf);
    free(d->items);
    free(d->item_seq);
    free(d->logits);
    free(d->sample_scratch);
    free(d->events);
    free(d->reasons);
}

static const struct kvr_node_ops decode_ops = {
    .on_msg = on_msg, .work = step, .flush = flush_events, .queues = queues, .reset = reset};

int decode_run(const struct decode_params *p) {
    static const int tags[] = {KVR_TAG_CTRL, KVR_TAG_SEQ};
    struct dnode d = {.p = p, .x = p->xfer};
    int rc = setup(&d);
    if (rc != KVR_OK)
        KVR_LOG_ERROR("decode node setup failed: %s", kvr_status_str(rc));
    struct kvr_node_params np = {.xfer = p->xfer, .tags = tags, .n_tags = 2, .report_ms = p->report_ms,
                                 .coord_timeout_s = p->coord_timeout_s, .stop = p->stop,
                                 .pool = rc == KVR_OK ? d.pool : NULL, .ops = &decode_ops, .ud = &d};
    kvr_node_hello_init(&np.hello, KVR_ROLE_DECODE, p->model, np.pool, rc);
    np.hello.colocated = p->colocated;
    np.hello.n_threads = p->n_threads;
    np.hello.max_batch = p->max_batch;
    np.hello.max_batch_tokens = p->max_batch_tokens;
    np.hello.n_ctx_max = d.c ? d.c->seq_len + p->max_batch_tokens : 0;
    kvr_node_init(&d.node, &np);
    if (rc != KVR_OK) {
        kvr_xfer_send_hello(d.x, d.node.coord, &np.hello); /* "cannot serve" */
        kvr_node_deinit(&d.node, 0);
        teardown(&d);
        return rc;
    }
    KVR_LOG_INFO("decode node up: %d blocks of %d tokens, colocated=%d", np.hello.n_blocks_total, p->block_tokens,
                 p->colocated);
    rc = kvr_node_run(&d.node);
    if (rc == KVR_OK) {
        /* Anything still here when the cluster stops is answered, not dropped. */
        while (d.n_seqs > 0)
            finish_seq(&d, d.seqs[0], KVR_FINISH_ERROR, KVR_EUNAVAIL, "decode node rank %d is stopping", d.rank);
        flush_events(&d);
    }
    kvr_node_deinit(&d.node, rc == KVR_OK ? 1.0 : 0);
    teardown(&d);
    return rc;
}
