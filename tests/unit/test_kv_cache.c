/* test_kv_cache.c - the block pool and the policies' bookkeeping (common/kv_cache.c),
 * checked against an independent model written here from issue 4's definitions:
 *   1. accounting: KV bytes per token == 2 x layers x kv_heads x head_dim x 4 for MHA, GQA
 *      and MQA checkpoints, and bytes_used == blocks held x block bytes through real
 *      forward passes; budgets given as "512MiB"-style sizes;
 *   2. a seeded random walk of thousands of admits, appends, resets and frees over all four
 *      policies and several block sizes: every sequence holds exactly the positions its
 *      policy keeps (kvr_kv_seq_holds), exactly the blocks those positions touch, no
 *      physical block belongs to two sequences, data written into a slot survives every
 *      other sequence's traffic, ENOSPC/ECONTEXT happen exactly when predicted and change
 *      nothing, blocks held never exceed kvr_kv_blocks_needed, and the pool is full again
 *      once every sequence ends. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "kv_cache.h"
#include "model.h"
#include "options.h"
#include "status.h"
#include "transformer.h"

/* ---- 1. accounting ----------------------------------------------------------------- */

/* Budget strings: the pool takes floor(budget / block bytes) blocks and reports them. */
static void test_budget(void) {
    fprintf(stderr, "budget sizes:\n");
    const struct {
        const char *s;
        uint64_t bytes;
    } sizes[] = {{"512MiB", 512ull << 20}, {"1GiB", 1ull << 30}, {"100MB", 100000000ull},
                 {"64K", 64ull << 10},    {"4096", 4096},       {"1.5GiB", 3ull << 29}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uint64_t b = 0;
        CHECK_EQ(kvr_parse_size(sizes[i].s, &b), KVR_OK);
        CHECK_EQ(b, sizes[i].bytes);
    }
    uint64_t junk;
    CHECK(kvr_parse_size("12 parsecs", &junk) != KVR_OK);
    CHECK(kvr_parse_size("-5MiB", &junk) != KVR_OK);

    /* The bundled model's shape: 5 layers, kv_dim 32 -> 1280 bytes a token. */
    uint64_t budget = 0;
    REQUIRE(kvr_parse_size("512MiB", &budget) == KVR_OK);
    struct kvr_kv_pool_params pp = {.n_layers = 5, .kv_dim = 32, .block_tokens = 16, .budget_nbytes = budget};
    struct kvr_kv_pool *pool = NULL;
    REQUIRE(kvr_kv_pool_create(&pp, &pool) == KVR_OK);
    struct kvr_kv_pool_stats st;
    kvr_kv_pool_stats(pool, &st);
    CHECK_EQ(st.token_nbytes, 1280);
    CHECK_EQ(st.block_nbytes, 16 * 1280);
    CHECK_EQ(st.n_blocks, (int)(budget / (16 * 1280))); /* 26214 */
    CHECK_EQ(st.n_blocks, 26214);
    CHECK_EQ(st.bytes_total, (uint64_t)st.n_blocks * st.block_nbytes);
    CHECK(st.bytes_total <= budget && budget - st.bytes_total < st.block_nbytes);
    CHECK_EQ(st.bytes_used, 0);
    CHECK_EQ(st.bytes_free, st.bytes_total);
    CHECK_EQ(st.n_blocks_free, st.n_blocks);
    kvr_kv_pool_free(pool);

    /* Less than one block is refused, as are non-positive shapes. */
    pp.budget_nbytes = 16 * 1280 - 1;
    CHECK_EQ(kvr_kv_pool_create(&pp, &pool), KVR_EINVAL);
    CHECK(pool == NULL);
    pp.budget_nbytes = budget;
    pp.block_tokens = 0;
    CHECK_EQ(kvr_kv_pool_create(&pp, &pool), KVR_EINVAL);
}

/* Checks the pool's numbers against blocks counted here: bytes_used is exactly the blocks
 * held times the block size. */
