"""The C targets under targets/: real processes, real sockets on 127.0.0.1.

Every server is started on a free port, checked with pipelined requests on
several connections, and killed in a finally block.  Nothing here depends on a
timing margin: we wait for conditions (with generous timeouts), and the crash
tests hold enough requests in flight that the outcome is decided by counts, not
by speed.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import make_targets

REPO = Path(__file__).resolve().parents[2]
TARGETS = REPO / "targets"
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- helpers


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process and everything it started (gdb's inferior, for one)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(children, timeout=10)


def limits(as_bytes: int | None = None) -> Callable[[], None]:
    """preexec_fn: no core files (they land in the cwd), optionally an address-space limit."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))

    return apply


def can_connect(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
        return True
    except OSError:
        return False


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running after {timeout}s\n{self.stderr()}") from None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.wait()


@contextlib.contextmanager
def server(
    argv: list[str],
    tmp: Path,
    *,
    env: dict[str, str] | None = None,
    as_bytes: int | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Iterator[Server]:
    """Start argv + --port P on a free port, wait until it accepts, kill it at the end.

    wrap(full_argv) may put the server under another program (gdb); the port
    check is the same."""
    log = tmp / f"server-{time.monotonic_ns()}.stderr"
    proc = None
    try:
        for _attempt in range(5):
            port = free_port()
            full = [*argv, "--port", str(port)]
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    wrap(full) if wrap else full,
                    stdin=subprocess.DEVNULL,
                    stdout=err if wrap else subprocess.DEVNULL,
                    stderr=err,
                    cwd=tmp,
                    env=env,
                    preexec_fn=limits(as_bytes),
                )
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline and not can_connect(port):
                time.sleep(0.02)
            if proc.poll() is None and can_connect(port):
                break
            text = log.read_text(errors="replace")
            kill_tree(proc)
            if "in use" not in text:  # anything but a lost race for the port is fatal
                raise AssertionError(f"server did not start: {argv}\n{text}")
        else:
            raise AssertionError(f"no free port for {argv}")
        yield Server(proc, port, log)
    finally:
        if proc is not None:
            kill_tree(proc)


def connect(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def exchange(port: int, payloads: list[bytes], timeout: float = 60.0) -> list[list[bytes]]:
    """One connection per payload; send everything pipelined while reading, and
    return each connection's reply lines once it has one per request line."""
    sel = selectors.DefaultSelector()
    conns = []
    try:
        for p in payloads:
            s = connect(port)
            s.setblocking(False)
            st = {"sock": s, "out": memoryview(p), "want": p.count(b"\n"), "got": 0, "buf": bytearray()}
            conns.append(st)
            sel.register(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if p else 0), st)
        pending = sum(1 for st in conns if st["got"] < st["want"])
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"replies missing after {timeout}s: {[(c['got'], c['want']) for c in conns]}")
            for key, ev in sel.select(timeout=1.0):
                st = key.data
                s = st["sock"]
                if ev & selectors.EVENT_WRITE and st["out"]:
                    n = s.send(st["out"][: 1 << 16])
                    st["out"] = st["out"][n:]
                    if not st["out"]:
                        sel.modify(s, selectors.EVENT_READ, st)
                if ev & selectors.EVENT_READ:
                    data = s.recv(1 << 20)
                    if not data:
                        raise AssertionError(f"server closed a connection after {st['got']}/{st['want']} replies")
                    before = st["got"] >= st["want"]
                    st["buf"] += data
                    st["got"] += data.count(b"\n")
                    if not before and st["got"] >= st["want"]:
                        pending -= 1
        return [bytes(st["buf"]).split(b"\n")[:-1] for st in conns]
    finally:
        sel.close()
        for st in conns:
            st["sock"].close()


def requests_for(conn: int, n: int, nkeys: int | None = None) -> tuple[bytes, list[bytes]]:
    """n "GET <key>" lines for one connection: keys unique to the connection,
    or (nkeys given) drawn from a key space of nkeys shared by all connections."""
    if nkeys is None:
        keys = [b"c%dk%d" % (conn, i) for i in range(n)]
    else:
        keys = [b"k%d" % ((i * 7 + conn * 13) % nkeys) for i in range(n)]
    return b"".join(b"GET %s\n" % k for k in keys), keys


