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

#include "half.h"
#include "kernels.h"
#include "kv_cache_impl.h"
#include "log.h"
#include "matmul.h"
#include "status.h"
#include "threadpool.h"

#define QTILE 64        /* query rows per attention task in the GEMM path */
#define LOGIT_ROWS 32   /* classifier rows per GEMM */
#define ROWS_PER_TASK 8 /* rows per task for the row-wise elementwise ops */
#define ATT_CHUNK 128   /* keys per piece of per-query attention (see attend_unit) */
#define ATT_PARALLEL_MIN_WORK 16384L /* per-query attention's multiply-adds worth the threads */

struct kvr_engine {
    struct kvr_engine_params p;
    const struct kvr_model_config *c;
    const struct kvr_model_weights *w;
    struct kvr_threadpool *tp;
    int n_threads;
    struct kvr_matmul_ws *ws; /* activations converted for non-F32 weights; NULL: all F32 */

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
    int att_group_min; /* fewest KV heads per task of the per-query attention path */
    int att_group;     /* KV heads per task in the current call */
    float *krot;       /* (n_threads, head_dim) a key rotated on the fly (sink policy) */
    /* Pieces of per-query attention over ATT_CHUNK keys, piece_floats each: (n_heads,
     * head_dim) unnormalized outputs, then n_heads maxima, then n_heads sums. */
    size_t piece_floats;
    float *att_acc;    /* (n_threads, 2 pieces) a whole query's running and current piece */
    float *att_pieces; /* (n_pieces_max pieces) the pieces of a split call */
    int n_pieces_max;
    int *unit_nch;     /* pieces of each unit's keys */
    int *unit_task0;   /* (T + 1) first task of each unit in a split call */
    int *unit_piece0;  /* first piece of each unit in a split call */
    int att_split;     /* the current call runs pieces as separate tasks */

    /* RoPE: (n_rope, head_dim/2, {cos, sin}) for positions below n_rope; rows for
     * positions beyond it are computed per call into rope_rows (T, head_dim/2, 2). */
    float *rope_tab;
    int n_rope;
    float *rope_rows;

    /* Per-call bookkeeping, T rows. */
    int *row_item;        /* item index of each row */
    unsigned char *row_prompt; /* 1 for the rows of prompt items (kvr_forward_item.prompt) */
    const unsigned char *prompt_rows; /* row_prompt when this call has a prompt row, else NULL */
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

/* ---- helpers ------------------------------------------------------------------
 * The vector loops (dot products, e^x, SwiGLU, attention runs) are the run-time chosen
 * kernels' (kernels.h). */
#define vdot(a, b, n) (kvr_kernels()->vdot((a), (b), (n)))
#define exp_shift_sum(x, n, max) (kvr_kernels()->exp_shift_sum((x), (n), (max)))
#define swiglu(a, b, n) (kvr_kernels()->swiglu((a), (b), (n)))

static void rmsnorm(float *o, const float *x, const float *weight, int size, float eps) {
    float ss = vdot(x, x, size);
    ss /= (float)size;
    ss += eps;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < size; j++)
        o[j] = weight[j] * (ss * x[j]);
}

/* Rotates the pairs of vec (n floats, whole heads of head_dim) by one RoPE row. */
static void rope_rotate(float *vec, int n, int head_dim, const float *rope) {
    for (int h = 0; h < n; h += head_dim) {
        float *vh = vec + h;
        for (int i = 0; i < head_dim; i += 2) {
            float fcr = rope[i], fci = rope[i + 1];
            float v0 = vh[i], v1 = vh[i + 1];
            vh[i] = v0 * fcr - v1 * fci;
            vh[i + 1] = v0 * fci + v1 * fcr;
        }
    }
}

/* One RoPE row (head_dim/2 pairs of cos, sin) exactly as llama2.c computes it, with the
 * model's frequency base; pairs past the first n_rot features are left as they are
 * (cos 1, sin 0: an exact identity), as llama.cpp's `llama` RoPE does. */
static void rope_fill(float *row, int pos, const struct kvr_model_config *c) {
    for (int i = 0; i < c->head_dim; i += 2) {
        if (i >= c->n_rot) {
            row[i] = 1.0f;
            row[i + 1] = 0.0f;
            continue;
        }
        float freq = 1.0f / powf(c->rope_theta, (float)i / (float)c->n_rot);
        float val = (float)pos * freq;
        row[i] = cosf(val);
        row[i + 1] = sinf(val);
    }
}

