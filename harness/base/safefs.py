"""Folders the root harness may write into, and files made there without following links.

The harness runs as root on machines it does not own. A folder it writes into (the results folder,
a run folder, the shim cache) is trusted only when it, and every folder above it up to /, is owned by
the harness's own user or root and cannot be written by anyone else (a folder above it may be
world-writable only with the sticky bit, like /tmp: then nobody else can rename what is ours in it).
Otherwise another user could swap a folder for a symlink between our check and our write and have
root write where they choose. Symlinks on the way are followed only when a trusted user made them.

Inside a trusted folder, files are created through the folder's file descriptor with O_NOFOLLOW and
O_EXCL (O_NOFOLLOW alone for appends), folders 0700, files 0600.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
from pathlib import Path

from harness.base.errors import HarnessError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
APPEND_FILE = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_MODE = 0o700
FILE_MODE = 0o600
MAX_LINKS = 40


class Untrusted(HarnessError):
    """A folder another user could change under us (one line, exit code 2)."""


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def why_untrusted(st: os.stat_result, path: str, *, final: bool, euid: int | None = None) -> str | None:
    """Why a folder (or a file, with final=True) is not ours to trust; None when it is."""
    euid = os.geteuid() if euid is None else euid
    if st.st_uid not in (0, euid):
        return f"{path} is owned by {_user(st.st_uid)}, not by you ({_user(euid)}) or root"
    writable = st.st_mode & 0o022
    if writable and (final or not st.st_mode & stat.S_ISVTX):
        who = "group and others" if writable == 0o022 else ("others" if writable & 0o002 else "its group")
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def open_trusted_dir(path: Path | str, *, create: bool = False, mode: int = DIR_MODE, what: str = "folder") -> int:
    """A file descriptor of the folder `path`, reached from / one component at a time without following
    a symlink we did not check, each folder on the way checked as the module docstring says. Missing
    folders are created (`mode`) when `create`. Raises Untrusted (one line naming the culprit) or
    FileNotFoundError / NotADirectoryError."""
    euid = os.geteuid()
    parts = [p for p in str(os.path.abspath(path)).split("/") if p]
    stack = [os.open("/", DIR_FLAGS)]
    walked: list[str] = []
    links = 0
    try:
        reason = why_untrusted(os.fstat(stack[-1]), "/", final=not parts, euid=euid)
        if reason:
            raise Untrusted(f"{what} {path}: {reason}")
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    walked.pop()
                continue
            where = "/" + "/".join(walked + [part])
            try:
                st = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=stack[-1])
                except FileExistsError:
                    pass  # made meanwhile: checked below like any other
                st = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                # A symlink in a trusted folder was made by a trusted user, unless the folder is sticky
                # and world-writable (/tmp): then its owner decides.
                if st.st_uid not in (0, euid):
                    raise Untrusted(f"{what} {path}: {where} is a symlink owned by {_user(st.st_uid)}")
                links += 1
                if links > MAX_LINKS:
                    raise Untrusted(f"{what} {path}: too many symlinks")
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    walked = []
                parts = [p for p in target.split("/") if p] + parts
                continue
            try:
                fd = os.open(part, DIR_FLAGS, dir_fd=stack[-1])
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise NotADirectoryError(errno.ENOTDIR, f"{where} is not a folder") from None
                raise
            stack.append(fd)
            walked.append(part)
            reason = why_untrusted(os.fstat(fd), where, final=not parts, euid=euid)
            if reason:
                raise Untrusted(f"{what} {path}: {reason}")
        fd = stack.pop()
        return fd
    finally:
        for fd in stack:
            os.close(fd)


def check_trusted_dir(path: Path | str, *, what: str = "folder") -> None:
    """open_trusted_dir without keeping the descriptor (and without creating anything)."""
    os.close(open_trusted_dir(path, what=what))


def check_trusted_path(path: Path | str, *, what: str = "folder") -> None:
    """Like check_trusted_dir for a folder that may not exist yet: its nearest existing ancestor is checked
    (the rest would be made by us, 0700)."""
    current = Path(os.path.abspath(path))
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    try:
        os.close(open_trusted_dir(current, what=what))
    except (FileNotFoundError, NotADirectoryError):
        pass  # said precisely when the folder is made


def mkdirs_at(dir_fd: int, relative: Path | str, mode: int = DIR_MODE) -> int:
    """Folders under an open trusted folder, made `mode` when missing, never through a symlink;
    returns the last one's descriptor. An existing folder must be a folder we own."""
    euid = os.geteuid()
    fd = os.dup(dir_fd)
    try:
        for part in Path(relative).parts:
            if part in ("/", ".", ".."):
                raise ValueError(f"not a plain relative folder: {relative}")
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise Untrusted(f"{relative}: {part} is a symlink or not a folder") from None
                raise
            os.close(fd)
            fd = nfd
            reason = why_untrusted(os.fstat(fd), part, final=True, euid=euid)
            if reason:
                raise Untrusted(f"{relative}: {reason}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def make_dirs(root: Path, relative: Path | str, mode: int = DIR_MODE) -> Path:
    """root/relative made (mode 0700), root being a trusted folder; returns the path."""
    root_fd = os.open(root, DIR_FLAGS)
    try:
        os.close(mkdirs_at(root_fd, relative, mode))
    finally:
        os.close(root_fd)
    return root / relative


def _check_new(fd: int, name: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        os.close(fd)
        raise Untrusted(f"{name} is not a regular file of ours (uid {st.st_uid}, {st.st_nlink} links)")


def create_at(dir_fd: int, name: str, mode: int = FILE_MODE, *, flags: int = 0) -> int:
    """A new file (O_EXCL: never one that was there, never through a symlink), mode `mode`."""
    fd = os.open(name, NEW_FILE | flags, mode, dir_fd=dir_fd)
    os.fchmod(fd, mode)  # whatever the umask
    return fd


def append_at(dir_fd: int, name: str, mode: int = FILE_MODE) -> int:
    """A file to append to, created `mode` if missing; a symlink, a hard link or someone else's file
    there is refused."""
    fd = os.open(name, APPEND_FILE, mode, dir_fd=dir_fd)
    _check_new(fd, name)
    return fd


def replace_at(dir_fd: int, name: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Write `name` atomically: a new temp file (O_EXCL|O_NOFOLLOW), renamed over the old name (a rename
    replaces a symlink planted there, it never writes through it)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = create_at(dir_fd, tmp, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def write_new(directory: Path, name: str, data: bytes, mode: int = FILE_MODE) -> Path:
    """directory/name as a new file (O_EXCL|O_NOFOLLOW), in a folder we created."""
    dfd = os.open(directory, DIR_FLAGS)
    try:
        fd = create_at(dfd, name, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    return directory / name


def write_replace(path: Path, data: bytes, mode: int = FILE_MODE) -> Path:
    """path written atomically through its folder's descriptor (see replace_at)."""
    dfd = os.open(path.parent, DIR_FLAGS)
    try:
        replace_at(dfd, path.name, data, mode)
    finally:
        os.close(dfd)
    return path


# --- one owner per run ---------------------------------------------------------------------------------

class RunLock:
    """An exclusive flock on a run folder, held for the whole run or resume: a second harness on the same
    folder is refused instead of overwriting the first one's samples. The kernel drops it when the
    process dies, however it dies."""

    def __init__(self, fd: int, path: Path):
        self.fd: int | None = fd
        self.path = path

    @classmethod
    def take(cls, run_dir: Path, dir_fd: int | None = None) -> "RunLock":
        fd = os.dup(dir_fd) if dir_fd is not None else os.open(run_dir, DIR_FLAGS)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HarnessError(f"{run_dir} is still running: another harness holds it (a run or resume of it); "
                               f"wait for it to end, or stop it first") from None
        return cls(fd, run_dir)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()


def create_run_dir(out_dir: Path, run_id: str, scenario_text: str) -> tuple[Path, RunLock]:
    """A new run folder (0700) in a trusted results folder (made 0700 if missing), locked for this
    process, with scenario.yaml and an empty run.db (0600: SQLite gives its -wal and -shm files the
    database's mode). Returns its real path and the lock. Raises Untrusted or OSError."""
    results_fd = open_trusted_dir(out_dir, create=True, what="results folder")
    try:
        os.mkdir(run_id, DIR_MODE, dir_fd=results_fd)
        run_fd = os.open(run_id, DIR_FLAGS, dir_fd=results_fd)
    finally:
        os.close(results_fd)
    try:
        path = Path(os.readlink(f"/proc/self/fd/{run_fd}"))  # where it really is, whatever out_dir said
        lock = RunLock.take(path, run_fd)
        fd = create_at(run_fd, "scenario.yaml")
        try:
            data = memoryview(scenario_text.encode("utf-8"))
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.close(create_at(run_fd, "run.db"))
    finally:
        os.close(run_fd)
    return path, lock


def check_run_dir(run_dir: Path) -> None:
    """Before resuming: the run folder and every folder above it trusted, and what resume reads and runs
    (scenario.yaml, run.db) regular files that only we or root could have written."""
    fd = open_trusted_dir(run_dir, what="run folder")
    try:
        for name in ("scenario.yaml", "run.db"):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # the caller says what is missing
            if not stat.S_ISREG(st.st_mode):
                raise Untrusted(f"run folder {run_dir}: {name} is not a regular file")
            reason = why_untrusted(st, str(run_dir / name), final=True)
            if reason:
                raise Untrusted(f"run folder {run_dir}: {reason}")
    finally:
        os.close(fd)
