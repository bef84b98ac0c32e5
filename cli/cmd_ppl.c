/* cmd_ppl.c - `kvrelay ppl`: teacher-forced perplexity of a text file under a KV-cache
 * policy (issue 4). The file is encoded as one string with BOS first, the first N tokens
 * are kept, and common/ppl.c scores tokens 2..N. One line of text, or one JSON object. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "clock.h"
#include "kv_cache.h"
#include "model.h"
#include "options.h"
#include "ppl.h"
#include "status.h"
#include "tokenizer.h"

struct ppl_cfg {
    const char *model;
    const char *tokenizer;
    const char *text;
    int tokens;
    int kv_policy;
    int kv_window;
    int kv_sinks;
    int kv_type;
    int allow_extrapolation;
    int json;
    int threads;
    int context;
};

static const struct kvr_opt ppl_opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct ppl_cfg, model), NULL, 0, -1, NULL, 1, "model file: GGUF (llama architecture; F32, F16, BF16, Q8_0) or llama2.c checkpoint"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct ppl_cfg, tokenizer), NULL, 0, -1, NULL, 0, "tokenizer.bin (llama2.c; or a GGUF file's vocabulary); default: the GGUF model's own"},
    {"context", KVR_OPT_INT, offsetof(struct ppl_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length in tokens (0 = the model file's)"},
    {"text", KVR_OPT_STRING, offsetof(struct ppl_cfg, text), NULL, 0, -1, NULL, 1, "UTF-8 text file, encoded as one string with BOS"},
    {"tokens", KVR_OPT_INT, offsetof(struct ppl_cfg, tokens), "0", 0, 1 << 26, NULL, 0, "N: keep the first N tokens, BOS included (0 = all; error if fewer)"},
    {"kv-policy", KVR_OPT_CHOICE, offsetof(struct ppl_cfg, kv_policy), "dense", 0, -1, KVR_KV_POLICY_CHOICES, 0, "KV-cache policy"},
    {"kv-window", KVR_OPT_INT, offsetof(struct ppl_cfg, kv_window), "256", 1, 1 << 22, NULL, 0, "L: tokens attended including the current one (window, recompute, sink)"},
    {"kv-sinks", KVR_OPT_INT, offsetof(struct ppl_cfg, kv_sinks), "4", 0, 1 << 20, NULL, 0, "S: attention-sink tokens kept (sink)"},
    {"kv-type", KVR_OPT_CHOICE, offsetof(struct ppl_cfg, kv_type), "f32", 0, -1, KVR_KV_TYPE_CHOICES, 0, "KV-cache element type: f32 (exact), f16 or bf16 (half the memory per token)"},
    {"allow-extrapolation", KVR_OPT_FLAG, offsetof(struct ppl_cfg, allow_extrapolation), "0", 0, -1, NULL, 0, "dense: run past the trained context"},
    {"json", KVR_OPT_FLAG, offsetof(struct ppl_cfg, json), "0", 0, -1, NULL, 0, "print one JSON object"},
    {"threads", KVR_OPT_INT, offsetof(struct ppl_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads (0 = all CPUs)"},
};

/* Reads the whole file as a NUL-terminated string into *out (owned, free()). A NUL byte
 * inside the file ends the text there, as it would for any C-string prompt. */
static int read_text(const char *path, char **out) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return KVR_ENOENT;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    int rc = KVR_ENOMEM;
    while (buf) {
        if (n == cap) {
            char *nb = cap < ((size_t)1 << 30) ? realloc(buf, cap * 2 + 1) : NULL;
            if (!nb)
                goto out;
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                rc = KVR_EIO;
                goto out;
            }
            buf[n] = '\0';
            *out = buf;
            buf = NULL;
            rc = KVR_OK;
        }
    }
out:
    free(buf);
    fclose(f);
    return rc;
}

