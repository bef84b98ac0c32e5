/* kv_cache.h - the block-paged KV cache of one node and its long-context policies.
 *
 * A pool owns fixed-size blocks of block_tokens tokens; each block holds K and V of all
 * layers: (n_layers, 2, block_tokens, kv_dim) values of the pool's type (f32, f16 or
 * bf16: --kv-type), so one (block, layer) is two contiguous arrays, the unit the wire
 * format ships. f16/bf16 pools hold half the bytes per token; values enter them rounded
 * to nearest even (half.h: finite values saturate, never become inf). A sequence owns a block table and
 * one policy:
 *   dense      every token, up to n_tokens_max;
 *   window     only the last L tokens (L including the current query), text positions;
 *   recompute  the caller resets the sequence and re-prefills the last L tokens at
 *              positions 0..L-1 for every new token (the reference for quality);
 *   sink       the first S tokens plus the last L-S; keys are stored before RoPE and the
 *              forward pass rotates them at their place in the cache (StreamingLLM).
 * Neither pools nor sequences are thread-safe: one owner thread per pool. */
#ifndef KVR_KV_CACHE_H
#define KVR_KV_CACHE_H

#include <stdint.h>

/* Values travel in MPI messages: append only. */
enum kvr_kv_policy {
    KVR_KV_DENSE = 0,
    KVR_KV_WINDOW = 1,
    KVR_KV_RECOMPUTE = 2,
    KVR_KV_SINK = 3,
};
_Static_assert(KVR_KV_SINK == 3, "kv policy values are part of the wire protocol");

#define KVR_KV_POLICY_CHOICES "dense|window|recompute|sink"

struct kvr_kv_policy_params {
    enum kvr_kv_policy policy;
    int window; /* L: tokens attended including the current one (window/recompute/sink) */
    int sinks;  /* S: sink tokens kept forever (sink only), 0 <= S < L */
};

/* "dense", "window", ...; "?" when out of range. */
const char *kvr_kv_policy_name(int policy);

/* Checks the parameters of a policy: window >= 1 (and >= S + 1 for sink) for the
 * windowed policies, L and S ignored for dense. n_ctx is the model's trained context:
 * recompute needs L <= n_ctx. Returns KVR_OK or KVR_EINVAL with a reason in err. */
int kvr_kv_policy_check(const struct kvr_kv_policy_params *p, int n_ctx, char *err, int err_len);

/* Which positions a sequence of this policy still holds after n_past tokens: the
 * sinks [0, *n_sinks) and the recent range [return value, n_past). Under dense and
 * recompute that is everything (0 sinks, from 0). */
int kvr_kv_policy_first_held(const struct kvr_kv_policy_params *p, int n_past, int *n_sinks);

/* Element type of a pool. Values travel in MPI messages (HELLO) and equal the KV wire
 * format's value types (kv_wire.h): append only. */
enum kvr_kv_type {
    KVR_KV_F32 = 0,  /* the exact default */
    KVR_KV_F16 = 1,  /* IEEE half */
    KVR_KV_BF16 = 2, /* bfloat16 */
};
#define KVR_KV_TYPE_CHOICES "f32|f16|bf16"

/* "f32", "f16", "bf16"; "?" when out of range. */
const char *kvr_kv_type_name(int type);

/* Bytes per element: 4, 2, 2; 0 when out of range. */
int kvr_kv_type_nbytes(int type);

/* Parses "f32" / "f16" / "bf16" into *type: KVR_OK or KVR_EINVAL. */
int kvr_kv_type_parse(const char *s, enum kvr_kv_type *type);

struct kvr_kv_pool_params {
    enum kvr_kv_type type;  /* element type; 0 (zero-initialized) = f32 */
    int n_layers;
    int kv_dim;             /* n_kv_heads * head_dim */
    int block_tokens;       /* tokens per block, e.g. 16 */
    uint64_t budget_nbytes; /* memory for blocks; n_blocks = budget / block_nbytes */
};

struct kvr_kv_pool_stats {
    int n_blocks;           /* total */
    int n_blocks_free;
    int n_seqs;             /* live sequences */
    int block_tokens;
    uint64_t block_nbytes;  /* bytes of one block (all layers, K and V) */
    uint64_t token_nbytes;  /* 2 * n_layers * kv_dim * (4 or 2: the pool's type) */
    enum kvr_kv_type type;
    uint64_t bytes_total;
    uint64_t bytes_used;
    uint64_t bytes_free;
};

struct kvr_kv_pool;
struct kvr_kv_seq;

/* KV bytes per token of an f32 pool: 2 x n_layers x kv_dim x sizeof(float). */
uint64_t kvr_kv_token_nbytes(int n_layers, int kv_dim);

/* KV bytes per token of a pool of that type: 2 x n_layers x kv_dim x (4 or 2). */
uint64_t kvr_kv_token_nbytes_type(enum kvr_kv_type type, int n_layers, int kv_dim);

/* The pool's element type. */
enum kvr_kv_type kvr_kv_pool_type(const struct kvr_kv_pool *pool);

