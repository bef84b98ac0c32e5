/* test_policies.c - the long-context policies through the real forward pass
 * (common/transformer.c over common/kv_cache.c) on the bundled stories260K model:
 *   1. window and sink logits against a naive reference written here from issue 4's
 *      definitions (which keys each query sees, at which RoPE positions), for prompts fed
 *      in mixed chunk sizes, block sizes that do not divide L or S, and S = 0;
 *   2. export/import: a sequence's held K/V copied slot by slot into a pool with another
 *      block size gives the same next-token logits, and stays the same as both decode on
 *      (evicting by their own block boundaries): the same greedy token every step, logits
 *      within the rounding of a summation order that may follow block boundaries;
 *   3. batched decode with mixed policies (dense, window, sink past its window, recompute)
 *      and lengths equals the same sequences run one call each.
 * Tolerances: the reference accumulates in double, the engine in float with BLAS orders,
 * as in test_transformer.c: 1e-4 absolute on logits (a wrong key or position moves them by
 * 1e-2 or more). Batched vs separate and export/import: 1e-5 relative L2 per logits row. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "kv_cache.h"
#include "model.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

#define REF_ABS_TOL 1e-4
#define REL_TOL 1e-5

/* ---- a naive reference of the policies ------------------------------------------------ */

static double dotd(const float *a, const float *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++)
        s += (double)a[i] * (double)b[i];
    return s;
}

static void matvec(float *out, const float *w, const float *x, int rows, int cols) {
    for (int r = 0; r < rows; r++)
        out[r] = (float)dotd(w + (size_t)r * (size_t)cols, x, cols);
}

static void rmsnorm(float *out, const float *x, const float *wt, int n) {
    float scale = (float)(1.0 / sqrt(dotd(x, x, n) / n + 1e-5));
    for (int i = 0; i < n; i++)
        out[i] = wt[i] * (scale * x[i]);
}

/* llama2.c's RoPE at position pos over n floats of whole heads of hd, in float as run.c. */
static void rope(float *vec, int n, int hd, int pos) {
    for (int i = 0; i < n; i += 2) {
        float freq = 1.0f / powf(10000.0f, (float)(i % hd) / (float)hd);
        float a = (float)pos * freq, c = cosf(a), s = sinf(a);
        float x0 = vec[i], x1 = vec[i + 1];
        vec[i] = x0 * c - x1 * s;
        vec[i + 1] = x0 * s + x1 * c;
    }
}

/* The keys query p attends under policy pol, from issue 4's text: dense all 0..p at their
 * text positions; window the last L (p-L+1..p) at text positions; sink, once p >= L, the
 * first S at 0..S-1 and the last L-S at S..L-1 with the query at L-1 (before that: dense).
 * Writes text positions into key_t, RoPE positions into key_pos, returns the count and
 * the query's RoPE position in *qpos. */
static int keys_of(const struct kvr_kv_policy_params *pol, int p, int *key_t, int *key_pos, int *qpos) {
    int n = 0, L = pol->window, S = pol->sinks;
    *qpos = p;
    if (pol->policy == KVR_KV_SINK && p >= L) {
        for (int t = 0; t < S; t++, n++)
            key_t[n] = t, key_pos[n] = t;
        for (int t = p - (L - S) + 1, cp = S; t <= p; t++, cp++, n++)
            key_t[n] = t, key_pos[n] = cp;
        *qpos = L - 1;
        return n;
    }
    int lo = pol->policy == KVR_KV_WINDOW && p - L + 1 > 0 ? p - L + 1 : 0;
    for (int t = lo; t <= p; t++, n++)
        key_t[n] = t, key_pos[n] = t;
    return n;
}

/* The float32 data of a weight (this reference runs llama2.c checkpoints only). */
static const float *f32(const struct kvr_tensor *t) {
    REQUIRE(t->type == KVR_DTYPE_F32);
    return t->data;
}

