"""Kernels: one module per op, each a torch reference, a fast path and one dispatch point."""
