"""Where the kernel puts cores, finding the one a dead host left, and moving it into the results.

Hosts run in their own directories with RLIMIT_CORE raised, so with a plain file core_pattern
(``core``, ``core.%p``, ``core.%e.%p.%t``) the core lands in the host directory. A ``|`` pattern
pipes the core to a handler instead: systemd-coredump or apport keep it (use coredumpctl / /var/crash),
or our own handler (``harness cores install``, not this module) writes it where we say.

secure_core follows apport/systemd-coredump habits: O_NOFOLLOW everywhere, refuse non-regular files
and hard links to something else, create the destination with O_EXCL and mode 0600, cap the size.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
import socket
import stat
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
CORE_USES_PID = Path("/proc/sys/kernel/core_uses_pid")
# A pipe handler is ours when its program path contains this (the `harness cores install` handler).
HARNESS_HANDLER_MARKER = "harness"
# Filesystem timestamps lag the clock by up to a jiffy or so; allow that much before `since`.
MTIME_SLACK = 0.05
COPY_CHUNK = 1 << 20


def core_pattern() -> str:
    """The kernel's core_pattern, without the trailing newline ("" if unreadable)."""
    try:
        return CORE_PATTERN.read_text().rstrip("\n")
    except OSError:
        return ""


def _core_uses_pid() -> bool:
    try:
        return CORE_USES_PID.read_text().strip() not in ("", "0")
    except OSError:
        return False


@dataclass(frozen=True)
class CorePatternStatus:
    pattern: str
    kind: Literal["file", "pipe", "unknown"]
    owner: Literal["kernel", "harness", "systemd-coredump", "apport", "other", "unknown"]
    handler: str | None  # program of a pipe pattern
    per_host_dirs: bool  # a relative file pattern: each host's core lands in its own cwd
    uses_pid: bool  # the file name carries the pid (%p, or core_uses_pid=1)
    findable: bool  # find_core can locate cores under this pattern
    advice: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def core_pattern_status(pattern: str | None = None, *, uses_pid_sysctl: bool | None = None) -> CorePatternStatus:
    """Interpret a core_pattern (the current one by default)."""
    pat = core_pattern() if pattern is None else pattern
    sysctl_pid = _core_uses_pid() if uses_pid_sysctl is None else uses_pid_sysctl
    if not pat:
        return CorePatternStatus(pat, "unknown", "unknown", None, False, False, False,
                                 "cannot read /proc/sys/kernel/core_pattern")
    if pat.startswith("|"):
        argv = pat[1:].split()
        handler = argv[0] if argv else ""
        base = os.path.basename(handler)
        if HARNESS_HANDLER_MARKER in handler:
            return CorePatternStatus(pat, "pipe", "harness", handler, False, True, True,
                                     "our pipe handler writes cores where the run says")
        if "systemd-coredump" in base:
            owner: Literal["systemd-coredump", "apport", "other"] = "systemd-coredump"
            advice = ("cores go to systemd-coredump (coredumpctl; its ProcessSizeMax caps them); "
                      "`harness cores install` routes them to the run instead")
        elif "apport" in base:
            owner = "apport"
            advice = ("cores go to apport (/var/crash, and it drops repeats); "
                      "`harness cores install` routes them to the run instead")
        else:
            owner = "other"
            advice = f"cores are piped to {handler}; `harness cores install` routes them to the run instead"
        return CorePatternStatus(pat, "pipe", owner, handler, False, "%p" in pat or "%P" in pat, False, advice)
    uses_pid = "%p" in pat or sysctl_pid
    relative = not pat.startswith("/")
    advice = ("cores land in each host's directory" if relative
              else f"cores land in {os.path.dirname(pat) or '/'} for every host")
    if not uses_pid:
        advice += "; the name has no pid, so a second crash overwrites the first: secure cores promptly"
    return CorePatternStatus(pat, "file", "kernel", None, relative, uses_pid, True, advice)


def _expand(pattern: str, *, pid: int, uses_pid_sysctl: bool) -> str:
    """Turn a file core_pattern into a glob: known specifiers become their values, the others
    (%e comm, %t time, %s signal, %u uid, …, which we cannot know for certain) become "*"."""
    known = {"p": str(pid), "P": str(pid), "h": socket.gethostname(), "%": "%"}
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "%" and i + 1 < len(pattern):
            spec = pattern[i + 1]
            val = known.get(spec)
            out.append(glob_escape(val) if val is not None else "*")
            i += 2
            continue
        out.append(glob_escape(c))
        i += 1
    glob = "".join(out)
    # The kernel appends ".PID" when the pattern has no %p and core_uses_pid is set.
    if "%p" not in pattern and uses_pid_sysctl:
        glob += f".{pid}"
    return glob


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _regular_file_mtime(path: Path) -> float | None:
    try:
        st = os.lstat(path)  # never follow a symlink planted where a core should be
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    return st.st_mtime


