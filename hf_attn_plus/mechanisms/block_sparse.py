"""block_sparse (prefill; MInference / XAttention / FlexPrefill estimation, S2O early stop): queries and keys form
blocks of `block_size` by position; for each query block the key blocks it sees are ranked by an estimate of their
attention mass (softmax of mean-pooled query · mean-pooled key) and kept in that order until the kept share of the
estimated mass reaches `threshold`; `sink_blocks` leading and `local_blocks` trailing blocks are always kept.
threshold=1.0 is dense causal attention."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernels.sparse_attention import selection_kernel
from ..masking import AttentionContext
from ..options import float_option, int_option
from ..reference import default_scaling
from ..registry import Mechanism, register
from ..selection import (
    blocks_to_keys,
    grouped_scores,
    key_blocks,
    mass_ranked_blocks,
    pooled_blocks,
    visible_blocks,
)


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> torch.Tensor:
    batch, q_heads, q_len, _ = query.shape
    size = opts.block_size
    k_blocks = key_blocks(ctx, size)
    q_blocks = torch.where(ctx.query_pos >= 0, ctx.query_pos // size, -1).reshape(batch, q_len)
    num_k, num_q = int(k_blocks.max()) + 1, max(int(q_blocks.max()) + 1, 1)
    # Candidates of a query block: the key blocks any of its queries sees.
    seen = pooled_blocks(visible_blocks(ctx, k_blocks, num_k).float(), q_blocks, num_q) > 0
    logits = grouped_scores(pooled_blocks(query, q_blocks, num_q), pooled_blocks(key, k_blocks.reshape(batch, -1), num_k))
    chosen = mass_ranked_blocks(logits * default_scaling(query), seen, opts.threshold)
    block_idx = torch.arange(num_k, device=query.device)
    q_block_idx = torch.arange(num_q, device=query.device)[:, None]
    chosen |= seen & ((block_idx < opts.sink_blocks) | (q_block_idx - block_idx < opts.local_blocks))
    per_query = chosen.gather(2, q_blocks.clamp(min=0).reshape(batch, 1, q_len, 1).expand(batch, q_heads, q_len, num_k))
    return blocks_to_keys(per_query, k_blocks, ctx)


MECHANISM = register(
    Mechanism(
        name="block_sparse",
        family="sparse",
        summary="per query block, key blocks by estimated attention mass until a threshold share (prefill)",
        options=(
            int_option("block_size", 64, 1, "queries and keys per block"),
            float_option("threshold", 0.9, 0.0, "share of estimated attention mass to keep; 1.0 = dense", 1.0),
            int_option("sink_blocks", 1, 0, "leading key blocks always attended"),
            # >= 1: the diagonal block holds the query block's own keys, which pooled estimates judge poorly.
            int_option("local_blocks", 1, 1, "the query's block and the ones before it, always attended"),
        ),
        select=select,
        kernel=selection_kernel(select),
    )
)
