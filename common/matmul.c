/* matmul.c - kvr_matmul and its single-threaded slice (matmul.h).
 * Few rows (decode, m <= KVR_MATMUL_SMALL_M): a hand-written AVX2/FMA kernel in dot-product
 * form that streams each weight row from memory once for all m rows, so a decode step of B
 * sequences reads the weights once. Many rows (prefill): single-threaded OpenBLAS sgemm per
 * slice. Either way the output features are cut into slices claimed by our own threads, so
 * OpenBLAS never runs threads of its own beside ours. */
#include "matmul.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "kernels.h"
#include "log.h"
#include "status.h"
#include "threadpool.h"

void kvr_matmul_init(void) { openblas_set_num_threads(1); }

struct kvr_matmul_ws {
    float *slot[KVR_MATMUL_WS_SLOTS];
    size_t slot_nfloats[KVR_MATMUL_WS_SLOTS];
    /* Prompt rows of each slot widened back to f32 for the prefill GEMM; allocated at the
     * first prompt (decode-only engines never pay for them). */
    float *wide[KVR_MATMUL_WS_SLOTS];
    size_t wide_nfloats[KVR_MATMUL_WS_SLOTS];
};

int kvr_matmul_ws_create(const struct kvr_matmul_ws_params *p, struct kvr_matmul_ws **out) {
    *out = NULL;
    if (p->m_max < 1)
        return KVR_EINVAL;
    struct kvr_matmul_ws *ws = calloc(1, sizeof *ws);
    if (!ws)
        return KVR_ENOMEM;
    for (int i = 0; i < KVR_MATMUL_WS_SLOTS; i++) {
        if (p->k_max[i] < 0) {
            kvr_matmul_ws_free(ws);
            return KVR_EINVAL;
        }
        if (p->k_max[i] == 0)
            continue;
        /* Sized as float32 rows, more than any converted row takes (Q8_0 is 34/32 bytes
         * per value, F16/BF16 2): the slot fits any type. */
        ws->slot_nfloats[i] = (size_t)p->m_max * (size_t)p->k_max[i];
        if (!(ws->slot[i] = malloc(ws->slot_nfloats[i] * sizeof(float)))) {
            kvr_matmul_ws_free(ws);
            return KVR_ENOMEM;
        }
    }
    *out = ws;
    return KVR_OK;
}

void kvr_matmul_ws_free(struct kvr_matmul_ws *ws) {
    if (!ws)
        return;
    for (int i = 0; i < KVR_MATMUL_WS_SLOTS; i++) {
        free(ws->slot[i]);
        free(ws->wide[i]);
    }
    free(ws);
}

static int ws_fits(const struct kvr_matmul_ws *ws, int slot, int m, int k) {
    return ws && slot >= 0 && slot < KVR_MATMUL_WS_SLOTS &&
           (size_t)m * (size_t)k <= ws->slot_nfloats[slot];
}

/* Whether prompt rows over weights of type t take the AVX512-BF16 GEMM (kernels.h
 * gemm_panel_bf16), which reads the bf16 rows themselves: they get no widened copy. */
static int bf16_gemm(const struct kvr_kernels *K, enum kvr_dtype t) {
    return t == KVR_DTYPE_BF16 && K->gemm_panel_bf16 != NULL;
}

struct prep_job {
    const struct kvr_kernels *K;
    const float *x;
    char *xc;
    float *xw;
    const unsigned char *prompt_rows;
    enum kvr_dtype type;
    int m, k;
    size_t xb;
};

#define PREP_ROWS 16

static void prep_task(void *arg, int task, int thread) {
    (void)thread;
    const struct prep_job *j = arg;
    int i1 = (task + 1) * PREP_ROWS < j->m ? (task + 1) * PREP_ROWS : j->m;
    enum kvr_dtype dt = kvr_dtype_dot(j->type);
    for (int i = task * PREP_ROWS; i < i1; i++) {
        char *dst = j->xc + (size_t)i * j->xb;
        kvr_act_convert_row(j->type, j->x + (size_t)i * (size_t)j->k, dst, j->k);
        if (j->xw && j->prompt_rows[i])
            j->K->widen(dt, dst, j->xw + (size_t)i * (size_t)j->k, j->k);
    }
}

