"""Run a scenario on a simulated fleet: trio under a MockClock (virtual time, no wall-clock sleeps),
written to the same run store as a real run, so `harness report` and expectations work unchanged.

Deterministic: every random draw comes from a stream seeded by (seed, purpose), and the model runs
in one task, tick after tick, so the same seed gives byte-identical samples, events and crashes
(only the wall-clock columns differ). The trial's `detail` carries a digest of all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio.testing

from harness.base.hist import new_histogram
from harness.analysis.histmerge import Encoder
from harness.base.outcomes import COUNTS, HostSample, Sample
from harness.run.options import RunOptions, RunResult, new_run_id
from harness.scenario.model import Scenario, Variant
from harness.scenario import simparams as params
from harness.sim.crashes import CAUSES as CAUSE_NAMES
from harness.sim.engine import FleetModel, bin_seconds
from harness.base.safefs import create_run_dir
from harness.store.runstore import RunStore
from harness.plan.trialorder import trial_order

FLUSH_EVERY = 300          # virtual seconds between store batches
MAX_DRAIN = 600.0          # virtual seconds after the load for queues and retries to empty

CAUSES = {
    "memory": ("model-memory", "simulated: in-flight memory over the host's budget (the estats NULL stats block)"),
    "hazard": ("model-hazard", "simulated: failure hazard (load over capacity x fault multipliers)"),
}
SIGNAL_NAMES = {"memory": "SIGSEGV", "hazard": "SIGABRT"}


def run_simulation(scenario: Scenario, options: RunOptions) -> RunResult:
    """The whole run in virtual time; wall time is only what the model costs to compute."""
    return trio.run(_execute, scenario, options, clock=trio.testing.MockClock(autojump_threshold=0))


def percentiles(latency: dict[int, int], qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> list[float | None]:
    """Percentiles from latency bins (the same rank rule as HdrHistogram: the value at ceil(q% x n))."""
    total = sum(latency.values())
    if not total:
        return [None] * (len(qs) + 1)
    if len(latency) == 1:
        value = round(bin_seconds(next(iter(latency))), 6)
        return [value] * (len(qs) + 1)
    bins = sorted(latency)
    counts = np.cumsum([latency[b] for b in bins])
    result: list[float | None] = []
    for q in qs:
        rank = max(1, math.ceil(q / 100.0 * total))
        result.append(round(bin_seconds(bins[int(np.searchsorted(counts, rank))]), 6))
    result.append(round(bin_seconds(bins[-1]), 6))
    return result


class Trial:
    def __init__(self, scenario: Scenario, variant: Variant, number: int, store: RunStore, run_id: str,
                 status: bool, label: str):
        self.scenario = scenario
        self.variant = variant
        self.number = number
        self.store = store
        self.run_id = run_id
        self.status = status
        self.label = label
        assert scenario.fleet.simulated is not None
        self.model_params = params.override(scenario.fleet.simulated, variant.args)
        self.model = FleetModel(scenario, self.model_params, variant)
        self.histogram = new_histogram()
        self.encoder = Encoder(self.histogram)
        self.samples: list[Sample] = []
        self.host_samples: list[HostSample] = []
        self.digest = hashlib.sha256()
        self.crash_rows = 0
        self.samples_end = 0                   # where the last sample closed (the store's last second)
        self.wall0 = time.time()

    async def run(self) -> dict[str, Any]:
        model, scenario = self.model, self.scenario
        dt = model.dt
        per_second = model.ticks_per_second
        load_ticks = int(math.ceil(scenario.duration / dt - 1e-9))
        limit = load_ticks + int(math.ceil(MAX_DRAIN / dt))
        t0 = trio.current_time()
        second = self._new_second(0)
        next_flush = FLUSH_EVERY
        tick = 0
        started = time.perf_counter()
        report_every = max(1, load_ticks // 10)
        while tick < limit:
            if tick >= load_ticks and not model.busy() and tick % per_second == 0:
                break
            if tick % (FLUSH_EVERY * per_second) == 0:
                # virtual time jumps at once; one jump per store batch (the model runs in this one task,
                # so a jump per tick only cost wall time), and a checkpoint for Ctrl-C
                await trio.sleep_until(t0 + tick * dt)
            result = model.step(load_on=tick < load_ticks)
            self._add(second, result)
            tick += 1
            if tick % per_second == 0:
                self._close_second(second, result["alive"])
                second = self._new_second(tick // per_second)
                if second["t"] >= next_flush:
                    self._flush()
                    next_flush += FLUSH_EVERY
            if self.status and tick % report_every == 0 and tick <= load_ticks:
                print(f"{self.label}[{model.t:8.0f}/{scenario.duration:.0f}s virtual] hosts alive "
                      f"{model.alive()}/{model.n} crashes {model.total_crashes} "
                      f"({time.perf_counter() - started:.1f}s wall)", file=sys.stderr, flush=True)
        if tick % per_second:
            self._close_second(second, model.alive())
        await trio.sleep_until(t0 + tick * dt)
        model.events.append({"t": round(model.t, 6), "kind": "trial-end", "host": None, "pid": None,
                             "detail": {"status": "complete"}})
        self._flush(final=True)
        return self._detail(time.perf_counter() - started)

    def _new_second(self, t: int) -> dict[str, Any]:
        n = self.model.n
        second: dict[str, Any] = {"t": t, **dict.fromkeys(COUNTS, 0), "latency": {}}
        if self.model.per_host:
            second.update(host_sent=np.zeros(n, dtype=np.int64), host_ok=np.zeros(n, dtype=np.int64),
                          host_errors=np.zeros(n, dtype=np.int64))
        return second

    def _add(self, second: dict[str, Any], result: dict[str, Any]) -> None:
        for key in COUNTS:
            second[key] += result[key]
        latency = second["latency"]
        for b, count in result["latency"].items():
            latency[b] = latency.get(b, 0) + count
        if self.model.per_host:
            for key in ("host_sent", "host_ok", "host_errors"):
                second[key] += result[key]

    def _close_second(self, s: dict[str, Any], alive: int) -> None:
        p50, p90, p99, p999, top = percentiles(s["latency"])
        hist = self._encode(s["latency"]) if s["latency"] else None
        sample = Sample(t=s["t"], **{key: s[key] for key in COUNTS}, p50=p50, p90=p90, p99=p99, p999=p999, max=top,
                        hosts_alive=alive, offered_rate=self.scenario.load.rate(s["t"] + 0.5), hist=hist)
        self.samples.append(sample)
        self.samples_end = s["t"] + 1
        if self.model.per_host:
            model = self.model
            for host in range(model.n):
                self.host_samples.append(HostSample(
                    t=s["t"], host=host, state=model.host_state(host), pid=model.pid(host),
                    sent=int(s["host_sent"][host]), ok=int(s["host_ok"][host]), errors=int(s["host_errors"][host]),
                    inflight=int(round(float(model.inflight[host]))), rss=int(model.memory[host]), fds=None,
                    shim={"budget": int(model.budget[host]) if math.isfinite(model.budget[host]) else None,
                          "hazard_multiplier": float(model.multiplier[host])}))

    def _encode(self, latency: dict[int, int]) -> bytes:
        """The second's latency bins as an HDR histogram. One histogram and one encoding buffer are
        reused: after encoding, the few counters recorded are zeroed again (reset() or a new histogram
        would walk or allocate its ~190 KB of counters every second); the bytes are a fresh one's."""
        histogram = self.histogram
        values = [max(1, int(round(bin_seconds(b) * 1e6))) for b in sorted(latency)]
        for value, b in zip(values, sorted(latency)):
            histogram.record_value(value, latency[b])
        encoded = self.encoder.encode()
        for value in values:
            histogram.counts[histogram.get_counts_array_index(value)] = 0
        histogram.total_count, histogram.min_value, histogram.max_value = 0, sys.maxsize, 0
        return encoded

    def _flush(self, final: bool = False) -> None:
        """One store batch: samples, event rows, the crash rows sampled so far and the counts since the
        last batch; at the end of the trial the uniform crash sample and the per-host counts too."""
        model = self.model
        events, crashes = model.events, model.crashes
        model.events, model.crashes = [], []
        if final:
            crashes += model.sampler.sample()
        for event in events:
            event["wall"] = self.wall0 + event["t"]
        triage = []
        for crash in crashes:
            crash["wall"] = self.wall0 + crash["t"]
            crash["uid"] = f"{self.run_id}:t{self.number}:c{crash['number']}"
            bucket, signature = CAUSES[crash["detail"]["cause"]]
            triage.append((crash["uid"], bucket, signature, bucket, int(crash["detail"]["cause"] == "memory"), None,
                           json.dumps({"crash_class": bucket, "signature": signature, "bucket": bucket,
                                       "simulated": True, "core_kept": False})))
        self.crash_rows += len(crashes)
        slots = [(start, span, CAUSES[CAUSE_NAMES[cause]][0], "", SIGNAL_NAMES[CAUSE_NAMES[cause]], count, 0)
                 for start, span, cause, count in model.tally.take_slots()]
        counted = sorted((second, kind, count) for (second, kind), count in model.event_counts.items())
        model.event_counts = {}
        hosts = [(host, CAUSES[CAUSE_NAMES[cause]][0], count, first, last)
                 for host, cause, count, first, last in model.tally.per_host()] if final else []
        fields = [f.name for f in dataclasses.fields(Sample)]
        self.digest.update(repr([tuple(getattr(s, f) for f in fields) for s in self.samples]).encode())
        self.digest.update(repr([(e["t"], e["kind"], e["host"], e["pid"], e["detail"]) for e in events]).encode())
        self.digest.update(repr([tuple(v for k, v in c.items() if k not in ("wall", "uid")) for c in crashes]).encode())
        self.digest.update(repr((slots, counted, hosts)).encode())
        self.store.write_batch(self.number, events=events, samples=self.samples, host_samples=self.host_samples,
                               crashes=crashes, crash_counts=slots, crash_hosts=hosts, event_counts=counted)
        if triage:
            self.store.record_triage_rows(triage)
        self.samples, self.host_samples = [], []

    def _detail(self, wall_seconds: float) -> dict[str, Any]:
        model = self.model
        cascade = None
        if model.cascade_from is not None and model.cascade_at is not None:
            cascade = round(model.cascade_at - model.cascade_from, 6)
        return {
            "simulated": True, "hosts": model.n, "tick": model.dt, "balancer": model.policy,
            "first_loss": model.first_loss, "cascade_threshold": self.model_params.cascade_threshold,
            "cascade_from": model.cascade_from, "cascade_at": model.cascade_at, "time_to_cascade": cascade,
            "hosts_alive_end": model.alive(), "hosts_alive_min": model.min_alive,
            "crashes": model.total_crashes,
            "crashes_by_cause": {CAUSE_NAMES[c]: n for c, n in sorted(enumerate(model.tally.total),
                                                                      key=lambda item: CAUSE_NAMES[item[0]]) if n},
            "crash_rows": self.crash_rows,
            # host-seconds as harness.analysis.exposure counts them from start and exit events, here from every exit
            # (a crash storm's exits are mostly counted, not stored: harness.analysis.compare.trial_exposures)
            "exposure": model.exposure(float(self.samples_end)),
            "retries": model.total_retries,
            "attempts": model.total_attempts,
            "retry_amplification": round(model.total_attempts / model.total_offered, 6) if model.total_offered else None,
            "virtual_seconds": round(model.t, 6), "wall_seconds": round(wall_seconds, 3),
            "host_samples": model.per_host, "model": dataclasses.asdict(self.model_params),
            "digest": self.digest.hexdigest(),
        }


