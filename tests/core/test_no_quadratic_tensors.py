"""Structural: a sparse forward and backward never allocates a tensor of one head's [q_len, kv_len] size.

Every tensor an op creates is recorded through a TorchDispatchMode (deterministic; no timing), on a tiny Llama at a
moderate length. The recorder itself is checked on the dense reference, which must trip it.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hf_attn_plus
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
}


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


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_sparse_forward_and_backward_build_nothing_quadratic(name):
    model = tiny_model("llama", max_position_embeddings=LENGTH).train()
    hf_attn_plus.set_attention(model, name, **OPTIONS[name])
    ids = torch.randint(3, 128, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding takes the padded path too
    with LargestTensor() as seen:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert seen.largest < LENGTH * LENGTH, f"{name}: {seen.op} made a tensor of {seen.largest} elements"
