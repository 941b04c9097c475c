"""Block-mode decode: from chosen key blocks straight to tiles, no per-token mask; equals the reference selection
followed by masked_attention, and reads exactly the tiles the chosen blocks cover."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus

from hf_attn_plus.kernels.block_scoring import BlockSummaries
from hf_attn_plus.kernels.selected_decode.wrapper import decode_rows, selected_block_decode
from hf_attn_plus.kernels.tile_lists import tiles_from_blocks, tiles_from_keep
from hf_attn_plus.masking import build_context
from hf_attn_plus.mechanisms import block_topk
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.structure import Selection, dense_keep
from hf_attn_plus.selection import kept_indices, quest_block_scores
from hf_attn_plus.tiny import tiny_config

from kernel_cases import attention_inputs


def decode_context(kv_len, q_len, pads):
    """Causal visibility of the last q_len slots with each batch row left-padded by pads[row]."""
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    visible = causal.expand(len(pads), 1, q_len, kv_len).clone()
    for row, pad in enumerate(pads):
        visible[row, ..., :pad] = False
    return build_context(visible)


def reference_choice(query, key, ctx, opts):
    """The chosen blocks [B, Hq, q, num_blocks], their key spans, and the token keep mask the reference expands."""
    summaries = BlockSummaries(opts.block_size)
    summaries.extend(key, ctx.key_pos)
    listed = block_topk.chosen_blocks(query, ctx, opts, summaries.bounds, quest_block_scores)
    chosen = block_topk.block_map(ctx, opts, listed, summaries.bounds[0].shape[2])
    keep = dense_keep(ctx, block_topk.select(query, key, ctx, opts), query.shape[1])
    as_lists = Selection(block_size=opts.block_size, blocks=kept_indices(chosen, chosen.shape[-1]))
    assert torch.equal(dense_keep(ctx, as_lists, query.shape[1]), keep)
    return chosen, summaries.spans, keep


# (q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, block_size, tile)
CASES = [
    (4, 4, 1, 37, 64, 64, torch.float32, 4, 16),  # MHA, odd length, blocks smaller than tiles
    (4, 2, 1, 53, 12, 8, torch.float16, 6, 16),  # GQA 2, DeepSeek dims, blocks straddle tiles
    (8, 2, 2, 77, 64, 64, torch.float16, 8, 16),  # GQA 4, two queries (speculative decode): causal inside a block
    (4, 1, 3, 61, 12, 8, torch.float32, 5, 16),  # GQA 4, three queries, DeepSeek dims
]


@pytest.mark.parametrize("q_heads,kv_heads,q_len,kv_len,head_dim,v_dim,dtype,block_size,tile", CASES)
def test_equals_reference_selection(q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, block_size, tile):
    q, k, v = attention_inputs(2, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, seed=kv_len)
    ctx = decode_context(kv_len, q_len, pads=[0, 7])
    opts = SimpleNamespace(block_size=block_size, budget=2, sink_blocks=1, local_blocks=1, choose_per="head")
    chosen, spans, keep = reference_choice(q, k, ctx, opts)
    assert (keep != ctx.visible).any()  # the budget drops keys
    out = selected_block_decode(q, k, v, ctx.visible, ctx.key_pos.flatten(1), chosen, spans, block_size, 0.3, tile)
    expected = masked_attention(q, k, v, keep, scaling=0.3)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_mechanism_kernel_equals_reference():
    """block_topk's kernel (Triton Quest scores, top blocks, block-mode decode) on a left-padded decode step."""
    q, k, v = attention_inputs(2, 8, 2, 1, 70, 64, 64, torch.float32, seed=3)
    ctx = decode_context(70, 1, pads=[0, 13])
    opts = block_topk.MECHANISM.resolve_options(dict(block_size=8, budget=3))
    out = block_topk.kernel(q, k, v, ctx, opts, 0.125)
    expected = masked_attention(q, k, v, dense_keep(ctx, block_topk.select(q, k, ctx, opts), 8), scaling=0.125)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad,block_size,tile", [(0, 8, 16), (5, 8, 16), (11, 6, 16), (3, 32, 16)])
