/* matmul.c - kvr_matmul and its single-threaded slice (matmul.h).
 * Few rows (decode, m <= KVR_MATMUL_SMALL_M): a hand-written AVX2/FMA kernel in dot-product
 * form that streams each weight row from memory once for all m rows, so a decode step of B
 * sequences reads the weights once. Many rows (prefill): single-threaded OpenBLAS sgemm per
 * slice. Either way the output features are cut into slices claimed by our own threads, so
 * OpenBLAS never runs threads of its own beside ours. */
#include "matmul.h"

#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MM_AVX2 1
#endif

#include "log.h"
#include "status.h"
#include "threadpool.h"

void kvr_matmul_init(void) { openblas_set_num_threads(1); }

/* ---- the few-rows kernel --------------------------------------------------------- */

#ifdef MM_AVX2
/* Dot products (length k) of MR rows of x with 4 rows of w (ldw floats apart), written to
 * y[i][0..3] (plus beta times their old value). MR is a literal at every call site: the
 * accumulators (MR x 4 ymm) stay in registers (MR <= 3: 12 accumulators + 4 weight
 * registers, x read as a memory operand). */
static inline __attribute__((always_inline)) void
kern4(int MR, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int k,
      float beta) {
    __m256 acc[3][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++)
            acc[i][j] = _mm256_setzero_ps();
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * (size_t)ldw, *w3 = w + 3 * (size_t)ldw;
    int kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 b0 = _mm256_loadu_ps(w0 + kk), b1 = _mm256_loadu_ps(w1 + kk);
        __m256 b2 = _mm256_loadu_ps(w2 + kk), b3 = _mm256_loadu_ps(w3 + kk);
        for (int i = 0; i < MR; i++) {
            __m256 a = _mm256_loadu_ps(x + (size_t)i * ldx + kk);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
            acc[i][2] = _mm256_fmadd_ps(a, b2, acc[i][2]);
            acc[i][3] = _mm256_fmadd_ps(a, b3, acc[i][3]);
        }
    }
    for (int i = 0; i < MR; i++) {
        /* Four horizontal sums at once: lanes end up as (row 0, 1, 2, 3). */
        __m256 s01 = _mm256_hadd_ps(acc[i][0], acc[i][1]);
        __m256 s23 = _mm256_hadd_ps(acc[i][2], acc[i][3]);
        __m256 s = _mm256_hadd_ps(s01, s23);
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        const float *xi = x + (size_t)i * ldx;
        if (kk < k) {
            float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int q = kk; q < k; q++) {
                t[0] += xi[q] * w0[q];
                t[1] += xi[q] * w1[q];
                t[2] += xi[q] * w2[q];
                t[3] += xi[q] * w3[q];
            }
            r = _mm_add_ps(r, _mm_loadu_ps(t));
        }
        float *yi = y + (size_t)i * ldy;
        if (beta != 0.0f)
            r = _mm_fmadd_ps(_mm_set1_ps(beta), _mm_loadu_ps(yi), r);
        _mm_storeu_ps(yi, r);
    }
}

