"""What the decoder families bring beyond Llama: logit soft-capping (Gemma 2), learned sinks (gpt-oss); their
refusals name the mechanism and the feature. The shared model-level properties run on them in test_models.py."""

import pytest
import torch
from transformers import DynamicCache

import hf_attn_plus

from .models import COVERING, left_pad, tiny_model, token_batch, with_mechanism


def test_softcap_and_sinks_change_the_output():
    """Without them the covering-budget tests on these families would not show they are honoured."""
    ids = token_batch(1, 20)
    capped, uncapped = tiny_model("gemma2"), tiny_model("gemma2", attn_logit_softcapping=None)
    assert (capped(ids).logits - uncapped(ids).logits).abs().max() > 0.1
    model = tiny_model("gpt_oss")
    with_sinks = model(ids).logits
    for layer in model.model.layers:
        layer.self_attn.sinks.data.fill_(-1e9)
    assert (model(ids).logits - with_sinks).abs().max() > 0.1


@pytest.mark.parametrize("arch, feature", [("gemma2", "softcap"), ("gpt_oss", "s_aux")])
def test_mechanisms_that_cannot_honour_them_refuse(arch, feature):
    ids = token_batch(1, 12)
    model = with_mechanism(tiny_model(arch), "lighthouse", {})
    with pytest.raises(hf_attn_plus.UnsupportedModelError, match=rf"'lighthouse' does not implement .*\({feature}\)"):
        model(ids)
    with_mechanism(model, "topk", dict(COVERING["topk"], backend="kernel"))
    refusal = rf"'topk': backend='kernel' does not implement .*\({feature}\) of layer 0"
    with pytest.raises(hf_attn_plus.OptionError, match=refusal):
        model(ids)


def test_sink_gradients_equal_eager():
    ids = token_batch(2, 21, seed=6)
    grads = []
    for name in (None, "topk"):
        model = tiny_model("gpt_oss").train()
        if name:
            with_mechanism(model, name, COVERING[name])
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[1].self_attn.sinks.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_layers_option_chooses_where_the_mechanism_runs():
    """Gemma 3's layer 0 has the model's window, layer 1 is global: 'full_attention' makes only layer 1 sparse."""
    ids = token_batch(2, 29)
    model = tiny_model("gemma3_text")
    dense = model(ids).logits
    sparse = dict(budget=4, sinks=1, window=3)
    outputs = {}
    for layers in ("all", "full_attention", "sliding_attention", [1], []):
        outputs[str(layers)] = with_mechanism(model, "topk", dict(sparse, layers=layers))(ids).logits
    torch.testing.assert_close(outputs["[]"], dense, atol=1e-6, rtol=1e-5)  # the model's own attention everywhere
    assert torch.equal(outputs["full_attention"], outputs["[1]"])
    for one, other in [("all", "full_attention"), ("full_attention", "sliding_attention"), ("sliding_attention", "[]")]:
        assert (outputs[one] - outputs[other]).abs().max() > 1e-3, (one, other)


def test_layers_option_keeps_cached_generation_exact():
    options = dict(budget=4, sinks=1, window=3, layers="full_attention")
    model = with_mechanism(tiny_model("gemma3_text"), "topk", options)
    ids = token_batch(1, 12, seed=3)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    recomputed = model(out.sequences, use_cache=False).logits
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, recomputed[:, ids.shape[1] - 1 + step], atol=1e-4, rtol=1e-4)


def test_layers_option_errors_name_the_value():
    model = with_mechanism(tiny_model("gemma3_text"), "topk", dict(layers=[0, 2]))
    with pytest.raises(hf_attn_plus.OptionError, match=r"option 'layers' got \[0, 2\]; allowed: layer indices < 2"):
        model(token_batch(1, 5))
    with pytest.raises(hf_attn_plus.OptionError, match=r"option 'layers' got 'global'; allowed: one of 'all', 'full_"):
        hf_attn_plus.set_attention(model, "topk", layers="global")


