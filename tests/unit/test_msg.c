/* test_msg.c - the MPI message writers and parsers (common/msg.c): every kind round-trips
 * field for field; every prefix of every valid message and every message with a byte
 * too many is refused; a table of hostile field values (the limits placement divides by,
 * enums, lengths, NaN, ranks, reasons) gets the exact status; and the id map
 * (common/idmap.c) that finds requests by wire id agrees with a plain array under
 * random puts and deletes. */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "idmap.h"
#include "log.h"
#include "msg.h"
#include "status.h"

#define CAP 4096

struct buf {
    unsigned char b[CAP];
    size_t len;
};

/* Parses b's header (as rank 7 on tag 101) into m. */
static int header(const struct buf *b, struct kvr_msg *m) {
    memset(m, 0, sizeof *m);
    m->src = 7;
    m->tag = 101;
    return kvr_msg_parse_header(b->b, b->len, m);
}

/* Writes the message `call` writes (through `w`) into *bufp, and checks that measuring
 * (w->p == NULL) gives the same size as writing. */
#define WRITE(bufp, call)                                                         \
    do {                                                                          \
        struct buf *bp_ = (bufp);                                                 \
        struct kvr_wbuf w_[2] = {{.p = bp_->b, .cap = CAP}, {0}};                 \
        for (int k_ = 0; k_ < 2; k_++) {                                          \
            struct kvr_wbuf *w = &w_[k_];                                         \
            call;                                                                 \
        }                                                                         \
        REQUIRE(!w_[0].err && w_[0].len == w_[1].len);                            \
        bp_->len = w_[0].len;                                                     \
    } while (0)

static void put_i32(struct buf *b, size_t off, int32_t v) {
    for (int i = 0; i < 4; i++)
        b->b[off + (size_t)i] = (unsigned char)((uint32_t)v >> (8 * i));
}

static void put_u64(struct buf *b, size_t off, uint64_t v) {
    for (int i = 0; i < 8; i++)
        b->b[off + (size_t)i] = (unsigned char)(v >> (8 * i));
}

static void put_f32(struct buf *b, size_t off, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    put_i32(b, off, (int32_t)u);
}

/* ---- sample messages ------------------------------------------------------------- */

static const int prompt[5] = {1, 403, 407, 9, 511};

static struct kvr_req_params sample_req(void) {
    return (struct kvr_req_params){.req_id = 0x1234560, .begin_no = 42, .n_prompt = 5, .max_tokens = 100,
                                   .temperature = 0.8f, .top_p = 0.9f, .seed = 0xfeedfacecafebeefull,
                                   .stop_at_eos = 1, .policy = {KVR_KV_SINK, 64, 4}, .prefill_rank = 1,
                                   .decode_rank = 3, .t_coord_ms = 1234.5};
}

static struct kvr_hello sample_hello(void) {
    struct kvr_hello h = {.role = KVR_ROLE_DECODE, .colocated = 1, .epoch = 3, .setup_status = KVR_OK,
                          .n_layers = 5, .kv_dim = 32, .block_tokens = 16, .seq_len = 512, .vocab_size = 512,
                          .fingerprint = 0xabcdef0123456789ull, .kv_bytes_total = 20480ull * 19,
                          .n_blocks_total = 19, .n_threads = 2, .max_batch = 64, .max_batch_tokens = 512,
                          .n_ctx_max = 1024};
    snprintf(h.host, sizeof h.host, "node-a");
    return h;
}

