"""Simulated fleets: the same scenario language, hosts as models, virtual time (docs/simulation.md)."""
