/* threadpool.c - parallel loops for the forward pass (see threadpool.h).
 * Tasks are claimed with an atomic counter; each worker checks in once per run. */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "status.h"

/* Spin this long after a loop before sleeping: covers the gap between the short
 * loops of one forward pass without burning a core when idle. */
#define SPIN_NS 100000L

struct kvr_threadpool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint generation;   /* bumped for each run */
    atomic_int next_task;
    atomic_int n_arrived;     /* workers that finished the current run */
    atomic_int stop;
    int n_tasks;
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

static void run_tasks(struct kvr_threadpool *tp, int thread) {
    int n = tp->n_tasks;
    for (;;) {
        int t = atomic_fetch_add_explicit(&tp->next_task, 1, memory_order_relaxed);
        if (t >= n)
            break;
        tp->fn(tp->arg, t, thread);
    }
}

static void *worker_main(void *p) {
    struct worker_arg wa = *(struct worker_arg *)p;
    free(p);
    struct kvr_threadpool *tp = wa.tp;
    unsigned seen = atomic_load(&tp->generation);
    for (;;) {
        long t0 = now_ns();
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&tp->generation, memory_order_acquire)) == seen &&
               !atomic_load(&tp->stop)) {
            if (++spins % 64 == 0 && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&tp->mu);
                while (atomic_load(&tp->generation) == seen && !atomic_load(&tp->stop))
                    pthread_cond_wait(&tp->cv, &tp->mu);
                pthread_mutex_unlock(&tp->mu);
            }
        }
        if (atomic_load(&tp->stop))
            return NULL;
        seen = g;
        run_tasks(tp, wa.index);
        atomic_fetch_add_explicit(&tp->n_arrived, 1, memory_order_release);
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
        if (!wa || pthread_create(&tp->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            tp->n_threads = i; /* join the ones that started */
            kvr_threadpool_free(tp);
            return KVR_ENOMEM;
        }
        wa->tp = tp;
        wa->index = i;
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
    tp->fn = fn;
    tp->arg = arg;
    tp->n_tasks = n_tasks;
    atomic_store(&tp->n_arrived, 0);
    atomic_store(&tp->next_task, 0);
    pthread_mutex_lock(&tp->mu);
    atomic_fetch_add_explicit(&tp->generation, 1, memory_order_release);
    pthread_cond_broadcast(&tp->cv);
    pthread_mutex_unlock(&tp->mu);
    run_tasks(tp, 0);
    /* Every worker checks in for every run, so none can carry a stale view of this
     * run into the next one. */
    while (atomic_load_explicit(&tp->n_arrived, memory_order_acquire) < tp->n_threads - 1)
        ;
}
