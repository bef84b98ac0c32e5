/* router.c - admission, placement, routing, deadlines, liveness (see router.h).
 * Owns every admitted request from coord_router_submit until its finish call. The gRPC
 * thread only touches the inbox, the cancel list and the status snapshot, all under mu;
 * everything else runs on the MPI thread. */
#include "router.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "kv_cache.h"
#include "log.h"
#include "status.h"
#include "xfer.h"

_Static_assert((int)COORD_FINISH_LENGTH == KVR_FINISH_LENGTH && (int)COORD_FINISH_STOP == KVR_FINISH_STOP &&
                   (int)COORD_FINISH_CONTEXT == KVR_FINISH_CONTEXT &&
                   (int)COORD_FINISH_CANCELLED == KVR_FINISH_CANCELLED &&
                   (int)COORD_FINISH_ERROR == KVR_FINISH_ERROR,
               "coord_finish mirrors kvr_finish");

#define ATTEMPT_BITS 4 /* wire id = id << ATTEMPT_BITS | attempt: a re-run is a new sequence */

enum creq_state { CR_WAITING, CR_PREFILL, CR_DECODE };

struct creq {
    uint64_t id;
    uint64_t wire_id;
    int attempt;
    struct coord_request r;  /* r.tokens owned */
    enum creq_state state;
    int prefill_rank, decode_rank;
    int reserved_blocks;     /* on decode_rank */
    int n_sent;              /* tokens delivered to the stream (all attempts) */
    int n_skip;              /* tokens of this attempt already delivered by an earlier one */
    int n_seen;              /* tokens of this attempt seen */
    int cancelled;           /* the client asked; the decode node was told */
    int prefill_open;        /* its prompt tokens count in its prefill node's inflight_tokens */
    double t_dispatch, t_first, t_last;
    struct creq *next;       /* inbox link */
};

struct cnode {
    int rank;
    int role;
    int hello;
    int alive;
    struct kvr_hello h;
    struct kvr_node_report rep;
    double last_seen;
    int reserved_blocks;     /* decode: blocks promised to placed requests */
    uint64_t inflight_tokens; /* prefill: prompt tokens sent and not yet done */
};

struct coord_router {
    struct coord_router_params p;
    struct kvr_xfer *x;
    const struct coord_stream_ops *ops;
    struct cnode *nodes;     /* every rank but the coordinator's */
    int n_nodes;
    int seq_len;

    pthread_mutex_t mu;      /* guards the fields down to `snap` */
    struct creq *inbox, *inbox_tail;
    uint64_t *cancels;
    int n_cancels, cap_cancels;
    int n_admitted;          /* inbox + waiting: what queue_max bounds */
    uint64_t next_id;
    int stopping;
    int serving;             /* nodes are up */
    struct coord_cluster_status snap;

    struct creq **waiting;   /* FIFO, MPI thread */
    int n_waiting, cap_waiting;
    struct creq **active;    /* at a prefill or decode node */
    int n_active, cap_active;
    uint64_t n_finished;
    double last_snap;
    double last_ping;
    struct kvr_tok_event *events; /* (KVR_TOKENS_MAX_EVENTS) parse target */
};

static struct cnode *node_of(struct coord_router *r, int rank) {
    for (int i = 0; i < r->n_nodes; i++)
        if (r->nodes[i].rank == rank)
            return &r->nodes[i];
    return NULL;
}

/* ---- lifetime -------------------------------------------------------------------- */

