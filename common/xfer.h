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

#include "msg.h"

struct kvr_xfer;

/* MPI_Init_thread(FUNNELED) (checks `provided`), dup of WORLD, ERRORS_RETURN, layout
 * exchange. All ranks must call it. KVR_EMPI (logged with MPI_Error_string),
 * KVR_EINVAL (not exactly one coordinator). Returns owned *out. */
int kvr_xfer_init(int *argc, char ***argv, enum kvr_role role, struct kvr_xfer **out);

/* Waits up to flush_s for sends in flight, frees the communicator, MPI_Finalize. If
 * MPI_Finalize does not return within KVR_XFER_FINALIZE_GRACE_S (a peer died and Open MPI
 * waits for it), the process exits with exit_code without it. Accepts NULL. */
void kvr_xfer_finalize(struct kvr_xfer *x, double flush_s, int exit_code);
#define KVR_XFER_FINALIZE_GRACE_S 5

/* Ends the process without MPI_Finalize, with exit_code: for a node whose coordinator is
 * gone (MPI_Finalize would wait for it forever). mpirun --enable-recovery tolerates a
 * rank that leaves this way. Frees what it can first. */
_Noreturn void kvr_xfer_leave(struct kvr_xfer *x, int exit_code);

/* Aborts the whole MPI job (unrecoverable startup error). */
_Noreturn void kvr_xfer_abort(struct kvr_xfer *x, int code);

int kvr_xfer_rank(const struct kvr_xfer *x);
int kvr_xfer_size(const struct kvr_xfer *x);
int kvr_xfer_role_of(const struct kvr_xfer *x, int rank);
const char *kvr_xfer_host_of(const struct kvr_xfer *x, int rank);
int kvr_xfer_coord_rank(const struct kvr_xfer *x);

/* Receives one message on any of tags from any source. KVR_OK with *m filled (body
 * borrowed until the next poll), KVR_EAGAIN when nothing is waiting, KVR_EMPI,
 * KVR_ENOMEM, KVR_EFORMAT (a message with a bad header: it is consumed, logged and
 * reported so the caller can count it). */
int kvr_xfer_poll(struct kvr_xfer *x, const int *tags, int n_tags, struct kvr_msg *m);

/* Completes finished sends (frees their buffers for reuse). Returns sends in flight. */
int kvr_xfer_progress(struct kvr_xfer *x);

/* Marks rank dead: later sends to it are dropped (KVR_EUNAVAIL) and its sends in flight
 * are given up to MPI, so a failed peer cannot wedge this process. mark_alive undoes it
 * (a node that proved it is back). */
void kvr_xfer_mark_dead(struct kvr_xfer *x, int rank);
void kvr_xfer_mark_alive(struct kvr_xfer *x, int rank);

/* ---- a cluster that grows and shrinks (issue 14; docs/ARCHITECTURE.md) ----------------
 * Peer ids past the job's MPI_COMM_WORLD are nodes that joined later, each reached over
 * its own intercommunicator. A process started by MPI_Comm_spawn learns its id and its
 * peers from the coordinator's JOIN_INFO inside kvr_xfer_init (kvr_xfer_joined then
 * returns 1). All of these block the calling thread (MPI has no nonblocking form). */

/* 1 when this process was spawned into a running cluster. */
int kvr_xfer_joined(const struct kvr_xfer *x);

/* 1 when rank is reached over its own link (a joined peer, or one that joined us). */
int kvr_xfer_linked(const struct kvr_xfer *x, int rank);

/* Coordinator: spawns one process (cmd with args, NULL-terminated; host: "" or NULL for
 * anywhere the launcher has a slot) over MPI_COMM_SELF and gives it the next free peer id
 * (*out_id). The caller then sends it JOIN_INFO on CTRL. KVR_EMPI (logged), KVR_ENOMEM. */
int kvr_xfer_spawn(struct kvr_xfer *x, const char *cmd, char **args, const char *host, int *out_id);

