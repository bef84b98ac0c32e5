/* test_router.c - the router (coordinator/router.c) against a fake transport and a fake
 * clock: no MPI, no processes. The fake plays any number of nodes with the real message
 * writers and parsers (common/msg.c), so every byte the router sends is checked as a
 * node would read it. Covers: 300 nodes (the node table and the snapshots have no fixed
 * size), a HELLO with block_tokens 0, the order SEQ_BEGIN -> PREFILL_REQ -> CANCEL on
 * one channel, tokens and finishes, node failures mapped away from INVALID_ARGUMENT with
 * their reason, the client's deadline, the maximum age and the no-token watchdog, node
 * death with re-runs that get a fresh queue deadline, the router's own stall, a node
 * taken back after RESET (and one told to leave), nodes joining a running cluster,
 * kv_window = INT32_MAX, failed sends, and a randomized run checking that every request
 * gets exactly one finish and that reservations return to zero. */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "log.h"
#include "msg.h"
#include "router.h"
#include "status.h"
#include "transport.h"

#define FP 0x1234abcdull
#define SEQ_LEN 512
#define NODE_TIMEOUT 2.0
#define QUEUE_TIMEOUT 5.0
#define MAX_AGE 100.0
#define MAXPEER 1024

/* ---- the fake clock and network ---------------------------------------------------- */

static double clock_s = 1000.0;
static double fake_now(void) { return clock_s; }

struct fmsg {
    int peer, tag;
    size_t len;
    unsigned char *bytes;
};

static struct {
    struct fmsg *in;   /* to the router, FIFO */
    int n_in, cap_in, head_in;
    unsigned char *cur; /* the message poll last returned (owned until the next poll) */
    struct fmsg *out;  /* what the router sent, in order */
    int n_out, cap_out;
    unsigned char dead[MAXPEER];
    int fail_kind, fail_rc, fail_left; /* make sends of fail_kind fail with fail_rc */
    int jump_at;                       /* when the router reads in[jump_at - 1], ... */
    double jump_s;                     /* ... the clock jumps this far (its process stopped) */
} net;

static void push(struct fmsg **arr, int *n, int *cap, struct fmsg m) {
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 256;
        *arr = realloc(*arr, (size_t)*cap * sizeof **arr);
        REQUIRE(*arr);
    }
    (*arr)[(*n)++] = m;
}

static int f_poll(void *ctx, struct kvr_msg *m) {
    (void)ctx;
    free(net.cur);
    net.cur = NULL;
    if (net.head_in == net.n_in)
        return KVR_EAGAIN;
    struct fmsg f = net.in[net.head_in++];
    if (net.jump_at > 0 && net.head_in == net.jump_at) {
        clock_s += net.jump_s;
        net.jump_at = 0;
    }
    net.cur = f.bytes;
    memset(m, 0, sizeof *m);
    m->src = f.peer;
    m->tag = KVR_TAG_REPORT;
    return kvr_msg_parse_header(f.bytes, f.len, m);
}

static int f_send(void *ctx, int dst, int tag, const void *bytes, size_t len) {
    (void)ctx;
    if (dst < 0 || dst >= MAXPEER)
        return KVR_EINVAL;
    if (net.dead[dst])
        return KVR_EUNAVAIL;
    int kind = ((const unsigned char *)bytes)[6] | (((const unsigned char *)bytes)[7] << 8);
    if (net.fail_left > 0 && kind == net.fail_kind) {
        net.fail_left--;
        return net.fail_rc;
    }
    unsigned char *b = malloc(len);
    REQUIRE(b);
    memcpy(b, bytes, len);
    push(&net.out, &net.n_out, &net.cap_out, (struct fmsg){dst, tag, len, b});
    return KVR_OK;
}

static void f_mark_dead(void *ctx, int peer) {
    (void)ctx;
    net.dead[peer] = 1;
}
static void f_mark_alive(void *ctx, int peer) {
    (void)ctx;
    net.dead[peer] = 0;
}
static void f_progress(void *ctx) { (void)ctx; }

static const struct coord_transport fake_tp = {
    .poll = f_poll, .send = f_send, .mark_dead = f_mark_dead, .mark_alive = f_mark_alive, .progress = f_progress};

/* A node sends the message `call` writes (through w) to the router. */
#define NODE_SENDS(rank, call)                                                   \
    do {                                                                         \
        struct kvr_wbuf m_ = {0};                                                \
        {                                                                        \
            struct kvr_wbuf *w = &m_;                                            \
            call;                                                                \
        }                                                                        \
        unsigned char *b_ = malloc(m_.len);                                      \
        REQUIRE(b_);                                                             \
        struct kvr_wbuf w_ = {.p = b_, .cap = m_.len};                           \
        {                                                                        \
            struct kvr_wbuf *w = &w_;                                            \
            call;                                                                \
        }                                                                        \
        push(&net.in, &net.n_in, &net.cap_in, (struct fmsg){(rank), KVR_TAG_REPORT, w_.len, b_}); \
    } while (0)

static void clear_out(void) {
    for (int i = 0; i < net.n_out; i++)
        free(net.out[i].bytes);
    net.n_out = 0;
}

static void net_reset(void) {
    clear_out();
    for (int i = net.head_in; i < net.n_in; i++)
        free(net.in[i].bytes);
    net.n_in = net.head_in = 0;
    free(net.cur);
    net.cur = NULL;
    memset(net.dead, 0, sizeof net.dead);
    net.fail_left = 0;
}

/* The i-th sent message as a node would parse it. */
static int out_kind(int i) { return net.out[i].bytes[6] | (net.out[i].bytes[7] << 8); }

