/* test_gguf_vocab.c - the tokenizer built from a GGUF file's tokenizer.ggml.* metadata
 * against llama2.c's tokenizer.bin of the same vocabulary (tok512.bin):
 *  - the same ids for the five golden prompts (and the golden runs' own ids) and for the
 *    whole test text, and for text that needs byte fallback;
 *  - the same decoding of every token after BOS and after another token (byte pieces,
 *    the leading-space rule), except the two control tokens, which decode to "" from GGUF
 *    (llama2.c's exporter wrote them as "\n<s>\n" and "\n</s>\n");
 *  - a GGUF file given as the tokenizer of a model; the metadata's switches
 *    (add_bos_token, add_space_prefix, a BOS of "none", no token types) and its errors
 *    (another tokenizer model, no tokenizer, arrays of another length, a NUL in a piece,
 *    an unknown token type). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "gguf_edit.h"
#include "golden.h"
#include "log.h"
#include "model.h"
#include "status.h"
#include "tokenizer.h"

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

static const char *gguf_path(const char *type) {
    static char buf[512];
    snprintf(buf, sizeof buf, "%s/models/gguf/stories260K-%s.gguf", KVR_SHARED_DIR, type);
    return buf;
}

static int *encode(const struct kvr_tokenizer *t, const char *s, int *n) {
    int cap = (int)strlen(s) + 3;
    int *ids = malloc((size_t)cap * sizeof *ids);
    REQUIRE(ids);
    REQUIRE(kvr_tokenizer_encode(t, s, 1, 0, ids, cap, n) == KVR_OK);
    return ids;
}

static int same_ids(const struct kvr_tokenizer *a, const struct kvr_tokenizer *b, const char *s, int *n_out) {
    int na, nb;
    int *ia = encode(a, s, &na), *ib = encode(b, s, &nb);
    int same = na == nb && memcmp(ia, ib, (size_t)na * sizeof *ia) == 0;
    if (!same) {
        int i = 0;
        while (i < na && i < nb && ia[i] == ib[i])
            i++;
        fprintf(stderr, "  ids differ at %d of %d/%d: %d vs %d\n", i, na, nb, i < na ? ia[i] : -1,
                i < nb ? ib[i] : -1);
    }
    if (n_out)
        *n_out = na;
    free(ia);
    free(ib);
    return same;
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    REQUIRE(s && fread(s, 1, (size_t)n, f) == (size_t)n);
    s[n] = '\0';
    fclose(f);
    return s;
}

static void test_same_as_llama2c(const struct kvr_tokenizer *bin, const struct kvr_tokenizer *gg) {
    CHECK_EQ(kvr_tokenizer_vocab_size(gg), 512);
    CHECK_EQ(kvr_tokenizer_bos(gg), 1);
    CHECK_EQ(kvr_tokenizer_eos(gg), 2);

    /* The golden prompts: the run's ids, and the same as tokenizer.bin's. */
    char *paths[16];
    int n_paths = golden_run_paths(paths, 16);
    CHECK(n_paths >= 5);
    for (int i = 0; i < n_paths; i++) {
        struct golden_run g;
        REQUIRE(golden_run_load(paths[i], &g) == 0);
        int n;
        int *ids = encode(gg, g.prompt, &n);
        CHECK(n <= g.n_ids && memcmp(ids, g.ids, (size_t)n * sizeof *ids) == 0);
        CHECK(same_ids(bin, gg, g.prompt, NULL));
        free(ids);
        golden_run_free(&g);
        free(paths[i]);
    }

    /* The whole test text as one string, and text that falls back to bytes. */
    char *text = slurp(shared_path("data/tinystories_valid_100.txt"));
    int n_text;
    CHECK(same_ids(bin, gg, text, &n_text));
    fprintf(stderr, "the whole test text: %d tokens, the same ids from both loaders\n", n_text);
    free(text);
    static const char *const odd[] = {"caf\xc3\xa9 na\xc3\xafve \xe2\x80\x94 \xf0\x9f\x98\x80!", "\x01\x7f tab\tnew\nline",
                                      "  spaces  ", "<s> </s> <unk> <0x41>", "\xe2\x96\x81 the U+2581 itself"};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++)
        CHECK(same_ids(bin, gg, odd[i], NULL));

    /* Decoding every token: after BOS (leading space dropped), after a word, safe form. */
    int differ = 0;
    for (int t = 0; t < 512; t++) {
        for (int k = 0; k < 3; k++) {
            int prev = k == 0 ? 1 : k == 1 ? 403 : t;
            const char *a = kvr_tokenizer_piece(bin, prev, t), *b = kvr_tokenizer_piece(gg, prev, t);
            const char *sa = kvr_tokenizer_piece_safe(bin, prev, t), *sb = kvr_tokenizer_piece_safe(gg, prev, t);
            /* Pieces may be one NUL byte (<0x00>): compare as C strings, then the byte. */
            int same = strcmp(a, b) == 0 && a[0] == b[0] && strcmp(sa, sb) == 0;
            if (t == 1 || t == 2) {
                CHECK_STREQ(b, ""); /* control tokens */
                CHECK(strstr(a, "<s>") || strstr(a, "</s>"));
                continue;
            }
            if (!same && differ++ < 5)
                fprintf(stderr, "  token %d after %d: '%s' vs '%s'\n", t, prev, a, b);
        }
    }
    CHECK_EQ(differ, 0);
}

