/* log.c - line logger with a replaceable sink; see log.h.
 * Owns the process-wide log context (role, rank) and the sink mutex. */
#include "log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

int kvr_log_level = KVR_LOG_LEVEL_WARN;

static const char *log_role = "-";
static int log_rank = -1;
static void (*log_sink)(void *ud, int level, const char *line);
static void *log_sink_ud;
static pthread_mutex_t log_mutex = PTHREAD_MUTEX_INITIALIZER;

int kvr_log_parse_level(const char *s) {
    static const char *names[] = {"error", "warn", "info", "debug"};
    if (!s)
        return -1;
    for (int i = 0; i < 4; i++)
        if (strcasecmp(s, names[i]) == 0)
            return i;
    if (s[0] >= '0' && s[0] <= '3' && s[1] == '\0')
        return s[0] - '0';
    return -1;
}

void kvr_log_init(const char *role, int rank) {
    log_role = role ? role : "-";
    log_rank = rank;
    int lvl = kvr_log_parse_level(getenv("KVR_LOG_LEVEL"));
    if (lvl >= 0)
        kvr_log_level = lvl;
}

int kvr_log_set_level(int level) {
    int old = kvr_log_level;
    kvr_log_level = level;
    return old;
}

void kvr_log_set_sink(void (*fn)(void *ud, int level, const char *line), void *ud) {
    pthread_mutex_lock(&log_mutex);
    log_sink = fn;
    log_sink_ud = ud;
    pthread_mutex_unlock(&log_mutex);
}

void kvr_log_write(int level, const char *func, const char *fmt, ...) {
    static const char lvl_chr[] = "EWID";
    char line[1024];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %c rank=%d role=%s %s: ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000L,
                     lvl_chr[level < 0 ? 0 : level > 3 ? 3 : level], log_rank, log_role, func);
    if (n < 0)
        return;
    if ((size_t)n < sizeof line) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
        va_end(ap);
    }
    /* One line per message: fold any newline a caller's data brought in. */
    for (char *p = line; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    pthread_mutex_lock(&log_mutex);
    if (log_sink)
        log_sink(log_sink_ud, level, line);
    else
        fprintf(stderr, "%s\n", line);
    pthread_mutex_unlock(&log_mutex);
}

void kvr_assert_fail(const char *expr, const char *file, int line, const char *func) {
    fprintf(stderr, "KVR_ASSERT failed: %s at %s:%d in %s\n", expr, file, line, func);
    fflush(stderr);
    abort();
}
