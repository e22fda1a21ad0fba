"""Core-dump pipe handler: the program the kernel runs for a ``|`` core_pattern.

Self-contained (stdlib only, no harness imports) because the dumping kernel thread waits for it.
``harness.collect.coreinstall`` copies this file to ``<spool>/harness-core-handler`` with a
``#!<python> -IS`` line on top and sets

    core_pattern = |<spool>/harness-core-handler <spool> %P %I %u %g %s %t %c %d %h %E

Argument contract (positional; the kernel splits the pattern on spaces *before* expanding, so an
expansion containing a space stays one argument; anything after EXE is joined back to it with spaces
for older kernels):

    SPOOL   absolute spool directory; no symlink anywhere on the path, owned by us (root), not
            group/other-writable
    PID     %P  pid of the dumping process in the initial pid namespace (what the runner knows)
    TID     %I  tid of the thread that took the signal, initial pid namespace
    UID     %u  real uid of the dumping process
    GID     %g  real gid
    SIGNAL  %s  the signal number
    TIME    %t  dump time, seconds since the epoch
    RLIMIT  %c  the process's soft RLIMIT_CORE (18446744073709551615 = unlimited)
    MODE    %d  dump mode (1 normal, 2 suid_dumpable=2 "suidsafe")
    HOST    %h  hostname
    EXE     %E  executable path with "/" written as "!"

Only PID is required; missing or malformed numbers are recorded as null and written as "x" in names.
``harness-core-handler --check SPOOL`` validates the spool and prints a JSON summary (exit 0 = ok).

What one invocation does, whatever happens, it reads stdin to EOF (the kernel thread writing the core
must never block on us) and keeps stdin open until it has finished, so with core_pipe_limit > 0 the
crashed process is reaped only once the core and its sidecar are in place:

* opens SPOOL component by component from "/" with O_NOFOLLOW|O_DIRECTORY; refuses symlinks and
  directories that others could write into (then drains and logs to /dev/kmsg);
* reads SPOOL/limits.json (max_core_bytes default 1 GiB, max_cores 100, max_spool_bytes 8 GiB,
  keep_free_bytes 256 MiB, max_records 10000, uid_share_percent 25, others_share_percent 50,
  max_age_seconds 7 days);
* takes an flock on the spool for its decisions, reservations and renames (never while copying). Under it:
  records and cores older than max_age_seconds, and temp files of handlers that died, are removed
  (so unclaimed crashes of other users age out; the runner removes the records it claims);
* quotas, so other users' crashes cannot starve the harness's: the spool's owner (root: the harness)
  has only the global limits; any other uid at most uid_share_percent of each (records, cores,
  bytes), and all other uids together at most others_share_percent. A crash over a records limit is
  not recorded at all (one line in the kernel log), over a cores or bytes limit it is "dropped";
* RLIMIT below one page: the process did not ask for a core (as the kernel does for file patterns):
  status "skipped";
* limits.json "keep_exe" (a list of executable paths; absent/null = keep every core): the core of any
  other executable is "forwarded", i.e. written where the previous core_pattern (remembered by install
  in previous_core_pattern.json) would have put it, the way the kernel does it: a relative name in the
  process's cwd (/proc/PID/cwd), created O_EXCL|O_NOFOLLOW 0600 with the process's fs uid/gid and
  groups after unlinking an old one, capped by RLIMIT_CORE only. Only plain file names are forwarded
  ("core", "core.%p", "core.%e.%p.%t"...): a previous pipe, absolute or directory pattern, a
  suidsafe dump, or a pid whose owner or executable no longer match (reused) make it "skipped";
* caps are reserved, not just checked: under the lock, a core's temp file (O_CREAT|O_EXCL|O_NOFOLLOW,
  0600) is extended (sparse) to min(max_core_bytes, RLIMIT, room left under max_spool_bytes, the quotas
  and keep_free_bytes on the disk) before a byte is written, and every other handler counts that
  reservation (and its unwritten part against the free space), so concurrent crashes never pass a cap.
  A core that outgrows its reservation asks for more under the lock (free space is checked again);
  at max_core_bytes or RLIMIT it is truncated (the sidecar says so); when the spool, a quota or the
  disk has no more room it is dropped whole (status "dropped", with the reason): a kept core is
  complete or truncated by its own limit, never by a neighbour's. At the end the file is cut to what
  was written. Nothing there at all: "dropped" at once. A write error removes the partial core and
  records status "error". stdin is always read to the end;
* publishes with link() (never replaces anything: an existing name, or a symlink planted there, makes
  it take the next suffix) as ``core.<PID>.<TIME>.<SIGNAL>.u<UID>[.<k>]``, then the sidecar
  ``<core name>.json`` (same rules). The sidecar appears last: sidecar present => core complete.
  Records without a core (skipped/dropped/error) still get a sidecar of that name.

Cores are not fsync'ed (crash evidence, not data; the kernel would wait for the disk).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import sys
import time

HANDLER_NAME = "harness-core-handler"
VERSION = 1
LIMITS_FILE = "limits.json"
DEFAULT_LIMITS = {
    "max_core_bytes": 1 << 30,
    "max_cores": 100,
    "max_spool_bytes": 8 << 30,
    "keep_free_bytes": 256 << 20,
    "max_records": 10000,
    "keep_exe": None,
    "uid_share_percent": 25,       # any uid but the spool's owner: at most this share of each limit
    "others_share_percent": 50,    # all such uids together
    "max_age_seconds": 7 * 86400,  # unclaimed records and cores go after this long
}
PUBLISHED = re.compile(r"^core\.(\d+|x)\.(\d+|x)\.(\d+|x)(?:\.u(\d+|x))?(?:\.(\d+))?(\.json)?$")
TEMP = re.compile(r"^\.tmp\.core\.(?:\d+|x)\.(?:\d+|x)\.(?:\d+|x)(?:\.u(\d+|x))?\.(\d+)\.\d+(\.json)?$")
RESERVE_STEP = 64 << 20  # a core that outgrows its first reservation asks for this much more at a time
STATE_FILE = "previous_core_pattern.json"
ARG_NAMES = ("pid", "tid", "uid", "gid", "signal", "time", "rlimit_core", "dump_mode", "hostname", "exe")
CHUNK = 1 << 20
MIN_CORE = 4096  # the kernel's min_coredump for ELF: RLIMIT_CORE below a page means "no core"
F_SETPIPE_SZ = 1031
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """The spool is not something we write into."""


def ensure_std_fds() -> None:
    """The kernel gives the helper only fd 0: park fds 1 and 2 on /dev/null so that no file we open
    becomes "stdout" (anything printed would land in a core)."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                nul = os.open("/dev/null", os.O_RDWR)
                if nul != fd:
                    os.dup2(nul, fd)
                    os.close(nul)
            except OSError:
                pass


