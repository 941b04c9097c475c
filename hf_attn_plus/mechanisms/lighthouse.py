"""lighthouse: training-only hierarchical attention (Lighthouse Attention, Peng, Ghosh, Quesnelle 2026) that hands
over to dense attention or a named mechanism at inference.

form='pyramid' (default: the paper's algorithm, github.com/ighoshsubho/lighthouse-attention, with each position
reading exactly one entry unless scatter='sum'). Per batch row and query head, over the n real tokens (positions count
real tokens, so padding and batch layout change nothing):

1. Pyramid. Level 0 entries are the tokens; level l = 1..`levels` entry i covers positions [i*f^l, (i+1)*f^l)
   (f = `factor`) and holds the mean of their queries, keys and values (symmetric pooling). An entry exists if it
   starts before n; it is complete if it ends at or before n.
2. Selection (gradient-free, parameter-free, top-down). An entry's scores are the largest query norm and the largest
   key norm among its tokens (the paper's `norm` scorer, max-pooled up the pyramid). Candidates of the coarsest level
   are all its entries; candidates of level l < `levels` are the children of the entries refined at level l+1.
   Among the complete candidates, ceil(budget/2) with the best query score and then floor(budget/2) of the rest
   with the best key score are refined; incomplete candidates (the tail of the sequence) are always refined and do
   not count. Every candidate that is not refined is emitted at its level; the children of refined level-1 entries
   are emitted as tokens. The emitted entries partition the n positions: each position is in exactly one of them.
3. Compressed sequence and attention. The emitted entries, sorted by first position, form one sequence; standard
   causal SDPA runs on it with the pooled queries, keys and values. Causality rule: entry e may see entry g iff g
   starts at or before e; as entries are disjoint, a key other than e's own holds only positions before e's first,
   and e's own key holds only positions inside e.
4. Scatter back (scatter='latest', the default). Position t takes the output of the last entry that ends at or
   before t + 1 (the latest entry all of whose positions are <= t): a token its own output; a pooled entry [s, s+c)
   writes its last position s+c-1 and the positions up to the end of the next emitted entry, minus one. Nothing a
   position reads holds a later position. Positions before the first entry ends (inside an unrefined first entry)
   output zeros.
With a budget covering every candidate of every level all entries are tokens and this is dense causal attention.
As in the paper, which entries are refined is decided over the whole sequence (a later token's norm can change the
resolution of an earlier one); values and gradients never flow from a later position to an earlier one. The paper
ends training with a short dense phase (recovery): switch the model to 'sdpa' for the last steps.

scatter='sum' follows the released code (src/lighthouse_selection.py) where it differs from the above: every
refined complete entry also stays in the sequence, placed after its last position (after the refined entries of finer
levels that end there, before the next emitted entry), and position t adds up, for every level, the output of that
level's last entry ending at or before t + 1 if it is in the sequence (the kernel's atomic fan-out of entry [s, s+c)
into positions [s+c-1, s+2c-1)). Entries' ends never decrease along the sequence, so this is causal too, but the
output is a sum over levels and does not reduce to dense attention at any budget. Not followed in either mode: the
released kernel selects per tile of the sequence (topk/128 tiles of 128 entries per level); here the top-k runs over
the whole sequence (the same for one tile). Model-side restrictions beyond causality and padding (DeepSeek-V3.2's
indexer choice, sliding windows) are not applied in training; the selection above replaces them.

form='blocks': coarse pooled levels choose which fine key blocks each query attends to. Keys form fine blocks of
`block_size` real tokens and `levels` coarser levels, each `factor` times larger; every block is summarised by the
mean of its keys. Query t is represented by the mean of the queries of its fine block up to t. At the coarsest level
the `budget` best blocks (by pooled q.k) entirely before the query's block are chosen; at each finer level the
children of the chosen blocks compete for `budget` places. The query's own block is never scored and always
descended into; at the finest level the query's own block, `local_blocks` - 1 blocks before it and `sink_blocks`
leading blocks are always attended. Exact softmax then runs over the keys of the chosen fine blocks: a `Selection`
whose rule holds the sink, local and own blocks and whose block lists hold the others, descended per query chunk
when the chunked reference reaches it (no [q, kv] tensor).

At inference (module in eval mode, or single-token decode) the mechanism hands over to `inference`: 'dense' or
another registered mechanism, run with `inference_options`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..attention import attend_selection, length_beta, run_delegate
from ..masking import AttentionContext
from ..options import Option, choice_option, int_option
from ..registry import Mechanism, mechanism_option, register
from ..selection import (
    all_rows,
    chunk_seen_blocks,
    grouped_scores,
    kept_indices,
    key_blocks,
    pooled_blocks,
    query_chunks,
    stack_lists,
    top_scoring,
)
from ..structure import PositionRule, Selection


def real_token_order(ctx: AttentionContext, padded_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the p-th real key [B, padded_length] (0 past the real ones), number of real keys [B, 1])."""
    key_pos = ctx.key_pos[:, 0, 0]
    batch, kv_len = key_pos.shape
    slot = torch.where(key_pos >= 0, key_pos, padded_length)  # padding goes to an extra slot, dropped
    order = torch.zeros(batch, padded_length + 1, dtype=torch.long, device=key_pos.device)
    order.scatter_(1, slot, torch.arange(kv_len, device=key_pos.device).expand(batch, -1))
    return order[:, :padded_length], (key_pos >= 0).sum(-1, keepdim=True)


