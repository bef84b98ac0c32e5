/* test_grpc_server.c - the coordinator's gRPC front end (coordinator/grpc_server.c) on a
 * real localhost port, driven by the real client (cli/grpc_client.c) and by raw C-core
 * bytes, with fake_router.c in place of the MPI router: streaming order and text, every
 * INVALID_ARGUMENT case, status mapping, cancellation, deadlines, unknown methods,
 * Health/ClusterStatus, 16 concurrent streams, `kvrelay submit`/`status` end to end, and
 * shutdown with calls in flight. */
#include <float.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "clock.h"
#include "fake_router.h"
#include "golden.h"
#include "grpc_client.h"
#include "grpc_codes.h"
#include "grpc_server.h"
#include "kvrelay.pb-c.h"
#include "log.h"
#include "status.h"
#include "tokenizer.h"

#define SEQ_LEN 512
#define VOCAB   512
#define T_OUT   10.0 /* deadline of every call that should succeed */

enum {
    C_OK = 0,
    C_CANCELLED = 1,
    C_INVALID_ARGUMENT = 3,
    C_DEADLINE_EXCEEDED = 4,
    C_NOT_FOUND = 5,
    C_RESOURCE_EXHAUSTED = 8,
    C_UNIMPLEMENTED = 12,
    C_INTERNAL = 13,
    C_UNAVAILABLE = 14,
    C_DATA_LOSS = 15,
};

static struct kvr_tokenizer *tok;
static struct coord_grpc *srv;
static struct kvr_client *cli;
static char addr[64];

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double now_s(void) {
    return kvr_clock_now();
}

