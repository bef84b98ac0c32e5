/* decode.c - the decode node's loop: receives sequences (parameters, KV blocks, first
 * token) from prefill nodes, verifies and imports the blocks into its pool, and runs
 * continuous batching: each step advances every running sequence by one token in one
 * kvr_engine_forward call; new sequences join at step boundaries and finished ones
 * leave. Owns its pool, engine and sequences; talks MPI only through xfer.h. */
#include "decode.h"

#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "kv_cache.h"
#include "kv_wire.h"
#include "log.h"
#include "model.h"
#include "role.h"
#include "sampler.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"
#include "xfer.h"

#define N_TOMB 4096        /* remembered cancelled/failed ids */
#define MAX_MSGS_PER_LOOP 512

enum dseq_state {
    DS_WAIT_KV,  /* SEQ_BEGIN seen; blocks arriving */
    DS_PREFILL,  /* colocated: prompt not yet fully in the cache */
    DS_RUNNING,  /* decoding */
};

struct dseq {
    uint64_t id;
    enum dseq_state state;
    struct kvr_req_params p;
    struct kvr_kv_seq *kv;
    int *hist;             /* (hist_cap) prompt then generated ids */
    int n_hist, hist_cap;
    int n_prefilled;       /* colocated: prompt tokens already in the cache */
    int n_kv_msgs;         /* KV messages imported */
    int generated;
    struct kvr_sampler sampler;
};

struct tomb {
    uint64_t id;
    int reply;             /* 1: cancelled before it arrived; answer CANCELLED when it does */
};

struct dnode {
    const struct decode_params *p;
    struct kvr_xfer *x;
    const struct kvr_model_config *c;
    uint64_t fingerprint;
    int coord;
    struct kvr_kv_pool *pool;
    struct kvr_engine *eng;
    struct kvr_wire_codec *codec;
    float *kbuf, *vbuf;    /* (kv_cap_floats) decoded K and V of one message */
    size_t kv_cap_floats;
    int *prompt_buf;       /* (seq_len) */
    struct dseq **seqs;
    int n_seqs, cap_seqs;
    struct tomb tomb[N_TOMB];
    int tomb_next;
    struct kvr_forward_item *items; /* (max_batch) */
    struct dseq **item_seq;         /* (max_batch) */
    float *logits;                  /* (max_batch, vocab) */
    void *sample_scratch;           /* (2 * vocab) ints */
    struct kvr_tok_event *events;
    int n_events, cap_events;
    int rr;
    int shutdown;
    uint64_t steps, tokens_out;
    double last_report;
    int report_due; /* a sequence ended: report the pool with the next flush */
    double last_coord;     /* last message from the coordinator */
};

/* ---- bookkeeping ---------------------------------------------------------------- */

static struct dseq *find_seq(struct dnode *d, uint64_t id) {
    for (int i = 0; i < d->n_seqs; i++)
        if (d->seqs[i]->id == id)
            return d->seqs[i];
    return NULL;
}

static struct tomb *find_tomb(struct dnode *d, uint64_t id) {
    for (int i = 0; i < N_TOMB; i++)
        if (d->tomb[i].id == id && id != 0)
            return &d->tomb[i];
    return NULL;
}

static void add_tomb(struct dnode *d, uint64_t id, int reply) {
    struct tomb *t = find_tomb(d, id);
    if (!t) {
        t = &d->tomb[d->tomb_next];
        d->tomb_next = (d->tomb_next + 1) % N_TOMB;
    }
    t->id = id;
    t->reply = reply;
}

static void emit(struct dnode *d, uint64_t id, int token, int finish, int status, int n_gen) {
    if (d->n_events == d->cap_events) {
        int cap = d->cap_events ? 2 * d->cap_events : 64;
        struct kvr_tok_event *e = realloc(d->events, (size_t)cap * sizeof *e);
        if (!e) {
            KVR_LOG_ERROR("req=%llu event lost: out of memory", (unsigned long long)id);
            return;
        }
        d->events = e;
        d->cap_events = cap;
    }
    d->events[d->n_events++] = (struct kvr_tok_event){
        .req_id = id, .token = token, .finish = finish, .status = status, .n_generated = n_gen};
}

