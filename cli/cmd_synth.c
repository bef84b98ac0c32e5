/* cmd_synth.c - `kvrelay synth-model`: a random-weight checkpoint of any shape, for
 * benchmarks at real sizes (110M, TinyLlama-1.1B) without downloading weights. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cli.h"
#include "model.h"
#include "options.h"
#include "status.h"

struct synth_cfg {
    const char *out;
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared;
    uint64_t seed;
};

static const struct kvr_opt synth_opts[] = {
    {"out", KVR_OPT_STRING, offsetof(struct synth_cfg, out), NULL, 0, -1, NULL, 1, "file to write"},
    {"dim", KVR_OPT_INT, offsetof(struct synth_cfg, dim), NULL, 2, 65536, NULL, 1, "model width"},
    {"hidden", KVR_OPT_INT, offsetof(struct synth_cfg, hidden), NULL, 1, 262144, NULL, 1, "FFN width"},
    {"layers", KVR_OPT_INT, offsetof(struct synth_cfg, layers), NULL, 1, 4096, NULL, 1, "layers"},
    {"heads", KVR_OPT_INT, offsetof(struct synth_cfg, heads), NULL, 1, 65536, NULL, 1, "query heads"},
    {"kv-heads", KVR_OPT_INT, offsetof(struct synth_cfg, kv_heads), "0", 0, 65536, NULL, 0, "K/V heads (0 = heads)"},
    {"vocab", KVR_OPT_INT, offsetof(struct synth_cfg, vocab), NULL, 3, 1 << 22, NULL, 1, "vocabulary size"},
    {"seq-len", KVR_OPT_INT, offsetof(struct synth_cfg, seq_len), NULL, 1, 1 << 22, NULL, 1, "trained context"},
    {"shared-classifier", KVR_OPT_FLAG, offsetof(struct synth_cfg, shared), "1", 0, -1, NULL, 0, "logits reuse the embedding (--shared-classifier=0: a separate classifier matrix)"},
    {"seed", KVR_OPT_U64, offsetof(struct synth_cfg, seed), "1", 0, -1, NULL, 0, "random seed"},
};

int kvr_cmd_synth_model(int argc, char **argv) {
    struct synth_cfg cfg;
    int done;
    int ex = kvr_cli_parse("synth-model", "Writes a random-weight llama2.c checkpoint of the given shape.",
                           synth_opts, (int)(sizeof synth_opts / sizeof synth_opts[0]), &cfg, argc, argv, &done);
    if (done)
        return ex;
    struct kvr_model_config c = {.dim = cfg.dim, .hidden_dim = cfg.hidden, .n_layers = cfg.layers,
                                 .n_heads = cfg.heads, .n_kv_heads = cfg.kv_heads ? cfg.kv_heads : cfg.heads,
                                 .vocab_size = cfg.vocab, .seq_len = cfg.seq_len, .shared_classifier = cfg.shared};
    const char *why = NULL;
    uint64_t nbytes = kvr_model_expected_nbytes(&c, &why);
    if (!nbytes) {
        fprintf(stderr, "kvrelay synth-model: bad shape: %s\n", why);
        return KVR_EXIT_USAGE;
    }
    int rc = kvr_model_write_synthetic(cfg.out, &c, cfg.seed);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay synth-model: cannot write '%s': %s\n", cfg.out, kvr_status_str(rc));
        return KVR_EXIT_RUNTIME;
    }
    fprintf(stderr, "wrote %s: %llu bytes\n", cfg.out, (unsigned long long)nbytes);
    return KVR_EXIT_OK;
}
