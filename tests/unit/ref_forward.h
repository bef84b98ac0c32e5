/* ref_forward.h - an independent, deliberately naive Llama forward pass for tests.
 * llama2.c's math (RMSNorm, RoPE, GQA attention, SwiGLU) in plain loops with no KV cache
 * and no BLAS: the logits of position p come from recomputing every layer of every
 * token 0..p from scratch. Dot products accumulate in double so that the reference is at
 * least as exact as the engine it checks. Weights of any type are dequantized (by the
 * types' definitions) and multiplied with unrounded activations: for F16/BF16/Q8_0 models
 * it is the model's exact arithmetic, which the engine approximates the way llama.cpp
 * does (rounded activations). Not for anything but tests: O(n^2) tokens. */
#ifndef KVR_TEST_REF_FORWARD_H
#define KVR_TEST_REF_FORWARD_H

#include "model.h"

/* Logits of the last token of tokens[0..n) (vocab floats into logits), computed from
 * scratch at positions 0..n-1. Returns 0, or -1 on a bad argument / out of memory. */
int ref_forward_last(const struct kvr_model *m, const int *tokens, int n, float *logits);

/* Logits at every position: logits is (n, vocab); row p equals
 * ref_forward_last(m, tokens, p + 1, ...), i.e. a full recomputation per position. */
int ref_forward_all(const struct kvr_model *m, const int *tokens, int n, float *logits);

/* Row r of w (any type) as float32, by the types' definitions, written here apart from
 * common/quant.c. */
void ref_dequant_row(const struct kvr_tensor *w, int64_t r, float *out);

/* llama2.c's RoPE at text position pos, in place, over n floats of whole heads of hd
 * (exposed so tests can rotate keys the sink policy stores unrotated). */
void ref_rope(float *vec, int n, int hd, int pos);

#endif /* KVR_TEST_REF_FORWARD_H */
