"""santa's estimator: unbiased importance weights, a mean output that converges to dense attention, variance that
falls with the sample budget, exactness when the budget covers the context; decode-only sampling in tiny models.

Independent draws come from query heads: S query heads share one KV head and one query vector, and the counter-based
draws differ per head, so one call yields S independent estimates with fixed seeds."""

from types import SimpleNamespace

import pytest
import torch

import hf_attn_plus
from hf_attn_plus.chunked_attention import selected_attention
from hf_attn_plus.masking import build_context, visible_from_mask
from hf_attn_plus.mechanisms.santa import estimate, quantize
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.structure import Selection, dense_keep
from core.models import MODEL_TYPES, own_attention, token_batch

from .selection_helpers import EXACT_INDEXER, assert_decode_padding_invariant, decode_logits, logits, tiny_model

KV, STREAMS, SCALING = 64, 4000, 0.25


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    query = (torch.randn(1, 1, 1, 16, generator=g) * 1.5).expand(1, STREAMS, 1, 16)
    key, value = torch.randn(1, 1, KV, 16, generator=g), torch.randn(1, 1, KV, 8, generator=g)
    ctx = build_context(visible_from_mask(None, 1, 1, KV, torch.device("cpu")))
    return query, key, value, ctx


def importance_weights(selection, ctx):
    """a_s of every key [B, H, q, kv]: 1 where the rule reads exactly, the listed keys' exp(log-weight), 0 elsewhere
    (the estimate as the dense weights of its definition)."""
    exact = dense_keep(ctx, Selection(selection.rule)).double()
    kv_len = exact.shape[-1]
    slots = torch.where(selection.tokens >= 0, selection.tokens + ctx.key_start.view(-1, 1, 1, 1), kv_len)
    listed = torch.zeros(*slots.shape[:3], kv_len + 1, dtype=torch.float64)
    listed.scatter_add_(-1, slots, torch.where(selection.tokens >= 0, selection.log_weights.double().exp(), 0.0))
    return exact + listed[..., :kv_len]


def _estimates(samples, bits=4, seed=0):
    query, key, value, ctx = _problem()
    opts = SimpleNamespace(samples=samples, window=2, sinks=1, bits=bits, seed=seed)
    selection = estimate(query, key, ctx, opts, SCALING, layer=0)
    out = selected_attention(query, key, value, ctx, selection, SCALING)
    weights = importance_weights(selection, ctx)
    # The reference is the self-normalised estimator of its definition: masked softmax with log a_s.
    log_weights = weights.log().float()
    expected, _ = masked_attention(query, key, value, weights > 0, SCALING, None, 0.0, log_weights)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    dense, _ = masked_attention(query[:, :1], key, value, ctx.visible, SCALING)
    return weights[0, :, 0], out[0, :, 0], dense[0, 0, 0]


def test_importance_weights_are_unbiased():
    # E[a_s] = 1 for every key makes the numerator and the normaliser unbiased for any values.
    samples = 8
    weights, _, _ = _estimates(samples)
    exact = torch.tensor([True] + [False] * (KV - 3) + [True, True])  # sink 0, window KV-2, KV-1
    assert torch.equal(weights[:, exact], torch.ones_like(weights[:, exact]))
    query, key, _, ctx = _problem()
    quantised_logits = query[0, 0, 0] @ quantize(key[0, 0], 4).T * SCALING
    proposal = torch.softmax(quantised_logits[~exact].double(), -1)
    expected_draws = samples * proposal * STREAMS
    well_sampled = expected_draws >= 10  # where the count is close enough to normal for a z-score
    z = (weights[:, ~exact].mean(0) - 1) / ((1 - proposal) / expected_draws).sqrt()
    assert well_sampled.sum() >= 20
    # Bonferroni over <= 61 keys: |z| < 5 fails by chance with probability < 1e-4 (fixed seeds: deterministic).
    assert z[well_sampled].abs().max() < 5


def test_mean_output_converges_to_dense():
    _, out, dense = _estimates(samples=8)
    standard_error = out.std(0) / STREAMS**0.5
    # Tolerance: 5 standard errors plus 0.01 for the O(1/samples) bias of the ratio (about 0.003 here, measured).
    assert ((out.mean(0) - dense).abs() <= 5 * standard_error + 0.01).all()


def test_ratio_bias_shrinks_with_samples_under_a_poor_proposal():
    # 2-bit keys give a poor proposal, which makes the self-normalised ratio's bias visible: it falls about as 1/n.
    errors = [(out.mean(0) - dense).abs().max() for _, out, dense in (_estimates(n, bits=2) for n in (2, 8, 32))]
    assert errors[0] > 2 * errors[1] > 4 * errors[2]


