/* kv_cache.c - block pool, per-sequence block tables, policy eviction (kv_cache.h).
 * Owns all block memory of a node; the forward pass reads slots through
 * kv_cache_impl.h, the decode node's scheduler and the prefill node own sequences. */
#include "kv_cache_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "hugemem.h"
#include "log.h"
#include "status.h"

const char *kvr_kv_policy_name(int policy) {
    switch (policy) {
    case KVR_KV_DENSE:
        return "dense";
    case KVR_KV_WINDOW:
        return "window";
    case KVR_KV_RECOMPUTE:
        return "recompute";
    case KVR_KV_SINK:
        return "sink";
    }
    return "?";
}

int kvr_kv_policy_check(const struct kvr_kv_policy_params *p, int n_ctx, char *err, int err_len) {
    char dummy[256];
    if (!err) {
        err = dummy;
        err_len = (int)sizeof dummy;
    }
    err[0] = '\0';
    switch (p->policy) {
    case KVR_KV_DENSE:
        return KVR_OK;
    case KVR_KV_WINDOW:
    case KVR_KV_RECOMPUTE:
        if (p->window < 1) {
            snprintf(err, (size_t)err_len, "kv policy %s needs a window of at least 1 token (got %d)",
                     kvr_kv_policy_name(p->policy), p->window);
            return KVR_EINVAL;
        }
        if (p->policy == KVR_KV_RECOMPUTE && p->window > n_ctx) {
            snprintf(err, (size_t)err_len, "kv policy recompute: window %d exceeds the model context %d",
                     p->window, n_ctx);
            return KVR_EINVAL;
        }
        return KVR_OK;
    case KVR_KV_SINK:
        if (p->sinks < 0 || p->window < p->sinks + 1) {
            snprintf(err, (size_t)err_len,
                     "kv policy sink needs 0 <= sinks < window (got sinks %d, window %d)", p->sinks,
                     p->window);
            return KVR_EINVAL;
        }
        if (p->window > n_ctx) {
            snprintf(err, (size_t)err_len, "kv policy sink: window %d exceeds the model context %d",
                     p->window, n_ctx);
            return KVR_EINVAL;
        }
        return KVR_OK;
    }
    snprintf(err, (size_t)err_len, "unknown kv policy %d", (int)p->policy);
    return KVR_EINVAL;
}

int kvr_kv_policy_first_held(const struct kvr_kv_policy_params *p, int n_past, int *n_sinks) {
    struct kvr_kv_seq tmp = {.policy = *p};
    int rb = kv_recent_begin(&tmp, n_past);
    int s = p->policy == KVR_KV_SINK ? p->sinks : 0;
    *n_sinks = s < rb ? s : 0;
    return rb;
}

uint64_t kvr_kv_token_nbytes(int n_layers, int kv_dim) {
    return 2ull * (uint64_t)n_layers * (uint64_t)kv_dim * sizeof(float);
}

const char *kvr_kv_type_name(int type) {
    switch (type) {
    case KVR_KV_F32:
        return "f32";
    case KVR_KV_F16:
        return "f16";
    case KVR_KV_BF16:
        return "bf16";
    }
    return "?";
}

int kvr_kv_type_nbytes(int type) {
    return type == KVR_KV_F32 ? 4 : type == KVR_KV_F16 || type == KVR_KV_BF16 ? 2 : 0;
}

int kvr_kv_type_parse(const char *s, enum kvr_kv_type *type) {
    for (int t = KVR_KV_F32; t <= KVR_KV_BF16; t++)
        if (s && strcmp(s, kvr_kv_type_name(t)) == 0) {
            *type = (enum kvr_kv_type)t;
            return KVR_OK;
        }
    return KVR_EINVAL;
}

uint64_t kvr_kv_token_nbytes_type(enum kvr_kv_type type, int n_layers, int kv_dim) {
    return 2ull * (uint64_t)n_layers * (uint64_t)kv_dim * (uint64_t)kvr_kv_type_nbytes(type);
}

