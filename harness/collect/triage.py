"""triage_core: from a core file and its executable to a classified, bucketed crash report.

Fast path (≈100 ms for a small core): eu-stack (frames, build ids) and gdb --readnever (siginfo,
registers, faulting instruction, abort message) run concurrently while we read the core's memory map
and notes ourselves. Memory stays bounded for any core size: the tools read the core, we read only
ELF headers and notes, and tool output is capped (backtrace.MAX_OUTPUT).
Never raises for tool or core problems: they end up in ``Triage.errors``.
"""
from __future__ import annotations

import os
import shutil
import signal as _signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import backtrace as bt
from .classify import Classification, CrashFacts, classify
from .elfcore import CoreInfo, ElfError, read_build_id, read_core
from .frames import Frame, ThreadStack
from .signature import SIGNATURE_VERSION, Signature, bucket_id, crash_state
from .decode import Decoded, decode_at_pc
from .x86 import SI_KERNEL, FaultAddress, recompute_fault_address

FAULT_SIGNALS = {_signal.SIGSEGV, _signal.SIGBUS, _signal.SIGILL, _signal.SIGFPE}
KEPT_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
                  "r14", "r15", "rip", "eflags", "fs_base", "gs_base")

_SI_CODES: dict[int, dict[int, str]] = {
    _signal.SIGSEGV: {1: "SEGV_MAPERR", 2: "SEGV_ACCERR", 3: "SEGV_BNDERR", 4: "SEGV_PKUERR"},
    _signal.SIGBUS: {1: "BUS_ADRALN", 2: "BUS_ADRERR", 3: "BUS_OBJERR", 4: "BUS_MCEERR_AR", 5: "BUS_MCEERR_AO"},
    _signal.SIGILL: {1: "ILL_ILLOPC", 2: "ILL_ILLOPN", 3: "ILL_ILLADR", 4: "ILL_ILLTRP", 5: "ILL_PRVOPC",
                     6: "ILL_PRVREG", 7: "ILL_COPROC", 8: "ILL_BADSTK"},
    _signal.SIGFPE: {1: "FPE_INTDIV", 2: "FPE_INTOVF", 3: "FPE_FLTDIV", 4: "FPE_FLTOVF", 5: "FPE_FLTUND",
                     6: "FPE_FLTRES", 7: "FPE_FLTINV", 8: "FPE_FLTSUB"},
}
_SI_GENERIC = {0: "SI_USER", -1: "SI_QUEUE", -2: "SI_TIMER", -3: "SI_MESGQ", -4: "SI_ASYNCIO", -6: "SI_TKILL",
               SI_KERNEL: "SI_KERNEL"}


def si_code_name(sig: int | None, code: int | None) -> str | None:
    if code is None:
        return None
    if sig in _SI_CODES and code in _SI_CODES[sig]:
        return _SI_CODES[sig][code]
    return _SI_GENERIC.get(code, str(code))


def _hex(v: int | None) -> str | None:
    return hex(v) if v is not None else None


