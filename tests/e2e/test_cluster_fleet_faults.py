"""--cluster with a real fleet when things go wrong: hosts crashing on the worker machines, a worker machine lost
unplanned (its whole process group SIGKILLed), Ctrl-C on the command, and a shipped service scenario run over the
cluster unchanged. The "machines" are Dask workers in their own network namespaces (netns_machines); the store,
the load and the report are on this one.

Each test asserts what the one store and `harness report` say, and that nothing of the run is left running in
the machines' namespaces (no agent, no watchdog, no target)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns_machines as netns
from conftest import query, wait_for, wait_for_run
from dask_local import cluster, echo_target

REPO = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness"]
ESTATS = REPO / "targets" / "estats" / "estats-server"
ECHO_SERVER = REPO / "targets" / "echo" / "echo-server"

# 4 estats hosts (2 a machine) whose heap budget the spike overruns: a failed stats allocation is dereferenced
# (SIGSEGV at NULL+0x40 in estats_update), each host crashes and restarts several times, on both machines.
CRASHING = f"""
name: cluster-crashes
seed: 99
target:
  root: {REPO}
  build: [make, -s, -C, targets/estats]
  command: [targets/estats/estats-server, --port, "{{port}}", --host, "{{addr}}", --estats, "on",
            --service-ms, "100", --scratch-kb, "16", --stats-kb, "4"]
  restart: {{policy: always, backoff: 300ms}}
  expect_reply: "^OK"
fleet: {{hosts: 4, balancer: least-loaded, placement: spread}}
client: {{timeout: 1s, connections: 2}}
load:
  - {{hold: {{rate: 200, for: 2s}}}}
  - {{spike: {{factor: 4, for: 8s, name: midnight}}}}
faults:
  - {{kind: alloc-fail, mode: budget, budget: 300KiB}}
"""

# 4 echo hosts, 2 a machine, under a steady load long enough to lose a machine or press Ctrl-C in the middle.
# The second expectation cannot hold once a machine is lost: its hosts count as down.
ECHO = f"""
name: cluster-echo-faults
seed: 7
{echo_target()}  restart: {{policy: always, backoff: 1s}}
fleet: {{hosts: 4, balancer: least-loaded, placement: spread}}
client: {{timeout: 500ms, connections: 2}}
load:
  - {{hold: {{rate: 300, for: 14s}}}}
expect:
  - {{hosts_alive: ">= 2"}}
  - {{hosts_alive: ">= 4"}}
"""


@pytest.fixture(scope="module")
def namespaces() -> Iterator[netns.Machines]:
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("distributed")
    with netns.machines(2) as made:
        yield made


def _workers(made: netns.Machines) -> list[tuple[list[str], str]]:
    return [(made.exec_prefix(i), address) for i, address in enumerate(made.addresses)]


@pytest.fixture(scope="module")
def machines(namespaces: netns.Machines) -> Iterator[tuple[netns.Machines, str]]:
    """Two workers, one in each namespace, shared by the tests that leave them running."""
    with cluster(namespaces.bridge_address, _workers(namespaces)) as address:
        yield namespaces, address


def _in_namespaces(made: netns.Machines) -> list[tuple[int, list[str]]]:
    """Every process (pid, argv) in the machines' network namespaces (theirs only: other tests' runs on this
    machine are elsewhere)."""
    inodes = {os.stat(f"/run/netns/{name}").st_ino for name in made.namespaces}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino not in inodes:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
        except OSError:
            continue            # gone meanwhile
        if argv:
            found.append((int(entry), argv))
    return found


def _leftovers(made: netns.Machines, *programs: Path) -> list[tuple[int, list[str]]]:
    """The run's processes still there on the machines: an agent, its driver shard, a watchdog
    (harness/run/reaper.py) or a target."""
    names = {p.name for p in programs}
    return [(pid, argv) for pid, argv in _in_namespaces(made)
            if "harness.cluster.machine" in argv or "harness.run.driverworker" in argv
            or any(a.endswith("reaper.py") for a in argv)
            or Path(argv[0]).name in names]


def _assert_nothing_left(made: netns.Machines, *programs: Path) -> None:
    # the watchdogs kill asynchronously: wait for it, then say what is left if anything is
    try:
        wait_for(lambda: not _leftovers(made, *programs), timeout=60, interval=0.5)
    except AssertionError:
        raise AssertionError(f"left running on the machines: {_leftovers(made, *programs)}") from None


def _placed(run_dir: Path) -> dict[int, dict]:
    """Machine number (1-based) -> its entry in the trial's `machines` detail."""
    detail = json.loads(query(run_dir, "SELECT detail FROM trials")[0]["detail"])
    return {m["machine"]: m for m in detail["machines"]}


