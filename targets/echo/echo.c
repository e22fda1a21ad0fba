/*
 * echo-server: the well-behaved baseline target.
 *
 * Line protocol over TCP: every request is one line ending in '\n'; the reply
 * is the same line, byte for byte.  Clients may pipeline (send many requests
 * without waiting); replies come back in request order.
 *
 * One thread, non-blocking sockets, level-triggered epoll.  Input is read in
 * big chunks and every complete line in a chunk is echoed with one memcpy;
 * replies are written in one send() per batch.  A connection whose client does
 * not read its replies is throttled (we stop reading it once its output buffer
 * is full), so memory per connection is bounded.
 *
 * Flags: --port P (required; 0 picks a free port), --host ADDR (127.0.0.1).
 * SIGTERM/SIGINT: exit 0.  SIGPIPE is ignored and sends use MSG_NOSIGNAL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

#define IN_CAP (64 * 1024)   /* longest accepted line: IN_CAP - 1 bytes + '\n' */
#define OUT_CAP (128 * 1024) /* must be >= IN_CAP so any complete line fits */
#define MAX_EVENTS 256

static const char *prog = "echo-server";

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
static unsigned long n_conns, n_accepted, n_bytes;
static uint64_t accept_resume_ms; /* non-zero: accepting paused (out of fds) */

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------- set-up */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s --port P [--host ADDR]\n"
            "  --port P     TCP port to listen on (required; 0 = any free port)\n"
            "  --host ADDR  numeric address to bind (default 127.0.0.1)\n",
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

/* ---------------------------------------------------------- connections */

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
        n_bytes += (size_t)n;
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

/* Move every complete line that fits from the input to the output buffer.
 * Returns the number of bytes moved. */
static NOINLINE size_t echo_lines(struct conn *c)
{
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
    } else if (c->out_off > 0 && OUT_CAP - c->out_len < c->in_len) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    size_t room = OUT_CAP - c->out_len;
    size_t n = c->in_len < room ? c->in_len : room;
    char *nl = n ? memrchr(c->in, '\n', n) : NULL;
    if (!nl)
        return 0;
    size_t take = (size_t)(nl - c->in) + 1;
    memcpy(c->out + c->out_len, c->in, take);
    c->out_len += take;
    c->in_len -= take;
    if (c->in_len)
        memmove(c->in, c->in + take, c->in_len);
    return take;
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

/* Echo, write, update the epoll interest.  Returns -1 to close. */
static NOINLINE int conn_service(struct conn *c)
{
    for (;;) {
        size_t moved = echo_lines(c);
        if (conn_flush(c) < 0)
            return -1;
        /* Loop while the flush made room for more buffered lines. */
        if (!moved || c->out_len != 0 || c->in_len == 0)
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
                    fprintf(stderr, "%s: signal %u, exiting (%lu connections served, %lu bytes)\n",
                            prog, signo, n_accepted, n_bytes);
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
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *host = "127.0.0.1";
    long port = -1;
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
    int sfd = signals_setup();
    if (sfd < 0) {
        fprintf(stderr, "%s: signals: %s\n", prog, strerror(errno));
        return 1;
    }
    int lfd = listen_on(host, port, "");
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
