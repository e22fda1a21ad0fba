"""Isolation of hosts: each in its own cgroup (limits, accounting, kill) and PID namespace (nothing it
started outlives it). The spawner (harness/run/procs.py) calls into this at three points: on its thread
around the fork (`HostJail.forking`), in the child before exec (`HostJail.in_child`), and after the
host's exit (`Incarnation.release`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from harness.run.reaper import TAG_VAR
from harness.run.isolation.cgroups import CgroupSupport, HarnessCgroups, HostCgroup, support
from harness.run.isolation.netns import HostNet, NetNamespaces
from harness.run.isolation.pidns import Anchor, PidNamespaces, ns_pid

__all__ = ["Isolation", "HostJail", "Incarnation", "HostCgroup", "HarnessCgroups", "CgroupSupport", "support", "ns_pid",
           "preflight"]


@dataclass
class Incarnation:
    """One spawn's isolation: its namespace anchor (if any) and its host's cgroup."""

    anchor: Anchor | None = None
    cgroup: HostCgroup | None = None
    ns_pid: int | None = None          # the target's pid inside its namespace (what it sees as getpid())
    oom_before: int | None = None      # the cgroup's OOM-kill count when it started (harness/run/isolation/limits)
    net: HostNet | None = None         # its network namespace (isolation: netns)

    def release(self) -> None:
        """After the target is reaped: kill what is left of it (the namespace, then the cgroup)."""
        if self.anchor is not None:
            self.anchor.release()
        if self.cgroup is not None:
            self.cgroup.kill_all()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid_namespace": self.anchor is not None}
        if self.anchor is not None:
            out["anchor"] = self.anchor.pid
        if self.cgroup is not None:
            out["cgroup"] = self.cgroup.describe()["paths"]
        if self.net is not None:
            out.update(self.net.describe())
        return out


@dataclass
class HostJail:
    """A host's isolation settings and cgroup, for every incarnation."""

    name: str
    pidns: PidNamespaces | None
    cgroup: HostCgroup | None
    net: HostNet | None = None
    procs_files: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.procs_files = [p.encode() for p in self.cgroup.procs_files()] if self.cgroup else []

    @contextmanager
    def forking(self, tag: str = "") -> Iterator[Incarnation]:
        """On the spawner thread, around the fork of the target (`tag`: its reaper tag, which the anchor
        carries too, so that the sweeps of harness/run/reaper.py find it should it outlive the harness)."""
        oom_before = self.cgroup.oom_kills() if self.cgroup is not None else None
        if self.pidns is None:
            yield Incarnation(cgroup=self.cgroup, oom_before=oom_before, net=self.net)
            return
        with self.pidns.entered({TAG_VAR: tag} if tag else {}) as anchor:
            yield Incarnation(anchor=anchor, cgroup=self.cgroup, oom_before=oom_before, net=self.net)

    def in_child(self) -> None:
        """Between fork and exec: join the host's cgroups (so all it forks is counted, limited and killed
        with it), and enter its network namespace. A child that cannot does not run unconfined: it says why and
        exits 71."""
        if self.net is not None:
            try:
                self.net.enter()
            except OSError as exc:
                os.write(2, f"harness: {exc}\n".encode())
                os._exit(71)
        for path in self.procs_files:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            except OSError as exc:
                os.write(2, b"harness: cannot join the host's cgroup " + path + b": " +
                         (exc.strerror or "error").encode() + b"\n")
                os._exit(71)


def preflight(needs_cgroups: tuple[str, ...], needs_pid: bool) -> str | None:
    """One line naming what is missing for what a scenario asks (None when all is there)."""
    if needs_cgroups:
        missing = support().missing(needs_cgroups)
        if missing:
            return missing
    if needs_pid:
        probe = PidNamespaces()
        if probe.unavailable:
            return probe.unavailable
    return None


CONTROLLER_OF = {"memory": "memory", "cpu": "cpu", "pids": "pids"}


def scenario_problem(scenario: Any) -> str | None:
    """What this machine lacks for the scenario's resource faults and required isolation, in one line
    naming the fault or setting; None when it has everything (or the scenario asks for nothing)."""
    if scenario.fleet.simulated is not None:
        return None
    for fault in scenario.resource_faults:
        missing = preflight((CONTROLLER_OF[fault.kind],), False)
        if missing:
            return f"faults[{fault.index}] ({fault.kind} limit): {missing}"
    for group in scenario.host_groups:
        spec = group.target.isolation
        where = f"group {group.name}" if group.name else "target"
        if spec.cgroup:
            missing = None
            if os.geteuid() != 0 or not support().usable:
                missing = support().missing(("memory",)) or "no cgroup filesystem is mounted"
            if missing:
                return f"{where}: isolation: cgroup: {missing}"
        if spec.pid:
            missing = preflight((), True)
            if missing:
                return f"{where}: isolation: pid: {missing}"
        if spec.netns:
            from harness.run.isolation.netns import unavailable
            missing = unavailable()
            if missing:
                return f"{where}: isolation: netns: {missing}"
    return None


class Isolation:
    """Per spawner: makes each host's jail. `pid`/`cgroup`: None = where the machine allows (auto)."""

    def __init__(self, token: str):
        self.token = token
        self.pidns = PidNamespaces()
        found = support()
        self.cgroups = HarnessCgroups(token, found) if os.geteuid() == 0 and found.usable else None
        self.netns = NetNamespaces(token)
        self.notes: list[str] = []

    def watchdog_dirs(self) -> list[str]:
        """The cgroup folders this spawner may create: what its watchdog removes if the harness dies."""
        return self.cgroups.parent_dirs() if self.cgroups is not None else []

    def cgroup_bases(self) -> list[str]:
        """Where parent folders of every harness go (for the sweep of those left by dead harnesses)."""
        return [str(h.base) for h in self.cgroups.support.hierarchies] if self.cgroups is not None else []

    def network(self) -> HostNet:
        """A network namespace with its veth pair (OSError when it cannot be made)."""
        return self.netns.create()

    def jail(self, name: str, *, pid: bool = True, cgroup: bool = True, net: HostNet | None = None) -> HostJail:
        host_cgroup = None
        if cgroup and self.cgroups is not None:
            try:
                host_cgroup = self.cgroups.create(name)
            except OSError as exc:
                self.notes.append(f"no cgroup for {name}: {exc.strerror or exc}")
        return HostJail(name, self.pidns if pid else None, host_cgroup, net)

    def release(self, jails: list[HostJail]) -> list[str]:
        """A trial is over: remove its hosts' cgroups (their processes are gone)."""
        stuck: list[str] = []
        for jail in jails:
            if jail.net is not None and not self.netns.release(jail.net):
                stuck.append(f"network namespace {jail.net.name}")
            if jail.cgroup is not None and self.cgroups is not None:
                if not jail.cgroup.remove():
                    stuck += [str(d) for d in jail.cgroup.dirs.values() if d.exists()]
                if jail.cgroup in self.cgroups.hosts:
                    self.cgroups.hosts.remove(jail.cgroup)
        return stuck

    def close(self) -> list[str]:
        """Remove the cgroups (every host has exited); returns folders that would not go."""
        stuck = self.cgroups.close() if self.cgroups is not None else []
        stuck += [f"network namespace {name}" for name in self.netns.close()]
        self.pidns.close()
        return stuck
