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
