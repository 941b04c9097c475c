"""The kernel path of every mechanism that is exact softmax over a selected key set, on structured inputs.

A selection arrives as a key_sets.KeySet (per-sequence positions, the rule's integers, sorted block / token lists;
hf_attn_plus.kernel_inputs builds it from a structure.Selection): no [q, kv] mask exists on this path. A few new
queries go to selected_decode (split-KV, no gradient), everything else to block_sparse_prefill (with a backward).
"""

from __future__ import annotations

import torch

from ._triton import require_triton
from .key_sets import KeySet

# Up to this many new queries (speculative / multi-token decode) a call is treated as decode.
DECODE_MAX_QUERIES = 4


def decoding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether a call is decode (a few new queries, no gradient) rather than prefill or training."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return query.shape[2] <= DECODE_MAX_QUERIES and not needs_grad


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keys: KeySet, scaling: float
) -> torch.Tensor:
    """Softmax of each query [B, Hq, q, D] over the keys `keys` keeps (key/value [B, Hkv, kv, D|Dv]) ->
    [B, Hq, q, Dv]; rows keeping nothing output zeros. Differentiable w.r.t. query, key, value."""
    require_triton(query, key, value)
    if decoding(query, key, value):
        from .selected_decode.wrapper import selected_decode

        return selected_decode(query, key, value, keys, scaling)
    from .block_sparse_prefill.function import block_sparse_attention

    return block_sparse_attention(query, key, value, keys, scaling)
