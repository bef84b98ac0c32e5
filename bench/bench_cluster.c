/* bench_cluster.c - placeholder until this benchmark lands. */
#include <stdio.h>

#include "bench.h"

int kvr_bench_cluster(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "kvrelay bench cluster: not implemented yet\n");
    return 1;
}
