/* test_golden.c - the engine against llama2.c's reference runs in ../shared/golden.
 * Teacher forcing: every greedy_N.txt's ids go through the model (as one prefill, and as
 * the prompt then one decode step per token); at every generated position the argmax
 * must be the next golden id wherever llama2.c's top-1/top-2 gap exceeds 1e-3 (below
 * that, float rounding may legitimately pick the other token). And every logit of
 * logits_once_upon_a_time.txt within 1e-4 absolute. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "golden.h"
#include "kv_cache.h"
#include "model.h"
#include "sampler.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

#define GAP_MIN   1e-3
#define LOGIT_TOL 1e-4
#define BT        16

struct rig {
    struct kvr_kv_pool *pool;
    struct kvr_engine *e;
    int V;
};

/* Runs ids[0..n) through a fresh dense sequence, all logits into logits (n, V): one
 * prefill when prompt >= n, else a prefill of prompt tokens then single steps. */
static int run(struct rig *r, const int *ids, int n, int prompt, float *logits) {
    struct kvr_kv_seq_params sp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = n};
    struct kvr_kv_seq *s = NULL;
    int rc = kvr_kv_seq_create(r->pool, &sp, &s);
    for (int done = 0; rc == KVR_OK && done < n;) {
        int k = done == 0 ? (prompt < n ? prompt : n) : 1;
        struct kvr_forward_item it = {.seq = s,
                                      .tokens = ids + done,
                                      .n_tokens = k,
                                      .logits = logits + (size_t)done * (size_t)r->V,
                                      .all_logits = 1};
        rc = kvr_engine_forward(r->e, &it, 1);
        done += k;
    }
    kvr_kv_seq_free(s);
    return rc;
}

/* Top-1 minus top-2 of one logits row. */
static float gap_of(const float *x, int n) {
    int a = kvr_argmax(x, n);
    float second = -INFINITY;
    for (int i = 0; i < n; i++)
        if (i != a && x[i] > second)
            second = x[i];
    return x[a] - second;
}

static void teacher_force(struct rig *r, const struct kvr_tokenizer *tok, const char *path) {
    struct golden_run g;
    REQUIRE(golden_run_load(path, &g) == 0);
    const char *name = strrchr(path, '/') + 1;
    /* The prompt's tokens are ids' prefix; predictions count from its last token on. */
    int enc[1024], n_prompt = 0;
    REQUIRE(strlen(g.prompt) + 3 <= 1024);
    CHECK_EQ(kvr_tokenizer_encode(tok, g.prompt, 1, 0, enc, 1024, &n_prompt), KVR_OK);
    REQUIRE(n_prompt >= 1 && n_prompt <= g.n_ids);
    int prefix_ok = memcmp(enc, g.ids, (size_t)n_prompt * sizeof(int)) == 0;
    if (!prefix_ok)
        fprintf(stderr, "  %s: the prompt's %d tokens are not the golden ids' prefix\n", name,
                n_prompt);
    CHECK(prefix_ok);

    int n = g.n_ids - 1; /* positions with a next token */
    float *logits = malloc((size_t)n * (size_t)r->V * sizeof(float));
    REQUIRE(logits);
    for (int mode = 0; mode < 2; mode++) {
        const char *how = mode == 0 ? "one prefill" : "prompt then decode steps";
        CHECK_EQ(run(r, g.ids, n, mode == 0 ? n : n_prompt, logits), KVR_OK);
        int checked = 0, skipped = 0, wrong = 0;
        double worst_gap_diff = 0;
        for (int p = n_prompt - 1; p < n; p++) {
            const float *row = logits + (size_t)p * (size_t)r->V;
            double gd = fabs((double)gap_of(row, r->V) - (double)g.gaps[p]);
            if (gd > worst_gap_diff)
                worst_gap_diff = gd;
            if (!((double)g.gaps[p] > GAP_MIN)) {
                skipped++;
                continue;
            }
            checked++;
            int got = kvr_argmax(row, r->V), want = g.ids[p + 1];
            if (got != want) {
                if (wrong < 5)
                    fprintf(stderr,
                            "  %s (%s): pos %d argmax %d (logit %.6f) but golden %d (logit %.6f), "
                            "golden gap %.6f\n",
                            name, how, p, got, (double)row[got], want, (double)row[want],
                            (double)g.gaps[p]);
                wrong++;
            }
        }
        fprintf(stderr,
                "  %s (%s): %d positions checked, %d skipped (gap <= %g), %d wrong; "
                "worst |gap - golden gap| %.3g\n",
                name, how, checked, skipped, GAP_MIN, wrong, worst_gap_diff);
        CHECK_EQ(wrong, 0);
        CHECK(checked > 100);
        /* Gaps are printed with 6 decimals; logits within 1e-4 keep gaps within 2e-4. */
        CHECK_NEAR(worst_gap_diff, 0, 2 * LOGIT_TOL);
    }
    free(logits);
    golden_run_free(&g);
}

