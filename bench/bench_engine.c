/* bench_engine.c - `kvrelay bench [engine]`: prefill and decode tokens/s of the engine on
 * the bundled model and on synthetic 110M and TinyLlama-1.1B shapes, each next to this
 * machine's ceilings measured in the same run (read bandwidth over a buffer far larger
 * than the caches, cblas_sgemm GFLOP/s at 2048^3), both on all the threads it is given.
 * Reports numbers (a table, or one JSON object with --json); asserts nothing. */

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cblas.h>

#include "bench.h"
#include "cli.h"
#include "clock.h"
#include "hugemem.h"
#include "json.h"
#include "kernels.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "options.h"
#include "status.h"
#include "threadpool.h"
#include "transformer.h"

#ifndef KVR_SHARED_DIR
#define KVR_SHARED_DIR "../shared"
#endif

#define PREFIX_LEN 128       /* context of every decoding sequence before it is timed */
#define BLOCK_TOKENS 16
#define MAX_ROWS 64
#define MAX_MODELS 3
#define BW_BUFFER_MIB 1024   /* read-bandwidth buffer: 32x the L3 of this class of CPU */
#define SGEMM_N 2048
#define MAX_REPS 16          /* repetitions whose paired probes a row keeps */
#define PROBE_CHUNK (4u << 20) /* bytes per task of a read probe: threads balance */

static const int prefill_lens[] = {128, 512};
static const int decode_batches[] = {1, 8, 32};

struct eng_cfg {
    int json;
    const char *models_dir;
    int quick;
    int threads;
    int reps;
    const char *models;
    const char *bundled;
    int weights;
    int context;
    int kv_type;
    int decode_ctx;
    int decode_only;
    int ceilings_only;
};

