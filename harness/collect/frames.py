"""Stack frames as parsed from eu-stack/gdb, and the name rules shared by classification and signatures.

Kept separate from backtrace.py (which runs tools) so that classify.py and signature.py stay pure and
can be tested on hand-written frame lists.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FrameKind = Literal["app", "trampoline", "abort", "libc", "allocator", "shim", "unknown"]


@dataclass(frozen=True)
class Frame:
    function: str | None  # as the tool printed it (demangled); None for "??"
    module: str | None = None  # module (file) name, e.g. "libc.so.6" or the executable's name
    pc: int | None = None
    module_offset: int | None = None  # pc (or pc-1 for callers) relative to the module's load address
    source: str | None = None  # "file.c:12:3"
    index: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pc"] = hex(self.pc) if self.pc is not None else None
        d["module_offset"] = hex(self.module_offset) if self.module_offset is not None else None
        return d


@dataclass
class ThreadStack:
    tid: int | None
    frames: list[Frame] = field(default_factory=list)
    truncated: bool = False  # the tool stopped at its frame limit (deep recursion)

    def to_dict(self) -> dict[str, Any]:
        return {"tid": self.tid, "truncated": self.truncated, "frames": [f.to_dict() for f in self.frames]}


# --- name cleaning -----------------------------------------------------------------------------

# gcc/clang clone suffixes change with optimisation level and must not split a bucket.
_CLONE_SUFFIX = re.compile(r"(?:\.(?:isra|constprop|part|cold|lto_priv|localalias|clone|llvm|specialized)(?:\.\d+)*)+$")
_OFFSET = re.compile(r"\+(?:0x[0-9a-fA-F]+|\d+)$")  # gdb/eu-addr2line style "foo+0x1c"
_VERSION = re.compile(r"@@?[A-Za-z0-9_.]+$")  # symbol versions: memcpy@@GLIBC_2.14


def _strip_params(name: str) -> str:
    """Drop a trailing parameter list "(...)" of a demangled C++ name (keeping "operator()")."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        if name[i] == ")":
            depth += 1
        elif name[i] == "(":
            depth -= 1
            if depth == 0:
                return name if name[:i].endswith("operator") else name[:i]
    return name


def _strip_templates(name: str) -> str:
    """Collapse template arguments "<...>" to "<>" so that instantiations share a bucket."""
    op = name.find("operator")
    if op >= 0:  # operator<, operator<<, operator->: only the scope before the operator is stripped
        return _strip_templates(name[:op]) + name[op:] if op > 0 else name
    out: list[str] = []
    depth = 0
    for c in name:
        if c == "<":
            if depth == 0:
                out.append("<>")
            depth += 1
        elif c == ">" and depth > 0:
            depth -= 1
        elif depth == 0:
            out.append(c)
    return "".join(out)


def clean_function(name: str | None, *, keep_templates: bool = False) -> str | None:
    """Normalize a function name so that it is stable across builds: no offsets, clone suffixes,
    symbol versions, glibc's internal __GI_ aliases, parameter lists or (by default) template
    arguments. Returns None for unknown frames."""
    if name is None:
        return None
    n = name.strip()
    if not n or n in ("??", "<unknown>"):
        return None
    n = _OFFSET.sub("", n)
    n = _VERSION.sub("", n)
    n = n.replace("[abi:cxx11]", "")
    # C++: drop the parameter list and cv-qualifiers of a demangled name.
    for suffix in (" const", " volatile", " &&", " &"):
        if n.endswith(suffix):
            n = n[: -len(suffix)]
    n = _strip_params(n)
    if not keep_templates and "<" in n:
        n = _strip_templates(n)
    n = _CLONE_SUFFIX.sub("", n)
    # glibc's internal aliases (__GI_raise, __GI___libc_free) are the public function.
    if n.startswith("__GI_"):
        n = n[len("__GI_"):]
    return n.strip() or None


# --- frame categories ------------------------------------------------------------------------------

def _rx(*alts: str) -> re.Pattern[str]:
    return re.compile("^(?:" + "|".join(alts) + ")$")


