"""Accounting on real fleets: exposure from the hosts' real uptime, compare with one trial per variant,
what each fault window did, crashes seen while the fleet is stopped, events in the second they happened,
and a --duration that cuts the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HARNESS, query, write_scenario

from harness.present.html import lane_rows

# arena-server with 4 cache items under jemalloc junk:true reads a junk-filled freed item within its first
# few dozen requests: each incarnation dies in well under a second (poison-address in cache_touch), and
# is restarted after 200 ms. Under glibc the same read returns the stale, still correct item.
JUNK = """
name: junk-short
seed: 4
target:
  root: @REPO@
  command: [targets/arena/arena-server, --port, "{port}", --cache-items, "4"]
  restart: {policy: always, backoff: 200ms, max_backoff: 200ms}
  expect_reply: "^OK"
fleet: {hosts: 1}
client: {timeout: 500ms, connections: 1, keys: {space: 40}}
load:
  - {hold: {rate: 200, for: 4s}}
cores: {keep_per_bucket: 1, sample_every: 1000}
variants:
  - {name: glibc}
  - {name: jemalloc-junk, allocator: jemalloc, env: {MALLOC_CONF: "junk:true"}}
"""


def harness(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.slow
@pytest.mark.serial   # asserts each incarnation dies within 1 s of its start: failed beside 3 busy workers
def test_junk_fill_host_dying_in_its_first_second(targets: Path, tmp_path: Path) -> None:
    """Exposure is the uptime of every incarnation, so a crash-looping junk-fill variant has a crash rate
    (and it is worse than glibc's, with a p-value, at one trial each); compare at n=1 exits 0."""
    ran = harness(["run", str(write_scenario(tmp_path, JUNK)), "--results", "results", "--quiet", "--json"], tmp_path)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    glibc, junk = report["trials"]
    assert glibc["crashes_total"] == 0 and junk["crashes_total"] >= 3
    run_dir = Path(report["run_dir"])
    # Each incarnation's life: start to exit (its measured uptime), or to the stop at the trial's end.
    starts = {r["pid"]: r["t"] for r in query(run_dir, "SELECT t, pid FROM events WHERE trial=2 AND kind='start'")}
    lives: dict[int, float] = {}
    for row in query(run_dir, "SELECT t, pid, kind, detail FROM events WHERE trial=2 AND kind IN ('exit', 'stop') "
                              "ORDER BY t"):
        detail = json.loads(row["detail"])
        if row["pid"] not in lives:
            lives[row["pid"]] = detail["uptime"] if row["kind"] == "exit" else row["t"] - starts[row["pid"]]
    crashed = [json.loads(r["detail"])["uptime"] for r in query(
        run_dir, "SELECT detail FROM events WHERE trial=2 AND kind='exit' AND json_extract(detail, '$.signal') = 11")]
    assert len(crashed) >= 3 and max(crashed) < 1.0, f"every junk incarnation dies in its first second: {crashed}"
    assert all(c["uptime"] < 1.0 for c in junk["crashes"])

    result = harness(["compare", str(run_dir), "--baseline", "glibc", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    compared = json.loads(result.stdout)
    variants = {v["name"]: v for v in compared["variants"]}
    exposure = variants["jemalloc-junk"]["exposure"]
    assert exposure["source"] == "uptime"
    assert exposure["incarnations"] == len(starts) == len(lives)
    assert abs(exposure["host_hours"] * 3600 - sum(lives.values())) < 1e-6
    assert exposure["host_hours"] * 3600 < variants["glibc"]["exposure"]["host_hours"] * 3600
    assert variants["jemalloc-junk"]["crash_rate"]["per_host_hour"]["rate"] > 0
    rows = {r["metric"]: r for r in compared["rows"]}
    crash = rows["crash_rate"]
    assert crash["verdict"] == "worse" and crash["p_value"] is not None and crash["p_value"] < 0.01, crash["text"]
    assert "n too small: 1 vs 1" in rows["p99_latency"]["text"]
    text = harness(["compare", str(run_dir), "--baseline", "glibc"], tmp_path)
    assert text.returncode == 0 and "worse (" in text.stdout and "host-s" in text.stdout
    # Proof of what ran, for hosts that lived well under a second: each crash carries its incarnation's.
    # (a process that died while its live proof was being read leaves that proof unknown, "?")
    loaded = variants["jemalloc-junk"]["loaded"]
    assert "jemalloc (preload)" in loaded and not any(p.startswith(("glibc", "tcmalloc", "mimalloc")) for p in loaded)
    assert all(c["detail"]["proof"]["allocator"] == "jemalloc" for c in junk["crashes"])


# estats with its stats block off answers ERR nomem to a failed allocation and never crashes: fault
# windows that fire show as injected failures, and a window that fires nothing shows as 0 injected.
EFFECTS = """
name: effects
seed: 3
target:
  root: @REPO@
  command: [targets/estats/estats-server, --port, "{port}", --estats, "off", --service-ms, "2",
            --scratch-kb, "4", --stats-kb, "1"]
  restart: {policy: always, backoff: 200ms}
  expect_reply: "^OK"
fleet: {hosts: 2, balancer: round-robin}
client: {timeout: 500ms, connections: 1}
load:
  - {hold: {rate: 200, for: 5s, name: steady}}
  - {spike: {factor: 2, for: 3s, name: surge}}
faults:
  - {kind: alloc-fail, mode: nth, nth: 1000000000, from: 500ms, until: 2s}
  - {kind: alloc-fail, mode: nth, nth: 20, from: 2s, until: 4s}
  - {kind: host-loss, at: 3s, hosts: 1, how: kill, down_for: 30s}
expect:
  - {crashes: 0, phase: surge}
  - {error_rate: "< 50%", phase: steady}
"""


@pytest.mark.slow
def test_fault_effects_time_bookkeeping_and_a_cut_plan(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, EFFECTS)
    ran = harness(["run", str(scenario), "--duration", "5s", "--results", "results", "--quiet", "--json", "--html"],
                  tmp_path)
    # The surge was cut: its expectation is not evaluated (a failure with the reason), never "held".
    assert ran.returncode == 1, ran.stderr
    notes = [line for line in ran.stderr.splitlines() if line.startswith("harness: note:")]
    assert any("phase surge (5s-8s): dropped" in line for line in notes), ran.stderr
    report = json.loads(ran.stdout)
    expectations = {e["text"]: e for e in report["expectations"]}
    surge = expectations["crashes 0"]
    assert surge["held"] is False and surge["evaluated"] is False and "surge did not run" in surge["observed_text"]
    assert expectations["error_rate < 50%"]["held"] and expectations["error_rate < 50%"]["evaluated"]
    assert report["plan_cut"]["phases"] == [{"name": "surge", "start": 5.0, "end": 8.0, "ran": 0.0}]

    trial = report["trials"][0]
    windows = trial["fault_windows"]
    assert [(w["fault"], w["start"] >= 0.5, w["ended_by"]) for w in windows] == [(0, True, "schedule"),
                                                                               (1, True, "schedule")]
    quiet, firing = windows
    assert {h["host"] for h in quiet["hosts"]} == {0, 1}
    assert all(h["injected"] == 0 and h["eligible"] > 0 and h["first"] is None for h in quiet["hosts"]), quiet
    assert firing["injected"] > 0 and firing["injected"] <= firing["eligible"] // 20 + 2
    for host in firing["hosts"]:
        if host["injected"]:
            assert firing["start"] <= host["first"] <= host["last"] <= firing["end"]
    assert trial["overall"]["errors"]["bad_reply"] > 0       # the failed allocations became ERR nomem replies

    # The host killed at 3 s is down from the second it died in, in hosts-alive and in the HTML lanes.
    alive = trial["hosts_alive"]
    assert alive[0]["from"] == 0 and alive[0]["alive"] == 2 and alive[0]["to"] == 3, alive
    assert alive[1]["from"] == 3 and alive[1]["alive"] == 1, alive
    run_dir = Path(report["run_dir"])
    lost = trial["host_losses"][0]["hosts"][0]
    events = [dict(r) for r in query(run_dir, "SELECT t, kind, host FROM events WHERE host IS NOT NULL")]
    down = [row for row in lane_rows(events, trial["end"]).get(lost, []) if row["state"] == "down"]
    assert down and 3.0 <= down[0]["t"] < 3.5, down

    text = harness(["report", str(run_dir)], tmp_path)
    assert text.returncode == 1
    assert "fault windows" in text.stdout and "0 / " in text.stdout and "NOT EVALUATED" in text.stdout
    assert "None" not in text.stdout
    page = (run_dir / "report.html").read_text()
    assert '<section id="faults">' in page and 'class="num zero">0 / ' in page


# A target that aborts when asked to stop (a double free in an exit path, say): the crash is found while
# the harness stops the fleet, after the faults were disarmed at the trial's end.
ABORT_ON_TERM = r'''
import os, signal, socket, sys, threading
signal.signal(signal.SIGTERM, lambda *_: os.abort())
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def serve(conn):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(b"OK\n")
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


@pytest.mark.slow
def test_crash_while_stopping_is_timed_and_told_the_faults_were_disarmed(tmp_path: Path) -> None:
    (tmp_path / "abort_on_term.py").write_text(ABORT_ON_TERM)
    scenario = write_scenario(tmp_path, f"""
name: stopping
target:
  command: [{sys.executable}, {tmp_path / "abort_on_term.py"}, "{{port}}"]
  ready: {{tcp: "{{port}}", timeout: 10s}}
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 20, for: 2s}}}}]
faults:
  - {{kind: alloc-fail, mode: budget, budget: 64GiB}}
""")
    ran = harness(["run", str(scenario), "--results", "results", "--quiet", "--json"], tmp_path)
    assert ran.returncode == 0, ran.stderr
    trial = json.loads(ran.stdout)["trials"][0]
    (crash,) = trial["crashes"]
    assert crash["signal_name"] == "SIGABRT" and crash["when"] == "stopping"
    stopping = crash["detail"]["stopping"]
    assert stopping["dead_before_stop"] is False
    run_dir = Path(json.loads(ran.stdout)["run_dir"])
    (stop,) = query(run_dir, "SELECT t, detail FROM events WHERE kind='stop'")
    (exit_event,) = query(run_dir, "SELECT t FROM events WHERE kind='exit'")
    # The death is timed when it was seen, not after the clean-up that followed it (the stop event).
    assert stopping["since"] <= crash["t"] == exit_event["t"] <= stop["t"]
    assert json.loads(stop["detail"])["began"] == stopping["since"]
    # Armed at that moment: nothing (the budget was disarmed when the load ended); the window says so.
    assert crash["faults_armed"] == []
    (window,) = trial["fault_windows"]
    assert window["ended_by"] == "trial end" and window["end"] <= crash["t"]
    shown = harness(["crashes", str(run_dir), "--json"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    bucket = json.loads(shown.stdout)["buckets"][0]["bucket"]
    detail = harness(["crashes", str(run_dir), bucket], tmp_path)
    assert "none (the faults were disarmed when the trial ended" in detail.stdout, detail.stdout
    assert "None" not in detail.stdout
