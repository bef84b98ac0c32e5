/* router.c - admission, placement, routing, deadlines, liveness (see router.h).
 * Owns every admitted request from coord_router_submit until its one finish call, and
 * the node table. The front ends' threads only touch the inbox, the cancel list and the
 * snapshots (status, limits), all under mu; everything else runs on the router's thread.
 *
 * Invariants:
 *  - every admitted request gets exactly one ops->finish call, at the latest when its
 *    hard deadline passes (min of the client's deadline and arrival + max age);
 *  - a decode node's reservation for a request is released only once the node was told
 *    to drop it (CANCEL sent, on the same ordered channel as every later SEQ_BEGIN) or
 *    it ended there (its finish event), or the node is dead: so placement never promises
 *    blocks a node still holds. */
#include "router.h"

#include <dirent.h>
#include <limits.h>
#include <unistd.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "idmap.h"
#include "kv_cache.h"
#include "log.h"
#include "msg.h"
#include "autoscale.h"
#include "request.h"
#include "status.h"

_Static_assert((int)COORD_FINISH_LENGTH == KVR_FINISH_LENGTH && (int)COORD_FINISH_STOP == KVR_FINISH_STOP &&
                   (int)COORD_FINISH_CONTEXT == KVR_FINISH_CONTEXT &&
                   (int)COORD_FINISH_CANCELLED == KVR_FINISH_CANCELLED &&
                   (int)COORD_FINISH_ERROR == KVR_FINISH_ERROR,
               "coord_finish mirrors kvr_finish");

#define ATTEMPT_BITS 4 /* wire id = id << ATTEMPT_BITS | try: every placement is a new sequence, so
                        * late messages of an abandoned one never match the next */
#define MAX_DRAIN_PER_TURN 100000   /* messages read before the rest of a turn runs */
#define STALL_S 1.0                 /* a turn this late means the router itself stalled */
#define REAP_EVERY_S 0.01
#define MSG_LEN 256

enum creq_state { CR_WAITING, CR_PREFILL, CR_DECODE };

struct creq {
    uint64_t id;
    uint64_t wire_id;
    int attempt;             /* re-runs after a node died (bounded by max_retries) */
    unsigned wire_seq;       /* wire ids used so far: each placement try gets a new one */
    struct coord_request r;  /* r.tokens owned */
    enum creq_state state;
    int prefill_rank, decode_rank;
    int64_t reserved_blocks; /* on decode_rank */
    int n_sent;              /* tokens delivered to the stream (all attempts) */
    int n_skip;              /* tokens of this attempt already delivered by an earlier one */
    int n_seen;              /* tokens of this attempt seen */
    int prefill_open;        /* its prompt tokens count in its prefill node's inflight_tokens */
    int slot;                /* index in waiting or active */
    int end_by_age;          /* t_end is the server's maximum age, not the client's deadline */
    double t_queued;         /* when it (re-)entered the queue: the queue deadline counts from here */
    double t_end;            /* it ends by then, whatever happens */
    double t_prefill_done;   /* this attempt's PREFILL_DONE (0: not yet) */
    double t_dispatch, t_first, t_last;
    struct creq *next;       /* inbox link */
};

enum node_state { NODE_UP, NODE_DEAD };

/* Where a node is in the elastic pool's life (orthogonal to liveness). Only SERVING
 * nodes take placements. Checklist: phase_name() too. */
enum node_phase {
    PH_SERVING,  /* takes placements */
    PH_JOINING,  /* spawned: HELLO, then links to every prefill node */
    PH_DRAINING, /* no new placements; its requests finish (or re-run after --drain-timeout) */
    PH_LEAVING,  /* empty: prefill nodes said BYE, waiting for its own BYE */
    PH_PARKED,   /* drained node of the job's own ranks (cannot leave the job): idle, kept
                  * for the next scale-up */
    PH_LEFT,     /* gone for good (disconnected, or its join failed) */
};

static const char *phase_name(int ph) {
    static const char *const names[] = {"serving", "joining", "draining", "leaving", "parked", "left"};
    return ph >= 0 && ph <= PH_LEFT ? names[ph] : "?";
}

struct cnode {
    int rank;
    int role;
    enum node_state state;
    int bad_hello;            /* its HELLO did not parse: never used */
    struct kvr_hello h;
    struct kvr_node_report rep;
    double last_seen;
    int64_t reserved_blocks;  /* decode: blocks promised to placed requests */
    uint64_t inflight_tokens; /* prefill: prompt tokens sent and not yet done */
    uint64_t begin_no;        /* decode: SEQ_BEGINs sent to it */
    uint32_t epoch;           /* of the last RESET sent */
    int reset_pending;        /* a RESET went out; its HELLO has not come back */
    double t_reset;
    int phase;                /* enum node_phase */
    int spawned;              /* joined the running cluster (it can leave the job) */
    double t_decision;        /* when the scale-up that made it was decided */
    double t_spawned, t_hello, t_serving, t_drain, t_leave;
    char *port;               /* joining: its MPI port (LINK_PORT) */
    int *links;               /* (n_links) prefill ranks that link to it, in order */
    int n_links, link_i;
};

/* A CANCEL that could not be sent yet; it holds the blocks it will release. */
struct pending_cancel {
    struct pending_cancel *next;
    int rank;
    uint64_t wire_id;
    int64_t blocks;
};

struct coord_router {
    struct coord_router_params p;
    double (*now)(void);
    struct cnode **nodes;     /* (n_nodes) every node ever heard of, in order of arrival */
    int n_nodes, cap_nodes;
    struct kvr_idmap by_rank; /* rank + 1 -> struct cnode */
    int seq_len, vocab;
    uint64_t fingerprint;
    int ready;                /* wait_nodes succeeded */
    unsigned char *sbuf;      /* scratch for messages being sent */
    size_t scap;

    pthread_mutex_t mu;       /* guards the fields down to `limits` */
    struct creq *inbox, *inbox_tail;
    uint64_t *cancels;
    int n_cancels, cap_cancels;
    int n_admitted;           /* inbox + waiting: what queue_max bounds */
    uint64_t next_id;
    int stopping;
    int serving;              /* nodes are up */
    struct coord_cluster_status snap;
    struct coord_limits limits;

    struct creq **waiting;    /* FIFO, router thread */
    int n_waiting, cap_waiting;
    struct creq **active;     /* at a prefill or decode node, any order */
    int n_active, cap_active;
    struct kvr_idmap by_wire; /* wire id -> active request */
    struct kvr_idmap by_id;   /* id -> waiting or active request */
    struct pending_cancel *pcancel;
    double last_snap, last_ping, last_turn, last_reap;
    struct kvr_tok_event *events; /* (KVR_TOKENS_MAX_EVENTS) parse target */
    struct coord_router_counters cnt;

    /* The elastic pool (issue 14). desired: decode nodes the pool moves to (SERVING +
     * JOINING), set by the autoscaler or a Scale call. */
    int desired;
    struct coord_autoscale as;
    double last_scale_turn;
    double ttft_ema_ms, tpot_ema_ms, t_last_finish;
    char last_decision[256];
    double t_spawn_retry;
    double last_join_scan;
    const char *desired_by;   /* who set desired last: "autoscaler", "Scale", "Drain", "start" */
    int scale_req;            /* under mu: a Scale call's target, -1 none */
    int *drain_reqs;          /* under mu: ranks to drain */
    int n_drain_reqs, cap_drain_reqs;
};

static double now(const struct coord_router *r) { return r->now(); }

static struct cnode *node_of(const struct coord_router *r, int rank) {
    return rank < 0 ? NULL : kvr_idmap_get(&r->by_rank, (uint64_t)rank + 1);
}

static int node_usable(const struct cnode *n) {
    return n && n->state == NODE_UP && !n->bad_hello && n->h.setup_status == KVR_OK;
}

/* Takes new placements (a decode node that is not joining, draining, leaving or parked). */
static int node_placeable(const struct cnode *n) { return node_usable(n) && n->phase == PH_SERVING; }

static struct coord_node_limits limits_of(const struct cnode *n) {
    return (struct coord_node_limits){.rank = n->rank, .role = n->h.role, .colocated = n->h.colocated,
                                      .block_tokens = n->h.block_tokens, .n_blocks = n->h.n_blocks_total,
                                      .max_batch_tokens = n->h.max_batch_tokens, .n_ctx_max = n->h.n_ctx_max};
}

/* ---- lifetime -------------------------------------------------------------------- */

int coord_router_create(const struct coord_router_params *p, struct coord_router **out) {
    *out = NULL;
    if (!p->ops || !p->tp.poll || !p->tp.send || !p->tp.mark_dead || !p->tp.mark_alive || p->queue_max < 1 ||
        !(p->node_timeout_s > 0) || !(p->queue_timeout_s > 0) || !(p->max_request_age_s > 0) ||
        p->max_retries < 0 || p->max_retries >= (1 << ATTEMPT_BITS) ||
        (p->autoscale && (p->decode_min < 1 || p->decode_max < p->decode_min)))
        return KVR_EINVAL;
    struct coord_router *r = calloc(1, sizeof *r);
    if (!r)
        return KVR_ENOMEM;
    r->p = *p;
    r->now = p->now ? p->now : kvr_clock_now;
    r->scale_req = -1;
    r->desired = -1;
    r->desired_by = "start";
    if (p->autoscale)
        coord_autoscale_init(&r->as, &p->as);
    r->events = malloc(KVR_TOKENS_MAX_EVENTS * sizeof *r->events);
    if (!r->events) {
        free(r);
        return KVR_ENOMEM;
    }
    pthread_mutex_init(&r->mu, NULL);
    *out = r;
    return KVR_OK;
}

static void creq_free(struct creq *q) {
    if (q) {
        free(q->r.tokens);
        free(q);
    }
}