/* Waits until the server released every call (the gRPC side of each is over). */
static int wait_calls_released(double timeout_s) {
    double t0 = now_s();
    while (coord_grpc_active_calls(srv) != 0) {
        if (now_s() - t0 > timeout_s)
            return -1;
        sleep_ms(5);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Collecting a stream
 * ------------------------------------------------------------------------------------- */

struct collect {
    char text[1 << 16]; /* prompt_text followed by every text */
    size_t len;
    int ids[4096];
    int n;
    int n_prompt_msgs; /* messages carrying prompt_text (must be 1) */
    int bad_index;     /* a token arrived with index != its position */
    int after_done;    /* messages after the final one */
    int got_done;
    struct kvr_gen_usage done;
    int cancel_at; /* > 0: return 1 when this many tokens arrived */
};

static void append(struct collect *c, const char *s) {
    size_t k = strlen(s);
    if (c->len + k < sizeof c->text) {
        memcpy(c->text + c->len, s, k);
        c->len += k;
        c->text[c->len] = '\0';
    }
}

static int collect_fn(void *ud, const struct kvr_gen_msg *m) {
    struct collect *c = ud;
    if (c->got_done)
        c->after_done++;
    if (m->prompt_text) {
        c->n_prompt_msgs++;
        append(c, m->prompt_text);
    }
    if (m->has_token) {
        if (m->index != c->n)
            c->bad_index++;
        if (c->n < (int)(sizeof c->ids / sizeof c->ids[0]))
            c->ids[c->n] = m->token_id;
        c->n++;
        append(c, m->text);
    }
    if (m->done) {
        c->got_done = 1;
        c->done = *m->done;
    }
    return c->cancel_at > 0 && c->n >= c->cancel_at;
}

static struct collect *collect_new(void) {
    struct collect *c = calloc(1, sizeof *c);
    REQUIRE(c);
    return c;
}

static struct kvr_gen_params greedy(const char *prompt, int max_tokens) {
    return (struct kvr_gen_params){.prompt = prompt,
                                   .max_tokens = max_tokens,
                                   .temperature = 0,
                                   .kv_sinks = -1,
                                   .timeout_s = T_OUT};
}

static void configure(int emit, int finish_status, enum coord_finish reason, const char *msg) {
    struct fake_router_cfg cfg = {.emit = emit,
                                  .per_call = 1,
                                  .finish_status = finish_status,
                                  .finish_reason = reason,
                                  .finish_msg = msg,
                                  .usage = {.prefill_rank = -1, .decode_rank = -1}};
    fake_router_configure(&cfg);
}

/* ---------------------------------------------------------------------------------------
 * Tests
 * ------------------------------------------------------------------------------------- */

static void test_status_map(void) {
    CHECK_EQ(coord_grpc_code_from_status(KVR_OK), C_OK);
    CHECK_EQ(coord_grpc_code_from_status(KVR_EINVAL), C_INVALID_ARGUMENT);
    CHECK_EQ(coord_grpc_code_from_status(KVR_EFULL), C_RESOURCE_EXHAUSTED);
    CHECK_EQ(coord_grpc_code_from_status(KVR_ETIMEDOUT), C_RESOURCE_EXHAUSTED);
    CHECK_EQ(coord_grpc_code_from_status(KVR_ENOSPC), C_RESOURCE_EXHAUSTED);
    CHECK_EQ(coord_grpc_code_from_status(KVR_EUNAVAIL), C_UNAVAILABLE);
    CHECK_EQ(coord_grpc_code_from_status(KVR_ECHECKSUM), C_DATA_LOSS);
    CHECK_EQ(coord_grpc_code_from_status(KVR_EINTERNAL), C_INTERNAL);
    CHECK_EQ(coord_grpc_code_from_status(KVR_EDEADLINE), C_DEADLINE_EXCEEDED);
    CHECK_EQ(coord_grpc_code_from_status(KVR_EABORTED), 10 /* ABORTED */);
    CHECK_EQ(coord_grpc_code_from_status(-12345), C_INTERNAL);
    /* Every status maps to a real code, and only OK maps to OK. */
#define X(name, value, msg)                                                                        \
    {                                                                                              \
        int code_ = coord_grpc_code_from_status(value);                                            \
        CHECK(code_ >= 0 && code_ <= 16);                                                          \
        CHECK((value == 0) == (code_ == 0));                                                       \
    }
    KVR_STATUS_MAP(X)
#undef X
    CHECK_STREQ(kvr_grpc_code_name(C_RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
    CHECK_STREQ(kvr_grpc_code_name(C_DATA_LOSS), "DATA_LOSS");
    CHECK_STREQ(kvr_grpc_code_name(99), "UNKNOWN_CODE");
}

static void set_nodes(int decode_alive) {
    static struct coord_cluster_status st;
    static struct coord_node_status rows[3];
    memset(&st, 0, sizeof st);
    memset(rows, 0, sizeof rows);
    st.nodes = rows;
    st.n_nodes = 3;
    st.nodes[0] = (struct coord_node_status){.rank = 1,
                                             .role = "prefill",
                                             .host = "node-a",
                                             .alive = 1,
                                             .queued = 2,
                                             .queued_prompt_tokens = 1234,
                                             .running = 1,
                                             .report_age_ms = 12.5};
    st.nodes[1] = (struct coord_node_status){.rank = 2,
                                             .role = "decode",
                                             .host = "node-b",
                                             .alive = decode_alive,
                                             .kv_bytes_total = 5000000000ull,
                                             .kv_bytes_used = 1000000000ull,
                                             .kv_bytes_free = 4000000000ull,
                                             .kv_bytes_reserved = 77,
                                             .running = 7,
                                             .queued = 3,
                                             .report_age_ms = 99.25};
    st.nodes[2] = (struct coord_node_status){.rank = 3, .role = "decode", .alive = 0};
    /* A host name that fills its array: 63 characters. */
    memset(st.nodes[2].host, 'h', sizeof st.nodes[2].host - 1);
    st.waiting_requests = 4;
    st.running_requests = 9;
    st.finished_requests = 123456789012ull;
    st.seq_len = SEQ_LEN;
    st.vocab_size = VOCAB;
    fake_router_set_status(&st);
}

static void test_health_and_status(void) {
    struct kvr_rpc_status st;
    int serving = -1;
    char detail[256];
    set_nodes(1);
    CHECK_EQ(kvr_client_health(cli, T_OUT, &serving, detail, sizeof detail, &st), C_OK);
    CHECK_EQ(serving, 1);
    CHECK(strstr(detail, "1 prefill and 1 decode nodes alive, 1 down") != NULL);
    set_nodes(0);
    CHECK_EQ(kvr_client_health(cli, T_OUT, &serving, detail, sizeof detail, &st), C_OK);
    CHECK_EQ(serving, 0);
    CHECK(strstr(detail, "0 decode") != NULL);
    set_nodes(1);

    static struct coord_cluster_status want, got;
    coord_router_status(fake_router_get(), &want);
    CHECK_EQ(kvr_client_cluster_status(cli, T_OUT, &got, &st), C_OK);
    CHECK_EQ(got.n_nodes, 3);
    for (int i = 0; i < 3 && i < got.n_nodes; i++) {
        const struct coord_node_status *a = &want.nodes[i], *b = &got.nodes[i];
        CHECK_EQ(a->rank, b->rank);
        CHECK_STREQ(a->role, b->role);
        CHECK(strncmp(a->host, b->host, sizeof a->host - 1) == 0);
        CHECK_EQ(strlen(b->host), i == 2 ? 63 : strlen(a->host));
        CHECK_EQ(a->alive, b->alive);
        CHECK_EQ(a->kv_bytes_total, b->kv_bytes_total);
        CHECK_EQ(a->kv_bytes_used, b->kv_bytes_used);
        CHECK_EQ(a->kv_bytes_free, b->kv_bytes_free);
        CHECK_EQ(a->kv_bytes_reserved, b->kv_bytes_reserved);
        CHECK_EQ(a->running, b->running);
        CHECK_EQ(a->queued, b->queued);
        CHECK_EQ(a->queued_prompt_tokens, b->queued_prompt_tokens);
        CHECK_NEAR(a->report_age_ms, b->report_age_ms, 0);
    }
    CHECK_EQ(got.waiting_requests, 4);
    CHECK_EQ(got.running_requests, 9);
    CHECK_EQ(got.finished_requests, 123456789012ull);
    CHECK_EQ(got.seq_len, SEQ_LEN);
    CHECK_EQ(got.vocab_size, VOCAB);
    coord_cluster_status_deinit(&want);
    coord_cluster_status_deinit(&got);
}

/* The fake streams the llama2.c continuation of each golden prompt: the server must
 * tokenize the prompt as llama2.c did and render prompt_text + texts as run printed. */
static void test_golden_stream(void) {
    char *paths[16];
    int n_paths = golden_run_paths(paths, 16);
    CHECK(n_paths >= 5);
    for (int k = 0; k < n_paths; k++) {
        struct golden_run g;
        REQUIRE(golden_run_load(paths[k], &g) == 0);
        int enc[1024], n_prompt = 0;
        REQUIRE(kvr_tokenizer_encode(tok, g.prompt, 1, 0, enc, 1024, &n_prompt) == KVR_OK);
        int n_gen = g.n_ids - n_prompt;
        if (g.ids[g.n_ids - 1] == KVR_TOKEN_BOS)
            n_gen--; /* run stops at BOS without printing it */
        struct fake_router_cfg cfg = {.tokens = g.ids + n_prompt,
                                      .n_tokens = n_gen,
                                      .emit = -1,
                                      .per_call = 1 + k % 3,
                                      .finish_reason = g.ids[g.n_ids - 1] == KVR_TOKEN_BOS
                                                           ? COORD_FINISH_STOP
                                                           : COORD_FINISH_LENGTH,
                                      .usage = {.prompt_tokens = n_prompt,
                                                .queue_ms = 1.5,
                                                .ttft_ms = 2.25,
                                                .tpot_ms = 0.125,
                                                .total_ms = 99.5,
                                                .prefill_rank = 1,
                                                .decode_rank = 3}};
        fake_router_configure(&cfg);
        struct collect *c = collect_new();
        struct kvr_gen_params p = greedy(g.prompt, g.steps - n_prompt + 1);
        p.seed = 42;
        p.ignore_eos = 1;
        /* The golden run with an empty prompt is BOS alone: only prompt_tokens can say it. */
        int bos = KVR_TOKEN_BOS;
        if (!g.prompt[0]) {
            p.prompt = NULL;
            p.prompt_tokens = &bos;
            p.n_prompt_tokens = 1;
        }
        struct kvr_rpc_status st;
        struct kvr_gen_usage u;
        CHECK_EQ(kvr_client_generate(cli, &p, collect_fn, c, &u, &st), C_OK);
        CHECK_STREQ(c->text, g.text);
        CHECK_EQ(c->n, n_gen);
        CHECK_EQ(c->n_prompt_msgs, 1);
        CHECK_EQ(c->bad_index, 0);
        CHECK_EQ(c->after_done, 0);
        CHECK(c->got_done);
        for (int i = 0; i < n_gen && i < c->n; i++)
            if (c->ids[i] != g.ids[n_prompt + i]) {
                CHECK_EQ(c->ids[i], g.ids[n_prompt + i]);
                break;
            }
        /* What the router got. */
        const struct coord_request *r = fake_router_last();
        CHECK_EQ(r->n_tokens, n_prompt);
        CHECK(r->tokens && memcmp(r->tokens, g.ids, (size_t)n_prompt * sizeof(int)) == 0);
        CHECK_EQ(r->max_tokens, g.steps - n_prompt + 1);
        CHECK_NEAR(r->temperature, 0, 0);
        CHECK_NEAR(r->top_p, 1.0, 0); /* 0 = off becomes 1 */
        CHECK_EQ(r->seed, 42);
        CHECK_EQ(r->stop_at_eos, 0);
        CHECK_EQ(r->policy.policy, KVR_KV_DENSE);
        CHECK(r->t_arrival > 0 && r->t_arrival <= kvr_clock_now());
        /* Usage round trip. */
        CHECK_EQ(u.finish_reason, (int)cfg.finish_reason);
        CHECK_EQ(u.prompt_tokens, n_prompt);
        CHECK_EQ(u.generated_tokens, n_gen);
        CHECK_NEAR(u.queue_ms, 1.5, 0);
        CHECK_NEAR(u.ttft_ms, 2.25, 0);
        CHECK_NEAR(u.tpot_ms, 0.125, 0);
        CHECK_NEAR(u.total_ms, 99.5, 0);
        CHECK_EQ(u.prefill_rank, 1);
        CHECK_EQ(u.decode_rank, 3);
        CHECK_EQ(u.seed, 42);
        free(c);
        golden_run_free(&g);
        free(paths[k]);
    }
    CHECK_EQ(fake_router_wait_idle(10), 0);
}

static void test_request_mapping(void) {
    struct kvr_rpc_status st;
    struct kvr_gen_usage u;
    configure(2, KVR_OK, COORD_FINISH_LENGTH, NULL);

    /* prompt_tokens without BOS get it first; prompt_text renders them. */
    int ids[] = {403, 407};
    struct kvr_gen_params p = greedy(NULL, 2);
    p.prompt_tokens = ids;
    p.n_prompt_tokens = 2;
    p.temperature = 0.8f;
    p.top_p = 0.9f;
    struct collect *c = collect_new();
    CHECK_EQ(kvr_client_generate(cli, &p, collect_fn, c, &u, &st), C_OK);
    const struct coord_request *r = fake_router_last();
    CHECK_EQ(r->n_tokens, 3);
    CHECK(r->tokens && r->tokens[0] == 1 && r->tokens[1] == 403 && r->tokens[2] == 407);
    CHECK_NEAR(r->temperature, 0.8, 1e-6);
    CHECK_NEAR(r->top_p, 0.9, 1e-6);
    CHECK_EQ(r->stop_at_eos, 1);
    char want[256];
    snprintf(want, sizeof want, "%s%s", kvr_tokenizer_piece_safe(tok, 1, 403),
             kvr_tokenizer_piece_safe(tok, 403, 407));
    CHECK(strncmp(c->text, want, strlen(want)) == 0);
    free(c);

    /* seed 0: the server picks one and reports it. */
    p = greedy("Hello", 2);
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, &u, &st), C_OK);
    CHECK(fake_router_last()->seed != 0);
    CHECK_EQ(u.seed, fake_router_last()->seed);

    /* max_tokens 0 = up to the context. */
    p = greedy("Once upon a time", 0);
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, &u, &st), C_OK);
    CHECK_EQ(fake_router_last()->max_tokens, SEQ_LEN - fake_router_last()->n_tokens);

    /* Policy defaults and explicit values. */
    p = greedy("Hi", 2);
    p.kv_policy = KVR_KV_SINK;
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, &u, &st), C_OK);
    CHECK_EQ(fake_router_last()->policy.policy, KVR_KV_SINK);
    CHECK_EQ(fake_router_last()->policy.window, 256);
    CHECK_EQ(fake_router_last()->policy.sinks, 4);
    p.kv_window = 3;
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, &u, &st), C_OK);
    CHECK_EQ(fake_router_last()->policy.window, 3);
    CHECK_EQ(fake_router_last()->policy.sinks, 2);
    p.kv_window = 64;
    p.kv_sinks = 0;
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, &u, &st), C_OK);
    CHECK_EQ(fake_router_last()->policy.window, 64);
    CHECK_EQ(fake_router_last()->policy.sinks, 0);
    p = greedy("Hi", 600); /* windowed policies may generate past the context */
    p.kv_policy = KVR_KV_WINDOW;
    p.kv_window = 8;
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, &u, &st), C_OK);
    CHECK_EQ(fake_router_last()->policy.policy, KVR_KV_WINDOW);
    CHECK_EQ(fake_router_last()->policy.window, 8);
    CHECK_EQ(fake_router_last()->max_tokens, 600);
    CHECK_EQ(fake_router_wait_idle(10), 0);
}

