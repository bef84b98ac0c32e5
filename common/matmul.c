/* matmul.c - kvr_matmul: output features split over our threads, OpenBLAS per slice. */
#include "matmul.h"

#include <cblas.h>

#include "threadpool.h"

void kvr_matmul_init(void) { openblas_set_num_threads(1); }

struct mm_job {
    float *y;
    const float *x, *w;
    int m, n, k, chunk;
    float beta;
};

static void mm_task(void *arg, int task, int thread) {
    (void)thread;
    const struct mm_job *j = arg;
    int n0 = task * j->chunk;
    int nn = j->n - n0 < j->chunk ? j->n - n0 : j->chunk;
    if (nn <= 0)
        return;
    const float *w = j->w + (size_t)n0 * (size_t)j->k;
    if (j->m == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, nn, j->k, 1.0f, w, j->k, j->x, 1, j->beta,
                    j->y + n0, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->m, nn, j->k, 1.0f, j->x, j->k, w,
                    j->k, j->beta, j->y + n0, j->n);
}

void kvr_matmul(struct kvr_threadpool *tp, float *y, const float *x, const float *w, int m, int n,
                int k, float beta) {
    int nt = kvr_threadpool_n_threads(tp);
    /* Small problems are not worth waking threads for. */
    if ((long)m * n * k < 32L * 1024)
        nt = 1;
    int chunk = (n + nt - 1) / nt;
    chunk = (chunk + 15) & ~15;
    int n_tasks = (n + chunk - 1) / chunk;
    struct mm_job j = {.y = y, .x = x, .w = w, .m = m, .n = n, .k = k, .chunk = chunk, .beta = beta};
    kvr_threadpool_run(nt > 1 ? tp : NULL, mm_task, &j, n_tasks);
}