/* Every valid message of the protocol, for the generic checks. */
static int all_samples(struct buf *out, int max) {
    int n = 0;
    struct kvr_req_params p = sample_req();
    struct kvr_hello h = sample_hello();
    struct kvr_node_report rep = {.kv_bytes_total = 100, .kv_bytes_used = 40, .kv_bytes_free = 60,
                                  .n_blocks_total = 10, .n_blocks_free = 6, .running = 2, .queued = 1,
                                  .queued_prompt_tokens = 77, .steps = 5, .tokens_out = 9};
    struct kvr_tok_event ev[2] = {{.req_id = 5, .token = 17, .n_generated = 1},
                                  {.req_id = 6, .token = -1, .finish = KVR_FINISH_ERROR, .status = KVR_ENOSPC,
                                   .n_generated = 3, .reason = "no room", .reason_len = 7}};
    struct kvr_prefill_done d = {.status = KVR_EUNAVAIL, .n_prompt = 5, .queue_ms = 1.5, .prefill_ms = 2.5,
                                 .reason = "gone", .reason_len = 4};
    struct kvr_seq_ready ready = {.begin_no = 42, .first_token = 9, .rng = 77, .n_kv_msgs = 10, .prefill_ms = 3};
    struct kvr_seq_abort ab = {.begin_no = 42, .status = KVR_ECHECKSUM, .reason = "bad", .reason_len = 3};
    static const unsigned char wire[24] = {1, 2, 3};
    WRITE(&out[n++], kvr_msg_write_hello(w, &h));
    WRITE(&out[n++], kvr_msg_write_status(w, &rep));
    WRITE(&out[n++], kvr_msg_write_tokens(w, ev, 2));
    WRITE(&out[n++], kvr_msg_write_prefill_done(w, 9, &d));
    WRITE(&out[n++], kvr_msg_write_req(w, KVR_MSG_PREFILL_REQ, &p, prompt));
    WRITE(&out[n++], kvr_msg_write_req(w, KVR_MSG_SEQ_BEGIN, &p, prompt));
    WRITE(&out[n++], kvr_msg_write_empty(w, KVR_MSG_CANCEL, 9));
    WRITE(&out[n++], kvr_msg_write_reset(w, 4));
    WRITE(&out[n++], kvr_msg_write_kv(w, 9, 42, wire, sizeof wire));
    WRITE(&out[n++], kvr_msg_write_seq_ready(w, 9, &ready));
    WRITE(&out[n++], kvr_msg_write_seq_abort(w, 9, &ab));
    static const struct kvr_link lk = {.peer = 5, .value = 2, .port = "1234.0:567#tcp://127.0.0.1:4000"};
    WRITE(&out[n++], kvr_msg_write_link(w, KVR_MSG_LINK, &lk));
    static struct kvr_peer_info peers[2] = {{.id = 0, .role = KVR_ROLE_COORD, .host = "a"},
                                            {.id = 1, .role = KVR_ROLE_PREFILL, .host = "b"}};
    struct kvr_join_info ji = {.self = 5, .coord = 0, .n_peers = 2, .peers = peers};
    WRITE(&out[n++], kvr_msg_write_join_info(w, &ji));
    REQUIRE(n <= max);
    return n;
}

