"""block_topk's block summaries (and the run means of the pooled mass estimate: block_sparse, block_topk
score='mass') persist in the KV cache (SideCacheLayer): decode folds only new keys, and beam search, sampling, batch
edits, crop and reset give what an uncached recompute gives."""

import pytest
import torch
from transformers import DynamicCache

from hf_attn_plus.kernels.block_scoring import summaries as summaries_module
from hf_attn_plus.mechanisms import block_topk
from hf_attn_plus.patches.side_cache import SideCacheLayer
from hf_attn_plus.selection import block_key_bounds, pooled_blocks

from .models import SPARSE, left_pad, tiny_model, token_batch, with_mechanism

OPTIONS = {**SPARSE["block_topk"], "score": "bound"}  # Quest's block summaries
STATE = f"block_topk:block_size={OPTIONS['block_size']}"
# Settings ranking blocks by the pooled mass estimate: two runs of 2 keys per 4-key block.
MASS = {
    "block_topk": {**OPTIONS, "score": "mass", "pool_size": 2},
    "block_sparse": dict(block_size=4, threshold=0.6, pool_size=2),
}


def sparse_model(arch="llama", **extra):
    return with_mechanism(tiny_model(arch), "block_topk", {**OPTIONS, **extra})


def padded_prompts():
    return left_pad([token_batch(1, 14, seed=3)[0], token_batch(1, 9, seed=4)[0]])[:2]


def assert_states_equal_recompute(cache, mask):
    """Every layer's summaries equal block_key_bounds over the layer's keys, bitwise (Llama caches its keys)."""
    key_pos = torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)[:, None, None, :]
    blocks = torch.where(key_pos >= 0, key_pos // OPTIONS["block_size"], -1)
    for layer in cache.layers:
        assert isinstance(layer, SideCacheLayer)
        state = layer.side[STATE]
        assert state.covered == layer.keys.shape[2] == mask.shape[1]
        expected = block_key_bounds(layer.keys, blocks, int(blocks.max()) + 1)
        assert all(torch.equal(got, want) for got, want in zip(state.bounds, expected))


@pytest.mark.parametrize("arch, choose_per", [("llama", "head"), ("deepseek_v3", "head"), ("qwen3", "group")])
@pytest.mark.parametrize(
    "search", [dict(num_beams=2, do_sample=False), dict(do_sample=True, top_k=20, num_return_sequences=2)]
)
def test_beam_search_and_sampling_equal_uncached(arch, choose_per, search):
    """Beam search reorders the cache (and the side states with it) at every step."""
    model = sparse_model(arch, choose_per=choose_per)
    ids, mask = padded_prompts()
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(
            model.generate(
                ids, attention_mask=mask, max_new_tokens=8, use_cache=use_cache, output_scores=True,
                return_dict_in_generate=True, **search,
            )
        )
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


def test_decode_folds_only_new_keys(monkeypatch):
    """Would fail if a decode step recomputed the block bounds from all keys."""

    def recompute(*args):
        raise AssertionError("block bounds recomputed from every key")

    folded = []
    extend = summaries_module.BlockSummaries.extend

    def counted_extend(self, keys, key_pos):
        folded.append(keys.shape[2])
        extend(self, keys, key_pos)

    monkeypatch.setattr(block_topk, "block_key_bounds", recompute)
    monkeypatch.setattr(summaries_module.BlockSummaries, "extend", counted_extend)
    model = sparse_model()
    ids, mask = padded_prompts()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    layers = model.config.num_hidden_layers
    assert folded == [ids.shape[1]] * layers + [1] * (5 * layers)
    assert_states_equal_recompute(out.past_key_values, torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1))


