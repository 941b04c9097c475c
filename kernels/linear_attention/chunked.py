"""Chunked causal linear attention forward, and the one-token decode step, in Triton.

Equal to `hf_attn_plus.linear_ops.chunked_linear_attention` / `recurrent_linear_attention`: one program per (batch,
query head) walks the chunks in order, keeping S [F, Dv] and z [F] of its KV head in registers (with GQA the G query
heads of a group each rebuild the same state; the first one writes it out). fp32 accumulation throughout.
The backward recomputes the PyTorch chunked form under autograd (no Triton backward yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_attn_plus import linear_ops


@triton.jit
def _chunked_forward(
    Q, K, V, S_IN, Z_IN, O, S_OUT, Z_OUT,
    length, q_heads, groups, features, dv,
    HAS_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // q_heads
    h = pid % q_heads
    kv_heads = q_heads // groups
    hk = h // groups
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_V)
    f_ok = f < features
    d_ok = d < dv
    state_base = (b * kv_heads + hk)
    if HAS_STATE:
        s = tl.load(S_IN + state_base * features * dv + f[:, None] * dv + d[None, :],
                    mask=f_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        z = tl.load(Z_IN + state_base * features + f, mask=f_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
        z = tl.zeros([BLOCK_F], dtype=tl.float32)
    q_base = Q + (b * q_heads + h) * length * features
    k_base = K + state_base * length * features
    v_base = V + state_base * length * dv
    o_base = O + (b * q_heads + h) * length * dv
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    for start in range(0, length, CHUNK):
        t = start + rows
        t_ok = t < length
        q = tl.load(q_base + t[:, None] * features + f[None, :], mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_base + t[:, None] * features + f[None, :], mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_base + t[:, None] * dv + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        within = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
        num = tl.dot(within, v) + tl.dot(q, s)
        den = tl.sum(within, axis=1) + tl.sum(q * z[None, :], axis=1)
        out = num / (den[:, None] + EPS)
        tl.store(o_base + t[:, None] * dv + d[None, :], out.to(O.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
        s += tl.dot(tl.trans(k), v)
        z += tl.sum(k, axis=0)
    if h % groups == 0:
        tl.store(S_OUT + state_base * features * dv + f[:, None] * dv + d[None, :], s, mask=f_ok[:, None] & d_ok[None, :])
        tl.store(Z_OUT + state_base * features + f, z, mask=f_ok)


@triton.jit
def _decode_step(
    Q, K, V, S, Z, O, q_heads, groups, features, dv,
    BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr, EPS: tl.constexpr,
):
    # One program per (batch, KV head): write the new token into S, z in place, then read it with each query head.
    pid = tl.program_id(0)
    kv_heads = q_heads // groups
    b = pid // kv_heads
    hk = pid % kv_heads
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_V)
    f_ok = f < features
    d_ok = d < dv
    sd_mask = f_ok[:, None] & d_ok[None, :]
    s_ptr = S + pid * features * dv + f[:, None] * dv + d[None, :]
    k = tl.load(K + pid * features + f, mask=f_ok, other=0.0).to(tl.float32)
    v = tl.load(V + pid * dv + d, mask=d_ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr, mask=sd_mask, other=0.0) + k[:, None] * v[None, :]
    z = tl.load(Z + pid * features + f, mask=f_ok, other=0.0) + k
    tl.store(s_ptr, s, mask=sd_mask)
    tl.store(Z + pid * features + f, z, mask=f_ok)
    for g in range(groups):
        h = hk * groups + g
        q = tl.load(Q + (b * q_heads + h) * features + f, mask=f_ok, other=0.0).to(tl.float32)
        out = tl.sum(q[:, None] * s, axis=0) / (tl.sum(q * z, axis=0) + EPS)
        tl.store(O + (b * q_heads + h) * dv + d, out.to(O.dtype.element_ty), mask=d_ok)


def _blocks(features: int, dv: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(features)), max(16, triton.next_power_of_2(dv))


def chunked_forward(
    phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor,
    state: linear_ops.LinearState | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, linear_ops.LinearState]:
    """Triton `chunked_linear_attention` (no autograd; see `linear_attention`)."""
    batch, q_heads, length, features = phi_q.shape
    kv_heads, dv = phi_k.shape[1], value.shape[-1]
    phi_q, phi_k, value = phi_q.contiguous(), phi_k.contiguous(), value.contiguous()
    out = torch.empty(batch, q_heads, length, dv, dtype=value.dtype, device=value.device)
    s_out = torch.empty(batch, kv_heads, features, dv, dtype=torch.float32, device=value.device)
    z_out = torch.empty(batch, kv_heads, features, dtype=torch.float32, device=value.device)
    s_in, z_in = (s_out, z_out) if state is None else (state[0].float().contiguous(), state[1].float().contiguous())
    block_f, block_v = _blocks(features, dv)
    _chunked_forward[(batch * q_heads,)](
        phi_q, phi_k, value, s_in, z_in, out, s_out, z_out, length, q_heads, q_heads // kv_heads, features, dv,
        HAS_STATE=state is not None, CHUNK=max(16, triton.next_power_of_2(chunk_size)),
        BLOCK_F=block_f, BLOCK_V=block_v, EPS=linear_ops.EPS,
    )
    return out, (s_out, z_out)


def decode_step(
    phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor, state: linear_ops.LinearState
) -> torch.Tensor:
    """One new token ([B, H, 1, F]) against `state`, which is updated in place (fp32, contiguous)."""
    batch, q_heads, _, features = phi_q.shape
    kv_heads, dv = phi_k.shape[1], value.shape[-1]
    out = torch.empty(batch, q_heads, 1, dv, dtype=value.dtype, device=value.device)
    block_f, block_v = _blocks(features, dv)
    _decode_step[(batch * kv_heads,)](
        phi_q.contiguous(), phi_k.contiguous(), value.contiguous(), state[0], state[1], out,
        q_heads, q_heads // kv_heads, features, dv, BLOCK_F=block_f, BLOCK_V=block_v, EPS=linear_ops.EPS,
    )
    return out


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, value, chunk_size):
        out, state = chunked_forward(phi_q, phi_k, value, None, chunk_size)
        ctx.save_for_backward(phi_q, phi_k, value)
        ctx.chunk_size = chunk_size
        return out, state[0], state[1]

    @staticmethod
    def backward(ctx, grad_out, grad_s, grad_z):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out, (s, z) = linear_ops.chunked_linear_attention(*inputs, None, ctx.chunk_size)
            grads = torch.autograd.grad((out, s, z), inputs, (grad_out, grad_s, grad_z), allow_unused=True)
        return (*grads, None)


def linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor, chunk_size: int = 64
) -> tuple[torch.Tensor, linear_ops.LinearState]:
    """Differentiable chunked linear attention from an empty state: Triton forward, backward by recomputation."""
    out, s, z = _LinearAttention.apply(phi_q, phi_k, value, chunk_size)
    return out, (s, z)