static void flush_events(struct dnode *d) {
    if (!d->n_events)
        return;
    int rc = kvr_xfer_send_tokens(d->x, d->coord, d->events, d->n_events);
    if (rc != KVR_OK)
        KVR_LOG_ERROR("cannot send %d token events: %s", d->n_events, kvr_status_str(rc));
    d->n_events = 0;
}

/* A message for request id that this node does not (or no longer) hold. If it ended
 * here already (a tomb), its pending CANCELLED reply goes out now, once; otherwise it
 * ends now with (finish, status) and is remembered as gone. */
static void answer_absent(struct dnode *d, uint64_t id, int finish, int status) {
    struct tomb *t = find_tomb(d, id);
    if (t) {
        if (t->reply)
            emit(d, id, -1, KVR_FINISH_CANCELLED, KVR_OK, 0);
        t->reply = 0;
        return;
    }
    emit(d, id, -1, finish, status, 0);
    add_tomb(d, id, 0);
}

static void seq_free(struct dseq *s) {
    if (!s)
        return;
    kvr_kv_seq_free(s->kv);
    free(s->hist);
    free(s);
}

/* Ends a sequence: one finish event, blocks back to the pool, remembered as gone. */
static void finish_seq(struct dnode *d, struct dseq *s, int finish, int status) {
    emit(d, s->id, -1, finish, status, s->generated);
    if (status != KVR_OK)
        KVR_LOG_WARN("req=%llu failed: %s", (unsigned long long)s->id, kvr_status_str(status));
    add_tomb(d, s->id, 0);
    d->report_due = 1;
    for (int i = 0; i < d->n_seqs; i++) {
        if (d->seqs[i] == s) {
            d->seqs[i] = d->seqs[--d->n_seqs];
            break;
        }
    }
    seq_free(s);
}

static int hist_push(struct dseq *s, int token) {
    if (s->n_hist == s->hist_cap) {
        int cap = s->hist_cap * 2;
        int *h = realloc(s->hist, (size_t)cap * sizeof *h);
        if (!h)
            return KVR_ENOMEM;
        s->hist = h;
        s->hist_cap = cap;
    }
    s->hist[s->n_hist++] = token;
    return KVR_OK;
}

/* A sequence took its next token: stream it, or end it (stop token, length). */
static void take_token(struct dnode *d, struct dseq *s, int token) {
    /* BOS starts a new text (llama2.c's run stops there) and EOS ends one; a request
     * that ignores them (fixed-length outputs) keeps going. */
    if (s->p.stop_at_eos && (token == KVR_TOKEN_BOS || token == KVR_TOKEN_EOS)) {
        finish_seq(d, s, KVR_FINISH_STOP, KVR_OK);
        return;
    }
    if (hist_push(s, token) != KVR_OK) {
        finish_seq(d, s, KVR_FINISH_ERROR, KVR_ENOMEM);
        return;
    }
    s->generated++;
    d->tokens_out++;
    if (s->generated >= s->p.max_tokens) {
        emit(d, s->id, token, KVR_FINISH_NONE, KVR_OK, s->generated);
        finish_seq(d, s, KVR_FINISH_LENGTH, KVR_OK);
        return;
    }
    if (s->p.policy.policy == KVR_KV_DENSE && s->n_hist >= d->c->seq_len) {
        emit(d, s->id, token, KVR_FINISH_NONE, KVR_OK, s->generated);
        finish_seq(d, s, KVR_FINISH_CONTEXT, KVR_OK);
        return;
    }
    emit(d, s->id, token, KVR_FINISH_NONE, KVR_OK, s->generated);
}

/* ---- messages ------------------------------------------------------------------- */

