/* test_tokenizer.c - common/tokenizer.c: known encodings (the golden prompts' ids),
 * round trips decode(encode(s)) == s for ASCII and UTF-8 (byte fallback), llama2.c's
 * leading-space rule, the load errors, and equality of the heap encoder with a naive
 * O(n^2) merge loop written here the way llama2.c's encode() works, on real text with
 * both the 512-token and the 32000-token vocabularies. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "golden.h"
#include "status.h"
#include "tokenizer.h"

/* ---- the naive reference encoder -------------------------------------------------- */

/* Its own reading of tokenizer.bin: int32 max_len, then (float score, int32 len, bytes). */
struct naive_vocab {
    int n;
    char **str;
    float *score;
    int *sorted; /* ids sorted by str */
};

static const struct naive_vocab *cmp_vocab; /* qsort has no user pointer */

static int cmp_ids(const void *a, const void *b) {
    return strcmp(cmp_vocab->str[*(const int *)a], cmp_vocab->str[*(const int *)b]);
}

static void naive_load(struct naive_vocab *v, const char *path, int n) {
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    int32_t max_len;
    REQUIRE(fread(&max_len, 4, 1, f) == 1);
    v->n = n;
    v->str = calloc((size_t)n, sizeof *v->str);
    v->score = calloc((size_t)n, sizeof *v->score);
    v->sorted = calloc((size_t)n, sizeof *v->sorted);
    REQUIRE(v->str && v->score && v->sorted);
    for (int i = 0; i < n; i++) {
        int32_t len;
        REQUIRE(fread(&v->score[i], 4, 1, f) == 1 && fread(&len, 4, 1, f) == 1);
        REQUIRE(len >= 0 && len <= max_len);
        REQUIRE((v->str[i] = calloc((size_t)len + 1, 1)) != NULL);
        REQUIRE(fread(v->str[i], 1, (size_t)len, f) == (size_t)len);
        v->sorted[i] = i;
    }
    fclose(f);
    cmp_vocab = v;
    qsort(v->sorted, (size_t)n, sizeof *v->sorted, cmp_ids);
}

static void naive_free(struct naive_vocab *v) {
    for (int i = 0; i < v->n; i++)
        free(v->str[i]);
    free(v->str);
    free(v->score);
    free(v->sorted);
}

static int naive_lookup(const struct naive_vocab *v, const char *s) {
    int lo = 0, hi = v->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        int c = strcmp(s, v->str[v->sorted[mid]]);
        if (c == 0)
            return v->sorted[mid];
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return -1;
}

/* llama2.c's encode(): BOS, dummy " " prefix, code points or their bytes (+3), then
 * repeatedly merge the adjacent pair whose concatenation has the best score (the first
 * such pair on ties) until no pair is in the vocabulary. Returns owned ids. */
static int *naive_encode(const struct naive_vocab *v, const char *text, int bos, int *n_out) {
    size_t len = strlen(text);
    int *t = malloc((len + 3) * sizeof *t);
    char *buf = malloc(2 * 64 + 2);
    REQUIRE(t && buf);
    int n = 0;
    if (bos)
        t[n++] = 1;
    if (len)
        t[n++] = naive_lookup(v, " ");
    for (size_t i = 0; i < len;) {
        size_t cl = 1; /* the lead byte plus continuation bytes, at most 4 */
        while (i + cl < len && cl < 4 && ((unsigned char)text[i + cl] & 0xC0) == 0x80)
            cl++;
        char cp[5] = {0};
        memcpy(cp, text + i, cl);
        int id = naive_lookup(v, cp);
        if (id >= 0) {
            t[n++] = id;
        } else {
            for (size_t b = 0; b < cl; b++)
                t[n++] = (unsigned char)cp[b] + 3;
        }
        i += cl;
    }
    for (;;) {
        float best = -1e10f;
        int best_id = -1, best_i = -1;
        for (int i = 0; i + 1 < n; i++) {
            const char *a = v->str[t[i]], *b = v->str[t[i + 1]];
            size_t la = strlen(a), lb = strlen(b);
            if (la + lb > 128)
                continue;
            memcpy(buf, a, la);
            memcpy(buf + la, b, lb + 1);
            int id = naive_lookup(v, buf);
            if (id >= 0 && v->score[id] > best) {
                best = v->score[id];
                best_id = id;
                best_i = i;
            }
        }
        if (best_i < 0)
            break;
        t[best_i] = best_id;
        memmove(t + best_i + 1, t + best_i + 2, (size_t)(n - best_i - 2) * sizeof *t);
        n--;
    }
    free(buf);
    *n_out = n;
    return t;
}

