"""Triton momentum-delta kernels against the PyTorch forms in linear_ops (interpreter on CPU: TRITON_INTERPRET=1, conftest)."""

import pytest
import torch
import torch.nn.functional as F

from hf_attn_plus import linear_ops

momentum = pytest.importorskip("hf_attn_plus.kernels.gated_delta.momentum")
chunked = pytest.importorskip("hf_attn_plus.kernels.gated_delta.chunked")


def _inputs(batch, q_heads, kv_heads, length, dk, dv, dtype, seed=0, mu_logit=1.0):
    """Normalised (scaled) queries and keys, values, log α, β and log μ as the mechanism makes them (μ = sigmoid of
    N(mu_logit, 1): mostly above one half, so the momentum carries far), and a nonzero state (S, M)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, q_heads, length, dk, generator=g), dim=-1) * dk**-0.5
    k = F.normalize(torch.randn(batch, kv_heads, length, dk, generator=g), dim=-1)
    v = torch.randn(batch, kv_heads, length, dv, generator=g)
    log_alpha = -F.softplus(torch.randn(batch, kv_heads, length, generator=g))
    beta = torch.sigmoid(torch.randn(batch, kv_heads, length, generator=g))
    log_mu = F.logsigmoid(torch.randn(batch, kv_heads, length, generator=g) + mu_logit)
    state = (torch.randn(batch, kv_heads, dk, dv, generator=g), 0.3 * torch.randn(batch, kv_heads, dk, dv, generator=g))
    return [t.to(dtype) for t in (q, k, v, log_alpha, beta, log_mu)], state


# 16-bit inputs against the fp32 reference on the same (rounded) inputs; outputs are stored in 16 bits and the kernel's
# 16-bit path multiplies in tf32 on a GPU. Lengths are not multiples of the chunk (the last chunk's final state is read at
# its last real row); 35 makes three chunks; a 64-token chunk (16-bit inputs) solves T in four 16-row blocks; Dv = 72
# runs several column blocks of the state (partial sums of dq, dk, dβ, dlog α, dlog μ); mu_logit 5 (μ ≈ 0.99) makes C
# entries grow to about the chunk length (momentum barely decays within a chunk).
@pytest.mark.parametrize(
    "dtype,tol,batch,q_heads,kv_heads,length,dv,chunk,with_state,mu_logit",
    [
        (torch.float32, 1e-5, 2, 2, 2, 35, 6, 16, False, 1.0),
        (torch.float32, 1e-5, 1, 4, 2, 21, 72, 16, True, 1.0),
        (torch.float32, 1e-5, 1, 2, 1, 37, 6, 16, True, 5.0),
        (torch.float16, 3e-3, 2, 4, 2, 70, 6, 64, True, 1.0),
        (torch.bfloat16, 2e-2, 2, 4, 2, 19, 6, 64, False, 1.0),
    ],
)
def test_chunked_forward_and_gradients_match_reference(
    dtype, tol, batch, q_heads, kv_heads, length, dv, chunk, with_state, mu_logit
):
    inputs, state = _inputs(batch, q_heads, kv_heads, length, 8, dv, dtype, mu_logit=mu_logit)
    state = state if with_state else None
    ref_inputs = [t.float().clone().requires_grad_() for t in inputs]
    ref_state = tuple(x.clone().requires_grad_() for x in state) if with_state else None
    expected, expected_state = linear_ops.chunked_momentum_delta(*ref_inputs, ref_state, chunk)
    out, final, _ = momentum.chunked_forward(*inputs, state, chunk)
    assert out.dtype == dtype and all(x.dtype == torch.float32 for x in final)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    for got, want in zip(final, expected_state):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(x.shape, generator=g) for x in (expected, *expected_state)]
    torch.autograd.backward((expected, *expected_state), grads)
    leaves = [t.clone().requires_grad_() for t in inputs]
    leaf_state = tuple(x.clone().requires_grad_() for x in state) if with_state else None
    out, final = momentum.momentum_delta_attention(*leaves, leaf_state, chunk)
    torch.autograd.backward((out, *final), [grads[0].to(dtype), *grads[1:]])
    names = ("query", "key", "value", "log_alpha", "beta", "log_mu", "S", "M")
    for name, leaf, ref in zip(names, leaves + list(leaf_state or ()), ref_inputs + list(ref_state or ())):
        assert leaf.grad.dtype == leaf.dtype, name
        torch.testing.assert_close(leaf.grad.float(), ref.grad, rtol=tol, atol=tol, msg=name)


def test_chunked_forward_equals_recurrent_definition_at_odd_length():
    """The kernel's chunks (16 tokens) against the token-by-token definition, not only the reference's chunking."""
    inputs, state = _inputs(1, 2, 1, 23, 8, 6, torch.float32, seed=3)
    expected, (s, m) = linear_ops.recurrent_momentum_delta(*inputs, state)
    out, (s_k, m_k), _ = momentum.chunked_forward(*inputs, state, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_k, s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m_k, m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_tokens,with_state", [(1, True), (3, True), (3, False)])
def test_decode_matches_recurrent_form(new_tokens, with_state):
    inputs, state = _inputs(2, 4, 2, new_tokens, 8, 6, torch.float32)
    state = state if with_state else None
    expected, (s, m) = linear_ops.recurrent_momentum_delta(*inputs, state)
    out, (s_k, m_k) = momentum.recurrent_forward(*inputs, state)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(s_k, s)
    torch.testing.assert_close(m_k, m)


def test_zero_momentum_equals_gated_delta_kernel():
    """μ = 0 is the gated delta rule: outputs and S equal the gated kernel's. log μ = -1e4 (exp underflows to exactly 0;
    -inf would make the log differences NaN, in the reference too)."""
    (q, k, v, log_alpha, beta, _), (state, _) = _inputs(2, 4, 2, 21, 8, 6, torch.float32)
    log_mu = torch.full_like(beta, -1e4)
    zeros = torch.zeros_like(state)
    expected, expected_state = chunked.chunked_forward(q, k, v, log_alpha, beta, state, 16)[:2]
    for run in (momentum.chunked_forward, momentum.recurrent_forward):
        out, (s, _) = run(q, k, v, log_alpha, beta, log_mu, (state, zeros), *((16,) if run is momentum.chunked_forward else ()))[:2]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, expected_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])  # GQA 4 and 2; MLA with Dk 12 != Dv 8
def test_model_kernel_backend_matches_reference_backend(arch, monkeypatch):
    """Logits (left-padded batch), cached greedy generation (decode through RecurrentStateLayer) and one training
    step's gradients; the chunked kernel runs the prompts and the recurrent kernel the decode steps."""
    from .conftest import assert_backend_runs_match, backend_run, build

    calls = {"chunked_forward": 0, "recurrent_forward": 0}
    for name in calls:
        def counted(*args, _run=getattr(momentum, name), _name=name, **kwargs):
            calls[_name] += 1
            return _run(*args, **kwargs)
        monkeypatch.setattr(momentum, name, counted)

    model = build(arch, "momentum_delta", backend="kernel", chunk_size=16)
    kernel = backend_run(model, "kernel", 3)
    layers = model.config.num_hidden_layers
    assert calls == {"chunked_forward": 3 * layers, "recurrent_forward": 2 * layers}  # train, logits, prompt; 2 steps
    assert_backend_runs_match(kernel, backend_run(model, "reference", 3), "momentum_proj")