/* The tokenizer of an edited f32 GGUF model. */
static int edited_tokenizer(void (*edit)(struct gg *), struct kvr_tokenizer **out) {
    struct gg g;
    struct gg_layout lay;
    gg_read(gguf_path("f32"), &g);
    edit(&g);
    unsigned char *img = gg_write(&g, 0, &lay);
    struct kvr_model *m = NULL;
    struct kvr_model_params mp = {0};
    int rc = kvr_model_load_memory(img, lay.len, "vocab.gguf", &mp, &m);
    logcap.n_err = 0;
    logcap.last[0] = '\0';
    if (rc == KVR_OK)
        rc = kvr_model_tokenizer(m, out);
    kvr_model_free(m);
    free(img);
    gg_free(&g);
    return rc;
}

static void e_no_bos(struct gg *g) { gg_set_bool(g, "tokenizer.ggml.add_bos_token", 0); }
static void e_no_prefix(struct gg *g) { gg_set_bool(g, "tokenizer.ggml.add_space_prefix", 0); }
static void e_bos_none(struct gg *g) { gg_set_u32(g, "tokenizer.ggml.bos_token_id", 0xFFFFFFFFu); }
static void e_no_types(struct gg *g) { gg_del_kv(g, "tokenizer.ggml.token_type"); }
static void e_gpt2(struct gg *g) { gg_set_str(g, "tokenizer.ggml.model", "gpt2"); }
static void e_no_model(struct gg *g) { gg_del_kv(g, "tokenizer.ggml.model"); }
static void e_scores_short(struct gg *g) {
    struct gg_kv *kv = &g->kv[gg_find_kv(g, "tokenizer.ggml.scores")];
    uint64_t n = 500;
    memcpy(kv->raw + 4, &n, 8);
    kv->raw_len = 12 + 500 * 4;
}
static void e_nul_piece(struct gg *g) {
    /* Token 300's first byte becomes NUL (lengths unchanged). */
    struct gg_kv *kv = &g->kv[gg_find_kv(g, "tokenizer.ggml.tokens")];
    size_t off = 12;
    for (int i = 0; i < 300; i++) {
        uint64_t l;
        memcpy(&l, kv->raw + off, 8);
        off += 8 + l;
    }
    kv->raw[off + 8] = '\0';
}
static void e_type_9(struct gg *g) {
    struct gg_kv *kv = &g->kv[gg_find_kv(g, "tokenizer.ggml.token_type")];
    int32_t v = 9;
    memcpy(kv->raw + 12 + 4 * 300, &v, 4);
}

