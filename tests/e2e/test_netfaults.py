"""Network faults through the fault proxy, end to end against real echo servers on loopback, plus the proxy
on real sockets and its pure parts (shaping, topology) without them.

Nothing here depends on a timing margin: a fault's effect is asserted where it must show (a 50 ms latency
adds at least 50 ms to every reply through it), or by what was counted, and per window."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
from pathlib import Path

import pytest
import trio
from hdrh.histogram import HdrHistogram

from conftest import HARNESS, REPO, pid_alive, query, start_harness, wait_for, wait_for_run, write_scenario
from harness.base.errors import ScenarioError
from harness.scenario.loader import load_scenario_text
from harness.run.faults.network.proxy import FaultProxy
from harness.run.faults.network.toxics import Counts, Shaper
from harness.run.faults.network.topology import (
    DRIVER, Backend, LinkSpec, backends, expand_args, expand_lines, fault_links, proxied_links,
)
from harness.scenario.model import HostSelection, NetFault, Window

ECHO = REPO / "targets" / "echo" / "echo-server"


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def only_run(results: Path) -> Path:
    runs = [p for p in results.iterdir() if (p / "run.db").exists()]
    assert len(runs) == 1
    return runs[0]


def merged(rows: list) -> HdrHistogram:
    total = HdrHistogram(1, 3_600_000_000, 3)
    for row in rows:
        if row["hist"]:
            total.add(HdrHistogram.decode(row["hist"]))
    return total


# --------------------------------------------------------------------------- end to end


def test_latency_on_one_host_raises_its_share_during_the_window_only(targets: Path, tmp_path: Path) -> None:
    path = write_scenario(tmp_path, f"""
name: latency
seed: 3
target: {{command: [{ECHO}, --port, "{{port}}"]}}
fleet: {{hosts: 2, balancer: round-robin}}
client: {{timeout: 1s}}
load: [{{hold: {{rate: 200, for: 9s}}}}]
faults:
  - {{kind: latency, latency: 50ms, hosts: 1, from: 3s, until: 6s}}
""")
    result = run(["run", str(path), "--out", str(tmp_path / "results"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path / "results")
    (arm,) = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='fault-arm'")]
    (slow,) = arm["chosen"]
    assert arm["family"] == "network" and arm["links"] == [f"driver->h{slow}"]

    def window(first: int, last: int) -> tuple[HdrHistogram, int]:
        rows = query(run_dir, "SELECT hist FROM samples WHERE t BETWEEN ? AND ?", (first, last))
        ok = sum(r["ok"] for r in query(run_dir, "SELECT ok FROM host_samples WHERE host=? AND t BETWEEN ? AND ?",
                                        (slow, first, last)))
        return merged(rows), ok

    # Inside the window (second 4: the seconds at its edges also hold replies sent just before it opened or
    # just after it closed) every reply of the slow host's share is delayed >= 50 ms, so the slowest `share`
    # replies of that second are its share and the others the other host's. Compared within the same second
    # (the same machine, the same moment), the share's median is >= 50 ms above the other host's.
    during, share = window(4, 4)
    total = during.get_total_count()
    assert share > 30 and total > share
    share_p50 = during.get_value_at_percentile(100.0 * (total - share / 2) / total) / 1e6
    other_p50 = during.get_value_at_percentile(100.0 * ((total - share) / 2) / total) / 1e6
    assert share_p50 >= other_p50 + 0.050
    assert _count_at_least(during, 50_000) >= share
    # Only during the window: before and after it, the fleet's median is nowhere near 50 ms.
    before, _ = window(0, 2)
    after, _ = window(7, 8)     # second 6 still holds replies sent before the window closed
    assert before.get_value_at_percentile(50) < 50_000 and after.get_value_at_percentile(50) < 50_000
    (disarm,) = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='fault-disarm'")]
    assert disarm["counts"]["bytes_delayed"] > 0 and disarm["counts"]["chunks"] >= share // 4


def _count_at_least(histogram: HdrHistogram, value_us: int) -> int:
    return sum(item.count_at_value_iterated_to for item in histogram.get_recorded_iterator()
               if item.value_iterated_to >= value_us)


def test_partition_blackhole_and_reset_on_one_host(targets: Path, tmp_path: Path) -> None:
    # Host a-0 is cut off (refused), then black-holed, then reset while slowed down (so requests are in
    # flight on its connections at that moment); b-0 is never touched.
    path = write_scenario(tmp_path, f"""
