/* Deliberately buggy program for the crash-triage tests: each mode crashes in one known way.
 *
 * Every function that should appear in a signature is noipa so that gcc neither inlines it nor
 * propagates the (undefined-behaviour) NULL/poison values across calls and deletes the crash.
 * -DLAYOUT_PADDING adds code before the buggy functions so that a rebuilt binary has different
 * addresses and a different build id while the bugs stay the same. */
#define _GNU_SOURCE
#include <assert.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define NOIPA __attribute__((noipa))

/* The use after free below is the point of the program. */
#pragma GCC diagnostic ignored "-Wpragmas"
#pragma GCC diagnostic ignored "-Wuse-after-free"

#ifdef LAYOUT_PADDING
/* Never called: only shifts every following function to a new address. */
NOIPA long layout_padding(long x) {
    volatile long acc = x;
    for (int i = 0; i < 64; i++) acc = acc * 31 + i;
    for (int i = 0; i < 64; i++) acc ^= acc >> 3;
    return acc;
}
#endif

struct estats { long hits; long misses; long bytes; long last; long count; };

/* The pointer sits 40 bytes in so that allocator bookkeeping written into a freed chunk
 * (tcache/fastbin next pointers, jemalloc nothing) does not overwrite it: it keeps the junk fill. */
struct session { long id; long pad[4]; struct estats *stats; long tail[2]; };

/* Work after each call keeps it out of tail position: at -O2 a tail call is a jmp and the
 * caller's frame vanishes from the stack, which would change the signature between builds. */
static volatile long calls;

NOIPA void estats_update(struct estats *e) { e->count++; }
NOIPA void handle_request(struct estats *e) { estats_update(e); calls++; }
NOIPA void serve_loop(struct estats *e, int n) { for (int i = 0; i < n; i++) handle_request(e); }

/* A second, different NULL bug: same class, other function → other bucket. */
struct config { const char *name; long limit; };
NOIPA long config_limit(struct config *c) { return c->limit; }
NOIPA long load_config(struct config *c) { return config_limit(c) + 1; }

/* Use after free: the freed session's memory holds the allocator's junk fill, so s->stats is
 * 0xa5a5… (glibc MALLOC_PERTURB_=165) or 0x5a5a… (jemalloc junk:true): non-canonical. */
NOIPA void session_touch(struct session *s) { s->stats->count++; }
NOIPA void session_expire(struct session *s) { session_touch(s); calls++; }

struct node { struct node *next; struct node *prev; long value; };
#define LIST_POISON1 ((struct node *)0xdead000000000100UL)
#define LIST_POISON2 ((struct node *)0xdead000000000122UL)
NOIPA void list_del(struct node *n) {
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->next = LIST_POISON1;  /* as the Linux kernel's list_del does */
    n->prev = LIST_POISON2;
}
NOIPA long list_walk_value(struct node *n) { return n->next->value; }

NOIPA void session_close(char *buf) { free(buf); calls++; }

NOIPA void config_validate(int limit) { assert(limit > 0); }

NOIPA long parse_term(int depth);
NOIPA long parse_expr(int depth) {
    volatile char scratch[256];  /* a real frame, and no tail call */
    scratch[depth & 255] = (char)depth;
    return parse_term(depth + 1) + scratch[depth & 255];
}
NOIPA long parse_term(int depth) {
    volatile char scratch[128];
    scratch[depth & 127] = (char)depth;
    return parse_expr(depth + 1) + scratch[depth & 127];
}

NOIPA long map_reader(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || ftruncate(fd, 8192) != 0) { perror("map_reader"); exit(3); }
    volatile long *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(3); }
    if (ftruncate(fd, 0) != 0) { perror("ftruncate"); exit(3); }  /* the mapping now runs past EOF */
    return p[600];  /* → SIGBUS, BUS_ADRERR */
}

NOIPA void check_invariant(int ok) { if (!ok) __builtin_trap(); }  /* ud2 → SIGILL */

