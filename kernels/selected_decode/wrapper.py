"""selected_decode(query, key, value, keep, scaling) == masked_attention(query, key, value, keep, scaling)[0];
selected_block_decode(...) == the same over blocks_to_keys(chosen, blocks, ctx), without that per-token mask."""

from __future__ import annotations

import torch

from .._triton import next_power_of_2, require_triton, tile_size
from ..tile_lists import tiles_from_blocks, tiles_from_keep
from .kernel import BlockChoice, tile_attention_forward

# Splits per (batch, kv head): enough programs to fill a GPU at batch 1; the interpreter pays per program.
_SPLITS_PER_SM = 2


def default_splits(programs: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, _SPLITS_PER_SM * sms // programs)


def decode_rows(query: torch.Tensor, key: torch.Tensor) -> int:
    """Rows per row block: the query heads of a KV group and their q queries share one, up to 64 rows (larger GQA
    groups times queries take several), so each selected tile is read once per group."""
    return min(64, next_power_of_2(query.shape[1] // key.shape[1] * query.shape[2]))


def selected_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    block_n: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, q, D] (q small) over the keys in `keep` ([B, Hq|1, q, kv] bool) -> [B, Hq, q, Dv]."""
    require_triton(query)
    batch, q_heads = query.shape[:2]
    tiles = tiles_from_keep(keep, batch, q_heads, key.shape[1], decode_rows(query, key), block_n or tile_size(query.dtype))
    splits = splits or default_splits(batch * key.shape[1], query.device)
    return tile_attention_forward(query, key, value, keep, tiles, scaling, splits)[0]


def selected_block_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    key_pos: torch.Tensor,
    chosen: torch.Tensor,
    spans: tuple[torch.Tensor, torch.Tensor],
    block_size: int,
    scaling: float,
    block_n: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, q, D] over the visible keys of the chosen blocks -> [B, Hq, q, Dv].

    visible [B, 1, q, kv] bool (ctx.visible), key_pos [B, kv] (ctx.key_pos: real position, -1 padding), chosen
    [B, Hq, q, num_blocks] bool (blocks of `block_size` real positions), spans: (first, last) cache slot of each
    block [B, num_blocks] (BlockSummaries.spans). Reads only the tiles the chosen blocks cover: decode cost follows the
    budget, and no [B, Hq, q, kv] mask is built.
    """
    require_triton(query)
    block_m, block_n = decode_rows(query, key), block_n or tile_size(query.dtype)
    tiles = tiles_from_blocks(chosen, *spans, key.shape[2], key.shape[1], block_m, block_n)
    splits = splits or default_splits(query.shape[0] * key.shape[1], query.device)
    blocks = BlockChoice(chosen, key_pos, block_size)
    return tile_attention_forward(query, key, value, visible, tiles, scaling, splits, blocks)[0]
