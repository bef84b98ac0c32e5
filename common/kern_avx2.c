/* kern_avx2.c - the AVX2 + FMA + F16C kernel variant (kernels.h), built with those
 * target flags only (CMake sets them on this file), run where the CPU has them.
 *
 * Products over F32, F16 and BF16 weights, per value: k cut into chunks of 8; chunk c is
 * multiplied (both operands widened to f32, exactly) and added by FMA into accumulator
 * c % 2; the two accumulators are added, summed horizontally, and the last k % 8 products
 * added one at a time. Every tile shape below does exactly that per value, so results
 * do not depend on the batch. Q8_0: integer block sums, then the reference's float
 * operations in its order (bit for bit the scalar reference). */
#include "kernels.h"

#include <stdint.h>

#include "half.h"
#include "kern_ops.inc"
#include "kern_half.inc"
#include "kern_gemm.inc"

#ifndef KO_SIMD
#error "kern_avx2.c needs -mavx2 -mfma -mf16c"
#endif

static inline __attribute__((always_inline)) __m256 ld8(enum kvr_dtype t, const char *p, int i) {
    if (t == KVR_DTYPE_F32)
        return _mm256_loadu_ps((const float *)(const void *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)(const void *)((const uint16_t *)(const void *)p + i));
    if (t == KVR_DTYPE_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) float ld1(enum kvr_dtype t, const char *p, int i) {
    if (t == KVR_DTYPE_F32)
        return ((const float *)(const void *)p)[i];
    uint16_t h;
    memcpy(&h, p + 2 * (size_t)i, 2);
    return t == KVR_DTYPE_F16 ? kvr_f16_to_f32(h) : kvr_bf16_to_f32(h);
}

/* y[q][j] for q < RM activation rows, j < RN weight rows. RM, RN literals. */
static inline __attribute__((always_inline)) void
rtile(enum kvr_dtype t, enum kvr_dtype tx, int RM, int RN, float *y, size_t ldy, const char *w, size_t ws,
      const char *x, size_t xs, int k, float beta) {
    __m256 acc[2][2][2];
    for (int q = 0; q < RM; q++)
        for (int j = 0; j < RN; j++)
            acc[q][j][0] = acc[q][j][1] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= k; i += 16) {
        __m256 w0[2], w1[2];
        for (int j = 0; j < RN; j++) {
            w0[j] = ld8(t, w + (size_t)j * ws, i);
            w1[j] = ld8(t, w + (size_t)j * ws, i + 8);
        }
        for (int q = 0; q < RM; q++) {
            __m256 x0 = ld8(tx, x + (size_t)q * xs, i), x1 = ld8(tx, x + (size_t)q * xs, i + 8);
            for (int j = 0; j < RN; j++) {
                acc[q][j][0] = _mm256_fmadd_ps(x0, w0[j], acc[q][j][0]);
                acc[q][j][1] = _mm256_fmadd_ps(x1, w1[j], acc[q][j][1]);
            }
        }
    }
    if (i + 8 <= k) { /* chunk i / 8 is even */
        for (int j = 0; j < RN; j++) {
            __m256 wv = ld8(t, w + (size_t)j * ws, i);
            for (int q = 0; q < RM; q++)
                acc[q][j][0] = _mm256_fmadd_ps(ld8(tx, x + (size_t)q * xs, i), wv, acc[q][j][0]);
        }
        i += 8;
    }
    for (int q = 0; q < RM; q++) {
        for (int j = 0; j < RN; j++) {
            float s = hsum8(_mm256_add_ps(acc[q][j][0], acc[q][j][1]));
            for (int u = i; u < k; u++)
                s += ld1(t, w + (size_t)j * ws, u) * ld1(tx, x + (size_t)q * xs, u);
            float *yq = y + (size_t)q * ldy + j;
            *yq = beta != 0.0f ? s + beta * *yq : s;
        }
    }
}

static inline __attribute__((always_inline)) void
rows_t(enum kvr_dtype t, enum kvr_dtype tx, float *y, size_t ldy, const char *w, size_t ws, int n, const char *x,
       size_t xs, int m, int k, float beta) {
    int j = 0;
    for (; j + 2 <= n; j += 2) {
        const char *wj = w + (size_t)j * ws;
        int i = 0;
        for (; i + 2 <= m; i += 2)
            rtile(t, tx, 2, 2, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
        if (i < m)
            rtile(t, tx, 1, 2, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
    }
    if (j < n) {
        const char *wj = w + (size_t)j * ws;
        int i = 0;
        for (; i + 2 <= m; i += 2)
            rtile(t, tx, 2, 1, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
        if (i < m)
            rtile(t, tx, 1, 1, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
    }
}

/* Integer block sums by madd of sign-extended 16-bit lanes; the float part as the
 * reference (bit for bit). */
static float dot_q8_0(const struct kvr_block_q8_0 *w, const struct kvr_block_q8_0 *x, int n) {
    float s = 0.0f;
    for (int b = 0; b < n / KVR_QK8_0; b++) {
        __m256i qw = _mm256_loadu_si256((const __m256i *)(const void *)w[b].qs);
        __m256i qx = _mm256_loadu_si256((const __m256i *)(const void *)x[b].qs);
        __m256i lo = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(qw)),
                                       _mm256_cvtepi8_epi16(_mm256_castsi256_si128(qx)));
        __m256i hi = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(qw, 1)),
                                       _mm256_cvtepi8_epi16(_mm256_extracti128_si256(qx, 1)));
        __m256i v = _mm256_add_epi32(lo, hi);
        __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
        r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
        int32_t sumi = _mm_cvtsi128_si32(r);
        s += (float)sumi * (kvr_f16_to_f32(w[b].d) * kvr_f16_to_f32(x[b].d));
    }
    return s;
}