static float dot1(const float *a, const float *b, int k) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= k; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= k; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    r = _mm_hadd_ps(r, r);
    r = _mm_hadd_ps(r, r);
    float s = _mm_cvtss_f32(r);
    for (; i < k; i++)
        s += a[i] * b[i];
    return s;
}
#else
static float dot1(const float *a, const float *b, int k) {
    /* Four partial sums: the compiler may not reassociate one. */
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int i = 0;
    for (; i + 4 <= k; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < k; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}
#endif

#ifdef MM_AVX2
/* ---- the packed kernel (13 or more rows) --------------------------------------------
 * In dot-product form every FMA needs two loads and the sums need horizontal reductions;
 * from a dozen rows up, the weights are better transposed once into a panel
 * wp[kc][16] (16 weight rows side by side) and multiplied in outer-product form: per k,
 * two aligned panel loads and one broadcast of x per row feed 2 FMAs per row, with a
 * 6 x 16 tile of y in 12 registers. Measured on this machine's Zen 3 cores at m = 32 with
 * the weights in L2: ~75 GFLOP/s per core against ~43 for the dot form and ~60 for
 * OpenBLAS sgemm (streamed from DRAM in place: ~48, see docs/perf/engine.md). */
#define NR 16  /* weight rows per panel: two ymm of y */
#define MR 6   /* rows of x per tile */
#define KC 256 /* k per panel: 16 KiB, stays in L1 while the x rows stream through */

/* Transposes rows [0, nr) (nr <= 16) of w, k range [0, kc), into wp[kc][16]; rows past
 * nr are zero. Full 8 x 8 blocks go through registers (24 shuffles per 64 floats). */
static void pack_panel(float *wp, const float *w, int ldw, int nr, int kc) {
    int kk = 0;
    if (nr == NR) {
        for (; kk + 8 <= kc; kk += 8) {
            for (int h = 0; h < 2; h++) {
                const float *r = w + (size_t)h * 8 * (size_t)ldw + kk;
                __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + ldw);
                __m256 r2 = _mm256_loadu_ps(r + 2 * (size_t)ldw), r3 = _mm256_loadu_ps(r + 3 * (size_t)ldw);
                __m256 r4 = _mm256_loadu_ps(r + 4 * (size_t)ldw), r5 = _mm256_loadu_ps(r + 5 * (size_t)ldw);
                __m256 r6 = _mm256_loadu_ps(r + 6 * (size_t)ldw), r7 = _mm256_loadu_ps(r + 7 * (size_t)ldw);
                __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
                __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
                __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
                __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
                __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                float *o = wp + (size_t)kk * NR + (size_t)h * 8;
                _mm256_store_ps(o + 0 * NR, _mm256_permute2f128_ps(s0, s4, 0x20));
                _mm256_store_ps(o + 1 * NR, _mm256_permute2f128_ps(s1, s5, 0x20));
                _mm256_store_ps(o + 2 * NR, _mm256_permute2f128_ps(s2, s6, 0x20));
                _mm256_store_ps(o + 3 * NR, _mm256_permute2f128_ps(s3, s7, 0x20));
                _mm256_store_ps(o + 4 * NR, _mm256_permute2f128_ps(s0, s4, 0x31));
                _mm256_store_ps(o + 5 * NR, _mm256_permute2f128_ps(s1, s5, 0x31));
                _mm256_store_ps(o + 6 * NR, _mm256_permute2f128_ps(s2, s6, 0x31));
                _mm256_store_ps(o + 7 * NR, _mm256_permute2f128_ps(s3, s7, 0x31));
            }
        }
    }
    for (; kk < kc; kk++)
        for (int j = 0; j < NR; j++)
            wp[(size_t)kk * NR + j] = j < nr ? w[(size_t)j * ldw + kk] : 0.0f;
}

/* y[i][0..nr) = t[i][0..nr) + beta * y[i][..] for i < R, t (R, 16). Kept apart from
 * tile(): with these branches after its loop, GCC gave the accumulators stack slots that
 * it stored on every iteration (measured 2.5x slower). */
static void merge_tile(float *y, int ldy, const float *t, int R, int nr, float beta) {
    for (int i = 0; i < R; i++) {
        float *yi = y + (size_t)i * ldy;
        const float *ti = t + (size_t)i * NR;
        if (nr == NR) {
            __m256 a0 = _mm256_load_ps(ti), a1 = _mm256_load_ps(ti + 8);
            if (beta != 0.0f) {
                __m256 vb = _mm256_set1_ps(beta);
                a0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(yi), a0);
                a1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(yi + 8), a1);
            }
            _mm256_storeu_ps(yi, a0);
            _mm256_storeu_ps(yi + 8, a1);
        } else if (beta == 0.0f) {
            memcpy(yi, ti, (size_t)nr * sizeof(float));
        } else {
            for (int j = 0; j < nr; j++)
                yi[j] = ti[j] + beta * yi[j];
        }
    }
}

/* y[i][0..nr) (nr <= 16) += or = the products of R rows of x (ldx apart, kc long) with a
 * packed panel; beta applies to y's old value. R is a literal at every call site. */
