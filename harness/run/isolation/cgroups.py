"""Per-host cgroups: limits (memory, CPU quota, pids), accounting, and killing everything a host started.

Where the controllers are: cgroup v1 (one hierarchy per controller, as on this machine), v2 (one unified
hierarchy), or both (v1 controllers plus an empty unified hierarchy, which still has cgroup.kill and
cpu.stat). Each harness's spawner gets its own parent folder per hierarchy, `harness-<owner>-<spawner>`:
- v1: under the harness's own cgroup of that hierarchy (the hosts stay inside the harness's limits);
- v2 with controllers: at the root of the hierarchy (a cgroup holding processes cannot hand controllers
  to its children), using only controllers the root already delegates (the harness changes no system
  setting).
Host folders below it are removed when the harness stops; what a harness killed with SIGKILL leaves,
its watchdog removes, or the next run (reaper.remove_cgroups).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTROLLERS = ("memory", "cpu", "pids")       # what resource faults set
ACCOUNTING = ("cpuacct",)                     # v1 only: CPU time (v2 has it in cpu.stat)
PARENT_PREFIX = "harness-"
UNLIMITED = None


@dataclass(frozen=True)
class Hierarchy:
    version: int                  # 1 or 2
    mount: Path                   # where it is mounted
    controllers: frozenset[str]   # v1: the controllers bound to it; v2: those usable below `base`
    base: Path                    # where this harness creates its parent folder

    def has(self, controller: str) -> bool:
        return controller in self.controllers


@dataclass
class CgroupSupport:
    """What this machine offers, found once per process; `problems` says why something is missing."""

    hierarchies: list[Hierarchy] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def for_controller(self, name: str) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.has(name)), None)

    @property
    def unified(self) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.version == 2), None)

    @property
    def usable(self) -> bool:
        return bool(self.hierarchies)

    def missing(self, controllers: tuple[str, ...]) -> str | None:
        """One line naming what is missing for these controllers, or None."""
        if os.geteuid() != 0:
            return "per-host cgroups need root (the harness runs as uid %d)" % os.geteuid()
        absent = [c for c in controllers if self.for_controller(c) is None]
        if not absent:
            return None
        why = "; ".join(self.problems)
        return (f"the cgroup {'controller' if len(absent) == 1 else 'controllers'} {', '.join(absent)} "
                f"{'is' if len(absent) == 1 else 'are'} not available here (neither a v1 hierarchy nor delegated "
                f"in cgroup v2)" + (f": {why}" if why else ""))


def parse_mountinfo(text: str) -> list[tuple[int, Path, Path, frozenset[str]]]:
    """(version, mount point, root inside the hierarchy, v1 controllers) of each cgroup mount."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype = tail[0]
        point = Path(fields[4].replace("\\040", " "))
        root = Path(fields[3])
        if fstype == "cgroup2":
            mounts.append((2, point, root, frozenset()))
        elif fstype == "cgroup":
            options = set(tail[2].split(","))
            mounts.append((1, point, root, frozenset(o for o in options if "=" not in o and o not in ("rw", "ro"))))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, Path]:
    """Controller (or '' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, Path] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        for name in names.split(",") if names else [""]:
            paths[name] = Path(path)
    return paths


def _inside(mount: Path, root: Path, own: Path) -> Path:
    """The folder of cgroup `own` in a hierarchy mounted at `mount` whose mount shows `root`."""
    try:
        relative = own.relative_to(root)
    except ValueError:
        relative = Path(".")  # a container sees only its own subtree: its cgroup is the mount's root
    return mount / relative


def detect(mountinfo: str | None = None, proc_cgroup: str | None = None) -> CgroupSupport:
    support = CgroupSupport()
    try:
        mountinfo = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
        proc_cgroup = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    except OSError as exc:
        support.problems.append(f"cannot read /proc: {exc.strerror}")
        return support
    own = parse_proc_cgroup(proc_cgroup)
    seen: set[Path] = set()
    for version, point, root, controllers in sorted(parse_mountinfo(mountinfo), key=lambda m: m[0]):
        if point in seen:
            continue
        seen.add(point)
        if version == 1:
            usable = controllers & set(CONTROLLERS + ACCOUNTING)
            if not usable:
                continue
            path = next((own[c] for c in usable if c in own), Path("/"))
            support.hierarchies.append(Hierarchy(1, point, frozenset(usable), _inside(point, root, path)))
        else:
            offered = _read_words(point / "cgroup.controllers")
            delegated = _read_words(point / "cgroup.subtree_control")
            usable = frozenset(c for c in CONTROLLERS if c in offered and c in delegated)
            taken_by_v1 = {c for h in support.hierarchies for c in h.controllers}
            if usable - taken_by_v1:
                # controllers come only from the root's delegation: create at the root
                support.hierarchies.append(Hierarchy(2, point, usable - taken_by_v1, point))
            else:
                # no controllers (hybrid): still cgroup.kill and cpu.stat, in our own cgroup's subtree
                support.hierarchies.append(Hierarchy(2, point, frozenset(), _inside(point, root, own.get("", Path("/")))))
                missing = [c for c in CONTROLLERS if c in offered and c not in delegated and c not in taken_by_v1]
                if missing:
                    support.problems.append(f"cgroup v2 offers {', '.join(missing)} but the root does not delegate "
                                            f"{'it' if len(missing) == 1 else 'them'} (cgroup.subtree_control)")
    if not any(h.version == 1 for h in support.hierarchies) and support.unified is None:
        support.problems.append("no cgroup filesystem is mounted")
    return support


_detected: CgroupSupport | None = None


def support() -> CgroupSupport:
    global _detected
    if _detected is None:
        _detected = detect()
    return _detected


def _read_words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _keyed(path: Path) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, memory.oom_control, pids.events)."""
    values: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class HostCgroup:
    """One host's cgroup in every hierarchy (it outlives the host's restarts: limits and counters stay)."""

    def __init__(self, name: str, dirs: dict[Hierarchy, Path]):
        self.name = name
        self.dirs = dirs

    def dir_of(self, controller: str) -> Path | None:
        return next((d for h, d in self.dirs.items() if h.has(controller)), None)

    @property
    def unified_dir(self) -> Path | None:
        return next((d for h, d in self.dirs.items() if h.version == 2), None)

    def procs_files(self) -> list[str]:
        """What a child writes '0' to, between fork and exec, to join (every hierarchy)."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def describe(self) -> dict[str, Any]:
        return {"version": sorted({h.version for h in self.dirs}),
                "paths": {",".join(sorted(h.controllers)) or f"v{h.version}": str(d) for h, d in self.dirs.items()}}

    # --- limits --------------------------------------------------------------------------------

    def set_memory(self, limit: int | None) -> dict[str, Any]:
        """Memory limit in bytes (None: unlimited). v1 may refuse a limit below what the host already
        uses and cannot reclaim (EBUSY): then the limit is set at what it uses, so any growth is OOM-killed;
        the result says so."""
        directory = self.dir_of("memory")
        if directory is None:
            return {"error": "no memory controller"}
        version = next(h.version for h, d in self.dirs.items() if d == directory)
        if version == 2:
            try:
                _write(directory / "memory.max", "max" if limit is None else str(limit))
                if limit is not None and (directory / "memory.swap.max").exists():
                    _write(directory / "memory.swap.max", "0")
                return {"limit": limit}
            except OSError as exc:
                return {"limit": None, "error": exc.strerror or str(exc)}
        return self._set_memory_v1(directory, limit)

    def _set_memory_v1(self, directory: Path, limit: int | None) -> dict[str, Any]:
        memsw = directory / "memory.memsw.limit_in_bytes"
        has_memsw = memsw.exists()
        value = "-1" if limit is None else str(limit)
        try:
            if limit is None:
                if has_memsw:
                    _write(memsw, "-1")   # memsw >= limit at all times: raise it first
                _write(directory / "memory.limit_in_bytes", "-1")
                return {"limit": None}
            try:
                _write(directory / "memory.limit_in_bytes", value)
                applied = limit
                note = None
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                usage = _read_int(directory / "memory.usage_in_bytes") or limit
                applied = max(limit, usage)
                _write(directory / "memory.limit_in_bytes", str(applied))
                note = f"usage {usage} above the limit and not reclaimable: limit set at the usage"
            if has_memsw:
                _write(memsw, str(applied))   # no swapping around the limit
            return {"limit": applied, **({"note": note} if note else {})}
        except OSError as exc:
            return {"limit": None, "error": exc.strerror or str(exc)}

    def set_cpu(self, quota: float | None, period_us: int = 100_000) -> dict[str, Any]:
        """CPU quota as a fraction of one CPU (0.2 = 20% of a core; 2.0 = two cores); None: unlimited."""
        directory = self.dir_of("cpu")
        if directory is None:
            return {"error": "no cpu controller"}
        version = next(h.version for h, d in self.dirs.items() if d == directory)
        quota_us = None if quota is None else max(1000, int(quota * period_us))
        try:
            if version == 2:
                _write(directory / "cpu.max", f"{'max' if quota_us is None else quota_us} {period_us}")
            else:
                _write(directory / "cpu.cfs_period_us", str(period_us))
                _write(directory / "cpu.cfs_quota_us", "-1" if quota_us is None else str(quota_us))
            return {"quota": quota, "quota_us": quota_us, "period_us": period_us}
        except OSError as exc:
            return {"quota": None, "error": exc.strerror or str(exc)}

    def set_pids(self, limit: int | None) -> dict[str, Any]:
        directory = self.dir_of("pids")
        if directory is None:
            return {"error": "no pids controller"}
        try:
            _write(directory / "pids.max", "max" if limit is None else str(limit))
            return {"limit": limit}
        except OSError as exc:
            return {"limit": None, "error": exc.strerror or str(exc)}

    # --- accounting ------------------------------------------------------------------------------

    def oom_kills(self) -> int | None:
        """How many processes the kernel's OOM killer has killed in this cgroup (None: not known here)."""
        directory = self.dir_of("memory")
        if directory is None:
            return None
        version = next(h.version for h, d in self.dirs.items() if d == directory)
        counts = _keyed(directory / ("memory.events" if version == 2 else "memory.oom_control"))
        return counts.get("oom_kill")

    def stats(self) -> dict[str, Any]:
        """Memory (bytes now, peak, limit), CPU seconds, throttling, pids, OOM kills: what the cgroup counted
        for every process of the host, not just the leader psutil reads."""
        out: dict[str, Any] = {}
        memory = self.dir_of("memory")
        if memory is not None:
            if (memory / "memory.current").exists():
                out["memory"] = _read_int(memory / "memory.current")
                out["memory_peak"] = _read_int(memory / "memory.peak")
                limit = _read(memory / "memory.max")
                out["memory_limit"] = None if limit in (None, "max") else int(limit)
                events = _keyed(memory / "memory.events")
                out["memory_events"] = events.get("max")
            else:
                out["memory"] = _read_int(memory / "memory.usage_in_bytes")
                out["memory_peak"] = _read_int(memory / "memory.max_usage_in_bytes")
                limit = _read_int(memory / "memory.limit_in_bytes")
                out["memory_limit"] = limit if limit is not None and limit < 2**62 else None
                out["memory_events"] = _read_int(memory / "memory.failcnt")
            out["oom_kills"] = self.oom_kills()
        cpu_seconds = None
        cpuacct = self.dir_of("cpuacct")
        if cpuacct is not None:
            usage = _read_int(cpuacct / "cpuacct.usage")
            cpu_seconds = usage / 1e9 if usage is not None else None
        unified = self.unified_dir
        if cpu_seconds is None and unified is not None:
            usage = _keyed(unified / "cpu.stat").get("usage_usec")
            cpu_seconds = usage / 1e6 if usage is not None else None
        out["cpu_seconds"] = cpu_seconds
        cpu = self.dir_of("cpu")
        if cpu is not None:
            stat = _keyed(cpu / "cpu.stat")
            out["throttled"] = stat.get("nr_throttled")
            if "throttled_usec" in stat:
                out["throttled_seconds"] = stat["throttled_usec"] / 1e6
            elif "throttled_time" in stat:
                out["throttled_seconds"] = stat["throttled_time"] / 1e9
        pids = self.dir_of("pids")
        if pids is not None:
            out["pids"] = _read_int(pids / "pids.current")
            out["pids_refused"] = _keyed(pids / "pids.events").get("max")
        return out

    # --- ending ----------------------------------------------------------------------------------

    def processes(self) -> list[int]:
        for directory in self.dirs.values():
            text = _read(directory / "cgroup.procs")
            if text is not None:
                return [int(p) for p in text.split()]
        return []

    def kill_all(self, passes: int = 50) -> int:
        """SIGKILL everything in the cgroup (cgroup.kill where the kernel has it: atomic, fork-proof)."""
        killed = 0
        unified = self.unified_dir
        if unified is not None and (unified / "cgroup.kill").exists():
            try:
                before = len(self.processes())
                _write(unified / "cgroup.kill", "1")
                killed = before
            except OSError:
                pass
        for _ in range(passes):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except OSError:
                    pass
            time.sleep(0.01)
        return killed

    def remove(self) -> bool:
        """Kill what is left and remove the folders; False when one would not go."""
        self.kill_all()
        removed = True
        for directory in self.dirs.values():
            removed &= _rmdir(directory)
        return removed


