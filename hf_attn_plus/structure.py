"""A sparse selection as structure: what the chunked reference and the kernels read instead of a [q, kv] mask.

Query t (a real position) keeps key s (s <= t, visible) when any of three parts names it:
- `rule`: a function of (t, s) alone, as FlexAttention's `mask_mod`: sinks, a window, block-aligned local blocks,
  every `dilation`-th key;
- `blocks`: block indices [B, H, q, n] (block = position // block_size, -1 unused) per query and head;
- `tokens`: real positions [B, H, q, n] (-1 unused) per query and head, optionally with log-weights (sampled
  estimators' importance weights).
Under the model's own sliding window, block selections also keep the block across the window's start
(`edge_block`), within the window, instead of scoring it on keys the query does not see. The parts are disjoint by
contract (a mechanism lists in `blocks` / `tokens` only keys its rule does not keep), so
every kept key is counted once. A model-side restriction (ctx.restrict) applies on top. `dense_keep` writes the
whole [B, H, q, kv] mask: the brute-force oracle of tests, never used on the attention path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .masking import AttentionContext, chunk_visible

# A window at least this long covers any context: `PositionRule(window=EVERY)` is dense causal attention.
EVERY = 2**62


@dataclasses.dataclass(frozen=True)
class PositionRule:
    sinks: int = 0  # positions s < sinks
    window: int = 0  # t - s < window
    dilation: int = 0  # (t - s) % dilation == 0 (0: no dilated part)
    block_size: int = 1
    local_blocks: int = 0  # s // block_size > t // block_size - local_blocks (0: none)

    def keep(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Whether the rule keeps key position s for query position t (broadcast; visibility not included)."""
        distance = t - s
        kept = (s < self.sinks) | (distance < self.window)
        if self.dilation:
            kept = kept | (distance % self.dilation == 0)
        if self.local_blocks:
            kept = kept | (s // self.block_size > t // self.block_size - self.local_blocks)
        return kept

    def near_start(self, t: int) -> int:
        """The first position of the contiguous run of keys the rule keeps up to t (its window / local blocks);
        in [sinks, near_start(t)) the rule keeps dilated keys only."""
        start = t + 1
        if self.window:
            start = min(start, t - min(self.window, EVERY) + 1)
        if self.local_blocks:
            start = min(start, (t // self.block_size - self.local_blocks + 1) * self.block_size)
        return start


DENSE = PositionRule(window=EVERY)


# Lists built on demand for a range of query rows: rows -> [B, H|1, len(rows), n]. A selection whose lists are
# O(q * budget) (top-k) or O(q * kv / block_size) (mass-ranked blocks) hands them to the reference this way, so each
# query chunk's lists exist only while the chunk runs.
ListsFor = Callable[[slice], torch.Tensor]


def lists_for(lists: torch.Tensor | ListsFor, rows: slice) -> torch.Tensor:
    """The lists of query rows `rows`, [B, H|1, rows, n] long, computed on demand (without gradient) if lazy."""
    if callable(lists):
        with torch.no_grad():
            return lists(rows).long()
    return lists[:, :, rows].long()


@dataclasses.dataclass(frozen=True)
class Selection:
    rule: PositionRule = PositionRule()
    block_size: int = 1
    blocks: torch.Tensor | ListsFor | None = None  # [B, H|1, q, n] block indices, -1 unused
    tokens: torch.Tensor | ListsFor | None = None  # [B, H|1, q, n] positions, -1 unused
    log_weights: torch.Tensor | None = None  # [B, H|1, q, n] added to the listed tokens' logits (tensor tokens)

    def __post_init__(self) -> None:
        if self.log_weights is not None and self.tokens is None:
            raise ValueError("Selection: log_weights weight listed tokens; no tokens were given")


def edge_block(t: torch.Tensor, window: int, block_size: int) -> torch.Tensor:
    """The block holding query t's first key inside the model's window (t - window + 1) when it also holds keys
    before it, else -1: block selections keep it (within the window) rather than score it, so a sliding cache that
    dropped its older keys chooses as a full recompute does."""
    start = t - window + 1
    return torch.where((start > 0) & (start % block_size != 0), start // block_size, -1)


def dense_keep(ctx: AttentionContext, selection: Selection, heads: int = 1, rows: slice = slice(None)) -> torch.Tensor:
    """The selection as a bool [B, H, rows, kv] keep mask (H = max(heads, the lists' heads)) for the query rows
    `rows`: the test oracle, and `kept_pairs`' count chunk by chunk."""
    t, s = ctx.query_pos[:, :, rows], ctx.key_pos
    keep = selection.rule.keep(t, s)
    if selection.blocks is not None:
        blocks = torch.where(s >= 0, s // selection.block_size, -1)
        keep = keep | listed(lists_for(selection.blocks, rows), blocks, s.shape[-1])
        if ctx.window is not None:
            keep = keep | (blocks == edge_block(t, ctx.window, selection.block_size))
    if selection.tokens is not None:
        keep = keep | listed(lists_for(selection.tokens, rows), s, s.shape[-1])
    keep = keep & chunk_visible(ctx, rows)
    return keep.expand(keep.shape[0], max(heads, keep.shape[1]), *keep.shape[2:])


# Mask elements per query chunk when `kept_pairs` counts a selection.
COUNT_ELEMENTS = 2**24


def kept_pairs(ctx: AttentionContext, selection: Selection, heads: int) -> tuple[int, int]:
    """(kept, visible) (query, key) pairs summed over batch and `heads` query heads, counted query chunk by query
    chunk so no [q, kv] mask exists at once: what a data-dependent selection (block_sparse's threshold) really
    keeps on a model's activations."""
    q_len, kv_len = ctx.query_pos.shape[2], ctx.key_pos.shape[-1]
    step = max(1, COUNT_ELEMENTS // max(1, ctx.query_pos.shape[0] * heads * kv_len))
    kept = visible = 0
    for lo in range(0, q_len, step):
        rows = slice(lo, min(lo + step, q_len))
        kept += int(dense_keep(ctx, selection, heads, rows).sum())
        visible += int(chunk_visible(ctx, rows).sum()) * heads
    return kept, visible


def listed(lists: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """Whether each row of lists [B, H, R, n] lists each of `values` [..., m] (blocks or positions; values < 0 or
    >= width are never listed) -> [B, H, R, m]. List entries -1 (unused) go to an extra column that is cleared."""
    lists = lists.long()
    hit = torch.zeros(*lists.shape[:-1], width + 1, dtype=torch.bool, device=lists.device)
    hit.scatter_(-1, torch.where((lists < 0) | (lists >= width), width, lists), True)
    hit[..., width] = False
    index = torch.where((values < 0) | (values >= width), width, values)
    return hit.gather(-1, index.expand(*lists.shape[:-1], index.shape[-1]))
