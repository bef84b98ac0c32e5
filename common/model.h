/* model.h - the model behind every role: validated, memory-mapped, read-only weights.
 * Two file formats, told apart by the file's first bytes:
 *  - llama2.c checkpoints: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 *    vocab_size, seq_len; a negative vocab_size means a separate classifier follows), then
 *    float32 tensors in llama2.c order; the tokenizer is a separate tokenizer.bin.
 *  - GGUF files (versions 2 and 3, `llama` architecture, docs/GGUF.md): hyperparameters
 *    from the metadata, tensors by name in F32, F16, BF16 or Q8_0 (mixed within a file),
 *    the tokenizer in the metadata (kvr_model_tokenizer).
 * Either way the weights stay in the file's types (quant.h): a Q8_0 file stays Q8_0 in
 * memory, and the engine computes in each matrix's type. */
#ifndef KVR_MODEL_H
#define KVR_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "quant.h"

struct kvr_tokenizer;

enum kvr_model_format {
    KVR_MODEL_LLAMA2C = 0,
    KVR_MODEL_GGUF = 1,
};

struct kvr_model_config {
    int dim;               /* model width */
    int hidden_dim;        /* FFN width */
    int n_layers;
    int n_heads;           /* query heads */
    int n_kv_heads;        /* K/V heads; n_heads % n_kv_heads == 0 (MHA, GQA, MQA) */
    int vocab_size;        /* always positive here */
    int seq_len;           /* context in tokens: the file's, or the --context override */
    int shared_classifier; /* 1: logits use token_embedding (no separate classifier) */
    int head_dim;          /* dim / n_heads */
    int kv_dim;            /* n_kv_heads * head_dim */
    int n_rot;             /* RoPE: leading features of each head rotated (even, <= head_dim) */
    float rope_theta;      /* RoPE frequency base (10000 in llama2.c) */
    float norm_eps;        /* RMSNorm epsilon (1e-5 in llama2.c) */
    int bos_id, eos_id;    /* begin/end-of-sequence token ids (1 and 2 in llama2.c) */
    int seq_len_file;      /* the context the file states, before any override */
    enum kvr_model_format format;
};

/* The weights of one layer. Matrices are (out, in) row-major as in llama2.c. */
struct kvr_layer_weights {
    const float *rms_att;  /* (dim) float32 */
    const float *rms_ffn;  /* (dim) float32 */
    struct kvr_tensor wq;  /* (dim, dim) */
    struct kvr_tensor wk;  /* (kv_dim, dim) */
    struct kvr_tensor wv;  /* (kv_dim, dim) */
    struct kvr_tensor wo;  /* (dim, dim) */
    struct kvr_tensor w1;  /* (hidden, dim): FFN gate */
    struct kvr_tensor w2;  /* (dim, hidden): FFN down */
    struct kvr_tensor w3;  /* (hidden, dim): FFN up */
};

/* Borrowed views into the mapping (or the private copy). */
struct kvr_model_weights {
    struct kvr_tensor token_embedding; /* (vocab, dim) */
    struct kvr_layer_weights *layers;  /* (n_layers) */
    const float *rms_final;            /* (dim) float32 */
    struct kvr_tensor wcls;            /* (vocab, dim); the embedding itself when shared */
};

struct kvr_model;

/* How the weights are held. */
enum kvr_weights_mode {
    KVR_WEIGHTS_MMAP = 0, /* mmap of the file: shared page cache, loaded lazily */
    KVR_WEIGHTS_COPY = 1, /* read into private, aligned, huge-page memory: faster decode,
                           * one copy per process */
};

#define KVR_WEIGHTS_CHOICES "mmap|copy"

/* How to load. Zero-initialized: mmap, the file's context. */
struct kvr_model_params {
    enum kvr_weights_mode mode;
    int n_ctx; /* > 0: the context (seq_len) to run at instead of the file's (--context) */
};

/* Largest --context accepted. */
#define KVR_MODEL_CTX_MAX (1 << 22)

