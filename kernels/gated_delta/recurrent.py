"""The gated delta rule token by token in Triton: the decode forward (one or a few new tokens on a state).

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
    bh = tl.program_id(0).to(tl.int64)  # b * kv_heads + KV head; 64-bit offsets past 2**31 elements
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


def state_blocks(dk: int, dv: int) -> tuple[int, int]:
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
    block_k, block_v = state_blocks(dk, dv)
    _recurrent_forward[(batch * kv_heads, triton.cdiv(dv, block_v))](
        query.contiguous(), key.contiguous(), value.contiguous(), log_alpha.contiguous(), beta.contiguous(),
        s_in, out, s_out, length, q_heads, q_heads // kv_heads, dk, dv,
        HAS_STATE=state is not None, BLOCK_K=block_k, BLOCK_V=block_v,
    )
    return out, s_out
