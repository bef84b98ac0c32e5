/* test_gguf.c - GGUF models through kvr_model_load* (common/gguf.c, common/model.c):
 *  - the four bundled files: hyperparameters from the metadata, each tensor's type, the
 *    F32 file's tensors byte for byte the llama2.c checkpoint's, --context, mmap vs copy,
 *    the fingerprint (whole file), a tied classifier when output.weight is absent, and a
 *    file laid out differently (other alignment, tensor order, version 2) computing the
 *    same logits;
 *  - hostile files made from the real ones: truncated at every byte of the metadata and
 *    at every section boundary after it, bad magic and versions, counts and lengths near
 *    2^64, overlapping or outside or misaligned tensors, unknown types, shapes that
 *    disagree with the metadata, bad or missing keys and tensors. Each must fail with its
 *    status and exactly one error line naming the file and the problem; ASan (the
 *    sanitizer build of this suite) sees every read, as each image is exactly its length. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "gguf_edit.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

#define NAME "hostile.gguf"

static struct {
    int n_err;
    char last[2048];
} logcap;

static void sink(void *ud, int level, const char *line) {
    (void)ud;
    if (level == KVR_LOG_LEVEL_ERROR) {
        logcap.n_err++;
        snprintf(logcap.last, sizeof logcap.last, "%s", line);
    }
}

static const char *model_path(const char *type) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/models/gguf/stories260K-%s.gguf", KVR_SHARED_DIR, type);
    return buf[k];
}

/* Loads len bytes of img from an allocation of exactly len bytes. */
static int load_exact(const unsigned char *img, size_t len, struct kvr_model **m) {
    unsigned char *buf = malloc(len ? len : 1);
    REQUIRE(buf);
    memcpy(buf, img, len);
    logcap.n_err = 0;
    logcap.last[0] = '\0';
    struct kvr_model_params p = {0};
    int rc = kvr_model_load_memory(buf, len, NAME, &p, m);
    if (rc == KVR_OK) {
        kvr_model_free(*m);
        *m = NULL;
    }
    free(buf);
    return rc;
}

static int n_cases;

/* The image must be refused with status want, in exactly one error line naming the file
 * and holding phrase. */
static void expect_refused(const char *what, const unsigned char *img, size_t len, int want, const char *phrase) {
    struct kvr_model *m = NULL;
    int rc = load_exact(img, len, &m);
    int ok = rc == want && logcap.n_err == 1 && strstr(logcap.last, NAME) && strstr(logcap.last, phrase);
    if (!ok)
        fprintf(stderr, "  FAILED %s: status %s (want %s), %d error lines, last: %s\n    (want it to name '%s')\n",
                what, kvr_status_name(rc), kvr_status_name(want), logcap.n_err, logcap.last, phrase);
    CHECK(ok);
    if (ok) /* the message each case gets, for whoever reads the test's log */
        fprintf(stderr, "  %-40s %s\n", what, strstr(logcap.last, "model '") ? strstr(logcap.last, "model '") : logcap.last);
    n_cases++;
}

/* A copy of base, edited by fn, written with recomputed offsets, must be refused. */
static void expect_edit_refused(const char *what, const struct gg *base, void (*fn)(struct gg *), int want,
                                const char *phrase) {
    struct gg g;
    struct gg_layout lay;
    gg_copy(&g, base);
    fn(&g);
    unsigned char *img = gg_write(&g, 0, &lay);
    expect_refused(what, img, lay.len, want, phrase);
    free(img);
    gg_free(&g);
}

/* ---- the bundled files ------------------------------------------------------------------ */

static const struct kvr_tensor *matrix(const struct kvr_model_weights *w, int l, int k) {
    const struct kvr_layer_weights *lw = &w->layers[l];
    const struct kvr_tensor *t[7] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w1, &lw->w2, &lw->w3};
    return t[k];
}

