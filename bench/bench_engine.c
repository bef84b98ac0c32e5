/* bench_engine.c - placeholder until this benchmark lands. */
#include <stdio.h>

#include "bench.h"

int kvr_bench_engine(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "kvrelay bench engine: not implemented yet\n");
    return 1;
}
