/*
 * arena-server: a key/value line server with a small item cache and a seeded
 * use-after-free whose outcome depends on the allocator.
 *
 *     GET <key>\n   ->  OK <key> <value>\n    (value: "v" + 16 hex digits, a function of the key)
 *     other\n       ->  ERR bad request\n
 *
 * Values are "computed" on a miss and kept in a cache of at most --cache-items
 * items (default 64), evicted least recently used.  In front of the cache's
 * hash table sits a direct-mapped "recent" table: recent[hash % RECENT_SLOTS]
 * points at the item last looked up through that slot, so a repeated key is
 * served without walking a hash chain or touching the LRU list.
 *
 * THE BUG: cache_evict() unlinks the victim from its hash chain and from the
 * LRU list and frees it, but leaves recent[] alone.  If the victim's slot still
 * points at it, the next GET of that key goes through cache_touch(), which
 * dereferences the freed item: it->key (offset 0x10) for the key compare, then
 * it->value (0x18) and it->vlen (0x20) for the reply, and writes it->hits.
 * Whether that is noticed depends on what the allocator did to the freed chunk:
 *   - glibc (tcache), jemalloc, tcmalloc, mimalloc: only the first 8 or 16
 *     bytes of a freed chunk hold free-list data, so it->key and it->value still
 *     point at the old key and value: the stale read returns the right answer.
 *     Once the chunk is reused for another item, the key compare fails and the
 *     request takes the slow path: silent either way.
 *   - glibc MALLOC_PERTURB_=165 with the tcache off, or jemalloc junk:true:
 *     the freed chunk is filled with 0xa5 / 0x5a, so it->key is
 *     0xa5a5a5a5a5a5a5a5 / 0x5a5a5a5a5a5a5a5a, a non-canonical address: the
 *     first byte compare in cache_touch() raises SIGSEGV (si_code SI_KERNEL).
 * Fast-path hits do not refresh the LRU position (that is what makes them
 * cheap), so a key that keeps being served from its recent slot ages out of the
 * LRU while its slot still points at it: exactly the item that gets evicted
 * with a live slot.  A small key space (a couple of hundred keys over a 64-item
 * cache) reaches the stale read within a few hundred requests.
 *
 * One thread, non-blocking sockets, level-triggered epoll, pipelining (replies
 * in request order).  Items are the only allocations made while serving (one
 * malloc per miss, one free per eviction); connection buffers are allocated at
 * accept and are far bigger, so freed item chunks are only ever reused by items.
 *
 * Flags: --port P (required; 0 picks a free port), --host ADDR (127.0.0.1),
 * --cache-items N (64).  SIGTERM/SIGINT: exit 0 with a summary line.
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

#define KEY_MAX 250                    /* longer keys: ERR bad request */
#define VALUE_LEN 17                   /* "v" + 16 hex digits */
#define REPLY_MAX (3 + KEY_MAX + 1 + VALUE_LEN + 1)
#define IN_CAP (16 * 1024)             /* longest accepted line: IN_CAP - 1 bytes + '\n' */
#define OUT_CAP (32 * 1024)
#define MAX_EVENTS 256
#define RECENT_SLOTS 64                /* power of two */

static const char *prog = "arena-server";

/* ---------------------------------------------------------------- the cache */

/* One cached key/value pair, allocated as one block with its strings after the
 * header.  Offsets (x86-64) matter for the bug: a freed chunk's first 16 bytes
 * are free-list data in glibc's tcache (next, key), the rest is left as it was. */
struct item {
    struct item *next;        /* 0x00  hash chain */
    uint64_t hash;            /* 0x08  FNV-1a of the key */
    char *key;                /* 0x10  -> data, NUL-terminated */
    char *value;              /* 0x18  -> data + klen + 1, NUL-terminated */
    uint32_t vlen;            /* 0x20 */
    uint32_t hits;            /* 0x24 */
    struct item *lru_prev;    /* 0x28  towards the most recently used */
    struct item *lru_next;    /* 0x30  towards the least recently used */
    char data[];              /* 0x38  key '\0' value '\0' */
};