/* ---- helpers ------------------------------------------------------------------------ */

static int *encode(const struct kvr_tokenizer *tok, const char *s, int bos, int eos, int *n) {
    int cap = (int)strlen(s) + 3;
    int *ids = malloc((size_t)cap * sizeof *ids);
    REQUIRE(ids);
    int rc = kvr_tokenizer_encode(tok, s, bos, eos, ids, cap, n);
    CHECK_EQ(rc, KVR_OK);
    CHECK(*n <= cap);
    return ids;
}

/* llama2.c's decode of ids[1..n) after BOS, concatenated; owned. */
static char *decode(const struct kvr_tokenizer *tok, const int *ids, int n) {
    size_t cap = 64, len = 0;
    char *out = malloc(cap);
    REQUIRE(out);
    out[0] = '\0';
    for (int i = 1; i < n; i++) {
        const char *p = kvr_tokenizer_piece(tok, ids[i - 1], ids[i]);
        /* A byte piece may be "\0" (the <0x00> token): count it as one byte. */
        size_t pl = strlen(p);
        while (len + pl + 1 > cap) {
            cap *= 2;
            REQUIRE((out = realloc(out, cap)) != NULL);
        }
        memcpy(out + len, p, pl + 1);
        len += pl;
    }
    return out;
}

static void show_ids(const char *label, const int *ids, int n) {
    fprintf(stderr, "    %s (%d):", label, n);
    for (int i = 0; i < n && i < 24; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 24 ? " ...\n" : "\n");
}

/* ---- tests -------------------------------------------------------------------------- */

static void test_known(const struct kvr_tokenizer *tok) {
    int n;
    int *ids = encode(tok, "Once upon a time", 1, 0, &n);
    static const int want[] = {1, 403, 407, 261, 378};
    CHECK_EQ(n, 5);
    int same = n == 5 && memcmp(ids, want, sizeof want) == 0;
    if (!same)
        show_ids("\"Once upon a time\"", ids, n);
    CHECK(same);
    free(ids);

    /* EOS, no BOS, empty text (no dummy prefix for empty text, as llama2.c). */
    ids = encode(tok, "Once upon a time", 0, 1, &n);
    CHECK_EQ(n, 5);
    CHECK_EQ(ids[0], 403);
    CHECK_EQ(ids[n - 1], KVR_TOKEN_EOS);
    free(ids);
    ids = encode(tok, "", 1, 0, &n);
    CHECK_EQ(n, 1);
    CHECK_EQ(ids[0], KVR_TOKEN_BOS);
    free(ids);
    ids = encode(tok, "", 0, 0, &n);
    CHECK_EQ(n, 0);
    free(ids);

    /* Too small an output buffer is an error, not an overflow. */
    int small[3];
    CHECK_EQ(kvr_tokenizer_encode(tok, "Once upon a time", 1, 0, small, 3, &n), KVR_ERANGE);

    /* Every golden prompt encodes to its run's first ids; the prompt's tokens decode
     * back to the prompt. */
    char *paths[16];
    int n_paths = golden_run_paths(paths, 16);
    CHECK(n_paths >= 5);
    for (int i = 0; i < n_paths; i++) {
        struct golden_run g;
        REQUIRE(golden_run_load(paths[i], &g) == 0);
        ids = encode(tok, g.prompt, 1, 0, &n);
        int ok = n <= g.n_ids && memcmp(ids, g.ids, (size_t)n * sizeof *ids) == 0;
        char *back = decode(tok, ids, n);
        fprintf(stderr, "golden prompt '%s': %d tokens, %s the golden ids' prefix\n", g.prompt, n,
                ok ? "equal to" : "NOT");
        if (!ok) {
            show_ids("encoded", ids, n);
            show_ids("golden", g.ids, g.n_ids);
        }
        CHECK(ok);
        CHECK_STREQ(back, g.prompt);
        free(back);
        free(ids);
        golden_run_free(&g);
        free(paths[i]);
    }
}

