/* test_fault_builds.c - test-only fault injection exists only in the test builds: the
 * role executables in build/bin carry no fault option (not even its name), their test
 * builds in build/tests/bin carry every one. Reads the executables' bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* Whether the file at path contains the bytes of s. */
static int file_has(const char *path, const char *s) {
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n);
    REQUIRE(b && fread(b, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    size_t k = strlen(s);
    int found = 0;
    for (long i = 0; i + (long)k <= n && !found; i++)
        found = b[i] == s[0] && memcmp(b + i, s, k) == 0;
    free(b);
    return found;
}

int main(void) {
    static const struct {
        const char *prog, *opt;
    } faults[] = {{"kvrelay-prefill", "fault-corrupt-seed"},
                  {"kvrelay-prefill", "fault-drop-ready-seed"},
                  {"kvrelay-prefill", "fault-pass-delay-ms"},
                  {"kvrelay-decode", "fault-step-delay-ms"},
                  {"kvrelay-decode", "fault-step-fail-seed"}};
    char product[1024], test[1024];
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        snprintf(product, sizeof product, "%s/%s", KVR_BIN_DIR, faults[i].prog);
        snprintf(test, sizeof test, "%s/%s", KVR_TEST_BIN_DIR, faults[i].prog);
        CHECK(!file_has(product, faults[i].opt));
        CHECK(file_has(test, faults[i].opt));
        /* Both builds have the real options. */
        CHECK(file_has(product, "coord-timeout") && file_has(test, "coord-timeout"));
    }
    /* The option tables no longer mention an environment for options. */
    snprintf(product, sizeof product, "%s/kvrelay", KVR_BIN_DIR);
    CHECK(!file_has(product, "can also be set in the environment"));
    CHECK_DONE();
}