/* Sends p and expects INVALID_ARGUMENT whose message contains want; the router must not
 * have been asked. */
static void expect_invalid(const struct kvr_gen_params *p, const char *want, int line) {
    struct fake_router_stats before, after;
    fake_router_stats(&before);
    struct kvr_rpc_status st;
    int code = kvr_client_generate(cli, p, NULL, NULL, NULL, &st);
    fake_router_stats(&after);
    check_count++;
    if (code != C_INVALID_ARGUMENT || !strstr(st.message, want) ||
        after.n_submits != before.n_submits || strchr(st.message, '\n') || !st.reached) {
        check_failures++;
        fprintf(stderr,
                "%s:%d: expected INVALID_ARGUMENT with \"%s\", got %s \"%s\" (submits %d -> %d)\n",
                __FILE__, line, want, kvr_grpc_code_name(code), st.message, before.n_submits,
                after.n_submits);
    }
}
#define EXPECT_INVALID(p, want) expect_invalid(&(p), (want), __LINE__)

static void test_invalid_arguments(void) {
    fake_router_reset();
    configure(1, KVR_OK, COORD_FINISH_LENGTH, NULL);
    struct kvr_gen_params p;
    p = greedy(NULL, 5);
    EXPECT_INVALID(p, "empty prompt");
    p = greedy("", 5);
    EXPECT_INVALID(p, "empty prompt");
    int ids[600];
    for (int i = 0; i < 600; i++)
        ids[i] = 5;
    p = greedy("a", 5);
    p.prompt_tokens = ids;
    p.n_prompt_tokens = 2;
    EXPECT_INVALID(p, "not both");
    int bad_hi[] = {1, 512}, bad_lo[] = {-1};
    p = greedy(NULL, 5);
    p.prompt_tokens = bad_hi;
    p.n_prompt_tokens = 2;
    EXPECT_INVALID(p, "prompt_tokens[1] = 512 is outside the vocabulary [0, 512)");
    p.prompt_tokens = bad_lo;
    p.n_prompt_tokens = 1;
    EXPECT_INVALID(p, "outside the vocabulary");
    p.prompt_tokens = ids;
    p.n_prompt_tokens = 600;
    p.kv_policy = KVR_KV_WINDOW; /* the prompt must fit under every policy */
    EXPECT_INVALID(p, "over the model context of 512");
    p.kv_policy = KVR_KV_DENSE;
    p.n_prompt_tokens = 512; /* BOS + 512 = 513 */
    EXPECT_INVALID(p, "over the model context");
    p.n_prompt_tokens = 511; /* BOS + 511 fills the context */
    p.max_tokens = 0;
    EXPECT_INVALID(p, "fills the model context");
    /* Long text, without and with encoding it. */
    static char text[64 * 1024];
    for (size_t i = 0; i + 2 < sizeof text; i += 2)
        memcpy(text + i, "z ", 2);
    text[sizeof text - 1] = '\0';
    p = greedy(text, 5);
    p.kv_policy = KVR_KV_SINK;
    EXPECT_INVALID(p, "over the model context");
    text[1200] = '\0';
    p = greedy(text, 5);
    EXPECT_INVALID(p, "over the model context of 512");
    p = greedy("Once upon a time", 508); /* 5 prompt tokens + 508 > 512 */
    EXPECT_INVALID(p, "prompt (5 tokens) + max_tokens (508) exceed the model context of 512 under "
                      "kv_policy dense");
    p = greedy("Once upon a time", -1);
    EXPECT_INVALID(p, "max_tokens must be >= 0");
    p = greedy("Once upon a time", 5);
    p.temperature = -0.5f;
    EXPECT_INVALID(p, "temperature");
    p.temperature = NAN;
    EXPECT_INVALID(p, "temperature");
    p.temperature = INFINITY;
    EXPECT_INVALID(p, "temperature");
    p.temperature = 1.0f;
    p.top_p = 1.5f;
    EXPECT_INVALID(p, "top_p must be in [0, 1]");
    p.top_p = -0.1f;
    EXPECT_INVALID(p, "top_p");
    p.top_p = NAN;
    EXPECT_INVALID(p, "top_p");
    p.top_p = 0.5f;
    p.kv_policy = 9;
    EXPECT_INVALID(p, "unknown kv_policy 9");
    p.kv_policy = KVR_KV_WINDOW;
    p.kv_window = -3;
    EXPECT_INVALID(p, "window of at least 1");
    p.kv_policy = KVR_KV_SINK;
    p.kv_window = 4;
    p.kv_sinks = 4;
    EXPECT_INVALID(p, "0 <= sinks < window");
    p.kv_policy = KVR_KV_RECOMPUTE;
    p.kv_window = 1000;
    p.kv_sinks = -1;
    EXPECT_INVALID(p, "exceeds the model context");

    /* Raw bytes: an explicit kv_window of 0, and bytes that are no protobuf at all. */
    struct kvr_rpc_status st;
    uint8_t *resp = NULL;
    size_t resp_len = 0;
    Kvrelay__V1__GenerateRequest r;
    kvrelay__v1__generate_request__init(&r);
    r.prompt = (char *)(uintptr_t) "Hello";
    r.kv_policy = KVRELAY__V1__KV_POLICY__KV_POLICY_WINDOW;
    r.kv_window_opt_case = KVRELAY__V1__GENERATE_REQUEST__KV_WINDOW_OPT_KV_WINDOW;
    r.kv_window = 0;
    uint8_t buf[256];
    size_t len = kvrelay__v1__generate_request__pack(&r, buf);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Generate", buf, len, T_OUT, &resp,
                              &resp_len, &st),
             C_INVALID_ARGUMENT);
    CHECK(strstr(st.message, "window of at least 1") != NULL);
    static const uint8_t garbage1[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                       0xff, 0xff, 0xff, 0xff, 0xff};
    static const uint8_t garbage2[] = {0x0a, 0x10, 'a', 'b',
                                       'c'}; /* field 1, 16 bytes promised, 3 sent */
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Generate", garbage1, sizeof garbage1,
                              T_OUT, &resp, &resp_len, &st),
             C_INVALID_ARGUMENT);
    CHECK(strstr(st.message, "cannot parse GenerateRequest (11 bytes)") != NULL);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Generate", garbage2, sizeof garbage2,
                              T_OUT, &resp, &resp_len, &st),
             C_INVALID_ARGUMENT);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Health", garbage2, sizeof garbage2, T_OUT,
                              &resp, &resp_len, &st),
             C_INVALID_ARGUMENT);
    CHECK(strstr(st.message, "HealthRequest") != NULL);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/ClusterStatus", garbage1, sizeof garbage1,
                              T_OUT, &resp, &resp_len, &st),
             C_INVALID_ARGUMENT);
    CHECK(resp == NULL);
    struct fake_router_stats fs;
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_submits, 0);
}