int coord_router_create(const struct coord_router_params *p, struct coord_router **out) {
    *out = NULL;
    struct coord_router *r = calloc(1, sizeof *r);
    if (!r)
        return KVR_ENOMEM;
    r->p = *p;
    r->x = p->xfer;
    r->ops = p->ops;
    int size = kvr_xfer_size(r->x), coord = kvr_xfer_coord_rank(r->x);
    r->nodes = calloc((size_t)size, sizeof *r->nodes);
    r->events = malloc(KVR_TOKENS_MAX_EVENTS * sizeof *r->events);
    if (!r->nodes || !r->events) {
        free(r->nodes);
        free(r->events);
        free(r);
        return KVR_ENOMEM;
    }
    for (int rank = 0; rank < size; rank++) {
        if (rank == coord)
            continue;
        struct cnode *n = &r->nodes[r->n_nodes++];
        n->rank = rank;
        n->role = kvr_xfer_role_of(r->x, rank);
        snprintf(n->h.host, sizeof n->h.host, "%s", kvr_xfer_host_of(r->x, rank));
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
    free(r->waiting);
    free(r->active);
    free(r->cancels);
    free(r->nodes);
    free(r->events);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

/* ---- the gRPC thread's side -------------------------------------------------------- */

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
    else
        KVR_LOG_ERROR("req=%llu cancel dropped: out of memory", (unsigned long long)id);
    pthread_mutex_unlock(&r->mu);
}

void coord_router_status(struct coord_router *r, struct coord_cluster_status *out) {
    pthread_mutex_lock(&r->mu);
    *out = r->snap;
    pthread_mutex_unlock(&r->mu);
}

/* ---- finishing -------------------------------------------------------------------- */

static int push(struct creq ***arr, int *n, int *cap, struct creq *q, int front) {
    if (*n == *cap) {
        int c = *cap ? 2 * *cap : 64;
        struct creq **a = realloc(*arr, (size_t)c * sizeof *a);
        if (!a)
            return KVR_ENOMEM;
        *arr = a;
        *cap = c;
    }
    if (front) {
        memmove(*arr + 1, *arr, (size_t)*n * sizeof **arr);
        (*arr)[0] = q;
    } else {
        (*arr)[*n] = q;
    }
    (*n)++;
    return KVR_OK;
}

static void remove_at(struct creq **arr, int *n, int i) {
    memmove(arr + i, arr + i + 1, (size_t)(*n - i - 1) * sizeof *arr);
    (*n)--;
}

/* The prompt left its prefill node (done, failed or abandoned): stop counting it there. */
static void close_prefill(struct coord_router *r, struct creq *q) {
    struct cnode *pf = node_of(r, q->prefill_rank);
    if (q->prefill_open && pf)
        pf->inflight_tokens -= pf->inflight_tokens >= (uint64_t)q->r.n_tokens ? (uint64_t)q->r.n_tokens
                                                                               : pf->inflight_tokens;
    q->prefill_open = 0;
}

static void release(struct coord_router *r, struct creq *q) {
    struct cnode *d = node_of(r, q->decode_rank);
    if (d) {
        d->reserved_blocks -= q->reserved_blocks;
        if (d->reserved_blocks < 0)
            d->reserved_blocks = 0;
    }
    q->reserved_blocks = 0;
    close_prefill(r, q);
}

/* Ends q (already removed from its list): one finish call, then q is gone. */
static void finish(struct coord_router *r, struct creq *q, int status, enum coord_finish reason,
                   const char *msg) {
    double t = kvr_clock_now();
    release(r, q);
    struct coord_usage u = {
        .prompt_tokens = q->r.n_tokens, .generated_tokens = q->n_sent,
        .queue_ms = q->t_dispatch > 0 ? (q->t_dispatch - q->r.t_arrival) * 1000.0 : (t - q->r.t_arrival) * 1000.0,
        .ttft_ms = q->t_first > 0 ? (q->t_first - q->r.t_arrival) * 1000.0 : 0.0,
        .tpot_ms = q->n_sent > 1 ? (q->t_last - q->t_first) * 1000.0 / (q->n_sent - 1) : 0.0,
        .total_ms = (t - q->r.t_arrival) * 1000.0, .prefill_rank = q->prefill_rank,
        .decode_rank = q->decode_rank};
    if (status != KVR_OK)
        KVR_LOG_WARN("req=%llu ends with %s: %s", (unsigned long long)q->id, kvr_status_name(status), msg);
    else
        KVR_LOG_DEBUG("req=%llu done: %d tokens, reason %d", (unsigned long long)q->id, q->n_sent, reason);
    r->ops->finish(q->r.stream, status, reason, &u, msg);
    r->n_finished++;
    creq_free(q);
}

static void finish_waiting(struct coord_router *r, int i, int status, enum coord_finish reason,
                           const char *msg) {
    struct creq *q = r->waiting[i];
    remove_at(r->waiting, &r->n_waiting, i);
    pthread_mutex_lock(&r->mu);
    r->n_admitted--;
    pthread_mutex_unlock(&r->mu);
    finish(r, q, status, reason, msg);
}

static void finish_active(struct coord_router *r, int i, int status, enum coord_finish reason,
                          const char *msg) {
    struct creq *q = r->active[i];
    remove_at(r->active, &r->n_active, i);
    finish(r, q, status, reason, msg);
}

/* ---- placement ---------------------------------------------------------------------- */

static int decode_capable(const struct cnode *n) {
    return n->role == KVR_ROLE_DECODE && n->hello && n->alive && n->h.n_blocks_total > 0;
}

static int colocated_mode(const struct coord_router *r) {
    for (int i = 0; i < r->n_nodes; i++)
        if (r->nodes[i].role == KVR_ROLE_PREFILL && r->nodes[i].alive)
            return 0;
    return 1;
}

static int blocks_for(const struct creq *q, const struct cnode *d) {
    int chunk = d->h.colocated ? q->r.n_tokens : 1;
    return kvr_kv_blocks_needed(&q->r.policy, d->h.block_tokens, q->r.n_tokens + q->r.max_tokens, chunk);
}

/* Places the head of the queue if it fits. Returns 1 placed, 0 must wait, -1 finished it. */
static int place_head(struct coord_router *r) {
    struct creq *q = r->waiting[0];
    struct cnode *best = NULL;
    int best_avail = -1, best_need = 0, fits_somewhere = 0, any_decode = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *d = &r->nodes[i];
        if (!decode_capable(d))
            continue;
        any_decode = 1;
        int need = blocks_for(q, d);
        if (need <= d->h.n_blocks_total)
            fits_somewhere = 1;
        int avail = d->h.n_blocks_total - d->reserved_blocks;
        if (need <= avail && avail > best_avail) {
            best = d;
            best_avail = avail;
            best_need = need;
        }
    }
    if (!any_decode) {
        finish_waiting(r, 0, KVR_EUNAVAIL, COORD_FINISH_ERROR, "no decode node is alive");
        return -1;
    }
    if (!fits_somewhere) {
        finish_waiting(r, 0, KVR_ENOSPC, COORD_FINISH_ERROR,
                       "the request needs more KV memory than any decode node has");
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
            struct cnode *n = &r->nodes[i];
            if (n->role == KVR_ROLE_PREFILL && n->alive && n->hello && n->h.n_blocks_total > 0 &&
                (!pf || n->inflight_tokens < pf->inflight_tokens))
                pf = n;
        }
        if (!pf)
            return 0;
    }
    struct kvr_req_params p = {.req_id = q->wire_id, .n_prompt = q->r.n_tokens, .max_tokens = q->r.max_tokens,
                               .temperature = q->r.temperature, .top_p = q->r.top_p, .seed = q->r.seed,
                               .stop_at_eos = q->r.stop_at_eos, .policy = q->r.policy,
                               .prefill_rank = pf->rank, .decode_rank = best->rank,
                               .t_coord_ms = kvr_clock_now() * 1000.0};
    int rc = kvr_xfer_send_prefill_req(r->x, pf->rank, &p, q->r.tokens);
    if (rc != KVR_OK) {
        finish_waiting(r, 0, rc, COORD_FINISH_ERROR, "cannot send the prompt to a prefill node");
        return -1;
    }
    if (push(&r->active, &r->n_active, &r->cap_active, q, 0) != KVR_OK) {
        /* The node will answer for a request we no longer track: tell it to drop it. */
        kvr_xfer_send_cancel(r->x, best->rank, q->wire_id);
        finish_waiting(r, 0, KVR_ENOMEM, COORD_FINISH_ERROR, "coordinator out of memory");
        return -1;
    }
    remove_at(r->waiting, &r->n_waiting, 0);
    pthread_mutex_lock(&r->mu);
    r->n_admitted--;
    pthread_mutex_unlock(&r->mu);
    q->state = CR_PREFILL;
    q->prefill_rank = pf->rank;
    q->decode_rank = best->rank;
    q->reserved_blocks = best_need;
    best->reserved_blocks += best_need;
    pf->inflight_tokens += (uint64_t)q->r.n_tokens;
    q->prefill_open = 1;
    if (q->t_dispatch == 0)
        q->t_dispatch = kvr_clock_now();
    KVR_LOG_DEBUG("req=%llu placed: prefill rank %d, decode rank %d, %d blocks", (unsigned long long)q->id,
                  pf->rank, best->rank, best_need);
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
    /* Deadline: requests that waited too long for memory. */
    double t = kvr_clock_now();
    for (int i = 0; i < r->n_waiting;) {
        if (t - r->waiting[i]->r.t_arrival > r->p.queue_timeout_s) {
            finish_waiting(r, i, KVR_ETIMEDOUT, COORD_FINISH_ERROR,
                           "no decode node had room for the KV cache before the queue deadline");
            did = 1;
        } else {
            i++;
        }
    }
    return did;
}

