"""Random attention problems shared by the kernel tests: GQA layouts, odd lengths, left padding, empty rows, and
selections of every structured kind (rule only, block lists, token lists, lazy lists)."""

from __future__ import annotations

import torch

from hf_attn_plus.masking import build_context
from hf_attn_plus.structure import DENSE, PositionRule, Selection


def attention_inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)

    return (
        randn(batch, q_heads, q_len, head_dim),
        randn(batch, kv_heads, kv_len, head_dim),
        randn(batch, kv_heads, kv_len, v_dim),
    )


def padded_context(batch, q_len, kv_len, pad):
    """Queries in the last q_len of kv_len slots (a cached prefix before them); the last batch row is left-padded by
    `pad` slots, so with q_len == kv_len its first queries see nothing."""
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    visible = causal.expand(batch, 1, q_len, kv_len).clone()
    visible[-1, ..., :pad] = False
    return build_context(visible)


SELECTIONS = ["window_sinks", "dilated", "local_blocks", "block_lists", "shared_lazy_blocks", "token_lists", "dense"]


def selection(name, batch, q_heads, q_len, kv_len, seed=0):
    """One structured selection; random lists may repeat entries, overlap the rule or name future keys (the keep set
    is their union with the rule, among the keys each query sees)."""
    g = torch.Generator().manual_seed(seed)
    if name == "window_sinks":
        return Selection(PositionRule(sinks=3, window=7))
    if name == "dilated":
        return Selection(PositionRule(window=4, dilation=5))
    if name == "local_blocks":
        return Selection(PositionRule(sinks=4, block_size=4, local_blocks=2))
    if name == "block_lists":  # blocks of 6 straddle 16-key tiles
        blocks = torch.randint(-1, -(-kv_len // 6), (batch, q_heads, q_len, 3), generator=g)
        return Selection(PositionRule(sinks=6, block_size=6, local_blocks=1), block_size=6, blocks=blocks)
    if name == "shared_lazy_blocks":  # one list per query for all heads, built per query chunk on demand
        blocks = torch.randint(-1, -(-kv_len // 4), (batch, 1, q_len, 2), generator=g)
        return Selection(PositionRule(window=2), block_size=4, blocks=lambda rows: blocks[:, :, rows])
    if name == "token_lists":
        tokens = torch.randint(-1, kv_len, (batch, q_heads, q_len, 5), generator=g)
        return Selection(PositionRule(sinks=1, window=3), tokens=tokens)
    if name == "dense":
        return Selection(DENSE)
    raise KeyError(name)


def tile_map(tiles):
    """The tile lists as a bool map [B, Hkv, row_blocks, tiles] (to compare with an oracle's)."""
    usage = torch.zeros(*tiles.counts.shape, tiles.num_tiles + 1, dtype=torch.bool)
    listed = torch.arange(tiles.indices.shape[-1]) < tiles.counts.unsqueeze(-1)
    usage.scatter_(-1, torch.where(listed, tiles.indices.long(), tiles.num_tiles), True)
    return usage[..., :-1]
