/* role.h - what the three MPI roles (coordinator, prefill, decode) share around their
 * loops: start-up (MPI, logger, options, signals), the HELLO and STATUS contents, and
 * the idle back-off of a polling loop. The roles' own logic stays in their folders. */
#ifndef KVR_ROLE_H
#define KVR_ROLE_H

#include <signal.h>

#include "options.h"
#include "xfer.h"

struct kvr_model;
struct kvr_kv_pool;

/* Set by SIGTERM/SIGINT/SIGUSR1 once kvr_role_start installed the handlers. */
extern volatile sig_atomic_t kvr_role_stop;

struct kvr_role_params {
    enum kvr_role role;
    const char *prog;            /* "kvrelay-decode" */
    const char *summary;         /* one line for --help */
    const struct kvr_opt *opts;  /* the role's option table */
    int n_opts;
    void *cfg;                   /* filled by the table */
};

/* MPI (kvr_xfer_init), the logger (role, rank), options (logged once), and the stop
 * handlers. Returns KVR_OK with *x, 1 after printing --help, KVR_EINVAL after printing
 * the bad option, KVR_EMPI (printed). On any return but KVR_OK, main ends with
 * kvr_role_exit. */
int kvr_role_start(const struct kvr_role_params *p, int *argc, char ***argv, struct kvr_xfer **x);

/* Ends the process for a failed start or setup: aborts the whole MPI job (other ranks
 * would wait for this one forever) with exit code 0 for --help, 2 for bad options, 1
 * otherwise. x may be NULL (MPI never came up). */
_Noreturn void kvr_role_exit(struct kvr_xfer *x, int status);

/* A node's --weights: "mmap", "copy" (enum kvr_weights_mode values 0 and 1) or "auto". */
#define KVR_NODE_WEIGHTS_CHOICES "mmap|copy|auto"
#define KVR_NODE_WEIGHTS_AUTO 2

/* What "auto" picks for rank: KVR_WEIGHTS_COPY when it is the only prefill or decode rank
 * on its host (its private huge-page copy decodes 15-25% faster, docs/perf/engine.md, and
 * no other node would share the file's page cache), KVR_WEIGHTS_MMAP when several share
 * the host (one page-cache copy for all of them). roles and hosts: (n) per rank, borrowed. */
int kvr_role_weights_auto(int n, const int *roles, const char *const *hosts, int rank);

/* What --threads 0 (the nodes' default) gives rank: the host's n_cpus divided among the
 * prefill and decode ranks on that host, at least 1 (a node alone on its host takes every
 * CPU: batch-1 decode is bound on memory bandwidth, which one core cannot draw alone,
 * docs/PERFORMANCE.md "Node defaults"). roles and hosts: (n) per rank, borrowed. */
int kvr_role_threads_auto(int n, const int *roles, const char *const *hosts, int rank, int n_cpus);

/* A node's compute threads for its --threads choice: choice itself when > 0, else
 * kvr_role_threads_auto over x's layout and this machine's online CPUs (all of them when
 * x is NULL), logged at info. */
int kvr_role_threads(const struct kvr_xfer *x, int choice);

/* Loads the model (choice: an index of KVR_NODE_WEIGHTS_CHOICES; "auto" is resolved over
 * x's layout and falls back to mmap when the copy does not fit in memory; n_ctx > 0
 * overrides the file's context, --context) or prints why not ("<prog>: cannot load model
 * ...") and returns the status. */
int kvr_role_load_model(const struct kvr_xfer *x, const char *prog, const char *path, int choice,
                        int n_ctx, struct kvr_model **out);

/* Idle back-off of a polling loop: after a turn that did nothing, sleep (20 us, doubling
 * up to 1 ms); after a busy turn, start over. */
struct kvr_idle {
    long ns;
};
void kvr_idle_turn(struct kvr_idle *idle, int busy);

#endif /* KVR_ROLE_H */
