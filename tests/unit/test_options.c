/* test_options.c - common/options.c: byte sizes ("512MiB"), every option type with its
 * bounds, choices, flags, required options, the environment override (KVR_<NAME>) and
 * its precedence below argv, malformed command lines, --help and the usage text. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "options.h"
#include "status.h"

struct cfg {
    int window;
    uint64_t count;
    float temp;
    const char *name;
    uint64_t budget;
    int verbose;
    int policy;
    const char *must;
};

static const struct kvr_opt table[] = {
    {"test-window", KVR_OPT_INT, offsetof(struct cfg, window), "256", 1, 1 << 20, NULL, 0,
     "window"},
    {"test-count", KVR_OPT_U64, offsetof(struct cfg, count), "0", 0, -1, NULL, 0,
     "count, no bounds"},
    {"test-temp", KVR_OPT_FLOAT, offsetof(struct cfg, temp), "1.0", 0, 2, NULL, 0, "temperature"},
    {"test-name", KVR_OPT_STRING, offsetof(struct cfg, name), NULL, 0, -1, NULL, 0, "a name"},
    {"test-budget", KVR_OPT_SIZE, offsetof(struct cfg, budget), "512MiB", 1024, 1e12, NULL, 0,
     "bytes"},
    {"test-verbose", KVR_OPT_FLAG, offsetof(struct cfg, verbose), "0", 0, -1, NULL, 0, "a flag"},
    {"test-policy", KVR_OPT_CHOICE, offsetof(struct cfg, policy), "dense", 0, -1,
     "dense|window|recompute|sink", 0, "policy"},
    {"test-must", KVR_OPT_STRING, offsetof(struct cfg, must), NULL, 0, -1, NULL, 1, "required"},
};
#define N_OPTS ((int)(sizeof table / sizeof table[0]))

static char err[256];

/* Parses "prog a b c ..." (the words of line split on spaces, "=" kept) into c. */
static int parse(struct cfg *c, const char *line) {
    static char buf[512];
    char *argv[32];
    int argc = 0;
    snprintf(buf, sizeof buf, "prog %s", line);
    for (char *tok = strtok(buf, " "); tok && argc < 31; tok = strtok(NULL, " "))
        argv[argc++] = tok;
    argv[argc] = NULL;
    memset(c, 0x5a, sizeof *c); /* every field must come from the table */
    err[0] = '\0';
    return kvr_opts_parse(table, N_OPTS, c, argc, argv, 1, err, sizeof err);
}

/* A parse that must fail with KVR_EINVAL and name `needle` in its one-line reason. */
static void expect_error(const char *line, const char *needle) {
    struct cfg c;
    int rc = parse(&c, line);
    int named = strstr(err, needle) != NULL && strchr(err, '\n') == NULL;
    if (rc != KVR_EINVAL || !named)
        fprintf(stderr, "  '%s': rc %d, err '%s' (want KVR_EINVAL naming '%s')\n", line, rc, err,
                needle);
    CHECK_EQ(rc, KVR_EINVAL);
    CHECK(named);
}

static void test_sizes(void) {
    static const struct {
        const char *s;
        uint64_t want;
    } ok[] = {
        {"512MiB", 512ull << 20},
        {"512M", 512ull << 20},
        {"2G", 2ull << 30},
        {"2GiB", 2ull << 30},
        {"4096", 4096},
        {"0", 0},
        {"10KB", 10000},
        {"10kb", 10000},
        {"3MB", 3000000},
        {"1GB", 1000000000},
        {"1.5KiB", 1536},
        {"1 MiB", 1ull << 20},
        {"7B", 7},
        {"1T", 1ull << 40},
        {"64k", 65536},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        uint64_t v = 12345;
        int rc = kvr_parse_size(ok[i].s, &v);
        if (rc != KVR_OK || v != ok[i].want)
            fprintf(stderr, "  size '%s': rc %d value %llu, want %llu\n", ok[i].s, rc,
                    (unsigned long long)v, (unsigned long long)ok[i].want);
        CHECK_EQ(rc, KVR_OK);
        CHECK(v == ok[i].want);
    }
    static const char *const bad[] = {"",    "abc", "-1",  "12XB", "1e30",  "5MiBx",
                                      "MiB", "nan", "inf", "1 2",  "12 iB", "0x10MiB",
                                      "1e3", " 5",  "+5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 777;
        int rc = kvr_parse_size(bad[i], &v);
        if (rc != KVR_EINVAL)
            fprintf(stderr, "  size '%s' accepted as %llu\n", bad[i], (unsigned long long)v);
        CHECK_EQ(rc, KVR_EINVAL);
        CHECK(v == 777); /* untouched on error */
    }
    char buf[32];
    CHECK_STREQ(kvr_format_size(512ull << 20, buf, sizeof buf), "512.0MiB");
    CHECK_STREQ(kvr_format_size(100, buf, sizeof buf), "100B");
    CHECK_STREQ(kvr_format_size(1536, buf, sizeof buf), "1.5KiB");
    CHECK_STREQ(kvr_format_size(3ull << 30, buf, sizeof buf), "3.0GiB");
}