/* Block memory: huge-page memory (hugemem.h). Every decode step writes each sequence's
 * new slot and reads its whole context; in 4 KiB pages a fresh position costs a page fault
 * per 4 KiB (measured on the 110M F32 model at batch 1: 0.38-0.44 ms of a 10-14 ms step
 * went to the two stores of the new slot, 0.03-0.05 ms in huge pages) and attention a TLB
 * miss per 4 KiB of context. Under AddressSanitizer the heap instead, so that an access
 * past the pool is still caught (-DKV_POOL_HEAP=1 forces it, for comparisons). */
#if defined(__SANITIZE_ADDRESS__)
#define KV_POOL_HEAP 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KV_POOL_HEAP 1
#endif
#endif
#ifndef KV_POOL_HEAP
#define KV_POOL_HEAP 0
#endif

enum kvr_kv_type kvr_kv_pool_type(const struct kvr_kv_pool *pool) { return pool->type; }

int kvr_kv_pool_create(const struct kvr_kv_pool_params *p, struct kvr_kv_pool **out) {
    *out = NULL;
    if (p->n_layers <= 0 || p->kv_dim <= 0 || p->block_tokens <= 0 || kvr_kv_type_nbytes(p->type) == 0) {
        KVR_LOG_ERROR("bad pool shape: layers=%d kv_dim=%d block_tokens=%d type=%d", p->n_layers, p->kv_dim,
                      p->block_tokens, (int)p->type);
        return KVR_EINVAL;
    }
    uint64_t block_nbytes = kvr_kv_token_nbytes_type(p->type, p->n_layers, p->kv_dim) * (uint64_t)p->block_tokens;
    uint64_t n_blocks = p->budget_nbytes / block_nbytes;
    if (n_blocks == 0 || n_blocks > (1u << 30)) {
        KVR_LOG_ERROR("KV budget of %llu bytes holds %llu blocks of %llu bytes",
                      (unsigned long long)p->budget_nbytes, (unsigned long long)n_blocks,
                      (unsigned long long)block_nbytes);
        return KVR_EINVAL;
    }
    struct kvr_kv_pool *pool = calloc(1, sizeof *pool);
    if (!pool)
        return KVR_ENOMEM;
    pool->n_layers = p->n_layers;
    pool->kv_dim = p->kv_dim;
    pool->block_tokens = p->block_tokens;
    pool->n_blocks = (int)n_blocks;
    pool->type = p->type;
    pool->elt = (size_t)kvr_kv_type_nbytes(p->type);
    pool->block_nelts = block_nbytes / pool->elt;
    size_t total = (size_t)(n_blocks * block_nbytes);
#if KV_POOL_HEAP
    pool->mem = aligned_alloc(64, (total + 63) & ~(size_t)63);
#else
    pool->mem = kvr_huge_alloc(total, &pool->mem_nbytes);
#endif
    pool->free_stack = malloc((size_t)n_blocks * sizeof *pool->free_stack);
    if (!pool->mem || !pool->free_stack) {
        KVR_LOG_ERROR("cannot allocate %llu bytes of KV blocks: %s", (unsigned long long)total,
                      pool->mem ? "out of memory" : strerror(errno));
        kvr_kv_pool_free(pool);
        return KVR_ENOMEM;
    }
    /* Blocks are handed out from the low end first (stack top holds block 0). */
    for (int i = 0; i < pool->n_blocks; i++)
        pool->free_stack[i] = pool->n_blocks - 1 - i;
    pool->n_free = pool->n_blocks;
    *out = pool;
    return KVR_OK;
}

void kvr_kv_pool_free(struct kvr_kv_pool *pool) {
    if (!pool)
        return;
    KVR_ASSERT(pool->n_seqs == 0);
#if KV_POOL_HEAP
    free(pool->mem);
#else
    kvr_huge_free(pool->mem, pool->mem_nbytes);
#endif
    free(pool->free_stack);
    free(pool);
}

void kvr_kv_pool_stats(const struct kvr_kv_pool *pool, struct kvr_kv_pool_stats *st) {
    uint64_t bn = pool->block_nelts * pool->elt;
    st->n_blocks = pool->n_blocks;
    st->n_blocks_free = pool->n_free;
    st->n_seqs = pool->n_seqs;
    st->block_tokens = pool->block_tokens;
    st->block_nbytes = bn;
    st->token_nbytes = kvr_kv_token_nbytes_type(pool->type, pool->n_layers, pool->kv_dim);
    st->type = pool->type;
    st->bytes_total = bn * (uint64_t)pool->n_blocks;
    st->bytes_free = bn * (uint64_t)pool->n_free;
    st->bytes_used = st->bytes_total - st->bytes_free;
}

