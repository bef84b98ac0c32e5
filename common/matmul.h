/* matmul.h - the matrix-multiply entry points of the forward pass.
 * Y (m, n) = X (m, k) . W^T + beta * Y, with W (n, k) row-major as llama2.c stores
 * weights. The n output features are cut into slices run across the thread pool; a
 * slice of few rows (decode) runs a hand-written AVX2/FMA kernel that reads each weight
 * row once for all m rows, a slice of many rows (prefill) runs single-threaded OpenBLAS
 * sgemm, so OpenBLAS never runs threads of its own beside ours. */
#ifndef KVR_MATMUL_H
#define KVR_MATMUL_H

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

/* y: (m, n) row-major, ldy = n; x: (m, k); w: (n, k). tp may be NULL. */
void kvr_matmul(struct kvr_threadpool *tp, float *y, const float *x, const float *w, int m, int n,
                int k, float beta);

/* One independent product of kvr_matmul_multi; fields as in kvr_matmul. */
struct kvr_matmul_op {
    float *y;       /* (m, n) */
    const float *x; /* (m, k) */
    const float *w; /* (n, k) */
    int m, n, k;
    float beta;
};

/* Runs n_ops (<= KVR_MATMUL_MAX_OPS) independent products in one parallel loop (one wake-up
 * and one barrier for all of them, e.g. the Q, K and V projections). tp may be NULL. */
void kvr_matmul_multi(struct kvr_threadpool *tp, const struct kvr_matmul_op *ops, int n_ops);

/* Single-threaded building block for fused parallel loops built elsewhere: columns
 * [n0, n1) of y only, i.e. y[i][j] = x[i] . w[j] + beta * y[i][j] for i < m, n0 <= j < n1;
 * y rows are ldy floats apart, x rows k floats. */
void kvr_matmul_slice(float *y, int ldy, const float *x, const float *w, int m, int n0, int n1,
                      int k, float beta);

/* Output features per slice that kvr_matmul uses for this shape on n_threads threads. */
int kvr_matmul_chunk(int m, int n, int k, int n_threads);

#endif /* KVR_MATMUL_H */
