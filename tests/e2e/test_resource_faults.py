"""Resource faults through per-host cgroups (memory, CPU quota, pids) and the OOM kills they cause, on real
targets and the real kernel: an OOM kill is a crash of class oom-kill with the cgroup's count as evidence; a
SIGKILL of the harness's own is never one. Plus the detection of what a machine lacks, from synthetic
/proc texts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HARNESS, REPO, query, write_scenario
from harness.run.isolation import HarnessCgroups, scenario_problem, support
from harness.run.isolation import cgroups as cgroups_module
from harness.run.isolation.cgroups import detect
from harness.run.faults.resources import oom_verdict
from harness.scenario.loader import load_scenario_text

ROOT = os.geteuid() == 0
needs_cgroups = pytest.mark.skipif(not (ROOT and support().for_controller("memory")),
                                   reason="needs root and a cgroup memory controller")
ESTATS = REPO / "targets" / "estats" / "estats-server"


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def only_run(results: Path) -> Path:
    runs = [p for p in results.iterdir() if (p / "run.db").exists()]
    assert len(runs) == 1
    return runs[0]


@needs_cgroups
@pytest.mark.slow
# Serial: which phase an OOM kill lands in is timing; beside 3 busy workers one fell outside the spike.
@pytest.mark.serial
def test_memory_limit_below_the_working_set_is_an_oom_kill_and_a_harness_kill_is_not(targets: Path,
                                                                                     tmp_path: Path) -> None:
    # estats holds 1 MiB per request in flight for 100 ms: ~3 MiB at 30/s fits the 12 MiB limit, ~40 MiB at
    # 400/s does not. Host-loss SIGKILLs a host (the harness's own kill) during the quiet phase.
    path = write_scenario(tmp_path, f"""
name: oom
seed: 3
target:
  command: [{ESTATS}, --port, "{{port}}", --estats, "off", --service-ms, "100", --scratch-kb, "1024"]
  restart: {{backoff: 200ms}}
fleet: {{hosts: 2}}
client: {{timeout: 1s}}
load:
  - {{hold: {{rate: 30, for: 3s, name: quiet}}}}
  - {{hold: {{rate: 400, for: 3s, name: spike}}}}
faults:
  - {{kind: memory, limit: 12MiB}}
  - {{kind: host-loss, at: 1s, hosts: 1, how: kill, down_for: 500ms}}
