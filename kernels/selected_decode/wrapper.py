"""selected_decode(query, key, value, keep, scaling) == masked_attention(query, key, value, keep, scaling)[0]."""

from __future__ import annotations

import torch

from .._triton import next_power_of_2, require_triton, tile_size
from ..tile_lists import tiles_from_keep
from .kernel import tile_attention_forward

# Splits per (batch, kv head): enough programs to fill a GPU at batch 1; the interpreter pays per program.
_SPLITS_PER_SM = 2


def default_splits(programs: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, _SPLITS_PER_SM * sms // programs)


def selected_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    block_n: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, q, D] (q small) over the keys in `keep` ([B, Hq|1, q, kv] bool) -> [B, Hq, q, Dv].

    The query heads of a KV group and their q queries share a row block, so each selected tile is read once per
    group.
    """
    require_triton(query)
    batch, q_heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    # Up to 64 rows share a row block (larger GQA groups times queries take several).
    block_m = min(64, next_power_of_2(q_heads // kv_heads * q_len))
    tiles = tiles_from_keep(keep, batch, q_heads, kv_heads, block_m, block_n or tile_size(query.dtype))
    if splits is None:
        splits = default_splits(batch * kv_heads, query.device)
    return tile_attention_forward(query, key, value, keep, tiles, scaling, splits)[0]
