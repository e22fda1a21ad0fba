"""The scenario model: typed, immutable, pure. Built from YAML by harness.scenario.loader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.scenario.loadshape import LoadShape
from harness.protocols import RequestSpec

ALLOCATORS = ("glibc", "jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class Ready:
    port: str = "{port}"          # template of the TCP port to probe
    timeout: float = 5.0
    interval: float = 0.02
    protocol: str | None = None   # None: ready once it accepts TCP; else the probe's protocol
    probe: RequestSpec | None = None   # a request that must get a good reply


@dataclass(frozen=True)
class SetupStep:
    """Requests sent to every incarnation of a host once it is ready, before it gets load."""

    request: RequestSpec
    count: int                    # how many; {seq} runs from 0, {key} is the seq-th key of client.keys
    all_keys: bool = False        # count is the key space: every key once


@dataclass(frozen=True)
class Restart:
    policy: str = "always"        # always | on-failure | never
    backoff: float = 1.0          # first delay; doubles per consecutive quick failure
    max_backoff: float = 30.0
    reset_after: float = 10.0     # uptime after which the backoff starts over


@dataclass(frozen=True)
class IsolationSpec:
    """How a host is isolated (harness/run/isolation). None: wherever the machine allows it (root, kernel)."""

    pid: bool | None = None       # its own PID namespace: nothing it forks outlives it
    cgroup: bool | None = None    # its own cgroup: accounting, limits, kill
    netns: bool = False           # its own network namespace with a veth pair

    def words(self) -> list[str]:
        return [name for name in ("pid", "cgroup", "netns") if getattr(self, name)]


@dataclass(frozen=True)
class Target:
    root: Path                    # relative paths in build/command resolve here
    command: tuple[str, ...]
    build: tuple[str, ...] | None = None
    protocol: str = "line"        # line | http | resp | memcached (harness.protocols)
    requests: tuple[RequestSpec, ...] = (RequestSpec("default", "GET {key}\n"),)   # the mix, by weight
    terminator: str = "\n"        # line protocol: end of a reply
    expect_reply: str | None = None   # default expectation of requests that give none (as written)
    setup: tuple[SetupStep, ...] = ()
    files: tuple[tuple[str, str], ...] = ()   # (name in the host's folder, template file under root)
    ready: Ready = field(default_factory=Ready)
    restart: Restart = field(default_factory=Restart)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "{dir}"
    stop_grace: float = 2.0
    log_max: int = 16 * 1024 * 1024
    isolation: IsolationSpec = field(default_factory=IsolationSpec)


@dataclass(frozen=True)
class SimModel:
    """A simulated fleet (fleet: {simulated: {...}}): each host is a model, not a process.

    Formulas and resolution: docs/simulation.md. Rates are per second, times in seconds, sizes in bytes.
    """

    hosts: int
    capacity: float                       # requests/s a warm host serves
    service_time: float = 0.05            # latency of a request that does not wait
    queue: int = 1000                     # waiting requests a host holds; more are refused (conn_error)
    tick: float = 1.0                     # model resolution; divides one second
    arrivals: str = "poisson"             # poisson (seeded) | even (the expected count, for hand checks)
    memory_base: int = 0                  # bytes a host uses with nothing in flight
    memory_per_request: int = 0           # bytes each in-flight request holds
    memory_budget: int | None = None      # None: unlimited
    memory_spread: float = 0.0            # each host's budget is budget x (1 +- spread), seeded
    memory_on_exhaust: str = "crash"      # crash (estats --estats on) | reject (ERR nomem: bad_reply)
    hazard_base: float = 0.0              # crashes per second at or below capacity
    hazard_scale: float = 0.0             # added crashes per second at load = 2x capacity (exponent 1)
    hazard_exponent: float = 2.0
    hazard_alloc_fail: float = 10.0       # hazard multiplier while an alloc-fail fault is armed on a host
    hazard_lock_error: float = 5.0        # hazard multiplier while a lock-error fault is armed on a host
    restart_policy: str = "always"        # always | on-failure | never
    restart_time: float = 10.0            # from death to serving again
    restart_backoff: float = 0.0          # extra delay, doubled per consecutive quick failure
    restart_max_backoff: float = 300.0
    restart_reset_after: float = 60.0     # uptime after which the backoff starts over
    warmup_for: float = 0.0               # a restarted host reaches full capacity after this long
    warmup_from: float = 1.0              # fraction of capacity it starts with
    retries_max: int = 0                  # retries per request after a failure (0: none)
    retries_budget: float = 0.1           # retries at most this fraction of fresh requests
    cascade_threshold: float = 0.5        # 'cascade': fraction alive below this
    host_samples: int = 64                # per-host samples are written for fleets up to this size


@dataclass(frozen=True)
class Group:
    """A kind of host in a mixed fleet (fleet.groups): its own command, build, env, ready, restart...

    `target` is already resolved: the scenario's target with this group's overrides on top.
    Docs: docs/scenario-groups.md.
    """

    name: str
    hosts: int
    target: Target
    backends: tuple[str, ...] = ()    # groups this one sends traffic to ({backends}, {backend.*} in its templates)
    rotation: bool = True             # the driver's balancer sends load to its hosts (not to a pure backend)
    placement: str | None = None      # spread | pack over cluster machines; None: the fleet's (harness.plan.placement)


@dataclass(frozen=True)
class Fleet:
    hosts: int
    balancer: str = "least-loaded"    # round-robin | least-loaded
    simulated: SimModel | None = None
    groups: tuple[Group, ...] = ()    # empty: one kind of host, the scenario's target
    placement: str = "spread"         # spread | pack: hosts over --cluster machines (harness.plan.placement)


@dataclass(frozen=True)
class Keys:
    space: int = 10000
    distribution: str = "uniform"     # uniform | zipf
    zipf_s: float = 1.1


@dataclass(frozen=True)
class Client:
    timeout: float = 1.0              # a request unanswered this long is a timeout
    connections: int = 2              # per host; requests are pipelined on them
    probe_interval: float = 0.25      # how often an ejected (timed-out) host is re-probed
    keys: Keys = field(default_factory=Keys)
    workers: int | str = 1            # driver processes sending the load; "auto": one per usable core
    # over --cluster: the load is sent from every machine that runs hosts (a driver shard on each), or from
    # the machine that ran the command only (harness.cluster)
    load_from: str = "machines"


@dataclass(frozen=True)
class Window:
    """When a fault is active: [start, until), optionally repeating `active` out of every `every`."""

    start: float = 0.0
    until: float | None = None
    every: float | None = None
    active: float | None = None

    def intervals(self, end: float) -> list[tuple[float, float]]:
        stop = end if self.until is None else min(self.until, end)
        if self.every is None:
            return [(self.start, stop)] if self.start < stop else []
        length = self.active if self.active is not None else self.every
        result, t = [], self.start
        while t < stop:
            result.append((t, min(t + length, stop)))
            t += self.every
        return result


@dataclass(frozen=True)
class HostSelection:
    count: int | None = None
    fraction: float | None = None

    def resolve(self, fleet_size: int) -> int:
        if self.count is not None:
            return min(self.count, fleet_size)
        if self.fraction is not None:
            # Half rounds up (round() would send 2.5 hosts to 2 but 1.5 to 2): 62.5% of 4 is 3 hosts.
            return max(1, math.floor(self.fraction * fleet_size + 0.5)) if self.fraction > 0 else 0
        return fleet_size


@dataclass(frozen=True)
class HostLoss:
    index: int                        # position in faults:, for naming and per-event seeding
    how: str                          # kill | pause
    times: tuple[float, ...]          # when it strikes (from `at`, or `every` between from and until)
    hosts: HostSelection
    pause_for: float = 5.0            # pause: SIGSTOP, then SIGCONT after this long
    down_for: float = 0.0             # kill: keep the host down at least this long before restart


@dataclass(frozen=True)
class ShimFault:
    """alloc-fail or lock-error, armed in the host's shim during its window."""

    index: int
    kind: str                         # alloc-fail | lock-error
    mode: str                         # random | nth | after | budget
    window: Window
    hosts: HostSelection
    functions: tuple[str, ...] = ()
    probability: float = 0.0
    nth: int = 0
    after: int = 0
    budget: int = 0
    min_size: int = 0
    max_size: int = 0
    errno_name: str = "EDEADLK"
    times: int = -1
    callers: tuple[str, ...] = ()
    spread: float = 0.0               # budget: each host's budget varies by up to +-spread (seeded)
    groups: tuple[str, ...] = ()      # only hosts of these fleet groups (empty: the whole fleet)