static struct kvr_msg out_msg(int i) {
    struct kvr_msg m = {.src = 0, .tag = net.out[i].tag};
    REQUIRE(kvr_msg_parse_header(net.out[i].bytes, net.out[i].len, &m) == KVR_OK);
    return m;
}

/* The index of the last sent message of kind to dst, or -1. */
static int last_sent(int kind, int dst) {
    for (int i = net.n_out - 1; i >= 0; i--)
        if (out_kind(i) == kind && net.out[i].peer == dst)
            return i;
    return -1;
}

/* How many sent messages of kind (to dst, or any when dst < 0). */
static int count_sent(int kind, int dst) {
    int n = 0;
    for (int i = 0; i < net.n_out; i++)
        n += out_kind(i) == kind && (dst < 0 || net.out[i].peer == dst);
    return n;
}

/* The last SEQ_BEGIN (or PREFILL_REQ) sent, parsed; its index or -1. */
static int last_req(int kind, struct kvr_req_params *p) {
    static int prompt[SEQ_LEN];
    for (int i = net.n_out - 1; i >= 0; i--) {
        if (out_kind(i) != kind)
            continue;
        struct kvr_msg m = out_msg(i);
        REQUIRE(kvr_msg_parse_req(&m, p, prompt, SEQ_LEN, 512) == KVR_OK);
        return i;
    }
    return -1;
}

/* ---- the nodes' side ------------------------------------------------------------------ */

static void hello(int rank, int role, int coloc, int n_blocks, uint32_t epoch, uint64_t fp) {
    struct kvr_hello h = {.role = role, .colocated = coloc, .epoch = epoch, .setup_status = KVR_OK,
                          .n_layers = 5, .kv_dim = 32, .block_tokens = 16, .seq_len = SEQ_LEN, .vocab_size = 512,
                          .fingerprint = fp, .kv_bytes_total = (uint64_t)n_blocks * 20480,
                          .n_blocks_total = n_blocks, .n_threads = 1, .max_batch = 64,
                          .max_batch_tokens = role == KVR_ROLE_PREFILL ? 1024 : 512,
                          .n_ctx_max = SEQ_LEN + (role == KVR_ROLE_PREFILL ? 1024 : 512)};
    snprintf(h.host, sizeof h.host, "host-%d", rank);
    NODE_SENDS(rank, kvr_msg_write_hello(w, &h));
}

static void report(int rank) {
    struct kvr_node_report r = {.kv_bytes_total = 100, .kv_bytes_free = 100, .n_blocks_total = 5, .n_blocks_free = 5};
    NODE_SENDS(rank, kvr_msg_write_status(w, &r));
}

static void tok_event(int rank, uint64_t wire, int token, int finish, int status, const char *reason) {
    struct kvr_tok_event ev = {.req_id = wire, .token = token, .finish = finish, .status = status,
                               .n_generated = 1, .reason = reason, .reason_len = reason ? (int)strlen(reason) : 0};
    NODE_SENDS(rank, kvr_msg_write_tokens(w, &ev, 1));
}

static void prefill_done(int rank, uint64_t wire, int status, const char *reason) {
    struct kvr_prefill_done d = {.status = status, .n_prompt = 5, .reason = reason,
                                 .reason_len = reason ? (int)strlen(reason) : 0};
    NODE_SENDS(rank, kvr_msg_write_prefill_done(w, wire, &d));
}

/* ---- streams ---------------------------------------------------------------------------- */

struct coord_stream {
    int n_tokens;
    int tokens[64];
    int n_finish;
    int status;
    enum coord_finish reason;
    char msg[256];
    struct coord_usage u;
};

static void s_tokens(struct coord_stream *s, const int *ids, int n) {
    for (int i = 0; i < n; i++) {
        if (s->n_tokens < 64)
            s->tokens[s->n_tokens] = ids[i];
        s->n_tokens++;
    }
    CHECK_EQ(s->n_finish, 0); /* never a token after the finish */
}

static void s_finish(struct coord_stream *s, int status, enum coord_finish reason, const struct coord_usage *u,
                     const char *msg) {
    s->n_finish++;
    s->status = status;
    s->reason = reason;
    s->u = *u;
    snprintf(s->msg, sizeof s->msg, "%s", msg);
    CHECK(strchr(msg, '\n') == NULL);
}

static const struct coord_stream_ops ops = {.tokens = s_tokens, .finish = s_finish};

static struct coord_router *make_router(int expected, int max_retries) {
    struct coord_router_params p = {.tp = fake_tp, .ops = &ops, .expected_nodes = expected, .queue_max = 100000,
                                    .queue_timeout_s = QUEUE_TIMEOUT, .node_timeout_s = NODE_TIMEOUT,
                                    .max_retries = max_retries, .max_request_age_s = MAX_AGE, .now = fake_now};
    struct coord_router *r = NULL;
    REQUIRE(coord_router_create(&p, &r) == KVR_OK);
    return r;
}

static uint64_t submit(struct coord_router *r, struct coord_stream *s, int max_tokens, struct kvr_kv_policy_params pol,
                       double deadline) {
    static const int prompt[5] = {1, 403, 407, 9, 10};
    struct coord_request q = {.n_tokens = 5, .max_tokens = max_tokens, .temperature = 0, .top_p = 1, .seed = 7,
                              .stop_at_eos = 1, .policy = pol, .t_arrival = clock_s, .t_deadline = deadline,
                              .stream = s};
    q.tokens = malloc(sizeof prompt);
    REQUIRE(q.tokens);
    memcpy(q.tokens, prompt, sizeof prompt);
    uint64_t id = 0;
    REQUIRE(coord_router_submit(r, &q, &id) == KVR_OK);
    return id;
}

