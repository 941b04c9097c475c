"""The gathered-attention kernel (Triton forward, run by the interpreter on CPU) against its PyTorch reference and
against exact masked attention over the same key set; the linear-time link draw; both mechanisms' kernel backend
against their reference backend in tiny models."""

from types import SimpleNamespace

import pytest
import torch

import hf_attn_plus
from hf_attn_plus.kernels.gathered_attention.function import gathered_attention
from hf_attn_plus.kernels.gathered_attention.reference import gathered_attention_reference
from hf_attn_plus.kernel_inputs import fixed_spans, position_slots, visibility
from hf_attn_plus.masking import AttentionContext, build_context
from hf_attn_plus.chunked_attention import selected_attention
from hf_attn_plus.mechanisms.santa import estimate, sampled_slots
from hf_attn_plus.mechanisms.stochastic_routing import link_positions, routing_graph
from hf_attn_plus.options import OptionError
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.selection import random_links
from hf_attn_plus.structure import dense_keep
from core.models import left_pad, token_batch
from tests.kernels.kernel_cases import attention_inputs

from .selection_helpers import tiny_model

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3)}
GRAD_TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def graph_keep(ctx, heads, opts, layer, step=None):
    """The routing graph as a keep mask [B, heads, q, kv] (the oracle form of its Selection)."""
    return dense_keep(ctx, routing_graph(ctx, heads, opts, layer, step), heads)


def padded_context(batch: int, length: int, padding: str, new: int | None = None):
    """Causal visibility of `batch` rows, the last one shorter by 6 tokens padded on `padding`'s side, as
    transformers' SDPA mask gives it; `new`: only the last `new` queries (a cached step)."""
    valid = torch.ones(batch, length, dtype=torch.bool)
    if padding == "left":
        valid[-1, :6] = False
    elif padding == "right":
        valid[-1, -6:] = False
    visible = (torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, :])[:, None]
    return build_context(visible if new is None else visible[:, :, -new:])


CASES = [  # (query heads per KV head, dtype, (q/k head dim, v head dim), padding, length, new queries)
    (1, torch.float32, (64, 64), "left", 23, None),
    (2, torch.float16, (64, 64), "right", 17, None),
    (4, torch.float32, (12, 8), "left", 19, None),
    (2, torch.float32, (12, 8), "right", 21, None),
    (4, torch.float16, (12, 8), "left", 29, 1),
    (1, torch.float32, (64, 64), "none", 25, 3),
]


@pytest.mark.parametrize("group,dtype,dims,padding,length,new", CASES)
def test_kernel_equals_reference_and_masked_attention(group, dtype, dims, padding, length, new):
    ctx = padded_context(2, length, padding, new)
    opts = SimpleNamespace(window=4, links=3, sinks=2, seed=7)
    kv_heads = 2
    q_len = ctx.query_pos.shape[2]
    query, key, value = attention_inputs(2, kv_heads * group, kv_heads, q_len, length, *dims, dtype, requires_grad=True)
    spans = fixed_spans(ctx, opts.sinks, opts.window)
    slots = position_slots(ctx, link_positions(ctx, kv_heads * group, opts, layer=1))
    keep = graph_keep(ctx, kv_heads * group, opts, layer=1)
    out = gathered_attention(query, key, value, visibility(ctx), spans, slots, 0.3)
    truth = masked_attention(query, key, value, keep, 0.3)[0]
    torch.testing.assert_close(out, truth, **TOLERANCE[dtype])
    reference = gathered_attention_reference(query, key, value, visibility(ctx), spans, slots, None, 0.3)
    torch.testing.assert_close(out, reference, **TOLERANCE[dtype])
    grad = torch.randn_like(truth)
    for got, want in zip(torch.autograd.grad(out, (query, key, value), grad), torch.autograd.grad(truth, (query, key, value), grad)):
        torch.testing.assert_close(got, want, **GRAD_TOLERANCE[dtype])


