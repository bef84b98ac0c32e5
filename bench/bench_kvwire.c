/* bench_kvwire.c - `kvrelay bench kvwire`: the KV wire codec (common/kv_wire.c) on a real
 * cache: prefill --tokens tokens of TinyStories text, cut the cache into one message per
 * (block, layer) as the prefill node ships it, and for each value type x transform x
 * zstd level report the ratio against raw float32 bytes (headers included) and encode /
 * decode MB/s of raw f32 on one core, next to the prefill time of the same tokens.
 * --explore adds transforms that were measured and not kept (zstd only, ratio and
 * compress speed). Reports numbers (a table, or a JSON array of rows); asserts nothing. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <zstd.h>

#include "bench.h"
#include "cli.h"
#include "clock.h"
#include "half.h"
#include "json.h"
#include "kv_cache.h"
#include "kv_wire.h"
#include "log.h"
#include "model.h"
#include "options.h"
#include "status.h"
#include "tokenizer.h"
#include "transformer.h"

#ifndef KVR_SHARED_DIR
#define KVR_SHARED_DIR "../shared"
#endif

#define MAX_LEVELS 16

struct kw_cfg {
    const char *model;
    const char *tokenizer;
    const char *text;
    int tokens;
    int block_tokens;
    const char *levels;
    int threads;
    double min_time;
    int explore;
    int json;
    int context;
};

static const struct kvr_opt kw_opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct kw_cfg, model), NULL, 0, -1, NULL, 1,
     "model file: GGUF or llama2.c checkpoint"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct kw_cfg, tokenizer), NULL, 0, -1, NULL, 0,
     "tokenizer.bin (llama2.c); default: the GGUF model's own"},
    {"context", KVR_OPT_INT, offsetof(struct kw_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0,
     "context length in tokens (0 = the model file's)"},
    {"text", KVR_OPT_STRING, offsetof(struct kw_cfg, text),
     KVR_SHARED_DIR "/data/tinystories_valid_100.txt", 0, -1, NULL, 0,
     "text whose first --tokens tokens are prefilled"},
    {"tokens", KVR_OPT_INT, offsetof(struct kw_cfg, tokens), "512", 1, 1 << 20, NULL, 0,
     "prompt tokens (BOS included); at most the model's context"},
    {"block-tokens", KVR_OPT_INT, offsetof(struct kw_cfg, block_tokens), "16", 1, 65536, NULL, 0,
     "tokens per message (the pool's block size)"},
    {"levels", KVR_OPT_STRING, offsetof(struct kw_cfg, levels), "1,3,5,9,19", 0, -1, NULL, 0,
     "comma-separated zstd levels"},
    {"threads", KVR_OPT_INT, offsetof(struct kw_cfg, threads), "0", 0, 1024, NULL, 0,
     "prefill threads (0 = online CPUs); the codec always runs on one"},
    {"min-time", KVR_OPT_FLOAT, offsetof(struct kw_cfg, min_time), "0.3", 0, 60, NULL, 0,
     "seconds of repeated passes per measurement; the best pass counts"},
    {"explore", KVR_OPT_FLAG, offsetof(struct kw_cfg, explore), "0", 0, -1, NULL, 0,
     "also measure transforms that were not kept"},
    {"json", KVR_OPT_FLAG, offsetof(struct kw_cfg, json), "0", 0, -1, NULL, 0,
     "print a JSON array of rows instead of a table"},
};

/* One (block, layer) of the cache: two (n_tokens, kv_dim) arrays in the pool. */
struct kw_msg {
    const float *k, *v;
    int layer, token_begin, n_tokens;
};

