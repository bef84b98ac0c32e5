/* transport_mpi.c - the router's transport over the MPI job (see transport.h): a thin
 * adapter to common/xfer.c, which owns the communicator and the send buffers. */
#include "transport.h"

#include "mpi_tags.h"
#include "xfer.h"

static int mpi_poll(void *ctx, struct kvr_msg *m) {
    static const int tags[] = {KVR_TAG_REPORT};
    return kvr_xfer_poll(ctx, tags, 1, m);
}

static int mpi_send(void *ctx, int dst, int tag, const void *bytes, size_t len) {
    return kvr_xfer_send_bytes(ctx, dst, tag, bytes, len);
}

static void mpi_mark_dead(void *ctx, int peer) { kvr_xfer_mark_dead(ctx, peer); }

static void mpi_mark_alive(void *ctx, int peer) { kvr_xfer_mark_alive(ctx, peer); }

static void mpi_progress(void *ctx) { kvr_xfer_progress(ctx); }

struct coord_transport coord_transport_mpi(struct kvr_xfer *x) {
    return (struct coord_transport){.ctx = x,
                                    .poll = mpi_poll,
                                    .send = mpi_send,
                                    .mark_dead = mpi_mark_dead,
                                    .mark_alive = mpi_mark_alive,
                                    .progress = mpi_progress};
}
