/* model.c - loads llama2.c checkpoints by mmap and validates them against their header;
 * writes synthetic checkpoints for benchmarks. Owns the mapping; every role calls it. */
/* MADV_HUGEPAGE is a Linux extension beyond POSIX. */
#define _DEFAULT_SOURCE
#include "model.h"

#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "status.h"

#define HEADER_NBYTES (7 * sizeof(int32_t))

struct kvr_model {
    struct kvr_model_config config;
    struct kvr_model_weights w;
    void *map;          /* whole file, PROT_READ (mmap mode) */
    size_t map_nbytes;
    void *copy;         /* weights after the header, 2 MiB aligned (copy mode) */
    size_t copy_nbytes;
    int32_t header[7];
    uint64_t fingerprint;
    int have_fingerprint;
};

/* Tensor sizes in floats, in file order; the two RoPE tables of old checkpoints
 * (seq_len * head_dim / 2 each) are skipped, as llama2.c does. */
static uint64_t weights_nfloats(const struct kvr_model_config *c, uint64_t *cls_nfloats) {
    uint64_t d = (uint64_t)c->dim, h = (uint64_t)c->hidden_dim, L = (uint64_t)c->n_layers;
    uint64_t kv = (uint64_t)c->n_kv_heads * (uint64_t)(c->dim / c->n_heads);
    uint64_t v = (uint64_t)c->vocab_size;
    uint64_t n = v * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d + 3 * L * h * d + d;
    n += (uint64_t)c->seq_len * (uint64_t)(c->dim / c->n_heads); /* freq_cis_real + imag */
    *cls_nfloats = c->shared_classifier ? 0 : v * d;
    return n + *cls_nfloats;
}

uint64_t kvr_model_expected_nbytes(const struct kvr_model_config *c, const char **why) {
    const char *dummy;
    if (!why)
        why = &dummy;
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->vocab_size <= 0 || c->seq_len <= 0) {
        *why = "a dimension is zero or negative";
        return 0;
    }
    if (c->dim % c->n_heads) {
        *why = "dim is not divisible by n_heads";
        return 0;
    }
    if (c->n_heads % c->n_kv_heads) {
        *why = "n_heads is not divisible by n_kv_heads";
        return 0;
    }
    if ((c->dim / c->n_heads) % 2) {
        *why = "head_dim is odd (RoPE rotates pairs)";
        return 0;
    }
    if (c->dim > (1 << 16) || c->hidden_dim > (1 << 18) || c->n_layers > 4096 ||
        c->vocab_size > (1 << 22) || c->seq_len > (1 << 22)) {
        *why = "a dimension is implausibly large";
        return 0;
    }
    uint64_t cls;
    return HEADER_NBYTES + weights_nfloats(c, &cls) * sizeof(float);
}

static void fill_derived(struct kvr_model_config *c) {
    c->head_dim = c->dim / c->n_heads;
    c->kv_dim = c->n_kv_heads * c->head_dim;
}

int kvr_model_load(const char *path, struct kvr_model **out) {
    return kvr_model_load_mode(path, KVR_WEIGHTS_MMAP, out);
}

/* Copies the weights (the file after its header) into anonymous memory aligned to
 * 2 MiB and backed by transparent huge pages where the kernel allows: decode streams
 * every weight each step, and in 4 KiB page-cache pages it pays a TLB miss and a
 * prefetcher restart every 4 KiB, on rows that start 28 bytes off alignment. */
static int copy_weights(struct kvr_model *m, int fd, const char *path) {
    size_t n = m->map_nbytes - HEADER_NBYTES;
    size_t huge = (size_t)2 << 20;
    size_t len = (n + huge - 1) / huge * huge;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        KVR_LOG_ERROR("cannot allocate %zu bytes for the weights of '%s': %s", len, path, strerror(errno));
        return KVR_ENOMEM;
    }
#ifdef MADV_HUGEPAGE
    madvise(p, len, MADV_HUGEPAGE);
