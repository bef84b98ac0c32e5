/* main.c - kvrelay-decode: one decode node of an MPI job (see decode.h). */
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "decode.h"
#include "log.h"
#include "model.h"
#include "options.h"
#include "status.h"
#include "xfer.h"

struct decode_cfg {
    const char *model;
    uint64_t kv_memory;
    int block_tokens;
    int threads;
    int max_batch;
    int max_batch_tokens;
    int colocated;
    int report_ms;
    int debug_step_delay_ms;
    float coord_timeout;
};

static const struct kvr_opt opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct decode_cfg, model), NULL, 0, -1, NULL, 1, "checkpoint (llama2.c format)"},
    {"kv-memory", KVR_OPT_SIZE, offsetof(struct decode_cfg, kv_memory), "256MiB", 1, -1, NULL, 0, "KV block pool budget"},
    {"block-tokens", KVR_OPT_INT, offsetof(struct decode_cfg, block_tokens), "16", 1, 4096, NULL, 0, "tokens per KV block"},
    {"threads", KVR_OPT_INT, offsetof(struct decode_cfg, threads), "1", 0, 1024, NULL, 0, "compute threads (0 = all CPUs)"},
    {"max-batch", KVR_OPT_INT, offsetof(struct decode_cfg, max_batch), "64", 1, 4096, NULL, 0, "sequences per decode step"},
    {"max-batch-tokens", KVR_OPT_INT, offsetof(struct decode_cfg, max_batch_tokens), "512", 1, 1 << 20, NULL, 0, "tokens per step (recompute windows, colocated prompt chunks)"},
    {"colocated", KVR_OPT_FLAG, offsetof(struct decode_cfg, colocated), "0", 0, -1, NULL, 0, "also prefill prompts (no prefill nodes)"},
    {"report-ms", KVR_OPT_INT, offsetof(struct decode_cfg, report_ms), "50", 1, 100000, NULL, 0, "status report period"},
    {"coord-timeout", KVR_OPT_FLOAT, offsetof(struct decode_cfg, coord_timeout), "15", 1, 86400, NULL, 0, "seconds without a word from the coordinator (it pings every second) before leaving"},
    {"debug-step-delay-ms", KVR_OPT_INT, offsetof(struct decode_cfg, debug_step_delay_ms), "0", 0, 10000, NULL, 0, "TEST ONLY: sleep after every decode step"},
};

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

int main(int argc, char **argv) {
    struct decode_cfg cfg;
    char err[256];
    struct kvr_xfer *x = NULL;
    int rc = kvr_xfer_init(&argc, &argv, KVR_ROLE_DECODE, &x);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay-decode: MPI setup failed: %s\n", kvr_status_str(rc));
        return 1;
    }
    kvr_log_init("decode", kvr_xfer_rank(x));
    rc = kvr_opts_parse(opts, (int)(sizeof opts / sizeof opts[0]), &cfg, argc, argv, 1, err, sizeof err);
    if (rc == 1) {
        kvr_opts_usage(stdout, "kvrelay-decode", "A decode node (started by mpirun; see kvrelay up).", opts,
                       (int)(sizeof opts / sizeof opts[0]));
        kvr_xfer_abort(x, 0);
    }
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay-decode: %s\n", err);
        kvr_xfer_abort(x, 2);
    }
    kvr_opts_log("kvrelay-decode", opts, (int)(sizeof opts / sizeof opts[0]), &cfg);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    struct kvr_model *model = NULL;
    if ((rc = kvr_model_load(cfg.model, &model)) != KVR_OK) {
        fprintf(stderr, "kvrelay-decode: cannot load model '%s': %s\n", cfg.model, kvr_status_str(rc));
        kvr_xfer_abort(x, 1);
    }
    struct decode_params p = {.model = model, .xfer = x, .kv_memory_nbytes = cfg.kv_memory,
                              .block_tokens = cfg.block_tokens, .n_threads = cfg.threads,
                              .max_batch = cfg.max_batch, .max_batch_tokens = cfg.max_batch_tokens,
                              .colocated = cfg.colocated, .report_ms = cfg.report_ms, .debug_step_delay_ms = cfg.debug_step_delay_ms,
                              .coord_timeout_s = cfg.coord_timeout,
                              .stop = &stop_flag};
    rc = decode_run(&p);
    kvr_model_free(model);
    kvr_xfer_finalize(x, 2.0);
    return rc == KVR_OK ? 0 : 1;
}
