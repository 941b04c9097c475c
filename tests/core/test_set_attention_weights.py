"""`set_attention` onto a mechanism with weights: a model built or loaded without them gets them, initialised as
`from_pretrained(..., attn_implementation=...)` initialises them (bitwise, from the same RNG state); save/reload
keeps them; switching keeps weights that fit and replaces the others; refusals change nothing."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM, LlamaForCausalLM

import hf_attn_plus
from hf_attn_plus import PREFIX, MechanismWeightsError
from hf_attn_plus.patches.attn_plus import PATCH_OF
from hf_attn_plus.tiny import (
    PATCHED_ARCHITECTURES,
    PATCHED_WITH_LOGIT_OPTIONS,
    PATCHED_WITH_WINDOW_LAYERS,
    tiny_config,
)

from .models import tiny_model, token_batch

ARCHS = PATCHED_ARCHITECTURES
INDEXER = dict(budget=4, sinks=1, window=2)
CASES = {
    "linear": ("linear", {}),  # hedgehog maps (identity init)
    "linear_rf": ("linear", dict(feature_map="gaussian_rf", seed=3)),  # seeded buffer
    "hybrid": ("hybrid", dict(window=4)),
    "gated_delta": ("gated_delta", {}),  # random projections: the RNG order must match from_pretrained's
    "momentum_delta": ("momentum_delta", {}),
    "indexer_topk": ("indexer_topk", dict(INDEXER, index_heads=2, index_dim=8)),
    "head_budget": ("head_budget", dict(budget=0.75)),  # gates only, around dense attention
    "head_budget_linear": ("head_budget", dict(budget=0.75, inner="linear")),
    "head_budget_indexer": ("head_budget", dict(budget=0.75, inner="indexer_topk", inner_options=INDEXER)),
}
# Cases whose weights honour the model's own window (the others run with layers='full_attention' on models with a
# windowed layer), and those honouring soft-capping and sinks (the others are refused on such models).
HONOURING_WINDOW = ("indexer_topk", "head_budget", "head_budget_indexer")
HONOURING_LOGIT_OPTIONS = ("head_budget",)
SEED = 7


def weight_cases() -> list[tuple[str, str]]:
    """(arch, case) for every case whose weights can run on arch."""
    return [
        (arch, case) for arch in ARCHS for case in CASES
        if arch not in PATCHED_WITH_LOGIT_OPTIONS or case in HONOURING_LOGIT_OPTIONS
    ]


def case_options(arch: str, case: str) -> tuple[str, dict]:
    """The mechanism and options of `case` on `arch`: out of its windowed layers where the weights need it."""
    name, options = CASES[case]
    if arch in PATCHED_WITH_WINDOW_LAYERS and case not in HONOURING_WINDOW:
        options = dict(options, layers="full_attention")
    return name, options


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved dense tiny model per architecture: what a user loads with a plain `from_pretrained(path)`."""
    saved = {}

    def path(arch: str):
        if arch not in saved:
            saved[arch] = tmp_path_factory.mktemp(arch.replace("@", "_"))
            tiny_model(arch).save_pretrained(saved[arch])  # seed 0, the model's own attention
        return saved[arch]

    return path


def load(path, name: str | None = None, dtype: torch.dtype = torch.float32, **options) -> torch.nn.Module:
    """from_pretrained from RNG state SEED: with `name`, loaded with the mechanism (its weights initialised there)."""
    torch.manual_seed(SEED)
    kwargs = {} if name is None else dict(attn_implementation=PREFIX + name, hf_attn_plus=options)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


def convert(model: torch.nn.Module, name: str, **options) -> torch.nn.Module:
    """set_attention from RNG state SEED."""
    torch.manual_seed(SEED)
    hf_attn_plus.set_attention(model, name, **options)
    return model


