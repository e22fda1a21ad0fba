"""Build the fault shim (shim.c) once per source version, into a cache directory, and check it
before every use: it is preloaded into targets that run as root.

The library is compiled with the system C compiler the first time it is needed and reused after
that. The cache folder must be the harness user's (made 0700) and nobody else may be able to change it
or any folder above it (harness.base.safefs): a library another user could plant or swap would run as root
in every target. Each build is named by the hash of its own content (``libharness-shim-<sha256>.so``),
and ``libharness-shim-<key>.sha256`` (key: a hash of the source, the flags and the compiler's path, so
an edited source or another compiler builds anew) names the build to use. Before every use the
library must be a regular file of ours, not writable by group or others, whose content still hashes
to its name; otherwise it is rebuilt (and a folder that fails the check is refused, with one line).
The compiler writes to a temporary name which is then renamed into place, so concurrent builds (two
harness runs starting together) never see a half-written library.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

from harness.base import safefs

SOURCE = Path(__file__).with_name("shim.c")
# -fexceptions: the C++ operator new wrapper needs a cleanup that runs while bad_alloc unwinds
# through it (this makes the library depend on libgcc_s.so.1, present wherever gcc's runtime is).
# -fvisibility=hidden: only the interposed functions are exported.
# -z now: bind the shim's own calls (dlsym, log, ...) at load time, never lazily inside a malloc.
CFLAGS = ("-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-fexceptions", "-Wall", "-Wl,-z,now")
LIBS = ("-ldl", "-lm", "-pthread")
LIB_PREFIX = "libharness-shim-"


class ShimBuildError(RuntimeError):
    """The shim could not be built; the message is one line saying why."""


def cache_dir() -> Path:
    """`$HARNESS_CACHE`, else `~/.cache/harness`."""
    env = os.environ.get("HARNESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "harness"


def find_compiler() -> list[str]:
    """The C compiler as an argv prefix: `$CC` if set, else `cc`, `gcc` or `clang` from PATH."""
    env = os.environ.get("CC")
    if env:
        argv = shlex.split(env)
        if argv and shutil.which(argv[0]):
            return [shutil.which(argv[0]) or argv[0], *argv[1:]]
        raise ShimBuildError(f"no C compiler: $CC={env!r} is not an executable on PATH")
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise ShimBuildError("no C compiler found (looked for $CC, cc, gcc, clang); install gcc")


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\b(error|fatal error):", ln):
            return ln
    return lines[0] if lines else "no diagnostic"


def cache_key(source: Path | None = None, compiler: list[str] | None = None) -> str:
    """What names a build: a hash of the source, the compiler's path and the flags."""
    src = source or SOURCE
    try:
        text = src.read_bytes()
    except OSError as e:
        raise ShimBuildError(f"cannot read shim source {src}: {e.strerror}") from None
    key = hashlib.sha256()
    for part in (text, "\0".join(compiler or find_compiler()).encode(), "\0".join(CFLAGS + LIBS).encode()):
        key.update(part)
        key.update(b"\0")
    return key.hexdigest()[:16]


def ensure_shim(*, source: Path | None = None, cache: Path | None = None) -> Path:
    """Return the path of the built shim, verified (see the module docstring), compiling it first if this
    version is not cached or the cached file is not one we can trust.

    Raises ShimBuildError (one line: the compiler's first error, or why the cache is refused).
    """
    src = source or SOURCE
    compiler = find_compiler()
    key = cache_key(src, compiler)
    out_dir = cache or cache_dir()
    try:
        dir_fd = safefs.open_trusted_dir(out_dir, create=True, what="shim cache")
    except safefs.Untrusted as e:
        raise ShimBuildError(f"{e}: refusing to preload a library from there; set HARNESS_CACHE to a folder "
                             f"only you or root can write") from None
    except OSError as e:
        raise ShimBuildError(f"cannot create cache directory {out_dir}: {e.strerror or e}") from None
    try:
        pointer = f"{LIB_PREFIX}{key}.sha256"
        cached = _cached(dir_fd, pointer)
        if cached is not None:
            return out_dir / cached
        return out_dir / _build(dir_fd, out_dir, src, compiler, pointer)
    finally:
        os.close(dir_fd)


def _cached(dir_fd: int, pointer: str) -> str | None:
    """The library `pointer` names, if it is still what was built: else None (it is rebuilt)."""
    try:
        fd = os.open(pointer, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if _untrusted_file(os.fstat(fd)):
            return None
        name = os.read(fd, 256).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not re.fullmatch(rf"{LIB_PREFIX}[0-9a-f]{{64}}\.so", name):
        return None
    return name if verify(dir_fd, name) else None


def _untrusted_file(st: os.stat_result) -> bool:
    return not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid() or bool(st.st_mode & 0o022)


def verify(dir_fd: int, name: str) -> bool:
    """The library `name` in the cache: a regular file of ours (one link, not group/other-writable) whose
    content hashes to the digest in its name."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if _untrusted_file(os.fstat(fd)):
            return False
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    finally:
        os.close(fd)
    return name == f"{LIB_PREFIX}{digest.hexdigest()}.so"


def verify_path(library: Path) -> bool:
    """verify() by path (its folder is checked again too): for the moment before a target preloads it."""
    try:
        dir_fd = safefs.open_trusted_dir(library.parent, what="shim cache")
    except (safefs.Untrusted, OSError):
        return False
    try:
        return verify(dir_fd, library.name)
    finally:
        os.close(dir_fd)


def _build(dir_fd: int, out_dir: Path, src: Path, compiler: list[str], pointer: str) -> str:
    tmp_name = f".{LIB_PREFIX}{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp = out_dir / tmp_name
    argv = [*compiler, *CFLAGS, "-o", str(tmp), str(src), *LIBS]
    try:
        os.close(safefs.create_at(dir_fd, tmp_name, 0o700))  # ours, new; the compiler rewrites it in place
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LC_ALL": "C"})
        if proc.returncode != 0:
            raise ShimBuildError(f"compiling the fault shim failed ({Path(compiler[0]).name}): "
                                 f"{_first_error(proc.stderr)}")
        fd = os.open(tmp_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if _untrusted_file(os.fstat(fd)):
                raise ShimBuildError(f"the compiled shim {tmp} is not a plain file of ours")
            os.fchmod(fd, 0o755)
            digest = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
        finally:
            os.close(fd)
        name = f"{LIB_PREFIX}{digest.hexdigest()}.so"
        os.rename(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        safefs.replace_at(dir_fd, pointer, (name + "\n").encode(), 0o644)
    except subprocess.TimeoutExpired:
        raise ShimBuildError(f"compiling the fault shim timed out: {' '.join(argv)}") from None
    except OSError as e:
        raise ShimBuildError(f"cannot build the shim in {out_dir}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp_name, dir_fd=dir_fd)
        except OSError:
            pass
    if not verify(dir_fd, name):
        raise ShimBuildError(f"the shim just built in {out_dir} does not verify (changed under us?)")
    return name
