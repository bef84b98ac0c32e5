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
};

struct kvr_xfer;

/* The product's transport over x (borrowed; used from the router's thread only). */
struct coord_transport coord_transport_mpi(struct kvr_xfer *x);

#endif /* KVR_COORD_TRANSPORT_H */