_Static_assert(offsetof(struct item, key) == 0x10, "key pointer past the tcache fields");
_Static_assert(offsetof(struct item, value) == 0x18, "value pointer past the tcache fields");

static struct item **buckets;
static size_t bucket_mask;
static struct item *lru_head, *lru_tail;       /* most / least recently used */
/* Lookaside in front of the hash table: the item last looked up per slot. */
struct recent_slot {
    uint64_t hash;
    struct item *item;
};
static struct recent_slot recent[RECENT_SLOTS];
static size_t n_items, max_items = 64;
static unsigned long n_requests, n_fast, n_hits, n_misses, n_evictions, n_bad;

/* Keys are compared through this: the inline first-byte test saves a strcmp
 * call on most mismatches. */
#define STREQ(a, b) (*(a) == *(b) && strcmp((a), (b)) == 0)

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* The value of a key: what a backend lookup would return. */
static void compute_value(uint64_t h, char out[VALUE_LEN + 1])
{
    uint64_t z = h + 0x9e3779b97f4a7c15ULL; /* splitmix64 finaliser */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    snprintf(out, VALUE_LEN + 1, "v%016llx", (unsigned long long)z);
}

static void lru_unlink(struct item *it)
{
    if (it->lru_prev)
        it->lru_prev->lru_next = it->lru_next;
    else
        lru_head = it->lru_next;
    if (it->lru_next)
        it->lru_next->lru_prev = it->lru_prev;
    else
        lru_tail = it->lru_prev;
}

static void lru_push_front(struct item *it)
{
    it->lru_prev = NULL;
    it->lru_next = lru_head;
    if (lru_head)
        lru_head->lru_prev = it;
    lru_head = it;
    if (!lru_tail)
        lru_tail = it;
}

/* Fast path: the key's recent slot names it (same 64-bit hash), so take the
 * slot's item without walking the hash chain or touching the LRU list.  The
 * key compare only guards against a hash collision. */
static NOINLINE struct item *cache_touch(const char *key, uint64_t h)
{
    struct recent_slot *r = &recent[h & (RECENT_SLOTS - 1)];
    if (r->hash != h || !r->item)
        return NULL;
    struct item *it = r->item;
    if (!STREQ(it->key, key)) /* reads it->key: freed memory if it was evicted */
        return NULL;
    it->hits++;
    return it;
}

/* Slow path: walk the hash chain; a hit becomes most recently used and takes
 * the recent slot. */
static NOINLINE struct item *cache_lookup(const char *key, uint64_t h)
{
    for (struct item *it = buckets[h & bucket_mask]; it; it = it->next) {
        if (it->hash == h && strcmp(it->key, key) == 0) {
            lru_unlink(it);
            lru_push_front(it);
            recent[h & (RECENT_SLOTS - 1)] = (struct recent_slot){h, it};
            it->hits++;
            return it;
        }
    }
    return NULL;
}

/* Drop the least recently used item. */
static NOINLINE void cache_evict(void)
{
    struct item *victim = lru_tail;
    struct item **pp = &buckets[victim->hash & bucket_mask];
    while (*pp != victim)
        pp = &(*pp)->next;
    *pp = victim->next;
    lru_unlink(victim);
    n_items--;
    n_evictions++;
    /* BUG: recent[victim->hash & (RECENT_SLOTS - 1)] may still name the
     * victim; nothing clears it. */
    free(victim);
}

/* Miss: compute the value, insert it as most recently used, then evict down
 * to max_items.  Returns NULL when out of memory. */