static const struct kvr_opt eng_opts[] = {
    {"json", KVR_OPT_FLAG, offsetof(struct eng_cfg, json), "0", 0, -1, NULL, 0, "print one JSON object instead of a table"},
    {"models-dir", KVR_OPT_STRING, offsetof(struct eng_cfg, models_dir), "/tmp/kvrelay-bench-models", 0, -1, NULL, 0, "where synthetic checkpoints are written once and reused"},
    {"quick", KVR_OPT_FLAG, offsetof(struct eng_cfg, quick), "0", 0, -1, NULL, 0, "bundled model and 110M only, fewer repetitions (smoke test)"},
    {"threads", KVR_OPT_INT, offsetof(struct eng_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads for ceilings and engine (0 = online CPUs)"},
    {"reps", KVR_OPT_INT, offsetof(struct eng_cfg, reps), "0", 0, 100, NULL, 0, "timed repetitions per measurement; the best is reported (0 = 3, --quick 1)"},
    {"models", KVR_OPT_STRING, offsetof(struct eng_cfg, models), NULL, 0, -1, NULL, 0, "comma-separated subset of 260k,110m,1.1b (default: all; --quick: 260k,110m)"},
    {"weights", KVR_OPT_CHOICE, offsetof(struct eng_cfg, weights), "copy", 0, -1, KVR_WEIGHTS_CHOICES, 0, "how weights are held: mmap of the file, or a copy in huge pages (what a node alone on its host uses: --weights auto)"},
    {"bundled-model", KVR_OPT_STRING, offsetof(struct eng_cfg, bundled), KVR_SHARED_DIR "/models/stories260K.bin", 0, -1, NULL, 0, "model file measured as 260k: the bundled checkpoint, or any GGUF / llama2.c file"},
    {"kv-type", KVR_OPT_CHOICE, offsetof(struct eng_cfg, kv_type), "f32", 0, -1, KVR_KV_TYPE_CHOICES, 0, "KV-cache element type"},
    {"decode-only", KVR_OPT_FLAG, offsetof(struct eng_cfg, decode_only), "0", 0, -1, NULL, 0, "skip the prefill measurements (the decode template is still prefilled, untimed)"},
    {"decode-ctx", KVR_OPT_INT, offsetof(struct eng_cfg, decode_ctx), "128", 1, KVR_MODEL_CTX_MAX, NULL, 0, "tokens of context each decoding sequence holds before it is timed; past 128 only batch 1 is measured (the model's context must hold it: see --context)"},
    {"ceilings-only", KVR_OPT_FLAG, offsetof(struct eng_cfg, ceilings_only), "0", 0, -1, NULL, 0, "measure the read-bandwidth and sgemm ceilings once and no model (the memory mode a peer's run next to it sees)"},
    {"context", KVR_OPT_INT, offsetof(struct eng_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length of every model loaded (0 = each file's)"},
};

struct model_spec {
    const char *key;  /* name in --models */
    const char *name; /* name in the report */
    const char *file; /* file name in --models-dir; NULL: the bundled checkpoint */
    struct kvr_model_config c;
    int decode_steps; /* timed decode steps per repetition */
};

static const struct model_spec specs[MAX_MODELS] = {
    {"260k", "stories260K", NULL, {0}, 64},
    /* llama2.c's stories110M shape (shared classifier). */
    {"110m", "synthetic-110M", "synth-110m.bin",
     {.dim = 768, .hidden_dim = 2048, .n_layers = 12, .n_heads = 12, .n_kv_heads = 12,
      .vocab_size = 32000, .seq_len = 1024, .shared_classifier = 1},
     32},
    /* TinyLlama-1.1B: GQA 32/4, untied classifier. */
    {"1.1b", "synthetic-TinyLlama-1.1B", "synth-tinyllama-1.1b.bin",
     {.dim = 2048, .hidden_dim = 5632, .n_layers = 22, .n_heads = 32, .n_kv_heads = 4,
      .vocab_size = 32000, .seq_len = 2048, .shared_classifier = 0},
     8},
};

struct result {
    const char *model;
    uint64_t model_params;
    int decode;      /* 0: prefill, 1: decode */
    int batch;
    int prompt_len;  /* prefill: tokens; decode: context before the first timed step */
    int steps;       /* decode: steps per repetition */
    double tok_s;    /* best repetition */
    double tok_s_median;
    double flops;    /* per repetition (prefill) or per step (decode) */
    double bytes;    /* decode: weight + KV bytes read per step (mean over the steps) */
    double gflops;   /* at the best repetition */
    double gbs;      /* decode: at the best repetition */
    double bw_fraction;
    double flops_fraction;
    uint64_t peak_rss;
    /* Batch 1: the step's own weights read by the probe next to each repetition
     * (struct read_probe), n_paired repetitions between n_paired + 1 probes. */
    int n_paired;
    double rep_gbs[MAX_REPS];        /* each repetition's GB/s */
    double probe_gbs[MAX_REPS + 1];  /* probe r: just before repetition r (r = reps: after the last) */
    double bw_fraction_paired;       /* median over r of rep_gbs[r] / max(probe r, probe r+1) */
};

struct bench {
    struct eng_cfg cfg;
    int n_threads;
    int reps;
    double bw_gbs;       /* best of n_ceiling_runs measurements */
    double sgemm_gflops; /* best of n_ceiling_runs measurements */
    double bw_min, sgemm_min;
    int n_ceiling_runs;
    struct result rows[MAX_ROWS];
    int n_rows;
    struct {
        const char *name;
        const char *path;
        uint64_t params, weight_bytes, kv_token_bytes, peak_rss;
        int loaded;
        char types[48]; /* weight types, "Q8_0+F16+F32" */
    } models[MAX_MODELS];
    int n_models;
    char paths[MAX_MODELS][4096];
};

/* ---- small utilities ------------------------------------------------------------ */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static double best(const double *v, int n) {
    double b = v[0];
    for (int i = 1; i < n; i++)
        if (v[i] > b)
            b = v[i];
    return b;
}

/* Peak resident set since the last reset_peak_rss(), from /proc/self/status VmHWM;
 * falls back to getrusage (peak since process start). Bytes. */
static uint64_t peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t kib = 0;
    if (f) {
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "VmHWM:", 6)) {
                kib = strtoull(line + 6, NULL, 10);
                break;
            }
        fclose(f);
    }
    if (!kib) {
        struct rusage ru;
        if (getrusage(RUSAGE_SELF, &ru) == 0)
            kib = (uint64_t)ru.ru_maxrss;
    }
    return kib * 1024;
}

/* Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so each model's
 * peak does not include the bandwidth buffer or the models before it. */
static void reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

/* xorshift64*: prompt and decode token ids. */
static int next_token(uint64_t *s, int vocab) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return 3 + (int)(((*s * 0x2545F4914F6CDD1Dull) >> 33) % (uint64_t)(vocab - 3));
}

/* ---- ceilings ------------------------------------------------------------------- */

/* A read probe: sums, as 64-bit words, a list of memory regions in pieces of at most 4 MiB
 * that the threads claim in turn (no barrier between regions); one pass reads every byte
 * once. The machine's read ceiling reads a buffer far larger than the caches; batch-1
 * decode rows also read the step's own weights (step_probe_init) just before and after
 * each repetition: this VM's bandwidth moves by tens of percent from minute to minute,
 * so a fraction against the best probe of a whole run can mix memory modes, and one
 * against the adjacent probes of the same bytes cannot. */
struct read_probe {
    const uint64_t **p; /* (cap) piece starts, 8-byte aligned */
    size_t *words;      /* (cap) words per piece */
    int n, cap;
    double nbytes;      /* read by one pass */
    uint64_t sums[1024];
};

static int probe_init(struct read_probe *rp, int cap) {
    memset(rp, 0, sizeof *rp);
    rp->p = malloc((size_t)cap * sizeof *rp->p);
    rp->words = malloc((size_t)cap * sizeof *rp->words);
    rp->cap = cap;
    return rp->p && rp->words ? KVR_OK : KVR_ENOMEM;
}

static void probe_free(struct read_probe *rp) {
    free(rp->p);
    free(rp->words);
    rp->p = NULL;
    rp->words = NULL;
}

/* The whole aligned words of the len bytes at base, as pieces. */
static int probe_add(struct read_probe *rp, const void *base, size_t len) {
    size_t off = (8 - (uintptr_t)base % 8) % 8;
    for (; off + 8 <= len; off += PROBE_CHUNK) {
        if (rp->n == rp->cap)
            return KVR_ENOMEM;
        size_t nb = len - off < PROBE_CHUNK ? len - off : PROBE_CHUNK;
        rp->p[rp->n] = (const uint64_t *)(const void *)((const char *)base + off);
        rp->words[rp->n++] = nb / 8;
        rp->nbytes += (double)(nb / 8 * 8);
    }
    return KVR_OK;
}

static void probe_task(void *arg, int task, int thread) {
    struct read_probe *rp = arg;
    rp->sums[thread] += kvr_kernels()->sum_u64(rp->p[task], rp->words[task]);
}

/* Best GB/s of passes passes on tp's threads. */
static double probe_run(struct kvr_threadpool *tp, struct read_probe *rp, int passes) {
    double best_gbs = 0.0;
    for (int r = 0; r < passes; r++) {
        double t0 = kvr_clock_now();
        kvr_threadpool_run(tp, probe_task, rp, rp->n);
        double gbs = rp->nbytes / (kvr_clock_now() - t0) / 1e9;
        best_gbs = gbs > best_gbs ? gbs : best_gbs;
    }
    return best_gbs;
}

/* Best read bandwidth (GB/s) over reps passes of a buffer of nbytes on tp's threads. */
static double measure_bw(struct kvr_threadpool *tp, size_t nbytes, int reps) {
    /* The machine's best case: huge pages keep TLB misses out of the stream. */
    size_t len = 0;
    void *mem = kvr_huge_alloc(nbytes, &len);
    if (!mem) {
        KVR_LOG_ERROR("cannot map %zu bytes: %s", nbytes, strerror(errno));
        return 0.0;
    }
    memset(mem, 1, nbytes);
    struct read_probe *rp = malloc(sizeof *rp);
    double bw = 0.0;
    if (rp && probe_init(rp, (int)(nbytes / PROBE_CHUNK) + 1) == KVR_OK && probe_add(rp, mem, nbytes) == KVR_OK) {
        bw = probe_run(tp, rp, reps);
        uint64_t total = 0;
        for (int i = 0; i < 1024; i++)
            total += rp->sums[i];
        if (total != (uint64_t)reps * (nbytes / 8) * 0x0101010101010101ull)
            KVR_LOG_WARN("bandwidth buffer checksum mismatch (%llu)", (unsigned long long)total);
    }
    if (rp)
        probe_free(rp);
    free(rp);
    kvr_huge_free(mem, len);
    return bw;
}

/* The weights a decode step reads: every layer's seven matrices and the classifier, where
 * the model holds them (the copy in huge pages or the mapping). */
static int step_probe_init(struct read_probe *rp, const struct kvr_model *m) {
    const struct kvr_model_config *c = kvr_model_config(m);
    const struct kvr_model_weights *w = kvr_model_weights(m);
    int rc = probe_init(rp, (int)(kvr_model_step_nbytes(m) / PROBE_CHUNK) + 8 * c->n_layers + 8);
    for (int l = 0; rc == KVR_OK && l < c->n_layers; l++) {
        const struct kvr_layer_weights *lw = &w->layers[l];
        const struct kvr_tensor *ts[] = {&lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->w1, &lw->w2, &lw->w3};
        for (size_t i = 0; rc == KVR_OK && i < sizeof ts / sizeof ts[0]; i++)
            rc = probe_add(rp, ts[i]->data, (size_t)ts[i]->rows * ts[i]->row_nbytes);
    }
    if (rc == KVR_OK)
        rc = probe_add(rp, w->wcls.data, (size_t)w->wcls.rows * w->wcls.row_nbytes);
    return rc;
}

/* Best cblas_sgemm GFLOP/s at n^3 with OpenBLAS's own n_threads threads. */
static double measure_sgemm(int n, int n_threads, int reps) {
    size_t nn = (size_t)n * (size_t)n;
    float *a = malloc(nn * sizeof(float)), *b = malloc(nn * sizeof(float));
    float *c = malloc(nn * sizeof(float));
    double best_gf = 0.0;
    if (a && b && c) {
        uint64_t s = 42;
        for (size_t i = 0; i < nn; i++) {
            a[i] = (float)next_token(&s, 1000) * 1e-3f;
            b[i] = (float)next_token(&s, 1000) * 1e-3f;
        }
        openblas_set_num_threads(n_threads);
        for (int r = 0; r <= reps; r++) { /* r == 0 warms up */
            double t0 = kvr_clock_now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f,
                        c, n);
            double t = kvr_clock_now() - t0;
            double gf = 2.0 * n * (double)n * n / t / 1e9;
            if (r > 0 && gf > best_gf)
                best_gf = gf;
        }
        /* The engine runs OpenBLAS single-threaded inside its own pool. */
        openblas_set_num_threads(1);
    }
    free(a);
    free(b);
    free(c);
    return best_gf;
}

