/* prefill.c - the prefill node's loop: queue prompts, run them in batches, ship KV
 * layer by layer from the engine's layer hook, hand each sequence to its decode node.
 * Owns a small pool for the prompts of the pass in flight. */
#include "prefill.h"

#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "role.h"
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
};

struct pnode {
    const struct prefill_params *p;
    struct kvr_xfer *x;
    const struct kvr_model_config *c;
    uint64_t fingerprint;
    int coord;
    struct kvr_kv_pool *pool;
    struct kvr_engine *eng;
    struct kvr_wire_codec *codec;
    unsigned char *wire_buf; /* one encoded message */
    size_t wire_cap;
    int *prompt_buf;         /* (seq_len) parse target */
    struct preq **queue;     /* FIFO of waiting prompts */
    int n_queue, cap_queue;
    struct pitem *batch;     /* (max_batch) */
    struct kvr_forward_item *items;
    int n_batch;
    float *logits;           /* (max_batch, vocab) */
    void *sample_scratch;
    int shutdown;
    uint64_t passes, tokens_done;
    double last_report;
    double last_coord;       /* last message from the coordinator */
};

static void preq_free(struct preq *r) {
    if (r) {
        free(r->prompt);
        free(r);
    }
}

static void report(struct pnode *n) {
    struct kvr_node_report r = {.running = n->n_batch, .queued = n->n_queue, .steps = n->passes,
                                .tokens_out = n->tokens_done};
    kvr_role_report_pool(&r, n->pool);
    for (int i = 0; i < n->n_queue; i++)
        r.queued_prompt_tokens += (uint64_t)n->queue[i]->p.n_prompt;
    kvr_xfer_send_status(n->x, n->coord, &r);
    n->last_report = kvr_clock_now();
}

/* A prompt that will not be prefilled: tell its decode node and the coordinator. */
static void reject(struct pnode *n, const struct kvr_req_params *p, int status) {
    kvr_xfer_send_seq_abort(n->x, p->decode_rank, p->req_id, status);
    struct kvr_prefill_done done = {.status = status, .n_prompt = p->n_prompt};
    kvr_xfer_send_prefill_done(n->x, n->coord, p->req_id, &done);
}

/* ---- messages ------------------------------------------------------------------- */

static void on_prefill_req(struct pnode *n, const struct kvr_msg *m) {
    struct kvr_req_params p;
    int rc = kvr_msg_parse_req(m, &p, n->prompt_buf, n->c->seq_len, n->c->vocab_size);
    if (rc != KVR_OK) {
        /* Unparseable: nothing to tell a decode node; the coordinator's deadline ends it. */
        struct kvr_prefill_done done = {.status = rc};
        kvr_xfer_send_prefill_done(n->x, n->coord, m->req_id, &done);
        return;
    }
    char err[160];
    if (kvr_kv_policy_check(&p.policy, n->c->seq_len, err, sizeof err) != KVR_OK ||
        (p.policy.policy == KVR_KV_RECOMPUTE && p.policy.window > n->p->max_batch_tokens) ||
        kvr_xfer_role_of(n->x, p.decode_rank) != KVR_ROLE_DECODE) {
        KVR_LOG_ERROR("req=%llu rejected: policy %s window %d decode rank %d", (unsigned long long)p.req_id,
                      kvr_kv_policy_name(p.policy.policy), p.policy.window, p.decode_rank);
        reject(n, &p, KVR_EINVAL);
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
        reject(n, &p, KVR_ENOMEM);
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
            reject(n, &r->p, KVR_ECANCELED);
            preq_free(r);
            return;
        }
    }
    /* Not queued: already shipped (the decode node handles the cancel) or unknown. */
}

static int drain(struct pnode *n) {
    static const int tags[] = {KVR_TAG_CTRL};
    int cnt = 0;
    struct kvr_msg m;
    while (cnt < 512) {
        int rc = kvr_xfer_poll(n->x, tags, 1, &m);
        if (rc == KVR_EAGAIN)
            break;
        cnt++;
        if (rc != KVR_OK)
            continue;
        n->last_coord = kvr_clock_now();
        switch (m.kind) {
        case KVR_MSG_PREFILL_REQ:
            on_prefill_req(n, &m);
            break;
        case KVR_MSG_CANCEL:
            on_cancel(n, m.req_id);
            break;
        case KVR_MSG_SHUTDOWN:
            n->shutdown = 1;
            break;
        case KVR_MSG_PING:
            break;
        default:
            KVR_LOG_WARN("unexpected %s message from rank %d", kvr_msg_kind_name(m.kind), m.src);
        }
    }
    return cnt;
}

/* ---- shipping KV from the layer hook ---------------------------------------------- */

