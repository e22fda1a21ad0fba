/* Loop for bench/shim_overhead.py: time N malloc+free or pthread_mutex_lock+unlock pairs.
 * Built with -fno-builtin so the compiler cannot elide the allocation pair. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 3) { fprintf(stderr, "usage: shim_overhead malloc|lock N\n"); return 2; }
    long n = atol(argv[2]);
    void *volatile sink;
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    double t0, t1;
    if (!strcmp(argv[1], "malloc")) {
        for (long i = 0; i < n / 10; i++) { sink = malloc(64); free(sink); } /* warm up */
        t0 = now();
        for (long i = 0; i < n; i++) { sink = malloc(64); free(sink); }
        t1 = now();
    } else {
        for (long i = 0; i < n / 10; i++) { pthread_mutex_lock(&m); pthread_mutex_unlock(&m); }
        t0 = now();
        for (long i = 0; i < n; i++) { pthread_mutex_lock(&m); pthread_mutex_unlock(&m); }
        t1 = now();
    }
    printf("%.3f\n", (t1 - t0) / n);
    return 0;
}
