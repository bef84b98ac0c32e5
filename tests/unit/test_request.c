/* test_request.c - the request module (coordinator/request.c), table-driven: one row per
 * case, field values at their extremes (INT32/INT64 limits, NaN, infinities, huge and
 * NUL-carrying strings, prompt together with prompt_tokens), each against a cluster's
 * limits, with the exact status, a substring of the one-line reason, and what the module
 * built. Then the block arithmetic placement shares with it, at extremes that used to
 * overflow (kv_window = INT32_MAX). No gRPC, no MPI: the same module serves any front end. */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "kv_cache.h"
#include "log.h"
#include "msg.h"
#include "request.h"
#include "status.h"
#include "tokenizer.h"

#define C 512
#define V 512

static struct kvr_tokenizer *tok;
static struct coord_req_ctx cx;

/* Cluster shapes the rows run against. */
enum shape {
    SH_NORMAL,    /* 1 prefill + 2 decode nodes, big pools */
    SH_SMALL,     /* decode pools of 5 blocks */
    SH_NARROW,    /* a prefill node that takes 8 tokens per pass; decode max_batch_tokens 256 */
    SH_COLOC,     /* colocated decode nodes only */
    SH_DECODE,    /* decode nodes only, no way to prefill */
    SH_EMPTY,     /* no live node */
    SH_DOWN,      /* not up yet (context 0) */
};

static struct coord_limits limits_of(enum shape sh, struct coord_node_limits *buf) {
    struct coord_limits l = {.seq_len = C, .vocab_size = V, .max_tokens = 1 << 24, .nodes = buf};
    struct coord_node_limits pre = {.rank = 1, .role = KVR_ROLE_PREFILL, .block_tokens = 16, .n_blocks = 100,
                                    .max_batch_tokens = 1024, .n_ctx_max = 1536};
    struct coord_node_limits dec = {.rank = 2, .role = KVR_ROLE_DECODE, .block_tokens = 16, .n_blocks = 4096,
                                    .max_batch_tokens = 512, .n_ctx_max = 1024};
    switch (sh) {
    case SH_NORMAL:
        buf[l.n_nodes++] = pre;
        buf[l.n_nodes++] = dec;
        dec.rank = 3;
        buf[l.n_nodes++] = dec;
        break;
    case SH_SMALL:
        buf[l.n_nodes++] = pre;
        dec.n_blocks = 5;
        buf[l.n_nodes++] = dec;
        break;
    case SH_NARROW:
        pre.max_batch_tokens = 8;
        buf[l.n_nodes++] = pre;
        dec.max_batch_tokens = 256;
        buf[l.n_nodes++] = dec;
        break;
    case SH_COLOC:
        dec.colocated = 1;
        buf[l.n_nodes++] = dec;
        break;
    case SH_DECODE:
        buf[l.n_nodes++] = dec;
        break;
    case SH_EMPTY:
        break;
    case SH_DOWN:
        l.seq_len = 0;
        break;
    }
    return l;
}

static const int32_t ids_ok[] = {403, 407};
static const int32_t ids_bos[] = {1};
static const int32_t ids_neg[] = {5, -1};
static const int32_t ids_vocab[] = {512};
static const int32_t ids_max[] = {INT32_MAX};
static const int32_t ids_min[] = {INT32_MIN};
static const int64_t ids64_big[] = {1, 1ll << 40};
static const int64_t ids64_ok[] = {1, 403, 407};
static int32_t ids_512[512], ids_511[511], ids_513[513];
static char text_64k[64 * 1024], text_2m[2 << 20];

#define I64(x) {1, (x)}
#define F64(x) {1, (x)}
#define TEXT(s) .prompt = (s), .prompt_len = sizeof(s) - 1
#define IDS(a) .prompt_tokens32 = (a), .n_prompt_tokens = sizeof(a) / sizeof((a)[0])

/* What a row expects of the built request (checked when want == KVR_OK). -1: not checked. */
struct expect {
    int n_tokens, max_tokens, policy, window, sinks, stop_at_eos;
    double temperature, top_p;
};
#define E_ANY {-1, -1, -1, -1, -1, -1, -1, -1}

struct row {
    const char *name;
    struct coord_gen_input in;
    enum shape shape;
    int want;
    const char *msg;
    struct expect e;
};

