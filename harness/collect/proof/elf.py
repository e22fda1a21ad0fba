"""What the dynamic linker reads from one ELF object: its dynamic symbols with their versions, DT_NEEDED,
DT_RPATH/DT_RUNPATH, the executable's relocations, and the facts that recognise an allocator linked in.

pyelftools reads the structure (headers, sections, dynamic tags, version definitions and needs,
relocations); the symbol and version arrays themselves are decoded with ``struct.iter_unpack`` from the
section bytes pyelftools hands over, because walking libc's 2,800 symbols through pyelftools' per-entry
objects costs a quarter of a second and a proof is taken for every host incarnation. Objects are cached by
(device, inode, mtime, size): every host of a fleet maps the same few files.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_COMMON, STT_TLS, STT_GNU_IFUNC = 0, 1, 2, 5, 6, 10
STB_LOCAL, STB_GLOBAL, STB_WEAK, STB_GNU_UNIQUE = 0, 1, 2, 10
SHN_UNDEF = 0
# What ld.so's check_match accepts as a definition (dl-lookup.c ALLOWED_STT).
ALLOWED_STT = {STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_COMMON, STT_TLS, STT_GNU_IFUNC}
R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT = 1, 6, 7
DF_1_NODEFLIB = 0x800
VERSYM_HIDDEN = 0x8000

# Allocator fingerprints in an executable's read-only data: messages and names each allocator prints.
_FINGERPRINTS: tuple[tuple[str, bytes], ...] = (
    ("jemalloc", b"<jemalloc>: "),
    ("tcmalloc", b"TCMallocImplementation"),
    ("tcmalloc", b"tcmalloc: "),
    ("mimalloc", b"mimalloc: "),
)
# Symbols (dynamic or in .symtab) that only a linked-in allocator defines.
_ALLOCATOR_SYMBOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("jemalloc", ("mallctl", "je_malloc", "je_mallctl", "malloc_stats_print", "je_malloc_stats_print", "nallocx",
                  "je_nallocx", "malloc_conf", "je_malloc_conf")),
    ("tcmalloc", ("tc_malloc", "tc_free", "MallocExtension_GetStats", "TCMalloc_SystemAlloc")),
    ("mimalloc", ("mi_malloc", "mi_free", "mi_version", "mi_stats_print")),
)
_JEMALLOC_VERSION = re.compile(rb"(\d+\.\d+\.\d+-\d+-g[0-9a-f]{40})")
_MIMALLOC_VERSION = re.compile(rb"mimalloc[ :-]+v?(\d+\.\d+\.\d+)")
_TCMALLOC_VERSION = re.compile(rb"gperftools (\d+\.\d+(?:\.\d+)?)")
_MAX_SCAN = 256 << 20      # read-only data scanned for fingerprints (a huge executable is cut, not refused)


@dataclass(frozen=True)
class Symbol:
    index: int
    name: str
    value: int
    defined: bool          # st_shndx != SHN_UNDEF
    type: int
    bind: int
    version_index: int     # .gnu.version entry without the hidden bit (0 local, 1 global / none)
    hidden: bool           # non-default version (foo@V, not foo@@V)


@dataclass(frozen=True)
class Relocation:
    symbol: str
    offset: int            # r_offset: the slot's address before the load bias
    type: int
    addend: int


@dataclass
class ElfObject:
    path: str
    identity: tuple[int, int]                 # (st_dev, st_ino) of the file
    elf_type: str                             # ET_EXEC | ET_DYN
    interpreter: str | None
    soname: str | None
    needed: list[str]
    rpath: list[str] | None
    runpath: list[str] | None
    nodeflib: bool
    bind_now: bool
    symbols: dict[str, list[Symbol]]          # dynamic symbols by name, in table order
    version_names: dict[int, str]             # version index -> name (definitions and needs)
    version_files: dict[int, str]             # needed version index -> the library named in .gnu.version_r
    has_versym: bool
    first_vaddr: int                          # lowest PT_LOAD p_vaddr (page-aligned): load bias = start - this
    dynamic_vaddr: int | None = None          # PT_DYNAMIC (unrelocated): DT_DEBUG there leads to ld.so's link map
    relocations: list[Relocation] = field(default_factory=list)
    plt_ranges: list[tuple[int, int]] = field(default_factory=list)   # .plt/.plt.sec (unrelocated)
    static_allocators: dict[str, str] = field(default_factory=dict)   # allocator -> evidence (executables)

    @property
    def is_static(self) -> bool:
        """Fully static: no PT_INTERP, so ld.so never runs and LD_PRELOAD means nothing."""
        return self.interpreter is None

    def definitions(self, name: str) -> list[Symbol]:
        return [s for s in self.symbols.get(name, ()) if s.defined]

    def imports(self, name: str) -> Symbol | None:
        return next((s for s in self.symbols.get(name, ()) if not s.defined), None)

    def imported_names(self) -> list[str]:
        return [name for name, syms in self.symbols.items() if any(not s.defined for s in syms)]

    def requested_version(self, symbol: Symbol) -> tuple[str, str | None] | None:
        """(version, library) an undefined symbol asks for, or None for an unversioned reference."""
        if symbol.version_index < 2 or symbol.version_index not in self.version_names:
            return None
        return self.version_names[symbol.version_index], self.version_files.get(symbol.version_index)

    def symbol_at(self, value: int) -> str | None:
        """A defined dynamic function symbol at this (unrelocated) address, preferring the plain names."""
        names = [s.name for syms in self.symbols.values() for s in syms if s.defined and s.value == value
                 and s.type in (STT_FUNC, STT_GNU_IFUNC)]
        return min(names, key=lambda n: (n.startswith("_"), len(n))) if names else None


class ElfReadError(Exception):
    pass


_cache: dict[tuple[str, int, int, int, int], ElfObject] = {}
_cache_lock = threading.Lock()


def load(path: str | os.PathLike[str], *, fingerprint: bool = False) -> ElfObject:
    """The object at ``path`` (cached by identity); ``fingerprint``: also look for an allocator linked in."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ElfReadError(f"{path}: {exc.strerror}") from None
    key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None and (not fingerprint or cached.static_allocators or getattr(cached, "_scanned", False)):
        return cached
    try:
        with open(path, "rb") as handle:
            elf = ELFFile(handle)
            obj = cached or _read(elf, path, (st.st_dev, st.st_ino))
            if fingerprint and not getattr(obj, "_scanned", False):
                obj.static_allocators = _allocators_linked_in(elf, handle, obj)
                obj._scanned = True  # type: ignore[attr-defined]
    except (ELFError, struct.error, ValueError, OSError) as exc:
        raise ElfReadError(f"{path}: not a readable ELF file ({exc})") from None
    with _cache_lock:
        if len(_cache) > 512:
            _cache.clear()
        _cache[key] = obj
    return obj


