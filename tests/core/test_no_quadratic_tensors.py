"""Structural: a sparse forward and backward never allocates a tensor of one head's [q_len, kv_len] size, and no
selection mechanism reads the dense visibility mask (AttentionContext.visible) on its reference path, in training or
in a cached decode step.

Every tensor an op creates is recorded through a TorchDispatchMode (deterministic; no timing), on a tiny Llama at a
moderate length. The recorder itself is checked on the dense reference, which must trip it.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hf_attn_plus
from hf_attn_plus.masking import AttentionContext
from hf_attn_plus.mechanisms.indexer_topk import indexer_loss
from hf_attn_plus.reference import masked_attention

from .models import tiny_model

LENGTH = 1024
OPTIONS = {
    "sliding_window": dict(window=32, sinks=4),
    "dilated": dict(window=32, dilation=16),
    "topk": dict(budget=32, window=16, sinks=4),
    "block_topk": dict(block_size=16, budget=2),
    "block_sparse": dict(block_size=16, threshold=0.5),
    "stochastic_routing": dict(window=16, links=8),
    "indexer_topk": dict(budget=32, window=16, sinks=4),
    "indexer_topk/warmup": dict(budget=32, window=16, sinks=4, stage="warmup"),
    "lighthouse/blocks": dict(form="blocks", block_size=16, budget=2),
    "lighthouse/pyramid": dict(levels=2, factor=4, budget=8),
    "santa": dict(samples=16, window=16, sinks=4),
}
# What a training step backpropagates besides the language-modelling loss.
EXTRA_LOSS = {"indexer_topk": indexer_loss}


class LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest:
                self.largest, self.op = tensor.numel(), func
        return out


def test_the_recorder_sees_a_dense_mask():
    q = torch.randn(1, 2, 64, 8)
    kv = torch.randn(1, 1, 64, 8)
    with LargestTensor() as seen:
        masked_attention(q, kv, kv, torch.ones(1, 1, 64, 64, dtype=torch.bool), 1.0)
    assert seen.largest >= 64 * 64


def _model(name, length=LENGTH):
    model = tiny_model("llama", max_position_embeddings=length)
    hf_attn_plus.set_attention(model, name.split("/")[0], **OPTIONS[name])
    return model


def _left_padded(length):
    ids = torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding takes the padded path too
    return ids, mask


def _train_step(model, name, ids, mask):
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    extra = EXTRA_LOSS.get(name.split("/")[0])
    (loss if extra is None else loss + extra(model)).backward()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_sparse_forward_and_backward_build_nothing_quadratic(name):
    model = _model(name).train()
    ids, mask = _left_padded(LENGTH)
    with LargestTensor() as seen:
        _train_step(model, name, ids, mask)
    assert seen.largest < LENGTH * LENGTH, f"{name}: {seen.op} made a tensor of {seen.largest} elements"


@pytest.fixture
def no_dense_visibility(monkeypatch):
    def refuse(ctx):
        raise AssertionError("the reference path read the dense visibility mask ctx.visible")

    monkeypatch.setattr(AttentionContext, "visible", property(refuse))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_reference_paths_never_read_the_dense_visibility(name, no_dense_visibility):
    length = 48
    model = _model(name, length)
    ids, mask = _left_padded(length)
    _train_step(model.train(), name, ids, mask)
    model.eval()
    with torch.no_grad():  # a prefill, then a cached decode step (santa samples there)
        prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=prefill.past_key_values)
