/* node.c - the shared lifecycle of prefill and decode nodes (see node.h). Owns the
 * queue of sends waiting for a retry; the role owns everything about requests. */
#include "node.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "role.h"
#include "status.h"
#include "xfer.h"

#define MAX_MSGS_PER_TURN 512
#define OUTBOX_MAX_NBYTES (256u << 20) /* past this a send that cannot go is dropped */

struct node_outmsg {
    struct node_outmsg *next;
    int dst, tag;
    size_t len;
    unsigned char bytes[]; /* (len) the whole message */
};

void kvr_node_hello_init(struct kvr_hello *h, enum kvr_role role, const struct kvr_model *model,
                         const struct kvr_kv_pool *pool, int setup_status) {
    memset(h, 0, sizeof *h);
    h->role = role;
    gethostname(h->host, sizeof h->host - 1);
    if (setup_status == KVR_OK && (!model || !pool))
        setup_status = KVR_EINVAL;
    h->setup_status = setup_status;
    if (setup_status != KVR_OK)
        return;
    const struct kvr_model_config *c = kvr_model_config((struct kvr_model *)(uintptr_t)model);
    struct kvr_kv_pool_stats st;
    kvr_kv_pool_stats(pool, &st);
    h->n_layers = c->n_layers;
    h->kv_dim = c->kv_dim;
    h->block_tokens = st.block_tokens;
    h->seq_len = c->seq_len;
    h->vocab_size = c->vocab_size;
    h->fingerprint = kvr_model_fingerprint((struct kvr_model *)(uintptr_t)model);
    h->kv_bytes_total = st.bytes_total;
    h->n_blocks_total = st.n_blocks;
    h->kv_type = (int)st.type;
}

void kvr_node_init(struct kvr_node *n, const struct kvr_node_params *p) {
    memset(n, 0, sizeof *n);
    n->p = *p;
    n->coord = kvr_xfer_coord_rank(p->xfer);
    n->hello_due = 1;
    n->last_coord = kvr_clock_now();
}

/* ---- sending with retry ------------------------------------------------------------ */

static int queued_for(const struct kvr_node *n, int dst, int tag) {
    for (const struct node_outmsg *o = n->out_head; o; o = o->next)
        if (o->dst == dst && o->tag == tag)
            return 1;
    return 0;
}

/* Sends what waits, in order; stops at the first that still cannot go on its channel
 * (later ones to the same channel wait behind it). Returns how many remain. */
static int outbox_flush(struct kvr_node *n) {
    int left = 0;
    struct node_outmsg **pp = &n->out_head, *prev = NULL;
    while (*pp) {
        struct node_outmsg *o = *pp;
        int blocked = 0;
        for (struct node_outmsg *q = n->out_head; q != o; q = q->next)
            blocked |= q->dst == o->dst && q->tag == o->tag;
        int rc = blocked ? KVR_EAGAIN : kvr_xfer_send_bytes(n->p.xfer, o->dst, o->tag, o->bytes, o->len);
        if (rc == KVR_OK || rc == KVR_EUNAVAIL || rc == KVR_EINVAL) {
            if (rc != KVR_OK)
                KVR_LOG_WARN("dropped a queued %zu-byte message to rank %d: %s", o->len, o->dst,
                             kvr_status_str(rc));
            *pp = o->next;
            n->out_nbytes -= o->len;
            free(o);
            continue;
        }
        left++;
        prev = o;
        pp = &o->next;
    }
    n->out_tail = prev;
    return left;
}

