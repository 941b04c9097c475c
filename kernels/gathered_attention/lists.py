"""From real positions (AttentionContext) to what the gathered-attention kernel reads: KV-cache slots.

Positions count real tokens; slots index the key tensor, which also holds padding (left padding, right padding of a
training batch). Ranges are given in slots and may therefore contain padding slots: the kernel drops every key the
visibility mask hides, so a range only has to cover the positions it stands for.
"""

from __future__ import annotations

import torch

from ...masking import AttentionContext


def slot_table(ctx: AttentionContext) -> torch.Tensor:
    """[B, kv + 1] long: the slot of real position p (p < number of real keys), kv_len for the positions beyond."""
    key_pos = ctx.key_pos[:, 0, 0]
    batch, kv_len = key_pos.shape
    slots = torch.arange(kv_len, device=key_pos.device).expand(batch, kv_len)
    table = torch.full((batch, kv_len + 1), kv_len, dtype=torch.long, device=key_pos.device)
    # Padding slots all land in the last column, which is reset after.
    table.scatter_(-1, torch.where(key_pos < 0, kv_len, key_pos), slots)
    table[:, -1] = kv_len
    return table


def position_slots(ctx: AttentionContext, positions: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Slots [B, H, q, n] int32 of real positions [B, H, q, n]; -1 stays -1 (an unused list entry)."""
    table = slot_table(ctx) if table is None else table
    found = table.gather(-1, positions.clamp(min=0).reshape(positions.shape[0], -1)).reshape(positions.shape)
    return torch.where(positions < 0, -1, found).to(torch.int32)


def fixed_spans(ctx: AttentionContext, sinks: int, window: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """[B, q, 4] int32 half-open slot ranges (sink start, sink end, window start, window end) of each query's first
    `sinks` real keys and its last `window` real keys up to itself (s > t - window), disjoint: the sink range stops
    where the window begins. Empty ranges are (0, 0). Matches selection.sinks_and_window on the visible keys."""
    table = slot_table(ctx) if table is None else table
    t = ctx.query_pos[:, 0, :, 0]  # [B, q]; -1 for a query that sees nothing
    window_lo = (t - window + 1).clamp(min=0)
    sink_hi = window_lo.clamp(max=sinks)
    slot = lambda p: table.gather(-1, p.clamp(min=0))  # noqa: E731
    has_window = window_lo <= t
    has_sinks = sink_hi > 0
    zero = torch.zeros_like(t)
    spans = torch.stack(
        (
            torch.where(has_sinks, slot(zero), 0),
            torch.where(has_sinks, slot(sink_hi), 0),
            torch.where(has_window, slot(window_lo), 0),
            torch.where(has_window, slot(t) + 1, 0),
        ),
        dim=-1,
    )
    return spans.to(torch.int32)
