"""Triton kernels for the gated delta rule; each equals hf_attn_plus.linear_ops (`chunked_gated_delta` /
`recurrent_gated_delta`). `recurrent.py`: the token-by-token forward (decode); `chunked.py`: the chunked (UT transform)
forward and backward, and the autograd function `gated_delta`. `gated_delta_attention` picks among them.
`momentum.py`: the same for the momentum delta rule (state (S, M); dispatch `momentum_delta_attention`)."""

from __future__ import annotations

import torch

from .._triton import require_triton

# Up to this many new tokens on a state (decode, speculative steps) the token-by-token kernel runs: it has no chunk
# overhead (a chunk is at least 16 tokens) and reads the state once.
DECODE_MAX_TOKENS = 16


def gated_delta_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equals `linear_ops.chunked_gated_delta(...)` (output, final fp32 state), with gradients when any input needs them."""
    require_triton(query, key, value)
    inputs = (query, key, value, log_alpha, beta, state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        from .chunked import gated_delta

        return gated_delta(*inputs, chunk_size)
    if state is not None and query.shape[2] <= DECODE_MAX_TOKENS:
        from .recurrent import recurrent_forward

        return recurrent_forward(*inputs)
    from .chunked import chunked_forward

    return chunked_forward(*inputs, chunk_size)[:2]
