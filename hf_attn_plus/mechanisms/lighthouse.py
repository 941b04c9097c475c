"""lighthouse: training-time hierarchical selection attention with a handover to another mechanism at inference.

Keys form fine blocks of `block_size` real tokens and `levels` coarser levels, each `factor` times larger; every
block is summarised by the mean of its keys. Queries are pooled the same way (symmetric): query t is represented by
the mean of the queries of its fine block up to t (a prefix, so selection never reads a future token). Selection is
top-down and gradient-free: at the coarsest level the `budget` best blocks (by pooled q·k) entirely before the
query's block are chosen; at each finer level the children of the chosen blocks compete for `budget` places. The
block containing the query is never scored (it holds future keys) and is always descended into; at the finest level
the query's own block, `local_blocks` - 1 blocks before it and `sink_blocks` leading blocks are always attended.
Exact softmax then runs over the keys of the chosen fine blocks, so gradients flow as in dense attention.

This is the block-selection form of Lighthouse Attention (Peng, Ghosh, Quesnelle 2026): the paper instead selects
a joint sub-sequence of pooled Q/K/V entries from all levels, runs SDPA on it and scatters the outputs back.

At inference (module in eval mode, or single-token decode) the mechanism hands over to `inference`: 'dense' or
another registered mechanism, run with `inference_options`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..attention import attend_selected, run_delegate
from ..masking import AttentionContext
from ..options import Option, int_option
from ..registry import Mechanism, mechanism_option, register
from ..selection import blocks_to_keys, grouped_scores, key_blocks, pooled_blocks, top_scoring, visible_blocks


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


def hierarchical_selection(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> torch.Tensor:
    """Keep mask [B, Hq, q, kv] of the fine blocks chosen top-down from the coarsest level."""
    pooled_query = causal_block_queries(query, ctx, opts.block_size)
    chosen = None
    for level in range(opts.levels, -1, -1):
        size = opts.block_size * opts.factor**level
        blocks = key_blocks(ctx, size)
        num_blocks = int(blocks.max()) + 1
        index = torch.arange(num_blocks, device=query.device)
        own = ctx.query_pos // size  # the block holding the query: never scored, always descended into
        past = (index < own) & visible_blocks(ctx, blocks, num_blocks)
        candidates = past
        if chosen is not None:
            candidates = past & chosen.gather(-1, (index // opts.factor).expand(*chosen.shape[:-1], -1))
        fixed = index == own
        if level == 0:
            fixed = fixed | (past & ((own - index < opts.local_blocks) | (index < opts.sink_blocks)))
            candidates = candidates & ~fixed
        scores = grouped_scores(pooled_query, pooled_blocks(key, blocks.flatten(1), num_blocks))
        chosen = fixed | top_scoring(scores, candidates.expand_as(scores), opts.budget)
    return blocks_to_keys(chosen, key_blocks(ctx, opts.block_size), ctx)


def attend(module, query, key, value, ctx, opts, scaling, dropout):
    if module.training and query.shape[2] > 1:
        with torch.no_grad():
            keep = hierarchical_selection(query, key, ctx, opts)
        return attend_selected(module, query, key, value, keep, opts, scaling, dropout)
    return run_delegate(
        "lighthouse", opts.inference, opts.inference_options, opts, module, query, key, value, ctx, scaling, dropout
    )


MECHANISM = register(
    Mechanism(
        name="lighthouse",
        family="sparse",
        summary="training: hierarchical pooled selection of fine blocks; inference: dense or a named mechanism",
        options=(
            int_option("block_size", 64, 1, "keys per fine block (and queries per pooled query block)"),
            int_option("levels", 2, 0, "coarser levels above the fine blocks"),
            int_option("factor", 4, 2, "blocks of one level per block of the next coarser level"),
            int_option("budget", 8, 1, "blocks chosen per level besides the query's own"),
            int_option("local_blocks", 1, 1, "fine blocks up to the query's own, always attended"),
            int_option("sink_blocks", 1, 0, "leading fine blocks always attended"),
            mechanism_option("inference", "lighthouse", "what runs outside training and at decode"),
            Option("inference_options", {}, "a dict of the inference mechanism's options", lambda v: isinstance(v, dict)),
        ),
        attend=attend,
        training_free=False,
    )
)
