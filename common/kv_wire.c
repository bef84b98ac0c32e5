/* kv_wire.c - the KV block wire format (kv_wire.h, docs/KV_WIRE_FORMAT.md): value-type
 * conversion, byte-plane shuffle, zstd, checksums and a fixed 64-byte little-endian
 * header. Called by the prefill node (encode, one message per layer of a block) and the
 * decode node (decode); owns its zstd contexts and one scratch buffer per codec. */
#include "kv_wire.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>
#include <zstd_errors.h>

#include "half.h"
#include "log.h"
#include "model.h"

#include <xxhash.h>
#include "status.h"

/* Header layout; offsets are part of the format (docs/KV_WIRE_FORMAT.md lists them too:
 * change both together). */
#define OFF_MAGIC       0  /* 4 bytes "KVRW" */
#define OFF_VERSION     4  /* u16 */
#define OFF_FLAGS       6  /* u8: bit 0 = payload is a zstd frame */
#define OFF_DTYPE       7  /* u8 enum kvr_wire_dtype */
#define OFF_TRANSFORM   8  /* u8 enum kvr_wire_transform */
#define OFF_LEVEL       9  /* i8 zstd level (informational) */
#define OFF_N_LAYERS    10 /* u16 */
#define OFF_N_KV_HEADS  12 /* u16 */
#define OFF_HEAD_DIM    14 /* u16 */
#define OFF_LAYER_BEGIN 16 /* u32 */
#define OFF_TOKEN_BEGIN 20 /* u32 */
#define OFF_N_TOKENS    24 /* u32 */
#define OFF_RAW_NBYTES  28 /* u32 payload bytes before compression */
#define OFF_PAYLOAD     32 /* u32 payload bytes on the wire */
#define OFF_FINGERPRINT 36 /* u64 */
#define OFF_SEQ_ID      44 /* u64 */
#define OFF_PAYLOAD_SUM 52 /* u64 kvr_wire_hash of the uncompressed payload */
#define OFF_HEADER_SUM  60 /* u32 low half of kvr_wire_hash of bytes 0..59 */
_Static_assert(OFF_HEADER_SUM + 4 == KVR_WIRE_HEADER_NBYTES, "header layout");

#define FLAG_COMPRESSED 0x01u
#define FLAGS_KNOWN     FLAG_COMPRESSED

static const unsigned char wire_magic[4] = {'K', 'V', 'R', 'W'};

/* A WARN line under the public function's name (parse_header and inflate serve both
 * kvr_wire_peek and kvr_wire_decode). */
#define WIRE_WARN(fn, ...)                                                                         \
    do {                                                                                           \
        if (KVR_LOG_LEVEL_WARN <= kvr_log_level)                                                   \
            kvr_log_write(KVR_LOG_LEVEL_WARN, fn, __VA_ARGS__);                                    \
    } while (0)

struct kvr_wire_codec {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    size_t max_floats; /* floats of K (and as many of V) per block */
    uint8_t *buf;      /* (buf_nbytes) the payload before compression / after inflation */
    size_t buf_nbytes; /* 2 * max_floats * 4 */
};

/* Everything the header says, after parse_header checked it. */
struct wire_hdr {
    struct kvr_wire_block b;
    uint32_t raw_nbytes;
    uint64_t payload_sum;
    size_t n_floats; /* floats of K (= of V): n_layers * n_tokens * kv_dim */
};

/* ---- names --------------------------------------------------------------------- */

const char *kvr_wire_dtype_name(int dtype) {
    static const char *names[] = {"f32", "f16", "bf16"};
    return dtype >= 0 && dtype < 3 ? names[dtype] : "?";
}

const char *kvr_wire_transform_name(int transform) {
    static const char *names[] = {"none", "shuffle"};
    return transform >= 0 && transform < 2 ? names[transform] : "?";
}