static const struct kvr_kv_policy_params DENSE = {KVR_KV_DENSE, 0, 0};

/* Every node in [first, last] reports, then the router takes a turn. */
static void everyone_reports(struct coord_router *r, int first, int last) {
    for (int k = first; k <= last; k++)
        report(k);
    coord_router_poll(r);
}

static int64_t reserved_on(struct coord_router *r, int rank) {
    struct coord_cluster_status st;
    REQUIRE(coord_router_status(r, &st) == KVR_OK);
    int64_t v = -1;
    for (int i = 0; i < st.n_nodes; i++)
        if (st.nodes[i].rank == rank)
            v = (int64_t)st.nodes[i].kv_bytes_reserved;
    coord_cluster_status_deinit(&st);
    return v;
}

static int alive(struct coord_router *r, int rank) {
    struct coord_cluster_status st;
    REQUIRE(coord_router_status(r, &st) == KVR_OK);
    int v = -1;
    for (int i = 0; i < st.n_nodes; i++)
        if (st.nodes[i].rank == rank)
            v = st.nodes[i].alive;
    coord_cluster_status_deinit(&st);
    return v;
}

/* A cluster of 1 prefill (rank 1) and n_dec decode nodes (ranks 2..) of n_blocks each. */
static struct coord_router *small_cluster(int n_dec, int n_blocks, int max_retries) {
    net_reset();
    struct coord_router *r = make_router(1 + n_dec, max_retries);
    hello(1, KVR_ROLE_PREFILL, 0, 100, 0, FP);
    for (int d = 0; d < n_dec; d++)
        hello(2 + d, KVR_ROLE_DECODE, 0, n_blocks, 0, FP);
    int seq = 0, vocab = 0;
    REQUIRE(coord_router_wait_nodes(r, 1, FP, &seq, &vocab) == KVR_OK);
    CHECK_EQ(seq, SEQ_LEN);
    CHECK_EQ(vocab, 512);
    return r;
}

static void finish_all(struct coord_router *r) {
    coord_router_shutdown(r);
    coord_router_free(r);
}

/* ---- tests ---------------------------------------------------------------------------- */

static void test_many_nodes(void) {
    net_reset();
    enum { P = 100, D = 200 };
    struct coord_router *r = make_router(P + D, 2);
    for (int k = 1; k <= P + D; k++)
        hello(k, k <= P ? KVR_ROLE_PREFILL : KVR_ROLE_DECODE, 0, 40 + k % 7, 0, FP);
    int seq, vocab;
    REQUIRE(coord_router_wait_nodes(r, 1, FP, &seq, &vocab) == KVR_OK);
    struct coord_cluster_status st;
    REQUIRE(coord_router_status(r, &st) == KVR_OK);
    CHECK_EQ(st.n_nodes, P + D);
    int n_dec = 0, n_alive = 0;
    for (int i = 0; i < st.n_nodes; i++) {
        n_dec += !strcmp(st.nodes[i].role, "decode");
        n_alive += st.nodes[i].alive;
    }
    CHECK_EQ(n_dec, D);
    CHECK_EQ(n_alive, P + D);
    coord_cluster_status_deinit(&st);
    struct coord_limits lim;
    REQUIRE(coord_router_limits(r, &lim) == KVR_OK);
    CHECK_EQ(lim.n_nodes, P + D);
    CHECK_EQ(lim.seq_len, SEQ_LEN);
    coord_limits_deinit(&lim);
    /* 400 requests of 17 blocks spread over the 200 decode nodes, each on the one with the
     * most free blocks: none gets a third before all have two. */
    static struct coord_stream s[400];
    memset(s, 0, sizeof s);
    for (int i = 0; i < 400; i++)
        submit(r, &s[i], 252, DENSE, 0);
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_SEQ_BEGIN, -1), 400);
    CHECK_EQ(count_sent(KVR_MSG_PREFILL_REQ, -1), 400);
    int per[P + D + 1] = {0};
    for (int i = 0; i < net.n_out; i++)
        if (out_kind(i) == KVR_MSG_SEQ_BEGIN)
            per[net.out[i].peer]++;
    for (int k = P + 1; k <= P + D; k++)
        CHECK_EQ(per[k], 2);
    /* Prefill work spreads too (fewest prompt tokens in flight first). */
    int pre[P + 1] = {0}, most = 0;
    for (int i = 0; i < net.n_out; i++)
        if (out_kind(i) == KVR_MSG_PREFILL_REQ && ++pre[net.out[i].peer] > most)
            most = pre[net.out[i].peer];
    CHECK_EQ(most, 4);
    finish_all(r);
    for (int i = 0; i < 400; i++)
        CHECK_EQ(s[i].n_finish, 1);
}