static void check_stats(const struct kvr_kv_pool *pool, int blocks_held, int n_seqs) {
    struct kvr_kv_pool_stats st;
    kvr_kv_pool_stats(pool, &st);
    CHECK_EQ(st.n_blocks - st.n_blocks_free, blocks_held);
    CHECK_EQ(st.bytes_used, (uint64_t)blocks_held * st.block_nbytes);
    CHECK_EQ(st.bytes_used + st.bytes_free, st.bytes_total);
    CHECK_EQ(st.block_nbytes, (uint64_t)st.block_tokens * st.token_nbytes);
    CHECK_EQ(st.n_seqs, n_seqs);
}

/* Synthetic checkpoints of one width with 6 query heads and 6 (MHA), 2 (GQA) or 1 (MQA)
 * KV heads: the per-token formula, the 6/kv_heads ratio, and exact pool numbers while a
 * dense and a window sequence run through the real forward pass. */
static void test_shapes(void) {
    fprintf(stderr, "accounting for MHA, GQA, MQA:\n");
    const int kv_heads[] = {6, 2, 1};
    uint64_t mha_token = 0;
    for (int si = 0; si < 3; si++) {
        struct kvr_model_config c = {.dim = 48, .hidden_dim = 64, .n_layers = 3, .n_heads = 6,
                                     .n_kv_heads = kv_heads[si], .vocab_size = 64, .seq_len = 96,
                                     .shared_classifier = 1};
        char path[256];
        snprintf(path, sizeof path, "/tmp/kvr_test_kv_cache_%ld_%d.bin", (long)getpid(), si);
        REQUIRE(kvr_model_write_synthetic(path, &c, 7 + (uint64_t)si) == KVR_OK);
        struct kvr_model *m = NULL;
        REQUIRE(kvr_model_load(path, &m) == KVR_OK);
        unlink(path);
        const struct kvr_model_config *mc = kvr_model_config(m);
        int head_dim = 48 / 6;
        uint64_t formula = 2ull * 3 * (uint64_t)kv_heads[si] * (uint64_t)head_dim * 4;
        CHECK_EQ(mc->kv_dim, kv_heads[si] * head_dim);
        CHECK_EQ(kvr_kv_token_nbytes(mc->n_layers, mc->kv_dim), formula);
        if (si == 0)
            mha_token = formula;
        else
            CHECK_EQ(mha_token / formula, 6 / kv_heads[si]);

        const int bt = 8;
        struct kvr_kv_pool_params pp = {.n_layers = mc->n_layers, .kv_dim = mc->kv_dim, .block_tokens = bt,
                                        .budget_nbytes = 40 * bt * formula + 17};
        struct kvr_kv_pool *pool = NULL;
        REQUIRE(kvr_kv_pool_create(&pp, &pool) == KVR_OK);
        struct kvr_kv_pool_stats st;
        kvr_kv_pool_stats(pool, &st);
        CHECK_EQ(st.token_nbytes, formula);
        CHECK_EQ(st.n_blocks, 40);
        struct kvr_engine_params ep = {.model = m, .n_threads = 1, .n_batch_tokens_max = 32,
                                       .n_items_max = 2, .n_ctx_max = 96};
        struct kvr_engine *e = NULL;
        REQUIRE(kvr_engine_create(&ep, &e) == KVR_OK);
        struct kvr_kv_seq_params dp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = 96};
        struct kvr_kv_seq_params wp = {.policy = {.policy = KVR_KV_WINDOW, .window = 12}};
        struct kvr_kv_seq *d = NULL, *w = NULL;
        REQUIRE(kvr_kv_seq_create(pool, &dp, &d) == KVR_OK);
        REQUIRE(kvr_kv_seq_create(pool, &wp, &w) == KVR_OK);
        check_stats(pool, 0, 2);
        int toks[32];
        for (int i = 0; i < 32; i++)
            toks[i] = (i * 7 + 3) % 64;
        /* Prefill 13 tokens each, then decode one token at a time up to 60. */
        int n = 0;
        while (n < 60) {
            int k = n == 0 ? 13 : 1;
            struct kvr_forward_item it[2] = {{.seq = d, .tokens = toks + n % 16, .n_tokens = k},
                                             {.seq = w, .tokens = toks + n % 16, .n_tokens = k}};
            REQUIRE(kvr_engine_forward(e, it, 2) == KVR_OK);
            n += k;
            int held_d = (n + bt - 1) / bt;
            /* Window: the next query (position n) sees n-11..n-1; blocks from there on. */
            int first = n - 11 > 0 ? n - 11 : 0;
            int held_w = (n + bt - 1) / bt - first / bt;
            CHECK_EQ(kvr_kv_seq_n_blocks(d), held_d);
            CHECK_EQ(kvr_kv_seq_n_blocks(w), held_w);
            check_stats(pool, held_d + held_w, 2);
        }
        kvr_kv_pool_stats(pool, &st);
        CHECK_EQ(st.bytes_used, (uint64_t)(8 + 2) * bt * formula); /* 60 dense + 12 window tokens */
        kvr_kv_seq_free(d);
        check_stats(pool, kvr_kv_seq_n_blocks(w), 1);
        kvr_kv_seq_free(w);
        check_stats(pool, 0, 0);
        kvr_engine_free(e);
        kvr_kv_pool_free(pool);
        kvr_model_free(m);
    }
}

