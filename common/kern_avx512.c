/* kern_avx512.c - the AVX-512 kernel variant (kernels.h): F, BW, VL and VNNI (plus AVX2,
 * FMA, F16C), built with those target flags only (CMake sets them on this file), run
 * where the CPU and the OS support them.
 *
 * Products over F32, F16 and BF16 weights, per value: k cut into chunks of 16 (the last
 * one masked); chunk c is widened to f32 (exactly) and added by FMA into accumulator
 * c % 2; the two accumulators are added and summed horizontally. Every tile shape does
 * exactly that per value, so results do not depend on the batch. A single activation row
 * (batch-1 decode) streams the weight rows one after the other, four chunks loaded per
 * iteration, left to the hardware prefetchers (row1).
 *
 * Q8_0: 16 weight rows at a time; per 32-value block, VNNI dot products of |x| with the
 * weights signed by x give each row's exact integer sum, and the reference's float
 * operations (sum * (d_w * d_x), added in block order) run on 16 rows in one vector:
 * bit for bit the scalar reference. */
#include "kernels.h"

#include <stdint.h>

#include "half.h"
#include "kern_ops.inc"
#include "kern_half.inc"
#include "kern_gemm.inc"

#if !defined(KO_SIMD) || !defined(__AVX512F__) || !defined(__AVX512BW__) || \
    !defined(__AVX512VL__) || !defined(__AVX512VNNI__)
#error "kern_avx512.c needs -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c"
#endif

/* Bytes ahead of the current load that a weight stream prefetches. */
#define PF_AHEAD 1024

static inline __attribute__((always_inline)) __m512 ld16(enum kvr_dtype t, const char *p, int i) {
    if (t == KVR_DTYPE_F32)
        return _mm512_loadu_ps((const float *)(const void *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)(const void *)p + i));
    if (t == KVR_DTYPE_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) __m512 ld16m(enum kvr_dtype t, const char *p, int i, __mmask16 mk) {
    if (t == KVR_DTYPE_F32)
        return _mm512_maskz_loadu_ps(mk, (const float *)(const void *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)(const void *)p + i);
    if (t == KVR_DTYPE_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* y[q][j] for q < RM activation rows, j < RN weight rows. RM, RN, PF literals. */
static inline __attribute__((always_inline)) void
rtile(enum kvr_dtype t, enum kvr_dtype tx, int RM, int RN, int PF, float *y, size_t ldy, const char *w, size_t ws,
      const char *x, size_t xs, int k, float beta) {
    const int es = t == KVR_DTYPE_F32 ? 4 : 2;
    __m512 acc[6][2][2];
    for (int q = 0; q < RM; q++)
        for (int j = 0; j < RN; j++)
            acc[q][j][0] = acc[q][j][1] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        __m512 w0[2], w1[2];
        for (int j = 0; j < RN; j++) {
            const char *wj = w + (size_t)j * ws;
            if (PF) {
                _mm_prefetch(wj + (size_t)i * es + PF_AHEAD, _MM_HINT_T0);
                if (es == 4)
                    _mm_prefetch(wj + (size_t)i * es + PF_AHEAD + 64, _MM_HINT_T0);
            }
            w0[j] = ld16(t, wj, i);
            w1[j] = ld16(t, wj, i + 16);
        }
        for (int q = 0; q < RM; q++) {
            __m512 x0 = ld16(tx, x + (size_t)q * xs, i), x1 = ld16(tx, x + (size_t)q * xs, i + 16);
            for (int j = 0; j < RN; j++) {
                acc[q][j][0] = _mm512_fmadd_ps(x0, w0[j], acc[q][j][0]);
                acc[q][j][1] = _mm512_fmadd_ps(x1, w1[j], acc[q][j][1]);
            }
        }
    }
    /* At most two more chunks: c = i / 16 is even here, the second one odd. */
    for (int par = 0; par < 2 && i < k; par++, i += 16) {
        __mmask16 mk = k - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1u);
        for (int j = 0; j < RN; j++) {
            __m512 wv = ld16m(t, w + (size_t)j * ws, i, mk);
            for (int q = 0; q < RM; q++)
                acc[q][j][par] = _mm512_fmadd_ps(ld16m(tx, x + (size_t)q * xs, i, mk), wv, acc[q][j][par]);
        }
    }
    for (int q = 0; q < RM; q++) {
        for (int j = 0; j < RN; j++) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[q][j][0], acc[q][j][1]));
            float *yq = y + (size_t)q * ldy + j;
            *yq = beta != 0.0f ? s + beta * *yq : s;
        }
    }
}

