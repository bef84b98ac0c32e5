/* test_transformer.c - the forward pass (common/transformer.c) against itself and against
 * the naive reference of ref_forward.c: prefill == decode (K, V and logits; dense and
 * sink), the cache loses nothing (200 tokens vs recomputing every prefix without a
 * cache), batched == separate, attention pieces give the same bits alone and batched, and MHA/GQA/MQA shapes with shared and separate
 * classifiers on synthetic checkpoints.
 *
 * Norms. "rel" is the relative L2 distance of whole vectors, ||a - b||_2 / ||b||_2, per
 * K or V vector of one (layer, position) and per logits row; the bound is 1e-5. "abs"
 * is the largest absolute difference of any logit; the bound against the reference is
 * 1e-4: the engine works in float32 with BLAS summation orders, the reference
 * accumulates in double, so the engine's own rounding (a few float ulps per dot product
 * of length <= 172, compounded over 5 layers, on logits of magnitude <= ~20) is what
 * remains; 1e-4 is the same budget the llama2.c golden logits are held to, and still far
 * below any real bug (a wrong cache slot or position moves logits by 1e-2 or more). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "kv_cache.h"
#include "model.h"
#include "ref_forward.h"
#include "sampler.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

#define BT          16   /* tokens per KV block: sequences here cross several blocks */
#define REL_TOL     1e-5 /* prefill vs decode, batched vs separate, sink vs dense */
#define REF_ABS_TOL 1e-4 /* engine vs the naive reference, logits */

/* ---- helpers -------------------------------------------------------------------- */

struct rig {
    struct kvr_model *m; /* borrowed */
    const struct kvr_model_config *c;
    struct kvr_kv_pool *pool;
    struct kvr_engine *e;
};

static void rig_open_type(struct rig *r, struct kvr_model *m, enum kvr_kv_type type, int n_threads,
                          int n_batch, int n_items, int n_ctx, int n_blocks) {
    memset(r, 0, sizeof *r);
    r->m = m;
    r->c = kvr_model_config(m);
    struct kvr_kv_pool_params pp = {
        .type = type,
        .n_layers = r->c->n_layers,
        .kv_dim = r->c->kv_dim,
        .block_tokens = BT,
        .budget_nbytes =
            (uint64_t)n_blocks * BT * kvr_kv_token_nbytes(r->c->n_layers, r->c->kv_dim),
    };
    REQUIRE(kvr_kv_pool_create(&pp, &r->pool) == KVR_OK);
    struct kvr_engine_params ep = {.model = m,
                                   .n_threads = n_threads,
                                   .n_batch_tokens_max = n_batch,
                                   .n_items_max = n_items,
                                   .n_ctx_max = n_ctx};
    REQUIRE(kvr_engine_create(&ep, &r->e) == KVR_OK);
}

static void rig_open(struct rig *r, struct kvr_model *m, int n_threads, int n_batch, int n_items,
                     int n_ctx, int n_blocks) {
    rig_open_type(r, m, KVR_KV_F32, n_threads, n_batch, n_items, n_ctx, n_blocks);
}

static void rig_close(struct rig *r) {
    kvr_engine_free(r->e);
    kvr_kv_pool_free(r->pool);
}

static struct kvr_kv_seq *seq_new(struct rig *r, enum kvr_kv_policy policy, int window, int sinks,
                                  int n_tokens_max) {
    struct kvr_kv_seq_params sp = {.policy = {.policy = policy, .window = window, .sinks = sinks},
                                   .n_tokens_max = n_tokens_max};
    struct kvr_kv_seq *s = NULL;
    REQUIRE(kvr_kv_seq_create(r->pool, &sp, &s) == KVR_OK);
    return s;
}

/* Feeds tokens[0..n) to s in chunks of the given sizes (cycled), all logits into
 * logits (n, vocab). Returns the first failing status. */
static int run_chunks(struct rig *r, struct kvr_kv_seq *s, const int *tokens, int n,
                      const int *chunks, int n_chunks, float *logits) {
    size_t V = (size_t)r->c->vocab_size;
    for (int done = 0, ci = 0; done < n; ci++) {
        int k = chunks[ci % n_chunks];
        if (k > n - done)
            k = n - done;
        struct kvr_forward_item it = {.seq = s,
                                      .tokens = tokens + done,
                                      .n_tokens = k,
                                      .logits = logits + (size_t)done * V,
                                      .all_logits = 1};
        int rc = kvr_engine_forward(r->e, &it, 1);
        if (rc != KVR_OK)
            return rc;
        done += k;
    }
    return KVR_OK;
}