int kvr_node_send(struct kvr_node *n, int dst, int tag, void (*fn)(struct kvr_wbuf *w, const void *arg),
                  const void *arg) {
    struct kvr_wbuf m = {0};
    fn(&m, arg);
    struct node_outmsg *o = malloc(sizeof *o + m.len);
    if (!o) {
        KVR_LOG_ERROR("no memory for a %zu-byte message to rank %d", m.len, dst);
        return KVR_ENOMEM;
    }
    struct kvr_wbuf w = {.p = o->bytes, .cap = m.len};
    fn(&w, arg);
    KVR_ASSERT(!w.err && w.len == m.len);
    int rc = KVR_EAGAIN;
    if (!queued_for(n, dst, tag))
        rc = kvr_xfer_send_bytes(n->p.xfer, dst, tag, o->bytes, m.len);
    if (rc == KVR_OK || rc == KVR_EUNAVAIL || rc == KVR_EINVAL) {
        free(o);
        return rc;
    }
    if (n->out_nbytes + m.len > OUTBOX_MAX_NBYTES) {
        KVR_LOG_ERROR("cannot send a %zu-byte %s to rank %d and %zu bytes already wait: dropped", m.len,
                      kvr_msg_kind_name(o->bytes[6] | (o->bytes[7] << 8)), dst, n->out_nbytes);
        free(o);
        return KVR_ENOMEM;
    }
    if (rc != KVR_EAGAIN)
        KVR_LOG_WARN("send to rank %d failed (%s): queued for a retry", dst, kvr_status_str(rc));
    o->next = NULL;
    o->dst = dst;
    o->tag = tag;
    o->len = m.len;
    if (n->out_tail)
        n->out_tail->next = o;
    else
        n->out_head = o;
    n->out_tail = o;
    n->out_nbytes += m.len;
    return KVR_OK;
}

/* ---- reports ---------------------------------------------------------------------- */

static void send_hello(struct kvr_node *n) {
    struct kvr_hello h = n->p.hello;
    h.epoch = n->epoch;
    if (kvr_xfer_send_hello(n->p.xfer, n->coord, &h) == KVR_OK)
        n->hello_due = 0;
}

static void report(struct kvr_node *n) {
    struct kvr_node_report r = {0};
    if (n->p.pool) {
        struct kvr_kv_pool_stats st;
        kvr_kv_pool_stats(n->p.pool, &st);
        r.kv_bytes_total = st.bytes_total;
        r.kv_bytes_used = st.bytes_used;
        r.kv_bytes_free = st.bytes_free;
        r.n_blocks_total = st.n_blocks;
        r.n_blocks_free = st.n_blocks_free;
    }
    if (n->p.ops->queues)
        n->p.ops->queues(n->p.ud, &r);
    /* A STATUS that cannot go now is not queued: the next one says more. */
    if (kvr_xfer_send_status(n->p.xfer, n->coord, &r) == KVR_OK) {
        n->last_report = kvr_clock_now();
        n->report_due = 0;
    }
}

void kvr_node_report_soon(struct kvr_node *n) { n->report_due = 1; }

void kvr_node_tick(struct kvr_node *n) {
    kvr_xfer_progress(n->p.xfer);
    if ((kvr_clock_now() - n->last_report) * 1000.0 >= n->p.report_ms)
        report(n);
}

/* ---- the loop ---------------------------------------------------------------------- */

static void on_reset(struct kvr_node *n, const struct kvr_msg *m) {
    uint32_t epoch = 0;
    if (kvr_msg_parse_reset(m, &epoch) != KVR_OK)
        return;
    KVR_LOG_WARN("the coordinator declared this node dead and takes it back (epoch %u): dropping every "
                 "request", epoch);
    n->p.ops->reset(n->p.ud);
    n->epoch = epoch;
    n->hello_due = 1;
    n->report_due = 1;
}

/* ---- joining and leaving (issue 14) ------------------------------------------------ */

static int send_link(struct kvr_node *n, int dst, int tag, int kind, const struct kvr_link *l) {
    unsigned char *b = malloc(64 + KVR_PORT_MAX);
    if (!b)
        return KVR_ENOMEM;
    struct kvr_wbuf w = {.p = b, .cap = 64 + KVR_PORT_MAX};
    kvr_msg_write_link(&w, kind, l);
    KVR_ASSERT(!w.err);
    int rc = kvr_xfer_send_bytes(n->p.xfer, dst, tag, b, w.len);
    free(b);
    return rc;
}

