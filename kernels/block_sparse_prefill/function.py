"""Differentiable attention over a token keep mask, run as a block-sparse flash attention over its tiles.

block_sparse_attention(q, k, v, keep, scaling) == masked_attention(q, k, v, keep, scaling)[0], outputs and
gradients w.r.t. q, k, v; keep=None means plain causal attention (no mask tensor is read).
"""

from __future__ import annotations

import torch

from .._triton import require_triton, tile_size
from ..selected_decode.kernel import tile_attention_forward
from ..tile_lists import TileLists, tiles_from_keep
from .kernel import tile_attention_backward


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, keep, tiles: TileLists, scaling: float):
        out, lse = tile_attention_forward(query, key, value, keep, tiles, scaling)
        ctx.save_for_backward(query, key, value, keep, out, lse)
        ctx.tiles = tiles
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, keep, out, lse = ctx.saved_tensors
        dq, dk, dv = tile_attention_backward(grad_out, query, key, value, keep, ctx.tiles, out, lse, ctx.scaling)
        return dq, dk, dv, None, None, None


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    scaling: float,
    tiles: TileLists | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """query [B, Hq, q, D], key/value [B, Hkv, kv, D|Dv], keep bool broadcastable to [B, Hq, q, kv] or None
    (causal) -> [B, Hq, q, Dv]. `tiles` (from a block-level selection) skips deriving them from `keep`."""
    require_triton(query)
    if tiles is None:
        if keep is None:
            raise ValueError("block_sparse_attention needs `keep` or `tiles`")
        block_m, block_n = block_m or tile_size(query.dtype), block_n or tile_size(query.dtype)
        tiles = tiles_from_keep(keep, query.shape[0], query.shape[1], key.shape[1], block_m, block_n)
    return BlockSparseAttention.apply(query, key, value, keep, tiles, scaling)