static struct dseq *new_seq(struct dnode *d, const struct kvr_req_params *p, const int *prompt,
                            int *status) {
    struct dseq *s = calloc(1, sizeof *s);
    *status = KVR_ENOMEM;
    if (!s)
        return NULL;
    s->id = p->req_id;
    s->p = *p;
    s->hist_cap = p->n_prompt + (p->max_tokens < 4096 ? p->max_tokens : 4096) + 1;
    s->hist = malloc((size_t)s->hist_cap * sizeof *s->hist);
    if (!s->hist)
        goto fail;
    memcpy(s->hist, prompt, (size_t)p->n_prompt * sizeof *prompt);
    s->n_hist = p->n_prompt;
    struct kvr_kv_seq_params sp = {.policy = p->policy, .n_tokens_max = d->c->seq_len};
    if ((*status = kvr_kv_seq_create(d->pool, &sp, &s->kv)) != KVR_OK)
        goto fail;
    kvr_sampler_init(&s->sampler, p->temperature, p->top_p, p->seed);
    if (d->n_seqs == d->cap_seqs) {
        int cap = d->cap_seqs ? 2 * d->cap_seqs : 64;
        struct dseq **a = realloc(d->seqs, (size_t)cap * sizeof *a);
        if (!a) {
            *status = KVR_ENOMEM;
            goto fail;
        }
        d->seqs = a;
        d->cap_seqs = cap;
    }
    d->seqs[d->n_seqs++] = s;
    *status = KVR_OK;
    return s;
fail:
    seq_free(s);
    return NULL;
}

static int check_req(struct dnode *d, const struct kvr_req_params *p) {
    char err[160];
    if (p->n_prompt > d->c->seq_len || p->max_tokens < 1 ||
        kvr_kv_policy_check(&p->policy, d->c->seq_len, err, sizeof err) != KVR_OK) {
        KVR_LOG_ERROR("req=%llu rejected: prompt %d max_tokens %d policy %s", (unsigned long long)p->req_id,
                      p->n_prompt, p->max_tokens, kvr_kv_policy_name(p->policy.policy));
        return KVR_EINVAL;
    }
    if (p->policy.policy == KVR_KV_RECOMPUTE && p->policy.window > d->p->max_batch_tokens) {
        KVR_LOG_ERROR("req=%llu rejected: recompute window %d exceeds --max-batch-tokens %d",
                      (unsigned long long)p->req_id, p->policy.window, d->p->max_batch_tokens);
        return KVR_EINVAL;
    }
    return KVR_OK;
}

static void on_seq_begin(struct dnode *d, const struct kvr_msg *m) {
    struct kvr_req_params p;
    int rc = kvr_msg_parse_req(m, &p, d->prompt_buf, d->c->seq_len, d->c->vocab_size);
    int gone = find_tomb(d, m->req_id) != NULL; /* cancelled before its prompt arrived */
    if (rc == KVR_OK && !gone)
        rc = check_req(d, &p);
    if (gone || rc != KVR_OK || find_seq(d, m->req_id)) {
        answer_absent(d, m->req_id, KVR_FINISH_ERROR, rc != KVR_OK ? rc : KVR_EINVAL);
        return;
    }
    struct dseq *s = new_seq(d, &p, d->prompt_buf, &rc);
    if (!s) {
        emit(d, m->req_id, -1, KVR_FINISH_ERROR, rc, 0);
        add_tomb(d, m->req_id, 0);
        return;
    }
    s->state = DS_WAIT_KV;
    /* Recompute rebuilds its window every step: it needs the tokens, not the blocks. */
    if (p.policy.policy != KVR_KV_RECOMPUTE && (rc = kvr_kv_seq_restore(s->kv, p.n_prompt)) != KVR_OK)
        finish_seq(d, s, KVR_FINISH_ERROR, rc);
}