/* ||a - b||_2 / ||b||_2 (0 when both are zero). */
static double rel_l2(const float *a, const float *b, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (den == 0)
        return num == 0 ? 0 : HUGE_VAL;
    return sqrt(num / den);
}

/* Largest |a - b| over n floats, position in *at. NaN counts as infinitely far. */
static double max_abs(const float *a, const float *b, size_t n, size_t *at) {
    double worst = 0;
    *at = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= worst)) {
            worst = isnan(d) ? HUGE_VAL : d;
            *at = i;
        }
    }
    return worst;
}

/* Worst rel_l2 over the (n_rows, width) rows of a and b; row in *at. */
static double worst_rows(const float *a, const float *b, int n_rows, int width, int *at) {
    double worst = 0;
    *at = 0;
    for (int r = 0; r < n_rows; r++) {
        double e = rel_l2(a + (size_t)r * width, b + (size_t)r * width, width);
        if (!(e <= worst)) {
            worst = isnan(e) ? HUGE_VAL : e;
            *at = r;
        }
    }
    return worst;
}

/* Logits of both runs must agree row by row (rel) and pick the same token. */
static void check_logits_rel(const char *what, const float *a, const float *b, int n_rows, int V) {
    int at;
    double e = worst_rows(a, b, n_rows, V, &at);
    fprintf(stderr, "  %s: worst rel logits %.3g (row %d)\n", what, e, at);
    CHECK_NEAR(e, 0, REL_TOL);
    for (int r = 0; r < n_rows; r++) {
        int x = kvr_argmax(a + (size_t)r * V, V), y = kvr_argmax(b + (size_t)r * V, V);
        if (x != y)
            fprintf(stderr, "  %s: row %d argmax %d vs %d\n", what, r, x, y);
        CHECK_EQ(x, y);
    }
}

/* K and V of every (layer, position < n) of two sequences agree (rel); when rotate_a,
 * a's keys are unrotated (sink policy) and are rotated here at their text position. */
static void check_kv_rel(const char *what, const struct kvr_model_config *c, struct kvr_kv_seq *a,
                         struct kvr_kv_seq *b, int n, int rotate_a) {
    double worst_k = 0, worst_v = 0;
    int wk_l = 0, wk_p = 0, wv_l = 0, wv_p = 0, missing = 0;
    float *tmp = malloc((size_t)c->kv_dim * sizeof *tmp);
    REQUIRE(tmp);
    for (int l = 0; l < c->n_layers; l++) {
        for (int p = 0; p < n; p++) {
            float *ka, *va, *kb, *vb;
            if (kvr_kv_seq_slot(a, l, p, &ka, &va) != KVR_OK ||
                kvr_kv_seq_slot(b, l, p, &kb, &vb) != KVR_OK) {
                missing++;
                continue;
            }
            memcpy(tmp, ka, (size_t)c->kv_dim * sizeof *tmp);
            if (rotate_a)
                ref_rope(tmp, c->kv_dim, c->head_dim, p);
            double ek = rel_l2(tmp, kb, c->kv_dim), ev = rel_l2(va, vb, c->kv_dim);
            if (!(ek <= worst_k)) {
                worst_k = isnan(ek) ? HUGE_VAL : ek;
                wk_l = l;
                wk_p = p;
            }
            if (!(ev <= worst_v)) {
                worst_v = isnan(ev) ? HUGE_VAL : ev;
                wv_l = l;
                wv_p = p;
            }
        }
    }
    free(tmp);
    fprintf(stderr, "  %s: worst rel K %.3g (layer %d pos %d), V %.3g (layer %d pos %d)\n", what,
            worst_k, wk_l, wk_p, worst_v, wv_l, wv_p);
    CHECK_EQ(missing, 0);
    CHECK_NEAR(worst_k, 0, REL_TOL);
    CHECK_NEAR(worst_v, 0, REL_TOL);
}

/* Engine logits (n, V) against the reference (n, V): largest absolute difference. */
static void check_vs_ref(const char *what, const float *eng, const float *ref, int n, int V) {
    size_t at;
    double e = max_abs(eng, ref, (size_t)n * (size_t)V, &at);
    fprintf(stderr, "  %s: worst |logit - ref| %.3g (pos %zu token %zu)\n", what, e, at / (size_t)V,
            at % (size_t)V);
    CHECK_NEAR(e, 0, REF_ABS_TOL);
    int argmax_diff = 0;
    for (int p = 0; p < n; p++)
        argmax_diff += kvr_argmax(eng + (size_t)p * V, V) != kvr_argmax(ref + (size_t)p * V, V);
    CHECK_EQ(argmax_diff, 0);
}

