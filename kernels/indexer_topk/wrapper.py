"""The indexer top-k selection on the kernel: sortable candidate keys from the Triton pass, then one torch.topk.

Fused in Triton (kernel.py): the index-query x index-key products of all indexer heads, ReLU, head weighting and
sum, the visibility / padding / sink / window exclusions, the packing of (score, key index) into one sortable int64,
and, for budgets up to kernel.MAX_TOP, a running per-split top-k. Not fused: the final torch.topk over the
candidates (every key's for larger budgets: one int64 per query and key, written once), the index list -> keep mask
scatter, and the index projections themselves (IndexerWeights, plain nn.Linear). No gradient: the selection is a
discrete choice; training takes the differentiable reference scores for its KL losses.
"""

from __future__ import annotations

import torch

from ...masking import AttentionContext, indices_to_mask
from ...selection import sinks_and_window
from .kernel import INDEX_BITS, candidate_keys_kernel


@torch.no_grad()
def indexer_topk_indices(
    index_query: torch.Tensor,
    index_key: torch.Tensor,
    head_weights: torch.Tensor,
    ctx: AttentionContext,
    budget: int,
    sinks: int,
    window: int,
    splits: int | None = None,
    top_only: bool | None = None,
) -> torch.Tensor:
    """The `budget` best-scoring non-fixed visible keys of every query, [B, q, min(budget, kv)] long, unordered;
    -1 fills the slots of queries with fewer candidates. Inputs as IndexerWeights.forward returns them."""
    keys = candidate_keys_kernel(index_query, index_key, head_weights, ctx, sinks, window, budget, splits, top_only)
    top = keys.topk(min(budget, index_key.shape[1]), dim=-1, sorted=False).values
    return torch.where(top >= 0, top & ((1 << INDEX_BITS) - 1), -1)


@torch.no_grad()
def indexer_topk_keep(
    index_query: torch.Tensor,
    index_key: torch.Tensor,
    head_weights: torch.Tensor,
    ctx: AttentionContext,
    budget: int,
    sinks: int,
    window: int,
    splits: int | None = None,
    top_only: bool | None = None,
) -> torch.Tensor:
    """Keep mask [B, 1, q, kv]: sinks + window + the indexed keys; equals reference.select exactly."""
    indices = indexer_topk_indices(index_query, index_key, head_weights, ctx, budget, sinks, window, splits, top_only)
    return sinks_and_window(ctx, sinks, window) | indices_to_mask(indices, index_key.shape[1])
