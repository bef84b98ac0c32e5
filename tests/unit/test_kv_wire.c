/* test_kv_wire.c - the KV block wire format (common/kv_wire.c, common/half.h):
 * f16/bf16 conversions against their documented bounds and exhaustively on the narrow
 * side; bit-exact f32 round trips; the raw fallback; every decode error with its status
 * and log line; and the end-to-end claim: the bundled model's prompt cache, shipped
 * block by block through the codec into a pool with another block size, decodes the
 * same greedy tokens as the original cache. */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#include "check.h"
#include "half.h"
#include "kv_cache.h"
#include "kv_wire.h"
#include "log.h"
#include "model.h"
#include "sampler.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

/* Header offsets as docs/KV_WIRE_FORMAT.md gives them (written out here on purpose: the
 * test checks the documented layout, not the implementation's own constants). */
enum {
    H_VERSION = 4,
    H_FLAGS = 6,
    H_DTYPE = 7,
    H_TRANSFORM = 8,
    H_N_LAYERS = 10,
    H_LAYER_BEGIN = 16,
    H_N_TOKENS = 24,
    H_RAW = 28,
    H_PAYLOAD = 32,
    H_FINGERPRINT = 36,
    H_SEQ_ID = 44,
    H_PAYLOAD_SUM = 52,
    H_HEADER_SUM = 60,
    H_SIZE = 64,
};

static uint64_t rng_state = 0x1234567u;