/* LINK from the coordinator (prefill): connect to a joining node; LINKED says how it went. */
static void on_link(struct kvr_node *n, const struct kvr_msg *m) {
    struct kvr_link l;
    if (kvr_msg_parse_link(m, &l) != KVR_OK)
        return;
    double t0 = kvr_clock_now();
    int rc = kvr_xfer_connect(n->p.xfer, l.port, l.peer, l.value);
    KVR_LOG_INFO("linked to joining node %d in %.1f ms: %s", l.peer, (kvr_clock_now() - t0) * 1000.0,
                 kvr_status_str(rc));
    struct kvr_link r = {.peer = l.peer, .value = rc};
    send_link(n, n->coord, KVR_TAG_REPORT, KVR_MSG_LINKED, &r);
}

/* Drops queued sends to peer (it is leaving). */
static void outbox_forget(struct kvr_node *n, int peer) {
    struct node_outmsg **pp = &n->out_head, *prev = NULL;
    while (*pp) {
        struct node_outmsg *o = *pp;
        if (o->dst == peer) {
            *pp = o->next;
            n->out_nbytes -= o->len;
            free(o);
            continue;
        }
        prev = o;
        pp = &o->next;
    }
    n->out_tail = prev;
}

/* UNLINK from the coordinator (prefill): the node drained; BYE is the last message on our
 * SEQ channel to it, then both sides disconnect. */
static void on_unlink(struct kvr_node *n, const struct kvr_msg *m) {
    struct kvr_link l;
    if (kvr_msg_parse_link(m, &l) != KVR_OK)
        return;
    outbox_forget(n, l.peer);
    struct kvr_link bye = {.peer = kvr_xfer_rank(n->p.xfer)};
    int rc = send_link(n, l.peer, KVR_TAG_SEQ, KVR_MSG_BYE, &bye);
    if (rc == KVR_OK) {
        double t0 = kvr_clock_now();
        rc = kvr_xfer_disconnect(n->p.xfer, l.peer);
        KVR_LOG_INFO("disconnected from leaving node %d in %.1f ms: %s", l.peer, (kvr_clock_now() - t0) * 1000.0,
                     kvr_status_str(rc));
    } else {
        KVR_LOG_WARN("cannot say BYE to leaving node %d: %s", l.peer, kvr_status_str(rc));
    }
}

static void on_join_alarm(int sig) {
    (void)sig;
    static const char msg[] = "kvrelay: joining the cluster timed out (a peer never connected); exiting\n";
    ssize_t k = write(2, msg, sizeof msg - 1);
    (void)k;
    _exit(1);
}

/* A spawned node: HELLO (the coordinator checks the model), then the coordinator's LINK
 * says how many prefill nodes will connect; open a port, tell the coordinator, accept
 * them. Returns KVR_OK when linked (the HELLO is sent), KVR_EINVAL when the coordinator
 * refused this node (SHUTDOWN or LEAVE), KVR_EUNAVAIL when it stayed silent. */
static int join_links(struct kvr_node *n) {
    struct kvr_xfer *x = n->p.xfer;
    static const int ctrl[] = {KVR_TAG_CTRL};
    send_hello(n);
    double t_end = kvr_clock_now() + n->p.coord_timeout_s;
    int n_accept = -1;
    struct kvr_idle idle = {0};
    while (n_accept < 0) {
        if (*n->p.stop)
            return KVR_EINVAL;
        if (n->hello_due)
            send_hello(n);
        struct kvr_msg m;
        int rc = kvr_xfer_poll(x, ctrl, 1, &m);
        if (rc == KVR_OK && m.src == n->coord) {
            if (m.kind == KVR_MSG_SHUTDOWN || m.kind == KVR_MSG_LEAVE)
                return KVR_EINVAL;
            struct kvr_link l;
            if (m.kind == KVR_MSG_LINK && kvr_msg_parse_link(&m, &l) == KVR_OK && l.peer == kvr_xfer_rank(x))
                n_accept = l.value;
            t_end = kvr_clock_now() + n->p.coord_timeout_s;
        }
        if (kvr_clock_now() > t_end)
            return KVR_EUNAVAIL;
        kvr_xfer_progress(x);
        kvr_idle_turn(&idle, rc == KVR_OK);
    }
    struct kvr_link lp = {.peer = kvr_xfer_rank(x), .value = n_accept};
    int rc = kvr_xfer_open_port(x, lp.port);
    if (rc != KVR_OK)
        return rc;
    if ((rc = send_link(n, n->coord, KVR_TAG_REPORT, KVR_MSG_LINK_PORT, &lp)) != KVR_OK) {
        kvr_xfer_close_port(x, lp.port);
        return rc;
    }
    /* MPI_Comm_accept has no timeout: if a prefill node dies before it connects, this
     * node would wait forever; the alarm ends it (mpirun --enable-recovery keeps the job). */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_join_alarm;
    sigaction(SIGALRM, &sa, NULL);
    alarm((unsigned)(n->p.coord_timeout_s * 2 + 5));
    for (int i = 0; i < n_accept && rc == KVR_OK; i++) {
        int peer = -1;
        rc = kvr_xfer_accept(x, lp.port, &peer);
        if (rc == KVR_OK)
            KVR_LOG_INFO("link %d of %d: peer %d", i + 1, n_accept, peer);
    }
    alarm(0);
    kvr_xfer_close_port(x, lp.port);
    n->last_coord = kvr_clock_now();
    return rc;
}

