"""From transformers' attention mask to what every mechanism selects over: visibility and token positions.

Positions are counted over real (non-padding) keys, so a window, a sink or a block means the same thing for a
left-padded, right-padded or unpadded copy of a sequence, and for a cached decode step as for a full recompute.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    visible: torch.Tensor  # [B, 1, q_len, kv_len] bool: causal, padding and any model-side restriction
    key_pos: torch.Tensor  # [B, 1, 1, kv_len] long: index of the key among the sequence's real keys (-1: padding)
    query_pos: torch.Tensor  # [B, 1, q_len, 1] long: position of the query (-1: a query that sees nothing)
    # The model's index of each query head passed in; None: all of them, in order. A wrapper that runs a mechanism
    # on a subset of heads (head_budget skipping gated-off heads) sets it, so per-head random draws stay the same.
    query_heads: torch.Tensor | None = None
    # The layer's SideCacheLayer (patches/side_cache.py) in cached inference when the mechanism declares `side_cache`;
    # None without a cache, in training, or on a model class hf_attn_plus does not patch. Side states describe the
    # call's full key tensor: a wrapper handing its delegate other keys (a head subset) must not pass it on.
    cache_layer: Any = None

    def head_index(self, q_heads: int, device: torch.device) -> torch.Tensor:
        """The model's index of each of the `q_heads` query heads of this call, [1, q_heads, 1, 1] long."""
        heads = torch.arange(q_heads, device=device) if self.query_heads is None else self.query_heads.to(device)
        if heads.numel() != q_heads:
            raise ValueError(f"context names {heads.numel()} query heads, the call has {q_heads}")
        return heads.view(1, -1, 1, 1)

    @property
    def distance(self) -> torch.Tensor:
        """query_pos - key_pos, [B, 1, q_len, kv_len]; meaningful where `visible`."""
        return self.query_pos - self.key_pos


def visible_from_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean [B, 1, q_len, kv_len] visibility from a bool mask, an additive float mask, or None (causal)."""
    if attention_mask is None:
        # transformers skips the mask for plain causal attention; queries are the last q_len keys.
        q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_idx = torch.arange(kv_len, device=device)[None, :]
        return (k_idx <= q_idx).expand(batch, 1, q_len, kv_len)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if attention_mask.dim() != 4:
        raise ValueError(f"hf_attn_plus expects a 4-D attention mask [B, 1, q, kv], got shape {tuple(attention_mask.shape)}")
    # Same trim as transformers' own SDPA path: a static cache's mask can be longer than the keys handed over.
    return attention_mask[..., :kv_len].expand(batch, 1, q_len, kv_len)


def build_context(
    visible: torch.Tensor, restrict: torch.Tensor | None = None, cache_layer: Any = None
) -> AttentionContext:
    """Positions come from `visible`; `restrict` (e.g. DeepSeek-V3.2's indexer choice) narrows what may be attended
    without renumbering the sequence."""
    key_valid = visible.any(dim=2, keepdim=True)
    key_pos = torch.where(key_valid, key_valid.cumsum(-1) - 1, -1)
    # Causal attention always sees its own token last, so the newest visible key is the query itself.
    query_pos = torch.where(visible, key_pos, -1).amax(dim=-1, keepdim=True)
    if restrict is not None:
        visible = visible & restrict
    return AttentionContext(visible=visible, key_pos=key_pos, query_pos=query_pos, cache_layer=cache_layer)


def indices_to_mask(indices: torch.Tensor, kv_len: int) -> torch.Tensor:
    """DeepSeek-V3.2 indexer output [B, q_len, topk] -> bool [B, 1, q_len, kv_len]; negative indices are unused slots."""
    indices = indices.long()
    chosen = torch.zeros(*indices.shape[:-1], kv_len + 1, dtype=torch.bool, device=indices.device)
    chosen.scatter_(-1, torch.where(indices < 0, kv_len, indices), True)
    return chosen[..., :kv_len].unsqueeze(1)