/* Parses m's body with the parser of its kind. */
static int parse_any(const struct kvr_msg *m) {
    int ids[16], n_ev;
    struct kvr_req_params p;
    struct kvr_hello h;
    struct kvr_node_report r;
    static struct kvr_tok_event ev[8];
    struct kvr_prefill_done d;
    struct kvr_seq_ready sr;
    struct kvr_seq_abort sa;
    uint32_t epoch;
    uint64_t bn;
    const unsigned char *wire;
    size_t wl;
    switch (m->kind) {
    case KVR_MSG_HELLO:
        return kvr_msg_parse_hello(m, &h);
    case KVR_MSG_STATUS:
        return kvr_msg_parse_status(m, &r);
    case KVR_MSG_TOKENS:
        return kvr_msg_parse_tokens(m, ev, 8, &n_ev);
    case KVR_MSG_PREFILL_DONE:
        return kvr_msg_parse_prefill_done(m, &d);
    case KVR_MSG_PREFILL_REQ:
    case KVR_MSG_SEQ_BEGIN:
        return kvr_msg_parse_req(m, &p, ids, 16, 512);
    case KVR_MSG_RESET:
        return kvr_msg_parse_reset(m, &epoch);
    case KVR_MSG_KV:
        return kvr_msg_parse_kv(m, &bn, &wire, &wl);
    case KVR_MSG_SEQ_READY:
        return kvr_msg_parse_seq_ready(m, &sr);
    case KVR_MSG_SEQ_ABORT:
        return kvr_msg_parse_seq_abort(m, &sa);
    case KVR_MSG_LINK:
    case KVR_MSG_LINKED:
    case KVR_MSG_LINK_PORT:
    case KVR_MSG_UNLINK:
    case KVR_MSG_LINK_HELLO:
    case KVR_MSG_BYE:
    case KVR_MSG_DRAIN_ME: {
        static struct kvr_link l;
        return kvr_msg_parse_link(m, &l);
    }
    case KVR_MSG_JOIN_INFO: {
        static struct kvr_peer_info peers[KVR_JOIN_MAX_PEERS];
        struct kvr_join_info j = {.peers = peers};
        return kvr_msg_parse_join_info(m, &j);
    }
    default:
        return kvr_msg_parse_empty(m);
    }
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_round_trips(void) {
    struct buf b;
    struct kvr_msg m;
    /* Request. */
    struct kvr_req_params p = sample_req(), q;
    int ids[8];
    WRITE(&b, kvr_msg_write_req(w, KVR_MSG_SEQ_BEGIN, &p, prompt));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(m.kind, KVR_MSG_SEQ_BEGIN);
    CHECK_EQ(m.req_id, p.req_id);
    CHECK_EQ(kvr_msg_parse_req(&m, &q, ids, 8, 512), KVR_OK);
    CHECK_EQ(q.begin_no, 42);
    CHECK_EQ(q.n_prompt, 5);
    CHECK_EQ(q.max_tokens, 100);
    CHECK(q.temperature == 0.8f);
    CHECK_NEAR(q.top_p, 0.9, 1e-7);
    CHECK(q.seed == p.seed);
    CHECK_EQ(q.policy.policy, KVR_KV_SINK);
    CHECK_EQ(q.policy.window, 64);
    CHECK_EQ(q.policy.sinks, 4);
    CHECK_EQ(q.prefill_rank, 1);
    CHECK_EQ(q.decode_rank, 3);
    CHECK_NEAR(q.t_coord_ms, 1234.5, 0);
    CHECK(memcmp(ids, prompt, sizeof prompt) == 0);
    /* The receiver's room and vocabulary: ERANGE, for this request only. */
    CHECK_EQ(kvr_msg_parse_req(&m, &q, ids, 4, 512), KVR_ERANGE);
    CHECK_EQ(kvr_msg_parse_req(&m, &q, ids, 8, 511), KVR_ERANGE);

    /* HELLO. */
    struct kvr_hello h = sample_hello(), h2;
    WRITE(&b, kvr_msg_write_hello(w, &h));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_hello(&m, &h2), KVR_OK);
    CHECK(memcmp(&h, &h2, sizeof h) == 0);
    /* A host name of 63 characters and more: cut at 63, always terminated. */
    memset(h.host, 'x', sizeof h.host);
    WRITE(&b, kvr_msg_write_hello(w, &h));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_hello(&m, &h2), KVR_OK);
    CHECK_EQ(strlen(h2.host), 63);

    /* TOKENS with reasons. */
    struct kvr_tok_event ev[3] = {{.req_id = 1, .token = 5, .n_generated = 1},
                                  {.req_id = 2, .token = 7, .finish = KVR_FINISH_LENGTH, .n_generated = 9},
                                  {.req_id = 3, .token = -1, .finish = KVR_FINISH_ERROR, .status = KVR_EINVAL,
                                   .reason = "step failed: x", .reason_len = 14}};
    struct kvr_tok_event got[3];
    int n = 0;
    WRITE(&b, kvr_msg_write_tokens(w, ev, 3));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_tokens(&m, got, 3, &n), KVR_OK);
    CHECK_EQ(n, 3);
    CHECK(got[0].req_id == 1 && got[0].token == 5 && got[0].reason_len == 0);
    CHECK(got[1].finish == KVR_FINISH_LENGTH && got[1].n_generated == 9);
    CHECK(got[2].status == KVR_EINVAL && got[2].reason_len == 14 && !memcmp(got[2].reason, "step failed: x", 14));
    CHECK_EQ(kvr_msg_parse_tokens(&m, got, 2, &n), KVR_EFORMAT); /* more than the receiver takes */
    CHECK_EQ(n, 0);
    /* A reason longer than the limit is cut by the writer, never refused at the reader. */
    char longr[600];
    memset(longr, 'r', sizeof longr);
    ev[2].reason = longr;
    ev[2].reason_len = (int)sizeof longr;
    WRITE(&b, kvr_msg_write_tokens(w, ev, 3));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_tokens(&m, got, 3, &n), KVR_OK);
    CHECK_EQ(got[2].reason_len, KVR_REASON_MAX);

    /* The rest. */
    struct kvr_prefill_done d = {.status = KVR_OK, .n_prompt = 5, .queue_ms = 1, .prefill_ms = 2}, d2;
    WRITE(&b, kvr_msg_write_prefill_done(w, 99, &d));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(m.req_id, 99);
    CHECK_EQ(kvr_msg_parse_prefill_done(&m, &d2), KVR_OK);
    CHECK(d2.status == KVR_OK && d2.n_prompt == 5 && d2.reason == NULL && d2.reason_len == 0);
    uint32_t epoch = 0;
    WRITE(&b, kvr_msg_write_reset(w, 77));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_reset(&m, &epoch), KVR_OK);
    CHECK_EQ(epoch, 77);
    struct kvr_seq_abort a = {.begin_no = 5, .status = KVR_ECANCELED}, a2;
    WRITE(&b, kvr_msg_write_seq_abort(w, 11, &a));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_seq_abort(&m, &a2), KVR_OK);
    CHECK(a2.begin_no == 5 && a2.status == KVR_ECANCELED);
    uint64_t bn;
    const unsigned char *wire;
    size_t wl;
    static const unsigned char blk[3] = {9, 8, 7};
    WRITE(&b, kvr_msg_write_kv(w, 11, 6, blk, 3));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_kv(&m, &bn, &wire, &wl), KVR_OK);
    CHECK(bn == 6 && wl == 3 && wire[2] == 7);

    /* The elastic pool's messages (issue 14). */
    struct kvr_link l = {.peer = 7, .value = KVR_ROLE_DECODE, .port = "port-name"}, l2;
    WRITE(&b, kvr_msg_write_link(w, KVR_MSG_LINK, &l));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(m.kind, KVR_MSG_LINK);
    CHECK_EQ(kvr_msg_parse_link(&m, &l2), KVR_OK);
    CHECK(l2.peer == 7 && l2.value == KVR_ROLE_DECODE && !strcmp(l2.port, "port-name"));
    l.peer = -1;
    WRITE(&b, kvr_msg_write_link(w, KVR_MSG_BYE, &l));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_link(&m, &l2), KVR_EFORMAT); /* no negative peer id */
    static struct kvr_peer_info pi[KVR_JOIN_MAX_PEERS];
    struct kvr_peer_info in[2] = {{.id = 0, .role = KVR_ROLE_COORD, .host = "c"},
                                  {.id = 3, .role = KVR_ROLE_PREFILL, .host = "node7"}};
    struct kvr_join_info j = {.self = 9, .coord = 0, .n_peers = 2, .peers = in}, j2 = {.peers = pi};
    WRITE(&b, kvr_msg_write_join_info(w, &j));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_join_info(&m, &j2), KVR_OK);
    CHECK(j2.self == 9 && j2.coord == 0 && j2.n_peers == 2 && pi[1].id == 3 && pi[1].role == KVR_ROLE_PREFILL &&
          !strcmp(pi[1].host, "node7"));
    in[1].id = 9; /* a peer with the node's own id */
    WRITE(&b, kvr_msg_write_join_info(w, &j));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_join_info(&m, &j2), KVR_EFORMAT);
    in[1].id = 3;
    in[1].role = 7; /* no such role */
    WRITE(&b, kvr_msg_write_join_info(w, &j));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_join_info(&m, &j2), KVR_EFORMAT);
}

