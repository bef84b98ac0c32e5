/* gguf.c - the GGUF container reader (gguf.h) and the tokenizer of tokenizer.ggml.*.
 * Called by model.c (GGUF models) and tokenizer.c (a GGUF file given as --tokenizer).
 * Owns the index it builds (keys, values, tensor infos: offsets into the borrowed buffer);
 * the buffer is the caller's. Every read goes through need(): a length is compared with
 * what is left of the buffer before any pointer is formed, in 64-bit arithmetic that
 * cannot overflow (remaining bytes, never end offsets). */
#include "gguf.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "quant.h"
#include "status.h"
#include "tokenizer.h"

struct kv {
    uint64_t key_off;   /* key bytes at base + key_off */
    uint32_t key_len;
    uint32_t type;      /* enum kvr_gguf_type */
    uint64_t val_off;   /* scalar or string (its u64 length first); array: first element */
    uint32_t elem_type; /* arrays */
    uint64_t n;         /* arrays: element count */
};

struct kvr_gguf {
    const unsigned char *base;
    size_t size;
    char *name;
    uint32_t version;
    uint64_t n_kv;
    struct kv *kv;
    uint64_t n_tensors;
    struct kvr_gguf_tensor *t;
    uint32_t alignment;
    uint64_t data_off;
};

/* The parse cursor and the text of where it is, for error lines. */
struct cur {
    const struct kvr_gguf *g;
    uint64_t pos;
    char where[160];
};

static void set_where(struct cur *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_where(struct cur *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->where, sizeof c->where, fmt, ap);
    va_end(ap);
}

/* n more bytes at the cursor, or a logged KVR_ETRUNC. */
static int need(struct cur *c, uint64_t n, const char *what) {
    uint64_t left = (uint64_t)c->g->size - c->pos;
    if (n > left) {
        KVR_LOG_ERROR("model '%s' is truncated: %s of %s needs %" PRIu64 " bytes at offset %" PRIu64
                      ", the file ends at %zu",
                      c->g->name, what, c->where, n, c->pos, c->g->size);
        return KVR_ETRUNC;
    }
    return KVR_OK;
}

/* Little-endian loads; the caller has checked the bytes exist (host is little-endian:
 * docs/GGUF.md). */
static uint32_t ld32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t ld64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static int rd_u32(struct cur *c, const char *what, uint32_t *v) {
    int rc = need(c, 4, what);
    if (rc == KVR_OK) {
        *v = ld32(c->g->base + c->pos);
        c->pos += 4;
    }
    return rc;
}

static int rd_u64(struct cur *c, const char *what, uint64_t *v) {
    int rc = need(c, 8, what);
    if (rc == KVR_OK) {
        *v = ld64(c->g->base + c->pos);
        c->pos += 8;
    }
    return rc;
}

/* A string: u64 length, then that many bytes (checked against the file). */
static int rd_str(struct cur *c, const char *what, uint64_t *off, uint64_t *len) {
    int rc = rd_u64(c, what, len);
    if (rc != KVR_OK)
        return rc;
    if ((rc = need(c, *len, what)) != KVR_OK)
        return rc;
    *off = c->pos;
    c->pos += *len;
    return KVR_OK;
}

static size_t scalar_nbytes(uint32_t type) {
    switch (type) {
    case KVR_GGUF_U8:
    case KVR_GGUF_I8:
    case KVR_GGUF_BOOL: return 1;
    case KVR_GGUF_U16:
    case KVR_GGUF_I16: return 2;
    case KVR_GGUF_U32:
    case KVR_GGUF_I32:
    case KVR_GGUF_F32: return 4;
    case KVR_GGUF_U64:
    case KVR_GGUF_I64:
    case KVR_GGUF_F64: return 8;
    default: return 0; /* string, array, unknown */
    }
}

static const char *type_name(uint32_t type) {
    static const char *const names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                        "bool", "string", "array", "u64", "i64", "f64"};
    return type < sizeof names / sizeof names[0] ? names[type] : "unknown";
}