void coord_router_free(struct coord_router *r) {
    if (!r)
        return;
    for (struct creq *q = r->inbox; q;) {
        struct creq *nx = q->next;
        creq_free(q);
        q = nx;
    }
    for (int i = 0; i < r->n_waiting; i++)
        creq_free(r->waiting[i]);
    for (int i = 0; i < r->n_active; i++)
        creq_free(r->active[i]);
    while (r->pcancel) {
        struct pending_cancel *c = r->pcancel;
        r->pcancel = c->next;
        free(c);
    }
    for (int i = 0; i < r->n_nodes; i++) {
        free(r->nodes[i]->links);
        free(r->nodes[i]->port);
        free(r->nodes[i]);
    }
    free(r->nodes);
    kvr_idmap_deinit(&r->by_rank);
    kvr_idmap_deinit(&r->by_wire);
    kvr_idmap_deinit(&r->by_id);
    free(r->waiting);
    free(r->active);
    free(r->cancels);
    free(r->drain_reqs);
    free(r->events);
    free(r->sbuf);
    coord_cluster_status_deinit(&r->snap);
    coord_limits_deinit(&r->limits);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

void coord_router_counters(const struct coord_router *r, struct coord_router_counters *out) {
    *out = r->cnt;
    out->cancels_pending = 0;
    for (const struct pending_cancel *c = r->pcancel; c; c = c->next)
        out->cancels_pending++;
}

/* ---- the front ends' side ----------------------------------------------------------- */

int coord_router_submit(struct coord_router *r, struct coord_request *req, uint64_t *id) {
    struct creq *q = calloc(1, sizeof *q);
    if (!q) {
        free(req->tokens);
        req->tokens = NULL;
        return KVR_ENOMEM;
    }
    q->r = *req;
    req->tokens = NULL; /* ours now */
    pthread_mutex_lock(&r->mu);
    int rc = KVR_OK;
    if (r->stopping || !r->serving)
        rc = KVR_EUNAVAIL;
    else if (r->n_admitted >= r->p.queue_max)
        rc = KVR_EFULL;
    if (rc == KVR_OK) {
        q->id = ++r->next_id;
        q->wire_id = q->id << ATTEMPT_BITS;
        q->decode_rank = q->prefill_rank = -1;
        if (r->inbox_tail)
            r->inbox_tail->next = q;
        else
            r->inbox = q;
        r->inbox_tail = q;
        r->n_admitted++;
        *id = q->id;
    }
    pthread_mutex_unlock(&r->mu);
    if (rc != KVR_OK)
        creq_free(q);
    return rc;
}

void coord_router_cancel(struct coord_router *r, uint64_t id) {
    pthread_mutex_lock(&r->mu);
    if (r->n_cancels == r->cap_cancels) {
        int cap = r->cap_cancels ? 2 * r->cap_cancels : 64;
        uint64_t *c = realloc(r->cancels, (size_t)cap * sizeof *c);
        if (c) {
            r->cancels = c;
            r->cap_cancels = cap;
        }
    }
    if (r->n_cancels < r->cap_cancels)
        r->cancels[r->n_cancels++] = id;
    else /* the request still ends by its deadline or the maximum age */
        KVR_LOG_ERROR("req=%llu cancel dropped: out of memory", (unsigned long long)id);
    pthread_mutex_unlock(&r->mu);
}

/* An owned copy of n rows of size bytes each (NULL for none); *n becomes 0 when out of
 * memory. */
static int copy_rows(void **dst, const void *src, int *n, size_t size) {
    *dst = NULL;
    if (*n <= 0)
        return KVR_OK;
    if (!(*dst = malloc((size_t)*n * size))) {
        *n = 0;
        return KVR_ENOMEM;
    }
    memcpy(*dst, src, (size_t)*n * size);
    return KVR_OK;
}

int coord_router_status(struct coord_router *r, struct coord_cluster_status *out) {
    pthread_mutex_lock(&r->mu);
    *out = r->snap;
    void *rows;
    int rc = copy_rows(&rows, r->snap.nodes, &out->n_nodes, sizeof *out->nodes);
    out->nodes = rows;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int coord_router_limits(struct coord_router *r, struct coord_limits *out) {
    pthread_mutex_lock(&r->mu);
    *out = r->limits;
    void *rows;
    int rc = copy_rows(&rows, r->limits.nodes, &out->n_nodes, sizeof *out->nodes);
    out->nodes = rows;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

/* ---- sending ------------------------------------------------------------------------- */

static unsigned char *scratch(struct coord_router *r, size_t len) {
    if (len > r->scap) {
        unsigned char *b = realloc(r->sbuf, len);
        if (!b)
            return NULL;
        r->sbuf = b;
        r->scap = len;
    }
    return r->sbuf;
}

static int tx(struct coord_router *r, int dst, const unsigned char *b, size_t len) {
    return r->p.tp.send(r->p.tp.ctx, dst, KVR_TAG_CTRL, b, len);
}

static int tx_req(struct coord_router *r, int dst, int kind, const struct kvr_req_params *p, const int *prompt) {
    struct kvr_wbuf m = {0};
    kvr_msg_write_req(&m, kind, p, prompt);
    unsigned char *b = scratch(r, m.len);
    if (!b)
        return KVR_ENOMEM;
    struct kvr_wbuf w = {.p = b, .cap = m.len};
    kvr_msg_write_req(&w, kind, p, prompt);
    return tx(r, dst, b, w.len);
}

static int tx_empty(struct coord_router *r, int dst, int kind, uint64_t req_id) {
    unsigned char b[KVR_MSG_HDR_NBYTES];
    struct kvr_wbuf w = {.p = b, .cap = sizeof b};
    kvr_msg_write_empty(&w, kind, req_id);
    return tx(r, dst, b, w.len);
}

static int tx_reset(struct coord_router *r, int dst, uint32_t epoch) {
    unsigned char b[KVR_MSG_HDR_NBYTES + 4];
    struct kvr_wbuf w = {.p = b, .cap = sizeof b};
    kvr_msg_write_reset(&w, epoch);
    return tx(r, dst, b, w.len);
}

/* ---- reservations and cancels -------------------------------------------------------- */

static void release_blocks(struct coord_router *r, int rank, int64_t blocks) {
    struct cnode *n = node_of(r, rank);
    if (n && blocks > 0)
        n->reserved_blocks -= blocks < n->reserved_blocks ? blocks : n->reserved_blocks;
}

/* The prompt left its prefill node (done, failed or abandoned): stop counting it there. */
static void close_prefill(struct coord_router *r, struct creq *q) {
    struct cnode *pf = node_of(r, q->prefill_rank);
    if (q->prefill_open && pf)
        pf->inflight_tokens -= pf->inflight_tokens >= (uint64_t)q->r.n_tokens ? (uint64_t)q->r.n_tokens
                                                                               : pf->inflight_tokens;
    q->prefill_open = 0;
}

/* Tells rank to drop wire_id; the blocks it holds for it are released once that is sent
 * (at once when it was, later by the retry, or when the node is declared dead). */
static void cancel_at(struct coord_router *r, int rank, uint64_t wire_id, int64_t blocks) {
    struct cnode *n = node_of(r, rank);
    int rc = n && n->state == NODE_UP ? tx_empty(r, rank, KVR_MSG_CANCEL, wire_id) : KVR_EUNAVAIL;
    if (rc == KVR_OK || rc == KVR_EUNAVAIL || rc == KVR_EINVAL) {
        release_blocks(r, rank, blocks);
        return;
    }
    struct pending_cancel *c = calloc(1, sizeof *c);
    if (!c) {
        /* Keep the blocks reserved: better an idle block than a promise the node breaks. */
        KVR_LOG_ERROR("req wire=%llu: cannot send or queue a CANCEL to rank %d", (unsigned long long)wire_id, rank);
        return;
    }
    KVR_LOG_WARN("req wire=%llu: CANCEL to rank %d failed (%s); retrying", (unsigned long long)wire_id, rank,
                 kvr_status_str(rc));
    *c = (struct pending_cancel){.next = r->pcancel, .rank = rank, .wire_id = wire_id, .blocks = blocks};
    r->pcancel = c;
}

static int retry_cancels(struct coord_router *r) {
    int did = 0;
    struct pending_cancel **pp = &r->pcancel;
    while (*pp) {
        struct pending_cancel *c = *pp;
        struct cnode *n = node_of(r, c->rank);
        int rc = n && n->state == NODE_UP ? tx_empty(r, c->rank, KVR_MSG_CANCEL, c->wire_id) : KVR_EUNAVAIL;
        if (rc == KVR_OK || rc == KVR_EUNAVAIL || rc == KVR_EINVAL) {
            release_blocks(r, c->rank, c->blocks);
            *pp = c->next;
            free(c);
            did = 1;
        } else {
            pp = &c->next;
        }
    }
    return did;
}

/* Drops q at its nodes (the decode node frees its blocks, the prefill node its queued
 * prompt) and releases what it holds. */
static void abandon(struct coord_router *r, struct creq *q) {
    if (q->state == CR_WAITING)
        return;
    if (q->state == CR_PREFILL && q->prefill_rank != q->decode_rank)
        cancel_at(r, q->prefill_rank, q->wire_id, 0);
    close_prefill(r, q);
    cancel_at(r, q->decode_rank, q->wire_id, q->reserved_blocks);
    q->reserved_blocks = 0;
}

/* ---- queues ---------------------------------------------------------------------------- */

static int grow(struct creq ***arr, int *cap, int n) {
    if (n < *cap)
        return KVR_OK;
    int c = *cap ? 2 * *cap : 64;
    struct creq **a = realloc(*arr, (size_t)c * sizeof *a);
    if (!a)
        return KVR_ENOMEM;
    *arr = a;
    *cap = c;
    return KVR_OK;
}

static int waiting_push(struct coord_router *r, struct creq *q, int front) {
    if (grow(&r->waiting, &r->cap_waiting, r->n_waiting) != KVR_OK)
        return KVR_ENOMEM;
    if (front) {
        memmove(r->waiting + 1, r->waiting, (size_t)r->n_waiting * sizeof *r->waiting);
        r->waiting[0] = q;
    } else {
        r->waiting[r->n_waiting] = q;
    }
    r->n_waiting++;
    q->state = CR_WAITING;
    pthread_mutex_lock(&r->mu);
    r->n_admitted++;
    pthread_mutex_unlock(&r->mu);
    return KVR_OK;
}

static void waiting_remove(struct coord_router *r, int i) {
    memmove(r->waiting + i, r->waiting + i + 1, (size_t)(r->n_waiting - i - 1) * sizeof *r->waiting);
    r->n_waiting--;
    pthread_mutex_lock(&r->mu);
    r->n_admitted--;
    pthread_mutex_unlock(&r->mu);
}

static int active_add(struct coord_router *r, struct creq *q) {
    if (grow(&r->active, &r->cap_active, r->n_active) != KVR_OK ||
        kvr_idmap_put(&r->by_wire, q->wire_id, q) != KVR_OK)
        return KVR_ENOMEM;
    q->slot = r->n_active;
    r->active[r->n_active++] = q;
    return KVR_OK;
}

static void active_remove(struct coord_router *r, struct creq *q) {
    kvr_idmap_del(&r->by_wire, q->wire_id);
    struct creq *last = r->active[--r->n_active];
    r->active[q->slot] = last;
    last->slot = q->slot;
}

/* ---- finishing -------------------------------------------------------------------------- */

/* The one finish call of q, which must be in no queue any more. */
static void finish(struct coord_router *r, struct creq *q, int status, enum coord_finish reason, const char *msg) {
    double t = now(r);
    kvr_idmap_del(&r->by_id, q->id);
    release_blocks(r, q->decode_rank, q->reserved_blocks);
    q->reserved_blocks = 0;
    close_prefill(r, q);
    double tpot = q->n_sent > 1 ? (q->t_last - q->t_first) * 1000.0 / (q->n_sent - 1) : 0.0;
    struct coord_usage u = {
        .prompt_tokens = q->r.n_tokens,
        .generated_tokens = q->n_sent,
        .queue_ms = q->t_dispatch > 0 ? (q->t_dispatch - q->r.t_arrival) * 1000.0 : (t - q->r.t_arrival) * 1000.0,
        .ttft_ms = q->t_first > 0 ? (q->t_first - q->r.t_arrival) * 1000.0 : 0.0,
        .tpot_ms = tpot,
        .total_ms = (t - q->r.t_arrival) * 1000.0,
        .prefill_rank = q->prefill_rank,
        .decode_rank = q->decode_rank};
    if (q->t_first > 0) {
        /* Recent latency for the autoscaler: an exponential mean over finished requests. */
        r->ttft_ema_ms = r->t_last_finish > 0 ? 0.8 * r->ttft_ema_ms + 0.2 * u.ttft_ms : u.ttft_ms;
        r->tpot_ema_ms = r->t_last_finish > 0 ? 0.8 * r->tpot_ema_ms + 0.2 * u.tpot_ms : u.tpot_ms;
        r->t_last_finish = t;
    }
    if (status != KVR_OK)
        KVR_LOG_WARN("req=%llu ends with %s: %s", (unsigned long long)q->id, kvr_status_name(status), msg);
    else
        KVR_LOG_DEBUG("req=%llu done: %d tokens, reason %d", (unsigned long long)q->id, q->n_sent, reason);
    r->p.ops->finish(q->r.stream, status, reason, &u, msg);
    r->cnt.finished++;
    creq_free(q);
}

static void finish_waiting(struct coord_router *r, int i, int status, enum coord_finish reason, const char *msg) {
    struct creq *q = r->waiting[i];
    waiting_remove(r, i);
    finish(r, q, status, reason, msg);
}

/* Ends an active request: its nodes are told to drop it, then the stream hears. */
static void finish_active(struct coord_router *r, struct creq *q, int status, enum coord_finish reason,
                          const char *msg) {
    active_remove(r, q);
    abandon(r, q);
    finish(r, q, status, reason, msg);
}

/* What a node's failure becomes at the edge: never the client's INVALID_ARGUMENT (the edge
 * admitted the request, so a node refusing it is the cluster's fault). */
static int node_failure_status(int status) {
    switch (status) {
    case KVR_EUNAVAIL:
    case KVR_EMPI:
        return KVR_EUNAVAIL;
    case KVR_ENOSPC:
    case KVR_ENOMEM:
    case KVR_EFULL:
    case KVR_EABORTED:
        return KVR_EABORTED;
    case KVR_ECHECKSUM:
    case KVR_EFORMAT:
    case KVR_ETRUNC:
    case KVR_EMAGIC:
    case KVR_EVERSION:
    case KVR_ELENGTH:
    case KVR_EOVERFLOW:
    case KVR_ECOMPRESS:
        return status; /* DATA_LOSS: a KV transfer arrived corrupt */
    case KVR_EDEADLINE:
        return KVR_EDEADLINE;
    default:
        return KVR_EINTERNAL;
    }
}

/* "decode node rank 3: <its reason>" as one line. */
static void node_reason(char *out, size_t len, const char *role, int rank, int status, const char *reason,
                        int reason_len) {
    char line[KVR_REASON_MAX + 1];
    kvr_reason_line(line, sizeof line, reason, reason ? (size_t)reason_len : 0);
    snprintf(out, len, "%s node rank %d: %s", role, rank, line[0] ? line : kvr_status_str(status));
}

/* ---- placement ---------------------------------------------------------------------------- */

static void new_wire_id(struct creq *q) {
    q->wire_seq++;
    q->wire_id = (q->id << ATTEMPT_BITS) | (uint64_t)(q->wire_seq & ((1u << ATTEMPT_BITS) - 1));
}

static int colocated_mode(const struct coord_router *r) {
    for (int i = 0; i < r->n_nodes; i++)
        if (r->nodes[i]->h.role == KVR_ROLE_PREFILL && node_usable(r->nodes[i]))
            return 0;
    return 1;
}

/* Places the head of the queue if it fits. Returns 1 placed, 0 must wait, -1 finished it. */
static int place_head(struct coord_router *r) {
    struct creq *q = r->waiting[0];
    struct cnode *best = NULL;
    int64_t best_avail = -1, best_need = 0, need_min = -1, biggest = 0;
    int fits_somewhere = 0, any_decode = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *d = r->nodes[i];
        if (!node_usable(d) || d->h.role != KVR_ROLE_DECODE || d->phase == PH_LEFT || d->phase == PH_LEAVING)
            continue;
        any_decode = 1;
        if (!node_placeable(d)) {
            fits_somewhere = 1; /* a joining or draining node: wait rather than refuse */
            continue;
        }
        struct coord_node_limits lim = limits_of(d);
        int64_t need = coord_request_blocks(&q->r, &lim);
        if (need_min < 0 || need < need_min)
            need_min = need;
        if (d->h.n_blocks_total > biggest)
            biggest = d->h.n_blocks_total;
        if (!coord_request_fits_decode(&q->r, &lim))
            continue;
        fits_somewhere = 1;
        int64_t avail = (int64_t)d->h.n_blocks_total - d->reserved_blocks;
        if (need <= avail && avail > best_avail) {
            best = d;
            best_avail = avail;
            best_need = need;
        }
    }
    char msg[MSG_LEN];
    if (!any_decode) {
        finish_waiting(r, 0, KVR_EUNAVAIL, COORD_FINISH_ERROR, "no decode node is alive");
        return -1;
    }
    if (!fits_somewhere) {
        /* The node that could hold it died since it was admitted. */
        snprintf(msg, sizeof msg, "the request needs %lld KV blocks; the largest live decode node holds %lld",
                 (long long)need_min, (long long)biggest);
        finish_waiting(r, 0, KVR_ENOSPC, COORD_FINISH_ERROR, msg);
        return -1;
    }
    if (!best)
        return 0;
    struct cnode *pf = NULL;
    if (colocated_mode(r)) {
        if (!best->h.colocated) {
            finish_waiting(r, 0, KVR_EUNAVAIL, COORD_FINISH_ERROR, "no prefill node is alive");
            return -1;
        }
        pf = best;
    } else {
        for (int i = 0; i < r->n_nodes; i++) {
            struct cnode *n = r->nodes[i];
            if (!node_usable(n) || n->h.role != KVR_ROLE_PREFILL)
                continue;
            struct coord_node_limits lim = limits_of(n);
            if (coord_request_fits_prefill(&q->r, &lim) && (!pf || n->inflight_tokens < pf->inflight_tokens))
                pf = n;
        }
        if (!pf)
            return 0;
    }
    double t = now(r);
    struct kvr_req_params p = {.req_id = q->wire_id, .begin_no = best->begin_no + 1, .n_prompt = q->r.n_tokens,
                               .max_tokens = q->r.max_tokens, .temperature = q->r.temperature,
                               .top_p = q->r.top_p, .seed = q->r.seed, .stop_at_eos = q->r.stop_at_eos,
                               .policy = q->r.policy, .prefill_rank = pf->rank, .decode_rank = best->rank,
                               .t_coord_ms = t * 1000.0};
    /* The decode node hears of the request first, from us, on the channel its cancel will
     * take; then the prefill node gets the prompt. */
    int rc = tx_req(r, best->rank, KVR_MSG_SEQ_BEGIN, &p, q->r.tokens);
    if (rc != KVR_OK) {
        KVR_LOG_WARN("req=%llu SEQ_BEGIN to rank %d failed (%s); it waits", (unsigned long long)q->id, best->rank,
                     kvr_status_str(rc));
        return 0;
    }
    best->begin_no++;
    if (pf != best && (rc = tx_req(r, pf->rank, KVR_MSG_PREFILL_REQ, &p, q->r.tokens)) != KVR_OK) {
        KVR_LOG_WARN("req=%llu PREFILL_REQ to rank %d failed (%s); it waits", (unsigned long long)q->id, pf->rank,
                     kvr_status_str(rc));
        cancel_at(r, best->rank, q->wire_id, 0);
        new_wire_id(q); /* the decode node may still answer for this wire id */
        return 0;
    }
    if (active_add(r, q) != KVR_OK) {
        cancel_at(r, best->rank, q->wire_id, 0);
        if (pf != best)
            cancel_at(r, pf->rank, q->wire_id, 0);
        finish_waiting(r, 0, KVR_ENOMEM, COORD_FINISH_ERROR, "coordinator out of memory");
        return -1;
    }
    waiting_remove(r, 0);
    q->state = CR_PREFILL;
    q->prefill_rank = pf->rank;
    q->decode_rank = best->rank;
    q->reserved_blocks = best_need;
    q->t_prefill_done = 0;
    best->reserved_blocks += best_need;
    pf->inflight_tokens += (uint64_t)q->r.n_tokens;
    q->prefill_open = 1;
    if (q->t_dispatch == 0)
        q->t_dispatch = t;
    KVR_LOG_DEBUG("req=%llu placed: prefill rank %d, decode rank %d, %lld blocks", (unsigned long long)q->id,
                  pf->rank, best->rank, (long long)best_need);
    return 1;
}

static int dispatch(struct coord_router *r) {
    int did = 0;
    while (r->n_waiting > 0) {
        int rc = place_head(r);
        if (rc == 0)
            break;
        did = 1;
    }
    return did;
}

/* ---- the reaper: every deadline, enforced here ------------------------------------------- */

static void deadline_msg(const struct coord_router *r, const struct creq *q, char *msg, size_t len) {
    if (q->end_by_age)
        snprintf(msg, len, "the request outlived the server's maximum request age of %.0f s", r->p.max_request_age_s);
    else
        snprintf(msg, len, "the request's deadline passed");
}

static int reap(struct coord_router *r) {
    double t = now(r);
    int did = 0;
    char msg[MSG_LEN];
    for (int i = 0; i < r->n_waiting;) {
        struct creq *q = r->waiting[i];
        if (t >= q->t_end) {
            deadline_msg(r, q, msg, sizeof msg);
            finish_waiting(r, i, KVR_EDEADLINE, COORD_FINISH_ERROR, msg);
            r->cnt.reaped++;
            did = 1;
        } else if (t - q->t_queued > r->p.queue_timeout_s) {
            snprintf(msg, sizeof msg, "no decode node had room for the KV cache within %.1f s", r->p.queue_timeout_s);
            finish_waiting(r, i, KVR_ETIMEDOUT, COORD_FINISH_ERROR, msg);
            did = 1;
        } else {
            i++;
        }
    }
    for (int i = 0; i < r->n_active;) {
        struct creq *q = r->active[i];
        if (t >= q->t_end) {
            deadline_msg(r, q, msg, sizeof msg);
            finish_active(r, q, KVR_EDEADLINE, COORD_FINISH_ERROR, msg);
            r->cnt.reaped++;
            did = 1;
            continue; /* active[i] is another request now */
        }
        /* The prefill node handed the sequence over, the decode node is alive, yet no token
         * came: a message between them was lost. Do not wait for the deadline. */
        if (q->state == CR_DECODE && q->n_seen == 0 && q->t_prefill_done > 0 &&
            t - q->t_prefill_done > r->p.node_timeout_s) {
            snprintf(msg, sizeof msg, "decode node rank %d produced no token %.1f s after the prefill finished",
                     q->decode_rank, t - q->t_prefill_done);
            finish_active(r, q, KVR_EABORTED, COORD_FINISH_ERROR, msg);
            r->cnt.watchdog++;
            did = 1;
            continue;
        }
        i++;
    }
    return did;
}

/* ---- messages ---------------------------------------------------------------------------- */

static void on_tokens(struct coord_router *r, const struct kvr_msg *m) {
    int n = 0;
    if (kvr_msg_parse_tokens(m, r->events, KVR_TOKENS_MAX_EVENTS, &n) != KVR_OK)
        return;
    double t = now(r);
    for (int e = 0; e < n; e++) {
        const struct kvr_tok_event *ev = &r->events[e];
        struct creq *q = kvr_idmap_get(&r->by_wire, ev->req_id);
        if (!q || q->decode_rank != m->src)
            continue; /* an attempt we gave up on, or already finished */
        if (ev->token >= 0) {
            if (q->state == CR_PREFILL) {
                /* Its first token can overtake its PREFILL_DONE: the prompt left the
                 * prefill node either way. */
                close_prefill(r, q);
                q->state = CR_DECODE;
            }
            q->n_seen++;
            if (q->n_seen > q->n_skip) {
                r->p.ops->tokens(q->r.stream, &ev->token, 1);
                q->n_sent++;
                if (q->t_first == 0)
                    q->t_first = t;
                q->t_last = t;
            }
        }
        if (ev->finish == KVR_FINISH_NONE)
            continue;
        /* The decode node ended it: its blocks are free there already. */
        release_blocks(r, q->decode_rank, q->reserved_blocks);
        q->reserved_blocks = 0;
        char msg[MSG_LEN] = "ok";
        int status = KVR_OK;
        enum coord_finish reason = (enum coord_finish)ev->finish;
        if (ev->status != KVR_OK) {
            status = node_failure_status(ev->status);
            node_reason(msg, sizeof msg, "decode", m->src, ev->status, ev->reason, ev->reason_len);
        } else if (ev->finish == KVR_FINISH_CANCELLED || ev->finish == KVR_FINISH_ERROR) {
            /* A cancel we did not ask for (ours end the request here first). */
            status = KVR_EABORTED;
            snprintf(msg, sizeof msg, "decode node rank %d dropped the request", m->src);
        }
        if (status != KVR_OK)
            reason = COORD_FINISH_ERROR;
        active_remove(r, q);
        if (q->state == CR_PREFILL && q->prefill_rank != q->decode_rank)
            cancel_at(r, q->prefill_rank, q->wire_id, 0); /* its prompt may still wait there */
        finish(r, q, status, reason, msg);
    }
}

static void on_prefill_done(struct coord_router *r, const struct kvr_msg *m) {
    struct kvr_prefill_done d;
    if (kvr_msg_parse_prefill_done(m, &d) != KVR_OK)
        return;
    struct creq *q = kvr_idmap_get(&r->by_wire, m->req_id);
    if (!q || q->prefill_rank != m->src)
        return; /* finished or re-run already */
    close_prefill(r, q);
    if (d.status == KVR_OK) {
        if (q->state == CR_PREFILL)
            q->state = CR_DECODE; /* the decode node owns it now (its finish event ends it) */
        q->t_prefill_done = now(r);
        return;
    }
    char msg[MSG_LEN];
    node_reason(msg, sizeof msg, "prefill", m->src, d.status, d.reason, d.reason_len);
    finish_active(r, q, node_failure_status(d.status), COORD_FINISH_ERROR, msg);
}

static void on_status(struct coord_router *r, struct cnode *n, const struct kvr_msg *m) {
    (void)r;
    struct kvr_node_report rep;
    if (kvr_msg_parse_status(m, &rep) == KVR_OK)
        n->rep = rep;
}

static void set_dirty(struct coord_router *r) { r->last_snap = -1e300; }

/* A node that may serve alongside the others: same model, set up. why: one line. */
static int node_consistent(const struct coord_router *r, const struct kvr_hello *h, char *why, size_t len) {
    if (h->setup_status != KVR_OK) {
        snprintf(why, len, "it failed to set up: %s", kvr_status_str(h->setup_status));
        return 0;
    }
    if (r->ready && (h->fingerprint != r->fingerprint || h->seq_len != r->seq_len || h->vocab_size != r->vocab)) {
        snprintf(why, len, "it serves another model (fingerprint %016llx, context %d, vocab %d)",
                 (unsigned long long)h->fingerprint, h->seq_len, h->vocab_size);
        return 0;
    }
    if (h->kv_type != r->p.kv_type) {
        snprintf(why, len, "it stores its KV cache as %s, the cluster as %s (--kv-type)", kvr_kv_type_name(h->kv_type),
                 kvr_kv_type_name(r->p.kv_type));
        return 0;
    }
    return 1;
}

static struct cnode *node_add(struct coord_router *r, int rank) {
    struct cnode *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    if (r->n_nodes == r->cap_nodes) {
        int cap = r->cap_nodes ? 2 * r->cap_nodes : 16;
        struct cnode **a = realloc(r->nodes, (size_t)cap * sizeof *a);
        if (!a) {
            free(n);
            return NULL;
        }
        r->nodes = a;
        r->cap_nodes = cap;
    }
    if (kvr_idmap_put(&r->by_rank, (uint64_t)rank + 1, n) != KVR_OK) {
        free(n);
        return NULL;
    }
    n->rank = rank;
    r->nodes[r->n_nodes++] = n;
    return n;
}

static void tell_to_leave(struct coord_router *r, struct cnode *n, const char *why) {
    KVR_LOG_ERROR("rank %d cannot serve in this cluster (%s): telling it to shut down", n->rank, why);
    r->p.tp.mark_alive(r->p.tp.ctx, n->rank);
    tx_empty(r, n->rank, KVR_MSG_SHUTDOWN, 0);
    r->p.tp.mark_dead(r->p.tp.ctx, n->rank);
    n->state = NODE_DEAD;
    n->reset_pending = 0;
}

static void on_hello(struct coord_router *r, struct cnode *n, const struct kvr_msg *m) {
    struct kvr_hello h;
    char why[160];
    if (kvr_msg_parse_hello(m, &h) != KVR_OK) {
        if (!n && !(n = node_add(r, m->src)))
            return;
        n->bad_hello = 1;
        n->last_seen = now(r);
        if (r->ready)
            tell_to_leave(r, n, "its HELLO is malformed");
        return;
    }
    if (!n) {
        /* A node we did not know: the job's start-up, or one that joins a running cluster. */
        if (!(n = node_add(r, m->src)))
            return;
        n->h = h;
        n->role = h.role;
        n->last_seen = now(r);
        if (r->ready && !node_consistent(r, &h, why, sizeof why)) {
            tell_to_leave(r, n, why);
            return;
        }
        n->state = NODE_UP;
        if (r->ready)
            KVR_LOG_WARN("rank %d (%s on %s) joined", n->rank, kvr_role_name(h.role), h.host);
        if (r->ready && h.role == KVR_ROLE_DECODE && r->desired >= 0)
            r->desired++; /* a node someone added: the pool's target grows with it */
        set_dirty(r);
        return;
    }
    if (n->state == NODE_DEAD) {
        if (!n->reset_pending || h.epoch != n->epoch)
            return; /* a HELLO from before our RESET */
        n->reset_pending = 0;
        if (!node_consistent(r, &h, why, sizeof why) || h.role != n->role) {
            tell_to_leave(r, n, why);
            return;
        }
        /* It dropped every request when it got the RESET (nothing of ours is on it), and the
         * HELLO says it is the same node with an empty pool: take it back. */
        n->h = h;
        n->state = NODE_UP;
        n->last_seen = now(r);
        n->reserved_blocks = 0;
        n->inflight_tokens = 0;
        memset(&n->rep, 0, sizeof n->rep);
        r->cnt.nodes_rejoined++;
        if (!r->p.autoscale && n->h.role == KVR_ROLE_DECODE && n->phase == PH_SERVING && r->desired >= 0)
            r->desired++;
        KVR_LOG_WARN("rank %d (%s on %s) is back after RESET epoch %u", n->rank, kvr_role_name(n->role), h.host,
                     h.epoch);
        set_dirty(r);
        return;
    }
    n->last_seen = now(r);
    if (h.epoch == n->epoch && node_consistent(r, &h, why, sizeof why) && h.role == n->role) {
        n->h = h; /* the same node saying the same again */
        set_dirty(r);
    }
}

/* A node declared dead spoke: take it back once it proves it dropped everything (RESET,
 * then a HELLO with the RESET's epoch); until then its messages mean nothing. */
static void spoke_again(struct coord_router *r, struct cnode *n) {
    double t = now(r);
    if (n->bad_hello || (n->reset_pending && t - n->t_reset < r->p.node_timeout_s))
        return;
    n->epoch++;
    n->reset_pending = 1;
    n->t_reset = t;
    r->p.tp.mark_alive(r->p.tp.ctx, n->rank);
    int rc = tx_reset(r, n->rank, n->epoch);
    if (rc != KVR_OK) {
        r->p.tp.mark_dead(r->p.tp.ctx, n->rank);
        KVR_LOG_ERROR("rank %d spoke again after being declared dead; cannot send it RESET: %s", n->rank,
                      kvr_status_str(rc));
        return;
    }
    r->cnt.resets_sent++;
    KVR_LOG_WARN("rank %d spoke again after being declared dead: RESET (epoch %u) to take it back", n->rank,
                 n->epoch);
}

static void on_link_msg(struct coord_router *r, struct cnode *n, const struct kvr_msg *m);
static void pool_counts(const struct coord_router *r, int *serving, int *joining, int *changing);
static void begin_drain(struct coord_router *r, struct cnode *n, const char *reason);
static int joining_hello(struct coord_router *r, struct cnode *n, const struct kvr_msg *m);

static void on_msg(struct coord_router *r, const struct kvr_msg *m) {
    struct cnode *n = node_of(r, m->src);
    if (n && n->phase == PH_LEFT)
        return;
    if (m->kind == KVR_MSG_HELLO && n && n->phase == PH_JOINING) {
        joining_hello(r, n, m);
        return;
    }
    if (n && !n->bad_hello && (m->kind == KVR_MSG_LINK_PORT || m->kind == KVR_MSG_LINKED || m->kind == KVR_MSG_BYE ||
                               m->kind == KVR_MSG_DRAIN_ME)) {
        n->last_seen = now(r);
        on_link_msg(r, n, m);
        return;
    }
    if (m->kind == KVR_MSG_HELLO) {
        on_hello(r, n, m);
        return;
    }
    if (!n || n->bad_hello)
        return; /* a peer that never said a valid HELLO */
    if (n->state == NODE_DEAD) {
        spoke_again(r, n);
        return;
    }
    n->last_seen = now(r);
    switch (m->kind) {
    case KVR_MSG_STATUS:
        on_status(r, n, m);
        break;
    case KVR_MSG_TOKENS:
        on_tokens(r, m);
        break;
    case KVR_MSG_PREFILL_DONE:
        on_prefill_done(r, m);
        break;
    default:
        KVR_LOG_WARN("unexpected %s message from rank %d", kvr_msg_kind_name(m->kind), m->src);
    }
}

/* Reads what waits; *empty = 1 when it read everything (so silence can be judged). */
static int drain(struct coord_router *r, int *empty) {
    int cnt = 0;
    struct kvr_msg m;
    *empty = 0;
    while (cnt < MAX_DRAIN_PER_TURN) {
        int rc = r->p.tp.poll(r->p.tp.ctx, &m);
        if (rc == KVR_EAGAIN) {
            *empty = 1;
            break;
        }
        cnt++;
        if (rc == KVR_OK)
            on_msg(r, &m);
    }
    return cnt;
}

/* Runs q again from its prompt on another node (its tokens already streamed are skipped:
 * a re-run is deterministic for the same seed), or fails it with why once it ran out of
 * tries. The survivor drops its half of this attempt. It gets a fresh queue deadline:
 * re-runs exist for long generations, which arrived long ago. */
static void rerun_elsewhere(struct coord_router *r, struct creq *q, const char *why) {
    if (q->attempt >= r->p.max_retries) {
        finish_active(r, q, KVR_EUNAVAIL, COORD_FINISH_ERROR, why);
        return;
    }
    active_remove(r, q);
    abandon(r, q);
    q->attempt++;
    new_wire_id(q);
    q->n_skip = q->n_sent;
    q->n_seen = 0;
    q->t_queued = now(r);
    q->prefill_rank = q->decode_rank = -1;
    r->cnt.reruns++;
    KVR_LOG_WARN("req=%llu re-run (attempt %d) after %s; %d tokens already sent", (unsigned long long)q->id,
                 q->attempt, why, q->n_sent);
    if (waiting_push(r, q, 1) != KVR_OK)
        finish(r, q, KVR_ENOMEM, COORD_FINISH_ERROR, "coordinator out of memory");
}

/* ---- new requests, cancels, dead nodes ------------------------------------------------------ */

static void take_inbox(struct coord_router *r, int *did) {
    pthread_mutex_lock(&r->mu);
    struct creq *q = r->inbox;
    r->inbox = r->inbox_tail = NULL;
    int n_c = r->n_cancels;
    uint64_t *cancels = r->cancels;
    int cap_c = r->cap_cancels;
    r->cancels = NULL;
    r->n_cancels = r->cap_cancels = 0;
    pthread_mutex_unlock(&r->mu);
    while (q) {
        struct creq *nx = q->next;
        q->next = NULL;
        *did = 1;
        r->cnt.admitted++;
        q->t_queued = now(r);
        q->t_end = q->r.t_arrival + r->p.max_request_age_s;
        q->end_by_age = 1;
        if (q->r.t_deadline > 0 && q->r.t_deadline < q->t_end) {
            q->t_end = q->r.t_deadline;
            q->end_by_age = 0;
        }
        /* The inbox counted it in n_admitted already; waiting_push counts again. */
        pthread_mutex_lock(&r->mu);
        r->n_admitted--;
        pthread_mutex_unlock(&r->mu);
        if (kvr_idmap_put(&r->by_id, q->id, q) != KVR_OK || waiting_push(r, q, 0) != KVR_OK) {
            kvr_idmap_del(&r->by_id, q->id);
            finish(r, q, KVR_ENOMEM, COORD_FINISH_ERROR, "coordinator out of memory");
        }
        q = nx;
    }
    for (int c = 0; c < n_c; c++) {
        *did = 1;
        struct creq *q2 = kvr_idmap_get(&r->by_id, cancels[c]);
        if (!q2)
            continue; /* finished already */
        if (q2->state == CR_WAITING) {
            for (int i = 0; i < r->n_waiting; i++)
                if (r->waiting[i] == q2) {
                    finish_waiting(r, i, KVR_OK, COORD_FINISH_CANCELLED, "cancelled by the client");
                    break;
                }
        } else {
            /* The CANCEL goes on the channel that carried its SEQ_BEGIN: the decode node
             * frees the blocks before it sees anything we place there next. The client
             * is gone, so the stream ends now. */
            finish_active(r, q2, KVR_OK, COORD_FINISH_CANCELLED, "cancelled by the client");
        }
    }
    /* Keep the larger buffer for the next turn's cancels. */
    pthread_mutex_lock(&r->mu);
    if (!r->cancels) {
        r->cancels = cancels;
        r->cap_cancels = cap_c;
        cancels = NULL;
    }
    pthread_mutex_unlock(&r->mu);
    free(cancels);
}

static void node_died(struct coord_router *r, struct cnode *n, double silent) {
    /* A fixed pool (no autoscaler) stays what it is: its target follows the nodes, so a
     * death does not start a replacement (the autoscaler's --decode-min does). */
    if (!r->p.autoscale && n->h.role == KVR_ROLE_DECODE && n->phase == PH_SERVING && r->desired > 0)
        r->desired--;
    n->state = NODE_DEAD;
    n->reset_pending = 0;
    r->p.tp.mark_dead(r->p.tp.ctx, n->rank);
    r->cnt.nodes_died++;
    KVR_LOG_ERROR("rank %d (%s on %s) is silent for %.1f s: declared dead", n->rank, kvr_role_name(n->role),
                  n->h.host, silent);
    /* Cancels it would never get: their blocks are gone with it. */
    for (struct pending_cancel **pp = &r->pcancel; *pp;) {
        struct pending_cancel *c = *pp;
        if (c->rank == n->rank) {
            *pp = c->next;
            free(c);
        } else {
            pp = &c->next;
        }
    }
    char why[MSG_LEN];
    snprintf(why, sizeof why, "%s node rank %d died", kvr_role_name(n->role), n->rank);
    for (int i = 0; i < r->n_active;) {
        struct creq *q = r->active[i];
        if (q->decode_rank == n->rank || (q->state == CR_PREFILL && q->prefill_rank == n->rank))
            rerun_elsewhere(r, q, why); /* leaves active: active[i] is another request now */
        else
            i++;
    }
    n->reserved_blocks = 0;
    n->inflight_tokens = 0;
    set_dirty(r);
}

/* Judges by the time the router last saw itself running (stall_grace, just before), so a
 * stall that begins after that instant cannot count against the nodes. */
static void check_liveness(struct coord_router *r) {
    double t = r->last_turn;
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *n = r->nodes[i];
        if (n->phase == PH_LEFT)
            continue;
        if (n->phase == PH_JOINING || n->phase == PH_LEAVING) {
            double since = n->phase == PH_JOINING ? n->t_spawned : n->t_drain;
            if (t - since > r->p.join_timeout_s) {
                KVR_LOG_ERROR("rank %d stayed %s for %.1f s: given up (its own timeout ends it)", n->rank,
                              phase_name(n->phase), t - since);
                n->phase = PH_LEFT;
                n->state = NODE_DEAD;
                r->p.tp.mark_dead(r->p.tp.ctx, n->rank);
                snprintf(r->last_decision, sizeof r->last_decision, "rank %d failed to join or leave", n->rank);
                set_dirty(r);
            }
            continue;
        }
        if (n->state == NODE_UP && !n->bad_hello && t - n->last_seen > r->p.node_timeout_s)
            node_died(r, n, t - n->last_seen);
        else if (n->state == NODE_DEAD && n->reset_pending && t - n->t_reset > r->p.node_timeout_s) {
            /* No HELLO came back: stop sending to it again. */
            n->reset_pending = 0;
            r->p.tp.mark_dead(r->p.tp.ctx, n->rank);
        }
    }
}

/* ---- the elastic pool: join, drain, leave, autoscale (issue 14) ------------------------ */

#define SCALE_EVERY_S 0.1

static int tx_link(struct coord_router *r, int dst, int kind, int peer, int value, const char *port) {
    struct kvr_link l = {.peer = peer, .value = value};
    snprintf(l.port, sizeof l.port, "%s", port ? port : "");
    struct kvr_wbuf w = {0};
    kvr_msg_write_link(&w, kind, &l);
    unsigned char *b = scratch(r, w.len);
    if (!b)
        return KVR_ENOMEM;
    w = (struct kvr_wbuf){.p = b, .cap = w.len};
    kvr_msg_write_link(&w, kind, &l);
    return tx(r, dst, b, w.len);
}

static void decided(struct coord_router *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void decided(struct coord_router *r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->last_decision, sizeof r->last_decision, fmt, ap);
    va_end(ap);
    KVR_LOG_WARN("elastic: %s", r->last_decision);
    set_dirty(r);
}

/* Its join failed: it is no node of ours (a spawned node that cannot link ends itself). */
static void join_failed(struct coord_router *r, struct cnode *n, const char *why) {
    n->phase = PH_LEFT;
    n->state = NODE_DEAD;
    r->p.tp.mark_dead(r->p.tp.ctx, n->rank);
    decided(r, "rank %d did not join: %s", n->rank, why);
}

static void now_serving(struct coord_router *r, struct cnode *n) {
    double t = now(r);
    n->phase = PH_SERVING;
    n->t_serving = t;
    n->last_seen = t;
    r->cnt.joins++;
    decided(r, "rank %d serving %.3f s after the decision (spawn %.0f ms, model and HELLO %.0f ms, %d links %.0f ms)",
            n->rank, t - n->t_decision, (n->t_spawned - n->t_decision) * 1000.0,
            (n->t_hello - n->t_spawned) * 1000.0, n->n_links, (t - n->t_hello) * 1000.0);
}

static int joining_hello(struct coord_router *r, struct cnode *n, const struct kvr_msg *m) {
    struct kvr_hello h;
    char why[160];
    if (kvr_msg_parse_hello(m, &h) != KVR_OK) {
        tx_empty(r, n->rank, KVR_MSG_LEAVE, 0);
        join_failed(r, n, "malformed HELLO");
        return -1;
    }
    if (!node_consistent(r, &h, why, sizeof why) || h.role != KVR_ROLE_DECODE) {
        tx_empty(r, n->rank, KVR_MSG_LEAVE, 0);
        join_failed(r, n, h.role != KVR_ROLE_DECODE ? "not a decode node" : why);
        return -1;
    }
    n->h = h;
    n->t_hello = now(r);
    n->last_seen = n->t_hello;
    /* The model checked out: tell it how many prefill nodes will connect. */
    tx_link(r, n->rank, KVR_MSG_LINK, n->rank, n->n_links, NULL);
    return 0;
}

static void on_link_msg(struct coord_router *r, struct cnode *n, const struct kvr_msg *m) {
    struct kvr_link l;
    if (kvr_msg_parse_link(m, &l) != KVR_OK)
        return;
    if (m->kind == KVR_MSG_LINK_PORT) {
        if (n->phase != PH_JOINING || l.peer != n->rank)
            return;
        if (n->n_links == 0) {
            now_serving(r, n);
            return;
        }
        n->link_i = 0;
        free(n->port);
        n->port = strdup(l.port);
        if (!n->port || tx_link(r, n->links[0], KVR_MSG_LINK, n->rank, KVR_ROLE_DECODE, l.port) != KVR_OK)
            join_failed(r, n, "cannot ask a prefill node to link");
        return;
    }
    if (m->kind == KVR_MSG_LINKED) {
        struct cnode *j = node_of(r, l.peer);
        if (!j || j->phase != PH_JOINING || j->link_i >= j->n_links || j->links[j->link_i] != n->rank)
            return;
        if (l.value != KVR_OK) {
            char why[128];
            snprintf(why, sizeof why, "prefill rank %d could not connect: %s", n->rank, kvr_status_str(l.value));
            join_failed(r, j, why);
            return;
        }
        if (++j->link_i == j->n_links) {
            now_serving(r, j);
            return;
        }
        if (tx_link(r, j->links[j->link_i], KVR_MSG_LINK, j->rank, KVR_ROLE_DECODE, j->port) != KVR_OK)
            join_failed(r, j, "cannot ask a prefill node to link");
        return;
    }
    if (m->kind == KVR_MSG_DRAIN_ME) {
        if (n->phase != PH_SERVING || n->state != NODE_UP || n->h.role != KVR_ROLE_DECODE)
            return;
        int serving, joining, changing;
        pool_counts(r, &serving, &joining, &changing);
        begin_drain(r, n, "the node was told to stop (SIGTERM or SIGUSR1)");
        int lo = r->p.autoscale ? r->p.decode_min : 0;
        r->desired = serving - 1 > lo ? serving - 1 : lo;
        r->desired_by = "a node's stop";
        return;
    }
    /* BYE: the leaving node read everything and disconnects from us now. */
    if (n->phase != PH_LEAVING)
        return;
    double t0 = now(r);
    int rc = r->p.tp.disconnect ? r->p.tp.disconnect(r->p.tp.ctx, n->rank) : KVR_OK;
    n->phase = PH_LEFT;
    n->state = NODE_DEAD;
    r->p.tp.mark_dead(r->p.tp.ctx, n->rank);
    r->cnt.leaves++;
    decided(r, "rank %d left: drained in %.3f s, links closed in %.0f ms (disconnect %s)", n->rank,
            n->t_leave - n->t_drain, (now(r) - n->t_leave) * 1000.0, kvr_status_str(rc));
    (void)t0;
}

static int add_joiner(struct coord_router *r, const char *port, const char *reason);

/* Grows the pool by one: a parked node comes back, or a new one is spawned. */
static int scale_up(struct coord_router *r, const char *reason) {
    double t = now(r);
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *n = r->nodes[i];
        if (n->phase == PH_PARKED && node_usable(n)) {
            n->phase = PH_SERVING;
            n->t_serving = t;
            decided(r, "+1 (%s): rank %d un-parked, serving at once", reason, n->rank);
            return 0;
        }
    }
    if (!r->p.tp.spawn || !r->p.can_spawn)
        return KVR_ENOTSUP;
    return add_joiner(r, NULL, reason);
}

