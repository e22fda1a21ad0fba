"""The harness against targets that misbehave (targets/unruly): it survives them and leaves no
process behind, however the run ends.

Every run here is a few seconds of light load on real processes. Nothing depends on a timing
margin: we wait for conditions with generous deadlines. Whatever happens, the teardown kills every
process still working in the test's folder (and the harness), so a failing test leaves nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import (HARNESS, REPO, host_pids, pid_alive, query, run_dir_of, start_harness, wait_for,
                      wait_for_run, write_scenario)

UNRULY = REPO / "targets" / "unruly" / "unruly-server"
STOP_GRACE = 1.0


def scenario(directory: Path, name: str, flags: list[str], *, hosts: int = 2, load: str = "2s", rate: int = 100,
             extra: str = "", command: str | None = None) -> Path:
    argv = command or json.dumps([str(UNRULY), "--port", "{port}", *flags])
    return write_scenario(directory, f"""
name: {name}
seed: 3
target:
  root: @REPO@
  command: {argv}
  stop_grace: {STOP_GRACE}s
{extra}
fleet: {{hosts: {hosts}}}
client: {{timeout: 500ms, connections: 2}}
load: [{{hold: {{rate: {rate}, for: {load}}}}}]
""")


def run_harness(args: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- finding processes


def _is_unruly(pid: int) -> bool:
    """Guards the pids read from files against reuse (pid_max may be small)."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(UNRULY)
    except OSError:
        return False


def processes_under(folder: Path) -> set[int]:
    """Live processes whose working directory is in `folder` (hosts run in their own folders)."""
    found = set()
    prefix = str(folder.resolve())
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue  # gone, or a zombie
        if (cwd == prefix or cwd.startswith(prefix + "/")) and pid_alive(int(name)):
            found.add(int(name))
    return found


def recorded_pids(run_dir: Path) -> set[int]:
    """Every target process of the run: the leaders the store recorded, and every process the
    target itself listed in its `pids` file (children, and the one that escaped with setsid)."""
    pids = set(host_pids(run_dir))
    for listing in run_dir.glob("hosts/t*/h*/pids"):
        pids.update(int(line) for line in listing.read_text().split())
    return pids


def leftovers(run_dir: Path) -> set[int]:
    alive = {pid for pid in recorded_pids(run_dir) if pid_alive(pid) and _is_unruly(pid)}
    return alive | processes_under(run_dir)


