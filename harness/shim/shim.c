/*
 * harness fault shim: an LD_PRELOAD library that makes allocation and lock calls fail on demand.
 *
 * Load it FIRST in LD_PRELOAD ("shim.so:/usr/lib/.../libjemalloc.so.2"): the loader binds malloc to the
 * first definition, and dlsym(RTLD_NEXT, ...) from here then finds the allocator placed after us. The
 * constructor records where the process's malloc is bound, so "not first" is visible in the counters.
 *
 * Control: $HARNESS_SHIM_CONTROL names a 4096-byte file the harness created (harness/shim/control.py;
 * the layout is `struct control` below). It is mapped MAP_SHARED in the constructor and read with
 * relaxed loads: no locks, no syscalls, no allocation on the hot path. Without the variable (or with a
 * bad file) the shim is a pass-through that still counts, into a private dummy block.
 *
 * A failed call never reaches the real function: malloc & co return NULL with errno ENOMEM
 * (posix_memalign returns ENOMEM), operator new throws std::bad_alloc (see cxx_new), and a lock call
 * returns the slot's errno without taking the lock.
 *
 * Cost model (why the code looks the way it does):
 *  - unarmed: one 64-bit load of (armed bits, generation) decides; per-function counts and the live
 *    heap delta stay in thread-local memory and are added to shared memory in batches (every 256
 *    calls of a function, LIVE_SLACK bytes of heap change, every injection, thread and process
 *    exit, fork), so no locked instruction runs per call;
 *  - armed: each thread keeps private copies ("snapshots") of the armed slots and, per function, a
 *    mask of the slots that apply, rebuilt only when that word changes; a call then checks just its
 *    candidate slots. random draws the gap to its next failure instead of a coin per call;
 *  - live bytes need the usable size of every block; glibc's malloc_usable_size costs ~2 ns, so for
 *    glibc (checked at start-up) the chunk header is read directly (see usable()).
 *
 * Publication (writer: control.py, reader: refresh_slot()). To arm a slot the harness clears its
 * armed bit, makes slot.gen odd, writes the fields and zeroes the slot's counters, makes slot.gen
 * even, bumps header.generation and finally sets the armed bit: single aligned stores, which x86-64
 * makes visible in program order. Every step changes the (armed, generation) word, so each thread
 * re-copies; it copies a slot between two loads of slot.gen and keeps the copy only if both are
 * equal and even (a seqlock), so it never acts on a half-written slot.
 *
 * Caller filters compare __builtin_return_address(0) with address ranges. The main executable's
 * range is computed once in the constructor. Named modules are looked up with dl_iterate_phdr when a
 * thread copies a slot whose filter names modules (once per thread per arming): never for unarmed
 * calls and never while nested inside the next allocator. The shim holds no lock of its own then,
 * and glibc's dl_iterate_phdr takes only its recursive dl_load_write_lock, which the loader holds
 * briefly and never while calling malloc, so this cannot deadlock with the loader. Modules
 * dlopen'ed after a slot was armed are matched once it is armed again (interposing dlopen would
 * change the caller glibc uses for $ORIGIN and RUNPATH).
 *
 * Processes: every process started with the environment attaches (forked children and exec'd
 * programs too). Calls and slot counters are totals over them; an nth/after ordinal is shared.
 * Live and peak heap bytes are per process (a forked child starts from its parent's figure).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_RELAXED)
#define RA ((uintptr_t)__builtin_return_address(0))

/* ---- control file layout: mirrored by control.py, offsets are the format ---- */
#define MAGIC 0x314d4948534e5248ULL /* "HRNSHIM1" little-endian */
#define VERSION 1
#define NSLOT 8
#define NFUNC 21
#define NPROC 8
#define MAXR 3 /* address ranges per caller filter: exe + up to 2 modules (more are ignored) */

enum { F_MALLOC, F_CALLOC, F_REALLOC, F_REALLOCARRAY, F_POSIX_MEMALIGN, F_ALIGNED_ALLOC, F_MEMALIGN,
       F_VALLOC, F_NEW, F_NEW_ARRAY, F_NEW_NOTHROW, F_NEW_ARRAY_NOTHROW, F_FREE, F_DELETE,
       F_MUTEX_LOCK, F_MUTEX_TRYLOCK, F_MUTEX_TIMEDLOCK, F_RDLOCK, F_WRLOCK, F_TRYRDLOCK, F_TRYWRLOCK };
enum { K_NONE, K_ALLOC, K_LOCK };
#define ALLOC_FUNCS ((1u << (F_NEW_ARRAY_NOTHROW + 1)) - 1)               /* malloc .. operator new[] nothrow */
#define LOCK_FUNCS (((1u << (F_TRYWRLOCK + 1)) - 1) & ~((1u << F_MUTEX_LOCK) - 1)) /* the pthread locks */
enum { M_NONE, M_RANDOM, M_NTH, M_AFTER, M_BUDGET };
enum { C_ANY = 1, C_EXE = 2, C_NAMED = 4 };
enum { P_ATTACHED = 1, P_SHIM_FIRST = 2, P_LIVE_TRACKED = 4, P_CXX = 8, P_EXITED = 16 };

