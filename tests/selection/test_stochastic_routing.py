from types import SimpleNamespace

import pytest
import torch

import hf_attn_plus
from hf_attn_plus.mechanisms.stochastic_routing import routing_graph, set_step
from hf_attn_plus.options import OptionError
from hf_attn_plus.structure import dense_keep
from core.models import MODEL_TYPES, token_batch

from .selection_helpers import (
    EXACT_INDEXER,
    assert_cached_equals_uncached,
    assert_padding_invariant,
    causal_context,
    logits,
    tiny_model,
)


def graph_keep(ctx, heads, opts, layer, step=None):
    """The routing graph as a keep mask [B, heads, q, kv] (the oracle form of its Selection)."""
    return dense_keep(ctx, routing_graph(ctx, heads, opts, layer, step), heads)


def _opts(**given):
    return SimpleNamespace(**{"window": 4, "links": 3, "sinks": 0, "seed": 0, **given})


def test_graph_has_stated_degree_and_locality():
    length, heads, window, links = 40, 4, 4, 3
    ctx = causal_context(1, length)
    keep = graph_keep(ctx, heads, _opts(window=window, links=links), layer=0)[0]
    t = torch.arange(length).view(1, -1, 1)
    s = torch.arange(length).view(1, 1, -1)
    assert not (keep & (s > t)).any(), "a link into the future"
    assert (keep | (t - s >= window) | (s > t)).all(), "a local neighbour is missing"
    far_links = (keep & (t - s >= window)).sum(-1)
    expected = (t[..., 0] - window + 1).clamp(0, links).expand(heads, -1)
    assert torch.equal(far_links, expected)
    # Heads draw their own links.
    assert not torch.equal(keep[0, window + links :], keep[1, window + links :])


def test_links_are_uniform_over_the_far_keys():
    # Far keys of query t are 0..t-window; the mean drawn position over many (head, t) must be the middle.
    length, window, links = 200, 4, 8
    keep = graph_keep(causal_context(1, length), 16, _opts(window=window, links=links), layer=0)[0]
    t = torch.arange(length).view(-1, 1)
    s = torch.arange(length).view(1, -1)
    far = keep & (t - s >= window)
    relative = torch.where(far, s / (t - window).clamp(min=1), 0.0)
    mean = relative[:, 100:].sum() / far[:, 100:].sum()
    # 16 heads x 100 queries x 8 links of ~Uniform(0,1): standard error 0.0032; 0.02 is > 6 sigma.
    assert abs(mean - 0.5) < 0.02


def test_seed_fixes_the_graph_and_layers_differ():
    ctx = causal_context(1, 30)
    graph = lambda seed, layer: graph_keep(ctx, 2, _opts(seed=seed), layer)
    assert torch.equal(graph(0, 0), graph(0, 0))
    assert not torch.equal(graph(0, 0), graph(1, 0))
    assert not torch.equal(graph(0, 0), graph(0, 1))


def test_no_links_is_the_window():
    ctx = causal_context(1, 12)
    assert torch.equal(graph_keep(ctx, 2, _opts(window=3, links=0), 0), (ctx.visible & (ctx.distance < 3)).expand(-1, 2, -1, -1))


def test_budget_covering_context_is_dense():
    ctx = causal_context(2, 12)
    assert torch.equal(graph_keep(ctx, 2, _opts(window=3, links=12), 0), ctx.visible.expand(-1, 2, -1, -1))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tiny_models_cached_and_padding_invariant(model_type):
    options = dict(window=3, links=2, seed=5)
    model = tiny_model(model_type, "stochastic_routing", EXACT_INDEXER.get(model_type), **options)
    assert_padding_invariant(model, length=30, pad=7)
    assert_cached_equals_uncached(model)


def test_same_seed_same_output_different_seed_different_output():
    ids = token_batch(1, 24)
    model = tiny_model("llama", "stochastic_routing", window=2, links=2, seed=1)
    first = logits(model, ids)
    hf_attn_plus.set_attention(model, "stochastic_routing", window=2, links=2, seed=2)
    other = logits(model, ids)
    hf_attn_plus.set_attention(model, "stochastic_routing", window=2, links=2, seed=1)
    assert torch.equal(first, logits(model, ids))
    assert not torch.allclose(first, other)


def test_resample_draws_a_graph_per_training_step():
    model = tiny_model("llama", "stochastic_routing", window=2, links=2, resample=True)
    ids = token_batch(1, 24)
    model.train()
    run = lambda: model(input_ids=ids).logits.detach()
    set_step(model, 0)
    first = run()
    assert torch.equal(first, run())
    set_step(model, 1)
    assert not torch.allclose(first, run())
    model.eval()
    evaluated = run()
    set_step(model, 7)
    assert torch.equal(evaluated, run()), "evaluation must use the base seed"


def test_bad_options_are_named():
    model = tiny_model("llama", "stochastic_routing")
    with pytest.raises(OptionError, match="resample.*True or False"):
        hf_attn_plus.set_attention(model, "stochastic_routing", resample=1)
    with pytest.raises(OptionError, match="links"):
        hf_attn_plus.set_attention(model, "stochastic_routing", links=-1)