static void test_bad_hello(void) {
    /* block_tokens 0 at start-up: the cluster does not come up (no division by zero). */
    net_reset();
    struct coord_router *r = make_router(2, 2);
    hello(1, KVR_ROLE_PREFILL, 0, 100, 0, FP);
    hello(2, KVR_ROLE_DECODE, 0, 100, 0, FP);
    net.in[1].bytes[16 + 88] = 0; /* block_tokens (little-endian i32 at body offset 88) */
    int seq, vocab;
    CHECK_EQ(coord_router_wait_nodes(r, 1, FP, &seq, &vocab), KVR_EINVAL);
    coord_router_free(r);
    /* A different model at start-up. */
    net_reset();
    r = make_router(2, 2);
    hello(1, KVR_ROLE_PREFILL, 0, 100, 0, FP);
    hello(2, KVR_ROLE_DECODE, 0, 100, 0, FP + 1);
    CHECK_EQ(coord_router_wait_nodes(r, 1, FP, &seq, &vocab), KVR_EFINGERPRINT);
    coord_router_free(r);
    /* At run time: a joining node with a bad HELLO is told to leave and never used; a good
     * one joins (the node table grows while the cluster runs). */
    r = small_cluster(1, 100, 2);
    hello(9, KVR_ROLE_DECODE, 0, 100, 0, FP);
    net.in[net.n_in - 1].bytes[16 + 88] = 0;
    hello(10, KVR_ROLE_DECODE, 0, 1000, 0, FP);
    hello(11, KVR_ROLE_DECODE, 0, 5000, 0, FP + 1);
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_SHUTDOWN, 11), 1); /* another model: told to leave */
    CHECK_EQ(alive(r, 10), 1);
    CHECK_EQ(alive(r, 11), 0);
    struct coord_stream s = {0};
    submit(r, &s, 100, DENSE, 0);
    coord_router_poll(r);
    struct kvr_req_params p;
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    CHECK_EQ(p.decode_rank, 10); /* the joiner has the most room */
    finish_all(r);
}

static void test_order_and_cancel(void) {
    struct coord_router *r = small_cluster(1, 100, 2);
    struct coord_stream s = {0};
    uint64_t id = submit(r, &s, 100, DENSE, 0);
    coord_router_poll(r);
    struct kvr_req_params p, pp;
    int i_begin = last_req(KVR_MSG_SEQ_BEGIN, &p), i_pre = last_req(KVR_MSG_PREFILL_REQ, &pp);
    REQUIRE(i_begin >= 0 && i_pre >= 0);
    CHECK(i_begin < i_pre); /* the decode node hears first */
    CHECK_EQ(net.out[i_begin].peer, 2);
    CHECK_EQ(net.out[i_begin].tag, KVR_TAG_CTRL);
    CHECK_EQ(net.out[i_pre].peer, 1);
    CHECK_EQ(p.begin_no, 1);
    CHECK(p.req_id == pp.req_id && pp.begin_no == 1 && p.decode_rank == 2 && p.prefill_rank == 1);
    CHECK_EQ(p.n_prompt, 5);
    CHECK(reserved_on(r, 2) == 7 * 20480); /* (5 + 100) tokens / 16 */
    /* The client goes away: CANCEL to both, after the SEQ_BEGIN on the same channel; the
     * stream ends now, once; the reservation goes. */
    coord_router_cancel(r, id);
    coord_router_poll(r);
    int i_cancel = -1;
    for (int i = 0; i < net.n_out; i++)
        if (out_kind(i) == KVR_MSG_CANCEL && net.out[i].peer == 2)
            i_cancel = i;
    CHECK(i_cancel > i_begin);
    CHECK(out_msg(i_cancel).req_id == p.req_id);
    CHECK_EQ(count_sent(KVR_MSG_CANCEL, 1), 1);
    CHECK_EQ(s.n_finish, 1);
    CHECK_EQ(s.status, KVR_OK);
    CHECK_EQ(s.reason, COORD_FINISH_CANCELLED);
    CHECK_EQ(reserved_on(r, 2), 0);
    /* Its late events change nothing; a second cancel neither. */
    tok_event(2, p.req_id, 5, KVR_FINISH_CANCELLED, KVR_OK, NULL);
    coord_router_cancel(r, id);
    coord_router_poll(r);
    CHECK_EQ(s.n_finish, 1);
    CHECK_EQ(s.n_tokens, 0);
    /* The next request on that node gets the next begin number. */
    struct coord_stream s2 = {0};
    submit(r, &s2, 10, DENSE, 0);
    coord_router_poll(r);
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    CHECK_EQ(p.begin_no, 2);
    finish_all(r);
    CHECK_EQ(s2.n_finish, 1);
    CHECK_EQ(s2.status, KVR_EUNAVAIL);
}

