"""HDR histograms filled in batches: what `HdrHistogram.record_value` does per value, done per array.

hdrh's record_value is pure Python (~1 µs a value); the driver records two values per request (latency
and send lag), so it collects them in lists and adds each second's batch here at numpy speed. The
counts index is hdrh's own formula, element by element, so counts, percentiles, min, max and the
encoded form are exactly those record_value would give (tests/unit/run/test_hdrbatch.py checks it). Driver
workers ship their histograms as sparse (index, count) arrays, merged here into the parent's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hdrh.histogram import HdrHistogram


def counts_view(histogram: HdrHistogram) -> np.ndarray:
    """The histogram's own counts array (a ctypes array of 64-bit counters), as numpy, writable."""
    return np.ctypeslib.as_array(histogram.counts)


def counts_indexes(histogram: HdrHistogram, values: np.ndarray) -> np.ndarray:
    """hdrh's _counts_index_for(value) for each value (values >= 0, int64)."""
    h = histogram
    # 64 - clz(v | mask) is v's bit length; frexp's exponent is exactly that for integers below 2**53.
    bit_length = np.frexp((values | h.sub_bucket_mask).astype(np.float64))[1].astype(np.int64)
    bucket = bit_length - h.unit_magnitude - (h.sub_bucket_half_count_magnitude + 1)
    sub_bucket = values >> (bucket + h.unit_magnitude)
    return ((bucket + 1) << h.sub_bucket_half_count_magnitude) + sub_bucket - h.sub_bucket_half_count


def record_many(histogram: HdrHistogram, values: np.ndarray) -> None:
    """record_value(v) for every v, in one go (values hdrh would refuse are refused alike)."""
    values = np.asarray(values, dtype=np.int64)
    if not len(values):
        return
    values = values[values >= 0]
    index = counts_indexes(histogram, values)
    valid = (index >= 0) & (index < histogram.counts_len)
    if not valid.all():
        values, index = values[valid], index[valid]
    if not len(values):
        return
    counts_view(histogram)[:] += np.bincount(index, minlength=histogram.counts_len).astype(np.uint64)
    histogram.total_count += len(values)
    histogram.min_value = min(histogram.min_value, int(values.min()))
    histogram.max_value = max(histogram.max_value, int(values.max()))


def micros(nows: list[float], counts: list[int], dues: list[float], maximum: int) -> np.ndarray:
    """`min(max(int((now - due) * 1e6), 1), maximum)` per due, the way the driver defines a latency,
    for dues recorded in runs that share a `now` (counts[i] dues at nows[i])."""
    if not dues:
        return np.zeros(0, dtype=np.int64)
    elapsed = (np.repeat(np.asarray(nows, dtype=np.float64), counts) - np.asarray(dues, dtype=np.float64)) * 1e6
    return np.clip(elapsed.astype(np.int64), 1, maximum)   # astype truncates toward zero, as int() does


@dataclass
class Sparse:
    """A histogram's non-zero counters, its raw min and max, and its total: what a worker sends."""

    index: np.ndarray
    counts: np.ndarray
    min_value: int
    max_value: int
    total: int


def to_sparse(histogram: HdrHistogram) -> Sparse:
    counts = counts_view(histogram)
    index = np.flatnonzero(counts)
    return Sparse(index, counts[index].copy(), histogram.min_value, histogram.max_value, histogram.total_count)


def add_sparse(histogram: HdrHistogram, part: Sparse) -> None:
    """Add another histogram's counts: the same as having recorded its values here."""
    if not part.total:
        return
    counts_view(histogram)[part.index] += part.counts
    histogram.total_count += part.total
    histogram.min_value = min(histogram.min_value, part.min_value)
    histogram.max_value = max(histogram.max_value, part.max_value)
