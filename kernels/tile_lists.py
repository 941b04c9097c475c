"""Which key tiles each block of query rows must read: the sparse layout every attention kernel here walks.

Rows pack the query heads of one KV group with their queries, row r = (head h = hkv*group + r // q_len,
query r % q_len), so one K/V tile read serves every query head of its group (GQA). Rows form blocks of
`block_m`, keys form physical tiles of `block_n` consecutive cache slots. A tile list is a compact int32 index
list per (batch, kv head, row block) plus its length, like FlexAttention's kv_indices / kv_num_blocks; tiles
outside it hold no kept key of any row in the block, and the kernels apply the exact per-token keep test inside.

`tiles_for` builds them from a key_sets.KeySet without a per-token mask: the rule's tiles analytically from each row
block's range of query positions, the listed blocks' and tokens' tiles by a +1/-1 difference array over tiles,
scattered chunk by chunk of row blocks and queries. What it keeps is O(B * heads * row blocks * listed tiles); a
chunk's [row blocks, tiles] map is bounded by _CHUNK_ENTRIES.
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
    indices: torch.Tensor  # [B, Hkv, row_blocks, width] int32: tiles to read, ascending, first `counts` entries valid
    counts: torch.Tensor  # [B, Hkv, row_blocks] int32
    num_tiles: int  # key tiles of the context
    block_m: int
    block_n: int


def compact(used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., n] -> (indices [..., width] int32 with the True positions first in increasing order, width the
    largest count (at least 1), counts [...])."""
    counts = used.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return order.to(torch.int32), counts


