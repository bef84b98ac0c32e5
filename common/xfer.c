/* xfer.c - the MPI transport (see xfer.h). Owns the duplicated communicator, the send
 * buffers in flight and the receive buffer. Every role's main loop calls it from its
 * MPI thread only. */
#include "xfer.h"

#include <mpi.h>
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

struct kvr_xfer {
    MPI_Comm comm;
    int rank, size, coord_rank;
    int *roles;             /* (size) enum kvr_role of every rank */
    char (*hosts)[64];      /* (size) host names */
    unsigned char *dead;    /* (size) 1 once marked dead */
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

const char *kvr_role_name(int role) {
    switch (role) {
    case KVR_ROLE_COORD:
        return "coordinator";
    case KVR_ROLE_PREFILL:
        return "prefill";
    case KVR_ROLE_DECODE:
        return "decode";
    }
    return "?";
}

const char *kvr_msg_kind_name(int kind) {
    switch (kind) {
    case KVR_MSG_HELLO:
        return "HELLO";
    case KVR_MSG_STATUS:
        return "STATUS";
    case KVR_MSG_TOKENS:
        return "TOKENS";
    case KVR_MSG_PREFILL_DONE:
        return "PREFILL_DONE";
    case KVR_MSG_PREFILL_REQ:
        return "PREFILL_REQ";
    case KVR_MSG_CANCEL:
        return "CANCEL";
    case KVR_MSG_SHUTDOWN:
        return "SHUTDOWN";
    case KVR_MSG_PING:
        return "PING";
    case KVR_MSG_SEQ_BEGIN:
        return "SEQ_BEGIN";
    case KVR_MSG_KV:
        return "KV";
    case KVR_MSG_SEQ_READY:
        return "SEQ_READY";
    case KVR_MSG_SEQ_ABORT:
        return "SEQ_ABORT";
    }
    return NULL;
}

/* ---- setup ---------------------------------------------------------------------- */

#define LAYOUT_NBYTES (4 + 64)

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
    MPI_Comm_rank(x->comm, &x->rank);
    MPI_Comm_size(x->comm, &x->size);
    x->roles = calloc((size_t)x->size, sizeof *x->roles);
    x->hosts = calloc((size_t)x->size, sizeof *x->hosts);
    x->dead = calloc((size_t)x->size, 1);
    all = malloc((size_t)x->size * LAYOUT_NBYTES);
    if (!x->roles || !x->hosts || !x->dead || !all) {
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
    for (int r = 0; r < x->size; r++) {
        struct kvr_rbuf rd = {.p = all + (size_t)r * LAYOUT_NBYTES, .len = LAYOUT_NBYTES};
        x->roles[r] = kvr_r_i32(&rd);
        memcpy(x->hosts[r], kvr_r_take(&rd, 64), 64);
        x->hosts[r][63] = '\0';
        if (x->roles[r] == KVR_ROLE_COORD) {
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
    free(x->roles);
    free(x->hosts);
    free(x->dead);
    MPI_Comm_free(&x->comm);
    free(x);
    return rc;
}

void kvr_xfer_finalize(struct kvr_xfer *x, double flush_s) {
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
    for (int i = 0; i < x->n_slots; i++) {
        if (x->slots[i].busy)
            continue; /* MPI may still own it: leave it to process exit */
        free(x->slots[i].buf);
    }
    free(x->slots);
    free(x->rbuf);
    free(x->roles);
    free(x->hosts);
    free(x->dead);
    MPI_Comm_free(&x->comm);
    free(x);
    MPI_Finalize();
}

_Noreturn void kvr_xfer_abort(struct kvr_xfer *x, int code) {
    MPI_Abort(x ? x->comm : MPI_COMM_WORLD, code);
    exit(code);
}

int kvr_xfer_rank(const struct kvr_xfer *x) { return x->rank; }
int kvr_xfer_size(const struct kvr_xfer *x) { return x->size; }
int kvr_xfer_coord_rank(const struct kvr_xfer *x) { return x->coord_rank; }

int kvr_xfer_role_of(const struct kvr_xfer *x, int rank) {
    return rank >= 0 && rank < x->size ? x->roles[rank] : -1;
}

const char *kvr_xfer_host_of(const struct kvr_xfer *x, int rank) {
    return rank >= 0 && rank < x->size ? x->hosts[rank] : "?";
}

void kvr_xfer_mark_dead(struct kvr_xfer *x, int rank) {
    if (rank < 0 || rank >= x->size)
        return;
    x->dead[rank] = 1;
    /* Its sends in flight may never complete: let MPI finish them on its own (or not) and
     * give their buffers up to it, so the slots are free and finalize does not wait. */
    for (int i = 0; i < x->n_slots; i++) {
        struct send_slot *s = &x->slots[i];
        if (!s->busy || s->dst != rank)
            continue;
        MPI_Request_free(&s->req);
        s->buf = NULL; /* still MPI's to read: never reused, never freed */
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

/* Starts a message: a slot with room for the header and body_len body bytes, header
 * written. The caller writes the body into w and calls post(). */
static struct send_slot *begin(struct kvr_xfer *x, int dst, int kind, uint64_t req_id,
                               size_t body_len, struct kvr_wbuf *w, int *rc) {
    if (dst < 0 || dst >= x->size) {
        *rc = KVR_EINVAL;
        return NULL;
    }
    if (x->dead[dst]) {
        *rc = KVR_EUNAVAIL;
        return NULL;
    }
    if (body_len > (size_t)INT32_MAX - KVR_MSG_HDR_NBYTES) {
        *rc = KVR_ERANGE;
        return NULL;
    }
    kvr_xfer_progress(x);
    struct send_slot *s = get_slot(x, KVR_MSG_HDR_NBYTES + body_len);
    if (!s) {
        *rc = KVR_ENOMEM;
        return NULL;
    }
    *w = (struct kvr_wbuf){.p = s->buf, .cap = KVR_MSG_HDR_NBYTES + body_len};
    kvr_w_u32(w, KVR_MSG_MAGIC);
    kvr_w_u16(w, KVR_MSG_VERSION);
    kvr_w_u16(w, (uint16_t)kind);
    kvr_w_u64(w, req_id);
    *rc = KVR_OK;
    return s;
}

static int post(struct kvr_xfer *x, struct send_slot *s, struct kvr_wbuf *w, int dst, int tag) {
    KVR_ASSERT(!w->err && w->len == w->cap);
    int rc = MPI_Isend(s->buf, (int)w->len, MPI_BYTE, dst, tag, x->comm, &s->req);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "MPI_Isend");
    s->busy = 1;
    s->dst = dst;
    return KVR_OK;
}

#define REQ_FIXED_NBYTES (8 + 4 * 4 + 8 + 4 * 4 + 4 * 2 + 8)

static void write_req(struct kvr_wbuf *w, const struct kvr_req_params *p, const int *prompt) {
    kvr_w_u64(w, p->req_id);
    kvr_w_i32(w, p->n_prompt);
    kvr_w_i32(w, p->max_tokens);
    kvr_w_f32(w, p->temperature);
    kvr_w_f32(w, p->top_p);
    kvr_w_u64(w, p->seed);
    kvr_w_i32(w, p->stop_at_eos);
    kvr_w_i32(w, (int32_t)p->policy.policy);
    kvr_w_i32(w, p->policy.window);
    kvr_w_i32(w, p->policy.sinks);
    kvr_w_i32(w, p->prefill_rank);
    kvr_w_i32(w, p->decode_rank);
    kvr_w_f64(w, p->t_coord_ms);
    for (int i = 0; i < p->n_prompt; i++)
        kvr_w_i32(w, prompt[i]);
}

static int send_req(struct kvr_xfer *x, int dst, int tag, int kind, const struct kvr_req_params *p,
                    const int *prompt) {
    int rc;
    struct kvr_wbuf w;
    if (p->n_prompt < 1 || p->n_prompt > (1 << 24))
        return KVR_EINVAL;
    struct send_slot *s =
        begin(x, dst, kind, p->req_id, REQ_FIXED_NBYTES + 4 * (size_t)p->n_prompt, &w, &rc);
    if (!s)
        return rc;
    write_req(&w, p, prompt);
    return post(x, s, &w, dst, tag);
}

int kvr_xfer_send_prefill_req(struct kvr_xfer *x, int dst, const struct kvr_req_params *p,
                              const int *prompt) {
    return send_req(x, dst, KVR_TAG_CTRL, KVR_MSG_PREFILL_REQ, p, prompt);
}

int kvr_xfer_send_seq_begin(struct kvr_xfer *x, int dst, const struct kvr_req_params *p,
                            const int *prompt) {
    return send_req(x, dst, KVR_TAG_SEQ, KVR_MSG_SEQ_BEGIN, p, prompt);
}

#define HELLO_NBYTES (4 * 2 + 64 + 4 * 5 + 8 + 8 + 4 * 2)

int kvr_xfer_send_hello(struct kvr_xfer *x, int dst, const struct kvr_hello *h) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_HELLO, 0, HELLO_NBYTES, &w, &rc);
    if (!s)
        return rc;
    char host[64] = {0};
    memcpy(host, h->host, strnlen(h->host, 63));
    kvr_w_i32(&w, h->role);
    kvr_w_i32(&w, h->colocated);
    kvr_w_bytes(&w, host, 64);
    kvr_w_i32(&w, h->n_layers);
    kvr_w_i32(&w, h->kv_dim);
    kvr_w_i32(&w, h->block_tokens);
    kvr_w_i32(&w, h->seq_len);
    kvr_w_i32(&w, h->vocab_size);
    kvr_w_u64(&w, h->fingerprint);
    kvr_w_u64(&w, h->kv_bytes_total);
    kvr_w_i32(&w, h->n_blocks_total);
    kvr_w_i32(&w, h->n_threads);
    return post(x, s, &w, dst, KVR_TAG_REPORT);
}

#define STATUS_NBYTES (8 * 3 + 4 * 4 + 8 * 3)

int kvr_xfer_send_status(struct kvr_xfer *x, int dst, const struct kvr_node_report *r) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_STATUS, 0, STATUS_NBYTES, &w, &rc);
    if (!s)
        return rc;
    kvr_w_u64(&w, r->kv_bytes_total);
    kvr_w_u64(&w, r->kv_bytes_used);
    kvr_w_u64(&w, r->kv_bytes_free);
    kvr_w_i32(&w, r->n_blocks_total);
    kvr_w_i32(&w, r->n_blocks_free);
    kvr_w_i32(&w, r->running);
    kvr_w_i32(&w, r->queued);
    kvr_w_u64(&w, r->queued_prompt_tokens);
    kvr_w_u64(&w, r->steps);
    kvr_w_u64(&w, r->tokens_out);
    return post(x, s, &w, dst, KVR_TAG_REPORT);
}

