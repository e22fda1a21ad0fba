"""Fault kinds on the timeline: shim faults (allocations, locks), network faults (the fault proxy), resource faults
(cgroup limits)."""