/* Measures both ceilings and keeps the best seen in this run. Called before the first
 * model and after each one: other processes on the machine move both numbers by tens of
 * percent over minutes, and a fraction of a ceiling measured while disturbed would flatter
 * the engine. Fractions are computed at the end against the best ceilings. */
static int measure_ceilings(struct bench *b) {
    struct kvr_threadpool *tp = NULL;
    if (kvr_threadpool_create(b->n_threads, &tp) != KVR_OK)
        return KVR_ENOMEM;
    double bw = measure_bw(tp, (size_t)BW_BUFFER_MIB << 20, b->cfg.quick ? 3 : 6);
    kvr_threadpool_free(tp);
    double gf = measure_sgemm(SGEMM_N, b->n_threads, b->cfg.quick ? 2 : 4);
    if (bw <= 0.0 || gf <= 0.0) {
        fprintf(stderr, "bench engine: cannot measure the machine's ceilings\n");
        return KVR_ENOMEM;
    }
    b->bw_gbs = bw > b->bw_gbs ? bw : b->bw_gbs;
    b->sgemm_gflops = gf > b->sgemm_gflops ? gf : b->sgemm_gflops;
    b->bw_min = b->bw_min == 0.0 || bw < b->bw_min ? bw : b->bw_min;
    b->sgemm_min = b->sgemm_min == 0.0 || gf < b->sgemm_min ? gf : b->sgemm_min;
    b->n_ceiling_runs++;
    fprintf(stderr, "bench engine: ceilings now: read %.1f GB/s, sgemm %.1f GFLOP/s\n", bw, gf);
    return KVR_OK;
}

