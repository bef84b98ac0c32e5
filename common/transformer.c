/* transformer.c - the Llama forward pass (RMSNorm, RoPE, GQA attention, SwiGLU) as
 * llama2.c defines it, over many sequences at once and through the paged KV cache.
 * Called by the CLI (generate, ppl), the prefill node and the decode node; owns its
 * activation buffers, borrows the model and the sequences' caches. */
#include "transformer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "kv_cache_impl.h"
#include "log.h"
#include "matmul.h"
#include "status.h"
#include "threadpool.h"

#define QTILE 64        /* query rows per attention task in the GEMM path */
#define LOGIT_ROWS 32   /* classifier rows per GEMM */
#define ROWS_PER_TASK 8 /* rows per task for the row-wise elementwise ops */

struct kvr_engine {
    struct kvr_engine_params p;
    const struct kvr_model_config *c;
    const struct kvr_model_weights *w;
    struct kvr_threadpool *tp;
    int n_threads;

    /* Activations, n_batch_tokens_max rows each, row-major. */
    float *x;      /* (T, dim) residual stream */
    float *xb;     /* (T, dim) normalized input of a sublayer */
    float *xb2;    /* (T, dim) attention output */
    float *q;      /* (T, dim) */
    float *k;      /* (T, kv_dim) */
    float *v;      /* (T, kv_dim) */
    float *hb;     /* (T, hidden) */
    float *hb2;    /* (T, hidden) */
    float *logit_rows; /* (LOGIT_ROWS, vocab) */
    float *kc, *vc;    /* (n_ctx_max, kv_dim) keys/values gathered for GEMM attention */
    float *scores;     /* (n_threads, score_stride) attention weights */
    size_t score_stride;
    float *krot;       /* (n_threads, head_dim) a key rotated on the fly (sink policy) */

    /* RoPE: (n_rope, head_dim/2, {cos, sin}) for positions below n_rope; rows for
     * positions beyond it are computed per call into rope_rows (T, head_dim/2, 2). */
    float *rope_tab;
    int n_rope;
    float *rope_rows;

    /* Per-call bookkeeping, T rows. */
    int *row_item;        /* item index of each row */
    int *row_pos;         /* text position of each row */
    const float **row_rope; /* RoPE row for the query (and key) of each row */
    int *unit_row;        /* rows whose attention runs on the per-query path */
    int *logit_row;       /* rows that need logits */
    float **logit_dst;    /* where each such row's logits go */

    void (*layer_hook)(void *ud, const struct kvr_forward_item *items, int n_items, int layer);
    void *layer_hook_ud;

    /* Current forward call, read by the parallel tasks. */
    struct kvr_forward_item *items;
    int n_items;
    int n_rows;
    int layer;
    int n_units;
    int gemm_item, gemm_r0, gemm_n, gemm_kb, gemm_nq_tiles;
};

/* ---- helpers ------------------------------------------------------------------ */

static void rmsnorm(float *o, const float *x, const float *weight, int size) {
    float ss = 0.0f;
    for (int j = 0; j < size; j++)
        ss += x[j] * x[j];
    ss /= (float)size;
    ss += 1e-5f;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < size; j++)
        o[j] = weight[j] * (ss * x[j]);
}

/* Rotates the pairs of vec (n floats, whole heads of head_dim) by one RoPE row. */
static void rope_rotate(float *vec, int n, int head_dim, const float *rope) {
    for (int i = 0; i < n; i += 2) {
        const float *cs = rope + (i % head_dim);
        float fcr = cs[0], fci = cs[1];
        float v0 = vec[i], v1 = vec[i + 1];
        vec[i] = v0 * fcr - v1 * fci;
        vec[i + 1] = v0 * fci + v1 * fcr;
    }
}

/* One RoPE row (head_dim/2 pairs of cos, sin) exactly as llama2.c computes it. */
static void rope_fill(float *row, int pos, int head_dim) {
    for (int i = 0; i < head_dim; i += 2) {
        float freq = 1.0f / powf(10000.0f, (float)i / (float)head_dim);
        float val = (float)pos * freq;
        row[i] = cosf(val);
        row[i + 1] = sinf(val);
    }
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max)
            max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] /= sum;
}

static const float *rope_at(const struct kvr_engine *e, int pos) {
    return e->rope_tab + (size_t)pos * (size_t)e->c->head_dim;
}

/* ---- lifetime ----------------------------------------------------------------- */

