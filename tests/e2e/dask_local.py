"""A local Dask cluster for the tests: a scheduler and one-thread workers, each its own process tree started
as an operator starts it (optionally inside a network namespace: netns_machines), stopped by process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import netns_machines as netns
from conftest import wait_for

REPO = Path(__file__).resolve().parents[2]


def echo_target(port: str = "{port}", ready: str = '"{port}"') -> str:
    """The `target:` block of an echo fleet for --cluster (it listens on its machine's {addr}), for a scenario's
    YAML text; `port`/`ready`: a fixed port instead ("7000", "7000")."""
    return (f"target:\n  root: {REPO}\n  build: [make, -s, -C, targets/echo]\n"
            f"  command: [targets/echo/echo-server, --port, \"{port}\", --host, \"{{addr}}\"]\n"
            f"  ready: {{tcp: {ready}, timeout: 10s}}\n")


@contextmanager
def namespaced_cluster(count: int = 2) -> Iterator[tuple[netns.Machines, str]]:
    """`count` "machines" (network namespaces, netns_machines), a Dask worker in each and the scheduler here."""
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("distributed")
    with netns.machines(count) as made:
        with cluster(made.bridge_address, [(made.exec_prefix(i), a) for i, a in enumerate(made.addresses)]) as address:
            yield made, address


def _dask() -> list[str]:
    script = Path(sys.executable).with_name("dask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask"]


@contextmanager
def cluster(scheduler_host: str, workers: list[tuple[list[str], str]]) -> Iterator[str]:
    """A scheduler and one-thread workers (each: a command prefix such as `ip netns exec NS`, and the
    address it listens on), started as an operator starts them; stopped by process group."""
    distributed = pytest.importorskip("distributed")
    folder = Path(tempfile.mkdtemp(prefix="harness-cluster-"))
    scheduler_file = folder / "scheduler.json"
    procs = [subprocess.Popen([*_dask(), "scheduler", "--host", scheduler_host, "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(lambda: _address(scheduler_file) is not None, timeout=120)   # (written after it is created)
        address = _address(scheduler_file)
        for prefix, host in workers:
            # --death-timeout: a worker whose scheduler is gone exits by itself
            procs.append(subprocess.Popen(
                [*prefix, *_dask(), "worker", address, "--nthreads", "1", "--no-dashboard", "--host", host,
                 "--local-directory", str(folder), "--death-timeout", "60"],
                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(len(workers), timeout=120)
        yield address
    finally:
        for proc in procs:
            signal_group(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            signal_group(proc, signal.SIGKILL)    # nanny and worker share the group
            proc.wait()
        shutil.rmtree(folder)


def _address(scheduler_file: Path) -> str | None:
    try:
        return json.loads(scheduler_file.read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
