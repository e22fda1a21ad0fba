"""The fleet supervisor: one task per host that starts it, waits until it is ready, watches it
die, records why, and restarts it per the restart policy, as a container runtime would."""

from __future__ import annotations

import enum
import math
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from harness.base.errors import HarnessError
from harness.run.exchange import Outcome
from harness.run.hostprep import HostPrep
from harness.run.logsink import HostLogs
from harness.run.faults.network.topology import Backend, expand_args, expand_lines
from harness.run.procs import Child, ExitInfo, Spawner, signal_name, stop, sweep, wait_exit
from harness.scenario.model import Group, Target, Variant
from harness.shim.build import verify_path
from harness.scenario.variants import apply_variant, variant_for_group


class State(enum.Enum):
    STARTING = "starting"
    UP = "up"
    PAUSED = "paused"
    DOWN = "down"
    STOPPED = "stopped"


@dataclass
class Host:
    index: int
    name: str
    port: int
    dir: Path
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    state: State = State.DOWN
    child: Child | None = None
    started_at: float = 0.0           # monotonic, of the current incarnation
    incarnation: int = 0
    restarts: int = 0
    consecutive_failures: int = 0
    kill_expected: str | None = None  # why the harness itself killed it (host-loss), if it did
    down_until: float = 0.0
    crashes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    group: str = ""                   # its fleet group ("" in a fleet without groups)
    target: Target | None = None      # what it runs with (its group's target); None: the supervisor's
    logs: HostLogs | None = None      # pipes its output goes through (None: straight to the files)
    jail: Any = None                  # harness.run.isolation.HostJail: its cgroup and PID namespaces, if any
    addr: str = "127.0.0.1"           # where it listens (its own in a network namespace: isolation netns)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child and not self.child.reaped else None

    @property
    def stdout(self) -> Path:
        return self.dir / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.dir / "stderr.log"


class Recorder(Protocol):
    def event(self, kind: str, host: int | None = None, pid: int | None = None, *,
              happened_at: float | None = None, **detail: Any) -> None: ...
    def crash(self, record: dict[str, Any]) -> None: ...
    def now(self) -> float: ...


class Listener(Protocol):
    def host_ready(self, host: Host) -> None: ...
    def host_gone(self, host: Host) -> None: ...


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


_port_rng = random.Random()


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range: the harness's own client sockets
    take ephemeral ports, and one of them must never sit on a host's port while the host restarts."""
    low, _ = _ephemeral_range()
    start = 10000 if low > 12000 else 1024
    for _ in range(200):
        port = _port_rng.randrange(start, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # crowded machine: any free port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def write_rendered(path: Path, template: Path, values: dict[str, str], backends: list[Backend] | None = None) -> None:
    """A host's config file from its template, placeholders filled ({port} {dir} {index}...; a frontend's
    backend lines repeated per backend: harness/run/faults/network/topology.py); every other brace is left alone (nginx
    and VCL are full of them). Written without following a planted link."""
    try:
        text = template.read_text(encoding="utf-8")
        if backends is not None:
            text = expand_lines(text, backends)
        text = render(text, values)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"cannot write {path} from {template}: {exc}") from None


