/* matmul.h - the one matrix-multiply entry point of the forward pass.
 * Y (m, n) = X (m, k) . W^T + beta * Y, with W (n, k) row-major as llama2.c stores
 * weights. The n output features are split across the thread pool and each slice goes
 * to single-threaded OpenBLAS (sgemv when m == 1, sgemm otherwise), so OpenBLAS never
 * runs threads of its own beside ours. */
#ifndef KVR_MATMUL_H
#define KVR_MATMUL_H

struct kvr_threadpool;

/* Pins OpenBLAS to one thread; call once at startup before any kvr_matmul. */
void kvr_matmul_init(void);

/* y: (m, n) row-major, ldy = n; x: (m, k); w: (n, k). tp may be NULL. */
void kvr_matmul(struct kvr_threadpool *tp, float *y, const float *x, const float *w, int m, int n,
                int k, float beta);

#endif /* KVR_MATMUL_H */
