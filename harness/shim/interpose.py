"""Can the fault shim reach a target? Answer from the executable's ELF headers, before a run.

LD_PRELOAD only works for dynamically linked programs (a PT_INTERP program header names the dynamic
loader), is ignored for setuid/setgid or file-capability programs (the loader's secure-execution
mode), and only reaches calls that go through the dynamic symbol table: a program that defines
``malloc`` itself, or embeds a prefixed allocator, keeps its allocations away from the shim.
``shim_loaded(pid)`` checks a running process instead, from /proc/PID/maps.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from harness.shim.build import LIB_PREFIX

_PT_DYNAMIC, _PT_INTERP = 2, 3
_SHT_DYNSYM = 11
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_ALLOC = ("malloc", "free", "calloc", "realloc")
_EMBEDDED = ("je_malloc", "tc_malloc", "mi_malloc", "rpmalloc", "dlmalloc", "scalable_malloc", "snmalloc_malloc")
_LOCKS = ("pthread_mutex_lock", "pthread_mutex_trylock", "pthread_mutex_timedlock", "pthread_rwlock_rdlock",
          "pthread_rwlock_wrlock", "pthread_rwlock_tryrdlock", "pthread_rwlock_trywrlock")


@dataclass(frozen=True)
class InterposeReport:
    path: Path
    preloadable: bool             # LD_PRELOAD will load the shim at all
    alloc_faults: bool            # allocation faults can reach the program's allocations
    lock_faults: bool             # the executable itself calls pthread lock functions (default caller filter)
    interpreter: str | None = None
    reasons: tuple[str, ...] = field(default=())   # one line each, for every "no" and every caveat

    def __str__(self) -> str:
        verdict = "can be interposed" if self.preloadable else "cannot be interposed"
        lines = [f"{self.path}: {verdict}"] + [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


class _Elf:
    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF":
            raise ValueError("not an ELF file")
        self.data = data
        self.is64 = data[4] == 2
        self.end = "<" if data[5] == 1 else ">"
        if self.is64:
            (self.type, _, _, _, self.phoff, self.shoff, _, _, self.phentsize, self.phnum, self.shentsize,
             self.shnum, _) = struct.unpack_from(self.end + "HHIQQQIHHHHHH", data, 16)
        else:
            (self.type, _, _, _, self.phoff, self.shoff, _, _, self.phentsize, self.phnum, self.shentsize,
             self.shnum, _) = struct.unpack_from(self.end + "HHIIIIIHHHHHH", data, 16)

    def segments(self) -> list[tuple[int, int, int]]:
        """(p_type, p_offset, p_filesz) of every program header."""
        out = []
        for i in range(self.phnum):
            off = self.phoff + i * self.phentsize
            if self.is64:
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(self.end + "IIQQQQ", self.data, off)
            else:
                p_type, p_offset, _, _, p_filesz = struct.unpack_from(self.end + "IIIII", self.data, off)
            out.append((p_type, p_offset, p_filesz))
        return out

    def sections(self) -> list[tuple[int, int, int, int, int]]:
        """(sh_type, sh_offset, sh_size, sh_link, sh_entsize) of every section header."""
        out = []
        for i in range(self.shnum if self.shoff else 0):
            off = self.shoff + i * self.shentsize
            if self.is64:
                _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack_from(
                    self.end + "IIQQQQIIQQ", self.data, off)
            else:
                _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack_from(
                    self.end + "IIIIIIIIII", self.data, off)
            out.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
        return out

    def dynamic_symbols(self) -> dict[str, bool] | None:
        """Dynamic function symbols: name -> defined here (True) or imported (False); None if unknown."""
        secs = self.sections()
        for sh_type, off, size, link, entsize in secs:
            if sh_type != _SHT_DYNSYM or not entsize or link >= len(secs):
                continue
            str_off, str_size = secs[link][1], secs[link][2]
            strtab = self.data[str_off:str_off + str_size]
            out: dict[str, bool] = {}
            for k in range(size // entsize):
                e = off + k * entsize
                if self.is64:
                    name, info, _, shndx = struct.unpack_from(self.end + "IBBH", self.data, e)
                else:
                    name, _, _, info, _, shndx = struct.unpack_from(self.end + "IIIBBH", self.data, e)
                if info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC, 0):
                    continue
                end = strtab.find(b"\0", name)
                sym = strtab[name:end].decode("ascii", "replace")
                if sym:
                    base = sym.split("@", 1)[0]
                    out[base] = out.get(base, False) or shndx != 0
            return out
        return None


def check_interposable(executable: Path) -> InterposeReport:
    """What the shim can and cannot do for ``executable``, with one line per reason."""
    path = Path(executable)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as e:
        return InterposeReport(path, False, False, False, None, (f"cannot read it: {e.strerror}",))
    try:
        elf = _Elf(data)
    except (ValueError, struct.error):
        reason = ("not an ELF executable (a script?): the shim applies to the interpreter that runs it"
                  if data[:2] == b"#!" else "not an ELF file")
        return InterposeReport(path, False, False, False, None, (reason,))
    reasons: list[str] = []
    interp = None
    has_dynamic = False
    for p_type, off, size in elf.segments():
        if p_type == _PT_INTERP:
            interp = data[off:off + size].split(b"\0", 1)[0].decode("ascii", "replace")
        elif p_type == _PT_DYNAMIC:
            has_dynamic = True
    preloadable = interp is not None
    if interp is None:
        reasons.append("statically linked (no PT_INTERP" + (", a static PIE" if has_dynamic else "") +
                       "): the dynamic loader never runs, so LD_PRELOAD is ignored")
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        preloadable = False
        which = "setuid" if st.st_mode & stat.S_ISUID else "setgid"
        reasons.append(f"{which}: the loader runs it in secure-execution mode and ignores LD_PRELOAD paths")
    try:
        if os.getxattr(path, "security.capability"):
            preloadable = False
            reasons.append("has file capabilities: the loader runs it in secure-execution mode and ignores LD_PRELOAD")
    except OSError:
        pass
    syms = elf.dynamic_symbols() if interp is not None else None
    alloc_faults = lock_faults = preloadable
    if preloadable and syms is None:
        reasons.append("no section headers (stripped with sstrip?): symbols not checked")
    elif preloadable and syms is not None:
        defined = [s for s in _ALLOC if syms.get(s)]
        if defined:
            alloc_faults = False
            reasons.append(f"defines {', '.join(defined)} itself (embedded allocator): its allocations bypass "
                           "the shim, allocation faults cannot reach them")
        embedded = [s for s in _EMBEDDED if syms.get(s)]
        if embedded:
            reasons.append(f"exports {', '.join(embedded)}: an allocator linked in statically; allocations made "
                           "through it bypass the shim")
        if not defined and not any(s in syms for s in _ALLOC + ("_Znwm", "_Znam")):
            reasons.append("the executable itself imports no malloc/free/operator new: allocation faults reach "
                           "only allocations made by its shared libraries")
        if not any(s in syms and not syms[s] for s in _LOCKS):
            lock_faults = False
            reasons.append("the executable calls no pthread mutex/rwlock lock function directly: lock faults "
                           "with the default caller filter ('exe') will never fire")
    return InterposeReport(path, preloadable, alloc_faults and preloadable, lock_faults and preloadable,
                           interp, tuple(reasons))


def mapped_objects(pid: int) -> list[str]:
    """Paths of the files mapped into process ``pid`` (from /proc/PID/maps), in first-seen order."""
    seen: dict[str, None] = {}
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                seen.setdefault(parts[5].rstrip("\n").removesuffix(" (deleted)"), None)
    return list(seen)


def shim_loaded(pid: int, shim: Path | None = None) -> bool:
    """Whether process ``pid`` has the shim mapped (``shim``'s path, or any built shim)."""
    try:
        objs = mapped_objects(pid)
    except OSError:
        return False
    if shim is not None:
        want = str(Path(shim).resolve())
        return any(o == want or o == str(shim) for o in objs)
    return any(Path(o).name.startswith(LIB_PREFIX) for o in objs)