/* One weight row against one activation row (batch-1 decode): rtile's arithmetic (chunk c
 * into accumulator c % 2, the same bits), four chunks loaded per iteration and no software
 * prefetch. A thread then reads one sequential stream that the hardware prefetchers follow
 * on their own: measured on Zen 4 (2 threads, 440 MB of rows of 768 F32) at 0.96-1.00 of
 * the read ceiling, against 0.82-0.88 for two chunks per iteration with a prefetch 1 KiB
 * ahead (the prefetches cost load slots and run into the next row's stream). */
static inline __attribute__((always_inline)) float row1(enum kvr_dtype t, const char *w, const float *x, int k) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 64 <= k; i += 64) {
        __m512 w0 = ld16(t, w, i), w1 = ld16(t, w, i + 16), w2 = ld16(t, w, i + 32), w3 = ld16(t, w, i + 48);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), w0, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), w1, a1);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), w2, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), w3, a1);
    }
    if (i + 32 <= k) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), ld16(t, w, i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), ld16(t, w, i + 16), a1);
        i += 32;
    }
    /* At most two more chunks: c = i / 16 is even here, the second one odd. */
    if (i < k) {
        __mmask16 mk = k - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1u);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + i), ld16m(t, w, i, mk), a0);
        i += 16;
    }
    if (i < k) {
        __mmask16 mk = (__mmask16)((1u << (k - i)) - 1u);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + i), ld16m(t, w, i, mk), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static inline __attribute__((always_inline)) void
rows_t(enum kvr_dtype t, enum kvr_dtype tx, float *y, size_t ldy, const char *w, size_t ws, int n, const char *x,
       size_t xs, int m, int k, float beta) {
    int j = 0;
    if (m == 1 && tx == KVR_DTYPE_F32) {
        const float *xf = (const float *)(const void *)x;
        for (; j < n; j++) {
            float s = row1(t, w + (size_t)j * ws, xf, k);
            y[j] = beta != 0.0f ? s + beta * y[j] : s;
        }
        return;
    }
    if (m == 1) {
        for (; j < n; j++)
            rtile(t, tx, 1, 1, 1, y + j, ldy, w + (size_t)j * ws, ws, x, xs, k, beta);
        return;
    }
    for (; j + 2 <= n; j += 2) {
        const char *wj = w + (size_t)j * ws;
        int i = 0;
        for (; i + 6 <= m; i += 6)
            rtile(t, tx, 6, 2, 0, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
        for (; i + 4 <= m; i += 4)
            rtile(t, tx, 4, 2, 0, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
        switch (m - i) {
        case 3: rtile(t, tx, 3, 2, 0, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta); break;
        case 2: rtile(t, tx, 2, 2, 0, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta); break;
        case 1: rtile(t, tx, 1, 2, 0, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta); break;
        default: break;
        }
    }
    if (j < n) {
        const char *wj = w + (size_t)j * ws;
        int i = 0;
        for (; i + 4 <= m; i += 4)
            rtile(t, tx, 4, 1, 0, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
        for (; i < m; i++)
            rtile(t, tx, 1, 1, 0, y + (size_t)i * ldy + j, ldy, wj, ws, x + (size_t)i * xs, xs, k, beta);
    }
}

/* ---- Q8_0 ------------------------------------------------------------------------ */

/* Sums of the 8 lanes of each of a, b, c, d: (sum a, sum b, sum c, sum d). */
static inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_hadd_epi32(a, b), cd = _mm256_hadd_epi32(c, d);
    __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* Exact integer dot product of 32 int8 weights with one block of x given as |x| and its
 * sign: 8 partial sums. */
static inline __m256i q8_part(const int8_t *qs, __m256i ax, __m256i sx) {
    __m256i qw = _mm256_loadu_si256((const __m256i *)(const void *)qs);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, _mm256_sign_epi8(qw, sx));
}

static inline int32_t hsum8i(__m256i v) {
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
    return _mm_cvtsi128_si32(r);
}

/* One weight row against one activation row, as the reference. */
static float q8_row(const struct kvr_block_q8_0 *w, const struct kvr_block_q8_0 *x, int nb) {
    float s = 0.0f;
    for (int b = 0; b < nb; b++) {
        __m256i qx = _mm256_loadu_si256((const __m256i *)(const void *)x[b].qs);
        int32_t sumi = hsum8i(q8_part(w[b].qs, _mm256_abs_epi8(qx), qx));
        s += (float)sumi * (kvr_f16_to_f32(w[b].d) * kvr_f16_to_f32(x[b].d));
    }
    return s;
}

/* 16 weight rows (ws bytes apart) against one activation row: lane r = row r. */
static inline __m512 q8_16rows(const char *w, size_t ws, const struct kvr_block_q8_0 *x, int nb,
                               __m512i offs, const char *pf, size_t pf_step) {
    __m512 s = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        if (pf)
            for (size_t o = 0; o < pf_step; o += 64)
                _mm_prefetch(pf + (size_t)b * pf_step + o, _MM_HINT_T0);
        __m256i qx = _mm256_loadu_si256((const __m256i *)(const void *)x[b].qs);
        __m256i ax = _mm256_abs_epi8(qx);
        const char *wb = w + (size_t)b * sizeof(struct kvr_block_q8_0) + 2;
        __m256i p[16];
        for (int r = 0; r < 16; r++)
            p[r] = q8_part((const int8_t *)(wb + (size_t)r * ws), ax, qx);
        __m128i s0 = hsum4(p[0], p[1], p[2], p[3]), s1 = hsum4(p[4], p[5], p[6], p[7]);
        __m128i s2 = hsum4(p[8], p[9], p[10], p[11]), s3 = hsum4(p[12], p[13], p[14], p[15]);
        __m512i sumi = _mm512_inserti32x4(_mm512_castsi128_si512(s0), s1, 1);
        sumi = _mm512_inserti32x4(sumi, s2, 2);
        sumi = _mm512_inserti32x4(sumi, s3, 3);
        /* The 16 rows' scales: 4-byte gathers at each block start, low halves kept. */
        __m512i dwi = _mm512_i32gather_epi32(offs, (const void *)(wb - 2), 1);
        __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dwi));
        __m512 prod = _mm512_mul_ps(dw, _mm512_set1_ps(kvr_f16_to_f32(x[b].d)));
        s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), prod));
    }
    return s;
}

