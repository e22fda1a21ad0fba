/*
 * unruly-server: a target that misbehaves on request, to test that the harness
 * survives it and cleans up after it.  No seeded bug: each flag is a way real
 * services make a supervisor's life hard.
 *
 * Protocol (pipelining allowed, replies in request order per connection):
 *     GET <key>\n   ->  OK <key> <pid>\n   pid = the process that served it
 *     other\n       ->  ERR bad request\n
 *
 * Flags:
 *   --port P            TCP port (required; 0 = any free port)
 *   --host ADDR         numeric address to bind (default 127.0.0.1)
 *   --ignore-sigterm    SIGTERM is only reported on stderr, with the wall-clock time it
 *                       arrived (SIGINT still exits 0)
 *   --fork-children N   after listening, fork N children that stay in the
 *                       process group and serve the same socket (prefork);
 *                       they never set a parent-death signal
 *   --setsid-child      also fork one child that setsid()s out of the group,
 *                       closes the socket, chdir("/")s and sleeps forever
 *   --hang-on-start     never listen: sleep until killed
 *   --flood             write lines to stdout and stderr as fast as it can
 *                       while serving (one write(2) per line, like a service
 *                       logging unbuffered)
 *   --exit-after S      exit after S seconds (fractions allowed) ...
 *   --exit-code C       ... with code C (default 1)
 *
 * Every process writes its pid to <cwd>/pids (one line each, O_APPEND), so a
 * test knows exactly which processes existed, including escaped ones. Pids
 * are as /proc shows them (the harness's numbering, also when the harness runs
 * each host in its own PID namespace, where getpid() counts from 1).
 * SIGTERM (unless ignored) and SIGINT exit 0, without waiting for children:
 * cleaning them up is the supervisor's job, which is the point.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 64
#define IN_CAP 4096
#define OUT_CAP 65536

static const char *prog = "unruly-server";
static volatile sig_atomic_t stopping;

struct conn {
    int fd;
    size_t in_len, out_len;
    char in[IN_CAP];
    char out[OUT_CAP];
};

static struct conn *conns[MAX_CONNS];

static void on_stop(int sig) { (void)sig; stopping = 1; }
static volatile sig_atomic_t term_ignored;
static struct timespec term_at; /* when it arrived, taken in the handler; the loop reports it */

static void on_ignore(int sig)
{
    (void)sig;
    clock_gettime(CLOCK_REALTIME, &term_at); /* async-signal-safe */
    term_ignored = 1;
}

static void handle(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL); /* no SA_RESTART: poll() returns EINTR */
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int my_pid(void)
{
    char buf[16];
    ssize_t n = readlink("/proc/self", buf, sizeof buf - 1);
    if (n <= 0)
        return (int)getpid();
    buf[n] = 0;
    return atoi(buf);
}

static void note_pid(void)
{
    char line[32];
    int fd = open("pids", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    int n = snprintf(line, sizeof line, "%d\n", my_pid());
    if (write(fd, line, (size_t)n) < 0) {
        /* best effort */
    }
    close(fd);
}

static int listen_on(const char *host, int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "%s: bad --host %s\n", prog, host);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 1024) < 0) {
        fprintf(stderr, "%s: cannot listen on %s port %d: %s\n", prog, host, port, strerror(errno));
        return -1;
    }
    fprintf(stderr, "%s: listening on %s port %d (pid %d)\n", prog, host, port, my_pid());
    return fd;
}

static void accept_one(int lfd)
{
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return; /* EAGAIN: a sibling process took it */
    for (int i = 0; i < MAX_CONNS; i++) {
        if (!conns[i] && (conns[i] = calloc(1, sizeof *conns[i]))) {
            conns[i]->fd = fd;
            return;
        }
    }
    close(fd); /* full */
}

static void drop(int i)
{
    close(conns[i]->fd);
    free(conns[i]);
    conns[i] = NULL;
}

/* Turn complete lines into replies while they fit. */
static void answer(struct conn *c)
{
    char *start = c->in, *end = c->in + c->in_len, *nl;
    while ((nl = memchr(start, '\n', (size_t)(end - start))) && OUT_CAP - c->out_len > IN_CAP + 32) {
        *nl = '\0';
        int n = strncmp(start, "GET ", 4) == 0
                    ? snprintf(c->out + c->out_len, OUT_CAP - c->out_len, "OK %s %d\n", start + 4, my_pid())
                    : snprintf(c->out + c->out_len, OUT_CAP - c->out_len, "ERR bad request\n");
        c->out_len += (size_t)n;
        start = nl + 1;
    }
    c->in_len = (size_t)(end - start);
    memmove(c->in, start, c->in_len);
}

/* Read, answer, write.  Returns -1 when the connection must be closed. */
static int service(struct conn *c, short revents)
{
    if (revents & (POLLERR | POLLHUP))
        return -1;
    if (revents & POLLIN) {
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            return -1;
        if (n > 0)
            c->in_len += (size_t)n;
        if (c->in_len == IN_CAP && !memchr(c->in, '\n', IN_CAP))
            return -1; /* line too long */
    }
    answer(c);
    if (c->out_len) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        if (n > 0) {
            c->out_len -= (size_t)n;
            memmove(c->out, c->out + n, c->out_len);
        }
    }
    return 0;
}

