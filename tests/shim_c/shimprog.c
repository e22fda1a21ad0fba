/* Test target for tests/test_shim.py: does exactly the calls it is told to and reports what it saw.
 * Every failure is reported by its 1-based call index, so the test can compare with the mode. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int shimlib_lock(pthread_mutex_t *m); /* tests/shim_c/shimlib.c, only in the "liblock" build */

static void wait_line(void)
{   /* pause until the test writes a line (or closes stdin) */
    char buf[16];
    if (!fgets(buf, sizeof buf, stdin)) return;
}

static void *do_alloc(const char *fn, size_t size, int *bad)
{
    void *p = NULL;
    errno = 0;
    if (!strcmp(fn, "malloc")) p = malloc(size);
    else if (!strcmp(fn, "calloc")) p = calloc(1, size);
    else if (!strcmp(fn, "realloc") || !strcmp(fn, "reallocarray")) {
        void *old = malloc(8); /* not a target: the test limits the slot to realloc */
        p = fn[7] ? reallocarray(old, 1, size) : realloc(old, size);
        if (!p) free(old); /* a failed realloc leaves the old block alone */
    } else if (!strcmp(fn, "posix_memalign")) {
        int rc = posix_memalign(&p, 64, size);
        if (rc) { p = NULL; if (rc != ENOMEM) *bad = 1; }
        return p;
    } else if (!strcmp(fn, "aligned_alloc")) p = aligned_alloc(64, size);
    else if (!strcmp(fn, "memalign")) p = memalign(64, size);
    else if (!strcmp(fn, "valloc")) p = valloc(size);
    else { fprintf(stderr, "unknown function %s\n", fn); exit(2); }
    if (!p && errno != ENOMEM) *bad = 1;
    return p;
}

/* alloc FN SIZE N: N allocations of SIZE bytes, each freed at once; prints the failing indices */
static int cmd_alloc(const char *fn, size_t size, long n)
{
    static long fails[100000];
    long nf = 0;
    int bad = 0;
    for (long i = 1; i <= n; i++) {
        void *p = do_alloc(fn, size, &bad);
        if (!p) { if (nf < 100000) fails[nf] = i; nf++; }
        free(p);
    }
    printf("fails");
    for (long i = 0; i < nf && i < 100000; i++) printf(" %ld", fails[i]);
    printf("\ncount %ld\nerrno %s\n", nf, bad ? "BAD" : "ok");
    return 0;
}

/* sizes S1 S2 ...: one malloc of each size; prints the failing indices */
static int cmd_sizes(int argc, char **argv)
{
    printf("fails");
    for (int i = 0; i < argc; i++) {
        void *p = malloc(strtoul(argv[i], NULL, 0));
        if (!p) printf(" %d", i + 1);
        free(p);
    }
    printf("\n");
    return 0;
}

/* budget BLOCK: keep BLOCK-byte blocks until one fails, report, wait, then exit */
static int cmd_budget(size_t block)
{
    size_t last = 0;
    for (long i = 1; i <= 100000; i++) {
        void *p = malloc(block);
        if (!p) {
            printf("failed %ld last_usable %zu errno %d\n", i, last, errno);
            fflush(stdout);
            wait_line();
            return 0;
        }
        last = malloc_usable_size(p);
    }
    printf("never failed\n");
    return 1;
}

/* lock FN N: N lock calls on a fresh lock; prints failing indices and return codes, and checks that
 * a failed call did not take the lock */
static int cmd_lock(const char *fn, long n)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK); /* unlock of an unheld mutex -> EPERM */
    pthread_mutex_t m;
    pthread_mutex_init(&m, &a);
    pthread_rwlock_t rw = PTHREAD_RWLOCK_INITIALIZER;
    int is_rw = !strncmp(fn, "pthread_rwlock", 14), taken_bad = 0;
    printf("fails");
    for (long i = 1; i <= n; i++) {
        int rc;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 5;
        if (!strcmp(fn, "pthread_mutex_lock")) rc = pthread_mutex_lock(&m);
        else if (!strcmp(fn, "pthread_mutex_trylock")) rc = pthread_mutex_trylock(&m);
        else if (!strcmp(fn, "pthread_mutex_timedlock")) rc = pthread_mutex_timedlock(&m, &ts);
        else if (!strcmp(fn, "pthread_rwlock_rdlock")) rc = pthread_rwlock_rdlock(&rw);
        else if (!strcmp(fn, "pthread_rwlock_wrlock")) rc = pthread_rwlock_wrlock(&rw);
        else if (!strcmp(fn, "pthread_rwlock_tryrdlock")) rc = pthread_rwlock_tryrdlock(&rw);
        else if (!strcmp(fn, "pthread_rwlock_trywrlock")) rc = pthread_rwlock_trywrlock(&rw);
        else { fprintf(stderr, "unknown function %s\n", fn); return 2; }
        if (rc == 0) {
            if (is_rw) pthread_rwlock_unlock(&rw); else pthread_mutex_unlock(&m);
            continue;
        }
        printf(" %ld:%d", i, rc);
        if (is_rw) { /* a try-lock of the other kind succeeds only if nobody, us included, holds it
                      * (and is not the function under test, whose calls are all being counted) */
            int try_rc = strcmp(fn, "pthread_rwlock_trywrlock") ? pthread_rwlock_trywrlock(&rw)
                                                                : pthread_rwlock_tryrdlock(&rw);
            if (try_rc != 0) taken_bad = 1; else pthread_rwlock_unlock(&rw);
        } else if (pthread_mutex_unlock(&m) != EPERM) taken_bad = 1;
    }
    printf("\nnot_taken %s\n", taken_bad ? "BAD" : "ok");
    return 0;
}