/* Logits (n, vocab) of every position of tokens[0..n) under pol, whole sequence at once,
 * layer by layer, without any cache: keys are kept unrotated and rotated per query. */
static void policy_ref(const struct kvr_model *m, const int *tokens, int n,
                       const struct kvr_kv_policy_params *pol, float *logits) {
    const struct kvr_model_config *c = kvr_model_config(m);
    const struct kvr_model_weights *w = kvr_model_weights(m);
    int d = c->dim, hd = c->head_dim, kvd = c->kv_dim, hid = c->hidden_dim, V = c->vocab_size;
    int grp = c->n_heads / c->n_kv_heads;
    size_t N = (size_t)n;
    float *x = malloc(N * d * sizeof *x), *xb = malloc((size_t)d * sizeof *xb);
    float *q = malloc(N * d * sizeof *q), *k = malloc(N * kvd * sizeof *k), *v = malloc(N * kvd * sizeof *v);
    float *att = malloc(N * d * sizeof *att), *o = malloc((size_t)d * sizeof *o);
    float *h1 = malloc((size_t)hid * sizeof *h1), *h3 = malloc((size_t)hid * sizeof *h3);
    float *qr = malloc((size_t)d * sizeof *qr), *kr = malloc((size_t)hd * sizeof *kr);
    double *sc = malloc(N * sizeof *sc);
    int *kt = malloc(N * sizeof *kt), *kp = malloc(N * sizeof *kp);
    REQUIRE(x && xb && q && k && v && att && o && h1 && h3 && qr && kr && sc && kt && kp);
    for (int t = 0; t < n; t++)
        memcpy(x + (size_t)t * d, f32(&w->token_embedding) + (size_t)tokens[t] * d, (size_t)d * sizeof *x);
    for (int l = 0; l < c->n_layers; l++) {
        const struct kvr_layer_weights *lw = &w->layers[l];
        for (int t = 0; t < n; t++) {
            rmsnorm(xb, x + (size_t)t * d, lw->rms_att, d);
            matvec(q + (size_t)t * d, f32(&lw->wq), xb, d, d);
            matvec(k + (size_t)t * kvd, f32(&lw->wk), xb, kvd, d);
            matvec(v + (size_t)t * kvd, f32(&lw->wv), xb, kvd, d);
        }
        for (int p = 0; p < n; p++) {
            int qpos, nk = keys_of(pol, p, kt, kp, &qpos);
            memcpy(qr, q + (size_t)p * d, (size_t)d * sizeof *qr);
            rope(qr, d, hd, qpos);
            for (int h = 0; h < c->n_heads; h++) {
                int g = h / grp;
                double mx = -1e300, sum = 0;
                for (int i = 0; i < nk; i++) {
                    memcpy(kr, k + (size_t)kt[i] * kvd + (size_t)g * hd, (size_t)hd * sizeof *kr);
                    rope(kr, hd, hd, kp[i]);
                    sc[i] = dotd(qr + (size_t)h * hd, kr, hd) / sqrt((double)hd);
                    if (sc[i] > mx)
                        mx = sc[i];
                }
                for (int i = 0; i < nk; i++)
                    sum += (sc[i] = exp(sc[i] - mx));
                for (int j = 0; j < hd; j++) {
                    double a = 0;
                    for (int i = 0; i < nk; i++)
                        a += sc[i] / sum * (double)v[(size_t)kt[i] * kvd + (size_t)g * hd + (size_t)j];
                    att[(size_t)p * d + (size_t)h * hd + (size_t)j] = (float)a;
                }
            }
        }
        for (int t = 0; t < n; t++) {
            float *xt = x + (size_t)t * d;
            matvec(o, f32(&lw->wo), att + (size_t)t * d, d, d);
            for (int i = 0; i < d; i++)
                xt[i] += o[i];
            rmsnorm(xb, xt, lw->rms_ffn, d);
            matvec(h1, f32(&lw->w1), xb, hid, d);
            matvec(h3, f32(&lw->w3), xb, hid, d);
            for (int i = 0; i < hid; i++)
                h1[i] = (float)((double)h1[i] / (1.0 + exp(-(double)h1[i])) * (double)h3[i]);
            matvec(o, f32(&lw->w2), h1, d, hid);
            for (int i = 0; i < d; i++)
                xt[i] += o[i];
        }
    }
    for (int t = 0; t < n; t++) {
        rmsnorm(xb, x + (size_t)t * d, w->rms_final, d);
        matvec(logits + (size_t)t * V, f32(&w->wcls), xb, V, d);
    }
    free(x), free(xb), free(q), free(k), free(v), free(att), free(o), free(h1), free(h3);
    free(qr), free(kr), free(sc), free(kt), free(kp);
}

