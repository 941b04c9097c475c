"""Block summaries grown step by step equal a full recompute; the Quest kernel equals the reference bound."""

import pytest
import torch

from hf_attn_plus.kernels.block_scoring import BlockSummaries, quest_scores
from hf_attn_plus.masking import build_context
from hf_attn_plus.selection import block_key_bounds, chunk_seen_blocks, key_blocks, quest_block_scores, top_scoring


def padded_context(batch, kv_len, pads):
    visible = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    for row, pad in enumerate(pads):
        visible[row, ..., :pad] = False
    return build_context(visible)


def test_incremental_summaries_equal_recompute():
    """A left-padded prompt, then decode steps of one and of three keys; blocks of 4 by real position."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 30, 8, generator=g)
    ctx = padded_context(2, 30, pads=[0, 5])
    blocks = key_blocks(ctx, 4)
    summaries = BlockSummaries(4)
    for start, stop in [(0, 11), (11, 12), (12, 13), (13, 16), (16, 17), (17, 30)]:
        summaries.extend(keys[:, :, start:stop], ctx.key_pos[..., start:stop])
        num_blocks = int(blocks[..., :stop].max()) + 1
        expected = block_key_bounds(keys[:, :, :stop], blocks[..., :stop], num_blocks)
        assert all(torch.equal(got, want) for got, want in zip(summaries.bounds, expected))
    assert summaries.covered == 30


@pytest.mark.parametrize("q_heads,kv_heads,q_len,head_dim,dtype", [(8, 2, 1, 64, torch.float32), (4, 4, 3, 12, torch.float16)])
def test_quest_kernel_equals_reference(q_heads, kv_heads, q_len, head_dim, dtype):
    g = torch.Generator().manual_seed(1)
    kv_len, block_size = 45, 4
    keys = torch.randn(2, kv_heads, kv_len, head_dim, generator=g).to(dtype)
    query = torch.randn(2, q_heads, q_len, head_dim, generator=g).to(dtype)
    ctx = padded_context(2, kv_len, pads=[0, 9])
    blocks = key_blocks(ctx, block_size)
    num_blocks = int(blocks.max()) + 1
    kmin, kmax = block_key_bounds(keys, blocks, num_blocks)  # the padded row has empty (+-inf) trailing blocks
    scores = quest_scores(query, kmin, kmax)
    expected = quest_block_scores(query.float(), kmin.float(), kmax.float())
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    if dtype == torch.float32:
        seen = chunk_seen_blocks(ctx, slice(None), num_blocks, block_size)
        choose = lambda s: top_scoring(s, seen.expand_as(s), 3)  # noqa: E731
        assert torch.equal(choose(scores), choose(quest_block_scores(query, kmin, kmax)))
