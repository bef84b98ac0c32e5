/* transformer.h - the Llama forward pass over the paged KV cache.
 *
 * One call runs any mix of sequences: a prompt of many tokens (prefill: every
 * projection and the FFN as one GEMM over all rows, causal attention by GEMM) and
 * sequences advancing by one token (decode: attention straight over their cache
 * blocks). All rows of all items share each weight read, so B decoding sequences cost
 * one GEMM of B rows per projection. Activations, the KV cache and attention are float32;
 * each weight matrix is multiplied in its own type (F32, F16, BF16, Q8_0: quant.h,
 * matmul.h), and RMSNorm epsilon, RoPE base and rotated dimensions come from the model's
 * config (docs/ARCHITECTURE.md). */
#ifndef KVR_TRANSFORMER_H
#define KVR_TRANSFORMER_H

#include "kv_cache.h"
#include "model.h"

struct kvr_engine_params {
    struct kvr_model *model; /* borrowed for the engine's life */
    int n_threads;           /* threads for matmuls and attention (0: online CPUs) */
    int n_batch_tokens_max;  /* most tokens in one forward call, summed over items */
    int n_items_max;         /* most sequences in one forward call */
    int n_ctx_max;           /* most cached keys one query may attend */
};

struct kvr_forward_item {
    struct kvr_kv_seq *seq; /* borrowed; its next n_tokens positions are computed */
    const int *tokens;      /* (n_tokens) token ids */
    int n_tokens;
    float *logits;          /* out: (n_tokens, vocab) if all_logits, else (vocab) of the
                             * last token; NULL: no logits */
    int all_logits;
    int prompt; /* nonzero: these are prompt tokens (prefill). Their rows multiply non-F32
                 * weights on the prefill GEMM path (f32 activations, weights dequantized
                 * exactly; matmul.h) instead of the per-value kernels decode uses: every
                 * caller (generate, prefill node, decode node, ppl, bench) marks a
                 * sequence's prompt the same way, so its results do not depend on what
                 * is batched with it. F32 weights ignore the mark. */
};

struct kvr_engine;
struct kvr_threadpool;

/* Sizes every buffer from params (no allocation per call) and pins OpenBLAS to one
 * thread. KVR_EINVAL for a non-positive limit, KVR_ENOMEM. Returns owned *out; free with
 * kvr_engine_free. */
int kvr_engine_create(const struct kvr_engine_params *p, struct kvr_engine **out);

/* Accepts NULL. */
void kvr_engine_free(struct kvr_engine *e);

const struct kvr_engine_params *kvr_engine_params(const struct kvr_engine *e);

/* The engine's compute threads (borrowed): a caller may run its own
 * parallel loops on them between forward calls (the benchmark's read probes). */
struct kvr_threadpool *kvr_engine_threadpool(const struct kvr_engine *e);

/* Installs fn to be called on the calling thread after layer `layer` of every forward
 * call has stored its K and V for all items (before that layer's attention): the
 * prefill node encodes and ships layer l while layer l+1 computes. fn must not call
 * the engine. NULL removes it. */
void kvr_engine_set_layer_hook(struct kvr_engine *e,
                               void (*fn)(void *ud, const struct kvr_forward_item *items,
                                          int n_items, int layer),
                               void *ud);

/* Checks one item as kvr_engine_forward will, without the batch totals: KVR_OK, KVR_EINVAL
 * (empty, a token id outside the vocabulary, a cache of another shape, more tokens than
 * one call takes) or KVR_ECONTEXT (a query would attend more than n_ctx_max keys, or a
 * dense sequence would pass its n_tokens_max). A caller batching independent sequences
 * checks each one first, so one bad sequence fails alone instead of the whole call. */
int kvr_engine_check_item(const struct kvr_engine *e, const struct kvr_forward_item *it);

/* Runs items through the model: reserves cache slots (kvr_kv_seq_reserve), writes K/V of
 * every new token, writes the requested logits, then advances each sequence (eviction
 * by its policy). Checks everything before computing: KVR_EINVAL (a token id outside the
 * vocabulary, an empty item, more items or tokens than the engine's limits),
 * KVR_ECONTEXT (a dense sequence past its n_tokens_max, or a query that would attend
 * more than n_ctx_max keys), KVR_ENOSPC (the pool has no block; earlier items may keep
 * their new reservations). On error no sequence advances. */
int kvr_engine_forward(struct kvr_engine *e, struct kvr_forward_item *items, int n_items);

#endif /* KVR_TRANSFORMER_H */