/* LEAVE from the coordinator: nothing of ours is placed here any more. Read (and drop)
 * what the prefill nodes still send until each says BYE and disconnect from it; then BYE
 * to the coordinator and disconnect from it. */
static void leave_links(struct kvr_node *n) {
    struct kvr_xfer *x = n->p.xfer;
    static const int tags[] = {KVR_TAG_SEQ, KVR_TAG_CTRL};
    n->p.ops->reset(n->p.ud);
    kvr_node_deinit(n, 2.0);
    int left = 0;
    for (int id = 0; id < kvr_xfer_size(x); id++)
        left += id != n->coord && kvr_xfer_linked(x, id);
    double t_end = kvr_clock_now() + n->p.coord_timeout_s;
    struct kvr_idle idle = {0};
    while (left > 0 && kvr_clock_now() < t_end) {
        struct kvr_msg m;
        int rc = kvr_xfer_poll(x, tags, 2, &m);
        if (rc == KVR_OK && m.kind == KVR_MSG_BYE && m.src >= 0 && m.src != n->coord &&
            kvr_xfer_linked(x, m.src)) {
            double t0 = kvr_clock_now();
            int drc = kvr_xfer_disconnect(x, m.src);
            KVR_LOG_INFO("disconnected from rank %d in %.1f ms: %s", m.src, (kvr_clock_now() - t0) * 1000.0,
                         kvr_status_str(drc));
            left--;
        }
        kvr_xfer_progress(x);
        kvr_idle_turn(&idle, rc == KVR_OK);
    }
    if (left > 0)
        KVR_LOG_WARN("%d prefill nodes never said BYE", left);
    struct kvr_link bye = {.peer = kvr_xfer_rank(x)};
    send_link(n, n->coord, KVR_TAG_REPORT, KVR_MSG_BYE, &bye);
    int rc = kvr_xfer_disconnect(x, n->coord);
    KVR_LOG_INFO("left the cluster: %s", kvr_status_str(rc));
    n->left = 1;
}

static int drain(struct kvr_node *n) {
    int cnt = 0;
    struct kvr_msg m;
    while (cnt < MAX_MSGS_PER_TURN) {
        int rc = kvr_xfer_poll(n->p.xfer, n->p.tags, n->p.n_tags, &m);
        if (rc == KVR_EAGAIN)
            break;
        cnt++;
        if (rc != KVR_OK)
            continue;
        if (m.src == n->coord)
            n->last_coord = kvr_clock_now();
        switch (m.kind) {
        case KVR_MSG_PING:
            break;
        case KVR_MSG_SHUTDOWN:
            if (m.src == n->coord)
                n->shutdown = 1;
            break;
        case KVR_MSG_RESET:
            if (m.src == n->coord)
                on_reset(n, &m);
            break;
        case KVR_MSG_LINK:
            if (m.src == n->coord)
                on_link(n, &m);
            break;
        case KVR_MSG_UNLINK:
            if (m.src == n->coord)
                on_unlink(n, &m);
            break;
        case KVR_MSG_LEAVE:
            if (m.src == n->coord && kvr_xfer_joined(n->p.xfer))
                n->leave = 1;
            break;
        case KVR_MSG_BYE:
            /* A prefill node's last message to this drained node (it may come before the
             * coordinator's LEAVE): it waits in MPI_Comm_disconnect for us. */
            if (m.src >= 0 && m.src != n->coord && kvr_xfer_linked(n->p.xfer, m.src)) {
                int src = m.src;
                double t0 = kvr_clock_now();
                int drc = kvr_xfer_disconnect(n->p.xfer, src);
                KVR_LOG_INFO("disconnected from rank %d in %.1f ms: %s", src, (kvr_clock_now() - t0) * 1000.0,
                             kvr_status_str(drc));
            }
            break;
        default:
            n->p.ops->on_msg(n->p.ud, &m);
        }
        if (n->shutdown || n->leave)
            break;
    }
    return cnt;
}