/* ---------------------------------------------------------------------------------------
 * A raw-protobuf client: every field at its extremes, unknown fields, NUL bytes
 * ------------------------------------------------------------------------------------- */

struct pb {
    uint8_t b[4 << 20];
    size_t n;
};

static void pb_varint(struct pb *p, uint64_t v) {
    do {
        p->b[p->n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
}
static void pb_key(struct pb *p, int field, int type) { pb_varint(p, ((uint64_t)field << 3) | (uint64_t)type); }
static void pb_int(struct pb *p, int field, int64_t v) { /* int32/int64/enum/bool: varint, sign-extended */
    pb_key(p, field, 0);
    pb_varint(p, (uint64_t)v);
}
static void pb_bytes(struct pb *p, int field, const void *d, size_t len) {
    pb_key(p, field, 2);
    pb_varint(p, len);
    memcpy(p->b + p->n, d, len);
    p->n += len;
}
static void pb_float(struct pb *p, int field, float f) {
    pb_key(p, field, 5);
    memcpy(p->b + p->n, &f, 4);
    p->n += 4;
}

struct raw_case {
    const char *what;
    int code;
    const char *msg; /* substring of the status message (NULL for OK) */
};

/* Sends the request in p to Generate and checks the status and message. */
static void raw_expect(const struct pb *p, const struct raw_case *c) {
    struct kvr_rpc_status st;
    uint8_t *resp = NULL;
    size_t len = 0;
    int code = kvr_client_unary(cli, "/kvrelay.v1.Inference/Generate", p->b, p->n, T_OUT, &resp, &len, &st);
    int ok = code == c->code && st.reached && !strchr(st.message, '\n') && (!c->msg || strstr(st.message, c->msg));
    if (!ok)
        fprintf(stderr, "  raw \"%s\": got %s \"%s\", want %s \"%s\"\n", c->what, kvr_grpc_code_name(code),
                st.message, kvr_grpc_code_name(c->code), c->msg ? c->msg : "");
    CHECK(ok);
    free(resp);
}

static void test_raw_extremes(void) {
    fake_router_reset();
    configure(0, KVR_OK, COORD_FINISH_LENGTH, NULL); /* only the final message: one reply */
    static struct pb p;
    static const int32_t i32s[] = {INT32_MAX, INT32_MIN, -1, 0};
    /* max_tokens at its extremes, under dense and under window. */
    for (size_t i = 0; i < 4; i++) {
        for (int pol = 0; pol <= 1; pol++) {
            p.n = 0;
            pb_bytes(&p, 1, "Once upon a time", 16);
            pb_int(&p, 3, i32s[i]);
            pb_int(&p, 8, pol);
            struct raw_case c = {"max_tokens", C_INVALID_ARGUMENT, NULL};
            if (i32s[i] == 0)
                c.code = C_OK;
            else if (i32s[i] < 0)
                c.msg = "max_tokens must be >= 0";
            else
                c.msg = pol ? "over the limit of 16777216" : "exceed the model context of 512";
            raw_expect(&p, &c);
        }
    }
    /* kv_window and kv_sinks (explicit, so present) at their extremes. */
    for (size_t i = 0; i < 4; i++) {
        p.n = 0;
        pb_bytes(&p, 1, "Hi", 2);
        pb_int(&p, 8, KVR_KV_WINDOW);
        pb_int(&p, 9, i32s[i]);
        struct raw_case c = {"kv_window", C_INVALID_ARGUMENT,
                             i32s[i] > 0 ? "window 2147483647 exceeds the model context 512" : "window of at least 1"};
        raw_expect(&p, &c);
        p.n = 0;
        pb_bytes(&p, 1, "Hi", 2);
        pb_int(&p, 8, KVR_KV_SINK);
        pb_int(&p, 9, 64);
        pb_int(&p, 10, i32s[i]);
        struct raw_case c2 = {"kv_sinks", i32s[i] == 0 ? C_OK : C_INVALID_ARGUMENT,
                              i32s[i] == 0 ? NULL : "0 <= sinks < window"};
        raw_expect(&p, &c2);
    }
    /* kv_policy: any int32 on the wire (proto3 enums are open). */
    for (size_t i = 0; i < 3; i++) {
        p.n = 0;
        pb_bytes(&p, 1, "Hi", 2);
        pb_int(&p, 8, i32s[i]);
        struct raw_case c = {"kv_policy", C_INVALID_ARGUMENT, "unknown kv_policy"};
        raw_expect(&p, &c);
    }
    /* Floats: NaN, infinities, the largest and the tiniest. */
    static const float fl[] = {NAN, INFINITY, -INFINITY, FLT_MAX, -FLT_MAX, FLT_MIN, -0.0f};
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++) {
        p.n = 0;
        pb_bytes(&p, 1, "Hi", 2);
        pb_float(&p, 4, fl[i]);
        int good = isfinite(fl[i]) && !(fl[i] < 0);
        struct raw_case c = {"temperature", good ? C_OK : C_INVALID_ARGUMENT, good ? NULL : "temperature must be"};
        raw_expect(&p, &c);
        p.n = 0;
        pb_bytes(&p, 1, "Hi", 2);
        pb_float(&p, 5, fl[i]);
        good = fl[i] >= 0.0f && fl[i] <= 1.0f;
        struct raw_case c2 = {"top_p", good ? C_OK : C_INVALID_ARGUMENT, good ? NULL : "top_p must be in [0, 1]"};
        raw_expect(&p, &c2);
    }
    /* seed UINT64_MAX and ignore_eos as a 10-byte varint. */
    p.n = 0;
    pb_bytes(&p, 1, "Hi", 2);
    pb_key(&p, 6, 0);
    pb_varint(&p, UINT64_MAX);
    pb_int(&p, 7, -1);
    struct raw_case ok = {"seed max", C_OK, NULL};
    raw_expect(&p, &ok);
    CHECK(fake_router_last()->seed == UINT64_MAX);
    CHECK_EQ(fake_router_last()->stop_at_eos, 0);
    /* Unknown fields of every wire type are skipped. */
    p.n = 0;
    pb_int(&p, 99, 12345);
    pb_bytes(&p, 1, "Hi", 2);
    pb_bytes(&p, 100, "\x01\x02\x03", 3);
    pb_key(&p, 101, 1);
    memset(p.b + p.n, 0xee, 8);
    p.n += 8;
    pb_key(&p, 102, 5);
    memset(p.b + p.n, 0xdd, 4);
    p.n += 4;
    pb_int(&p, 536870911, 1); /* the largest field number */
    struct raw_case unk = {"unknown fields", C_OK, NULL};
    raw_expect(&p, &unk);
    CHECK_EQ(fake_router_last()->n_tokens, 3);
    /* NUL bytes: inside the prompt, alone, and "\0" together with prompt_tokens. */
    p.n = 0;
    pb_bytes(&p, 1, "Once\0 upon a time", 17);
    struct raw_case nul = {"NUL inside", C_INVALID_ARGUMENT, "prompt contains a NUL byte at offset 4"};
    raw_expect(&p, &nul);
    p.n = 0;
    pb_bytes(&p, 1, "\0", 1);
    pb_bytes(&p, 2, "\x91\x03", 2); /* packed prompt_tokens: 401 */
    struct raw_case both = {"NUL with ids", C_INVALID_ARGUMENT, "give prompt or prompt_tokens, not both"};
    raw_expect(&p, &both);
    p.n = 0;
    pb_bytes(&p, 1, "\0", 1);
    struct raw_case nul1 = {"NUL alone", C_INVALID_ARGUMENT, "NUL byte at offset 0"};
    raw_expect(&p, &nul1);
    /* The last prompt on the wire wins (proto3), and its NUL is seen. */
    p.n = 0;
    pb_bytes(&p, 1, "fine", 4);
    pb_bytes(&p, 1, "bad\0", 4);
    raw_expect(&p, &(struct raw_case){"last prompt wins", C_INVALID_ARGUMENT, "NUL byte at offset 3"});
    /* Huge strings and id lists (under gRPC's 4 MiB message limit). */
    static char big[3 << 20];
    memset(big, 'a', sizeof big);
    p.n = 0;
    pb_bytes(&p, 1, big, sizeof big);
    raw_expect(&p, &(struct raw_case){"3 MiB prompt", C_INVALID_ARGUMENT, "over the model context of 512 tokens"});
    p.n = 0;
    pb_key(&p, 2, 2);
    pb_varint(&p, 200000);
    memset(p.b + p.n, 5, 200000); /* 200000 ids of 5 */
    p.n += 200000;
    raw_expect(&p, &(struct raw_case){"200000 ids", C_INVALID_ARGUMENT, "prompt_tokens has 200000 ids"});
    p.n = 0;
    pb_key(&p, 2, 2);
    pb_varint(&p, 10);
    memset(p.b + p.n, 0xff, 9); /* one id of -1: a 10-byte varint */
    p.n += 9;
    p.b[p.n++] = 0x01;
    raw_expect(&p, &(struct raw_case){"id -1", C_INVALID_ARGUMENT, "prompt_tokens[0] = -1 is outside"});
    struct fake_router_stats fs;
    fake_router_stats(&fs);
    fprintf(stderr, "test_grpc_server: raw extremes: %d admitted\n", fs.n_admitted);
    CHECK_EQ(fake_router_wait_idle(10), 0);
    fake_router_reset();
}

/* The server-side deadline reaches the router; limits come from the router: a request no
 * node can hold is RESOURCE_EXHAUSTED at the edge, none alive is UNAVAILABLE. */
static void test_deadline_and_limits(void) {
    fake_router_reset();
    configure(0, KVR_OK, COORD_FINISH_LENGTH, NULL);
    struct kvr_rpc_status st;
    struct kvr_gen_params p = greedy("Once upon a time", 10);
    p.timeout_s = 7.0;
    double t0 = kvr_clock_now();
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_OK);
    const struct coord_request *r = fake_router_last();
    CHECK(r->t_deadline > t0 + 6.0 && r->t_deadline < t0 + 7.5);
    p.timeout_s = 0;
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_OK);
    CHECK(fake_router_last()->t_deadline == 0);

    static struct coord_node_limits small[2] = {
        {.rank = 1, .role = 1, .block_tokens = 16, .n_blocks = 100, .max_batch_tokens = 1024, .n_ctx_max = 1536},
        {.rank = 2, .role = 2, .block_tokens = 16, .n_blocks = 5, .max_batch_tokens = 512, .n_ctx_max = 1024}};
    struct coord_limits lim = {.seq_len = SEQ_LEN, .vocab_size = VOCAB, .max_tokens = 1 << 24, .n_nodes = 2,
                               .nodes = small};
    fake_router_set_limits(&lim);
    struct fake_router_stats before, after;
    fake_router_stats(&before);
    p = greedy("Once upon a time", 252);
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_RESOURCE_EXHAUSTED);
    CHECK(strstr(st.message, "the request needs 17 KV blocks; the largest decode node holds 5") != NULL);
    lim.n_nodes = 1; /* only the prefill node is alive */
    fake_router_set_limits(&lim);
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_UNAVAILABLE);
    CHECK(strstr(st.message, "no decode node is alive") != NULL);
    fake_router_stats(&after);
    CHECK_EQ(after.n_submits, before.n_submits); /* refused at the edge, before the router */
    lim.n_nodes = 2;
    small[1].n_blocks = 4096;
    fake_router_set_limits(&lim);
    CHECK_EQ(fake_router_wait_idle(10), 0);
    fake_router_reset();
}

