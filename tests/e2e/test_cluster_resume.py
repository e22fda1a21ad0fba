"""`harness resume --cluster`: a real fleet's run over a cluster, its command SIGKILLed mid-run (as
tests/e2e/test_resume.py stops a local run), finished over the cluster: the resumed trial's hosts start again on
the workers' machines, the load goes on from the second after the last committed one on the same seeded stream,
the gap is recorded, and both attempts' samples, crashes and triage are in the one store; the interrupted
attempt's folders on the machines stay as they were. And across kinds: a local run resumed over the cluster, a
cluster run resumed locally (refused in one line while a machine-loss is still ahead).

The "machines" are two Dask workers in their own network namespaces (netns_machines), as in
test_cluster_fleet.py."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.plan.streams import arrivals
from harness.scenario.loader import load_scenario

import netns_machines as netns
from conftest import pid_alive, query, wait_for, wait_for_run
from dask_local import echo_target, namespaced_cluster
from test_cluster_fleet_faults import _leftovers

REPO = Path(__file__).resolve().parents[2]
HARNESS = [sys.executable, "-m", "harness"]
ESTATS = REPO / "targets" / "estats" / "estats-server"
ECHO_SERVER = REPO / "targets" / "echo" / "echo-server"

# 2 estats hosts (one a machine) whose heap budget the spike overruns: each crashes (SIGSEGV, a core) and
# restarts, again and again, in both attempts. Every core is kept (no sampling out) so that every crash's triage
# can be asked for.
CRASHY = f"""
name: cluster-resume-crashy
seed: 99
target:
  root: {REPO}
  build: [make, -s, -C, targets/estats]
  command: [targets/estats/estats-server, --port, "{{port}}", --host, "{{addr}}", --estats, "on",
            --service-ms, "20", --scratch-kb, "16", --stats-kb, "4"]
  restart: {{policy: always, backoff: 300ms}}
  expect_reply: "^OK"
fleet: {{hosts: 2, balancer: least-loaded, placement: spread}}
client: {{timeout: 1s, connections: 2}}
cores: {{keep_per_bucket: 1000}}
load:
  - {{hold: {{rate: 150, for: 2s}}}}
  - {{spike: {{factor: 4, for: 8s, name: midnight}}}}
faults:
  - {{kind: alloc-fail, mode: budget, budget: 300KiB, spread: 30%}}
"""

ECHO = f"""
name: cluster-resume-echo
seed: 21
{echo_target()}fleet: {{hosts: 2, placement: spread}}
client: {{timeout: 500ms}}
load:
  - {{hold: {{rate: 200, for: 8s}}}}
