"""Which key tiles each block of query rows must read: the sparse layout every attention kernel here walks.

Rows pack the query heads of one KV group with their queries, row r = (head h = hkv*group + r // q_len,
query r % q_len), so one K/V tile read serves every query head of its group (GQA). Rows form blocks of
`block_m`, keys form physical tiles of `block_n` consecutive cache slots. A tile list is a compact int32 index
list per (batch, kv head, row block) plus its length, like FlexAttention's kv_indices / kv_num_blocks; tiles
outside it hold no kept key of any row in the block, and the kernels apply the exact per-token keep mask inside.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class TileLists:
    indices: torch.Tensor  # [B, Hkv, row_blocks, tiles] int32: tiles to read, first `counts` entries valid
    counts: torch.Tensor  # [B, Hkv, row_blocks] int32
    usage: torch.Tensor  # [B, Hkv, row_blocks, tiles] bool: the same lists as a dense map (for the transposed walk)
    block_m: int
    block_n: int


def compact(used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., n] -> (indices [..., n] int32 with the True positions first in increasing order, counts [...])."""
    order = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices
    return order.to(torch.int32).contiguous(), used.sum(-1, dtype=torch.int32).contiguous()


def grouped_rows(keep: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Keep mask broadcastable to [B, Hq, q, kv] -> [B, Hkv, group*q, kv] in the row order the kernels use."""
    batch, q_heads, q_len, kv_len = keep.shape
    return keep.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, kv_len)


def tile_usage(keep: torch.Tensor, kv_heads: int, block_m: int, block_n: int) -> torch.Tensor:
    """Whether any row of a row block keeps any key of a tile: bool [B, Hkv, row_blocks, tiles]."""
    rows = grouped_rows(keep, kv_heads)
    num_rows, kv_len = rows.shape[-2:]
    pad_rows = -num_rows % block_m
    pad_keys = -kv_len % block_n
    rows = F.pad(rows, (0, pad_keys, 0, pad_rows))
    b, h, r, n = rows.shape
    return rows.reshape(b, h, r // block_m, block_m, n // block_n, block_n).any(dim=5).any(dim=3)


def tiles_from_keep(
    keep: torch.Tensor, batch: int, q_heads: int, kv_heads: int, block_m: int, block_n: int
) -> TileLists:
    """Tile lists covering a token keep mask (broadcastable to [batch, q_heads, q, kv])."""
    keep = keep.expand(batch, q_heads, *keep.shape[-2:])
    return tiles_from_usage(tile_usage(keep, kv_heads, block_m, block_n), block_m, block_n)


def tiles_from_blocks(
    chosen: torch.Tensor, first: torch.Tensor, last: torch.Tensor, kv_len: int, kv_heads: int, block_m: int, block_n: int
) -> TileLists:
    """Tile lists covering every slot of every chosen key block, without a per-token mask.

    chosen [B, Hq, q, num_blocks] bool; first/last [B, num_blocks]: the cache slots a block's keys span (blocks are
    numbered by real position, so with left padding block j spans slots pad + j*bs .. pad + (j+1)*bs - 1 and may
    straddle two tiles). Per row block, the union over its rows (the query heads of a KV group) of the tiles from
    first // block_n to last // block_n, marked by a +1/-1 difference array and a prefix sum over the tiles.
    """
    batch, q_heads, q_len, num_blocks = chosen.shape
    rows = grouped_rows(chosen, kv_heads)
    rows = F.pad(rows, (0, 0, 0, -rows.shape[-2] % block_m))
    used = rows.reshape(batch, kv_heads, -1, block_m, num_blocks).any(dim=3).to(torch.int32)
    num_tiles = -(-kv_len // block_n)
    # Blocks without keys in a row (never chosen) have no valid span: clamp them anywhere in range.
    start = (first.clamp(max=kv_len - 1) // block_n)[:, None, None, :].expand_as(used)
    stop = (last.clamp(min=0) // block_n + 1)[:, None, None, :].expand_as(used)
    edges = used.new_zeros(*used.shape[:-1], num_tiles + 1)
    edges.scatter_add_(-1, start, used).scatter_add_(-1, stop, -used)
    return tiles_from_usage(edges.cumsum(-1)[..., :num_tiles] > 0, block_m, block_n)


def tiles_from_usage(usage: torch.Tensor, block_m: int, block_n: int) -> TileLists:
    return TileLists(*compact(usage), usage, block_m, block_n)


def transposed(tiles: TileLists) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile, the row blocks that read it (the backward pass's dK/dV walk): ([B, Hkv, T, R], [B, Hkv, T])."""
    return compact(tiles.usage.transpose(-1, -2))