def _rmdir(directory: Path, attempts: int = 100) -> bool:
    for _ in range(attempts):
        try:
            os.rmdir(directory)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return False
            time.sleep(0.02)   # exiting processes leave the cgroup a moment after they are reaped
    return False


class HarnessCgroups:
    """The cgroups of one spawner: a parent folder per hierarchy, one host cgroup per host."""

    def __init__(self, token: str, found: CgroupSupport | None = None):
        self.support = found if found is not None else support()
        self.token = token
        self.parents = {h: h.base / f"{PARENT_PREFIX}{token}" for h in self.support.hierarchies}
        self.hosts: list[HostCgroup] = []
        self._serial = 0

    def parent_dirs(self) -> list[str]:
        return [str(p) for p in self.parents.values()]

    def create(self, name: str, controllers: tuple[str, ...] = ()) -> HostCgroup:
        """A new host cgroup in every hierarchy (OSError when one cannot be made)."""
        self._serial += 1
        leaf = f"{self._serial}-{name}"
        dirs: dict[Hierarchy, Path] = {}
        try:
            for hierarchy, parent in self.parents.items():
                if not parent.exists():
                    os.mkdir(parent, 0o755)
                    if hierarchy.version == 2 and hierarchy.controllers:
                        _write(parent / "cgroup.subtree_control",
                               " ".join(f"+{c}" for c in sorted(hierarchy.controllers)))
                directory = parent / leaf
                os.mkdir(directory, 0o755)
                dirs[hierarchy] = directory
        except OSError:
            HostCgroup(name, dirs).remove()
            raise
        host = HostCgroup(name, dirs)
        self.hosts.append(host)
        return host

    def close(self) -> list[str]:
        """Remove every host cgroup and the parents; returns the folders that would not go."""
        stuck = []
        for host in self.hosts:
            if not host.remove():
                stuck += [str(d) for d in host.dirs.values() if d.exists()]
        self.hosts.clear()
        for parent in self.parents.values():
            if parent.exists() and not _rmdir(parent, attempts=10):
                stuck.append(str(parent))
        return stuck
