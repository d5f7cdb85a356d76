"""Pallas kernels, one folder per op: reference.py, kernel.py, api.py, bench.py."""
