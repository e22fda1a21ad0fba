"""The global lookup scope of a dynamically linked process, and symbol lookup in it, as glibc's ld.so does it.

Scope (elf/rtld.c, dl-deps.c): the executable, then the LD_PRELOAD objects in order (then those of
/etc/ld.so.preload), then the DT_NEEDED libraries breadth-first over that list; an object already in the
list (same name, soname or file) is not added twice.

Library search for a name without a slash (dl-load.c ``_dl_map_object``): DT_RPATH of the requester and of
the objects that loaded it up to the executable (only when the requester has no DT_RUNPATH), then
LD_LIBRARY_PATH, then the requester's DT_RUNPATH, then /etc/ld.so.cache, then the default directories
(skipped with DF_1_NODEFLIB). $ORIGIN, $LIB and $PLATFORM are expanded. glibc-hwcaps subdirectories are
not searched (Debian installs none of the allocators there).

Lookup (dl-lookup.c ``do_lookup_x``/``check_match``): the first object in scope order with an acceptable
definition wins. A definition is acceptable when it is defined (a PLT reference never binds to an
undefined symbol), has a non-zero value, an allowed type, and a matching version: a versioned reference
takes the same version, or the base/unversioned definition when that is not hidden; an unversioned
reference takes a definition of version index 0-2 (the oldest), or else the only non-hidden versioned one
of that object. Weak definitions count as global (LD_DYNAMIC_WEAK unset), local ones never.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from harness.collect.proof.elf import (ALLOWED_STT, STB_GLOBAL, STB_GNU_UNIQUE, STB_WEAK, STT_TLS, ElfObject, ElfReadError,
                                       Symbol, is_elf64_x86, load)

DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib")
LIB_EXPANSION = "lib/x86_64-linux-gnu"
PLATFORM = "x86_64"
LD_SO_CACHE = "/etc/ld.so.cache"
LD_SO_PRELOAD = "/etc/ld.so.preload"


@dataclass
class ScopeEntry:
    obj: ElfObject
    requested: str                   # the name it was asked for (a DT_NEEDED or LD_PRELOAD entry, or the exe)
    origin: str                      # "executable" | "preload" | "needed"
    loader: int | None = None        # index of the entry whose DT_NEEDED brought it in
    names: set[str] = field(default_factory=set)

    @property
    def path(self) -> str:
        return self.obj.path


@dataclass
class Scope:
    entries: list[ScopeEntry]
    preload: list[str]               # LD_PRELOAD entries as the process had them
    missing: list[str]               # preload or needed names that could not be found (with why)
    secure: bool = False

    def index_of(self, identity: tuple[int, int]) -> int | None:
        return next((i for i, e in enumerate(self.entries) if e.obj.identity == identity), None)


@dataclass(frozen=True)
class Binding:
    symbol: str
    entry: int | None                # index in the scope of the object that provides it (None: unresolved)
    version: str | None              # the version the reference asked for
    definition: Symbol | None = None


_cache_lock = threading.Lock()
_ld_cache: tuple[float, dict[str, str]] | None = None


def ld_so_cache() -> dict[str, str]:
    """name -> path for x86-64 libraries in /etc/ld.so.cache, as ``ldconfig -p`` lists them (first wins)."""
    global _ld_cache
    try:
        mtime = os.stat(LD_SO_CACHE).st_mtime
    except OSError:
        return {}
    with _cache_lock:
        if _ld_cache is not None and _ld_cache[0] == mtime:
            return _ld_cache[1]
    entries: dict[str, str] = {}
    for ldconfig in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if os.path.exists(ldconfig):
            try:
                out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                break
            for line in out.splitlines()[1:]:
                name, _, rest = line.strip().partition(" (")
                flags, _, path = rest.partition(") => ")
                if "x86-64" in flags and "hwcap" not in flags and path:
                    entries.setdefault(name, path.strip())
            break
    with _cache_lock:
        _ld_cache = (mtime, entries)
    return entries


def split_preload(value: str) -> list[str]:
    """LD_PRELOAD is split on spaces and colons (rtld.c)."""
    return [p for p in value.replace(":", " ").split() if p]


def _expand(entry: str, origin_dir: str) -> str:
    for token, value in (("$ORIGIN", origin_dir), ("${ORIGIN}", origin_dir), ("$LIB", LIB_EXPANSION),
                         ("${LIB}", LIB_EXPANSION), ("$PLATFORM", PLATFORM), ("${PLATFORM}", PLATFORM)):
        entry = entry.replace(token, value)
    return entry


def _dirs(paths: list[str] | None, owner: ElfObject) -> list[str]:
    origin = os.path.dirname(os.path.realpath(owner.path))
    return [_expand(p, origin) or "." for p in (paths or [])]


def find_library(name: str, requester: int, entries: list[ScopeEntry], ld_library_path: list[str],
                 secure: bool) -> str | None:
    """Where ld.so finds ``name`` asked for by entries[requester]."""
    if "/" in name:
        path = _expand(name, os.path.dirname(os.path.realpath(entries[requester].path)))
        return path if is_elf64_x86(path) else None
    owner = entries[requester].obj
    candidates: list[str] = []
    if owner.runpath is None:
        chain: int | None = requester
        seen = set()
        while chain is not None and chain not in seen:
            seen.add(chain)
            obj = entries[chain].obj
            if obj.runpath is None and obj.rpath:
                candidates += _dirs(obj.rpath, obj)
            chain = entries[chain].loader
        main = entries[0].obj
        if 0 not in seen and main.runpath is None and main.rpath:
            candidates += _dirs(main.rpath, main)
    if not secure:
        candidates += ld_library_path
    candidates += _dirs(owner.runpath, owner)
    for directory in candidates:
        path = os.path.join(directory, name)
        if is_elf64_x86(path):
            return path
    if owner.nodeflib:
        return None
    cached = ld_so_cache().get(name)
    if cached and is_elf64_x86(cached):
        return cached
    for directory in DEFAULT_DIRS:
        path = os.path.join(directory, name)
        if is_elf64_x86(path):
            return path
    return None


def build_scope(executable: str, env: dict[str, str], *, secure: bool = False,
                ld_so_preload: str | None = LD_SO_PRELOAD) -> Scope:
    """The process's global scope from its executable and environment (LD_PRELOAD, LD_LIBRARY_PATH)."""
    exe = load(executable, fingerprint=True)
    entries = [ScopeEntry(exe, executable, "executable", None, {executable, os.path.basename(executable)})]
    preload = split_preload(env.get("LD_PRELOAD", ""))
    scope = Scope(entries, preload, [], secure)
    if exe.is_static:
        return scope   # no dynamic linker: nothing else is loaded
    ld_library_path = [] if secure else [_expand(p, os.path.dirname(os.path.realpath(executable))) or "."
                                         for p in env.get("LD_LIBRARY_PATH", "").replace(";", ":").split(":") if p]
    extra: list[str] = []
    if ld_so_preload:
        try:
            extra = split_preload(Path(ld_so_preload).read_text(errors="replace").replace("\n", " "))
        except OSError:
            extra = []
    if secure and preload:
        # Secure execution (setuid, capabilities): ld.so drops LD_PRELOAD (but for setuid libraries in
        # system directories, which no allocator package installs).
        scope.missing += [f"{name} (preload: ignored in secure-execution mode)" for name in preload]
    for name in ([] if secure else preload) + extra:
        _add(scope, name, 0, "preload", ld_library_path)
    queue = deque(range(len(entries)))
    while queue:
        index = queue.popleft()
        for needed in entries[index].obj.needed:
            before = len(entries)
            _add(scope, needed, index, "needed", ld_library_path)
            if len(entries) > before:
                queue.append(len(entries) - 1)
    return scope


