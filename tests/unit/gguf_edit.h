/* gguf_edit.h - the tests' own GGUF reader and writer, written apart from common/gguf.c:
 * reads a trusted file (the bundled GGUF models) into editable lists of key/value pairs
 * and tensors, and writes them back, laid out as llama.cpp lays files out, or with the
 * offsets the test sets. Hostile files for the loader's tests and the fuzzer's seeds are
 * made from real files this way. */
#ifndef KVR_TEST_GGUF_EDIT_H
#define KVR_TEST_GGUF_EDIT_H

#include <stddef.h>
#include <stdint.h>

#define GG_MAX_KV 64
#define GG_MAX_T 128

struct gg_kv {
    char *key;
    uint32_t type;       /* value type (the file's numbers: 4 u32, 8 string, 9 array, ...) */
    unsigned char *raw;  /* the value's bytes as in the file, after the type */
    size_t raw_len;
};

#define GG_MAX_DIMS 8

struct gg_tensor {
    char name[96];
    uint32_t n_dims;     /* may exceed 4 (hostile edits); at most GG_MAX_DIMS */
    uint64_t ne[GG_MAX_DIMS];
    uint32_t type;
    uint64_t offset;     /* relative to the data section; used when writing with keep_offsets */
    unsigned char *data; /* owned */
    size_t nbytes;
};

struct gg {
    uint32_t version;
    uint32_t alignment;  /* for writing: padding and offsets (general.alignment is a kv) */
    int n_kv, n_t;
    struct gg_kv kv[GG_MAX_KV];
    struct gg_tensor t[GG_MAX_T];
};

/* Where things landed in the last gg_write: byte offsets in the written buffer. */
struct gg_layout {
    size_t header_end;          /* after magic, version and both counts */
    size_t kv_end[GG_MAX_KV];   /* after key/value pair i */
    size_t info_end[GG_MAX_T];  /* after tensor info i */
    size_t info_off_field[GG_MAX_T]; /* the offset field of tensor info i */
    size_t data_off;            /* start of the data section */
    size_t tensor_start[GG_MAX_T], tensor_end[GG_MAX_T];
    size_t len;
};

/* Reads path (trusted). Aborts the test on any problem. */
void gg_read(const char *path, struct gg *g);
void gg_free(struct gg *g);

/* A deep copy. */
void gg_copy(struct gg *dst, const struct gg *src);

/* Serializes g into a malloc'd buffer (8-byte aligned; free()); offsets recomputed in
 * order with padding to g->alignment unless keep_offsets. */
unsigned char *gg_write(const struct gg *g, int keep_offsets, struct gg_layout *lay);

/* Key/value helpers (set replaces or appends). */
int gg_find_kv(const struct gg *g, const char *key);
void gg_del_kv(struct gg *g, const char *key);
void gg_set_raw(struct gg *g, const char *key, uint32_t type, const void *raw, size_t len);
void gg_set_u32(struct gg *g, const char *key, uint32_t v);
void gg_set_f32(struct gg *g, const char *key, float v);
void gg_set_str(struct gg *g, const char *key, const char *s);
void gg_set_bool(struct gg *g, const char *key, int v);

int gg_find_t(const struct gg *g, const char *name);
void gg_del_t(struct gg *g, const char *name);

/* Writes buf to path (creating it). */
void gg_save(const char *path, const void *buf, size_t len);

#endif /* KVR_TEST_GGUF_EDIT_H */