/* The first n tokens of real text (TinyStories) under tok512, BOS first. */
static int *story_tokens(int n) {
    struct kvr_tokenizer *tok = NULL;
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), 512, &tok) == KVR_OK);
    FILE *f = fopen(shared_path("data/tinystories_valid_100.txt"), "r");
    REQUIRE(f);
    char text[4097];
    size_t len = fread(text, 1, 4096, f);
    fclose(f);
    text[len] = '\0';
    int *ids = malloc((len + 3) * sizeof *ids);
    int n_ids = 0;
    REQUIRE(ids);
    REQUIRE(kvr_tokenizer_encode(tok, text, 1, 0, ids, (int)len + 3, &n_ids) == KVR_OK);
    REQUIRE(n_ids >= n);
    kvr_tokenizer_free(tok);
    return ids;
}

/* ---- 3. prefill == decode ---------------------------------------------------------- */

/* One prefill of T tokens against T single-token steps, under dense and under sink with
 * T < window (where sink must also equal dense: nothing is evicted and cache positions
 * are text positions). */
static void test_prefill_equals_decode(struct kvr_model *m, const int *tokens) {
    enum { T = 40, WINDOW = 64, SINKS = 4 };
    fprintf(stderr, "prefill == decode (T=%d, %d-token blocks):\n", T, BT);
    struct rig r;
    rig_open(&r, m, 1, T, 1, WINDOW, 4 * ((T + BT - 1) / BT + 1));
    int V = r.c->vocab_size;
    struct kvr_kv_seq *dp = seq_new(&r, KVR_KV_DENSE, 0, 0, T),
                      *dd = seq_new(&r, KVR_KV_DENSE, 0, 0, T);
    struct kvr_kv_seq *sp = seq_new(&r, KVR_KV_SINK, WINDOW, SINKS, 0);
    struct kvr_kv_seq *sd = seq_new(&r, KVR_KV_SINK, WINDOW, SINKS, 0);
    float *l_dp = malloc((size_t)T * V * sizeof(float)),
          *l_dd = malloc((size_t)T * V * sizeof(float));
    float *l_sp = malloc((size_t)T * V * sizeof(float)),
          *l_sd = malloc((size_t)T * V * sizeof(float));
    REQUIRE(l_dp && l_dd && l_sp && l_sd);
    /* NaN: a row neither path writes fails (zeros on both sides would compare equal). */
    memset(l_dp, 0xff, (size_t)T * V * sizeof(float));
    memset(l_dd, 0xff, (size_t)T * V * sizeof(float));
    memset(l_sp, 0xff, (size_t)T * V * sizeof(float));
    memset(l_sd, 0xff, (size_t)T * V * sizeof(float));
    const int whole[] = {T}, one[] = {1};
    CHECK_EQ(run_chunks(&r, dp, tokens, T, whole, 1, l_dp), KVR_OK);
    CHECK_EQ(run_chunks(&r, dd, tokens, T, one, 1, l_dd), KVR_OK);
    CHECK_EQ(run_chunks(&r, sp, tokens, T, whole, 1, l_sp), KVR_OK);
    CHECK_EQ(run_chunks(&r, sd, tokens, T, one, 1, l_sd), KVR_OK);
    CHECK_EQ(kvr_kv_seq_n_past(dp), T);
    CHECK_EQ(kvr_kv_seq_n_past(sd), T);

    check_kv_rel("dense prefill vs decode", r.c, dp, dd, T, 0);
    check_logits_rel("dense prefill vs decode", l_dp, l_dd, T, V);
    check_kv_rel("sink prefill vs decode", r.c, sp, sd, T, 0);
    check_logits_rel("sink prefill vs decode", l_sp, l_sd, T, V);
    /* Sink stores keys before RoPE: rotated here they are the dense keys. */
    check_kv_rel("sink (rotated here) vs dense", r.c, sp, dp, T, 1);
    check_logits_rel("sink vs dense logits", l_sp, l_dp, T, V);

    kvr_kv_seq_free(dp);
    kvr_kv_seq_free(dd);
    kvr_kv_seq_free(sp);
    kvr_kv_seq_free(sd);
    free(l_dp);
    free(l_dd);
    free(l_sp);
    free(l_sd);
    rig_close(&r);
}

/* ---- 4. the cache loses nothing ------------------------------------------------------ */

