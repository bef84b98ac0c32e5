/* model.c - loads models by mmap and validates them: llama2.c checkpoints against their
 * header, GGUF files (`llama` architecture) against their metadata through gguf.c; writes
 * synthetic llama2.c checkpoints for benchmarks. Owns the mapping (or the private copy of
 * the weights) and the per-layer views; every role calls it. */
/* The declarations sys/mman.h and unistd.h give beyond strict POSIX. */
#define _DEFAULT_SOURCE
#include "model.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf.h"
#include "hugemem.h"
#include "log.h"
#include "status.h"
#include "tokenizer.h"

#define HEADER_NBYTES (7 * sizeof(int32_t))

struct kvr_model {
    struct kvr_model_config config;
    struct kvr_model_weights w;
    char *path;
    const unsigned char *file; /* the whole file: our mmap, a caller's buffer, or NULL
                                * (llama2.c in copy mode) */
    size_t file_nbytes;
    int map_owned;             /* file is our mmap */
    void *copy;                /* the weights' bytes, 2 MiB aligned (copy mode) */
    size_t copy_nbytes;
    size_t data_off;           /* where the weights start in the file */
    const unsigned char *data; /* the weights' first byte: file + data_off, or copy */
    int32_t header[7];         /* llama2.c */
    struct kvr_gguf *gguf;     /* GGUF: the parsed container (borrows file) */
    uint64_t fingerprint;
    int have_fingerprint;
    char types[48];
};

/* ---- shape checks shared by both formats ---------------------------------------- */

/* The limits a config must meet, with the reason when it does not. */
static const char *config_problem(const struct kvr_model_config *c) {
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->vocab_size <= 0 || c->seq_len <= 0)
        return "a dimension is zero or negative";
    if (c->dim % c->n_heads)
        return "dim is not divisible by n_heads";
    if (c->n_heads % c->n_kv_heads)
        return "n_heads is not divisible by n_kv_heads";
    if ((c->dim / c->n_heads) % 2)
        return "head_dim is odd (RoPE rotates pairs)";
    if (c->dim > (1 << 16) || c->hidden_dim > (1 << 18) || c->n_layers > 4096 ||
        c->vocab_size > (1 << 22) || c->seq_len > KVR_MODEL_CTX_MAX)
        return "a dimension is implausibly large";
    return NULL;
}

static void fill_derived(struct kvr_model_config *c) {
    c->head_dim = c->dim / c->n_heads;
    c->kv_dim = c->n_kv_heads * c->head_dim;
}

static struct kvr_tensor f32_tensor(const float *p, int64_t rows, int64_t cols) {
    return (struct kvr_tensor){.type = KVR_DTYPE_F32, .data = p, .rows = rows, .cols = cols,
                               .row_nbytes = (size_t)cols * sizeof(float)};
}

/* ---- llama2.c checkpoints ------------------------------------------------------------ */

/* Tensor sizes in floats, in file order; the two RoPE tables of old checkpoints
 * (seq_len * head_dim / 2 each) are skipped, as llama2.c does. */
static uint64_t weights_nfloats(const struct kvr_model_config *c, uint64_t *cls_nfloats) {
    uint64_t d = (uint64_t)c->dim, h = (uint64_t)c->hidden_dim, L = (uint64_t)c->n_layers;
    uint64_t kv = (uint64_t)c->n_kv_heads * (uint64_t)(c->dim / c->n_heads);
    uint64_t v = (uint64_t)c->vocab_size;
    uint64_t n = v * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d + 3 * L * h * d + d;
    n += (uint64_t)c->seq_len * (uint64_t)(c->dim / c->n_heads); /* freq_cis_real + imag */
    *cls_nfloats = c->shared_classifier ? 0 : v * d;
    return n + *cls_nfloats;
}

uint64_t kvr_model_expected_nbytes(const struct kvr_model_config *c, const char **why) {
    const char *dummy;
    if (!why)
        why = &dummy;
    if ((*why = config_problem(c)) != NULL)
        return 0;
    uint64_t cls;
    return HEADER_NBYTES + weights_nfloats(c, &cls) * sizeof(float);
}

/* The llama2.c defaults of what a GGUF file states in its metadata. */
static void llama2c_defaults(struct kvr_model_config *c) {
    c->n_rot = c->head_dim;
    c->rope_theta = 10000.0f;
    c->norm_eps = 1e-5f;
    c->bos_id = 1;
    c->eos_id = 2;
    c->format = KVR_MODEL_LLAMA2C;
}

/* Checks the 7-int32 header against the file size; fills m->config. */
static int legacy_header(struct kvr_model *m, const int32_t hdr[7], size_t fsize) {
    const char *path = m->path;
    struct kvr_model_config *c = &m->config;
    c->dim = hdr[0];
    c->hidden_dim = hdr[1];
    c->n_layers = hdr[2];
    c->n_heads = hdr[3];
    c->n_kv_heads = hdr[4];
    c->shared_classifier = hdr[5] > 0;
    c->vocab_size = hdr[5] == INT32_MIN ? 0 : abs(hdr[5]);
    c->seq_len = hdr[6];
    const char *why = NULL;
    uint64_t want = kvr_model_expected_nbytes(c, &why);
    if (!want) {
        const unsigned char *b = (const unsigned char *)hdr;
        KVR_LOG_ERROR("model '%s' is not GGUF (magic %02x %02x %02x %02x) and has a bad header for a "
                      "llama2.c checkpoint (dim=%d hidden=%d layers=%d heads=%d kv_heads=%d vocab=%d "
                      "seq_len=%d): %s",
                      path, b[0], b[1], b[2], b[3], hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6],
                      why);
        return KVR_EFORMAT;
    }
    if ((uint64_t)fsize != want) {
        KVR_LOG_ERROR("model '%s' is %zu bytes but its header (dim=%d hidden=%d layers=%d heads=%d "
                      "kv_heads=%d vocab=%d seq_len=%d) needs %llu bytes: %s",
                      path, fsize, hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6],
                      (unsigned long long)want,
                      (uint64_t)fsize < want ? "truncated file" : "trailing bytes, not this format");
        return (uint64_t)fsize < want ? KVR_ETRUNC : KVR_EFORMAT;
    }
    fill_derived(c);
    llama2c_defaults(c);
    c->seq_len_file = c->seq_len;
    memcpy(m->header, hdr, sizeof m->header);
    m->data_off = HEADER_NBYTES;
    return KVR_OK;
}