/* ---- model runs ----------------------------------------------------------------- */

/* FLOPs of a prefill of T tokens from position 0, counted as the engine performs them:
 * every projection and the FFN as GEMMs over the T rows (2 flops per multiply-add),
 * causal attention (QK^T and AV over the i+1 visible keys of query i; the masked upper
 * part of a 64-row tile that the GEMM path also computes is not counted), and the
 * classifier on the last row only. RMSNorm, RoPE, softmax, SwiGLU are O(T*dim): left out. */
static double prefill_flops(const struct kvr_model_config *c, int T) {
    double d = c->dim, kv = c->kv_dim, h = c->hidden_dim;
    double mm = 2.0 * T * (2.0 * d * d + 2.0 * kv * d + 3.0 * h * d);
    double att = 2.0 * 2.0 * d * (T * (T + 1.0) / 2.0);
    return c->n_layers * (mm + att) + 2.0 * d * c->vocab_size;
}

/* FLOPs of one decode step of B sequences attending n_keys keys in total. */
static double decode_flops(const struct kvr_model_config *c, int B, double n_keys) {
    double d = c->dim, kv = c->kv_dim, h = c->hidden_dim;
    double mm = 2.0 * B * (2.0 * d * d + 2.0 * kv * d + 3.0 * h * d);
    return c->n_layers * (mm + 4.0 * d * n_keys) + 2.0 * B * d * c->vocab_size;
}

/* Writes the synthetic checkpoint unless a file of the right size is already there.
 * Writes to a temporary name and renames, so a concurrent run never sees half a file. */
static int ensure_model(const char *dir, const struct model_spec *sp, char *path, size_t len) {
    snprintf(path, len, "%s/%s", dir, sp->file);
    uint64_t want = kvr_model_expected_nbytes(&sp->c, NULL);
    struct stat st;
    if (stat(path, &st) == 0 && (uint64_t)st.st_size == want)
        return KVR_OK;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        KVR_LOG_ERROR("cannot create '%s': %s", dir, strerror(errno));
        return KVR_EIO;
    }
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    fprintf(stderr, "bench engine: writing %s (%.2f GB, once)...\n", path, (double)want / 1e9);
    double t0 = kvr_clock_now();
    int rc = kvr_model_write_synthetic(tmp, &sp->c, 1);
    if (rc == KVR_OK && rename(tmp, path) != 0) {
        KVR_LOG_ERROR("cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
        rc = KVR_EIO;
    }
    if (rc != KVR_OK)
        unlink(tmp);
    else
        fprintf(stderr, "bench engine: wrote it in %.1f s\n", kvr_clock_now() - t0);
    return rc;
}

static struct result *add_row(struct bench *b) {
    if (b->n_rows >= MAX_ROWS)
        return NULL;
    struct result *r = &b->rows[b->n_rows++];
    memset(r, 0, sizeof *r);
    return r;
}

/* A fresh dense sequence holding the KV of template's first n tokens (copied, so every
 * sequence reads its own memory as on a real decode node). */
static int clone_seq(struct kvr_kv_pool *pool, struct kvr_kv_seq *tmpl, int n, int n_tokens_max,
                     int n_layers, int kv_dim, struct kvr_kv_seq **out) {
    struct kvr_kv_seq_params sp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = n_tokens_max};
    struct kvr_kv_seq *s = NULL;
    float *k = malloc((size_t)2 * (size_t)kv_dim * sizeof *k), *v = k + kv_dim;
    int rc = k ? kvr_kv_seq_create(pool, &sp, &s) : KVR_ENOMEM;
    if (rc == KVR_OK)
        rc = kvr_kv_seq_reserve(s, n);
    /* Through f32 and back: exact for every cache type. */
    for (int l = 0; rc == KVR_OK && l < n_layers; l++) {
        for (int p = 0; rc == KVR_OK && p < n; p++) {
            rc = kvr_kv_seq_export(tmpl, l, p, 1, k, v);
            if (rc == KVR_OK)
                rc = kvr_kv_seq_import(s, l, p, 1, k, v);
        }
    }
    free(k);
    if (rc != KVR_OK) {
        kvr_kv_seq_free(s);
        return rc;
    }
    kvr_kv_seq_advance(s, n);
    *out = s;
    return KVR_OK;
}