def test_log_weights_and_repeated_slots():
    """A slot listed c times with log-weight w counts as one key with weight c·exp(w) (santa's duplicate draws)."""
    ctx = padded_context(2, 15, "left", new=2)
    inputs = attention_inputs(2, 4, 2, 2, 15, 16, 16, torch.float32, requires_grad=True)
    query, key, value = inputs
    spans = fixed_spans(ctx, 1, 2)
    positions = torch.tensor([3, 3, 5, -1]).expand(2, 4, 2, 4)
    slots = position_slots(ctx, positions)
    log_weights = torch.randn(2, 4, 2, 4)
    out = gathered_attention(query, key, value, visibility(ctx), spans, slots, 0.5, log_weights)
    reference = gathered_attention_reference(query, key, value, visibility(ctx), spans, slots, log_weights, 0.5)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, grad, retain_graph=True), torch.autograd.grad(reference, inputs, grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # The same estimate as one weight per key, through masked attention.
    dense_weights = torch.full((2, 4, 2, 15), float("-inf"))
    dense_weights.scatter_(-1, slots[..., :1].long(), (log_weights[..., :1].exp() + log_weights[..., 1:2].exp()).log())
    dense_weights.scatter_(-1, slots[..., 2:3].long(), log_weights[..., 2:3])
    fixed = torch.zeros(2, 1, 2, 15, dtype=torch.bool)
    for b in range(2):
        for t in range(2):
            for lo, hi in (spans[b, t, :2].tolist(), spans[b, t, 2:].tolist()):
                fixed[b, 0, t, lo:hi] = True
    dense_weights = torch.where(fixed, 0.0, dense_weights)
    keep = (dense_weights > float("-inf")) & ctx.visible
    torch.testing.assert_close(out, masked_attention(query, key, value, keep, 0.5, log_weights=dense_weights)[0])


def _at(query_pos: torch.Tensor) -> AttentionContext:
    """A context with only query positions (all the link draw reads)."""
    return AttentionContext(key_pos=query_pos[:, :, :1], query_pos=query_pos)


def test_links_are_beyond_the_window_distinct_and_as_many_as_asked():
    sinks, window, links, heads = 2, 5, 4, 8
    t = torch.arange(-1, 40).view(1, 1, -1, 1)  # -1: a query that sees nothing
    drawn = random_links(_at(t), heads, sinks, window, links, seed=3, layer=2)[0]
    far = (t[0, :, :, 0] - window - sinks + 1).clamp(min=0)  # number of far keys per query
    used = drawn >= 0
    assert torch.equal(used.sum(-1), far.clamp(max=links).expand(heads, -1))
    top = t[0, :, :, 0].unsqueeze(-1) - window
    assert ((drawn >= sinks) & (drawn <= top) | ~used).all(), "a link inside the window, on a sink or in the future"
    ranked = drawn.sort(-1).values
    assert not ((ranked[..., 1:] == ranked[..., :-1]) & (ranked[..., :-1] >= 0)).any(), "a key drawn twice"


def test_links_have_uniform_marginals():
    # 20 far keys, 5 links: every far key is linked with probability 1/4. 4000 heads are 4000 independent draws
    # (the hash differs per head); per key the count is Binomial(4000, 1/4): mean 1000, sd 27.4. Bonferroni over
    # 20 keys x 2 layers: max |z| < 5 fails by chance with probability < 3e-5 (fixed seeds: deterministic).
    sinks, window, links, heads = 1, 3, 5, 4000
    t = torch.tensor(sinks + window + 19).view(1, 1, 1, 1)
    for layer in range(2):
        drawn = random_links(_at(t), heads, sinks, window, links, seed=0, layer=layer)[0, :, 0]
        counts = torch.bincount(drawn.flatten() - sinks, minlength=20).double()
        z = (counts - heads / 4) / (heads * 0.25 * 0.75) ** 0.5
        assert counts.sum() == heads * links and z.abs().max() < 5


def test_santa_kernel_estimate_equals_reference():
    g = torch.Generator().manual_seed(0)
    query = (torch.randn(1, 2, 1, 16, generator=g) * 1.5).repeat_interleave(32, 1)  # 32 streams per KV head
    key, value = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    ctx = padded_context(1, 40, "none", new=1)
    for seed, samples in ((0, 6), (1, 6), (2, 36)):  # 36 > the 35 other keys: R read exactly
        opts = SimpleNamespace(samples=samples, window=3, sinks=2, bits=4, seed=seed)
        reference = selected_attention(query, key, value, ctx, estimate(query, key, ctx, opts, 0.25, layer=0), 0.25)
        slots, listed_weights = sampled_slots(query, key, ctx, opts, 0.25, layer=0)
        spans = fixed_spans(ctx, opts.sinks, opts.window)
        out = gathered_attention(query, key, value, visibility(ctx), spans, slots, 0.25, listed_weights)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


def _left_padded(length=12, pad=4):
    full, other = token_batch(2, length)
    ids, mask, _ = left_pad([full, other[pad:]])
    return ids, mask


ONE_LAYER = dict(num_hidden_layers=1)
MODEL_OPTIONS = {
    "stochastic_routing": dict(window=3, links=2, sinks=1, seed=3),
    "santa": dict(samples=3, window=2, sinks=1, seed=1),
}


@pytest.mark.parametrize(
    "model_type,name",
    [
        ("llama", "stochastic_routing"),
        ("qwen3", "stochastic_routing"),
        ("deepseek_v3", "stochastic_routing"),
        ("deepseek_v32", "stochastic_routing"),
        ("qwen3", "santa"),
    ],
)
def test_models_kernel_backend_equals_reference(model_type, name):
    """Left-padded prefill logits and greedy cached generation (santa samples in every decode step). Llama/Qwen3:
    GQA; DeepSeek-V3: q/k head dim 12, v head dim 8. The interpreter is slow: few steps, santa on one model (its
    estimate is compared directly in test_santa_kernel_estimate_equals_reference), one layer (the draw's dependence on
    the layer is tested in test_stochastic_routing). DeepSeek-V3.2's indexer keeps 6 keys: drawn keys it hides are
    dropped by both backends."""
    model = tiny_model(model_type, name, dict(ONE_LAYER, index_topk=6) if model_type == "deepseek_v32" else ONE_LAYER)
    ids, mask = _left_padded()
    results = {}
    for backend in ("reference", "kernel"):
        hf_attn_plus.set_attention(model, name, backend=backend, **MODEL_OPTIONS[name])
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[mask.bool()]
            generated = model.generate(
                ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0,
            )
        results[backend] = logits, torch.stack(generated.logits), generated.sequences
    for got, want in zip(results["kernel"][:2], results["reference"][:2]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(results["kernel"][2], results["reference"][2])


def test_training_gradients_equal_reference_backend():
    ids, mask = _left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for backend in ("reference", "kernel"):
        model = tiny_model("qwen3", "stochastic_routing", backend=backend, resample=True, **MODEL_OPTIONS["stochastic_routing"])
        model.train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["kernel"].keys() == grads["reference"].keys()
    for n, g in grads["reference"].items():
        torch.testing.assert_close(grads["kernel"][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_forced_kernel_refuses_what_it_does_not_implement():
    model = tiny_model("llama", "stochastic_routing", backend="kernel", logit_scale="log")
    with pytest.raises(OptionError, match="'stochastic_routing': backend='kernel' does not implement logit_scale='log'"):
        model(token_batch(1, 6))
