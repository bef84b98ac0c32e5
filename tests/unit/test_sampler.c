/* test_sampler.c - common/sampler.c: greedy is argmax (first among equals), a seed gives
 * the same draws every time, top-p only returns tokens of the nucleus, and the
 * frequencies of temperature sampling match softmax(logits / T). Every random stream is
 * seeded, so the statistical bounds (about 6 sigma wide) cannot flake. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "sampler.h"

#define V 64

/* Test-side deterministic logits in [-4, 4). */
static void make_logits(float *x, int n, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(s >> 40) / (double)(1ull << 24) * 8.0 - 4.0);
    }
}

static int sample(struct kvr_sampler *s, const float *logits, int n, void *scratch) {
    float tmp[V];
    memcpy(tmp, logits, (size_t)n * sizeof *tmp);
    return kvr_sampler_sample(s, tmp, n, scratch);
}

/* softmax(x / t) in double, the test's own. */
static void probs(const float *x, int n, double t, double *p) {
    double mx = (double)x[0], sum = 0;
    for (int i = 1; i < n; i++)
        if ((double)x[i] > mx)
            mx = (double)x[i];
    for (int i = 0; i < n; i++) {
        p[i] = exp(((double)x[i] - mx) / t);
        sum += p[i];
    }
    for (int i = 0; i < n; i++)
        p[i] /= sum;
}

static void test_greedy(void) {
    float x[V];
    struct kvr_sampler s;
    for (int trial = 0; trial < 50; trial++) {
        make_logits(x, V, (uint64_t)trial);
        int best = 0;
        for (int i = 1; i < V; i++)
            if (x[i] > x[best])
                best = i;
        kvr_sampler_init(&s, 0.0f, 0.9f, (uint64_t)trial + 1);
        CHECK_EQ(sample(&s, x, V, NULL), best);
        CHECK_EQ(kvr_argmax(x, V), best);
    }
    /* Ties: the first of equals, as llama2.c. */
    float t[5] = {1, 3, 2, 3, 3};
    kvr_sampler_init(&s, 0.0f, 1.0f, 1);
    CHECK_EQ(sample(&s, t, 5, NULL), 1);
    /* Greedy leaves the logits alone. */
    float u[3] = {0.5f, -1, 2};
    CHECK_EQ(kvr_sampler_sample(&s, u, 3, NULL), 2);
    CHECK(u[0] == 0.5f && u[1] == -1.0f && u[2] == 2.0f);
}

static void test_reproducible(void) {
    float x[V];
    make_logits(x, V, 7);
    int scratch[2 * V];
    for (int mode = 0; mode < 2; mode++) {
        float top_p = mode ? 0.9f : 1.0f;
        struct kvr_sampler a, b, c;
        kvr_sampler_init(&a, 1.0f, top_p, 12345);
        kvr_sampler_init(&b, 1.0f, top_p, 12345);
        kvr_sampler_init(&c, 1.0f, top_p, 54321);
        int same_ab = 0, same_ac = 0;
        for (int i = 0; i < 2000; i++) {
            int ta = sample(&a, x, V, scratch), tb = sample(&b, x, V, scratch);
            int tc = sample(&c, x, V, scratch);
            same_ab += ta == tb;
            same_ac += ta == tc;
        }
        fprintf(stderr,
                "seed reproducibility (top_p %.1f): same seed %d/2000 equal, other seed %d/2000\n",
                (double)top_p, same_ab, same_ac);
        CHECK_EQ(same_ab, 2000);
        CHECK(same_ac < 1000); /* a different seed gives a different stream */
    }
    /* Seed 0 is replaced, never an all-zero xorshift state. */
    struct kvr_sampler z;
    kvr_sampler_init(&z, 1.0f, 1.0f, 0);
    CHECK(z.rng != 0);
    int seen[V] = {0}, distinct = 0;
    for (int i = 0; i < 500; i++)
        seen[sample(&z, x, V, NULL)]++;
    for (int i = 0; i < V; i++)
        distinct += seen[i] > 0;
    CHECK(distinct > 5);
}

/* The draws follow llama2.c's random stream: xorshift64* with 24-bit floats, so a seed
 * means the same thing as run.c's -s. With two equal logits, token 0 iff coin < 0.5. */