int kvr_wire_dtype_nbytes(int dtype) {
    switch (dtype) {
    case KVR_WIRE_F32:
        return 4;
    case KVR_WIRE_F16:
    case KVR_WIRE_BF16:
        return 2;
    default:
        return 0;
    }
}

/* ---- little-endian fields -------------------------------------------------------- */

static void put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get16(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p) {
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

uint64_t kvr_wire_hash(const void *data, size_t len, uint64_t seed) {
    return (uint64_t)XXH3_64bits_withSeed(data, len, (XXH64_hash_t)seed);
}

static uint32_t header_sum(const uint8_t *h) {
    return (uint32_t)kvr_wire_hash(h, OFF_HEADER_SUM, KVR_WIRE_HEADER_SEED);
}

/* ---- codec --------------------------------------------------------------------- */

int kvr_wire_codec_create(size_t max_floats, struct kvr_wire_codec **out) {
    *out = NULL;
    /* The header's lengths are 32-bit: a block's raw f32 payload must fit. */
    if (max_floats == 0 || max_floats > UINT32_MAX / 8) {
        KVR_LOG_ERROR("max_floats %zu out of range (1..%u)", max_floats, UINT32_MAX / 8);
        return KVR_EINVAL;
    }
    struct kvr_wire_codec *c = calloc(1, sizeof *c);
    if (!c)
        return KVR_ENOMEM;
    c->max_floats = max_floats;
    c->buf_nbytes = 2 * max_floats * sizeof(float);
    c->buf = malloc(c->buf_nbytes);
    c->cctx = ZSTD_createCCtx();
    c->dctx = ZSTD_createDCtx();
    if (!c->buf || !c->cctx || !c->dctx) {
        kvr_wire_codec_free(c);
        return KVR_ENOMEM;
    }
    *out = c;
    return KVR_OK;
}

void kvr_wire_codec_free(struct kvr_wire_codec *c) {
    if (!c)
        return;
    ZSTD_freeCCtx(c->cctx);
    ZSTD_freeDCtx(c->dctx);
    free(c->buf);
    free(c);
}

/* Floats of K in a block (= of V), or 0 when a field is < 1 or the raw f32 payload
 * (2 * n * 4 bytes) would not fit the header's 32-bit length. */
static size_t block_floats(const struct kvr_wire_block *b) {
    if (b->n_layers < 1 || b->n_tokens < 1 || b->n_kv_heads < 1 || b->head_dim < 1)
        return 0;
    uint64_t lim = UINT32_MAX / 8;
    uint64_t n = (uint64_t)b->n_layers * (uint64_t)b->n_kv_heads; /* < 2^62 */
    if (n > lim || (n *= (uint64_t)b->head_dim) > lim || (n *= (uint64_t)b->n_tokens) > lim)
        return 0;
    return (size_t)n;
}

size_t kvr_wire_max_nbytes(const struct kvr_wire_block *b) {
    size_t n = b ? block_floats(b) : 0;
    return n ? KVR_WIRE_HEADER_NBYTES + 2 * n * sizeof(float) : 0;
}

/* ---- value conversion and byte planes ---------------------------------------------- */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HOST_LE 1
#else
#define HOST_LE 0
#endif

/* Writes n values of a (converted to dtype) as values [i0, i0 + n) of a payload of
 * n_total values: plain little-endian values, or byte planes (plane j holds byte j of
 * every value, n_total bytes per plane). The loops are per type so they vectorize. */
static void pack(uint8_t *out, const float *a, size_t i0, size_t n, size_t n_total, int dtype,
                 int shuffle) {
    if (dtype == KVR_WIRE_F32) {
        if (!shuffle && HOST_LE) {
            memcpy(out + 4 * i0, a, n * 4);
        } else if (!shuffle) {
            uint8_t *o = out + 4 * i0;
            for (size_t i = 0; i < n; i++)
                put32(o + 4 * i, kvr_f32_bits(a[i]));
        } else {
            uint8_t *p0 = out + i0, *p1 = p0 + n_total, *p2 = p1 + n_total, *p3 = p2 + n_total;
            for (size_t i = 0; i < n; i++) {
                uint32_t u = kvr_f32_bits(a[i]);
                p0[i] = (uint8_t)u;
                p1[i] = (uint8_t)(u >> 8);
                p2[i] = (uint8_t)(u >> 16);
                p3[i] = (uint8_t)(u >> 24);
            }
        }
        return;
    }
    /* 2-byte types: lo/hi are where byte 0 / byte 1 of value i go, step apart. */
    uint8_t *lo, *hi;
    size_t step;
    if (shuffle) {
        lo = out + i0;
        hi = lo + n_total;
        step = 1;
    } else {
        lo = out + 2 * i0;
        hi = lo + 1;
        step = 2;
    }
    if (dtype == KVR_WIRE_F16) {
        for (size_t i = 0; i < n; i++) {
            uint16_t h = kvr_f32_to_f16(a[i]);
            lo[i * step] = (uint8_t)h;
            hi[i * step] = (uint8_t)(h >> 8);
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            uint16_t h = kvr_f32_to_bf16(a[i]);
            lo[i * step] = (uint8_t)h;
            hi[i * step] = (uint8_t)(h >> 8);
        }
    }
}

/* Inverse of pack: values [i0, i0 + n) of the payload into a (f32). */
static void unpack(float *a, const uint8_t *in, size_t i0, size_t n, size_t n_total, int dtype,
                   int shuffle) {
    if (dtype == KVR_WIRE_F32) {
        if (!shuffle && HOST_LE) {
            memcpy(a, in + 4 * i0, n * 4);
        } else if (!shuffle) {
            const uint8_t *p = in + 4 * i0;
            for (size_t i = 0; i < n; i++)
                a[i] = kvr_bits_f32(get32(p + 4 * i));
        } else {
            const uint8_t *p0 = in + i0, *p1 = p0 + n_total, *p2 = p1 + n_total, *p3 = p2 + n_total;
            for (size_t i = 0; i < n; i++)
                a[i] = kvr_bits_f32((uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 |
                                    (uint32_t)p3[i] << 24);
        }
        return;
    }
    const uint8_t *lo, *hi;
    size_t step;
    if (shuffle) {
        lo = in + i0;
        hi = lo + n_total;
        step = 1;
    } else {
        lo = in + 2 * i0;
        hi = lo + 1;
        step = 2;
    }
    if (dtype == KVR_WIRE_F16) {
        for (size_t i = 0; i < n; i++)
            a[i] = kvr_f16_to_f32((uint16_t)(lo[i * step] | hi[i * step] << 8));
    } else {
        for (size_t i = 0; i < n; i++)
            a[i] = kvr_bf16_to_f32((uint16_t)(lo[i * step] | hi[i * step] << 8));
    }
}

/* ---- encode ---------------------------------------------------------------------- */

/* Compresses the payload in c->buf (raw bytes; es-byte values, byte planes when shuffle)
 * into dst (dst_cap bytes). Returns the frame size, 0 when it does not fit in dst_cap
 * (the caller stores the payload raw), or KVR_ECOMPRESS as a negative value via *rc. */
static size_t compress_payload(struct kvr_wire_codec *c, int level, int shuffle, size_t raw,
                               size_t es, uint8_t *dst, size_t dst_cap, int *rc) {
    ZSTD_CCtx *z = c->cctx;
    *rc = KVR_OK;
    size_t r = ZSTD_CCtx_reset(z, ZSTD_reset_session_and_parameters);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(z, ZSTD_c_compressionLevel, level);
    /* Byte planes of floats hold few long repeats and many useless short ones: matches
     * of 7+ bytes only gave a better ratio at every level on real caches; for the fast
     * strategies (levels <= 3) a 256-entry hash table (L1-resident, cheap to reset per
     * frame) also gave 1.3-2x the speed, while it slows the lazy/optimal ones down
     * (docs/perf/kvwire.md). Plain (TF_NONE) keeps zstd's own parameters. */
    if (shuffle && !ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(z, ZSTD_c_minMatch, 7);
    if (shuffle && level <= 3 && !ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(z, ZSTD_c_hashLog, 8);
    if (ZSTD_isError(r)) {
        KVR_LOG_ERROR("zstd setup failed: %s", ZSTD_getErrorName(r));
        *rc = KVR_ECOMPRESS;
        return 0;
    }
    if (!shuffle) {
        r = ZSTD_compress2(z, dst, dst_cap, c->buf, raw);
        if (ZSTD_isError(r)) {
            if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall)
                return 0;
            KVR_LOG_ERROR("ZSTD_compress2 failed: %s", ZSTD_getErrorName(r));
            *rc = KVR_ECOMPRESS;
        }
        return ZSTD_isError(r) ? 0 : r;
    }
    /* One zstd block per byte plane: zstd entropy-codes all literals of a block with one
     * Huffman table, so a plane of exponent bytes sharing a block with near-random
     * mantissa bytes would lose most of its gain. Flushing at each plane boundary ends
     * the block there; the result is still one ordinary frame. */
    r = ZSTD_CCtx_setPledgedSrcSize(z, raw);
    if (ZSTD_isError(r)) {
        KVR_LOG_ERROR("ZSTD_CCtx_setPledgedSrcSize failed: %s", ZSTD_getErrorName(r));
        *rc = KVR_ECOMPRESS;
        return 0;
    }
    size_t plane = raw / es;
    ZSTD_outBuffer ob = {dst, dst_cap, 0};
    for (size_t j = 0; j < es; j++) {
        ZSTD_inBuffer ib = {c->buf + j * plane, plane, 0};
        ZSTD_EndDirective op = j + 1 == es ? ZSTD_e_end : ZSTD_e_flush;
        r = ZSTD_compressStream2(z, &ob, &ib, op);
        if (ZSTD_isError(r)) {
            KVR_LOG_ERROR("ZSTD_compressStream2 failed: %s", ZSTD_getErrorName(r));
            *rc = KVR_ECOMPRESS;
            return 0;
        }
        if (r != 0 || ib.pos != ib.size) /* out of room: not worth compressing */
            return 0;
    }
    return ob.pos;
}

int kvr_wire_encode(struct kvr_wire_codec *c, const struct kvr_wire_opts *o,
                    const struct kvr_wire_block *b, const float *k, const float *v, void *dst,
                    size_t cap, size_t *len) {
    if (!c || !o || !b || !k || !v || !dst || !len)
        return KVR_EINVAL;
    *len = 0;
    int es = kvr_wire_dtype_nbytes(o->dtype);
    int level = o->level ? o->level : KVR_WIRE_DEFAULT_LEVEL;
    if (!es || (o->transform != KVR_WIRE_TF_NONE && o->transform != KVR_WIRE_TF_SHUFFLE) ||
        level < KVR_WIRE_LEVEL_MIN || level > KVR_WIRE_LEVEL_MAX) {
        KVR_LOG_ERROR("bad options: dtype %d transform %d level %d", (int)o->dtype,
                      (int)o->transform, o->level);
        return KVR_EINVAL;
    }
    size_t n = block_floats(b);
    if (!n || b->n_layers > 65535 || b->n_kv_heads > 65535 || b->head_dim > 65535 ||
        b->layer_begin < 0 || b->token_begin < 0 || b->layer_begin > INT_MAX - b->n_layers ||
        b->token_begin > INT_MAX - b->n_tokens) {
        KVR_LOG_ERROR("seq=%llu bad block: layers %d+%d tokens %d+%d heads %d x %d",
                      (unsigned long long)b->seq_id, b->layer_begin, b->n_layers, b->token_begin,
                      b->n_tokens, b->n_kv_heads, b->head_dim);
        return KVR_EINVAL;
    }
    size_t raw = 2 * n * (size_t)es;
    if (n > c->max_floats || cap < KVR_WIRE_HEADER_NBYTES + raw) {
        KVR_LOG_ERROR("seq=%llu block of %zu floats needs %zu bytes; codec holds %zu floats, "
                      "dst has %zu bytes",
                      (unsigned long long)b->seq_id, n, KVR_WIRE_HEADER_NBYTES + raw, c->max_floats,
                      cap);
        return KVR_ERANGE;
    }
    int shuffle = o->transform == KVR_WIRE_TF_SHUFFLE;
    uint8_t *h = dst;
    uint8_t *payload = h + KVR_WIRE_HEADER_NBYTES;
    /* Stored: packed straight into the message (one pass over the values, no copy). */
    uint8_t *packed = o->store ? payload : c->buf;
    pack(packed, k, 0, n, 2 * n, o->dtype, shuffle);
    pack(packed, v, n, n, 2 * n, o->dtype, shuffle);
    uint64_t sum = kvr_wire_hash(packed, raw, KVR_WIRE_PAYLOAD_SEED);

    size_t z = 0;
    if (!o->store) {
        int rc;
        /* Room for raw - 1 bytes: a frame that does not come out strictly smaller is dropped. */
        z = compress_payload(c, level, shuffle, raw, (size_t)es, payload, raw - 1, &rc);
        if (rc != KVR_OK)
            return rc;
        if (z == 0)
            memcpy(payload, c->buf, raw);
    }

    memcpy(h + OFF_MAGIC, wire_magic, 4);
    put16(h + OFF_VERSION, KVR_WIRE_VERSION);
    h[OFF_FLAGS] = z ? FLAG_COMPRESSED : 0;
    h[OFF_DTYPE] = (uint8_t)o->dtype;
    h[OFF_TRANSFORM] = (uint8_t)o->transform;
    h[OFF_LEVEL] = (uint8_t)(int8_t)level;
    put16(h + OFF_N_LAYERS, (uint32_t)b->n_layers);
    put16(h + OFF_N_KV_HEADS, (uint32_t)b->n_kv_heads);
    put16(h + OFF_HEAD_DIM, (uint32_t)b->head_dim);
    put32(h + OFF_LAYER_BEGIN, (uint32_t)b->layer_begin);
    put32(h + OFF_TOKEN_BEGIN, (uint32_t)b->token_begin);
    put32(h + OFF_N_TOKENS, (uint32_t)b->n_tokens);
    put32(h + OFF_RAW_NBYTES, (uint32_t)raw);
    put32(h + OFF_PAYLOAD, (uint32_t)(z ? z : raw));
    put64(h + OFF_FINGERPRINT, b->fingerprint);
    put64(h + OFF_SEQ_ID, b->seq_id);
    put64(h + OFF_PAYLOAD_SUM, sum);
    put32(h + OFF_HEADER_SUM, header_sum(h));
    *len = KVR_WIRE_HEADER_NBYTES + (z ? z : raw);
    return KVR_OK;
}

/* ---- decode ---------------------------------------------------------------------- */

/* Parses and checks the header of a len-byte message (see kvr_wire_decode for the
 * order of checks). Logs the reason of a failure under the caller's name. */
static int parse_header(const char *fn, const uint8_t *h, size_t len, struct wire_hdr *w) {
    if (len >= 4 && memcmp(h + OFF_MAGIC, wire_magic, 4) != 0) {
        WIRE_WARN(fn, "bad magic %02x%02x%02x%02x (want \"KVRW\")", h[0], h[1], h[2], h[3]);
        return KVR_EMAGIC;
    }
    if (len >= 6 && get16(h + OFF_VERSION) != KVR_WIRE_VERSION) {
        WIRE_WARN(fn, "format version %u, this build reads %d", (unsigned)get16(h + OFF_VERSION),
                  KVR_WIRE_VERSION);
        return KVR_EVERSION;
    }
    if (len < KVR_WIRE_HEADER_NBYTES) {
        WIRE_WARN(fn, "truncated: %zu bytes, shorter than the %d-byte header", len,
                  KVR_WIRE_HEADER_NBYTES);
        return KVR_ETRUNC;
    }
    uint32_t hs = get32(h + OFF_HEADER_SUM), hs_want = header_sum(h);
    if (hs != hs_want) {
        WIRE_WARN(fn, "header checksum mismatch (header says %08x, bytes give %08x)", (unsigned)hs,
                  (unsigned)hs_want);
        return KVR_ECHECKSUM;
    }
    /* From here on the header is what its sender wrote: name the sequence. */
    struct kvr_wire_block *b = &w->b;
    memset(w, 0, sizeof *w);
    b->fingerprint = get64(h + OFF_FINGERPRINT);
    b->seq_id = get64(h + OFF_SEQ_ID);
    unsigned long long seq = (unsigned long long)b->seq_id;
    unsigned flags = h[OFF_FLAGS], dtype = h[OFF_DTYPE], tf = h[OFF_TRANSFORM];
    uint32_t n_layers = get16(h + OFF_N_LAYERS), n_kv_heads = get16(h + OFF_N_KV_HEADS);
    uint32_t head_dim = get16(h + OFF_HEAD_DIM), layer_begin = get32(h + OFF_LAYER_BEGIN);
    uint32_t token_begin = get32(h + OFF_TOKEN_BEGIN), n_tokens = get32(h + OFF_N_TOKENS);
    if (flags & ~FLAGS_KNOWN) {
        WIRE_WARN(fn, "seq=%llu unknown flag bits 0x%02x", seq, flags & ~FLAGS_KNOWN);
        return KVR_EFORMAT;
    }
    if (!kvr_wire_dtype_nbytes((int)dtype) || tf > KVR_WIRE_TF_SHUFFLE) {
        WIRE_WARN(fn, "seq=%llu unknown value type %u or transform %u", seq, dtype, tf);
        return KVR_EFORMAT;
    }
    if (!n_layers || !n_kv_heads || !head_dim || !n_tokens || n_tokens > INT_MAX ||
        layer_begin > (uint32_t)INT_MAX - n_layers || token_begin > (uint32_t)INT_MAX - n_tokens) {
        WIRE_WARN(fn, "seq=%llu bad shape: layers %u+%u tokens %u+%u heads %u x %u", seq,
                  (unsigned)layer_begin, (unsigned)n_layers, (unsigned)token_begin,
                  (unsigned)n_tokens, (unsigned)n_kv_heads, (unsigned)head_dim);
        return KVR_EFORMAT;
    }
    b->layer_begin = (int)layer_begin;
    b->n_layers = (int)n_layers;
    b->token_begin = (int)token_begin;
    b->n_tokens = (int)n_tokens;
    b->n_kv_heads = (int)n_kv_heads;
    b->head_dim = (int)head_dim;
    b->dtype = (enum kvr_wire_dtype)dtype;
    b->transform = (enum kvr_wire_transform)tf;
    b->level = (int8_t)h[OFF_LEVEL];
    b->compressed = (flags & FLAG_COMPRESSED) != 0;
    uint32_t raw = get32(h + OFF_RAW_NBYTES), pay = get32(h + OFF_PAYLOAD);
    b->payload_nbytes = pay;
    w->raw_nbytes = raw;
    w->payload_sum = get64(h + OFF_PAYLOAD_SUM);
    /* Values of K, in steps that cannot overflow: nf < 2^48, n_tokens < 2^31. */
    uint64_t nf = (uint64_t)n_layers * n_kv_heads * head_dim;
    uint64_t prod = nf <= UINT32_MAX ? nf * n_tokens : UINT64_MAX;
    uint64_t want =
        prod <= UINT32_MAX ? 2 * prod * (uint64_t)kvr_wire_dtype_nbytes((int)dtype) : UINT64_MAX;
    if (want != raw) {
        WIRE_WARN(fn,
                  "seq=%llu raw size %u disagrees with the shape (%u layers x %u tokens x "
                  "%u x %u %s, K and V: %llu bytes)",
                  seq, (unsigned)raw, (unsigned)n_layers, (unsigned)n_tokens, (unsigned)n_kv_heads,
                  (unsigned)head_dim, kvr_wire_dtype_name((int)dtype),
                  want == UINT64_MAX ? 0ull : (unsigned long long)want);
        return KVR_ELENGTH;
    }
    w->n_floats = (size_t)prod;
    if (b->compressed ? pay == 0 || pay >= raw : pay != raw) {
        WIRE_WARN(fn, "seq=%llu payload of %u bytes disagrees with a %s payload of %u raw bytes",
                  seq, (unsigned)pay, b->compressed ? "compressed" : "stored", (unsigned)raw);
        return KVR_ELENGTH;
    }
    if (len - KVR_WIRE_HEADER_NBYTES < pay) {
        WIRE_WARN(fn, "seq=%llu truncated: %zu payload bytes of %u", seq,
                  len - KVR_WIRE_HEADER_NBYTES, (unsigned)pay);
        return KVR_ETRUNC;
    }
    if (len - KVR_WIRE_HEADER_NBYTES > pay) {
        WIRE_WARN(fn, "seq=%llu %zu bytes after the %u-byte payload", seq,
                  len - KVR_WIRE_HEADER_NBYTES - pay, (unsigned)pay);
        return KVR_ELENGTH;
    }
    return KVR_OK;
}

int kvr_wire_peek(const void *src, size_t len, struct kvr_wire_block *b) {
    if (!src || !b)
        return KVR_EINVAL;
    struct wire_hdr w;
    int rc = parse_header(__func__, src, len, &w);
    if (rc == KVR_OK)
        *b = w.b;
    return rc;
}

/* Inflates a compressed payload into c->buf, exactly raw bytes. */
static int inflate(struct kvr_wire_codec *c, const uint8_t *p, size_t n, size_t raw,
                   unsigned long long seq) {
    /* A standard frame only: this libzstd also decodes legacy (pre-1.0) and skippable
     * frames, which the encoder never writes and which would take other code paths
     * (legacy decoders allocate their own contexts). */
    static const uint8_t zstd_magic[4] = {0x28, 0xb5, 0x2f, 0xfd};
    if (n < 4 || memcmp(p, zstd_magic, 4) != 0) {
        WIRE_WARN("kvr_wire_decode",
                  "seq=%llu payload is not a zstd frame (starts %02x%02x%02x%02x)", seq,
                  n > 0 ? p[0] : 0, n > 1 ? p[1] : 0, n > 2 ? p[2] : 0, n > 3 ? p[3] : 0);
        return KVR_ECOMPRESS;
    }
    /* One frame, and nothing after it: the encoder writes exactly that. */
    size_t fsz = ZSTD_findFrameCompressedSize(p, n);
    if (ZSTD_isError(fsz)) {
        WIRE_WARN("kvr_wire_decode", "seq=%llu zstd frame unreadable: %s", seq,
                  ZSTD_getErrorName(fsz));
        return KVR_ECOMPRESS;
    }
    if (fsz != n) {
        WIRE_WARN("kvr_wire_decode", "seq=%llu %zu bytes after the %zu-byte zstd frame", seq,
                  n - fsz, fsz);
        return KVR_ELENGTH;
    }
    unsigned long long cs = ZSTD_getFrameContentSize(p, n);
    if (cs == ZSTD_CONTENTSIZE_ERROR) {
        WIRE_WARN("kvr_wire_decode", "seq=%llu zstd frame header unreadable", seq);
        return KVR_ECOMPRESS;
    }
    if (cs != ZSTD_CONTENTSIZE_UNKNOWN && cs > raw) {
        WIRE_WARN("kvr_wire_decode",
                  "seq=%llu zstd frame declares %llu bytes, more than the %zu declared raw", seq,
                  cs, raw);
        return KVR_EOVERFLOW;
    }
    /* The frame may lie about its content size (or omit it): dst capacity raw bounds the
     * output either way, and zstd reports dstSize_tooSmall rather than writing past it. */
    size_t r = ZSTD_decompressDCtx(c->dctx, c->buf, raw, p, n);
    if (ZSTD_isError(r)) {
        if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall) {
            WIRE_WARN("kvr_wire_decode",
                      "seq=%llu zstd frame inflates past the %zu declared raw bytes", seq, raw);
            return KVR_EOVERFLOW;
        }
        WIRE_WARN("kvr_wire_decode", "seq=%llu zstd decompression failed: %s", seq,
                  ZSTD_getErrorName(r));
        return KVR_ECOMPRESS;
    }
    if (r != raw) {
        WIRE_WARN("kvr_wire_decode", "seq=%llu zstd frame inflates to %zu bytes, %zu declared", seq,
                  r, raw);
        return KVR_ELENGTH;
    }
    return KVR_OK;
}

int kvr_wire_decode(struct kvr_wire_codec *c, const void *src, size_t len,
                    uint64_t expect_fingerprint, struct kvr_wire_block *b, float *k, float *v,
                    size_t cap_floats) {
    if (!c || !src || !b || !k || !v)
        return KVR_EINVAL;
    struct wire_hdr w;
    int rc = parse_header(__func__, src, len, &w);
    if (rc != KVR_OK)
        return rc;
    *b = w.b;
    unsigned long long seq = (unsigned long long)b->seq_id;
    if (expect_fingerprint && b->fingerprint != expect_fingerprint) {
        KVR_LOG_WARN("seq=%llu model fingerprint %016llx, this node serves %016llx", seq,
                     (unsigned long long)b->fingerprint, (unsigned long long)expect_fingerprint);
        return KVR_EFINGERPRINT;
    }
    if (w.n_floats > cap_floats || w.n_floats > c->max_floats) {
        KVR_LOG_WARN("seq=%llu block of %zu floats each of K and V; room for %zu, codec for %zu",
                     seq, w.n_floats, cap_floats, c->max_floats);
        return KVR_ERANGE;
    }
    const uint8_t *payload = (const uint8_t *)src + KVR_WIRE_HEADER_NBYTES;
    size_t raw = w.raw_nbytes;
    if (b->compressed) {
        if ((rc = inflate(c, payload, b->payload_nbytes, raw, seq)) != KVR_OK)
            return rc;
        payload = c->buf;
    }
    uint64_t sum = kvr_wire_hash(payload, raw, KVR_WIRE_PAYLOAD_SEED);
    if (sum != w.payload_sum) {
        KVR_LOG_WARN("seq=%llu layers %d+%d tokens %d+%d: payload checksum mismatch (header says "
                     "%016llx, payload gives %016llx)",
                     seq, b->layer_begin, b->n_layers, b->token_begin, b->n_tokens,
                     (unsigned long long)w.payload_sum, (unsigned long long)sum);
        return KVR_ECHECKSUM;
    }
    int shuffle = b->transform == KVR_WIRE_TF_SHUFFLE;
    unpack(k, payload, 0, w.n_floats, 2 * w.n_floats, b->dtype, shuffle);
    unpack(v, payload, w.n_floats, w.n_floats, 2 * w.n_floats, b->dtype, shuffle);
    return KVR_OK;
}