/* ---- 2. randomized admits / appends / resets / frees ------------------------------------ */

#define MAX_SEQS 10
#define N_LAYERS 2
#define KV_DIM 4

static uint64_t rng_state;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}
static int rnd_in(int lo, int hi) { return lo + (int)(rnd() % (uint32_t)(hi - lo + 1)); }

/* What the test itself knows about a live sequence. */
struct tseq {
    struct kvr_kv_seq *s;
    struct kvr_kv_policy_params pol;
    int uid;
    int n_tokens_max; /* dense */
    int n_past;       /* tokens written since create or the last reset */
    int n_res;        /* positions < n_res have a block (reserve rounds up to whole blocks) */
    int chunk_max;    /* largest append so far */
};

/* The definition, independent of kv_cache.c: the next query sits at text position n; the
 * written positions it (and every later query) may still see are [0, *n_sinks) and
 * [*recent, n). */
static void visible(const struct kvr_kv_policy_params *p, int n, int *n_sinks, int *recent) {
    int L = p->window, S = p->sinks;
    *n_sinks = 0;
    *recent = 0;
    if (p->policy == KVR_KV_WINDOW) {
        *recent = n - L + 1 > 0 ? n - L + 1 : 0; /* L keys: n-L+1 .. n */
    } else if (p->policy == KVR_KV_SINK && n >= L) {
        *n_sinks = S;
        *recent = n - (L - S) + 1; /* S sinks + (L - S) recent keys incl. the query */
    }
}

/* Whether position pos is held by the definition (written and visible, or reserved). */
static int should_hold(const struct tseq *t, int pos) {
    int ns, rb;
    visible(&t->pol, t->n_past, &ns, &rb);
    if (pos < 0 || pos >= t->n_res)
        return 0;
    if (pos >= t->n_past)
        return 1;
    return pos < ns || pos >= rb;
}

/* Logical blocks holding a held position: what the sequence must hold, no more. A block is
 * counted once even when both a sink and a recent position fall in it. */
static int expected_blocks(const struct tseq *t, int bt, int extra_end) {
    int ns, rb;
    visible(&t->pol, t->n_past, &ns, &rb);
    int end = t->n_res > extra_end ? t->n_res : extra_end; /* positions < end are reserved */
    int count = 0, last = -1;
    /* Held positions in increasing order: [0, ns) then [max(rb, ns), end). */
    for (int pass = 0; pass < 2; pass++) {
        int lo = pass == 0 ? 0 : (rb > ns ? rb : ns), hi = pass == 0 ? ns : end;
        if (lo >= hi)
            continue;
        int b0 = lo / bt, b1 = (hi - 1) / bt;
        count += b1 - b0 + 1 - (b0 == last ? 1 : 0);
        last = b1;
    }
    return count;
}

/* The block a held slot lives in: blocks are (n_layers, 2, block_tokens, kv_dim) f32, so
 * the K row of layer 0 at offset pos % bt starts (pos % bt) rows into its block. */
static const float *block_base(struct kvr_kv_seq *s, int pos, int bt) {
    float *k = NULL, *v = NULL;
    if (kvr_kv_seq_slot(s, 0, pos, &k, &v) != KVR_OK)
        return NULL;
    return k - (size_t)(pos % bt) * KV_DIM;
}

