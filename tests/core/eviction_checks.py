"""Checks every evicting cache must pass (sliding_window's whole-layer eviction, head_budget's per-group one): the
same tokens as the run that keeps every key under every search, and multi-token steps and `crop` across the gap."""

from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache

from .models import left_pad, token_batch

SEARCHES = [
    dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20, num_return_sequences=2)
]


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts (11 and 7 tokens): ids and attention mask."""
    return left_pad([token_batch(1, 11, seed=3)[0], token_batch(1, 7, seed=4)[0]])[:2]


def assert_generate_equals_keeping_every_key(
    make_model: Callable[[bool], torch.nn.Module], search: dict, new_tokens: int
) -> None:
    """`make_model(evict)`'s generations from the padded prompts agree token for token (same seed for sampling)."""
    ids, mask = padded_prompts()
    runs = []
    for evict in (False, True):
        model = make_model(evict)
        torch.manual_seed(5)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **search))
    assert torch.equal(runs[0], runs[1])


def assert_multi_token_steps_and_crop(
    model: torch.nn.Module, ids: torch.Tensor, evicted: Callable[[DynamicCache], int]
) -> DynamicCache:
    """Calls of 5 new tokens read evicted layers' keys across the gap and equal the uncached forward; `crop` rolls back
    the last call's 3 tokens and refuses a rollback that would need evicted keys. Returns the cache after it."""
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = range(0, ids.shape[1], 5)
        pieces = [model(ids[:, lo : lo + 5], past_key_values=cache, use_cache=True).logits for lo in steps]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
        assert evicted(cache) > 0
        cache.crop(-3)  # the last call's 3 tokens: its queries' keys are still held
        again = model(ids[:, -3:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(again, full[:, -3:], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cannot remove 8 tokens; .* evicted"):
            cache.crop(-8)
    return cache


def greedy_steps(
    model: torch.nn.Module, steps: int, record: Callable[[DynamicCache], object]
) -> tuple[list[torch.Tensor], list, DynamicCache]:
    """Greedy decode from the padded prompts, one token per call into one DynamicCache: (each step's last-position
    logits, `record(cache)` after each step, the cache)."""
    ids, mask = padded_prompts()
    cache, logits, records = DynamicCache(config=model.config), [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat((mask, torch.ones_like(ids)), dim=-1)
            records.append(record(cache))
    return logits, records, cache