/* The transposed sums of 16 rows' partial vectors: lane r = sum of p[r]'s 8 lanes. */
static inline __m512i sum16(const __m256i p[16]) {
    __m128i s0 = hsum4(p[0], p[1], p[2], p[3]), s1 = hsum4(p[4], p[5], p[6], p[7]);
    __m128i s2 = hsum4(p[8], p[9], p[10], p[11]), s3 = hsum4(p[12], p[13], p[14], p[15]);
    __m512i v = _mm512_inserti32x4(_mm512_castsi128_si512(s0), s1, 1);
    v = _mm512_inserti32x4(v, s2, 2);
    return _mm512_inserti32x4(v, s3, 3);
}

/* Many activation rows (prefill, big batches): per 16-row group, each block's 16 scales
 * and 16 weight sums are found once; then per activation row a block costs one VNNI op
 * per weight row: x + 128 (unsigned) times w, minus 128 * sum(w), is sum(x * w) exactly.
 * The float operations are q8_16rows' (the reference's). Up to QNB blocks (k <= 8192). */
#define QNB 256

static void q8_16rows_many(float *y, size_t ldy, const char *w, size_t ws, const char *x, size_t xs,
                           int m, int nb, __m512i offs, float beta) {
    _Alignas(64) float dws[QNB][16];
    _Alignas(64) int32_t wsum[QNB][16];
    const __m256i ones = _mm256_set1_epi8(1), bias = _mm256_set1_epi8((char)0x80);
    for (int b = 0; b < nb; b++) {
        const char *wb = w + (size_t)b * sizeof(struct kvr_block_q8_0) + 2;
        __m256i p[16];
        for (int r = 0; r < 16; r++)
            p[r] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones,
                                       _mm256_loadu_si256((const __m256i *)(const void *)(wb + (size_t)r * ws)));
        _mm512_store_si512((void *)wsum[b], _mm512_slli_epi32(sum16(p), 7));
        __m512i dwi = _mm512_i32gather_epi32(offs, (const void *)(wb - 2), 1);
        _mm512_store_ps(dws[b], _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dwi)));
    }
    for (int i = 0; i < m; i++) {
        const struct kvr_block_q8_0 *xb = (const void *)(x + (size_t)i * xs);
        __m512 s = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            __m256i xu = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(const void *)xb[b].qs), bias);
            const char *wb = w + (size_t)b * sizeof(struct kvr_block_q8_0) + 2;
            __m256i p[16];
            for (int r = 0; r < 16; r++)
                p[r] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), xu,
                                           _mm256_loadu_si256((const __m256i *)(const void *)(wb + (size_t)r * ws)));
            __m512i sumi = _mm512_sub_epi32(sum16(p), _mm512_load_si512((const void *)wsum[b]));
            __m512 prod = _mm512_mul_ps(_mm512_load_ps(dws[b]), _mm512_set1_ps(kvr_f16_to_f32(xb[b].d)));
            s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), prod));
        }
        float *yi = y + (size_t)i * ldy;
        if (beta != 0.0f)
            s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_loadu_ps(yi)));
        _mm512_storeu_ps(yi, s);
    }
}

