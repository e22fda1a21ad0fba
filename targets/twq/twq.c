/*
 * twq-server: a multithreaded connection tracker with a TIME_WAIT queue.
 *
 * Protocol (one line per request and per reply, pipelining allowed, replies in
 * request order per connection):
 *     GET <key>\n   ->  OK <key>\n
 *                   ->  ERR nomem\n        no memory for a new table entry
 *     other\n       ->  ERR bad request\n
 *
 * Each request "opens" the tracked connection named <key> in a hash table
 * (creating the entry, or reusing it: an entry in TIME_WAIT is taken off the
 * TIME_WAIT queue), does a little work on it under the entry's own mutex, and
 * "closes" it.  The destructor conn_destroy() puts the entry on the TIME_WAIT
 * queue (an intrusive doubly linked list under tw_lock) and locks the entry's
 * error-checking mutex to mark it TIME_WAIT.  A reaper thread expires
 * TIME_WAIT entries after --tw-ms.
 *
 * THE BUG: when that pthread_mutex_lock() in conn_destroy() fails (EDEADLK,
 * EAGAIN, EINVAL, ... - it never does on its own here), the destructor just
 * returns, leaving the entry half-destroyed: queued, but still marked OPEN.
 * The next request for the key takes it as open (no dequeue), and its close
 * queues the entry a second time, corrupting the list; the entry (or a
 * neighbour that still points at it) is then removed twice.  tw_remove()
 * poisons the links of a removed entry (TW_POISON1/2, like the kernel's
 * LIST_POISON), so the second removal dereferences the poison: SIGSEGV in
 * tw_remove(), called from conn_reuse() or tw_reap(), at an address near
 * 0xdead0000100.  Needs lock errors (a fault shim) and key reuse to show.
 *
 * Every other mutex lock handles errors correctly: the table and queue locks
 * retry (and abort after 1000 consecutive failures), the work step skips its
 * bookkeeping.  All table/queue/state changes happen under tbl_lock, so with
 * no lock errors the server is race-free under any load or key pattern.
 *
 * Threads: the main thread accepts and hands sockets round-robin to --threads
 * workers (each with its own epoll set, non-blocking sockets); one reaper.
 * Flags: --port P (required), --host ADDR (127.0.0.1), --threads N (4),
 * --tw-ms N (50).  SIGTERM/SIGINT: exit 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

#define IN_CAP (16 * 1024)  /* longest accepted line: IN_CAP - 1 bytes + '\n' */
#define OUT_CAP (32 * 1024) /* >= IN_CAP + the longest reply overhead */
#define KEY_MAX 1000
#define NBUCKETS 4096
#define GC_THRESH 16384 /* expired entries are freed only above this many */
#define MAX_EVENTS 256

static const char *prog = "twq-server";

/* ------------------------------------------------------- the tracker */

struct tw_link {
    struct tw_link *next, *prev;
};

/* Canonical but unmapped, so a fault reports the poison value itself. */
#define TW_POISON1 ((struct tw_link *)0x00000dead0000100ull)
#define TW_POISON2 ((struct tw_link *)0x00000dead0000122ull)

enum { T_CLOSED, T_OPEN, T_TIME_WAIT };

/* A tracked connection. */
struct tconn {
    struct tconn *hnext;   /* hash chain (tbl_lock) */
    uint64_t tw_expire_ms; /* leaves TIME_WAIT at (tbl_lock) */
    struct tw_link tw;     /* TIME_WAIT queue links (tw_lock) */
    pthread_mutex_t mu;    /* PTHREAD_MUTEX_ERRORCHECK: state, uses, digest */
    int state;             /* changed with tbl_lock and mu held */
    unsigned users;        /* requests that have it open (tbl_lock) */
    uint64_t uses, digest; /* mu */
    uint32_t hash, keylen;
    char key[];
};

static pthread_mutex_t tbl_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tconn *buckets[NBUCKETS];
static size_t tbl_count;

