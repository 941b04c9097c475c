"""What the indexer kernel must equal, in plain PyTorch (the mechanism's own reference path)."""

from __future__ import annotations

import torch

from ...masking import AttentionContext
from ...mechanisms.indexer_topk import fp32_indexer_scores, select_by_scores
from ...selection import sinks_and_window


def masked_scores(
    index_query: torch.Tensor, index_key: torch.Tensor, head_weights: torch.Tensor, ctx: AttentionContext, sinks: int, window: int
) -> torch.Tensor:
    """fp32 scores [B, q, kv], -inf where the key is hidden, a sink or in the window (not a top-k candidate)."""
    candidates = ctx.visible & ~sinks_and_window(ctx, sinks, window)
    return fp32_indexer_scores(index_query, index_key, head_weights).masked_fill(~candidates, float("-inf"))[:, 0]


def select(
    index_query: torch.Tensor,
    index_key: torch.Tensor,
    head_weights: torch.Tensor,
    ctx: AttentionContext,
    budget: int,
    sinks: int,
    window: int,
) -> torch.Tensor:
    """Keep mask [B, 1, q, kv] of indexer_topk's reference path."""
    return select_by_scores(fp32_indexer_scores(index_query, index_key, head_weights), ctx, budget, sinks, window)
