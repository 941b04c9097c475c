"""Block scoring for Quest-style selection: per-block key min/max summaries and per-run mean keys (for the pooled
mass estimate), grown incrementally with the cache (summaries.py, plain PyTorch: a decode step touches only the new
keys' blocks) and a Triton kernel scoring every
block for the query by the Quest bound (kernel.py). References: hf_attn_plus.selection.block_key_bounds and
quest_block_scores; block_topk.chosen_blocks picks the best-scoring blocks from these scores."""

import torch

from .summaries import BlockSummaries, RunMeans


def quest_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The Triton Quest bound, [B, Hq, q, num_blocks] fp32 (imported on use: Triton stays optional)."""
    from .kernel import quest_scores_kernel

    return quest_scores_kernel(query, kmin, kmax)


__all__ = ["BlockSummaries", "RunMeans", "quest_scores"]
