/* A small persistent thread pool for the row-parallel kernels.
 *
 * Work is split into contiguous, disjoint ranges, one per thread (or fixed ranges claimed in turn
 * from a counter), so every output row is computed by exactly one call in a fixed order: results
 * do not depend on the thread count.  Workers spin briefly after a job (a decode step issues many
 * short calls back to back), then sleep on a condition variable.  A second caller arriving while
 * a job runs computes its job inline instead of waiting, and a forked child starts with an empty
 * pool. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "ep_internal.h"

#define EP_SPIN_ITERS 20000

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax(void) { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax(void) { __asm__ __volatile__("yield"); }
#else
static inline void cpu_relax(void) {}
#endif

static struct {
    pthread_mutex_t job_lock;   /* one job at a time */
    pthread_mutex_t wake_lock;
    pthread_cond_t wake;
    int nworkers;
    pthread_t tid[EP_MAX_THREADS];
    uint64_t start_gen[EP_MAX_THREADS + 1];
    _Atomic uint64_t gen;       /* bumped once per job */
    _Atomic int pending;        /* participating workers not yet done */
    _Atomic int sleepers;
    ep_range_fn fn;
    ep_team_fn team;            /* set: a team job, fn(ctx, part, nparts) on every part */
    void *ctx;
    int64_t n;
    int claimed;                /* set: [0, n) one index a call, claimed in turn through next */
    _Atomic int64_t next;
    int nparts;
    _Atomic int spin_after;     /* spins a worker makes after this job before sleeping */
} pool = {.job_lock = PTHREAD_MUTEX_INITIALIZER,
        .wake_lock = PTHREAD_MUTEX_INITIALIZER,
        .wake = PTHREAD_COND_INITIALIZER};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void pool_reset_in_child(void) {
    pthread_mutex_init(&pool.job_lock, NULL);
    pthread_mutex_init(&pool.wake_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.nworkers = 0;
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.sleepers, 0);
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_reset_in_child); }

static void run_part(int part) {
    if (pool.team) {
        pool.team(pool.ctx, part, pool.nparts);
        return;
    }
    if (pool.claimed) {
        for (int64_t i; (i = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed)) < pool.n;)
            pool.fn(pool.ctx, i, i + 1);
        return;
    }
    int64_t b = pool.n * part / pool.nparts, e = pool.n * (part + 1) / pool.nparts;
    if (e > b) pool.fn(pool.ctx, b, e);
}

static void *worker_main(void *arg) {
    int part = (int)(intptr_t)arg;
    uint64_t seen = pool.start_gen[part];  /* the job that spawned us may already be posted */
    for (;;) {
        int spins = 0;
        const int spin_limit = atomic_load_explicit(&pool.spin_after, memory_order_relaxed);
        while (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen) {
            if (++spins < spin_limit) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.wake_lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.wake_lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.wake_lock);
        }
        seen = atomic_load(&pool.gen);
        if (part < pool.nparts) {
            run_part(part);
            atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel);
        }
    }
    return NULL;
}

int ep_cpu_count(void) {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int c = CPU_COUNT(&set);
        if (c > 0) return c;
    }
#endif
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c > 0 ? (int)c : 1;
}

int ep_pool_threads(int threads) {
    if (threads <= 0) threads = ep_cpu_count();
    return threads < EP_MAX_THREADS ? threads : EP_MAX_THREADS;
}

/* One job on the pool: fn over [0, n) in ranges (claimed: one index a call, in turn), or team
 * on every part. */
static void run_job(int threads, int64_t n, ep_range_fn fn, ep_team_fn team, void *ctx, int spin_after,
                    int claimed) {
    threads = ep_pool_threads(threads);
    if ((int64_t)threads > n) threads = (int)n;
    if (threads <= 1 || pthread_mutex_trylock(&pool.job_lock) != 0) {
        if (team)
            team(ctx, 0, 1);
        else if (n > 0)
            fn(ctx, 0, n);
        return;
    }
    pthread_once(&atfork_once, register_atfork);
    while (pool.nworkers < threads - 1) {
        int part = pool.nworkers + 1;
        pool.start_gen[part] = atomic_load(&pool.gen);
        if (pthread_create(&pool.tid[pool.nworkers], NULL, worker_main, (void *)(intptr_t)part) != 0)
            break;
        pthread_detach(pool.tid[pool.nworkers]);
        pool.nworkers++;
    }
    if (threads - 1 > pool.nworkers) threads = pool.nworkers + 1;
    pool.fn = fn;
    pool.team = team;
    pool.ctx = ctx;
    pool.n = n;
    pool.nparts = threads;
    pool.claimed = claimed;
    atomic_store_explicit(&pool.next, 0, memory_order_relaxed);
    atomic_store(&pool.spin_after, spin_after);
    atomic_store(&pool.pending, threads - 1);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_seq_cst);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.wake_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.wake_lock);
    }
    run_part(0);
    int spins = 0;
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) {
        if (++spins < EP_SPIN_ITERS) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.job_lock);
}

void ep_parallel_for(int threads, int64_t n, ep_range_fn fn, void *ctx) {
    run_job(threads, n, fn, NULL, ctx, EP_SPIN_ITERS, 0);
}

void ep_parallel_claim(int threads, int64_t n, ep_range_fn fn, void *ctx) {
    run_job(threads, n, fn, NULL, ctx, EP_SPIN_ITERS, 1);
}

void ep_parallel_team(int threads, ep_team_fn fn, void *ctx) {
    run_job(threads, EP_MAX_THREADS, NULL, fn, ctx, EP_SPIN_ITERS, 0);
}

/* For a call between other libraries' parallel work (the scale tuner's kernels between torch's
 * products): the workers sleep as soon as the job is done, instead of spinning on cores the
 * other library's threads are about to use. */
void ep_parallel_for_brief(int threads, int64_t n, ep_range_fn fn, void *ctx) {
    run_job(threads, n, fn, NULL, ctx, 0, 0);
}