def test_dense_first_and_last_keep_those_layers_on_the_models_own_attention():
    """dense_first / dense_last take layers out of whatever `layers` selects: dense_first=1 on two layers equals
    layers=[1], dense_last=1 equals layers=[0]; counts leaving no layer are refused, naming both values."""
    ids = token_batch(2, 29)
    model = tiny_model("gemma3_text")
    sparse = dict(budget=4, sinks=1, window=3)
    outputs = {}
    for name, extra in [("first", dict(dense_first=1)), ("[1]", dict(layers=[1])), ("last", dict(dense_last=1)),
                        ("[0]", dict(layers=[0])), ("all", {}), ("full+first", dict(layers="full_attention", dense_first=1))]:
        outputs[name] = with_mechanism(model, "topk", dict(sparse, **extra))(ids).logits
    assert torch.equal(outputs["first"], outputs["[1]"]) and torch.equal(outputs["last"], outputs["[0]"])
    assert torch.equal(outputs["full+first"], outputs["[1]"])  # layer 0 is windowed and first: dense either way
    assert (outputs["first"] - outputs["all"]).abs().max() > 1e-3 and (outputs["last"] - outputs["all"]).abs().max() > 1e-3
    with_mechanism(model, "topk", dict(sparse, dense_first=1, dense_last=1))
    refusal = r"dense_first=1 and dense_last=1 leave none of the model's 2 layers to the mechanism; allowed: dense_first \+ dense_last < 2"
    with pytest.raises(hf_attn_plus.OptionError, match=refusal):
        model(ids)


def test_dense_first_gives_weights_and_recurrent_state_only_to_the_other_layers():
    """The mask is sized by layer 0 (every key); the recurrent layer 1 holds only the new one: its positions are the
    trailing slots', so left-padded cached decode equals the full forward."""
    model = with_mechanism(tiny_model("llama"), "linear", dict(dense_first=1))
    assert [layer.self_attn.attn_plus is None for layer in model.model.layers] == [True, False]
    ids, mask, _ = left_pad([token_batch(1, 12, seed=1)[0], token_batch(1, 9, seed=2)[0]])
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits
                  for t in range(5, ids.shape[1])]
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicLayer", "RecurrentStateLayer"]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-4)


def test_layers_option_gives_weights_only_to_the_layers_it_selects():
    model = with_mechanism(tiny_model("llama"), "linear", dict(layers=[0]))
    assert [layer.self_attn.attn_plus is None for layer in model.model.layers] == [False, True]
    ids = token_batch(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(5, ids.shape[1])]
    # Layer 1 runs the model's own attention on its own cache layer, which keeps every key.
    assert [type(layer).__name__ for layer in cache.layers] == ["RecurrentStateLayer", "DynamicLayer"]
    assert cache.layers[1].keys.shape[2] == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    with_mechanism(model, "linear", dict(layers=[0, 2]))
    with pytest.raises(hf_attn_plus.OptionError, match=r"option 'layers' got \[0, 2\]; allowed: layer indices < 2"):
        model(ids)


def test_linear_family_refuses_a_window_the_config_did_not_declare_when_built():
    """Weights are checked against the config's layer types when built; a window appearing later (the config edited
    afterwards) is refused by the attention call rather than attended past."""
    model = with_mechanism(tiny_model("mistral"), "linear", {})  # built without a window
    model.config.sliding_window = 10  # Mistral's mask reads it on every forward
    refusal = (r"'linear' keeps a state over every earlier key and does not implement the model's own sliding window "
               r"\(window 10 in layer 0\); set option layers='full_attention'")
    with pytest.raises(hf_attn_plus.UnsupportedModelError, match=refusal):
        model(token_batch(1, 12))


def test_lighthouse_training_in_a_windowed_layer_is_refused():
    model = with_mechanism(tiny_model("gemma3_text"), "lighthouse", {}).train()
    refusal = r"'lighthouse' .* \(window 10 in layer 0\); set option layers='full_attention'"
    with pytest.raises(hf_attn_plus.UnsupportedModelError, match=refusal):
        model(token_batch(1, 12))
    with_mechanism(model, "lighthouse", dict(layers="full_attention"))(token_batch(1, 12))


def test_kernel_backend_refuses_the_model_window():
    model = with_mechanism(tiny_model("gemma3_text"), "topk", dict(COVERING["topk"], backend="kernel"))
    refusal = r"backend='kernel' does not implement the model's own sliding window \(10\) of layer 0"
    with pytest.raises(hf_attn_plus.OptionError, match=refusal):
        model(token_batch(1, 5))
