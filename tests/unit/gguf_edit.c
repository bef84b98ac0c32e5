/* gguf_edit.c - the tests' GGUF reader/writer (gguf_edit.h). Input is trusted (the
 * bundled files): a malformed file aborts the test. */
#include "gguf_edit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Trusted input or the test's own mistake: stop the test. */
#define REQUIRE(cond)                                                                      \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #cond);     \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static uint32_t u32_at(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t u64_at(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static size_t scalar_size(uint32_t type) {
    static const size_t sz[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    REQUIRE(type <= 12);
    return sz[type];
}

/* Bytes of one value of type at p (not past end). */
static size_t value_size(const unsigned char *p, const unsigned char *end, uint32_t type) {
    if (type == 8) {
        REQUIRE(end - p >= 8);
        return 8 + (size_t)u64_at(p);
    }
    if (type == 9) {
        uint32_t et = u32_at(p);
        uint64_t n = u64_at(p + 4);
        size_t off = 12;
        for (uint64_t i = 0; i < n; i++) {
            off += value_size(p + off, end, et);
            REQUIRE(p + off <= end);
        }
        return off;
    }
    return scalar_size(type);
}

/* Bytes per tensor of the types the bundled files use. */
static size_t tensor_nbytes(const struct gg_tensor *t) {
    uint64_t n = 1;
    for (uint32_t d = 0; d < t->n_dims; d++)
        n *= t->ne[d];
    switch (t->type) {
    case 0: return (size_t)n * 4;
    case 1:
    case 30: return (size_t)n * 2;
    case 8: return (size_t)(n / 32 * 34);
    default: REQUIRE(!"type not in the bundled files");
    }
    return 0;
}

void gg_read(const char *path, struct gg *g) {
    memset(g, 0, sizeof *g);
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len);
    REQUIRE(b && fread(b, 1, (size_t)len, f) == (size_t)len);
    fclose(f);
    const unsigned char *end = b + len, *p = b;
    REQUIRE(len > 24 && memcmp(b, "GGUF", 4) == 0);
    g->version = u32_at(b + 4);
    uint64_t nt = u64_at(b + 8), nkv = u64_at(b + 16);
    REQUIRE(nt <= GG_MAX_T && nkv <= GG_MAX_KV);
    g->n_t = (int)nt;
    g->n_kv = (int)nkv;
    g->alignment = 32;
    p = b + 24;
    for (int i = 0; i < g->n_kv; i++) {
        uint64_t kl = u64_at(p);
        REQUIRE((g->kv[i].key = calloc(kl + 1, 1)) != NULL);
        memcpy(g->kv[i].key, p + 8, kl);
        p += 8 + kl;
        g->kv[i].type = u32_at(p);
        p += 4;
        g->kv[i].raw_len = value_size(p, end, g->kv[i].type);
        REQUIRE((g->kv[i].raw = malloc(g->kv[i].raw_len)) != NULL);
        memcpy(g->kv[i].raw, p, g->kv[i].raw_len);
        p += g->kv[i].raw_len;
        if (!strcmp(g->kv[i].key, "general.alignment"))
            g->alignment = u32_at(g->kv[i].raw);
    }
    for (int i = 0; i < g->n_t; i++) {
        struct gg_tensor *t = &g->t[i];
        uint64_t nl = u64_at(p);
        REQUIRE(nl < sizeof t->name);
        memcpy(t->name, p + 8, nl);
        p += 8 + nl;
        t->n_dims = u32_at(p);
        REQUIRE(t->n_dims <= GG_MAX_DIMS);
        p += 4;
        for (int d = 0; d < GG_MAX_DIMS; d++)
            t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++, p += 8)
            t->ne[d] = u64_at(p);
        t->type = u32_at(p);
        t->offset = u64_at(p + 4);
        p += 12;
    }
    size_t data = ((size_t)(p - b) + g->alignment - 1) / g->alignment * g->alignment;
    for (int i = 0; i < g->n_t; i++) {
        struct gg_tensor *t = &g->t[i];
        t->nbytes = tensor_nbytes(t);
        REQUIRE(data + t->offset + t->nbytes <= (size_t)len);
        REQUIRE((t->data = malloc(t->nbytes)) != NULL);
        memcpy(t->data, b + data + t->offset, t->nbytes);
    }
    free(b);
}

void gg_free(struct gg *g) {
    for (int i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].raw);
    }
    for (int i = 0; i < g->n_t; i++)
        free(g->t[i].data);
    memset(g, 0, sizeof *g);
}

void gg_copy(struct gg *dst, const struct gg *src) {
    *dst = *src;
    for (int i = 0; i < src->n_kv; i++) {
        REQUIRE((dst->kv[i].key = strdup(src->kv[i].key)) != NULL);
        REQUIRE((dst->kv[i].raw = malloc(src->kv[i].raw_len ? src->kv[i].raw_len : 1)) != NULL);
        memcpy(dst->kv[i].raw, src->kv[i].raw, src->kv[i].raw_len);
    }
    for (int i = 0; i < src->n_t; i++) {
        REQUIRE((dst->t[i].data = malloc(src->t[i].nbytes ? src->t[i].nbytes : 1)) != NULL);
        memcpy(dst->t[i].data, src->t[i].data, src->t[i].nbytes);
    }
}

struct wb {
    unsigned char *p;
    size_t len, cap;
};

static void put(struct wb *w, const void *src, size_t n) {
    if (w->len + n > w->cap) {
        w->cap = (w->len + n) * 2 + 4096;
        REQUIRE((w->p = realloc(w->p, w->cap)) != NULL);
    }
    memcpy(w->p + w->len, src, n);
    w->len += n;
}

