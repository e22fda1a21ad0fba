"""End-to-end runs on real processes: host loss, rebalancing, restarts, crashes, signals, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import (HARNESS, host_pids, pid_alive, query, require_serial, run_dir_of, start_harness, wait_for,
                      wait_for_run, write_scenario)

ECHO_FLEET = """
name: e2e-echo
seed: 11
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{port}"]
  restart: {policy: always, backoff: 200ms}
fleet: {hosts: 4, balancer: round-robin}
client: {timeout: 400ms, connections: 2}
"""


def run_harness(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_host_loss_moves_share_and_counts_paused_timeouts(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, ECHO_FLEET + """
load:
  - {hold: {rate: 400, for: 8s}}
faults:
  - {kind: host-loss, at: 2s, hosts: 1, how: kill, down_for: 30s}
  - {kind: host-loss, at: 5s, hosts: 1, how: pause, for: 1500ms}
expect:
  - {crashes: 0}
  - {hosts_alive: ">= 3"}
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "results"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "Traceback" not in result.stderr
    run_dir = Path(report["run_dir"])
    trial = report["trials"][0]
    losses = trial["host_losses"]
    assert [loss["how"] for loss in losses] == ["kill", "pause"]
    killed = losses[0]["hosts"][0]
    paused = losses[1]["hosts"][0]
    assert killed != paused

    rows = query(run_dir, "SELECT t, host, sent, state FROM host_samples WHERE trial=1 ORDER BY t, host")
    sent = {(r["t"], r["host"]): r["sent"] for r in rows}
    # Before the kill every host gets its share. Within the second of the kill (t=2s) the killed
    # host stops getting requests, and from then on the survivors take its share.
    before = sum(sent[(t, h)] for t in (0, 1) for h in range(4)) / 4  # per host, 2 s
    assert all(sent[(t, h)] > 30 for t in (0, 1) for h in range(4))
    assert sent[(2, killed)] < 0.1 * before / 2
    assert sent[(3, killed)] == 0 and sent[(4, killed)] == 0
    for host in range(4):
        if host != killed:
            after = sent[(3, host)] + sent[(4, host)]
            assert after > 1.15 * before, (host, after, before)  # expected ratio 4/3
    # The paused host's requests time out and are counted, not lost.
    samples = query(run_dir, "SELECT * FROM samples WHERE trial=1 ORDER BY t")
    timeouts = sum(s["timeout"] for s in samples)
    assert timeouts > 0
    offered = sum(s["offered"] for s in samples)
    accounted = sum(s["ok"] + s["timeout"] + s["conn_error"] + s["no_host"] + s["bad_reply"] for s in samples)
    assert offered == accounted, "every arrival ends as ok or a counted error"
    states = {r["state"] for r in rows if r["host"] == paused and r["t"] in (5, 6)}
    assert states & {"paused", "ejected"}
    # Expectations evaluated and printed.
    assert all(e["held"] for e in report["expectations"])
    assert not any(pid_alive(pid) for pid in host_pids(run_dir))