static void test_llama2c_stream(void) {
    uint64_t state = 2024;
    struct kvr_sampler s;
    kvr_sampler_init(&s, 1.0f, 1.0f, 2024);
    const float two[2] = {0.25f, 0.25f};
    int mismatches = 0;
    for (int i = 0; i < 1000; i++) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        uint32_t u = (uint32_t)((state * 0x2545F4914F6CDD1Dull) >> 32);
        float coin = (float)(u >> 8) / 16777216.0f;
        int want = coin < 0.5f ? 0 : 1;
        mismatches += sample(&s, two, 2, NULL) != want;
    }
    CHECK_EQ(mismatches, 0);
}

static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void test_top_p(void) {
    float x[V];
    double p[V], sorted[V];
    int scratch[2 * V];
    static const float tops[] = {0.1f, 0.5f, 0.8f, 0.9f, 0.95f};
    for (int trial = 0; trial < 10; trial++) {
        make_logits(x, V, 100 + (uint64_t)trial);
        for (size_t ti = 0; ti < sizeof tops / sizeof tops[0]; ti++) {
            float top_p = tops[ti], temp = trial % 2 ? 0.7f : 1.0f;
            probs(x, V, (double)temp, p);
            /* The nucleus: the most probable tokens, until their mass first exceeds top_p. */
            memcpy(sorted, p, sizeof sorted);
            qsort(sorted, V, sizeof *sorted, cmp_desc);
            double cum = 0, threshold = sorted[V - 1];
            for (int i = 0; i < V; i++) {
                cum += sorted[i];
                if (cum > (double)top_p) {
                    threshold = sorted[i];
                    break;
                }
            }
            struct kvr_sampler s;
            kvr_sampler_init(&s, temp, top_p, 1000 + (uint64_t)trial);
            int outside = 0, hits[V] = {0};
            for (int i = 0; i < 3000; i++) {
                int t = sample(&s, x, V, scratch);
                REQUIRE(t >= 0 && t < V);
                hits[t]++;
                /* Relative slack: float vs double probabilities at the boundary. */
                if (p[t] < threshold * (1 - 1e-4)) {
                    if (outside++ < 3)
                        fprintf(stderr,
                                "  top_p %.2f: token %d (p %.5f) is outside the nucleus "
                                "(smallest member p %.5f)\n",
                                (double)top_p, t, p[t], threshold);
                }
            }
            CHECK_EQ(outside, 0);
            /* The most probable token is drawn (top_p 0.1: it may be the whole nucleus). */
            int best = kvr_argmax(x, V);
            CHECK(hits[best] > 0);
        }
    }
}

/* Frequencies of 200000 draws vs softmax(logits / T): each within 6 standard deviations
 * (sqrt(p (1-p) / N) <= 0.0012) plus 1e-3 for float rounding of the CDF. */
static void test_frequencies(void) {
    enum { N = 200000, K = 8 };
    static const float logits[K] = {2.0f, 1.0f, 0.5f, 0.0f, -0.5f, -1.0f, 1.5f, -3.0f};
    static const float temps[] = {1.0f, 0.6f, 1.7f};
    for (size_t ti = 0; ti < sizeof temps / sizeof temps[0]; ti++) {
        double p[K];
        probs(logits, K, (double)temps[ti], p);
        struct kvr_sampler s;
        kvr_sampler_init(&s, temps[ti], 1.0f, 4242 + ti);
        int counts[K] = {0};
        for (int i = 0; i < N; i++)
            counts[sample(&s, logits, K, NULL)]++;
        double worst = 0;
        int bad = 0;
        for (int k = 0; k < K; k++) {
            double f = (double)counts[k] / N, sd = sqrt(p[k] * (1 - p[k]) / N);
            double dev = fabs(f - p[k]);
            if (dev / (6 * sd + 1e-3) > worst)
                worst = dev / (6 * sd + 1e-3);
            if (dev > 6 * sd + 1e-3) {
                fprintf(stderr, "  T=%.1f token %d: frequency %.5f vs softmax %.5f (bound %.5f)\n",
                        (double)temps[ti], k, f, p[k], 6 * sd + 1e-3);
                bad++;
            }
        }
        fprintf(stderr, "temperature %.1f: %d draws, worst deviation %.2f of the bound\n",
                (double)temps[ti], N, worst);
        CHECK_EQ(bad, 0);
    }
}

int main(void) {
    test_greedy();
    test_reproducible();
    test_llama2c_stream();
    test_top_p();
    test_frequencies();
    CHECK_DONE();
}