def assign_ports(count: int) -> list[int]:
    """`count` distinct free ports (see free_port), one per host of a fleet."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def plan_hosts(target: Target, count: int, hosts_dir: Path, command: tuple[str, ...],
               extra_env: dict[str, str], *, group: str = "", first: int = 0,
               taken: set[int] | None = None, ports: list[int] | None = None,
               backends: list[Backend] | None = None, addrs: list[str] | None = None,
               only: Collection[int] | None = None) -> list[Host]:
    """`count` hosts of one kind, numbered from `first` in the fleet. A group's hosts are named after it
    (estats-0, estats-1: what the report shows), others h<index>; `taken` keeps ports distinct across calls,
    `ports` gives them instead; `backends`: a frontend group's backend hosts, for its templates; `only`: the
    fleet indices to plan (one machine's share of a fleet spread over a cluster), default all."""
    hosts = []
    taken = set() if taken is None else taken
    for number in range(count):
        index = first + number
        if only is not None and index not in only:
            continue
        name = f"{group}-{number}" if group else f"h{index}"
        directory = hosts_dir / name
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)   # in the run's trusted 0700 folder
        if ports is not None:
            port = ports[number]
        else:
            port = free_port()
            while port in taken:
                port = free_port()
        taken.add(port)
        addr = addrs[number] if addrs is not None else "127.0.0.1"
        values = {"port": str(port), "host": name, "index": str(index), "dir": str(directory),
                  "root": str(target.root), "addr": addr}
        argv = [render(arg, values) for arg in (expand_args(list(command), backends) if backends is not None
                                                else command)]
        if "/" in argv[0] and not os.path.isabs(argv[0]):  # relative to the scenario's root
            argv[0] = str(target.root / argv[0])
        env = dict(os.environ)
        env.update({k: render(v, values) for k, v in target.env.items()})
        env.update(extra_env)
        cwd = Path(render(target.cwd, values))
        if not cwd.is_absolute():
            cwd = target.root / cwd
        for file_name, source in target.files:   # (not `name`: that is the host's)
            write_rendered(directory / file_name, target.root / source, values, backends)
        hosts.append(Host(index=index, name=name, port=port, dir=directory, argv=argv, env=env, cwd=cwd,
                          group=group, target=target, addr=addr))
    return hosts


def plan_fleet(groups: Sequence[Group], variant: Variant, hosts_dir: Path, *, ports: list[int] | None = None,
               backends: dict[str, list[Backend]] | None = None, addrs: list[str] | None = None,
               only: Collection[int] | None = None) -> list[Host]:
    """Every group's hosts in fleet order, each with its group's target and what the variant changes there.
    `ports`: each host's port, chosen beforehand (assign_ports); `backends`: each frontend group's backends;
    `only`: the fleet indices to plan, default all."""
    hosts: list[Host] = []
    taken: set[int] = set()
    first = 0
    for group in groups:
        applied = variant_for_group(variant, group.name)
        argv, env = apply_variant(group.target, applied, group.target.command)
        planned = plan_hosts(group.target, group.hosts, hosts_dir, tuple(argv), env, group=group.name,
                             first=first, taken=taken,
                             ports=ports[first:first + group.hosts] if ports is not None else None,
                             addrs=addrs[first:first + group.hosts] if addrs is not None else None,
                             backends=(backends or {}).get(group.name) if group.backends else None, only=only)
        for host in planned:
            host.extra["allocator"] = applied.allocator   # what the proof of this host must show
        hosts += planned
        first += group.hosts
    return hosts


