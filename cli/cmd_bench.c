/* cmd_bench.c - `kvrelay bench [engine|kvwire|kvcache|cluster] ...`; engine by default. */
#include <stdio.h>
#include <string.h>

#include "bench.h"
#include "cli.h"

int kvr_cmd_bench(int argc, char **argv) {
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } benches[] = {{"engine", kvr_bench_engine},
                   {"kvwire", kvr_bench_kvwire},
                   {"kvcache", kvr_bench_kvcache},
                   {"cluster", kvr_bench_cluster}};
    if (argc < 2 || argv[1][0] == '-') {
        if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) && argc == 2) {
            printf("usage: kvrelay bench [engine|kvwire|kvcache|cluster] [options] [--json]\n"
                   "  engine   prefill and decode tokens/s against this machine's ceilings (default)\n"
                   "  kvwire   KV block codec: compression ratio and MB/s per value type, transform, level\n"
                   "  kvcache  long generation: KV memory and tokens/s of dense, sink and recompute\n"
                   "  cluster  open-loop load against a running cluster: TTFT, TPOT, goodput\n"
                   "`kvrelay bench <name> --help` lists a benchmark's options.\n");
            return KVR_EXIT_OK;
        }
        argv[0] = "engine";
        return kvr_bench_engine(argc, argv);
    }
    for (size_t i = 0; i < sizeof benches / sizeof benches[0]; i++)
        if (!strcmp(argv[1], benches[i].name))
            return benches[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "kvrelay bench: unknown benchmark '%s' (engine, kvwire, kvcache, cluster)\n", argv[1]);
    return KVR_EXIT_USAGE;
}
