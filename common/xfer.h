/* xfer.h - kvrelay's MPI transport: the only code that calls MPI.
 *
 * One kvr_xfer per process, used from one thread (MPI_THREAD_FUNNELED). It duplicates
 * MPI_COMM_WORLD (no traffic on WORLD itself), sets MPI_ERRORS_RETURN, learns every
 * rank's role and host with one Allgather, sends with MPI_Isend from reusable buffers
 * (never touched before completion), and receives with MPI_Improbe + MPI_Mrecv so
 * message sizes need not be known in advance. Every message is a 16-byte header (see
 * mpi_tags.h) and a body written field by field (bytes.h); typed senders and parsers
 * below are the only way in and out, and parsers validate every field. */
#ifndef KVR_XFER_H
#define KVR_XFER_H

#include <stddef.h>
#include <stdint.h>

#include "kv_cache.h"
#include "mpi_tags.h"

/* Values travel in the layout exchange: append only. */
enum kvr_role {
    KVR_ROLE_COORD = 0,
    KVR_ROLE_PREFILL = 1,
    KVR_ROLE_DECODE = 2,
};

const char *kvr_role_name(int role);

/* A request as nodes see it. */
struct kvr_req_params {
    uint64_t req_id;
    int n_prompt;         /* prompt tokens, BOS first */
    int max_tokens;       /* tokens to generate at most */
    float temperature;
    float top_p;
    uint64_t seed;
    int stop_at_eos;      /* 1: BOS or EOS ends it; 0: neither (fixed-length output) */
    struct kvr_kv_policy_params policy;
    int prefill_rank;     /* who prefills (the decode rank itself when colocated) */
    int decode_rank;      /* who decodes */
    double t_coord_ms;    /* coordinator time the request was sent (for queue accounting) */
};

