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
        default:
            n->p.ops->on_msg(n->p.ud, &m);
        }
        if (n->shutdown)
            break;
    }
    return cnt;
}

int kvr_node_run(struct kvr_node *n) {
    struct kvr_idle idle = {0};
    n->last_coord = kvr_clock_now();
    send_hello(n);
    double last_turn = kvr_clock_now();
    while (!n->shutdown && !*n->p.stop) {
        double t = kvr_clock_now();
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
