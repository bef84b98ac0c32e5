/* test_threadpool.c - common/threadpool.c: every task runs exactly once per run, on a
 * thread index in range, for many runs and pool sizes; a run right after create (the
 * workers may not have started yet), runs after the workers went to sleep, back-to-back
 * runs of alternating sizes (a worker late on one run must not take a task of the next),
 * and the inline paths; the batch-1 split built on it (matmul.h kvr_matmul_b1_run): every
 * row of every part computed exactly once, in whole 16-row slices inside the part, for
 * pool sizes past its 16 ranges too, and a slow thread's range finished by the others.
 * A hang is reported by a watchdog naming the phase, before ctest's timeout would kill
 * the test silently. */
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "matmul.h"
#include "status.h"
#include "threadpool.h"

#define MAX_TASKS 1000

struct job {
    atomic_int count[MAX_TASKS]; /* runs of each task in this run */
    int plain[MAX_TASKS];        /* written without atomics: visible after run returns? */
    atomic_int bad_thread;       /* calls with a thread index out of range */
    int n_threads;
};

static void task_fn(void *arg, int task, int thread) {
    struct job *j = arg;
    atomic_fetch_add(&j->count[task], 1);
    j->plain[task] = task + 1;
    if (thread < 0 || thread >= j->n_threads)
        atomic_fetch_add(&j->bad_thread, 1);
}

static volatile sig_atomic_t phase;
static const char *const phase_names[] = {"start", "many runs", "run right after create",
                                          "runs after the workers slept", "inline paths",
                                          "back-to-back runs", "batch-1 split"};

static atomic_long n_calls;

static void count_fn(void *arg, int task, int thread) {
    (void)arg;
    (void)task;
    (void)thread;
    atomic_fetch_add_explicit(&n_calls, 1, memory_order_relaxed);
}

static void watchdog(int sig) {
    (void)sig;
    const char *name = phase >= 0 && phase < 7 ? phase_names[phase] : "?";
    char msg[160];
    int n = snprintf(msg, sizeof msg,
                     "test_threadpool: no progress for 60 s in phase '%s': a run never returned "
                     "(a worker missed its wake-up)\n",
                     name);
    if (n > 0)
        (void)!write(2, msg, (size_t)n);
    _exit(1);
}

/* Runs n_tasks on tp and checks each ran exactly once; returns the failures. */
static int run_and_check(struct kvr_threadpool *tp, struct job *j, int n_tasks) {
    for (int t = 0; t < MAX_TASKS; t++) {
        atomic_store(&j->count[t], 0);
        j->plain[t] = 0;
    }
    atomic_store(&j->bad_thread, 0);
    j->n_threads = kvr_threadpool_n_threads(tp);
    kvr_threadpool_run(tp, task_fn, j, n_tasks);
    int fails = 0;
    for (int t = 0; t < MAX_TASKS; t++) {
        int want = t < n_tasks ? 1 : 0;
        int got = atomic_load(&j->count[t]);
        if (got != want || j->plain[t] != (want ? t + 1 : 0)) {
            if (fails < 3)
                fprintf(stderr,
                        "  %d threads, %d tasks: task %d ran %d times (plain %d), want %d\n",
                        j->n_threads, n_tasks, t, got, j->plain[t], want);
            fails++;
        }
    }
    if (atomic_load(&j->bad_thread)) {
        fprintf(stderr, "  %d threads: %d calls with a thread index out of range\n", j->n_threads,
                atomic_load(&j->bad_thread));
        fails++;
    }
    return fails;
}

/* ---- the batch-1 split ---------------------------------------------------------- */

#define B1_ROWS_MAX 2100

struct b1_check {
    int n_parts, n_threads;
    int n_rows[3];
    atomic_int count[3][B1_ROWS_MAX]; /* computations of each row */
    atomic_int bad;                   /* calls with a bad range or thread index */
    atomic_int foreign;               /* rows computed outside the caller's own range */
    int slow_thread;                  /* this thread spins a while per call (-1: none) */
};

