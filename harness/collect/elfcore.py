"""Just enough ELF to read a core's program headers and notes, and an executable's build id.

Why our own reader: the memory map (PT_LOAD segments) tells whether a fault address was mapped and
where the stack is, which neither eu-stack nor gdb batch output gives cheaply; and the notes
(NT_PRSTATUS, NT_SIGINFO) give signal and registers even when gdb is missing. Only headers and the
note segment are read, with seeks, never the memory contents: a multi-GB core costs a few KiB.
Little-endian x86-64 ELF64 only; anything else raises ElfError.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS = 1
NT_SIGINFO = 0x53494749
NT_FILE = 0x46494C45
NT_GNU_BUILD_ID = 3
EM_X86_64 = 62
ET_CORE = 4

# struct user_regs_struct order inside elf_prstatus.pr_reg (x86-64).
PRSTATUS_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
    "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)
_PRSTATUS_REG_OFFSET = 112  # after elf_siginfo, cursig, sigpend, sighold, pids and four timevals
_MAX_NOTE_BYTES = 64 << 20  # a core with thousands of threads has MBs of notes; stop well before that matters
_MAX_PHDRS = 1 << 20


class ElfError(Exception):
    pass


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    flags: int  # PF_R | PF_W | PF_X
    file_size: int  # bytes present in the core (0 for segments the kernel did not dump)
    offset: int = 0  # where those bytes are in the core file

    @property
    def perms(self) -> str:
        return ("r" if self.flags & PF_R else "-") + ("w" if self.flags & PF_W else "-") + ("x" if self.flags & PF_X else "-")


@dataclass
class CoreInfo:
    segments: list[Segment] = field(default_factory=list)  # every VMA of the process, sorted by start
    pid: int | None = None  # from the first NT_PRSTATUS: the thread that received the fatal signal
    signal: int | None = None
    registers: dict[str, int] = field(default_factory=dict)
    si_signo: int | None = None
    si_code: int | None = None
    si_addr: int | None = None  # union member: meaningful for SIGSEGV/SIGBUS/SIGILL/SIGFPE
    si_pid: int | None = None  # same union read as kill info: meaningful for SI_USER/SI_TKILL
    threads: int = 0
    notes_truncated: bool = False
    files: list["MappedFile"] = field(default_factory=list)  # NT_FILE: what the process had mapped, and where

    def file_at(self, addr: int) -> "MappedFile | None":
        return next((f for f in self.files if f.start <= addr < f.end), None)

    def segment_at(self, addr: int) -> Segment | None:
        lo, hi = 0, len(self.segments)
        while lo < hi:  # binary search: segments are sorted and disjoint
            mid = (lo + hi) // 2
            s = self.segments[mid]
            if addr < s.start:
                hi = mid
            elif addr >= s.end:
                lo = mid + 1
            else:
                return s
        return None


@dataclass(frozen=True)
class MappedFile:
    start: int
    end: int
    offset: int  # in bytes, into the file
    path: str  # as the kernel named it at the crash ("(deleted)" suffix kept off; see deleted)
    deleted: bool = False


def _read_exact(fd: int, offset: int, n: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ElfError(f"short read at {offset}: wanted {n}, got {len(data)} (truncated file?)")
    return data


def _header(fd: int) -> tuple[int, int, int, int, int]:
    ident = _read_exact(fd, 0, 64)
    if ident[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if ident[4] != 2 or ident[5] != 1:
        raise ElfError("only little-endian ELF64 is supported")
    (e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     _shentsize, _shnum, _shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", ident, 16)
    if e_phnum == 0xFFFF and e_shoff:  # PN_XNUM: the real count is in section header 0's sh_info
        sh0 = _read_exact(fd, e_shoff, 64)
        e_phnum = struct.unpack_from("<I", sh0, 44)[0]
    return e_type, e_machine, e_phoff, e_phentsize, e_phnum


def _phdrs(fd: int, phoff: int, phentsize: int, phnum: int) -> list[tuple[int, int, int, int, int, int]]:
    if phentsize < 56 or phnum > _MAX_PHDRS:
        raise ElfError(f"implausible program headers ({phnum} × {phentsize})")
    raw = _read_exact(fd, phoff, phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", raw, i * phentsize)
        out.append((p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz))
    return out


def _notes(fd: int, offset: int, size: int, budget: list[int]):
    """Yield (type, name, desc_offset, desc_size) reading only note headers; descs are read on demand."""
    pos, end = offset, offset + size
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack("<III", _read_exact(fd, pos, 12))
        name_off = pos + 12
        desc_off = name_off + ((namesz + 3) & ~3)
        name = _read_exact(fd, name_off, namesz).rstrip(b"\0") if 0 < namesz <= 64 else b""
        yield ntype, name, desc_off, descsz
        pos = desc_off + ((descsz + 3) & ~3)
        budget[0] -= 12 + namesz + descsz
        if budget[0] <= 0:
            return


def read_core(path: Path) -> CoreInfo:
    """Memory map, first thread's registers and the siginfo of an x86-64 core (O_NOFOLLOW)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        e_type, e_machine, phoff, phentsize, phnum = _header(fd)
        if e_type != ET_CORE:
            raise ElfError(f"not a core file (e_type {e_type})")
        if e_machine != EM_X86_64:
            raise ElfError(f"unsupported machine {e_machine} (x86-64 only)")
        info = CoreInfo()
        budget = [_MAX_NOTE_BYTES]
        for p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz in _phdrs(fd, phoff, phentsize, phnum):
            if p_type == PT_LOAD:
                info.segments.append(Segment(p_vaddr, p_vaddr + p_memsz, p_flags, p_filesz, p_offset))
            elif p_type == PT_NOTE:
                for ntype, name, doff, dsz in _notes(fd, p_offset, p_filesz, budget):
                    if ntype == NT_PRSTATUS and name == b"CORE":
                        info.threads += 1
                        if info.threads == 1 and dsz >= _PRSTATUS_REG_OFFSET + 8 * len(PRSTATUS_REGS):
                            desc = _read_exact(fd, doff, dsz)
                            info.signal = struct.unpack_from("<h", desc, 12)[0]
                            info.pid = struct.unpack_from("<i", desc, 32)[0]
                            regs = struct.unpack_from("<27Q", desc, _PRSTATUS_REG_OFFSET)
                            info.registers = dict(zip(PRSTATUS_REGS, regs))
                    elif ntype == NT_FILE and name == b"CORE" and not info.files and 16 <= dsz <= _MAX_NOTE_BYTES:
                        info.files = _mapped_files(_read_exact(fd, doff, dsz))
                    elif ntype == NT_SIGINFO and name == b"CORE" and info.si_signo is None and dsz >= 24:
                        desc = _read_exact(fd, doff, 24)
                        info.si_signo, _errno, info.si_code = struct.unpack_from("<iii", desc, 0)
                        info.si_addr = struct.unpack_from("<Q", desc, 16)[0]
                        info.si_pid = struct.unpack_from("<i", desc, 16)[0]
                if budget[0] <= 0:
                    info.notes_truncated = True
        info.segments.sort(key=lambda s: s.start)
        return info
    finally:
        os.close(fd)


