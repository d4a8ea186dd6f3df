"""Benchmarks: run from the repo root as `python benchmarks/<name>.py [--quick]`."""