def transposed(tiles: TileLists) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile, the row blocks that read it (the backward pass's dK/dV walk): ([B, Hkv, T, width] int32,
    [B, Hkv, T]); from the listed (row block, tile) pairs alone, O(listed tiles)."""
    batch, kv_heads, row_blocks, width = tiles.indices.shape
    device = tiles.indices.device
    listed = torch.arange(width, device=device) < tiles.counts.unsqueeze(-1)
    line = torch.arange(batch * kv_heads, device=device).view(batch, kv_heads, 1, 1)
    row_block = torch.arange(row_blocks, device=device).view(1, 1, -1, 1)
    # One sortable key per listed pair: (batch*kv head, tile) major, row block minor.
    pairs = ((line * tiles.num_tiles + tiles.indices.long()) * row_blocks + row_block)[listed].sort().values
    owner, row_block = pairs // row_blocks, pairs % row_blocks
    counts = torch.bincount(owner, minlength=batch * kv_heads * tiles.num_tiles)
    first = counts.cumsum(0) - counts
    lists = torch.zeros(counts.numel(), max(1, int(counts.max())), dtype=torch.int32, device=device)
    lists[owner, torch.arange(pairs.numel(), device=device) - first[owner]] = row_block.to(torch.int32)
    shape = (batch, kv_heads, tiles.num_tiles)
    return lists.view(*shape, -1), counts.view(shape).to(torch.int32)


def tiles_for(keys: KeySet, q_heads: int, kv_heads: int, kv_len: int, block_m: int, block_n: int) -> TileLists:
    """Tile lists covering every key `keys` keeps, for queries of q_heads heads over kv_len key slots, built in
    chunks of row blocks so that no [row_blocks, tiles] map exists at once."""
    vis = keys.visibility
    batch, q_len = vis.query_pos.shape
    group = q_heads // kv_heads
    row_blocks, num_tiles = -(-group * q_len // block_m), -(-kv_len // block_n)
    restrict = None
    if vis.restrict is not None:  # a model-given dense mask: its own tiles bound the lists (it is O(q * kv) already)
        restrict = mask_tile_usage(vis.restrict.expand(batch, q_heads, q_len, kv_len), kv_heads, block_m, block_n)
    step = max(1, _CHUNK_ENTRIES // (batch * kv_heads * (num_tiles + 1)))
    indices, counts = [], []
    for lo in range(0, row_blocks, step):
        blocks = range(lo, min(lo + step, row_blocks))
        usage = _rule_usage(keys.rule, vis, group, blocks, num_tiles, block_m, block_n)
        edges = torch.zeros(batch, kv_heads, len(blocks), num_tiles + 1, dtype=torch.int32, device=usage.device)
        for lists, size in ((keys.blocks, keys.block_size), (keys.tokens, 1)):
            if lists is not None:
                _mark_listed(edges, lists, size, vis, group, blocks, block_m, block_n)
        usage = usage | (edges.cumsum(-1)[..., :num_tiles] > 0)
        if restrict is not None:
            usage = usage & restrict[:, :, lo : lo + len(blocks)]
        chunk_indices, chunk_counts = compact(usage)
        indices.append(chunk_indices)
        counts.append(chunk_counts)
    width = max(chunk.shape[-1] for chunk in indices)
    indices = torch.cat([F.pad(chunk, (0, width - chunk.shape[-1])) for chunk in indices], dim=2)
    return TileLists(indices.contiguous(), torch.cat(counts, dim=2).contiguous(), num_tiles, block_m, block_n)


def _rule_usage(
    rule: KeyRule, vis: Visibility, group: int, blocks: range, num_tiles: int, block_m: int, block_n: int
) -> torch.Tensor:
    """Tiles holding a key the rule keeps for some row of each row block of `blocks`, [B, 1, len(blocks), tiles]:
    from the block's lowest and highest real query position (lo, hi) and each tile's positions [p_lo, p_hi], a
    superset where a row block straddles two heads. Sinks: p_lo < sinks; window / local blocks: the tile reaches
    near_start(lo) (near_start grows with t); dilation d: some t - s in [max(0, lo - p_hi), hi - p_lo] is a multiple
    of d."""
    batch, q_len = vis.query_pos.shape
    rows = torch.arange(blocks.start * block_m, blocks.stop * block_m, device=vis.query_pos.device)
    t = torch.where(rows < group * q_len, vis.query_pos.long()[:, rows % q_len], -1)
    t = t.view(batch, len(blocks), block_m, 1)
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
    edges: torch.Tensor,
    lists: torch.Tensor,
    size: int,
    vis: Visibility,
    group: int,
    blocks: range,
    block_m: int,
    block_n: int,
) -> None:
    """Add +1 at the first and -1 after the last tile of each listed block (tokens: size 1) to its row block's
    difference array `edges` [B, Hkv, len(blocks), tiles + 1], for the rows of the row blocks `blocks`: per head of
    a KV group the queries whose rows fall in them, in chunks of queries."""
    batch, kv_heads, _, width = edges.shape
    q_len, n = lists.shape[2], lists.shape[-1]
    device = edges.device
    line = torch.arange(batch * kv_heads, device=device).view(batch, kv_heads, 1, 1)
    start, count = vis.key_start.long().view(-1, 1, 1, 1), vis.key_count.long().view(-1, 1, 1, 1)
    step = max(1, _CHUNK_ENTRIES // max(1, batch * kv_heads * n))
    flat = edges.view(-1)
    for member in range(group):  # the query heads member, group + member, ... (one per KV head)
        first_row = member * q_len
        q_lo = max(0, blocks.start * block_m - first_row)
        q_hi = min(q_len, blocks.stop * block_m - first_row)
        heads = torch.arange(kv_heads, device=device) * group + member
        for lo in range(q_lo, q_hi, step):
            queries = torch.arange(lo, min(lo + step, q_hi), device=device)
            chunk = lists[:, :, lo : lo + queries.numel()].expand(batch, kv_heads * group, -1, n)[:, heads].long()
            row_block = ((first_row + queries) // block_m - blocks.start).view(1, 1, -1, 1)
            at = (line * len(blocks) + row_block) * width
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
