"""Encoded HDR histograms by the thousand (a night has one per second): merging them, and encoding them.

merge_encoded(): HdrHistogram.decode_and_add() builds a whole histogram object per blob (allocating and
then adding its ~190 KB of counters): ~250 us each, seconds for a night's 28,800 samples. Here each blob
goes through hdrh's own C decoder (pyhdrh.decode) into one scratch array, whose few non-zero counters are
added to a numpy accumulator and zeroed again; the result is an ordinary HdrHistogram with the same
counters, total, minimum and maximum as decode_and_add() would give.

Encoder: HdrHistogram.encode() allocates and zeroes a buffer of 9 bytes per counter up to the largest
value on every call; an Encoder keeps one and calls the same C encoder (pyhdrh.encode), giving the same
bytes. tests/unit/analysis/test_histmerge.py checks both against hdrh.
"""

from __future__ import annotations

import base64
import ctypes
import zlib
from collections.abc import Iterable

import numpy as np
import pyhdrh
from hdrh.codec import ext_header_size, payload_header_size
from hdrh.histogram import HdrHistogram

from harness.base.hist import new_histogram

WORD = 8


def merge_encoded(blobs: Iterable[bytes], into: HdrHistogram | None = None) -> HdrHistogram:
    """One histogram holding the sum of the encoded ones (base64-wrapped V2 blobs, as encode() gives),
    added to `into` (a new histogram of the driver's shape when None)."""
    histogram = into if into is not None else new_histogram()
    length = histogram.counts_len
    scratch = (ctypes.c_int64 * length)()
    scratch_view = np.frombuffer(scratch, dtype=np.int64)
    total = np.zeros(length, dtype=np.int64)
    low, high, count = length, -1, 0
    for blob in blobs:
        data = zlib.decompress(base64.b64decode(blob)[ext_header_size:])
        # the C decoder writes the non-zero counters only, so the scratch array stays zero elsewhere
        found = pyhdrh.decode(data, payload_header_size, ctypes.addressof(scratch), length, WORD)
        if not found["total"]:
            continue
        first, last = found["min_nonzero_index"], found["max_nonzero_index"]
        total[first:last + 1] += scratch_view[first:last + 1]
        scratch_view[first:last + 1] = 0
        low, high, count = min(low, first), max(high, last), count + found["total"]
    if count:
        counters = np.frombuffer(histogram.counts, dtype=np.int64)
        counters += total
        if histogram.total_count:
            low = min(low, histogram.get_counts_array_index(histogram.min_value))
            high = max(high, histogram.get_counts_array_index(histogram.max_value))
        histogram.set_internal_tacking_values(low, high, histogram.total_count + count)
    return histogram


class Encoder:
    """histogram.encode(), for one histogram encoded again and again (recorded, encoded, cleared)."""

    def __init__(self, histogram: HdrHistogram):
        self.histogram = histogram
        self.buffer = (ctypes.c_byte * (payload_header_size + histogram.counts_len * (WORD + 1)))()

    def encode(self) -> bytes:
        histogram, encoder = self.histogram, self.histogram.encoder
        limit = histogram.get_counts_array_index(histogram.max_value) + 1 if histogram.total_count else 0
        header = encoder.payload.payload            # the payload's header: cookie, lengths, the histogram's shape
        start = ctypes.addressof(self.buffer)
        header.payload_len = pyhdrh.encode(ctypes.addressof(histogram.counts), limit, WORD,
                                           start + payload_header_size, limit * (WORD + 1))
        ctypes.memmove(start, ctypes.addressof(header), payload_header_size)
        compressed = zlib.compress(ctypes.string_at(start, payload_header_size + header.payload_len))
        encoder.header.length = len(compressed)
        return base64.b64encode(ctypes.string_at(ctypes.addressof(encoder.header), ext_header_size) + compressed)
