"""Starting, waiting for and stopping target processes without ever leaving one behind.

- Children get PR_SET_PDEATHSIG=SIGKILL, so they die with the harness even when it is killed
  with SIGKILL. The kernel ties that signal to the *thread* that forked, not the process, and
  trio.to_thread's worker threads come and go; so every fork happens on one long-lived
  spawner thread that lives as long as the harness.
- Each child leads its own process group (a target that forks is stopped as a whole).
- Exits are awaited through a pidfd (no SIGCHLD handler, no polling) and reaped with waitpid,
  which keeps the raw status: signal number and whether a core was dumped.
- RLIMIT_CORE is raised in the child so crashes leave cores in the host's directory.
- What leaves the group (setsid) or outlives a SIGKILLed harness (the leader's children: the
  parent-death signal is not inherited) is found by the tag every spawn carries in its
  environment and killed: after each exit, by a watchdog process when the harness dies, and at
  the next start (see harness/run/reaper.py).
- Isolation (harness/run/isolation): each host in its own cgroup and, as root, its own PID namespace, so
  that whatever it forked dies with it, even when nothing of the harness is left to kill it.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import trio

from harness.run import reaper
from harness.run.isolation import HostJail, Incarnation, Isolation, ns_pid

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_spawners = itertools.count(1)  # tags stay distinct when one process has several spawners


def _child_setup(parent_pid: int, jail: HostJail | None = None) -> None:
    # Runs in the child between fork and exec.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The harness died before prctl took effect? (In a PID namespace, a parent outside it reads as 0.)
    if os.getppid() not in (parent_pid, 0):
        os._exit(70)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    if jail is not None:
        jail.in_child()


@dataclass
class Child:
    pid: int
    popen: subprocess.Popen[bytes]
    reaped: bool = False
    status: int | None = None
    tag: str = ""            # reaper.TAG_VAR in its environment, inherited by all it forks
    exited_at: float | None = None     # time.monotonic() when its exit was seen (not when it was reaped)
    dead_before_stop: bool = False     # stop() found it already dead: it did not die of being stopped
    incarnation: Incarnation | None = None   # its PID namespace and cgroup (harness/run/isolation)

    def signal_group(self, sig: int) -> bool:
        """Signal the whole process group; False when it is already gone."""
        if self.reaped:
            return False
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False


class Spawner:
    """Forks children from a single thread that outlives them all (see module docstring)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-spawner")
        self._parent = os.getpid()
        self._prefix = f"{reaper.owner_id()}/{next(_spawners)}"
        self._serial = 0
        # Leftovers of harnesses killed with their watchdog (kill -9 of both): nobody else will.
        self.orphans_killed = reaper.kill_orphans()
        self.isolation = Isolation(self._prefix.replace("/", "-"))
        self.orphan_cgroups = reaper.remove_cgroups(reaper.orphaned_cgroups(self.isolation.cgroup_bases()))
        self.orphan_netns = reaper.remove_netns(reaper.orphaned_netns())
        self._watchdog, self._watch_fd = _start_watchdog(self._prefix, self.isolation.watchdog_dirs())
        # Targets get the umask the harness was started with (the harness itself runs with 077).
        self.child_umask = -1

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.isolation.close()
        _stop_watchdog(self._watchdog, self._watch_fd)
        self._watchdog, self._watch_fd = None, None

    def _spawn_sync(self, argv: list[str], cwd: Path, env: dict[str, str], stdout: Path | int,
                    stderr: Path | int, pass_fds: tuple[int, ...] = (), jail: HostJail | None = None) -> Child:
        self._serial += 1
        tag = f"{self._prefix}/{self._serial}"
        env = {**env, reaper.TAG_VAR: tag}
        # Pipes the harness drains (harness/run/logsink.py), or files (never through a symlink, 0600).
        out_fd = stdout if isinstance(stdout, int) else _open_log(stdout)
        err_fd = stderr if isinstance(stderr, int) else _open_log(stderr)
        try:
            with jail.forking(tag) if jail is not None else nullcontext(None) as incarnation:
                popen = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd,
                    start_new_session=True, close_fds=True, preexec_fn=lambda: _child_setup(self._parent, jail),
                    umask=self.child_umask,
                    pass_fds=pass_fds,
                )
        finally:
            if not isinstance(stdout, int):
                os.close(out_fd)
            if not isinstance(stderr, int):
                os.close(err_fd)
        if incarnation is not None and incarnation.anchor is not None:
            incarnation.ns_pid = ns_pid(popen.pid)
        return Child(pid=popen.pid, popen=popen, tag=tag, incarnation=incarnation)

    async def spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str], stdout: Path | int,
                    stderr: Path | int, pass_fds: tuple[int, ...] = (), jail: HostJail | None = None) -> Child:
        """`pass_fds`: descriptors the child inherits (a driver worker's control socket); `jail`: the host's
        cgroup and PID namespace settings (harness/run/isolation), if any."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future: Future[Child] = self._executor.submit(self._spawn_sync, argv, cwd, env, stdout, stderr, pass_fds,
                                                      jail)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        # Shielded: once a fork is asked for, we must learn its pid, or we could not stop it.
        with trio.CancelScope(shield=True):
            await done.wait()
        return future.result()


async def wait_exit(child: Child) -> int:
    """Wait for the child to exit, kill what is left of its group, reap it; returns the raw status."""
    if child.reaped:
        assert child.status is not None
        return child.status
    pidfd = os.pidfd_open(child.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
    if child.exited_at is None:    # the moment of death as near as we see it (the clean-up below takes time)
        child.exited_at = time.monotonic()
    # The leader is a zombie now, so its pid (= the group id) cannot be reused yet: clean up any
    # children it forked before reaping it.
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(child.pid, 0)
    child.reaped = True
    child.status = status
    child.popen.returncode = _returncode(status)  # so Popen never tries to reap a reused pid
    return status


async def sweep(child: Child) -> None:
    """Kill what left the child's process group (setsid): its PID namespace and cgroup (harness/run/isolation),
    and what still carries its tag. Separate from wait_exit, which must return at once: the caller tells
    the balancer first."""
    def work() -> None:
        if child.incarnation is not None:
            child.incarnation.release()
        if child.tag:
            reaper.kill_spawn(child.tag)
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(work)


async def stop(child: Child, grace: float) -> int:
    """SIGTERM the group (resuming it if paused), SIGKILL after `grace`; always reaps, then kills
    what escaped the group."""
    with trio.CancelScope(shield=True):
        if not child.reaped and _has_exited(child.pid):
            child.dead_before_stop = True
            child.exited_at = child.exited_at or time.monotonic()
        if not child.reaped:
            child.signal_group(signal.SIGCONT)
            child.signal_group(signal.SIGTERM)
            with trio.move_on_after(grace):
                await wait_exit(child)
            if not child.reaped:
                child.signal_group(signal.SIGKILL)
        status = await wait_exit(child)  # at once when already reaped
        await sweep(child)
    return status


def _has_exited(pid: int) -> bool:
    """Whether our child has already exited (a zombie), without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _start_watchdog(prefix: str, cgroups: list[str] | None = None
                    ) -> tuple[subprocess.Popen[bytes] | None, int | None]:
    """The watchdog reads a pipe whose only writer is this process: when the harness dies, even by
    SIGKILL, the pipe closes and the watchdog kills what the harness left. Its own session keeps
    it out of a ^C or a kill of the harness's process group."""
    read_fd, write_fd = os.pipe()  # not inheritable: no target holds the write end open
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", reaper.SCRIPT, prefix, *(cgroups or [])], stdin=read_fd, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd="/", start_new_session=True, close_fds=True)
    except OSError:
        os.close(write_fd)
        return None, None  # degraded: the sweeps after each exit and at the next start remain
    finally:
        os.close(read_fd)
    return watchdog, write_fd


def _stop_watchdog(watchdog: subprocess.Popen[bytes] | None, write_fd: int | None) -> None:
    if write_fd is not None:
        os.close(write_fd)  # EOF: it sweeps (nothing left by now) and exits
    if watchdog is not None:
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


def _open_log(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_nlink != 1:
        os.close(fd)
        raise OSError(f"{path} has other links: not written")
    return fd


def _returncode(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else status


@dataclass(frozen=True)
class ExitInfo:
    status: int
    signal: int | None
    exit_code: int | None
    core_dumped: bool

    @classmethod
    def from_status(cls, status: int) -> "ExitInfo":
        if os.WIFSIGNALED(status):
            return cls(status, os.WTERMSIG(status), None, os.WCOREDUMP(status))
        return cls(status, None, os.WEXITSTATUS(status), False)

    def describe(self) -> str:
        if self.signal is not None:
            name = signal_name(self.signal)
            return f"killed by {name}" + (" (core dumped)" if self.core_dumped else "")
        return f"exited with code {self.exit_code}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"