int kvr_engine_create(const struct kvr_engine_params *p, struct kvr_engine **out) {
    *out = NULL;
    if (!p->model || p->n_batch_tokens_max < 1 || p->n_items_max < 1 || p->n_ctx_max < 1 ||
        p->n_threads < 0) {
        KVR_LOG_ERROR("bad engine parameters: batch_tokens=%d items=%d ctx=%d threads=%d",
                      p->n_batch_tokens_max, p->n_items_max, p->n_ctx_max, p->n_threads);
        return KVR_EINVAL;
    }
    struct kvr_engine *e = calloc(1, sizeof *e);
    if (!e)
        return KVR_ENOMEM;
    e->p = *p;
    e->c = kvr_model_config(p->model);
    e->w = kvr_model_weights(p->model);
    const struct kvr_model_config *c = e->c;
    e->n_threads = p->n_threads;
    if (e->n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        e->n_threads = n > 0 ? (int)n : 1;
    }
    kvr_matmul_init();
    int rc = kvr_threadpool_create(e->n_threads, &e->tp);
    if (rc != KVR_OK) {
        free(e);
        return rc;
    }
    size_t T = (size_t)p->n_batch_tokens_max, d = (size_t)c->dim, kv = (size_t)c->kv_dim;
    size_t h = (size_t)c->hidden_dim, hd = (size_t)c->head_dim, ctx = (size_t)p->n_ctx_max;
    int kv_mul = c->n_heads / c->n_kv_heads;
    e->score_stride = (size_t)(QTILE > kv_mul ? QTILE : kv_mul) * ctx;
    e->n_rope = c->seq_len > p->n_ctx_max ? c->seq_len : p->n_ctx_max;
    e->x = malloc(T * d * sizeof(float));
    e->xb = malloc(T * d * sizeof(float));
    e->xb2 = malloc(T * d * sizeof(float));
    e->q = malloc(T * d * sizeof(float));
    e->k = malloc(T * kv * sizeof(float));
    e->v = malloc(T * kv * sizeof(float));
    e->hb = malloc(T * h * sizeof(float));
    e->hb2 = malloc(T * h * sizeof(float));
    e->logit_rows = malloc((size_t)LOGIT_ROWS * (size_t)c->vocab_size * sizeof(float));
    e->kc = malloc(ctx * kv * sizeof(float));
    e->vc = malloc(ctx * kv * sizeof(float));
    e->scores = malloc((size_t)e->n_threads * e->score_stride * sizeof(float));
    e->krot = malloc((size_t)e->n_threads * hd * sizeof(float));
    e->rope_tab = malloc((size_t)e->n_rope * hd * sizeof(float));
    e->rope_rows = malloc(T * hd * sizeof(float));
    e->row_item = malloc(T * sizeof(int));
    e->row_pos = malloc(T * sizeof(int));
    e->row_rope = malloc(T * sizeof(float *));
    e->unit_row = malloc(T * sizeof(int));
    e->logit_row = malloc(T * sizeof(int));
    e->logit_dst = malloc(T * sizeof(float *));
    if (!e->x || !e->xb || !e->xb2 || !e->q || !e->k || !e->v || !e->hb || !e->hb2 ||
        !e->logit_rows || !e->kc || !e->vc || !e->scores || !e->krot || !e->rope_tab ||
        !e->rope_rows || !e->row_item || !e->row_pos || !e->row_rope || !e->unit_row ||
        !e->logit_row || !e->logit_dst) {
        KVR_LOG_ERROR("cannot allocate activations for %d tokens x %d ctx", p->n_batch_tokens_max,
                      p->n_ctx_max);
        kvr_engine_free(e);
        return KVR_ENOMEM;
    }
    for (int pos = 0; pos < e->n_rope; pos++)
        rope_fill(e->rope_tab + (size_t)pos * hd, pos, c->head_dim);
    *out = e;
    return KVR_OK;
}

void kvr_engine_free(struct kvr_engine *e) {
    if (!e)
        return;
    kvr_threadpool_free(e->tp);
    free(e->x);
    free(e->xb);
    free(e->xb2);
    free(e->q);
    free(e->k);
    free(e->v);
    free(e->hb);
    free(e->hb2);
    free(e->logit_rows);
    free(e->kc);
    free(e->vc);
    free(e->scores);
    free(e->krot);
    free(e->rope_tab);
    free(e->rope_rows);
    free(e->row_item);
    free(e->row_pos);
    free(e->row_rope);
    free(e->unit_row);
    free(e->logit_row);
    free(e->logit_dst);
    free(e);
}