@dataclass
class Triage:
    core: str
    executable: str
    signal: int | None = None
    signal_name: str | None = None
    si_code: int | None = None
    si_code_name: str | None = None
    fault_address: int | None = None  # the real address: recomputed from the instruction for SI_KERNEL faults
    address_source: str = "none"  # "siginfo" | "instruction" | "none"
    reported_si_addr: int | None = None  # what the kernel put in si_addr (0 for a #GP)
    access: str | None = None  # "read" | "write" | "exec" when the instruction tells
    instruction: str | None = None  # "addq $0x1,0x20(%rax)"
    pc: int | None = None
    sp: int | None = None
    registers: dict[str, int] = field(default_factory=dict)
    crashing_tid: int | None = None
    crashing_thread: list[Frame] = field(default_factory=list)
    threads: list[ThreadStack] = field(default_factory=list)  # all threads, crashing one first
    crash_class: str = "unknown"
    class_detail: str = ""
    near_null_threshold: int | None = None
    poison: str | None = None
    signature: str = ""
    signature_frames: list[str] = field(default_factory=list)
    signature_method: str = "empty"
    signature_version: int = SIGNATURE_VERSION
    bucket: str = ""
    in_allocator: bool = False
    abort_message: str | None = None
    build_ids: dict[str, str] = field(default_factory=dict)  # module name → build id
    executable_build_id: str | None = None
    tools: dict[str, str] = field(default_factory=dict)  # what produced frames / siginfo / instruction
    timings: dict[str, float] = field(default_factory=dict)
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)
    classification: Classification | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: addresses as hex strings (they exceed JavaScript's 2^53)."""
        return {
            "core": self.core, "executable": self.executable,
            "signal": self.signal, "signal_name": self.signal_name,
            "si_code": self.si_code, "si_code_name": self.si_code_name,
            "fault_address": _hex(self.fault_address), "address_source": self.address_source,
            "reported_si_addr": _hex(self.reported_si_addr), "access": self.access,
            "instruction": self.instruction, "pc": _hex(self.pc), "sp": _hex(self.sp),
            "registers": {k: hex(v) for k, v in self.registers.items()},
            "crashing_tid": self.crashing_tid,
            "crashing_thread": [f.to_dict() for f in self.crashing_thread],
            "threads": [t.to_dict() for t in self.threads],
            "crash_class": self.crash_class, "class_detail": self.class_detail,
            "near_null_threshold": self.near_null_threshold, "poison": self.poison,
            "signature": self.signature, "signature_frames": list(self.signature_frames),
            "signature_method": self.signature_method, "signature_version": self.signature_version,
            "bucket": self.bucket, "in_allocator": self.in_allocator, "abort_message": self.abort_message,
            "build_ids": dict(self.build_ids), "executable_build_id": self.executable_build_id,
            "tools": dict(self.tools), "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "duration": round(self.duration, 4), "errors": list(self.errors),
        }


def _check_core(core: Path) -> str | None:
    try:
        st = os.lstat(core)
    except OSError as e:
        return f"core {core}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"core {core} is not a regular file"
    if st.st_size == 0:
        return f"core {core} is empty"
    return None


def _order_threads(threads: list[ThreadStack], crashing_tid: int | None) -> list[ThreadStack]:
    """The kernel writes the signalled thread's notes first, and eu-stack keeps that order; if gdb or
    the notes name another tid, trust them."""
    if crashing_tid is None or not threads or threads[0].tid == crashing_tid:
        return threads
    for i, t in enumerate(threads):
        if t.tid == crashing_tid:
            return [t] + threads[:i] + threads[i + 1:]
    return threads


def _main_module_build_id(modules: list[bt.Module], executable: Path) -> str | None:
    exe_real = os.path.realpath(executable)
    for m in modules:
        if m.path and os.path.realpath(m.path) == exe_real:
            return m.build_id
    for m in modules:
        if m.name == executable.name:
            return m.build_id
    return None


def triage_core(core: Path, executable: Path, *, timeout: float = 30.0,
                tool_paths: Mapping[str, str] | None = None) -> Triage:
    """Triage a core written by ``executable``. tool_paths overrides argv[0] of "eu-stack" / "gdb"
    (tests use it to simulate missing tools). Three steps: gather (the tools and the core's notes: all
    the I/O), assemble (pure: which source to believe for each fact), classify."""
    t0 = time.monotonic()
    core, executable = Path(core), Path(executable)
    tri = Triage(core=str(core), executable=str(executable))
    problem = _check_core(core)
    if problem:
        tri.errors.append(problem)
        _finish(tri, Classification("unknown", problem), t0)
        return tri
    gathered = _gather(tri, core, executable, timeout, dict(tool_paths or {}), t0)
    sender = _assemble(tri, gathered, executable)
    info = gathered.info
    cls = classify(CrashFacts(
        signal=tri.signal, si_code=tri.si_code, fault_address=tri.fault_address,
        address_source=tri.address_source, reported_si_addr=tri.reported_si_addr, access=tri.access,
        pc=tri.pc, sp=tri.sp, frames=tri.crashing_thread, segments=info.segments if info else None,
        pid=info.pid if info else None, sender_pid=sender if tri.signal not in FAULT_SIGNALS else None,
        abort_message=tri.abort_message))
    _finish(tri, cls, t0)
    return tri


@dataclass
class _Gathered:
    """What the tools and the core's own notes said."""
    info: CoreInfo | None
    stack: bt.StackResult
    facts: bt.GdbFacts
    threads: list[ThreadStack]
    frames_tool: str
    decoded: Decoded | None


def _registers(facts: bt.GdbFacts, info: CoreInfo | None) -> dict[str, int]:
    """gdb's registers first, the core's own notes when gdb is missing or failed."""
    return facts.registers or (info.registers if info else {})


def _gather(tri: Triage, core: Path, executable: Path, timeout: float, paths: dict[str, str],
            t0: float) -> _Gathered:
    """Run eu-stack and gdb, read the core's notes and the bytes at pc; timings and tool errors into `tri`."""
    eu_stack = paths.get("eu-stack", "eu-stack")
    gdb = paths.get("gdb", "gdb")
    if not executable.is_file():
        tri.errors.append(f"executable {executable} not found: frames of the main program will be unsymbolized")

    exe_arg = executable if executable.is_file() else None
    have_eu = shutil.which(eu_stack) is not None
    # Both tools at once: triage then costs the slower one, not the sum.
    eu_job = bt._Running(bt.eu_stack_argv(core, exe_arg, eu_stack=eu_stack), timeout)
    gdb_job = bt._Running(bt.gdb_argv(core, exe_arg, gdb=gdb, want_backtrace=not have_eu), timeout)

    info: CoreInfo | None = None
    t1 = time.monotonic()
    try:
        info = read_core(core)
    except (ElfError, OSError) as e:
        tri.errors.append(f"core notes/memory map unreadable: {e}")
    tri.timings["core_notes"] = time.monotonic() - t1
    tri.executable_build_id = read_build_id(executable) if exe_arg else None

    stack = bt.eu_stack_result(eu_job.wait())
    tri.timings["eu-stack"] = stack.run.duration if stack.run else 0.0
    facts = bt.gdb_result(gdb_job.wait(), executable_name=executable.name)
    tri.timings["gdb"] = facts.run.duration if facts.run else 0.0
    tri.errors += stack.errors + facts.errors

    threads, frames_tool = stack.threads, "eu-stack"
    if not threads and facts.threads:
        threads, frames_tool = facts.threads, "gdb"
    elif not threads and have_eu and shutil.which(gdb):
        # eu-stack ran but found nothing usable: a slower gdb backtrace is better than no frames.
        t2 = time.monotonic()
        left = max(1.0, timeout - (t2 - t0))  # the timeout bounds the whole triage, not each tool
        retry = bt.gdb_result(bt.run_tool(bt.gdb_argv(core, exe_arg, gdb=gdb, want_backtrace=True), left),
                              executable_name=executable.name)
        tri.timings["gdb-backtrace"] = time.monotonic() - t2
        if retry.threads:
            threads, frames_tool = retry.threads, "gdb"

    # The faulting instruction, and the x86-64 trap: capstone on the bytes at pc (from the core, or the file
    # mapped there); gdb's text only when those bytes cannot be read (_instruction).
    regs = _registers(facts, info)
    decoded = decode_at_pc(core, info, regs.get("rip"), regs) if regs else None
    return _Gathered(info, stack, facts, threads, frames_tool, decoded)


def _assemble(tri: Triage, g: _Gathered, executable: Path) -> int | None:
    """Pure: fill `tri` from what was gathered, each fact from the best source that has it. Returns the
    sender's pid from the siginfo (meaningful for signals sent by a process)."""
    info, facts = g.info, g.facts
    tri.tools["frames"] = g.frames_tool if g.threads else "none"
    regs = _registers(facts, info)
    tri.registers = {k: regs[k] for k in KEPT_REGISTERS if k in regs}
    sender = _siginfo(tri, facts, info)
    tri.pc = regs.get("rip")
    tri.sp = regs.get("rsp")
    tri.abort_message = facts.abort_message

    crashing_tid = facts.lwp or (info.pid if info else None)
    threads = _order_threads(g.threads, crashing_tid)
    tri.threads = threads
    tri.crashing_tid = threads[0].tid if threads else crashing_tid
    tri.crashing_thread = list(threads[0].frames) if threads else []

    _fault_address(tri, _instruction(tri, g, regs))
    _build_ids(tri, g.stack.modules, executable)
    return sender


def _siginfo(tri: Triage, facts: bt.GdbFacts, info: CoreInfo | None) -> int | None:
    """Signal, si_code and si_addr: gdb first, the core's own notes when gdb is missing or failed."""
    if facts.si_signo is not None:
        tri.signal, tri.si_code, si_addr, sender = facts.si_signo, facts.si_code, facts.si_addr, facts.si_pid
        tri.tools["siginfo"] = "gdb"
    elif info is not None and (info.si_signo is not None or info.signal):
        tri.signal = info.si_signo if info.si_signo is not None else info.signal
        tri.si_code, si_addr, sender = info.si_code, info.si_addr, info.si_pid
        tri.tools["siginfo"] = "core-notes"
    else:
        si_addr = sender = None
        tri.tools["siginfo"] = "none"
    if tri.signal is not None:
        try:
            tri.signal_name = _signal.Signals(tri.signal).name
        except ValueError:
            tri.signal_name = f"SIG{tri.signal}"
    tri.si_code_name = si_code_name(tri.signal, tri.si_code)
    # si_addr shares a union with si_pid: it means an address only for fault signals.
    tri.reported_si_addr = si_addr if tri.signal in FAULT_SIGNALS else None
    return sender


def _instruction(tri: Triage, g: _Gathered, regs: dict[str, int]) -> FaultAddress | None:
    """The faulting instruction's text, and the address and access it computes (None if unknown)."""
    decoded, facts = g.decoded, g.facts
    if decoded is not None:
        tri.instruction = decoded.text
        tri.tools["instruction"] = "capstone (bytes from the core)" if decoded.source == "core" else \
            f"capstone (bytes from {decoded.source})"
        return decoded.fault
    insn = facts.instructions[0] if facts.instructions else None
    next_pc = facts.instructions[1].address if len(facts.instructions) > 1 else None
    tri.tools["instruction"] = "gdb text (bytes at pc unreadable)" if insn else "none"
    if insn is not None:
        tri.instruction = insn.text
    return recompute_fault_address(insn, regs, next_pc) if insn is not None and regs else None


def _fault_address(tri: Triage, recomputed: FaultAddress | None) -> None:
    """The real fault address: si_addr, or recomputed from the instruction for a #GP (SI_KERNEL, si_addr 0)."""
    if tri.signal == _signal.SIGSEGV and tri.si_code == SI_KERNEL and not tri.reported_si_addr:
        if recomputed is not None:
            tri.fault_address, tri.address_source, tri.access = recomputed.address, "instruction", recomputed.access
        else:
            tri.errors.append("SI_KERNEL fault (si_addr 0) and the faulting instruction could not be decoded")
    elif tri.reported_si_addr is not None:
        tri.fault_address, tri.address_source = tri.reported_si_addr, "siginfo"
        if tri.signal == _signal.SIGSEGV:
            if tri.pc is not None and tri.fault_address == tri.pc:
                tri.access = "exec"
            elif recomputed is not None and recomputed.address >> 12 == tri.fault_address >> 12:
                tri.access = recomputed.access


def _build_ids(tri: Triage, modules: list[bt.Module], executable: Path) -> None:
    """Build ids from eu-stack's module list (no extra process), and whether the executable was rebuilt."""
    for m in modules:
        if m.build_id:
            tri.build_ids[m.name] = m.build_id
    core_exe_bid = _main_module_build_id(modules, executable)
    if tri.executable_build_id and core_exe_bid and core_exe_bid != tri.executable_build_id:
        tri.errors.append(f"executable build id {tri.executable_build_id} differs from the core's {core_exe_bid}: "
                          "it was rebuilt since the crash, frames in it are unreliable")


def _finish(tri: Triage, cls: Classification, t0: float) -> None:
    tri.classification = cls
    tri.crash_class = cls.crash_class
    tri.class_detail = cls.detail
    tri.near_null_threshold = cls.threshold
    tri.poison = cls.poison
    sig: Signature = crash_state(tri.crashing_thread, cls.crash_class)
    tri.signature = sig.text
    tri.signature_frames = list(sig.frames)
    tri.signature_method = sig.method
    tri.signature_version = sig.version
    tri.in_allocator = sig.in_allocator or cls.in_allocator
    tri.bucket = bucket_id(cls.crash_class, sig)
    tri.duration = time.monotonic() - t0
    tri.timings["total"] = tri.duration