async def _execute(scenario: Scenario, options: RunOptions) -> RunResult:
    assert scenario.fleet.simulated is not None
    trials = trial_order(scenario, options.variant, options.trials or scenario.trials)
    run_id = new_run_id(scenario.name)
    run_dir, lock = create_run_dir(options.out_dir, run_id, scenario.text)   # trusted results folder, 0700/0600
    store = RunStore(run_dir / "run.db", create=True)
    status, code = "interrupted", 130
    try:
        store.begin_run(run_id=run_id, scenario=scenario.name, scenario_file=scenario.file, seed=scenario.seed,
                        duration=scenario.duration, hosts=scenario.fleet.hosts, argv=options.argv,
                        phases=[(p.name, p.kind, p.start, p.end, p.rate_from, p.rate_to)
                                for p in scenario.load.phases], pid=os.getpid())
        for number, (variant, repeat) in enumerate(trials, start=1):
            store.begin_trial(number, variant.name, repeat, scenario.seed)
            label = f"trial {number}/{len(trials)} ({variant.name}) " if len(trials) > 1 else ""
            trial = Trial(scenario, variant, number, store, run_id, options.status, label)
            store.trial_load_started(number, trial.wall0)
            try:
                detail = await trial.run()
            except BaseException:
                store.end_trial(number, "interrupted", {"simulated": True})
                raise
            store.end_trial(number, "complete", detail)
        status, code = "complete", 0
    finally:
        store.end_run(status, code)
        store.close()
    return RunResult(run_id, run_dir, status, lock=lock)


def run_to_dir(scenario: Scenario, out_dir: Path, **kwargs: Any) -> Path:
    """A simulated run into out_dir (for tests and benchmarks); returns the run directory."""
    options = RunOptions(out_dir=out_dir, status=False, argv=["harness", "run", scenario.file], **kwargs)
    return run_simulation(scenario, options).run_dir