static int run_model(struct bench *b, const struct model_spec *sp, const char *path) {
    struct kvr_model *m = NULL;
    struct kvr_kv_pool *pool = NULL;
    struct kvr_engine *e = NULL;
    struct kvr_kv_seq *tmpl = NULL;
    struct kvr_kv_seq *seqs[32] = {0};
    int *tokens = NULL;
    float *logits = NULL;
    double *times = NULL;
    struct kvr_forward_item items[32];
    struct read_probe probe = {0};
    int n_seqs = 0, rc;
    int reps = b->reps;
    int steps = b->cfg.quick ? (sp->decode_steps + 1) / 2 : sp->decode_steps;
    size_t first_row = (size_t)b->n_rows;

    reset_peak_rss();
    struct kvr_model_params mp = {.mode = (enum kvr_weights_mode)b->cfg.weights, .n_ctx = b->cfg.context};
    if ((rc = kvr_model_load_params(path, &mp, &m)) != KVR_OK) {
        fprintf(stderr, "bench engine: cannot load '%s': %s\n", path, kvr_status_str(rc));
        goto out;
    }
    const struct kvr_model_config *c = kvr_model_config(m);
    int V = c->vocab_size, max_prompt = 0;
    for (size_t i = 0; i < sizeof prefill_lens / sizeof prefill_lens[0]; i++)
        if (prefill_lens[i] <= c->seq_len && prefill_lens[i] > max_prompt)
            max_prompt = prefill_lens[i];
    int dctx = b->cfg.decode_ctx;
    int n_ctx_dec = dctx + 1 + reps * steps;
    int max_b = dctx > PREFIX_LEN ? 1 : 32; /* long contexts: batch 1 only */
    enum kvr_kv_type kt = (enum kvr_kv_type)b->cfg.kv_type;
    uint64_t tok_nbytes = kvr_kv_token_nbytes_type(kt, c->n_layers, c->kv_dim);
    uint64_t weight_nbytes = kvr_model_step_nbytes(m), params = kvr_model_n_params(m);
    int mi = b->n_models++;
    b->models[mi].name = sp->name;
    b->models[mi].path = path;
    b->models[mi].params = params;
    b->models[mi].weight_bytes = weight_nbytes;
    b->models[mi].kv_token_bytes = tok_nbytes;
    b->models[mi].loaded = 1;
    snprintf(b->models[mi].types, sizeof b->models[mi].types, "%s", kvr_model_types(m));

    /* One pool for the biggest prompt, the template and 32 decoding sequences. */
    struct kvr_kv_policy_params dense = {.policy = KVR_KV_DENSE};
    int n_blocks = kvr_kv_blocks_needed(&dense, BLOCK_TOKENS, max_prompt, max_prompt) +
                   kvr_kv_blocks_needed(&dense, BLOCK_TOKENS, dctx, dctx) +
                   max_b * kvr_kv_blocks_needed(&dense, BLOCK_TOKENS, n_ctx_dec, dctx);
    struct kvr_kv_pool_params pp = {.type = kt, .n_layers = c->n_layers, .kv_dim = c->kv_dim,
                                    .block_tokens = BLOCK_TOKENS,
                                    .budget_nbytes = (uint64_t)n_blocks * BLOCK_TOKENS * tok_nbytes};
    int n_ctx = max_prompt > n_ctx_dec ? max_prompt : n_ctx_dec;
    int max_tok = max_prompt > dctx ? max_prompt : dctx;
    struct kvr_engine_params ep = {.model = m, .n_threads = b->n_threads,
                                   .n_batch_tokens_max = max_tok > 32 ? max_tok : 32,
                                   .n_items_max = 32, .n_ctx_max = n_ctx};
    if ((rc = kvr_kv_pool_create(&pp, &pool)) != KVR_OK || (rc = kvr_engine_create(&ep, &e)) != KVR_OK) {
        fprintf(stderr, "bench engine: cannot set up the engine for %s: %s\n", sp->name, kvr_status_str(rc));
        goto out;
    }
    if ((rc = step_probe_init(&probe, m)) != KVR_OK) {
        fprintf(stderr, "bench engine: cannot set up the read probe for %s: %s\n", sp->name, kvr_status_str(rc));
        goto out;
    }
    int n_times = reps > 32 ? reps : 32;
    tokens = malloc((size_t)(max_tok > 32 ? max_tok : 32) * sizeof *tokens);
    logits = malloc((size_t)32 * (size_t)V * sizeof *logits);
    times = malloc((size_t)n_times * sizeof *times);
    if (!tokens || !logits || !times) {
        rc = KVR_ENOMEM;
        goto out;
    }
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    struct kvr_kv_seq_params seqp = {.policy = dense, .n_tokens_max = n_ctx};

    /* Prefill: one prompt of T tokens into a fresh sequence, logits of the last token.
     * The first (untimed) run faults the weights in. */
    for (int li = -1; li < (int)(sizeof prefill_lens / sizeof prefill_lens[0]); li++) {
        int T = li < 0 ? PREFIX_LEN : prefill_lens[li];
        if (T > c->seq_len)
            continue;
        if (li >= 0 && b->cfg.decode_only)
            break;
        int n_runs = li < 0 ? 1 : reps;
        for (int r = 0; r < n_runs; r++) {
            struct kvr_kv_seq *s = NULL;
            if ((rc = kvr_kv_seq_create(pool, &seqp, &s)) != KVR_OK)
                goto out;
            tokens[0] = 1;
            for (int t = 1; t < T; t++)
                tokens[t] = next_token(&rng, V);
            struct kvr_forward_item it = {.seq = s, .tokens = tokens, .n_tokens = T, .logits = logits, .prompt = 1};
            double t0 = kvr_clock_now();
            rc = kvr_engine_forward(e, &it, 1);
            times[r] = (double)T / (kvr_clock_now() - t0);
            kvr_kv_seq_free(s);
            if (rc != KVR_OK) {
                fprintf(stderr, "bench engine: prefill of %d tokens failed: %s\n", T, kvr_status_str(rc));
                goto out;
            }
        }
        if (li < 0)
            continue;
        struct result *row = add_row(b);
        if (!row)
            break;
        row->model = sp->name;
        row->model_params = params;
        row->batch = 1;
        row->prompt_len = T;
        row->tok_s = best(times, reps);
        row->tok_s_median = median(times, reps);
        row->flops = prefill_flops(c, T);
        row->gflops = row->flops * row->tok_s / T / 1e9;
        fprintf(stderr, "bench engine: %s prefill %d: %.1f tok/s (%.1f GFLOP/s)\n", sp->name, T,
                row->tok_s, row->gflops);
    }

    /* Decode: B sequences, each holding a 128-token context, one token each per step,
     * all in one forward call with logits for every row (as a decode node runs). */
    int prefix = dctx < c->seq_len ? dctx : c->seq_len / 2;
    if ((rc = kvr_kv_seq_create(pool, &seqp, &tmpl)) != KVR_OK)
        goto out;
    tokens[0] = 1;
    for (int t = 1; t < prefix; t++)
        tokens[t] = next_token(&rng, V);
    struct kvr_forward_item pit = {.seq = tmpl, .tokens = tokens, .n_tokens = prefix, .logits = logits,
                                   .prompt = 1};
    if ((rc = kvr_engine_forward(e, &pit, 1)) != KVR_OK)
        goto out;
    for (size_t bi = 0; bi < sizeof decode_batches / sizeof decode_batches[0]; bi++) {
        int B = decode_batches[bi];
        if (prefix + 1 + reps * steps > c->seq_len || B > max_b)
            break;
        for (n_seqs = 0; n_seqs < B; n_seqs++)
            if ((rc = clone_seq(pool, tmpl, prefix, n_ctx, c->n_layers, c->kv_dim, &seqs[n_seqs])) != KVR_OK)
                goto out;
        int dtok[32];
        for (int i = 0; i < B; i++) {
            dtok[i] = next_token(&rng, V);
            items[i] = (struct kvr_forward_item){.seq = seqs[i], .tokens = &dtok[i], .n_tokens = 1,
                                                 .logits = logits + (size_t)i * V};
        }
        double bytes_sum = 0.0, flops_sum = 0.0;
        /* Batch 1: a probe of the step's own weights before each repetition and after the
         * last (struct read_probe). */
        int paired = B == 1 && probe.n > 0;
        double rep_gbs[MAX_REPS], probe_gbs[MAX_REPS + 1];
        for (int r = -1; r < reps; r++) { /* r == -1: one untimed warm-up step */
            int n = r < 0 ? 1 : steps;
            if (paired && r >= 0 && r <= MAX_REPS) /* r == MAX_REPS: after repetition MAX_REPS - 1 */
                probe_gbs[r] = probe_run(kvr_engine_threadpool(e), &probe, 2);
            double rep_bytes = 0.0;
            double t0 = kvr_clock_now();
            for (int st = 0; st < n; st++) {
                if (r >= 0) {
                    double keys = (double)B * (kvr_kv_seq_n_past(seqs[0]) + 1);
                    rep_bytes += (double)weight_nbytes + keys * (double)tok_nbytes;
                    flops_sum += decode_flops(c, B, keys);
                }
                if ((rc = kvr_engine_forward(e, items, B)) != KVR_OK) {
                    fprintf(stderr, "bench engine: decode step (batch %d) failed: %s\n", B, kvr_status_str(rc));
                    goto out;
                }
                for (int i = 0; i < B; i++)
                    dtok[i] = next_token(&rng, V);
            }
            if (r >= 0) {
                double dt = kvr_clock_now() - t0;
                times[r] = (double)B * n / dt;
                bytes_sum += rep_bytes;
                if (r < MAX_REPS)
                    rep_gbs[r] = rep_bytes / dt / 1e9;
            }
        }
        int n_paired = reps < MAX_REPS ? reps : MAX_REPS;
        if (paired && reps <= MAX_REPS)
            probe_gbs[reps] = probe_run(kvr_engine_threadpool(e), &probe, 2);
        struct result *row = add_row(b);
        if (row) {
            row->model = sp->name;
            row->model_params = params;
            row->decode = 1;
            row->batch = B;
            row->prompt_len = prefix;
            row->steps = steps;
            row->tok_s = best(times, reps);
            row->tok_s_median = median(times, reps);
            row->bytes = bytes_sum / (reps * steps);
            row->flops = flops_sum / (reps * steps);
            row->gbs = row->bytes * row->tok_s / B / 1e9;
            row->gflops = row->flops * row->tok_s / B / 1e9;
            fprintf(stderr, "bench engine: %s decode batch %d: %.1f tok/s (%.1f GB/s, %.1f GFLOP/s)\n",
                    sp->name, B, row->tok_s, row->gbs, row->gflops);
            if (paired) {
                double frac[MAX_REPS];
                row->n_paired = n_paired;
                for (int r = 0; r < n_paired; r++) {
                    double ceil = probe_gbs[r] > probe_gbs[r + 1] ? probe_gbs[r] : probe_gbs[r + 1];
                    row->rep_gbs[r] = rep_gbs[r];
                    frac[r] = rep_gbs[r] / ceil;
                }
                memcpy(row->probe_gbs, probe_gbs, (size_t)(n_paired + 1) * sizeof probe_gbs[0]);
                row->bw_fraction_paired = median(frac, n_paired);
                fprintf(stderr, "bench engine: %s decode batch 1: %.1f%% of the step's own weights read next "
                        "to each repetition (median of %d)\n", sp->name, 100.0 * row->bw_fraction_paired, n_paired);
            }
        }
        for (int i = 0; i < n_seqs; i++) {
            kvr_kv_seq_free(seqs[i]);
            seqs[i] = NULL;
        }
        n_seqs = 0;
    }
    rc = KVR_OK;
out:
    for (int i = 0; i < 32; i++)
        kvr_kv_seq_free(seqs[i]);
    kvr_kv_seq_free(tmpl);
    kvr_engine_free(e);
    kvr_kv_pool_free(pool);
    if (m) {
        uint64_t rss = peak_rss();
        b->models[b->n_models - 1].peak_rss = rss;
        for (int i = (int)first_row; i < b->n_rows; i++)
            b->rows[i].peak_rss = rss;
    }
    probe_free(&probe);
    kvr_model_free(m);
    free(tokens);
    free(logits);
    free(times);
    return rc;
}