/* 200 tokens of real text: the reference recomputes every prefix from scratch; the
 * engine runs them with its cache as one prefill, as a short prompt then 183 decode
 * steps, and in uneven chunks. Two threads, so the pool's split paths run too. */
static void test_cache_vs_reference(struct kvr_model *m, const int *tokens) {
    enum { N = 200 }; /* decode steps past 128 keys attend in two pieces (transformer.c) */
    fprintf(stderr, "cache vs no-cache reference (%d tokens):\n", N);
    const struct kvr_model_config *c = kvr_model_config(m);
    int V = c->vocab_size;
    float *ref = malloc((size_t)N * V * sizeof(float)),
          *eng = malloc((size_t)N * V * sizeof(float));
    REQUIRE(ref && eng);
    REQUIRE(ref_forward_all(m, tokens, N, ref) == 0);

    struct rig r;
    rig_open(&r, m, 2, N, 1, N, (N + BT - 1) / BT + 1);
    static const struct {
        const char *name;
        int chunks[6];
        int n_chunks;
    } plans[] = {
        {"one prefill of 200", {N}, 1},
        {"prompt of 17, then 183 decode steps", {17, 1}, 2},
        {"chunks 1,31,5,64,2,97", {1, 31, 5, 64, 2, 97}, 6},
    };
    for (size_t i = 0; i < sizeof plans / sizeof plans[0]; i++) {
        struct kvr_kv_seq *s = seq_new(&r, KVR_KV_DENSE, 0, 0, N);
        memset(eng, 0xff, (size_t)N * V * sizeof(float)); /* NaN: rows never written fail */
        /* The second plan cycles {17, 1}: after the 17-token prompt, single steps. */
        int chunks[N], n_chunks = plans[i].n_chunks;
        memcpy(chunks, plans[i].chunks, (size_t)n_chunks * sizeof(int));
        if (i == 1) {
            for (int k = 1; k < N; k++)
                chunks[k] = 1;
            n_chunks = N;
        }
        CHECK_EQ(run_chunks(&r, s, tokens, N, chunks, n_chunks, eng), KVR_OK);
        check_vs_ref(plans[i].name, eng, ref, N, V);
        kvr_kv_seq_free(s);
    }
    rig_close(&r);
    free(ref);
    free(eng);
}

/* ---- 5. batched == separate ------------------------------------------------------------ */

/* Four sequences of different lengths and states, advanced together in one
 * kvr_engine_forward call per round, against the same items run one call each: A and B
 * decode (10 and 33 tokens cached), C is mid-prefill (8 of 14 prompt tokens cached, the
 * batch brings the other 6), D is a fresh 5-token prompt. Then three rounds in which all
 * four decode one token. */
static void test_batched(struct kvr_model *m, const int *tokens) {
    enum { NS = 4, ROUNDS = 4 };
    fprintf(stderr, "batched vs separate (%d sequences):\n", NS);
    struct rig r;
    rig_open(&r, m, 2, 40, NS, 64, 2 * NS * 4);
    int V = r.c->vocab_size;
    const int *src[NS] = {tokens, tokens + 50, tokens + 100, tokens + 150};
    const int setup[NS] = {10, 33, 8, 0}; /* tokens cached before round 0 */
    const int first[NS] = {1, 1, 6, 5};   /* tokens each brings in round 0 */
    struct kvr_kv_seq *bat[NS], *sep[NS];
    float *scratch = malloc((size_t)64 * V * sizeof(float));
    float *lb[NS], *ls[NS]; /* (6, V) logits of the round's tokens */
    REQUIRE(scratch);
    for (int i = 0; i < NS; i++) {
        bat[i] = seq_new(&r, KVR_KV_DENSE, 0, 0, 64);
        sep[i] = seq_new(&r, KVR_KV_DENSE, 0, 0, 64);
        lb[i] = malloc((size_t)6 * V * sizeof(float));
        ls[i] = malloc((size_t)6 * V * sizeof(float));
        REQUIRE(lb[i] && ls[i]);
        memset(lb[i], 0xff, (size_t)6 * V * sizeof(float)); /* NaN until written */
        memset(ls[i], 0xff, (size_t)6 * V * sizeof(float));
        if (setup[i]) {
            const int whole[] = {setup[i]};
            CHECK_EQ(run_chunks(&r, bat[i], src[i], setup[i], whole, 1, scratch), KVR_OK);
            CHECK_EQ(run_chunks(&r, sep[i], src[i], setup[i], whole, 1, scratch), KVR_OK);
        }
    }
    for (int round = 0; round < ROUNDS; round++) {
        struct kvr_forward_item items[NS];
        int n_rows[NS];
        for (int i = 0; i < NS; i++) {
            int past = kvr_kv_seq_n_past(bat[i]);
            n_rows[i] = round == 0 ? first[i] : 1;
            /* C asks for all its rows' logits, the others only for the last row. */
            int all = i == 2 && round == 0;
            items[i] = (struct kvr_forward_item){.seq = bat[i],
                                                 .tokens = src[i] + past,
                                                 .n_tokens = n_rows[i],
                                                 .logits = lb[i],
                                                 .all_logits = all};
            if (!all)
                n_rows[i] = 1;
        }
        CHECK_EQ(kvr_engine_forward(r.e, items, NS), KVR_OK);
        for (int i = 0; i < NS; i++) {
            struct kvr_forward_item one = items[i];
            one.seq = sep[i];
            one.logits = ls[i];
            CHECK_EQ(kvr_engine_forward(r.e, &one, 1), KVR_OK);
            char what[64];
            snprintf(what, sizeof what, "round %d seq %c (%d cached)", round, 'A' + i,
                     kvr_kv_seq_n_past(sep[i]) - items[i].n_tokens);
            check_logits_rel(what, lb[i], ls[i], n_rows[i], V);
        }
    }
    for (int i = 0; i < NS; i++) {
        int n = kvr_kv_seq_n_past(bat[i]);
        CHECK_EQ(n, kvr_kv_seq_n_past(sep[i]));
        CHECK_EQ(n, setup[i] + first[i] + ROUNDS - 1);
        char what[32];
        snprintf(what, sizeof what, "seq %c cache", 'A' + i);
        check_kv_rel(what, r.c, bat[i], sep[i], n, 0);
        kvr_kv_seq_free(bat[i]);
        kvr_kv_seq_free(sep[i]);
        free(lb[i]);
        free(ls[i]);
    }
    free(scratch);
    rig_close(&r);
}

