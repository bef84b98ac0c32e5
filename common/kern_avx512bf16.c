/* kern_avx512bf16.c - the prefill GEMM over BF16 weights with AVX512-BF16 dot products
 * (kernels.h gemm_panel_bf16), built with -mavx512bf16 on top of the avx512 variant's
 * flags (CMake sets them on this file). kernels.c puts it in the avx512 table only where
 * the CPU reports AVX512_BF16; nothing else calls it.
 *
 * The arithmetic, per value y[i][j]: acc = 0; for each k-pair p (t = 2p, 2p + 1; an odd
 * k's last pair has 0 in its second place, in x and in the weights) one vdpbf16ps step
 * acc += x[t] * w[t] + x[t+1] * w[t+1]; then acc, or acc + beta * old y. The products of
 * two bf16 values are exact in f32; the step adds them into acc as the instruction does
 * (Intel: two additions, each rounded to nearest even; denormal inputs read as 0 and
 * denormal results flushed to 0, whatever MXCSR says). So the value differs from the f32
 * path's fused multiply-add chain in the last bits, like llama.cpp's BF16 path; it still
 * depends only on the weight row and the activation row: not on m, the row's place in a
 * 12-row block, or the column's place in the panel (tests/unit/test_quant.c). */
#include "kernels.h"

#include <immintrin.h>
#include <string.h>

#include "kern_gemm512_impl.h"

#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "kern_avx512bf16.c needs -mavx512f -mavx512bf16"
#endif

/* The pair (x[t], x[t+1]) of a bf16 row as one 32-bit word (x[t] in the low half, the
 * order vdpbf16ps pairs it with the panel's words); rows may be 2-byte aligned only. */
static inline __attribute__((always_inline)) __m512bh pair_bcast(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return (__m512bh)_mm512_set1_epi32((int)v);
}

static inline __attribute__((always_inline)) void gb_block(float *y, size_t ldy, const uint16_t *x, size_t ldx,
                                                          const uint32_t *wp, int k, int mr, __mmask16 m0,
                                                          __mmask16 m1, float beta) {
    __m512 a0[GP_MR], a1[GP_MR];
    for (int r = 0; r < mr; r++)
        a0[r] = a1[r] = _mm512_setzero_ps();
    int kp = k / 2;
    for (int p = 0; p < kp; p++) {
        __m512bh w0 = (__m512bh)_mm512_load_si512(wp + (size_t)p * KVR_GEMM_NR);
        __m512bh w1 = (__m512bh)_mm512_load_si512(wp + (size_t)p * KVR_GEMM_NR + 16);
        for (int r = 0; r < mr; r++) {
            __m512bh xb = pair_bcast(x + (size_t)r * ldx + 2 * (size_t)p);
            a0[r] = _mm512_dpbf16_ps(a0[r], xb, w0);
            a1[r] = _mm512_dpbf16_ps(a1[r], xb, w1);
        }
    }
    if (k & 1) {
        /* The last value alone: (x[k-1], 0) against the panel's (w[k-1], 0). */
        __m512bh w0 = (__m512bh)_mm512_load_si512(wp + (size_t)kp * KVR_GEMM_NR);
        __m512bh w1 = (__m512bh)_mm512_load_si512(wp + (size_t)kp * KVR_GEMM_NR + 16);
        for (int r = 0; r < mr; r++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[(size_t)r * ldx + (size_t)k - 1]);
            a0[r] = _mm512_dpbf16_ps(a0[r], xb, w0);
            a1[r] = _mm512_dpbf16_ps(a1[r], xb, w1);
        }
    }
    gp_store512(y, ldy, a0, a1, mr, m0, m1, beta);
}

void kvr_gemm_panel_bf16_avx512(float *y, size_t ldy, const uint16_t *x, size_t ldx, int m, const uint32_t *wp,
                                int n, int k, float beta) {
    __mmask16 m0, m1;
    gp_masks512(n, &m0, &m1);
#define GB_BLOCK(yb, xb, R) gb_block(yb, ldy, xb, ldx, wp, k, R, m0, m1, beta)
    GP_ROWS512(GB_BLOCK, y, ldy, x, ldx, m);
#undef GB_BLOCK
}

void kvr_gemm_pack_bf16(uint32_t *wp, const void *w, size_t wstride, int n, int k) {
    int kp = k / 2, kpad = (k + 1) / 2;
    for (int j = 0; j < KVR_GEMM_NR; j++) {
        if (j >= n) {
            for (int p = 0; p < kpad; p++)
                wp[(size_t)p * KVR_GEMM_NR + (size_t)j] = 0;
            continue;
        }
        const uint16_t *row = (const uint16_t *)(const void *)((const char *)w + (size_t)j * wstride);
        for (int p = 0; p < kp; p++) {
            uint32_t v;
            memcpy(&v, row + 2 * (size_t)p, sizeof v);
            wp[(size_t)p * KVR_GEMM_NR + (size_t)j] = v;
        }
        if (k & 1)
            wp[(size_t)kp * KVR_GEMM_NR + (size_t)j] = row[k - 1];
    }
}