/* One value of type at the cursor (not an array). */
static int rd_value(struct cur *c, uint32_t type) {
    if (type == KVR_GGUF_STRING) {
        uint64_t off, len;
        return rd_str(c, "a string value", &off, &len);
    }
    size_t n = scalar_nbytes(type);
    int rc = need(c, n, "a value");
    if (rc != KVR_OK)
        return rc;
    if (type == KVR_GGUF_BOOL && c->g->base[c->pos] > 1) {
        KVR_LOG_ERROR("model '%s': %s is a bool of value %u at offset %" PRIu64 " (must be 0 or 1)",
                      c->g->name, c->where, c->g->base[c->pos], c->pos);
        return KVR_EFORMAT;
    }
    c->pos += n;
    return KVR_OK;
}

static int parse_kv(struct cur *c, uint64_t i, struct kv *kv) {
    uint64_t key_off, key_len;
    set_where(c, "metadata key %" PRIu64, i);
    int rc = rd_str(c, "the name", &key_off, &key_len);
    if (rc != KVR_OK)
        return rc;
    if (key_len == 0 || key_len > KVR_GGUF_KEY_MAX) {
        KVR_LOG_ERROR("model '%s': metadata key %" PRIu64 " at offset %" PRIu64 " has a name of %" PRIu64
                      " bytes (must be 1..%d)",
                      c->g->name, i, key_off - 8, key_len, KVR_GGUF_KEY_MAX);
        return KVR_EFORMAT;
    }
    kv->key_off = key_off;
    kv->key_len = (uint32_t)key_len;
    set_where(c, "metadata key %" PRIu64 " ('%.*s')", i, (int)(key_len < 80 ? key_len : 80),
              (const char *)c->g->base + key_off);
    if ((rc = rd_u32(c, "the value type", &kv->type)) != KVR_OK)
        return rc;
    if (kv->type > KVR_GGUF_F64) {
        KVR_LOG_ERROR("model '%s': %s has value type %u at offset %" PRIu64 ", not a GGUF type (0..12)",
                      c->g->name, c->where, kv->type, c->pos - 4);
        return KVR_EFORMAT;
    }
    if (kv->type != KVR_GGUF_ARRAY) {
        kv->val_off = c->pos;
        return rd_value(c, kv->type);
    }
    if ((rc = rd_u32(c, "the array's element type", &kv->elem_type)) != KVR_OK ||
        (rc = rd_u64(c, "the array's length", &kv->n)) != KVR_OK)
        return rc;
    if (kv->elem_type > KVR_GGUF_F64 || kv->elem_type == KVR_GGUF_ARRAY) {
        KVR_LOG_ERROR("model '%s': %s is an array of %s (type %u): not supported", c->g->name, c->where,
                      type_name(kv->elem_type), kv->elem_type);
        return kv->elem_type == KVR_GGUF_ARRAY ? KVR_ENOTSUP : KVR_EFORMAT;
    }
    kv->val_off = c->pos;
    uint64_t left = (uint64_t)c->g->size - c->pos;
    if (kv->elem_type == KVR_GGUF_STRING) {
        /* Each element is at least its 8-byte length: bound the count before walking. */
        if (kv->n > left / 8) {
            KVR_LOG_ERROR("model '%s' is truncated or corrupt: %s says %" PRIu64
                          " strings, %" PRIu64 " bytes are left at offset %" PRIu64,
                          c->g->name, c->where, kv->n, left, c->pos);
            return KVR_ETRUNC;
        }
        for (uint64_t e = 0; e < kv->n; e++) {
            uint64_t rest = (uint64_t)c->g->size - c->pos;
            if (rest < 8 || ld64(c->g->base + c->pos) > rest - 8) {
                uint64_t off, len; /* the error path: name the element, let rd_str log */
                set_where(c, "element %" PRIu64 " of metadata key %" PRIu64 " ('%.*s')", e, i,
                          (int)(key_len < 80 ? key_len : 80), (const char *)c->g->base + key_off);
                return rd_str(c, "a string", &off, &len);
            }
            c->pos += 8 + ld64(c->g->base + c->pos);
        }
        return KVR_OK;
    }
    size_t es = scalar_nbytes(kv->elem_type);
    if (kv->n > left / es) {
        KVR_LOG_ERROR("model '%s' is truncated or corrupt: %s says %" PRIu64 " elements of %zu bytes, %" PRIu64
                      " bytes are left at offset %" PRIu64,
                      c->g->name, c->where, kv->n, es, left, c->pos);
        return KVR_ETRUNC;
    }
    if (kv->elem_type == KVR_GGUF_BOOL) {
        for (uint64_t e = 0; e < kv->n; e++) {
            if (c->g->base[c->pos + e] > 1) {
                KVR_LOG_ERROR("model '%s': %s holds a bool of value %u at offset %" PRIu64, c->g->name,
                              c->where, c->g->base[c->pos + e], c->pos + e);
                return KVR_EFORMAT;
            }
        }
    }
    c->pos += kv->n * es;
    return KVR_OK;
}

