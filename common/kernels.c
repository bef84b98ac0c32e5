/* kernels.c - which kernel variant this process runs (kernels.h): the CPU's features
 * from CPUID, the vector state the OS saves from XGETBV, and the KVR_KERNEL override.
 * Compiled for the baseline target: nothing here executes a vector instruction. */
#include "kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define K_X86 1
#endif

struct cpu_info {
    int avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512vnni, avx512bf16;
    int os_avx, os_avx512;
    char features[160];
};

static struct cpu_info cpu;
static const struct kvr_kernels *chosen;
static pthread_once_t once = PTHREAD_ONCE_INIT;

#ifdef K_X86
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

static void detect(void) {
#ifdef K_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return;
    int osxsave = (c >> 27) & 1;
    cpu.fma = (c >> 12) & 1;
    cpu.f16c = (c >> 29) & 1;
    int avx = (c >> 28) & 1;
    if (osxsave && avx) {
        uint64_t xcr0 = xgetbv0();
        cpu.os_avx = (xcr0 & 0x6) == 0x6;          /* XMM and YMM state */
        cpu.os_avx512 = (xcr0 & 0xe6) == 0xe6;     /* and opmask, ZMM_Hi256, Hi16_ZMM */
    }
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        cpu.avx2 = (b >> 5) & 1;
        cpu.avx512f = (b >> 16) & 1;
        cpu.avx512bw = (b >> 30) & 1;
        cpu.avx512vl = (b >> 31) & 1;
        cpu.avx512vnni = (c >> 11) & 1;
        __cpuid_count(7, 1, a, b, c, d);
        cpu.avx512bf16 = (a >> 5) & 1;
    }
#endif
    char *f = cpu.features;
    size_t cap = sizeof cpu.features;
    f[0] = '\0';
    const struct { int on; const char *name; } list[] = {
        {cpu.avx512f, "avx512f"},       {cpu.avx512bw, "avx512bw"}, {cpu.avx512vl, "avx512vl"},
        {cpu.avx512vnni, "avx512vnni"}, {cpu.avx512bf16, "avx512bf16"}, {cpu.avx2, "avx2"},
        {cpu.fma, "fma"},               {cpu.f16c, "f16c"},
    };
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) {
        if (!list[i].on)
            continue;
        size_t len = strlen(f);
        if (len + strlen(list[i].name) + 2 > cap)
            break;
        memcpy(f + len, len ? " " : "", len ? 2 : 1);
        strcat(f, list[i].name);
    }
    if (!cpu.os_avx512 && cpu.avx512f)
        strncat(f, " (avx512 state not saved by the OS)", cap - strlen(f) - 1);
}

enum kvr_isa kvr_cpu_isa(void) {
    (void)kvr_kernels();
    if (cpu.os_avx512 && cpu.avx512f && cpu.avx512bw && cpu.avx512vl && cpu.avx512vnni &&
        cpu.avx2 && cpu.fma && cpu.f16c)
        return KVR_ISA_AVX512;
    if (cpu.os_avx && cpu.avx2 && cpu.fma && cpu.f16c)
        return KVR_ISA_AVX2;
    return KVR_ISA_SCALAR;
}

const char *kvr_isa_name(enum kvr_isa isa) {
    switch (isa) {
    case KVR_ISA_AVX512: return "avx512";
    case KVR_ISA_AVX2: return "avx2";
    case KVR_ISA_SCALAR: return "scalar";
    }
    return "unknown";
}

/* The avx512 table as this CPU runs it: plus the BF16 prefill GEMM where the CPU has
 * AVX512_BF16 (filled once, in choose). */
static struct kvr_kernels avx512_here;

static const struct kvr_kernels *table(enum kvr_isa isa) {
    switch (isa) {
    case KVR_ISA_AVX512: return &avx512_here;
    case KVR_ISA_AVX2: return &kvr_kernels_avx2;
    case KVR_ISA_SCALAR: return &kvr_kernels_scalar;
    }
    return &kvr_kernels_scalar;
}

static void choose(void) {
    detect();
    avx512_here = kvr_kernels_avx512;
    if (cpu.avx512bf16) {
        avx512_here.gemm_pack_bf16 = kvr_gemm_pack_bf16;
        avx512_here.gemm_panel_bf16 = kvr_gemm_panel_bf16_avx512;
    }
    /* kvr_cpu_isa() calls kvr_kernels(): not from inside the once routine. */
    enum kvr_isa best = KVR_ISA_SCALAR;
    if (cpu.os_avx512 && cpu.avx512f && cpu.avx512bw && cpu.avx512vl && cpu.avx512vnni &&
        cpu.avx2 && cpu.fma && cpu.f16c)
        best = KVR_ISA_AVX512;
    else if (cpu.os_avx && cpu.avx2 && cpu.fma && cpu.f16c)
        best = KVR_ISA_AVX2;
    enum kvr_isa isa = best;
    const char *want = getenv("KVR_KERNEL");
    if (want && *want) {
        enum kvr_isa w;
        if (strcmp(want, "avx512") == 0)
            w = KVR_ISA_AVX512;
        else if (strcmp(want, "avx2") == 0)
            w = KVR_ISA_AVX2;
        else if (strcmp(want, "scalar") == 0)
            w = KVR_ISA_SCALAR;
        else
            w = (enum kvr_isa)-1;
        if ((int)w < 0)
            KVR_LOG_WARN("KVR_KERNEL=%s: not one of avx512, avx2, scalar; using %s", want, kvr_isa_name(best));
        else if (w > best)
            KVR_LOG_WARN("KVR_KERNEL=%s: this CPU lacks it (has: %s); using %s", want,
                         cpu.features[0] ? cpu.features : "no vector extensions", kvr_isa_name(best));
        else
            isa = w;
    }
    chosen = table(isa);
}

const struct kvr_kernels *kvr_kernels(void) {
    pthread_once(&once, choose);
    return chosen;
}

const struct kvr_kernels *kvr_kernels_get(enum kvr_isa isa) {
    return isa <= kvr_cpu_isa() ? table(isa) : NULL;
}

const char *kvr_cpu_features(void) {
    (void)kvr_kernels();
    return cpu.features;
}