static struct row rows[] = {
    /* The prompt. */
    {"text", {TEXT("Once upon a time")}, SH_NORMAL, KVR_OK, NULL, {5, 507, KVR_KV_DENSE, 0, 0, 1, 1.0, 1.0}},
    {"nothing", {0}, SH_NORMAL, KVR_EINVAL, "empty prompt: give prompt (text) or prompt_tokens", E_ANY},
    {"empty text", {.prompt = "", .prompt_len = 0}, SH_NORMAL, KVR_EINVAL, "empty prompt", E_ANY},
    {"empty text and ids", {.prompt = "", .prompt_len = 0, IDS(ids_ok)}, SH_NORMAL, KVR_OK, NULL,
     {3, 509, -1, -1, -1, -1, -1, -1}},
    {"text and ids", {TEXT("a"), IDS(ids_ok)}, SH_NORMAL, KVR_EINVAL, "give prompt or prompt_tokens, not both", E_ANY},
    {"NUL text and ids", {.prompt = "\0", .prompt_len = 1, IDS(ids_ok)}, SH_NORMAL, KVR_EINVAL, "not both", E_ANY},
    {"NUL inside the text", {.prompt = "Once\0 upon a time", .prompt_len = 17}, SH_NORMAL, KVR_EINVAL,
     "prompt contains a NUL byte at offset 4", E_ANY},
    {"NUL alone", {.prompt = "\0", .prompt_len = 1}, SH_NORMAL, KVR_EINVAL, "NUL byte at offset 0", E_ANY},
    {"NUL at the end", {.prompt = "abc\0", .prompt_len = 4}, SH_NORMAL, KVR_EINVAL, "NUL byte at offset 3", E_ANY},
    {"ids get BOS first", {IDS(ids_ok)}, SH_NORMAL, KVR_OK, NULL, {3, 509, -1, -1, -1, -1, -1, -1}},
    {"BOS alone", {IDS(ids_bos)}, SH_NORMAL, KVR_OK, NULL, {1, 511, -1, -1, -1, -1, -1, -1}},
    {"64-bit ids", {.prompt_tokens64 = ids64_ok, .n_prompt_tokens = 3}, SH_NORMAL, KVR_OK, NULL,
     {3, -1, -1, -1, -1, -1, -1, -1}},
    {"id -1", {IDS(ids_neg)}, SH_NORMAL, KVR_EINVAL, "prompt_tokens[1] = -1 is outside the vocabulary [0, 512)", E_ANY},
    {"id = vocab", {IDS(ids_vocab)}, SH_NORMAL, KVR_EINVAL, "prompt_tokens[0] = 512 is outside", E_ANY},
    {"id INT32_MAX", {IDS(ids_max)}, SH_NORMAL, KVR_EINVAL, "= 2147483647 is outside", E_ANY},
    {"id INT32_MIN", {IDS(ids_min)}, SH_NORMAL, KVR_EINVAL, "= -2147483648 is outside", E_ANY},
    {"64-bit id 2^40", {.prompt_tokens64 = ids64_big, .n_prompt_tokens = 2}, SH_NORMAL, KVR_EINVAL,
     "prompt_tokens[1] = 1099511627776 is outside", E_ANY},
    {"512 ids + BOS", {IDS(ids_512)}, SH_NORMAL, KVR_EINVAL, "prompt is 513 tokens, over the model context of 512",
     E_ANY},
    {"513 ids", {IDS(ids_513)}, SH_NORMAL, KVR_EINVAL, "prompt_tokens has 513 ids, over the model context of 512",
     E_ANY},
    {"511 ids + BOS fill the context", {IDS(ids_511)}, SH_NORMAL, KVR_EINVAL,
     "prompt of 512 tokens fills the model context of 512: nothing left to generate", E_ANY},
    {"511 ids, 1 token, window", {IDS(ids_511), .max_tokens = I64(1), .kv_policy = I64(KVR_KV_WINDOW)}, SH_NORMAL,
     KVR_OK, NULL, {512, 1, KVR_KV_WINDOW, 256, 0, -1, -1, -1}},
    {"64 KiB of text", {.prompt = text_64k, .prompt_len = sizeof text_64k - 1}, SH_NORMAL, KVR_EINVAL,
     "prompt of 65535 bytes is over the model context of 512 tokens", E_ANY},
    {"2 MiB of text", {.prompt = text_2m, .prompt_len = sizeof text_2m - 1}, SH_NORMAL, KVR_EINVAL,
     "over the model context of 512 tokens", E_ANY},
    {"1200 bytes of text", {.prompt = text_64k, .prompt_len = 1200}, SH_NORMAL, KVR_EINVAL,
     "over the model context of 512", E_ANY},
    /* max_tokens. */
    {"max_tokens -1", {TEXT("Hi"), .max_tokens = I64(-1)}, SH_NORMAL, KVR_EINVAL, "max_tokens must be >= 0 (got -1)",
     E_ANY},
    {"max_tokens INT32_MIN", {TEXT("Hi"), .max_tokens = I64(INT32_MIN)}, SH_NORMAL, KVR_EINVAL,
     "max_tokens must be >= 0", E_ANY},
    {"max_tokens INT64_MIN", {TEXT("Hi"), .max_tokens = I64(INT64_MIN)}, SH_NORMAL, KVR_EINVAL,
     "max_tokens must be >= 0", E_ANY},
    {"max_tokens absent", {TEXT("Hi")}, SH_NORMAL, KVR_OK, NULL, {3, 509, -1, -1, -1, -1, -1, -1}},
    {"max_tokens 0", {TEXT("Hi"), .max_tokens = I64(0)}, SH_NORMAL, KVR_OK, NULL, {3, 509, -1, -1, -1, -1, -1, -1}},
    {"dense past the context", {TEXT("Once upon a time"), .max_tokens = I64(508)}, SH_NORMAL, KVR_EINVAL,
     "prompt (5 tokens) + max_tokens (508) exceed the model context of 512 under kv_policy dense", E_ANY},
    {"dense INT32_MAX", {TEXT("Hi"), .max_tokens = I64(INT32_MAX)}, SH_NORMAL, KVR_EINVAL,
     "+ max_tokens (2147483647) exceed the model context", E_ANY},
    {"dense INT64_MAX", {TEXT("Hi"), .max_tokens = I64(INT64_MAX)}, SH_NORMAL, KVR_EINVAL,
     "exceed the model context", E_ANY},
    {"window 2^24 tokens", {TEXT("Hi"), .max_tokens = I64(1 << 24), .kv_policy = I64(KVR_KV_WINDOW)}, SH_NORMAL,
     KVR_OK, NULL, {3, 1 << 24, KVR_KV_WINDOW, 256, -1, -1, -1, -1}},
    {"window 2^24 + 1 tokens", {TEXT("Hi"), .max_tokens = I64((1 << 24) + 1), .kv_policy = I64(KVR_KV_WINDOW)},
     SH_NORMAL, KVR_EINVAL, "max_tokens 16777217 is over the limit of 16777216", E_ANY},
    {"window INT32_MAX tokens", {TEXT("Hi"), .max_tokens = I64(INT32_MAX), .kv_policy = I64(KVR_KV_SINK)},
     SH_NORMAL, KVR_EINVAL, "is over the limit of 16777216", E_ANY},
    /* Sampling. */
    {"greedy", {TEXT("Hi"), .temperature = F64(0)}, SH_NORMAL, KVR_OK, NULL, {-1, -1, -1, -1, -1, -1, 0.0, -1}},
    {"temperature NaN", {TEXT("Hi"), .temperature = F64(NAN)}, SH_NORMAL, KVR_EINVAL,
     "temperature must be a finite number >= 0", E_ANY},
    {"temperature -0.5", {TEXT("Hi"), .temperature = F64(-0.5)}, SH_NORMAL, KVR_EINVAL, "temperature", E_ANY},
    {"temperature inf", {TEXT("Hi"), .temperature = F64(INFINITY)}, SH_NORMAL, KVR_EINVAL, "temperature", E_ANY},
    {"temperature -inf", {TEXT("Hi"), .temperature = F64(-INFINITY)}, SH_NORMAL, KVR_EINVAL, "temperature", E_ANY},
    {"temperature 1e39 (no float)", {TEXT("Hi"), .temperature = F64(1e39)}, SH_NORMAL, KVR_EINVAL, "temperature",
     E_ANY},
    {"temperature FLT_MAX", {TEXT("Hi"), .temperature = F64((double)FLT_MAX)}, SH_NORMAL, KVR_OK, NULL, E_ANY},
    {"top_p absent", {TEXT("Hi")}, SH_NORMAL, KVR_OK, NULL, {-1, -1, -1, -1, -1, -1, -1, 1.0}},
    {"top_p 0 = off", {TEXT("Hi"), .top_p = F64(0)}, SH_NORMAL, KVR_OK, NULL, {-1, -1, -1, -1, -1, -1, -1, 1.0}},
    {"top_p 0.25", {TEXT("Hi"), .top_p = F64(0.25)}, SH_NORMAL, KVR_OK, NULL, {-1, -1, -1, -1, -1, -1, -1, 0.25}},
    {"top_p NaN", {TEXT("Hi"), .top_p = F64(NAN)}, SH_NORMAL, KVR_EINVAL, "top_p must be in [0, 1]", E_ANY},
    {"top_p -0.1", {TEXT("Hi"), .top_p = F64(-0.1)}, SH_NORMAL, KVR_EINVAL, "top_p must be in [0, 1]", E_ANY},
    {"top_p 1.5", {TEXT("Hi"), .top_p = F64(1.5)}, SH_NORMAL, KVR_EINVAL, "top_p must be in [0, 1] (got 1.5)", E_ANY},
    {"ignore_eos", {TEXT("Hi"), .has_ignore_eos = 1, .ignore_eos = 1}, SH_NORMAL, KVR_OK, NULL,
     {-1, -1, -1, -1, -1, 0, -1, -1}},
    /* Policies. */
    {"policy 4", {TEXT("Hi"), .kv_policy = I64(4)}, SH_NORMAL, KVR_EINVAL, "unknown kv_policy 4", E_ANY},
    {"policy -1", {TEXT("Hi"), .kv_policy = I64(-1)}, SH_NORMAL, KVR_EINVAL, "unknown kv_policy -1", E_ANY},
    {"policy INT64_MAX", {TEXT("Hi"), .kv_policy = I64(INT64_MAX)}, SH_NORMAL, KVR_EINVAL, "unknown kv_policy", E_ANY},
    {"dense ignores a window", {TEXT("Hi"), .kv_window = I64(INT32_MIN), .kv_sinks = I64(INT32_MAX)}, SH_NORMAL,
     KVR_OK, NULL, {-1, -1, KVR_KV_DENSE, 0, 0, -1, -1, -1}},
    {"window default", {TEXT("Hi"), .kv_policy = I64(KVR_KV_WINDOW)}, SH_NORMAL, KVR_OK, NULL,
     {-1, -1, KVR_KV_WINDOW, 256, 0, -1, -1, -1}},
    {"window 0", {TEXT("Hi"), .kv_policy = I64(KVR_KV_WINDOW), .kv_window = I64(0)}, SH_NORMAL, KVR_EINVAL,
     "kv policy window needs a window of at least 1 token (got 0)", E_ANY},
    {"window -5", {TEXT("Hi"), .kv_policy = I64(KVR_KV_WINDOW), .kv_window = I64(-5)}, SH_NORMAL, KVR_EINVAL,
     "at least 1 token", E_ANY},
    {"window INT32_MAX", {TEXT("Hi"), .kv_policy = I64(KVR_KV_WINDOW), .kv_window = I64(INT32_MAX)}, SH_NORMAL,
     KVR_EINVAL, "kv policy window: window 2147483647 exceeds the model context 512", E_ANY},
    {"window 2000 (issue 15)", {TEXT("Hi"), .max_tokens = I64(1500), .kv_policy = I64(KVR_KV_WINDOW),
                                .kv_window = I64(2000), .has_ignore_eos = 1, .ignore_eos = 1},
     SH_NORMAL, KVR_EINVAL, "window 2000 exceeds the model context 512", E_ANY},
    {"window = context", {TEXT("Hi"), .max_tokens = I64(1500), .kv_policy = I64(KVR_KV_WINDOW), .kv_window = I64(512)},
     SH_NORMAL, KVR_OK, NULL, {-1, 1500, KVR_KV_WINDOW, 512, -1, -1, -1, -1}},
    {"window INT64_MAX", {TEXT("Hi"), .kv_policy = I64(KVR_KV_WINDOW), .kv_window = I64(INT64_MAX)}, SH_NORMAL,
     KVR_EINVAL, "exceeds the model context", E_ANY},
    {"sink default", {TEXT("Hi"), .kv_policy = I64(KVR_KV_SINK)}, SH_NORMAL, KVR_OK, NULL,
     {-1, -1, KVR_KV_SINK, 256, 4, -1, -1, -1}},
    {"sink window 3", {TEXT("Hi"), .kv_policy = I64(KVR_KV_SINK), .kv_window = I64(3)}, SH_NORMAL, KVR_OK, NULL,
     {-1, -1, KVR_KV_SINK, 3, 2, -1, -1, -1}},
    {"sink window 1", {TEXT("Hi"), .kv_policy = I64(KVR_KV_SINK), .kv_window = I64(1)}, SH_NORMAL, KVR_OK, NULL,
     {-1, -1, KVR_KV_SINK, 1, 0, -1, -1, -1}},
    {"sinks = window", {TEXT("Hi"), .kv_policy = I64(KVR_KV_SINK), .kv_window = I64(4), .kv_sinks = I64(4)},
     SH_NORMAL, KVR_EINVAL, "kv policy sink needs 0 <= sinks < window (got sinks 4, window 4)", E_ANY},
    {"sinks -1", {TEXT("Hi"), .kv_policy = I64(KVR_KV_SINK), .kv_sinks = I64(-1)}, SH_NORMAL, KVR_EINVAL,
     "0 <= sinks < window", E_ANY},
    {"sinks INT64_MIN", {TEXT("Hi"), .kv_policy = I64(KVR_KV_SINK), .kv_sinks = I64(INT64_MIN)}, SH_NORMAL,
     KVR_EINVAL, "0 <= sinks < window", E_ANY},
    {"sink window 600", {TEXT("Hi"), .kv_policy = I64(KVR_KV_SINK), .kv_window = I64(600)}, SH_NORMAL, KVR_EINVAL,
     "kv policy sink: window 600 exceeds the model context 512", E_ANY},
    {"recompute window 1000", {TEXT("Hi"), .kv_policy = I64(KVR_KV_RECOMPUTE), .kv_window = I64(1000)}, SH_NORMAL,
     KVR_EINVAL, "kv policy recompute: window 1000 exceeds the model context 512", E_ANY},
    {"recompute over a node's batch", {TEXT("Hi"), .kv_policy = I64(KVR_KV_RECOMPUTE), .kv_window = I64(300)},
     SH_NARROW, KVR_ENOSPC, "no decode node can run a recompute window of 300 tokens", E_ANY},
    {"recompute within the batch", {TEXT("Hi"), .kv_policy = I64(KVR_KV_RECOMPUTE), .kv_window = I64(200)},
     SH_NARROW, KVR_OK, NULL, {-1, -1, KVR_KV_RECOMPUTE, 200, -1, -1, -1, -1}},
    /* What the cluster can hold. */
    {"never fits a decode pool", {TEXT("Once upon a time"), .max_tokens = I64(252)}, SH_SMALL, KVR_ENOSPC,
     "the request needs 17 KV blocks; the largest decode node holds 5", E_ANY},
    {"fits a small pool", {TEXT("Once upon a time"), .max_tokens = I64(75)}, SH_SMALL, KVR_OK, NULL, E_ANY},
    {"window fits a small pool", {TEXT("Hi"), .max_tokens = I64(100000), .kv_policy = I64(KVR_KV_WINDOW),
                                  .kv_window = I64(32)},
     SH_SMALL, KVR_OK, NULL, E_ANY},
    {"prompt over every prefill pass", {TEXT("Once upon a time there was a little girl named Lily")}, SH_NARROW,
     KVR_ENOSPC, "no prefill node can take a prompt of", E_ANY},
    {"colocated only", {TEXT("Once upon a time")}, SH_COLOC, KVR_OK, NULL, E_ANY},
    {"nobody prefills", {TEXT("Once upon a time")}, SH_DECODE, KVR_EUNAVAIL, "no node can prefill", E_ANY},
    {"no live node", {TEXT("Once upon a time")}, SH_EMPTY, KVR_EUNAVAIL, "no decode node is alive", E_ANY},
    {"not up", {TEXT("Once upon a time")}, SH_DOWN, KVR_EUNAVAIL, "not serving", E_ANY},
};