def mechanism_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under `attn_plus`, named as in the plain model (a PeftModel's prefix removed)."""
    return {
        key.removeprefix("base_model.model."): tensor
        for key, tensor in model.state_dict().items()
        if ".attn_plus." in key
    }


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, expected = mechanism_tensors(model), mechanism_tensors(reference)
    assert got.keys() == expected.keys() and got
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(2, 12)).logits


@pytest.mark.parametrize("arch, case", weight_cases())
def test_set_attention_adds_weights_as_from_pretrained_and_they_survive_a_reload(arch, case, checkpoint, tmp_path):
    name, options = case_options(arch, case)
    model = convert(load(checkpoint(arch)), name, **options)
    reference = load(checkpoint(arch), name, **options)
    assert_same_weights(model, reference)
    assert torch.equal(logits(model), logits(reference))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == PREFIX + name and reloaded.config.hf_attn_plus == options
    assert_same_weights(reloaded, model)
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("case", ["gated_delta", "indexer_topk", "linear_rf"])
def test_weights_are_initialised_in_the_models_dtype(case, checkpoint):
    name, options = CASES[case]
    model = convert(load(checkpoint("llama"), dtype=torch.bfloat16), name, **options)
    assert {tensor.dtype for tensor in mechanism_tensors(model).values()} == {torch.bfloat16}
    assert_same_weights(model, load(checkpoint("llama"), name, dtype=torch.bfloat16, **options))


@pytest.mark.parametrize("model_class", [LlamaForCausalLM, DeepseekV3ForCausalLM])
@pytest.mark.parametrize("name, options", [CASES["hybrid"], CASES["gated_delta"]])
def test_modules_built_without_the_patch_are_patched_in_place(model_class, name, options, tmp_path):
    """A model built by its class (no from_pretrained / from_config: the original attention classes) gets the
    weights and the decode-state hooks: cached greedy decoding matches the model loaded with the mechanism."""
    torch.manual_seed(0)
    model = model_class(tiny_config(model_class.config_class.model_type)).eval()
    assert type(model.model.layers[0].self_attn) in PATCH_OF
    model.save_pretrained(tmp_path)
    convert(model, name, **options)
    reference = load(tmp_path, name, **options)
    assert type(model.model.layers[0].self_attn) is type(reference.model.layers[0].self_attn)
    assert_same_weights(model, reference)
    ids = token_batch(2, 6)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


LORA = dict(r=2, target_modules=["o_proj"], init_lora_weights=False)  # random B: the adapter changes the output


@pytest.mark.parametrize(
    "arch, case",
    [("llama", "gated_delta"), ("deepseek_v3", "hybrid"), ("qwen3", "head_budget_indexer"), ("gemma3_text", "hybrid"),
     ("gemma2", "head_budget")],
)
def test_peft_model_gets_frozen_weights_that_merge_and_reload(arch, case, checkpoint, tmp_path):
    name, options = case_options(arch, case)
    base = load(checkpoint(arch))
    torch.manual_seed(1)
    adapted = get_peft_model(base, LoraConfig(**LORA))
    trainable, _ = adapted.get_nb_trainable_parameters()
    convert(adapted, name, **options)
    reference = load(checkpoint(arch), name, **options)
    torch.manual_seed(1)
    reference_adapted = get_peft_model(reference, LoraConfig(**LORA))
    assert_same_weights(adapted, reference_adapted)
    assert torch.equal(logits(adapted), logits(reference_adapted))
    # PEFT trains the adapter, not the base model: the added weights are frozen like the rest of the base.
    assert adapted.get_nb_trainable_parameters()[0] == trainable
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if ".attn_plus." in n)
    merged = adapted.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == PREFIX + name
    assert_same_weights(reloaded, merged)
    assert torch.equal(logits(reloaded), logits(merged))


