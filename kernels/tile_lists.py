"""Which key tiles each block of query rows must read: the sparse layout every attention kernel here walks.

Rows pack the query heads of one KV group with their queries, row r = (head h = hkv*group + r // q_len,
query r % q_len), so one K/V tile read serves every query head of its group (GQA). Rows form blocks of
`block_m`, keys form physical tiles of `block_n` consecutive cache slots. A tile list is a compact int32 index
list per (batch, kv head, row block) plus its length, like FlexAttention's kv_indices / kv_num_blocks; tiles
outside it hold no kept key of any row in the block, and the kernels apply the exact per-token keep test inside.

`tiles_for` builds them from a key_sets.KeySet without a per-token mask: the rule's tiles analytically from each row
block's range of query positions, the listed blocks' and tokens' tiles by a +1/-1 difference array over tiles,
scattered chunk by chunk of queries. What it allocates is O(B * heads * (row blocks * tiles + q * listed)).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .key_sets import EVERY, UNUSED, KeyRule, KeySet, Visibility

# Bound on the list entries one chunk of queries scatters at once (int64 indices).
_CHUNK_ENTRIES = 2**22


@dataclasses.dataclass(frozen=True)
class TileLists:
    indices: torch.Tensor  # [B, Hkv, row_blocks, tiles] int32: tiles to read, first `counts` entries valid
    counts: torch.Tensor  # [B, Hkv, row_blocks] int32
    usage: torch.Tensor  # [B, Hkv, row_blocks, tiles] bool: the same lists as a map (for the transposed walk)
    block_m: int
    block_n: int


def compact(used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., n] -> (indices [..., n] int32 with the True positions first in increasing order, counts [...])."""
    order = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices
    return order.to(torch.int32).contiguous(), used.sum(-1, dtype=torch.int32).contiguous()


def tiles_from_usage(usage: torch.Tensor, block_m: int, block_n: int) -> TileLists:
    return TileLists(*compact(usage), usage, block_m, block_n)


def transposed(tiles: TileLists) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile, the row blocks that read it (the backward pass's dK/dV walk): ([B, Hkv, T, R], [B, Hkv, T])."""
    return compact(tiles.usage.transpose(-1, -2))


def tiles_for(keys: KeySet, q_heads: int, kv_heads: int, kv_len: int, block_m: int, block_n: int) -> TileLists:
    """Tile lists covering every key `keys` keeps, for queries of q_heads heads over kv_len key slots."""
    vis = keys.visibility
    batch, q_len = vis.query_pos.shape
    group = q_heads // kv_heads
    row_blocks, num_tiles = -(-group * q_len // block_m), -(-kv_len // block_n)
    edges = torch.zeros(batch, kv_heads, row_blocks, num_tiles + 1, dtype=torch.int32, device=vis.query_pos.device)
    for lists, size in ((keys.blocks, keys.block_size), (keys.tokens, 1)):
        if lists is not None:
            _mark_listed(edges, lists, size, vis, group, block_m, block_n)
    usage = _rule_usage(keys.rule, vis, group, row_blocks, num_tiles, block_m, block_n)
    usage = usage | (edges.cumsum(-1)[..., :num_tiles] > 0)
    if vis.restrict is not None:  # a model-given dense mask: its own tiles bound the list (it is O(q * kv) already)
        restrict = vis.restrict.expand(batch, q_heads, q_len, kv_len)
        usage = usage & mask_tile_usage(restrict, kv_heads, block_m, block_n)
    return tiles_from_usage(usage, block_m, block_n)


def _rule_usage(
    rule: KeyRule, vis: Visibility, group: int, row_blocks: int, num_tiles: int, block_m: int, block_n: int
) -> torch.Tensor:
    """Tiles holding a key the rule keeps for some row of a row block, [B, 1, row_blocks, tiles]: from the block's
    lowest and highest real query position (lo, hi) and each tile's positions [p_lo, p_hi], a superset where a
    row block straddles two heads. Sinks: p_lo < sinks; window / local blocks: the tile reaches near_start(lo)
    (near_start grows with t); dilation d: some t - s in [max(0, lo - p_hi), hi - p_lo] is a multiple of d."""
    batch, q_len = vis.query_pos.shape
    t = F.pad(vis.query_pos.long().repeat(1, group), (0, row_blocks * block_m - group * q_len), value=-1)
    t = t.view(batch, row_blocks, block_m, 1)
    hi = t.amax(2)
    lo = torch.where(t >= 0, t, EVERY).amin(2)
    slots = torch.arange(num_tiles, device=t.device) * block_n
    start, count = vis.key_start.long().view(-1, 1, 1), vis.key_count.long().view(-1, 1, 1)
    p_lo = (slots - start).clamp(min=0)
    p_hi = torch.minimum(slots + block_n - 1 - start, count - 1)
    some = (p_lo <= p_hi) & (lo <= hi) & (p_lo <= hi)
    kept = p_lo < rule.sinks
    if rule.window or rule.local_blocks:  # without either the rule keeps no run (not even the query's own key)
        kept = kept | (p_hi >= rule.near_start(lo))
    if rule.dilation:
        kept = kept | ((hi - p_lo) // rule.dilation * rule.dilation >= (lo - p_hi).clamp(min=0))
    return (some & kept).unsqueeze(1)


def _mark_listed(
    edges: torch.Tensor, lists: torch.Tensor, size: int, vis: Visibility, group: int, block_m: int, block_n: int
) -> None:
    """Add +1 at the first and -1 after the last tile of each listed block (tokens: size 1) to its row block's
    difference array `edges` [B, Hkv, row_blocks, tiles + 1], in chunks of queries."""
    batch, kv_heads, row_blocks, width = edges.shape
    q_heads, q_len, n = kv_heads * group, lists.shape[2], lists.shape[-1]
    device = edges.device
    heads = torch.arange(q_heads, device=device)
    line = (torch.arange(batch, device=device).view(-1, 1, 1, 1) * kv_heads + (heads // group).view(1, -1, 1, 1))
    start, count = vis.key_start.long().view(-1, 1, 1, 1), vis.key_count.long().view(-1, 1, 1, 1)
    step = max(1, _CHUNK_ENTRIES // max(1, batch * q_heads * n))
    flat = edges.view(-1)
    for lo in range(0, q_len, step):
        chunk = lists[:, :, lo : lo + step].long().expand(batch, q_heads, -1, n)
        rows = (heads % group).view(-1, 1) * q_len + torch.arange(lo, lo + chunk.shape[2], device=device)
        at = ((line * row_blocks + (rows // block_m).view(1, q_heads, -1, 1)) * width)
        first = chunk * size
        used = (chunk != UNUSED) & (first < count)
        last = torch.minimum(first + size - 1, count - 1)
        ones = used.to(torch.int32).flatten()
        flat.scatter_add_(0, (at + torch.where(used, (start + first) // block_n, 0)).flatten(), ones)
        flat.scatter_add_(0, (at + torch.where(used, (start + last) // block_n + 1, 0)).flatten(), -ones)


def mask_tile_usage(keep: torch.Tensor, kv_heads: int, block_m: int, block_n: int) -> torch.Tensor:
    """Whether any row of a row block keeps any key of a tile of a dense mask [B, Hq, q, kv]: [B, Hkv, R, T]."""
    batch, q_heads, q_len, kv_len = keep.shape
    rows = keep.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, kv_len)
    rows = F.pad(rows, (0, -kv_len % block_n, 0, -rows.shape[-2] % block_m))
    b, h, r, n = rows.shape
    return rows.reshape(b, h, r // block_m, block_m, n // block_n, block_n).any(dim=5).any(dim=3)
