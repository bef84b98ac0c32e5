/* xfer.c - the MPI transport (see xfer.h). Owns the duplicated communicator, the send
 * buffers in flight and the receive buffer. Every role's main loop calls it from its
 * MPI thread only. */
#include "xfer.h"

#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bytes.h"
#include "clock.h"
#include "log.h"
#include "status.h"

struct send_slot {
    MPI_Request req;
    unsigned char *buf;
    size_t cap;
    int busy;
    int dst;
};

/* Peers are ids: the ranks of the job's MPI_COMM_WORLD (0..world-1), then the nodes that
 * joined later (ids the coordinator hands out, never reused). Each id is reached through
 * a communicator and a rank in it: the WORLD duplicate for the job's own ranks, one
 * intercommunicator per link for joined nodes (MPI_Comm_spawn's, or connect/accept's). */
struct peer {
    MPI_Comm comm;          /* MPI_COMM_NULL: no link (unknown id, or gone) */
    int rank;               /* in comm (the remote group's for an intercommunicator) */
    int role;               /* enum kvr_role, -1 unknown */
    char host[64];
    unsigned char dead;     /* 1 once marked dead */
    unsigned char own;      /* comm is this peer's own intercommunicator */
};

struct kvr_xfer {
    MPI_Comm comm;          /* dup of WORLD */
    int world_size;
    int joined;             /* this process was spawned into a running cluster */
    int rank, size, coord_rank; /* rank: this process's peer id; size: peer ids in use */
    struct peer *peers;     /* (cap_peers) */
    int cap_peers;
    MPI_Comm *polls;        /* (n_polls) communicators polled: WORLD's dup, then links */
    int n_polls;
    struct send_slot *slots;
    int n_slots;
    unsigned char *rbuf;    /* receive buffer, grown to the largest message seen */
    size_t rcap;
};

static int mpi_fail(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    KVR_LOG_ERROR("%s failed: %.*s", what, len, msg);
    return KVR_EMPI;
}

/* Makes ids [0, n) addressable (new ones unknown, unlinked). */
static int peers_grow(struct kvr_xfer *x, int n) {
    if (n > x->cap_peers) {
        int cap = x->cap_peers ? x->cap_peers : 16;
        while (cap < n)
            cap *= 2;
        struct peer *p = realloc(x->peers, (size_t)cap * sizeof *p);
        if (!p)
            return KVR_ENOMEM;
        for (int i = x->cap_peers; i < cap; i++)
            p[i] = (struct peer){.comm = MPI_COMM_NULL, .role = -1};
        x->peers = p;
        x->cap_peers = cap;
    }
    if (n > x->size)
        x->size = n;
    return KVR_OK;
}

static int polls_add(struct kvr_xfer *x, MPI_Comm c) {
    MPI_Comm *p = realloc(x->polls, (size_t)(x->n_polls + 1) * sizeof *p);
    if (!p)
        return KVR_ENOMEM;
    x->polls = p;
    x->polls[x->n_polls++] = c;
    return KVR_OK;
}

static void polls_del(struct kvr_xfer *x, MPI_Comm c) {
    for (int i = 0; i < x->n_polls; i++)
        if (x->polls[i] == c) {
            x->polls[i] = x->polls[--x->n_polls];
            return;
        }
}

/* Peer id `id` is reached over its own intercommunicator ic (remote rank 0). */
static int link_peer(struct kvr_xfer *x, int id, MPI_Comm ic, int role, const char *host) {
    int rc = peers_grow(x, id + 1);
    if (rc == KVR_OK)
        rc = polls_add(x, ic);
    if (rc != KVR_OK)
        return rc;
    MPI_Comm_set_errhandler(ic, MPI_ERRORS_RETURN);
    struct peer *p = &x->peers[id];
    *p = (struct peer){.comm = ic, .rank = 0, .role = role, .own = 1};
    snprintf(p->host, sizeof p->host, "%s", host ? host : "?");
    return KVR_OK;
}

/* The peer id of a message's source on comm c. */
static int peer_of(const struct kvr_xfer *x, MPI_Comm c, int src) {
    if (c == x->comm)
        return src;
    for (int i = 0; i < x->size; i++)
        if (x->peers[i].own && x->peers[i].comm == c)
            return i;
    return -1;
}

static const char *join_dir; /* kvr_xfer_set_join_dir */

void kvr_xfer_set_join_dir(const char *dir) { join_dir = dir && dir[0] ? dir : NULL; }

/* ---- setup ---------------------------------------------------------------------- */

#define LAYOUT_NBYTES (4 + 64)
#define JOIN_INFO_WAIT_S 60.0