#define TOK_EVENT_NBYTES (8 + 4 * 4)

int kvr_xfer_send_tokens(struct kvr_xfer *x, int dst, const struct kvr_tok_event *ev, int n) {
    int rc;
    struct kvr_wbuf w;
    if (n < 1)
        return KVR_EINVAL;
    for (; n > KVR_TOKENS_MAX_EVENTS; ev += KVR_TOKENS_MAX_EVENTS, n -= KVR_TOKENS_MAX_EVENTS)
        if ((rc = kvr_xfer_send_tokens(x, dst, ev, KVR_TOKENS_MAX_EVENTS)) != KVR_OK)
            return rc;
    struct send_slot *s = begin(x, dst, KVR_MSG_TOKENS, 0, 4 + (size_t)n * TOK_EVENT_NBYTES, &w, &rc);
    if (!s)
        return rc;
    kvr_w_i32(&w, n);
    for (int i = 0; i < n; i++) {
        kvr_w_u64(&w, ev[i].req_id);
        kvr_w_i32(&w, ev[i].token);
        kvr_w_i32(&w, ev[i].finish);
        kvr_w_i32(&w, ev[i].status);
        kvr_w_i32(&w, ev[i].n_generated);
    }
    return post(x, s, &w, dst, KVR_TAG_REPORT);
}

