/* prefill.c - the prefill node's role in the node lifecycle (common/node.c): queue
 * prompts, run them in batches, ship KV layer by layer from the engine's layer hook, hand
 * each sequence to its decode node (SEQ_READY, or SEQ_ABORT with a reason) and tell the
 * coordinator (PREFILL_DONE). Every send's outcome is handled: what cannot go at once is
 * queued by node.c, and a request whose hand-over failed is reported failed. Owns a small
 * pool for the prompts of the pass in flight. */
#include "prefill.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "node.h"
#include "sampler.h"
#include "status.h"
#include "transformer.h"
#include "xfer.h"

struct preq {
    struct kvr_req_params p;
    int *prompt;          /* (p.n_prompt) */
    double t_arrival;
};

struct pitem {
    struct preq *r;
    struct kvr_kv_seq *kv;
    int n_kv_msgs;
    int first_held, n_sinks; /* positions still held after the prompt (policy) */
    int failed;              /* a send failed: abort instead of READY */
    int dst_rank;            /* for the reason line */
};

struct pnode {
    const struct prefill_params *p;
    struct kvr_xfer *x;
    struct kvr_node node;
    const struct kvr_model_config *c;
    uint64_t fingerprint;
    int rank, coord;
    struct kvr_kv_pool *pool;
    struct kvr_engine *eng;
    struct kvr_wire_codec *codec;
    unsigned char *wire_buf; /* one encoded message */
    size_t wire_cap;
    float *kbuf, *vbuf; /* one block of one layer, K and V as f32 (ship_range) */
    int *prompt_buf;         /* (seq_len) parse target */
    struct preq **queue;     /* FIFO of waiting prompts */
    int n_queue, cap_queue;
    struct pitem *batch;     /* (max_batch) */
    struct kvr_forward_item *items;
    int n_batch;
    float *logits;           /* (max_batch, vocab) */
    void *sample_scratch;
    uint64_t passes, tokens_done;
    size_t pass_bytes;       /* KV bytes handed to MPI in this pass (the debug trace) */
};

static void preq_free(struct preq *r) {
    if (r) {
        free(r->prompt);
        free(r);
    }
}

/* ---- telling the decode node and the coordinator ------------------------------------ */

static void w_abort(struct kvr_wbuf *w, const void *a) {
    const struct kvr_req_params *p = ((const void *const *)a)[0];
    kvr_msg_write_seq_abort(w, p->req_id, ((const void *const *)a)[1]);
}
static void w_ready(struct kvr_wbuf *w, const void *a) {
    const struct kvr_req_params *p = ((const void *const *)a)[0];
    kvr_msg_write_seq_ready(w, p->req_id, ((const void *const *)a)[1]);
}
static void w_done(struct kvr_wbuf *w, const void *a) {
    kvr_msg_write_prefill_done(w, *(const uint64_t *)((const void *const *)a)[0], ((const void *const *)a)[1]);
}

static void send_done(struct pnode *n, uint64_t req_id, struct kvr_prefill_done *d) {
    const void *args[2] = {&req_id, d};
    int rc = kvr_node_send(&n->node, n->coord, KVR_TAG_REPORT, w_done, args);
    if (rc != KVR_OK) /* the coordinator's reaper ends the request within its deadline */
        KVR_LOG_ERROR("req=%llu cannot report to the coordinator: %s", (unsigned long long)req_id,
                      kvr_status_str(rc));
}

/* A prompt that will not be prefilled (or whose KV did not all go): tell its decode node
 * (which frees its blocks) and the coordinator (which answers the client), with why. */
