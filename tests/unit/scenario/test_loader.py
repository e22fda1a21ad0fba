"""Scenario loading and validation: every problem with the right file, line and field (harness.scenario.loader).

tests/fixtures/bad_scenarios/ holds one small scenario per mistake. Each starts with one or more lines
`# expect: <line> <field> <part of the message>`; `harness validate` must report exactly those
problems (same count, same lines, same fields), nothing more.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from harness import cli
from harness.base.errors import ScenarioError
from harness.scenario.loader import load_scenario, load_scenario_text
from harness.scenario.model import HostLoss, ShimFault

ROOT = Path(__file__).resolve().parents[3]
BAD = ROOT / "tests" / "fixtures" / "bad_scenarios"
PROBLEM_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<field>\S+): (?P<message>.+)$")


def expectations(path: Path) -> list[tuple[int, str, str]]:
    result = []
    for text in path.read_text(encoding="utf-8").splitlines():
        if not text.startswith("# expect: "):
            break
        line, field, message = text[len("# expect: "):].split(" ", 2)
        result.append((int(line), field, message))
    return result


def validate(capsys, *paths: Path) -> tuple[int, list[str], str]:
    code = cli.main(["validate", *map(str, paths)])
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


BAD_FILES = sorted(BAD.glob("*.yaml"))


def test_there_is_a_bad_scenario_for_each_kind_of_mistake():
    names = {path.stem for path in BAD_FILES}
    assert {"bad-yaml-syntax", "unknown-key-typo", "wrong-unit", "negative-rate", "missing-command",
            "wrong-type-hosts", "duplicate-key", "unknown-phase-kind", "spike-factor-and-to", "host-loss-no-time",
            "alloc-budget-missing", "lock-errno-unknown", "expect-unknown-phase", "unknown-placeholder",
            "list-for-mapping", "several-mistakes"} <= names


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_scenario_reports_exactly_the_expected_problems(path, capsys):
    expected = expectations(path)
    assert expected, f"{path.name}: the first line must be '# expect: <line> <field> <message part>'"
    code, lines, out = validate(capsys, path)
    assert code == 2
    assert "ok" not in out
    problems = []
    for line in lines:
        match = PROBLEM_LINE.match(line)
        assert match, f"not FILE:LINE: FIELD: message: {line!r}"
        assert match["file"] == str(path)
        problems.append((int(match["line"]), match["field"], match["message"]))
    assert [(line, field) for line, field, _ in problems] == [(line, field) for line, field, _ in expected], lines
    for (_, _, message), (_, _, part) in zip(problems, expected):
        assert part in message


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_scenario_raises_scenario_error_in_process(path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert len(info.value.problems) == len(expectations(path))
    for problem in info.value.problems:
        assert problem.file == str(path) and problem.line >= 1 and "\n" not in problem.message


def test_several_mistakes_are_all_reported():
    with pytest.raises(ScenarioError) as info:
        load_scenario(BAD / "several-mistakes.yaml")
    assert len(info.value.problems) >= 8
    lines = [problem.line for problem in info.value.problems]
    assert lines == sorted(lines)


# --- valid scenarios ------------------------------------------------------------------------------

FULL = """\
name: nye-spike
description: everything the language has
seed: 20261231
duration: 120s
x-defaults: &fast {for: 30s}
target:
  root: .
  build: [make, -C, targets/estats]
  command: [targets/estats/estats-server, --port, "{port}", --estats, "on", --dir, "{dir}"]
  protocol: line
  request: "GET {key}\\n"
  expect_reply: "^OK"
  ready: {tcp: "{port}", timeout: 5s}
  restart: {policy: always, backoff: 1s, max_backoff: 10s}
  env: {SERVICE_NAME: "{host}"}
  cwd: "{dir}"
  log_max: 1MiB
fleet: {hosts: 8, balancer: least-loaded}
client:
  timeout: 250ms
  connections: 4
  keys: {space: 5000, distribution: zipf, zipf_s: 1.2}
