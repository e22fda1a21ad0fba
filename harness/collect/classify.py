"""Crash classification: a pure function over parsed facts (testable without cores) plus a wrapper.

Classes:
  null-deref            fault address < 4096 (page 0), or < 64 KiB ("near-null", CASR's threshold)
  poison-address        allocator junk/poison pattern (0x5a5a…, 0xa5a5…, 0xdeadbeef, 0xdead000000000100 …):
                        likely use-after-free or use of uninitialised heap memory
  wild-address          non-canonical, unmapped, or a permission fault on mapped memory
  stack-overflow        fault address near the stack pointer (or deep recursion when the address is unknown)
  abort                 SIGABRT from abort()/assert() (or raise)
  allocator-corruption  SIGABRT or a fault inside malloc/free/allocator frames (glibc "double free detected…")
  bus-error, illegal-instruction, fpe   SIGBUS, SIGILL, SIGFPE
  unknown               anything else (another signal, a SIGSEGV whose address cannot be known, an external kill)
The order of checks matters: allocator frames first (a poison pointer walked by free() is heap
corruption, not a plain use-after-free), then the stack, then the address ranges.
"""
from __future__ import annotations

import signal as _signal
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .elfcore import PF_R, PF_W, PF_X, Segment
from .frames import Frame, after_trampoline, clean_function, crashed_in_allocator, frame_kind
from .signature import find_cycle
from .x86 import SI_KERNEL, is_canonical

CLASSES = ("null-deref", "poison-address", "wild-address", "abort", "allocator-corruption", "stack-overflow",
           "bus-error", "illegal-instruction", "fpe", "unknown")

NULL_PAGE = 4096
NEAR_NULL = 64 * 1024
STACK_BELOW = 1 << 20  # a big alloca/array can jump this far below sp into the guard gap
STACK_ABOVE = 64 * 1024  # writes to locals above sp in the frame that did not fit
SI_USER = 0
SI_TKILL = -6

# Byte fills used by allocators' debug/junk modes (ANCHORS.md "Poison patterns").
POISON_BYTES: dict[int, str] = {
    0x5A: "jemalloc junk on free (0x5a)",
    0xA5: "jemalloc junk on alloc / glibc MALLOC_PERTURB_=165 on free (0xa5)",
    0xAB: "tcmalloc debug uninitialised (0xab)",
    0xCD: "tcmalloc debug freed / MSVC uninitialised (0xcd)",
    0xDD: "MSVC freed (0xdd)",
    0xFD: "MSVC no-man's-land (0xfd)",
    0xD0: "mimalloc debug uninitialised (0xd0)",
    0xDF: "mimalloc debug freed (0xdf)",
    0x3F: "poison fill 0x3f",
}
POISON_WORDS: dict[int, str] = {
    0xDEADBEEF: "0xdeadbeef (freed, kmem/umem)",
    0xBADDCAFE: "0xbaddcafe (uninitialised, kmem/umem)",
    0xFEEDFACE: "0xfeedface (redzone)",
    0xBAADF00D: "0xbaadf00d (uninitialised, Windows heap)",
    0xFEEEFEEE: "0xfeeefeee (freed, Windows heap)",
    0xCAFEBABE: "0xcafebabe",
}
LIST_POISON_BASE = 0xDEAD000000000000  # Linux POISON_POINTER_DELTA; LIST_POISON1/2 = +0x100/+0x122
POISON_SLACK = 64 * 1024  # field offsets from a poisoned pointer


@dataclass(frozen=True)
class CrashFacts:
    """What classification needs, already parsed; every field may be unknown."""
    signal: int | None
    si_code: int | None = None
    fault_address: int | None = None  # the real one (recomputed for SI_KERNEL #GP faults)
    address_source: str = "none"  # "siginfo" | "instruction" | "none"
    reported_si_addr: int | None = None
    access: str | None = None  # "read" | "write" | "exec"
    pc: int | None = None
    sp: int | None = None
    frames: Sequence[Frame] = ()  # crashing thread, top first
    segments: Sequence[Segment] | None = None  # the core's memory map, sorted; None if unknown
    pid: int | None = None
    sender_pid: int | None = None  # si_pid, for signals sent with kill()/tgkill()
    abort_message: str | None = None


