/* fuzz_kv_wire.c - libFuzzer harness for the KV wire decoder (kvr_wire_peek and
 * kvr_wire_decode). Built only with -DKVR_FUZZ=ON and clang; scripts/fuzz.sh builds and
 * runs it on seeds from fuzz_kv_wire_seeds.c.
 *
 * Input: one mode byte, then the message. Mode bit 0 recomputes the header checksum and
 * the payload checksum (inflating a compressed payload with plain zstd to learn it), so
 * mutations reach the checks and the unpacking behind the checksums instead of dying at
 * them; bit 1 makes the decoder expect a fingerprint (the message's own or, with bit 2,
 * another); bit 3 halves the room the caller offers. Oracles beyond the sanitizers: peek
 * and decode agree on the header, and a decoded block re-encodes and decodes to the same
 * values. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#include "kv_wire.h"
#include "log.h"
#include "model.h"
#include "status.h"

#define MAX_FLOATS 4096 /* floats of K per block the harness's codec takes */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct kvr_wire_codec *codec;
static float *k, *v, *k2, *v2;
static uint8_t *msg, *msg2, *inflated;
static size_t msg_cap;

static void quiet(void *ud, int level, const char *line) {
    (void)ud;
    (void)level;
    (void)line;
}

static void setup(void) {
    kvr_log_set_sink(quiet, NULL);
    kvr_log_set_level(KVR_LOG_LEVEL_DEBUG); /* format every line: hostile bytes reach them */
    msg_cap = 1 << 17;
    if (kvr_wire_codec_create(MAX_FLOATS, &codec) != KVR_OK)
        abort();
    k = malloc(MAX_FLOATS * sizeof *k);
    v = malloc(MAX_FLOATS * sizeof *v);
    k2 = malloc(MAX_FLOATS * sizeof *k2);
    v2 = malloc(MAX_FLOATS * sizeof *v2);
    msg = malloc(msg_cap);
    msg2 = malloc(msg_cap);
    inflated = malloc(2 * MAX_FLOATS * 4);
    if (!k || !v || !k2 || !v2 || !msg || !msg2 || !inflated)
        abort();
}

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void wr32(uint8_t *p, uint32_t x) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(x >> (8 * i));
}

static void wr64(uint8_t *p, uint64_t x) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(x >> (8 * i));
}

/* Offsets from docs/KV_WIRE_FORMAT.md. */
static void fix_checksums(uint8_t *m, size_t len) {
    if (len < KVR_WIRE_HEADER_NBYTES)
        return;
    size_t raw = rd32(m + 28), pay = rd32(m + 32);
    const uint8_t *payload = m + KVR_WIRE_HEADER_NBYTES;
    size_t avail = len - KVR_WIRE_HEADER_NBYTES;
    if (pay <= avail && raw <= 2 * MAX_FLOATS * 4) {
        if (!(m[6] & 1) && pay == raw) {
            wr64(m + 52, kvr_wire_hash(payload, raw, KVR_WIRE_PAYLOAD_SEED));
        } else if (m[6] & 1) {
            size_t r = ZSTD_decompress(inflated, raw, payload, pay);
            if (!ZSTD_isError(r) && r == raw)
                wr64(m + 52, kvr_wire_hash(inflated, raw, KVR_WIRE_PAYLOAD_SEED));
        }
    }
    wr32(m + 60, (uint32_t)kvr_wire_hash(m, 60, KVR_WIRE_HEADER_SEED));
}

/* Bit-equal values; with nan_ok, two NaNs also count as equal. */
static int same(const float *a, const float *b, size_t n, int nan_ok) {
    for (size_t i = 0; i < n; i++) {
        if (memcmp(&a[i], &b[i], 4) == 0 || (nan_ok && a[i] != a[i] && b[i] != b[i]))
            continue;
        return 0;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!codec)
        setup();
    if (size < 1 || size - 1 > msg_cap)
        return 0;
    unsigned mode = data[0];
    size_t len = size - 1;
    memcpy(msg, data + 1, len);
    if (mode & 1)
        fix_checksums(msg, len);
    uint64_t fp = 0;
    if ((mode & 2) && len >= 44) {
        fp = (uint64_t)rd32(msg + 36) | (uint64_t)rd32(msg + 40) << 32;
        if (mode & 4)
            fp ^= 1;
        if (!fp)
            fp = 1;
    }
    /* Decode into exactly as much room as the caller says it has: cap_floats varies. */
    size_t cap_floats = (mode & 8) ? MAX_FLOATS / 2 : MAX_FLOATS;

    struct kvr_wire_block pb, db;
    int prc = kvr_wire_peek(msg, len, &pb);
    int drc = kvr_wire_decode(codec, msg, len, fp, &db, k, v, cap_floats);
    /* Header errors are the same for both; a message peek accepts decode may still refuse
     * (fingerprint, room, payload), never the other way round. */
    if (prc != KVR_OK && drc != prc)
        abort();
    if (drc == KVR_OK && (prc != KVR_OK || memcmp(&pb, &db, sizeof pb) != 0))
        abort();
    if (drc != KVR_OK)
        return 0;

    size_t n =
        (size_t)db.n_layers * (size_t)db.n_tokens * (size_t)db.n_kv_heads * (size_t)db.head_dim;
    if (n > cap_floats)
        abort();
    struct kvr_wire_opts o = {.dtype = db.dtype, .transform = db.transform, .level = db.level};
    if (o.level < KVR_WIRE_LEVEL_MIN || o.level > KVR_WIRE_LEVEL_MAX)
        o.level = 0;
    size_t len2 = 0;
    if (kvr_wire_max_nbytes(&db) > msg_cap)
        return 0;
    if (kvr_wire_encode(codec, &o, &db, k, v, msg2, msg_cap, &len2) != KVR_OK)
        abort();
    struct kvr_wire_block db2;
    if (kvr_wire_decode(codec, msg2, len2, fp, &db2, k2, v2, cap_floats) != KVR_OK)
        abort();
    int nan_ok = db.dtype != KVR_WIRE_F32; /* 16-bit NaNs come back canonical */
    if (!same(k, k2, n, nan_ok) || !same(v, v2, n, nan_ok))
        abort();
    return 0;
}
