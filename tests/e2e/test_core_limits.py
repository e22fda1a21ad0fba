"""The core handler's limits hold under storms and against other users (issue 12): bytes are reserved
under a lock before they are written, other uids have quotas, unclaimed records age out, `cores status`
says when the handler cannot run, an interrupted install is undone, and the runner says when a crash has
no record.

Most tests run the handler the way the kernel does (exec by path, empty environment, cwd /, the core on
stdin) without touching core_pattern. Those that need real crashes set core_pattern machine-wide for a
few seconds, only for their own executables (other programs' cores go where they went before), and
always put it back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.collect.coreinstall import find_spooled_record, install, prepare_spool, uninstall

from conftest import (HARNESS, REPO, as_user, query, require_serial, start_harness, wait_for, wait_for_run,
                      write_scenario)

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
CORE_PIPE_LIMIT = Path("/proc/sys/kernel/core_pipe_limit")
UNLIMITED = str(2**64 - 1)
T = 1700000000
MiB = 1024 * 1024


def fake_core(seed: int, size: int) -> bytes:
    head = b"\x7fELF\x02\x01\x01" + bytes(9) + (4).to_bytes(2, "little") + seed.to_bytes(4, "little")
    return (head + os.urandom(size))[:size]


def start_handler(handler: Path, spool: Path, data: bytes, pid: int, uid: int = 0) -> tuple[subprocess.Popen[bytes],
                                                                                           threading.Thread]:
    proc = subprocess.Popen([str(handler), str(spool), str(pid), str(pid), str(uid), str(uid), "11", str(T), UNLIMITED,
                             "1", "host", "!usr!bin!crashy"], stdin=subprocess.PIPE, env={}, cwd="/")

    def feed() -> None:
        assert proc.stdin is not None
        view = memoryview(data)
        for i in range(0, len(view), 1 << 16):
            proc.stdin.write(view[i:i + (1 << 16)])  # BrokenPipeError: the handler stopped reading
        proc.stdin.close()

    writer = threading.Thread(target=feed)
    writer.start()
    return proc, writer


def records(spool: Path) -> dict[int, dict]:
    return {json.loads(p.read_text())["pid"]: json.loads(p.read_text()) for p in spool.glob("core.*.json")}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 48 MiB filesystem that can fill up (root only); unmounted after."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir(mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# Serial: it measures the disk's use every millisecond, and its peak is what beside busy workers went over the
# cap before the handlers' unlinks were taken under the spool's lock (see the bound below).
@pytest.mark.serial
def test_a_storm_of_cores_keeps_the_cap_and_never_fills_the_disk(small_disk: Path) -> None:
    """Before: 8 concurrent 15 MiB cores against a 20 MiB cap kept 45 MiB, filled the disk, lost 5 of 8."""
    spool = small_disk / "spool"
    handler = prepare_spool(spool, max_spool_bytes=20 * MiB, keep_free_bytes=MiB)
    vfs = os.statvfs(small_disk)
    base_used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
    peak = {"used": 0, "free_min": vfs.f_bavail * vfs.f_frsize}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            now = os.statvfs(small_disk)
            peak["used"] = max(peak["used"], (now.f_blocks - now.f_bfree) * now.f_frsize - base_used)
            peak["free_min"] = min(peak["free_min"], now.f_bavail * now.f_frsize)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    cores = {5000 + i: fake_core(i, 15 * MiB) for i in range(8)}
    try:
        started = [(pid, *start_handler(handler, spool, data, pid)) for pid, data in cores.items()]
        for pid, proc, writer in started:
            writer.join(60)
            assert proc.wait(60) == 0
    finally:
        stop.set()
        watcher.join()
    found = records(spool)
    assert sorted(found) == sorted(cores)                        # every crash recorded
    kept = {pid: rec for pid, rec in found.items() if rec["core"]}
    dropped = {pid: rec for pid, rec in found.items() if not rec["core"]}
    assert kept, found                                           # the first reservation holds a whole core
    for pid, rec in kept.items():                                # what was kept is complete
        assert rec["status"] == "written" and not rec["truncated"]
        assert (spool / rec["core"]).read_bytes() == cores[pid]
    for rec in dropped.values():                                 # the rest: dropped, saying why
        assert rec["status"] == "dropped" and "max_spool_bytes" in rec["reason"], rec
        assert rec["bytes_received"] == 15 * MiB
    assert sum((spool / r["core"]).stat().st_size for r in kept.values()) <= 20 * MiB
    # The cap held at every moment (+ sidecars). With the handlers' unlinks outside the spool's lock, about one
    # storm in ten peaked at 23-25 MiB (a reservation missed by a directory scan beside an unlink on tmpfs: the
    # last room granted twice); with them under it, none in 70 (harness/collect/pipe_handler.py: _unlink).
    assert peak["used"] <= 20 * MiB + MiB, peak
    assert peak["free_min"] > 16 * MiB, peak                     # the disk never came near full
    assert not list(spool.glob(".tmp.*"))


def test_unclaimed_records_age_out_and_dead_handlers_leave_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    handler = prepare_spool(spool, max_age_seconds=3600)
    for pid in (1, 2):
        proc, writer = start_handler(handler, spool, fake_core(pid, 10000), pid)
        writer.join(30)
        assert proc.wait(30) == 0
    old = [p for p in spool.glob("core.1.*")]
    assert len(old) == 2
    for path in old:                                             # record and core of pid 1: two hours old
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    (spool / f".tmp.core.9.{T}.11.u0.999999999.0").write_bytes(b"x" * 1000)  # a handler that died mid-dump
    proc, writer = start_handler(handler, spool, fake_core(3, 10000), 3)
    writer.join(30)
    assert proc.wait(30) == 0
    assert not [p for p in spool.glob("core.1.*")] and not list(spool.glob(".tmp.*"))
    assert sorted(records(spool)) == [2, 3]


# ------------------------------------------------------------------------------- real crashes

CRASHER = r"""
#include <sys/resource.h>
int main(void) {
    struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};
    setrlimit(RLIMIT_CORE, &unlimited);
    volatile int *p = 0;
    *p = 42;
    return 0;
}
"""


def _pattern_writable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    try:
        CORE_PATTERN.write_text(CORE_PATTERN.read_text().rstrip("\n"))
    except OSError as exc:
        return f"core_pattern not writable: {exc}"
    return None if shutil.which("gcc") else "no gcc"


@pytest.fixture
def saved_pattern(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """core_pattern and core_pipe_limit as they were, put back whatever the test did (serial tests only:
    the setting is machine-wide)."""
    require_serial(request)
    why = _pattern_writable()
    if why:
        pytest.skip(why)
    saved = CORE_PATTERN.read_text().rstrip("\n"), CORE_PIPE_LIMIT.read_text().strip()
    try:
        yield saved
    finally:
        if CORE_PATTERN.read_text().rstrip("\n") != saved[0]:
            CORE_PATTERN.write_text(saved[0])
        if CORE_PIPE_LIMIT.read_text().strip() != saved[1]:
            CORE_PIPE_LIMIT.write_text(saved[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """core_pattern keeps 127 bytes: spools live under a short root-owned /tmp folder (0755, so an
    unprivileged crasher there can be run)."""
    path = Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _crash(argv: list[str]) -> int:
    proc = subprocess.run(argv, capture_output=True)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.serial
def test_other_users_crashes_cannot_starve_the_harness(saved_pattern: tuple[str, str], short_dir: Path,
                                                       attacker: tuple[int, int]) -> None:
    crasher = short_dir / "crasher"
    (short_dir / "crasher.c").write_text(CRASHER)
    subprocess.run(["gcc", "-O0", "-o", str(crasher), str(short_dir / "crasher.c")], check=True)
    spool = short_dir / "spool"
    # Room for 8 records; any one other uid gets 25% of that, all of them together 50%.
    install(spool, keep_exe=[crasher], max_records=8, max_cores=8)
    try:
        for _ in range(6):                                        # the attacker crash-loops
            crashed = as_user(attacker, [str(crasher)])
            assert crashed.returncode == -signal.SIGSEGV
        since = time.time() - 1
        mine = []
        for _ in range(3):                                        # then the harness's own targets crash
            proc = subprocess.Popen([str(crasher)])
            assert proc.wait() == -signal.SIGSEGV
            mine.append(proc.pid)
        for pid in mine:
            found = find_spooled_record(spool, pid, since, timeout=10)
            assert found is not None and found.status == "written" and found.core is not None, found
        theirs = [r for r in records(spool).values() if r["uid"] == attacker[0]]
        assert len(theirs) == 2 and all(r["status"] == "written" for r in theirs)
        status = subprocess.run([*HARNESS, "cores", "status", "--spool", str(spool)], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)
        assert summary["handler_runnable"] is True and summary["spool"]["records"] == 5
    finally:
        uninstall(spool)
    assert CORE_PATTERN.read_text().rstrip("\n") == saved_pattern[0]


@pytest.mark.slow
@pytest.mark.serial
def test_cores_status_fails_when_the_handler_cannot_run(saved_pattern: tuple[str, str], short_dir: Path) -> None:
    python = short_dir / "python3"                                # an interpreter that will disappear
    shutil.copy2(os.path.realpath(sys.executable), python)
    spool = short_dir / "spool"
    install(spool, keep_exe=[short_dir / "nothing"], python=str(python))
    try:
        ok = subprocess.run([*HARNESS, "cores", "status", "--spool", str(spool)], capture_output=True, text=True,
                            timeout=60)
        assert ok.returncode == 0 and json.loads(ok.stdout)["handler_runnable"] is True, ok.stderr
        python.unlink()   # the kernel would now log "pipe failed" for every crash on the machine
        broken = subprocess.run([*HARNESS, "cores", "status", "--spool", str(spool)], capture_output=True,
                                text=True, timeout=60)
    finally:
        CORE_PATTERN.write_text(saved_pattern[0])                 # no broken handler left a moment longer
        uninstall(spool)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    state = json.loads(broken.stdout)
    assert state["handler_runnable"] is False and f"{python} is missing" in state["handler_problems"][0]
    assert "BROKEN" in broken.stderr and "Traceback" not in broken.stderr


KILL_AFTER_PATTERN = """
import os, signal, sys
from pathlib import Path
from harness.collect import coreinstall
real = coreinstall._write_sysctl
def write_then_die(path, value):
    real(path, value)
    if path == coreinstall.CORE_PATTERN:
        os.kill(os.getpid(), signal.SIGKILL)   # killed between its two writes