/* liblock N: N locks from the executable and N from a shared library */
static int cmd_liblock(long n)
{
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    long exe_fail = 0, lib_fail = 0;
    for (long i = 0; i < n; i++) {
        if (pthread_mutex_lock(&m)) exe_fail++; else pthread_mutex_unlock(&m);
        if (shimlib_lock(&m)) lib_fail++;
    }
    printf("exe_fails %ld\nlib_fails %ld\n", exe_fail, lib_fail);
    return 0;
}

/* poll FN: say "ready", then call FN every millisecond; report the first failure, then the first
 * success after it, and exit (or give up after 60 s) */
static int cmd_poll(const char *fn)
{
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    int seen_failure = 0;
    printf("ready\n");
    fflush(stdout);
    for (long i = 1; i <= 60000; i++) {
        int failed;
        if (!strcmp(fn, "malloc")) { void *p = malloc(4321); failed = !p; free(p); }
        else { failed = pthread_mutex_lock(&m) != 0; if (!failed) pthread_mutex_unlock(&m); }
        if (failed && !seen_failure) { printf("failed at %ld\n", i); fflush(stdout); seen_failure = 1; }
        if (!failed && seen_failure) { printf("recovered at %ld\n", i); return 0; }
        struct timespec d = {0, 1000000};
        nanosleep(&d, NULL);
    }
    printf("timeout\n");
    return 1;
}

/* allocator: report which allocator serves malloc (by its own statistics API), then nth-test malloc */
static int cmd_allocator(long n)
{
    void *big;
    printf("ready\n");
    fflush(stdout);
    wait_line();
    int (*mallctl)(const char *, void *, size_t *, void *, size_t) = dlsym(RTLD_DEFAULT, "mallctl");
    int (*tcprop)(const char *, size_t *) = dlsym(RTLD_DEFAULT, "MallocExtension_GetNumericProperty");
    if (mallctl) {
        unsigned long long before = 0, after = 0;
        size_t sz = sizeof before;
        mallctl("thread.allocated", &before, &sz, NULL, 0);
        big = malloc(1 << 20);
        mallctl("thread.allocated", &after, &sz, NULL, 0);
        printf("jemalloc_grew %d\n", after - before >= (1 << 20));
    } else if (tcprop) {
        size_t before = 0, after = 0;
        tcprop("generic.current_allocated_bytes", &before);
        big = malloc(1 << 20);
        tcprop("generic.current_allocated_bytes", &after);
        printf("tcmalloc_grew %d\n", after - before >= (1 << 20));
    } else {
        big = malloc(1 << 20);
        printf("plain\n");
    }
    free(big);
    fflush(stdout);
    return cmd_alloc("malloc", 777, n);
}

/* mt THREADS ITERS: threads allocating and locking while faults fire; the main thread forks meanwhile */
static pthread_mutex_t shared = PTHREAD_MUTEX_INITIALIZER;
static long iters, thread_fails[64];

static void *worker(void *arg)
{
    long id = (long)arg, fails = 0;
    for (long i = 0; i < iters; i++) {
        char *p = malloc(16 + (size_t)(i % 2000));
        if (p) { p[0] = 1; free(p); } else fails++;
        if (pthread_mutex_lock(&shared) == 0) pthread_mutex_unlock(&shared); else fails++;
    }
    thread_fails[id] = fails;
    return NULL;
}

static int cmd_mt(int nthreads, long n)
{
    pthread_t th[64];
    iters = n;
    for (long i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    pid_t child = fork();
    if (child == 0) { /* the child: one thread, same shim, allocations and locks still work */
        long fails = 0;
        pthread_mutex_t own = PTHREAD_MUTEX_INITIALIZER; /* `shared` may have been held at the fork */
        for (long i = 0; i < 2000; i++) {
            void *p = malloc(100);
            if (p) free(p); else fails++;
            if (pthread_mutex_lock(&own) == 0) pthread_mutex_unlock(&own); else fails++;
        }
        printf("child ok fails %ld\n", fails);
        fflush(stdout);
        _exit(0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    long total = 0;
    for (int i = 0; i < nthreads; i++) { pthread_join(th[i], NULL); total += thread_fails[i]; }
    printf("child_status %d\nparent ok fails %ld\n", status, total);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) { fprintf(stderr, "usage: shimprog MODE ...\n"); return 2; }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "alloc") && argc == 5) return cmd_alloc(argv[2], strtoul(argv[3], NULL, 0), atol(argv[4]));
    if (!strcmp(cmd, "sizes")) return cmd_sizes(argc - 2, argv + 2);
    if (!strcmp(cmd, "budget") && argc == 3) return cmd_budget(strtoul(argv[2], NULL, 0));
    if (!strcmp(cmd, "lock") && argc == 4) return cmd_lock(argv[2], atol(argv[3]));
    if (!strcmp(cmd, "liblock") && argc == 3) return cmd_liblock(atol(argv[2]));
    if (!strcmp(cmd, "poll") && argc == 3) return cmd_poll(argv[2]);
    if (!strcmp(cmd, "allocator") && argc == 3) return cmd_allocator(atol(argv[2]));
    if (!strcmp(cmd, "mt") && argc == 4) return cmd_mt(atoi(argv[2]), atol(argv[3]));
    fprintf(stderr, "bad arguments\n");
    return 2;
}
