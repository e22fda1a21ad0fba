/*
 * estats-server: a TCP service whose live heap grows with in-flight requests,
 * and whose optional "estats" feature dereferences a failed allocation.
 *
 * Protocol (one line per request and per reply, pipelining allowed, replies in
 * request order per connection):
 *     GET <key>\n   ->  OK <key> <n>\n      n = server-wide request number
 *                   ->  ERR nomem\n         the scratch buffer could not be allocated
 *     other\n       ->  ERR bad request\n
 *
 * Every request is held for --service-ms before its reply is sent.  While it
 * is held it owns a scratch buffer of --scratch-kb KiB (malloc'd and memset,
 * so the memory is resident) and, with --estats on, a per-request statistics
 * block: 344 bytes, plus a --stats-kb KiB trace ring (default none).  The
 * stats block is allocated first, the scratch buffer second.  Live heap is
 * therefore about rate x service time x (scratch + stats block).
 *
 * THE BUG (--estats on): the stats block comes from estats_alloc(), which
 * returns NULL when malloc fails, and handle_request() passes it straight to
 * estats_update(), which increments s->hits at offset 0x40: SIGSEGV at address
 * 0x40.  The scratch allocation is checked (ERR nomem), so with --estats off
 * the server survives allocation failures.  Only memory pressure (a memory
 * budget, RLIMIT_AS, an injected malloc failure) shows the bug.
 *
 * One thread, non-blocking sockets, level-triggered epoll.  Pending replies
 * sit in one global FIFO ordered by due time (the service time is constant, so
 * arrival order is due order and per-connection order is kept); epoll_wait
 * sleeps until the earliest is due.  Each connection keeps its pending
 * requests in a fixed ring of RING slots; when the ring is full we stop reading
 * from it (TCP backpressure).  No allocation happens per request other than
 * the scratch buffer and the stats block.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
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
#define OUT_CAP (16 * 1024) /* replies waiting to be written */
#define RING 512            /* pending requests per connection */
#define KEY_MAX 1000        /* longer keys: ERR bad request; fits in 1 KiB scratch */
#define REPLY_MAX (KEY_MAX + 32)
#define MAX_EVENTS 256

static const char *prog = "estats-server";

/* ------------------------------------------------------------ estats */

/* Per-request statistics block (the "estats" feature). */
struct estats {
    char tag[16];          /* 0x00 */
    uint64_t conn_id;      /* 0x10 */
    uint64_t seq;          /* 0x18 */
    uint64_t t_arrive_ns;  /* 0x20 */
    uint64_t t_update_ns;  /* 0x28 */
    uint64_t flags;        /* 0x30 */
    uint64_t reserved;     /* 0x38 */
    uint64_t hits;         /* 0x40: the first field estats_update() touches */
    uint64_t key_bytes;    /* 0x48 */
    uint64_t nomem;        /* 0x50 */
    uint64_t keylen_hist[32];
    unsigned char trace[];  /* per-request trace ring, --stats-kb KiB */
};
_Static_assert(offsetof(struct estats, hits) == 0x40, "hits must sit at 0x40");

/* Server-wide totals, folded in from each stats block when its reply goes. */
static struct {
    uint64_t hits, key_bytes, nomem, keylen_hist[32];
} totals;

static size_t trace_bytes;  /* the stats block's trace ring (--stats-kb, default none) */

/* Returns NULL when the allocation fails. */
static NOINLINE struct estats *estats_alloc(uint64_t conn_id, uint64_t seq, uint64_t now)
{
    struct estats *s = malloc(sizeof *s + trace_bytes);
    if (s) {
        memset(s, 0, sizeof *s + trace_bytes);
        memcpy(s->tag, "estats/1", 9);
        s->conn_id = conn_id;
        s->seq = seq;
        s->t_arrive_ns = now;
    }
    return s;
}

/* Count one request.  s must not be NULL (nothing here checks it). */
static NOINLINE void estats_update(struct estats *s, size_t keylen, int nomem, uint64_t now)
{
    s->hits++;
    s->key_bytes += keylen;
    s->nomem += (uint64_t)nomem;
    unsigned b = 0;
    while (b < 31 && ((size_t)1 << b) < keylen)
        b++;
    s->keylen_hist[b]++;
    s->t_update_ns = now;
}

static NOINLINE void estats_retire(struct estats *s)
{
    totals.hits += s->hits;
    totals.key_bytes += s->key_bytes;
    totals.nomem += s->nomem;
    for (int i = 0; i < 32; i++)
        totals.keylen_hist[i] += s->keylen_hist[i];
    free(s);
}

/* ------------------------------------------------------- connections */

enum { ST_OK, ST_NOMEM, ST_BAD };

