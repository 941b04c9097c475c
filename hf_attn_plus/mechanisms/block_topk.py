"""block_topk (Quest): keys form blocks of `block_size` by position; each block is summarised by the elementwise
min and max of its keys, scored against the query by the upper bound sum_d max(q_d*min_d, q_d*max_d), and the top
`budget` blocks (besides `sink_blocks` leading and `local_blocks` trailing ones) are attended exactly. Each query head
chooses for itself (`choose_per='head'`, Quest), or the heads of a GQA group share the blocks whose largest bound over
the group's heads is best (`choose_per='group'`): one KV read of `budget` blocks then serves the whole group.

Cached decode keeps the summaries as the layer's side state (patches/side_cache.py), so a step folds in only its new
keys, and the kernel goes from the chosen blocks straight to the tiles they cover (no per-token mask): the work
besides scoring the block summaries follows the budget, not the context.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..kernels.block_scoring import BlockSummaries, quest_scores
from ..kernels.sparse_attention import decoding, selection_kernel
from ..masking import AttentionContext
from ..options import choice_option, int_option
from ..patches.side_cache import side_state
from ..registry import Mechanism, register
from ..selection import (
    block_key_bounds,
    blocks_to_keys,
    key_blocks,
    quest_block_scores,
    top_blocks,
    visible_blocks,
)


def block_summaries(key: torch.Tensor, ctx: AttentionContext, block_size: int) -> BlockSummaries:
    """Every block's key bounds and cache-slot span: the layer's side state grown by the new keys in cached
    inference, else built from every key."""
    return side_state(ctx, f"block_topk:block_size={block_size}", lambda: BlockSummaries(block_size), key)


def chosen_blocks(
    query: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    blocks: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    block_scores: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Blocks each query head attends, [B, Hq, q, num_blocks]: sink and local blocks and the `budget` best-scoring."""
    kmin, kmax = bounds
    seen = visible_blocks(ctx, blocks, kmin.shape[2])
    scores = block_scores(query, kmin, kmax)
    group = query.shape[1] // kmin.shape[1] if opts.choose_per == "group" else 1
    if group > 1:  # one choice per KV group, by the largest bound any of its heads gives
        scores = scores.unflatten(1, (-1, group)).amax(dim=2)
    chosen = top_blocks(scores, seen, ctx.query_pos // opts.block_size, opts.sink_blocks, opts.local_blocks, opts.budget)
    return chosen.repeat_interleave(group, dim=1) if group > 1 else chosen


def select(
    query: torch.Tensor,
    key: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    block_scores: Callable[..., torch.Tensor] = quest_block_scores,
) -> torch.Tensor:
    """`block_scores(query, kmin, kmax)`: the reference bound, or the Triton kernel computing the same bound."""
    blocks = key_blocks(ctx, opts.block_size)
    if ctx.cache_layer is None:
        bounds = block_key_bounds(key, blocks, int(blocks.max()) + 1)
    else:
        bounds = block_summaries(key, ctx, opts.block_size).bounds
    return blocks_to_keys(chosen_blocks(query, ctx, opts, blocks, bounds, block_scores), blocks, ctx)


_prefill_kernel = selection_kernel(select, block_scores=quest_scores)


def kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    scaling: float,
) -> torch.Tensor:
    """Decode: Quest scores from the block summaries, top blocks, then the block-mode decode kernel over the tiles
    of the chosen blocks; prefill and training: the token selection through the block-sparse prefill kernel."""
    if not decoding(query, key, value):
        return _prefill_kernel(query, key, value, ctx, opts, scaling)
    from ..kernels.selected_decode.wrapper import selected_block_decode

    with torch.no_grad():
        summaries = block_summaries(key, ctx, opts.block_size)
        blocks = key_blocks(ctx, opts.block_size)
        chosen = chosen_blocks(query, ctx, opts, blocks, summaries.bounds, quest_scores)
    return selected_block_decode(
        query, key, value, ctx.visible, ctx.key_pos.flatten(1), chosen, summaries.spans, opts.block_size, scaling
    )


MECHANISM = register(
    Mechanism(
        name="block_topk",
        family="sparse",
        summary="Quest: top blocks by min/max key bound + sink and local blocks",
        options=(
            int_option("block_size", 64, 1, "keys per block"),
            int_option("budget", 16, 1, "blocks chosen by score, besides sink and local blocks"),
            int_option("sink_blocks", 1, 0, "leading blocks always attended"),
            # >= 1: the query's own block holds keys from its future during prefill, so its bound must never decide.
            int_option("local_blocks", 1, 1, "the query's block and the ones before it, always attended"),
            choice_option(
                "choose_per", "head", ("head", "group"),
                "'group': the query heads of a KV group share one choice (the max of their bounds), so a decode step "
                "reads `budget` blocks per KV head instead of up to group size x budget",
            ),
        ),
        select=select,
        kernel=kernel,
        side_cache=True,
    )
)
