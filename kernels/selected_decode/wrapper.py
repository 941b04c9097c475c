"""selected_decode(query, key, value, keys, scaling) == hf_attn_plus.chunked_attention.selected_attention over the
same selection (key_sets.KeySet), split over the tiles the selection covers, without a per-token mask."""

from __future__ import annotations

import torch

from .._triton import next_power_of_2, require_triton, tile_size
from ..key_sets import KeySet
from ..tile_lists import tiles_for
from .kernel import tile_attention_forward

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
    keys: KeySet,
    scaling: float,
    block_n: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, q, D] (q small) over the keys `keys` keeps -> [B, Hq, q, Dv]; reads only the
    tiles the selection covers, so decode cost follows what is kept, not the context."""
    require_triton(query)
    block_n = block_n or tile_size(query.dtype)
    tiles = tiles_for(keys, query.shape[1], key.shape[1], key.shape[2], decode_rows(query, key), block_n)
    splits = splits or default_splits(query.shape[0] * key.shape[1], query.device)
    return tile_attention_forward(query, key, value, keys, tiles, scaling, splits)[0]