static void reject(struct pnode *n, const struct kvr_req_params *p, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void reject(struct pnode *n, const struct kvr_req_params *p, int status, const char *fmt, ...) {
    char reason[KVR_REASON_MAX + 1];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    if (status != KVR_ECANCELED)
        KVR_LOG_WARN("req=%llu not prefilled: %s", (unsigned long long)p->req_id, reason);
    struct kvr_seq_abort a = {.begin_no = p->begin_no, .status = status, .reason = reason,
                              .reason_len = (int)strlen(reason)};
    const void *args[2] = {p, &a};
    if (kvr_xfer_role_of(n->x, p->decode_rank) == KVR_ROLE_DECODE)
        kvr_node_send(&n->node, p->decode_rank, KVR_TAG_SEQ, w_abort, args);
    struct kvr_prefill_done done = {.status = status, .n_prompt = p->n_prompt, .reason = reason,
                                    .reason_len = (int)strlen(reason)};
    send_done(n, p->req_id, &done);
}

/* ---- messages ------------------------------------------------------------------- */

static void on_prefill_req(struct pnode *n, const struct kvr_msg *m) {
    struct kvr_req_params p;
    int rc = kvr_msg_parse_req(m, &p, n->prompt_buf, n->c->seq_len, n->c->vocab_size);
    if (rc != KVR_OK) {
        /* Unparseable: no decode node to tell; the coordinator ends it. */
        static const char why[] = "the prefill node could not parse the request";
        struct kvr_prefill_done done = {.status = rc, .reason = why, .reason_len = (int)sizeof why - 1};
        send_done(n, m->req_id, &done);
        return;
    }
    char err[160];
    if (kvr_xfer_role_of(n->x, p.decode_rank) != KVR_ROLE_DECODE) {
        reject(n, &p, KVR_EINVAL, "rank %d is not a decode node", p.decode_rank);
        return;
    }
    if (kvr_kv_policy_check(&p.policy, n->c->seq_len, err, sizeof err) != KVR_OK) {
        reject(n, &p, KVR_EINVAL, "prefill node refused the policy: %s", err);
        return;
    }
    struct preq *r = calloc(1, sizeof *r);
    if (r)
        r->prompt = malloc((size_t)p.n_prompt * sizeof *r->prompt);
    if (n->n_queue == n->cap_queue && r) {
        int cap = n->cap_queue ? 2 * n->cap_queue : 64;
        struct preq **q = realloc(n->queue, (size_t)cap * sizeof *q);
        if (q) {
            n->queue = q;
            n->cap_queue = cap;
        }
    }
    if (!r || !r->prompt || n->n_queue == n->cap_queue) {
        preq_free(r);
        reject(n, &p, KVR_ENOMEM, "prefill node rank %d out of memory queueing the prompt", n->rank);
        return;
    }
    r->p = p;
    memcpy(r->prompt, n->prompt_buf, (size_t)p.n_prompt * sizeof *r->prompt);
    r->t_arrival = kvr_clock_now();
    n->queue[n->n_queue++] = r;
}

static void on_cancel(struct pnode *n, uint64_t id) {
    for (int i = 0; i < n->n_queue; i++) {
        if (n->queue[i]->p.req_id == id) {
            struct preq *r = n->queue[i];
            memmove(n->queue + i, n->queue + i + 1, (size_t)(n->n_queue - i - 1) * sizeof *n->queue);
            n->n_queue--;
            /* The coordinator cancelled it at its decode node too (same ordered channel as
             * its SEQ_BEGIN there), so only the prompt's place here goes. */
            preq_free(r);
            return;
        }
    }
    /* Not queued: already shipped (its decode node drops it) or unknown. */
}

static void on_msg(void *ud, const struct kvr_msg *m) {
    struct pnode *n = ud;
    if (m->src != n->coord) {
        KVR_LOG_WARN("%s from rank %d, which is not the coordinator: ignored", kvr_msg_kind_name(m->kind), m->src);
        return;
    }
    switch (m->kind) {
    case KVR_MSG_PREFILL_REQ:
        on_prefill_req(n, m);
        break;
    case KVR_MSG_CANCEL:
        if (kvr_msg_parse_empty(m) == KVR_OK)
            on_cancel(n, m->req_id);
        break;
    default:
        KVR_LOG_WARN("unexpected %s message from rank %d", kvr_msg_kind_name(m->kind), m->src);
    }
}

/* ---- shipping KV from the layer hook ---------------------------------------------- */

static void ship_range(struct pnode *n, struct pitem *it, int layer, int t0, int t1) {
    const struct kvr_model_config *c = n->c;
    int bt = n->p->block_tokens;
    for (int b0 = t0; b0 < t1 && !it->failed;) {
        int b1 = (b0 / bt + 1) * bt;
        if (b1 > t1)
            b1 = t1;
        /* The block as f32 (widened exactly from a half cache; the encoder rounds it back
         * to the same bits when wire.dtype is the cache's type). */
        float *k = n->kbuf, *v = n->vbuf;
        int rc = kvr_kv_seq_export(it->kv, layer, b0, b1 - b0, k, v);
        struct kvr_wire_block blk = {.fingerprint = n->fingerprint, .seq_id = it->r->p.req_id,
                                     .layer_begin = layer, .n_layers = 1, .token_begin = b0,
                                     .n_tokens = b1 - b0, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim};
        size_t len = 0;
        if (rc == KVR_OK)
            rc = kvr_wire_encode(n->codec, &n->p->wire, &blk, k, v, n->wire_buf, n->wire_cap, &len);
#ifdef KVR_FAULTS
        if (rc == KVR_OK && n->p->faults.corrupt_seed && it->r->p.seed == n->p->faults.corrupt_seed &&
            it->n_kv_msgs == 0 && len > KVR_WIRE_HEADER_NBYTES) {
            /* Flip bits in the middle of the payload (checks the decode side's verification). */
            n->wire_buf[KVR_WIRE_HEADER_NBYTES + (len - KVR_WIRE_HEADER_NBYTES) / 2] ^= 0x5a;
            KVR_LOG_WARN("req=%llu fault injection: corrupted a KV message", (unsigned long long)it->r->p.req_id);
        }
#endif
        if (rc == KVR_OK)
            rc = kvr_xfer_send_kv(n->x, it->r->p.decode_rank, it->r->p.req_id, it->r->p.begin_no, n->wire_buf, len);
        if (rc != KVR_OK) {
            KVR_LOG_ERROR("req=%llu cannot ship layer %d tokens %d-%d: %s", (unsigned long long)it->r->p.req_id,
                          layer, b0, b1, kvr_status_str(rc));
            it->failed = rc;
            return;
        }
        it->n_kv_msgs++;
        n->pass_bytes += len;
        b0 = b1;
    }
}

static void on_layer(void *ud, const struct kvr_forward_item *items, int n_items, int layer) {
    struct pnode *n = ud;
    (void)items;
    double t_done = kvr_clock_now();
    for (int i = 0; i < n_items; i++) {
        struct pitem *it = &n->batch[i];
        if (it->r->p.policy.policy == KVR_KV_RECOMPUTE)
            continue; /* the decode node recomputes its window from the tokens */
        if (it->n_sinks > 0)
            ship_range(n, it, layer, 0, it->n_sinks);
        ship_range(n, it, layer, it->first_held, it->r->p.n_prompt);
    }
#ifdef KVR_FAULTS
    if (n->p->faults.pass_delay_ms > 0)
        kvr_sleep_ms(n->p->faults.pass_delay_ms);
#endif
    kvr_xfer_progress(n->x);
    /* The overlap trace (bench/run_hosts_kv.sh): when the layer's compute ended, when its
     * KV was encoded and handed to MPI, on CLOCK_MONOTONIC. */
    KVR_LOG_DEBUG("kvtrace layer=%d computed=%.6f shipped=%.6f bytes=%zu", layer, t_done, kvr_clock_now(),
                  n->pass_bytes);
    /* A long pass must not look like a dead node. */
    kvr_node_tick(&n->node);
}

/* ---- one pass ------------------------------------------------------------------- */

/* Drops the head of the prompt queue (the caller has taken it). */
static void queue_pop_front(struct pnode *n) {
    memmove(n->queue, n->queue + 1, (size_t)(n->n_queue - 1) * sizeof *n->queue);
    n->n_queue--;
}

/* Hands one prefilled prompt over: SEQ_READY to its decode node (or SEQ_ABORT), then
 * PREFILL_DONE to the coordinator. */
static void hand_over(struct pnode *n, struct pitem *it, int rc, double t0, double t1, int i) {
    const struct kvr_model_config *c = n->c;
    struct kvr_req_params *p = &it->r->p;
    if (rc != KVR_OK) {
        reject(n, p, rc, "prefill pass on rank %d failed: %s", n->rank, kvr_status_str(rc));
        return;
    }
    if (it->failed) {
        reject(n, p, KVR_EUNAVAIL, "prefill rank %d could not send the KV blocks to decode rank %d: %s", n->rank,
               p->decode_rank, kvr_status_str(it->failed));
        return;
    }
    struct kvr_sampler smp;
    kvr_sampler_init(&smp, p->temperature, p->top_p, p->seed);
    int first = kvr_sampler_sample(&smp, n->items[i].logits, c->vocab_size, n->sample_scratch);
    struct kvr_seq_ready ready = {.begin_no = p->begin_no, .first_token = first, .rng = smp.rng,
                                  .n_kv_msgs = it->n_kv_msgs, .prefill_ms = (t1 - t0) * 1000.0};
    const void *args[2] = {p, &ready};
    int drop = 0;
#ifdef KVR_FAULTS
    drop = n->p->faults.drop_ready_seed && p->seed == n->p->faults.drop_ready_seed;
    if (drop)
        KVR_LOG_WARN("req=%llu fault injection: SEQ_READY dropped", (unsigned long long)p->req_id);
#endif
    int src = drop ? KVR_OK : kvr_node_send(&n->node, p->decode_rank, KVR_TAG_SEQ, w_ready, args);
    if (src != KVR_OK) {
        reject(n, p, KVR_EUNAVAIL, "prefill rank %d could not hand the sequence to decode rank %d: %s", n->rank,
               p->decode_rank, kvr_status_str(src));
        return;
    }
    n->tokens_done += (uint64_t)p->n_prompt;
    struct kvr_prefill_done done = {.status = KVR_OK, .n_prompt = p->n_prompt,
                                    .queue_ms = (t0 - it->r->t_arrival) * 1000.0,
                                    .prefill_ms = (t1 - t0) * 1000.0};
    send_done(n, p->req_id, &done);
}

static int run_pass(void *ud) {
    struct pnode *n = ud;
    if (n->n_queue == 0)
        return 0;
    const struct kvr_model_config *c = n->c;
    int bt = n->p->block_tokens;
    struct kvr_kv_pool_stats st;
    kvr_kv_pool_stats(n->pool, &st);
    int blocks_left = st.n_blocks_free, tokens = 0;
    n->n_batch = 0;
    /* FIFO: take prompts from the front while they fit the pass and the pool. */
    while (n->n_queue > 0 && n->n_batch < n->p->max_batch) {
        struct preq *r = n->queue[0];
        int recompute = r->p.policy.policy == KVR_KV_RECOMPUTE;
        int len = recompute && r->p.n_prompt > r->p.policy.window ? r->p.policy.window : r->p.n_prompt;
        int need = kvr_kv_blocks_needed(&r->p.policy, bt, r->p.n_prompt, len);
        if (n->n_batch > 0 && (tokens + len > n->p->max_batch_tokens || need > blocks_left))
            break;
        if (len > n->p->max_batch_tokens || need > st.n_blocks) {
            queue_pop_front(n);
            reject(n, &r->p, KVR_ENOSPC, "prompt of %d tokens can never fit prefill rank %d (%d tokens, %d blocks "
                   "per pass)", r->p.n_prompt, n->rank, n->p->max_batch_tokens, st.n_blocks);
            preq_free(r);
            continue;
        }
        struct pitem *it = &n->batch[n->n_batch];
        memset(it, 0, sizeof *it);
        it->r = r;
        struct kvr_kv_seq_params sp = {.policy = r->p.policy, .n_tokens_max = c->seq_len};
        int rc = kvr_kv_seq_create(n->pool, &sp, &it->kv);
        queue_pop_front(n);
        if (rc != KVR_OK) {
            reject(n, &r->p, rc, "prefill rank %d cannot create the sequence: %s", n->rank, kvr_status_str(rc));
            preq_free(r);
            continue;
        }
        it->first_held = kvr_kv_policy_first_held(&r->p.policy, r->p.n_prompt, &it->n_sinks);
        n->items[n->n_batch] = (struct kvr_forward_item){
            .seq = it->kv, .tokens = r->prompt + (r->p.n_prompt - len), .n_tokens = len,
            .logits = n->logits + (size_t)n->n_batch * (size_t)c->vocab_size, .prompt = 1};
        n->n_batch++;
        tokens += len;
        blocks_left -= need;
    }
    if (n->n_batch == 0)
        return 1;
    n->pass_bytes = 0;
    double t0 = kvr_clock_now();
    int rc = kvr_engine_forward(n->eng, n->items, n->n_batch);
    double t1 = kvr_clock_now();
    KVR_LOG_DEBUG("kvtrace pass start=%.6f end=%.6f prompts=%d tokens=%d bytes=%zu", t0, t1, n->n_batch, tokens,
                  n->pass_bytes);
    n->passes++;
    for (int i = 0; i < n->n_batch; i++) {
        struct pitem *it = &n->batch[i];
        hand_over(n, it, rc, t0, t1, i);
        kvr_kv_seq_free(it->kv);
        preq_free(it->r);
    }
    n->n_batch = 0;
    return 1;
}

/* ---- lifecycle callbacks ---------------------------------------------------------- */

static void queues(void *ud, struct kvr_node_report *r) {
    struct pnode *n = ud;
    r->running = n->n_batch;
    r->queued = n->n_queue;
    r->steps = n->passes;
    r->tokens_out = n->tokens_done;
    for (int i = 0; i < n->n_queue; i++)
        r->queued_prompt_tokens += (uint64_t)n->queue[i]->p.n_prompt;
}

static void reset(void *ud) {
    struct pnode *n = ud;
    while (n->n_queue > 0)
        preq_free(n->queue[--n->n_queue]);
}

static int setup(struct pnode *n) {
    const struct prefill_params *p = n->p;
    n->c = kvr_model_config(p->model);
    n->fingerprint = kvr_model_fingerprint(p->model);
    n->coord = kvr_xfer_coord_rank(n->x);
    n->rank = kvr_xfer_rank(n->x);
    const struct kvr_model_config *c = n->c;
    if (p->max_batch_tokens < c->seq_len) {
        KVR_LOG_ERROR("--max-batch-tokens %d is below the model context %d: long prompts could never run",
                      p->max_batch_tokens, c->seq_len);
        return KVR_EINVAL;
    }
    uint64_t budget = p->kv_memory_nbytes;
    if (!budget) /* room for a full pass, each prompt rounded up to whole blocks */
        budget = (uint64_t)(p->max_batch_tokens + p->max_batch * p->block_tokens) *
                 kvr_kv_token_nbytes_type(p->kv_type, c->n_layers, c->kv_dim);
    struct kvr_kv_pool_params pp = {.type = p->kv_type, .n_layers = c->n_layers, .kv_dim = c->kv_dim,
                                    .block_tokens = p->block_tokens, .budget_nbytes = budget};
    int rc = kvr_kv_pool_create(&pp, &n->pool);
    if (rc != KVR_OK)
        return rc;
    struct kvr_engine_params ep = {.model = p->model, .n_threads = p->n_threads,
                                   .n_batch_tokens_max = p->max_batch_tokens, .n_items_max = p->max_batch,
                                   .n_ctx_max = c->seq_len + p->max_batch_tokens};
    if ((rc = kvr_engine_create(&ep, &n->eng)) != KVR_OK)
        return rc;
    kvr_engine_set_layer_hook(n->eng, on_layer, n);
    size_t max_floats = (size_t)p->block_tokens * (size_t)c->kv_dim;
    if ((rc = kvr_wire_codec_create(max_floats, &n->codec)) != KVR_OK)
        return rc;
    struct kvr_wire_block b = {.n_layers = 1, .n_tokens = p->block_tokens, .n_kv_heads = c->n_kv_heads,
                               .head_dim = c->head_dim};
    n->wire_cap = kvr_wire_max_nbytes(&b);
    n->wire_buf = malloc(n->wire_cap);
    n->kbuf = malloc(max_floats * sizeof(float));
    n->vbuf = malloc(max_floats * sizeof(float));
    n->prompt_buf = malloc((size_t)c->seq_len * sizeof(int));
    n->batch = calloc((size_t)p->max_batch, sizeof *n->batch);
    n->items = calloc((size_t)p->max_batch, sizeof *n->items);
    n->logits = malloc((size_t)p->max_batch * (size_t)c->vocab_size * sizeof(float));
    n->sample_scratch = malloc((size_t)c->vocab_size * 2 * sizeof(int));
    if (!n->wire_buf || !n->kbuf || !n->vbuf || !n->prompt_buf || !n->batch || !n->items || !n->logits || !n->sample_scratch)
        return KVR_ENOMEM;
    return KVR_OK;
}

static void teardown(struct pnode *n) {
    reset(n);
    free(n->queue);
    kvr_engine_free(n->eng);
    kvr_kv_pool_free(n->pool);
    kvr_wire_codec_free(n->codec);
    free(n->wire_buf);
    free(n->kbuf);
    free(n->vbuf);
    free(n->prompt_buf);
    free(n->batch);
    free(n->items);
    free(n->logits);
    free(n->sample_scratch);
}

static const struct kvr_node_ops prefill_ops = {
    .on_msg = on_msg, .work = run_pass, .flush = NULL, .queues = queues, .reset = reset};

int prefill_run(const struct prefill_params *p) {
    static const int tags[] = {KVR_TAG_CTRL};
    struct pnode n = {.p = p, .x = p->xfer};
    int rc = setup(&n);
    if (rc != KVR_OK)
        KVR_LOG_ERROR("prefill node setup failed: %s", kvr_status_str(rc));
    struct kvr_node_params np = {.xfer = p->xfer, .tags = tags, .n_tags = 1, .report_ms = p->report_ms,
                                 .coord_timeout_s = p->coord_timeout_s, .stop = p->stop,
                                 .pool = rc == KVR_OK ? n.pool : NULL, .ops = &prefill_ops, .ud = &n};
    kvr_node_hello_init(&np.hello, KVR_ROLE_PREFILL, p->model, np.pool, rc);
    np.hello.n_threads = p->n_threads;
    np.hello.max_batch = p->max_batch;
    np.hello.max_batch_tokens = p->max_batch_tokens;
    np.hello.n_ctx_max = n.c ? n.c->seq_len + p->max_batch_tokens : 0;
    kvr_node_init(&n.node, &np);
    if (rc != KVR_OK) {
        kvr_xfer_send_hello(n.x, n.node.coord, &np.hello); /* "cannot serve" */
        kvr_node_deinit(&n.node, 0);
        teardown(&n);
        return rc;
    }
    rc = kvr_node_run(&n.node);
    if (rc == KVR_OK) {
        while (n.n_queue > 0) {
            struct preq *r = n.queue[--n.n_queue];
            reject(&n, &r->p, KVR_EUNAVAIL, "prefill node rank %d is stopping", n.rank);
            preq_free(r);
        }
    }
    kvr_node_deinit(&n.node, rc == KVR_OK ? 1.0 : 0);
    teardown(&n);
    return rc;
}