struct header {
    uint64_t magic;
    uint32_t version, size;
    uint64_t seed;
    union {                         /* read as one 64-bit word: the only load of an unarmed call */
        struct { uint32_t armed, generation; };
        uint64_t state;
    };
    uint32_t host_index, attached, last_pid, nslots, nfuncs, reserved[3];
};
struct slot {                       /* written by the harness only */
    uint32_t gen, kind, mode, functions;
    uint64_t param;                 /* random: p * 2^64; nth: n; after: N; budget: bytes */
    uint64_t min_size, max_size;
    int64_t times;                  /* failures left to inject in total; -1 = unlimited */
    int32_t err;
    uint32_t callers;               /* C_* bits */
    char names[3][24];              /* module name substrings when C_NAMED */
};
struct slot_counters {              /* written by the shim; own cache line, apart from the config */
    uint64_t eligible, injected;
    uint32_t matched, pad;          /* matched: address ranges found for the caller filter */
    uint64_t first_ns, last_ns;     /* CLOCK_MONOTONIC of the first and latest injection (0 = none) */
    uint32_t reserved[6];
};
struct proc {                       /* one per process attached to this file */
    uint32_t pid, flags;
    int64_t live, peak;
    uint64_t reserved;
    char malloc_from[48], bound_from[48];
};
struct control {
    struct header h;                /*    0 */
    struct slot slot[NSLOT];        /*   64 */
    struct slot_counters sc[NSLOT]; /* 1088 */
    uint64_t calls[32];             /* 1600 */
    struct proc proc[NPROC];        /* 1856 */
    char pad[4096 - 2880];
};
_Static_assert(sizeof(struct header) == 64 && sizeof(struct slot) == 128, "layout");
_Static_assert(sizeof(struct slot_counters) == 64, "layout");
_Static_assert(offsetof(struct control, sc) == 1088 && offsetof(struct control, calls) == 1600, "layout");
_Static_assert(offsetof(struct control, proc) == 1856 && sizeof(struct control) == 4096, "layout");

static struct control dummy;        /* used until (or instead of) the real file: same code path */
static struct control *ctl = &dummy;
static struct proc *me = &dummy.proc[0];

/* ---- next definitions ---- */
static struct {
    void *(*malloc)(size_t);
    void *(*calloc)(size_t, size_t);
    void *(*realloc)(void *, size_t);
    void *(*reallocarray)(void *, size_t, size_t);
    int (*posix_memalign)(void **, size_t, size_t);
    void *(*aligned_alloc)(size_t, size_t);
    void *(*memalign)(size_t, size_t);
    void *(*valloc)(size_t);
    void (*free)(void *);
    size_t (*usable)(void *);
    int (*mutex_lock)(pthread_mutex_t *);
    int (*mutex_trylock)(pthread_mutex_t *);
    int (*mutex_timedlock)(pthread_mutex_t *, const struct timespec *);
    int (*rdlock)(pthread_rwlock_t *);
    int (*wrlock)(pthread_rwlock_t *);
    int (*tryrdlock)(pthread_rwlock_t *);
    int (*trywrlock)(pthread_rwlock_t *);
    void *(*new_[2])(size_t);                   /* _Znwm, _Znam */
    void *(*new_nothrow[2])(size_t, const void *);
    void (*del[2])(void *);                     /* _ZdlPv, _ZdaPv */
    void (*del_sized[2])(void *, size_t);
    void (*del_nothrow[2])(void *, const void *);
} real;

/* ---- per-thread state; initial-exec TLS so no allocation or lock is needed to reach it ---- */
#define LIVE_SLACK (64 << 10)
struct snap {                       /* this thread's validated copy of one slot */
    uint64_t min_size, span;        /* span = max_size - min_size: one unsigned compare tests both */
    uint64_t param, skip;           /* skip (random): eligible calls left up to the next failure */
    uint32_t callers, mode, nr, pend; /* pend: eligible calls (random, budget) not yet published */
    uint32_t gen, kind, functions, valid;
    int32_t err, index;
    int64_t times;
    uintptr_t lo[MAXR], hi[MAXR];
};
_Static_assert(sizeof(struct snap) == 128, "a power of two keeps the index arithmetic to a shift");
/* A thread's state: S_READY takes the fast path; anything else goes through enter_slow(). One TLS
 * word, so the fast path tests it once. S_NESTED: inside the shim or the next allocator, calls pass
 * straight through (the allocator's own lock calls, libstdc++'s malloc under operator new). */
enum { S_NEW, S_READY, S_NESTED, S_EXITING };
struct tstate {
    int state;
    int resolving;                  /* inside resolve(): allocations come from the arena */
    uint64_t rng;
    int64_t delta, dmax;            /* live bytes not yet folded into `live`, and its high-water mark */
    int64_t slack, neg_slack;       /* publish when delta leaves [neg_slack, slack]; 0/-1 once exiting */
    uint8_t calls[NFUNC];           /* calls not yet published, modulo 256 (a wrap publishes 256) */
    uint64_t seen;                  /* header.state the snapshots below were taken at */
    uint8_t fslots[NFUNC];          /* per function: the armed slots (bits) that apply to it */
    struct snap snap[NSLOT];
};
static __thread struct tstate ts __attribute__((tls_model("initial-exec")));

static int64_t live, peak;          /* this process's heap: private memory, so a forked child keeps its own */
static uint32_t next_ordinal, forks, proc_flags;
static uintptr_t exe_lo, exe_hi;
static pthread_key_t exit_key;
static int have_key;
static char malloc_from[48], bound_from[48];

static void say(const char *a, const char *b)
{   /* stderr without stdio: stdio may allocate */
    if (write(2, "harness-shim: ", 14) < 0 || write(2, a, strlen(a)) < 0 || write(2, b, strlen(b)) < 0) return;
    if (write(2, "\n", 1) < 0) return;
}

static void die(const char *why)
{
    say(why, "");
    abort();
}

/* ---- bootstrap arena: dlsym may calloc before the next malloc is known. Never NULL, never freed ---- */
static char arena[64 << 10] __attribute__((aligned(4096)));
static size_t arena_used;

static int in_arena(const void *p) { return (uintptr_t)p - (uintptr_t)arena < sizeof arena; }

