"""harness.analysis.histmerge merges encoded HDR histograms exactly as HdrHistogram.decode_and_add does."""

from __future__ import annotations

import random

import pytest

from harness.base.hist import LATENCY_MAX_US, new_histogram, release_histogram
from harness.analysis.histmerge import Encoder, merge_encoded


def _blobs(rng: random.Random, count: int) -> list[bytes]:
    blobs = []
    for _ in range(count):
        histogram = new_histogram()
        for _ in range(rng.randint(0, 40)):
            value = rng.choice([rng.randint(1, 2000), rng.randint(1, LATENCY_MAX_US), int(rng.lognormvariate(11, 1))])
            histogram.record_value(min(max(value, 1), LATENCY_MAX_US), rng.randint(1, 10**6))
        blobs.append(histogram.encode())
        release_histogram(histogram)
    return blobs


@pytest.mark.slow
def test_merge_equals_decode_and_add() -> None:
    rng = random.Random(7)
    for case in range(40):
        blobs = _blobs(rng, rng.randint(0, 30))
        expected = new_histogram()
        for blob in blobs:
            expected.decode_and_add(blob)
        merged = merge_encoded(blobs)
        assert merged.get_total_count() == expected.get_total_count()
        assert list(merged.counts) == list(expected.counts)
        assert merged.get_max_value() == expected.get_max_value()
        for q in (0.1, 50, 90, 99, 99.9, 100):
            assert merged.get_value_at_percentile(q) == expected.get_value_at_percentile(q), (case, q)
        assert merged.encode() == expected.encode()


def test_merge_adds_to_a_histogram_that_already_holds_counts() -> None:
    rng = random.Random(11)
    first, second = _blobs(rng, 5), _blobs(rng, 5)
    expected = new_histogram()
    for blob in first + second:
        expected.decode_and_add(blob)
    merged = merge_encoded(second, into=merge_encoded(first))
    assert list(merged.counts) == list(expected.counts)
    assert merged.get_total_count() == expected.get_total_count()
    assert merged.get_max_value() == expected.get_max_value()
    assert merged.get_value_at_percentile(99) == expected.get_value_at_percentile(99)


def test_encoder_gives_the_bytes_of_encode_again_and_again() -> None:
    rng = random.Random(13)
    histogram = new_histogram()
    encoder = Encoder(histogram)
    assert encoder.encode() == histogram.encode()                  # empty
    for _ in range(60):
        fresh = new_histogram()
        for _ in range(rng.randint(1, 20)):
            value, count = rng.randint(1, LATENCY_MAX_US), rng.randint(1, 10**9)
            histogram.record_value(value, count)
            fresh.record_value(value, count)
        assert encoder.encode() == fresh.encode() == histogram.encode()
        histogram.reset()
