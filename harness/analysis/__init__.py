"""Analysis: pure functions over what the store reads (report model, expectations, compare, statistics, trends,
regressions, calibration)."""
