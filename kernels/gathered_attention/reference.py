"""Gathered attention in plain PyTorch: the truth the Triton kernels match (outputs and gradients).

Work and memory are O(q · listed keys · D), never O(q · kv): each query gathers its own keys.
"""

from __future__ import annotations

import torch

from ..key_sets import Visibility


def span_slots(spans: torch.Tensor) -> torch.Tensor:
    """Half-open slot ranges [..., 2] -> the slots they hold, [..., longest range] long (-1 past a range's end)."""
    start, end = spans[..., 0].long(), spans[..., 1].long()
    width = int((end - start).max().clamp(min=0)) if spans.numel() else 0
    slots = start.unsqueeze(-1) + torch.arange(width, device=spans.device)
    return torch.where(slots < end.unsqueeze(-1), slots, -1)


def gather_rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, Hkv, kv, D] at slots [B, Hq, q, n] (>= 0), query head h reading KV head h // (Hq/Hkv):
    [B, Hq, q, n, D]."""
    batch, kv_heads, _, dim = x.shape
    _, q_heads, q_len, n = slots.shape
    index = slots.reshape(batch, kv_heads, -1, 1).expand(-1, -1, -1, dim)
    return x.gather(2, index).reshape(batch, q_heads, q_len, n, dim)


def gathered_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visibility: Visibility,
    spans: torch.Tensor,
    slots: torch.Tensor,
    log_weights: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of each query over its two slot ranges and its listed slots, in fp32.

    query [B, Hq, q, D], key/value [B, Hkv, kv, D|Dv], visibility (keys a query does not see are dropped
    wherever they appear), spans [B, q, 4] (sink start, end, window start, end; half-open, disjoint), slots
    [B, Hq, q, n] (-1: unused; disjoint from the ranges; a repeated slot counts once per entry), log_weights
    [B, Hq, q, n] added to the listed keys' logits (None: 0). Rows attending to nothing output zeros.
    Returns [B, Hq, q, Dv] in the query's dtype.
    """
    batch, q_heads, q_len, _ = query.shape
    ranges = torch.cat((span_slots(spans[..., 0:2]), span_slots(spans[..., 2:4])), dim=-1)
    listed = torch.cat((ranges.unsqueeze(1).expand(batch, q_heads, -1, -1), slots.long()), dim=-1)
    weights = torch.zeros(listed.shape, dtype=torch.float32, device=query.device)
    if log_weights is not None:
        weights[..., ranges.shape[-1] :] = log_weights.float()
    index = listed.clamp(min=0)
    ok = (listed >= 0) & seen(visibility, listed, q_heads, key.shape[2])
    keys, values = gather_rows(key.float(), index), gather_rows(value.float(), index)
    logits = (keys @ query.float().unsqueeze(-1)).squeeze(-1) * scaling + weights
    # A finite fill keeps rows attending to nothing NaN-free in forward and backward (as reference.masked_attention).
    probs = torch.softmax(logits.masked_fill(~ok, torch.finfo(logits.dtype).min), dim=-1) * ok
    return (probs.unsqueeze(-2) @ values).squeeze(-2).to(query.dtype)


def seen(visibility: Visibility, slots: torch.Tensor, q_heads: int, kv_len: int) -> torch.Tensor:
    """Whether each query sees each of its slots [B, Hq, q, n] (>= 0 where used)."""
    s = slots - visibility.key_start.view(-1, 1, 1, 1)
    t = visibility.query_pos[:, None, :, None]
    ok = (t >= 0) & (s >= 0) & (s < visibility.key_count.view(-1, 1, 1, 1)) & (s <= t)
    if visibility.restrict is not None:
        restrict = visibility.restrict.expand(slots.shape[0], q_heads, slots.shape[2], kv_len)
        ok = ok & restrict.gather(-1, slots.clamp(0, kv_len - 1))
    return ok