/* ---- messages ---------------------------------------------------------------------- */

static int find_active(struct coord_router *r, uint64_t wire_id) {
    for (int i = 0; i < r->n_active; i++)
        if (r->active[i]->wire_id == wire_id)
            return i;
    return -1;
}

static void on_tokens(struct coord_router *r, const struct kvr_msg *m) {
    int n = 0;
    if (kvr_msg_parse_tokens(m, r->events, KVR_TOKENS_MAX_EVENTS, &n) != KVR_OK)
        return;
    double t = kvr_clock_now();
    for (int e = 0; e < n; e++) {
        const struct kvr_tok_event *ev = &r->events[e];
        int i = find_active(r, ev->req_id);
        if (i < 0)
            continue; /* an attempt we gave up on, or already finished */
        struct creq *q = r->active[i];
        if (q->decode_rank != m->src)
            continue;
        q->state = CR_DECODE;
        if (ev->token >= 0) {
            q->n_seen++;
            if (q->n_seen > q->n_skip) {
                if (!q->cancelled)
                    r->ops->tokens(q->r.stream, &ev->token, 1);
                q->n_sent++;
                if (q->t_first == 0)
                    q->t_first = t;
                q->t_last = t;
            }
        }
        if (ev->finish != KVR_FINISH_NONE) {
            const char *msg = ev->status == KVR_OK ? "ok" : kvr_status_str(ev->status);
            char buf[160];
            if (ev->status != KVR_OK) {
                snprintf(buf, sizeof buf, "decode node rank %d: %s", m->src, kvr_status_str(ev->status));
                msg = buf;
            }
            finish_active(r, i, ev->status, (enum coord_finish)ev->finish, msg);
        }
    }
}

