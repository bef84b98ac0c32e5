/* ppl.c - teacher-forced perplexity under a KV-cache policy (ppl.h).
 * Called by cli/cmd_ppl.c and the policy tests; owns, for the length of one call, an
 * engine, a KV pool sized for the policy, and the logits buffers. */
#include "ppl.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "log.h"
#include "status.h"
#include "transformer.h"

#define PPL_CHUNK_DEFAULT 256
#define PPL_BATCH_DEFAULT 2048
#define PPL_BLOCK_DEFAULT 16

/* -log softmax(logits)[target], in double so that the mean over thousands of tokens
 * does not depend on float summation order. */
static double token_nll(const float *logits, int V, int target) {
    float mx = logits[0];
    for (int i = 1; i < V; i++)
        if (logits[i] > mx)
            mx = logits[i];
    double sum = 0.0;
    for (int i = 0; i < V; i++)
        sum += exp((double)logits[i] - (double)mx);
    return log(sum) - ((double)logits[target] - (double)mx);
}

struct ppl_run {
    struct kvr_kv_pool *pool;
    struct kvr_kv_seq **seqs; /* (n_seqs) */
    int n_seqs;
    struct kvr_engine *eng;
    struct kvr_forward_item *items; /* (n_seqs) */
    float *logits;                  /* (rows, vocab) */
};

static void run_free(struct ppl_run *r) {
    for (int i = 0; i < r->n_seqs; i++)
        kvr_kv_seq_free(r->seqs[i]);
    free(r->seqs);
    kvr_engine_free(r->eng);
    kvr_kv_pool_free(r->pool);
    free(r->items);
    free(r->logits);
}

/* Pool of n_blocks blocks, n_seqs sequences, an engine and logits for n_logit_rows rows. */
static int run_open(struct ppl_run *r, const struct kvr_ppl_params *p, int bt, int n_blocks,
                    int n_seqs, int n_tokens_max, struct kvr_engine_params *ep, int n_logit_rows) {
    const struct kvr_model_config *c = kvr_model_config(p->model);
    struct kvr_kv_pool_params pp = {
        .type = p->kv_type,
        .n_layers = c->n_layers,
        .kv_dim = c->kv_dim,
        .block_tokens = bt,
        .budget_nbytes = (uint64_t)n_blocks * (uint64_t)bt * kvr_kv_token_nbytes_type(p->kv_type, c->n_layers, c->kv_dim),
    };
    int rc = kvr_kv_pool_create(&pp, &r->pool);
    if (rc != KVR_OK)
        return rc;
    r->seqs = calloc((size_t)n_seqs, sizeof *r->seqs);
    r->items = calloc((size_t)n_seqs, sizeof *r->items);
    r->logits = malloc((size_t)n_logit_rows * (size_t)c->vocab_size * sizeof *r->logits);
    if (!r->seqs || !r->items || !r->logits)
        return KVR_ENOMEM;
    struct kvr_kv_seq_params sp = {.policy = p->policy, .n_tokens_max = n_tokens_max};
    for (; r->n_seqs < n_seqs; r->n_seqs++)
        if ((rc = kvr_kv_seq_create(r->pool, &sp, &r->seqs[r->n_seqs])) != KVR_OK)
            return rc;
    return kvr_engine_create(ep, &r->eng);
}

/* dense, window, sink: one sequence fed n_in tokens in chunks, every row's logits scored. */
static int eval_streaming(const struct kvr_ppl_params *p, int bt, float *nll_tok, double *sum,
                          struct kvr_ppl_result *out) {
    const struct kvr_model_config *c = kvr_model_config(p->model);
    int V = c->vocab_size, n_in = p->n_tokens - 1;
    int C = p->chunk_tokens > 0 ? p->chunk_tokens : PPL_CHUNK_DEFAULT;
    if (C > n_in)
        C = n_in;
    int dense = p->policy.policy == KVR_KV_DENSE;
    /* Widest key range one call gathers: the window plus the chunk (kvr_engine_forward). */
    int n_ctx = dense ? n_in : p->policy.window + C - 1;
    if (n_ctx > n_in)
        n_ctx = n_in;
    struct kvr_engine_params ep = {.model = p->model, .n_threads = p->n_threads,
                                   .n_batch_tokens_max = C, .n_items_max = 1, .n_ctx_max = n_ctx};
    struct ppl_run r = {0};
    int rc = run_open(&r, p, bt, kvr_kv_blocks_needed(&p->policy, bt, n_in, C), 1, n_in, &ep, C);
    if (rc != KVR_OK)
        goto out;
    for (int q0 = 0; q0 < n_in; q0 += C) {
        int n = n_in - q0 < C ? n_in - q0 : C;
        struct kvr_forward_item it = {.seq = r.seqs[0], .tokens = p->tokens + q0, .n_tokens = n,
                                      .logits = r.logits, .all_logits = 1, .prompt = 1};
        if ((rc = kvr_engine_forward(r.eng, &it, 1)) != KVR_OK)
            goto out;
        out->n_forward++;
        out->n_token_rows += n;
        for (int i = 0; i < n; i++) {
            double nll = token_nll(r.logits + (size_t)i * V, V, p->tokens[q0 + i + 1]);
            *sum += nll;
            if (nll_tok)
                nll_tok[q0 + i] = (float)nll;
        }
    }
out:
    run_free(&r);
    return rc;
}

