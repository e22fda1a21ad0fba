"""The root harness cannot be turned against the machine (issue 12): each attack the review found is
reproduced here as a real unprivileged user (made with useradd, acting through setpriv) and now fails;
and the pieces the defences rest on (trusted folders, capped logs, file modes) are checked on their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.base import safefs
from harness.run.logsink import CappedLog
from harness.shim.build import LIB_PREFIX, cache_key

from conftest import HARNESS, REPO, as_user, query, start_harness, wait_for, wait_for_run, write_scenario

PYTHON = "/usr/bin/python3"   # the attacker's interpreter (the venv's lives under root's 0700 home)

ECHO = """
name: {name}
seed: 5
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{{port}}"]
fleet: {{hosts: 1}}
client: {{timeout: 500ms}}
load: [{{hold: {{rate: 50, for: {load}}}}}]
"""


def harness(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("harness: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def chown_tree(path: Path, user: tuple[int, int]) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, *user, follow_symlinks=False)


# --------------------------------------------------------------------------------- trusted folders


@pytest.mark.serial
def test_trusted_folders_are_ours_or_roots_all_the_way_up(tmp_path: Path, attacker: tuple[int, int]) -> None:
    os.close(safefs.open_trusted_dir(tmp_path))                          # root's 0700 pytest folder
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, *attacker)
    with pytest.raises(safefs.Untrusted, match=r"theirs is owned by uid \d+ \(harness-attacker\)"):
        safefs.open_trusted_dir(theirs)
    below = theirs / "mine"                                              # root's folder in their folder
    below.mkdir()
    with pytest.raises(safefs.Untrusted, match="theirs is owned by"):
        safefs.open_trusted_dir(below)
    with pytest.raises(safefs.Untrusted, match="theirs is owned by"):  # and nothing is made there
        safefs.open_trusted_dir(theirs / "new" / "results", create=True)
    assert not (theirs / "new").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(safefs.Untrusted, match=r"writable by group and others \(mode 777\)"):
        safefs.open_trusted_dir(shared / "results", create=True)
    sticky = tmp_path / "sticky"                                         # like /tmp: fine above, never as the folder
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.close(safefs.open_trusted_dir(sticky / "results", create=True))
    assert stat.S_IMODE((sticky / "results").stat().st_mode) == 0o700
    with pytest.raises(safefs.Untrusted, match="writable by"):
        safefs.open_trusted_dir(sticky)
    # A symlink on the way is followed only when a trusted user made it.
    (sticky / "link").symlink_to(tmp_path)
    os.close(safefs.open_trusted_dir(sticky / "link" / "theirs" / ".." / "sticky" / "results"))
    os.symlink(tmp_path, sticky / "their-link")
    os.chown(sticky / "their-link", *attacker, follow_symlinks=False)
    with pytest.raises(safefs.Untrusted, match="their-link is a symlink owned by"):
        safefs.open_trusted_dir(sticky / "their-link" / "sticky" / "results")


# --------------------------------------------------------------------------------- capped logs


def test_a_log_never_passes_its_cap_and_counts_what_it_drops(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, safefs.DIR_FLAGS)
    try:
        log = CappedLog(dir_fd, "stdout.log", 1000)
        line = b"x" * 99 + b"\n"
        for _ in range(25):                       # 2500 bytes at once: one rotation, then drops
            log.write(line, now=100.0)
        assert (tmp_path / "stdout.log").stat().st_size == 1000 == (tmp_path / "stdout.log.1").stat().st_size
        assert log.rotations == 1 and log.dropped_total == 500
        log.write(line, now=101.5)                # a second later: a rotation, which says what was dropped
        current = (tmp_path / "stdout.log").read_bytes()
        assert current.startswith(b"[harness: 500 bytes of output dropped here") and current.endswith(line)
        assert log.received == 2600 and log.tail(100) == line
        log.close()
    finally:
        os.close(dir_fd)
    for name in ("stdout.log", "stdout.log.1"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_rotation_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    logs = tmp_path / "h0"
    logs.mkdir(mode=0o700)
    (logs / "stdout.log.1").symlink_to(victim)             # what the review planted: <log>.1 -> /etc/<file>
    dir_fd = os.open(logs, safefs.DIR_FLAGS)
    try:
        log = CappedLog(dir_fd, "stdout.log", 64)
        log.write(b"attacker text\n" * 20, now=0.0)
        log.close()
        assert victim.read_text() == "precious\n"
        assert not (logs / "stdout.log.1").is_symlink()      # the rename replaced the link itself
        assert (logs / "stdout.log.1").read_bytes().startswith(b"attacker text")
        (logs / "stderr.log").symlink_to(victim)             # and the log itself is never opened through one
        with pytest.raises(OSError):
            CappedLog(dir_fd, "stderr.log", 64)
    finally:
        os.close(dir_fd)
    assert victim.read_text() == "precious\n"


# --------------------------------------------------------------------------------- attack 1: the results tree

SWAPPER = r"""
import os, sys, time
results, victim, log = sys.argv[1], sys.argv[2], sys.argv[3]
deadline = time.monotonic() + float(sys.argv[4])
seen = set()
with open(log, "a") as out:
    while time.monotonic() < deadline:
        try:
            names = [n for n in os.listdir(results) if not n.startswith("swapped-")]
        except OSError as e:
            out.write(f"list: {e}\n"); break
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            run = os.path.join(results, name)
            try:   # swap root's run folder for ours, whose logs' rotation lands on the victim
                os.rename(run, os.path.join(results, "swapped-" + name))
                os.makedirs(os.path.join(run, "hosts", "t1", "h0"))
                for log_name in ("stdout.log.1", "stderr.log.1", "stdout.log", "stderr.log"):
                    os.symlink(victim, os.path.join(run, "hosts", "t1", "h0", log_name))
                out.write(f"swapped {name}\n")
            except OSError as e:
                out.write(f"{name}: {e}\n")
            try:   # or plant inside it
                os.symlink(victim, os.path.join(run, "hosts", "t1", "h0", "stdout.log.1"))
                out.write(f"planted in {name}\n")
            except OSError as e:
                out.write(f"plant in {name}: {e}\n")
            out.flush()
        time.sleep(0.005)