static void put32(struct wb *w, uint32_t v) { put(w, &v, 4); }
static void put64(struct wb *w, uint64_t v) { put(w, &v, 8); }

static void pad_to(struct wb *w, size_t a) {
    static const unsigned char zero[64];
    while (w->len % a)
        put(w, zero, a - w->len % a < 64 ? a - w->len % a : 64);
}

unsigned char *gg_write(const struct gg *g, int keep_offsets, struct gg_layout *lay) {
    struct wb w = {0};
    struct gg_layout dummy;
    if (!lay)
        lay = &dummy;
    memset(lay, 0, sizeof *lay);
    size_t a = g->alignment ? g->alignment : 32;
    put(&w, "GGUF", 4);
    put32(&w, g->version);
    put64(&w, (uint64_t)g->n_t);
    put64(&w, (uint64_t)g->n_kv);
    lay->header_end = w.len;
    for (int i = 0; i < g->n_kv; i++) {
        put64(&w, strlen(g->kv[i].key));
        put(&w, g->kv[i].key, strlen(g->kv[i].key));
        put32(&w, g->kv[i].type);
        put(&w, g->kv[i].raw, g->kv[i].raw_len);
        lay->kv_end[i] = w.len;
    }
    uint64_t off = 0, offs[GG_MAX_T];
    for (int i = 0; i < g->n_t; i++) {
        offs[i] = keep_offsets ? g->t[i].offset : off;
        off = (offs[i] + g->t[i].nbytes + a - 1) / a * a;
    }
    for (int i = 0; i < g->n_t; i++) {
        const struct gg_tensor *t = &g->t[i];
        put64(&w, strlen(t->name));
        put(&w, t->name, strlen(t->name));
        put32(&w, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++)
            put64(&w, t->ne[d]);
        put32(&w, t->type);
        lay->info_off_field[i] = w.len;
        put64(&w, offs[i]);
        lay->info_end[i] = w.len;
    }
    pad_to(&w, a);
    lay->data_off = w.len;
    for (int i = 0; i < g->n_t; i++) {
        size_t at = lay->data_off + (size_t)offs[i];
        if (w.len < at) {
            size_t gap = at - w.len;
            unsigned char *z = calloc(gap, 1);
            REQUIRE(z);
            put(&w, z, gap);
            free(z);
        }
        if (w.len == at) {
            put(&w, g->t[i].data, g->t[i].nbytes);
        } else {
            /* keep_offsets put this tensor over an earlier one: overwrite in place. */
            REQUIRE(at + g->t[i].nbytes <= w.len);
            memcpy(w.p + at, g->t[i].data, g->t[i].nbytes);
        }
        lay->tensor_start[i] = at;
        lay->tensor_end[i] = at + g->t[i].nbytes;
    }
    pad_to(&w, a); /* llama.cpp pads the last tensor too */
    lay->len = w.len;
    /* An 8-byte aligned copy (realloc keeps malloc's alignment, which is at least 16). */
    return w.p ? w.p : malloc(1);
}

int gg_find_kv(const struct gg *g, const char *key) {
    for (int i = 0; i < g->n_kv; i++)
        if (!strcmp(g->kv[i].key, key))
            return i;
    return -1;
}

void gg_del_kv(struct gg *g, const char *key) {
    int i = gg_find_kv(g, key);
    REQUIRE(i >= 0);
    free(g->kv[i].key);
    free(g->kv[i].raw);
    memmove(&g->kv[i], &g->kv[i + 1], (size_t)(g->n_kv - i - 1) * sizeof g->kv[0]);
    g->n_kv--;
}

void gg_set_raw(struct gg *g, const char *key, uint32_t type, const void *raw, size_t len) {
    int i = gg_find_kv(g, key);
    if (i < 0) {
        REQUIRE(g->n_kv < GG_MAX_KV);
        i = g->n_kv++;
        REQUIRE((g->kv[i].key = strdup(key)) != NULL);
    } else {
        free(g->kv[i].raw);
    }
    g->kv[i].type = type;
    REQUIRE((g->kv[i].raw = malloc(len ? len : 1)) != NULL);
    memcpy(g->kv[i].raw, raw, len);
    g->kv[i].raw_len = len;
}

void gg_set_u32(struct gg *g, const char *key, uint32_t v) { gg_set_raw(g, key, 4, &v, 4); }

void gg_set_f32(struct gg *g, const char *key, float v) { gg_set_raw(g, key, 6, &v, 4); }

void gg_set_bool(struct gg *g, const char *key, int v) {
    unsigned char b = (unsigned char)v;
    gg_set_raw(g, key, 7, &b, 1);
}

void gg_set_str(struct gg *g, const char *key, const char *s) {
    size_t n = strlen(s);
    unsigned char *raw = malloc(8 + n);
    REQUIRE(raw);
    uint64_t n64 = n;
    memcpy(raw, &n64, 8);
    memcpy(raw + 8, s, n);
    gg_set_raw(g, key, 8, raw, 8 + n);
    free(raw);
}

int gg_find_t(const struct gg *g, const char *name) {
    for (int i = 0; i < g->n_t; i++)
        if (!strcmp(g->t[i].name, name))
            return i;
    return -1;
}

void gg_del_t(struct gg *g, const char *name) {
    int i = gg_find_t(g, name);
    REQUIRE(i >= 0);
    free(g->t[i].data);
    memmove(&g->t[i], &g->t[i + 1], (size_t)(g->n_t - i - 1) * sizeof g->t[0]);
    g->n_t--;
}

void gg_save(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    REQUIRE(f);
    REQUIRE(fwrite(buf, 1, len, f) == len);
    REQUIRE(fclose(f) == 0);
}
