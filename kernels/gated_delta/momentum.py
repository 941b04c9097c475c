"""The momentum delta rule (MDN-style) in Triton: decode, chunked forward and backward; equal to `hf_attn_plus.linear_ops`'s
`recurrent_momentum_delta` / `chunked_momentum_delta`.

Per KV head the state is two fp32 matrices (S, M) [Dk, Dv]: u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t), M_t = μ_t M_{t-1} + k_t u_tᵀ,
S_t = α_t S_{t-1} + M_t, o_t = S_tᵀ q_t. As for the gated rule the columns of (S, M) evolve independently, so one program
per (batch, KV head, block of Dv columns) holds its columns of both in registers and the G query heads of the group
read them in turn.

Chunked form (the reference's per chunk of C tokens, from (S0, M0)): with G, P the running products of α and μ inside
the chunk (exp of fp32 cumulative logs), Dg_ts = G_t/G_s and Dm_ts = P_t/P_s on s <= t,
  C = Dg Dm,  a = Dg P,  A = strictly lower (β_t (C - Dm)_ts k_t·k_s),  T = (I + A)⁻¹ (gated kernel's solve),
  U = T diag(β) V - T diag(βG) K S0 - T diag(β(a - P)) K M0,
  O = diag(G) Q S0 + diag(a) Q M0 + (Q Kᵀ ∘ C) U,
  S ← G_e S0 + a_e M0 + (K ∘ C_e)ᵀ U,  M ← P_e M0 + (K ∘ Dm_e)ᵀ U,  e the chunk's last real token.
The final state reads row e, not row C - 1: a padding step would still add M to S.

Gradients (`momentum_delta`, an autograd function): the backward walks the chunks in reverse from the (S, M) the
forward saved before each chunk, recomputes the chunk's terms (`_chunk_terms`, shared with the forward) and
differentiates the formulas above: dT to dA = -Tᵀ dT Tᵀ; C = Dg Dm and a = Dg p by their products; Dg, Dm, g, p to the
cumulative logs, then log α and log μ by suffix sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton
from . import DECODE_MAX_TOKENS
from .chunked import _unit_lower_inverse, backward_blocks, chunk_tokens, dot_precision
from .recurrent import state_blocks

MomentumState = tuple[torch.Tensor, torch.Tensor]  # (S, M) [B, Hkv, Dk, Dv] fp32


@triton.jit
def _recurrent_forward(
    Q, K, V, LOG_ALPHA, BETA, LOG_MU, S_IN, M_IN, O, S_OUT, M_OUT,
    length, q_heads, groups, dk, dv,
    HAS_STATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # b * kv_heads + KV head; 64-bit offsets past 2**31 elements
    kv_heads = q_heads // groups
    b = bh // kv_heads
    hk = bh % kv_heads
    r = tl.arange(0, BLOCK_K)
    d = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    r_ok = r < dk
    d_ok = d < dv
    s_mask = r_ok[:, None] & d_ok[None, :]
    s_offsets = bh * dk * dv + r[:, None] * dv + d[None, :]
    if HAS_STATE:
        s = tl.load(S_IN + s_offsets, mask=s_mask, other=0.0)
        m = tl.load(M_IN + s_offsets, mask=s_mask, other=0.0)
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
        m = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for t in range(length):
        k = tl.load(K + (bh * length + t) * dk + r, mask=r_ok, other=0.0).to(tl.float32)
        v = tl.load(V + (bh * length + t) * dv + d, mask=d_ok, other=0.0).to(tl.float32)
        alpha = tl.exp(tl.load(LOG_ALPHA + bh * length + t).to(tl.float32))
        beta = tl.load(BETA + bh * length + t).to(tl.float32)
        mu = tl.exp(tl.load(LOG_MU + bh * length + t).to(tl.float32))
        s = s * alpha
        u = beta * (v - tl.sum(k[:, None] * s, axis=0))
        m = m * mu + k[:, None] * u[None, :]
        s += m
        for g in range(groups):
            row = (b * q_heads + hk * groups + g) * length + t
            q = tl.load(Q + row * dk + r, mask=r_ok, other=0.0).to(tl.float32)
            tl.store(O + row * dv + d, tl.sum(q[:, None] * s, axis=0).to(O.dtype.element_ty), mask=d_ok)
    tl.store(S_OUT + s_offsets, s, mask=s_mask)
    tl.store(M_OUT + s_offsets, m, mask=s_mask)


@triton.jit
def _chunk_terms(
    K, V, LOG_ALPHA, BETA, LOG_MU, s, m, bh, c, length, dk, dv, r, d, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Chunk c's keys, values (fp32, zero past the end), β, the running products g, p and their ratio matrices Dg, Dm,
    C = Dg Dm, a = Dg p, K Kᵀ, T, W_S, W_M and U (module docstring), from the state (s, m) before the chunk."""
    rows = tl.arange(0, CHUNK)
    lower = rows[:, None] >= rows[None, :]
    t = c * CHUNK + rows
    t_ok = t < length
    k = tl.load(K + (bh * length + t)[:, None] * dk + r[None, :], mask=t_ok[:, None] & (r < dk)[None, :], other=0.0)
    v = tl.load(V + (bh * length + t)[:, None] * dv + d[None, :], mask=t_ok[:, None] & (d < dv)[None, :], other=0.0)
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    # Rows past the end: no decay, no momentum decay, no write; they only pad the tiles (outputs not stored, the new
    # state read at the last real row).
    log_g = tl.cumsum(tl.load(LOG_ALPHA + bh * length + t, mask=t_ok, other=0.0).to(tl.float32), axis=0)
    log_p = tl.cumsum(tl.load(LOG_MU + bh * length + t, mask=t_ok, other=0.0).to(tl.float32), axis=0)
    beta = tl.load(BETA + bh * length + t, mask=t_ok, other=0.0).to(tl.float32)
    # run_t / run_s for s <= t from differences of logs (masked before exp: the upper triangle could overflow)
    dg = tl.where(lower, tl.exp(tl.where(lower, log_g[:, None] - log_g[None, :], 0.0)), 0.0)
    dm = tl.where(lower, tl.exp(tl.where(lower, log_p[:, None] - log_p[None, :], 0.0)), 0.0)
    g = tl.exp(log_g)
    p = tl.exp(log_p)
    cm = tl.dot(dg, dm, input_precision=PRECISION)  # C
    a = tl.sum(dg * p[None, :], axis=1)
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    inverse = _unit_lower_inverse(
        tl.where(rows[:, None] > rows[None, :], beta[:, None] * (cm - dm) * kk, 0.0), CHUNK, PRECISION
    )
    w_s = tl.dot(inverse, (beta * g)[:, None] * k, input_precision=PRECISION)
    w_m = tl.dot(inverse, (beta * (a - p))[:, None] * k, input_precision=PRECISION)
    u = (
        tl.dot(inverse, beta[:, None] * v, input_precision=PRECISION)
        - tl.dot(w_s, s, input_precision=PRECISION)
        - tl.dot(w_m, m, input_precision=PRECISION)
    )
    return k, v, beta, g, p, dg, dm, cm, a, kk, inverse, w_s, w_m, u


