"""Importing this package registers every mechanism; one module per mechanism."""

from . import (
    block_sparse,
    block_topk,
    dilated,
    gated_delta,
    head_budget,
    hybrid,
    indexer_topk,
    lighthouse,
    linear,
    momentum_delta,
    santa,
    sliding_window,
    stochastic_routing,
    topk,
)

__all__ = [
    "block_sparse",
    "block_topk",
    "dilated",
    "gated_delta",
    "head_budget",
    "hybrid",
    "indexer_topk",
    "lighthouse",
    "linear",
    "momentum_delta",
    "santa",
    "sliding_window",
    "stochastic_routing",
    "topk",
]
