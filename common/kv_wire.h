/* kv_wire.h - the KV block wire format: one message carries K and V of a range of
 * layers (usually one) of a range of tokens (usually one cache block), compressed with
 * zstd after an optional value-type conversion and byte transform, checksummed and
 * stamped with the model's fingerprint. Byte-by-byte layout: docs/KV_WIRE_FORMAT.md.
 * Decoding trusts nothing: every length, enum and range is checked before use. */
#ifndef KVR_KV_WIRE_H
#define KVR_KV_WIRE_H

#include <stddef.h>
#include <stdint.h>

/* Header size and version of the format this build writes and reads. */
#define KVR_WIRE_HEADER_NBYTES 64
#define KVR_WIRE_VERSION       2

/* Seeds of kvr_wire_hash for the payload checksum and the header checksum (different, so
 * one can never pass for the other). Part of the format. */
#define KVR_WIRE_PAYLOAD_SEED 0x4b5652572d706c64ull /* "KVRW-pld" */
#define KVR_WIRE_HEADER_SEED  0x4b5652572d686472ull /* "KVRW-hdr" */

/* The format's checksum: XXH3-64 (xxHash's XXH3_64bits_withSeed, output stable since
 * xxHash 0.8.0) of len bytes with the given seed. Version 1 of the format used the
 * project's own kvr_hash64 instead; docs/KV_WIRE_FORMAT.md says why it changed and gives
 * known-answer vectors. */
uint64_t kvr_wire_hash(const void *data, size_t len, uint64_t seed);

/* zstd levels accepted by kvr_wire_encode (0 selects KVR_WIRE_DEFAULT_LEVEL). The
 * default is chosen by measurement: docs/perf/kvwire.md. */
#define KVR_WIRE_LEVEL_MIN     (-7)
#define KVR_WIRE_LEVEL_MAX     22
#define KVR_WIRE_DEFAULT_LEVEL 1

/* Values are on the wire: append only (and extend the _CHOICES strings, whose order
 * is the enum's, for option tables). */
enum kvr_wire_dtype {
    KVR_WIRE_F32 = 0,  /* lossless */
    KVR_WIRE_F16 = 1,  /* IEEE half, round to nearest even; lossy (bound in the doc) */
    KVR_WIRE_BF16 = 2, /* bfloat16, round to nearest even; lossy */
};
#define KVR_WIRE_DTYPE_CHOICES "f32|f16|bf16"

enum kvr_wire_transform {
    KVR_WIRE_TF_NONE = 0,
    KVR_WIRE_TF_SHUFFLE = 1, /* byte planes: all first bytes, then all second bytes, ... */
};
#define KVR_WIRE_TRANSFORM_CHOICES "none|shuffle"

_Static_assert(KVR_WIRE_F32 == 0 && KVR_WIRE_F16 == 1 && KVR_WIRE_BF16 == 2,
               "value types are part of the wire format");
_Static_assert(KVR_WIRE_TF_NONE == 0 && KVR_WIRE_TF_SHUFFLE == 1,
               "transforms are part of the wire format");

/* "f32", "f16", "bf16" / "none", "shuffle"; "?" when out of range. Static strings. */
const char *kvr_wire_dtype_name(int dtype);
const char *kvr_wire_transform_name(int transform);

/* Bytes per value of a value type (4 or 2); 0 when out of range. */
int kvr_wire_dtype_nbytes(int dtype);

struct kvr_wire_opts {
    enum kvr_wire_dtype dtype;
    enum kvr_wire_transform transform;
    int level; /* zstd level in [KVR_WIRE_LEVEL_MIN, KVR_WIRE_LEVEL_MAX]; 0 = the default */
    int store; /* 1: never compress, the payload is stored raw (for links faster than the
                * codec: docs/PERFORMANCE.md); the header says so as for any stored block */
};

/* What a message describes (the header's fields, minus lengths and checksum). */
struct kvr_wire_block {
    uint64_t fingerprint; /* kvr_model_fingerprint of the model that made it */
    uint64_t seq_id;      /* the sending node's id of the sequence (request id) */
    int layer_begin;      /* layers [layer_begin, layer_begin + n_layers) */
    int n_layers;
    int token_begin; /* text positions [token_begin, token_begin + n_tokens) */
    int n_tokens;
    int n_kv_heads;
    int head_dim;
    enum kvr_wire_dtype dtype;         /* filled by decode/peek */
    enum kvr_wire_transform transform; /* filled by decode/peek */
    int level;                         /* filled by decode/peek: zstd level used */
    int compressed;                    /* filled by decode/peek: 0 = payload stored raw */
    size_t payload_nbytes;             /* filled by decode/peek: bytes after the header */
};

