/* fake_router.c - the fake router of the gRPC tests (see fake_router.h). One thread per
 * admitted request plays the router's part: tokens calls, then exactly one finish call. */
#include "fake_router.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "grpc_server.h"
#include "status.h"

#define FAKE_MAX_REQS 1024

struct fake_req {
    uint64_t id;
    struct coord_stream *stream;
    int max_tokens;
    uint64_t seed;
    struct fake_router_cfg cfg;
    pthread_t thread;
    int cancel_flag;
    int n_cancels;
    int finished;
    int joined;
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct fake_router_cfg cfg;
    struct coord_cluster_status status;
    struct fake_req reqs[FAKE_MAX_REQS];
    int n_reqs;
    uint64_t next_id;
    struct fake_router_stats stats;
    struct coord_request last;
    int *last_tokens;
} F = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
    .cfg = {.emit = -1, .per_call = 1, .finish_reason = COORD_FINISH_LENGTH},
    .next_id = 100,
};

/* Only an address: the fake keeps its state in F. */
struct coord_router {
    int unused;
};
static struct coord_router the_router;

struct coord_router *fake_router_get(void) {
    return &the_router;
}

void fake_router_configure(const struct fake_router_cfg *cfg) {
    pthread_mutex_lock(&F.mu);
    F.cfg = *cfg;
    if (F.cfg.per_call < 1)
        F.cfg.per_call = 1;
    pthread_mutex_unlock(&F.mu);
}

void fake_router_set_status(const struct coord_cluster_status *st) {
    pthread_mutex_lock(&F.mu);
    free(F.status.nodes);
    F.status = *st;
    F.status.nodes = NULL;
    if (st->n_nodes > 0) {
        F.status.nodes = malloc((size_t)st->n_nodes * sizeof *F.status.nodes);
        if (F.status.nodes)
            memcpy(F.status.nodes, st->nodes, (size_t)st->n_nodes * sizeof *st->nodes);
        else
            F.status.n_nodes = 0;
    }
    pthread_mutex_unlock(&F.mu);
}

/* One prefill and one decode node with room for anything the bundled model's context
 * allows, unless a test sets others. */
static struct coord_node_limits default_nodes[2] = {
    {.rank = 1, .role = 1 /* prefill */, .block_tokens = 16, .n_blocks = 4096, .max_batch_tokens = 1024,
     .n_ctx_max = 1536},
    {.rank = 2, .role = 2 /* decode */, .block_tokens = 16, .n_blocks = 4096, .max_batch_tokens = 512,
     .n_ctx_max = 1024},
};
static struct coord_limits F_limits = {.seq_len = 512, .vocab_size = 512, .max_tokens = 1 << 24, .n_nodes = 2,
                                       .nodes = default_nodes};

void fake_router_set_limits(const struct coord_limits *lim) {
    pthread_mutex_lock(&F.mu);
    F_limits = *lim;
    pthread_mutex_unlock(&F.mu);
}

int coord_router_limits(struct coord_router *r, struct coord_limits *out) {
    (void)r;
    pthread_mutex_lock(&F.mu);
    *out = F_limits;
    out->nodes = NULL;
    if (F_limits.n_nodes > 0 && (out->nodes = malloc((size_t)F_limits.n_nodes * sizeof *out->nodes)))
        memcpy(out->nodes, F_limits.nodes, (size_t)F_limits.n_nodes * sizeof *out->nodes);
    int rc = F_limits.n_nodes > 0 && !out->nodes ? KVR_ENOMEM : KVR_OK;
    pthread_mutex_unlock(&F.mu);
    return rc;
}

void fake_router_stats(struct fake_router_stats *out) {
    pthread_mutex_lock(&F.mu);
    *out = F.stats;
    pthread_mutex_unlock(&F.mu);
}

int fake_router_cancels_of(uint64_t id) {
    int n = 0;
    pthread_mutex_lock(&F.mu);
    for (int i = 0; i < F.n_reqs; i++)
        if (F.reqs[i].id == id)
            n = F.reqs[i].n_cancels;
    pthread_mutex_unlock(&F.mu);
    return n;
}

const struct coord_request *fake_router_last(void) {
    /* A snapshot taken under the lock, for the test's thread. */
    static struct coord_request snap;
    static int snap_tokens[4096];
    pthread_mutex_lock(&F.mu);
    snap = F.last;
    int n = F.last.n_tokens < 4096 ? F.last.n_tokens : 4096;
    if (F.last_tokens && n > 0)
        memcpy(snap_tokens, F.last_tokens, (size_t)n * sizeof *snap_tokens);
    snap.tokens = F.last_tokens ? snap_tokens : NULL;
    pthread_mutex_unlock(&F.mu);
    return &snap;
}