const struct kvr_engine_params *kvr_engine_params(const struct kvr_engine *e) { return &e->p; }

void kvr_engine_set_layer_hook(struct kvr_engine *e,
                               void (*fn)(void *ud, const struct kvr_forward_item *items,
                                          int n_items, int layer),
                               void *ud) {
    e->layer_hook = fn;
    e->layer_hook_ud = ud;
}

/* ---- row-wise elementwise work ------------------------------------------------- */

enum row_op { ROW_RMSNORM_ATT, ROW_ROPE_STORE, ROW_RMSNORM_FFN, ROW_SWIGLU };

struct row_job {
    struct kvr_engine *e;
    enum row_op op;
};

static void row_task(void *arg, int task, int thread) {
    (void)thread;
    const struct row_job *j = arg;
    struct kvr_engine *e = j->e;
    const struct kvr_model_config *c = e->c;
    int d = c->dim, kvd = c->kv_dim, l = e->layer;
    int r0 = task * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < e->n_rows ? r0 + ROWS_PER_TASK : e->n_rows;
    for (int r = r0; r < r1; r++) {
        switch (j->op) {
        case ROW_RMSNORM_ATT:
            rmsnorm(e->xb + (size_t)r * d, e->x + (size_t)r * d, e->w->rms_att + (size_t)l * d, d);
            break;
        case ROW_RMSNORM_FFN:
            rmsnorm(e->xb + (size_t)r * d, e->x + (size_t)r * d, e->w->rms_ffn + (size_t)l * d, d);
            break;
        case ROW_ROPE_STORE: {
            struct kvr_kv_seq *s = e->items[e->row_item[r]].seq;
            int pos = e->row_pos[r];
            float *q = e->q + (size_t)r * d, *k = e->k + (size_t)r * kvd, *v = e->v + (size_t)r * kvd;
            rope_rotate(q, d, c->head_dim, e->row_rope[r]);
            /* Sink keys stay unrotated: attention rotates them at their cache place. */
            if (s->policy.policy != KVR_KV_SINK)
                rope_rotate(k, kvd, c->head_dim, e->row_rope[r]);
            memcpy(kv_ptr(s, l, pos, 0), k, (size_t)kvd * sizeof(float));
            memcpy(kv_ptr(s, l, pos, 1), v, (size_t)kvd * sizeof(float));
            break;
        }
        case ROW_SWIGLU: {
            float *a = e->hb + (size_t)r * c->hidden_dim, *b = e->hb2 + (size_t)r * c->hidden_dim;
            for (int i = 0; i < c->hidden_dim; i++) {
                float val = a[i];
                val *= 1.0f / (1.0f + expf(-val));
                a[i] = val * b[i];
            }
            break;
        }
        }
    }
}