static pthread_mutex_t tw_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tw_link tw_head = {&tw_head, &tw_head};
static size_t tw_len;

static pthread_mutexattr_t errorcheck_attr;
static uint64_t tw_ms = 50;
static atomic_int stopping;
static atomic_ulong n_requests, n_nomem;

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static struct tconn *tw_entry(struct tw_link *l)
{
    return (struct tconn *)((char *)l - offsetof(struct tconn, tw));
}

/* For the table and queue locks: an error is taken as transient and retried;
 * one that persists (1000 times in a row) is fatal. */
static void lock_retry(pthread_mutex_t *m, const char *what)
{
    for (int tries = 0;; tries++) {
        int rc = pthread_mutex_lock(m);
        if (rc == 0)
            return;
        if (tries >= 1000) {
            fprintf(stderr, "%s: pthread_mutex_lock(%s) keeps failing: %s\n", prog, what,
                    strerror(rc));
            abort();
        }
        sched_yield();
    }
}

/* Change an entry's state under its own mutex (tbl_lock held). */
static void set_state(struct tconn *c, int state)
{
    lock_retry(&c->mu, "entry");
    c->state = state;
    pthread_mutex_unlock(&c->mu);
}

/* Append to the TIME_WAIT queue (tw_lock held). */
static NOINLINE void tw_insert(struct tconn *c)
{
    c->tw.next = &tw_head;
    c->tw.prev = tw_head.prev;
    tw_head.prev->next = &c->tw;
    tw_head.prev = &c->tw;
    tw_len++;
}

/* Unlink from the TIME_WAIT queue and poison the links (tw_lock held). */
static NOINLINE void tw_remove(struct tconn *c)
{
    struct tw_link *next = c->tw.next, *prev = c->tw.prev;
    next->prev = prev;
    prev->next = next;
    c->tw.next = TW_POISON1;
    c->tw.prev = TW_POISON2;
    tw_len--;
}

static uint32_t key_hash(const char *key, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)key[i]) * 16777619u;
    return h;
}

static NOINLINE struct tconn *conn_create(const char *key, size_t keylen, uint32_t h)
{
    struct tconn *c = malloc(sizeof *c + keylen + 1);
    if (!c)
        return NULL;
    if (pthread_mutex_init(&c->mu, &errorcheck_attr) != 0) {
        free(c);
        return NULL;
    }
    c->tw.next = c->tw.prev = NULL;
    c->tw_expire_ms = 0;
    c->state = T_CLOSED;
    c->users = 0;
    c->uses = c->digest = 0;
    c->hash = h;
    c->keylen = (uint32_t)keylen;
    memcpy(c->key, key, keylen);
    c->key[keylen] = 0;
    c->hnext = buckets[h % NBUCKETS];
    buckets[h % NBUCKETS] = c;
    tbl_count++;
    return c;
}

/* Take an entry back out of TIME_WAIT (tbl_lock held). */
static NOINLINE void conn_reuse(struct tconn *c)
{
    lock_retry(&tw_lock, "tw");
    tw_remove(c);
    pthread_mutex_unlock(&tw_lock);
    set_state(c, T_OPEN);
}

/* Open (create or reuse) the entry for key.  NULL: out of memory. */
static NOINLINE struct tconn *conn_open(const char *key, size_t keylen)
{
    uint32_t h = key_hash(key, keylen);
    lock_retry(&tbl_lock, "table");
    struct tconn *c = buckets[h % NBUCKETS];
    while (c && !(c->hash == h && c->keylen == keylen && memcmp(c->key, key, keylen) == 0))
        c = c->hnext;
    if (!c)
        c = conn_create(key, keylen, h);
    if (c) {
        switch (c->state) {
        case T_TIME_WAIT:
            conn_reuse(c);
            break;
        case T_CLOSED:
            set_state(c, T_OPEN);
            break;
        default: /* T_OPEN: open for another request too; share it */
            break;
        }
        c->users++;
    }
    pthread_mutex_unlock(&tbl_lock);
    return c;
}

