"""block_topk decode: Quest scores from the block summaries, the chosen blocks as sorted lists, and the decode
kernel over only the tiles those blocks (and the sink and local blocks) cover; no per-token mask. Equals the
reference selection followed by masked_attention."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus

from hf_attn_plus.kernel_inputs import key_set
from hf_attn_plus.kernels.selected_decode.wrapper import decode_rows
from hf_attn_plus.kernels.tile_lists import mask_tile_usage, tiles_for
from hf_attn_plus.masking import build_context
from hf_attn_plus.mechanisms import block_topk
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.structure import dense_keep
from hf_attn_plus.tiny import tiny_config

from kernel_cases import attention_inputs, tile_map


def decode_context(kv_len, q_len, pads):
    """The last q_len slots as queries, batch row i left-padded by pads[i] slots."""
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    visible = causal.expand(len(pads), 1, q_len, kv_len).clone()
    for row, pad in enumerate(pads):
        visible[row, ..., :pad] = False
    return build_context(visible)


def options(**overrides):
    defaults = dict(budget=2, sink_blocks=1, local_blocks=1, score="bound")  # Quest's bound: the scoring kernel
    return block_topk.MECHANISM.resolve_options({**defaults, **overrides})


# (q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, block_size)
CASES = [
    (4, 4, 1, 37, 64, 64, torch.float32, 4),  # MHA, odd length, blocks smaller than tiles
    (4, 2, 1, 53, 12, 8, torch.float16, 6),  # GQA 2, DeepSeek dims, blocks straddle tiles
    (8, 2, 2, 77, 64, 64, torch.float16, 8),  # GQA 4, two queries (speculative decode): causal inside a block
    (4, 1, 3, 61, 12, 8, torch.float32, 5),  # GQA 4, three queries, DeepSeek dims
]


@pytest.mark.parametrize("q_heads,kv_heads,q_len,kv_len,head_dim,v_dim,dtype,block_size", CASES)
def test_kernel_equals_reference_selection(q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, block_size):
    q, k, v = attention_inputs(2, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, seed=kv_len)
    ctx = decode_context(kv_len, q_len, pads=[0, 7])
    opts = options(block_size=block_size)
    keep = dense_keep(ctx, block_topk.select(q, k, ctx, opts), q_heads)
    assert (keep != ctx.visible).any()  # the budget drops keys
    out = block_topk.kernel(q, k, v, ctx, opts, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, masked_attention(q, k, v, keep, scaling=0.3)[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("pad,block_size,tile", [(0, 8, 16), (5, 8, 16), (11, 6, 16), (3, 32, 16)])
def test_tiles_are_exactly_those_the_chosen_blocks_cover(pad, block_size, tile):
    """Union over a KV group's query heads of the tiles covering each chosen, sink or local block's slots: the same
    tiles the per-token mask needs, far fewer than the context's, and a block straddling two tiles takes both."""
    kv_len, q_heads, kv_heads = 200 + pad, 4, 2
    q, k, _ = attention_inputs(1, q_heads, kv_heads, 1, kv_len, 16, 16, torch.float32, seed=pad)
    ctx = decode_context(kv_len, 1, pads=[pad])
    opts = options(block_size=block_size)
    selection = block_topk.select(q, k, ctx, opts)
    keys = key_set(ctx, selection)
    block_m = decode_rows(q, k)
    tiles = tiles_for(keys, q_heads, kv_heads, kv_len, block_m, tile)
    assert torch.equal(tile_map(tiles), mask_tile_usage(dense_keep(ctx, selection, q_heads), kv_heads, block_m, tile))
    last = (kv_len - 1 - pad) // block_size
    for kv_head in range(kv_heads):
        chosen = keys.blocks[0, 2 * kv_head : 2 * kv_head + 2, 0].flatten().tolist()
        group_blocks = {b for b in chosen if b <= last} | {0, last}  # chosen + sink + local
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
    per_head, per_group = options(block_size=8), options(block_size=8, choose_per="group")
    head_blocks = key_set(ctx, block_topk.select(q, k, ctx, per_head)).blocks[0, :, 0].unflatten(0, (2, 4))
    selection = block_topk.select(q, k, ctx, per_group)
    group_blocks = key_set(ctx, selection).blocks[0, :, 0].unflatten(0, (2, 4))
    assert (group_blocks == group_blocks[:, :1]).all()
    assert (group_blocks < 2**31 - 1).sum(-1)[:, 0].tolist() == [2, 2]  # budget 2 (sink and local: the rule)
    assert any(len(set(head_blocks[h].flatten().tolist())) > 2 for h in range(2))
    tiles = tiles_for(key_set(ctx, selection), 8, 2, 203, decode_rows(q, k), 16)
    keep = dense_keep(ctx, selection, 8)
    assert torch.equal(tile_map(tiles), mask_tile_usage(keep, 2, decode_rows(q, k), 16))
    out = block_topk.kernel(q, k, v, ctx, per_group, 0.25)
    torch.testing.assert_close(out, masked_attention(q, k, v, keep, scaling=0.25)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_model_decode_equals_reference_backend(arch):
    """Cached decode of a left-padded batch: backend='kernel' (side-cached summaries, block lists to the decode
    kernel) gives the reference backend's logits and tokens; the prompt is prefilled once, by the reference."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa").eval()
    options = dict(block_size=4, budget=2, sink_blocks=1, local_blocks=1, score="bound")
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
