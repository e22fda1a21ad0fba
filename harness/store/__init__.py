"""The run store: the only place that speaks SQL (schema and upgrades, writes, reads, resume)."""
