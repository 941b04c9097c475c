"""Triton linear-attention kernels against the PyTorch forms (interpreter on CPU: TRITON_INTERPRET=1, conftest)."""

import pytest
import torch

from hf_attn_plus import linear_ops

chunked = pytest.importorskip("hf_attn_plus.kernels.linear_attention.chunked")


def _inputs(batch, q_heads, kv_heads, length, features, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = linear_ops.elu_features(torch.randn(batch, q_heads, length, features, generator=g)).to(dtype)
    k = linear_ops.elu_features(torch.randn(batch, kv_heads, length, features, generator=g)).to(dtype)
    v = torch.randn(batch, kv_heads, length, dv, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("length,features,dv,chunk", [(19, 6, 5, 16), (8, 16, 16, 32)])
def test_chunked_forward_matches_reference(dtype, tol, length, features, dv, chunk):
    q, k, v = _inputs(2, 4, 2, length, features, dv, dtype)
    expected, (s_ref, z_ref) = linear_ops.chunked_linear_attention(q.float(), k.float(), v.float(), chunk_size=chunk)
    out, (s, z) = chunked.chunked_forward(q, k, v, chunk_size=chunk)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    # continuing from a state
    more, _ = chunked.chunked_forward(q, k, v, (s, z), chunk_size=chunk)
    expected_more, _ = linear_ops.chunked_linear_attention(q.float(), k.float(), v.float(), (s_ref, z_ref), chunk)
    torch.testing.assert_close(more.float(), expected_more, rtol=tol, atol=tol)


def _gradients(attention, q, k, v, state, grads):
    """Gradients of (output, final S, final z) · `grads` w.r.t. q, k, v and the state's two tensors (if given)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *(state or ()))]
    out, (s, z) = attention(*leaves[:3], tuple(leaves[3:]) or None)
    return torch.autograd.grad((out, s, z), leaves, grads)


# fp16: inputs and gradients are stored in fp16 (kernel math in fp32): a few units of fp16 rounding.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3)])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_backward_matches_chunked_reference(dtype, tol, groups, with_state):
    batch, kv_heads, length, features, dv, chunk = 2, 2, 19, 6, 5, 16  # odd length: a partial last chunk
    q, k, v = _inputs(batch, kv_heads * groups, kv_heads, length, features, dv, dtype, seed=groups)
    g = torch.Generator().manual_seed(1)
    state = (torch.rand(batch, kv_heads, features, dv, generator=g), torch.rand(batch, kv_heads, features, generator=g))
    state = state if with_state else None
    grads = (torch.randn(*q.shape[:3], dv, generator=g).to(dtype), torch.randn(batch, kv_heads, features, dv, generator=g),
             torch.randn(batch, kv_heads, features, generator=g))  # also through the final state

    got = _gradients(lambda *a: chunked.linear_attention(*a, chunk_size=chunk), q, k, v, state, grads)
    wide = lambda t: t.double()  # noqa: E731  (the reference in fp64 on the same rounded inputs)
    expected = _gradients(lambda *a: linear_ops.chunked_linear_attention(*a, chunk_size=chunk),
                          *map(wide, (q, k, v)), state and tuple(map(wide, state)), tuple(map(wide, grads)))
    assert [t.dtype for t in got] == [dtype] * 3 + [torch.float32] * (len(got) - 3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_backward_matches_quadratic_definition():
    q, k, v = _inputs(2, 4, 2, 19, 6, 5, torch.float32)
    grad_out = torch.randn(2, 4, 19, 5, generator=torch.Generator().manual_seed(3))
    visible = torch.ones(19, 19, dtype=torch.bool).tril()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(chunked.linear_attention(*leaves, chunk_size=16)[0], leaves, grad_out)
    expected = torch.autograd.grad(linear_ops.quadratic_linear_attention(*leaves, visible), leaves, grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_backward_value_blocks_sum_to_the_whole():
    """dφk summed over programs that each own a block of value columns equals one program owning them all."""
    q, k, v = _inputs(1, 4, 2, 21, 5, 20, torch.float32)
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(1, 4, 21, 20, generator=g)
    grad_state = (torch.randn(1, 2, 5, 20, generator=g), torch.randn(1, 2, 5, generator=g))
    split = chunked.chunked_backward(q, k, v, None, grad_out, grad_state, chunk_size=16, value_block=16)
    whole = chunked.chunked_backward(q, k, v, None, grad_out, grad_state, chunk_size=16, value_block=32)
    for a, b in zip((*split[:3], *split[3]), (*whole[:3], *whole[3])):
        torch.testing.assert_close(a, b)


def test_decode_step_matches_recurrent_form():
    q, k, v = _inputs(2, 4, 2, 5, 6, 5, torch.float32)
    _, state = linear_ops.chunked_linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    expected, (s_ref, z_ref) = linear_ops.recurrent_linear_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state)
    state = (state[0].clone(), state[1].clone())
    out = chunked.decode_step(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(state[0], s_ref)
    torch.testing.assert_close(state[1], z_ref)


def test_model_with_kernel_backend_matches_reference_backend_and_decodes():
    from .conftest import build

    model = build("llama", "linear", feature_map="hedgehog", backend="kernel", chunk_size=16)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        kernel_logits = model(ids, attention_mask=mask).logits
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        model.config.hf_attn_plus = dict(model.config.hf_attn_plus, backend="reference")
        reference_logits = model(ids, attention_mask=mask).logits
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                  use_cache=False)
    torch.testing.assert_close(kernel_logits, reference_logits)
    assert torch.equal(cached, uncached)


def test_model_training_step_with_kernel_backend_matches_reference_backend():
    from .conftest import build

    model = build("llama", "linear", feature_map="hedgehog", backend="kernel", chunk_size=4)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: zero key rows inside the kernel

    def gradients(backend: str) -> dict[str, torch.Tensor]:
        model.config.hf_attn_plus = dict(model.config.hf_attn_plus, backend=backend)
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    kernel, reference = gradients("kernel"), gradients("reference")
    assert kernel.keys() == reference.keys() and any(".attn_plus." in name for name in kernel)
    for name in reference:
        torch.testing.assert_close(kernel[name], reference[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_model_training_through_a_cached_state_with_kernel_backend_matches_reference_backend():
    """Second call continues from the first call's state (cache) with gradients flowing through that state."""
    from .conftest import build

    model = build("llama", "linear", feature_map="elu", backend="kernel", chunk_size=4)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def gradients(backend: str) -> dict[str, torch.Tensor]:
        model.config.hf_attn_plus = dict(model.config.hf_attn_plus, backend=backend)
        model.zero_grad()
        first = model(ids[:, :5], use_cache=True)
        second = model(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
        (first.logits.logsumexp(-1).sum() + second.logits.logsumexp(-1).sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    kernel, reference = gradients("kernel"), gradients("reference")
    assert kernel.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(kernel[name], reference[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