/* ---- 5b. attention pieces: the same bits alone, batched, on any thread count ------------- */

/* A query of more than 128 keys is attended in pieces of 128 keys folded in order; alone
 * (or with few other queries) the pieces run as tasks of their own, in a batch of many
 * queries one task folds them in turn. Both must give the same bits: a sequence's logits
 * may not depend on what it is batched with or on the engine's threads. Sequence A (a
 * 20-token prompt, then single steps to 300 tokens: 1 to 3 pieces) runs alone on 2
 * threads and on 1, and on 1 thread with its decode steps batched with three others' (4
 * queries per call, the whole-query path there); every decode row's logits compared bit for bit
 * (from 128 keys this model's attention wakes the pool: on 2 threads the pieces of one
 * query run on both). Dense and sink
 * (window 200, 4 sinks: keys rotated while read), f32 and f16 caches, the model's F16 GGUF. */
static void test_pieces_bits(const int *tokens) {
    enum { N = 300, PROMPT = 20, NB = 4 };
    fprintf(stderr, "attention pieces: alone (2 and 1 threads) vs batched, bit for bit:\n");
    /* F16 weights: their products' bits do not depend on the rows of a call (F32 weights
     * take another kernel above one row, kernels.h). */
    struct kvr_model *m = NULL;
    REQUIRE(kvr_model_load(shared_path("models/gguf/stories260K-f16.gguf"), &m) == KVR_OK);
    const struct kvr_model_config *c = kvr_model_config(m);
    size_t V = (size_t)c->vocab_size, rows = (size_t)N * V;
    float *alone2 = malloc(rows * sizeof(float)), *alone1 = malloc(rows * sizeof(float)),
          *batched = malloc(rows * sizeof(float)), *other = malloc(V * sizeof(float));
    REQUIRE(alone2 && alone1 && batched && other);
    static const struct {
        enum kvr_kv_policy policy;
        int window, sinks;
        enum kvr_kv_type type;
        const char *name;
    } cases[] = {{KVR_KV_DENSE, 0, 0, KVR_KV_F32, "dense f32"},
                 {KVR_KV_DENSE, 0, 0, KVR_KV_F16, "dense f16"},
                 {KVR_KV_SINK, 200, 4, KVR_KV_F32, "sink f32"},
                 {KVR_KV_SINK, 200, 4, KVR_KV_F16, "sink f16"}};
    int chunks[N - PROMPT + 1]; /* the prompt, then single steps */
    chunks[0] = PROMPT;
    for (int i = 1; i <= N - PROMPT; i++)
        chunks[i] = 1;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        int n_blocks = NB * ((N + BT - 1) / BT + 2);
        struct rig r;
        float *outs[2] = {alone2, alone1};
        for (int nt = 2; nt >= 1; nt--) {
            rig_open_type(&r, m, cases[ci].type, nt, PROMPT, NB, N, n_blocks);
            struct kvr_kv_seq *s = seq_new(&r, cases[ci].policy, cases[ci].window, cases[ci].sinks, N);
            memset(outs[2 - nt], 0xff, rows * sizeof(float));
            CHECK_EQ(run_chunks(&r, s, tokens, N, chunks, N - PROMPT + 1, outs[2 - nt]), KVR_OK);
            kvr_kv_seq_free(s);
            rig_close(&r);
        }
        rig_open_type(&r, m, cases[ci].type, 1, PROMPT * NB, NB, N, n_blocks);
        struct kvr_kv_seq *seqs[NB];
        for (int i = 0; i < NB; i++)
            seqs[i] = seq_new(&r, cases[ci].policy, cases[ci].window, cases[ci].sinks, N);
        memset(batched, 0xff, rows * sizeof(float));
        /* Prompts one call each (a prompt's bits depend on the rows of its call: BLAS),
         * then every decode step of the four in one call. */
        for (int i = 0; i < NB; i++) {
            struct kvr_forward_item it = {.seq = seqs[i], .tokens = tokens + 7 * i, .n_tokens = PROMPT,
                                          .logits = i ? other : batched, .all_logits = i == 0};
            CHECK_EQ(kvr_engine_forward(r.e, &it, 1), KVR_OK);
        }
        for (int done = PROMPT; done < N; done++) {
            struct kvr_forward_item items[NB];
            for (int i = 0; i < NB; i++)
                items[i] = (struct kvr_forward_item){.seq = seqs[i],
                                                     .tokens = tokens + done + 7 * i,
                                                     .n_tokens = 1,
                                                     .logits = i ? NULL : batched + (size_t)done * V};
            CHECK_EQ(kvr_engine_forward(r.e, items, NB), KVR_OK);
        }
        for (int i = 0; i < NB; i++)
            kvr_kv_seq_free(seqs[i]);
        rig_close(&r);
        size_t off = (size_t)PROMPT * V, n = rows - off;
        int same21 = memcmp(alone2 + off, alone1 + off, n * sizeof(float)) == 0;
        int same_b = memcmp(alone2 + off, batched + off, n * sizeof(float)) == 0;
        size_t at;
        double e = max_abs(batched + off, alone2 + off, n, &at);
        fprintf(stderr, "  %s: 2 vs 1 thread %s, alone vs batched %s (worst |diff| %.3g at step %zu)\n",
                cases[ci].name, same21 ? "identical" : "DIFFER", same_b ? "identical" : "DIFFER", e,
                (size_t)PROMPT + at / V);
        CHECK(same21);
        CHECK(same_b);
    }
    free(alone2);
    free(alone1);
    free(batched);
    free(other);
    kvr_model_free(m);
}

