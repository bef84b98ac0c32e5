/* half.h - float32 <-> float16 / bfloat16 conversions for the KV wire format.
 * Round to nearest, ties to even; finite values too large for the narrow type saturate
 * to its largest finite value instead of becoming infinity (a K or V of +-inf would turn
 * attention into NaN); NaN stays NaN (quiet), +-inf stays +-inf. Pure bit arithmetic
 * apart from one float add in the f16 subnormal path, which relies on the default
 * rounding mode and on subnormals being kept (no -ffast-math, no FTZ/DAZ).
 * Error bounds (docs/KV_WIRE_FORMAT.md, tested in tests/unit/test_kv_wire.c):
 *   f16:  |y - x| <= max(2^-11 |x|, 2^-25) for |x| < 65520; larger saturate to +-65504.
 *   bf16: |y - x| <= max(2^-8 |x|, 2^-134) for |x| below the bf16 overflow threshold. */
#ifndef KVR_HALF_H
#define KVR_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint32_t kvr_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float kvr_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE binary16, round to nearest even, saturating. */
static inline uint16_t kvr_f32_to_f16(float f) {
    uint32_t x = kvr_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf, or NaN made quiet */
        return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (ax >= 0x477ff000u) /* >= 65520 rounds to inf: saturate to 65504 */
        return (uint16_t)(sign | 0x7bffu);
    if (ax >= 0x38800000u) { /* >= 2^-14: a normal half */
        /* Round the 13 dropped mantissa bits to even, then move the exponent bias from
         * 127 to 15 ((127 - 15) << 23); a carry out of the mantissa bumps the exponent,
         * which is the right result. */
        uint32_t r = ax + 0x0fffu + ((ax >> 13) & 1u);
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    /* Below 2^-14: a half subnormal is a multiple of 2^-24. Adding 0.5f (whose ulp is
     * 2^-24) lets the FPU round |x| to that grid, ties to even; the mantissa is then the
     * half's bit pattern (1024 = the smallest normal, also right). */
    float t = kvr_bits_f32(ax) + 0.5f;
    return (uint16_t)(sign | (kvr_f32_bits(t) - 0x3f000000u));
}

/* Exact. */
static inline float kvr_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) /* inf / NaN (payload kept) */
        return kvr_bits_f32(sign | 0x7f800000u | (m << 13));
    if (e != 0)
        return kvr_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    /* Zero or subnormal: m * 2^-24, exact in float32. */
    float v = (float)m * 5.9604644775390625e-8f;
    return kvr_bits_f32(sign | kvr_f32_bits(v));
}

/* bfloat16 (the top half of a float32), round to nearest even, saturating. */
static inline uint16_t kvr_f32_to_bf16(float f) {
    uint32_t x = kvr_f32_bits(f);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: keep it NaN even if its payload is in the low half */
        return (uint16_t)((x >> 16) | 0x0040u);
    uint32_t r = x + 0x7fffu + ((x >> 16) & 1u);
    uint16_t h = (uint16_t)(r >> 16);
    if ((h & 0x7fffu) == 0x7f80u && ax != 0x7f800000u) /* finite rounded up to inf */
        h = (uint16_t)((h & 0x8000u) | 0x7f7fu);
    return h;
}

/* Exact. */
static inline float kvr_bf16_to_f32(uint16_t h) {
    return kvr_bits_f32((uint32_t)h << 16);
}

#endif /* KVR_HALF_H */