static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static float rndf(void) {
    return (float)(rnd() >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

static void put32le(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Recomputes the header checksum after a test edited a header field, so the decoder gets
 * past it to the check under test. */
static void reseal(uint8_t *m) {
    put32le(m + H_HEADER_SUM, (uint32_t)kvr_wire_hash(m, H_HEADER_SUM, KVR_WIRE_HEADER_SEED));
}

/* ---- log capture --------------------------------------------------------------------- */

static char last_line[1024];
static int n_lines;

static void capture(void *ud, int level, const char *line) {
    (void)ud;
    (void)level;
    snprintf(last_line, sizeof last_line, "%s", line);
    n_lines++;
}

static void log_reset(void) {
    last_line[0] = '\0';
    n_lines = 0;
}

/* Exactly one line was logged since log_reset and it contains want. */
static int logged(const char *want) {
    if (n_lines != 1 || !strstr(last_line, want)) {
        fprintf(stderr, "  log: %d line(s), last \"%s\", wanted \"%s\"\n", n_lines, last_line,
                want);
        return 0;
    }
    return 1;
}

/* ---- conversions ------------------------------------------------------------------- */

/* The compiler's own float -> _Float16 conversion (IEEE, round to nearest even), as an
 * independent reference where GCC offers it. */
#if defined(__FLT16_MAX__) && !defined(__clang__)
#define HAVE_REF_F16 1
__extension__ typedef _Float16 ref_f16;
#else
#define HAVE_REF_F16 0
#endif

static double fmaxd(double a, double b) {
    return a > b ? a : b;
}

static int f16_within(float x, float y) {
    double ax = fabs((double)x);
    if (ax >= 65520.0)
        return y == (x > 0 ? 65504.0f : -65504.0f);
    return fabs((double)y - (double)x) <= fmaxd(ax * 0x1p-11, 0x1p-25);
}

static int bf16_within(float x, float y) {
    double ax = fabs((double)x);
    if (ax >= 0x1.fe0000p127) /* rounds past the largest bf16: saturates */
        return fabs((double)y) == 0x1.fe0000p127;
    return fabs((double)y - (double)x) <= fmaxd(ax * 0x1p-8, 0x1p-134);
}

static void test_half(void) {
    /* Every narrow value is exact in f32 and converts back to itself (NaN stays NaN). */
    int bad16 = 0, badbf = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvr_f16_to_f32((uint16_t)h);
        uint16_t back = kvr_f32_to_f16(f);
        int nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (nan ? !(f != f) || (back & 0x7c00) != 0x7c00 || !(back & 0x3ff) : back != h)
            bad16++;
        float g = kvr_bf16_to_f32((uint16_t)h);
        uint16_t gb = kvr_f32_to_bf16(g);
        nan = (h & 0x7f80) == 0x7f80 && (h & 0x7f);
        if (nan ? !(g != g) || (gb & 0x7f80) != 0x7f80 || !(gb & 0x7f) : gb != h)
            badbf++;
    }
    CHECK_EQ(bad16, 0);
    CHECK_EQ(badbf, 0);
    CHECK_EQ(kvr_f32_to_f16(1.0f), 0x3c00);
    CHECK_EQ(kvr_f32_to_f16(-2.0f), 0xc000);
    CHECK_EQ(kvr_f32_to_f16(65504.0f), 0x7bff);
    CHECK_EQ(kvr_f32_to_f16(1e6f), 0x7bff); /* saturates, not inf */
    CHECK_EQ(kvr_f32_to_f16(-1e30f), 0xfbff);
    CHECK_EQ(kvr_f32_to_f16(kvr_bits_f32(0x7f800000u)), 0x7c00); /* inf stays inf */
    CHECK_EQ(kvr_f32_to_f16(0x1p-24f), 0x0001);                  /* smallest subnormal */
    CHECK_EQ(kvr_f32_to_f16(0x1p-25f), 0x0000);                  /* tie to even: 0 */
    CHECK_EQ(kvr_f32_to_f16(0x1.8p-24f), 0x0002);                /* tie to even: 2 */
    CHECK_EQ(kvr_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);           /* tie to even: down */
    CHECK_EQ(kvr_f32_to_f16(1.0f + 0x1.8p-10f), 0x3c02);         /* tie to even: up */
    CHECK_EQ(kvr_f32_to_f16(0x1.ffcp-15f), 0x0400);              /* rounds up to normal */
    CHECK_EQ(kvr_f32_to_bf16(1.0f), 0x3f80);
    CHECK_EQ(kvr_f32_to_bf16(kvr_bits_f32(0x3f808000u)), 0x3f80);      /* tie to even: down */
    CHECK_EQ(kvr_f32_to_bf16(kvr_bits_f32(0x3f818000u)), 0x3f82);      /* tie to even: up */
    CHECK_EQ(kvr_f32_to_bf16(kvr_bits_f32(0x7f7fffffu)), 0x7f7f);      /* FLT_MAX saturates */
    CHECK_EQ(kvr_f32_to_bf16(kvr_bits_f32(0xff800000u)), 0xff80);      /* -inf stays */
    CHECK_EQ(kvr_f32_to_bf16(kvr_bits_f32(0x7f800001u)) & 0x7f, 0x40); /* NaN stays NaN */

    /* Sampled f32 bit patterns over the whole range: the documented bounds hold, and the
     * results agree with the compiler's own conversion where it has one. */
    int out16 = 0, outbf = 0, ref16 = 0, refbf = 0, n_ref16 = 0, n_refbf = 0;
    for (uint64_t i = 0; i < 400000; i++) {
        uint32_t u = i < 200000 ? (uint32_t)(i * 21473u + 7u) : (uint32_t)rnd();
        if ((u & 0x7f800000u) == 0x7f800000u)
            continue; /* inf/NaN: checked above */
        float x = kvr_bits_f32(u);
        float y16 = kvr_f16_to_f32(kvr_f32_to_f16(x));
        float ybf = kvr_bf16_to_f32(kvr_f32_to_bf16(x));
        out16 += !f16_within(x, y16);
        outbf += !bf16_within(x, ybf);
#if HAVE_REF_F16
        if (fabsf(x) < 65520.0f) {
            ref_f16 r = (ref_f16)x;
            uint16_t rb;
            memcpy(&rb, &r, 2);
            ref16 += rb != kvr_f32_to_f16(x);
            n_ref16++;
        }
#endif
        /* bf16 reference: round to nearest even on the top 16 bits, done in 64 bits. */
        uint64_t w = u & 0x7fffffffu, q = w >> 16, rem = w & 0xffffu;
        if (rem > 0x8000u || (rem == 0x8000u && (q & 1)))
            q++;
        if (q < 0x7f80u) {
            refbf += (uint16_t)((u >> 16 & 0x8000u) | q) != kvr_f32_to_bf16(x);
            n_refbf++;
        }
    }
    /* The reference comparisons must have compared something (the f16 one needs GCC's
     * _Float16; with another compiler it is skipped, and says so). */
    fprintf(stderr, "conversions: %d f16 values compared with _Float16%s, %d bf16 with the "
            "64-bit reference\n", n_ref16, HAVE_REF_F16 ? "" : " (skipped: no GCC _Float16)",
            n_refbf);
    CHECK(n_refbf > 100000);
    if (HAVE_REF_F16)
        CHECK(n_ref16 > 100000);
    CHECK_EQ(out16, 0);
    CHECK_EQ(outbf, 0);
    CHECK_EQ(ref16, 0);
    CHECK_EQ(refbf, 0);
}

/* ---- round trips -------------------------------------------------------------------- */

/* Floats that look like a KV cache: per-channel scales, a few outliers. */
static void kv_like(float *x, size_t n, int kv_dim) {
    for (size_t i = 0; i < n; i++) {
        float scale = 0.05f + (float)(i % (size_t)kv_dim) * 0.1f;
        x[i] = rndf() * scale * (rnd() % 97 == 0 ? 40.0f : 1.0f);
    }
}

static void test_roundtrip(void) {
    struct kvr_wire_codec *c = NULL;
    const int L = 2, T = 16, H = 4, D = 8, KVD = H * D;
    const size_t n = (size_t)L * T * KVD;
    REQUIRE(kvr_wire_codec_create(n, &c) == KVR_OK);
    float *k = malloc(n * sizeof *k), *v = malloc(n * sizeof *v);
    float *k2 = malloc(n * sizeof *k2), *v2 = malloc(n * sizeof *v2);
    struct kvr_wire_block b = {.fingerprint = 0xfeedfacecafebeefull,
                               .seq_id = 42,
                               .layer_begin = 3,
                               .n_layers = L,
                               .token_begin = 32,
                               .n_tokens = T,
                               .n_kv_heads = H,
                               .head_dim = D};
    size_t cap = kvr_wire_max_nbytes(&b);
    CHECK_EQ(cap, 64 + 2 * n * 4);
    uint8_t *msg = malloc(cap);
    REQUIRE(k && v && k2 && v2 && msg);

    /* f32 is bit-exact for any bit pattern (NaN payloads, -0, subnormals, inf): random
     * words, and KV-like values, with every transform over the whole level range. */
    static const int levels[] = {0, KVR_WIRE_LEVEL_MIN, -1, 1, 3, 9, 19, KVR_WIRE_LEVEL_MAX};
    for (int data = 0; data < 2; data++) {
        if (data == 0) {
            for (size_t i = 0; i < n; i++) {
                uint32_t a = (uint32_t)rnd(), bb = (uint32_t)rnd();
                memcpy(&k[i], &a, 4);
                memcpy(&v[i], &bb, 4);
            }
        } else {
            kv_like(k, n, KVD);
            kv_like(v, n, KVD);
        }
        for (int tf = 0; tf < 2; tf++) {
            for (size_t li = 0; li < sizeof levels / sizeof levels[0]; li++) {
                struct kvr_wire_opts o = {
                    .dtype = KVR_WIRE_F32, .transform = tf, .level = levels[li]};
                size_t len = 0;
                CHECK_EQ(kvr_wire_encode(c, &o, &b, k, v, msg, cap, &len), KVR_OK);
                CHECK(len >= 64 && len <= cap);
                memset(k2, 0xab, n * 4);
                memset(v2, 0xab, n * 4);
                struct kvr_wire_block d;
                CHECK_EQ(kvr_wire_decode(c, msg, len, b.fingerprint, &d, k2, v2, n), KVR_OK);
                CHECK(memcmp(k, k2, n * 4) == 0);
                CHECK(memcmp(v, v2, n * 4) == 0);
                CHECK_EQ(d.fingerprint, b.fingerprint);
                CHECK_EQ(d.seq_id, 42);
                CHECK_EQ(d.layer_begin, 3);
                CHECK_EQ(d.n_layers, L);
                CHECK_EQ(d.token_begin, 32);
                CHECK_EQ(d.n_tokens, T);
                CHECK_EQ(d.n_kv_heads, H);
                CHECK_EQ(d.head_dim, D);
                CHECK_EQ(d.dtype, KVR_WIRE_F32);
                CHECK_EQ(d.transform, tf);
                CHECK_EQ(d.level, levels[li] ? levels[li] : KVR_WIRE_DEFAULT_LEVEL);
                CHECK_EQ(d.payload_nbytes + 64, len);
                if (data == 0) /* random words never compress: stored raw */
                    CHECK(!d.compressed && len == cap);
                struct kvr_wire_block pk;
                CHECK_EQ(kvr_wire_peek(msg, len, &pk), KVR_OK);
                CHECK(memcmp(&pk, &d, sizeof d) == 0);
            }
        }
    }

    /* store: never compressed, even what would shrink to almost nothing (a constant
     * block); the payload is exactly the packed values and decodes bit-exact, with either
     * transform and every value type. */
    for (int tf = 0; tf < 2; tf++) {
        for (int dt = 0; dt < 3; dt++) {
            for (size_t i = 0; i < n; i++) {
                k[i] = dt ? 0.25f : (float)(i % 7) - 3.0f;
                v[i] = 0.25f;
            }
            struct kvr_wire_opts o = {.dtype = dt, .transform = tf, .store = 1};
            size_t len = 0;
            CHECK_EQ(kvr_wire_encode(c, &o, &b, k, v, msg, cap, &len), KVR_OK);
            int es = kvr_wire_dtype_nbytes(dt);
            CHECK_EQ(len, 64 + 2 * n * (size_t)es);
            CHECK_EQ(msg[6], 0); /* flags: stored */
            if (dt == KVR_WIRE_F32 && tf == KVR_WIRE_TF_NONE) /* little-endian f32 as is */
                CHECK(memcmp(msg + 64, k, n * 4) == 0 && memcmp(msg + 64 + n * 4, v, n * 4) == 0);
            struct kvr_wire_block d;
            CHECK_EQ(kvr_wire_decode(c, msg, len, b.fingerprint, &d, k2, v2, n), KVR_OK);
            CHECK(!d.compressed && d.dtype == (enum kvr_wire_dtype)dt && d.transform == (enum kvr_wire_transform)tf);
            CHECK(memcmp(k, k2, n * 4) == 0 && memcmp(v, v2, n * 4) == 0); /* exact in every type */
        }
    }

    /* KV-like values shrink with the shuffle; a constant block shrinks to almost nothing. */
    struct kvr_wire_opts o = {.dtype = KVR_WIRE_F32, .transform = KVR_WIRE_TF_SHUFFLE};
    size_t len = 0;
    CHECK_EQ(kvr_wire_encode(c, &o, &b, k, v, msg, cap, &len), KVR_OK);
    CHECK(len < cap);
    for (size_t i = 0; i < n; i++)
        k[i] = v[i] = 0.25f;
    CHECK_EQ(kvr_wire_encode(c, &o, &b, k, v, msg, cap, &len), KVR_OK);
    CHECK(len < 64 + 200);
    CHECK_EQ(kvr_wire_decode(c, msg, len, 0, &(struct kvr_wire_block){0}, k2, v2, n), KVR_OK);
    CHECK(memcmp(k, k2, n * 4) == 0 && memcmp(v, v2, n * 4) == 0);

    /* f16 and bf16: equal to the per-value conversion (so within its bound), both
     * transforms; the message is at most the header plus half the f32 payload. */
    kv_like(k, n, KVD);
    kv_like(v, n, KVD);
    k[5] = 1e6f;   /* saturates in f16 */
    v[7] = -3e-9f; /* f16 subnormal range */
    for (int dt = 1; dt <= 2; dt++) {
        for (int tf = 0; tf < 2; tf++) {
            struct kvr_wire_opts oo = {.dtype = dt, .transform = tf, .level = 3};
            CHECK_EQ(kvr_wire_encode(c, &oo, &b, k, v, msg, cap, &len), KVR_OK);
            CHECK(len <= 64 + n * 4);
            struct kvr_wire_block d;
            CHECK_EQ(kvr_wire_decode(c, msg, len, 0, &d, k2, v2, n), KVR_OK);
            CHECK_EQ(d.dtype, dt);
            int bad = 0;
            for (size_t i = 0; i < n; i++) {
                float wk = dt == 1 ? kvr_f16_to_f32(kvr_f32_to_f16(k[i]))
                                   : kvr_bf16_to_f32(kvr_f32_to_bf16(k[i]));
                float wv = dt == 1 ? kvr_f16_to_f32(kvr_f32_to_f16(v[i]))
                                   : kvr_bf16_to_f32(kvr_f32_to_bf16(v[i]));
                bad += memcmp(&wk, &k2[i], 4) != 0 || memcmp(&wv, &v2[i], 4) != 0;
                bad += dt == 1 ? !f16_within(k[i], k2[i]) || !f16_within(v[i], v2[i])
                               : !bf16_within(k[i], k2[i]) || !bf16_within(v[i], v2[i]);
            }
            CHECK_EQ(bad, 0);
            CHECK_EQ(k2[5], dt == 1 ? 65504.0f : kvr_bf16_to_f32(kvr_f32_to_bf16(1e6f)));
        }
    }

    /* Raw fallback on the smallest block (2 values of 2 bytes cannot shrink) and on
     * random f16 words: never more than header + raw payload. */
    struct kvr_wire_block one = {.n_layers = 1, .n_tokens = 1, .n_kv_heads = 1, .head_dim = 1};
    struct kvr_wire_opts of16 = {
        .dtype = KVR_WIRE_F16, .transform = KVR_WIRE_TF_SHUFFLE, .level = 19};
    CHECK_EQ(kvr_wire_encode(c, &of16, &one, k, v, msg, cap, &len), KVR_OK);
    CHECK_EQ(len, 64 + 4);
    struct kvr_wire_block d1;
    CHECK_EQ(kvr_wire_decode(c, msg, len, 0, &d1, k2, v2, 1), KVR_OK);
    CHECK_EQ(d1.compressed, 0);
    for (size_t i = 0; i < 2 * n; i++) {
        uint16_t h;
        do /* any finite half, so the round trip is exact */
            h = (uint16_t)rnd();
        while ((h & 0x7c00) == 0x7c00);
        (i < n ? k : v)[i % n] = kvr_f16_to_f32(h);
    }
    CHECK_EQ(kvr_wire_encode(c, &of16, &b, k, v, msg, cap, &len), KVR_OK);
    CHECK(len <= 64 + 2 * n * 2);
    CHECK_EQ(kvr_wire_decode(c, msg, len, 0, &d1, k2, v2, n), KVR_OK);
    CHECK(memcmp(k, k2, n * 4) == 0 && memcmp(v, v2, n * 4) == 0);

    free(k);
    free(v);
    free(k2);
    free(v2);
    free(msg);
    kvr_wire_codec_free(c);
}

/* ---- errors ------------------------------------------------------------------------ */

struct fixture {
    struct kvr_wire_codec *c;
    struct kvr_wire_block b;
    size_t n;       /* floats of K */
    float *k, *v;   /* (n) the encoded values */
    float *k2, *v2; /* (n) decode targets */
    uint8_t *msg;   /* a valid compressed message ... */
    size_t len;     /* ... of len bytes */
    uint8_t *raw;   /* a valid message stored raw (random words) ... */
    size_t raw_len; /* ... of raw_len bytes */
    uint8_t *t;     /* scratch for edited copies (cap + 64 bytes) */
    size_t cap;
};

/* Decodes m (len bytes) and checks the status, the single log line and that k2/v2 were
 * not written. */
static void expect_decode(struct fixture *f, const uint8_t *m, size_t len, uint64_t fp,
                          size_t cap_floats, int want_rc, const char *want_log, int line) {
    memset(f->k2, 0x5a, f->n * 4);
    memset(f->v2, 0x5a, f->n * 4);
    log_reset();
    struct kvr_wire_block d;
    int rc = kvr_wire_decode(f->c, m, len, fp, &d, f->k2, f->v2, cap_floats);
    if (rc != want_rc)
        fprintf(stderr, "  (line %d: got %s, want %s)\n", line, kvr_status_name(rc),
                kvr_status_name(want_rc));
    CHECK_EQ(rc, want_rc);
    if (!logged(want_log))
        fprintf(stderr, "  (line %d)\n", line);
    CHECK(logged(want_log));
    int touched = 0;
    for (size_t i = 0; i < f->n * 4; i++)
        touched += ((uint8_t *)f->k2)[i] != 0x5a || ((uint8_t *)f->v2)[i] != 0x5a;
    CHECK_EQ(touched, 0);
}

#define EXPECT(m, len, rc, log) expect_decode(&f, (m), (len), 0, f.n, (rc), (log), __LINE__)

/* A copy of the compressed message in f->t. */
static uint8_t *copy_msg(struct fixture *f) {
    memcpy(f->t, f->msg, f->len);
    return f->t;
}

/* Builds a message around a hand-made zstd payload (header fields from f->b, raw size
 * raw_nbytes, flags compressed) into f->t; returns its length. */
static size_t forge(struct fixture *f, const void *payload, size_t n) {
    memcpy(f->t, f->msg, H_SIZE);
    memcpy(f->t + H_SIZE, payload, n);
    put32le(f->t + H_PAYLOAD, (uint32_t)n);
    reseal(f->t);
    return H_SIZE + n;
}

static void test_errors(void) {
    struct fixture f = {0};
    f.b = (struct kvr_wire_block){.fingerprint = 0x1111222233334444ull,
                                  .seq_id = 7,
                                  .layer_begin = 1,
                                  .n_layers = 1,
                                  .token_begin = 16,
                                  .n_tokens = 16,
                                  .n_kv_heads = 2,
                                  .head_dim = 8};
    f.n = 16 * 16;
    REQUIRE(kvr_wire_codec_create(f.n, &f.c) == KVR_OK);
    f.cap = kvr_wire_max_nbytes(&f.b);
    f.k = malloc(f.n * 4);
    f.v = malloc(f.n * 4);
    f.k2 = malloc(f.n * 4);
    f.v2 = malloc(f.n * 4);
    f.msg = malloc(f.cap);
    f.raw = malloc(f.cap);
    f.t = malloc(f.cap + 64);
    REQUIRE(f.k && f.v && f.k2 && f.v2 && f.msg && f.raw && f.t);
    struct kvr_wire_opts o = {.dtype = KVR_WIRE_F32, .transform = KVR_WIRE_TF_SHUFFLE};
    kv_like(f.k, f.n, 16);
    kv_like(f.v, f.n, 16);
    REQUIRE(kvr_wire_encode(f.c, &o, &f.b, f.k, f.v, f.msg, f.cap, &f.len) == KVR_OK);
    REQUIRE(f.len < f.cap); /* compressed */
    for (size_t i = 0; i < f.n; i++) {
        uint32_t a = (uint32_t)rnd(), b = (uint32_t)rnd();
        memcpy(&f.k[i], &a, 4);
        memcpy(&f.v[i], &b, 4);
    }
    REQUIRE(kvr_wire_encode(f.c, &o, &f.b, f.k, f.v, f.raw, f.cap, &f.raw_len) == KVR_OK);
    REQUIRE(f.raw_len == f.cap); /* stored raw */
    uint8_t *m;

    kvr_log_set_sink(capture, NULL);

    /* Truncations: inside the header, and inside the payload. */
    EXPECT(f.msg, 0, KVR_ETRUNC, "kvr_wire_decode: truncated: 0 bytes");
    EXPECT(f.msg, 3, KVR_ETRUNC, "truncated: 3 bytes, shorter than the 64-byte header");
    EXPECT(f.msg, 63, KVR_ETRUNC, "truncated: 63 bytes");
    EXPECT(f.msg, f.len - 1, KVR_ETRUNC, "seq=7 truncated");
    EXPECT(f.raw, 64, KVR_ETRUNC, "seq=7 truncated: 0 payload bytes");

    /* Magic and version, even in buffers too short for a header. */
    m = copy_msg(&f);
    m[0] = 'k';
    EXPECT(m, f.len, KVR_EMAGIC, "bad magic 6b565257");
    EXPECT(m, 4, KVR_EMAGIC, "bad magic");
    m = copy_msg(&f);
    m[H_VERSION] = 3;
    EXPECT(m, f.len, KVR_EVERSION, "format version 3, this build reads 2");
    EXPECT(m, 6, KVR_EVERSION, "format version 3");
    m[H_VERSION] = 1; /* version 1 (kvr_hash64 checksums) is refused, not misread */
    EXPECT(m, f.len, KVR_EVERSION, "format version 1, this build reads 2");

    /* Any header byte changed without resealing: the header checksum. */
    m = copy_msg(&f);
    m[H_SEQ_ID] ^= 1;
    EXPECT(m, f.len, KVR_ECHECKSUM, "header checksum mismatch");
    m = copy_msg(&f);
    m[H_TRANSFORM] = 0; /* a plausible but false transform */
    EXPECT(m, f.len, KVR_ECHECKSUM, "header checksum mismatch");

    /* Resealed bad enums and shapes. */
    m = copy_msg(&f);
    m[H_FLAGS] |= 0x80;
    reseal(m);
    EXPECT(m, f.len, KVR_EFORMAT, "seq=7 unknown flag bits 0x80");
    m = copy_msg(&f);
    m[H_DTYPE] = 3;
    reseal(m);
    EXPECT(m, f.len, KVR_EFORMAT, "unknown value type 3 or transform 1");
    m = copy_msg(&f);
    m[H_TRANSFORM] = 200;
    reseal(m);
    EXPECT(m, f.len, KVR_EFORMAT, "unknown value type 0 or transform 200");
    m = copy_msg(&f);
    m[H_N_LAYERS] = 0;
    reseal(m);
    EXPECT(m, f.len, KVR_EFORMAT, "bad shape: layers 1+0");
    m = copy_msg(&f);
    put32le(m + H_LAYER_BEGIN, (uint32_t)INT_MAX);
    reseal(m);
    EXPECT(m, f.len, KVR_EFORMAT, "bad shape: layers 2147483647+1");
    m = copy_msg(&f);
    put32le(m + H_N_TOKENS, 0x80000000u);
    reseal(m);
    EXPECT(m, f.len, KVR_EFORMAT, "bad shape");

    /* Lengths that disagree: raw vs shape (also the shape a 32-bit product would wrap
     * to), payload vs flags, bytes after the payload. */
    m = copy_msg(&f);
    put32le(m + H_RAW, get32le(m + H_RAW) + 4);
    reseal(m);
    EXPECT(m, f.len, KVR_ELENGTH, "raw size 2052 disagrees with the shape");
    m = copy_msg(&f);
    put32le(m + H_N_TOKENS, 0x40000000u); /* 2*1*16*2^30*4 = 2^37: wraps to 0 in 32 bits */
    put32le(m + H_RAW, 0);
    reseal(m);
    EXPECT(m, f.len, KVR_ELENGTH, "disagrees with the shape");
    m = copy_msg(&f);
    m[H_FLAGS] = 0; /* says stored, but the payload is shorter than raw */
    reseal(m);
    EXPECT(m, f.len, KVR_ELENGTH, "disagrees with a stored payload of 2048 raw bytes");
    memcpy(f.t, f.raw, f.raw_len);
    f.t[H_FLAGS] = 1; /* says compressed, but payload == raw */
    reseal(f.t);
    EXPECT(f.t, f.raw_len, KVR_ELENGTH,
           "payload of 2048 bytes disagrees with a compressed payload");
    m = copy_msg(&f);
    m[f.len] = 0;
    EXPECT(m, f.len + 1, KVR_ELENGTH, "1 bytes after the");

    /* The fingerprint of another model. */
    expect_decode(&f, f.msg, f.len, 0x1111222233334445ull, f.n, KVR_EFINGERPRINT,
                  "seq=7 model fingerprint 1111222233334444, this node serves 1111222233334445",
                  __LINE__);

    /* No room: the caller's buffers, or the codec's. */
    expect_decode(&f, f.msg, f.len, 0, f.n - 1, KVR_ERANGE,
                  "block of 256 floats each of K and V; room for 255", __LINE__);
    struct kvr_wire_codec *small = NULL;
    REQUIRE(kvr_wire_codec_create(f.n / 2, &small) == KVR_OK);
    struct kvr_wire_codec *keep = f.c;
    f.c = small;
    EXPECT(f.msg, f.len, KVR_ERANGE, "codec for 128");
    f.c = keep;
    kvr_wire_codec_free(small);

    /* Payload checksum: a flipped bit in a stored payload; a compressed payload whose
     * declared checksum is wrong. */
    memcpy(f.t, f.raw, f.raw_len);
    f.t[H_SIZE + 1000] ^= 0x10;
    EXPECT(f.t, f.raw_len, KVR_ECHECKSUM,
           "seq=7 layers 1+1 tokens 16+16: payload checksum mismatch");
    m = copy_msg(&f);
    m[H_PAYLOAD_SUM] ^= 1;
    reseal(m);
    EXPECT(m, f.len, KVR_ECHECKSUM, "payload checksum mismatch");

    /* Hostile zstd payloads. */
    uint8_t zbuf[4096];
    uint8_t big[4096];
    memset(big, 0, sizeof big);
    size_t raw = 2 * f.n * 4; /* 2048 */
    m = copy_msg(&f);
    memset(m + H_SIZE, 0, 8); /* not a frame */
    EXPECT(m, f.len, KVR_ECOMPRESS, "seq=7 payload is not a zstd frame (starts 00000000)");
    /* A skippable frame (valid zstd, never written by the encoder). */
    uint8_t skip[16] = {0x50, 0x2a, 0x4d, 0x18, 8, 0, 0, 0};
    EXPECT(f.t, forge(&f, skip, sizeof skip), KVR_ECOMPRESS,
           "payload is not a zstd frame (starts 502a4d18)");
    /* A frame cut short inside its blocks. */
    memcpy(zbuf, f.msg + H_SIZE, f.len - H_SIZE - 20);
    EXPECT(f.t, forge(&f, zbuf, f.len - H_SIZE - 20), KVR_ECOMPRESS, "zstd frame unreadable");
    /* A frame that declares more than raw. */
    size_t zn = ZSTD_compress(zbuf, sizeof zbuf, big, raw + 100, 1);
    REQUIRE(!ZSTD_isError(zn) && zn < 100);
    EXPECT(f.t, forge(&f, zbuf, zn), KVR_EOVERFLOW,
           "zstd frame declares 2148 bytes, more than the 2048 declared raw");
    /* A frame without a content size that inflates past raw: caught while inflating. */
    ZSTD_CCtx *zc = ZSTD_createCCtx();
    REQUIRE(zc);
    ZSTD_CCtx_setParameter(zc, ZSTD_c_contentSizeFlag, 0);
    ZSTD_outBuffer ob = {zbuf, sizeof zbuf, 0};
    ZSTD_inBuffer ib = {big, raw + 100, 0};
    REQUIRE(ZSTD_compressStream2(zc, &ob, &ib, ZSTD_e_end) == 0);
    REQUIRE(ZSTD_getFrameContentSize(zbuf, ob.pos) == ZSTD_CONTENTSIZE_UNKNOWN);
    EXPECT(f.t, forge(&f, zbuf, ob.pos), KVR_EOVERFLOW,
           "zstd frame inflates past the 2048 declared raw bytes");
    /* A frame that inflates to less than raw (declared and undeclared). */
    zn = ZSTD_compress(zbuf, sizeof zbuf, big, raw - 8, 1);
    EXPECT(f.t, forge(&f, zbuf, zn), KVR_ELENGTH, "inflates");
    ZSTD_CCtx_reset(zc, ZSTD_reset_session_only);
    ob = (ZSTD_outBuffer){zbuf, sizeof zbuf, 0};
    ib = (ZSTD_inBuffer){big, raw - 8, 0};
    REQUIRE(ZSTD_compressStream2(zc, &ob, &ib, ZSTD_e_end) == 0);
    EXPECT(f.t, forge(&f, zbuf, ob.pos), KVR_ELENGTH,
           "zstd frame inflates to 2040 bytes, 2048 declared");
    ZSTD_freeCCtx(zc);
    /* A right-sized frame with one byte after it. */
    zn = ZSTD_compress(zbuf, sizeof zbuf, big, raw, 1);
    zbuf[zn] = 0;
    EXPECT(f.t, forge(&f, zbuf, zn + 1), KVR_ELENGTH, "1 bytes after the");
    /* A right-sized frame of zeros: inflates fine, fails the payload checksum. */
    EXPECT(f.t, forge(&f, zbuf, zn), KVR_ECHECKSUM, "payload checksum mismatch");
    /* A well-framed compressed block of garbage: the frame parses, inflating fails.
     * Frame header: magic, descriptor 0x60 (single segment, 2-byte content size),
     * size 2048 - 256; block header: last, compressed, 5 bytes. */
    static const uint8_t garbage[] = {0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x07, 0x2d,
                                      0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff};
    EXPECT(f.t, forge(&f, garbage, sizeof garbage), KVR_ECOMPRESS,
           "seq=7 zstd decompression failed: ");
    /* Corrupted bytes inside a real frame: some error, one log line, never a crash. */
    m = copy_msg(&f);
    for (size_t i = H_SIZE + 12; i < f.len; i += 7)
        m[i] ^= 0xff;
    memset(f.k2, 0, 4);
    log_reset();
    int rc = kvr_wire_decode(f.c, m, f.len, 0, &(struct kvr_wire_block){0}, f.k2, f.v2, f.n);
    CHECK(rc == KVR_ECOMPRESS || rc == KVR_ECHECKSUM || rc == KVR_ELENGTH || rc == KVR_EOVERFLOW);
    CHECK_EQ(n_lines, 1);

    /* peek reports the same header errors (and logs them under its own name). */
    m = copy_msg(&f);
    m[H_DTYPE] = 9;
    reseal(m);
    log_reset();
    struct kvr_wire_block pk;
    CHECK_EQ(kvr_wire_peek(m, f.len, &pk), KVR_EFORMAT);
    CHECK(logged("kvr_wire_peek: seq=7 unknown value type 9"));
    log_reset();
    CHECK_EQ(kvr_wire_peek(f.msg, 10, &pk), KVR_ETRUNC);
    CHECK(logged("kvr_wire_peek: truncated"));
    CHECK_EQ(kvr_wire_peek(f.msg, f.len, &pk), KVR_OK);
    CHECK_EQ(pk.compressed, 1);

    /* Encode-side errors. */
    float one[4] = {0};
    struct kvr_wire_block b1 = f.b;
    size_t len;
    struct kvr_wire_opts bad = o;
    log_reset();
    bad.level = 23;
    CHECK_EQ(kvr_wire_encode(f.c, &bad, &f.b, f.k, f.v, f.t, f.cap, &len), KVR_EINVAL);
    CHECK(logged("kvr_wire_encode: bad options: dtype 0 transform 1 level 23"));
    bad = o;
    bad.dtype = 3;
    CHECK_EQ(kvr_wire_encode(f.c, &bad, &f.b, f.k, f.v, f.t, f.cap, &len), KVR_EINVAL);
    bad = o;
    bad.transform = 2;
    CHECK_EQ(kvr_wire_encode(f.c, &bad, &f.b, f.k, f.v, f.t, f.cap, &len), KVR_EINVAL);
    b1.n_tokens = 0;
    CHECK_EQ(kvr_wire_encode(f.c, &o, &b1, one, one, f.t, f.cap, &len), KVR_EINVAL);
    b1 = f.b;
    b1.layer_begin = -1;
    CHECK_EQ(kvr_wire_encode(f.c, &o, &b1, f.k, f.v, f.t, f.cap, &len), KVR_EINVAL);
    b1 = f.b;
    b1.head_dim = 70000;
    b1.n_tokens = 1;
    b1.n_kv_heads = 1;
    CHECK_EQ(kvr_wire_encode(f.c, &o, &b1, f.k, f.v, f.t, f.cap, &len), KVR_EINVAL);
    b1 = f.b;
    b1.n_tokens = 17; /* more floats than the codec holds */
    log_reset();
    CHECK_EQ(kvr_wire_encode(f.c, &o, &b1, f.k, f.v, f.t, 1 << 20, &len), KVR_ERANGE);
    CHECK(logged("codec holds 256 floats"));
    CHECK_EQ(kvr_wire_encode(f.c, &o, &f.b, f.k, f.v, f.t, f.cap - 1, &len), KVR_ERANGE);
    struct kvr_wire_codec *tmp = NULL;
    CHECK_EQ(kvr_wire_codec_create(0, &tmp), KVR_EINVAL);
    CHECK_EQ(kvr_wire_codec_create((size_t)UINT32_MAX, &tmp), KVR_EINVAL);
    CHECK(tmp == NULL);
    CHECK_EQ(kvr_wire_max_nbytes(&b1), 64 + 2 * 17 * 16 * 4);
    b1.n_tokens = INT_MAX;
    CHECK_EQ(kvr_wire_max_nbytes(&b1), 0);

    kvr_log_set_sink(NULL, NULL);
    free(f.k);
    free(f.v);
    free(f.k2);
    free(f.v2);
    free(f.msg);
    free(f.raw);
    free(f.t);
    kvr_wire_codec_free(f.c);
}

/* ---- end to end --------------------------------------------------------------------- */

/* Prefills the bundled model, ships every (block, layer) of the prompt's cache through
 * the codec into a pool with another block size, and greedy-decodes from both. */
/* With --write-golden DIR, test_end_to_end writes the golden messages there (done once;
 * the files are checked in under tests/data and read by test_golden_block). */
static const char *golden_out_dir;

/* The golden block: tokens 16..31, layer 2 of the bundled model's cache of the
 * end-to-end prompt, in two encodings. */
#define GOLDEN_T0    16
#define GOLDEN_LAYER 2
#define GOLDEN_SEQ   0x0123456789abcdefull
static const struct {
    const char *file;
    struct kvr_wire_opts opts;
} golden_files[] = {
    {"kv_block_v2_f32_shuffle_zstd.bin",
     {.dtype = KVR_WIRE_F32, .transform = KVR_WIRE_TF_SHUFFLE, .level = 1}},
    {"kv_block_v2_f16_none_zstd3.bin",
     {.dtype = KVR_WIRE_F16, .transform = KVR_WIRE_TF_NONE, .level = 3}},
};

static void write_golden(const struct kvr_wire_block *b, const float *k, const float *v) {
    struct kvr_wire_codec *c = NULL;
    size_t n = (size_t)b->n_tokens * (size_t)b->n_kv_heads * (size_t)b->head_dim;
    REQUIRE(kvr_wire_codec_create(n, &c) == KVR_OK);
    size_t cap = kvr_wire_max_nbytes(b);
    uint8_t *msg = malloc(cap);
    REQUIRE(msg);
    for (size_t i = 0; i < sizeof golden_files / sizeof golden_files[0]; i++) {
        size_t len = 0;
        REQUIRE(kvr_wire_encode(c, &golden_files[i].opts, b, k, v, msg, cap, &len) == KVR_OK);
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", golden_out_dir, golden_files[i].file);
        FILE *f = fopen(path, "wb");
        REQUIRE(f && fwrite(msg, 1, len, f) == len);
        fclose(f);
        fprintf(stderr, "wrote %s (%zu bytes)\n", path, len);
    }
    free(msg);
    kvr_wire_codec_free(c);
}

static void test_end_to_end(void) {
    struct kvr_model *model = NULL;
    struct kvr_tokenizer *tok = NULL;
    REQUIRE(kvr_model_load(shared_path("models/stories260K.bin"), &model) == KVR_OK);
    const struct kvr_model_config *cfg = kvr_model_config(model);
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), cfg->vocab_size, &tok) == KVR_OK);
    const char *text =
        "Once upon a time, in a warm and sunny place, there was a big pit. A little boy "
        "named Tom liked to play near the pit. One day, Tom lost his red ball. He was "
        "very sad. Tom asked his friend.";
    int prompt[512], n_prompt = 0;
    REQUIRE(kvr_tokenizer_encode(tok, text, 1, 0, prompt, 512, &n_prompt) == KVR_OK);
    /* The cache covers all prompt tokens but the last, which starts the decoding. */
    const int n_cached = n_prompt - 1, n_gen = 40, n_total = n_prompt + n_gen;
    const int bt_a = 16, bt_b = 7;
    if (!(n_cached > 40 && n_cached % bt_a != 0)) /* want a partial last block */
        fprintf(stderr, "n_cached = %d\n", n_cached);
    REQUIRE(n_cached > 40 && n_cached % bt_a != 0);
    uint64_t fp = kvr_model_fingerprint(model);
    uint64_t tok_nbytes = kvr_kv_token_nbytes(cfg->n_layers, cfg->kv_dim);

    struct kvr_kv_pool *pa = NULL, *pb = NULL;
    struct kvr_kv_seq *sa = NULL, *sb = NULL;
    struct kvr_engine *eng = NULL;
    struct kvr_kv_pool_params ppa = {.n_layers = cfg->n_layers,
                                     .kv_dim = cfg->kv_dim,
                                     .block_tokens = bt_a,
                                     .budget_nbytes =
                                         (uint64_t)(n_total / bt_a + 2) * bt_a * tok_nbytes};
    struct kvr_kv_pool_params ppb = {.n_layers = cfg->n_layers,
                                     .kv_dim = cfg->kv_dim,
                                     .block_tokens = bt_b,
                                     .budget_nbytes =
                                         (uint64_t)(n_total / bt_b + 2) * bt_b * tok_nbytes};
    struct kvr_kv_seq_params sp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = n_total};
    struct kvr_engine_params ep = {.model = model,
                                   .n_threads = 1,
                                   .n_batch_tokens_max = n_prompt,
                                   .n_items_max = 1,
                                   .n_ctx_max = n_total};
    REQUIRE(kvr_kv_pool_create(&ppa, &pa) == KVR_OK && kvr_kv_pool_create(&ppb, &pb) == KVR_OK);
    REQUIRE(kvr_kv_seq_create(pa, &sp, &sa) == KVR_OK && kvr_kv_seq_create(pb, &sp, &sb) == KVR_OK);
    REQUIRE(kvr_engine_create(&ep, &eng) == KVR_OK);
    float *la = malloc((size_t)cfg->vocab_size * sizeof *la);
    float *lb = malloc((size_t)cfg->vocab_size * sizeof *lb);
    REQUIRE(la && lb);

    struct kvr_forward_item it = {.seq = sa, .tokens = prompt, .n_tokens = n_cached};
    REQUIRE(kvr_engine_forward(eng, &it, 1) == KVR_OK);

    /* Ship: one message per (block of A, layer), as the prefill node does. */
    size_t max_floats = (size_t)bt_a * (size_t)cfg->kv_dim;
    struct kvr_wire_codec *enc = NULL, *dec = NULL;
    REQUIRE(kvr_wire_codec_create(max_floats, &enc) == KVR_OK);
    REQUIRE(kvr_wire_codec_create(max_floats, &dec) == KVR_OK);
    struct kvr_wire_block shape = {
        .n_layers = 1, .n_tokens = bt_a, .n_kv_heads = cfg->n_kv_heads, .head_dim = cfg->head_dim};
    size_t cap = kvr_wire_max_nbytes(&shape);
    uint8_t *msg = malloc(cap);
    float *kb = malloc(max_floats * sizeof *kb), *vb = malloc(max_floats * sizeof *vb);
    REQUIRE(msg && kb && vb);
    REQUIRE(kvr_kv_seq_reserve(sb, n_cached) == KVR_OK);
    struct kvr_wire_opts o = {.dtype = KVR_WIRE_F32, .transform = KVR_WIRE_TF_SHUFFLE};
    int n_msgs = 0, n_fail = 0;
    size_t wire_bytes = 0;
    for (int t0 = 0; t0 < n_cached; t0 += bt_a) {
        int nt = n_cached - t0 < bt_a ? n_cached - t0 : bt_a;
        for (int l = 0; l < cfg->n_layers; l++) {
            float *k, *v; /* a block's rows of one layer are contiguous */
            REQUIRE(kvr_kv_seq_slot(sa, l, t0, &k, &v) == KVR_OK);
            struct kvr_wire_block b = {.fingerprint = fp,
                                       .seq_id = 99,
                                       .layer_begin = l,
                                       .n_layers = 1,
                                       .token_begin = t0,
                                       .n_tokens = nt,
                                       .n_kv_heads = cfg->n_kv_heads,
                                       .head_dim = cfg->head_dim};
            size_t len = 0;
            struct kvr_wire_block d = {0};
            n_fail += kvr_wire_encode(enc, &o, &b, k, v, msg, cap, &len) != KVR_OK;
            n_fail += kvr_wire_decode(dec, msg, len, fp, &d, kb, vb, max_floats) != KVR_OK;
            n_fail +=
                d.seq_id != 99 || d.layer_begin != l || d.token_begin != t0 || d.n_tokens != nt;
            n_fail +=
                kvr_kv_seq_import(sb, d.layer_begin, d.token_begin, d.n_tokens, kb, vb) != KVR_OK;
            n_msgs++;
            wire_bytes += len;
        }
    }
    kvr_kv_seq_advance(sb, n_cached);
    if (golden_out_dir) {
        float *k, *v;
        REQUIRE(kvr_kv_seq_slot(sa, GOLDEN_LAYER, GOLDEN_T0, &k, &v) == KVR_OK);
        struct kvr_wire_block b = {.fingerprint = fp,
                                   .seq_id = GOLDEN_SEQ,
                                   .layer_begin = GOLDEN_LAYER,
                                   .n_layers = 1,
                                   .token_begin = GOLDEN_T0,
                                   .n_tokens = bt_a,
                                   .n_kv_heads = cfg->n_kv_heads,
                                   .head_dim = cfg->head_dim};
        write_golden(&b, k, v);
    }
    CHECK_EQ(n_fail, 0);
    CHECK_EQ(n_msgs, ((n_cached + bt_a - 1) / bt_a) * cfg->n_layers);
    CHECK(wire_bytes < (size_t)n_cached * tok_nbytes);
    fprintf(stderr, "e2e: %d cached tokens, %d messages, %zu wire bytes for %llu raw\n", n_cached,
            n_msgs, wire_bytes, (unsigned long long)((uint64_t)n_cached * tok_nbytes));

    /* Every imported value equals the original, bit for bit. */
    int diff = 0;
    for (int p = 0; p < n_cached; p++)
        for (int l = 0; l < cfg->n_layers; l++) {
            float *ka, *va, *kb2, *vb2;
            REQUIRE(kvr_kv_seq_slot(sa, l, p, &ka, &va) == KVR_OK);
            REQUIRE(kvr_kv_seq_slot(sb, l, p, &kb2, &vb2) == KVR_OK);
            diff += memcmp(ka, kb2, (size_t)cfg->kv_dim * 4) != 0 ||
                    memcmp(va, vb2, (size_t)cfg->kv_dim * 4) != 0;
        }
    CHECK_EQ(diff, 0);

    /* Greedy decoding from both caches, starting with the last prompt token. */
    int gen_a[64], gen_b[64], mism = 0;
    for (int i = 0; i < n_gen; i++) {
        const int *in_a = i ? &gen_a[i - 1] : &prompt[n_prompt - 1];
        const int *in_b = i ? &gen_b[i - 1] : &prompt[n_prompt - 1];
        it = (struct kvr_forward_item){.seq = sa, .tokens = in_a, .n_tokens = 1, .logits = la};
        REQUIRE(kvr_engine_forward(eng, &it, 1) == KVR_OK);
        gen_a[i] = kvr_argmax(la, cfg->vocab_size);
        it = (struct kvr_forward_item){.seq = sb, .tokens = in_b, .n_tokens = 1, .logits = lb};
        REQUIRE(kvr_engine_forward(eng, &it, 1) == KVR_OK);
        gen_b[i] = kvr_argmax(lb, cfg->vocab_size);
    }
    for (int i = 0; i < n_gen; i++)
        mism += gen_a[i] != gen_b[i];
    CHECK_EQ(mism, 0);
    /* And the continuation is a real one, not one token repeated. */
    int distinct = 0;
    for (int i = 1; i < n_gen; i++)
        distinct += gen_a[i] != gen_a[0];
    CHECK(distinct > 5);

    free(msg);
    free(kb);
    free(vb);
    free(la);
    free(lb);
    kvr_wire_codec_free(enc);
    kvr_wire_codec_free(dec);
    kvr_engine_free(eng);
    kvr_kv_seq_free(sa);
    kvr_kv_seq_free(sb);
    kvr_kv_pool_free(pa);
    kvr_kv_pool_free(pb);
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
}