static void test_unknown_method(void) {
    struct kvr_rpc_status st;
    uint8_t *resp = NULL;
    size_t len = 0;
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Nope", "", 0, T_OUT, &resp, &len, &st),
             C_UNIMPLEMENTED);
    CHECK(strstr(st.message, "unknown method /kvrelay.v1.Inference/Nope") != NULL);
    CHECK_EQ(kvr_client_unary(cli, "/grpc.health.v1.Health/Nope", "", 0, T_OUT, &resp, &len, &st),
             C_UNIMPLEMENTED);
    CHECK_EQ(st.reached, 1);
}

/* grpc.health.v1.Health/Check: SERVING exactly when the custom Health says serving; an
 * unknown service is NOT_FOUND. (tests/e2e/test_http.py calls it with grpcio, Watch too.) */
static void test_health_v1(void) {
    struct kvr_rpc_status st;
    uint8_t *resp = NULL;
    size_t len = 0;
    set_nodes(1);
    CHECK_EQ(kvr_client_unary(cli, "/grpc.health.v1.Health/Check", "", 0, T_OUT, &resp, &len, &st),
             C_OK);
    CHECK_EQ(len, 2);
    CHECK(len == 2 && resp[0] == 0x08 && resp[1] == 1); /* status: SERVING */
    free(resp);
    resp = NULL;
    static const char svc[] = "\x0a\x14kvrelay.v1.Inference";
    CHECK_EQ(kvr_client_unary(cli, "/grpc.health.v1.Health/Check", svc, sizeof svc - 1, T_OUT,
                              &resp, &len, &st),
             C_OK);
    CHECK(len == 2 && resp[0] == 0x08 && resp[1] == 1);
    free(resp);
    resp = NULL;
    set_nodes(0);
    CHECK_EQ(kvr_client_unary(cli, "/grpc.health.v1.Health/Check", "", 0, T_OUT, &resp, &len, &st),
             C_OK);
    CHECK(len == 2 && resp[0] == 0x08 && resp[1] == 2); /* NOT_SERVING */
    free(resp);
    resp = NULL;
    set_nodes(1);
    CHECK_EQ(kvr_client_unary(cli, "/grpc.health.v1.Health/Check",
                              "\x0a\x03"
                              "foo",
                              5, T_OUT, &resp, &len, &st),
             C_NOT_FOUND);
    free(resp);
}