name: partitions
seed: 3
target: {{command: [{ECHO}, --port, "{{port}}"]}}
fleet:
  balancer: round-robin
  groups: [{{name: a, hosts: 1}}, {{name: b, hosts: 1}}]
client: {{timeout: 500ms, probe_interval: 250ms}}
load: [{{hold: {{rate: 200, for: 13s}}}}]
faults:
  - {{kind: partition, how: refuse, groups: a, from: 2s, until: 4s}}
  - {{kind: partition, how: blackhole, groups: a, from: 6s, until: 8s}}
  - {{kind: latency, latency: 200ms, groups: a, from: 9.5s, until: 11s}}
  - {{kind: reset, groups: a, at: 10s}}
""")
    result = run(["run", str(path), "--out", str(tmp_path / "results"), "--json", "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path / "results")
    host = {r["t"]: r for r in query(run_dir, "SELECT * FROM host_samples WHERE host=0")}
    other = {r["t"]: r for r in query(run_dir, "SELECT * FROM host_samples WHERE host=1")}
    samples = {r["t"]: r for r in query(run_dir, "SELECT * FROM samples")}
    counts = {json.loads(r["detail"])["fault"]: json.loads(r["detail"]).get("counts", {})
              for r in query(run_dir, "SELECT detail FROM events WHERE kind='fault-disarm'")}
    # refuse: a-0 is ejected (its in-flight requests time out on the stalled connections, then every
    # re-probe is refused) and its share moves to b-0; after the window it is back.
    assert host[3]["state"] == "ejected" and host[3]["sent"] == 0
    assert other[3]["sent"] >= 0.9 * samples[3]["sent"]
    assert counts[0]["connections_refused"] >= 1 and counts[0]["connections_stalled"] >= 1
    assert host[5]["state"] == "up" and host[5]["sent"] > 0
    # blackhole: the requests it was sent time out, and are counted as such.
    assert sum(samples[t]["timeout"] for t in (6, 7)) >= 1 and host[7]["state"] == "ejected"
    assert counts[1]["connections_blackholed"] >= 1
    assert host[8]["state"] == "up" and host[8]["sent"] > 0     # (a sample's state is its second's end)
    # reset: the requests in flight on its connections end as conn_error (RST), not as timeouts.
    assert counts[3]["connections_reset"] >= 1
    assert sum(samples[t]["conn_error"] for t in (9, 10)) >= 1
    assert host[12]["sent"] > 0
    # b-0 never lost a request.
    assert all(r["errors"] == 0 for r in other.values())
    report = json.loads(result.stdout)
    faults = report["trials"][0]["detail"]["network"]["faults"]
    assert faults["3"]["connections_reset"] == counts[3]["connections_reset"]


# --------------------------------------------------------------------------- the proxy on real sockets


async def _echo_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


def _fault(kind: str, **changes: object) -> NetFault:
    base = dict(index=0, kind=kind, window=Window(), hosts=HostSelection(), direction="both")
    base.update(changes)
    return NetFault(**base)  # type: ignore[arg-type]


def test_proxy_stall_holds_then_delivers_and_bandwidth_paces() -> None:
    stall = _fault("stall")
    bandwidth = _fault("bandwidth", index=1, rate=200_000, direction="downstream")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_echo_server)
            spec = LinkSpec(DRIVER, 0)
            proxy = FaultProxy([(spec, "driver->h0", ("127.0.0.1", port))], {0: [spec], 1: [spec]},
                               [stall, bandwidth], seed=1)
            await nursery.start(proxy.serve)
            client = await trio.open_tcp_stream("127.0.0.1", proxy.links[spec].port)
            await client.send_all(b"ping")
            assert await client.receive_some(100) == b"ping"          # nothing armed: straight through
            proxy.act("arm", stall)
            await client.send_all(b"held")
            with trio.move_on_after(0.3) as waited:
                await client.receive_some(100)
            assert waited.cancelled_caught                             # nothing gets through a stall
            proxy.act("disarm", stall)
            assert await client.receive_some(100) == b"held"          # ... and it was kept, not lost
            assert proxy.counts(0)["bytes_held"] >= 4 and proxy.counts(0)["connections_stalled"] == 1
            # 100 KB back at 200 KB/s: the proxy cannot deliver it in less than half a second.
            proxy.act("arm", bandwidth)
            payload = bytes(100_000)
            start = trio.current_time()
            await client.send_all(payload)
            got = 0
            while got < len(payload):
                got += len(await client.receive_some(65536))
            assert trio.current_time() - start >= 0.5 * 0.95
            assert proxy.counts(1)["bytes_delayed"] == len(payload)
            await client.aclose()
            proxy.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_proxy_reset_closes_both_sides_with_rst() -> None:
    reset = _fault("reset", instant=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_echo_server)
            spec = LinkSpec(DRIVER, 0)
            proxy = FaultProxy([(spec, "l", ("127.0.0.1", port))], {0: [spec]}, [reset], seed=1)
            await nursery.start(proxy.serve)
            client = await trio.open_tcp_stream("127.0.0.1", proxy.links[spec].port)
            await client.send_all(b"x")
            assert await client.receive_some(10) == b"x"
            proxy.act("arm", reset)
            with pytest.raises(trio.BrokenResourceError) as caught:
                await client.receive_some(10)
            assert isinstance(caught.value.__cause__, ConnectionResetError)
            assert proxy.counts(0) == {"connections_reset": 1}
            proxy.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


# --------------------------------------------------------------------------- pure parts


def test_shaper_latency_keeps_order_and_jitter_is_seeded() -> None:
    fault = _fault("latency", latency=0.05, jitter=0.04)
    counts: dict[int, Counts] = {}

    def releases(seed: int) -> list[float]:
        shaper = Shaper(random.Random(seed))
        return [shaper.plan(i * 0.001, b"ab", [fault], counts)[0][0] for i in range(200)]
    first = releases(7)
    assert first == sorted(first)                                    # never overtakes the chunk before
    assert all(r >= i * 0.001 + 0.01 - 1e-9 for i, r in enumerate(first))
    assert first == releases(7) and first != releases(8)             # same seed, same jitter
    assert counts[0].chunks == 600 and counts[0].bytes_delayed == 1200


def test_shaper_slicer_and_bandwidth() -> None:
    slicer = _fault("slicer", size=10, variation=3, delay=0.002)
    bandwidth = _fault("bandwidth", index=1, rate=1000)
    counts: dict[int, Counts] = {}
    plan = Shaper(random.Random(1)).plan(0.0, bytes(range(100)), [slicer, bandwidth], counts)
    assert b"".join(segment for _, segment in plan) == bytes(range(100))
    assert all(7 <= len(segment) <= 13 for _, segment in plan[:-1])
    times = [t for t, _ in plan]
    assert times == sorted(times) and times[-1] >= 100 / 1000 + 0.002 * (len(plan) - 1) - 1e-9
    assert counts[0].segments == len(plan) and counts[1].bytes_delayed == 100


GROUPED = """
name: g
seed: 5
target: {protocol: http, command: [x, "{port}"]}
fleet:
  groups:
    - {name: front, hosts: 2, command: [x, --backends, "{backends}", "--server={backend.addr}:{backend.port}"],
       backends: api}
    - {name: api, hosts: 3}
