"""`harness cores install|uninstall|status`: route the kernel's cores to our pipe handler, and back.

install(spool) copies pipe_handler.py to ``<spool>/harness-core-handler`` (with a ``#!<python> -IS``
line: isolated mode, no site-packages, so the kernel starts it in ~20 ms and nothing from the
environment or the checkout can be slipped into it) and sets

    core_pattern    = |<spool>/harness-core-handler <spool> %P %I %u %g %s %t %c %d %h %E
    core_pipe_limit = max(16, the previous value)

remembering the previous pattern and pipe limit in ``<spool>/previous_core_pattern.json``, which
uninstall(spool) restores exactly. Installing again keeps the remembered original.

Why core_pipe_limit > 0 (kernel's Documentation/admin-guide/sysctl/kernel.rst, fs/coredump.c): with 0
the kernel does not wait for the handler, so the crashed process is reaped as soon as the last byte is
in the pipe; the runner's waitpid() can then return before the handler has named the core (and
/proc/PID is gone). With N > 0 the kernel waits, before the process finishes dying, until the handler
closes its end of the pipe; our handler closes it only after the core and its sidecar are in place, so
when the runner sees the death with WCOREDUMP the core is already findable. The price: dumps beyond N
at once are skipped ("over core_pipe_limit" in the kernel log, and no core flag in the exit status,
so the runner does not look for one). The handler takes milliseconds plus the copy, so 16 is a
lot; a larger value already set is kept.

The pattern is system-wide: while installed, every crashing process on the machine pipes its core
here. The handler honours the process's RLIMIT_CORE (%c) the way the kernel does for file patterns, so
processes that did not raise it leave only a small "skipped" sidecar. With keep_exe=[paths], only those
executables' cores are kept; the others are written where the previous pattern would have put them
when it is a plain relative name such as the kernel's default "core" (see pipe_handler), so other
programs on the machine keep their usual cores while the handler is installed. The handler runs in the
initial mount namespace: from inside a container the spool path must exist on the host.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness.collect import pipe_handler
from harness.collect.cores import CORE_PATTERN, core_pattern, core_pattern_status

CORE_PIPE_LIMIT = Path("/proc/sys/kernel/core_pipe_limit")
HANDLER_NAME = pipe_handler.HANDLER_NAME  # "harness-core-handler": contains cores.HARNESS_HANDLER_MARKER
STATE_NAME = pipe_handler.STATE_FILE  # "previous_core_pattern.json"
LIMITS_NAME = pipe_handler.LIMITS_FILE
DEFAULT_SPOOL = Path("/var/lib/harness/cores")
DEFAULT_MAX_BYTES = pipe_handler.DEFAULT_LIMITS["max_core_bytes"]
DEFAULT_MAX_CORES = pipe_handler.DEFAULT_LIMITS["max_cores"]
DEFAULT_MAX_SPOOL_BYTES = pipe_handler.DEFAULT_LIMITS["max_spool_bytes"]
DEFAULT_KEEP_FREE_BYTES = pipe_handler.DEFAULT_LIMITS["keep_free_bytes"]
DEFAULT_PIPE_LIMIT = 16
QUOTA_KEYS = ("max_records", "uid_share_percent", "others_share_percent", "max_age_seconds")
SPECIFIERS = "%P %I %u %g %s %t %c %d %h %E"  # see pipe_handler's docstring for the argument contract
CORENAME_MAX = 127  # the kernel keeps 128 bytes of core_pattern including the NUL, silently
SHEBANG_MAX = 255  # BINPRM_BUF_SIZE
POLL = 0.02
_NAME = pipe_handler.PUBLISHED  # core.PID.TIME.SIGNAL[.uUID][.K][.json]


@dataclass(frozen=True)
class InstallResult:
    spool_dir: Path
    handler: Path
    pattern: str  # what core_pattern now is
    pipe_limit: int
    previous_pattern: str  # what uninstall() will restore
    previous_pipe_limit: int
    already_installed: bool  # our pattern was already there: the remembered original was kept
    limits: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spool_dir"], d["handler"] = str(self.spool_dir), str(self.handler)
        return d


@dataclass(frozen=True)
class UninstallResult:
    restored: bool  # we wrote the remembered pattern back
    pattern: str  # core_pattern afterwards
    pipe_limit: int | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpooledCore:
    """One crash as the handler recorded it."""
    core: Path | None  # None when skipped / dropped / failed
    sidecar: Path | None  # None only if the handler could not write one (then status "written")
    status: str  # written | skipped | dropped | forwarded | error
    truncated: bool
    record: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["core"] = str(self.core) if self.core else None
        d["sidecar"] = str(self.sidecar) if self.sidecar else None
        d["notes"] = list(self.notes)
        return d


# --- helpers -------------------------------------------------------------------------------------------

def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise PermissionError(
            f"`harness cores {action}` needs root: /proc/sys/kernel/core_pattern can only be changed by root "
            f"(CAP_SYS_ADMIN), and the kernel runs the handler as root (you are uid {os.geteuid()})")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_sysctl(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(f"cannot write {path}: {e.strerror} (read-only /proc/sys, e.g. a container?)") \
                from None
        raise
    try:
        os.write(fd, value.encode())
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(f"cannot write {path}: {e.strerror}") from None
        raise ValueError(f"the kernel refused {value!r} for {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _resolve_spool(spool_dir: Path | str, *, strict: bool = True) -> Path:
    """Absolute path with the parent's symlinks resolved (the handler refuses any symlink on the path);
    the spool itself must not be a symlink."""
    p = Path(os.path.abspath(spool_dir))
    if p == Path("/"):
        raise ValueError("refusing / as the spool directory")
    resolved = Path(os.path.realpath(p.parent)) / p.name
    try:
        if stat.S_ISLNK(os.lstat(resolved).st_mode):
            raise ValueError(f"spool {resolved} is a symlink: give the real directory")
    except FileNotFoundError:
        pass
    except OSError:
        if strict:
            raise
    return resolved


def _check_trusted(path: Path, what: str, *, final_owner_only: bool = False) -> None:
    """Every directory from / down to path owned by root (or us) and not writable by others unless
    sticky; path itself owned by root (or us) and not group/other-writable. The kernel runs what the
    pattern names as root: nobody else may be able to swap it."""
    euid = os.geteuid()
    cur = Path("/")
    parts = path.parts[1:]
    for i, part in enumerate(parts):
        cur = cur / part
        st = os.lstat(cur)
        last = i == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            raise ValueError(f"{what}: {cur} is a symlink")
        if last:
            bad_owner = st.st_uid != euid if final_owner_only else st.st_uid not in (0, euid)
            if bad_owner or st.st_mode & 0o022:
                raise ValueError(f"{what}: {cur} must be owned by uid {euid} and not group/other-writable "
                                 f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
        elif st.st_uid not in (0, euid) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise ValueError(f"{what}: {cur} could be replaced by another user "
                             f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")


def _atomic_write(directory: Path, name: str, data: bytes, mode: int) -> None:
    tmp = directory / f".tmp.{name}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, directory / name)


def _read_json(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return None
        data = json.loads(os.read(fd, 1 << 20).decode())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _handler_argv(pattern: str) -> list[str] | None:
    if not pattern.startswith("|"):
        return None
    argv = pattern[1:].split()
    if argv and os.path.basename(argv[0]) == HANDLER_NAME:
        return argv
    return None


def installed_spool(pattern: str | None = None) -> Path | None:
    """The spool of the harness handler named by core_pattern (the current one by default), else None."""
    argv = _handler_argv(core_pattern() if pattern is None else pattern)
    if argv is None:
        return None
    return Path(argv[1]) if len(argv) > 1 else Path(argv[0]).parent


def our_pattern(spool_dir: Path) -> str:
    return f"|{spool_dir / HANDLER_NAME} {spool_dir} {SPECIFIERS}"


def _read_state(spool: Path) -> dict | None:
    state = _read_json(spool / STATE_NAME)
    if state is None or not isinstance(state.get("core_pattern"), str):
        return None
    return state


# --- install / uninstall -------------------------------------------------------------------------------

def prepare_spool(spool_dir: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_cores: int = DEFAULT_MAX_CORES,
                  max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES, keep_free_bytes: int = DEFAULT_KEEP_FREE_BYTES,
                  keep_exe: Sequence[str | os.PathLike] | None = None, python: str = sys.executable,
                  **quotas: int) -> Path:
    """Create the spool (0700), write limits.json and the handler copy, and check that the handler
    accepts the spool when run like the kernel runs it. Does not touch core_pattern. Returns the
    handler's path. `quotas`: max_records, uid_share_percent, others_share_percent, max_age_seconds
    (pipe_handler.DEFAULT_LIMITS)."""
    spool = _resolve_spool(spool_dir)
    unknown = set(quotas) - set(QUOTA_KEYS)
    if unknown:
        raise ValueError(f"unknown spool limits: {', '.join(sorted(unknown))}")
    for name, value in (("max_bytes", max_bytes), ("max_cores", max_cores), ("max_spool_bytes", max_spool_bytes),
                        ("keep_free_bytes", keep_free_bytes), *quotas.items()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    if any(c.isspace() or c == "%" for c in str(spool)):
        raise ValueError(f"spool {spool}: no spaces or % allowed (the kernel splits and expands the pattern)")
    interpreter = Path(os.path.realpath(python))
    if not os.access(interpreter, os.X_OK):
        raise ValueError(f"python {python} ({interpreter}) is not executable")
    _check_trusted(interpreter, "python interpreter")
    shebang = f"#!{interpreter} -IS\n"
    if len(shebang) > SHEBANG_MAX or any(c.isspace() for c in str(interpreter)):
        raise ValueError(f"python path {interpreter} is too long or has spaces for a #! line")

    spool.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(spool, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(spool)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"spool {spool} is not a directory")
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(spool, 0o700, follow_symlinks=False)  # cores hold secrets: root only
    _check_trusted(spool, "spool directory", final_owner_only=True)

    limits = {"max_core_bytes": max_bytes, "max_cores": max_cores, "max_spool_bytes": max_spool_bytes,
              "keep_free_bytes": keep_free_bytes,
              **{key: quotas.get(key, pipe_handler.DEFAULT_LIMITS[key]) for key in QUOTA_KEYS},
              "keep_exe": None if keep_exe is None else [os.path.realpath(e) for e in keep_exe]}  # %E is resolved
    _atomic_write(spool, LIMITS_NAME, (json.dumps(limits, indent=1, sort_keys=True) + "\n").encode(), 0o600)
    source = Path(pipe_handler.__file__).read_text(encoding="utf-8")
    _atomic_write(spool, HANDLER_NAME, (shebang + source).encode(), 0o700)
    handler = spool / HANDLER_NAME

    # Run it as the kernel will: exec by path (the #! line), empty environment, cwd /.
    try:
        proc = subprocess.run([str(handler), "--check", str(spool)], env={}, cwd="/", stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"the handler {handler} does not run: {e}") from None
    try:
        report = json.loads(proc.stdout.decode() or "{}")
    except ValueError:
        report = {}
    if proc.returncode != 0 or not report.get("ok"):
        detail = report.get("error") or proc.stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"the handler {handler} rejects {spool}: {detail}")
    return handler


def install(spool_dir: Path | str = DEFAULT_SPOOL, *, max_bytes: int = DEFAULT_MAX_BYTES,
            max_cores: int = DEFAULT_MAX_CORES, max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
            keep_free_bytes: int = DEFAULT_KEEP_FREE_BYTES, keep_exe: Sequence[str | os.PathLike] | None = None,
            pipe_limit: int = DEFAULT_PIPE_LIMIT, python: str = sys.executable, **quotas: int) -> InstallResult:
    """Point core_pattern at our handler writing into spool_dir (only keep_exe's cores when given; the
    rest go where the previous pattern puts them, if it is a plain relative name). Raises PermissionError when not root
    or /proc/sys is read-only, ValueError for an unusable spool/interpreter/pattern, RuntimeError when the
    handler does not run or the previous pattern cannot be known."""
    _require_root("install")
    if not isinstance(pipe_limit, int) or pipe_limit < 1:
        raise ValueError(f"pipe_limit must be >= 1 (0 would stop the kernel waiting for the handler), "
                         f"not {pipe_limit!r}")
    spool = _resolve_spool(spool_dir)
    pattern = our_pattern(spool)
    if len(pattern.encode()) > CORENAME_MAX:
        raise ValueError(f"core_pattern would be {len(pattern.encode())} bytes and the kernel keeps {CORENAME_MAX}: "
                         f"use a shorter spool path than {spool} (e.g. {DEFAULT_SPOOL})")
    handler = prepare_spool(spool, max_bytes=max_bytes, max_cores=max_cores, max_spool_bytes=max_spool_bytes,
                            keep_free_bytes=keep_free_bytes, keep_exe=keep_exe, python=python, **quotas)
    limits = _read_json(spool / LIMITS_NAME) or {}

    current = core_pattern()
    current_limit = _read_int(CORE_PIPE_LIMIT)
    if not current or current_limit is None:
        raise RuntimeError(f"cannot read {CORE_PATTERN} or {CORE_PIPE_LIMIT}")
    state = _read_state(spool)
    already = current == pattern
    wrote_state = False
    if already and state is not None:
        previous = state  # installing twice keeps the remembered original
    else:
        other = installed_spool(current)
        if other is not None:
            # Our handler for this or another spool, without a saved original here: inherit its memory.
            inherited = _read_state(other)
            if inherited is None:
                raise RuntimeError(f"core_pattern is already a harness handler ({current}) and {other / STATE_NAME} "
                                   "does not say what was there before; run `harness cores uninstall` for that spool "
                                   "or set core_pattern by hand first")
            previous = inherited
        else:
            previous = {"core_pattern": current, "core_pipe_limit": current_limit}
        previous = {"core_pattern": previous["core_pattern"], "core_pipe_limit": int(previous["core_pipe_limit"]),
                    "saved_at": time.time(), "saved_by": "harness cores install"}
        _atomic_write(spool, STATE_NAME, (json.dumps(previous, indent=1) + "\n").encode(), 0o600)
        wrote_state = True
        if other is not None and other != spool:
            try:
                os.unlink(other / STATE_NAME)  # the memory moved here with the pattern
            except OSError:
                pass

    new_limit = max(pipe_limit, current_limit) if already else max(pipe_limit, int(previous["core_pipe_limit"]))
    # The pattern first: once it is ours, uninstall restores both values from the state written above,
    # so an install killed between the two writes (even by SIGKILL) leaves nothing uninstall cannot undo.
    # SIGINT/SIGTERM wait until both are written (or undone below).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        if current != pattern:
            _write_sysctl(CORE_PATTERN, pattern)
        if core_pattern() != pattern:
            raise RuntimeError(f"core_pattern reads back as {core_pattern()!r}, not {pattern!r}")
        if new_limit != current_limit:
            _write_sysctl(CORE_PIPE_LIMIT, str(new_limit))
    except BaseException:
        # Leave the machine as we found it.
        for path, value in ((CORE_PATTERN, current), (CORE_PIPE_LIMIT, str(current_limit))):
            try:
                _write_sysctl(path, value)
            except (OSError, ValueError):
                pass
        if wrote_state and not already:
            try:
                os.unlink(spool / STATE_NAME)
            except OSError:
                pass
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return InstallResult(spool, handler, pattern, new_limit, previous["core_pattern"],
                         int(previous["core_pipe_limit"]), already, limits)


def uninstall(spool_dir: Path | str = DEFAULT_SPOOL) -> UninstallResult:
    """Restore the core_pattern and core_pipe_limit remembered by install(spool_dir). Leaves a pattern
    that is no longer ours alone. The spool's cores stay; the handler copy and the state file go."""
    _require_root("uninstall")
    spool = _resolve_spool(spool_dir)
    state = _read_state(spool)
    current = core_pattern()
    ours = current == our_pattern(spool) or installed_spool(current) == spool
    if not ours:
        msg = f"core_pattern is {current!r}, not our handler for {spool}: left as is"
        limit = _read_int(CORE_PIPE_LIMIT)
        if state is not None and current == state["core_pattern"] and limit != state.get("core_pipe_limit"):
            # An install stopped before it wrote the pattern (older harnesses wrote the pipe limit first).
            try:
                _write_sysctl(CORE_PIPE_LIMIT, str(int(state.get("core_pipe_limit", 0))))
                msg += f"; core_pipe_limit restored to {state.get('core_pipe_limit')} (an interrupted install)"
            except (OSError, ValueError, TypeError):
                pass
        if state is not None:
            msg += f" (the remembered {state['core_pattern']!r} was stale and is forgotten)"
            _remove(spool / STATE_NAME)
        _remove(spool / HANDLER_NAME)
        return UninstallResult(False, current, _read_int(CORE_PIPE_LIMIT), msg)
    if state is None:
        raise RuntimeError(f"core_pattern is our handler but {spool / STATE_NAME} is missing or unreadable, so the "
                           f"previous pattern is unknown: set it by hand (e.g. `echo core > {CORE_PATTERN}`)")
    _write_sysctl(CORE_PATTERN, state["core_pattern"])
    if core_pattern() != state["core_pattern"]:
        raise RuntimeError(f"core_pattern reads back as {core_pattern()!r}, not {state['core_pattern']!r}")
    try:
        _write_sysctl(CORE_PIPE_LIMIT, str(int(state.get("core_pipe_limit", 0))))
    except (ValueError, TypeError):
        pass
    _remove(spool / STATE_NAME)
    _remove(spool / HANDLER_NAME)
    return UninstallResult(True, core_pattern(), _read_int(CORE_PIPE_LIMIT),
                           f"restored core_pattern {state['core_pattern']!r}; cores stay in {spool}")


