/* log.h - the one logger of kvrelay.
 * Lines look like "2026-11-25T20:58:30.123Z W rank=2 role=decode decode_step: message".
 * The level is checked before the arguments are evaluated; the sink is replaceable so
 * tests can capture lines. Thread-safe: each line is formatted on the caller's stack and
 * handed to the sink under a mutex. */
#ifndef KVR_LOG_H
#define KVR_LOG_H

#include <stdarg.h>

enum kvr_log_level {
    KVR_LOG_LEVEL_ERROR = 0,
    KVR_LOG_LEVEL_WARN  = 1,
    KVR_LOG_LEVEL_INFO  = 2,
    KVR_LOG_LEVEL_DEBUG = 3,
};

/* Current threshold; lines above it are not formatted. Default WARN, or the
 * KVR_LOG_LEVEL environment variable (error|warn|info|debug) read by kvr_log_init. */
extern int kvr_log_level;

/* Reads KVR_LOG_LEVEL and sets the process context (role name, MPI rank or -1).
 * role is borrowed for the life of the process (pass a string literal). */
void kvr_log_init(const char *role, int rank);

/* Sets the level; returns the previous one. */
int kvr_log_set_level(int level);

/* Parses "error", "warn", "info", "debug" (or 0-3). Returns the level or -1. */
int kvr_log_parse_level(const char *s);

/* Replaces the sink. fn receives the whole formatted line (no trailing newline) and
 * ud. NULL restores the default sink (stderr). Returns nothing; thread-safe. */
void kvr_log_set_sink(void (*fn)(void *ud, int level, const char *line), void *ud);

/* Formats and emits one line. Use the macros below, not this. */
void kvr_log_write(int level, const char *func, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define KVR_LOG_AT(level, ...)                              \
    do {                                                    \
        if ((level) <= kvr_log_level)                       \
            kvr_log_write((level), __func__, __VA_ARGS__);  \
    } while (0)
#define KVR_LOG_ERROR(...) KVR_LOG_AT(KVR_LOG_LEVEL_ERROR, __VA_ARGS__)
#define KVR_LOG_WARN(...)  KVR_LOG_AT(KVR_LOG_LEVEL_WARN, __VA_ARGS__)
#define KVR_LOG_INFO(...)  KVR_LOG_AT(KVR_LOG_LEVEL_INFO, __VA_ARGS__)
#define KVR_LOG_DEBUG(...) KVR_LOG_AT(KVR_LOG_LEVEL_DEBUG, __VA_ARGS__)

/* Always-on assertion for programmer errors (never for bytes from outside). */
#define KVR_ASSERT(cond)                                         \
    do {                                                         \
        if (!(cond))                                             \
            kvr_assert_fail(#cond, __FILE__, __LINE__, __func__); \
    } while (0)

_Noreturn void kvr_assert_fail(const char *expr, const char *file, int line, const char *func);

#endif /* KVR_LOG_H */