/* A node that joins: spawned (port NULL) or started elsewhere and reached at port. It
 * links to every usable prefill node. */
static int add_joiner(struct coord_router *r, const char *port, const char *reason) {
    double t = now(r);
    struct kvr_peer_info *peers = calloc((size_t)r->n_nodes + 1, sizeof *peers);
    int *links = calloc((size_t)r->n_nodes + 1, sizeof *links);
    if (!peers || !links) {
        free(peers);
        free(links);
        return KVR_ENOMEM;
    }
    int n_peers = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *n = r->nodes[i];
        if (!node_usable(n) || n->h.role != KVR_ROLE_PREFILL)
            continue;
        links[n_peers] = n->rank;
        peers[n_peers] = (struct kvr_peer_info){.id = n->rank, .role = KVR_ROLE_PREFILL};
        snprintf(peers[n_peers].host, sizeof peers[n_peers].host, "%s", n->h.host);
        n_peers++;
    }
    int id = -1;
    int rc = port ? r->p.tp.adopt(r->p.tp.ctx, port, peers, n_peers, &id)
                  : r->p.tp.spawn(r->p.tp.ctx, peers, n_peers, &id);
    free(peers);
    double t1 = now(r);
    struct cnode *n = rc == KVR_OK ? node_add(r, id) : NULL;
    if (!n) {
        free(links);
        decided(r, "+1 (%s) failed: cannot %s a decode node: %s", reason, port ? "connect to" : "spawn",
                kvr_status_str(rc ? rc : KVR_ENOMEM));
        return rc ? rc : KVR_ENOMEM;
    }
    n->role = KVR_ROLE_DECODE;
    n->h.role = KVR_ROLE_DECODE;
    n->h.setup_status = KVR_EAGAIN; /* nothing is known until its HELLO */
    n->state = NODE_UP;
    n->phase = PH_JOINING;
    n->spawned = 1;
    n->t_decision = t;
    n->t_spawned = t1;
    n->last_seen = t1;
    n->links = links;
    n->n_links = n_peers;
    decided(r, "+1 (%s): %s rank %d in %.0f ms; it links to %d prefill nodes", reason,
            port ? "connected to" : "spawned", id, (t1 - t) * 1000.0, n_peers);
    return 0;
}

