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

from .models import left_pad, tiny_model, token_batch, with_mechanism

WINDOW, SINKS = 6, 2


def streaming_model(arch="llama", evict=True):
    return with_mechanism(tiny_model(arch), "sliding_window", dict(window=WINDOW, sinks=SINKS, evict=evict))


def padded_prompts():
    return left_pad([token_batch(1, 11, seed=3)[0], token_batch(1, 7, seed=4)[0]])[:2]


def held_slots(cache: DynamicCache) -> list[int]:
    return [layer.keys.shape[2] for layer in cache.layers]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])
def test_memory_flat_and_tokens_equal_without_eviction(arch):
    """Greedy decode of 4x the window, step by step: after the first steps every layer holds the same number of
    slots (head + window), and each step's logits equal the non-evicting run's."""
    ids, mask = padded_prompts()
    head = int((1 - mask).sum(-1).max()) + SINKS
    runs = {}
    for evict in (False, True):
        model = streaming_model(arch, evict)
        cache, step_ids, step_mask, tokens, held, logits = DynamicCache(config=model.config), ids, mask, [], [], []
        with torch.no_grad():
            for _ in range(4 * WINDOW):
                out = model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                step_ids = out.logits[:, -1:].argmax(-1)
                step_mask = torch.cat((step_mask, torch.ones_like(step_ids)), dim=-1)
                tokens.append(step_ids)
                held.append(held_slots(cache))
        runs[evict] = torch.cat(tokens, -1), logits, held, cache
    assert torch.equal(runs[True][0], runs[False][0])
    for got, want in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    held = runs[True][2]
    assert all(isinstance(layer, EvictingLayer) for layer in runs[True][3].layers)
    assert all(h == [head + WINDOW] * len(h) for h in held[2:]), held  # flat from the second decode step on
    assert runs[False][2][-1][0] == mask.shape[1] + 4 * WINDOW - 1  # the plain cache grew with every token
    assert runs[True][3].get_seq_length() == runs[False][3].get_seq_length()  # positions keep counting every token


@pytest.mark.parametrize(
    "search",
    [dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20, num_return_sequences=2)],
)
def test_generate_equals_without_eviction(search):
    ids, mask = padded_prompts()
    runs = []
    for evict in (False, True):
        model = streaming_model(evict=evict)
        torch.manual_seed(5)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=4 * WINDOW, **search))
    assert torch.equal(runs[0], runs[1])


def test_multi_token_steps_and_crop():
    """Several new tokens per call (chunked prefill, speculative verification) read keys across the gap; crop
    rolls back the last call's tokens, and refuses a rollback that would need evicted keys."""
    ids = token_batch(1, 5 * WINDOW, seed=2)
    model = streaming_model()
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        pieces = [model(ids[:, lo : lo + 5], past_key_values=cache, use_cache=True).logits for lo in range(0, ids.shape[1], 5)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
        assert cache.layers[0].evicted > 0
        cache.crop(-3)  # the last call's 3 tokens: its queries' keys are still held
        again = model(ids[:, -3:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(again, full[:, -3:], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cannot remove 8 tokens; .* evicted"):
            cache.crop(-8)


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
