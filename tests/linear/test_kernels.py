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
def test_chunked_forward_and_gradients_match_reference(dtype, tol, length, features, dv, chunk):
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
    if dtype == torch.float32:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        chunked.linear_attention(*leaves, chunk)[0].pow(2).sum().backward()
        linear_ops.chunked_linear_attention(*ref_leaves, chunk_size=chunk)[0].pow(2).sum().backward()
        for a, b in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, b.grad)


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
