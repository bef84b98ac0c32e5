/* quant.c - weight types: conversions, Q8_0 quantization, the reference dot product of
 * each type and the kernels the engine calls (quant.h). Called by matmul.c (products),
 * model.c and gguf.c (sizes), transformer.c (embedding rows). Owns no memory.
 *
 * The SIMD kernels are in the variant files chosen at run time (kernels.h); this file
 * keeps the scalar reference and the portable kernel (the scalar variant's). */
#include "quant.h"

#include <math.h>
#include <string.h>

#include "half.h"
#include "kernels.h"
#include "log.h"


/* ---- type table ------------------------------------------------------------------- */

int kvr_dtype_supported(uint32_t t) {
    return t == KVR_DTYPE_F32 || t == KVR_DTYPE_F16 || t == KVR_DTYPE_BF16 || t == KVR_DTYPE_Q8_0;
}

const char *kvr_dtype_name(uint32_t t) {
    /* ggml's names, so that an error about a type the engine does not run reads the same
     * as llama.cpp's tools print it. Gaps are numbers ggml retired. */
    static const char *const names[] = {
        "F32",     "F16",    "Q4_0",    "Q4_1",  "Q4_2",   "Q4_3",  "Q5_0",   "Q5_1",
        "Q8_0",    "Q8_1",   "Q2_K",    "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",   "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",  "IQ4_XS",
        "I8",      "I16",    "I32",     "I64",   "F64",    "IQ1_M", "BF16",   "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8",
        "MXFP4",
    };
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

int kvr_dtype_block(enum kvr_dtype t) { return t == KVR_DTYPE_Q8_0 ? KVR_QK8_0 : 1; }

size_t kvr_dtype_block_nbytes(enum kvr_dtype t) {
    switch (t) {
    case KVR_DTYPE_F32: return 4;
    case KVR_DTYPE_F16:
    case KVR_DTYPE_BF16: return 2;
    case KVR_DTYPE_Q8_0: return sizeof(struct kvr_block_q8_0);
    }
    KVR_ASSERT(!"unsupported dtype");
    return 0;
}

size_t kvr_dtype_row_nbytes(enum kvr_dtype t, int64_t n) {
    return (size_t)(n / kvr_dtype_block(t)) * kvr_dtype_block_nbytes(t);
}

enum kvr_dtype kvr_dtype_dot(enum kvr_dtype w) { return w; }

/* ---- conversions ------------------------------------------------------------------ */

void kvr_quantize_row_q8_0(const float *x, struct kvr_block_q8_0 *y, int64_t n) {
    for (int64_t b = 0; b < n / KVR_QK8_0; b++) {
        const float *xb = x + b * KVR_QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < KVR_QK8_0; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = kvr_f32_to_f16(d);
        for (int j = 0; j < KVR_QK8_0; j++) {
            float q = roundf(xb[j] * id);
            /* |x * id| <= 127 up to a rounding ulp for finite x; NaN (a NaN or infinite
             * input) would make the int8 conversion undefined. */
            q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q == q ? q : 0.0f;
            y[b].qs[j] = (int8_t)q;
        }
    }
}

void kvr_dequantize_row(enum kvr_dtype t, const void *src, float *dst, int64_t n) {
    switch (t) {
    case KVR_DTYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    case KVR_DTYPE_F16: {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = kvr_f16_to_f32(s[i]);
        return;
    }
    case KVR_DTYPE_BF16: {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = kvr_bf16_to_f32(s[i]);
        return;
    }
    case KVR_DTYPE_Q8_0: {
        const struct kvr_block_q8_0 *b = src;
        for (int64_t i = 0; i < n / KVR_QK8_0; i++) {
            float d = kvr_f16_to_f32(b[i].d);
            for (int j = 0; j < KVR_QK8_0; j++)
                dst[i * KVR_QK8_0 + j] = (float)b[i].qs[j] * d;
        }
        return;
    }
    }
    KVR_ASSERT(!"unsupported dtype");
}

void kvr_tensor_row(const struct kvr_tensor *t, int64_t row, float *dst) {
    kvr_dequantize_row(t->type, (const char *)t->data + (size_t)row * t->row_nbytes, dst, t->cols);
}

void kvr_act_convert_row(enum kvr_dtype w, const float *x, void *dst, int64_t n) {
    switch (kvr_dtype_dot(w)) {
    case KVR_DTYPE_F32:
        memcpy(dst, x, (size_t)n * sizeof(float));
        return;
    case KVR_DTYPE_F16: {
        uint16_t *o = dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = kvr_f32_to_f16(x[i]);
        return;
    }
    case KVR_DTYPE_BF16: {
        uint16_t *o = dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = kvr_f32_to_bf16(x[i]);
        return;
    }
    case KVR_DTYPE_Q8_0:
        kvr_quantize_row_q8_0(x, dst, n);
        return;
    }
    KVR_ASSERT(!"unsupported dtype");
}

/* ---- scalar references ------------------------------------------------------------
 * The definitions: one accumulator, index order, no fused multiply-add (ISO C mode does
 * not contract a*b+c). */

static float dot_ref_f32(const float *w, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += w[i] * x[i];
    return s;
}

static float dot_ref_f16(const uint16_t *w, const uint16_t *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += kvr_f16_to_f32(w[i]) * kvr_f16_to_f32(x[i]);
    return s;
}

static float dot_ref_bf16(const uint16_t *w, const uint16_t *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += kvr_bf16_to_f32(w[i]) * kvr_bf16_to_f32(x[i]);
    return s;
}

static float dot_ref_q8_0(const struct kvr_block_q8_0 *w, const struct kvr_block_q8_0 *x, int64_t n) {
    float s = 0.0f;
    for (int64_t b = 0; b < n / KVR_QK8_0; b++) {
        int32_t sumi = 0;
        for (int j = 0; j < KVR_QK8_0; j++)
            sumi += (int32_t)w[b].qs[j] * (int32_t)x[b].qs[j];
        s += (float)sumi * (kvr_f16_to_f32(w[b].d) * kvr_f16_to_f32(x[b].d));
    }
    return s;
}

float kvr_vec_dot_ref(enum kvr_dtype w, const void *wrow, const void *xconv, int64_t n) {
    switch (w) {
    case KVR_DTYPE_F32: return dot_ref_f32(wrow, xconv, n);
    case KVR_DTYPE_F16: return dot_ref_f16(wrow, xconv, n);
    case KVR_DTYPE_BF16: return dot_ref_bf16(wrow, xconv, n);
    case KVR_DTYPE_Q8_0: return dot_ref_q8_0(wrow, xconv, n);
    }
    KVR_ASSERT(!"unsupported dtype");
    return 0.0f;
}

/* ---- the portable kernel ----------------------------------------------------------- */

/* Portable: eight partial sums the compiler may keep in one vector register. */

static float sum8(const float a[8]) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

static float dot_f32_portable(const float *w, const float *x, int64_t n) {
    float a[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            a[j] += w[i + j] * x[i + j];
    float s = sum8(a);
    for (; i < n; i++)
        s += w[i] * x[i];
    return s;
}

static float dot_f16_portable(const uint16_t *w, const uint16_t *x, int64_t n) {
    float a[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            a[j] += kvr_f16_to_f32(w[i + j]) * kvr_f16_to_f32(x[i + j]);
    float s = sum8(a);
    for (; i < n; i++)
        s += kvr_f16_to_f32(w[i]) * kvr_f16_to_f32(x[i]);
    return s;
}

static float dot_bf16_portable(const uint16_t *w, const uint16_t *x, int64_t n) {
    float a[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            a[j] += kvr_bf16_to_f32(w[i + j]) * kvr_bf16_to_f32(x[i + j]);
    float s = sum8(a);
    for (; i < n; i++)
        s += kvr_bf16_to_f32(w[i]) * kvr_bf16_to_f32(x[i]);
    return s;
}

/* The integer block sums are exact, and the float operations after them are the
 * reference's in the reference's order: the result is the reference's bit for bit. */
static float dot_q8_0_portable(const struct kvr_block_q8_0 *w, const struct kvr_block_q8_0 *x, int64_t n) {
    return dot_ref_q8_0(w, x, n);
}

float kvr_vec_dot_portable(enum kvr_dtype w, const void *wrow, const void *xconv, int64_t n) {
    switch (w) {
    case KVR_DTYPE_F32: return dot_f32_portable(wrow, xconv, n);
    case KVR_DTYPE_F16: return dot_f16_portable(wrow, xconv, n);
    case KVR_DTYPE_BF16: return dot_bf16_portable(wrow, xconv, n);
    case KVR_DTYPE_Q8_0: return dot_q8_0_portable(wrow, xconv, n);
    }
    KVR_ASSERT(!"unsupported dtype");
    return 0.0f;
}

/* The run-time chosen variant's rows kernel (kernels.h) for one value: the same bits as
 * that kernel gives the value inside any product. */
float kvr_vec_dot(enum kvr_dtype w, const void *wrow, const void *xconv, int64_t n) {
    float y = 0.0f;
    kvr_kernels()->rows(w, &y, 1, wrow, 0, 1, xconv, 0, 1, (int)n, 0.0f);
    return y;
}

const char *kvr_vec_dot_kernel(void) { return kvr_kernels()->name; }