static void test_tokens_and_failures(void) {
    struct coord_router *r = small_cluster(1, 100, 2);
    struct coord_stream s = {0};
    submit(r, &s, 3, DENSE, 0);
    coord_router_poll(r);
    struct kvr_req_params p;
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    prefill_done(1, p.req_id, KVR_OK, NULL);
    tok_event(2, p.req_id, 11, KVR_FINISH_NONE, KVR_OK, NULL);
    tok_event(2, p.req_id, 12, KVR_FINISH_NONE, KVR_OK, NULL);
    tok_event(3, p.req_id, 99, KVR_FINISH_NONE, KVR_OK, NULL); /* not its decode node: ignored */
    tok_event(2, p.req_id, 13, KVR_FINISH_LENGTH, KVR_OK, NULL);
    coord_router_poll(r);
    CHECK_EQ(s.n_tokens, 3);
    CHECK(s.tokens[0] == 11 && s.tokens[1] == 12 && s.tokens[2] == 13);
    CHECK_EQ(s.n_finish, 1);
    CHECK_EQ(s.status, KVR_OK);
    CHECK_EQ(s.reason, COORD_FINISH_LENGTH);
    CHECK_EQ(s.u.generated_tokens, 3);
    CHECK_EQ(s.u.decode_rank, 2);
    CHECK_EQ(reserved_on(r, 2), 0);

    /* A node's failure is never the client's INVALID_ARGUMENT, and its reason crosses. */
    static const struct {
        int node_status;
        int want;
    } cases[] = {{KVR_EINVAL, KVR_EINTERNAL}, {KVR_ECONTEXT, KVR_EINTERNAL}, {KVR_ERANGE, KVR_EINTERNAL},
                 {KVR_ENOTSUP, KVR_EINTERNAL}, {KVR_ENOSPC, KVR_EABORTED},   {KVR_ENOMEM, KVR_EABORTED},
                 {KVR_EUNAVAIL, KVR_EUNAVAIL}, {KVR_ECHECKSUM, KVR_ECHECKSUM}, {-999, KVR_EINTERNAL}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        struct coord_stream f = {0};
        submit(r, &f, 50, DENSE, 0);
        coord_router_poll(r);
        REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
        tok_event(2, p.req_id, 5, KVR_FINISH_NONE, KVR_OK, NULL);
        tok_event(2, p.req_id, -1, KVR_FINISH_ERROR, cases[k].node_status, "decode step failed\nfor this sequence");
        coord_router_poll(r);
        CHECK_EQ(f.n_finish, 1);
        CHECK_EQ(f.status, cases[k].want);
        CHECK_EQ(f.reason, COORD_FINISH_ERROR);
        CHECK_STREQ(f.msg, "decode node rank 2: decode step failed for this sequence");
        CHECK_EQ(f.n_tokens, 1);
    }
    /* A prefill failure ends it with the prefill node's reason, and its decode node is
     * told to drop it. */
    struct coord_stream f = {0};
    submit(r, &f, 50, DENSE, 0);
    coord_router_poll(r);
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    clear_out();
    prefill_done(1, p.req_id, KVR_EUNAVAIL, "prefill rank 1 could not send the KV blocks to decode rank 2");
    coord_router_poll(r);
    CHECK_EQ(f.n_finish, 1);
    CHECK_EQ(f.status, KVR_EUNAVAIL);
    CHECK(strstr(f.msg, "prefill node rank 1: prefill rank 1 could not send the KV blocks") != NULL);
    CHECK_EQ(count_sent(KVR_MSG_CANCEL, 2), 1);
    CHECK_EQ(reserved_on(r, 2), 0);
    /* A cancelled finish nobody asked for is a failure. */
    struct coord_stream g = {0};
    submit(r, &g, 50, DENSE, 0);
    coord_router_poll(r);
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    tok_event(2, p.req_id, -1, KVR_FINISH_CANCELLED, KVR_OK, NULL);
    coord_router_poll(r);
    CHECK_EQ(g.status, KVR_EABORTED);
    finish_all(r);
}

static void test_deadlines(void) {
    struct coord_router *r = small_cluster(1, 20, 2);
    /* The client's deadline, while running: ends it, tells both nodes, frees the blocks. */
    struct coord_stream a = {0};
    submit(r, &a, 100, DENSE, clock_s + 2.0);
    coord_router_poll(r);
    struct kvr_req_params p;
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    clear_out();
    clock_s += 1.9;
    everyone_reports(r, 1, 2);
    CHECK_EQ(a.n_finish, 0);
    clock_s += 0.2;
    everyone_reports(r, 1, 2);
    CHECK_EQ(a.n_finish, 1);
    CHECK_EQ(a.status, KVR_EDEADLINE);
    CHECK_STREQ(a.msg, "the request's deadline passed");
    CHECK_EQ(count_sent(KVR_MSG_CANCEL, 2), 1);
    CHECK_EQ(count_sent(KVR_MSG_CANCEL, 1), 1);
    CHECK_EQ(reserved_on(r, 2), 0);
    /* The maximum age, while waiting (a first request holds the small node). */
    struct coord_stream big = {0}, b = {0};
    submit(r, &big, 252, DENSE, 0); /* 17 blocks of 20 */
    submit(r, &b, 252, DENSE, 0);   /* waits */
    coord_router_poll(r);
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    for (int k = 0; k < 26; k++) { /* the big one keeps streaming; b's queue deadline is 5 s */
        clock_s += 0.2;
        tok_event(2, p.req_id, 7, KVR_FINISH_NONE, KVR_OK, NULL);
        everyone_reports(r, 1, 2);
    }
    CHECK_EQ(b.n_finish, 1);
    CHECK_EQ(b.status, KVR_ETIMEDOUT); /* the queue's deadline */
    clock_s += MAX_AGE;
    everyone_reports(r, 1, 2);
    CHECK_EQ(big.n_finish, 1);
    CHECK_EQ(big.status, KVR_EDEADLINE);
    CHECK(strstr(big.msg, "maximum request age of 100 s") != NULL);
    CHECK_EQ(big.n_tokens, 26);
    CHECK_EQ(reserved_on(r, 2), 0);
    /* The watchdog: the prefill node handed it over, the decode node is alive (it
     * reports) yet sends no token: ABORTED after the node timeout, blocks freed. */
    struct coord_stream c = {0};
    submit(r, &c, 10, DENSE, 0);
    coord_router_poll(r);
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    prefill_done(1, p.req_id, KVR_OK, NULL);
    for (int k = 0; k < 10 && !c.n_finish; k++) {
        clock_s += 0.5;
        everyone_reports(r, 1, 2);
    }
    CHECK_EQ(c.n_finish, 1);
    CHECK_EQ(c.status, KVR_EABORTED);
    CHECK(strstr(c.msg, "decode node rank 2 produced no token") != NULL);
    CHECK_EQ(reserved_on(r, 2), 0);
    CHECK_EQ(alive(r, 2), 1);
    struct coord_router_counters cnt;
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.reaped, 2);
    CHECK_EQ(cnt.watchdog, 1);
    finish_all(r);
}