static NOINLINE struct item *cache_fill(const char *key, size_t klen, uint64_t h)
{
    char value[VALUE_LEN + 1];
    compute_value(h, value);
    struct item *it = malloc(sizeof *it + klen + 1 + VALUE_LEN + 1);
    if (!it)
        return NULL;
    it->hash = h;
    it->key = it->data;
    memcpy(it->key, key, klen + 1);
    it->value = it->data + klen + 1;
    memcpy(it->value, value, VALUE_LEN + 1);
    it->vlen = VALUE_LEN;
    it->hits = 0;
    it->next = buckets[h & bucket_mask];
    buckets[h & bucket_mask] = it;
    lru_push_front(it);
    recent[h & (RECENT_SLOTS - 1)] = (struct recent_slot){h, it};
    n_items++;
    while (n_items > max_items)
        cache_evict();
    return it;
}

static int cache_init(void)
{
    size_t n = 16;
    while (n < 2 * max_items)
        n <<= 1;
    buckets = calloc(n, sizeof *buckets);
    bucket_mask = n - 1;
    return buckets ? 0 : -1;
}

/* ------------------------------------------------------------- connections */

struct conn {
    int fd;
    uint32_t events; /* current epoll interest */
    int eof;         /* client shut down its sending side */
    size_t in_len;
    size_t out_off, out_len;
    char in[IN_CAP];
    char out[OUT_CAP];
};

/* Sentinels for epoll_event.data.ptr. */
static char listen_tag, signal_tag;

static int epfd = -1;
static unsigned long n_conns, n_accepted;
static uint64_t accept_resume_ms; /* non-zero: accepting paused (out of fds) */

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* One request line (without its '\n') -> one reply appended to out (which has
 * room for REPLY_MAX bytes). */
static NOINLINE void handle_line(struct conn *c, char *line, size_t len)
{
    char *o = c->out + c->out_len;
    n_requests++;
    if (len && line[len - 1] == '\r')
        len--;
    if (len > 4 && len - 4 <= KEY_MAX && memcmp(line, "GET ", 4) == 0 &&
        !memchr(line + 4, '\0', len - 4)) {
        char key[KEY_MAX + 1];
        size_t klen = len - 4;
        memcpy(key, line + 4, klen);
        key[klen] = '\0';
        uint64_t h = fnv1a(key, klen);
        struct item *it = cache_touch(key, h);
        if (it) {
            n_fast++;
        } else if ((it = cache_lookup(key, h)) != NULL) {
            n_hits++;
        } else {
            n_misses++;
            it = cache_fill(key, klen, h);
        }
        if (it) {
            memcpy(o, "OK ", 3);
            memcpy(o + 3, key, klen);
            o[3 + klen] = ' ';
            memcpy(o + 4 + klen, it->value, it->vlen);
            o[4 + klen + it->vlen] = '\n';
            c->out_len += 5 + klen + it->vlen;
            return;
        }
        memcpy(o, "ERR nomem\n", 10);
        c->out_len += 10;
        return;
    }
    n_bad++;
    memcpy(o, "ERR bad request\n", 16);
    c->out_len += 16;
}

/* Answer every complete line while the output buffer has room for a reply. */
static NOINLINE void conn_process(struct conn *c)
{
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
    } else if (c->out_off > 0 && OUT_CAP - c->out_len < REPLY_MAX) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    size_t pos = 0;
    while (pos < c->in_len && OUT_CAP - c->out_len >= REPLY_MAX) {
        char *line = c->in + pos;
        char *nl = memchr(line, '\n', c->in_len - pos);
        if (!nl)
            break;
        handle_line(c, line, (size_t)(nl - line));
        pos = (size_t)(nl - c->in) + 1;
    }
    if (pos) {
        c->in_len -= pos;
        memmove(c->in, c->in + pos, c->in_len);
    }
}