void kvr_matmul_act_prepare_rows(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws, int slot, const float *x,
                                 int m, int k, enum kvr_dtype type, const unsigned char *prompt_rows,
                                 struct kvr_matmul_act *a) {
    *a = (struct kvr_matmul_act){.x = x, .xc = NULL, .type = type, .m = m, .k = k, .prompt_rows = prompt_rows};
    if (type == KVR_DTYPE_F32)
        return;
    KVR_ASSERT(ws_fits(ws, slot, m, k));
    struct prep_job j = {.K = kvr_kernels(), .x = x, .xc = (char *)ws->slot[slot], .prompt_rows = prompt_rows,
                         .type = type, .m = m, .k = k,
                         .xb = kvr_dtype_row_nbytes(kvr_dtype_dot(type), k)};
    if (prompt_rows && !bf16_gemm(j.K, type)) {
        size_t need = (size_t)m * (size_t)k;
        if (need > ws->wide_nfloats[slot]) {
            free(ws->wide[slot]);
            ws->wide[slot] = malloc(ws->slot_nfloats[slot] * sizeof(float)); /* the slot's size: once */
            ws->wide_nfloats[slot] = ws->wide[slot] ? ws->slot_nfloats[slot] : 0;
        }
        /* Without the buffer each task widens its own copy (the same values). */
        j.xw = ws->wide[slot];
    }
    int n_tasks = (m + PREP_ROWS - 1) / PREP_ROWS;
    kvr_threadpool_run(m >= 4 * PREP_ROWS ? tp : NULL, prep_task, &j, n_tasks);
    a->xc = ws->slot[slot];
    a->xw = j.xw;
}

void kvr_matmul_act_prepare(struct kvr_matmul_ws *ws, int slot, const float *x, int m, int k,
                            enum kvr_dtype type, struct kvr_matmul_act *a) {
    kvr_matmul_act_prepare_rows(NULL, ws, slot, x, m, k, type, NULL, a);
}

/* ---- prefill GEMM on dequantized panels ------------------------------------------- */

/* Each thread's panel buffer (KVR_GEMM_NR weight columns of k values, k-major, plus one
 * row of k values to dequantize into), grown as needed and freed when the thread ends
 * (the key's destructor; the calling thread's stays reachable until the process ends). */
static pthread_key_t panel_key;
static pthread_once_t panel_once = PTHREAD_ONCE_INIT;
static _Thread_local float *panel_buf;
static _Thread_local size_t panel_nfloats;

static void panel_key_make(void) {
    if (pthread_key_create(&panel_key, free) != 0)
        KVR_LOG_ERROR("matmul: no thread key for the prefill panels");
}

static float *panel_get(size_t nfloats) {
    if (nfloats <= panel_nfloats)
        return panel_buf;
    pthread_once(&panel_once, panel_key_make);
    size_t bytes = (nfloats * sizeof(float) + 63) & ~(size_t)63;
    float *p = aligned_alloc(64, bytes);
    if (!p)
        return NULL;
    free(panel_buf);
    panel_buf = p;
    panel_nfloats = nfloats;
    pthread_setspecific(panel_key, p);
    return p;
}

/* y[i][j] for i < m, n0 <= j < n1 on the prefill GEMM path. The activations are the
 * rows the per-value path uses, already rounded to the weights' dot type (xc: F16, BF16
 * or Q8_0 blocks, as llama.cpp rounds them), widened back to f32 exactly; the weights,
 * KVR_GEMM_NR rows at a time, dequantized exactly (F16/BF16 widen, Q8_0's d x q fits
 * f32) into a k-major panel; then the kernel over all m rows. BF16 weights where the
 * kernels have AVX512-BF16 (K->gemm_panel_bf16): the bf16 rows xc as they are, the
 * weights packed as bf16 pairs, vdpbf16ps (kernels.h). xf: the f32 rows (F32 weights, or
 * the widened copy) or NULL. 0, or -1 when no buffer could be allocated. */
