/* sampler.c - greedy, temperature and top-p sampling with llama2.c's random stream
 * (xorshift64*, 24-bit floats) so a seed means the same thing here and in run.c. */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>

void kvr_sampler_init(struct kvr_sampler *s, float temperature, float top_p, uint64_t seed) {
    s->temperature = temperature;
    s->top_p = top_p;
    s->rng = seed ? seed : 0x2545F4914F6CDD1Dull;
}

static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(uint64_t *state) { return (float)(random_u32(state) >> 8) / 16777216.0f; }

int kvr_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* In-place softmax over n floats, scalar exactly as llama2.c's (subtract the max, exp,
 * normalize), so that sampled streams match its run; the forward pass has its own
 * vectorized one. */
static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max)
            max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] /= sum;
}

static int sample_mult(const float *p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf)
            return i;
    }
    return n - 1; /* rounding */
}

struct prob_index {
    float prob;
    int index;
};

static int cmp_prob_desc(const void *a, const void *b) {
    const struct prob_index *x = a, *y = b;
    if (x->prob > y->prob)
        return -1;
    if (x->prob < y->prob)
        return 1;
    return 0;
}

/* Smallest set of tokens whose probabilities exceed top_p, sampled by coin. Tokens
 * below (1 - top_p) / (n - 1) cannot be in the nucleus and are skipped before sorting. */
static int sample_topp(const float *p, int n, float top_p, struct prob_index *pi, float coin) {
    const float cutoff = (1.0f - top_p) / (float)(n - 1);
    int n0 = 0;
    for (int i = 0; i < n; i++)
        if (p[i] >= cutoff)
            pi[n0++] = (struct prob_index){p[i], i};
    if (n0 == 0)
        return kvr_argmax(p, n);
    qsort(pi, (size_t)n0, sizeof *pi, cmp_prob_desc);
    float cum = 0.0f;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cum += pi[i].prob;
        if (cum > top_p) {
            last = i;
            break;
        }
    }
    float r = coin * cum;
    float cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += pi[i].prob;
        if (r < cdf)
            return pi[i].index;
    }
    return pi[last].index;
}

int kvr_sampler_sample(struct kvr_sampler *s, float *logits, int vocab_size, void *scratch) {
    if (s->temperature == 0.0f)
        return kvr_argmax(logits, vocab_size);
    for (int i = 0; i < vocab_size; i++)
        logits[i] /= s->temperature;
    softmax(logits, vocab_size);
    float coin = random_f32(&s->rng);
    if (s->top_p <= 0.0f || s->top_p >= 1.0f || !scratch || vocab_size < 2)
        return sample_mult(logits, vocab_size, coin);
    return sample_topp(logits, vocab_size, s->top_p, scratch, coin);
}
