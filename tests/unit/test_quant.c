/* test_quant.c - the weight types' arithmetic (common/quant.c) and the products over them
 * (common/matmul.c):
 *  - Q8_0 quantization against values worked out by hand (scale, f16 rounding of the
 *    scale, round-half-away-from-zero, zero and non-finite blocks);
 *  - every type's kernels (the engine's, the portable one, the scalar reference) against
 *    a naive double-precision dot product on seeded random data: with the activations
 *    rounded as the type's convention says (only float summation may differ: NMSE below
 *    1e-11), and with the exact activations (the convention's own error: NMSE per type);
 *  - kvr_matmul for each type, few rows and many, one thread and two, with beta, against
 *    the double reference; for non-F32 weights, slices and batches that change no bit;
 *    kvr_matmul_multi sharing one conversion across ops of mixed types; batch 1 on the
 *    pool (a range per thread) bit for bit one slice;
 *  - the prefill GEMM: every variant's f32 panel kernel against the fmaf chain, and the
 *    AVX512-BF16 one (where the CPU has it; said when skipped) against the double
 *    reference of its bf16 inputs, bit-identical at any m, row or column place.
 * Weights are decoded for the references by ref_dequant_row (tests/unit/ref_forward.c),
 * written apart from quant.c. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "half.h"
#include "kernels.h"
#include "matmul.h"
#include "quant.h"
#include "ref_forward.h"
#include "status.h"
#include "threadpool.h"

static uint64_t rng_state = 0x1234567887654321ull;

static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Roughly normal (sum of 4 uniforms), scaled; an occasional outlier x8, as activations have. */
static float frand(float scale) {
    double s = 0;
    for (int i = 0; i < 4; i++)
        s += (double)(next_u64() >> 11) * (1.0 / 9007199254740992.0) - 0.5;
    if (next_u64() % 64 == 0)
        s *= 8;
    return (float)(s * 1.7320508) * scale;
}

static const enum kvr_dtype all_types[] = {KVR_DTYPE_F32, KVR_DTYPE_F16, KVR_DTYPE_BF16, KVR_DTYPE_Q8_0};

/* A (rows, cols) weight of type t from f32 values: stored as the type stores it. */
static struct kvr_tensor make_weight(enum kvr_dtype t, const float *w, int rows, int cols, void **buf) {
    size_t rb = kvr_dtype_row_nbytes(t, cols);
    unsigned char *p = malloc(rb * (size_t)rows);
    REQUIRE(p);
    for (int r = 0; r < rows; r++) {
        const float *wr = w + (size_t)r * cols;
        unsigned char *o = p + rb * (size_t)r;
        if (t == KVR_DTYPE_F32) {
            memcpy(o, wr, rb);
        } else if (t == KVR_DTYPE_Q8_0) {
            kvr_quantize_row_q8_0(wr, (struct kvr_block_q8_0 *)(void *)o, cols);
        } else {
            for (int i = 0; i < cols; i++) {
                uint16_t h = t == KVR_DTYPE_F16 ? kvr_f32_to_f16(wr[i]) : kvr_f32_to_bf16(wr[i]);
                memcpy(o + 2 * i, &h, 2);
            }
        }
    }
    *buf = p;
    return (struct kvr_tensor){.type = t, .data = p, .rows = rows, .cols = cols, .row_nbytes = rb};
}

/* ---- Q8_0 against known values ----------------------------------------------------------- */

static void test_q8_0_known(void) {
    struct kvr_block_q8_0 b;
    float x[32], y[32];

    /* amax 127: d = 1 exactly (f16 0x3C00), q = roundf(x), halves away from zero. */
    const float in1[8] = {127.0f, -127.0f, 0.5f, -0.5f, 1.5f, 2.5f, -2.5f, 0.49f};
    const int8_t want1[8] = {127, -127, 1, -1, 2, 3, -3, 0};
    memset(x, 0, sizeof x);
    memcpy(x, in1, sizeof in1);
    kvr_quantize_row_q8_0(x, &b, 32);
    CHECK_EQ(b.d, 0x3C00);
    for (int i = 0; i < 8; i++)
        CHECK_EQ(b.qs[i], want1[i]);
    for (int i = 8; i < 32; i++)
        CHECK_EQ(b.qs[i], 0);

    /* amax 63.5: d = 0.5 (0x3800), id = 2. */
    for (int i = 0; i < 32; i++)
        x[i] = 0.25f * (float)(i - 16); /* -4 .. 3.75 */
    x[5] = -63.5f;
    kvr_quantize_row_q8_0(x, &b, 32);
    CHECK_EQ(b.d, 0x3800);
    CHECK_EQ(b.qs[5], -127);
    CHECK_EQ(b.qs[0], -8);  /* -4 * 2 */
    CHECK_EQ(b.qs[17], 1);  /* 0.25 * 2 = 0.5 -> 1 */
    CHECK_EQ(b.qs[15], -1); /* -0.5 -> -1 */
    CHECK_EQ(b.qs[19], 2);  /* 0.75 * 2 = 1.5 -> 2 */
    CHECK_EQ(b.qs[31], 8);  /* 3.75 * 2 = 7.5 -> 8 */

    /* amax 1: d = 1/127 rounds to the f16 2^-7 * (1 + 8/1024) = 0x2008; q is computed
     * with the unrounded d, so x = 1 gives 127; dequantized: 127 * 0.0078811645... */
    memset(x, 0, sizeof x);
    x[0] = 1.0f;
    x[1] = -0.5f;
    kvr_quantize_row_q8_0(x, &b, 32);
    CHECK_EQ(b.d, 0x2008);
    CHECK_EQ(b.qs[0], 127);
    CHECK_EQ(b.qs[1], -64); /* -0.5 * 127 = -63.5 -> -64 */
    kvr_dequantize_row(KVR_DTYPE_Q8_0, &b, y, 32);
    CHECK(y[0] == 127.0f * 0.00787353515625f); /* 2^-7 * (1 + 8/1024) */

    /* All zero: d = 0, q = 0. A block so small that d rounds to f16 zero keeps its q. */
    memset(x, 0, sizeof x);
    kvr_quantize_row_q8_0(x, &b, 32);
    CHECK_EQ(b.d, 0);
    for (int i = 0; i < 32; i++)
        CHECK_EQ(b.qs[i], 0);
    x[3] = 1e-6f;
    kvr_quantize_row_q8_0(x, &b, 32);
    CHECK_EQ(b.d, 0);
    CHECK_EQ(b.qs[3], 127);

    /* Non-finite inputs: no undefined conversion, values stay in range. */
    x[0] = NAN;
    x[1] = INFINITY;
    x[2] = -3.0f;
    kvr_quantize_row_q8_0(x, &b, 32);
    for (int i = 0; i < 32; i++)
        CHECK(b.qs[i] >= -127 && b.qs[i] <= 127);
    CHECK_EQ(b.qs[0], 0);

    /* Two blocks are independent. */
    float x2[64];
    for (int i = 0; i < 64; i++)
        x2[i] = i < 32 ? 127.0f * (float)(i % 2) : 63.5f;
    struct kvr_block_q8_0 b2[2];
    kvr_quantize_row_q8_0(x2, b2, 64);
    CHECK_EQ(b2[0].d, 0x3C00);
    CHECK_EQ(b2[1].d, 0x3800);
    CHECK_EQ(b2[1].qs[0], 127);
}