def test_variance_falls_as_samples_grow():
    variances = [_estimates(n)[1].var(0).mean() for n in (2, 8, 32)]
    # Importance sampling variance is about proportional to 1/samples: each 4x more samples must cut it 3x.
    assert variances[0] > 3 * variances[1] > 9 * variances[2]


def test_budget_covering_context_is_dense():
    _, out, dense = _estimates(samples=KV - 3)
    torch.testing.assert_close(out, dense.expand_as(out), atol=1e-6, rtol=1e-5)


def test_seed_fixes_the_draws():
    assert torch.equal(_estimates(8, seed=3)[0], _estimates(8, seed=3)[0])
    assert not torch.equal(_estimates(8, seed=3)[0], _estimates(8, seed=4)[0])


def test_prefill_is_exact_dense():
    ids = token_batch(2, 12)
    model = tiny_model("llama", "santa", samples=1, window=1, sinks=0)
    sampled = logits(model, ids)
    hf_attn_plus.set_attention(model, "sdpa")
    torch.testing.assert_close(sampled, logits(model, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tiny_model_decode(model_type):
    ids = token_batch(1, 30)
    small = dict(samples=2, window=2, sinks=1, seed=1)
    model = tiny_model(model_type, "santa", EXACT_INDEXER.get(model_type), **small)
    sampled = decode_logits(model, ids)
    assert_decode_padding_invariant(model)
    hf_attn_plus.set_attention(model, "santa", samples=64, window=2, sinks=1)
    covered = decode_logits(model, ids)
    hf_attn_plus.set_attention(model, own_attention(model.config))
    dense = decode_logits(model, ids)
    torch.testing.assert_close(covered, dense, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(sampled, dense, atol=1e-4), "2 samples out of ~27 keys must change the output"


def test_cached_decode_quantises_only_new_keys(monkeypatch):
    """The quantised keys are the layer's side state: the first decode step quantises the whole cache, every later
    step its one new key, and the held int8 codes dequantise to exactly what quantising every key gives."""
    from hf_attn_plus.mechanisms import santa

    model = tiny_model("llama", "santa", samples=2, window=2, sinks=1, seed=1)
    quantised = []
    quantize_codes = santa.quantize_codes

    def counting(key, bits):
        quantised.append(key.shape[2])
        return quantize_codes(key, bits)

    monkeypatch.setattr(santa, "quantize_codes", counting)
    ids = token_batch(1, 20)
    out = model.generate(
        ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    layers = model.config.num_hidden_layers
    assert quantised == [21] * layers + [1] * 2 * layers  # prefill is dense; three decode steps
    monkeypatch.setattr(santa, "quantize_codes", quantize_codes)
    for layer in out.past_key_values.layers:
        state = layer.side["santa:bits=4"]
        assert state._codes.value.dtype == torch.int8
        assert torch.equal(state.dequantized(), quantize(layer.keys.float(), 4))


def test_bits_beyond_int8_codes_are_refused():
    model = tiny_model("llama", "santa")
    with pytest.raises(hf_attn_plus.OptionError, match="'bits' got 9; allowed: an integer >= 2 and <= 8"):
        hf_attn_plus.set_attention(model, "santa", bits=9)


def test_logit_scale_counts_every_visible_key():
    """beta stands for dense attention over the context: it counts the keys the query sees, not the keys read."""
    from hf_attn_plus.mechanisms import santa
    from hf_attn_plus.reference import length_scale

    query, key, value, ctx = _problem()
    scaled = dict(logit_scale="log", logit_scale_c=0.5, train_length=8, backend="reference")
    opts = SimpleNamespace(samples=8, window=2, sinks=1, bits=4, seed=0, **scaled)
    out, _ = santa.attend(SimpleNamespace(layer_idx=0, config=None), query, key, value, ctx, opts, SCALING, 0.0)
    weights = importance_weights(estimate(query, key, ctx, opts, SCALING, layer=0), ctx)
    beta = length_scale(torch.tensor([[float(KV)]]), 8, 0.5)
    expected, _ = masked_attention(query, key, value, weights > 0, SCALING, beta, 0.0, weights.log().float())
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    unscaled, _ = masked_attention(query, key, value, weights > 0, SCALING, None, 0.0, weights.log().float())
    assert not torch.allclose(out, unscaled, atol=1e-3)