class FleetSupervisor:
    def __init__(self, hosts: list[Host], target: Target, spawner: Spawner, recorder: Recorder,
                 listener: Listener,
                 on_crash: Callable[[Host, ExitInfo, dict[str, Any]], Awaitable[None]] | None = None,
                 prep: HostPrep | None = None,
                 prove: Callable[[Host, Child, str], Awaitable[None]] | None = None):
        """`prep` checks readiness by protocol and sends set-up requests (default: TCP connect, no set-up)."""
        self.hosts = hosts
        self.prep = prep
        # Proof of what runs (harness.collect.proof), taken for every incarnation: "exec" when it is started (from the
        # files: a host that dies before it is ready keeps that one), "ready" once it accepts connections and
        # before it joins the balancer's rotation, so before any load reaches it.
        self.prove = prove
        self.target = target
        self.spawner = spawner
        self.recorder = recorder
        self.listener = listener
        self.on_crash = on_crash
        self.first_start_failed: str | None = None
        self.first_start_failed_dir: Path | None = None   # the failing host's folder (its logs)
        self._fewest_alive: int | None = None   # since the sampler last looked
        # (trio time, hosts alive after) of every change not yet given to a sampled second, and the count
        # at the last second's boundary: a change belongs to the second it happened in
        self._alive_changes: list[tuple[float, int]] = []
        self._alive_at_boundary: int | None = None
        self._ready_once = {h.index: trio.Event() for h in hosts}   # a machine's share of a fleet, over a cluster
        self.forced = False     # a second SIGINT/SIGTERM: stop without grace

    def target_of(self, host: Host) -> Target:
        """A host's own settings (ready, restart, stop_grace): its group's in a mixed fleet."""
        return host.target or self.target

    def alive_count(self) -> int:
        return sum(1 for h in self.hosts if h.state in (State.UP, State.PAUSED, State.STARTING))

    def alive_now(self) -> int:
        return sum(1 for h in self.hosts if h.state in (State.UP, State.PAUSED))

    def take_fewest_alive(self, until: float | None = None) -> int:
        """Fewest hosts alive at any moment since the last call (a host down and back within one
        sampled second still shows). With `until` (trio time: the end of the second being sampled), only
        changes before it count: one that happened after it (a host killed at 4.000 s, seen by a sampler
        that ran at 4.002 s) belongs to the next second."""
        now = self.alive_now()
        if until is None:
            fewest = now if self._fewest_alive is None else min(self._fewest_alive, now)
            self._fewest_alive = now
            self._alive_changes, self._alive_at_boundary = [], now
            return fewest
        start = self._alive_at_boundary if self._alive_at_boundary is not None else now
        mine = [after for when, after in self._alive_changes if when < until]
        self._alive_changes = [(when, after) for when, after in self._alive_changes if when >= until]
        self._alive_at_boundary = mine[-1] if mine else start
        return min([start] + mine)

    def mark_alive_boundary(self) -> None:
        """The load starts: the per-second count of hosts alive starts from the hosts alive now."""
        self._alive_changes, self._alive_at_boundary, self._fewest_alive = [], self.alive_now(), None

    def _alive_changed(self) -> None:
        now = self.alive_now()
        self._alive_changes.append((trio.current_time(), now))
        self._fewest_alive = now if self._fewest_alive is None else min(self._fewest_alive, now)

    def _host_went_down(self) -> None:
        self._alive_changed()

    def up_count(self) -> int:
        return sum(1 for h in self.hosts if h.state == State.UP)

    async def wait_all_started(self) -> None:
        """Until every host has been ready once (or failed its first start)."""
        for event in self._ready_once.values():
            await event.wait()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for host in self.hosts:
                nursery.start_soon(self._supervise, host)

    # --- host-loss actions ------------------------------------------------------------------

    def kill(self, host: Host, why: str, down_for: float) -> bool:
        if host.child is None or host.child.reaped:
            return False
        host.kill_expected = why
        host.down_until = time.monotonic() + down_for
        host.child.signal_group(signal.SIGCONT)
        return host.child.signal_group(signal.SIGKILL)

    async def pause(self, host: Host, duration: float) -> bool:
        """SIGSTOP the host for `duration`, then SIGCONT. The balancer is not told: like a real
        stalled machine, it is found out by timeouts."""
        child = host.child
        if child is None or child.reaped or host.state != State.UP:
            return False
        child.signal_group(signal.SIGSTOP)
        host.state = State.PAUSED
        self.recorder.event("pause", host.index, child.pid, duration=duration)
        try:
            await trio.sleep(duration)
        finally:
            if child is host.child and not child.reaped:
                child.signal_group(signal.SIGCONT)
                if host.state == State.PAUSED:
                    host.state = State.UP
                with trio.CancelScope(shield=True):
                    self.recorder.event("resume", host.index, child.pid)
        return True

    # --- the per-host loop ------------------------------------------------------------------

    async def _supervise(self, host: Host) -> None:
        policy = self.target_of(host).restart
        try:
            while True:
                delay = host.down_until - time.monotonic()
                if delay > 0:
                    await trio.sleep(delay)
                info = await self._run_once(host)
                self._ready_once[host.index].set()
                expected = host.kill_expected not in (None, "ready-timeout", "setup-failed")
                if info is not None and time.monotonic() - host.started_at >= policy.reset_after:
                    host.consecutive_failures = 0
                if not expected:
                    host.consecutive_failures += 1
                if policy.policy == "never" or (policy.policy == "on-failure" and info is not None
                                                and info.exit_code == 0 and host.kill_expected is None):
                    host.state = State.STOPPED
                    self.recorder.event("no-restart", host.index, policy=policy.policy)
                    return
                failures = max(1, host.consecutive_failures)
                backoff = min(policy.backoff * (2 ** (failures - 1)), policy.max_backoff)
                host.kill_expected = None
                host.down_until = max(host.down_until, time.monotonic() + backoff)
                host.restarts += 1
        finally:
            host.state = State.STOPPED

    async def _run_once(self, host: Host) -> ExitInfo | None:
        host.state = State.STARTING
        host.incarnation += 1
        try:
            shim = host.extra.get("shim")
            if shim and not await trio.to_thread.run_sync(verify_path, Path(shim)):
                # Checked at every start: it is preloaded into a process that may run as root.
                raise OSError(f"the fault shim {shim} changed since it was built (owner, mode or content): "
                              f"not preloaded; the next run rebuilds it")
            logs = host.logs
            child = await self.spawner.spawn(host.argv, cwd=host.cwd, env=host.env,
                                             stdout=logs.stdout_fd if logs else host.stdout,
                                             stderr=logs.stderr_fd if logs else host.stderr, jail=host.jail)
        except OSError as exc:
            message = f"cannot start {host.argv[0]}: {exc.strerror or exc}"
            self.recorder.event("start-failed", host.index, error=message)
            if host.incarnation == 1:
                self.first_start_failed = message
                self.first_start_failed_dir = host.dir
            host.state = State.DOWN
            return None
        host.child = child
        host.started_at = time.monotonic()
        host.extra.pop("proof", None)
        named: dict[str, Any] = {"name": host.name, "group": host.group} if host.group else {}  # the report names them
        if child.incarnation is not None:
            named["isolation"] = {**child.incarnation.describe(), "ns_pid": child.incarnation.ns_pid}
        self.recorder.event("start", host.index, child.pid, incarnation=host.incarnation, argv=host.argv, **named)
        status: int | None = None
        try:
            async with trio.open_nursery() as nursery:
                if self.prove is not None:
                    # Beside readiness, not before it: a host that serves for a moment and exits must still
                    # be seen ready. Shielded, so a host that dies at once keeps its proof from the files.
                    nursery.start_soon(self._prove_from_files, host, child)
                nursery.start_soon(self._become_ready, host, child, nursery.cancel_scope)
                status = await wait_exit(child)
                nursery.cancel_scope.cancel()
        finally:
            was_up = host.state in (State.UP, State.PAUSED)
            host.state = State.DOWN
            self._host_went_down()
            if was_up:
                self.listener.host_gone(host)
            if status is None:  # cancelled: the run is stopping
                with trio.CancelScope(shield=True):
                    stop_at = self.recorder.now()
                    status = await stop(child, 0.0 if self.forced else self.target_of(host).stop_grace)
                    stopped = ExitInfo.from_status(status)
                    self.recorder.event("stop", host.index, child.pid, how=stopped.describe(), began=round(stop_at, 6),
                                        **({"dead_before_stop": True} if child.dead_before_stop else {}))
                    # A target that dies of anything but our SIGTERM/SIGKILL while stopping (an abort in
                    # a destructor, a double free at exit) has crashed: record it like any other.
                    if stopped.signal is not None and (child.dead_before_stop or stopped.signal not in
                                                       (signal.SIGTERM, signal.SIGKILL)):
                        await self._record_exit(host, child, stopped, stopping_since=stop_at)
        info = ExitInfo.from_status(status)
        if host.incarnation == 1 and not self._ready_once[host.index].is_set() and self.first_start_failed is None \
                and host.kill_expected is None:
            self.first_start_failed = f"{host.name} {info.describe()} before accepting connections" + \
                _last_line(host)
            self.first_start_failed_dir = host.dir
        with trio.CancelScope(shield=True):  # a crash seen is a crash recorded, even while stopping
            await self._record_exit(host, child, info)
        await sweep(child)  # what escaped the group (setsid) goes with its incarnation, before any restart
        return info

    async def _prove_from_files(self, host: Host, child: Child) -> None:
        assert self.prove is not None
        with trio.CancelScope(shield=True):
            await self.prove(host, child, "exec")

    async def _become_ready(self, host: Host, child: Child, scope: trio.CancelScope) -> None:
        target = self.target_of(host)
        ready = target.ready
        port = int(render(ready.port, {"port": str(host.port)}))
        deadline = trio.current_time() + ready.timeout
        last = None
        while trio.current_time() < deadline:
            last = await self._check_ready(target, port, host.addr, min(max(ready.interval, 1.0),
                                                             deadline - trio.current_time()))
            if last.ok:
                try:  # the real executable (argv[0] may be a wrapper or a name on PATH)
                    host.extra["exe"] = os.readlink(f"/proc/{child.pid}/exe")
                except OSError:
                    host.extra.pop("exe", None)
                if self.prove is not None:
                    await self.prove(host, child, "ready")
                if trio.current_effective_deadline() == -math.inf:
                    # Cancelled while the proof ran to completion in its thread: the host died meanwhile, or
                    # the trial is ending. It did accept connections, but it must not be given load now.
                    self.recorder.event("ready", host.index, child.pid,
                                        after=round(time.monotonic() - host.started_at, 4), load=False)
                    self._ready_once[host.index].set()
                    return
                if not await self._set_up(host, child, target):
                    return
                host.state = State.UP
                self._alive_changed()
                self.recorder.event("ready", host.index, child.pid,
                                    after=round(time.monotonic() - host.started_at, 4))
                self._ready_once[host.index].set()
                self.listener.host_ready(host)
                return
            await trio.sleep(ready.interval)
        why = last.describe() if last is not None else "no check ran"
        self.recorder.event("ready-timeout", host.index, child.pid, timeout=ready.timeout, last=why)
        if host.incarnation == 1 and self.first_start_failed is None:
            what = "did not accept connections" if ready.probe is None else "did not answer its readiness probe"
            self.first_start_failed = (f"{host.name} {what} on port {port} within {ready.timeout:g}s ({why})")
            self.first_start_failed_dir = host.dir
        host.kill_expected = "ready-timeout"
        child.signal_group(signal.SIGKILL)

    async def _check_ready(self, target: Target, port: int, addr: str, timeout: float) -> Outcome:
        if self.prep is not None:
            return await self.prep.ready(target, port, timeout, addr)
        return Outcome(good=1) if await _tcp_accepts(port, timeout, addr) else Outcome(error="no connection")

    async def _set_up(self, host: Host, child: Child, target: Target) -> bool:
        """Set-up requests before the host gets load; a failure kills it like a readiness timeout."""
        if self.prep is None or not target.setup:
            return True
        outcome, took = await self.prep.setup(target, host.port, host.addr)
        if outcome.ok:
            self.recorder.event("setup", host.index, child.pid, requests=outcome.sent, seconds=round(took, 4))
            return True
        self.recorder.event("setup-failed", host.index, child.pid, sent=outcome.sent, good=outcome.good,
                            bad=outcome.bad, why=outcome.describe())
        if host.incarnation == 1 and self.first_start_failed is None:
            self.first_start_failed = f"{host.name}: set-up failed: {outcome.describe()}"
            self.first_start_failed_dir = host.dir
        host.kill_expected = "setup-failed"
        child.signal_group(signal.SIGKILL)
        return False

    async def _record_exit(self, host: Host, child: Child, info: ExitInfo,
                           stopping_since: float | None = None) -> None:
        """The exit, at the moment it was seen (not after the clean-up that followed); a crash also as a
        crash record. `stopping_since`: found while the harness was stopping the host (the trial's end)."""
        exited = child.exited_at if child.exited_at is not None else time.monotonic()
        uptime = exited - host.started_at
        died_at = round(self.recorder.now() - (time.monotonic() - exited), 6)
        why = host.kill_expected
        detail: dict[str, Any] = {"status": info.describe(), "uptime": round(uptime, 4)}
        if why:
            detail["cause"] = why
        if stopping_since is not None:
            # while stopping: a target that died of our SIGTERM handler's path, or was found dead already
            detail["stopping"] = {"since": round(stopping_since, 6), "dead_before_stop": child.dead_before_stop}
        self.recorder.event("exit", host.index, child.pid, happened_at=died_at, signal=info.signal,
                            exit_code=info.exit_code, core_dumped=info.core_dumped, **detail)
        # A death by signal that the harness did not cause is a crash (SIGTERM/SIGKILL from elsewhere too).
        # A host-loss kill explains only a SIGKILL: a host that segfaulted just before it was picked crashed.
        if why is not None and why.startswith("host-loss") and info.signal != signal.SIGKILL:
            why = None
        if info.signal is not None and why is None:
            host.crashes += 1
            record = {"t": died_at, "wall": time.time() - (time.monotonic() - exited),  # the death, not the triage
                      "host": host.index, "pid": child.pid, "signal": info.signal,
                      "signal_name": signal_name(info.signal), "core_dumped": info.core_dumped, "uptime": uptime,
                      "executable": host.extra.get("exe") or resolve_program(host.argv[0])}
            if host.extra.get("proof") is not None:   # the proof of the incarnation that crashed
                record.setdefault("detail", {})["proof"] = host.extra["proof"]
            if "stopping" in detail:
                record.setdefault("detail", {})["stopping"] = detail["stopping"]
            if self.on_crash is not None:
                await self.on_crash(host, info, record)
            self.recorder.crash(record)


