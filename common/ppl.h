/* ppl.h - teacher-forced perplexity of a token sequence under a KV-cache policy, exactly
 * as issue 4 defines it: ppl = exp(mean negative log-likelihood of tokens 2..N, each given
 * all the tokens before it as the policy lets the model see them). Called by `kvrelay ppl`
 * and by the policy tests, so both compute the same thing. */
#ifndef KVR_PPL_H
#define KVR_PPL_H

#include "kv_cache.h"
#include "model.h"

struct kvr_ppl_params {
    struct kvr_model *model;            /* borrowed for the call */
    const int *tokens;                  /* (n_tokens) ids, BOS first; borrowed for the call */
    int n_tokens;                       /* N >= 2: tokens 2..N (N - 1 of them) are scored */
    struct kvr_kv_policy_params policy; /* checked with kvr_kv_policy_check */
    int allow_extrapolation;            /* dense: let positions run past the trained context */
    int n_threads;                      /* compute threads, 0: all online CPUs */
    int chunk_tokens;                   /* dense/window/sink: tokens per forward call (0: 256) */
    int batch_tokens;                   /* recompute: tokens per forward call, whole windows
                                         * as separate items (0: 2048, at least one window) */
    int block_tokens;                   /* KV block size in tokens (0: 16) */
    enum kvr_kv_type kv_type;           /* KV cache element type (0: f32) */
};

struct kvr_ppl_result {
    double nll;     /* mean negative log-likelihood in nats per scored token */
    double ppl;     /* exp(nll) */
    int n_scored;   /* N - 1 */
    int n_forward;  /* kvr_engine_forward calls made */
    long long n_token_rows; /* token rows run through the model (recompute: sum of windows) */
};

/* Runs the model over p->tokens under p->policy and scores every token after the first.
 * dense, window and sink feed the text in chunks of chunk_tokens through one sequence;
 * recompute runs, for each position q, tokens max(0, q-L+1)..q from scratch at positions
 * 0.. and keeps the last logits, several windows per forward call as separate items.
 * The model sees positions 0..N-2 only (the last token is only predicted), so dense fits
 * the trained context when N - 1 <= seq_len.
 * nll_tok, when not NULL, receives (N - 1) floats: the NLL of tokens[1..N) in order.
 * Errors: KVR_EINVAL (N < 2, a token id outside the vocabulary, a policy the model
 * cannot run: the reason is logged), KVR_ECONTEXT (dense past the trained context without
 * allow_extrapolation), KVR_ENOMEM. Nothing is printed. */
int kvr_ppl_eval(const struct kvr_ppl_params *p, float *nll_tok, struct kvr_ppl_result *out);

#endif /* KVR_PPL_H */
