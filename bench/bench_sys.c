/* bench_sys.c - what the benchmarks say about the machine they ran on. Owns nothing. */
#include <stdio.h>
#include <string.h>

#include "bench.h"

void kvr_bench_cpu_model(char *buf, size_t len) {
    snprintf(buf, len, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char *p = strchr(line, ':');
        if (!strncmp(line, "model name", 10) && p) {
            p += 1 + strspn(p + 1, " \t");
            p[strcspn(p, "\n")] = '\0';
            snprintf(buf, len, "%s", p);
            break;
        }
    }
    fclose(f);
}
