"""Sub-millisecond sleeps for trio through a timerfd.

trio waits in epoll, whose timeout Python rounds up to whole milliseconds, so trio.sleep_until
wakes up to ~1 ms late. The load driver must send each request at its intended time, so it arms
a timerfd (nanosecond resolution, same CLOCK_MONOTONIC as time.perf_counter) and waits for it to
become readable instead.
"""

from __future__ import annotations

import ctypes
import os
import time

import trio

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = 0o4000
TFD_CLOEXEC = 0o2000000
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]


class PreciseTimer:
    """`await timer.sleep_until(trio_deadline)` with ~10 µs precision instead of ~1 ms."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd = fd
        self._spec = _Itimerspec()
        # trio's clock is perf_counter plus a fixed offset; both read CLOCK_MONOTONIC on Linux.
        self._offset = trio.current_time() - time.perf_counter()

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)

    def arm(self, deadline: float) -> None:
        """Make the fd readable at `deadline` (trio clock), for a loop that waits on it among other fds
        (the driver's engine); a deadline already past makes it readable at once."""
        monotonic = max(deadline - self._offset, 1e-9)
        seconds = int(monotonic)
        self._spec.it_value.tv_sec = seconds
        self._spec.it_value.tv_nsec = max(int((monotonic - seconds) * 1e9), 1)
        if _libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def consume(self) -> None:
        """Read the expiry count, so the fd is no longer readable."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    async def sleep_until(self, deadline: float) -> None:
        monotonic = deadline - self._offset
        if monotonic <= time.perf_counter():
            await trio.lowlevel.checkpoint()
            return
        seconds = int(monotonic)
        self._spec.it_value.tv_sec = seconds
        self._spec.it_value.tv_nsec = int((monotonic - seconds) * 1e9)
        if _libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        await trio.lowlevel.wait_readable(self.fd)
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