/* ---- dot kernels ---------------------------------------------------------------------------- */

static double nmse(const double *ref, const float *got, int n) {
    double e = 0, s = 0;
    for (int i = 0; i < n; i++) {
        e += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
        s += ref[i] * ref[i];
    }
    return s > 0 ? e / s : e;
}

/* What the activation row becomes for weights of type t, decoded independently. */
static void rounded_act(enum kvr_dtype t, const float *x, int n, float *out) {
    size_t nb = kvr_dtype_row_nbytes(t, n);
    void *conv = malloc(nb);
    REQUIRE(conv);
    kvr_act_convert_row(t, x, conv, n);
    struct kvr_tensor v = {.type = t, .data = conv, .rows = 1, .cols = n, .row_nbytes = nb};
    ref_dequant_row(&v, 0, out);
    free(conv);
}

static void test_dot(void) {
    /* The activations' rounding, measured on this data: f16 <= 7e-8, bf16 <= 6e-6, q8_0
     * <= 2e-4 (its largest at n = 64: two blocks, few values to average over); the
     * bounds leave 5-8x. */
    const double conv_nmse[] = {1e-12, 5e-7, 5e-5, 1e-3};
    const int lens[] = {32, 64, 96, 256, 1024, 2048 + 32};
    enum { ROWS = 24 };
    for (size_t ti = 0; ti < sizeof all_types / sizeof all_types[0]; ti++) {
        enum kvr_dtype t = all_types[ti];
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
            int n = lens[li];
            float *w = malloc((size_t)ROWS * n * sizeof *w), *x = malloc((size_t)n * sizeof *x);
            float *xr = malloc((size_t)n * sizeof *xr), *wr = malloc((size_t)n * sizeof *wr);
            float got[ROWS], port[ROWS], ref[ROWS];
            double exact_r[ROWS], exact_x[ROWS];
            REQUIRE(w && x && xr && wr);
            for (int i = 0; i < ROWS * n; i++)
                w[i] = frand(0.05f);
            for (int i = 0; i < n; i++)
                x[i] = frand(1.0f);
            void *wbuf;
            struct kvr_tensor wt = make_weight(t, w, ROWS, n, &wbuf);
            size_t xb = kvr_dtype_row_nbytes(kvr_dtype_dot(t), n);
            void *xc = malloc(xb);
            REQUIRE(xc);
            kvr_act_convert_row(t, x, xc, n);
            rounded_act(t, x, n, xr);
            for (int r = 0; r < ROWS; r++) {
                const void *row = (const char *)wt.data + (size_t)r * wt.row_nbytes;
                got[r] = kvr_vec_dot(t, row, xc, n);
                port[r] = kvr_vec_dot_portable(t, row, xc, n);
                ref[r] = kvr_vec_dot_ref(t, row, xc, n);
                ref_dequant_row(&wt, r, wr);
                exact_r[r] = exact_x[r] = 0;
                for (int i = 0; i < n; i++) {
                    exact_r[r] += (double)wr[i] * (double)xr[i];
                    exact_x[r] += (double)wr[i] * (double)x[i];
                }
            }
            double e_got = nmse(exact_r, got, ROWS), e_port = nmse(exact_r, port, ROWS);
            double e_ref = nmse(exact_r, ref, ROWS), e_conv = nmse(exact_x, got, ROWS);
            if (!(e_got < 1e-11 && e_port < 1e-11 && e_ref < 1e-11 && e_conv < conv_nmse[ti]))
                fprintf(stderr, "  %s n=%d: nmse kernel %.3g portable %.3g reference %.3g, vs exact x %.3g\n",
                        kvr_dtype_name(t), n, e_got, e_port, e_ref, e_conv);
            CHECK(e_got < 1e-11);
            CHECK(e_port < 1e-11);
            CHECK(e_ref < 1e-11);
            CHECK(e_conv < conv_nmse[ti]);
            if (t == KVR_DTYPE_Q8_0) /* integer block sums: every kernel is the reference */
                for (int r = 0; r < ROWS; r++)
                    CHECK(got[r] == ref[r] && port[r] == ref[r]);
            free(w), free(x), free(xr), free(wr), free(xc), free(wbuf);
        }
    }
    fprintf(stderr, "dot kernels (engine: %s) agree with the double reference\n", kvr_vec_dot_kernel());
}

