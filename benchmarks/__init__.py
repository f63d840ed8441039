"""Benchmarks for ovis2-xinf: ``python -m benchmarks --help``. Never run as timed tests."""
