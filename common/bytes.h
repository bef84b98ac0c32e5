/* bytes.h - explicit little-endian encoding of message fields (no struct memcpy, no
 * padding on the wire). A reader never reads past its end: a short read sets err and
 * returns zeros, so a parser checks err once at the end. */
#ifndef KVR_BYTES_H
#define KVR_BYTES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct kvr_wbuf {
    unsigned char *p; /* caller-owned storage; NULL: only count bytes into len */
    size_t cap;
    size_t len;
    int err;          /* 1 once a write did not fit */
};

struct kvr_rbuf {
    const unsigned char *p;
    size_t len;
    size_t off;
    int err;          /* 1 once a read ran past the end */
};

static inline void kvr_w_bytes(struct kvr_wbuf *w, const void *src, size_t n) {
    if (n == 0)
        return;
    if (!w->p) { /* measuring: count only */
        w->len += n;
        return;
    }
    if (w->err || n > w->cap - w->len) {
        w->err = 1;
        return;
    }
    memcpy(w->p + w->len, src, n);
    w->len += n;
}

static inline void kvr_w_u16(struct kvr_wbuf *w, uint16_t v) {
    unsigned char b[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    kvr_w_bytes(w, b, 2);
}

static inline void kvr_w_u32(struct kvr_wbuf *w, uint32_t v) {
    unsigned char b[4];
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    kvr_w_bytes(w, b, 4);
}

static inline void kvr_w_u64(struct kvr_wbuf *w, uint64_t v) {
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    kvr_w_bytes(w, b, 8);
}

static inline void kvr_w_i32(struct kvr_wbuf *w, int32_t v) { kvr_w_u32(w, (uint32_t)v); }

static inline void kvr_w_f32(struct kvr_wbuf *w, float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    kvr_w_u32(w, u);
}

static inline void kvr_w_f64(struct kvr_wbuf *w, double v) {
    uint64_t u;
    memcpy(&u, &v, 8);
    kvr_w_u64(w, u);
}

static inline const unsigned char *kvr_r_take(struct kvr_rbuf *r, size_t n) {
    if (r->err || n > r->len - r->off) {
        r->err = 1;
        return NULL;
    }
    const unsigned char *p = r->p + r->off;
    r->off += n;
    return p;
}

static inline uint16_t kvr_r_u16(struct kvr_rbuf *r) {
    const unsigned char *b = kvr_r_take(r, 2);
    return b ? (uint16_t)(b[0] | (b[1] << 8)) : 0;
}

static inline uint32_t kvr_r_u32(struct kvr_rbuf *r) {
    const unsigned char *b = kvr_r_take(r, 4);
    uint32_t v = 0;
    if (b)
        for (int i = 0; i < 4; i++)
            v |= (uint32_t)b[i] << (8 * i);
    return v;
}

static inline uint64_t kvr_r_u64(struct kvr_rbuf *r) {
    const unsigned char *b = kvr_r_take(r, 8);
    uint64_t v = 0;
    if (b)
        for (int i = 0; i < 8; i++)
            v |= (uint64_t)b[i] << (8 * i);
    return v;
}

static inline int32_t kvr_r_i32(struct kvr_rbuf *r) { return (int32_t)kvr_r_u32(r); }

static inline float kvr_r_f32(struct kvr_rbuf *r) {
    uint32_t u = kvr_r_u32(r);
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline double kvr_r_f64(struct kvr_rbuf *r) {
    uint64_t u = kvr_r_u64(r);
    double v;
    memcpy(&v, &u, 8);
    return v;
}

#endif /* KVR_BYTES_H */
