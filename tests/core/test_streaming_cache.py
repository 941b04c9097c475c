"""sliding_window with evict=True (StreamingLLM): the cache keeps only sinks + window, its memory stays flat over a
generation many windows long, and every token equals the run without eviction (greedy, beams, sampling, padded
batches, multi-token steps, crop)."""

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import hf_attn_plus
from hf_attn_plus.attention import UnsupportedModelError
from hf_attn_plus.patches.streaming_cache import EvictingLayer
from hf_attn_plus.tiny import tiny_config

from .eviction_checks import (
    SEARCHES,
    assert_generate_equals_keeping_every_key,
    assert_multi_token_steps_and_crop,
    greedy_steps,
    padded_prompts,
)
from .models import tiny_model, token_batch, with_mechanism

WINDOW, SINKS = 6, 2


def streaming_model(arch="llama", evict=True):
    return with_mechanism(tiny_model(arch), "sliding_window", dict(window=WINDOW, sinks=SINKS, evict=evict))


def held_slots(cache: DynamicCache) -> list[int]:
    return [layer.keys.shape[2] for layer in cache.layers]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])
def test_memory_flat_and_tokens_equal_without_eviction(arch):
    """Greedy decode of 4x the window, step by step: after the first steps every layer holds the same number of
    slots (head + window), and each step's logits equal the non-evicting run's."""
    ids, mask = padded_prompts()
    head = int((1 - mask).sum(-1).max()) + SINKS
    runs = {evict: greedy_steps(streaming_model(arch, evict), 4 * WINDOW, held_slots) for evict in (False, True)}
    for got, want in zip(runs[True][0], runs[False][0]):  # the same logits, so the same greedy tokens
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    held = runs[True][1]
    assert all(isinstance(layer, EvictingLayer) for layer in runs[True][2].layers)
    assert all(h == [head + WINDOW] * len(h) for h in held[2:]), held  # flat from the second decode step on
    assert runs[False][1][-1][0] == mask.shape[1] + 4 * WINDOW - 1  # the plain cache grew with every token
    assert runs[True][2].get_seq_length() == runs[False][2].get_seq_length()  # positions keep counting every token


@pytest.mark.parametrize("search", SEARCHES)
def test_generate_equals_without_eviction(search):
    assert_generate_equals_keeping_every_key(lambda evict: streaming_model(evict=evict), search, 4 * WINDOW)


def test_multi_token_steps_and_crop():
    """Several new tokens per call (chunked prefill, speculative verification) read keys across the gap; crop
    rolls back the last call's tokens, and refuses a rollback that would need evicted keys."""
    ids = token_batch(1, 5 * WINDOW, seed=2)
    assert_multi_token_steps_and_crop(streaming_model(), ids, lambda cache: cache.layers[0].evicted)


def test_prompt_lookup_decoding_equals_greedy():
    """Assisted (prompt-lookup) decoding verifies several candidates per call and crops the rejected ones."""
    prompt = token_batch(1, 5, seed=8).repeat(1, 4)
    runs = []
    for assisted in (dict(), dict(prompt_lookup_num_tokens=3)):
        model = streaming_model()
        runs.append(model.generate(prompt, max_new_tokens=3 * WINDOW, do_sample=False, **assisted))
    assert torch.equal(runs[0], runs[1])


def test_refusals_name_what_is_wrong():
    ids = token_batch(1, 8)
    model = streaming_model()
    with pytest.raises(ValueError, match="StaticCache"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")
    # A model built from its class (no patch mapping) and switched without set_attention has no cache hooks.
    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_config("llama")).eval()
    plain.config.hf_attn_plus = dict(window=WINDOW, evict=True)
    plain.set_attn_implementation("hf_attn_plus:sliding_window")
    with pytest.raises(UnsupportedModelError, match="evict=True needs an attention class"):
        plain(ids)


def test_set_attention_patches_a_directly_built_model():
    """A model constructed from its class (no patch mapping) gets the cache hooks from set_attention."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama")).eval()
    hf_attn_plus.set_attention(model, "sliding_window", window=WINDOW, sinks=SINKS, evict=True)
    out = model.generate(token_batch(1, 8), max_new_tokens=2 * WINDOW, do_sample=False, return_dict_in_generate=True)
    assert all(isinstance(layer, EvictingLayer) and layer.evicted > 0 for layer in out.past_key_values.layers)


@pytest.mark.parametrize("dense", [dict(layers=[1]), dict(dense_first=1)], ids=["layers", "dense_first"])
def test_layers_kept_dense_keep_every_key(dense):
    """With option layers=[1] (or dense_first=1), layer 0 attends densely: its cache keeps every key; layer 1 evicts."""
    ids, mask = padded_prompts()
    runs = []
    for evict in (False, True):
        model = with_mechanism(tiny_model("llama"), "sliding_window", dict(window=WINDOW, sinks=SINKS, evict=evict, **dense))
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False,
                                   return_dict_in_generate=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    first, second = runs[1].past_key_values.layers
    assert type(first).__name__ == "DynamicLayer" and first.keys.shape[2] == runs[1].sequences.shape[1] - 1
    assert isinstance(second, EvictingLayer) and second.evicted > 0
