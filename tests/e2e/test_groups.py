"""Mixed fleets (fleet.groups): validation, planning, and one real run of two kinds of host behind one balancer."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import HARNESS, REPO, query, run_dir_of, write_scenario
from harness.base.errors import ScenarioError
from harness.run.faults.shimfaults import fault_hosts
from harness.run.fleet import plan_fleet
from harness.scenario.loader import load_scenario_text
from harness.scenario.model import Variant

BAD = REPO / "tests" / "fixtures" / "bad_scenarios"
PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+\.yaml):(?P<line>\d+): (?P<field>\S+): (?P<message>\S.*)$")

MIXED = """\
name: mixed
seed: 5
target:
  command: [./estats, --port, "{port}", --estats, "on"]
  expect_reply: "^OK"
  restart: {policy: always, backoff: 500ms}
  env: {COMMON: "1"}
fleet:
  balancer: round-robin
  groups:
    - {name: estats, hosts: 2}
    - name: twq
      hosts: 3
      command: [./twq, --port, "{port}", --threads, "2"]
      restart: {backoff: 2s}
      env: {ONLY_TWQ: "{host}"}
      stop_grace: 5s
    - {name: echo, hosts: 1, command: [./echo, --port, "{port}"], expect_reply: "^GET "}
load:
  - hold: {for: 5s, rate: 100}
"""


def load(text: str, tmp_path: Path):
    return load_scenario_text(textwrap.dedent(text), "mixed.yaml", base=tmp_path)


def problems(text: str, tmp_path: Path) -> list[tuple[int, str, str]]:
    with pytest.raises(ScenarioError) as info:
        load(text, tmp_path)
    return [(p.line, p.field, p.message) for p in info.value.problems]


# --- the language ---------------------------------------------------------------------------------

def test_groups_resolve_over_the_target(tmp_path: Path) -> None:
    scenario = load(MIXED, tmp_path)
    assert scenario.fleet.hosts == 6
    estats, twq, echo = scenario.fleet.groups
    assert (estats.name, estats.hosts, twq.hosts, echo.hosts) == ("estats", 2, 3, 1)
    assert estats.target.command == ("./estats", "--port", "{port}", "--estats", "on")   # inherited
    assert twq.target.command[0] == "./twq"
    # Mappings merge key by key: twq keeps the target's policy with its own backoff.
    assert twq.target.restart.policy == "always" and twq.target.restart.backoff == 2.0
    assert estats.target.restart.backoff == 0.5
    assert twq.target.env == {"COMMON": "1", "ONLY_TWQ": "{host}"} and estats.target.env == {"COMMON": "1"}
    assert twq.target.stop_grace == 5.0 and estats.target.stop_grace == 2.0
    assert (estats.target.expect_reply, echo.target.expect_reply) == ("^OK", "^GET ")
    assert scenario.hosts_in(("twq",)) == [2, 3, 4] and scenario.hosts_in() == list(range(6))


def test_fleet_hosts_may_repeat_the_sum(tmp_path: Path) -> None:
    scenario = load(MIXED.replace("  balancer: round-robin\n", "  hosts: 6\n"), tmp_path)
    assert scenario.fleet.hosts == 6


def test_a_fleet_without_groups_is_one_unnamed_group_of_the_target(tmp_path: Path) -> None:
    scenario = load("name: t\ntarget: {command: [./s]}\nfleet: {hosts: 3}\nload: [{hold: {for: 1s, rate: 1}}]\n",
                    tmp_path)
    (group,) = scenario.host_groups
    assert (group.name, group.hosts, group.target) == ("", 3, scenario.target)
    assert scenario.fleet.groups == ()


@pytest.mark.parametrize("change, field, message", [
    (("  balancer: round-robin\n", "  hosts: 7\n"), "fleet.hosts",
     "7 hosts, but the groups add up to 6 (2 estats + 3 twq + 1 echo): drop fleet.hosts or make them agree"),
    (("stop_grace: 5s", "stop_grce: 5s"), "fleet.groups[1].stop_grce", "did you mean 'stop_grace'?"),
    (("stop_grace: 5s", "terminator: \"\\r\\n\""), "fleet.groups[1].terminator", "set it once in target.terminator"),
    (("name: echo", "name: twq"), "fleet.groups[2].name", "group name 'twq' is used twice"),
    (("name: echo", "name: 9lives"), "fleet.groups[2].name", "a group name starts with a letter"),
    (("hosts: 3", "hosts: 0"), "fleet.groups[1].hosts", "at least 1"),
])
def test_group_mistakes_are_one_problem_each(tmp_path: Path, change: tuple[str, str], field: str,
                                             message: str) -> None:
    (found,) = problems(MIXED.replace(*change), tmp_path)
    assert found[1] == field and message in found[2], found


def test_faults_and_variants_name_groups(tmp_path: Path) -> None:
    scenario = load(MIXED + """\
