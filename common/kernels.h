/* kernels.h - the engine's hand-written SIMD kernels, chosen at run time for the CPU the
 * binary runs on (one binary for every x86-64 machine; the build never assumes its own
 * CPU unless configured with KVR_NATIVE). Three variants, each a table of functions built
 * from its own source file with its own target flags:
 *
 *   avx512  AVX-512 F/BW/VL (+VNNI for Q8_0 products)    common/kern_avx512.c
 *           + AVX512-BF16 where the CPU has it: the BF16 prefill GEMM
 *                                                         common/kern_avx512bf16.c
 *   avx2    AVX2 + FMA + F16C                             common/kern_avx2.c
 *   scalar  portable C, any CPU                           common/kern_scalar.c
 *
 * kvr_kernels() returns the best variant the CPU and the OS (saved vector state) support,
 * or a lower one named by the environment variable KVR_KERNEL=avx512|avx2|scalar (tests,
 * comparisons; asking for a variant the CPU lacks is refused with a message and the best
 * supported one is used). The choice is made once per process.
 *
 * Within one variant a product's value depends only on its weight row and its activation
 * row: the same bits at any batch size, slice or thread count (quant.h's rule for non-F32
 * weights). Variants agree with the scalar reference up to float summation order, and
 * bit for bit for Q8_0. */
#ifndef KVR_KERNELS_H
#define KVR_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "quant.h"

/* Weight columns in one packed panel of gemm_panel. */
#define KVR_GEMM_NR 32

enum kvr_isa { KVR_ISA_SCALAR = 0, KVR_ISA_AVX2 = 1, KVR_ISA_AVX512 = 2 };

struct kvr_kernels {
    const char *name; /* "scalar", "avx2", "avx512" */
    enum kvr_isa isa;

    /* Products over weights of type t (any of quant.h's four): for i < m, j < n,
     *   y[i * ldy + j] = dot(w row j, x row i) + (beta != 0 ? beta * old y : 0)
     * with weight row j at w + j * wstride bytes, activation row i (converted by
     * kvr_act_convert_row for t) at xc + i * xstride bytes, k values each. Streams each
     * weight row from memory once for all m activation rows. */
    void (*rows)(enum kvr_dtype t, float *y, size_t ldy, const void *w, size_t wstride, int n,
                 const void *xc, size_t xstride, int m, int k, float beta);
    /* F32 weights, m rows of x at most this many: rows() is the kernel of choice. */
    int f32_rows_max_m;

    /* F32 weights, few rows (matmul.h's small path): y[i][j] for i < m, j in [n0, n1),
     * x (m, k) and w (n, k) row-major, ldy apart. */
    void (*f32_small)(float *y, int ldy, const float *x, const float *w, int m, int n0, int n1,
                      int k, float beta);

    /* Prefill GEMM (matmul.h's prompt rows): for i < m, j < n (n <= KVR_GEMM_NR),
     *   y[i * ldy + j] = sum over t < k of x[i * ldx + t] * wp[t * KVR_GEMM_NR + j]
     *                    (+ beta * old y when beta != 0)
     * with wp a panel of KVR_GEMM_NR weight columns packed k-major, 64-byte aligned, f32
     * (columns past n may hold anything finite). Each value is one fused multiply-add
     * chain in t order from 0 (kern_gemm.inc): the same bits in every variant, at any m,
     * row or column position; for beta 0 or 1. */
    void (*gemm_panel)(float *y, size_t ldy, const float *x, size_t ldx, int m, const float *wp, int n,
                       int k, float beta);
    /* The prefill GEMM over BF16 weights with AVX512-BF16 dot products (vdpbf16ps), or
     * NULL (both) where the CPU lacks AVX512_BF16 or another variant runs: kernels.c sets
     * them at selection time, only in the avx512 table (common/kern_avx512bf16.c).
     * gemm_pack_bf16 packs n <= KVR_GEMM_NR BF16 weight rows (k values each, wstride bytes
     * apart) into wp: (k + 1) / 2 k-pairs, each KVR_GEMM_NR 32-bit words, word j =
     * (w_j[2p] low half, w_j[2p + 1] high half; 0 past an odd k's end and for columns
     * j >= n); wp 64-byte aligned. gemm_panel_bf16 then gives, for i < m, j < n,
     *   y[i * ldy + j] = sum over k-pairs of x[i][2p] w_j[2p] + x[i][2p+1] w_j[2p+1]
     *                    (+ beta * old y when beta != 0)
     * with x bf16 rows (kvr_act_convert_row's BF16 rows) ldx elements apart: one
     * vdpbf16ps step per k-pair in order from 0 (exact products, denormals flushed): other
     * bits than gemm_panel's chain, but the same at any m, row or column position. */
    void (*gemm_pack_bf16)(uint32_t *wp, const void *w, size_t wstride, int n, int k);
    void (*gemm_panel_bf16)(float *y, size_t ldy, const uint16_t *x, size_t ldx, int m, const uint32_t *wp,
                            int n, int k, float beta);
    /* One row of n values of type t (any of quant.h's four, or a dot type) widened to
     * f32 exactly, as kvr_dequantize_row: the prefill GEMM's inputs. */
    void (*widen)(enum kvr_dtype t, const void *src, float *dst, int n);

