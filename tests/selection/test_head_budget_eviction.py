"""head_budget with a fallback that evicts (DuoAttention's decode memory): in cached inference the KV groups whose
gates are all 0 keep only sinks + window, the other groups every key, and every token equals the run that keeps
every key (greedy, beams, sampling, padded batches, multi-token steps, crop) on every supported architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_attn_plus
from core.eviction_checks import (
    SEARCHES,
    assert_generate_equals_keeping_every_key,
    assert_multi_token_steps_and_crop,
    greedy_steps,
    padded_prompts,
)
from core.models import token_batch
from hf_attn_plus.mechanisms.head_budget import HeadGateWeights
from hf_attn_plus.patches.streaming_cache import GroupEvictingLayer
from hf_attn_plus.tiny import tiny_config

from .test_head_budget import ARCHS

WINDOW, SINKS, BUDGET = 6, 2, 0.5


def duo_options(evict: bool, budget: float = BUDGET) -> dict:
    fallback_options = dict(window=WINDOW, sinks=SINKS, evict=evict)
    return dict(inner="dense", fallback="sliding_window", fallback_options=fallback_options, budget=budget)


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


@pytest.mark.parametrize("arch", [arch for arch in ARCHS if arch != "deepseek_v3"])
def test_evicted_groups_keep_sinks_and_window_and_tokens_equal_keeping_every_key(arch):
    """Greedy decode of 4x the window, step by step: each step's logits equal the run keeping every key; the evicted
    groups hold head + window slots from the second step on, the kept groups every token."""
    ids, mask = padded_prompts()
    head = int((1 - mask).sum(-1).max()) + SINKS
    def held(cache):
        layers = [layer for layer in cache.layers if isinstance(layer, GroupEvictingLayer)]
        return [(layer.streaming.keys.shape[2], layer.keys.shape[2]) for layer in layers]

    runs = {evict: greedy_steps(duo_model(arch, evict), 4 * WINDOW, held) for evict in (False, True)}
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


@pytest.mark.parametrize("search", SEARCHES)
def test_generate_equals_keeping_every_key(search):
    assert_generate_equals_keeping_every_key(lambda evict: duo_model(evict=evict), search, 4 * WINDOW)


def test_multi_token_steps_and_crop():
    """Several new tokens per call read the evicted groups' keys across the gap; crop rolls back both parts."""
    ids = token_batch(1, 5 * WINDOW, seed=2)
    cache = assert_multi_token_steps_and_crop(duo_model(), ids, lambda cache: cache.layers[0].streaming.evicted)
    layer = cache.layers[0]
    assert isinstance(layer, GroupEvictingLayer) and layer.keys.shape[2] == ids.shape[1]  # crop, then 3 again
    assert cache.get_seq_length() == ids.shape[1]


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


def cache_layer_types(model) -> list[str]:
    out = model.generate(token_batch(1, 8), max_new_tokens=2 * WINDOW, do_sample=False, return_dict_in_generate=True)
    return [type(layer).__name__ for layer in out.past_key_values.layers]


def test_only_groups_off_in_layers_the_mechanism_runs_in_are_evicted():
    assert cache_layer_types(duo_model(budget=1.0)) == ["DynamicLayer"] * 2  # every gate 1: no group is off
    assert cache_layer_types(duo_model(evict=False)) == ["DynamicLayer"] * 2  # the fallback keeps every key
    model = duo_model()
    hf_attn_plus.set_attention(model, "head_budget", **duo_options(True), dense_first=1)  # layer 0 runs SDPA
    assert cache_layer_types(model) == ["DynamicLayer", "GroupEvictingLayer"]


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
