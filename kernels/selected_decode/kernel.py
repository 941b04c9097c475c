"""Split-KV attention over listed key tiles (flash-decoding), shared by selected-block decode and sparse prefill.

Program (batch*kv_head, row_block, split) walks every splits-th tile of the row block's tile list with an online softmax and
writes a normalised partial output and its log-sum-exp; `merge_splits` combines the splits. Rows pack the query
heads of a KV group (see tile_lists), so each K/V tile is read once for all heads of its group.
Block mode (decode of block selections) adds the rule "the key's block is chosen for this row", read per tile from
the small [B, Hq, q, num_blocks] block map and the slots' real positions, instead of a per-token [B, Hq, q, kv] mask.
Reference: hf_attn_plus.reference.masked_attention (rows keeping nothing output zeros, lse = -inf).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._triton import interpreting, next_power_of_2
from ..tile_lists import TileLists


@triton.jit
def row_coordinates(kv_head, row_block, rows, q_len, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of a row block -> (query head, query index, row valid)."""
    r = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    return kv_head * GROUP + r // q_len, r % q_len, r < rows


@triton.jit
def keep_tile(KEEP, b, head, qi, row_ok, n, kv_len, q_len, sm_b, sm_h, sm_q, sm_n, HAS_KEEP: tl.constexpr):
    """Per-token keep mask of rows x tile: read from the mask tensor, or causal when there is none."""
    valid = row_ok[:, None] & (n < kv_len)[None, :]
    if HAS_KEEP:
        ptrs = KEEP + b * sm_b + head[:, None] * sm_h + qi[:, None] * sm_q + n[None, :] * sm_n
        return valid & (tl.load(ptrs, mask=valid, other=0) != 0)
    return valid & (n[None, :] <= (qi + kv_len - q_len)[:, None])


@triton.jit
def chosen_tile(POS, CHOSEN, b, head, qi, row_ok, n, kv_len, sp_b, sp_n, sc_b, sc_h, sc_q, sc_n, block_size):
    """Block mode: whether the block of each key (by its real position; padding: never) is chosen for each row."""
    pos = tl.load(POS + b * sp_b + n * sp_n, mask=n < kv_len, other=-1)
    valid = row_ok[:, None] & (pos >= 0)[None, :]
    block = tl.where(pos >= 0, pos // block_size, 0)
    ptrs = CHOSEN + b * sc_b + head[:, None] * sc_h + qi[:, None] * sc_q + block[None, :] * sc_n
    return valid & (tl.load(ptrs, mask=valid, other=0) != 0)


@triton.jit
def _forward_kernel(
    Q, K, V, KEEP, POS, CHOSEN, TILES, COUNTS, O, LSE,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sm_b, sm_h, sm_q, sm_n,
    sp_b, sp_n,
    sc_b, sc_h, sc_q, sc_n,
    so_s, so_b, so_h, so_q, so_d,
    sl_s, sl_b, sl_h, sl_q,
    kv_heads, q_len, kv_len, rows, row_blocks, max_tiles, head_dim, v_dim, block_size, scaling,
    GROUP: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_MODE: tl.constexpr, UPCAST: tl.constexpr,
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
        tile = tl.load(TILES + list_at * max_tiles + t)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None] & (d < head_dim)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
        keep = keep_tile(KEEP, b, head, qi, row_ok, n, kv_len, q_len, sm_b, sm_h, sm_q, sm_n, HAS_KEEP)
        if BLOCK_MODE:
            keep = keep & chosen_tile(POS, CHOSEN, b, head, qi, row_ok, n, kv_len, sp_b, sp_n, sc_b, sc_h, sc_q, sc_n, block_size)
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


def mask_strides(keep: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor | None, tuple]:
    """The keep mask as the kernels read it (bytes, broadcast to `shape` without copying) and its strides."""
    if keep is None:
        return None, (0, 0, 0, 0)
    # Broadcast dims get stride 0, so a [B, 1, q, kv] mask is never repeated per head; bool is read as bytes.
    keep = keep.expand(shape).view(torch.uint8)
    return keep, keep.stride()


@dataclasses.dataclass(frozen=True)
class BlockChoice:
    """Block mode's keep rule without a per-token mask: key slot n is kept for row (head, query) iff
    chosen[b, head, query, key_pos[b, n] // block_size] (and `keep`, e.g. the visibility mask, allows it)."""

    chosen: torch.Tensor  # [B, Hq, q, num_blocks] bool
    key_pos: torch.Tensor  # [B, kv] integer: real position of each cache slot, -1 for padding
    block_size: int


def tile_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor | None,
    tiles: TileLists,
    scaling: float,
    splits: int = 1,
    blocks: BlockChoice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of query [B, Hq, q, D] over the kept keys of the listed tiles.

    keep: bool broadcastable to [B, Hq, q, kv], or None for plain causal (queries are the last q keys); `blocks`
    (block mode) further keeps only the keys of chosen blocks, read per tile from the small block map.
    Returns (output [B, Hq, q, Dv] in query dtype, lse [B, Hq, q] fp32, -inf where a row keeps nothing).
    """
    batch, q_heads, q_len, head_dim = query.shape
    _, kv_heads, kv_len, _ = key.shape
    v_dim = value.shape[-1]
    group = q_heads // kv_heads
    row_blocks, max_tiles = tiles.indices.shape[-2:]
    splits = max(1, min(splits, max_tiles))
    if splits == 1:
        out = torch.empty(1, batch, q_heads, q_len, v_dim, dtype=query.dtype, device=query.device)
    else:
        out = torch.empty(splits, batch, q_heads, q_len, v_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(splits, batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    mask, keep_strides = mask_strides(keep, (batch, q_heads, q_len, kv_len))
    if blocks is None:
        positions, chosen, block_size = query, query, 1  # unread placeholders
        position_strides, chosen_strides = (0, 0), (0, 0, 0, 0)
    else:
        positions, block_size = blocks.key_pos, blocks.block_size
        chosen = blocks.chosen.expand(batch, q_heads, q_len, -1).view(torch.uint8)
        position_strides, chosen_strides = positions.stride(), chosen.stride()
    grid = (batch * kv_heads, row_blocks, splits)
    _forward_kernel[grid](
        query, key, value, mask if mask is not None else query, positions, chosen, tiles.indices, tiles.counts, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *keep_strides, *position_strides, *chosen_strides,
        *out.stride(), *lse.stride(),
        kv_heads, q_len, kv_len, group * q_len, row_blocks, max_tiles, head_dim, v_dim, block_size, scaling,
        GROUP=group, HAS_KEEP=mask is not None, BLOCK_MODE=blocks is not None, UPCAST=interpreting(),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
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
