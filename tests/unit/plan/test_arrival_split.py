"""The arrival process split across driver workers is the scenario's: each worker's share is a Poisson
process of rate r(t)/W (counts per second match Λ(t)/W; time-rescaled gaps are Exp(1)), the shares are
disjoint and their union is exactly the single-process stream for the seed, whatever W. Pure logic,
fixed seeds; statistical bounds are 5 sigma (see test_plan_balancer.py)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from harness.scenario.loadshape import LoadShape, PhaseSpec
from harness.plan.streams import CHUNK, arrival_chunks, arrivals
from harness.scenario.model import Keys

SHAPE = LoadShape.build([PhaseSpec("ramp", None, 20, rate_from=100, rate_to=3000),
                         PhaseSpec("spike", None, 5, factor=2), PhaseSpec("hold", None, 10),
                         PhaseSpec("hold", None, 3, rate_to=0), PhaseSpec("ramp", None, 6, rate_from=500, rate_to=50)])
KEYS = Keys(space=5000, distribution="zipf")
WEIGHTS = (5.0, 3.0, 2.0)


def share(worker: int, workers: int, seed: int = 21, start_at: float = 0.0) -> list[tuple[int, float, int, int]]:
    return [row for chunk in arrival_chunks(SHAPE, KEYS, seed, WEIGHTS, worker=worker, workers=workers,
                                            start_at=start_at)
            for row in zip(chunk.index, chunk.t, chunk.key, chunk.request)]


def within_poisson(count: int, mean: float, sigmas: float = 5.0) -> bool:
    return abs(count - mean) <= sigmas * math.sqrt(max(mean, 1.0))


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_union_of_the_shares_is_the_single_process_stream(workers: int) -> None:
    single = share(0, 1)
    assert len(single) > 10 * CHUNK    # several chunks, so chunk boundaries are crossed
    shares = [share(w, workers) for w in range(workers)]
    indexes = [row[0] for part in shares for row in part]
    assert len(indexes) == len(set(indexes)), "an arrival went to two workers"
    assert sorted((row for part in shares for row in part), key=lambda row: row[0]) == single
    assert all(part for part in shares)
    # The same as the Arrival stream the rest of the harness reads (keys by name).
    assert [(a.index, a.t, int(a.key[1:]), a.request)
            for a in arrivals(SHAPE, KEYS, 21, WEIGHTS)] == single


@pytest.mark.parametrize("workers", [2, 3])
def test_each_share_follows_lambda_over_workers_second_by_second(workers: int) -> None:
    for worker in range(workers):
        per_second = Counter(int(t) for _, t, _, _ in share(worker, workers))
        for second in range(int(SHAPE.duration)):
            mean = (SHAPE.expected(second + 1) - SHAPE.expected(second)) / workers
            assert within_poisson(per_second[second], mean), (worker, second, per_second[second], mean)
        total = sum(per_second.values())
        assert within_poisson(total, SHAPE.total_expected / workers)


@pytest.mark.parametrize("workers", [2, 4])
def test_each_share_is_a_poisson_process_of_rate_r_over_workers(workers: int) -> None:
    """Λ(t_i)/W - Λ(t_{i-1})/W over one worker's arrivals is Exp(1): mean 1, variance 1 (and the
    dispersion of per-second counts around their means is that of Poisson counts)."""
    for worker in range(workers):
        marks = np.array([SHAPE.expected(t) / workers for _, t, _, _ in share(worker, workers)])
        gaps = np.diff(np.concatenate(([0.0], marks)))
        n = len(gaps)
        assert abs(gaps.mean() - 1) < 5 / math.sqrt(n)
        assert abs(gaps.var() - 1) < 5 * math.sqrt(8 / n)


def test_shares_are_independent_of_each_other() -> None:
    """Per-second counts of two workers, less their means, are uncorrelated (thinning by independent marks)."""
    a = Counter(int(t) for _, t, _, _ in share(0, 2))
    b = Counter(int(t) for _, t, _, _ in share(1, 2))
    seconds = [s for s in range(int(SHAPE.duration)) if SHAPE.expected(s + 1) > SHAPE.expected(s)]
    means = [(SHAPE.expected(s + 1) - SHAPE.expected(s)) / 2 for s in seconds]
    da = np.array([(a[s] - m) / math.sqrt(m) for s, m in zip(seconds, means)])
    db = np.array([(b[s] - m) / math.sqrt(m) for s, m in zip(seconds, means)])
    correlation = float(np.corrcoef(da, db)[0, 1])
    assert abs(correlation) < 5 / math.sqrt(len(seconds)), correlation


def test_the_split_is_seeded_the_same_every_time_and_differs_by_seed() -> None:
    assert share(1, 3) == share(1, 3)
    assert [row[0] for row in share(0, 2, seed=21)][:200] != [row[0] for row in share(0, 2, seed=22)][:200]


def test_mix_and_keys_are_the_same_with_or_without_workers() -> None:
    """Splitting changes who sends an arrival, never its time, key or request."""
    single = {row[0]: row for row in share(0, 1)}
    for row in share(1, 2):
        assert single[row[0]] == row
    requests = Counter(row[3] for row in single.values())
    n = len(single)
    for request, weight in enumerate(WEIGHTS):
        p = weight / sum(WEIGHTS)
        assert abs(requests[request] / n - p) < 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("workers", [1, 3])
def test_resume_point_skips_exactly_the_arrivals_before_it(workers: int) -> None:
    for worker in range(workers):
        whole = share(worker, workers)
        assert share(worker, workers, start_at=17.25) == [row for row in whole if row[1] >= 17.25]


def test_no_arrivals_where_the_rate_is_zero_and_none_past_the_end() -> None:
    for worker in range(2):
        times = [t for _, t, _, _ in share(worker, 2)]
        assert all(not 35 <= t < 38 for t in times)
        assert all(b > a for a, b in zip(times, times[1:]))
        assert times[-1] < SHAPE.duration