static void flood(void)
{
    static unsigned long n;
    char line[128];
    int len = snprintf(line, sizeof line, "%s: flood line %lu: the quick brown fox jumps over the lazy dog\n",
                       prog, n++);
    if (write(n & 1 ? 1 : 2, line, (size_t)len) < 0) {
        /* a full disk is not our problem */
    }
}

/* Serve until stopped (or until the exit deadline); also the children's loop. */
static int serve(int lfd, int do_flood, double exit_at, int exit_code)
{
    struct pollfd pfd[MAX_CONNS + 1];
    int idx[MAX_CONNS + 1];
    while (!stopping) {
        if (term_ignored) { /* so a test can tell how long the supervisor waited before SIGKILL */
            term_ignored = 0;
            fprintf(stderr, "%s: pid %d: SIGTERM ignored (at %lld.%09ld)\n", prog, my_pid(),
                    (long long)term_at.tv_sec, term_at.tv_nsec);
        }
        double left = exit_at > 0 ? exit_at - now_s() : -1;
        if (exit_at > 0 && left <= 0) {
            fprintf(stderr, "%s: --exit-after reached, exiting with code %d\n", prog, exit_code);
            return exit_code;
        }
        int nfds = 0;
        pfd[nfds++] = (struct pollfd){.fd = lfd, .events = POLLIN};
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i]) {
                short ev = conns[i]->in_len < IN_CAP ? POLLIN : 0;
                if (conns[i]->out_len)
                    ev |= POLLOUT;
                idx[nfds] = i;
                pfd[nfds++] = (struct pollfd){.fd = conns[i]->fd, .events = ev};
            }
        }
        int timeout = do_flood ? 0 : (left >= 0 ? (int)(left * 1000) + 1 : -1);
        int ready = poll(pfd, (nfds_t)nfds, timeout);
        if (do_flood)
            flood();
        if (ready <= 0)
            continue; /* timeout, or EINTR: check `stopping` */
        if (pfd[0].revents & POLLIN)
            accept_one(lfd);
        for (int k = 1; k < nfds; k++)
            if (pfd[k].revents && service(conns[idx[k]], pfd[k].revents) < 0)
                drop(idx[k]);
    }
    fprintf(stderr, "%s: pid %d stopping\n", prog, my_pid());
    return 0;
}

static void fork_children(int lfd, int count, int escape)
{
    for (int i = 0; i < count + escape; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            fprintf(stderr, "%s: fork: %s\n", prog, strerror(errno));
            return;
        }
        if (pid > 0)
            continue;
        note_pid();
        if (i == count) { /* the escapee: its own session, away from the group's signals, as a daemon */
            setsid();
            close(lfd);
            if (chdir("/") < 0) {
                /* stay where we are */
            }
            while (!stopping)
                pause();
            exit(0);
        }
        exit(serve(lfd, 0, 0, 0));
    }
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, 0, 'p'},      {"host", required_argument, 0, 'H'},
        {"ignore-sigterm", no_argument, 0, 'i'},  {"fork-children", required_argument, 0, 'f'},
        {"setsid-child", no_argument, 0, 's'},    {"hang-on-start", no_argument, 0, 'g'},
        {"flood", no_argument, 0, 'F'},           {"exit-after", required_argument, 0, 'e'},
        {"exit-code", required_argument, 0, 'c'}, {0, 0, 0, 0},
    };
    const char *host = "127.0.0.1";
    int port = -1, ignore_term = 0, children = 0, escape = 0, hang = 0, do_flood = 0, exit_code = 1;
    double exit_after = 0;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'p': port = atoi(optarg); break;
        case 'H': host = optarg; break;
        case 'i': ignore_term = 1; break;
        case 'f': children = atoi(optarg); break;
        case 's': escape = 1; break;
        case 'g': hang = 1; break;
        case 'F': do_flood = 1; break;
        case 'e': exit_after = atof(optarg); break;
        case 'c': exit_code = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: %s --port P [--host ADDR] [--ignore-sigterm] [--fork-children N] "
                            "[--setsid-child] [--hang-on-start] [--flood] [--exit-after S] [--exit-code C]\n",
                    prog);
            return 2;
        }
    }
    if (port < 0 || port > 65535 || children < 0 || optind != argc) {
        fprintf(stderr, "%s: --port P is required (0..65535); --fork-children takes N >= 0\n", prog);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    handle(SIGTERM, ignore_term ? on_ignore : on_stop);
    handle(SIGINT, on_stop);
    note_pid();
    double exit_at = exit_after > 0 ? now_s() + exit_after : 0;
    if (hang) {
        fprintf(stderr, "%s: hanging on start, never listening\n", prog);
        while (!stopping)
            pause();
        return 0;
    }
    int lfd = listen_on(host, port);
    if (lfd < 0)
        return 1;
    fork_children(lfd, children, escape);
    return serve(lfd, do_flood, exit_at, exit_code);
}
