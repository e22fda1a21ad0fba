"""--cluster with a real fleet: the hosts on two worker "machines" (each worker in its own network namespace,
with the address the test gives it), the load, the store and the report on this one.

The echo fleet: 8 hosts spread over both machines; a host killed on one machine, then the other machine lost
(its agent gone at once, every host on it SIGKILLed): the driver's share moves to the survivors on the other
machine, every sample is in the one store, `harness report` reads it as any run's. The estats fleet: hosts
that crash under the fault shim's heap budget on both machines; each crash recorded with its machine, its core
kept and triaged on the machine that wrote it, the triage in the one store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns_machines as netns
from conftest import query
from dask_local import cluster, echo_target, namespaced_cluster

REPO = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness"]

ECHO = f"""
name: cluster-echo
seed: 7
{echo_target()}  restart: {{policy: always, backoff: 1s}}
fleet: {{hosts: 8, balancer: least-loaded, placement: spread}}
client: {{timeout: 500ms, connections: 2}}
load:
  - {{ramp: {{from: 300, to: 300, over: 1s}}}}
  - {{hold: {{for: 13s}}}}
faults:
  - {{kind: host-loss, at: 3s, hosts: 1, how: kill, down_for: 2s}}
  - {{kind: machine-loss, at: 8s, machine: MACHINE}}
"""


def _killed_host(scenario_file: Path) -> int:
    """Which host the seeded host-loss takes (every host is up at 3 s): the harness's own choice."""
    from harness.plan.streams import choose_hosts, loss_events
    from harness.scenario.loader import load_scenario
    scenario = load_scenario(scenario_file)
    event = loss_events(scenario.host_losses, scenario.duration)[0]
    return choose_hosts(scenario.seed, event, list(range(8)), 1)[0]


@pytest.fixture(scope="module")
def machines() -> Iterator[tuple[netns.Machines, str]]:
    with namespaced_cluster() as made_and_address:
        yield made_and_address