/* Every valid message parses; every strict prefix and every one-byte-longer copy does not. */
static void test_truncation_and_extra(void) {
    static struct buf s[16];
    int n = all_samples(s, 16);
    for (int k = 0; k < n; k++) {
        struct kvr_msg m;
        CHECK_EQ(header(&s[k], &m), KVR_OK);
        CHECK_EQ(parse_any(&m), KVR_OK);
        int kind = m.kind;
        for (size_t len = 0; len < s[k].len; len++) {
            struct buf t = s[k];
            t.len = len;
            int rc = header(&t, &m);
            if (len < KVR_MSG_HDR_NBYTES) {
                CHECK_EQ(rc, KVR_EFORMAT);
                continue;
            }
            CHECK_EQ(rc, KVR_OK);
            rc = parse_any(&m);
            /* A KV message's tail is an opaque kv_wire block (kv_wire.c checks it). */
            if (rc == KVR_OK && !(kind == KVR_MSG_KV && len > KVR_MSG_HDR_NBYTES + 8)) {
                fprintf(stderr, "  %s accepted at %zu of %zu bytes\n", kvr_msg_kind_name(kind), len, s[k].len);
                CHECK(rc != KVR_OK);
            }
        }
        struct buf t = s[k];
        t.b[t.len++] = 0;
        if (kind == KVR_MSG_KV)
            continue; /* its tail is an opaque kv_wire message: kv_wire.c checks that */
        CHECK_EQ(header(&t, &m), KVR_OK);
        CHECK(parse_any(&m) != KVR_OK);
    }
}