_TRAMPOLINE = _rx(r"__restore_rt", r"<signal handler called>", r"__kernel_rt_sigreturn", r"_sigtramp")
_ABORT = _rx(
    r"abort", r"raise", r"__pthread_kill\w*", r"pthread_kill", r"__assert_fail\w*", r"__assert_perror_fail",
    r"__assert", r"__libc_message", r"__libc_fatal", r"__fortify_fail\w*", r"__chk_fail", r"__stack_chk_fail\w*",
    r"std::terminate", r"std::__terminate", r"__cxa_\w+", r"__gnu_cxx::__verbose_terminate_handler",
    r"std::__throw_\w+",
)
_ALLOCATOR = _rx(
    r"malloc", r"free", r"cfree", r"realloc", r"reallocarray", r"calloc", r"memalign", r"posix_memalign",
    r"aligned_alloc", r"valloc", r"pvalloc", r"malloc_usable_size", r"__libc_(?:malloc|free|calloc|realloc|memalign|valloc|pvalloc)",
    r"_int_\w+", r"malloc_\w+", r"tcache_\w+", r"sysmalloc", r"unlink_chunk", r"_mid_memalign", r"arena_get2?",
    r"operator new(?:\[\])?", r"operator delete(?:\[\])?", r"_Zn[wa]\w*", r"_Zd[la]\w*",
    # Allocator prefixes only where they are unambiguous: "tc_"/"mi_" alone would swallow
    # application functions (tc_parse, mi_handler). Shared-library allocators are caught by module.
    r"je_\w+", r"_?rjem_\w+", r"tcmalloc::.*",
    r"tc_(?:malloc|free|calloc|cfree|realloc|new|delete|newarray|deletearray|memalign|posix_memalign|pvalloc|valloc)\w*",
    r"_mi_\w+", r"mi_(?:malloc|zalloc|calloc|realloc|reallocf|free|expand|usable_size|heap|page|segment|arena|new|"
    r"rezalloc|recalloc|strdup|strndup|aligned|theap)\w*",
)
# libc string/memory routines, startup and thread entry: a fault there is the caller's bug.
_LIBC = _rx(
    r"mem(?:cpy|move|set|cmp|chr|rchr|mem|ccpy|pcpy)", r"bcmp", r"bcopy", r"bzero", r"wmem\w+",
    r"str(?:len|nlen|cmp|ncmp|casecmp|ncasecmp|cpy|ncpy|cat|ncat|chr|rchr|chrnul|str|casestr|dup|ndup|tok|tok_r|spn|cspn|pbrk|coll|xfrm|sep|lcpy|lcat)",
    r"stpn?cpy", r"wcs\w+", r"__(?:mem|str|stp|wcs|wmem|raw)\w+",
    r"__libc_\w+", r"_IO_\w+", r"_dl_\w+", r"_start", r"start_thread", r"__?clone3?",
    r"__futex\w+", r"__pthread_\w+", r"__lll_\w+",
)
# Module basenames whose frames are never the culprit (runtime, allocators) — covers stripped
# libraries whose internal functions have no recognisable names.
_RUNTIME_MODULE = re.compile(r"^(?:libc\.so|libc-2\.|libpthread|ld-linux|ld64\.so|libgcc_s|libstdc\+\+|libc\+\+|libc\+\+abi|linux-vdso|libdl)")
_ALLOCATOR_MODULE = re.compile(r"^lib(?:jemalloc|tcmalloc|mimalloc|hoard|tbbmalloc|snmalloc)")
_SHIM_MODULE = re.compile(r"shim", re.IGNORECASE)


def _basename(module: str | None) -> str:
    if not module:
        return ""
    return module.rsplit("/", 1)[-1]


def frame_kind(frame: Frame) -> FrameKind:
    """What a frame is, for skipping (signature) and for classification (abort/allocator in stack)."""
    name = clean_function(frame.function)
    mod = _basename(frame.module)
    if name is not None and _TRAMPOLINE.match(name):
        return "trampoline"
    if mod and _SHIM_MODULE.search(mod):
        return "shim"
    if _ALLOCATOR_MODULE.match(mod):
        return "allocator"
    if name is None:
        return "unknown"
    if _ABORT.match(name):
        return "abort"
    if _ALLOCATOR.match(name):
        return "allocator"
    if _LIBC.match(name) or _RUNTIME_MODULE.match(mod):
        return "libc"
    return "app"


def after_trampoline(frames: list[Frame]) -> list[Frame]:
    """Frames below the first signal trampoline: frames above it are a signal handler (a crash
    reporter, a handler that calls abort), not the crash."""
    for i, f in enumerate(frames):
        if frame_kind(f) == "trampoline":
            return frames[i + 1:]
    return frames


def leading_frames(frames: list[Frame]) -> list[Frame]:
    """The frames above the first application frame (after any signal trampoline): where the crash
    happened when it was not in application code (abort machinery, libc, allocator, shim)."""
    out = []
    for f in after_trampoline(frames):
        if frame_kind(f) == "app":
            break
        out.append(f)
    return out


def crashed_in_allocator(frames: list[Frame]) -> bool:
    """True when the crash happened inside allocator code (malloc/free internals, je_*, tc_*, mi_*),
    e.g. glibc's "double free detected" abort or a fault walking corrupted heap metadata."""
    return any(frame_kind(f) == "allocator" for f in leading_frames(frames))