static int parse_tensor_info(struct cur *c, uint64_t i, struct kvr_gguf_tensor *t) {
    uint64_t name_off, name_len;
    set_where(c, "tensor info %" PRIu64, i);
    int rc = rd_str(c, "the name", &name_off, &name_len);
    if (rc != KVR_OK)
        return rc;
    if (name_len == 0 || name_len >= KVR_GGUF_NAME_MAX ||
        memchr(c->g->base + name_off, '\0', (size_t)name_len)) {
        KVR_LOG_ERROR("model '%s': tensor info %" PRIu64 " at offset %" PRIu64 " has a name of %" PRIu64
                      " bytes (must be 1..%d, without NUL)",
                      c->g->name, i, name_off - 8, name_len, KVR_GGUF_NAME_MAX - 1);
        return KVR_EFORMAT;
    }
    memcpy(t->name, c->g->base + name_off, (size_t)name_len);
    t->name[name_len] = '\0';
    set_where(c, "tensor '%s' (info %" PRIu64 ")", t->name, i);
    uint32_t n_dims;
    if ((rc = rd_u32(c, "the number of dimensions", &n_dims)) != KVR_OK)
        return rc;
    if (n_dims < 1 || n_dims > KVR_GGUF_DIMS_MAX) {
        KVR_LOG_ERROR("model '%s': %s has %u dimensions (must be 1..%d)", c->g->name, c->where, n_dims,
                      KVR_GGUF_DIMS_MAX);
        return KVR_EFORMAT;
    }
    t->n_dims = (int)n_dims;
    uint64_t nel = 1;
    for (int d = 0; d < KVR_GGUF_DIMS_MAX; d++) {
        t->ne[d] = 1;
        if (d >= t->n_dims)
            continue;
        if ((rc = rd_u64(c, "a dimension", &t->ne[d])) != KVR_OK)
            return rc;
        /* 2^60 elements bound every byte count below without overflow (4 bytes each at
         * most); the data-section check then holds them to the file. */
        if (t->ne[d] < 1 || t->ne[d] > ((uint64_t)1 << 60) / nel) {
            KVR_LOG_ERROR("model '%s': %s has dimension %d of %" PRIu64 " (%s)", c->g->name, c->where, d,
                          t->ne[d], t->ne[d] < 1 ? "must be at least 1" : "too many elements");
            return KVR_EFORMAT;
        }
        nel *= t->ne[d];
    }
    if ((rc = rd_u32(c, "the type", &t->type)) != KVR_OK)
        return rc;
    if (!kvr_dtype_supported(t->type)) {
        KVR_LOG_ERROR("model '%s': tensor '%s' has type %s (%u): kvrelay runs F32, F16, BF16 and Q8_0",
                      c->g->name, t->name, kvr_dtype_name(t->type), t->type);
        return KVR_ENOTSUP;
    }
    enum kvr_dtype ty = (enum kvr_dtype)t->type;
    if (t->ne[0] % (uint64_t)kvr_dtype_block(ty)) {
        KVR_LOG_ERROR("model '%s': tensor '%s' of type %s has rows of %" PRIu64
                      " values, not a multiple of its block of %d",
                      c->g->name, t->name, kvr_dtype_name(t->type), t->ne[0], kvr_dtype_block(ty));
        return KVR_EFORMAT;
    }
    t->nbytes = nel / (uint64_t)kvr_dtype_block(ty) * kvr_dtype_block_nbytes(ty);
    return rd_u64(c, "the data offset", &t->offset);
}