/* ---- helpers -------------------------------------------------------------------------- */

struct rig {
    struct kvr_model *m;
    const struct kvr_model_config *c;
    struct kvr_kv_pool *pool;
    struct kvr_engine *e;
};

static void rig_open(struct rig *r, struct kvr_model *m, int bt, int n_blocks, int n_batch, int n_items,
                     int n_ctx) {
    memset(r, 0, sizeof *r);
    r->m = m;
    r->c = kvr_model_config(m);
    struct kvr_kv_pool_params pp = {
        .n_layers = r->c->n_layers, .kv_dim = r->c->kv_dim, .block_tokens = bt,
        .budget_nbytes = (uint64_t)n_blocks * (uint64_t)bt * kvr_kv_token_nbytes(r->c->n_layers, r->c->kv_dim)};
    REQUIRE(kvr_kv_pool_create(&pp, &r->pool) == KVR_OK);
    struct kvr_engine_params ep = {.model = m, .n_threads = 2, .n_batch_tokens_max = n_batch,
                                   .n_items_max = n_items, .n_ctx_max = n_ctx};
    REQUIRE(kvr_engine_create(&ep, &r->e) == KVR_OK);
}

static void rig_close(struct rig *r) {
    kvr_engine_free(r->e);
    kvr_kv_pool_free(r->pool);
}

static struct kvr_kv_seq *seq_new(struct kvr_kv_pool *pool, struct kvr_kv_policy_params pol, int n_max) {
    struct kvr_kv_seq_params sp = {.policy = pol, .n_tokens_max = n_max};
    struct kvr_kv_seq *s = NULL;
    REQUIRE(kvr_kv_seq_create(pool, &sp, &s) == KVR_OK);
    return s;
}

static double max_abs(const float *a, const float *b, size_t n, size_t *at) {
    double m = 0;
    *at = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]);
        if (!(e <= m)) { /* NaN counts as worst */
            m = isnan(e) ? (double)INFINITY : e;
            *at = i;
        }
    }
    return m;
}

static double rel_l2(const float *a, const float *b, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double e = (double)a[i] - (double)b[i];
        num += e * e;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* The first n tokens of the TinyStories validation text, BOS first. Owned. */
static int *story_tokens(int n) {
    struct kvr_tokenizer *tok = NULL;
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), 512, &tok) == KVR_OK);
    FILE *f = fopen(shared_path("data/tinystories_valid_100.txt"), "r");
    REQUIRE(f);
    size_t cap = (size_t)n * 8 + 64;
    char *text = malloc(cap + 1);
    REQUIRE(text);
    size_t len = fread(text, 1, cap, f);
    fclose(f);
    text[len] = '\0';
    int *ids = malloc((len + 3) * sizeof *ids), n_ids = 0;
    REQUIRE(ids && kvr_tokenizer_encode(tok, text, 1, 0, ids, (int)len + 3, &n_ids) == KVR_OK);
    REQUIRE(n_ids >= n);
    kvr_tokenizer_free(tok);
    free(text);
    return ids;
}

static const char *pol_str(const struct kvr_kv_policy_params *p, char *buf, size_t len) {
    snprintf(buf, len, "%s L=%d S=%d", kvr_kv_policy_name(p->policy), p->window, p->sinks);
    return buf;
}

