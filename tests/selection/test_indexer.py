import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import hf_attn_plus
from hf_attn_plus.masking import build_context
from hf_attn_plus.mechanisms import topk
from hf_attn_plus.mechanisms.indexer_topk import (
    chunk_scores,
    fp32_indexer_scores,
    indexer_kl_terms,
    scored_selection,
    select_by_scores,
    training_selection,
)
from hf_attn_plus.reference import attention_target, masked_probabilities
from hf_attn_plus.selection import grouped_scores, indexer_scores, top_scoring
from hf_attn_plus.structure import dense_keep

from .selection_helpers import causal_context


def _qk(length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, length, 8, generator=g), torch.randn(2, 2, length, 8, generator=g)


def _left_padded_context(length=20, pad=6):
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :pad] = False
    visible = torch.ones(length, length, dtype=torch.bool).tril() & mask[:, None, None, :]
    return build_context(visible)


def test_indexer_scores_follow_the_formula():
    g = torch.Generator().manual_seed(1)
    index_query, index_key, weights = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 7, 4, generator=g), torch.randn(2, 3, 5, generator=g)
    expected = torch.zeros(2, 1, 5, 7)
    for b in range(2):
        for t in range(5):
            for s in range(7):
                expected[b, 0, t, s] = sum(weights[b, j, t] * torch.relu(index_query[b, j, t] @ index_key[b, s]) for j in range(3))
    torch.testing.assert_close(indexer_scores(index_query, index_key, weights), expected)


def _dense_candidates(ctx, sinks, window):
    """The keys a top-k chooses among: visible, neither a sink nor in the window."""
    return ctx.visible & ~((ctx.key_pos < sinks) | (ctx.distance < window))


def _dense_select(scores, ctx, budget, sinks, window):
    """The previous dense selection: sinks + window + the `budget` other visible keys with the largest scores."""
    candidates = _dense_candidates(ctx, sinks, window)
    return (ctx.visible & ~candidates) | top_scoring(scores, candidates.expand_as(scores), budget)


def _dense_target(query, key, ctx, scaling):
    """The previous dense p_t: attention probabilities summed over heads, L1-normalised, [B, 1, q, kv]."""
    summed = masked_probabilities(query, key, ctx.visible, scaling).sum(dim=1, keepdim=True)
    return summed / summed.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(summed.dtype).tiny)


def _dense_kl(scores, target, keep):
    """The previous dense loss: mean over rows keeping any key of the KL restricted to and renormalised over keep."""
    target = target * keep
    target = target / target.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(target.dtype).tiny)
    log_predicted = torch.log_softmax(scores.float().masked_fill(~keep, torch.finfo(torch.float32).min), dim=-1)
    per_key = torch.xlogy(target, target) - target * log_predicted.masked_fill(~keep, 0.0)
    rows = keep.any(dim=-1)
    return per_key.sum(dim=-1)[rows].mean()


def _index_inputs(length=20, seed=5):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, 3, length, 4), (2, length, 4), (2, 3, length))
    return tuple(torch.randn(*shape, generator=g).requires_grad_() for shape in shapes)


@pytest.fixture(params=[False, True], ids=["one-chunk", "row-chunks"])
def chunking(request, monkeypatch):
    if request.param:  # every query row its own chunk
        monkeypatch.setattr(hf_attn_plus.selection, "SCORE_ELEMENTS", 1)


def test_perfect_indexer_equals_core_topk(chunking):
    query, key = _qk()
    ctx = _left_padded_context()
    opts = topk.MECHANISM.resolve_options(dict(budget=3, sinks=1, window=2))
    expected = dense_keep(ctx, topk.select(query, key, ctx, opts), query.shape[1])
    assert torch.equal(_dense_select(grouped_scores(query, key), ctx, 3, 1, 2), expected)
    assert torch.equal(select_by_scores(grouped_scores(query, key), ctx, 3, 1, 2), expected)


def test_budget_covering_context_is_dense():
    ctx = _left_padded_context()
    scores = torch.randn(2, 1, 20, 20)
    assert torch.equal(select_by_scores(scores, ctx, 20, 0, 0), ctx.visible)


