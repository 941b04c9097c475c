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


@pytest.mark.parametrize("arch, options, projection", [
    ("llama", dict(feature_map="hedgehog", window=3), "q_proj"),
    ("mistral", dict(feature_map="hedgehog", window=2), "q_proj"),
    ("phi3", dict(feature_map="hedgehog", window=3), "qkv_proj"),  # fused q/k/v
    ("olmo2", dict(feature_map="hedgehog", window=3), "q_proj"),  # q/k norms
    # Layer 0 is windowed: only layer 1 has weights, and the adapter reaches them there.
    ("gemma3_text", dict(feature_map="hedgehog", window=3, layers="full_attention"), "q_proj"),
])
def test_lora_training_steps_train_the_adapter_on_mechanism_weights_only(arch, options, projection):
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(0))  # past Gemma 3's window (10)
    config = LoraConfig(r=2, target_modules=[projection], target_parameters=["attn_plus.q_map", "attn_plus.k_map"],
                        init_lora_weights=False)
    tuned = get_peft_model(build(arch, "hybrid", **options), config).train()
    trainable = {name: p for name, p in tuned.named_parameters() if p.requires_grad}
    on_weights = [name for name in trainable if ".attn_plus." in name]
    layers_with_weights = sum(layer.self_attn.attn_plus is not None for layer in tuned.get_base_model().model.layers)
    assert len(on_weights) == 2 * 2 * layers_with_weights  # lora_A and lora_B of q_map and k_map per layer
    frozen = {name: p.detach().clone() for name, p in tuned.named_parameters() if not p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.05)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = tuned(ids, labels=ids).loss
        loss.backward()
        assert all(trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0 for name in on_weights)
        optimizer.step()
        losses.append(loss.item())
    assert all(not torch.equal(before[name], trainable[name]) for name in on_weights)
    assert all(torch.equal(frozen[name], p) for name, p in tuned.named_parameters() if name in frozen)
    assert losses[-1] < losses[0]
