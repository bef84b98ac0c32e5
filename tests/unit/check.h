/* check.h - tiny assertion macros for kvrelay's tests: each failure prints both values
 * and file:line, counts, and the test goes on; CHECK_DONE() ends main with the verdict. */
#ifndef KVR_CHECK_H
#define KVR_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_failures;
static int check_count;

#define CHECK(cond)                                                             \
    do {                                                                        \
        check_count++;                                                          \
        if (!(cond)) {                                                          \
            check_failures++;                                                   \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                       \
    } while (0)

#define CHECK_EQ(a, b)                                                                   \
    do {                                                                                 \
        long long check_a_ = (long long)(a), check_b_ = (long long)(b);                  \
        check_count++;                                                                   \
        if (check_a_ != check_b_) {                                                      \
            check_failures++;                                                            \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__, \
                    __LINE__, #a, #b, check_a_, check_b_);                               \
        }                                                                                \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                              \
    do {                                                                                   \
        double check_a_ = (double)(a), check_b_ = (double)(b), check_t_ = (double)(tol);   \
        check_count++;                                                                     \
        if (!(fabs(check_a_ - check_b_) <= check_t_)) {                                    \
            check_failures++;                                                              \
            fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s ~ %s (%.9g vs %.9g, tol %.3g)\n", \
                    __FILE__, __LINE__, #a, #b, check_a_, check_b_, check_t_);             \
        }                                                                                  \
    } while (0)

#define CHECK_STREQ(a, b)                                                                    \
    do {                                                                                     \
        const char *check_a_ = (a), *check_b_ = (b);                                         \
        check_count++;                                                                       \
        if (!check_a_ || !check_b_ || strcmp(check_a_, check_b_) != 0) {                     \
            check_failures++;                                                                \
            fprintf(stderr, "%s:%d: CHECK_STREQ failed: %s == %s (\"%s\" vs \"%s\")\n", __FILE__, \
                    __LINE__, #a, #b, check_a_ ? check_a_ : "(null)", check_b_ ? check_b_ : "(null)"); \
        }                                                                                    \
    } while (0)

/* Aborts the test at once (a setup step failed and nothing after it means anything). */
#define REQUIRE(cond)                                                                 \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

#define CHECK_DONE()                                                                     \
    do {                                                                                 \
        fprintf(stderr, "%s: %d checks, %d failed\n", __FILE__, check_count, check_failures); \
        return check_failures ? 1 : 0;                                                   \
    } while (0)

/* Path of a file under ../shared (tests are built with KVR_SHARED_DIR). Static buffer. */
static inline const char *shared_path(const char *rel) {
    static char buf[4][1024];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", KVR_SHARED_DIR, rel);
    return buf[k];
}

#endif /* KVR_CHECK_H */