/* Nodes started as jobs of their own leave their port in --join-dir. */
static int scan_join_dir(struct coord_router *r) {
    DIR *d = opendir(r->p.join_dir);
    if (!d)
        return 0;
    int did = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.' || len < 6 || strcmp(e->d_name + len - 5, ".port") != 0)
            continue;
        char path[4096], port[KVR_PORT_MAX] = "";
        snprintf(path, sizeof path, "%s/%s", r->p.join_dir, e->d_name);
        FILE *f = fopen(path, "r");
        size_t k = f ? fread(port, 1, sizeof port - 1, f) : 0;
        if (f)
            fclose(f);
        unlink(path);
        port[k] = '\0';
        if (!k)
            continue;
        did = 1;
        if (add_joiner(r, port, "a node started elsewhere left its port") == 0)
            r->desired++; /* someone added a node: the target grows with it */
    }
    closedir(d);
    return did;
}

static void begin_drain(struct coord_router *r, struct cnode *n, const char *reason) {
    n->phase = PH_DRAINING;
    n->t_drain = now(r);
    decided(r, "-1 (%s): draining rank %d (%lld blocks reserved)", reason, n->rank, (long long)n->reserved_blocks);
}

static int drain_progress(struct coord_router *r) {
    int did = 0;
    double t = now(r);
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *n = r->nodes[i];
        if (n->phase != PH_DRAINING || n->state != NODE_UP)
            continue;
        int busy = 0;
        for (int k = 0; k < r->n_active; k++)
            busy += r->active[k]->decode_rank == n->rank;
        for (struct pending_cancel *c = r->pcancel; c; c = c->next)
            busy += c->rank == n->rank;
        if (busy && t - n->t_drain > r->p.drain_timeout_s) {
            char why[96];
            snprintf(why, sizeof why, "its decode node rank %d drained for %.1f s", n->rank, r->p.drain_timeout_s);
            for (int k = 0; k < r->n_active;) {
                struct creq *q = r->active[k];
                if (q->decode_rank == n->rank)
                    rerun_elsewhere(r, q, why);
                else
                    k++;
            }
            did = 1;
            continue;
        }
        if (busy)
            continue;
        did = 1;
        n->t_leave = t;
        if (!n->spawned || !r->p.tp.disconnect) {
            n->phase = PH_PARKED;
            decided(r, "rank %d drained in %.3f s and parked (a rank of the job itself cannot leave it)", n->rank,
                    t - n->t_drain);
            continue;
        }
        /* Every prefill node says BYE on its SEQ channel to it (after whatever it still
         * sends there) and disconnects; the node disconnects from each, then from us. */
        n->phase = PH_LEAVING;
        for (int k = 0; k < n->n_links; k++) {
            struct cnode *pf = node_of(r, n->links[k]);
            if (pf && pf->state == NODE_UP)
                tx_link(r, pf->rank, KVR_MSG_UNLINK, n->rank, 0, NULL);
        }
        tx_empty(r, n->rank, KVR_MSG_LEAVE, 0);
        set_dirty(r);
    }
    return did;
}