def test_switching_keeps_weights_that_fit_and_replaces_the_others(checkpoint, tmp_path):
    dense = load(checkpoint("llama"))
    model = load(checkpoint("llama"), "hybrid", window=4)
    with torch.no_grad():  # trained-like weights, which a reinitialisation would lose
        for tensor in mechanism_tensors(model).values():
            tensor.add_(torch.randn_like(tensor) * 0.3)
    trained = [layer.self_attn.attn_plus for layer in model.model.layers]
    hybrid_logits = logits(model)

    def kept() -> bool:
        return all(layer.self_attn.attn_plus is weights for layer, weights in zip(model.model.layers, trained))

    hf_attn_plus.set_attention(model, "sdpa")
    assert kept() and torch.equal(logits(model), logits(dense))
    hf_attn_plus.set_attention(model, "topk", **INDEXER)  # no weights of its own: the hybrid ones stay, unused
    assert kept() and torch.equal(logits(model), logits(convert(load(checkpoint("llama")), "topk", **INDEXER)))
    hf_attn_plus.set_attention(model, "hybrid", window=4)
    assert kept() and torch.equal(logits(model), hybrid_logits)
    hf_attn_plus.set_attention(model, "hybrid", window=2)  # the window does not shape the weights
    assert kept() and not torch.equal(logits(model), hybrid_logits)
    # Other weight-shaping options, or another mechanism with weights: fresh weights, as from_pretrained builds them.
    for name, options in (("hybrid", dict(window=4, feature_map="gaussian_rf")), ("gated_delta", {})):
        convert(model, name, **options)
        assert not kept()
        assert_same_weights(model, load(checkpoint("llama"), name, **options))
    # Saved while dense, unused weights go into the checkpoint; from_pretrained reports them unexpected and drops them.
    hf_attn_plus.set_attention(model, "sdpa")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].self_attn.attn_plus is None and not mechanism_tensors(reloaded)
    assert torch.equal(logits(reloaded), logits(dense))


def assert_unchanged(model: torch.nn.Module) -> None:
    assert model.config._attn_implementation == "sdpa" and model.config.hf_attn_plus is None


