"""targets/arena: the stale-recent-slot use-after-free, with real processes on 127.0.0.1.

The workload is fixed (20,000 pipelined GETs over 200 keys, drawn from a seeded RNG, on one
connection), and the server is single-threaded, so what it does is decided by request order alone,
never by timing. A Python model of the cache (LRU + direct-mapped recent slots + a LIFO free list,
which is what glibc's tcache, jemalloc and tcmalloc do with one size class) predicts the server's
counters exactly, how many requests read a freed item, and the first one that does.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.collect.triage import triage_core

from conftest import make_targets

REPO = Path(__file__).resolve().parents[2]
EXE = REPO / "targets" / "arena" / "arena-server"
HOST = "127.0.0.1"
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
JEMALLOC = LIBDIR / "libjemalloc.so.2"
# Environment variables that would change the allocator under test.
ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_PERTURB_", "MALLOC_CHECK_", "MALLOC_CONF", "GLIBC_TUNABLES",
                 "MIMALLOC_OPTIONS", "TCMALLOC_RELEASE_RATE")
PERTURB = {"MALLOC_PERTURB_": "165", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
JUNK = {"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "junk:true"}

N_REQUESTS = 20_000
KEY_SPACE = 200
BATCH = 200
SEED = 1
M64 = (1 << 64) - 1


# --------------------------------------------------------------------------- model


def fnv1a(key: str) -> int:
    h = 0xCBF29CE484222325
    for b in key.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def value_of(key: str) -> str:
    z = (fnv1a(key) + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return f"v{z ^ (z >> 31):016x}"


@dataclass
class Model:
    recent: int = 0  # fast-path hits (cache_touch)
    hits: int = 0  # hash-table hits
    misses: int = 0
    evictions: int = 0
    stale_reads: int = 0  # requests whose cache_touch read a freed item
    first_stale: int | None = None  # index of the first such request


def simulate(keys: list[str], max_items: int = 64, slots: int = 64) -> Model:
    """arena.c's cache over a LIFO allocator: a freed item's chunk goes to the next miss."""
    m = Model()
    holds: dict[int, str] = {}  # chunk -> the key last written into it
    free: list[int] = []  # LIFO
    live: OrderedDict[str, int] = OrderedDict()  # key -> chunk, least recently used first
    recent: dict[int, tuple[int, int]] = {}  # slot -> (hash, chunk)
    for i, key in enumerate(keys):
        h = fnv1a(key)
        slot = recent.get(h % slots)
        if slot and slot[0] == h:
            chunk = slot[1]
            if chunk in free:
                m.stale_reads += 1
                if m.first_stale is None:
                    m.first_stale = i
            if holds[chunk] == key:  # STREQ(it->key, key): freed or not
                m.recent += 1
                continue
        if key in live:
            m.hits += 1
            live.move_to_end(key)
            recent[h % slots] = (h, live[key])
            continue
        m.misses += 1
        chunk = free.pop() if free else len(holds)
        holds[chunk] = key
        live[key] = chunk
        recent[h % slots] = (h, chunk)
        while len(live) > max_items:
            _, victim = live.popitem(last=False)
            free.append(victim)
            m.evictions += 1
    return m


def workload(seed: int = SEED, n: int = N_REQUESTS, space: int = KEY_SPACE) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"k{rng.randrange(space)}" for _ in range(n)]


# --------------------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def exe() -> Path:
    built = make_targets(EXE.parent)
    assert built.returncode == 0, built.stdout + built.stderr
    return EXE


class Server:
    def __init__(self, exe: Path, cwd: Path, env_extra: dict[str, str] | None = None, cores: bool = False,
                 args: tuple[str, ...] = ()):
        env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
        env.update(env_extra or {})
        limit = 256 << 20 if cores else 0

        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_CORE, (limit, limit))

        self.proc = subprocess.Popen([str(exe), "--port", "0", *args], cwd=cwd, env=env, preexec_fn=preexec,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self.proc.stderr.readline().decode()
        match = re.search(r"listening on 127\.0\.0\.1 port (\d+) \(cache-items (\d+)\)", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"no listening line: {line!r}")
        self.port = int(match.group(1))

    def connect(self) -> socket.socket:
        s = socket.create_connection((HOST, self.port), timeout=30)
        s.settimeout(30)
        return s

    def stop(self) -> tuple[int, str]:
        """SIGTERM if still running; (exit status, rest of stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        return rc, self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc.stderr.close()


def exchange(sock: socket.socket, requests: list[bytes], batch: int = BATCH) -> list[bytes]:
    """Send in pipelined batches, read each batch's replies; stop at EOF or reset (the server died)."""
    replies: list[bytes] = []
    buf = b""
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        try:
            sock.sendall(b"".join(chunk))
            want = len(replies) + len(chunk)
            while len(replies) < want:
                data = sock.recv(65536)
                if not data:
                    return replies
                buf += data
                *lines, buf = buf.split(b"\n")
                replies += lines
        except (ConnectionResetError, BrokenPipeError):
            return replies
    return replies


def gets(keys: list[str]) -> list[bytes]:
    return [f"GET {k}\n".encode() for k in keys]


def summary(stderr: str) -> dict[str, int]:
    m = re.search(r"(\d+) requests: (\d+) recent, (\d+) hits, (\d+) misses, (\d+) evictions, (\d+) bad", stderr)
    assert m, stderr
    return dict(zip(("requests", "recent", "hits", "misses", "evictions", "bad"), map(int, m.groups())))


# --------------------------------------------------------------------------- tests


def test_flags(exe: Path, tmp_path: Path) -> None:
    for args in ([], ["--port", "0", "--cache-items", "0"], ["--port", "0", "--cache-items", "x"],
                 ["--port", "70000"], ["--port", "0", "extra"]):
        r = subprocess.run([str(exe), *args], cwd=tmp_path, capture_output=True, timeout=30)
        assert r.returncode == 2, (args, r.stderr)
        assert b"usage" in r.stderr or b"bad" in r.stderr
    r = subprocess.run([str(exe), "--help"], capture_output=True, timeout=30)
    assert r.returncode == 0 and b"--cache-items" in r.stdout


def test_pipelined_replies(exe: Path, tmp_path: Path) -> None:
    server = Server(exe, tmp_path, args=("--cache-items", "8"))
    try:
        keys = [f"k{i % 13}" for i in range(300)] + ["x" * 250, "a b", "ключ"]
        odd = [b"GET k1\r\n", b"PUT k1\n", b"GET \n", b"GET " + b"y" * 251 + b"\n", b"\n", b"GET a\0b\n"]
        a, b = server.connect(), server.connect()
        # Interleave two pipelined connections; each gets its own replies, in order.
        ra = exchange(a, gets(keys) + odd, batch=len(keys) + len(odd))
        rb = exchange(b, gets(keys[::-1]), batch=len(keys))
        assert ra[:len(keys)] == [f"OK {k} {value_of(k)}".encode() for k in keys]
        assert ra[len(keys):] == [f"OK k1 {value_of('k1')}".encode()] + [b"ERR bad request"] * 5
        assert rb == [f"OK {k} {value_of(k)}".encode() for k in keys[::-1]]
        # A request split across writes.
        for piece in (b"GE", b"T k5\nGET k", b"6", b"\n"):
            a.sendall(piece)
        got = b""
        while got.count(b"\n") < 2:
            data = a.recv(4096)
            assert data, "connection closed"
            got += data
        assert got == f"OK k5 {value_of('k5')}\nOK k6 {value_of('k6')}\n".encode()
        a.close()
        b.close()
        rc, err = server.stop()
        assert rc == 0, err
        s = summary(err)
        assert s["bad"] == 5 and s["recent"] + s["hits"] + s["misses"] + s["bad"] == s["requests"]
    finally:
        server.kill()


def test_model_predicts_a_stale_read() -> None:
    m = simulate(workload())
    assert m.stale_reads >= 20 and m.first_stale is not None and m.first_stale < 2000
    # A big key space rarely brings an evicted key back in time.
    assert simulate(workload(space=100_000)).stale_reads <= 3


LIFO_ALLOCATORS = {
    "glibc": {},
    "glibc-perturb-tcache-on": {"MALLOC_PERTURB_": "165"},  # tcache chunks are not perturbed
    "jemalloc": {"LD_PRELOAD": str(JEMALLOC)},
    "tcmalloc": {"LD_PRELOAD": str(LIBDIR / "libtcmalloc_minimal.so.4")},
}


def run_survivor(exe: Path, cwd: Path, env: dict[str, str], keys: list[str]) -> dict[str, int]:
    if "LD_PRELOAD" in env and not Path(env["LD_PRELOAD"]).exists():
        pytest.skip(f"{env['LD_PRELOAD']} not installed (scripts/setup.sh)")
    server = Server(exe, cwd, env)
    try:
        sock = server.connect()
        replies = exchange(sock, gets(keys))
        sock.close()
        assert server.proc.poll() is None, f"arena-server died (status {server.proc.returncode})"
        assert replies == [f"OK {k} {value_of(k)}".encode() for k in keys]  # every reply right, stale or not
        rc, err = server.stop()
        assert rc == 0, err
        return summary(err)
    finally:
        server.kill()


@pytest.mark.parametrize("name", list(LIFO_ALLOCATORS))
def test_lifo_allocators_survive_the_stale_reads(exe: Path, tmp_path: Path, name: str) -> None:
    keys = workload()
    model = simulate(keys)
    got = run_survivor(exe, tmp_path, LIFO_ALLOCATORS[name], keys)
    # The counters match the LIFO model, so the model's stale reads really happened: silently.
    assert (got["recent"], got["hits"], got["misses"], got["evictions"]) == \
        (model.recent, model.hits, model.misses, model.evictions)
    assert model.stale_reads >= 20


def test_mimalloc_survives_and_reuses_later(exe: Path, tmp_path: Path) -> None:
    keys = workload()
    model = simulate(keys)
    got = run_survivor(exe, tmp_path, {"LD_PRELOAD": str(LIBDIR / "libmimalloc.so.2")}, keys)
    # Freed blocks wait on a page-local list, so stale slots find their old item intact more often
    # than with immediate LIFO reuse: more fast-path hits, fewer misses.
    assert got["recent"] > model.recent and got["misses"] < model.misses


def core_in(directory: Path) -> Path | None:
    files = [p for p in directory.iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size) if files else None


@pytest.mark.parametrize("fill,env,poison", [
    ("glibc-perturb", PERTURB, 0xA5A5A5A5A5A5A5A5),
    ("jemalloc-junk", JUNK, 0x5A5A5A5A5A5A5A5A),
], ids=["glibc-perturb", "jemalloc-junk"])
def test_junk_fill_crashes_in_cache_touch(exe: Path, tmp_path: Path, fill: str, env: dict[str, str],
                                          poison: int) -> None:
    if "LD_PRELOAD" in env and not Path(env["LD_PRELOAD"]).exists():
        pytest.skip(f"{env['LD_PRELOAD']} not installed (scripts/setup.sh)")
    keys = workload()
    model = simulate(keys)
    cwd = tmp_path / "host"
    cwd.mkdir()
    server = Server(exe, cwd, env, cores=True)
    try:
        sock = server.connect()
        replies = exchange(sock, gets(keys))
        sock.close()
        rc = server.proc.wait(timeout=30)
        assert rc == -signal.SIGSEGV, f"{fill}: exit status {rc}, {len(replies)} replies"
        # It died at the first read of a freed item: replies stop in that request's batch.
        assert model.first_stale is not None
        assert model.first_stale // BATCH * BATCH <= len(replies) <= model.first_stale
        assert replies == [f"OK {k} {value_of(k)}".encode() for k in keys[:len(replies)]]
    finally:
        server.kill()

    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or pattern.startswith("/"):
        pytest.skip(f"core_pattern {pattern!r} does not write cores into the process's cwd")
    core = core_in(cwd)
    assert core is not None, f"no core file in {cwd} (core_pattern {pattern!r})"
    tri = triage_core(core, exe)
    assert tri.signal_name == "SIGSEGV" and tri.si_code_name == "SI_KERNEL", tri.to_dict()
    assert tri.fault_address == poison and tri.address_source == "instruction", tri.to_dict()
    assert tri.crash_class == "poison-address", tri.to_dict()
    assert tri.signature_frames[0] == "cache_touch" and "handle_line" in tri.signature, tri.signature
    shutil.rmtree(cwd)
