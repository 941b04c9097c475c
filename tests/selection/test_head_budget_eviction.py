"""head_budget with a fallback that evicts (DuoAttention's decode memory): in cached inference the KV groups whose
gates are all 0 keep only sinks + window, the other groups every key, and every token equals the run that keeps
every key (greedy, beams, sampling, padded batches, multi-token steps, crop) on every supported architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_attn_plus
from core.models import left_pad, token_batch
from hf_attn_plus.mechanisms.head_budget import HeadGateWeights, evicted_groups
from hf_attn_plus.patches.streaming_cache import GroupEvictingLayer
from hf_attn_plus.tiny import tiny_config

from .test_head_budget import ARCHS

WINDOW, SINKS, BUDGET = 6, 2, 0.5


def duo_options(evict: bool, budget: float = BUDGET) -> dict:
    return dict(inner="dense", fallback="sliding_window", fallback_options=dict(window=WINDOW, sinks=SINKS, evict=evict),
                budget=budget)


def duo_model(arch: str = "llama", evict: bool = True, budget: float = BUDGET) -> torch.nn.Module:
    """Layer 0: the first KV group off, the others' gates 0.9 (mixed); every later layer: every group off."""
    torch.manual_seed(0)
    config = tiny_config(arch, num_hidden_layers=2, hf_attn_plus=duo_options(evict, budget))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hf_attn_plus:head_budget").eval()
    with torch.no_grad():
        for gate in (m for m in model.modules() if isinstance(m, HeadGateWeights)):
            slope = torch.full_like(gate.steepness, 0.2)  # g = 1 - (1 - b) * softplus(theta): 0.9 at b = 0.5
            slope[: slope.numel() // gate.shape.kv_heads if gate.layer_idx == 0 else None] = 4.0  # g = 0
            gate.steepness.copy_(slope + torch.log(-torch.expm1(-slope)))
    return model


def padded_prompts():
    return left_pad([token_batch(1, 11, seed=3)[0], token_batch(1, 7, seed=4)[0]])[:2]


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch != "deepseek_v3"])
def test_evicted_groups_keep_sinks_and_window_and_tokens_equal_keeping_every_key(arch):
    """Greedy decode of 4x the window, step by step: each step's logits equal the run keeping every key; the evicted
    groups hold head + window slots from the second step on, the kept groups every token."""
    ids, mask = padded_prompts()
    head = int((1 - mask).sum(-1).max()) + SINKS
    runs = {}
    for evict in (False, True):
        model = duo_model(arch, evict)
        cache, step_ids, step_mask, logits, held = DynamicCache(config=model.config), ids, mask, [], []
        with torch.no_grad():
            for _ in range(4 * WINDOW):
                out = model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                step_ids = out.logits[:, -1:].argmax(-1)
                step_mask = torch.cat((step_mask, torch.ones_like(step_ids)), dim=-1)
                layers = [layer for layer in cache.layers if isinstance(layer, GroupEvictingLayer)]
                held.append([(layer.streaming.keys.shape[2], layer.keys.shape[2]) for layer in layers])
        runs[evict] = logits, held, cache
    for got, want in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layers = [layer for layer in runs[True][2].layers if isinstance(layer, GroupEvictingLayer)]
    # Layers with the model's own window keep their own (already bounded) cache; every other layer splits.
    full_layers = [not type(layer).__name__.startswith("DynamicSliding") for layer in runs[False][2].layers]
    assert len(layers) == sum(full_layers) >= 1
    for step, row in enumerate(runs[True][1][1:], start=1):
        assert all(streaming == head + WINDOW and kept == mask.shape[1] + step for streaming, kept in row), (step, row)
    for index, layer in enumerate(runs[True][2].layers):  # layer 0 evicts its first group, layer 1 every group
        if isinstance(layer, GroupEvictingLayer):
            assert layer.kept_groups.numel() == (layer.evicted.numel() - 1 if index == 0 else 0)
    assert runs[True][2].get_seq_length() == runs[False][2].get_seq_length()  # positions count every token


@pytest.mark.parametrize(
    "search",
    [dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20, num_return_sequences=2)],
)
def test_generate_equals_keeping_every_key(search):
    ids, mask = padded_prompts()
    runs = []
    for evict in (False, True):
        model = duo_model(evict=evict)
        torch.manual_seed(5)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=4 * WINDOW, **search))
    assert torch.equal(runs[0], runs[1])