/* Maps and validates the model file at path (either format, by its first bytes). Errors,
 * each logged in one line naming the file, what is wrong and where: KVR_ENOENT
 * missing/unreadable; KVR_ETRUNC shorter than its contents say; KVR_EFORMAT malformed
 * (bad header, bad counts or strings, tensors overlapping or outside the data, misaligned
 * offsets, missing keys or tensors, not this format); KVR_EVERSION a GGUF version other
 * than 2 or 3; KVR_ENOTSUP a GGUF architecture, tensor type or feature the engine does not
 * run; KVR_ESHAPE a tensor whose shape disagrees with the metadata; KVR_EINVAL a bad
 * n_ctx; KVR_ENOMEM. Returns owned *out, free with kvr_model_free. */
int kvr_model_load_params(const char *path, const struct kvr_model_params *p,
                          struct kvr_model **out);

/* kvr_model_load_params with defaults, or with a choice of how the weights are held. */
int kvr_model_load(const char *path, struct kvr_model **out);
int kvr_model_load_mode(const char *path, enum kvr_weights_mode mode, struct kvr_model **out);

/* The same checks and model over a file image in memory (borrowed until kvr_model_free;
 * always "mmap" mode): for tests and the fuzzer. name appears in the error lines. */
int kvr_model_load_memory(const void *buf, size_t len, const char *name,
                          const struct kvr_model_params *p, struct kvr_model **out);

/* Unmaps. Accepts NULL. */
void kvr_model_free(struct kvr_model *m);

/* Borrowed until kvr_model_free. */
const struct kvr_model_config *kvr_model_config(const struct kvr_model *m);
const struct kvr_model_weights *kvr_model_weights(const struct kvr_model *m);

/* The tokenizer stored in the model file (GGUF tokenizer.ggml.*). KVR_ENOENT when the
 * file has none (llama2.c checkpoints: pass a tokenizer.bin), KVR_ENOTSUP for a
 * tokenizer model other than "llama", KVR_EFORMAT/KVR_ESHAPE for a malformed vocabulary
 * (logged). Returns owned *out, free with kvr_tokenizer_free. */
int kvr_model_tokenizer(const struct kvr_model *m, struct kvr_tokenizer **out);

/* The tokenizer for m: from tokenizer_path when given (a llama2.c tokenizer.bin, or the
 * vocabulary of a GGUF file), else from the model file itself. Errors as
 * kvr_tokenizer_load and kvr_model_tokenizer; a llama2.c checkpoint without a path is
 * KVR_ENOENT with a line saying a tokenizer is needed. */
int kvr_model_load_tokenizer(const struct kvr_model *m, const char *tokenizer_path,
                             struct kvr_tokenizer **out);

/* Number of parameters (weights, including the classifier when separate). */
uint64_t kvr_model_n_params(const struct kvr_model *m);

/* Bytes of weights streamed by one decode step (all layers + final norm + classifier), in
 * the weights' own types. */
uint64_t kvr_model_step_nbytes(const struct kvr_model *m);

/* 64-bit fingerprint of the model file (llama2.c: header and weights; GGUF: metadata and
 * tensor data, i.e. every byte), computed once on first call and cached (first call not
 * thread-safe: call it at startup). Equal files, equal prints; the context override is
 * not part of it (nodes compare contexts separately). */
uint64_t kvr_model_fingerprint(struct kvr_model *m);

/* Short description of the weight types, e.g. "Q8_0+F16+F32" (most used first); static
 * storage inside m. */
const char *kvr_model_types(const struct kvr_model *m);

/* Expected llama2.c checkpoint size in bytes for a config, or 0 if the config is invalid.
 * why (may be NULL) receives a static reason when invalid. */
uint64_t kvr_model_expected_nbytes(const struct kvr_model_config *c, const char **why);

/* Writes a random-weight llama2.c checkpoint (weights ~ uniform with std 0.02 scaled, norms 1)
 * with the given shape. Deterministic in seed. KVR_EINVAL for a bad shape, KVR_EIO. */
int kvr_model_write_synthetic(const char *path, const struct kvr_model_config *c, uint64_t seed);

/* 64-bit hash of a byte range, used for model fingerprints (the KV wire format checksums
 * with XXH3-64 since its version 2: kvr_wire_hash in kv_wire.h). */
uint64_t kvr_hash64(const void *data, size_t len, uint64_t seed);

#endif /* KVR_MODEL_H */