static int prompt_gemm(const struct kvr_kernels *K, float *y, int ldy, const float *xf, const void *xc, size_t xs,
                       int m, int k, const struct kvr_tensor *w, int n0, int n1, float beta) {
    if (bf16_gemm(K, w->type)) {
        /* AVX512-BF16: the bf16 rows as they are against a panel of bf16 pairs. */
        size_t pw = (size_t)KVR_GEMM_NR * (size_t)((k + 1) / 2);
        uint32_t *wp = (uint32_t *)panel_get((pw * sizeof(uint32_t) + sizeof(float) - 1) / sizeof(float));
        if (!wp)
            return -1;
        for (int j0 = n0; j0 < n1; j0 += KVR_GEMM_NR) {
            int nn = n1 - j0 < KVR_GEMM_NR ? n1 - j0 : KVR_GEMM_NR;
            K->gemm_pack_bf16(wp, (const char *)w->data + (size_t)j0 * w->row_nbytes, w->row_nbytes, nn, k);
            K->gemm_panel_bf16(y + j0, (size_t)ldy, xc, xs / sizeof(uint16_t), m, wp, nn, k, beta);
        }
        return 0;
    }
    size_t pn = (size_t)KVR_GEMM_NR * (size_t)k;
    /* F32 weights, or rows already widened: xf as it is; else xc's rows widened here. */
    int f32 = xf != NULL;
    float *panel = panel_get(pn + (size_t)k + (f32 ? 0 : (size_t)m * (size_t)k));
    if (!panel)
        return -1;
    float *row = panel + pn, *x = f32 ? (float *)(uintptr_t)xf : row + k;
    enum kvr_dtype xt = kvr_dtype_dot(w->type);
    for (int i = 0; !f32 && i < m; i++)
        K->widen(xt, (const char *)xc + (size_t)i * xs, x + (size_t)i * (size_t)k, k);
    for (int j0 = n0; j0 < n1; j0 += KVR_GEMM_NR) {
        int nn = n1 - j0 < KVR_GEMM_NR ? n1 - j0 : KVR_GEMM_NR;
        for (int jj = 0; jj < KVR_GEMM_NR; jj++) {
            if (jj < nn) {
                K->widen(w->type, (const char *)w->data + (size_t)(j0 + jj) * w->row_nbytes, row, k);
                for (int t = 0; t < k; t++)
                    panel[(size_t)t * KVR_GEMM_NR + (size_t)jj] = row[t];
            } else {
                for (int t = 0; t < k; t++)
                    panel[(size_t)t * KVR_GEMM_NR + (size_t)jj] = 0.0f;
            }
        }
        K->gemm_panel(y + j0, (size_t)ldy, x, (size_t)k, m, panel, nn, k, beta);
    }
    return 0;
}

/* ---- entry points ---------------------------------------------------------------- */

/* Rows [i0, i0 + m) of a product on the per-value / F32 kernels (no prompt rows). */
static void slice_plain(const struct kvr_kernels *K, float *y, int ldy, const struct kvr_matmul_act *a,
                        const struct kvr_tensor *w, int n0, int n1, float beta, int i0, int m) {
    int k = a->k;
    y += (size_t)i0 * (size_t)ldy;
    /* Non-F32 weights: the rows kernel, whose values depend on nothing but their weight
     * row and activation row. F32: the rows kernel for a few rows (it streams the weights
     * at the memory's pace), the blocked kernels up to KVR_MATMUL_SMALL_M rows, OpenBLAS
     * above. */
    if (w->type != KVR_DTYPE_F32 || m <= K->f32_rows_max_m) {
        size_t xs = kvr_dtype_row_nbytes(kvr_dtype_dot(w->type), k);
        const void *xc = w->type == KVR_DTYPE_F32 ? (const void *)a->x : a->xc;
        K->rows(w->type, y + n0, (size_t)ldy, (const char *)w->data + (size_t)n0 * w->row_nbytes,
                w->row_nbytes, n1 - n0, (const char *)xc + (size_t)i0 * xs, xs, m, k, beta);
        return;
    }
    const float *x = a->x + (size_t)i0 * (size_t)k, *wf = w->data;
    if (m <= KVR_MATMUL_SMALL_M) {
        K->f32_small(y, ldy, x, wf, m, n0, n1, k, beta);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n1 - n0, k, 1.0f, x, k,
                wf + (size_t)n0 * (size_t)k, k, beta, y + n0, ldy);
}