@dataclass(frozen=True)
class Classification:
    crash_class: str
    detail: str
    threshold: int | None = None  # for null-deref: 4096 or 65536
    poison: str | None = None  # which pattern, for poison-address
    in_allocator: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CANONICAL_LIST_POISON_BASE = 0xDEAD0000000


def poison_pattern(addr: int) -> str | None:
    """Name the poison/junk pattern an address comes from, allowing a field offset (±64 KiB)."""
    if 0 <= addr - LIST_POISON_BASE < POISON_SLACK:
        return f"list poison ({LIST_POISON_BASE:#x}+{addr - LIST_POISON_BASE:#x}, LIST_POISON1/2 style)"
    # The same idea kept canonical (so the kernel reports the real address): 0xdead0000100.
    if 0 <= addr - CANONICAL_LIST_POISON_BASE < POISON_SLACK:
        return (f"list poison ({CANONICAL_LIST_POISON_BASE:#x}+{addr - CANONICAL_LIST_POISON_BASE:#x}, "
                f"canonical LIST_POISON style)")
    # A repeated byte in the top six bytes: 0x5a5a5a5a5a5a5a5a plus or minus a field offset.
    mask = (1 << 64) - 1
    for probe in (addr, (addr - POISON_SLACK) & mask, (addr + POISON_SLACK) & mask):
        top = probe >> 16
        b = top & 0xFF
        if b not in (0x00, 0xFF) and top == int.from_bytes(bytes([b]) * 6, "little"):
            return POISON_BYTES.get(b, f"repeated byte 0x{b:02x}")
    # A repeated 32-bit word (0xdeadbeefdeadbeef), or a 32-bit poison word zero-extended.
    hi, lo = addr >> 32, addr & 0xFFFFFFFF
    for word, name in POISON_WORDS.items():
        if (hi == word or hi == 0) and abs(lo - word) < POISON_SLACK:
            return name
    if hi == 0 and lo >= 0x01010101:
        b = lo >> 24
        if b not in (0x00, 0xFF) and (lo >> 16) == (b << 8 | b) and abs(lo - int.from_bytes(bytes([b]) * 4, "little")) < POISON_SLACK:
            return POISON_BYTES.get(b, f"repeated byte 0x{b:02x}") + " (32-bit)"
    return None


def _segment_at(segments: Sequence[Segment], addr: int) -> Segment | None:
    lo, hi = 0, len(segments)
    while lo < hi:
        mid = (lo + hi) // 2
        s = segments[mid]
        if addr < s.start:
            hi = mid
        elif addr >= s.end:
            lo = mid + 1
        else:
            return s
    return None


def _allows(seg: Segment, access: str | None) -> bool:
    need = {"read": PF_R, "write": PF_W, "exec": PF_X}.get(access or "read", PF_R)
    return bool(seg.flags & need)


def _signame(sig: int | None) -> str:
    if sig is None:
        return "no signal"
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _has_abort_frames(frames: Sequence[Frame]) -> bool:
    return any(frame_kind(f) == "abort" for f in after_trampoline(list(frames)))


_GLIBC_HEAP_MESSAGES = ("double free", "free(): ", "malloc(): ", "realloc(): ", "corrupted", "munmap_chunk",
                        "malloc_consolidate", "tcache", "unaligned", "invalid next size", "invalid pointer")


