"""The core_pattern pipe handler and its installer, with real processes.

The handler is run the way the kernel runs it: the installed copy exec'ed by path (its #! line), an
empty environment, cwd /, the core on stdin. The end-to-end test sets the real core_pattern (root
only) and always puts the saved pattern and core_pipe_limit back.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness.collect import coreinstall
from harness.collect.coreinstall import (find_spooled_core, find_spooled_record, install, prepare_spool, status,
                                         uninstall)
from harness.collect.elfcore import read_core
from harness.collect.pipe_handler import forward_name

from conftest import require_serial

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
CORE_PIPE_LIMIT = Path("/proc/sys/kernel/core_pipe_limit")
UNLIMITED = str(2**64 - 1)  # %c for RLIM_INFINITY
T = 1700000000  # a %t


def fake_core(seed: int, size: int) -> bytes:
    """Bytes that look like the start of an ELF core and differ per seed."""
    head = b"\x7fELF\x02\x01\x01" + bytes(9) + (4).to_bytes(2, "little") + seed.to_bytes(4, "little")
    body = os.urandom(max(0, size - len(head)))
    return (head + body)[:size]


class Run:
    """One handler invocation: arguments as the kernel passes them, the core written from a thread."""

    def __init__(self, handler: Path, spool: Path | str, data: bytes, *, pid: int, tid: int | None = None,
                 signal: int = 11, t: int = T, rlimit: str = UNLIMITED, exe: str = "!usr!bin!crashy",
                 uid: int = 0, gid: int = 0, close_stdout: bool = False):
        self.data = data
        self.error: BaseException | None = None
        # SPOOL PID TID UID GID SIGNAL TIME RLIMIT MODE HOST EXE, as %P %I %u %g %s %t %c %d %h %E give them
        argv = [str(handler), str(spool), str(pid), str(tid or pid), str(uid), str(gid), str(signal), str(t), rlimit,
                "1", "testhost", exe]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env={}, cwd="/",
                                     stderr=subprocess.DEVNULL if close_stdout else None,
                                     # the kernel gives the helper fd 0 only
                                     preexec_fn=(lambda: (os.close(1), os.close(2))) if close_stdout else None)
        self.writer = threading.Thread(target=self._write)
        self.writer.start()

    def _write(self) -> None:
        assert self.proc.stdin is not None
        try:
            view = memoryview(self.data)
            for i in range(0, len(view), 65536):
                self.proc.stdin.write(view[i:i + 65536])  # BrokenPipeError if the handler stopped reading
            self.proc.stdin.close()
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self) -> int:
        self.writer.join(30)
        rc = self.proc.wait(30)
        assert self.error is None, f"the writer side saw {self.error!r}: the handler did not drain stdin"
        return rc


def run_handler(handler: Path, spool: Path | str, data: bytes, **kw) -> int:
    return Run(handler, spool, data, **kw).finish()


def sidecar(spool: Path, name: str) -> dict:
    return json.loads((spool / f"{name}.json").read_text())


def visible(spool: Path) -> set[str]:
    return {n for n in os.listdir(spool)} - {"harness-core-handler", "limits.json"}


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_handler_as_the_kernel_runs_it(spool: Path) -> None:
    handler = prepare_spool(spool)
    assert handler == spool / "harness-core-handler" and os.access(handler, os.X_OK)
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
    data = fake_core(1, 3 * 1024 * 1024 + 17)  # more than a pipe buffer, not a multiple of anything
    rc = run_handler(handler, spool, data, pid=4242, tid=4243, exe="!opt!my svc!bin", close_stdout=True)
    assert rc == 0
    name = f"core.4242.{T}.11.u0"
    assert visible(spool) == {name, f"{name}.json"}  # no temp left behind
    core = spool / name
    st = os.lstat(core)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 1
    assert core.read_bytes() == data
    rec = sidecar(spool, name)
    assert rec["status"] == "written" and rec["core"] == name and rec["truncated"] is False
    assert rec["bytes_received"] == rec["bytes_written"] == len(data)
    assert (rec["pid"], rec["tid"], rec["uid"], rec["gid"], rec["signal"], rec["time"], rec["dump_mode"]) == (
        4242, 4243, 0, 0, 11, T, 1)
    assert rec["hostname"] == "testhost" and rec["exe"] == "/opt/my svc/bin"
    assert rec["argv"][0] == str(spool) and rec["rlimit_core"] == 2**64 - 1
    assert stat.S_IMODE(os.stat(spool / f"{name}.json").st_mode) == 0o600


def test_concurrent_invocations_lose_nothing(spool: Path) -> None:
    handler = prepare_spool(spool)
    # 15 distinct crashes plus 5 with the same pid, time and signal (a pid reused within the second).
    runs = []
    for i in range(20):
        pid = 5000 + i if i < 15 else 6000
        runs.append((pid, Run(handler, spool, fake_core(i, 256 * 1024 + 1000 * i), pid=pid)))
    assert all(run.finish() == 0 for _pid, run in runs)
    names = visible(spool)
    cores = sorted(n for n in names if not n.endswith(".json"))
    assert len(cores) == 20 and len(names) == 40
    by_content = {(spool / n).read_bytes(): n for n in cores}
    for pid, run in runs:
        name = by_content[run.data]  # each core is exactly one invocation's bytes
        assert name.startswith(f"core.{pid}.{T}.11.u0")
        rec = sidecar(spool, name)
        assert rec["core"] == name and rec["pid"] == pid and rec["bytes_written"] == len(run.data)
    assert sorted(n for n in cores if n.startswith("core.6000.")) == [
        f"core.6000.{T}.11.u0", *(f"core.6000.{T}.11.u0.{k}" for k in range(1, 5))]


def test_oversize_core_truncated_and_stdin_drained(spool: Path) -> None:
    handler = prepare_spool(spool, max_bytes=64 * 1024)
    data = fake_core(2, 8 * 1024 * 1024)  # 8 pipe buffers past the limit: a handler that stops reading blocks us
    assert run_handler(handler, spool, data, pid=77) == 0  # finish(): the writer saw no EPIPE
    name = f"core.77.{T}.11.u0"
    assert (spool / name).read_bytes() == data[:64 * 1024]
    rec = sidecar(spool, name)
    assert rec["status"] == "written" and rec["truncated"] is True and rec["limited_by"] == "max_core_bytes"
    assert rec["bytes_written"] == 64 * 1024 and rec["bytes_received"] == len(data)
    assert "truncated" in rec["reason"]


def test_rlimit_core_is_honoured(spool: Path) -> None:
    handler = prepare_spool(spool)
    data = fake_core(3, 300_000)
    assert run_handler(handler, spool, data, pid=80, rlimit="100000") == 0
    rec = sidecar(spool, f"core.80.{T}.11.u0")
    assert rec["limited_by"] == "RLIMIT_CORE" and rec["truncated"] and rec["bytes_received"] == len(data)
    assert (spool / f"core.80.{T}.11.u0").read_bytes() == data[:100_000]
    # RLIMIT_CORE 0: the process asked for no core (the kernel's own rule for file patterns).
    assert run_handler(handler, spool, data, pid=81, rlimit="0") == 0
    assert not (spool / f"core.81.{T}.11.u0").exists()
    rec = sidecar(spool, f"core.81.{T}.11.u0")
    assert rec["status"] == "skipped" and rec["core"] is None and rec["bytes_received"] == len(data)


def test_symlinked_spool_refused(tmp_path: Path, spool: Path) -> None:
    handler = prepare_spool(spool)
    data = fake_core(4, 2 * 1024 * 1024)
    before = visible(spool)
    link = tmp_path / "link"
    link.symlink_to(spool)
    assert run_handler(handler, link, data, pid=90) == 1  # refused, stdin still drained (no EPIPE)
    parent_link = tmp_path / "parent-link"
    parent_link.symlink_to(tmp_path)
    assert run_handler(handler, parent_link / "spool", data, pid=91) == 1  # a symlink higher up, too
    os.chmod(spool, 0o770)  # a spool others could write into
    try:
        assert run_handler(handler, spool, data, pid=92) == 1
    finally:
        os.chmod(spool, 0o700)
    assert visible(spool) == before


def test_planted_symlinks_not_followed(tmp_path: Path, spool: Path) -> None:
    handler = prepare_spool(spool)
    victim, victim2 = tmp_path / "victim", tmp_path / "victim2"
    victim.write_bytes(b"precious")
    victim2.write_bytes(b"precious too")
    name = f"core.93.{T}.11.u0"
    (spool / name).symlink_to(victim)  # where the core would go
    (spool / f"{name}.1.json").symlink_to(victim2)  # where the next name's sidecar would go
    data = fake_core(5, 500_000)
    assert run_handler(handler, spool, data, pid=93) == 0
    assert victim.read_bytes() == b"precious" and victim2.read_bytes() == b"precious too"
    assert os.readlink(spool / name) == str(victim) and os.readlink(spool / f"{name}.1.json") == str(victim2)
    assert not os.path.lexists(spool / f"{name}.1")  # taken for a moment, given back when its sidecar clashed
    assert (spool / f"{name}.2").read_bytes() == data
    assert sidecar(spool, f"{name}.2")["core"] == f"{name}.2"
    # The finder never returns the planted symlink either.
    assert find_spooled_core(spool, 93, T) == spool / f"{name}.2"


def test_spool_caps_drop_but_record(spool: Path) -> None:
    handler = prepare_spool(spool, max_cores=2)
    data = fake_core(6, 200_000)
    for pid in (100, 101, 102):
        assert run_handler(handler, spool, data, pid=pid) == 0
    assert (spool / f"core.101.{T}.11.u0").exists() and not (spool / f"core.102.{T}.11.u0").exists()
    rec = sidecar(spool, f"core.102.{T}.11.u0")
    assert rec["status"] == "dropped" and rec["core"] is None and "max_cores" in rec["reason"]
    assert rec["bytes_received"] == len(data)

    byte_spool = spool.parent / "bytes"
    handler = prepare_spool(byte_spool, max_spool_bytes=300_000)
    for pid in (110, 111, 112):
        assert run_handler(handler, byte_spool, data, pid=pid) == 0
    # The second fits only partly: it is dropped whole (a kept core is never cut short by the spool's cap),
    # and says so; the cap holds.
    second = sidecar(byte_spool, f"core.111.{T}.11.u0")
    assert second["status"] == "dropped" and second["core"] is None and "max_spool_bytes" in second["reason"]
    assert second["bytes_received"] == len(data) and second["bytes_written"] == 0
    assert not (byte_spool / f"core.111.{T}.11.u0").exists()
    third = sidecar(byte_spool, f"core.112.{T}.11.u0")
    assert third["status"] == "dropped" and "max_spool_bytes" in third["reason"]
    assert sum(p.stat().st_size for p in byte_spool.glob("core.*") if not p.name.endswith(".json")) <= 300_000


def test_disk_full_drains_and_records(tmp_path: Path) -> None:
    """The disk fills while the core is being written: partial core removed, stdin read to the end,
    the sidecar says why. A 1 MiB tmpfs stands in for the disk (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        spool = disk / "spool"
        handler = prepare_spool(spool, keep_free_bytes=0)
        data = fake_core(8, 2 * 1024 * 1024)
        proc = subprocess.Popen([str(handler), str(spool), "130", "130", "0", "0", "11", str(T), UNLIMITED, "1", "h",
                                 "x"],
                                stdin=subprocess.PIPE, env={}, cwd="/")
        deadline = time.monotonic() + 10
        # Sized its limit and reserved the core's temp (the record's temp, .json, comes first: not that one).
        while not any(n.startswith(".tmp.core.130.") and not n.endswith(".json") for n in os.listdir(spool)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        vfs = os.statvfs(disk)
        with open(disk / "filler", "wb") as filler:  # leave 16 KiB
            filler.write(bytes(vfs.f_bavail * vfs.f_frsize - 16384))
        assert proc.stdin is not None
        proc.stdin.write(data)  # BrokenPipeError here would mean the handler gave up reading
        proc.stdin.close()
        assert proc.wait(30) == 1
        assert visible(spool) == {f"core.130.{T}.11.u0.json"}  # no core, no temp
        rec = sidecar(spool, f"core.130.{T}.11.u0")
        assert rec["status"] == "error" and rec["core"] is None and rec["bytes_received"] == len(data)
        assert "No space" in rec["reason"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_cores_not_kept_are_forwarded_like_the_kernel(tmp_path: Path, spool: Path) -> None:
    """keep_exe set and the previous pattern a plain name: another program's core is written in that
    process's cwd, as that process's user, after removing what was there; never into the spool."""
    uid = gid = 65534 if os.geteuid() == 0 else None
    uid, gid = (uid, gid) if uid is not None else (os.geteuid(), os.getegid())
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    kept = tmp_path / "kept-program"
    handler = prepare_spool(spool, keep_exe=[kept])
    (spool / "previous_core_pattern.json").write_text(json.dumps({"core_pattern": "core.%e.%p",
                                                                  "core_pipe_limit": 0}))
    work, locked = tmp_path / "work", tmp_path / "locked"
    for d, mode in ((work, 0o755), (locked, 0o555)):
        d.mkdir()
        os.chown(d, uid, gid)
        d.chmod(mode)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")

    def as_user() -> None:
        os.setgid(gid)
        os.setuid(uid)

    procs = [subprocess.Popen([sleep, "30"], cwd=d, preexec_fn=as_user if os.geteuid() == 0 else None)
             for d in (work, locked)]
    try:
        pid, locked_pid = (p.pid for p in procs)
        target = work / f"core.sleep.{pid}"
        target.symlink_to(victim)  # an old name there: removed, not followed
        data = fake_core(9, 300_000)
        exe = sleep.replace("/", "!")
        assert run_handler(handler, spool, data, pid=pid, uid=uid, gid=gid, exe=exe) == 0
        st = os.lstat(target)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (uid, gid)
        assert target.read_bytes() == data and victim.read_bytes() == b"precious"
        rec = sidecar(spool, f"core.{pid}.{T}.11.u{uid}")
        assert rec["status"] == "forwarded" and rec["core"] is None and rec["forwarded_to"] == str(target)
        assert rec["bytes_written"] == rec["bytes_received"] == len(data)
        assert not any(n.startswith(f"core.{pid}.") and not n.endswith(".json") for n in os.listdir(spool))

        # Where the process's user may not write, neither do we (the kernel would fail the same way).
        assert run_handler(handler, spool, data, pid=locked_pid, uid=uid, gid=gid, exe=exe) == 0
        rec = sidecar(spool, f"core.{locked_pid}.{T}.11.u{uid}")
        assert rec["status"] == "skipped" and "Permission denied" in rec["reason"] and os.listdir(locked) == []
        # A pid now owned by someone else (reused): nothing written anywhere.
        assert run_handler(handler, spool, data, pid=pid, uid=uid + 1, gid=gid, exe=exe, t=T + 1) == 0
        rec = sidecar(spool, f"core.{pid}.{T + 1}.11.u{uid + 1}")
        assert rec["status"] == "skipped" and "reused" in rec["reason"]
        # The kept program's core goes to the spool as usual.
        assert run_handler(handler, spool, data, pid=pid, uid=uid, gid=gid, exe=str(kept).replace("/", "!"),
                           t=T + 2) == 0
        assert (spool / f"core.{pid}.{T + 2}.11.u{uid}").read_bytes() == data
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_find_spooled_record(spool: Path) -> None:
    handler = prepare_spool(spool, max_cores=1)
    data = fake_core(7, 100_000)
    assert run_handler(handler, spool, data, pid=120, t=T) == 0
    assert run_handler(handler, spool, data, pid=120, t=T + 5) == 0  # the same pid again, later: dropped
    assert find_spooled_core(spool, 120, T - 0.5) == spool / f"core.120.{T}.11.u0"  # the first crash since
    assert find_spooled_core(spool, 120, T + 0.7) == spool / f"core.120.{T}.11.u0"  # %t has whole seconds
    later = find_spooled_record(spool, 120, T + 1)
    assert later is not None and later.core is None and later.status == "dropped"
    assert any("max_cores" in n for n in later.notes)
    assert find_spooled_core(spool, 121, T - 10) is None  # another pid
    assert find_spooled_core(spool, 120, T + 6) is None  # before this process started
    start = time.monotonic()
    assert find_spooled_record(spool, 999, 0, timeout=0.2) is None
    assert time.monotonic() - start >= 0.2


def test_not_root_is_a_clear_error(tmp_path: Path) -> None:
    def check() -> None:
        for call in (lambda: install(tmp_path / "s"), lambda: uninstall(tmp_path / "s")):
            with pytest.raises(PermissionError, match="needs root"):
                call()

    if os.geteuid() != 0:
        check()
        return
    spool = tmp_path / "spool"
    prepare_spool(spool)
    os.seteuid(65534)  # nobody; the real uid stays root so we can come back
    try:
        check()
        assert "error" in status(spool)["spool"]  # a 0700 root spool is not listable, and status says so
    finally:
        os.seteuid(0)


CRASHER = r"""
#include <stdio.h>
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
    """None if we may change core_pattern, else why not."""
    if os.geteuid() != 0:
        return "not root"
    try:
        saved = CORE_PATTERN.read_text().rstrip("\n")
        CORE_PATTERN.write_text(saved)  # writing the same value back: a probe that changes nothing
    except OSError as e:
        return f"core_pattern not writable: {e}"
    if shutil.which("gcc") is None:
        return "no gcc"
    return None


@pytest.mark.serial
def test_end_to_end_kernel_pipes_a_real_core(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    require_serial(request)
    why = _pattern_writable()
    if why:
        pytest.skip(why)
    exe = tmp_path / "crasher"
    (tmp_path / "crasher.c").write_text(CRASHER)
    subprocess.run(["gcc", "-O0", "-o", str(exe), str(tmp_path / "crasher.c")], check=True)
    other, other_cwd = tmp_path / "other-crasher", tmp_path / "other-cwd"
    shutil.copy(exe, other)
    other_cwd.mkdir()
    saved = CORE_PATTERN.read_text().rstrip("\n")
    saved_limit = CORE_PIPE_LIMIT.read_text().strip()
    short = Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))  # core_pattern holds 127 bytes: a short spool path
    spool = short / "spool"
    try:
        # keep_exe: while the pattern is ours, other programs' cores (other tests running on this machine)
        # still land where the saved pattern puts them.
        result = install(spool, max_bytes=64 << 20, keep_exe=[exe])
        assert CORE_PATTERN.read_text().rstrip("\n") == result.pattern
        assert result.previous_pattern == saved and int(CORE_PIPE_LIMIT.read_text()) >= 1
        again = install(spool, keep_exe=[exe])  # installing twice keeps the original, not our own pattern
        assert again.already_installed and again.previous_pattern == saved
        st = status(spool)
        assert st["ours"] and st["owner"] == "harness" and st["previous"]["core_pattern"] == saved
        assert st["handler_present"] and not st["handler_stale"] and "uninstall" in st["advice"]
        assert coreinstall.installed_spool() == spool

        since = time.time()
        pid = os.posix_spawn(str(exe), [str(exe)], {})
        _, wstatus = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(wstatus) and os.WTERMSIG(wstatus) == 11 and os.WCOREDUMP(wstatus)
        found = find_spooled_record(spool, pid, since, timeout=10)
        assert found is not None and found.status == "written" and found.core is not None, found
        with open(found.core, "rb") as handle:
            header = handle.read(18)
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[16:18], "little") == 4  # ET_CORE
        assert read_core(found.core).pid == pid
        assert found.record["pid"] == pid and found.record["signal"] == 11
        assert found.record["exe"] == str(exe) and not found.truncated
        assert found.core.stat().st_size == found.record["bytes_written"]

        # A program not in keep_exe: its core goes where the saved pattern puts it, not to the spool.
        since = time.time()
        other_proc = subprocess.Popen([str(other)], cwd=other_cwd)
        assert other_proc.wait() == -11
        rec = find_spooled_record(spool, other_proc.pid, since, timeout=10)
        assert rec is not None and rec.core is None, rec
        if forward_name(saved, dict.fromkeys("%pPiIugdstceEhf", "x"), False) is not None:
            assert rec.status == "forwarded", rec
            forwarded = Path(rec.record["forwarded_to"])
            assert forwarded.parent == other_cwd and read_core(forwarded).pid == other_proc.pid
        else:
            assert rec.status == "skipped"

        undone = uninstall(spool)
        assert undone.restored
        assert CORE_PATTERN.read_text().rstrip("\n") == saved
        assert CORE_PIPE_LIMIT.read_text().strip() == saved_limit
        assert not uninstall(spool).restored  # no longer ours: left alone
        after = status(spool)
        assert not after["ours"] and after["previous"] is None and after["spool"]["cores"] == 1  # cores stay
        assert after["spool"]["forwarded"] + after["spool"]["skipped"] >= 1
        assert CORE_PATTERN.read_text().rstrip("\n") == saved
    finally:
        if CORE_PATTERN.read_text().rstrip("\n") != saved:
            CORE_PATTERN.write_text(saved)
        if CORE_PIPE_LIMIT.read_text().strip() != saved_limit:
            CORE_PIPE_LIMIT.write_text(saved_limit)
        shutil.rmtree(short, ignore_errors=True)
