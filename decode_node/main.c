/* main.c - kvrelay-decode: one decode node of an MPI job (see decode.h). Built twice from
 * the same sources: the product (build/bin) and, with -DKVR_FAULTS, the test build
 * (build/tests/bin) whose extra options inject faults; the product has none of them. */
#include <stddef.h>
#include <string.h>
#include <stdint.h>

#include "decode.h"
#include "model.h"
#include "options.h"
#include "role.h"
#include "status.h"
#include "xfer.h"

struct decode_cfg {
    const char *model;
    int weights;
    int context;
    uint64_t kv_memory;
    int kv_type;
    int block_tokens;
    int threads;
    int max_batch;
    int max_batch_tokens;
    int colocated;
    int report_ms;
    float coord_timeout;
    const char *join_dir;
    int fault_step_delay_ms;
    uint64_t fault_step_fail_seed;
};

static const struct kvr_opt opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct decode_cfg, model), NULL, 0, -1, NULL, 1, "model file: GGUF (llama architecture; F32, F16, BF16, Q8_0) or llama2.c checkpoint"},
    {"context", KVR_OPT_INT, offsetof(struct decode_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length in tokens (0 = the model file's; every node and the coordinator need the same)"},
    {"weights", KVR_OPT_CHOICE, offsetof(struct decode_cfg, weights), "auto", 0, -1, KVR_NODE_WEIGHTS_CHOICES, 0, "mmap: share the file's page cache; copy: private huge-page copy (faster decode, one copy per process); auto: copy when this is the host's only node"},
    {"kv-memory", KVR_OPT_SIZE, offsetof(struct decode_cfg, kv_memory), "256MiB", 1, -1, NULL, 0, "KV block pool budget"},
    {"kv-type", KVR_OPT_CHOICE, offsetof(struct decode_cfg, kv_type), "f32", 0, -1, KVR_KV_TYPE_CHOICES, 0, "KV-cache element type (every rank and the coordinator need the same)"},
    {"block-tokens", KVR_OPT_INT, offsetof(struct decode_cfg, block_tokens), "16", 1, 4096, NULL, 0, "tokens per KV block"},
    {"threads", KVR_OPT_INT, offsetof(struct decode_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads (0 = this host's CPUs divided among the prefill and decode nodes on it)"},
    {"max-batch", KVR_OPT_INT, offsetof(struct decode_cfg, max_batch), "64", 1, 4096, NULL, 0, "sequences per decode step"},
    {"max-batch-tokens", KVR_OPT_INT, offsetof(struct decode_cfg, max_batch_tokens), "512", 1, 1 << 20, NULL, 0, "tokens per step (recompute windows, colocated prompt chunks)"},
    {"colocated", KVR_OPT_FLAG, offsetof(struct decode_cfg, colocated), "0", 0, -1, NULL, 0, "also prefill prompts (no prefill nodes)"},
    {"report-ms", KVR_OPT_INT, offsetof(struct decode_cfg, report_ms), "50", 1, 100000, NULL, 0, "status report period"},
    {"coord-timeout", KVR_OPT_FLOAT, offsetof(struct decode_cfg, coord_timeout), "15", 1, 86400, NULL, 0, "seconds without a word from the coordinator (it pings every second) before leaving"},
    {"join-dir", KVR_OPT_STRING, offsetof(struct decode_cfg, join_dir), "", 0, -1, NULL, 0, "join a running cluster from a job of its own: leave this node's MPI port in DIR (the coordinator's --join-dir) and wait for the coordinator; both jobs need mpirun --ompi-server file:URI"},
#ifdef KVR_FAULTS
    {"fault-step-delay-ms", KVR_OPT_INT, offsetof(struct decode_cfg, fault_step_delay_ms), "0", 0, 10000, NULL, 0, "TEST BUILD: sleep after every decode step"},
    {"fault-step-fail-seed", KVR_OPT_U64, offsetof(struct decode_cfg, fault_step_fail_seed), "0", 0, -1, NULL, 0, "TEST BUILD: a request with this seed feeds a bad token id to its 4th step (0 = off)"},
#endif
};

int main(int argc, char **argv) {
    struct decode_cfg cfg;
    struct kvr_xfer *x = NULL;
    struct kvr_role_params rp = {.role = KVR_ROLE_DECODE, .prog = "kvrelay-decode",
                                 .summary = "A decode node (started by mpirun; see kvrelay up).", .opts = opts,
                                 .n_opts = (int)(sizeof opts / sizeof opts[0]), .cfg = &cfg};
    /* --join-dir decides how MPI comes up, so it is read before the option table is (the
     * table reads it again, with every other option). */
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--join-dir"))
            kvr_xfer_set_join_dir(argv[i + 1]);
    int rc = kvr_role_start(&rp, &argc, &argv, &x);
    if (rc != KVR_OK)
        kvr_role_exit(x, rc);
    cfg.threads = kvr_role_threads(x, cfg.threads);
    struct kvr_model *model = NULL;
    if ((rc = kvr_role_load_model(x, rp.prog, cfg.model, cfg.weights, cfg.context, &model)) != KVR_OK)
        kvr_role_exit(x, rc);
    struct decode_params p = {.model = model, .xfer = x, .kv_memory_nbytes = cfg.kv_memory,
                              .kv_type = (enum kvr_kv_type)cfg.kv_type,
                              .block_tokens = cfg.block_tokens, .n_threads = cfg.threads,
                              .max_batch = cfg.max_batch, .max_batch_tokens = cfg.max_batch_tokens,
                              .colocated = cfg.colocated, .report_ms = cfg.report_ms,
                              .coord_timeout_s = cfg.coord_timeout, .stop = &kvr_role_stop,
                              .faults = {.step_delay_ms = cfg.fault_step_delay_ms,
                                         .step_fail_seed = cfg.fault_step_fail_seed}};
    rc = decode_run(&p);
    kvr_model_free(model);
    if (rc == KVR_EUNAVAIL)
        kvr_xfer_leave(x, 3); /* the coordinator is gone: MPI_Finalize would wait for it */
    kvr_xfer_finalize(x, 2.0, rc == KVR_OK ? 0 : 1);
    return rc == KVR_OK ? 0 : 1;
}