/* Whether any matrix of the model is not float32 (then products need a workspace). */
static int model_typed(const struct kvr_model_weights *w, int n_layers) {
    int typed = w->wcls.type != KVR_DTYPE_F32;
    for (int l = 0; l < n_layers; l++) {
        const struct kvr_layer_weights *lw = &w->layers[l];
        typed |= lw->wq.type != KVR_DTYPE_F32 || lw->wk.type != KVR_DTYPE_F32 ||
                 lw->wv.type != KVR_DTYPE_F32 || lw->wo.type != KVR_DTYPE_F32 ||
                 lw->w1.type != KVR_DTYPE_F32 || lw->w2.type != KVR_DTYPE_F32 ||
                 lw->w3.type != KVR_DTYPE_F32;
    }
    return typed;
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        max = x[i] > max ? x[i] : max;
    float sum = exp_shift_sum(x, n, max);
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++)
        x[i] *= inv;
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
    KVR_LOG_INFO("engine: %d threads, kernels %s (CPU: %s)", e->n_threads, kvr_kernels()->name,
                 kvr_cpu_features()[0] ? kvr_cpu_features() : "no vector extensions");
    int rc = kvr_threadpool_create(e->n_threads, &e->tp);
    if (rc != KVR_OK) {
        free(e);
        return rc;
    }
    size_t T = (size_t)p->n_batch_tokens_max, d = (size_t)c->dim, kv = (size_t)c->kv_dim;
    size_t h = (size_t)c->hidden_dim, hd = (size_t)c->head_dim, ctx = (size_t)p->n_ctx_max;
    /* Per-query attention reads keys and values of att_group KV heads per task: at least
     * 64 floats of each cached token, so that small heads (the bundled model's 8) still
     * read whole cache lines instead of a quarter of each. */
    e->att_group_min = c->head_dim >= 64 ? 1 : (64 + c->head_dim - 1) / c->head_dim;
    if (e->att_group_min > c->n_kv_heads)
        e->att_group_min = c->n_kv_heads;
    while (c->n_kv_heads % e->att_group_min)
        e->att_group_min--;
    e->score_stride = (size_t)(QTILE > c->n_heads ? QTILE : c->n_heads) * ctx;
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
    e->row_prompt = malloc(T);
    e->row_pos = malloc(T * sizeof(int));
    e->row_rope = malloc(T * sizeof(float *));
    e->unit_row = malloc(T * sizeof(int));
    e->logit_row = malloc(T * sizeof(int));
    e->logit_dst = malloc(T * sizeof(float *));
    e->piece_floats = (size_t)c->n_heads * (hd + 2);
    e->n_pieces_max = 16 * e->n_threads;
    e->att_acc = malloc((size_t)e->n_threads * 2 * e->piece_floats * sizeof(float));
    e->att_pieces = malloc((size_t)e->n_pieces_max * e->piece_floats * sizeof(float));
    e->unit_nch = malloc(T * sizeof(int));
    e->unit_task0 = malloc((T + 1) * sizeof(int));
    e->unit_piece0 = malloc(T * sizeof(int));
    if (!e->x || !e->xb || !e->xb2 || !e->q || !e->k || !e->v || !e->hb || !e->hb2 ||
        !e->logit_rows || !e->kc || !e->vc || !e->scores || !e->krot || !e->rope_tab ||
        !e->rope_rows || !e->row_item || !e->row_prompt || !e->row_pos || !e->row_rope || !e->unit_row ||
        !e->logit_row || !e->logit_dst || !e->att_acc || !e->att_pieces || !e->unit_nch || !e->unit_task0 ||
        !e->unit_piece0) {
        KVR_LOG_ERROR("cannot allocate activations for %d tokens x %d ctx", p->n_batch_tokens_max,
                      p->n_ctx_max);
        kvr_engine_free(e);
        return KVR_ENOMEM;
    }
    if (model_typed(e->w, c->n_layers)) {
        /* Slot 0 takes the widest input (the FFN's hidden features), slots 1 and 2 the
         * Q/K/V or W1/W3 inputs when those matrices have different types. */
        int T0 = p->n_batch_tokens_max > LOGIT_ROWS ? p->n_batch_tokens_max : LOGIT_ROWS;
        struct kvr_matmul_ws_params wp = {.m_max = T0,
                                          .k_max = {c->hidden_dim > c->dim ? c->hidden_dim : c->dim, c->dim, c->dim}};
        if ((rc = kvr_matmul_ws_create(&wp, &e->ws)) != KVR_OK) {
            KVR_LOG_ERROR("cannot allocate the activation workspace for %d tokens", T0);
            kvr_engine_free(e);
            return rc;
        }
    }
    for (int pos = 0; pos < e->n_rope; pos++)
        rope_fill(e->rope_tab + (size_t)pos * hd, pos, c);
    *out = e;
    return KVR_OK;
}

void kvr_engine_free(struct kvr_engine *e) {
    if (!e)
        return;
    kvr_threadpool_free(e->tp);
    kvr_matmul_ws_free(e->ws);
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
    free(e->row_prompt);
    free(e->row_pos);
    free(e->row_rope);
    free(e->unit_row);
    free(e->logit_row);
    free(e->logit_dst);
    free(e->att_acc);
    free(e->att_pieces);
    free(e->unit_nch);
    free(e->unit_task0);
    free(e->unit_piece0);
    free(e);
}