/* ---- every kernel variant this CPU runs ------------------------------------------------------ */

/* Each variant (kernels.h) against the double reference, and its own batch independence:
 * a value computed in a product of m activation rows and n weight rows, at any offset,
 * equals the same value computed alone, bit for bit. Q8_0: every variant is the scalar
 * reference bit for bit. Lengths cover whole vectors, a partial last chunk and both
 * accumulators. */
static void test_variants(void) {
    enum { N = 37, M = 7 };
    /* 87 and 117 (F32/F16/BF16 only; Q8_0 rows are whole 32-value blocks): the batch-1
     * kernel's tails after its 64-value loop (a whole 16-value chunk, a masked one). */
    const int lens[] = {32, 64, 96, 160, 768 + 32, 87, 117};
    for (int isa = KVR_ISA_SCALAR; isa <= KVR_ISA_AVX512; isa++) {
        const struct kvr_kernels *K = kvr_kernels_get((enum kvr_isa)isa);
        if (!K) {
            fprintf(stderr, "variant %s: this CPU lacks it (has: %s), not tested here\n",
                    kvr_isa_name((enum kvr_isa)isa), kvr_cpu_features());
            continue;
        }
        for (size_t ti = 0; ti < sizeof all_types / sizeof all_types[0]; ti++) {
            enum kvr_dtype t = all_types[ti];
            for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
                int k = lens[li];
                if (t == KVR_DTYPE_Q8_0 && k % KVR_QK8_0 != 0)
                    continue;
                float *w = malloc((size_t)N * k * sizeof *w), *x = malloc((size_t)M * k * sizeof *x);
                float *wr = malloc((size_t)k * sizeof *wr), *xr = malloc((size_t)k * sizeof *xr);
                float *y = malloc((size_t)M * N * sizeof *y), one;
                double *ref = malloc((size_t)M * N * sizeof *ref);
                REQUIRE(w && x && wr && xr && y && ref);
                for (int i = 0; i < N * k; i++)
                    w[i] = frand(0.05f);
                for (int i = 0; i < M * k; i++)
                    x[i] = frand(1.0f);
                void *wbuf;
                struct kvr_tensor wt = make_weight(t, w, N, k, &wbuf);
                size_t xs = kvr_dtype_row_nbytes(kvr_dtype_dot(t), k);
                char *xc = malloc(xs * M);
                REQUIRE(xc);
                for (int i = 0; i < M; i++)
                    kvr_act_convert_row(t, x + (size_t)i * k, xc + (size_t)i * xs, k);
                for (int i = 0; i < M; i++) {
                    rounded_act(t, x + (size_t)i * k, k, xr);
                    for (int j = 0; j < N; j++) {
                        ref_dequant_row(&wt, j, wr);
                        double d = 0;
                        for (int q = 0; q < k; q++)
                            d += (double)wr[q] * (double)xr[q];
                        ref[(size_t)i * N + j] = d;
                    }
                }
                K->rows(t, y, N, wt.data, wt.row_nbytes, N, xc, xs, M, k, 0.0f);
                double e = nmse(ref, y, M * N);
                if (!(e < 1e-11))
                    fprintf(stderr, "  %s %s k=%d: nmse %.3g\n", K->name, kvr_dtype_name(t), k, e);
                CHECK(e < 1e-11);
                int same = 1, same_ref = 1;
                for (int i = 0; i < M; i++)
                    for (int j = 0; j < N; j++) {
                        const char *wrow = (const char *)wt.data + (size_t)j * wt.row_nbytes;
                        K->rows(t, &one, 1, wrow, 0, 1, xc + (size_t)i * xs, 0, 1, k, 0.0f);
                        same &= memcmp(&one, &y[(size_t)i * N + j], sizeof one) == 0;
                        if (t == KVR_DTYPE_Q8_0)
                            same_ref &= one == kvr_vec_dot_ref(t, wrow, xc + (size_t)i * xs, k);
                    }
                if (!same || !same_ref)
                    fprintf(stderr, "  %s %s k=%d: batch-independent %d, equal to the reference %d\n",
                            K->name, kvr_dtype_name(t), k, same, same_ref);
                CHECK(same);
                CHECK(same_ref);
                /* An odd slice of rows and columns, with beta: the same values again. */
                float *y2 = malloc((size_t)M * N * sizeof *y2);
                REQUIRE(y2);
                for (int i = 0; i < M * N; i++)
                    y2[i] = 1.0f;
                K->rows(t, y2 + N + 3, N, (const char *)wt.data + 3 * wt.row_nbytes, wt.row_nbytes, N - 3,
                        xc + xs, xs, M - 1, k, 1.0f);
                int beta_ok = 1;
                for (int i = 1; i < M; i++)
                    for (int j = 3; j < N; j++)
                        beta_ok &= y2[(size_t)i * N + j] == y[(size_t)i * N + j] + 1.0f * 1.0f;
                CHECK(beta_ok);
                free(y2);
                free(w), free(x), free(wr), free(xr), free(y), free(ref), free(xc), free(wbuf);
            }
        }
        fprintf(stderr, "variant %s: all types agree with the double reference, batch-independent\n", K->name);
    }
}

/* ---- products -------------------------------------------------------------------------------- */

