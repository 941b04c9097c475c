"""A `Selection` run by torch's FlexAttention (`backend='flex'`): the maintained engine, compiled by torch.

The selection maps onto FlexAttention's two parts as it is: its position rule and its block lists become the
`mask_mod` (evaluated per element inside the kernel from the real positions of query and key), and the tiles worth
visiting become the `BlockMask`, built from positions and lists per (query tile, key tile) — never by evaluating
`create_block_mask` over all pairs. Key tiles a rule keeps whole (the window's inside, the sinks) are marked full,
so the kernel skips their mask there. Memory besides FlexAttention's own: O(tiles²) for the block mask, and for block
lists one bit per (query, head, listed block).

Limits (each refused with a named error): token lists (`topk`, sampled estimators: FlexAttention reads no per-query
index list), log-weights, the `logit_scale` option, dropout, a model-side restriction, and a backward on CPU
(FlexAttention has none there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .masking import AttentionContext
from .structure import EVERY, Selection, lists_for

TILE = 128  # FlexAttention's block size: query and key tiles
BIT_WORD = 32  # listed blocks per mask word

# Compiled by torch (tests run it eagerly). On CUDA with dynamic shapes, so a new length does not recompile; on CPU
# per shape, as torch 2.13's C++ code generation fails for the dynamic-shape FlexAttention kernel there
# ("'cur_qSplitSize7' was not declared").
COMPILE = True


class FlexUnsupported(ValueError):
    """The selection or call has a part FlexAttention cannot run here."""


@functools.cache
def _compiled(device_type: str) -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention, dynamic=device_type == "cuda")


def check_flex(selection: Selection, ctx: AttentionContext, needs_grad: bool, device: torch.device, **unsupported) -> None:
    """Raise FlexUnsupported naming what backend='flex' cannot run; `unsupported`: option name -> whether set."""
    if selection.tokens is not None:
        raise FlexUnsupported(
            "backend='flex' runs position rules and block lists; this mechanism lists tokens per query (topk-like), "
            "which FlexAttention cannot read: use backend='reference' or 'kernel'"
        )
    if ctx.restrict is not None:
        raise FlexUnsupported("backend='flex' does not take the model's own restriction (DeepSeek-V3.2 indices)")
    if needs_grad and device.type == "cpu":
        raise FlexUnsupported("backend='flex' has no backward on CPU (FlexAttention has none there): train with "
                              "backend='reference', or on a GPU")
    for name, set_ in unsupported.items():
        if set_:
            raise FlexUnsupported(f"backend='flex' does not implement {name}; use backend='reference'")


def flex_selected_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext, selection: Selection, scaling: float
) -> torch.Tensor:
    """Softmax of each query over the keys `selection` keeps (as chunked_attention.selected_attention), by
    FlexAttention -> [B, Hq, q, Dv]."""
    block_mask = selection_block_mask(ctx, selection, query.shape[1])
    attend = _compiled(query.device.type) if COMPILE else flex_attention
    return attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)


def selection_block_mask(ctx: AttentionContext, selection: Selection, q_heads: int) -> BlockMask:
    q_pos, k_pos = ctx.batch_query_pos, ctx.batch_key_pos
    rule = selection.rule
    (t_lo, t_hi, all_real_q), (p_lo, p_hi, all_real_k) = _tile_ranges(q_pos), _tile_ranges(k_pos)
    t_lo, t_hi, all_real_q = t_lo[:, :, None], t_hi[:, :, None], all_real_q[:, :, None]  # [B, q tiles, 1]
    p_lo, p_hi, all_real_k = p_lo[:, None], p_hi[:, None], all_real_k[:, None]  # [B, 1, key tiles]
    seen = (p_lo <= t_hi) & (p_lo <= p_hi) & (t_lo <= t_hi)  # some real key at or before some real query
    near_lo = _near_start(rule, t_lo)  # the contiguous run each tile's first query keeps
    sinks = min(rule.sinks, EVERY)
    visit = seen & ((p_lo < sinks) | (p_hi >= near_lo))
    if rule.dilation:
        visit = seen
    # Kept whole: every key real and before every query, and inside the sinks or every query's near run.
    inside = (p_hi < sinks) | (p_lo >= _near_start(rule, t_hi))
    full = visit & all_real_q & all_real_k & (p_hi <= t_lo) & inside
    visit, full = visit[:, None], full[:, None]
    bits = None
    if selection.blocks is not None:
        listed_tiles, bits = _listed(ctx, selection, q_heads)
        visit = visit | (listed_tiles & seen[:, None])
    mask_mod = _mask_mod(q_pos, k_pos, selection, bits)
    full = full.expand_as(visit)  # FlexAttention wants one head count across its tensors
    partial = visit & ~full
    kv_num, kv_index = _as_lists(partial)
    full_num, full_index = _as_lists(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_index, full_num, full_index, BLOCK_SIZE=TILE, mask_mod=mask_mod,
        seq_lengths=(q_pos.shape[1], k_pos.shape[1]),
    )


def _near_start(rule, t: torch.Tensor) -> torch.Tensor:
    """rule.near_start for every position of t (a tensor)."""
    start = t + 1
    if rule.window:
        start = torch.minimum(start, t - min(rule.window, EVERY) + 1)
    if rule.local_blocks:
        start = torch.minimum(start, (t // rule.block_size - rule.local_blocks + 1) * rule.block_size)
    return start


def _tile_ranges(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile of TILE slots of pos [B, n]: the smallest and largest real position (empty tile: lo > hi) and
    whether every slot is real."""
    padded = torch.nn.functional.pad(pos, (0, -pos.shape[1] % TILE), value=-1).unflatten(1, (-1, TILE))
    real = padded >= 0
    lo = torch.where(real, padded, EVERY).amin(-1)
    return lo, padded.amax(-1), real.all(-1)