NET_FAULT_KINDS = ("latency", "bandwidth", "stall", "partition", "reset", "slicer")
RESOURCE_FAULT_KINDS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class NetFault:
    """A network fault, applied by the fault proxy (harness/run/faults/network) to the connections into its hosts
    (from the driver and from other groups), or to the connections between two groups (`between`)."""

    index: int
    kind: str                         # latency | bandwidth | stall | partition | reset | slicer
    window: Window
    hosts: HostSelection
    groups: tuple[str, ...] = ()      # the hosts are chosen among these groups (empty: the whole fleet)
    between: tuple[str, str] | None = None   # or: only the connections between these two groups
    direction: str = "both"           # upstream (client -> host) | downstream (host -> client) | both
    latency: float = 0.0              # latency: added to each chunk, seconds
    jitter: float = 0.0               # latency: +- uniformly, seeded
    rate: int = 0                     # bandwidth: bytes per second
    how: str = "refuse"               # partition: new connections refused (reset at once) | blackhole (held)
    size: int = 0                     # slicer: average segment size, bytes
    variation: int = 0                # slicer: +- this many bytes, seeded
    delay: float = 0.0                # slicer: pause between segments, seconds
    instant: bool = False             # reset with `at:`: established connections reset once, at that time


@dataclass(frozen=True)
class ResourceFault:
    """A cgroup limit on a host during its window (harness/run/isolation)."""

    index: int
    kind: str                         # memory | cpu | pids
    window: Window
    hosts: HostSelection
    groups: tuple[str, ...] = ()
    limit: int = 0                    # memory: bytes; pids: processes (and threads)
    quota: float = 0.0                # cpu: fraction of one CPU (0.25 = a quarter of a core)


