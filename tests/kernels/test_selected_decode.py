"""selected_decode equals masked_attention over the same keep mask (split-KV merge, GQA rows, empty rows)."""

import pytest
import torch

from hf_attn_plus.kernels.selected_decode.wrapper import selected_decode
from hf_attn_plus.kernels.tile_lists import tile_usage, tiles_from_keep
from hf_attn_plus.reference import masked_attention

from kernel_cases import attention_inputs, random_keep

# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, per-head keep, splits)
CASES = [
    (2, 8, 1, 1, 37, 64, 64, torch.float32, True, 3),  # GQA 8, one query token, odd length
    (2, 4, 2, 2, 29, 12, 8, torch.float32, False, 2),  # GQA 2, DeepSeek dims, keep shared by heads
    (1, 4, 4, 3, 50, 12, 8, torch.float16, True, 1),  # MHA, fp16, a single split (no merge)
    (2, 8, 2, 4, 45, 64, 64, torch.float16, True, 4),  # GQA 4, four queries (speculative decode)
    (1, 32, 1, 3, 33, 16, 16, torch.float32, True, 2),  # 96 rows per KV group: two row blocks
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,kv_len,head_dim,v_dim,dtype,per_head,splits", CASES)
def test_equals_reference(batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, per_head, splits):
    q, k, v = attention_inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype)
    keep = random_keep(batch, q_heads if per_head else 1, q_len, kv_len, density=0.2, left_pad=7)
    out = selected_decode(q, k, v, keep, scaling=0.3, block_n=16, splits=splits)
    expected = masked_attention(q, k, v, keep, scaling=0.3)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert out[-1, :, 0].abs().max() == 0  # the row that keeps nothing


def test_tiles_are_exactly_those_holding_kept_keys():
    keep = random_keep(2, 4, 3, 70, density=0.05, seed=1, left_pad=20)
    tiles = tiles_from_keep(keep, 2, 4, 2, block_m=16, block_n=16)
    usage = tile_usage(keep, 2, 16, 16)
    for b, h in [(0, 0), (1, 1)]:
        listed = tiles.indices[b, h, 0, : tiles.counts[b, h, 0]].tolist()
        rows = keep[b, 2 * h : 2 * h + 2].reshape(-1, 70)
        holding = [t for t in range(5) if rows[:, 16 * t : 16 * t + 16].any()]
        assert listed == holding == usage[b, h, 0].nonzero().flatten().tolist()
    assert tiles.counts[1].max() < 5  # left padding drops the first tile of the padded row
