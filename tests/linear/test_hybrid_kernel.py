"""Triton hybrid (LoLCATs) kernel against linear_ops' chunked form and quadratic definition, alone and inside tiny models
(interpreter on CPU: TRITON_INTERPRET=1, conftest)."""

import pytest
import torch

from hf_attn_plus import linear_ops

kernel = pytest.importorskip("hf_attn_plus.kernels.hybrid_attention.kernel")

SCALING = 0.4


def _inputs(q_len, kept, groups, dtype, seed=0, batch=2, kv_heads=2, dim=6, features=5, dv=7):
    """query, key, value, phi_q, phi_k, key_mask (batch row 0 left-padded by 3), gamma, and an initial state."""
    g = torch.Generator().manual_seed(seed)
    kv_len, q_heads = kept + q_len, kv_heads * groups
    query = torch.randn(batch, q_heads, q_len, dim, generator=g)
    key = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, kv_len, dv, generator=g)
    phi_q = linear_ops.elu_features(torch.randn(batch, q_heads, q_len, features, generator=g))
    phi_k = linear_ops.elu_features(torch.randn(batch, kv_heads, kv_len, features, generator=g))
    key_mask = torch.ones(batch, 1, kv_len, 1)
    key_mask[0, :, :3] = 0
    gamma = torch.rand(q_heads, generator=g)
    state = (torch.rand(batch, kv_heads, features, dv, generator=g), torch.rand(batch, kv_heads, features, generator=g))
    tensors = tuple(t.to(dtype) for t in (query, key, value, phi_q, phi_k))
    return (*tensors, key_mask, gamma), state


def _quadratic(query, key, value, phi_q, phi_k, key_mask, gamma, window):
    """The definition over every slot (no state before them): causal, padding excluded, softmax on the last `window`."""
    q_len, kv_len = query.shape[2], key.shape[2]
    slot = torch.arange(q_len)[:, None] + kv_len - q_len
    distance = slot - torch.arange(kv_len)[None, :]
    visible = (distance >= 0) & key_mask.transpose(-1, -2).bool()
    return linear_ops.quadratic_hybrid_attention(query, key, value, phi_q, phi_k, visible, distance < window,
                                                 SCALING, gamma)