#endif
    size_t done = 0;
    while (done < n) {
        ssize_t k = pread(fd, (char *)p + done, n - done > ((size_t)1 << 30) ? (size_t)1 << 30 : n - done,
                          (off_t)(HEADER_NBYTES + done));
        if (k <= 0) {
            KVR_LOG_ERROR("cannot read the weights of '%s': %s", path, k < 0 ? strerror(errno) : "short file");
            munmap(p, len);
            return KVR_EIO;
        }
        done += (size_t)k;
    }
    mprotect(p, len, PROT_READ);
    m->copy = p;
    m->copy_nbytes = len;
    return KVR_OK;
}

int kvr_model_load_mode(const char *path, enum kvr_weights_mode mode, struct kvr_model **out) {
    int rc = KVR_EIO;
    int fd = -1;
    struct kvr_model *m = NULL;
    *out = NULL;
    if (!path || !*path) {
        KVR_LOG_ERROR("no model path given");
        return KVR_EINVAL;
    }
    fd = open(path, O_RDONLY);
    if (fd < 0) {
        KVR_LOG_ERROR("cannot open model '%s': %s", path, strerror(errno));
        return errno == ENOENT ? KVR_ENOENT : KVR_EIO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        KVR_LOG_ERROR("cannot stat model '%s': %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        KVR_LOG_ERROR("model '%s' is not a regular file", path);
        rc = KVR_EFORMAT;
        goto out;
    }
    size_t fsize = (size_t)st.st_size;
    if (fsize < HEADER_NBYTES) {
        KVR_LOG_ERROR("model '%s' is %zu bytes, shorter than the 28-byte header", path, fsize);
        rc = KVR_ETRUNC;
        goto out;
    }
    int32_t hdr[7];
    if (pread(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr) {
        KVR_LOG_ERROR("cannot read header of '%s': %s", path, strerror(errno));
        goto out;
    }
    m = calloc(1, sizeof *m);
    if (!m) {
        rc = KVR_ENOMEM;
        goto out;
    }
    struct kvr_model_config *c = &m->config;
    c->dim = hdr[0];
    c->hidden_dim = hdr[1];
    c->n_layers = hdr[2];
    c->n_heads = hdr[3];
    c->n_kv_heads = hdr[4];
    c->shared_classifier = hdr[5] > 0;
    c->vocab_size = hdr[5] == INT32_MIN ? 0 : abs(hdr[5]);
    c->seq_len = hdr[6];
    const char *why = NULL;
    uint64_t want = kvr_model_expected_nbytes(c, &why);
    if (!want) {
        KVR_LOG_ERROR("model '%s' has a bad header (dim=%d hidden=%d layers=%d heads=%d kv_heads=%d "
                      "vocab=%d seq_len=%d): %s",
                      path, hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], why);
        rc = KVR_EFORMAT;
        goto out;
    }
    if ((uint64_t)fsize != want) {
        KVR_LOG_ERROR("model '%s' is %zu bytes but its header (dim=%d hidden=%d layers=%d heads=%d "
                      "kv_heads=%d vocab=%d seq_len=%d) needs %llu bytes: %s",
                      path, fsize, hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6],
                      (unsigned long long)want,
                      (uint64_t)fsize < want ? "truncated file" : "trailing bytes, not this format");
        rc = (uint64_t)fsize < want ? KVR_ETRUNC : KVR_EFORMAT;
        goto out;
    }
    fill_derived(c);
    memcpy(m->header, hdr, sizeof hdr);
    m->map_nbytes = fsize;
    const float *p;
    if (mode == KVR_WEIGHTS_COPY) {
        if ((rc = copy_weights(m, fd, path)) != KVR_OK)
            goto out;
        p = (const float *)m->copy;
    } else {
        m->map = mmap(NULL, fsize, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m->map == MAP_FAILED) {
            m->map = NULL;
            KVR_LOG_ERROR("cannot mmap model '%s': %s", path, strerror(errno));
            goto out;
        }
        /* Decode streams every weight each step: ask for read-ahead. */
        posix_madvise(m->map, fsize, POSIX_MADV_WILLNEED);
        p = (const float *)((const char *)m->map + HEADER_NBYTES);
    }
    uint64_t d = (uint64_t)c->dim, h = (uint64_t)c->hidden_dim, L = (uint64_t)c->n_layers;
    uint64_t kv = (uint64_t)c->kv_dim;
    struct kvr_model_weights *w = &m->w;
    w->token_embedding = p;  p += (uint64_t)c->vocab_size * d;
    w->rms_att = p;          p += L * d;
    w->wq = p;               p += L * d * d;
    w->wk = p;               p += L * kv * d;
    w->wv = p;               p += L * kv * d;
    w->wo = p;               p += L * d * d;
    w->rms_ffn = p;          p += L * d;
    w->w1 = p;               p += L * h * d;
    w->w2 = p;               p += L * d * h;
    w->w3 = p;               p += L * h * d;
    w->rms_final = p;        p += d;
    p += (uint64_t)c->seq_len * (uint64_t)c->head_dim; /* skip legacy RoPE tables */
    w->wcls = c->shared_classifier ? w->token_embedding : p;
    *out = m;
    m = NULL;
    rc = KVR_OK;
out:
    if (fd >= 0)
        close(fd);
    kvr_model_free(m);
    return rc;
}

