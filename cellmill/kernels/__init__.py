"""Numba kernels: pure functions over arrays, float64 accumulation, no I/O."""
