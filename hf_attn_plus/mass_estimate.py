"""The pooled estimate of a key block's attention mass, shared by block_sparse (blocks kept up to a mass threshold)
and block_topk's `score='mass'` (a fixed number of blocks): each block's keys are pooled into runs of `pool_size`
consecutive keys, the query is scored against each run's mean key, and the block's estimated log-mass is the
logsumexp of those logits. One run per block is MInference's pooled estimate; pool_size=1 is the exact block mass.

The run means are a side state (patches/side_cache.py): a cached decode step adds its new key to one run instead of
re-pooling the context, and the recompute path builds the same state from every key, so both agree."""

from __future__ import annotations

import math

import torch

from .kernels.block_scoring import RunMeans
from .masking import AttentionContext
from .options import Option, OptionError, int_option
from .patches.side_cache import side_state
from .selection import grouped_scores


def pool_size_option(default: int) -> Option:
    return int_option(
        "pool_size", default, 1,
        "keys per mean key in the mass estimate (a divisor of block_size): >= block_size = one per block "
        "(MInference), 1 = every key (exact mass)",
    )


def runs_per_block(mechanism: str, block_size: int, pool_size: int) -> int:
    """Mean keys per block; a pool that does not divide the block is refused (its runs would straddle blocks)."""
    if pool_size < block_size and block_size % pool_size:
        raise OptionError(
            f"hf_attn_plus mechanism {mechanism!r}: option 'pool_size' got {pool_size}, which does not divide "
            f"block_size={block_size}; allowed: a divisor of block_size, or at least block_size (one mean key per block)"
        )
    return block_size // min(pool_size, block_size)


def run_mean_keys(key: torch.Tensor, ctx: AttentionContext, block_size: int, runs: int, num_blocks: int) -> torch.Tensor:
    """[B, Hkv, num_blocks * runs, D]: the mean key of every run, block by block (runs with no key: 0)."""
    run_size = block_size // runs
    state = side_state(ctx, f"run_means:run_size={run_size}", lambda: RunMeans(run_size), key)
    return state.means(num_blocks * runs)


def block_log_mass(query: torch.Tensor, mean_keys: torch.Tensor, runs: int) -> torch.Tensor:
    """Estimated log attention mass [B, Hq, q, blocks] of every block for query [B, Hq, q, D]. For a block wholly
    before the query every run holds the same number of keys, so this is its log-mass up to a constant shared by
    the query's row (what ranking needs)."""
    run_logits = grouped_scores(query, mean_keys) * (1.0 / math.sqrt(query.shape[-1]))
    return run_logits.unflatten(-1, (-1, runs)).logsumexp(-1)