/* Scale and Drain reach the router's calls with the request's value and map their
 * statuses (the fake router accepts targets 1-8 and a drain of rank 2). */
static void test_scale_and_drain(void) {
    struct kvr_rpc_status st;
    uint8_t buf[32], *resp = NULL;
    size_t len = 0;
    Kvrelay__V1__ScaleRequest sq;
    kvrelay__v1__scale_request__init(&sq);
    sq.decode = 4;
    size_t n = kvrelay__v1__scale_request__pack(&sq, buf);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Scale", buf, n, T_OUT, &resp, &len, &st), C_OK);
    Kvrelay__V1__ScaleResponse *sr = resp ? kvrelay__v1__scale_response__unpack(NULL, len, resp) : NULL;
    CHECK(sr && !strcmp(sr->detail, "decode pool target 4"));
    if (sr)
        protobuf_c_message_free_unpacked(&sr->base, NULL);
    free(resp);
    resp = NULL;
    sq.decode = 9;
    n = kvrelay__v1__scale_request__pack(&sq, buf);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Scale", buf, n, T_OUT, &resp, &len, &st),
             C_INVALID_ARGUMENT);
    CHECK(strstr(st.message, "outside [1, 8]") != NULL);
    Kvrelay__V1__DrainRequest dq;
    kvrelay__v1__drain_request__init(&dq);
    dq.rank = 2;
    n = kvrelay__v1__drain_request__pack(&dq, buf);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Drain", buf, n, T_OUT, &resp, &len, &st), C_OK);
    Kvrelay__V1__DrainResponse *dr = resp ? kvrelay__v1__drain_response__unpack(NULL, len, resp) : NULL;
    CHECK(dr && !strcmp(dr->detail, "draining rank 2"));
    if (dr)
        protobuf_c_message_free_unpacked(&dr->base, NULL);
    free(resp);
    resp = NULL;
    dq.rank = 1;
    n = kvrelay__v1__drain_request__pack(&dq, buf);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Drain", buf, n, T_OUT, &resp, &len, &st),
             C_INVALID_ARGUMENT);
    static const uint8_t garbage[] = {0xff, 0xff, 0xff};
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Drain", garbage, sizeof garbage, T_OUT, &resp, &len, &st),
             C_INVALID_ARGUMENT);
    CHECK_EQ(kvr_client_unary(cli, "/kvrelay.v1.Inference/Scale", garbage, sizeof garbage, T_OUT, &resp, &len, &st),
             C_INVALID_ARGUMENT);
    free(resp);
}

static void test_router_errors(void) {
    struct kvr_rpc_status st;
    struct kvr_gen_params p = greedy("Once upon a time", 10);

    struct fake_router_cfg cfg = {.submit_status = KVR_EFULL};
    fake_router_configure(&cfg);
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_RESOURCE_EXHAUSTED);
    CHECK(strstr(st.message, "admission queue is full") != NULL);
    cfg.submit_status = KVR_EUNAVAIL;
    fake_router_configure(&cfg);
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_UNAVAILABLE);
    CHECK_EQ(st.reached, 1);

    static const struct {
        int status;
        int emit;
        const char *msg;
        int code;
    } cases[] = {
        {KVR_ETIMEDOUT, 0, "no decode node had room within 5.0 s", C_RESOURCE_EXHAUSTED},
        {KVR_ENOSPC, 0, "needs 600 KV blocks; the largest decode node has 100",
         C_RESOURCE_EXHAUSTED},
        {KVR_EUNAVAIL, 2, "decode node 3 died", C_UNAVAILABLE},
        {KVR_ECHECKSUM, 3, "KV block 7 of layer 2: checksum mismatch\nsecond line", C_DATA_LOSS},
        {KVR_EINTERNAL, 1, "", C_INTERNAL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        configure(cases[i].emit, cases[i].status, COORD_FINISH_ERROR, cases[i].msg);
        struct collect *c = collect_new();
        CHECK_EQ(kvr_client_generate(cli, &p, collect_fn, c, NULL, &st), cases[i].code);
        CHECK_EQ(c->n, cases[i].emit); /* tokens before the failure still arrive, in order */
        CHECK_EQ(c->got_done, 0);
        CHECK_EQ(st.reached, 1);
        CHECK(strchr(st.message, '\n') == NULL);
        if (cases[i].msg[0]) {
            size_t k = strcspn(cases[i].msg, "\n");
            CHECK(strncmp(st.message, cases[i].msg, k) == 0);
        } else {
            CHECK_STREQ(st.message, kvr_status_str(KVR_EINTERNAL));
        }
        free(c);
    }
    /* OK with reason CANCELLED (the cluster dropped it) is not a success for the client. */
    configure(1, KVR_OK, COORD_FINISH_CANCELLED, "");
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_CANCELLED);
    CHECK_EQ(fake_router_wait_idle(10), 0);
}

