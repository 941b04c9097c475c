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
unaffected by padding. Neighbouring queries choose alike, so prefill tiles stay block-sparse. The estimate is shared
with block_topk's score='mass' (hf_attn_plus/mass_estimate.py); in cached decode its run means are the layer's side
state, so a step scores the context's mean keys without re-pooling every key."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext
from ..mass_estimate import block_log_mass, pool_size_option, run_mean_keys, runs_per_block
from ..options import float_option, int_option
from ..registry import Mechanism, register
from ..selection import all_rows, chunk_seen_blocks, fixed_blocks, kept_indices, mass_ranked_blocks, query_chunks, stack_lists
from ..structure import PositionRule, Selection


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    q_len = query.shape[2]
    size, runs = opts.block_size, runs_per_block("block_sparse", opts.block_size, opts.pool_size)
    num_blocks = max(1, -(-int(ctx.key_end.max()) // size))
    mean_keys = run_mean_keys(key, ctx, size, runs, num_blocks)
    rule = PositionRule(sinks=opts.sink_blocks * size, block_size=size, local_blocks=opts.local_blocks)

    def blocks(rows: slice) -> torch.Tensor:  # per query chunk, when the reference reaches it
        return ranked_blocks(query, ctx, opts, mean_keys, runs, all_rows(rows, q_len))

    return Selection(rule, block_size=size, blocks=blocks)


def ranked_blocks(
    query: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    mean_keys: torch.Tensor,
    runs: int,
    rows: slice,
) -> torch.Tensor:
    """Blocks kept by estimated mass for the queries of `rows`: [B, Hq, rows, n] block indices (-1 unused).
    `mean_keys` [B, Hkv, blocks * runs, D]: the mean key of every run, block by block."""
    size, lists = opts.block_size, []
    num_blocks = mean_keys.shape[2] // runs
    for rows in query_chunks(query.shape[0], query.shape[1], rows, mean_keys.shape[2]):
        logits = block_log_mass(query[:, :, rows], mean_keys, runs)
        fixed = fixed_blocks(ctx.query_pos[:, :, rows], num_blocks, size, opts.sink_blocks, opts.local_blocks)
        candidates = (chunk_seen_blocks(ctx, rows, num_blocks, size) & ~fixed).expand_as(logits)
        chosen = mass_ranked_blocks(logits, candidates, opts.threshold)
        lists.append(kept_indices(chosen, int(chosen.sum(-1).max())))
    return stack_lists(lists)


def check(opts: SimpleNamespace) -> None:
    runs_per_block("block_sparse", opts.block_size, opts.pool_size)


MECHANISM = register(
    Mechanism(
        name="block_sparse",
        family="sparse",
        summary="sink + local blocks, then blocks by estimated attention mass until a threshold share",
        options=(
            int_option("block_size", 64, 1, "keys per block"),
            float_option("threshold", 0.9, 0.0, "share of the ranked blocks' estimated attention mass to keep; 1.0 = dense", 1.0),
            pool_size_option(8),
            int_option("sink_blocks", 1, 0, "leading blocks always attended"),
            # >= 1: the query's own block is incomplete (it holds keys after the query in prefill), so it is never ranked.
            int_option("local_blocks", 1, 1, "the query's block and the ones before it, always attended"),
        ),
        select=select,
        kernel=selection_kernel(select),
        side_cache=True,
        check=check,
    )
)
