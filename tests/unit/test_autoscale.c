/* test_autoscale.c - the decode pool's scaling policy (coordinator/autoscale.c) on invented
 * samples and times: windows, cooldown, warm-up, bounds, each signal, and a bound on the
 * changes an oscillating load causes. */
#include <stdio.h>
#include <string.h>

#include "autoscale.h"
#include "check.h"

static const struct coord_autoscale_params base = {.min = 1,
                                                   .max = 4,
                                                   .up_window_s = 1.0,
                                                   .down_window_s = 5.0,
                                                   .cooldown_s = 2.0,
                                                   .warmup_s = 1.0,
                                                   .wait_age_s = 0.2,
                                                   .kv_high = 0.85,
                                                   .kv_low = 0.5};

/* A pool of n nodes of 100 blocks with `reserved` blocks promised and `waiting` requests
 * waiting since `age` seconds. */
static struct coord_autoscale_sample sample(double t, int n, double reserved, int waiting,
                                            double age) {
    return (struct coord_autoscale_sample){.t = t,
                                           .n_serving = n,
                                           .waiting = waiting,
                                           .oldest_wait_s = age,
                                           .kv_reserved = reserved,
                                           .kv_total = 100.0 * n,
                                           .kv_node_min = 100,
                                           .ttft_ms = -1,
                                           .tpot_ms = -1,
                                           .t_last_join = -1e300};
}

static void test_up_needs_a_sustained_window(void) {
    struct coord_autoscale a;
    coord_autoscale_init(&a, &base);
    char why[200];
    /* Waiting past the age threshold for 0.9 s: not yet; at 1.0 s: +1 with the reason. */
    for (double t = 0; t < 0.95; t += 0.1) {
        struct coord_autoscale_sample s0 = sample(t, 1, 50, 3, 0.5);
        CHECK_EQ(coord_autoscale_decide(&a, &s0, why, sizeof why), 0);
    }
    struct coord_autoscale_sample s = sample(1.0, 1, 50, 3, 0.5);
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 1);
    CHECK(strstr(why, "3 requests waiting") != NULL);
    /* One sample without pressure restarts the window. */
    coord_autoscale_init(&a, &base);
    s = sample(0, 1, 50, 3, 0.5);
    coord_autoscale_decide(&a, &s, why, sizeof why);
    s = sample(0.5, 1, 50, 0, 0);
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    s = sample(1.2, 1, 50, 3, 0.5);
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    s = sample(2.2, 1, 50, 3, 0.5);
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 1);
}

static void test_signals(void) {
    struct coord_autoscale a;
    char why[200];
    /* KV reserved above kv_high. */
    coord_autoscale_init(&a, &base);
    struct coord_autoscale_sample s = sample(0, 2, 180, 0, 0);
    coord_autoscale_decide(&a, &s, why, sizeof why);
    s.t = 1.0;
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 1);
    CHECK(strstr(why, "KV reserved 90%") != NULL);
    /* Waiting but young requests are no pressure. */
    coord_autoscale_init(&a, &base);
    for (double t = 0; t < 3; t += 0.1) {
        s = sample(t, 1, 50, 5, 0.1);
        CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    }
    /* TTFT and TPOT over their targets (only when targets are set). */
    struct coord_autoscale_params p = base;
    p.ttft_target_ms = 100;
    p.tpot_target_ms = 20;
    coord_autoscale_init(&a, &p);
    s = sample(0, 1, 10, 0, 0);
    s.ttft_ms = 150;
    coord_autoscale_decide(&a, &s, why, sizeof why);
    s.t = 1.0;
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 1);
    CHECK(strstr(why, "TTFT 150 ms") != NULL);
    coord_autoscale_init(&a, &p);
    s = sample(0, 1, 10, 0, 0);
    s.tpot_ms = 25;
    coord_autoscale_decide(&a, &s, why, sizeof why);
    s.t = 1.0;
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 1);
    CHECK(strstr(why, "TPOT") != NULL);
    coord_autoscale_init(&a, &base); /* no targets: latency alone is no signal */
    s = sample(0, 1, 10, 0, 0);
    s.ttft_ms = 1e6;
    coord_autoscale_decide(&a, &s, why, sizeof why);
    s.t = 1.0;
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
}

