/* bench_kvcache.c - `kvrelay bench kvcache`: long generation under the KV policies (issue 4).
 * For one model, one sequence per policy grows to --max-tokens; at each mark (512, 1024, ...)
 * it reports decode tokens/s over the last --decode-tokens steps and the KV bytes the pool
 * holds: dense grows with the context, sink stays flat at L tokens. Then the per-token cost
 * of recompute (a fresh prefill of the last L tokens per token) against sink at L, the
 * comparison behind the StreamingLLM paper's 22x. Reports numbers; asserts nothing. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "clock.h"
#include "json.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "options.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

#ifndef KVR_SHARED_DIR
#define KVR_SHARED_DIR "../shared"
#endif

#define BLOCK_TOKENS 16
#define PREFILL_CHUNK 512 /* tokens per forward call while the context is built */
#define MAX_MARKS 16
#define M110_PATH "/tmp/m110.bin"

struct kvc_cfg {
    const char *model;
    const char *tokenizer;
    const char *text;
    int shape_110m;
    int max_tokens;
    int decode_tokens;
    int recompute_tokens;
    int window;
    int sinks;
    int threads;
    int json;
    int context;
};

#define KVC_DEFAULT_MODEL KVR_SHARED_DIR "/models/stories260K.bin"

static const struct kvr_opt kvc_opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct kvc_cfg, model), KVC_DEFAULT_MODEL, 0, -1, NULL, 0, "model file, GGUF or llama2.c (the bundled stories260K by default)"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct kvc_cfg, tokenizer), NULL, 0, -1, NULL, 0, "tokenizer.bin (default: the GGUF model's own; tok512.bin for the bundled model)"},
    {"context", KVR_OPT_INT, offsetof(struct kvc_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length in tokens (0 = the model file's)"},
    {"text", KVR_OPT_STRING, offsetof(struct kvc_cfg, text), KVR_SHARED_DIR "/data/tinystories_valid_100.txt", 0, -1, NULL, 0, "text whose tokens fill the context (cycled if short)"},
    {"110m", KVR_OPT_FLAG, offsetof(struct kvc_cfg, shape_110m), "0", 0, -1, NULL, 0, "run the 110M shape: " M110_PATH " (written if absent or of another size) with the Llama 2 tokenizer"},
    {"max-tokens", KVR_OPT_INT, offsetof(struct kvc_cfg, max_tokens), "8192", 512, 1 << 20, NULL, 0, "longest context; marks at 512, 1024, ... up to it"},
    {"decode-tokens", KVR_OPT_INT, offsetof(struct kvc_cfg, decode_tokens), "0", 0, 4096, NULL, 0, "timed decode steps ending at each mark (0: 128 for small models, 32 for large)"},
    {"recompute-tokens", KVR_OPT_INT, offsetof(struct kvc_cfg, recompute_tokens), "0", 0, 4096, NULL, 0, "tokens timed under recompute (0: by model size, 3..64)"},
    {"kv-window", KVR_OPT_INT, offsetof(struct kvc_cfg, window), "256", 2, 1 << 20, NULL, 0, "L of sink and recompute"},
    {"kv-sinks", KVR_OPT_INT, offsetof(struct kvc_cfg, sinks), "4", 0, 1 << 20, NULL, 0, "S of sink"},
    {"threads", KVR_OPT_INT, offsetof(struct kvc_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads (0 = online CPUs)"},
    {"json", KVR_OPT_FLAG, offsetof(struct kvc_cfg, json), "0", 0, -1, NULL, 0, "print one JSON object instead of a table"},
};

struct mark {
    int tokens;           /* context length reached at the end of the timed steps */
    double tok_s[2];      /* decode tokens/s: [0] dense, [1] sink */
    uint64_t kv_nbytes[2]; /* pool bytes in use at the mark */
};

struct kvc {
    struct kvc_cfg cfg;
    struct kvr_model *model;
    const struct kvr_model_config *c;
    int *ids;      /* (n_ids) context tokens, cycled */
    int n_ids;
    int n_threads;
    struct mark marks[MAX_MARKS];
    int n_marks;
    double sink_ms, recompute_ms; /* per token, timed back to back */
    int sink_at;                  /* context of the sink sequence after that timing */
    int recompute_done;
};

static int token_at(const struct kvc *b, int pos) { return b->ids[pos % b->n_ids]; }

/* Writes the 110M shape to M110_PATH unless a file of exactly its size is there (another
 * run may have made it). Written under a temporary name and renamed, so a concurrent
 * reader never maps half a file. */
static int ensure_110m(void) {
    struct kvr_model_config c = {.dim = 768, .hidden_dim = 2048, .n_layers = 12, .n_heads = 12,
                                 .n_kv_heads = 12, .vocab_size = 32000, .seq_len = 1024,
                                 .shared_classifier = 1};
    uint64_t want = kvr_model_expected_nbytes(&c, NULL);
    struct stat st;
    if (stat(M110_PATH, &st) == 0 && (uint64_t)st.st_size == want)
        return KVR_OK;
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", M110_PATH, (long)getpid());
    fprintf(stderr, "writing %s (%llu bytes, the synth-model 110M shape, seed 1)\n", M110_PATH,
            (unsigned long long)want);
    int rc = kvr_model_write_synthetic(tmp, &c, 1);
    if (rc == KVR_OK && rename(tmp, M110_PATH) != 0)
        rc = KVR_EIO;
    if (rc != KVR_OK)
        unlink(tmp);
    return rc;
}

/* The context tokens: the text encoded once, BOS first. */
static int load_tokens(struct kvc *b) {
    struct kvr_tokenizer *tok = NULL;
    FILE *f = NULL;
    char *text = NULL;
    const char *tok_path = b->cfg.tokenizer;
    if (!tok_path && !strcmp(b->cfg.model, KVC_DEFAULT_MODEL))
        tok_path = KVR_SHARED_DIR "/models/tok512.bin";
    int rc = kvr_model_load_tokenizer(b->model, tok_path, &tok);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvcache: cannot load the tokenizer of '%s': %s\n",
                tok_path ? tok_path : b->cfg.model, kvr_status_str(rc));
        goto out;
    }
    rc = KVR_ENOENT;
    if (!(f = fopen(b->cfg.text, "rb")) || fseek(f, 0, SEEK_END) != 0) {
        fprintf(stderr, "kvrelay bench kvcache: cannot read '%s'\n", b->cfg.text);
        goto out;
    }
    long len = ftell(f);
    rc = KVR_ENOMEM;
    if (len < 1 || len > (1L << 28) || fseek(f, 0, SEEK_SET) != 0 || !(text = malloc((size_t)len + 1)) ||
        !(b->ids = malloc(((size_t)len + 3) * sizeof *b->ids)))
        goto out;
    rc = KVR_EIO;
    if (fread(text, 1, (size_t)len, f) != (size_t)len)
        goto out;
    text[len] = '\0';
    rc = kvr_tokenizer_encode(tok, text, 1, 0, b->ids, (int)len + 3, &b->n_ids);
    if (rc == KVR_OK && b->n_ids < 2)
        rc = KVR_EINVAL;
out:
    if (f)
        fclose(f);
    free(text);
    kvr_tokenizer_free(tok);
    return rc;
}

/* Pool, sequence and engine for one policy; NULL-initialized by the caller. */
struct run {
    struct kvr_kv_pool *pool;
    struct kvr_kv_seq *seq;
    struct kvr_engine *eng;
    float *logits; /* (vocab) */
};

static void run_close(struct run *r) {
    kvr_engine_free(r->eng);
    kvr_kv_seq_free(r->seq);
    kvr_kv_pool_free(r->pool);
    free(r->logits);
    memset(r, 0, sizeof *r);
}

static int run_open(struct kvc *b, struct run *r, struct kvr_kv_policy_params pol, int n_total, int chunk) {
    const struct kvr_model_config *c = b->c;
    int n_blocks = kvr_kv_blocks_needed(&pol, BLOCK_TOKENS, n_total, chunk);
    struct kvr_kv_pool_params pp = {
        .n_layers = c->n_layers, .kv_dim = c->kv_dim, .block_tokens = BLOCK_TOKENS,
        .budget_nbytes = (uint64_t)n_blocks * BLOCK_TOKENS * kvr_kv_token_nbytes(c->n_layers, c->kv_dim)};
    struct kvr_kv_seq_params sp = {.policy = pol, .n_tokens_max = n_total};
    int n_ctx = pol.policy == KVR_KV_DENSE ? n_total : pol.window + chunk;
    struct kvr_engine_params ep = {.model = b->model, .n_threads = b->n_threads, .n_batch_tokens_max = chunk,
                                   .n_items_max = 1, .n_ctx_max = n_ctx};
    int rc;
    if ((rc = kvr_kv_pool_create(&pp, &r->pool)) != KVR_OK || (rc = kvr_kv_seq_create(r->pool, &sp, &r->seq)) != KVR_OK ||
        (rc = kvr_engine_create(&ep, &r->eng)) != KVR_OK)
        return rc;
    if (!(r->logits = malloc((size_t)c->vocab_size * sizeof *r->logits)))
        return KVR_ENOMEM;
    return KVR_OK;
}

/* Builds the context of r up to position `to` with prefill chunks (logits not needed): the
 * cache a decode would have left (test_transformer checks prefill == decode). */
static int fill(struct kvc *b, struct run *r, int *pos, int to) {
    int tokens[PREFILL_CHUNK], rc = KVR_OK;
    while (rc == KVR_OK && *pos < to) {
        int n = to - *pos < PREFILL_CHUNK ? to - *pos : PREFILL_CHUNK;
        for (int i = 0; i < n; i++)
            tokens[i] = token_at(b, *pos + i);
        struct kvr_forward_item it = {.seq = r->seq, .tokens = tokens, .n_tokens = n};
        rc = kvr_engine_forward(r->eng, &it, 1);
        *pos += n;
    }
    return rc;
}

/* D decode steps of batch 1, each computing the next token's logits and appending one
 * token; the seconds they took in *dt. */
static int decode(struct kvc *b, struct run *r, int *pos, int D, double *dt) {
    int rc = KVR_OK;
    double t0 = kvr_clock_now();
    for (int i = 0; rc == KVR_OK && i < D; i++, (*pos)++) {
        int tok = token_at(b, *pos);
        struct kvr_forward_item it = {.seq = r->seq, .tokens = &tok, .n_tokens = 1, .logits = r->logits};
        rc = kvr_engine_forward(r->eng, &it, 1);
    }
    *dt = kvr_clock_now() - t0;
    return rc;
}

/* R recompute steps at L: each resets the sequence and prefills the L tokens ending at the
 * next position from scratch at positions 0..L-1 (the paper's quality reference). */
static int recompute_steps(struct kvc *b, struct run *r, int from, int R, double *dt) {
    int L = b->cfg.window, rc = KVR_OK;
    int *tokens = malloc((size_t)L * sizeof *tokens);
    if (!tokens)
        return KVR_ENOMEM;
    double t0 = kvr_clock_now();
    for (int i = 0; rc == KVR_OK && i < R; i++) {
        for (int j = 0; j < L; j++)
            tokens[j] = token_at(b, from + i - L + 1 + j);
        kvr_kv_seq_reset(r->seq);
        struct kvr_forward_item it = {.seq = r->seq, .tokens = tokens, .n_tokens = L, .logits = r->logits};
        rc = kvr_engine_forward(r->eng, &it, 1);
    }
    *dt = kvr_clock_now() - t0;
    free(tokens);
    return rc;
}

/* Dense and sink grow side by side through the marks and are timed back to back at each,
 * so that both see the same machine (other processes may share the cores). Then recompute
 * and sink are timed back to back at the longest context. */
static int measure(struct kvc *b) {
    struct kvr_kv_policy_params pols[2] = {
        {.policy = KVR_KV_DENSE},
        {.policy = KVR_KV_SINK, .window = b->cfg.window, .sinks = b->cfg.sinks}};
    struct kvr_kv_policy_params rpol = {.policy = KVR_KV_RECOMPUTE, .window = b->cfg.window};
    struct run r[2] = {{0}}, rr = {0};
    int pos[2] = {0, 0}, D = b->cfg.decode_tokens, rc = KVR_OK;
    for (int k = 0; k < 2 && rc == KVR_OK; k++)
        rc = run_open(b, &r[k], pols[k], b->cfg.max_tokens, PREFILL_CHUNK);
    for (int mi = 0; rc == KVR_OK && mi < b->n_marks; mi++) {
        struct mark *m = &b->marks[mi];
        for (int k = 0; k < 2 && rc == KVR_OK; k++) {
            double dt = 0;
            if ((rc = fill(b, &r[k], &pos[k], m->tokens - D)) != KVR_OK ||
                (rc = decode(b, &r[k], &pos[k], D, &dt)) != KVR_OK)
                break;
            struct kvr_kv_pool_stats st;
            kvr_kv_pool_stats(r[k].pool, &st);
            m->tok_s[k] = D / (dt > 1e-9 ? dt : 1e-9);
            m->kv_nbytes[k] = st.bytes_used;
            if (!b->cfg.json)
                fprintf(stderr, "  %-5s %5d tokens: %8.1f tok/s\n", kvr_kv_policy_name(pols[k].policy),
                        m->tokens, m->tok_s[k]);
        }
    }
    run_close(&r[0]); /* the largest allocation; recompute needs its memory more */
    if (rc == KVR_OK)
        rc = run_open(b, &rr, rpol, b->cfg.window, b->cfg.window);
    double t_rc = 0, t_sink = 0;
    if (rc == KVR_OK)
        rc = recompute_steps(b, &rr, pos[1], b->cfg.recompute_tokens, &t_rc);
    /* Sink keeps generating past the last mark: its cache and cost stay those of L tokens. */
    if (rc == KVR_OK)
        rc = decode(b, &r[1], &pos[1], D, &t_sink);
    if (rc == KVR_OK) {
        b->recompute_ms = 1e3 * t_rc / b->cfg.recompute_tokens;
        b->recompute_done = b->cfg.recompute_tokens;
        b->sink_ms = 1e3 * t_sink / D;
        b->sink_at = pos[1];
    }
    run_close(&rr);
    run_close(&r[1]);
    return rc;
}

/* The first three fields of /proc/loadavg ("1.00 0.50 0.25"), or "unknown": the cores may
 * be shared, and the numbers only mean something next to the load they ran under. */
static void load_average(char *buf, size_t len) {
    snprintf(buf, len, "unknown");
    FILE *f = fopen("/proc/loadavg", "r");
    double a1, a5, a15;
    if (f && fscanf(f, "%lf %lf %lf", &a1, &a5, &a15) == 3)
        snprintf(buf, len, "%.2f %.2f %.2f", a1, a5, a15);
    if (f)
        fclose(f);
}

static void print_report(const struct kvc *b) {
    const struct kvr_model_config *c = b->c;
    char cpu[256], s0[32], s1[32], loadavg[64];
    kvr_bench_cpu_model(cpu, sizeof cpu);
    load_average(loadavg, sizeof loadavg);
    uint64_t tok_nb = kvr_kv_token_nbytes(c->n_layers, c->kv_dim);
    double ratio = b->recompute_ms / b->sink_ms;
    if (b->cfg.json) {
        printf("{\"bench\": \"kvcache\", \"model\": ");
        kvr_json_write_string(stdout, b->cfg.model);
        printf(", \"n_params\": %llu, \"dim\": %d, \"n_layers\": %d, "
               "\"n_kv_heads\": %d, \"seq_len\": %d, \"kv_token_nbytes\": %llu, \"block_tokens\": %d, "
               "\"threads\": %d, \"nproc\": %ld, \"cpu\": ",
               (unsigned long long)kvr_model_n_params(b->model), c->dim, c->n_layers, c->n_kv_heads,
               c->seq_len, (unsigned long long)tok_nb, BLOCK_TOKENS, b->n_threads,
               sysconf(_SC_NPROCESSORS_ONLN));
        kvr_json_write_string(stdout, cpu);
        printf(", \"kv_window\": %d, \"kv_sinks\": %d, \"decode_tokens\": %d, "
               "\"dense_extrapolates_past\": %d, \"marks\": [",
               b->cfg.window, b->cfg.sinks, b->cfg.decode_tokens, c->seq_len);
        for (int i = 0; i < b->n_marks; i++) {
            const struct mark *m = &b->marks[i];
            printf("%s{\"tokens\": %d, \"dense_tok_s\": %.2f, \"dense_kv_nbytes\": %llu, \"sink_tok_s\": %.2f, "
                   "\"sink_kv_nbytes\": %llu}", i ? ", " : "", m->tokens, m->tok_s[0],
                   (unsigned long long)m->kv_nbytes[0], m->tok_s[1], (unsigned long long)m->kv_nbytes[1]);
        }
        printf("], \"sink_ms_per_token\": %.4f, \"sink_context\": %d, \"recompute_ms_per_token\": %.4f, "
               "\"recompute_tokens\": %d, \"recompute_over_sink\": %.2f, \"loadavg\": \"%s\"}\n", b->sink_ms,
               b->sink_at, b->recompute_ms, b->recompute_done, ratio, loadavg);
        return;
    }
    printf("model %s: %llu params, dim %d, %d layers, %d KV heads, trained context %d\n", b->cfg.model,
           (unsigned long long)kvr_model_n_params(b->model), c->dim, c->n_layers, c->n_kv_heads, c->seq_len);
    printf("KV %llu bytes/token, blocks of %d tokens; %d threads on %ld CPUs (%s)\n",
           (unsigned long long)tok_nb, BLOCK_TOKENS, b->n_threads, sysconf(_SC_NPROCESSORS_ONLN), cpu);
    printf("decode: %d timed steps ending at each context length, batch 1; sink L=%d S=%d\n\n",
           b->cfg.decode_tokens, b->cfg.window, b->cfg.sinks);
    printf("%8s  %12s  %10s  %12s  %10s\n", "tokens", "dense tok/s", "dense KV", "sink tok/s", "sink KV");
    for (int i = 0; i < b->n_marks; i++) {
        const struct mark *m = &b->marks[i];
        printf("%8d  %12.1f  %10s  %12.1f  %10s%s\n", m->tokens, m->tok_s[0],
               kvr_format_size(m->kv_nbytes[0], s0, sizeof s0), m->tok_s[1],
               kvr_format_size(m->kv_nbytes[1], s1, sizeof s1), m->tokens > c->seq_len ? "  (dense extrapolates)" : "");
    }
    printf("\ndense past %d tokens runs past the trained context (--allow-extrapolation): the speed and\n"
           "memory are real, the quality is not (see docs/KVCACHE.md).\n", c->seq_len);
    printf("per token at L=%d, timed back to back: sink %.3f ms (decode up to %d tokens), recompute\n"
           "%.3f ms (%d tokens, each a %d-token prefill): recompute/sink = %.1fx (StreamingLLM paper: 22x)\n",
           b->cfg.window, b->sink_ms, b->sink_at, b->recompute_ms, b->recompute_done, b->cfg.window, ratio);
    printf("load average at the end: %s\n", loadavg);
}

int kvr_bench_kvcache(int argc, char **argv) {
    struct kvc b;
    memset(&b, 0, sizeof b);
    int done;
    int ex = kvr_cli_parse("bench kvcache",
                           "Long generation under the KV policies: decode tokens/s and KV memory of dense "
                           "and sink as the context grows, and the per-token cost of recompute vs sink.",
                           kvc_opts, (int)(sizeof kvc_opts / sizeof kvc_opts[0]), &b.cfg, argc, argv, &done);
    if (done)
        return ex;
    ex = KVR_EXIT_RUNTIME;
    int rc;
    if (b.cfg.shape_110m) {
        if ((rc = ensure_110m()) != KVR_OK) {
            fprintf(stderr, "kvrelay bench kvcache: cannot write %s: %s\n", M110_PATH, kvr_status_str(rc));
            return KVR_EXIT_RUNTIME;
        }
        b.cfg.model = M110_PATH;
        b.cfg.tokenizer = KVR_SHARED_DIR "/models/llama2_tokenizer.bin";
    }
    struct kvr_model_params mp = {.n_ctx = b.cfg.context};
    if ((rc = kvr_model_load_params(b.cfg.model, &mp, &b.model)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvcache: cannot load model '%s': %s\n", b.cfg.model, kvr_status_str(rc));
        goto out;
    }
    b.c = kvr_model_config(b.model);
    struct kvr_kv_policy_params sink = {.policy = KVR_KV_SINK, .window = b.cfg.window, .sinks = b.cfg.sinks};
    struct kvr_kv_policy_params rcmp = {.policy = KVR_KV_RECOMPUTE, .window = b.cfg.window};
    char err[160];
    if (kvr_kv_policy_check(&sink, b.c->seq_len, err, sizeof err) != KVR_OK ||
        kvr_kv_policy_check(&rcmp, b.c->seq_len, err, sizeof err) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvcache: %s\n", err);
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    if ((rc = load_tokens(&b)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvcache: no context tokens: %s\n", kvr_status_str(rc));
        goto out;
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    b.n_threads = b.cfg.threads ? b.cfg.threads : (ncpu > 0 ? (int)ncpu : 1);
    double params = (double)kvr_model_n_params(b.model);
    int big = params > 2e7;
    if (!b.cfg.decode_tokens)
        b.cfg.decode_tokens = big ? 32 : 128;
    if (!b.cfg.recompute_tokens) {
        /* About 4e11 FLOP of recompute prefill: a few seconds on two cores. */
        double r = 4e11 / (2.0 * params * b.cfg.window);
        b.cfg.recompute_tokens = r < 3 ? 3 : r > 64 ? 64 : (int)r;
    }
    if (b.cfg.decode_tokens > 512) {
        fprintf(stderr, "kvrelay bench kvcache: --decode-tokens must be at most 512 (the first mark)\n");
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    for (int t = 512; t <= b.cfg.max_tokens && b.n_marks < MAX_MARKS; t *= 2)
        b.marks[b.n_marks++].tokens = t;
    if (b.marks[b.n_marks - 1].tokens != b.cfg.max_tokens && b.n_marks < MAX_MARKS)
        b.marks[b.n_marks++].tokens = b.cfg.max_tokens;

    if (!b.cfg.json)
        fprintf(stderr, "kvrelay bench kvcache: %s, up to %d tokens\n", b.cfg.model, b.cfg.max_tokens);
    if ((rc = measure(&b)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvcache: run failed: %s\n", kvr_status_str(rc));
        goto out;
    }
    print_report(&b);
    ex = KVR_EXIT_OK;
out:
    free(b.ids);
    kvr_model_free(b.model);
    return ex;
}