@dataclass
class _Case:
    """The facts with what every rule looks at derived once."""
    f: CrashFacts
    sig: int | None
    frames: list[Frame]
    in_alloc: bool
    addr: int | None
    ev: dict[str, Any]
    seg: Segment | None = None
    poison: str | None = None

    @classmethod
    def of(cls, f: CrashFacts) -> "_Case":
        frames = list(f.frames)
        case = cls(f, f.signal, frames, crashed_in_allocator(frames), f.fault_address, {"signal": _signame(f.signal)})
        if case.addr is not None:
            case.ev["fault_address"] = hex(case.addr)
            case.ev["address_source"] = f.address_source
        if case.sig == _signal.SIGSEGV and not _sent_by_a_process(case):
            # Where the address falls in the memory map: evidence for the SIGSEGV rules only.
            addr = case.addr
            case.seg = _segment_at(f.segments, addr) if (addr is not None and f.segments is not None) else None
            if addr is not None and f.segments is not None:
                case.ev["mapping"] = f"{case.seg.start:#x}-{case.seg.end:#x} {case.seg.perms}" if case.seg \
                    else "unmapped"
            case.poison = poison_pattern(addr) if addr is not None else None
        return case

    def result(self, crash_class: str, detail: str, **extra: Any) -> Classification:
        extra.setdefault("in_allocator", self.in_alloc)
        return Classification(crash_class, detail, evidence=self.ev, **extra)


def _sent_by_a_process(c: _Case) -> bool:
    return c.sig in (_signal.SIGSEGV, _signal.SIGBUS, _signal.SIGILL, _signal.SIGFPE) and c.f.si_code is not None \
        and c.f.si_code <= 0


# --- the rules, in order: the first that answers classifies ---------------------------------------------

def _external_signal(c: _Case) -> Classification | None:
    if not _sent_by_a_process(c):
        return None
    # kill()/tgkill()/sigqueue() from a process: no faulting access, si_addr means nothing.
    sender = f" (pid {c.f.sender_pid})" if c.f.sender_pid else ""
    return c.result("external-signal", f"{_signame(c.sig)} sent by a process{sender}, not a fault")


def _bus_ill_fpe(c: _Case) -> Classification | None:
    if c.sig == _signal.SIGBUS:
        return c.result("bus-error", f"SIGBUS at {c.addr:#x}" if c.addr is not None else "SIGBUS")
    if c.sig == _signal.SIGILL:
        return c.result("illegal-instruction", "SIGILL (ud2/__builtin_trap, bad jump or CPU feature)")
    if c.sig == _signal.SIGFPE:
        return c.result("fpe", "SIGFPE (integer divide by zero or overflow)")
    return None


def _abort(c: _Case) -> Classification | None:
    if c.sig != _signal.SIGABRT:
        return None
    f, frames = c.f, c.frames
    external = f.si_code == SI_USER or (f.si_code == SI_TKILL and f.sender_pid not in (None, f.pid)
                                        and f.pid is not None)
    if external and not _has_abort_frames(frames):
        return c.result("unknown", f"SIGABRT sent by another process (pid {f.sender_pid}), not abort()")
    msg = (f.abort_message or "").strip()
    heap_msg = any(m in msg for m in _GLIBC_HEAP_MESSAGES)
    if c.in_alloc or heap_msg:
        return c.result("allocator-corruption",
                        f"abort inside the allocator: {msg}" if msg else "abort inside allocator frames",
                        in_allocator=True)
    if "Assertion" in msg or any(clean_function(x.function) in ("__assert_fail", "__assert_fail_base")
                                 for x in frames):
        return c.result("abort", f"assertion failed: {msg}" if msg else "assertion failed")
    if _has_abort_frames(frames) or msg:
        return c.result("abort", f"abort(): {msg}" if msg else "abort()")
    return c.result("abort", "SIGABRT raised without abort() in the stack")


def _not_segv(c: _Case) -> Classification | None:
    if c.sig == _signal.SIGSEGV:
        return None
    return c.result("unknown", f"{_signame(c.sig)} is not a crash class we know")


# SIGSEGV from here on.