static void test_round_trips(const struct kvr_tokenizer *tok, const char *name) {
    static const char *const texts[] = {
        "Once upon a time, there was a little girl named Lily.",
        "  two leading spaces and trailing ones  ",
        " one leading space",
        "\nstarts with a newline\n\nand has blank lines\n",
        "digits 0123456789, punctuation !?;:'\"()[]{}<>-_=+*/\\|@#$%^&~`",
        "tabs\tand\tcarriage\r\nreturns",
        "aaaaaaaaaaaaaaaa bbbbbbbb          ........!!!!!!",
        "naïve café, Zürich, São Paulo",
        "日本語のテキスト and 中文",
        "emoji 🙂🚀 and symbols € ™ — “quotes”",
        "x",
        " ",
        "\xc3\xa9\xf0\x9f\x98\x80", /* é then U+1F600 */
    };
    int n_bytes_fallback = 0;
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        int n;
        int *ids = encode(tok, texts[i], 1, 0, &n);
        char *back = decode(tok, ids, n);
        if (strcmp(back, texts[i]) != 0)
            fprintf(stderr, "  %s: round trip of '%s' gave '%s'\n", name, texts[i], back);
        CHECK_STREQ(back, texts[i]);
        for (int k = 0; k < n; k++)
            n_bytes_fallback += ids[k] >= 3 && ids[k] < 259;
        free(back);
        free(ids);
    }
    fprintf(stderr, "%s: %zu round trips, %d byte-fallback tokens used\n", name,
            sizeof texts / sizeof texts[0], n_bytes_fallback);
    CHECK(n_bytes_fallback > 0); /* the CJK and emoji texts need them in both vocabularies */
}

static void test_pieces(const struct kvr_tokenizer *tok) {
    /* " Once" is 403 in tok512: its space goes after BOS only. */
    CHECK_STREQ(kvr_tokenizer_vocab(tok, 403), " Once");
    CHECK_STREQ(kvr_tokenizer_piece(tok, KVR_TOKEN_BOS, 403), "Once");
    CHECK_STREQ(kvr_tokenizer_piece(tok, 261, 403), " Once");
    CHECK_STREQ(kvr_tokenizer_piece(tok, KVR_TOKEN_EOS, 403), " Once");
    /* Byte tokens <0xXX> (id = byte + 3) decode to the byte. */
    CHECK_STREQ(kvr_tokenizer_vocab(tok, 0x41 + 3), "<0x41>");
    CHECK_STREQ(kvr_tokenizer_piece(tok, 5, 0x41 + 3), "A");
    CHECK_STREQ(kvr_tokenizer_piece(tok, 5, 0x0A + 3), "\n");
    CHECK_EQ((unsigned char)kvr_tokenizer_piece(tok, 5, 0xE6 + 3)[0], 0xE6);
    /* safe: a lone control byte prints as nothing, whitespace and text pass. */
    CHECK_STREQ(kvr_tokenizer_piece_safe(tok, 5, 0x07 + 3), "");
    CHECK_STREQ(kvr_tokenizer_piece_safe(tok, 5, 0x0A + 3), "\n");
    CHECK_STREQ(kvr_tokenizer_piece_safe(tok, 261, 403), " Once");
    /* Out of range: empty piece, no vocab entry. */
    CHECK_STREQ(kvr_tokenizer_piece(tok, 5, -1), "");
    CHECK_STREQ(kvr_tokenizer_piece(tok, 5, 512), "");
    CHECK(kvr_tokenizer_vocab(tok, 512) == NULL);
    CHECK(kvr_tokenizer_vocab(tok, -1) == NULL);
    CHECK_EQ(kvr_tokenizer_vocab_size(tok), 512);
}

/* Heap encoder == naive merge loop on real text: one 2 KB stretch and every line of the
 * first ~8 KB, separately. */