""")
    result = run(["run", str(path), "--out", str(tmp_path / "results"), "--json", "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    run_dir = only_run(tmp_path / "results")
    trial = report["trials"][0]
    crashes = query(run_dir, "SELECT c.pid, c.signal, c.detail, x.crash_class, x.data FROM crashes c "
                             "JOIN triage x ON x.uid = c.uid")
    assert crashes and len(crashes) == trial["crashes_total"]          # counted like any crash
    for crash in crashes:
        assert crash["crash_class"] == "oom-kill" and crash["signal"] == signal.SIGKILL
        evidence = json.loads(crash["detail"])["cgroup"]
        assert evidence["oom_kills"] >= 1 and evidence["memory_limit"] == 12 * 2**20
        assert evidence["source"].endswith(("memory.oom_control", "memory.events"))
        assert json.loads(crash["data"])["evidence"] == evidence
    assert [b["crash_class"] for b in trial["buckets"]] == ["oom-kill"]
    assert trial["phases"][0]["crashes"] == 0 and trial["phases"][1]["crashes"] == len(crashes)
    # The harness's own SIGKILL: an expected exit, never a crash, never classified.
    (loss,) = query(run_dir, "SELECT detail FROM events WHERE kind='host-loss'")
    victim = json.loads(loss["detail"])["hosts"][0]
    killed = [json.loads(r["detail"]) | {"pid": r["pid"]} for r in query(
        run_dir, "SELECT pid, detail FROM events WHERE kind='exit' AND host=?", (victim,))]
    first = killed[0]
    assert first["cause"].startswith("host-loss") and first["signal"] == signal.SIGKILL
    assert first["pid"] not in {c["pid"] for c in crashes}
    # Limits were armed before the hosts started; accounting from the cgroup is in every host sample.
    arm = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='fault-arm'")]
    assert arm and arm[0]["family"] == "resource" and arm[0]["fault_kind"] == "memory"
    assert all(a["limit"] == 12 * 2**20 for a in arm[0]["applied"].values())
    samples = [json.loads(r["cgroup"]) for r in query(run_dir, "SELECT cgroup FROM host_samples WHERE "
                                                                 "cgroup IS NOT NULL")]
    assert samples and all("memory" in s and "cpu_seconds" in s for s in samples)
    assert max(s["memory_peak"] for s in samples) >= 11 * 2**20      # it did reach the limit
    # Every cgroup the run made is gone.
    starts = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='start'")]
    paths = {p for s in starts for p in s["isolation"]["cgroup"].values()}
    assert paths and not any(os.path.exists(p) for p in paths)
    assert not any(os.path.exists(os.path.dirname(p)) for p in paths)


@needs_cgroups
def test_oom_verdict_reads_the_cgroup_count_not_the_signal(tmp_path: Path) -> None:
    """Two SIGKILLed processes in one real cgroup under a memory limit: the one the kernel's OOM killer took
    is an OOM kill, the one we killed ourselves is not (the count did not move)."""
    cgroups = HarnessCgroups(f"test-{os.getpid()}")
    try:
        cgroup = cgroups.create("oom")
        assert cgroup.set_memory(16 * 2**20)["limit"] == 16 * 2**20

        class Incarnation:
            def __init__(self) -> None:
                self.cgroup = cgroup
                self.oom_before = cgroup.oom_kills()

        class Host:
            def __init__(self) -> None:
                self.child = type("Child", (), {"incarnation": Incarnation()})()

        def start(code: str) -> subprocess.Popen[bytes]:
            files = [p.encode() for p in cgroup.procs_files()]

            def join() -> None:
                for f in files:
                    fd = os.open(f, os.O_WRONLY)
                    os.write(fd, b"0")
                    os.close(fd)
            return subprocess.Popen([sys.executable, "-c", code], preexec_fn=join)

        ours = Host()
        sleeper = start("import time; time.sleep(60)")
        sleeper.kill()
        assert sleeper.wait(timeout=30) == -signal.SIGKILL
        assert oom_verdict(ours, signal.SIGKILL) is None

        oomed = Host()
        hog = start("b = bytearray(64 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1")
        assert hog.wait(timeout=60) == -signal.SIGKILL
        evidence = oom_verdict(oomed, signal.SIGKILL)
        assert evidence is not None and evidence["oom_kills"] >= 1 and evidence["memory_limit"] == 16 * 2**20
        assert oom_verdict(oomed, signal.SIGSEGV) is None    # only a SIGKILL can be the OOM killer's
    finally:
        assert cgroups.close() == []


@needs_cgroups
def test_cpu_quota_throttles_and_pids_limit_refuses_forks(targets: Path, tmp_path: Path) -> None:
    # A busy loop forked by the host's shell shares its cgroup: a 20% quota throttles it, and only during
    # the window. The server then forks five children against a pids limit of 3 (with itself and the loop):
    # the kernel refuses it some forks (unruly says so and serves on).
    unruly = REPO / "targets" / "unruly" / "unruly-server"
    command = json.dumps(["sh", "-c", f"(while :; do :; done) & exec {unruly} --port {{port}} --fork-children 5"])
    path = write_scenario(tmp_path, f"""
name: cpu-pids
seed: 1
target:
  command: {command}
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 20, for: 6s}}}}]
faults:
  - {{kind: cpu, quota: 20%, from: 2s, until: 5s}}
  - {{kind: pids, limit: 3}}
""")
    result = run(["run", str(path), "--out", str(tmp_path / "results"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(tmp_path / "results")
    rows = {r["t"]: json.loads(r["cgroup"]) for r in query(run_dir, "SELECT t, cgroup FROM host_samples "
                                                                    "WHERE cgroup IS NOT NULL")}
    # Sample t is taken at the end of second t: rows 1 and 4 are the window's edges (2 s and 5 s).
    assert rows[0]["throttled"] == 0                                      # not before the window
    assert rows[4]["throttled"] > rows[1]["throttled"]                  # throttled in it
    # In the window it got at most its quota (a cap: a busy machine can only give it less).
    assert rows[4]["cpu_seconds"] - rows[1]["cpu_seconds"] <= 3 * 0.2 + 0.15
    assert rows[4]["pids_refused"] >= 1 and max(r["pids"] for r in rows.values()) <= 3
    kinds = [(r["kind"], json.loads(r["detail"])["fault_kind"]) for r in query(
        run_dir, "SELECT kind, detail FROM events WHERE kind LIKE 'fault-%' ORDER BY id")]
    assert kinds == [("fault-arm", "pids"), ("fault-arm", "cpu"), ("fault-disarm", "cpu")]


MOUNTINFO_V1_NO_MEMORY = """\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
"""
MOUNTINFO_V2 = "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


def test_detection_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = detect(MOUNTINFO_V1_NO_MEMORY, "4:pids:/\n1:cpu:/a/b\n")
    assert found.for_controller("pids") is not None and found.for_controller("memory") is None
    assert [str(h.base) for h in found.hierarchies] == ["/sys/fs/cgroup/cpu/a/b", "/sys/fs/cgroup/pids"]
    if ROOT:
        assert "memory is not available" in (found.missing(("memory",)) or "")
        assert found.missing(("cpu", "pids")) is None
    # A v2 hierarchy whose root delegates no controllers offers none (cgroup.kill still works there).
    v2 = detect(MOUNTINFO_V2.replace("/sys/fs/cgroup ", f"{tmp_path} "), "0::/\n")
    assert v2.unified is not None and not v2.unified.controllers
    # A scenario with a memory limit on such a machine: one line naming the fault and what is missing.
    scenario = load_scenario_text("""
