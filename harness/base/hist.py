"""The latency histogram's shape, and freeing one promptly.

Every per-second latency histogram (driver, simulator, store rollups, reports) has this one shape, so
they merge exactly; the modules that make or merge them import it from here rather than from the driver.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

LATENCY_MAX_US = 3_600_000_000  # an hour, in microseconds


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, LATENCY_MAX_US, 3)


def release_histogram(histogram: HdrHistogram) -> None:
    """Free a histogram's ~190 KB counts array now. An hdrh histogram is a reference cycle (histogram <->
    its encoder), so dropping the last reference frees nothing until the cyclic GC runs: a rollup merging a
    minute of rows held all 60 decoded histograms (~11 MiB) at once, in a worker thread's malloc arena,
    and glibc keeps an arena's high-water mark, so the harness's RSS stepped up by ~10 MiB per arena. Only
    for histograms that are done with (decoded for a merge, or a second's counters once encoded)."""
    histogram.encoder = None