static void pool_counts(const struct coord_router *r, int *serving, int *joining, int *changing) {
    *serving = *joining = *changing = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        const struct cnode *n = r->nodes[i];
        if (n->role != KVR_ROLE_DECODE || n->state != NODE_UP)
            continue;
        *serving += node_placeable(n);
        *joining += n->phase == PH_JOINING;
        *changing += n->phase == PH_JOINING || n->phase == PH_DRAINING || n->phase == PH_LEAVING;
    }
}

/* The drain victim: a spawned node before one of the job's own (those can only park),
 * then the fewest blocks reserved, then the newest. */
static struct cnode *victim(struct coord_router *r) {
    struct cnode *best = NULL;
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *n = r->nodes[i];
        if (!node_placeable(n) || n->h.role != KVR_ROLE_DECODE)
            continue;
        if (!best || n->spawned > best->spawned ||
            (n->spawned == best->spawned && n->reserved_blocks <= best->reserved_blocks))
            best = n;
    }
    return best;
}

static int autoscale_turn(struct coord_router *r) {
    int serving, joining, changing;
    pool_counts(r, &serving, &joining, &changing);
    struct coord_autoscale_sample sm = {.t = now(r), .n_serving = serving, .n_changing = changing,
                                        .waiting = r->n_waiting, .ttft_ms = -1, .tpot_ms = -1,
                                        .t_last_join = -1e300};
    if (r->n_waiting > 0)
        sm.oldest_wait_s = sm.t - r->waiting[0]->t_queued;
    for (int i = 0; i < r->n_nodes; i++) {
        const struct cnode *n = r->nodes[i];
        if (!node_placeable(n) || n->h.role != KVR_ROLE_DECODE)
            continue;
        sm.kv_reserved += (double)n->reserved_blocks;
        sm.kv_total += n->h.n_blocks_total;
        if (sm.kv_node_min == 0 || n->h.n_blocks_total < sm.kv_node_min)
            sm.kv_node_min = n->h.n_blocks_total;
        if (n->spawned && n->t_serving > sm.t_last_join)
            sm.t_last_join = n->t_serving;
    }
    if (r->t_last_finish > 0 && sm.t - r->t_last_finish < 10.0) {
        sm.ttft_ms = r->ttft_ema_ms;
        sm.tpot_ms = r->tpot_ema_ms;
    }
    char why[200];
    int d = coord_autoscale_decide(&r->as, &sm, why, sizeof why);
    if (d != 0)
        r->desired_by = "autoscaler";
    if (d > 0) {
        r->desired = serving + joining + 1;
        snprintf(r->last_decision, sizeof r->last_decision, "autoscaler: +1 to %d: %s", r->desired, why);
        KVR_LOG_WARN("elastic: %s", r->last_decision);
    } else if (d < 0) {
        r->desired = serving - 1;
        snprintf(r->last_decision, sizeof r->last_decision, "autoscaler: -1 to %d: %s", r->desired, why);
        KVR_LOG_WARN("elastic: %s", r->last_decision);
    }
    return d != 0;
}