static void on_prefill_req(struct dnode *d, const struct kvr_msg *m) {
    struct kvr_req_params p;
    int rc = kvr_msg_parse_req(m, &p, d->prompt_buf, d->c->seq_len, d->c->vocab_size);
    if (rc == KVR_OK)
        rc = check_req(d, &p);
    if (rc == KVR_OK && !d->p->colocated) {
        KVR_LOG_ERROR("req=%llu: a prompt sent to a decode node that does not prefill",
                      (unsigned long long)m->req_id);
        rc = KVR_ENOTSUP;
    }
    struct dseq *s = NULL;
    if (rc == KVR_OK && !find_seq(d, m->req_id) && !find_tomb(d, m->req_id))
        s = new_seq(d, &p, d->prompt_buf, &rc);
    if (!s) {
        answer_absent(d, m->req_id, KVR_FINISH_ERROR, rc != KVR_OK ? rc : KVR_EINVAL);
        return;
    }
    s->state = DS_PREFILL;
}

static void on_kv(struct dnode *d, const struct kvr_msg *m) {
    struct dseq *s = find_seq(d, m->req_id);
    if (!s || s->state != DS_WAIT_KV) {
        if (!find_tomb(d, m->req_id))
            KVR_LOG_WARN("req=%llu: KV block for no sequence waiting for one; dropped",
                         (unsigned long long)m->req_id);
        return;
    }
    struct kvr_wire_block b;
    int rc = kvr_wire_decode(d->codec, m->body, m->body_len, d->fingerprint, &b, d->kbuf, d->vbuf,
                             d->kv_cap_floats);
    if (rc == KVR_OK && (b.seq_id != s->id || b.layer_begin < 0 || b.n_layers < 1 ||
                         b.layer_begin + b.n_layers > d->c->n_layers ||
                         b.n_kv_heads * b.head_dim != d->c->kv_dim || b.token_begin < 0 ||
                         b.n_tokens < 1 || b.token_begin + b.n_tokens > s->p.n_prompt)) {
        KVR_LOG_ERROR("req=%llu KV block does not fit the sequence: seq %llu layers %d+%d tokens %d+%d "
                      "heads %d x %d", (unsigned long long)s->id, (unsigned long long)b.seq_id,
                      b.layer_begin, b.n_layers, b.token_begin, b.n_tokens, b.n_kv_heads, b.head_dim);
        rc = KVR_ESHAPE;
    }
    for (int l = 0; rc == KVR_OK && l < b.n_layers; l++) {
        size_t off = (size_t)l * (size_t)b.n_tokens * (size_t)d->c->kv_dim;
        rc = kvr_kv_seq_import(s->kv, b.layer_begin + l, b.token_begin, b.n_tokens, d->kbuf + off,
                               d->vbuf + off);
    }
    if (rc != KVR_OK) {
        KVR_LOG_ERROR("req=%llu bad KV block from rank %d: %s", (unsigned long long)s->id, m->src,
                      kvr_status_str(rc));
        finish_seq(d, s, KVR_FINISH_ERROR, rc);
        return;
    }
    s->n_kv_msgs++;
}

static void on_seq_ready(struct dnode *d, const struct kvr_msg *m) {
    struct dseq *s = find_seq(d, m->req_id);
    struct kvr_seq_ready r;
    int rc = kvr_msg_parse_seq_ready(m, &r);
    if (!s || s->state != DS_WAIT_KV)
        return;
    if (rc == KVR_OK && r.n_kv_msgs != s->n_kv_msgs) {
        KVR_LOG_ERROR("req=%llu got %d KV messages, the prefill node sent %d", (unsigned long long)s->id,
                      s->n_kv_msgs, r.n_kv_msgs);
        rc = KVR_ELENGTH;
    }
    if (rc == KVR_OK && (r.first_token < 0 || r.first_token >= d->c->vocab_size))
        rc = KVR_EFORMAT;
    if (rc != KVR_OK) {
        finish_seq(d, s, KVR_FINISH_ERROR, rc);
        return;
    }
    s->sampler.rng = r.rng;
    s->state = DS_RUNNING;
    take_token(d, s, r.first_token);
}