async def _tcp_accepts(port: int, timeout: float, addr: str = "127.0.0.1") -> bool:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        with trio.move_on_after(max(timeout, 0.05)):
            await sock.connect((addr, port))
            return True
        return False
    except OSError:
        return False
    finally:
        sock.close()


def resolve_program(program: str) -> str:
    """A path for argv[0]: as given when it has a slash, else found on PATH (or left as is)."""
    return program if "/" in program else (shutil.which(program) or program)


def stderr_tail(host: Host, size: int) -> bytes:
    """The last bytes a host wrote to stderr: from its pipe's sink (drained first: the process is dead,
    so all it wrote is in the pipe), else from the file."""
    if host.logs is not None and host.logs.pump is not None:
        host.logs.pump.flush(host.logs.stderr)
        return host.logs.stderr.tail(size)
    try:
        fd = os.open(host.stderr, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        end = os.fstat(fd).st_size
        return os.pread(fd, size, max(0, end - size))
    except OSError:
        return b""
    finally:
        os.close(fd)


def _last_line(host: Host) -> str:
    text = stderr_tail(host, 512).decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    return f": {lines[-1].strip()}" if lines else ""


def check_command(argv: list[str], root: Path | None = None) -> None:
    """Before a run: the executable must exist and be executable (a clear error, not a restart loop)."""
    exe = render(argv[0], {"root": str(root)}) if root is not None else argv[0]
    if "/" in exe:
        if not os.path.exists(exe):
            raise HarnessError(f"target command not found: {exe}")
        if not os.access(exe, os.X_OK):
            raise HarnessError(f"target command is not executable: {exe}")
    else:
        if shutil.which(exe) is None:
            raise HarnessError(f"target command not found on PATH: {exe}")
