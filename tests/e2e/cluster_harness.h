/* cluster_harness.h - starts and stops a real local cluster (`kvrelay up`, i.e. mpirun
 * with a coordinator, prefill and decode processes under kvrelay-guard) for the
 * end-to-end tests, and finds its processes so a test can kill one or check that all are
 * gone. `kvrelay up` runs in its own process group, and every process of the cluster
 * carries the environment variable KVRTEST_CLUSTER=<test pid>.<port>, so the harness can
 * find (and kill) whatever is left even after the launcher died. A test that exits early
 * (REQUIRE) still takes its clusters down: an atexit handler kills what is left; a test
 * that crashes takes `kvrelay up` with it (PR_SET_PDEATHSIG), and up takes the rest. */
#ifndef KVR_CLUSTER_HARNESS_H
#define KVR_CLUSTER_HARNESS_H

#include <sys/types.h>

struct cluster {
    pid_t pid;         /* `kvrelay up` (also its process group); 0 once reaped */
    int port;
    int http_port;     /* the coordinator's HTTP port (127.0.0.1) */
    char addr[64];     /* "127.0.0.1:<port>" */
    int out_fd;        /* its stdout (the ready line) */
    char mark[64];     /* the value of KVRTEST_CLUSTER in its processes */
    int exit_code;     /* after cluster_stop/cluster_wait: up's exit code, 128 + signal */
};

/* The model every later cluster_start/cluster_spawn serves: a model file, its tokenizer
 * (NULL: the file's own, GGUF) and a --context (0: the file's). Default: the bundled
 * llama2.c checkpoint and tok512.bin. Strings are borrowed until the next call. */
void cluster_use_model(const char *model, const char *tokenizer, int context);

/* A TCP port that was free a moment ago. */
int harness_free_port(void);

/* Starts `kvrelay up --model <model> [--tokenizer <tok>] [--context N] --port <free>
 * --http-port <free> <extra...>`
 * (extra: NULL-terminated) and waits up to timeout_s for its ready line. Returns 0 or -1
 * (the cluster is stopped then). */
int cluster_start(struct cluster *c, double timeout_s, const char *const *extra);

/* Starts `kvrelay up` as cluster_start does but returns at once (0, or -1 if it could not
 * be started), without waiting for the ready line. */
int cluster_spawn(struct cluster *c, const char *const *extra);

/* SIGTERM to `kvrelay up`; waits up to timeout_s for it, then for every process of the
 * cluster to be gone. Returns up's exit code (128 + signal if a signal ended it), or -1
 * if it had to be killed (its process group and every marked process get SIGKILL). */
int cluster_stop(struct cluster *c, double timeout_s);

/* Waits up to timeout_s for `kvrelay up` to exit by itself (after a SIGKILL the test sent
 * it, say). Returns its exit code as cluster_stop does, or -1 on timeout. */
int cluster_wait(struct cluster *c, double timeout_s);

/* Processes of the cluster still alive (any program: up, mpirun, guards, ranks). */
int cluster_count_procs(const struct cluster *c);

/* Waits up to timeout_s until no process of the cluster is left; returns how many are
 * left (0: all gone). Polls /proc: a bounded wait on state, not a sleep. */
int cluster_wait_gone(const struct cluster *c, double timeout_s);

/* Pids of the cluster's processes (kvrelay-coordinator/prefill/decode carrying this
 * cluster's mark). Writes up to max pids of the given program name (NULL: any of the
 * three); returns how many. */
int cluster_pids(const struct cluster *c, const char *prog, pid_t *pids, int max);

/* The MPI rank of a cluster process (from OMPI_COMM_WORLD_RANK in its environment), or -1. */
int harness_rank_of(pid_t pid);

/* The pid of the process of rank in cluster c, or -1. */
pid_t cluster_pid_of_rank(const struct cluster *c, int rank);

#endif /* KVR_CLUSTER_HARNESS_H */
