/* threadpool.c - parallel loops for the forward pass (see threadpool.h).
 * A run is published as one 64-bit word, generation << 32 | next unclaimed task, and
 * every thread claims tasks by compare-and-swap on it: a late worker can never take a
 * task of a run that has moved on, and the caller waits for the tasks that were claimed,
 * not for every worker to check in. When other processes share the cores, a worker that
 * is not scheduled simply misses the run instead of holding it up. */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#ifdef __SSE2__
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#include "status.h"

/* Task field of a finished run's word while the next run is being set up: no task index
 * reaches it, so a late claim on the finished run sees "nothing left". */
#define RUN_CLOSED 0x7fffffffu

/* Spin this long after a loop before sleeping: covers the gap between the short
 * loops of one forward pass without burning a core when idle. */
#define SPIN_NS 100000L
/* The caller spins this long for claimed tasks to finish, then yields its core (a
 * worker holding a task may be waiting for it). */
#define WAIT_SPIN_NS 20000L

struct kvr_threadpool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t word; /* (generation << 32) | next unclaimed task of the current run */
    atomic_int n_tasks;    /* of the current run; stored after word closes the last run and
                            * before word publishes this one */
    atomic_int n_done;     /* tasks of the current run finished */
    atomic_int n_sleeping; /* workers blocked on cv */
    atomic_int stop;
    /* Read only by a thread that claimed a task of the current run, which the caller
     * does not leave before that task is done: plain fields. */
    void (*fn)(void *arg, int task, int thread);
    void *arg;
};

struct worker_arg {
    struct kvr_threadpool *tp;
    int index;
};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static unsigned word_gen(uint64_t w) { return (unsigned)(w >> 32); }

/* Claims the next task of run gen; 0 when that run has no task left or is over. */
static int claim(struct kvr_threadpool *tp, unsigned gen, int *task) {
    uint64_t w = atomic_load_explicit(&tp->word, memory_order_acquire);
    for (;;) {
        if (word_gen(w) != gen)
            return 0;
        int t = (int)(uint32_t)w;
        /* n_tasks may already belong to the next run. Then word was closed before it was
         * stored (RUN_CLOSED, see kvr_threadpool_run), and the acquire makes this thread
         * see that: the exchange below fails and the reload returns 0. */
        if (t >= atomic_load_explicit(&tp->n_tasks, memory_order_acquire))
            return 0;
        if (atomic_compare_exchange_weak_explicit(&tp->word, &w, w + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            *task = t;
            return 1;
        }
    }
}

static void run_tasks(struct kvr_threadpool *tp, unsigned gen, int thread) {
    int t;
    while (claim(tp, gen, &t)) {
        tp->fn(tp->arg, t, thread);
        atomic_fetch_add_explicit(&tp->n_done, 1, memory_order_release);
    }
}

static void *worker_main(void *p) {
    struct worker_arg wa = *(struct worker_arg *)p;
    free(p);
    struct kvr_threadpool *tp = wa.tp;
    /* Generation 0 is the pool's state at create; a run that started before this thread
     * first ran is still joined (or already over, which is just as good). */
    unsigned seen = 0;
    for (;;) {
        long t0 = now_ns();
        int spins = 0;
        uint64_t w;
        while (word_gen(w = atomic_load_explicit(&tp->word, memory_order_acquire)) == seen &&
               !atomic_load_explicit(&tp->stop, memory_order_relaxed)) {
            CPU_RELAX();
            if (++spins % 64 == 0 && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&tp->mu);
                /* Counted before the check: the caller reads n_sleeping after it publishes
                 * a run, so either we see the run or it sees us and signals. */
                atomic_fetch_add(&tp->n_sleeping, 1);
                while (word_gen(atomic_load(&tp->word)) == seen && !atomic_load(&tp->stop))
                    pthread_cond_wait(&tp->cv, &tp->mu);
                atomic_fetch_sub(&tp->n_sleeping, 1);
                pthread_mutex_unlock(&tp->mu);
                t0 = now_ns();
            }
        }
        if (atomic_load(&tp->stop))
            return NULL;
        seen = word_gen(w);
        run_tasks(tp, seen, wa.index);
    }
}

int kvr_threadpool_create(int n_threads, struct kvr_threadpool **out) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return KVR_EINVAL;
    struct kvr_threadpool *tp = calloc(1, sizeof *tp);
    if (!tp)
        return KVR_ENOMEM;
    tp->n_threads = n_threads;
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->cv, NULL);
    if (n_threads > 1 && !(tp->threads = calloc((size_t)n_threads - 1, sizeof *tp->threads))) {
        kvr_threadpool_free(tp);
        return KVR_ENOMEM;
    }
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            /* Filled before the thread starts: it reads (and frees) wa at once. */
            wa->tp = tp;
            wa->index = i;
        }
        if (!wa || pthread_create(&tp->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            tp->n_threads = i; /* join the ones that started */
            kvr_threadpool_free(tp);
            return KVR_ENOMEM;
        }
    }
    *out = tp;
    return KVR_OK;
}

void kvr_threadpool_free(struct kvr_threadpool *tp) {
    if (!tp)
        return;
    pthread_mutex_lock(&tp->mu);
    atomic_store(&tp->stop, 1);
    pthread_cond_broadcast(&tp->cv);
    pthread_mutex_unlock(&tp->mu);
    for (int i = 1; i < tp->n_threads; i++)
        pthread_join(tp->threads[i - 1], NULL);
    pthread_mutex_destroy(&tp->mu);
    pthread_cond_destroy(&tp->cv);
    free(tp->threads);
    free(tp);
}

int kvr_threadpool_n_threads(const struct kvr_threadpool *tp) { return tp ? tp->n_threads : 1; }

void kvr_threadpool_run(struct kvr_threadpool *tp, void (*fn)(void *arg, int task, int thread),
                        void *arg, int n_tasks) {
    if (n_tasks <= 0)
        return;
    if (!tp || tp->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(arg, t, 0);
        return;
    }
    /* Only this thread writes the generation. Close the last run first: a worker that
     * finished its last task may be in claim() for that run right now, and must not see
     * this run's larger n_tasks next to a task index the old word still allows (it would
     * run a task twice, with fn and arg half written). */
    unsigned old_gen = word_gen(atomic_load_explicit(&tp->word, memory_order_relaxed));
    atomic_store(&tp->word, (uint64_t)old_gen << 32 | RUN_CLOSED);
    tp->fn = fn;
    tp->arg = arg;
    atomic_store_explicit(&tp->n_done, 0, memory_order_relaxed);
    atomic_store_explicit(&tp->n_tasks, n_tasks, memory_order_release);
    unsigned gen = old_gen + 1;
    atomic_store(&tp->word, (uint64_t)gen << 32);
    if (atomic_load(&tp->n_sleeping) > 0) {
        pthread_mutex_lock(&tp->mu);
        pthread_cond_broadcast(&tp->cv);
        pthread_mutex_unlock(&tp->mu);
    }
    run_tasks(tp, gen, 0);
    /* Every task is claimed; wait for the ones other threads still run. */
    if (atomic_load_explicit(&tp->n_done, memory_order_acquire) < n_tasks) {
        long t0 = now_ns();
        int spins = 0;
        while (atomic_load_explicit(&tp->n_done, memory_order_acquire) < n_tasks) {
            CPU_RELAX();
            if (++spins % 64 == 0 && now_ns() - t0 > WAIT_SPIN_NS)
                sched_yield();
        }
    }
}