/* Allocates the pool's block memory up front. KVR_EINVAL when the budget holds no
 * block or a parameter is not positive, KVR_ENOMEM. Returns owned *out; free with
 * kvr_kv_pool_free (after every sequence). */
int kvr_kv_pool_create(const struct kvr_kv_pool_params *p, struct kvr_kv_pool **out);

/* Frees the pool. Accepts NULL. Sequences still alive are a programmer error. */
void kvr_kv_pool_free(struct kvr_kv_pool *pool);

/* Exact accounting of blocks in use. */
void kvr_kv_pool_stats(const struct kvr_kv_pool *pool, struct kvr_kv_pool_stats *st);

/* The most blocks a sequence of this policy ever holds at once when it sees n_total
 * tokens in forward calls of at most chunk_max tokens each. Placement reserves this. */
int kvr_kv_blocks_needed(const struct kvr_kv_policy_params *p, int block_tokens, int n_total,
                         int chunk_max);

struct kvr_kv_seq_params {
    struct kvr_kv_policy_params policy;
    int n_tokens_max; /* dense: the most tokens ever held (context); others: unused */
};

/* Creates an empty sequence in pool (no blocks yet). KVR_EINVAL, KVR_ENOMEM.
 * The sequence borrows pool until kvr_kv_seq_free. */
int kvr_kv_seq_create(struct kvr_kv_pool *pool, const struct kvr_kv_seq_params *p,
                      struct kvr_kv_seq **out);

/* Returns every block to the pool. Accepts NULL. */
void kvr_kv_seq_free(struct kvr_kv_seq *seq);

/* Makes room for the next n_new tokens (positions n_past .. n_past+n_new-1). All or
 * nothing: KVR_ENOSPC when the pool lacks blocks (none taken), KVR_ECONTEXT when a
 * dense sequence would pass n_tokens_max. Cheap when no new block is needed. */
int kvr_kv_seq_reserve(struct kvr_kv_seq *seq, int n_new);

/* Records that n_new reserved tokens were written, then frees the blocks whose tokens
 * no later query can see (window and sink eviction). */
void kvr_kv_seq_advance(struct kvr_kv_seq *seq, int n_new);

/* Prepares an empty sequence to receive the cache of n_past tokens made elsewhere:
 * takes blocks only for the positions its policy still holds after n_past tokens (the
 * sinks and the window; all of them under dense), as if they had been written here and
 * evicted by kvr_kv_seq_advance. Fill them with kvr_kv_seq_import. All or nothing:
 * KVR_ENOSPC, KVR_ECONTEXT (dense past n_tokens_max), KVR_EINVAL (not empty, n_past < 1). */
int kvr_kv_seq_restore(struct kvr_kv_seq *seq, int n_past);

/* Drops every token and block (recompute starts each step from scratch). */
void kvr_kv_seq_reset(struct kvr_kv_seq *seq);

/* Tokens written so far (the next token's text position). */
int kvr_kv_seq_n_past(const struct kvr_kv_seq *seq);

/* Blocks held now. */
int kvr_kv_seq_n_blocks(const struct kvr_kv_seq *seq);

/* Whether text position pos is held: written and visible to the next query (not
 * evicted), or reserved and not yet written. */
int kvr_kv_seq_holds(const struct kvr_kv_seq *seq, int pos);

/* Pointers to the kv_dim floats of K and V of layer at text position pos; K is post-RoPE
 * except under the sink policy (pre-RoPE). Borrowed until the token is evicted or the
 * sequence freed. KVR_ERANGE when pos is not held (or reserved); KVR_EINVAL on an f16
 * or bf16 pool (use kvr_kv_seq_slot_raw or kvr_kv_seq_export there). */
int kvr_kv_seq_slot(struct kvr_kv_seq *seq, int layer, int pos, float **k, float **v);

/* Like kvr_kv_seq_slot for a pool of any type: the kv_dim values of the pool's type
 * (kvr_kv_pool_type; uint16_t bit patterns for f16/bf16). */
int kvr_kv_seq_slot_raw(struct kvr_kv_seq *seq, int layer, int pos, void **k, void **v);

/* Boundary APIs, f32 on the caller's side whatever the pool's type:
 * export copies n held tokens of one layer at pos0.. into k and v ((n, kv_dim) f32,
 * widened exactly from f16/bf16); import copies (n, kv_dim) f32 into reserved slots at
 * text positions pos0..pos0+n-1, rounded to nearest even into an f16/bf16 pool (exact
 * for values that came from a pool of the same type, so export -> wire -> import
 * between two pools of one type is bit-exact). Import is how blocks received from
 * another node enter this pool; call kvr_kv_seq_advance once all layers of those
 * tokens are in. KVR_ERANGE when a slot is not held (export) or reserved (import). */
int kvr_kv_seq_export(struct kvr_kv_seq *seq, int layer, int pos0, int n, float *k, float *v);
int kvr_kv_seq_import(struct kvr_kv_seq *seq, int layer, int pos0, int n, const float *k,
                      const float *v);

#endif /* KVR_KV_CACHE_H */