/* Per-layer views of the stacked llama2.c tensors at m->data. */
static int legacy_views(struct kvr_model *m) {
    const struct kvr_model_config *c = &m->config;
    struct kvr_model_weights *w = &m->w;
    int64_t d = c->dim, h = c->hidden_dim, L = c->n_layers, kv = c->kv_dim, V = c->vocab_size;
    if (!(w->layers = calloc((size_t)L, sizeof *w->layers)))
        return KVR_ENOMEM;
    const float *p = (const float *)(const void *)m->data;
    w->token_embedding = f32_tensor(p, V, d);
    p += V * d;
    const float *rms_att = p;  p += L * d;
    const float *wq = p;       p += L * d * d;
    const float *wk = p;       p += L * kv * d;
    const float *wv = p;       p += L * kv * d;
    const float *wo = p;       p += L * d * d;
    const float *rms_ffn = p;  p += L * d;
    const float *w1 = p;       p += L * h * d;
    const float *w2 = p;       p += L * d * h;
    const float *w3 = p;       p += L * h * d;
    w->rms_final = p;          p += d;
    p += (int64_t)c->seq_len_file * c->head_dim; /* skip legacy RoPE tables */
    w->wcls = c->shared_classifier ? w->token_embedding : f32_tensor(p, V, d);
    for (int64_t l = 0; l < L; l++) {
        struct kvr_layer_weights *lw = &w->layers[l];
        lw->rms_att = rms_att + l * d;
        lw->rms_ffn = rms_ffn + l * d;
        lw->wq = f32_tensor(wq + l * d * d, d, d);
        lw->wk = f32_tensor(wk + l * kv * d, kv, d);
        lw->wv = f32_tensor(wv + l * kv * d, kv, d);
        lw->wo = f32_tensor(wo + l * d * d, d, d);
        lw->w1 = f32_tensor(w1 + l * h * d, h, d);
        lw->w2 = f32_tensor(w2 + l * d * h, d, h);
        lw->w3 = f32_tensor(w3 + l * h * d, h, d);
    }
    return KVR_OK;
}

/* ---- GGUF, `llama` architecture ----------------------------------------------------- */

/* A required (def < 0) or optional integer hyperparameter "llama.<key>" in [lo, hi]. */
static int hparam_int(const struct kvr_model *m, const char *key, int64_t lo, int64_t hi, int64_t def,
                      int *out) {
    char full[96];
    snprintf(full, sizeof full, "llama.%s", key);
    int64_t v;
    int rc = kvr_gguf_get_int(m->gguf, full, lo, hi, &v);
    if (rc == KVR_ENOENT) {
        if (def < 0) {
            KVR_LOG_ERROR("model '%s': metadata key '%s' is missing (the llama architecture needs it)",
                          m->path, full);
            return KVR_EFORMAT;
        }
        v = def;
        rc = KVR_OK;
    }
    if (rc == KVR_OK)
        *out = (int)v;
    return rc;
}

/* A float hyperparameter in (lo, hi], finite; required when def is NAN. */
static int hparam_float(const struct kvr_model *m, const char *key, double lo, double hi, double def,
                        float *out) {
    char full[96];
    snprintf(full, sizeof full, "llama.%s", key);
    double v;
    int rc = kvr_gguf_get_float(m->gguf, full, &v);
    if (rc == KVR_ENOENT) {
        if (isnan(def)) {
            KVR_LOG_ERROR("model '%s': metadata key '%s' is missing (the llama architecture needs it)",
                          m->path, full);
            return KVR_EFORMAT;
        }
        v = def;
        rc = KVR_OK;
    }
    if (rc != KVR_OK)
        return rc;
    if (!(v > lo && v <= hi)) {
        KVR_LOG_ERROR("model '%s': metadata key '%s' is %g, outside (%g, %g]", m->path, full, v, lo, hi);
        return KVR_EFORMAT;
    }
    *out = (float)v;
    return KVR_OK;
}

/* The names of one layer's tensors, their place in struct kvr_layer_weights and shapes. */
enum { SHAPE_DIM, SHAPE_KV, SHAPE_HID };
static const struct layer_tensor {
    const char *suffix;
    size_t off;    /* of the struct kvr_tensor, or of the const float * (norms) */
    int norm;      /* a 1-D float32 vector of dim */
    int rows, cols; /* SHAPE_* (matrices) */
} layer_tensors[] = {
    {"attn_norm.weight", offsetof(struct kvr_layer_weights, rms_att), 1, 0, 0},
    {"attn_q.weight", offsetof(struct kvr_layer_weights, wq), 0, SHAPE_DIM, SHAPE_DIM},
    {"attn_k.weight", offsetof(struct kvr_layer_weights, wk), 0, SHAPE_KV, SHAPE_DIM},
    {"attn_v.weight", offsetof(struct kvr_layer_weights, wv), 0, SHAPE_KV, SHAPE_DIM},
    {"attn_output.weight", offsetof(struct kvr_layer_weights, wo), 0, SHAPE_DIM, SHAPE_DIM},
    {"ffn_norm.weight", offsetof(struct kvr_layer_weights, rms_ffn), 1, 0, 0},
    {"ffn_gate.weight", offsetof(struct kvr_layer_weights, w1), 0, SHAPE_HID, SHAPE_DIM},
    {"ffn_down.weight", offsetof(struct kvr_layer_weights, w2), 0, SHAPE_DIM, SHAPE_HID},
    {"ffn_up.weight", offsetof(struct kvr_layer_weights, w3), 0, SHAPE_HID, SHAPE_DIM},
};
#define N_LAYER_TENSORS ((int)(sizeof layer_tensors / sizeof layer_tensors[0]))