void kvr_matmul_slice(float *y, int ldy, const struct kvr_matmul_act *a,
                      const struct kvr_tensor *w, int n0, int n1, float beta) {
    int m = a->m, k = a->k;
    if (n1 <= n0 || m <= 0)
        return;
    KVR_ASSERT(a->type == w->type && (int64_t)k == w->cols && n1 <= w->rows);
    const struct kvr_kernels *K = kvr_kernels();
    if (!a->prompt_rows) {
        slice_plain(K, y, ldy, a, w, n0, n1, beta, 0, m);
        return;
    }
    /* Runs of prompt rows on the prefill GEMM, runs of other rows as above. */
    size_t xs = kvr_dtype_row_nbytes(kvr_dtype_dot(w->type), k);
    for (int i = 0; i < m;) {
        int g = a->prompt_rows[i] != 0, e = i + 1;
        while (e < m && (a->prompt_rows[e] != 0) == g)
            e++;
        /* The converted rows (NULL for F32) and the f32 ones if there (F32: x itself;
         * else the widened copy, absent for BF16 on AVX512-BF16 or when the copy could
         * not be allocated: prompt_gemm widens or reads xc then). */
        const char *xci = w->type == KVR_DTYPE_F32 ? NULL : (const char *)a->xc + (size_t)i * xs;
        const float *xf0 = w->type == KVR_DTYPE_F32 ? a->x : a->xw;
        const float *xf = xf0 ? xf0 + (size_t)i * (size_t)k : NULL;
        if (!g || prompt_gemm(K, y + (size_t)i * (size_t)ldy, ldy, xf, xci, xs, e - i, k, w, n0, n1, beta) != 0)
            slice_plain(K, y, ldy, a, w, n0, n1, beta, i, e - i);
        i = e;
    }
}

int kvr_matmul_chunk(int m, int n, size_t row_nbytes, int n_threads) {
    int c;
    if (m <= KVR_MATMUL_SMALL_M) {
        /* About 256 KiB of weights per task (in the weights' own type), at least 4 tasks
         * per thread, whole 16-row groups: long sequential streams (every task start is
         * a cold stream for the prefetchers; 64 KiB tasks cost Q8_0 decode a third of
         * its speed), still enough tasks that threads stay balanced when another process
         * takes a core for a while. */
        c = (int)((256L * 1024) / (long)row_nbytes);
        int per = (n + 4 * n_threads - 1) / (4 * n_threads);
        if (c > per)
            c = per;
        c = (c + 15) & ~15;
        if (c < 16)
            c = 16;
    } else {
        /* OpenBLAS packs x again for every call: a few fat slices per thread. */
        c = (n + 4 * n_threads - 1) / (4 * n_threads);
        c = (c + 15) & ~15;
        if (c < 64)
            c = 64;
    }
    return c < n ? c : n;
}

/* ---- batch 1: one range of rows per thread ------------------------------------- */

/* Batch 1 reads every weight once per step, so a step runs at the memory's pace only
 * while every thread streams: each thread owns one contiguous range of each product
 * (one sequential stream the hardware prefetchers follow, no cold restarts inside it)
 * and the ends are balanced by taking from the back of the others' ranges. A claim takes
 * 1/div of what is left (at least a slice): few claims while a range is long, single
 * slices at its end, so the threads finish within one claim of each other whatever pace
 * each had (a thread slowed by a busy core leaves its tail to the other). */
#define B1_SLICE 16      /* rows per slice: whole 16-row groups (the Q8_0 kernel's) */
#define B1_MAX_RANGES 16 /* threads past this own no range: they only take from the backs */

/* A range's unclaimed slices [lo, hi) as hi << 32 | lo, on a cache line of its own. */
struct b1_range {
    _Alignas(64) _Atomic uint64_t lohi;
};