/* y (m, n) = rounded x . dequantized W^T + beta * y0, in double. */
static void ref_matmul(enum kvr_dtype t, const struct kvr_tensor *w, const float *x, const float *y0,
                       float beta, int m, double *out) {
    int n = (int)w->rows, k = (int)w->cols;
    float *wr = malloc((size_t)k * sizeof *wr), *xr = malloc((size_t)k * sizeof *xr);
    REQUIRE(wr && xr);
    for (int i = 0; i < m; i++) {
        rounded_act(t, x + (size_t)i * k, k, xr);
        for (int j = 0; j < n; j++) {
            ref_dequant_row(w, j, wr);
            double s = 0;
            for (int q = 0; q < k; q++)
                s += (double)wr[q] * (double)xr[q];
            out[(size_t)i * n + j] = s + (double)beta * (double)y0[(size_t)i * n + j];
        }
    }
    free(wr);
    free(xr);
}

static void test_matmul(struct kvr_threadpool *tp) {
    const int ms[] = {1, 2, 5, 13, 32, 33, 70};
    const int ns[] = {48, 67};
    const int ks[] = {64, 320};
    struct kvr_matmul_ws *ws = NULL;
    struct kvr_matmul_ws_params wp = {.m_max = 70, .k_max = {320, 320, 320}};
    REQUIRE(kvr_matmul_ws_create(&wp, &ws) == KVR_OK);
    for (size_t ti = 0; ti < sizeof all_types / sizeof all_types[0]; ti++) {
        enum kvr_dtype t = all_types[ti];
        for (size_t ni = 0; ni < 2; ni++) {
            for (size_t ki = 0; ki < 2; ki++) {
                int n = ns[ni], k = ks[ki];
                float *w = malloc((size_t)n * k * sizeof *w);
                REQUIRE(w);
                for (int i = 0; i < n * k; i++)
                    w[i] = frand(0.05f);
                void *wbuf;
                struct kvr_tensor wt = make_weight(t, w, n, k, &wbuf);
                for (size_t mi = 0; mi < sizeof ms / sizeof ms[0]; mi++) {
                    int m = ms[mi];
                    float *x = malloc((size_t)m * k * sizeof *x), *y0 = malloc((size_t)m * n * sizeof *y0);
                    float *y = malloc((size_t)m * n * sizeof *y), *y2 = malloc((size_t)m * n * sizeof *y2);
                    double *ref = malloc((size_t)m * n * sizeof *ref);
                    REQUIRE(x && y0 && y && y2 && ref);
                    for (int i = 0; i < m * k; i++)
                        x[i] = frand(1.0f);
                    for (int i = 0; i < m * n; i++)
                        y0[i] = frand(1.0f);
                    for (int b = 0; b < 2; b++) {
                        float beta = b ? 1.0f : 0.0f;
                        memcpy(y, y0, (size_t)m * n * sizeof *y);
                        kvr_matmul(NULL, ws, y, x, &wt, m, beta);
                        ref_matmul(t, &wt, x, y0, beta, m, ref);
                        double e = nmse(ref, y, m * n);
                        if (!(e < 1e-11))
                            fprintf(stderr, "  %s m=%d n=%d k=%d beta=%g: nmse %.3g\n", kvr_dtype_name(t), m, n,
                                    k, (double)beta, e);
                        CHECK(e < 1e-11);
                        /* Slices in any order and the product through the pool: the same
                         * bits for a non-F32 weight (one kernel call per value), the same
                         * values up to summation for F32 (its kernels and sgemm block by
                         * columns). */
                        int bitwise = t != KVR_DTYPE_F32;
                        memcpy(y2, y0, (size_t)m * n * sizeof *y2);
                        struct kvr_matmul_act a;
                        kvr_matmul_act_prepare(ws, 0, x, m, k, t, &a);
                        int half = n / 2;
                        kvr_matmul_slice(y2, n, &a, &wt, half, n, beta);
                        kvr_matmul_slice(y2, n, &a, &wt, 0, half, beta);
                        CHECK(bitwise ? memcmp(y, y2, (size_t)m * n * sizeof *y) == 0 : nmse(ref, y2, m * n) < 1e-11);
                        memcpy(y2, y0, (size_t)m * n * sizeof *y2);
                        kvr_matmul(tp, ws, y2, x, &wt, m, beta);
                        CHECK(bitwise ? memcmp(y, y2, (size_t)m * n * sizeof *y) == 0 : nmse(ref, y2, m * n) < 1e-11);
                    }
                    /* A non-F32 weight: a row's result does not depend on the other rows
                     * of the batch, few or many (prefill of a batch of prompts = each
                     * prompt alone = decode token by token). */
                    if (t != KVR_DTYPE_F32 && m > 1) {
                        kvr_matmul(NULL, ws, y, x, &wt, m, 0.0f);
                        for (int i = 0; i < m; i += m - 1) {
                            kvr_matmul(NULL, ws, y2, x + (size_t)i * k, &wt, 1, 0.0f);
                            CHECK(memcmp(y + (size_t)i * n, y2, (size_t)n * sizeof *y) == 0);
                        }
                    }
                    free(x), free(y0), free(y), free(y2), free(ref);
                }
                free(w);
                free(wbuf);
            }
        }
    }

    /* One multi call, Q8_0, F16 and BF16 weights on one input: one conversion per type,
     * each result equal to its own product. */
    int m = 3, k = 64, n = 40;
    float *x = malloc((size_t)m * k * sizeof *x), *w = malloc((size_t)n * k * sizeof *w);
    float *ys[3], *yr = malloc((size_t)m * n * sizeof *yr);
    REQUIRE(x && w && yr);
    for (int i = 0; i < m * k; i++)
        x[i] = frand(1.0f);
    for (int i = 0; i < n * k; i++)
        w[i] = frand(0.05f);
    void *bufs[3];
    struct kvr_tensor wts[3];
    const enum kvr_dtype mixed[3] = {KVR_DTYPE_Q8_0, KVR_DTYPE_F16, KVR_DTYPE_BF16};
    struct kvr_matmul_op ops[3];
    for (int o = 0; o < 3; o++) {
        wts[o] = make_weight(mixed[o], w, n, k, &bufs[o]);
        REQUIRE((ys[o] = malloc((size_t)m * n * sizeof *ys[o])) != NULL);
        ops[o] = (struct kvr_matmul_op){.y = ys[o], .x = x, .w = &wts[o], .m = m, .beta = 0.0f};
    }
    kvr_matmul_multi(tp, ws, ops, 3);
    for (int o = 0; o < 3; o++) {
        kvr_matmul(NULL, ws, yr, x, &wts[o], m, 0.0f);
        CHECK(memcmp(yr, ys[o], (size_t)m * n * sizeof *yr) == 0);
        free(ys[o]);
        free(bufs[o]);
    }
    free(x), free(w), free(yr);

    /* Batch 1 big enough for the pool (kvr_matmul_b1_run: a range per thread, tails
     * taken by whoever is free): three products of one call, every type, row counts that
     * are not whole 16-row slices; each equal, bit for bit, to one single-threaded slice
     * over all its rows (the per-row kernels do not depend on where a call starts). */
    k = 320;
    const int b1n[3] = {1000, 333, 1040};
    x = malloc((size_t)k * sizeof *x);
    REQUIRE(x);
    for (int i = 0; i < k; i++)
        x[i] = frand(1.0f);
    for (size_t ti = 0; ti < sizeof all_types / sizeof all_types[0]; ti++) {
        enum kvr_dtype t = all_types[ti];
        float *wv[3];
        for (int o = 0; o < 3; o++) {
            REQUIRE((wv[o] = malloc((size_t)b1n[o] * k * sizeof *wv[o])) != NULL);
            for (int i = 0; i < b1n[o] * k; i++)
                wv[o][i] = frand(0.05f);
            wts[o] = make_weight(t, wv[o], b1n[o], k, &bufs[o]);
            REQUIRE((ys[o] = malloc((size_t)b1n[o] * sizeof *ys[o])) != NULL);
            ops[o] = (struct kvr_matmul_op){.y = ys[o], .x = x, .w = &wts[o], .m = 1, .beta = 0.0f};
        }
        for (int rep = 0; rep < 20; rep++) {
            kvr_matmul_multi(tp, ws, ops, 3);
            for (int o = 0; o < 3; o++) {
                float *yr1 = malloc((size_t)b1n[o] * sizeof *yr1);
                REQUIRE(yr1);
                struct kvr_matmul_act a;
                kvr_matmul_act_prepare(ws, 0, x, 1, k, t, &a);
                kvr_matmul_slice(yr1, b1n[o], &a, &wts[o], 0, b1n[o], 0.0f);
                if (memcmp(yr1, ys[o], (size_t)b1n[o] * sizeof *yr1) != 0) {
                    fprintf(stderr, "  batch 1 on the pool, %s, product %d: differs from one slice\n",
                            kvr_dtype_name(t), o);
                    CHECK(0);
                    rep = 20;
                }
                free(yr1);
            }
        }
        for (int o = 0; o < 3; o++)
            free(wv[o]), free(bufs[o]), free(ys[o]);
    }
    free(x);
    kvr_matmul_ws_free(ws);
}