"""

FLOOD = """
name: {name}
seed: 5
target:
  root: @REPO@
  command: [targets/unruly/unruly-server, --port, "{{port}}", --flood]
  log_max: 64KiB
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 50, for: 2s}}}}]
"""


@pytest.mark.slow
@pytest.mark.serial
def test_symlink_swap_through_a_results_folder_another_user_owns_is_refused(
        targets: Path, tmp_path: Path, attacker: tuple[int, int], shared_dir: Path) -> None:
    victim = shared_dir / "victim"
    victim.write_text("precious\n")
    checkout = shared_dir / "checkout"                      # a user's checkout, run with `sudo harness run`
    checkout.mkdir()
    os.chown(checkout, *attacker)
    assert as_user(attacker, ["mkdir", str(checkout / "results")]).returncode == 0
    attack_log = checkout / "attack.log"
    (shared_dir / "swapper.py").write_text(SWAPPER)
    swapper = subprocess.Popen(["setpriv", f"--reuid={attacker[0]}", f"--regid={attacker[1]}", "--clear-groups",
                                "--", PYTHON, str(shared_dir / "swapper.py"), str(checkout / "results"),
                                str(victim), str(attack_log), "20"])
    try:
        scenario = write_scenario(tmp_path, FLOOD.format(name="swap"))
        result = harness(["run", str(scenario), "--out", str(checkout / "results"), "--quiet"], tmp_path)
    finally:
        swapper.kill()
        swapper.wait()
    line = one_error_line(result)
    assert f"results folder {checkout / 'results'}" in line
    assert "is owned by uid" in line and "harness-attacker" in line and "refusing to write there" in line
    assert os.listdir(checkout / "results") == []           # root made nothing there to swap
    assert victim.read_text() == "precious\n"


@pytest.mark.slow
@pytest.mark.serial
def test_a_trusted_results_folder_cannot_be_swapped_or_planted_into(
        targets: Path, tmp_path: Path, attacker: tuple[int, int], shared_dir: Path) -> None:
    """Root's own results folder (0755: others may look): the same attacker gets nowhere, the run goes
    on, its logs rotate, and every file it wrote is root's alone."""
    victim = shared_dir / "victim"
    victim.write_text("precious\n")
    results = shared_dir / "results"
    results.mkdir(mode=0o755)
    attack_log = shared_dir / "attack.log"
    attack_log.touch()
    os.chown(attack_log, *attacker)
    (shared_dir / "swapper.py").write_text(SWAPPER)
    swapper = subprocess.Popen(["setpriv", f"--reuid={attacker[0]}", f"--regid={attacker[1]}", "--clear-groups",
                                "--", PYTHON, str(shared_dir / "swapper.py"), str(results), str(victim),
                                str(attack_log), "60"])
    try:
        scenario = write_scenario(tmp_path, FLOOD.format(name="no-swap"))
        result = harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
    finally:
        swapper.kill()
        swapper.wait()
    assert result.returncode == 0, result.stderr[-2000:]
    attempts = attack_log.read_text()
    assert "Permission denied" in attempts and "swapped" not in attempts.replace("swapped-", "")
    assert "planted" not in attempts
    assert victim.read_text() == "precious\n"
    (run_dir,) = results.iterdir()
    h0 = run_dir / "hosts" / "t1" / "h0"
    assert (h0 / "stdout.log.1").stat().st_size > 0 and not (h0 / "stdout.log.1").is_symlink()
    # File modes: folders 0700, files 0600 (the store's WAL and shared memory included).
    for path in [run_dir, run_dir / "hosts", run_dir / "hosts" / "t1", h0]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in [run_dir / "run.db", run_dir / "scenario.yaml", run_dir / "metrics.prom", h0 / "stdout.log",
                 h0 / "stderr.log", h0 / "stdout.log.1", *run_dir.glob("run.db-*")]:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, path
    assert as_user(attacker, ["cat", str(run_dir / "run.db")]).returncode != 0