load: [{hold: {rate: 1, for: 10s}}]
faults:
  - {kind: latency, latency: 10ms, between: [front, api], from: 1s, until: 2s}
  - {kind: stall, groups: front, hosts: 1}
"""


def test_a_machines_proxy_carries_the_links_into_its_own_hosts_and_records_only_its_faults() -> None:
    """Over --cluster each machine's proxy carries the links into its hosts (listening on its address), and
    records a fault's arms only where the fault has links; a frontend on one machine reaches a backend on
    another at the proxy on the backend's machine."""
    from harness.run.faults.network import NetFaults
    scenario = load_scenario_text(GROUPED)
    (stalled,) = fault_links(scenario, scenario.net_faults[1])
    ports = [1000, 1001, 1002, 1003, 1004]
    front_host = stalled.host
    other_front = 1 - front_host

    async def machine() -> None:
        here = NetFaults(scenario, ports, hosts={other_front, 3})    # this machine: the unstalled front, api-1
        try:
            assert set(here.proxy.links) == {LinkSpec(DRIVER, other_front), LinkSpec("front", 3)}
            assert here.silent == {1}            # the stall's only link is on the other machine
            assert here.targets[0] == [3]
        finally:
            here.proxy.close()
        command = NetFaults(scenario, ports, hosts=())      # the command: no link, says only unlinked faults
        assert not command.proxy.links and command.silent == {0, 1}
    trio.run(machine)
    addrs = ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.1"]     # each host's machine
    wiring = backends(scenario, ports, {LinkSpec("front", 3): 9003}, addrs=addrs, proxy_addrs=addrs)
    assert [(b.addr, b.port) for b in wiring["front"]] == [("10.0.0.1", 1002), ("10.0.0.2", 9003),
                                                           ("10.0.0.1", 1004)]


