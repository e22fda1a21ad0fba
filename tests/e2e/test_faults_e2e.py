"""End-to-end fault injection through the shim on real fleets: the NYE night and the TIME_WAIT crash."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import HARNESS, host_pids, pid_alive, query, write_scenario

NYE_MINI = """
name: nye-mini
seed: 99
target:
  root: @REPO@
  command: [targets/estats/estats-server, --port, "{port}", --estats, "on", --service-ms, "100",
            --scratch-kb, "16", --stats-kb, "4"]
  restart: {policy: always, backoff: 300ms}
  expect_reply: "^OK"
fleet: {hosts: 3, balancer: least-loaded}
load:
  - {hold: {rate: 150, for: 2s}}
  - {spike: {factor: 6, for: 4s, name: midnight}}
faults:
  - {kind: alloc-fail, mode: budget, budget: 400KiB}
variants:
  - {name: estats-on}
  - {name: estats-off, args: {--estats: "off"}}
expect:
  - {variant: estats-off, crashes: 0}
"""

TWQ_MINI = """
name: twq-mini
seed: 5
target:
  root: @REPO@
  command: [targets/twq/twq-server, --port, "{port}", --threads, "4", --tw-ms, "20"]
  restart: {policy: always, backoff: 300ms}
fleet: {hosts: 2, balancer: round-robin}
client: {keys: {space: 20}}
load:
  - {hold: {rate: 600, for: 8s}}
faults:
  - {kind: lock-error, function: pthread_mutex_lock, errno: EDEADLK, probability: 2%}
variants:
  - {name: lock-errors}
  - {name: control, faults: off}