@pytest.mark.parametrize("name, options", [CASES["linear"], CASES["gated_delta"], ("head_budget", dict(budget=0.5))])
def test_deepseek_v32_refuses_weights_in_set_attention(name, options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v32"), attn_implementation="sdpa").eval()
    with pytest.raises(MechanismWeightsError, match=rf"{name!r} adds weights.*'deepseek_v32' model.*not patched"):
        hf_attn_plus.set_attention(model, name, **options)
    assert_unchanged(model)
    assert not mechanism_tensors(model)


def test_indexer_topk_on_deepseek_v32_uses_the_models_own_indexer_without_weights():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v32"), attn_implementation="sdpa").eval()
    hf_attn_plus.set_attention(model, "indexer_topk")
    assert not mechanism_tensors(model) and logits(model).isfinite().all()


def test_weights_adapted_by_peft_are_not_replaced(checkpoint):
    name, options = CASES["hybrid"]
    adapted = get_peft_model(load(checkpoint("llama"), name, **options), LoraConfig(r=2, target_modules=["q_proj"],
                                                                                  modules_to_save=["attn_plus"]))
    with pytest.raises(MechanismWeightsError, match="'hybrid' weights .* adapted by PEFT.*merge_and_unload"):
        hf_attn_plus.set_attention(adapted, "gated_delta")
    assert adapted.config._attn_implementation == PREFIX + name and adapted.config.hf_attn_plus == options
    wrapper = adapted.base_model.model.model.layers[0].self_attn.attn_plus
    hf_attn_plus.set_attention(adapted, name, window=2)  # weights that fit stay, adapter and all
    assert adapted.base_model.model.model.layers[0].self_attn.attn_plus is wrapper
    assert logits(adapted).isfinite().all()


# Weights that cannot reproduce a model feature of a layer they would go in: refused by name, where, and what runs.
LAYERS_ADVICE = r"; set option layers='full_attention' to run it only in the layers without the model's own window"
LOGIT_ADVICE = r"; every layer has it; mechanisms with weights that implement it: head_budget \(a wrapper"
REFUSALS = [
    ("gemma3_text", "linear", r"'linear' does not implement the model's own sliding window \(10\) of layer 0 "
     r"\(HfAttnPlusGemma3Attention, model_type 'gemma3_text'\)" + LAYERS_ADVICE),
    ("cohere2", "head_budget_linear", r"'head_budget' \(its inner mechanism 'linear'\) does not implement the model's "
     r"own sliding window \(10\) of layer 0 \(HfAttnPlusCohere2Attention, model_type 'cohere2'\)" + LAYERS_ADVICE),
    ("gemma2", "gated_delta", r"'gated_delta' does not implement logit soft-capping \(softcap=2.0\) of layer 0 "
     r"\(HfAttnPlusGemma2Attention, model_type 'gemma2'\)" + LOGIT_ADVICE),
    ("gpt_oss", "indexer_topk", r"'indexer_topk' does not implement learned attention sinks \(s_aux\) of layer 0 "
     r"\(HfAttnPlusGptOssAttention, model_type 'gpt_oss'\)" + LOGIT_ADVICE),
    ("gemma2", "head_budget_indexer", r"'head_budget' \(its inner mechanism 'indexer_topk'\) does not implement logit "
     r"soft-capping"),
    # One window for every layer (config.sliding_window, no layer_types): no layers='full_attention' to suggest.
    ("mistral@window", "hybrid", r"'hybrid' does not implement the model's own sliding window \(16\) of layer 0 "
     r"\(HfAttnPlusMistralAttention, model_type 'mistral'\); every layer has it; mechanisms with weights that "
     r"implement it: head_budget, indexer_topk \(a wrapper"),
]


@pytest.mark.parametrize("arch, case, refusal", REFUSALS)
def test_weights_that_cannot_honour_a_layer_are_refused_by_set_attention_and_loading(arch, case, refusal, checkpoint):
    name, options = CASES[case]
    model = load(checkpoint(arch))
    implementation = model.config._attn_implementation
    with pytest.raises(MechanismWeightsError, match=refusal):
        hf_attn_plus.set_attention(model, name, **options)
    assert model.config._attn_implementation == implementation and model.config.hf_attn_plus is None
    assert not mechanism_tensors(model)
    with pytest.raises(MechanismWeightsError, match=refusal):
        load(checkpoint(arch), name, **options)
    # The refused construction left transformers' own classes in place: a model built by its class is unpatched.
    assert type(LlamaForCausalLM(tiny_config("llama")).model.layers[0].self_attn) in PATCH_OF


def test_layers_option_puts_weights_only_in_the_layers_it_selects(checkpoint):
    """Gemma 3's layer 0 is windowed: with layers='full_attention' only layer 1 gets weights and runs the mechanism,
    layer 0 keeps the model's own attention and its own sliding cache layer."""
    name, options = case_options("gemma3_text", "gated_delta")
    model = convert(load(checkpoint("gemma3_text")), name, **options)
    assert [layer.self_attn.attn_plus is None for layer in model.model.layers] == [True, False]
    dense = load(checkpoint("gemma3_text"))
    ids = token_batch(1, 14)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        hidden_dense = dense(ids, output_hidden_states=True).hidden_states
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert [type(layer).__name__ for layer in out.past_key_values.layers] == [
        "DynamicSlidingWindowLayer", "RecurrentStateLayer"
    ]
    # Layer 0 (hidden state 1) is the model's own; layer 1's mechanism changes what follows it.
    torch.testing.assert_close(hidden[1], hidden_dense[1], atol=1e-6, rtol=1e-5)
    assert (hidden[2] - hidden_dense[2]).abs().max() > 1e-3
    # Switching to every layer builds the missing weights, and is refused where they cannot go.
    with pytest.raises(MechanismWeightsError, match=r"sliding window \(10\) of layer 0"):
        hf_attn_plus.set_attention(model, name)
    assert model.config.hf_attn_plus == options