def _mapped_files(desc: bytes) -> list[MappedFile]:
    """NT_FILE: count, page size, count x (start, end, offset in pages), then count NUL-terminated names."""
    count, page = struct.unpack_from("<QQ", desc, 0)
    if count > len(desc) // 24:
        return []
    names = desc[16 + 24 * count:].split(b"\0")
    out = []
    for i in range(count):
        start, end, pages = struct.unpack_from("<QQQ", desc, 16 + 24 * i)
        raw = names[i].decode("utf-8", "surrogateescape") if i < len(names) else ""
        deleted = raw.endswith(" (deleted)")
        out.append(MappedFile(start, end, pages * page, raw.removesuffix(" (deleted)"), deleted))
    return out


def read_build_id(path: Path) -> str | None:
    """The GNU build id of an ELF file (executable or library), from its PT_NOTE segments."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        _t, _m, phoff, phentsize, phnum = _header(fd)
        budget = [1 << 20]
        for p_type, _f, p_offset, _v, p_filesz, _msz in _phdrs(fd, phoff, phentsize, phnum):
            if p_type != PT_NOTE:
                continue
            for ntype, name, doff, dsz in _notes(fd, p_offset, p_filesz, budget):
                if ntype == NT_GNU_BUILD_ID and name == b"GNU" and 0 < dsz <= 64:
                    return _read_exact(fd, doff, dsz).hex()
        return None
    except (ElfError, OSError, struct.error):
        return None
    finally:
        os.close(fd)