static void on_prefill_done(struct coord_router *r, const struct kvr_msg *m) {
    struct kvr_prefill_done d;
    if (kvr_msg_parse_prefill_done(m, &d) != KVR_OK)
        return;
    int i = find_active(r, m->req_id);
    if (i < 0)
        return; /* finished already: close_prefill ran then */
    struct creq *q = r->active[i];
    if (q->prefill_rank != m->src)
        return;
    close_prefill(r, q);
    if (q->state == CR_PREFILL)
        q->state = CR_DECODE; /* the decode node owns it now (its finish event ends it) */
    if (d.status != KVR_OK)
        KVR_LOG_WARN("req=%llu prefill on rank %d failed: %s", (unsigned long long)q->id, m->src,
                     kvr_status_str(d.status));
}

static int drain(struct coord_router *r) {
    static const int tags[] = {KVR_TAG_REPORT};
    int cnt = 0;
    struct kvr_msg m;
    while (cnt < 1024) {
        int rc = kvr_xfer_poll(r->x, tags, 1, &m);
        if (rc == KVR_EAGAIN)
            break;
        cnt++;
        if (rc != KVR_OK)
            continue;
        struct cnode *n = node_of(r, m.src);
        if (!n)
            continue;
        if (!n->alive && n->hello) {
            KVR_LOG_WARN("rank %d spoke again after being declared dead; ignoring it", m.src);
            continue;
        }
        n->last_seen = kvr_clock_now();
        switch (m.kind) {
        case KVR_MSG_HELLO:
            if (kvr_msg_parse_hello(&m, &n->h) == KVR_OK) {
                n->hello = 1;
                n->alive = 1;
            }
            break;
        case KVR_MSG_STATUS:
            kvr_msg_parse_status(&m, &n->rep);
            break;
        case KVR_MSG_TOKENS:
            on_tokens(r, &m);
            break;
        case KVR_MSG_PREFILL_DONE:
            on_prefill_done(r, &m);
            break;
        default:
            KVR_LOG_WARN("unexpected %s message from rank %d", kvr_msg_kind_name(m.kind), m.src);
        }
    }
    return cnt;
}