static void run_rows(struct kvr_engine *e, enum row_op op) {
    struct row_job j = {.e = e, .op = op};
    int n_tasks = (e->n_rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    /* A handful of rows of a small model is cheaper inline than waking workers. */
    long work = (long)e->n_rows * (op == ROW_SWIGLU ? e->c->hidden_dim : e->c->dim);
    kvr_threadpool_run(work >= 16384 ? e->tp : NULL, row_task, &j, n_tasks);
}

/* ---- attention: per-query path over cache blocks -------------------------------- */

/* Attention of one query row for the query heads sharing KV head g. Keys are read from
 * the cache where they sit; sink-policy keys are rotated at their cache position. */
static void attend_one(struct kvr_engine *e, int r, int g, int thread) {
    const struct kvr_model_config *c = e->c;
    struct kvr_kv_seq *s = e->items[e->row_item[r]].seq;
    int hd = c->head_dim, kv_mul = c->n_heads / c->n_kv_heads, l = e->layer;
    int p = e->row_pos[r];
    int n_sink = kv_sinks_visible(s, p), rb = kv_recent_begin(s, p);
    int n_keys = n_sink + (p - rb + 1);
    int rotate = s->policy.policy == KVR_KV_SINK;
    int delta = rotate ? kv_sink_delta(s, p) : 0;
    float *sc = e->scores + (size_t)thread * e->score_stride;
    float *krot = e->krot + (size_t)thread * (size_t)hd;
    const float *q = e->q + (size_t)r * c->dim + (size_t)g * kv_mul * hd;
    float scale = sqrtf((float)hd);
    for (int i = 0; i < n_keys; i++) {
        int t = i < n_sink ? i : rb + (i - n_sink);
        const float *k = kv_ptr(s, l, t, 0) + (size_t)g * hd;
        if (rotate) {
            memcpy(krot, k, (size_t)hd * sizeof(float));
            rope_rotate(krot, hd, hd, rope_at(e, t < n_sink ? t : t - delta));
            k = krot;
        }
        for (int h = 0; h < kv_mul; h++) {
            const float *qh = q + (size_t)h * hd;
            float dot = 0.0f;
            for (int j = 0; j < hd; j++)
                dot += qh[j] * k[j];
            sc[(size_t)h * n_keys + i] = dot / scale;
        }
    }
    for (int h = 0; h < kv_mul; h++)
        softmax(sc + (size_t)h * n_keys, n_keys);
    float *out = e->xb2 + (size_t)r * c->dim + (size_t)g * kv_mul * hd;
    memset(out, 0, (size_t)kv_mul * hd * sizeof(float));
    for (int i = 0; i < n_keys; i++) {
        int t = i < n_sink ? i : rb + (i - n_sink);
        const float *v = kv_ptr(s, l, t, 1) + (size_t)g * hd;
        for (int h = 0; h < kv_mul; h++) {
            float a = sc[(size_t)h * n_keys + i];
            float *oh = out + (size_t)h * hd;
            for (int j = 0; j < hd; j++)
                oh[j] += a * v[j];
        }
    }
}

static void unit_task(void *arg, int task, int thread) {
    struct kvr_engine *e = arg;
    int g = task % e->c->n_kv_heads;
    attend_one(e, e->unit_row[task / e->c->n_kv_heads], g, thread);
}

/* ---- attention: GEMM path for the prompt rows of one item ------------------------ */

/* Rows gemm_r0 .. gemm_r0+gemm_n-1 of item gemm_item, with keys gathered into kc/vc
 * starting at text position gemm_kb. A task is one query head and one tile of rows. */
static void gemm_task(void *arg, int task, int thread) {
    struct kvr_engine *e = arg;
    const struct kvr_model_config *c = e->c;
    struct kvr_kv_seq *s = e->items[e->gemm_item].seq;
    int hd = c->head_dim, d = c->dim, kvd = c->kv_dim, kv_mul = c->n_heads / c->n_kv_heads;
    int h = task / e->gemm_nq_tiles, tile = task % e->gemm_nq_tiles;
    int g = h / kv_mul;
    int i0 = tile * QTILE, i1 = i0 + QTILE < e->gemm_n ? i0 + QTILE : e->gemm_n;
    int ti = i1 - i0, r0 = e->gemm_r0, kb = e->gemm_kb;
    int p_first = e->row_pos[r0 + i0], p_last = e->row_pos[r0 + i1 - 1];
    /* Columns this tile can see: from its first query's window start to its last query. */
    int c0 = kv_recent_begin(s, p_first) - kb, c1 = p_last - kb + 1, nc = c1 - c0;
    float *sc = e->scores + (size_t)thread * e->score_stride;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ti, nc, hd, 1.0f / sqrtf((float)hd),
                e->q + (size_t)(r0 + i0) * d + (size_t)h * hd, d,
                e->kc + (size_t)c0 * kvd + (size_t)g * hd, kvd, 0.0f, sc, nc);
    for (int i = 0; i < ti; i++) {
        int p = e->row_pos[r0 + i0 + i];
        int lo = kv_recent_begin(s, p) - kb - c0, hi = p - kb - c0;
        float *row = sc + (size_t)i * nc;
        for (int j = 0; j < lo; j++)
            row[j] = 0.0f;
        softmax(row + lo, hi - lo + 1);
        for (int j = hi + 1; j < nc; j++)
            row[j] = 0.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, ti, hd, nc, 1.0f, sc, nc,
                e->vc + (size_t)c0 * kvd + (size_t)g * hd, kvd, 0.0f,
                e->xb2 + (size_t)(r0 + i0) * d + (size_t)h * hd, d);
}

/* Rows of item it that the GEMM path takes: all of a multi-token item, except sink-policy
 * queries past the window (each has its own cache positions: per-query path). */
static int gemm_rows(const struct kvr_engine *e, const struct kvr_forward_item *it, int r0) {
    if (it->n_tokens < 2)
        return 0;
    if (it->seq->policy.policy != KVR_KV_SINK)
        return it->n_tokens;
    int n = 0;
    while (n < it->n_tokens && e->row_pos[r0 + n] < it->seq->policy.window)
        n++;
    return n;
}