static int ceil_div(int a, int b) { return (int)(((int64_t)a + b - 1) / b); }

static int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Most blocks that n consecutive tokens can touch, whatever their alignment. */
static int64_t span_blocks(int64_t n, int64_t bt) { return n <= 0 ? 0 : (n + bt - 2) / bt + 1; }

int kvr_kv_blocks_needed(const struct kvr_kv_policy_params *p, int bt, int n_total, int chunk_max) {
    /* 64-bit throughout: window, sinks, n_total and chunk_max come from requests and may
     * be anything up to INT_MAX; the answer never exceeds ceil(n_total / bt). */
    if (n_total <= 0 || bt <= 0)
        return 0;
    if (chunk_max < 1)
        chunk_max = 1;
    int64_t all = ceil_div64(n_total, bt);
    int64_t need = all;
    int64_t L = p->window > 0 ? p->window : 1, S = p->sinks > 0 ? p->sinks : 0;
    switch (p->policy) {
    case KVR_KV_DENSE:
        break;
    case KVR_KV_RECOMPUTE:
        need = ceil_div64(L < n_total ? L : n_total, bt);
        break;
    case KVR_KV_WINDOW:
        need = span_blocks(L + chunk_max - 1, bt);
        break;
    case KVR_KV_SINK:
        need = ceil_div64(S, bt) + span_blocks(L - S - 1 + chunk_max, bt);
        break;
    }
    return (int)(need < all ? need : all);
}

int kvr_kv_seq_create(struct kvr_kv_pool *pool, const struct kvr_kv_seq_params *p,
                      struct kvr_kv_seq **out) {
    *out = NULL;
    const struct kvr_kv_policy_params *pp = &p->policy;
    if ((pp->policy == KVR_KV_DENSE && p->n_tokens_max < 1) ||
        kvr_kv_policy_check(pp, 1 << 30, NULL, 0) != KVR_OK) {
        KVR_LOG_ERROR("bad sequence parameters: policy=%s window=%d sinks=%d n_tokens_max=%d",
                      kvr_kv_policy_name(pp->policy), pp->window, pp->sinks, p->n_tokens_max);
        return KVR_EINVAL;
    }
    struct kvr_kv_seq *s = calloc(1, sizeof *s);
    if (!s)
        return KVR_ENOMEM;
    s->pool = pool;
    s->policy = *pp;
    s->n_tokens_max = pp->policy == KVR_KV_DENSE ? p->n_tokens_max : 0;
    if (pp->policy == KVR_KV_SINK && pp->sinks > 0) {
        s->n_sink_blocks = ceil_div(pp->sinks, pool->block_tokens);
        s->sink_blk = malloc((size_t)s->n_sink_blocks * sizeof *s->sink_blk);
        if (!s->sink_blk) {
            free(s);
            return KVR_ENOMEM;
        }
        for (int i = 0; i < s->n_sink_blocks; i++)
            s->sink_blk[i] = -1;
    }
    s->lb_begin = s->lb_end = s->tab_base = s->n_sink_blocks;
    pool->n_seqs++;
    *out = s;
    return KVR_OK;
}

static void release_all(struct kvr_kv_seq *s) {
    struct kvr_kv_pool *pool = s->pool;
    for (int i = 0; i < s->n_sink_blocks; i++) {
        if (s->sink_blk[i] >= 0) {
            pool->free_stack[pool->n_free++] = s->sink_blk[i];
            s->sink_blk[i] = -1;
        }
    }
    for (int lb = s->lb_begin; lb < s->lb_end; lb++)
        pool->free_stack[pool->n_free++] = s->tab[lb - s->tab_base];
    s->lb_begin = s->lb_end = s->tab_base = s->n_sink_blocks;
    s->n_held = 0;
    s->n_past = s->n_reserved = 0;
}