static void test_headers(void) {
    struct buf b;
    struct kvr_msg m;
    WRITE(&b, kvr_msg_write_empty(w, KVR_MSG_PING, 0));
    CHECK_EQ(header(&b, &m), KVR_OK);
    struct buf t = b;
    t.b[0] ^= 1; /* magic */
    CHECK_EQ(header(&t, &m), KVR_EFORMAT);
    t = b;
    t.b[4] = 1; /* version 1: the old protocol */
    CHECK_EQ(header(&t, &m), KVR_EFORMAT);
    t = b;
    t.b[6] = 99; /* unknown kind */
    CHECK_EQ(header(&t, &m), KVR_EFORMAT);
    t = b;
    t.b[6] = 0;
    CHECK_EQ(header(&t, &m), KVR_EFORMAT);
    CHECK_EQ(kvr_msg_parse_header(b.b, 0, &m), KVR_EFORMAT);
    /* A request id on a kind that carries none (the fuzzer found this one). */
    struct kvr_node_report rep = {0};
    WRITE(&b, kvr_msg_write_status(w, &rep));
    b.b[8] = 5;
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_status(&m, &rep), KVR_EFORMAT);
    WRITE(&b, kvr_msg_write_empty(w, KVR_MSG_PING, 3));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_empty(&m), KVR_EFORMAT);
}

/* Body offsets (after the 16-byte header) of the fields the table below mutates. */
enum {
    H_ROLE = 16, H_COLOC = 20, H_EPOCH = 24, H_SETUP = 28, H_LAYERS = 96, H_KVDIM = 100, H_BT = 104,
    H_SEQ = 108, H_VOCAB = 112, H_NBLK = 132, H_THREADS = 136, H_MAXB = 140, H_MAXBT = 144, H_NCTX = 148,
    R_REQ = 16, R_BEGIN = 24, R_NPROMPT = 32, R_MAXT = 36, R_TEMP = 40, R_TOPP = 44, R_STOP = 56, R_POL = 60,
    R_WIN = 64, R_SINK = 68, R_PRANK = 72, R_DRANK = 76, R_TIME = 80, R_PROMPT = 88,
    T_COUNT = 16, T_TOKEN = 28, T_FINISH = 32, T_STATUS = 36, T_NGEN = 40, T_RLEN = 44,
};

struct mutation {
    const char *what;
    int kind;       /* which sample: KVR_MSG_HELLO, KVR_MSG_SEQ_BEGIN, KVR_MSG_TOKENS */
    size_t off;
    int is_f32;
    int64_t v;      /* i32 value, or u64 for the 8-byte fields below */
    float f;
    int want;
};

