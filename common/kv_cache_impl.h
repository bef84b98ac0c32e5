/* kv_cache_impl.h - sequence internals shared by kv_cache.c and transformer.c only
 * (the forward pass reads and writes slots on the hot path without calls). */
#ifndef KVR_KV_CACHE_IMPL_H
#define KVR_KV_CACHE_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "half.h"
#include "kernels.h"
#include "kv_cache.h"

struct kvr_kv_pool {
    int n_layers;
    int kv_dim;
    int block_tokens;
    int n_blocks;
    int n_free;
    int n_seqs;
    enum kvr_kv_type type;  /* element type of mem */
    size_t elt;             /* bytes per element: 4 (f32) or 2 (f16, bf16) */
    size_t block_nelts;     /* n_layers * 2 * block_tokens * kv_dim */
    char *mem;              /* (n_blocks, n_layers, 2, block_tokens, kv_dim) of type */
    size_t mem_nbytes;      /* of the mapping at mem (whole 2 MiB units) */
    int *free_stack;        /* (n_blocks) free block ids, top at n_free - 1 */
};

struct kvr_kv_seq {
    struct kvr_kv_pool *pool;
    struct kvr_kv_policy_params policy;
    int n_tokens_max;
    int n_past;        /* tokens written: text positions 0..n_past-1 */
    int n_reserved;    /* positions < n_reserved have a block */
    int n_sink_blocks; /* logical blocks 0..n_sink_blocks-1 are never evicted (sink) */
    int lb_begin;      /* first non-sink logical block still held */
    int lb_end;        /* one past the last logical block held */
    int *sink_blk;     /* (n_sink_blocks) physical ids, -1 until allocated */
    int *tab;          /* physical id of logical block lb at tab[lb - tab_base] */
    int tab_base;
    int tab_cap;
    int n_held;
};

/* Physical block of logical block lb (must be held). */
static inline int kv_phys(const struct kvr_kv_seq *s, int lb) {
    return lb < s->n_sink_blocks ? s->sink_blk[lb] : s->tab[lb - s->tab_base];
}

/* K (or V when kv = 1) slot of a held text position pos in layer: kv_dim elements of
 * the pool's type. */
static inline void *kv_ptr(const struct kvr_kv_seq *s, int layer, int pos, int kv) {
    const struct kvr_kv_pool *p = s->pool;
    int bt = p->block_tokens;
    size_t blk = (size_t)kv_phys(s, pos / bt);
    return p->mem + (blk * p->block_nelts +
                     ((size_t)(layer * 2 + kv) * (size_t)bt + (size_t)(pos % bt)) * (size_t)p->kv_dim) *
                        p->elt;
}

/* The same slot as f32 (f32 pools only). */
static inline float *kv_ptr_f32(const struct kvr_kv_seq *s, int layer, int pos, int kv) {
    return (float *)kv_ptr(s, layer, pos, kv);
}

/* First non-sink text position visible to the query at text position p. */
static inline int kv_recent_begin(const struct kvr_kv_seq *s, int p) {
    int L = s->policy.window;
    switch (s->policy.policy) {
    case KVR_KV_WINDOW:
        return p - L + 1 > 0 ? p - L + 1 : 0;
    case KVR_KV_SINK:
        return p < L ? 0 : p - (L - s->policy.sinks) + 1;
    default:
        return 0;
    }
}

/* Sink tokens visible to the query at p apart from the recent range (0 until the
 * window is full, when the recent range starts at 0 and covers them). */
static inline int kv_sinks_visible(const struct kvr_kv_seq *s, int p) {
    return s->policy.policy == KVR_KV_SINK && p >= s->policy.window ? s->policy.sinks : 0;
}

/* Offset between text and cache positions of the recent tokens for the query at p
 * (sink policy): a recent key at text t sits at cache position t - delta. */
static inline int kv_sink_delta(const struct kvr_kv_seq *s, int p) {
    int d = p - s->policy.window + 1;
    return d > 0 ? d : 0;
}

/* n f32 values into a slot of type t: copied, or rounded to nearest even (half.h; a few
 * thousand values per token and layer, not worth a vector kernel). */
static inline void kv_values_from_f32(enum kvr_kv_type t, void *dst, const float *src, size_t n) {
    uint16_t *h = dst;
    if (t == KVR_KV_F32)
        memcpy(dst, src, n * sizeof(float));
    else if (t == KVR_KV_F16)
        for (size_t i = 0; i < n; i++)
            h[i] = kvr_f32_to_f16(src[i]);
    else
        for (size_t i = 0; i < n; i++)
            h[i] = kvr_f32_to_bf16(src[i]);
}

/* n values of a slot of type t as f32 (exact; the run-time chosen widening kernel). */
static inline void kv_values_to_f32(enum kvr_kv_type t, float *dst, const void *src, size_t n) {
    if (t == KVR_KV_F32)
        memcpy(dst, src, n * sizeof(float));
    else
        kvr_kernels()->half_to_f32(t == KVR_KV_F16 ? KVR_DTYPE_F16 : KVR_DTYPE_BF16, dst, src, (int)n);
}

#endif /* KVR_KV_CACHE_IMPL_H */
