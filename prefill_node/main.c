/* main.c - kvrelay-prefill: one prefill node of an MPI job (see prefill.h). Built twice from
 * the same sources: the product (build/bin) and, with -DKVR_FAULTS, the test build
 * (build/tests/bin) whose extra options inject faults; the product has none of them. */
#include <stddef.h>

#include "model.h"
#include "options.h"
#include "prefill.h"
#include "role.h"
#include "status.h"

struct prefill_cfg {
    const char *model;
    int weights;
    int context;
    uint64_t kv_memory;
    int block_tokens;
    int threads;
    int max_batch;
    int max_batch_tokens;
    int kv_dtype;
    int kv_type;
    int kv_transform;
    int kv_level;
    int kv_compress;
    int report_ms;
    float coord_timeout;
    uint64_t fault_corrupt_seed;
    uint64_t fault_drop_ready_seed;
    int fault_pass_delay_ms;
};

static const struct kvr_opt opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct prefill_cfg, model), NULL, 0, -1, NULL, 1, "model file: GGUF (llama architecture; F32, F16, BF16, Q8_0) or llama2.c checkpoint"},
    {"context", KVR_OPT_INT, offsetof(struct prefill_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length in tokens (0 = the model file's; every node and the coordinator need the same)"},
    {"weights", KVR_OPT_CHOICE, offsetof(struct prefill_cfg, weights), "auto", 0, -1, KVR_NODE_WEIGHTS_CHOICES, 0, "mmap: share the file's page cache; copy: private huge-page copy (faster decode, one copy per process); auto: copy when this is the host's only node"},
    {"kv-memory", KVR_OPT_SIZE, offsetof(struct prefill_cfg, kv_memory), "0", 0, -1, NULL, 0, "pool for prompts in flight (0 = sized from the batch limits)"},
    {"block-tokens", KVR_OPT_INT, offsetof(struct prefill_cfg, block_tokens), "16", 1, 4096, NULL, 0, "tokens per KV block (one wire message per layer and block)"},
    {"threads", KVR_OPT_INT, offsetof(struct prefill_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads (0 = this host's CPUs divided among the prefill and decode nodes on it)"},
    {"max-batch", KVR_OPT_INT, offsetof(struct prefill_cfg, max_batch), "16", 1, 4096, NULL, 0, "prompts per pass"},
    {"max-batch-tokens", KVR_OPT_INT, offsetof(struct prefill_cfg, max_batch_tokens), "0", 0, 1 << 20, NULL, 0, "prompt tokens per pass (0 = max(model context, 1024))"},
    {"kv-type", KVR_OPT_CHOICE, offsetof(struct prefill_cfg, kv_type), "f32", 0, -1, KVR_KV_TYPE_CHOICES, 0, "KV-cache element type (every rank and the coordinator need the same); an f16/bf16 cache ships its own values exactly"},
    {"kv-dtype", KVR_OPT_CHOICE, offsetof(struct prefill_cfg, kv_dtype), "f32", 0, -1, "f32|f16|bf16", 0, "value type of shipped KV of an f32 cache (f16/bf16 are lossy); an f16/bf16 cache ships its own type"},
    {"kv-transform", KVR_OPT_CHOICE, offsetof(struct prefill_cfg, kv_transform), "shuffle", 0, -1, "none|shuffle", 0, "byte transform before zstd"},
    {"kv-level", KVR_OPT_INT, offsetof(struct prefill_cfg, kv_level), "0", -7, 22, NULL, 0, "zstd level (0 = measured default)"},
    {"kv-compress", KVR_OPT_CHOICE, offsetof(struct prefill_cfg, kv_compress), "zstd", 0, -1, "zstd|none", 0, "none: ship KV values raw (no transform, no zstd), for links faster than the codec"},
    {"report-ms", KVR_OPT_INT, offsetof(struct prefill_cfg, report_ms), "50", 1, 100000, NULL, 0, "status report period"},
    {"coord-timeout", KVR_OPT_FLOAT, offsetof(struct prefill_cfg, coord_timeout), "15", 1, 86400, NULL, 0, "seconds without a word from the coordinator (it pings every second) before leaving"},
#ifdef KVR_FAULTS
    {"fault-corrupt-seed", KVR_OPT_U64, offsetof(struct prefill_cfg, fault_corrupt_seed), "0", 0, -1, NULL, 0, "TEST BUILD: corrupt a KV message of requests with this seed (0 = off)"},
    {"fault-drop-ready-seed", KVR_OPT_U64, offsetof(struct prefill_cfg, fault_drop_ready_seed), "0", 0, -1, NULL, 0, "TEST BUILD: never send the SEQ_READY of requests with this seed (0 = off)"},
    {"fault-pass-delay-ms", KVR_OPT_INT, offsetof(struct prefill_cfg, fault_pass_delay_ms), "0", 0, 10000, NULL, 0, "TEST BUILD: sleep after every layer of a pass"},
#endif
};

int main(int argc, char **argv) {
    struct prefill_cfg cfg;
    struct kvr_xfer *x = NULL;
    struct kvr_role_params rp = {.role = KVR_ROLE_PREFILL, .prog = "kvrelay-prefill",
                                 .summary = "A prefill node (started by mpirun; see kvrelay up).", .opts = opts,
                                 .n_opts = (int)(sizeof opts / sizeof opts[0]), .cfg = &cfg};
    int rc = kvr_role_start(&rp, &argc, &argv, &x);
    if (rc != KVR_OK)
        kvr_role_exit(x, rc);
    cfg.threads = kvr_role_threads(x, cfg.threads);
    struct kvr_model *model = NULL;
    if ((rc = kvr_role_load_model(x, rp.prog, cfg.model, cfg.weights, cfg.context, &model)) != KVR_OK)
        kvr_role_exit(x, rc);
    int seq_len = kvr_model_config(model)->seq_len;
    /* A half cache ships its own 2-byte values (exact); a lossy conversion to the other
     * half type would be a silent surprise: refused. */
    if (cfg.kv_type != KVR_KV_F32) {
        if (cfg.kv_dtype != KVR_WIRE_F32 && cfg.kv_dtype != cfg.kv_type) {
            fprintf(stderr, "%s: --kv-dtype %s conflicts with --kv-type %s (a %s cache ships %s values)\n", rp.prog,
                    kvr_wire_dtype_name(cfg.kv_dtype), kvr_kv_type_name(cfg.kv_type), kvr_kv_type_name(cfg.kv_type),
                    kvr_kv_type_name(cfg.kv_type));
            kvr_model_free(model);
            kvr_role_exit(x, KVR_EINVAL);
        }
        cfg.kv_dtype = cfg.kv_type;
    }
    if (cfg.kv_compress == 1) /* stored raw: a byte transform would only cost time */
        cfg.kv_transform = KVR_WIRE_TF_NONE;
    struct prefill_params p = {
        .model = model, .xfer = x, .kv_memory_nbytes = cfg.kv_memory, .block_tokens = cfg.block_tokens,
        .kv_type = (enum kvr_kv_type)cfg.kv_type,
        .n_threads = cfg.threads, .max_batch = cfg.max_batch,
        .max_batch_tokens = cfg.max_batch_tokens ? cfg.max_batch_tokens : (seq_len > 1024 ? seq_len : 1024),
        .wire = {.dtype = (enum kvr_wire_dtype)cfg.kv_dtype, .transform = (enum kvr_wire_transform)cfg.kv_transform,
                 .level = cfg.kv_level, .store = cfg.kv_compress == 1},
        .report_ms = cfg.report_ms, .coord_timeout_s = cfg.coord_timeout, .stop = &kvr_role_stop,
        .faults = {.corrupt_seed = cfg.fault_corrupt_seed, .drop_ready_seed = cfg.fault_drop_ready_seed,
                   .pass_delay_ms = cfg.fault_pass_delay_ms}};
    rc = prefill_run(&p);
    kvr_model_free(model);
    if (rc == KVR_EUNAVAIL)
        kvr_xfer_leave(x, 3); /* the coordinator is gone: MPI_Finalize would wait for it */
    kvr_xfer_finalize(x, 2.0, rc == KVR_OK ? 0 : 1);
    return rc == KVR_OK ? 0 : 1;
}