int kvr_xfer_send_prefill_done(struct kvr_xfer *x, int dst, uint64_t req_id,
                               const struct kvr_prefill_done *d) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_PREFILL_DONE, req_id, 4 * 2 + 8 * 2, &w, &rc);
    if (!s)
        return rc;
    kvr_w_i32(&w, d->status);
    kvr_w_i32(&w, d->n_prompt);
    kvr_w_f64(&w, d->queue_ms);
    kvr_w_f64(&w, d->prefill_ms);
    return post(x, s, &w, dst, KVR_TAG_REPORT);
}

int kvr_xfer_send_cancel(struct kvr_xfer *x, int dst, uint64_t req_id) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_CANCEL, req_id, 0, &w, &rc);
    return s ? post(x, s, &w, dst, KVR_TAG_CTRL) : rc;
}

int kvr_xfer_send_shutdown(struct kvr_xfer *x, int dst) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_SHUTDOWN, 0, 0, &w, &rc);
    return s ? post(x, s, &w, dst, KVR_TAG_CTRL) : rc;
}

int kvr_xfer_send_ping(struct kvr_xfer *x, int dst) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_PING, 0, 0, &w, &rc);
    return s ? post(x, s, &w, dst, KVR_TAG_CTRL) : rc;
}

int kvr_xfer_send_kv(struct kvr_xfer *x, int dst, uint64_t req_id, const void *wire, size_t len) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_KV, req_id, len, &w, &rc);
    if (!s)
        return rc;
    kvr_w_bytes(&w, wire, len);
    return post(x, s, &w, dst, KVR_TAG_SEQ);
}