/* ---- 1. the engine's policies against the reference --------------------------------------- */

static void test_vs_reference(struct kvr_model *m, const int *tokens) {
    enum { N = 110 };
    fprintf(stderr, "policies vs the naive reference (%d tokens):\n", N);
    const struct {
        struct kvr_kv_policy_params pol;
        int bt;
    } cases[] = {
        {{KVR_KV_WINDOW, 24, 0}, 5},  {{KVR_KV_WINDOW, 1, 0}, 3},  {{KVR_KV_WINDOW, 33, 0}, 16},
        {{KVR_KV_SINK, 24, 4}, 5},    {{KVR_KV_SINK, 24, 0}, 5},   {{KVR_KV_SINK, 30, 7}, 4},
        {{KVR_KV_SINK, 17, 16}, 16},  {{KVR_KV_SINK, 2, 1}, 1},    {{KVR_KV_DENSE, 0, 0}, 7},
    };
    /* Chunk plans: all at once (one prefill crossing the window), decode only, mixed. */
    const int plan_all[] = {N}, plan_one[] = {1}, plan_mix[] = {7, 1, 30, 1, 1, 13, 2};
    const struct {
        const int *sizes;
        int n;
        const char *name;
    } plans[] = {{plan_all, 1, "one prefill"}, {plan_one, 1, "decode"}, {plan_mix, 7, "mixed chunks"}};
    int V = kvr_model_config(m)->vocab_size;
    float *ref = malloc((size_t)N * V * sizeof *ref), *eng = malloc((size_t)N * V * sizeof *eng);
    REQUIRE(ref && eng);
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const struct kvr_kv_policy_params *pol = &cases[ci].pol;
        policy_ref(m, tokens, N, pol, ref);
        for (size_t pi = 0; pi < sizeof plans / sizeof plans[0]; pi++) {
            struct rig r;
            rig_open(&r, m, cases[ci].bt, 2 * N, N, 1, 2 * N);
            struct kvr_kv_seq *s = seq_new(r.pool, *pol, N);
            /* NaN: a row this plan never writes fails instead of keeping the last plan's. */
            memset(eng, 0xff, (size_t)N * V * sizeof *eng);
            int done = 0;
            for (int k = 0; done < N; k++) {
                int n = plans[pi].sizes[k % plans[pi].n];
                if (n > N - done)
                    n = N - done;
                struct kvr_forward_item it = {.seq = s, .tokens = tokens + done, .n_tokens = n,
                                              .logits = eng + (size_t)done * V, .all_logits = 1};
                REQUIRE(kvr_engine_forward(r.e, &it, 1) == KVR_OK);
                done += n;
                /* Held positions after each call are exactly the next query's keys. */
                int kt[2 * N], kp[2 * N], qpos;
                int nk = keys_of(pol, done, kt, kp, &qpos);
                int n_held = 0;
                for (int t = 0; t < done; t++)
                    n_held += kvr_kv_seq_holds(s, t);
                CHECK_EQ(n_held, nk - 1); /* minus the query itself, not yet written */
                for (int i = 0; i + 1 < nk; i++)
                    CHECK(kvr_kv_seq_holds(s, kt[i]));
            }
            size_t at;
            double err = max_abs(eng, ref, (size_t)N * V, &at);
            char buf[64];
            fprintf(stderr, "  %-22s bt=%-2d %-12s max |logit - ref| = %.2e (position %zu)\n",
                    pol_str(pol, buf, sizeof buf), cases[ci].bt, plans[pi].name, err, at / (size_t)V);
            CHECK(err <= REF_ABS_TOL);
            kvr_kv_seq_free(s);
            rig_close(&r);
        }
    }
    /* The reference itself must tell the policies apart once the window is full: the test
     * would be empty if window, sink and dense gave the same logits here. */
    float *alt = malloc((size_t)N * V * sizeof *alt);
    REQUIRE(alt);
    struct kvr_kv_policy_params wpol = {KVR_KV_WINDOW, 24, 0}, spol = {KVR_KV_SINK, 24, 4}, dpol = {KVR_KV_DENSE, 0, 0};
    policy_ref(m, tokens, N, &wpol, ref);
    policy_ref(m, tokens, N, &spol, alt);
    size_t at;
    CHECK(max_abs(ref, alt, (size_t)N * V, &at) > 1e-2);
    policy_ref(m, tokens, N, &dpol, alt);
    CHECK(max_abs(ref, alt, (size_t)N * V, &at) > 1e-2);
    free(alt);
    free(ref);
    free(eng);
}