# ---------------------------------------------------------------- per-target protocol


@dataclass
class Target:
    name: str
    args: list[str]  # flags for the protocol tests (fast service)

    def check(self, keys: list[bytes], replies: list[bytes]) -> None:
        """Every reply present, in request order."""
        assert len(replies) == len(keys), (len(replies), len(keys))
        if self.name == "echo":
            assert replies == [b"GET " + k for k in keys]
        elif self.name == "twq":
            assert replies == [b"OK " + k for k in keys]
        else:
            last = 0
            for k, r in zip(keys, replies):
                ok, key, n = r.split(b" ")
                assert (ok, key) == (b"OK", k), r
                assert int(n) > last, "request numbers must grow along a connection"
                last = int(n)


PROTOCOL_TARGETS = [
    Target("echo", []),
    Target("estats", ["--service-ms", "1", "--scratch-kb", "4"]),
    Target("twq", ["--tw-ms", "5"]),
]


@pytest.fixture(scope="session")
def binaries() -> dict[str, Path]:
    r = make_targets(TARGETS)
    assert r.returncode == 0, r.stdout + r.stderr
    bins = {n: TARGETS / n / f"{n}-server" for n in ("echo", "estats", "twq")}
    for b in bins.values():
        assert os.access(b, os.X_OK), b
    return bins


@pytest.fixture(params=PROTOCOL_TARGETS, ids=lambda t: t.name)
def target(request, binaries) -> tuple[Target, list[str]]:
    t = request.param
    return t, [str(binaries[t.name]), *t.args]


def test_pipelined_requests_on_many_connections(target, tmp_path):
    t, argv = target
    n = 20000 if t.name == "echo" else 3000
    batches = [requests_for(c, n, nkeys=50 if t.name == "twq" else None) for c in range(6)]
    with server(argv, tmp_path) as srv:
        replies = exchange(srv.port, [p for p, _ in batches])
        for (_, keys), got in zip(batches, replies):
            t.check(keys, got)
        assert srv.alive()
        assert srv.stop() == 0


def test_partial_lines_across_sends(target, tmp_path):
    t, argv = target
    payload, keys = requests_for(0, 200)
    with server(argv, tmp_path) as srv:
        s = connect(srv.port)
        try:
            # Splits inside the command, inside the key, right before '\n', and
            # many requests in one send.
            cuts = [1, 2, 3, 5, 9, 10, 11, 12, 40, 41, 300, 301, 1500, len(payload)]
            prev = 0
            for c in cuts:
                s.sendall(payload[prev:c])
                prev = c
                time.sleep(0.002)  # separate segments (correctness does not depend on it)
            buf = b""
            while buf.count(b"\n") < len(keys):
                data = s.recv(65536)
                assert data, "server closed the connection"
                buf += data
            t.check(keys, buf.split(b"\n")[:-1])
        finally:
            s.close()
        assert srv.stop() == 0


def test_clients_vanishing_mid_request_do_not_hurt(target, tmp_path):
    t, argv = target
    with server(argv, tmp_path) as srv:
        for round_ in range(3):
            # FIN with requests in flight and a half-sent line.
            a = connect(srv.port)
            a.sendall(requests_for(1, 2000)[0] + b"GET half-a-li")
            a.close()
            # RST (SO_LINGER 0) with requests in flight.
            b = connect(srv.port)
            b.sendall(requests_for(2, 2000)[0])
            b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            b.close()
            # A reader that stops reading, then vanishes.
            c = connect(srv.port)
            c.sendall(requests_for(3, 5000)[0])
            c.close()
            # Others are still served, in order.
            payload, keys = requests_for(4, 500)
            t.check(keys, exchange(srv.port, [payload])[0])
            assert srv.alive(), srv.stderr()
        assert srv.stop() == 0


