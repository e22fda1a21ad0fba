"""A trial's store writes, recorded on a worker and replayed into the one store on the machine that ran
the command.

A simulated trial (harness.sim.run.Trial) writes through two RunStore calls: `write_batch` and
`record_triage_rows` (the triage rows of its crash kinds). On a worker those calls are recorded in order;
the client replays them, in the same order, through the same RunStore calls a local run makes, so the
rows are the rows a local run writes. Only those two calls exist here: a trial that tried any other
write would fail on the worker (AttributeError), never write something else into the client's store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.store.runstore import RunStore


@dataclass
class RecordedWrites:
    calls: list[tuple[str, Any]] = field(default_factory=list)   # ("batch", (trial, kwargs)) | ("triage", rows)


class RecordingStore:
    """Stands in for RunStore inside a trial that runs on a cluster worker."""

    def __init__(self) -> None:
        self.writes = RecordedWrites()

    def write_batch(self, trial: int, **kwargs: Any) -> None:
        # the lists are handed over, not copied: the trial starts new ones after each batch
        self.writes.calls.append(("batch", (trial, kwargs)))

    def record_triage_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        self.writes.calls.append(("triage", [tuple(row) for row in rows]))


def replay(writes: RecordedWrites, store: RunStore) -> None:
    """The recorded calls, in order, on the real store (one transaction each, as in a local run)."""
    for kind, payload in writes.calls:
        if kind == "batch":
            trial, kwargs = payload
            store.write_batch(trial, **kwargs)
        elif kind == "triage":
            store.record_triage_rows(payload)
        else:
            raise ValueError(f"unknown recorded write {kind!r}")
