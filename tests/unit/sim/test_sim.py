"""Simulated fleets (harness/sim): determinism, conservation, the balancer twin, a hand-checked
tiny fleet, and that the run store it writes works with `harness report` and expectations."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.base.errors import ScenarioError
from harness.scenario.loader import load_scenario_text
from harness.analysis.report import build_report
from harness.sim.balance import assign, sequential
from harness.sim.run import run_to_dir

REPO = Path(__file__).resolve().parents[3]

BASE = """
name: sim-test
seed: {seed}
target: {{command: [model]}}
fleet:
  balancer: {balancer}
  simulated:
{model}
client: {{timeout: 1s}}
load:
{load}
{extra}
"""

NIGHT_MODEL = """    hosts: 6
    capacity: 100/s
    service_time: 100ms
    queue: 40
    memory: {base: 8MiB, per_request: 256KiB, budget: 12MiB, spread: 25%}
    hazard: {base: 0.002/s, scale: 0.05/s, exponent: 2}
    restart: {time: 5s}
    warmup: {for: 10s, from: 40%}
    retries: {max: 2, budget: 20%}"""

NIGHT_LOAD = """  - {ramp: {from: 100, to: 450, over: 30s}}
  - {hold: {for: 20s}}
  - {spike: {factor: 2.5, for: 20s, name: midnight}}
  - {hold: {for: 20s, name: after}}"""


def scenario(model: str = NIGHT_MODEL, load: str = NIGHT_LOAD, extra: str = "", seed: int = 11,
             balancer: str = "least-loaded"):
    return load_scenario_text(BASE.format(seed=seed, model=model, load=load, extra=extra, balancer=balancer),
                              "sim-test.yaml")


def rows(run_dir: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(str(run_dir / "run.db"))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def samples(run_dir: Path, trial: int = 1) -> list[tuple]:
    return rows(run_dir, f"SELECT * FROM samples WHERE trial={trial} ORDER BY t")


def crashes(run_dir: Path, trial: int = 1) -> list[tuple]:
    return rows(run_dir, f"SELECT t, host, pid, signal, signal_name, uptime, offered_rate, host_inflight, "
                         f"hosts_alive, detail FROM crashes WHERE trial={trial} ORDER BY id")


def detail(run_dir: Path, trial: int = 1) -> dict:
    return json.loads(rows(run_dir, f"SELECT detail FROM trials WHERE id={trial}")[0][0])


# --- determinism -----------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_results_and_another_seed_does_not(tmp_path: Path) -> None:
    first = run_to_dir(scenario(), tmp_path / "a")
    second = run_to_dir(scenario(), tmp_path / "b")
    other = run_to_dir(scenario(seed=12), tmp_path / "c")
    assert crashes(first), "the night is meant to crash hosts"
    assert samples(first) == samples(second)
    assert crashes(first) == crashes(second)
    assert rows(first, "SELECT t, kind, host, pid, detail FROM events ORDER BY id") == \
        rows(second, "SELECT t, kind, host, pid, detail FROM events ORDER BY id")
    for table in ("crash_counts", "crash_hosts", "event_counts"):      # the exact counts of crash storms
        assert rows(first, f"SELECT * FROM {table} ORDER BY 1, 2, 3") == \
            rows(second, f"SELECT * FROM {table} ORDER BY 1, 2, 3"), table
    assert rows(first, "SELECT sum(count) FROM crash_counts") == [(len(crashes(first)),)]
    assert detail(first)["digest"] == detail(second)["digest"]
    assert samples(first) != samples(other)
    assert detail(first)["digest"] != detail(other)["digest"]


# --- conservation --------------------------------------------------------------------------------

@pytest.mark.parametrize("balancer", ["least-loaded", "round-robin"])
@pytest.mark.parametrize("extra_model", ["", "\n    memory: {base: 8MiB, per_request: 256KiB, budget: 12MiB, "
                                             "on_exhaust: reject}"])
def test_every_offered_request_is_served_dropped_or_timed_out(tmp_path: Path, balancer: str,
                                                              extra_model: str) -> None:
    model = NIGHT_MODEL if not extra_model else NIGHT_MODEL.replace(
        "    memory: {base: 8MiB, per_request: 256KiB, budget: 12MiB, spread: 25%}", extra_model.strip("\n"))
    extra = """faults:
  - {kind: host-loss, at: 40s, hosts: 2, how: kill, down_for: 8s}
  - {kind: host-loss, at: 55s, hosts: 1, how: pause, for: 4s}
  - {kind: alloc-fail, mode: random, probability: 0.001, from: 50s, until: 70s}"""
    run = run_to_dir(scenario(model=model, extra=extra, balancer=balancer), tmp_path)
    data = samples(run)
    offered = sum(s[2] for s in data)
    ok = sum(s[4] for s in data)
    errors = sum(s[5] + s[6] + s[7] + s[8] for s in data)
    assert offered > 20000
    assert ok + errors == offered
    assert errors > 0 and ok > 0
    d = detail(run)
    assert d["retries"] > 0 and d["retry_amplification"] > 1.0
    sent = sum(s[3] for s in data)
    assert d["attempts"] == offered + d["retries"] and sent <= d["attempts"]
    if "reject" in model:
        assert sum(s[8] for s in data) > 0, "memory refusals are bad replies (ERR nomem)"


# --- the balancer twin ---------------------------------------------------------------------------

def test_balancer_twin_matches_the_real_balancer() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        n = rng.randint(1, 9)
        up = [rng.random() < 0.7 for _ in range(n)]
        equal = rng.random() < 0.4
        inflight = [2] * n if equal else [rng.randint(0, 6) for _ in range(n)]
        total, pointer = rng.randint(0, 50), rng.randrange(n)
        policy = rng.choice(["round-robin", "least-loaded"])
        counts, new_pointer = assign(total, np.array(up), np.array(inflight, dtype=np.int64), policy, pointer)
        expected, expected_pointer = sequential(total, up, inflight, policy, pointer)
        got = [int(c) for c in counts]
        assert all(c == 0 for c, u in zip(got, up) if not u), "hosts out of rotation get nothing"
        assert sum(got) == (total if any(up) else 0)
        if policy == "round-robin" or equal:
            assert got == expected
            if total and any(up):
                assert new_pointer == expected_pointer
        else:
            assert max(abs(a - b) for a, b in zip(got, expected)) <= 1


def test_load_moves_to_survivors_after_a_host_loss(tmp_path: Path) -> None:
    model = """    hosts: 4
    capacity: 1000/s
    arrivals: even
    restart: {time: 1h}"""
    load = "  - {hold: {for: 20s, rate: 1200}}"
    extra = "faults:\n  - {kind: host-loss, at: 10s, hosts: 1}"
    run = run_to_dir(scenario(model=model, load=load, extra=extra, balancer="round-robin"), tmp_path)
    per_host = rows(run, "SELECT t, host, state, sent FROM host_samples WHERE trial=1 ORDER BY t, host")
    killed = json.loads(rows(run, "SELECT detail FROM events WHERE kind='host-loss'")[0][0])["hosts"]
    assert len(killed) == 1
    before = [r for r in per_host if r[0] == 5]
    after = [r for r in per_host if r[0] == 15]
    assert [r[3] for r in before] == [300, 300, 300, 300]
    assert all(r[3] == 0 and r[2] == "down" for r in after if r[1] == killed[0])
    assert sorted(r[3] for r in after if r[1] != killed[0]) == [400, 400, 400]
    assert [s[14] for s in samples(run)][9:11] == [4, 3]          # hosts_alive
    assert sum(s[4] for s in samples(run)) == 1200 * 20             # nothing lost: capacity to spare


def test_hazard_zero_means_no_crashes(tmp_path: Path) -> None:
    model = """    hosts: 5
    capacity: 50/s
    queue: 10
    hazard: {base: 0, scale: 0}"""
    extra = """faults:
  - {kind: alloc-fail, mode: random, probability: 0.5}
  - {kind: lock-error, probability: 0.5}"""
    run = run_to_dir(scenario(model=model, extra=extra), tmp_path)   # load up to 4.5x the fleet's capacity
    assert crashes(run) == []
    data = samples(run)
    assert all(s[14] == 5 for s in data)
    assert sum(s[5] + s[6] for s in data) > 0, "overload still refuses and times out requests"


def test_alloc_fail_multiplies_the_hazard(tmp_path: Path) -> None:
    model = """    hosts: 50
    capacity: 1000/s
    hazard: {base: 0.001/s, alloc_fail: 50}
    restart: {time: 1s}"""
    load = "  - {hold: {for: 200s, rate: 1000}}"
    quiet = run_to_dir(scenario(model=model, load=load), tmp_path / "quiet")
    faulty = run_to_dir(scenario(model=model, load=load, extra="faults:\n  - {kind: alloc-fail, probability: 0.01, "
                                                               "hosts: 10}"), tmp_path / "faulty")
    assert len(crashes(faulty)) > 3 * max(1, len(crashes(quiet)))
    armed = [json.loads(c[9]).get("faults_armed") for c in crashes(faulty)]
    assert sum(1 for a in armed if a == ["alloc-fail"]) > len(armed) / 2


# --- a tiny fleet, by hand ----------------------------------------------------------------------

def test_two_hosts_by_hand(tmp_path: Path) -> None:
    """Worked example: 2 hosts, round-robin, 1 s ticks, even arrivals (no noise).

    Each host: capacity 10/s, service time 100 ms, queue 4, memory 1 MiB per in-flight request,
    budget 2.5 MiB (crash when over), restart after 3 s. Client timeout 1 s, so a host can hold
    floor(10 x (1 - 0.1)) = 9 waiting requests before they time out (the queue, 4, is smaller).
    Load: 16/s for 3 s, a spike to 24/s for 2 s, back to 16/s for 3 s (8 s in all, 144 requests).

    t=0,1,2: 16 arrive, 8 per host; each serves 8 (can 10). In flight 8 x 0.1 = 0.8 -> 0.8 MiB.
             ok 16, latency 100 ms (no wait).
    t=3:     24 arrive, 12 per host; each serves 10, 2 wait (queue 4: none refused, none timed
             out). In flight 10 x 0.1 + 2 = 3 requests -> 3 MiB > 2.5 MiB: both hosts crash
             (cause memory, SIGSEGV) at t=3.5, and the 2 waiting on each are lost (conn_error 4).
             ok 20; latency 100 ms + mean wait (0 + 2)/2 / 10/s = 200 ms. Alive after: 0.
    t=4:     24 arrive, nobody in rotation: no_host 24.
    t=5,6:   16 arrive each second: no_host 16 + 16. The hosts restart at 3.5 + 3 = 6.5 s, i.e. from
             the tick starting at t=7 (the tick is the resolution).
    t=7:     16 arrive, 8 per host, ok 16.
    Totals: offered 144 = ok 84 + conn_error 4 + no_host 56. Crashes: h0, h1 at 3.5 s.
    """
    model = """    hosts: 2
    capacity: 10/s
    service_time: 100ms
    queue: 4
    arrivals: even
    memory: {per_request: 1MiB, budget: 2.5MiB}
    restart: {time: 3s}"""
    load = """  - {hold: {for: 3s, rate: 16}}
  - {spike: {to: 24, for: 2s}}
  - {hold: {for: 3s}}"""
    run = run_to_dir(scenario(model=model, load=load, balancer="round-robin"), tmp_path)
    got = [(s[1], s[2], s[4], s[5], s[6], s[7], s[8], s[14]) for s in samples(run)]
    #        t  offered ok  timeout conn_error no_host bad_reply alive
    assert got == [
        (0, 16, 16, 0, 0, 0, 0, 2),
        (1, 16, 16, 0, 0, 0, 0, 2),
        (2, 16, 16, 0, 0, 0, 0, 2),
        (3, 24, 20, 0, 4, 0, 0, 0),
        (4, 24, 0, 0, 0, 24, 0, 0),
        (5, 16, 0, 0, 0, 16, 0, 0),
        (6, 16, 0, 0, 0, 16, 0, 0),
        (7, 16, 16, 0, 0, 0, 0, 2),
    ]
    p50 = [s[9] for s in samples(run)]
    assert p50[0] == pytest.approx(0.1, rel=0.003) and p50[3] == pytest.approx(0.2, rel=0.003)
    assert p50[4] is None
    assert [(c[0], c[1], c[4], json.loads(c[9])["cause"]) for c in crashes(run)] == \
        [(3.5, 0, "SIGSEGV", "memory"), (3.5, 1, "SIGSEGV", "memory")]
    d = detail(run)
    assert d["hosts_alive_end"] == 2 and d["time_to_cascade"] == 0.5      # first loss 3.5 s, alive 0 by 4 s
    starts = rows(run, "SELECT t, host FROM events WHERE kind='start' ORDER BY id")
    assert starts == [(0.0, 0), (0.0, 1), (6.5, 0), (6.5, 1)]


# --- the scenario language -----------------------------------------------------------------------

def test_variants_override_model_fields_and_bad_keys_are_reported(tmp_path: Path) -> None:
    model = "    hosts: 4\n    capacity: 100/s\n    arrivals: even"
    extra = """variants:
  - {name: small}
  - {name: big, args: {hosts: 8, memory.budget: 64MiB, memory.per_request: 1KiB}}"""
    s = scenario(model=model, load="  - {hold: {for: 5s, rate: 80}}", extra=extra)
    run = run_to_dir(s, tmp_path)
    assert detail(run, 1)["hosts"] == 4 and detail(run, 2)["hosts"] == 8
    assert detail(run, 2)["model"]["memory_budget"] == 64 * 1024 * 1024
    with pytest.raises(ScenarioError) as error:
        scenario(model=model, extra="variants:\n  - {name: x, args: {memory.budgt: 3MiB, hosts: lots}}")
    text = "\n".join(str(p) for p in error.value.problems)
    assert "did you mean 'memory.budget'" in text and "variants[0].args.hosts" in text
    with pytest.raises(ScenarioError) as error:
        scenario(model="    hosts: 4\n    capacity: -3\n    tick: 300ms\n    memory: {budgett: 1MiB}")
    text = "\n".join(str(p) for p in error.value.problems)
    assert "fleet.simulated.capacity" in text and "fleet.simulated.tick" in text and "did you mean 'budget'" in text


@pytest.mark.slow
def test_harness_run_and_report_work_on_a_simulated_run(tmp_path: Path) -> None:
    path = tmp_path / "night.yaml"
    path.write_text(BASE.format(seed=3, model=NIGHT_MODEL, load=NIGHT_LOAD, balancer="least-loaded", extra="""
