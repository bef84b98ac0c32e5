/* autoscale.c - the decode pool's scaling policy (see autoscale.h). Owns nothing but its
 * windows; the router calls it from its thread. */
#include "autoscale.h"

#include <math.h>
#include <stdio.h>

void coord_autoscale_init(struct coord_autoscale *a, const struct coord_autoscale_params *p) {
    a->p = *p;
    a->t_up_since = a->t_down_since = -1;
    a->t_last_change = -1e300;
    a->n_up = a->n_down = 0;
    a->kv_mean = 0;
    a->t_prev = -1;
}

int coord_autoscale_decide(struct coord_autoscale *a, const struct coord_autoscale_sample *s,
                           char *reason, size_t len) {
    const struct coord_autoscale_params *p = &a->p;
    reason[0] = '\0';
    /* The reservations' time average (exponential, time constant down_window / 3). */
    double tau = p->down_window_s / 3 > 1e-3 ? p->down_window_s / 3 : 1e-3;
    double dt = a->t_prev < 0 ? 1e300 : s->t - a->t_prev;
    double w = dt > 50 * tau ? 1.0 : 1.0 - exp(-dt / tau);
    a->kv_mean += w * (s->kv_reserved - a->kv_mean);
    a->t_prev = s->t;
    int n = s->n_serving;
    if (n + s->n_changing < p->min) {
        snprintf(reason, len, "%d decode nodes, below --decode-min %d", n + s->n_changing, p->min);
        a->t_last_change = s->t;
        a->n_up++;
        return +1;
    }
    /* Samples taken while the pool changes, or while a new node warms up, say nothing
     * about the pool that will be: start the windows over. */
    if (s->n_changing > 0 || s->t - s->t_last_join < p->warmup_s) {
        a->t_up_since = a->t_down_since = -1;
        return 0;
    }
    double frac = s->kv_total > 0 ? s->kv_reserved / s->kv_total : 1.0;
    char why[200] = "";
    int short_of = 0;
    if (s->waiting > 0 && s->oldest_wait_s > p->wait_age_s) {
        snprintf(why, sizeof why, "%d requests waiting, oldest %.2f s (> %.2f s)", s->waiting,
                 s->oldest_wait_s, p->wait_age_s);
        short_of = 1;
    } else if (frac > p->kv_high) {
        snprintf(why, sizeof why, "KV reserved %.0f%% of the pool (> %.0f%%)", frac * 100,
                 p->kv_high * 100);
        short_of = 1;
    } else if (p->ttft_target_ms > 0 && s->ttft_ms > p->ttft_target_ms) {
        snprintf(why, sizeof why, "TTFT %.0f ms over the target %.0f ms", s->ttft_ms,
                 p->ttft_target_ms);
        short_of = 1;
    } else if (p->tpot_target_ms > 0 && s->tpot_ms > p->tpot_target_ms) {
        snprintf(why, sizeof why, "TPOT %.1f ms over the target %.1f ms", s->tpot_ms,
                 p->tpot_target_ms);
        short_of = 1;
    }
    double less = s->kv_total - s->kv_node_min;
    int slack = !short_of && n > p->min && less > 0 && a->kv_mean <= p->kv_low * less &&
                !(s->waiting > 0 && s->oldest_wait_s > 0.5 * p->wait_age_s) &&
                !(p->ttft_target_ms > 0 && s->ttft_ms > 0.5 * p->ttft_target_ms) &&
                !(p->tpot_target_ms > 0 && s->tpot_ms > 0.8 * p->tpot_target_ms);
    if (short_of) {
        a->t_down_since = -1;
        if (a->t_up_since < 0)
            a->t_up_since = s->t;
    } else {
        a->t_up_since = -1;
    }
    if (slack) {
        if (a->t_down_since < 0)
            a->t_down_since = s->t;
    } else {
        a->t_down_since = -1;
    }
    int cool = s->t - a->t_last_change >= p->cooldown_s;
    if (short_of && s->t - a->t_up_since >= p->up_window_s) {
        if (n >= p->max) {
            snprintf(reason, len, "%s, but at --decode-max %d", why, p->max);
            return 0;
        }
        if (!cool)
            return 0;
        snprintf(reason, len, "%s for %.1f s", why, s->t - a->t_up_since);
        a->t_last_change = s->t;
        a->t_up_since = -1;
        a->n_up++;
        return +1;
    }
    if (slack && s->t - a->t_down_since >= p->down_window_s && cool) {
        snprintf(reason, len,
                 "KV reserved %.0f (mean) of %.0f blocks would fit %d nodes below %.0f%% for %.1f s",
                 a->kv_mean, less, n - 1, p->kv_low * 100, s->t - a->t_down_since);
        a->t_last_change = s->t;
        a->t_down_since = -1;
        a->n_down++;
        return -1;
    }
    return 0;
}