def test_selection_of_indexer_scores_equals_the_dense_selection(chunking):
    ctx = _left_padded_context()
    index_inputs = tuple(x.detach() for x in _index_inputs())
    # Integer-valued inputs: many exact ties among the scores, broken toward the most recent keys.
    index_inputs = tuple(x.round() for x in index_inputs)
    scores_of = functools.partial(chunk_scores, index_inputs)
    selection = scored_selection(ctx, scores_of, 3, 4, 1, 2)
    expected = _dense_select(fp32_indexer_scores(*index_inputs), ctx, 4, 1, 2)
    assert torch.equal(dense_keep(ctx, selection), expected)


def _dense_objective(objective, stage, scores, target, ctx, budget, sinks, window):
    """(target, keys compared) of each objective, written from its definition on the dense tensors."""
    candidates = _dense_candidates(ctx, sinks, window)
    selected = _dense_select(scores, ctx, budget, sinks, window)
    if objective == "all_keys":
        return target, ctx.visible if stage == "warmup" else selected
    if objective == "candidates":
        return target, candidates if stage == "warmup" else selected & candidates
    return top_scoring(target, candidates, budget).float(), candidates


@pytest.mark.parametrize("objective", ["all_keys", "candidates", "top_set"])
@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_chunked_training_loss_and_gradients_equal_the_dense_formula(stage, objective, chunking):
    query, key = _qk()
    ctx = _left_padded_context()
    opts = SimpleNamespace(budget=3, sinks=1, window=2, stage=stage, objective=objective)
    index_inputs = _index_inputs()
    loss, selection = training_selection(index_inputs, query, key, ctx, opts, 0.35)
    scores = fp32_indexer_scores(*index_inputs)
    target, keep = _dense_objective(objective, stage, scores.detach(), _dense_target(query, key, ctx, 0.35), ctx, 3, 1, 2)
    expected = _dense_kl(scores, target, keep)
    torch.testing.assert_close(loss, expected)
    attended = ctx.visible if stage == "warmup" else _dense_select(scores.detach(), ctx, 3, 1, 2)
    assert torch.equal(dense_keep(ctx, selection), attended)
    for grad, expected_grad in zip(torch.autograd.grad(loss, index_inputs), torch.autograd.grad(expected, index_inputs)):
        torch.testing.assert_close(grad, expected_grad)


def test_objectives_compare_different_keys():
    """The three objectives are different losses of the same scores (so the option is not a no-op), and 'top_set'
    is minimised by scores that rank the exact top set first: with a large margin its KL goes to zero."""
    query, key = _qk()
    ctx = _left_padded_context()
    index_inputs = _index_inputs()
    losses = {
        objective: training_selection(index_inputs, query, key, ctx, SimpleNamespace(budget=3, sinks=1, window=2, stage="warmup", objective=objective), 0.35)[0]
        for objective in ("all_keys", "candidates", "top_set")
    }
    assert len({round(v.item(), 4) for v in losses.values()}) == 3
    target = attention_target(query, key, ctx.visible, 0.35)
    candidates = _dense_candidates(ctx, 1, 2)
    top = top_scoring(target, candidates, 3)
    ideal = top.float() * 50.0  # the top set 50 nats above every other candidate
    kl, count = indexer_kl_terms(ideal, top.float(), candidates)
    torch.testing.assert_close(kl / count, torch.tensor(0.0), atol=1e-4, rtol=0)
    assert indexer_kl_terms(ideal.flip(-1), top.float(), candidates)[0] > 1.0


def test_kl_is_zero_when_the_indexer_matches_and_equals_the_definition():
    query, key = _qk()
    ctx = _left_padded_context()
    target = attention_target(query, key, ctx.visible, 0.35)
    torch.testing.assert_close(target, _dense_target(query, key, ctx, 0.35))
    rows = ctx.visible.any(-1)
    torch.testing.assert_close(target.sum(-1)[rows], torch.ones(int(rows.sum())))
    matched = target.clamp(min=1e-30).log()
    kl, count = indexer_kl_terms(matched, target, ctx.visible)
    assert kl.abs() < 1e-5 and count == rows.sum()
    selected = _dense_select(matched, ctx, 3, 1, 2)
    assert indexer_kl_terms(matched, target, selected)[0].abs() < 1e-5
    scores = torch.randn(2, 1, 20, 20)
    per_row = [
        F.kl_div(torch.log_softmax(scores[b, 0, t][ctx.visible[b, 0, t]], -1), target[b, 0, t][ctx.visible[b, 0, t]], reduction="sum")
        for b in range(2)
        for t in range(20)
        if rows[b, 0, t]
    ]
    torch.testing.assert_close(indexer_kl_terms(scores, target, ctx.visible)[0], torch.stack(per_row).sum())
    assert indexer_kl_terms(scores, target, selected)[0] > 0