/* ---- rows and conversions ------------------------------------------------------------------- */

static void test_rows(void) {
    /* kvr_tensor_row decodes what the independent decoder decodes, every type. */
    enum { R = 5, C = 96 };
    float w[R * C], a[C], b[C];
    for (int i = 0; i < R * C; i++)
        w[i] = frand(2.0f);
    for (size_t ti = 0; ti < sizeof all_types / sizeof all_types[0]; ti++) {
        void *buf;
        struct kvr_tensor t = make_weight(all_types[ti], w, R, C, &buf);
        for (int r = 0; r < R; r++) {
            kvr_tensor_row(&t, r, a);
            ref_dequant_row(&t, r, b);
            CHECK(memcmp(a, b, sizeof a) == 0);
        }
        free(buf);
    }
    CHECK_STREQ(kvr_dtype_name(KVR_DTYPE_Q8_0), "Q8_0");
    CHECK_STREQ(kvr_dtype_name(12), "Q4_K");
    CHECK_STREQ(kvr_dtype_name(1000), "unknown");
    CHECK(kvr_dtype_supported(KVR_DTYPE_BF16) && !kvr_dtype_supported(2) && !kvr_dtype_supported(12));
    CHECK_EQ(kvr_dtype_row_nbytes(KVR_DTYPE_Q8_0, 64), 68);
    CHECK_EQ(kvr_dtype_row_nbytes(KVR_DTYPE_F16, 172), 344);
}

/* ---- the BF16 prefill GEMM on AVX512-BF16 (kernels.h gemm_panel_bf16) ------------------------ */

/* Columns c0 .. c0+nn-1 of an (n, k) bf16 matrix as kernels.h describes the panel: per
 * k-pair p, KVR_GEMM_NR words (w[j][2p] | w[j][2p+1] << 16), zeros past an odd k's end and
 * past nn. Written here apart from the kernels' own packing. */
static void pack_bf16_pairs(uint32_t *wp, const uint16_t *w, int k, int c0, int nn) {
    for (int p = 0; p < (k + 1) / 2; p++)
        for (int j = 0; j < KVR_GEMM_NR; j++) {
            uint32_t lo = 0, hi = 0;
            if (j < nn) {
                lo = w[(size_t)(c0 + j) * k + 2 * (size_t)p];
                hi = 2 * p + 1 < k ? w[(size_t)(c0 + j) * k + 2 * (size_t)p + 1] : 0;
            }
            wp[(size_t)p * KVR_GEMM_NR + j] = lo | hi << 16;
        }
}

