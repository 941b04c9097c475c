"""The indexer top-k selection on the kernel: sortable candidate keys from the Triton pass, then one torch.topk.

Fused in Triton (kernel.py): the index-query x index-key products of all indexer heads, ReLU, head weighting and
sum, the visibility / padding / sink / window exclusions, the packing of (score, key index) into one sortable int64,
and, for budgets up to kernel.max_top(dtype), a running per-split top-k. Not fused: the final torch.topk over the
candidates (for larger budgets every key's: one int64 per query and key, written once, in query chunks that bound
that buffer in long prefills), the index list -> keep mask scatter, and the index projections themselves
(IndexerWeights, plain nn.Linear). No gradient: the selection is a discrete choice; training takes the
differentiable reference scores for its KL losses.
"""

from __future__ import annotations

import dataclasses

import torch

from ...masking import AttentionContext, indices_to_mask
from ...selection import sinks_and_window
from .kernel import INDEX_BITS, candidate_keys_kernel


# Candidate keys held at once (int64 each): long prefills are cut into query chunks below this.
MAX_CANDIDATES = 1 << 25


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
    query_chunk: int | None = None,
) -> torch.Tensor:
    """The `budget` best-scoring non-fixed visible keys of every query, [B, q, min(budget, kv)] long, unordered;
    -1 fills the slots of queries with fewer candidates. Inputs as IndexerWeights.forward returns them; queries are
    processed `query_chunk` at a time (default: MAX_CANDIDATES candidate keys at once)."""
    batch, _, q_len, _ = index_query.shape
    kv_len = index_key.shape[1]
    query_chunk = query_chunk or max(1, MAX_CANDIDATES // (batch * kv_len))
    chunks = []
    for start in range(0, q_len, query_chunk):
        rows = slice(start, start + query_chunk)
        chunk_ctx = dataclasses.replace(
            ctx, query_pos=ctx.query_pos[:, :, rows], restrict=None if ctx.restrict is None else ctx.restrict[:, :, rows]
        )
        keys = candidate_keys_kernel(
            index_query[:, :, rows], index_key, head_weights[:, :, rows], chunk_ctx, sinks, window, budget, splits, top_only
        )
        chunks.append(keys.topk(min(budget, kv_len), dim=-1, sorted=False).values)
    top = torch.cat(chunks, dim=1)
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
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Keep mask [B, 1, q, kv]: sinks + window + the indexed keys; equals reference.select exactly."""
    indices = indexer_topk_indices(
        index_query, index_key, head_weights, ctx, budget, sinks, window, splits, top_only, query_chunk
    )
    return sinks_and_window(ctx, sinks, window) | indices_to_mask(indices, index_key.shape[1])