struct b1_job {
    void (*fn)(void *arg, int part, int r0, int r1, int thread);
    void *arg;
    int n_parts, n_ranges, div;
    int n_rows[KVR_MATMUL_MAX_OPS];
    struct b1_range r[KVR_MATMUL_MAX_OPS][B1_MAX_RANGES];
};

/* Claims 1/div of what is left of r (at least one slice), from its front or its back:
 * slices [*s0, *s0 + returned count); 0 when r is empty. */
static int b1_take(struct b1_range *r, int back, int div, int *s0) {
    uint64_t v = atomic_load_explicit(&r->lohi, memory_order_relaxed);
    for (;;) {
        uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
        if (lo >= hi)
            return 0;
        uint32_t n = (hi - lo + (uint32_t)div - 1) / (uint32_t)div;
        uint64_t nv = back ? (uint64_t)(hi - n) << 32 | lo : (uint64_t)hi << 32 | (lo + n);
        if (atomic_compare_exchange_weak_explicit(&r->lohi, &v, nv, memory_order_relaxed, memory_order_relaxed)) {
            *s0 = (int)(back ? hi - n : lo);
            return (int)n;
        }
    }
}

static void b1_rows(const struct b1_job *j, int p, int s0, int n, int thread) {
    int r1 = (s0 + n) * B1_SLICE;
    j->fn(j->arg, p, s0 * B1_SLICE, r1 < j->n_rows[p] ? r1 : j->n_rows[p], thread);
}

static void b1_task(void *arg, int task, int thread) {
    (void)task;
    struct b1_job *j = arg;
    int s0, n;
    if (thread < j->n_ranges)
        for (int p = 0; p < j->n_parts; p++)
            while ((n = b1_take(&j->r[p][thread], 0, j->div, &s0)) > 0)
                b1_rows(j, p, s0, n, thread);
    /* The others' tails, last part first (the others work through the parts in order). */
    for (int p = j->n_parts - 1; p >= 0; p--)
        for (int d = 1; d <= j->n_ranges; d++)
            while ((n = b1_take(&j->r[p][(thread + d) % j->n_ranges], 1, j->div, &s0)) > 0)
                b1_rows(j, p, s0, n, thread);
}

int kvr_matmul_b1_div(enum kvr_dtype t) {
    /* Measured (110M, 2 threads, the variants interleaved step by step in one process,
     * 400 steps; docs/PERFORMANCE.md round 7), step time against the earlier fixed split
     * (F32: 8 slices per thread handed out in turn; the others: one range per thread):
     * F32 div 4 -2 to -5% (div 2 no gain, 6 and 8 less); F16 and BF16 div 3 -3 to -7%
     * (div 2 about as good, 4 slower); Q8_0 +13-21% for div 2, so one claim: each call of
     * its kernel starts a 16-row group without the prefetch the previous group issues. */
    switch (t) {
    case KVR_DTYPE_F32: return 4;
    case KVR_DTYPE_F16:
    case KVR_DTYPE_BF16: return 3;
    default: return 1;
    }
}

void kvr_matmul_b1_run(struct kvr_threadpool *tp, int n_parts, const int *n_rows, int div,
                       void (*fn)(void *arg, int part, int r0, int r1, int thread), void *arg) {
    KVR_ASSERT(n_parts >= 1 && n_parts <= KVR_MATMUL_MAX_OPS && div >= 1);
    struct b1_job j = {.fn = fn, .arg = arg, .n_parts = n_parts, .div = div};
    int nt = kvr_threadpool_n_threads(tp);
    j.n_ranges = nt < B1_MAX_RANGES ? nt : B1_MAX_RANGES;
    for (int p = 0; p < n_parts; p++) {
        j.n_rows[p] = n_rows[p];
        uint64_t n_sl = ((uint64_t)n_rows[p] + B1_SLICE - 1) / B1_SLICE;
        for (int r = 0; r < j.n_ranges; r++) {
            uint64_t lo = n_sl * (uint64_t)r / (uint64_t)j.n_ranges, hi = n_sl * (uint64_t)(r + 1) / (uint64_t)j.n_ranges;
            atomic_init(&j.r[p][r].lohi, hi << 32 | lo);
        }
    }
    kvr_threadpool_run(tp, b1_task, &j, nt);
}

