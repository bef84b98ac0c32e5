/* role.c - start-up and loop helpers shared by the coordinator, prefill and decode
 * mains (see role.h). */
#include "role.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>

#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "status.h"

volatile sig_atomic_t kvr_role_stop;

static void on_stop_signal(int sig) {
    (void)sig;
    kvr_role_stop = 1;
}

int kvr_role_start(const struct kvr_role_params *p, int *argc, char ***argv, struct kvr_xfer **x) {
    char err[256];
    int rc = kvr_xfer_init(argc, argv, p->role, x);
    if (rc != KVR_OK) {
        fprintf(stderr, "%s: MPI setup failed: %s\n", p->prog, kvr_status_str(rc));
        *x = NULL;
        return rc;
    }
    kvr_log_init(kvr_role_name(p->role), kvr_xfer_rank(*x));
    if (kvr_xfer_joined(*x)) {
        /* A spawned node's MPI_COMM_WORLD rank is 0 in its own job: name the process after
         * its id in the cluster so that ps and the tests can tell which node it is. */
        char name[16];
        snprintf(name, sizeof name, "kvr-peer-%d", kvr_xfer_rank(*x));
        prctl(PR_SET_NAME, name, 0, 0, 0);
    }
    rc = kvr_opts_parse(p->opts, p->n_opts, p->cfg, *argc, *argv, 1, err, sizeof err);
    if (rc == 1) {
        kvr_opts_usage(stdout, p->prog, p->summary, p->opts, p->n_opts);
        fflush(stdout);
        return 1;
    }
    if (rc != KVR_OK) {
        fprintf(stderr, "%s: %s\n", p->prog, err);
        return KVR_EINVAL;
    }
    kvr_opts_log(p->prog, p->opts, p->n_opts, p->cfg);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* mpirun forwards SIGUSR1 and then waits, where after SIGTERM it kills the ranks a
     * second later: `kill -USR1 <mpirun>` is the clean stop (a joined decode node then
     * drains and leaves, docs/ARCHITECTURE.md). */
    sigaction(SIGUSR1, &sa, NULL);
    /* A link to a node that left can still see a TCP peer close under it (Open MPI's TCP
     * BTL then writes to a closed socket): the error is the MPI call's, not a death. */
    signal(SIGPIPE, SIG_IGN);
    return KVR_OK;
}

_Noreturn void kvr_role_exit(struct kvr_xfer *x, int status) {
    int code = status == 1 ? 0 : status == KVR_EINVAL ? 2 : 1;
    fflush(stdout);
    fflush(stderr);
    kvr_xfer_abort(x, code);
}

/* Prefill and decode ranks on rank's host, rank included if it is one. */
static int nodes_sharing(int n, const int *roles, const char *const *hosts, int rank) {
    int sharing = 0;
    for (int r = 0; r < n; r++)
        if ((roles[r] == KVR_ROLE_PREFILL || roles[r] == KVR_ROLE_DECODE) &&
            strcmp(hosts[r], hosts[rank]) == 0)
            sharing++;
    return sharing;
}

int kvr_role_weights_auto(int n, const int *roles, const char *const *hosts, int rank) {
    return nodes_sharing(n, roles, hosts, rank) <= 1 ? KVR_WEIGHTS_COPY : KVR_WEIGHTS_MMAP;
}

int kvr_role_threads_auto(int n, const int *roles, const char *const *hosts, int rank, int n_cpus) {
    int sharing = nodes_sharing(n, roles, hosts, rank);
    int t = n_cpus / (sharing > 1 ? sharing : 1);
    return t > 1 ? t : 1;
}

/* Prefill and decode nodes on this rank's host over x's layout (1 when unknown). */
static int sharing_of(const struct kvr_xfer *x) {
    int n = kvr_xfer_size(x), sharing = 1;
    int *roles = malloc((size_t)n * sizeof *roles);
    const char **hosts = malloc((size_t)n * sizeof *hosts);
    if (roles && hosts) {
        for (int r = 0; r < n; r++) {
            roles[r] = kvr_xfer_role_of(x, r);
            hosts[r] = kvr_xfer_host_of(x, r);
        }
        sharing = nodes_sharing(n, roles, hosts, kvr_xfer_rank(x));
    }
    free(roles);
    free(hosts);
    return sharing > 1 ? sharing : 1;
}

/* "auto" over x's layout. */
static int resolve_auto(const struct kvr_xfer *x) {
    return sharing_of(x) <= 1 ? KVR_WEIGHTS_COPY : KVR_WEIGHTS_MMAP;
}

int kvr_role_threads(const struct kvr_xfer *x, int choice) {
    if (choice > 0)
        return choice;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int n_cpus = ncpu > 0 ? (ncpu < 1024 ? (int)ncpu : 1024) : 1;
    int sharing = x ? sharing_of(x) : 1;
    int t = n_cpus / sharing > 1 ? n_cpus / sharing : 1;
    KVR_LOG_INFO("--threads 0: %d (%d CPUs, %d prefill/decode node%s on this host)", t, n_cpus, sharing,
                 sharing == 1 ? "" : "s");
    return t;
}

int kvr_role_load_model(const struct kvr_xfer *x, const char *prog, const char *path, int choice,
                        int n_ctx, struct kvr_model **out) {
    int mode = choice;
    if (choice == KVR_NODE_WEIGHTS_AUTO) {
        mode = x ? resolve_auto(x) : KVR_WEIGHTS_MMAP;
        KVR_LOG_INFO("--weights auto: %s (%s)", mode == KVR_WEIGHTS_COPY ? "copy" : "mmap",
                     mode == KVR_WEIGHTS_COPY ? "the only node on this host"
                                              : "other nodes share this host");
    }
    struct kvr_model_params mp = {.mode = (enum kvr_weights_mode)mode, .n_ctx = n_ctx};
    int rc = kvr_model_load_params(path, &mp, out);
    if (rc == KVR_ENOMEM && choice == KVR_NODE_WEIGHTS_AUTO && mode == KVR_WEIGHTS_COPY) {
        KVR_LOG_WARN("no memory for a private copy of the weights: mapping the file instead");
        mp.mode = KVR_WEIGHTS_MMAP;
        rc = kvr_model_load_params(path, &mp, out);
    }
    if (rc == KVR_OK) {
        const struct kvr_model_config *c = kvr_model_config(*out);
        KVR_LOG_INFO("model '%s': %s, %s weights, dim %d, %d layers, vocab %d, context %d", path,
                     c->format == KVR_MODEL_GGUF ? "GGUF" : "llama2.c", kvr_model_types(*out), c->dim,
                     c->n_layers, c->vocab_size, c->seq_len);
    }
    if (rc != KVR_OK)
        fprintf(stderr, "%s: cannot load model '%s': %s\n", prog, path, kvr_status_str(rc));
    return rc;
}

void kvr_idle_turn(struct kvr_idle *idle, int busy) {
    if (busy || idle->ns <= 0) {
        idle->ns = 20000;
        if (busy)
            return;
    }
    struct timespec ts = {0, idle->ns};
    nanosleep(&ts, NULL);
    idle->ns = idle->ns * 2 > 1000000 ? 1000000 : idle->ns * 2;
}