static void test_vs_naive(const struct kvr_tokenizer *tok, const char *tok_path, int vocab,
                          const char *text, size_t text_len) {
    struct naive_vocab nv;
    naive_load(&nv, tok_path, vocab);
    int n_texts = 0, n_tokens = 0, n_diff = 0;
    char *buf = malloc(text_len + 1);
    REQUIRE(buf);
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        while (off < text_len && off < 8192) {
            size_t len;
            if (pass == 0) { /* one 2 KB stretch, cut at a newline */
                len = 2048;
                while (len > 0 && text[len] != '\n')
                    len--;
            } else {
                const char *nl = memchr(text + off, '\n', text_len - off);
                len = nl ? (size_t)(nl - (text + off)) : text_len - off;
            }
            memcpy(buf, text + off, len);
            buf[len] = '\0';
            off += len + 1;
            int n1, n2;
            int *a = encode(tok, buf, 1, 0, &n1);
            int *b = naive_encode(&nv, buf, 1, &n2);
            int same = n1 == n2 && memcmp(a, b, (size_t)n1 * sizeof *a) == 0;
            if (!same && n_diff++ < 3) {
                fprintf(stderr, "  vocab %d: heap and naive encodings differ for '%.60s...'\n",
                        vocab, buf);
                show_ids("heap", a, n1);
                show_ids("naive", b, n2);
            }
            CHECK(same);
            n_texts++;
            n_tokens += n1;
            free(a);
            free(b);
            if (pass == 0)
                break;
        }
    }
    /* Equal scores: the same pair repeated ("ll" in "lll") must merge leftmost first, as
     * llama2.c's strict '>' scan does ("ll" "l", not "l" "ll"). */
    static const char *const ties[] = {"alll",      "hellllo wooorld", "sooooo",  "ppp",
                                       "apppple",   "lll ooo ppp",     "baaaaad", "zzzzzzz",
                                       "...!!!???", "a  b   c    d"};
    for (size_t i = 0; i < sizeof ties / sizeof ties[0]; i++) {
        int n1, n2;
        int *a = encode(tok, ties[i], 1, 0, &n1);
        int *b = naive_encode(&nv, ties[i], 1, &n2);
        int same = n1 == n2 && memcmp(a, b, (size_t)n1 * sizeof *a) == 0;
        if (!same && n_diff++ < 6) {
            fprintf(stderr, "  vocab %d: heap and naive encodings differ for '%s'\n", vocab,
                    ties[i]);
            show_ids("heap", a, n1);
            show_ids("naive", b, n2);
        }
        CHECK(same);
        n_texts++;
        n_tokens += n1;
        free(a);
        free(b);
    }
    fprintf(stderr,
            "vocab %d: heap encoder == naive merge loop on %d texts (%d tokens), %d differ\n",
            vocab, n_texts, n_tokens, n_diff);
    CHECK_EQ(n_diff, 0);
    free(buf);
    naive_free(&nv);
}

static void test_load_errors(const char *tok512_path) {
    struct kvr_tokenizer *t = (struct kvr_tokenizer *)&t; /* must be reset to NULL */
    CHECK_EQ(kvr_tokenizer_load("/nonexistent/tok.bin", 512, &t), KVR_ENOENT);
    CHECK(t == NULL);
    CHECK_EQ(kvr_tokenizer_load(tok512_path, 0, &t), KVR_EINVAL);
    CHECK_EQ(kvr_tokenizer_load(tok512_path, 32000, &t), KVR_ETRUNC); /* too few entries */
    CHECK_EQ(kvr_tokenizer_load(tok512_path, 100, &t), KVR_EFORMAT);  /* more than the model's */
    CHECK(t == NULL);
    /* A corrupt entry length. */
    char path[] = "/tmp/kvr_test_tok_XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    int32_t hdr[4] = {8, 0, -7, 0};
    float score = 0;
    memcpy(&hdr[1], &score, 4);
    REQUIRE(write(fd, hdr, 12) == 12);
    close(fd);
    CHECK_EQ(kvr_tokenizer_load(path, 4, &t), KVR_EFORMAT);
    unlink(path);
}

int main(void) {
    const char *p512 = shared_path("models/tok512.bin"),
               *p32k = shared_path("models/llama2_tokenizer.bin");
    struct kvr_tokenizer *tok = NULL, *big = NULL;
    REQUIRE(kvr_tokenizer_load(p512, 512, &tok) == KVR_OK);
    REQUIRE(kvr_tokenizer_load(p32k, 32000, &big) == KVR_OK);

    test_known(tok);
    test_pieces(tok);
    test_round_trips(tok, "tok512");
    test_round_trips(big, "llama2 32000");

    FILE *f = fopen(shared_path("data/tinystories_valid_100.txt"), "rb");
    REQUIRE(f);
    char *text = malloc(16385);
    REQUIRE(text);
    size_t len = fread(text, 1, 16384, f);
    fclose(f);
    text[len] = '\0';
    test_vs_naive(tok, p512, 512, text, len);
    test_vs_naive(big, p32k, 32000, text, len);
    free(text);

    test_load_errors(p512);
    kvr_tokenizer_free(tok);
    kvr_tokenizer_free(big);
    CHECK_DONE();
}
