/* bench.h - benchmarks behind `kvrelay bench <name>`; each prints a human table, or one
 * JSON value with --json. They report numbers; they assert nothing. */
#ifndef KVR_BENCH_H
#define KVR_BENCH_H

#include <stddef.h>

/* argv[0] is the benchmark's name; returns a process exit code (cli.h). */
int kvr_bench_engine(int argc, char **argv);  /* prefill/decode tok/s vs machine ceilings */
int kvr_bench_kvwire(int argc, char **argv);  /* KV block codec: ratio and MB/s */
int kvr_bench_kvcache(int argc, char **argv); /* long generation: dense vs sink vs recompute */
int kvr_bench_cluster(int argc, char **argv); /* open-loop load against a running cluster */

/* The "model name" of /proc/cpuinfo (the machine every report names), or "unknown". */
void kvr_bench_cpu_model(char *buf, size_t len);

#endif /* KVR_BENCH_H */
