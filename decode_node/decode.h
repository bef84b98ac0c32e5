/* decode.h - the decode node: holds the KV caches of many sequences in one block pool
 * and advances them all together (continuous batching), streaming tokens to the
 * coordinator. In colocated mode it also prefills its own prompts (chunked prefill
 * mixed into the decode steps), for the disaggregated-vs-colocated comparison. */
#ifndef KVR_DECODE_H
#define KVR_DECODE_H

#include <signal.h>
#include <stdint.h>

#include "kv_cache.h"

struct kvr_model;
struct kvr_xfer;

/* Test-only fault injection: honoured only by the test build of kvrelay-decode (compiled
 * with -DKVR_FAULTS into build/tests/bin); the product ignores these fields and has no
 * options to set them. */
struct decode_faults {
    int step_delay_ms;       /* sleep this long after each step */
    uint64_t step_fail_seed; /* a sequence with this seed corrupts its step input after 3
                              * tokens (past the per-item check): the forward call fails */
};

struct decode_params {
    struct kvr_model *model;      /* borrowed */
    struct kvr_xfer *xfer;        /* borrowed */
    uint64_t kv_memory_nbytes;    /* block pool budget */
    enum kvr_kv_type kv_type;     /* the pool's element type (--kv-type) */
    int block_tokens;
    int n_threads;                /* 0: online CPUs */
    int max_batch;                /* sequences per step */
    int max_batch_tokens;         /* tokens per step (recompute windows, colocated prompts) */
    int colocated;                /* also prefill prompts sent here */
    int report_ms;                /* status report period */
    double coord_timeout_s;       /* leave when the coordinator is silent this long */
    volatile sig_atomic_t *stop;  /* set by a signal handler: leave the loop */
    struct decode_faults faults;
};

/* Runs the node until SHUTDOWN or *stop (KVR_OK), or until the coordinator went silent
 * (KVR_EUNAVAIL: main leaves without MPI_Finalize). A setup error is returned after the
 * HELLO that tells the coordinator this node cannot serve. */
int decode_run(const struct decode_params *p);

#endif /* KVR_DECODE_H */
