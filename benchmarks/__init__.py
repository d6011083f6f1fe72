"""Benchmarks, run on demand: `python -m benchmarks.<name>`; each prints a table and a same-run baseline ratio."""