static void sleep_us(int us) {
    struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static void *req_thread(void *arg) {
    struct fake_req *r = arg;
    const struct fake_router_cfg *cfg = &r->cfg;
    int emit = cfg->emit < 0 ? r->max_tokens : cfg->emit;
    if (cfg->tokens && emit > cfg->n_tokens)
        emit = cfg->n_tokens;
    int ids[64];
    int sent = 0, cancelled = 0;
    while (sent < emit) {
        if (cfg->delay_us)
            sleep_us(cfg->delay_us);
        pthread_mutex_lock(&F.mu);
        cancelled = r->cancel_flag;
        pthread_mutex_unlock(&F.mu);
        if (cancelled)
            break;
        int n = 0;
        for (; n < cfg->per_call && n < 64 && sent + n < emit; n++) {
            int i = sent + n;
            ids[n] = cfg->tokens ? cfg->tokens[i] : 3 + (int)((r->seed + (uint64_t)i) % 500);
        }
        coord_grpc_stream_ops.tokens(r->stream, ids, n);
        sent += n;
    }
    pthread_mutex_lock(&F.mu);
    if (cfg->stall) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 30;
        while (!r->cancel_flag)
            if (pthread_cond_timedwait(&F.cv, &F.mu, &until) == ETIMEDOUT)
                break;
    }
    cancelled = r->cancel_flag;
    r->finished = 1;
    F.stats.n_finishes++;
    pthread_mutex_unlock(&F.mu);

    struct coord_usage u = cfg->usage;
    u.generated_tokens = sent;
    if (cancelled)
        coord_grpc_stream_ops.finish(r->stream, KVR_OK, COORD_FINISH_CANCELLED, &u, "");
    else
        coord_grpc_stream_ops.finish(r->stream, cfg->finish_status, cfg->finish_reason, &u,
                                     cfg->finish_msg ? cfg->finish_msg : "");

    pthread_mutex_lock(&F.mu);
    F.stats.n_running--;
    pthread_cond_broadcast(&F.cv);
    pthread_mutex_unlock(&F.mu);
    return NULL;
}

int coord_router_submit(struct coord_router *r, struct coord_request *req, uint64_t *id) {
    (void)r;
    pthread_mutex_lock(&F.mu);
    F.stats.n_submits++;
    free(F.last_tokens);
    F.last = *req;
    F.last_tokens = req->tokens; /* ownership taken, as the contract says */
    req->tokens = NULL;
    int rc = F.cfg.submit_status;
    if (rc == KVR_OK && F.n_reqs >= FAKE_MAX_REQS)
        rc = KVR_EFULL;
    if (rc != KVR_OK) {
        pthread_mutex_unlock(&F.mu);
        return rc;
    }
    struct fake_req *q = &F.reqs[F.n_reqs];
    memset(q, 0, sizeof *q);
    q->id = F.next_id++;
    q->stream = F.last.stream;
    q->max_tokens = F.last.max_tokens;
    q->seed = F.last.seed;
    q->cfg = F.cfg;
    *id = q->id;
    if (pthread_create(&q->thread, NULL, req_thread, q) != 0) {
        pthread_mutex_unlock(&F.mu);
        return KVR_ENOMEM;
    }
    F.n_reqs++;
    F.stats.n_admitted++;
    F.stats.n_running++;
    pthread_mutex_unlock(&F.mu);
    return KVR_OK;
}

void coord_router_cancel(struct coord_router *r, uint64_t id) {
    (void)r;
    pthread_mutex_lock(&F.mu);
    F.stats.n_cancels++;
    int found = 0;
    for (int i = 0; i < F.n_reqs; i++) {
        struct fake_req *q = &F.reqs[i];
        if (q->id != id)
            continue;
        found = 1;
        q->n_cancels++;
        if (q->finished)
            F.stats.n_cancel_after_finish++;
        q->cancel_flag = 1;
    }
    if (!found)
        F.stats.n_cancel_unknown++;
    pthread_cond_broadcast(&F.cv);
    pthread_mutex_unlock(&F.mu);
}

int coord_router_status(struct coord_router *r, struct coord_cluster_status *out) {
    (void)r;
    pthread_mutex_lock(&F.mu);
    *out = F.status;
    out->nodes = NULL;
    if (F.status.n_nodes > 0 && (out->nodes = malloc((size_t)F.status.n_nodes * sizeof *out->nodes)))
        memcpy(out->nodes, F.status.nodes, (size_t)F.status.n_nodes * sizeof *out->nodes);
    int rc = F.status.n_nodes > 0 && !out->nodes ? KVR_ENOMEM : KVR_OK;
    pthread_mutex_unlock(&F.mu);
    return rc;
}

int fake_router_wait_idle(double timeout_s) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)timeout_s;
    until.tv_nsec += (long)((timeout_s - (double)(time_t)timeout_s) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    int rc = 0;
    pthread_mutex_lock(&F.mu);
    while (F.stats.n_running > 0)
        if (pthread_cond_timedwait(&F.cv, &F.mu, &until) == ETIMEDOUT) {
            rc = -1;
            break;
        }
    pthread_mutex_unlock(&F.mu);
    if (rc)
        return rc;
    for (int i = 0; i < F.n_reqs; i++)
        if (!F.reqs[i].joined) {
            pthread_join(F.reqs[i].thread, NULL);
            F.reqs[i].joined = 1;
        }
    return 0;
}

void fake_router_reset(void) {
    fake_router_wait_idle(60);
    pthread_mutex_lock(&F.mu);
    F.n_reqs = 0;
    F.next_id = 100;
    memset(&F.stats, 0, sizeof F.stats);
    free(F.last_tokens);
    F.last_tokens = NULL;
    memset(&F.last, 0, sizeof F.last);
    pthread_mutex_unlock(&F.mu);
}

/* The elastic pool's calls: accept a target in [1, 8] and a drain of rank 2 only, so the
 * gRPC tests can check both answers and both status mappings. */
int coord_router_scale(struct coord_router *r, int n_decode, char *msg, size_t len) {
    (void)r;
    if (n_decode < 1 || n_decode > 8) {
        snprintf(msg, len, "decode target %d is outside [1, 8]", n_decode);
        return KVR_EINVAL;
    }
    snprintf(msg, len, "decode pool target %d", n_decode);
    return KVR_OK;
}

int coord_router_drain(struct coord_router *r, int rank, char *msg, size_t len) {
    (void)r;
    if (rank != 2) {
        snprintf(msg, len, "rank %d is not a decode node of this cluster", rank);
        return KVR_EINVAL;
    }
    snprintf(msg, len, "draining rank %d", rank);
    return KVR_OK;
}