/* ---- 2. export / import across block sizes ---------------------------------------------- */

/* Copies every held, written position of src into dst (a fresh sequence of the same policy
 * in another pool): positions are walked in dst-block-sized steps, each reserved, filled
 * when src still holds it, and advanced, so dst never holds more than its policy needs. */
static void copy_seq(struct kvr_kv_seq *src, struct kvr_kv_seq *dst, int dst_bt, int n_layers) {
    int n = kvr_kv_seq_n_past(src);
    for (int p0 = 0; p0 < n; p0 += dst_bt) {
        int k = n - p0 < dst_bt ? n - p0 : dst_bt;
        REQUIRE(kvr_kv_seq_reserve(dst, k) == KVR_OK);
        for (int pos = p0; pos < p0 + k; pos++) {
            if (!kvr_kv_seq_holds(src, pos))
                continue;
            for (int l = 0; l < n_layers; l++) {
                float *ks, *vs;
                REQUIRE(kvr_kv_seq_slot(src, l, pos, &ks, &vs) == KVR_OK);
                REQUIRE(kvr_kv_seq_import(dst, l, pos, 1, ks, vs) == KVR_OK);
            }
        }
        kvr_kv_seq_advance(dst, k);
    }
}

static void test_export_import(struct kvr_model *m, const int *tokens) {
    enum { N = 90, STEPS = 40 };
    fprintf(stderr, "export/import across block sizes:\n");
    const struct kvr_kv_policy_params pols[] = {
        {KVR_KV_DENSE, 0, 0}, {KVR_KV_WINDOW, 20, 0}, {KVR_KV_SINK, 20, 4}, {KVR_KV_SINK, 26, 9}};
    const int dst_bts[] = {5, 1, 32};
    const struct kvr_model_config *c = kvr_model_config(m);
    int V = c->vocab_size;
    float *la = malloc((size_t)N * V * sizeof *la), *lb = malloc((size_t)V * sizeof *lb);
    REQUIRE(la && lb);
    for (size_t pi = 0; pi < sizeof pols / sizeof pols[0]; pi++) {
        for (size_t bi = 0; bi < sizeof dst_bts / sizeof dst_bts[0]; bi++) {
            struct rig a, b;
            rig_open(&a, m, 16, 64, N, 1, 2 * N);
            rig_open(&b, m, dst_bts[bi], 400, N, 1, 2 * N);
            struct kvr_kv_seq *sa = seq_new(a.pool, pols[pi], N + STEPS), *sb = seq_new(b.pool, pols[pi], N + STEPS);
            struct kvr_forward_item it = {.seq = sa, .tokens = tokens, .n_tokens = N, .logits = la, .all_logits = 1};
            REQUIRE(kvr_engine_forward(a.e, &it, 1) == KVR_OK);
            copy_seq(sa, sb, dst_bts[bi], c->n_layers);
            CHECK_EQ(kvr_kv_seq_n_past(sb), N);
            CHECK(kvr_kv_seq_n_blocks(sb) <= kvr_kv_blocks_needed(&pols[pi], dst_bts[bi], N, dst_bts[bi]));
            for (int pos = 0; pos < N; pos++)
                CHECK_EQ(kvr_kv_seq_holds(sb, pos), kvr_kv_seq_holds(sa, pos));
            /* Decode on from both with the same tokens: the same logits each step, up to
             * the summation order of attention, which may follow block boundaries. */
            double worst = 0, worst_rel = 0;
            int same_argmax = 1;
            for (int s = 0; s < STEPS; s++) {
                int tok = tokens[N + s];
                struct kvr_forward_item ia = {.seq = sa, .tokens = &tok, .n_tokens = 1, .logits = la};
                struct kvr_forward_item ib = {.seq = sb, .tokens = &tok, .n_tokens = 1, .logits = lb};
                REQUIRE(kvr_engine_forward(a.e, &ia, 1) == KVR_OK);
                REQUIRE(kvr_engine_forward(b.e, &ib, 1) == KVR_OK);
                size_t at;
                double e = max_abs(la, lb, (size_t)V, &at), er = rel_l2(lb, la, V);
                worst = e > worst ? e : worst;
                worst_rel = er > worst_rel ? er : worst_rel;
                size_t ma = 0, mb = 0; /* argmax of each, first among equals */
                for (int i = 1; i < V; i++) {
                    ma = la[i] > la[ma] ? (size_t)i : ma;
                    mb = lb[i] > lb[mb] ? (size_t)i : mb;
                }
                same_argmax &= ma == mb;
            }
            char buf[64];
            fprintf(stderr, "  %-22s 16 -> %2d tokens/block: over %d steps max |logit diff| %.3g, rel L2 %.3g\n",
                    pol_str(&pols[pi], buf, sizeof buf), dst_bts[bi], STEPS, worst, worst_rel);
            CHECK(worst_rel <= REL_TOL);
            CHECK(same_argmax);
            kvr_kv_seq_free(sa);
            kvr_kv_seq_free(sb);
            struct kvr_kv_pool_stats st;
            kvr_kv_pool_stats(b.pool, &st);
            CHECK_EQ(st.n_blocks_free, st.n_blocks);
            rig_close(&a);
            rig_close(&b);
        }
    }
    free(la);
    free(lb);
}

