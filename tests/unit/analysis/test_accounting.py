"""Pure pieces of the accounting: what a duration cuts, host lanes from events, hosts alive per second,
the drain second, the status line and the command line's argument rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import write_scenario

from harness.cli import _parser, _report_args
from harness.run.fleet import FleetSupervisor, Host, State
from harness.present.html import lane_rows
from harness.scenario.loader import load_scenario
from harness.plan.cut import plan_cut
from harness.analysis.report import window_metrics
from harness.present.status import eta_text, fit, run_eta

PLAN = """
name: cut
target: {command: [/bin/true, "{port}"]}
fleet: {hosts: 4}
load:
  - {ramp: {from: 10, to: 100, over: 10s}}
  - {hold: {for: 20s}}
  - {spike: {factor: 2, for: 10s, name: midnight}}
  - {hold: {for: 10s}}
faults:
  - {kind: host-loss, at: 25s, hosts: 1}
  - {kind: host-loss, every: 10s, from: 5s, until: 45s, hosts: 1, how: pause, for: 1s}
  - {kind: alloc-fail, mode: nth, nth: 100, from: 32s}
  - {kind: lock-error, function: pthread_mutex_lock, probability: 1%, every: 20s, for: 5s, from: 0s}
expect:
  - {crashes: 0, phase: midnight}
  - {crashes: 0, phase: hold}
  - {error_rate: "< 1%", phase: ramp}
  - {crashes: 0}
