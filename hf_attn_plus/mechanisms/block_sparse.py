"""block_sparse (MInference / XAttention / FlexPrefill-style estimation, S2O-style early stop): keys form blocks of
`block_size` by position; `sink_blocks` leading blocks and the `local_blocks` ending at the query's block are always
attended; the other blocks the query sees are ranked by an estimate of their attention mass and kept in that order
until the kept share of the estimated mass reaches `threshold`. The kept count adapts to how concentrated attention
is; threshold=1.0 is dense causal attention.

The estimate pools each block's keys into runs of `pool_size` consecutive keys (the whole block when block_size <=
pool_size) and scores the query against each run's mean key: a block's estimated logit is the logsumexp of its runs'
logits. One run per block is MInference's pooled estimate (one q·k per block); pool_size=1 is the exact block mass
(one q·k per key, topk's scoring cost). A mean over many keys blurs a block that holds a few strong keys; on
SmolLM2 at 2k (threshold 0.9, 64-key blocks, about half the pairs kept either way) 8-key runs lose about half the
perplexity that one mean key per block loses (+0.17 vs +0.31 over dense 6.91) at the same prefill time, and the
exact mass +0.01 (docs/block_sparse_estimate_2k.md).

Ranked blocks lie wholly before the query (its own block is always local), so their mean keys are final: the
choice depends on nothing after the query, is the same in a cached decode step as in a full recompute, and is
unaffected by padding. Neighbouring queries choose alike, so prefill tiles stay block-sparse."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext
from ..options import OptionError, float_option, int_option
from ..reference import default_scaling
from ..registry import Mechanism, register
from ..selection import (
    all_rows,
    chunk_seen_blocks,
    fixed_blocks,
    grouped_scores,
    kept_indices,
    key_blocks,
    mass_ranked_blocks,
    pooled_blocks,
    query_chunks,
    stack_lists,
)
from ..structure import PositionRule, Selection


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    batch, q_heads, q_len, _ = query.shape
    size, runs = opts.block_size, runs_per_block(opts)
    num_blocks = max(1, -(-int(ctx.key_end.max()) // size))
    mean_keys = pooled_blocks(key, key_blocks(ctx, size // runs).reshape(batch, -1), num_blocks * runs)
    rule = PositionRule(sinks=opts.sink_blocks * size, block_size=size, local_blocks=opts.local_blocks)

    def blocks(rows: slice) -> torch.Tensor:  # per query chunk, when the reference reaches it
        return ranked_blocks(query, ctx, opts, mean_keys, all_rows(rows, q_len))

    return Selection(rule, block_size=size, blocks=blocks)


def runs_per_block(opts: SimpleNamespace) -> int:
    pool, size = opts.pool_size, opts.block_size
    if pool < size and size % pool:
        raise OptionError(
            f"hf_attn_plus mechanism 'block_sparse': option 'pool_size' got {pool}, which does not divide "
            f"block_size={size}; allowed: a divisor of block_size, or at least block_size (one mean key per block)"
        )
    return size // min(pool, size)


def ranked_blocks(
    query: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    mean_keys: torch.Tensor,
    rows: slice,
) -> torch.Tensor:
    """Blocks kept by estimated mass for the queries of `rows`: [B, Hq, rows, n] block indices (-1 unused).
    `mean_keys` [B, Hkv, blocks * runs, D]: the mean key of every run, block by block."""
    size, runs, lists = opts.block_size, runs_per_block(opts), []
    num_blocks = mean_keys.shape[2] // runs
    for rows in query_chunks(query.shape[0], query.shape[1], rows, mean_keys.shape[2]):
        # Ranked blocks lie wholly before the query, so each of their runs holds the same number of keys: the
        # logsumexp of run logits is the block's estimated log-mass up to one shared constant.
        run_logits = grouped_scores(query[:, :, rows], mean_keys) * default_scaling(query)
        logits = run_logits.unflatten(-1, (num_blocks, runs)).logsumexp(-1)
        fixed = fixed_blocks(ctx.query_pos[:, :, rows], num_blocks, size, opts.sink_blocks, opts.local_blocks)
        candidates = (chunk_seen_blocks(ctx, rows, num_blocks, size) & ~fixed).expand_as(logits)
        chosen = mass_ranked_blocks(logits, candidates, opts.threshold)
        lists.append(kept_indices(chosen, int(chosen.sum(-1).max())))
    return stack_lists(lists)


MECHANISM = register(
    Mechanism(
        name="block_sparse",
        family="sparse",
        summary="sink + local blocks, then blocks by estimated attention mass until a threshold share",
        options=(
            int_option("block_size", 64, 1, "keys per block"),
            float_option("threshold", 0.9, 0.0, "share of the ranked blocks' estimated attention mass to keep; 1.0 = dense", 1.0),
            int_option(
                "pool_size", 8, 1,
                "keys per mean key in the mass estimate (a divisor of block_size): >= block_size = one per block "
                "(MInference), 1 = every key (exact mass)",
            ),
            int_option("sink_blocks", 1, 0, "leading blocks always attended"),
            # >= 1: the query's own block is incomplete (it holds keys after the query in prefill), so it is never ranked.
            int_option("local_blocks", 1, 1, "the query's block and the ones before it, always attended"),
        ),
        select=select,
        kernel=selection_kernel(select),
    )
)