void kvr_kv_seq_free(struct kvr_kv_seq *s) {
    if (!s)
        return;
    release_all(s);
    s->pool->n_seqs--;
    free(s->sink_blk);
    free(s->tab);
    free(s);
}

void kvr_kv_seq_reset(struct kvr_kv_seq *s) { release_all(s); }

/* Makes tab able to hold logical blocks [lb_begin, lb_need). */
static int tab_fit(struct kvr_kv_seq *s, int lb_need) {
    if (s->lb_begin > s->tab_base && s->lb_begin - s->tab_base >= s->tab_cap / 2) {
        int n = s->lb_end - s->lb_begin;
        memmove(s->tab, s->tab + (s->lb_begin - s->tab_base), (size_t)n * sizeof *s->tab);
        s->tab_base = s->lb_begin;
    }
    int want = lb_need - s->tab_base;
    if (want <= s->tab_cap)
        return KVR_OK;
    int cap = s->tab_cap ? s->tab_cap : 8;
    while (cap < want)
        cap *= 2;
    int *t = realloc(s->tab, (size_t)cap * sizeof *t);
    if (!t)
        return KVR_ENOMEM;
    s->tab = t;
    s->tab_cap = cap;
    return KVR_OK;
}

int kvr_kv_seq_reserve(struct kvr_kv_seq *s, int n_new) {
    struct kvr_kv_pool *pool = s->pool;
    int bt = pool->block_tokens;
    if (n_new <= 0)
        return n_new == 0 ? KVR_OK : KVR_EINVAL;
    int end = s->n_past + n_new;
    if (s->policy.policy == KVR_KV_DENSE && end > s->n_tokens_max)
        return KVR_ECONTEXT;
    if (end <= s->n_reserved)
        return KVR_OK;
    int lb_need = ceil_div(end, bt);
    int n_sink_new = 0, n_tab_new = 0;
    for (int lb = 0; lb < s->n_sink_blocks && lb < lb_need; lb++)
        n_sink_new += s->sink_blk[lb] < 0;
    if (lb_need > s->lb_end)
        n_tab_new = lb_need - s->lb_end;
    if (n_sink_new + n_tab_new > pool->n_free)
        return KVR_ENOSPC;
    if (n_tab_new && tab_fit(s, lb_need) != KVR_OK)
        return KVR_ENOMEM;
    for (int lb = 0; lb < s->n_sink_blocks && lb < lb_need; lb++)
        if (s->sink_blk[lb] < 0)
            s->sink_blk[lb] = pool->free_stack[--pool->n_free];
    for (int lb = s->lb_end; lb < lb_need; lb++)
        s->tab[lb - s->tab_base] = pool->free_stack[--pool->n_free];
    if (lb_need > s->lb_end)
        s->lb_end = lb_need;
    s->n_held += n_sink_new + n_tab_new;
    s->n_reserved = lb_need * bt;
    return KVR_OK;
}

void kvr_kv_seq_advance(struct kvr_kv_seq *s, int n_new) {
    struct kvr_kv_pool *pool = s->pool;
    int bt = pool->block_tokens;
    KVR_ASSERT(n_new >= 0 && s->n_past + n_new <= s->n_reserved);
    s->n_past += n_new;
    /* Blocks entirely before the first position the next query can see are dead
     * for every later query too (the visible range only moves forward). */
    int keep_from = kv_recent_begin(s, s->n_past);
    int lb_dead_end = keep_from / bt;
    while (s->lb_begin < lb_dead_end && s->lb_begin < s->lb_end) {
        pool->free_stack[pool->n_free++] = s->tab[s->lb_begin - s->tab_base];
        s->lb_begin++;
        s->n_held--;
    }
}