coreinstall._write_sysctl = write_then_die
coreinstall.install(sys.argv[1], keep_exe=[sys.argv[2]], pipe_limit=int(sys.argv[3]))
"""


@pytest.mark.slow
@pytest.mark.serial
def test_an_install_killed_between_its_two_writes_is_undone(saved_pattern: tuple[str, str],
                                                            short_dir: Path) -> None:
    spool = short_dir / "spool"
    pattern, limit = saved_pattern
    wanted = int(limit) + 7
    try:
        killed = subprocess.run([sys.executable, "-c", KILL_AFTER_PATTERN, str(spool), str(short_dir / "nothing"),
                                 str(wanted)], cwd=REPO, capture_output=True, timeout=60)
        assert killed.returncode == -signal.SIGKILL
        assert CORE_PATTERN.read_text().startswith("|")           # the pattern first ...
        assert CORE_PIPE_LIMIT.read_text().strip() == limit       # ... so the limit was not touched yet
        undone = subprocess.run([*HARNESS, "cores", "uninstall", "--spool", str(spool)], capture_output=True,
                                text=True, timeout=60)
        assert undone.returncode == 0, undone.stderr
        assert CORE_PATTERN.read_text().rstrip("\n") == pattern and CORE_PIPE_LIMIT.read_text().strip() == limit
        # An older harness wrote the limit first: its state file is there, the pattern is not ours.
        (spool / "previous_core_pattern.json").write_text(json.dumps({"core_pattern": pattern,
                                                                      "core_pipe_limit": int(limit)}))
        CORE_PIPE_LIMIT.write_text(str(wanted))
        undone = subprocess.run([*HARNESS, "cores", "uninstall", "--spool", str(spool)], capture_output=True,
                                text=True, timeout=60)
        assert undone.returncode == 0, undone.stderr
        assert CORE_PIPE_LIMIT.read_text().strip() == limit and CORE_PATTERN.read_text().rstrip("\n") == pattern
    finally:
        CORE_PATTERN.write_text(pattern)
        CORE_PIPE_LIMIT.write_text(limit)


ECHO = """
name: no-record
seed: 8
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{port}"]
  restart: {policy: always, backoff: 100ms}