@dataclass(frozen=True)
class MachineLoss:
    """A cluster worker's machine lost at `at` (with every host placed on it); only with --cluster."""

    index: int                        # position in faults:, for naming and per-event seeding
    at: float
    machine: int | None = None        # 0-based, in placement order (YAML `machine:` is 1-based); None: seeded
    count: int = 1                    # how many machines, chosen seeded, when `machine` is None


Fault = HostLoss | ShimFault | NetFault | ResourceFault | MachineLoss


@dataclass(frozen=True)
class Variant:
    name: str
    args: dict[str, str] = field(default_factory=dict)     # flag -> new value ("--estats": "off")
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None
    build: tuple[str, ...] | None = None
    allocator: str | None = None                           # glibc | jemalloc | tcmalloc | mimalloc | path
    faults: bool = True                                    # false: a control run (shim loaded, nothing injected)
    groups: tuple[str, ...] = ()                           # args/env/command/allocator apply to these (empty: all)
    line: int = 0                                          # of its `allocator:` (or of the variant), for messages
    index: int = 0                                         # position in variants:, for messages


@dataclass(frozen=True)
class Expectation:
    index: int
    line: int
    metric: str                       # crashes | error_rate | p50_latency ... | throughput | hosts_alive
    op: str                           # < <= > >= ==
    value: float
    text: str                         # as written, for messages
    phase: str | None = None
    variant: str | None = None
    request: str | None = None        # one request of the mix (by name)


@dataclass(frozen=True)
class Cores:
    """What to keep of core files: every crash is counted, not every core is kept."""

    max_size: int = 512 * 1024 * 1024     # per core; a larger one is kept truncated
    keep_per_bucket: int = 3              # full cores kept for the first N crashes of each bucket
    sample_every: int = 10                # after that, keep one in this many
    disk_cap: int = 2 * 1024**3           # all cores of a run together
    compress: bool = False                # zstd after triage
    min_free: int = 512 * 1024**2         # below this much free disk, cores are not collected (the run goes on)


@dataclass(frozen=True)
class Scenario:
    name: str
    file: str
    text: str                         # the YAML as written, saved with the run
    seed: int
    load: LoadShape
    target: Target
    fleet: Fleet
    client: Client = field(default_factory=Client)
    faults: tuple[Fault, ...] = ()
    variants: tuple[Variant, ...] = ()
    trials: int = 1
    expect: tuple[Expectation, ...] = ()
    description: str = ""
    cores: "Cores" = field(default_factory=lambda: Cores())
    compare_expect: tuple[Any, ...] = ()      # harness.scenario.claims.VariantExpectation: {compare: [a, b], metric: claim}

    @property
    def duration(self) -> float:
        return self.load.duration

    @property
    def host_losses(self) -> tuple[HostLoss, ...]:
        return tuple(f for f in self.faults if isinstance(f, HostLoss))

    @property
    def machine_losses(self) -> tuple[MachineLoss, ...]:
        return tuple(f for f in self.faults if isinstance(f, MachineLoss))

    @property
    def shim_faults(self) -> tuple[ShimFault, ...]:
        return tuple(f for f in self.faults if isinstance(f, ShimFault))

    @property
    def net_faults(self) -> tuple[NetFault, ...]:
        return tuple(f for f in self.faults if isinstance(f, NetFault))

    @property
    def resource_faults(self) -> tuple[ResourceFault, ...]:
        return tuple(f for f in self.faults if isinstance(f, ResourceFault))

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def shim_faults_for(self, group: str) -> tuple[ShimFault, ...]:
        """The alloc-fail and lock-error faults that may reach this group's hosts."""
        return tuple(f for f in self.shim_faults if not f.groups or group in f.groups)

    @property
    def host_groups(self) -> tuple[Group, ...]:
        """The fleet's groups in host order; a fleet without groups is one unnamed group of the target."""
        return self.fleet.groups or (Group(name="", hosts=self.fleet.hosts, target=self.target),)

    def hosts_in(self, groups: tuple[str, ...] = ()) -> list[int]:
        """Indices of the hosts in these groups (every host when none are named)."""
        indices, first = [], 0
        for group in self.host_groups:
            if not groups or group.name in groups:
                indices.extend(range(first, first + group.hosts))
            first += group.hosts
        return indices
