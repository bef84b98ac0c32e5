/* model.h - llama2.c checkpoints: validated, memory-mapped, read-only weights.
 * Format: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
 * seq_len; a negative vocab_size means a separate classifier follows), then float32
 * tensors in llama2.c order. More formats (GGUF) would come in behind kvr_model_load. */
#ifndef KVR_MODEL_H
#define KVR_MODEL_H

#include <stddef.h>
#include <stdint.h>

struct kvr_model_config {
    int dim;               /* model width */
    int hidden_dim;        /* FFN width */
    int n_layers;
    int n_heads;           /* query heads */
    int n_kv_heads;        /* K/V heads; n_heads % n_kv_heads == 0 (MHA, GQA, MQA) */
    int vocab_size;        /* always positive here */
    int seq_len;           /* trained context */
    int shared_classifier; /* 1: logits use token_embedding */
    int head_dim;          /* dim / n_heads */
    int kv_dim;            /* n_kv_heads * head_dim */
};

/* Borrowed views into the mapping; shapes are (out, in) row-major as in llama2.c. */
struct kvr_model_weights {
    const float *token_embedding; /* (vocab, dim) */
    const float *rms_att;         /* (n_layers, dim) */
    const float *wq;              /* (n_layers, dim, dim) */
    const float *wk;              /* (n_layers, kv_dim, dim) */
    const float *wv;              /* (n_layers, kv_dim, dim) */
    const float *wo;              /* (n_layers, dim, dim) */
    const float *rms_ffn;         /* (n_layers, dim) */
    const float *w1;              /* (n_layers, hidden, dim) */
    const float *w2;              /* (n_layers, dim, hidden) */
    const float *w3;              /* (n_layers, hidden, dim) */
    const float *rms_final;       /* (dim) */
    const float *wcls;            /* (vocab, dim); == token_embedding when shared */
};

struct kvr_model;

/* How the weights are held. */
enum kvr_weights_mode {
    KVR_WEIGHTS_MMAP = 0, /* mmap of the file: shared page cache, loaded lazily */
    KVR_WEIGHTS_COPY = 1, /* read into private, aligned, huge-page memory: faster decode,
                           * one copy per process */
};

#define KVR_WEIGHTS_CHOICES "mmap|copy"

/* Maps and validates the checkpoint at path. Errors (each logged in one line naming
 * the file): KVR_ENOENT missing/unreadable, KVR_ETRUNC shorter than its header says,
 * KVR_EFORMAT bad header (zero/negative dimension, dim % n_heads, n_heads % n_kv_heads,
 * odd head_dim, longer than its header says). Returns owned *out, free with kvr_model_free. */
int kvr_model_load(const char *path, struct kvr_model **out);

/* kvr_model_load with a choice of how the weights are held (same checks, same errors;
 * KVR_ENOMEM when the copy cannot be allocated). */
int kvr_model_load_mode(const char *path, enum kvr_weights_mode mode, struct kvr_model **out);

/* Unmaps. Accepts NULL. */
void kvr_model_free(struct kvr_model *m);

/* Borrowed until kvr_model_free. */
const struct kvr_model_config *kvr_model_config(const struct kvr_model *m);
const struct kvr_model_weights *kvr_model_weights(const struct kvr_model *m);

/* Number of parameters (weights, including the classifier when separate). */
uint64_t kvr_model_n_params(const struct kvr_model *m);

/* Bytes of weights streamed by one decode step (all layers + final norm + classifier). */
uint64_t kvr_model_step_nbytes(const struct kvr_model *m);

/* 64-bit fingerprint of config and all weight bytes, computed once on first call and
 * cached (first call not thread-safe: call it at startup). Equal models, equal prints. */
uint64_t kvr_model_fingerprint(struct kvr_model *m);

/* Expected checkpoint size in bytes for a config, or 0 if the config is invalid.
 * why (may be NULL) receives a static reason when invalid. */
uint64_t kvr_model_expected_nbytes(const struct kvr_model_config *c, const char **why);

/* Writes a random-weight checkpoint (weights ~ uniform with std 0.02 scaled, norms 1)
 * with the given shape. Deterministic in seed. KVR_EINVAL for a bad shape, KVR_EIO. */
int kvr_model_write_synthetic(const char *path, const struct kvr_model_config *c, uint64_t seed);

/* 64-bit hash of a byte range, used for model fingerprints (the KV wire format checksums
 * with XXH3-64 since its version 2: kvr_wire_hash in kv_wire.h). */
uint64_t kvr_hash64(const void *data, size_t len, uint64_t seed);

#endif /* KVR_MODEL_H */