"""


def test_plan_cut_names_phases_faults_and_expectations(tmp_path: Path) -> None:
    plan = load_scenario(write_scenario(tmp_path, PLAN))
    assert not plan_cut(plan, 50.0).cut and plan_cut(plan, 50.0).lines() == []
    cut = plan_cut(plan, 30.0)
    assert [(p.name, p.ran) for p in cut.phases] == [("midnight", 0.0), ("hold#2", 0.0)]
    cut = plan_cut(plan, 35.0)
    assert [(p.name, p.ran) for p in cut.phases] == [("midnight", 5.0), ("hold#2", 0.0)]
    text = "\n".join(cut.lines())
    assert "35s of a 50s plan" in text and "phase midnight (30s-40s): cut after 5s" in text
    assert "phase hold#2 (40s-50s): dropped" in text
    assert "faults[1] (host-loss pause): fires 3 of 4 times (not at 35s)" in text
    assert "faults[2] (alloc-fail nth)" not in text      # armed at 32s, runs to the end: nothing lost
    assert "faults[3] (lock-error random): armed in 2 of 3 windows" in text and "faults[0]" not in text
    # `hold` covers hold and hold#2: the second was dropped, so it is not evaluated; ramp and the whole run are
    not_evaluated = {e.text + (f" {e.phase}" if e.phase else ""): why for e, why in cut.expectations}
    assert set(not_evaluated) == {"crashes 0 midnight", "crashes 0 hold"}
    assert "midnight ran 5s of 10s" in not_evaluated["crashes 0 midnight"]
    assert "hold#2 did not run" in not_evaluated["crashes 0 hold"]
    short = plan_cut(plan, 3.0)
    assert "faults[0] (host-loss kill): never fires" in "\n".join(short.lines())
    assert "faults[2] (alloc-fail nth): never armed" in "\n".join(short.lines())
    assert "faults[3] (lock-error random): armed in 1 of 3 windows" in "\n".join(short.lines())


def test_lanes_from_events_start_where_the_event_happened() -> None:
    events = [{"t": -0.3, "kind": "start", "host": 0}, {"t": -0.2, "kind": "ready", "host": 0},
              {"t": -0.3, "kind": "start", "host": 1}, {"t": -0.25, "kind": "ready", "host": 1},
              {"t": 4.0005, "kind": "exit", "host": 1},       # killed at 4.00 s
              {"t": 6.0, "kind": "start", "host": 1}, {"t": 6.2, "kind": "ready", "host": 1},
              {"t": 7.0, "kind": "pause", "host": 0}, {"t": 8.5, "kind": "resume", "host": 0},
              {"t": 10.1, "kind": "stop", "host": 0}, {"t": 10.1, "kind": "stop", "host": 1}]
    lanes = lane_rows(events, 10.0)
    assert lanes[1] == [{"t": 4.0005, "span": pytest.approx(1.9995), "state": "down"},
                        {"t": 6.0, "span": pytest.approx(0.2), "state": "starting"}]
    assert lanes[0] == [{"t": 7.0, "span": 1.5, "state": "paused"}]
    crashed = lane_rows([{"t": 0.0, "kind": "start", "host": 2}, {"t": 0.5, "kind": "exit", "host": 2},
                         {"t": 0.6, "kind": "no-restart", "host": 2}], 3.0)
    assert [(r["state"], r["t"]) for r in crashed[2]] == [("starting", 0.0), ("down", 0.5), ("stopped", 0.6)]
    assert crashed[2][-1]["span"] == pytest.approx(2.4)


def test_hosts_alive_per_second_counts_a_change_in_the_second_it_happened() -> None:
    """A host killed at 4.000 s and seen by a sampler that woke at 4.002 s belongs to second 4, not 3."""
    async def main() -> list[int]:
        hosts = [Host(index=i, name=f"h{i}", port=0, dir=Path("."), argv=[], env={}, cwd=Path("."),
                      state=State.UP) for i in range(3)]
        supervisor = FleetSupervisor(hosts, None, None, None, None)   # type: ignore[arg-type]
        t0 = trio.current_time()
        supervisor.mark_alive_boundary()
        counts = [supervisor.take_fewest_alive(until=t0 + 1)]
        await trio.sleep_until(t0 + 2.001)                     # a host dies just after second 1 ended
        hosts[0].state = State.DOWN
        supervisor._alive_changed()
        counts.append(supervisor.take_fewest_alive(until=t0 + 2))   # second 1, sampled late: still 3
        counts.append(supervisor.take_fewest_alive(until=t0 + 3))   # second 2: 2
        hosts[0].state = State.UP
        supervisor._alive_changed()
        hosts[1].state = State.DOWN
        supervisor._alive_changed()                              # back and another down, within second 3
        hosts[1].state = State.UP
        supervisor._alive_changed()
        counts.append(supervisor.take_fewest_alive(until=t0 + 10))
        return counts
    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == [3, 3, 2, 2]


def _sample(t: int, ok: int, **extra: object) -> dict[str, object]:
    return {"t": t, "span": 1, "offered": ok, "sent": ok, "ok": ok, "timeout": 0, "conn_error": 0, "no_host": 0,
            "bad_reply": 0, "hist": None, "hosts_alive": 2, **extra}


def test_the_drain_after_the_load_adds_outcomes_not_a_second() -> None:
    samples = [_sample(t, 100) for t in range(6)] + [_sample(6, 0) | {"timeout": 7}]
    overall = window_metrics(samples, [], -float("inf"), float("inf"), until=6.0)
    assert overall["seconds"] == 6 and overall["achieved_rate"] == 100.0 and overall["errors"]["timeout"] == 7
    last = window_metrics(samples, [{"t": 6.5}], 3.0, 6.0, until=6.0, counts_end=float("inf"))
    assert last["seconds"] == 3 and last["errors"]["timeout"] == 7 and last["crashes"] == 0
    partial = window_metrics([_sample(t, 100) for t in range(7)], [], 0.0, 6.5, until=6.5, counts_end=float("inf"))
    assert partial["seconds"] == 6.5                             # the last second only half ran


def test_status_line_fits_and_keeps_what_matters() -> None:
    parts = ["trial 2/6 jemalloc-junk", "12/60s", "ETA 4m10s", "up 7/8", "crashes 3", "p99 12.0ms", "ok 480/s"]
    assert fit(parts, 200) == "  ".join(parts)
    narrow = fit(parts, 40)
    assert len(narrow) <= 39 and narrow.startswith("trial 2/6 jemalloc-junk  12/60s")
    assert len(fit(["x" * 50], 20)) == 19
    assert eta_text(250) == "ETA 4m10s" and eta_text(3700) == "ETA 1h01m" and eta_text(None) == "ETA ?"
    assert run_eta(elapsed_in_trial=10, duration=60, trial=2, trials=4, finished_trial_walls=[70.0]) == 50 + 2 * 70


def test_command_line_consistency() -> None:
    parser = _parser()
    assert parser.parse_args(["run", "s.yaml", "--out", "elsewhere"]).results == Path("elsewhere")
    assert parser.parse_args(["soak", "s.yaml", "--results", "r2"]).results == Path("r2")
    for command in (["report", "x"], ["crashes", "x"], ["compare", "x"], ["calibrate", "x"], ["resume", "x"]):
        assert parser.parse_args(command + ["--results", "r3"]).results == Path("r3"), command
    assert parser.parse_args(["crashes", "latest", "--json"]).json
    # --html takes a FILE only when a RUN is given as well: `--html latest` alone is the run
    html = parser.parse_args(_report_args(["report", "--html", "latest"]))
    assert (html.run, html.html) == ("latest", "")
    html = parser.parse_args(_report_args(["report", "--html", "latest", "--junit", "j.xml"]))
    assert (html.run, html.html, html.junit) == ("latest", "", Path("j.xml"))
    html = parser.parse_args(_report_args(["report", "--html", "page.html", "latest"]))
    assert (html.run, html.html) == ("latest", "page.html")
    html = parser.parse_args(_report_args(["report", "latest", "--html"]))
    assert (html.run, html.html) == ("latest", "")
    with pytest.raises(SystemExit) as version:
        parser.parse_args(["--version"])
    assert version.value.code == 0
