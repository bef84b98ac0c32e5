/* msg.h - kvrelay's MPI messages as bytes: one writer and one validating parser per
 * message kind, with no MPI in sight. xfer.c (the MPI transport of the nodes), the
 * coordinator's transport and the unit tests and fuzzer of the parsers all go through
 * these, so what a test drives is exactly what crosses the wire.
 *
 * Every message is a 16-byte header (u32 magic "KVRM", u16 version, u16 kind, u64 req_id)
 * and a body written field by field in little-endian (bytes.h). Parsers never trust a
 * byte: lengths, enums, ranges and string lengths are checked and anything off is
 * KVR_EFORMAT (or KVR_ERANGE for a value this receiver cannot hold), logged with the
 * sender's rank. docs/ARCHITECTURE.md lists the kinds and who sends them. */
#ifndef KVR_MSG_H
#define KVR_MSG_H

#include <stddef.h>
#include <stdint.h>

#include "bytes.h"
#include "kv_cache.h"
#include "mpi_tags.h"

/* Values travel in HELLO: append only. */
enum kvr_role {
    KVR_ROLE_COORD = 0,
    KVR_ROLE_PREFILL = 1,
    KVR_ROLE_DECODE = 2,
};

const char *kvr_role_name(int role);
const char *kvr_msg_kind_name(int kind);

/* A failure reason that crosses MPI: one line of at most this many bytes. */
#define KVR_REASON_MAX 200

/* Copies a reason of len bytes (not NUL-terminated, may be NULL) into out as one
 * printable line: control bytes become spaces, truncated to out_len - 1. Returns out. */
char *kvr_reason_line(char *out, size_t out_len, const char *reason, size_t len);

/* Limits parsers enforce on sizes they read (nothing bigger is ever sent). */
#define KVR_MSG_MAX_PROMPT (1 << 24)   /* prompt tokens in one request */
#define KVR_MSG_MAX_BLOCK_TOKENS 65536 /* tokens per KV block */
#define KVR_MSG_MAX_DIM (1 << 24)      /* seq_len, vocab, kv_dim, batch limits */

/* A request as nodes see it (PREFILL_REQ and SEQ_BEGIN). */
struct kvr_req_params {
    uint64_t req_id;      /* the attempt's wire id (the header's req_id) */
    uint64_t begin_no;    /* the decode node's number of this SEQ_BEGIN (1, 2, ... per node,
                           * in the coordinator's send order); KV, SEQ_READY and SEQ_ABORT
                           * carry it so the decode node can tell "ended" from "not yet
                           * begun" without remembering ids */
    int n_prompt;         /* prompt tokens, BOS first */
    int max_tokens;       /* tokens to generate at most (>= 1) */
    float temperature;
    float top_p;
    uint64_t seed;
    int stop_at_eos;      /* 1: BOS or EOS ends it; 0: neither (fixed-length output) */
    struct kvr_kv_policy_params policy;
    int prefill_rank;     /* who prefills (the decode rank itself when colocated) */
    int decode_rank;      /* who decodes */
    double t_coord_ms;    /* coordinator time the request was sent (for queue accounting) */
};

/* What a node is and what it can hold. A node that failed to set up says so with
 * setup_status != KVR_OK (and zero limits): the coordinator will not use it. */
struct kvr_hello {
    int role;
    int colocated;        /* decode node that also prefills its own prompts */
    uint32_t epoch;       /* 0 at start; the epoch of the RESET this HELLO answers */
    int setup_status;     /* KVR_OK, or why the node cannot serve */
    char host[64];
    int n_layers, kv_dim, block_tokens, seq_len, vocab_size;
    uint64_t fingerprint;
    uint64_t kv_bytes_total;
    int n_blocks_total;   /* KV blocks in the node's pool */
    int n_threads;
    int max_batch;        /* sequences per step (decode) or prompts per pass (prefill) */
    int max_batch_tokens; /* tokens per forward call: a recompute window (decode) or a
                           * prompt (prefill) must fit */
    int n_ctx_max;        /* most cached keys one query may attend */
    int kv_type;          /* enum kvr_kv_type of the node's pool: every rank must agree */
};

