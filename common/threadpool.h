/* threadpool.h - a fixed set of worker threads that run one parallel loop at a time.
 * The caller's thread takes part as thread 0. Workers spin briefly between loops (a
 * forward pass issues many short loops back to back), then sleep on a condition
 * variable, so an idle node costs no CPU. Tasks are claimed one by one and the caller
 * waits only for tasks already claimed: a worker that is descheduled (other processes on
 * the same cores) misses a loop instead of stalling it. */
#ifndef KVR_THREADPOOL_H
#define KVR_THREADPOOL_H

struct kvr_threadpool;

/* n_threads counts the caller: 1 means no worker threads. KVR_EINVAL, KVR_ENOMEM.
 * Returns owned *out, free with kvr_threadpool_free. */
int kvr_threadpool_create(int n_threads, struct kvr_threadpool **out);

/* Joins the workers. Accepts NULL. */
void kvr_threadpool_free(struct kvr_threadpool *tp);

int kvr_threadpool_n_threads(const struct kvr_threadpool *tp);

/* Runs fn(arg, task, thread) for task in [0, n_tasks) across the threads and returns
 * when all are done. thread is in [0, n_threads): index per-thread scratch with it.
 * Not reentrant: one run at a time per pool. tp may be NULL (runs inline). */
void kvr_threadpool_run(struct kvr_threadpool *tp, void (*fn)(void *arg, int task, int thread),
                        void *arg, int n_tasks);

#endif /* KVR_THREADPOOL_H */