struct kw_row {
    const char *value_type;
    char transform[40];
    int level;
    double ratio;          /* raw f32 bytes / wire bytes (headers included) */
    double compress_mbs;   /* raw f32 MB per second of encoding */
    double decompress_mbs; /* raw f32 MB per second of decoding; < 0: not measured */
    uint64_t wire_nbytes;
    int n_stored_raw;   /* messages whose payload was not worth compressing */
    uint64_t n_bits_differ; /* decoded values whose bits differ from the original (f32: 0) */
    double max_abs_err; /* decoded vs original */
    double max_rel_err; /* over values with |x| >= 1e-3 */
    double codec_s;     /* best encode pass + best decode pass */
};

struct kw {
    struct kw_cfg cfg;
    const struct kvr_model_config *c;
    struct kw_msg *msgs;
    int n_msgs;
    uint64_t raw_nbytes; /* f32 K and V of all messages */
    double prefill_s;
    int prefill_threads;
    double prefill_cpu_s; /* CPU seconds of all threads in that run: robust to other load */
    double loadavg;       /* 1-minute load average at the start (other processes skew wall times) */
    struct kw_row *rows;
    int n_rows, cap_rows;
};

/* CPU seconds of the calling thread: the codec's cost on one core, not inflated when
 * other processes share the machine (wall time would count their slices too). */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU seconds of the whole process (all threads; the engine's workers spin at most
 * 0.1 ms after each parallel loop, a negligible part of a prefill). */