/* ---- report --------------------------------------------------------------------- */

static void print_table(const struct bench *b, const char *cpu) {
    printf("kvrelay bench engine: %d threads on %ld CPUs (%s); kernels %s; best of %d repetitions\n",
           b->n_threads, sysconf(_SC_NPROCESSORS_ONLN), cpu, kvr_kernels()->name, b->reps);
    printf("ceilings: read bandwidth %.1f GB/s (%d MiB, all threads), cblas_sgemm %.1f GFLOP/s "
           "(%d^3, all threads): best of %d measurements spread over the run (lowest %.1f GB/s, "
           "%.1f GFLOP/s)\n\n", b->bw_gbs, BW_BUFFER_MIB, b->sgemm_gflops, SGEMM_N,
           b->n_ceiling_runs, b->bw_min, b->sgemm_min);
    for (int i = 0; i < b->n_models; i++)
        printf("%-26s %6.1fM params (%s), %.1f MB weights/step, %.1f KB KV/token, peak RSS %.0f MiB\n",
               b->models[i].name, (double)b->models[i].params / 1e6, b->models[i].types,
               (double)b->models[i].weight_bytes / 1e6, (double)b->models[i].kv_token_bytes / 1e3,
               (double)b->models[i].peak_rss / 1048576.0);
    if (b->n_rows == 0)
        return;
    printf("\n%-26s %-8s %5s %6s %10s %10s %8s %8s %9s\n", "model", "phase", "batch", "ctx",
           "tok/s", "median", "GB/s", "GFLOP/s", "fraction");
    for (int i = 0; i < b->n_rows; i++) {
        const struct result *r = &b->rows[i];
        printf("%-26s %-8s %5d %6d %10.1f %10.1f %8.1f %8.1f %7.1f%% %s\n", r->model,
               r->decode ? "decode" : "prefill", r->batch, r->prompt_len, r->tok_s, r->tok_s_median,
               r->gbs, r->gflops, 100.0 * (r->decode ? r->bw_fraction : r->flops_fraction),
               r->decode ? "of bandwidth" : "of sgemm");
        if (r->n_paired > 0)
            printf("%-26s %-8s %5s %6s %10s %10s %8s %8s %7.1f%% of its own weights read next to each repetition\n",
                   "", "", "", "", "", "", "", "", 100.0 * r->bw_fraction_paired);
    }
}

