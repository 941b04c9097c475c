"""block_sparse_attention over structured key sets (positions, rule, sorted lists; no mask tensor) equals
masked_attention over the dense oracle mask (structure.dense_keep) in outputs and in gradients w.r.t. q, k, v."""

import pytest
import torch

from hf_attn_plus.kernel_inputs import key_set
from hf_attn_plus.kernels import tile_lists
from hf_attn_plus.kernels.block_sparse_prefill.function import block_sparse_attention
from hf_attn_plus.kernels.tile_lists import tiles_for
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.structure import dense_keep

from kernel_cases import SELECTIONS, attention_inputs, padded_context, selection, tile_map

# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, left pad)
GQA = (2, 4, 2, 21, 21, 12, 8, torch.float32, 5)  # GQA 2, DeepSeek dims, odd length, a padded row with empty rows
SHAPES = [
    (1, 8, 2, 19, 40, 16, 16, torch.float32, 0),  # GQA 4, queries after a cached prefix
    (2, 4, 4, 17, 17, 64, 64, torch.float16, 3),  # MHA, fp16
]


def _check(shape, name, block=16):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, pad = shape
    q, k, v = attention_inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, requires_grad=True)
    ctx = padded_context(batch, q_len, kv_len, pad)
    sel = selection(name, batch, q_heads, q_len, kv_len)
    out = block_sparse_attention(q, k, v, key_set(ctx, sel), 0.25, block_m=block, block_n=block)
    keep = dense_keep(ctx, sel, q_heads)
    expected = masked_attention(q, k, v, keep, scaling=0.25)[0]
    grad = torch.randn(out.shape).to(dtype)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for label, got, want in zip("qkv", grads, torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(got, want, atol=tol * 5, rtol=tol * 5, msg=label)
    empty = ~keep.any(-1)
    assert (out[empty.expand_as(out[..., 0])] == 0).all()  # rows keeping nothing output zeros
    return keep


@pytest.mark.parametrize("name", SELECTIONS)
def test_every_selection_kind_equals_oracle(name):
    keep = _check(GQA, name)
    assert (~keep[-1, :, :5].any(-1)).all()  # the padded row's first queries keep nothing


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa4_cached_prefix", "mha_fp16"])
@pytest.mark.parametrize("name", ["dilated", "block_lists", "token_lists"])
def test_other_layouts_equal_oracle(shape, name):
    _check(shape, name)


def test_rows_of_a_block_straddling_heads():
    """32-row blocks over 21 queries: row blocks hold the end of one head and the start of the next."""
    _check(GQA, "window_sinks", block=32)


@pytest.mark.parametrize("name", ["window_sinks", "dilated", "block_lists", "token_lists"])
def test_tile_lists_built_in_chunks_equal_one_pass(monkeypatch, name):
    """Row blocks and queries taken a few at a time (a tiny chunk bound) give the same lists, and their transposed
    walk (row blocks per key tile) lists exactly the listed pairs."""
    batch, q_heads, kv_heads, q_len, kv_len, *_ = GQA
    ctx = padded_context(batch, q_len, kv_len, 5)
    keys = key_set(ctx, selection(name, batch, q_heads, q_len, kv_len))
    whole = tiles_for(keys, q_heads, kv_heads, kv_len, 16, 16)
    monkeypatch.setattr(tile_lists, "_CHUNK_ENTRIES", 40)
    chunked = tiles_for(keys, q_heads, kv_heads, kv_len, 16, 16)
    assert torch.equal(tile_map(chunked), tile_map(whole))
    rows, counts = tile_lists.transposed(whole)
    pairs = {(b, h, r, t) for b, h, r, t in tile_map(whole).nonzero().tolist()}
    walked = {(b, h, int(rows[b, h, t, i]), t) for b, h, t in counts.nonzero().tolist() for i in range(counts[b, h, t])}
    assert walked == pairs