def is_elf64_x86(path: str) -> bool:
    """Would ld.so accept this file for an x86-64 process? (It skips other classes and machines.)"""
    try:
        with open(path, "rb") as handle:
            head = handle.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1 and \
        struct.unpack_from("<H", head, 18)[0] == 62


def _read(elf: ELFFile, path: str, identity: tuple[int, int]) -> ElfObject:
    interpreter = None
    first_vaddr = None
    dynamic_vaddr = None
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_DYNAMIC":
            dynamic_vaddr = segment["p_vaddr"]
        elif segment["p_type"] == "PT_INTERP":
            interpreter = segment.get_interp_name()
        elif segment["p_type"] == "PT_LOAD":
            vaddr = segment["p_vaddr"] & ~0xFFF
            first_vaddr = vaddr if first_vaddr is None else min(first_vaddr, vaddr)
    soname, needed, rpath, runpath, nodeflib, bind_now = None, [], None, None, False, False
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                kind = tag.entry.d_tag
                if kind == "DT_NEEDED":
                    needed.append(tag.needed)
                elif kind == "DT_SONAME":
                    soname = tag.soname
                elif kind == "DT_RPATH":
                    rpath = [p for p in tag.rpath.split(":")]
                elif kind == "DT_RUNPATH":
                    runpath = [p for p in tag.runpath.split(":")]
                elif kind == "DT_FLAGS_1":
                    nodeflib = bool(tag.entry.d_val & DF_1_NODEFLIB)
                    bind_now = bind_now or bool(tag.entry.d_val & 0x1)   # DF_1_NOW
                elif kind == "DT_FLAGS":
                    bind_now = bind_now or bool(tag.entry.d_val & 0x8)   # DF_BIND_NOW
                elif kind == "DT_BIND_NOW":
                    bind_now = True
            break
    symbols, version_names, version_files, has_versym = _dynamic_symbols(elf)
    obj = ElfObject(path=path, identity=identity, elf_type=elf["e_type"], interpreter=interpreter, soname=soname,
                    needed=needed, rpath=rpath, runpath=runpath, nodeflib=nodeflib, bind_now=bind_now,
                    symbols=symbols, version_names=version_names, version_files=version_files,
                    has_versym=has_versym, first_vaddr=first_vaddr or 0, dynamic_vaddr=dynamic_vaddr)
    dynsym = elf.get_section_by_name(".dynsym")
    names = {s.index: s.name for syms in symbols.values() for s in syms}
    for section in elf.iter_sections():
        if isinstance(section, RelocationSection) and section.is_RELA() and dynsym is not None and \
                section["sh_link"] == elf.get_section_index(".dynsym"):
            for entry, in _unpack_rela(section.data()):
                offset, info, addend = entry
                sym, kind = info >> 32, info & 0xFFFFFFFF
                if kind in (R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT) and sym in names:
                    obj.relocations.append(Relocation(names[sym], offset, kind, addend))
        if section.name in (".plt", ".plt.sec", ".plt.got"):
            obj.plt_ranges.append((section["sh_addr"], section["sh_addr"] + section["sh_size"]))
    return obj


