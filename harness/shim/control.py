"""The fault shim's control file: arm, change and disarm faults in a running target, read counters.

One file per host. The harness creates it, passes its path in ``HARNESS_SHIM_CONTROL`` and starts the
target with the shim first in ``LD_PRELOAD``; the shim maps the file MAP_SHARED in its constructor and
reads it on every interposed call. Every process started with that environment (forked children,
exec'd programs) attaches to the same file, so per-function calls and per-slot counters are host
totals, and an ``nth``/``after`` ordinal counts eligible calls across all of them. Heap bytes are per
process (see ``ShimCounters.processes``).

Layout (little-endian, fixed offsets, 4096 bytes; mirrored by ``struct control`` in shim.c)::

    0     header   magic "HRNSHIM1" u64, version u32, size u32, seed u64,
                   armed u32 (bit i = slot i is live) and generation u32 (bumped on every change),
                   which the shim reads together as one 64-bit word (0 = never armed: the fast path),
                   host_index u32, attached u32 (processes that mapped the file), last_pid u32,
                   nslots u32, nfuncs u32
    64    slots    8 x 128: gen u32 (even = stable, odd = being written), kind u32, mode u32,
                   functions u32 (bit mask, FUNCTIONS order), param u64 (random: 64-bit threshold,
                   nth: n, after: N, budget: bytes), min_size u64, max_size u64, times i64, errno i32,
                   callers u32 (1 any, 2 exe, 4 named), names 3 x char[24]
    1088  slot counters  8 x 64: eligible u64, injected u64, matched u32 (caller address ranges), pad u32,
                   first_ns u64, last_ns u64 (CLOCK_MONOTONIC of the first and latest injection, 0 = none)
    1600  calls    32 x u64, per function (FUNCTIONS order)
    1856  processes 8 x 128: pid u32, flags u32, live i64, peak i64, reserved u64,
                   malloc_from char[48] (module of the next malloc), bound_from char[48]

Write ordering (the harness is the only writer of the header's config fields and the slots; the shim
only adds to counters): ``arm`` clears the slot's armed bit, makes ``gen`` odd, writes the fields and
zeroes the slot's counters, makes ``gen`` even again, bumps ``generation`` and finally sets the armed
bit. Each field is written with one aligned store (ctypes copies 4/8-byte fields with a single move)
and x86-64 keeps stores in program order. Each shim thread keeps private copies of the armed slots,
taken when it sees the (armed, generation) word change: it copies a slot between two reads of
``gen`` and uses the copy only if both are equal and even (a seqlock), so it never acts on a
half-written slot, and any step above changes the word, so it never keeps using a stale copy.
Weakly ordered CPUs (aarch64) would need a store fence between the steps, which CPython cannot emit.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

ENV_VAR = "HARNESS_SHIM_CONTROL"
MAGIC = int.from_bytes(b"HRNSHIM1", "little")
VERSION = 1
SIZE = 4096
NSLOTS = 8

# Order is the format: bit i of a slot's function mask, index i of the calls counters.
FUNCTIONS: tuple[str, ...] = (
    "malloc", "calloc", "realloc", "reallocarray", "posix_memalign", "aligned_alloc", "memalign",
    "valloc", "operator new", "operator new[]", "operator new nothrow", "operator new[] nothrow",
    "free", "operator delete",
    "pthread_mutex_lock", "pthread_mutex_trylock", "pthread_mutex_timedlock",
    "pthread_rwlock_rdlock", "pthread_rwlock_wrlock", "pthread_rwlock_tryrdlock",
    "pthread_rwlock_trywrlock",
)
ALLOC_FUNCTIONS = frozenset(FUNCTIONS[:12])      # can be failed by an alloc slot
LOCK_FUNCTIONS = frozenset(FUNCTIONS[14:])       # can be failed by a lock slot
ALIASES = {  # mangled C++ names are accepted too
    "_Znwm": "operator new", "_Znam": "operator new[]",
    "_ZnwmRKSt9nothrow_t": "operator new nothrow", "_ZnamRKSt9nothrow_t": "operator new[] nothrow",
}
LOCK_ERRNOS = frozenset({_errno.EDEADLK, _errno.EAGAIN, _errno.EBUSY, _errno.EINVAL,
                         _errno.EOWNERDEAD, _errno.ETIMEDOUT})

_KINDS = {"alloc": 1, "lock": 2}
_MODES = {"random": 1, "nth": 2, "after": 3, "budget": 4}
_C_ANY, _C_EXE, _C_NAMED = 1, 2, 4
_P_ATTACHED, _P_SHIM_FIRST, _P_LIVE_TRACKED, _P_CXX, _P_EXITED = 1, 2, 4, 8, 16
_U64 = (1 << 64) - 1
_NAME_MAX = 23


@dataclass(frozen=True)
class FaultSlot:
    """One fault: which calls it applies to (kind, functions, sizes, callers) and when it fires (mode).

    Checks, in order: slot armed, kind and function match, min_size <= size <= max_size (alloc),
    caller filter; a call passing them is *eligible* and counted. Then: ``times`` failures already
    injected -> no; else the mode decides: ``random`` fails with ``probability`` (per-thread PRNG
    seeded from the file's seed, host index and thread ordinal); ``nth`` fails eligible calls n, 2n,
    3n, ...; ``after`` fails every eligible call after the first N; ``budget`` (alloc only) fails when
    the process's live heap bytes (usable sizes) plus the requested size would exceed ``budget``.
    A failed allocation returns NULL with errno ENOMEM (posix_memalign returns ENOMEM; throwing
    operator new throws std::bad_alloc); a failed lock returns ``errno`` without taking the lock.
    ``callers``: () = default (alloc: any caller, lock: the main executable only, so allocator and
    libc internals are spared); ("any",); ("exe",); module path substrings such as ("libfoo.so",),
    optionally with "exe" (at most 3 names of <= 23 bytes).
    """

    kind: Literal["alloc", "lock"]
    mode: Literal["random", "nth", "after", "budget"]
    functions: frozenset[str] = frozenset()   # empty = all of the kind, else names like "malloc", "pthread_mutex_lock"
    probability: float = 0.0                   # random
    nth: int = 0                               # nth
    after: int = 0                             # after
    budget: int = 0                            # bytes, budget
    min_size: int = 0
    max_size: int = 0                          # 0 = unbounded
    errno: int = _errno.EDEADLK                # lock
    times: int = -1
    callers: tuple[str, ...] = ()              # () = default (alloc: any, lock: exe); ("exe",) ; ("any",); or module name substrings


@dataclass(frozen=True)
class SlotCounters:
    eligible: int         # calls that passed the slot's filters since it was last armed
    injected: int         # failures it injected since it was last armed
    matched_ranges: int   # caller-filter address ranges found at the last refresh (0 = filter matches nothing)
    first_ns: int = 0     # time.monotonic_ns() clock of the first injection since armed (0 = none yet)
    last_ns: int = 0      # ... and of the latest one


@dataclass(frozen=True)
class ProcessCounters:
    pid: int
    live_bytes: int       # heap bytes live in this process (usable sizes), as of its last flush
    peak_bytes: int
    shim_first: bool      # malloc is bound to the shim (false: something earlier in LD_PRELOAD wins)
    live_tracked: bool    # the next allocator has malloc_usable_size
    cxx: bool             # a C++ runtime was found (operator new interposed)
    exited: bool          # the process ran its exit handlers
    alive: bool           # a process with this pid exists now (not a zombie), as seen from here
    malloc_from: str      # module the shim's "next malloc" resolved to (libc, jemalloc, ...)
    bound_from: str       # module the process's malloc symbol is bound to (the shim, when first)


@dataclass(frozen=True)
class ShimCounters:
    """A snapshot of the counters. The shim publishes them from per-thread buffers every 256 calls
    per thread, every 64 KiB of heap change, on every injection, and at thread and process exit, so
    a running process may be that far behind; injected counts are always current."""

    calls: Mapping[str, int]
    slots: tuple[SlotCounters, ...]
    live_bytes: int       # sum over attached processes still alive (see processes for the dead ones)
    peak_bytes: int       # max over all attached processes, dead or alive
    loaded: bool          # at least one process attached the shim to this file
    attached: int         # number of process attachments (exec and fork each count)
    generation: int
    processes: tuple[ProcessCounters, ...]

    @property
    def injected(self) -> int:
        return sum(s.injected for s in self.slots)


class _Header(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint64), ("version", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("seed", ctypes.c_uint64), ("armed", ctypes.c_uint32), ("generation", ctypes.c_uint32),
                ("host_index", ctypes.c_uint32), ("attached", ctypes.c_uint32),
                ("last_pid", ctypes.c_uint32), ("nslots", ctypes.c_uint32), ("nfuncs", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32 * 3)]


class _Slot(ctypes.Structure):
    _fields_ = [("gen", ctypes.c_uint32), ("kind", ctypes.c_uint32), ("mode", ctypes.c_uint32),
                ("functions", ctypes.c_uint32), ("param", ctypes.c_uint64), ("min_size", ctypes.c_uint64),
                ("max_size", ctypes.c_uint64), ("times", ctypes.c_int64), ("err", ctypes.c_int32),
                ("callers", ctypes.c_uint32), ("names", (ctypes.c_char * 24) * 3)]


class _SlotCounters(ctypes.Structure):
    _fields_ = [("eligible", ctypes.c_uint64), ("injected", ctypes.c_uint64), ("matched", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("first_ns", ctypes.c_uint64), ("last_ns", ctypes.c_uint64),
                ("reserved", ctypes.c_uint32 * 6)]


class _Proc(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("live", ctypes.c_int64),
                ("peak", ctypes.c_int64), ("reserved", ctypes.c_uint64),
                ("malloc_from", ctypes.c_char * 48), ("bound_from", ctypes.c_char * 48)]


class _Control(ctypes.Structure):
    _fields_ = [("h", _Header), ("slot", _Slot * NSLOTS), ("sc", _SlotCounters * NSLOTS),
                ("calls", ctypes.c_uint64 * 32), ("proc", _Proc * 8),
                ("pad", ctypes.c_char * (SIZE - 2880))]


assert ctypes.sizeof(_SlotCounters) == 64 and _SlotCounters.first_ns.offset == 24
assert ctypes.sizeof(_Control) == SIZE and _Control.sc.offset == 1088 and _Header.armed.offset == 24
assert _Control.calls.offset == 1600 and _Control.proc.offset == 1856


@dataclass(frozen=True)
class _Encoded:
    kind: int
    mode: int
    functions: int
    param: int
    min_size: int
    max_size: int
    times: int
    err: int
    callers: int
    names: tuple[bytes, ...]


def _function_mask(kind: str, functions: frozenset[str]) -> int:
    allowed = ALLOC_FUNCTIONS if kind == "alloc" else LOCK_FUNCTIONS
    names = {ALIASES.get(f, f) for f in functions} or set(allowed)
    bad = sorted(f for f in names if f not in allowed)
    if bad:
        raise ValueError(f"{kind} fault cannot apply to {', '.join(bad)} (choose from {', '.join(sorted(allowed))})")
    return sum(1 << FUNCTIONS.index(f) for f in names)


def _callers(kind: str, callers: tuple[str, ...]) -> tuple[int, tuple[bytes, ...]]:
    if isinstance(callers, str):
        raise ValueError("callers must be a tuple of strings, e.g. ('exe',)")
    if not callers:
        return (_C_ANY if kind == "alloc" else _C_EXE), ()
    if "any" in callers:
        if len(callers) > 1:
            raise ValueError("callers: 'any' cannot be combined with other entries")
        return _C_ANY, ()
    flags, names = 0, []
    for c in callers:
        if c == "exe":
            flags |= _C_EXE
            continue
        raw = c.encode("ascii", "strict") if c.isascii() else b""
        if not raw or len(raw) > _NAME_MAX or b"\0" in raw:
            raise ValueError(f"callers: module name {c!r} must be 1..{_NAME_MAX} ASCII bytes")
        names.append(raw)
    if len(names) > 3:
        raise ValueError("callers: at most 3 module names")
    if names:
        flags |= _C_NAMED
    return flags, tuple(names)


def _encode(f: FaultSlot) -> _Encoded:
    if f.kind not in _KINDS:
        raise ValueError(f"kind must be 'alloc' or 'lock', not {f.kind!r}")
    if f.mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {f.mode!r}")
    if f.kind == "lock" and f.mode == "budget":
        raise ValueError("budget mode applies to alloc faults only")
    if f.mode == "random":
        if not 0.0 <= f.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], not {f.probability}")
        param = min(int(f.probability * 2.0**64), _U64)
    elif f.mode == "nth":
        if f.nth < 1:
            raise ValueError(f"nth must be >= 1, not {f.nth}")
        param = f.nth
    elif f.mode == "after":
        if f.after < 0:
            raise ValueError(f"after must be >= 0, not {f.after}")
        param = f.after
    else:
        if f.budget < 0:
            raise ValueError(f"budget must be >= 0 bytes, not {f.budget}")
        param = f.budget
    if param > _U64 or (f.mode == "budget" and param >= 1 << 63):
        raise ValueError("parameter too large")
    if f.min_size < 0 or f.max_size < 0 or (f.max_size and f.min_size > f.max_size):
        raise ValueError(f"size range [{f.min_size}, {f.max_size}] is not valid (0 = unbounded max)")
    if f.kind == "lock" and (f.min_size or f.max_size):
        raise ValueError("min_size/max_size apply to alloc faults only")
    if f.kind == "lock" and f.errno not in LOCK_ERRNOS:
        names = ", ".join(sorted(_errno.errorcode[e] for e in LOCK_ERRNOS))
        raise ValueError(f"lock errno {f.errno} is not one of {names}")
    if f.times < -1:
        raise ValueError(f"times must be -1 (unlimited) or >= 0, not {f.times}")
    callers, names = _callers(f.kind, f.callers)
    return _Encoded(kind=_KINDS[f.kind], mode=_MODES[f.mode], functions=_function_mask(f.kind, f.functions),
                    param=param, min_size=f.min_size, max_size=f.max_size or _U64, times=f.times,
                    err=f.errno if f.kind == "lock" else _errno.ENOMEM, callers=callers, names=names)


def _alive(pid: int) -> bool:
    """Whether pid is a running (not zombie) process; a crashed target's entry keeps its last values."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"x")


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class ControlFile:
    """A mapped control file. Methods are safe to call from several Python threads."""

    def __init__(self, path: Path, fileobj: BinaryIO, mm: mmap.mmap) -> None:  # use create() or open()
        self.path = path
        self._file = fileobj
        self._mm = mm
        self._c: _Control | None = _Control.from_buffer(mm)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: Path, *, seed: int, host_index: int) -> "ControlFile":
        """Create (or replace) the file with nothing armed. ``seed`` is taken modulo 2**64."""
        if not 0 <= host_index < 1 << 32:
            raise ValueError(f"host_index must fit in 32 bits, not {host_index}")
        path = Path(path)
        image = _Control()
        image.h.magic, image.h.version, image.h.size = MAGIC, VERSION, SIZE
        image.h.seed, image.h.host_index = seed & _U64, host_index
        image.h.nslots, image.h.nfuncs = NSLOTS, len(FUNCTIONS)
        # Complete before any shim can see the name; made through the folder's descriptor, 0600, never
        # through a symlink (a rename replaces one planted at the name, it does not write through it).
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            tmp = f".{path.name}.{os.getpid()}.tmp"
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            try:
                os.write(fd, bytes(image))
            finally:
                os.close(fd)
            os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> "ControlFile":
        """Map an existing control file (e.g. to read the counters of a finished run)."""
        path = Path(path)
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), "r+b")
        try:
            mm = mmap.mmap(f.fileno(), SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as e:
            f.close()
            raise ValueError(f"{path}: not a shim control file ({e})") from None
        self = cls(path, f, mm)
        if self._ctl.h.magic != MAGIC or self._ctl.h.version != VERSION:
            self.close()
            raise ValueError(f"{path}: not a shim control file of version {VERSION}")
        return self

    @property
    def _ctl(self) -> _Control:
        if self._c is None:
            raise ValueError("control file is closed")
        return self._c

    def environ(self) -> dict[str, str]:
        """The environment variable that points the shim at this file."""
        return {ENV_VAR: str(self.path)}

    @property
    def seed(self) -> int:
        return int(self._ctl.h.seed)

    @property
    def host_index(self) -> int:
        return int(self._ctl.h.host_index)

    def arm(self, slot_index: int, fault: FaultSlot) -> None:
        """Put ``fault`` in slot ``slot_index`` (replacing what was there) and zero its counters."""
        self._check_index(slot_index)
        enc = _encode(fault)   # validate before touching the file
        bit = 1 << slot_index
        with self._lock:
            c = self._ctl
            h, s, sc = c.h, c.slot[slot_index], c.sc[slot_index]
            h.armed = h.armed & ~bit                     # 1. unpublish
            gen = s.gen & ~1
            s.gen = (gen + 1) & 0xFFFFFFFF               # 2. odd: a reader copying now discards its copy
            s.kind, s.mode, s.functions = enc.kind, enc.mode, enc.functions
            s.param, s.min_size, s.max_size = enc.param, enc.min_size, enc.max_size
            s.times, s.err, s.callers = enc.times, enc.err, enc.callers
            for k in range(3):
                s.names[k].raw = (enc.names[k] if k < len(enc.names) else b"").ljust(24, b"\0")
            sc.eligible, sc.injected, sc.matched, sc.first_ns, sc.last_ns = 0, 0, 0, 0, 0
            s.gen = (gen + 2) & 0xFFFFFFFF               # 3. even: the new configuration's identity
            h.generation = (h.generation + 1) & 0xFFFFFFFF
            h.armed = h.armed | bit                      # 4. publish

    def disarm(self, slot_index: int) -> None:
        """Stop slot ``slot_index`` from injecting; its counters stay readable."""
        self._check_index(slot_index)
        with self._lock:
            h = self._ctl.h
            h.armed = h.armed & ~(1 << slot_index)
            h.generation = (h.generation + 1) & 0xFFFFFFFF

    def disarm_all(self) -> None:
        with self._lock:
            h = self._ctl.h
            h.armed = 0
            h.generation = (h.generation + 1) & 0xFFFFFFFF

    def armed(self) -> dict[int, FaultSlot]:
        """The faults currently armed, decoded back from the file."""
        mask = self._ctl.h.armed
        out: dict[int, FaultSlot] = {}
        for i in range(NSLOTS):
            fault = self.slot(i) if mask >> i & 1 else None
            if fault is not None:
                out[i] = fault
        return out

    def slot(self, i: int) -> FaultSlot | None:
        """What slot i holds (armed or not: a disarmed slot keeps its last fault), decoded back from the
        file; None if it never held one."""
        self._check_index(i)
        inv_kind = {v: k for k, v in _KINDS.items()}
        inv_mode = {v: k for k, v in _MODES.items()}
        s = self._ctl.slot[i]
        kind, mode = inv_kind.get(s.kind), inv_mode.get(s.mode)
        if kind is None or mode is None:
            return None
        callers: list[str] = []
        if s.callers & _C_ANY:
            callers.append("any")
        if s.callers & _C_EXE:
            callers.append("exe")
        callers += [_text(bytes(s.names[k])) for k in range(3) if s.names[k].value]
        return FaultSlot(
            kind=kind, mode=mode,  # type: ignore[arg-type]
            functions=frozenset(f for j, f in enumerate(FUNCTIONS) if s.functions >> j & 1),
            probability=s.param / 2.0**64 if mode == "random" else 0.0,
            nth=s.param if mode == "nth" else 0, after=s.param if mode == "after" else 0,
            budget=s.param if mode == "budget" else 0, min_size=s.min_size,
            max_size=0 if s.max_size == _U64 else s.max_size,
            errno=s.err if kind == "lock" else _errno.EDEADLK, times=s.times, callers=tuple(callers))

    def counters(self) -> ShimCounters:
        c = self._ctl
        procs = []
        for p in c.proc:
            if p.pid and p.flags & _P_ATTACHED:
                procs.append(ProcessCounters(
                    pid=p.pid, live_bytes=p.live, peak_bytes=p.peak, shim_first=bool(p.flags & _P_SHIM_FIRST),
                    live_tracked=bool(p.flags & _P_LIVE_TRACKED), cxx=bool(p.flags & _P_CXX),
                    exited=bool(p.flags & _P_EXITED), alive=_alive(p.pid), malloc_from=_text(bytes(p.malloc_from)),
                    bound_from=_text(bytes(p.bound_from))))
        return ShimCounters(
            calls={f: int(c.calls[i]) for i, f in enumerate(FUNCTIONS)},
            slots=tuple(SlotCounters(int(s.eligible), int(s.injected), int(s.matched), int(s.first_ns), int(s.last_ns))
                        for s in c.sc),
            live_bytes=sum(p.live_bytes for p in procs if p.alive and not p.exited),
            peak_bytes=max((p.peak_bytes for p in procs), default=0),
            loaded=c.h.attached > 0, attached=int(c.h.attached), generation=int(c.h.generation),
            processes=tuple(procs))

    def close(self) -> None:
        with self._lock:
            if self._c is None:
                return
            self._c = None     # release the ctypes view before closing the map
            self._mm.close()
            self._file.close()

    def __enter__(self) -> "ControlFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check_index(i: int) -> None:
        if not 0 <= i < NSLOTS:
            raise IndexError(f"slot index must be 0..{NSLOTS - 1}, not {i}")