@pytest.mark.slow
def test_crash_is_recorded_with_core_and_host_restarted(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, ECHO_FLEET + """
load:
  - {hold: {rate: 100, for: 60s}}
expect:
  - {crashes: 0}
""")
    results = tmp_path / "results"
    proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=1)
        victim = query(run_dir, "SELECT host, pid FROM events WHERE kind='ready' ORDER BY host LIMIT 1")[0]
        os.kill(victim["pid"], signal.SIGSEGV)  # a real segfault signal, from outside the harness
        wait_for(lambda: query(run_dir, "SELECT * FROM crashes"), timeout=30)
        wait_for(lambda: len(query(run_dir, "SELECT * FROM events WHERE kind='ready' AND host=?",
                                   (victim["host"],))) >= 2, timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    crash = query(run_dir, "SELECT * FROM crashes")[0]
    assert crash["signal"] == signal.SIGSEGV and crash["signal_name"] == "SIGSEGV"
    assert crash["host"] == victim["host"] and crash["pid"] == victim["pid"]
    assert crash["core_dumped"] == 1
    core = Path(crash["core_path"])
    assert core.is_file() and core.stat().st_size > 0
    assert oct(core.stat().st_mode & 0o777) == "0o600"
    assert crash["offered_rate"] > 0
    # The core was triaged from the file alone: a SIGSEGV sent with kill() is not a memory fault.
    triage = query(run_dir, "SELECT * FROM triage WHERE uid=?", (crash["uid"],))[0]
    assert triage["crash_class"] == "external-signal"
    assert json.loads(triage["data"])["signal_name"] == "SIGSEGV"
    # Summary printed even when interrupted, and the expectation {crashes: 0} failed visibly.
    assert "SIGSEGV" in out and "FAILED" in out
    assert query(run_dir, "SELECT status FROM runs")[0]["status"] == "interrupted"
    assert not any(pid_alive(pid) for pid in host_pids(run_dir))


@pytest.mark.slow
def test_sigkill_of_harness_leaves_no_target_and_run_is_reportable(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, ECHO_FLEET + """
load:
  - {hold: {rate: 200, for: 120s}}
""")
    results = tmp_path / "results"
    proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=2)
        pids = host_pids(run_dir)
        assert len(pids) == 4 and all(pid_alive(pid) for pid in pids)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=10)
    result = run_harness(["report", str(run_dir), "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "incomplete"
    assert report["trials"][0]["overall"]["ok"] > 0
    text = run_harness(["report", str(run_dir)], tmp_path)
    assert "status incomplete" in text.stdout


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_exit_143(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, ECHO_FLEET + """
load:
  - {hold: {rate: 100, for: 120s}}
""")
    results = tmp_path / "results"
    proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted" in out
    assert not any(pid_alive(pid) for pid in host_pids(run_dir))
    stops = query(run_dir, "SELECT * FROM events WHERE kind='stop'")
    assert len(stops) == 4


@pytest.mark.slow
def test_build_failure_is_one_clear_line(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, """
name: broken-build
target:
  build: [make, -C, nowhere-at-all]
  command: [./x, --port, "{port}"]
fleet: {hosts: 1}
load: [{hold: {rate: 10, for: 1s}}]
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "r")], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: build failed (make -C nowhere-at-all")


@pytest.mark.slow
def test_target_that_exits_at_start_is_a_clear_error(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, """
name: exits-at-start
target:
  command: [sh, -c, "echo 'config error: no such option' >&2; exit 3", "{port}"]
fleet: {hosts: 2}
load: [{hold: {rate: 10, for: 1s}}]
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "r")], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "exited with code 3 before accepting connections: config error: no such option" in lines[0]


@pytest.mark.slow
def test_target_that_never_listens_is_a_clear_error(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, """
name: never-ready
target:
  command: [sleep, "600"]
  ready: {tcp: "{port}", timeout: 1s}
fleet: {hosts: 2}
load: [{hold: {rate: 10, for: 1s}}]
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "r")], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "did not accept connections" in result.stderr
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    assert not any(pid_alive(pid) for pid in host_pids(run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("policy,expected_starts", [("never", 1), ("always", 3)])
def test_restart_policy(targets: Path, tmp_path: Path, policy: str, expected_starts: int) -> None:
    """A host whose process exits on its own is restarted per policy (with backoff)."""
    scenario = write_scenario(tmp_path, f"""
name: restarts
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{{port}}"]
  restart: {{policy: {policy}, backoff: 100ms, max_backoff: 200ms}}
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 20, for: 60s}}}}]
""")
    results = tmp_path / "results"
    proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results)
        for round_ in range(expected_starts):
            ready = wait_for(lambda: query(run_dir, "SELECT pid FROM events WHERE kind='ready'")[round_:], timeout=30)
            os.kill(ready[0]["pid"], signal.SIGTERM)  # the target exits 0 on SIGTERM: not a crash
            wait_for(lambda: len(query(run_dir, "SELECT * FROM events WHERE kind='exit'")) > round_, timeout=30)
        if policy == "never":
            wait_for(lambda: query(run_dir, "SELECT * FROM events WHERE kind='no-restart'"), timeout=30)
        else:
            wait_for(lambda: len(query(run_dir, "SELECT * FROM events WHERE kind='start'")) >= expected_starts + 1)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    starts = query(run_dir, "SELECT * FROM events WHERE kind='start'")
    assert len(starts) == (1 if policy == "never" else expected_starts + 1)
    assert query(run_dir, "SELECT count(*) AS n FROM crashes")[0]["n"] == 0


@pytest.mark.slow
def test_target_flooding_output_is_capped_and_harmless(targets: Path, tmp_path: Path) -> None:
    # `yes` in the host's process group floods stdout as fast as the disk takes it. Its word is this
    # test's own, so the check below never sees another run's `yes` (parallel workers, other suites).
    flood = f"flooding-the-log-{uuid.uuid4().hex}"
    scenario = write_scenario(tmp_path, """