name: s
target: {command: [x]}
fleet: {hosts: 1}
load: [{hold: {rate: 1, for: 1s}}]
faults: [{kind: memory, limit: 64MiB}]
""")
    monkeypatch.setattr(cgroups_module, "_detected", found)
    problem = scenario_problem(scenario)
    assert problem is not None and problem.startswith("faults[0] (memory limit): ")
    assert "\n" not in problem


def test_validate_names_the_missing_feature_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`harness validate` on a machine without the memory controller: exit 2, one line naming the file, the
    fault and what is missing; a scenario that asks for nothing the machine lacks still validates."""
    from harness.cli import main
    limited = write_scenario(tmp_path, f"""
name: limited
target: {{command: [{ESTATS}, --port, "{{port}}"]}}
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 1, for: 1s}}}}]
faults: [{{kind: cpu, quota: 50%}}, {{kind: memory, limit: 64MiB}}]
""", "limited.yaml")
    plain = write_scenario(tmp_path, f"""
name: plain
target: {{command: [{ESTATS}, --port, "{{port}}"]}}
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 1, for: 1s}}}}]
""", "plain.yaml")
    monkeypatch.setattr(cgroups_module, "_detected", detect(MOUNTINFO_V1_NO_MEMORY, "4:pids:/\n1:cpu:/\n"))
    assert main(["validate", str(limited), str(plain)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    expected = "faults[1] (memory limit): " if ROOT else "faults[0] (cpu limit): per-host cgroups need root"
    assert len(lines) == 1 and lines[0].startswith(f"{limited}: {expected}")
    assert "plain.yaml: ok" in out


def test_resource_timeline_splits_between_start_and_run_without_losing_an_action(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What `initial` sets before the hosts start and what `run` does on the timeline add up to the whole
    timeline, for a fresh trial and for one resumed exactly on an action's second (6 s: a pids window opens)."""
    from types import SimpleNamespace

    import trio
    import trio.testing

    from harness.run.faults.resources import ResourceFaults
    scenario = load_scenario_text("""
name: s
target: {command: [x]}
fleet: {hosts: 2}
load: [{hold: {rate: 1, for: 20s}}]
faults:
  - {kind: memory, limit: 64MiB}
  - {kind: cpu, quota: 50%, from: 5s, until: 10s}
  - {kind: pids, limit: 8, every: 6s, for: 2s}
""")
    hosts = [SimpleNamespace(name=f"h{i}", jail=None) for i in range(2)]   # no cgroups: each act says so
    everything = [(t, action, f.index) for t, action, f in ResourceFaults(scenario, hosts).timeline()]

    class Recorder:
        def __init__(self) -> None:
            self.events: list[tuple[float, str, int]] = []
            self.t0 = 0.0

        def event(self, kind: str, host: object, pid: object, **detail: object) -> None:
            self.events.append((round(trio.current_time() - self.t0, 6), kind.removeprefix("fault-"),
                                detail["fault"]))  # type: ignore[arg-type]

    async def inline(fn: object, *args: object) -> object:   # a worker thread would make the mock clock jump
        return fn(*args)  # type: ignore[operator]
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    for start_at in (0.0, 6.0):
        limits = ResourceFaults(scenario, hosts)
        initial = limits.initial(start_at)
        recorder = Recorder()

        async def main() -> None:
            recorder.t0 = trio.current_time()
            with trio.move_on_after(30):
                await limits.run(recorder.t0, recorder, start_at)
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        later = recorder.events
        if start_at == 0:
            assert [(0.0, "disarm" if d.get("disarm") else "arm", d["fault"]) for d in initial] == \
                [a for a in everything if a[0] <= 0]
            assert later == [a for a in everything if a[0] > 0]
        else:
            assert later == [a for a in everything if a[0] >= start_at]
            assert (6.0, "arm", 2) in later
            assert {d["fault"] for d in initial} == {0, 1} and all(d["resumed"] for d in initial)
        assert all("no cgroup" in str(r) for d in initial for r in d.get("applied", {}).values())