/* The "little work" done on an open entry. */
static NOINLINE void conn_work(struct tconn *c)
{
    if (pthread_mutex_lock(&c->mu) != 0)
        return; /* just skip the bookkeeping this time */
    c->uses++;
    uint64_t d = c->digest ^ c->uses;
    for (uint32_t i = 0; i < c->keylen; i++)
        d = (d ^ (unsigned char)c->key[i]) * 0x100000001b3ull;
    c->digest = d;
    pthread_mutex_unlock(&c->mu);
}

/* Destructor of the last close: into TIME_WAIT (tbl_lock held). */
static NOINLINE void conn_destroy(struct tconn *c)
{
    c->tw_expire_ms = now_ms() + tw_ms;
    lock_retry(&tw_lock, "tw");
    tw_insert(c);
    pthread_mutex_unlock(&tw_lock);
    if (pthread_mutex_lock(&c->mu) != 0)
        return; /* BUG: leaves the entry queued but still T_OPEN */
    c->state = T_TIME_WAIT;
    pthread_mutex_unlock(&c->mu);
}

static NOINLINE void conn_close(struct tconn *c)
{
    lock_retry(&tbl_lock, "table");
    if (--c->users == 0)
        conn_destroy(c);
    pthread_mutex_unlock(&tbl_lock);
}

static void unhash(struct tconn *c)
{
    struct tconn **pp = &buckets[c->hash % NBUCKETS];
    while (*pp && *pp != c)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = c->hnext;
    tbl_count--;
}

/* Expire TIME_WAIT entries (the queue is in expiry order).  Expired entries
 * stay in the table as CLOSED, for cheap reuse, until the table holds more
 * than GC_THRESH entries; above that they are freed. */
static NOINLINE void tw_reap(uint64_t now)
{
    lock_retry(&tbl_lock, "table");
    lock_retry(&tw_lock, "tw");
    while (tw_head.next != &tw_head) {
        struct tconn *c = tw_entry(tw_head.next);
        if (c->tw_expire_ms > now)
            break;
        tw_remove(c);
        set_state(c, T_CLOSED);
        if (tbl_count > GC_THRESH && c->users == 0) {
            unhash(c);
            pthread_mutex_destroy(&c->mu);
            free(c);
        }
    }
    pthread_mutex_unlock(&tw_lock);
    pthread_mutex_unlock(&tbl_lock);
}

static void *reaper_main(void *arg)
{
    (void)arg;
    uint64_t period = tw_ms / 4;
    if (period < 1)
        period = 1;
    if (period > 50)
        period = 50;
    struct timespec ts = {(time_t)(period / 1000), (long)(period % 1000) * 1000000L};
    while (!atomic_load(&stopping)) {
        nanosleep(&ts, NULL);
        tw_reap(now_ms());
    }
    return NULL;
}

/* ----------------------------------------------------- client sockets */

struct client {
    int fd;
    uint32_t events; /* current epoll interest */
    int eof;
    size_t in_len, out_off, out_len;
    char in[IN_CAP];
    char out[OUT_CAP];
};

struct worker {
    pthread_t tid;
    int epfd;
    int pipe[2]; /* new client fds from the acceptor; -1 means stop */
    char pipe_tag;
    unsigned long clients;
};

/* One request: open, work, close; append the reply. */
static NOINLINE size_t handle_request(const char *line, size_t len, char *out)
{
    atomic_fetch_add_explicit(&n_requests, 1, memory_order_relaxed);
    if (len && line[len - 1] == '\r')
        len--;
    if (len > 4 && len - 4 <= KEY_MAX && memcmp(line, "GET ", 4) == 0) {
        const char *key = line + 4;
        size_t keylen = len - 4;
        struct tconn *c = conn_open(key, keylen);
        if (!c) {
            atomic_fetch_add_explicit(&n_nomem, 1, memory_order_relaxed);
            memcpy(out, "ERR nomem\n", 10);
            return 10;
        }
        conn_work(c);
        conn_close(c);
        memcpy(out, "OK ", 3);
        memcpy(out + 3, key, keylen);
        out[3 + keylen] = '\n';
        return keylen + 4;
    }
    memcpy(out, "ERR bad request\n", 16);
    return 16;
}

