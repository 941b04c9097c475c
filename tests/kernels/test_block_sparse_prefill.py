"""block_sparse_attention equals masked_attention in outputs and in gradients w.r.t. query, key and value."""

import pytest
import torch

from hf_attn_plus.kernels.block_sparse_prefill.function import block_sparse_attention
from hf_attn_plus.kernels.tile_lists import tiles_from_keep
from hf_attn_plus.reference import masked_attention

from kernel_cases import attention_inputs, random_keep

# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, per-head keep, density)
CASES = [
    (2, 4, 2, 21, 21, 12, 8, torch.float32, False, 1.0),  # causal + padding, DeepSeek dims, GQA 2
    (1, 8, 1, 19, 40, 64, 64, torch.float32, True, 0.3),  # GQA 8, queries after a cached prefix, per-head keep
    (2, 8, 2, 17, 17, 64, 64, torch.float16, True, 0.5),  # GQA 4, fp16
]


def _check(out, grads, expected, expected_grads, dtype):
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got, want, atol=tol * 5, rtol=tol * 5, msg=name)


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,kv_len,head_dim,v_dim,dtype,per_head,density", CASES)
def test_forward_and_gradients_equal_reference(
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, per_head, density
):
    q, k, v = attention_inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, requires_grad=True)
    keep = random_keep(batch, q_heads if per_head else 1, q_len, kv_len, density, left_pad=5)
    grad = torch.randn(batch, q_heads, q_len, v_dim).to(dtype)
    out = block_sparse_attention(q, k, v, keep, scaling=0.25, block_m=16, block_n=16)
    expected = masked_attention(q, k, v, keep, scaling=0.25)[0]
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    _check(out, grads, expected, expected_grads, dtype)
    assert out[-1, :, 0].abs().max() == 0 and grads[0][-1, :, 0].abs().max() == 0  # the row keeping nothing


def test_causal_without_mask_tensor():
    """keep=None computes the causal mask inside the kernel; the tile lists alone carry the block sparsity. MHA."""
    q, k, v = attention_inputs(2, 3, 3, 23, 30, 16, 16, torch.float32, seed=3, requires_grad=True)
    causal = torch.ones(23, 30, dtype=torch.bool).tril(30 - 23)
    tiles = tiles_from_keep(causal[None, None], 2, 3, 3, 16, 16)
    out = block_sparse_attention(q, k, v, None, 0.3, tiles=tiles)
    expected = masked_attention(q, k, v, causal, 0.3)[0]
    grad = torch.randn_like(out)
    _check(
        out, torch.autograd.grad(out, (q, k, v), grad), expected,
        torch.autograd.grad(expected, (q, k, v), grad), torch.float32,
    )