/* ---- 6. shapes ------------------------------------------------------------------------- */

/* The loader must map every tensor where llama2.c's order puts it: compared byte for
 * byte with the file read here with stdio and offsets computed here. */
static void check_tensor_offsets(const char *path, const struct kvr_model *m) {
    const struct kvr_model_config *c = kvr_model_config(m);
    const struct kvr_model_weights *w = kvr_model_weights(m);
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)size);
    REQUIRE(buf && fread(buf, 1, (size_t)size, f) == (size_t)size);
    fclose(f);
    size_t d = (size_t)c->dim, h = (size_t)c->hidden_dim, L = (size_t)c->n_layers;
    size_t kv = (size_t)c->n_kv_heads * (d / (size_t)c->n_heads), V = (size_t)c->vocab_size;
    size_t hd = d / (size_t)c->n_heads;
    /* Stacked tensors in file order: (name, floats per layer or whole, layers, view of layer l). */
    struct stacked {
        const char *name;
        size_t n;  /* floats per layer (per_layer) or of the whole tensor */
        int per_layer;
    } t[] = {
        {"token_embedding", V * d, 0}, {"rms_att", d, 1},      {"wq", d * d, 1},
        {"wk", kv * d, 1},             {"wv", kv * d, 1},      {"wo", d * d, 1},
        {"rms_ffn", d, 1},             {"w1", h * d, 1},       {"w2", d * h, 1},
        {"w3", h * d, 1},              {"rms_final", d, 0},    {"(rope tables)", (size_t)c->seq_len * hd, 0},
        {"wcls", c->shared_classifier ? 0 : V * d, 0},
    };
    size_t off = 28;
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        for (size_t l = 0; l < (t[i].per_layer ? L : 1); l++) {
            const struct kvr_layer_weights *lw = &w->layers[l];
            const void *ptr = NULL;
            switch (i) {
            case 0: ptr = w->token_embedding.data; break;
            case 1: ptr = lw->rms_att; break;
            case 2: ptr = lw->wq.data; break;
            case 3: ptr = lw->wk.data; break;
            case 4: ptr = lw->wv.data; break;
            case 5: ptr = lw->wo.data; break;
            case 6: ptr = lw->rms_ffn; break;
            case 7: ptr = lw->w1.data; break;
            case 8: ptr = lw->w2.data; break;
            case 9: ptr = lw->w3.data; break;
            case 10: ptr = w->rms_final; break;
            case 12: ptr = w->wcls.data; break;
            default: break;
            }
            if (ptr && t[i].n) {
                int same = off + t[i].n * 4 <= (size_t)size && memcmp(buf + off, ptr, t[i].n * 4) == 0;
                if (!same)
                    fprintf(stderr, "  %s: tensor %s (layer %zu) is not the file's bytes at offset %zu\n",
                            path, t[i].name, l, off);
                CHECK(same);
            }
            off += t[i].n * 4;
        }
    }
    CHECK_EQ(off, size);
    CHECK(w->token_embedding.type == KVR_DTYPE_F32 && w->wcls.type == KVR_DTYPE_F32);
    if (c->shared_classifier)
        CHECK(w->wcls.data == w->token_embedding.data);
    else
        CHECK(w->wcls.data != w->token_embedding.data);
    free(buf);
}