faults:
  - {kind: lock-error, probability: 1%, groups: twq, hosts: 2}
  - {kind: alloc-fail, probability: 1%, groups: [estats, echo]}
variants:
  - {name: base}
  - {name: estats-off, groups: estats, args: {--estats: "off"}}
""", tmp_path)
    lock, alloc = scenario.shim_faults
    chosen = fault_hosts(scenario, lock)
    assert len(chosen) == 2 and set(chosen) <= {2, 3, 4}
    assert fault_hosts(scenario, alloc) == [0, 1, 5]
    assert scenario.shim_faults_for("twq") == (lock,) and scenario.shim_faults_for("echo") == (alloc,)
    assert scenario.variant("estats-off").groups == ("estats",)


@pytest.mark.parametrize("extra, field, message", [
    ("faults:\n  - {kind: lock-error, probability: 1%, groups: [twq, estat]}\n", "faults[0].groups",
     "no fleet group named 'estat' (did you mean 'estats'?)"),
    ("faults:\n  - {kind: lock-error, probability: 1%, groups: twq, hosts: 4}\n", "faults[0].hosts",
     "4 hosts asked but group twq has 3"),
    ("faults:\n  - {kind: host-loss, at: 1s, groups: twq}\n", "faults[0].groups",
     "a host-loss picks among the whole fleet"),
    ("variants:\n  - {name: estats-off, args: {--estats: \"off\"}}\n", "variants[0].args.--estats",
     "not in the command of groups twq, echo and would be added there: say which groups this variant is for "
     "(groups: [estats])"),
    ("variants:\n  - {name: new, command: [./new, --port, \"{port}\"]}\n", "variants[0].command",
     "would replace the command of every group (estats, twq, echo)"),
])
def test_bad_group_references(tmp_path: Path, extra: str, field: str, message: str) -> None:
    (found,) = problems(MIXED + extra, tmp_path)
    assert found[1] == field and message in found[2], found


def test_groups_need_a_real_fleet_and_group_references_need_groups(tmp_path: Path) -> None:
    plain = "name: t\ntarget: {command: [./s]}\nfleet: {hosts: 2}\nload: [{hold: {for: 1s, rate: 1}}]\n"
    (found,) = problems(plain + "variants: [{name: a, groups: estats}]\n", tmp_path)
    assert found[1] == "variants[0].groups" and "the fleet has no groups" in found[2]
    simulated = plain.replace("fleet: {hosts: 2}", "fleet: {simulated: {hosts: 10, capacity: 100}, groups: "
                                                   "[{name: a, hosts: 10}]}")
    (found,) = problems(simulated, tmp_path)
    assert found[1] == "fleet.groups" and "groups are for real fleets" in found[2]


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(BAD.glob("group-*.yaml")), ids=lambda p: p.stem)
def test_harness_validate_reports_group_mistakes_on_one_line_each(path: Path) -> None:
    result = subprocess.run([*HARNESS, "validate", str(path.relative_to(REPO))], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    expected = [line for line in path.read_text().splitlines() if line.startswith("# expect: ")]
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected) >= 1
    for line, want in zip(lines, expected):
        match = PROBLEM_LINE.match(line)
        assert match, line
        number, field, message = want[len("# expect: "):].split(" ", 2)
        assert (match["line"], match["field"]) == (number, field) and message in match["message"]


# --- planning -------------------------------------------------------------------------------------

def test_plan_fleet_names_hosts_after_their_group_and_applies_variants_per_group(tmp_path: Path) -> None:
    scenario = load(MIXED, tmp_path)
    variant = Variant(name="estats-off", args={"--estats": "off"}, env={"ESTATS_VARIANT_ONLY": "1"}, groups=("estats",))
    hosts = plan_fleet(scenario.host_groups, variant, tmp_path / "hosts")
    assert [h.name for h in hosts] == ["estats-0", "estats-1", "twq-0", "twq-1", "twq-2", "echo-0"]
    assert [h.index for h in hosts] == list(range(6)) and [h.group for h in hosts][2] == "twq"
    assert len({h.port for h in hosts}) == 6
    assert hosts[0].dir == tmp_path / "hosts" / "estats-0"
    assert hosts[0].argv[-2:] == ["--estats", "off"] and hosts[0].env["ESTATS_VARIANT_ONLY"] == "1"
    assert "--estats" not in hosts[2].argv and "ESTATS_VARIANT_ONLY" not in hosts[2].env
    assert hosts[3].env["ONLY_TWQ"] == "twq-1"            # {host} is the host's name
    assert hosts[2].target is scenario.fleet.groups[1].target and hosts[5].target.expect_reply == "^GET "


# --- a real mixed fleet ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_mixed_fleet_really_runs_both_kinds_and_faults_reach_only_their_group(targets: Path,
                                                                                 tmp_path: Path) -> None:
    """One echo and one estats host behind one balancer; an allocation fault aimed at estats alone crashes it
    (the stats block, under 1 KiB, is dereferenced unchecked), and echo is untouched."""
    scenario = write_scenario(tmp_path, """