static double bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* y[i][j] (i < m, j < n, ldy = n) by the kernel, panel by panel, from bf16 x (m, k) and w (n, k). */
static void gemm_bf16_all(const struct kvr_kernels *K, float *y, const uint16_t *x, int m, const uint16_t *w, int n,
                          int k, uint32_t *wp, float beta) {
    for (int c0 = 0; c0 < n; c0 += KVR_GEMM_NR) {
        int nn = n - c0 < KVR_GEMM_NR ? n - c0 : KVR_GEMM_NR;
        pack_bf16_pairs(wp, w, k, c0, nn);
        K->gemm_panel_bf16(y + c0, (size_t)n, x, (size_t)k, m, wp, nn, k, beta);
    }
}

/* gemm_pack_bf16 packs as kernels.h says; gemm_panel_bf16 agrees with a double-precision
 * recomputation from the same bf16 inputs within the rounding of k/2 pair steps (two
 * roundings each, of partial sums at most sum |x w|; plus denormal products flushed), and
 * a value depends on nothing but its two rows: the same bits for any m, any place of the
 * row in the 12-row blocks, any place of the column in the panel; beta 1 adds the old
 * value after. Only the avx512 variant has it, and only on a CPU with AVX512_BF16. */
static void test_gemm_bf16(void) {
    for (int isa = KVR_ISA_SCALAR; isa < KVR_ISA_AVX512; isa++) {
        const struct kvr_kernels *K = kvr_kernels_get((enum kvr_isa)isa);
        CHECK(!K || (!K->gemm_panel_bf16 && !K->gemm_pack_bf16));
    }
    const char *forced = getenv("KVR_KERNEL");
    if (forced && (strcmp(forced, "avx2") == 0 || strcmp(forced, "scalar") == 0))
        CHECK(kvr_kernels()->gemm_panel_bf16 == NULL); /* the f32 GEMM runs */
    const struct kvr_kernels *K = kvr_kernels_get(KVR_ISA_AVX512);
    if (!K || !K->gemm_panel_bf16) {
        fprintf(stderr, "test_gemm_bf16: SKIPPED: this CPU lacks AVX512_BF16 (has: %s); the BF16 prefill "
                "GEMM is not used here\n", kvr_cpu_features()[0] ? kvr_cpu_features() : "no vector extensions");
        return;
    }
    enum { M = 14, N = 45 };
    const int ks[] = {2, 33, 768, 1025};
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
        int k = ks[ki], kpad = (k + 1) / 2;
        uint16_t *w = malloc((size_t)N * k * sizeof *w), *x = malloc((size_t)M * k * sizeof *x);
        uint16_t *xrev = malloc((size_t)M * k * sizeof *xrev);
        float *xf = malloc((size_t)k * sizeof *xf), *y = malloc((size_t)M * N * sizeof *y);
        float *y2 = malloc((size_t)M * N * sizeof *y2);
        uint32_t *wp = aligned_alloc(64, (size_t)KVR_GEMM_NR * kpad * 4 + 64);
        uint32_t *wq = aligned_alloc(64, (size_t)KVR_GEMM_NR * kpad * 4 + 64);
        REQUIRE(w && x && xrev && xf && y && y2 && wp && wq);
        for (int i = 0; i < N * k; i++)
            w[i] = kvr_f32_to_bf16(frand(0.05f));
        for (int i = 0; i < M; i++) {
            for (int t = 0; t < k; t++)
                xf[t] = frand(1.0f);
            if (i == 3)
                xf[0] = 1e-39f; /* a denormal: flushed by the instruction */
            kvr_act_convert_row(KVR_DTYPE_BF16, xf, x + (size_t)i * k, k);
        }
        for (int i = 0; i < M; i++)
            memcpy(xrev + (size_t)i * k, x + (size_t)(M - 1 - i) * k, (size_t)k * sizeof *x);
        /* The kernels' packing, a full panel and a short one (5 columns at 40). */
        for (int c0 = 0; c0 < N; c0 += 40) {
            int nn = N - c0 < KVR_GEMM_NR ? N - c0 : KVR_GEMM_NR;
            K->gemm_pack_bf16(wp, w + (size_t)c0 * k, (size_t)k * 2, nn, k);
            pack_bf16_pairs(wq, w, k, c0, nn);
            CHECK(memcmp(wp, wq, (size_t)KVR_GEMM_NR * kpad * 4) == 0);
        }
        /* Against the double recomputation. */
        gemm_bf16_all(K, y, x, M, w, N, k, wp, 0.0f);
        int near = 1;
        double worst = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double d = 0, a = 0;
                for (int t = 0; t < k; t++) {
                    double pr = bf16_value(x[(size_t)i * k + t]) * bf16_value(w[(size_t)j * k + t]);
                    d += pr;
                    a += fabs(pr);
                }
                double err = fabs((double)y[(size_t)i * N + j] - d);
                double tol = (double)(k + 2) * 0x1p-24 * a + (double)k * 0x1p-126;
                if (!(err <= tol)) {
                    if (near)
                        fprintf(stderr, "  gemm_panel_bf16 k=%d y[%d][%d] = %.9g, double %.9g, tolerance %.3g\n", k,
                                i, j, (double)y[(size_t)i * N + j], d, tol);
                    near = 0;
                }
                if (a > 0 && err / a > worst)
                    worst = err / a;
            }
        CHECK(near);
        /* Any m: each run of rows from the first, 1 .. M. */
        int same_m = 1;
        for (int m = 1; m <= M; m++) {
            gemm_bf16_all(K, y2, x, m, w, N, k, wp, 0.0f);
            same_m &= memcmp(y2, y, (size_t)m * N * sizeof *y) == 0;
        }
        CHECK(same_m);
        /* The rows in reverse order: every row at another place of its block. */
        gemm_bf16_all(K, y2, xrev, M, w, N, k, wp, 0.0f);
        int same_place = 1;
        for (int i = 0; i < M; i++)
            same_place &= memcmp(y2 + (size_t)i * N, y + (size_t)(M - 1 - i) * N, N * sizeof *y) == 0;
        CHECK(same_place);
        /* Columns 7 .. 38 as one panel: each column at another place in it. */
        pack_bf16_pairs(wp, w, k, 7, KVR_GEMM_NR);
        K->gemm_panel_bf16(y2, N, x, (size_t)k, M, wp, KVR_GEMM_NR, k, 0.0f);
        int same_col = 1;
        for (int i = 0; i < M; i++)
            same_col &= memcmp(y2 + (size_t)i * N, y + (size_t)i * N + 7, KVR_GEMM_NR * sizeof *y) == 0;
        CHECK(same_col);
        /* beta 1: the value, then + old; columns past n untouched. */
        for (int i = 0; i < M * N; i++)
            y2[i] = 0.5f;
        pack_bf16_pairs(wp, w, k, 0, 20);
        K->gemm_panel_bf16(y2, N, x, (size_t)k, M, wp, 20, k, 1.0f);
        int beta_ok = 1;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float v = j < 20 ? y[(size_t)i * N + j] + 0.5f : 0.5f;
                beta_ok &= memcmp(&v, y2 + (size_t)i * N + j, sizeof v) == 0;
            }
        CHECK(beta_ok);
        fprintf(stderr, "test_gemm_bf16 k=%d: worst error / sum|x w| %.2e (bound %.2e), same bits at any m, "
                "row or column place: %s\n", k, worst, (double)(k + 2) * 0x1p-24,
                same_m && same_place && same_col ? "yes" : "NO");
        free(w), free(x), free(xrev), free(xf), free(y), free(y2), free(wp), free(wq);
    }
}

