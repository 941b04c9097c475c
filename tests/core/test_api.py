"""Public contract: registration, options in config.hf_attn_plus, validation errors, save/load, unsupported models."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import hf_attn_plus
from hf_attn_plus.attention import attention_forward, check_model_supported
from hf_attn_plus.tiny import tiny_config

from .models import COVERING, MECHANISMS, SPARSE, tiny_model, token_batch, with_mechanism


def test_every_mechanism_is_registered_for_attention_and_masks():
    names = {m["name"] for m in hf_attn_plus.mechanisms()}
    assert set(MECHANISMS) <= names
    for name in names:
        assert f"hf_attn_plus:{name}" in AttentionInterface._global_mapping
        assert f"hf_attn_plus:{name}" in AttentionMaskInterface._global_mapping


def test_mechanisms_describe_family_options_and_training():
    table = {m["name"]: m for m in hf_attn_plus.mechanisms()}
    topk = table["topk"]
    assert topk["family"] == "sparse" and topk["training_free"] is True
    assert topk["options"]["budget"]["default"] == 256
    assert "integer >= 1" in topk["options"]["budget"]["allowed"]
    assert {"logit_scale", "backend"} <= set(topk["options"])


def test_from_pretrained_options_and_save_load_round_trip(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", attn_implementation="hf_attn_plus:topk", hf_attn_plus=SPARSE["topk"]
    )
    assert model.config._attn_implementation == "hf_attn_plus:topk"
    ids = token_batch(1, 20)
    logits = model(ids).logits
    model.save_pretrained(tmp_path / "sparse")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert reloaded.config._attn_implementation == "hf_attn_plus:topk"
    assert reloaded.config.hf_attn_plus == SPARSE["topk"]
    assert torch.equal(reloaded(ids).logits, logits)
    # Re-saving the reloaded model keeps the mechanism (transformers consumes the key on load).
    reloaded.save_pretrained(tmp_path / "again")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "again").config._attn_implementation == "hf_attn_plus:topk"


def test_dense_configs_do_not_gain_plugin_keys(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "hf_attn_plus" not in text


def test_loading_without_the_plugin_fails_naming_it(tmp_path):
    with_mechanism(tiny_model("llama"), "sliding_window", SPARSE["sliding_window"]).save_pretrained(tmp_path)
    script = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "hf_attn_plus:sliding_window" in result.stderr


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"budget": 0}, "option 'budget' got 0; allowed: an integer >= 1"),
        ({"budget": True}, "option 'budget' got True"),
        ({"budget": "many"}, "option 'budget' got 'many'"),
        ({"window_size": 8}, "has no option 'window_size'; its options are: budget, sinks, window"),
        ({"logit_scale": "sqrt"}, "option 'logit_scale' got 'sqrt'; allowed: one of 'none', 'log'"),
        ({"backend": "cuda"}, "option 'backend' got 'cuda'; allowed: one of 'auto', 'reference', 'kernel', 'flex'"),
    ],
)
def test_bad_options_name_option_value_and_rule(options, fragment):
    model = tiny_model("llama")
    with pytest.raises(hf_attn_plus.OptionError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        hf_attn_plus.set_attention(model, "topk", **options)
    assert model.config._attn_implementation == "sdpa"  # nothing changed


def test_bad_options_given_at_load_time_fail_on_first_forward(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="hf_attn_plus:dilated", hf_attn_plus={"dilation": -2}
    )
    with pytest.raises(hf_attn_plus.OptionError, match="option 'dilation' got -2"):
        model(token_batch(1, 5))


def test_unknown_mechanism_lists_the_available_ones():
    with pytest.raises(hf_attn_plus.OptionError, match="unknown hf_attn_plus mechanism 'topp'; available: .*topk"):
        hf_attn_plus.set_attention(tiny_model("llama"), "topp")


def test_model_without_the_attention_interface_is_refused():
    config = AutoConfig.for_model("mamba", num_hidden_layers=1, hidden_size=16, vocab_size=64, state_size=4)
    refusal = r"AttentionInterface; MambaForCausalLM \(model_type 'mamba'\) does not"
    with pytest.raises(hf_attn_plus.UnsupportedModelError, match=refusal):
        hf_attn_plus.set_attention(AutoModelForCausalLM.from_config(config), "topk")


def test_encoder_decoder_and_bidirectional_configs_are_refused():
    with pytest.raises(hf_attn_plus.UnsupportedModelError, match="model_type 't5' is an encoder-decoder"):
        check_model_supported(AutoConfig.for_model("t5"))
    with pytest.raises(hf_attn_plus.UnsupportedModelError, match="'llama' config sets is_causal=False"):
        check_model_supported(tiny_config("llama", is_causal=False))


def test_kernel_backend_without_a_kernel_is_an_error():
    mechanism = dataclasses.replace(hf_attn_plus.get_mechanism("dilated"), kernel=None)
    model = with_mechanism(tiny_model("llama"), "dilated", {"backend": "kernel"})
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 8, 4, 8)
    kv = torch.randn(1, 2, 4, 8)
    with pytest.raises(hf_attn_plus.OptionError, match="has no kernel; option 'backend' allowed here"):
        attention_forward(attn, q, kv, kv, None, mechanism=mechanism)


def test_switching_back_to_dense_and_between_mechanisms():
    model = tiny_model("llama")
    ids = token_batch(1, 24)
    dense = model(ids).logits
    sparse = with_mechanism(model, "sliding_window", SPARSE["sliding_window"])(ids).logits
    hf_attn_plus.set_attention(model, "sdpa")
    assert model.config.hf_attn_plus is None
    torch.testing.assert_close(model(ids).logits, dense)
    hf_attn_plus.set_attention(model, "hf_attn_plus:sliding_window", **SPARSE["sliding_window"])
    torch.testing.assert_close(model(ids).logits, sparse)


def test_logit_scale_is_identity_within_train_length_and_active_beyond():
    model = tiny_model("llama")
    ids = token_batch(1, 30)
    dense = model(ids).logits
    options = dict(COVERING["sliding_window"], logit_scale="log", logit_scale_c=0.5)
    within = with_mechanism(model, "sliding_window", dict(options, train_length=30))(ids).logits
    torch.testing.assert_close(within, dense, atol=2e-5, rtol=1e-4)
    beyond = with_mechanism(model, "sliding_window", dict(options, train_length=4))(ids).logits
    assert (beyond[:, :4] - dense[:, :4]).abs().max() < 2e-5  # rows with n <= 4 keys are untouched
    assert (beyond[:, 10:] - dense[:, 10:]).abs().max() > 1e-3


def test_peft_model_can_switch_mechanism():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = token_batch(1, 20)
    dense = model(ids).logits
    hf_attn_plus.set_attention(model, "topk", **SPARSE["topk"])
    assert model.config._attn_implementation == "hf_attn_plus:topk"
    assert (model(ids).logits - dense).abs().max() > 1e-3


def test_forced_kernel_refuses_attention_dropout():
    model = with_mechanism(tiny_model("llama", attention_dropout=0.1), "topk", {"backend": "kernel"}).train()
    with pytest.raises(hf_attn_plus.OptionError, match="does not implement attention dropout=0.1"):
        model(token_batch(1, 6))