static void test_shapes(void) {
    char dir[] = "/tmp/kvr_test_shapes_XXXXXX";
    REQUIRE(mkdtemp(dir));
    static const struct {
        const char *name;
        int heads, kv_heads, shared;
    } shapes[] = {
        {"MHA shared", 4, 4, 1},   {"MHA separate", 4, 4, 0}, {"GQA shared", 8, 2, 1},
        {"GQA separate", 4, 2, 0}, {"MQA shared", 4, 1, 1},   {"MQA separate", 8, 1, 0},
        /* Heads of 16 and 32 floats: the 512-bit attention kernels' own path. */
        {"MHA head 16", 2, 2, 1},  {"GQA head 16", 2, 1, 0},  {"one head of 32", 1, 1, 1},
    };
    enum { N = 40, PROMPT = 25 };
    int tokens[N];
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        struct kvr_model_config cfg = {.dim = 32,
                                       .hidden_dim = 56,
                                       .n_layers = 2,
                                       .n_heads = shapes[si].heads,
                                       .n_kv_heads = shapes[si].kv_heads,
                                       .vocab_size = 96,
                                       .seq_len = 64,
                                       .shared_classifier = shapes[si].shared};
        fprintf(stderr, "shape %s (dim 32, %d heads, %d kv heads, %s classifier):\n",
                shapes[si].name, cfg.n_heads, cfg.n_kv_heads,
                cfg.shared_classifier ? "shared" : "separate");
        char path[128];
        snprintf(path, sizeof path, "%s/shape%zu.bin", dir, si);
        REQUIRE(kvr_model_write_synthetic(path, &cfg, 1000 + si) == KVR_OK);
        struct kvr_model *m = NULL;
        REQUIRE(kvr_model_load(path, &m) == KVR_OK);
        const struct kvr_model_config *c = kvr_model_config(m);
        CHECK_EQ(c->n_heads, cfg.n_heads);
        CHECK_EQ(c->n_kv_heads, cfg.n_kv_heads);
        CHECK_EQ(c->shared_classifier, cfg.shared_classifier);
        CHECK_EQ(c->vocab_size, 96);
        CHECK_EQ(c->head_dim, 32 / cfg.n_heads);
        CHECK_EQ(c->kv_dim, cfg.n_kv_heads * (32 / cfg.n_heads));
        check_tensor_offsets(path, m);

        uint64_t rng = 77 + si;
        for (int i = 0; i < N; i++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            tokens[i] = (int)((rng >> 33) % 96);
        }
        float *ref = malloc((size_t)N * 96 * sizeof(float)),
              *eng = malloc((size_t)N * 96 * sizeof(float));
        REQUIRE(ref && eng);
        REQUIRE(ref_forward_all(m, tokens, N, ref) == 0);
        struct rig r;
        rig_open(&r, m, 1, PROMPT, 1, N, (N + BT - 1) / BT + 1);
        struct kvr_kv_seq *s = seq_new(&r, KVR_KV_DENSE, 0, 0, N);
        int chunks[N - PROMPT + 1];
        chunks[0] = PROMPT;
        for (int i = 1; i <= N - PROMPT; i++)
            chunks[i] = 1;
        memset(eng, 0xff, (size_t)N * 96 * sizeof(float));
        CHECK_EQ(run_chunks(&r, s, tokens, N, chunks, N - PROMPT + 1, eng), KVR_OK);
        check_vs_ref("prompt of 25 then 15 decode steps", eng, ref, N, 96);
        kvr_kv_seq_free(s);
        rig_close(&r);
        free(ref);
        free(eng);
        kvr_model_free(m);
        unlink(path);
    }
    rmdir(dir);
}