def _segv_in_allocator(c: _Case) -> Classification | None:
    if not c.in_alloc:
        return None
    addr, poison = c.addr, c.poison
    what = f"poison address {addr:#x} ({poison})" if poison else (
        f"address {addr:#x}" if addr is not None else "unknown address")
    return c.result("allocator-corruption", f"SIGSEGV inside allocator frames at {what}: heap metadata corrupted",
                    poison=poison, in_allocator=True)


def _near_stack_pointer(c: _Case) -> Classification | None:
    addr, sp = c.addr, c.f.sp
    if addr is not None and sp is not None and sp - STACK_BELOW <= addr <= sp + STACK_ABOVE and (
            c.seg is None or not _allows(c.seg, c.f.access)):
        return c.result("stack-overflow", f"fault at {addr:#x}, {addr - sp:+#x} from the stack pointer")
    return None


def _null_page(c: _Case) -> Classification | None:
    addr, access = c.addr, c.f.access
    if addr is not None and addr < NULL_PAGE:
        return c.result("null-deref", f"{access or 'access'} at {addr:#x}: below 4096 (page 0)", threshold=NULL_PAGE)
    if addr is not None and addr < NEAR_NULL:
        return c.result("null-deref", f"{access or 'access'} at {addr:#x}: below 64 KiB (near-null)",
                        threshold=NEAR_NULL)
    return None


def _poisoned(c: _Case) -> Classification | None:
    if c.poison is None:
        return None
    return c.result("poison-address", f"{c.f.access or 'access'} at {c.addr:#x}: {c.poison}: likely use-after-free",
                    poison=c.poison)


def _gp_on_accessible(c: _Case) -> Classification | None:
    addr, f = c.addr, c.f
    if addr is not None and f.address_source == "instruction" and is_canonical(addr) and c.seg is not None \
            and _allows(c.seg, f.access):
        # #GP on a valid, accessible address: misaligned SSE/AVX operand, privileged instruction…
        return c.result("unknown", f"general-protection fault on accessible address {addr:#x} "
                        "(misaligned SSE/AVX access or privileged instruction?)")
    return None


def _wild(c: _Case) -> Classification | None:
    addr, f, seg = c.addr, c.f, c.seg
    if addr is None:
        return None
    if not is_canonical(addr):
        why = "non-canonical address"
    elif f.segments is not None and seg is None:
        why = "unmapped address"
    elif seg is not None and not _allows(seg, f.access):
        why = f"{f.access or 'access'} not allowed on mapped {seg.perms} memory"
    elif f.segments is None:
        why = "address (memory map unknown)"
    else:
        why = "mapped address (fault cause unclear)"
    return c.result("wild-address", f"{f.access or 'access'} at {addr:#x}: {why}")


# Address unknown from here on.

def _deep_recursion(c: _Case) -> Classification | None:
    cyc = find_cycle([clean_function(x.function) for x in after_trampoline(c.frames)])
    if cyc is not None and cyc.repeats * cyc.period >= 32:
        return c.result("stack-overflow", f"deep recursion ({cyc.repeats}× a {cyc.period}-frame cycle), "
                        "fault address unknown")
    return None


def _undecoded_gp(c: _Case) -> Classification | None:
    # A GP fault (SI_KERNEL) we could not decode must not be called a NULL deref.
    if c.f.si_code != SI_KERNEL:
        return None
    return c.result("unknown", "general-protection fault (SI_KERNEL, si_addr 0) and the faulting "
                    "instruction could not be decoded: not necessarily NULL")


RULES = (_external_signal, _bus_ill_fpe, _abort, _not_segv,
         _segv_in_allocator, _near_stack_pointer, _null_page, _poisoned, _gp_on_accessible, _wild,
         _deep_recursion, _undecoded_gp)


def classify(f: CrashFacts) -> Classification:
    """Pure classification: the first of RULES that answers (see the module docstring for the order)."""
    case = _Case.of(f)
    for rule in RULES:
        found = rule(case)
        if found is not None:
            return found
    return case.result("unknown", "SIGSEGV with unknown fault address")