static double process_cpu(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- the codec as shipped ---------------------------------------------------------- */

static int run_codec(struct kw *w, struct kvr_wire_codec *codec, uint8_t *wire, size_t cap_one,
                     size_t *lens, float *kd, float *vd, int dtype, int tf, int level,
                     struct kw_row *r) {
    const struct kvr_model_config *c = w->c;
    struct kvr_wire_opts o = {.dtype = dtype, .transform = tf, .level = level};
    size_t max_floats = (size_t)w->cfg.block_tokens * (size_t)c->kv_dim;
    double best_enc = 1e30, best_dec = 1e30, t_all = 0;
    for (int pass = 0; pass < 1000 && (pass < 2 || t_all < w->cfg.min_time); pass++) {
        double t0 = cpu_now();
        for (int i = 0; i < w->n_msgs; i++) {
            const struct kw_msg *m = &w->msgs[i];
            struct kvr_wire_block b = {.fingerprint = 1,
                                       .seq_id = 1,
                                       .layer_begin = m->layer,
                                       .n_layers = 1,
                                       .token_begin = m->token_begin,
                                       .n_tokens = m->n_tokens,
                                       .n_kv_heads = c->n_kv_heads,
                                       .head_dim = c->head_dim};
            int rc = kvr_wire_encode(codec, &o, &b, m->k, m->v, wire + (size_t)i * cap_one, cap_one,
                                     &lens[i]);
            if (rc != KVR_OK)
                return rc;
        }
        double t1 = cpu_now();
        for (int i = 0; i < w->n_msgs; i++) {
            struct kvr_wire_block b;
            int rc = kvr_wire_decode(codec, wire + (size_t)i * cap_one, lens[i], 1, &b, kd, vd,
                                     max_floats);
            if (rc != KVR_OK)
                return rc;
        }
        double t2 = cpu_now();
        best_enc = t1 - t0 < best_enc ? t1 - t0 : best_enc;
        best_dec = t2 - t1 < best_dec ? t2 - t1 : best_dec;
        t_all += t2 - t0;
    }
    /* Sizes and errors, untimed. */
    uint64_t wire_nbytes = 0;
    int n_raw = 0;
    double max_abs = 0, max_rel = 0;
    uint64_t n_differ = 0;
    for (int i = 0; i < w->n_msgs; i++) {
        const struct kw_msg *m = &w->msgs[i];
        struct kvr_wire_block b;
        int rc =
            kvr_wire_decode(codec, wire + (size_t)i * cap_one, lens[i], 1, &b, kd, vd, max_floats);
        if (rc != KVR_OK)
            return rc;
        wire_nbytes += lens[i];
        n_raw += !b.compressed;
        size_t n = (size_t)m->n_tokens * (size_t)c->kv_dim;
        for (size_t j = 0; j < 2 * n; j++) {
            float x = j < n ? m->k[j] : m->v[j - n], y = j < n ? kd[j] : vd[j - n];
            if (memcmp(&x, &y, sizeof x) == 0)
                continue;
            n_differ++;
            double e = fabs((double)x - (double)y);
            max_abs = e > max_abs ? e : max_abs;
            if (fabs((double)x) >= 1e-3 && e / fabs((double)x) > max_rel)
                max_rel = e / fabs((double)x);
        }
    }
    r->ratio = (double)w->raw_nbytes / (double)wire_nbytes;
    r->compress_mbs = (double)w->raw_nbytes / best_enc * 1e-6;
    r->decompress_mbs = (double)w->raw_nbytes / best_dec * 1e-6;
    r->wire_nbytes = wire_nbytes;
    r->n_stored_raw = n_raw;
    r->n_bits_differ = n_differ;
    r->max_abs_err = max_abs;
    r->max_rel_err = max_rel;
    r->codec_s = best_enc + best_dec;
    return KVR_OK;
}

/* ---- transforms that were measured and not kept ----------------------------------- */

enum { EX_ONEBLOCK, EX_DEFAULTS, EX_XOR_PREV, EX_TRANSPOSE, EX_ROTATE, EX_BITSHUFFLE, EX_N };
static const char *ex_names[EX_N] = {
    "explore:shuffle-one-block",   /* byte planes, one zstd call (zstd's blocks span planes) */
    "explore:shuffle-zstd-params", /* the codec's planes and blocks, zstd's default parameters */
    "explore:xor-prev+shuffle",    /* each token XOR the previous token, same channel */
    "explore:transpose+shuffle",   /* channel-major before the planes */
    "explore:sign-rotate+shuffle", /* sign bit moved to the bottom: top byte = exponent */
    "explore:bitshuffle"};         /* bit planes, one block per 8 of them */

/* Builds the payload of one message as transform ex would (values as uint32 words of
 * es bytes in e, then a byte or bit layout in out) and returns its length. */
static size_t ex_payload(int ex, const struct kw_msg *m, int kv_dim, int dtype, uint32_t *e,
                         uint32_t *e2, uint8_t *out) {
    size_t n = (size_t)m->n_tokens * (size_t)kv_dim, nv = 2 * n;
    int es = kvr_wire_dtype_nbytes(dtype);
    for (size_t j = 0; j < nv; j++) {
        float x = j < n ? m->k[j] : m->v[j - n];
        e[j] = dtype == KVR_WIRE_F32   ? kvr_f32_bits(x)
               : dtype == KVR_WIRE_F16 ? kvr_f32_to_f16(x)
                                       : kvr_f32_to_bf16(x);
    }
    unsigned bits = 8u * (unsigned)es;
    uint32_t mask = es == 4 ? 0xffffffffu : 0xffffu;
    if (ex == EX_XOR_PREV) { /* each token's value XOR the previous token's, same channel */
        memcpy(e2, e, nv * sizeof *e);
        for (size_t j = 0; j < nv; j++)
            if ((j % n) >= (size_t)kv_dim)
                e[j] = e2[j] ^ e2[j - (size_t)kv_dim];
    } else if (ex == EX_TRANSPOSE) { /* channel-major: (kv_dim, n_tokens) for K, then V */
        memcpy(e2, e, nv * sizeof *e);
        for (size_t h = 0; h < 2; h++)
            for (size_t t = 0; t < (size_t)m->n_tokens; t++)
                for (size_t d = 0; d < (size_t)kv_dim; d++)
                    e[h * n + d * (size_t)m->n_tokens + t] = e2[h * n + t * (size_t)kv_dim + d];
    } else if (ex == EX_ROTATE) { /* sign to the lowest bit: the top byte is all exponent */
        for (size_t j = 0; j < nv; j++)
            e[j] = ((e[j] << 1) | (e[j] >> (bits - 1))) & mask;
    }
    if (ex == EX_BITSHUFFLE) { /* bit planes, lowest bit first */
        size_t nb = (nv + 7) / 8;
        memset(out, 0, nb * bits);
        for (unsigned bit = 0; bit < bits; bit++)
            for (size_t j = 0; j < nv; j++)
                out[bit * nb + j / 8] |= (uint8_t)(((e[j] >> bit) & 1u) << (j % 8));
        return nb * bits;
    }
    for (int p = 0; p < es; p++)
        for (size_t j = 0; j < nv; j++)
            out[(size_t)p * nv + j] = (uint8_t)(e[j] >> (8 * p));
    return nv * (size_t)es;
}

static int run_explore(struct kw *w, ZSTD_CCtx *z, uint8_t *pay, uint8_t *dst, size_t dst_cap,
                       uint32_t *e, uint32_t *e2, int dtype, int ex, int level, struct kw_row *r) {
    int es = kvr_wire_dtype_nbytes(dtype);
    double best = 1e30, t_all = 0;
    uint64_t total = 0;
    for (int pass = 0; pass < 1000 && (pass < 2 || t_all < w->cfg.min_time); pass++) {
        double tp = 0;
        total = 0;
        for (int i = 0; i < w->n_msgs; i++) {
            double t0 = cpu_now(); /* the layout's cost counts: it is part of the transform */
            size_t raw = ex_payload(ex, &w->msgs[i], w->c->kv_dim, dtype, e, e2, pay);
            size_t out = 0;
            /* As the codec: level, then (except EX_DEFAULTS) its match-finder settings. */
            ZSTD_CCtx_reset(z, ZSTD_reset_session_and_parameters);
            ZSTD_CCtx_setParameter(z, ZSTD_c_compressionLevel, level);
            if (ex != EX_DEFAULTS) {
                ZSTD_CCtx_setParameter(z, ZSTD_c_minMatch, 7);
                if (level <= 3)
                    ZSTD_CCtx_setParameter(z, ZSTD_c_hashLog, 8);
            }
            if (ex == EX_ONEBLOCK) {
                out = ZSTD_compress2(z, dst, dst_cap, pay, raw);
            } else { /* one zstd block per byte plane (per 8 bit planes), as the codec does */
                ZSTD_CCtx_setPledgedSrcSize(z, raw);
                ZSTD_outBuffer ob = {dst, dst_cap, 0};
                for (int p = 0; p < es && !ZSTD_isError(out); p++) {
                    ZSTD_inBuffer ib = {pay + (size_t)p * (raw / (size_t)es), raw / (size_t)es, 0};
                    out =
                        ZSTD_compressStream2(z, &ob, &ib, p + 1 == es ? ZSTD_e_end : ZSTD_e_flush);
                }
                if (!ZSTD_isError(out))
                    out = ob.pos;
            }
            if (ZSTD_isError(out)) {
                KVR_LOG_ERROR("zstd failed: %s", ZSTD_getErrorName(out));
                return KVR_ECOMPRESS;
            }
            tp += cpu_now() - t0;
            total += KVR_WIRE_HEADER_NBYTES + (out < raw ? out : raw);
        }
        best = tp < best ? tp : best;
        t_all += tp;
    }
    r->ratio = (double)w->raw_nbytes / (double)total;
    r->compress_mbs = (double)w->raw_nbytes / best * 1e-6;
    r->decompress_mbs = -1;
    r->wire_nbytes = total;
    r->codec_s = -1;
    r->max_abs_err = r->max_rel_err = -1;
    return KVR_OK;
}

/* ---- driver ------------------------------------------------------------------------ */

static struct kw_row *new_row(struct kw *w) {
    if (w->n_rows == w->cap_rows) {
        int cap = w->cap_rows ? 2 * w->cap_rows : 64;
        struct kw_row *r = realloc(w->rows, (size_t)cap * sizeof *r);
        if (!r)
            return NULL;
        w->rows = r;
        w->cap_rows = cap;
    }
    struct kw_row *r = &w->rows[w->n_rows++];
    memset(r, 0, sizeof *r);
    return r;
}

static int parse_levels(const char *s, int *lv, int *n) {
    *n = 0;
    while (*s) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s || x < KVR_WIRE_LEVEL_MIN || x > KVR_WIRE_LEVEL_MAX || x == 0 ||
            *n == MAX_LEVELS)
            return KVR_EINVAL;
        lv[(*n)++] = (int)x;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return KVR_EINVAL;
    }
    return *n ? KVR_OK : KVR_EINVAL;
}

