/* idmap.h - a map from nonzero uint64 ids to pointers (open addressing, linear probing,
 * backward-shift deletion): how the router finds a request by wire id and a decode node
 * a sequence, in O(1) whatever the number in flight. Not thread-safe; one owner. */
#ifndef KVR_IDMAP_H
#define KVR_IDMAP_H

#include <stddef.h>
#include <stdint.h>

struct kvr_idmap {
    uint64_t *keys; /* (cap) 0 = empty slot */
    void **vals;    /* (cap) */
    size_t cap;     /* a power of two, or 0 */
    size_t n;
};

/* Zero-initialized is a valid empty map. */
void kvr_idmap_deinit(struct kvr_idmap *m);

/* The value of id, or NULL. */
void *kvr_idmap_get(const struct kvr_idmap *m, uint64_t id);

/* Sets id -> val (replacing). id must be nonzero, val non-NULL. KVR_OK, KVR_ENOMEM (the map
 * is unchanged), KVR_EINVAL. */
int kvr_idmap_put(struct kvr_idmap *m, uint64_t id, void *val);

/* Removes id; returns its value or NULL. */
void *kvr_idmap_del(struct kvr_idmap *m, uint64_t id);

#endif /* KVR_IDMAP_H */