static void print_json(const struct bench *b, const char *cpu) {
    printf("{\"bench\":\"engine\",\"nproc\":%ld,\"threads\":%d,\"cpu\":", sysconf(_SC_NPROCESSORS_ONLN),
           b->n_threads);
    kvr_json_write_string(stdout, cpu);
    printf(",\"kernel\":\"%s\",\"cpu_features\":", kvr_kernels()->name);
    kvr_json_write_string(stdout, kvr_cpu_features());
    printf(",\"weights\":\"%s\"", b->cfg.weights == KVR_WEIGHTS_COPY ? "copy" : "mmap");
    printf(",\"kv_type\":\"%s\",\"decode_ctx\":%d", kvr_kv_type_name(b->cfg.kv_type), b->cfg.decode_ctx);
    printf(",\"quick\":%s,\"reps\":%d,\"bw_gbs\":%.3f,\"bw_gbs_min\":%.3f,\"bw_buffer_bytes\":%llu,"
           "\"sgemm_gflops\":%.3f,\"sgemm_gflops_min\":%.3f,\"sgemm_n\":%d,\"ceiling_runs\":%d,"
           "\"models\":[",
           b->cfg.quick ? "true" : "false", b->reps, b->bw_gbs, b->bw_min,
           (unsigned long long)BW_BUFFER_MIB << 20, b->sgemm_gflops, b->sgemm_min, SGEMM_N,
           b->n_ceiling_runs);
    for (int i = 0; i < b->n_models; i++) {
        printf("%s{\"model\":", i ? "," : "");
        kvr_json_write_string(stdout, b->models[i].name);
        printf(",\"path\":");
        kvr_json_write_string(stdout, b->models[i].path);
        printf(",\"types\":");
        kvr_json_write_string(stdout, b->models[i].types);
        printf(",\"model_params\":%llu,\"weight_bytes_per_step\":%llu,\"kv_bytes_per_token\":%llu,"
               "\"peak_rss_bytes\":%llu}",
               (unsigned long long)b->models[i].params, (unsigned long long)b->models[i].weight_bytes,
               (unsigned long long)b->models[i].kv_token_bytes, (unsigned long long)b->models[i].peak_rss);
    }
    printf("],\"results\":[");
    for (int i = 0; i < b->n_rows; i++) {
        const struct result *r = &b->rows[i];
        printf("%s{\"model\":", i ? "," : "");
        kvr_json_write_string(stdout, r->model);
        printf(",\"model_params\":%llu,\"phase\":\"%s\",\"batch\":%d,\"prompt_len\":%d,",
               (unsigned long long)r->model_params, r->decode ? "decode" : "prefill", r->batch,
               r->prompt_len);
        if (r->decode)
            printf("\"decode_steps\":%d,\"decode_tok_s\":%.3f,\"decode_tok_s_median\":%.3f,"
                   "\"bytes_per_step\":%.0f,\"gbs\":%.3f,\"decode_bw_fraction\":%.4f,\"gflops\":%.3f,"
                   "\"decode_flops_fraction\":%.4f,",
                   r->steps, r->tok_s, r->tok_s_median, r->bytes, r->gbs, r->bw_fraction, r->gflops,
                   r->flops_fraction);
        if (r->n_paired > 0) {
            printf("\"decode_bw_fraction_paired\":%.4f,\"rep_gbs\":[", r->bw_fraction_paired);
            for (int k = 0; k < r->n_paired; k++)
                printf("%s%.3f", k ? "," : "", r->rep_gbs[k]);
            printf("],\"paired_probe_gbs\":[");
            for (int k = 0; k <= r->n_paired; k++)
                printf("%s%.3f", k ? "," : "", r->probe_gbs[k]);
            printf("],");
        }
        else
            printf("\"prefill_tok_s\":%.3f,\"prefill_tok_s_median\":%.3f,\"flops\":%.0f,"
                   "\"gflops\":%.3f,\"prefill_flops_fraction\":%.4f,",
                   r->tok_s, r->tok_s_median, r->flops, r->gflops, r->flops_fraction);
        printf("\"bw_gbs\":%.3f,\"sgemm_gflops\":%.3f,\"peak_rss_bytes\":%llu}", b->bw_gbs,
               b->sgemm_gflops, (unsigned long long)r->peak_rss);
    }
    printf("]}\n");
}