static void on_seq_abort(struct dnode *d, const struct kvr_msg *m) {
    int status = KVR_EINTERNAL;
    if (kvr_msg_parse_seq_abort(m, &status) != KVR_OK)
        status = KVR_EFORMAT; /* a malformed abort still ends the request, as an error */
    struct dseq *s = find_seq(d, m->req_id);
    struct tomb *t = find_tomb(d, m->req_id);
    int cancelled = status == KVR_ECANCELED || (t && t->reply);
    int finish = cancelled ? KVR_FINISH_CANCELLED : KVR_FINISH_ERROR;
    if (s)
        finish_seq(d, s, finish, cancelled ? KVR_OK : status);
    else
        answer_absent(d, m->req_id, finish, cancelled ? KVR_OK : status);
}

static void on_cancel(struct dnode *d, const struct kvr_msg *m) {
    struct dseq *s = find_seq(d, m->req_id);
    if (s)
        finish_seq(d, s, KVR_FINISH_CANCELLED, KVR_OK);
    else if (!find_tomb(d, m->req_id))
        add_tomb(d, m->req_id, 1); /* its SEQ_BEGIN (or SEQ_ABORT) is still on the way */
}

static int drain(struct dnode *d) {
    static const int tags[] = {KVR_TAG_CTRL, KVR_TAG_SEQ};
    int n = 0;
    struct kvr_msg m;
    while (n < MAX_MSGS_PER_LOOP) {
        int rc = kvr_xfer_poll(d->x, tags, 2, &m);
        if (rc == KVR_EAGAIN)
            break;
        n++;
        if (rc != KVR_OK)
            continue;
        if (m.src == d->coord)
            d->last_coord = kvr_clock_now();
        switch (m.kind) {
        case KVR_MSG_SEQ_BEGIN:
            on_seq_begin(d, &m);
            break;
        case KVR_MSG_KV:
            on_kv(d, &m);
            break;
        case KVR_MSG_SEQ_READY:
            on_seq_ready(d, &m);
            break;
        case KVR_MSG_SEQ_ABORT:
            on_seq_abort(d, &m);
            break;
        case KVR_MSG_PREFILL_REQ:
            on_prefill_req(d, &m);
            break;
        case KVR_MSG_CANCEL:
            on_cancel(d, &m);
            break;
        case KVR_MSG_SHUTDOWN:
            d->shutdown = 1;
            break;
        case KVR_MSG_PING:
            break;
        default:
            KVR_LOG_WARN("unexpected %s message from rank %d", kvr_msg_kind_name(m.kind), m.src);
        }
    }
    return n;
}

/* ---- the step ------------------------------------------------------------------- */

static int has_work(const struct dnode *d) {
    for (int i = 0; i < d->n_seqs; i++)
        if (d->seqs[i]->state != DS_WAIT_KV)
            return 1;
    return 0;
}

static void step(struct dnode *d) {
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
            *it = (struct kvr_forward_item){.seq = s->kv, .tokens = s->hist + s->n_hist - want,
                                            .n_tokens = want};
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
            *it = (struct kvr_forward_item){.seq = s->kv, .tokens = tok, .n_tokens = want};
        } else {
            continue;
        }
        int rc = kvr_kv_seq_reserve(s->kv, it->n_tokens);
        if (rc != KVR_OK) {
            /* Placement reserved room for this sequence; running out means the accounting
             * is off somewhere. Fail the one sequence, keep the node. */
            KVR_LOG_ERROR("req=%llu cannot extend its cache: %s", (unsigned long long)s->id, kvr_status_str(rc));
            finish_seq(d, s, KVR_FINISH_ERROR, rc);
            n = d->n_seqs;
            k = -1; /* the array changed: rescan (items taken so far stay valid) */
            n_items = 0;
            n_tok = 0;
            continue;
        }
        /* A prompt chunk that does not end the prompt samples nothing: no classifier. */
        int mid_prompt = s->state == DS_PREFILL && s->p.policy.policy != KVR_KV_RECOMPUTE &&
                         s->n_prefilled + it->n_tokens < s->p.n_prompt;
        it->logits = mid_prompt ? NULL : d->logits + (size_t)n_items * V;
        d->item_seq[n_items++] = s;
        n_tok += it->n_tokens;
    }
    d->rr++;
    if (n_items == 0)
        return;
    int rc = kvr_engine_forward(d->eng, d->items, n_items);
    d->steps++;
    if (rc != KVR_OK) {
        KVR_LOG_ERROR("forward of %d sequences failed: %s; failing them", n_items, kvr_status_str(rc));
        for (int i = 0; i < n_items; i++)
            finish_seq(d, d->item_seq[i], KVR_FINISH_ERROR, rc);
        return;
    }
    for (int i = 0; i < n_items; i++) {
        struct dseq *s = d->item_seq[i];
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
}