/* ---- 3. mixed-policy batches == one by one ---------------------------------------------- */

static void test_mixed_batch(struct kvr_model *m, const int *tokens) {
    enum { NS = 6, ROUNDS = 30 };
    fprintf(stderr, "batched mixed policies vs one by one (%d sequences, %d rounds):\n", NS, ROUNDS);
    const struct {
        struct kvr_kv_policy_params pol;
        int setup;  /* tokens cached before round 0 */
        int first;  /* tokens brought in round 0 (a prompt when > 1) */
    } sq[NS] = {
        {{KVR_KV_DENSE, 0, 0}, 40, 1},    {{KVR_KV_WINDOW, 16, 0}, 50, 1},
        {{KVR_KV_SINK, 20, 3}, 60, 1},    {{KVR_KV_SINK, 12, 2}, 0, 9},  /* prompt, then past L */
        {{KVR_KV_WINDOW, 8, 0}, 3, 11},   {{KVR_KV_RECOMPUTE, 12, 0}, 0, 12},
    };
    int V = kvr_model_config(m)->vocab_size;
    struct rig r;
    rig_open(&r, m, 4, 400, 64, NS, 128);
    struct kvr_kv_seq *bat[NS], *sep[NS];
    int hist[NS]; /* tokens consumed so far (recompute: the text position reached) */
    float *lb = malloc((size_t)NS * 16 * V * sizeof *lb), *ls = malloc((size_t)16 * V * sizeof *ls);
    REQUIRE(lb && ls);
    for (int i = 0; i < NS; i++) {
        bat[i] = seq_new(r.pool, sq[i].pol, 200);
        sep[i] = seq_new(r.pool, sq[i].pol, 200);
        hist[i] = sq[i].setup;
        if (sq[i].setup) {
            struct kvr_forward_item a = {.seq = bat[i], .tokens = tokens + 100 * i, .n_tokens = sq[i].setup};
            struct kvr_forward_item b = a;
            b.seq = sep[i];
            REQUIRE(kvr_engine_forward(r.e, &a, 1) == KVR_OK);
            REQUIRE(kvr_engine_forward(r.e, &b, 1) == KVR_OK);
        }
    }
    double worst = 0;
    for (int round = 0; round < ROUNDS; round++) {
        struct kvr_forward_item items[NS];
        for (int i = 0; i < NS; i++) {
            const int *src = tokens + 100 * i;
            int n = round == 0 ? sq[i].first : 1;
            int all = n > 1 && i % 2 == 1; /* some prompts want every row's logits */
            if (sq[i].pol.policy == KVR_KV_RECOMPUTE) {
                /* The caller's side of recompute: reset, then the last L tokens from scratch. */
                int end = hist[i] + 1 > sq[i].first ? hist[i] + 1 : sq[i].first;
                int L = sq[i].pol.window;
                n = end < L ? end : L;
                kvr_kv_seq_reset(bat[i]);
                kvr_kv_seq_reset(sep[i]);
                items[i] = (struct kvr_forward_item){.seq = bat[i], .tokens = src + end - n, .n_tokens = n,
                                                     .logits = lb + (size_t)i * 16 * V};
                hist[i] = end;
                continue;
            }
            items[i] = (struct kvr_forward_item){.seq = bat[i], .tokens = src + hist[i], .n_tokens = n,
                                                 .logits = lb + (size_t)i * 16 * V, .all_logits = all};
            hist[i] += n;
        }
        REQUIRE(kvr_engine_forward(r.e, items, NS) == KVR_OK);
        for (int i = 0; i < NS; i++) {
            struct kvr_forward_item one = items[i];
            one.seq = sep[i];
            one.logits = ls;
            REQUIRE(kvr_engine_forward(r.e, &one, 1) == KVR_OK);
            int rows = one.all_logits ? one.n_tokens : 1;
            for (int row = 0; row < rows; row++) {
                double e = rel_l2(lb + (size_t)i * 16 * V + (size_t)row * V, ls + (size_t)row * V, V);
                if (e > worst)
                    worst = e;
                if (!(e <= REL_TOL))
                    fprintf(stderr, "  round %d seq %d (%s) row %d: rel %.3g\n", round, i,
                            kvr_kv_policy_name(sq[i].pol.policy), row, e);
                CHECK(e <= REL_TOL);
            }
            CHECK_EQ(kvr_kv_seq_n_past(bat[i]), kvr_kv_seq_n_past(sep[i]));
            CHECK_EQ(kvr_kv_seq_n_blocks(bat[i]), kvr_kv_seq_n_blocks(sep[i]));
        }
    }
    fprintf(stderr, "  worst relative L2 per logits row: %.3g\n", worst);
    /* Every windowed sequence went past its window: the rounds exercised eviction. */
    for (int i = 0; i < NS; i++)
        if (sq[i].pol.policy == KVR_KV_WINDOW || sq[i].pol.policy == KVR_KV_SINK)
            CHECK(kvr_kv_seq_n_past(bat[i]) > sq[i].pol.window);
    for (int i = 0; i < NS; i++) {
        kvr_kv_seq_free(bat[i]);
        kvr_kv_seq_free(sep[i]);
    }
    struct kvr_kv_pool_stats st;
    kvr_kv_pool_stats(r.pool, &st);
    CHECK_EQ(st.n_blocks_free, st.n_blocks);
    free(lb);
    free(ls);
    rig_close(&r);
}

int main(void) {
    struct kvr_model *m = NULL;
    REQUIRE(kvr_model_load(shared_path("models/stories260K.bin"), &m) == KVR_OK);
    int *tokens = story_tokens(700);
    test_vs_reference(m, tokens);
    test_export_import(m, tokens);
    test_mixed_batch(m, tokens);
    free(tokens);
    kvr_model_free(m);
    CHECK_DONE();
}
