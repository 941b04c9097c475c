"""What the decoder families bring beyond Llama: logit soft-capping (Gemma 2), learned sinks (gpt-oss); their
refusals name the mechanism and the feature. The shared model-level properties run on them in test_models.py."""

import pytest
import torch

import hf_attn_plus

from .models import COVERING, tiny_model, token_batch, with_mechanism


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
    model = with_mechanism(tiny_model(arch), "santa", dict(samples=2, window=2))
    with pytest.raises(hf_attn_plus.UnsupportedModelError, match=rf"'santa' does not implement .*\({feature}\)"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    with_mechanism(model, "topk", dict(COVERING["topk"], backend="kernel"))
    with pytest.raises(hf_attn_plus.OptionError, match=rf"'topk': backend='kernel' does not implement .*\({feature}\)"):
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