struct kvr_hello {
    int role;
    int colocated;        /* decode node that also prefills its own prompts */
    char host[64];
    int n_layers, kv_dim, block_tokens, seq_len, vocab_size;
    uint64_t fingerprint;
    uint64_t kv_bytes_total;
    int n_blocks_total;
    int n_threads;
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

/* Events in one TOKENS message at most: kvr_xfer_send_tokens splits longer lists, so a
 * receiver parses into a fixed array of this size and never drops a message. */
#define KVR_TOKENS_MAX_EVENTS 4096

/* One event for one request in a TOKENS message. */
struct kvr_tok_event {
    uint64_t req_id;
    int32_t token;        /* the new token, or -1 when this event only finishes */
    int32_t finish;       /* enum kvr_finish; NONE while running */
    int32_t status;       /* kvr_status of a finish (KVR_OK unless ERROR) */
    int32_t n_generated;  /* tokens generated so far, this one included */
};

struct kvr_seq_ready {
    int32_t first_token;  /* sampled from the prompt's last logits */
    uint64_t rng;         /* sampler state after that draw */
    int32_t n_kv_msgs;    /* KV messages sent for this sequence (the decode node checks) */
    double prefill_ms;    /* time in the forward pass */
};

struct kvr_prefill_done {
    int32_t status;       /* KVR_OK or why the prompt failed */
    int32_t n_prompt;
    double queue_ms;      /* waiting at the prefill node */
    double prefill_ms;
};

/* A received message; body is borrowed until the next kvr_xfer_poll. */
struct kvr_msg {
    int src;
    int tag;
    int kind;             /* enum kvr_msg_kind */
    uint64_t req_id;
    const unsigned char *body;
    size_t body_len;
};

struct kvr_xfer;

/* MPI_Init_thread(FUNNELED) (checks `provided`), dup of WORLD, ERRORS_RETURN, layout
 * exchange. All ranks must call it. KVR_EMPI (logged with MPI_Error_string),
 * KVR_EINVAL (not exactly one coordinator). Returns owned *out. */
int kvr_xfer_init(int *argc, char ***argv, enum kvr_role role, struct kvr_xfer **out);

/* Waits up to flush_s for sends in flight, frees the communicator, MPI_Finalize.
 * Accepts NULL. */
void kvr_xfer_finalize(struct kvr_xfer *x, double flush_s);

/* Aborts the whole MPI job (unrecoverable startup error). */
_Noreturn void kvr_xfer_abort(struct kvr_xfer *x, int code);

int kvr_xfer_rank(const struct kvr_xfer *x);
int kvr_xfer_size(const struct kvr_xfer *x);
int kvr_xfer_role_of(const struct kvr_xfer *x, int rank);
const char *kvr_xfer_host_of(const struct kvr_xfer *x, int rank);
int kvr_xfer_coord_rank(const struct kvr_xfer *x);

/* Receives one message on any of tags from any source. KVR_OK with *m filled, KVR_EAGAIN
 * when nothing is waiting, KVR_EMPI, KVR_EFORMAT (a message with a bad header: it is
 * consumed, logged and reported so the caller can count it). */
int kvr_xfer_poll(struct kvr_xfer *x, const int *tags, int n_tags, struct kvr_msg *m);

/* Completes finished sends (frees their buffers for reuse). Returns sends in flight. */
int kvr_xfer_progress(struct kvr_xfer *x);

/* Marks rank dead: later sends to it are dropped (KVR_EUNAVAIL) and its sends in flight
 * are cancelled, so a failed peer cannot wedge this process. */
void kvr_xfer_mark_dead(struct kvr_xfer *x, int rank);

/* Typed senders: each returns KVR_OK once the send is posted (non-blocking), KVR_EMPI,
 * KVR_ENOMEM, KVR_EUNAVAIL (rank marked dead). */
int kvr_xfer_send_hello(struct kvr_xfer *x, int dst, const struct kvr_hello *h);
int kvr_xfer_send_status(struct kvr_xfer *x, int dst, const struct kvr_node_report *r);
/* Any n >= 1: sent as ceil(n / KVR_TOKENS_MAX_EVENTS) TOKENS messages, in order. */
int kvr_xfer_send_tokens(struct kvr_xfer *x, int dst, const struct kvr_tok_event *ev, int n);
int kvr_xfer_send_prefill_done(struct kvr_xfer *x, int dst, uint64_t req_id,
                               const struct kvr_prefill_done *d);
int kvr_xfer_send_prefill_req(struct kvr_xfer *x, int dst, const struct kvr_req_params *p,
                              const int *prompt);
int kvr_xfer_send_cancel(struct kvr_xfer *x, int dst, uint64_t req_id);
int kvr_xfer_send_shutdown(struct kvr_xfer *x, int dst);
int kvr_xfer_send_ping(struct kvr_xfer *x, int dst);
int kvr_xfer_send_seq_begin(struct kvr_xfer *x, int dst, const struct kvr_req_params *p,
                            const int *prompt);
/* wire: one kvr_wire_encode message (copied). */
int kvr_xfer_send_kv(struct kvr_xfer *x, int dst, uint64_t req_id, const void *wire, size_t len);
int kvr_xfer_send_seq_ready(struct kvr_xfer *x, int dst, uint64_t req_id,
                            const struct kvr_seq_ready *r);
int kvr_xfer_send_seq_abort(struct kvr_xfer *x, int dst, uint64_t req_id, int status);

/* Typed parsers: validate lengths, enums and ranges; KVR_EFORMAT on anything off.
 * prompt receives up to max_prompt ids; KVR_ERANGE if the message has more, or an id
 * outside [0, vocab). */
int kvr_msg_parse_req(const struct kvr_msg *m, struct kvr_req_params *p, int *prompt,
                      int max_prompt, int vocab);
int kvr_msg_parse_hello(const struct kvr_msg *m, struct kvr_hello *h);
int kvr_msg_parse_status(const struct kvr_msg *m, struct kvr_node_report *r);
int kvr_msg_parse_tokens(const struct kvr_msg *m, struct kvr_tok_event *ev, int max_ev, int *n);
int kvr_msg_parse_prefill_done(const struct kvr_msg *m, struct kvr_prefill_done *d);
int kvr_msg_parse_seq_ready(const struct kvr_msg *m, struct kvr_seq_ready *r);
int kvr_msg_parse_seq_abort(const struct kvr_msg *m, int *status);

const char *kvr_msg_kind_name(int kind);

#endif /* KVR_XFER_H */