static void write_tags(struct tseq *t, int pos0, int n) {
    for (int pos = pos0; pos < pos0 + n; pos++)
        for (int l = 0; l < N_LAYERS; l++) {
            float *k = NULL, *v = NULL;
            REQUIRE(kvr_kv_seq_slot(t->s, l, pos, &k, &v) == KVR_OK);
            k[0] = (float)t->uid;
            k[1] = (float)pos;
            v[0] = (float)-t->uid;
            v[KV_DIM - 1] = (float)(l + 1);
        }
}

struct blk_owner {
    const float *base;
    int uid;
};

static int cmp_owner(const void *a, const void *b) {
    const float *x = ((const struct blk_owner *)a)->base, *y = ((const struct blk_owner *)b)->base;
    return x < y ? -1 : x > y;
}

static int n_fail_verify; /* stop printing after a few failures: the walk is long */

/* Everything the test knows must match the pool: held positions, their data, blocks
 * per sequence, no block owned twice, the pool's free count. */
static void verify(struct kvr_kv_pool *pool, struct tseq *ts, int bt, struct blk_owner *own,
                   int own_cap) {
    int n_own = 0, total = 0, live = 0, before = check_failures;
    for (int i = 0; i < MAX_SEQS; i++) {
        struct tseq *t = &ts[i];
        if (!t->s)
            continue;
        live++;
        CHECK_EQ(kvr_kv_seq_n_past(t->s), t->n_past);
        int ns, rb;
        visible(&t->pol, t->n_past, &ns, &rb);
        int nb = expected_blocks(t, bt, 0);
        CHECK_EQ(kvr_kv_seq_n_blocks(t->s), nb);
        total += kvr_kv_seq_n_blocks(t->s);
        /* Held positions: the sinks, the recent range and the reserved tail; one past each
         * end of each range and a few random positions must not be held. */
        const float *prev_base = NULL;
        int prev_lb = -1, n_distinct = 0;
        for (int pass = 0; pass < 2; pass++) {
            int lo = pass == 0 ? 0 : (rb > ns ? rb : ns), hi = pass == 0 ? ns : t->n_res;
            for (int pos = lo; pos < hi; pos++) {
                CHECK(kvr_kv_seq_holds(t->s, pos));
                const float *base = block_base(t->s, pos, bt);
                CHECK(base != NULL);
                if (pos / bt != prev_lb) {
                    /* A sink and a recent position may share a logical block: prev_lb
                     * carries over between the two ranges. */
                    n_distinct++;
                    if (n_own < own_cap)
                        own[n_own++] = (struct blk_owner){base, t->uid};
                    prev_lb = pos / bt;
                    prev_base = base;
                } else {
                    CHECK(base == prev_base); /* one logical block, one physical block */
                }
                if (pos < t->n_past) {
                    for (int l = 0; l < N_LAYERS; l++) {
                        float *k = NULL, *v = NULL;
                        REQUIRE(kvr_kv_seq_slot(t->s, l, pos, &k, &v) == KVR_OK);
                        int ok = k[0] == (float)t->uid && k[1] == (float)pos && v[0] == (float)-t->uid &&
                                 v[KV_DIM - 1] == (float)(l + 1);
                        CHECK(ok);
                    }
                }
            }
        }
        CHECK_EQ(n_distinct, nb);
        const int probes[] = {ns, rb - 1, t->n_res, t->n_res + 1, -1};
        for (size_t k = 0; k < sizeof probes / sizeof probes[0]; k++)
            CHECK_EQ(kvr_kv_seq_holds(t->s, probes[k]), should_hold(t, probes[k]));
        for (int k = 0; k < 4; k++) {
            int pos = rnd_in(0, t->n_res + 4);
            CHECK_EQ(kvr_kv_seq_holds(t->s, pos), should_hold(t, pos));
        }
    }
    /* No physical block held by two sequences (or twice by one). */
    qsort(own, (size_t)n_own, sizeof *own, cmp_owner);
    for (int i = 1; i < n_own; i++)
        CHECK(own[i].base != own[i - 1].base);
    check_stats(pool, total, live);
    if (check_failures > before && ++n_fail_verify > 3) {
        fprintf(stderr, "too many failures, stopping\n");
        exit(1);
    }
}