struct kvr_wire_codec;

/* A per-thread codec: one zstd compression and one decompression context and a scratch
 * buffer for blocks of up to max_floats floats of K plus as many of V (max_floats =
 * n_layers * n_tokens * kv_dim of the largest block). Reused for every block: no
 * allocation on the hot path (zstd sizes its workspace on first use and keeps it).
 * KVR_EINVAL when max_floats is 0 or its message would pass 4 GiB (the header's 32-bit
 * lengths), KVR_ENOMEM. Returns owned *out; free with kvr_wire_codec_free. Not
 * thread-safe: one codec per thread. */
int kvr_wire_codec_create(size_t max_floats, struct kvr_wire_codec **out);

/* Accepts NULL. */
void kvr_wire_codec_free(struct kvr_wire_codec *c);

/* Most bytes a message of this block can take, whatever its value type (header + raw
 * float32 payload): size dst with it. 0 when the shape is invalid (a field < 1, or a
 * message over 4 GiB). Uses n_layers, n_tokens, n_kv_heads and head_dim only. */
size_t kvr_wire_max_nbytes(const struct kvr_wire_block *b);

/* Encodes K and V, each (n_layers, n_tokens, n_kv_heads * head_dim) f32 row-major, into
 * dst (cap bytes) with o's value type, transform and level. Stores the payload raw when
 * compression does not make it smaller, so a message is never more than the header plus
 * the raw payload. *len gets the message size. Reads b's fingerprint, seq_id and shape
 * (not its "filled by decode" fields). Errors: KVR_EINVAL (NULL argument, a shape field
 * < 1 or > 65535 for n_layers/n_kv_heads/head_dim, negative begins, ranges past INT_MAX,
 * bad opts), KVR_ERANGE (cap < header + raw payload of this block, or more floats than
 * the codec was made for), KVR_ECOMPRESS (zstd failed; logged with its error name).
 * f16 and bf16 round to nearest even and saturate at their largest finite value. */
int kvr_wire_encode(struct kvr_wire_codec *c, const struct kvr_wire_opts *o,
                    const struct kvr_wire_block *b, const float *k, const float *v, void *dst,
                    size_t cap, size_t *len);

/* Parses and checks the header only: KVR_ETRUNC, KVR_EMAGIC, KVR_EVERSION, header
 * KVR_ECHECKSUM, KVR_EFORMAT, KVR_ELENGTH exactly as kvr_wire_decode (the payload is
 * neither decompressed nor checksummed). Fills *b on success. Each error is logged. */
int kvr_wire_peek(const void *src, size_t len, struct kvr_wire_block *b);

/* Decodes a message into k and v (each room for cap_floats floats). Checks, in this
 * order, each with its own status and one WARN log line naming the reason:
 *   KVR_EMAGIC       len >= 4 and the first 4 bytes are not "KVRW";
 *   KVR_EVERSION     len >= 6 and bytes 4-5 hold a version this build does not read;
 *   KVR_ETRUNC       shorter than the 64-byte header;
 *   KVR_ECHECKSUM    header checksum mismatch (any header byte changed);
 *   KVR_EFORMAT      unknown flag bit, value type or transform; a zero dimension; a
 *                    layer or token range past INT_MAX;
 *   KVR_ELENGTH      declared raw size disagrees with the shape, or payload size with
 *                    the flags (stored: = raw; compressed: 1 .. raw - 1);
 *   KVR_ETRUNC       shorter than header + declared payload;
 *   KVR_ELENGTH      bytes after the payload;
 *   KVR_EFINGERPRINT expect_fingerprint != 0 and the message's differs;
 *   KVR_ERANGE       the block has more than cap_floats floats of K, or more than the
 *                    codec was made for;
 *   KVR_ECOMPRESS    the payload is not a zstd frame (zstd's error name is logged);
 *   KVR_ELENGTH      bytes after the zstd frame;
 *   KVR_EOVERFLOW    the frame declares or inflates to more than the raw size;
 *   KVR_ECOMPRESS    any other zstd error (its name is logged);
 *   KVR_ELENGTH      the frame inflates to less than the raw size;
 *   KVR_ECHECKSUM    payload checksum mismatch.
 * *b receives the header (also on the errors after the header parsed). k and v are
 * written only on success, and never past n_layers * n_tokens * kv_dim floats each. */
int kvr_wire_decode(struct kvr_wire_codec *c, const void *src, size_t len,
                    uint64_t expect_fingerprint, struct kvr_wire_block *b, float *k, float *v,
                    size_t cap_floats);

#endif /* KVR_KV_WIRE_H */
