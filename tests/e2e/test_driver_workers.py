"""Driver workers end to end (client.workers): real echo hosts, real worker processes, real kills.

Every arrival of the plan is accounted for across the workers; a killed host's share moves to the
survivors in every worker; a paused host is ejected by every worker; a worker that dies fails the run
with its reason; workers never outlive the harness, however it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from conftest import HARNESS, pid_alive, query, start_harness, wait_for, wait_for_run, write_scenario

from harness.scenario.loader import load_scenario
from harness.plan.streams import arrivals

FLEET = """
name: workers-e2e
seed: 5
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{port}"]
  restart: {policy: always, backoff: 200ms}
  expect_reply: "^GET k[0-9]+$"
fleet: {hosts: 4, balancer: least-loaded}
client: {timeout: 400ms, connections: 2, workers: 2}
"""


def run_harness(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def worker_pids(run_dir: Path | None = None) -> list[int]:
    """Driver worker processes (of this run when given: they run in its hosts folder)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if b"harness.run.driverworker" in argv and (run_dir is None or cwd.startswith(str(run_dir))):
            found.append(int(name))
    return [pid for pid in found if pid_alive(pid)]


@pytest.mark.slow
def test_two_workers_send_the_whole_plan_and_move_a_dead_hosts_share(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, FLEET + """
load:
  - {hold: {rate: 1200, for: 7s}}
faults:
  - {kind: host-loss, at: 2s, hosts: 1, how: kill, down_for: 3s}
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "results"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    run_dir = Path(report["run_dir"])
    detail = json.loads(query(run_dir, "SELECT detail FROM trials")[0]["detail"])
    assert detail["driver_workers"] == 2
    assert detail["send_lag_us"]["50"] > 0

    # Every arrival of the plan went out exactly once (across both workers) and ended as something.
    plan = load_scenario(scenario)
    planned = sum(1 for _ in arrivals(plan.load, plan.client.keys, plan.seed))
    samples = query(run_dir, "SELECT * FROM samples WHERE trial=1 ORDER BY t")
    assert sum(s["offered"] for s in samples) == planned
    accounted = sum(s["ok"] + s["timeout"] + s["conn_error"] + s["no_host"] + s["bad_reply"] for s in samples)
    assert accounted == planned, "every arrival ends as ok or a counted error"
    assert sum(s["bad_reply"] for s in samples) == 0          # each reply matched its own request
    assert sum(s["ok"] for s in samples) > 0.95 * planned
    # Latency histograms merged from both workers: one per second, counting every good reply.
    for s in samples:
        assert (HdrHistogram.decode(s["hist"]).get_total_count() if s["hist"] else 0) == s["ok"]

    # The killed host: out of both workers' rotation after the kill, no requests while it is down, and
    # the survivors took its share; back in rotation after it restarted.
    killed = report["trials"][0]["host_losses"][0]["hosts"][0]
    events = query(run_dir, "SELECT t, kind, host, detail FROM events WHERE trial=1 ORDER BY t")
    death = next(e["t"] for e in events if e["kind"] == "exit" and e["host"] == killed)
    back = next((e["t"] for e in events if e["kind"] == "ready" and e["host"] == killed and e["t"] > death), 7.0)
    outs = [e for e in events if e["kind"] == "host-out" and e["host"] == killed]
    assert {json.loads(e["detail"])["worker"] for e in outs} == {0, 1}
    kill = next(e["t"] for e in events if e["kind"] == "host-loss")
    assert all(e["t"] >= kill for e in outs)                 # out because of the kill, not before it
    rows = query(run_dir, "SELECT t, host, sent FROM host_samples WHERE trial=1")
    sent = {(r["t"], r["host"]): r["sent"] for r in rows}
    down = [t for t in range(7) if death < t and t + 1 < back]
    assert down, (death, back)
    for t in down:
        assert sent[(t, killed)] == 0, (t, sent)
        offered = next(s["offered"] for s in samples if s["t"] == t)
        assert sum(sent[(t, h)] for h in range(4) if h != killed) == offered - \
            next(s["no_host"] for s in samples if s["t"] == t)
    if back + 1 < 7:          # back in rotation after its restart, in both workers
        assert sum(sent[(t, killed)] for t in range(7) if t > back) > 0
    assert not worker_pids(run_dir)


@pytest.mark.slow
def test_a_paused_host_is_ejected_by_every_worker(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, FLEET + """
load:
  - {hold: {rate: 600, for: 5s}}
faults:
  - {kind: host-loss, at: 1500ms, hosts: 1, how: pause, for: 2s}
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "results"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    run_dir = Path(report["run_dir"])
    paused = report["trials"][0]["host_losses"][0]["hosts"][0]
    outs = [json.loads(e["detail"]) for e in query(
        run_dir, "SELECT detail FROM events WHERE trial=1 AND kind='host-out' AND host=?", (paused,))]
    # Found by the first worker whose request timed out, and ejected by the other too (told, or itself).
    assert {o["worker"] for o in outs} == {0, 1}
    assert {o["why"] for o in outs} <= {"timeout", "ejected elsewhere"}
    samples = query(run_dir, "SELECT * FROM samples WHERE trial=1")
    assert sum(s["timeout"] for s in samples) > 0
    offered = sum(s["offered"] for s in samples)
    assert offered == sum(s["ok"] + s["timeout"] + s["conn_error"] + s["no_host"] + s["bad_reply"] for s in samples)


@pytest.mark.slow
def test_a_worker_that_dies_fails_the_run_with_its_reason(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, FLEET + """
load:
  - {hold: {rate: 300, for: 60s}}
""")
    harness = start_harness(["run", str(scenario), "--out", "results", "--quiet"], cwd=tmp_path)
    try:
        run_dir = wait_for_run(tmp_path / "results", samples=1)
        workers = wait_for(lambda: worker_pids(run_dir) if len(worker_pids(run_dir)) == 2 else None)
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = harness.communicate(timeout=120)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
    assert harness.returncode == 2, stderr
    assert "driver worker" in stderr and "SIGKILL" in stderr, stderr
    assert "Traceback" not in stderr
    trial = query(run_dir, "SELECT status, detail FROM trials")[0]
    assert trial["status"] == "failed"
    assert "driver worker" in json.loads(trial["detail"])["failure"]
    # What was gathered before is kept, and nothing is left running.
    assert query(run_dir, "SELECT COUNT(*) AS n FROM samples")[0]["n"] >= 1
    assert not worker_pids(run_dir)


@pytest.mark.slow
def test_workers_die_with_a_killed_harness(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, FLEET + """
load:
  - {hold: {rate: 200, for: 60s}}
""")
    harness = start_harness(["run", str(scenario), "--out", "results", "--quiet"], cwd=tmp_path)
    try:
        run_dir = wait_for_run(tmp_path / "results", samples=1)
        workers = wait_for(lambda: worker_pids(run_dir) if len(worker_pids(run_dir)) == 2 else None)
        harness.kill()
        harness.wait()
        wait_for(lambda: not any(pid_alive(pid) for pid in workers), timeout=30)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
