"""Triton kernels for the hot path (one module per op family)."""