static void test_real_files(void) {
    static const struct {
        const char *file;
        enum kvr_dtype mat, down, emb;
        const char *types;
    } files[] = {
        {"f32", KVR_DTYPE_F32, KVR_DTYPE_F32, KVR_DTYPE_F32, "F32"},
        {"f16", KVR_DTYPE_F16, KVR_DTYPE_F16, KVR_DTYPE_F16, "F16+F32"},
        {"bf16", KVR_DTYPE_BF16, KVR_DTYPE_BF16, KVR_DTYPE_BF16, "BF16+F32"},
        /* ffn_down's rows of 172 are not a multiple of 32: llama.cpp fell back to F16. */
        {"q8_0", KVR_DTYPE_Q8_0, KVR_DTYPE_F16, KVR_DTYPE_Q8_0, "Q8_0+F16+F32"},
    };
    struct kvr_model *ref = NULL;
    REQUIRE(kvr_model_load(shared_path("models/stories260K.bin"), &ref) == KVR_OK);
    const struct kvr_model_weights *rw = kvr_model_weights(ref);
    uint64_t prints[4];
    for (int f = 0; f < 4; f++) {
        struct kvr_model *m = NULL, *c = NULL, *x = NULL;
        REQUIRE(kvr_model_load(model_path(files[f].file), &m) == KVR_OK);
        const struct kvr_model_config *cf = kvr_model_config(m);
        CHECK_EQ(cf->format, KVR_MODEL_GGUF);
        CHECK_EQ(cf->dim, 64);
        CHECK_EQ(cf->hidden_dim, 172);
        CHECK_EQ(cf->n_layers, 5);
        CHECK_EQ(cf->n_heads, 8);
        CHECK_EQ(cf->n_kv_heads, 4);
        CHECK_EQ(cf->vocab_size, 512);
        CHECK_EQ(cf->seq_len, 128); /* the converter's value, not the trained 512 */
        CHECK_EQ(cf->seq_len_file, 128);
        CHECK_EQ(cf->head_dim, 8);
        CHECK_EQ(cf->kv_dim, 32);
        CHECK_EQ(cf->n_rot, 8);
        CHECK(cf->rope_theta == 10000.0f);
        CHECK(cf->norm_eps == 1e-5f);
        CHECK_EQ(cf->bos_id, 1);
        CHECK_EQ(cf->eos_id, 2);
        CHECK_EQ(cf->shared_classifier, 0); /* the converter writes output.weight */
        CHECK_STREQ(kvr_model_types(m), files[f].types);
        const struct kvr_model_weights *w = kvr_model_weights(m);
        CHECK_EQ(w->token_embedding.type, files[f].emb);
        CHECK_EQ(w->wcls.type, files[f].emb);
        for (int l = 0; l < cf->n_layers; l++)
            for (int k = 0; k < 7; k++)
                CHECK_EQ(matrix(w, l, k)->type, k == 5 ? files[f].down : files[f].mat);
        CHECK_EQ(kvr_model_n_params(m), kvr_model_n_params(ref) + 512 * 64); /* + output.weight */
        if (f == 0) {
            /* llama.cpp's converter copied llama2.c's tensors as they are (no q/k
             * permutation: both use adjacent-pair RoPE). */
            CHECK(memcmp(w->token_embedding.data, rw->token_embedding.data, 512 * 64 * 4) == 0);
            CHECK(memcmp(w->wcls.data, rw->token_embedding.data, 512 * 64 * 4) == 0);
            CHECK(memcmp(w->rms_final, rw->rms_final, 64 * 4) == 0);
            for (int l = 0; l < 5; l++) {
                CHECK(memcmp(w->layers[l].rms_att, rw->layers[l].rms_att, 64 * 4) == 0);
                CHECK(memcmp(w->layers[l].rms_ffn, rw->layers[l].rms_ffn, 64 * 4) == 0);
                for (int k = 0; k < 7; k++) {
                    const struct kvr_tensor *a = matrix(w, l, k), *b = matrix(rw, l, k);
                    CHECK(a->rows == b->rows && a->cols == b->cols);
                    CHECK(memcmp(a->data, b->data, (size_t)a->rows * a->row_nbytes) == 0);
                }
            }
        }
        /* A private copy: same config and bytes, aligned tensors, same fingerprint. */
        REQUIRE(kvr_model_load_mode(model_path(files[f].file), KVR_WEIGHTS_COPY, &c) == KVR_OK);
        CHECK(memcmp(kvr_model_config(c), cf, sizeof *cf) == 0);
        const struct kvr_model_weights *cw = kvr_model_weights(c);
        for (int l = 0; l < 5; l++)
            for (int k = 0; k < 7; k++) {
                const struct kvr_tensor *a = matrix(w, l, k), *b = matrix(cw, l, k);
                CHECK(a->data != b->data && memcmp(a->data, b->data, (size_t)a->rows * a->row_nbytes) == 0);
                CHECK_EQ((uintptr_t)b->data % 32, 0);
            }
        prints[f] = kvr_model_fingerprint(m);
        CHECK(prints[f] == kvr_model_fingerprint(c));
        /* --context: the file's value stays known, the model runs at the new one. */
        struct kvr_model_params p = {.n_ctx = 512};
        REQUIRE(kvr_model_load_params(model_path(files[f].file), &p, &x) == KVR_OK);
        CHECK_EQ(kvr_model_config(x)->seq_len, 512);
        CHECK_EQ(kvr_model_config(x)->seq_len_file, 128);
        CHECK(kvr_model_fingerprint(x) == prints[f]); /* same file */
        kvr_model_free(x);
        x = NULL;
        p.n_ctx = KVR_MODEL_CTX_MAX + 1;
        kvr_log_set_sink(sink, NULL);
        CHECK_EQ(kvr_model_load_params(model_path(files[f].file), &p, &x), KVR_EINVAL);
        kvr_log_set_sink(NULL, NULL);
        kvr_model_free(m);
        kvr_model_free(c);
    }
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            CHECK(prints[i] != prints[j]);
    /* The llama2.c checkpoint's --context too. */
    struct kvr_model *x = NULL;
    struct kvr_model_params p = {.n_ctx = 1000};
    REQUIRE(kvr_model_load_params(shared_path("models/stories260K.bin"), &p, &x) == KVR_OK);
    CHECK_EQ(kvr_model_config(x)->seq_len, 1000);
    CHECK_EQ(kvr_model_config(x)->seq_len_file, 512);
    CHECK(kvr_model_fingerprint(x) == kvr_model_fingerprint(ref));
    kvr_model_free(x);
    kvr_model_free(ref);
}