name: flood
target:
  root: @REPO@
  command: [sh, -c, "yes @FLOOD@ & exec {root}/targets/echo/echo-server --port {port}"]
  log_max: 2MiB
fleet: {hosts: 2}
load: [{hold: {rate: 100, for: 4s}}]
expect:
  - {error_rate: "< 1%"}
""".replace("@FLOOD@", flood))
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    for host in ("h0", "h1"):
        log = run_dir / "hosts" / "t1" / host / "stdout.log"
        rotated = log.with_name("stdout.log.1")
        assert rotated.exists(), "the flood reached the cap and was rotated"
        # Bounded: no file ever passes the cap (the rest is counted and dropped).
        assert rotated.stat().st_size <= 2 * 1024 * 1024 and log.stat().st_size <= 2 * 1024 * 1024
    assert "output was dropped" in result.stderr
    # The flooding `yes` children were stopped with their hosts.
    ps = subprocess.run(["pgrep", "-f", flood], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


@pytest.mark.slow
def test_metrics_endpoint_counts_crashes_live(targets: Path, tmp_path: Path) -> None:
    import socket
    import urllib.request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scenario = write_scenario(tmp_path, ECHO_FLEET + """
load:
  - {hold: {rate: 100, for: 60s}}
""")
    results = tmp_path / "results"
    proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet", "--metrics", f"127.0.0.1:{port}"],
                         tmp_path)

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()
        except OSError:
            return ""

    def crash_count(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("harness_crashes_total{"))

    try:
        run_dir = wait_for_run(results)
        wait_for(lambda: "harness_hosts_alive 4.0" in scrape(), timeout=30)
        assert crash_count(scrape()) == 0
        # the store's writer commits once a second: the metric can be ahead of the event rows
        victim = wait_for(lambda: query(run_dir, "SELECT pid FROM events WHERE kind='ready' ORDER BY host LIMIT 1"),
                          timeout=30)[0]["pid"]
        os.kill(victim, signal.SIGSEGV)
        text = wait_for(lambda: (lambda t: t if crash_count(t) >= 1 else "")(scrape()), timeout=30)
        assert isinstance(text, str)
        line = next(l for l in text.splitlines() if l.startswith("harness_crashes_total{"))
        assert 'signal="SIGSEGV"' in line and 'program="echo-server"' in line and 'core="yes"' in line
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    textfile = (run_dir / "metrics.prom").read_text()
    assert crash_count(textfile) == 1
    assert scrape() == "", "the endpoint is closed when the run ends"


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.skipif(os.geteuid() != 0, reason="installing a core_pattern pipe handler needs root")
def test_cores_through_the_pipe_handler_and_pattern_restored(targets: Path, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    require_serial(request)
    import shutil
    import tempfile
    pattern_file = Path("/proc/sys/kernel/core_pattern")
    before = pattern_file.read_text()
    spool = Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))  # the kernel keeps only 127 bytes of pattern
    echo = str(targets / "echo" / "echo-server")
    scenario = write_scenario(tmp_path, ECHO_FLEET + """
load:
  - {hold: {rate: 100, for: 60s}}
