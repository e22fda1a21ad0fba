"""The base layer: errors, safe files, units, YAML with lines, the histogram's shape. Imports nothing else of
harness."""
