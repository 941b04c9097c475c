"""Backward of attention over listed key tiles (FlashAttention-2 style, recomputing probabilities from the lse).

dQ: one program per (batch*kv_head, row block) walks the row block's tile list. dK/dV: one program per
(batch*kv_head, key tile) walks the transposed list (the row blocks that read the tile), so every query head of the
group adds into its KV head's gradient without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import interpreting, next_power_of_2
from ..keep_tile import kept_tile
from ..key_sets import KeySet
from ..selected_decode.kernel import row_coordinates
from ..tile_lists import TileLists, transposed


@triton.jit
def _probabilities(q, k, lse, keep, scaling):
    """Softmax probabilities of rows x tile from the saved lse; rows keeping nothing (lse -inf) give 0."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    shift = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(keep, tl.exp(s - shift[:, None]), 0.0)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, TILES, COUNTS, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_q, so_d,
    sl_b, sl_h, sl_q,
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
    b = (bh // kv_heads).to(tl.int64)
    kv_head = bh % kv_heads
    head, qi, row_ok = row_coordinates(kv_head, row_block, rows, q_len, GROUP, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_mask = row_ok[:, None] & (d < head_dim)[None, :]
    q_ptrs = head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d
    q = tl.load(Q + b * sq_b + q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(
        DO + b * so_b + head[:, None] * so_h + qi[:, None] * so_q + dv[None, :] * so_d,
        mask=row_ok[:, None] & (dv < v_dim)[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b * sl_b + head * sl_h + qi * sl_q, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + b * sl_b + head * sl_h + qi * sl_q, mask=row_ok, other=0.0)
    list_at = (bh * row_blocks + row_block).to(tl.int64)
    count = tl.load(COUNTS + list_at)
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(0, count):
        tile = tl.load(TILES + list_at * list_width + t)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None] & (d < head_dim)[None, :], other=0.0)
        v = tl.load(v_base + n[:, None] * sv_n + dv[None, :] * sv_d, mask=n_ok[:, None] & (dv < v_dim)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        keep = kept_tile(
            b, head, qi, row_ok, n, kv_len,
            QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
            BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks, n_tokens,
            HAS_RESTRICT, HAS_BLOCKS, HAS_TOKENS, BLOCK_STEPS, TOKEN_STEPS, SINKS, WINDOW, DILATION, RULE_BLOCK,
            LOCAL_BLOCKS, LIST_BLOCK,
        )
        p = _probabilities(q, k, lse, keep, scaling)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    tl.store(DQ + b * sq_b + q_ptrs, (dq * scaling).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, ROW_BLOCKS, COUNTS, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_q, so_d,
    sl_b, sl_h, sl_q,
    kv_heads, q_len, kv_len, rows, list_width, num_tiles, head_dim, v_dim, scaling,
    QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
    BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks, n_tokens,
    HAS_RESTRICT: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_TOKENS: tl.constexpr,
    BLOCK_STEPS: tl.constexpr, TOKEN_STEPS: tl.constexpr, SINKS: tl.constexpr, WINDOW: tl.constexpr,
    DILATION: tl.constexpr, RULE_BLOCK: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, LIST_BLOCK: tl.constexpr,
    GROUP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = bh % kv_heads
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < kv_len
    k_mask = n_ok[:, None] & (d < head_dim)[None, :]
    v_mask = n_ok[:, None] & (dv < v_dim)[None, :]
    k_ptrs = b * sk_b + kv_head * sk_h + n[:, None] * sk_n + d[None, :] * sk_d
    v_ptrs = b * sv_b + kv_head * sv_h + n[:, None] * sv_n + dv[None, :] * sv_d
    k = tl.load(K + k_ptrs, mask=k_mask, other=0.0)
    v = tl.load(V + v_ptrs, mask=v_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    list_at = (bh * num_tiles + tile).to(tl.int64)
    count = tl.load(COUNTS + list_at)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for i in range(0, count):
        row_block = tl.load(ROW_BLOCKS + list_at * list_width + i)
        head, qi, row_ok = row_coordinates(kv_head, row_block, rows, q_len, GROUP, BLOCK_M)
        q = tl.load(
            Q + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
            mask=row_ok[:, None] & (d < head_dim)[None, :], other=0.0,
        )
        do = tl.load(
            DO + b * so_b + head[:, None] * so_h + qi[:, None] * so_q + dv[None, :] * so_d,
            mask=row_ok[:, None] & (dv < v_dim)[None, :], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + b * sl_b + head * sl_h + qi * sl_q, mask=row_ok, other=float("-inf"))
        delta = tl.load(DELTA + b * sl_b + head * sl_h + qi * sl_q, mask=row_ok, other=0.0)
        keep = kept_tile(
            b, head, qi, row_ok, n, kv_len,
            QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
            BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks, n_tokens,
            HAS_RESTRICT, HAS_BLOCKS, HAS_TOKENS, BLOCK_STEPS, TOKEN_STEPS, SINKS, WINDOW, DILATION, RULE_BLOCK,
            LOCAL_BLOCKS, LIST_BLOCK,
        )
        p = _probabilities(q, k, lse, keep, scaling)
        dv_acc += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee")
    tl.store(DK + k_ptrs, (dk * scaling).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + v_ptrs, dv_acc.to(DV.dtype.element_ty), mask=v_mask)


def tile_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: KeySet,
    tiles: TileLists,
    out: torch.Tensor,
    lse: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of tile_attention_forward's output w.r.t. query, key, value (contiguous)."""
    # Gradients are written with the inputs' strides; contiguous inputs rule out broadcast (stride-0) layouts.
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    batch, q_heads, q_len, head_dim = query.shape
    _, kv_heads, kv_len, _ = key.shape
    v_dim = value.shape[-1]
    group = q_heads // kv_heads
    row_blocks, list_width = tiles.indices.shape[-2:]
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    key_arguments, key_constants = keys.arguments((batch, q_heads, q_len, kv_len))
    common = dict(
        **key_constants, GROUP=group, UPCAST=interpreting(), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=next_power_of_2(head_dim), BLOCK_DV=next_power_of_2(v_dim),
    )
    strides = (*query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *lse.stride())
    shape = (kv_heads, q_len, kv_len, group * q_len)
    _backward_dq_kernel[(batch * kv_heads, row_blocks)](
        query, key, value, tiles.indices, tiles.counts, grad_out, lse, delta, dq, *strides,
        *shape, row_blocks, list_width, head_dim, v_dim, scaling, *key_arguments, **common,
    )
    row_lists, row_counts = transposed(tiles)
    _backward_dkdv_kernel[(batch * kv_heads, tiles.num_tiles)](
        query, key, value, row_lists, row_counts, grad_out, lse, delta, dk, dv, *strides,
        *shape, row_lists.shape[-1], tiles.num_tiles, head_dim, v_dim, scaling, *key_arguments, **common,
    )
    return dq, dk, dv