static void run_rows(void) {
    int n_bad = 0;
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        const struct row *w = &rows[i];
        struct coord_node_limits buf[8];
        struct coord_limits lim = limits_of(w->shape, buf);
        struct coord_request q;
        char err[256];
        memset(&q, 0x5a, sizeof q); /* the module must set every field */
        int rc = coord_request_build(&cx, &w->in, &lim, &q, err, sizeof err);
        int ok = rc == w->want;
        if (ok && rc != KVR_OK)
            ok = w->msg && strstr(err, w->msg) && !strchr(err, '\n') && q.tokens == NULL;
        if (ok && rc == KVR_OK) {
            const struct expect *e = &w->e;
            ok = q.tokens && q.n_tokens >= 1 && q.tokens[0] == KVR_TOKEN_BOS && q.max_tokens >= 1 &&
                 (e->n_tokens < 0 || q.n_tokens == e->n_tokens) &&
                 (e->max_tokens < 0 || q.max_tokens == e->max_tokens) &&
                 (e->policy < 0 || (int)q.policy.policy == e->policy) &&
                 (e->window < 0 || q.policy.window == e->window) &&
                 (e->sinks < 0 || q.policy.sinks == e->sinks) &&
                 (e->stop_at_eos < 0 || q.stop_at_eos == e->stop_at_eos) &&
                 (e->temperature < 0 || (double)q.temperature == e->temperature) &&
                 (e->top_p < 0 || (double)q.top_p == e->top_p) && q.t_arrival == 0 && q.t_deadline == 0 &&
                 q.stream == NULL;
        }
        if (!ok) {
            n_bad++;
            fprintf(stderr, "  row \"%s\": got %s \"%s\" (n_tokens %d max_tokens %d policy %d window %d sinks %d "
                    "temp %g top_p %g), want %s \"%s\"\n", w->name, kvr_status_name(rc), rc == KVR_OK ? "" : err,
                    rc == KVR_OK ? q.n_tokens : 0, rc == KVR_OK ? q.max_tokens : 0,
                    rc == KVR_OK ? (int)q.policy.policy : 0, rc == KVR_OK ? q.policy.window : 0,
                    rc == KVR_OK ? q.policy.sinks : 0, rc == KVR_OK ? (double)q.temperature : 0.0,
                    rc == KVR_OK ? (double)q.top_p : 0.0, kvr_status_name(w->want), w->msg ? w->msg : "");
        }
        CHECK(ok);
        if (rc == KVR_OK)
            free(q.tokens);
    }
    fprintf(stderr, "test_request: %zu rows, %d wrong\n", sizeof rows / sizeof rows[0], n_bad);
}

