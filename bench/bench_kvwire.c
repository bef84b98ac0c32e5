/* bench_kvwire.c - placeholder until this benchmark lands. */
#include <stdio.h>

#include "bench.h"

int kvr_bench_kvwire(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "kvrelay bench kvwire: not implemented yet\n");
    return 1;
}