static void ship_range(struct pnode *n, struct pitem *it, int layer, int t0, int t1) {
    const struct kvr_model_config *c = n->c;
    int bt = n->p->block_tokens;
    for (int b0 = t0; b0 < t1 && !it->failed;) {
        int b1 = (b0 / bt + 1) * bt;
        if (b1 > t1)
            b1 = t1;
        float *k, *v;
        int rc = kvr_kv_seq_slot(it->kv, layer, b0, &k, &v);
        struct kvr_wire_block blk = {.fingerprint = n->fingerprint, .seq_id = it->r->p.req_id,
                                     .layer_begin = layer, .n_layers = 1, .token_begin = b0,
                                     .n_tokens = b1 - b0, .n_kv_heads = c->n_kv_heads,
                                     .head_dim = c->head_dim};
        size_t len = 0;
        if (rc == KVR_OK)
            rc = kvr_wire_encode(n->codec, &n->p->wire, &blk, k, v, n->wire_buf, n->wire_cap, &len);
        if (rc == KVR_OK && n->p->fault_corrupt && it->r->p.seed == n->p->fault_corrupt_seed &&
            it->n_kv_msgs == 0 && len > KVR_WIRE_HEADER_NBYTES) {
            /* Flip bits in the middle of the payload (a test hook). */
            n->wire_buf[KVR_WIRE_HEADER_NBYTES + (len - KVR_WIRE_HEADER_NBYTES) / 2] ^= 0x5a;
            KVR_LOG_WARN("req=%llu fault injection: corrupted a KV message", (unsigned long long)it->r->p.req_id);
        }
        if (rc == KVR_OK)
            rc = kvr_xfer_send_kv(n->x, it->r->p.decode_rank, it->r->p.req_id, n->wire_buf, len);
        if (rc != KVR_OK) {
            KVR_LOG_ERROR("req=%llu cannot ship layer %d tokens %d-%d: %s", (unsigned long long)it->r->p.req_id,
                          layer, b0, b1, kvr_status_str(rc));
            it->failed = rc;
            return;
        }
        it->n_kv_msgs++;
        b0 = b1;
    }
}

static void on_layer(void *ud, const struct kvr_forward_item *items, int n_items, int layer) {
    struct pnode *n = ud;
    (void)items;
    for (int i = 0; i < n_items; i++) {
        struct pitem *it = &n->batch[i];
        if (it->r->p.policy.policy == KVR_KV_RECOMPUTE)
            continue; /* the decode node recomputes its window from the tokens */
        if (it->n_sinks > 0)
            ship_range(n, it, layer, 0, it->n_sinks);
        ship_range(n, it, layer, it->first_held, it->r->p.n_prompt);
    }
    kvr_xfer_progress(n->x);
    /* A long pass must not look like a dead node. */
    if ((kvr_clock_now() - n->last_report) * 1000.0 >= n->p->report_ms)
        report(n);
}

/* ---- one pass ------------------------------------------------------------------- */

/* Drops the head of the prompt queue (the caller has taken it). */
static void queue_pop_front(struct pnode *n) {
    memmove(n->queue, n->queue + 1, (size_t)(n->n_queue - 1) * sizeof *n->queue);
    n->n_queue--;
}

static void run_pass(struct pnode *n) {
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
            KVR_LOG_ERROR("req=%llu prompt of %d tokens can never fit this node (%d tokens, %d blocks per pass)",
                          (unsigned long long)r->p.req_id, r->p.n_prompt, n->p->max_batch_tokens, st.n_blocks);
            queue_pop_front(n);
            reject(n, &r->p, KVR_ENOSPC);
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
            reject(n, &r->p, rc);
            preq_free(r);
            continue;
        }
        it->first_held = kvr_kv_policy_first_held(&r->p.policy, r->p.n_prompt, &it->n_sinks);
        n->items[n->n_batch] = (struct kvr_forward_item){
            .seq = it->kv, .tokens = r->prompt + (r->p.n_prompt - len), .n_tokens = len,
            .logits = n->logits + (size_t)n->n_batch * (size_t)c->vocab_size};
        n->n_batch++;
        tokens += len;
        blocks_left -= need;
    }
    if (n->n_batch == 0)
        return;
    /* Tell every decode node what is coming before the first block. */
    for (int i = 0; i < n->n_batch; i++) {
        struct pitem *it = &n->batch[i];
        int rc = kvr_xfer_send_seq_begin(n->x, it->r->p.decode_rank, &it->r->p, it->r->prompt);
        if (rc != KVR_OK)
            it->failed = rc;
    }
    double t0 = kvr_clock_now();
    int rc = kvr_engine_forward(n->eng, n->items, n->n_batch);
    double t1 = kvr_clock_now();
    n->passes++;
    for (int i = 0; i < n->n_batch; i++) {
        struct pitem *it = &n->batch[i];
        struct kvr_req_params *p = &it->r->p;
        int status = rc != KVR_OK ? rc : it->failed;
        struct kvr_prefill_done done = {.status = status, .n_prompt = p->n_prompt,
                                        .queue_ms = (t0 - it->r->t_arrival) * 1000.0,
                                        .prefill_ms = (t1 - t0) * 1000.0};
        if (status == KVR_OK) {
            struct kvr_sampler smp;
            kvr_sampler_init(&smp, p->temperature, p->top_p, p->seed);
            int first = kvr_sampler_sample(&smp, n->items[i].logits, c->vocab_size, n->sample_scratch);
            struct kvr_seq_ready ready = {.first_token = first, .rng = smp.rng,
                                          .n_kv_msgs = it->n_kv_msgs, .prefill_ms = done.prefill_ms};
            kvr_xfer_send_seq_ready(n->x, p->decode_rank, p->req_id, &ready);
            n->tokens_done += (uint64_t)p->n_prompt;
        } else {
            KVR_LOG_ERROR("req=%llu prefill failed: %s", (unsigned long long)p->req_id, kvr_status_str(status));
            kvr_xfer_send_seq_abort(n->x, p->decode_rank, p->req_id, status);
        }
        kvr_xfer_send_prefill_done(n->x, n->coord, p->req_id, &done);
        kvr_kv_seq_free(it->kv);
        preq_free(it->r);
    }
    n->n_batch = 0;
}