static void test_bounds_cooldown_warmup(void) {
    struct coord_autoscale a;
    char why[200];
    /* At max: never +1, and the reason says so. */
    coord_autoscale_init(&a, &base);
    struct coord_autoscale_sample s = sample(0, 4, 400, 9, 5);
    coord_autoscale_decide(&a, &s, why, sizeof why);
    s.t = 2;
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    CHECK(strstr(why, "--decode-max 4") != NULL);
    /* Below min: +1 at once. */
    s = sample(0, 0, 0, 0, 0);
    CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 1);
    /* At min: never -1, however idle. */
    coord_autoscale_init(&a, &base);
    for (double t = 0; t < 30; t += 0.1) {
        s = sample(t, 1, 0, 0, 0);
        CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    }
    /* -1 after the down window when the load fits one node fewer below kv_low. */
    coord_autoscale_init(&a, &base);
    int d = 0;
    double t_down = -1;
    for (double t = 0; t < 10 && !d; t += 0.1) {
        s = sample(t, 3, 90, 0, 0); /* 90 <= 0.5 * 200 */
        d = coord_autoscale_decide(&a, &s, why, sizeof why);
        t_down = t;
    }
    CHECK_EQ(d, -1);
    CHECK(t_down >= 5.0 && t_down < 5.2);
    /* ... but not when it would not fit: 110 > 0.5 * 200. */
    coord_autoscale_init(&a, &base);
    for (double t = 0; t < 20; t += 0.1) {
        s = sample(t, 3, 110, 0, 0);
        CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    }
    /* Cooldown: after a +1, the next waits cooldown_s even under pressure. */
    coord_autoscale_init(&a, &base);
    int changes = 0;
    double t_first = -1, t_second = -1;
    for (double t = 0; t < 10 && changes < 2; t += 0.05) {
        s = sample(t, 1 + changes, 100.0 * (1 + changes), 5, 1);
        if (coord_autoscale_decide(&a, &s, why, sizeof why) == 1) {
            if (changes++ == 0)
                t_first = t;
            else
                t_second = t;
        }
    }
    CHECK_EQ(changes, 2);
    CHECK(t_second - t_first >= 2.0 - 1e-9);
    /* While a node joins or warms up, samples do not count. */
    coord_autoscale_init(&a, &base);
    for (double t = 0; t < 5; t += 0.1) {
        s = sample(t, 1, 100, 5, 1);
        s.n_changing = 1;
        CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    }
    for (double t = 5; t < 5.95; t += 0.1) {
        s = sample(t, 1, 100, 5, 1);
        s.t_last_join = 5.0; /* warm-up 1 s, then the 1 s window starts */
        CHECK_EQ(coord_autoscale_decide(&a, &s, why, sizeof why), 0);
    }
}

/* A KV-bound pool (each request fills a node) under light traffic: a request is in flight
 * at one sample in five, so some sample always holds a full node's reservation; the pool
 * still shrinks, on the reservations' time average. */
static void test_kv_bound_light_load_shrinks(void) {
    struct coord_autoscale a;
    char why[200];
    coord_autoscale_init(&a, &base);
    int d = 0;
    double t = 0;
    for (int k = 0; t < 20 && d == 0; k++, t += 0.1) {
        struct coord_autoscale_sample s = sample(t, 3, k % 5 == 0 ? 100 : 0, 0, 0);
        d = coord_autoscale_decide(&a, &s, why, sizeof why);
    }
    CHECK_EQ(d, -1);
    CHECK(t > 5.0 && t < 8.0);
    CHECK(strstr(why, "(mean)") != NULL);
}

/* A load that flips between full and empty faster than the windows causes no change; one
 * that flips slowly causes at most one change per cooldown and never leaves [min, max]. */
static void test_oscillation_is_bounded(void) {
    struct coord_autoscale a;
    char why[200];
    coord_autoscale_init(&a, &base);
    int n = 2, changes = 0;
    for (double t = 0; t < 120; t += 0.1) {
        int high = ((int)(t / 0.8)) % 2 == 0; /* 0.8 s high, 0.8 s low */
        struct coord_autoscale_sample s =
            sample(t, n, high ? 100.0 * n : 0, high ? 4 : 0, high ? 0.5 : 0);
        int d = coord_autoscale_decide(&a, &s, why, sizeof why);
        n += d;
        changes += d != 0;
    }
    CHECK_EQ(changes, 0);
    coord_autoscale_init(&a, &base);
    n = 2;
    changes = 0;
    for (double t = 0; t < 120; t += 0.1) {
        int high = ((int)(t / 8.0)) % 2 == 0; /* 8 s high, 8 s low */
        struct coord_autoscale_sample s =
            sample(t, n, high ? 100.0 * n : 0, high ? 4 : 0, high ? 0.5 : 0);
        int d = coord_autoscale_decide(&a, &s, why, sizeof why);
        n += d;
        changes += d != 0;
        CHECK(n >= base.min && n <= base.max);
    }
    /* Each 8 s low phase holds at most one -1 (the 5 s down window starts over after a
     * change), so at most 8 downs in 120 s; ups can only exceed downs by max - min = 3:
     * at most 19 changes. And it does follow a load this slow: at least one down per low
     * phase after the first climb. */
    fprintf(stderr, "oscillating load: %d changes in 120 s\n", changes);
    CHECK(changes <= 19);
    CHECK(changes >= 8);
}

int main(void) {
    test_up_needs_a_sustained_window();
    test_signals();
    test_bounds_cooldown_warmup();
    test_oscillation_is_bounded();
    test_kv_bound_light_load_shrinks();
    CHECK_DONE();
}
