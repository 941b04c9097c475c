"""The chunked reference over a Selection equals dense masked softmax over the oracle mask: outputs and gradients,
for every structural part (window, sinks, dilation, local blocks, block lists, token lists with log-weights),
padding on either side, GQA, odd lengths, decode-sized calls and chunks smaller than the sequence."""

import pytest
import torch

import hf_attn_plus
from hf_attn_plus import chunked_attention
from hf_attn_plus.chunked_attention import selected_attention
from hf_attn_plus.masking import build_context, visible_from_mask
from hf_attn_plus.reference import length_scale, masked_attention
from hf_attn_plus.structure import PositionRule, Selection, dense_keep

from .test_selection import BATCH, DIM, KV_HEADS, Q_HEADS, padded_inputs

OPTIONS = {
    "sliding_window": dict(window=4, sinks=2),
    "topk": dict(budget=3, sinks=1, window=2),
    "block_topk": dict(block_size=3, budget=2, sink_blocks=1, local_blocks=1),
    "block_topk/group": dict(block_size=3, budget=2, choose_per="group"),
    "dilated": dict(dilation=3, window=2),
    "dilated/dense": dict(dilation=1, window=1),
    "block_sparse": dict(block_size=4, threshold=0.6),
}


def inputs(kv_len, q_len, seed):
    query, key, valid, mask = padded_inputs(kv_len, q_len, seed)
    value = torch.randn(BATCH, KV_HEADS, kv_len, DIM + 3, generator=torch.Generator().manual_seed(seed + 1))
    return query, key, value, build_context(visible_from_mask(mask, BATCH, q_len, kv_len, "cpu"))


def assert_matches_dense(query, key, value, ctx, selection, beta=None):
    leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    out = selected_attention(*leaves, ctx, selection, 0.4, beta)
    keep = dense_keep(ctx, selection, query.shape[1])
    dense_leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    expected = masked_attention(*dense_leaves, keep, 0.4, None if beta is None else beta(keep.sum(-1, keepdim=True).float()))[0]
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, dense_leaves, grad)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.fixture(params=["one-chunk", "small-chunks", "block-pairs"])
def chunking(request, monkeypatch):
    if request.param != "one-chunk":  # several query chunks per sequence, and chunked selection scoring
        monkeypatch.setattr(chunked_attention, "MAX_CHUNK", 4)
        monkeypatch.setattr(chunked_attention, "PAIR_ROWS", 4)
        monkeypatch.setattr(chunked_attention, "PAIR_ELEMENTS", 1)  # one row per slice
        monkeypatch.setattr(chunked_attention, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(hf_attn_plus.selection, "SCORE_ELEMENTS", 1)
    if request.param == "block-pairs":  # every chunk of a selection of blocks alone runs as pairs (short contexts
        monkeypatch.setattr(chunked_attention, "PAIRS_SHARE", 0)  # would otherwise take the union)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("kv_len,q_len", [(23, 23), (23, 1), (17, 3)])
def test_mechanism_selection_equals_dense(name, kv_len, q_len, chunking):
    query, key, value, ctx = inputs(kv_len, q_len, seed=kv_len + q_len)
    mechanism = hf_attn_plus.get_mechanism(name.split("/")[0])
    selection = mechanism.select(query, key, ctx, mechanism.resolve_options(OPTIONS[name]))
    assert_matches_dense(query, key, value, ctx, selection)


def test_token_lists_with_log_weights_and_logit_scale(chunking):
    query, key, value, ctx = inputs(19, 19, seed=3)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(-1, 19, (BATCH, Q_HEADS, 19, 3), generator=g)
    # Token lists are disjoint from the rule's keys by contract: keep only positions beyond window and sinks.
    t = ctx.query_pos
    rule = PositionRule(sinks=1, window=3)
    tokens = torch.where((tokens >= 1) & (t - tokens >= 3), tokens, -1)
    tokens = torch.where(tokens.sort(-1).values.diff(dim=-1, prepend=torch.full_like(tokens[..., :1], -2)) == 0, -1, tokens.sort(-1).values)
    log_weights = torch.randn(tokens.shape, generator=g)
    selection = Selection(rule, tokens=tokens, log_weights=log_weights)
    leaves = [x.clone().requires_grad_() for x in (query, key, value)]
    out = selected_attention(*leaves, ctx, selection, 0.4)
    keep = dense_keep(ctx, selection, Q_HEADS)
    dense_weights = torch.zeros(keep.shape)
    dense_weights.scatter_add_(-1, tokens.clamp(min=0) + (ctx.key_start.view(-1, 1, 1, 1)), torch.where(tokens >= 0, log_weights, 0.0))
    expected = masked_attention(query, key, value, keep, 0.4, log_weights=dense_weights)[0]
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    beta = lambda count: length_scale(count, 4, 0.5)  # noqa: E731
    assert_matches_dense(query, key, value, ctx, Selection(rule, tokens=tokens), beta)


def test_rows_that_see_nothing_are_zero_with_finite_gradients():
    query, key, value, ctx = inputs(12, 12, seed=5)
    leaves = [x.clone().requires_grad_() for x in (query, key, value)]
    out = selected_attention(*leaves, ctx, Selection(PositionRule(window=2)), 0.4)
    assert torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5]))  # row 0 is left-padded by 5
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize("per", ["head", "group"])
@pytest.mark.parametrize("parts", ["blocks", "tokens", "both"])
def test_decode_row_reads_each_kv_heads_union_of_its_heads_lists(parts, per):
    """A decode row with per-head lists reads, per KV head, the union of its heads' lists (one batched pass over every
    KV head where a group's heads list the same keys): lists that repeat keys, overlap each other and the rule's keys,
    or list nothing for a head count each key once."""
    query, key, value, ctx = inputs(29, 1, seed=7)
    g = torch.Generator().manual_seed(8)
    heads = Q_HEADS if per == "head" else KV_HEADS
    blocks = torch.randint(-1, 8, (BATCH, heads, 1, 3), generator=g)
    blocks[:, 0] = -1  # a head (group) that lists no block
    tokens = torch.randint(-1, 29, (BATCH, heads, 1, 5), generator=g)
    if per == "group":
        blocks, tokens = (x.repeat_interleave(Q_HEADS // KV_HEADS, dim=1) for x in (blocks, tokens))
    selection = Selection(
        PositionRule(sinks=2, window=3), block_size=4,
        blocks=blocks if parts != "tokens" else None, tokens=tokens if parts != "blocks" else None,
    )
    beta = lambda count: length_scale(count, 4, 0.5)  # noqa: E731
    for row_beta in (None, beta):
        assert_matches_dense(query, key, value, ctx, selection, row_beta)