void kvr_model_free(struct kvr_model *m) {
    if (!m)
        return;
    if (m->map)
        munmap(m->map, m->map_nbytes);
    if (m->copy)
        munmap(m->copy, m->copy_nbytes);
    free(m);
}

const struct kvr_model_config *kvr_model_config(const struct kvr_model *m) { return &m->config; }

const struct kvr_model_weights *kvr_model_weights(const struct kvr_model *m) { return &m->w; }

uint64_t kvr_model_n_params(const struct kvr_model *m) {
    uint64_t cls;
    uint64_t n = weights_nfloats(&m->config, &cls);
    return n - (uint64_t)m->config.seq_len * (uint64_t)m->config.head_dim;
}

uint64_t kvr_model_step_nbytes(const struct kvr_model *m) {
    const struct kvr_model_config *c = &m->config;
    uint64_t d = (uint64_t)c->dim, h = (uint64_t)c->hidden_dim, L = (uint64_t)c->n_layers;
    uint64_t per_layer = 2 * d + 2 * d * d + 2 * (uint64_t)c->kv_dim * d + 3 * h * d;
    return (L * per_layer + d + (uint64_t)c->vocab_size * d) * sizeof(float);
}

/* A simple 4-lane multiply-rotate hash: fast enough to fingerprint gigabytes of weights
 * at startup (memory-bound), not cryptographic. */
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

uint64_t kvr_hash64(const void *data, size_t len, uint64_t seed) {
    const uint64_t P1 = 0x9E3779B185EBCA87ull, P2 = 0xC2B2AE3D27D4EB4Full;
    const unsigned char *b = data;
    uint64_t h[4] = {seed + P1, seed ^ P2, seed + 0x165667B19E3779F9ull, seed - P1};
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
        for (int l = 0; l < 4; l++) {
            uint64_t w;
            memcpy(&w, b + i + 8 * (size_t)l, 8);
            h[l] = rotl64(h[l] + w * P2, 31) * P1;
        }
    }
    uint64_t acc = rotl64(h[0], 1) + rotl64(h[1], 7) + rotl64(h[2], 12) + rotl64(h[3], 18);
    for (; i < len; i++)
        acc = rotl64(acc ^ (b[i] * P1), 11) * P2;
    acc ^= (uint64_t)len;
    acc ^= acc >> 33;
    acc *= P2;
    acc ^= acc >> 29;
    acc *= 0x165667B19E3779F9ull;
    acc ^= acc >> 32;
    return acc;
}