/* ---- cancels, new requests, dead nodes ----------------------------------------------- */

static void take_inbox(struct coord_router *r, int *did) {
    pthread_mutex_lock(&r->mu);
    struct creq *q = r->inbox;
    r->inbox = r->inbox_tail = NULL;
    int n_c = r->n_cancels;
    uint64_t cancels[256];
    if (n_c > 256)
        n_c = 256;
    if (n_c > 0) {
        memcpy(cancels, r->cancels, (size_t)n_c * sizeof *cancels);
        memmove(r->cancels, r->cancels + n_c, (size_t)(r->n_cancels - n_c) * sizeof *r->cancels);
        r->n_cancels -= n_c;
    }
    pthread_mutex_unlock(&r->mu);
    while (q) {
        struct creq *nx = q->next;
        q->next = NULL;
        *did = 1;
        if (push(&r->waiting, &r->n_waiting, &r->cap_waiting, q, 0) != KVR_OK) {
            pthread_mutex_lock(&r->mu);
            r->n_admitted--;
            pthread_mutex_unlock(&r->mu);
            finish(r, q, KVR_ENOMEM, COORD_FINISH_ERROR, "coordinator out of memory");
        }
        q = nx;
    }
    for (int c = 0; c < n_c; c++) {
        *did = 1;
        uint64_t id = cancels[c];
        int done = 0;
        for (int i = 0; i < r->n_waiting && !done; i++) {
            if (r->waiting[i]->id == id) {
                finish_waiting(r, i, KVR_OK, COORD_FINISH_CANCELLED, "cancelled by the client");
                done = 1;
            }
        }
        for (int i = 0; i < r->n_active && !done; i++) {
            struct creq *q2 = r->active[i];
            if (q2->id != id)
                continue;
            done = 1;
            if (q2->cancelled)
                break;
            q2->cancelled = 1;
            /* The prefill node drops it if still queued (and tells the decode node); the
             * decode node frees its blocks and answers with a CANCELLED finish. */
            if (q2->state == CR_PREFILL && q2->prefill_rank != q2->decode_rank)
                kvr_xfer_send_cancel(r->x, q2->prefill_rank, q2->wire_id);
            if (kvr_xfer_send_cancel(r->x, q2->decode_rank, q2->wire_id) != KVR_OK)
                finish_active(r, i, KVR_OK, COORD_FINISH_CANCELLED, "cancelled by the client");
        }
    }
}