/* ---- the checksum and the golden block ---------------------------------------------- */

/* 64-bit FNV-1a: an independent digest of decoded values (not the format's checksum). */
static uint64_t fnv1a(const void *data, size_t n) {
    const uint8_t *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* Known answers of the format's checksum (docs/KV_WIRE_FORMAT.md lists them). The values
 * were computed with Debian's python3-xxhash 3.0.0 (its own build of xxHash 0.8.1), not
 * with the library this test links; XXH3("", seed 0) is xxHash's published value. Input
 * of length n: byte i = (7 i + 1) mod 256. Lengths cross every internal path of XXH3
 * (1-3, 4-8, 9-16, 17-128, 129-240, and the striped loop above 240). */
static void test_checksum_vectors(void) {
    static const struct {
        size_t n;
        uint64_t seed, want;
    } kat[] = {
        {0, 0, 0x2d06800538d394c2ull},
        {0, KVR_WIRE_PAYLOAD_SEED, 0x8c9ddb3eaaf47a1dull},
        {0, KVR_WIRE_HEADER_SEED, 0xeda49e6700f03640ull},
        {1, KVR_WIRE_PAYLOAD_SEED, 0x9e68be2bea3f6904ull},
        {3, KVR_WIRE_PAYLOAD_SEED, 0x2b4bcb70431a4d60ull},
        {4, KVR_WIRE_PAYLOAD_SEED, 0xbb6b68d5258f303cull},
        {8, KVR_WIRE_PAYLOAD_SEED, 0x9139784f117711faull},
        {9, KVR_WIRE_PAYLOAD_SEED, 0xeda8a096b5eaf49cull},
        {16, KVR_WIRE_PAYLOAD_SEED, 0xde219aca9095b142ull},
        {17, KVR_WIRE_PAYLOAD_SEED, 0xcdeae6f002a43401ull},
        {128, KVR_WIRE_PAYLOAD_SEED, 0x631fc1a0ed97accaull},
        {129, KVR_WIRE_PAYLOAD_SEED, 0x0d16ce607dce5232ull},
        {240, KVR_WIRE_PAYLOAD_SEED, 0x1e728d55b7a00ea6ull},
        {241, KVR_WIRE_PAYLOAD_SEED, 0x8fc61b50541a8189ull},
        {1024, KVR_WIRE_PAYLOAD_SEED, 0xd52826898e95db76ull},
        {4096, KVR_WIRE_PAYLOAD_SEED, 0xb5d808b019fbeadcull},
    };
    static uint8_t buf[4096];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (uint8_t)(i * 7 + 1);
    int bad = 0;
    for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
        uint64_t got = kvr_wire_hash(buf, kat[i].n, kat[i].seed);
        if (got != kat[i].want) {
            fprintf(stderr, "checksum of %zu bytes, seed %016llx: %016llx, want %016llx\n",
                    kat[i].n, (unsigned long long)kat[i].seed, (unsigned long long)got,
                    (unsigned long long)kat[i].want);
            bad++;
        }
    }
    CHECK_EQ(bad, 0);
    /* "a" with seed 0, the other published style of vector. */
    CHECK_EQ(kvr_wire_hash("a", 1, 0), 0xe6c632b61e964e1full);
}