static void client_close(struct worker *w, struct client *cl)
{
    close(cl->fd);
    free(cl);
    w->clients--;
}

/* Read one chunk.  Returns -1 when the connection must be closed. */
static NOINLINE int client_read(struct client *cl)
{
    if (cl->eof || cl->in_len == IN_CAP)
        return 0;
    ssize_t n = recv(cl->fd, cl->in + cl->in_len, IN_CAP - cl->in_len, 0);
    if (n > 0) {
        cl->in_len += (size_t)n;
        return 0;
    }
    if (n == 0) {
        cl->eof = 1;
        return 0;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return 0;
    return -1;
}

static NOINLINE int client_flush(struct client *cl)
{
    while (cl->out_off < cl->out_len) {
        ssize_t n = send(cl->fd, cl->out + cl->out_off, cl->out_len - cl->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            cl->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        return -1;
    }
    cl->out_off = cl->out_len = 0;
    return 0;
}

/* Answer buffered requests while replies fit, write, set the epoll interest.
 * Returns -1 when the connection must be closed. */
static NOINLINE int client_service(struct worker *w, struct client *cl)
{
    for (;;) {
        if (cl->out_off > 0 && cl->out_off == cl->out_len)
            cl->out_off = cl->out_len = 0;
        if (cl->out_off > 0 && OUT_CAP - cl->out_len < IN_CAP + 32) {
            memmove(cl->out, cl->out + cl->out_off, cl->out_len - cl->out_off);
            cl->out_len -= cl->out_off;
            cl->out_off = 0;
        }
        size_t pos = 0, handled = 0;
        for (;;) {
            char *nl = memchr(cl->in + pos, '\n', cl->in_len - pos);
            if (!nl)
                break;
            size_t len = (size_t)(nl - (cl->in + pos));
            if (OUT_CAP - cl->out_len < len + 32)
                break;
            cl->out_len += handle_request(cl->in + pos, len, cl->out + cl->out_len);
            pos += len + 1;
            handled++;
        }
        if (pos) {
            cl->in_len -= pos;
            memmove(cl->in, cl->in + pos, cl->in_len);
        }
        if (client_flush(cl) < 0)
            return -1;
        /* Go round again if the write made room for more buffered lines. */
        if (!handled || cl->out_len != 0 || cl->in_len == 0)
            break;
    }
    int pending_out = cl->out_len > cl->out_off;
    if (cl->in_len == IN_CAP && !memchr(cl->in, '\n', IN_CAP))
        return -1; /* line too long: protocol error */
    if (cl->eof && !pending_out)
        return -1;
    uint32_t want = 0;
    if (!cl->eof && cl->in_len < IN_CAP)
        want |= EPOLLIN;
    if (pending_out)
        want |= EPOLLOUT;
    if (want != cl->events) {
        struct epoll_event ev = {.events = want, .data.ptr = cl};
        if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, cl->fd, &ev) < 0)
            return -1;
        cl->events = want;
    }
    return 0;
}

static void worker_adopt(struct worker *w, int fd)
{
    struct client *cl = malloc(sizeof *cl);
    if (!cl) {
        close(fd); /* out of memory: drop the connection, keep serving */
        return;
    }
    cl->fd = fd;
    cl->events = EPOLLIN;
    cl->eof = 0;
    cl->in_len = cl->out_off = cl->out_len = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = cl};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        close(fd);
        free(cl);
        return;
    }
    w->clients++;
}