name: mixed-e2e
seed: 9
target:
  root: @REPO@
  expect_reply: "^OK "
  restart: {policy: always, backoff: 200ms}
fleet:
  balancer: round-robin
  groups:
    - {name: echo, hosts: 1, command: [targets/echo/echo-server, --port, "{port}"], expect_reply: "^GET k"}
    - {name: estats, hosts: 1, command: [targets/estats/estats-server, --port, "{port}", --estats, "on"]}
client: {timeout: 1s}
load: [{hold: {rate: 100, for: 4s}}]
faults:
  - {kind: alloc-fail, mode: nth, nth: 50, max_size: 1KiB, times: 1, from: 1s, groups: estats}
""")
    result = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    trial = report["trials"][0]

    # Both kinds of process really ran: the executable each host's pid had, read from /proc.
    proofs = {json.loads(r["detail"])["group"]: json.loads(r["detail"])["executable"]
              for r in query(run_dir, "SELECT detail FROM events WHERE kind='proof' AND trial=1")}
    assert proofs["echo"].endswith("targets/echo/echo-server")
    assert proofs["estats"].endswith("targets/estats/estats-server")

    # Both served, each judged by its own reply pattern (echo's replies are not "OK ...").
    groups = trial["groups"]
    assert set(groups) == {"echo", "estats"}
    assert groups["echo"]["ok"] > 100 and groups["estats"]["ok"] > 100
    assert trial["overall"]["errors"]["bad_reply"] == 0
    assert groups["echo"]["errors"] == 0 and groups["echo"]["crashes"] == 0

    # The fault reached estats only, which crashed in estats_update; the report names the host.
    arms = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='fault-arm'")]
    assert [a["hosts"] for a in arms] == [[1]]
    assert trial["crashes_total"] >= 1 and set(trial["crashes_by_host"]) == {"estats-0"}
    assert {c["host_name"] for c in trial["crashes"]} == {"estats-0"}
    assert any("estats_update" in b["signature"] for b in trial["buckets"])
    assert (run_dir / "hosts" / "t1" / "echo-0" / "stdout.log").exists()


@pytest.mark.slow
def test_harness_validate_lists_a_mixed_fleets_groups() -> None:
    result = subprocess.run([*HARNESS, "validate", "scenarios/nightly-soak.yaml"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nightly-soak.yaml: ok (6 hosts: 2 estats, 2 twq, 2 arena, 8h," in result.stdout