static int64_t shape_of(const struct kvr_model_config *c, int s) {
    return s == SHAPE_DIM ? c->dim : s == SHAPE_KV ? c->kv_dim : c->hidden_dim;
}

static const char *shape_name(int s) {
    return s == SHAPE_DIM ? "embedding_length"
           : s == SHAPE_KV ? "head_count_kv x head_dim"
                           : "feed_forward_length";
}

/* Checks t against (rows, cols) (rows 0: a vector of cols) and the types the engine
 * takes for it; *v receives the view into the weights. */
static int take_tensor(const struct kvr_model *m, const struct kvr_gguf_tensor *t, int64_t rows, int64_t cols,
                       const char *rows_what, const char *cols_what, struct kvr_tensor *v) {
    int64_t want1 = rows ? rows : 1;
    if (t->ne[0] != (uint64_t)cols || t->ne[1] != (uint64_t)want1 || t->ne[2] != 1 || t->ne[3] != 1) {
        if (rows)
            KVR_LOG_ERROR("model '%s': tensor '%s' has shape [%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64
                          "], the metadata says [%" PRId64 ", %" PRId64 "] (%s, %s)",
                          m->path, t->name, t->ne[0], t->ne[1], t->ne[2], t->ne[3], cols, rows, cols_what,
                          rows_what);
        else
            KVR_LOG_ERROR("model '%s': tensor '%s' has shape [%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64
                          "], the metadata says [%" PRId64 "] (%s)",
                          m->path, t->name, t->ne[0], t->ne[1], t->ne[2], t->ne[3], cols, cols_what);
        return KVR_ESHAPE;
    }
    if (!rows && t->type != KVR_DTYPE_F32) {
        KVR_LOG_ERROR("model '%s': norm tensor '%s' is %s: kvrelay runs float32 norms (llama.cpp's "
                      "quantizer keeps them F32)", m->path, t->name, kvr_dtype_name(t->type));
        return KVR_ENOTSUP;
    }
    enum kvr_dtype ty = (enum kvr_dtype)t->type;
    *v = (struct kvr_tensor){.type = ty,
                             .data = m->data + (t->offset - m->data_off),
                             .rows = want1,
                             .cols = cols,
                             .row_nbytes = kvr_dtype_row_nbytes(ty, cols)};
    return KVR_OK;
}

