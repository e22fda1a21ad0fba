"""The plan: what a run does, derived from the scenario and its seed alone (pure, no I/O)."""
