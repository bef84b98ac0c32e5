/* test_model.c - the two ways of holding weights (mmap of the file, private huge-page
 * copy) give the same model: same config, same bytes in every tensor, same fingerprint;
 * the copy's tensors start aligned; a different model has a different fingerprint. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "model.h"
#include "status.h"

static void same_tensor(const float *a, const float *b, size_t n, const char *what) {
    int same = memcmp(a, b, n * sizeof(float)) == 0;
    if (!same)
        fprintf(stderr, "tensor %s differs between mmap and copy\n", what);
    CHECK(same);
}

int main(void) {
    const char *path = shared_path("models/stories260K.bin");
    struct kvr_model *a = NULL, *b = NULL, *c = NULL;
    REQUIRE(kvr_model_load_mode(path, KVR_WEIGHTS_MMAP, &a) == KVR_OK);
    REQUIRE(kvr_model_load_mode(path, KVR_WEIGHTS_COPY, &b) == KVR_OK);
    const struct kvr_model_config *ca = kvr_model_config(a), *cb = kvr_model_config(b);
    CHECK(memcmp(ca, cb, sizeof *ca) == 0);
    const struct kvr_model_weights *wa = kvr_model_weights(a), *wb = kvr_model_weights(b);
    size_t d = (size_t)ca->dim, h = (size_t)ca->hidden_dim, L = (size_t)ca->n_layers, kv = (size_t)ca->kv_dim;
    same_tensor(wa->token_embedding, wb->token_embedding, (size_t)ca->vocab_size * d, "token_embedding");
    same_tensor(wa->rms_att, wb->rms_att, L * d, "rms_att");
    same_tensor(wa->wq, wb->wq, L * d * d, "wq");
    same_tensor(wa->wk, wb->wk, L * kv * d, "wk");
    same_tensor(wa->wv, wb->wv, L * kv * d, "wv");
    same_tensor(wa->wo, wb->wo, L * d * d, "wo");
    same_tensor(wa->rms_ffn, wb->rms_ffn, L * d, "rms_ffn");
    same_tensor(wa->w1, wb->w1, L * h * d, "w1");
    same_tensor(wa->w2, wb->w2, L * d * h, "w2");
    same_tensor(wa->w3, wb->w3, L * h * d, "w3");
    same_tensor(wa->rms_final, wb->rms_final, d, "rms_final");
    same_tensor(wa->wcls, wb->wcls, (size_t)ca->vocab_size * d, "wcls");
    CHECK_EQ((uintptr_t)wb->token_embedding % 64, 0);
    CHECK_EQ((uintptr_t)wa->token_embedding % 64, 28); /* the file's weights start after the header */
    uint64_t fa = kvr_model_fingerprint(a), fb = kvr_model_fingerprint(b);
    CHECK(fa == fb);
    CHECK(fa != 0);

    /* A different checkpoint (same shape, other weights) prints differently. */
    char tmp[] = "/tmp/kvr_test_model_XXXXXX";
    int fd = mkstemp(tmp);
    REQUIRE(fd >= 0);
    close(fd);
    struct kvr_model_config sc = *ca;
    REQUIRE(kvr_model_write_synthetic(tmp, &sc, 7) == KVR_OK);
    REQUIRE(kvr_model_load_mode(tmp, KVR_WEIGHTS_COPY, &c) == KVR_OK);
    CHECK(kvr_model_fingerprint(c) != fa);
    unlink(tmp);
    kvr_model_free(a);
    kvr_model_free(b);
    kvr_model_free(c);
    CHECK_DONE();
}