/* The prefill GEMM path (matmul.h prompt_rows): every variant's gemm_panel and the
 * product through kvr_matmul_slice / the pool give, for a prompt row, exactly the fused
 * multiply-add chain over the exactly dequantized weight row in k order (recomputed here
 * with fmaf), whatever the other rows, their marks, m or the slice; unmarked rows keep
 * the per-value kernels' bits. The activations are those of the per-value path (rounded
 * to the weights' dot type), widened back to f32. */
static float gemm_ref_value(const float *x, const float *wrow, int k) {
    float acc = 0.0f;
    for (int t = 0; t < k; t++)
        acc = fmaf(x[t], wrow[t], acc);
    return acc;
}

static void test_prompt_gemm(struct kvr_threadpool *tp) {
    enum { M = 14, N = 67 };
    const int ks[] = {32, 320};
    /* Rows 0..5 and 8..13 a prompt (two runs), 6 and 7 decode rows. */
    unsigned char mark[M];
    for (int i = 0; i < M; i++)
        mark[i] = i != 6 && i != 7;
    struct kvr_matmul_ws *ws = NULL;
    struct kvr_matmul_ws_params wp = {.m_max = M, .k_max = {320, 0, 0}};
    REQUIRE(kvr_matmul_ws_create(&wp, &ws) == KVR_OK);
    for (size_t ti = 0; ti < sizeof all_types / sizeof all_types[0]; ti++) {
        enum kvr_dtype t = all_types[ti];
        for (size_t ki = 0; ki < 2; ki++) {
            int k = ks[ki];
            float *w = malloc((size_t)N * k * sizeof *w), *wd = malloc((size_t)N * k * sizeof *wd);
            float *x = malloc((size_t)M * k * sizeof *x), *want = malloc((size_t)M * N * sizeof *want);
            float *y = malloc((size_t)M * N * sizeof *y), *y1 = malloc((size_t)N * sizeof *y1);
            float *panel = aligned_alloc(64, (size_t)KVR_GEMM_NR * k * sizeof *panel);
            REQUIRE(w && wd && x && want && y && y1 && panel);
            for (int i = 0; i < N * k; i++)
                w[i] = frand(0.05f);
            for (int i = 0; i < M * k; i++)
                x[i] = frand(1.0f);
            void *wbuf;
            struct kvr_tensor wt = make_weight(t, w, N, k, &wbuf);
            for (int j = 0; j < N; j++)
                kvr_tensor_row(&wt, j, wd + (size_t)j * k);
            /* Activations rounded to the dot type (as the per-value path), widened back. */
            float *xr = malloc((size_t)M * k * sizeof *xr);
            size_t xs = kvr_dtype_row_nbytes(kvr_dtype_dot(t), k);
            unsigned char *xc = malloc(xs);
            REQUIRE(xr && xc);
            struct kvr_tensor xt = {.type = kvr_dtype_dot(t), .data = xc, .rows = 1, .cols = k, .row_nbytes = xs};
            for (int i = 0; i < M; i++) {
                kvr_act_convert_row(t, x + (size_t)i * k, xc, k);
                kvr_tensor_row(&xt, 0, xr + (size_t)i * k);
            }
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++)
                    want[(size_t)i * N + j] = gemm_ref_value(xr + (size_t)i * k, wd + (size_t)j * k, k);
            /* Every variant's widen is the exact dequantization, here and on an odd tail. */
            for (int isa = KVR_ISA_SCALAR; isa <= KVR_ISA_AVX512; isa++) {
                const struct kvr_kernels *K = kvr_kernels_get((enum kvr_isa)isa);
                if (!K)
                    continue;
                for (int j = 0; j < N; j++) {
                    K->widen(t, (const char *)wt.data + (size_t)j * wt.row_nbytes, y, k);
                    CHECK(memcmp(y, wd + (size_t)j * k, (size_t)k * 4) == 0);
                }
                if (t != KVR_DTYPE_Q8_0) {
                    K->widen(t, wt.data, y, 37);
                    CHECK(memcmp(y, wd, 37 * 4) == 0);
                }
            }
            /* Every variant's kernel on one panel of the last 3 columns (a short one) and
             * on the first 32, for 1..M rows. */
            for (int isa = KVR_ISA_SCALAR; isa <= KVR_ISA_AVX512; isa++) {
                const struct kvr_kernels *K = kvr_kernels_get((enum kvr_isa)isa);
                if (!K)
                    continue; /* test_variants says which */
                for (int c0 = 0; c0 < N; c0 += N - 3) {
                    int nn = N - c0 < KVR_GEMM_NR ? N - c0 : KVR_GEMM_NR;
                    for (int t2 = 0; t2 < k; t2++)
                        for (int jj = 0; jj < KVR_GEMM_NR; jj++)
                            panel[(size_t)t2 * KVR_GEMM_NR + jj] = jj < nn ? wd[(size_t)(c0 + jj) * k + t2] : 0.0f;
                    for (int m = 1; m <= M; m += 6) {
                        memset(y, 0, (size_t)M * N * sizeof *y);
                        K->gemm_panel(y + c0, N, xr, (size_t)k, m, panel, nn, k, 0.0f);
                        int same = 1;
                        for (int i = 0; i < m; i++)
                            same &= memcmp(y + (size_t)i * N + c0, want + (size_t)i * N + c0, (size_t)nn * 4) == 0;
                        if (!same)
                            fprintf(stderr, "  gemm_panel %s %s k=%d m=%d c0=%d differs from the fma chain\n",
                                    K->name, kvr_dtype_name(t), k, m, c0);
                        CHECK(same);
                    }
                }
            }
            /* BF16 where the engine runs the AVX512-BF16 GEMM: marked rows are that
             * kernel's value of the row alone (test_gemm_bf16 checks it), not the chain. */
            const struct kvr_kernels *Kc = kvr_kernels();
            if (t == KVR_DTYPE_BF16 && Kc->gemm_panel_bf16) {
                uint32_t *pairs = aligned_alloc(64, (size_t)KVR_GEMM_NR * ((k + 1) / 2) * 4 + 64);
                REQUIRE(pairs);
                const uint16_t *xb = (const uint16_t *)(const void *)xc;
                for (int i = 0; i < M; i++) {
                    kvr_act_convert_row(t, x + (size_t)i * k, xc, k);
                    gemm_bf16_all(Kc, want + (size_t)i * N, xb, 1, wt.data, N, k, pairs, 0.0f);
                }
                free(pairs);
            }
            /* Through the matmul: marked rows = the chain (beta 1 adds the old value
             * after), unmarked = the per-value product alone; slices and pool alike. */
            for (int b = 0; b < 2; b++) {
                float beta = b ? 1.0f : 0.0f;
                for (int i = 0; i < M * N; i++)
                    y[i] = b ? 0.5f : 0.0f;
                struct kvr_matmul_op op = {.y = y, .x = x, .w = &wt, .m = M, .beta = beta, .prompt_rows = mark};
                kvr_matmul_multi(b ? tp : NULL, ws, &op, 1);
                for (int i = 0; i < M; i++) {
                    if (mark[i]) {
                        int same = 1;
                        for (int j = 0; j < N; j++) {
                            float v = want[(size_t)i * N + j];
                            if (b)
                                v = v + 0.5f;
                            same &= memcmp(&v, y + (size_t)i * N + j, 4) == 0;
                        }
                        CHECK(same);
                    } else if (t != KVR_DTYPE_F32) { /* F32's few-row kernels vary with m */
                        for (int j = 0; j < N; j++)
                            y1[j] = b ? 0.5f : 0.0f;
                        kvr_matmul(NULL, ws, y1, x + (size_t)i * k, &wt, 1, beta);
                        CHECK(memcmp(y1, y + (size_t)i * N, (size_t)N * 4) == 0);
                    }
                }
                /* A prompt row alone, one slice at a time, as in the batch. */
                struct kvr_matmul_act a;
                kvr_matmul_act_prepare(ws, 0, x + (size_t)(M - 1) * k, 1, k, t, &a);
                a.prompt_rows = mark;
                for (int j = 0; j < N; j++)
                    y1[j] = b ? 0.5f : 0.0f;
                kvr_matmul_slice(y1, N, &a, &wt, 40, N, beta);
                kvr_matmul_slice(y1, N, &a, &wt, 0, 40, beta);
                CHECK(memcmp(y1, y + (size_t)(M - 1) * N, (size_t)N * 4) == 0);
            }
            free(w), free(wd), free(x), free(want), free(y), free(y1), free(panel), free(wbuf), free(xr), free(xc);
        }
    }
    kvr_matmul_ws_free(ws);
}

int main(void) {
    struct kvr_threadpool *tp = NULL;
    REQUIRE(kvr_threadpool_create(2, &tp) == KVR_OK);
    test_q8_0_known();
    test_dot();
    test_variants();
    test_rows();
    test_matmul(tp);
    test_gemm_bf16();
    test_prompt_gemm(tp);
    kvr_threadpool_free(tp);
    CHECK_DONE();
}
