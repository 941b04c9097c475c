"""The kernel path of every mechanism that is exact softmax over a selected key set (`Mechanism.select`).

The selection stays the reference `select` (the semantic truth); the kernels only make the attention over it cheap:
a few new queries go to selected_decode (split-KV, no gradient), everything else to block_sparse_prefill.
Not yet moved to the structured contract: these kernels still read a dense [B, H, q, kv] keep mask, written here from
the Selection (`structure.dense_keep`), so the GPU path is O(q * kv) in memory until they read rules and lists.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from ..masking import AttentionContext
from ..structure import dense_keep
from ._triton import require_triton

# Up to this many new queries (speculative / multi-token decode) a call is treated as decode.
DECODE_MAX_QUERIES = 4


def decoding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether a call is decode (a few new queries, no gradient) rather than prefill or training."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return query.shape[2] <= DECODE_MAX_QUERIES and not needs_grad


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Equals hf_attn_plus.reference.masked_attention(query, key, value, keep, scaling)[0], with gradients."""
    require_triton(query, key, value)
    if decoding(query, key, value):
        from .selected_decode.wrapper import selected_decode

        return selected_decode(query, key, value, keep, scaling)
    from .block_sparse_prefill.function import block_sparse_attention

    return block_sparse_attention(query, key, value, keep, scaling)


def selection_kernel(select: Callable[..., torch.Tensor], **select_kwargs: Any) -> Callable[..., torch.Tensor]:
    """A Mechanism.kernel running the exact attention over what `select(..., **select_kwargs)` keeps."""

    def kernel(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        ctx: AttentionContext,
        opts: SimpleNamespace,
        scaling: float,
    ) -> torch.Tensor:
        with torch.no_grad():
            keep = dense_keep(ctx, select(query, key, ctx, opts, **select_kwargs), query.shape[1])
        return sparse_attention(query, key, value, keep, scaling)

    return kernel