static void conn_close(struct conn *c)
{
    close(c->fd); /* also removes it from the epoll set */
    free(c);
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
            /* EMFILE, ENFILE, ENOBUFS, ENOMEM: stop accepting for 100 ms
             * (the listen socket is level-triggered and would spin). */
            fprintf(stderr, "%s: accept: %s (pausing accepts)\n", prog, strerror(errno));
            epoll_ctl(epfd, EPOLL_CTL_DEL, lfd, NULL);
            accept_resume_ms = now_ms() + 100;
            return;
        }
        struct conn *c = malloc(sizeof *c);
        if (!c) {
            close(fd); /* out of memory: drop the connection, keep serving */
            continue;
        }
        c->fd = fd;
        c->eof = 0;
        c->in_len = c->out_off = c->out_len = 0;
        c->events = EPOLLIN;
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

/* Write what we can.  Returns -1 when the connection must be closed. */
static NOINLINE int conn_flush(struct conn *c)
{
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

/* Answer, write, update the epoll interest.  Returns -1 to close. */
static NOINLINE int conn_service(struct conn *c)
{
    for (;;) {
        size_t before = c->in_len;
        conn_process(c);
        if (conn_flush(c) < 0)
            return -1;
        /* Loop while the flush made room for more buffered lines. */
        if (c->in_len == before || c->out_len != 0 || c->in_len == 0)
            break;
    }
    int pending_out = c->out_len > c->out_off;
    if (c->in_len == IN_CAP && !memchr(c->in, '\n', IN_CAP))
        return -1; /* line longer than we accept: protocol error */
    if (c->eof && !pending_out)
        return -1; /* done (an unterminated last line is dropped) */
    uint32_t want = 0;
    if (!c->eof && c->in_len < IN_CAP)
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

/* ---------------------------------------------------------------- set-up */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s --port P [--host ADDR] [--cache-items N]\n"
            "  --port P          TCP port to listen on (required; 0 = any free port)\n"
            "  --host ADDR       numeric address to bind (default 127.0.0.1)\n"
            "  --cache-items N   items kept in the cache, 1 to 10000000 (default 64)\n",
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

/* Bind and listen (SO_REUSEADDR, backlog 1024, non-blocking); prints the one
 * "listening" line to stderr.  Returns the fd or -1. */
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

/* ------------------------------------------------------------ the loop */

static NOINLINE int serve_loop(int lfd, int sfd)
{
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int timeout = -1;
        if (accept_resume_ms) {
            uint64_t now = now_ms();
            if (now >= accept_resume_ms) {
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listen_tag};
                epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
                accept_resume_ms = 0;
            } else {
                timeout = (int)(accept_resume_ms - now);
            }
        }
        int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "%s: epoll_wait: %s\n", prog, strerror(errno));
            return 1;
        }
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
                            "%s: signal %u, exiting (%lu connections, %lu requests: %lu recent, "
                            "%lu hits, %lu misses, %lu evictions, %lu bad)\n",
                            prog, signo, n_accepted, n_requests, n_fast, n_hits, n_misses,
                            n_evictions, n_bad);
                    return 0;
                }
                continue;
            }
            struct conn *c = p;
            uint32_t e = evs[i].events;
            if (e & (EPOLLERR | EPOLLHUP)) {
                conn_close(c);
                continue;
            }
            if ((e & EPOLLIN) && conn_read(c) < 0) {
                conn_close(c);
                continue;
            }
            if (conn_service(c) < 0)
                conn_close(c);
        }
    }
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, 0, 'p'},
        {"host", required_argument, 0, 'H'},
        {"cache-items", required_argument, 0, 'c'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *host = "127.0.0.1";
    long port = -1, items = 64;
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
        case 'c':
            if (parse_long(optarg, 1, 10000000, &items) < 0) {
                fprintf(stderr, "%s: bad --cache-items %s (1 to 10000000)\n", prog, optarg);
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
    max_items = (size_t)items;
    if (cache_init() < 0) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 1;
    }
    int sfd = signals_setup();
    if (sfd < 0) {
        fprintf(stderr, "%s: signals: %s\n", prog, strerror(errno));
        return 1;
    }
    char extra[64];
    snprintf(extra, sizeof extra, " (cache-items %zu)", max_items);
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
