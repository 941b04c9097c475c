"""Structural: the kernel path never allocates a tensor of one head's [q_len, kv_len] size, for every kind of
selection (rule only, block lists, token lists, gathered links), forward and backward.

Tensors are recorded through a TorchDispatchMode (as tests/core/test_no_quadratic_tensors.py). The torch-side glue
(kernel_inputs.key_set, tile_lists.tiles_for) is checked alone, where the record is complete; the whole kernel call
too, though under the Triton interpreter the kernels' own work may not pass through dispatch.
"""

import pytest
import torch

from hf_attn_plus.kernel_inputs import fixed_spans, key_set, position_slots, visibility
from hf_attn_plus.kernels.gathered_attention.function import gathered_attention
from hf_attn_plus.kernels.tile_lists import tiles_for
from hf_attn_plus.masking import TokenPositions, context_from_positions
from hf_attn_plus.registry import get_mechanism
from hf_attn_plus.mechanisms.stochastic_routing import link_positions

from core.test_no_quadratic_tensors import LargestTensor
from kernel_cases import attention_inputs

LENGTH = 320  # above the selections' own chunk of 64 query rows x 4 heads of scores
OPTIONS = {
    "sliding_window": dict(window=16, sinks=4),
    "dilated": dict(window=16, dilation=8),
    "block_topk": dict(block_size=16, budget=2),
    "block_sparse": dict(block_size=16, threshold=0.5),
    "topk": dict(budget=8, window=8, sinks=2),
}


def padded_problem(requires_grad):
    query, key, value = attention_inputs(1, 4, 2, LENGTH, LENGTH, 16, 16, torch.float32, requires_grad=requires_grad)
    padding = torch.ones(1, LENGTH, dtype=torch.bool)
    padding[0, :5] = False  # left padding
    ctx = context_from_positions(TokenPositions.from_padding(padding, 1, LENGTH, LENGTH, 0, 0, "cpu"))
    return query, key, value, ctx


def assert_linear(seen, what):
    assert seen.largest < LENGTH * LENGTH, f"{what}: {seen.op} made a tensor of {seen.largest} elements"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_glue_builds_nothing_quadratic(name):
    query, key, value, ctx = padded_problem(requires_grad=False)
    mechanism = get_mechanism(name)
    opts = mechanism.resolve_options(OPTIONS[name])
    with LargestTensor() as seen:
        keys = key_set(ctx, mechanism.select(query, key, ctx, opts))
        tiles = tiles_for(keys, 4, 2, LENGTH, 16, 16)
    assert_linear(seen, name)
    assert tiles.counts.sum() < tiles.counts.numel() * tiles.num_tiles  # and the tile lists are sparse


@pytest.mark.parametrize("name", ["sliding_window", "block_sparse", "topk"])
def test_kernel_forward_and_backward_build_nothing_quadratic(name):
    query, key, value, ctx = padded_problem(requires_grad=True)
    mechanism = get_mechanism(name)
    opts = mechanism.resolve_options(dict(OPTIONS[name], backend="kernel"))
    with LargestTensor() as seen:
        mechanism.kernel(query, key, value, ctx, opts, 0.25).sum().backward()
    assert_linear(seen, name)


def test_gathered_links_build_nothing_quadratic():
    query, key, value, ctx = padded_problem(requires_grad=True)
    opts = get_mechanism("stochastic_routing").resolve_options(dict(window=8, links=4, sinks=2))
    with LargestTensor() as seen:
        spans = fixed_spans(ctx, opts.sinks, opts.window)
        slots = position_slots(ctx, link_positions(ctx, 4, opts, layer=0))
        gathered_attention(query, key, value, visibility(ctx), spans, slots, 0.25).sum().backward()
    assert_linear(seen, "stochastic_routing")
