"""`harness validate` as a user runs it, and the loader's promise: any input gives a Scenario or a
ScenarioError, never a traceback (property-based)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.base.errors import ScenarioError
from harness.scenario.loader import load_scenario_text

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "fixtures" / "bad_scenarios"
PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+\.ya?ml):(?P<line>\d+): (?P<field>\S+): (?P<message>\S.*)$")


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def expected_count(path: Path) -> int:
    count = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("# expect: "):
            break
        count += 1
    return count


@pytest.mark.slow
def test_bad_scenarios_directory_fails_with_one_line_per_problem():
    result = harness("validate", "tests/fixtures/bad_scenarios")
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    for line in lines:
        assert PROBLEM_LINE.match(line), f"not FILE:LINE: FIELD: message: {line!r}"
    files = sorted(BAD.glob("*.yaml"))
    assert len(lines) == sum(expected_count(path) for path in files)
    reported = {PROBLEM_LINE.match(line)["file"] for line in lines}
    assert reported == {f"tests/fixtures/bad_scenarios/{path.name}" for path in files}
    assert result.stdout == ""


@pytest.mark.slow
def test_each_bad_file_alone_exits_2():
    for path in sorted(BAD.glob("*.yaml"))[:5]:
        result = harness("validate", str(path.relative_to(ROOT)))
        assert result.returncode == 2, path.name
        assert len(result.stderr.splitlines()) == expected_count(path)


@pytest.mark.slow
def test_repo_scenarios_validate_with_exit_0():
    result = harness("validate", "scenarios")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert all(line.endswith(")") and ": ok (" in line for line in result.stdout.splitlines())
    assert len(result.stdout.splitlines()) == len(list((ROOT / "scenarios").glob("*.yaml")))


VALID = """\
name: cli-valid
seed: 3
duration: 10s
target:
  command: [./server, --port, "{port}"]
fleet: {hosts: 3, balancer: round-robin}
load:
  - {ramp: {from: 10, to: 100, over: 5s}}
  - {hold: {for: 5s}}
faults:
  - {kind: alloc-fail, mode: random, probability: 1%, hosts: 1}
expect:
  - {crashes: 0}
