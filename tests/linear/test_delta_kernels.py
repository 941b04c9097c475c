"""Triton gated-delta kernels against the PyTorch forms in linear_ops (interpreter on CPU: TRITON_INTERPRET=1, conftest)."""

import pytest
import torch
import torch.nn.functional as F

from hf_attn_plus import linear_ops

chunked = pytest.importorskip("hf_attn_plus.kernels.gated_delta.chunked")
recurrent = pytest.importorskip("hf_attn_plus.kernels.gated_delta.recurrent")


def _inputs(batch, q_heads, kv_heads, length, dk, dv, dtype, seed=0):
    """Normalised (scaled) queries and keys, values, log α and β as the mechanism makes them, and a nonzero state."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, q_heads, length, dk, generator=g), dim=-1) * dk**-0.5
    k = F.normalize(torch.randn(batch, kv_heads, length, dk, generator=g), dim=-1)
    v = torch.randn(batch, kv_heads, length, dv, generator=g)
    log_alpha = -F.softplus(torch.randn(batch, kv_heads, length, generator=g))
    beta = torch.sigmoid(torch.randn(batch, kv_heads, length, generator=g))
    state = torch.randn(batch, kv_heads, dk, dv, generator=g)
    return [t.to(dtype) for t in (q, k, v, log_alpha, beta)], state


# 16-bit inputs against the fp32 reference on the same (rounded) inputs: outputs and gradients are stored in 16 bits
# (fp16 rel. 1e-3, bf16 rel. 8e-3) and the kernel's 16-bit path multiplies in tf32 on a GPU.
# Lengths are not multiples of the chunk; 35 makes three chunks; a 64-token chunk (16-bit inputs) solves T in four
# 16-row blocks. Dv = 72 runs several column blocks of the state (partial sums of dq, dk, dβ, dlog α).
@pytest.mark.parametrize(
    "dtype,tol,batch,q_heads,kv_heads,length,dv,chunk,with_state",
    [
        (torch.float32, 1e-5, 2, 2, 2, 35, 6, 16, False),
        (torch.float32, 1e-5, 1, 4, 2, 21, 72, 16, True),
        (torch.float16, 3e-3, 2, 4, 2, 70, 6, 64, True),
        (torch.bfloat16, 2e-2, 2, 4, 2, 19, 6, 64, False),
    ],
)
def test_chunked_forward_and_gradients_match_reference(dtype, tol, batch, q_heads, kv_heads, length, dv, chunk, with_state):
    inputs, state = _inputs(batch, q_heads, kv_heads, length, 8, dv, dtype)
    state = state if with_state else None
    ref_leaves = [t.float().clone().requires_grad_() for t in inputs] + ([state.clone().requires_grad_()] if with_state else [])
    expected, expected_state = linear_ops.chunked_gated_delta(*ref_leaves[:5], ref_leaves[5] if with_state else None, chunk)
    out, final, _ = chunked.chunked_forward(*inputs, state, chunk)
    assert out.dtype == dtype and final.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(final, expected_state, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(1)
    grad_out, grad_state = torch.randn(expected.shape, generator=g), torch.randn(expected_state.shape, generator=g)
    torch.autograd.backward((expected, expected_state), (grad_out, grad_state))
    leaves = [t.clone().requires_grad_() for t in inputs] + ([state.clone().requires_grad_()] if with_state else [])
    out, final = chunked.gated_delta(*leaves[:5], leaves[5] if with_state else None, chunk)
    torch.autograd.backward((out, final), (grad_out.to(dtype), grad_state))
    for name, leaf, ref in zip(("query", "key", "value", "log_alpha", "beta", "state"), leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype, name
        torch.testing.assert_close(leaf.grad.float(), ref.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_decode_matches_recurrent_form(new_tokens):
    (q, k, v, log_alpha, beta), state = _inputs(2, 4, 2, new_tokens, 8, 6, torch.float32)
    expected, expected_state = linear_ops.recurrent_gated_delta(q, k, v, log_alpha, beta, state)
    out, final = recurrent.recurrent_forward(q, k, v, log_alpha, beta, state)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(final, expected_state)
    out, final = recurrent.recurrent_forward(q, k, v, log_alpha, beta)  # from an empty state
    expected, expected_state = linear_ops.recurrent_gated_delta(q, k, v, log_alpha, beta)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(final, expected_state)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])  # GQA 4 and 2; MLA with Dk 12 != Dv 8
def test_model_kernel_backend_matches_reference_backend(arch):
    """Logits (left-padded batch), cached greedy generation and one training step's gradients."""
    from .conftest import assert_backend_runs_match, backend_run, build

    model = build(arch, "gated_delta", backend="kernel", chunk_size=16)
    assert_backend_runs_match(backend_run(model, "kernel", 3), backend_run(model, "reference", 3), ".attn_plus.")