def test_topology_proxies_only_what_a_fault_can_reach_and_renders_backends() -> None:
    scenario = load_scenario_text(GROUPED)
    front, api = scenario.fleet.groups
    assert front.rotation and not api.rotation     # a backend gets its load from its frontends
    links = proxied_links(scenario)
    # the between fault: every front host to every api host; the stall: the driver's links to front hosts
    assert set(links) == {LinkSpec("front", h) for h in (2, 3, 4)} | {LinkSpec(DRIVER, h) for h in (0, 1)}
    assert set(fault_links(scenario, scenario.net_faults[0])) == {LinkSpec("front", h) for h in (2, 3, 4)}
    (stalled,) = fault_links(scenario, scenario.net_faults[1])
    assert stalled.client == DRIVER and stalled.host in (0, 1)
    ports = [1000, 1001, 1002, 1003, 1004]
    via = {LinkSpec("front", 3): 9003}
    wiring = backends(scenario, ports, via)
    assert [(b.host, b.port, b.name) for b in wiring["front"]] == [("api-0", 1002, "api_0"), ("api-1", 9003, "api_1"),
                                                                   ("api-2", 1004, "api_2")]
    argv = expand_args(["x", "--backends", "{backends}", "--server={backend.addr}:{backend.port}"], wiring["front"])
    assert argv == ["x", "--backends", "127.0.0.1:1002,127.0.0.1:9003,127.0.0.1:1004",
                    "--server=127.0.0.1:1002", "--server=127.0.0.1:9003", "--server=127.0.0.1:1004"]
    vcl = 'vcl 4.1;\nbackend {backend.name} { .host = "{backend.addr}"; .port = "{backend.port}"; }\n' \
          'sub vcl_init {\n    rr.add_backend({backend.name});\n}\n'
    assert expand_lines(vcl, wiring["front"][:2]) == (
        'vcl 4.1;\nbackend api_0 { .host = "127.0.0.1"; .port = "1002"; }\n'
        'backend api_1 { .host = "127.0.0.1"; .port = "9003"; }\n'
        'sub vcl_init {\n    rr.add_backend(api_0);\n    rr.add_backend(api_1);\n}\n')
    assert isinstance(wiring["front"][0], Backend)


@pytest.mark.parametrize("fault,message", [
    ("{kind: latency, latency: 10ms, between: [front, nope]}", "no fleet group named 'nope'"),
    ("{kind: latency, latency: 10ms, between: [api, api]}", "name two different groups"),
    ("{kind: stall, between: [front, api], groups: front}", "either between two groups or on hosts"),
    ("{kind: reset, direction: upstream}", "a reset closes the connection both ways"),
    ("{kind: latency, latency: 10ms, jitter: 20ms}", "jitter (0.02s) larger than the latency"),
    ("{kind: latency}", "missing required field 'latency'"),
    ("{kind: partition, how: drop}", "expected one of"),
    ("{kind: bandwidth, rate: 0}", "at least 1 byte per second"),
    ("{kind: slicer, size: 8, variation: 8}", "must be smaller than the size"),
    ("{kind: reset, at: 2s, until: 3s}", "'until' makes a window"),
    ("{kind: latency, latency: 1ms, direction: sideways}", "expected one of"),
])
def test_bad_network_faults_are_one_line_each(fault: str, message: str) -> None:
    text = GROUPED.split("faults:")[0] + f"faults:\n  - {fault}\n"
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(text, "s.yaml")
    problems = [str(p) for p in caught.value.problems]
    assert any(message in p and p.startswith("s.yaml:") for p in problems), problems


def test_between_needs_traffic_and_backends_need_groups() -> None:
    text = GROUPED.replace("backends: api}", "}").split("faults:")[0] + \
        "faults: [{kind: stall, between: [front, api]}]\n"
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(text.replace('"{backends}", "--server={backend.addr}:{backend.port}"', '"-"'), "s.yaml")
    assert "no traffic flows between front and api" in str(caught.value)
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(GROUPED.replace("backends: api}", "}"), "s.yaml")
    assert "needs backends:" in str(caught.value)
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(GROUPED.replace("backends: api}", "backends: front}"), "s.yaml")
    assert "cannot be its own backend" in str(caught.value)


