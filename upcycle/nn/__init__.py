"""Model building blocks that are not kernels: `routing` (top-k routing, router losses).

The products of the experts themselves live in `upcycle.kernels` (the top-level `kernels/`
folder); this package imports torch only.
"""
