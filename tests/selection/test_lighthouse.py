from types import SimpleNamespace

import pytest
import torch

import hf_attn_plus
from hf_attn_plus.mechanisms.lighthouse import attend
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.tiny import ARCHITECTURES
from core.models import token_batch

from .selection_helpers import EXACT_INDEXER, assert_padding_invariant, causal_context, logits, tiny_model

OPTS = dict(block_size=4, levels=2, factor=2, budget=2, local_blocks=1, sink_blocks=1)


def _loop_selection(query, key, block_size, levels, factor, budget, local_blocks, sink_blocks):
    """The selection written out per query and head with Python sets: [Hq, L, L] for one unpadded sequence."""
    q_heads, length, _ = query.shape
    groups = q_heads // key.shape[0]
    keep = torch.zeros(q_heads, length, length, dtype=torch.bool)
    for h in range(q_heads):
        k = key[h // groups]
        for t in range(length):
            start = t - t % block_size
            pooled_q = query[h, start : t + 1].mean(0)
            chosen = None
            for level in range(levels, -1, -1):
                size = block_size * factor**level
                own = t // size
                past = [b for b in range(own) if chosen is None or b // factor in chosen]
                fixed = {own}
                if level == 0:
                    fixed |= {b for b in range(own) if own - b < local_blocks or b < sink_blocks}
                    past = [b for b in past if b not in fixed]
                score = {b: float(pooled_q @ k[b * size : (b + 1) * size].mean(0)) for b in past}
                chosen = fixed | set(sorted(past, key=lambda b: -score[b])[:budget])
            for b in chosen:
                keep[h, t, b * block_size : min((b + 1) * block_size, t + 1)] = True
    return keep


def test_training_selection_forward_and_backward_equal_the_written_out_reference():
    g = torch.Generator().manual_seed(0)
    length = 32
    query = torch.randn(1, 4, length, 8, generator=g, requires_grad=True)
    key = torch.randn(1, 2, length, 8, generator=g, requires_grad=True)
    value = torch.randn(1, 2, length, 6, generator=g, requires_grad=True)
    ctx = causal_context(1, length)
    module = SimpleNamespace(training=True, config=None)
    opts = SimpleNamespace(**OPTS, logit_scale="none")
    out, _ = attend(module, query, key, value, ctx, opts, 0.3, 0.0)
    keep = _loop_selection(query[0].detach(), key[0].detach(), **OPTS)
    assert not torch.equal(keep, ctx.visible[0].expand_as(keep)), "the budget must leave blocks out"
    expected, _ = masked_attention(query, key, value, keep[None], 0.3)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def _training_model(model_type="llama", **options):
    return tiny_model(model_type, "lighthouse", EXACT_INDEXER.get(model_type), **{**OPTS, **options}).train()


def test_budget_covering_everything_equals_dense_training():
    ids = token_batch(2, 40)
    model = _training_model(budget=64)
    out = logits(model, ids)
    hf_attn_plus.set_attention(model, "sdpa")
    torch.testing.assert_close(out, logits(model, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_training_is_causal_padding_invariant_and_trains(model_type):
    model = _training_model(model_type)
    ids = token_batch(1, 40)
    changed = ids.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % 128
    torch.testing.assert_close(logits(model, ids)[:, :30], logits(model, changed)[:, :30], atol=1e-5, rtol=1e-4)
    assert_padding_invariant(model, length=30, pad=7)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.o_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_inference_hands_over_to_the_named_mechanism():
    ids = token_batch(2, 24)
    handover = dict(budget=2, window=2, sinks=1)
    model = tiny_model("llama", "lighthouse", **OPTS, inference="topk", inference_options=handover).eval()
    out = logits(model, ids)
    training_out = logits(model.train(), ids)
    model.eval()
    hf_attn_plus.set_attention(model, "topk", **handover)
    torch.testing.assert_close(out, logits(model, ids))
    assert not torch.allclose(out, training_out, atol=1e-4), "training and inference selections differ here"
    hf_attn_plus.set_attention(model, "lighthouse", **OPTS)  # inference='dense' by default
    dense = logits(model, ids)
    hf_attn_plus.set_attention(model, "sdpa")
    torch.testing.assert_close(dense, logits(model, ids), atol=1e-5, rtol=1e-4)


def test_bad_inference_options_are_named():
    model = tiny_model("llama", "lighthouse")
    with pytest.raises(hf_attn_plus.OptionError, match="inference.*'nope'.*'dense' or the name of a registered"):
        hf_attn_plus.set_attention(model, "lighthouse", inference="nope")
    with pytest.raises(hf_attn_plus.OptionError, match="inference.*'lighthouse'"):
        hf_attn_plus.set_attention(model, "lighthouse", inference="lighthouse")
    hf_attn_plus.set_attention(model, "lighthouse", inference="topk", inference_options={"budgett": 3})
    with pytest.raises(hf_attn_plus.OptionError, match="'lighthouse': options for 'topk'.*'budgett'"):
        logits(model.eval(), token_batch(1, 8))