def kmsg(message: str) -> None:
    """Best effort: one warning line in the kernel log (our only voice when the spool is unusable)."""
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, f"<4>{HANDLER_NAME}[{os.getpid()}]: {message}"[:900].encode(errors="replace") + b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


# --- stdin ---------------------------------------------------------------------------------------------

class Stdin:
    """Counts everything read from fd 0. splice() where the kernel allows it (no copy through us)."""

    def __init__(self) -> None:
        self.received = 0
        self.eof = False
        self._splice = hasattr(os, "splice")
        self._buf = bytearray(CHUNK)
        self._pending = b""   # read by at_eof(), not yet written
        self._null = -1
        try:
            import fcntl  # builtin module: cheap
            fcntl.fcntl(0, F_SETPIPE_SZ, CHUNK)  # fewer wake-ups for the dumping thread
        except (OSError, ImportError, ValueError):
            pass

    def copy_to(self, out_fd: int, limit: int) -> int:
        """Move up to limit bytes into out_fd; returns bytes written. Raises OSError from the write side
        (stdin errors count as EOF: there is nothing left to drain)."""
        written = 0
        while self._pending and written < limit:
            w = os.write(out_fd, self._pending[:limit - written])
            self._pending = self._pending[w:]
            written += w
        while written < limit and not self.eof:
            want = min(CHUNK, limit - written)
            if self._splice:
                try:
                    n = os.splice(0, out_fd, want)
                except OSError as e:
                    if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                        self._splice = False  # not a pipe / fs without splice: plain reads
                        continue
                    raise
                if n == 0:
                    self.eof = True
                    break
                self.received += n
                written += n
                continue
            n = self._read(want)
            if n == 0:
                break
            view = memoryview(self._buf)[:n]
            while view:
                w = os.write(out_fd, view)
                view = view[w:]
                written += w
        return written

    def at_eof(self) -> bool:
        """Whether the core has ended: reads ahead (kept for the next copy_to) when it cannot tell yet."""
        if self._pending:
            return False
        if not self.eof:
            n = self._read(CHUNK)
            self._pending = bytes(self._buf[:n])
        return not self._pending

    def _read(self, want: int) -> int:
        try:
            n = os.readv(0, [memoryview(self._buf)[:want]])
        except InterruptedError:
            return self._read(want)
        except OSError:
            n = 0
        if n == 0:
            self.eof = True
        self.received += n
        return n

    def drain(self) -> int:
        """Read and discard to EOF; returns bytes discarded (what at_eof() read ahead included)."""
        self._pending = b""
        start = self.received
        if self._splice and self._null < 0:
            try:
                self._null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                self._splice = False
        while not self.eof:
            if self._splice:
                try:
                    n = os.splice(0, self._null, CHUNK)
                except OSError:
                    self._splice = False
                    continue
                if n == 0:
                    self.eof = True
                self.received += n
            else:
                self._read(CHUNK)
        return self.received - start