static void take_scale_requests(struct coord_router *r) {
    pthread_mutex_lock(&r->mu);
    int target = r->scale_req;
    r->scale_req = -1;
    int n_d = r->n_drain_reqs;
    int drains[64];
    if (n_d > 64)
        n_d = 64;
    if (n_d > 0)
        memcpy(drains, r->drain_reqs, (size_t)n_d * sizeof *drains);
    r->n_drain_reqs = 0;
    pthread_mutex_unlock(&r->mu);
    if (target >= 0) {
        r->desired = target;
        r->desired_by = "Scale";
        decided(r, "Scale: decode pool target %d", target);
    }
    for (int i = 0; i < n_d; i++) {
        struct cnode *n = node_of(r, drains[i]);
        if (!node_placeable(n) || n->h.role != KVR_ROLE_DECODE)
            continue;
        int serving, joining, changing;
        pool_counts(r, &serving, &joining, &changing);
        begin_drain(r, n, "Drain");
        r->desired_by = "Drain";
        /* The node goes; the pool's size stays what the autoscaler or Scale asked for,
         * within the bounds (a replacement joins if that is still above what remains). */
        int lo = r->p.autoscale ? r->p.decode_min : 1;
        r->desired = serving - 1 > lo ? serving - 1 : lo;
        if (!r->p.autoscale)
            r->desired = serving - 1 > 0 ? serving - 1 : 0;
    }
}