struct kvr_node_report {
    uint64_t kv_bytes_total, kv_bytes_used, kv_bytes_free;
    int n_blocks_total, n_blocks_free;
    int running;          /* sequences decoding / prompts being prefilled */
    int queued;           /* waiting at the node */
    uint64_t queued_prompt_tokens;
    uint64_t steps;       /* forward calls so far */
    uint64_t tokens_out;  /* tokens generated (decode) or prompt tokens done (prefill) */
};

/* Events in one TOKENS message at most: senders split longer lists, so a receiver parses
 * into a fixed array of this size and never drops a message. */
#define KVR_TOKENS_MAX_EVENTS 4096

/* One event for one request in a TOKENS message. */
struct kvr_tok_event {
    uint64_t req_id;
    int32_t token;        /* the new token, or -1 when this event only finishes */
    int32_t finish;       /* enum kvr_finish; NONE while running */
    int32_t status;       /* kvr_status of a finish (KVR_OK unless ERROR) */
    int32_t n_generated;  /* tokens generated so far, this one included */
    const char *reason;   /* finish only: why, reason_len bytes (not NUL-terminated), or
                           * NULL. Sending: borrowed; parsed: points into the message */
    int reason_len;
};

struct kvr_seq_ready {
    uint64_t begin_no;
    int32_t first_token;  /* sampled from the prompt's last logits */
    uint64_t rng;         /* sampler state after that draw */
    int32_t n_kv_msgs;    /* KV messages sent for this sequence (the decode node checks) */
    double prefill_ms;    /* time in the forward pass */
};

/* SEQ_ABORT (prefill -> decode) and the failure part of PREFILL_DONE. */
struct kvr_seq_abort {
    uint64_t begin_no;
    int32_t status;
    const char *reason;   /* as in kvr_tok_event */
    int reason_len;
};

struct kvr_prefill_done {
    int32_t status;       /* KVR_OK or why the prompt failed */
    int32_t n_prompt;
    double queue_ms;      /* waiting at the prefill node */
    double prefill_ms;
    const char *reason;   /* as in kvr_tok_event */
    int reason_len;
};

/* Links between a node that joins or leaves a running cluster and the others (issue 14,
 * docs/ARCHITECTURE.md "Elastic decode pool"). One body for LINK_PORT (peer: the joining
 * node, value: links it will accept), LINK (peer: the joining node, value: its role),
 * LINKED (peer: the joining node, value: kvr_status of the connect), UNLINK (peer: the
 * leaving node), LINK_HELLO (peer: the sender, value: its role) and BYE (peer: the
 * sender). port: an MPI port name (LINK_PORT, LINK), "" otherwise. */
#define KVR_PORT_MAX 1024 /* MPI_MAX_PORT_NAME of Open MPI */
struct kvr_link {
    int32_t peer;
    int32_t value;
    char port[KVR_PORT_MAX];
};

/* What a spawned node learns first: its id in the cluster and the peers it links to. */
#define KVR_JOIN_MAX_PEERS 4096
struct kvr_peer_info {
    int32_t id;
    int32_t role;
    char host[64];
};
struct kvr_join_info {
    int32_t self;         /* the node's peer id (its "rank" in every message) */
    int32_t coord;        /* the coordinator's peer id */
    int32_t n_peers;      /* peers listed below: the coordinator and the prefill nodes that
                           * will connect to this node, in the order they will */
    struct kvr_peer_info *peers; /* (n_peers) writing: borrowed; parsing: caller's array of
                                  * KVR_JOIN_MAX_PEERS */
};

/* A received message; body is borrowed from the receive buffer. */
struct kvr_msg {
    int src;
    int tag;
    int kind;             /* enum kvr_msg_kind */
    uint64_t req_id;
    const unsigned char *body;
    size_t body_len;
};

/* ---- writing ---------------------------------------------------------------------
 * Each writer appends header and body to w. With w->p == NULL it only counts (w->len is
 * then the message size), so a sender measures, takes a buffer, and writes. */

