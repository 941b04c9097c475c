"""Importing this package registers every mechanism; one module per mechanism."""

from . import block_sparse, block_topk, dilated, gated_delta, hybrid, linear, momentum_delta, sliding_window, topk

__all__ = [
    "block_sparse",
    "block_topk",
    "dilated",
    "gated_delta",
    "hybrid",
    "linear",
    "momentum_delta",
    "sliding_window",
    "topk",
]