/* ---- products of any batch ------------------------------------------------------ */

struct mm_job {
    const struct kvr_matmul_op *ops;
    int n_ops;
    struct kvr_matmul_act act[KVR_MATMUL_MAX_OPS];
    int task0[KVR_MATMUL_MAX_OPS + 1]; /* first task of each op; task0[n_ops] = total */
    int chunk[KVR_MATMUL_MAX_OPS];
};

static void mm_task(void *arg, int task, int thread) {
    (void)thread;
    const struct mm_job *j = arg;
    int o = 0;
    while (task >= j->task0[o + 1])
        o++;
    const struct kvr_matmul_op *op = &j->ops[o];
    int i = task - j->task0[o];
    int n0 = i * j->chunk[o];
    int n = (int)op->w->rows;
    int n1 = n0 + j->chunk[o] < n ? n0 + j->chunk[o] : n;
    kvr_matmul_slice(op->y, n, &j->act[o], op->w, n0, n1, op->beta);
}

static void mm_b1_rows(void *arg, int o, int r0, int r1, int thread) {
    (void)thread;
    const struct mm_job *j = arg;
    const struct kvr_matmul_op *op = &j->ops[o];
    kvr_matmul_slice(op->y, (int)op->w->rows, &j->act[o], op->w, r0, r1, op->beta);
}

void kvr_matmul_multi(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws,
                      const struct kvr_matmul_op *ops, int n_ops) {
    KVR_ASSERT(n_ops >= 1 && n_ops <= KVR_MATMUL_MAX_OPS);
    struct mm_job j = {.ops = ops, .n_ops = n_ops};
    int nt = kvr_threadpool_n_threads(tp);
    long work = 0;
    int b1 = 1, div = 1 << 30, n_rows[KVR_MATMUL_MAX_OPS];
    int slot_used[KVR_MATMUL_WS_SLOTS] = {0};
    j.task0[0] = 0;
    for (int o = 0; o < n_ops; o++) {
        const struct kvr_matmul_op *op = &ops[o];
        int n = (int)op->w->rows, k = (int)op->w->cols;
        /* One conversion per distinct (x, type): Q, K and V of one type share theirs. */
        int shared = -1;
        for (int p = 0; p < o && shared < 0; p++)
            if (ops[p].x == op->x && ops[p].w->type == op->w->type && ops[p].m == op->m &&
                ops[p].prompt_rows == op->prompt_rows)
                shared = p;
        if (shared >= 0) {
            j.act[o] = j.act[shared];
        } else {
            int slot = -1;
            if (op->w->type != KVR_DTYPE_F32)
                for (int s = 0; s < KVR_MATMUL_WS_SLOTS && slot < 0; s++)
                    if (!slot_used[s] && ws_fits(ws, s, op->m, k))
                        slot = s;
            if (slot >= 0)
                slot_used[slot] = 1;
            kvr_matmul_act_prepare_rows(tp, ws, slot, op->x, op->m, k, op->w->type, op->prompt_rows, &j.act[o]);
        }
        j.chunk[o] = kvr_matmul_chunk(op->m, n, op->w->row_nbytes, nt);
        n_rows[o] = n;
        b1 &= op->m == 1;
        int d = kvr_matmul_b1_div(op->w->type);
        div = d < div ? d : div;
        j.task0[o + 1] = j.task0[o] + (n + j.chunk[o] - 1) / j.chunk[o];
        work += (long)op->m * n * k;
    }
    /* Tiny problems (the bundled model) are not worth waking threads for. */
    struct kvr_threadpool *run_tp = work >= KVR_PARALLEL_MIN_WORK ? tp : NULL;
    if (b1)
        kvr_matmul_b1_run(run_tp, n_ops, n_rows, div, mm_b1_rows, &j);
    else
        kvr_threadpool_run(run_tp, mm_task, &j, j.task0[n_ops]);
}

void kvr_matmul(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws, float *y, const float *x,
                const struct kvr_tensor *w, int m, float beta) {
    struct kvr_matmul_op op = {.y = y, .x = x, .w = w, .m = m, .beta = beta};
    kvr_matmul_multi(tp, ws, &op, 1);
}