struct conn;

/* One pending request. */
struct slot {
    struct slot *gnext, *gprev; /* global FIFO of pending replies, by due time */
    struct conn *conn;
    uint64_t due_ns;
    uint64_t seq;
    char *scratch;         /* scratch-kb KiB; starts with a copy of the key */
    struct estats *stats;  /* estats on: per-request stats block */
    uint32_t keylen;
    uint8_t status;
    uint8_t ready;         /* due; waiting for room in the output buffer */
};

struct conn {
    int fd;
    uint32_t events; /* current epoll interest */
    uint64_t id;
    int eof;         /* client shut down its sending side */
    int dead;        /* closed; freed at the end of the loop iteration */
    int on_work;
    struct conn *work_next;
    struct conn *grave_next;
    unsigned head, count; /* ring of pending slots, oldest first */
    size_t in_len, out_off, out_len;
    struct slot ring[RING];
    char in[IN_CAP];
    char out[OUT_CAP];
};

/* Sentinels for epoll_event.data.ptr. */
static char listen_tag, signal_tag;

static int epfd = -1;
static int estats_on = 1;
static uint64_t service_ns = 20 * 1000000ull;
static size_t scratch_bytes = 64 * 1024;

static struct slot fifo = {.gnext = &fifo, .gprev = &fifo}; /* sentinel */
static struct conn *work_list, **work_tail = &work_list, *graveyard;
static uint64_t next_conn_id, next_seq, n_nomem;
static unsigned long n_conns, n_accepted, n_nomem_conns;
static uint64_t accept_resume_ns; /* non-zero: accepting paused (out of fds) */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fifo_push(struct slot *s)
{
    s->gprev = fifo.gprev;
    s->gnext = &fifo;
    fifo.gprev->gnext = s;
    fifo.gprev = s;
}

static void fifo_unlink(struct slot *s)
{
    s->gprev->gnext = s->gnext;
    s->gnext->gprev = s->gprev;
    s->gnext = s->gprev = NULL;
}

static void work_add(struct conn *c)
{
    if (!c->on_work && !c->dead) {
        c->on_work = 1;
        c->work_next = NULL;
        *work_tail = c;
        work_tail = &c->work_next;
    }
}

static void slot_release(struct slot *s)
{
    free(s->scratch);
    s->scratch = NULL;
    if (s->stats)
        estats_retire(s->stats);
    s->stats = NULL;
}

static void conn_close(struct conn *c)
{
    if (c->dead)
        return;
    for (unsigned i = 0; i < c->count; i++) {
        struct slot *s = &c->ring[(c->head + i) % RING];
        if (!s->ready)
            fifo_unlink(s);
        slot_release(s);
    }
    c->count = 0;
    close(c->fd); /* also removes it from the epoll set */
    c->dead = 1;
    c->grave_next = graveyard;
    graveyard = c;
    n_conns--;
}

static NOINLINE void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            /* EMFILE, ENFILE, ENOBUFS, ENOMEM: pause accepting for 100 ms. */
            fprintf(stderr, "%s: accept: %s (pausing accepts)\n", prog, strerror(errno));
            epoll_ctl(epfd, EPOLL_CTL_DEL, lfd, NULL);
            accept_resume_ns = now_ns() + 100000000ull;
            return;
        }
        struct conn *c = malloc(sizeof *c);
        if (!c) {
            close(fd); /* out of memory: drop this connection, keep serving */
            n_nomem_conns++;
            continue;
        }
        c->fd = fd;
        c->events = EPOLLIN;
        c->id = ++next_conn_id;
        c->eof = c->dead = c->on_work = 0;
        c->work_next = c->grave_next = NULL;
        c->head = c->count = 0;
        c->in_len = c->out_off = c->out_len = 0;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = c->events, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
            continue;
        }
        n_conns++;
        n_accepted++;
    }
}