static void attention(struct kvr_engine *e) {
    const struct kvr_model_config *c = e->c;
    int kvd = c->kv_dim, l = e->layer;
    int r0 = 0;
    e->n_units = 0;
    for (int it = 0; it < e->n_items; it++) {
        struct kvr_forward_item *item = &e->items[it];
        struct kvr_kv_seq *s = item->seq;
        int n_gemm = gemm_rows(e, item, r0);
        for (int i = n_gemm; i < item->n_tokens; i++)
            e->unit_row[e->n_units++] = r0 + i;
        if (n_gemm > 0) {
            int kb = kv_recent_begin(s, e->row_pos[r0]);
            int ke = e->row_pos[r0 + n_gemm - 1] + 1;
            for (int t = kb; t < ke; t++) {
                float *kd = e->kc + (size_t)(t - kb) * kvd;
                memcpy(kd, kv_ptr(s, l, t, 0), (size_t)kvd * sizeof(float));
                memcpy(e->vc + (size_t)(t - kb) * kvd, kv_ptr(s, l, t, 1), (size_t)kvd * sizeof(float));
                /* GEMM rows of a sink sequence are inside the first window: cache
                 * position == text position. */
                if (s->policy.policy == KVR_KV_SINK)
                    rope_rotate(kd, kvd, c->head_dim, rope_at(e, t));
            }
            e->gemm_item = it;
            e->gemm_r0 = r0;
            e->gemm_n = n_gemm;
            e->gemm_kb = kb;
            e->gemm_nq_tiles = (n_gemm + QTILE - 1) / QTILE;
            kvr_threadpool_run(e->tp, gemm_task, e, c->n_heads * e->gemm_nq_tiles);
        }
        r0 += item->n_tokens;
    }
    if (e->n_units > 0) {
        long work = (long)e->n_units * c->dim * 64;
        kvr_threadpool_run(work >= 16384 ? e->tp : NULL, unit_task, e, e->n_units * c->n_kv_heads);
    }
}

/* ---- the forward pass ----------------------------------------------------------- */

/* Most keys any query of item attends, and the widest gathered range of its GEMM rows. */
static int item_ctx_need(const struct kvr_forward_item *it) {
    const struct kvr_kv_seq *s = it->seq;
    int p0 = s->n_past, p1 = s->n_past + it->n_tokens - 1;
    int per_query = kv_sinks_visible(s, p1) + (p1 - kv_recent_begin(s, p1) + 1);
    int gathered = p1 - kv_recent_begin(s, p0) + 1;
    if (s->policy.policy == KVR_KV_SINK && gathered > s->policy.window)
        gathered = s->policy.window;
    if (it->n_tokens < 2)
        gathered = 0;
    return per_query > gathered ? per_query : gathered;
}