static NOINLINE void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(w->epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "%s: epoll_wait: %s\n", prog, strerror(errno));
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &w->pipe_tag) {
                int fds[64];
                ssize_t r = read(w->pipe[0], fds, sizeof fds);
                for (ssize_t k = 0; k < r / (ssize_t)sizeof(int); k++) {
                    if (fds[k] < 0)
                        return NULL;
                    worker_adopt(w, fds[k]);
                }
                continue;
            }
            struct client *cl = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if ((e & (EPOLLERR | EPOLLHUP)) || ((e & EPOLLIN) && client_read(cl) < 0) ||
                client_service(w, cl) < 0)
                client_close(w, cl);
        }
    }
}

/* ------------------------------------------------------------- set-up */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s --port P [--host ADDR] [--threads N] [--tw-ms N]\n"
            "  --port P      TCP port to listen on (required; 0 = any free port)\n"
            "  --host ADDR   numeric address to bind (default 127.0.0.1)\n"
            "  --threads N   worker threads, 1..256 (default 4)\n"
            "  --tw-ms N     TIME_WAIT hold time in ms (default 50)\n",
            prog);
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int listen_on(const char *host, long port, const char *extra)
{
    struct addrinfo hints = {0}, *res = NULL;
    char portstr[24];
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    snprintf(portstr, sizeof portstr, "%ld", port);
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc) {
        fprintf(stderr, "%s: bad --host %s: %s\n", prog, host, gai_strerror(rc));
        return -1;
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 1024) < 0) {
        fprintf(stderr, "%s: cannot listen on %s port %ld: %s\n", prog, host, port,
                strerror(errno));
        freeaddrinfo(res);
        if (fd >= 0)
            close(fd);
        return -1;
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char hbuf[NI_MAXHOST], sbuf[NI_MAXSERV];
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
        getnameinfo((struct sockaddr *)&ss, sl, hbuf, sizeof hbuf, sbuf, sizeof sbuf,
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0)
        fprintf(stderr, "%s: listening on %s port %s%s\n", prog, hbuf, sbuf, extra);
    else
        fprintf(stderr, "%s: listening on %s port %ld%s\n", prog, host, port, extra);
    return fd;
}

/* SIGTERM/SIGINT: the handler writes the signal number to a pipe that the
 * main loop watches (whichever thread the signal lands in, including threads
 * a preloaded library may start).  SIGPIPE is ignored. */
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig)
{
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    if (write(sig_pipe[1], &b, 1) < 0) {
        /* pipe full: a signal is already pending */
    }
    errno = saved;
}

static int signals_setup(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(sig_pipe, O_NONBLOCK | O_CLOEXEC) < 0 || sigaction(SIGTERM, &sa, NULL) < 0 ||
        sigaction(SIGINT, &sa, NULL) < 0)
        return -1;
    return sig_pipe[0];
}