/* Reads the first part of path and encodes it (BOS first) until it gives n tokens. */
static int prompt_tokens(const struct kvr_tokenizer *tok, const char *path, int n, int *out) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return KVR_ENOENT;
    size_t want = (size_t)n * 8, got = 0;
    char *text = NULL;
    int rc = KVR_ENOMEM, *tmp = NULL;
    for (;;) {
        char *t = realloc(text, want + 1);
        if (!t)
            goto out;
        text = t;
        got += fread(text + got, 1, want - got, f);
        text[got] = '\0';
        int cnt = 0;
        free(tmp);
        if (!(tmp = malloc((got + 3) * sizeof *tmp)))
            goto out;
        if ((rc = kvr_tokenizer_encode(tok, text, 1, 0, tmp, (int)got + 3, &cnt)) != KVR_OK)
            goto out;
        if (cnt >= n) {
            memcpy(out, tmp, (size_t)n * sizeof *out);
            rc = KVR_OK;
            goto out;
        }
        if (got < want) { /* the whole file is too short */
            rc = KVR_ERANGE;
            goto out;
        }
        want *= 2;
    }
out:
    free(text);
    free(tmp);
    fclose(f);
    return rc;
}

static double loadavg1(void) {
    double x = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &x) != 1)
            x = -1;
        fclose(f);
    }
    return x;
}