const struct kvr_engine_params *kvr_engine_params(const struct kvr_engine *e) { return &e->p; }

struct kvr_threadpool *kvr_engine_threadpool(const struct kvr_engine *e) { return e->tp; }

void kvr_engine_set_layer_hook(struct kvr_engine *e,
                               void (*fn)(void *ud, const struct kvr_forward_item *items,
                                          int n_items, int layer),
                               void *ud) {
    e->layer_hook = fn;
    e->layer_hook_ud = ud;
}

/* ---- row-wise elementwise work ------------------------------------------------- */

enum row_op { ROW_RMSNORM_ATT, ROW_ROPE_STORE, ROW_RMSNORM_FFN };

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
            rmsnorm(e->xb + (size_t)r * d, e->x + (size_t)r * d, e->w->layers[l].rms_att, d, c->norm_eps);
            break;
        case ROW_RMSNORM_FFN:
            rmsnorm(e->xb + (size_t)r * d, e->x + (size_t)r * d, e->w->layers[l].rms_ffn, d, c->norm_eps);
            break;
        case ROW_ROPE_STORE: {
            struct kvr_kv_seq *s = e->items[e->row_item[r]].seq;
            int pos = e->row_pos[r];
            float *q = e->q + (size_t)r * d, *k = e->k + (size_t)r * kvd, *v = e->v + (size_t)r * kvd;
            rope_rotate(q, d, c->head_dim, e->row_rope[r]);
            /* Sink keys stay unrotated: attention rotates them at their cache place. */
            if (s->policy.policy != KVR_KV_SINK)
                rope_rotate(k, kvd, c->head_dim, e->row_rope[r]);
            kv_values_from_f32(s->pool->type, kv_ptr(s, l, pos, 0), k, kvd);
            kv_values_from_f32(s->pool->type, kv_ptr(s, l, pos, 1), v, kvd);
            break;
        }
        }
    }
}

