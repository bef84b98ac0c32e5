/* ref_forward.c - the naive reference forward pass of the engine's tests (ref_forward.h).
 * Written from the llama2.c equations, sharing no code with common/transformer.c: plain
 * loops, no BLAS, no cache; each call recomputes every token of the prefix. */
#include "ref_forward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* sum a[i] * b[i] in double. Eight lane accumulators (summed at the end) only so that
 * the compiler can vectorize the loop without reassociating anything. */
static double dot(const float *a, const float *b, int n) {
    double acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += (double)a[i + j] * (double)b[i + j];
    for (; i < n; i++)
        acc[0] += (double)a[i] * (double)b[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* out (rows) = W (rows, cols) . x (cols) */
static void matvec(float *out, const float *w, const float *x, int rows, int cols) {
    for (int r = 0; r < rows; r++)
        out[r] = (float)dot(w + (size_t)r * (size_t)cols, x, cols);
}

static void rmsnorm(float *out, const float *x, const float *weight, int n) {
    double ss = dot(x, x, n) / n + 1e-5;
    float scale = (float)(1.0 / sqrt(ss));
    for (int i = 0; i < n; i++)
        out[i] = weight[i] * (scale * x[i]);
}

/* llama2.c's RoPE: pair (i, i+1) of every head turns by pos * 10000^(-(i % hd) / hd),
 * computed in float as run.c does. Rotates n floats of vec (whole heads). */
void ref_rope(float *vec, int n, int hd, int pos) {
    for (int i = 0; i < n; i += 2) {
        int hi = i % hd;
        float freq = 1.0f / powf(10000.0f, (float)hi / (float)hd);
        float angle = (float)pos * freq;
        float c = cosf(angle), s = sinf(angle);
        float a = vec[i], b = vec[i + 1];
        vec[i] = a * c - b * s;
        vec[i + 1] = a * s + b * c;
    }
}

int ref_forward_last(const struct kvr_model *m, const int *tokens, int n, float *logits) {
    const struct kvr_model_config *c = kvr_model_config(m);
    const struct kvr_model_weights *w = kvr_model_weights(m);
    if (n < 1 || !tokens || !logits)
        return -1;
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
            return -1;
    int d = c->dim, hd = c->dim / c->n_heads, kvd = c->n_kv_heads * hd, hid = c->hidden_dim;
    int group = c->n_heads / c->n_kv_heads;
    size_t N = (size_t)n;
    float *x = malloc(N * (size_t)d * sizeof *x);             /* (n, dim) residual stream */
    float *k = malloc(N * (size_t)kvd * sizeof *k);           /* (n, kv_dim) this layer's keys */
    float *v = malloc(N * (size_t)kvd * sizeof *v);           /* (n, kv_dim) this layer's values */
    float *att_out = malloc(N * (size_t)d * sizeof *att_out); /* (n, dim) */
    float *xb = malloc((size_t)d * sizeof *xb);
    float *q = malloc((size_t)d * sizeof *q);
    float *tmp = malloc((size_t)d * sizeof *tmp);
    float *h1 = malloc((size_t)hid * sizeof *h1);
    float *h3 = malloc((size_t)hid * sizeof *h3);
    double *sc = malloc(N * sizeof *sc);
    double *acc = malloc((size_t)hd * sizeof *acc);
    int rc = -1;
    if (!x || !k || !v || !att_out || !xb || !q || !tmp || !h1 || !h3 || !sc || !acc)
        goto out;
    for (int t = 0; t < n; t++)
        memcpy(x + (size_t)t * d, w->token_embedding + (size_t)tokens[t] * d,
               (size_t)d * sizeof *x);

    for (int l = 0; l < c->n_layers; l++) {
        const float *wq = w->wq + (size_t)l * d * d, *wo = w->wo + (size_t)l * d * d;
        const float *wk = w->wk + (size_t)l * kvd * d, *wv = w->wv + (size_t)l * kvd * d;
        const float *w1 = w->w1 + (size_t)l * hid * d, *w3 = w->w3 + (size_t)l * hid * d;
        const float *w2 = w->w2 + (size_t)l * d * hid;
        /* K and V of every token, recomputed from this layer's input. */
        for (int t = 0; t < n; t++) {
            rmsnorm(xb, x + (size_t)t * d, w->rms_att + (size_t)l * d, d);
            matvec(k + (size_t)t * kvd, wk, xb, kvd, d);
            matvec(v + (size_t)t * kvd, wv, xb, kvd, d);
            ref_rope(k + (size_t)t * kvd, kvd, hd, t);
        }
        /* The last layer only matters for the last token. */
        int t0 = l == c->n_layers - 1 ? n - 1 : 0;
        for (int t = t0; t < n; t++) {
            rmsnorm(xb, x + (size_t)t * d, w->rms_att + (size_t)l * d, d);
            matvec(q, wq, xb, d, d);
            ref_rope(q, d, hd, t);
            for (int h = 0; h < c->n_heads; h++) {
                int g = h / group;
                const float *qh = q + (size_t)h * hd;
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s <= t; s++) {
                    sc[s] = dot(qh, k + (size_t)s * kvd + (size_t)g * hd, hd) / sqrt((double)hd);
                    if (sc[s] > mx)
                        mx = sc[s];
                }
                for (int s = 0; s <= t; s++) {
                    sc[s] = exp(sc[s] - mx);
                    sum += sc[s];
                }
                for (int j = 0; j < hd; j++)
                    acc[j] = 0;
                for (int s = 0; s <= t; s++) {
                    const float *vs = v + (size_t)s * kvd + (size_t)g * hd;
                    for (int j = 0; j < hd; j++)
                        acc[j] += sc[s] / sum * (double)vs[j];
                }
                for (int j = 0; j < hd; j++)
                    att_out[(size_t)t * d + (size_t)h * hd + (size_t)j] = (float)acc[j];
            }
        }
        /* Output projection, residual, SwiGLU FFN, residual: token by token. */
        for (int t = t0; t < n; t++) {
            float *xt = x + (size_t)t * d;
            matvec(tmp, wo, att_out + (size_t)t * d, d, d);
            for (int i = 0; i < d; i++)
                xt[i] += tmp[i];
            rmsnorm(xb, xt, w->rms_ffn + (size_t)l * d, d);
            matvec(h1, w1, xb, hid, d);
            matvec(h3, w3, xb, hid, d);
            for (int i = 0; i < hid; i++) {
                double a = h1[i];
                h1[i] = (float)(a / (1.0 + exp(-a)) * (double)h3[i]);
            }
            matvec(tmp, w2, h1, d, hid);
            for (int i = 0; i < d; i++)
                xt[i] += tmp[i];
        }
    }
    rmsnorm(xb, x + (size_t)(n - 1) * d, w->rms_final, d);
    matvec(logits, w->wcls, xb, c->vocab_size, d);
    rc = 0;
out:
    free(x);
    free(k);
    free(v);
    free(att_out);
    free(xb);
    free(q);
    free(tmp);
    free(h1);
    free(h3);
    free(sc);
    free(acc);
    return rc;
}

int ref_forward_all(const struct kvr_model *m, const int *tokens, int n, float *logits) {
    int vocab = kvr_model_config(m)->vocab_size;
    for (int p = 0; p < n; p++)
        if (ref_forward_last(m, tokens, p + 1, logits + (size_t)p * (size_t)vocab) != 0)
            return -1;
    return 0;
}