/* Logits of a short prompt, last position, for a model image in memory. */
static void logits_of(const unsigned char *img, size_t len, float *out) {
    struct kvr_model *m = NULL;
    struct kvr_model_params mp = {0};
    REQUIRE(kvr_model_load_memory(img, len, "edited.gguf", &mp, &m) == KVR_OK);
    const struct kvr_model_config *c = kvr_model_config(m);
    struct kvr_kv_pool_params pp = {.n_layers = c->n_layers, .kv_dim = c->kv_dim, .block_tokens = 16,
                                    .budget_nbytes = 1 << 20};
    struct kvr_kv_seq_params sp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = 64};
    struct kvr_engine_params ep = {.model = m, .n_threads = 1, .n_batch_tokens_max = 16, .n_items_max = 1,
                                   .n_ctx_max = 64};
    struct kvr_kv_pool *pool = NULL;
    struct kvr_kv_seq *seq = NULL;
    struct kvr_engine *e = NULL;
    REQUIRE(kvr_kv_pool_create(&pp, &pool) == KVR_OK && kvr_kv_seq_create(pool, &sp, &seq) == KVR_OK &&
            kvr_engine_create(&ep, &e) == KVR_OK);
    static const int toks[] = {1, 403, 407, 261, 378};
    struct kvr_forward_item it = {.seq = seq, .tokens = toks, .n_tokens = 5, .logits = out};
    REQUIRE(kvr_engine_forward(e, &it, 1) == KVR_OK);
    kvr_engine_free(e);
    kvr_kv_seq_free(seq);
    kvr_kv_pool_free(pool);
    kvr_model_free(m);
}

static void test_layouts(void) {
    /* The editor writes the files back byte for byte: llama.cpp's layout is ours. */
    const char *types[] = {"f32", "f16", "bf16", "q8_0"};
    for (int f = 0; f < 4; f++) {
        struct gg g;
        struct gg_layout lay;
        gg_read(model_path(types[f]), &g);
        unsigned char *img = gg_write(&g, 0, &lay);
        FILE *fp = fopen(model_path(types[f]), "rb");
        REQUIRE(fp);
        unsigned char *orig = malloc(lay.len + 1);
        REQUIRE(orig);
        size_t n = fread(orig, 1, lay.len + 1, fp);
        fclose(fp);
        CHECK(n == lay.len && memcmp(orig, img, n) == 0);
        free(orig);
        free(img);
        gg_free(&g);
    }

    struct gg base, g;
    struct gg_layout lay;
    gg_read(model_path("q8_0"), &base);
    unsigned char *img = gg_write(&base, 0, &lay);
    float want[512], got[512];
    logits_of(img, lay.len, want);
    free(img);

    /* Version 2, alignment 64, tensors in reverse order: the same model. */
    gg_copy(&g, &base);
    g.version = 2;
    g.alignment = 64;
    gg_set_u32(&g, "general.alignment", 64);
    for (int i = 0; i < g.n_t / 2; i++) {
        struct gg_tensor t = g.t[i];
        g.t[i] = g.t[g.n_t - 1 - i];
        g.t[g.n_t - 1 - i] = t;
    }
    img = gg_write(&g, 0, &lay);
    logits_of(img, lay.len, got);
    CHECK(memcmp(want, got, sizeof want) == 0);
    CHECK_EQ(lay.data_off % 64, 0);
    free(img);
    gg_free(&g);

    /* Without output.weight the classifier is the embedding (tied), and the model is
     * otherwise the same: the logits here are what the tied model gives, and since the
     * converter wrote output.weight as a copy of the embedding, the same values. */
    gg_copy(&g, &base);
    gg_del_t(&g, "output.weight");
    img = gg_write(&g, 0, &lay);
    struct kvr_model *m = NULL;
    struct kvr_model_params mp = {0};
    REQUIRE(kvr_model_load_memory(img, lay.len, "tied.gguf", &mp, &m) == KVR_OK);
    CHECK_EQ(kvr_model_config(m)->shared_classifier, 1);
    CHECK(kvr_model_weights(m)->wcls.data == kvr_model_weights(m)->token_embedding.data);
    CHECK_EQ(kvr_model_n_params(m), 512 * 64 + 5 * (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64) + 64);
    kvr_model_free(m);
    logits_of(img, lay.len, got);
    CHECK(memcmp(want, got, sizeof want) == 0);
    free(img);
    gg_free(&g);

    /* The fingerprint covers every byte: one in the metadata, one in the data. */
    img = gg_write(&base, 0, &lay);
    uint64_t fp[3];
    for (int k = 0; k < 3; k++) {
        if (k == 1)
            img[lay.header_end + 12] ^= 1; /* inside the first key's name */
        if (k == 2)
            img[lay.len - 3] ^= 1; /* the last tensor's last block */
        unsigned char *copy = malloc(lay.len);
        REQUIRE(copy);
        memcpy(copy, img, lay.len);
        m = NULL;
        if (kvr_model_load_memory(copy, lay.len, "print.gguf", &mp, &m) == KVR_OK)
            fp[k] = kvr_model_fingerprint(m);
        else
            fp[k] = 0;
        kvr_model_free(m);
        free(copy);
    }
    CHECK(fp[0] != 0 && fp[2] != 0 && fp[0] != fp[2]);
    CHECK(fp[0] != fp[1]); /* 0 when the flipped key no longer loads: different either way */
    free(img);
    gg_free(&base);
}

