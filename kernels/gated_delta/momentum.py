"""The momentum delta rule (MDN-style) in Triton: decode and chunked forward; equal to `hf_attn_plus.linear_ops`'s
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

Gradients: `momentum_delta` is an autograd function whose forward is the chunked kernel and whose backward recomputes
the PyTorch `chunked_momentum_delta` from the inputs and differentiates it (no Triton backward yet): training is
exact but the backward runs at PyTorch speed and memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton
from . import DECODE_MAX_TOKENS
from .chunked import _unit_lower_inverse, chunk_tokens, dot_precision
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
def _chunked_forward(
    Q, K, V, LOG_ALPHA, BETA, LOG_MU, S_IN, M_IN, O, S_OUT, M_OUT,
    length, q_heads, groups, dk, dv,
    HAS_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
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
    s_offsets = bh * dk * dv + r[:, None] * dv + d[None, :]
    if HAS_STATE:
        s = tl.load(S_IN + s_offsets, mask=s_mask, other=0.0)
        m = tl.load(M_IN + s_offsets, mask=s_mask, other=0.0)
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
        m = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    rows = tl.arange(0, CHUNK)
    lower = rows[:, None] >= rows[None, :]
    for c in range(tl.cdiv(length, CHUNK)):
        t = c * CHUNK + rows
        t_ok = t < length
        k_mask = t_ok[:, None] & r_ok[None, :]
        v_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(K + (bh * length + t)[:, None] * dk + r[None, :], mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(V + (bh * length + t)[:, None] * dv + d[None, :], mask=v_mask, other=0.0).to(tl.float32)
        # Rows past the end: no decay, no momentum decay, no write; they only pad the tiles (outputs not stored, the
        # new state read at the last real row).
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
        for gi in range(groups):
            row = (b * q_heads + hk * groups + gi) * length + t
            q = tl.load(Q + row[:, None] * dk + r[None, :], mask=k_mask, other=0.0).to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * cm
            out = (
                g[:, None] * tl.dot(q, s, input_precision=PRECISION)
                + a[:, None] * tl.dot(q, m, input_precision=PRECISION)
                + tl.dot(qk, u, input_precision=PRECISION)
            )
            tl.store(O + row[:, None] * dv + d[None, :], out.to(O.dtype.element_ty), mask=v_mask)
        is_end = rows == tl.minimum(length - c * CHUNK, CHUNK) - 1
        to_end_s = tl.sum(tl.where(is_end[:, None], cm, 0.0), axis=0)  # C_e·
        to_end_m = tl.sum(tl.where(is_end[:, None], dm, 0.0), axis=0)  # Dm_e·
        g_end = tl.sum(tl.where(is_end, g, 0.0), axis=0)
        a_end = tl.sum(tl.where(is_end, a, 0.0), axis=0)
        p_end = tl.sum(tl.where(is_end, p, 0.0), axis=0)
        s_next = g_end * s + a_end * m + tl.dot(tl.trans(k * to_end_s[:, None]), u, input_precision=PRECISION)
        m = p_end * m + tl.dot(tl.trans(k * to_end_m[:, None]), u, input_precision=PRECISION)
        s = s_next
    tl.store(S_OUT + s_offsets, s, mask=s_mask)
    tl.store(M_OUT + s_offsets, m, mask=s_mask)


def _launch(kernel, query, key, value, log_alpha, beta, log_mu, state, **constants) -> tuple[torch.Tensor, MomentumState]:
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    out = torch.empty(batch, q_heads, length, dv, dtype=value.dtype, device=value.device)
    s_out = torch.empty(batch, kv_heads, dk, dv, dtype=torch.float32, device=value.device)
    m_out = torch.empty_like(s_out)
    s_in, m_in = (s_out, m_out) if state is None else (x.float().contiguous() for x in state)
    block_k, block_v = state_blocks(dk, dv)
    kernel[(batch * kv_heads, triton.cdiv(dv, block_v))](
        query.contiguous(), key.contiguous(), value.contiguous(),
        log_alpha.contiguous(), beta.contiguous(), log_mu.contiguous(),
        s_in, m_in, out, s_out, m_out, length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_STATE=state is not None, BLOCK_K=block_k, BLOCK_V=block_v, **constants,
    )
    return out, (s_out, m_out)


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
    return _launch(_recurrent_forward, query, key, value, log_alpha, beta, log_mu, state)


def chunked_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    log_mu: torch.Tensor,
    state: MomentumState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, MomentumState]:
    """Triton `chunked_momentum_delta` (no autograd; see `momentum_delta`). Chunks of `chunk_tokens(chunk_size)`: the
    result equals the reference's at any chunk size up to rounding (the chunked form is exact algebra)."""
    chunk = chunk_tokens(chunk_size, value.dtype)
    return _launch(
        _chunked_forward, query, key, value, log_alpha, beta, log_mu, state,
        CHUNK=chunk, PRECISION=dot_precision(value.dtype),
    )


class _MomentumDelta(torch.autograd.Function):
    """Forward: the chunked kernel. Backward: the PyTorch chunked form recomputed from the inputs, differentiated."""

    @staticmethod
    def forward(ctx, query, key, value, log_alpha, beta, log_mu, s0, m0, chunk_size):
        state = None if s0 is None else (s0, m0)
        out, (s, m) = chunked_forward(query, key, value, log_alpha, beta, log_mu, state, chunk_size)
        ctx.save_for_backward(query, key, value, log_alpha, beta, log_mu, s0, m0)
        ctx.chunk_size = chunk_size
        return out, s, m

    @staticmethod
    def backward(ctx, grad_out, grad_s, grad_m):
        from hf_attn_plus import linear_ops

        *inputs, s0, m0 = ctx.saved_tensors
        leaves = [x.detach().requires_grad_(need) for x, need in zip(inputs, ctx.needs_input_grad)]
        state = None if s0 is None else (s0.detach().requires_grad_(), m0.detach().requires_grad_())
        with torch.enable_grad():
            out, (s, m) = linear_ops.chunked_momentum_delta(*leaves, state, ctx.chunk_size)
            wrt = [x for x in leaves + list(state or ()) if x.requires_grad]
            grads = iter(torch.autograd.grad((out, s, m), wrt, (grad_out, grad_s, grad_m), allow_unused=True))
        result = [next(grads) if x.requires_grad else None for x in leaves]
        result += [None, None] if state is None else [next(grads), next(grads)]
        return (*result, None)


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
    """Differentiable `chunked_momentum_delta`: Triton forward, PyTorch-recompute backward (see the module docstring)."""
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
    return chunked_forward(query, key, value, log_alpha, beta, log_mu, state, chunk_size)