@triton.jit
def _chunked_forward(
    Q, K, V, LOG_ALPHA, BETA, LOG_MU, S_IN, M_IN, O, S_OUT, M_OUT, S_CHUNKS, M_CHUNKS,
    length, q_heads, groups, dk, dv,
    HAS_STATE: tl.constexpr, SAVE_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B·H·L·D may pass 2**31
    kv_heads = q_heads // groups
    b = bh // kv_heads
    hk = bh % kv_heads
    r = tl.arange(0, BLOCK_K)
    d = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    r_ok = r < dk
    d_ok = d < dv
    s_mask = r_ok[:, None] & d_ok[None, :]
    s_offsets = r[:, None] * dv + d[None, :]
    if HAS_STATE:
        s = tl.load(S_IN + bh * dk * dv + s_offsets, mask=s_mask, other=0.0)
        m = tl.load(M_IN + bh * dk * dv + s_offsets, mask=s_mask, other=0.0)
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
        m = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    rows = tl.arange(0, CHUNK)
    chunks = tl.cdiv(length, CHUNK)
    for c in range(chunks):
        if SAVE_CHUNKS:
            tl.store(S_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, s, mask=s_mask)
            tl.store(M_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, m, mask=s_mask)
        k, v, beta, g, p, dg, dm, cm, a, kk, inverse, w_s, w_m, u = _chunk_terms(
            K, V, LOG_ALPHA, BETA, LOG_MU, s, m, bh, c, length, dk, dv, r, d, CHUNK, PRECISION
        )
        t = c * CHUNK + rows
        t_ok = t < length
        for gi in range(groups):
            row = (b * q_heads + hk * groups + gi) * length + t
            q = tl.load(Q + row[:, None] * dk + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * cm
            out = (
                g[:, None] * tl.dot(q, s, input_precision=PRECISION)
                + a[:, None] * tl.dot(q, m, input_precision=PRECISION)
                + tl.dot(qk, u, input_precision=PRECISION)
            )
            tl.store(O + row[:, None] * dv + d[None, :], out.to(O.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
        is_end = rows == tl.minimum(length - c * CHUNK, CHUNK) - 1
        to_end_s = tl.sum(tl.where(is_end[:, None], cm, 0.0), axis=0)  # C_e·
        to_end_m = tl.sum(tl.where(is_end[:, None], dm, 0.0), axis=0)  # Dm_e·
        g_end = tl.sum(tl.where(is_end, g, 0.0), axis=0)
        a_end = tl.sum(tl.where(is_end, a, 0.0), axis=0)
        p_end = tl.sum(tl.where(is_end, p, 0.0), axis=0)
        s_next = g_end * s + a_end * m + tl.dot(tl.trans(k * to_end_s[:, None]), u, input_precision=PRECISION)
        m = p_end * m + tl.dot(tl.trans(k * to_end_m[:, None]), u, input_precision=PRECISION)
        s = s_next
    tl.store(S_OUT + bh * dk * dv + s_offsets, s, mask=s_mask)
    tl.store(M_OUT + bh * dk * dv + s_offsets, m, mask=s_mask)


@triton.jit
def _chunked_backward(
    Q, K, V, LOG_ALPHA, BETA, LOG_MU, S_CHUNKS, M_CHUNKS, DO, DS_OUT, DM_OUT,
    DQ, DK, DV, DLOG_ALPHA, DBETA, DLOG_MU, DS_IN, DM_IN,
    length, q_heads, groups, dk, dv,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    # Chunks in reverse, carrying (dS, dM) = dL/d(S, M) (the state before the chunk on exit). Each chunk recomputes its
    # forward terms from the saved states before it, then differentiates the forward formulas in reverse order.
    # DQ, DK, DLOG_ALPHA, DBETA and DLOG_MU sum over Dv: each column block writes its part (leading index = block).
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B·H·L·D may pass 2**31
    iv = tl.program_id(1)
    batch_heads = tl.num_programs(0)
    kv_heads = q_heads // groups
    b = bh // kv_heads
    hk = bh % kv_heads
    r = tl.arange(0, BLOCK_K)
    d = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    r_ok = r < dk
    d_ok = d < dv
    s_mask = r_ok[:, None] & d_ok[None, :]
    s_offsets = r[:, None] * dv + d[None, :]
    ds = tl.load(DS_OUT + bh * dk * dv + s_offsets, mask=s_mask, other=0.0)
    dmm = tl.load(DM_OUT + bh * dk * dv + s_offsets, mask=s_mask, other=0.0)
    rows = tl.arange(0, CHUNK)
    strict = rows[:, None] > rows[None, :]
    chunks = tl.cdiv(length, CHUNK)
    for back in range(chunks):
        c = chunks - 1 - back
        # ---- the chunk's forward, as in _chunked_forward
        s = tl.load(S_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, mask=s_mask, other=0.0)
        m = tl.load(M_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, mask=s_mask, other=0.0)
        k, v, beta, g, p, dg, dm, cm, a, kk, inverse, w_s, w_m, u = _chunk_terms(
            K, V, LOG_ALPHA, BETA, LOG_MU, s, m, bh, c, length, dk, dv, r, d, CHUNK, PRECISION
        )
        t = c * CHUNK + rows
        t_ok = t < length
        k_mask = t_ok[:, None] & r_ok[None, :]
        v_mask = t_ok[:, None] & d_ok[None, :]
        is_end = rows == tl.minimum(length - c * CHUNK, CHUNK) - 1
        to_end_s = tl.sum(tl.where(is_end[:, None], cm, 0.0), axis=0)
        to_end_m = tl.sum(tl.where(is_end[:, None], dm, 0.0), axis=0)
        g_end = tl.sum(tl.where(is_end, g, 0.0), axis=0)
        a_end = tl.sum(tl.where(is_end, a, 0.0), axis=0)
        p_end = tl.sum(tl.where(is_end, p, 0.0), axis=0)
        # ---- S' = g_e S + a_e M + (K ∘ C_e)ᵀ U,  M' = p_e M + (K ∘ Dm_e)ᵀ U
        du = tl.dot(to_end_s[:, None] * k, ds, input_precision=PRECISION)
        du += tl.dot(to_end_m[:, None] * k, dmm, input_precision=PRECISION)
        u_ds = tl.dot(u, tl.trans(ds), input_precision=PRECISION)
        u_dm = tl.dot(u, tl.trans(dmm), input_precision=PRECISION)
        dk_acc = to_end_s[:, None] * u_ds + to_end_m[:, None] * u_dm
        # dL/dC, dL/dDm (before the chain to Dg, Dm), dL/dg, dL/da, dL/dp: the end row's, then the others below
        d_cm = tl.where(is_end[:, None], tl.sum(k * u_ds, axis=1)[None, :], 0.0)
        d_dm = tl.where(is_end[:, None], tl.sum(k * u_dm, axis=1)[None, :], 0.0)
        d_g = tl.where(is_end, tl.sum(tl.sum(ds * s, axis=1), axis=0), 0.0)
        d_a = tl.where(is_end, tl.sum(tl.sum(ds * m, axis=1), axis=0), 0.0)
        d_p = tl.where(is_end, tl.sum(tl.sum(dmm * m, axis=1), axis=0), 0.0)
        dmm = a_end * ds + p_end * dmm
        ds = g_end * ds
        # ---- O = diag(g) Q S + diag(a) Q M + (Q Kᵀ ∘ C) U, per query head of the group
        for gi in range(groups):
            row = (b * q_heads + hk * groups + gi) * length + t
            q = tl.load(Q + row[:, None] * dk + r[None, :], mask=k_mask, other=0.0).to(tl.float32)
            do = tl.load(DO + row[:, None] * dv + d[None, :], mask=v_mask, other=0.0).to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            do_u = tl.dot(do, tl.trans(u), input_precision=PRECISION)
            du += tl.dot(tl.trans(qk * cm), do, input_precision=PRECISION)
            ds += tl.dot(tl.trans(q), g[:, None] * do, input_precision=PRECISION)
            dmm += tl.dot(tl.trans(q), a[:, None] * do, input_precision=PRECISION)
            d_g += tl.sum(do * tl.dot(q, s, input_precision=PRECISION), axis=1)
            d_a += tl.sum(do * tl.dot(q, m, input_precision=PRECISION), axis=1)
            d_cm += do_u * qk
            dq = g[:, None] * tl.dot(do, tl.trans(s), input_precision=PRECISION)
            dq += a[:, None] * tl.dot(do, tl.trans(m), input_precision=PRECISION)
            dq += tl.dot(do_u * cm, k, input_precision=PRECISION)
            tl.store(DQ + (iv * batch_heads * groups * length + row)[:, None] * dk + r[None, :], dq, mask=k_mask)
            dk_acc += tl.dot(tl.trans(do_u * cm), q, input_precision=PRECISION)
        # ---- U = T diag(β) V - W_S S - W_M M,  W_S = T diag(βg) K,  W_M = T diag(β(a - p)) K
        ds -= tl.dot(tl.trans(w_s), du, input_precision=PRECISION)
        dmm -= tl.dot(tl.trans(w_m), du, input_precision=PRECISION)
        dw_s = -tl.dot(du, tl.trans(s), input_precision=PRECISION)
        dw_m = -tl.dot(du, tl.trans(m), input_precision=PRECISION)
        dv_b = tl.dot(tl.trans(inverse), du, input_precision=PRECISION)
        tl.store(DV + (bh * length + t)[:, None] * dv + d[None, :], (beta[:, None] * dv_b).to(DV.dtype.element_ty),
                 mask=v_mask)
        dk_s = tl.dot(tl.trans(inverse), dw_s, input_precision=PRECISION)  # d(diag(βg) K)
        dk_m = tl.dot(tl.trans(inverse), dw_m, input_precision=PRECISION)  # d(diag(β(a - p)) K)
        dk_acc += (beta * g)[:, None] * dk_s + (beta * (a - p))[:, None] * dk_m
        k_dk_s = tl.sum(k * dk_s, axis=1)
        k_dk_m = tl.sum(k * dk_m, axis=1)
        dbeta = tl.sum(v * dv_b, axis=1) + g * k_dk_s + (a - p) * k_dk_m
        d_g += beta * k_dk_s
        d_a += beta * k_dk_m
        d_p -= beta * k_dk_m
        # ---- T = (I + A)⁻¹: dA = -Tᵀ dT Tᵀ on the strict lower triangle, A = β_t (C - Dm)_ts (k_t·k_s)
        d_inverse = tl.dot(du, tl.trans(beta[:, None] * v), input_precision=PRECISION)
        d_inverse += tl.dot(dw_s, tl.trans((beta * g)[:, None] * k), input_precision=PRECISION)
        d_inverse += tl.dot(dw_m, tl.trans((beta * (a - p))[:, None] * k), input_precision=PRECISION)
        da = -tl.dot(tl.trans(inverse), tl.dot(d_inverse, tl.trans(inverse), input_precision=PRECISION),
                     input_precision=PRECISION)
        da = tl.where(strict, da, 0.0)
        dbeta += tl.sum(da * (cm - dm) * kk, axis=1)
        d_cm += da * beta[:, None] * kk
        d_dm -= da * beta[:, None] * kk
        d_kk = da * beta[:, None] * (cm - dm)
        dk_acc += tl.dot(d_kk + tl.trans(d_kk), k, input_precision=PRECISION)
        # ---- C = Dg Dm, a = Dg p
        d_dg = tl.dot(d_cm, tl.trans(dm), input_precision=PRECISION) + d_a[:, None] * p[None, :]
        d_dm += tl.dot(tl.trans(dg), d_cm, input_precision=PRECISION)
        d_p += tl.sum(dg * d_a[:, None], axis=0)
        # ---- Dg_ts = exp(log g_t - log g_s), g = exp(log g), log g = cumsum(log α); the same for Dm, p and log μ
        n = d_dg * dg
        dlog_g = tl.sum(n, axis=1) - tl.sum(n, axis=0) + d_g * g
        n = d_dm * dm
        dlog_p = tl.sum(n, axis=1) - tl.sum(n, axis=0) + d_p * p
        dlog_alpha = tl.sum(dlog_g, axis=0) - tl.cumsum(dlog_g, axis=0) + dlog_g  # suffix sums
        dlog_mu = tl.sum(dlog_p, axis=0) - tl.cumsum(dlog_p, axis=0) + dlog_p
        partial = iv * batch_heads * length + bh * length + t
        tl.store(DK + partial[:, None] * dk + r[None, :], dk_acc, mask=k_mask)
        tl.store(DBETA + partial, dbeta, mask=t_ok)
        tl.store(DLOG_ALPHA + partial, dlog_alpha, mask=t_ok)
        tl.store(DLOG_MU + partial, dlog_mu, mask=t_ok)
    tl.store(DS_IN + bh * dk * dv + s_offsets, ds, mask=s_mask)
    tl.store(DM_IN + bh * dk * dv + s_offsets, dmm, mask=s_mask)


def _outputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty output [B, Hq, L, Dv] in v's dtype and final states S, M [B, Hkv, Dk, Dv] fp32."""
    batch, q_heads, length, dk = query.shape
    out = torch.empty(batch, q_heads, length, value.shape[-1], dtype=value.dtype, device=value.device)
    s_out = torch.empty(batch, key.shape[1], dk, value.shape[-1], dtype=torch.float32, device=value.device)
    return out, s_out, torch.empty_like(s_out)


def _inputs(query, key, value, log_alpha, beta, log_mu) -> list[torch.Tensor]:
    return [x.contiguous() for x in (query, key, value, log_alpha, beta, log_mu)]


def recurrent_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    log_mu: torch.Tensor,
    state: MomentumState | None = None,
) -> tuple[torch.Tensor, MomentumState]:
    """Triton `recurrent_momentum_delta` (no autograd): (output [B, Hq, L, Dv], (S, M) [B, Hkv, Dk, Dv] fp32).
    Meant for decode (a few tokens); a long prompt is faster through `chunked_forward`."""
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    out, s_out, m_out = _outputs(query, key, value)
    s_in, m_in = (s_out, m_out) if state is None else (x.float().contiguous() for x in state)
    block_k, block_v = state_blocks(dk, dv)
    _recurrent_forward[(batch * kv_heads, triton.cdiv(dv, block_v))](
        *_inputs(query, key, value, log_alpha, beta, log_mu), s_in, m_in, out, s_out, m_out,
        length, q_heads, q_heads // kv_heads, dk, dv, HAS_STATE=state is not None, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return out, (s_out, m_out)


def chunked_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    log_mu: torch.Tensor,
    state: MomentumState | None = None,
    chunk_size: int = 64,
    save_chunk_states: bool = False,
) -> tuple[torch.Tensor, MomentumState, MomentumState | None]:
    """Triton `chunked_momentum_delta` (no autograd; see `momentum_delta`): (output, final (S, M) fp32, and with
    `save_chunk_states` (S, M) before each kernel chunk [B, Hkv, n, Dk, Dv], for the backward). Chunks of
    `chunk_tokens(chunk_size)`: equal to the reference at any chunk size up to rounding (the chunked form is exact)."""
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    chunk = chunk_tokens(chunk_size, value.dtype)
    out, s_out, m_out = _outputs(query, key, value)
    s_in, m_in = (s_out, m_out) if state is None else (x.float().contiguous() for x in state)
    chunk_states = (
        tuple(torch.empty(batch, kv_heads, triton.cdiv(length, chunk), dk, dv, dtype=torch.float32, device=value.device)
              for _ in range(2))
        if save_chunk_states else (s_out, m_out)
    )
    block_k, block_v = state_blocks(dk, dv)
    _chunked_forward[(batch * kv_heads, triton.cdiv(dv, block_v))](
        *_inputs(query, key, value, log_alpha, beta, log_mu), s_in, m_in, out, s_out, m_out, *chunk_states,
        length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_STATE=state is not None, SAVE_CHUNKS=save_chunk_states, CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v,
        PRECISION=dot_precision(value.dtype),
    )
    return out, (s_out, m_out), chunk_states if save_chunk_states else None


def chunked_backward(
    inputs: list[torch.Tensor],
    chunk_states: MomentumState,
    chunk: int,
    grad_out: torch.Tensor,
    grad_state: MomentumState,
) -> tuple[torch.Tensor, ...]:
    """Gradients (query, key, value, log_alpha, beta, log_mu, S0, M0) given the contiguous `inputs` and the fp32 states
    before each kernel chunk of `chunk` tokens (from `chunked_forward`). Gradients in the inputs' dtypes, the states'
    in fp32."""
    query, key, value, log_alpha, beta, log_mu = inputs
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    block_k, block_v = backward_blocks(dk, dv)
    blocks = triton.cdiv(dv, block_v)
    f32 = dict(dtype=torch.float32, device=value.device)
    dq = torch.empty(blocks, batch, q_heads, length, dk, **f32)
    dk_ = torch.empty(blocks, batch, kv_heads, length, dk, **f32)
    dv_ = torch.empty_like(value)
    dlog_alpha, dbeta, dlog_mu = (torch.empty(blocks, batch, kv_heads, length, **f32) for _ in range(3))
    ds_in, dm_in = (torch.empty(batch, kv_heads, dk, dv, **f32) for _ in range(2))
    _chunked_backward[(batch * kv_heads, blocks)](
        *inputs, *chunk_states, grad_out.contiguous(), *(x.float().contiguous() for x in grad_state),
        dq, dk_, dv_, dlog_alpha, dbeta, dlog_mu, ds_in, dm_in, length, q_heads, q_heads // kv_heads, dk, dv,
        CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v, PRECISION=dot_precision(value.dtype),
    )
    return (
        dq.sum(0).to(query.dtype), dk_.sum(0).to(key.dtype), dv_, dlog_alpha.sum(0).to(log_alpha.dtype),
        dbeta.sum(0).to(beta.dtype), dlog_mu.sum(0).to(log_mu.dtype), ds_in, dm_in,
    )


class _MomentumDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, log_alpha, beta, log_mu, s0, m0, chunk_size):
        inputs = _inputs(query, key, value, log_alpha, beta, log_mu)
        state = None if s0 is None else (s0, m0)
        out, (s, m), chunk_states = chunked_forward(*inputs, state, chunk_size, save_chunk_states=True)
        ctx.save_for_backward(*inputs, *chunk_states)
        ctx.chunk = chunk_tokens(chunk_size, value.dtype)
        ctx.state_dtype = None if s0 is None else s0.dtype
        return out, s, m

    @staticmethod
    def backward(ctx, grad_out, grad_s, grad_m):
        *inputs, s_chunks, m_chunks = ctx.saved_tensors
        *grads, ds0, dm0 = chunked_backward(inputs, (s_chunks, m_chunks), ctx.chunk, grad_out, (grad_s, grad_m))
        if ctx.state_dtype is None:
            return (*grads, None, None, None)
        return (*grads, ds0.to(ctx.state_dtype), dm0.to(ctx.state_dtype), None)


def momentum_delta(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    log_mu: torch.Tensor,
    state: MomentumState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, MomentumState]:
    """Differentiable Triton `chunked_momentum_delta`: gradients for query, key, value, log_alpha, beta, log_mu and the
    initial state."""
    s0, m0 = (None, None) if state is None else state
    out, s, m = _MomentumDelta.apply(query, key, value, log_alpha, beta, log_mu, s0, m0, chunk_size)
    return out, (s, m)


def momentum_delta_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    log_mu: torch.Tensor,
    state: MomentumState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, MomentumState]:
    """Equals `linear_ops.chunked_momentum_delta(...)` (output, final fp32 (S, M)), with gradients when any input needs
    them; a few tokens on a state (decode) go through the token-by-token kernel."""
    _triton.require_triton(query, key, value)
    inputs = (query, key, value, log_alpha, beta, log_mu, *(state or ()))
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return momentum_delta(query, key, value, log_alpha, beta, log_mu, state, chunk_size)
    if state is not None and query.shape[2] <= DECODE_MAX_TOKENS:
        return recurrent_forward(query, key, value, log_alpha, beta, log_mu, state)
    return chunked_forward(query, key, value, log_alpha, beta, log_mu, state, chunk_size)[:2]