uint64_t kvr_model_fingerprint(struct kvr_model *m) {
    if (!m->have_fingerprint) {
        /* Header, then the weights: the same value whichever way they were loaded. */
        uint64_t h = kvr_hash64(m->header, sizeof m->header, 0x6b7672656c6179ull /* "kvrelay" */);
        const void *w = m->copy ? m->copy : (const char *)m->map + HEADER_NBYTES;
        m->fingerprint = kvr_hash64(w, m->map_nbytes - HEADER_NBYTES, h);
        m->have_fingerprint = 1;
    }
    return m->fingerprint;
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Writes n floats: constant `value` if random == 0, else uniform in [-a, a]. */
static int write_tensor(FILE *f, uint64_t n, int random, float a, float value, uint64_t *rng) {
    float buf[4096];
    while (n) {
        size_t k = n < 4096 ? (size_t)n : 4096;
        for (size_t i = 0; i < k; i++) {
            if (random) {
                float u = (float)(splitmix64(rng) >> 40) * (1.0f / 16777216.0f);
                buf[i] = (2.0f * u - 1.0f) * a;
            } else {
                buf[i] = value;
            }
        }
        if (fwrite(buf, sizeof(float), k, f) != k)
            return KVR_EIO;
        n -= k;
    }
    return KVR_OK;
}

int kvr_model_write_synthetic(const char *path, const struct kvr_model_config *cin, uint64_t seed) {
    struct kvr_model_config c = *cin;
    const char *why = NULL;
    if (!kvr_model_expected_nbytes(&c, &why)) {
        KVR_LOG_ERROR("bad synthetic shape: %s", why);
        return KVR_EINVAL;
    }
    fill_derived(&c);
    FILE *f = fopen(path, "wb");
    if (!f) {
        KVR_LOG_ERROR("cannot create '%s': %s", path, strerror(errno));
        return KVR_EIO;
    }
    int32_t hdr[7] = {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                      c.shared_classifier ? c.vocab_size : -c.vocab_size, c.seq_len};
    uint64_t rng = seed;
    uint64_t d = (uint64_t)c.dim, h = (uint64_t)c.hidden_dim, L = (uint64_t)c.n_layers;
    uint64_t kv = (uint64_t)c.kv_dim, v = (uint64_t)c.vocab_size;
    /* Uniform in [-a, a] has std a/sqrt(3); scale by fan-in so activations stay O(1). */
    float a_d = 1.7320508f / sqrtf((float)c.dim), a_h = 1.7320508f / sqrtf((float)c.hidden_dim);
    int rc = fwrite(hdr, sizeof hdr, 1, f) == 1 ? KVR_OK : KVR_EIO;
    struct {
        uint64_t n;
        int random;
        float a, value;
    } t[] = {
        {v * d, 1, 1.0f, 0},           /* token_embedding */
        {L * d, 0, 0, 1.0f},           /* rms_att */
        {L * d * d, 1, a_d, 0},        /* wq */
        {L * kv * d, 1, a_d, 0},       /* wk */
        {L * kv * d, 1, a_d, 0},       /* wv */
        {L * d * d, 1, a_d, 0},        /* wo */
        {L * d, 0, 0, 1.0f},           /* rms_ffn */
        {L * h * d, 1, a_d, 0},        /* w1 */
        {L * d * h, 1, a_h, 0},        /* w2 */
        {L * h * d, 1, a_d, 0},        /* w3 */
        {d, 0, 0, 1.0f},               /* rms_final */
        {(uint64_t)c.seq_len * (uint64_t)c.head_dim, 0, 0, 0}, /* legacy RoPE tables */
        {c.shared_classifier ? 0 : v * d, 1, a_d, 0},         /* wcls */
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0] && rc == KVR_OK; i++)
        rc = write_tensor(f, t[i].n, t[i].random, t[i].a, t[i].value, &rng);
    if (fclose(f) != 0 && rc == KVR_OK)
        rc = KVR_EIO;
    if (rc != KVR_OK) {
        KVR_LOG_ERROR("cannot write '%s': %s", path, strerror(errno));
        unlink(path);
    }
    return rc;
}
