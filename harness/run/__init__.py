"""The run: the one place that schedules I/O (fleet, driver, faults, sampling, collection)."""
