"""Exact softmax attention over a `Selection`, walking query chunks: the plain-PyTorch truth of the sparse family.

No [q, kv] tensor is built. Per sequence the real keys are a contiguous run of slots (slot = key_start + position -
key_first, less an evicting cache's gap; key_first > 0 only when the model's sliding cache dropped older keys), so the
keys a chunk of queries may keep are a short list of positions (within the model's own window, in a sliding-window
layer):
- the near run [near_start(t_min), t_max] (window, local blocks) and the sinks [0, sinks);
- the union of the blocks and of the tokens the chunk's rows list;
- for dilated rules, per residue class of t mod dilation, every dilation-th key before the near run (the rows of one
  class share them).
One call of torch's scaled_dot_product_attention (the maintained fused kernel, GQA without repeated keys) runs each
group of rows over its keys with the exact keep mask of the rows, so work and memory per chunk follow the keys the
chunk may keep. The model's logit soft-capping (Gemma 2) and learned sink logits (gpt-oss) need the logits between the
product and the softmax, which SDPA does not expose: chunks of such a layer spell SDPA's computation out (same
keys, same masks). In training each chunk is recomputed in the backward (activation checkpointing): what autograd keeps
is O(q + kv), not O(q * kept).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .masking import AttentionContext
from .reference import grouped_weighted_sum
from .selection import grouped_scores
from .structure import EVERY, ListsFor, Selection, edge_block, listed, lists_for

# Upper bound on the elements of one chunk's keep mask: the chunk length adapts to the keys a row may read.
CHUNK_ELEMENTS = 2**22
MAX_CHUNK = 64
# Query rows per chunk of a selection of blocks alone (`_reads_block_pairs`), and the most (row, head, block) logits
# one KV head's pass holds: a chunk whose rows keep many blocks runs in slices of rows.
PAIR_ROWS = 512
PAIR_ELEMENTS = 2**22
# Pairs run where a row keeps at most 1 / PAIRS_SHARE of the blocks its chunk reaches (`_Chunk.pairs_pay`).
PAIRS_SHARE = 1.5


@dataclasses.dataclass
class _Group:
    """Rows of a chunk (None: all) that attend one list of key positions [m] under `mask` [1, 1|Hq, R, m] (bool
    keep, or float log-weights with -inf where not kept). `pieces` spell `positions` out in order: runs of positions
    (the sinks, the near run, a residue class's dilated keys) as slices, which read keys as views, and listed
    positions as tensors, which read them by index."""

    pieces: list[slice | torch.Tensor]
    mask: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        return _spelled_out(self.pieces, self.mask.device)


def _spelled_out(pieces: list[slice | torch.Tensor], device: torch.device) -> torch.Tensor:
    """The positions that runs (slices) and listed positions (tensors) name, in order -> [m]."""
    spelled = [
        torch.arange(piece.start, piece.stop, piece.step or 1, device=device) if isinstance(piece, slice) else piece
        for piece in pieces
    ]
    return torch.cat(spelled) if spelled else torch.zeros(0, dtype=torch.long, device=device)


def _run(start: int, stop: int, lowest: int, step: int = 1) -> list[slice]:
    """The run of positions start, start + step, ... < stop from `lowest` on, as a slice ([] when empty)."""
    if start < lowest:
        start += -(-(lowest - start) // step) * step
    return [slice(start, stop, step)] if start < stop else []


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
    starts, counts, firsts = ctx.key_start.tolist(), ctx.key_count.tolist(), ctx.key_first.tolist()
    query_pos = ctx.batch_query_pos
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    gap_slot, gap = ctx.key_gap or (0, 0)
    sinks = None if ctx.sinks is None else ctx.sinks.index_select(0, ctx.head_index(q_heads, query.device).flatten())
    # Inference writes each chunk into one output buffer; training keeps the chunks autograd saw and joins them.
    out = None if train else query.new_zeros(batch, q_heads, q_len, value.shape[-1])
    outputs = []
    block_pairs = _reads_block_pairs(selection, ctx)
    for b in range(batch):
        held = slice(starts[b], starts[b] + counts[b] - gap)
        keys, values = key[b : b + 1, :, held], value[b : b + 1, :, held]
        t_all = query_pos[b]
        first = int((t_all < 0).sum())  # queries before any real token (left padding) see nothing
        pieces = [query.new_zeros(1, q_heads, first, value.shape[-1])] if train else None
        step = _chunk_rows(selection, q_heads, counts[b], q_len - first, block_pairs)
        for lo in range(first, q_len, step):
            rows = slice(lo, min(lo + step, q_len))
            gaps = (gap_slot - starts[b], gap)
            run = _Chunk(ctx, selection, b, rows, starts[b], firsts[b], gaps, scaling, beta, dropout, sinks, block_pairs)
            if train:
                pieces.append(checkpoint(run, query[b : b + 1, :, rows], keys, values, use_reentrant=False))
            else:
                out[b : b + 1, :, rows] = run(query[b : b + 1, :, rows], keys, values)
        if train:
            outputs.append(torch.cat(pieces, dim=2))
    if not train:
        return out
    return outputs[0] if batch == 1 else torch.cat(outputs, dim=0)


def _reads_block_pairs(selection: Selection, ctx: AttentionContext) -> bool:
    """Whether the selection is blocks alone (the rule's sinks and local blocks are whole blocks too, no listed
    tokens), in a layer without the model's window, restriction, logit options or an evicting cache's gap: then
    `_Chunk.attend_block_pairs` runs each (row, head, block) pair once, whatever the union of a chunk's lists."""
    rule = selection.rule
    return (
        selection.blocks is not None and selection.tokens is None and rule.window == 0 and not rule.dilation
        and rule.sinks % selection.block_size == 0 and (rule.local_blocks == 0 or rule.block_size == selection.block_size)
        and ctx.window is None and ctx.restrict is None and ctx.softcap is None and ctx.sinks is None
        and ctx.key_gap is None and not bool(ctx.key_first.any())
    )


def _chunk_rows(selection: Selection, q_heads: int, num_keys: int, q_len: int, block_pairs: bool = False) -> int:
    if block_pairs:  # wide chunks amortise the sort by block; PAIR_ELEMENTS bounds the pairs, `_Chunk` the union
        return min(q_len, PAIR_ROWS)
    rule = selection.rule
    per_row = min(rule.window, EVERY) + rule.sinks + rule.local_blocks * rule.block_size
    if rule.dilation:
        per_row += num_keys // rule.dilation
    elements = CHUNK_ELEMENTS
    if selection.blocks is not None or selection.tokens is not None:
        # A chunk's block union or token lists can reach every key: its masks are bool, and wide chunks amortise
        # the union.
        per_row, elements = num_keys, 4 * CHUNK_ELEMENTS
    per_row = max(1, min(per_row, num_keys))
    rows = max(1, min(MAX_CHUNK, max(16, elements // (q_heads * per_row))))
    # A dilated chunk splits into one group per residue class: enough rows that each group is a real batch.
    return min(q_len, rows * rule.dilation // 2 if rule.dilation > 2 else rows)


@dataclasses.dataclass
class _Lists:
    """One chunk's block lists, token lists and their log-weights, [1, H|1, R, n] each (None: not in the selection)."""

    blocks: torch.Tensor | None
    tokens: torch.Tensor | None
    log_weights: torch.Tensor | None

    @property
    def per_head(self) -> bool:
        return any(part is not None and part.shape[1] > 1 for part in (self.blocks, self.tokens, self.log_weights))

    def of_rows(self, lo: int, hi: int) -> _Lists:
        return _Lists(*(t if t is None else t[:, :, lo:hi] for t in (self.blocks, self.tokens, self.log_weights)))

    def heads(self, heads: slice) -> _Lists:
        """The lists of query heads `heads` (lists shared by every head stay as they are)."""
        parts = (self.blocks, self.tokens, self.log_weights)
        return _Lists(*(t if t is None or t.shape[1] == 1 else t[:, heads] for t in parts))


def _token_weights(lists: torch.Tensor, log_weights: torch.Tensor, q_heads: int, positions: torch.Tensor) -> torch.Tensor:
    """The listed tokens' log-weights at `positions` [1, Hq, R, m] (0 elsewhere)."""
    heads = max(q_heads, lists.shape[1])
    log_weights = log_weights.expand(1, heads, -1, -1)
    width = int(positions.max()) + 2
    at = torch.zeros(1, heads, lists.shape[2], width, device=lists.device)
    index = torch.where(lists < 0, width - 1, lists).expand_as(log_weights)
    at.scatter_add_(-1, index, torch.where(lists < 0, 0.0, log_weights))
    return at[..., positions]


class _Chunk:
    """One query chunk of one sequence: callable on (query, keys, values) so activation checkpointing can rerun it."""

    def __init__(self, ctx, selection, b, rows, start, first, gap, scaling, beta, dropout, sinks, block_pairs=False) -> None:
        self.t = ctx.batch_query_pos[b, rows]
        self.restrict = None if ctx.restrict is None else ctx.restrict[b : b + 1, :, rows, start:]
        self.selection, self.b, self.rows, self.first, self.window = selection, b, rows, first, ctx.window
        self.gap_position, self.gap = gap  # an evicting cache's gap: keys from gap_position on sit `gap` slots earlier
        self.scaling, self.beta, self.dropout = scaling, beta, dropout
        self.softcap, self.sinks = ctx.softcap, sinks  # sinks [Hq] of the call's query heads
        self.block_pairs = block_pairs  # attend_block_pairs for rows > 1 (_reads_block_pairs)

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        sel = self.selection
        lists = _Lists(
            None if sel.blocks is None else self.rows_of(sel.blocks),
            None if sel.tokens is None else self.rows_of(sel.tokens),
            None if sel.log_weights is None else sel.log_weights[self.b : self.b + 1, :, self.rows].float(),
        )
        if self.block_pairs and query.shape[2] > 1:
            if self.pairs_pay(lists.blocks):
                return self.attend_block_pairs(query, keys, values, lists.blocks)
            # A union as wide as this chunk would hold its rows x every reached key: slices of the usual chunk size.
            step = _chunk_rows(sel, query.shape[1], keys.shape[2], query.shape[2])
            return torch.cat([
                self.of_rows(lo, lo + step).attend_lists(query[:, :, lo : lo + step], keys, values, lists.of_rows(lo, lo + step))
                for lo in range(0, query.shape[2], step)
            ], dim=2)
        return self.attend_lists(query, keys, values, lists)

    def of_rows(self, lo: int, hi: int) -> _Chunk:
        """This chunk's rows lo:hi as a chunk of their own (block-pairs chunks: no restriction to slice)."""
        part = copy.copy(self)
        part.t, part.rows = self.t[lo:hi], slice(self.rows.start + lo, min(self.rows.start + hi, self.rows.stop))
        return part

    def attend_lists(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lists: _Lists) -> torch.Tensor:
        kv_heads = keys.shape[1]
        if kv_heads == 1 or not lists.per_head:
            return self.attend(query, keys, values, lists, self.sinks)
        if self.one_row_of_plain_lists(query, kv_heads, lists):
            return self.attend_row(query, keys, values, lists)
        # Per-head choices: each KV head reads the union of its own query heads' lists, not of every head's.
        group = query.shape[1] // kv_heads
        return torch.cat([
            self.attend(query[:, g * group : (g + 1) * group], keys[:, g : g + 1], values[:, g : g + 1],
                        lists.heads(slice(g * group, (g + 1) * group)),
                        None if self.sinks is None else self.sinks[g * group : (g + 1) * group])
            for g in range(kv_heads)
        ], dim=1)

    def attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lists: _Lists, sinks: torch.Tensor | None
    ) -> torch.Tensor:
        out = query.new_zeros(*query.shape[:3], values.shape[-1])
        for group in self.groups(query.shape[1], lists):
            if group.mask.shape[-1] == 0:
                continue
            rows = slice(None) if group.rows is None else group.rows
            k, v = self.gather(keys, group), self.gather(values, group)
            result = self.softmax(query[:, :, rows], k, v, group.mask, sinks)
            if group.rows is None:
                out = result
            else:
                out = out.index_copy(2, group.rows, result)
        return out

    def softmax(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of q over the gathered keys k/v (GQA or per query head) under `mask` (bool keep or log-weights),
        with the common beta, the model's soft-capping and sinks; rows keeping nothing output zeros."""
        keep = mask if mask.dtype == torch.bool else mask > float("-inf")
        if self.beta is not None:  # beta scales a row's logits: scale its query
            q = q * self.beta(keep.sum(-1, keepdim=True).float()).to(q.dtype)
        empty = ~keep.any(-1, keepdim=True)  # a dummy key keeps rows that keep nothing finite
        if bool(empty.any()):
            dummy = empty & (torch.arange(mask.shape[-1], device=mask.device) == 0)
            mask = mask | dummy if mask.dtype == torch.bool else mask.masked_fill(dummy, 0.0)
        if self.softcap is None and sinks is None:
            result = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.to(q.dtype) if mask.dtype != torch.bool else mask, dropout_p=self.dropout,
                scale=self.scaling, enable_gqa=k.shape[1] != q.shape[1],
            )
        else:
            result = spelled_out_attention(q, k, v, mask, self.scaling, self.softcap, sinks, self.dropout)
        return result.masked_fill(empty, 0.0)

    def pairs_pay(self, block_lists: torch.Tensor) -> bool:
        """Whether a row keeps at most 1 / PAIRS_SHARE of the blocks its chunk reaches: then pairs (small matmuls)
        beat one pass over the chunk's union (large matmuls, but every reached block: per-query choices of a chunk
        cover them all); above, as with `block_sparse`'s mass threshold 0.9, the union is as fast and holds less
        (measured on CPU at 8k-32k: `block_topk` 2048 keys at 32k 9.6-10.5 s with 1.5, 11.5 s with 3)."""
        rule, size = self.selection.rule, self.selection.block_size
        per_row = block_lists.shape[-1] + rule.sinks // size + rule.local_blocks
        return PAIRS_SHARE * per_row <= int(self.t.max()) // size + 1

    def attend_block_pairs(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_lists: torch.Tensor
    ) -> torch.Tensor:
        """Every row attends its own blocks (listed, sinks, local), computed pair by pair grouped by key block: the
        rows that chose block j are one matmul against j's keys (a view: no key is gathered or read for a row that
        did not choose it), the logits of each row's blocks are one softmax. Work and memory follow rows x heads x
        kept blocks, where a chunk-wide union of per-query choices reaches every earlier block (Quest's per-query
        choice in prefill). Rows run in slices whose pairs' logits stay within PAIR_ELEMENTS."""
        rule, size = self.selection.rule, self.selection.block_size
        t = self.t
        num_rows, q_heads = t.numel(), query.shape[1]
        # Each row's blocks: listed, the sink blocks and the local blocks ending at its own; each once, none after it.
        fixed = [t.new_full((num_rows,), j) for j in range(rule.sinks // size)]
        fixed += [t // size - i for i in range(rule.local_blocks)]
        blocks = block_lists[0].expand(q_heads, num_rows, -1)
        if fixed:
            blocks = torch.cat((blocks, torch.stack(fixed, -1).expand(q_heads, -1, -1)), dim=-1)
        blocks = blocks.sort(dim=-1).values
        repeat = torch.cat((torch.zeros_like(blocks[..., :1], dtype=torch.bool), blocks[..., 1:] == blocks[..., :-1]), -1)
        blocks = torch.where(repeat | (blocks * size > t[:, None]), -1, blocks)
        group = q_heads // keys.shape[1]
        step = max(1, PAIR_ELEMENTS // (group * blocks.shape[-1] * size))
        pieces = [
            self.block_pairs_of_rows(query[:, :, lo : lo + step], keys, values, blocks[:, lo : lo + step], t[lo : lo + step])
            for lo in range(0, num_rows, step)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def block_pairs_of_rows(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """`attend_block_pairs` for rows at positions t whose blocks [Hq, rows, width] are sorted, each once (-1
        unused). The pairs are sorted by block once; results go back to row order by one index_add."""
        size = self.selection.block_size
        num_rows, q_heads, kv_heads = t.numel(), query.shape[1], keys.shape[1]
        group, dim_v, width = q_heads // kv_heads, values.shape[-1], blocks.shape[-1]
        offsets = torch.arange(size, device=t.device)
        outputs = []
        for g in range(kv_heads):
            heads = slice(g * group, (g + 1) * group)
            pair_blocks = blocks[heads].reshape(-1)  # pair p: row p // width of the group's [heads x rows]
            row_t = t.repeat(group)  # position of each of the group's rows
            q = query[0, heads].reshape(group * num_rows, -1) * self.scaling
            if self.beta is not None:  # beta scales a row's logits by its kept-key count: scale its query
                row_blocks = blocks[heads].reshape(group * num_rows, width)
                kept = torch.where(row_blocks >= 0, (row_t[:, None] - row_blocks * size + 1).clamp(max=size), 0)
                q = q * self.beta(kept.sum(-1, keepdim=True).float()).to(q.dtype)
            order = pair_blocks.argsort(stable=True)[int((pair_blocks < 0).sum()):]  # valid pairs by block
            if order.numel() == 0:  # no row keeps a key
                outputs.append(query.new_zeros(1, group, num_rows, dim_v))
                continue
            by_block, counts = torch.unique_consecutive(pair_blocks[order], return_counts=True)
            spans = list(zip(by_block.tolist(), torch.cumsum(counts, 0).tolist(), counts.tolist()))
            pair_rows = order // width
            q_sorted = q.index_select(0, pair_rows)
            k_g, v_g = keys[0, g], values[0, g]
            train = torch.is_grad_enabled() and any(x.requires_grad for x in (q_sorted, k_g, v_g))
            logits = _by_block(
                spans, size, train, float("-inf"),
                lambda block, pairs: (q_sorted[pairs], k_g[block * size : (block + 1) * size].transpose(0, 1)),
            )
            # Causality inside the row's own block, the only one holding keys after the row (a few pairs per row).
            own = (pair_blocks[order] == row_t[pair_rows] // size).nonzero().flatten()
            future = offsets > (row_t[pair_rows[own]] % size)[:, None]
            logits.index_copy_(0, own, logits.index_select(0, own).masked_fill(future, float("-inf")))
            # Each row's softmax over its pairs, in block order: its largest logit and its sum by scatter over rows,
            # so no pass brings the logits back to row order.
            row_max = logits.detach().amax(-1).float()
            row_max = row_max.new_full((group * num_rows,), float("-inf")).scatter_reduce(0, pair_rows, row_max, "amax")
            shift = row_max.index_select(0, pair_rows)[:, None]
            weights = logits.float().sub_(shift).exp_() if not train else (logits.float() - shift).exp()
            total = weights.new_zeros(group * num_rows).index_add(0, pair_rows, weights.sum(-1))
            weights = F.dropout(weights, p=self.dropout, training=self.dropout > 0).to(values.dtype)
            mixed = _by_block(
                spans, dim_v, train, 0.0,
                lambda block, pairs: (weights[pairs, : min(size, v_g.shape[0] - block * size)], v_g[block * size : (block + 1) * size]),
            )
            # Rows keeping no key (no pairs) sum nothing and output zeros.
            mixed = mixed.new_zeros(group * num_rows, dim_v).index_add(0, pair_rows, mixed)
            out = mixed / total.clamp(min=torch.finfo(total.dtype).tiny)[:, None].to(mixed.dtype)
            outputs.append(out.view(1, group, num_rows, dim_v))
        return torch.cat(outputs, dim=1).to(query.dtype)

    def one_row_of_plain_lists(self, query: torch.Tensor, kv_heads: int, lists: _Lists) -> bool:
        """A decode row whose KV groups' heads list the same keys (`choose_per='group'` choices), for `attend_row`.
        Where each head chooses for itself the pass per KV head (`attend`) reads the union of its heads' lists."""
        if not (
            query.shape[2] == 1 and lists.log_weights is None and not self.selection.rule.dilation
            and self.restrict is None and self.softcap is None and self.sinks is None
        ):
            return False
        for part in (lists.blocks, lists.tokens):
            if part is not None and part.shape[1] > 1:
                by_group = part.reshape(kv_heads, -1, part.shape[-1])
                if not bool((by_group == by_group[:, :1]).all()):
                    return False
        return True

    def attend_row(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lists: _Lists) -> torch.Tensor:
        """A decode row whose KV groups share their lists: each KV head reads the rule's contiguous keys and its
        group's listed keys, with the group's heads as the rows of one attention; positions and masks of every KV
        head are built at once (a few ops per step instead of a pass of `groups` per KV head)."""
        sel, rule = self.selection, self.selection.rule
        t, device = int(self.t[0]), query.device
        q_heads, kv_heads = query.shape[1], keys.shape[1]
        group = q_heads // kv_heads
        lowest = self.first if self.window is None else max(self.first, t - self.window + 1)
        near = max(0, rule.near_start(t))
        sink_end = min(rule.sinks, near)
        shared = torch.cat((torch.arange(sink_end, device=device), torch.arange(near, t + 1, device=device)))
        shared = shared[shared >= lowest]

        def by_kv_head(part: torch.Tensor) -> torch.Tensor:  # [1, H|1, 1, n] -> [Hkv, n]: the group's first head
            return part[0, ::group, 0] if part.shape[1] > 1 else part[0, :, 0].expand(kv_heads, -1)

        listed_positions = []
        if lists.blocks is not None:
            blocks = by_kv_head(lists.blocks)
            if self.window is not None:  # the block across the window's start, kept whole (structure.edge_block)
                edge = edge_block(self.t[:1], self.window, sel.block_size)
                blocks = torch.cat((blocks, edge.view(1, 1).expand(kv_heads, 1)), dim=-1)
            spans = blocks[..., None] * sel.block_size + torch.arange(sel.block_size, device=device)
            listed_positions.append(torch.where(blocks[..., None] < 0, -1, spans).flatten(1))
        if lists.tokens is not None:
            listed_positions.append(by_kv_head(lists.tokens))
        positions = _distinct_rows(torch.cat(listed_positions, dim=-1), t + 1)  # a key listed twice counts once
        # The rule's keys hold the listed keys that fall in them.
        far = (positions >= max(lowest, sink_end)) & (positions < near)
        positions = torch.cat((shared.expand(kv_heads, -1), torch.where(far, positions, -1)), dim=-1)
        keep = (positions >= 0)[:, None, None].expand(kv_heads, 1, group, -1)
        slots = self.slots(positions.clamp(min=self.first))
        k, v = _rows_per_head(keys, slots)[:, None], _rows_per_head(values, slots)[:, None]
        out = self.softmax(query.view(kv_heads, 1, group, query.shape[-1]), k, v, keep, None)
        return out.view(1, q_heads, 1, values.shape[-1])

    def gather(self, x: torch.Tensor, group: _Group) -> torch.Tensor:
        """The keys (or values) of the group's positions, [1, H, m, D]: runs as views of the held keys (joined by one
        copy; a strided view reads a residue class without an index), listed positions by index."""
        if self.gap:  # an evicting cache's slots are not one run per run of positions
            return x.index_select(2, self.slots(group.positions))
        parts = [
            x[:, :, piece.start - self.first : piece.stop - self.first : piece.step] if isinstance(piece, slice)
            else x.index_select(2, piece - self.first)
            for piece in group.pieces
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of real key positions (of this sequence's held keys)."""
        slots = positions - self.first
        return slots - self.gap * (slots >= self.gap_position) if self.gap else slots

    def groups(self, q_heads: int, lists: _Lists) -> list[_Group]:
        sel, t = self.selection, self.t
        rule = sel.rule
        t_min, t_max = int(t[0]), int(t[-1])  # queries come in slot order: positions never decrease
        device = t.device
        # Keys before `lowest` are seen by no row of the chunk (dropped from a sliding cache, or beyond the window).
        lowest = self.first if self.window is None else max(self.first, t_min - self.window + 1)
        near = max(0, rule.near_start(t_min))
        sink_end = min(rule.sinks, near)
        pieces: list[slice | torch.Tensor] = [*_run(0, sink_end, lowest), *_run(near, t_max + 1, lowest)]
        block_lists, token_lists = lists.blocks, lists.tokens
        listed_positions = []
        if block_lists is not None:
            blocks = _distinct(block_lists, t_max // sel.block_size + 1)
            if self.window is not None:  # the blocks across the window's start, kept whole (structure.edge_block)
                edges = edge_block(t, self.window, sel.block_size)
                blocks = torch.cat((blocks, _distinct(edges, t_max // sel.block_size + 1)))
            listed_positions.append((blocks[:, None] * sel.block_size + torch.arange(sel.block_size, device=device)).flatten())
        if token_lists is not None:
            listed_positions.append(token_lists.flatten())
        if listed_positions:
            listed_positions = torch.cat(listed_positions)
            # The near run and the sinks already hold the listed keys that fall in them.
            far = (listed_positions < near) & (listed_positions >= max(sink_end, lowest)) & (listed_positions <= t_max)
            pieces.append(_distinct(listed_positions[far], t_max + 1))
        positions = _spelled_out(pieces, device)
        chosen = None
        if block_lists is not None:
            chosen = listed(block_lists, positions // sel.block_size, t_max // sel.block_size + 1)
            if self.window is not None:
                edge = edge_block(t, self.window, sel.block_size).view(1, 1, -1, 1)
                chosen = chosen | (positions // sel.block_size == edge)
        if token_lists is not None:
            tokens = listed(token_lists, positions, t_max + 1)
            chosen = tokens if chosen is None else chosen | tokens
        weights = None if lists.log_weights is None else _token_weights(token_lists, lists.log_weights, q_heads, positions)
        if not rule.dilation:
            keep = rule.keep(t.view(1, 1, -1, 1), positions)
            keep = keep if chosen is None else keep | chosen
            return [_Group(pieces, self.finish(keep, positions, weights))]
        groups = []
        d = rule.dilation
        for residue in range(d):
            rows = (t % d == residue).nonzero().flatten()
            if rows.numel() == 0:
                continue
            keep = rule.keep(t[rows].view(1, 1, -1, 1), positions)
            if chosen is not None:
                keep = keep | chosen[:, :, rows]
            strided = _run(sink_end + (residue - sink_end) % d, near, lowest, d)
            both = _spelled_out([*pieces, *strided], device)
            added = both.numel() - positions.numel()
            keep = torch.cat((keep, keep.new_ones(1, 1, rows.numel(), added)), -1)
            row_weights = None
            if weights is not None:
                row_weights = torch.cat((weights[:, :, rows], weights.new_zeros(*weights.shape[:2], rows.numel(), added)), -1)
            groups.append(_Group([*pieces, *strided], self.finish(keep, both, row_weights, rows=rows), rows))
        return groups

    def rows_of(self, lists: torch.Tensor | ListsFor) -> torch.Tensor:
        return lists_for(lists, self.rows)[self.b : self.b + 1]

    def finish(self, keep, positions, weights=None, rows=None) -> torch.Tensor:
        """The keep mask with causality and the model's restriction applied; as log-weights when there are any."""
        t = self.t if rows is None else self.t[rows]
        keep = keep & (positions <= t.view(1, 1, -1, 1))
        if self.window is not None:
            keep = keep & (t.view(1, 1, -1, 1) - positions < self.window)
        if self.restrict is not None:
            restrict = self.restrict if rows is None else self.restrict[:, :, rows]
            keep = keep & restrict.index_select(-1, positions - self.first)
        if weights is None:
            return keep
        return weights.masked_fill(~keep, float("-inf"))


def _by_block(
    spans: list[tuple[int, int, int]],
    columns: int,
    train: bool,
    pad: float,
    operands: Callable[[int, slice], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """a @ b for the operands (a, b) of each (block, end, count) span of block-sorted pairs, stacked -> [pairs,
    columns]; a product narrower than `columns` (the last block of the held keys) is padded with `pad`. Inference
    multiplies into one buffer; training joins the products, as autograd needs each piece."""
    if train:
        products = [a @ b for a, b in (operands(block, slice(end - count, end)) for block, end, count in spans)]
        return torch.cat([F.pad(x, (0, columns - x.shape[1]), value=pad) for x in products])
    out = None
    for block, end, count in spans:
        a, b = operands(block, slice(end - count, end))
        if out is None:
            out = a.new_empty(spans[-1][1], columns)
        if b.shape[1] == columns:
            torch.mm(a, b, out=out[end - count : end])
        else:
            out[end - count : end] = F.pad(a @ b, (0, columns - b.shape[1]), value=pad)
    return out


def _rows_per_head(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x[0, h, slots[h]] for every head h of x [1, H, S, D] -> [H, M, D]: one index_select over the flattened slots
    when x is contiguous (faster than advanced indexing), which a strided view of the cache would copy whole."""
    if not x.is_contiguous():
        return x[0, torch.arange(x.shape[1], device=x.device)[:, None], slots]
    flat = slots + torch.arange(x.shape[1], device=x.device)[:, None] * x.shape[2]
    return x.reshape(-1, x.shape[-1]).index_select(0, flat.flatten()).view(x.shape[1], -1, x.shape[-1])


def _distinct_rows(values: torch.Tensor, width: int) -> torch.Tensor:
    """The distinct values in [0, width) of each row of `values` [R, n], ascending, padded with -1 to the longest
    row -> [R, m]: one hit vector per row."""
    hit = torch.zeros(values.shape[0], width + 1, dtype=torch.bool, device=values.device)
    hit.scatter_(1, torch.where((values < 0) | (values >= width), width, values), True)
    rows, found = hit[:, :width].nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=values.shape[0])
    out = values.new_full((values.shape[0], max(1, int(counts.max()))), -1)
    out[rows, torch.arange(rows.numel(), device=values.device) - (counts.cumsum(0) - counts)[rows]] = found
    return out


def _distinct(values: torch.Tensor, width: int) -> torch.Tensor:
    """The distinct values in [0, width) of `values`, ascending: a hit vector instead of a sort (lists hold
    rows x heads x budget entries, the distinct ones at most `width`)."""
    hit = torch.zeros(width + 1, dtype=torch.bool, device=values.device)
    hit.index_fill_(0, torch.where((values < 0) | (values >= width), width, values).flatten(), True)
    return hit[:width].nonzero().flatten()


def spelled_out_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """What SDPA computes (mask: bool keep or additive float, broadcast to [B, Hq, q, m]; GQA keys), in float32, with
    the logits soft-capped to softcap * tanh(logits / softcap) and one sink logit per query head (`sinks` [Hq]) added
    to the softmax denominator (a virtual key of value zero) -> [B, Hq, q, Dv]."""
    logits = grouped_scores(query.float(), key.float()) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    if sinks is not None:
        logits = torch.cat((logits, sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)), dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return grouped_weighted_sum(probs.to(value.dtype), value).to(query.dtype)