static void b1_fn(void *arg, int part, int r0, int r1, int thread) {
    struct b1_check *c = arg;
    if (part < 0 || part >= c->n_parts || r0 < 0 || r1 <= r0 || r1 > c->n_rows[part] || r0 % 16 != 0 ||
        (r1 % 16 != 0 && r1 != c->n_rows[part]) || thread < 0 || thread >= c->n_threads) {
        atomic_fetch_add(&c->bad, 1);
        return;
    }
    /* Range t of a part: slices [t * n_sl / R, (t + 1) * n_sl / R), R = min(threads, 16). */
    int R = c->n_threads < 16 ? c->n_threads : 16, n_sl = (c->n_rows[part] + 15) / 16;
    int lo = thread < R ? thread * n_sl / R * 16 : 0, hi = thread < R ? (thread + 1) * n_sl / R * 16 : 0;
    for (int r = r0; r < r1; r++) {
        atomic_fetch_add(&c->count[part][r], 1);
        if (r < lo || r >= hi)
            atomic_fetch_add(&c->foreign, 1);
    }
    if (thread == c->slow_thread) {
        struct timespec ts = {0, 200 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* One kvr_matmul_b1_run over parts of the given rows; returns the failures. */
static int b1_run_and_check(struct kvr_threadpool *tp, struct b1_check *c, int n_parts, const int *rows, int div) {
    c->n_parts = n_parts;
    c->n_threads = kvr_threadpool_n_threads(tp);
    for (int p = 0; p < 3; p++) {
        c->n_rows[p] = p < n_parts ? rows[p] : 0;
        for (int r = 0; r < B1_ROWS_MAX; r++)
            atomic_store(&c->count[p][r], 0);
    }
    atomic_store(&c->bad, 0);
    atomic_store(&c->foreign, 0);
    kvr_matmul_b1_run(tp, n_parts, rows, div, b1_fn, c);
    int fails = atomic_load(&c->bad) != 0;
    for (int p = 0; p < n_parts; p++)
        for (int r = 0; r < rows[p]; r++)
            if (atomic_load(&c->count[p][r]) != 1 && fails++ < 3)
                fprintf(stderr, "  b1 split, %d threads, div %d: part %d row %d of %d computed %d times\n",
                        c->n_threads, div, p, r, rows[p], atomic_load(&c->count[p][r]));
    return fails;
}

static void rearm(int p) {
    phase = p;
    alarm(60);
}

int main(void) {
    static struct job j; /* large: not on the stack */
    signal(SIGALRM, watchdog);
    rearm(0);

    struct kvr_threadpool *tp = NULL;
    CHECK_EQ(kvr_threadpool_create(0, &tp), KVR_EINVAL);
    CHECK(tp == NULL);
    CHECK_EQ(kvr_threadpool_create(-3, &tp), KVR_EINVAL);
    CHECK_EQ(kvr_threadpool_n_threads(NULL), 1);
    kvr_threadpool_free(NULL);

    /* Many runs of varied sizes on pools of 1..4 threads (more threads than cores too). */
    rearm(1);
    static const int sizes[] = {0, 1, 2, 3, 7, 64, 1000, 5, 2, 999};
    int fails = 0, runs = 0;
    for (int nt = 1; nt <= 4; nt++) {
        REQUIRE(kvr_threadpool_create(nt, &tp) == KVR_OK);
        CHECK_EQ(kvr_threadpool_n_threads(tp), nt);
        for (int rep = 0; rep < 300; rep++) {
            fails += run_and_check(tp, &j, sizes[rep % 10]);
            runs++;
        }
        kvr_threadpool_free(tp);
    }
    fprintf(stderr, "many runs: %d runs, %d failures\n", runs, fails);
    CHECK_EQ(fails, 0);

    /* A run at once after create: the workers may still be starting. */
    rearm(2);
    fails = 0;
    for (int rep = 0; rep < 300; rep++) {
        REQUIRE(kvr_threadpool_create(2 + rep % 2, &tp) == KVR_OK);
        fails += run_and_check(tp, &j, 100);
        kvr_threadpool_free(tp);
        if (rep % 50 == 0)
            alarm(60);
    }
    fprintf(stderr, "run right after create: 300 pools, %d failures\n", fails);
    CHECK_EQ(fails, 0);

    /* Workers spin briefly, then sleep: runs after a pause must wake them. */
    rearm(3);
    fails = 0;
    REQUIRE(kvr_threadpool_create(3, &tp) == KVR_OK);
    for (int rep = 0; rep < 20; rep++) {
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
        fails += run_and_check(tp, &j, 50 + rep);
    }
    kvr_threadpool_free(tp);
    CHECK_EQ(fails, 0);

    /* NULL pool and one-thread pool run inline on thread 0. */
    rearm(4);
    CHECK_EQ(run_and_check(NULL, &j, 10), 0);
    REQUIRE(kvr_threadpool_create(1, &tp) == KVR_OK);
    CHECK_EQ(run_and_check(tp, &j, MAX_TASKS), 0);
    kvr_threadpool_free(tp);

    /* Tiny runs back to back, 2 then 64 tasks: a worker that just finished the last task
     * of a 2-task run is still claiming when the caller sets up the 64-task one. Before
     * the pool closed the old run first, that worker could take "task 2" of the old run
     * under the new task count, and the new run then handed task 2 out again: about 1 in
     * 70 runs did a task twice on this 2-core machine. Counted, not checked per run, so
     * that the runs follow each other as closely as in a forward pass. */
    rearm(5);
    for (int nt = 2; nt <= 3; nt++) {
        REQUIRE(kvr_threadpool_create(nt, &tp) == KVR_OK);
        atomic_store(&n_calls, 0);
        long want = 0;
        for (int r = 0; r < 200000; r++) {
            int n = r % 2 ? 64 : 2;
            kvr_threadpool_run(tp, count_fn, NULL, n);
            want += n;
        }
        kvr_threadpool_free(tp);
        long got = atomic_load(&n_calls);
        fprintf(stderr, "back-to-back runs on %d threads: %ld task calls, want %ld\n", nt, got,
                want);
        CHECK_EQ(got, want);
    }

    /* The batch-1 split: parts of rows that are and are not whole slices, fewer slices
     * than threads, every claim share, 1..5 threads and 20 (past the 16 ranges: those
     * threads own nothing and only take from the others). */
    rearm(6);
    static struct b1_check bc;
    static const int b1_rows[][3] = {{1, 15, 16}, {17, 100, 768}, {2048, 33, 2100}, {48, 64, 80}};
    static const int b1_threads[] = {1, 2, 3, 5, 20};
    fails = 0;
    runs = 0;
    bc.slow_thread = -1;
    for (size_t ti = 0; ti < sizeof b1_threads / sizeof b1_threads[0]; ti++) {
        REQUIRE(kvr_threadpool_create(b1_threads[ti], &tp) == KVR_OK);
        for (int rep = 0; rep < 200; rep++) {
            fails += b1_run_and_check(rep % 7 ? tp : NULL, &bc, 1 + rep % 3, b1_rows[rep % 4], 1 + rep % 4);
            runs++;
        }
        kvr_threadpool_free(tp);
    }
    fprintf(stderr, "batch-1 split: %d runs, %d failures\n", runs, fails);
    CHECK_EQ(fails, 0);
    /* A slow thread (a core taken by another process): the other finishes its range. */
    REQUIRE(kvr_threadpool_create(2, &tp) == KVR_OK);
    int foreign_runs = 0;
    for (int rep = 0; rep < 20 && foreign_runs == 0; rep++) {
        bc.slow_thread = rep % 2;
        static const int big[1] = {2048};
        CHECK_EQ(b1_run_and_check(tp, &bc, 1, big, 4), 0);
        foreign_runs += atomic_load(&bc.foreign) > 0;
    }
    kvr_threadpool_free(tp);
    fprintf(stderr, "batch-1 split with a slow thread: rows taken from its range: %s\n",
            foreign_runs ? "yes" : "never in 20 runs");
    CHECK(foreign_runs > 0);
    alarm(0);
    CHECK_DONE();
}