static void check_logits_file(struct rig *r, const struct golden_run *g1) {
    struct golden_logits gl;
    REQUIRE(golden_logits_load(shared_path("golden/logits_once_upon_a_time.txt"), r->V, &gl) == 0);
    /* The file's input tokens are the start of greedy_1's ids ("Once upon a time"). */
    for (int p = 0; p < gl.n_pos; p++)
        CHECK_EQ(gl.token[p], g1->ids[p]);
    float *logits = malloc((size_t)gl.n_pos * (size_t)r->V * sizeof(float));
    REQUIRE(logits);
    for (int mode = 0; mode < 2; mode++) {
        CHECK_EQ(run(r, gl.token, gl.n_pos, mode == 0 ? gl.n_pos : 1, logits), KVR_OK);
        double worst = 0;
        int wp = 0, wt = 0, over = 0;
        for (int p = 0; p < gl.n_pos; p++) {
            for (int t = 0; t < r->V; t++) {
                size_t i = (size_t)p * (size_t)r->V + (size_t)t;
                double d = fabs((double)logits[i] - (double)gl.logits[i]);
                if (!(d <= LOGIT_TOL))
                    over++;
                if (!(d <= worst)) {
                    worst = d;
                    wp = p;
                    wt = t;
                }
            }
        }
        fprintf(stderr,
                "logits_once_upon_a_time (%s): %d positions x %d, worst |diff| %.3g at pos %d "
                "token %d (%.6f vs %.6f), %d over %g\n",
                mode == 0 ? "one prefill" : "decode steps", gl.n_pos, r->V, worst, wp, wt,
                (double)logits[(size_t)wp * r->V + wt], (double)gl.logits[(size_t)wp * r->V + wt],
                over, LOGIT_TOL);
        CHECK_EQ(over, 0);
    }
    free(logits);
    golden_logits_free(&gl);
}

int main(void) {
    struct kvr_model *m = NULL;
    struct kvr_tokenizer *tok = NULL;
    REQUIRE(kvr_model_load(shared_path("models/stories260K.bin"), &m) == KVR_OK);
    const struct kvr_model_config *c = kvr_model_config(m);
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), c->vocab_size, &tok) == KVR_OK);
    struct rig r = {.V = c->vocab_size};
    enum { CTX = 512 };
    struct kvr_kv_pool_params pp = {.n_layers = c->n_layers,
                                    .kv_dim = c->kv_dim,
                                    .block_tokens = BT,
                                    .budget_nbytes = (uint64_t)(CTX / BT + 1) * BT *
                                                     kvr_kv_token_nbytes(c->n_layers, c->kv_dim)};
    REQUIRE(kvr_kv_pool_create(&pp, &r.pool) == KVR_OK);
    struct kvr_engine_params ep = {
        .model = m, .n_threads = 2, .n_batch_tokens_max = CTX, .n_items_max = 1, .n_ctx_max = CTX};
    REQUIRE(kvr_engine_create(&ep, &r.e) == KVR_OK);

    char *paths[16];
    int n_paths = golden_run_paths(paths, 16);
    fprintf(stderr, "teacher forcing over %d golden runs:\n", n_paths);
    CHECK(n_paths >= 5);
    for (int i = 0; i < n_paths; i++)
        teacher_force(&r, tok, paths[i]);

    struct golden_run g1;
    REQUIRE(golden_run_load(shared_path("golden/greedy_1.txt"), &g1) == 0);
    check_logits_file(&r, &g1);
    golden_run_free(&g1);
    for (int i = 0; i < n_paths; i++)
        free(paths[i]);

    kvr_engine_free(r.e);
    kvr_kv_pool_free(r.pool);
    kvr_tokenizer_free(tok);
    kvr_model_free(m);
    CHECK_DONE();
}
