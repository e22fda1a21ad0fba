"""Variants on real fleets: proof of what ran (from memory maps), and a requested allocator that cannot
be bound fails its trial loudly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import HARNESS, REPO, query, run_dir_of, write_scenario


def test_each_host_proves_its_allocator(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, """
name: proof
seed: 3
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{port}"]
fleet: {hosts: 2}
load: [{hold: {rate: 50, for: 2s}}]
variants:
  - {name: glibc}
  - {name: jemalloc, allocator: jemalloc}
  - {name: tcmalloc, allocator: tcmalloc}
""")
    result = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    proofs = [(row["trial"], json.loads(row["detail"])) for row in
              query(run_dir, "SELECT trial, detail FROM events WHERE kind='proof' ORDER BY trial, host")]
    by_variant: dict[str, set[str]] = {}
    for _, proof in proofs:
        by_variant.setdefault(proof["variant"], set()).add(proof["allocator"])
    assert by_variant == {"glibc": {"glibc"}, "jemalloc": {"jemalloc"}, "tcmalloc": {"tcmalloc"}}
    jemalloc = next(p for _, p in proofs if p["variant"] == "jemalloc")
    assert any("libjemalloc.so" in lib for lib in jemalloc["allocator_libraries"])
    # Trials were interleaved and every variant saw the same arrivals (same seed, same count).
    trials = query(run_dir, "SELECT id, variant FROM trials ORDER BY id")
    assert [t["variant"] for t in trials] == ["glibc", "jemalloc", "tcmalloc"]
    offered = {t["id"]: query(run_dir, "SELECT sum(offered) AS n FROM samples WHERE trial=?", (t["id"],))[0]["n"]
               for t in trials}
    assert len(set(offered.values())) == 1


def test_allocator_that_cannot_be_bound_fails_the_trial(targets: Path, tmp_path: Path) -> None:
    binary = tmp_path / "static-echo"
    built = subprocess.run(["gcc", "-O1", "-static", "-o", str(binary), str(REPO / "targets/echo/echo.c")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot link statically here: {built.stderr.strip()[:200]}")
    scenario = write_scenario(tmp_path, f"""
name: unbound
target:
  command: [{binary}, --port, "{{port}}"]
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 20, for: 3s}}}}]
variants:
  - {{name: jemalloc, allocator: jemalloc}}
""")
    result = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "asked for jemalloc, but h0" in result.stderr and "runs with glibc" in result.stderr
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    trial = query(run_dir, "SELECT status, detail FROM trials")[0]
    assert trial["status"] == "failed"
    assert "asked for jemalloc" in json.loads(trial["detail"])["failure"]


def test_compare_a_against_a_finds_no_difference(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, """
name: a-vs-a
seed: 8
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{port}"]
fleet: {hosts: 2}
load: [{hold: {rate: 150, for: 2s}}]
variants:
  - {name: a}
  - {name: a-again}
trials: 3
""")
    ran = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    assert [t["variant"] for t in query(run_dir, "SELECT variant FROM trials ORDER BY id")] == ["a", "a-again"] * 3
    compared = subprocess.run([*HARNESS, "compare", str(run_dir), "--json"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    result = json.loads(compared.stdout)
    verdicts = [row["verdict"] for row in result["rows"]]
    assert verdicts and all(v.startswith("no difference detected") for v in verdicts), verdicts
    assert [v["loaded"] for v in result["variants"]] == [["glibc"], ["glibc"]]  # proof of what ran
    text = subprocess.run([*HARNESS, "compare", str(run_dir)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert "a-again" in text.stdout and "verdict" in text.stdout and "loaded (proof)" in text.stdout


def test_comparison_expectations_are_judged(targets: Path, tmp_path: Path) -> None:
    """{compare: [a, b], crash_rate: "no worse"} holds for identical variants; an impossible ratio claim fails."""
    scenario = write_scenario(tmp_path, """
name: compare-expect
seed: 9
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{port}"]
fleet: {hosts: 1}
load: [{hold: {rate: 100, for: 1s}}]
variants:
  - {name: a}
  - {name: b}
trials: 2
expect:
  - {compare: [b, a], crash_rate: "no worse"}
  - {compare: [b, a], throughput: "> 5x"}
""")
    ran = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 1, ran.stderr  # the throughput claim cannot hold
    judged = {e["text"]: e for e in json.loads(ran.stdout)["expectations"]}
    assert judged["b vs a: crash_rate no worse"]["held"]
    assert not judged["b vs a: throughput > 5x"]["held"]
