/* gguf.h - a bounds-checked reader of GGUF containers (versions 2 and 3, little-endian):
 * header, metadata key/value pairs, tensor infos and data section, every count, length,
 * offset and dimension checked against the buffer before use (docs/GGUF.md). It borrows
 * the file image and never copies tensor data. model.c maps `llama` files onto the
 * engine's weights through it; kvr_gguf_tokenizer builds the vocabulary. A GGUF file is
 * untrusted input: every error is one logged line naming the file, what is wrong and where
 * (key or tensor, byte offset), and a status; nothing is read outside the buffer. */
#ifndef KVR_GGUF_H
#define KVR_GGUF_H

#include <stddef.h>
#include <stdint.h>

#define KVR_GGUF_MAGIC "GGUF"
#define KVR_GGUF_DEFAULT_ALIGNMENT 32
#define KVR_GGUF_NAME_MAX 64 /* tensor names are shorter than this (ggml's GGML_MAX_NAME) */
#define KVR_GGUF_KEY_MAX 65535
#define KVR_GGUF_DIMS_MAX 4

/* Metadata value types (the file's numbers). */
enum kvr_gguf_type {
    KVR_GGUF_U8 = 0,
    KVR_GGUF_I8 = 1,
    KVR_GGUF_U16 = 2,
    KVR_GGUF_I16 = 3,
    KVR_GGUF_U32 = 4,
    KVR_GGUF_I32 = 5,
    KVR_GGUF_F32 = 6,
    KVR_GGUF_BOOL = 7,
    KVR_GGUF_STRING = 8,
    KVR_GGUF_ARRAY = 9,
    KVR_GGUF_U64 = 10,
    KVR_GGUF_I64 = 11,
    KVR_GGUF_F64 = 12,
};

struct kvr_gguf_tensor {
    char name[KVR_GGUF_NAME_MAX]; /* NUL-terminated */
    int n_dims;                   /* 1 .. 4 */
    uint64_t ne[KVR_GGUF_DIMS_MAX]; /* ggml order: ne[0] is the row length; unused dims 1 */
    uint32_t type;                /* enum kvr_dtype (only supported types get this far) */
    uint64_t offset;              /* from the start of the buffer: inside it, aligned */
    uint64_t nbytes;
};

struct kvr_gguf;
struct kvr_tokenizer;

/* Parses and validates the container in buf (len bytes, borrowed until kvr_gguf_free).
 * Checks: magic; version 2 or 3 (a byte-swapped version is a big-endian file: refused);
 * counts that the file could hold; key and string lengths inside the file; known value
 * types, no nested arrays, booleans 0 or 1; no duplicate keys or tensor names;
 * general.alignment a u32 power of two (default 32); tensor names shorter than 64 bytes,
 * 1..4 dimensions each >= 1 with no overflow, a supported type (F32, F16, BF16, Q8_0:
 * others are KVR_ENOTSUP naming the tensor and type), rows a multiple of the block;
 * offsets multiples of the alignment and of the type's element size, data inside the
 * file, no two tensors overlapping. Errors: KVR_EMAGIC, KVR_EVERSION, KVR_ETRUNC (a
 * read or tensor past the end), KVR_ENOTSUP, KVR_EFORMAT, KVR_ENOMEM. name is for error
 * lines (the path). Returns owned *out, free with kvr_gguf_free. */
int kvr_gguf_parse(const void *buf, size_t len, const char *name, struct kvr_gguf **out);

/* Accepts NULL. */
void kvr_gguf_free(struct kvr_gguf *g);

uint32_t kvr_gguf_version(const struct kvr_gguf *g);
const char *kvr_gguf_name(const struct kvr_gguf *g);
const void *kvr_gguf_base(const struct kvr_gguf *g);
size_t kvr_gguf_size(const struct kvr_gguf *g);

/* Offset of the data section (the first byte after the tensor infos, aligned). */
uint64_t kvr_gguf_data_offset(const struct kvr_gguf *g);

int kvr_gguf_n_tensors(const struct kvr_gguf *g);
const struct kvr_gguf_tensor *kvr_gguf_tensor(const struct kvr_gguf *g, int i);

/* The tensor named name, or NULL. */
const struct kvr_gguf_tensor *kvr_gguf_find_tensor(const struct kvr_gguf *g, const char *name);

/* 1 when the key is present. */
int kvr_gguf_has(const struct kvr_gguf *g, const char *key);

/* Typed getters. KVR_ENOENT when the key is absent (not logged: callers decide whether
 * that is an error); KVR_EFORMAT, logged with the key, when its type is wrong or (ints)
 * the value is outside [lo, hi]. Any integer type is read as an integer, F32 or F64 as a
 * float. Strings are borrowed from the buffer, not NUL-terminated. */
int kvr_gguf_get_int(const struct kvr_gguf *g, const char *key, int64_t lo, int64_t hi,
                     int64_t *out);
int kvr_gguf_get_float(const struct kvr_gguf *g, const char *key, double *out);
int kvr_gguf_get_bool(const struct kvr_gguf *g, const char *key, int *out);
int kvr_gguf_get_str(const struct kvr_gguf *g, const char *key, const char **s, size_t *len);

/* An array's element type and count (any element type). */
int kvr_gguf_get_array(const struct kvr_gguf *g, const char *key, uint32_t *elem_type,
                       uint64_t *n);

/* The tokenizer of tokenizer.ggml.*: model "llama" (SentencePiece): tokens (required),
 * scores and token_type (optional, as many as tokens), bos/eos/unknown ids (default 1, 2,
 * 0; 0xFFFFFFFF means none), add_bos_token and add_space_prefix (default true). Errors:
 * KVR_ENOENT the file has no tokenizer (logged at INFO), KVR_ENOTSUP another tokenizer
 * model, KVR_EFORMAT / KVR_ESHAPE malformed arrays, as kvr_tokenizer_create. Returns owned
 * *out, free with kvr_tokenizer_free. */
int kvr_gguf_tokenizer(const struct kvr_gguf *g, struct kvr_tokenizer **out);

#endif /* KVR_GGUF_H */
