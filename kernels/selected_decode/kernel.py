"""Split-KV attention over listed key tiles (flash-decoding), shared by selected-block decode and sparse prefill.

Program (batch*kv_head, row_block, split) walks every splits-th tile of the row block's tile list with an online
softmax and writes a normalised partial output and its log-sum-exp; `merge_splits` combines the splits. Rows pack the
query heads of a KV group (see tile_lists), so each K/V tile is read once for all heads of its group. Which keys of a
tile each row keeps comes from key_sets.KeySet (positions, the rule's integers, sorted block / token lists), tested
per tile by keep_tile.kept_tile: no [q, kv] mask is read.
Reference: hf_attn_plus.chunked_attention.selected_attention (rows keeping nothing output zeros, lse = -inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import interpreting, next_power_of_2
from ..keep_tile import kept_tile
from ..key_sets import KeySet
from ..tile_lists import TileLists


@triton.jit
def row_coordinates(kv_head, row_block, rows, q_len, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of a row block -> (query head, query index, row valid)."""
    r = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    return kv_head * GROUP + r // q_len, r % q_len, r < rows


@triton.jit
def _forward_kernel(
    Q, K, V, TILES, COUNTS, O, LSE,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_s, so_b, so_h, so_q, so_d,
    sl_s, sl_b, sl_h, sl_q,
    kv_heads, q_len, kv_len, rows, row_blocks, list_width, head_dim, v_dim, scaling,
    QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
    BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks, n_tokens,
    HAS_RESTRICT: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_TOKENS: tl.constexpr,
    BLOCK_STEPS: tl.constexpr, TOKEN_STEPS: tl.constexpr, SINKS: tl.constexpr, WINDOW: tl.constexpr,
    DILATION: tl.constexpr, RULE_BLOCK: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, LIST_BLOCK: tl.constexpr,
    GROUP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0)
    row_block = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = bh % kv_heads
    head, qi, row_ok = row_coordinates(kv_head, row_block, rows, q_len, GROUP, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
        mask=row_ok[:, None] & (d < head_dim)[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    list_at = (bh * row_blocks + row_block).to(tl.int64)
    count = tl.load(COUNTS + list_at)
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Splits take every `splits`-th listed tile: the work divides by the list's real length, known only here.
    for t in range(split, count, tl.num_programs(2)):
        tile = tl.load(TILES + list_at * list_width + t)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None] & (d < head_dim)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
        keep = kept_tile(
            b, head, qi, row_ok, n, kv_len,
            QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
            BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks, n_tokens,
            HAS_RESTRICT, HAS_BLOCKS, HAS_TOKENS, BLOCK_STEPS, TOKEN_STEPS, SINKS, WINDOW, DILATION, RULE_BLOCK,
            LOCAL_BLOCKS, LIST_BLOCK,
        )
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has kept nothing so far stays at -inf; shifting it by 0 keeps exp() at 0 instead of NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * sv_n + dv[None, :] * sv_d, mask=n_ok[:, None] & (dv < v_dim)[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    o_ptrs = O + split * so_s + b * so_b + head[:, None] * so_h + qi[:, None] * so_q + dv[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < v_dim)[None, :])
    tl.store(LSE + split * sl_s + b * sl_b + head * sl_h + qi * sl_q, lse, mask=row_ok)


def tile_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: KeySet,
    tiles: TileLists,
    scaling: float,
    splits: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of query [B, Hq, q, D] over the keys `keys` keeps in the listed tiles.

    Returns (output [B, Hq, q, Dv] in query dtype, lse [B, Hq, q] fp32, -inf where a row keeps nothing).
    """
    batch, q_heads, q_len, head_dim = query.shape
    _, kv_heads, kv_len, _ = key.shape
    v_dim = value.shape[-1]
    group = q_heads // kv_heads
    row_blocks, list_width = tiles.indices.shape[-2:]
    splits = max(1, min(splits, list_width))
    if splits == 1:
        out = torch.empty(1, batch, q_heads, q_len, v_dim, dtype=query.dtype, device=query.device)
    else:
        out = torch.empty(splits, batch, q_heads, q_len, v_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(splits, batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    key_arguments, key_constants = keys.arguments((batch, q_heads, q_len, kv_len))
    _forward_kernel[(batch * kv_heads, row_blocks, splits)](
        query, key, value, tiles.indices, tiles.counts, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *lse.stride(),
        kv_heads, q_len, kv_len, group * q_len, row_blocks, list_width, head_dim, v_dim, scaling, *key_arguments,
        **key_constants, GROUP=group, UPCAST=interpreting(), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=next_power_of_2(head_dim), BLOCK_DV=next_power_of_2(v_dim),
    )
    if splits == 1:
        return out[0], lse[0]
    return merge_splits(out, lse, query.dtype)


def merge_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding combine: weight each split's normalised output by exp(lse_split - lse_total)."""
    total = torch.logsumexp(lse, dim=0)
    weight = torch.exp(lse - total).nan_to_num(0.0)  # rows keeping nothing: -inf - -inf
    return (weight.unsqueeze(-1) * out).sum(0).to(dtype), total
