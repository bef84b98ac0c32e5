/* hugemem.h - anonymous memory backed by transparent huge pages where the kernel allows:
 * for what a decode step streams or touches all over every step (copied weights, the KV
 * block pool, the benchmark's bandwidth probe), where 4 KiB pages cost a TLB miss and a
 * prefetcher restart every 4 KiB and a page fault per 4 KiB first touched. */
#ifndef KVR_HUGEMEM_H
#define KVR_HUGEMEM_H

#include <stddef.h>

/* At least n bytes (n may be 0) of zeroed read-write memory, mapped in whole 2 MiB units
 * (*len, the mapping's size) and advised MADV_HUGEPAGE. NULL with errno set on failure.
 * Untouched pages cost nothing. Free with kvr_huge_free(p, *len). */
void *kvr_huge_alloc(size_t n, size_t *len);

/* Accepts NULL. */
void kvr_huge_free(void *p, size_t len);

#endif /* KVR_HUGEMEM_H */
