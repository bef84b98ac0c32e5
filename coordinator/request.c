/* request.c - validation, defaults and limits of a generation request (see request.h).
 * Called by the front ends on their own threads (it keeps no state) and by the router
 * for its block arithmetic. Knows nothing of gRPC, protobuf or HTTP. */
#include "request.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv_cache.h"
#include "msg.h"
#include "status.h"
#include "tokenizer.h"

void coord_req_ctx_init(struct coord_req_ctx *cx, const struct kvr_tokenizer *tok, int vocab) {
    cx->tok = tok;
    cx->max_piece_len = 1;
    for (int i = 0; i < vocab; i++) {
        const char *v = kvr_tokenizer_vocab(tok, i);
        int len = v ? (int)strlen(v) : 0;
        if (len > cx->max_piece_len)
            cx->max_piece_len = len;
    }
}

/* ---- the block arithmetic placement shares -------------------------------------------- */

int64_t coord_request_blocks(const struct coord_request *q, const struct coord_node_limits *d) {
    int64_t total = (int64_t)q->n_tokens + (int64_t)q->max_tokens;
    if (total > INT_MAX)
        total = INT_MAX;
    /* A colocated node prefills the prompt in chunks that ride in its steps. */
    int chunk = d->colocated ? (q->n_tokens < d->max_batch_tokens ? q->n_tokens : d->max_batch_tokens) : 1;
    return kvr_kv_blocks_needed(&q->policy, d->block_tokens, (int)total, chunk);
}

int coord_request_fits_decode(const struct coord_request *q, const struct coord_node_limits *d) {
    if (d->role != KVR_ROLE_DECODE || d->block_tokens < 1 || d->n_blocks < 1)
        return 0;
    if (coord_request_blocks(q, d) > d->n_blocks)
        return 0;
    if (q->policy.policy == KVR_KV_RECOMPUTE && q->policy.window > d->max_batch_tokens)
        return 0;
    /* The keys one query attends: the window (or the whole dense sequence) plus a chunk. */
    int64_t keys = q->policy.policy == KVR_KV_DENSE ? (int64_t)q->n_tokens + q->max_tokens : q->policy.window;
    if (keys + (d->colocated ? d->max_batch_tokens : 1) > (int64_t)d->n_ctx_max + 1)
        return 0;
    return 1;
}

int coord_request_fits_prefill(const struct coord_request *q, const struct coord_node_limits *p) {
    if (p->role != KVR_ROLE_PREFILL || p->block_tokens < 1 || p->n_blocks < 1)
        return 0;
    int len = q->policy.policy == KVR_KV_RECOMPUTE && q->n_tokens > q->policy.window ? q->policy.window
                                                                                      : q->n_tokens;
    return len <= p->max_batch_tokens &&
           kvr_kv_blocks_needed(&q->policy, p->block_tokens, q->n_tokens, len) <= p->n_blocks;
}

/* ---- validation -------------------------------------------------------------------------- */

#define FAIL(code, ...)                              \
    do {                                             \
        snprintf(err, err_len, __VA_ARGS__);         \
        rc = (code);                                 \
        goto out;                                    \
    } while (0)

/* The prompt as ids, the model's BOS first if it has one (tokens: room for n + 1). */
static int take_ids(const struct coord_req_ctx *cx, const struct coord_gen_input *in,
                    const struct coord_limits *lim, int *tokens, int *n_out, char *err, size_t err_len) {
    int n = 0, rc = KVR_EINVAL;
    int64_t first = in->prompt_tokens32 ? in->prompt_tokens32[0] : in->prompt_tokens64[0];
    int bos = cx->tok ? kvr_tokenizer_bos(cx->tok) : KVR_TOKEN_BOS;
    if (bos >= 0 && first != bos)
        tokens[n++] = bos;
    for (size_t i = 0; i < in->n_prompt_tokens; i++) {
        int64_t id = in->prompt_tokens32 ? in->prompt_tokens32[i] : in->prompt_tokens64[i];
        if (id < 0 || id >= lim->vocab_size)
            FAIL(KVR_EINVAL, "prompt_tokens[%zu] = %lld is outside the vocabulary [0, %d)", i, (long long)id,
                 lim->vocab_size);
        tokens[n++] = (int)id;
    }
    rc = KVR_OK;
out:
    *n_out = n;
    return rc;
}