static uint8_t *read_data(const char *name, size_t *len) {
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/data/%s", KVR_SOURCE_DIR, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        return NULL;
    }
    uint8_t *buf = malloc(1 << 16);
    *len = buf ? fread(buf, 1, 1 << 16, f) : 0;
    fclose(f);
    return buf;
}

/* Messages encoded once from the bundled model and checked in: any change to the format
 * (header layout, checksum, shuffle, f16 rounding, version) fails here. */
static void test_golden_block(void) {
    const int kv_dim = 32, nt = 16; /* the bundled model: 4 KV heads of 8 */
    const size_t n = (size_t)nt * kv_dim;
    float k32[512], v32[512], k16[512], v16[512];
    struct kvr_wire_codec *c = NULL;
    REQUIRE(kvr_wire_codec_create(n, &c) == KVR_OK);
    float *outk[2] = {k32, k16}, *outv[2] = {v32, v16};
    /* FNV-1a of the decoded K then V floats, recorded when the files were written. */
    static const uint64_t want_digest[2] = {0x96502179571d289eull, 0xfe015c6338ba170aull};
    for (int i = 0; i < 2; i++) {
        size_t len = 0;
        uint8_t *m = read_data(golden_files[i].file, &len);
        REQUIRE(m);
        struct kvr_wire_block b = {0};
        int rc = kvr_wire_decode(c, m, len, 0, &b, outk[i], outv[i], n);
        CHECK_EQ(rc, KVR_OK);
        CHECK_EQ(m[4] | m[5] << 8, KVR_WIRE_VERSION);
        CHECK_EQ(b.seq_id, GOLDEN_SEQ);
        CHECK_EQ(b.layer_begin, GOLDEN_LAYER);
        CHECK_EQ(b.n_layers, 1);
        CHECK_EQ(b.token_begin, GOLDEN_T0);
        CHECK_EQ(b.n_tokens, nt);
        CHECK_EQ(b.n_kv_heads, 4);
        CHECK_EQ(b.head_dim, 8);
        CHECK_EQ(b.dtype, golden_files[i].opts.dtype);
        CHECK_EQ(b.transform, golden_files[i].opts.transform);
        CHECK(b.compressed);
        uint64_t d = fnv1a(outk[i], n * 4) ^ (fnv1a(outv[i], n * 4) * 3);
        if (d != want_digest[i])
            fprintf(stderr, "golden %s: decoded digest %016llx\n", golden_files[i].file,
                    (unsigned long long)d);
        CHECK_EQ(d, want_digest[i]);
        free(m);
    }
    /* The f16 message holds the f32 message's values rounded to half precision. */
    int mism = 0;
    for (size_t i = 0; i < n; i++)
        mism += !f16_within(k32[i], k16[i]) || !f16_within(v32[i], v16[i]);
    CHECK_EQ(mism, 0);
    kvr_wire_codec_free(c);
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--write-golden")) {
        golden_out_dir = argv[2];
        test_end_to_end();
        return 0;
    }
    test_checksum_vectors();
    test_golden_block();
    test_half();
    test_roundtrip();
    test_errors();
    test_end_to_end();
    CHECK_DONE();
}
