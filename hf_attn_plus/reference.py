"""Exact softmax attention over a kept set of keys: the plain-PyTorch truth every sparse kernel must match."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .selection import grouped_scores


def log_length_scale(kept: torch.Tensor, train_length: int, c: float) -> torch.Tensor:
    """beta(n) = 1 + c*log(n / train_length) for n > train_length, else 1; n = keys the query attends.

    Counting the attended keys (not the context) is what keeps the softmax from flattening: that is the set the
    probability mass is spread over.
    """
    return length_scale(kept.sum(dim=-1, keepdim=True).float(), train_length, c)


def length_scale(count: torch.Tensor, train_length: int, c: float) -> torch.Tensor:
    """beta of `log_length_scale` from the number of attended keys per row (float, [..., 1])."""
    return 1.0 + c * torch.log(count.clamp(min=1) / train_length).clamp(min=0.0)


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    beta: torch.Tensor | None = None,
    dropout: float = 0.0,
    log_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query over the keys in `keep` (GQA-aware); rows that keep nothing output zeros.

    query [B, Hq, q, D], key [B, Hkv, kv, D], value [B, Hkv, kv, Dv], keep broadcastable to [B, Hq, q, kv].
    `log_weights` (finite where kept) multiplies key s's term exp(logit_s) by exp(log_weights_s): importance weights
    of sampled estimators. Returns (output [B, Hq, q, Dv], probabilities [B, Hq, q, kv]).
    """
    probs = masked_probabilities(query, key, keep, scaling, beta, log_weights)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return grouped_weighted_sum(probs.to(value.dtype), value), probs.to(query.dtype)


def grouped_weighted_sum(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weights [B, Hq, q, kv] @ value [B, Hkv, kv, Dv] per query head's KV head, without repeating values."""
    batch, q_heads, q_len, kv_len = weights.shape
    kv_heads = value.shape[1]
    grouped = weights.reshape(batch, kv_heads, q_heads // kv_heads, q_len, kv_len)
    return (grouped @ value.unsqueeze(2)).reshape(batch, q_heads, q_len, value.shape[-1])


def masked_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    beta: torch.Tensor | None = None,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 softmax of each query head over the keys in `keep`, [B, Hq, q, kv]; rows that keep nothing are zero."""
    logits = grouped_scores(query.float(), key.float()) * scaling
    if beta is not None:
        logits = logits * beta
    if log_weights is not None:
        logits = logits + log_weights.masked_fill(~keep, 0.0)
    # A finite fill keeps all-masked rows (left padding) NaN-free in forward and backward; multiplying by `keep`
    # then zeroes the uniform distribution such a row would otherwise get.
    logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1) * keep


def attention_target(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dense attention of a query chunk (query [B, Hq, rows, D], its visibility [B, 1, rows, kv]) summed over query
    heads and L1-normalised, detached: [B, 1, rows, kv]. DSA's indexer target p_t, and what `topk` with
    choose_per='layer' ranks keys by (the best one choice all heads of a layer can share)."""
    with torch.no_grad():
        summed = masked_probabilities(query, key, visible, scaling).sum(dim=1, keepdim=True)
        return summed / summed.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(summed.dtype).tiny)


def default_scaling(query: torch.Tensor) -> float:
    return 1.0 / math.sqrt(query.shape[-1])
