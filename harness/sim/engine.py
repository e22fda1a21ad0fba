"""The fleet model, one tick at a time (pure: numpy state, seeded streams, no I/O, no clock).

Per tick of length dt, for the whole fleet at once (formulas in docs/simulation.md):
  fresh arrivals A ~ Poisson(Λ(t+dt) - Λ(t)), plus retries from earlier failures
  balancer: A + retries spread over hosts in rotation (harness.sim.balance)
  per host: capacity c = capacity x warm-up(uptime); serve s = min(backlog + a, floor(c dt + carry));
            backlog over `queue` is refused (conn_error); backlog that cannot be served within the
            client timeout times out; in flight = s/dt x service_time + backlog;
            memory = base + per_request x in flight, over the host's budget: crash (or reject);
            hazard λ = (base + scale x max(0, a/(c dt) - 1)^exponent) x fault multipliers,
            crash with probability 1 - exp(-λ dt); a crash loses the backlog (conn_error)
  restarts: after restart.time (+ backoff), warm-up from warmup.from to full over warmup.for
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.plan.streams import choose_hosts, loss_events, stream
from harness.scenario.model import Scenario, ShimFault, SimModel, Variant
from harness.sim.balance import assign
from harness.sim.crashes import CAUSES, HAZARD, MEMORY, CrashSampler, CrashTally, ExactSum

UP, DOWN, PAUSED, STOPPED = 0, 1, 2, 3
STATE_NAMES = {UP: "up", DOWN: "down", PAUSED: "paused", STOPPED: "stopped"}
SIGSEGV, SIGABRT = 11, 6
LAT_BINS_PER_E = 400          # latency bins: 0.25% apart
SELECTIVE_DRAWS = 600         # uniform_at draws one by one below one position in this many (a skip costs ~3 us)


def rng(seed: int, purpose: str) -> np.random.Generator:
    """A numpy generator for one purpose, from (seed, purpose) the same way on every platform."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def uniform_at(generator: np.random.Generator, positions: np.ndarray, total: int) -> np.ndarray:
    """generator.random(total)[positions] (positions ascending), leaving the stream where random(total)
    would; for a few positions out of many, only those are drawn and the stream is advanced past the
    rest (a double is one 64-bit output of the bit generator: tests/unit/sim/test_sim.py checks it)."""
    if len(positions) * SELECTIVE_DRAWS >= total:
        return generator.random(total)[positions]
    bits = generator.bit_generator
    buffered = bits.state                # advance() drops a buffered 32-bit half that random() keeps
    values = np.empty(len(positions))
    at = 0
    for i, position in enumerate(positions.tolist()):
        if position > at:
            bits.advance(position - at)
        values[i] = generator.random()
        at = position + 1
    if total > at:
        bits.advance(total - at)
    state = bits.state
    state["has_uint32"], state["uinteger"] = buffered["has_uint32"], buffered["uinteger"]
    bits.state = state
    return values


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split an integer in proportion to integer weights (largest remainder, ties to the first)."""
    whole = sum(weights)
    if total <= 0 or whole <= 0:
        return [0] * len(weights)
    shares = [total * w // whole for w in weights]
    rest = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-((total * weights[i]) % whole), i))
    for i in order[:rest]:
        shares[i] += 1
    return shares


@dataclass
class _Tick:
    """One tick's working values, passed from section to section of FleetModel.step (arrays suffixed _p,
    and every array here, span the hosts in play: the whole fleet when `play` is None)."""
    t: float
    fresh: int                     # new arrivals
    retries: list[int]             # retries due this tick, by attempt
    attempts: int
    counts: np.ndarray             # the balancer's requests per host (the whole fleet)
    placed: int                    # handed to a host (the rest found nobody in rotation)
    uniform: bool                  # every host up and warm: capacity is one number
    play: np.ndarray | None = None
    capacity: Any = None
    can: Any = None                # requests each host can serve this tick
    wait_cap: Any = None           # the most that can wait and still be served within the client timeout
    counts_p: Any = None
    budget_p: Any = None
    up: Any = None
    waiting_before: Any = None     # backlog at the start of the tick
    served: Any = None
    backlog: Any = None
    peak: Any = None               # backlog before refusals and timeouts
    queued: bool = False
    refused: Any = None
    timed_out: Any = None
    refused_total: int = 0
    timed_out_total: int = 0
    inflight: Any = None
    rejected: Any = None           # memory over budget with on_exhaust: reject
    crash_memory: Any = None       # memory over budget with on_exhaust: crash (a mask over play)


def lat_bin(seconds: float | np.ndarray) -> Any:
    return np.rint(np.log(np.maximum(seconds, 1e-6) * 1e6) * LAT_BINS_PER_E).astype(np.int64)


def bin_seconds(b: int) -> float:
    return math.exp(b / LAT_BINS_PER_E) / 1e6


class FleetModel:
    """State of every host; step() advances one tick and returns what happened."""

    def __init__(self, scenario: Scenario, model: SimModel, variant: Variant | None = None,
                 seed: int | None = None, per_host: bool | None = None):
        self.scenario = scenario
        self.m = model
        self.seed = scenario.seed if seed is None else seed
        self.dt = model.tick
        self.ticks_per_second = int(round(1.0 / self.dt))
        self.timeout = scenario.client.timeout
        self.policy = scenario.fleet.balancer
        n = self.n = model.hosts
        self.per_host = n <= model.host_samples if per_host is None else per_host
        faults_on = variant is None or variant.faults
        self.state = np.full(n, UP, dtype=np.int8)
        self.in_rotation = np.ones(n, dtype=bool)
        self.count_up = n                     # hosts UP (serving; ejected ones included)
        self.count_paused = 0
        self.count_rotation = n               # hosts the balancer may pick
        self.backlog = np.zeros(n, dtype=np.int64)
        self.any_backlog = False
        self.carry = np.zeros(n, dtype=np.float64)
        self.started = np.zeros(n, dtype=np.float64)
        self.warm_until = 0.0                 # some host is still warming up before this time
        self.generation = np.zeros(n, dtype=np.int64)     # bumps on every state change (stale timers)
        self.timers: list[tuple[float, int, str, int, int]] = []   # pauses: (time, seq, kind, host, generation)
        self.restart_at = np.full(n, np.inf)              # restarts: one array, not a timer per crash
        self.next_restart = math.inf
        self.row_restart = np.zeros(n, dtype=bool)         # the host's exit is an event row: so is its start
        self.odd: np.ndarray | None = None                 # hosts not up or still warming (None: to be found)
        self.odd_until = math.inf                          # ... valid until the first of them is warm
        self.timer_seq = 0
        self.incarnation = np.zeros(n, dtype=np.int64)
        self.quick_failures = np.zeros(n, dtype=np.int64)
        self.inflight = np.zeros(n, dtype=np.float64)
        self.memory = np.full(n, float(model.memory_base))
        self.full_capacity = float(model.capacity)
        self.service_bin = int(lat_bin(model.service_time))     # the latency bin of a request that does not wait
        self.pointer = 0
        self.t = 0.0
        self.tick_index = 0
        self.arrivals_rng = rng(self.seed, "sim-arrivals")
        self.hazard_rng = rng(self.seed, "sim-hazard")
        self.pool = [0] * (model.retries_max + 1)              # pool[k]: to be sent as retry number k
        self.tokens = 0.0
        # per-host budgets: the model's (with its spread) and any budget-mode alloc-fail faults
        self.base_budget = self._base_budgets()
        self.budget = self.base_budget.copy()
        self.budget_min = float(self.base_budget.min())
        self.multiplier = np.ones(n)
        self.uniform_multiplier = True
        self.shim_faults: list[tuple[ShimFault, np.ndarray, list[tuple[float, float]], np.ndarray | None]] = []
        self.fault_masks: list[np.ndarray] = []
        if faults_on:
            self._place_shim_faults()
        self.active: tuple[int, ...] | None = None
        self.losses = loss_events(scenario.host_losses, scenario.duration) if faults_on else []
        self.loss_next = 0
        # outputs gathered by the caller: event rows, crash rows (a sample: harness.sim.crashes), exact
        # crash counts, and counts of the events that are not rows (a crash loop's exits and restarts)
        self.events: list[dict[str, Any]] = []
        self.crashes: list[dict[str, Any]] = []
        self.sampler = CrashSampler(rng(self.seed, "sim-crash-sample"))
        self.tally = CrashTally(n, [b for p in scenario.load.phases for b in (p.start, p.end)])
        self.event_counts: dict[tuple[int, str], int] = {}
        self.total_crashes = 0
        self.lived = ExactSum()                  # every finished incarnation's uptime (exposure())
        self.first_loss: float | None = None
        self.episode_start: float | None = None    # first loss since the fleet was last complete
        self.cascade_at: float | None = None       # end of the tick in which alive fell below the threshold
        self.cascade_from: float | None = None     # the loss that began that episode
        self.min_alive = n
        self.total_retries = 0
        self.total_sent = 0
        self.total_attempts = 0
        self.total_offered = 0
        for host in range(n):
            self._event(0.0, "start", host, incarnation=0)

    # --- set-up helpers ------------------------------------------------------------------------

    def _base_budgets(self) -> np.ndarray:
        """Each host's memory budget: the model's, spread +-memory_spread between machines (inf: none)."""
        model, n = self.m, self.n
        if model.memory_budget is None:
            return np.full(n, np.inf)
        jitter = rng(self.seed, "sim-budget").uniform(-model.memory_spread, model.memory_spread, n) \
            if model.memory_spread else np.zeros(n)
        return np.maximum(1.0, model.memory_budget * (1.0 + jitter))

    def _place_shim_faults(self) -> None:
        """The scenario's shim faults: on which hosts, when, with which budgets (alloc-fail, budget mode)."""
        end = self.scenario.duration + self.timeout + 60
        for fault in self.scenario.shim_faults:
            hosts = self._fault_hosts(fault)
            budgets = None
            if fault.kind == "alloc-fail" and fault.mode == "budget":
                budgets = self._fault_budgets(fault, hosts)
            self.shim_faults.append((fault, hosts, fault.window.intervals(end), budgets))
            mask = np.zeros(self.n, dtype=bool)
            mask[hosts] = True
            self.fault_masks.append(mask)

    def _fault_hosts(self, fault: ShimFault) -> np.ndarray:
        """The same choice as harness.run.faults.shimfaults.fault_hosts, over the model's hosts."""
        count = fault.hosts.resolve(self.n)
        if count >= self.n:
            return np.arange(self.n)
        return np.array(sorted(stream(self.seed, f"shim-fault:{fault.index}").sample(range(self.n), count)),
                        dtype=np.int64)

    def _fault_budgets(self, fault: ShimFault, hosts: np.ndarray) -> np.ndarray:
        """The same per-host budgets as harness.run.faults.shimfaults.host_budget (seeded per host)."""
        if not fault.spread:
            return np.full(len(hosts), float(fault.budget))
        return np.array([max(1, int(fault.budget * (1.0 + stream(self.seed, f"budget:{fault.index}:{h}").uniform(
            -fault.spread, fault.spread)))) for h in hosts.tolist()], dtype=np.float64)

    def pid(self, host: int) -> int:
        return int(self.incarnation[host]) * self.n + host + 1

    def _event(self, t: float, kind: str, host: int | None, **detail: Any) -> None:
        self.events.append({"t": round(t, 6), "kind": kind, "host": host,
                            "pid": self.pid(host) if host is not None else None, "detail": detail})

    def alive(self) -> int:
        """Hosts up or paused (a paused process is alive), as the real sampler counts them."""
        return self.count_up + self.count_paused

    def _timer(self, when: float, kind: str, host: int) -> None:
        self.timer_seq += 1
        heapq.heappush(self.timers, (when, self.timer_seq, kind, host, int(self.generation[host])))

    def _set_state(self, host: int, state: int, rotation: bool) -> None:
        old = int(self.state[host])
        self.count_up -= old == UP
        self.count_paused -= old == PAUSED
        self.count_up += state == UP
        self.count_paused += state == PAUSED
        self.state[host] = state
        if bool(self.in_rotation[host]) != rotation:
            self.count_rotation += 1 if rotation else -1
            self.in_rotation[host] = rotation
        self.generation[host] += 1
        self.odd = None

    # --- one tick ----------------------------------------------------------------------------------

    def _update_faults(self, t: float) -> None:
        active = tuple(i for i, (_, _, windows, _) in enumerate(self.shim_faults)
                       if any(start <= t < stop for start, stop in windows))
        if active == self.active:
            return
        self.active = active
        self.multiplier = np.ones(self.n)
        self.budget = self.base_budget.copy()
        for i in active:
            fault, hosts, _, budgets = self.shim_faults[i]
            if budgets is not None:
                self.budget[hosts] = np.minimum(self.budget[hosts], budgets)
            elif fault.kind == "alloc-fail":
                self.multiplier[hosts] *= self.m.hazard_alloc_fail
            else:
                self.multiplier[hosts] *= self.m.hazard_lock_error
        self.uniform_multiplier = bool(self.multiplier.min() == self.multiplier.max())
        self.budget_min = float(self.budget.min())

    def _lifecycle(self, t: float, end: float) -> None:
        """Timers due by the start of this tick (restarts, resumes, ejections), then host losses
        that strike during it (applied at its start: the tick is the resolution)."""
        if self.next_restart <= t + 1e-9:
            self._restart_due(t)
        while self.timers and self.timers[0][0] <= t + 1e-9:
            at, _, kind, host, generation = heapq.heappop(self.timers)
            if generation != self.generation[host]:
                continue                                   # the host changed state since
            if kind == "eject":
                self.in_rotation[host] = False             # paused: found out by its first timeout
                self.count_rotation -= 1
            elif kind == "resume":
                self._set_state(host, UP, True)
                self._event(at, "resume", host)
        while self.loss_next < len(self.losses) and self.losses[self.loss_next].t < end:
            event = self.losses[self.loss_next]
            self.loss_next += 1
            fault = event.fault
            candidates = np.flatnonzero(self.state == UP).tolist()
            count = fault.hosts.resolve(self.n)
            chosen = choose_hosts(self.seed, event, candidates, count)
            self.events.append({"t": round(event.t, 6), "kind": "host-loss", "host": None, "pid": None,
                                "detail": {"how": fault.how, "fault": fault.index, "hosts": chosen, "asked": count,
                                           "available": len(candidates)}})
            for host in chosen:
                if fault.how == "kill":
                    self.backlog_lost += int(self.backlog[host])
                    self._down(np.array([host]), np.array([event.t]), [f"host-loss (faults[{fault.index}])"],
                               [9], np.array([True]), fault.down_for)
                    self._note_loss(event.t)
                else:
                    self._set_state(host, PAUSED, True)
                    self._timer(event.t + self.timeout, "eject", host)
                    self._timer(event.t + fault.pause_for, "resume", host)
                    self._event(event.t, "pause", host, duration=fault.pause_for)

    def _note_loss(self, t: float) -> None:
        if self.first_loss is None:
            self.first_loss = t
        if self.episode_start is None:
            self.episode_start = t

    def _restart_due(self, t: float) -> None:
        """Hosts whose restart time has come are up again (fresh incarnation, warming up)."""
        m = self.m
        due = np.flatnonzero(self.restart_at <= t + 1e-9)
        at = self.restart_at[due]
        self.restart_at[due] = np.inf
        self.next_restart = float(self.restart_at.min())
        self.state[due] = UP
        self.odd = None
        self.count_up += len(due)                          # all of them were down
        self.count_rotation += int((~self.in_rotation[due]).sum())
        self.in_rotation[due] = True
        self.generation[due] += 1
        self.started[due] = at
        self.incarnation[due] += 1
        self.carry[due] = 0.0
        if m.warmup_for > 0 and m.warmup_from < 1.0:
            self.warm_until = max(self.warm_until, float(at.max()) + m.warmup_for)
        rows = self.row_restart[due]
        if rows.any():
            order = np.lexsort((due[rows], at[rows]))
            for host, when in zip(due[rows][order].tolist(), at[rows][order].tolist()):
                self._event(when, "start", host, incarnation=int(self.incarnation[host]))
            self.row_restart[due] = False
        self._count_events(at[~rows], "start")

    def _count_events(self, times: np.ndarray, kind: str) -> None:
        if not len(times):
            return
        seconds, counts = np.unique(np.floor(times), return_counts=True)
        for second, count in zip(seconds.tolist(), counts.tolist()):
            key = (int(second), kind)
            self.event_counts[key] = self.event_counts.get(key, 0) + count

    def _down(self, hosts: np.ndarray, times: np.ndarray, causes: list[str], signals: list[int],
              rows: np.ndarray, down_for: float = 0.0) -> None:
        """Hosts leave (their backlog is dropped; the caller counts it) and restart per the policy.
        `rows` says which exits (and the restarts that follow) are event rows; the others are counted."""
        m = self.m
        self.backlog[hosts] = 0
        self.carry[hosts] = 0.0
        uptime = [round(u, 6) for u in (times - self.started[hosts]).tolist()]    # as the exit events say
        self.lived.add([max(u, 0.0) for u in uptime])
        never = m.restart_policy == "never"
        for i in np.flatnonzero(rows).tolist():
            host, when = int(hosts[i]), float(times[i])
            self._event(when, "exit", host, cause=causes[i], uptime=uptime[i], signal=signals[i])
            if never:
                self._event(when, "no-restart", host, policy=m.restart_policy)
        if not rows.all():
            self._count_events(times[~rows], "exit")
            if never:
                self._count_events(times[~rows], "no-restart")
        state = self.state[hosts]
        self.odd = None
        self.count_up -= int((state == UP).sum())
        self.count_paused -= int((state == PAUSED).sum())
        self.count_rotation -= int(self.in_rotation[hosts].sum())
        self.in_rotation[hosts] = False
        self.generation[hosts] += 1
        if never:
            self.state[hosts] = STOPPED
            return
        self.state[hosts] = DOWN
        quick = np.where(times - self.started[hosts] < m.restart_reset_after, self.quick_failures[hosts] + 1, 1)
        self.quick_failures[hosts] = quick
        wait = np.full(len(hosts), m.restart_time)
        if m.restart_backoff > 0:
            # exact powers of two, as 2 ** (k - 1) (capped far above any max_backoff / backoff ratio)
            wait = m.restart_time + np.minimum(m.restart_backoff * np.exp2(np.minimum(quick - 1, 1000)),
                                               m.restart_max_backoff)
        self.restart_at[hosts] = times + np.maximum(down_for, wait)
        self.row_restart[hosts] = rows
        self.next_restart = min(self.next_restart, float(self.restart_at[hosts].min()))

    def _crash(self, hosts: np.ndarray, times: np.ndarray, causes: np.ndarray, hazards: np.ndarray,
               sent: np.ndarray, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A tick's crashes (with each host's requests this tick and its capacity), in time order:
        counted, a sample recorded as rows, the hosts down. Returns (the hosts, the backlog each lost)."""
        order = np.lexsort((hosts, times))
        columns = [c[order] for c in (hosts, times, causes, hazards, sent, capacity)]
        up = self.state[columns[0]] == UP
        if not up.all():
            columns = [c[up] for c in columns]
        hosts, times, causes = columns[:3]
        k = len(hosts)
        lost = self.backlog[hosts].copy()
        if not k:
            return hosts, lost
        alive_after = self.alive() - np.arange(1, k + 1)       # each crash takes one host away, in order
        rows, candidates, priorities = self.sampler.choose(causes)
        for i in np.flatnonzero(rows).tolist():
            self.crashes.append(self._crash_record(i, columns, alive_after))
        for i, priority in zip(candidates.tolist(), priorities.tolist()):
            self.sampler.offer(priority, self.total_crashes + i, self._crash_record(i, columns, alive_after))
        self.tally.add(hosts, times, causes)
        self._down(hosts, times, [CAUSES[c] for c in causes.tolist()],
                   [SIGSEGV if c == MEMORY else SIGABRT for c in causes.tolist()], rows)
        self._note_loss(float(times[0]))
        self.total_crashes += k
        return hosts, lost

    def _in_play(self) -> np.ndarray:
        """Hosts up or paused, the only ones that can receive, hold, serve or crash: in a crash loop most
        of a big fleet is down, so a tick works on these alone."""
        return np.flatnonzero((self.state == UP) | (self.state == PAUSED))

    def step(self, load_on: bool = True) -> dict[str, Any]:
        """Advance one tick; returns the tick's counts (fleet totals) and, for small fleets, per-host arrays.

        While every host is up and warm, capacity is one number and the arrays span the fleet; otherwise
        the per-host arrays of this tick (suffix _p) span only the hosts in play (`play`): hosts down or
        stopped hold nothing (no backlog, no carry, zero capacity), so leaving them out changes nothing.
        The sections, in order: faults and lifecycle, arrivals and the balancer, capacity (the quiet
        ticks leave here), serving and the queue, memory, crashes, latency, outcomes."""
        t, n = self.t, self.n
        end = (self.tick_index + 1) / self.ticks_per_second    # no drift from adding 0.1s ticks
        self.backlog_lost = 0
        if self.shim_faults:
            self._update_faults(t)
        if self.timers or self.next_restart <= t + 1e-9 or self.loss_next < len(self.losses):
            self._lifecycle(t, end)
        fresh = self._arrivals(load_on, t, end)
        retries = self.pool[1:]
        self.pool = [0] * len(self.pool)
        attempts = fresh + sum(retries)
        counts, self.pointer = assign(attempts, self.in_rotation, self.backlog, self.policy, self.pointer,
                                      self.count_rotation)
        placed = attempts if self.count_rotation else 0
        # capacity this tick: a scalar while every host is up and warm (the common case), else per host
        k = _Tick(t=t, fresh=fresh, retries=retries, attempts=attempts, counts=counts, placed=placed,
                  uniform=self.count_up == n and t >= self.warm_until)
        if k.uniform:
            self._uniform_capacity(k)
        else:
            if not self.any_backlog and self.count_rotation and self.uniform_multiplier:
                odd = self._odd_hosts(t)
                if 8 * len(odd) < n:       # a few hosts restarting or warming up among many at full capacity
                    quiet = self._quiet_few(t, attempts, counts, fresh, retries, odd)
                    if quiet is not None:
                        return quiet
            self._capacity_in_play(k)
        if not self.any_backlog and self.count_rotation:
            quiet = self._quiet_tick(t, attempts, counts, k.counts_p, k.can, k.capacity, fresh, retries, k.uniform,
                                     k.play)
            if quiet is not None:
                return quiet
        self._serve(k)
        if self.m.memory_per_request or self.m.memory_base:
            self._memory(k)
        self._keep_queues(k)
        lost_total, lost = self._crashes(k)
        latency = self._latency(k)
        return self._outcomes(k, lost_total, lost, latency)

    def _arrivals(self, load_on: bool, t: float, end: float) -> int:
        """Fresh arrivals in [t, end): the expected count with whole requests carried over ("even"), or a
        Poisson draw."""
        shape, m = self.scenario.load, self.m
        if not load_on:
            return 0
        if m.arrivals == "even":
            return int(math.floor(shape.expected(end) + 1e-9) - math.floor(shape.expected(t) + 1e-9))
        mean = shape.expected(end) - shape.expected(t)
        return int(self.arrivals_rng.poisson(mean)) if mean > 0 else 0

    def _uniform_capacity(self, k: _Tick) -> None:
        """Every host up and warm: one capacity for the fleet (a fractional one carried over per host)."""
        m = self.m
        k.capacity = self.full_capacity
        can: Any = k.capacity * self.dt
        if can != math.floor(can):
            credit = can + self.carry
            can = np.floor(credit)
            self.carry = credit - can
            can = can.astype(np.int64)
        else:
            can = int(can)
        k.can = can
        k.wait_cap = int(math.floor(k.capacity * max(self.timeout - m.service_time, 0.0)))
        k.counts_p, k.budget_p = k.counts, self.budget

    def _capacity_in_play(self, k: _Tick) -> None:
        """Per-host capacity (warm-up, hosts down or paused), over the hosts in play."""
        m, t = self.m, k.t
        play: np.ndarray | None = self._in_play()
        if 2 * len(play) > self.n:
            play = None                    # most hosts in play: whole arrays are cheaper than gathers
        k.play = play
        k.counts_p, k.budget_p = (k.counts, self.budget) if play is None else (k.counts[play], self.budget[play])
        k.up = self.state == UP if play is None else self.state[play] == UP
        if t < self.warm_until:
            started = self.started if play is None else self.started[play]
            warm = np.clip((t - started) / m.warmup_for, 0.0, 1.0)
            capacity = np.where(k.up, m.capacity * (m.warmup_from + (1.0 - m.warmup_from) * warm), 0.0)
        else:
            capacity = np.where(k.up, self.full_capacity, 0.0)
        credit = capacity * self.dt + (self.carry if play is None else self.carry[play])
        can = np.floor(credit)
        if play is None:
            self.carry = credit - can
        else:
            self.carry[play] = credit - can
        k.capacity, k.can = capacity, can.astype(np.int64)
        k.wait_cap = np.floor(capacity * max(self.timeout - m.service_time, 0.0)).astype(np.int64)

    def _serve(self, k: _Tick) -> None:
        """Serve what capacity allows; refuse what overflows the queue, time out what cannot be served in time."""
        m, play = self.m, k.play
        k.waiting_before = self.backlog if play is None else self.backlog[play]
        backlog = k.waiting_before + k.counts_p if self.any_backlog else k.counts_p
        k.served = np.minimum(backlog, k.can)
        backlog = backlog - k.served
        k.peak = backlog                                          # before refusals and timeouts
        queued = bool(backlog.any())
        if queued:
            k.refused = np.maximum(backlog - m.queue, 0)
            backlog = backlog - k.refused
            k.timed_out = np.maximum(backlog - k.wait_cap, 0)     # paused hosts: capacity 0, all of it
            backlog = backlog - k.timed_out
            k.refused_total, k.timed_out_total = int(k.refused.sum()), int(k.timed_out.sum())
            queued = bool(backlog.any())
        k.backlog, k.queued = backlog, queued
        k.inflight = k.served * (m.service_time / self.dt) + backlog if queued else k.served * (m.service_time / self.dt)

    def _memory(self, k: _Tick) -> None:
        """In-flight memory against each host's budget: over it, a crash (marked) or rejected requests."""
        m, dt, play = self.m, self.dt, k.play
        memory = m.memory_base + m.memory_per_request * k.inflight
        over = memory > k.budget_p
        if not k.uniform:
            over &= k.up
        if over.any():
            if m.memory_on_exhaust == "crash":
                k.crash_memory = over
            else:
                allowed = np.floor((k.budget_p - m.memory_base) / max(m.memory_per_request, 1))
                excess = np.where(over, np.ceil(k.inflight - allowed), 0).astype(np.int64)
                from_backlog = np.minimum(k.backlog, excess)
                k.backlog = k.backlog - from_backlog
                rest = excess - from_backlog
                from_served = np.minimum(k.served, np.ceil(rest * dt / max(m.service_time, 1e-9)).astype(np.int64))
                k.served = k.served - from_served
                k.rejected = from_backlog + from_served
                k.inflight = k.served * (m.service_time / dt) + k.backlog
                memory = m.memory_base + m.memory_per_request * k.inflight
                k.queued = bool(k.backlog.any())
        if play is None:
            self.memory = memory
        elif self.per_host:
            self.memory = self._spread_out(play, memory, float(m.memory_base))
        else:
            self.memory[play] = memory      # only the hosts in play are read (their crash rows)

    def _keep_queues(self, k: _Tick) -> None:
        """The tick's in-flight requests and backlog into the fleet's state."""
        play = k.play
        if play is None:
            self.inflight = k.inflight
        elif self.per_host:
            self.inflight = self._spread_out(play, k.inflight, 0.0)
        else:
            self.inflight[play] = k.inflight
        if play is None:
            self.backlog = k.backlog
        else:
            self.backlog[play] = k.backlog
        self.any_backlog = k.queued

    def _crashes(self, k: _Tick) -> tuple[int, np.ndarray | None]:
        """Memory crashes in the middle of the tick, hazard ones at their drawn time (indices in play): the
        requests lost, in total and per host (small fleets)."""
        m, t, play = self.m, k.t, k.play
        parts = []
        if k.crash_memory is not None:
            where = np.flatnonzero(k.crash_memory)
            parts.append((where, np.full(len(where), t + self.dt * 0.5), np.full(len(where), MEMORY),
                          np.zeros(len(where))))
        if m.hazard_base > 0 or m.hazard_scale > 0:
            hit = self._hazard(t, k.counts_p, k.capacity, k.uniform, play, k.crash_memory)
            if hit is not None:
                parts.append(hit)
        lost_total = self.backlog_lost
        lost = np.zeros(self.n, dtype=np.int64) if self.per_host else None
        if parts:
            where, times, causes, hazards = ([np.concatenate(c) for c in zip(*parts)] if len(parts) > 1
                                             else parts[0])
            cap = np.full(len(where), k.capacity) if k.uniform else k.capacity[where]
            crashed, dropped = self._crash(where if play is None else play[where], times, causes, hazards,
                                           k.counts_p[where], cap)
            lost_total += int(dropped.sum())
            if lost is not None:
                lost[crashed] = dropped
        return lost_total, lost

    def _latency(self, k: _Tick) -> dict[int, int]:
        """Latency bins of what was served: service time plus the wait behind the backlog, which (fluid, at
        this resolution) grows linearly through the tick from its start to its end value."""
        m, served = self.m, k.served
        latency: dict[int, int] = {}
        served_total = int(served.sum())
        if served_total:
            if not k.queued and not bool(k.peak.any()) and not bool(k.waiting_before.any()):
                latency[self.service_bin] = served_total
            else:
                hosts = np.flatnonzero(served)
                cap = k.capacity if k.uniform else k.capacity[hosts]
                limit = k.wait_cap if k.uniform else k.wait_cap[hosts]
                with np.errstate(divide="ignore", invalid="ignore"):
                    queue_mean = 0.5 * (k.waiting_before[hosts] + np.minimum(k.peak[hosts], limit))
                    wait = np.where(cap > 0, queue_mean / cap, 0.0)
                bins = lat_bin(np.minimum(m.service_time + wait, self.timeout))
                low, high = int(bins.min()), int(bins.max())
                if low == high:
                    latency[low] = served_total
                else:
                    tally = np.bincount(bins - low, weights=served[hosts])
                    for offset in np.flatnonzero(tally).tolist():
                        latency[low + offset] = int(tally[offset])
        return latency

    def _outcomes(self, k: _Tick, lost_total: int, lost: np.ndarray | None, latency: dict[int, int]) -> dict[str, Any]:
        """Failures by kind, what is retried and what is final, per-host errors; the tick's result."""
        served = k.served
        served_total = int(served.sum())
        failures = {"timeout": k.timed_out_total, "conn_error": k.refused_total + lost_total,
                    "no_host": k.attempts - k.placed,
                    "bad_reply": int(k.rejected.sum()) if k.rejected is not None else 0}
        final = self._retry(failures, k.fresh, k.retries)
        errors = None
        if self.per_host:
            errors = (k.refused if k.refused is not None else 0) + (k.timed_out if k.timed_out is not None else 0) \
                + (k.rejected if k.rejected is not None else 0)
            if k.play is not None:
                served = self._spread_out(k.play, served, 0)
                errors = self._spread_out(k.play, errors, 0) if not np.isscalar(errors) else errors
            errors = lost + errors
        return self._finish(k.fresh, k.attempts, k.placed, served_total, k.retries, final, latency, k.counts, served,
                            errors)

    def _spread_out(self, play: np.ndarray, values: np.ndarray, rest: float) -> np.ndarray:
        """A per-host array over the whole fleet from its values for the hosts in play."""
        whole = np.full(self.n, rest, dtype=values.dtype)
        whole[play] = values
        return whole

    def _odd_hosts(self, t: float) -> np.ndarray:
        """Hosts whose capacity differs from the fleet's: not up, or warming up (as the per-host capacity
        computes it). Kept until a host changes state or the first of them is warm."""
        if self.odd is None or t >= self.odd_until:
            m = self.m
            odd = self.state != UP
            self.odd_until = math.inf
            if t < self.warm_until:
                warming = (t - self.started) / m.warmup_for < 1.0
                ends = self.started[warming & ~odd] + m.warmup_for
                if len(ends):
                    self.odd_until = float(ends.min())
                odd |= warming
            self.odd = np.flatnonzero(odd)
        return self.odd

    def _quiet_few(self, t: float, attempts: int, counts: np.ndarray, fresh: int, retries: list[int],
                   odd: np.ndarray) -> dict[str, Any] | None:
        """The quiet tick of a fleet at full capacity but for a few hosts (`odd`: down, paused or warming):
        the same checks and results as _quiet_tick with per-host capacity, computed for those few only.
        None when the tick is not quiet or not of that kind; then nothing has changed."""
        m, dt = self.m, self.dt
        full = self.full_capacity if t >= self.warm_until else \
            m.capacity * (m.warmup_from + (1.0 - m.warmup_from) * 1.0)        # a warm host, as computed per host
        can = full * dt
        if can != math.floor(can):
            return None                       # fractional capacities carry per host: the general path
        can = int(can)                        # what every other host can serve (its carry stays below 1)
        most = int(counts.max()) if attempts else 0
        if most > can:
            return None
        up = self.state[odd] == UP
        if t < self.warm_until:
            warm = np.clip((t - self.started[odd]) / m.warmup_for, 0.0, 1.0)
            capacity = np.where(up, m.capacity * (m.warmup_from + (1.0 - m.warmup_from) * warm), 0.0)
        else:
            capacity = np.where(up, self.full_capacity, 0.0)
        credit = capacity * dt + self.carry[odd]
        can_odd = np.floor(credit)
        if attempts and bool((counts[odd] > can_odd).any()):
            return None
        if m.memory_per_request or m.memory_base:
            if m.memory_base + m.memory_per_request * most * (m.service_time / dt) > self.budget_min:
                return None
        self.carry[odd] = credit - can_odd
        return self._quiet_rest(t, attempts, counts, fresh, retries,
                                lambda hosts: np.where(np.isin(hosts, odd),
                                                       capacity[np.searchsorted(odd, hosts).clip(0, len(odd) - 1)],
                                                       full))

    def _quiet_rest(self, t: float, attempts: int, counts: np.ndarray, fresh: int, retries: list[int],
                    capacity_of: Any) -> dict[str, Any]:
        """A quiet tick once its checks passed: every request served without waiting; hazard crashes only
        (the same hazard for every host up; capacity_of(hosts) gives their capacity for the crash rows)."""
        m = self.m
        self._quiet_queues(counts)
        hit = None
        if m.hazard_base > 0 or m.hazard_scale > 0:
            hit = self._hazard(t, counts, None, False, None, None, overloaded=False)
        if hit is not None:
            where, times, causes, hazards = hit
            self._crash(where, times, causes, hazards, counts[where], capacity_of(where))
        return self._quiet_result(attempts, counts, fresh, retries)

    def _quiet_tick(self, t: float, attempts: int, counts: np.ndarray, counts_p: np.ndarray, can: Any,
                    capacity: Any, fresh: int, retries: list[int], uniform: bool,
                    play: np.ndarray | None) -> dict[str, Any] | None:
        """The common tick, in a few checks: nothing was waiting, no host gets more than it can serve
        this tick, nobody's memory can reach the smallest budget. None when that is not so."""
        m, dt, n = self.m, self.dt, self.n
        if uniform and isinstance(can, int):
            most = -(-attempts // n)                   # the balancer gave nobody more than this
            if most > can:
                return None
        else:
            most = int(counts_p.max()) if attempts else 0
            if attempts and bool((counts_p > can).any()):
                return None
        if m.memory_per_request or m.memory_base:
            if m.memory_base + m.memory_per_request * most * (m.service_time / dt) > self.budget_min:
                return None
        self._quiet_queues(counts)
        hit = None
        if m.hazard_base > 0 or m.hazard_scale > 0:
            hit = self._hazard(t, counts_p, capacity, uniform, play, None, overloaded=False)
        if hit is not None:
            # served before they died: the tick's requests were all answered (nothing was waiting)
            where, times, causes, hazards = hit
            cap = np.full(len(where), capacity) if uniform else capacity[where]
            self._crash(where if play is None else play[where], times, causes, hazards, counts_p[where], cap)
        return self._quiet_result(attempts, counts, fresh, retries)

    def _quiet_queues(self, counts: np.ndarray) -> None:
        """A quiet tick's in-flight requests (and memory): what was sent, held for the service time."""
        m = self.m
        self.inflight = counts * (m.service_time / self.dt)
        if self.per_host and (m.memory_per_request or m.memory_base):
            self.memory = m.memory_base + m.memory_per_request * self.inflight

    def _quiet_result(self, attempts: int, counts: np.ndarray, fresh: int, retries: list[int]) -> dict[str, Any]:
        """A quiet tick's result: every request answered at the service time but those a crash lost."""
        lost = np.zeros(self.n, dtype=np.int64) if self.per_host else None
        lost_total = self.backlog_lost
        latency = {self.service_bin: attempts} if attempts else {}
        failures = {"timeout": 0, "conn_error": lost_total, "no_host": 0, "bad_reply": 0}
        final = self._retry(failures, fresh, retries) if lost_total else failures
        return self._finish(fresh, attempts, attempts, attempts, retries, final, latency, counts, counts, lost)

    def _finish(self, fresh: int, attempts: int, placed: int, served_total: int, retries: list[int],
                final: dict[str, int], latency: dict[int, int], counts: np.ndarray, served: np.ndarray,
                errors: Any) -> dict[str, Any]:
        m, n = self.m, self.n
        self.total_offered += fresh
        self.total_sent += placed
        self.total_attempts += attempts
        self.tick_index += 1
        self.t = self.tick_index / self.ticks_per_second
        alive = self.alive()
        if alive < self.min_alive:
            self.min_alive = alive
        if self.cascade_at is None:
            if alive < m.cascade_threshold * n and self.episode_start is not None:
                self.cascade_at = self.t
                self.cascade_from = self.episode_start
            elif alive == n:
                self.episode_start = None          # a full fleet again: the next loss starts a new episode
        result = {"offered": fresh, "sent": placed, "ok": served_total, "retries": sum(retries), **final,
                  "latency": latency, "alive": alive}
        if self.per_host:
            result.update(host_sent=counts, host_ok=served, host_errors=errors)
        return result

    def _hazard(self, t: float, counts: np.ndarray, capacity: Any, uniform: bool, play: np.ndarray | None,
                crash_memory: np.ndarray | None, overloaded: bool | None = None) -> tuple[np.ndarray, ...] | None:
        """Hosts the failure hazard kills this tick: (their indices in `play` (in the fleet when play is
        None), times inside the tick, causes, hazards), or None. `counts` and `capacity` are over `play`."""
        m, dt = self.m, self.dt
        if overloaded is None:
            overloaded = m.hazard_scale > 0 and (not uniform or int(counts.max()) > capacity * dt)
        if not overloaded and self.uniform_multiplier and crash_memory is None:
            # the same hazard for every host up: how many die is binomial, which ones a uniform choice
            hazard = m.hazard_base * float(self.multiplier[0])
            probability = -math.expm1(-hazard * dt)
            if probability <= 0 or not self.count_up:
                return None
            k = int(self.hazard_rng.binomial(self.count_up, probability))
            if not k:
                return None
            if self.count_up == self.n:
                hosts = np.sort(self.hazard_rng.choice(self.n, size=k, replace=False))
            else:
                hosts = np.sort(self.hazard_rng.choice(np.flatnonzero(self.state == UP), size=k, replace=False))
            offsets = self.hazard_rng.random(k)
            where = hosts if play is None else np.searchsorted(play, hosts)     # hosts up are all in play
            return where, t + dt * offsets, np.full(k, HAZARD), np.full(k, hazard)
        with np.errstate(divide="ignore", invalid="ignore"):
            load = np.where(capacity > 0, counts / (capacity * dt), 0.0)
        multiplier = self.multiplier if play is None else self.multiplier[play]
        hazard = (m.hazard_base + m.hazard_scale * np.maximum(load - 1.0, 0.0) ** m.hazard_exponent) * multiplier
        alive_up = self.state == UP if play is None else self.state[play] == UP
        if crash_memory is not None:
            alive_up &= ~crash_memory
        hazard = np.where(alive_up, hazard, 0.0)
        probability = -np.expm1(-hazard * dt)
        # one draw per host of the fleet, in play or not (as when every tick spanned the fleet)
        draw = self.hazard_rng.random(self.n) if play is None else uniform_at(self.hazard_rng, play, self.n)
        hit = np.flatnonzero(draw < probability)
        if not len(hit):
            return None
        return hit, t + dt * (draw[hit] / probability[hit]), np.full(len(hit), HAZARD), hazard[hit]

    def _retry(self, failures: dict[str, int], fresh: int, retries: list[int]) -> dict[str, int]:
        """Failed attempts go back as retries while attempts and the retry budget last; the rest are final."""
        m = self.m
        total = sum(failures.values())
        if m.retries_max == 0 or total == 0:
            return failures
        self.tokens = min(self.tokens + m.retries_budget * fresh,
                          m.retries_budget * max(fresh, 1) / self.dt + 1.0)
        mix = [fresh] + retries
        if sum(mix) == 0:
            mix = [1] + [0] * len(retries)
        by_level = apportion(total, mix)                       # failures by attempt number (0: first try)
        retriable = by_level[:m.retries_max]
        budget = min(sum(retriable), int(math.floor(self.tokens)))
        self.tokens -= budget
        again = apportion(budget, retriable)
        for level, count in enumerate(again):
            self.pool[level + 1] += count
        self.total_retries += budget
        kinds = list(failures)
        taken = apportion(budget, [failures[k] for k in kinds])
        return {k: failures[k] - n for k, n in zip(kinds, taken)}

    def _crash_record(self, i: int, columns: list[np.ndarray], alive_after: np.ndarray) -> dict[str, Any]:
        """The row of the i-th of a tick's crashes (before its host goes down); columns: hosts, times,
        causes, hazards, requests sent to the host this tick, its capacity."""
        host, when, cause, hazard = int(columns[0][i]), float(columns[1][i]), CAUSES[int(columns[2][i])], \
            float(columns[3][i])
        sent, cap = float(columns[4][i]), float(columns[5][i])
        detail: dict[str, Any] = {"simulated": True, "cause": cause, "incarnation": int(self.incarnation[host]),
                                  "load": round(sent / (cap * self.dt), 4) if cap > 0 else None}
        if cause == "memory":
            detail.update(memory=int(self.memory[host]), budget=int(self.budget[host]))
        else:
            detail.update(hazard_per_s=round(hazard, 9), multiplier=float(self.multiplier[host]))
        armed = [self.shim_faults[i][0].kind for i in (self.active or ()) if self.fault_masks[i][host]]
        if armed:
            detail["faults_armed"] = armed
        memory_crash = cause == "memory"
        return {"t": round(when, 6), "host": host, "pid": self.pid(host),
                "signal": SIGSEGV if memory_crash else SIGABRT,
                "signal_name": "SIGSEGV" if memory_crash else "SIGABRT", "core_dumped": False,
                "uptime": round(when - float(self.started[host]), 6),
                "offered_rate": self.scenario.load.rate(when), "host_inflight": int(round(float(self.inflight[host]))),
                "hosts_alive": int(alive_after[i]), "executable": "simulated", "detail": detail,
                "number": self.total_crashes + i}

    def exposure(self, end: float) -> dict[str, Any]:
        """Host-seconds of the trial as harness.analysis.exposure counts them from start and exit events (each
        incarnation from its start to its exit, one still running up to `end`), from every exit, also
        those counted rather than stored as event rows."""
        running = np.flatnonzero((self.state == UP) | (self.state == PAUSED))
        began = [round(t, 6) for t in self.started[running].tolist()]
        return {"host_seconds": self.lived.value([max(end - b, 0.0) for b in began]),
                "incarnations": self.lived.count + len(running), "unfinished": len(running),
                "shortest": self.lived.smallest}

    def busy(self) -> bool:
        """Anything still queued or waiting to be retried (the drain after the load)."""
        return self.any_backlog or any(self.pool)

    def host_state(self, host: int) -> str:
        state = int(self.state[host])
        if state == UP and not self.in_rotation[host]:
            return "ejected"
        if state == PAUSED and not self.in_rotation[host]:
            return "paused"
        return STATE_NAMES[state]
