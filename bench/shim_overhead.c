/* Loop for bench/shim_overhead.py: time malloc+free or pthread_mutex_lock+unlock pairs.
 * usage: shim_overhead malloc|lock PAIRS
 * Runs PAIRS pairs as 5 batches after a warm-up and prints the fastest batch in ns per pair: on a
 * shared machine a batch that lost the CPU says nothing about the code. Built with -fno-builtin so
 * the compiler cannot elide the allocation pair. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BATCHES 5

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 3) { fprintf(stderr, "usage: shim_overhead malloc|lock PAIRS\n"); return 2; }
    int is_malloc = !strcmp(argv[1], "malloc");
    long n = atol(argv[2]) / BATCHES;
    void *volatile sink;
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    double best = 1e30;
    for (int b = -1; b < BATCHES; b++) { /* batch -1 warms up caches and the allocator */
        double t0 = now();
        if (is_malloc)
            for (long i = 0; i < n; i++) { sink = malloc(64); free(sink); }
        else
            for (long i = 0; i < n; i++) { pthread_mutex_lock(&m); pthread_mutex_unlock(&m); }
        double ns = (now() - t0) / n;
        if (b >= 0 && ns < best) best = ns;
    }
    printf("%.3f\n", best);
    return 0;
}