def test_half_close_gets_every_reply_then_eof(target, tmp_path):
    t, argv = target
    payload, keys = requests_for(0, 1000, nkeys=10)
    with server(argv, tmp_path) as srv:
        s = connect(srv.port)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            buf = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                buf += data
            t.check(keys, buf.split(b"\n")[:-1])
        finally:
            s.close()
        assert srv.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero_with_clients_connected(target, tmp_path, sig):
    t, argv = target
    if t.name == "estats":
        argv = [*argv, "--service-ms", "60000"]  # requests still in flight at the signal
    with server(argv, tmp_path) as srv:
        s = connect(srv.port)
        try:
            s.sendall(requests_for(0, 100)[0] + b"GET unfinished")
            idle = connect(srv.port)
            assert srv.stop(sig) == 0, srv.stderr()
            idle.close()
        finally:
            s.close()
        assert re.search(rb"listening on 127\.0\.0\.1 port \d+", srv.log.read_bytes())


def test_line_longer_than_the_buffer_closes_only_that_connection(target, tmp_path):
    t, argv = target
    with server(argv, tmp_path) as srv:
        s = connect(srv.port)
        try:
            s.settimeout(30)
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                s.sendall(b"GET " + b"x" * (1 << 20))  # no newline, bigger than any input buffer
                while s.recv(65536):
                    pass
        finally:
            s.close()
        payload, keys = requests_for(0, 100)
        t.check(keys, exchange(srv.port, [payload])[0])
        assert srv.stop() == 0


