"""`harness soak` against a baseline: a variant that brings a new bug makes the night fail (exit 1) and
the JUnit file names the new bucket; `latest-good` finds the last night that passed."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import HARNESS, query, write_scenario

NIGHT = """
name: mini-night
seed: 17
target:
  root: @REPO@
  command: [targets/estats/estats-server, --port, "{port}", --estats, "off", --service-ms, "20",
            --scratch-kb, "16", --stats-kb, "4"]
  restart: {policy: always, backoff: 200ms, max_backoff: 400ms}
  expect_reply: "^OK"
fleet: {hosts: 2, balancer: least-loaded}
load:
  - {hold: {rate: 400, for: 1h}}
faults:
  - {kind: alloc-fail, mode: budget, budget: 160KiB}
variants:
  - {name: stable}
  - {name: new-build, args: {--estats: "@ESTATS@"}}
"""


def _soak(tmp_path: Path, estats: str, *extra: str) -> subprocess.CompletedProcess[str]:
    scenario = write_scenario(tmp_path, NIGHT.replace("@ESTATS@", estats))
    return subprocess.run([*HARNESS, "soak", str(scenario), "--duration", "6s", "--out", "results", "--quiet",
                           *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_new_bucket_against_the_last_good_night_fails_the_soak(targets: Path, tmp_path: Path) -> None:
    # The first night has nothing to compare with: it says so and passes.
    first = _soak(tmp_path, "off", "--baseline", "latest-good", "--html")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no baseline" in first.stdout
    assert "trends:" in first.stdout
    (good,) = (tmp_path / "results").iterdir()
    # The page is written at the end of the run, and says where.
    assert (good / "report.html").stat().st_size > 10_000
    assert f"html report: {good.resolve() / 'report.html'}" in first.stdout
    assert query(good, "SELECT exit_code FROM runs")[0]["exit_code"] == 0

    # Tonight's build turns estats on: the unchecked allocation crashes under the heap budget.
    junit = tmp_path / "night.xml"
    second = _soak(tmp_path, "on", "--baseline", "latest-good", "--junit", str(junit), "--json")
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    report = json.loads(second.stdout)
    regressions = report["regressions"]
    assert regressions["failed"]
    new = [b["bucket"] for b in regressions["new_buckets"]]
    assert new, regressions
    buckets = {b["bucket"] for t in report["trials"] if t["variant"] == "new-build" for b in t["buckets"]}
    assert set(new) <= buckets
    cases = ET.parse(junit).getroot().iter("testcase")
    failed = [c.get("name", "") for c in cases if c.find("failure") is not None]
    assert any(new[0] in name for name in failed), failed
    night = Path(report["run_dir"]) if Path(report["run_dir"]).is_absolute() else tmp_path / report["run_dir"]
    assert query(night, "SELECT exit_code FROM runs")[0]["exit_code"] == 1

    # The failed night is not "good": the next night still compares with the first one.
    third = _soak(tmp_path, "off", "--baseline", "latest-good", "--json")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["regressions"]["baseline"]["run_id"] == good.name


@pytest.mark.slow
def test_a_mistyped_baseline_is_refused_before_the_night(targets: Path, tmp_path: Path) -> None:
    done = _soak(tmp_path, "off", "--baseline", "no-such-run")
    assert done.returncode == 2
    assert done.stderr.startswith("harness: error: --baseline:") and "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())
