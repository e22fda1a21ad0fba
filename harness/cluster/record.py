"""A trial's store writes, recorded on a worker and replayed into the one store on the machine that ran
the command.

A simulated trial (harness.sim.run.Trial) writes through `write_batch` and, for the triage rows of its
crash buckets, one `INSERT OR REPLACE INTO triage` statement. On a worker those calls are recorded in
order; the client replays them, in the same order, through the same RunStore methods a local run calls,
so the rows are the rows a local run writes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from harness.store.runstore import RunStore

# the one statement harness.sim.run issues besides write_batch (replayed with this text, never a worker's)
TRIAGE_INSERT = ("INSERT OR REPLACE INTO triage (uid, crash_class, signature, bucket, in_allocator, "
                 "fault_address, data) VALUES (?,?,?,?,?,?,?)")


@dataclass
class RecordedWrites:
    batches: list[tuple[str, Any]] = field(default_factory=list)   # ("batch", (trial, kwargs)) | ("triage", rows)


class _RecordingDB:
    def __init__(self, writes: RecordedWrites):
        self._writes = writes

    def executemany(self, sql: str, rows: Any) -> None:
        # only the statement the simulator issues: replaying arbitrary SQL from a worker would let a worker
        # write anything into the client's store
        if sql != TRIAGE_INSERT:
            raise ValueError(f"a recorded trial may only write triage rows, not {sql[:60]!r}")
        self._writes.batches.append(("triage", [tuple(r) for r in rows]))


class RecordingStore:
    """Stands in for RunStore inside a trial that runs on a cluster worker."""

    def __init__(self) -> None:
        self.writes = RecordedWrites()
        self.db = _RecordingDB(self.writes)

    def write_batch(self, trial: int, **kwargs: Any) -> None:
        # the lists are handed over, not copied: the trial starts new ones after each batch
        self.writes.batches.append(("batch", (trial, kwargs)))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        yield


def replay(writes: RecordedWrites, store: RunStore) -> None:
    """The recorded writes, in order, into the real store (one transaction per batch, as a local run)."""
    for kind, payload in writes.batches:
        if kind == "batch":
            trial, kwargs = payload
            store.write_batch(trial, **kwargs)
        elif kind == "triage":
            with store._tx():
                store.db.executemany(TRIAGE_INSERT, payload)
        else:
            raise ValueError(f"unknown recorded write {kind!r}")