int kvr_engine_forward(struct kvr_engine *e, struct kvr_forward_item *items, int n_items) {
    const struct kvr_model_config *c = e->c;
    const struct kvr_model_weights *w = e->w;
    int d = c->dim, kvd = c->kv_dim, hid = c->hidden_dim, V = c->vocab_size;
    if (n_items < 1 || n_items > e->p.n_items_max) {
        KVR_LOG_ERROR("%d items, engine takes 1..%d", n_items, e->p.n_items_max);
        return KVR_EINVAL;
    }
    int T = 0;
    for (int i = 0; i < n_items; i++) {
        const struct kvr_forward_item *it = &items[i];
        if (!it->seq || !it->tokens || it->n_tokens < 1) {
            KVR_LOG_ERROR("item %d is empty", i);
            return KVR_EINVAL;
        }
        if (it->seq->pool->n_layers != c->n_layers || it->seq->pool->kv_dim != kvd) {
            KVR_LOG_ERROR("item %d: cache shape (layers %d, kv_dim %d) is not the model's", i,
                          it->seq->pool->n_layers, it->seq->pool->kv_dim);
            return KVR_EINVAL;
        }
        for (int t = 0; t < it->n_tokens; t++) {
            if (it->tokens[t] < 0 || it->tokens[t] >= V) {
                KVR_LOG_ERROR("item %d: token id %d outside the vocabulary [0, %d)", i, it->tokens[t], V);
                return KVR_EINVAL;
            }
        }
        T += it->n_tokens;
        if (T > e->p.n_batch_tokens_max) {
            KVR_LOG_ERROR("%d+ tokens in one call, engine takes %d", T, e->p.n_batch_tokens_max);
            return KVR_EINVAL;
        }
        int need = item_ctx_need(it);
        if (need > e->p.n_ctx_max) {
            KVR_LOG_ERROR("item %d would attend %d keys, engine takes %d", i, need, e->p.n_ctx_max);
            return KVR_ECONTEXT;
        }
    }
    for (int i = 0; i < n_items; i++) {
        int rc = kvr_kv_seq_reserve(items[i].seq, items[i].n_tokens);
        if (rc != KVR_OK)
            return rc;
    }

    /* Rows: positions, RoPE rows, embeddings, where logits go. */
    e->items = items;
    e->n_items = n_items;
    e->n_rows = T;
    int n_logit = 0;
    for (int i = 0, r = 0; i < n_items; i++) {
        struct kvr_forward_item *it = &items[i];
        struct kvr_kv_seq *s = it->seq;
        for (int t = 0; t < it->n_tokens; t++, r++) {
            int pos = s->n_past + t;
            e->row_item[r] = i;
            e->row_pos[r] = pos;
            /* Queries of a sink sequence sit at their cache position. */
            int rpos = s->policy.policy == KVR_KV_SINK ? pos - kv_sink_delta(s, pos) : pos;
            if (rpos < e->n_rope) {
                e->row_rope[r] = rope_at(e, rpos);
            } else {
                float *row = e->rope_rows + (size_t)r * c->head_dim;
                rope_fill(row, rpos, c->head_dim);
                e->row_rope[r] = row;
            }
            memcpy(e->x + (size_t)r * d, w->token_embedding + (size_t)it->tokens[t] * d,
                   (size_t)d * sizeof(float));
            if (it->logits && (it->all_logits || t == it->n_tokens - 1)) {
                e->logit_row[n_logit] = r;
                e->logit_dst[n_logit++] = it->logits + (it->all_logits ? (size_t)t * V : 0);
            }
        }
    }

    for (int l = 0; l < c->n_layers; l++) {
        e->layer = l;
        size_t ld = (size_t)l * d * d, lkv = (size_t)l * kvd * d, lh = (size_t)l * hid * d;
        run_rows(e, ROW_RMSNORM_ATT);
        kvr_matmul(e->tp, e->q, e->xb, w->wq + ld, T, d, d, 0.0f);
        kvr_matmul(e->tp, e->k, e->xb, w->wk + lkv, T, kvd, d, 0.0f);
        kvr_matmul(e->tp, e->v, e->xb, w->wv + lkv, T, kvd, d, 0.0f);
        run_rows(e, ROW_ROPE_STORE);
        if (e->layer_hook)
            e->layer_hook(e->layer_hook_ud, items, n_items, l);
        attention(e);
        kvr_matmul(e->tp, e->x, e->xb2, w->wo + ld, T, d, d, 1.0f);
        run_rows(e, ROW_RMSNORM_FFN);
        kvr_matmul(e->tp, e->hb, e->xb, w->w1 + lh, T, hid, d, 0.0f);
        kvr_matmul(e->tp, e->hb2, e->xb, w->w3 + lh, T, hid, d, 0.0f);
        run_rows(e, ROW_SWIGLU);
        kvr_matmul(e->tp, e->x, e->hb, w->w2 + lh, T, d, hid, 1.0f);
    }

    /* Classifier only for the rows that want logits, LOGIT_ROWS at a time. */
    for (int i = 0; i < n_logit; i++)
        rmsnorm(e->xb + (size_t)i * d, e->x + (size_t)e->logit_row[i] * d, w->rms_final, d);
    for (int i0 = 0; i0 < n_logit; i0 += LOGIT_ROWS) {
        int m = n_logit - i0 < LOGIT_ROWS ? n_logit - i0 : LOGIT_ROWS;
        kvr_matmul(e->tp, e->logit_rows, e->xb + (size_t)i0 * d, w->wcls, m, V, d, 0.0f);
        for (int i = 0; i < m; i++)
            memcpy(e->logit_dst[i0 + i], e->logit_rows + (size_t)i * V, (size_t)V * sizeof(float));
    }

    for (int i = 0; i < n_items; i++)
        kvr_kv_seq_advance(items[i].seq, items[i].n_tokens);
    e->items = NULL;
    return KVR_OK;
}
