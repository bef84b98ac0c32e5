/* chaos.c - the chaos run (scripts/chaos.sh): a real cluster under mixed load at about
 * 80% of its measured capacity while a node is killed (SIGKILL) or frozen past the node
 * timeout (SIGSTOP, then SIGCONT: it must be taken back) at a fixed period. Every call
 * is accounted for: completed (OK, and golden text for greedy golden prompts, the exact
 * length for fixed-length ones), failed with a clean status, or lost (no final status
 * within its bound, an unexpected status, or a wrong output). At the end the load stops
 * and the pools must return to empty.
 *
 * Usage: chaos [--seconds S] [--period S] [--calibrate S] [--json]
 * Exit: 0 when nothing was lost or wrong and the pools ended empty, 1 otherwise. */
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cluster_harness.h"
#include "golden.h"
#include "grpc_client.h"
#include "kv_cache.h"
#include "model.h"
#include "tokenizer.h"

#define MAX_AGE_S 120.0     /* --max-request-age of the cluster */
#define CLIENT_SLACK_S 60.0 /* a call still open this long after the server's bound is lost */
#define N_CHANNELS 8
#define MAX_INFLIGHT 2000

enum kind { K_GOLDEN, K_WINDOW, K_SAMPLED, K_CANCEL, K_DEADLINE, K_INVALID, N_KINDS };
static const char *kind_name[N_KINDS] = {"golden", "window", "sampled", "cancel", "deadline", "invalid"};

static struct golden_run golden[8];
static int golden_len[8], n_golden;
static struct cluster cl;
static struct kvr_client *chan[N_CHANNELS];

