"""Exact softmax attention over a `Selection`, walking query chunks: the plain-PyTorch truth of the sparse family.

No [q, kv] tensor is built. Per sequence the real keys are a contiguous run of slots (slot = key_start + position),
so the keys a part of the selection names are views or small gathers of that run:
- near part: the positions [near_start(t_min), t_max] of the chunk (window, local blocks), one view;
- sinks: [0, sinks), one view;
- dilated part: per residue class of t mod dilation, a strided view of the keys before the near part;
- blocks: the union of the blocks the chunk's rows name, gathered once per chunk;
- tokens: each row's listed positions, gathered per row.
Each part gives (row max, sum of exponentials, weighted values) and the parts merge like flash-attention's
log-sum-exp, so the result is one softmax over the union. Work and memory per chunk follow the kept keys (the block
union is bounded by the context); in training each chunk is recomputed in the backward (activation checkpointing),
so what autograd keeps is O(q + kv), not O(q * kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .masking import AttentionContext
from .selection import grouped_scores
from .structure import EVERY, Selection

# Upper bound on the elements of one chunk's logits: the chunk length adapts to the keys a row may read.
CHUNK_ELEMENTS = 2**22
MAX_CHUNK = 512

_FILL = torch.finfo(torch.float32).min


@dataclasses.dataclass
class _Part:
    """Keys one part of the selection offers a set of rows: shared by the rows ([1, Hkv, m, D]) or per row
    ([1, Hq, R, m, D]); keep [1, Hq|1, R, m]; rows: indices into the chunk (None: all)."""

    keep: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            query = query[:, :, self.rows]
        if self.keys.dim() == 4:
            return grouped_scores(query, self.keys)
        return (self.keys @ query.unsqueeze(-1)).squeeze(-1)

    def weighted(self, probs: torch.Tensor) -> torch.Tensor:
        if self.values.dim() == 4:
            batch, q_heads, rows, m = probs.shape
            grouped = probs.reshape(batch, self.values.shape[1], -1, rows, m)
            return (grouped @ self.values.unsqueeze(2)).reshape(batch, q_heads, rows, self.values.shape[-1])
        return (probs.unsqueeze(-2) @ self.values).squeeze(-2)


def selected_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    selection: Selection,
    scaling: float,
    beta: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Softmax of each query over the keys `selection` keeps among those it sees -> [B, Hq, q, Dv] (query dtype).

    query [B, Hq, q, D], key/value [B, Hkv, kv, D|Dv]; `beta(count)` multiplies the logits of a row attending
    `count` keys ([.., 1] float) (the common `logit_scale` option); rows that keep nothing output zeros.
    """
    batch, q_heads, q_len, _ = query.shape
    starts, counts = ctx.key_start.tolist(), ctx.key_count.tolist()
    query_pos = ctx.batch_query_pos
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outputs = []
    for b in range(batch):
        keys = key[b : b + 1, :, starts[b] : starts[b] + counts[b]]
        values = value[b : b + 1, :, starts[b] : starts[b] + counts[b]]
        t_all = query_pos[b]
        first = int((t_all < 0).sum())  # queries before any real token (left padding) see nothing
        pieces = [query.new_zeros(1, q_heads, first, value.shape[-1])]
        step = _chunk_rows(selection, q_heads, counts[b], q_len - first)
        for lo in range(first, q_len, step):
            rows = slice(lo, min(lo + step, q_len))
            run = _Chunk(ctx, selection, b, rows, starts[b], scaling, beta, dropout)
            if train:
                pieces.append(checkpoint(run, query[b : b + 1, :, rows], keys, values, use_reentrant=False))
            else:
                pieces.append(run(query[b : b + 1, :, rows], keys, values))
        outputs.append(torch.cat(pieces, dim=2))
    return torch.cat(outputs, dim=0)