static void print_table(const struct kw *w, const char *model) {
    printf("kvwire: %s, %d tokens (%d messages of <= %d tokens x 1 layer), raw f32 K+V %.2f MB\n",
           model, w->cfg.tokens, w->n_msgs, w->cfg.block_tokens, (double)w->raw_nbytes * 1e-6);
    printf("prefill of the same tokens: %.3f s wall (best of 2) on %d threads, %.3f CPU s; load "
           "average %.2f\n"
           "codec: MB/s of raw f32 per CPU second of one thread; %%pf_wall, %%pf_cpu = encode + "
           "decode CPU s over prefill wall s, over prefill CPU s\n",
           w->prefill_s, w->prefill_threads, w->prefill_cpu_s, w->loadavg);
    printf("%-5s %-28s %5s %7s %7s %9s %9s %7s %9s %8s %7s\n", "type", "transform", "level",
           "ratio", "%raw", "comp_MB/s", "dec_MB/s", "stored", "max_rel", "%pf_wall", "%pf_cpu");
    for (int i = 0; i < w->n_rows; i++) {
        const struct kw_row *r = &w->rows[i];
        char dec[16] = "-", rel[16] = "-", pct[16] = "-", pcpu[16] = "-", stored[16] = "-";
        if (r->decompress_mbs >= 0) {
            snprintf(dec, sizeof dec, "%.0f", r->decompress_mbs);
            snprintf(rel, sizeof rel, "%.2e", r->max_rel_err);
            snprintf(pct, sizeof pct, "%.1f", 100.0 * r->codec_s / w->prefill_s);
            snprintf(pcpu, sizeof pcpu, "%.1f", 100.0 * r->codec_s / w->prefill_cpu_s);
            snprintf(stored, sizeof stored, "%d", r->n_stored_raw);
        }
        printf("%-5s %-28s %5d %7.4f %6.1f%% %9.0f %9s %7s %9s %8s %7s\n", r->value_type,
               r->transform, r->level, r->ratio, 100.0 / r->ratio, r->compress_mbs, dec, stored,
               rel, pct, pcpu);
    }
}