static void *arena_alloc(size_t size, size_t align)
{
    if (align < 16) align = 16;
    size_t old = LOAD(&arena_used), start, end;
    do {
        start = (old + 16 + align - 1) & ~(align - 1); /* 16 bytes before each block hold its size */
        end = start + ((size + 15) & ~(size_t)15);
        if (end > sizeof arena || end < start) die("bootstrap arena exhausted");
    } while (!__atomic_compare_exchange_n(&arena_used, &old, end, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *(size_t *)(arena + start - 16) = size;
    return arena + start; /* static memory, never handed out twice: already zero for calloc */
}

static void resolve(void)
{
    struct tstate *t = &ts;
    if (t->resolving) return; /* dlsym re-entered us: the caller falls back to the arena */
    int was = t->state;
    t->resolving = 1;
    t->state = S_NESTED;
    /* Resolve the allocator into temporaries and publish malloc last: a non-NULL real.malloc
     * promises that free and malloc_usable_size are known too. */
    void *f = dlsym(RTLD_NEXT, "free"), *u = dlsym(RTLD_NEXT, "malloc_usable_size");
    real.calloc = dlsym(RTLD_NEXT, "calloc");
    real.realloc = dlsym(RTLD_NEXT, "realloc");
    real.reallocarray = dlsym(RTLD_NEXT, "reallocarray");
    real.posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    real.aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    real.memalign = dlsym(RTLD_NEXT, "memalign");
    real.valloc = dlsym(RTLD_NEXT, "valloc");
    real.mutex_lock = dlsym(RTLD_NEXT, "pthread_mutex_lock");
    real.mutex_trylock = dlsym(RTLD_NEXT, "pthread_mutex_trylock");
    real.mutex_timedlock = dlsym(RTLD_NEXT, "pthread_mutex_timedlock");
    real.rdlock = dlsym(RTLD_NEXT, "pthread_rwlock_rdlock");
    real.wrlock = dlsym(RTLD_NEXT, "pthread_rwlock_wrlock");
    real.tryrdlock = dlsym(RTLD_NEXT, "pthread_rwlock_tryrdlock");
    real.trywrlock = dlsym(RTLD_NEXT, "pthread_rwlock_trywrlock");
    static const char *const cxx[10] = {"_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t",
        "_ZdlPv", "_ZdaPv", "_ZdlPvm", "_ZdaPvm", "_ZdlPvRKSt9nothrow_t", "_ZdaPvRKSt9nothrow_t"};
    void **slots[10] = {(void **)&real.new_[0], (void **)&real.new_[1], (void **)&real.new_nothrow[0],
        (void **)&real.new_nothrow[1], (void **)&real.del[0], (void **)&real.del[1], (void **)&real.del_sized[0],
        (void **)&real.del_sized[1], (void **)&real.del_nothrow[0], (void **)&real.del_nothrow[1]};
    for (int i = 0; i < 10; i++) if (!*slots[i]) *slots[i] = dlsym(RTLD_NEXT, cxx[i]);
    real.free = f;
    real.usable = u;
    void *m = dlsym(RTLD_NEXT, "malloc");
    if (!m || !f || !real.calloc || !real.realloc) die("cannot resolve the next malloc/free (is libc loaded?)");
    __atomic_store_n(&real.malloc, (void *(*)(size_t))m, __ATOMIC_RELEASE);
    t->state = was;
    t->resolving = 0;
}

/* ---- counting and flushing ---- */
static void flush_live(struct tstate *t)
{
    int64_t base = ADD(&live, t->delta) - t->delta, now = base + t->delta;
    int64_t top = base + t->dmax > now ? base + t->dmax : now; /* highest point this thread saw */
    t->delta = t->dmax = 0;
    int64_t pk = LOAD(&peak);
    while (top > pk && !__atomic_compare_exchange_n(&peak, &pk, top, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    STORE(&me->live, now);
    STORE(&me->peak, LOAD(&peak));
}

static void flush(struct tstate *t)
{
    for (int f = 0; f < NFUNC; f++)
        if (t->calls[f]) { ADD(&ctl->calls[f], t->calls[f]); t->calls[f] = 0; }
    for (int i = 0; i < NSLOT; i++)
        if (t->snap[i].pend) { /* drop counts that belong to an earlier arming of the slot */
            if (LOAD(&ctl->slot[i].gen) == t->snap[i].gen) ADD(&ctl->sc[i].eligible, t->snap[i].pend);
            t->snap[i].pend = 0;
        }
    flush_live(t);
}

static uint64_t mix(uint64_t z)
{   /* splitmix64 finaliser */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rng_next(struct tstate *t)
{   /* splitmix64: private per thread, never touches the target's random() */
    return mix(t->rng += 0x9e3779b97f4a7c15ULL);
}

/* random mode: rather than a coin per call, draw the number of eligible calls up to and including
 * the next failure from the geometric distribution with parameter p (the same law as independent
 * coins, and the hot path only decrements). p = threshold / 2^64. */
static uint64_t next_gap(struct tstate *t, uint64_t threshold)
{
    if (threshold == 0) return UINT64_MAX;
    double p = (double)threshold * 0x1p-64;
    if (p >= 1.0) return 1;
    double u = (double)((rng_next(t) >> 11) + 1) * 0x1p-53; /* (0, 1] */
    double gap = floor(log(u) / log1p(-p)) + 1.0;
    return gap >= 0x1p63 ? UINT64_MAX : (uint64_t)gap;
}

static void thread_init(struct tstate *t)
{
    uint32_t ordinal = __atomic_fetch_add(&next_ordinal, 1, __ATOMIC_RELAXED);
    t->rng = mix(mix(LOAD(&ctl->h.seed)) ^ mix(((uint64_t)LOAD(&ctl->h.host_index) << 32) | ordinal));
    t->slack = LIVE_SLACK;
    t->neg_slack = -LIVE_SLACK;
    if (have_key) { /* so that thread exit flushes; may calloc, hence nested */
        t->state = S_NESTED;
        pthread_setspecific(exit_key, (void *)1);
    }
    t->state = S_READY;
}

/* Off the fast path: returns 0 when the call must pass straight through (nested, or too early). */
static int __attribute__((noinline)) enter_slow(struct tstate *t)
{
    if (t->state == S_NESTED || t->resolving) return 0;
    if (!real.malloc) resolve();
    if (!real.malloc) return 0;
    if (t->state == S_NEW) thread_init(t);
    else flush(t); /* S_EXITING: publish every call (the last one of a dying thread is lost) */
    return 1;
}

static void __attribute__((noinline)) flush_wrapped(struct tstate *t, int fn)
{
    ADD(&ctl->calls[fn], 256);
    flush(t);
}

static inline void count(struct tstate *t, int fn)
{
    if (UNLIKELY(++t->calls[fn] == 0)) flush_wrapped(t, fn);
}

static inline void grow(struct tstate *t, size_t n)
{
    t->delta += (int64_t)n;
    if (t->delta > t->dmax) { /* a new high-water mark; past the slack, publish */
        t->dmax = t->delta;
        if (UNLIKELY(t->delta > t->slack)) flush_live(t);
    }
}

static inline void shrink(struct tstate *t, size_t n)
{
    t->delta -= (int64_t)n;
    if (UNLIKELY(t->delta < t->neg_slack)) flush_live(t);
}

/* glibc's malloc_usable_size costs about 2 ns per call (measured here), more than the rest of the
 * hot path. When the next malloc is glibc's and a start-up check agrees, read the chunk header
 * instead: the same formula as glibc's musable() (size field without flag bits, minus the header:
 * 16 bytes for mmapped chunks, 8 otherwise). Any other allocator is asked through its own function. */
static int glibc_headers;

/* Other allocators may call back into us from malloc_usable_size (tcmalloc's reaches operator new
 * through MallocExtension::instance()), so that call is nested too. */
static size_t __attribute__((noinline)) usable_next(void *p)
{
    struct tstate *t = &ts;
    int prev = t->state;
    t->state = S_NESTED;
    size_t n = real.usable ? real.usable(p) : 0;
    t->state = prev;
    return n;
}

static inline size_t chunk_usable(void *p)
{
    size_t h = ((size_t *)p)[-1];
    return (h & ~(size_t)7) - 8 - ((h & 2) << 2); /* IS_MMAPPED (2) chunks have 8 more */
}

static inline size_t usable(void *p) { return LIKELY(glibc_headers) ? chunk_usable(p) : usable_next(p); }

static void check_glibc_headers(void)
{
    static const size_t sizes[] = {1, 24, 100, 1000, 5000, 70000, 300000 /* mmapped */};
    if (!real.usable || strcmp(malloc_from, "libc.so.6")) return;
    glibc_headers = 1;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        void *p = real.malloc(sizes[k]);
        if (p && usable(p) != real.usable(p)) glibc_headers = 0;
        real.free(p);
    }
}

/* Call into the next allocator marked nested, so that its own interposable calls (jemalloc's mutex
 * locks, libstdc++'s malloc under operator new) pass straight through. glibc's malloc makes no such
 * calls, so for it the two stores are skipped. */
#define CALL_NEXT(t, expr)                                                                    \
    do {                                                                                     \
        if (LIKELY(glibc_headers)) { expr; break; }                                          \
        int prev_ = (t)->state;                                                              \
        (t)->state = S_NESTED;                                                               \
        expr;                                                                                \
        (t)->state = prev_;                                                                  \
    } while (0)

/* ---- deciding ---- */
static void range_of(struct dl_phdr_info *info, uintptr_t *lo, uintptr_t *hi)
{
    *lo = UINTPTR_MAX;
    *hi = 0;
    for (int k = 0; k < info->dlpi_phnum; k++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[k];
        if (ph->p_type != PT_LOAD) continue;
        uintptr_t a = info->dlpi_addr + ph->p_vaddr;
        if (a < *lo) *lo = a;
        if (a + ph->p_memsz > *hi) *hi = a + ph->p_memsz;
    }
}

struct match { struct snap *s; char (*names)[24]; };

static int match_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    struct match *m = data;
    (void)size;
    if (!info->dlpi_name || !info->dlpi_name[0]) return 0; /* the executable: use "exe" for it */
    for (int k = 0; k < 3; k++)
        if (m->names[k][0] && strstr(info->dlpi_name, m->names[k]) && m->s->nr < MAXR) {
            range_of(info, &m->s->lo[m->s->nr], &m->s->hi[m->s->nr]);
            m->s->nr++;
            break;
        }
    return 0;
}

/* Copy slot i into this thread's snapshot (seqlock read, see the top of the file). Returns 0 when
 * the slot was being written (try again later); `valid` says whether the copy can be used. */
static int refresh_slot(struct tstate *t, int i, uint32_t g)
{
    struct slot *sl = &ctl->slot[i];
    struct snap *s = &t->snap[i];
    char names[3][24];
    s->pend = 0; /* eligible counts of the previous arming: the harness zeroed the counter anyway */
    s->index = i;
    s->gen = g;
    s->valid = 0;
    if (g & 1) return 0; /* being written right now */
    s->kind = LOAD(&sl->kind);
    s->mode = LOAD(&sl->mode);
    s->functions = LOAD(&sl->functions);
    s->param = LOAD(&sl->param);
    s->min_size = LOAD(&sl->min_size);
    uint64_t max_size = LOAD(&sl->max_size);
    s->span = max_size - s->min_size;
    s->times = LOAD(&sl->times);
    s->err = LOAD(&sl->err);
    s->callers = LOAD(&sl->callers);
    for (int k = 0; k < 3; k++) {
        for (int c = 0; c < 23; c++) names[k][c] = LOAD(&sl->names[k][c]);
        names[k][23] = 0;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LOAD(&sl->gen) != g) return 0;
    s->nr = 0;
    if ((s->callers & C_EXE) && exe_hi) { s->lo[0] = exe_lo; s->hi[0] = exe_hi; s->nr = 1; }
    if (s->callers & C_NAMED) {
        struct match m = {s, names};
        dl_iterate_phdr(match_cb, &m);
    }
    STORE(&ctl->sc[i].matched, s->nr);
    if (s->mode == M_RANDOM) s->skip = next_gap(t, s->param);
    /* control.py never writes these, but a damaged file must not make us divide by zero */
    s->valid = max_size >= s->min_size && (s->kind == K_ALLOC || s->kind == K_LOCK) &&
               s->mode >= M_RANDOM && s->mode <= M_BUDGET && (s->mode != M_NTH || s->param);
    return 1;
}

/* header.state (armed bits, generation) changed: re-copy the slots whose gen changed and rebuild
 * the per-function masks of armed slots. If an armed slot could not be copied (being written),
 * `seen` stays stale so that the next call tries again. */
static uint32_t __attribute__((noinline)) refresh(struct tstate *t, int fn)
{
    uint64_t w = LOAD_ACQ(&ctl->h.state);
    uint32_t armed_now = (uint32_t)w, ok = 1;
    memset(t->fslots, 0, sizeof t->fslots);
    for (int i = 0; i < NSLOT; i++) {
        uint32_t sg = LOAD_ACQ(&ctl->slot[i].gen);
        if (!(armed_now >> i & 1)) continue;
        if (t->snap[i].gen != sg && !refresh_slot(t, i, sg)) ok = 0;
        if (!t->snap[i].valid) continue;
        uint32_t kinds = t->snap[i].kind == K_ALLOC ? ALLOC_FUNCS : LOCK_FUNCS;
        for (int f = 0; f < NFUNC; f++)
            if ((t->snap[i].functions & kinds) >> f & 1) t->fslots[f] |= (uint8_t)(1u << i);
    }
    t->seen = ok ? w : ~w; /* ~w never equals the word, so a failed copy is retried */
    return t->fslots[fn];
}

/* The armed slots that apply to this call of function fn: one 64-bit load when nothing was ever
 * armed, two loads and a compare while nothing changes. */
static inline uint32_t slots_for(struct tstate *t, int fn)
{
    uint64_t w = LOAD_ACQ(&ctl->h.state);
    if (LIKELY(w == 0)) return 0;
    if (UNLIKELY(w != t->seen)) return refresh(t, fn);
    return t->fslots[fn];
}

static inline int caller_ok(const struct snap *s, uintptr_t ra)
{
    if (s->callers & C_ANY) return 1;
    for (uint32_t k = 0; k < s->nr; k++)
        if (ra >= s->lo[k] && ra < s->hi[k]) return 1;
    return 0;
}

/* The mode said yes: claim one of the slot's `times` and publish. */
static int __attribute__((noinline)) inject(struct tstate *t, struct snap *s)
{
    if (s->mode == M_RANDOM) s->skip = next_gap(t, s->param);
    uint64_t n = __atomic_fetch_add(&ctl->sc[s->index].injected, 1, __ATOMIC_RELAXED);
    if (s->times >= 0 && (int64_t)n >= s->times) { /* used up (perhaps by another thread just now) */
        __atomic_fetch_sub(&ctl->sc[s->index].injected, 1, __ATOMIC_RELAXED);
        return 0;
    }
    /* When: the harness maps CLOCK_MONOTONIC to the trial's clock (an injection is rare, the vDSO cheap). */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec, none = 0;
    __atomic_compare_exchange_n(&ctl->sc[s->index].first_ns, &none, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    STORE(&ctl->sc[s->index].last_ns, now);
    flush(t); /* so the counters tell the story up to this injection */
    return 1;
}

/* nth and after take an exact ordinal from the shared counter, across threads and forked children. */
static int __attribute__((noinline)) ordinal_hit(struct snap *s)
{
    uint64_t k = ADD(&ctl->sc[s->index].eligible, 1);
    return s->mode == M_NTH ? k % s->param == 0 : k > s->param;
}

static inline int in_ranges(const struct snap *s, uintptr_t ra)
{
    for (uint32_t k = 0; k < s->nr; k++)
        if (ra >= s->lo[k] && ra < s->hi[k]) return 1;
    return 0;
}

/* One armed slot against one call: 0 = not eligible or the mode says no, 1 = fire (random, budget),
 * 2 = ask the shared ordinal (nth, after). An eligible call is counted; random and budget count
 * privately (published by flush). `need` is the heap growth the call asks for (budget). */
static inline int check(struct tstate *t, struct snap *s, size_t size, int64_t need, uintptr_t ra)
{
    if (size - s->min_size > s->span) return 0;
    if (!(s->callers & C_ANY) && !in_ranges(s, ra)) return 0;
    if (s->mode == M_BUDGET) {
        s->pend++;
        return LOAD(&live) + t->delta + need > (int64_t)s->param;
    }
    if (s->mode == M_RANDOM) {
        s->pend++;
        return --s->skip == 0;
    }
    return 2;
}

/* The rare part of fault(): from the lowest slot in `a` on, whose check gave `first`. */
static struct snap *__attribute__((noinline)) fault_rest(uint32_t a, int first, size_t size, int64_t need, uintptr_t ra)
{
    struct tstate *t = &ts;
    for (int c = first; a; a &= a - 1) {
        struct snap *s = &t->snap[__builtin_ctz(a)];
        if (c < 0) c = check(t, s, size, need, ra);
        if ((c == 1 || (c == 2 && ordinal_hit(s))) && inject(t, s)) return s;
        c = -1;
    }
    return NULL;
}

/* Tries the slots `a` (from slots_for) in index order; the first that fires decides (later slots
 * don't see the call). Returns the slot that fired, or NULL. Everything but "no" leaves by a tail
 * call, so this common part needs no stack frame. */
static struct snap *__attribute__((noinline)) fault(uint32_t a, size_t size, int64_t need, uintptr_t ra)
{
    struct tstate *t = &ts;
    for (; a; a &= a - 1) {
        int c = check(t, &t->snap[__builtin_ctz(a)], size, need, ra);
        if (UNLIKELY(c)) return fault_rest(a, c, size, need, ra);
    }
    return NULL;
}


static void *enomem(void)
{
    errno = ENOMEM;
    return NULL;
}

/* ---- allocation ---- */
static int ready(void)
{
    if (!real.malloc) resolve();
    return real.malloc != NULL;
}

/* Nested or early calls: the next allocator untouched, or the arena while it is still unknown. */
static void *raw_alloc(int fn, size_t a, size_t b)
{
    if (!ready()) return arena_alloc(fn == F_CALLOC ? a * b : a, fn == F_CALLOC ? 16 : b);
    return fn == F_CALLOC ? real.calloc(a, b) : real.malloc(a);
}

/* `ENTER(t) raw;`: early (before resolution) or nested calls take the raw statement. */
#define ENTER(t) struct tstate *t = &ts; if (UNLIKELY(t->state != S_READY) && !enter_slow(t))

/* Common tail of the malloc-like calls: count, maybe fail, call through, track. */
#define ALLOC_BODY(fn, size, call)                                               \
    count(t, fn);                                                                \
    uint32_t a_ = slots_for(t, fn);                                              \
    if (UNLIKELY(a_) && fault(a_, size, (int64_t)(size), RA)) return enomem();   \
    void *p;                                                                     \
    if (LIKELY(glibc_headers)) {   /* one test for both: no nesting, header read */ \
        if ((p = call)) grow(t, chunk_usable(p));                                \
        return p;                                                                \
    }                                                                            \
    CALL_NEXT(t, p = call);                                                      \
    if (p) grow(t, usable_next(p));                                              \
    return p;

EXPORT void *malloc(size_t size)
{
    ENTER(t) return raw_alloc(F_MALLOC, size, 16);
    ALLOC_BODY(F_MALLOC, size, real.malloc(size))
}

EXPORT void *calloc(size_t n, size_t size)
{
    ENTER(t) return raw_alloc(F_CALLOC, n, size);
    size_t total;
    if (__builtin_mul_overflow(n, size, &total)) total = SIZE_MAX; /* the next calloc fails it */
    ALLOC_BODY(F_CALLOC, total, real.calloc(n, size))
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
    ENTER(t) return ready() ? real.aligned_alloc(align, size) : arena_alloc(size, align);
    ALLOC_BODY(F_ALIGNED_ALLOC, size, real.aligned_alloc(align, size))
}

EXPORT void *memalign(size_t align, size_t size)
{
    ENTER(t) return ready() ? real.memalign(align, size) : arena_alloc(size, align);
    ALLOC_BODY(F_MEMALIGN, size, real.memalign(align, size))
}

EXPORT void *valloc(size_t size)
{
    ENTER(t) return ready() ? real.valloc(size) : arena_alloc(size, 4096);
    ALLOC_BODY(F_VALLOC, size, real.valloc(size))
}

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
    ENTER(t) {
        if (ready()) return real.posix_memalign(out, align, size);
        *out = arena_alloc(size, align);
        return 0;
    }
    count(t, F_POSIX_MEMALIGN);
    uint32_t a = slots_for(t, F_POSIX_MEMALIGN);
    if (UNLIKELY(a) && fault(a, size, (int64_t)size, RA)) return ENOMEM; /* *out untouched */
    int rc;
    CALL_NEXT(t, rc = real.posix_memalign(out, align, size));
    if (rc == 0) grow(t, usable(*out));
    return rc;
}

static void *arena_realloc(void *p, size_t size)
{   /* an arena block grows into a real one; the arena copy is simply abandoned */
    size_t old = *(size_t *)((char *)p - 16);
    void *q = raw_alloc(F_MALLOC, size, 16);
    if (q) memcpy(q, p, old < size ? old : size);
    if (q && !in_arena(q) && ts.state == S_READY) grow(&ts, usable(q));
    return q;
}

static void *do_realloc(struct tstate *t, int fn, void *p, size_t size, uintptr_t ra)
{
    count(t, fn);
    size_t old = p ? usable(p) : 0;
    /* realloc(p, 0) frees: never failed, so a NULL from it keeps meaning "freed" */
    uint32_t a = slots_for(t, fn);
    if (UNLIKELY(a) && size && fault(a, size, (int64_t)size - (int64_t)old, ra)) return enomem(); /* p intact */
    void *q;
    CALL_NEXT(t, q = real.realloc(p, size));
    size_t now = q ? usable(q) : size ? old : 0; /* NULL: p intact, or freed by realloc(p, 0) */
    if (now >= old) grow(t, now - old); else shrink(t, old - now);
    return q;
}

EXPORT void *realloc(void *p, size_t size)
{
    uintptr_t ra = RA;
    if (UNLIKELY(in_arena(p))) return arena_realloc(p, size);
    ENTER(t) return ready() ? real.realloc(p, size) : (p ? NULL : arena_alloc(size, 16));
    return do_realloc(t, F_REALLOC, p, size, ra);
}

EXPORT void *reallocarray(void *p, size_t n, size_t size)
{
    uintptr_t ra = RA;
    size_t total;
    if (__builtin_mul_overflow(n, size, &total)) return enomem(); /* what glibc does */
    if (UNLIKELY(in_arena(p))) return arena_realloc(p, total);
    ENTER(t) return ready() ? real.realloc(p, total) : (p ? NULL : arena_alloc(total, 16));
    return do_realloc(t, F_REALLOCARRAY, p, total, ra);
}

EXPORT void free(void *p)
{
    if (UNLIKELY(in_arena(p))) return;
    ENTER(t) {
        if (ready()) real.free(p);
        return;
    }
    count(t, F_FREE);
    if (!p) return;
    if (LIKELY(glibc_headers)) {
        shrink(t, chunk_usable(p));
        real.free(p);
        return;
    }
    shrink(t, usable_next(p));
    CALL_NEXT(t, real.free(p));
}

/* ---- C++ operator new/delete ----
 * The throwing forms cannot throw std::bad_alloc from C. On an injected failure we call the next
 * operator new with SIZE_MAX, which no allocator can satisfy, so libstdc++ (or the preloaded
 * allocator's operator new) runs its own failure path: the new_handler loop, then bad_alloc.
 * The thread state is restored by a cleanup that also runs while that exception unwinds through us
 * (built with -fexceptions). The nothrow forms just return NULL. */
static void restore(int *prev) { ts.state = *prev; }

static void *cxx_new(int which, size_t size, const void *nt, uintptr_t ra)
{
    struct tstate *t = &ts;
    int nothrow = which >= 2, arr = which & 1;
    if (!real.malloc || (nothrow ? !real.new_nothrow[arr] : !real.new_[arr])) resolve();
    if (nothrow ? !real.new_nothrow[arr] : !real.new_[arr]) die("operator new called but libstdc++ not found");
    if (t->state != S_READY && !enter_slow(t))
        return nothrow ? real.new_nothrow[arr](size, nt) : real.new_[arr](size);
    count(t, F_NEW + which);
    uint32_t a = slots_for(t, F_NEW + which);
    int fail = UNLIKELY(a) && fault(a, size, (int64_t)size, ra) != NULL;
    if (fail && nothrow) return enomem();
    void *p;
    {
        int prev __attribute__((cleanup(restore))) = t->state;
        t->state = S_NESTED;
        p = nothrow ? real.new_nothrow[arr](size, nt) : real.new_[arr](fail ? SIZE_MAX : size);
    }
    if (p) grow(t, usable(p));
    return p;
}

EXPORT void *_Znwm(size_t size) { return cxx_new(0, size, NULL, RA); }
EXPORT void *_Znam(size_t size) { return cxx_new(1, size, NULL, RA); }
EXPORT void *_ZnwmRKSt9nothrow_t(size_t size, const void *nt) { return cxx_new(2, size, nt, RA); }
EXPORT void *_ZnamRKSt9nothrow_t(size_t size, const void *nt) { return cxx_new(3, size, nt, RA); }

/* Returns the state to restore after calling the next delete. */
static int del_enter(void *p, void *next)
{
    struct tstate *t = &ts;
    int prev = t->state;
    if (!next) die("operator delete called but libstdc++ not found");
    if (prev != S_READY && !enter_slow(t)) return prev;
    prev = t->state;
    count(t, F_DELETE);
    if (p) shrink(t, usable(p));
    t->state = S_NESTED;
    return prev;
}
#define DELETE(name, arr, field, params, args)                                                \
    EXPORT void name params {                                                                \
        if (!real.field[arr]) resolve();                                                     \
        int prev = del_enter(p, (void *)real.field[arr]);                                    \
        real.field[arr] args;                                                                \
        ts.state = prev;                                                                     \
    }
DELETE(_ZdlPv, 0, del, (void *p), (p))
DELETE(_ZdaPv, 1, del, (void *p), (p))
DELETE(_ZdlPvm, 0, del_sized, (void *p, size_t sz), (p, sz))
DELETE(_ZdaPvm, 1, del_sized, (void *p, size_t sz), (p, sz))
DELETE(_ZdlPvRKSt9nothrow_t, 0, del_nothrow, (void *p, const void *nt), (p, nt))
DELETE(_ZdaPvRKSt9nothrow_t, 1, del_nothrow, (void *p, const void *nt), (p, nt))

/* ---- locks: a failed call returns the slot's errno WITHOUT calling the real function ---- */
#define LOCK(name, field, fn, params, args)                                                   \
    EXPORT int name params {                                                                 \
        struct tstate *t = &ts;                                                              \
        if (LIKELY(t->state == S_READY) || enter_slow(t)) {                                  \
            count(t, fn);                                                                    \
            uint32_t a = slots_for(t, fn);                                                   \
            struct snap *s;                                                                  \
            if (UNLIKELY(a) && (s = fault(a, 0, 0, RA))) return s->err;                      \
        } else if (UNLIKELY(!real.field)) {                                                  \
            resolve();                                                                       \
            if (!real.field) die("cannot resolve " #name);                                   \
        }                                                                                    \
        return real.field args;                                                              \
    }
LOCK(pthread_mutex_lock, mutex_lock, F_MUTEX_LOCK, (pthread_mutex_t *m), (m))
LOCK(pthread_mutex_trylock, mutex_trylock, F_MUTEX_TRYLOCK, (pthread_mutex_t *m), (m))
LOCK(pthread_mutex_timedlock, mutex_timedlock, F_MUTEX_TIMEDLOCK,
     (pthread_mutex_t *restrict m, const struct timespec *restrict at), (m, at))
LOCK(pthread_rwlock_rdlock, rdlock, F_RDLOCK, (pthread_rwlock_t *l), (l))
LOCK(pthread_rwlock_wrlock, wrlock, F_WRLOCK, (pthread_rwlock_t *l), (l))
LOCK(pthread_rwlock_tryrdlock, tryrdlock, F_TRYRDLOCK, (pthread_rwlock_t *l), (l))
LOCK(pthread_rwlock_trywrlock, trywrlock, F_TRYWRLOCK, (pthread_rwlock_t *l), (l))

/* ---- process life cycle ---- */
static void name_copy(char *dst, const char *path)
{   /* the file name identifies a module; keep at most 47 bytes of it */
    const char *base = strrchr(path, '/');
    strncpy(dst, base ? base + 1 : path, 47);
    dst[47] = 0;
}

static uint32_t proc_pid(void)
{   /* this process's pid as /proc shows it: the harness's numbering, also inside a PID namespace of its
       own (harness/run/isolation), where getpid() counts from 1 */
    char buf[16];
    ssize_t n = readlink("/proc/self", buf, sizeof buf - 1);
    uint32_t pid = 0;
    for (ssize_t i = 0; i < n && buf[i] >= '0' && buf[i] <= '9'; i++) pid = pid * 10 + (uint32_t)(buf[i] - '0');
    return pid ? pid : (uint32_t)getpid();
}

static int proc_gone(uint32_t pid)
{   /* kill(pid, 0) would ask our own namespace: /proc answers in the harness's numbering */
    char path[24] = "/proc/", digits[12];
    int n = 0;
    do digits[n++] = (char)('0' + pid % 10); while ((pid /= 10) && n < 11);
    for (int i = 0; i < n; i++) path[6 + i] = digits[n - 1 - i];
    path[6 + n] = 0;
    return access(path, F_OK) < 0 && errno == ENOENT;
}

static void claim(void)
{   /* an entry for this pid in the file's process table (reused after exec, or taken from the dead) */
    uint32_t pid = proc_pid(), z;
    struct proc *e = NULL;
    for (int i = 0; i < NPROC && !e; i++)
        if (LOAD(&ctl->proc[i].pid) == pid) e = &ctl->proc[i];
    for (int i = 0; i < NPROC && !e; i++)
        if (z = 0, __atomic_compare_exchange_n(&ctl->proc[i].pid, &z, pid, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            e = &ctl->proc[i];
    for (int i = 0; i < NPROC && !e; i++)
        if ((z = LOAD(&ctl->proc[i].pid)) && proc_gone(z) &&
            __atomic_compare_exchange_n(&ctl->proc[i].pid, &z, pid, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            e = &ctl->proc[i];
    if (!e) e = &dummy.proc[1]; /* table full: this process is not shown */
    memcpy(e->malloc_from, malloc_from, sizeof malloc_from);
    memcpy(e->bound_from, bound_from, sizeof bound_from);
    STORE(&e->live, LOAD(&live));
    STORE(&e->peak, LOAD(&peak));
    STORE(&e->flags, proc_flags);
    me = e;
    ADD(&ctl->h.attached, 1);
    STORE(&ctl->h.last_pid, pid);
}

static void attach(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd < 0) { say("cannot open control file, running as a pass-through: ", path); return; }
    void *m = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof(struct control))
        m = mmap(NULL, sizeof(struct control), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) { say("control file too small or not mappable: ", path); return; }
    struct control *c = m;
    if (c->h.magic != MAGIC || c->h.version != VERSION) {
        say("control file has the wrong magic or version: ", path);
        munmap(m, sizeof(struct control));
        return;
    }
    ctl = c;
}

static void thread_exit(void *unused)
{
    (void)unused;
    struct tstate *t = &ts;
    flush(t);
    t->state = S_EXITING; /* frees from later TLS destructors are published one by one */
    t->slack = 0;
    t->neg_slack = -1;
}

static void fork_prepare(void)
{
    flush(&ts);
    forks++;
}

static void fork_child(void)
{
    struct tstate *t = &ts;
    int e = errno;
    memset(t->calls, 0, sizeof t->calls);
    for (int i = 0; i < NSLOT; i++) t->snap[i].pend = 0;
    t->rng = mix(t->rng ^ mix(forks)); /* the child draws its own, still reproducible, sequence */
    for (int i = 0; i < NSLOT; i++)
        if (t->snap[i].mode == M_RANDOM) t->snap[i].skip = next_gap(t, t->snap[i].param);
    STORE(&peak, LOAD(&live) + t->delta);
    claim();
    errno = e;
}

static int exe_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size; (void)data;
    range_of(info, &exe_lo, &exe_hi); /* the first object reported is the main program */
    return 1;
}

__attribute__((constructor)) static void shim_init(void)
{
    struct tstate *t = &ts;
    int e = errno;
    resolve();
    t->state = S_NESTED;
    dl_iterate_phdr(exe_cb, NULL);
    Dl_info di, self;
    if (dladdr((void *)real.malloc, &di) && di.dli_fname) name_copy(malloc_from, di.dli_fname);
    void *bound = dlsym(RTLD_DEFAULT, "malloc");
    if (bound && dladdr(bound, &di) && di.dli_fname) {
        name_copy(bound_from, di.dli_fname);
        if (dladdr((void *)shim_init, &self) && self.dli_fbase == di.dli_fbase) proc_flags |= P_SHIM_FIRST;
    }
    check_glibc_headers();
    proc_flags |= P_ATTACHED | (real.usable ? P_LIVE_TRACKED : 0) | (real.new_[0] ? P_CXX : 0);
    const char *path = getenv("HARNESS_SHIM_CONTROL");
    if (path && *path) attach(path);
    claim();
    have_key = pthread_key_create(&exit_key, thread_exit) == 0;
    pthread_atfork(fork_prepare, NULL, fork_child);
    next_ordinal = 0; /* re-seed this (the only) thread from the control file on its next call */
    t->state = S_NEW;
    errno = e;
}

__attribute__((destructor)) static void shim_fini(void)
{
    thread_exit(NULL); /* the rest of exit() is published call by call */
    STORE(&me->flags, LOAD(&me->flags) | P_EXITED);
}