/* Read one chunk.  Returns -1 when the connection must be closed. */
static NOINLINE int conn_read(struct conn *c)
{
    if (c->eof || c->in_len == IN_CAP)
        return 0;
    ssize_t n = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
    if (n > 0) {
        c->in_len += (size_t)n;
        return 0;
    }
    if (n == 0) {
        c->eof = 1;
        return 0;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return 0;
    return -1;
}

/* Format the replies that are due (oldest first) into the output buffer, free
 * their memory, and write.  Returns -1 when the connection must be closed. */
static NOINLINE int conn_drain(struct conn *c)
{
    while (c->count && c->ring[c->head].ready) {
        struct slot *s = &c->ring[c->head];
        if (OUT_CAP - c->out_len < REPLY_MAX) {
            if (c->out_off == 0)
                break;
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
            if (OUT_CAP - c->out_len < REPLY_MAX)
                break;
        }
        char *o = c->out + c->out_len;
        int n;
        switch (s->status) {
        case ST_OK:
            memcpy(o, "OK ", 3);
            memcpy(o + 3, s->scratch, s->keylen);
            n = 3 + (int)s->keylen;
            n += snprintf(o + n, REPLY_MAX - (size_t)n, " %llu\n", (unsigned long long)s->seq);
            break;
        case ST_NOMEM:
            n = snprintf(o, REPLY_MAX, "ERR nomem\n");
            break;
        default:
            n = snprintf(o, REPLY_MAX, "ERR bad request\n");
            break;
        }
        c->out_len += (size_t)n;
        slot_release(s);
        c->head = (c->head + 1) % RING;
        c->count--;
    }
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        return -1; /* EPIPE, ECONNRESET, ...: the client is gone */
    }
    c->out_off = c->out_len = 0;
    return 0;
}

/* Set the epoll interest; close when finished.  Returns -1 to close. */
static NOINLINE int conn_settle(struct conn *c)
{
    int pending_out = c->out_len > c->out_off;
    if (c->in_len == IN_CAP && c->count < RING && !memchr(c->in, '\n', IN_CAP))
        return -1; /* line longer than we accept: protocol error */
    if (c->eof && c->count == 0 && !pending_out)
        return -1; /* all answered (an unterminated last line is dropped) */
    uint32_t want = 0;
    if (!c->eof && c->in_len < IN_CAP && c->count < RING)
        want |= EPOLLIN;
    if (pending_out)
        want |= EPOLLOUT;
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
            return -1;
        c->events = want;
    }
    return 0;
}

/* ----------------------------------------------------------- requests */

/* Start one request: take a ring slot, allocate its memory, queue its reply. */
static NOINLINE void handle_request(struct conn *c, const char *line, size_t len, uint64_t now)
{
    struct slot *s = &c->ring[(c->head + c->count) % RING];
    c->count++;
    s->conn = c;
    s->seq = ++next_seq;
    s->due_ns = now + service_ns;
    s->scratch = NULL;
    s->stats = NULL;
    s->keylen = 0;
    s->ready = 0;
    if (len && line[len - 1] == '\r')
        len--;
    if (len > 4 && len - 4 <= KEY_MAX && memcmp(line, "GET ", 4) == 0) {
        const char *key = line + 4;
        size_t keylen = len - 4;
        /* The stats block is taken first: it records the request from its arrival. */
        if (estats_on)
            s->stats = estats_alloc(c->id, s->seq, now);
        s->scratch = malloc(scratch_bytes);
        if (s->scratch) { /* checked: fails softly */
            memset(s->scratch, 0x5a, scratch_bytes);
            memcpy(s->scratch, key, keylen);
            s->keylen = (uint32_t)keylen;
            s->status = ST_OK;
        } else {
            s->status = ST_NOMEM;
            n_nomem++;
        }
        if (estats_on) {
            /* BUG: s->stats is not checked for NULL. */
            estats_update(s->stats, keylen, s->status == ST_NOMEM, now);
        }
    } else {
        s->status = ST_BAD;
    }
    fifo_push(s);
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

/* ------------------------------------------------------------ the loop */

static NOINLINE int serve_loop(int lfd, int sfd)
{
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        /* Sleep until the earliest reply is due (or an event arrives). */
        int timeout = -1;
        uint64_t now = now_ns();
        if (fifo.gnext != &fifo) {
            uint64_t due = fifo.gnext->due_ns;
            timeout = due <= now ? 0 : (int)((due - now + 999999) / 1000000);
        }
        if (accept_resume_ns) {
            if (now >= accept_resume_ns) {
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listen_tag};
                epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
                accept_resume_ns = 0;
            } else {
                int t = (int)((accept_resume_ns - now + 999999) / 1000000);
                if (timeout < 0 || t < timeout)
                    timeout = t;
            }
        }
        int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "%s: epoll_wait: %s\n", prog, strerror(errno));
            return 1;
        }
        now = now_ns();

        /* 1. Socket events. */
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &listen_tag) {
                accept_all(lfd);
                continue;
            }
            if (p == &signal_tag) {
                unsigned signo = read_signal(sfd);
                if (signo) {
                    fprintf(stderr,
                            "%s: signal %u, exiting (%lu connections, %llu requests, "
                            "%llu nomem, %lu connections refused for memory)\n",
                            prog, signo, n_accepted, (unsigned long long)next_seq,
                            (unsigned long long)n_nomem, n_nomem_conns);
                    return 0;
                }
                continue;
            }
            struct conn *c = p;
            if (c->dead)
                continue;
            uint32_t e = evs[i].events;
            if (e & (EPOLLERR | EPOLLHUP)) {
                conn_close(c);
                continue;
            }
            if ((e & EPOLLIN) && conn_read(c) < 0) {
                conn_close(c);
                continue;
            }
            work_add(c);
        }

        /* 2. Replies whose service time is over. */
        while (fifo.gnext != &fifo && fifo.gnext->due_ns <= now) {
            struct slot *s = fifo.gnext;
            fifo_unlink(s);
            s->ready = 1;
            work_add(s->conn);
        }

        /* 3. Per connection: send due replies, start buffered requests. */
        while (work_list) {
            struct conn *c = work_list;
            work_list = c->work_next;
            if (!work_list)
                work_tail = &work_list;
            c->on_work = 0;
            if (c->dead)
                continue;
            if (conn_drain(c) < 0) {
                conn_close(c);
                continue;
            }
            size_t pos = 0;
            while (c->count < RING) {
                char *nl = memchr(c->in + pos, '\n', c->in_len - pos);
                if (!nl)
                    break;
                handle_request(c, c->in + pos, (size_t)(nl - (c->in + pos)), now);
                pos = (size_t)(nl - c->in) + 1;
            }
            if (pos) {
                c->in_len -= pos;
                memmove(c->in, c->in + pos, c->in_len);
            }
            if (conn_settle(c) < 0)
                conn_close(c);
        }

        /* 4. Free connections closed in this iteration. */
        while (graveyard) {
            struct conn *c = graveyard;
            graveyard = c->grave_next;
            free(c);
        }
    }
}