"""


def run_json(scenario: Path, tmp_path: Path) -> tuple[int, dict]:
    # A relative results folder, as in the README's quick start (hosts run in their own folders).
    result = subprocess.run([*HARNESS, "run", str(scenario), "--out", "results", "--quiet", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.slow
def test_nye_budget_crashes_estats_on_and_not_off(targets: Path, tmp_path: Path) -> None:
    code, report = run_json(write_scenario(tmp_path, NYE_MINI), tmp_path)
    on, off = report["trials"]
    assert on["variant"] == "estats-on" and off["variant"] == "estats-off"
    # estats on: the unchecked stats block is dereferenced when the budget makes malloc fail.
    assert on["crashes"], "estats on must crash under the heap budget"
    triaged = [c for c in on["crashes"] if c["crash_class"]]
    assert triaged, "the cores were triaged"
    assert {c["crash_class"] for c in triaged} == {"null-deref"}
    crash = triaged[0]
    assert crash["signal_name"] == "SIGSEGV" and crash["core_dumped"]
    assert crash["crash_class"] == "null-deref"
    assert crash["signature"].startswith("estats_update < handle_request")
    assert int(crash["fault_address"], 16) == 0x40
    # The crash carries what the shim had armed and injected just before.
    shim = crash["detail"]["shim"]
    assert shim["armed"][0]["mode"] == "budget" and shim["armed"][0]["budget"] == 400 * 1024
    assert shim["injected"][0] > 0
    assert len({b["bucket"] for b in on["buckets"]}) == 1
    bucket = on["buckets"][0]
    # Every crash counted; full cores only for the first 3 of the bucket, then 1 in 10.
    assert bucket["count"] == len(on["crashes"])
    assert bucket["cores_kept"] == min(bucket["count"], 3) + max(0, (bucket["count"] - 3) // 10)
    # estats off under the same seed, load and faults: failures become ERR replies, never a crash.
    assert off["crashes"] == []
    assert off["overall"]["errors"]["bad_reply"] > 0, "the budget really bit (ERR nomem replies)"
    assert code == 0, "the expectation {variant: estats-off, crashes: 0} held"
    # One bucket's backtrace and the injection context, for a person.
    shown = subprocess.run([*HARNESS, "crashes", report["run_dir"], bucket["bucket"][:6]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "#0  estats_update" in shown.stdout and "#1  handle_request" in shown.stdout
    assert "mode': 'budget'" in shown.stdout and "fault address: 0x40" in shown.stdout
    junit = tmp_path / "junit.xml"
    again = subprocess.run([*HARNESS, "report", report["run_dir"], "--junit", str(junit)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    import xml.etree.ElementTree as ET
    suite = ET.parse(junit).getroot()
    names = [case.get("name") for case in suite.iter("testcase")]
    assert "crashes 0 [variant estats-off]" in names
    assert any(name.startswith(f"crash {bucket['bucket']} estats_update") for name in names)
    assert suite.get("failures") == "1"  # the bucket; the expectation held
    missing = subprocess.run([*HARNESS, "crashes", report["run_dir"], "ffffff"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no crash bucket 'ffffff'" in missing.stderr
    run_dir = Path(report["run_dir"])
    # One trial per variant, as scripts/demo.sh runs the full night: compare works and says what it can.
    compared = subprocess.run([*HARNESS, "compare", str(run_dir), "--json"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    rows = {r["metric"]: r for r in json.loads(compared.stdout)["rows"]}
    assert rows["crash_rate"]["variant"] == "estats-off" and rows["crash_rate"]["p_value"] is not None
    assert rows["crash_rate"]["verdict"] == "better", rows["crash_rate"]["text"]   # no crash against a cascade
    assert "n too small: 1 vs 1" in rows["p99_latency"]["text"]
    # What the budget window did on each host, and the faults armed at each crash.
    (window,) = on["fault_windows"]
    assert window["ended_by"] == "trial end" and window["injected"] > 0 and window["eligible"] > window["injected"]
    assert all(c["faults_armed"][0]["mode"] == "budget" for c in on["crashes"])
    checks = [json.loads(e["detail"]) for e in query(run_dir, "SELECT detail FROM events WHERE kind='shim-check'")]
    assert checks and all(check["loaded"] and check["attached"] for check in checks), \
        "the shim was seen in every host's memory map and attached its control file"
    assert not any(pid_alive(pid) for pid in host_pids(run_dir))


@pytest.mark.slow
def test_twq_crashes_only_with_lock_errors(targets: Path, tmp_path: Path) -> None:
    _, report = run_json(write_scenario(tmp_path, TWQ_MINI), tmp_path)
    faulty, control = report["trials"]
    assert faulty["variant"] == "lock-errors" and control["variant"] == "control"
    assert faulty["crashes"], "lock errors plus key reuse must corrupt the TIME_WAIT queue"
    signatures = {c["signature"] for c in faulty["crashes"] if c["signature"]}
    assert signatures and all("tw_remove" in s for s in signatures)
    assert {c["crash_class"] for c in faulty["crashes"]} == {"poison-address"}
    assert all(c["detail"]["shim"]["injected"][0] > 0 for c in faulty["crashes"])
    assert control["crashes"] == []
    assert control["overall"]["ok"] > 0.99 * control["overall"]["offered"]


@pytest.mark.slow
def test_static_target_is_refused_before_the_run(tmp_path: Path) -> None:
    """A statically linked executable ignores LD_PRELOAD: say so up front, never inject nothing silently."""
    source = tmp_path / "static.c"
    source.write_text("#include <stdlib.h>\nint main(void){return malloc(1)==0;}\n")
    binary = tmp_path / "static-server"
    built = subprocess.run(["gcc", "-static", "-o", str(binary), str(source)], capture_output=True, text=True)
    if built.returncode != 0:
        import pytest
        pytest.skip(f"no static libc to link against: {built.stderr.strip()[:200]}")
    scenario = write_scenario(tmp_path, f"""
name: static
target:
  command: [{binary}, "{{port}}"]
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 10, for: 1s}}}}]
faults:
  - {{kind: alloc-fail, mode: nth, nth: 10}}
""")
    result = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"harness: error: cannot inject faults into {binary}")
    assert "static" in lines[0]
