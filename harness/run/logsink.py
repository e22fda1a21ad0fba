"""Target output through pipes into size-capped rotating files, from start to stop.

Every host's stdout and stderr are pipes; one pump thread drains them all (epoll, reads of up to
1 MiB, a short pause between rounds so a flood arrives in large reads rather than one wake-up per
line) into its CappedLog; at most about 100 MB/s per stream and 400 MB/s in all, so a target writing
faster waits on its full pipe instead of taking the machine's CPU from the driver (bench/log_flood.py).
A log file never passes `log_max`: when it would, it is renamed to
`<log>.1` (replacing the previous one) and a new file starts. At most one rotation a second: what a
target writes beyond `log_max` bytes in a second is counted and dropped, never written, and the next
file starts with a line saying how much was dropped. So a target writing at full speed costs at most
`log_max` bytes of disk and `log_max` bytes a second of writes per stream, and never the harness's
memory. The last bytes of stderr are kept in memory too (a crash record's stderr tail), dropped or not.

The pump is a plain thread (like the spawner): it must keep draining while trio is busy or the run is
stopping, and a read of a pipe never blocks anything else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.base import safefs

READ_SIZE = 1 << 20
PIPE_SIZE = 1 << 20          # fewer, larger reads; the kernel's default pipe-max-size allows it
ROUND_PAUSE = 0.01           # between rounds: lets a flood pile up into large reads
ROUND_BUDGET = 1 << 20       # bytes per pipe per round: at most ~100 MB/s per stream ...
ROUND_TOTAL = 4 << 20        # ... and ~400 MB/s for the whole fleet; a faster writer waits on its full pipe
ROTATE_EVERY = 1.0           # seconds: at most one rotation a second per stream
TAIL_BYTES = 4096
F_SETPIPE_SZ = 1031


class CappedLog:
    """One stream of one host: `name` in a folder, rotated to `name.1`, each at most `cap` bytes."""

    def __init__(self, dir_fd: int, name: str, cap: int, *, rotate_every: float = ROTATE_EVERY):
        self.dir_fd = os.dup(dir_fd)
        self.name = name
        self.cap = max(1, cap)
        self.rotate_every = rotate_every
        self.lock = threading.Lock()
        self.fd: int | None = safefs.append_at(self.dir_fd, name)
        self.size = os.fstat(self.fd).st_size
        self.received = 0
        self.dropped = 0             # since the last rotation (said at the top of the next file)
        self.dropped_total = 0
        self.rotations = 0
        self.errors: list[str] = []
        self._last_rotation = -float("inf")
        self._tail = bytearray()

    def write(self, data: bytes | memoryview, now: float | None = None) -> None:
        """Called with the lock held (by the pump)."""
        self.received += len(data)
        self._tail += data[-TAIL_BYTES:]
        del self._tail[:-TAIL_BYTES]
        view = memoryview(data)
        while view:
            room = self.cap - self.size
            if room <= 0:
                now = time.monotonic() if now is None else now
                if now - self._last_rotation >= self.rotate_every and self._rotate(now):
                    continue
                self._drop(len(view))
                return
            chunk = view[:room]
            if not self._write_all(chunk):
                self._drop(len(view))
                return
            view = view[len(chunk):]

    def _drop(self, count: int) -> None:
        self.dropped += count
        self.dropped_total += count

    def _write_all(self, chunk: memoryview) -> bool:
        if self.fd is None:
            return False
        try:
            while chunk:
                written = os.write(self.fd, chunk)
                self.size += written
                chunk = chunk[written:]
            return True
        except OSError as exc:  # a full disk: the output is lost, the run goes on
            if len(self.errors) < 3:
                self.errors.append(f"{self.name}: {exc.strerror or exc}")
            return False

    def _rotate(self, now: float) -> bool:
        """name -> name.1 (a rename replaces whatever is at name.1, a planted symlink included, and never
        writes through it), then a new name, created O_EXCL|O_NOFOLLOW."""
        self._last_rotation = now
        try:
            os.rename(self.name, self.name + ".1", src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError as exc:
            if len(self.errors) < 3:
                self.errors.append(f"rotating {self.name}: {exc.strerror or exc}")
            return False
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            self.fd = safefs.create_at(self.dir_fd, self.name, flags=os.O_APPEND)
        except OSError as exc:
            if len(self.errors) < 3:
                self.errors.append(f"reopening {self.name}: {exc.strerror or exc}")
            return False
        self.size = 0
        self.rotations += 1
        if self.dropped:
            note = (f"[harness: {self.dropped} bytes of output dropped here: more than log_max ({self.cap} bytes) "
                    f"within {self.rotate_every:g}s]\n").encode()
            self.dropped = 0
            self._write_all(memoryview(note[:self.cap]))
        return True

    def tail(self, size: int = 2048) -> bytes:
        with self.lock:
            return bytes(self._tail[-size:])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


@dataclass
class HostLogs:
    """A host's two streams: the write ends its processes get as fds 1 and 2, and where they go."""

    stdout_fd: int
    stderr_fd: int
    stdout: CappedLog
    stderr: CappedLog
    pump: "LogPump | None" = None