static void node_died(struct coord_router *r, struct cnode *n) {
    n->alive = 0;
    kvr_xfer_mark_dead(r->x, n->rank);
    KVR_LOG_ERROR("rank %d (%s on %s) is silent for %.1f s: declared dead", n->rank, kvr_role_name(n->role),
                  n->h.host, kvr_clock_now() - n->last_seen);
    for (int i = 0; i < r->n_active;) {
        struct creq *q = r->active[i];
        int hit = q->decode_rank == n->rank || (q->state == CR_PREFILL && q->prefill_rank == n->rank);
        if (!hit) {
            i++;
            continue;
        }
        /* Let the survivor drop its half of this attempt. */
        if (q->decode_rank != n->rank)
            kvr_xfer_send_cancel(r->x, q->decode_rank, q->wire_id);
        else if (q->state == CR_PREFILL && q->prefill_rank != n->rank)
            kvr_xfer_send_cancel(r->x, q->prefill_rank, q->wire_id);
        if (q->cancelled || q->attempt + 1 >= (1 << ATTEMPT_BITS) || q->attempt >= r->p.max_retries) {
            char msg[128];
            snprintf(msg, sizeof msg, "%s node rank %d died", kvr_role_name(n->role), n->rank);
            finish_active(r, i, q->cancelled ? KVR_OK : KVR_EUNAVAIL,
                          q->cancelled ? COORD_FINISH_CANCELLED : COORD_FINISH_ERROR, msg);
            continue;
        }
        /* Run it again from the prompt; the tokens already streamed are skipped. */
        release(r, q);
        remove_at(r->active, &r->n_active, i);
        q->attempt++;
        q->wire_id = (q->id << ATTEMPT_BITS) | (uint64_t)q->attempt;
        q->n_skip = q->n_sent;
        q->n_seen = 0;
        q->state = CR_WAITING;
        KVR_LOG_WARN("req=%llu re-run (attempt %d) after rank %d died; %d tokens already sent",
                     (unsigned long long)q->id, q->attempt, n->rank, q->n_sent);
        if (push(&r->waiting, &r->n_waiting, &r->cap_waiting, q, 1) != KVR_OK) {
            finish(r, q, KVR_ENOMEM, COORD_FINISH_ERROR, "coordinator out of memory");
            continue;
        }
        pthread_mutex_lock(&r->mu);
        r->n_admitted++;
        pthread_mutex_unlock(&r->mu);
    }
}

static void check_liveness(struct coord_router *r) {
    double t = kvr_clock_now();
    for (int i = 0; i < r->n_nodes; i++) {
        struct cnode *n = &r->nodes[i];
        if (n->alive && t - n->last_seen > r->p.node_timeout_s)
            node_died(r, n);
    }
}

static void update_snapshot(struct coord_router *r) {
    struct coord_cluster_status s;
    memset(&s, 0, sizeof s);
    double t = kvr_clock_now();
    for (int i = 0; i < r->n_nodes && s.n_nodes < COORD_MAX_NODES; i++) {
        const struct cnode *n = &r->nodes[i];
        struct coord_node_status *o = &s.nodes[s.n_nodes++];
        uint64_t block_nbytes = n->h.n_blocks_total ? n->h.kv_bytes_total / (uint64_t)n->h.n_blocks_total : 0;
        o->rank = n->rank;
        snprintf(o->role, sizeof o->role, "%s", n->role == KVR_ROLE_DECODE && n->h.colocated ? "colocated"
                                                                                             : kvr_role_name(n->role));
        snprintf(o->host, sizeof o->host, "%s", n->h.host);
        o->alive = n->alive;
        o->kv_bytes_total = n->rep.kv_bytes_total ? n->rep.kv_bytes_total : n->h.kv_bytes_total;
        o->kv_bytes_used = n->rep.kv_bytes_used;
        o->kv_bytes_free = n->rep.kv_bytes_total ? n->rep.kv_bytes_free : n->h.kv_bytes_total;
        o->kv_bytes_reserved = (uint64_t)n->reserved_blocks * block_nbytes;
        o->running = n->rep.running;
        o->queued = n->rep.queued;
        o->queued_prompt_tokens = n->role == KVR_ROLE_PREFILL ? n->inflight_tokens : n->rep.queued_prompt_tokens;
        o->report_age_ms = n->last_seen > 0 ? (t - n->last_seen) * 1000.0 : -1.0;
    }
    s.waiting_requests = r->n_waiting;
    s.running_requests = r->n_active;
    s.finished_requests = r->n_finished;
    s.seq_len = r->seq_len;
    for (int i = 0; i < r->n_nodes; i++)
        if (r->nodes[i].hello)
            s.vocab_size = r->nodes[i].h.vocab_size;
    pthread_mutex_lock(&r->mu);
    r->snap = s;
    pthread_mutex_unlock(&r->mu);
    r->last_snap = t;
}

/* ---- public loop ------------------------------------------------------------------- */