FAULTS
"""


@pytest.fixture(scope="module")
def machines() -> Iterator[tuple[netns.Machines, str]]:
    with namespaced_cluster() as made_and_address:
        yield made_and_address


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*HARNESS, *args, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)


def _kill_when(run: subprocess.Popen[str], results: Path, condition) -> Path:
    """SIGKILL the command once `condition(run_dir)` holds (as a reboot or the OOM killer would stop it)."""
    try:
        run_dir = wait_for_run(results)
        wait_for(lambda: condition(run_dir), timeout=120)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return run_dir


def _resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, "resume", str(run_dir), "--quiet", *extra], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def _snapshot(run_dir: Path) -> dict[str, set]:
    return {"crashes": {(r["uid"], r["t"], r["core_path"]) for r in query(run_dir, "SELECT * FROM crashes")},
            "samples": {(r["t"], r["offered"], r["ok"]) for r in query(run_dir, "SELECT * FROM samples")},
            "events": {(r["id"], r["kind"], r["t"]) for r in query(run_dir, "SELECT * FROM events")}}


def _assert_the_plan_goes_on(scenario: Path, run_dir: Path, resumed_at: int) -> None:
    """Every arrival the seeded plan has from the resumed second on was sent after the gap, exactly once (by
    whichever driver sent it: shards on the machines, or this machine's driver)."""
    plan = load_scenario(scenario)
    planned = sum(1 for a in arrivals(plan.load, plan.client.keys, plan.seed) if a.t >= resumed_at)
    sent = query(run_dir, "SELECT SUM(offered) AS n FROM samples WHERE t >= ?", (resumed_at,))[0]["n"]
    assert sent == planned > 0


def _forget_triage(run_dir: Path) -> set[str]:
    """One crash a machine left without its triage row (its core still on its machine): their uids."""
    chosen = {}
    for row in query(run_dir, "SELECT uid, detail FROM crashes WHERE core_path IS NOT NULL ORDER BY t"):
        chosen.setdefault(json.loads(row["detail"])["machine"]["machine"], row["uid"])
    db = sqlite3.connect(str(run_dir / "run.db"))
    try:
        with db:
            db.executemany("DELETE FROM triage WHERE uid = ?", [(uid,) for uid in chosen.values()])
    finally:
        db.close()
    assert len(chosen) == 2
    return set(chosen.values())


def _nothing_left(made: netns.Machines, *programs: Path) -> None:
    try:
        wait_for(lambda: not _leftovers(made, *programs), timeout=60, interval=0.5)
    except AssertionError:
        raise AssertionError(f"left running on the machines: {_leftovers(made, *programs)}") from None


def _seconds(run_dir: Path) -> list[int]:
    return sorted(r["t"] for r in query(run_dir, "SELECT t FROM samples WHERE span=1"))


def _covered(run_dir: Path, seconds: int) -> bool:
    """Every second of the load sampled exactly once (and perhaps the last partial one after it)."""
    covered = _seconds(run_dir)
    return covered == list(range(len(covered))) and len(covered) >= seconds


@pytest.mark.slow
def test_a_cluster_run_killed_mid_run_is_finished_over_the_cluster(tmp_path: Path, machines) -> None:
    made, address = machines
    scenario = tmp_path / "crashy.yaml"
    scenario.write_text(CRASHY, encoding="utf-8")
    results = tmp_path / "results"
    first = _start(["run", str(scenario), "--out", str(results), "--cluster", address])
    # killed with 4 seconds of load committed and crashes on both machines
    run_dir = _kill_when(first, results, lambda d: len(query(d, "SELECT t FROM samples")) >= 4 and len(
        {json.loads(r["detail"])["machine"]["machine"] for r in query(d, "SELECT detail FROM crashes")}) == 2)
    # A core whose triage had not come back when the command died is triaged by the resumed run, on the machine
    # that kept it. Triage is quick here (its row comes with the crash's), so that state is made: one crash of
    # each machine loses its triage row, as if the kill had come a moment earlier.
    untriaged = _forget_triage(run_dir)
    before = _snapshot(run_dir)
    first_pids = {r["pid"] for r in query(run_dir, "SELECT pid FROM events WHERE kind='start'")}
    assert query(run_dir, "SELECT status FROM runs")[0]["status"] == "running"      # as a SIGKILL leaves it

    resumed = _resume(run_dir, "--json", "--cluster", address)
    assert resumed.returncode in (0, 1) and "Traceback" not in resumed.stderr, resumed.stderr
    final = json.loads(resumed.stdout)
    assert final["status"] == "complete"
    (trial,) = final["trials"]
    assert trial["status"] == "complete"

    after = _snapshot(run_dir)
    for key in ("crashes", "samples", "events"):          # nothing committed before the kill lost or changed
        assert before[key] <= after[key], key
    (gap,) = trial["gaps"]
    assert gap["resumed_at"] == max(t for t, _, _ in before["samples"]) + 1
    # every second of the load exactly once, the ones after the resume sent from the machines again
    assert _covered(run_dir, 10), _seconds(run_dir)
    resumed_at = gap["resumed_at"]
    _assert_the_plan_goes_on(scenario, run_dir, resumed_at)

    # the resumed attempt's hosts: new processes, on both machines, in a trial folder of their own there
    detail = json.loads(query(run_dir, "SELECT detail FROM trials")[0]["detail"])
    assert detail["machines_from"] == resumed_at
    assert {m["addr"] for m in detail["machines"]} == set(made.addresses)
    later_starts = {r["pid"] for r in query(run_dir, "SELECT pid FROM events WHERE kind='start' AND t >= ?",
                                            (resumed_at - 60,))} - first_pids
    assert later_starts
    placements = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events "
                                                                  "WHERE kind='placement' ORDER BY id")]
    assert [p["from"] for p in placements] == [0, resumed_at]

    # crashes of both attempts in the one store, each core where its attempt's hosts ran on its machine
    # (the interrupted attempt's crash rows may be later than the resumed second: it ran on past its last
    # committed sample)
    crashes = query(run_dir, "SELECT uid, t, host, core_path, detail FROM crashes")
    first_uids = {uid for uid, _, _ in before["crashes"]}
    earlier = [c for c in crashes if c["uid"] in first_uids]
    later = [c for c in crashes if c["uid"] not in first_uids]
    assert earlier and later, [(c["t"], c["host"]) for c in crashes]
    assert all(c["t"] >= resumed_at for c in later)
    # (a core is not collected while another test on this machine has a core_pattern pipe handler installed
    # that does not keep estats' cores: its crash row says so; the others are checked)
    cored = [c for c in crashes if c["core_path"] is not None]
    assert any(c in earlier for c in cored) and any(c in later for c in cored)
    for crash in cored:
        number = json.loads(crash["detail"])["machine"]["machine"]
        folder = "t1" if crash in earlier else f"t1-from{resumed_at}s"
        assert Path(crash["core_path"]).is_relative_to(run_dir / "machines" / f"m{number}" / "hosts" / folder), \
            (crash["t"], crash["core_path"])
    # what the interrupted attempt left on the machines is still there: its cores and the hosts' logs
    for crash in earlier:
        if crash["core_path"] is not None:
            assert Path(crash["core_path"]).is_file(), crash["core_path"]
    assert list((run_dir / "machines").glob("m*/hosts/t1/*/stderr.log"))
    # every core triaged, those the interrupted attempt had not finished too (by the machine that kept the core)
    triaged = {r["uid"]: r for r in query(run_dir, "SELECT uid, crash_class FROM triage")}
    assert untriaged <= set(triaged)
    assert {c["uid"] for c in cored} <= set(triaged)
    assert {triaged[c["uid"]]["crash_class"] for c in cored} == {"null-deref"}
    assert trial["crashes_total"] == len(crashes)

    report = subprocess.run([*HARNESS, "report", str(run_dir)], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert report.returncode in (0, 1) and "Traceback" not in report.stderr, report.stderr
    assert f"gap: the harness stopped and was resumed at {resumed_at}s" in report.stdout
    assert f"0-{resumed_at}s (before a resume):" in report.stdout
    assert f"from {resumed_at}s (resumed over the cluster):" in report.stdout
    _nothing_left(made, ESTATS)
    assert not any(pid_alive(p) for p in first_pids | later_starts if p)


def _run_then_kill(scenario: Path, out: Path, *extra: str) -> Path:
    """The scenario run (with 3 seconds of load committed) until SIGKILLed."""
    return _kill_when(_start(["run", str(scenario), "--out", str(out), *extra]), out,
                      lambda d: len(query(d, "SELECT t FROM samples")) >= 3)


def _gap(run_dir: Path) -> dict:
    (gap,) = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='gap'")]
    return gap


@pytest.mark.slow
def test_a_local_run_is_finished_over_the_cluster(tmp_path: Path, machines) -> None:
    """The scenario is the same: a run stopped on one machine goes on on the cluster's machines, from the second
    after its last committed one; the host-loss already past is not done again."""
    made, address = machines
    scenario = tmp_path / "echo.yaml"
    scenario.write_text(ECHO.replace("FAULTS", "faults:\n  - {kind: host-loss, at: 1s, hosts: 1, how: kill, "
                                               "down_for: 1s}"), encoding="utf-8")
    local = _run_then_kill(scenario, tmp_path / "local")
    resumed = _resume(local, "--cluster", address)
    assert resumed.returncode == 0, resumed.stderr
    gap = _gap(local)
    assert _covered(local, 8), _seconds(local)
    _assert_the_plan_goes_on(scenario, local, gap["resumed_at"])
    detail = json.loads(query(local, "SELECT detail FROM trials")[0]["detail"])
    assert detail["machines_from"] == gap["resumed_at"] and len(detail["machines"]) == 2
    by_host = query(local, "SELECT t, host, ok FROM host_samples WHERE t >= ?", (gap["resumed_at"],))
    assert {r["host"] for r in by_host if r["ok"]} == {0, 1}        # the machines' hosts served the rest
    losses = query(local, "SELECT t FROM events WHERE kind='host-loss'")
    assert [round(r["t"]) for r in losses] == [1]                   # once, before the kill
    assert f"0-{gap['resumed_at']}s (before a resume): on the command's machine (a local run)" in resumed.stdout
    assert f"from {gap['resumed_at']}s (resumed over the cluster):" in resumed.stdout
    _nothing_left(made, ECHO_SERVER)


@pytest.mark.slow
def test_a_machine_loss_still_ahead_needs_the_cluster_and_happens_there(tmp_path: Path, machines) -> None:
    """Killed before its machine-loss (7 s): a local resume cannot lose a machine and says so in one line; over
    the cluster the loss comes in the resumed attempt, on the trial's clock, and the survivors take the load."""
    made, address = machines
    scenario = tmp_path / "echo.yaml"
    scenario.write_text(ECHO.replace("FAULTS", "faults:\n  - {kind: machine-loss, at: 7s, machine: 2}")
                        .replace("for: 8s", "for: 10s"), encoding="utf-8")
    run_dir = _run_then_kill(scenario, tmp_path / "results", "--cluster", address)
    assert _seconds(run_dir)[-1] + 1 <= 7, "killed after the machine-loss: nothing is ahead"
    refused = _resume(run_dir)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "harness: error: faults[0]: machine-loss needs --cluster (the hosts spread over cluster workers' machines): "
        f"resume it with --cluster (it goes on from {_seconds(run_dir)[-1] + 1}s)"]
    resumed = _resume(run_dir, "--cluster", address, "--json")
    assert resumed.returncode == 0, resumed.stderr
    gap = _gap(run_dir)
    assert _covered(run_dir, 10), _seconds(run_dir)
    # what the lost machine's shard had counted since its last report went with it (the takeover says which
    # seconds): every other arrival of the plan from the resumed second on was sent and counted once
    (takeover,) = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events "
                                                                  "WHERE kind='driver-takeover'")]
    first, until = takeover["counts_lost"]
    assert gap["resumed_at"] <= first <= 7 < until
    plan = load_scenario(scenario)
    planned = [a.t for a in arrivals(plan.load, plan.client.keys, plan.seed) if a.t >= gap["resumed_at"]]
    sent = query(run_dir, "SELECT SUM(offered) AS n FROM samples WHERE t >= ?", (gap["resumed_at"],))[0]["n"]
    assert len(planned) - sum(1 for t in planned if first <= t < until + 1) <= sent <= len(planned)
    (loss,) = query(run_dir, "SELECT t, detail FROM events WHERE kind='machine-loss'")
    assert 7 <= loss["t"] < 8 and json.loads(loss["detail"])["machine"] == 2
    placed = {m["machine"]: m for m in json.loads(query(run_dir, "SELECT detail FROM trials")[0]["detail"])
              ["machines"]}
    assert placed[2]["lost"] == "machine-loss" and placed[1]["lost"] is None
    # in the report: the resumed stretch's shares split at the loss; after it, m1's hosts served it all
    section = json.loads(resumed.stdout)["trials"][0]["machines"]
    assert section["from"] == gap["resumed_at"] and section["earlier"][0]["from"] == 0
    (before, after) = section["shares"]
    assert before["from"] == gap["resumed_at"] and before["to"] == 7 and after["from"] == 8
    assert after["share"] == {"1": 1.0, "2": 0.0} and before["share"]["2"] > 0
    _nothing_left(made, ECHO_SERVER)