def test_multi_token_steps_and_crop():
    """Several new tokens per call read the evicted groups' keys across the gap; crop rolls back both parts and
    refuses a rollback that would need an evicted key."""
    ids = token_batch(1, 5 * WINDOW, seed=2)
    model = duo_model()
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        pieces = [model(ids[:, lo : lo + 5], past_key_values=cache, use_cache=True).logits for lo in range(0, ids.shape[1], 5)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
        layer = cache.layers[0]
        assert isinstance(layer, GroupEvictingLayer) and layer.streaming.evicted > 0
        cache.crop(-3)
        assert layer.keys.shape[2] == ids.shape[1] - 3 and cache.get_seq_length() == ids.shape[1] - 3
        again = model(ids[:, -3:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(again, full[:, -3:], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cannot remove 8 tokens; .* evicted"):
            cache.crop(-8)


def test_memory_held_is_that_of_the_kept_groups_plus_a_window():
    ids, mask = padded_prompts()
    held = {}
    for evict in (False, True):
        out = duo_model(evict=evict).generate(ids, attention_mask=mask, max_new_tokens=4 * WINDOW, do_sample=False,
                                              return_dict_in_generate=True)
        held[evict] = [layer for layer in out.past_key_values.layers]
    tokens = held[False][0].keys.shape[2]
    per_slot = held[False][0].keys[:, :1, :1].numel() + held[False][0].values[:, :1, :1].numel()  # one group, one slot
    groups = held[False][0].keys.shape[1]
    head = int((1 - mask).sum(-1).max()) + SINKS
    for layer in held[True]:
        evicted = layer.evicted_groups.numel()
        # The last update added one slot after evicting down to head + window - 1.
        assert layer.memory_elements() == per_slot * ((groups - evicted) * tokens + evicted * (head + WINDOW))


def test_no_eviction_where_no_group_is_off_or_the_fallback_keeps_every_key():
    model = duo_model(budget=1.0)  # every gate 1
    out = model.generate(token_batch(1, 8), max_new_tokens=2 * WINDOW, do_sample=False, return_dict_in_generate=True)
    assert all(type(layer).__name__ == "DynamicLayer" for layer in out.past_key_values.layers)
    attention = duo_model(evict=False).model.layers[0].self_attn
    opts = hf_attn_plus.registry.options_from_config(hf_attn_plus.registry.get_mechanism("head_budget"), attention.config)
    assert evicted_groups(attention, opts) is None
    hf_attn_plus.set_attention(attention_model := duo_model(), "head_budget", **duo_options(True), dense_first=1)
    out = attention_model.generate(token_batch(1, 8), max_new_tokens=2 * WINDOW, do_sample=False, return_dict_in_generate=True)
    assert [type(layer).__name__ for layer in out.past_key_values.layers] == ["DynamicLayer", "GroupEvictingLayer"]


def test_changing_the_gates_or_budget_on_a_filled_cache_is_refused():
    model = duo_model()
    cache = DynamicCache(config=model.config)
    ids = token_batch(1, 8)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        gates = model.model.layers[0].self_attn.attn_plus
        gates.steepness.fill_(10.0)  # layer 0: every group off now
        with pytest.raises(ValueError, match=r"cache layer 0 is GroupEvictingLayer evicting groups \[True, False\].*"
                                             r"this call evicts groups \[True, True\]"):
            model(ids[:, :1], past_key_values=cache, use_cache=True)
        hf_attn_plus.set_attention(model, "head_budget", **duo_options(True, budget=1.0))  # no group off
        with pytest.raises(ValueError, match=r"cache layer 0 keeps only some KV groups' keys \(groups \[0\] evicted\)"):
            model(ids[:, :1], past_key_values=cache, use_cache=True)


def test_mla_caches_one_latent_for_every_head_and_refuses_per_group_eviction():
    model = duo_model("deepseek_v3")
    with pytest.raises(ValueError, match="caches one MLA latent per token for every head; allowed here: evict=False"):
        model.generate(token_batch(1, 8), max_new_tokens=2, do_sample=False)
    hf_attn_plus.set_attention(model, "head_budget", **duo_options(False))
    model.generate(token_batch(1, 8), max_new_tokens=2, do_sample=False)
