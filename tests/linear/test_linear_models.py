"""The linear family inside real (tiny) models: padding, cached decode, generation, saving, dense behaviour."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_attn_plus
from hf_attn_plus.patches.recurrent_cache import RecurrentStateLayer

from .conftest import ARCHS, build, shared

# One mechanism configuration per architecture keeps the suite short while every feature map meets a model.
CASES = [
    ("llama", "linear", {"feature_map": "hedgehog"}),
    ("qwen2", "linear", {"feature_map": "gaussian_rf", "chunk_size": 4}),
    ("qwen3", "linear", {"feature_map": "elu", "chunk_size": 3}),
    ("deepseek_v3", "linear", {"feature_map": "hedgehog", "chunk_size": 4}),
    ("llama", "hybrid", {"feature_map": "hedgehog", "window": 3, "chunk_size": 4}),
    ("qwen2", "hybrid", {"feature_map": "elu", "window": 5}),
    ("deepseek_v3", "hybrid", {"feature_map": "gaussian_rf", "window": 2, "chunk_size": 3}),
    ("qwen3", "gated_delta", {"chunk_size": 4}),
    ("deepseek_v3", "gated_delta", {}),
    ("llama", "momentum_delta", {"chunk_size": 3}),
    # The other patched decoder families (Granite's multiplier as `scaling`, Phi3's fused qkv, MoE, q/k norms).
    ("mistral", "linear", {"feature_map": "hedgehog", "chunk_size": 4}),
    ("phi3", "hybrid", {"feature_map": "elu", "window": 3}),
    ("granite", "gated_delta", {"chunk_size": 4}),
    ("qwen3_moe", "momentum_delta", {"chunk_size": 3}),
    ("olmo2", "linear", {"feature_map": "elu", "chunk_size": 3}),
    ("mixtral", "hybrid", {"feature_map": "hedgehog", "window": 2}),
    ("qwen2_moe", "gated_delta", {}),
    # Families with the model's own window in layer 0 (shorter than these contexts): the mechanism runs in layer 1
    # (Gemma 3: q/k norms, query_pre_attn_scalar; Cohere2: no RoPE there), layer 0 keeps the model's own attention.
    ("gemma3_text", "hybrid", {"feature_map": "hedgehog", "window": 3, "layers": "full_attention"}),
    ("gemma3_text", "gated_delta", {"chunk_size": 4, "layers": "full_attention"}),
    ("cohere2", "linear", {"feature_map": "elu", "chunk_size": 3, "layers": "full_attention"}),
]


def _ids(batch, length, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,mechanism,options", CASES)
def test_left_padding_does_not_change_real_tokens(arch, mechanism, options):
    model = shared(arch, mechanism, **options)
    ids, pad = _ids(2, 11), 4
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[1:, pad:]).logits
    assert batched.isfinite().all()
    torch.testing.assert_close(batched[1:, pad:], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,mechanism,options", CASES)
def test_cached_decode_equals_full_forward(arch, mechanism, options):
    model = shared(arch, mechanism, **options)
    ids, prompt = _ids(2, 12), 5
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache).logits]
        for t in range(prompt, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits)
    # A state exactly in the layers that have weights (the others keep the model's own, here sliding, cache layer).
    with_weights = [layer.self_attn.attn_plus is not None for layer in model.model.layers]
    assert [isinstance(layer, RecurrentStateLayer) for layer in cache.layers] == with_weights and any(with_weights)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,mechanism,options", [CASES[0], CASES[5], CASES[7], CASES[9], CASES[-3]])
def test_generate_cached_equals_uncached(arch, mechanism, options):
    model = shared(arch, mechanism, **options)
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    settings = [dict(do_sample=False), dict(num_beams=2, do_sample=False), dict(do_sample=True, top_k=5)]
    for kwargs in settings:
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(0)
            runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=4, use_cache=use_cache,
                                       pad_token_id=0, **kwargs))
        assert torch.equal(runs[0], runs[1]), kwargs


@pytest.mark.parametrize("mechanism,options", [("linear", {"feature_map": "elu", "chunk_size": 3}),
                                               ("hybrid", {"feature_map": "elu", "window": 5}),
                                               ("gated_delta", {"chunk_size": 4}),
                                               ("momentum_delta", {"chunk_size": 4})])
def test_decode_memory_is_constant_in_generated_length(mechanism, options):
    model = shared("qwen3", mechanism, **options)
    sizes = []
    for total in (10, 1000):  # tokens through the cache: a long prompt, then decode steps
        out = model.generate(_ids(1, total - 3), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
        cache = out.past_key_values
        assert cache.get_seq_length() == total
        sizes.append([layer.memory_elements() for layer in cache.layers])
    assert sizes[0] == sizes[1] and min(sizes[0]) > 0


@pytest.mark.parametrize("arch,mechanism,options", [
    ("llama", "linear", {"feature_map": "hedgehog"}),
    ("qwen2", "linear", {"feature_map": "gaussian_rf", "chunk_size": 4}),
    ("qwen3", "gated_delta", {"chunk_size": 4}),
    ("deepseek_v3", "hybrid", {"feature_map": "gaussian_rf", "window": 2, "chunk_size": 3}),
    ("llama", "momentum_delta", {"chunk_size": 3}),
    ("gemma3_text", "gated_delta", {"chunk_size": 4, "layers": "full_attention"}),
    ("mistral", "linear", {"feature_map": "hedgehog", "chunk_size": 4}),
    ("phi3", "hybrid", {"feature_map": "elu", "window": 3}),
    ("olmo2", "linear", {"feature_map": "hedgehog", "chunk_size": 3}),
])
def test_save_load_round_trip_is_bit_exact(arch, mechanism, options, tmp_path):
    model = shared(arch, mechanism, **options)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == f"hf_attn_plus:{mechanism}"
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and any(".attn_plus." in key for key in after)
    assert all(torch.equal(before[key], after[key]) for key in before)
    ids = _ids(1, 7)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_dense_checkpoint_gets_initialised_mechanism_weights(tmp_path):
    from hf_attn_plus.tiny import tiny_config

    dense = AutoModelForCausalLM.from_config(tiny_config("llama"))
    dense.save_pretrained(tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="hf_attn_plus:linear", hf_attn_plus={"feature_map": "hedgehog"}
    )
    weights = converted.model.layers[1].self_attn.attn_plus
    eye = torch.eye(8).expand_as(weights.q_map)
    assert torch.equal(weights.q_map, eye) and torch.equal(weights.k_map, torch.eye(8).expand_as(weights.k_map))
    dense_state = dense.state_dict()
    assert all(torch.equal(dense_state[key], value) for key, value in converted.state_dict().items() if key in dense_state)
    gated = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hf_attn_plus:gated_delta")
    decay = gated.model.layers[0].self_attn.attn_plus.decay_proj
    assert torch.equal(decay.bias, torch.full_like(decay.bias, -4.0)) and 0 < decay.weight.std() < 0.05


def test_gated_delta_queries_and_keys_go_through_per_head_maps_and_gains():
    """Each query head's map and gain and each KV head's map act on its own head (by brute force, head by head); at
    their start (identity, gain 1) the rule reads the layer's own normalised queries and keys, exactly."""
    model = shared("qwen3", "gated_delta", chunk_size=4)
    weights = model.model.layers[0].self_attn.attn_plus
    q_heads, kv_heads, dim = weights.q_map.shape[0], weights.k_map.shape[0], weights.q_map.shape[-1]
    query, key = torch.randn(2, q_heads, 5, dim), torch.randn(2, kv_heads, 5, dim)
    hidden = torch.randn(2, 5, weights.shape.hidden)
    mapped_q, mapped_k, _, _ = weights(query, key, hidden, 0.25)
    for h in range(q_heads):
        q_h = query[:, h] @ weights.q_map[h]
        expected = q_h / q_h.norm(dim=-1, keepdim=True) * 0.25 * weights.log_q_gain[h].exp()
        torch.testing.assert_close(mapped_q[:, h], expected)
    for h in range(kv_heads):
        k_h = key[:, h] @ weights.k_map[h]
        torch.testing.assert_close(mapped_k[:, h], k_h / k_h.norm(dim=-1, keepdim=True))
    fresh = type(weights)(weights.shape, weights.opts, 0)
    start_q, start_k, _, _ = fresh(query, key, hidden, 0.25)
    assert torch.equal(start_q, torch.nn.functional.normalize(query, dim=-1) * 0.25)
    assert torch.equal(start_k, torch.nn.functional.normalize(key, dim=-1))