def _run(scenario: Path, out: Path, address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, "run", str(scenario), "--out", str(out), "--quiet", "--cluster", address,
                           *extra], capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_crashes_on_both_machines_come_back_with_their_cores_and_triage(tmp_path: Path, machines) -> None:
    made, address = machines
    scenario = tmp_path / "crashes.yaml"
    scenario.write_text(CRASHING, encoding="utf-8")
    run = _run(scenario, tmp_path / "results", address)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    (run_dir,) = [p for p in (tmp_path / "results").iterdir() if (p / "run.db").exists()]
    placed = _placed(run_dir)
    machine_of = {host: number for number, m in placed.items() for host in m["hosts"]}
    assert sorted(machine_of) == [0, 1, 2, 3] and sorted(placed) == [1, 2]

    crashes = query(run_dir, "SELECT * FROM crashes ORDER BY t")
    assert crashes, "the heap budget made the hosts crash"
    # every crash is a death by a signal the harness did not send, seen on the host's machine: the crash
    # rows are exactly the exits by a signal without a cause (no host-loss, no stop here)
    exits = [json.loads(e["detail"]) for e in query(run_dir, "SELECT detail FROM events WHERE kind='exit'")]
    assert len(crashes) == len([d for d in exits if d.get("signal") is not None and "cause" not in d])
    assert len(crashes) == sum(h["crashes"] for h in json.loads(
        query(run_dir, "SELECT detail FROM trials")[0]["detail"])["hosts"])
    on_machine = set()
    for crash in crashes:
        detail = json.loads(crash["detail"])
        number = machine_of[crash["host"]]
        on_machine.add(number)
        assert detail["machine"]["machine"] == number
        assert detail["machine"]["addr"] == made.addresses[number - 1] == placed[number]["addr"]
        assert crash["signal_name"] == "SIGSEGV" and crash["core_dumped"] == 1
        # the core was collected on its machine, into that machine's folder of the run
        assert Path(crash["core_path"]).is_relative_to(run_dir / "machines" / f"m{number}" / "hosts"), \
            crash["core_path"]
        # filled in on this machine (its load, its fleet), not by the machine that saw the crash
        assert 0 <= crash["hosts_alive"] <= 3 and crash["host_inflight"] >= 0
        assert detail["shim"]["armed"][0]["mode"] == "budget"
    assert on_machine == {1, 2}
    # taken at the moment of death (not when the record came with its machine's next batch, by which time
    # the whole fleet may be down): the first crashes of the night leave hosts alive
    assert max(c["hosts_alive"] for c in crashes) >= 1

    # every core triaged where it was written, its triage in the one store, keyed by its crash
    triage = {row["uid"]: row for row in query(run_dir, "SELECT * FROM triage")}
    assert {c["uid"] for c in crashes} <= set(triage)
    for crash in crashes:
        row = triage[crash["uid"]]
        assert row["crash_class"] == "null-deref", dict(row)
        assert row["signature"].startswith("estats_update < handle_request")
        data = json.loads(row["data"])
        if data.get("core_kept"):           # kept cores are still on their machine's disk
            assert Path(data["core"]).is_file()
    buckets = {row["bucket"] for row in triage.values()}
    assert len(buckets) == 1

    report = subprocess.run([*HARNESS, "report", str(run_dir)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    (bucket,) = buckets
    assert f"crashes: {len(crashes)} (SIGSEGV: {len(crashes)}" in report.stdout
    assert bucket[:12] in report.stdout and "estats_update < handle_request" in report.stdout
    assert f"/machines/m" in report.stdout       # where an example core is: on its machine's folder
    as_json = json.loads(subprocess.run([*HARNESS, "report", str(run_dir), "--json"], capture_output=True,
                                        text=True, cwd=REPO, timeout=120).stdout)
    trial = as_json["trials"][0]
    assert len(trial["crashes"]) == len(crashes)
    assert {c["crash_class"] for c in trial["crashes"]} == {"null-deref"}
    assert sum(b["count"] for b in trial["buckets"]) == len(crashes)
    # the budget's window, closed by each machine on its own hosts, is one window over all four
    (window,) = trial["fault_windows"]
    assert [h["host"] for h in window["hosts"]] == [0, 1, 2, 3] and window["injected"] > 0
    _assert_nothing_left(made, ESTATS)


@pytest.mark.slow
def test_a_machine_lost_unplanned_is_recorded_and_the_other_carries_the_load(tmp_path: Path, namespaces) -> None:
    """A worker machine's whole process group (nanny, worker, and the agent under it) SIGKILLed mid-run."""
    distributed = pytest.importorskip("distributed")
    made = namespaces
    scenario = tmp_path / "echo.yaml"
    scenario.write_text(ECHO, encoding="utf-8")
    results = tmp_path / "results"
    # a cluster of its own: this test kills one of its workers
    with cluster(made.bridge_address, _workers(made)) as address, \
            distributed.Client(address, timeout=60) as observer:
        run = subprocess.Popen([*HARNESS, "run", str(scenario), "--out", str(results), "--quiet", "--cluster",
                                address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            run_dir = wait_for_run(results, samples=3)         # the load has been going for 3 s
            victim = sorted(observer.scheduler_info()["workers"])[0]
            pid = observer.run(os.getpid, workers=[victim])[victim]
            os.killpg(os.getpgid(pid), signal.SIGKILL)          # the whole "machine": nanny, worker, agent
            _, err = run.communicate(timeout=600)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        # the hosts of the lost machine were killed by its agent's watchdog; the other machine stopped its own
        _assert_nothing_left(made, ECHO_SERVER)

    assert "Traceback" not in err
    # the run completed; the expectation that every host stayed alive failed (exit 1): the lost ones count
    assert run.returncode == 1, err
    assert query(run_dir, "SELECT status FROM runs")[0]["status"] == "complete"
    assert query(run_dir, "SELECT status FROM trials")[0]["status"] == "complete"
    placed = _placed(run_dir)
    lost_number = next(n for n, m in placed.items() if m["worker"] == victim)
    lost, kept = placed[lost_number], placed[3 - lost_number]
    assert lost["lost"] and lost["lost"] != "machine-loss" and kept["lost"] is None
    assert f"harness: warning: machine {lost_number} ({victim}) was lost during the trial" in err

    (event,) = query(run_dir, "SELECT t, detail FROM events WHERE kind='machine-lost'")
    detail = json.loads(event["detail"])
    assert detail["unplanned"] is True and detail["machine"] == lost_number and detail["worker"] == victim
    assert sorted(detail["hosts"]) == sorted(lost["hosts"])
    assert event["t"] == pytest.approx(lost["lost_at"], abs=1e-5) and event["t"] >= 2
    assert not query(run_dir, "SELECT * FROM events WHERE kind='machine-loss'")    # (that is the planned one)
    # its driver shard went with it: the standby here took its share over from then on
    (takeover,) = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events "
                                                                  "WHERE kind='driver-takeover'")]
    assert takeover["machine"] == lost_number and takeover["at"] >= event["t"]

    # its hosts count as down from then on; the other machine's served everything offered
    lost_second = int(event["t"])
    samples = query(run_dir, "SELECT t, offered, ok, hosts_alive FROM samples ORDER BY t")
    assert [s["t"] for s in samples][:14] == list(range(14))
    assert all(s["hosts_alive"] == 4 for s in samples if s["t"] < lost_second)
    assert all(s["hosts_alive"] == 2 for s in samples if s["t"] > lost_second)
    by_host = query(run_dir, "SELECT t, host, ok FROM host_samples")

    def ok_on(hosts: list[int], first: int, last: int) -> int:
        return sum(r["ok"] for r in by_host if first <= r["t"] < last and r["host"] in hosts)
    assert ok_on(lost["hosts"], 0, lost_second) > 0 and ok_on(kept["hosts"], 0, lost_second) > 0
    assert ok_on(lost["hosts"], lost_second + 1, 15) == 0
    after = [s for s in samples if lost_second + 2 <= s["t"] < 14]
    assert after, "load went on after the loss"
    assert sum(s["ok"] for s in after) >= 0.97 * sum(s["offered"] for s in after)
    assert ok_on(kept["hosts"], lost_second + 2, 14) == sum(s["ok"] for s in after)

    report = subprocess.run([*HARNESS, "report", str(run_dir)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert report.returncode == 1, report.stderr          # the failed expectation again
    assert f"lost at {lost['lost_at']:.2f}s ({lost['lost']})" in report.stdout
    share = next(line for line in report.stdout.splitlines() if "share of good replies by machine" in line)
    assert f"m{lost_number} 0.0%" in share.split("|")[-1] and f"m{3 - lost_number} 100.0%" in share.split("|")[-1]


@pytest.mark.slow
def test_ctrl_c_stops_the_hosts_on_every_machine(tmp_path: Path, machines) -> None:
    made, address = machines
    scenario = tmp_path / "echo.yaml"
    scenario.write_text(ECHO, encoding="utf-8")
    results = tmp_path / "results"
    run = subprocess.Popen([*HARNESS, "run", str(scenario), "--out", str(results), "--quiet", "--cluster", address],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        run_dir = wait_for_run(results, samples=3)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "Traceback" not in err
    assert run.returncode == 128 + signal.SIGINT, err
    assert "SIGINT received, stopping the fleet" in err
    assert query(run_dir, "SELECT status FROM runs")[0]["status"] == "interrupted"
    assert query(run_dir, "SELECT status FROM trials")[0]["status"] == "interrupted"
    placed = _placed(run_dir)
    assert not any(m["lost"] for m in placed.values())       # stopped, not lost
    # each machine stopped its own hosts (a stop event each, sent back before it said it was done)
    stopped = {r["host"] for r in query(run_dir, "SELECT host FROM events WHERE kind='stop'")}
    assert stopped == {0, 1, 2, 3}
    for m in placed.values():
        assert set(m["hosts"]) <= stopped
    assert not query(run_dir, "SELECT * FROM crashes")
    assert "interrupted" in out
    _assert_nothing_left(made, ECHO_SERVER)


@pytest.mark.slow
def test_the_shipped_varnish_scenario_runs_over_the_cluster_unchanged(tmp_path: Path, machines) -> None:
    """scenarios/varnish.yaml binds {addr}: 127.0.0.1 on one machine, each worker machine's address here."""
    made, address = machines
    run = _run(REPO / "scenarios" / "varnish.yaml", tmp_path / "results", address, "--duration", "8s", "--json")
    assert "Traceback" not in run.stderr
    report = json.loads(run.stdout)
    run_dir = Path(report["run_dir"])
    placed = _placed(run_dir)
    assert {m["addr"] for m in placed.values()} == set(made.addresses)
    # each host listened on its machine's address (nothing on this machine's loopback)
    starts = query(run_dir, "SELECT host, detail FROM events WHERE kind='start'")
    for row in starts:
        argv = json.loads(row["detail"])["argv"]
        number = next(n for n, m in placed.items() if row["host"] in m["hosts"])
        assert argv[argv.index("-a") + 1].startswith(f"{made.addresses[number - 1]}:"), argv
    trial = report["trials"][0]
    overall = trial["overall"]
    assert overall["ok"] >= 0.999 * overall["offered"] > 0, overall
    assert trial["replies"]["status"]["404"] > 0          # the VCL's answers, from both machines
    assert all(m["lost"] is None for m in placed.values())
    # both machines served (the host-loss of the scenario kills one host; its share moved to the others)
    by_machine = {n: sum(r["ok"] for r in query(run_dir, "SELECT host, ok FROM host_samples")
                         if r["host"] in m["hosts"]) for n, m in placed.items()}
    assert all(ok > 0 for ok in by_machine.values()), by_machine
    # judged (the saved copy's `files:` resolved where the scenario is): the error rate held; exit 1 only if
    # the p99 expectation (a timing on a shared machine) missed
    judged = {e["text"]: e for e in report["expectations"]}
    assert judged["error_rate < 0.1%"]["held"], judged
    assert run.returncode == (0 if all(e["held"] for e in judged.values()) else 1), run.stderr
    _assert_nothing_left(made, Path("/usr/sbin/varnishd"))


UNRULY = f"""
name: cluster-unruly
seed: 5
target:
  root: {REPO}
  build: [make, -s, -C, targets/unruly]
  command: [targets/unruly/unruly-server, --port, "{{port}}", --host, "{{addr}}", --ignore-sigterm]
  ready: {{tcp: "{{port}}", timeout: 10s}}
  stop_grace: 5m
fleet: {{hosts: 2, placement: spread}}
load:
  - {{hold: {{rate: 50, for: 60s}}}}
"""


@pytest.mark.slow
def test_a_second_ctrl_c_kills_the_hosts_on_every_machine_at_once(tmp_path: Path, machines) -> None:
    """Hosts that ignore SIGTERM with a 5-minute stop grace: the first Ctrl-C starts the graceful stop on
    both machines, the second makes each machine SIGKILL its hosts at once (long before the grace ends)."""
    made, address = machines
    scenario = tmp_path / "unruly.yaml"
    scenario.write_text(UNRULY, encoding="utf-8")
    results = tmp_path / "results"
    run = subprocess.Popen([*HARNESS, "run", str(scenario), "--out", str(results), "--quiet", "--cluster", address],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        run_dir = wait_for_run(results, samples=2)
        run.send_signal(signal.SIGINT)
        assert run.stderr is not None
        said = []
        for line in run.stderr:      # the first one was handled (two at once could be one signal)
            said.append(line)
            if "SIGINT received" in line:
                break
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=150)     # a grace of 5 minutes would not end before this
        err = "".join(said) + err
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 128 + signal.SIGINT, err
    assert "again: killing the hosts now" in err
    stops = query(run_dir, "SELECT host, detail FROM events WHERE kind='stop'")
    assert {r["host"] for r in stops} == {0, 1}
    assert all("SIGKILL" in json.loads(r["detail"])["how"] for r in stops)
    _assert_nothing_left(made, REPO / "targets" / "unruly" / "unruly-server")


@pytest.mark.slow
# Serial: the heaviest run of the suite (Varnish and nginx, two of each, a scheduler, two workers, their agents and
# proxies); beside three busy test workers it once ended in a traceback not seen since (its stderr is now said).
@pytest.mark.serial
def test_network_faults_between_groups_act_on_links_that_cross_machines(tmp_path: Path, machines) -> None:
    """scenarios/varnish-backends.yaml, unchanged: each Varnish host's backends are both nginx hosts, one on
    its own machine and one on the other; every link into an nginx host goes through the fault proxy on that
    host's machine, which slows it, then refuses it, on the one timeline."""
    made, address = machines
    run = _run(REPO / "scenarios" / "varnish-backends.yaml", tmp_path / "results", address, "--json")
    assert "Traceback" not in run.stderr, run.stderr[-6000:]
    report = json.loads(run.stdout)
    run_dir = Path(report["run_dir"])
    (trial,) = report["trials"]
    assert trial["status"] == "complete", run.stderr
    placed = _placed(run_dir)
    machine_of = {h: n for n, m in placed.items() for h in m["hosts"]}
    names = {"varnish-0": 0, "varnish-1": 1, "nginx-0": 2, "nginx-1": 3}
    assert machine_of[names["nginx-0"]] != machine_of[names["nginx-1"]]       # spread over both machines
    # each link's proxy ran on its nginx host's machine, and carried traffic
    links = trial["detail"]["network"]["links"]
    assert set(links) == {"varnish->nginx-0", "varnish->nginx-1"}
    for name, link in links.items():
        assert link["machine"] == machine_of[names[name.split("->")[1]]]
        assert link["connections"] > 0 and link["bytes"]["downstream"] > 0
        # its clients: the Varnish hosts, one on each machine (from that machine's address), and nobody else
        assert set(link["peers"]) == set(made.addresses), link["peers"]
    # each Varnish host names both nginx hosts at their machine's address and their link's proxy port
    for varnish in ("varnish-0", "varnish-1"):
        number = machine_of[names[varnish]]
        vcl = (run_dir / "machines" / f"m{number}" / "hosts" / "t1" / varnish / "default.vcl").read_text()
        backends = dict((name, (host, int(port))) for name, host, port in
                        re.findall(r'backend (nginx_\d) \{ \.host = "([\d.]+)"; \.port = "(\d+)";', vcl))
        for nginx in ("nginx-0", "nginx-1"):
            assert backends[nginx.replace("-", "_")] == (made.addresses[machine_of[names[nginx]] - 1],
                                                         links[f"varnish->{nginx}"]["port"])
    # one window per fault over both machines' links, with both machines' counts summed
    latency, partition = trial["network_faults"]
    assert latency["hosts"] == partition["hosts"] == ["nginx-0", "nginx-1"]
    assert len(latency["windows"]) == len(partition["windows"]) == 1
    disarms = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='fault-disarm'")]
    assert sorted(d["machine"] for d in disarms if d["fault"] == 0) == [1, 2]
    summed = sum(d["counts"].get("bytes_delayed", 0) for d in disarms if d["fault"] == 0)
    assert latency["windows"][0]["counts"]["bytes_delayed"] == summed > 0
    assert partition["counts"].get("connections_refused", 0) + partition["counts"].get("connections_stalled", 0) > 0
    # Varnish could not fetch from the cut-off backends: 503s, counted as http_5xx; the driver sent nothing
    # to the nginx group (all of its traffic came through Varnish, across the machines)
    assert trial["replies"]["bad_kinds"]["http_5xx"] == trial["replies"]["status"]["503"] > 0
    assert trial["groups"]["nginx"]["sent"] == 0 and trial["groups"]["varnish"]["sent"] > 0
    _assert_nothing_left(made, Path("/usr/sbin/varnishd"), Path("/usr/sbin/nginx"))


NETNS = f"""
name: cluster-netns
seed: 5
{echo_target("7000", "7000")}  isolation: [pid, netns]
fleet: {{hosts: 4, balancer: round-robin, placement: spread}}
client: {{timeout: 1s}}
load: [{{hold: {{rate: 200, for: 8s}}}}]
faults:
  - {{kind: latency, latency: 50ms, from: 2s, until: 5s}}
  - {{kind: reset, at: 6s}}
"""


@pytest.mark.slow
def test_hosts_in_namespaces_of_their_own_on_each_machine_share_a_port_behind_its_proxy(tmp_path: Path,
                                                                                       machines) -> None:
    """isolation: netns on the machines: each host in a namespace of its own there, all four on port 7000,
    reached through the fault proxy on their machine; a latency window and a reset act on all of them."""
    made, address = machines
    scenario = tmp_path / "netns.yaml"
    scenario.write_text(NETNS, encoding="utf-8")
    run = _run(scenario, tmp_path / "results", address, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    run_dir = Path(report["run_dir"])
    placed = _placed(run_dir)
    assert sorted(len(m["hosts"]) for m in placed.values()) == [2, 2]
    starts = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='start'")]
    assert len(starts) == 4 and all("7000" in s["argv"] for s in starts)
    isolation = [s["isolation"] for s in starts]
    assert len({i["addr"] for i in isolation}) == 4 and all(i["addr"].startswith("10.213.") for i in isolation)
    # every reply of seconds 3 and 4 (inside the window, on every host) took at least 50 ms; none before it
    hists = {r["t"]: r["hist"] for r in query(run_dir, "SELECT t, hist FROM samples")}
    from hdrh.histogram import HdrHistogram

    def p50_ms(t: int) -> float:
        return HdrHistogram.decode(hists[t]).get_value_at_percentile(50) / 1e3
    assert p50_ms(3) >= 50 and p50_ms(4) >= 50 and p50_ms(0) < 50 and p50_ms(1) < 50
    (latency, reset) = report["trials"][0]["network_faults"]
    assert latency["hosts"] == reset["hosts"] == ["h0", "h1", "h2", "h3"]
    resets = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='fault-disarm'")
              if json.loads(r["detail"])["fault"] == 1]
    assert sorted(d["machine"] for d in resets) == [1, 2] and all(d["counts"]["connections_reset"] >= 1
                                                                  for d in resets)
    assert reset["counts"]["connections_reset"] == sum(d["counts"]["connections_reset"] for d in resets)
    assert report["trials"][0]["overall"]["ok"] > 0
    # the hosts' namespaces are gone with the trial
    assert not {i["netns"] for i in isolation} & set(os.listdir("/run/netns"))
    _assert_nothing_left(made, ECHO_SERVER)


@pytest.mark.slow
def test_a_machine_lost_in_a_network_faults_window_ends_its_part_and_its_counts_are_said_unknown(
        tmp_path: Path, machines) -> None:
    made, address = machines
    scenario = tmp_path / "lost.yaml"
    scenario.write_text(NETNS.replace('"7000"', '"{port}"').replace("tcp: 7000", 'tcp: "{port}"')
                        .replace("isolation: [pid, netns]", "isolation: [pid]")
                        .replace("{kind: reset, at: 6s}", "{kind: machine-loss, at: 3.5s, machine: 2}")
                        .replace("from: 2s, until: 5s", "from: 2s, until: 6s"), encoding="utf-8")
    run = _run(scenario, tmp_path / "results", address, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    (trial,) = report["trials"]
    (latency,) = trial["network_faults"]
    (window,) = latency["windows"]
    assert 2 <= window["from"] < 2.5 and 6 <= window["to"] < 6.5      # machine 1's disarm, not the trial's end
    assert [u["machine"] for u in latency["unknown"]] == [2] and latency["unknown"][0]["known_until"] is None
    assert latency["counts"]["bytes_delayed"] > 0                    # machine 1's: at least that
    text = subprocess.run([*HARNESS, "report", report["run_dir"]], capture_output=True, text=True, cwd=REPO,
                          timeout=120).stdout
    line = next(line for line in text.splitlines() if line.startswith("network fault 0"))
    assert ": at least bytes delayed" in line and line.endswith("m2 lost at 3.5s: its counts unknown"), line
    _assert_nothing_left(made, ECHO_SERVER)


TAKEOVER = f"""
name: cluster-takeover
seed: 5
{echo_target()}fleet: {{hosts: 4, balancer: round-robin, placement: spread}}
client: {{timeout: 1s}}
load: [{{hold: {{rate: 400, for: 10s}}}}]
faults:
  - FAULT
  - {{kind: machine-loss, at: LOSS, machine: 2}}
"""


def _by_second(run_dir: Path) -> dict[int, dict[int, dict]]:
    rows = query(run_dir, "SELECT t, host, sent, ok, errors FROM host_samples")
    out: dict[int, dict[int, dict]] = {}
    for row in rows:
        out.setdefault(row["t"], {})[row["host"]] = row
    return out


@pytest.mark.slow
def test_the_standby_takes_over_with_what_the_shards_knew_of_paused_and_ejected_hosts(tmp_path: Path,
                                                                                       machines) -> None:
    """The standby holds no connection while idle and is told the hosts when it takes over: a host paused at
    that moment still gets its share once it is back; a host the other shards ejected (stalled) is probed
    before anything is sent to it, never sent requests that time out."""
    made, address = machines
    # machine 2 (h1, h3) lost while h0 is paused: after the pause h0 and h2 share the load evenly
    scenario = tmp_path / "pause.yaml"
    scenario.write_text(TAKEOVER.replace("FAULT", "{kind: host-loss, at: 2s, hosts: 3, how: pause, for: 3s}")
                        .replace("LOSS", "3.5s"), encoding="utf-8")
    run = _run(scenario, tmp_path / "paused", address)
    assert run.returncode == 0, run.stderr
    (run_dir,) = [p for p in (tmp_path / "paused").iterdir() if (p / "run.db").exists()]
    paused = {h for d in (json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events "
                                                                   "WHERE kind='host-loss'")) for h in d["hosts"]}
    assert 0 in paused or 2 in paused, paused        # a host of the surviving machine was paused then
    seconds = _by_second(run_dir)
    for t in (6, 7, 8):
        total = seconds[t][0]["sent"] + seconds[t][2]["sent"]
        assert total > 0 and min(seconds[t][0]["sent"], seconds[t][2]["sent"]) >= 0.35 * total, seconds[t]
    # half the hosts stalled (ejected by the shards) when machine 2 is lost: the standby probes them first
    scenario = tmp_path / "stall.yaml"
    scenario.write_text(TAKEOVER.replace("FAULT", "{kind: stall, hosts: 50%, from: 1s, until: 9.5s}")
                        .replace("LOSS", "4s"), encoding="utf-8")
    run = _run(scenario, tmp_path / "stalled", address, "--json")
    assert run.returncode in (0, 1), run.stderr
    run_dir = Path(json.loads(run.stdout)["run_dir"])
    stalled = {h for d in (json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events "
                                                                    "WHERE kind='fault-arm'")) for h in d["hosts"]}
    seconds = _by_second(run_dir)
    assert stalled & {0, 2}                          # a host of the surviving machine was stalled
    # ejected by about 2 s (1 s timeouts); from the takeover at 4 s on, nothing sent to them, nothing timed out
    assert all(seconds[t][h]["sent"] == 0 and seconds[t][h]["errors"] == 0
               for t in range(4, 9) for h in (0, 2) if h in stalled), seconds
    timeouts = query(run_dir, "SELECT sum(timeout) FROM samples WHERE t BETWEEN 4 AND 8")[0][0]
    assert timeouts == 0                              # nothing sent to a host that would not answer
    _assert_nothing_left(made, ECHO_SERVER)