def test_fault_windows_of_every_family_for_the_report_and_the_cascade() -> None:
    from harness.analysis.faultreport import network_faults, resource_faults
    from harness.present.html import WINDOW_STYLE, fault_windows

    def event(t: float, kind: str, **detail: object) -> dict:
        return {"t": t, "kind": kind, "host": None, "detail": detail}
    events = [
        event(-0.5, "fault-arm", fault=0, fault_kind="memory", family="resource", limit="memory 64 MiB", hosts=[1]),
        event(2.0, "fault-arm", fault=1, fault_kind="latency", family="network", label="latency 50 ms downstream",
              hosts=[0], links=["driver->h0"]),
        event(4.0, "fault-disarm", fault=1, fault_kind="latency", family="network", label="latency 50 ms downstream",
              hosts=[0], counts={"bytes_delayed": 10, "chunks": 2}),
        event(5.0, "fault-arm", fault=2, fault_kind="reset", family="network", label="reset", hosts=[0]),
        event(5.0, "fault-disarm", fault=2, fault_kind="reset", family="network", label="reset", hosts=[0],
              counts={"connections_reset": 2}),
        event(6.0, "fault-arm", fault=3, fault_kind="alloc-fail", mode="random", slot=0),
    ]
    windows = fault_windows(events, end=9.0)
    assert [(w.kind, w.start, w.end, w.label) for w in windows] == [
        ("resource", -0.5, 9.0, "memory 64 MiB limit"),
        ("network-latency", 2.0, 4.0, "latency 50 ms downstream"),
        ("network-reset", 5.0, 5.0, "reset"),                      # a moment: drawn as a line
        ("shim", 6.0, 9.0, "alloc-fail random armed")]
    assert all(w.kind in WINDOW_STYLE for w in windows)
    names = {0: "h0", 1: "h1"}
    detail = {"network": {"faults": {"1": {"kind": "latency", "label": "x", "bytes_delayed": 10, "chunks": 2},
                                     "2": {"kind": "reset", "label": "reset", "connections_reset": 2}}}}
    (latency, reset) = network_faults(events, detail, 9.0, names)
    assert latency["windows"] == [{"from": 2.0, "to": 4.0, "counts": {"bytes_delayed": 10, "chunks": 2}}]
    assert latency["hosts"] == ["h0"] and latency["links"] == ["driver->h0"]
    assert reset["counts"] == {"connections_reset": 2} and reset["windows"][0]["from"] == reset["windows"][0]["to"]
    assert resource_faults(events, 9.0, names) == [{"fault": 0, "kind": "memory", "limit": "memory 64 MiB",
                                                    "hosts": ["h1"], "windows": [{"from": -0.5, "to": 9.0}]}]


def _netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except OSError:
        return set()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_hosts_in_network_namespaces_share_a_fixed_port_and_leave_nothing(targets: Path, tmp_path: Path) -> None:
    """Two echo hosts that both insist on port 7000, each in its own network namespace with a veth pair, reached
    through the proxy on their own addresses. The harness is then SIGKILLed: its watchdog removes the namespaces
    (and their veth pairs with them), the PID namespaces take the processes."""
    path = write_scenario(tmp_path, f"""
name: netns
target:
  command: [{ECHO}, --port, "7000", --host, "{{addr}}"]
  ready: {{tcp: 7000}}
  isolation: [pid, cgroup, netns]
fleet: {{hosts: 2}}
load: [{{hold: {{rate: 100, for: 60s}}}}]
""")
    proc = start_harness(["run", str(path), "--out", str(tmp_path / "results"), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(tmp_path / "results", samples=2)
        starts = [json.loads(r["detail"]) | {"pid": r["pid"]}
                  for r in query(run_dir, "SELECT pid, detail FROM events WHERE kind='start'")]
        isolation = [s["isolation"] for s in starts]
        assert len({i["addr"] for i in isolation}) == 2 and all(i["addr"].startswith("10.213.") for i in isolation)
        assert all("7000" in s["argv"] for s in starts)
        names = {i["netns"] for i in isolation}
        assert names <= _netns_names()
        assert all(row["ok"] > 0 for row in query(run_dir, "SELECT ok FROM samples"))
        veths = {i["veth"].split("/")[0] for i in isolation}
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    wait_for(lambda: not (names & _netns_names()), timeout=30)
    wait_for(lambda: not any(pid_alive(s["pid"]) for s in starts), timeout=30)
    # The kernel tears a namespace down a moment after its last reference goes, the veth pair with it.
    wait_for(lambda: not any(v in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
                             for v in veths), timeout=30)