"""


@pytest.mark.slow
def test_valid_file_exits_0_and_mixed_exits_2(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(VALID, encoding="utf-8")
    result = harness("validate", str(good))
    assert (result.returncode, result.stderr) == (0, "")
    assert f"{good}: ok (3 hosts, 10s, 1 faults, 1 expectations)" in result.stdout
    mixed = harness("validate", str(good), "tests/fixtures/bad_scenarios/wrong-unit.yaml")
    assert mixed.returncode == 2
    assert ": ok (" in mixed.stdout
    assert mixed.stderr.splitlines() == [
        "tests/fixtures/bad_scenarios/wrong-unit.yaml:10: load[0].ramp.over: expected a duration like '30s', '250ms' "
        "or '2m', got '10 parsecs'"]


@pytest.mark.slow
def test_missing_and_binary_files_are_reported_not_raised(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x00")
    result = harness("validate", str(tmp_path / "nope.yaml"), str(binary))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 2


@pytest.mark.slow
def test_empty_directory_is_a_usage_error(tmp_path):
    result = harness("validate", str(tmp_path))
    assert result.returncode == 2 and "no scenario files" in result.stderr


# --- property-based: never a traceback ------------------------------------------------------------

def loads_or_scenario_error(text: str) -> None:
    try:
        load_scenario_text(text, "fuzz.yaml")
    except ScenarioError as exc:
        assert exc.problems, "a ScenarioError must name at least one problem"
        for problem in exc.problems:
            assert problem.file == "fuzz.yaml"
            assert isinstance(problem.line, int) and problem.line >= 1
            assert problem.field and problem.message
            assert len(str(problem).splitlines()) == 1, str(problem)
    # Anything else propagates and fails the test with its traceback.


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORDS = ["name", "seed", "duration", "target", "command", "fleet", "hosts", "load", "ramp", "hold", "spike",
         "steps", "from", "to", "over", "for", "factor", "count", "each", "faults", "kind", "host-loss",
         "alloc-fail", "lock-error", "mode", "budget", "probability", "errno", "EDEADLK", "at", "every",
         "expect", "crashes", "p99_latency", "phase", "variants", "args", "client", "keys", "zipf", "30s",
         "48MiB", "1%", "-5", "{port}", "{prot}", ".inf", ".nan", "~", "null", "true", "1e400", "2026-13-45",
         "!!int x", "!foo", "&a", "*a", "<<", "'", '"', "[", "]", "{", "}", ":", "-", ",", "#", "|", ">", "?",
         "\t", "\n", "\n  ", "\n    ", "\n- ", " "]

yamlish = st.lists(st.sampled_from(WORDS) | st.text(max_size=5), max_size=60).map("".join)


@pytest.mark.slow
@SETTINGS
@given(yamlish)
def test_random_yamlish_text_never_raises_anything_but_scenario_error(text):
    loads_or_scenario_error(text)


@SETTINGS
@given(st.text(max_size=200))
def test_random_text_never_raises_anything_but_scenario_error(text):
    loads_or_scenario_error(text)


scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["30s", "-1s", "10 parsecs", "48MiB", "1%", "150%", "1200/s", "-5", "eight", "{port}",
                              "{prot}", "EDEADLK", "ENOENT", "< 250ms", ">= 6", "all", "25%", "zipf", "kill",
                              "budget", "hold", "", "x" * 300])
           | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(WORDS[:40]) | st.text(max_size=6), inner, max_size=4),
                      max_leaves=12)

BASE = yaml.safe_load(VALID + """\
variants:
  - {name: a, args: {--x: "1"}}
client: {keys: {space: 100, distribution: zipf}}
""")


def paths_of(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths_of(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from paths_of(value, prefix + (index,))


ALL_PATHS = list(paths_of(BASE))


def mutate(data, path, action, value):
    import copy
    data = copy.deepcopy(data)
    if not path:
        return value if action == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[f"{last}x"] = value
    elif action == "add" and isinstance(parent, list):
        parent.insert(last, value)
    return data


mutations = st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["replace", "delete", "add"]), values),
                     min_size=1, max_size=3)


@pytest.mark.slow
@SETTINGS
@given(mutations)
def test_mutated_valid_scenario_never_raises_anything_but_scenario_error(changes):
    data = BASE
    for path, action, value in changes:
        try:
            data = mutate(data, path, action, value)
        except (KeyError, IndexError, TypeError):
            continue            # an earlier change removed or reshaped this path
    text = yaml.safe_dump(data, allow_unicode=True, default_flow_style=None, sort_keys=False)
    loads_or_scenario_error(text)


@SETTINGS
@given(st.integers(min_value=0, max_value=len(VALID)), st.integers(min_value=0, max_value=20),
       st.text(alphabet=st.sampled_from(list(":{}[]-,'\"#&*!|>%\n \t0123456789sm")), max_size=8))
@pytest.mark.slow
def test_text_edits_of_a_valid_scenario_never_raise_anything_but_scenario_error(position, cut, insert):
    loads_or_scenario_error(VALID[:position] + insert + VALID[position + cut:])


def test_mutation_machinery_changes_something():
    """Guard against a vacuous property: the mutations above do produce invalid scenarios."""
    changed = mutate(BASE, ("fleet", "hosts"), "replace", "eight")
    text = yaml.safe_dump(changed, sort_keys=False)
    try:
        load_scenario_text(text, "fuzz.yaml")
    except ScenarioError as exc:
        assert [p.field for p in exc.problems] == ["fleet.hosts"]
    else:
        raise AssertionError("hosts: eight was accepted")