/* A node started as its own job (not spawned) joins through a directory: call before
 * kvr_xfer_init (decode main does, for --join-dir). kvr_xfer_init then opens a port,
 * writes its name to dir/<host>-<pid>.port and waits for the coordinator to connect. */
void kvr_xfer_set_join_dir(const char *dir);

/* Coordinator: connects to such a node's port (read from its file) and gives it the next
 * free peer id (*out_id). The caller then sends it JOIN_INFO. Blocks until it accepts. */
int kvr_xfer_adopt(struct kvr_xfer *x, const char *port, int *out_id);

/* Joining node: opens a port (port: KVR_PORT_MAX bytes) / closes it. */
int kvr_xfer_open_port(struct kvr_xfer *x, char *port);
void kvr_xfer_close_port(struct kvr_xfer *x, const char *port);

/* Joining node: accepts one connection on port and links the peer that says who it is
 * (LINK_HELLO) under its id (*peer_id). Blocks until someone connects. */
int kvr_xfer_accept(struct kvr_xfer *x, const char *port, int *peer_id);

/* Any node: connects to a joining node's port and links it as peer_id with role. Blocks
 * until that node accepts. */
int kvr_xfer_connect(struct kvr_xfer *x, const char *port, int peer_id, int role);

/* Disconnects the link to peer_id (which must be a joined link): waits for this side's
 * sends to it, then MPI_Comm_disconnect, which returns once the peer disconnects too.
 * Later sends to it are KVR_EINVAL. */
int kvr_xfer_disconnect(struct kvr_xfer *x, int peer_id);

/* Senders: each returns KVR_OK once the send is posted (non-blocking), KVR_EMPI,
 * KVR_ENOMEM, KVR_EUNAVAIL (rank marked dead), KVR_EINVAL (bad rank or arguments). A
 * failed send sent nothing: the caller still owns the outcome. */

/* bytes: one whole message (header included, e.g. from msg.h's writers), copied. */
int kvr_xfer_send_bytes(struct kvr_xfer *x, int dst, int tag, const void *bytes, size_t len);
int kvr_xfer_send_hello(struct kvr_xfer *x, int dst, const struct kvr_hello *h);
int kvr_xfer_send_status(struct kvr_xfer *x, int dst, const struct kvr_node_report *r);
/* Any n >= 1: sent as ceil(n / KVR_TOKENS_MAX_EVENTS) TOKENS messages, in order. On
 * failure *n_sent (may be NULL) says how many events went out. */
int kvr_xfer_send_tokens(struct kvr_xfer *x, int dst, const struct kvr_tok_event *ev, int n, int *n_sent);
int kvr_xfer_send_prefill_done(struct kvr_xfer *x, int dst, uint64_t req_id,
                               const struct kvr_prefill_done *d);
/* kind: KVR_MSG_PREFILL_REQ or KVR_MSG_SEQ_BEGIN (both on CTRL). */
int kvr_xfer_send_req(struct kvr_xfer *x, int dst, int kind, const struct kvr_req_params *p,
                      const int *prompt);
int kvr_xfer_send_cancel(struct kvr_xfer *x, int dst, uint64_t req_id);
int kvr_xfer_send_shutdown(struct kvr_xfer *x, int dst);
int kvr_xfer_send_ping(struct kvr_xfer *x, int dst);
int kvr_xfer_send_reset(struct kvr_xfer *x, int dst, uint32_t epoch);
/* wire: one kvr_wire_encode message (copied). */
int kvr_xfer_send_kv(struct kvr_xfer *x, int dst, uint64_t req_id, uint64_t begin_no, const void *wire,
                     size_t len);
int kvr_xfer_send_seq_ready(struct kvr_xfer *x, int dst, uint64_t req_id, const struct kvr_seq_ready *r);
int kvr_xfer_send_seq_abort(struct kvr_xfer *x, int dst, uint64_t req_id, const struct kvr_seq_abort *a);

#endif /* KVR_XFER_H */