static void test_cancel_and_deadline(void) {
    fake_router_reset();
    struct kvr_rpc_status st;
    struct fake_router_cfg cfg = {.emit = 3, .per_call = 1, .stall = 1};
    fake_router_configure(&cfg);

    /* The client cancels after the third token. */
    struct collect *c = collect_new();
    c->cancel_at = 3;
    struct kvr_gen_params p = greedy("Once upon a time", 100);
    CHECK_EQ(kvr_client_generate(cli, &p, collect_fn, c, NULL, &st), C_CANCELLED);
    CHECK_EQ(c->n, 3);
    CHECK_EQ(fake_router_wait_idle(10), 0);
    CHECK_EQ(wait_calls_released(5), 0);
    struct fake_router_stats fs;
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_admitted, 1);
    CHECK_EQ(fs.n_cancels, 1);
    CHECK_EQ(fake_router_cancels_of(100), 1);
    CHECK_EQ(fs.n_cancel_unknown, 0);
    CHECK_EQ(fs.n_cancel_after_finish, 0);
    CHECK_EQ(fs.n_finishes, 1);
    free(c);

    /* A deadline passes while the request waits. */
    fake_router_reset();
    cfg.emit = 0;
    fake_router_configure(&cfg);
    p.timeout_s = 0.3;
    double t0 = now_s();
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_DEADLINE_EXCEEDED);
    CHECK(now_s() - t0 < 3.0);
    CHECK_EQ(st.reached, 1); /* initial metadata came at accept */
    CHECK_EQ(fake_router_wait_idle(10), 0);
    CHECK_EQ(wait_calls_released(5), 0);
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_cancels, 1);
    CHECK_EQ(fs.n_finishes, 1);

    /* A normal end is never followed by a cancel. */
    fake_router_reset();
    configure(4, KVR_OK, COORD_FINISH_STOP, NULL);
    p = greedy("Once upon a time", 100);
    CHECK_EQ(kvr_client_generate(cli, &p, NULL, NULL, NULL, &st), C_OK);
    CHECK_EQ(fake_router_wait_idle(10), 0);
    CHECK_EQ(wait_calls_released(5), 0);
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_cancels, 0);
    fake_router_reset();
}

struct conc_arg {
    int seed;
    int code;
    int n;
    int order_errors;
    int done_ok;
};

static int conc_fn(void *ud, const struct kvr_gen_msg *m) {
    struct conc_arg *a = ud;
    if (m->has_token) {
        if (m->index != a->n || m->token_id != 3 + (a->seed + a->n) % 500)
            a->order_errors++;
        a->n++;
    }
    if (m->done)
        a->done_ok =
            m->done->generated_tokens == a->n && m->done->finish_reason == COORD_FINISH_LENGTH;
    return 0;
}

static void *conc_thread(void *arg) {
    struct conc_arg *a = arg;
    struct kvr_gen_params p = greedy("Lily and Tom went to the park", 40);
    p.seed = (uint64_t)a->seed;
    struct kvr_rpc_status st;
    a->code = kvr_client_generate(cli, &p, conc_fn, a, NULL, &st);
    return NULL;
}

static void test_concurrent(void) {
    fake_router_reset();
    struct fake_router_cfg cfg = {
        .emit = -1, .per_call = 3, .delay_us = 300, .finish_reason = COORD_FINISH_LENGTH};
    fake_router_configure(&cfg);
    enum { N = 16 };
    pthread_t th[N];
    struct conc_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (struct conc_arg){.seed = 1000 + 37 * i};
        REQUIRE(pthread_create(&th[i], NULL, conc_thread, &args[i]) == 0);
    }
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ(args[i].code, C_OK);
        CHECK_EQ(args[i].n, 40);
        CHECK_EQ(args[i].order_errors, 0);
        CHECK_EQ(args[i].done_ok, 1);
    }
    CHECK_EQ(fake_router_wait_idle(10), 0);
    struct fake_router_stats fs;
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_admitted, N);
    CHECK_EQ(fs.n_finishes, N);
    CHECK_EQ(fs.n_cancels, 0);
    CHECK_EQ(wait_calls_released(5), 0);
    fake_router_reset();
}

/* ---------------------------------------------------------------------------------------
 * `kvrelay submit` and `kvrelay status` end to end
 * ------------------------------------------------------------------------------------- */

/* Runs cmd with stdout captured into out (and stderr into err); returns the exit code. */
static int run_cmd(const char *cmd, char *out, size_t out_len, char *err, size_t err_len) {
    char errpath[] = "/tmp/kvr_test_grpc_XXXXXX";
    int fd = mkstemp(errpath);
    REQUIRE(fd >= 0);
    close(fd);
    char full[4096];
    snprintf(full, sizeof full, "%s 2>%s", cmd, errpath);
    FILE *f = popen(full, "r");
    REQUIRE(f);
    size_t n = fread(out, 1, out_len - 1, f);
    out[n] = '\0';
    int rc = pclose(f);
    FILE *e = fopen(errpath, "r");
    size_t k = e ? fread(err, 1, err_len - 1, e) : 0;
    err[k] = '\0';
    if (e)
        fclose(e);
    unlink(errpath);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
}

static int closed_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    REQUIRE(s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0);
    REQUIRE(getsockname(s, (struct sockaddr *)&a, &len) == 0);
    close(s);
    return ntohs(a.sin_port);
}

