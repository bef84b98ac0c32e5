/* fuzz_msg.c - libFuzzer harness for the MPI message parsers (common/msg.c): the header,
 * then the body parser of the header's kind (every kind). Built only with -DKVR_FUZZ=ON
 * and clang; scripts/fuzz.sh runs it on seeds from fuzz_msg_seeds.c.
 *
 * Oracles beyond the sanitizers: a request's prompt ids are all in [0, vocab), a
 * HELLO's limits are all positive and bounded, and every body that parses re-encodes to
 * exactly its input (the encoding is canonical), so no field is read wrong. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "msg.h"
#include "status.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define VOCAB 512
#define MAX_PROMPT 512
#define MAX_EV 64

static void quiet(void *ud, int level, const char *line) {
    (void)ud;
    (void)level;
    (void)line;
}

static uint8_t out[1 << 20];

/* The bytes a writer produces must equal the input. */
#define SAME(call)                                                       \
    do {                                                                 \
        struct kvr_wbuf w_ = {.p = out, .cap = sizeof out};              \
        struct kvr_wbuf *w = &w_;                                        \
        call;                                                            \
        if (w_.err || w_.len != size || memcmp(out, data, size) != 0)    \
            abort();                                                     \
    } while (0)

static int has_nul(const char *s, int len) { return s && len > 0 && memchr(s, 0, (size_t)len) != NULL; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int init;
    if (!init) {
        kvr_log_set_sink(quiet, NULL);
        init = 1;
    }
    struct kvr_msg m = {.src = 1, .tag = 101};
    if (kvr_msg_parse_header(data, size, &m) != KVR_OK)
        return 0;
    static int prompt[MAX_PROMPT];
    static struct kvr_tok_event ev[MAX_EV];
    switch (m.kind) {
    case KVR_MSG_PREFILL_REQ:
    case KVR_MSG_SEQ_BEGIN: {
        struct kvr_req_params p;
        if (kvr_msg_parse_req(&m, &p, prompt, MAX_PROMPT, VOCAB) != KVR_OK)
            return 0;
        if (p.n_prompt < 1 || p.n_prompt > MAX_PROMPT || p.max_tokens < 1 || p.begin_no == 0)
            abort();
        for (int i = 0; i < p.n_prompt; i++)
            if (prompt[i] < 0 || prompt[i] >= VOCAB)
                abort();
        SAME(kvr_msg_write_req(w, m.kind, &p, prompt));
        break;
    }
    case KVR_MSG_HELLO: {
        struct kvr_hello h;
        if (kvr_msg_parse_hello(&m, &h) != KVR_OK)
            return 0;
        if (h.setup_status == KVR_OK && (h.block_tokens < 1 || h.n_blocks_total < 1 || h.seq_len < 1 ||
                                         h.vocab_size < 1 || h.max_batch_tokens < 1 || h.n_ctx_max < 1))
            abort();
        /* Host bytes after its NUL are not kept: no byte comparison. */
        break;
    }
    case KVR_MSG_STATUS: {
        struct kvr_node_report r;
        if (kvr_msg_parse_status(&m, &r) == KVR_OK)
            SAME(kvr_msg_write_status(w, &r));
        break;
    }
    case KVR_MSG_TOKENS: {
        int n = 0;
        if (kvr_msg_parse_tokens(&m, ev, MAX_EV, &n) != KVR_OK)
            return 0;
        if (n < 1 || n > MAX_EV)
            abort();
        for (int i = 0; i < n; i++)
            if (has_nul(ev[i].reason, ev[i].reason_len))
                return 0;
        SAME(kvr_msg_write_tokens(w, ev, n));
        break;
    }
    case KVR_MSG_PREFILL_DONE: {
        struct kvr_prefill_done d;
        if (kvr_msg_parse_prefill_done(&m, &d) == KVR_OK && !has_nul(d.reason, d.reason_len))
            SAME(kvr_msg_write_prefill_done(w, m.req_id, &d));
        break;
    }
    case KVR_MSG_RESET: {
        uint32_t e;
        if (kvr_msg_parse_reset(&m, &e) == KVR_OK)
            SAME(kvr_msg_write_reset(w, e));
        break;
    }
    case KVR_MSG_KV: {
        uint64_t bn;
        const unsigned char *wire;
        size_t wl;
        if (kvr_msg_parse_kv(&m, &bn, &wire, &wl) == KVR_OK)
            SAME(kvr_msg_write_kv(w, m.req_id, bn, wire, wl));
        break;
    }
    case KVR_MSG_SEQ_READY: {
        struct kvr_seq_ready r;
        if (kvr_msg_parse_seq_ready(&m, &r) == KVR_OK)
            SAME(kvr_msg_write_seq_ready(w, m.req_id, &r));
        break;
    }
    case KVR_MSG_SEQ_ABORT: {
        struct kvr_seq_abort a;
        if (kvr_msg_parse_seq_abort(&m, &a) == KVR_OK && !has_nul(a.reason, a.reason_len))
            SAME(kvr_msg_write_seq_abort(w, m.req_id, &a));
        break;
    }
    case KVR_MSG_LINK:
    case KVR_MSG_LINKED:
    case KVR_MSG_LINK_PORT:
    case KVR_MSG_UNLINK:
    case KVR_MSG_LINK_HELLO:
    case KVR_MSG_BYE:
    case KVR_MSG_DRAIN_ME: {
        static struct kvr_link l;
        if (kvr_msg_parse_link(&m, &l) == KVR_OK)
            SAME(kvr_msg_write_link(w, m.kind, &l));
        break;
    }
    case KVR_MSG_JOIN_INFO: {
        static struct kvr_peer_info peers[KVR_JOIN_MAX_PEERS];
        struct kvr_join_info j = {.peers = peers};
        /* Parsed only: host names are fixed 64-byte fields whose bytes after a NUL do
         * not survive a round trip. */
        kvr_msg_parse_join_info(&m, &j);
        break;
    }
    default:
        if (kvr_msg_parse_empty(&m) == KVR_OK)
            SAME(kvr_msg_write_empty(w, m.kind, m.req_id));
    }
    return 0;
}