static int cmp_u64_off(const void *a, const void *b) {
    const struct kvr_gguf_tensor *x = *(const struct kvr_gguf_tensor *const *)a;
    const struct kvr_gguf_tensor *y = *(const struct kvr_gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int cmp_name(const void *a, const void *b) {
    const struct kvr_gguf_tensor *x = *(const struct kvr_gguf_tensor *const *)a;
    const struct kvr_gguf_tensor *y = *(const struct kvr_gguf_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static _Thread_local const unsigned char *tl_base; /* qsort has no user pointer */

static int cmp_key(const void *a, const void *b) {
    const struct kv *x = *(const struct kv *const *)a, *y = *(const struct kv *const *)b;
    uint32_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(tl_base + x->key_off, tl_base + y->key_off, n);
    if (c)
        return c;
    return x->key_len < y->key_len ? -1 : x->key_len > y->key_len;
}

/* Duplicate keys and tensor names (sorted: O(n log n) for hostile counts), overlapping
 * tensors. */
static int check_unique(struct kvr_gguf *g) {
    int rc = KVR_ENOMEM;
    size_t nk = (size_t)g->n_kv, nt = (size_t)g->n_tensors;
    const struct kv **ks = malloc((nk ? nk : 1) * sizeof *ks);
    const struct kvr_gguf_tensor **ts = malloc((nt ? nt : 1) * sizeof *ts);
    if (!ks || !ts)
        goto out;
    for (size_t i = 0; i < nk; i++)
        ks[i] = &g->kv[i];
    tl_base = g->base;
    qsort(ks, nk, sizeof *ks, cmp_key);
    rc = KVR_EFORMAT;
    for (size_t i = 1; i < nk; i++) {
        if (cmp_key(&ks[i - 1], &ks[i]) == 0) {
            KVR_LOG_ERROR("model '%s': metadata key '%.*s' appears twice (keys %td and %td)", g->name,
                          (int)(ks[i]->key_len < 80 ? ks[i]->key_len : 80),
                          (const char *)g->base + ks[i]->key_off, ks[i - 1] - g->kv, ks[i] - g->kv);
            goto out;
        }
    }
    for (size_t i = 0; i < nt; i++)
        ts[i] = &g->t[i];
    qsort(ts, nt, sizeof *ts, cmp_name);
    for (size_t i = 1; i < nt; i++) {
        if (strcmp(ts[i - 1]->name, ts[i]->name) == 0) {
            KVR_LOG_ERROR("model '%s': tensor '%s' appears twice", g->name, ts[i]->name);
            goto out;
        }
    }
    qsort(ts, nt, sizeof *ts, cmp_u64_off);
    for (size_t i = 1; i < nt; i++) {
        /* Sorted by start and each inside the file: the previous one's end fits in 64 bits. */
        if (ts[i - 1]->offset + ts[i - 1]->nbytes > ts[i]->offset) {
            KVR_LOG_ERROR("model '%s': tensors '%s' (bytes %" PRIu64 "..%" PRIu64 ") and '%s' (from byte %" PRIu64
                          ") overlap",
                          g->name, ts[i - 1]->name, ts[i - 1]->offset, ts[i - 1]->offset + ts[i - 1]->nbytes,
                          ts[i]->name, ts[i]->offset);
            goto out;
        }
    }
    rc = KVR_OK;
out:
    free(ks);
    free(ts);
    return rc;
}

static const struct kv *find(const struct kvr_gguf *g, const char *key) {
    size_t n = strlen(key);
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].key_len == n && !memcmp(g->base + g->kv[i].key_off, key, n))
            return &g->kv[i];
    return NULL;
}

int kvr_gguf_parse(const void *buf, size_t len, const char *name, struct kvr_gguf **out) {
    int rc = KVR_ENOMEM;
    *out = NULL;
    struct kvr_gguf *g = calloc(1, sizeof *g);
    if (!g || !(g->name = strdup(name ? name : "(memory)"))) {
        free(g);
        return KVR_ENOMEM;
    }
    g->base = buf;
    g->size = len;
    g->alignment = KVR_GGUF_DEFAULT_ALIGNMENT;
    struct cur c = {.g = g};
    set_where(&c, "the header");
    if ((rc = need(&c, 4, "the magic")) != KVR_OK)
        goto out;
    if (memcmp(g->base, KVR_GGUF_MAGIC, 4) != 0) {
        KVR_LOG_ERROR("model '%s' is not a GGUF file: magic %02x %02x %02x %02x, not 'GGUF'", g->name,
                      g->base[0], g->base[1], g->base[2], g->base[3]);
        rc = KVR_EMAGIC;
        goto out;
    }
    c.pos = 4;
    if ((rc = rd_u32(&c, "the version", &g->version)) != KVR_OK)
        goto out;
    if (g->version != 2 && g->version != 3) {
        uint32_t v = g->version;
        uint32_t swapped = (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
        if (swapped == 2 || swapped == 3)
            KVR_LOG_ERROR("model '%s' is a big-endian GGUF file (version %u byte-swapped): kvrelay reads "
                          "little-endian GGUF only", g->name, swapped);
        else
            KVR_LOG_ERROR("model '%s' is GGUF version %u: kvrelay reads versions 2 and 3", g->name, v);
        rc = KVR_EVERSION;
        goto out;
    }
    if ((rc = rd_u64(&c, "the tensor count", &g->n_tensors)) != KVR_OK ||
        (rc = rd_u64(&c, "the metadata count", &g->n_kv)) != KVR_OK)
        goto out;
    /* A key/value pair takes at least 8 + 1 + 4 + 1 bytes and a tensor info 8 + 1 + 4 + 8
     * + 4 + 8: counts the rest of the file cannot hold are refused before any allocation. */
    uint64_t left = (uint64_t)len - c.pos;
    if (g->n_kv > left / 14 || g->n_tensors > left / 33 ||
        g->n_kv * 14 + g->n_tensors * 33 > left) {
        KVR_LOG_ERROR("model '%s' is truncated or corrupt: %" PRIu64 " metadata pairs and %" PRIu64
                      " tensors cannot fit in the %" PRIu64 " bytes after the header",
                      g->name, g->n_kv, g->n_tensors, left);
        rc = KVR_ETRUNC;
        goto out;
    }
    rc = KVR_ENOMEM;
    if (!(g->kv = calloc(g->n_kv ? (size_t)g->n_kv : 1, sizeof *g->kv)) ||
        !(g->t = calloc(g->n_tensors ? (size_t)g->n_tensors : 1, sizeof *g->t)))
        goto out;
    for (uint64_t i = 0; i < g->n_kv; i++)
        if ((rc = parse_kv(&c, i, &g->kv[i])) != KVR_OK)
            goto out;
    int64_t align;
    rc = kvr_gguf_get_int(g, "general.alignment", 1, (int64_t)1 << 30, &align);
    if (rc == KVR_OK) {
        const struct kv *ak = find(g, "general.alignment");
        if (ak->type != KVR_GGUF_U32 || (align & (align - 1)) != 0) {
            KVR_LOG_ERROR("model '%s': general.alignment is %" PRId64 " (a %s): it must be a u32 power of two",
                          g->name, align, type_name(ak->type));
            rc = KVR_EFORMAT;
            goto out;
        }
        g->alignment = (uint32_t)align;
    } else if (rc != KVR_ENOENT) {
        goto out;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if ((rc = parse_tensor_info(&c, i, &g->t[i])) != KVR_OK)
            goto out;
    /* The data section starts at the next multiple of the alignment. */
    g->data_off = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
    uint64_t data_len = g->data_off <= (uint64_t)len ? (uint64_t)len - g->data_off : 0;
    if (g->n_tensors > 0 && g->data_off > (uint64_t)len) {
        KVR_LOG_ERROR("model '%s' is truncated: its data section starts at offset %" PRIu64
                      ", the file ends at %zu",
                      g->name, g->data_off, len);
        rc = KVR_ETRUNC;
        goto out;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        struct kvr_gguf_tensor *t = &g->t[i];
        uint64_t rel = t->offset;
        size_t el = t->type == KVR_DTYPE_F32 ? 4 : 2;
        if (rel % g->alignment) {
            KVR_LOG_ERROR("model '%s': tensor '%s' has data offset %" PRIu64
                          ", not a multiple of the alignment %u",
                          g->name, t->name, rel, g->alignment);
            rc = KVR_EFORMAT;
            goto out;
        }
        if (rel > data_len || t->nbytes > data_len - rel) {
            KVR_LOG_ERROR("model '%s' is truncated or corrupt: tensor '%s' (%s, %" PRIu64
                          " bytes) at data offset %" PRIu64 " runs past the end of the file (data section "
                          "of %" PRIu64 " bytes from offset %" PRIu64 ")",
                          g->name, t->name, kvr_dtype_name(t->type), t->nbytes, rel, data_len, g->data_off);
            rc = KVR_ETRUNC;
            goto out;
        }
        t->offset = g->data_off + rel;
        if (t->offset % el) {
            KVR_LOG_ERROR("model '%s': tensor '%s' starts at file offset %" PRIu64
                          ", misaligned for %s values",
                          g->name, t->name, t->offset, kvr_dtype_name(t->type));
            rc = KVR_EFORMAT;
            goto out;
        }
    }
    if ((rc = check_unique(g)) != KVR_OK)
        goto out;
    *out = g;
    g = NULL;
    rc = KVR_OK;
out:
    kvr_gguf_free(g);
    return rc;
}

void kvr_gguf_free(struct kvr_gguf *g) {
    if (!g)
        return;
    free(g->kv);
    free(g->t);
    free(g->name);
    free(g);
}

uint32_t kvr_gguf_version(const struct kvr_gguf *g) { return g->version; }

const char *kvr_gguf_name(const struct kvr_gguf *g) { return g->name; }

const void *kvr_gguf_base(const struct kvr_gguf *g) { return g->base; }

size_t kvr_gguf_size(const struct kvr_gguf *g) { return g->size; }

uint64_t kvr_gguf_data_offset(const struct kvr_gguf *g) { return g->data_off; }

int kvr_gguf_n_tensors(const struct kvr_gguf *g) { return (int)g->n_tensors; }

const struct kvr_gguf_tensor *kvr_gguf_tensor(const struct kvr_gguf *g, int i) { return &g->t[i]; }

const struct kvr_gguf_tensor *kvr_gguf_find_tensor(const struct kvr_gguf *g, const char *name) {
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (!strcmp(g->t[i].name, name))
            return &g->t[i];
    return NULL;
}

/* ---- metadata getters ------------------------------------------------------------ */

int kvr_gguf_has(const struct kvr_gguf *g, const char *key) { return find(g, key) != NULL; }

static int wrong_type(const struct kvr_gguf *g, const char *key, const struct kv *kv, const char *want) {
    KVR_LOG_ERROR("model '%s': metadata key '%s' is of type %s%s%s, expected %s", g->name, key,
                  type_name(kv->type), kv->type == KVR_GGUF_ARRAY ? " of " : "",
                  kv->type == KVR_GGUF_ARRAY ? type_name(kv->elem_type) : "", want);
    return KVR_EFORMAT;
}

int kvr_gguf_get_int(const struct kvr_gguf *g, const char *key, int64_t lo, int64_t hi, int64_t *out) {
    const struct kv *kv = find(g, key);
    if (!kv)
        return KVR_ENOENT;
    const unsigned char *p = g->base + kv->val_off;
    int64_t v;
    int neg_or_big = 0;
    switch (kv->type) {
    case KVR_GGUF_U8: v = p[0]; break;
    case KVR_GGUF_I8: v = (int8_t)p[0]; break;
    case KVR_GGUF_U16: v = (uint16_t)(p[0] | p[1] << 8); break;
    case KVR_GGUF_I16: v = (int16_t)(uint16_t)(p[0] | p[1] << 8); break;
    case KVR_GGUF_U32: v = ld32(p); break;
    case KVR_GGUF_I32: v = (int32_t)ld32(p); break;
    case KVR_GGUF_U64: {
        uint64_t u = ld64(p);
        neg_or_big = u > (uint64_t)INT64_MAX;
        v = neg_or_big ? INT64_MAX : (int64_t)u;
        break;
    }
    case KVR_GGUF_I64: v = (int64_t)ld64(p); break;
    default: return wrong_type(g, key, kv, "an integer");
    }
    if (neg_or_big || v < lo || v > hi) {
        KVR_LOG_ERROR("model '%s': metadata key '%s' is %s%" PRId64 ", outside [%" PRId64 ", %" PRId64 "]",
                      g->name, key, neg_or_big ? "above " : "", v, lo, hi);
        return KVR_EFORMAT;
    }
    *out = v;
    return KVR_OK;
}

int kvr_gguf_get_float(const struct kvr_gguf *g, const char *key, double *out) {
    const struct kv *kv = find(g, key);
    if (!kv)
        return KVR_ENOENT;
    const unsigned char *p = g->base + kv->val_off;
    if (kv->type == KVR_GGUF_F32) {
        float f;
        memcpy(&f, p, 4);
        *out = (double)f;
    } else if (kv->type == KVR_GGUF_F64) {
        memcpy(out, p, 8);
    } else {
        return wrong_type(g, key, kv, "f32 or f64");
    }
    return KVR_OK;
}

int kvr_gguf_get_bool(const struct kvr_gguf *g, const char *key, int *out) {
    const struct kv *kv = find(g, key);
    if (!kv)
        return KVR_ENOENT;
    if (kv->type != KVR_GGUF_BOOL)
        return wrong_type(g, key, kv, "bool");
    *out = g->base[kv->val_off] != 0;
    return KVR_OK;
}

int kvr_gguf_get_str(const struct kvr_gguf *g, const char *key, const char **s, size_t *len) {
    const struct kv *kv = find(g, key);
    if (!kv)
        return KVR_ENOENT;
    if (kv->type != KVR_GGUF_STRING)
        return wrong_type(g, key, kv, "string");
    *len = (size_t)ld64(g->base + kv->val_off);
    *s = (const char *)g->base + kv->val_off + 8;
    return KVR_OK;
}

int kvr_gguf_get_array(const struct kvr_gguf *g, const char *key, uint32_t *elem_type, uint64_t *n) {
    const struct kv *kv = find(g, key);
    if (!kv)
        return KVR_ENOENT;
    if (kv->type != KVR_GGUF_ARRAY)
        return wrong_type(g, key, kv, "array");
    *elem_type = kv->elem_type;
    *n = kv->n;
    return KVR_OK;
}

/* ---- the tokenizer -------------------------------------------------------------------- */

/* A token id key: absent gives def; 0xFFFFFFFF (what writers put for "none") gives -1. */
static int token_id(const struct kvr_gguf *g, const char *key, int def, int n, int *out) {
    int64_t v;
    int rc = kvr_gguf_get_int(g, key, -1, UINT32_MAX, &v);
    if (rc == KVR_ENOENT) {
        *out = def < n ? def : -1;
        return KVR_OK;
    }
    if (rc != KVR_OK)
        return rc;
    if (v == UINT32_MAX || v == -1) {
        *out = -1;
        return KVR_OK;
    }
    if (v >= n) {
        KVR_LOG_ERROR("model '%s': %s is %" PRId64 ", outside the vocabulary of %d tokens", g->name, key, v, n);
        return KVR_ESHAPE;
    }
    *out = (int)v;
    return KVR_OK;
}

int kvr_gguf_tokenizer(const struct kvr_gguf *g, struct kvr_tokenizer **out) {
    *out = NULL;
    const char *model;
    size_t model_len;
    int rc = kvr_gguf_get_str(g, "tokenizer.ggml.model", &model, &model_len);
    if (rc == KVR_ENOENT) {
        KVR_LOG_INFO("model '%s' holds no tokenizer (no tokenizer.ggml.model)", g->name);
        return KVR_ENOENT;
    }
    if (rc != KVR_OK)
        return rc;
    if (model_len != 5 || memcmp(model, "llama", 5) != 0) {
        KVR_LOG_ERROR("model '%s': tokenizer.ggml.model is '%.*s': kvrelay runs the SentencePiece "
                      "tokenizer ('llama') only; pass a tokenizer.bin with --tokenizer",
                      g->name, (int)(model_len < 40 ? model_len : 40), model);
        return KVR_ENOTSUP;
    }
    const struct kv *tk = find(g, "tokenizer.ggml.tokens");
    if (!tk) {
        KVR_LOG_ERROR("model '%s': tokenizer.ggml.tokens is missing", g->name);
        return KVR_EFORMAT;
    }
    if (tk->type != KVR_GGUF_ARRAY || tk->elem_type != KVR_GGUF_STRING)
        return wrong_type(g, "tokenizer.ggml.tokens", tk, "array of string");
    if (tk->n < 1 || tk->n > (1 << 22)) {
        KVR_LOG_ERROR("model '%s': tokenizer.ggml.tokens has %" PRIu64 " tokens (must be 1..%d)", g->name,
                      tk->n, 1 << 22);
        return KVR_EFORMAT;
    }
    int n = (int)tk->n;
    const struct kv *sk = find(g, "tokenizer.ggml.scores");
    const struct kv *yk = find(g, "tokenizer.ggml.token_type");
    if (sk && (sk->type != KVR_GGUF_ARRAY || sk->elem_type != KVR_GGUF_F32))
        return wrong_type(g, "tokenizer.ggml.scores", sk, "array of f32");
    if (yk && (yk->type != KVR_GGUF_ARRAY || yk->elem_type != KVR_GGUF_I32))
        return wrong_type(g, "tokenizer.ggml.token_type", yk, "array of i32");
    if ((sk && sk->n != tk->n) || (yk && yk->n != tk->n)) {
        KVR_LOG_ERROR("model '%s': tokenizer.ggml.tokens has %d entries but scores %" PRIu64
                      " and token_type %" PRIu64,
                      g->name, n, sk ? sk->n : tk->n, yk ? yk->n : tk->n);
        return KVR_ESHAPE;
    }
    struct kvr_tokenizer_spec sp = {.name = g->name, .n_tokens = n, .add_bos = 1, .add_space_prefix = 1,
                                    .spm_spaces = 1};
    if ((rc = token_id(g, "tokenizer.ggml.bos_token_id", 1, n, &sp.bos_id)) != KVR_OK ||
        (rc = token_id(g, "tokenizer.ggml.eos_token_id", 2, n, &sp.eos_id)) != KVR_OK ||
        (rc = token_id(g, "tokenizer.ggml.unknown_token_id", 0, n, &sp.unk_id)) != KVR_OK)
        return rc;
    rc = kvr_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &sp.add_bos);
    if (rc != KVR_OK && rc != KVR_ENOENT)
        return rc;
    rc = kvr_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &sp.add_space_prefix);
    if (rc != KVR_OK && rc != KVR_ENOENT)
        return rc;
    const char **pieces = malloc((size_t)n * sizeof *pieces);
    uint64_t *lens = malloc((size_t)n * sizeof *lens);
    float *scores = sk ? malloc((size_t)n * sizeof *scores) : NULL;
    int32_t *types = yk ? malloc((size_t)n * sizeof *types) : NULL;
    rc = KVR_ENOMEM;
    if (!pieces || !lens || (sk && !scores) || (yk && !types))
        goto out;
    /* Walked once at parse time: every length is inside the file. */
    uint64_t pos = tk->val_off;
    for (int i = 0; i < n; i++) {
        lens[i] = ld64(g->base + pos);
        pieces[i] = (const char *)g->base + pos + 8;
        pos += 8 + lens[i];
    }
    /* Array elements sit at any byte offset: copied out, not cast. */
    if (sk)
        memcpy(scores, g->base + sk->val_off, (size_t)n * sizeof *scores);
    if (yk)
        memcpy(types, g->base + yk->val_off, (size_t)n * sizeof *types);
    sp.pieces = pieces;
    sp.piece_nbytes = lens;
    sp.scores = scores;
    sp.types = types;
    rc = kvr_tokenizer_create(&sp, out);
out:
    free(pieces);
    free(lens);
    free(scores);
    free(types);
    return rc;
}
