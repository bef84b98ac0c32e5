/* cmd_generate.c - `kvrelay generate`: one process, no cluster. Prints the prompt and
 * its continuation exactly as llama2.c's run prints them, timings to stderr. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "clock.h"
#include "kv_cache.h"
#include "kernels.h"
#include "log.h"
#include "model.h"
#include "options.h"
#include "sampler.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

struct gen_cfg {
    const char *model;
    const char *tokenizer;
    const char *prompt;
    int steps;
    float temperature;
    float top_p;
    uint64_t seed;
    int kv_policy;
    int kv_window;
    int kv_sinks;
    int kv_type;
    int allow_extrapolation;
    int threads;
    int weights;
    int context;
    int verbose;
};

static const struct kvr_opt gen_opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct gen_cfg, model), NULL, 0, -1, NULL, 1, "model file: GGUF (llama architecture; F32, F16, BF16, Q8_0) or llama2.c checkpoint"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct gen_cfg, tokenizer), NULL, 0, -1, NULL, 0, "tokenizer.bin (llama2.c; or a GGUF file's vocabulary); default: the GGUF model's own"},
    {"context", KVR_OPT_INT, offsetof(struct gen_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length in tokens (0 = the model file's)"},
    {"prompt", KVR_OPT_STRING, offsetof(struct gen_cfg, prompt), "", 0, -1, NULL, 0, "prompt text"},
    {"steps", KVR_OPT_INT, offsetof(struct gen_cfg, steps), "256", 1, 1e8, NULL, 0, "positions to run, prompt included (as run.c)"},
    {"temperature", KVR_OPT_FLOAT, offsetof(struct gen_cfg, temperature), "1.0", 0, 100, NULL, 0, "0 = greedy"},
    {"top-p", KVR_OPT_FLOAT, offsetof(struct gen_cfg, top_p), "0.9", 0, 1, NULL, 0, "nucleus sampling threshold (1 = off)"},
    {"seed", KVR_OPT_U64, offsetof(struct gen_cfg, seed), "0", 0, -1, NULL, 0, "random seed (0 = from the clock)"},
    {"kv-policy", KVR_OPT_CHOICE, offsetof(struct gen_cfg, kv_policy), "dense", 0, -1, KVR_KV_POLICY_CHOICES, 0, "KV-cache policy"},
    {"kv-window", KVR_OPT_INT, offsetof(struct gen_cfg, kv_window), "256", 1, 1 << 22, NULL, 0, "L: tokens attended (window, recompute, sink)"},
    {"kv-sinks", KVR_OPT_INT, offsetof(struct gen_cfg, kv_sinks), "4", 0, 1 << 20, NULL, 0, "S: attention-sink tokens kept (sink)"},
    {"kv-type", KVR_OPT_CHOICE, offsetof(struct gen_cfg, kv_type), "f32", 0, -1, KVR_KV_TYPE_CHOICES, 0, "KV-cache element type: f32 (exact), f16 or bf16 (half the memory per token)"},
    {"allow-extrapolation", KVR_OPT_FLAG, offsetof(struct gen_cfg, allow_extrapolation), "0", 0, -1, NULL, 0, "dense: run past the trained context"},
    {"threads", KVR_OPT_INT, offsetof(struct gen_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads (0 = all CPUs)"},
    {"weights", KVR_OPT_CHOICE, offsetof(struct gen_cfg, weights), "mmap", 0, -1, KVR_WEIGHTS_CHOICES, 0, "mmap the file, or copy the weights into huge pages (faster decode)"},
    {"verbose", KVR_OPT_FLAG, offsetof(struct gen_cfg, verbose), "0", 0, -1, NULL, 0, "log what was chosen (model, weight types, kernels) on stderr"},
};

int kvr_cmd_generate(int argc, char **argv) {
    struct gen_cfg cfg;
    int done;
    int ex = kvr_cli_parse("generate", "Runs the model in this process and prints the prompt and its continuation.",
                           gen_opts, (int)(sizeof gen_opts / sizeof gen_opts[0]), &cfg, argc, argv, &done);
    if (done)
        return ex;
    struct kvr_model *model = NULL;
    struct kvr_tokenizer *tok = NULL;
    struct kvr_kv_pool *pool = NULL;
    struct kvr_kv_seq *seq = NULL;
    struct kvr_engine *eng = NULL;
    int *prompt = NULL, *history = NULL;
    float *logits = NULL;
    void *scratch = NULL;
    ex = KVR_EXIT_RUNTIME;
    int rc;
    if (cfg.verbose) {
        if (kvr_log_level < KVR_LOG_LEVEL_INFO)
            kvr_log_set_level(KVR_LOG_LEVEL_INFO);
        fprintf(stderr, "kvrelay generate: kernels %s (CPU: %s)\n", kvr_kernels()->name,
                kvr_cpu_features()[0] ? kvr_cpu_features() : "no vector extensions");
    }

    struct kvr_model_params mp = {.mode = (enum kvr_weights_mode)cfg.weights, .n_ctx = cfg.context};
    if ((rc = kvr_model_load_params(cfg.model, &mp, &model)) != KVR_OK) {
        fprintf(stderr, "kvrelay generate: cannot load model '%s': %s\n", cfg.model, kvr_status_str(rc));
        goto out;
    }
    const struct kvr_model_config *c = kvr_model_config(model);
    if ((rc = kvr_model_load_tokenizer(model, cfg.tokenizer, &tok)) != KVR_OK) {
        fprintf(stderr, "kvrelay generate: cannot load the tokenizer of '%s': %s\n",
                cfg.tokenizer ? cfg.tokenizer : cfg.model, kvr_status_str(rc));
        if (!cfg.tokenizer && c->format == KVR_MODEL_LLAMA2C)
            ex = KVR_EXIT_USAGE; /* --tokenizer is required for this model */
        goto out;
    }
    struct kvr_kv_policy_params pol = {.policy = (enum kvr_kv_policy)cfg.kv_policy,
                                       .window = cfg.kv_window, .sinks = cfg.kv_sinks};
    char err[160];
    if (kvr_kv_policy_check(&pol, c->seq_len, err, sizeof err) != KVR_OK) {
        fprintf(stderr, "kvrelay generate: %s\n", err);
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    size_t plen = strlen(cfg.prompt);
    prompt = malloc((plen + 3) * sizeof *prompt);
    if (!prompt)
        goto out;
    int n_prompt = 0;
    if ((rc = kvr_tokenizer_encode(tok, cfg.prompt, 1, 0, prompt, (int)plen + 3, &n_prompt)) != KVR_OK) {
        fprintf(stderr, "kvrelay generate: cannot encode the prompt: %s\n", kvr_status_str(rc));
        goto out;
    }
    int dense = pol.policy == KVR_KV_DENSE;
    if (n_prompt == 0) {
        fprintf(stderr, "kvrelay generate: the prompt is empty and the model's vocabulary adds no BOS: "
                        "nothing to start from\n");
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    if (n_prompt > cfg.steps) {
        fprintf(stderr, "kvrelay generate: the prompt is %d tokens but --steps is %d (steps count the "
                        "prompt, as in run.c)\n", n_prompt, cfg.steps);
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    if (dense && !cfg.allow_extrapolation && cfg.steps > c->seq_len) {
        fprintf(stderr, "kvrelay generate: %s %d positions exceed the model's context of %d under "
                        "--kv-policy dense; lower --steps, pick window/sink/recompute, set --context, "
                        "or pass --allow-extrapolation\n",
                n_prompt > c->seq_len ? "the prompt's" : "--steps", n_prompt > c->seq_len ? n_prompt : cfg.steps,
                c->seq_len);
        ex = KVR_EXIT_USAGE;
        goto out;
    }

    /* Size the cache and the engine for this one sequence. */
    int chunk = pol.policy == KVR_KV_RECOMPUTE ? (pol.window < cfg.steps ? pol.window : cfg.steps) : n_prompt;
    int bt = 16;
    int n_blocks = kvr_kv_blocks_needed(&pol, bt, cfg.steps, chunk);
    enum kvr_kv_type kt = (enum kvr_kv_type)cfg.kv_type;
    struct kvr_kv_pool_params pp = {.type = kt, .n_layers = c->n_layers, .kv_dim = c->kv_dim, .block_tokens = bt,
                                    .budget_nbytes = (uint64_t)n_blocks * bt * kvr_kv_token_nbytes_type(kt, c->n_layers, c->kv_dim)};
    struct kvr_kv_seq_params sp = {.policy = pol, .n_tokens_max = cfg.steps};
    int n_ctx = dense ? cfg.steps : pol.window + chunk;
    struct kvr_engine_params ep = {.model = model, .n_threads = cfg.threads, .n_batch_tokens_max = chunk,
                                   .n_items_max = 1, .n_ctx_max = n_ctx};
    if ((rc = kvr_kv_pool_create(&pp, &pool)) != KVR_OK || (rc = kvr_kv_seq_create(pool, &sp, &seq)) != KVR_OK ||
        (rc = kvr_engine_create(&ep, &eng)) != KVR_OK) {
        fprintf(stderr, "kvrelay generate: cannot set up the engine: %s\n", kvr_status_str(rc));
        goto out;
    }
    logits = malloc((size_t)c->vocab_size * sizeof *logits);
    scratch = malloc((size_t)c->vocab_size * 2 * sizeof(int));
    /* The prompt plus every printed token: the last one is sampled at position steps, so
     * up to steps + 1 entries (an empty prompt prints steps tokens after BOS). */
    history = malloc(((size_t)cfg.steps + 1) * sizeof *history);
    if (!logits || !scratch || !history)
        goto out;
    uint64_t seed = cfg.seed ? cfg.seed : (uint64_t)time(NULL);
    struct kvr_sampler sampler;
    kvr_sampler_init(&sampler, cfg.temperature, cfg.top_p, seed);
    memcpy(history, prompt, (size_t)n_prompt * sizeof *history);
    int n_hist = n_prompt;

    /* Prefill: the whole prompt in one pass (recompute: its last L tokens). */
    double t0 = kvr_clock_now();
    int first = pol.policy == KVR_KV_RECOMPUTE && n_prompt > pol.window ? n_prompt - pol.window : 0;
    struct kvr_forward_item item = {.seq = seq, .tokens = prompt + first, .n_tokens = n_prompt - first,
                                    .logits = logits, .prompt = 1};
    if ((rc = kvr_engine_forward(eng, &item, 1)) != KVR_OK) {
        fprintf(stderr, "kvrelay generate: prefill failed: %s\n", kvr_status_str(rc));
        goto out;
    }
    double t1 = kvr_clock_now();
    for (int i = 1; i < n_prompt; i++)
        fputs(kvr_tokenizer_piece_safe(tok, prompt[i - 1], prompt[i]), stdout);
    fflush(stdout);

    int token = prompt[n_prompt - 1], pos = n_prompt, generated = 0;
    int next = kvr_sampler_sample(&sampler, logits, c->vocab_size, scratch);
    double t2 = kvr_clock_now();
    for (;;) {
        if (next == c->bos_id)
            break;
        fputs(kvr_tokenizer_piece_safe(tok, token, next), stdout);
        fflush(stdout);
        token = next;
        history[n_hist++] = token;
        generated++;
        if (pos >= cfg.steps)
            break;
        if (pol.policy == KVR_KV_RECOMPUTE) {
            kvr_kv_seq_reset(seq);
            int n = n_hist < pol.window ? n_hist : pol.window;
            item = (struct kvr_forward_item){.seq = seq, .tokens = history + n_hist - n, .n_tokens = n, .logits = logits};
        } else {
            item = (struct kvr_forward_item){.seq = seq, .tokens = &history[n_hist - 1], .n_tokens = 1, .logits = logits};
        }
        if ((rc = kvr_engine_forward(eng, &item, 1)) != KVR_OK) {
            fprintf(stderr, "\nkvrelay generate: decode failed at position %d: %s\n", pos, kvr_status_str(rc));
            goto out;
        }
        pos++;
        next = kvr_sampler_sample(&sampler, logits, c->vocab_size, scratch);
    }
    double t3 = kvr_clock_now();
    printf("\n");
    fflush(stdout);
    int decode_steps = generated > 0 ? generated - 1 : 0;
    fprintf(stderr, "seed=%llu policy=%s\n", (unsigned long long)seed, kvr_kv_policy_name(pol.policy));
    fprintf(stderr, "prompt_tokens=%d generated_tokens=%d prefill_tok_s=%.1f decode_tok_s=%.1f\n", n_prompt,
            generated, (double)(n_prompt - first) / (t1 - t0 > 1e-9 ? t1 - t0 : 1e-9),
            decode_steps ? decode_steps / (t3 - t2 > 1e-9 ? t3 - t2 : 1e-9) : 0.0);
    ex = KVR_EXIT_OK;
out:
    free(prompt);
    free(history);
    free(logits);
    free(scratch);
    kvr_engine_free(eng);
    kvr_kv_seq_free(seq);
    kvr_kv_pool_free(pool);
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
    return ex;
}