/* Hyperparameters from the metadata into m->config. */
static int gguf_config(struct kvr_model *m) {
    struct kvr_gguf *g = m->gguf;
    struct kvr_model_config *c = &m->config;
    const char *arch;
    size_t arch_len;
    int rc = kvr_gguf_get_str(g, "general.architecture", &arch, &arch_len);
    if (rc == KVR_ENOENT) {
        KVR_LOG_ERROR("model '%s': metadata key 'general.architecture' is missing", m->path);
        return KVR_EFORMAT;
    }
    if (rc != KVR_OK)
        return rc;
    if (arch_len != 5 || memcmp(arch, "llama", 5) != 0) {
        KVR_LOG_ERROR("model '%s' has architecture '%.*s': kvrelay runs 'llama' only", m->path,
                      (int)(arch_len < 40 ? arch_len : 40), arch);
        return KVR_ENOTSUP;
    }
    int64_t experts;
    if ((rc = kvr_gguf_get_int(g, "llama.expert_count", 0, INT64_MAX, &experts)) == KVR_OK && experts > 0) {
        KVR_LOG_ERROR("model '%s' is a mixture of %" PRId64 " experts: not supported", m->path, experts);
        return KVR_ENOTSUP;
    } else if (rc != KVR_OK && rc != KVR_ENOENT) {
        return rc;
    }
    const char *scaling;
    size_t scaling_len;
    rc = kvr_gguf_get_str(g, "llama.rope.scaling.type", &scaling, &scaling_len);
    if (rc == KVR_OK && !(scaling_len == 4 && memcmp(scaling, "none", 4) == 0)) {
        KVR_LOG_ERROR("model '%s' uses RoPE scaling '%.*s': not supported", m->path,
                      (int)(scaling_len < 40 ? scaling_len : 40), scaling);
        return KVR_ENOTSUP;
    } else if (rc != KVR_OK && rc != KVR_ENOENT) {
        return rc;
    }
    if ((rc = hparam_int(m, "context_length", 1, INT32_MAX, -1, &c->seq_len)) != KVR_OK ||
        (rc = hparam_int(m, "embedding_length", 1, 1 << 16, -1, &c->dim)) != KVR_OK ||
        (rc = hparam_int(m, "block_count", 1, 4096, -1, &c->n_layers)) != KVR_OK ||
        (rc = hparam_int(m, "feed_forward_length", 1, 1 << 18, -1, &c->hidden_dim)) != KVR_OK ||
        (rc = hparam_int(m, "attention.head_count", 1, 1 << 16, -1, &c->n_heads)) != KVR_OK ||
        (rc = hparam_int(m, "attention.head_count_kv", 1, 1 << 16, c->n_heads, &c->n_kv_heads)) != KVR_OK)
        return rc;
    if (c->seq_len > KVR_MODEL_CTX_MAX) {
        KVR_LOG_ERROR("model '%s': llama.context_length %d is over %d", m->path, c->seq_len, KVR_MODEL_CTX_MAX);
        return KVR_EFORMAT;
    }
    const struct kvr_gguf_tensor *emb = kvr_gguf_find_tensor(g, "token_embd.weight");
    if (!emb) {
        KVR_LOG_ERROR("model '%s': tensor 'token_embd.weight' is missing", m->path);
        return KVR_EFORMAT;
    }
    if (emb->ne[1] > (1 << 22)) {
        KVR_LOG_ERROR("model '%s': tensor 'token_embd.weight' has %" PRIu64 " rows, over %d tokens", m->path,
                      emb->ne[1], 1 << 22);
        return KVR_ESHAPE;
    }
    c->vocab_size = (int)emb->ne[1];
    c->shared_classifier = kvr_gguf_find_tensor(g, "output.weight") == NULL;
    const char *why = config_problem(c);
    if (why) {
        KVR_LOG_ERROR("model '%s' has bad hyperparameters (embedding_length=%d feed_forward_length=%d "
                      "block_count=%d head_count=%d head_count_kv=%d vocab=%d context_length=%d): %s",
                      m->path, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size,
                      c->seq_len, why);
        return KVR_EFORMAT;
    }
    fill_derived(c);
    if ((rc = hparam_int(m, "rope.dimension_count", 2, c->head_dim, c->head_dim, &c->n_rot)) != KVR_OK)
        return rc;
    if (c->n_rot % 2) {
        KVR_LOG_ERROR("model '%s': llama.rope.dimension_count %d is odd (RoPE rotates pairs)", m->path,
                      c->n_rot);
        return KVR_EFORMAT;
    }
    if ((rc = hparam_float(m, "rope.freq_base", 0.0, 1e12, 10000.0, &c->rope_theta)) != KVR_OK ||
        (rc = hparam_float(m, "attention.layer_norm_rms_epsilon", 0.0, 1.0, (double)NAN, &c->norm_eps)) != KVR_OK)
        return rc;
    int64_t v;
    if ((rc = kvr_gguf_get_int(g, "llama.vocab_size", 1, INT64_MAX, &v)) == KVR_OK && v != c->vocab_size) {
        KVR_LOG_ERROR("model '%s': llama.vocab_size is %" PRId64 " but token_embd.weight has %d rows", m->path,
                      v, c->vocab_size);
        return KVR_ESHAPE;
    } else if (rc != KVR_OK && rc != KVR_ENOENT) {
        return rc;
    }
    /* The vocabulary, when the file has one, must be the embedding's; BOS and EOS are
     * needed by every node (the decode node stops at them) even without a tokenizer. */
    uint32_t et;
    uint64_t n_tok;
    if ((rc = kvr_gguf_get_array(g, "tokenizer.ggml.tokens", &et, &n_tok)) == KVR_OK) {
        if (n_tok != (uint64_t)c->vocab_size) {
            KVR_LOG_ERROR("model '%s': tokenizer.ggml.tokens has %" PRIu64 " tokens but token_embd.weight "
                          "has %d rows", m->path, n_tok, c->vocab_size);
            return KVR_ESHAPE;
        }
    } else if (rc != KVR_ENOENT) {
        return rc;
    }
    int64_t ids[2];
    const char *id_keys[2] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"};
    for (int i = 0; i < 2; i++) {
        rc = kvr_gguf_get_int(g, id_keys[i], -1, UINT32_MAX, &ids[i]);
        if (rc == KVR_ENOENT)
            ids[i] = i + 1;
        else if (rc != KVR_OK)
            return rc;
        if (ids[i] == UINT32_MAX || ids[i] >= c->vocab_size)
            ids[i] = -1;
    }
    c->bos_id = (int)ids[0];
    c->eos_id = (int)ids[1];
    c->seq_len_file = c->seq_len;
    c->format = KVR_MODEL_GGUF;
    return KVR_OK;
}

/* N of a name "blk.N.<rest>" (N plain decimal, at most 6 digits), else -1. */
static int blk_layer(const char *name) {
    if (strncmp(name, "blk.", 4) != 0)
        return -1;
    int n = 0, digits = 0;
    const char *p = name + 4;
    for (; *p >= '0' && *p <= '9' && digits < 7; p++, digits++)
        n = n * 10 + (*p - '0');
    return digits >= 1 && digits <= 6 && *p == '.' ? n : -1;
}

/* Every tensor of the file mapped onto the weights, checked against the config; a
 * tensor the llama architecture does not have is refused (ignoring it could change the
 * model's output unseen: a bias, a RoPE frequency table). */
