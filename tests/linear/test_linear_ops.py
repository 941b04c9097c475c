"""The three forms of linear attention (definition, chunked, recurrent) agree, for every feature map, with GQA."""

import pytest
import torch

from hf_attn_plus import linear_ops
from hf_attn_plus.masking import build_context

B, HQ, HKV, D, DV = 2, 4, 2, 6, 5


def _features(kind, q, k):
    torch.manual_seed(1)
    if kind == "elu":
        return linear_ops.elu_features(q), linear_ops.elu_features(k)
    if kind == "relu":
        return linear_ops.relu_features(q), linear_ops.relu_features(k)
    if kind == "hedgehog":
        wq, wk = torch.randn(HQ, D, 7), torch.randn(HKV, D, 7)
        return linear_ops.hedgehog_features(q, wq), linear_ops.hedgehog_features(k, wk)
    w = torch.randn(HKV, D, 9)
    return (
        linear_ops.gaussian_rf_features(q * 0.5, w.repeat_interleave(HQ // HKV, 0), True),
        linear_ops.gaussian_rf_features(k * 0.5, w, False),
    )


def _inputs(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, length, D, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(B, HKV, length, D, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, HKV, length, DV, generator=g, dtype=torch.float64).requires_grad_()
    return q, k, v


def _causal(length):
    return torch.ones(length, length, dtype=torch.bool).tril()[None, None]


@pytest.mark.parametrize("kind", ["elu", "relu", "hedgehog", "gaussian_rf"])
@pytest.mark.parametrize("length,chunk", [(13, 4), (8, 8), (5, 16)])
def test_three_forms_agree_outputs_and_gradients(kind, length, chunk):
    results = []
    for form in ("quadratic", "chunked", "recurrent"):
        q, k, v = _inputs(length)
        phi_q, phi_k = _features(kind, q, k)
        if form == "quadratic":
            out = linear_ops.quadratic_linear_attention(phi_q, phi_k, v, _causal(length))
        elif form == "chunked":
            out, _ = linear_ops.chunked_linear_attention(phi_q, phi_k, v, chunk_size=chunk)
        else:
            out, _ = linear_ops.recurrent_linear_attention(phi_q, phi_k, v)
        (out * torch.linspace(-1, 1, DV, dtype=out.dtype)).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_state_continues_across_calls():
    q, k, v = _inputs(11)
    phi_q, phi_k = linear_ops.elu_features(q), linear_ops.elu_features(k)
    whole, whole_state = linear_ops.chunked_linear_attention(phi_q, phi_k, v, chunk_size=4)
    first, state = linear_ops.chunked_linear_attention(phi_q[:, :, :6], phi_k[:, :, :6], v[:, :, :6], chunk_size=4)
    rest, final = linear_ops.recurrent_linear_attention(phi_q[:, :, 6:], phi_k[:, :, 6:], v[:, :, 6:], state)
    torch.testing.assert_close(torch.cat([first, rest], 2), whole)
    for a, b in zip(final, whole_state):
        torch.testing.assert_close(a, b)


def test_padding_keys_contribute_nothing_and_empty_rows_are_zero():
    length, pad = 9, 3
    real = torch.ones(B, length, dtype=torch.bool)
    real[0, :pad] = False  # left padding of the first sequence, as transformers' SDPA mask lays it out
    ctx = build_context(_causal(length) & real[:, None, None, :])
    q, k, v = _inputs(length)
    with torch.no_grad():
        k[0, :, :pad] = 1e4  # garbage in padding must not leak
        v[0, :, :pad] = float("nan")
    phi_q, phi_k = linear_ops.elu_features(q), linear_ops.elu_features(k) * linear_ops.causal_key_mask(ctx)
    v_clean = torch.where(linear_ops.causal_key_mask(ctx).bool(), v, 0.0)
    chunked, _ = linear_ops.chunked_linear_attention(phi_q, phi_k, v_clean, chunk_size=4)
    reference = linear_ops.quadratic_linear_attention(phi_q, phi_k, v_clean, ctx.visible)
    torch.testing.assert_close(chunked, reference)
    assert torch.equal(chunked[0, :, :pad], torch.zeros_like(chunked[0, :, :pad]))
    unpadded, _ = linear_ops.chunked_linear_attention(
        phi_q[:1, :, pad:], phi_k[:1, :, pad:], v_clean[:1, :, pad:], chunk_size=4
    )
    torch.testing.assert_close(chunked[:1, :, pad:], unpadded)


def test_mask_other_than_causal_padding_is_rejected():
    visible = torch.ones(1, 1, 4, 4, dtype=torch.bool)  # bidirectional
    with pytest.raises(ValueError, match="causal attention with padding only"):
        linear_ops.causal_key_mask(build_context(visible))


def _left_padded_context(length, pad):
    real = torch.ones(B, length, dtype=torch.bool)
    real[0, :pad] = False
    return build_context(_causal(length) & real[:, None, None, :])


@pytest.mark.parametrize("window,chunk", [(1, 4), (4, 3), (20, 8)])
def test_hybrid_three_forms_agree_outputs_and_gradients(window, chunk):
    from hf_attn_plus.selection import sinks_and_window

    length, scaling = 13, 0.4
    ctx = _left_padded_context(length, pad=3)
    key_mask = linear_ops.causal_key_mask(ctx).double()
    results = []
    for form in ("quadratic", "chunked", "recurrent"):
        q, k, v = _inputs(length)
        gamma = torch.tensor([0.2, 0.5, 0.9, 1.3], dtype=torch.float64, requires_grad=True)
        phi_q, phi_k = _features("hedgehog", q, k)
        if form == "quadratic":
            in_window = sinks_and_window(ctx, 0, window)  # the core's window selection is the definition
            out = linear_ops.quadratic_hybrid_attention(q, k, v, phi_q, phi_k, ctx.visible, in_window, scaling, gamma)
        elif form == "chunked":
            out, _ = linear_ops.chunked_hybrid_attention(q, k, v, phi_q, phi_k, key_mask, scaling, gamma, window,
                                                         chunk_size=chunk)
        else:  # decode: one token at a time, the cache holding the last `window` slots and the state
            state, outs = None, []
            for t in range(length):
                slots = slice(t - min(t, window), t + 1)
                o, state = linear_ops.chunked_hybrid_attention(
                    q[:, :, t : t + 1], k[:, :, slots], v[:, :, slots], phi_q[:, :, t : t + 1], phi_k[:, :, slots],
                    key_mask[:, :, slots], scaling, gamma, window, state, chunk_size=1,
                )
                outs.append(o)
            out = torch.cat(outs, 2)
        (out * torch.linspace(-1, 1, DV, dtype=out.dtype)).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad, gamma.grad))
    assert torch.equal(results[0][0][0, :, :3], torch.zeros_like(results[0][0][0, :, :3]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 4, 64])  # 64 >= length: the whole-sequence (quadratic) UT form
def test_gated_delta_forms_agree_outputs_and_gradients(chunk):
    length = 13
    results = []
    for form in ("recurrent", "chunked"):
        q, k, v = _inputs(length)
        g = torch.Generator().manual_seed(5)
        log_alpha = (-torch.rand(B, HKV, length, generator=g, dtype=torch.float64)).requires_grad_()
        beta = torch.rand(B, HKV, length, generator=g, dtype=torch.float64).requires_grad_()
        qn, kn = torch.nn.functional.normalize(q, dim=-1) * 0.4, torch.nn.functional.normalize(k, dim=-1)
        if form == "recurrent":
            out, state = linear_ops.recurrent_gated_delta(qn, kn, v, log_alpha, beta)
        else:
            out, state = linear_ops.chunked_gated_delta(qn, kn, v, log_alpha, beta, chunk_size=chunk)
        ((out * torch.linspace(-1, 1, DV, dtype=out.dtype)).sum() + state.sum()).backward()
        results.append((out.detach(), state.detach(), q.grad, k.grad, v.grad, log_alpha.grad, beta.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_gated_delta_padding_leaves_state_untouched():
    length, pad = 9, 4
    q, k, v = (t.detach() for t in _inputs(length))
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    log_alpha, beta = -torch.rand(B, HKV, length, dtype=torch.float64), torch.rand(B, HKV, length, dtype=torch.float64)
    real = torch.ones(B, 1, length, dtype=torch.float64)
    real[0, :, :pad] = 0
    out, state = linear_ops.chunked_gated_delta(qn, kn, v, log_alpha * real, beta * real, chunk_size=4)
    alone, alone_state = linear_ops.chunked_gated_delta(
        qn[:1, :, pad:], kn[:1, :, pad:], v[:1, :, pad:], log_alpha[:1, :, pad:], beta[:1, :, pad:], chunk_size=4
    )
    assert torch.equal(out[0, :, :pad], torch.zeros_like(out[0, :, :pad]))
    torch.testing.assert_close(out[:1, :, pad:], alone)
    torch.testing.assert_close(state[:1], alone_state)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_momentum_delta_forms_agree_and_reduce_to_gated_delta(chunk):
    length = 13
    results = []
    for form in ("recurrent", "chunked"):
        q, k, v = _inputs(length)
        g = torch.Generator().manual_seed(6)
        log_alpha = (-torch.rand(B, HKV, length, generator=g, dtype=torch.float64)).requires_grad_()
        beta = torch.rand(B, HKV, length, generator=g, dtype=torch.float64).requires_grad_()
        log_mu = (-2 * torch.rand(B, HKV, length, generator=g, dtype=torch.float64)).requires_grad_()
        qn, kn = torch.nn.functional.normalize(q, dim=-1) * 0.4, torch.nn.functional.normalize(k, dim=-1)
        fn = linear_ops.recurrent_momentum_delta if form == "recurrent" else linear_ops.chunked_momentum_delta
        out, (s, m) = fn(qn, kn, v, log_alpha, beta, log_mu, **({} if form == "recurrent" else {"chunk_size": chunk}))
        ((out * torch.linspace(-1, 1, DV, dtype=out.dtype)).sum() + s.sum() + m.sum()).backward()
        results.append((out.detach(), s.detach(), m.detach(), q.grad, k.grad, v.grad, log_alpha.grad, beta.grad,
                        log_mu.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    q, k, v = (t.detach() for t in _inputs(length))
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    log_alpha, beta = -torch.rand(B, HKV, length, dtype=torch.float64), torch.rand(B, HKV, length, dtype=torch.float64)
    no_momentum = torch.full_like(log_alpha, -1e4)  # μ = 0
    torch.testing.assert_close(
        linear_ops.chunked_momentum_delta(qn, kn, v, log_alpha, beta, no_momentum, chunk_size=4)[0],
        linear_ops.chunked_gated_delta(qn, kn, v, log_alpha, beta, chunk_size=4)[0],
    )
