"""Attention-transfer pairs for the distillation recipe, and PEFT adapters on the mechanism's weights."""

import pytest
import torch
import torch.nn.functional as F

from hf_attn_plus.distill import attention_pairs

from .conftest import build


def test_attention_pairs_give_student_and_dense_teacher_per_layer():
    model = build("llama", "hybrid", feature_map="hedgehog", window=3)
    dense = build("llama", "hybrid", feature_map="hedgehog", window=3)
    dense.set_attn_implementation("sdpa")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for name, param in model.named_parameters():  # what the recipe trains: only the mechanism's weights
        param.requires_grad_(".attn_plus." in name)
    with attention_pairs(model) as pairs:
        out = model(ids, use_cache=False).logits
    assert sorted(pairs) == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(out, dense(ids).logits)  # propagating the teacher: the dense model's forward
    loss = sum(F.mse_loss(p.student, p.teacher) for p in pairs.values())
    assert loss > 0 and not pairs[0].teacher.requires_grad
    loss.backward()
    mechanism = {n for n, p in model.named_parameters() if ".attn_plus." in n}
    assert mechanism and all(model.get_parameter(n).grad.abs().sum() > 0 for n in mechanism)
    # Outside the block the mechanism is itself again.
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, out)


def test_lora_on_mechanism_weights_round_trips_and_missing_modules_raise(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_attn_plus.adapters import AdapterMismatchError, check_adapter, load_adapter

    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    options = dict(feature_map="hedgehog", window=3)
    config = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["attn_plus.q_map", "attn_plus.k_map"],
                        modules_to_save=None, init_lora_weights=False)
    tuned = get_peft_model(build("llama", "hybrid", **options), config)
    with torch.no_grad():
        base = tuned.get_base_model()
        with tuned.disable_adapter():
            untouched = base(ids).logits
        expected = tuned(ids).logits
    assert not torch.allclose(expected, untouched)  # the adapter on attn_plus really acts
    tuned.save_pretrained(tmp_path)

    loaded = load_adapter(build("llama", "hybrid", **options), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)

    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(tuned.get_base_model().config)  # direct construction: no patched class, no attn_plus
    with pytest.raises(AdapterMismatchError, match="layers.0.self_attn.attn_plus"):
        check_adapter(plain, str(tmp_path))
    with pytest.raises(AdapterMismatchError, match="attn_plus.q_map"):
        check_adapter(build("llama", "hybrid", feature_map="elu", window=3), str(tmp_path))