/* A text prompt tokenizes exactly as the tokenizer does on its own, BOS first, and the
 * seed passes through (0 = the caller picks). */
static void test_text_and_seed(void) {
    struct coord_node_limits buf[8];
    struct coord_limits lim = limits_of(SH_NORMAL, buf);
    const char *text = "Lily and Tom went to the park";
    int want[64], n_want = 0;
    REQUIRE(kvr_tokenizer_encode(tok, text, 1, 0, want, 64, &n_want) == KVR_OK);
    struct coord_gen_input in = {.prompt = text, .prompt_len = strlen(text), .has_seed = 1, .seed = UINT64_MAX};
    struct coord_request q;
    char err[256];
    REQUIRE(coord_request_build(&cx, &in, &lim, &q, err, sizeof err) == KVR_OK);
    CHECK_EQ(q.n_tokens, n_want);
    CHECK(memcmp(q.tokens, want, (size_t)n_want * sizeof *want) == 0);
    CHECK(q.seed == UINT64_MAX);
    free(q.tokens);
    in.has_seed = 0;
    REQUIRE(coord_request_build(&cx, &in, &lim, &q, err, sizeof err) == KVR_OK);
    CHECK(q.seed == 0);
    free(q.tokens);
}

/* The block arithmetic at extremes: never negative, never more than the tokens fill,
 * monotone in the window, no overflow (the UBSan build runs this too). */