@pytest.mark.slow
def test_a_cluster_run_is_finished_locally_once_its_machine_loss_is_past(tmp_path: Path, machines) -> None:
    made, address = machines
    scenario = tmp_path / "echo.yaml"
    scenario.write_text(ECHO.replace("FAULTS", "faults:\n  - {kind: machine-loss, at: 1s, machine: 2}"),
                        encoding="utf-8")
    run_dir = _run_then_kill(scenario, tmp_path / "results", "--cluster", address)
    back = _resume(run_dir)
    assert back.returncode == 0, back.stderr
    assert _covered(run_dir, 8), _seconds(run_dir)
    gap = _gap(run_dir)
    _assert_the_plan_goes_on(scenario, run_dir, gap["resumed_at"])
    by_host = query(run_dir, "SELECT t, host, ok FROM host_samples WHERE t >= ?", (gap["resumed_at"],))
    assert {r["host"] for r in by_host if r["ok"]} == {0, 1}        # both hosts again, here
    assert len(query(run_dir, "SELECT * FROM events WHERE kind='machine-loss'")) == 1
    # the stretch on the machines (with its loss) and the local one after it, in the report
    assert f"0-{gap['resumed_at']}s (before a resume):" in back.stdout
    assert "lost at 1." in back.stdout
    assert f"from {gap['resumed_at']}s (resumed without --cluster): on the command's machine" in back.stdout
    assert "(before a resume): on the command's machine" not in back.stdout
    _nothing_left(made, ECHO_SERVER)