def _handler_stale(spool: Path) -> bool:
    """The installed copy is not this checkout's pipe_handler.py (after its #! line)."""
    try:
        installed = (spool / HANDLER_NAME).read_bytes()
        return installed.split(b"\n", 1)[-1] != Path(pipe_handler.__file__).read_bytes()
    except OSError:
        return False


def handler_problems(handler: Path, spool: Path) -> list[str] | None:
    """Why the kernel could not run this handler for this spool ([] = it can), None when it cannot be
    told without root (the spool is root's alone). Checks what the kernel needs: the handler a trusted
    executable file, its #! interpreter there, executable and trusted, and the handler accepting the
    spool when run as the kernel runs it."""
    problems: list[str] = []
    try:
        st = os.lstat(handler)
    except PermissionError:
        return None  # in root's 0700 spool: only root can look
    except OSError as e:
        return [f"the handler {handler} is missing ({e.strerror})"]
    if not stat.S_ISREG(st.st_mode):
        return [f"the handler {handler} is not a regular file"]
    if not st.st_mode & 0o100:
        problems.append(f"the handler {handler} is not executable (mode {stat.S_IMODE(st.st_mode):o})")
    try:
        _check_trusted(handler, "handler")
    except (ValueError, OSError) as e:
        problems.append(str(e))
    try:
        fd = os.open(handler, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            first = os.read(fd, SHEBANG_MAX + 1).split(b"\n", 1)[0].decode(errors="replace")
        finally:
            os.close(fd)
    except OSError as e:
        return problems + [f"cannot read the handler {handler}: {e.strerror}"]
    if not first.startswith("#!") or not first[2:].split():
        return problems + [f"the handler {handler} has no #! line"]
    interpreter = Path(first[2:].split()[0])
    if not interpreter.is_file() or not os.access(interpreter, os.X_OK):
        problems.append(f"its interpreter {interpreter} is missing or not executable (the kernel logs "
                        f"'pipe failed' and every core is lost)")
    else:
        try:
            _check_trusted(Path(os.path.realpath(interpreter)), "its interpreter")
        except (ValueError, OSError) as e:
            problems.append(str(e))
    if problems:
        return problems
    if os.geteuid() != 0:
        return None
    try:
        proc = subprocess.run([str(handler), "--check", str(spool)], env={}, cwd="/", stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"the handler does not run: {e}"]
    try:
        report = json.loads(proc.stdout.decode() or "{}")
    except ValueError:
        report = {}
    if proc.returncode != 0 or not report.get("ok"):
        detail = report.get("error") or proc.stderr.decode(errors="replace").strip()[-300:] or \
            f"exit status {proc.returncode}"
        return [f"the handler rejects its spool: {detail}"]
    return []


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- status --------------------------------------------------------------------------------------------

def _spool_summary(spool: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"cores": 0, "bytes": 0, "records": 0, "partial": 0, "truncated": 0,
                           "skipped": 0, "dropped": 0, "forwarded": 0, "errors": 0}
    try:
        entries = list(os.scandir(spool))
    except FileNotFoundError:
        return {"error": f"{spool} does not exist"}
    except OSError as e:
        return {"error": f"cannot list {spool}: {e.strerror}"}
    for entry in entries:
        name = entry.name
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if name.startswith("core.") and name.endswith(".json"):
                out["records"] += 1
                rec = _read_json(Path(entry.path)) or {}
                status = rec.get("status")
                if status in ("skipped", "dropped", "forwarded"):
                    out[status] += 1
                elif status == "error":
                    out["errors"] += 1
                if rec.get("truncated"):
                    out["truncated"] += 1
            elif pipe_handler.is_core_name(name):
                out["cores"] += 1
                out["bytes"] += entry.stat(follow_symlinks=False).st_size
            elif name.startswith(".tmp.core.") and not name.endswith(".json"):
                out["partial"] += 1
        except OSError:
            continue
    return out


def status(spool_dir: Path | str = DEFAULT_SPOOL) -> dict[str, Any]:
    """Where cores go now, whether that is us, what install remembered, what the spool holds, and
    one line of advice. Needs no root (the spool's contents do)."""
    spool = _resolve_spool(spool_dir, strict=False)
    current = core_pattern()
    pipe_limit = _read_int(CORE_PIPE_LIMIT)
    st = core_pattern_status(current)
    other = installed_spool(current) if current else None
    ours = other == spool
    state = _read_state(spool)
    summary = _spool_summary(spool)
    if not current:
        advice = st.advice
    elif ours:
        prev = repr(state["core_pattern"]) if state else "nothing (the saved previous pattern is missing)"
        advice = (f"cores are piped to {spool / HANDLER_NAME} and kept in {spool}; "
                  f"`harness cores uninstall` restores {prev}")
        if pipe_limit == 0:
            advice += ("; core_pipe_limit is 0, so the kernel does not wait for the handler: "
                       "look for cores with a timeout")
    elif other is not None:
        advice = f"the harness handler is installed for another spool, {other}: cores go there"
    elif st.owner == "systemd-coredump":
        advice = ("pattern is a pipe owned by systemd-coredump: cores go to coredumpctl; "
                  "run `harness cores install` to collect them here")
    elif st.owner == "apport":
        advice = ("pattern is a pipe owned by apport: cores go to /var/crash (and it drops repeats); "
                  "run `harness cores install` to collect them here")
    elif st.kind == "pipe":
        advice = f"pattern pipes cores to {st.handler}; run `harness cores install` to collect them here"
    else:
        advice = f"{st.advice}; no handler needed (`harness cores install` is optional)"
    runnable: bool | None = None
    problems: list[str] = []
    pattern_argv = _handler_argv(current) if current else None
    if pattern_argv is not None:  # the handler the kernel would run now, whichever spool it names
        checked = handler_problems(Path(pattern_argv[0]), Path(pattern_argv[1]) if len(pattern_argv) > 1
                                   else Path(pattern_argv[0]).parent)
        runnable = None if checked is None else not checked
        problems = checked or []
        if problems:
            advice = (f"BROKEN: the kernel cannot run the installed handler, so every core on this machine is "
                      f"lost: {problems[0]}; run `harness cores install` again (or `harness cores uninstall`)")
        elif checked is None:
            advice += "; (whether the handler runs can only be checked as root)"
    stale = ours and _handler_stale(spool)
    if stale:
        advice += ("; the installed handler differs from this checkout's pipe_handler.py: "
                   "run `harness cores install` again")
    if state is not None and not ours:
        advice += (f" (the previous pattern remembered in {spool} is stale: core_pattern changed since install; "
                   "`harness cores uninstall` forgets it)")
    return {
        "pattern": current,
        "pipe_limit": pipe_limit,
        "ours": ours,
        "owner": st.owner,
        "installed_spool": str(other) if other else None,
        "spool_dir": str(spool),
        "handler_present": _is_regular(spool / HANDLER_NAME),
        "handler_stale": stale,
        "handler_runnable": runnable,   # None: no harness handler in the pattern, or not checkable without root
        "handler_problems": problems,
        "previous": ({"core_pattern": state["core_pattern"], "core_pipe_limit": state.get("core_pipe_limit")}
                     if state else None),
        "spool": summary,
        "limits": _read_json(spool / LIMITS_NAME),
        "advice": advice,
    }


# --- finding a crash's core ----------------------------------------------------------------------------

def _scan(spool: Path, pid: int, since: float) -> SpooledCore | None:
    """The complete record of pid's first crash at or after since; None if there is none or it is
    still being written. Temp names are .tmp.core.PID.TIME.SIGNAL.uUID.HANDLERPID.N[.json]."""
    first = math.floor(since)  # %t has whole seconds
    cores: dict[str, os.DirEntry] = {}
    records: dict[str, os.DirEntry] = {}
    busy: set[str] = set()
    with os.scandir(spool) as it:
        for entry in it:
            name = entry.name
            if name.startswith(".tmp.core."):
                parts = name[5:].split(".")
                if len(parts) >= 4 and parts[1] == str(pid) and parts[2].isdigit() and int(parts[2]) >= first:
                    busy.add(".".join(parts[:4]))
                continue
            m = _NAME.match(name)
            if not m or m.group(1) != str(pid) or not m.group(2).isdigit() or int(m.group(2)) < first:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue  # never a symlink planted under a core's name
            if m.group(6):
                records[name[:-5]] = entry
            else:
                cores[name] = entry
    for name in sorted(set(cores) | set(records), key=_order):
        sidecar = records.get(name)
        if sidecar is not None:
            # Sidecars appear complete (linked from a finished temp): unreadable means broken, not busy.
            rec = _read_json(Path(sidecar.path)) or {"reason": "unreadable sidecar", "core": name}
            core_name = rec.get("core")
            core = spool / core_name if isinstance(core_name, str) and core_name in cores else None
            return _spooled(core, Path(sidecar.path), rec)
        entry = cores[name]
        if ".".join(name.split(".")[:4]) in busy or entry.stat(follow_symlinks=False).st_nlink != 1:
            return None  # the earliest crash of pid is still being published: wait for it
        return _spooled(spool / name, None, {})
    return None


def _order(name: str) -> tuple[int, int]:
    m = _NAME.match(name)
    assert m is not None
    return int(m.group(2)), int(m.group(5) or 0)


def _spooled(core: Path | None, sidecar: Path | None, rec: dict[str, Any]) -> SpooledCore:
    notes: list[str] = []
    status = rec.get("status") or ("written" if core is not None else "error")
    if sidecar is None:
        notes.append("the pipe handler left no sidecar (disk full?)")
    if rec.get("reason"):
        notes.append(f"pipe handler: {rec['reason']}")
    if status == "written" and core is None:
        notes.append(f"the spooled core {rec.get('core')} has gone")
    return SpooledCore(core, sidecar, status, bool(rec.get("truncated")), rec, tuple(notes))


def find_spooled_record(spool_dir: Path | str, pid: int, since: float, *, timeout: float = 0.0) -> SpooledCore | None:
    """The handler's record of the first crash of global pid ``pid`` at or after ``since`` (time.time()
    when the process started), polling up to ``timeout`` seconds while none is complete. Raises
    OSError (PermissionError when not root) if the spool cannot be listed."""
    spool = Path(spool_dir)
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        found = _scan(spool, pid, since)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(POLL)


def claim_record(found: SpooledCore) -> None:
    """The runner took this crash (its core moved into the results, the record's notes into the crash):
    its sidecar goes, so the spool's record limits count only crashes nobody claimed (those age out)."""
    if found.sidecar is not None:
        try:
            os.unlink(found.sidecar)
        except OSError:
            pass


def find_spooled_core(spool_dir: Path | str, pid: int, since: float, *, timeout: float = 0.0) -> Path | None:
    """Path of the spooled core of ``pid``'s crash at or after ``since`` (see find_spooled_record); None
    when there is none (yet), or the handler skipped/dropped it."""
    found = find_spooled_record(spool_dir, pid, since, timeout=timeout)
    return found.core if found is not None else None