def _unpack_rela(data: bytes):  # type: ignore[no-untyped-def]
    for entry in struct.iter_unpack("<QQq", data[: len(data) - len(data) % 24]):
        yield (entry,)


def _dynamic_symbols(elf: ELFFile) -> tuple[dict[str, list[Symbol]], dict[int, str], dict[int, str], bool]:
    dynsym = elf.get_section_by_name(".dynsym")
    if dynsym is None:
        return {}, {}, {}, False
    strtab = elf.get_section(dynsym["sh_link"]).data()
    versym_section = elf.get_section_by_name(".gnu.version")
    versym = [v for (v,) in struct.iter_unpack("<H", versym_section.data())] if versym_section is not None else []
    version_names: dict[int, str] = {}
    version_files: dict[int, str] = {}
    verdef = elf.get_section_by_name(".gnu.version_d")
    if verdef is not None:
        for definition, auxiliaries in verdef.iter_versions():
            if definition["vd_flags"] & 0x1:        # VER_FLG_BASE: the soname, never matched as a version
                continue
            for aux in auxiliaries:
                version_names[definition["vd_ndx"]] = aux.name
                break
    verneed = elf.get_section_by_name(".gnu.version_r")
    if verneed is not None:
        for need, auxiliaries in verneed.iter_versions():
            for aux in auxiliaries:
                version_names[aux["vna_other"]] = aux.name
                version_files[aux["vna_other"]] = need.name
    symbols: dict[str, list[Symbol]] = {}
    data = dynsym.data()
    for index, (name_offset, info, _other, shndx, value, _size) in enumerate(
            struct.iter_unpack("<IBBHQQ", data[: len(data) - len(data) % 24])):
        if index == 0:
            continue
        end = strtab.find(b"\0", name_offset)
        name = strtab[name_offset:end].decode("utf-8", "replace")
        version = versym[index] if index < len(versym) else 1
        symbols.setdefault(name, []).append(Symbol(
            index=index, name=name, value=value, defined=shndx != SHN_UNDEF, type=info & 0xF, bind=info >> 4,
            version_index=version & 0x7FFF, hidden=bool(version & VERSYM_HIDDEN)))
    return symbols, version_names, version_files, bool(versym)


def _allocators_linked_in(elf: ELFFile, handle, obj: ElfObject) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Allocators compiled into this file: by their exported or internal symbols and the strings they print
    (which survive stripping), with a version when the file carries one."""
    found: dict[str, str] = {}
    defined = {name for name, syms in obj.symbols.items() if any(s.defined for s in syms)}
    internal: set[str] = set()
    symtab = elf.get_section_by_name(".symtab")
    if symtab is not None:
        strtab = elf.get_section(symtab["sh_link"]).data()
        data = symtab.data()
        for name_offset, _info, _other, shndx, _value, _size in struct.iter_unpack(
                "<IBBHQQ", data[: len(data) - len(data) % 24]):
            if shndx != SHN_UNDEF and name_offset:
                end = strtab.find(b"\0", name_offset)
                internal.add(strtab[name_offset:end].decode("utf-8", "replace"))
    for allocator, names in _ALLOCATOR_SYMBOLS:
        exported = [n for n in names if n in defined]
        hidden = [n for n in names if n in internal and n not in defined]
        if exported:
            found[allocator] = f"exports {', '.join(exported[:3])}"
        elif hidden:
            found[allocator] = f"defines {', '.join(hidden[:3])} (internal symbols)"
    rodata = b""
    for name in (".rodata", ".rodata.str1.1", ".rodata.str1.8", ".rodata.cst"):
        section = elf.get_section_by_name(name)
        if section is not None and section["sh_type"] != "SHT_NOBITS":
            handle.seek(section["sh_offset"])
            rodata += handle.read(min(section["sh_size"], _MAX_SCAN))
    if not rodata:  # no section headers (sstrip): the whole file
        handle.seek(0)
        rodata = handle.read(_MAX_SCAN)
    for allocator, marker in _FINGERPRINTS:
        if allocator not in found and marker in rodata:
            found[allocator] = f"contains the string {marker.decode().strip()!r}"
    versions = {"jemalloc": _JEMALLOC_VERSION, "mimalloc": _MIMALLOC_VERSION, "tcmalloc": _TCMALLOC_VERSION}
    for allocator in list(found):
        match = versions[allocator].search(rodata)
        if match:
            found[allocator] += f"; version {match.group(1).decode()}"
    return found


def object_name(path: str) -> str:
    return Path(path).name
