"""indexer_topk with learned attn_plus indexer weights in tiny models (DeepSeek-V3.2 brings its own indexer)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus
from core.models import token_batch
from core.models import left_pad
from hf_attn_plus.mechanisms.indexer_topk import IndexerWeights, indexer_loss, init_from_attention
from hf_attn_plus.selection import indexer_scores
from hf_attn_plus.tiny import tiny_config

from .selection_helpers import assert_cached_equals_uncached, assert_padding_invariant, decode_logits, logits

# Gemma 3 and Cohere2 with their own window in layer 0: the selection stays inside it (the contexts run past it).
ARCHS = (
    "llama", "qwen2", "qwen3", "deepseek_v3", "mistral", "phi3", "olmo2", "granite", "qwen2_moe", "gemma3_text", "cohere2"
)
SMALL = dict(index_heads=2, index_dim=4)


def indexer_model(arch: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(arch, hf_attn_plus={**SMALL, **options})
    return AutoModelForCausalLM.from_config(config, attn_implementation="hf_attn_plus:indexer_topk").eval()


def _dense_logits(model, ids, training=False):
    implementation = model.config._attn_implementation
    options = dict(model.config.hf_attn_plus)
    hf_attn_plus.set_attention(model, "sdpa")
    model.train(training)
    out = logits(model, ids)
    hf_attn_plus.set_attention(model, implementation, **options)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_selection_is_cache_and_padding_exact_and_covering_budget_is_dense(arch):
    model = indexer_model(arch, budget=3, window=2, sinks=1)
    assert sum(".attn_plus." in name for name, _ in model.named_parameters()) == 4 * 2  # three projections + w bias, 2 layers
    assert_cached_equals_uncached(model)
    assert_padding_invariant(model, length=30, pad=7)
    ids = token_batch(2, 24)
    assert not torch.allclose(logits(model, ids), _dense_logits(model, ids), atol=1e-4)
    hf_attn_plus.set_attention(model, "indexer_topk", **SMALL, budget=24, window=0, sinks=0)
    torch.testing.assert_close(logits(model, ids), _dense_logits(model, ids), atol=1e-5, rtol=1e-4)


def test_warmup_attends_densely_and_its_loss_trains_only_the_indexer():
    model = indexer_model("llama", budget=2, window=1, sinks=1, stage="warmup").train()
    ids = token_batch(2, 24)
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits.detach(), _dense_logits(model, ids, training=True), atol=1e-5, rtol=1e-4)
    model.train()
    out = model(input_ids=ids, labels=ids)
    indexer = {n: p for n, p in model.named_parameters() if ".attn_plus." in n}
    main = {n: p for n, p in model.named_parameters() if ".attn_plus." not in n}
    grads = torch.autograd.grad(indexer_loss(model), [*indexer.values(), *main.values()], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[: len(indexer)])
    assert all(g is None for g in grads[len(indexer) :])
    lm_grads = torch.autograd.grad(out.loss, list(indexer.values()), allow_unused=True)
    assert all(g is None for g in lm_grads), "the language-modelling loss must not reach the indexer"


def test_warmup_training_lowers_the_indexer_kl_and_sparse_stage_records_its_loss():
    model = indexer_model("llama", budget=2, window=1, sinks=1, stage="warmup").train()
    for name, param in model.named_parameters():
        param.requires_grad_(".attn_plus." in name)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = token_batch(2, 24)
    losses = []
    for _ in range(8):
        model(input_ids=ids)
        loss = indexer_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    hf_attn_plus.set_attention(model, "indexer_topk", **SMALL, budget=2, window=1, sinks=1, stage="sparse")
    model(input_ids=ids)
    assert torch.isfinite(indexer_loss(model))
    model.eval()
    model(input_ids=ids)
    with pytest.raises(ValueError, match="no indexer loss recorded"):
        indexer_loss(model)


def trained_looking_indexer_model(arch: str) -> torch.nn.Module:
    """An indexer model whose indexer weights are not their initial values (a save must keep what was learned)."""
    model = indexer_model(arch, budget=3, window=2, sinks=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".attn_plus." in name:
                param.add_(torch.randn_like(param))
    return model


def test_save_load_round_trip(tmp_path):
    model = trained_looking_indexer_model("qwen3")
    ids = token_batch(2, 20)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "hf_attn_plus:indexer_topk"
    for (name, param), (_, again) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(param, again), name
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))


def test_a_checkpoint_without_the_head_weight_bias_loads_its_weights_and_a_zero_bias(tmp_path):
    """Indexers saved before w had a bias: every saved weight loads as saved, the bias starts at 0 (DSA's w)."""
    from safetensors.torch import load_file, save_file

    model = trained_looking_indexer_model("llama")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old = {name: t for name, t in weights.items() if not name.endswith("head_weights.bias")}
    assert len(old) < len(weights)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, param in loaded.state_dict().items():
        expected = torch.zeros_like(param) if name.endswith("head_weights.bias") else old[name]
        assert torch.equal(param, expected), name


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])
def test_init_from_attention_scores_keys_by_the_layers_own_attention(arch):
    """After init_from_attention, I[t, s] = sum_h relu(q_h[t] · k_h[s]) / sqrt(D) from the layer's own (post-RoPE)
    queries and keys, so the selection is top-k by that score, computed by brute force."""
    model = indexer_model(arch, budget=3, window=2, sinks=1)
    attention = model.model.layers[0].self_attn
    shape = attention.attn_plus.shape
    with pytest.raises(ValueError, match=f"needs index_heads={shape.q_heads} .* index_dim={shape.kv_heads * shape.qk_dim}"):
        init_from_attention(model)
    options = dict(budget=3, window=2, sinks=1, index_heads=shape.q_heads, index_dim=shape.kv_heads * shape.qk_dim)
    hf_attn_plus.set_attention(model, "indexer_topk", **options)
    assert init_from_attention(model) == model.config.num_hidden_layers
    torch.manual_seed(3)
    query = torch.randn(2, shape.q_heads, 7, shape.qk_dim)
    key = torch.randn(2, shape.kv_heads, 7, shape.qk_dim)
    index_query, index_key, head_weights = attention.attn_plus(query, key)
    scores = indexer_scores(index_query, index_key, head_weights)
    keys = key.repeat_interleave(shape.q_heads // shape.kv_heads, dim=1)
    expected = (query @ keys.transpose(-1, -2)).relu().sum(1, keepdim=True) / shape.qk_dim**0.5
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_init_from_attention_below_full_width_projects_keys_on_their_principal_directions():
    """index_dim r < KV heads x head dim: the index key is B k for B the top-r right singular vectors of the layer's
    keys in a dense forward of the calibration ids, q^I_h = B q_h in its group's slot, so I = sum_h relu(q~_h B^T B k)
    / sqrt(D); without calibration ids it is refused."""
    model = indexer_model("llama", budget=3, window=2, sinks=1)
    shape = model.model.layers[0].self_attn.attn_plus.shape
    width, rank = shape.kv_heads * shape.qk_dim, 5
    hf_attn_plus.set_attention(model, "indexer_topk", budget=3, window=2, sinks=1, index_heads=shape.q_heads, index_dim=rank)
    with pytest.raises(ValueError, match="pass calibration input ids"):
        init_from_attention(model)
    calibration = token_batch(2, 24, seed=4)
    keys = {}
    attention = model.model.layers[1].self_attn
    hook = attention.k_proj.register_forward_hook(lambda m, args, out: keys.setdefault("pre_rope", out))
    init_from_attention(model, calibration=calibration)
    hook.remove()
    assert model.training is False and "stage" not in model.config.hf_attn_plus  # restored
    basis = attention.attn_plus.key_proj.weight
    torch.testing.assert_close(basis @ basis.T, torch.eye(rank), rtol=0, atol=1e-5)
    # The basis spans the top principal directions of the layer's post-RoPE keys: it holds more of their energy than
    # any other rank-r projection, in particular more than the principal directions of the keys before RoPE.
    ids_keys = dense_layer_keys(model, calibration, layer=1)
    pre = torch.linalg.svd(keys["pre_rope"].flatten(0, 1), full_matrices=False).Vh[:rank]
    held = lambda b: (ids_keys @ b.T).square().sum()  # noqa: E731
    assert held(basis) >= held(pre) and held(basis) >= 0.999 * torch.linalg.svdvals(ids_keys)[:rank].square().sum()
    torch.manual_seed(3)
    query = torch.randn(2, shape.q_heads, 7, shape.qk_dim)
    key = torch.randn(2, shape.kv_heads, 7, shape.qk_dim)
    scores = indexer_scores(*attention.attn_plus(query, key))
    group = shape.q_heads // shape.kv_heads
    placed = torch.zeros(2, shape.q_heads, 7, width)
    for head in range(shape.q_heads):
        slot = slice(head // group * shape.qk_dim, (head // group + 1) * shape.qk_dim)
        placed[:, head, :, slot] = query[:, head]
    flat_keys = key.transpose(1, 2).flatten(2)  # [B, 7, width]
    expected = ((placed @ basis.T) @ (flat_keys @ basis.T).transpose(-1, -2)[:, None]).relu().sum(1, keepdim=True)
    torch.testing.assert_close(scores, expected / shape.qk_dim**0.5, rtol=1e-5, atol=1e-5)


def dense_layer_keys(model, ids, layer):
    """Post-RoPE keys [tokens, KV heads x head dim] of `layer` in an SDPA forward (brute force, for the test)."""
    keys = []
    from transformers.models.llama import modeling_llama

    rope = modeling_llama.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *args, **kwargs):
        out = rope(q, k, cos, sin, *args, **kwargs)
        keys.append(out[1])
        return out

    implementation = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    modeling_llama.apply_rotary_pos_emb = capture
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        modeling_llama.apply_rotary_pos_emb = rope
        model.set_attn_implementation(implementation)
    return keys[layer].transpose(1, 2).flatten(2).flatten(0, 1)


def test_deepseek_v32_reuses_its_own_indexer():
    """On V3.2 the selection is the model's own lightning indexer's (top-12 of 24+ keys here): the same logits and
    cached decode step as transformers' own SDPA path; this mechanism's selection options are refused there."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("deepseek_v32"), attn_implementation="hf_attn_plus:indexer_topk"
    ).eval()
    assert not any(".attn_plus." in name for name, _ in model.named_parameters())
    ids = token_batch(2, 24)
    ours, ours_step = logits(model, ids), decode_logits(model, ids)
    hf_attn_plus.set_attention(model, "sdpa")
    torch.testing.assert_close(ours, logits(model, ids), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_step, decode_logits(model, ids), atol=1e-5, rtol=1e-4)
    hf_attn_plus.set_attention(model, "indexer_topk", budget=3)
    with pytest.raises(hf_attn_plus.OptionError, match="uses the model's own indexer .config.index_topk=12.; option.s. 'budget'"):
        model(input_ids=ids)


def test_peft_adapters_on_the_indexer_take_part():
    from peft import LoraConfig, get_peft_model

    model = indexer_model("llama", budget=2, window=1, sinks=1)
    ids = token_batch(2, 20)
    before = logits(model, ids)
    config = LoraConfig(r=2, target_modules=["attn_plus.query_proj", "attn_plus.key_proj"], init_lora_weights=False)
    tuned = get_peft_model(model, config)
    # Random (non-zero) LoRA weights change the indexer's scores, hence the selection and the output.
    assert not torch.allclose(logits(tuned, ids), before, atol=1e-4)
    with tuned.disable_adapter():
        torch.testing.assert_close(logits(tuned, ids), before)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_projects_only_new_keys_into_the_indexer_key_cache(arch, monkeypatch):
    """The indexer's own key cache: the prompt's keys are projected once, then one key per layer and step, and the
    cache holds what projecting every cached key at once gives. (DeepSeek-V3 caches keys in another layout than the
    attention call receives; its cached decode is checked against recomputation above.)"""
    model = indexer_model(arch, budget=3, window=2, sinks=1)
    ids, mask = left_pad([token_batch(1, 11, seed=3)[0], token_batch(1, 7, seed=4)[0]])[:2]
    projected = []
    forward = IndexerWeights.forward

    def counting(self, query, key):
        if key is not None:
            projected.append(key.shape[2])
        return forward(self, query, key)

    monkeypatch.setattr(IndexerWeights, "forward", counting)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
        pad_token_id=0,
    )
    layers = model.config.num_hidden_layers
    assert projected == [ids.shape[1]] * layers + [1] * 3 * layers
    monkeypatch.setattr(IndexerWeights, "forward", forward)
    for layer, cache_layer in zip(model.model.layers, out.past_key_values.layers):
        cached = cache_layer.side[f"indexer_topk:index_dim={SMALL['index_dim']}"]
        assert cached.covered == cache_layer.keys.shape[2] == ids.shape[1] + 3
        full = layer.self_attn.attn_plus(None, cache_layer.keys)[1]
        torch.testing.assert_close(cached.keys, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_misa_routing_is_cache_and_padding_exact_and_changes_the_selection(arch):
    routed = dict(index_heads=4, index_dim=4, budget=3, window=2, sinks=1)
    model = indexer_model(arch, **routed, active_heads=2, router_block=4)
    assert_cached_equals_uncached(model, length=14, new=6)
    assert_padding_invariant(model, length=30, pad=7)
    ids = token_batch(2, 24)
    with_routing = logits(model, ids)
    hf_attn_plus.set_attention(model, "indexer_topk", **routed)
    every_head = logits(model, ids)
    assert not torch.allclose(with_routing, every_head, atol=1e-4)
    hf_attn_plus.set_attention(model, "indexer_topk", **routed, active_heads=4)  # routing every head is DSA
    assert torch.equal(logits(model, ids), every_head)
