"""block_topk (Quest): keys form blocks of `block_size` by position; each block is summarised by the elementwise
min and max of its keys, scored against the query by the upper bound sum_d max(q_d*min_d, q_d*max_d), and the top
`budget` blocks (besides `sink_blocks` leading and `local_blocks` trailing ones) are attended exactly."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..kernels.block_scoring import quest_scores
from ..kernels.sparse_attention import selection_kernel
from ..masking import AttentionContext
from ..options import int_option
from ..registry import Mechanism, register
from ..selection import (
    block_key_bounds,
    blocks_to_keys,
    key_blocks,
    quest_block_scores,
    top_blocks,
    visible_blocks,
)


def select(
    query: torch.Tensor,
    key: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    block_scores: Callable[..., torch.Tensor] = quest_block_scores,
) -> torch.Tensor:
    """`block_scores(query, kmin, kmax)`: the reference bound, or the Triton kernel computing the same bound."""
    blocks = key_blocks(ctx, opts.block_size)
    num_blocks = int(blocks.max()) + 1
    kmin, kmax = block_key_bounds(key, blocks, num_blocks)
    seen = visible_blocks(ctx, blocks, num_blocks)
    scores = block_scores(query, kmin, kmax)
    chosen = top_blocks(scores, seen, ctx.query_pos // opts.block_size, opts.sink_blocks, opts.local_blocks, opts.budget)
    return blocks_to_keys(chosen, blocks, ctx)


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
        ),
        select=select,
        kernel=selection_kernel(select, block_scores=quest_scores),
    )
)
