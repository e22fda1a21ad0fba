"""fleet.placement (and a group's own) and the machine-loss fault: read from YAML, refused where they cannot
act (a simulated fleet; a local run), and what validate and a short --duration say of them. The mistakes each
have a file in tests/fixtures/bad_scenarios/ (placement-*, machine-loss-*), checked by test_loader.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli
from harness.plan.cut import plan_cut
from harness.scenario.loader import FAULT_KINDS, load_scenario, load_scenario_text
from harness.scenario.model import Fleet, HostLoss, MachineLoss
from harness.scenario.needs import machine_loss_problem

HEAD = """\
name: placed
target:
  command: [./server, --port, "{port}"]
"""
LOAD = """\
load:
  - hold: {for: 20s, rate: 100}
"""


def scenario(fleet: str, faults: str = ""):
    return load_scenario_text(HEAD + fleet + LOAD + (f"faults:\n{faults}" if faults else ""), "placed.yaml")


def test_placement_defaults_to_spread_and_groups_inherit_it():
    plain = scenario("fleet: {hosts: 4}\n")
    assert plain.fleet.placement == "spread" == Fleet(hosts=1).placement
    grouped = scenario("fleet:\n  groups:\n    - {name: a, hosts: 2}\n    - {name: b, hosts: 1}\n")
    assert grouped.fleet.placement == "spread"
    assert [g.placement for g in grouped.fleet.groups] == [None, None]


def test_fleet_and_group_placement_are_read():
    placed = scenario("fleet:\n  placement: pack\n  groups:\n    - {name: a, hosts: 2, placement: spread}\n"
                      "    - {name: b, hosts: 1}\n    - {name: c, hosts: 1, placement: pack}\n")
    assert placed.fleet.placement == "pack"
    assert [(g.name, g.placement) for g in placed.fleet.groups] == [("a", "spread"), ("b", None), ("c", "pack")]
    assert scenario("fleet: {hosts: 3, placement: pack}\n").fleet.placement == "pack"


def test_machine_loss_is_read_with_its_machine_zero_based_or_a_count():
    placed = scenario("fleet: {hosts: 4}\n",
                      "  - {kind: host-loss, at: 2s, hosts: 1}\n"
                      "  - {kind: machine-loss, at: 6s, machine: 2}\n"
                      "  - {kind: machine-loss, at: 1m}\n"
                      "  - {kind: machine-loss, at: 500ms, machines: 3}\n")
    assert "machine-loss" in FAULT_KINDS
    assert placed.machine_losses == (MachineLoss(index=1, at=6.0, machine=1, count=1),
                                     MachineLoss(index=2, at=60.0, machine=None, count=1),
                                     MachineLoss(index=3, at=0.5, machine=None, count=3))
    assert [type(f) for f in placed.faults] == [HostLoss, MachineLoss, MachineLoss, MachineLoss]
    assert [f.index for f in placed.host_losses] == [0]       # a machine-loss is not a host-loss


def test_machine_loss_problem_names_the_first_machine_loss():
    assert machine_loss_problem(scenario("fleet: {hosts: 4}\n", "  - {kind: host-loss, at: 2s}\n")) is None
    placed = scenario("fleet: {hosts: 4}\n", "  - {kind: host-loss, at: 2s}\n  - {kind: machine-loss, at: 6s}\n"
                                             "  - {kind: machine-loss, at: 8s}\n")
    assert machine_loss_problem(placed) == ("faults[1]: machine-loss needs --cluster (the hosts spread over "
                                            "cluster workers' machines)")
    # a resumed run going on from 7 s: the loss at 6 s is past, the one at 8 s still ahead; from 9 s none is
    assert machine_loss_problem(placed, after=7).startswith("faults[2]: ")
    assert machine_loss_problem(placed, after=8).startswith("faults[2]: ")
    assert machine_loss_problem(placed, after=9) is None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "placed.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_local_run_refuses_a_machine_loss_in_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HARNESS_CLUSTER", raising=False)
    path = write(tmp_path, HEAD + "fleet: {hosts: 2}\n" + LOAD + "faults:\n  - {kind: machine-loss, at: 6s}\n")
    results = tmp_path / "results"
    assert cli.main(["run", str(path), "--results", str(results), "--no-html"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["harness: error: faults[0]: machine-loss needs --cluster (the hosts spread over cluster "
                   "workers' machines)"]
    assert not results.exists()             # no run folder: nothing was started


def test_validate_accepts_a_machine_loss_and_notes_that_it_needs_a_cluster(tmp_path, capsys):
    path = write(tmp_path, HEAD + "fleet: {hosts: 2, placement: pack}\n" + LOAD +
                 "faults:\n  - {kind: machine-loss, at: 6s, machine: 1}\n")
    assert cli.main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: ok (2 hosts, 20s, 1 faults" in out
    assert err.strip() == (f"{path}: note: faults[0]: machine-loss needs --cluster (the hosts spread over cluster "
                           f"workers' machines); a local run refuses it")
    plain = write(tmp_path, HEAD + "fleet: {hosts: 2, placement: pack}\n" + LOAD)
    assert cli.main(["validate", str(plain)]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("run, said", [(30.0, False), (6.0, True), (5.0, True)])
def test_a_shorter_run_says_a_machine_loss_after_its_end_never_fires(run, said):
    plan = scenario("fleet: {hosts: 2}\n", "  - {kind: machine-loss, at: 6s}\n")
    lines = "\n".join(plan_cut(plan, run).lines())
    assert ("faults[0] (machine-loss): never fires (not at 6s)" in lines) is said