static inline __attribute__((always_inline)) void
tile(int R, float *y, int ldy, const float *x, int ldx, const float *wp, int kc, float beta, int nr) {
    __m256 acc[MR][2];
    for (int i = 0; i < R; i++) {
        acc[i][0] = _mm256_setzero_ps();
        acc[i][1] = _mm256_setzero_ps();
    }
    for (int kk = 0; kk < kc; kk++) {
        __m256 b0 = _mm256_load_ps(wp + (size_t)kk * NR), b1 = _mm256_load_ps(wp + (size_t)kk * NR + 8);
        for (int i = 0; i < R; i++) {
            __m256 a = _mm256_broadcast_ss(x + (size_t)i * ldx + kk);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    _Alignas(32) float t[MR * NR];
    for (int i = 0; i < R; i++) {
        _mm256_store_ps(t + (size_t)i * NR, acc[i][0]);
        _mm256_store_ps(t + (size_t)i * NR + 8, acc[i][1]);
    }
    merge_tile(y, ldy, t, R, nr, beta);
}

static void packed_m(float *y, int ldy, const float *x, const float *w, int m, int n0, int n1,
                     int k, float beta) {
    _Alignas(64) float wp[KC * NR]; /* 16 KiB on the stack: no allocation per call */
    for (int j = n0; j < n1; j += NR) {
        int nr = n1 - j < NR ? n1 - j : NR;
        for (int k0 = 0; k0 < k; k0 += KC) {
            int kc = k - k0 < KC ? k - k0 : KC;
            float b = k0 == 0 ? beta : 1.0f; /* later pieces add to the partial sums */
            pack_panel(wp, w + (size_t)j * (size_t)k + k0, k, nr, kc);
            const float *xk = x + k0;
            float *yj = y + j;
            int i = 0;
            for (; i + MR <= m; i += MR)
                tile(MR, yj + (size_t)i * ldy, ldy, xk + (size_t)i * k, k, wp, kc, b, nr);
            switch (m - i) {
            case 5: tile(5, yj + (size_t)i * ldy, ldy, xk + (size_t)i * k, k, wp, kc, b, nr); break;
            case 4: tile(4, yj + (size_t)i * ldy, ldy, xk + (size_t)i * k, k, wp, kc, b, nr); break;
            case 3: tile(3, yj + (size_t)i * ldy, ldy, xk + (size_t)i * k, k, wp, kc, b, nr); break;
            case 2: tile(2, yj + (size_t)i * ldy, ldy, xk + (size_t)i * k, k, wp, kc, b, nr); break;
            case 1: tile(1, yj + (size_t)i * ldy, ldy, xk + (size_t)i * k, k, wp, kc, b, nr); break;
            default: break;
            }
        }
    }
}
#endif

/* y[i][j] for i < m, j in [n0, n1), few rows: weights outermost, so each block of 4
 * weight rows is read from memory once and reused from L1 or L2 for every row of x. */
static void small_m(float *y, int ldy, const float *x, const float *w, int m, int n0, int n1,
                    int k, float beta) {
    int j = n0;
#ifdef MM_AVX2
    /* Crossover measured in place (weights streamed from DRAM, TinyLlama shapes, one
     * core): at 8 rows the dot form does 28 GFLOP per CPU-second against 21 for the packed
     * kernel, whose 1 KiB pieces of 16 rows stream from memory worse than 4 whole rows;
     * equal near 16 rows; at 24 rows packed does 43 against 36. */
    if (m > 12) {
        packed_m(y, ldy, x, w, m, n0, n1, k, beta);
        return;
    }
    for (; j + 4 <= n1; j += 4) {
        const float *wj = w + (size_t)j * (size_t)k;
        int i = 0;
        for (; i + 3 <= m; i += 3)
            kern4(3, y + (size_t)i * ldy + j, ldy, x + (size_t)i * k, k, wj, k, k, beta);
        if (m - i == 2)
            kern4(2, y + (size_t)i * ldy + j, ldy, x + (size_t)i * k, k, wj, k, k, beta);
        else if (m - i == 1)
            kern4(1, y + (size_t)i * ldy + j, ldy, x + (size_t)i * k, k, wj, k, k, beta);
    }
#endif
    for (; j < n1; j++) {
        const float *wj = w + (size_t)j * (size_t)k;
        for (int i = 0; i < m; i++) {
            float *yij = y + (size_t)i * ldy + j;
            float d = dot1(x + (size_t)i * k, wj, k);
            *yij = beta != 0.0f ? d + beta * *yij : d;
        }
    }
}

/* ---- other weight types (quant.h) ------------------------------------------------- */

/* Every value is one call of the type's kernel, whatever the number of rows: a value
 * depends on nothing but its weight row and its activation row, so a sequence gives the
 * same bits alone or in any batch, in a prefill pass or a decode step (the cluster's
 * answers are `kvrelay generate`'s even where two tokens nearly tie). Each weight row is
 * read once and dotted with every activation row while it sits in L1. Not fast yet: a
 * blocked kernel with the same per-value arithmetic is issue 13's. */
static void typed_rows(float *y, int ldy, const struct kvr_matmul_act *a,
                       const struct kvr_tensor *w, int n0, int n1, float beta) {
    size_t xb = kvr_dtype_row_nbytes(kvr_dtype_dot(w->type), a->k);
    for (int j = n0; j < n1; j++) {
        const void *wr = (const char *)w->data + (size_t)j * w->row_nbytes;
        for (int i = 0; i < a->m; i++) {
            float d = kvr_vec_dot(w->type, wr, (const char *)a->xc + (size_t)i * xb, a->k);
            float *yij = y + (size_t)i * (size_t)ldy + j;
            *yij = beta != 0.0f ? d + beta * *yij : d;
        }
    }
}

struct kvr_matmul_ws {
    float *slot[KVR_MATMUL_WS_SLOTS];
    size_t slot_nfloats[KVR_MATMUL_WS_SLOTS];
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
    for (int i = 0; i < KVR_MATMUL_WS_SLOTS; i++)
        free(ws->slot[i]);
    free(ws);
}

static int ws_fits(const struct kvr_matmul_ws *ws, int slot, int m, int k) {
    return ws && slot >= 0 && slot < KVR_MATMUL_WS_SLOTS &&
           (size_t)m * (size_t)k <= ws->slot_nfloats[slot];
}

void kvr_matmul_act_prepare(struct kvr_matmul_ws *ws, int slot, const float *x, int m, int k,
                            enum kvr_dtype type, struct kvr_matmul_act *a) {
    *a = (struct kvr_matmul_act){.x = x, .xc = NULL, .type = type, .m = m, .k = k};
    if (type == KVR_DTYPE_F32)
        return;
    KVR_ASSERT(ws_fits(ws, slot, m, k));
    size_t xb = kvr_dtype_row_nbytes(kvr_dtype_dot(type), k);
    char *dst = (char *)ws->slot[slot];
    for (int i = 0; i < m; i++)
        kvr_act_convert_row(type, x + (size_t)i * (size_t)k, dst + (size_t)i * xb, k);
    a->xc = ws->slot[slot];
}

/* ---- entry points ---------------------------------------------------------------- */

void kvr_matmul_slice(float *y, int ldy, const struct kvr_matmul_act *a,
                      const struct kvr_tensor *w, int n0, int n1, float beta) {
    int m = a->m, k = a->k;
    if (n1 <= n0 || m <= 0)
        return;
    KVR_ASSERT(a->type == w->type && (int64_t)k == w->cols && n1 <= w->rows);
    if (w->type != KVR_DTYPE_F32) {
        typed_rows(y, ldy, a, w, n0, n1, beta);
        return;
    }
    const float *x = a->x, *wf = w->data;
    if (m <= KVR_MATMUL_SMALL_M) {
        small_m(y, ldy, x, wf, m, n0, n1, k, beta);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n1 - n0, k, 1.0f, x, k,
                wf + (size_t)n0 * (size_t)k, k, beta, y + n0, ldy);
}

int kvr_matmul_chunk(int m, int n, int k, int n_threads) {
    int c;
    if (m <= KVR_MATMUL_SMALL_M) {
        /* About 64 KiB of weights per task, whole 16-row panels: small enough that threads
         * stay balanced when another process takes a core for a while, big enough that
         * the claim is free. */
        c = (int)((64L * 1024) / ((long)k * (long)sizeof(float)));
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
    int n0 = (task - j->task0[o]) * j->chunk[o];
    int n = (int)op->w->rows;
    int n1 = n0 + j->chunk[o] < n ? n0 + j->chunk[o] : n;
    kvr_matmul_slice(op->y, n, &j->act[o], op->w, n0, n1, op->beta);
}

void kvr_matmul_multi(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws,
                      const struct kvr_matmul_op *ops, int n_ops) {
    KVR_ASSERT(n_ops >= 1 && n_ops <= KVR_MATMUL_MAX_OPS);
    struct mm_job j = {.ops = ops, .n_ops = n_ops};
    int nt = kvr_threadpool_n_threads(tp);
    long work = 0;
    int slot_used[KVR_MATMUL_WS_SLOTS] = {0};
    j.task0[0] = 0;
    for (int o = 0; o < n_ops; o++) {
        const struct kvr_matmul_op *op = &ops[o];
        int n = (int)op->w->rows, k = (int)op->w->cols;
        /* One conversion per distinct (x, type): Q, K and V of one type share theirs. */
        int shared = -1;
        for (int p = 0; p < o && shared < 0; p++)
            if (ops[p].x == op->x && ops[p].w->type == op->w->type && ops[p].m == op->m)
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
            kvr_matmul_act_prepare(ws, slot, op->x, op->m, k, op->w->type, &j.act[o]);
        }
        j.chunk[o] = kvr_matmul_chunk(op->m, n, k, nt);
        j.task0[o + 1] = j.task0[o] + (n + j.chunk[o] - 1) / j.chunk[o];
        work += (long)op->m * n * k;
    }
    /* Tiny problems (the bundled model) are not worth waking threads for. */
    kvr_threadpool_run(work >= KVR_PARALLEL_MIN_WORK ? tp : NULL, mm_task, &j, j.task0[n_ops]);
}

void kvr_matmul(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws, float *y, const float *x,
                const struct kvr_tensor *w, int m, float beta) {
    struct kvr_matmul_op op = {.y = y, .x = x, .w = w, .m = m, .beta = beta};
    kvr_matmul_multi(tp, ws, &op, 1);
}