static void print_json(const struct kw *w, const char *model) {
    printf("[");
    for (int i = 0; i < w->n_rows; i++) {
        const struct kw_row *r = &w->rows[i];
        printf(
            "%s\n  {\"value_type\": \"%s\", \"transform\": \"%s\", \"level\": %d, \"ratio\": %.4f, "
            "\"compress_mbs\": %.1f, ",
            i ? "," : "", r->value_type, r->transform, r->level, r->ratio, r->compress_mbs);
        if (r->decompress_mbs >= 0)
            printf("\"decompress_mbs\": %.1f, \"bit_mismatches\": %llu, \"max_abs_err\": %.3g, "
                   "\"max_rel_err\": %.3g, \"stored_raw_msgs\": %d, "
                   "\"codec_pct_of_prefill\": %.2f, \"codec_pct_of_prefill_cpu\": %.2f, ",
                   r->decompress_mbs, (unsigned long long)r->n_bits_differ, r->max_abs_err,
                   r->max_rel_err, r->n_stored_raw,
                   100.0 * r->codec_s / w->prefill_s, 100.0 * r->codec_s / w->prefill_cpu_s);
        else
            printf("\"decompress_mbs\": null, ");
        printf("\"wire_nbytes\": %llu, \"raw_f32_nbytes\": %llu, \"msgs\": %d, \"tokens\": %d, "
               "\"block_tokens\": %d, "
               "\"prefill_s\": %.4f, \"prefill_cpu_s\": %.4f, \"prefill_threads\": %d, "
               "\"loadavg\": %.2f, \"model\": ",
               (unsigned long long)r->wire_nbytes, (unsigned long long)w->raw_nbytes, w->n_msgs,
               w->cfg.tokens, w->cfg.block_tokens, w->prefill_s, w->prefill_cpu_s,
               w->prefill_threads, w->loadavg);
        kvr_json_write_string(stdout, model);
        printf("}");
    }
    printf("\n]\n");
}

