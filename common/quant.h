/* quant.h - the weight types the engine computes in (F32, F16, BF16, Q8_0), their byte
 * layouts (ggml's, as GGUF files store them), and the arithmetic of each type as
 * llama.cpp's CPU path defines it, so that results compare with llama.cpp's:
 *
 *   weights  activations are converted to   one dot product (weight row . activation row)
 *   F32      F32 (unchanged)                f32 products, f32 sums
 *   F16      F16 (round to nearest even)    f16 x f16 products (exact in f32), f32 sums
 *   BF16     BF16 (round to nearest even)   bf16 x bf16 products (exact in f32), f32 sums
 *   Q8_0     Q8_0 blocks of 32: d = max|x|/127 stored as f16, q = round(x/d)
 *                                           per block: integer sum of q_w*q_x, times d_w*d_x;
 *                                           f32 sum over blocks
 *
 * Every type has a scalar reference (kvr_vec_dot_ref: plain loops in the order above, the
 * definition the faster kernels are tested against), a portable kernel
 * (kvr_vec_dot_portable, always built) and the kernel the engine calls (kvr_vec_dot: the
 * AVX2 one when the build targets AVX2+FMA+F16C, else the portable one; issue 13 makes
 * these fast). None depends on the build machine's CPU for its result beyond float
 * summation order. One place for all of it: matmul.c calls only what is declared here. */
#ifndef KVR_QUANT_H
#define KVR_QUANT_H

#include <stddef.h>
#include <stdint.h>

/* Values are ggml's type numbers, so a GGUF tensor's type maps directly. */
enum kvr_dtype {
    KVR_DTYPE_F32 = 0,
    KVR_DTYPE_F16 = 1,
    KVR_DTYPE_Q8_0 = 8,
    KVR_DTYPE_BF16 = 30,
};

#define KVR_QK8_0 32 /* values per Q8_0 block */

/* One Q8_0 block: scale d (IEEE f16 bits) then 32 signed 8-bit values; value i is
 * qs[i] * d. 34 bytes, 2-byte aligned, exactly ggml's block_q8_0. */
struct kvr_block_q8_0 {
    uint16_t d;
    int8_t qs[KVR_QK8_0];
};
_Static_assert(sizeof(struct kvr_block_q8_0) == 34, "Q8_0 blocks are 34 bytes in GGUF files");

/* A weight matrix: `rows` rows (output features) of `cols` values (input features),
 * row-major, each row row_nbytes bytes (kvr_dtype_row_nbytes(type, cols)). For the
 * GGUF dimensions (ne0, ne1): cols = ne0, rows = ne1. data is borrowed from the model. */
struct kvr_tensor {
    enum kvr_dtype type;
    const void *data; /* (rows, row_nbytes) bytes; 4-byte aligned for F32, 2 otherwise */
    int64_t rows;
    int64_t cols;     /* a multiple of kvr_dtype_block(type) */
    size_t row_nbytes;
};

/* 1 for the four types above, 0 for any other ggml type number. */
int kvr_dtype_supported(uint32_t ggml_type);

/* "F32", "F16", "BF16", "Q8_0"; for other ggml type numbers their ggml name ("Q4_K")
 * or "unknown". Static string. */
const char *kvr_dtype_name(uint32_t ggml_type);

/* Values per block (1, or 32 for Q8_0) and bytes per block; t must be supported. */
int kvr_dtype_block(enum kvr_dtype t);
size_t kvr_dtype_block_nbytes(enum kvr_dtype t);

/* Bytes of n values (n a multiple of the block). */
size_t kvr_dtype_row_nbytes(enum kvr_dtype t, int64_t n);

/* The type activations are converted to for a product with weights of type w (the same
 * type for all four; named so that callers say what they mean). */
enum kvr_dtype kvr_dtype_dot(enum kvr_dtype w);

/* ggml's quantize_row_q8_0_ref: for each block of 32, amax = max |x|, d = amax / 127,
 * id = d ? 1/d : 0, d stored as f16, q = roundf(x * id) (half away from zero). NaN or
 * infinite inputs give q = 0 or +-127 (never undefined behaviour). n % 32 == 0. */
void kvr_quantize_row_q8_0(const float *x, struct kvr_block_q8_0 *y, int64_t n);

/* n values of type t at src (n a multiple of the block) as float32. Exact. */
void kvr_dequantize_row(enum kvr_dtype t, const void *src, float *dst, int64_t n);

/* Row `row` of t as float32 into dst (t->cols floats): the embedding lookup. */
void kvr_tensor_row(const struct kvr_tensor *t, int64_t row, float *dst);

/* x (n floats) converted for a product with weights of type w, into dst
 * (kvr_dtype_row_nbytes(kvr_dtype_dot(w), n) bytes). */
void kvr_act_convert_row(enum kvr_dtype w, const float *x, void *dst, int64_t n);

/* Dot product of one weight row of type w (n values) with one activation row converted
 * by kvr_act_convert_row. kvr_vec_dot is the engine's kernel, kvr_vec_dot_ref the scalar
 * reference; they agree to float summation order (bit for bit for Q8_0). */
float kvr_vec_dot(enum kvr_dtype w, const void *wrow, const void *xconv, int64_t n);
float kvr_vec_dot_ref(enum kvr_dtype w, const void *wrow, const void *xconv, int64_t n);

/* The portable kernel (what kvr_vec_dot runs on a build without AVX2), callable on any
 * build so that tests check it too. */
float kvr_vec_dot_portable(enum kvr_dtype w, const void *wrow, const void *xconv, int64_t n);

/* Which kernel kvr_vec_dot runs in this build: "avx2" or "portable". */
const char *kvr_vec_dot_kernel(void);

#endif /* KVR_QUANT_H */