/* recompute: position q is predicted from tokens max(0, q-L+1)..q run from scratch at
 * positions 0.., B windows per call as B items of their own sequences. */
static int eval_recompute(const struct kvr_ppl_params *p, int bt, float *nll_tok, double *sum,
                          struct kvr_ppl_result *out) {
    const struct kvr_model_config *c = kvr_model_config(p->model);
    int V = c->vocab_size, n_in = p->n_tokens - 1;
    int L = p->policy.window < n_in ? p->policy.window : n_in;
    int budget = p->batch_tokens > 0 ? p->batch_tokens : PPL_BATCH_DEFAULT;
    int B = budget / L > 1 ? budget / L : 1;
    if (B > n_in)
        B = n_in;
    struct kvr_engine_params ep = {.model = p->model, .n_threads = p->n_threads,
                                   .n_batch_tokens_max = B * L, .n_items_max = B, .n_ctx_max = L};
    struct ppl_run r = {0};
    int n_blocks = B * kvr_kv_blocks_needed(&p->policy, bt, L, L);
    int rc = run_open(&r, p, bt, n_blocks, B, L, &ep, B);
    if (rc != KVR_OK)
        goto out;
    for (int q0 = 0; q0 < n_in; q0 += B) {
        int nb = n_in - q0 < B ? n_in - q0 : B;
        for (int b = 0; b < nb; b++) {
            int q = q0 + b, n = q + 1 < L ? q + 1 : L;
            kvr_kv_seq_reset(r.seqs[b]);
            r.items[b] = (struct kvr_forward_item){.seq = r.seqs[b], .tokens = p->tokens + q - n + 1,
                                                   .n_tokens = n, .logits = r.logits + (size_t)b * V};
            out->n_token_rows += n;
        }
        if ((rc = kvr_engine_forward(r.eng, r.items, nb)) != KVR_OK)
            goto out;
        out->n_forward++;
        for (int b = 0; b < nb; b++) {
            double nll = token_nll(r.logits + (size_t)b * V, V, p->tokens[q0 + b + 1]);
            *sum += nll;
            if (nll_tok)
                nll_tok[q0 + b] = (float)nll;
        }
    }
out:
    run_free(&r);
    return rc;
}

int kvr_ppl_eval(const struct kvr_ppl_params *p, float *nll_tok, struct kvr_ppl_result *out) {
    *out = (struct kvr_ppl_result){0};
    const struct kvr_model_config *c = kvr_model_config(p->model);
    char err[160];
    if (p->n_tokens < 2 || !p->tokens) {
        KVR_LOG_ERROR("perplexity needs at least 2 tokens (got %d)", p->n_tokens);
        return KVR_EINVAL;
    }
    /* The last token is only a target and never reaches the engine's own check. */
    for (int i = 0; i < p->n_tokens; i++) {
        if (p->tokens[i] < 0 || p->tokens[i] >= c->vocab_size) {
            KVR_LOG_ERROR("token %d is id %d, outside the vocabulary [0, %d)", i, p->tokens[i],
                          c->vocab_size);
            return KVR_EINVAL;
        }
    }
    if (kvr_kv_policy_check(&p->policy, c->seq_len, err, (int)sizeof err) != KVR_OK) {
        KVR_LOG_ERROR("%s", err);
        return KVR_EINVAL;
    }
    int n_in = p->n_tokens - 1;
    if (p->policy.policy == KVR_KV_DENSE && n_in > c->seq_len && !p->allow_extrapolation) {
        KVR_LOG_ERROR("dense over %d positions exceeds the trained context %d", n_in, c->seq_len);
        return KVR_ECONTEXT;
    }
    int bt = p->block_tokens > 0 ? p->block_tokens : PPL_BLOCK_DEFAULT;
    double sum = 0.0;
    int rc = p->policy.policy == KVR_KV_RECOMPUTE ? eval_recompute(p, bt, nll_tok, &sum, out)
                                                  : eval_streaming(p, bt, nll_tok, &sum, out);
    if (rc != KVR_OK)
        return rc;
    out->n_scored = n_in;
    out->nll = sum / n_in;
    out->ppl = exp(out->nll);
    return KVR_OK;
}