@pytest.mark.slow
def test_an_echo_fleet_over_two_machines_loses_a_host_then_a_machine(tmp_path: Path, machines) -> None:
    made, address = machines
    scenario = tmp_path / "echo.yaml"
    scenario.write_text(ECHO.replace("MACHINE", "1"), encoding="utf-8")
    killed = _killed_host(scenario)
    # spread: host h on machine h % 2 (machines in the order of the workers' addresses, 1-based in YAML)
    lost_machine = 1 - killed % 2
    scenario.write_text(ECHO.replace("MACHINE", str(lost_machine + 1)), encoding="utf-8")
    run = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "results"), "--quiet",
                          "--cluster", address], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    (run_dir,) = [p for p in (tmp_path / "results").iterdir() if (p / "run.db").exists()]
    detail = json.loads(query(run_dir, "SELECT detail FROM trials")[0][0])
    placed = {m["machine"] - 1: m for m in detail["machines"]}
    assert sorted(placed) == [0, 1]
    assert {placed[m]["addr"] for m in placed} == set(made.addresses)       # each "machine" ran hosts
    assert sorted(placed[0]["hosts"]) == [0, 2, 4, 6] and sorted(placed[1]["hosts"]) == [1, 3, 5, 7]
    assert placed[lost_machine]["lost"] == "machine-loss" and 8 <= placed[lost_machine]["lost_at"] < 10
    assert placed[1 - lost_machine]["lost"] is None
    survivors = placed[1 - lost_machine]["hosts"]
    assert killed in survivors

    events = query(run_dir, "SELECT t, kind, host, detail FROM events ORDER BY t")
    kinds = [kind for _, kind, _, _ in events]
    assert "placement" in kinds and "machine-loss" in kinds
    # the host kill happened on its machine: its exit (caused by the host-loss) and its restart there
    exits = [(t, json.loads(d)) for t, kind, host, d in events if kind == "exit" and host == killed]
    assert any(d.get("cause", "").startswith("host-loss") and 3 <= t < 5 for t, d in exits)
    assert len([1 for t, kind, host, _ in events if kind == "start" and host == killed]) >= 2
    loss = next(json.loads(d) for _, kind, _, d in events if kind == "machine-loss")
    assert loss["machine"] == lost_machine + 1 and sorted(loss["hosts"]) == sorted(placed[lost_machine]["hosts"])
    assert query(run_dir, "SELECT count(*) FROM crashes")[0][0] == 0      # a kill and a loss are no crashes

    # every second of the load sampled here, from the driver's own counters
    samples = query(run_dir, "SELECT t, offered, ok FROM samples ORDER BY t")
    assert [t for t, _, _ in samples][:14] == list(range(14))
    by_host = query(run_dir, "SELECT t, host, ok FROM host_samples")
    def ok_on(hosts: list[int], first: int, last: int) -> int:
        return sum(ok for t, host, ok in by_host if first <= t < last and host in hosts)
    lost_hosts = placed[lost_machine]["hosts"]
    # before: both machines served; after the loss: the survivors served it all, nearly everything offered
    assert ok_on(lost_hosts, 5, 8) > 0 and ok_on(survivors, 5, 8) > 0
    settled = int(placed[lost_machine]["lost_at"]) + 2        # the second after the one it was lost in
    assert ok_on(lost_hosts, settled, 14) == 0
    after = [(offered, ok) for t, offered, ok in samples if settled <= t < 14]
    assert sum(ok for _, ok in after) >= 0.97 * sum(offered for offered, _ in after)
    assert ok_on(survivors, settled, 14) == sum(ok for _, ok in after)

    # client.connections (2) per host in all, as from one driver: a connection from each machine's shard,
    # one from the standby once it took over (idle, it held none), and the readiness check's
    served = []
    for host in survivors:
        if host != killed:
            log = run_dir / "machines" / f"m{2 - lost_machine}" / "hosts" / "t1" / f"h{host}" / "stderr.log"
            served += [int(n) for n in re.findall(r"exiting \((\d+) connections served", log.read_text())]
    assert len(served) == 3 and min(served) == 4, served    # (a host ejected and probed again has more)

    report = subprocess.run([*HARNESS, "report", str(run_dir)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    assert "machines (--cluster):" in report.stdout
    share_line = next(line for line in report.stdout.splitlines() if "share of good replies by machine" in line)
    assert f"m{lost_machine + 1} 0.0%" in share_line.split("|")[-1]
    assert f"m{2 - lost_machine} 100.0%" in share_line.split("|")[-1]
    as_json = json.loads(subprocess.run([*HARNESS, "report", str(run_dir), "--json"], capture_output=True,
                                        text=True, cwd=REPO, timeout=120).stdout)
    assert as_json["trials"][0]["machines"]["machines"][lost_machine]["lost"] == "machine-loss"
    # nothing left behind on the machines: no agent of this run (its argv names the run) runs any more
    assert subprocess.run(["pgrep", "-f", f"harness.cluster.machine .* {run_dir.name}/"],
                          capture_output=True).returncode == 1


OOM = f"""
name: cluster-oom
seed: 3
target:
  root: {REPO}
  build: [make, -s, -C, targets/estats]
  command: [targets/estats/estats-server, --port, "{{port}}", --host, "{{addr}}", --estats, "off",
            --service-ms, "100", --scratch-kb, "1024"]
  restart: {{backoff: 200ms}}
fleet: {{hosts: 2, placement: spread}}
client: {{timeout: 1s}}
load:
  - {{hold: {{rate: 30, for: 3s, name: quiet}}}}
  - {{hold: {{rate: 400, for: 3s, name: spike}}}}
faults:
  - {{kind: memory, limit: 12MiB}}
  - {{kind: cpu, quota: 50%, from: 1s, until: 2s}}
"""


@pytest.mark.slow
def test_cgroup_limits_act_on_each_machine_and_an_oom_kill_there_is_a_crash_here(tmp_path: Path) -> None:
    """Resource faults over a cluster (two workers on loopback: `ip netns exec` hides the cgroup filesystem
    from a worker in a namespace): each machine limits its own hosts' cgroups on the one timeline; estats at
    400/s holds ~40 MiB under a 12 MiB limit, so the kernel OOM-kills hosts on both machines; each kill is a
    crash of class oom-kill in the one store, with its machine, and the report shows each fault once."""
    from harness.run.isolation import support
    if os.geteuid() != 0 or not support().for_controller("memory"):
        pytest.skip("needs root and a cgroup memory controller")
    pytest.importorskip("distributed")
    scenario = tmp_path / "oom.yaml"
    scenario.write_text(OOM, encoding="utf-8")
    with cluster("127.0.0.1", [([], "127.0.0.1"), ([], "127.0.0.1")]) as address:
        run = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "results"), "--json",
                              "--quiet", "--cluster", address], capture_output=True, text=True, cwd=REPO,
                             timeout=600)
    assert run.returncode == 0, run.stderr
    (run_dir,) = [p for p in (tmp_path / "results").iterdir() if (p / "run.db").exists()]
    crashes = query(run_dir, "SELECT c.host, c.signal, c.detail, x.crash_class FROM crashes c "
                             "JOIN triage x ON x.uid = c.uid")
    assert crashes and {c["crash_class"] for c in crashes} == {"oom-kill"}
    assert {c["signal"] for c in crashes} == {9}
    machines = {json.loads(c["detail"])["machine"]["machine"] for c in crashes}
    assert machines == {1, 2}                                   # the kernel killed on both machines
    assert all(json.loads(c["detail"])["cgroup"]["oom_kills"] >= 1 for c in crashes)
    arms = [json.loads(d) for (d,) in query(run_dir, "SELECT detail FROM events WHERE kind='fault-arm'")]
    assert sorted(tuple(a["hosts"]) for a in arms if a["fault"] == 0) == [(0,), (1,)]   # each machine its own
    report = json.loads(run.stdout)["trials"][0]
    assert [(f["fault"], f["hosts"], len(f["windows"])) for f in report["resource_faults"]] == \
        [(0, ["h0", "h1"], 1), (1, ["h0", "h1"], 1)]
    assert all(report["cgroups"][h]["oom_kills"] >= 1 for h in ("h0", "h1"))
    assert not any(w["fault_kind"] in ("memory", "cpu") for w in report["fault_windows"])
