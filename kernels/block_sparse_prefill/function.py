"""Differentiable attention over a structured key set, run as a block-sparse flash attention over its tiles.

block_sparse_attention(q, k, v, keys, scaling) == hf_attn_plus.chunked_attention.selected_attention over the same
selection, outputs and gradients w.r.t. q, k, v (the key set is a constant).
"""

from __future__ import annotations

import torch

from .._triton import require_triton, tile_size
from ..key_sets import KeySet
from ..selected_decode.kernel import tile_attention_forward
from ..tile_lists import TileLists, tiles_for
from .kernel import tile_attention_backward


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, keys: KeySet, tiles: TileLists, scaling: float):
        out, lse = tile_attention_forward(query, key, value, keys, tiles, scaling)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.keys, ctx.tiles, ctx.scaling = keys, tiles, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = tile_attention_backward(grad_out, query, key, value, ctx.keys, ctx.tiles, out, lse, ctx.scaling)
        return dq, dk, dv, None, None, None


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: KeySet,
    scaling: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """query [B, Hq, q, D], key/value [B, Hkv, kv, D|Dv] -> [B, Hq, q, Dv] over the keys `keys` keeps."""
    require_triton(query)
    block_m, block_n = block_m or tile_size(query.dtype), block_n or tile_size(query.dtype)
    tiles = tiles_for(keys, query.shape[1], key.shape[1], key.shape[2], block_m, block_n)
    return BlockSparseAttention.apply(query, key, value, keys, tiles, scaling)