/* The prompt as text, tokenized as llama2.c does (BOS first). */
static int take_text(const struct coord_req_ctx *cx, const struct coord_gen_input *in, int **tokens, int *n_out,
                     char *err, size_t err_len, int seq_len) {
    int rc = KVR_EINVAL;
    char *text = NULL;
    *tokens = NULL;
    if (memchr(in->prompt, '\0', in->prompt_len))
        FAIL(KVR_EINVAL, "prompt contains a NUL byte at offset %zu: send text without NUL bytes, or use "
             "prompt_tokens", (size_t)((const char *)memchr(in->prompt, '\0', in->prompt_len) - in->prompt));
    /* A token covers at most max_piece_len bytes of text (plus the dummy-prefix space), so
     * a longer text is over the context without encoding it (BPE is quadratic). */
    if (in->prompt_len + 1 > (size_t)seq_len * (size_t)cx->max_piece_len)
        FAIL(KVR_EINVAL, "prompt of %zu bytes is over the model context of %d tokens", in->prompt_len, seq_len);
    rc = KVR_ENOMEM;
    text = malloc(in->prompt_len + 1);
    *tokens = malloc((in->prompt_len + 3) * sizeof **tokens);
    if (!text || !*tokens)
        FAIL(KVR_ENOMEM, "coordinator out of memory");
    memcpy(text, in->prompt, in->prompt_len);
    text[in->prompt_len] = '\0';
    int erc = kvr_tokenizer_encode(cx->tok, text, 1, 0, *tokens, (int)in->prompt_len + 3, n_out);
    if (erc != KVR_OK)
        FAIL(erc == KVR_ENOMEM ? KVR_ENOMEM : KVR_EINVAL, "cannot tokenize the prompt: %s", kvr_status_str(erc));
    rc = KVR_OK;
out:
    free(text);
    return rc;
}

