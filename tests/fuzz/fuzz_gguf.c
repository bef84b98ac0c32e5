/* fuzz_gguf.c - libFuzzer harness for the GGUF reader and model loader
 * (kvr_model_load_memory: common/gguf.c and model.c) and what a loaded model exposes: its
 * tokenizer from the metadata, every weight row, the fingerprint, and for small models one
 * forward pass through the engine. Built only with -DKVR_FUZZ=ON and clang;
 * scripts/fuzz.sh runs it on seeds from fuzz_gguf_seeds.c.
 *
 * The input is a file image, copied into an allocation of exactly its size so that the
 * sanitizers see any read past it. Oracles beyond them: a model that loads has a sane
 * config, and every tensor view lies inside the image. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "quant.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static float *row_buf;
#define ROW_MAX (1 << 16) /* floats: the widest row checked */

static void quiet(void *ud, int level, const char *line) {
    (void)ud;
    (void)level;
    (void)line;
}

static void inside(const struct kvr_tensor *t, const uint8_t *buf, size_t size) {
    const uint8_t *p = t->data;
    if (t->rows < 1 || t->cols < 1 || p < buf || (size_t)(p - buf) > size ||
        (uint64_t)t->rows * t->row_nbytes > size - (size_t)(p - buf))
        abort();
    if (t->row_nbytes != kvr_dtype_row_nbytes(t->type, t->cols))
        abort();
    if (t->cols <= ROW_MAX) {
        kvr_tensor_row(t, 0, row_buf);
        kvr_tensor_row(t, t->rows - 1, row_buf);
    }
}

static void forward(struct kvr_model *m) {
    const struct kvr_model_config *c = kvr_model_config(m);
    struct kvr_kv_pool_params pp = {.n_layers = c->n_layers, .kv_dim = c->kv_dim, .block_tokens = 4,
                                    .budget_nbytes = 64 * 1024};
    struct kvr_kv_seq_params sp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = 4};
    struct kvr_engine_params ep = {.model = m, .n_threads = 1, .n_batch_tokens_max = 2, .n_items_max = 1,
                                   .n_ctx_max = 4};
    struct kvr_kv_pool *pool = NULL;
    struct kvr_kv_seq *seq = NULL;
    struct kvr_engine *e = NULL;
    float *logits = malloc((size_t)c->vocab_size * sizeof *logits);
    if (logits && kvr_kv_pool_create(&pp, &pool) == KVR_OK && kvr_kv_seq_create(pool, &sp, &seq) == KVR_OK &&
        kvr_engine_create(&ep, &e) == KVR_OK) {
        int toks[2] = {0, c->vocab_size - 1};
        struct kvr_forward_item it = {.seq = seq, .tokens = toks, .n_tokens = 2, .logits = logits};
        if (kvr_engine_forward(e, &it, 1) != KVR_OK)
            abort(); /* the pool was sized for it */
    }
    kvr_engine_free(e);
    kvr_kv_seq_free(seq);
    kvr_kv_pool_free(pool);
    free(logits);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int init;
    if (!init) {
        kvr_log_set_sink(quiet, NULL);
        kvr_log_set_level(KVR_LOG_LEVEL_DEBUG); /* format every line: hostile bytes reach them */
        row_buf = malloc(ROW_MAX * sizeof *row_buf);
        if (!row_buf)
            abort();
        init = 1;
    }
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    struct kvr_model *m = NULL;
    /* A small context: every check of the file's own still runs; the engine below then
     * sizes its RoPE table for 64 positions, not for the millions a file may claim. */
    struct kvr_model_params p = {.n_ctx = 64};
    if (kvr_model_load_memory(buf, size, "fuzz.gguf", &p, &m) == KVR_OK) {
        const struct kvr_model_config *c = kvr_model_config(m);
        if (c->dim < 1 || c->n_heads < 1 || c->dim % c->n_heads || c->n_heads % c->n_kv_heads ||
            c->head_dim * c->n_heads != c->dim || c->n_rot < 2 || c->n_rot > c->head_dim || c->n_rot % 2 ||
            c->vocab_size < 1 || c->seq_len < 1 || !(c->norm_eps > 0) || !(c->rope_theta > 0) ||
            c->bos_id >= c->vocab_size || c->eos_id >= c->vocab_size)
            abort();
        const struct kvr_model_weights *w = kvr_model_weights(m);
        inside(&w->token_embedding, buf, size);
        inside(&w->wcls, buf, size);
        for (int l = 0; l < c->n_layers; l++) {
            const struct kvr_layer_weights *lw = &w->layers[l];
            const struct kvr_tensor *mt[7] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w1, &lw->w2, &lw->w3};
            for (int k = 0; k < 7; k++)
                inside(mt[k], buf, size);
            if ((const uint8_t *)lw->rms_att < buf || (const uint8_t *)lw->rms_ffn < buf)
                abort();
        }
        (void)kvr_model_fingerprint(m);
        struct kvr_tokenizer *t = NULL;
        if (kvr_model_tokenizer(m, &t) == KVR_OK) {
            if (kvr_tokenizer_vocab_size(t) != c->vocab_size)
                abort();
            int ids[64], n = 0;
            if (kvr_tokenizer_encode(t, "Once upon a time \xc3\xa9\x01", 1, 1, ids, 64, &n) == KVR_OK)
                for (int i = 1; i < n; i++)
                    if (ids[i] < 0 || ids[i] >= c->vocab_size || !kvr_tokenizer_piece_safe(t, ids[i - 1], ids[i]))
                        abort();
            kvr_tokenizer_free(t);
        }
        if (kvr_model_n_params(m) <= (1u << 18))
            forward(m);
        kvr_model_free(m);
    }
    free(buf);
    return 0;
}
