/* cluster_harness.h - starts and stops a real local cluster (`kvrelay up`, i.e. mpirun
 * with a coordinator, prefill and decode processes) for the end-to-end tests, and finds
 * its processes so a test can kill one or check that all are gone. */
#ifndef KVR_CLUSTER_HARNESS_H
#define KVR_CLUSTER_HARNESS_H

#include <sys/types.h>

struct cluster {
    pid_t pid;         /* `kvrelay up` */
    int port;
    char addr[64];     /* "127.0.0.1:<port>" */
    int out_fd;        /* its stdout (the ready line) */
};

/* A TCP port that was free a moment ago. */
int harness_free_port(void);

/* Starts `kvrelay up --model <bundled> --tokenizer <bundled> --port <free> <extra...>`
 * (extra: NULL-terminated) and waits up to timeout_s for its ready line. Returns 0 or -1
 * (the cluster is stopped then). */
int cluster_start(struct cluster *c, double timeout_s, const char *const *extra);

/* SIGTERM to `kvrelay up`; waits up to timeout_s. Returns its exit code, or -1 if it had
 * to be killed. */
int cluster_stop(struct cluster *c, double timeout_s);

/* Pids of the cluster's processes (kvrelay-coordinator/prefill/decode whose command
 * line carries this cluster's port or model and whose ancestor is c->pid). Writes up to
 * max pids of the given program name (NULL: any of the three); returns how many. */
int cluster_pids(const struct cluster *c, const char *prog, pid_t *pids, int max);

#endif /* KVR_CLUSTER_HARNESS_H */