static void test_cli(void) {
    fake_router_reset();
    struct golden_run g;
    char path[1024];
    snprintf(path, sizeof path, "%s/golden/greedy_1.txt", KVR_SHARED_DIR);
    REQUIRE(golden_run_load(path, &g) == 0);
    int enc[64], n_prompt = 0;
    REQUIRE(kvr_tokenizer_encode(tok, g.prompt, 1, 0, enc, 64, &n_prompt) == KVR_OK);
    int n_gen = g.n_ids - n_prompt;
    struct fake_router_cfg cfg = {.tokens = g.ids + n_prompt,
                                  .n_tokens = n_gen,
                                  .emit = -1,
                                  .per_call = 4,
                                  .finish_reason = COORD_FINISH_LENGTH};
    fake_router_configure(&cfg);
    static char out[1 << 17], err[8192], cmd[2048], want[1 << 16];
    const char *bin = KVR_BIN_DIR "/kvrelay";

    /* Text: stdout is exactly run's stdout. */
    snprintf(cmd, sizeof cmd,
             "%s submit --addr %s --prompt 'Once upon a time' --max-tokens %d --temperature 0", bin,
             addr, g.steps - n_prompt + 1);
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 0);
    snprintf(want, sizeof want, "%s\n", g.text);
    CHECK_STREQ(out, want);
    CHECK(strstr(err, "finish=length") != NULL);

    /* JSON: a prompt line, one line per token, a done line. */
    snprintf(cmd, sizeof cmd,
             "%s submit --addr %s --prompt 'Once upon a time' --max-tokens 20 --json", bin, addr);
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 0);
    int lines = 0;
    for (const char *q = out; *q; q++)
        lines += *q == '\n';
    CHECK_EQ(lines, 1 + 20 + 1);
    const char *first = "{\"type\":\"prompt\",\"text\":\"Once upon a time\"}\n";
    CHECK(strncmp(out, first, strlen(first)) == 0);
    snprintf(want, sizeof want,
             "{\"type\":\"token\",\"index\":0,\"token_id\":%d,\"text\":\"%s\"}\n", g.ids[n_prompt],
             kvr_tokenizer_piece_safe(tok, g.ids[n_prompt - 1], g.ids[n_prompt]));
    CHECK(strncmp(out + strlen(first), want, strlen(want)) == 0);
    CHECK(strstr(out, "{\"type\":\"done\",\"finish_reason\":\"length\",\"prompt_tokens\"") != NULL);

    /* Rejected: exit 3 and the code name on stderr. */
    snprintf(cmd, sizeof cmd,
             "%s submit --addr %s --prompt 'Once upon a time' --max-tokens 600 --temperature 0",
             bin, addr);
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 3);
    CHECK(strstr(err, "kvrelay submit: INVALID_ARGUMENT: prompt (5 tokens) + max_tokens (600)") !=
          NULL);
    CHECK_STREQ(out, "");
    snprintf(cmd, sizeof cmd, "%s submit --addr %s --prompt x --json --max-tokens 600", bin, addr);
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 3);
    const char *err_head = "{\"type\":\"error\",\"code\":\"INVALID_ARGUMENT\",\"message\":";
    CHECK(strncmp(out, err_head, strlen(err_head)) == 0);

    /* Unreachable: exit 4. */
    snprintf(cmd, sizeof cmd, "%s submit --addr 127.0.0.1:%d --prompt hi --timeout 5", bin,
             closed_port());
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 4);
    CHECK(strstr(err, "kvrelay submit: UNAVAILABLE") != NULL);
    snprintf(cmd, sizeof cmd, "%s status --addr 127.0.0.1:%d --timeout 5", bin, closed_port());
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 4);

    /* status: table and JSON. */
    set_nodes(1);
    snprintf(cmd, sizeof cmd, "%s status --addr %s", bin, addr);
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 0);
    CHECK(strstr(out, "node-b") != NULL && strstr(out, "decode") != NULL);
    CHECK(strstr(out, "4 waiting, 9 running, 123456789012 finished") != NULL);
    snprintf(cmd, sizeof cmd, "%s status --addr %s --json", bin, addr);
    CHECK_EQ(run_cmd(cmd, out, sizeof out, err, sizeof err), 0);
    CHECK(strstr(out, "\"rank\":2,\"role\":\"decode\",\"host\":\"node-b\",\"alive\":true,\"kv_"
                      "bytes_total\":5000000000") != NULL);

    /* A client killed mid-stream: the server sees the disconnect and cancels once. */
    fake_router_reset();
    struct fake_router_cfg stall = {.emit = 2, .per_call = 1, .stall = 1};
    fake_router_configure(&stall);
    snprintf(cmd, sizeof cmd,
             "exec %s submit --addr %s --prompt 'Once upon a time' --max-tokens 50 >/dev/null 2>&1",
             bin, addr);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    struct fake_router_stats fs;
    double t0 = now_s();
    do {
        sleep_ms(20);
        fake_router_stats(&fs);
    } while (fs.n_admitted < 1 && now_s() - t0 < 10);
    CHECK_EQ(fs.n_admitted, 1);
    sleep_ms(100);
    kill(pid, SIGKILL);
    int wst;
    waitpid(pid, &wst, 0);
    CHECK_EQ(fake_router_wait_idle(10), 0);
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_cancels, 1);
    CHECK_EQ(fs.n_finishes, 1);
    CHECK_EQ(wait_calls_released(5), 0);
    fake_router_reset();
    golden_run_free(&g);
}

/* ---------------------------------------------------------------------------------------
 * Shutdown with calls in flight (last: it stops the server)
 * ------------------------------------------------------------------------------------- */

struct stall_arg {
    int code;
    int n;
};

static int stall_fn(void *ud, const struct kvr_gen_msg *m) {
    struct stall_arg *a = ud;
    a->n += m->has_token;
    return 0;
}

static void *stall_thread(void *arg) {
    struct stall_arg *a = arg;
    struct kvr_gen_params p = greedy("One day, a little dog named Max", 100);
    struct kvr_rpc_status st;
    a->code = kvr_client_generate(cli, &p, stall_fn, a, NULL, &st);
    return NULL;
}

static void test_shutdown_in_flight(void) {
    fake_router_reset();
    struct fake_router_cfg cfg = {.emit = 2, .per_call = 1, .stall = 1};
    fake_router_configure(&cfg);
    enum { N = 4 };
    pthread_t th[N];
    struct stall_arg args[N];
    for (int i = 0; i < N; i++) {
        args[i] = (struct stall_arg){.code = -1};
        REQUIRE(pthread_create(&th[i], NULL, stall_thread, &args[i]) == 0);
    }
    struct fake_router_stats fs;
    double t0 = now_s();
    do {
        sleep_ms(10);
        fake_router_stats(&fs);
    } while (fs.n_admitted < N && now_s() - t0 < 10);
    CHECK_EQ(fs.n_admitted, N);
    sleep_ms(100); /* let the streams deliver their tokens */
    CHECK_EQ(coord_grpc_active_calls(srv), N);
    t0 = now_s();
    coord_grpc_stop(srv);
    srv = NULL;
    CHECK(now_s() - t0 < 5.0);
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        CHECK(args[i].code != C_OK && args[i].code != -1);
        CHECK_EQ(args[i].n, 2);
    }
    CHECK_EQ(fake_router_wait_idle(10), 0);
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_cancels, N);
    CHECK_EQ(fs.n_finishes, N);
    for (uint64_t id = 100; id < 100 + N; id++)
        CHECK_EQ(fake_router_cancels_of(id), 1);
    fake_router_reset();
}

int main(void) {
    kvr_log_init("test", -1);
    signal(SIGPIPE, SIG_IGN);
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), VOCAB, &tok) == KVR_OK);
    struct coord_grpc_params gp = {.addr = "127.0.0.1:0",
                                   .router = fake_router_get(),
                                   .tok = tok,
                                   .seq_len = SEQ_LEN,
                                   .vocab_size = VOCAB};
    REQUIRE(coord_grpc_start(&gp, &srv) == KVR_OK);
    CHECK(coord_grpc_port(srv) > 0);
    snprintf(addr, sizeof addr, "127.0.0.1:%d", coord_grpc_port(srv));
    REQUIRE(kvr_client_create(addr, &cli) == KVR_OK);

    /* A second server cannot take the same port. */
    struct coord_grpc *dup = NULL;
    struct coord_grpc_params gp2 = gp;
    gp2.addr = addr;
    int prev = kvr_log_set_level(-1);
    CHECK_EQ(coord_grpc_start(&gp2, &dup), KVR_EGRPC);
    kvr_log_set_level(prev);
    CHECK(dup == NULL);

    double t0 = now_s();
    test_status_map();
    test_health_and_status();
    test_golden_stream();
    test_request_mapping();
    test_invalid_arguments();
    test_unknown_method();
    test_health_v1();
    test_scale_and_drain();
    test_router_errors();
    test_raw_extremes();
    test_deadline_and_limits();
    test_cancel_and_deadline();
    test_concurrent();
    test_cli();
    test_shutdown_in_flight();
    fprintf(stderr, "test_grpc_server: %.2f s\n", now_s() - t0);

    kvr_client_free(cli);
    kvr_tokenizer_free(tok);
    CHECK_DONE();
}