expect:
  - {crashes: 0, phase: midnight}
  - {error_rate: "<= 100%"}
"""), encoding="utf-8")
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "harness", "run", str(path), "--out", str(out), "--json", "--quiet"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 1, run.stderr                 # the midnight expectation fails: hosts crash
    report = json.loads(run.stdout)
    trial = report["trials"][0]
    assert trial["detail"]["simulated"] is True
    assert trial["crashes"] and trial["buckets"][0]["bucket"] in ("model-memory", "model-hazard")
    held = {e["text"]: e["held"] for e in report["expectations"]}
    assert held == {"crashes 0": False, "error_rate <= 100%": True}
    run_dir = next(out.iterdir())
    again = subprocess.run([sys.executable, "-m", "harness", "report", str(run_dir)], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
    assert again.returncode == 1 and "midnight" in again.stdout and "model-" in again.stdout
    assert build_report(run_dir)["trials"][0]["overall"]["offered"] == sum(s[2] for s in samples(run_dir))


def test_paused_host_times_out_until_ejected(tmp_path: Path) -> None:
    model = "    hosts: 2\n    capacity: 1000/s\n    arrivals: even\n    tick: 100ms"
    extra = "faults:\n  - {kind: host-loss, at: 5s, hosts: 1, how: pause, for: 3s}"
    run = run_to_dir(scenario(model=model, load="  - {hold: {for: 12s, rate: 100}}", extra=extra,
                              balancer="round-robin"), tmp_path)
    data = samples(run)
    assert sum(s[5] for s in data) == 50            # half of 1 s of requests (the client timeout) time out
    assert all(s[14] == 2 for s in data)            # a paused process is alive
    assert rows(run, "SELECT count(*) FROM events WHERE kind='resume'") == [(1,)]


# --- the fast paths are the general computation ----------------------------------------------------

@pytest.mark.parametrize("hosts", [40, 80])        # 40: per-host samples too; 80: fleet samples only
def test_fast_paths_give_the_results_of_the_general_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        hosts: int) -> None:
    """The hosts-in-play subset, the quiet tick of a few odd hosts and the hazard draws for some hosts
    only are shortcuts: with them turned off (every tick over the whole fleet, every draw made) a
    crash-looping night with restarts, warm-up, host losses and a pause is byte-identical."""
    from harness.sim import engine
    # warm-up from 33 % over 7 s: fractional capacities, so the carried fractions matter;
    # and a hazard high enough that the draws for a few hosts in play decide crashes
    model = NIGHT_MODEL.replace("hosts: 6", f"hosts: {hosts}").replace(
        "warmup: {for: 10s, from: 40%}", "warmup: {for: 7s, from: 33%}").replace("base: 0.002/s", "base: 0.03/s")
    load = NIGHT_LOAD.replace("from: 100, to: 450", f"from: {hosts * 17}, to: {hosts * 40}").replace("2.5", "2.2")
    extra = """faults:
  - {kind: host-loss, at: 10s, hosts: 3, how: kill, down_for: 8s}
  - {kind: host-loss, at: 15s, hosts: 2, how: pause, for: 4s}"""
    monkeypatch.setattr(engine, "SELECTIVE_DRAWS", 2)       # draw one by one for any subset (a big fleet's case)
    fast = run_to_dir(scenario(model=model, load=load, extra=extra), tmp_path / "fast")
    monkeypatch.setattr(engine.FleetModel, "_quiet_few", lambda *args: None)
    monkeypatch.setattr(engine.FleetModel, "_in_play", lambda self: np.arange(self.n))
    monkeypatch.setattr(engine, "uniform_at", lambda generator, positions, total: generator.random(total)[positions])
    general = run_to_dir(scenario(model=model, load=load, extra=extra), tmp_path / "general")
    assert len(crashes(fast)) > hosts
    for sql in ("SELECT * FROM samples ORDER BY t", "SELECT * FROM host_samples ORDER BY t, host",
                "SELECT t, host, pid, signal, uptime, offered_rate, host_inflight, hosts_alive, detail FROM crashes",
                "SELECT t, kind, host, pid, detail FROM events ORDER BY id",
                "SELECT * FROM crash_counts ORDER BY t, bucket", "SELECT * FROM crash_hosts ORDER BY host, bucket"):
        assert rows(fast, sql) == rows(general, sql), sql
    assert detail(fast)["digest"] == detail(general)["digest"]


def test_fast_paths_keep_the_per_host_state_of_the_general_path() -> None:
    """Tick by tick, a model taking the shortcuts and one computing every tick over the whole fleet give
    the same counts and keep the same backlogs and carried capacity fractions (to rounding: the general
    path re-adds a warm host's carry to its whole capacity each tick)."""
    from harness.sim.engine import FleetModel
    model = NIGHT_MODEL.replace("hosts: 6", "hosts: 40").replace(
        "warmup: {for: 10s, from: 40%}", "warmup: {for: 7s, from: 33%}").replace("base: 0.002/s", "base: 0.03/s")
    load = NIGHT_LOAD.replace("from: 100, to: 450", "from: 680, to: 1600").replace("2.5", "2.2")
    s = scenario(model=model, load=load)
    fast, general = FleetModel(s, s.fleet.simulated), FleetModel(s, s.fleet.simulated)
    general._quiet_few = lambda *args: None                       # type: ignore[method-assign]
    general._in_play = lambda: np.arange(general.n)               # type: ignore[method-assign]
    odd_ticks = 0
    for tick in range(90):
        odd_ticks += int(fast.count_up < fast.n and not fast.any_backlog)
        a, b = fast.step(), general.step()
        for key in ("offered", "sent", "ok", "timeout", "conn_error", "no_host", "bad_reply", "latency", "alive"):
            assert a[key] == b[key], (tick, key)
        for key in ("host_sent", "host_ok", "host_errors"):
            assert np.array_equal(a[key], b[key]), (tick, key)
        assert np.array_equal(fast.backlog, general.backlog) and np.array_equal(fast.state, general.state)
        assert np.allclose(fast.carry, general.carry, rtol=0, atol=1e-9), tick
        assert np.array_equal(fast.inflight, general.inflight) and np.array_equal(fast.memory, general.memory)
    assert odd_ticks > 10 and fast.total_crashes > 40