static void test_death_and_rerun(void) {
    /* Two decode nodes of 20 blocks: A runs on 2, B on 3. */
    struct coord_router *r = small_cluster(2, 20, 2);
    struct coord_stream a = {0}, b = {0};
    submit(r, &a, 252, DENSE, 0);
    submit(r, &b, 252, DENSE, 0);
    coord_router_poll(r);
    struct kvr_req_params pa, pb;
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &pb) >= 0);
    for (int i = 0; i < net.n_out; i++)
        if (out_kind(i) == KVR_MSG_SEQ_BEGIN && net.out[i].peer != pb.decode_rank) {
            struct kvr_msg m = out_msg(i);
            static int ids[SEQ_LEN];
            REQUIRE(kvr_msg_parse_req(&m, &pa, ids, SEQ_LEN, 512) == KVR_OK);
        }
    int dead = pa.decode_rank, other = pb.decode_rank;
    /* A streams for far longer than the queue deadline, then its node goes silent. */
    for (int k = 0; k < 40; k++) {
        clock_s += 0.5;
        tok_event(dead, pa.req_id, 100 + k % 50, KVR_FINISH_NONE, KVR_OK, NULL);
        tok_event(other, pb.req_id, 200, KVR_FINISH_NONE, KVR_OK, NULL);
        everyone_reports(r, 1, 3);
    }
    CHECK_EQ(a.n_tokens, 40);
    clear_out();
    for (int k = 0; k < 6; k++) { /* 3 s without rank `dead` */
        clock_s += 0.5;
        report(1);
        report(other);
        coord_router_poll(r);
    }
    CHECK_EQ(alive(r, dead), 0);
    CHECK_EQ(a.n_finish, 0); /* re-queued: the survivor is full (B), so it waits */
    /* Its queue deadline counts from the re-run, not from its arrival 20 s ago. */
    for (int k = 0; k < 6; k++) {
        clock_s += 0.5;
        report(1);
        report(other);
        coord_router_poll(r);
    }
    CHECK_EQ(a.n_finish, 0);
    CHECK_EQ(count_sent(KVR_MSG_SEQ_BEGIN, other), 0);
    /* B ends; A runs on the survivor with a new wire id and skips the 40 tokens it sent. */
    tok_event(other, pb.req_id, 5, KVR_FINISH_LENGTH, KVR_OK, NULL);
    coord_router_poll(r);
    CHECK_EQ(b.n_finish, 1);
    struct kvr_req_params pa2;
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &pa2) >= 0);
    CHECK_EQ(pa2.decode_rank, other);
    CHECK(pa2.req_id != pa.req_id && (pa2.req_id >> 4) == (pa.req_id >> 4));
    for (int k = 0; k < 45; k++)
        tok_event(other, pa2.req_id, 100 + k % 50, k == 44 ? KVR_FINISH_LENGTH : KVR_FINISH_NONE, KVR_OK, NULL);
    tok_event(dead, pa.req_id, 7, KVR_FINISH_NONE, KVR_OK, NULL); /* the old attempt: ignored */
    coord_router_poll(r);
    CHECK_EQ(a.n_finish, 1);
    CHECK_EQ(a.status, KVR_OK);
    CHECK_EQ(a.n_tokens, 45);
    CHECK_EQ(a.u.decode_rank, other);
    struct coord_router_counters cnt;
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.reruns, 1);
    CHECK_EQ(cnt.nodes_died, 1);
    /* max_retries: a request whose node dies a third time ends UNAVAILABLE. */
    finish_all(r);
    r = small_cluster(1, 100, 0);
    struct coord_stream c = {0};
    submit(r, &c, 10, DENSE, 0);
    coord_router_poll(r);
    for (int k = 0; k < 6; k++) {
        clock_s += 0.5;
        report(1);
        coord_router_poll(r);
    }
    CHECK_EQ(c.n_finish, 1);
    CHECK_EQ(c.status, KVR_EUNAVAIL);
    CHECK_STREQ(c.msg, "decode node rank 2 died");
    finish_all(r);
}

