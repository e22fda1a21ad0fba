"""A PID namespace per host incarnation, so that nothing a host started can outlive it.

The namespace is held by an *anchor*: a process that does nothing but sleep as the namespace's init
(pid 1), with the parent-death signal set, SIGCHLD ignored (orphans that end up with it are reaped by
the kernel) and no tag or file of ours. The target itself is forked into the namespace *beside* the
anchor (pid 2), still a direct child of the harness, so its wait status (signal, core dump) and its pid
in /proc are what they were without a namespace, and it is no init: signals reach it as usual
(an init ignores signals it has no handler for, which would swallow a SIGTERM or an abort()).

When the anchor dies the kernel kills every process left in the namespace. So:
- after the target exits, the harness kills the anchor: whatever the target forked (in its process group
  or not, daemonised, with its environment cleared) dies with it;
- when the harness dies, however it dies, the anchor gets its parent-death signal: the kernel does the
  rest, with no watchdog needed.

How: on the spawner thread (the parent of every host), unshare(CLONE_NEWPID) makes the *next* child the
init of a new namespace and later children members of it; that thread forks the anchor, then the
target, then setns() back to the harness's own namespace for its next spawn. Needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
ANCHOR_NAME = "harness-pidns-anchor"
_libc = ctypes.CDLL(None, use_errno=True)
_SIG_IGN = ctypes.c_void_p(1)


@dataclass
class Anchor:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def release(self) -> None:
        """Kill the namespace (the anchor, and with it every process left in it) and reap the anchor.
        Call after the target is reaped: the kernel keeps the anchor until every member is gone."""
        if self.popen.returncode is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass
            self.popen.wait()


def _anchor_setup() -> None:
    # No check that the harness is still there (a parent outside the namespace reads as 0): should it
    # have died before prctl, the anchor carries the harness's tag, and the reaper's sweeps kill it.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _libc.signal(signal.SIGCHLD, _SIG_IGN)   # inherited over exec: the kernel reaps the orphans it adopts


def ns_pid(pid: int) -> int | None:
    """The process's pid inside its own namespace (the last NSpid field), None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


class PidNamespaces:
    """Makes the anchors; every method runs on the spawner thread."""

    def __init__(self) -> None:
        self.unavailable: str | None = None if os.geteuid() == 0 else "PID namespaces need root"
        self._home: int | None = None
        self._sleep = shutil.which("sleep") or "/bin/sleep"
        if self.unavailable is None and not os.path.exists("/proc/self/ns/pid"):
            self.unavailable = "this kernel has no PID namespaces (/proc/self/ns/pid is missing)"

    def close(self) -> None:
        if self._home is not None:
            os.close(self._home)
            self._home = None

    def _setns_home(self) -> None:
        assert self._home is not None
        if _libc.setns(self._home, CLONE_NEWPID) != 0:
            # Never fork another host into a namespace that is not ours: better to fail loudly.
            raise OSError(ctypes.get_errno(), "setns back to the harness's PID namespace failed")

    @contextmanager
    def entered(self, env: dict[str, str] | None = None) -> Iterator[Anchor | None]:
        """Within the block, this thread's next fork lands in a fresh namespace beside its anchor; None
        (and an ordinary fork) when namespaces cannot be had here, with `unavailable` saying why."""
        if self.unavailable is not None:
            yield None
            return
        if self._home is None:
            self._home = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        if _libc.unshare(CLONE_NEWPID) != 0:
            error = ctypes.get_errno()
            self.unavailable = f"unshare(CLONE_NEWPID) failed: {os.strerror(error)}"
            yield None
            return
        anchor: Anchor | None = None
        try:
            anchor = Anchor(subprocess.Popen(
                [ANCHOR_NAME, "infinity"], executable=self._sleep, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env=env or {}, close_fds=True,
                start_new_session=True, preexec_fn=_anchor_setup))
        except BaseException:
            self._setns_home()
            raise
        try:
            yield anchor
        except BaseException:
            anchor.release()
            raise
        finally:
            self._setns_home()
