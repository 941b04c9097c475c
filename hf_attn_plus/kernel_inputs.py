"""From an AttentionContext and a structure.Selection to what the Triton kernels read (kernels.key_sets), and the
Mechanism.kernel adapter of every `select` mechanism.

The kernels are leaves (tensors in, tensors out); this is the glue on the hf_attn_plus side. Nothing here builds a
[q, kv] tensor: positions are per sequence ([B, q], [B]), lazy block / token lists are evaluated chunk by chunk of
queries and stored sorted per row ([B, H, q, n] int32, what the in-kernel membership test searches).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from .kernels.key_sets import UNUSED, KeyRule, KeySet, Visibility
from .masking import AttentionContext
from .selection import query_chunks
from .structure import DENSE, ListsFor, Selection, lists_for


def visibility(ctx: AttentionContext, restrict: torch.Tensor | None = None) -> Visibility:
    """What each query sees: int32 positions, plus the model's restriction (and `restrict` on top) if any."""
    if ctx.restrict is not None:
        restrict = ctx.restrict if restrict is None else restrict & ctx.restrict
    return Visibility(
        query_pos=ctx.batch_query_pos.to(torch.int32).contiguous(),
        key_start=ctx.key_start.to(torch.int32).contiguous(),
        key_count=ctx.key_count.to(torch.int32).contiguous(),
        restrict=restrict,
    )


def key_set(ctx: AttentionContext, selection: Selection, restrict: torch.Tensor | None = None) -> KeySet:
    """The selection as kernel inputs: its rule's integers and its lists, sorted per row (unused entries last)."""
    if selection.log_weights is not None:
        raise ValueError("the tile kernels keep sets of keys; log-weighted tokens go to gathered_attention")
    rule = selection.rule
    return KeySet(
        visibility(ctx, restrict),
        KeyRule(rule.sinks, rule.window, rule.dilation, rule.block_size, rule.local_blocks),
        blocks=sorted_lists(selection.blocks, ctx),
        block_size=selection.block_size,
        tokens=sorted_lists(selection.tokens, ctx),
    )


def sorted_lists(lists: torch.Tensor | ListsFor | None, ctx: AttentionContext) -> torch.Tensor | None:
    """[B, H, q, n] int32 ascending per row, unused (-1) entries as UNUSED at the end; lazy lists per query chunk.
    None for no lists, or lists without entries (nothing for the kernel to search)."""
    if lists is None:
        return None
    batch, q_len, kv_len = ctx.key_pos.shape[0], ctx.query_pos.shape[2], ctx.key_pos.shape[-1]
    chunks = []  # int32 and sorted as soon as each chunk exists: at most one chunk's int64 lists at once
    for rows in query_chunks(batch, 1, slice(0, q_len), kv_len):
        chunk = lists_for(lists, rows)
        chunks.append(torch.where(chunk < 0, UNUSED, chunk).to(torch.int32).sort(-1).values)
    width = max(chunk.shape[-1] for chunk in chunks)
    if width == 0:
        return None
    return torch.cat([F.pad(chunk, (0, width - chunk.shape[-1]), value=UNUSED) for chunk in chunks], dim=2)


def attend_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    selection: Selection,
    scaling: float,
    restrict: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel form of chunked_attention.selected_attention(query, key, value, ctx, selection, scaling);
    `restrict` [B, H|1, q, kv] narrows it by a dense mask (mechanisms whose selection is still dense)."""
    from .kernels.sparse_attention import sparse_attention

    with torch.no_grad():
        keys = key_set(ctx, selection, restrict)
    return sparse_attention(query, key, value, keys, scaling)


def masked_kernel_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: AttentionContext, keep: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Exact attention over a dense keep mask [B, H|1, q, kv] (indexer_topk, until its selection is structured)."""
    return attend_kernel(query, key, value, ctx, Selection(DENSE), scaling, restrict=keep)


def selection_kernel(select: Callable[..., Selection], **select_kwargs: Any) -> Callable[..., torch.Tensor]:
    """A Mechanism.kernel running the exact attention over what `select(..., **select_kwargs)` keeps."""

    def kernel(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        ctx: AttentionContext,
        opts: SimpleNamespace,
        scaling: float,
    ) -> torch.Tensor:
        with torch.no_grad():
            selection = select(query, key, ctx, opts, **select_kwargs)
        return attend_kernel(query, key, value, ctx, selection, scaling)

    return kernel


def position_slots(ctx: AttentionContext, positions: torch.Tensor) -> torch.Tensor:
    """Slots [B, H, q, n] int32 of real positions [B, H, q, n] (slot = key_start + position); -1 stays -1."""
    return torch.where(positions < 0, -1, positions + ctx.key_start.view(-1, 1, 1, 1)).to(torch.int32)


def fixed_spans(ctx: AttentionContext, sinks: int, window: int) -> torch.Tensor:
    """[B, q, 4] int32 half-open slot ranges (sink start, sink end, window start, window end) of each query's first
    `sinks` real keys and its last `window` real keys up to itself (s > t - window), disjoint: the sink range stops
    where the window begins. Empty ranges are (0, 0). Matches PositionRule(sinks, window) on the visible keys."""
    t = ctx.batch_query_pos  # [B, q]; -1 for a query that sees nothing
    start = ctx.key_start.view(-1, 1)
    window_lo = (t - window + 1).clamp(min=0)
    sink_hi = window_lo.clamp(max=sinks)
    has_window, has_sinks = window_lo <= t, sink_hi > 0
    spans = torch.stack(
        (
            torch.where(has_sinks, start, 0),
            torch.where(has_sinks, start + sink_hi, 0),
            torch.where(has_window, start + window_lo, 0),
            torch.where(has_window, start + t + 1, 0),
        ),
        dim=-1,
    )
    return spans.to(torch.int32)