""")
    results = tmp_path / "results"
    try:
        installed = run_harness(["cores", "install", "--spool", str(spool), "--keep-exe", echo], tmp_path)
        assert installed.returncode == 0, installed.stderr
        assert pattern_file.read_text().startswith("|")
        proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
        try:
            run_dir = wait_for_run(results, samples=1)
            victim = query(run_dir, "SELECT pid FROM events WHERE kind='ready' ORDER BY host LIMIT 1")[0]["pid"]
            os.kill(victim, signal.SIGSEGV)
            wait_for(lambda: query(run_dir, "SELECT * FROM crashes"), timeout=30)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        crash = query(run_dir, "SELECT * FROM crashes")[0]
        assert crash["pid"] == victim and crash["core_path"], crash["detail"]
        core = Path(crash["core_path"])
        assert core.read_bytes()[:4] == b"\x7fELF" and core.parent == run_dir / "hosts/t1" / f"h{crash['host']}" / "cores"
        assert not list(spool.glob(f"core.{victim}.*[0-9]")), "the core was moved out of the spool"
        assert not list(spool.glob(f"core.{victim}.*.json")), "and its record claimed (it would age out otherwise)"
    finally:
        undone = run_harness(["cores", "uninstall", "--spool", str(spool)], tmp_path)
        if pattern_file.read_text() != before:
            pattern_file.write_text(before)  # never leave the machine changed
        shutil.rmtree(spool, ignore_errors=True)
    assert undone.returncode == 0, undone.stderr
    assert pattern_file.read_text() == before


@pytest.mark.slow
def test_crash_while_stopping_is_recorded(tmp_path: Path) -> None:
    """A target that aborts in its SIGTERM path (a destructor bug) crashed: it counts, with its core."""
    server = ("import os, signal, socket, sys\n"
              "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
              "signal.signal(signal.SIGTERM, lambda *_: os.abort())\n"
              "while True:\n    c, _ = s.accept(); c.sendall(b'OK\\n' * 64)\n")
    (tmp_path / "abort_on_term.py").write_text(server)
    scenario = write_scenario(tmp_path, f"""
name: abort-on-stop
target:
  command: [{sys.executable}, {tmp_path / "abort_on_term.py"}, "{{port}}"]
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 5, for: 1s}}}}]
expect:
  - {{crashes: 0}}
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 1, result.stderr  # the expectation {crashes: 0} failed
    report = json.loads(result.stdout)
    crashes = report["trials"][0]["crashes"]
    assert [c["signal_name"] for c in crashes] == ["SIGABRT"]


@pytest.mark.slow
def test_unusable_results_folder_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    scenario = write_scenario(tmp_path, """
name: no-out
target:
  command: [sleep, "60", "{port}"]
fleet: {hosts: 1}
load: [{hold: {rate: 5, for: 1s}}]
""")
    result = run_harness(["run", str(scenario), "--out", str(blocker / "results")], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: cannot create the results folder"), result.stderr


@pytest.mark.slow
def test_root_placeholder_in_the_command(targets: Path, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, """
name: root-placeholder
target:
  root: @REPO@
  command: ["{root}/targets/echo/echo-server", --port, "{port}"]
fleet: {hosts: 1}
load: [{hold: {rate: 20, for: 1s}}]
expect:
  - {error_rate: "< 1%"}
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_expectations_are_judged_when_the_scenario_names_files_beside_it(targets: Path, tmp_path: Path) -> None:
    """`files:` (and a relative root) resolve against the scenario's folder: the run folder's copy is judged
    with them resolved there too, so a failed expectation still fails the run (it was skipped: exit 0)."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "note.txt").write_text("host {host} on {addr}:{port}\n", encoding="utf-8")
    scenario = write_scenario(tmp_path, """
name: files-beside
target:
  command: ["@REPO@/targets/echo/echo-server", --port, "{port}"]
  files: {note.txt: templates/note.txt}
fleet: {hosts: 1}
load: [{hold: {rate: 20, for: 1s}}]
expect:
  - {error_rate: "< 1%"}
  - {hosts_alive: ">= 2"}
""")
    result = run_harness(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet", "--json"], tmp_path)
    assert result.returncode == 1, result.stderr
    judged = {e["text"]: e for e in json.loads(result.stdout)["expectations"]}
    assert judged["error_rate < 1%"]["held"] and not judged["hosts_alive >= 2"]["held"]
    run_dir = run_dir_of(tmp_path / "r")
    assert run_dir is not None
    assert (run_dir / "hosts" / "t1" / "h0" / "note.txt").read_text().startswith("host h0 on 127.0.0.1:")
    again = run_harness(["report", str(run_dir)], tmp_path)
    assert again.returncode == 1 and "hosts_alive >= 2" in again.stdout