@pytest.mark.parametrize("mechanism", ["gated_delta", "momentum_delta"])
def test_a_delta_checkpoint_without_the_maps_loads_its_weights_and_starts_the_maps(mechanism, tmp_path):
    """Checkpoints saved before the query / key maps and gains existed: every saved weight loads as saved (the
    module's other weights are not re-initialised), the maps start at the identity and the gains at 1."""
    from safetensors.torch import load_file, save_file

    model = build("llama", mechanism, chunk_size=3)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    new = (".attn_plus.q_map", ".attn_plus.k_map", ".attn_plus.log_q_gain")
    old = {name: t for name, t in weights.items() if not name.endswith(new)}
    assert len(old) < len(weights)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, param in loaded.state_dict().items():
        if name.endswith(new[2]):
            assert torch.equal(param, torch.zeros_like(param)), name
        elif name.endswith(new[:2]):
            assert torch.equal(param, torch.eye(param.shape[-1]).expand_as(param)), name
        else:
            assert torch.equal(param, old[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_class_keeps_dense_behaviour_and_keys(arch):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from hf_attn_plus.tiny import tiny_config

    config = tiny_config(arch)
    torch.manual_seed(0)
    original = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).eval()  # direct construction: no patches
    patched = AutoModelForCausalLM.from_config(config).eval()
    assert type(patched.model.layers[0].self_attn).__name__.startswith("HfAttnPlus")
    assert type(original.model.layers[0].self_attn).__name__ != type(patched.model.layers[0].self_attn).__name__
    patched.load_state_dict(original.state_dict(), strict=True)
    ids = _ids(2, 7)
    with torch.no_grad():
        assert torch.equal(original(ids).logits, patched(ids).logits)


def test_weights_built_for_other_options_are_rejected(make):
    model = make("llama", "linear", feature_map="hedgehog")
    model.config.hf_attn_plus = {"feature_map": "elu"}
    with pytest.raises(ValueError, match="option 'feature_map' is 'elu'"):
        model(_ids(1, 4))
    hf_attn_plus.set_attention(model, "linear", feature_map="elu")  # rebuilds them for the new options
    assert model.model.layers[0].self_attn.attn_plus.opts.feature_map == "elu"
    assert model(_ids(1, 4)).logits.isfinite().all()


def test_gaussian_rf_is_seeded_and_redrawable():
    from hf_attn_plus.mechanisms.linear import MECHANISM, LinearWeights
    from hf_attn_plus.patches.attn_plus import AttentionShape

    shape = AttentionShape(hidden=32, q_heads=4, kv_heads=2, qk_dim=8, v_dim=8)

    def draw(seed, layer_idx=0):
        opts = MECHANISM.resolve_options({"feature_map": "gaussian_rf", "seed": seed})
        return LinearWeights(shape, opts, layer_idx).random_features

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4)) and not torch.equal(draw(3), draw(3, layer_idx=1))
    weights = LinearWeights(shape, MECHANISM.resolve_options({"feature_map": "gaussian_rf"}), 0)
    drawn = weights.random_features.clone()
    weights.redraw(seed=123)
    assert not torch.equal(drawn, weights.random_features)


def test_patches_leave_similarly_named_classes_alone():
    from transformers import AutoConfig

    config = AutoConfig.for_model("diffllama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model.model.layers[0].self_attn).__name__ == "DiffLlamaAttention"


def test_static_cache_is_refused_not_silently_used():
    model = shared("qwen3", "linear", feature_map="elu", chunk_size=3)
    with pytest.raises(ValueError, match="DynamicCache; got StaticCache"):
        model.generate(_ids(1, 4), max_new_tokens=2, cache_implementation="static", pad_token_id=0)