/* ---- hostile files -------------------------------------------------------------------------- */

static void test_truncated(void) {
    struct gg g;
    struct gg_layout lay;
    gg_read(model_path("q8_0"), &g);
    unsigned char *img = gg_write(&g, 0, &lay);
    int fails = 0, cuts = 0;
    /* Every byte of the header, metadata and tensor infos, then each section boundary
     * of the data (and its neighbours). */
    size_t *at = malloc((lay.data_off + 8 + 3 * (size_t)g.n_t) * sizeof *at);
    REQUIRE(at);
    size_t n_at = 0, data_end = 0;
    for (int i = 0; i < g.n_t; i++)
        data_end = lay.tensor_end[i] > data_end ? lay.tensor_end[i] : data_end;
    for (size_t i = 0; i <= lay.data_off; i++)
        at[n_at++] = i;
    for (int i = 0; i < g.n_t; i++) {
        at[n_at++] = lay.tensor_start[i] + 1;
        at[n_at++] = lay.tensor_end[i] - 1;
        if (lay.tensor_end[i] + 1 < data_end)
            at[n_at++] = lay.tensor_end[i] + 1;
    }
    at[n_at++] = data_end - 1;
    for (size_t i = 0; i < n_at; i++) {
        struct kvr_model *m = NULL;
        int rc = load_exact(img, at[i], &m);
        int ok = rc == KVR_ETRUNC && logcap.n_err == 1 && strstr(logcap.last, NAME) &&
                 (strstr(logcap.last, "truncated") || strstr(logcap.last, "shorter than"));
        if (!ok && fails++ < 5)
            fprintf(stderr, "  truncated at %zu of %zu: %s, %d lines: %s\n", at[i], lay.len, kvr_status_name(rc),
                    logcap.n_err, logcap.last);
        cuts++;
    }
    CHECK_EQ(fails, 0);
    fprintf(stderr, "truncated: %d cuts (every byte to the data section at %zu, then each tensor's edges), "
                    "%d not refused cleanly\n", cuts, lay.data_off, fails);
    /* The whole file loads (the cuts above are what make it fail), and so does the file
     * without the padding after its last tensor (it belongs to no tensor). */
    struct kvr_model *m = NULL;
    CHECK_EQ(load_exact(img, lay.len, &m), KVR_OK);
    CHECK(data_end < lay.len); /* the q8_0 file has such padding */
    CHECK_EQ(load_exact(img, data_end, &m), KVR_OK);
    free(at);
    free(img);
    gg_free(&g);
}

static void patch64(unsigned char *img, size_t at, uint64_t v) { memcpy(img + at, &v, 8); }
static void patch32(unsigned char *img, size_t at, uint32_t v) { memcpy(img + at, &v, 4); }

