"""Reaching the cluster: the optional dependency, the scheduler, its workers, and the same harness on each."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from harness.base.errors import HarnessError

INSTALL_HINT = "--cluster needs Dask distributed, an optional dependency: pip install 'harness[cluster]'"
ENV = "HARNESS_CLUSTER"
CONNECT_TIMEOUT = 30.0      # seconds to reach the scheduler
WORKERS_TIMEOUT = 120.0     # seconds for the first worker to appear


def cluster_address(given: str | None) -> str | None:
    """--cluster ADDRESS, else $HARNESS_CLUSTER; an empty value means no cluster."""
    address = given if given is not None else os.environ.get(ENV, "")
    return address.strip() or None


def require_engine() -> None:
    """One clear line (exit 2 through HarnessError) when the optional dependency is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise HarnessError(INSTALL_HINT) from None


def code_digest() -> str:
    """SHA-256 over the harness package's Python sources: a worker running other code would compute other
    results (or fail half-way), so the client and every worker must agree before any trial is sent."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def connect(address: str) -> Any:
    """A Dask client on the scheduler at `address`, with at least one worker that runs this same harness."""
    require_engine()
    from distributed import Client
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise HarnessError(f"cannot reach the cluster scheduler at {address}: {exc}") from None
    except ValueError as exc:            # a malformed address
        raise HarnessError(f"--cluster {address}: {exc}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)
        except TimeoutError:
            raise HarnessError(f"the cluster at {address} has no workers (waited {WORKERS_TIMEOUT:.0f}s)") from None
        check_workers(client)
    except BaseException:
        client.close()
        raise
    return client


def check_workers(client: Any) -> None:
    mine = code_digest()

    def worker_digest() -> str | None:        # nested: sent by value, so a worker without harness answers too
        try:
            from harness.cluster.connect import code_digest
        except ImportError:
            return None
        return code_digest()

    for worker, theirs in sorted(client.run(worker_digest).items()):
        if theirs is None:
            raise HarnessError(f"cluster worker {worker} cannot import harness: install the same harness there "
                               "(pip install 'harness[cluster]')")
        if theirs != mine:
            raise HarnessError(f"cluster worker {worker} runs other harness code than this machine "
                               f"(sources {theirs[:12]} vs {mine[:12]}): install the same version on every worker")
