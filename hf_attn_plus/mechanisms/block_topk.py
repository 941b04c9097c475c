"""block_topk (Quest-style block selection): keys form blocks of `block_size` by position; every block the query
sees is scored, and the top `budget` blocks (besides `sink_blocks` leading and `local_blocks` trailing ones) are
attended exactly. Each query head chooses for itself (`choose_per='head'`, Quest), or the heads of a GQA group share
the blocks whose largest score over the group's heads is best (`choose_per='group'`): one KV read of `budget` blocks
then serves the whole group.

The score: `score='mass'` (default) is block_sparse's pooled estimate of the block's attention mass (mean keys of
`pool_size`-key runs, hf_attn_plus/mass_estimate.py); `score='bound'` is Quest's: each block summarised by the
elementwise min and max of its keys and scored by the upper bound sum_d max(q_d*min_d, q_d*max_d). The bound asks
"could this block hold one large logit", the estimate "how much attention does it draw", which is what dropping a
block loses. SmolLM2 at 4k, 10 % of the keys in 16-token blocks (docs/block_topk_score_4k.md): the bound +5.2 %
perplexity and the needle lost at some depths; 8-key runs (two vectors per block, the bound's scoring cost) +3.1 %;
4-key runs (the default) +1.7 % with every needle, for 28 % more prefill time than the bound at 2k on CPU; exact
mass (pool_size=1) +1.0 %.

Cached decode keeps the summaries (or the run means) as the layer's side state (patches/side_cache.py), so a step
folds in only its new keys, and the kernel goes from the chosen blocks straight to the tiles they cover (no
per-token mask): the work besides scoring the blocks follows the budget, not the context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..kernels.block_scoring import BlockSummaries, quest_scores
from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext
from ..mass_estimate import block_log_mass, pool_size_option, run_mean_keys, runs_per_block
from ..options import choice_option, int_option
from ..patches.side_cache import side_state
from ..registry import Mechanism, register
from ..selection import (
    block_key_bounds,
    chunk_seen_blocks,
    fixed_blocks,
    all_rows,
    key_blocks,
    query_chunks,
    quest_block_scores,
    stack_lists,
    top_indices,
)
from ..structure import PositionRule, Selection


def block_summaries(key: torch.Tensor, ctx: AttentionContext, block_size: int) -> BlockSummaries:
    """Every block's key bounds and cache-slot span: the layer's side state grown by the new keys in cached
    inference, else built from every key."""
    return side_state(ctx, f"block_topk:block_size={block_size}", lambda: BlockSummaries(block_size), key)


def fixed_rule(opts: SimpleNamespace) -> PositionRule:
    """The sink and local blocks, always attended, as a position rule."""
    return PositionRule(sinks=opts.sink_blocks * opts.block_size, block_size=opts.block_size, local_blocks=opts.local_blocks)


def chosen_blocks(
    query: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    num_blocks: int,
    kv_heads: int,
    chunk_scores: Callable[[torch.Tensor], torch.Tensor],
    scored: int,
    rows: slice = slice(None),
) -> torch.Tensor:
    """The `budget` best-scoring seen blocks besides the sink and local ones for the queries of `rows`,
    [B, Hq, rows, budget] block indices (-1 unused), scored chunk by chunk over queries: `chunk_scores(queries)`
    [B, Hq, r, D] -> [B, Hq, r, num_blocks], scoring each query against `scored` vectors (which sizes the chunks)."""
    batch, q_heads, q_len, _ = query.shape
    group = q_heads // kv_heads if opts.choose_per == "group" else 1
    lists = []
    for rows in query_chunks(batch, q_heads, all_rows(rows, q_len), scored):
        scores = chunk_scores(query[:, :, rows])
        if group > 1:  # one choice per KV group, by the largest score any of its heads gives
            scores = scores.unflatten(1, (-1, group)).amax(dim=2)
        fixed = fixed_blocks(ctx.query_pos[:, :, rows], num_blocks, opts.block_size, opts.sink_blocks, opts.local_blocks)
        candidates = chunk_seen_blocks(ctx, rows, num_blocks, opts.block_size) & ~fixed
        chosen = top_indices(scores, candidates.expand_as(scores), opts.budget)
        lists.append(chosen.repeat_interleave(group, dim=1) if group > 1 else chosen)
    return stack_lists(lists)


def key_bounds(key: torch.Tensor, ctx: AttentionContext, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.cache_layer is not None:
        return block_summaries(key, ctx, block_size).bounds
    num_blocks = max(1, -(-int(ctx.key_end.max()) // block_size))
    return block_key_bounds(key, key_blocks(ctx, block_size), num_blocks)


def select(
    query: torch.Tensor,
    key: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    block_scores: Callable[..., torch.Tensor] = quest_block_scores,
) -> Selection:
    """`block_scores(query, kmin, kmax)`: the reference bound, or the Triton kernel computing the same bound."""
    if opts.score == "mass":
        runs = runs_per_block("block_topk", opts.block_size, opts.pool_size)
        num_blocks = max(1, -(-int(ctx.key_end.max()) // opts.block_size))
        mean_keys = run_mean_keys(key, ctx, opts.block_size, runs, num_blocks)
        chunk_scores, scored = (lambda queries: block_log_mass(queries, mean_keys, runs)), num_blocks * runs
    else:
        kmin, kmax = key_bounds(key, ctx, opts.block_size)
        num_blocks = kmin.shape[2]
        chunk_scores, scored = (lambda queries: block_scores(queries, kmin, kmax)), num_blocks
    # per query chunk, on demand
    blocks = functools.partial(chosen_blocks, query, ctx, opts, num_blocks, key.shape[1], chunk_scores, scored)
    return Selection(fixed_rule(opts), block_size=opts.block_size, blocks=blocks)


# Decode and prefill alike: Triton Quest scores (score='mass': the estimate's matmul), the chosen blocks as sorted
# lists, and the tile kernels reading only the tiles those blocks (and the sink and local blocks of the rule) cover.
kernel = selection_kernel(select, block_scores=quest_scores)


def check(opts: SimpleNamespace) -> None:
    if opts.score == "mass":  # the bound reads no runs
        runs_per_block("block_topk", opts.block_size, opts.pool_size)


MECHANISM = register(
    Mechanism(
        name="block_topk",
        family="sparse",
        summary="top blocks by estimated attention mass (or Quest's min/max bound) + sink and local blocks",
        options=(
            # Quest's 16-token pages: on SmolLM2 at 2k-4k, 64-token blocks at the same share of keys lost 5x more
            # perplexity (docs/sweep_smollm2_4k_10pct.md); 64 x 16 = 1024 keys chosen, as sliding_window's default.
            int_option("block_size", 16, 1, "keys per block"),
            int_option("budget", 64, 1, "blocks chosen by score, besides sink and local blocks"),
            int_option("sink_blocks", 1, 0, "leading blocks always attended"),
            # >= 1: the query's own block holds keys from its future during prefill, so its bound must never decide.
            int_option("local_blocks", 1, 1, "the query's block and the ones before it, always attended"),
            choice_option(
                "score", "mass", ("mass", "bound"),
                "how blocks are ranked: 'mass' = the pooled estimate of the block's attention mass (block_sparse's, "
                "see pool_size), 'bound' = Quest's min/max upper bound of q·k (its Triton scoring kernel)",
            ),
            # 4-key runs: on SmolLM2 at 4k / 10 % of keys, +1.7 % perplexity vs +3.1 % (8) and +1.0 % (exact, 1).
            pool_size_option(4),
            choice_option(
                "choose_per", "head", ("head", "group"),
                "'group': the query heads of a KV group share one choice (the max of their bounds), so a decode step "
                "reads `budget` blocks per KV head instead of up to group size x budget",
            ),
        ),
        select=select,
        kernel=kernel,
        side_cache=True,
        check=check,
    )
)