/* A spawned process: the coordinator's first message on the parent intercommunicator
 * says who this node is and who its peers are. */
static int join_init(struct kvr_xfer *x, MPI_Comm parent, enum kvr_role role) {
    x->joined = 1;
    x->world_size = 0;
    struct kvr_join_info j = {.peers = calloc(KVR_JOIN_MAX_PEERS, sizeof *j.peers)};
    if (!j.peers)
        return KVR_ENOMEM;
    MPI_Comm_set_errhandler(parent, MPI_ERRORS_RETURN);
    double t_end = kvr_clock_now() + JOIN_INFO_WAIT_S;
    int rc = KVR_ETIMEDOUT;
    while (kvr_clock_now() < t_end) {
        int flag = 0;
        MPI_Message msg;
        MPI_Status st;
        if (MPI_Improbe(0, KVR_TAG_CTRL, parent, &flag, &msg, &st) != MPI_SUCCESS) {
            rc = KVR_EMPI;
            break;
        }
        if (!flag) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        int count = 0;
        MPI_Get_count(&st, MPI_BYTE, &count);
        unsigned char *b = malloc(count > 0 ? (size_t)count : 1);
        if (!b) {
            rc = KVR_ENOMEM;
            break;
        }
        MPI_Mrecv(b, count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
        struct kvr_msg m = {.src = 0, .tag = KVR_TAG_CTRL};
        rc = kvr_msg_parse_header(b, (size_t)count, &m);
        if (rc == KVR_OK && m.kind != KVR_MSG_JOIN_INFO)
            rc = KVR_EFORMAT;
        if (rc == KVR_OK)
            rc = kvr_msg_parse_join_info(&m, &j);
        free(b);
        break;
    }
    if (rc != KVR_OK) {
        KVR_LOG_ERROR("spawned into a cluster but got no valid JOIN_INFO: %s", kvr_status_str(rc));
        free(j.peers);
        return rc;
    }
    x->rank = j.self;
    x->coord_rank = j.coord;
    int max_id = j.self;
    for (int i = 0; i < j.n_peers; i++)
        max_id = j.peers[i].id > max_id ? j.peers[i].id : max_id;
    if ((rc = peers_grow(x, max_id + 1)) == KVR_OK)
        rc = link_peer(x, j.coord, parent, KVR_ROLE_COORD, NULL);
    for (int i = 0; rc == KVR_OK && i < j.n_peers; i++) {
        struct peer *p = &x->peers[j.peers[i].id];
        p->role = j.peers[i].role;
        snprintf(p->host, sizeof p->host, "%s", j.peers[i].host);
    }
    x->peers[x->rank].role = role;
    gethostname(x->peers[x->rank].host, 63);
    free(j.peers);
    return rc;
}

static int join_init(struct kvr_xfer *x, MPI_Comm parent, enum kvr_role role);

/* The first message on a new intercommunicator: the side that connected says who it is
 * (LINK_HELLO). KVR_EMPI when the receive fails, KVR_EFORMAT/KVR_EINVAL when it is not a
 * well-formed LINK_HELLO. */
static int recv_link_hello(MPI_Comm ic, struct kvr_link *l) {
    unsigned char b[64 + KVR_PORT_MAX];
    MPI_Status st;
    int count = 0;
    int rc = MPI_Recv(b, (int)sizeof b, MPI_BYTE, 0, KVR_TAG_CTRL, ic, &st);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Recv(LINK_HELLO)");
    MPI_Get_count(&st, MPI_BYTE, &count);
    struct kvr_msg m = {.src = -1, .tag = KVR_TAG_CTRL};
    rc = kvr_msg_parse_header(b, (size_t)count, &m);
    if (rc == KVR_OK && m.kind != KVR_MSG_LINK_HELLO)
        rc = KVR_EFORMAT;
    if (rc == KVR_OK)
        rc = kvr_msg_parse_link(&m, l);
    return rc;
}

/* A node started as its own job (another mpirun, an sbatch): it opens a port, leaves the
 * port's name in join_dir for the coordinator to find, and accepts the coordinator's
 * connection (reverse join: the running coordinator never waits in an accept). Needs an
 * ompi-server both jobs know (mpirun --ompi-server file:URI). */
static int join_by_port(struct kvr_xfer *x, enum kvr_role role) {
    int n = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    if (n != 1) {
        KVR_LOG_ERROR("--join-dir: start one process per joining node (this job has %d)", n);
        return KVR_EINVAL;
    }
    char port[MPI_MAX_PORT_NAME], path[4096], tmp[4200], host[64] = {0};
    int rc = MPI_Open_port(MPI_INFO_NULL, port);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Open_port");
    gethostname(host, sizeof host - 1);
    snprintf(path, sizeof path, "%s/%s-%d.port", join_dir, host, (int)getpid());
    snprintf(tmp, sizeof tmp, "%s/.%s-%d.tmp", join_dir, host, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f || fputs(port, f) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
        KVR_LOG_ERROR("--join-dir: cannot write %s", path);
        MPI_Close_port(port);
        return KVR_EIO;
    }
    KVR_LOG_INFO("waiting for the coordinator to connect (port in %s)", path);
    MPI_Comm ic = MPI_COMM_NULL;
    rc = MPI_Comm_accept(port, MPI_INFO_NULL, 0, MPI_COMM_SELF, &ic);
    MPI_Close_port(port);
    unlink(path);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Comm_accept");
    MPI_Comm_set_errhandler(ic, MPI_ERRORS_RETURN);
    /* The coordinator says who it is (LINK_HELLO), then JOIN_INFO as for a spawned node. */
    struct kvr_link l;
    rc = recv_link_hello(ic, &l);
    if (rc == KVR_OK && l.value != KVR_ROLE_COORD)
        rc = KVR_EINVAL;
    if (rc != KVR_OK) {
        KVR_LOG_ERROR("--join-dir: the peer that connected is not a coordinator: %s", kvr_status_str(rc));
        return rc;
    }
    return join_init(x, ic, role);
}

int kvr_xfer_init(int *argc, char ***argv, enum kvr_role role, struct kvr_xfer **out) {
    *out = NULL;
    int provided = 0;
    int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Init_thread");
    if (provided < MPI_THREAD_FUNNELED) {
        KVR_LOG_ERROR("MPI provides thread level %d, kvrelay needs MPI_THREAD_FUNNELED", provided);
        return KVR_EMPI;
    }
    struct kvr_xfer *x = calloc(1, sizeof *x);
    if (!x)
        return KVR_ENOMEM;
    unsigned char mine[LAYOUT_NBYTES] = {0};
    unsigned char *all = NULL;
    if ((rc = MPI_Comm_dup(MPI_COMM_WORLD, &x->comm)) != MPI_SUCCESS) {
        free(x);
        return mpi_fail(rc, "MPI_Comm_dup");
    }
    MPI_Comm_set_errhandler(x->comm, MPI_ERRORS_RETURN);
    MPI_Comm parent = MPI_COMM_NULL;
    MPI_Comm_get_parent(&parent);
    if (parent != MPI_COMM_NULL || join_dir) {
        rc = parent != MPI_COMM_NULL ? join_init(x, parent, role) : join_by_port(x, role);
        if (rc != KVR_OK)
            goto fail;
        *out = x;
        return KVR_OK;
    }
    MPI_Comm_rank(x->comm, &x->rank);
    MPI_Comm_size(x->comm, &x->world_size);
    all = malloc((size_t)x->world_size * LAYOUT_NBYTES);
    if (!all || peers_grow(x, x->world_size) != KVR_OK || polls_add(x, x->comm) != KVR_OK) {
        rc = KVR_ENOMEM;
        goto fail;
    }
    struct kvr_wbuf w = {.p = mine, .cap = sizeof mine};
    kvr_w_i32(&w, (int32_t)role);
    char host[64] = {0};
    gethostname(host, sizeof host - 1);
    kvr_w_bytes(&w, host, 64);
    if ((rc = MPI_Allgather(mine, LAYOUT_NBYTES, MPI_BYTE, all, LAYOUT_NBYTES, MPI_BYTE, x->comm)) !=
        MPI_SUCCESS) {
        rc = mpi_fail(rc, "MPI_Allgather(layout)");
        goto fail;
    }
    int n_coord = 0;
    x->coord_rank = -1;
    for (int r = 0; r < x->world_size; r++) {
        struct kvr_rbuf rd = {.p = all + (size_t)r * LAYOUT_NBYTES, .len = LAYOUT_NBYTES};
        struct peer *p = &x->peers[r];
        p->comm = x->comm;
        p->rank = r;
        p->role = kvr_r_i32(&rd);
        memcpy(p->host, kvr_r_take(&rd, 64), 64);
        p->host[63] = '\0';
        if (p->role == KVR_ROLE_COORD) {
            n_coord++;
            x->coord_rank = r;
        }
    }
    if (n_coord != 1) {
        KVR_LOG_ERROR("the MPI job has %d coordinators; exactly one is needed", n_coord);
        rc = KVR_EINVAL;
        goto fail;
    }
    free(all);
    *out = x;
    return KVR_OK;
fail:
    free(all);
    free(x->peers);
    free(x->polls);
    MPI_Comm_free(&x->comm);
    free(x);
    return rc;
}

/* Frees everything of x that MPI no longer uses (sends still in flight keep their buffers:
 * MPI may read them until process exit). */
/* Buffers of sends still in flight when the transport is freed (a peer left or died with
 * messages unread). MPI may still read them, so they are never freed; they stay reachable
 * from here until the process exits instead of leaking. */
static unsigned char **inflight_bufs;
static int n_inflight_bufs;

static void keep_inflight(unsigned char *buf) {
    unsigned char **v = realloc(inflight_bufs, (size_t)(n_inflight_bufs + 1) * sizeof *v);
    if (v) {
        inflight_bufs = v;
        inflight_bufs[n_inflight_bufs++] = buf;
    }
}

static void xfer_free(struct kvr_xfer *x) {
    for (int i = 0; i < x->n_slots; i++) {
        if (x->slots[i].busy) {
            keep_inflight(x->slots[i].buf);
            continue;
        }
        free(x->slots[i].buf);
    }
    free(x->slots);
    free(x->rbuf);
    free(x->peers);
    free(x->polls);
}

static volatile sig_atomic_t finalize_exit_code;

/* MPI_Finalize did not return in time: leave without it (async-signal-safe only). */
static void on_finalize_alarm(int sig) {
    (void)sig;
    static const char msg[] = "kvrelay: MPI_Finalize did not return (a peer is gone); exiting without it\n";
    ssize_t k = write(2, msg, sizeof msg - 1);
    (void)k;
    _exit(finalize_exit_code);
}

void kvr_xfer_finalize(struct kvr_xfer *x, double flush_s, int exit_code) {
    if (!x)
        return;
    double t_end = kvr_clock_now() + flush_s;
    while (kvr_xfer_progress(x) > 0 && kvr_clock_now() < t_end) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    int stuck = kvr_xfer_progress(x);
    if (stuck > 0)
        KVR_LOG_WARN("%d sends still in flight at exit (a peer is gone?)", stuck);
    xfer_free(x);
    MPI_Comm_free(&x->comm);
    free(x);
    /* Open MPI's MPI_Finalize waits for every peer; one that died (or a coordinator that
     * is gone) would keep this process for minutes. Bound it. */
    fflush(stdout);
    fflush(stderr);
    finalize_exit_code = exit_code;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_finalize_alarm;
    sigaction(SIGALRM, &sa, NULL);
    alarm(KVR_XFER_FINALIZE_GRACE_S);
    MPI_Finalize();
    alarm(0);
}

_Noreturn void kvr_xfer_leave(struct kvr_xfer *x, int exit_code) {
    if (x) {
        kvr_xfer_progress(x);
        xfer_free(x);
        free(x);
    }
    KVR_LOG_WARN("leaving without MPI_Finalize (exit code %d)", exit_code);
    fflush(stdout);
    fflush(stderr);
    /* _exit: no atexit handlers, no LeakSanitizer pass over MPI's never-finalized state. */
    _exit(exit_code);
}

_Noreturn void kvr_xfer_abort(struct kvr_xfer *x, int code) {
    MPI_Abort(x ? x->comm : MPI_COMM_WORLD, code);
    exit(code);
}

int kvr_xfer_rank(const struct kvr_xfer *x) { return x->rank; }
int kvr_xfer_size(const struct kvr_xfer *x) { return x->size; }
int kvr_xfer_coord_rank(const struct kvr_xfer *x) { return x->coord_rank; }

int kvr_xfer_role_of(const struct kvr_xfer *x, int rank) {
    return rank >= 0 && rank < x->size ? x->peers[rank].role : -1;
}

int kvr_xfer_linked(const struct kvr_xfer *x, int rank) {
    return rank >= 0 && rank < x->size && x->peers[rank].own && x->peers[rank].comm != MPI_COMM_NULL;
}

const char *kvr_xfer_host_of(const struct kvr_xfer *x, int rank) {
    return rank >= 0 && rank < x->size ? x->peers[rank].host : "?";
}

int kvr_xfer_joined(const struct kvr_xfer *x) { return x->joined; }

void kvr_xfer_mark_alive(struct kvr_xfer *x, int rank) {
    if (rank >= 0 && rank < x->size)
        x->peers[rank].dead = 0;
}

void kvr_xfer_mark_dead(struct kvr_xfer *x, int rank) {
    if (rank < 0 || rank >= x->size)
        return;
    x->peers[rank].dead = 1;
    /* Its sends in flight may never complete: let MPI finish them on its own (or not) and
     * give their buffers up to it, so the slots are free and finalize does not wait. */
    for (int i = 0; i < x->n_slots; i++) {
        struct send_slot *s = &x->slots[i];
        if (!s->busy || s->dst != rank)
            continue;
        MPI_Request_free(&s->req);
        keep_inflight(s->buf); /* still MPI's to read: never reused, never freed */
        s->buf = NULL;
        s->cap = 0;
        s->busy = 0;
    }
}

/* ---- sending -------------------------------------------------------------------- */

int kvr_xfer_progress(struct kvr_xfer *x) {
    int n_busy = 0;
    for (int i = 0; i < x->n_slots; i++) {
        struct send_slot *s = &x->slots[i];
        if (!s->busy)
            continue;
        int done = 0;
        int rc = MPI_Test(&s->req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            mpi_fail(rc, "MPI_Test(send)");
            /* The request is finished with an error; the buffer is ours again. */
            s->busy = 0;
            continue;
        }
        if (done)
            s->busy = 0;
        else
            n_busy++;
    }
    return n_busy;
}

/* A free send buffer of at least len bytes (reused; grown only when none fits). */
static struct send_slot *get_slot(struct kvr_xfer *x, size_t len) {
    struct send_slot *best = NULL;
    for (int i = 0; i < x->n_slots; i++) {
        struct send_slot *s = &x->slots[i];
        if (s->busy)
            continue;
        if (s->cap >= len && (!best || s->cap < best->cap))
            best = s;
    }
    if (!best) {
        for (int i = 0; i < x->n_slots; i++)
            if (!x->slots[i].busy) {
                best = &x->slots[i];
                break;
            }
    }
    if (!best) {
        struct send_slot *ns = realloc(x->slots, (size_t)(x->n_slots + 16) * sizeof *ns);
        if (!ns)
            return NULL;
        memset(ns + x->n_slots, 0, 16 * sizeof *ns);
        x->slots = ns;
        best = &x->slots[x->n_slots];
        x->n_slots += 16;
    }
    if (best->cap < len) {
        size_t cap = len < 4096 ? 4096 : len;
        unsigned char *b = realloc(best->buf, cap);
        if (!b)
            return NULL;
        best->buf = b;
        best->cap = cap;
    }
    return best;
}

/* A free slot of len bytes for a message to dst. */
static struct send_slot *begin(struct kvr_xfer *x, int dst, size_t len, int *rc) {
    if (dst < 0 || dst >= x->size || dst == x->rank || x->peers[dst].comm == MPI_COMM_NULL) {
        *rc = KVR_EINVAL;
        return NULL;
    }
    if (x->peers[dst].dead) {
        *rc = KVR_EUNAVAIL;
        return NULL;
    }
    if (len < KVR_MSG_HDR_NBYTES || len > (size_t)INT32_MAX) {
        *rc = KVR_ERANGE;
        return NULL;
    }
    kvr_xfer_progress(x);
    struct send_slot *s = get_slot(x, len);
    if (!s) {
        *rc = KVR_ENOMEM;
        return NULL;
    }
    *rc = KVR_OK;
    return s;
}

static int post(struct kvr_xfer *x, struct send_slot *s, size_t len, int dst, int tag) {
    const struct peer *p = &x->peers[dst];
    int rc = MPI_Isend(s->buf, (int)len, MPI_BYTE, p->rank, tag, p->comm, &s->req);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Isend");
    s->busy = 1;
    s->dst = dst;
    return KVR_OK;
}

typedef void (*writer_fn)(struct kvr_wbuf *w, const void *arg);

/* Measures the message fn writes, takes a slot, writes it there and posts it. */
static int send_msg(struct kvr_xfer *x, int dst, int tag, writer_fn fn, const void *arg) {
    struct kvr_wbuf m = {0};
    fn(&m, arg);
    int rc;
    struct send_slot *s = begin(x, dst, m.len, &rc);
    if (!s)
        return rc;
    struct kvr_wbuf w = {.p = s->buf, .cap = m.len};
    fn(&w, arg);
    KVR_ASSERT(!w.err && w.len == m.len);
    return post(x, s, w.len, dst, tag);
}

int kvr_xfer_send_bytes(struct kvr_xfer *x, int dst, int tag, const void *bytes, size_t len) {
    int rc;
    struct send_slot *s = begin(x, dst, len, &rc);
    if (!s)
        return rc;
    memcpy(s->buf, bytes, len);
    return post(x, s, len, dst, tag);
}

static void w_hello(struct kvr_wbuf *w, const void *a) { kvr_msg_write_hello(w, a); }
static void w_status(struct kvr_wbuf *w, const void *a) { kvr_msg_write_status(w, a); }

int kvr_xfer_send_hello(struct kvr_xfer *x, int dst, const struct kvr_hello *h) {
    return send_msg(x, dst, KVR_TAG_REPORT, w_hello, h);
}

int kvr_xfer_send_status(struct kvr_xfer *x, int dst, const struct kvr_node_report *r) {
    return send_msg(x, dst, KVR_TAG_REPORT, w_status, r);
}

struct tokens_arg {
    const struct kvr_tok_event *ev;
    int n;
};
static void w_tokens(struct kvr_wbuf *w, const void *a) {
    const struct tokens_arg *t = a;
    kvr_msg_write_tokens(w, t->ev, t->n);
}

int kvr_xfer_send_tokens(struct kvr_xfer *x, int dst, const struct kvr_tok_event *ev, int n, int *n_sent) {
    int done = 0, rc = n >= 1 ? KVR_OK : KVR_EINVAL;
    while (rc == KVR_OK && done < n) {
        struct tokens_arg t = {.ev = ev + done, .n = n - done < KVR_TOKENS_MAX_EVENTS ? n - done
                                                                                   : KVR_TOKENS_MAX_EVENTS};
        rc = send_msg(x, dst, KVR_TAG_REPORT, w_tokens, &t);
        if (rc == KVR_OK)
            done += t.n;
    }
    if (n_sent)
        *n_sent = done;
    return rc;
}

struct done_arg {
    uint64_t req_id;
    const struct kvr_prefill_done *d;
};
static void w_done(struct kvr_wbuf *w, const void *a) {
    const struct done_arg *d = a;
    kvr_msg_write_prefill_done(w, d->req_id, d->d);
}

int kvr_xfer_send_prefill_done(struct kvr_xfer *x, int dst, uint64_t req_id, const struct kvr_prefill_done *d) {
    struct done_arg a = {.req_id = req_id, .d = d};
    return send_msg(x, dst, KVR_TAG_REPORT, w_done, &a);
}

struct req_arg {
    int kind;
    const struct kvr_req_params *p;
    const int *prompt;
};
static void w_req(struct kvr_wbuf *w, const void *a) {
    const struct req_arg *r = a;
    kvr_msg_write_req(w, r->kind, r->p, r->prompt);
}

int kvr_xfer_send_req(struct kvr_xfer *x, int dst, int kind, const struct kvr_req_params *p, const int *prompt) {
    if ((kind != KVR_MSG_PREFILL_REQ && kind != KVR_MSG_SEQ_BEGIN) || p->n_prompt < 1 ||
        p->n_prompt > KVR_MSG_MAX_PROMPT)
        return KVR_EINVAL;
    struct req_arg a = {.kind = kind, .p = p, .prompt = prompt};
    return send_msg(x, dst, KVR_TAG_CTRL, w_req, &a);
}

struct empty_arg {
    int kind;
    uint64_t req_id;
};
static void w_empty(struct kvr_wbuf *w, const void *a) {
    const struct empty_arg *e = a;
    kvr_msg_write_empty(w, e->kind, e->req_id);
}

int kvr_xfer_send_cancel(struct kvr_xfer *x, int dst, uint64_t req_id) {
    struct empty_arg a = {KVR_MSG_CANCEL, req_id};
    return send_msg(x, dst, KVR_TAG_CTRL, w_empty, &a);
}

int kvr_xfer_send_shutdown(struct kvr_xfer *x, int dst) {
    struct empty_arg a = {KVR_MSG_SHUTDOWN, 0};
    return send_msg(x, dst, KVR_TAG_CTRL, w_empty, &a);
}

int kvr_xfer_send_ping(struct kvr_xfer *x, int dst) {
    struct empty_arg a = {KVR_MSG_PING, 0};
    return send_msg(x, dst, KVR_TAG_CTRL, w_empty, &a);
}

static void w_reset(struct kvr_wbuf *w, const void *a) { kvr_msg_write_reset(w, *(const uint32_t *)a); }

int kvr_xfer_send_reset(struct kvr_xfer *x, int dst, uint32_t epoch) {
    return send_msg(x, dst, KVR_TAG_CTRL, w_reset, &epoch);
}

struct kv_arg {
    uint64_t req_id, begin_no;
    const void *wire;
    size_t len;
};
static void w_kv(struct kvr_wbuf *w, const void *a) {
    const struct kv_arg *k = a;
    kvr_msg_write_kv(w, k->req_id, k->begin_no, k->wire, k->len);
}

int kvr_xfer_send_kv(struct kvr_xfer *x, int dst, uint64_t req_id, uint64_t begin_no, const void *wire,
                     size_t len) {
    struct kv_arg a = {.req_id = req_id, .begin_no = begin_no, .wire = wire, .len = len};
    return send_msg(x, dst, KVR_TAG_SEQ, w_kv, &a);
}

struct ready_arg {
    uint64_t req_id;
    const struct kvr_seq_ready *r;
};
static void w_ready(struct kvr_wbuf *w, const void *a) {
    const struct ready_arg *r = a;
    kvr_msg_write_seq_ready(w, r->req_id, r->r);
}

int kvr_xfer_send_seq_ready(struct kvr_xfer *x, int dst, uint64_t req_id, const struct kvr_seq_ready *r) {
    struct ready_arg a = {.req_id = req_id, .r = r};
    return send_msg(x, dst, KVR_TAG_SEQ, w_ready, &a);
}

struct abort_arg {
    uint64_t req_id;
    const struct kvr_seq_abort *a;
};
static void w_abort(struct kvr_wbuf *w, const void *a) {
    const struct abort_arg *b = a;
    kvr_msg_write_seq_abort(w, b->req_id, b->a);
}

int kvr_xfer_send_seq_abort(struct kvr_xfer *x, int dst, uint64_t req_id, const struct kvr_seq_abort *ab) {
    struct abort_arg a = {.req_id = req_id, .a = ab};
    return send_msg(x, dst, KVR_TAG_SEQ, w_abort, &a);
}

/* ---- receiving ------------------------------------------------------------------ */

static int poll_one(struct kvr_xfer *x, MPI_Comm c, const int *tags, int n_tags, struct kvr_msg *m) {
    for (int t = 0; t < n_tags; t++) {
        int flag = 0;
        MPI_Message msg;
        MPI_Status st;
        int rc = MPI_Improbe(MPI_ANY_SOURCE, tags[t], c, &flag, &msg, &st);
        if (rc != MPI_SUCCESS)
            return mpi_fail(rc, "MPI_Improbe");
        if (!flag)
            continue;
        int count = 0;
        MPI_Get_count(&st, MPI_BYTE, &count);
        if (count < 0)
            count = 0;
        if ((size_t)count > x->rcap || !x->rbuf) {
            size_t cap = (size_t)count < 4096 ? 4096 : (size_t)count;
            unsigned char *b = realloc(x->rbuf, cap);
            if (!b) {
                /* Still take the message off the queue so the channel does not jam. */
                unsigned char dummy;
                MPI_Mrecv(&dummy, 0, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
                KVR_LOG_ERROR("no memory for a %d-byte message from rank %d", count, st.MPI_SOURCE);
                return KVR_ENOMEM;
            }
            x->rbuf = b;
            x->rcap = cap;
        }
        if ((rc = MPI_Mrecv(x->rbuf, count, MPI_BYTE, &msg, MPI_STATUS_IGNORE)) != MPI_SUCCESS)
            return mpi_fail(rc, "MPI_Mrecv");
        m->src = peer_of(x, c, st.MPI_SOURCE);
        m->tag = tags[t];
        if (kvr_msg_parse_header(x->rbuf, (size_t)count, m) != KVR_OK)
            return KVR_EFORMAT;
        return KVR_OK;
    }
    return KVR_EAGAIN;
}

int kvr_xfer_poll(struct kvr_xfer *x, const int *tags, int n_tags, struct kvr_msg *m) {
    /* Links are polled from a rotating start so that a busy one cannot starve the others;
     * each (source, tag) channel stays in order whatever the start. */
    int n = x->n_polls;
    static unsigned turn;
    turn++;
    for (int i = 0; i < n; i++) {
        int rc = poll_one(x, x->polls[(turn + (unsigned)i) % (unsigned)n], tags, n_tags, m);
        if (rc != KVR_EAGAIN)
            return rc;
    }
    return KVR_EAGAIN;
}

/* ---- joining and leaving -------------------------------------------------------- */

int kvr_xfer_spawn(struct kvr_xfer *x, const char *cmd, char **args, const char *host, int *out_id) {
    MPI_Info info = MPI_INFO_NULL;
    MPI_Info_create(&info);
    /* A spawned child is pinned to one core when slots come from a hostfile or Slurm,
     * even under --bind-to none (../shared/notes/elastic-mpi.md). */
    MPI_Info_set(info, "bind_to", "none");
    if (host && host[0])
        MPI_Info_set(info, "host", host);
    MPI_Comm ic = MPI_COMM_NULL;
    int err = 0;
    int rc = MPI_Comm_spawn(cmd, args, 1, info, 0, MPI_COMM_SELF, &ic, &err);
    MPI_Info_free(&info);
    if (rc != MPI_SUCCESS || err != MPI_SUCCESS)
        return mpi_fail(rc != MPI_SUCCESS ? rc : err, "MPI_Comm_spawn");
    int id = x->size;
    if ((rc = link_peer(x, id, ic, KVR_ROLE_DECODE, host)) != KVR_OK) {
        MPI_Comm_disconnect(&ic);
        return rc;
    }
    *out_id = id;
    return KVR_OK;
}

int kvr_xfer_adopt(struct kvr_xfer *x, const char *port, int *out_id) {
    int id = x->size;
    int rc = kvr_xfer_connect(x, port, id, KVR_ROLE_DECODE);
    if (rc == KVR_OK)
        *out_id = id;
    return rc;
}

int kvr_xfer_open_port(struct kvr_xfer *x, char *port) {
    (void)x;
    int rc = MPI_Open_port(MPI_INFO_NULL, port);
    return rc == MPI_SUCCESS ? KVR_OK : mpi_fail(rc, "MPI_Open_port");
}

void kvr_xfer_close_port(struct kvr_xfer *x, const char *port) {
    (void)x;
    MPI_Close_port(port);
}

int kvr_xfer_accept(struct kvr_xfer *x, const char *port, int *peer_id) {
    MPI_Comm ic = MPI_COMM_NULL;
    int rc = MPI_Comm_accept(port, MPI_INFO_NULL, 0, MPI_COMM_SELF, &ic);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Comm_accept");
    MPI_Comm_set_errhandler(ic, MPI_ERRORS_RETURN);
    /* The connecting side says who it is first. */
    struct kvr_link l;
    rc = recv_link_hello(ic, &l);
    if (rc == KVR_OK && (l.peer == x->rank || (l.peer < x->size && x->peers[l.peer].own)))
        rc = KVR_EINVAL;
    if (rc != KVR_OK) {
        KVR_LOG_ERROR("a peer connected but did not say who it is: %s", kvr_status_str(rc));
        MPI_Comm_disconnect(&ic);
        return rc;
    }
    const char *host = l.peer < x->size ? x->peers[l.peer].host : NULL;
    char h[64];
    snprintf(h, sizeof h, "%s", host ? host : "?");
    if ((rc = link_peer(x, l.peer, ic, l.value, h)) != KVR_OK) {
        MPI_Comm_disconnect(&ic);
        return rc;
    }
    *peer_id = l.peer;
    return KVR_OK;
}

int kvr_xfer_connect(struct kvr_xfer *x, const char *port, int peer_id, int role) {
    if (peer_id < 0 || peer_id == x->rank || (peer_id < x->size && x->peers[peer_id].comm != MPI_COMM_NULL))
        return KVR_EINVAL;
    MPI_Comm ic = MPI_COMM_NULL;
    int rc = MPI_Comm_connect(port, MPI_INFO_NULL, 0, MPI_COMM_SELF, &ic);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Comm_connect");
    MPI_Comm_set_errhandler(ic, MPI_ERRORS_RETURN);
    struct kvr_link l = {.peer = x->rank, .value = x->peers[x->rank].role};
    unsigned char b[64];
    struct kvr_wbuf w = {.p = b, .cap = sizeof b};
    kvr_msg_write_link(&w, KVR_MSG_LINK_HELLO, &l);
    if ((rc = MPI_Send(b, (int)w.len, MPI_BYTE, 0, KVR_TAG_CTRL, ic)) != MPI_SUCCESS) {
        MPI_Comm_disconnect(&ic);
        return mpi_fail(rc, "MPI_Send(LINK_HELLO)");
    }
    if ((rc = link_peer(x, peer_id, ic, role, NULL)) != KVR_OK) {
        MPI_Comm_disconnect(&ic);
        return rc;
    }
    return KVR_OK;
}

int kvr_xfer_disconnect(struct kvr_xfer *x, int peer_id) {
    if (peer_id < 0 || peer_id >= x->size || !x->peers[peer_id].own)
        return KVR_EINVAL;
    struct peer *p = &x->peers[peer_id];
    /* Sends still in flight to it must complete first (MPI_Comm_disconnect waits for
     * them); the peer reads everything up to our BYE before it disconnects. */
    double t_end = kvr_clock_now() + 10.0;
    for (;;) {
        int busy = 0;
        kvr_xfer_progress(x);
        for (int i = 0; i < x->n_slots; i++)
            busy |= x->slots[i].busy && x->slots[i].dst == peer_id;
        if (!busy || kvr_clock_now() > t_end)
            break;
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    polls_del(x, p->comm);
    int rc = MPI_Comm_disconnect(&p->comm);
    p->comm = MPI_COMM_NULL;
    p->own = 0;
    p->dead = 1;
    return rc == MPI_SUCCESS ? KVR_OK : mpi_fail(rc, "MPI_Comm_disconnect");
}
