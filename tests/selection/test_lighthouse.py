from types import SimpleNamespace

import pytest
import torch

import hf_attn_plus
from hf_attn_plus import chunked_attention
from hf_attn_plus.attention import attend_selection
from hf_attn_plus.masking import build_context
from hf_attn_plus.mechanisms.lighthouse import attend, compressed_sequence, real_token_order
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.structure import DENSE, Selection
from core.models import PLAIN_WITHOUT_WINDOW, token_batch

from .selection_helpers import EXACT_INDEXER, assert_padding_invariant, causal_context, logits, tiny_model

PYRAMID = dict(levels=2, factor=2, budget=3)
BLOCKS = dict(block_size=4, levels=2, factor=2, budget=2, local_blocks=1, sink_blocks=1)
TRAINING = SimpleNamespace(training=True, config=None)


def _written_out_pyramid(q, k, v, levels, factor, budget, scaling, scatter="latest"):
    """The pyramid form for one unpadded sequence and head, built entry by entry with Python lists: [n, Dv]."""
    n = q.shape[0]
    q_norm, k_norm = q.detach().norm(dim=-1), k.detach().norm(dim=-1)

    def best(spans, norms, count):
        return sorted(spans, key=lambda span: -float(norms[span[0] : span[0] + span[1]].max()))[:count]

    # Sort keys: an emitted entry by its first position; a refined one (scatter='sum') after its last position.
    keyed, candidates = [], [(s, factor**levels) for s in range(0, n, factor**levels)]
    for level in range(levels, 0, -1):
        complete = [span for span in candidates if span[0] + span[1] <= n]
        by_query = best(complete, q_norm, budget - budget // 2)
        by_key = best([span for span in complete if span not in by_query], k_norm, budget // 2)
        refined = [span for span in candidates if span not in complete] + by_query + by_key
        keyed += [((s, 0, 0), (s, c)) for s, c in candidates if (s, c) not in refined]
        if scatter == "sum":
            keyed += [((s + c - 1, 1, level), (s, c)) for s, c in by_query + by_key]
        child = factor ** (level - 1)
        candidates = [(s + j * child, child) for s, _ in refined for j in range(factor) if s + j * child < n]
    spans = [span for _, span in sorted(keyed + [((s, 0, 0), (s, c)) for s, c in candidates])]
    pq, pk, pv = (torch.stack([x[s : s + c].mean(0) for s, c in spans]) for x in (q, k, v))
    entry_out = [torch.softmax(scaling * pk[: j + 1] @ pq[j], dim=0) @ pv[: j + 1] for j in range(len(spans))]
    out = []
    for t in range(n):
        if scatter == "sum":  # the released kernel's fan-out: entry [s, s+c) adds into positions [s+c-1, s+2c-1)
            parts = [entry_out[j] for j, (s, c) in enumerate(spans) if s + c - 1 <= t < s + 2 * c - 1]
            out.append(torch.stack(parts).sum(0) if parts else torch.zeros_like(v[0]))
            continue
        finished = [j for j, (s, c) in enumerate(spans) if s + c - 1 <= t]
        out.append(entry_out[finished[-1]] if finished else torch.zeros_like(v[0]))
    return torch.stack(out)


def _padded_context(real: torch.Tensor):
    """Context of a batch whose real tokens are `real` [B, L] (any layout), causal over the whole row."""
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return build_context((causal & real[:, None, :] & real[:, :, None])[:, None])


def _inputs(batch, length, seed=0, q_heads=4, kv_heads=2, dim=6, v_dim=5):
    g = torch.Generator().manual_seed(seed)
    shapes = ((batch, q_heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, v_dim))
    return [torch.randn(*shape, generator=g, requires_grad=True) for shape in shapes]


def _pyramid(**options):
    return SimpleNamespace(**{"form": "pyramid", "scatter": "latest", **PYRAMID, **options}, logit_scale="none")


@pytest.mark.parametrize("scatter", ["latest", "sum"])
def test_pyramid_equals_the_written_out_construction_forward_and_backward(scatter):
    # Two rows of different real lengths (neither a multiple of the coarsest entry), one left-, one right-padded.
    real = torch.zeros(2, 30, dtype=torch.bool)
    real[0, 7:] = True
    real[1, :23] = True
    query, key, value = _inputs(2, 30)
    out, _ = attend(TRAINING, query, key, value, _padded_context(real), _pyramid(scatter=scatter), 0.4, 0.0)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * real[:, None, :, None]
    grads = torch.autograd.grad((out * weight).sum(), (query, key, value))
    expected = torch.zeros_like(out)
    for b in range(2):
        for h in range(4):
            pick = real[b]
            expected[b, h, pick] = _written_out_pyramid(
                query[b, h, pick], key[b, h // 2, pick], value[b, h // 2, pick], **PYRAMID, scaling=0.4, scatter=scatter
            )
    assert not (out * ~real[:, None, :, None]).any(), "padding queries output zeros"
    torch.testing.assert_close(out, expected)
    expected_grads = torch.autograd.grad((expected * weight).sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("scatter", ["latest", "sum"])
def test_compressed_sequence_covers_the_real_tokens_and_values_never_flow_backwards(scatter):
    real = torch.zeros(3, 29, dtype=torch.bool)
    real[0], real[1, 5:], real[2, :18] = True, True, True
    query, key, value = _inputs(3, 29, seed=2)
    ctx = _padded_context(real)
    order, lengths = real_token_order(ctx, 32)
    compact = lambda x: x.detach().gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
    opts = _pyramid(scatter=scatter)
    entries, starts, sizes, valid = compressed_sequence(compact(query), compact(key), lengths, opts)
    assert (sizes[valid] > 1).any() and (sizes[valid] == 1).any(), "both pooled entries and tokens are selected"
    for b in range(3):
        for h in range(4):
            s, c = starts[b, h][valid[b, h]], sizes[b, h][valid[b, h]]
            e = s + c
            assert not (s % c).any(), "entries are aligned pyramid nodes"
            inside = (s[:, None] <= s[None, :]) & (e[None, :] <= e[:, None])
            leaf = inside.sum(-1) == 1  # no other entry inside it (scatter='sum' keeps refined parents too)
            covered = torch.zeros(32, dtype=torch.long)
            for first, end in zip(s[leaf].tolist(), e[leaf].tolist()):
                covered[first:end] += 1
            assert torch.equal(covered, (torch.arange(32) < lengths[b]).long()), "each real position in one leaf"
            # An entry's output goes to positions >= its last one; every entry before it in the sequence (the keys
            # it sees) ends no later, so no key holds a position after any position the output reaches.
            assert (e[1:] >= e[:-1]).all()
            if scatter == "latest":
                assert leaf.all() and torch.equal(s[1:], e[:-1]), "a partition in order"
    # Through the values (selection is gradient-free), outputs up to t depend on no input after t.
    out, _ = attend(TRAINING, query, key, value, ctx, opts, 0.4, 0.0)
    position = ctx.key_pos[:, 0, 0]
    for t in (0, 3, 8, 13, 16):
        upto = ((position >= 0) & (position <= t))[:, None, :, None]
        grads = torch.autograd.grad((out * upto).sum(), (query, key, value), retain_graph=True)
        later = (position > t)[:, None, :, None]
        for grad in grads:
            assert not (grad * later).any()
            assert (grad * upto).abs().sum() > 0 or t == 0


def test_pyramid_with_a_budget_covering_every_entry_is_dense_causal_attention():
    query, key, value = _inputs(1, 27, seed=3)
    ctx = causal_context(1, 27)
    out, _ = attend(TRAINING, query, key, value, ctx, _pyramid(budget=27), 0.4, 0.0)
    dense, _ = masked_attention(query, key, value, ctx.visible, 0.4)
    torch.testing.assert_close(out, dense)
    sparse, _ = attend(TRAINING, query, key, value, ctx, _pyramid(), 0.4, 0.0)
    assert not torch.allclose(sparse, dense, atol=1e-3)
    # logit_scale counts the entries each one attends: at a covering budget, the keys of dense attention.
    scaled = dict(logit_scale="log", logit_scale_c=0.5, train_length=8)
    out, _ = attend(TRAINING, query, key, value, ctx, SimpleNamespace(**vars(_pyramid(budget=27)) | scaled), 0.4, 0.0)
    expected = attend_selection(TRAINING, query, key, value, ctx, Selection(DENSE), SimpleNamespace(**scaled), 0.4)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, dense, atol=1e-3)


@pytest.mark.parametrize("scatter", ["latest", "sum"])
def test_pyramid_gives_left_padded_right_padded_and_alone_the_same_outputs(scatter):
    query, key, value = (x.detach() for x in _inputs(1, 21, seed=4))
    alone, _ = attend(TRAINING, query, key, value, causal_context(1, 21), _pyramid(scatter=scatter), 0.4, 0.0)
    for pad_left in (True, False):
        place = slice(6, None) if pad_left else slice(0, 21)
        real = torch.zeros(1, 27, dtype=torch.bool)
        real[:, place] = True
        padded = [torch.zeros(*x.shape[:2], 27, x.shape[-1]) for x in (query, key, value)]
        for full, x in zip(padded, (query, key, value)):
            full[:, :, place] = x
        out, _ = attend(TRAINING, *padded, _padded_context(real), _pyramid(scatter=scatter), 0.4, 0.0)
        torch.testing.assert_close(out[:, :, place], alone)


def test_pyramid_needs_whole_sequences():
    query, key, value = (x.detach() for x in _inputs(1, 12))
    ctx = build_context(torch.ones(1, 1, 4, 12, dtype=torch.bool).tril(8))
    with pytest.raises(ValueError, match="4 queries for 12 keys"):
        attend(TRAINING, query[:, :, 8:], key, value, ctx, _pyramid(), 0.4, 0.0)


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


@pytest.mark.parametrize("small_chunks", [False, True])
def test_blocks_form_forward_and_backward_equal_the_written_out_reference(small_chunks, monkeypatch):
    if small_chunks:  # block lists built for several query chunks, attended in several chunks
        monkeypatch.setattr(hf_attn_plus.selection, "SCORE_ELEMENTS", 1)
        monkeypatch.setattr(chunked_attention, "MAX_CHUNK", 4)
        monkeypatch.setattr(chunked_attention, "CHUNK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(0)
    length = 32
    query = torch.randn(1, 4, length, 8, generator=g, requires_grad=True)
    key = torch.randn(1, 2, length, 8, generator=g, requires_grad=True)
    value = torch.randn(1, 2, length, 6, generator=g, requires_grad=True)
    ctx = causal_context(1, length)
    module = SimpleNamespace(training=True, config=None)
    opts = SimpleNamespace(form="blocks", **BLOCKS, logit_scale="none")
    out, _ = attend(module, query, key, value, ctx, opts, 0.3, 0.0)
    keep = _loop_selection(query[0].detach(), key[0].detach(), **BLOCKS)
    assert not torch.equal(keep, ctx.visible[0].expand_as(keep)), "the budget must leave blocks out"
    expected, _ = masked_attention(query, key, value, keep[None], 0.3)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def _training_model(model_type="llama", **options):
    return tiny_model(model_type, "lighthouse", EXACT_INDEXER.get(model_type), **options).train()


def test_pyramid_model_with_a_covering_budget_equals_dense_training():
    ids = token_batch(2, 40)
    model = _training_model(**PYRAMID | dict(budget=64))
    out = logits(model, ids)
    hf_attn_plus.set_attention(model, "sdpa")
    torch.testing.assert_close(out, logits(model, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", PLAIN_WITHOUT_WINDOW)
def test_pyramid_training_is_padding_invariant(model_type):
    assert_padding_invariant(_training_model(model_type, **PYRAMID), length=30, pad=7)


@pytest.mark.parametrize("model_type, scatter", [("llama", "latest"), ("deepseek_v3", "latest"), ("llama", "sum")])
def test_pyramid_training_steps_stay_finite(model_type, scatter):
    model = _training_model(model_type, **PYRAMID, scatter=scatter)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = token_batch(2, 40)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        attention = [p.grad for name, p in model.named_parameters() if ".self_attn." in name and p.grad is not None]
        assert attention and all(torch.isfinite(grad).all() for grad in attention)
        assert sum(grad.abs().sum() for grad in attention) > 0
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("model_type", PLAIN_WITHOUT_WINDOW)
def test_blocks_form_is_causal_padding_invariant_and_trains(model_type):
    model = _training_model(model_type, form="blocks", **BLOCKS)
    ids = token_batch(1, 40)
    changed = ids.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % 128
    torch.testing.assert_close(logits(model, ids)[:, :30], logits(model, changed)[:, :30], atol=1e-5, rtol=1e-4)
    assert_padding_invariant(model, length=30, pad=7)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.o_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("form", ["pyramid", "blocks"])
def test_inference_hands_over_to_the_named_mechanism(form):
    options = dict(form=form, **(PYRAMID if form == "pyramid" else BLOCKS))
    ids = token_batch(2, 24)
    handover = dict(budget=2, window=2, sinks=1)
    model = tiny_model("llama", "lighthouse", **options, inference="topk", inference_options=handover).eval()
    out = logits(model, ids)
    training_out = logits(model.train(), ids)
    model.eval()
    hf_attn_plus.set_attention(model, "topk", **handover)
    torch.testing.assert_close(out, logits(model, ids))
    assert not torch.allclose(out, training_out, atol=1e-4), "training and inference attention differ here"
    hf_attn_plus.set_attention(model, "lighthouse", **options)  # inference='dense' by default
    dense = logits(model, ids)
    hf_attn_plus.set_attention(model, "sdpa")
    torch.testing.assert_close(dense, logits(model, ids), atol=1e-5, rtol=1e-4)


def test_bad_options_are_named():
    model = tiny_model("llama", "lighthouse")
    with pytest.raises(hf_attn_plus.OptionError, match="form.*'tree'.*'pyramid', 'blocks'"):
        hf_attn_plus.set_attention(model, "lighthouse", form="tree")
    with pytest.raises(hf_attn_plus.OptionError, match="inference.*'nope'.*'dense' or the name of a registered"):
        hf_attn_plus.set_attention(model, "lighthouse", inference="nope")
    with pytest.raises(hf_attn_plus.OptionError, match="inference.*'lighthouse'"):
        hf_attn_plus.set_attention(model, "lighthouse", inference="lighthouse")
    hf_attn_plus.set_attention(model, "lighthouse", inference="topk", inference_options={"budgett": 3})
    with pytest.raises(hf_attn_plus.OptionError, match="'lighthouse': options for 'topk'.*'budgett'"):
        logits(model.eval(), token_batch(1, 8))