def _listed(ctx: AttentionContext, selection: Selection, q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the block lists, chunk by chunk over query tiles: the key tiles each (head, query tile) must visit
    [B, H, q tiles, key tiles] and each query's listed blocks as bits [B, H, q, words] (int32)."""
    q_pos, k_pos = ctx.batch_query_pos, ctx.batch_key_pos
    batch, q_len = q_pos.shape
    size = selection.block_size
    num_blocks = int(k_pos.max()) // size + 1 if k_pos.numel() else 1
    words = -(-num_blocks // BIT_WORD)
    # Slot of each listed block's first and last key: positions are a contiguous run of slots (less an eviction gap).
    first_slot = _slot_of_position(ctx, torch.arange(num_blocks, device=k_pos.device) * size)  # [B, blocks]
    last_slot = _slot_of_position(ctx, torch.clamp((torch.arange(num_blocks, device=k_pos.device) + 1) * size - 1,
                                                   max=int(k_pos.max()) if k_pos.numel() else 0))
    key_tiles = -(-k_pos.shape[1] // TILE)
    first_tile, last_tile = (first_slot // TILE)[:, None], (last_slot // TILE)[:, None]  # [B, 1, blocks]
    span_tiles = int((last_tile - first_tile).max()) + 1 if num_blocks else 0
    tiles, bits = [], []
    for lo in range(0, q_len, TILE):
        rows = slice(lo, min(lo + TILE, q_len))
        lists = lists_for(selection.blocks, rows)  # [B, H, R, n]
        heads = lists.shape[1]
        valid = lists >= 0
        blocks = lists.clamp(min=0)
        hit = torch.zeros(batch, heads, lists.shape[2], words * BIT_WORD + 1, dtype=torch.bool, device=lists.device)
        hit.scatter_(-1, torch.where(valid, blocks, words * BIT_WORD), True)
        weights = (torch.ones(BIT_WORD, dtype=torch.int64, device=lists.device) << torch.arange(BIT_WORD, device=lists.device))
        packed = (hit[..., :-1].unflatten(-1, (words, BIT_WORD)).long() * weights).sum(-1)
        bits.append(torch.where(packed >= 2**31, packed - 2**32, packed).int())
        chosen = hit[..., :num_blocks].any(2)  # [B, H, blocks]: blocks any row of the tile lists
        # Each chosen block marks the few key tiles its slots span: O(blocks) per query tile, not O(blocks * tiles).
        visited = torch.zeros(batch, heads, key_tiles + 1, dtype=torch.bool, device=lists.device)
        for offset in range(span_tiles):
            tile = first_tile + offset
            hit_tile = chosen & (tile <= last_tile) & (tile < key_tiles)
            visited.scatter_(-1, torch.where(hit_tile, tile, key_tiles).expand_as(chosen), True)
        tiles.append(visited[..., :key_tiles])  # [B, H, key tiles]
    return torch.stack(tiles, dim=2), torch.cat(bits, dim=2)


def _slot_of_position(ctx: AttentionContext, positions: torch.Tensor) -> torch.Tensor:
    """Slot [B, n] of real positions [n] in each sequence."""
    slots = ctx.key_start[:, None] + positions
    if ctx.key_gap is not None:
        first, gap = ctx.key_gap
        slots = torch.where(slots >= first, slots - gap, slots)
    return slots


def _as_lists(visit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [B, H, q tiles, key tiles] -> (count [B, H, q tiles], indices [B, H, q tiles, key tiles]) int32, the
    listed tiles first in ascending order."""
    tiles = visit.shape[-1]
    order = torch.where(visit, torch.arange(tiles, device=visit.device), tiles).sort(dim=-1).values
    return visit.sum(-1).int().contiguous(), torch.where(order < tiles, order, 0).int().contiguous()


def _mask_mod(q_pos: torch.Tensor, k_pos: torch.Tensor, selection: Selection, bits: torch.Tensor | None):
    rule = selection.rule
    sinks, window, dilation = rule.sinks, min(rule.window, EVERY), rule.dilation
    block_size, local_blocks, list_size = rule.block_size, rule.local_blocks, selection.block_size
    per_head = bits is not None and bits.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        t, s = q_pos[b, q_idx], k_pos[b, kv_idx]
        keep = (s < sinks) | (t - s < window)
        if dilation:
            keep = keep | ((t - s) % dilation == 0)
        if local_blocks:
            keep = keep | (s // block_size > t // block_size - local_blocks)
        if bits is not None:
            block = torch.clamp(s, min=0) // list_size
            word = bits[b, h if per_head else 0, q_idx, torch.clamp(block // BIT_WORD, max=bits.shape[-1] - 1)]
            keep = keep | (((word >> (block % BIT_WORD)) & 1) == 1)
        return keep & (s >= 0) & (t >= 0) & (s <= t)

    return mask_mod
