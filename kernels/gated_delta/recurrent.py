"""The gated delta rule token by token in Triton: the forward (decode: one or a few new tokens on a state) and the
backward of the whole sequence (reverse time walk).

Conventions of `hf_attn_plus.linear_ops.recurrent_gated_delta`: per KV head the state S [Dk, Dv] (fp32),
S_t = α_t S_{t-1} + k_t u_tᵀ with u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t), o_t = S_tᵀ q_t for each query head of the group.
One program per (batch, KV head, block of Dv columns): the columns of S evolve independently (u_t's column d reads only
column d of S), so the state splits over Dv without communication; the G query heads of a group read it in turn.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_power_of_2


@triton.jit
def _recurrent_forward(
    Q, K, V, LOG_ALPHA, BETA, S_IN, O, S_OUT,
    length, q_heads, groups, dk, dv,
    HAS_STATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    bh = tl.program_id(0)  # b * kv_heads + KV head
    kv_heads = q_heads // groups
    b = bh // kv_heads
    hk = bh % kv_heads
    r = tl.arange(0, BLOCK_K)
    d = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    r_ok = r < dk
    d_ok = d < dv
    s_offsets = bh * dk * dv + r[:, None] * dv + d[None, :]
    if HAS_STATE:
        s = tl.load(S_IN + s_offsets, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    for t in range(length):
        k = tl.load(K + (bh * length + t) * dk + r, mask=r_ok, other=0.0).to(tl.float32)
        v = tl.load(V + (bh * length + t) * dv + d, mask=d_ok, other=0.0).to(tl.float32)
        alpha = tl.exp(tl.load(LOG_ALPHA + bh * length + t).to(tl.float32))
        beta = tl.load(BETA + bh * length + t).to(tl.float32)
        s = s * alpha
        u = beta * (v - tl.sum(k[:, None] * s, axis=0))
        s += k[:, None] * u[None, :]
        for g in range(groups):
            row = (b * q_heads + hk * groups + g) * length + t
            q = tl.load(Q + row * dk + r, mask=r_ok, other=0.0).to(tl.float32)
            tl.store(O + row * dv + d, tl.sum(q[:, None] * s, axis=0).to(O.dtype.element_ty), mask=d_ok)
    tl.store(S_OUT + s_offsets, s, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _recurrent_backward(
    Q, K, V, LOG_ALPHA, BETA, S_CHUNKS, SCRATCH, DO, DS_OUT, DQ, DK, DV, DLOG_ALPHA, DBETA, DS_IN,
    length, q_heads, groups, dk, dv,
    HAS_DS_OUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Walks time backwards carrying dL/dS. The states are recomputed chunk by chunk from S_CHUNKS (the state before each
    # chunk, saved by the forward) into this program's SCRATCH, then read in reverse. DQ, DK, DLOG_ALPHA and DBETA sum
    # over Dv: each column block writes its partial sum (leading index = block), added up by the caller.
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    blocks = tl.num_programs(1)
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
    scratch = SCRATCH + (bh * blocks + iv) * CHUNK * BLOCK_K * BLOCK_V + r[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    if HAS_DS_OUT:
        ds = tl.load(DS_OUT + bh * dk * dv + s_offsets, mask=s_mask, other=0.0)
    else:
        ds = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    chunks = tl.cdiv(length, CHUNK)
    for back in range(chunks):
        c = chunks - 1 - back
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, length)
        s = tl.load(S_CHUNKS + (bh * chunks + c) * dk * dv + s_offsets, mask=s_mask, other=0.0)
        for t in range(start, end):
            tl.store(scratch + (t - start) * BLOCK_K * BLOCK_V, s)  # S_{t-1}
            k = tl.load(K + (bh * length + t) * dk + r, mask=r_ok, other=0.0).to(tl.float32)
            v = tl.load(V + (bh * length + t) * dv + d, mask=d_ok, other=0.0).to(tl.float32)
            s = s * tl.exp(tl.load(LOG_ALPHA + bh * length + t).to(tl.float32))
            s += k[:, None] * (tl.load(BETA + bh * length + t).to(tl.float32) * (v - tl.sum(k[:, None] * s, axis=0)))[None, :]
        tl.debug_barrier()
        for step in range(start, end):
            t = end - 1 - (step - start)
            k = tl.load(K + (bh * length + t) * dk + r, mask=r_ok, other=0.0).to(tl.float32)
            v = tl.load(V + (bh * length + t) * dv + d, mask=d_ok, other=0.0).to(tl.float32)
            alpha = tl.exp(tl.load(LOG_ALPHA + bh * length + t).to(tl.float32))
            beta = tl.load(BETA + bh * length + t).to(tl.float32)
            decayed = alpha * tl.load(scratch + (t - start) * BLOCK_K * BLOCK_V)  # α_t S_{t-1}
            err = v - tl.sum(k[:, None] * decayed, axis=0)
            u = beta * err
            s = decayed + k[:, None] * u[None, :]  # S_t
            for g in range(groups):
                row = (b * q_heads + hk * groups + g) * length + t
                do = tl.load(DO + row * dv + d, mask=d_ok, other=0.0).to(tl.float32)
                q = tl.load(Q + row * dk + r, mask=r_ok, other=0.0).to(tl.float32)
                ds += q[:, None] * do[None, :]
                tl.store(DQ + (iv * batch_heads * groups * length + row) * dk + r, tl.sum(s * do[None, :], axis=1), mask=r_ok)
            du = tl.sum(ds * k[:, None], axis=0)
            tl.store(DV + (bh * length + t) * dv + d, (beta * du).to(DV.dtype.element_ty), mask=d_ok)
            d_decayed = ds - k[:, None] * (beta * du)[None, :]  # through S_t directly and through u_t's α_t S_{t-1}ᵀ k_t
            dk_t = tl.sum(ds * u[None, :], axis=1) - tl.sum(decayed * (beta * du)[None, :], axis=1)
            partial = iv * batch_heads * length + bh * length + t
            tl.store(DK + partial * dk + r, dk_t, mask=r_ok)
            tl.store(DBETA + partial, tl.sum(du * err, axis=0))
            tl.store(DLOG_ALPHA + partial, tl.sum(tl.sum(d_decayed * decayed, axis=1), axis=0))
            ds = alpha * d_decayed
        tl.debug_barrier()
    tl.store(DS_IN + bh * dk * dv + s_offsets, ds, mask=s_mask)


def _blocks(dk: int, dv: int) -> tuple[int, int]:
    """All of Dk in one program (u_t sums over it); Dv in blocks of at most 64 columns (a 128x64 fp32 state per program)."""
    return next_power_of_2(dk), min(64, next_power_of_2(dv))


def recurrent_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `recurrent_gated_delta` (no autograd): returns (output [B, Hq, L, Dv], state [B, Hkv, Dk, Dv] fp32).
    Meant for decode (a few tokens); a long prompt is faster through `chunked.chunked_forward`."""
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    out = torch.empty(batch, q_heads, length, dv, dtype=value.dtype, device=value.device)
    s_out = torch.empty(batch, kv_heads, dk, dv, dtype=torch.float32, device=value.device)
    s_in = s_out if state is None else state.float().contiguous()
    block_k, block_v = _blocks(dk, dv)
    _recurrent_forward[(batch * kv_heads, triton.cdiv(dv, block_v))](
        query.contiguous(), key.contiguous(), value.contiguous(), log_alpha.contiguous(), beta.contiguous(),
        s_in, out, s_out, length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_STATE=state is not None, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return out, s_out


def recurrent_backward(
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
    """Gradients (query, key, value, log_alpha, beta, initial state) of the gated delta rule, given `chunk_states`
    [B, Hkv, n, Dk, Dv], the fp32 state before each `chunk` tokens (saved by `chunked.chunked_forward`). Inputs
    contiguous; gradients in the inputs' dtypes, the state's in fp32."""
    batch, q_heads, length, dk = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    block_k, block_v = _blocks(dk, dv)
    blocks = triton.cdiv(dv, block_v)
    f32 = dict(dtype=torch.float32, device=value.device)
    scratch = torch.empty(batch * kv_heads * blocks, chunk, block_k, block_v, **f32)
    dq = torch.empty(blocks, batch, q_heads, length, dk, **f32)
    dk_ = torch.empty(blocks, batch, kv_heads, length, dk, **f32)
    dv_ = torch.empty_like(value)
    dlog_alpha = torch.empty(blocks, batch, kv_heads, length, **f32)
    dbeta = torch.empty(blocks, batch, kv_heads, length, **f32)
    ds_in = torch.empty(batch, kv_heads, dk, dv, **f32)
    _recurrent_backward[(batch * kv_heads, blocks)](
        query, key, value, log_alpha, beta, chunk_states, scratch, grad_out.contiguous(),
        ds_in if grad_state is None else grad_state.float().contiguous(),
        dq, dk_, dv_, dlog_alpha, dbeta, ds_in, length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_DS_OUT=grad_state is not None, CHUNK=chunk, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return (
        dq.sum(0).to(query.dtype), dk_.sum(0).to(key.dtype), dv_,
        dlog_alpha.sum(0).to(log_alpha.dtype), dbeta.sum(0).to(beta.dtype), ds_in,
    )