def pyramid(x: torch.Tensor, levels: int, factor: int) -> torch.Tensor:
    """x [B, H, N, D] with N a multiple of factor**levels -> every level's means concatenated, [B, H, P, D]."""
    batch, heads, length, dim = x.shape
    sizes = [factor**level for level in range(levels + 1)]
    return torch.cat([x.reshape(batch, heads, length // size, size, dim).mean(3) for size in sizes], dim=2)


def entry_spans(
    length: int, levels: int, factor: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First position, size and level of every pyramid entry in `pyramid`'s order, [P] each."""
    spans = [torch.arange(0, length, factor**level, device=device) for level in range(levels + 1)]
    starts = torch.cat(spans)
    level = torch.cat([torch.full_like(span, index) for index, span in enumerate(spans)])
    return starts, factor**level, level


def pyramid_selection(
    query_norm: torch.Tensor, key_norm: torch.Tensor, real: torch.Tensor, opts: SimpleNamespace
) -> tuple[torch.Tensor, torch.Tensor]:
    """(emitted, refined and complete) entries [B, H, P] in `pyramid`'s order, from per-token norms [B, H, N] and
    real lengths [B, 1]."""
    batch, heads, length = query_norm.shape
    real = real[:, :, None]
    emitted, chosen, refined = [], [], None
    for level in range(opts.levels, 0, -1):
        size = opts.factor**level
        start = torch.arange(0, length, size, device=real.device)
        candidate = (start < real).expand(batch, heads, -1)
        if refined is not None:
            candidate = candidate & refined.repeat_interleave(opts.factor, dim=-1)
        complete = candidate & (start + size <= real)
        query_score = query_norm.reshape(batch, heads, -1, size).amax(-1)
        key_score = key_norm.reshape(batch, heads, -1, size).amax(-1)
        by_query = top_scoring(query_score, complete, opts.budget - opts.budget // 2)
        by_key = top_scoring(key_score, complete & ~by_query, opts.budget // 2)
        refined = (candidate & ~complete) | by_query | by_key
        emitted.insert(0, candidate & ~refined)
        chosen.insert(0, by_query | by_key)
    tokens = (torch.arange(length, device=real.device) < real).expand(batch, heads, -1)
    if refined is not None:
        tokens = tokens & refined.repeat_interleave(opts.factor, dim=-1)
    return torch.cat([tokens, *emitted], dim=-1), torch.cat([torch.zeros_like(tokens), *chosen], dim=-1)


def compressed_sequence(
    query: torch.Tensor, key: torch.Tensor, real: torch.Tensor, opts: SimpleNamespace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of each row and query head in sequence order: (pyramid index [B, Hq, S], first position, size,
    valid [B, Hq, S]); query [B, Hq, N, D], key [B, Hkv, N, D] in real-token order."""
    batch, q_heads, length, _ = query.shape
    groups = q_heads // key.shape[1]
    key_norm = key.float().norm(dim=-1).repeat_interleave(groups, dim=1)
    emitted, refined = pyramid_selection(query.float().norm(dim=-1), key_norm, real, opts)
    starts, sizes, level = entry_spans(length, opts.levels, opts.factor, query.device)
    # Emitted entries are disjoint, so their first positions order them. scatter='sum' also keeps refined entries,
    # each right after its last position and after the refined entries of finer levels that end there.
    width = opts.levels + 1
    rank = torch.where(emitted, starts * width, (starts + sizes - 1) * width + level)
    in_sequence = emitted | refined if opts.scatter == "sum" else emitted
    order = torch.where(in_sequence, rank, length * width).argsort(dim=-1, stable=True)
    count = in_sequence.sum(-1, keepdim=True)
    order = order[..., : int(count.max())]
    return order, starts[order], sizes[order], torch.arange(order.shape[-1], device=query.device) < count


def scatter_sources(
    entries: torch.Tensor,
    starts: torch.Tensor,
    sizes: torch.Tensor,
    valid: torch.Tensor,
    length: int,
    opts: SimpleNamespace,
) -> torch.Tensor:
    """Sequence indices [B, Hq, length, m] whose outputs each position adds up; -1: none.

    'latest' (m = 1): the last entry that ended at or before t + 1. 'sum' (m = levels + 1): for every level, the
    last entry of that level that ended at or before t + 1, where it is in the sequence.
    """
    *lead, seq_len = entries.shape
    sequence_index = torch.arange(seq_len, device=entries.device).expand_as(entries)
    if opts.scatter == "latest":
        ends = torch.where(valid, starts + sizes - 1, length)
        ended = torch.full((*lead, length + 1), -1, dtype=torch.long, device=entries.device)
        ended.scatter_(-1, ends, sequence_index)
        return ended[..., :length].cummax(dim=-1).values[..., None]
    entry_count = sum(length // opts.factor**level for level in range(opts.levels + 1))
    slot = torch.full((*lead, entry_count + 1), -1, dtype=torch.long, device=entries.device)
    slot.scatter_(-1, torch.where(valid, entries, entry_count), sequence_index)
    t = torch.arange(length, device=entries.device)
    found, offset = [], 0
    for level in range(opts.levels + 1):
        size = opts.factor**level
        index = (t + 1) // size - 1
        found.append(torch.where(index >= 0, slot[..., offset + index.clamp(min=0)], -1))
        offset += length // size
    return torch.stack(found, dim=-1)


def gather_entries(pyramid_x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Entries `order` [B, Hq, S] of pyramid_x [B, H, P, D] (H = Hq or a KV head per group of query heads)."""
    batch, heads, _, dim = pyramid_x.shape
    index = order.reshape(batch, heads, -1, 1).expand(-1, -1, -1, dim)
    return pyramid_x.gather(2, index).reshape(*order.shape, dim)


def pyramid_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    scaling: float,
    dropout: float,
) -> tuple[torch.Tensor, None]:
    """The pyramid form's output [B, Hq, q, Dv] (see the module docstring); no attention weights."""
    batch, q_heads, q_len, _ = query.shape
    if q_len != key.shape[2]:
        raise ValueError(
            f"hf_attn_plus mechanism 'lighthouse' (form='pyramid') trains on whole sequences: it needs a query for "
            f"every key, got {q_len} queries for {key.shape[2]} keys (a cache in training mode?)"
        )
    unit = opts.factor**opts.levels
    length = -(-q_len // unit) * unit
    order, real = real_token_order(ctx, length)
    is_real = (torch.arange(length, device=query.device) < real)[:, None, :, None]

    def in_token_order(x: torch.Tensor) -> torch.Tensor:
        picked = x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
        return picked * is_real

    query, key, value = in_token_order(query), in_token_order(key), in_token_order(value)
    with torch.no_grad():
        entries, starts, sizes, valid = compressed_sequence(query, key, real, opts)
    q = gather_entries(pyramid(query, opts.levels, opts.factor), entries)
    k = gather_entries(pyramid(key, opts.levels, opts.factor), entries)
    v = gather_entries(pyramid(value, opts.levels, opts.factor), entries)
    seq_len = entries.shape[-1]
    beta = length_beta(module, opts)
    if beta is not None:  # entry j attends the j + 1 entries up to it; logits * beta == (beta * q) . k
        q = q * beta(torch.arange(1, seq_len + 1, device=q.device, dtype=torch.float32)[:, None]).to(q.dtype)
    # Valid entries come first, so causal attention never lets a valid entry see an invalid one.
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout)
    with torch.no_grad():
        sources = scatter_sources(entries, starts, sizes, valid, length, opts)
        position = ctx.query_pos.clamp(min=0).expand(-1, q_heads, -1, sources.shape[-1])
        sources = torch.where(ctx.query_pos >= 0, sources.gather(2, position), -1)
    picked = out.gather(2, sources.clamp(min=0).reshape(batch, q_heads, -1, 1).expand(-1, -1, -1, out.shape[-1]))
    picked = picked.reshape(*sources.shape, -1) * (sources >= 0)[..., None]
    return picked.sum(3), None


def causal_block_queries(query: torch.Tensor, ctx: AttentionContext, block_size: int) -> torch.Tensor:
    """Mean of the queries of each query's fine block up to and including it, [B, Hq, q, D].

    Summed in a fixed order per row, so padding and batch layout do not change a single bit. Queries of the block
    that precede this call (chunked prefill) are not available and count as zeros.
    """
    offset = ctx.query_pos.clamp(min=0) % block_size
    total = torch.zeros_like(query)
    for back in range(min(block_size, query.shape[2])):
        earlier = F.pad(query, (0, 0, back, 0))[:, :, : query.shape[2]]
        total = total + earlier * (offset >= back)
    return total / (offset + 1)


def hierarchical_selection(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    """The fine blocks chosen top-down from the coarsest level: the sink, local and own blocks as a rule, the chosen
    others as block lists built per query chunk when the reference reaches it."""
    batch, _, q_len, _ = query.shape
    pooled_query = causal_block_queries(query, ctx, opts.block_size)
    pooled_keys = []  # per level, coarsest first: mean keys [B, Hkv, blocks, D]
    for level in range(opts.levels, -1, -1):
        size = opts.block_size * opts.factor**level
        num_blocks = max(1, -(-int(ctx.key_count.max()) // size))
        pooled_keys.append(pooled_blocks(key, key_blocks(ctx, size).reshape(batch, -1), num_blocks))

    def blocks(rows: slice) -> torch.Tensor:
        chunks = query_chunks(batch, query.shape[1], all_rows(rows, q_len), pooled_keys[-1].shape[2])
        return stack_lists([chosen_fine_blocks(pooled_query[:, :, chunk], pooled_keys, ctx, chunk, opts) for chunk in chunks])

    rule = PositionRule(sinks=opts.sink_blocks * opts.block_size, block_size=opts.block_size, local_blocks=opts.local_blocks)
    return Selection(rule, block_size=opts.block_size, blocks=blocks)


def chosen_fine_blocks(
    pooled_query: torch.Tensor, pooled_keys: list[torch.Tensor], ctx: AttentionContext, rows: slice, opts: SimpleNamespace
) -> torch.Tensor:
    """The descent for the queries of `rows` (pooled queries [B, Hq, rows, D]): the chosen fine blocks other than the
    sink, local and own ones, [B, Hq, rows, budget] block indices (-1 unused)."""
    t = ctx.query_pos[:, :, rows]
    chosen = None
    for level, keys in zip(range(opts.levels, -1, -1), pooled_keys):
        size = opts.block_size * opts.factor**level
        num_blocks = keys.shape[2]
        index = torch.arange(num_blocks, device=t.device)
        own = t // size  # the block holding the query: never scored, always descended into
        past = (index < own) & chunk_seen_blocks(ctx, rows, num_blocks, size)
        candidates = past
        if chosen is not None:
            candidates = past & chosen.gather(-1, (index // opts.factor).expand(*chosen.shape[:-1], -1))
        fixed = index == own
        if level == 0:
            fixed = fixed | (past & ((own - index < opts.local_blocks) | (index < opts.sink_blocks)))
            candidates = candidates & ~fixed
        top = top_scoring(grouped_scores(pooled_query, keys), candidates.expand(*pooled_query.shape[:3], -1), opts.budget)
        chosen = fixed | top
    return kept_indices(top, opts.budget)


def attend(module, query, key, value, ctx, opts, scaling, dropout):
    if module.training and query.shape[2] > 1:
        if opts.form == "pyramid":
            return pyramid_attention(module, query, key, value, ctx, opts, scaling, dropout)
        with torch.no_grad():
            selection = hierarchical_selection(query, key, ctx, opts)
        return attend_selection(module, query, key, value, ctx, selection, opts, scaling, dropout), None
    return run_delegate(
        "lighthouse", opts.inference, opts.inference_options, opts, module, query, key, value, ctx, scaling, dropout
    )


MECHANISM = register(
    Mechanism(
        name="lighthouse",
        family="sparse",
        summary="training: pooled Q/K/V pyramid, top-k refinement, SDPA on the compressed sequence, scatter back "
        "(or pooled selection of fine blocks); inference: dense or a named mechanism",
        options=(
            choice_option("form", "pyramid", ("pyramid", "blocks"), "the paper's compressed sequence, or blocks"),
            choice_option(
                "scatter", "latest", ("latest", "sum"),
                "pyramid: each position reads the latest finished entry, or the released code's sum over levels",
            ),
            int_option("levels", 2, 0, "pooled levels above the tokens (pyramid) or above the fine blocks (blocks)"),
            int_option("factor", 4, 2, "entries of one level per entry of the next coarser level"),
            int_option("budget", 8, 1, "entries refined per level (pyramid); blocks chosen per level (blocks)"),
            int_option("block_size", 64, 1, "blocks: keys per fine block (and queries per pooled query block)"),
            int_option("local_blocks", 1, 1, "blocks: fine blocks up to the query's own, always attended"),
            int_option("sink_blocks", 1, 0, "blocks: leading fine blocks always attended"),
            mechanism_option("inference", "lighthouse", "what runs outside training and at decode"),
            Option("inference_options", {}, "a dict of the inference mechanism's options", lambda v: isinstance(v, dict)),
        ),
        attend=attend,
        training_free=False,
    )
)
