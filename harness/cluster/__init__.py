"""Runs spread over a Dask distributed cluster (`--cluster ADDRESS`, docs/cluster.md).

The engine is an optional dependency (`pip install 'harness[cluster]'`); nothing here is imported by a
run without `--cluster`.
"""
