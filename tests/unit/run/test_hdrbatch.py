"""Batched HDR recording (harness/run/hdrbatch.py) gives exactly what hdrh's record_value gives, and histograms
merged from driver workers' sparse counts are exactly the histogram of every value. Pure logic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from harness.run.driver import Counters
from harness.base.hist import LATENCY_MAX_US, new_histogram
from harness.run.driverpool import merge_counters, pack_counters
from harness.run.hdrbatch import add_sparse, counts_view, micros, record_many, to_sparse

EDGES = [0, 1, 2, 3, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 65535, 65536, 10**6, 2**31 - 1, 2**31, 2**32,
         LATENCY_MAX_US - 1, LATENCY_MAX_US, LATENCY_MAX_US + 1, 2 * LATENCY_MAX_US, -1, -1000]
PERCENTILES = (0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0)


def one_by_one(values: list[int]):
    histogram = new_histogram()
    for value in values:
        histogram.record_value(value)
    return histogram


def assert_same(a, b) -> None:
    assert np.array_equal(counts_view(a), counts_view(b))
    assert (a.total_count, a.min_value, a.max_value) == (b.total_count, b.min_value, b.max_value)
    for q in PERCENTILES:
        assert a.get_value_at_percentile(q) == b.get_value_at_percentile(q), q
    assert a.get_max_value() == b.get_max_value() and a.get_min_value() == b.get_min_value()
    assert a.get_mean_value() == b.get_mean_value()
    assert a.encode() == b.encode()


def test_record_many_equals_record_value_on_edges_and_a_wide_spread() -> None:
    rng = np.random.default_rng(7)
    values = EDGES + rng.lognormal(6, 3, 50_000).astype(np.int64).tolist() + rng.integers(0, 5000, 5000).tolist()
    batched = new_histogram()
    record_many(batched, np.array(values))
    assert_same(one_by_one(values), batched)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=-10, max_value=2 * LATENCY_MAX_US), max_size=300))
def test_record_many_equals_record_value_for_any_values(values: list[int]) -> None:
    batched = new_histogram()
    record_many(batched, np.array(values, dtype=np.int64))
    assert_same(one_by_one(values), batched)


def test_batches_add_up_like_single_records() -> None:
    values = np.random.default_rng(3).integers(1, 10**7, 20_000)
    batched = new_histogram()
    for part in np.array_split(values, 7):
        record_many(batched, part)
    assert_same(one_by_one(values.tolist()), batched)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=1e5, allow_nan=False),
                          st.lists(st.floats(min_value=-10, max_value=1e5, allow_nan=False), min_size=1, max_size=5)),
                max_size=20))
def test_micros_is_the_drivers_latency_formula(runs: list[tuple[float, list[float]]]) -> None:
    """Per due: min(max(int((now - due) * 1e6), 1), max) as the driver wrote it per reply, incl. negatives."""
    nows = [now for now, dues in runs]
    counts = [len(dues) for now, dues in runs]
    dues = [due for now, ds in runs for due in ds]
    expected = [min(max(int((now - due) * 1e6), 1), LATENCY_MAX_US) for now, ds in runs for due in ds]
    assert micros(nows, counts, dues, LATENCY_MAX_US).tolist() == expected


@pytest.mark.parametrize("parts", [2, 3, 8])
def test_sparse_merge_of_a_split_equals_the_whole(parts: int) -> None:
    rng = np.random.default_rng(parts)
    values = np.concatenate([rng.lognormal(5, 2, 30_000).astype(np.int64) + 1, [1, LATENCY_MAX_US]])
    owner = rng.integers(0, parts, len(values))
    whole = new_histogram()
    record_many(whole, values)
    merged = new_histogram()
    for part in range(parts):
        piece = new_histogram()
        record_many(piece, values[owner == part])
        add_sparse(merged, to_sparse(piece))
    assert_same(whole, merged)


def test_counters_merged_from_workers_equal_one_drivers() -> None:
    """Scalars, per-host counts, reply kinds, statuses and per-request histograms of a mix."""
    rng = np.random.default_rng(11)
    whole = Counters(3, 2)
    shares = [Counters(3, 2) for _ in range(2)]
    for i in range(5000):
        now, due = 10.0 + i * 1e-4, 10.0 + i * 1e-4 - float(rng.exponential(0.002))
        request, host, worker = int(rng.integers(0, 2)), int(rng.integers(0, 3)), int(rng.integers(0, 2))
        for c in (whole, shares[worker]):
            c.offered += 1
            c.sent += 1
            c.host_sent[host] += 1
            c.per_request[request].offered += 1
            if i % 17 == 0:
                c.bad_reply += 1
                c.bad_kinds["http_5xx"] = c.bad_kinds.get("http_5xx", 0) + 1
                c.status[503] = c.status.get(503, 0) + 1
                continue
            c.ok += 1
            c.host_ok[host] += 1
            c.status[200] = c.status.get(200, 0) + 1
            c.per_request[request].ok += 1
            c.lat_nows.append(now)
            c.lat_counts.append(1)
            c.lat_dues.append(due)
            c.lat_requests.append(request)
    whole.finish()
    merged = Counters(3, 2)
    for share in shares:
        share.finish()
        merge_counters(merged, pack_counters(share))
    for name in ("offered", "sent", "ok", "bad_reply", "host_sent", "host_ok", "host_errors", "bad_kinds", "status"):
        assert getattr(merged, name) == getattr(whole, name), name
    assert_same(whole.latency, merged.latency)
    for mine, theirs in zip(merged.per_request, whole.per_request):
        assert (mine.offered, mine.ok) == (theirs.offered, theirs.ok)
        assert_same(theirs.latency, mine.latency)