def find_core(host_dir: Path, pid: int, since: float, *, pattern: str | None = None,
              uses_pid_sysctl: bool | None = None) -> Path | None:
    """The core the kernel wrote for ``pid``, which ran with cwd ``host_dir`` and started at
    ``since`` (time.time()). Handles ``core``, ``core.%p``, other %-templates (relative to host_dir
    or absolute) and core_uses_pid; falls back to the newest ``core*`` file in host_dir modified after
    ``since``. Pipe patterns write no file: only the fallback applies. Returns None if nothing fits."""
    host_dir = Path(host_dir)
    pat = core_pattern() if pattern is None else pattern
    sysctl_pid = _core_uses_pid() if uses_pid_sysctl is None else uses_pid_sysctl
    candidates: list[tuple[float, Path]] = []
    if pat and not pat.startswith("|"):
        glob = _expand(pat, pid=pid, uses_pid_sysctl=sysctl_pid)
        base = Path("/") if glob.startswith("/") else host_dir
        rel = glob.lstrip("/")
        candidates += _glob_files(base, rel, since)
    if not candidates:
        try:
            names = [n for n in os.listdir(host_dir) if n.startswith("core")]
        except OSError:
            names = []
        for n in names:
            p = host_dir / n
            mt = _regular_file_mtime(p)
            # The fallback is a guess by name: only accept ELF files (not core.log, core.json…).
            if mt is not None and mt >= since - MTIME_SLACK and _is_elf(p):
                candidates.append((mt, p))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def _is_elf(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.pread(fd, 4, 0) == b"\x7fELF"
    except OSError:
        return False
    finally:
        os.close(fd)


def _glob_files(base: Path, rel_glob: str, since: float) -> list[tuple[float, Path]]:
    """Match a glob component by component (os.listdir + fnmatch: no symlink following for the
    final component, no recursion beyond the pattern's depth)."""
    parts = [p for p in rel_glob.split("/") if p]
    dirs = [base]
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        nxt: list[Path] = []
        for d in dirs:
            if not any(ch in part for ch in "*?["):
                nxt.append(d / part)
                continue
            try:
                entries = os.listdir(d)
            except OSError:
                continue
            nxt += [d / e for e in entries if fnmatch.fnmatchcase(e, part)]
        dirs = nxt if last else [p for p in nxt if p.is_dir() and not p.is_symlink()]
    out = []
    for p in dirs:
        mt = _regular_file_mtime(p)
        if mt is not None and mt >= since - MTIME_SLACK:
            out.append((mt, p))
    return out


# --- securing ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredCore:
    path: Path  # the stored file (".zst" when compressed)
    source: Path  # where the kernel wrote it (removed)
    original_size: int
    stored_size: int  # bytes on disk
    truncated: bool  # only the first max_bytes were kept: notes and early segments survive
    compressed: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["source"] = str(self.path), str(self.source)
        d["notes"] = list(self.notes)
        return d


class CoreRefused(Exception):
    """The path is not something we will take: a symlink, a non-regular file, a multiply-linked file."""


def _open_dest(dest_dir: Path, name: str) -> tuple[int, Path]:
    """Create dest_dir/name with O_EXCL|O_NOFOLLOW, 0600; add .1, .2… rather than overwrite."""
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    dir_fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for i in range(1000):
            cand = name if i == 0 else f"{name}.{i}"
            try:
                fd = os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dir_fd)
                return fd, dest_dir / cand
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)
    raise FileExistsError(f"no free name for {name} in {dest_dir}")


def _copy(src_fd: int, dst_fd: int, limit: int) -> int:
    """Copy up to limit bytes in the kernel (copy_file_range/sendfile), in chunks: bounded memory."""
    done = 0
    while done < limit:
        want = min(COPY_CHUNK * 64, limit - done)
        try:
            n = os.copy_file_range(src_fd, dst_fd, want)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.sendfile(dst_fd, src_fd, None, want)
        if n == 0:
            break
        done += n
    return done


