"""Finding and killing every process a harness started, wherever it went.

A host's process group does not hold everything: a target may setsid() a child out of it (a
daemonising helper), and when the harness is killed with SIGKILL only the direct child gets the
parent-death signal, so the rest of its group lives on, reparented to init. What those processes
keep is their environment: every process a spawner starts carries HARNESS_PROCESS_TAG=OWNER/S/N
(OWNER names the harness: pid namespace, pid, start time; S the spawner, N the spawn), and children
inherit it.
Three sweeps use it:
- after a host's leader is reaped: whatever still carries its tag (escaped the group) is killed;
- the watchdog (this file run as a script, one per harness, in its own session): it blocks on a
  pipe from the harness; when the harness dies, however it dies, the kernel closes the pipe and
  the watchdog kills everything tagged by its spawner (OWNER/S);
- at the start of a run: processes tagged by a harness that no longer runs (harness and watchdog
  both killed) are killed.
A process that clears its environment (execve with a fresh one) escapes all three.

Standard library only, and no package imports: the watchdog runs this file with `python -I -S`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

TAG_VAR = "HARNESS_PROCESS_TAG"
SCRIPT = os.path.abspath(__file__)  # what the watchdog runs
_TAG_PREFIX = TAG_VAR.encode() + b"="


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "?"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_id() -> str:
    """This process as a tag owner: pid namespace, pid, start time (a reused pid is another owner)."""
    stat = _stat(os.getpid())
    return f"{_pid_namespace()}.{os.getpid()}.{stat[1] if stat else 0}"


def owner_running(owner: str) -> bool:
    """Is the harness that wrote this owner id still running? Owners from another pid namespace
    cannot be judged from here, so they count as running (left alone)."""
    try:
        namespace, pid, start = owner.split(".")
        if namespace != _pid_namespace():
            return True
        stat = _stat(int(pid))
        return stat is not None and stat[0] not in ("Z", "X") and stat[1] == int(start)
    except ValueError:
        return True  # not a tag we wrote


def read_tag(pid: int) -> str | None:
    """The process's tag; None without one, or once it has exited (an exiting process's
    environment reads empty)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(_TAG_PREFIX):
            return entry[len(_TAG_PREFIX):].decode(errors="replace")
    return None


def tagged_processes() -> Iterator[tuple[int, str]]:
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            tag = read_tag(int(name))
            if tag is not None:
                yield int(name), tag


def _kill_if_still(pid: int, match: Callable[[str], bool]) -> bool:
    """SIGKILL through a pidfd after checking the tag again: the pid cannot be reused between the
    check and the signal."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        tag = read_tag(pid)
        if tag is None or not match(tag):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def kill_tagged(match: Callable[[str], bool], passes: int = 20) -> list[int]:
    """SIGKILL every process whose tag matches; again until none is left (one may fork while we
    look). Returns the pids killed."""
    killed: list[int] = []
    for _ in range(passes):
        victims = [pid for pid, tag in tagged_processes() if match(tag)]
        if not victims:
            break
        for pid in victims:
            if _kill_if_still(pid, match) and pid not in killed:
                killed.append(pid)
        time.sleep(0.01)  # give the killed ones time to exit before looking again
    return killed


def kill_spawn(tag: str) -> list[int]:
    """Everything still carrying one spawn's tag."""
    return kill_tagged(lambda found: found == tag)


def kill_owned(prefix: str) -> list[int]:
    """Everything left by any spawn of one harness (OWNER) or of one of its spawners (OWNER/S)."""
    return kill_tagged(lambda found: found.startswith(prefix + "/"))


def kill_orphans() -> list[int]:
    """Everything left by harnesses that no longer run."""
    verdicts: dict[str, bool] = {}

    def orphaned(tag: str) -> bool:
        owner = tag.split("/", 1)[0]
        if owner not in verdicts:
            verdicts[owner] = not owner_running(owner)
        return verdicts[owner]

    return kill_tagged(orphaned)


def _cgroup_pids(directory: str) -> list[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as handle:
            return [int(p) for p in handle.read().split()]
    except (OSError, ValueError):
        return []


def remove_cgroups(parents: list[str]) -> list[str]:
    """Kill every process in the host cgroups under these parent folders (harness/run/isolation/cgroups.py
    makes them) and remove the folders. Returns the folders removed."""
    removed = []
    for parent in parents:
        try:
            leaves = [os.path.join(parent, n) for n in os.listdir(parent)
                      if os.path.isdir(os.path.join(parent, n))]
        except OSError:
            continue
        for directory in leaves + [parent]:
            kill_file = os.path.join(directory, "cgroup.kill")
            if os.path.exists(kill_file):
                try:
                    with open(kill_file, "w") as handle:
                        handle.write("1")
                except OSError:
                    pass
            for _ in range(100):
                pids = _cgroup_pids(directory)
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    os.rmdir(directory)
                    removed.append(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)   # processes leave a cgroup a moment after they die
    return removed


def orphaned_cgroups(bases: list[str], prefix: str = "harness-") -> list[str]:
    """Parent folders (harness-OWNER-S) left by harnesses that no longer run."""
    found = []
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and not owner_running(name[len(prefix):].rsplit("-", 1)[0]):
                found.append(os.path.join(base, name))
    return found


NETNS_DIR = "/run/netns"


def remove_netns(names: list[str]) -> list[str]:
    """Delete these network namespaces (harness/run/isolation/netns.py; their veth pairs go with them)."""
    import subprocess
    removed = []
    for name in names:
        try:
            if subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30).returncode == 0:
                removed.append(name)
        except (OSError, subprocess.SubprocessError):
            continue
    return removed


def netns_of(token: str) -> list[str]:
    """The network namespaces one spawner made (harness-TOKEN-N)."""
    try:
        return [n for n in os.listdir(NETNS_DIR) if n.startswith(f"harness-{token}-")]
    except OSError:
        return []


def orphaned_netns() -> list[str]:
    """Network namespaces left by harnesses that no longer run (harness-OWNER-S-N)."""
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return []
    return [n for n in names if n.startswith("harness-") and n.count("-") >= 3
            and not owner_running(n[len("harness-"):].rsplit("-", 2)[0])]


def watch(prefix: str, cgroups: list[str] | None = None) -> None:
    """Block until stdin (a pipe from the harness) closes, then kill what the harness left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is for the harness, which stops its hosts itself
    while os.read(0, 4096):
        pass
    kill_owned(prefix)
    remove_cgroups(cgroups or [])
    remove_netns(netns_of(prefix.replace("/", "-")))


if __name__ == "__main__":
    watch(sys.argv[1], sys.argv[2:])