int coord_request_build(const struct coord_req_ctx *cx, const struct coord_gen_input *in,
                        const struct coord_limits *lim, struct coord_request *out, char *err, size_t err_len) {
    int *tokens = NULL;
    int n = 0, rc = KVR_EINVAL;
    memset(out, 0, sizeof *out);
    err[0] = '\0';
    int C = lim->seq_len;
    if (C < 1 || lim->vocab_size < 1)
        FAIL(KVR_EUNAVAIL, "the cluster is not serving (no nodes)");
    int has_text = in->prompt && in->prompt_len > 0;
    int has_ids = in->n_prompt_tokens > 0 && (in->prompt_tokens32 || in->prompt_tokens64);

    /* ---- fields on their own -------------------------------------------------------- */
    if (has_text && has_ids)
        FAIL(KVR_EINVAL, "give prompt or prompt_tokens, not both");
    if (!has_text && !has_ids)
        FAIL(KVR_EINVAL, "empty prompt: give prompt (text) or prompt_tokens");
    int64_t pol = in->kv_policy.present ? in->kv_policy.v : KVR_KV_DENSE;
    if (pol < KVR_KV_DENSE || pol > KVR_KV_SINK)
        FAIL(KVR_EINVAL, "unknown kv_policy %lld", (long long)pol);
    double temp = in->temperature.present ? in->temperature.v : COORD_REQ_DEFAULT_TEMPERATURE;
    if (!isfinite(temp) || temp < 0.0 || temp > (double)FLT_MAX)
        FAIL(KVR_EINVAL, "temperature must be a finite number >= 0 (got %g)", temp);
    double top_p = in->top_p.present ? in->top_p.v : 1.0;
    if (!(top_p >= 0.0 && top_p <= 1.0))
        FAIL(KVR_EINVAL, "top_p must be in [0, 1] (got %g)", top_p);
    int64_t max_tokens = in->max_tokens.present ? in->max_tokens.v : 0;
    if (max_tokens < 0)
        FAIL(KVR_EINVAL, "max_tokens must be >= 0 (got %lld)", (long long)max_tokens);
    int max_cap = lim->max_tokens > 0 && lim->max_tokens < COORD_REQ_MAX_TOKENS ? lim->max_tokens
                                                                                 : COORD_REQ_MAX_TOKENS;

    /* Policy parameters: absent fields take defaults that always pass the check. */
    struct kvr_kv_policy_params pp = {.policy = (enum kvr_kv_policy)pol};
    if (pp.policy != KVR_KV_DENSE) {
        int64_t L = in->kv_window.present ? in->kv_window.v
                                          : (C < COORD_REQ_DEFAULT_WINDOW ? C : COORD_REQ_DEFAULT_WINDOW);
        if (L < 1)
            FAIL(KVR_EINVAL, "kv policy %s needs a window of at least 1 token (got %lld)",
                 kvr_kv_policy_name(pp.policy), (long long)L);
        /* Every windowed policy keeps L within the trained context: recompute and sink
         * place keys at 0..L-1, and the decode nodes size attention for the context (a
         * window past it would extrapolate like dense and fail mid-generation). */
        if (L > C)
            FAIL(KVR_EINVAL, "kv policy %s: window %lld exceeds the model context %d",
                 kvr_kv_policy_name(pp.policy), (long long)L, C);
        pp.window = (int)L;
        if (pp.policy == KVR_KV_SINK) {
            int64_t S = in->kv_sinks.present ? in->kv_sinks.v
                                             : (L - 1 < COORD_REQ_DEFAULT_SINKS ? L - 1 : COORD_REQ_DEFAULT_SINKS);
            if (S < 0 || S >= L)
                FAIL(KVR_EINVAL, "kv policy sink needs 0 <= sinks < window (got sinks %lld, window %lld)",
                     (long long)S, (long long)L);
            pp.sinks = (int)S;
        }
    }

    /* ---- the prompt, BOS first ----------------------------------------------------------
     * Every policy needs it to fit in the context: the prefill pass runs it whole at
     * positions 0..n-1. */
    if (has_ids) {
        if (in->n_prompt_tokens > (size_t)C)
            FAIL(KVR_EINVAL, "prompt_tokens has %zu ids, over the model context of %d", in->n_prompt_tokens, C);
        rc = KVR_ENOMEM;
        if (!(tokens = malloc((in->n_prompt_tokens + 1) * sizeof *tokens)))
            FAIL(KVR_ENOMEM, "coordinator out of memory");
        if ((rc = take_ids(cx, in, lim, tokens, &n, err, err_len)) != KVR_OK)
            goto out;
    } else if ((rc = take_text(cx, in, &tokens, &n, err, err_len, C)) != KVR_OK) {
        goto out;
    }
    rc = KVR_EINVAL;
    if (n > C)
        FAIL(KVR_EINVAL, "prompt is %d tokens, over the model context of %d", n, C);

    if (max_tokens == 0) {
        max_tokens = C - n;
        if (max_tokens < 1)
            FAIL(KVR_EINVAL, "prompt of %d tokens fills the model context of %d: nothing left to generate with "
                 "max_tokens 0", n, C);
    } else if (pp.policy == KVR_KV_DENSE && max_tokens > C - n) { /* no n + max_tokens: it overflows */
        FAIL(KVR_EINVAL, "prompt (%d tokens) + max_tokens (%lld) exceed the model context of %d under kv_policy "
             "dense", n, (long long)max_tokens, C);
    } else if (max_tokens > max_cap) {
        FAIL(KVR_EINVAL, "max_tokens %lld is over the limit of %d", (long long)max_tokens, max_cap);
    }

    out->tokens = tokens;
    out->n_tokens = n;
    out->max_tokens = (int)max_tokens;
    out->temperature = (float)temp;
    out->top_p = top_p == 0.0 ? 1.0f : (float)top_p;
    out->seed = in->has_seed ? in->seed : 0;
    out->stop_at_eos = !(in->has_ignore_eos && in->ignore_eos);
    out->policy = pp;

    /* ---- what the cluster can hold --------------------------------------------------- */
    int n_decode = 0, n_prefill = 0, n_coloc = 0, fits_d = 0, fits_p = 0;
    int64_t need_min = -1, biggest = 0;
    for (int i = 0; i < lim->n_nodes; i++) {
        const struct coord_node_limits *d = &lim->nodes[i];
        if (d->role == KVR_ROLE_DECODE) {
            n_decode++;
            n_coloc += d->colocated;
            int64_t need = coord_request_blocks(out, d);
            if (need_min < 0 || need < need_min)
                need_min = need;
            if (d->n_blocks > biggest)
                biggest = d->n_blocks;
            fits_d |= coord_request_fits_decode(out, d);
        } else if (d->role == KVR_ROLE_PREFILL) {
            n_prefill++;
            fits_p |= coord_request_fits_prefill(out, d);
        }
    }
    if (n_decode == 0)
        FAIL(KVR_EUNAVAIL, "no decode node is alive");
    if (!fits_d) {
        if (pp.policy == KVR_KV_RECOMPUTE)
            FAIL(KVR_ENOSPC, "no decode node can run a recompute window of %d tokens with %d KV blocks", pp.window,
                 (int)need_min);
        FAIL(KVR_ENOSPC, "the request needs %lld KV blocks; the largest decode node holds %lld",
             (long long)need_min, (long long)biggest);
    }
    if (n_prefill > 0 && !fits_p)
        FAIL(KVR_ENOSPC, "no prefill node can take a prompt of %d tokens in one pass", n);
    if (n_prefill == 0 && n_coloc == 0)
        FAIL(KVR_EUNAVAIL, "no node can prefill (no prefill node is alive)");
    tokens = NULL; /* out owns them */
    rc = KVR_OK;
out:
    if (rc != KVR_OK) {
        free(out->tokens == tokens ? NULL : out->tokens);
        memset(out, 0, sizeof *out);
    }
    free(tokens);
    return rc;
}
