"""Which object provides malloc & co. to a host's executable: computed from the ELF files by the dynamic
linker's rules (scope.py) and, in a live process, read back from the executable's resolved GOT slots.

A proof names, for each of PROVEN, the object the executable's reference binds to, the allocator that
object is, and where it comes from: ``static in executable`` (the executable defines it, so nothing can
interpose it), ``preload``, ``linked library`` (a DT_NEEDED allocator such as redis's libjemalloc.so.2) or
``glibc``. When the harness's fault shim is what malloc binds to, the allocator is the one behind it (the
next definition in scope: what its dlsym(RTLD_NEXT) finds). It also lists allocators that are in the
process but not bound, and warns about mixed bindings: an allocator-specific function the executable
imports (nallocx, mallctl, malloc_stats_print, tc_*, mi_*...) or one of PROVEN bound to a different
allocator than malloc.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from harness.collect.proof.elf import R_X86_64_64, R_X86_64_JUMP_SLOT, ElfObject, ElfReadError, load
from harness.collect.proof.live import (Mapping, file_identity, link_map, load_bias, mapping_at, read_environ, read_maps,
                                        read_words, secure_execution)
from harness.collect.proof.scope import Scope, ScopeEntry, build_scope, lookup, split_preload

PROVEN = ("malloc", "free", "calloc", "realloc", "posix_memalign", "aligned_alloc", "malloc_usable_size", "_Znwm")
ALLOCATOR_SPECIFIC = ("nallocx", "mallctl", "mallctlnametomib", "mallctlbymib", "malloc_stats_print", "mallocx",
                      "rallocx", "xallocx", "sallocx", "dallocx", "sdallocx", "malloc_conf")
ALLOCATOR_PREFIXES = ("je_", "tc_", "mi_")
KNOWN_ALLOCATORS = ("glibc", "jemalloc", "tcmalloc", "mimalloc")
SHIM = "fault shim"
_LIBRARY_MARKERS = (("jemalloc", "libjemalloc"), ("tcmalloc", "libtcmalloc"), ("mimalloc", "libmimalloc"))


def _shim_prefix() -> str:
    from harness.shim.build import LIB_PREFIX
    return LIB_PREFIX


def allocator_of(entry: ScopeEntry) -> str:
    """The allocator an object in scope is: by name for libraries, by what is linked in for the executable."""
    obj = entry.obj
    if entry.origin == "executable":
        linked = list(obj.static_allocators)
        if len(linked) == 1:
            return linked[0]
        if len(linked) > 1:
            return "+".join(sorted(linked))
        return "glibc" if obj.is_static else "its own malloc"
    names = [os.path.basename(entry.path), obj.soname or "", entry.requested]
    if any(n.startswith(_shim_prefix()) for n in names):
        return SHIM
    if any(n.startswith(("libc.so", "ld-linux")) for n in names):
        return "glibc"
    for allocator, marker in _LIBRARY_MARKERS:
        if any(marker in n for n in names):
            return allocator
    defined = {name for name, syms in obj.symbols.items() if any(s.defined for s in syms)}
    if defined & {"mallctl", "je_malloc"}:
        return "jemalloc"
    if "tc_malloc" in defined:
        return "tcmalloc"
    if "mi_malloc" in defined:
        return "mimalloc"
    return os.path.basename(entry.path)


def source_of(entry: ScopeEntry, allocator: str) -> str:
    if entry.origin == "executable":
        return "static in executable"
    if entry.origin == "preload":
        return "preload"
    if allocator == "glibc":
        return "glibc"
    return "linked library"


@dataclass
class SymbolProof:
    symbol: str
    imported: bool                     # the executable refers to it (else: what the global scope gives)
    version: str | None
    object: str | None                 # path of the providing object (None: not defined anywhere in scope)
    allocator: str | None
    source: str | None
    via_shim: bool = False             # the executable's reference binds to the fault shim, which forwards here
    got: list[dict[str, Any]] = field(default_factory=list)   # live: what the slots hold

    def to_dict(self) -> dict[str, Any]:
        return {"imported": self.imported, "version": self.version, "object": self.object,
                "allocator": self.allocator, "source": self.source, "via_shim": self.via_shim, "got": self.got}


@dataclass
class Proof:
    stage: str                         # "exec" (from the files, before it ran) | "ready" (live process) | "error"
    executable: str
    pid: int | None = None
    preload: list[str] = field(default_factory=list)
    allocator: str = "unknown"         # what malloc is bound to (behind the fault shim)
    source: str = "unknown"            # static in executable | preload | linked library | glibc | unknown
    object: str | None = None          # the file that provides malloc
    shim: bool = False                 # malloc goes through the harness's fault shim
    symbols: dict[str, SymbolProof] = field(default_factory=dict)
    mapped_unbound: list[dict[str, str]] = field(default_factory=list)
    static_allocators: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    got_check: str = "not read"        # agrees | disagrees | not read (why in got_note)
    got_note: str = ""
    scope: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "executable": self.executable, "pid": self.pid, "preload": self.preload,
                "allocator": self.allocator, "source": self.source, "object": self.object, "shim": self.shim,
                "symbols": {k: v.to_dict() for k, v in self.symbols.items()},
                "mapped_unbound": self.mapped_unbound, "static_allocators": self.static_allocators,
                "warnings": self.warnings, "got_check": self.got_check, "got_note": self.got_note,
                "scope": self.scope, "missing": self.missing, "errors": self.errors}

    def summary(self) -> str:
        return summarize(self.to_dict())


def summarize(proof: dict[str, Any]) -> str:
    """One line: 'malloc -> tcmalloc (preload: libtcmalloc_minimal.so.4); mapped, not bound: jemalloc'."""
    if proof.get("allocator") in (None, "unknown"):
        return "unknown" + (f" ({'; '.join(proof['errors'])})" if proof.get("errors") else "")
    where = os.path.basename(proof["object"]) if proof.get("object") else "?"
    text = f"malloc -> {proof['allocator']} ({proof['source']}: {where})"
    if proof.get("shim"):
        text += " through the fault shim"
    unbound = sorted({m["allocator"] for m in proof.get("mapped_unbound", [])})
    if unbound:
        text += f"; mapped, not bound: {', '.join(unbound)}"
    return text


def prove_files(executable: str, env: dict[str, str], *, secure: bool = False,
                shown: str | None = None) -> tuple[Proof, Scope | None]:
    """The binding from the ELF files alone (the process's executable and environment); ``shown``: the
    executable's name in messages when ``executable`` is a /proc/PID/exe link."""
    shown = shown or executable
    proof = Proof(stage="exec", executable=shown)
    try:
        scope = build_scope(executable, env, secure=secure)
    except ElfReadError as exc:
        proof.stage = "error"
        proof.errors.append(str(exc))
        return proof, None
    exe = scope.entries[0].obj
    proof.preload = list(scope.preload)
    proof.scope = [e.path for e in scope.entries]
    proof.missing = list(scope.missing)
    proof.static_allocators = dict(exe.static_allocators)
    proof.scope[0] = shown
    imported_specific = [n for n in exe.imported_names()
                         if n in ALLOCATOR_SPECIFIC or n.startswith(ALLOCATOR_PREFIXES)]
    for name in PROVEN + tuple(n for n in imported_specific if n not in PROVEN):
        if exe.is_static:   # no dynamic linking: every call stays inside the executable
            allocator = allocator_of(scope.entries[0])
            proof.symbols[name] = SymbolProof(name, False, None, shown, allocator, "static in executable")
        else:
            proof.symbols[name] = _prove_symbol(scope, exe, name)
            if proof.symbols[name].object == executable:
                proof.symbols[name].object = shown
    malloc = proof.symbols["malloc"]
    if malloc.object is not None:
        proof.allocator, proof.source, proof.object = malloc.allocator or "unknown", malloc.source or "unknown", \
            malloc.object
        proof.shim = malloc.via_shim
    if exe.is_static and scope.preload:
        proof.warnings.append(f"{shown} is statically linked: there is no dynamic linker, LD_PRELOAD is ignored")
    _mixed(proof)
    return proof, scope


def _prove_symbol(scope: Scope, exe: ElfObject, name: str) -> SymbolProof:
    reference = exe.imports(name)
    requested = exe.requested_version(reference) if reference is not None else None
    version = requested[0] if requested else None
    binding = lookup(scope, name, version, plt=reference is not None)
    if binding.entry is None:
        return SymbolProof(name, reference is not None, version, None, None, None)
    entry = scope.entries[binding.entry]
    allocator = allocator_of(entry)
    via_shim = False
    if allocator == SHIM:
        # The shim forwards with dlsym(RTLD_NEXT): the next definition after it in the same scope.
        behind = lookup(scope, name, None, plt=False, start=binding.entry + 1)
        if behind.entry is not None:
            via_shim = True
            entry = scope.entries[behind.entry]
            allocator = allocator_of(entry)
    return SymbolProof(name, reference is not None, version, entry.path, allocator, source_of(entry, allocator),
                       via_shim)


def _mixed(proof: Proof) -> None:
    malloc = proof.symbols.get("malloc")
    if malloc is None or malloc.allocator is None:
        return
    for name, sym in proof.symbols.items():
        if name == "malloc" or sym.allocator is None or sym.allocator == malloc.allocator:
            continue
        if name in PROVEN and not sym.imported and name not in ("free", "calloc", "realloc"):
            continue   # not used by the executable, and another allocator may simply not define it
        if name in PROVEN or sym.imported:
            proof.warnings.append(
                f"mixed binding: malloc -> {malloc.allocator} ({malloc.source}) but {name} -> {sym.allocator} "
                f"({sym.source}: {os.path.basename(sym.object or '?')})")


def prove_process(pid: int, executable: str | None = None) -> Proof:
    """The proof of a live process: its scope from /proc/PID/exe and /proc/PID/environ, then the GOT read back."""
    try:
        exe_path = executable or os.readlink(f"/proc/{pid}/exe")
        env = read_environ(pid)
        maps = read_maps(pid)
    except OSError as exc:
        proof = Proof(stage="error", executable=executable or "?", pid=pid)
        proof.errors.append(f"cannot read /proc/{pid}: {exc.strerror or exc}")
        return proof
    # /proc/PID/exe names the file as it was opened; read it there even when it was replaced since.
    exe_file = f"/proc/{pid}/exe" if executable is None else exe_path
    env, preload_note = _actual_preload(pid, exe_file, env, maps)
    proof, scope = prove_files(exe_file, env, secure=bool(secure_execution(pid)),
                               shown=exe_path.removesuffix(" (deleted)"))
    if preload_note:
        proof.missing.append(preload_note)
    proof.stage = "ready" if proof.stage != "error" else "error"
    proof.pid = pid
    if scope is None:
        return proof
    _unbound(proof, scope, maps)
    try:
        _check_got(proof, scope, pid, maps)
    except OSError as exc:
        proof.got_check, proof.got_note = "not read", f"cannot read /proc/{pid}/mem: {exc.strerror or exc}"
    return proof


def _actual_preload(pid: int, exe_file: str, env: dict[str, str],
                    maps: list[Mapping]) -> tuple[dict[str, str], str]:
    """The environment with LD_PRELOAD as ld.so really loaded it. /proc/PID/environ is the memory the process
    started with, which some rewrite (setproctitle); ld.so's link map says which objects it loaded before the
    executable's own DT_NEEDED libraries: those are the preloads."""
    try:
        exe = load(exe_file)
    except ElfReadError:
        return env, ""
    bias = load_bias(maps, exe.identity, exe.first_vaddr)
    chain = link_map(pid, bias + exe.dynamic_vaddr) if bias is not None and exe.dynamic_vaddr is not None else None
    if chain is None:
        return env, ("" if "LD_PRELOAD" in env else
                     "LD_PRELOAD: the environment shows none and ld.so's link map could not be read")
    loaded = [name for name in chain[1:] if name.startswith("/")]
    loaded_ids = {_identity(name) for name in loaded}
    declared = split_preload(env.get("LD_PRELOAD", ""))
    if declared:
        # Declared and loaded; ld.so skips (with a message on stderr) a preload it cannot load.
        kept = [p for p in declared if "/" not in p or _identity(p) in loaded_ids]
        dropped = [p for p in declared if p not in kept]
        env = dict(env, LD_PRELOAD=" ".join(kept))
        return env, (f"LD_PRELOAD entries ld.so did not load: {' '.join(dropped)}" if dropped else "")
    preloads = []
    for name in loaded:
        try:
            soname = load(name).soname
        except ElfReadError:
            break
        if soname in exe.needed or os.path.basename(name) in exe.needed:
            break
        preloads.append(name)
    if not preloads:
        return env, ""
    return dict(env, LD_PRELOAD=" ".join(preloads)), (
        "LD_PRELOAD read from ld.so's link map (the process rewrote its environment)")


def _unbound(proof: Proof, scope: Scope, maps: list[Mapping]) -> None:
    """Allocators in the process (in scope, or mapped later by dlopen) that malloc is not bound to."""
    seen: set[str] = set()
    for entry in scope.entries[1:]:
        allocator = allocator_of(entry)
        if allocator in ("jemalloc", "tcmalloc", "mimalloc") and allocator != proof.allocator and \
                entry.path not in seen:
            seen.add(entry.path)
            proof.mapped_unbound.append({"allocator": allocator, "path": entry.path, "how": entry.origin})
    in_scope = {e.obj.identity for e in scope.entries}
    for mapping in maps:
        name = os.path.basename(mapping.path)
        if not mapping.inode or file_identity(mapping) in in_scope or mapping.path in seen:
            continue
        for allocator, marker in _LIBRARY_MARKERS:
            if marker in name and allocator != proof.allocator:
                seen.add(mapping.path)
                proof.mapped_unbound.append({"allocator": allocator, "path": mapping.path, "how": "dlopen"})
    if proof.allocator == "unknown":
        return
    for allocator, evidence in proof.static_allocators.items():
        if allocator != proof.allocator:
            proof.mapped_unbound.append({"allocator": allocator, "path": proof.executable,
                                         "how": f"linked in ({evidence})"})


def _check_got(proof: Proof, scope: Scope, pid: int, maps: list[Mapping]) -> None:
    exe = scope.entries[0].obj
    bias = load_bias(maps, exe.identity, exe.first_vaddr)
    if bias is None:
        proof.got_check, proof.got_note = "not read", "the executable's mapping was not found in /proc/PID/maps"
        return
    wanted = [r for r in exe.relocations if r.symbol in proof.symbols]
    if not wanted:
        proof.got_check = "agrees" if proof.source == "static in executable" else "not read"
        proof.got_note = "no GOT slots: the executable calls its own definitions directly"
        return
    values = read_words(pid, [bias + r.offset for r in wanted])
    by_identity = {e.obj.identity: i for i, e in enumerate(scope.entries)}
    disagreements, checked = [], 0
    for relocation in wanted:
        sym = proof.symbols[relocation.symbol]
        value = values.get(bias + relocation.offset)
        slot: dict[str, Any] = {"slot": hex(bias + relocation.offset),
                                "type": "JUMP_SLOT" if relocation.type == R_X86_64_JUMP_SLOT else
                                "GLOB_DAT" if relocation.type != R_X86_64_64 else "64"}
        if value is None:
            slot["state"] = "unreadable"
            sym.got.append(slot)
            continue
        if relocation.type == R_X86_64_64:
            value -= relocation.addend
        slot["value"] = hex(value)
        mapping = mapping_at(maps, value)
        if mapping is None or not mapping.inode:
            slot["state"] = "points to no file"
            sym.got.append(slot)
            disagreements.append(f"{relocation.symbol}: slot holds {value:#x}, in no mapped file")
            continue
        identity = file_identity(mapping)
        if identity == exe.identity and any(lo <= value - bias < hi for lo, hi in exe.plt_ranges):
            slot["state"] = "lazy (not called yet)"
            sym.got.append(slot)
            continue
        slot["object"] = mapping.path
        index = by_identity.get(identity)
        if index is not None:
            entry = scope.entries[index]
            obj_bias = load_bias(maps, identity, entry.obj.first_vaddr)
            if obj_bias is not None:
                name = entry.obj.symbol_at(value - obj_bias)
                if name:
                    slot["function"] = name
        bound_to = _shim_target(sym, scope) if sym.via_shim else sym.object
        expected = _identity(bound_to)
        checked += 1
        if expected is not None and identity == expected:
            slot["state"] = "bound, agrees"
        else:
            slot["state"] = "bound, disagrees"
            disagreements.append(f"{relocation.symbol}: the GOT points into {mapping.path}, ld.so's rules give "
                                 f"{bound_to or 'nothing'}")
        sym.got.append(slot)
    if disagreements:
        proof.got_check = "disagrees"
        proof.got_note = "; ".join(disagreements)
        proof.warnings.append("the resolved GOT disagrees with the dynamic linker's rules: " + proof.got_note)
    elif checked:
        proof.got_check = "agrees"
        proof.got_note = f"{checked} bound slot(s) read from /proc/{pid}/mem"
    else:
        proof.got_check, proof.got_note = "not read", "no slot bound yet (lazy binding)"


def _shim_target(sym: SymbolProof, scope: Scope) -> str | None:
    """The object the executable's slot points to when the shim interposes: the shim itself."""
    binding = lookup(scope, sym.symbol, sym.version, plt=True)
    return scope.entries[binding.entry].path if binding.entry is not None else None


def _identity(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# --- what a variant asks for, and whether the proof shows it -------------------------------------------------

def cannot_preload(executable: str) -> str | None:
    """Why no allocator preload can replace this executable's malloc (None: a preload can work)."""
    try:
        exe = load(executable, fingerprint=True)
    except ElfReadError:
        return None
    if exe.is_static:
        return (f"{executable} is statically linked (no dynamic linker), so LD_PRELOAD is ignored: use a `build` "
                f"variant (a command or build that links each allocator) to compare allocators")
    if exe.definitions("malloc") or exe.static_allocators:
        linked = ", ".join(f"{name} ({why})" for name, why in exe.static_allocators.items()) or \
            "an allocator (it defines malloc)"
        return (f"{executable} has {linked} linked in statically, and its own allocator wins over any "
                f"LD_PRELOAD: use a `build` variant (a command or build that links each allocator) to compare "
                f"allocators")
    return None


def refusal(executable: str, wanted: str) -> str | None:
    """Before the night: why a variant asking for allocator ``wanted`` cannot get it with this executable (None:
    it can, as far as the files tell). Any preload is refused against a linked-in allocator, and so is `glibc`
    (the executable keeps its own); a fully static executable is still glibc, so only `glibc` may stand."""
    try:
        exe = load(executable, fingerprint=True)
    except ElfReadError:
        return None
    if exe.is_static and not exe.static_allocators and wanted == "glibc":
        return None
    return cannot_preload(executable)


def contradiction(proof: dict[str, Any], wanted: str) -> str | None:
    """Why this proof does not show the allocator a variant asked for (None: it does)."""
    bound = proof.get("allocator")
    if bound in (None, "unknown"):
        return None
    if wanted in KNOWN_ALLOCATORS:
        if bound == wanted:
            return None
    else:
        expected = _identity(wanted)
        if expected is not None and expected == _identity(proof.get("object")):
            return None
    why = f"malloc is bound to {bound} ({proof.get('source')}: {proof.get('object')})"
    if proof.get("source") == "static in executable" or proof.get("static_allocators"):
        reason = cannot_preload(proof.get("executable") or "") or ""
        return f"{why}; {reason}" if reason else why
    return why