# (q_len, kept slots from a cache, window, chunk): odd lengths, partial last chunks, shorter and longer than the
# window and the chunk, a window wider than a kernel chunk, and a decode step.
SHAPES = [(19, 0, 5, 16), (13, 3, 4, 4), (5, 2, 30, 8), (40, 0, 3, 16), (1, 4, 4, 64)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("q_len,kept,window,chunk", SHAPES)
@pytest.mark.parametrize("groups", [1, 2])
def test_forward_matches_chunked_and_quadratic(dtype, tol, q_len, kept, window, chunk, groups):
    args, state = _inputs(q_len, kept, groups, dtype, seed=q_len + groups)
    wide = [t.float() for t in args]
    for initial in (None, state):
        expected, (s_ref, z_ref) = linear_ops.chunked_hybrid_attention(
            *wide[:6], SCALING, wide[6], window, initial, chunk)
        out, (s, z) = kernel.hybrid_forward(*args[:6], SCALING, args[6], window, initial, chunk)
        assert out.dtype == dtype and s.dtype == z.dtype == torch.float32
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    definition = _quadratic(*wide, window)
    out, _ = kernel.hybrid_forward(*args[:6], SCALING, args[6], window, None, chunk)
    torch.testing.assert_close(out.float(), definition, rtol=tol, atol=tol)


def test_rows_without_keys_are_zero_and_large_logits_stay_finite():
    """A fully padded batch row gives 0 and zero gradients (as the reference); logits ~1e3 do not overflow (the max
    shift), forward or backward."""
    (query, key, value, phi_q, phi_k, key_mask, gamma), _ = _inputs(9, 0, 2, torch.float32)
    key_mask[1, :, :] = 0
    leaves = [t.clone().requires_grad_() for t in (query * 40, key * 40, value, phi_q, phi_k)]
    grad_out = torch.randn(*query.shape[:3], 7, generator=torch.Generator().manual_seed(4))
    results = []
    for attention in (kernel.hybrid_attention, linear_ops.chunked_hybrid_attention):
        out, _ = attention(*leaves, key_mask, SCALING, gamma, 4, None, 16)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    assert all(t.isfinite().all() for t in results[0])
    assert torch.equal(results[0][0][1], torch.zeros_like(results[0][0][1]))
    assert all(torch.equal(grad[1], torch.zeros_like(grad[1])) for grad in results[0][1:])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    # saturated rows: dlogit = p·dp + dm cancels to ~0 at the argmax, leaving fp32 rounding of |dp| (~1) times τ·|k|
    for got, expected in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def _gradients(attention, args, state, grads, window=4, chunk=4):
    """Gradients of (output, final S, final z) · `grads` w.r.t. q, k, v, phi_q, phi_k, gamma and the state."""
    leaves = [t.detach().clone().requires_grad_() for t in (*args[:5], args[6], *(state or ()))]
    out, (s, z) = attention(*leaves[:5], args[5], SCALING, leaves[5], window, tuple(leaves[6:]) or None, chunk)
    return torch.autograd.grad((out, s, z), leaves, grads)


# fp16: inputs and gradients are stored in fp16 (kernel math in fp32): a few units of fp16 rounding.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3)])
@pytest.mark.parametrize("q_len,kept,window,chunk", SHAPES[1:3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_backward_matches_chunked_reference(dtype, tol, q_len, kept, window, chunk, groups, with_state):
    """Gradients of q, k, v, phi_q, phi_k, gamma (and the initial state), also through the final state."""
    args, state = _inputs(q_len, kept, groups, dtype, seed=groups)
    state = state if with_state else None
    g = torch.Generator().manual_seed(1)
    batch, kv_heads, features, dv = args[1].shape[0], args[1].shape[1], args[4].shape[-1], args[2].shape[-1]
    grads = (torch.randn(*args[0].shape[:3], dv, generator=g).to(dtype),  # also through the final state
             torch.randn(batch, kv_heads, features, dv, generator=g), torch.randn(batch, kv_heads, features, generator=g))
    got = _gradients(kernel.hybrid_attention, args, state, grads, window, chunk)
    assert [t.dtype for t in got] == [dtype] * 5 + [torch.float32] * (len(got) - 5)
    wide = [t.double() for t in args]  # the reference in fp64 on the same rounded inputs
    expected = _gradients(linear_ops.chunked_hybrid_attention, wide, state and tuple(t.double() for t in state),
                          tuple(t.double() for t in grads), window, chunk)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_backward_matches_quadratic_definition():
    args, _ = _inputs(19, 0, 2, torch.float32)
    grad_out = torch.randn(*args[0].shape[:3], 7, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_() for t in args[:5]] + [args[5], args[6].clone().requires_grad_()]
    differentiable = leaves[:5] + leaves[6:]
    out, _ = kernel.hybrid_attention(*leaves[:6], SCALING, leaves[6], 5, None, 16)
    got = torch.autograd.grad(out, differentiable, grad_out)
    expected = torch.autograd.grad(_quadratic(*leaves, 5), differentiable, grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])  # GQA 4 (head dim 8); MLA with Dk 12 != Dv 8
def test_model_kernel_backend_matches_reference_backend(arch):
    """Logits (left-padded batch), cached greedy generation (decode through the window + state cache) and one training
    step's gradients."""
    from .conftest import assert_backend_runs_match, backend_run, build

    model = build(arch, "hybrid", feature_map="hedgehog", window=3, chunk_size=4, backend="kernel")
    assert_backend_runs_match(backend_run(model, "kernel", 4), backend_run(model, "reference", 4), ".attn_plus.mixing")