/* ---- setup and loop --------------------------------------------------------------- */

static int setup(struct pnode *n) {
    const struct prefill_params *p = n->p;
    n->c = kvr_model_config(p->model);
    n->fingerprint = kvr_model_fingerprint(p->model);
    n->coord = kvr_xfer_coord_rank(n->x);
    const struct kvr_model_config *c = n->c;
    if (p->max_batch_tokens < c->seq_len) {
        KVR_LOG_ERROR("--max-batch-tokens %d is below the model context %d: long prompts could never run",
                      p->max_batch_tokens, c->seq_len);
        return KVR_EINVAL;
    }
    uint64_t budget = p->kv_memory_nbytes;
    if (!budget) /* room for a full pass, each prompt rounded up to whole blocks */
        budget = (uint64_t)(p->max_batch_tokens + p->max_batch * p->block_tokens) *
                 kvr_kv_token_nbytes(c->n_layers, c->kv_dim);
    struct kvr_kv_pool_params pp = {.n_layers = c->n_layers, .kv_dim = c->kv_dim,
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
    n->prompt_buf = malloc((size_t)c->seq_len * sizeof(int));
    n->batch = calloc((size_t)p->max_batch, sizeof *n->batch);
    n->items = calloc((size_t)p->max_batch, sizeof *n->items);
    n->logits = malloc((size_t)p->max_batch * (size_t)c->vocab_size * sizeof(float));
    n->sample_scratch = malloc((size_t)c->vocab_size * 2 * sizeof(int));
    if (!n->wire_buf || !n->prompt_buf || !n->batch || !n->items || !n->logits || !n->sample_scratch)
        return KVR_ENOMEM;
    return KVR_OK;
}

static void teardown(struct pnode *n) {
    for (int i = 0; i < n->n_queue; i++)
        preq_free(n->queue[i]);
    free(n->queue);
    kvr_engine_free(n->eng);
    kvr_kv_pool_free(n->pool);
    kvr_wire_codec_free(n->codec);
    free(n->wire_buf);
    free(n->prompt_buf);
    free(n->batch);
    free(n->items);
    free(n->logits);
    free(n->sample_scratch);
}

int prefill_run(const struct prefill_params *p) {
    struct pnode n = {.p = p, .x = p->xfer};
    int rc = setup(&n);
    if (rc != KVR_OK)
        KVR_LOG_ERROR("prefill node setup failed: %s", kvr_status_str(rc));
    struct kvr_hello h;
    kvr_role_hello(&h, KVR_ROLE_PREFILL, 0, p->model, rc == KVR_OK ? n.pool : NULL, p->n_threads);
    kvr_xfer_send_hello(n.x, n.coord, &h);
    struct kvr_idle idle = {0};
    n.last_coord = kvr_clock_now();
    while (rc == KVR_OK && !n.shutdown && !*p->stop) {
        if (kvr_clock_now() - n.last_coord > p->coord_timeout_s) {
            KVR_LOG_ERROR("the coordinator has been silent for %.0f s: leaving", kvr_clock_now() - n.last_coord);
            break;
        }
        int busy = drain(&n) > 0;
        if (n.n_queue > 0) {
            run_pass(&n);
            busy = 1;
        }
        if ((kvr_clock_now() - n.last_report) * 1000.0 >= p->report_ms)
            report(&n);
        kvr_xfer_progress(n.x);
        kvr_idle_turn(&idle, busy);
    }
    while (n.n_queue > 0) {
        struct preq *r = n.queue[--n.n_queue];
        reject(&n, &r->p, KVR_EUNAVAIL);
        preq_free(r);
    }
    teardown(&n);
    return rc;
}