int kvr_bench_kvwire(int argc, char **argv) {
    struct kw w;
    memset(&w, 0, sizeof w);
    int done;
    int ex = kvr_cli_parse("bench kvwire",
                           "KV wire codec on a real cache: ratio vs raw f32 and MB/s per value "
                           "type, transform, level.",
                           kw_opts, (int)(sizeof kw_opts / sizeof kw_opts[0]), &w.cfg, argc, argv,
                           &done);
    if (done)
        return ex;
    int levels[MAX_LEVELS], n_levels = 0;
    if (parse_levels(w.cfg.levels, levels, &n_levels) != KVR_OK) {
        fprintf(stderr,
                "kvrelay bench kvwire: --levels wants up to %d comma-separated non-zero levels in "
                "[%d, %d]\n",
                MAX_LEVELS, KVR_WIRE_LEVEL_MIN, KVR_WIRE_LEVEL_MAX);
        return KVR_EXIT_USAGE;
    }
    struct kvr_model *model = NULL;
    struct kvr_tokenizer *tok = NULL;
    struct kvr_kv_pool *pool = NULL;
    struct kvr_kv_seq *seq = NULL;
    struct kvr_engine *eng = NULL;
    struct kvr_wire_codec *codec = NULL;
    ZSTD_CCtx *z = NULL;
    int *prompt = NULL;
    uint8_t *wire = NULL, *pay = NULL;
    size_t *lens = NULL;
    float *kd = NULL, *vd = NULL;
    uint32_t *e = NULL, *e2 = NULL;
    ex = KVR_EXIT_RUNTIME;
    int rc;

    struct kvr_model_params mp = {.n_ctx = w.cfg.context};
    if ((rc = kvr_model_load_params(w.cfg.model, &mp, &model)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvwire: cannot load model '%s': %s\n", w.cfg.model,
                kvr_status_str(rc));
        goto out;
    }
    const struct kvr_model_config *c = w.c = kvr_model_config(model);
    if ((rc = kvr_model_load_tokenizer(model, w.cfg.tokenizer, &tok)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvwire: cannot load the tokenizer of '%s': %s\n",
                w.cfg.tokenizer ? w.cfg.tokenizer : w.cfg.model, kvr_status_str(rc));
        goto out;
    }
    if (w.cfg.tokens > c->seq_len) {
        fprintf(stderr, "kvrelay bench kvwire: --tokens %d exceeds the model's context of %d\n",
                w.cfg.tokens, c->seq_len);
        ex = KVR_EXIT_USAGE;
        goto out;
    }
    int n = w.cfg.tokens, bt = w.cfg.block_tokens;
    if (!(prompt = malloc((size_t)n * sizeof *prompt)))
        goto out;
    if ((rc = prompt_tokens(tok, w.cfg.text, n, prompt)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvwire: cannot get %d tokens from '%s': %s\n", n, w.cfg.text,
                kvr_status_str(rc));
        goto out;
    }

    /* Prefill: one warm-up (faults the weights in), then the best of two timed runs. */
    struct kvr_kv_pool_params pp = {.n_layers = c->n_layers,
                                    .kv_dim = c->kv_dim,
                                    .block_tokens = bt,
                                    .budget_nbytes = (uint64_t)((n + bt - 1) / bt + 1) *
                                                     (uint64_t)bt *
                                                     kvr_kv_token_nbytes(c->n_layers, c->kv_dim)};
    struct kvr_kv_seq_params sp = {.policy = {.policy = KVR_KV_DENSE}, .n_tokens_max = n};
    struct kvr_engine_params ep = {.model = model,
                                   .n_threads = w.cfg.threads,
                                   .n_batch_tokens_max = n,
                                   .n_items_max = 1,
                                   .n_ctx_max = n};
    if ((rc = kvr_kv_pool_create(&pp, &pool)) != KVR_OK ||
        (rc = kvr_kv_seq_create(pool, &sp, &seq)) != KVR_OK ||
        (rc = kvr_engine_create(&ep, &eng)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvwire: cannot set up the engine: %s\n", kvr_status_str(rc));
        goto out;
    }
    w.prefill_threads = kvr_engine_params(eng)->n_threads;
    if (w.prefill_threads <= 0)
        w.prefill_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    w.loadavg = loadavg1();
    w.prefill_s = 1e30;
    for (int run = 0; run < 3; run++) {
        kvr_kv_seq_reset(seq);
        struct kvr_forward_item it = {.seq = seq, .tokens = prompt, .n_tokens = n};
        double t0 = kvr_clock_now(), c0 = process_cpu();
        if ((rc = kvr_engine_forward(eng, &it, 1)) != KVR_OK) {
            fprintf(stderr, "kvrelay bench kvwire: prefill failed: %s\n", kvr_status_str(rc));
            goto out;
        }
        double t = kvr_clock_now() - t0, tc = process_cpu() - c0;
        if (run > 0 && t < w.prefill_s) {
            w.prefill_s = t;
            w.prefill_cpu_s = tc;
        }
    }

    /* The messages: one per (block, layer), as the prefill node cuts them. */
    w.n_msgs = ((n + bt - 1) / bt) * c->n_layers;
    if (!(w.msgs = calloc((size_t)w.n_msgs, sizeof *w.msgs)))
        goto out;
    int mi = 0;
    for (int t0 = 0; t0 < n; t0 += bt)
        for (int l = 0; l < c->n_layers; l++) {
            float *k, *v;
            if (kvr_kv_seq_slot(seq, l, t0, &k, &v) != KVR_OK)
                goto out;
            w.msgs[mi++] = (struct kw_msg){.k = k,
                                           .v = v,
                                           .layer = l,
                                           .token_begin = t0,
                                           .n_tokens = n - t0 < bt ? n - t0 : bt};
        }
    w.raw_nbytes = (uint64_t)n * kvr_kv_token_nbytes(c->n_layers, c->kv_dim);

    size_t max_floats = (size_t)bt * (size_t)c->kv_dim;
    struct kvr_wire_block shape = {
        .n_layers = 1, .n_tokens = bt, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim};
    size_t cap_one = kvr_wire_max_nbytes(&shape);
    if (!cap_one || (rc = kvr_wire_codec_create(max_floats, &codec)) != KVR_OK) {
        fprintf(stderr, "kvrelay bench kvwire: block of %zu floats too large for the wire format\n",
                max_floats);
        goto out;
    }
    wire = malloc((size_t)w.n_msgs * cap_one);
    lens = calloc((size_t)w.n_msgs, sizeof *lens);
    kd = malloc(max_floats * sizeof *kd);
    vd = malloc(max_floats * sizeof *vd);
    if (!wire || !lens || !kd || !vd)
        goto out;
    static const int dtypes[] = {KVR_WIRE_F32, KVR_WIRE_F16, KVR_WIRE_BF16};
    for (int di = 0; di < 3; di++)
        for (int tf = 0; tf < 2; tf++)
            for (int li = 0; li < n_levels; li++) {
                struct kw_row *r = new_row(&w);
                if (!r)
                    goto out;
                r->value_type = kvr_wire_dtype_name(dtypes[di]);
                snprintf(r->transform, sizeof r->transform, "%s", kvr_wire_transform_name(tf));
                r->level = levels[li];
                if ((rc = run_codec(&w, codec, wire, cap_one, lens, kd, vd, dtypes[di], tf,
                                    levels[li], r)) != KVR_OK) {
                    fprintf(stderr, "kvrelay bench kvwire: codec failed: %s\n", kvr_status_str(rc));
                    goto out;
                }
            }
    if (w.cfg.explore) {
        size_t nv = 2 * max_floats;
        size_t dst_cap = ZSTD_compressBound(nv * 4);
        z = ZSTD_createCCtx();
        pay = malloc(nv * 4 + dst_cap);
        e = malloc(nv * sizeof *e);
        e2 = malloc(nv * sizeof *e2);
        if (!z || !pay || !e || !e2)
            goto out;
        static const int ex_dtypes[] = {KVR_WIRE_F32, KVR_WIRE_BF16};
        for (int di = 0; di < 2; di++)
            for (int x = 0; x < EX_N; x++)
                for (int li = 0; li < n_levels; li++) {
                    struct kw_row *r = new_row(&w);
                    if (!r)
                        goto out;
                    r->value_type = kvr_wire_dtype_name(ex_dtypes[di]);
                    snprintf(r->transform, sizeof r->transform, "%s", ex_names[x]);
                    r->level = levels[li];
                    if (run_explore(&w, z, pay, pay + nv * 4, dst_cap, e, e2, ex_dtypes[di], x,
                                    levels[li], r) != KVR_OK)
                        goto out;
                }
    }
    if (w.cfg.json)
        print_json(&w, w.cfg.model);
    else
        print_table(&w, w.cfg.model);
    ex = KVR_EXIT_OK;
out:
    ZSTD_freeCCtx(z);
    free(pay);
    free(e);
    free(e2);
    free(wire);
    free(lens);
    free(kd);
    free(vd);
    free(w.msgs);
    free(w.rows);
    free(prompt);
    kvr_wire_codec_free(codec);
    kvr_engine_free(eng);
    kvr_kv_seq_free(seq);
    kvr_kv_pool_free(pool);
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
    return ex;
}
