"""The gated delta rule by chunks in Triton (prefill, training), and its autograd function.

Equal to `hf_attn_plus.linear_ops.chunked_gated_delta`. One program per (batch, KV head, block of Dv columns) walks the
chunks in order with S [Dk, BV] in registers (fp32). Per chunk of C tokens, with g_t = exp(cumulative log α) in fp32:
  A = strictly lower (β_t g_t/g_s k_t·k_s),  T = (I + A)⁻¹ by forward substitution (row i needs rows < i),
  W = T diag(βg) K,  U = T diag(β) V - W S   (the pseudo-values u_t of the chunk, from S before it),
  O = diag(g) Q S + (Q Kᵀ ∘ g_t/g_s, causal) U,   S ← g_C S + (K ∘ g_C/g_s)ᵀ U.
The G query heads of a group read the chunk's U and S in turn (no per-query-head state). The backward is the Triton
reverse time walk of `recurrent.py` from the states saved before each chunk (not a chunked backward yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_power_of_2, tile_size
from . import recurrent


@triton.jit
def _chunked_forward(
    Q, K, V, LOG_ALPHA, BETA, S_IN, O, S_OUT, S_CHUNKS,
    length, q_heads, groups, dk, dv,
    HAS_STATE: tl.constexpr, SAVE_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
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
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    chunks = tl.cdiv(length, CHUNK)
    for c in range(chunks):
        if SAVE_CHUNKS:
            tl.store(S_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, s, mask=s_mask)
        t = c * CHUNK + rows
        t_ok = t < length
        k = tl.load(K + (bh * length + t)[:, None] * dk + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        v = tl.load(V + (bh * length + t)[:, None] * dv + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        # Rows past the end: log α = 0 and β = 0, so they neither decay nor write (as the reference's padding).
        log_g = tl.cumsum(tl.load(LOG_ALPHA + bh * length + t, mask=t_ok, other=0.0).to(tl.float32), axis=0)
        beta = tl.load(BETA + bh * length + t, mask=t_ok, other=0.0).to(tl.float32)
        g = tl.exp(log_g)
        # g_t / g_s for s <= t, from the difference of logs (masked before exp: the upper triangle could overflow)
        decay = tl.where(causal, tl.exp(tl.where(causal, log_g[:, None] - log_g[None, :], 0.0)), 0.0)
        kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
        a = tl.where(rows[:, None] > rows[None, :], beta[:, None] * decay * kk, 0.0)
        inverse = eye
        for i in range(1, CHUNK):
            a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), axis=0)  # row i of A
            row_i = tl.where(rows == i, 1.0, 0.0) - tl.sum(a_i[:, None] * inverse, axis=0)
            inverse = tl.where(rows[:, None] == i, row_i[None, :], inverse)
        w = tl.dot(inverse, (beta * g)[:, None] * k, input_precision=PRECISION)
        u = tl.dot(inverse, beta[:, None] * v, input_precision=PRECISION) - tl.dot(w, s, input_precision=PRECISION)
        for gi in range(groups):
            row = (b * q_heads + hk * groups + gi) * length + t
            q = tl.load(Q + row[:, None] * dk + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
            out = g[:, None] * tl.dot(q, s, input_precision=PRECISION) + tl.dot(qk, u, input_precision=PRECISION)
            tl.store(O + row[:, None] * dv + d[None, :], out.to(O.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
        log_end = tl.sum(tl.where(rows == CHUNK - 1, log_g, 0.0), axis=0)
        to_end = tl.exp(log_end - log_g)  # g_C / g_s
        s = tl.exp(log_end) * s + tl.dot(tl.trans(k * to_end[:, None]), u, input_precision=PRECISION)
    tl.store(S_OUT + bh * dk * dv + s_offsets, s, mask=s_mask)


def chunk_tokens(chunk_size: int, dtype: torch.dtype) -> int:
    """Tokens per kernel chunk: `chunk_size` rounded up to a power of two >= 16 (tl.dot), at most the dtype's tile
    size (64; 32 for fp32, whose exact-fp32 products at C = 64 need 131 KB of shared memory and four minutes of
    ptxas for sm_90). Any C gives the same result up to rounding: the chunked form is exact algebra."""
    return min(tile_size(dtype), next_power_of_2(chunk_size))


def chunked_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
    save_chunk_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton `chunked_gated_delta` (no autograd; see `gated_delta`). Returns (output, final state [B, Hkv, Dk, Dv]
    fp32, and with `save_chunk_states` the state before each kernel chunk [B, Hkv, n, Dk, Dv], for the backward)."""
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    chunk = chunk_tokens(chunk_size, value.dtype)
    out = torch.empty(batch, q_heads, length, dv, dtype=value.dtype, device=value.device)
    s_out = torch.empty(batch, kv_heads, dk, dv, dtype=torch.float32, device=value.device)
    chunk_states = (
        torch.empty(batch, kv_heads, triton.cdiv(length, chunk), dk, dv, dtype=torch.float32, device=value.device)
        if save_chunk_states else None
    )
    block_k, block_v = recurrent._blocks(dk, dv)
    _chunked_forward[(batch * kv_heads, triton.cdiv(dv, block_v))](
        query.contiguous(), key.contiguous(), value.contiguous(), log_alpha.contiguous(), beta.contiguous(),
        s_out if state is None else state.float().contiguous(), out, s_out,
        s_out if chunk_states is None else chunk_states,
        length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_STATE=state is not None, SAVE_CHUNKS=save_chunk_states, CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v,
        PRECISION="ieee" if value.dtype == torch.float32 else "tf32",
    )
    return out, s_out, chunk_states


class _GatedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, log_alpha, beta, state, chunk_size):
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        log_alpha, beta = log_alpha.contiguous(), beta.contiguous()
        out, final, chunk_states = chunked_forward(query, key, value, log_alpha, beta, state, chunk_size, True)
        ctx.save_for_backward(query, key, value, log_alpha, beta, chunk_states)
        ctx.chunk = chunk_tokens(chunk_size, value.dtype)
        ctx.state_dtype = None if state is None else state.dtype
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        *inputs, chunk_states = ctx.saved_tensors
        grads = recurrent.recurrent_backward(*inputs, chunk_states, ctx.chunk, grad_out, grad_state)
        grad_initial = None if ctx.state_dtype is None else grads[-1].to(ctx.state_dtype)
        return (*grads[:-1], grad_initial, None)


def gated_delta(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton `chunked_gated_delta`: gradients for query, key, value, log_alpha, beta and `state`."""
    return _GatedDelta.apply(query, key, value, log_alpha, beta, state, chunk_size)