def _chunk_rows(selection: Selection, q_heads: int, num_keys: int, q_len: int) -> int:
    rule = selection.rule
    per_row = min(rule.window, EVERY) + rule.sinks + rule.local_blocks * rule.block_size
    if rule.dilation:
        per_row += num_keys // rule.dilation
    if selection.blocks is not None:
        per_row = num_keys  # the union of a chunk's blocks can reach every block
    if selection.tokens is not None:
        per_row += selection.tokens.shape[-1]
    per_row = max(1, min(per_row, num_keys))
    return max(1, min(q_len, MAX_CHUNK, max(16, CHUNK_ELEMENTS // (q_heads * per_row))))


class _Chunk:
    """One query chunk of one sequence: callable on (query, keys, values) so activation checkpointing can rerun it."""

    def __init__(self, ctx, selection, b, rows, start, scaling, beta, dropout) -> None:
        self.t = ctx.batch_query_pos[b, rows]
        self.restrict = None if ctx.restrict is None else ctx.restrict[b : b + 1, :, rows, start:]
        self.selection, self.b, self.rows = selection, b, rows
        self.scaling, self.beta, self.dropout = scaling, beta, dropout

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        dtype, q_heads, rows = query.dtype, query.shape[1], query.shape[2]
        parts = self.parts(keys.float(), values.float(), q_heads)
        query = query.float()
        counts = query.new_zeros(1, q_heads, rows, 1)
        for part in parts:
            kept = part.keep.sum(-1, keepdim=True).float().expand(1, q_heads, -1, 1)
            counts = counts.index_add(2, part.rows, kept) if part.rows is not None else counts + kept
        beta = None if self.beta is None else self.beta(counts)
        stats = [self.part_stats(query, part, beta) for part in parts]
        peak = torch.stack([m for m, _, _ in stats]).amax(0)
        total = query.new_zeros(1, q_heads, rows, 1)
        out = query.new_zeros(1, q_heads, rows, values.shape[-1])
        for m, z, n in stats:
            scale = torch.exp(m - peak)
            total, out = total + z * scale, out + n * scale
        return (out / torch.where(total > 0, total, 1.0)).to(dtype)

    def part_stats(self, query, part, beta):
        """(row max, sum of exp, exp-weighted values) of one part, on the chunk's full row grid."""
        logits = part.logits(query) * self.scaling
        if beta is not None:
            logits = logits * (beta if part.rows is None else beta[:, :, part.rows])
        if part.log_weights is not None:
            logits = logits + part.log_weights.masked_fill(~part.keep, 0.0)
        logits = logits.masked_fill(~part.keep, _FILL)
        peak = logits.amax(-1, keepdim=True).detach()
        weights = torch.exp(logits - peak) * part.keep
        total = weights.sum(-1, keepdim=True)
        weights = F.dropout(weights, p=self.dropout, training=self.dropout > 0)
        stats = (peak, total, part.weighted(weights))
        if part.rows is None:
            return stats
        full = query.shape[:3]
        grid = lambda x, fill: x.new_full((*full, x.shape[-1]), fill).index_copy(2, part.rows, x)  # noqa: E731
        return grid(stats[0], _FILL), grid(stats[1], 0.0), grid(stats[2], 0.0)

    def parts(self, keys: torch.Tensor, values: torch.Tensor, q_heads: int) -> list[_Part]:
        sel, t = self.selection, self.t
        rule = sel.rule
        t_min, t_max = int(t[0]), int(t[-1])  # queries come in slot order: positions never decrease
        near = max(0, rule.near_start(t_min))
        sink_end = min(rule.sinks, near)
        t_col = t.view(1, 1, -1, 1)
        parts = []

        def shared(lo: int, hi: int, keep_fn) -> None:
            if hi > lo:
                pos = torch.arange(lo, hi, device=t.device)
                keep = keep_fn(pos) & (pos <= t_col) & self.restricted(pos)
                parts.append(_Part(keep, keys[:, :, lo:hi], values[:, :, lo:hi]))

        shared(near, t_max + 1, lambda pos: rule.keep(t_col, pos))
        shared(0, sink_end, lambda pos: torch.ones_like(pos, dtype=torch.bool))
        if rule.dilation:
            parts += self.dilated_parts(keys, values, sink_end, near)
        if sel.blocks is not None:
            parts += self.block_part(keys, values)
        if sel.tokens is not None:
            parts.append(self.token_part(keys, values, q_heads))
        return parts

    def restricted(self, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | bool:
        if self.restrict is None:
            return True
        restrict = self.restrict if rows is None else self.restrict[:, :, rows]
        return restrict.index_select(-1, pos)

    def dilated_parts(self, keys, values, lo: int, hi: int) -> list[_Part]:
        """Keys s in [lo, hi) with s = t (mod dilation): rows of one residue read one strided view."""
        d, t = self.selection.rule.dilation, self.t
        parts = []
        for residue in range(d):
            rows = (t % d == residue).nonzero().flatten()
            first = lo + (residue - lo) % d
            if rows.numel() == 0 or first >= hi:
                continue
            pos = torch.arange(first, hi, d, device=t.device)
            keep = torch.ones(1, 1, rows.numel(), pos.numel(), dtype=torch.bool, device=t.device)
            keep = keep & self.restricted(pos, rows)
            parts.append(_Part(keep, keys[:, :, first:hi:d], values[:, :, first:hi:d], rows=rows))
        return parts

    def block_part(self, keys, values) -> list[_Part]:
        """The union of the chunk's listed blocks, each row keeping the keys of its own."""
        sel, t = self.selection, self.t
        lists = sel.blocks[self.b : self.b + 1, :, self.rows]
        union = lists[lists >= 0].unique()
        if union.numel() == 0:
            return []
        size = sel.block_size
        pos = (union[:, None] * size + torch.arange(size, device=t.device)).flatten()
        pos = pos[pos < keys.shape[2]]
        chosen = (lists.unsqueeze(-1) == union).any(-2)  # [1, H, R, blocks of the union]
        member = chosen.index_select(-1, torch.searchsorted(union, pos // size))
        keep = member & (pos <= t.view(1, 1, -1, 1)) & self.restricted(pos)
        return [_Part(keep, keys.index_select(2, pos), values.index_select(2, pos))]

    def token_part(self, keys, values, q_heads: int) -> _Part:
        sel, t = self.selection, self.t
        listed = sel.tokens[self.b : self.b + 1, :, self.rows]
        listed = listed.expand(1, q_heads, *listed.shape[2:])
        index = listed.clamp(min=0)
        keep = (listed >= 0) & (listed <= t.view(1, 1, -1, 1))
        if self.restrict is not None:
            keep = keep & self.restrict.expand(1, q_heads, -1, -1).gather(-1, index)
        log_weights = None if sel.log_weights is None else sel.log_weights[self.b : self.b + 1, :, self.rows]
        if log_weights is not None:
            log_weights = log_weights.expand_as(listed).float()
        return _Part(keep, gather_rows(keys, index), gather_rows(values, index), log_weights=log_weights)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x [1, Hkv, n, D] at index [1, Hq, R, m], query head h reading KV head h // (Hq / Hkv) -> [1, Hq, R, m, D]."""
    _, kv_heads, _, dim = x.shape
    _, q_heads, rows, m = index.shape
    flat = index.reshape(1, kv_heads, -1, 1).expand(-1, -1, -1, dim)
    return x.gather(2, flat).reshape(1, q_heads, rows, m, dim)
