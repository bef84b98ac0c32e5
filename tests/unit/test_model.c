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

static void same_tensor(const void *a, const void *b, size_t n, const char *what) {
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
    size_t d = (size_t)ca->dim, h = (size_t)ca->hidden_dim, kv = (size_t)ca->kv_dim;
    same_tensor(wa->token_embedding.data, wb->token_embedding.data, (size_t)ca->vocab_size * d, "token_embedding");
    for (int l = 0; l < ca->n_layers; l++) {
        const struct kvr_layer_weights *la = &wa->layers[l], *lb = &wb->layers[l];
        same_tensor(la->rms_att, lb->rms_att, d, "rms_att");
        same_tensor(la->wq.data, lb->wq.data, d * d, "wq");
        same_tensor(la->wk.data, lb->wk.data, kv * d, "wk");
        same_tensor(la->wv.data, lb->wv.data, kv * d, "wv");
        same_tensor(la->wo.data, lb->wo.data, d * d, "wo");
        same_tensor(la->rms_ffn, lb->rms_ffn, d, "rms_ffn");
        same_tensor(la->w1.data, lb->w1.data, h * d, "w1");
        same_tensor(la->w2.data, lb->w2.data, d * h, "w2");
        same_tensor(la->w3.data, lb->w3.data, h * d, "w3");
    }
    same_tensor(wa->rms_final, wb->rms_final, d, "rms_final");
    same_tensor(wa->wcls.data, wb->wcls.data, (size_t)ca->vocab_size * d, "wcls");
    CHECK_EQ((uintptr_t)wb->token_embedding.data % 64, 0);
    CHECK_EQ((uintptr_t)wa->token_embedding.data % 64, 28); /* the file's weights start after the header */
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