static const char *shared_path(const char *rel) {
    static char buf[2][1024];
    static int k;
    k ^= 1;
    snprintf(buf[k], sizeof buf[k], "%s/%s", KVR_SHARED_DIR, rel);
    return buf[k];
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_s(double s) {
    if (s <= 0)
        return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* ---- one call ------------------------------------------------------------------------- */

struct call {
    enum kind kind;
    int g;                 /* golden prompt */
    struct kvr_gen_params p;
    int cancel_after;
    char *text;
    size_t len, cap;
    int n_tokens;
    int code;
    char msg[256];
    struct kvr_gen_usage u;
    double t0, t1;
    pthread_t th;
    atomic_int done;
};

static void append(struct call *c, const char *s) {
    size_t n = strlen(s);
    if (c->len + n + 1 > c->cap) {
        c->cap = (c->len + n + 1) * 2;
        char *t = realloc(c->text, c->cap);
        if (!t)
            abort();
        c->text = t;
    }
    memcpy(c->text + c->len, s, n + 1);
    c->len += n;
}

static int on_msg(void *ud, const struct kvr_gen_msg *m) {
    struct call *c = ud;
    if (m->prompt_text)
        append(c, m->prompt_text);
    if (m->has_token) {
        append(c, m->text);
        c->n_tokens++;
    }
    return c->cancel_after > 0 && c->n_tokens >= c->cancel_after;
}

static atomic_uint chan_rr;

static void *call_main(void *arg) {
    struct call *c = arg;
    struct kvr_rpc_status st;
    c->t0 = now_s();
    c->code = kvr_client_generate(chan[atomic_fetch_add(&chan_rr, 1) % N_CHANNELS], &c->p, on_msg, c, &c->u, &st);
    c->t1 = now_s();
    snprintf(c->msg, sizeof c->msg, "%s", st.message);
    if (!c->text)
        append(c, "");
    atomic_store(&c->done, 1);
    return NULL;
}

static uint64_t rng = 0x5eed5eed;
static uint64_t rnd(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return rng >> 17;
}

static const int bos_only[1] = {1};

static struct call *new_call(enum kind k) {
    struct call *c = calloc(1, sizeof *c);
    if (!c)
        abort();
    c->kind = k;
    c->g = (int)(rnd() % (uint64_t)n_golden);
    struct kvr_gen_params p = {.prompt = golden[c->g].prompt, .temperature = 0, .kv_policy = KVR_KV_DENSE,
                               .kv_sinks = -1, .timeout_s = MAX_AGE_S + CLIENT_SLACK_S};
    if (!golden[c->g].prompt[0]) {
        p.prompt = NULL;
        p.prompt_tokens = bos_only;
        p.n_prompt_tokens = 1;
    }
    switch (k) {
    case K_GOLDEN:
    case K_CANCEL:
    case K_DEADLINE:
        p.max_tokens = golden[c->g].steps - golden_len[c->g] + 1;
        if (k == K_CANCEL)
            c->cancel_after = 1 + (int)(rnd() % 100);
        if (k == K_DEADLINE)
            p.timeout_s = 0.1 + (double)(rnd() % 1500) / 1000.0;
        break;
    case K_WINDOW:
        p.kv_policy = rnd() % 2 ? KVR_KV_WINDOW : KVR_KV_SINK;
        p.kv_window = 64 + (int)(rnd() % 192);
        p.max_tokens = 50 + (int)(rnd() % 400);
        p.ignore_eos = 1;
        p.temperature = 0.8f;
        p.seed = 1 + rnd();
        break;
    case K_SAMPLED:
        p.temperature = 0.8f;
        p.top_p = 0.9f;
        p.seed = 1 + rnd();
        p.max_tokens = 50 + (int)(rnd() % 150);
        p.ignore_eos = 1;
        break;
    case K_INVALID:
        p.kv_policy = KVR_KV_WINDOW;
        p.kv_window = 2000; /* longer than the context: refused at the edge */
        p.max_tokens = 1500;
        break;
    default:
        break;
    }
    c->p = p;
    return c;
}

static enum kind pick_kind(void) {
    int x = (int)(rnd() % 100);
    return x < 30 ? K_GOLDEN : x < 55 ? K_WINDOW : x < 75 ? K_SAMPLED : x < 87 ? K_CANCEL : x < 97 ? K_DEADLINE
                                                                                                  : K_INVALID;
}

/* ---- accounting ------------------------------------------------------------------------- */

#define C_OK 0
#define C_CANCELLED 1
#define C_INVALID_ARGUMENT 3
#define C_DEADLINE_EXCEEDED 4
#define C_RESOURCE_EXHAUSTED 8
#define C_ABORTED 10
#define C_UNAVAILABLE 14

struct tally {
    long sent, completed, clean, lost, wrong;
    long by_code[17];
    long by_kind[N_KINDS];
    double lat_sum;
};

/* Judges one ended call. */
static void judge(struct tally *t, struct call *c) {
    int code = c->code >= 0 && c->code <= 16 ? c->code : 2;
    t->by_code[code]++;
    t->by_kind[c->kind]++;
    int ok_output = 1;
    if (code == C_OK) {
        if (c->kind == K_GOLDEN || c->kind == K_CANCEL || c->kind == K_DEADLINE)
            ok_output = !strcmp(c->text, golden[c->g].text);
        else if (c->kind == K_WINDOW || c->kind == K_SAMPLED)
            ok_output = c->n_tokens == c->p.max_tokens && c->u.generated_tokens == c->p.max_tokens;
        else
            ok_output = 0; /* an invalid request must not run */
        if (ok_output) {
            t->completed++;
            t->lat_sum += c->t1 - c->t0;
        } else {
            t->wrong++;
            fprintf(stderr, "chaos: WRONG output for a %s call (%d tokens, want %d)\n", kind_name[c->kind],
                    c->n_tokens, c->p.max_tokens);
        }
        return;
    }
    /* A prefix of the golden text before a failure is still right. */
    if (c->kind == K_GOLDEN || c->kind == K_CANCEL || c->kind == K_DEADLINE)
        ok_output = !strncmp(c->text, golden[c->g].text, strlen(c->text));
    int clean = 0;
    switch (code) {
    case C_CANCELLED:
        clean = c->kind == K_CANCEL;
        break;
    case C_DEADLINE_EXCEEDED:
        /* The client's own deadline on a call without a short one means nobody ended it. */
        clean = c->kind == K_DEADLINE || (c->t1 - c->t0 < MAX_AGE_S + CLIENT_SLACK_S / 2);
        break;
    case C_INVALID_ARGUMENT:
        clean = c->kind == K_INVALID;
        break;
    case C_RESOURCE_EXHAUSTED:
    case C_UNAVAILABLE:
    case C_ABORTED:
        clean = c->kind != K_INVALID;
        break;
    default:
        clean = 0;
    }
    if (clean && ok_output) {
        t->clean++;
    } else {
        t->lost++;
        fprintf(stderr, "chaos: LOST a %s call: %s \"%s\" after %.1f s, %d tokens%s\n", kind_name[c->kind],
                kvr_grpc_code_name(code), c->msg, c->t1 - c->t0, c->n_tokens, ok_output ? "" : ", wrong text");
    }
}

struct inflight {
    struct call *c[MAX_INFLIGHT];
    int n;
};

static void reap(struct inflight *f, struct tally *t, int wait_all) {
    for (int i = 0; i < f->n;) {
        struct call *c = f->c[i];
        if (!wait_all && !atomic_load(&c->done)) {
            i++;
            continue;
        }
        pthread_join(c->th, NULL);
        judge(t, c);
        free(c->text);
        free(c);
        f->c[i] = f->c[--f->n];
    }
}

static void launch(struct inflight *f, struct tally *t, struct call *c) {
    while (f->n >= MAX_INFLIGHT) {
        reap(f, t, 0);
        sleep_s(0.01);
    }
    if (pthread_create(&c->th, NULL, call_main, c) != 0)
        abort();
    f->c[f->n++] = c;
    t->sent++;
}

/* ---- the cluster ---------------------------------------------------------------------------- */

struct nodeinfo {
    int rank;
    int decode;
    int alive;
};

static int nodes_now(struct nodeinfo *out, int max, int *waiting, int *running, uint64_t *used) {
    struct coord_cluster_status s = {0};
    struct kvr_rpc_status st;
    *waiting = *running = -1;
    *used = 0;
    if (kvr_client_cluster_status(chan[0], 10, &s, &st) != 0) {
        coord_cluster_status_deinit(&s);
        return -1;
    }
    int n = 0;
    for (int i = 0; i < s.n_nodes && n < max; i++) {
        out[n].rank = s.nodes[i].rank;
        out[n].decode = strcmp(s.nodes[i].role, "prefill") != 0;
        out[n].alive = s.nodes[i].alive;
        if (s.nodes[i].alive && out[n].decode)
            *used += s.nodes[i].kv_bytes_used + s.nodes[i].kv_bytes_reserved;
        n++;
    }
    *waiting = s.waiting_requests;
    *running = s.running_requests;
    coord_cluster_status_deinit(&s);
    return n;
}

struct thaw {
    pid_t pid;
    double after_s;
};

static void *thaw_main(void *arg) {
    struct thaw *t = arg;
    sleep_s(t->after_s);
    kill(t->pid, SIGCONT);
    return NULL;
}

/* Kills (even events) or freezes past the node timeout (odd events) a random live node,
 * keeping at least one prefill and two decode nodes alive. */
static void strike(int event, double node_timeout) {
    struct nodeinfo ns[64];
    int w, r;
    uint64_t used;
    int n = nodes_now(ns, 64, &w, &r, &used);
    int n_pre = 0, n_dec = 0;
    for (int i = 0; i < n; i++)
        if (ns[i].alive)
            ns[i].decode ? n_dec++ : n_pre++;
    int cand[64], n_cand = 0;
    int freeze = event % 2 == 1;
    for (int i = 0; i < n; i++) {
        if (!ns[i].alive)
            continue;
        if (!freeze && (ns[i].decode ? n_dec <= 2 : n_pre <= 1))
            continue;
        cand[n_cand++] = i;
    }
    if (n_cand == 0) {
        fprintf(stderr, "chaos: no node may be struck now\n");
        return;
    }
    struct nodeinfo *v = &ns[cand[rnd() % (uint64_t)n_cand]];
    pid_t pid = cluster_pid_of_rank(&cl, v->rank);
    if (pid <= 0)
        return;
    if (!freeze) {
        fprintf(stderr, "chaos: SIGKILL %s rank %d (pid %d)\n", v->decode ? "decode" : "prefill", v->rank, (int)pid);
        kill(pid, SIGKILL);
        return;
    }
    fprintf(stderr, "chaos: SIGSTOP %s rank %d (pid %d) for %.1f s\n", v->decode ? "decode" : "prefill", v->rank,
            (int)pid, 2 * node_timeout);
    kill(pid, SIGSTOP);
    /* Continued later by a thread, so arrivals go on meanwhile. */
    static struct thaw thaw;
    thaw = (struct thaw){pid, 2 * node_timeout};
    pthread_t th;
    if (pthread_create(&th, NULL, thaw_main, &thaw) == 0)
        pthread_detach(th);
    else
        kill(pid, SIGCONT);
}

int main(int argc, char **argv) {
    double seconds = 600, period = 60, calibrate = 20;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--period") && i + 1 < argc)
            period = atof(argv[++i]);
        else if (!strcmp(argv[i], "--calibrate") && i + 1 < argc)
            calibrate = atof(argv[++i]);
        else if (!strcmp(argv[i], "--json"))
            json = 1;
        else {
            fprintf(stderr, "usage: %s [--seconds S] [--period S] [--calibrate S] [--json]\n", argv[0]);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    char *paths[8];
    n_golden = golden_run_paths(paths, 8);
    struct kvr_model *m = NULL;
    struct kvr_tokenizer *tk = NULL;
    if (n_golden < 1 || kvr_model_load(shared_path("models/stories260K.bin"), &m) != 0 ||
        kvr_tokenizer_load(shared_path("models/tok512.bin"), kvr_model_config(m)->vocab_size, &tk) != 0) {
        fprintf(stderr, "chaos: cannot load ../shared\n");
        return 1;
    }
    for (int i = 0; i < n_golden; i++) {
        if (golden_run_load(paths[i], &golden[i]) != 0)
            return 1;
        free(paths[i]);
        int ids[1024];
        kvr_tokenizer_encode(tk, golden[i].prompt, 1, 0, ids, 1024, &golden_len[i]);
    }
    kvr_tokenizer_free(tk);
    kvr_model_free(m);

    /* 3 prefill + 6 decode nodes, small pools (memory pressure), steps slowed to 5 ms so
     * that the cluster, not the load generator, is the bottleneck on a small machine. */
    const double node_timeout = 2;
    const char *args[] = {"--prefill", "3", "--decode", "6", "--kv-memory", "4MiB", "--max-batch", "16",
                          "--node-timeout", "2", "--queue-timeout", "20", "--max-request-age", "120",
                          "--decode-args", "--fault-step-delay-ms 5", NULL};
    if (cluster_start(&cl, 180, args) != 0) {
        fprintf(stderr, "chaos: the cluster did not start\n");
        return 1;
    }
    for (int i = 0; i < N_CHANNELS; i++)
        if (kvr_client_create(cl.addr, &chan[i]) != 0)
            return 1;

    /* Capacity: a closed loop of 48 callers for `calibrate` seconds (no cancels, no
     * deadlines, no invalid requests), completions per second. */
    struct tally cal = {0};
    struct inflight f = {0};
    double t_cal = now_s();
    while (now_s() - t_cal < calibrate) {
        reap(&f, &cal, 0);
        while (f.n < 48) {
            enum kind k = pick_kind();
            if (k == K_CANCEL || k == K_DEADLINE || k == K_INVALID)
                k = K_GOLDEN;
            launch(&f, &cal, new_call(k));
        }
        sleep_s(0.005);
    }
    reap(&f, &cal, 1);
    double capacity = (double)cal.completed / (now_s() - t_cal);
    double rate = 0.8 * capacity;
    fprintf(stderr, "chaos: capacity %.1f requests/s (%ld in %.0f s, %ld lost); load at %.1f requests/s for %.0f s, "
            "a node struck every %.0f s\n", capacity, cal.completed, calibrate, cal.lost, rate, seconds, period);

    /* The run: Poisson arrivals at 80% of capacity; a strike every period. */
    struct tally t = {0};
    double t0 = now_s(), next = t0, next_strike = t0 + period;
    int event = 0;
    while (now_s() - t0 < seconds) {
        double tn = now_s();
        if (tn >= next_strike) {
            strike(event++, node_timeout);
            next_strike += period;
        }
        while (next <= now_s()) {
            launch(&f, &t, new_call(pick_kind()));
            next += -log(1.0 - (double)(rnd() % 1000000) / 1000001.0) / rate;
        }
        reap(&f, &t, 0);
        sleep_s(0.002);
    }
    fprintf(stderr, "chaos: load stopped after %.0f s with %d calls open; waiting for them\n", now_s() - t0, f.n);
    reap(&f, &t, 1);

    /* The pools return to empty. */
    int pools_empty = 0, waiting = -1, running = -1, n_alive = 0, n_nodes = 0;
    uint64_t used = 0;
    double t_end = now_s() + 30;
    while (now_s() < t_end && !pools_empty) {
        struct nodeinfo ns[64];
        n_nodes = nodes_now(ns, 64, &waiting, &running, &used);
        n_alive = 0;
        for (int i = 0; i < n_nodes; i++)
            n_alive += ns[i].alive;
        pools_empty = n_nodes > 0 && used == 0 && waiting == 0 && running == 0;
        if (!pools_empty)
            sleep_s(0.1);
    }
    for (int i = 0; i < N_CHANNELS; i++)
        kvr_client_free(chan[i]);
    int stop_rc = cluster_stop(&cl, 60);
    double mean = t.completed ? t.lat_sum / (double)t.completed : 0;
    printf("chaos: %.0f s at %.1f req/s (80%% of a measured %.1f), %d strikes: sent %ld, completed %ld, "
           "failed clean %ld, lost %ld, wrong %ld; pools %s (%d of %d nodes alive); mean latency %.2f s\n",
           seconds, rate, capacity, event, t.sent, t.completed, t.clean, t.lost, t.wrong,
           pools_empty ? "empty" : "NOT EMPTY", n_alive, n_nodes, mean);
    printf("chaos: statuses:");
    static const char *names[17] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                    "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                    "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
    for (int i = 0; i <= 16; i++)
        if (t.by_code[i])
            printf(" %s %ld", names[i], t.by_code[i]);
    printf("; kinds:");
    for (int k = 0; k < N_KINDS; k++)
        printf(" %s %ld", kind_name[k], t.by_kind[k]);
    printf("\n");
    if (json)
        printf("{\"seconds\":%.0f,\"rate\":%.2f,\"capacity\":%.2f,\"strikes\":%d,\"sent\":%ld,\"completed\":%ld,"
               "\"failed_clean\":%ld,\"lost\":%ld,\"wrong\":%ld,\"pools_empty\":%s,\"nodes_alive\":%d,"
               "\"stop_exit\":%d}\n",
               seconds, rate, capacity, event, t.sent, t.completed, t.clean, t.lost, t.wrong,
               pools_empty ? "true" : "false", n_alive, stop_rc);
    for (int i = 0; i < n_golden; i++)
        golden_run_free(&golden[i]);
    return t.lost == 0 && t.wrong == 0 && pools_empty && t.sent > 0 ? 0 : 1;
}
