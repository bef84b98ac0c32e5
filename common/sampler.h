/* sampler.h - next-token choice as llama2.c's sampler: greedy at temperature 0, else
 * softmax(logits / temperature) sampled whole or from the top-p nucleus, with a seeded
 * xorshift generator so runs are reproducible. The state is a few words and can travel
 * with a sequence between nodes. */
#ifndef KVR_SAMPLER_H
#define KVR_SAMPLER_H

#include <stdint.h>

struct kvr_sampler {
    float temperature; /* 0 = greedy */
    float top_p;       /* in (0, 1) enables nucleus sampling; else the full distribution */
    uint64_t rng;      /* xorshift64* state; never 0 */
};

/* Initializes s; seed 0 is replaced by a fixed non-zero constant. */
void kvr_sampler_init(struct kvr_sampler *s, float temperature, float top_p, uint64_t seed);

/* Picks a token from logits (vocab_size floats; modified in place: scaled and
 * softmaxed unless greedy). scratch must hold 2*vocab_size ints when top_p is active
 * (may be NULL otherwise). Returns the token id. */
int kvr_sampler_sample(struct kvr_sampler *s, float *logits, int vocab_size, void *scratch);

/* Index of the largest logit (first among equals). */
int kvr_argmax(const float *x, int n);

#endif /* KVR_SAMPLER_H */
