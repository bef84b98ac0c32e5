/* clock.h - the monotonic clock every component measures durations with. */
#ifndef KVR_CLOCK_H
#define KVR_CLOCK_H

#include <time.h>

/* Seconds on CLOCK_MONOTONIC (arbitrary origin; only differences mean anything). */
static inline double kvr_clock_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Sleeps ms milliseconds (EINTR ends it early). */
static inline void kvr_sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

#endif /* KVR_CLOCK_H */