# --------------------------------------------------------------------------------- attack 2: a planted shim

EVIL_SO = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen(MARKER, "a");
    if (f) { fprintf(f, "planted shim ran as uid %d\n", (int)getuid()); fclose(f); }
}
"""

SHIMMED = """
name: {name}
seed: 5
target:
  root: @REPO@
  command: [targets/echo/echo-server, --port, "{{port}}"]
fleet: {{hosts: 1}}
load: [{{hold: {{rate: 50, for: 2s}}}}]     # the first proof of what ran is taken at the first second
faults:
  - {{kind: alloc-fail, mode: nth, nth: 1000000000}}
"""


def _plant(cache: Path, library: bytes) -> Path:
    """What the attacker leaves in a cache: the library under the name the harness would look for."""
    import hashlib
    name = f"{LIB_PREFIX}{hashlib.sha256(library).hexdigest()}.so"
    (cache / name).write_bytes(library)
    (cache / name).chmod(0o755)
    (cache / f"{LIB_PREFIX}{cache_key()}.sha256").write_text(name + "\n")
    return cache / name


@pytest.mark.slow
@pytest.mark.serial
def test_a_planted_shim_is_never_preloaded(targets: Path, tmp_path: Path, attacker: tuple[int, int],
                                           shared_dir: Path) -> None:
    marker = shared_dir / "pwned"
    source = shared_dir / "evil.c"
    source.write_text(EVIL_SO)
    evil = shared_dir / "evil.so"
    built = as_user(attacker, ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(evil), str(source)],
                    cwd=shared_dir)
    if built.returncode != 0:   # the attacker may not write in the root-owned shared folder: build as root
        subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(evil), str(source)],
                       check=True)
    library = evil.read_bytes()
    scenario = write_scenario(tmp_path, SHIMMED.format(name="planted-shim"))

    # 1. The cache is the attacker's folder (HARNESS_CACHE pointing at it, or a $HOME kept by sudo).
    theirs = shared_dir / "their-cache"
    theirs.mkdir()
    os.chown(theirs, *attacker)
    assert as_user(attacker, ["cp", str(evil), str(theirs / "x.so")]).returncode == 0   # they can write there
    planted = _plant(theirs, library)
    chown_tree(theirs, attacker)
    refused = harness(["run", str(scenario), "--out", str(tmp_path / "r1"), "--quiet"], tmp_path,
                      env={"HARNESS_CACHE": str(theirs)})
    line = one_error_line(refused)
    assert "cannot build the fault shim: shim cache" in line and "harness-attacker" in line
    assert not marker.exists()

    # 2. Root's own cache folder: the attacker cannot write there at all.
    ours = tmp_path / "cache"
    ours.mkdir(mode=0o700)
    assert as_user(attacker, ["cp", str(evil), str(ours / planted.name)]).returncode != 0
    # ... and a foreign-owned library found there anyway (left from when the folder was open) is rebuilt.
    planted = _plant(ours, library)
    os.chown(planted, *attacker)
    run = harness(["run", str(scenario), "--out", str(tmp_path / "r2"), "--quiet", "--json"], tmp_path,
                  env={"HARNESS_CACHE": str(ours)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert not marker.exists()
    pointer = (ours / f"{LIB_PREFIX}{cache_key()}.sha256").read_text().strip()
    assert pointer != planted.name and (ours / pointer).stat().st_uid == 0
    proofs = [json.loads(r["detail"]) for r in query(tmp_path / json.loads(run.stdout)["run_dir"],
                                                     "SELECT detail FROM events WHERE kind='shim-check'")]
    assert proofs and all(p["loaded"] for p in proofs)   # the real shim ran instead

    # 3. A library of ours whose content changed (same name, other bytes) is rebuilt too.
    good = ours / pointer
    good.write_bytes(library)
    run = harness(["run", str(scenario), "--out", str(tmp_path / "r3"), "--quiet"], tmp_path,
                  env={"HARNESS_CACHE": str(ours)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert not marker.exists()
    assert (ours / f"{LIB_PREFIX}{cache_key()}.sha256").read_text().strip() != planted.name
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700


# --------------------------------------------------------------------------------- attack 3: resume


@pytest.mark.slow
@pytest.mark.serial
def test_resume_runs_nothing_from_a_folder_another_user_could_change(
        targets: Path, tmp_path: Path, attacker: tuple[int, int], shared_dir: Path) -> None:
    scenario = write_scenario(tmp_path, ECHO.format(name="resume-planted", load="60s"))
    results = tmp_path / "results"
    proc = start_harness(["run", str(scenario), "--out", str(results), "--quiet"], tmp_path)
    try:
        run_dir = wait_for_run(results, samples=1)
    finally:
        proc.kill()   # stopped hard: resumable
        proc.wait(timeout=30)
    marker = shared_dir / "pwned"
    planted_command = json.dumps(["sh", "-c", f"id -u > {marker}; exec {REPO}/targets/echo/echo-server "
                                              f"--port {{port}}"])

    # The run folder sits in a folder the attacker owns (a checkout): they swap in their own copy of it.
    checkout = shared_dir / "checkout"
    checkout.mkdir()
    os.chown(checkout, *attacker)
    theirs = checkout / run_dir.name
    shutil.copytree(run_dir, theirs)
    chown_tree(theirs, attacker)
    text = (theirs / "scenario.yaml").read_text()
    planted = text.replace('[targets/echo/echo-server, --port, "{port}"]', planted_command)
    assert planted != text
    assert as_user(attacker, [PYTHON, "-c", f"open({str(theirs / 'scenario.yaml')!r}, 'w').write({planted!r})"]
                   ).returncode == 0
    line = one_error_line(harness(["resume", str(theirs), "--quiet"], tmp_path))
    assert "refusing to resume it" in line and "harness-attacker" in line
    assert not marker.exists()

    # A root-owned run folder with a scenario.yaml someone else owns is refused the same way.
    mine = tmp_path / "elsewhere" / run_dir.name
    mine.parent.mkdir()
    shutil.copytree(run_dir, mine)
    (mine / "scenario.yaml").write_text(planted)
    os.chown(mine / "scenario.yaml", *attacker)
    line = one_error_line(harness(["resume", str(mine), "--quiet"], tmp_path))
    assert "scenario.yaml is owned by uid" in line and "refusing to resume it" in line
    assert not marker.exists()