static void random_walk(uint64_t seed, int bt, int n_blocks, int n_ops) {
    fprintf(stderr, "random walk: seed %llu, block_tokens %d, %d blocks, %d ops\n",
            (unsigned long long)seed, bt, n_blocks, n_ops);
    rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
    struct kvr_kv_pool_params pp = {.n_layers = N_LAYERS, .kv_dim = KV_DIM, .block_tokens = bt,
                                    .budget_nbytes = (uint64_t)n_blocks * bt * kvr_kv_token_nbytes(N_LAYERS, KV_DIM)};
    struct kvr_kv_pool *pool = NULL;
    REQUIRE(kvr_kv_pool_create(&pp, &pool) == KVR_OK);
    struct tseq ts[MAX_SEQS];
    memset(ts, 0, sizeof ts);
    int own_cap = n_blocks * 2 + 8;
    struct blk_owner *own = malloc((size_t)own_cap * sizeof *own);
    REQUIRE(own);
    int uid = 0, n_enospc = 0, n_econtext = 0, n_appends = 0, n_evicting = 0;
    for (int op = 0; op < n_ops; op++) {
        int i = rnd_in(0, MAX_SEQS - 1);
        struct tseq *t = &ts[i];
        int r = rnd_in(0, 99);
        if (!t->s) {
            /* Admit with a random policy. */
            struct kvr_kv_seq_params sp = {0};
            sp.policy.policy = (enum kvr_kv_policy)rnd_in(0, 3);
            sp.policy.window = rnd_in(1, 3 * bt + 5);
            sp.policy.sinks = sp.policy.policy == KVR_KV_SINK ? rnd_in(0, sp.policy.window - 1) : 0;
            sp.n_tokens_max = rnd_in(1, 12 * bt);
            REQUIRE(kvr_kv_seq_create(pool, &sp, &t->s) == KVR_OK);
            t->pol = sp.policy;
            t->uid = ++uid;
            t->n_tokens_max = sp.n_tokens_max;
            t->n_past = t->n_res = t->chunk_max = 0;
        } else if (r < 8) {
            /* End the sequence: every block goes back. */
            struct kvr_kv_pool_stats a, b;
            kvr_kv_pool_stats(pool, &a);
            int held = kvr_kv_seq_n_blocks(t->s);
            kvr_kv_seq_free(t->s);
            kvr_kv_pool_stats(pool, &b);
            CHECK_EQ(b.n_blocks_free - a.n_blocks_free, held);
            t->s = NULL;
        } else if (r < 14 || (t->pol.policy == KVR_KV_RECOMPUTE && r < 50)) {
            kvr_kv_seq_reset(t->s);
            t->n_past = t->n_res = 0;
        } else {
            /* Append: reserve, write, advance. Recompute appends stay within L between resets
             * (the caller's contract). Long-running windowed sequences are let run on. */
            int n_new = rnd_in(0, 3) == 0 ? rnd_in(1, 2 * bt + 3) : 1;
            if (t->pol.policy == KVR_KV_RECOMPUTE) {
                if (t->n_past >= t->pol.window)
                    continue;
                if (n_new > t->pol.window - t->n_past)
                    n_new = t->pol.window - t->n_past;
            }
            int end = t->n_past + n_new;
            int want_res = (end + bt - 1) / bt * bt;
            int need = expected_blocks(t, bt, want_res) - expected_blocks(t, bt, 0);
            struct kvr_kv_pool_stats a, b;
            kvr_kv_pool_stats(pool, &a);
            int held = kvr_kv_seq_n_blocks(t->s);
            int rc = kvr_kv_seq_reserve(t->s, n_new);
            int expect = t->pol.policy == KVR_KV_DENSE && end > t->n_tokens_max ? KVR_ECONTEXT
                         : need > a.n_blocks_free                              ? KVR_ENOSPC
                                                                               : KVR_OK;
            CHECK_EQ(rc, expect);
            if (rc != KVR_OK) {
                /* All or nothing: not one block taken. */
                kvr_kv_pool_stats(pool, &b);
                CHECK_EQ(b.n_blocks_free, a.n_blocks_free);
                CHECK_EQ(kvr_kv_seq_n_blocks(t->s), held);
                CHECK_EQ(kvr_kv_seq_n_past(t->s), t->n_past);
                n_enospc += rc == KVR_ENOSPC;
                n_econtext += rc == KVR_ECONTEXT;
            } else {
                if (t->n_res < want_res)
                    t->n_res = want_res;
                if (n_new > t->chunk_max)
                    t->chunk_max = n_new;
                CHECK_EQ(kvr_kv_seq_n_blocks(t->s), held + need);
                /* Peak holding (before eviction) within what placement reserves. */
                int bound = kvr_kv_blocks_needed(&t->pol, bt, end, t->chunk_max);
                CHECK(kvr_kv_seq_n_blocks(t->s) <= bound);
                if (kvr_kv_seq_n_blocks(t->s) > bound)
                    fprintf(stderr, "  %s L=%d S=%d n=%d chunk=%d holds %d blocks > needed %d\n",
                            kvr_kv_policy_name(t->pol.policy), t->pol.window, t->pol.sinks, end,
                            t->chunk_max, kvr_kv_seq_n_blocks(t->s), bound);
                write_tags(t, t->n_past, n_new);
                kvr_kv_seq_advance(t->s, n_new);
                t->n_past = end;
                n_appends++;
                n_evicting += kvr_kv_seq_n_blocks(t->s) < held + need;
            }
        }
        verify(pool, ts, bt, own, own_cap);
    }
    for (int i = 0; i < MAX_SEQS; i++)
        kvr_kv_seq_free(ts[i].s);
    check_stats(pool, 0, 0);
    fprintf(stderr, "  %d appends (%d evicted blocks), %d ENOSPC, %d ECONTEXT, %d sequences\n", n_appends,
            n_evicting, n_enospc, n_econtext, uid);
    /* The walk must have exercised the interesting paths. */
    CHECK(n_enospc > 0);
    CHECK(n_econtext > 0);
    CHECK(n_evicting > 0);
    free(own);
    kvr_kv_pool_free(pool);
}