load:
  - {ramp: {from: 200, to: 1200/s, over: 30s}}
  - {hold: {<<: *fast}}
  - {spike: {factor: 3, for: 30s, name: midnight}}
  - {steps: {to: 2400, count: 2, each: 5s}}
faults:
  - {kind: alloc-fail, mode: budget, budget: 48MiB, hosts: 25%}
  - {kind: alloc-fail, mode: random, probability: 0.05%, min_size: 1KiB, from: 60s, until: 90s}
  - {kind: lock-error, function: pthread_mutex_lock, errno: EDEADLK, probability: 0.01, every: 10s, for: 2s}
  - {kind: host-loss, at: 70s, hosts: 1, how: kill, down_for: 3s}
  - {kind: host-loss, every: 20s, from: 10s, until: 50s, hosts: 2, how: pause, for: 1s}
variants:
  - {name: estats-on}
  - {name: estats-off, args: {--estats: "off"}}
  - {name: jemalloc, allocator: jemalloc, env: {MALLOC_CONF: "junk:true"}}
trials: 3
expect:
  - {variant: estats-off, crashes: 0}
  - {p99_latency: "< 250ms", phase: hold}
  - {error_rate: "<= 1%", phase: midnight}
  - {throughput: ">= 900/s"}
  - {hosts_alive: ">= 6"}
"""


def test_full_scenario_loads_with_values_in_base_units(tmp_path):
    scenario = load_scenario_text(FULL, "full.yaml", base=tmp_path)
    assert scenario.name == "nye-spike" and scenario.seed == 20261231 and scenario.trials == 3
    assert scenario.duration == 120
    assert scenario.target.command[0] == "targets/estats/estats-server"
    assert scenario.target.root == tmp_path.resolve()
    assert scenario.target.log_max == 1024 * 1024
    assert scenario.target.restart.max_backoff == 10
    assert scenario.client.timeout == 0.25 and scenario.client.keys.distribution == "zipf"
    assert scenario.fleet.hosts == 8 and scenario.fleet.balancer == "least-loaded"
    assert [p.name for p in scenario.load.phases] == ["ramp", "hold", "midnight", "steps", "tail"]
    assert scenario.load.phases[1].end - scenario.load.phases[1].start == 30      # from the merged anchor
    assert scenario.load.rate(75) == pytest.approx(3600)
    budget, random_fault, lock, kill, pause = scenario.faults
    assert isinstance(budget, ShimFault) and budget.budget == 48 * 1024**2 and budget.hosts.resolve(8) == 2
    assert random_fault.probability == pytest.approx(0.0005) and random_fault.min_size == 1024
    assert (random_fault.window.start, random_fault.window.until) == (60, 90)
    assert lock.errno_name == "EDEADLK" and lock.window.intervals(30) == [(0, 2), (10, 12), (20, 22)]
    assert isinstance(kill, HostLoss) and kill.times == (70,) and kill.down_for == 3
    assert isinstance(pause, HostLoss) and pause.times == (10, 30) and pause.pause_for == 1
    assert scenario.variant("estats-off").args == {"--estats": "off"}
    assert [e.metric for e in scenario.expect] == ["crashes", "p99_latency", "error_rate", "throughput",
                                                   "hosts_alive"]
    assert scenario.expect[1].value == pytest.approx(0.25) and scenario.expect[1].op == "<"
    assert scenario.expect[2].value == pytest.approx(0.01)
    assert scenario.expect[1].line == 41
    assert scenario.text == FULL


def test_written_valid_scenario_validates_with_exit_0(tmp_path, capsys):
    path = tmp_path / "full.yaml"
    path.write_text(FULL, encoding="utf-8")
    code, errors, out = validate(capsys, path)
    assert (code, errors) == (0, [])
    assert "ok (8 hosts" in out


REPO_SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", REPO_SCENARIOS, ids=lambda p: p.name)
def test_repo_scenarios_are_valid(path, capsys):
    code, errors, _ = validate(capsys, path)
    assert (code, errors) == (0, [])


def test_duration_override_and_seed_override():
    path = ROOT / "scenarios" / "echo-hostloss.yaml"
    scenario = load_scenario(path, duration=5, seed=3)
    assert scenario.duration == 5 and scenario.seed == 3
    with pytest.raises(ScenarioError, match="greater than zero"):
        load_scenario(path, duration=0)


def test_shorter_duration_does_not_invalidate_expectations_on_later_phases():
    text = BASE + "  - spike: {factor: 2, for: 5s, name: peak}\nexpect:\n  - {crashes: 0, phase: peak}\n"
    scenario = load_scenario_text(text)
    assert scenario.load.windows("peak") == [(10, 15)]
    from harness.scenario.loader import build_scenario
    from harness.base.yamlsource import parse_source
    short = build_scenario(parse_source(text, "t.yaml"), Path("t.yaml"), duration_override=4)
    assert short.duration == 4 and short.load.windows("peak") == []
    assert short.expect[0].phase == "peak"
    with pytest.raises(ScenarioError, match="no load phase named 'paek'"):
        build_scenario(parse_source(text.replace("phase: peak", "phase: paek"), "t.yaml"), Path("t.yaml"),
                       duration_override=4)
    longer = build_scenario(parse_source(text.replace("phase: peak", "phase: tail"), "t.yaml"), Path("t.yaml"),
                            duration_override=30)
    assert longer.load.windows("tail") == [(15, 30)]


# --- focused checks -------------------------------------------------------------------------------

BASE = """\
name: t
target:
  command: [./server, --port, "{port}"]
