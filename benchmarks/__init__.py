"""Benchmarks, one script per op (installed as ``pykd.benchmarks``)."""