/* ------------------------------------------------------------- set-up */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s --port P [--host ADDR] [--estats on|off] [--service-ms N] [--scratch-kb N]\n"
            "  --port P          TCP port to listen on (required; 0 = any free port)\n"
            "  --host ADDR       numeric address to bind (default 127.0.0.1)\n"
            "  --estats on|off   per-request stats blocks (default on; on has the bug)\n"
            "  --service-ms N    time each request is held before its reply (default 20)\n"
            "  --scratch-kb N    scratch buffer per request, KiB, >= 1 (default 64)\n"
            "  --stats-kb N      trace ring added to each stats block, KiB (default 0)\n",
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

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, 0, 'p'},
        {"host", required_argument, 0, 'H'},
        {"estats", required_argument, 0, 'e'},
        {"service-ms", required_argument, 0, 's'},
        {"scratch-kb", required_argument, 0, 'k'},
        {"stats-kb", required_argument, 0, 't'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *host = "127.0.0.1";
    long port = -1, service_ms = 20, scratch_kb = 64, stats_kb = 0;
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
        case 'e':
            if (strcmp(optarg, "on") == 0) {
                estats_on = 1;
            } else if (strcmp(optarg, "off") == 0) {
                estats_on = 0;
            } else {
                fprintf(stderr, "%s: --estats takes on or off, not %s\n", prog, optarg);
                return 2;
            }
            break;
        case 's':
            if (parse_long(optarg, 0, 3600 * 1000, &service_ms) < 0) {
                fprintf(stderr, "%s: bad --service-ms %s\n", prog, optarg);
                return 2;
            }
            break;
        case 'k':
            if (parse_long(optarg, 1, 1024 * 1024, &scratch_kb) < 0) {
                fprintf(stderr, "%s: bad --scratch-kb %s (1..1048576)\n", prog, optarg);
                return 2;
            }
            break;
        case 't':
            if (parse_long(optarg, 0, 1024 * 1024, &stats_kb) < 0) {
                fprintf(stderr, "%s: bad --stats-kb %s (0..1048576)\n", prog, optarg);
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
    service_ns = (uint64_t)service_ms * 1000000ull;
    scratch_bytes = (size_t)scratch_kb * 1024;
    trace_bytes = (size_t)stats_kb * 1024;

    int sfd = signals_setup();
    if (sfd < 0) {
        fprintf(stderr, "%s: signals: %s\n", prog, strerror(errno));
        return 1;
    }
    char extra[128];
    snprintf(extra, sizeof extra, " (estats %s, service-ms %ld, scratch-kb %ld, stats-kb %ld)",
             estats_on ? "on" : "off", service_ms, scratch_kb, stats_kb);
    int lfd = listen_on(host, port, extra);
    if (lfd < 0)
        return 1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listen_tag};
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &signal_tag};
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0 ||
        epoll_ctl(epfd, EPOLL_CTL_ADD, sfd, &sev) < 0) {
        fprintf(stderr, "%s: epoll: %s\n", prog, strerror(errno));
        return 1;
    }
    return serve_loop(lfd, sfd);
}