def _compress(src_fd: int, dst_fd: int, limit: int, zstd: str) -> None:
    """Stream up to limit bytes from src_fd through ``zstd`` into dst_fd (chunks: bounded memory)."""
    proc = subprocess.Popen([zstd, "-q", "-c", "-T0", "-3"], stdin=subprocess.PIPE, stdout=dst_fd,
                            stderr=subprocess.PIPE, close_fds=True)
    assert proc.stdin is not None
    left = limit
    try:
        while left > 0:
            chunk = os.read(src_fd, min(COPY_CHUNK, left))
            if not chunk:
                break
            proc.stdin.write(chunk)
            left -= len(chunk)
    finally:
        proc.stdin.close()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise OSError(f"zstd failed: {err.strip()}")


def secure_core(path: Path, dest_dir: Path, *, max_bytes: int, compress: bool = False,
                zstd: str = "zstd") -> StoredCore:
    """Move a core into dest_dir: mode 0600, never following symlinks, at most max_bytes of it
    (a truncated copy is kept and flagged), optionally zstd-compressed. The source is removed.
    Raises CoreRefused for a symlink/non-regular/multiply-linked source, OSError for I/O failures."""
    path, dest_dir = Path(path), Path(dest_dir)
    try:
        src_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CoreRefused(f"{path} is a symlink") from e
        raise
    notes: list[str] = []
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise CoreRefused(f"{path} is not a regular file")
        if st.st_nlink != 1:
            # A hard link to someone else's file: renaming/chmod-ing it would touch that file.
            raise CoreRefused(f"{path} has {st.st_nlink} links")
        size = st.st_size
        truncated = size > max_bytes
        limit = min(size, max_bytes)
        if truncated:
            notes.append(f"truncated to {max_bytes} of {size} bytes: notes and registers survive, "
                         "later memory segments (stacks, heap) may be missing")
        use_zstd = compress and shutil.which(zstd) is not None
        if compress and not use_zstd:
            notes.append(f"{zstd} not found: stored uncompressed")

        # Fast path: same filesystem, whole file, no compression → rename (instant for a 1 GB core),
        # then re-check through a fresh O_NOFOLLOW descriptor that we moved the inode we inspected.
        if not truncated and not use_zstd:
            fd, dest = _open_dest(dest_dir, path.name)
            os.close(fd)
            try:
                os.rename(path, dest)
                check = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    cst = os.fstat(check)
                    if (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino):
                        raise CoreRefused(f"{path} changed while being moved")
                    os.fchmod(check, 0o600)
                finally:
                    os.close(check)
                return StoredCore(dest, path, size, size, False, False, tuple(notes))
            except BaseException as e:
                os.unlink(dest)
                if not (isinstance(e, OSError) and e.errno == errno.EXDEV):
                    raise
                # other filesystem: copy below

        name = path.name + (".zst" if use_zstd else "")
        dst_fd, dest = _open_dest(dest_dir, name)
        try:
            if use_zstd:
                _compress(src_fd, dst_fd, limit, zstd)
            else:
                copied = _copy(src_fd, dst_fd, limit)
                if copied < limit:
                    notes.append(f"source shrank: copied {copied} of {limit} bytes")
            os.fsync(dst_fd)
            stored = os.fstat(dst_fd).st_size
        except BaseException:
            os.close(dst_fd)
            os.unlink(dest)
            raise
        os.close(dst_fd)
        os.unlink(path)
        return StoredCore(dest, path, size, stored, truncated, use_zstd, tuple(notes))
    finally:
        os.close(src_fd)


def compress_stored(stored: StoredCore, *, zstd: str = "zstd") -> StoredCore:
    """Compress an already secured core in place (after triage, which needs it uncompressed)."""
    if stored.compressed:
        return stored
    if shutil.which(zstd) is None:
        return StoredCore(stored.path, stored.source, stored.original_size, stored.stored_size, stored.truncated,
                          False, stored.notes + (f"{zstd} not found: left uncompressed",))
    src_fd = os.open(stored.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst_fd, dest = _open_dest(stored.path.parent, stored.path.name + ".zst")
        try:
            _compress(src_fd, dst_fd, os.fstat(src_fd).st_size, zstd)
            size = os.fstat(dst_fd).st_size
        except BaseException:
            os.close(dst_fd)
            os.unlink(dest)
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)
    os.unlink(stored.path)
    return StoredCore(dest, stored.source, stored.original_size, size, stored.truncated, True, stored.notes)