static void test_header_and_counts(const struct gg *base) {
    struct gg_layout lay;
    unsigned char *orig = gg_write(base, 0, &lay);
    unsigned char *img = malloc(lay.len);
    REQUIRE(img);
#define FRESH() memcpy(img, orig, lay.len)
    FRESH();
    memcpy(img, "GGUX", 4);
    expect_refused("bad magic", img, lay.len, KVR_EFORMAT, "not GGUF (magic 47 47 55 58)");
    const uint32_t bad_versions[] = {0, 1, 4, 0x7fffffffu};
    for (int i = 0; i < 4; i++) {
        FRESH();
        patch32(img, 4, bad_versions[i]);
        expect_refused("bad version", img, lay.len, KVR_EVERSION, "versions 2 and 3");
    }
    FRESH();
    patch32(img, 4, 0x03000000u);
    expect_refused("big-endian version", img, lay.len, KVR_EVERSION, "big-endian");
    FRESH();
    patch64(img, 16, UINT64_MAX);
    expect_refused("metadata count 2^64-1", img, lay.len, KVR_ETRUNC, "cannot fit");
    FRESH();
    patch64(img, 8, (uint64_t)1 << 63);
    expect_refused("tensor count 2^63", img, lay.len, KVR_ETRUNC, "cannot fit");
    FRESH();
    patch64(img, lay.header_end, UINT64_MAX - 7);
    expect_refused("key length near 2^64", img, lay.len, KVR_ETRUNC, "metadata key 0");
    FRESH();
    patch64(img, lay.header_end, 0);
    expect_refused("empty key", img, lay.len, KVR_EFORMAT, "name of 0 bytes");
    /* The first key is tokenizer.ggml.tokens in the bundled files: its array count. */
    REQUIRE(!strcmp(base->kv[0].key, "tokenizer.ggml.tokens"));
    size_t arr = lay.header_end + 8 + strlen(base->kv[0].key) + 4; /* element type, count */
    FRESH();
    patch64(img, arr + 4, UINT64_MAX);
    expect_refused("array count 2^64-1", img, lay.len, KVR_ETRUNC, "says 18446744073709551615 strings");
    FRESH();
    patch64(img, arr + 12, UINT64_MAX - 100); /* the first token's length */
    expect_refused("string length near 2^64", img, lay.len, KVR_ETRUNC, "element 0 of metadata key 0");
    FRESH();
    patch32(img, arr, 9);
    expect_refused("array of arrays", img, lay.len, KVR_ENOTSUP, "array of array");
    FRESH();
    patch32(img, arr - 4, 13);
    expect_refused("unknown value type", img, lay.len, KVR_EFORMAT, "value type 13");
    /* The first tensor info's offset field. */
    FRESH();
    patch64(img, lay.info_off_field[0], UINT64_MAX - 31);
    expect_refused("tensor offset near 2^64", img, lay.len, KVR_ETRUNC, "runs past the end");
    FRESH();
    patch64(img, lay.info_off_field[0], (lay.len - lay.data_off + 31) / 32 * 32);
    expect_refused("tensor just past the data", img, lay.len, KVR_ETRUNC, "runs past the end");
    FRESH();
    patch64(img, lay.info_off_field[1], 0); /* tensor 1 at tensor 0's place */
    expect_refused("overlapping tensors", img, lay.len, KVR_EFORMAT, "overlap");
    FRESH();
    patch64(img, lay.info_off_field[1], (lay.tensor_start[1] - lay.data_off) + 16);
    expect_refused("misaligned offset", img, lay.len, KVR_EFORMAT, "not a multiple of the alignment 32");
#undef FRESH
    free(img);
    free(orig);
}

/* ---- edits ------------------------------------------------------------------------------------- */

static int tq(struct gg *g) { return gg_find_t(g, "blk.0.attn_q.weight"); }