static int gguf_views(struct kvr_model *m) {
    struct kvr_gguf *g = m->gguf;
    const struct kvr_model_config *c = &m->config;
    struct kvr_model_weights *w = &m->w;
    int L = c->n_layers;
    if (!(w->layers = calloc((size_t)L, sizeof *w->layers)))
        return KVR_ENOMEM;
    unsigned char *seen = calloc((size_t)L * N_LAYER_TENSORS, 1);
    if (!seen)
        return KVR_ENOMEM;
    int rc = KVR_OK, have_emb = 0, have_norm = 0, have_out = 0;
    struct kvr_tensor norm;
    for (int i = 0; i < kvr_gguf_n_tensors(g) && rc == KVR_OK; i++) {
        const struct kvr_gguf_tensor *t = kvr_gguf_tensor(g, i);
        int layer = blk_layer(t->name), end = 0;
        if (!strcmp(t->name, "token_embd.weight")) {
            rc = take_tensor(m, t, c->vocab_size, c->dim, "vocabulary", "embedding_length", &w->token_embedding);
            have_emb = 1;
        } else if (!strcmp(t->name, "output.weight")) {
            rc = take_tensor(m, t, c->vocab_size, c->dim, "vocabulary", "embedding_length", &w->wcls);
            have_out = 1;
        } else if (!strcmp(t->name, "output_norm.weight")) {
            rc = take_tensor(m, t, 0, c->dim, NULL, "embedding_length", &norm);
            w->rms_final = norm.data;
            have_norm = 1;
        } else if (layer >= 0 && layer < L) {
            end = (int)(strchr(t->name + 4, '.') - t->name) + 1;
            int k = 0;
            while (k < N_LAYER_TENSORS && strcmp(t->name + end, layer_tensors[k].suffix))
                k++;
            if (k == N_LAYER_TENSORS) {
                KVR_LOG_ERROR("model '%s': tensor '%s' is not part of the llama architecture as kvrelay "
                              "runs it", m->path, t->name);
                rc = KVR_ENOTSUP;
                break;
            }
            const struct layer_tensor *lt = &layer_tensors[k];
            char *dst = (char *)&w->layers[layer] + lt->off;
            if (lt->norm) {
                rc = take_tensor(m, t, 0, c->dim, NULL, "embedding_length", &norm);
                memcpy(dst, &norm.data, sizeof(const float *));
            } else {
                rc = take_tensor(m, t, shape_of(c, lt->rows), shape_of(c, lt->cols), shape_name(lt->rows),
                                 shape_name(lt->cols), (struct kvr_tensor *)(void *)dst);
            }
            seen[(size_t)layer * N_LAYER_TENSORS + (size_t)k] = 1;
        } else {
            KVR_LOG_ERROR("model '%s': tensor '%s' is not part of the llama architecture as kvrelay runs it "
                          "(%d layers)", m->path, t->name, L);
            rc = KVR_ENOTSUP;
        }
    }
    if (rc == KVR_OK && (!have_emb || !have_norm)) {
        KVR_LOG_ERROR("model '%s': tensor '%s' is missing", m->path,
                      !have_emb ? "token_embd.weight" : "output_norm.weight");
        rc = KVR_EFORMAT;
    }
    for (int l = 0; l < L && rc == KVR_OK; l++) {
        for (int k = 0; k < N_LAYER_TENSORS && rc == KVR_OK; k++) {
            if (!seen[(size_t)l * N_LAYER_TENSORS + (size_t)k]) {
                KVR_LOG_ERROR("model '%s': tensor 'blk.%d.%s' is missing", m->path, l, layer_tensors[k].suffix);
                rc = KVR_EFORMAT;
            }
        }
    }
    free(seen);
    if (rc == KVR_OK && !have_out)
        w->wcls = w->token_embedding; /* tied: logits use the embedding */
    return rc;
}

/* ---- loading -------------------------------------------------------------------------- */

/* Copies the weights (the file from data_off) into huge-page memory (hugemem.h): decode
 * streams every weight each step, and in 4 KiB page-cache pages it pays a TLB miss and a
 * prefetcher restart every 4 KiB, on rows that start 28 bytes off alignment (llama2.c
 * files). */
static int copy_weights(struct kvr_model *m, int fd, size_t fsize) {
    size_t n = fsize - m->data_off, len = 0;
    void *p = kvr_huge_alloc(n, &len);
    if (!p) {
        KVR_LOG_ERROR("cannot allocate %zu bytes for the weights of '%s': %s", n, m->path, strerror(errno));
        return KVR_ENOMEM;
    }
    size_t done = 0;
    while (done < n) {
        ssize_t k = pread(fd, (char *)p + done, n - done > ((size_t)1 << 30) ? (size_t)1 << 30 : n - done,
                          (off_t)(m->data_off + done));
        if (k <= 0) {
            KVR_LOG_ERROR("cannot read the weights of '%s': %s", m->path, k < 0 ? strerror(errno) : "short file");
            kvr_huge_free(p, len);
            return KVR_EIO;
        }
        done += (size_t)k;
    }
    mprotect(p, len, PROT_READ);
    m->copy = p;
    m->copy_nbytes = len;
    m->data = p;
    return KVR_OK;
}

/* "Q8_0+F16+F32": the types of the weights, most bytes first. */
static void describe_types(struct kvr_model *m) {
    static const enum kvr_dtype all[4] = {KVR_DTYPE_F32, KVR_DTYPE_F16, KVR_DTYPE_BF16, KVR_DTYPE_Q8_0};
    uint64_t nb[4] = {0};
    const struct kvr_model_weights *w = &m->w;
    const struct kvr_model_config *c = &m->config;
    const struct kvr_tensor *ts[2] = {&w->token_embedding, c->shared_classifier ? NULL : &w->wcls};
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < 4 && ts[i]; k++)
            nb[k] += ts[i]->type == all[k] ? (uint64_t)ts[i]->rows * ts[i]->row_nbytes : 0;
    nb[0] += (uint64_t)(2 * c->n_layers + 1) * (uint64_t)c->dim * 4; /* norms */
    for (int l = 0; l < c->n_layers; l++) {
        const struct kvr_layer_weights *lw = &w->layers[l];
        const struct kvr_tensor *mt[7] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w1, &lw->w2, &lw->w3};
        for (int i = 0; i < 7; i++)
            for (int k = 0; k < 4; k++)
                nb[k] += mt[i]->type == all[k] ? (uint64_t)mt[i]->rows * mt[i]->row_nbytes : 0;
    }
    m->types[0] = '\0';
    for (int done = 0; done < 4; done++) {
        int best = -1;
        for (int k = 0; k < 4; k++)
            if (nb[k] && (best < 0 || nb[k] > nb[best]))
                best = k;
        if (best < 0)
            break;
        if (m->types[0])
            strcat(m->types, "+");
        strcat(m->types, kvr_dtype_name(all[best]));
        nb[best] = 0;
    }
}

