/* matmul.h - the matrix-multiply entry points of the forward pass.
 * Y (m, n) = X (m, k) . W^T + beta * Y, with W (n, k) row-major as llama2.c stores
 * weights. The n output features are cut into slices run across the thread pool; a
 * slice of few rows (decode) runs a hand-written AVX2/FMA kernel that reads each weight
 * row once for all m rows, a slice of many rows (prefill) runs single-threaded OpenBLAS
 * sgemm, so OpenBLAS never runs threads of its own beside ours. Weights of the other
 * types (quant.h): the activations converted once to the type's dot type; decode rows
 * then take one call of the type's kernel per value, prompt rows (prompt_rows) the
 * prefill GEMM on dequantized panels (kernels.h gemm_panel). Either way each value
 * depends only on its rows and the mark, so it is the same in any batch. */
#ifndef KVR_MATMUL_H
#define KVR_MATMUL_H

#include "quant.h"

struct kvr_threadpool;

/* Rows up to this take the few-rows kernel, more take OpenBLAS sgemm (measured: see
 * docs/perf/engine.md). */
#define KVR_MATMUL_SMALL_M 32

/* Multiply-adds below which a parallel loop runs on the calling thread alone: waking a
 * worker and meeting it again costs a few microseconds, and much more when another
 * process holds the other core (measured: the bundled model decoding 8 sequences ran 3x
 * faster on one thread than on two with a threshold of 32K). 256K multiply-adds are about
 * 10 us of one core. */
#define KVR_PARALLEL_MIN_WORK (256L * 1024)

/* Most ops in one kvr_matmul_multi call. */
#define KVR_MATMUL_MAX_OPS 8

/* Pins OpenBLAS to one thread; call once at startup before any kvr_matmul. */
void kvr_matmul_init(void);

/* Slots of converted activations a workspace holds: enough for the Q, K and V products
 * of one layer in three different weight types. */
#define KVR_MATMUL_WS_SLOTS 3

/* Scratch for activations converted for non-F32 weights (quant.h): slot i holds up to
 * m_max rows of k_max[i] values (0: no such slot). Models whose matrices are all F32
 * need none (pass NULL). */
struct kvr_matmul_ws_params {
    int m_max;
    int k_max[KVR_MATMUL_WS_SLOTS];
};

struct kvr_matmul_ws;

/* KVR_EINVAL for a bad size, KVR_ENOMEM. Returns owned *out, free with kvr_matmul_ws_free. */
int kvr_matmul_ws_create(const struct kvr_matmul_ws_params *p, struct kvr_matmul_ws **out);

/* Accepts NULL. */
void kvr_matmul_ws_free(struct kvr_matmul_ws *ws);

/* Activations ready for a product with weights of one type, shared by every slice of it.
 * For F32 weights xc is NULL and the slices read x. Otherwise xc holds x converted as
 * quant.h says: m rows of kvr_dtype_row_nbytes(type, k) bytes. */
struct kvr_matmul_act {
    const float *x;  /* (m, k) float32, row-major, k apart */
    const void *xc;  /* converted copy in a workspace slot, or NULL */
    enum kvr_dtype type;
    int m, k;
    /* Per row (m bytes), or NULL for none: nonzero marks a prompt row, which the product
     * computes on the prefill GEMM path (weights dequantized exactly to f32 in panels,
     * f32 activations; kernels.h gemm_panel; BF16 on AVX512-BF16: bf16 pairs,
     * gemm_panel_bf16) instead of the per-value kernel. Either way a value depends only
     * on its weight row, its activation row and the row's mark (and, for that BF16 path,
     * on whether the CPU has AVX512_BF16). */
    const unsigned char *prompt_rows;
    const float *xw; /* prompt rows of xc widened back to f32 (row i at xw + i * k), or NULL
                      * (also for BF16 on AVX512-BF16, whose GEMM reads xc) */
};

/* Fills *a for x (m, k) and weights of type; converts into ws slot `slot` unless type is
 * F32 (ws may then be NULL). The slot must hold m rows of k values (KVR_ASSERT). The copy
 * lives until the slot is prepared again. */