/* Returns the signal number, or 0 if nothing was pending. */
static unsigned read_signal(int sfd)
{
    unsigned char b;
    return read(sfd, &b, 1) == 1 ? b : 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, 0, 'p'},
        {"host", required_argument, 0, 'H'},
        {"threads", required_argument, 0, 't'},
        {"tw-ms", required_argument, 0, 'w'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *host = "127.0.0.1";
    long port = -1, nthreads = 4, twms = 50;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'p':
            if (parse_long(optarg, 0, 65535, &port) < 0) {
                fprintf(stderr, "%s: bad --port %s\n", prog, optarg);
                return 2;
            }
            break;
        case 'H':
            host = optarg;
            break;
        case 't':
            if (parse_long(optarg, 1, 256, &nthreads) < 0) {
                fprintf(stderr, "%s: bad --threads %s (1..256)\n", prog, optarg);
                return 2;
            }
            break;
        case 'w':
            if (parse_long(optarg, 0, 3600 * 1000, &twms) < 0) {
                fprintf(stderr, "%s: bad --tw-ms %s\n", prog, optarg);
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (port < 0 || optind != argc) {
        usage(stderr);
        return 2;
    }
    tw_ms = (uint64_t)twms;
    pthread_mutexattr_init(&errorcheck_attr);
    pthread_mutexattr_settype(&errorcheck_attr, PTHREAD_MUTEX_ERRORCHECK);

    int sfd = signals_setup();
    if (sfd < 0) {
        fprintf(stderr, "%s: signals: %s\n", prog, strerror(errno));
        return 1;
    }
    char extra[96];
    snprintf(extra, sizeof extra, " (threads %ld, tw-ms %ld)", nthreads, twms);
    int lfd = listen_on(host, port, extra);
    if (lfd < 0)
        return 1;

    struct worker *workers = calloc((size_t)nthreads, sizeof *workers);
    if (!workers) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 1;
    }
    for (long i = 0; i < nthreads; i++) {
        struct worker *w = &workers[i];
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->pipe_tag};
        if (w->epfd < 0 || pipe2(w->pipe, O_CLOEXEC) < 0 ||
            epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->pipe[0], &ev) < 0 ||
            pthread_create(&w->tid, NULL, worker_main, w) != 0) {
            fprintf(stderr, "%s: cannot start worker %ld: %s\n", prog, i, strerror(errno));
            return 1;
        }
    }
    pthread_t reaper;
    if (pthread_create(&reaper, NULL, reaper_main, NULL) != 0) {
        fprintf(stderr, "%s: cannot start the reaper\n", prog);
        return 1;
    }

    /* The acceptor. */
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    static char listen_tag, signal_tag;
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listen_tag};
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &signal_tag};
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev) < 0 ||
        epoll_ctl(epfd, EPOLL_CTL_ADD, sfd, &sev) < 0) {
        fprintf(stderr, "%s: epoll: %s\n", prog, strerror(errno));
        return 1;
    }
    unsigned long accepted = 0;
    uint64_t accept_resume = 0;
    unsigned signo = 0;
    while (!signo) {
        int timeout = -1;
        if (accept_resume) {
            uint64_t now = now_ms();
            if (now >= accept_resume) {
                epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
                accept_resume = 0;
            } else {
                timeout = (int)(accept_resume - now);
            }
        }
        struct epoll_event evs[4];
        int n = epoll_wait(epfd, evs, 4, timeout);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &signal_tag) {
                signo = read_signal(sfd);
                continue;
            }
            for (;;) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) {
                    if (errno == EINTR || errno == ECONNABORTED)
                        continue;
                    if (errno != EAGAIN && errno != EWOULDBLOCK) {
                        /* EMFILE and friends: pause accepting for 100 ms. */
                        fprintf(stderr, "%s: accept: %s (pausing accepts)\n", prog,
                                strerror(errno));
                        epoll_ctl(epfd, EPOLL_CTL_DEL, lfd, NULL);
                        accept_resume = now_ms() + 100;
                    }
                    break;
                }
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                struct worker *w = &workers[accepted++ % (unsigned long)nthreads];
                if (write(w->pipe[1], &fd, sizeof fd) != (ssize_t)sizeof fd)
                    close(fd);
            }
        }
    }

    /* Shut down: stop the workers and the reaper, then exit 0. */
    atomic_store(&stopping, 1);
    for (long i = 0; i < nthreads; i++) {
        int stop = -1;
        if (write(workers[i].pipe[1], &stop, sizeof stop) != (ssize_t)sizeof stop)
            fprintf(stderr, "%s: cannot stop worker %ld\n", prog, i);
    }
    for (long i = 0; i < nthreads; i++)
        pthread_join(workers[i].tid, NULL);
    pthread_join(reaper, NULL);
    fprintf(stderr, "%s: signal %u, exiting (%lu connections, %lu requests, %lu nomem, "
            "%zu entries, %zu in TIME_WAIT)\n",
            prog, signo, accepted, atomic_load(&n_requests), atomic_load(&n_nomem), tbl_count,
            tw_len);
    return 0;
}
