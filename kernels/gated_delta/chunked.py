"""The gated delta rule by chunks in Triton (prefill, training), and its autograd function.

Equal to `hf_attn_plus.linear_ops.chunked_gated_delta`. One program per (batch, KV head, block of Dv columns) walks the
chunks in order with S [Dk, BV] in registers (fp32). Per chunk of C tokens, with g_t = exp(cumulative log α) in fp32:
  A = strictly lower (β_t g_t/g_s k_t·k_s),  T = (I + A)⁻¹ (substitution in 16-row blocks, see _unit_lower_inverse),
  W = T diag(βg) K,  U = T diag(β) V - W S   (the pseudo-values u_t of the chunk, from S before it),
  O = diag(g) Q S + (Q Kᵀ ∘ g_t/g_s, causal) U,   S ← g_C S + (K ∘ g_C/g_s)ᵀ U.
The G query heads of a group read the chunk's U and S in turn (no per-query-head state). The backward walks the chunks
in reverse from the states the forward saved before each chunk, recomputes the chunk's T, W, U and differentiates
these formulas (dT to dA = -Tᵀ dT Tᵀ; log g to log α by suffix sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_power_of_2, tile_size
from . import recurrent


# Diagonal blocks of T solved by substitution; a chunk of several blocks then combines them with a few products.
SOLVE_BLOCK = tl.constexpr(16)


@triton.jit
def _unit_lower_inverse(a, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """(I + A)⁻¹ for A [CHUNK, CHUNK] strictly lower. Substitution inside the 16-row diagonal blocks, all blocks at
    once and one tl.dot per step (row i of each block needs its rows < i); then, with D the block-diagonal part and
    M = D⁻¹ (A - A_diag), X = D⁻¹ - M X reaches (I + M)⁻¹ D⁻¹ = (I + A)⁻¹ in blocks - 1 steps (M is nilpotent).
    The products of that step span at most CHUNK / 16 blocks, so no long alternating sums (which a Neumann series
    in A would need: its powers grow like binomials for repeated keys)."""
    rows = tl.arange(0, CHUNK)
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    same_block = (rows[:, None] // SOLVE_BLOCK) == (rows[None, :] // SOLVE_BLOCK)
    a_diag = tl.where(same_block, a, 0.0)
    inverse = eye
    for i in range(1, SOLVE_BLOCK):
        step = eye - tl.dot(a_diag, inverse, input_precision=PRECISION)
        inverse = tl.where((rows % SOLVE_BLOCK == i)[:, None], step, inverse)
    if CHUNK > SOLVE_BLOCK:
        m = tl.dot(inverse, tl.where(same_block, 0.0, a), input_precision=PRECISION)
        block_inverse = inverse
        for _ in range(CHUNK // SOLVE_BLOCK - 1):
            inverse = block_inverse - tl.dot(m, inverse, input_precision=PRECISION)
    return inverse


@triton.jit
def _chunk_terms(
    K, V, LOG_ALPHA, BETA, s, bh, c, length, dk, dv, r, d, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Chunk c's keys, values (fp32, zero past the end), cumulative log g, β, decay g_t/g_s, K Kᵀ, T, W and U."""
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    t = c * CHUNK + rows
    t_ok = t < length
    k = tl.load(K + (bh * length + t)[:, None] * dk + r[None, :], mask=t_ok[:, None] & (r < dk)[None, :], other=0.0)
    v = tl.load(V + (bh * length + t)[:, None] * dv + d[None, :], mask=t_ok[:, None] & (d < dv)[None, :], other=0.0)
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    # Rows past the end: log α = 0 and β = 0, so they neither decay nor write (as the reference's padding).
    log_g = tl.cumsum(tl.load(LOG_ALPHA + bh * length + t, mask=t_ok, other=0.0).to(tl.float32), axis=0)
    beta = tl.load(BETA + bh * length + t, mask=t_ok, other=0.0).to(tl.float32)
    # g_t / g_s for s <= t, from the difference of logs (masked before exp: the upper triangle could overflow)
    decay = tl.where(causal, tl.exp(tl.where(causal, log_g[:, None] - log_g[None, :], 0.0)), 0.0)
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    inverse = _unit_lower_inverse(
        tl.where(rows[:, None] > rows[None, :], beta[:, None] * decay * kk, 0.0), CHUNK, PRECISION
    )
    w = tl.dot(inverse, (beta * tl.exp(log_g))[:, None] * k, input_precision=PRECISION)
    u = tl.dot(inverse, beta[:, None] * v, input_precision=PRECISION) - tl.dot(w, s, input_precision=PRECISION)
    return k, v, log_g, beta, decay, kk, inverse, w, u


