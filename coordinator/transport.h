/* transport.h - how the router talks to nodes, as an interface: the MPI job's
 * communicator in the product (transport_mpi.c), a fake in the router's unit tests
 * (tests/unit/fake_transport.c) that plays any number of nodes joining, reporting,
 * streaming and dying. Messages cross it as whole byte strings written and parsed by
 * common/msg.h, so a test exercises exactly the bytes the nodes exchange.
 *
 * Peers are small non-negative ids (MPI ranks today). A transport that connects new
 * peers at run time (issue 14: MPI_Comm_spawn or connect/accept) delivers their messages
 * through the same poll with ids it has not used before; the router learns a node from
 * its HELLO, never from a fixed list. */
#ifndef KVR_COORD_TRANSPORT_H
#define KVR_COORD_TRANSPORT_H

#include <stddef.h>

#include "msg.h"

struct coord_transport {
    void *ctx;
    /* One message from any node (tag KVR_TAG_REPORT): KVR_OK with *m filled (body
     * borrowed until the next poll), KVR_EAGAIN when none waits, or an error (logged; the
     * message is gone). */
    int (*poll)(void *ctx, struct kvr_msg *m);
    /* Posts one whole message (header included) to peer dst on tag; copies bytes.
     * KVR_OK, or a status and nothing was sent (KVR_EUNAVAIL: dst is marked dead). */
    int (*send)(void *ctx, int dst, int tag, const void *bytes, size_t len);
    /* Stop sending to peer (its sends in flight are given up) / start again. */
    void (*mark_dead)(void *ctx, int peer);
    void (*mark_alive)(void *ctx, int peer);
    /* Completes finished sends. */
    void (*progress)(void *ctx);
    /* Elastic pool (may be NULL: the pool is fixed). spawn starts one decode node, gives it
     * the next free peer id (*peer) and sends it JOIN_INFO listing peers (n_peers: the
     * prefill nodes that will link to it); it blocks for the launch (tens of ms). */
    int (*spawn)(void *ctx, const struct kvr_peer_info *peers, int n_peers, int *peer);
    /* Connects to a node started elsewhere that left its port (read from --join-dir),
     * gives it the next free peer id and sends it JOIN_INFO, as spawn does. */
    int (*adopt)(void *ctx, const char *port, const struct kvr_peer_info *peers, int n_peers, int *peer);
    /* Disconnects a spawned node that said BYE (blocks until it disconnects too). */
    int (*disconnect)(void *ctx, int peer);
};

struct kvr_xfer;

/* The product's transport over x (borrowed; used from the router's thread only). spawn_argv:
 * the decode node's command line (NULL-terminated, borrowed for the transport's life), or
 * NULL for a fixed pool (spawn then fails with KVR_ENOTSUP). */
struct coord_transport coord_transport_mpi(struct kvr_xfer *x, char **spawn_argv);

#endif /* KVR_COORD_TRANSPORT_H */