int coord_router_wait_nodes(struct coord_router *r, double timeout_s, uint64_t fingerprint, int *seq_len,
                            int *vocab) {
    double t_end = kvr_clock_now() + timeout_s;
    for (;;) {
        drain(r);
        int n_hello = 0;
        for (int i = 0; i < r->n_nodes; i++)
            n_hello += r->nodes[i].hello;
        if (n_hello == r->n_nodes)
            break;
        if (kvr_clock_now() > t_end) {
            KVR_LOG_ERROR("only %d of %d nodes said hello within %.0f s", n_hello, r->n_nodes, timeout_s);
            return KVR_ETIMEDOUT;
        }
        kvr_sleep_ms(1);
    }
    int n_decode = 0, n_prefill = 0, n_coloc = 0;
    for (int i = 0; i < r->n_nodes; i++) {
        const struct cnode *n = &r->nodes[i];
        if (n->h.n_blocks_total <= 0) {
            KVR_LOG_ERROR("rank %d (%s) failed to set up (see its log)", n->rank, kvr_role_name(n->role));
            return KVR_EINVAL;
        }
        if (n->h.fingerprint != fingerprint) {
            KVR_LOG_ERROR("rank %d serves a different model (fingerprint %016llx, coordinator %016llx)", n->rank,
                          (unsigned long long)n->h.fingerprint, (unsigned long long)fingerprint);
            return KVR_EFINGERPRINT;
        }
        n_decode += n->role == KVR_ROLE_DECODE;
        n_coloc += n->role == KVR_ROLE_DECODE && n->h.colocated;
        n_prefill += n->role == KVR_ROLE_PREFILL;
        *seq_len = n->h.seq_len;
        *vocab = n->h.vocab_size;
    }
    if (n_decode == 0 || (n_prefill == 0 && n_coloc == 0)) {
        KVR_LOG_ERROR("the cluster has %d decode nodes (%d colocated) and %d prefill nodes: it needs a decode "
                      "node and a way to prefill", n_decode, n_coloc, n_prefill);
        return KVR_EINVAL;
    }
    r->seq_len = *seq_len;
    update_snapshot(r);
    pthread_mutex_lock(&r->mu);
    r->serving = 1;
    pthread_mutex_unlock(&r->mu);
    KVR_LOG_INFO("%d prefill and %d decode nodes (%d colocated) are up", n_prefill, n_decode, n_coloc);
    return KVR_OK;
}

int coord_router_poll(struct coord_router *r) {
    int did = 0;
    take_inbox(r, &did);
    if (drain(r))
        did = 1;
    check_liveness(r);
    if (dispatch(r))
        did = 1;
    /* Nodes leave on their own if the coordinator goes silent (it crashed). */
    if (kvr_clock_now() - r->last_ping >= 1.0) {
        for (int i = 0; i < r->n_nodes; i++)
            if (r->nodes[i].alive)
                kvr_xfer_send_ping(r->x, r->nodes[i].rank);
        r->last_ping = kvr_clock_now();
    }
    kvr_xfer_progress(r->x);
    if (did || kvr_clock_now() - r->last_snap > 0.05)
        update_snapshot(r);
    return did;
}

void coord_router_shutdown(struct coord_router *r) {
    pthread_mutex_lock(&r->mu);
    r->stopping = 1;
    pthread_mutex_unlock(&r->mu);
    int did = 0;
    take_inbox(r, &did);
    while (r->n_waiting > 0)
        finish_waiting(r, 0, KVR_EUNAVAIL, COORD_FINISH_ERROR, "the cluster is shutting down");
    while (r->n_active > 0) {
        struct creq *q = r->active[0];
        kvr_xfer_send_cancel(r->x, q->decode_rank, q->wire_id);
        finish_active(r, 0, KVR_EUNAVAIL, COORD_FINISH_ERROR, "the cluster is shutting down");
    }
    for (int i = 0; i < r->n_nodes; i++)
        if (r->nodes[i].alive)
            kvr_xfer_send_shutdown(r->x, r->nodes[i].rank);
    update_snapshot(r);
}