# --- spool ---------------------------------------------------------------------------------------------

def open_spool(path: str) -> int:
    """fd of the spool directory, walked from "/" with O_NOFOLLOW at every step. Each ancestor must be
    owned by root or us and not writable by others unless sticky; the spool itself owned by us and not
    group/other-writable."""
    if not path.startswith("/"):
        raise Refused(f"spool {path!r} is not absolute")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise Refused(f"spool {path!r} has . or .. components")
    euid = os.geteuid()
    fd = os.open("/", DIR_FLAGS)
    try:
        walked = ""
        for i, part in enumerate(parts):
            walked += "/" + part
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Refused(f"{walked} is a symlink or not a directory") from e
                raise Refused(f"cannot open {walked}: {e.strerror}") from e
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            last = i == len(parts) - 1
            if last:
                if st.st_uid != euid or st.st_mode & 0o022:
                    raise Refused(f"spool {walked} must be owned by uid {euid} and not group/other-writable "
                                  f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
            elif st.st_uid not in (0, euid) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                raise Refused(f"{walked} could be replaced by another user "
                              f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
        if not parts:
            raise Refused("refusing / as the spool")
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_limits(dfd: int) -> tuple[dict, list[str]]:
    limits = dict(DEFAULT_LIMITS)
    notes: list[str] = []
    try:
        fd = os.open(LIMITS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return limits, notes
    except OSError as e:
        return limits, [f"{LIMITS_FILE}: {e.strerror}; defaults used"]
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 65536:
            return limits, [f"{LIMITS_FILE} is not a small regular file; defaults used"]
        raw = json.loads(os.read(fd, 65536).decode())
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        for key, value in raw.items():
            if key == "keep_exe":
                if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    limits[key] = value
                else:
                    notes.append(f"{LIMITS_FILE}: keep_exe={value!r} ignored (a list of paths or null)")
            elif key in limits:
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    limits[key] = value
                else:
                    notes.append(f"{LIMITS_FILE}: {key}={value!r} ignored")
    except (OSError, ValueError) as e:
        notes.append(f"{LIMITS_FILE} unreadable ({e}); defaults used")
    finally:
        os.close(fd)
    return limits, notes


def is_core_name(name: str) -> bool:
    return name.startswith("core.") and not name.endswith(".json")


def _uid_of(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def spool_usage(dfd: int, *, prune_before: float | None = None) -> dict:
    """What the spool holds, regular files only (a planted symlink counts for nothing): published cores and
    their bytes, sidecars (records), cores being written with the bytes reserved for them (and the part
    of it not yet on disk), records being made, per uid. With prune_before (call with the lock held):
    published files older than that, and temp files of handlers that are gone, are removed first."""
    usage: dict = {"cores": 0, "bytes": 0, "records": 0, "partial": 0, "outstanding": 0, "pending_records": 0,
                   "pruned": 0, "uids": {}}

    def per(uid: int | None) -> list[int]:
        return usage["uids"].setdefault("x" if uid is None else str(uid), [0, 0, 0])  # cores, bytes, records

    with os.scandir(dfd) as it:
        for entry in it:
            name = entry.name
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                temp = TEMP.match(name) if name.startswith(".tmp.core.") else None
                published = PUBLISHED.match(name) if temp is None else None
                if temp is None and published is None:
                    continue
                st = entry.stat(follow_symlinks=False)
                if prune_before is not None and (
                        (published is not None and st.st_mtime < prune_before)
                        or (temp is not None and (not _alive(int(temp.group(2))) or st.st_mtime < prune_before))):
                    os.unlink(name, dir_fd=dfd)
                    usage["pruned"] += 1
                    continue
                if temp is not None:
                    mine = per(_uid_of(temp.group(1)))
                    if temp.group(3):
                        usage["pending_records"] += 1
                        mine[2] += 1
                    else:
                        usage["partial"] += 1
                        usage["bytes"] += st.st_size
                        usage["outstanding"] += max(0, st.st_size - st.st_blocks * 512)
                        mine[0] += 1
                        mine[1] += st.st_size
                    continue
                mine = per(_uid_of(published.group(4)))
                if published.group(6):
                    usage["records"] += 1
                    mine[2] += 1
                else:
                    usage["cores"] += 1
                    usage["bytes"] += st.st_size
                    mine[0] += 1
                    mine[1] += st.st_size
            except OSError:
                continue
    return usage


class Quota:
    """The limits that apply to one crash's uid (see the module docstring)."""

    KEYS = ("max_cores", "max_spool_bytes", "max_records")

    def __init__(self, limits: dict, usage: dict, uid: int | None, owner: int):
        self.checks: list[tuple[list[int], list[int], str]] = []  # (limits, counts) of cores, bytes, records
        totals = [usage["cores"] + usage["partial"], usage["bytes"], usage["records"] + usage["pending_records"]]
        self.checks.append(([limits[k] for k in self.KEYS], totals, "{key} ({limit})"))
        if uid != owner:
            share, others = limits["uid_share_percent"], limits["others_share_percent"]
            mine = usage["uids"].get("x" if uid is None else str(uid), [0, 0, 0])
            theirs = [sum(v[i] for k, v in usage["uids"].items() if k != str(owner)) for i in range(3)]
            self.checks.append(([limits[k] * share // 100 for k in self.KEYS], mine,
                                f"uid {uid}'s quota ({share}% of {{key}}: {{limit}})"))
            self.checks.append(([limits[k] * others // 100 for k in self.KEYS], theirs,
                                f"other users' share ({others}% of {{key}}: {{limit}})"))

    def _full(self, index: int) -> str | None:
        for limits, counts, name in self.checks:
            if counts[index] >= limits[index]:
                return name.format(key=self.KEYS[index], limit=limits[index]) + " is reached"
        return None

    def records_full(self) -> str | None:
        return self._full(2)

    def cores_full(self) -> str | None:
        return self._full(0)

    def byte_room(self) -> tuple[int, str]:
        return min(((limits[1] - counts[1], name.format(key="max_spool_bytes", limit=limits[1]))
                    for limits, counts, name in self.checks), key=lambda c: c[0])


class SpoolLock:
    """flock on the spool directory: decisions and reservations are made one handler at a time."""

    def __init__(self, dfd: int):
        self.dfd = dfd

    def __enter__(self) -> "SpoolLock":
        fcntl.flock(self.dfd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.dfd, fcntl.LOCK_UN)


# --- one dump ------------------------------------------------------------------------------------------

def _int(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    return int(text)


def parse_args(args: list[str]) -> dict:
    values: dict = dict.fromkeys(ARG_NAMES)
    if len(args) > len(ARG_NAMES):  # an old kernel split an expansion with spaces: rejoin into EXE
        args = args[:len(ARG_NAMES) - 1] + [" ".join(args[len(ARG_NAMES) - 1:])]
    for name, text in zip(ARG_NAMES, args):
        if name == "hostname":
            values[name] = text
        elif name == "exe":
            values[name] = text.replace("!", "/")
        else:
            values[name] = _int(text)
    return values


def _create(dfd: int, stem: str, suffix: str) -> tuple[int, str]:
    for n in range(100):
        name = f".tmp.{stem}.{os.getpid()}.{n}{suffix}"
        try:
            return os.open(name, NEW_FILE, 0o600, dir_fd=dfd), name
        except FileExistsError:
            continue  # a stale temp from a killed handler whose pid we now have
    raise FileExistsError(errno.EEXIST, "no free temp name", stem)


def _move(dfd: int, src: str, dst: str) -> bool:
    """Give src the name dst instead, never replacing dst: link() (which does not follow symlinks)
    then unlink src. False, with src untouched, when dst exists."""
    try:
        os.link(src, dst, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links on this filesystem: check, then rename. Only our own handlers write in the
        # spool and each has its own temp names; two of them could race for dst only here.
        if _exists(dfd, dst):
            return False
        os.rename(src, dst, src_dir_fd=dfd, dst_dir_fd=dfd)
        return True
    os.unlink(src, dir_fd=dfd)
    return True


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _unlink(dfd: int, name: str | None, *, locked: bool = False) -> None:
    """Under the spool's lock (taken here unless the caller holds it), as every change to its entries: a
    directory scan beside an unlink may miss another entry on tmpfs (a storm of cores measured a reservation
    missed about once in ten, its room granted twice; none in 30 with the unlinks under the lock)."""
    if name is None:
        return
    if not locked:
        with SpoolLock(dfd):
            _unlink(dfd, name, locked=True)
        return
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _name_part(value: int | None) -> str:
    return "x" if value is None else str(value)


def handle(argv: list[str], stdin: Stdin) -> int:
    """One dump: argv is SPOOL PID TID UID GID SIGNAL TIME RLIMIT MODE HOST EXE (see the module docstring)."""
    if not argv:
        kmsg("no spool argument: core discarded")
        return 2
    info = parse_args(argv[1:])
    record: dict = {"handler": HANDLER_NAME, "version": VERSION, "status": None, "reason": None, "core": None,
                    **info, "argv": argv, "bytes_received": 0, "bytes_written": 0, "truncated": False,
                    "limit": None, "limited_by": None, "handler_pid": os.getpid(), "started": time.time()}
    try:
        dfd = open_spool(argv[0])
    except (Refused, OSError) as e:
        stdin.drain()
        kmsg(f"core of pid {info['pid']} (signal {info['signal']}) not kept: {e}")
        return 1
    try:
        return _dump(dfd, argv[0], record, stdin)
    finally:
        os.close(dfd)


def _dump(dfd: int, spool: str, record: dict, stdin: Stdin) -> int:
    limits, notes = read_limits(dfd)
    record["limits"], record["notes"] = limits, notes
    owner = os.fstat(dfd).st_uid  # the harness's uid (root)
    uid = record["uid"]
    base = (f"core.{_name_part(record['pid'])}.{_name_part(record['time'])}.{_name_part(record['signal'])}"
            f".u{_name_part(uid)}")
    rlimit = record["rlimit_core"]
    keep = limits["keep_exe"]
    core_limit, limited_by = limits["max_core_bytes"], "max_core_bytes"
    if rlimit is not None and rlimit < core_limit:
        core_limit, limited_by = rlimit, "RLIMIT_CORE"
    fd = tmp = sidecar = None
    with SpoolLock(dfd):
        usage = spool_usage(dfd, prune_before=time.time() - limits["max_age_seconds"])
        quota = Quota(limits, usage, uid, owner)
        full = quota.records_full()
        forwarding = keep is not None and _esc(record["exe"] or "") not in {_esc(k) for k in keep}
        if full:
            kmsg(f"{spool}: {full}: crash of pid {record['pid']} (uid {uid}, signal {record['signal']}) "
                 f"not recorded")
        else:
            sidecar = _create(dfd, base, ".json")  # the record's slot, counted by the handlers after us
            if rlimit is not None and rlimit < MIN_CORE:
                record["status"], record["reason"] = ("skipped",
                                                      f"RLIMIT_CORE is {rlimit}: the process asked for no core")
            elif forwarding:
                record["status"] = "forward"  # outside the lock: it copies
            elif quota.cores_full():
                record["status"], record["reason"] = "dropped", f"{quota.cores_full()}"
            else:
                room, why = _room(dfd, limits, quota, usage)
                grant = min(core_limit, room)
                if grant <= 0:
                    record["status"], record["reason"] = "dropped", f"no room: {why} (cores being written count)"
                else:
                    fd, tmp = _create(dfd, base, "")
                    os.ftruncate(fd, grant)  # the reservation: the next handlers count it
                    record["reserved"] = grant
    if full:
        if forwarding and not (rlimit is not None and rlimit < MIN_CORE):
            forward(dfd, record, stdin)  # not ours to keep: it still goes where it went before, unrecorded
        stdin.drain()
        return 0
    try:
        if record["status"] == "forward":
            forward(dfd, record, stdin)
        elif fd is not None:
            _copy_reserved(dfd, fd, record, stdin, core_limit, limited_by, limits, uid, owner)
            os.close(fd)  # before any unlink: an open file keeps its blocks, and the sidecar needs room
            fd = None
            if record["status"] in ("dropped", "error"):
                _unlink(dfd, tmp)  # a core cut short by room or a disk error helps nobody
                tmp, record["bytes_written"] = None, 0
        stdin.drain()
        record["bytes_received"] = stdin.received
        if record["status"] == "forwarded":
            record["truncated"] = stdin.received > record["bytes_written"]
        if record["status"] is None:
            record["status"] = "written"
            record["truncated"] = stdin.received > record["bytes_written"]
            if record["truncated"]:
                record["reason"] = (f"truncated to {record['bytes_written']} of {stdin.received} bytes "
                                    f"by {record['limited_by']}")
        published, sidecar = sidecar, None
        # Renamed under the lock: a directory scan running beside a rename may miss the file (tmpfs moves a
        # renamed entry to the front of the list), and a scan that misses a core would grant its room twice.
        with SpoolLock(dfd):
            _publish(dfd, base, tmp, record, published)
        tmp = None
    finally:
        if fd is not None:
            os.close(fd)
        _unlink(dfd, tmp)
        if sidecar is not None:  # never published: give the record's slot back
            os.close(sidecar[0])
            _unlink(dfd, sidecar[1])
    if record["status"] == "error":
        kmsg(f"core of pid {record['pid']}: {record['reason']}")
        return 1
    return 0


def _room(dfd: int, limits: dict, quota: Quota, usage: dict) -> tuple[int, str]:
    """Bytes a core may still reserve (lock held): the tightest of the byte limits and the free space on
    the disk less keep_free_bytes and what other cores reserved but have not written yet."""
    room, why = quota.byte_room()
    vfs = os.fstatvfs(dfd)
    disk = vfs.f_bavail * vfs.f_frsize - limits["keep_free_bytes"] - usage["outstanding"]
    if disk < room:
        room, why = disk, f"the disk is within keep_free_bytes ({limits['keep_free_bytes']}) of full"
    return room, why


def _copy_reserved(dfd: int, fd: int, record: dict, stdin: Stdin, core_limit: int, limited_by: str,
                   limits: dict, uid: int | None, owner: int) -> None:
    """Copy stdin into the reserved temp file, asking for more room under the lock as it grows. Sets
    status to "dropped" (no room to finish it) or "error" (a write failed); leaves it None when the core is
    whole or truncated by its own limit (limit/limited_by in the record say which)."""
    reserved, written = record["reserved"], 0
    try:
        while True:
            written += stdin.copy_to(fd, reserved - written)
            if written < reserved or stdin.at_eof():
                break  # the whole core
            if reserved >= core_limit:
                record["limit"], record["limited_by"] = core_limit, limited_by
                break  # truncated by its own limit: the rest is drained
            with SpoolLock(dfd):
                usage = spool_usage(dfd)
                room, why = _room(dfd, limits, Quota(limits, usage, uid, owner), usage)
                more = min(RESERVE_STEP, core_limit - reserved, room)
                if more <= 0:
                    record["status"] = "dropped"
                    record["reason"] = (f"no room to finish the core after {written} bytes: {why}; dropped whole "
                                        f"rather than kept cut short")
                    break
                reserved += more
                os.ftruncate(fd, reserved)
        if record["status"] is None:
            os.ftruncate(fd, written)  # give back what was reserved and not used
            record.setdefault("limit", core_limit)
            record.setdefault("limited_by", limited_by)
    except OSError as e:
        record["status"] = "error"
        record["reason"] = f"writing the core failed after {stdin.received} bytes: {e.strerror or e}"
    record["bytes_written"] = written if record["status"] is None else 0


# --- forwarding a core we do not keep -------------------------------------------------------------------

def _esc(text: str) -> str:
    """A name component the way the kernel's cn_esc_printf writes it: "/" as "!", never "", "." or ".."."""
    if text in ("", ".", ".."):
        text = "!" + text[1:]
    return text.replace("/", "!")


def _proc_fields(path: str) -> dict[str, str]:
    with open(path, "rb") as handle:
        text = handle.read(65536).decode(errors="replace")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _previous_pattern(dfd: int) -> str | None:
    try:
        fd = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        state = json.loads(os.read(fd, 65536).decode())
        pattern = state.get("core_pattern") if isinstance(state, dict) else None
        return pattern if isinstance(pattern, str) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def forward_name(pattern: str, values: dict[str, str], uses_pid: bool) -> str | None:
    """The file name the kernel would make of a relative one-component pattern, or None when we do not
    do it the kernel's way (an unknown specifier, a directory, an absolute path or a pipe)."""
    if not pattern or pattern.startswith("|") or pattern.startswith("@") or "/" in pattern:
        return None
    out: list[str] = []
    pid_in_pattern = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(pattern):
            break  # the kernel drops a trailing %
        spec = pattern[i + 1]
        if spec not in values:
            return None
        pid_in_pattern = pid_in_pattern or spec == "p"
        out.append(values[spec])
        i += 2
    name = "".join(out)
    if uses_pid and not pid_in_pattern:
        name += "." + values["p"]
    return None if name in ("", ".", "..") or "/" in name else name


def forward(dfd: int, record: dict, stdin: Stdin) -> None:
    """Write the core where the previous pattern would have: see the module docstring. Sets status."""
    pattern = _previous_pattern(dfd)
    pid, tid = record["pid"], record["tid"] if record["tid"] is not None else record["pid"]
    record["status"] = "skipped"
    why = f"{record['exe']} is not in keep_exe"
    if pid is None or record["uid"] is None or record["gid"] is None:
        record["reason"] = f"{why}; no pid/uid/gid to forward with"
        return
    if record["dump_mode"] == 2:
        record["reason"] = f"{why}; a suidsafe dump (mode 2) never goes to a relative file"
        return
    try:
        proc = _proc_fields(f"/proc/{pid}/status")
        uids, gids = proc.get("Uid", "").split(), proc.get("Gid", "").split()
        exe = _esc(os.readlink(f"/proc/{pid}/exe"))
        try:
            thread = _proc_fields(f"/proc/{pid}/task/{tid}/status")
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as handle:
                comm = handle.read(64).decode(errors="replace").rstrip("\n")
        except OSError:
            thread, comm = proc, proc.get("Name", "")
        with open("/proc/sys/kernel/core_uses_pid", "rb") as handle:
            uses_pid = handle.read(16).strip() not in (b"", b"0")
    except OSError as e:
        record["reason"] = f"{why}; /proc/{pid} unreadable ({e.strerror}): the process is gone"
        return
    if (len(uids) < 4 or len(gids) < 4 or uids[0] != str(record["uid"]) or gids[0] != str(record["gid"])
            or exe != _esc(record["exe"] or "")):
        record["reason"] = f"{why}; /proc/{pid} is another process now (pid reused)"
        return
    exe_raw = _esc(record["exe"] or "")
    values = {"%": "%", "P": str(pid), "I": str(tid), "u": str(record["uid"]), "g": str(record["gid"]),
              "s": _name_part(record["signal"]), "t": _name_part(record["time"]),
              "c": _name_part(record["rlimit_core"]), "d": _name_part(record["dump_mode"]),
              "h": _esc(record["hostname"] or ""), "e": _esc(comm), "E": exe_raw,
              "f": _esc(exe_raw.rsplit("!", 1)[-1]),
              "p": (proc.get("NSpid") or str(pid)).split()[-1], "i": (thread.get("NSpid") or str(tid)).split()[-1]}
    name = forward_name(pattern or "", values, uses_pid)
    if name is None:
        record["reason"] = f"{why}; the previous core_pattern {pattern!r} is not a plain file name we can honour"
        return
    fsuid, fsgid = int(uids[3]), int(gids[3])
    groups = [int(g) for g in proc.get("Groups", "").split()]
    try:
        cwd = os.open(f"/proc/{pid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        record["reason"] = f"{why}; its cwd is unreachable ({e.strerror})"
        return
    try:
        where = os.readlink(f"/proc/{pid}/cwd")
        record["forwarded_to"] = f"{where.rstrip('/')}/{name}"
        fd = _as(fsuid, fsgid, groups, lambda: _create_like_the_kernel(cwd, name))
    except OSError as e:
        record["reason"] = f"{why}; {record.get('forwarded_to', name)}: {e.strerror} (the kernel would fail too)"
        return
    finally:
        os.close(cwd)
    limit = record["rlimit_core"] if record["rlimit_core"] is not None else 1 << 62  # the kernel's only cap
    record["limit"], record["limited_by"] = limit, "RLIMIT_CORE"
    try:
        record["bytes_written"] = stdin.copy_to(fd, limit)
        record["status"], record["reason"] = "forwarded", f"{why}: written as {record['forwarded_to']}"
    except OSError as e:
        record["status"] = "error"
        record["reason"] = f"{why}; writing {record['forwarded_to']} failed: {e.strerror or e}"
    finally:
        os.close(fd)


def _create_like_the_kernel(cwd: int, name: str) -> int:
    try:
        os.unlink(name, dir_fd=cwd)  # the kernel removes an old core first (outside suidsafe mode)
    except OSError:
        pass
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=cwd)


def _as(uid: int, gid: int, groups: list[int], action):
    """Run action with the given effective ids (the dumping process's fs ids), then become root again.
    The handler is single-threaded, so seteuid covers everything it does meanwhile."""
    if os.geteuid() != 0:
        if (uid, gid) != (os.geteuid(), os.getegid()):
            raise PermissionError(errno.EPERM, "cannot take another user's ids without root")
        return action()
    saved = os.getgroups()
    os.setgroups(groups)
    os.setegid(gid)
    os.seteuid(uid)
    try:
        return action()
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(saved)


def _publish(dfd: int, base: str, core_tmp: str | None, record: dict,
             sidecar: tuple[int, str] | None = None) -> str:
    """Name the core (if any) and then its sidecar (its temp made already, or now); returns the name.
    See the module docstring."""
    sfd, sidecar_tmp = sidecar if sidecar is not None else _create(dfd, base, ".json")
    current = core_tmp
    try:
        for k in range(1000):
            name = base if k == 0 else f"{base}.{k}"
            if current is not None:
                if not _move(dfd, current, name):
                    continue
                current = name
            elif _exists(dfd, name):
                continue
            record["core"] = current
            record["finished"] = time.time()
            data = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
            os.ftruncate(sfd, 0)
            os.pwrite(sfd, data, 0)
            if _move(dfd, sidecar_tmp, name + ".json"):
                sidecar_tmp = None
                return name
        raise FileExistsError(errno.EEXIST, "no free name", base)
    finally:
        os.close(sfd)
        _unlink(dfd, sidecar_tmp, locked=True)   # (called with the lock held)


def check(argv: list[str]) -> int:
    """--check SPOOL: can a dump be kept there? Prints one JSON object."""
    out: dict = {"ok": False, "handler": HANDLER_NAME, "version": VERSION, "python": sys.version.split()[0]}
    try:
        if len(argv) != 1:
            raise Refused("usage: --check SPOOL")
        dfd = open_spool(argv[0])
        try:
            out["limits"], out["notes"] = read_limits(dfd)
            with SpoolLock(dfd):  # the lock works and a file can be made there, as a dump will
                fd, name = _create(dfd, "check", "")
                os.close(fd)
                os.unlink(name, dir_fd=dfd)
                out.update(spool_usage(dfd))
            out["ok"] = True
        finally:
            os.close(dfd)
    except (Refused, OSError) as e:
        out["error"] = str(e)
    os.write(1, (json.dumps(out, sort_keys=True) + "\n").encode())
    return 0 if out["ok"] else 1


def _drain_raw() -> None:
    try:
        while os.read(0, CHUNK):
            pass
    except BaseException:
        pass


def main(argv: list[str] | None = None) -> int:
    ensure_std_fds()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check"]:
        return check(argv[1:])
    stdin: Stdin | None = None
    try:
        stdin = Stdin()
        return handle(argv, stdin)
    except BaseException as e:  # never leave the dumping kernel thread writing into a dead pipe
        kmsg(f"unexpected {type(e).__name__}: {e}")
        return 1
    finally:
        try:
            if stdin is not None:
                stdin.drain()
        except BaseException:
            pass
        _drain_raw()


if __name__ == "__main__":
    sys.exit(main())