def test_loss_trains_only_the_indexer():
    query, key = (x.requires_grad_() for x in _qk())
    index_q, index_k, index_w = torch.nn.Linear(8, 2 * 4), torch.nn.Linear(8, 4), torch.nn.Linear(8, 2)
    # The indexer reads detached copies of the main attention's inputs (here its first head's query and key).
    source_q, source_k = query[:, 0].detach(), key[:, 0].detach()
    index_inputs = (index_q(source_q).unflatten(-1, (2, 4)).transpose(1, 2), index_k(source_k), index_w(source_q).transpose(1, 2))
    opts = SimpleNamespace(budget=3, sinks=1, window=2, stage="warmup", objective="all_keys")
    loss, _ = training_selection(index_inputs, query, key, causal_context(2, 20), opts, 0.35)
    loss.backward()
    assert query.grad is None and key.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in (index_q, index_k, index_w) for p in m.parameters())


def test_top_scoring_breaks_exact_ties_toward_recent_keys():
    scores = torch.tensor([[5.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]])
    candidates = torch.tensor([[True, True, True, True, True, True, False]])
    # Two clear winners, then two of the four tied zeros among candidates: the latest ones (4 and 5).
    assert top_scoring(scores, candidates, 4).tolist() == [[True, False, False, True, True, True, False]]
    # Left padding (non-candidate keys in front) does not change which real keys win.
    padded = top_scoring(torch.cat([torch.zeros(1, 3), scores], -1), torch.cat([torch.zeros(1, 3, dtype=torch.bool), candidates], -1), 4)
    assert torch.equal(padded[:, 3:], top_scoring(scores, candidates, 4))
    assert top_scoring(scores, candidates, 0).sum() == 0


def _router_inputs(length=37, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, length, 5, generator=g), torch.randn(2, length, 5, generator=g), torch.randn(2, 6, length, generator=g)


def test_misa_router_matches_its_definition_per_query():
    from hf_attn_plus.selection import routed_indexer_heads

    index_query, index_key, weights = _router_inputs()
    ctx = causal_context(2, 37)
    routed_q, routed_w = routed_indexer_heads(index_query, index_key, weights, ctx, 2, 8)
    assert routed_q.shape == (2, 2, 37, 5) and routed_w.shape == (2, 2, 37)
    for b in range(2):
        for t in range(37):
            complete = t // 8  # blocks wholly before the query's block
            means = [index_key[b, 8 * i : 8 * i + 8].mean(0) for i in range(complete)]
            router = [
                float(weights[b, j, t]) * max([float(torch.relu(index_query[b, j, t] @ m)) for m in means], default=0.0)
                for j in range(6)
            ]
            best = sorted(range(6), key=lambda j: (-router[j], j))[:2]
            torch.testing.assert_close(routed_w[b, :, t], weights[b, best, t])
            torch.testing.assert_close(routed_q[b, :, t], index_query[b, best, t])


def test_misa_router_is_padding_invariant_and_all_heads_is_dsa():
    from hf_attn_plus.selection import routed_indexer_heads

    index_query, index_key, weights = _router_inputs(length=20)
    pad = 6
    ctx = _left_padded_context(20, pad)
    routed_q, routed_w = routed_indexer_heads(index_query, index_key, weights, ctx, 3, 4)
    # Row 1 is left padded: its real tokens, routed alone, must choose the same heads.
    alone_q, alone_w = routed_indexer_heads(
        index_query[1:, :, pad:], index_key[1:, pad:], weights[1:, :, pad:], causal_context(1, 20 - pad), 3, 4
    )
    assert torch.equal(routed_w[1:, :, pad:], alone_w) and torch.equal(routed_q[1:, :, pad:], alone_q)
    same_q, same_w = routed_indexer_heads(index_query, index_key, weights, ctx, 6, 4)
    assert same_q is index_query and same_w is weights