static int elastic_turn(struct coord_router *r) {
    int did = 0;
    double t = now(r);
    take_scale_requests(r);
    if (drain_progress(r))
        did = 1;
    if (r->p.join_dir && r->p.join_dir[0] && r->p.tp.adopt && t - r->last_join_scan >= 0.2) {
        r->last_join_scan = t;
        if (scan_join_dir(r))
            did = 1;
    }
    if (t - r->last_scale_turn < SCALE_EVERY_S)
        return did;
    r->last_scale_turn = t;
    if (r->p.autoscale)
        autoscale_turn(r);
    int serving, joining, changing;
    pool_counts(r, &serving, &joining, &changing);
    if (joining == 0 && serving < r->desired && t >= r->t_spawn_retry) {
        /* One join at a time: its links to the prefill nodes go one after the other. */
        int rc = scale_up(r, r->desired_by);
        if (rc == KVR_ENOTSUP) {
            r->desired = serving; /* nothing can be started: the pool is what it is */
            decided(r, "the decode pool cannot grow (no --decode-spawn): target back to %d", serving);
        } else if (rc != 0) {
            r->t_spawn_retry = t + 5.0; /* the launcher refused: do not hammer it */
        }
        did = 1;
    } else if (serving > r->desired && serving > 1) {
        struct cnode *v = victim(r);
        if (v) {
            begin_drain(r, v, r->desired_by);
            did = 1;
        }
    }
    return did;
}

/* ---- snapshots ---------------------------------------------------------------------------- */

static void update_snapshot(struct coord_router *r) {
    double t = now(r);
    struct coord_node_status *rows = r->n_nodes ? calloc((size_t)r->n_nodes, sizeof *rows) : NULL;
    struct coord_node_limits *lims = r->n_nodes ? calloc((size_t)r->n_nodes, sizeof *lims) : NULL;
    if (r->n_nodes && (!rows || !lims)) {
        free(rows);
        free(lims);
        return; /* keep the previous snapshot */
    }
    int n_rows = 0, n_lims = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        const struct cnode *n = r->nodes[i];
        if (n->phase == PH_LEFT)
            continue;
        struct coord_node_status *o = &rows[n_rows++];
        snprintf(o->state, sizeof o->state, "%s",
                 n->state == NODE_DEAD || n->bad_hello ? "dead" : phase_name(n->phase));
        uint64_t block_nbytes = n->h.n_blocks_total > 0 ? n->h.kv_bytes_total / (uint64_t)n->h.n_blocks_total : 0;
        o->rank = n->rank;
        snprintf(o->role, sizeof o->role, "%s",
                 n->h.role == KVR_ROLE_DECODE && n->h.colocated ? "colocated" : kvr_role_name(n->h.role));
        snprintf(o->host, sizeof o->host, "%s", n->h.host);
        o->alive = n->state == NODE_UP && !n->bad_hello;
        o->kv_bytes_total = n->rep.kv_bytes_total ? n->rep.kv_bytes_total : n->h.kv_bytes_total;
        o->kv_bytes_used = n->rep.kv_bytes_used;
        o->kv_bytes_free = n->rep.kv_bytes_total ? n->rep.kv_bytes_free : n->h.kv_bytes_total;
        o->kv_bytes_reserved = (uint64_t)(n->reserved_blocks > 0 ? n->reserved_blocks : 0) * block_nbytes;
        o->running = n->rep.running;
        o->queued = n->rep.queued;
        o->queued_prompt_tokens =
            n->h.role == KVR_ROLE_PREFILL ? n->inflight_tokens : n->rep.queued_prompt_tokens;
        o->report_age_ms = n->last_seen > 0 ? (t - n->last_seen) * 1000.0 : -1.0;
        if (node_placeable(n))
            lims[n_lims++] = limits_of(n);
    }
    pthread_mutex_lock(&r->mu);
    free(r->snap.nodes);
    r->snap.nodes = rows;
    r->snap.n_nodes = n_rows;
    r->snap.waiting_requests = r->n_waiting;
    r->snap.running_requests = r->n_active;
    r->snap.finished_requests = r->cnt.finished;
    r->snap.node_deaths = r->cnt.nodes_died;
    r->snap.reruns = r->cnt.reruns;
    r->snap.seq_len = r->seq_len;
    r->snap.vocab_size = r->vocab;
    r->snap.decode_desired = r->desired;
    r->snap.decode_min = r->p.decode_min;
    r->snap.decode_max = r->p.decode_max;
    r->snap.autoscale = r->p.autoscale;
    snprintf(r->snap.last_decision, sizeof r->snap.last_decision, "%s", r->last_decision);
    free(r->limits.nodes);
    r->limits.nodes = lims;
    r->limits.n_nodes = n_lims;
    r->limits.seq_len = r->ready ? r->seq_len : 0;
    r->limits.vocab_size = r->vocab;
    r->limits.max_tokens = COORD_REQ_MAX_TOKENS;
    pthread_mutex_unlock(&r->mu);
    r->last_snap = t;
}

/* ---- public loop ----------------------------------------------------------------------------- */

