"""A run never fills the disk: cores within the run's cap (the oldest cores of already-sampled
buckets go first, so a new bucket still gets its core), and a low disk stops core collection,
not the run."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.collect.retention import CoreRetention, KeptCore, make_room
from harness.scenario.model import Cores

from conftest import HARNESS, query, write_scenario


def _core(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\0" * size)
    return path


def test_make_room_drops_oldest_of_buckets_with_spares_never_the_last_example() -> None:
    kept = [KeptCore("a1", Path("/a1"), 100, "A"), KeptCore("b1", Path("/b1"), 100, "B"),
            KeptCore("a2", Path("/a2"), 100, "A"), KeptCore("a3", Path("/a3"), 100, "A")]
    assert make_room(kept, 50, 500) == []                             # fits already
    assert [c.uid for c in make_room(kept, 100, 400)] == ["a1"]       # oldest spare first
    dropped = make_room(kept, 200, 400)
    assert [c.uid for c in dropped] == ["a1", "a2"]                   # b1 and the newest A stay
    assert make_room(kept, 500, 400) == []                            # cannot fit even so: drop nothing


def test_a_new_bucket_gets_its_core_when_the_cap_is_full(tmp_path: Path) -> None:
    retention = CoreRetention(Cores(keep_per_bucket=5, sample_every=1, disk_cap=300))
    for n in range(3):
        result, dropped = retention.decide(f"a{n}", _core(tmp_path, f"a{n}", 100), "A")
        assert result["core_kept"] and not dropped
    result, dropped = retention.decide("b0", _core(tmp_path, "b0", 100), "B")
    assert result["core_kept"] and [d.uid for d in dropped] == ["a0"]
    assert not (tmp_path / "a0").exists() and (tmp_path / "b0").exists()
    assert retention.used == 300
    # A core larger than what can be freed is refused, and nothing is deleted for it.
    result, dropped = retention.decide("c0", _core(tmp_path, "c0", 250), "C")
    assert not result["core_kept"] and "disk cap" in result["core_dropped"] and not dropped
    assert not (tmp_path / "c0").exists() and retention.used == 300
    assert retention.counts == {"A": 3, "B": 1, "C": 1}


LOW_DISK = """
name: low-disk
seed: 3
target:
  root: @REPO@
  command: [targets/estats/estats-server, --port, "{port}", --estats, "on", --service-ms, "20",
            --scratch-kb, "16", --stats-kb, "4"]
  restart: {policy: always, backoff: 200ms, max_backoff: 400ms}
fleet: {hosts: 2, balancer: least-loaded}
load:
  - {hold: {rate: 600, for: 6s}}
faults:
  - {kind: alloc-fail, mode: budget, budget: 300KiB}
cores: {min_free: 1000000TiB}      # more than any disk has: the disk is "low" from the start
"""


@pytest.mark.slow
def test_low_disk_stops_core_collection_not_the_run(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, LOW_DISK)
    done = subprocess.run([*HARNESS, "run", str(scenario), "--out", "results", "--quiet", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "low disk" in done.stderr
    report = json.loads(done.stdout)
    (trial,) = report["trials"]
    assert trial["status"] == "complete" and trial["crashes_total"] > 0
    assert len(trial["low_disk"]) == 1 and trial["low_disk"][0]["free"] > 0
    run_dir = Path(report["run_dir"])
    if not run_dir.is_absolute():
        run_dir = tmp_path / run_dir
    # Crashes counted, none of their cores kept anywhere under the run (nor left in the hosts' cwd).
    assert all(c["core_path"] is None for c in trial["crashes"])
    assert not [p for p in run_dir.rglob("core*") if p.is_file()]
    notes = [json.loads(r["detail"]).get("core_notes", []) for r in query(run_dir, "SELECT detail FROM crashes")]
    assert any("low disk" in " ".join(n) for n in notes)


FULL_DISK = """
name: full-disk
seed: 4
target:
  root: @REPO@
  command: [targets/unruly/unruly-server, --port, "{port}", --flood]
  log_max: 4MiB
fleet: {hosts: 1}
load:
  - {hold: {rate: 50, for: 6s}}
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem that fills up: a tmpfs of a few MiB (root only)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_cleanly_and_it_resumes_once_there_is_space(targets: Path, tmp_path: Path,
                                                                              small_disk: Path) -> None:
    scenario = write_scenario(tmp_path, FULL_DISK)
    full = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(small_disk), "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    # The flooding host fills the disk; the store cannot commit: one line, exit 2, no traceback.
    assert full.returncode == 2, full.stdout + full.stderr
    assert "Traceback" not in full.stderr
    error = [line for line in full.stderr.splitlines() if line.startswith("harness: error:")]
    assert len(error) == 1 and "cannot write the results store" in error[0] and "harness resume" in error[0]
    (run_dir,) = [p for p in small_disk.iterdir() if (p / "run.db").exists()]
    before = query(run_dir, "SELECT t FROM samples")
    assert query(run_dir, "SELECT status FROM runs")[0]["status"] == "running"   # left resumable
    # Make room (as an operator would), then finish the run.
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    resumed = subprocess.run([*HARNESS, "resume", str(run_dir), "--quiet", "--json"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["status"] == "complete"
    assert {r["t"] for r in before} <= {r["t"] for r in query(run_dir, "SELECT t FROM samples")}
    assert len(report["trials"][0]["gaps"]) == 1
