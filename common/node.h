/* node.h - the one lifecycle of a prefill or decode node: HELLO, the message loop (the
 * coordinator's PING, SHUTDOWN and RESET handled here, everything else handed to the
 * role), a unit of the role's work per turn, STATUS reports, the coordinator-silence
 * check and the idle back-off. prefill_node/prefill.c and decode_node/decode.c supply
 * the role part through kvr_node_ops; a future role (or a node joining a running
 * cluster, issue 14) gets the same lifecycle by supplying its own.
 *
 * Liveness, both ways: the coordinator pings every node every second and declares a node
 * dead after --node-timeout without a report; a node leaves after --coord-timeout
 * without a word from the coordinator (kvr_node_run returns KVR_EUNAVAIL and main leaves
 * without MPI_Finalize, which would wait for the dead coordinator). A RESET from the
 * coordinator (it declared this node dead, then heard from it again) drops every
 * request and answers with a fresh HELLO carrying the RESET's epoch. */
#ifndef KVR_NODE_H
#define KVR_NODE_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "msg.h"

struct kvr_xfer;
struct kvr_kv_pool;
struct kvr_model;

/* What a role supplies. Every callback runs on the node's MPI thread. */
struct kvr_node_ops {
    /* A message on one of the role's tags (not PING, SHUTDOWN or RESET). */
    void (*on_msg)(void *ud, const struct kvr_msg *m);
    /* One unit of work (a decode step, a prefill pass); returns 1 if it did anything. */
    int (*work)(void *ud);
    /* After work: send what is pending (token events). May be NULL. */
    void (*flush)(void *ud);
    /* The role's part of a STATUS report (running, queued, steps, tokens_out). */
    void (*queues)(void *ud, struct kvr_node_report *r);
    /* RESET: forget every request without answering (the coordinator ended them). */
    void (*reset)(void *ud);
};

struct kvr_node_params {
    struct kvr_xfer *xfer;          /* borrowed */
    const int *tags;                /* (n_tags) tags the role receives, polled in this order */
    int n_tags;
    int report_ms;                  /* STATUS period */
    double coord_timeout_s;         /* leave after this long without the coordinator */
    volatile sig_atomic_t *stop;    /* set by a signal handler: leave the loop */
    const struct kvr_kv_pool *pool; /* borrowed, for the reports */
    struct kvr_hello hello;         /* what HELLO says (epoch set by the node) */
    const struct kvr_node_ops *ops;
    void *ud;                       /* passed to every op */
};

struct node_outmsg;

/* Caller-owned; fields are the node's (read-only for roles). */
struct kvr_node {
    struct kvr_node_params p;
    int coord;                      /* the coordinator's rank */
    int shutdown;                   /* SHUTDOWN received */
    int leave;                      /* LEAVE received (a spawned node that drained) */
    int left;                       /* it left: every link disconnected, exit 0 */
    double t_stop;                  /* a joined node told to stop asked to be drained then */
    uint32_t epoch;                 /* of the last RESET (0: none) */
    double last_coord;              /* kvr_clock_now() of the coordinator's last message */
    double last_report;
    int report_due;                 /* send a STATUS after this turn's flush */
    int hello_due;                  /* HELLO not sent yet (it is retried every turn) */
    struct node_outmsg *out_head, *out_tail; /* sends waiting for a retry, in order */
    size_t out_nbytes;
};

/* Fills h with the node's shape and pool (limits the role adds: colocated, max_batch,
 * max_batch_tokens, n_ctx_max, n_threads). model or pool NULL, or setup_status not OK:
 * a HELLO that says "this node cannot serve" (setup_status KVR_EINVAL if it was OK). */
void kvr_node_hello_init(struct kvr_hello *h, enum kvr_role role, const struct kvr_model *model,
                         const struct kvr_kv_pool *pool, int setup_status);

void kvr_node_init(struct kvr_node *n, const struct kvr_node_params *p);

/* Sends HELLO and runs the loop. Returns KVR_OK after SHUTDOWN or *stop (the role then
 * answers what it still holds and main finalizes MPI), or after LEAVE with n->left set (a
 * spawned node that drained: every link is disconnected, main finalizes and exits 0),
 * KVR_EUNAVAIL when the coordinator was silent for coord_timeout_s (main leaves without
 * MPI_Finalize). A spawned node first links to the prefill nodes (join): KVR_EINVAL if the
 * coordinator refused it. */
int kvr_node_run(struct kvr_node *n);

/* Tries for up to flush_s to send what is still queued, then frees it. */
void kvr_node_deinit(struct kvr_node *n, double flush_s);

/* Report the pool right after this turn's flush (a sequence ended). */
void kvr_node_report_soon(struct kvr_node *n);

/* For long work (a prefill pass): sends a STATUS if one is due, so the node does not
 * look dead while it computes. */
void kvr_node_tick(struct kvr_node *n);

/* Sends the message fn writes (header included) to dst on tag. If it cannot go now (no
 * memory for a send buffer, an MPI error) it is copied and queued, and sent in order
 * before anything later to the same (dst, tag). KVR_OK (sent or queued), KVR_EUNAVAIL or
 * KVR_EINVAL (dst cannot be reached: nothing queued), KVR_ENOMEM (not even a copy). */
int kvr_node_send(struct kvr_node *n, int dst, int tag, void (*fn)(struct kvr_wbuf *w, const void *arg),
                  const void *arg);

#endif /* KVR_NODE_H */