NOIPA long compute_ratio(long total, long count) { return total / count; }

static struct estats *volatile worker_stats;  /* NULL: the worker thread crashes on it */
NOIPA void worker_step(struct estats *e) { e->bytes += 4096; }
NOIPA void *worker_main(void *arg) { (void)arg; usleep(20000); worker_step(worker_stats); return NULL; }

/* Allocate and touch N MiB so the core is big, then crash like "null". */
static char *volatile big_buf;
NOIPA void big_then_crash(long mib) {
    size_t n = (size_t)mib << 20;
    char *p = malloc(n);
    if (!p) { perror("malloc"); exit(3); }
    big_buf = p;  /* escapes: otherwise gcc drops the memset as a dead store before free() */
    memset(p, 0x11, n);
    /* The bench measures core-dump time from here to the parent's wait() returning. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    fprintf(stderr, "crash-at %ld.%09ld\n", (long)ts.tv_sec, ts.tv_nsec);
    serve_loop(NULL, 1);
    free(p);
}

/* A use-after-free whose poisoned pointer reaches glibc's memcpy/memset: the fault is inside libc's
   vectorised copy (AVX2 or AVX-512 forms, whichever this CPU selects). */
struct message { char *body; size_t len; };
NOIPA void message_copy(struct message *m, char *out) { memcpy(out, m->body, m->len); }
NOIPA void message_clear(struct message *m) { memset(m->body, 0, m->len); }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(mode, "null")) { serve_loop(NULL, 3); }
    else if (!strcmp(mode, "null-other")) { return (int)load_config(NULL); }
    else if (!strcmp(mode, "uaf")) {
        struct session *s = malloc(sizeof *s);
        s->stats = calloc(1, sizeof *s->stats);
        free(s->stats);
        free(s);
        session_expire(s);
    }
    else if (!strcmp(mode, "list-poison")) {
        struct node head = {&head, &head, 0}, a = {0}, b = {0};
        a.next = &b; a.prev = &head; b.next = &head; b.prev = &a; head.next = &a; head.prev = &b;
        list_del(&a);
        return (int)list_walk_value(&a);
    }
    else if (!strcmp(mode, "double-free")) {
        char *buf = malloc(48);
        session_close(buf);
        session_close(buf);
    }
    else if (!strcmp(mode, "assert")) { config_validate(argc - 3); }  /* argc is 2 → limit -1 */
    else if (!strcmp(mode, "stack-overflow")) { return (int)parse_expr(0); }
    else if (!strcmp(mode, "sigbus")) { return (int)map_reader("sigbus.map"); }
    else if (!strcmp(mode, "sigill")) { check_invariant(argc - 2); }
    else if (!strcmp(mode, "fpe")) { return (int)compute_ratio(100, argc - 2); }
    else if (!strcmp(mode, "thread-null")) {
        pthread_t t;
        pthread_create(&t, NULL, worker_main, NULL);
        pthread_join(t, NULL);
    }
    else if (!strcmp(mode, "memcpy-poison") || !strcmp(mode, "memset-poison")) {
        static char out[4096];
        struct message m = {(char *)0x5a5a5a5a5a5a5a5aULL, 256};   /* jemalloc's junk where the pointer was */
        if (mode[3] == 'c') message_copy(&m, out); else message_clear(&m);
    }
    else if (!strcmp(mode, "big")) { big_then_crash(argc > 2 ? atol(argv[2]) : 100); }
    else if (!strcmp(mode, "small")) {  /* like "null", with the crash instant on stderr for the bench */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        fprintf(stderr, "crash-at %ld.%09ld\n", (long)ts.tv_sec, ts.tv_nsec);
        serve_loop(NULL, 1);
    }
    else { fprintf(stderr, "usage: %s MODE\n", argv[0]); return 2; }
    fprintf(stderr, "crasher: mode %s did not crash\n", mode);
    return 1;
}
