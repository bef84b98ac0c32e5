/* idmap.c - the id -> pointer map (see idmap.h). Owns its two arrays. */
#include "idmap.h"

#include <stdlib.h>

#include "status.h"

static size_t slot_of(uint64_t id, size_t cap) {
    uint64_t h = id * 0x9E3779B97F4A7C15ull; /* Fibonacci hashing: ids are sequential */
    return (size_t)(h ^ (h >> 32)) & (cap - 1);
}

void kvr_idmap_deinit(struct kvr_idmap *m) {
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
    m->cap = m->n = 0;
}

void *kvr_idmap_get(const struct kvr_idmap *m, uint64_t id) {
    if (!m->cap || !id)
        return NULL;
    for (size_t i = slot_of(id, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (m->keys[i] == id)
            return m->vals[i];
        if (m->keys[i] == 0)
            return NULL;
    }
}

static int grow(struct kvr_idmap *m) {
    size_t cap = m->cap ? 2 * m->cap : 64;
    uint64_t *keys = calloc(cap, sizeof *keys);
    void **vals = calloc(cap, sizeof *vals);
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return KVR_ENOMEM;
    }
    for (size_t j = 0; j < m->cap; j++) {
        if (!m->keys[j])
            continue;
        size_t i = slot_of(m->keys[j], cap);
        while (keys[i])
            i = (i + 1) & (cap - 1);
        keys[i] = m->keys[j];
        vals[i] = m->vals[j];
    }
    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->cap = cap;
    return KVR_OK;
}

int kvr_idmap_put(struct kvr_idmap *m, uint64_t id, void *val) {
    if (!id || !val)
        return KVR_EINVAL;
    /* At most half full: probes stay short. */
    if ((m->n + 1) * 2 > m->cap && grow(m) != KVR_OK)
        return KVR_ENOMEM;
    size_t i = slot_of(id, m->cap);
    while (m->keys[i] && m->keys[i] != id)
        i = (i + 1) & (m->cap - 1);
    if (!m->keys[i])
        m->n++;
    m->keys[i] = id;
    m->vals[i] = val;
    return KVR_OK;
}

void *kvr_idmap_del(struct kvr_idmap *m, uint64_t id) {
    if (!m->cap || !id)
        return NULL;
    size_t mask = m->cap - 1, i = slot_of(id, m->cap);
    while (m->keys[i] != id) {
        if (!m->keys[i])
            return NULL;
        i = (i + 1) & mask;
    }
    void *val = m->vals[i];
    /* Backward shift: move later entries of the probe run into the hole, so lookups
     * never need tombstones. */
    for (size_t j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
        size_t home = slot_of(m->keys[j], m->cap);
        /* Entry j may fill hole i if its home is not cyclically in (i, j]. */
        int in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            i = j;
        }
    }
    m->keys[i] = 0;
    m->vals[i] = NULL;
    m->n--;
    return val;
}
