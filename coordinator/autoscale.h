/* autoscale.h - when to grow or shrink the decode pool (issue 14). Pure policy: the router
 * feeds it one sample of the cluster's load per turn and applies what it decides (spawn
 * or un-park a node, drain one); no MPI, no clock of its own, so tests drive it with
 * invented samples and times.
 *
 * Up by one when the pool is short for a sustained window: requests wait longer than
 * wait_age_s, or the decode pool's KV reserved fraction is above kv_high, or the recent
 * TTFT/TPOT exceed their targets. Down by one when the load would still fit in one node
 * fewer below kv_low, nothing waits and the latency targets hold, for a sustained (longer)
 * window; "the load" is the reservations averaged over a third of that window, so that a
 * pool whose every request fills a node (KV-bound) can still shrink under light traffic. A cooldown separates changes; while a node joins, drains, or served for less
 * than warmup_s, samples do not count (a new node's first samples are not the pool's).
 * Never below min or above max. */
#ifndef KVR_COORD_AUTOSCALE_H
#define KVR_COORD_AUTOSCALE_H

#include <stddef.h>

struct coord_autoscale_params {
    int min, max;          /* decode nodes; 1 <= min <= max */
    double up_window_s;    /* pressure must last this long */
    double down_window_s;  /* slack must last this long */
    double cooldown_s;     /* between two changes */
    double warmup_s;       /* a new node's samples are ignored this long */
    double wait_age_s;     /* a request waiting longer than this is pressure */
    double kv_high;        /* reserved fraction of the pool above this is pressure */
    double kv_low;         /* shrink only if the reservations fit one node fewer below this */
    double ttft_target_ms; /* 0 = not a signal */
    double tpot_target_ms; /* 0 = not a signal */
};

struct coord_autoscale_sample {
    double t;                /* seconds, any origin, non-decreasing */
    int n_serving;           /* decode nodes taking placements */
    int n_changing;          /* joining, draining or leaving */
    int waiting;             /* requests waiting for decode memory */
    double oldest_wait_s;    /* age of the oldest of them */
    double kv_reserved;      /* blocks reserved on the serving nodes */
    double kv_total;         /* blocks of the serving nodes */
    double kv_node_min;      /* blocks of the smallest serving node (what shrinking removes) */
    double ttft_ms, tpot_ms; /* recent means; < 0 when nothing finished recently */
    double t_last_join;      /* when the newest node started serving (-1e300: never) */
};

struct coord_autoscale {
    struct coord_autoscale_params p;
    double t_up_since, t_down_since; /* start of the current pressure/slack run, or -1 */
    double t_last_change;
    unsigned n_up, n_down;
    double kv_mean;   /* reserved blocks, averaged over about a third of the down window */
    double t_prev;    /* time of the previous sample (-1: none) */
};

/* p must satisfy the bounds above (the coordinator's option table enforces them). */
void coord_autoscale_init(struct coord_autoscale *a, const struct coord_autoscale_params *p);

/* +1 (grow by one), -1 (shrink by one) or 0. reason receives one line saying why (also
 * for 0 when something notable held the decision back, else ""). */
int coord_autoscale_decide(struct coord_autoscale *a, const struct coord_autoscale_sample *s,
                           char *reason, size_t len);

#endif /* KVR_COORD_AUTOSCALE_H */