int kvr_xfer_send_seq_ready(struct kvr_xfer *x, int dst, uint64_t req_id,
                            const struct kvr_seq_ready *r) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_SEQ_READY, req_id, 4 + 8 + 4 + 8, &w, &rc);
    if (!s)
        return rc;
    kvr_w_i32(&w, r->first_token);
    kvr_w_u64(&w, r->rng);
    kvr_w_i32(&w, r->n_kv_msgs);
    kvr_w_f64(&w, r->prefill_ms);
    return post(x, s, &w, dst, KVR_TAG_SEQ);
}

int kvr_xfer_send_seq_abort(struct kvr_xfer *x, int dst, uint64_t req_id, int status) {
    int rc;
    struct kvr_wbuf w;
    struct send_slot *s = begin(x, dst, KVR_MSG_SEQ_ABORT, req_id, 4, &w, &rc);
    if (!s)
        return rc;
    kvr_w_i32(&w, status);
    return post(x, s, &w, dst, KVR_TAG_SEQ);
}

/* ---- receiving ------------------------------------------------------------------ */

int kvr_xfer_poll(struct kvr_xfer *x, const int *tags, int n_tags, struct kvr_msg *m) {
    for (int t = 0; t < n_tags; t++) {
        int flag = 0;
        MPI_Message msg;
        MPI_Status st;
        int rc = MPI_Improbe(MPI_ANY_SOURCE, tags[t], x->comm, &flag, &msg, &st);
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
        struct kvr_rbuf r = {.p = x->rbuf, .len = (size_t)count};
        uint32_t magic = kvr_r_u32(&r);
        uint16_t version = kvr_r_u16(&r);
        uint16_t kind = kvr_r_u16(&r);
        uint64_t req_id = kvr_r_u64(&r);
        if (r.err || magic != KVR_MSG_MAGIC || version != KVR_MSG_VERSION || !kvr_msg_kind_name(kind)) {
            KVR_LOG_ERROR("dropped a malformed %d-byte message from rank %d tag %d (magic %08x "
                          "version %u kind %u)", count, st.MPI_SOURCE, tags[t], magic, version, kind);
            return KVR_EFORMAT;
        }
        m->src = st.MPI_SOURCE;
        m->tag = tags[t];
        m->kind = kind;
        m->req_id = req_id;
        m->body = x->rbuf + KVR_MSG_HDR_NBYTES;
        m->body_len = (size_t)count - KVR_MSG_HDR_NBYTES;
        return KVR_OK;
    }
    return KVR_EAGAIN;
}

static int parse_end(const struct kvr_msg *m, struct kvr_rbuf *r) {
    if (r->err || r->off != r->len) {
        KVR_LOG_ERROR("%s message from rank %d has %zu body bytes, expected %zu",
                      kvr_msg_kind_name(m->kind), m->src, m->body_len, r->off);
        return KVR_EFORMAT;
    }
    return KVR_OK;
}

int kvr_msg_parse_req(const struct kvr_msg *m, struct kvr_req_params *p, int *prompt,
                      int max_prompt, int vocab) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    p->req_id = kvr_r_u64(&r);
    p->n_prompt = kvr_r_i32(&r);
    p->max_tokens = kvr_r_i32(&r);
    p->temperature = kvr_r_f32(&r);
    p->top_p = kvr_r_f32(&r);
    p->seed = kvr_r_u64(&r);
    p->stop_at_eos = kvr_r_i32(&r);
    int32_t pol = kvr_r_i32(&r);
    p->policy.window = kvr_r_i32(&r);
    p->policy.sinks = kvr_r_i32(&r);
    p->prefill_rank = kvr_r_i32(&r);
    p->decode_rank = kvr_r_i32(&r);
    p->t_coord_ms = kvr_r_f64(&r);
    if (r.err || p->req_id != m->req_id || p->n_prompt < 1 || p->max_tokens < 0 ||
        pol < KVR_KV_DENSE || pol > KVR_KV_SINK || !(p->temperature >= 0.0f) ||
        !(p->top_p >= 0.0f && p->top_p <= 1.0f)) {
        KVR_LOG_ERROR("bad %s from rank %d", kvr_msg_kind_name(m->kind), m->src);
        return KVR_EFORMAT;
    }
    p->policy.policy = (enum kvr_kv_policy)pol;
    if (p->n_prompt > max_prompt) {
        KVR_LOG_ERROR("req=%llu prompt of %d tokens exceeds %d", (unsigned long long)p->req_id,
                      p->n_prompt, max_prompt);
        return KVR_ERANGE;
    }
    for (int i = 0; i < p->n_prompt; i++) {
        prompt[i] = kvr_r_i32(&r);
        if (!r.err && (prompt[i] < 0 || prompt[i] >= vocab)) {
            /* Refused here, for this request only: in a batch it would fail the whole
             * forward pass, and with it every other sequence of the step. */
            KVR_LOG_ERROR("req=%llu prompt token %d at %d is outside the vocabulary of %d",
                          (unsigned long long)p->req_id, prompt[i], i, vocab);
            return KVR_ERANGE;
        }
    }
    return parse_end(m, &r);
}

