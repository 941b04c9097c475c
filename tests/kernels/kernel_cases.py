"""Random attention problems shared by the kernel tests: GQA layouts, odd lengths, padding, empty rows."""

from __future__ import annotations

import torch


def attention_inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)

    return (
        randn(batch, q_heads, q_len, head_dim),
        randn(batch, kv_heads, kv_len, head_dim),
        randn(batch, kv_heads, kv_len, v_dim),
    )


def random_keep(batch, heads, q_len, kv_len, density, seed=0, left_pad=0):
    """A causal keep mask with random holes; the last batch row is left-padded and its first query keeps nothing."""
    g = torch.Generator().manual_seed(seed)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    keep = (torch.rand(batch, heads, q_len, kv_len, generator=g) < density) & causal
    keep[..., -1] = True  # the newest key (the query itself in decode) so most rows keep something
    keep[-1, ..., :left_pad] = False
    keep[-1, :, 0, :] = False
    return keep
