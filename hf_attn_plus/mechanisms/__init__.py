"""Importing this package registers every mechanism; one module per mechanism."""

from . import block_sparse, block_topk, dilated, sliding_window, topk

__all__ = ["block_sparse", "block_topk", "dilated", "sliding_window", "topk"]
