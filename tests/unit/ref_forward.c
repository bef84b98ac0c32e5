/* ref_forward.c - the naive reference forward pass of the engine's tests (ref_forward.h).
 * Written from the llama2.c equations, sharing no code with common/transformer.c: plain
 * loops, no BLAS, no cache; each call recomputes every token of the prefix. */
#include "ref_forward.h"

#include <math.h>
#include <stdint.h>
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

/* IEEE binary16 bits as a float, by the definition (sign, 5-bit exponent biased 15,
 * 10-bit fraction), not by the engine's bit tricks. */
static float f16_value(uint16_t h) {
    int e = (h >> 10) & 0x1f, f = h & 0x3ff;
    double v = e == 0 ? ldexp(f, -24) : e == 31 ? (f ? (double)NAN : (double)INFINITY) : ldexp(1024 + f, e - 25);
    return (float)((h & 0x8000) ? -v : v);
}

void ref_dequant_row(const struct kvr_tensor *w, int64_t r, float *out) {
    const unsigned char *row = (const unsigned char *)w->data + (size_t)r * w->row_nbytes;
    for (int64_t i = 0; i < w->cols; i++) {
        uint16_t u;
        switch (w->type) {
        case KVR_DTYPE_F32:
            memcpy(&out[i], row + 4 * i, 4);
            break;
        case KVR_DTYPE_F16:
            memcpy(&u, row + 2 * i, 2);
            out[i] = f16_value(u);
            break;
        case KVR_DTYPE_BF16: {
            memcpy(&u, row + 2 * i, 2);
            uint32_t bits = (uint32_t)u << 16;
            memcpy(&out[i], &bits, 4);
            break;
        }
        case KVR_DTYPE_Q8_0: {
            const unsigned char *blk = row + (size_t)(i / 32) * 34; /* f16 scale, 32 int8 */
            memcpy(&u, blk, 2);
            out[i] = (float)(int8_t)blk[2 + i % 32] * f16_value(u);
            break;
        }
        }
    }
}

/* out (rows) = W (rows, cols) . x (cols), W dequantized row by row (no rounding of x). */
static void matvec(float *out, const struct kvr_tensor *w, const float *x, int rows, int cols) {
    float *row = malloc((size_t)cols * sizeof *row);
    if (!row)
        abort();
    for (int r = 0; r < rows; r++) {
        ref_dequant_row(w, r, row);
        out[r] = (float)dot(row, x, cols);
    }
    free(row);
}

static double norm_eps = 1e-5;

static void rmsnorm(float *out, const float *x, const float *weight, int n) {
    double ss = dot(x, x, n) / n + norm_eps;
    float scale = (float)(1.0 / sqrt(ss));
    for (int i = 0; i < n; i++)
        out[i] = weight[i] * (scale * x[i]);
}

/* llama2.c's RoPE: pair (i, i+1) of every head turns by pos * 10000^(-(i % hd) / hd),
 * computed in float as run.c does. Rotates n floats of vec (whole heads). */
static float rope_theta = 10000.0f;
static int rope_dims; /* 0: all of the head */

void ref_rope(float *vec, int n, int hd, int pos) {
    int n_rot = rope_dims ? rope_dims : hd;
    for (int i = 0; i < n; i += 2) {
        int hi = i % hd;
        if (hi >= n_rot)
            continue;
        float freq = 1.0f / powf(rope_theta, (float)hi / (float)n_rot);
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
    norm_eps = (double)c->norm_eps;
    rope_theta = c->rope_theta;
    rope_dims = c->n_rot;
    for (int t = 0; t < n; t++)
        ref_dequant_row(&w->token_embedding, tokens[t], x + (size_t)t * d);

    for (int l = 0; l < c->n_layers; l++) {
        const struct kvr_layer_weights *lw = &w->layers[l];
        const struct kvr_tensor *wq = &lw->wq, *wo = &lw->wo, *wk = &lw->wk, *wv = &lw->wv;
        const struct kvr_tensor *w1 = &lw->w1, *w3 = &lw->w3, *w2 = &lw->w2;
        /* K and V of every token, recomputed from this layer's input. */
        for (int t = 0; t < n; t++) {
            rmsnorm(xb, x + (size_t)t * d, lw->rms_att, d);
            matvec(k + (size_t)t * kvd, wk, xb, kvd, d);
            matvec(v + (size_t)t * kvd, wv, xb, kvd, d);
            ref_rope(k + (size_t)t * kvd, kvd, hd, t);
        }
        /* The last layer only matters for the last token. */
        int t0 = l == c->n_layers - 1 ? n - 1 : 0;
        for (int t = t0; t < n; t++) {
            rmsnorm(xb, x + (size_t)t * d, lw->rms_att, d);
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
            rmsnorm(xb, xt, lw->rms_ffn, d);
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
    matvec(logits, &w->wcls, xb, c->vocab_size, d);
    rc = 0;
out:
    norm_eps = 1e-5;
    rope_theta = 10000.0f;
    rope_dims = 0;
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