static const struct mutation mutations[] = {
    {"HELLO block_tokens 0 (placement would divide by it)", KVR_MSG_HELLO, H_BT, 0, 0, 0, KVR_EFORMAT},
    {"HELLO block_tokens -16", KVR_MSG_HELLO, H_BT, 0, -16, 0, KVR_EFORMAT},
    {"HELLO block_tokens 65537", KVR_MSG_HELLO, H_BT, 0, 65537, 0, KVR_EFORMAT},
    {"HELLO block_tokens INT32_MAX", KVR_MSG_HELLO, H_BT, 0, INT32_MAX, 0, KVR_EFORMAT},
    {"HELLO n_blocks 0", KVR_MSG_HELLO, H_NBLK, 0, 0, 0, KVR_EFORMAT},
    {"HELLO n_blocks INT32_MIN", KVR_MSG_HELLO, H_NBLK, 0, INT32_MIN, 0, KVR_EFORMAT},
    {"HELLO seq_len 0", KVR_MSG_HELLO, H_SEQ, 0, 0, 0, KVR_EFORMAT},
    {"HELLO vocab -1", KVR_MSG_HELLO, H_VOCAB, 0, -1, 0, KVR_EFORMAT},
    {"HELLO n_layers 0", KVR_MSG_HELLO, H_LAYERS, 0, 0, 0, KVR_EFORMAT},
    {"HELLO kv_dim INT32_MAX", KVR_MSG_HELLO, H_KVDIM, 0, INT32_MAX, 0, KVR_EFORMAT},
    {"HELLO max_batch 0", KVR_MSG_HELLO, H_MAXB, 0, 0, 0, KVR_EFORMAT},
    {"HELLO max_batch_tokens -5", KVR_MSG_HELLO, H_MAXBT, 0, -5, 0, KVR_EFORMAT},
    {"HELLO n_ctx_max INT32_MAX", KVR_MSG_HELLO, H_NCTX, 0, INT32_MAX, 0, KVR_EFORMAT},
    {"HELLO threads -1", KVR_MSG_HELLO, H_THREADS, 0, -1, 0, KVR_EFORMAT},
    {"HELLO role coordinator", KVR_MSG_HELLO, H_ROLE, 0, KVR_ROLE_COORD, 0, KVR_EFORMAT},
    {"HELLO role 9", KVR_MSG_HELLO, H_ROLE, 0, 9, 0, KVR_EFORMAT},
    {"HELLO colocated 2", KVR_MSG_HELLO, H_COLOC, 0, 2, 0, KVR_EFORMAT},
    {"HELLO setup status positive", KVR_MSG_HELLO, H_SETUP, 0, 5, 0, KVR_EFORMAT},
    {"HELLO setup failed: limits ignored", KVR_MSG_HELLO, H_SETUP, 0, KVR_ENOMEM, 0, KVR_OK},
    {"HELLO epoch max", KVR_MSG_HELLO, H_EPOCH, 0, -1, 0, KVR_OK},
    {"REQ req_id differs from the header", KVR_MSG_SEQ_BEGIN, R_REQ, 0, 5, 0, KVR_EFORMAT},
    {"REQ begin_no 0", KVR_MSG_SEQ_BEGIN, R_BEGIN, 0, 0, 0, KVR_EFORMAT},
    {"REQ n_prompt 0", KVR_MSG_SEQ_BEGIN, R_NPROMPT, 0, 0, 0, KVR_EFORMAT},
    {"REQ n_prompt INT32_MAX", KVR_MSG_SEQ_BEGIN, R_NPROMPT, 0, INT32_MAX, 0, KVR_EFORMAT},
    {"REQ n_prompt 6 (body has 5)", KVR_MSG_SEQ_BEGIN, R_NPROMPT, 0, 6, 0, KVR_EFORMAT},
    {"REQ n_prompt -1", KVR_MSG_SEQ_BEGIN, R_NPROMPT, 0, -1, 0, KVR_EFORMAT},
    {"REQ max_tokens 0", KVR_MSG_SEQ_BEGIN, R_MAXT, 0, 0, 0, KVR_EFORMAT},
    {"REQ max_tokens INT32_MIN", KVR_MSG_SEQ_BEGIN, R_MAXT, 0, INT32_MIN, 0, KVR_EFORMAT},
    {"REQ max_tokens INT32_MAX", KVR_MSG_SEQ_BEGIN, R_MAXT, 0, INT32_MAX, 0, KVR_OK},
    {"REQ temperature NaN", KVR_MSG_SEQ_BEGIN, R_TEMP, 1, 0, NAN, KVR_EFORMAT},
    {"REQ temperature -inf", KVR_MSG_SEQ_BEGIN, R_TEMP, 1, 0, -INFINITY, KVR_EFORMAT},
    {"REQ temperature inf", KVR_MSG_SEQ_BEGIN, R_TEMP, 1, 0, INFINITY, KVR_EFORMAT},
    {"REQ top_p NaN", KVR_MSG_SEQ_BEGIN, R_TOPP, 1, 0, NAN, KVR_EFORMAT},
    {"REQ top_p 1.5", KVR_MSG_SEQ_BEGIN, R_TOPP, 1, 0, 1.5f, KVR_EFORMAT},
    {"REQ stop_at_eos 2", KVR_MSG_SEQ_BEGIN, R_STOP, 0, 2, 0, KVR_EFORMAT},
    {"REQ policy 4", KVR_MSG_SEQ_BEGIN, R_POL, 0, 4, 0, KVR_EFORMAT},
    {"REQ policy -1", KVR_MSG_SEQ_BEGIN, R_POL, 0, -1, 0, KVR_EFORMAT},
    {"REQ sink window 0", KVR_MSG_SEQ_BEGIN, R_WIN, 0, 0, 0, KVR_EFORMAT},
    {"REQ sink window INT32_MAX", KVR_MSG_SEQ_BEGIN, R_WIN, 0, INT32_MAX, 0, KVR_OK},
    {"REQ sinks = window", KVR_MSG_SEQ_BEGIN, R_SINK, 0, 64, 0, KVR_EFORMAT},
    {"REQ sinks -1", KVR_MSG_SEQ_BEGIN, R_SINK, 0, -1, 0, KVR_EFORMAT},
    {"REQ prefill rank -1", KVR_MSG_SEQ_BEGIN, R_PRANK, 0, -1, 0, KVR_EFORMAT},
    {"REQ decode rank INT32_MIN", KVR_MSG_SEQ_BEGIN, R_DRANK, 0, INT32_MIN, 0, KVR_EFORMAT},
    {"REQ prompt id -1", KVR_MSG_SEQ_BEGIN, R_PROMPT, 0, -1, 0, KVR_ERANGE},
    {"REQ prompt id = vocab", KVR_MSG_SEQ_BEGIN, R_PROMPT + 8, 0, 512, 0, KVR_ERANGE},
    {"TOKENS count 0", KVR_MSG_TOKENS, T_COUNT, 0, 0, 0, KVR_EFORMAT},
    {"TOKENS count -1", KVR_MSG_TOKENS, T_COUNT, 0, -1, 0, KVR_EFORMAT},
    {"TOKENS count INT32_MAX", KVR_MSG_TOKENS, T_COUNT, 0, INT32_MAX, 0, KVR_EFORMAT},
    {"TOKENS count 3 (body has 2)", KVR_MSG_TOKENS, T_COUNT, 0, 3, 0, KVR_EFORMAT},
    {"TOKENS token -2", KVR_MSG_TOKENS, T_TOKEN, 0, -2, 0, KVR_EFORMAT},
    {"TOKENS running event without a token", KVR_MSG_TOKENS, T_TOKEN, 0, -1, 0, KVR_EFORMAT},
    {"TOKENS finish 6", KVR_MSG_TOKENS, T_FINISH, 0, 6, 0, KVR_EFORMAT},
    {"TOKENS running event with a status", KVR_MSG_TOKENS, T_STATUS, 0, KVR_EIO, 0, KVR_EFORMAT},
    {"TOKENS status positive", KVR_MSG_TOKENS, T_STATUS, 0, 1, 0, KVR_EFORMAT},
    {"TOKENS n_generated -1", KVR_MSG_TOKENS, T_NGEN, 0, -1, 0, KVR_EFORMAT},
};

