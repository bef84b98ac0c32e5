/* transport_mpi.c - the router's transport over the MPI job (see transport.h): a thin
 * adapter to common/xfer.c, which owns the communicator and the send buffers. */
#include "transport.h"

#include <stdlib.h>

#include "log.h"
#include "mpi_tags.h"
#include "status.h"
#include "xfer.h"

struct mpi_tp {
    struct kvr_xfer *x;
    char **spawn_argv;
};
static struct mpi_tp the_tp; /* one coordinator, one transport */

static int mpi_poll(void *ctx, struct kvr_msg *m) {
    static const int tags[] = {KVR_TAG_REPORT};
    return kvr_xfer_poll(((struct mpi_tp *)ctx)->x, tags, 1, m);
}

static int mpi_send(void *ctx, int dst, int tag, const void *bytes, size_t len) {
    return kvr_xfer_send_bytes(((struct mpi_tp *)ctx)->x, dst, tag, bytes, len);
}

static void mpi_mark_dead(void *ctx, int peer) { kvr_xfer_mark_dead(((struct mpi_tp *)ctx)->x, peer); }

static void mpi_mark_alive(void *ctx, int peer) { kvr_xfer_mark_alive(((struct mpi_tp *)ctx)->x, peer); }

static void mpi_progress(void *ctx) { kvr_xfer_progress(((struct mpi_tp *)ctx)->x); }

static int send_join_info(struct mpi_tp *t, const struct kvr_peer_info *peers, int n_peers, int *peer);

static int mpi_spawn(void *ctx, const struct kvr_peer_info *peers, int n_peers, int *peer) {
    struct mpi_tp *t = ctx;
    if (!t->spawn_argv || !t->spawn_argv[0])
        return KVR_ENOTSUP;
    int rc = kvr_xfer_spawn(t->x, t->spawn_argv[0], t->spawn_argv + 1, NULL, peer);
    if (rc != KVR_OK)
        return rc;
    return send_join_info(t, peers, n_peers, peer);
}

static int mpi_adopt(void *ctx, const char *port, const struct kvr_peer_info *peers, int n_peers, int *peer) {
    struct mpi_tp *t = ctx;
    int rc = kvr_xfer_adopt(t->x, port, peer);
    if (rc != KVR_OK)
        return rc;
    return send_join_info(t, peers, n_peers, peer);
}

/* JOIN_INFO to a new node: its id, the coordinator's, the prefill nodes that link to it. */
static int send_join_info(struct mpi_tp *t, const struct kvr_peer_info *peers, int n_peers, int *peer) {
    int rc;
    struct kvr_join_info j = {.self = *peer, .coord = kvr_xfer_rank(t->x), .n_peers = n_peers + 1};
    j.peers = calloc((size_t)n_peers + 1, sizeof *j.peers);
    if (!j.peers)
        return KVR_ENOMEM;
    j.peers[0] = (struct kvr_peer_info){.id = kvr_xfer_rank(t->x), .role = KVR_ROLE_COORD};
    for (int i = 0; i < n_peers; i++)
        j.peers[i + 1] = peers[i];
    struct kvr_wbuf w = {0};
    kvr_msg_write_join_info(&w, &j);
    unsigned char *b = malloc(w.len);
    if (!b) {
        free(j.peers);
        return KVR_ENOMEM;
    }
    w = (struct kvr_wbuf){.p = b, .cap = w.len};
    kvr_msg_write_join_info(&w, &j);
    rc = kvr_xfer_send_bytes(t->x, *peer, KVR_TAG_CTRL, b, w.len);
    free(b);
    free(j.peers);
    return rc;
}

static int mpi_disconnect(void *ctx, int peer) { return kvr_xfer_disconnect(((struct mpi_tp *)ctx)->x, peer); }

struct coord_transport coord_transport_mpi(struct kvr_xfer *x, char **spawn_argv) {
    the_tp = (struct mpi_tp){.x = x, .spawn_argv = spawn_argv};
    return (struct coord_transport){.ctx = &the_tp,
                                    .spawn = mpi_spawn,
                                    .adopt = mpi_adopt,
                                    .disconnect = mpi_disconnect,
                                    .poll = mpi_poll,
                                    .send = mpi_send,
                                    .mark_dead = mpi_mark_dead,
                                    .mark_alive = mpi_mark_alive,
                                    .progress = mpi_progress};
}