fleet: {hosts: 1}
load: [{hold: {rate: 50, for: 60s}}]
"""


@pytest.mark.slow
@pytest.mark.serial
def test_the_runner_warns_when_a_crash_has_no_record(targets: Path, tmp_path: Path, saved_pattern: tuple[str, str],
                                                     short_dir: Path) -> None:
    echo = REPO / "targets" / "echo" / "echo-server"
    spool = short_dir / "spool"
    install(spool, keep_exe=[echo], max_records=0)               # a spool that records nothing
    scenario = write_scenario(tmp_path, ECHO)
    results = tmp_path / "results"
    proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=1)
        for n in (1, 2):
            victim = wait_for(lambda: [r["pid"] for r in query(run_dir, "SELECT pid FROM events WHERE kind='ready' "
                                                                        "ORDER BY id")][n - 1:], timeout=30)[0]
            os.kill(victim, signal.SIGSEGV)
            wait_for(lambda: len(query(run_dir, "SELECT * FROM crashes")) >= n, timeout=30)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        uninstall(spool)
    assert CORE_PATTERN.read_text().rstrip("\n") == saved_pattern[0]
    assert proc.returncode == 130, err[-2000:]
    warnings = [line for line in err.splitlines() if "wrote no record" in line]
    assert len(warnings) == 1 and "harness cores status" in warnings[0], err   # said once, not per crash
    notes = [json.loads(r["detail"]).get("core_notes", []) for r in query(run_dir, "SELECT detail FROM crashes")]
    assert len(notes) == 2 and all("no record of the crash from the core handler" in " ".join(n) for n in notes)
