"""Differentiable gathered attention: Triton forward and backward.

gathered_attention(...) == reference.gathered_attention_reference(...), outputs and gradients w.r.t. query, key,
value (the log-weights and lists are constants). The backward walks the same ranges and lists; key and value
gradients are fp32 atomic sums, so their last bits may vary between GPU runs.
"""

from __future__ import annotations

import torch

from .._triton import require_triton
from ..key_sets import Visibility
from .kernel import gathered_attention_backward, gathered_attention_forward


class GatheredAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, visibility: Visibility, spans, slots, log_weights, scaling: float):
        out, lse = gathered_attention_forward(query, key, value, visibility, spans, slots, log_weights, scaling)
        ctx.save_for_backward(query, key, value, spans, slots, log_weights, out, lse)
        ctx.visibility, ctx.scaling = visibility, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, spans, slots, log_weights, out, lse = ctx.saved_tensors
        dq, dk, dv = gathered_attention_backward(
            grad_out, query, key, value, ctx.visibility, spans, slots, log_weights, out, lse, ctx.scaling
        )
        return dq, dk, dv, None, None, None, None, None


def gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visibility: Visibility,
    spans: torch.Tensor,
    slots: torch.Tensor,
    scaling: float,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hq, q, D], key/value [B, Hkv, kv, D|Dv], visibility (key_sets.Visibility: what each query sees),
    spans [B, q, 4] int32, slots [B, Hq, q, n] int32 (-1: unused), log_weights [B, Hq, q, n] or None ->
    [B, Hq, q, Dv]. See reference.gathered_attention_reference for the exact contract (hf_attn_plus.kernel_inputs
    builds spans and slots from real positions)."""
    require_triton(query, key, value)
    return GatheredAttention.apply(query, key, value, visibility, spans, slots, log_weights, scaling)