static void test_values(void) {
    struct cfg c;
    /* Defaults. */
    CHECK_EQ(parse(&c, "--test-must x"), KVR_OK);
    CHECK_EQ(c.window, 256);
    CHECK(c.count == 0);
    CHECK(c.temp == 1.0f);
    CHECK(c.name == NULL);
    CHECK(c.budget == 512ull << 20);
    CHECK_EQ(c.verbose, 0);
    CHECK_EQ(c.policy, 0);
    CHECK_STREQ(c.must, "x");

    /* Every type, both spellings, bounds inclusive, last one wins. */
    CHECK_EQ(
        parse(&c,
              "--test-must=y --test-window 1 --test-count=18446744073709551615 --test-temp 0.25 "
              "--test-name bob --test-budget 2G --test-verbose --test-policy sink"),
        KVR_OK);
    CHECK_STREQ(c.must, "y");
    CHECK_EQ(c.window, 1);
    CHECK(c.count == UINT64_MAX);
    CHECK(c.temp == 0.25f);
    CHECK_STREQ(c.name, "bob");
    CHECK(c.budget == 2ull << 30);
    CHECK_EQ(c.verbose, 1);
    CHECK_EQ(c.policy, 3);
    CHECK_EQ(parse(&c, "--test-must y --test-window=1048576 --test-window 7 --test-verbose=0 "
                       "--test-budget 1KiB "
                       "--test-policy=window --test-temp 2"),
             KVR_OK);
    CHECK_EQ(c.window, 7);
    CHECK_EQ(c.verbose, 0);
    CHECK(c.budget == 1024);
    CHECK_EQ(c.policy, 1);
    CHECK(c.temp == 2.0f);
    CHECK_EQ(parse(&c, "--test-must y --test-window 1048576"), KVR_OK);
    CHECK_EQ(c.window, 1 << 20);

    /* Bounds and malformed values: one line naming the option. */
    expect_error("--test-must y --test-window 0", "--test-window");
    expect_error("--test-must y --test-window 1048577", "outside");
    expect_error("--test-must y --test-window -5", "--test-window");
    expect_error("--test-must y --test-window 12abc", "'12abc' is not an integer");
    expect_error("--test-must y --test-window 99999999999", "--test-window");
    expect_error("--test-must y --test-window 1.5", "--test-window");
    expect_error("--test-must y --test-count -1", "--test-count");
    expect_error("--test-must y --test-count 18446744073709551616", "--test-count");
    expect_error("--test-must y --test-temp 2.5", "--test-temp");
    expect_error("--test-must y --test-temp nan", "--test-temp");
    expect_error("--test-must y --test-temp 1x", "--test-temp");
    expect_error("--test-must y --test-budget 1000", "--test-budget");
    expect_error("--test-must y --test-budget lots", "is not a size");
    expect_error("--test-must y --test-verbose=maybe", "--test-verbose");
    expect_error("--test-must y --test-policy Sink", "dense|window|recompute|sink");
    expect_error("--test-must y --test-policy den", "--test-policy");
    expect_error("--test-must y --test-policy=", "--test-policy");

    /* Malformed command lines. */
    expect_error("--test-window 5", "'--test-must' is required");
    expect_error("--test-must y --nope 1", "unknown option '--nope'");
    expect_error("--test-must y --test-win 1", "unknown option"); /* no prefix matching */
    expect_error("--test-must y stray", "unexpected argument 'stray'");
    expect_error("--test-must y -x", "unexpected argument '-x'");
    expect_error("--test-must y --", "unexpected argument '--'");
    expect_error("--test-must y --test-window", "needs a value");

    /* --help wins over everything, even errors. */
    CHECK_EQ(parse(&c, "--nope --help"), 1);
    CHECK_EQ(parse(&c, "-h"), 1);

    /* A tiny error buffer truncates, never overflows. */
    char small[16];
    char *argv[] = {"prog", "--a-very-long-unknown-option-name", NULL};
    CHECK_EQ(kvr_opts_parse(table, N_OPTS, &c, 2, argv, 1, small, sizeof small), KVR_EINVAL);
    CHECK(strlen(small) < sizeof small);
}

/* Options are never read from the environment (issue 15): a variable named like an
 * option, even a bad value, changes nothing, and a required option stays required. */
static void test_env_ignored(void) {
    struct cfg c;
    setenv("KVR_TEST_WINDOW", "77", 1);
    setenv("KVR_TEST_POLICY", "recompute", 1);
    setenv("KVR_TEST_VERBOSE", "1", 1);
    setenv("KVR_TEST_BUDGET", "not-a-size", 1);
    setenv("KVR_TEST_MUST", "from-env", 1);
    expect_error("", "'--test-must' is required");
    CHECK_EQ(parse(&c, "--test-must argv"), KVR_OK);
    CHECK_EQ(c.window, 256);
    CHECK_EQ(c.policy, 0);
    CHECK_EQ(c.verbose, 0);
    CHECK_STREQ(c.must, "argv");
    unsetenv("KVR_TEST_WINDOW");
    unsetenv("KVR_TEST_POLICY");
    unsetenv("KVR_TEST_VERBOSE");
    unsetenv("KVR_TEST_BUDGET");
    unsetenv("KVR_TEST_MUST");
}

static void test_usage(void) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    REQUIRE(f);
    kvr_opts_usage(f, "kvrelay test", "Tests the table.", table, N_OPTS);
    fclose(f);
    for (int i = 0; i < N_OPTS; i++) {
        char name[64];
        snprintf(name, sizeof name, "--%s", table[i].name);
        if (!strstr(text, name))
            fprintf(stderr, "  usage lacks %s\n", name);
        CHECK(strstr(text, name) != NULL);
    }
    CHECK(strstr(text, "usage: kvrelay test") != NULL);
    CHECK(strstr(text, "(required)") != NULL);
    CHECK(strstr(text, "(default 256)") != NULL);
    CHECK(strstr(text, "dense|window|recompute|sink") != NULL);
    CHECK(strstr(text, "KVR_") != NULL);
    free(text);
}

int main(void) {
    test_sizes();
    test_values();
    test_env_ignored();
    test_usage();
    CHECK_DONE();
}