static void test_metadata(const struct kvr_tokenizer *bin) {
    struct kvr_tokenizer *t = NULL;
    int n, ids[64];

    REQUIRE(edited_tokenizer(e_no_bos, &t) == KVR_OK);
    REQUIRE(kvr_tokenizer_encode(t, "Once upon a time", 1, 0, ids, 64, &n) == KVR_OK);
    CHECK(n == 4 && ids[0] == 403); /* no BOS although asked: the vocabulary adds none */
    kvr_tokenizer_free(t);

    REQUIRE(edited_tokenizer(e_no_prefix, &t) == KVR_OK);
    REQUIRE(kvr_tokenizer_encode(t, "Once upon a time", 1, 0, ids, 64, &n) == KVR_OK);
    CHECK(n >= 2 && ids[0] == 1 && ids[1] != 403); /* "Once" without the dummy space is not " Once" */
    kvr_tokenizer_free(t);

    REQUIRE(edited_tokenizer(e_bos_none, &t) == KVR_OK);
    CHECK_EQ(kvr_tokenizer_bos(t), -1);
    REQUIRE(kvr_tokenizer_encode(t, "Once", 1, 0, ids, 64, &n) == KVR_OK);
    CHECK(n == 1 && ids[0] != 1);
    /* No BOS: the leading space is kept after token 1 too. */
    CHECK_STREQ(kvr_tokenizer_piece(t, 1, 403), " Once");
    kvr_tokenizer_free(t);

    /* Without token types, byte pieces are found by name: the same ids. */
    REQUIRE(edited_tokenizer(e_no_types, &t) == KVR_OK);
    char *text = slurp(shared_path("data/tinystories_valid_100.txt"));
    text[20000] = '\0';
    CHECK(same_ids(bin, t, text, NULL));
    CHECK(same_ids(bin, t, "\x01\x02 caf\xc3\xa9", NULL));
    free(text);
    kvr_tokenizer_free(t);

    static const struct {
        const char *what;
        void (*fn)(struct gg *);
        int want;
        const char *phrase;
    } bad[] = {
        {"another tokenizer model", e_gpt2, KVR_ENOTSUP, "tokenizer.ggml.model is 'gpt2'"},
        {"scores of another length", e_scores_short, KVR_ESHAPE, "scores 500"},
        {"a NUL inside a piece", e_nul_piece, KVR_EFORMAT, "token 300 holds a NUL byte"},
        {"an unknown token type", e_type_9, KVR_EFORMAT, "token 300 has type 9"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        t = NULL;
        int rc = edited_tokenizer(bad[i].fn, &t);
        int ok = rc == bad[i].want && !t && logcap.n_err == 1 && strstr(logcap.last, "vocab.gguf") &&
                 strstr(logcap.last, bad[i].phrase);
        if (!ok)
            fprintf(stderr, "  FAILED %s: %s, %d lines: %s\n", bad[i].what, kvr_status_name(rc), logcap.n_err,
                    logcap.last);
        CHECK(ok);
    }
    /* No tokenizer at all: the model needs --tokenizer, said in one line. */
    struct gg g;
    struct gg_layout lay;
    gg_read(gguf_path("f32"), &g);
    e_no_model(&g);
    unsigned char *img = gg_write(&g, 0, &lay);
    struct kvr_model *m = NULL;
    struct kvr_model_params mp = {0};
    REQUIRE(kvr_model_load_memory(img, lay.len, "vocab.gguf", &mp, &m) == KVR_OK);
    logcap.n_err = 0;
    CHECK_EQ(kvr_model_load_tokenizer(m, NULL, &t), KVR_ENOENT);
    CHECK(logcap.n_err == 1 && strstr(logcap.last, "holds no tokenizer") && strstr(logcap.last, "--tokenizer"));
    /* ... and takes one from a file. */
    CHECK_EQ(kvr_model_load_tokenizer(m, shared_path("models/tok512.bin"), &t), KVR_OK);
    kvr_tokenizer_free(t);
    kvr_model_free(m);
    free(img);
    gg_free(&g);
}

int main(void) {
    struct kvr_tokenizer *bin = NULL, *gg = NULL, *gg2 = NULL, *as_file = NULL;
    struct kvr_model *m = NULL, *m2 = NULL;
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), 512, &bin) == KVR_OK);
    REQUIRE(kvr_model_load(gguf_path("q8_0"), &m) == KVR_OK);
    REQUIRE(kvr_model_load_tokenizer(m, NULL, &gg) == KVR_OK);
    test_same_as_llama2c(bin, gg);
    /* Every bundled file carries the same vocabulary. */
    REQUIRE(kvr_model_load(gguf_path("f32"), &m2) == KVR_OK);
    REQUIRE(kvr_model_tokenizer(m2, &gg2) == KVR_OK);
    CHECK(same_ids(gg, gg2, "Lily and Tom went to the park. \xe2\x82\xac", NULL));
    /* A GGUF file as --tokenizer: its vocabulary, checked against the model's size. */
    REQUIRE(kvr_tokenizer_load(gguf_path("bf16"), 512, &as_file) == KVR_OK);
    CHECK(same_ids(bin, as_file, "One day, a little dog named Max", NULL));
    kvr_log_set_sink(sink, NULL);
    struct kvr_tokenizer *wrong = NULL;
    logcap.n_err = 0;
    CHECK_EQ(kvr_tokenizer_load(gguf_path("bf16"), 32000, &wrong), KVR_ESHAPE);
    CHECK(logcap.n_err == 1 && strstr(logcap.last, "another model"));
    /* A llama2.c checkpoint has no tokenizer inside. */
    struct kvr_model *ref = NULL;
    REQUIRE(kvr_model_load(shared_path("models/stories260K.bin"), &ref) == KVR_OK);
    CHECK_EQ(kvr_model_tokenizer(ref, &wrong), KVR_ENOENT);
    logcap.n_err = 0;
    CHECK_EQ(kvr_model_load_tokenizer(ref, NULL, &wrong), KVR_ENOENT);
    CHECK(logcap.n_err == 1 && strstr(logcap.last, "llama2.c checkpoint"));
    kvr_model_free(ref);
    test_metadata(bin);
    kvr_log_set_sink(NULL, NULL);
    kvr_tokenizer_free(bin);
    kvr_tokenizer_free(gg);
    kvr_tokenizer_free(gg2);
    kvr_tokenizer_free(as_file);
    kvr_model_free(m);
    kvr_model_free(m2);
    CHECK_DONE();
}