@pytest.mark.parametrize("name", sorted(MASS))
def test_run_means_fold_only_new_keys_and_equal_recompute(name, monkeypatch):
    """Would fail if a decode step re-pooled every key, or if the folded means drifted from a recompute's."""
    folded = []
    extend = summaries_module.RunMeans.extend

    def counted_extend(self, keys, key_pos):
        folded.append(keys.shape[2])
        extend(self, keys, key_pos)

    monkeypatch.setattr(summaries_module.RunMeans, "extend", counted_extend)
    model = with_mechanism(tiny_model("llama"), name, MASS[name])
    ids, mask = padded_prompts()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    layers = model.config.num_hidden_layers
    assert folded == [ids.shape[1]] * layers + [1] * (5 * layers)
    mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    runs = torch.where(mask.bool(), (mask.cumsum(-1) - 1) // 2, -1)
    for layer in out.past_key_values.layers:
        state = layer.side["run_means:run_size=2"]
        num_runs = int(runs.max()) + 1
        assert torch.equal(state.means(num_runs), pooled_blocks(layer.keys, runs, num_runs))
    uncached = model.generate(ids, attention_mask=mask[:, : ids.shape[1]], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, uncached)


@pytest.mark.parametrize("name", sorted(MASS))
def test_beam_search_with_run_means_equals_uncached(name):
    model = with_mechanism(tiny_model("qwen3"), name, MASS[name])
    ids, mask = padded_prompts()
    runs = [
        model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=2, do_sample=False, use_cache=use_cache,
                       output_scores=True, return_dict_in_generate=True)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


def test_batch_edits_map_side_states():
    model = sparse_model()
    ids, mask = padded_prompts()
    cache = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, past_key_values=cache)
    cache.reorder_cache(torch.tensor([1, 0]))
    mask = mask.flip(0)
    assert_states_equal_recompute(cache, mask)
    cache.batch_repeat_interleave(2)
    mask = mask.repeat_interleave(2, 0)
    assert_states_equal_recompute(cache, mask)
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert_states_equal_recompute(cache, mask[[0, 3]])


def test_crop_and_reset_rebuild_side_states():
    model = sparse_model()
    ids = token_batch(1, 16, seed=5)
    other = token_batch(1, 4, seed=6)
    cache = DynamicCache(config=model.config)
    model(ids[:, :10], past_key_values=cache)
    model(ids[:, 10:14], past_key_values=cache)
    cache.crop(-4)  # drop ids[10:14] and continue with other tokens instead
    assert all(layer.side == {} for layer in cache.layers)
    continued = model(other, past_key_values=cache).logits
    sequence = torch.cat([ids[:, :10], other], dim=1)
    torch.testing.assert_close(continued, model(sequence, use_cache=False).logits[:, 10:], atol=1e-5, rtol=1e-4)
    assert_states_equal_recompute(cache, torch.ones(1, 14, dtype=torch.long))
    cache.reset()
    assert all(layer.side == {} for layer in cache.layers)
    model(sequence, past_key_values=cache)
    assert_states_equal_recompute(cache, torch.ones(1, 14, dtype=torch.long))


def test_side_cache_only_in_cached_inference_on_patched_classes(monkeypatch):
    model = sparse_model()
    ids = token_batch(1, 12, seed=7)
    seen = []
    # Runs after the plugin's own pre-hook, which sets the layer for the duration of the attention call.
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, args: seen.append(m.attn_plus_cache_layer))
    cache = DynamicCache(config=model.config)
    model.train()(ids, past_key_values=cache)
    model.eval()(ids, use_cache=False)
    assert seen == [None, None] and not any(isinstance(layer, SideCacheLayer) for layer in cache.layers)
    model(ids, past_key_values=DynamicCache(config=model.config))
    assert isinstance(seen[-1], SideCacheLayer)

    def no_side_state(*args):
        raise AssertionError("side state on an unpatched attention class")

    monkeypatch.setattr(block_topk, "block_summaries", no_side_state)
    unpatched = sparse_model("deepseek_v32")  # transformers' own V3.2 attention: no hook, recompute path
    unpatched.generate(ids, max_new_tokens=3, do_sample=False)
