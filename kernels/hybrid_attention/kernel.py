"""Hybrid (LoLCATs) attention in Triton: exact softmax over the last `window` keys plus linear attention over older
keys, one normaliser. Equal to `hf_attn_plus.linear_ops.chunked_hybrid_attention` (same conventions: keys are the
`kv - q` slots kept by the decode cache followed by the queries' own tokens, `key_mask` zeroes padding, `state` holds
every key older than those slots).

Forward: one program per (batch, query head) walks chunks of C queries in order, fp32 throughout:
- linear part: the chunk's keys delayed by `window - kept` slots (query i reads linear keys at slots <= kept + i -
  window) through the linear kernel's own helpers (`_chunk_terms`, `_advance_state`): numerator φq S + tril(φq φkᵀ) v,
  normaliser φq z + rowsum, the state S [F, Dv], z [F] of the KV head carried in registers between chunks;
- softmax part: the chunk's C + window - 1 band of keys in blocks, with an online (flash) max shift, so it ends as
  Σ_win e^{τq·k - m} v and Σ_win e^{τq·k - m} with m the row's largest window logit, exactly the reference's shift;
- o = (soft_num + γ_h lin_num) / (soft_den + γ_h lin_den + EPS).
With GQA the G query heads of a group each rebuild the same state; the first one writes it out. The same kernel is the
decode step (q = 1 against the cached window and state): one chunk, a band of `window` keys.

Backward (`hybrid_attention`): NOT a Triton kernel. The autograd Function saves the inputs and, in backward, recomputes
the PyTorch chunked form (`linear_ops.chunked_hybrid_attention`) under autograd and differentiates it: gradients are
the reference's exactly, at the reference's speed and activation memory during the backward (the forward itself keeps
no activations).

Precision: tiles are loaded as fp32; the logits and the p·v products use exact fp32 products for fp32 inputs and tf32
for 16-bit ones (`dot_precision`); the linear helpers use Triton's default (tf32 on sm_80+), as in the linear kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_attn_plus import linear_ops

from .._triton import next_power_of_2, require_triton
from ..gated_delta.chunked import dot_precision
from ..linear_attention.chunked import _advance_state, _chunk_terms, _load_rows, _load_state, kernel_chunk

# Below any real logit: the running max of a row that has seen no window key yet (kept finite so exp(m_old - m_new)
# is 1, not NaN, while every key is still masked).
_NO_LOGIT = tl.constexpr(-1.0e30)


@triton.jit
def _hybrid_forward(
    Q, K, V, PHI_Q, PHI_K, REAL, GAMMA, S_IN, Z_IN, O, S_OUT, Z_OUT,
    q_len, kv_len, q_heads, groups, head_dim, features, dv, window, scaling,
    HAS_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // q_heads
    h = pid % q_heads
    state_base = b * (q_heads // groups) + h // groups
    e = tl.arange(0, BLOCK_D)
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_V)
    e_ok = e < head_dim
    f_ok = f < features
    d_ok = d < dv
    s, z = _load_state(S_IN, Z_IN, state_base, f, f_ok, d, d_ok, dv, features, HAS_STATE, BLOCK_F, BLOCK_V)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    kept = kv_len - q_len
    delay = window - kept
    q_base = Q + pid * q_len * head_dim
    phi_q_base = PHI_Q + pid * q_len * features
    k_base = K + state_base * kv_len * head_dim
    phi_k_base = PHI_K + state_base * kv_len * features
    v_base = V + state_base * kv_len * dv
    real_base = REAL + b * kv_len
    o_base = O + pid * q_len * dv
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    for start in range(0, q_len, CHUNK):
        t = start + rows
        t_ok = t < q_len
        # Linear part: row i of the chunk pairs with key slot t - delay (older than the window), padding excluded.
        j = t - delay
        j_ok = t_ok & (j >= 0) & (tl.load(real_base + j, mask=t_ok & (j >= 0), other=0.0) != 0)
        phi_q = _load_rows(phi_q_base, t, t_ok, f, f_ok, features)
        phi_k = _load_rows(phi_k_base, j, j_ok, f, f_ok, features)
        v_old = _load_rows(v_base, j, j_ok, d, d_ok, dv)
        _, lin_num, lin_den = _chunk_terms(phi_q, phi_k, v_old, s, z, causal)
        s, z = _advance_state(s, z, phi_k, v_old)

        # Softmax part: query row t sits at key slot kept + t and reads slots (kept + t - window, kept + t].
        q = _load_rows(q_base, t, t_ok, e, e_ok, head_dim)
        slot = kept + t
        row_max = tl.full([CHUNK], _NO_LOGIT, tl.float32)
        soft_den = tl.zeros([CHUNK], dtype=tl.float32)
        soft_num = tl.zeros([CHUNK, BLOCK_V], dtype=tl.float32)
        lo = tl.maximum(kept + start - window + 1, 0)
        hi = tl.minimum(kept + start + CHUNK, kv_len)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (n < hi) & (tl.load(real_base + n, mask=n < hi, other=0.0) != 0)
            k = _load_rows(k_base, n, n_ok, e, e_ok, head_dim)
            v = _load_rows(v_base, n, n_ok, d, d_ok, dv)
            inside = n_ok[None, :] & (n[None, :] <= slot[:, None]) & (n[None, :] > slot[:, None] - window)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            logits = tl.where(inside, logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(logits - new_max[:, None])
            soft_den = soft_den * rescale + tl.sum(p, axis=1)
            soft_num = soft_num * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
            row_max = new_max

        out = (soft_num + gamma * lin_num) / (soft_den + gamma * lin_den + EPS)[:, None]
        tl.store(o_base + t[:, None] * dv + d[None, :], out.to(O.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
    if h % groups == 0:
        tl.store(S_OUT + state_base * features * dv + f[:, None] * dv + d[None, :], s, mask=f_ok[:, None] & d_ok[None, :])
        tl.store(Z_OUT + state_base * features + f, z, mask=f_ok)


def hybrid_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor,
    scaling: float,
    gamma: torch.Tensor,
    window: int,
    state: linear_ops.LinearState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, linear_ops.LinearState]:
    """Triton `linear_ops.chunked_hybrid_attention` (same arguments; no autograd, see `hybrid_attention`)."""
    require_triton(query, key, value)
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, features, dv = key.shape[1], key.shape[2], phi_k.shape[-1], value.shape[-1]
    kept = kv_len - q_len
    if kept > window:
        raise ValueError(f"hybrid attention got {kept} cached slots for a window of {window}")
    query, key, value, phi_q, phi_k = (t.contiguous() for t in (query, key, value, phi_q, phi_k))
    real = key_mask.reshape(batch, kv_len).float().contiguous()
    gamma = gamma.reshape(q_heads).float().contiguous()
    out = torch.empty(batch, q_heads, q_len, dv, dtype=value.dtype, device=value.device)
    s_out = torch.empty(batch, kv_heads, features, dv, dtype=torch.float32, device=value.device)
    z_out = torch.empty(batch, kv_heads, features, dtype=torch.float32, device=value.device)
    s_in, z_in = (s_out, z_out) if state is None else (state[0].float().contiguous(), state[1].float().contiguous())
    dtypes = (query.dtype, key.dtype, value.dtype, phi_q.dtype, phi_k.dtype)
    chunk = kernel_chunk(chunk_size, features, dv, *dtypes)
    _hybrid_forward[(batch * q_heads,)](
        query, key, value, phi_q, phi_k, real, gamma, s_in, z_in, out, s_out, z_out,
        q_len, kv_len, q_heads, q_heads // kv_heads, head_dim, features, dv, window, scaling,
        HAS_STATE=state is not None, CHUNK=chunk, BLOCK_N=chunk, BLOCK_D=next_power_of_2(head_dim),
        BLOCK_F=next_power_of_2(features), BLOCK_V=next_power_of_2(dv),
        PRECISION=dot_precision(max(dtypes, key=lambda t: t.itemsize)), EPS=linear_ops.EPS,
    )
    return out, (s_out, z_out)


class _HybridAttention(torch.autograd.Function):
    """Triton forward; backward = autograd through the PyTorch chunked form, recomputed from the saved inputs."""

    @staticmethod
    def forward(ctx, query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k, scaling, window, chunk_size):
        state = None if state_kv is None else (state_kv, state_k)
        out, (s, z) = hybrid_forward(query, key, value, phi_q, phi_k, key_mask, scaling, gamma, window, state, chunk_size)
        ctx.save_for_backward(query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k)
        ctx.settings = (scaling, window, chunk_size)
        return out, s, z

    @staticmethod
    def backward(ctx, grad_out, grad_s, grad_z):
        saved = ctx.saved_tensors
        wanted = [i for i, needs in enumerate(ctx.needs_input_grad[:9]) if needs]
        leaves = [t if t is None else t.detach().requires_grad_(i in wanted) for i, t in enumerate(saved)]
        query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k = leaves
        scaling, window, chunk_size = ctx.settings
        with torch.enable_grad():
            state = None if state_kv is None else (state_kv, state_k)
            out, (s, z) = linear_ops.chunked_hybrid_attention(
                query, key, value, phi_q, phi_k, key_mask, scaling, gamma, window, state, chunk_size)
            grads = torch.autograd.grad((out, s, z), [leaves[i] for i in wanted], (grad_out, grad_s, grad_z),
                                        allow_unused=True)
        result = [None] * 12
        for i, grad in zip(wanted, grads):
            result[i] = grad
        return tuple(result)


def hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor,
    scaling: float,
    gamma: torch.Tensor,
    window: int,
    state: linear_ops.LinearState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, linear_ops.LinearState]:
    """Differentiable `chunked_hybrid_attention`: Triton forward, backward recomputed in PyTorch (module docstring)."""
    state_kv, state_k = (None, None) if state is None else state
    out, s, z = _HybridAttention.apply(query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k, scaling,
                                       window, chunk_size)
    return out, (s, z)
