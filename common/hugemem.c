/* hugemem.c - see hugemem.h. */
/* MADV_HUGEPAGE is a Linux extension beyond POSIX. */
#define _DEFAULT_SOURCE
#include "hugemem.h"

#include <sys/mman.h>

void *kvr_huge_alloc(size_t n, size_t *len) {
    size_t huge = (size_t)2 << 20;
    size_t l = n == 0 ? huge : (n + huge - 1) / huge * huge;
    void *p = mmap(NULL, l, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, l, MADV_HUGEPAGE);
#endif
    *len = l;
    return p;
}

void kvr_huge_free(void *p, size_t len) {
    if (p)
        munmap(p, len);
}
