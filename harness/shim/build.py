"""Build the fault shim (shim.c) once per source version, into a cache directory.

The library is compiled with the system C compiler the first time it is needed and reused after
that: the file name carries a hash of the source, the flags and the compiler's path, so an edited
source or another compiler gives a new file and an old one is never used by mistake. The compiler
writes to a temporary name in the cache directory, which is then renamed into place, so concurrent
builds (two harness runs starting together) never see a half-written library.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

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


def ensure_shim(*, source: Path | None = None, cache: Path | None = None) -> Path:
    """Return the path of the built shim, compiling it first if this version is not cached.

    Raises ShimBuildError (one line, with the compiler's first error) when it cannot be built.
    """
    src = source or SOURCE
    try:
        text = src.read_bytes()
    except OSError as e:
        raise ShimBuildError(f"cannot read shim source {src}: {e.strerror}") from None
    compiler = find_compiler()
    key = hashlib.sha256()
    for part in (text, "\0".join(compiler).encode(), "\0".join(CFLAGS + LIBS).encode()):
        key.update(part)
        key.update(b"\0")
    out_dir = cache or cache_dir()
    out = out_dir / f"{LIB_PREFIX}{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShimBuildError(f"cannot create cache directory {out_dir}: {e.strerror}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{LIB_PREFIX}", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    argv = [*compiler, *CFLAGS, "-o", str(tmp), str(src), *LIBS]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LC_ALL": "C"})
        if proc.returncode != 0:
            raise ShimBuildError(f"compiling the fault shim failed ({Path(compiler[0]).name}): "
                                 f"{_first_error(proc.stderr)}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except subprocess.TimeoutExpired:
        raise ShimBuildError(f"compiling the fault shim timed out: {' '.join(argv)}") from None
    except OSError as e:
        raise ShimBuildError(f"cannot run the compiler {compiler[0]}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out