def _describe(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        return (f"pid {pid} pgid {os.getpgid(pid)} sid {os.getsid(pid)} ppid {process.ppid()} "
                f"cwd {process.cwd()}: {' '.join(process.cmdline())}")
    except (psutil.Error, OSError):
        return f"pid {pid} (gone)"


def assert_no_leftovers(run_dir: Path, timeout: float = 10) -> None:
    """Killed processes take a moment to go; ones nobody killed never do."""
    deadline = time.monotonic() + timeout
    while left := leftovers(run_dir):
        if time.monotonic() > deadline:
            raise AssertionError("left running:\n" + "\n".join(_describe(pid) for pid in sorted(left)))
        time.sleep(0.05)


def all_forked(run_dir: Path, hosts: int, per_host: int) -> bool:
    listings = list(run_dir.glob("hosts/t1/h*/pids"))
    return len(listings) == hosts and all(len(p.read_text().split()) >= per_host for p in listings)


@pytest.fixture(autouse=True)
def kill_what_is_left(tmp_path: Path) -> Iterator[None]:
    """Safety net: whatever a failing test left running in its folder is killed."""
    yield
    victims = processes_under(tmp_path)
    for run_dir in tmp_path.glob("results/*"):
        victims |= {pid for pid in recorded_pids(run_dir) if pid_alive(pid) and _is_unruly(pid)}
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- 1. SIGTERM ignored


@pytest.mark.slow
def test_target_ignoring_sigterm_is_killed_after_stop_grace(targets: Path, tmp_path: Path) -> None:
    path = scenario(tmp_path, "ignores-sigterm", ["--ignore-sigterm", "--fork-children", "1"])
    result = run_harness(["run", str(path), "--out", str(tmp_path / "results"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    run_dir = run_dir_of(tmp_path / "results")
    assert run_dir is not None
    stops = query(run_dir, "SELECT host, wall, detail FROM events WHERE kind='stop' ORDER BY host")
    assert [row["host"] for row in stops] == [0, 1]
    for row in stops:
        # SIGTERM first (the target reports when it came), SIGKILL no sooner than stop_grace later.
        assert json.loads(row["detail"])["how"] == "killed by SIGKILL"
        stderr = (run_dir / "hosts" / "t1" / f"h{row['host']}" / "stderr.log").read_text()
        term_at = [float(at) for at in re.findall(r"SIGTERM ignored \(at ([0-9.]+)\)", stderr)]
        assert term_at, stderr[-1000:]
        assert row["wall"] - min(term_at) >= STOP_GRACE - 0.01  # clock granularity only
    assert query(run_dir, "SELECT count(*) AS n FROM crashes")[0]["n"] == 0  # our own SIGKILL is no crash
    assert_no_leftovers(run_dir)


# --------------------------------------------------------------------------- 2. forked children

FORKING = ["--fork-children", "2", "--setsid-child"]
PER_HOST = 4  # the leader, two children in its group, one that escaped it


@pytest.mark.slow
@pytest.mark.parametrize("ending,code", [("complete", 0), ("SIGINT", 130), ("SIGTERM", 143)])
def test_forked_children_do_not_outlive_the_run(targets: Path, tmp_path: Path, ending: str, code: int) -> None:
    path = scenario(tmp_path, "forks", FORKING, load="2s" if ending == "complete" else "60s")
    results = tmp_path / "results"
    proc = start_harness(["run", str(path), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results)
        wait_for(lambda: all_forked(run_dir, 2, PER_HOST))
        assert len(leftovers(run_dir)) == 2 * PER_HOST  # all there, escaped one included
        if ending != "complete":
            wait_for(lambda: query(run_dir, "SELECT * FROM samples"))
            proc.send_signal(getattr(signal, ending))
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert_no_leftovers(run_dir)


def _watchdog_of(harness_pid: int) -> psutil.Process:
    def find() -> psutil.Process | None:
        for child in psutil.Process(harness_pid).children():
            if any(arg.endswith("reaper.py") for arg in child.cmdline()):
                return child
        return None
    found = wait_for(find, timeout=30)
    assert isinstance(found, psutil.Process)
    return found


@pytest.mark.slow
def test_sigkill_of_harness_leaves_no_child_or_grandchild(targets: Path, tmp_path: Path) -> None:
    path = scenario(tmp_path, "forks-sigkill", FORKING, load="60s")
    results = tmp_path / "results"
    proc = start_harness(["run", str(path), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=1)
        wait_for(lambda: all_forked(run_dir, 2, PER_HOST))
        proc.kill()
        proc.wait(timeout=30)
    finally:
        stop(proc)
    # The leaders die of their parent-death signal; their children (in the group or escaped) have
    # none, and are killed by the harness's watchdog.
    assert_no_leftovers(run_dir, timeout=15)


@pytest.mark.slow
# Serial: its orphans are machine-wide state, reaped (and reported, one more stderr line) by whichever
# harness starts next, on any worker.
@pytest.mark.serial
def test_leftovers_of_a_harness_killed_with_its_watchdog_are_reaped_by_the_next_run(
        targets: Path, tmp_path: Path) -> None:
    # Without PID namespaces (isolation: none) this is the last line of defence; with them (the default as
    # root) nothing is left to reap: see test_nothing_of_a_host_survives_the_harness_and_its_watchdog.
    path = scenario(tmp_path, "forks-all-killed", FORKING, load="60s", extra="  isolation: none")
    results = tmp_path / "results"
    proc = start_harness(["run", str(path), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=1)
        wait_for(lambda: all_forked(run_dir, 2, PER_HOST))
        _watchdog_of(proc.pid).kill()
        proc.kill()
        proc.wait(timeout=30)
    finally:
        stop(proc)
    leaders = set(host_pids(run_dir))
    wait_for(lambda: not any(pid_alive(pid) for pid in leaders), timeout=10)  # PR_SET_PDEATHSIG
    # What remains: what the parent-death signal does not reach (documented behaviour).
    orphans = leftovers(run_dir)
    assert len(orphans) == 2 * (PER_HOST - 1), orphans
    # The next run, of anything, kills them first and says so.
    later = scenario(tmp_path, "next", [], hosts=1, load="500ms")
    result = run_harness(["run", str(later), "--out", str(tmp_path / "later"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    reaped = re.search(r"killed (\d+) leftover processes of a harness that was killed \(pids ([0-9 ]+)\)",
                       result.stderr)
    # Their deaths are what matters: another harness starting on this machine meanwhile (another
    # test suite) may have reaped some first.
    if reaped is not None:
        assert {int(pid) for pid in reaped[2].split()} <= orphans
    assert_no_leftovers(run_dir)


SH_WAIT = json.dumps(["sh", "-c", f"{UNRULY} --port {{port}} --fork-children 1 --setsid-child & wait"])


@pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root")
def test_nothing_of_a_host_survives_the_harness_and_its_watchdog(targets: Path, tmp_path: Path) -> None:
    """A target started as `sh -c 'server & wait'` (the server forks, and one child escapes with setsid):
    SIGKILL the harness and its watchdog together, and no process of it survives. Nothing of the harness
    is left to kill them: the host's PID namespace goes with its anchor's parent-death signal."""
    path = scenario(tmp_path, "sh-wait", [], hosts=2, load="60s", command=SH_WAIT)
    results = tmp_path / "results"
    proc = start_harness(["run", str(path), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=1)
        wait_for(lambda: all_forked(run_dir, 2, 3))      # the server, its child, the escaped one
        shells = set(host_pids(run_dir))
        starts = [json.loads(r["detail"]) for r in query(run_dir, "SELECT detail FROM events WHERE kind='start'")]
        assert all(s["isolation"]["pid_namespace"] for s in starts), starts
        assert len(leftovers(run_dir)) == 2 * 4 and all(pid_alive(p) for p in shells)   # with the shells
        _watchdog_of(proc.pid).kill()
        proc.kill()
        proc.wait(timeout=30)
    finally:
        stop(proc)
    wait_for(lambda: not leftovers(run_dir) and not any(pid_alive(p) for p in shells), timeout=15)


# --------------------------------------------------------------------------- 3. hangs on start

# Host h1 hangs (and ignores SIGTERM); h0 is fine.
HANG_H1 = json.dumps(["sh", "-c", 'if [ {index} = 1 ]; then set -- --hang-on-start --ignore-sigterm; else set --; fi; '
                      f'exec {UNRULY} --port {{port}} "$@"'])


@pytest.mark.slow
def test_target_hanging_on_start_is_one_clear_error(targets: Path, tmp_path: Path) -> None:
    path = scenario(tmp_path, "hangs", [], command=HANG_H1, extra="  ready: {tcp: \"{port}\", timeout: 1s}")
    result = run_harness(["run", str(path), "--out", str(tmp_path / "results"), "--quiet"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    run_dir = run_dir_of(tmp_path / "results")
    assert run_dir is not None
    assert lines[0].startswith("harness: error: target failed to start: h1 did not accept connections on port ")
    # The folder named is the hung host's, where its logs are.
    assert lines[0].endswith(f"(see {run_dir / 'hosts' / 't1' / 'h1'}/)")
    assert_no_leftovers(run_dir)


# First incarnation serves 500 ms then exits 1; every later one hangs.
HANG_LATER = json.dumps(["sh", "-c", f'if [ -e started ]; then set -- --hang-on-start; else touch started; '
                         f'set -- --exit-after 0.5; fi; exec {UNRULY} --port {{port}} "$@"'])


@pytest.mark.slow
def test_target_hanging_on_restart_is_retried_with_backoff(targets: Path, tmp_path: Path) -> None:
    """Only a first start that fails is fatal (a misconfigured target); a host that hangs later is
    killed at ready.timeout and restarted per policy, as a supervisor would."""
    path = scenario(tmp_path, "hangs-later", [], hosts=1, load="3s", command=HANG_LATER, extra="""\
  ready: {tcp: "{port}", timeout: 500ms}
  restart: {policy: always, backoff: 100ms, max_backoff: 400ms}""")
    result = run_harness(["run", str(path), "--out", str(tmp_path / "results"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    timeouts = query(run_dir, "SELECT pid FROM events WHERE kind='ready-timeout'")
    assert len(timeouts) >= 2
    exits = {row["pid"]: json.loads(row["detail"]) for row in query(run_dir, "SELECT * FROM events WHERE kind='exit'")}
    for row in timeouts:
        assert exits[row["pid"]]["cause"] == "ready-timeout" and exits[row["pid"]]["signal"] == signal.SIGKILL
    assert query(run_dir, "SELECT count(*) AS n FROM crashes")[0]["n"] == 0
    assert_no_leftovers(run_dir)


# --------------------------------------------------------------------------- 4. floods its output

LOG_MAX = 2 * 1024 * 1024


@pytest.mark.slow
def test_target_flooding_output_costs_no_harness_memory_and_keeps_results(targets: Path, tmp_path: Path) -> None:
    # The end of the load races the sampler's log rotation (slow here): before the fix, a sampler
    # caught in it recorded an extra second with every host already stopped. Timing-dependent;
    # this seed, rate and length hit it in 4 runs out of 4 before the fix.
    path = scenario(tmp_path, "floods", ["--flood"], load="4s", rate=200, extra="""\
  log_max: 2MiB
expect:
  - {hosts_alive: ">= 2"}
  - {error_rate: "< 1%"}""")
    results = tmp_path / "results"
    proc = start_harness(["run", str(path), "--out", str(results), "--quiet"], tmp_path)
    peak_rss = 0
    try:
        harness = psutil.Process(proc.pid)
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                peak_rss = max(peak_rss, harness.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]  # expectations held: no spurious dead second
    assert 0 < peak_rss < 300 * 1024 * 1024
    run_dir = run_dir_of(results)
    assert run_dir is not None
    for host in ("h0", "h1"):
        for log in ("stdout.log", "stderr.log"):
            rotated = run_dir / "hosts" / "t1" / host / (log + ".1")
            assert rotated.exists(), f"{host}/{log} reached log_max and was rotated"
            assert rotated.stat().st_size <= LOG_MAX and (rotated.parent / log).stat().st_size <= LOG_MAX
            assert b"flood line" in rotated.read_bytes()[-4096:]
    report = run_harness(["report", str(run_dir), "--json"], tmp_path)
    assert report.returncode == 0, report.stderr
    trial = json.loads(report.stdout)["trials"][0]
    assert trial["status"] == "complete"
    assert trial["overall"]["ok"] > 0 and trial["overall"]["errors"]["bad_reply"] == 0
    assert trial["overall"]["hosts_alive_min"] == 2
    # One row per second of load, every host alive in each. Replies that arrive after the last second
    # was sampled (a busy machine) may add one drain row: outcomes only, no arrivals, hosts still alive.
    samples = query(run_dir, "SELECT t, hosts_alive, offered FROM samples ORDER BY t")
    seconds = [row["t"] for row in samples]
    assert seconds in ([0, 1, 2, 3], [0, 1, 2, 3, 4]), seconds
    if len(samples) == 5:
        assert samples[4]["offered"] == 0, dict(samples[4])
    assert all(row["hosts_alive"] == 2 for row in samples)
    assert_no_leftovers(run_dir)


# --------------------------------------------------------------------------- 5. exits in a loop


@pytest.mark.slow
def test_target_exiting_in_a_loop_is_restarted_with_backoff(targets: Path, tmp_path: Path) -> None:
    path = scenario(tmp_path, "exits", ["--exit-after", "0.3"], load="3s", extra="""\
  restart: {policy: always, backoff: 100ms, max_backoff: 400ms, reset_after: 30s}
expect:
  - {crashes: 0}""")
    result = run_harness(["run", str(path), "--out", str(tmp_path / "results"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    run_dir = Path(report["run_dir"])
    assert report["trials"][0]["status"] == "complete"
    events = query(run_dir, "SELECT t, kind, host, detail FROM events WHERE kind IN ('start', 'exit') ORDER BY id")
    for host in (0, 1):
        mine = [(row["t"], row["kind"], json.loads(row["detail"])) for row in events if row["host"] == host]
        exits = [(t, detail) for t, kind, detail in mine if kind == "exit"]
        starts = [t for t, kind, _ in mine if kind == "start"]
        assert len(exits) >= 3, mine
        assert all(d["exit_code"] == 1 and d["signal"] is None for _, d in exits)  # an exit, not a crash
        # Each restart waited at least its backoff, doubling from 100 ms up to 400 ms.
        for failures, ((exit_t, _), start_t) in enumerate(zip(exits, starts[1:]), start=1):
            backoff = min(0.1 * 2 ** (failures - 1), 0.4)
            assert start_t - exit_t >= backoff - 0.005, (failures, exit_t, start_t)
    assert report["trials"][0]["restarts"] >= 6
    assert query(run_dir, "SELECT count(*) AS n FROM crashes")[0]["n"] == 0
    assert_no_leftovers(run_dir)


# --------------------------------------------------------------------------- the reaper itself


def test_reaper_kills_only_tagged_processes_of_dead_owners(tmp_path: Path) -> None:
    from harness.run import reaper
    me = reaper.owner_id()
    namespace, pid, start = me.split(".")
    dead = f"{namespace}.{pid}.{int(start) + 1}"          # this pid, another start time: a reused pid
    elsewhere = f"not-{namespace}.{pid}.{int(start) + 1}"  # another pid namespace: cannot be judged
    tags = {"live": f"{me}/1/1", "dead": f"{dead}/1/1", "elsewhere": f"{elsewhere}/1/1", "untagged": None}
    procs = {}
    try:
        for name, tag in tags.items():
            env = dict(os.environ)
            env.pop(reaper.TAG_VAR, None)
            if tag:
                env[reaper.TAG_VAR] = tag
            procs[name] = subprocess.Popen(["sleep", "60"], env=env, cwd=tmp_path)
        wait_for(lambda: all(reaper.read_tag(p.pid) == tags[n] for n, p in procs.items() if tags[n]))
        reaper.kill_orphans()
        assert procs["dead"].wait(timeout=10) == -signal.SIGKILL
        assert all(procs[n].poll() is None for n in ("live", "elsewhere", "untagged"))
        assert reaper.kill_spawn(f"{me}/1/2") == []  # another spawn of a live owner: untouched
        assert reaper.kill_owned(f"{me}/2") == []  # another spawner of a live owner: untouched
        assert reaper.kill_owned(f"{me}/1") == [procs["live"].pid]
        assert procs["live"].wait(timeout=10) == -signal.SIGKILL
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
