"""Triton forward and backward of gathered attention (reference.gathered_attention_reference).

Program (batch * kv head, row block). Rows are (query, head of the KV group) pairs, query-major, so a row block holds
consecutive queries of every head of one group: their sink and window ranges overlap and are read once per group as
key tiles (tl.dot), each row masking its own range and what it sees (key_sets.Visibility: positions, no mask). The
listed slots differ per row and are gathered one entry at a time for all rows of the block (a [rows, D] gather, a
row-wise dot). One online softmax over all three parts; tiles multiply in the input dtype, the state and the listed
keys are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import interpreting, next_power_of_2, tile_size
from ..keep_tile import query_positions, restricted, sees
from ..key_sets import Visibility


@triton.jit
def visible(
    t, n, head, qi, b, kv_len, KEY_START, KEY_COUNT, RESTRICT, sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT: tl.constexpr
):
    """Whether query position t sees key slot n (broadcast), with the model-given mask when there is one."""
    seen = sees(t, n, KEY_START, KEY_COUNT, b, kv_len)[1]
    return restricted(seen, RESTRICT, b, head, qi, n, sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT)


@triton.jit
def _forward_kernel(
    Q, K, V, SPANS, SLOTS, LOGW, O, LSE,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sn_b, sn_q, sn_i,
    ss_b, ss_h, ss_q, ss_j,
    so_b, so_h, so_q, so_d,
    sl_b, sl_h, sl_q,
    kv_heads, q_len, kv_len, n_listed, head_dim, v_dim, scaling,
    QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
    HAS_RESTRICT: tl.constexpr, GROUP: tl.constexpr, HAS_WEIGHTS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = bh % kv_heads
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = qi < q_len
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
        mask=row_ok[:, None] & (d < head_dim)[None, :], other=0.0,
    )
    q32 = q.to(tl.float32)
    if UPCAST:  # the interpreter's 16-bit tl.dot is wrong
        q = q32
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h
    span = SPANS + b * sn_b + qi * sn_q
    t = query_positions(QPOS, b, qi, row_ok, sp_b, sp_q)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for part in range(2):  # sinks, then the window: each row masks its own slot range [start, end) of their union
        start = tl.load(span + (2 * part) * sn_i, mask=row_ok, other=0)
        end = tl.load(span + (2 * part + 1) * sn_i, mask=row_ok, other=0)
        nonempty = row_ok & (end > start)
        lo = tl.min(tl.where(nonempty, start, kv_len), 0)
        hi = tl.max(tl.where(nonempty, end, 0), 0)
        for n0 in range(lo - lo % BLOCK_N, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < kv_len
            k = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None] & (d < head_dim)[None, :], other=0.0)
            v = tl.load(v_base + n[:, None] * sv_n + dv[None, :] * sv_d, mask=n_ok[:, None] & (dv < v_dim)[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            keep = nonempty[:, None] & (n[None, :] >= start[:, None]) & (n[None, :] < end[:, None])
            keep = keep & visible(
                t[:, None], n[None, :], head[:, None], qi[:, None], b, kv_len, KEY_START, KEY_COUNT, RESTRICT,
                sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT,
            )
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has kept nothing so far stays at -inf; shifting it by 0 keeps exp() at 0 instead of NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - shift)
            p = tl.exp(s - shift[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
    listed = SLOTS + b * ss_b + head * ss_h + qi * ss_q
    weights = LOGW + b * ss_b + head * ss_h + qi * ss_q
    k_cols = k_base + d[None, :] * sk_d
    v_cols = v_base + dv[None, :] * sv_d
    for j in range(0, n_listed):
        slot = tl.load(listed + j * ss_j, mask=row_ok, other=-1)
        ok = slot >= 0
        ok = ok & visible(t, slot, head, qi, b, kv_len, KEY_START, KEY_COUNT, RESTRICT, sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT)
        k = tl.load(k_cols + slot[:, None] * sk_n, mask=ok[:, None] & (d < head_dim)[None, :], other=0.0)
        s = tl.sum(q32 * k.to(tl.float32), 1) * scaling
        if HAS_WEIGHTS:
            s += tl.load(weights + j * ss_j, mask=ok, other=0.0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift)
        v = tl.load(v_cols + slot[:, None] * sv_n, mask=ok[:, None] & (dv < v_dim)[None, :], other=0.0)
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        l_i = l_i * alpha + p
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + b * so_b + head[:, None] * so_h + qi[:, None] * so_q + dv[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv < v_dim)[None, :])
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LSE + b * sl_b + head * sl_h + qi * sl_q, lse, mask=row_ok)


@triton.jit
def _backward_kernel(
    Q, K, V, SPANS, SLOTS, LOGW, DO, LSE, DELTA, DQ, DK, DV,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sn_b, sn_q, sn_i,
    ss_b, ss_h, ss_q, ss_j,
    so_b, so_h, so_q, so_d,
    sl_b, sl_h, sl_q,
    kv_heads, q_len, kv_len, n_listed, head_dim, v_dim, scaling,
    QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
    HAS_RESTRICT: tl.constexpr, GROUP: tl.constexpr, HAS_WEIGHTS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The forward's walk again with probabilities from the saved lse: dq is summed per row and stored; dk and dv
    (fp32, contiguous like K and V) are added atomically, since any row block may read any key."""
    bh = tl.program_id(0)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = bh % kv_heads
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = qi < q_len
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = d < head_dim
    dv_ok = dv < v_dim
    q_ptrs = b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(
        DO + b * so_b + head[:, None] * so_h + qi[:, None] * so_q + dv[None, :] * so_d,
        mask=row_ok[:, None] & dv_ok[None, :], other=0.0,
    )
    q32 = q.to(tl.float32)
    do32 = do.to(tl.float32)
    if UPCAST:  # the interpreter's 16-bit tl.dot is wrong
        q = q32
        do = do32
    lse = tl.load(LSE + b * sl_b + head * sl_h + qi * sl_q, mask=row_ok, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows attending to nothing: every p is masked to 0 anyway
    delta = tl.load(DELTA + b * sl_b + head * sl_h + qi * sl_q, mask=row_ok, other=0.0)
    kv_at = b * sk_b + kv_head * sk_h
    v_at = b * sv_b + kv_head * sv_h
    span = SPANS + b * sn_b + qi * sn_q
    t = query_positions(QPOS, b, qi, row_ok, sp_b, sp_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in range(2):
        start = tl.load(span + (2 * part) * sn_i, mask=row_ok, other=0)
        end = tl.load(span + (2 * part + 1) * sn_i, mask=row_ok, other=0)
        nonempty = row_ok & (end > start)
        lo = tl.min(tl.where(nonempty, start, kv_len), 0)
        hi = tl.max(tl.where(nonempty, end, 0), 0)
        for n0 in range(lo - lo % BLOCK_N, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < kv_len
            k_ptrs = kv_at + n[:, None] * sk_n + d[None, :] * sk_d
            v_ptrs = v_at + n[:, None] * sv_n + dv[None, :] * sv_d
            k = tl.load(K + k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            keep = nonempty[:, None] & (n[None, :] >= start[:, None]) & (n[None, :] < end[:, None])
            keep = keep & visible(
                t[:, None], n[None, :], head[:, None], qi[:, None], b, kv_len, KEY_START, KEY_COUNT, RESTRICT,
                sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT,
            )
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision="ieee") - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
            dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee") * scaling
            tl.atomic_add(DK + k_ptrs, dk, mask=n_ok[:, None] & d_ok[None, :])
            tl.atomic_add(DV + v_ptrs, tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee"), mask=n_ok[:, None] & dv_ok[None, :])
    listed = SLOTS + b * ss_b + head * ss_h + qi * ss_q
    weights = LOGW + b * ss_b + head * ss_h + qi * ss_q
    for j in range(0, n_listed):
        slot = tl.load(listed + j * ss_j, mask=row_ok, other=-1)
        ok = slot >= 0
        ok = ok & visible(t, slot, head, qi, b, kv_len, KEY_START, KEY_COUNT, RESTRICT, sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT)
        k_ptrs = kv_at + slot[:, None] * sk_n + d[None, :] * sk_d
        v_ptrs = v_at + slot[:, None] * sv_n + dv[None, :] * sv_d
        k = tl.load(K + k_ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + v_ptrs, mask=ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(q32 * k, 1) * scaling
        if HAS_WEIGHTS:
            s += tl.load(weights + j * ss_j, mask=ok, other=0.0)
        p = tl.where(ok, tl.exp(s - lse), 0.0)
        ds = p * (tl.sum(do32 * v, 1) - delta)
        dq += ds[:, None] * k
        tl.atomic_add(DK + k_ptrs, ds[:, None] * q32 * scaling, mask=ok[:, None] & d_ok[None, :])
        tl.atomic_add(DV + v_ptrs, p[:, None] * do32, mask=ok[:, None] & dv_ok[None, :])
    tl.store(DQ + q_ptrs, (dq * scaling).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _launch_arguments(query, key, value, visibility, spans, slots, log_weights):
    """Shared by both launches: (grid, int32 spans and slots, log-weights or a stand-in pointer, size arguments,
    visibility arguments, constexprs)."""
    batch, q_heads, q_len, head_dim = query.shape
    _, kv_heads, kv_len, _ = key.shape
    group = q_heads // kv_heads
    slots = slots.to(torch.int32).expand(batch, q_heads, q_len, -1).contiguous()
    weights = slots if log_weights is None else log_weights.float().expand(slots.shape).contiguous()
    # The interpreter pays per program: fewer, larger row blocks there.
    block_m = min(64 if interpreting() else tile_size(query.dtype), next_power_of_2(group * q_len))
    grid = (batch * kv_heads, triton.cdiv(group * q_len, block_m))
    sizes = (kv_heads, q_len, kv_len, slots.shape[-1], head_dim, value.shape[-1])
    seen = visibility.arguments((batch, q_heads, q_len, kv_len))
    constants = dict(
        HAS_RESTRICT=visibility.restrict is not None, GROUP=group, HAS_WEIGHTS=log_weights is not None,
        UPCAST=interpreting(), BLOCK_M=block_m,
        BLOCK_N=tile_size(query.dtype), BLOCK_D=next_power_of_2(head_dim), BLOCK_DV=next_power_of_2(value.shape[-1]),
    )
    return grid, spans.to(torch.int32), slots, weights, sizes, seen, constants


def gathered_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visibility: Visibility,
    spans: torch.Tensor,
    slots: torch.Tensor,
    log_weights: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.gathered_attention_reference. Returns (output [B, Hq, q, Dv] in the query's dtype,
    lse [B, Hq, q] fp32, -inf for rows attending to nothing)."""
    batch, q_heads, q_len, _ = query.shape
    grid, spans, slots, weights, sizes, seen, constants = _launch_arguments(
        query, key, value, visibility, spans, slots, log_weights
    )
    out = torch.empty(batch, q_heads, q_len, value.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    _forward_kernel[grid](
        query, key, value, spans, slots, weights, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *spans.stride(), *slots.stride(), *out.stride(),
        *lse.stride(), *sizes, scaling, *seen, **constants,
    )
    return out, lse


def gathered_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visibility: Visibility,
    spans: torch.Tensor,
    slots: torch.Tensor,
    log_weights: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of gathered_attention_forward's output w.r.t. query, key, value. dk and dv are fp32 atomic sums
    (their summation order, hence their last bits, varies between runs on a GPU)."""
    query, key, value, grad_out = query.contiguous(), key.contiguous(), value.contiguous(), grad_out.contiguous()
    grid, spans, slots, weights, sizes, seen, constants = _launch_arguments(
        query, key, value, visibility, spans, slots, log_weights
    )
    delta = (grad_out.float() * out.float()).sum(-1)
    dq = torch.empty_like(query)
    dk = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
    dv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    _backward_kernel[grid](
        query, key, value, spans, slots, weights, grad_out, lse, delta, dq, dk, dv,
        *query.stride(), *key.stride(), *value.stride(), *spans.stride(), *slots.stride(),
        *grad_out.stride(), *lse.stride(), *sizes, scaling, *seen, **constants,
    )
    return dq, dk.to(key.dtype), dv.to(value.dtype)