/* kvr_engine_check_item agrees with kvr_engine_forward item by item, so a caller that
 * batches independent sequences (the decode node) can leave out the one that cannot run
 * and step the others: a bad token id, a dense sequence at its limit, a window that
 * would attend more keys than the engine takes. The good ones then give the logits they
 * give alone, and a refused call changed nothing (no sequence advanced). */
static void test_check_item(struct kvr_model *m, const int *tokens) {
    struct rig r;
    rig_open(&r, m, 1, 64, 4, 64, 64);
    size_t V = (size_t)r.c->vocab_size;
    float *a = malloc(V * sizeof *a), *b = malloc(V * sizeof *b);
    REQUIRE(a && b);
    struct kvr_kv_seq *good = seq_new(&r, KVR_KV_DENSE, 0, 0, 512);
    struct kvr_kv_seq *ref = seq_new(&r, KVR_KV_DENSE, 0, 0, 512);
    struct kvr_kv_seq *full = seq_new(&r, KVR_KV_DENSE, 0, 0, 3);
    struct kvr_kv_seq *wide = seq_new(&r, KVR_KV_WINDOW, 200, 0, 0);
    static const int bad_tok[1] = {-1};
    struct kvr_forward_item items[4] = {
        {.seq = good, .tokens = tokens, .n_tokens = 8, .logits = a},
        {.seq = ref, .tokens = bad_tok, .n_tokens = 1, .logits = b},
        {.seq = full, .tokens = tokens, .n_tokens = 4, .logits = b},
        {.seq = wide, .tokens = tokens, .n_tokens = 65, .logits = b}};
    CHECK_EQ(kvr_engine_check_item(r.e, &items[0]), KVR_OK);
    CHECK_EQ(kvr_engine_check_item(r.e, &items[1]), KVR_EINVAL);
    CHECK_EQ(kvr_engine_check_item(r.e, &items[2]), KVR_ECONTEXT);
    CHECK_EQ(kvr_engine_check_item(r.e, &items[3]), KVR_EINVAL); /* 65 tokens > 64 per call */
    items[3].n_tokens = 64; /* attends 64 keys: fits */
    CHECK_EQ(kvr_engine_check_item(r.e, &items[3]), KVR_OK);
    /* The whole call is refused for any bad item, and nobody advanced. */
    CHECK_EQ(kvr_engine_forward(r.e, items, 3), KVR_EINVAL);
    CHECK_EQ(kvr_kv_seq_n_past(good), 0);
    CHECK_EQ(kvr_kv_seq_n_past(full), 0);
    /* The good item alone gives what the same tokens give in another sequence. */
    CHECK_EQ(kvr_engine_forward(r.e, &items[0], 1), KVR_OK);
    struct kvr_forward_item again = {.seq = ref, .tokens = tokens, .n_tokens = 8, .logits = b};
    CHECK_EQ(kvr_engine_forward(r.e, &again, 1), KVR_OK);
    CHECK(rel_l2(a, b, (int)V) < REL_TOL);
    kvr_kv_seq_free(good);
    kvr_kv_seq_free(ref);
    kvr_kv_seq_free(full);
    kvr_kv_seq_free(wide);
    free(a);
    free(b);
    rig_close(&r);
}

int main(void) {
    struct kvr_model *m = NULL;
    REQUIRE(kvr_model_load(shared_path("models/stories260K.bin"), &m) == KVR_OK);
    int *tokens = story_tokens(330);
    test_prefill_equals_decode(m, tokens);
    test_batched(m, tokens);
    test_pieces_bits(tokens);
    test_shapes();
    test_check_item(m, tokens);
    test_cache_vs_reference(m, tokens);
    free(tokens);
    kvr_model_free(m);
    CHECK_DONE();
}