def test_usage_errors_exit_2(binaries):
    for name, b in binaries.items():
        r = subprocess.run([str(b)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "usage" in r.stderr, (name, r)
        r = subprocess.run([str(b), "--port", "0", "--bogus"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (name, r)
    for bad in (["--estats", "maybe"], ["--scratch-kb", "0"], ["--stats-kb", "-1"], ["--service-ms", "x"]):
        r = subprocess.run([str(binaries["estats"]), "--port", "0", *bad], capture_output=True, timeout=30)
        assert r.returncode == 2, bad
    r = subprocess.run([str(binaries["twq"]), "--port", "0", "--threads", "0"], capture_output=True, timeout=30)
    assert r.returncode == 2


def test_estats_and_twq_reject_bad_requests_in_order(binaries, tmp_path):
    lines = [b"GET a", b"PUT a", b"GET ", b"", b"GET b\r", b"GET " + b"k" * 2000, b"GET c"]
    payload = b"".join(x + b"\n" for x in lines)
    for name, argv in (("estats", ["--service-ms", "1"]), ("twq", [])):
        with server([str(binaries[name]), *argv], tmp_path) as srv:
            got = exchange(srv.port, [payload])[0]
            heads = [g.split(b" ")[:2] for g in got]
            assert heads == [
                [b"OK", b"a"],
                [b"ERR", b"bad"],
                [b"ERR", b"bad"],
                [b"ERR", b"bad"],
                [b"OK", b"b"],
                [b"ERR", b"bad"],
                [b"OK", b"c"],
            ], (name, got)
            assert srv.stop() == 0


# ---------------------------------------------------------------------------- estats


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def accepted_by(pid: int, socks: list[socket.socket]) -> bool:
    """True once the server process holds the other end of every socket."""
    ours = {s.getsockname()[1] for s in socks}
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    theirs = {c.raddr.port for c in conns if c.raddr and c.status == psutil.CONN_ESTABLISHED}
    return ours <= theirs


def test_estats_live_memory_grows_with_requests_in_flight(binaries, tmp_path):
    argv = [str(binaries["estats"]), "--service-ms", "60000", "--scratch-kb", "256"]
    with server(argv, tmp_path) as srv:
        idle = status_kib(srv.pid, "VmRSS")
        socks = [connect(srv.port) for _ in range(2)]
        try:
            for i, s in enumerate(socks):
                s.sendall(requests_for(i, 100)[0])  # 200 x 256 KiB = 50 MiB in flight
            grown = wait_until(
                lambda: status_kib(srv.pid, "VmRSS") >= idle + 40 * 1024 and status_kib(srv.pid, "VmRSS"),
                what="RSS to grow by 40 MiB",
            )
            assert grown - idle >= 40 * 1024
            for s in socks:  # nothing has been answered: it is all still in flight
                s.setblocking(False)
                with pytest.raises(BlockingIOError):
                    s.recv(1)
        finally:
            for s in socks:
                s.close()
        assert srv.stop() == 0


ESTATS_AS_ARGS = ["--scratch-kb", "1024"]
AS_HEADROOM = 32 << 20  # ~30 scratch buffers of 1 MiB, then malloc returns NULL
AS_CONNS, AS_PER_CONN = 24, 400  # 9600 requests; ~30 + a few hundred exhaust the limit


def estats_as_limit(binaries, tmp_path) -> int:
    """Idle VmSize of estats-server plus AS_HEADROOM."""
    with server([str(binaries["estats"]), *ESTATS_AS_ARGS], tmp_path) as srv:
        vmsize = status_kib(srv.pid, "VmSize") * 1024
        srv.stop()
    return vmsize + AS_HEADROOM


def flood_under_limit(port: int, pid: int, may_die: bool = False) -> list[socket.socket]:
    """Open every connection, wait until the server has accepted them all (so
    their buffers exist before memory runs out), then send all requests, each
    connection's in one write (so the server starts them together)."""
    socks = [connect(port) for _ in range(AS_CONNS)]
    wait_until(lambda: accepted_by(pid, socks), what="all connections accepted")
    for i, s in enumerate(socks):
        try:
            s.sendall(requests_for(i, AS_PER_CONN)[0])
        except OSError:
            if not may_die:
                raise
            break  # it crashed before we finished sending
    return socks


@pytest.mark.parametrize("stats_kb", ["0", "4"])
def test_estats_on_segfaults_when_malloc_returns_null(binaries, tmp_path, stats_kb):
    limit = estats_as_limit(binaries, tmp_path)
    argv = [str(binaries["estats"]), "--estats", "on", "--service-ms", "60000", "--stats-kb", stats_kb, *ESTATS_AS_ARGS]
    with server(argv, tmp_path, as_bytes=limit) as srv:
        socks = flood_under_limit(srv.port, srv.pid, may_die=True)
        try:
            rc = srv.wait(timeout=60)
        finally:
            for s in socks:
                s.close()
        assert rc == -signal.SIGSEGV, (rc, srv.stderr())


@pytest.mark.slow
def test_estats_off_answers_nomem_under_the_same_load(binaries, tmp_path):
    limit = estats_as_limit(binaries, tmp_path)
    argv = [str(binaries["estats"]), "--estats", "off", "--service-ms", "1500", *ESTATS_AS_ARGS]
    with server(argv, tmp_path, as_bytes=limit) as srv:
        socks = flood_under_limit(srv.port, srv.pid)
        counts = {"OK": 0, "ERR": 0}
        try:
            for i, s in enumerate(socks):
                s.settimeout(60)
                buf = b""
                while buf.count(b"\n") < AS_PER_CONN:
                    data = s.recv(65536)
                    assert data, f"connection closed early\n{srv.stderr()}"
                    buf += data
                replies = buf.split(b"\n")[:-1]
                _, keys = requests_for(i, AS_PER_CONN)
                for k, r in zip(keys, replies, strict=True):
                    if r == b"ERR nomem":
                        counts["ERR"] += 1
                    else:
                        assert r.split(b" ")[:2] == [b"OK", k], r
                        counts["OK"] += 1
        finally:
            for s in socks:
                s.close()
        # The first ~30 requests hold all the address space there is; the rest
        # (about 9570) arrive while those are held and find no memory.
        assert counts["ERR"] > 0 and counts["OK"] > 0, counts
        assert srv.alive()
        # The memory came back with the replies: new requests get their scratch.
        payload, keys = requests_for(0, 5)
        assert [r.split(b" ")[:2] for r in exchange(srv.port, [payload])[0]] == [[b"OK", k] for k in keys]
        assert srv.stop() == 0


# --------------------------------------------------------------------------- gdb


def gdb_or_skip() -> str:
    gdb = shutil.which("gdb")
    if not gdb:
        pytest.skip("gdb not installed")
    r = subprocess.run(
        [gdb, "-q", "-batch", "-nx", "-ex", "run", "--args", "/bin/true"], capture_output=True, text=True, timeout=60
    )
    if "exited normally" not in r.stdout + r.stderr:
        pytest.skip(f"gdb cannot run programs here: {r.stdout}{r.stderr}")
    return gdb


def gdb_wrap(gdb: str, exec_wrapper: str) -> Callable[[list[str]], list[str]]:
    def wrap(argv: list[str]) -> list[str]:
        return [
            gdb, "-q", "-batch", "-nx",
            "-ex", "set pagination off",
            "-ex", f"set exec-wrapper {exec_wrapper}",
            "-ex", "run",
            "-ex", "bt",
            "-ex", "p $_siginfo._sifields._sigfault.si_addr",
            "--args", *argv,
        ]  # fmt: skip

    return wrap


def gdb_crash(srv: Server) -> tuple[list[str], int]:
    """Frames (function names, innermost first) and si_addr from gdb's output."""
    srv.wait(timeout=60)
    out = srv.stderr()
    assert "received signal SIGSEGV" in out, out
    frames = re.findall(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(\w+) \(", out, re.M)
    m = re.search(r"^\$1 = \(void \*\) (0x[0-9a-f]+)", out, re.M)
    assert frames and m, out
    return frames, int(m.group(1), 16)


def inferior_pid(srv: Server, name: str) -> int:
    def find() -> int | None:
        for p in psutil.Process(srv.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.name() == name:
                    return p.pid
        return None

    return wait_until(find, what=f"{name} under gdb")


def test_estats_crash_signature(binaries, tmp_path):
    gdb = gdb_or_skip()
    limit = estats_as_limit(binaries, tmp_path)
    argv = [str(binaries["estats"]), "--estats", "on", "--service-ms", "60000", *ESTATS_AS_ARGS]
    with server(argv, tmp_path, wrap=gdb_wrap(gdb, f"prlimit --as={limit}")) as srv:
        pid = inferior_pid(srv, "estats-server")
        socks = flood_under_limit(srv.port, pid, may_die=True)
        try:
            frames, addr = gdb_crash(srv)
        finally:
            for s in socks:
                s.close()
    assert frames[:4] == ["estats_update", "handle_request", "serve_loop", "main"], frames
    assert 0x40 <= addr < 0x200, hex(addr)  # NULL + offset of a counter (hits is at 0x40)


# ------------------------------------------------------------------------------- twq


LOCKFAIL_C = r"""
/* pthread_mutex_lock called from the executable fails with EDEADLK, without
 * locking, on LOCKFAIL_PPM of a million calls (default 1%); other callers
 * (libc, ...) are untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

static int (*real_lock)(pthread_mutex_t *);
static uintptr_t exe_lo, exe_hi;
static uint64_t ppm = 10000;
static _Atomic uint64_t calls;

static int first_object(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size; (void)data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_X)) {
            uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
            if (exe_hi == 0 || lo < exe_lo) exe_lo = lo;
            if (hi > exe_hi) exe_hi = hi;
        }
    }
    return 1; /* the first object is the executable */
}

__attribute__((constructor)) static void init(void)
{
    real_lock = (int (*)(pthread_mutex_t *))dlsym(RTLD_NEXT, "pthread_mutex_lock");
    const char *e = getenv("LOCKFAIL_PPM");
    if (e) ppm = strtoull(e, NULL, 10);
    dl_iterate_phdr(first_object, NULL);
}

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

int pthread_mutex_lock(pthread_mutex_t *m)
{
    uintptr_t ra = (uintptr_t)__builtin_return_address(0);
    if (ra >= exe_lo && ra < exe_hi) {
        uint64_t n = atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
        if (mix(n) % 1000000 < ppm)
            return EDEADLK;
    }
    if (!real_lock)
        real_lock = (int (*)(pthread_mutex_t *))dlsym(RTLD_NEXT, "pthread_mutex_lock");
    return real_lock(m);
}
"""


@pytest.fixture(scope="session")
def lockfail(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lockfail")
    (d / "lockfail.c").write_text(LOCKFAIL_C)
    so = d / "liblockfail.so"
    r = subprocess.run(
        ["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-o", str(so), str(d / "lockfail.c"), "-ldl"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return so


def twq_load(port: int, conns: int = 8, per_conn: int = 20000, nkeys: int = 50) -> None:
    batches = [requests_for(c, per_conn, nkeys=nkeys) for c in range(conns)]
    replies = exchange(port, [p for p, _ in batches])
    for (_, keys), got in zip(batches, replies):
        assert got == [b"OK " + k for k in keys]


@pytest.mark.parametrize(
    "tw_ms,nkeys",
    [(0, 50), (1, 50), (50, 50), (1000, 5), (0, 60000)],
    ids=["expire-at-once", "tw-1ms", "tw-50ms", "all-reuse-5-keys", "gc-60000-keys"],
)
def test_twq_heavy_key_reuse_never_crashes(binaries, tmp_path, tw_ms, nkeys):
    argv = [str(binaries["twq"]), "--tw-ms", str(tw_ms), "--threads", "4"]
    with server(argv, tmp_path) as srv:
        for _ in range(2):
            twq_load(srv.port, conns=8, per_conn=15000, nkeys=nkeys)
            assert srv.alive(), srv.stderr()
        assert srv.stop() == 0, srv.stderr()
    m = re.search(r"(\d+) entries, (\d+) in TIME_WAIT", srv.stderr())
    assert m, srv.stderr()
    entries, in_tw = int(m.group(1)), int(m.group(2))
    if nkeys > 16384:  # expired entries are freed above GC_THRESH (16384)
        assert entries - in_tw <= 16384, (entries, in_tw)
    else:
        assert entries == nkeys


def load_until_death(srv: Server, rounds: int = 40) -> None:
    """Rounds of reuse-heavy load until the server dies (bounded)."""
    for _ in range(rounds):
        if not srv.alive():
            return
        try:
            twq_load(srv.port, conns=8, per_conn=5000, nkeys=50)
        except (OSError, AssertionError):
            return  # connection refused/reset, or replies cut short: it died


def test_twq_segfaults_under_lock_errors_and_key_reuse(binaries, tmp_path, lockfail):
    env = {**os.environ, "LD_PRELOAD": str(lockfail), "LOCKFAIL_PPM": "10000"}
    with server([str(binaries["twq"])], tmp_path, env=env) as srv:
        load_until_death(srv)
        rc = srv.wait(timeout=60)
        assert rc == -signal.SIGSEGV, (rc, srv.stderr())


@pytest.mark.slow
def test_twq_survives_lock_errors_when_the_destructor_handles_them(binaries, tmp_path, lockfail):
    """The same lock errors, with conn_destroy() retrying its lock like every
    other lock site does: no crash.  So the early return is the whole bug."""
    src = (TARGETS / "twq" / "twq.c").read_text()
    bug = "    if (pthread_mutex_lock(&c->mu) != 0)\n        return; /* BUG: leaves the entry queued but still T_OPEN */\n"
    assert src.count(bug) == 1
    (tmp_path / "twq-fixed.c").write_text(src.replace(bug, '    lock_retry(&c->mu, "entry");\n'))
    exe = tmp_path / "twq-fixed"
    cflags = ["-std=gnu11", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-pthread"]
    r = subprocess.run(["cc", *cflags, "-o", str(exe), str(tmp_path / "twq-fixed.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "LD_PRELOAD": str(lockfail), "LOCKFAIL_PPM": "50000"}  # 5%
    with server([str(exe)], tmp_path, env=env) as srv:
        for _ in range(5):
            twq_load(srv.port, conns=8, per_conn=5000, nkeys=50)
        assert srv.alive(), srv.stderr()
        assert srv.stop() == 0, srv.stderr()


@pytest.mark.slow
def test_twq_crash_signature(binaries, tmp_path, lockfail):
    gdb = gdb_or_skip()
    wrap = gdb_wrap(gdb, f"env LD_PRELOAD={lockfail} LOCKFAIL_PPM=10000")
    with server([str(binaries["twq"])], tmp_path, wrap=wrap) as srv:
        inferior_pid(srv, "twq-server")
        load_until_death_under_gdb(srv)
        frames, addr = gdb_crash(srv)
    assert frames[0] == "tw_remove", frames
    assert frames[1] in ("tw_reap", "conn_reuse"), frames
    assert 0xDEAD0000100 <= addr < 0xDEAD0000140, hex(addr)  # the list poison


def load_until_death_under_gdb(srv: Server, rounds: int = 40) -> None:
    """Under gdb the process stays (stopped) after the crash: stop when the
    crash shows in gdb's output or the load stops being answered."""
    for _ in range(rounds):
        if "received signal" in srv.stderr() or not srv.alive():
            return
        try:
            twq_load(srv.port, conns=8, per_conn=5000, nkeys=50)
        except (OSError, AssertionError):
            pass
    wait_until(lambda: "received signal" in srv.stderr(), timeout=30, what="the crash")
