/* decode.h - the decode node: holds the KV caches of many sequences in one block pool
 * and advances them all together (continuous batching), streaming tokens to the
 * coordinator. In colocated mode it also prefills its own prompts (chunked prefill
 * mixed into the decode steps), for the disaggregated-vs-colocated comparison. */
#ifndef KVR_DECODE_H
#define KVR_DECODE_H

#include <signal.h>
#include <stdint.h>

struct kvr_model;
struct kvr_xfer;

struct decode_params {
    struct kvr_model *model;      /* borrowed */
    struct kvr_xfer *xfer;        /* borrowed */
    uint64_t kv_memory_nbytes;    /* block pool budget */
    int block_tokens;
    int n_threads;                /* 0: online CPUs */
    int max_batch;                /* sequences per step */
    int max_batch_tokens;         /* tokens per step (recompute windows, colocated prompts) */
    int colocated;                /* also prefill prompts sent here */
    int report_ms;                /* status report period */
    int debug_step_delay_ms;      /* TEST ONLY: sleep this long after each step */
    double coord_timeout_s;       /* leave when the coordinator is silent this long */
    volatile sig_atomic_t *stop;  /* set by a signal handler: leave the loop */
};

/* Runs the node until SHUTDOWN or *stop. Returns KVR_OK or the setup error. */
int decode_run(const struct decode_params *p);

#endif /* KVR_DECODE_H */
