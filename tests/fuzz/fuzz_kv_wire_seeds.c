/* fuzz_kv_wire_seeds.c - writes a seed corpus of valid KV wire messages for
 * fuzz_kv_wire (each file: the harness's mode byte, then one message): every value type
 * and transform, stored raw and compressed, one and several layers, partial blocks.
 * Usage: fuzz_kv_wire_seeds DIR. Generated at run time so no binaries live in the repo. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv_wire.h"
#include "status.h"

static uint64_t rng = 0x5eed;

static uint64_t next(void) {
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    enum { MAXF = 2048 };
    static float k[MAXF], v[MAXF];
    static uint8_t msg[64 + 2 * MAXF * 4 + 1];
    struct kvr_wire_codec *c = NULL;
    if (kvr_wire_codec_create(MAXF, &c) != KVR_OK)
        return 1;
    static const struct {
        int n_layers, n_tokens, n_kv_heads, head_dim;
    } shapes[] = {{1, 16, 4, 8}, {1, 5, 4, 8}, {2, 3, 1, 4}, {1, 1, 1, 1}, {3, 16, 2, 16}};
    int n_files = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        struct kvr_wire_block b = {.fingerprint = 0xabcdef0123456789ull,
                                   .seq_id = 1000 + s,
                                   .layer_begin = (int)s,
                                   .n_layers = shapes[s].n_layers,
                                   .token_begin = 16 * (int)s,
                                   .n_tokens = shapes[s].n_tokens,
                                   .n_kv_heads = shapes[s].n_kv_heads,
                                   .head_dim = shapes[s].head_dim};
        size_t n = (size_t)b.n_layers * b.n_tokens * b.n_kv_heads * b.head_dim;
        for (int data = 0; data < 2; data++) { /* smooth (compresses), random words (raw) */
            for (size_t i = 0; i < n; i++) {
                if (data == 0) {
                    k[i] = (float)((int)(next() % 2001) - 1000) * 1e-3f * (float)(1 + i % 7);
                    v[i] = (float)((int)(next() % 2001) - 1000) * 1e-4f;
                } else {
                    uint32_t a = (uint32_t)next(), bb = (uint32_t)next();
                    memcpy(&k[i], &a, 4);
                    memcpy(&v[i], &bb, 4);
                }
            }
            for (int dt = 0; dt < 3; dt++)
                for (int tf = 0; tf < 2; tf++) {
                    struct kvr_wire_opts o = {
                        .dtype = dt, .transform = tf, .level = 1 + 2 * (dt + tf)};
                    size_t len = 0;
                    if (kvr_wire_encode(c, &o, &b, k, v, msg + 1, sizeof msg - 1, &len) != KVR_OK) {
                        fprintf(stderr, "cannot encode seed %d\n", n_files);
                        return 1;
                    }
                    msg[0] = (uint8_t)(n_files % 16); /* vary the harness's mode */
                    char path[4096];
                    snprintf(path, sizeof path, "%s/seed-%02d", argv[1], n_files++);
                    FILE *f = fopen(path, "wb");
                    if (!f || fwrite(msg, 1, len + 1, f) != len + 1) {
                        fprintf(stderr, "cannot write %s\n", path);
                        return 1;
                    }
                    fclose(f);
                }
        }
    }
    kvr_wire_codec_free(c);
    printf("%d seeds in %s\n", n_files, argv[1]);
    return 0;
}
