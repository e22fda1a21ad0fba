"""Shared fixtures for end-to-end tests: real targets, real processes, loopback only."""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HARNESS = [sys.executable, "-m", "harness"]
# The HTML page costs seconds per run; tests that check it ask for it with --html.
os.environ.setdefault("HARNESS_HTML", "off")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--serial", choices=("skip", "only"), default=None,
                     help="skip: leave out the tests marked serial (scripts/test.sh's parallel pass); "
                          "only: run just those (its serial pass, afterwards)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("--serial")
    if wanted is not None:
        keep = [item for item in items if (item.get_closest_marker("serial") is not None) == (wanted == "only")]
        dropped = [item for item in items if item not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Long tests first (every worker sorts alike, as xdist requires): handed out one or two at a time
        # (scripts/test.sh: --maxschedchunk), the short ones then fill in, instead of one long test
        # running alone at the end.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
        # A serial test changes what every other test on the machine sees (core_pattern, a system user), or
        # needs the CPUs to itself: never beside other workers' tests. scripts/test.sh runs them in a pass
        # of their own.
        for item in items:
            if item.get_closest_marker("serial") is not None:
                item.add_marker(pytest.mark.skip(reason="marked serial: not under pytest-xdist (-n); "
                                                        "bash scripts/test.sh runs it alone after the others"))


def make_targets(*folders: Path) -> subprocess.CompletedProcess[str]:
    """`make -s` in each folder (stopping at the first failure), one build at a time: pytest-xdist workers
    share the binaries under targets/, and a make racing another could leave a half-written binary for
    a test to exec. The lock is an flock on the targets folder, dropped by the kernel if we die."""
    lock = os.open(REPO / "targets", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.CompletedProcess[str]([], 0, "", "")
        for folder in folders:
            result = subprocess.run(["make", "-s", "-C", str(folder)], capture_output=True, text=True)
            if result.returncode != 0:
                break
        return result
    finally:
        os.close(lock)


@pytest.fixture(scope="session")
def targets() -> Path:
    """Build every target once per test session."""
    built = make_targets(*(makefile.parent for makefile in sorted((REPO / "targets").glob("*/Makefile"))))
    assert built.returncode == 0, built.stdout + built.stderr
    return REPO / "targets"


def write_scenario(directory: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = directory / name
    path.write_text(text.replace("@REPO@", str(REPO)), encoding="utf-8")
    return path


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05) -> object:
    """Poll until condition() is truthy; generous timeouts, since CI machines are busy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def run_dir_of(results: Path) -> Path | None:
    runs = [p for p in results.glob("*") if (p / "run.db").exists()]
    return runs[0] if len(runs) == 1 else None


def query(run_dir: Path, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    db = sqlite3.connect(str(run_dir / "run.db"), timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []  # tables not created yet
    finally:
        db.close()


def host_pids(run_dir: Path) -> list[int]:
    return [row["pid"] for row in query(run_dir, "SELECT pid FROM events WHERE kind='start'")]


def start_harness(args: list[str], cwd: Path, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([*HARNESS, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)  # type: ignore[call-overload]


def wait_for_run(results: Path, samples: int = 0) -> Path:
    """The run folder a harness started under `results`, once it has written `samples` samples."""
    run_dir = wait_for(lambda: run_dir_of(results))
    assert isinstance(run_dir, Path)
    if samples:
        wait_for(lambda: len(query(run_dir, "SELECT * FROM samples")) >= samples)
    return run_dir


ATTACKER = "harness-attacker"


def require_serial(request: pytest.FixtureRequest) -> None:
    """For tests that change what the whole machine sees (core_pattern, a system user): they must be
    marked serial, so that scripts/test.sh never runs them beside other tests."""
    if request.node.get_closest_marker("serial") is None:
        pytest.fail(f"{request.node.nodeid} changes machine-wide state: mark it @pytest.mark.serial", pytrace=False)


@pytest.fixture
def attacker(request: pytest.FixtureRequest) -> tuple[int, int]:
    """A real unprivileged user (uid, gid) for the attacks of tests/e2e/test_hardening.py (serial tests only:
    a system user is machine-wide, and two pytest-xdist workers would each make and remove it)."""
    require_serial(request)   # before the user is made
    user: tuple[int, int] = request.getfixturevalue("attacker_user")
    return user


@pytest.fixture(scope="session")
def attacker_user() -> Iterator[tuple[int, int]]:
    """The attacker, made with useradd when missing and removed at the end if we made it. Root only."""
    import pwd
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, useradd and setpriv to act as another user")
    made = False
    try:
        entry = pwd.getpwnam(ATTACKER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ATTACKER],
                       check=True, capture_output=True)
        made = True
        entry = pwd.getpwnam(ATTACKER)
    try:
        yield entry.pw_uid, entry.pw_gid
    finally:
        if made:
            subprocess.run(["userdel", ATTACKER], capture_output=True)


def as_user(user: tuple[int, int], argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run argv as that user (real, effective and saved ids; no supplementary groups), as an attacker would."""
    uid, gid = user
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv],
                          capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder under /tmp the attacker can reach (root's pytest folders are 0700): root-owned, 0755."""
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="harness-attack-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