int kvr_msg_parse_hello(const struct kvr_msg *m, struct kvr_hello *h) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    h->role = kvr_r_i32(&r);
    h->colocated = kvr_r_i32(&r);
    const unsigned char *host = kvr_r_take(&r, 64);
    if (host) {
        memcpy(h->host, host, 64);
        h->host[63] = '\0';
    }
    h->n_layers = kvr_r_i32(&r);
    h->kv_dim = kvr_r_i32(&r);
    h->block_tokens = kvr_r_i32(&r);
    h->seq_len = kvr_r_i32(&r);
    h->vocab_size = kvr_r_i32(&r);
    h->fingerprint = kvr_r_u64(&r);
    h->kv_bytes_total = kvr_r_u64(&r);
    h->n_blocks_total = kvr_r_i32(&r);
    h->n_threads = kvr_r_i32(&r);
    return parse_end(m, &r);
}

int kvr_msg_parse_status(const struct kvr_msg *m, struct kvr_node_report *s) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    s->kv_bytes_total = kvr_r_u64(&r);
    s->kv_bytes_used = kvr_r_u64(&r);
    s->kv_bytes_free = kvr_r_u64(&r);
    s->n_blocks_total = kvr_r_i32(&r);
    s->n_blocks_free = kvr_r_i32(&r);
    s->running = kvr_r_i32(&r);
    s->queued = kvr_r_i32(&r);
    s->queued_prompt_tokens = kvr_r_u64(&r);
    s->steps = kvr_r_u64(&r);
    s->tokens_out = kvr_r_u64(&r);
    return parse_end(m, &r);
}

int kvr_msg_parse_tokens(const struct kvr_msg *m, struct kvr_tok_event *ev, int max_ev, int *n) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    int32_t cnt = kvr_r_i32(&r);
    *n = 0;
    if (r.err || cnt < 1 || cnt > max_ev ||
        (size_t)cnt * TOK_EVENT_NBYTES != m->body_len - 4) {
        KVR_LOG_ERROR("bad TOKENS message from rank %d (%d events, %zu bytes)", m->src, cnt, m->body_len);
        return KVR_EFORMAT;
    }
    for (int i = 0; i < cnt; i++) {
        ev[i].req_id = kvr_r_u64(&r);
        ev[i].token = kvr_r_i32(&r);
        ev[i].finish = kvr_r_i32(&r);
        ev[i].status = kvr_r_i32(&r);
        ev[i].n_generated = kvr_r_i32(&r);
        if (ev[i].finish < KVR_FINISH_NONE || ev[i].finish > KVR_FINISH_ERROR) {
            KVR_LOG_ERROR("bad finish reason %d from rank %d", ev[i].finish, m->src);
            return KVR_EFORMAT;
        }
    }
    *n = cnt;
    return parse_end(m, &r);
}

int kvr_msg_parse_prefill_done(const struct kvr_msg *m, struct kvr_prefill_done *d) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    d->status = kvr_r_i32(&r);
    d->n_prompt = kvr_r_i32(&r);
    d->queue_ms = kvr_r_f64(&r);
    d->prefill_ms = kvr_r_f64(&r);
    return parse_end(m, &r);
}

int kvr_msg_parse_seq_ready(const struct kvr_msg *m, struct kvr_seq_ready *s) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    s->first_token = kvr_r_i32(&r);
    s->rng = kvr_r_u64(&r);
    s->n_kv_msgs = kvr_r_i32(&r);
    s->prefill_ms = kvr_r_f64(&r);
    return parse_end(m, &r);
}

int kvr_msg_parse_seq_abort(const struct kvr_msg *m, int *status) {
    struct kvr_rbuf r = {.p = m->body, .len = m->body_len};
    *status = kvr_r_i32(&r);
    return parse_end(m, &r);
}