def _add(scope: Scope, name: str, loader: int, origin: str, ld_library_path: list[str]) -> None:
    entries = scope.entries
    for entry in entries:
        if name in entry.names or (entry.obj.soname and entry.obj.soname == name):
            entry.names.add(name)
            return
    path = find_library(name, loader, entries, ld_library_path, scope.secure)
    if path is None:
        scope.missing.append(f"{name} ({origin}: not found)")
        return
    try:
        obj = load(path)
    except ElfReadError as exc:
        scope.missing.append(f"{name} ({origin}: {exc})")
        return
    for entry in entries:
        if entry.obj.identity == obj.identity:   # the same file under another name
            entry.names.add(name)
            return
    entries.append(ScopeEntry(obj, name, origin, loader, {name, path} | ({obj.soname} if obj.soname else set())))


def _acceptable(sym: Symbol, obj: ElfObject, version: str | None, plt: bool) -> str:
    """"yes", "no", or "versioned" (a candidate only if it is the object's one non-hidden versioned symbol)."""
    if (sym.value == 0 and sym.type != STT_TLS) or (plt and not sym.defined) or not sym.defined:
        return "no"
    if sym.type not in ALLOWED_STT or sym.bind not in (STB_GLOBAL, STB_WEAK, STB_GNU_UNIQUE):
        return "no"
    if not obj.has_versym:
        return "yes"
    if version is not None:
        defined_as = obj.version_names.get(sym.version_index) if sym.version_index >= 2 else None
        if defined_as == version:
            return "yes"
        # Another version: accepted only when the definition is the base one and not hidden.
        return "yes" if defined_as is None and not sym.hidden else "no"
    if sym.version_index >= 3:
        return "versioned" if not sym.hidden else "no"
    return "yes"


def lookup(scope: Scope, name: str, version: str | None = None, *, plt: bool = True, start: int = 0) -> Binding:
    """The object ld.so binds ``name`` to, searching the scope from ``start`` (1 + the caller's index for
    dlsym(RTLD_NEXT))."""
    for index in range(start, len(scope.entries)):
        obj = scope.entries[index].obj
        versioned: list[Symbol] = []
        for sym in obj.symbols.get(name, ()):
            verdict = _acceptable(sym, obj, version, plt)
            if verdict == "yes":
                return Binding(name, index, version, sym)
            if verdict == "versioned":
                versioned.append(sym)
        if version is None and len(versioned) == 1:
            return Binding(name, index, version, versioned[0])
    return Binding(name, None, version, None)
