/* kern_gemm512_impl.h - what the two AVX-512 prefill GEMMs share (kern_gemm.inc's f32
 * panel kernel in the avx512 variant, kern_avx512bf16.c's BF16 one): a 12-row x 32-column
 * block's masks and its store, and the loop over a panel's rows in such blocks. Included
 * only by files compiled with -mavx512f; every function here is static inline. */
#ifndef KVR_KERN_GEMM512_IMPL_H
#define KVR_KERN_GEMM512_IMPL_H

#include <immintrin.h>
#include <stddef.h>

/* Rows per block of the AVX-512 panel kernels. */
#define GP_MR 12

/* The masks of a panel's n <= 32 columns: the first 16 (m0) and the next 16 (m1). */
static inline void gp_masks512(int n, __mmask16 *m0, __mmask16 *m1) {
    *m0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    *m1 = n >= 32 ? (__mmask16)0xFFFF : n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1u);
}

/* Stores the block's mr rows of sums a0 (columns 0-15) and a1 (16-31): acc (beta 0) or
 * acc + beta * old, in that order of operations, within the masks. */
static inline __attribute__((always_inline)) void gp_store512(float *y, size_t ldy, __m512 *a0, __m512 *a1, int mr,
                                                             __mmask16 m0, __mmask16 m1, float beta) {
    __m512 vb = _mm512_set1_ps(beta);
    for (int r = 0; r < mr; r++) {
        float *yr = y + (size_t)r * ldy;
        if (beta != 0.0f) {
            a0[r] = _mm512_add_ps(a0[r], _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m0, yr)));
            a1[r] = _mm512_add_ps(a1[r], _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(m1, yr + 16)));
        }
        _mm512_mask_storeu_ps(yr, m0, a0[r]);
        _mm512_mask_storeu_ps(yr + 16, m1, a1[r]);
    }
}

/* The m rows of a panel in blocks of GP_MR, then the rest as one block of a literal row
 * count (so that each block's accumulators stay in registers): BLOCK(y, x, mr) computes
 * the block of mr rows whose first row is at y and x (row pointers advanced here). */
#define GP_ROWS512(BLOCK, y, ldy, x, ldx, m)                                                          \
    do {                                                                                              \
        int gp_i = 0;                                                                                 \
        for (; gp_i + GP_MR <= (m); gp_i += GP_MR)                                                    \
            BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), GP_MR);                     \
        switch ((m) - gp_i) {                                                                         \
        case 1: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 1); break;              \
        case 2: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 2); break;              \
        case 3: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 3); break;              \
        case 4: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 4); break;              \
        case 5: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 5); break;              \
        case 6: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 6); break;              \
        case 7: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 7); break;              \
        case 8: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 8); break;              \
        case 9: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 9); break;              \
        case 10: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 10); break;            \
        case 11: BLOCK((y) + (size_t)gp_i * (ldy), (x) + (size_t)gp_i * (ldx), 11); break;            \
        default: break;                                                                               \
        }                                                                                             \
    } while (0)

#endif /* KVR_KERN_GEMM512_IMPL_H */
