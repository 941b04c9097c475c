"""The reference softmax-over-kept-keys against torch SDPA, and the length-dependent logit scale."""

import math

import torch
import torch.nn.functional as F

from hf_attn_plus.reference import log_length_scale, masked_attention


def random_case(seed=0, batch=2, q_heads=4, kv_heads=2, q_len=7, kv_len=11, dim=12, v_dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=g, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, v_dim, generator=g, requires_grad=True)
    keep = torch.rand(batch, 1, q_len, kv_len, generator=g) < 0.5
    keep[..., 0] = True  # every row keeps something, so SDPA is well defined
    return q, k, v, keep


def test_masked_attention_equals_sdpa_outputs_and_gradients():
    q, k, v, keep = random_case()
    out, probs = masked_attention(q, k, v, keep, scaling=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    theirs = torch.autograd.grad(expected, (q, k, v), grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_that_keep_nothing_give_zeros_and_finite_gradients():
    q, k, v, keep = random_case(seed=1)
    keep[:, :, 2] = False
    out, _ = masked_attention(q, k, v, keep, scaling=0.3)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_half_precision_matches_fp32_reference():
    q, k, v, keep = random_case(seed=2)
    out32, _ = masked_attention(q, k, v, keep, scaling=0.3)
    out16, _ = masked_attention(q.half(), k.half(), v.half(), keep, scaling=0.3)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), out32, atol=3e-3, rtol=3e-3)


def test_log_length_scale_formula():
    keep = torch.zeros(1, 1, 4, 100, dtype=torch.bool)
    for row, n in enumerate((1, 50, 64, 100)):
        keep[0, 0, row, :n] = True
    beta = log_length_scale(keep, train_length=64, c=0.5).flatten().tolist()
    assert beta[:3] == [1.0, 1.0, 1.0]
    assert math.isclose(beta[3], 1 + 0.5 * math.log(100 / 64), rel_tol=1e-6)


def test_log_length_scale_sharpens_attention_like_a_per_row_temperature():
    q, k, v, keep = random_case(seed=3, kv_len=40)
    beta = log_length_scale(keep, train_length=8, c=1.0)
    out, _ = masked_attention(q, k, v, keep, scaling=0.3, beta=beta)
    assert beta.max() > 1.2  # the rows really are rescaled
    for b in range(q.shape[0]):
        for row in range(q.shape[2]):
            rows = slice(row, row + 1)
            expected = F.scaled_dot_product_attention(
                q[b : b + 1, :, rows],
                k[b : b + 1],
                v[b : b + 1],
                attn_mask=keep[b : b + 1, :, rows],
                scale=0.3 * float(beta[b, 0, row, 0]),
                enable_gqa=True,
            )
            torch.testing.assert_close(out[b : b + 1, :, rows], expected, atol=1e-6, rtol=1e-5)