class LogPump:
    """One thread draining every host's pipes into their CappedLogs (see the module docstring)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sources: dict[int, CappedLog] = {}
        self._writers: list[int] = []
        self._logs: list[CappedLog] = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="harness-log-pump", daemon=True)
        self._buf = bytearray(READ_SIZE)   # the pump thread's, reused: no 1 MiB allocation per read
        self._started = False
        self.bytes_read = 0

    def attach(self, directory: Path, cap: int) -> HostLogs:
        """Pipes for a host's stdout and stderr, drained into directory/stdout.log and stderr.log."""
        dir_fd = os.open(directory, safefs.DIR_FLAGS)
        try:
            logs = [CappedLog(dir_fd, name, cap) for name in ("stdout.log", "stderr.log")]
        finally:
            os.close(dir_fd)
        writers = []
        for log in logs:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_fd, False)
            try:
                fcntl.fcntl(read_fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe only means more wake-ups
            self._sources[read_fd] = log
            self._epoll.register(read_fd, select.EPOLLIN)
            self._writers.append(write_fd)
            self._logs.append(log)
            writers.append(write_fd)
        if not self._started:
            self._started = True
            self._thread.start()
        return HostLogs(writers[0], writers[1], logs[0], logs[1], self)

    def flush(self, log: CappedLog) -> None:
        """Drain the pipe feeding `log` now (a dead host's last words, before its stderr tail is read)."""
        for fd, source in list(self._sources.items()):
            if source is log:
                self._drain(fd, source, bytearray(1 << 16), budget=1 << 62)

    def _drain(self, fd: int, log: CappedLog, buf: bytearray | None = None, budget: int = ROUND_BUDGET) -> int:
        """Read what the pipe holds (up to `budget`) into `buf` (the pump's own by default) and hand it to
        the log; with the log's lock held, so a flush from another thread takes turns with the pump."""
        buf = self._buf if buf is None else buf
        view = memoryview(buf)
        total = 0
        with log.lock:
            while total < budget:
                try:
                    n = os.readv(fd, [buf])
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    break
                if not n:
                    break  # every writer gone (only at close: we hold a write end)
                total += n
                log.write(view[:n])
        self.bytes_read += total
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._epoll.poll(1.0)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # closed under us
            budget = ROUND_TOTAL
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                log = self._sources.get(fd)
                if log is not None and budget > 0:
                    budget -= self._drain(fd, log, budget=min(ROUND_BUDGET, budget))
            if events:
                time.sleep(ROUND_PAUSE)

    def close(self) -> None:
        """Stop the thread, take what is left in the pipes, close everything."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._started:
            self._thread.join(timeout=30)
        for fd in self._writers:
            os.close(fd)
        self._writers = []
        for fd, log in list(self._sources.items()):
            self._drain(fd, log, budget=64 << 20)  # the thread has ended: its buffer is free
            self._epoll.unregister(fd)
            os.close(fd)
        self._sources.clear()
        for log in self._logs:
            log.close()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