static void run_rows(struct kvr_engine *e, enum row_op op) {
    struct row_job j = {.e = e, .op = op};
    int n_tasks = (e->n_rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    /* A handful of rows of a small model is cheaper inline than waking workers. */
    long work = (long)e->n_rows * e->c->dim;
    kvr_threadpool_run(work >= 16384 ? e->tp : NULL, row_task, &j, n_tasks);
}

/* ---- FFN: W1 and W3 with SwiGLU fused ------------------------------------------- */

struct ffn_job {
    struct kvr_engine *e;
    const struct kvr_tensor *w1, *w3; /* (hidden, dim) of this layer */
    struct kvr_matmul_act a1, a3;     /* xb prepared for each */
    int chunk;                        /* hidden features per task */
};

/* Features [n0, n1) of hb = xb W1^T and hb2 = xb W3^T for every row, then SwiGLU on
 * them while they are still in cache. */
static void ffn_rows(void *arg, int part, int n0, int n1, int thread) {
    (void)part;
    (void)thread;
    const struct ffn_job *j = arg;
    struct kvr_engine *e = j->e;
    int hid = e->c->hidden_dim, T = e->n_rows;
    kvr_matmul_slice(e->hb, hid, &j->a1, j->w1, n0, n1, 0.0f);
    kvr_matmul_slice(e->hb2, hid, &j->a3, j->w3, n0, n1, 0.0f);
    for (int r = 0; r < T; r++)
        swiglu(e->hb + (size_t)r * hid + n0, e->hb2 + (size_t)r * hid + n0, n1 - n0);
}

static void ffn_task(void *arg, int task, int thread) {
    const struct ffn_job *j = arg;
    int hid = j->e->c->hidden_dim, n0 = task * j->chunk;
    ffn_rows(arg, 0, n0, n0 + j->chunk < hid ? n0 + j->chunk : hid, thread);
}

static void ffn_up(struct kvr_engine *e, const struct kvr_tensor *w1, const struct kvr_tensor *w3) {
    int hid = e->c->hidden_dim, T = e->n_rows, d = e->c->dim;
    struct ffn_job j = {.e = e, .w1 = w1, .w3 = w3};
    /* xb converted once per weight type (slot 1 for W3 only when its type differs). */
    kvr_matmul_act_prepare_rows(e->tp, e->ws, 0, e->xb, T, d, w1->type, e->prompt_rows, &j.a1);
    if (w3->type == w1->type)
        j.a3 = j.a1;
    else
        kvr_matmul_act_prepare_rows(e->tp, e->ws, w1->type == KVR_DTYPE_F32 ? 0 : 1, e->xb, T, d, w3->type,
                                    e->prompt_rows, &j.a3);
    long work = 2L * T * hid * e->c->dim;
    struct kvr_threadpool *tp = work >= KVR_PARALLEL_MIN_WORK ? e->tp : NULL;
    if (T == 1) {
        /* Batch 1: one range of features per thread (kvr_matmul_b1_run). */
        int d1 = kvr_matmul_b1_div(w1->type), d3 = kvr_matmul_b1_div(w3->type);
        kvr_matmul_b1_run(tp, 1, &hid, d1 < d3 ? d1 : d3, ffn_rows, &j);
        return;
    }
    /* Each task reads two weight slices: half the plain chunk keeps the same task size. */
    j.chunk = kvr_matmul_chunk(T, hid, w1->row_nbytes, e->n_threads);
    if (j.chunk >= 32 && T <= KVR_MATMUL_SMALL_M)
        j.chunk = ((j.chunk / 2) + 15) & ~15;
    kvr_threadpool_run(tp, ffn_task, &j, (hid + j.chunk - 1) / j.chunk);
}

/* ---- attention: per-query path over cache blocks -------------------------------- */

/* Prefetch hint for the heads g0..g0+G-1 of n rows of a 2-byte cache at p (the next
 * block of a run): the kernels walk a block head by head, a strided order the hardware
 * prefetcher follows late. */
static void prefetch_block(const void *p, int g0, int G, int hd, size_t kvd, int n) {
    const char *b = (const char *)p + (size_t)g0 * (size_t)hd * 2;
    size_t len = (size_t)G * (size_t)hd * 2;
    for (int u = 0; u < n; u++)
        for (size_t j = 0; j < len; j += 64)
            __builtin_prefetch(b + (size_t)u * kvd * 2 + j, 0, 3);
}

/* Keys the query of row r attends: the visible sinks, then the recent positions. */
static int unit_keys(const struct kvr_engine *e, int r) {
    const struct kvr_kv_seq *s = e->items[e->row_item[r]].seq;
    int p = e->row_pos[r];
    return kv_sinks_visible(s, p) + (p - kv_recent_begin(s, p) + 1);
}

/* Pieces of ATT_CHUNK keys a query of n_keys keys is computed in (1: one softmax). */
static int att_chunks(int n_keys) { return (n_keys + ATT_CHUNK - 1) / ATT_CHUNK; }

/* Attention of one query row over its keys [i_lo, i_hi) (in attention order: sinks, then
 * recent positions) for the query heads of KV heads g0 .. g0+att_group-1. Keys are read
 * from the cache where they sit; sink-policy keys are rotated at their cache position.
 * Scores: row (gg * kv_mul + h) of sc for query head h of KV head g0 + gg. With m == NULL
 * the scores are a softmax and out (the heads' outputs, head_dim floats each) their
 * weighted values; otherwise e^(score - max) weights them, unnormalized, and m and l get
 * each head's maximum and sum of weights (a piece, see attend_unit). */
static void attend_keys(struct kvr_engine *e, int r, int g0, int i_lo, int i_hi, int thread, float *out, float *m,
                        float *lsum) {
    const struct kvr_model_config *c = e->c;
    struct kvr_kv_seq *s = e->items[e->row_item[r]].seq;
    int hd = c->head_dim, kv_mul = c->n_heads / c->n_kv_heads, l = e->layer;
    int p = e->row_pos[r];
    int n_sink = kv_sinks_visible(s, p), rb = kv_recent_begin(s, p);
    int n_keys = n_sink + (p - rb + 1), nk = i_hi - i_lo;
    int rotate = s->policy.policy == KVR_KV_SINK;
    int delta = rotate ? kv_sink_delta(s, p) : 0;
    float *sc = e->scores + (size_t)thread * e->score_stride;
    float *krot = e->krot + (size_t)thread * (size_t)hd;
    const float *q = e->q + (size_t)r * c->dim + (size_t)g0 * kv_mul * hd;
    float scale = sqrtf((float)hd);
    int G = e->att_group;
    size_t qstep = (size_t)kv_mul * hd, sstep = (size_t)kv_mul * nk;
    int bt = s->pool->block_tokens;
    size_t kvd = (size_t)c->kv_dim;
    enum kvr_kv_type kt = s->pool->type;
    enum kvr_dtype ht = kt == KVR_KV_BF16 ? KVR_DTYPE_BF16 : KVR_DTYPE_F16; /* half caches */
    const struct kvr_kernels *kr = kvr_kernels();
    size_t elt = s->pool->elt;
    /* Keys come in two ranges of text positions (sinks, then the recent ones), each
     * walked in runs inside one cache block: one block lookup per run, not per key. Key
     * index i (from i_lo) is text position i + i_lo + base. */
    for (int seg = 0; seg < 2; seg++) {
        int base = seg ? rb - n_sink : 0;
        int a = seg ? n_sink : 0, b = seg ? n_keys : n_sink;
        a = a > i_lo ? a : i_lo;
        b = b < i_hi ? b : i_hi;
        int t = a + base, t_end = b + base, i = a - i_lo;
        while (t < t_end) {
            int n = bt - t % bt < t_end - t ? bt - t % bt : t_end - t;
            const char *kb = (const char *)kv_ptr(s, l, t, 0) + (size_t)g0 * hd * elt;
            if (!rotate) {
                /* The whole run inside the block, head by head: the kernels' 8-key
                 * reductions and the value accumulators in registers span up to a block
                 * (measured: runs of 4 rows read the half cache at ~2/3 of f32's bytes/s,
                 * and f32 attention took 15-25% longer). 2-byte values are widened in the
                 * kernel, and their next block prefetched (prefetch_block). */
                if (kt != KVR_KV_F32 && t + n < t_end)
                    prefetch_block(kv_ptr(s, l, t + n, 0), g0, G, hd, kvd, t_end - t - n < bt ? t_end - t - n : bt);
                for (int gg = 0; gg < G; gg++) {
                    float *scg = sc + gg * sstep + i;
                    const float *qg = q + gg * qstep;
                    const char *kg = kb + (size_t)gg * hd * elt;
                    if (kt == KVR_KV_F32)
                        kr->qk_run(scg, nk, qg, kv_mul, hd, (const float *)(const void *)kg, kvd, n, scale);
                    else
                        kr->qk_run_h(ht, scg, nk, qg, kv_mul, hd, (const uint16_t *)(const void *)kg, kvd, n, scale);
                }
                t += n;
                i += n;
                continue;
            }
            for (int u = 0; u < n; u++, t++, i++) {
                for (int gg = 0; gg < G; gg++) {
                    kv_values_to_f32(kt, krot, kb + ((size_t)u * kvd + (size_t)gg * hd) * elt, hd);
                    rope_rotate(krot, hd, hd, rope_at(e, t < n_sink ? t : t - delta));
                    for (int h = 0; h < kv_mul; h++)
                        sc[gg * sstep + (size_t)h * nk + i] =
                            vdot(q + gg * qstep + (size_t)h * hd, krot, hd) / scale;
                }
            }
        }
    }
    for (int h = 0; h < G * kv_mul; h++) {
        float *row = sc + (size_t)h * nk;
        if (!m) {
            softmax(row, nk);
            continue;
        }
        float max = row[0];
        for (int i = 1; i < nk; i++)
            max = row[i] > max ? row[i] : max;
        m[h] = max;
        lsum[h] = exp_shift_sum(row, nk, max);
    }
    memset(out, 0, (size_t)G * qstep * sizeof(float));
    for (int seg = 0; seg < 2; seg++) {
        int base = seg ? rb - n_sink : 0;
        int a = seg ? n_sink : 0, b = seg ? n_keys : n_sink;
        a = a > i_lo ? a : i_lo;
        b = b < i_hi ? b : i_hi;
        int t = a + base, t_end = b + base, i = a - i_lo;
        while (t < t_end) {
            int n = bt - t % bt < t_end - t ? bt - t % bt : t_end - t;
            const char *vbc = (const char *)kv_ptr(s, l, t, 1) + (size_t)g0 * hd * elt;
            if (kt != KVR_KV_F32 && t + n < t_end)
                prefetch_block(kv_ptr(s, l, t + n, 1), g0, G, hd, kvd, t_end - t - n < bt ? t_end - t - n : bt);
            for (int gg = 0; gg < G; gg++) {
                float *og = out + gg * qstep;
                const float *ag = sc + gg * sstep + i;
                const char *vg = vbc + (size_t)gg * hd * elt;
                if (kt == KVR_KV_F32)
                    kr->av_run(og, ag, nk, kv_mul, hd, (const float *)(const void *)vg, kvd, n);
                else
                    kr->av_run_h(ht, og, ag, nk, kv_mul, hd, (const uint16_t *)(const void *)vg, kvd, n);
            }
            t += n;
            i += n;
        }
    }
}

/* Where piece pc keeps the output, maximum and sum of query head h0. */
static float *piece_out(const struct kvr_engine *e, float *pc, int h0) { return pc + (size_t)h0 * e->c->head_dim; }
static float *piece_max(const struct kvr_engine *e, float *pc, int h0) {
    return pc + (size_t)e->c->n_heads * e->c->head_dim + h0;
}
static float *piece_sum(const struct kvr_engine *e, float *pc, int h0) {
    return pc + (size_t)e->c->n_heads * (e->c->head_dim + 1) + h0;
}

/* Folds piece cur into the running piece run for query heads h0 .. h0+nh-1: both rescaled
 * to the larger maximum. */
static void piece_merge(const struct kvr_engine *e, float *run, float *cur, int h0, int nh) {
    int hd = e->c->head_dim;
    for (int h = h0; h < h0 + nh; h++) {
        float *mr = piece_max(e, run, h), *lr = piece_sum(e, run, h);
        float mc = *piece_max(e, cur, h), lc = *piece_sum(e, cur, h);
        float mx = *mr > mc ? *mr : mc;
        float wa = expf(*mr - mx), wb = expf(mc - mx);
        *mr = mx;
        *lr = *lr * wa + lc * wb;
        float *o = piece_out(e, run, h);
        const float *oc = piece_out(e, cur, h);
        for (int j = 0; j < hd; j++)
            o[j] = o[j] * wa + oc[j] * wb;
    }
}

/* The attention output of query heads h0 .. h0+nh-1 of row r from its folded pieces. */
static void piece_finish(const struct kvr_engine *e, int r, float *run, int h0, int nh) {
    int hd = e->c->head_dim;
    for (int h = h0; h < h0 + nh; h++) {
        float inv = 1.0f / *piece_sum(e, run, h);
        const float *o = piece_out(e, run, h);
        float *out = e->xb2 + (size_t)r * e->c->dim + (size_t)h * hd;
        for (int j = 0; j < hd; j++)
            out[j] = o[j] * inv;
    }
}

/* Piece ch (keys ch*ATT_CHUNK ..) of query row r's n_keys keys for KV heads g0 .. into pc. */
static void attend_piece(struct kvr_engine *e, int r, int g0, int ch, int n_keys, int thread, float *pc) {
    int h0 = g0 * (e->c->n_heads / e->c->n_kv_heads);
    int i1 = (ch + 1) * ATT_CHUNK < n_keys ? (ch + 1) * ATT_CHUNK : n_keys;
    attend_keys(e, r, g0, ch * ATT_CHUNK, i1, thread, piece_out(e, pc, h0), piece_max(e, pc, h0),
                piece_sum(e, pc, h0));
}

/* Attention of query row r for KV heads g0 .. g0+att_group-1, all its keys in one task. A
 * query of more than ATT_CHUNK keys is computed in pieces of ATT_CHUNK keys (the last one
 * shorter), each a softmax-weighted sum relative to its own maximum, folded in key order:
 * the same arithmetic as when a split call runs the pieces as separate tasks
 * (split_task), so a sequence's bits depend on its keys only, not on the batch or the
 * threads. Up to ATT_CHUNK keys it is one plain softmax (llama2.c's order). */
static void attend_unit(struct kvr_engine *e, int r, int g0, int thread) {
    int hd = e->c->head_dim, kv_mul = e->c->n_heads / e->c->n_kv_heads;
    int h0 = g0 * kv_mul, nh = e->att_group * kv_mul;
    int n_keys = unit_keys(e, r), nch = att_chunks(n_keys);
    if (nch == 1) {
        attend_keys(e, r, g0, 0, n_keys, thread, e->xb2 + (size_t)r * e->c->dim + (size_t)h0 * hd, NULL, NULL);
        return;
    }
    float *run = e->att_acc + (size_t)thread * 2 * e->piece_floats, *cur = run + e->piece_floats;
    for (int ch = 0; ch < nch; ch++) {
        attend_piece(e, r, g0, ch, n_keys, thread, ch ? cur : run);
        if (ch)
            piece_merge(e, run, cur, h0, nh);
    }
    piece_finish(e, r, run, h0, nh);
}

static void unit_task(void *arg, int task, int thread) {
    struct kvr_engine *e = arg;
    int n_groups = e->c->n_kv_heads / e->att_group;
    attend_unit(e, e->unit_row[task / n_groups], task % n_groups * e->att_group, thread);
}

/* A split call: task (unit u, piece ch, KV head group) computes one piece into
 * att_pieces; a unit of one piece is computed whole. attention() folds the pieces. */
static void split_task(void *arg, int task, int thread) {
    struct kvr_engine *e = arg;
    int u = 0;
    while (task >= e->unit_task0[u + 1])
        u++;
    int n_groups = e->c->n_kv_heads / e->att_group, local = task - e->unit_task0[u];
    int r = e->unit_row[u], g0 = local % n_groups * e->att_group, ch = local / n_groups;
    if (e->unit_nch[u] == 1) {
        attend_unit(e, r, g0, thread);
        return;
    }
    attend_piece(e, r, g0, ch, unit_keys(e, r), thread,
                 e->att_pieces + (size_t)(e->unit_piece0[u] + ch) * e->piece_floats);
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
                kv_values_to_f32(s->pool->type, kd, kv_ptr(s, l, t, 0), kvd);
                kv_values_to_f32(s->pool->type, e->vc + (size_t)(t - kb) * kvd, kv_ptr(s, l, t, 1), kvd);
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
        /* Queries of more than ATT_CHUNK keys are computed in pieces (attend_unit). When
         * few queries have to keep the threads busy, the pieces are tasks of their own
         * (split_task), each reading whole cached rows of its keys in token order. work:
         * two multiply-adds per key and query feature (scores, then values). */
        int n_split = 0, n_tasks_full = 0;
        long work = 0;
        for (int u = 0; u < e->n_units; u++) {
            int n_keys = unit_keys(e, e->unit_row[u]);
            e->unit_nch[u] = att_chunks(n_keys);
            n_split += e->unit_nch[u] > 1 ? e->unit_nch[u] : 0;
            n_tasks_full += e->unit_nch[u];
            work += 2L * n_keys * c->dim;
        }
        e->att_split = n_split > 0 && n_split <= e->n_pieces_max && e->n_units < 4 * e->n_threads;
        int per_unit_tasks = e->att_split ? n_tasks_full : e->n_units;
        /* KV heads per task: as many as keep 4 tasks per thread, so that a batch reads
         * whole cached rows of K and V in token order, while a single short sequence
         * still splits over its heads. Pieces as tasks take whole rows as soon as there
         * is one task per thread (measured, 110M F32 at context 512-640, 2 threads:
         * attention 1.5-1.7 ms a step against 2.0-2.5 with half rows and 4 tasks each). */
        int min_tasks = (e->att_split ? 1 : 4) * e->n_threads;
        e->att_group = e->att_group_min;
        for (int g = c->n_kv_heads; g > e->att_group_min; g--) {
            if (c->n_kv_heads % g == 0 && per_unit_tasks * (c->n_kv_heads / g) >= min_tasks) {
                e->att_group = g;
                break;
            }
        }
        int n_groups = c->n_kv_heads / e->att_group;
        /* The cache is read cold (the weights streamed through since the last step):
         * threads pay off from a few dozen keys of a 768-wide model (measured, 110M F32,
         * batch 1 from position 1, 2 threads: attention 0.27 ms a step against 0.36
         * inline), far below the products' threshold. */
        struct kvr_threadpool *tp = work >= ATT_PARALLEL_MIN_WORK ? e->tp : NULL;
        if (!e->att_split) {
            kvr_threadpool_run(tp, unit_task, e, e->n_units * n_groups);
            return;
        }
        e->unit_task0[0] = 0;
        for (int u = 0, pc = 0; u < e->n_units; u++) {
            e->unit_task0[u + 1] = e->unit_task0[u] + e->unit_nch[u] * n_groups;
            e->unit_piece0[u] = pc;
            pc += e->unit_nch[u] > 1 ? e->unit_nch[u] : 0;
        }
        kvr_threadpool_run(tp, split_task, e, e->unit_task0[e->n_units]);
        for (int u = 0; u < e->n_units; u++) {
            if (e->unit_nch[u] == 1)
                continue;
            float *run = e->att_pieces + (size_t)e->unit_piece0[u] * e->piece_floats;
            for (int ch = 1; ch < e->unit_nch[u]; ch++)
                piece_merge(e, run, run + (size_t)ch * e->piece_floats, 0, c->n_heads);
            piece_finish(e, e->unit_row[u], run, 0, c->n_heads);
        }
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

int kvr_engine_check_item(const struct kvr_engine *e, const struct kvr_forward_item *it) {
    const struct kvr_model_config *c = e->c;
    if (!it->seq || !it->tokens || it->n_tokens < 1) {
        KVR_LOG_ERROR("an item is empty");
        return KVR_EINVAL;
    }
    if (it->seq->pool->n_layers != c->n_layers || it->seq->pool->kv_dim != c->kv_dim) {
        KVR_LOG_ERROR("item cache shape (layers %d, kv_dim %d) is not the model's", it->seq->pool->n_layers,
                      it->seq->pool->kv_dim);
        return KVR_EINVAL;
    }
    if (it->n_tokens > e->p.n_batch_tokens_max) {
        KVR_LOG_ERROR("an item of %d tokens, engine takes %d per call", it->n_tokens, e->p.n_batch_tokens_max);
        return KVR_EINVAL;
    }
    for (int t = 0; t < it->n_tokens; t++) {
        if (it->tokens[t] < 0 || it->tokens[t] >= c->vocab_size) {
            KVR_LOG_ERROR("token id %d outside the vocabulary [0, %d)", it->tokens[t], c->vocab_size);
            return KVR_EINVAL;
        }
    }
    const struct kvr_kv_seq *s = it->seq;
    if (s->policy.policy == KVR_KV_DENSE && (int64_t)s->n_past + it->n_tokens > s->n_tokens_max) {
        KVR_LOG_ERROR("a dense sequence would pass its %d tokens", s->n_tokens_max);
        return KVR_ECONTEXT;
    }
    int need = item_ctx_need(it);
    if (need > e->p.n_ctx_max) {
        KVR_LOG_ERROR("an item would attend %d keys, engine takes %d", need, e->p.n_ctx_max);
        return KVR_ECONTEXT;
    }
    return KVR_OK;
}

int kvr_engine_forward(struct kvr_engine *e, struct kvr_forward_item *items, int n_items) {
    const struct kvr_model_config *c = e->c;
    const struct kvr_model_weights *w = e->w;
    int d = c->dim, V = c->vocab_size;
    if (n_items < 1 || n_items > e->p.n_items_max) {
        KVR_LOG_ERROR("%d items, engine takes 1..%d", n_items, e->p.n_items_max);
        return KVR_EINVAL;
    }
    int T = 0;
    for (int i = 0; i < n_items; i++) {
        int rc = kvr_engine_check_item(e, &items[i]);
        if (rc != KVR_OK)
            return rc;
        T += items[i].n_tokens;
        if (T > e->p.n_batch_tokens_max) {
            KVR_LOG_ERROR("%d+ tokens in one call, engine takes %d", T, e->p.n_batch_tokens_max);
            return KVR_EINVAL;
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
    e->prompt_rows = NULL;
    int n_logit = 0;
    for (int i = 0, r = 0; i < n_items; i++) {
        struct kvr_forward_item *it = &items[i];
        struct kvr_kv_seq *s = it->seq;
        for (int t = 0; t < it->n_tokens; t++, r++) {
            int pos = s->n_past + t;
            e->row_item[r] = i;
            e->row_prompt[r] = it->prompt != 0;
            if (it->prompt)
                e->prompt_rows = e->row_prompt;
            e->row_pos[r] = pos;
            /* Queries of a sink sequence sit at their cache position. */
            int rpos = s->policy.policy == KVR_KV_SINK ? pos - kv_sink_delta(s, pos) : pos;
            if (rpos < e->n_rope) {
                e->row_rope[r] = rope_at(e, rpos);
            } else {
                float *row = e->rope_rows + (size_t)r * c->head_dim;
                rope_fill(row, rpos, c);
                e->row_rope[r] = row;
            }
            kvr_tensor_row(&w->token_embedding, it->tokens[t], e->x + (size_t)r * d);
            if (it->logits && (it->all_logits || t == it->n_tokens - 1)) {
                e->logit_row[n_logit] = r;
                e->logit_dst[n_logit++] = it->logits + (it->all_logits ? (size_t)t * V : 0);
            }
        }
    }

    for (int l = 0; l < c->n_layers; l++) {
        const struct kvr_layer_weights *lw = &w->layers[l];
        e->layer = l;
        run_rows(e, ROW_RMSNORM_ATT);
        /* Q, K and V in one parallel loop: one wake-up and one barrier. */
        struct kvr_matmul_op qkv[3] = {
            {.y = e->q, .x = e->xb, .w = &lw->wq, .m = T, .beta = 0.0f, .prompt_rows = e->prompt_rows},
            {.y = e->k, .x = e->xb, .w = &lw->wk, .m = T, .beta = 0.0f, .prompt_rows = e->prompt_rows},
            {.y = e->v, .x = e->xb, .w = &lw->wv, .m = T, .beta = 0.0f, .prompt_rows = e->prompt_rows}};
        kvr_matmul_multi(e->tp, e->ws, qkv, 3);
        run_rows(e, ROW_ROPE_STORE);
        if (e->layer_hook)
            e->layer_hook(e->layer_hook_ud, items, n_items, l);
        attention(e);
        struct kvr_matmul_op wo = {.y = e->x, .x = e->xb2, .w = &lw->wo, .m = T, .beta = 1.0f,
                                   .prompt_rows = e->prompt_rows};
        kvr_matmul_multi(e->tp, e->ws, &wo, 1);
        run_rows(e, ROW_RMSNORM_FFN);
        ffn_up(e, &lw->w1, &lw->w3);
        struct kvr_matmul_op w2 = {.y = e->x, .x = e->hb, .w = &lw->w2, .m = T, .beta = 1.0f,
                                   .prompt_rows = e->prompt_rows};
        kvr_matmul_multi(e->tp, e->ws, &w2, 1);
    }

    /* Classifier only for the rows that want logits, LOGIT_ROWS at a time. */
    for (int i = 0; i < n_logit; i++)
        rmsnorm(e->xb + (size_t)i * d, e->x + (size_t)e->logit_row[i] * d, w->rms_final, d, c->norm_eps);
    for (int i0 = 0; i0 < n_logit; i0 += LOGIT_ROWS) {
        int m = n_logit - i0 < LOGIT_ROWS ? n_logit - i0 : LOGIT_ROWS;
        kvr_matmul(e->tp, e->ws, e->logit_rows, e->xb + (size_t)i0 * d, &w->wcls, m, 0.0f);
        for (int i = 0; i < m; i++)
            memcpy(e->logit_dst[i0 + i], e->logit_rows + (size_t)i * V, (size_t)V * sizeof(float));
    }

    for (int i = 0; i < n_items; i++)
        kvr_kv_seq_advance(items[i].seq, items[i].n_tokens);
    e->items = NULL;
    return KVR_OK;
}