    /* Helpers of the forward pass (transformer.c). */
    float (*vdot)(const float *a, const float *b, int n);
    float (*exp_shift_sum)(float *x, int n, float max); /* x = e^(x - max), returns the sum */
    void (*swiglu)(float *a, const float *b, int n);    /* a = silu(a) * b */
    /* One run of n keys inside a cache block, keys ldk floats apart, for one KV head and its
     * kv_mul query heads (q_h at q + h*hd):
     * sc[h * n_keys + u] = (q_h . k_u) / scale, h < kv_mul, u < n. */
    void (*qk_run)(float *sc, int n_keys, const float *q, int kv_mul, int hd, const float *k,
                   size_t ldk, int n, float scale);
    /* out_h += sum_u a[h * n_keys + u] * v_u, h < kv_mul, u < n (values ldv floats apart). */
    void (*av_run)(float *out, const float *a, int n_keys, int kv_mul, int hd, const float *v,
                   size_t ldv, int n);
    /* The same over an f16 or bf16 KV cache (t = KVR_DTYPE_F16 or KVR_DTYPE_BF16; keys and
     * values ldk/ldv elements apart), widened to f32 exactly while read (kern_half.inc). */
    void (*qk_run_h)(enum kvr_dtype t, float *sc, int n_keys, const float *q, int kv_mul, int hd,
                     const uint16_t *k, size_t ldk, int n, float scale);
    void (*av_run_h)(enum kvr_dtype t, float *out, const float *a, int n_keys, int kv_mul, int hd,
                     const uint16_t *v, size_t ldv, int n);
    /* dst[i] = src[i] widened exactly from f16/bf16 (t as above), i < n. */
    void (*half_to_f32)(enum kvr_dtype t, float *dst, const uint16_t *src, int n);

    /* Sum of n 64-bit words (the bandwidth probe of `kvrelay bench`). */
    uint64_t (*sum_u64)(const uint64_t *p, size_t n);
};

/* The variant this process runs (chosen on first call; thread-safe). */
const struct kvr_kernels *kvr_kernels(void);

/* The best variant this CPU supports. */
enum kvr_isa kvr_cpu_isa(void);

/* The table of one variant, or NULL if this CPU cannot run it (tests compare them). */
const struct kvr_kernels *kvr_kernels_get(enum kvr_isa isa);

/* "scalar", "avx2", "avx512". */
const char *kvr_isa_name(enum kvr_isa isa);

/* What the CPU offers, for --verbose: e.g. "avx512f avx512bw avx512vl avx512vnni
 * avx512bf16 avx2 fma f16c". Static string. */
const char *kvr_cpu_features(void);

/* Variant tables (kern_*.c); use kvr_kernels_get. */
extern const struct kvr_kernels kvr_kernels_scalar;
extern const struct kvr_kernels kvr_kernels_avx2;
extern const struct kvr_kernels kvr_kernels_avx512;
/* kern_avx512bf16.c: the gemm_*_bf16 pair; call only where the CPU has AVX512_BF16. */
void kvr_gemm_pack_bf16(uint32_t *wp, const void *w, size_t wstride, int n, int k);
void kvr_gemm_panel_bf16_avx512(float *y, size_t ldy, const uint16_t *x, size_t ldx, int m, const uint32_t *wp,
                                int n, int k, float beta);

#endif /* KVR_KERNELS_H */
