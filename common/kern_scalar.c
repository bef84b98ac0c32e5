/* kern_scalar.c - the portable kernel variant (kernels.h): plain C for any CPU, the
 * variant the others are tested against. Compiled without SIMD code paths even when the
 * build targets the build machine (KVR_NATIVE), so that it stays what it says. */
#define KVR_KERN_SCALAR 1
#include "kernels.h"

#include <stdint.h>

#include "kern_ops.inc"
#include "kern_half.inc"
#include "kern_gemm.inc"

/* One portable dot product per value: the same bits whatever m and n. */
static void rows_scalar(enum kvr_dtype t, float *y, size_t ldy, const void *w, size_t wstride, int n,
                        const void *xc, size_t xstride, int m, int k, float beta) {
    for (int j = 0; j < n; j++) {
        const void *wr = (const char *)w + (size_t)j * wstride;
        for (int i = 0; i < m; i++) {
            float d = kvr_vec_dot_portable(t, wr, (const char *)xc + (size_t)i * xstride, k);
            float *yij = y + (size_t)i * ldy + j;
            *yij = beta != 0.0f ? d + beta * *yij : d;
        }
    }
}

KVR_KERNEL_TABLE(kvr_kernels_scalar, "scalar", KVR_ISA_SCALAR, rows_scalar, 0);
