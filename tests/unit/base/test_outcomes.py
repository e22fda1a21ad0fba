"""The outcome vocabulary is defined once (harness.base.outcomes): every per-second record carries it."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

from harness.run.driver import Counters, RequestCounters
from harness.base.outcomes import COUNTS, ERROR_KINDS, OUTCOMES, RequestSample, Sample, counted
from harness.store.runstore import RunStore


def test_every_error_kind_is_an_outcome_and_counts_lead_with_offered_and_sent() -> None:
    assert OUTCOMES[0] == "ok" and set(ERROR_KINDS) == set(OUTCOMES) - {"ok"}
    assert COUNTS == ("offered", "sent", *OUTCOMES)


def test_records_hold_the_counts_in_order() -> None:
    for record in (Sample, RequestSample):
        names = [f.name for f in dataclasses.fields(record)]
        start = names.index("offered")
        assert tuple(names[start:start + len(COUNTS)]) == COUNTS, record
    counters = Counters(hosts=2, requests=2)
    for position, name in enumerate(COUNTS):
        setattr(counters, name, position + 1)
        setattr(counters.per_request[1], name, position + 10)
    assert counted(counters) == tuple(range(1, len(COUNTS) + 1))
    assert counted(counters.per_request[1]) == tuple(range(10, 10 + len(COUNTS)))
    assert set(RequestCounters.__slots__) == {*COUNTS, "latency"}


def test_the_store_tables_have_a_column_per_count(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db", create=True)
    store.close()
    db = sqlite3.connect(tmp_path / "run.db")
    for table in ("samples", "request_samples"):
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        assert set(COUNTS) <= set(columns), table
    db.close()