static void test_blocks(void) {
    static const int bts[] = {1, 16, 4096, 65536};
    static const int windows[] = {1, 2, 255, 256, 511, 512, 1 << 20, INT32_MAX - 1, INT32_MAX};
    static const int totals[] = {1, 2, 16, 17, 512, 1 << 24, INT32_MAX};
    int n = 0;
    for (size_t b = 0; b < sizeof bts / sizeof bts[0]; b++)
        for (int pol = KVR_KV_DENSE; pol <= KVR_KV_SINK; pol++)
            for (size_t wi = 0; wi < sizeof windows / sizeof windows[0]; wi++)
                for (size_t ti = 0; ti < sizeof totals / sizeof totals[0]; ti++)
                    for (int coloc = 0; coloc <= 1; coloc++) {
                        struct coord_request q = {.n_tokens = totals[ti] < 512 ? totals[ti] : 512,
                                                  .max_tokens = totals[ti],
                                                  .policy = {(enum kvr_kv_policy)pol, windows[wi],
                                                             pol == KVR_KV_SINK ? (windows[wi] > 4 ? 4 : 0) : 0}};
                        struct coord_node_limits d = {.role = KVR_ROLE_DECODE, .colocated = coloc,
                                                      .block_tokens = bts[b], .n_blocks = INT32_MAX,
                                                      .max_batch_tokens = INT32_MAX, .n_ctx_max = INT32_MAX / 2};
                        int64_t need = coord_request_blocks(&q, &d);
                        int64_t all = ((int64_t)q.n_tokens + q.max_tokens + bts[b] - 1) / bts[b];
                        if (need < 1 || need > all) {
                            fprintf(stderr, "  blocks: bt %d policy %d window %d total %d coloc %d -> %lld (all %lld)\n",
                                    bts[b], pol, windows[wi], totals[ti], coloc, (long long)need, (long long)all);
                            CHECK(need >= 1 && need <= all);
                        }
                        if (wi > 0 && pol != KVR_KV_DENSE) {
                            q.policy.window = windows[wi - 1];
                            q.policy.sinks = pol == KVR_KV_SINK ? (windows[wi - 1] > 4 ? 4 : 0) : 0;
                            CHECK(coord_request_blocks(&q, &d) <= need);
                        }
                        (void)coord_request_fits_decode(&q, &d);
                        n++;
                    }
    /* The numbers: window 2^31-1 on a 16-token block pool needs what the tokens
     * fill, a positive count; kvr_kv_blocks_needed itself at INT32_MAX. */
    struct kvr_kv_policy_params w = {KVR_KV_WINDOW, INT32_MAX, 0};
    CHECK_EQ(kvr_kv_blocks_needed(&w, 16, 1500 + 5, 1), (1505 + 15) / 16);
    CHECK_EQ(kvr_kv_blocks_needed(&w, 1, INT32_MAX, INT32_MAX), INT32_MAX);
    CHECK_EQ(kvr_kv_blocks_needed(&w, 0, 100, 1), 0); /* a pool without blocks holds nothing */
    fprintf(stderr, "test_request: %d block computations\n", n);
}

static void quiet(void *ud, int level, const char *line) {
    (void)ud;
    (void)level;
    (void)line;
}

int main(void) {
    kvr_log_init("test", -1);
    kvr_log_set_sink(quiet, NULL);
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), V, &tok) == KVR_OK);
    coord_req_ctx_init(&cx, tok, V);
    for (int i = 0; i < 513; i++)
        ids_513[i] = 5 + i % 400;
    memcpy(ids_512, ids_513, sizeof ids_512);
    memcpy(ids_511, ids_513, sizeof ids_511);
    for (size_t i = 0; i + 1 < sizeof text_64k; i += 2)
        memcpy(text_64k + i, "z ", 2);
    text_64k[sizeof text_64k - 1] = '\0';
    memset(text_2m, 'q', sizeof text_2m - 1);
    run_rows();
    test_text_and_seed();
    test_blocks();
    kvr_tokenizer_free(tok);
    kvr_log_set_sink(NULL, NULL);
    CHECK_DONE();
}