/* ---- entry ---------------------------------------------------------------------- */

static int wanted(const char *list, const char *key) {
    size_t n = strlen(key);
    for (const char *p = list; p && *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && !strncmp(p, key, n))
            return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

int kvr_bench_engine(int argc, char **argv) {
    struct bench *b = calloc(1, sizeof *b);
    if (!b)
        return KVR_EXIT_RUNTIME;
    int done, ex = kvr_cli_parse("bench engine",
                                 "Prefill and decode tokens/s of the engine against this machine's "
                                 "read-bandwidth and sgemm ceilings.",
                                 eng_opts, (int)(sizeof eng_opts / sizeof eng_opts[0]), &b->cfg, argc,
                                 argv, &done);
    if (done)
        goto out;
    ex = KVR_EXIT_RUNTIME;
    const char *list = b->cfg.models ? b->cfg.models : b->cfg.quick ? "260k,110m" : "260k,110m,1.1b";
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        int ok = 0;
        for (int i = 0; i < MAX_MODELS; i++)
            ok |= strlen(specs[i].key) == len && !strncmp(p, specs[i].key, len);
        if (!ok) {
            fprintf(stderr, "kvrelay bench engine: unknown model '%.*s' in --models (260k, 110m, 1.1b)\n",
                    (int)len, p);
            ex = KVR_EXIT_USAGE;
            goto out;
        }
        p += len + (p[len] == ',');
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    b->n_threads = b->cfg.threads ? b->cfg.threads : ncpu > 0 ? (int)ncpu : 1;
    b->reps = b->cfg.reps ? b->cfg.reps : b->cfg.quick ? 1 : 3;
    char cpu[256];
    kvr_bench_cpu_model(cpu, sizeof cpu);

    /* Synthesize the checkpoints before measuring anything: writing them is I/O. */
    for (int i = 0; i < MAX_MODELS && !b->cfg.ceilings_only; i++) {
        if (!wanted(list, specs[i].key))
            continue;
        if (!specs[i].file) {
            snprintf(b->paths[i], sizeof b->paths[i], "%s", b->cfg.bundled);
        } else if (ensure_model(b->cfg.models_dir, &specs[i], b->paths[i], sizeof b->paths[i]) != KVR_OK) {
            fprintf(stderr, "kvrelay bench engine: cannot write the %s checkpoint in '%s'\n",
                    specs[i].name, b->cfg.models_dir);
            goto out;
        }
    }

    if (measure_ceilings(b) != KVR_OK)
        goto out;
    for (int i = 0; i < MAX_MODELS && !b->cfg.ceilings_only; i++) {
        if (!wanted(list, specs[i].key))
            continue;
        if (run_model(b, &specs[i], b->paths[i]) != KVR_OK || measure_ceilings(b) != KVR_OK)
            goto out;
    }
    for (int i = 0; i < b->n_rows; i++) {
        struct result *r = &b->rows[i];
        r->bw_fraction = r->gbs / b->bw_gbs;
        r->flops_fraction = r->gflops / b->sgemm_gflops;
    }
    if (b->cfg.json)
        print_json(b, cpu);
    else
        print_table(b, cpu);
    ex = KVR_EXIT_OK;
out:
    free(b);
    return ex;
}