/* ---- reports and the loop -------------------------------------------------------- */

static void report(struct dnode *d) {
    struct kvr_node_report r = {.steps = d->steps, .tokens_out = d->tokens_out};
    kvr_role_report_pool(&r, d->pool);
    for (int i = 0; i < d->n_seqs; i++) {
        if (d->seqs[i]->state == DS_RUNNING) {
            r.running++;
        } else {
            r.queued++;
            r.queued_prompt_tokens += (uint64_t)(d->seqs[i]->p.n_prompt - d->seqs[i]->n_prefilled);
        }
    }
    kvr_xfer_send_status(d->x, d->coord, &r);
    d->last_report = kvr_clock_now();
    d->report_due = 0;
}

static int setup(struct dnode *d) {
    const struct decode_params *p = d->p;
    d->c = kvr_model_config(p->model);
    d->fingerprint = kvr_model_fingerprint(p->model);
    d->coord = kvr_xfer_coord_rank(d->x);
    int V = d->c->vocab_size;
    struct kvr_kv_pool_params pp = {.n_layers = d->c->n_layers, .kv_dim = d->c->kv_dim,
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
    if (!d->kbuf || !d->vbuf || !d->prompt_buf || !d->items || !d->item_seq || !d->logits ||
        !d->sample_scratch)
        return KVR_ENOMEM;
    return KVR_OK;
}

static void teardown(struct dnode *d) {
    for (int i = 0; i < d->n_seqs; i++)
        seq_free(d->seqs[i]);
    free(d->seqs);
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
}

int decode_run(const struct decode_params *p) {
    struct dnode d = {.p = p, .x = p->xfer};
    int rc = setup(&d);
    if (rc != KVR_OK)
        KVR_LOG_ERROR("decode node setup failed: %s", kvr_status_str(rc));
    struct kvr_hello h;
    kvr_role_hello(&h, KVR_ROLE_DECODE, p->colocated, p->model, rc == KVR_OK ? d.pool : NULL, p->n_threads);
    kvr_xfer_send_hello(d.x, d.coord, &h);
    KVR_LOG_INFO("decode node up: %d blocks of %d tokens, colocated=%d", h.n_blocks_total, p->block_tokens,
                 p->colocated);
    struct kvr_idle idle = {0};
    d.last_coord = kvr_clock_now();
    while (rc == KVR_OK && !d.shutdown && !*p->stop) {
        if (kvr_clock_now() - d.last_coord > p->coord_timeout_s) {
            KVR_LOG_ERROR("the coordinator has been silent for %.0f s: leaving", kvr_clock_now() - d.last_coord);
            break;
        }
        int busy = drain(&d) > 0;
        if (has_work(&d)) {
            step(&d);
            busy = 1;
            if (p->debug_step_delay_ms > 0)
                kvr_sleep_ms(p->debug_step_delay_ms);
        }
        flush_events(&d);
        /* Right after a finish too (it follows the TOKENS message on the same ordered
         * channel), so that ClusterStatus never shows a finished request's blocks. */
        if (d.report_due || (kvr_clock_now() - d.last_report) * 1000.0 >= p->report_ms)
            report(&d);
        kvr_xfer_progress(d.x);
        kvr_idle_turn(&idle, busy);
    }
    /* Anything still here when the cluster stops is answered, not dropped. */
    while (d.n_seqs > 0)
        finish_seq(&d, d.seqs[0], KVR_FINISH_ERROR, KVR_EUNAVAIL);
    flush_events(&d);
    teardown(&d);
    return rc;
}