/* kvr_kv_blocks_needed against exact holdings for long single sequences of every policy,
 * every chunk size pattern: the bound is reached (tight) and never passed. */
static void test_blocks_needed_tight(void) {
    fprintf(stderr, "blocks_needed is tight:\n");
    const int bts[] = {1, 4, 16};
    for (size_t bi = 0; bi < 3; bi++) {
        int bt = bts[bi];
        struct kvr_kv_pool_params pp = {.n_layers = 1, .kv_dim = 1, .block_tokens = bt,
                                        .budget_nbytes = 4096ull * bt * kvr_kv_token_nbytes(1, 1)};
        struct kvr_kv_pool *pool = NULL;
        REQUIRE(kvr_kv_pool_create(&pp, &pool) == KVR_OK);
        const struct kvr_kv_policy_params pols[] = {{KVR_KV_DENSE, 0, 0},  {KVR_KV_WINDOW, 37, 0},
                                                    {KVR_KV_SINK, 37, 4}, {KVR_KV_SINK, 40, 17},
                                                    {KVR_KV_SINK, 9, 0},  {KVR_KV_WINDOW, 1, 0}};
        for (size_t pi = 0; pi < sizeof pols / sizeof pols[0]; pi++) {
            for (int chunk = 1; chunk <= 9; chunk += 4) {
                struct kvr_kv_seq_params sp = {.policy = pols[pi], .n_tokens_max = 1000};
                struct kvr_kv_seq *s = NULL;
                REQUIRE(kvr_kv_seq_create(pool, &sp, &s) == KVR_OK);
                int peak = 0, n = 0;
                while (n < 300) {
                    REQUIRE(kvr_kv_seq_reserve(s, chunk) == KVR_OK);
                    if (kvr_kv_seq_n_blocks(s) > peak)
                        peak = kvr_kv_seq_n_blocks(s);
                    kvr_kv_seq_advance(s, chunk);
                    n += chunk;
                }
                int bound = kvr_kv_blocks_needed(&pols[pi], bt, n, chunk);
                CHECK(peak <= bound);
                /* Tight within one block (alignment decides whether the worst case occurs). */
                CHECK(peak >= bound - 1);
                if (peak > bound || peak < bound - 1)
                    fprintf(stderr, "  bt=%d %s L=%d S=%d chunk=%d: peak %d, bound %d\n", bt,
                            kvr_kv_policy_name(pols[pi].policy), pols[pi].window, pols[pi].sinks, chunk,
                            peak, bound);
                kvr_kv_seq_free(s);
            }
        }
        check_stats(pool, 0, 0);
        kvr_kv_pool_free(pool);
    }
}