static void test_stall_and_rejoin(void) {
    struct coord_router *r = small_cluster(2, 100, 2);
    /* The router's own thread stops for 20 s while nodes keep reporting: 20 s of reports
     * queue up. It must read them before judging, and declare nobody dead. */
    for (int k = 0; k < 400; k++) {
        clock_s += 0.05;
        for (int rank = 1; rank <= 3; rank++)
            report(rank);
    }
    coord_router_poll(r);
    for (int k = 0; k < 5; k++) {
        clock_s += 0.5;
        everyone_reports(r, 1, 3);
    }
    for (int rank = 1; rank <= 3; rank++)
        CHECK_EQ(alive(r, rank), 1);
    struct coord_router_counters cnt;
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.stalls, 1);
    CHECK_EQ(cnt.nodes_died, 0);
    /* The whole host froze (nodes too, nothing queued): silence during the router's own
     * stall is not the nodes' fault; they get a node timeout from now. */
    clock_s += 20;
    coord_router_poll(r);
    for (int rank = 1; rank <= 3; rank++)
        CHECK_EQ(alive(r, rank), 1);
    everyone_reports(r, 1, 3);
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.stalls, 2);
    CHECK_EQ(cnt.nodes_died, 0);

    /* The router is stopped in the middle of a turn, between two queued reports, for 20 s
     * (SIGSTOP while draining): nothing else queued, the nodes were frozen too. Nobody is
     * declared dead by that turn, and they report again. */
    clock_s += 0.05;
    for (int rank = 1; rank <= 3; rank++)
        report(rank);
    net.jump_at = net.head_in + 2;
    net.jump_s = 20;
    coord_router_poll(r);
    for (int rank = 1; rank <= 3; rank++)
        CHECK_EQ(alive(r, rank), 1);
    everyone_reports(r, 1, 3);
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.stalls, 3);
    CHECK_EQ(cnt.nodes_died, 0);

    /* A node that really stops for longer than the node timeout is declared dead... */
    for (int k = 0; k < 6; k++) {
        clock_s += 0.5;
        report(1);
        report(2);
        coord_router_poll(r);
    }
    CHECK_EQ(alive(r, 3), 0);
    /* ... and when it speaks again (100 reports that queued), it gets exactly one RESET,
     * and nothing is placed on it. */
    clear_out();
    for (int k = 0; k < 100; k++)
        report(3);
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_RESET, 3), 1);
    REQUIRE(last_sent(KVR_MSG_RESET, 3) >= 0);
    struct kvr_msg m = out_msg(last_sent(KVR_MSG_RESET, 3));
    uint32_t epoch = 0;
    CHECK_EQ(kvr_msg_parse_reset(&m, &epoch), KVR_OK);
    CHECK_EQ(epoch, 1);
    CHECK_EQ(alive(r, 3), 0);
    /* A HELLO from before the RESET (epoch 0) does not bring it back; the answer does. */
    hello(3, KVR_ROLE_DECODE, 0, 100, 0, FP);
    coord_router_poll(r);
    CHECK_EQ(alive(r, 3), 0);
    hello(3, KVR_ROLE_DECODE, 0, 100, 1, FP);
    coord_router_poll(r);
    CHECK_EQ(alive(r, 3), 1);
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.nodes_rejoined, 1);
    CHECK_EQ(cnt.resets_sent, 1);
    /* It is used again (it has the most room), and pinged again. */
    clear_out();
    struct coord_stream s1 = {0}, s2 = {0};
    submit(r, &s1, 10, DENSE, 0);
    submit(r, &s2, 10, DENSE, 0);
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_SEQ_BEGIN, 3), 1);
    clock_s += 1.1;
    everyone_reports(r, 1, 3);
    CHECK_EQ(count_sent(KVR_MSG_PING, 3), 1);
    /* A node that comes back serving another model is told to leave, never used. */
    for (int k = 0; k < 6; k++) {
        clock_s += 0.5;
        report(1);
        report(3);
        coord_router_poll(r);
    }
    CHECK_EQ(alive(r, 2), 0);
    clear_out();
    report(2);
    coord_router_poll(r);
    REQUIRE(last_sent(KVR_MSG_RESET, 2) >= 0);
    m = out_msg(last_sent(KVR_MSG_RESET, 2));
    CHECK_EQ(kvr_msg_parse_reset(&m, &epoch), KVR_OK);
    hello(2, KVR_ROLE_DECODE, 0, 100, epoch + 1, FP + 5); /* not the RESET's epoch: ignored */
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_SHUTDOWN, 2), 0);
    hello(2, KVR_ROLE_DECODE, 0, 100, epoch, FP + 5);
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_SHUTDOWN, 2), 1);
    CHECK_EQ(alive(r, 2), 0);
    finish_all(r);
    CHECK_EQ(s1.n_finish, 1);
    CHECK_EQ(s2.n_finish, 1);
}

static void test_overflow_and_send_failures(void) {
    struct coord_router *r = small_cluster(1, 100, 2);
    /* Straight to the router, past the edge: window INT32_MAX, max_tokens INT32_MAX. The
     * reservation is what the tokens can fill on this pool, never negative. */
    struct coord_stream s = {0};
    submit(r, &s, INT32_MAX, (struct kvr_kv_policy_params){KVR_KV_WINDOW, INT32_MAX, 0}, 0);
    coord_router_poll(r);
    CHECK_EQ(s.n_finish, 1);
    CHECK_EQ(s.status, KVR_ENOSPC); /* it could never fit */
    CHECK_EQ(reserved_on(r, 2), 0);
    struct coord_stream s2 = {0};
    submit(r, &s2, 1000000, (struct kvr_kv_policy_params){KVR_KV_SINK, INT32_MAX, INT32_MAX - 1}, 0);
    coord_router_poll(r);
    CHECK_EQ(s2.status, KVR_ENOSPC);
    CHECK(reserved_on(r, 2) == 0);
    /* A SEQ_BEGIN that cannot go: the request waits and goes next turn. */
    struct coord_stream a = {0};
    net.fail_kind = KVR_MSG_SEQ_BEGIN;
    net.fail_rc = KVR_ENOMEM;
    net.fail_left = 1;
    submit(r, &a, 10, DENSE, 0);
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_SEQ_BEGIN, 2), 0);
    CHECK_EQ(reserved_on(r, 2), 0);
    coord_router_poll(r);
    CHECK_EQ(count_sent(KVR_MSG_SEQ_BEGIN, 2), 1);
    CHECK(reserved_on(r, 2) > 0);
    /* A CANCEL that cannot go keeps the blocks reserved until it does. */
    struct kvr_req_params p;
    REQUIRE(last_req(KVR_MSG_SEQ_BEGIN, &p) >= 0);
    net.fail_kind = KVR_MSG_CANCEL;
    net.fail_rc = KVR_EMPI;
    net.fail_left = 2; /* the prefill node's and the decode node's */
    clock_s += MAX_AGE + 1;
    everyone_reports(r, 1, 2);
    CHECK_EQ(a.n_finish, 1);
    CHECK_EQ(a.status, KVR_EDEADLINE);
    CHECK(reserved_on(r, 2) > 0); /* the decode node may still hold them */
    struct coord_router_counters cnt;
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.cancels_pending, 2);
    everyone_reports(r, 1, 2);
    CHECK_EQ(reserved_on(r, 2), 0);
    CHECK_EQ(count_sent(KVR_MSG_CANCEL, 2), 1);
    coord_router_counters(r, &cnt);
    CHECK_EQ(cnt.cancels_pending, 0);
    finish_all(r);
}