/* Everything after the file is in memory (file set; data set unless copying): parses,
 * builds the config and the views, applies the context override. */
static int build(struct kvr_model *m, const struct kvr_model_params *p, int fd) {
    int rc;
    int is_gguf = m->file_nbytes >= 4 && memcmp(m->file, KVR_GGUF_MAGIC, 4) == 0;
    if (is_gguf) {
        if ((rc = kvr_gguf_parse(m->file, m->file_nbytes, m->path, &m->gguf)) != KVR_OK)
            return rc;
        m->data_off = (size_t)kvr_gguf_data_offset(m->gguf);
        if (m->data_off > m->file_nbytes)
            m->data_off = m->file_nbytes; /* no tensors: the views will say what is missing */
        if ((rc = gguf_config(m)) != KVR_OK)
            return rc;
    } else {
        if (m->file_nbytes < HEADER_NBYTES) {
            KVR_LOG_ERROR("model '%s' is %zu bytes: not GGUF, and shorter than the 28-byte header of a "
                          "llama2.c checkpoint", m->path, m->file_nbytes);
            return KVR_ETRUNC;
        }
        int32_t hdr[7];
        memcpy(hdr, m->file, sizeof hdr);
        if ((rc = legacy_header(m, hdr, m->file_nbytes)) != KVR_OK)
            return rc;
    }
    if (p->mode == KVR_WEIGHTS_COPY && fd >= 0) {
        if ((rc = copy_weights(m, fd, m->file_nbytes)) != KVR_OK)
            return rc;
    } else {
        m->data = m->file + m->data_off;
    }
    if ((rc = is_gguf ? gguf_views(m) : legacy_views(m)) != KVR_OK)
        return rc;
    if (p->n_ctx < 0 || p->n_ctx > KVR_MODEL_CTX_MAX) {
        KVR_LOG_ERROR("model '%s': context %d is outside [1, %d]", m->path, p->n_ctx, KVR_MODEL_CTX_MAX);
        return KVR_EINVAL;
    }
    if (p->n_ctx > 0 && p->n_ctx != m->config.seq_len) {
        KVR_LOG_INFO("model '%s': running at context %d (the file says %d)", m->path, p->n_ctx,
                     m->config.seq_len);
        m->config.seq_len = p->n_ctx;
    }
    describe_types(m);
    return KVR_OK;
}

int kvr_model_load(const char *path, struct kvr_model **out) {
    struct kvr_model_params p = {0};
    return kvr_model_load_params(path, &p, out);
}

int kvr_model_load_mode(const char *path, enum kvr_weights_mode mode, struct kvr_model **out) {
    struct kvr_model_params p = {.mode = mode};
    return kvr_model_load_params(path, &p, out);
}