static void test_mutations(void) {
    int n_bad = 0;
    for (size_t i = 0; i < sizeof mutations / sizeof mutations[0]; i++) {
        const struct mutation *mu = &mutations[i];
        struct buf b;
        struct kvr_req_params p = sample_req();
        struct kvr_hello h = sample_hello();
        struct kvr_tok_event ev[2] = {{.req_id = 5, .token = 17, .n_generated = 1},
                                      {.req_id = 6, .token = 3, .finish = KVR_FINISH_LENGTH, .n_generated = 3}};
        if (mu->kind == KVR_MSG_HELLO)
            WRITE(&b, kvr_msg_write_hello(w, &h));
        else if (mu->kind == KVR_MSG_SEQ_BEGIN)
            WRITE(&b, kvr_msg_write_req(w, KVR_MSG_SEQ_BEGIN, &p, prompt));
        else
            WRITE(&b, kvr_msg_write_tokens(w, ev, 2));
        if (mu->is_f32)
            put_f32(&b, mu->off, mu->f);
        else if (mu->off == R_REQ || mu->off == R_BEGIN)
            put_u64(&b, mu->off, (uint64_t)mu->v);
        else
            put_i32(&b, mu->off, (int32_t)mu->v);
        struct kvr_msg m;
        REQUIRE(header(&b, &m) == KVR_OK);
        int rc = parse_any(&m);
        if (rc != mu->want) {
            fprintf(stderr, "  %s: got %s, want %s\n", mu->what, kvr_status_name(rc), kvr_status_name(mu->want));
            n_bad++;
        }
        CHECK_EQ(rc, mu->want);
    }
    fprintf(stderr, "test_msg: %zu hostile field values, %d wrong\n", sizeof mutations / sizeof mutations[0], n_bad);
}