void kvr_msg_write_hello(struct kvr_wbuf *w, const struct kvr_hello *h);
void kvr_msg_write_status(struct kvr_wbuf *w, const struct kvr_node_report *r);
/* n events, 1 <= n <= KVR_TOKENS_MAX_EVENTS. */
void kvr_msg_write_tokens(struct kvr_wbuf *w, const struct kvr_tok_event *ev, int n);
void kvr_msg_write_prefill_done(struct kvr_wbuf *w, uint64_t req_id, const struct kvr_prefill_done *d);
/* kind: KVR_MSG_PREFILL_REQ or KVR_MSG_SEQ_BEGIN; prompt: (p->n_prompt) ids. */
void kvr_msg_write_req(struct kvr_wbuf *w, int kind, const struct kvr_req_params *p, const int *prompt);
/* kind: KVR_MSG_CANCEL, KVR_MSG_SHUTDOWN or KVR_MSG_PING (no body). */
void kvr_msg_write_empty(struct kvr_wbuf *w, int kind, uint64_t req_id);
void kvr_msg_write_reset(struct kvr_wbuf *w, uint32_t epoch);
/* wire: one kvr_wire_encode message. */
void kvr_msg_write_kv(struct kvr_wbuf *w, uint64_t req_id, uint64_t begin_no, const void *wire, size_t len);
void kvr_msg_write_seq_ready(struct kvr_wbuf *w, uint64_t req_id, const struct kvr_seq_ready *r);
void kvr_msg_write_seq_abort(struct kvr_wbuf *w, uint64_t req_id, const struct kvr_seq_abort *a);

/* kind: LINK_PORT, LINKED, BYE, DRAIN_ME, LINK, UNLINK or LINK_HELLO. */
void kvr_msg_write_link(struct kvr_wbuf *w, int kind, const struct kvr_link *l);
void kvr_msg_write_join_info(struct kvr_wbuf *w, const struct kvr_join_info *j);

/* ---- parsing ---------------------------------------------------------------------- */

/* The header of bytes (len of them): KVR_OK with m's kind, req_id, body and body_len
 * filled (src and tag are the caller's), or KVR_EFORMAT (short, bad magic, other version,
 * unknown kind). */
int kvr_msg_parse_header(const unsigned char *bytes, size_t len, struct kvr_msg *m);

/* prompt receives up to max_prompt ids; KVR_ERANGE if the message has more, or an id
 * outside [0, vocab). */
int kvr_msg_parse_req(const struct kvr_msg *m, struct kvr_req_params *p, int *prompt,
                      int max_prompt, int vocab);
int kvr_msg_parse_hello(const struct kvr_msg *m, struct kvr_hello *h);
int kvr_msg_parse_status(const struct kvr_msg *m, struct kvr_node_report *r);
int kvr_msg_parse_tokens(const struct kvr_msg *m, struct kvr_tok_event *ev, int max_ev, int *n);
int kvr_msg_parse_prefill_done(const struct kvr_msg *m, struct kvr_prefill_done *d);
int kvr_msg_parse_reset(const struct kvr_msg *m, uint32_t *epoch);
/* The KV message's begin_no and the kv_wire bytes inside it (borrowed). */
int kvr_msg_parse_kv(const struct kvr_msg *m, uint64_t *begin_no, const unsigned char **wire,
                     size_t *wire_len);
int kvr_msg_parse_seq_ready(const struct kvr_msg *m, struct kvr_seq_ready *r);
int kvr_msg_parse_seq_abort(const struct kvr_msg *m, struct kvr_seq_abort *a);
int kvr_msg_parse_link(const struct kvr_msg *m, struct kvr_link *l);
/* j->peers must hold KVR_JOIN_MAX_PEERS entries. */
int kvr_msg_parse_join_info(const struct kvr_msg *m, struct kvr_join_info *j);
/* CANCEL, SHUTDOWN, PING, LEAVE: the body must be empty. */
int kvr_msg_parse_empty(const struct kvr_msg *m);

#endif /* KVR_MSG_H */
