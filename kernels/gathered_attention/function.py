"""Differentiable gathered attention: Triton forward, backward recomputed through the PyTorch reference.

gathered_attention(...) == reference.gathered_attention_reference(...), outputs and gradients w.r.t. query, key,
value. The backward gathers each query's keys again and differentiates the reference (O(q · listed keys · D)
memory; the key/value gradients are summed by index_add, whose CUDA atomics make their float summation order
non-deterministic). A Triton backward is not written yet.
"""

from __future__ import annotations

import torch

from .._triton import require_triton
from .kernel import gathered_attention_forward
from .reference import gathered_attention_reference


class GatheredAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, visible, spans, slots, log_weights, scaling: float):
        ctx.save_for_backward(query, key, value, visible, spans, slots, log_weights)
        ctx.scaling = scaling
        return gathered_attention_forward(query, key, value, visible, spans, slots, log_weights, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, visible, spans, slots, log_weights = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((query, key, value), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            out = gathered_attention_reference(*inputs, visible, spans, slots, log_weights, ctx.scaling)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None, None, None)


def gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    spans: torch.Tensor,
    slots: torch.Tensor,
    scaling: float,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hq, q, D], key/value [B, Hkv, kv, D|Dv], visible [B, 1, q, kv] bool, spans [B, q, 4] int32
    (lists.fixed_spans), slots [B, Hq, q, n] int32 (-1: unused; lists.position_slots), log_weights [B, Hq, q, n] or
    None -> [B, Hq, q, Dv]. See reference.gathered_attention_reference for the exact contract."""
    require_triton(query, key, value)
    return GatheredAttention.apply(query, key, value, visible, spans, slots, log_weights, scaling)
