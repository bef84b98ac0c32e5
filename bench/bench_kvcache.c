/* bench_kvcache.c - placeholder until this benchmark lands. */
#include <stdio.h>

#include "bench.h"

int kvr_bench_kvcache(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "kvrelay bench kvcache: not implemented yet\n");
    return 1;
}