void kvr_matmul_act_prepare(struct kvr_matmul_ws *ws, int slot, const float *x, int m, int k,
                            enum kvr_dtype type, struct kvr_matmul_act *a);

/* As kvr_matmul_act_prepare, with prompt_rows (may be NULL) recorded in *a and, for
 * non-F32 types, the marked rows also widened back to f32 once for every slice (xw; the
 * buffer is allocated at the first prompt, and without it each slice widens its own).
 * Rows are converted in parallel on tp (may be NULL) when there are many. */
void kvr_matmul_act_prepare_rows(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws, int slot, const float *x,
                                 int m, int k, enum kvr_dtype type, const unsigned char *prompt_rows,
                                 struct kvr_matmul_act *a);

/* y: (m, n) row-major, ldy = n, with n = w->rows; x: (m, k), k = w->cols; y = x . w^T +
 * beta * y. tp may be NULL; ws may be NULL when w is F32. */
void kvr_matmul(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws, float *y, const float *x,
                const struct kvr_tensor *w, int m, float beta);

/* One independent product of kvr_matmul_multi; fields as in kvr_matmul. */
struct kvr_matmul_op {
    float *y;                   /* (m, w->rows) */
    const float *x;             /* (m, w->cols) */
    const struct kvr_tensor *w; /* borrowed */
    int m;
    float beta;
    const unsigned char *prompt_rows; /* as in struct kvr_matmul_act; NULL: none */
};

/* Runs n_ops (<= KVR_MATMUL_MAX_OPS) independent products in one parallel loop (one wake-up
 * and one barrier for all of them, e.g. the Q, K and V projections). Ops with the same x and
 * weight type share one conversion; at most KVR_MATMUL_WS_SLOTS distinct conversions.
 * tp may be NULL. */
void kvr_matmul_multi(struct kvr_threadpool *tp, struct kvr_matmul_ws *ws,
                      const struct kvr_matmul_op *ops, int n_ops);

/* Single-threaded building block for fused parallel loops built elsewhere: columns
 * [n0, n1) of y only, i.e. y[i][j] = x[i] . w[j] + beta * y[i][j] for i < a->m,
 * n0 <= j < n1; y rows are ldy floats apart. a was prepared for w's type. For non-F32
 * weights a value depends on neither n0, n1 nor the other rows (a sequence computes the
 * same alone or in a batch): one kernel call per value, or for a->prompt_rows the
 * prefill GEMM, whose panels live in a per-thread buffer (freed when the thread ends). */
void kvr_matmul_slice(float *y, int ldy, const struct kvr_matmul_act *a,
                      const struct kvr_tensor *w, int n0, int n1, float beta);

/* Output features per slice that kvr_matmul uses for m activation rows and n weight rows
 * of row_nbytes bytes each on n_threads threads. */
int kvr_matmul_chunk(int m, int n, size_t row_nbytes, int n_threads);

/* Batch 1 (one activation row): a parallel loop over the rows of n_parts independent
 * products (part p has n_rows[p] weight rows), cut into slices of 16 rows. Each thread owns
 * one contiguous range of every part and reads its ranges part after part, front to back,
 * as one sequential stream per part, each claim taking 1/div of what is left of the range
 * (div 1: the whole range at once); a thread whose ranges are done claims the same way
 * from the back of the others' ranges, so the threads end within one claim of each other
 * (the last claims are single slices; a claim in progress when the others run out is at
 * most 1/div of what was left of its range).
 * fn(arg, part, r0, r1, thread) computes rows [r0, r1) of a part; every row is computed
 * once, in no particular order. Runs on the calling thread alone when tp is NULL or has
 * one thread. 1 <= n_parts <= KVR_MATMUL_MAX_OPS, div >= 1. */
void kvr_matmul_b1_run(struct kvr_threadpool *tp, int n_parts, const int *n_rows, int div,
                       void (*fn)(void *arg, int part, int r0, int r1, int thread), void *arg);

/* The div kvr_matmul_b1_run is measured best with for weights of type t (how its kernel
 * takes being cut into several calls); for several types, take the smallest. */
int kvr_matmul_b1_div(enum kvr_dtype t);

#endif /* KVR_MATMUL_H */