/* Q8_0, 8 weight rows (ws bytes apart) against one activation row: the per-value
 * arithmetic of dot_q8_0 (exact integer block sums, then s += sumi * (d_w * d_x) in block
 * order) with the 8 rows in the 8 lanes, so the same bits. The 8 rows are one contiguous
 * run read block by block; pf (the next run, or NULL) is prefetched alongside in address
 * order, pf_step bytes per block, so batch-1 decode streams. */
static inline __m256 q8_8rows(const char *w, size_t ws, const struct kvr_block_q8_0 *x, int nb, const char *pf,
                              size_t pf_step) {
    __m256 s = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < nb; b++) {
        if (pf)
            for (size_t o = 0; o < pf_step; o += 64)
                _mm_prefetch(pf + (size_t)b * pf_step + o, _MM_HINT_T0);
        __m256i qx = _mm256_loadu_si256((const __m256i *)(const void *)x[b].qs);
        __m256i ax = _mm256_sign_epi8(qx, qx); /* |x|, -128 stays 0x80 = 128 unsigned */
        const char *wb = w + (size_t)b * sizeof(struct kvr_block_q8_0);
        __m256i p[8];
        uint16_t dh[8];
        for (int r = 0; r < 8; r++) {
            const struct kvr_block_q8_0 *br = (const void *)(wb + (size_t)r * ws);
            __m256i qw = _mm256_loadu_si256((const __m256i *)(const void *)br->qs);
            /* |x| * (w signed by x): pairs at most 2 * 128 * 128, no 16-bit saturation. */
            __m256i pr = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(qw, qx));
            p[r] = _mm256_madd_epi16(pr, ones);
            memcpy(&dh[r], &br->d, 2);
        }
        __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
        __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
        __m256i h0123 = _mm256_hadd_epi32(h01, h23), h4567 = _mm256_hadd_epi32(h45, h67);
        __m256i sumi = _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                                        _mm256_permute2x128_si256(h0123, h4567, 0x31));
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)dh));
        __m256 prod = _mm256_mul_ps(dw, _mm256_set1_ps(kvr_f16_to_f32(x[b].d)));
        s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), prod));
    }
    return s;
}

static void rows_q8_0(float *y, size_t ldy, const char *w, size_t ws, int n, const char *x, size_t xs, int m,
                      int k, float beta) {
    int nb = k / KVR_QK8_0, j = 0;
    size_t pf_step = 8 * sizeof(struct kvr_block_q8_0);
    for (; j + 8 <= n; j += 8) {
        const char *wj = w + (size_t)j * ws;
        const char *pf = j + 16 <= n ? wj + 8 * ws : NULL;
        for (int i = 0; i < m; i++) {
            __m256 s = q8_8rows(wj, ws, (const void *)(x + (size_t)i * xs), nb, i == 0 ? pf : NULL, pf_step);
            float *yi = y + (size_t)i * ldy + j;
            if (beta != 0.0f)
                s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(yi)));
            _mm256_storeu_ps(yi, s);
        }
    }
    for (; j < n; j++)
        for (int i = 0; i < m; i++) {
            float d = dot_q8_0((const void *)(w + (size_t)j * ws), (const void *)(x + (size_t)i * xs), k);
            float *yij = y + (size_t)i * ldy + j;
            *yij = beta != 0.0f ? d + beta * *yij : d;
        }
}

/* F16 and BF16 activation rows widened to f32 once per call (exact, so the same bits as
 * widening them chunk by chunk), XBUF floats at a time on the stack. */
#define XBUF (16 * 1024)

static void widen(enum kvr_dtype t, const char *x, float *o, int k) {
    int i = 0;
    for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(o + i, ld8(t, x, i));
    for (; i < k; i++)
        o[i] = ld1(t, x, i);
}

static inline __attribute__((always_inline)) void
rows_half(enum kvr_dtype t, float *y, size_t ldy, const char *w, size_t ws, int n, const char *x,
          size_t xs, int m, int k, float beta) {
    if (k > XBUF) {
        rows_t(t, t, y, ldy, w, ws, n, x, xs, m, k, beta);
        return;
    }
    _Alignas(32) float xf[XBUF];
    int mb = XBUF / k;
    for (int i0 = 0; i0 < m; i0 += mb) {
        int mi = m - i0 < mb ? m - i0 : mb;
        for (int i = 0; i < mi; i++)
            widen(t, x + (size_t)(i0 + i) * xs, xf + (size_t)i * k, k);
        rows_t(t, KVR_DTYPE_F32, y + (size_t)i0 * ldy, ldy, w, ws, n, (const char *)xf, (size_t)k * 4, mi, k, beta);
    }
}

static void rows_avx2(enum kvr_dtype t, float *y, size_t ldy, const void *w, size_t ws, int n,
                      const void *xc, size_t xs, int m, int k, float beta) {
    const char *wc = w, *x = xc;
    switch (t) {
    case KVR_DTYPE_F32: rows_t(KVR_DTYPE_F32, KVR_DTYPE_F32, y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    case KVR_DTYPE_F16: rows_half(KVR_DTYPE_F16, y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    case KVR_DTYPE_BF16: rows_half(KVR_DTYPE_BF16, y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    case KVR_DTYPE_Q8_0: rows_q8_0(y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    }
}

KVR_KERNEL_TABLE(kvr_kernels_avx2, "avx2", KVR_ISA_AVX2, rows_avx2, 1);