int kvr_kv_seq_restore(struct kvr_kv_seq *s, int n_past) {
    struct kvr_kv_pool *pool = s->pool;
    int bt = pool->block_tokens;
    if (n_past < 1 || s->n_past != 0 || s->n_held != 0)
        return KVR_EINVAL;
    if (s->policy.policy == KVR_KV_DENSE && n_past > s->n_tokens_max)
        return KVR_ECONTEXT;
    int lb_end = ceil_div(n_past, bt);
    int lb_begin = kv_recent_begin(s, n_past) / bt;
    if (lb_begin < s->n_sink_blocks)
        lb_begin = s->n_sink_blocks;
    if (lb_begin > lb_end)
        lb_begin = lb_end;
    int n_sink = s->n_sink_blocks < lb_end ? s->n_sink_blocks : lb_end;
    if (n_sink + (lb_end - lb_begin) > pool->n_free)
        return KVR_ENOSPC;
    s->lb_begin = s->lb_end = s->tab_base = lb_begin;
    if (lb_end > lb_begin && tab_fit(s, lb_end) != KVR_OK)
        return KVR_ENOMEM;
    for (int lb = 0; lb < n_sink; lb++)
        s->sink_blk[lb] = pool->free_stack[--pool->n_free];
    for (int lb = lb_begin; lb < lb_end; lb++)
        s->tab[lb - s->tab_base] = pool->free_stack[--pool->n_free];
    s->lb_end = lb_end;
    s->n_held = n_sink + (lb_end - lb_begin);
    s->n_past = n_past;
    s->n_reserved = lb_end * bt;
    return KVR_OK;
}

int kvr_kv_seq_n_past(const struct kvr_kv_seq *s) { return s->n_past; }

int kvr_kv_seq_n_blocks(const struct kvr_kv_seq *s) { return s->n_held; }

int kvr_kv_seq_holds(const struct kvr_kv_seq *s, int pos) {
    if (pos < 0 || pos >= s->n_reserved)
        return 0;
    if (pos >= s->n_past)
        return 1; /* reserved, not yet written */
    if (s->policy.policy == KVR_KV_SINK && pos < s->policy.sinks)
        return 1;
    return pos >= kv_recent_begin(s, s->n_past);
}

int kvr_kv_seq_slot_raw(struct kvr_kv_seq *s, int layer, int pos, void **k, void **v) {
    if (layer < 0 || layer >= s->pool->n_layers || !kvr_kv_seq_holds(s, pos))
        return KVR_ERANGE;
    *k = kv_ptr(s, layer, pos, 0);
    *v = kv_ptr(s, layer, pos, 1);
    return KVR_OK;
}

int kvr_kv_seq_slot(struct kvr_kv_seq *s, int layer, int pos, float **k, float **v) {
    if (s->pool->type != KVR_KV_F32)
        return KVR_EINVAL;
    void *kr, *vr;
    int rc = kvr_kv_seq_slot_raw(s, layer, pos, &kr, &vr);
    if (rc == KVR_OK) {
        *k = kr;
        *v = vr;
    }
    return rc;
}

int kvr_kv_seq_export(struct kvr_kv_seq *s, int layer, int pos0, int n, float *k, float *v) {
    size_t kvd = (size_t)s->pool->kv_dim;
    if (n < 0 || layer < 0 || layer >= s->pool->n_layers)
        return KVR_ERANGE;
    for (int i = 0; i < n; i++)
        if (!kvr_kv_seq_holds(s, pos0 + i))
            return KVR_ERANGE;
    for (int i = 0; i < n; i++) {
        kv_values_to_f32(s->pool->type, k + (size_t)i * kvd, kv_ptr(s, layer, pos0 + i, 0), kvd);
        kv_values_to_f32(s->pool->type, v + (size_t)i * kvd, kv_ptr(s, layer, pos0 + i, 1), kvd);
    }
    return KVR_OK;
}

int kvr_kv_seq_import(struct kvr_kv_seq *s, int layer, int pos0, int n, const float *k,
                      const float *v) {
    size_t kvd = (size_t)s->pool->kv_dim;
    if (n < 0 || layer < 0 || layer >= s->pool->n_layers)
        return KVR_ERANGE;
    for (int i = 0; i < n; i++)
        if (!kvr_kv_seq_holds(s, pos0 + i))
            return KVR_ERANGE;
    for (int i = 0; i < n; i++) {
        kv_values_from_f32(s->pool->type, kv_ptr(s, layer, pos0 + i, 0), k + (size_t)i * kvd, kvd);
        kv_values_from_f32(s->pool->type, kv_ptr(s, layer, pos0 + i, 1), v + (size_t)i * kvd, kvd);
    }
    return KVR_OK;
}
