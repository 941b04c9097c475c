"""backend='flex': FlexAttention over a mechanism's selection equals dense softmax over the oracle mask (padding on
either side, GQA, odd lengths, decode-sized calls, tiles smaller than the sequence), its block mask visits only the
tiles the selection can keep, and what it cannot run is refused by name. FlexAttention runs eagerly here (compiling
takes tens of seconds per process); benchmarks/long_context.py --backend flex runs it compiled."""

import pytest
import torch

import hf_attn_plus
from hf_attn_plus import flex_attention
from hf_attn_plus.flex_attention import FlexUnsupported, flex_selected_attention, selection_block_mask
from hf_attn_plus.masking import TokenPositions, build_context, context_from_positions, visible_from_mask
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.structure import PositionRule, Selection, dense_keep

from .models import left_pad, tiny_model, token_batch, with_mechanism
from .test_selection import BATCH, DIM, KV_HEADS, Q_HEADS, padded_inputs

OPTIONS = {
    "sliding_window": dict(window=9, sinks=2),
    "dilated": dict(dilation=3, window=5),
    "block_topk": dict(block_size=4, budget=3, sink_blocks=1, local_blocks=1),
    "block_topk/group": dict(block_size=4, budget=2, choose_per="group"),
    "block_sparse": dict(block_size=4, threshold=0.6),
}


pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def eager_small_tiles(monkeypatch):
    monkeypatch.setattr(flex_attention, "COMPILE", False)
    monkeypatch.setattr(flex_attention, "TILE", 16)  # several tiles per sequence at test lengths


def inputs(kv_len, q_len, seed):
    query, key, _, mask = padded_inputs(kv_len, q_len, seed)
    value = torch.randn(BATCH, KV_HEADS, kv_len, DIM + 3, generator=torch.Generator().manual_seed(seed + 1))
    return query, key, value, build_context(visible_from_mask(mask, BATCH, q_len, kv_len, "cpu"))


def assert_matches_oracle(query, key, value, ctx, selection):
    with torch.no_grad():
        out = flex_selected_attention(query, key, value, ctx, selection, 0.4)
    keep = dense_keep(ctx, selection, query.shape[1])
    expected = masked_attention(query, key, value, keep, 0.4)[0]
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("kv_len,q_len", [(61, 61), (61, 1), (45, 3)])
def test_mechanism_selection_equals_dense(name, kv_len, q_len):
    query, key, value, ctx = inputs(kv_len, q_len, seed=kv_len + q_len)
    mechanism = hf_attn_plus.get_mechanism(name.split("/")[0])
    selection = mechanism.select(query, key, ctx, mechanism.resolve_options(OPTIONS[name]))
    assert_matches_oracle(query, key, value, ctx, selection)


@pytest.mark.parametrize(
    "rule",
    [PositionRule(sinks=3, window=17), PositionRule(window=2**62), PositionRule(block_size=5, local_blocks=2),
     PositionRule(sinks=1, window=4, dilation=7), PositionRule(sinks=40)],
    ids=["sinks-window", "dense", "local-blocks", "dilated", "sinks-only"],
)
def test_rules_equal_dense(rule):
    query, key, value, ctx = inputs(70, 70, seed=3)
    assert_matches_oracle(query, key, value, ctx, Selection(rule))


def test_block_lists_per_head_and_shared():
    query, key, value, ctx = inputs(53, 53, seed=5)
    g = torch.Generator().manual_seed(0)
    lists = torch.randint(-1, 13, (BATCH, Q_HEADS, 53, 4), generator=g)
    shared = torch.randint(-1, 13, (BATCH, 1, 53, 2), generator=g)
    for blocks in (lists, shared, lambda rows: lists[:, :, rows]):
        assert_matches_oracle(query, key, value, ctx, Selection(PositionRule(window=2), block_size=4, blocks=blocks))


def test_block_mask_visits_what_the_window_needs():
    """A window of 40 at 1024 tokens: each query tile visits at most the tiles the window spans plus the sinks'."""
    length = 1024
    positions = TokenPositions.from_padding(None, 1, length, length, 0, 0, "cpu")
    mask = selection_block_mask(context_from_positions(positions), Selection(PositionRule(sinks=4, window=40)), Q_HEADS)
    visited = mask.kv_num_blocks + mask.full_kv_num_blocks
    assert int(visited.max()) <= -(-40 // 16) + 2
    assert int(mask.full_kv_num_blocks.sum()) > 0  # the window's inside runs without the mask_mod


def test_model_generation_equals_reference_backend():
    ids, mask = left_pad([token_batch(1, 21, seed=1)[0], token_batch(1, 13, seed=2)[0]])[:2]
    runs = []
    for backend in ("reference", "flex"):
        model = with_mechanism(tiny_model("llama"), "sliding_window", dict(window=6, sinks=2, backend=backend))
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].scores, runs[1].scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("topk", dict(budget=3), "lists tokens per query"),
        ("sliding_window", dict(window=4, logit_scale="log"), "logit_scale='log'"),
        ("gated_delta", dict(), "computes its own attention"),
    ],
)
def test_refusals_name_what_is_unsupported(name, options, match):
    model = with_mechanism(tiny_model("llama"), name, dict(options, backend="flex"))
    with pytest.raises((FlexUnsupported, hf_attn_plus.OptionError), match=match), torch.no_grad():
        model(token_batch(1, 8))


def test_cpu_backward_is_refused():
    model = with_mechanism(tiny_model("llama"), "sliding_window", dict(window=4, backend="flex")).train()
    with pytest.raises(FlexUnsupported, match="no backward on CPU"):
        model(token_batch(1, 8), labels=token_batch(1, 8)).loss.backward()