fleet: {hosts: 4}
load:
  - hold: {for: 10s, rate: 100}
"""


def problems_of(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ScenarioError) as info:
        load_scenario_text(textwrap.dedent(text), "t.yaml")
    return [(p.line, p.field, p.message) for p in info.value.problems]


def only_problem(text: str) -> tuple[int, str, str]:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


def test_base_is_valid():
    assert load_scenario_text(BASE).fleet.hosts == 4
    assert load_scenario_text(BASE).client.workers == 1


def test_client_workers_takes_a_number_or_auto():
    from harness.run.driverpool import resolve_workers
    assert load_scenario_text(BASE + "client: {workers: 3}\n").client.workers == 3
    auto = load_scenario_text(BASE + "client: {workers: auto}\n").client.workers
    assert auto == "auto" and resolve_workers(auto) == len(os.sched_getaffinity(0))


def test_shim_fault_hosts_are_checked_against_the_real_fleet():
    line, field, message = only_problem(BASE + "faults:\n  - {kind: lock-error, probability: 0.1, hosts: 5}\n")
    assert (line, field) == (8, "faults[0].hosts") and "fleet has 4" in message
    scenario = load_scenario_text(BASE + "faults:\n  - {kind: lock-error, probability: 0.1, hosts: 4}\n")
    assert scenario.faults[0].hosts.count == 4


def test_host_loss_hosts_are_checked_against_the_fleet():
    assert only_problem(BASE + "faults:\n  - {kind: host-loss, at: 1s, hosts: 9}\n")[1] == "faults[0].hosts"


def test_block_value_reports_the_line_of_its_key():
    text = BASE.replace("fleet: {hosts: 4}", "fleet:\n\n  - 4")
    assert only_problem(text)[:2] == (4, "fleet")


def test_missing_section_names_the_section():
    assert only_problem(BASE.replace("fleet: {hosts: 4}\n", ""))[:2] == (1, "fleet")
    line, field, message = only_problem("name: t\ntarget: {command: [x]}\nfleet: {hosts: 1}\n")
    assert (field, message) == ("load", "missing required section 'load'")


def test_misspelt_key_is_reported_once():
    line, field, message = only_problem(BASE.replace("fleet: {hosts: 4}", "fleet: {hostz: 4}"))
    assert field == "fleet.hostz" and "did you mean 'hosts'" in message
    line, field, message = only_problem(BASE.replace("load:", "laod:"))
    assert field == "laod" and "did you mean 'load'" in message


def test_misspelt_mode_parameter_is_reported_once():
    line, field, message = only_problem(BASE + "faults:\n  - {kind: alloc-fail, mode: budget, budgte: 1MiB}\n")
    assert field == "faults[0].budgte" and "did you mean 'budget'" in message


def test_duplicate_key_does_not_hide_other_mistakes():
    found = problems_of(BASE.replace("name: t\n", "name: t\nname: u\n") + "trials: 0\n")
    assert [(line, field) for line, field, _ in found] == [(2, "name"), (8, "trials")]


def test_problems_come_in_file_order():
    text = BASE.replace("rate: 100", "rate: -1") + "trials: zero\nseed: x\n"
    text = text.replace("name: t", "name: 't t'")
    lines = [line for line, _, _ in problems_of(text)]
    assert lines == sorted(lines) and len(lines) == 4


def test_unreadable_value_is_reported_once():
    line, field, message = only_problem(BASE + "seed: 2026-13-45\n")
    assert (line, field) == (7, "seed") and "cannot read" in message
    assert only_problem(BASE + "seed: !!python/name:os.system x\n")[1] == "seed"


def test_alias_bomb_is_a_problem_not_a_hang():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 10) + "]\n"
    found = problems_of(BASE + "x-bomb:\n" + textwrap.indent(bomb, "  "))
    assert any("more than" in message for _, _, message in found)


def test_deep_nesting_is_a_problem():
    line, field, message = only_problem("a: " + "[" * 500 + "]" * 500 + "\n")
    assert field == "(yaml)" and "nested" in message
    found = problems_of(BASE + "x-deep: " + "[" * 100 + "]" * 100 + "\n")
    assert any("nested" in message for _, _, message in found)


def test_merge_key_and_extension_keys():
    text = "x-anchors:\n  h: &h {for: 3s, rate: 999}\n" + BASE.replace(
        "  - hold: {for: 10s, rate: 100}", "  - hold: {<<: *h, rate: 50}")
    scenario = load_scenario_text(text)
    assert scenario.duration == 3 and scenario.load.rate(1) == 50      # explicit keys win over merged ones
    assert only_problem(BASE + "x-a: 1\ny-a: 1\n")[1] == "y-a"


def test_load_must_have_phases():
    assert only_problem(BASE.replace("  - hold: {for: 10s, rate: 100}\n", ""))[1] == "load"
    assert only_problem(BASE.replace("  - hold: {for: 10s, rate: 100}\n", "  []\n"))[1] == "load"
    assert only_problem(BASE.replace("load:\n  - hold: {for: 10s, rate: 100}\n", "load: {hold: {for: 1s}}\n"))[1] \
        == "load"


def test_phase_details():
    line, field, message = only_problem(BASE.replace("hold: {for: 10s, rate: 100}", "hodl: {for: 10s}"))
    assert field == "load[0].hodl" and "did you mean 'hold'" in message
    line, field, message = only_problem(BASE + "  - steps: {to: 5, count: 100000, each: 1s}\n")
    assert field == "load[1].steps.count"
    assert only_problem(BASE + "  - ramp: {to: 5}\n")[1] == "load[1].ramp.over"
    assert only_problem(BASE + "  - spike: {for: 1s}\n")[1] == "load[1].spike"
    assert only_problem(BASE + "  - spike: {for: 1s, factor: -2}\n")[1] == "load[1].spike.factor"
    assert only_problem(BASE + "  - hold: {for: 0s}\n")[1] == "load[1].hold.for"


def test_fault_details():
    def fault(text: str) -> tuple[int, str, str]:
        return only_problem(BASE + "faults:\n  - " + text + "\n")
    assert fault("{at: 1s}")[1] == "faults[0].kind"
    assert "did you mean 'host-loss'" in fault("{kind: hostloss, at: 1s}")[2]
    assert fault("[host-loss]")[1] == "faults[0]"
    assert fault("{kind: lock-error, mode: budget}")[1:] == ("faults[0].mode", "budget mode is for alloc-fail only")
    assert fault("{kind: alloc-fail, mode: budget}")[1] == "faults[0].budget"
    assert fault("{kind: alloc-fail, probability: 2%, function: mmap}")[1] == "faults[0].function"
    assert fault("{kind: alloc-fail, probability: 150%}")[1] == "faults[0].probability"
    assert fault("{kind: alloc-fail, probability: 1%, from: 5s, until: 2s}")[1] == "faults[0].until"
    assert fault("{kind: alloc-fail, probability: 1%, every: 2s, for: 5s}")[1] == "faults[0].for"
    assert fault("{kind: alloc-fail, probability: 1%, for: 5s}")[1] == "faults[0].for"
    assert fault("{kind: alloc-fail, mode: nth, nth: 3, probability: 1%}")[1] == "faults[0].probability"
    assert fault("{kind: alloc-fail, mode: budget, budget: .inf}")[1] == "faults[0].budget"
    assert fault("{kind: host-loss, every: 5s, from: 10s, until: 4s}")[1] == "faults[0].until"
    assert fault("{kind: host-loss, at: 1s, every: 5s}")[1] == "faults[0]"
    assert fault("{kind: host-loss, at: 1s, how: kill, for: 2s}")[1] == "faults[0].for"
    assert fault("{kind: host-loss, at: 1s, hosts: eight}")[1] == "faults[0].hosts"
    assert fault("{kind: host-loss, at: 1s, hosts: 150%}")[1] == "faults[0].hosts"


def test_target_details():
    assert only_problem(BASE.replace('[./server, --port, "{port}"]', '"./server --port 1"'))[1] == "target.command"
    assert only_problem(BASE.replace('  command:', '  env: {PORT: "{prot}"}\n  command:'))[1] == "target.env.PORT"
    assert only_problem(BASE.replace('  command:', '  cwd: "{dri}"\n  command:'))[1] == "target.cwd"
    assert only_problem(BASE.replace('  command:', '  ready: {tcp: 70000}\n  command:'))[1] == "target.ready.tcp"
    assert only_problem(BASE.replace('  command:', '  expect_reply: "(["\n  command:'))[1] == "target.expect_reply"
    assert only_problem(BASE.replace('  command:', '  request: "GET {key}"\n  command:'))[1] == "target.request"
    scenario = load_scenario_text(BASE.replace('  command:', '  ready: {tcp: 8080}\n  command:'))
    assert scenario.target.ready.port == "8080"


def test_client_details():
    assert only_problem(BASE + "client: {keys: {distribution: zipf, zipf_s: 0}}\n")[1] == "client.keys.zipf_s"
    assert only_problem(BASE + "client: {keys: {distribution: zipf, zipf_s: .nan}}\n")[1] == "client.keys.zipf_s"
    assert only_problem(BASE + "client: {keys: {distribution: zipf, space: 100000000}}\n")[1] == "client.keys.space"
    assert only_problem(BASE + "client: {connections: 100}\n")[1] == "client.connections"
    for workers in ("0", "65", "1.5", "yes"):
        assert only_problem(BASE + f"client: {{workers: {workers}}}\n")[1] == "client.workers", workers


def test_variant_and_expect_details():
    assert only_problem(BASE + "variants:\n  - {name: a}\n  - {name: a}\n")[:2] == (9, "variants[1].name")
    assert only_problem(BASE + "variants:\n  - {name: a, allocator: hoard}\n")[1] == "variants[0].allocator"
    assert only_problem(BASE + "variants:\n  - {name: a, args: {--dir: '{dri}'}}\n")[1] == "variants[0].args.--dir"
    assert only_problem(BASE + "expect:\n  - {crashes: 0, variant: b}\n")[1] == "expect[0].variant"
    assert only_problem(BASE + "expect:\n  - {p99_latency: 250ms}\n")[1] == "expect[0].p99_latency"
    assert only_problem(BASE + "expect:\n  - {p99_latency: '< 1 parsec'}\n")[1] == "expect[0].p99_latency"
    assert only_problem(BASE + "expect:\n  - {crashes: 0, hosts_alive: '> 1'}\n")[1] == "expect[0]"
    assert only_problem(BASE + "expect:\n  - {hosts_alive: '>= many'}\n")[1] == "expect[0].hosts_alive"


def test_name_problems():
    assert only_problem(BASE.replace("name: t", "name: 'a b'"))[1] == "name"
    assert only_problem(BASE.replace("name: t\n", ""))[1:] == ("name", "missing required field 'name'")


def test_key_with_a_line_break_still_gives_one_line():
    line, field, message = only_problem(BASE + '"bad\\nkey": 1\n')
    assert "\n" not in field and "\n" not in message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_document(text):
    assert only_problem(text)[1:] == ("(document)", "the scenario is empty")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_document_must_be_a_mapping(text):
    line, field, message = only_problem(text)
    assert field == "(document)" and "expected a scenario mapping" in message


def test_unreadable_file(tmp_path, capsys):
    code, errors, _ = validate(capsys, tmp_path / "missing.yaml")
    assert code == 2 and len(errors) == 1 and "cannot read" in errors[0]


def test_yaml_words_stay_strings_where_strings_are_meant(tmp_path):
    """YAML 1.1 would turn yes/no/on/off into booleans: args, env, command and templates keep the words."""
    scenario = load_scenario_text(textwrap.dedent("""
        name: words
        target:
          command: [redis-server, --port, "{port}", --appendonly, no, --daemonize, off]
          env: {FEATURE: on, OTHER: yes}
          protocol: resp
          request: [CONFIG, SET, appendonly, yes]
        fleet: {hosts: 1}
        load: [{hold: {rate: 10, for: 1s}}]
        variants:
          - {name: a, args: {--appendonly: yes}}
          - {name: control, faults: off}
        """), str(tmp_path / "s.yaml"))
    assert scenario.target.command[-4:] == ("--appendonly", "no", "--daemonize", "off")
    assert scenario.target.env == {"FEATURE": "on", "OTHER": "yes"}
    assert scenario.target.requests[0].template == ("CONFIG", "SET", "appendonly", "yes")
    assert scenario.variants[0].args == {"--appendonly": "yes"}
    assert scenario.variants[1].faults is False     # a boolean field still takes the word


def test_request_mix_is_drawn_by_weight_on_its_own_stream():
    from harness.scenario.loadshape import LoadShape, PhaseSpec  # noqa: F401
    from harness.plan.streams import arrivals
    from harness.scenario.model import Keys
    scenario = load_scenario_text(textwrap.dedent("""
        name: mix
        target:
          command: [x, "{port}"]
          requests:
            - {name: a, weight: 90, request: "A {key}\\n"}
            - {name: b, weight: 10, request: "B {key}\\n"}
        fleet: {hosts: 1}
        load: [{hold: {rate: 2000, for: 5s}}]
        """), "mix.yaml")
    weights = tuple(r.weight for r in scenario.target.requests)
    mixed = list(arrivals(scenario.load, Keys(), 7, weights))
    plain = list(arrivals(scenario.load, Keys(), 7))
    # The same arrival times and keys with or without the mix; about 10% are b (binomial: 6 sigma).
    assert [(a.t, a.key) for a in mixed] == [(a.t, a.key) for a in plain]
    share = sum(a.request == 1 for a in mixed) / len(mixed)
    n = len(mixed)
    assert abs(share - 0.1) < 6 * (0.1 * 0.9 / n) ** 0.5