static void e_type_q4k(struct gg *g) { g->t[tq(g)].type = 12; }
static void e_type_99(struct gg *g) { g->t[tq(g)].type = 99; }
static void e_dims5(struct gg *g) { g->t[tq(g)].n_dims = 5; }
static void e_dim0(struct gg *g) {
    g->t[tq(g)].ne[1] = 0;
    g->t[tq(g)].nbytes = 0;
}
static void e_k_shape(struct gg *g) {
    int i = gg_find_t(g, "blk.2.attn_k.weight");
    g->t[i].ne[1] = 30; /* 30 rows of 64 Q8_0 values: 30 * 68 bytes */
    g->t[i].nbytes = 30 * 68;
}
static void e_q8_rows(struct gg *g) {
    int i = gg_find_t(g, "blk.0.ffn_down.weight"); /* F16 (172, 64) */
    g->t[i].type = 8;
    g->t[i].nbytes = 64 * 172 / 32 * 34; /* what it would need if 172 were a block multiple */
}
static void e_norm_f16(struct gg *g) {
    int i = gg_find_t(g, "blk.1.ffn_norm.weight");
    g->t[i].type = 1;
    g->t[i].nbytes = 128;
}
static void e_dim_meta(struct gg *g) { gg_set_u32(g, "llama.embedding_length", 128); }
static void e_ffn_meta(struct gg *g) { gg_set_u32(g, "llama.feed_forward_length", 170); }
static void e_heads_meta(struct gg *g) { gg_set_u32(g, "llama.attention.head_count_kv", 3); }
static void e_dup_key(struct gg *g) {
    gg_set_raw(g, "general.name.x", 8, g->kv[gg_find_kv(g, "general.name")].raw,
               g->kv[gg_find_kv(g, "general.name")].raw_len);
    free(g->kv[g->n_kv - 1].key);
    g->kv[g->n_kv - 1].key = strdup("general.name");
}
static void e_dup_tensor(struct gg *g) { strcpy(g->t[tq(g) + 1].name, g->t[tq(g)].name); }
static void e_bool2(struct gg *g) { gg_set_bool(g, "tokenizer.ggml.add_bos_token", 2); }
static void e_align0(struct gg *g) { gg_set_u32(g, "general.alignment", 0); }
static void e_align3(struct gg *g) { gg_set_u32(g, "general.alignment", 3); }
static void e_align_u64(struct gg *g) {
    uint64_t v = 32;
    gg_set_raw(g, "general.alignment", 10, &v, 8);
}
static void e_arch(struct gg *g) { gg_set_str(g, "general.architecture", "gpt2"); }
static void e_no_arch(struct gg *g) { gg_del_kv(g, "general.architecture"); }
static void e_no_dim(struct gg *g) { gg_del_kv(g, "llama.embedding_length"); }
static void e_no_eps(struct gg *g) { gg_del_kv(g, "llama.attention.layer_norm_rms_epsilon"); }
static void e_eps_neg(struct gg *g) { gg_set_f32(g, "llama.attention.layer_norm_rms_epsilon", -1.0f); }
static void e_ctx_str(struct gg *g) { gg_set_str(g, "llama.context_length", "512"); }
static void e_rot_odd(struct gg *g) { gg_set_u32(g, "llama.rope.dimension_count", 7); }
static void e_rot_big(struct gg *g) { gg_set_u32(g, "llama.rope.dimension_count", 16); }
static void e_experts(struct gg *g) { gg_set_u32(g, "llama.expert_count", 8); }
static void e_scaling(struct gg *g) { gg_set_str(g, "llama.rope.scaling.type", "linear"); }
static void e_extra_tensor(struct gg *g) { strcpy(g->t[gg_find_t(g, "blk.3.ffn_norm.weight")].name, "blk.3.attn_q.bias"); }
static void e_layer_past(struct gg *g) { strcpy(g->t[gg_find_t(g, "blk.3.ffn_norm.weight")].name, "blk.7.ffn_norm.weight"); }
static void e_missing(struct gg *g) { gg_del_t(g, "blk.4.ffn_up.weight"); }
static void e_no_emb(struct gg *g) { gg_del_t(g, "token_embd.weight"); }
static void e_vocab_meta(struct gg *g) { gg_set_u32(g, "llama.vocab_size", 500); }
static void e_tokens_count(struct gg *g) {
    /* Drop the last token of the vocabulary: 511 tokens for 512 embedding rows. */
    struct gg_kv *kv = &g->kv[gg_find_kv(g, "tokenizer.ggml.tokens")];
    uint64_t n;
    memcpy(&n, kv->raw + 4, 8);
    n--;
    memcpy(kv->raw + 4, &n, 8);
    size_t off = 12;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t l;
        memcpy(&l, kv->raw + off, 8);
        off += 8 + l;
    }
    kv->raw_len = off;
}
static void e_bos_range(struct gg *g) { gg_set_u32(g, "tokenizer.ggml.bos_token_id", 600); }

