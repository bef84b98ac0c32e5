/* prefill.h - the prefill node: batches the prompts waiting for it into one forward
 * pass (one GEMM over all their tokens per projection), ships each layer's KV blocks
 * (kv_wire, zstd) to each prompt's decode node as soon as the layer is computed, and
 * sends the first sampled token along. */
#ifndef KVR_PREFILL_H
#define KVR_PREFILL_H

#include <signal.h>
#include <stdint.h>

#include "kv_cache.h"
#include "kv_wire.h"

struct kvr_model;
struct kvr_xfer;

/* Test-only fault injection: honoured only by the test build of kvrelay-prefill
 * (-DKVR_FAULTS, build/tests/bin); the product has no options to set these. 0 = off. */
struct prefill_faults {
    uint64_t corrupt_seed;    /* corrupt the first KV message of requests with this seed */
    uint64_t drop_ready_seed; /* never send the SEQ_READY of requests with this seed */
    int pass_delay_ms;        /* sleep this long after each layer of a pass (a slow pass) */
};

struct prefill_params {
    struct kvr_model *model;       /* borrowed */
    struct kvr_xfer *xfer;         /* borrowed */
    uint64_t kv_memory_nbytes;     /* pool for prompts in flight; 0: sized from the batch limits */
    enum kvr_kv_type kv_type;      /* the pool's element type (--kv-type); wire.dtype equals it
                                    * when it is f16/bf16 */
    int block_tokens;
    int n_threads;                 /* 0: online CPUs */
    int max_batch;                 /* prompts per pass */
    int max_batch_tokens;          /* prompt tokens per pass (>= the model context) */
    struct kvr_wire_opts wire;     /* value type, transform, zstd level of shipped blocks */
    int report_ms;
    double coord_timeout_s;        /* leave when the coordinator is silent this long */
    volatile sig_atomic_t *stop;
    struct prefill_faults faults;
};

/* Runs the node until SHUTDOWN or *stop (KVR_OK), or until the coordinator went silent
 * (KVR_EUNAVAIL: main leaves without MPI_Finalize). A setup error is returned after the
 * HELLO that tells the coordinator this node cannot serve. */
int prefill_run(const struct prefill_params *p);

#endif /* KVR_PREFILL_H */