static void rows_q8_0(float *y, size_t ldy, const char *w, size_t ws, int n, const char *x,
                      size_t xs, int m, int k, float beta) {
    int nb = k / KVR_QK8_0, j = 0;
    __m512i offs = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                      _mm512_set1_epi32((int)ws));
    /* 16 rows of ws bytes are one contiguous run: while one run is computed, the next is
     * prefetched in address order, one block's share per block (the 16 rows are read
     * block by block, 16 strided streams the hardware prefetchers do not follow: without
     * this prefetch batch-1 Q8_0 decode runs at half its speed, measured). */
    size_t pf_step = 16 * sizeof(struct kvr_block_q8_0);
    if (ws * 16 < (size_t)1 << 31) {
        for (; j + 16 <= n; j += 16) {
            const char *wj = w + (size_t)j * ws;
            const char *pf = j + 32 <= n ? wj + 16 * ws : NULL;
            if (m >= 4 && nb <= QNB) {
                q8_16rows_many(y + j, ldy, wj, ws, x, xs, m, nb, offs, beta);
                continue;
            }
            for (int i = 0; i < m; i++) {
                __m512 s = q8_16rows(wj, ws, (const void *)(x + (size_t)i * xs), nb, offs,
                                     i == 0 ? pf : NULL, pf_step);
                float *yi = y + (size_t)i * ldy + j;
                if (beta != 0.0f)
                    s = _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_loadu_ps(yi)));
                _mm512_storeu_ps(yi, s);
            }
        }
    }
    for (; j < n; j++)
        for (int i = 0; i < m; i++) {
            float d = q8_row((const void *)(w + (size_t)j * ws), (const void *)(x + (size_t)i * xs), nb);
            float *yij = y + (size_t)i * ldy + j;
            *yij = beta != 0.0f ? d + beta * *yij : d;
        }
}

/* F16 and BF16 activation rows widened to f32 once per call (exact, so the same bits as
 * widening them chunk by chunk), XBUF floats at a time on the stack: the inner loop then
 * widens only the weights. */
#define XBUF (16 * 1024)

static void widen(enum kvr_dtype t, const char *x, float *o, int k) {
    int i = 0;
    for (; i + 16 <= k; i += 16)
        _mm512_storeu_ps(o + i, ld16(t, x, i));
    if (i < k)
        _mm512_mask_storeu_ps(o + i, (__mmask16)((1u << (k - i)) - 1u), ld16m(t, x, i, (__mmask16)((1u << (k - i)) - 1u)));
}

static inline __attribute__((always_inline)) void
rows_half(enum kvr_dtype t, float *y, size_t ldy, const char *w, size_t ws, int n, const char *x,
          size_t xs, int m, int k, float beta) {
    if (k > XBUF) {
        rows_t(t, t, y, ldy, w, ws, n, x, xs, m, k, beta);
        return;
    }
    _Alignas(64) float xf[XBUF];
    int mb = XBUF / k;
    for (int i0 = 0; i0 < m; i0 += mb) {
        int mi = m - i0 < mb ? m - i0 : mb;
        for (int i = 0; i < mi; i++)
            widen(t, x + (size_t)(i0 + i) * xs, xf + (size_t)i * k, k);
        rows_t(t, KVR_DTYPE_F32, y + (size_t)i0 * ldy, ldy, w, ws, n, (const char *)xf, (size_t)k * 4, mi, k, beta);
    }
}

static void rows_avx512(enum kvr_dtype t, float *y, size_t ldy, const void *w, size_t ws, int n,
                        const void *xc, size_t xs, int m, int k, float beta) {
    const char *wc = w, *x = xc;
    switch (t) {
    case KVR_DTYPE_F32: rows_t(KVR_DTYPE_F32, KVR_DTYPE_F32, y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    case KVR_DTYPE_F16: rows_half(KVR_DTYPE_F16, y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    case KVR_DTYPE_BF16: rows_half(KVR_DTYPE_BF16, y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    case KVR_DTYPE_Q8_0: rows_q8_0(y, ldy, wc, ws, n, x, xs, m, k, beta); return;
    }
}

KVR_KERNEL_TABLE(kvr_kernels_avx512, "avx512", KVR_ISA_AVX512, rows_avx512, 1);