/* Random operations against many requests; invariants after each turn, and at the end
 * every request finished exactly once and nothing is reserved. */
static void test_random(void) {
    enum { N = 600 };
    static struct coord_stream s[N];
    static uint64_t ids[N];
    memset(s, 0, sizeof s);
    struct coord_router *r = small_cluster(4, 60, 2);
    uint64_t x = 99;
    int n_sub = 0;
    for (int step = 0; step < 4000; step++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int op = (int)((x >> 33) % 10);
        if (op < 2 && n_sub < N) {
            int pol = (int)((x >> 40) % 4);
            struct kvr_kv_policy_params pp = {(enum kvr_kv_policy)pol, pol ? 32 : 0, pol == KVR_KV_SINK ? 4 : 0};
            ids[n_sub] = submit(r, &s[n_sub], pol ? 1000 : 100, pp, (x >> 50) % 3 == 0 ? clock_s + 3 : 0);
            n_sub++;
        } else if (op == 2 && n_sub > 0) {
            coord_router_cancel(r, ids[(x >> 20) % (uint64_t)n_sub]);
        } else if (op <= 6 && net.n_out > 0) {
            /* A node answers some request it was sent: a token, a finish, a failure. */
            int i = (int)((x >> 24) % (uint64_t)net.n_out);
            int kind = out_kind(i);
            if (kind == KVR_MSG_SEQ_BEGIN) {
                struct kvr_msg m = out_msg(i);
                int rank = net.out[i].peer, what = (int)((x >> 45) % 8);
                if (what < 5)
                    tok_event(rank, m.req_id, 20 + what, KVR_FINISH_NONE, KVR_OK, NULL);
                else if (what == 5)
                    tok_event(rank, m.req_id, 21, KVR_FINISH_LENGTH, KVR_OK, NULL);
                else if (what == 6)
                    tok_event(rank, m.req_id, -1, KVR_FINISH_ERROR, KVR_ENOSPC, "no room");
                else
                    prefill_done(1, m.req_id, KVR_OK, NULL);
            }
        } else if (op == 7) {
            clock_s += 0.3;
        } else if (op == 8 && (x >> 30) % 50 == 0) {
            /* A decode node goes quiet for a while (it may be declared dead and return). */
            int rank = 2 + (int)((x >> 36) % 4);
            for (int k = 0; k < 6; k++) {
                clock_s += 0.5;
                for (int q = 1; q <= 5; q++)
                    if (q != rank)
                        report(q);
                coord_router_poll(r);
            }
        }
        for (int q = 1; q <= 5; q++)
            report(q);
        /* Nodes answer RESETs. */
        for (int i = 0; i < net.n_out; i++) {
            if (out_kind(i) != KVR_MSG_RESET)
                continue;
            struct kvr_msg m = out_msg(i);
            uint32_t e;
            if (kvr_msg_parse_reset(&m, &e) == KVR_OK)
                hello(net.out[i].peer, KVR_ROLE_DECODE, 0, 60, e, FP);
            net.out[i].bytes[6] = KVR_MSG_PING; /* answered */
        }
        coord_router_poll(r);
        for (int i = 0; i < n_sub; i++)
            if (s[i].n_finish > 1) {
                CHECK_EQ(s[i].n_finish, 1);
                i = n_sub;
            }
        if (net.n_out > 20000)
            clear_out();
    }
    /* Let every deadline pass. */
    for (int k = 0; k < 30; k++) {
        clock_s += MAX_AGE / 10;
        everyone_reports(r, 1, 5);
    }
    int n_once = 0;
    for (int i = 0; i < n_sub; i++)
        n_once += s[i].n_finish == 1;
    CHECK_EQ(n_once, n_sub);
    for (int rank = 2; rank <= 5; rank++)
        CHECK_EQ(reserved_on(r, rank), 0);
    struct coord_cluster_status st;
    REQUIRE(coord_router_status(r, &st) == KVR_OK);
    CHECK_EQ(st.running_requests, 0);
    CHECK_EQ(st.waiting_requests, 0);
    CHECK_EQ((int)st.finished_requests, n_sub);
    coord_cluster_status_deinit(&st);
    struct coord_router_counters cnt;
    coord_router_counters(r, &cnt);
    fprintf(stderr, "test_router: random run: %d requests, %llu re-runs, %llu reaped, %llu watchdog, %llu deaths, "
            "%llu rejoins\n", n_sub, (unsigned long long)cnt.reruns, (unsigned long long)cnt.reaped,
            (unsigned long long)cnt.watchdog, (unsigned long long)cnt.nodes_died,
            (unsigned long long)cnt.nodes_rejoined);
    finish_all(r);
}

static void quiet(void *ud, int level, const char *line) {
    (void)ud;
    (void)level;
    (void)line;
}

int main(void) {
    kvr_log_init("test", -1);
    kvr_log_set_sink(quiet, NULL);
    test_many_nodes();
    test_bad_hello();
    test_order_and_cancel();
    test_tokens_and_failures();
    test_deadlines();
    test_death_and_rerun();
    test_stall_and_rejoin();
    test_overflow_and_send_failures();
    test_random();
    net_reset();
    free(net.in);
    free(net.out);
    kvr_log_set_sink(NULL, NULL);
    CHECK_DONE();
}