@triton.jit
def _chunked_forward(
    Q, K, V, LOG_ALPHA, BETA, S_IN, O, S_OUT, S_CHUNKS,
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
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    rows = tl.arange(0, CHUNK)
    chunks = tl.cdiv(length, CHUNK)
    for c in range(chunks):
        if SAVE_CHUNKS:
            tl.store(S_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, s, mask=s_mask)
        k, v, log_g, beta, decay, kk, inverse, w, u = _chunk_terms(
            K, V, LOG_ALPHA, BETA, s, bh, c, length, dk, dv, r, d, CHUNK, PRECISION
        )
        g = tl.exp(log_g)
        t = c * CHUNK + rows
        t_ok = t < length
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


@triton.jit
def _chunked_backward(
    Q, K, V, LOG_ALPHA, BETA, S_CHUNKS, DO, DS_OUT, DQ, DK, DV, DLOG_ALPHA, DBETA, DS_IN,
    length, q_heads, groups, dk, dv,
    HAS_DS_OUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Chunks in reverse, carrying dS = dL/dS (the state before the chunk on exit). Each chunk recomputes its forward
    # quantities (T, W, U) from the saved state before it, then differentiates the forward formulas above. DQ, DK,
    # DLOG_ALPHA and DBETA sum over Dv: each column block writes its part (leading index = block), the caller adds up.
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
    if HAS_DS_OUT:
        ds = tl.load(DS_OUT + bh * dk * dv + s_offsets, mask=s_mask, other=0.0)
    else:
        ds = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    rows = tl.arange(0, CHUNK)
    strict = rows[:, None] > rows[None, :]
    chunks = tl.cdiv(length, CHUNK)
    for back in range(chunks):
        c = chunks - 1 - back
        # ---- the chunk's forward, as in _chunked_forward
        s = tl.load(S_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, mask=s_mask, other=0.0)
        k, v, log_g, beta, decay, kk, inverse, w, u = _chunk_terms(
            K, V, LOG_ALPHA, BETA, s, bh, c, length, dk, dv, r, d, CHUNK, PRECISION
        )
        g = tl.exp(log_g)
        k_bg = (beta * g)[:, None] * k
        v_b = beta[:, None] * v
        t = c * CHUNK + rows
        t_ok = t < length
        k_mask = t_ok[:, None] & r_ok[None, :]
        v_mask = t_ok[:, None] & d_ok[None, :]
        log_end = tl.sum(tl.where(rows == CHUNK - 1, log_g, 0.0), axis=0)
        to_end = tl.exp(log_end - log_g)
        # ---- S' = g_C S + (to_end ∘ K)ᵀ U
        du = tl.dot(to_end[:, None] * k, ds, input_precision=PRECISION)
        dk_end = tl.dot(u, tl.trans(ds), input_precision=PRECISION)  # d(to_end ∘ K)
        end_terms = to_end * tl.sum(k * dk_end, axis=1)
        dk_acc = to_end[:, None] * dk_end
        dlog_g = -end_terms
        dlog_end = tl.exp(log_end) * tl.sum(tl.sum(ds * s, axis=1), axis=0) + tl.sum(end_terms, axis=0)
        ds = tl.exp(log_end) * ds
        # ---- O = diag(g) Q S + (Q Kᵀ ∘ decay) U, per query head of the group
        d_decay = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # dL/d(decay), before the chain to log g
        for gi in range(groups):
            row = (b * q_heads + hk * groups + gi) * length + t
            q = tl.load(Q + row[:, None] * dk + r[None, :], mask=k_mask, other=0.0).to(tl.float32)
            do = tl.load(DO + row[:, None] * dv + d[None, :], mask=v_mask, other=0.0).to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            do_u = tl.dot(do, tl.trans(u), input_precision=PRECISION)
            du += tl.dot(tl.trans(qk * decay), do, input_precision=PRECISION)
            ds += tl.dot(tl.trans(q), g[:, None] * do, input_precision=PRECISION)
            dlog_g += g * tl.sum(do * tl.dot(q, s, input_precision=PRECISION), axis=1)
            d_decay += do_u * qk
            dq = g[:, None] * tl.dot(do, tl.trans(s), input_precision=PRECISION)
            dq += tl.dot(do_u * decay, k, input_precision=PRECISION)
            tl.store(DQ + (iv * batch_heads * groups * length + row)[:, None] * dk + r[None, :], dq, mask=k_mask)
            dk_acc += tl.dot(tl.trans(do_u * decay), q, input_precision=PRECISION)
        # ---- U = T diag(β) V - W S,  W = T diag(βg) K
        ds -= tl.dot(tl.trans(w), du, input_precision=PRECISION)
        dw = -tl.dot(du, tl.trans(s), input_precision=PRECISION)
        dv_b = tl.dot(tl.trans(inverse), du, input_precision=PRECISION)
        tl.store(DV + (bh * length + t)[:, None] * dv + d[None, :], (beta[:, None] * dv_b).to(DV.dtype.element_ty),
                 mask=v_mask)
        dk_bg = tl.dot(tl.trans(inverse), dw, input_precision=PRECISION)
        dk_acc += (beta * g)[:, None] * dk_bg
        k_dk_bg = tl.sum(k * dk_bg, axis=1)
        dbeta = tl.sum(v * dv_b, axis=1) + g * k_dk_bg
        dlog_g += beta * g * k_dk_bg
        # ---- T = (I + A)⁻¹: dA = -Tᵀ dT Tᵀ on the strict lower triangle, A = β_t decay_ts (k_t·k_s)
        d_inverse = tl.dot(du, tl.trans(v_b), input_precision=PRECISION) + tl.dot(dw, tl.trans(k_bg), input_precision=PRECISION)
        da = -tl.dot(tl.trans(inverse), tl.dot(d_inverse, tl.trans(inverse), input_precision=PRECISION),
                     input_precision=PRECISION)
        da = tl.where(strict, da, 0.0)
        dbeta += tl.sum(da * decay * kk, axis=1)
        d_decay += da * beta[:, None] * kk
        d_kk = da * beta[:, None] * decay
        dk_acc += tl.dot(d_kk + tl.trans(d_kk), k, input_precision=PRECISION)
        # ---- decay_ts = exp(log g_t - log g_s), log g = cumsum(log α), log g_C = its last entry
        n = d_decay * decay
        dlog_g += tl.sum(n, axis=1) - tl.sum(n, axis=0)
        dlog_g += tl.where(rows == CHUNK - 1, dlog_end, 0.0)
        dlog_alpha = tl.sum(dlog_g, axis=0) - tl.cumsum(dlog_g, axis=0) + dlog_g  # suffix sums
        partial = iv * batch_heads * length + bh * length + t
        tl.store(DK + partial[:, None] * dk + r[None, :], dk_acc, mask=k_mask)
        tl.store(DBETA + partial, dbeta, mask=t_ok)
        tl.store(DLOG_ALPHA + partial, dlog_alpha, mask=t_ok)
    tl.store(DS_IN + bh * dk * dv + s_offsets, ds, mask=s_mask)


def backward_blocks(dk: int, dv: int) -> tuple[int, int]:
    """The backward holds about twice the forward's tiles: 32 state columns per program keep it within an H100's
    227 KB of shared memory at Dk = 128 (188 KB for 16-bit inputs at C = 64; 245 KB with 64 columns)."""
    block_k, block_v = recurrent.state_blocks(dk, dv)
    return block_k, min(32, block_v)


def chunked_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    chunk_states: torch.Tensor,
    chunk: int,
    grad_out: torch.Tensor,
    grad_state: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (query, key, value, log_alpha, beta, initial state) given `chunk_states` [B, Hkv, n, Dk, Dv], the fp32
    state before each kernel chunk of `chunk` tokens (from `chunked_forward`). Inputs contiguous; gradients in the
    inputs' dtypes, the state's in fp32."""
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    block_k, block_v = backward_blocks(dk, dv)
    blocks = triton.cdiv(dv, block_v)
    f32 = dict(dtype=torch.float32, device=value.device)
    dq = torch.empty(blocks, batch, q_heads, length, dk, **f32)
    dk_ = torch.empty(blocks, batch, kv_heads, length, dk, **f32)
    dv_ = torch.empty_like(value)
    dlog_alpha = torch.empty(blocks, batch, kv_heads, length, **f32)
    dbeta = torch.empty(blocks, batch, kv_heads, length, **f32)
    ds_in = torch.empty(batch, kv_heads, dk, dv, **f32)
    _chunked_backward[(batch * kv_heads, blocks)](
        query, key, value, log_alpha, beta, chunk_states, grad_out.contiguous(),
        ds_in if grad_state is None else grad_state.float().contiguous(),
        dq, dk_, dv_, dlog_alpha, dbeta, ds_in, length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_DS_OUT=grad_state is not None, CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v,
        PRECISION=dot_precision(value.dtype),
    )
    return (
        dq.sum(0).to(query.dtype), dk_.sum(0).to(key.dtype), dv_,
        dlog_alpha.sum(0).to(log_alpha.dtype), dbeta.sum(0).to(beta.dtype), ds_in,
    )


def dot_precision(dtype: torch.dtype) -> str:
    """Products of fp32 tiles: exact fp32 for fp32 inputs; tf32 (10-bit mantissa, as fp16) for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


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
    block_k, block_v = recurrent.state_blocks(dk, dv)
    _chunked_forward[(batch * kv_heads, triton.cdiv(dv, block_v))](
        query.contiguous(), key.contiguous(), value.contiguous(), log_alpha.contiguous(), beta.contiguous(),
        s_out if state is None else state.float().contiguous(), out, s_out,
        s_out if chunk_states is None else chunk_states,
        length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_STATE=state is not None, SAVE_CHUNKS=save_chunk_states, CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v,
        PRECISION=dot_precision(value.dtype),
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
        grads = chunked_backward(*inputs, chunk_states, ctx.chunk, grad_out, grad_state)
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