/* Bad parameters are refused without side effects. */
static void test_bad_params(void) {
    fprintf(stderr, "bad parameters:\n");
    struct kvr_kv_pool_params pp = {.n_layers = 1, .kv_dim = 2, .block_tokens = 4,
                                    .budget_nbytes = 8 * 4 * kvr_kv_token_nbytes(1, 2)};
    struct kvr_kv_pool *pool = NULL;
    REQUIRE(kvr_kv_pool_create(&pp, &pool) == KVR_OK);
    const struct kvr_kv_seq_params bad[] = {
        {.policy = {KVR_KV_DENSE, 0, 0}, .n_tokens_max = 0},
        {.policy = {KVR_KV_WINDOW, 0, 0}},
        {.policy = {KVR_KV_SINK, 4, 4}},
        {.policy = {KVR_KV_SINK, 4, -1}},
        {.policy = {(enum kvr_kv_policy)7, 4, 0}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct kvr_kv_seq *s = (struct kvr_kv_seq *)&pp; /* must be overwritten with NULL */
        CHECK_EQ(kvr_kv_seq_create(pool, &bad[i], &s), KVR_EINVAL);
        CHECK(s == NULL);
    }
    check_stats(pool, 0, 0);
    char err[128];
    struct kvr_kv_policy_params rc_big = {KVR_KV_RECOMPUTE, 600, 0};
    CHECK_EQ(kvr_kv_policy_check(&rc_big, 512, err, sizeof err), KVR_EINVAL);
    CHECK(strstr(err, "512") != NULL);
    struct kvr_kv_policy_params sink_ok = {KVR_KV_SINK, 256, 4};
    CHECK_EQ(kvr_kv_policy_check(&sink_ok, 512, err, sizeof err), KVR_OK);
    /* A slot that is not held is refused. */
    struct kvr_kv_seq_params wp = {.policy = {KVR_KV_WINDOW, 3, 0}};
    struct kvr_kv_seq *s = NULL;
    REQUIRE(kvr_kv_seq_create(pool, &wp, &s) == KVR_OK);
    float *k, *v;
    CHECK_EQ(kvr_kv_seq_slot(s, 0, 0, &k, &v), KVR_ERANGE);
    REQUIRE(kvr_kv_seq_reserve(s, 10) == KVR_OK);
    kvr_kv_seq_advance(s, 10);
    CHECK_EQ(kvr_kv_seq_slot(s, 0, 7, &k, &v), KVR_ERANGE); /* evicted: next query sees 8, 9 */
    CHECK_EQ(kvr_kv_seq_slot(s, 0, 8, &k, &v), KVR_OK);
    CHECK_EQ(kvr_kv_seq_slot(s, 1, 8, &k, &v), KVR_ERANGE); /* no such layer */
    CHECK_EQ(kvr_kv_seq_reserve(s, -1), KVR_EINVAL);
    float row[2] = {1, 2};
    CHECK_EQ(kvr_kv_seq_import(s, 0, 2, 1, row, row), KVR_ERANGE);
    kvr_kv_seq_free(s);
    check_stats(pool, 0, 0);
    kvr_kv_pool_free(pool);
}

int main(void) {
    test_budget();
    test_shapes();
    test_bad_params();
    test_blocks_needed_tight();
    random_walk(1, 1, 48, 5000);
    random_walk(2, 3, 24, 5000);
    random_walk(3, 4, 24, 5000);
    random_walk(4, 7, 16, 5000);
    random_walk(5, 16, 12, 5000);
    CHECK_DONE();
}