int kvr_model_load_params(const char *path, const struct kvr_model_params *p, struct kvr_model **out) {
    int rc = KVR_EIO;
    int fd = -1;
    struct kvr_model *m = NULL;
    *out = NULL;
    if (!path || !*path) {
        KVR_LOG_ERROR("no model path given");
        return KVR_EINVAL;
    }
    fd = open(path, O_RDONLY);
    if (fd < 0) {
        KVR_LOG_ERROR("cannot open model '%s': %s", path, strerror(errno));
        return errno == ENOENT ? KVR_ENOENT : KVR_EIO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        KVR_LOG_ERROR("cannot stat model '%s': %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        KVR_LOG_ERROR("model '%s' is not a regular file", path);
        rc = KVR_EFORMAT;
        goto out;
    }
    if (!(m = calloc(1, sizeof *m)) || !(m->path = strdup(path))) {
        rc = KVR_ENOMEM;
        goto out;
    }
    size_t fsize = (size_t)st.st_size;
    if (fsize < 4) {
        KVR_LOG_ERROR("model '%s' is %zu bytes: shorter than the 28-byte header of a llama2.c "
                      "checkpoint and than a GGUF header", path, fsize);
        rc = KVR_ETRUNC;
        goto out;
    }
    char magic[4];
    if (pread(fd, magic, 4, 0) != 4) {
        KVR_LOG_ERROR("cannot read model '%s': %s", path, strerror(errno));
        goto out;
    }
    if (memcmp(magic, KVR_GGUF_MAGIC, 4) == 0 || p->mode != KVR_WEIGHTS_COPY) {
        /* GGUF always maps the file (its metadata and vocabulary stay readable); a
         * llama2.c checkpoint in copy mode only reads its header. */
        void *map = mmap(NULL, fsize, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            KVR_LOG_ERROR("cannot mmap model '%s': %s", path, strerror(errno));
            goto out;
        }
        m->file = map;
        m->map_owned = 1;
        m->file_nbytes = fsize;
        /* Decode streams every weight each step: ask for read-ahead (not for a copy). */
        if (p->mode != KVR_WEIGHTS_COPY)
            posix_madvise(map, fsize, POSIX_MADV_WILLNEED);
        rc = build(m, p, fd);
    } else {
        int32_t hdr[7];
        if (fsize < HEADER_NBYTES) {
            KVR_LOG_ERROR("model '%s' is %zu bytes, shorter than the 28-byte header", path, fsize);
            rc = KVR_ETRUNC;
            goto out;
        }
        if (pread(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr) {
            KVR_LOG_ERROR("cannot read header of '%s': %s", path, strerror(errno));
            goto out;
        }
        if ((rc = legacy_header(m, hdr, fsize)) != KVR_OK)
            goto out;
        m->file_nbytes = fsize;
        if ((rc = copy_weights(m, fd, fsize)) != KVR_OK || (rc = legacy_views(m)) != KVR_OK)
            goto out;
        if (p->n_ctx < 0 || p->n_ctx > KVR_MODEL_CTX_MAX) {
            KVR_LOG_ERROR("model '%s': context %d is outside [1, %d]", path, p->n_ctx, KVR_MODEL_CTX_MAX);
            rc = KVR_EINVAL;
            goto out;
        }
        if (p->n_ctx > 0)
            m->config.seq_len = p->n_ctx;
        describe_types(m);
    }
    if (rc != KVR_OK)
        goto out;
    *out = m;
    m = NULL;
    rc = KVR_OK;
out:
    if (fd >= 0)
        close(fd);
    kvr_model_free(m);
    return rc;
}

int kvr_model_load_memory(const void *buf, size_t len, const char *name, const struct kvr_model_params *p,
                          struct kvr_model **out) {
    *out = NULL;
    struct kvr_model_params mp = *p;
    mp.mode = KVR_WEIGHTS_MMAP;
    if (!buf || (uintptr_t)buf % 8) {
        KVR_LOG_ERROR("model image '%s' is not 8-byte aligned", name ? name : "(memory)");
        return KVR_EINVAL;
    }
    struct kvr_model *m = calloc(1, sizeof *m);
    if (!m || !(m->path = strdup(name ? name : "(memory)"))) {
        free(m);
        return KVR_ENOMEM;
    }
    m->file = buf;
    m->file_nbytes = len;
    int rc = len < 4 ? KVR_ETRUNC : build(m, &mp, -1);
    if (len < 4)
        KVR_LOG_ERROR("model '%s' is %zu bytes: shorter than the 28-byte header of a llama2.c "
                      "checkpoint and than a GGUF header", m->path, len);
    if (rc != KVR_OK) {
        kvr_model_free(m);
        return rc;
    }
    *out = m;
    return KVR_OK;
}

void kvr_model_free(struct kvr_model *m) {
    if (!m)
        return;
    kvr_gguf_free(m->gguf);
    if (m->map_owned && m->file)
        munmap((void *)(uintptr_t)m->file, m->file_nbytes);
    kvr_huge_free(m->copy, m->copy_nbytes);
    free(m->w.layers);
    free(m->path);
    free(m);
}

const struct kvr_model_config *kvr_model_config(const struct kvr_model *m) { return &m->config; }

const struct kvr_model_weights *kvr_model_weights(const struct kvr_model *m) { return &m->w; }

const char *kvr_model_types(const struct kvr_model *m) { return m->types; }

int kvr_model_tokenizer(const struct kvr_model *m, struct kvr_tokenizer **out) {
    *out = NULL;
    if (!m->gguf)
        return KVR_ENOENT;
    return kvr_gguf_tokenizer(m->gguf, out);
}

int kvr_model_load_tokenizer(const struct kvr_model *m, const char *tokenizer_path, struct kvr_tokenizer **out) {
    *out = NULL;
    if (tokenizer_path && *tokenizer_path)
        return kvr_tokenizer_load(tokenizer_path, m->config.vocab_size, out);
    if (!m->gguf) {
        KVR_LOG_ERROR("model '%s' is a llama2.c checkpoint: its tokenizer is a separate file (pass "
                      "--tokenizer tokenizer.bin)", m->path);
        return KVR_ENOENT;
    }
    int rc = kvr_gguf_tokenizer(m->gguf, out);
    if (rc == KVR_ENOENT)
        KVR_LOG_ERROR("model '%s' holds no tokenizer (no tokenizer.ggml.* metadata): pass --tokenizer", m->path);
    return rc;
}

/* ---- sizes and the fingerprint ---------------------------------------------------------- */

static uint64_t tensor_nbytes(const struct kvr_tensor *t) { return (uint64_t)t->rows * t->row_nbytes; }

static uint64_t layer_nbytes(const struct kvr_model *m, int l) {
    const struct kvr_layer_weights *lw = &m->w.layers[l];
    return 2 * (uint64_t)m->config.dim * sizeof(float) + tensor_nbytes(&lw->wq) + tensor_nbytes(&lw->wk) +
           tensor_nbytes(&lw->wv) + tensor_nbytes(&lw->wo) + tensor_nbytes(&lw->w1) + tensor_nbytes(&lw->w2) +
           tensor_nbytes(&lw->w3);
}

uint64_t kvr_model_n_params(const struct kvr_model *m) {
    const struct kvr_model_config *c = &m->config;
    uint64_t d = (uint64_t)c->dim, h = (uint64_t)c->hidden_dim, L = (uint64_t)c->n_layers;
    uint64_t kv = (uint64_t)c->kv_dim, v = (uint64_t)c->vocab_size;
    uint64_t per_layer = 2 * d + 2 * d * d + 2 * kv * d + 3 * h * d;
    return v * d + L * per_layer + d + (c->shared_classifier ? 0 : v * d);
}

uint64_t kvr_model_step_nbytes(const struct kvr_model *m) {
    uint64_t n = (uint64_t)m->config.dim * sizeof(float) + tensor_nbytes(&m->w.wcls);
    for (int l = 0; l < m->config.n_layers; l++)
        n += layer_nbytes(m, l);
    return n;
}

/* A simple 4-lane multiply-rotate hash: fast enough to fingerprint gigabytes of weights
 * at startup (memory-bound), not cryptographic. */
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

uint64_t kvr_hash64(const void *data, size_t len, uint64_t seed) {
    const uint64_t P1 = 0x9E3779B185EBCA87ull, P2 = 0xC2B2AE3D27D4EB4Full;
    const unsigned char *b = data;
    uint64_t h[4] = {seed + P1, seed ^ P2, seed + 0x165667B19E3779F9ull, seed - P1};
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
        for (int l = 0; l < 4; l++) {
            uint64_t w;
            memcpy(&w, b + i + 8 * (size_t)l, 8);
            h[l] = rotl64(h[l] + w * P2, 31) * P1;
        }
    }
    uint64_t acc = rotl64(h[0], 1) + rotl64(h[1], 7) + rotl64(h[2], 12) + rotl64(h[3], 18);
    for (; i < len; i++)
        acc = rotl64(acc ^ (b[i] * P1), 11) * P2;
    acc ^= (uint64_t)len;
    acc ^= acc >> 33;
    acc *= P2;
    acc ^= acc >> 29;
    acc *= 0x165667B19E3779F9ull;
    acc ^= acc >> 32;
    return acc;
}

uint64_t kvr_model_fingerprint(struct kvr_model *m) {
    if (!m->have_fingerprint) {
        /* What comes before the weights (llama2.c: the header; GGUF: header, metadata and
         * tensor infos), then the weights: every byte of the file, the same value whichever
         * way the weights are held. */
        uint64_t seed = 0x6b7672656c6179ull; /* "kvrelay" */
        uint64_t h = m->gguf ? kvr_hash64(m->file, m->data_off, seed)
                             : kvr_hash64(m->header, sizeof m->header, seed);
        m->fingerprint = kvr_hash64(m->data, m->file_nbytes - m->data_off, h);
        m->have_fingerprint = 1;
    }
    return m->fingerprint;
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Writes n floats: constant `value` if random == 0, else uniform in [-a, a]. */
static int write_tensor(FILE *f, uint64_t n, int random, float a, float value, uint64_t *rng) {
    float buf[4096];
    while (n) {
        size_t k = n < 4096 ? (size_t)n : 4096;
        for (size_t i = 0; i < k; i++) {
            if (random) {
                float u = (float)(splitmix64(rng) >> 40) * (1.0f / 16777216.0f);
                buf[i] = (2.0f * u - 1.0f) * a;
            } else {
                buf[i] = value;
            }
        }
        if (fwrite(buf, sizeof(float), k, f) != k)
            return KVR_EIO;
        n -= k;
    }
    return KVR_OK;
}

int kvr_model_write_synthetic(const char *path, const struct kvr_model_config *cin, uint64_t seed) {
    struct kvr_model_config c = *cin;
    const char *why = NULL;
    if (!kvr_model_expected_nbytes(&c, &why)) {
        KVR_LOG_ERROR("bad synthetic shape: %s", why);
        return KVR_EINVAL;
    }
    fill_derived(&c);
    FILE *f = fopen(path, "wb");
    if (!f) {
        KVR_LOG_ERROR("cannot create '%s': %s", path, strerror(errno));
        return KVR_EIO;
    }
    int32_t hdr[7] = {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                      c.shared_classifier ? c.vocab_size : -c.vocab_size, c.seq_len};
    uint64_t rng = seed;
    uint64_t d = (uint64_t)c.dim, h = (uint64_t)c.hidden_dim, L = (uint64_t)c.n_layers;
    uint64_t kv = (uint64_t)c.kv_dim, v = (uint64_t)c.vocab_size;
    /* Uniform in [-a, a] has std a/sqrt(3); scale by fan-in so activations stay O(1). */
    float a_d = 1.7320508f / sqrtf((float)c.dim), a_h = 1.7320508f / sqrtf((float)c.hidden_dim);
    int rc = fwrite(hdr, sizeof hdr, 1, f) == 1 ? KVR_OK : KVR_EIO;
    struct {
        uint64_t n;
        int random;
        float a, value;
    } t[] = {
        {v * d, 1, 1.0f, 0},           /* token_embedding */
        {L * d, 0, 0, 1.0f},           /* rms_att */
        {L * d * d, 1, a_d, 0},        /* wq */
        {L * kv * d, 1, a_d, 0},       /* wk */
        {L * kv * d, 1, a_d, 0},       /* wv */
        {L * d * d, 1, a_d, 0},        /* wo */
        {L * d, 0, 0, 1.0f},           /* rms_ffn */
        {L * h * d, 1, a_d, 0},        /* w1 */
        {L * d * h, 1, a_h, 0},        /* w2 */
        {L * h * d, 1, a_d, 0},        /* w3 */
        {d, 0, 0, 1.0f},               /* rms_final */
        {(uint64_t)c.seq_len * (uint64_t)c.head_dim, 0, 0, 0}, /* legacy RoPE tables */
        {c.shared_classifier ? 0 : v * d, 1, a_d, 0},         /* wcls */
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0] && rc == KVR_OK; i++)
        rc = write_tensor(f, t[i].n, t[i].random, t[i].a, t[i].value, &rng);
    if (fclose(f) != 0 && rc == KVR_OK)
        rc = KVR_EIO;
    if (rc != KVR_OK) {
        KVR_LOG_ERROR("cannot write '%s': %s", path, strerror(errno));
        unlink(path);
    }
    return rc;
}