static void test_reasons(void) {
    char out[16];
    CHECK_STREQ(kvr_reason_line(out, sizeof out, "a\nb\tc\x7f", 6), "a b c ");
    CHECK_STREQ(kvr_reason_line(out, sizeof out, "0123456789abcdefghij", 20), "0123456789abcde");
    CHECK_STREQ(kvr_reason_line(out, sizeof out, NULL, 5), "");
    CHECK_STREQ(kvr_reason_line(out, sizeof out, "ab\0cd", 5), "ab");
    /* A reason length that points past the body. */
    struct buf b;
    struct kvr_seq_abort a = {.begin_no = 1, .status = KVR_EIO, .reason = "xyz", .reason_len = 3}, a2;
    WRITE(&b, kvr_msg_write_seq_abort(w, 4, &a));
    b.b[16 + 12] = 200; /* u16 length: 200 bytes promised, 3 there */
    struct kvr_msg m;
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_seq_abort(&m, &a2), KVR_EFORMAT);
    b.b[16 + 12] = 0xff; /* over KVR_REASON_MAX */
    b.b[16 + 13] = 0x7f;
    CHECK_EQ(kvr_msg_parse_seq_abort(&m, &a2), KVR_EFORMAT);
    /* An abort that says OK is no abort. */
    a.status = KVR_OK;
    WRITE(&b, kvr_msg_write_seq_abort(w, 4, &a));
    REQUIRE(header(&b, &m) == KVR_OK);
    CHECK_EQ(kvr_msg_parse_seq_abort(&m, &a2), KVR_EFORMAT);
    /* RESET epoch 0, KV without a block, CANCEL with a body. */
    WRITE(&b, kvr_msg_write_reset(w, 0));
    REQUIRE(header(&b, &m) == KVR_OK);
    uint32_t e;
    CHECK_EQ(kvr_msg_parse_reset(&m, &e), KVR_EFORMAT);
    WRITE(&b, kvr_msg_write_kv(w, 4, 1, NULL, 0));
    REQUIRE(header(&b, &m) == KVR_OK);
    uint64_t bn;
    const unsigned char *wire;
    size_t wl;
    CHECK_EQ(kvr_msg_parse_kv(&m, &bn, &wire, &wl), KVR_EFORMAT);
}

/* The id map against a plain array, under random puts and deletes. */
static void test_idmap(void) {
    enum { N = 3000 };
    static void *ref[N];
    struct kvr_idmap map = {0};
    uint64_t x = 12345;
    int n_live = 0;
    for (int step = 0; step < 200000; step++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int k = (int)((x >> 33) % N);
        uint64_t id = ((uint64_t)k << 4) | 3; /* wire ids look like this */
        if ((x >> 20) & 1) {
            void *v = (void *)(uintptr_t)(k + 1);
            CHECK_EQ(kvr_idmap_put(&map, id, v), KVR_OK);
            n_live += ref[k] == NULL;
            ref[k] = v;
        } else {
            void *got = kvr_idmap_del(&map, id);
            if (got != ref[k]) {
                CHECK(got == ref[k]);
                break;
            }
            n_live -= ref[k] != NULL;
            ref[k] = NULL;
        }
        if (step % 997 == 0) {
            for (int j = 0; j < N; j++)
                if (kvr_idmap_get(&map, ((uint64_t)j << 4) | 3) != ref[j]) {
                    CHECK(!"idmap disagrees with the array");
                    j = N;
                    step = 1 << 30;
                }
            CHECK_EQ(map.n, (size_t)n_live);
        }
    }
    CHECK(kvr_idmap_get(&map, 0) == NULL);
    CHECK_EQ(kvr_idmap_put(&map, 0, ref), KVR_EINVAL);
    kvr_idmap_deinit(&map);
}

static void quiet(void *ud, int level, const char *line) {
    (void)ud;
    (void)level;
    (void)line;
}

int main(void) {
    kvr_log_init("test", -1);
    kvr_log_set_sink(quiet, NULL); /* the parsers log every refusal: thousands of lines */
    test_round_trips();
    test_headers();
    test_truncation_and_extra();
    test_mutations();
    test_reasons();
    test_idmap();
    kvr_log_set_sink(NULL, NULL);
    CHECK_DONE();
}