int kvr_cmd_ppl(int argc, char **argv) {
    struct ppl_cfg cfg;
    int done;
    int ex = kvr_cli_parse("ppl",
                           "Teacher-forced perplexity of a text under a KV-cache policy: the file is "
                           "encoded as one string, BOS first, the first N tokens kept, and "
                           "ppl = exp(mean NLL of tokens 2..N, each given all before it).",
                           ppl_opts, (int)(sizeof ppl_opts / sizeof ppl_opts[0]), &cfg, argc, argv, &done);
    if (done)
        return ex;
    struct kvr_model *model = NULL;
    struct kvr_tokenizer *tok = NULL;
    char *text = NULL;
    int *ids = NULL;
    ex = KVR_EXIT_RUNTIME;
    int rc;

    struct kvr_model_params mp = {.n_ctx = cfg.context};
    if ((rc = kvr_model_load_params(cfg.model, &mp, &model)) != KVR_OK) {
        fprintf(stderr, "kvrelay ppl: cannot load model '%s': %s\n", cfg.model, kvr_status_str(rc));
        goto out;
    }
    const struct kvr_model_config *c = kvr_model_config(model);
    if ((rc = kvr_model_load_tokenizer(model, cfg.tokenizer, &tok)) != KVR_OK) {
        fprintf(stderr, "kvrelay ppl: cannot load the tokenizer of '%s': %s\n",
                cfg.tokenizer ? cfg.tokenizer : cfg.model, kvr_status_str(rc));
        if (!cfg.tokenizer && c->format == KVR_MODEL_LLAMA2C)
            ex = KVR_EXIT_USAGE; /* --tokenizer is required for this model */
        goto out;
    }
    struct kvr_kv_policy_params pol = {.policy = (enum kvr_kv_policy)cfg.kv_policy,
                                       .window = cfg.kv_window, .sinks = cfg.kv_sinks};
    char err[160];
    if (kvr_kv_policy_check(&pol, c->seq_len, err, sizeof err) != KVR_OK) {
        fprintf(stderr, "kvrelay ppl: %s\n", err);
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    if ((rc = read_text(cfg.text, &text)) != KVR_OK) {
        fprintf(stderr, "kvrelay ppl: cannot read '%s': %s\n", cfg.text, kvr_status_str(rc));
        goto out;
    }
    size_t tlen = strlen(text);
    if (tlen > ((size_t)1 << 28)) {
        fprintf(stderr, "kvrelay ppl: '%s' is longer than 256 MiB\n", cfg.text);
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    int n_text = 0;
    if (!(ids = malloc((tlen + 3) * sizeof *ids)))
        goto out;
    if ((rc = kvr_tokenizer_encode(tok, text, 1, 0, ids, (int)tlen + 3, &n_text)) != KVR_OK) {
        fprintf(stderr, "kvrelay ppl: cannot encode '%s': %s\n", cfg.text, kvr_status_str(rc));
        goto out;
    }
    int N = cfg.tokens ? cfg.tokens : n_text;
    if (N > n_text || N < 2) {
        fprintf(stderr, "kvrelay ppl: --tokens %d but '%s' encodes to %d tokens (BOS included); "
                        "perplexity needs at least 2\n", N, cfg.text, n_text);
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    if (pol.policy == KVR_KV_DENSE && N - 1 > c->seq_len && !cfg.allow_extrapolation) {
        fprintf(stderr, "kvrelay ppl: %d tokens put dense positions up to %d, past the model's "
                        "context of %d; use --tokens %d or fewer, pick window/sink/recompute, set "
                        "--context, or pass --allow-extrapolation\n", N, N - 2, c->seq_len, c->seq_len + 1);
        ex = KVR_EXIT_USAGE;
        goto out;
    }

    struct kvr_ppl_params pp = {.model = model, .tokens = ids, .n_tokens = N, .policy = pol,
                                .allow_extrapolation = cfg.allow_extrapolation, .n_threads = cfg.threads,
                                .kv_type = (enum kvr_kv_type)cfg.kv_type};
    struct kvr_ppl_result res;
    double t0 = kvr_clock_now();
    if ((rc = kvr_ppl_eval(&pp, NULL, &res)) != KVR_OK) {
        fprintf(stderr, "kvrelay ppl: evaluation failed: %s\n", kvr_status_str(rc));
        goto out;
    }
    double secs = kvr_clock_now() - t0;
    /* L and S are reported as 0 for a policy that does not use them. */
    int L = pol.policy == KVR_KV_DENSE ? 0 : pol.window;
    int S = pol.policy == KVR_KV_SINK ? pol.sinks : 0;
    if (cfg.json)
        printf("{\"ppl\": %.6f, \"nll\": %.8f, \"tokens\": %d, \"policy\": \"%s\", \"kv_window\": %d, "
               "\"kv_sinks\": %d, \"kv_type\": \"%s\", \"seconds\": %.3f}\n",
               res.ppl, res.nll, N, kvr_kv_policy_name(pol.policy), L, S, kvr_kv_type_name(cfg.kv_type), secs);
    else
        printf("ppl=%.4f nll=%.6f tokens=%d policy=%s kv_window=%d kv_sinks=%d seconds=%.2f\n", res.ppl,
               res.nll, N, kvr_kv_policy_name(pol.policy), L, S, secs);
    ex = KVR_EXIT_OK;
out:
    free(ids);
    free(text);
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
    return ex;
}