def test_tiles_are_exactly_those_the_chosen_blocks_cover(pad, block_size, tile):
    """Union over a KV group's query heads of the tiles covering each chosen block's slots: the same tiles the
    per-token mask needs, far fewer than the context's, and a block straddling two tiles takes both."""
    kv_len, q_heads, kv_heads = 200 + pad, 4, 2
    q, k, _ = attention_inputs(1, q_heads, kv_heads, 1, kv_len, 16, 16, torch.float32, seed=pad)
    ctx = decode_context(kv_len, 1, pads=[pad])
    opts = SimpleNamespace(block_size=block_size, budget=2, sink_blocks=1, local_blocks=1, choose_per="head")
    chosen, spans, keep = reference_choice(q, k, ctx, opts)
    block_m = decode_rows(q, k)
    tiles = tiles_from_blocks(chosen, *spans, kv_len, kv_heads, block_m, tile)
    assert torch.equal(tiles.usage, tiles_from_keep(keep, 1, q_heads, kv_heads, block_m, tile).usage)
    for kv_head in range(kv_heads):
        group_blocks = chosen[0, 2 * kv_head : 2 * kv_head + 2, 0].any(0).nonzero().flatten().tolist()
        needed = {(pad + block * block_size + i) // tile for block in group_blocks for i in range(block_size)}
        needed = {t for t in needed if t * tile < kv_len}
        listed = tiles.indices[0, kv_head, 0, : tiles.counts[0, kv_head, 0]].tolist()
        assert listed == sorted(needed)
        assert len(listed) <= len(group_blocks) * (-(-block_size // tile) + 1)
        assert len(listed) < -(-kv_len // tile)


def test_group_choice_reads_the_budget_once_per_kv_head():
    """choose_per='group': a GQA group's heads share sink + local + `budget` blocks, so each KV head's tile list covers
    exactly those (per-head choices read their union, here more); the kernel still equals the reference."""
    q, k, v = attention_inputs(1, 8, 2, 1, 203, 16, 16, torch.float32, seed=9)
    ctx = decode_context(203, 1, pads=[3])
    per_head = SimpleNamespace(block_size=8, budget=2, sink_blocks=1, local_blocks=1, choose_per="head")
    per_group = SimpleNamespace(**{**vars(per_head), "choose_per": "group"})
    head_chosen = reference_choice(q, k, ctx, per_head)[0][0, :, 0].unflatten(0, (2, 4))
    chosen, spans, keep = reference_choice(q, k, ctx, per_group)
    group_chosen = chosen[0, :, 0].unflatten(0, (2, 4))
    assert (group_chosen == group_chosen[:, :1]).all()
    assert group_chosen[:, 0].sum(-1).tolist() == [4, 4]  # 1 sink + 1 local + budget 2
    assert (head_chosen.any(1).sum(-1) > 4).any()
    out = selected_block_decode(q, k, v, ctx.visible, ctx.key_pos.flatten(1), chosen, spans, 8, 0.25, 16)
    torch.testing.assert_close(out, masked_attention(q, k, v, keep, scaling=0.25)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_model_decode_equals_reference_backend(arch):
    """Cached decode of a left-padded batch: backend='kernel' (side-cached summaries, block-mode kernel) gives the
    reference backend's logits and tokens; the prompt is prefilled once, by the reference."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa").eval()
    options = dict(block_size=4, budget=2, sink_blocks=1, local_blocks=1)
    hf_attn_plus.set_attention(model, "block_topk", backend="reference", **options)
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    with torch.no_grad():  # the cache is copied for each backend
        prefill = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    runs = {}
    for backend in ("reference", "kernel"):
        hf_attn_plus.set_attention(model, "block_topk", backend=backend, **options)
        cache, step_mask, logits = copy.deepcopy(prefill.past_key_values), mask, prefill.logits[:, -1:]
        tokens, step_logits = [], []
        for _ in range(4):
            tokens.append(logits.argmax(-1))
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            position = step_mask.sum(-1, keepdim=True) - 1
            with torch.no_grad():
                logits = model(tokens[-1], attention_mask=step_mask, position_ids=position, past_key_values=cache).logits
            step_logits.append(logits)
        runs[backend] = torch.cat(tokens, 1), torch.cat(step_logits, 1)
    assert torch.equal(runs["kernel"][0], runs["reference"][0])
    torch.testing.assert_close(runs["kernel"][1], runs["reference"][1], atol=2e-5, rtol=1e-4)
