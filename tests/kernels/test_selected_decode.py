"""selected_decode over structured key sets equals masked_attention over the dense oracle mask (split-KV merge, GQA
rows, several row blocks, empty rows), and reads exactly the tiles holding kept keys."""

import pytest
import torch

from hf_attn_plus.kernel_inputs import key_set
from hf_attn_plus.kernels.selected_decode.wrapper import decode_rows, selected_decode
from hf_attn_plus.kernels.tile_lists import mask_tile_usage, tiles_for
from hf_attn_plus.reference import masked_attention
from hf_attn_plus.structure import PositionRule, Selection, dense_keep

from kernel_cases import SELECTIONS, attention_inputs, padded_context, selection, tile_map

# (batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, splits)
CASES = [
    (2, 8, 1, 1, 37, 64, 64, torch.float32, 3),  # GQA 8, one query token, odd length
    (2, 4, 2, 2, 29, 12, 8, torch.float32, 2),  # GQA 2, DeepSeek dims
    (1, 4, 4, 3, 50, 12, 8, torch.float16, 1),  # MHA, fp16, a single split (no merge)
    (2, 8, 2, 4, 45, 64, 64, torch.float16, 4),  # GQA 4, four queries (speculative decode)
    (1, 32, 1, 3, 33, 16, 16, torch.float32, 2),  # 96 rows per KV group: two row blocks
]


def _problem(case, name, pad=7):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, splits = case
    q, k, v = attention_inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, seed=kv_len)
    ctx = padded_context(batch, q_len, kv_len, pad)
    sel = selection(name, batch, q_heads, q_len, kv_len, seed=kv_len)
    return q, k, v, ctx, sel, splits


@pytest.mark.parametrize("case", CASES, ids=["gqa8", "gqa2_dims", "mha_fp16", "gqa4_spec", "two_row_blocks"])
@pytest.mark.parametrize("name", ["window_sinks", "dilated", "block_lists", "token_lists"])
def test_equals_oracle(case, name):
    q, k, v, ctx, sel, splits = _problem(case, name)
    out = selected_decode(q, k, v, key_set(ctx, sel), scaling=0.3, block_n=16, splits=splits)
    expected = masked_attention(q, k, v, dense_keep(ctx, sel, q.shape[1]), scaling=0.3)[0]
    tol = 1e-5 if q.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", SELECTIONS)
def test_tiles_are_exactly_those_holding_kept_keys(name):
    """A decode row block shares one query position, so the rule's tiles (sinks, near run, dilated keys) and the
    listed blocks' and tokens' tiles are exact: the same tiles the dense oracle mask touches, no more."""
    q, k, _, ctx, sel, _ = _problem((2, 4, 2, 1, 140, 16, 16, torch.float32, 1), name, pad=20)
    block_m = decode_rows(q, k)
    tiles = tiles_for(key_set(ctx, sel), 4, 2, 140, block_m, 16)
    assert torch.equal(tile_map(tiles), mask_tile_usage(dense_keep(ctx, sel, 4), 2, block_m, 16))
    for b, h in [(0, 0), (1, 1)]:
        listed = tiles.indices[b, h, 0, : tiles.counts[b, h, 0]].tolist()
        assert listed == sorted(listed)
    if name in ("window_sinks", "local_blocks"):
        assert tiles.counts.max() <= 2  # the sink tile and the query's own (of the context's 9)


def test_lists_without_entries_and_a_rule_keeping_nothing():
    """A selection whose lists have no entries (block_sparse when no block is ranked in) is its rule alone; an empty
    rule with lists keeps exactly the listed keys (not even the query's own key), and reads only their tiles."""
    q, k, v, ctx, _, _ = _problem(CASES[1], "dense")
    empty = Selection(PositionRule(window=3), block_size=4, blocks=torch.zeros(2, 4, 2, 0, dtype=torch.long))
    assert key_set(ctx, empty).blocks is None
    tokens = torch.tensor([3, 9, -1]).expand(2, 4, 2, 3)
    listed_only = Selection(tokens=tokens)
    for sel in (empty, listed_only):
        out = selected_decode(q, k, v, key_set(ctx, sel), scaling=0.3, block_n=16)
        expected = masked_attention(q, k, v, dense_keep(ctx, sel, 4), scaling=0.3)[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    tiles = tiles_for(key_set(ctx, listed_only), 4, 2, 29, decode_rows(q, k), 16)
    assert tiles.counts[0].tolist() == [[1], [1]]  # positions 3 and 9 (row 0 unpadded): the first tile only