int coord_router_wait_nodes(struct coord_router *r, double timeout_s, uint64_t fingerprint, int *seq_len,
                            int *vocab) {
    double t_end = now(r) + timeout_s;
    for (;;) {
        int empty;
        drain(r, &empty);
        if (r->n_nodes >= r->p.expected_nodes)
            break;
        if (now(r) > t_end) {
            KVR_LOG_ERROR("only %d of %d nodes said hello within %.0f s", r->n_nodes, r->p.expected_nodes,
                          timeout_s);
            return KVR_ETIMEDOUT;
        }
        kvr_sleep_ms(1);
    }
    int n_decode = 0, n_prefill = 0, n_coloc = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        const struct cnode *n = r->nodes[i];
        if (n->bad_hello || n->h.setup_status != KVR_OK) {
            KVR_LOG_ERROR("rank %d failed to set up or sent a bad HELLO (see its log)", n->rank);
            return KVR_EINVAL;
        }
        if (n->h.fingerprint != fingerprint) {
            KVR_LOG_ERROR("rank %d serves a different model (fingerprint %016llx, coordinator %016llx)", n->rank,
                          (unsigned long long)n->h.fingerprint, (unsigned long long)fingerprint);
            return KVR_EFINGERPRINT;
        }
        /* Same weights at another --context would let a node take prompts the others
         * refuse (or the reverse): every node runs at one context. */
        if (i > 0 && n->h.seq_len != r->nodes[0]->h.seq_len) {
            KVR_LOG_ERROR("rank %d runs the model at context %d but rank %d at %d: give every node the "
                          "same --context", n->rank, n->h.seq_len, r->nodes[0]->rank, r->nodes[0]->h.seq_len);
            return KVR_EINVAL;
        }
        if (n->h.kv_type != r->p.kv_type) {
            KVR_LOG_ERROR("rank %d (%s) stores its KV cache as %s but the cluster runs --kv-type %s: give every "
                          "rank the same --kv-type (kvrelay up --kv-type does)", n->rank,
                          n->h.role == KVR_ROLE_PREFILL ? "prefill" : "decode", kvr_kv_type_name(n->h.kv_type),
                          kvr_kv_type_name(r->p.kv_type));
            return KVR_EINVAL;
        }
        if (i > 0 && n->h.vocab_size != r->nodes[0]->h.vocab_size) {
            KVR_LOG_ERROR("rank %d disagrees about the model's vocabulary", n->rank);
            return KVR_EFINGERPRINT;
        }
        n_decode += n->h.role == KVR_ROLE_DECODE;
        n_coloc += n->h.role == KVR_ROLE_DECODE && n->h.colocated;
        n_prefill += n->h.role == KVR_ROLE_PREFILL;
    }
    if (n_decode == 0 || (n_prefill == 0 && n_coloc == 0)) {
        KVR_LOG_ERROR("the cluster has %d decode nodes (%d colocated) and %d prefill nodes: it needs a decode "
                      "node and a way to prefill", n_decode, n_coloc, n_prefill);
        return KVR_EINVAL;
    }
    r->seq_len = *seq_len = r->nodes[0]->h.seq_len;
    r->vocab = *vocab = r->nodes[0]->h.vocab_size;
    r->fingerprint = fingerprint;
    r->ready = 1;
    r->desired = n_decode;
    if (r->p.autoscale)
        r->desired = n_decode < r->p.decode_min ? r->p.decode_min : n_decode > r->p.decode_max ? r->p.decode_max : n_decode;
    double t = now(r);
    for (int i = 0; i < r->n_nodes; i++)
        r->nodes[i]->last_seen = t;
    r->last_turn = t;
    update_snapshot(r);
    pthread_mutex_lock(&r->mu);
    r->serving = 1;
    pthread_mutex_unlock(&r->mu);
    KVR_LOG_INFO("%d prefill and %d decode nodes (%d colocated) are up", n_prefill, n_decode, n_coloc);
    return KVR_OK;
}

/* Whether this loop stopped running for a while since it last looked (the process was
 * stopped, swapped out or starved, maybe in the middle of a turn): nodes' silence during
 * that time says nothing about them, so each gets a full node timeout from now, and so
 * does a request's wait for its first token. Liveness is judged only by a turn that read
 * everything queued after the stall. Returns 1 if it stalled. */
static int stall_grace(struct coord_router *r) {
    double t = now(r);
    int stalled = r->last_turn > 0 && t - r->last_turn > STALL_S;
    if (stalled) {
        KVR_LOG_WARN("the router did not run for %.1f s: reading what queued up before judging liveness",
                     t - r->last_turn);
        r->cnt.stalls++;
        for (int i = 0; i < r->n_nodes; i++)
            if (r->nodes[i]->state == NODE_UP && r->nodes[i]->last_seen < t)
                r->nodes[i]->last_seen = t;
        for (int i = 0; i < r->n_active; i++)
            if (r->active[i]->t_prefill_done > 0 && r->active[i]->t_prefill_done < t)
                r->active[i]->t_prefill_done = t;
    }
    r->last_turn = t;
    return stalled;
}

int coord_router_poll(struct coord_router *r) {
    int did = 0;
    stall_grace(r);
    take_inbox(r, &did);
    int empty = 0;
    if (drain(r, &empty))
        did = 1;
    /* A stall during the drain (SIGSTOP between two messages) defers the judgement to a
     * turn that reads what queued meanwhile. */
    if (!stall_grace(r) && empty)
        check_liveness(r);
    if (r->pcancel && retry_cancels(r))
        did = 1;
    if (now(r) - r->last_reap >= REAP_EVERY_S) {
        stall_grace(r);
        if (reap(r))
            did = 1;
        r->last_reap = now(r);
    }
    if (dispatch(r))
        did = 1;
    if (r->ready && elastic_turn(r))
        did = 1;
    /* Nodes leave on their own if the coordinator goes silent (it crashed). */
    if (now(r) - r->last_ping >= 1.0) {
        for (int i = 0; i < r->n_nodes; i++)
            if (r->nodes[i]->state == NODE_UP && !r->nodes[i]->bad_hello &&
                (r->nodes[i]->phase == PH_SERVING || r->nodes[i]->phase == PH_DRAINING ||
                 r->nodes[i]->phase == PH_PARKED))
                tx_empty(r, r->nodes[i]->rank, KVR_MSG_PING, 0);
        r->last_ping = now(r);
    }
    if (r->p.tp.progress)
        r->p.tp.progress(r->p.tp.ctx);
    if (did || now(r) - r->last_snap > 0.05)
        update_snapshot(r);
    return did;
}

int coord_router_scale(struct coord_router *r, int n_decode, char *msg, size_t len) {
    int rc = KVR_OK;
    pthread_mutex_lock(&r->mu);
    int lo = r->p.autoscale ? r->p.decode_min : 1, hi = r->p.autoscale ? r->p.decode_max : r->p.decode_max;
    if ((!r->p.tp.spawn || !r->p.can_spawn) && n_decode > r->snap.decode_desired) {
        snprintf(msg, len, "this cluster cannot start decode nodes (the coordinator has no --decode-spawn)");
        rc = KVR_ENOTSUP;
    } else if (n_decode < lo || n_decode > hi) {
        snprintf(msg, len, "decode target %d is outside [%d, %d]", n_decode, lo, hi);
        rc = KVR_EINVAL;
    } else {
        r->scale_req = n_decode;
        snprintf(msg, len, "decode pool target %d (was %d)", n_decode, r->snap.decode_desired);
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int coord_router_drain(struct coord_router *r, int rank, char *msg, size_t len) {
    int rc = KVR_EINVAL, n_serving = 0;
    pthread_mutex_lock(&r->mu);
    const struct coord_node_status *row = NULL;
    for (int i = 0; i < r->snap.n_nodes; i++) {
        const struct coord_node_status *o = &r->snap.nodes[i];
        n_serving += !strcmp(o->role, "decode") && !strcmp(o->state, "serving");
        if (o->rank == rank)
            row = o;
    }
    if (!row || strcmp(row->role, "decode") != 0)
        snprintf(msg, len, "rank %d is not a decode node of this cluster", rank);
    else if (strcmp(row->state, "serving") != 0)
        snprintf(msg, len, "rank %d is %s, not serving", rank, row->state);
    else if (n_serving < 2 && (!r->p.tp.spawn || !r->p.can_spawn))
        snprintf(msg, len, "rank %d is the last serving decode node and no other can be started", rank);
    else if (r->n_drain_reqs >= 64)
        snprintf(msg, len, "too many drains pending");
    else {
        int *a = r->drain_reqs;
        if (r->n_drain_reqs == r->cap_drain_reqs) {
            a = realloc(r->drain_reqs, 64 * sizeof *a);
            if (a) {
                r->drain_reqs = a;
                r->cap_drain_reqs = 64;
            }
        }
        if (!a) {
            rc = KVR_ENOMEM;
            snprintf(msg, len, "out of memory");
        } else {
            r->drain_reqs[r->n_drain_reqs++] = rank;
            snprintf(msg, len, "draining rank %d", rank);
            rc = KVR_OK;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

void coord_router_shutdown(struct coord_router *r) {
    pthread_mutex_lock(&r->mu);
    r->stopping = 1;
    pthread_mutex_unlock(&r->mu);
    int did = 0;
    take_inbox(r, &did);
    while (r->n_waiting > 0)
        finish_waiting(r, 0, KVR_EUNAVAIL, COORD_FINISH_ERROR, "the cluster is shutting down");
    while (r->n_active > 0)
        finish_active(r, r->active[0], KVR_EUNAVAIL, COORD_FINISH_ERROR, "the cluster is shutting down");
    /* Spawned nodes leave the way a drained one does (their links closed, exit 0), so that
     * the job ends cleanly; then everyone else gets SHUTDOWN. */
    int n_leaving = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *n = r->nodes[i];
        if (n->spawned && n->state == NODE_UP && (n->phase == PH_SERVING || n->phase == PH_DRAINING)) {
            n->phase = PH_DRAINING;
            n->t_drain = now(r);
            n_leaving++;
        }
    }
    if (n_leaving) {
        drain_progress(r);
        double t_end = now(r) + 10.0;
        for (;;) {
            int empty, left = 0;
            drain(r, &empty);
            for (int i = 0; i < r->n_nodes; i++)
                left += r->nodes[i]->phase == PH_LEAVING && r->nodes[i]->state == NODE_UP;
            if (!left || now(r) > t_end)
                break;
            if (r->p.tp.progress)
                r->p.tp.progress(r->p.tp.ctx);
            kvr_sleep_ms(1);
        }
    }
    for (int i = 0; i < r->n_nodes; i++)
        if (r->nodes[i]->state == NODE_UP && r->nodes[i]->phase != PH_LEFT && r->nodes[i]->phase != PH_JOINING)
            tx_empty(r, r->nodes[i]->rank, KVR_MSG_SHUTDOWN, 0);
    update_snapshot(r);
}
