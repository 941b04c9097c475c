"""indexer_topk (DeepSeek-V3.2 DSA): a small learned "lightning indexer" scores every visible key,
I[t, s] = sum_j w[t, j] * relu(q^I_j[t] · k^I[s]), and the main attention runs exact softmax over the `budget`
best-scoring keys plus sinks and the local window.

Training (DSA): the indexer learns to predict where dense attention looks. Target p_t = dense attention
distribution of query t summed over heads and L1-normalised (`attention_target`).
- warm-up (main model frozen, dense attention): KL(p_t || softmax(I_t)) over all visible keys;
- sparse stage (main model trains on the selection): the same KL restricted to the selected set, both sides
  renormalised over it.
The indexer reads detached inputs and the target is detached, so this loss trains only the indexer and the
language-modelling loss never reaches it (the top-k is not differentiable either).

On DeepSeek-V3.2 the model's own indexer already selects (`indices`, honoured by the core for every mechanism).
"""

from __future__ import annotations

import torch

from ..masking import AttentionContext
from ..reference import masked_probabilities
from ..selection import sinks_and_window, top_scoring


def select_by_scores(scores: torch.Tensor, ctx: AttentionContext, budget: int, sinks: int, window: int) -> torch.Tensor:
    """Sinks + window + the `budget` other visible keys with the largest scores ([B, 1|Hq, q, kv]) -> keep mask."""
    fixed = sinks_and_window(ctx, sinks, window)
    return fixed | top_scoring(scores, (ctx.visible & ~fixed).expand_as(scores), budget)


def attention_target(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, scaling: float) -> torch.Tensor:
    """p_t: dense attention probabilities summed over query heads, L1-normalised, detached: [B, 1, q, kv]."""
    with torch.no_grad():
        summed = masked_probabilities(query, key, ctx.visible, scaling).sum(dim=1, keepdim=True)
        return summed / summed.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(summed.dtype).tiny)


def indexer_kl(scores: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over queries that keep any key of KL(target_t || softmax(scores_t)), both restricted to and renormalised
    over `keep` ([B, 1, q, kv]): `ctx.visible` in the warm-up, the selected keys in the sparse stage."""
    target = target * keep
    target = target / target.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(target.dtype).tiny)
    log_predicted = torch.log_softmax(scores.float().masked_fill(~keep, torch.finfo(torch.float32).min), dim=-1)
    per_key = torch.xlogy(target, target) - target * log_predicted.masked_fill(~keep, 0.0)
    rows = keep.any(dim=-1)
    return per_key.sum(dim=-1)[rows].mean() if rows.any() else scores.sum() * 0.0
