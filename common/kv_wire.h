/* kv_wire.h - the KV block wire format: one message carries K and V of a range of
 * layers (usually one) of a range of tokens (usually one cache block), compressed with
 * zstd after an optional value-type conversion and byte transform, checksummed and
 * stamped with the model's fingerprint. Byte-by-byte layout: docs/KV_WIRE_FORMAT.md.
 * Decoding trusts nothing: every length, enum and range is checked before use. */
#ifndef KVR_KV_WIRE_H
#define KVR_KV_WIRE_H

#include <stddef.h>
#include <stdint.h>

/* Values are on the wire: append only. */
enum kvr_wire_dtype {
    KVR_WIRE_F32 = 0,  /* lossless */
    KVR_WIRE_F16 = 1,  /* IEEE half, round to nearest even; lossy (bound in the doc) */
    KVR_WIRE_BF16 = 2, /* bfloat16, round to nearest even; lossy */
};

enum kvr_wire_transform {
    KVR_WIRE_TF_NONE = 0,
    KVR_WIRE_TF_SHUFFLE = 1, /* byte planes: all first bytes, then all second bytes, ... */
};

struct kvr_wire_opts {
    enum kvr_wire_dtype dtype;
    enum kvr_wire_transform transform;
    int level; /* zstd level; 0 = the measured default (docs/PERFORMANCE.md) */
};

/* What a message describes (the header's fields, minus lengths and checksum). */
struct kvr_wire_block {
    uint64_t fingerprint; /* kvr_model_fingerprint of the model that made it */
    uint64_t seq_id;      /* the sending node's id of the sequence (request id) */
    int layer_begin;      /* layers [layer_begin, layer_begin + n_layers) */
    int n_layers;
    int token_begin;      /* text positions [token_begin, token_begin + n_tokens) */
    int n_tokens;
    int n_kv_heads;
    int head_dim;
    enum kvr_wire_dtype dtype;         /* filled by decode/peek */
    enum kvr_wire_transform transform; /* filled by decode/peek */
};

struct kvr_wire_codec;

/* A per-thread codec: zstd contexts and scratch for blocks of up to max_floats floats
 * of K plus as many of V (max_floats = n_layers * n_tokens * kv_dim of the largest
 * block). Reused for every block: no allocation on the hot path. KVR_ENOMEM. */
int kvr_wire_codec_create(size_t max_floats, struct kvr_wire_codec **out);
void kvr_wire_codec_free(struct kvr_wire_codec *c);

/* Most bytes a message of this block can take (header + raw payload): size dst with it. */
size_t kvr_wire_max_nbytes(const struct kvr_wire_block *b);

/* Encodes K and V, each (n_layers, n_tokens, n_kv_heads * head_dim) f32, into dst
 * (cap bytes). Stores the payload raw when compression does not pay. *len gets the
 * message size. KVR_EINVAL (bad block shape or opts), KVR_ERANGE (cap too small, or
 * more floats than the codec was made for), KVR_ECOMPRESS (zstd failed; logged). */
int kvr_wire_encode(struct kvr_wire_codec *c, const struct kvr_wire_opts *o,
                    const struct kvr_wire_block *b, const float *k, const float *v, void *dst,
                    size_t cap, size_t *len);

/* Parses and checks the header only (magic, version, enums, lengths against len). */
int kvr_wire_peek(const void *src, size_t len, struct kvr_wire_block *b);

/* Decodes a message into k and v (each room for cap_floats floats). Checks, each with
 * its own status and a log line: KVR_ETRUNC (shorter than its header or declared
 * lengths), KVR_EMAGIC, KVR_EVERSION, KVR_EFORMAT (bad enum or shape), KVR_ELENGTH
 * (lengths disagree with the shape or the buffer), KVR_EFINGERPRINT (expect_fingerprint
 * != 0 and differs), KVR_EOVERFLOW (decompresses to more than declared), KVR_ECOMPRESS
 * (zstd error), KVR_ECHECKSUM (payload checksum), KVR_ERANGE (cap_floats too small).
 * *b receives the header. Nothing is written past cap_floats. */
int kvr_wire_decode(struct kvr_wire_codec *c, const void *src, size_t len,
                    uint64_t expect_fingerprint, struct kvr_wire_block *b, float *k, float *v,
                    size_t cap_floats);

#endif /* KVR_KV_WIRE_H */