static void test_edits(const struct gg *base) {
    static const struct {
        const char *what;
        void (*fn)(struct gg *);
        int want;
        const char *phrase;
    } cases[] = {
        {"unknown type Q4_K", e_type_q4k, KVR_ENOTSUP, "tensor 'blk.0.attn_q.weight' has type Q4_K (12)"},
        {"unknown type 99", e_type_99, KVR_ENOTSUP, "tensor 'blk.0.attn_q.weight' has type unknown (99)"},
        {"5 dimensions", e_dims5, KVR_EFORMAT, "has 5 dimensions"},
        {"a dimension of 0", e_dim0, KVR_EFORMAT, "dimension 1 of 0"},
        {"attn_k shape against the metadata", e_k_shape, KVR_ESHAPE,
         "tensor 'blk.2.attn_k.weight' has shape [64, 30, 1, 1], the metadata says [64, 32]"},
        {"Q8_0 rows not a multiple of 32", e_q8_rows, KVR_EFORMAT, "not a multiple of its block of 32"},
        {"F16 norm", e_norm_f16, KVR_ENOTSUP, "norm tensor 'blk.1.ffn_norm.weight' is F16"},
        {"embedding_length against the tensors", e_dim_meta, KVR_ESHAPE, "the metadata says [128, 512]"},
        {"feed_forward_length against the tensors", e_ffn_meta, KVR_ESHAPE, "feed_forward_length"},
        {"head_count_kv not dividing head_count", e_heads_meta, KVR_EFORMAT, "not divisible by n_kv_heads"},
        {"duplicate key", e_dup_key, KVR_EFORMAT, "'general.name' appears twice"},
        {"duplicate tensor", e_dup_tensor, KVR_EFORMAT, "appears twice"},
        {"bool of 2", e_bool2, KVR_EFORMAT, "must be 0 or 1"},
        {"alignment 0", e_align0, KVR_EFORMAT, "general.alignment"},
        {"alignment 3", e_align3, KVR_EFORMAT, "power of two"},
        {"alignment as u64", e_align_u64, KVR_EFORMAT, "is 32 (a u64)"},
        {"architecture gpt2", e_arch, KVR_ENOTSUP, "architecture 'gpt2'"},
        {"no architecture", e_no_arch, KVR_EFORMAT, "'general.architecture' is missing"},
        {"no embedding_length", e_no_dim, KVR_EFORMAT, "'llama.embedding_length' is missing"},
        {"no rms epsilon", e_no_eps, KVR_EFORMAT, "'llama.attention.layer_norm_rms_epsilon' is missing"},
        {"negative epsilon", e_eps_neg, KVR_EFORMAT, "layer_norm_rms_epsilon' is -1"},
        {"context_length as a string", e_ctx_str, KVR_EFORMAT, "'llama.context_length' is of type string"},
        {"odd rope dimensions", e_rot_odd, KVR_EFORMAT, "dimension_count 7 is odd"},
        {"rope dimensions past the head", e_rot_big, KVR_EFORMAT, "'llama.rope.dimension_count' is 16"},
        {"mixture of experts", e_experts, KVR_ENOTSUP, "mixture of 8 experts"},
        {"rope scaling", e_scaling, KVR_ENOTSUP, "RoPE scaling 'linear'"},
        {"a tensor llama does not have", e_extra_tensor, KVR_ENOTSUP, "'blk.3.attn_q.bias' is not part"},
        {"a layer past block_count", e_layer_past, KVR_ENOTSUP, "'blk.7.ffn_norm.weight' is not part"},
        {"a missing tensor", e_missing, KVR_EFORMAT, "'blk.4.ffn_up.weight' is missing"},
        {"no embedding", e_no_emb, KVR_EFORMAT, "'token_embd.weight' is missing"},
        {"vocab_size against the embedding", e_vocab_meta, KVR_ESHAPE, "llama.vocab_size is 500"},
        {"vocabulary against the embedding", e_tokens_count, KVR_ESHAPE, "has 511 tokens"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_edit_refused(cases[i].what, base, cases[i].fn, cases[i].want, cases[i].phrase);

    /* Alignment 2 is legal, but an F32 tensor must still start on 4 bytes: offsets set
     * so that output_norm.weight starts 2 bytes past a multiple of 4 in the file. */
    struct gg a2;
    struct gg_layout l2;
    gg_copy(&a2, base);
    a2.alignment = 2;
    gg_set_u32(&a2, "general.alignment", 2);
    unsigned char *first = gg_write(&a2, 0, &l2); /* offsets do not change the infos' size */
    free(first);
    uint64_t off = 0;
    for (int i = 0; i < a2.n_t; i++) {
        int f32 = !strcmp(a2.t[i].name, "output_norm.weight");
        while ((l2.data_off + off) % 4 != (f32 ? 2u : 0u))
            off += 2;
        a2.t[i].offset = off;
        off += (a2.t[i].nbytes + 1) / 2 * 2;
    }
    unsigned char *bad = gg_write(&a2, 1, &l2);
    expect_refused("F32 tensor misaligned for its type", bad, l2.len, KVR_EFORMAT,
                   "'output_norm.weight' starts at file offset");
    free(bad);
    gg_free(&a2);

    /* A BOS id outside the vocabulary only matters to the tokenizer: the model loads
     * (BOS "none"), building its tokenizer fails naming the key. */
    struct gg g;
    gg_copy(&g, base);
    e_bos_range(&g);
    struct gg_layout lay;
    unsigned char *img = gg_write(&g, 0, &lay);
    struct kvr_model *m = NULL;
    struct kvr_tokenizer *t = NULL;
    struct kvr_model_params mp = {0};
    REQUIRE(kvr_model_load_memory(img, lay.len, NAME, &mp, &m) == KVR_OK);
    CHECK_EQ(kvr_model_config(m)->bos_id, -1);
    logcap.n_err = 0;
    CHECK_EQ(kvr_model_tokenizer(m, &t), KVR_ESHAPE);
    CHECK(logcap.n_err == 1 && strstr(logcap.last, "bos_token_id is 600"));
    kvr_model_free(m);
    free(img);
    gg_free(&g);
}

/* A prompt's logits do not depend on what else is in its forward call (docs/GGUF.md): prompt rows take the prefill GEMM path, decode rows the per-value
 * kernels, chosen per item, never by the call's total rows. Bit for bit, with a thread
 * pool, for each weight type of the bundled files. */
static void test_prompt_batching(void) {
    static const int A[12] = {1, 403, 407, 261, 378, 300, 290, 411, 266, 301, 280, 412};
    static const int B[7] = {1, 320, 310, 299, 285, 401, 270};
    /* Not F32: its classifier and decode rows run kernels chosen by the call's rows. */
    const char *types[] = {"f16", "bf16", "q8_0"};
    int n_differ = 0;
    for (int f = 0; f < 3; f++) {
        struct kvr_model *m = NULL;
        struct kvr_model_params mp = {0};
        REQUIRE(kvr_model_load_params(model_path(types[f]), &mp, &m) == KVR_OK);
        const struct kvr_model_config *c = kvr_model_config(m);
        int V = c->vocab_size;
        struct kvr_kv_pool_params pp = {.n_layers = c->n_layers, .kv_dim = c->kv_dim, .block_tokens = 16,
                                        .budget_nbytes = 4 << 20};
        struct kvr_kv_seq_params sp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = 64};
        struct kvr_engine_params ep = {.model = m, .n_threads = 2, .n_batch_tokens_max = 64, .n_items_max = 3,
                                       .n_ctx_max = 64};
        struct kvr_kv_pool *pool = NULL;
        struct kvr_kv_seq *s[4] = {0};
        struct kvr_engine *e = NULL;
        REQUIRE(kvr_kv_pool_create(&pp, &pool) == KVR_OK && kvr_engine_create(&ep, &e) == KVR_OK);
        for (int i = 0; i < 4; i++)
            REQUIRE(kvr_kv_seq_create(pool, &sp, &s[i]) == KVR_OK);
        float *alone = malloc((size_t)13 * V * sizeof *alone), *got = malloc((size_t)13 * V * sizeof *got);
        float *other = malloc((size_t)8 * V * sizeof *other);
        REQUIRE(alone && got && other);
        /* A alone, then one decode step. */
        struct kvr_forward_item it = {.seq = s[0], .tokens = A, .n_tokens = 12, .logits = alone,
                                      .all_logits = 1, .prompt = 1};
        REQUIRE(kvr_engine_forward(e, &it, 1) == KVR_OK);
        static const int next = 333;
        it = (struct kvr_forward_item){.seq = s[0], .tokens = &next, .n_tokens = 1, .logits = alone + (size_t)12 * V};
        REQUIRE(kvr_engine_forward(e, &it, 1) == KVR_OK);
        /* C: a sequence one step into decode. */
        it = (struct kvr_forward_item){.seq = s[1], .tokens = B, .n_tokens = 3, .prompt = 1};
        REQUIRE(kvr_engine_forward(e, &it, 1) == KVR_OK);
        /* B (a prompt), C (a decode row) and A in one call, then A's decode step with B's. */
        struct kvr_forward_item three[3] = {
            {.seq = s[2], .tokens = B, .n_tokens = 7, .logits = other, .all_logits = 1, .prompt = 1},
            {.seq = s[1], .tokens = &B[3], .n_tokens = 1, .logits = other + (size_t)7 * V},
            {.seq = s[3], .tokens = A, .n_tokens = 12, .logits = got, .all_logits = 1, .prompt = 1}};
        REQUIRE(kvr_engine_forward(e, three, 3) == KVR_OK);
        struct kvr_forward_item two[2];
        two[0] = (struct kvr_forward_item){.seq = s[2], .tokens = &next, .n_tokens = 1, .logits = other};
        two[1] = (struct kvr_forward_item){.seq = s[3], .tokens = &next, .n_tokens = 1, .logits = got + (size_t)12 * V};
        REQUIRE(kvr_engine_forward(e, two, 2) == KVR_OK);
        int same = memcmp(alone, got, (size_t)13 * V * sizeof *got) == 0;
        if (!same)
            for (int q = 0; q < 13 * V; q++)
                if (memcmp(&alone[q], &got[q], 4) != 0) {
                    fprintf(stderr, "%s: a prompt batched and cut gives other logits than alone (row %d)\n", types[f], q / V);
                    break;
                }
        CHECK(same);
        /* And the prompt path is not the decode path: A through the per-value kernels
         * gives other bits for some type (else this test could not tell them apart). */
        struct kvr_kv_seq *d = NULL;
        REQUIRE(kvr_kv_seq_create(pool, &sp, &d) == KVR_OK);
        it = (struct kvr_forward_item){.seq = d, .tokens = A, .n_tokens = 12, .logits = got, .all_logits = 1};
        REQUIRE(kvr_engine_forward(e, &it, 1) == KVR_OK);
        n_differ += memcmp(alone, got, (size_t)12 * V * sizeof *got) != 0;
        kvr_kv_seq_free(d);
        free(alone), free(got), free(other);
        for (int i = 0; i < 4; i++)
            kvr_kv_seq_free(s[i]);
        kvr_engine_free(e);
        kvr_kv_pool_free(pool);
        kvr_model_free(m);
    }
    /* The products of F16 and BF16 values are exact in f32, so the two paths can agree
     * to the bit on a model this small; Q8_0's cannot. */
    CHECK(n_differ >= 1);
}

int main(void) {
    test_real_files();
    test_layouts();
    test_prompt_batching();
    kvr_log_set_sink(sink, NULL);
    test_truncated();
    struct gg base;
    gg_read(model_path("q8_0"), &base);
    test_header_and_counts(&base);
    test_edits(&base);
    gg_free(&base);
    kvr_log_set_sink(NULL, NULL);
    fprintf(stderr, "hostile files: %d cases refused with their status and one line\n", n_cases);
    CHECK_DONE();
}