int kvr_node_run(struct kvr_node *n) {
    struct kvr_idle idle = {0};
    n->last_coord = kvr_clock_now();
    if (kvr_xfer_joined(n->p.xfer)) {
        int rc = join_links(n);
        if (rc != KVR_OK) {
            KVR_LOG_ERROR("could not join the cluster: %s", kvr_status_str(rc));
            return rc;
        }
    } else {
        send_hello(n);
    }
    double last_turn = kvr_clock_now();
    while (!n->shutdown) {
        double t = kvr_clock_now();
        if (*n->p.stop) {
            /* A node of the job itself stops with the job. A joined node told to stop
             * (SIGTERM: scancel, a pod's termination) asks to be drained and leaves when
             * the coordinator says LEAVE: nothing it runs is lost. */
            if (!kvr_xfer_joined(n->p.xfer))
                break;
            if (n->t_stop == 0) {
                struct kvr_link l = {.peer = kvr_xfer_rank(n->p.xfer)};
                n->t_stop = t;
                KVR_LOG_WARN("told to stop: asking the coordinator to drain this node");
                if (send_link(n, n->coord, KVR_TAG_REPORT, KVR_MSG_DRAIN_ME, &l) != KVR_OK)
                    break;
            } else if (t - n->t_stop > n->p.coord_timeout_s) {
                KVR_LOG_ERROR("no LEAVE %.0f s after asking to be drained: stopping", t - n->t_stop);
                break;
            }
        }
        if (t - last_turn > 1.0 && n->last_coord < t) {
            /* This process did not run for a while (stopped, swapped out, a long pass):
             * the coordinator's silence over that time says nothing. What it sent waits
             * in the queue; judge it from now on. */
            KVR_LOG_WARN("this node did not run for %.1f s: judging the coordinator from now", t - last_turn);
            n->last_coord = t;
        }
        last_turn = t;
        double silent = t - n->last_coord;
        if (silent > n->p.coord_timeout_s) {
            KVR_LOG_ERROR("the coordinator has been silent for %.1f s: leaving", silent);
            return KVR_EUNAVAIL;
        }
        int busy = drain(n) > 0;
        if (n->leave) {
            leave_links(n);
            break;
        }
        if (n->shutdown)
            break;
        if (n->hello_due)
            send_hello(n);
        if (!n->hello_due && n->p.ops->work(n->p.ud))
            busy = 1;
        if (n->p.ops->flush)
            n->p.ops->flush(n->p.ud);
        if (n->out_head)
            busy |= outbox_flush(n) > 0;
        /* Right after a finish too (it follows the TOKENS message on the same ordered
         * channel), so that ClusterStatus never shows a finished request's blocks. */
        if (n->report_due || (kvr_clock_now() - n->last_report) * 1000.0 >= n->p.report_ms)
            report(n);
        kvr_xfer_progress(n->p.xfer);
        kvr_idle_turn(&idle, busy);
    }
    return KVR_OK;
}

void kvr_node_deinit(struct kvr_node *n, double flush_s) {
    double t_end = kvr_clock_now() + flush_s;
    while (n->out_head && outbox_flush(n) > 0 && kvr_clock_now() < t_end)
        kvr_sleep_ms(1);
    while (n->out_head) {
        struct node_outmsg *o = n->out_head;
        n->out_head = o->next;
        free(o);
    }
    n->out_tail = NULL;
    n->out_nbytes = 0;
}
