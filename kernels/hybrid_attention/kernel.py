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

Backward (`hybrid_backward`, used by the autograd function `hybrid_attention`), recomputing instead of storing:
- `_hybrid_backward_dq`, per (batch, query head), chunks in order: rebuilds the state, both parts and the output as the
  forward, then dN = dO / den, dden = -rowsum(dN · o), and
  linear: dφq = γ (tril(dN vᵀ + dden) φk + dN Sᵀ + dden zᵀ);  dγ per row = rowsum(dN · lin_num) + dden · lin_den;
  softmax: dlogit = p (dN vᵀ + dden) plus, on the row's largest logit, dm = -(rowsum(dN · soft_num) + dden · soft_den):
  the shift m is not free here (the linear terms share the normaliser), so its gradient is part of the reference's
  (torch.amax). With tied largest logits torch splits dm among them; this kernel gives it to the first (ties of fp32
  logits: measure zero for real keys). dq = τ dlogit k. It writes per row m, the argmax slot, 1/den, dden, dm, dγ.
- `_hybrid_backward_dkdv_window`, per (batch, KV head, block of keys): the softmax part of dk, dv from the query rows
  whose window holds the block, the G query heads summed in registers in a fixed order (deterministic, no atomics).
- the linear part of dφk, dv and the initial state's gradient: the linear kernel's own `_backward_dkdv` on the delayed
  key copies, with dO weighted by γ_h and dden by γ_h (copies of φk and v, [B, Hkv, q, *], and an fp32 γ dO).

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
from ..linear_attention.chunked import (
    _advance_state, _backward_dkdv, _chunk_terms, _load_rows, _load_state, kernel_chunk,
)

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


@triton.jit
def _hybrid_backward_dq(
    Q, K, V, PHI_Q, PHI_K, REAL, GAMMA, S_IN, Z_IN, DO, DQ, DPHI_Q, ROW_MAX, ARGMAX, INV_DEN, D_DEN, D_MAX, D_GAMMA,
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
    k_base = K + state_base * kv_len * head_dim
    phi_k_base = PHI_K + state_base * kv_len * features
    v_base = V + state_base * kv_len * dv
    real_base = REAL + b * kv_len
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    for start in range(0, q_len, CHUNK):
        t = start + rows
        t_ok = t < q_len
        j = t - delay
        j_ok = t_ok & (j >= 0) & (tl.load(real_base + j, mask=t_ok & (j >= 0), other=0.0) != 0)
        phi_q = _load_rows(PHI_Q + pid * q_len * features, t, t_ok, f, f_ok, features)
        phi_k = _load_rows(phi_k_base, j, j_ok, f, f_ok, features)
        v_old = _load_rows(v_base, j, j_ok, d, d_ok, dv)
        _, lin_num, lin_den = _chunk_terms(phi_q, phi_k, v_old, s, z, causal)

        q = _load_rows(Q + pid * q_len * head_dim, t, t_ok, e, e_ok, head_dim)
        slot = kept + t
        row_max = tl.full([CHUNK], _NO_LOGIT, tl.float32)
        arg = tl.full([CHUNK], -1, tl.int32)
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
            logits = tl.where(inside, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling, float("-inf"))
            block_max = tl.max(logits, axis=1)
            arg = tl.where(block_max > row_max, n0 + tl.argmax(logits, axis=1).to(tl.int32), arg)
            new_max = tl.maximum(row_max, block_max)
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(logits - new_max[:, None])
            soft_den = soft_den * rescale + tl.sum(p, axis=1)
            soft_num = soft_num * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
            row_max = new_max

        inv_den = 1.0 / (soft_den + gamma * lin_den + EPS)
        out = (soft_num + gamma * lin_num) * inv_den[:, None]
        d_num = _load_rows(DO + pid * q_len * dv, t, t_ok, d, d_ok, dv) * inv_den[:, None]
        d_den = -tl.sum(d_num * out, axis=1)
        d_gamma = tl.sum(d_num * lin_num, axis=1) + d_den * lin_den
        d_max = -(tl.sum(d_num * soft_num, axis=1) + d_den * soft_den)
        # linear part (as the linear kernel's dq pass, its numerator and normaliser weighted by gamma)
        d_within = tl.where(causal, tl.dot(d_num, tl.trans(v_old)) + d_den[:, None], 0.0)
        d_phi_q = gamma * (tl.dot(d_within, phi_k) + tl.dot(d_num, tl.trans(s)) + d_den[:, None] * z[None, :])
        # softmax part; the max shift passes d_max to the row's largest logit
        dq = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (n < hi) & (tl.load(real_base + n, mask=n < hi, other=0.0) != 0)
            k = _load_rows(k_base, n, n_ok, e, e_ok, head_dim)
            v = _load_rows(v_base, n, n_ok, d, d_ok, dv)
            inside = n_ok[None, :] & (n[None, :] <= slot[:, None]) & (n[None, :] > slot[:, None] - window)
            logits = tl.where(inside, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling, float("-inf"))
            p = tl.exp(logits - row_max[:, None])
            d_p = tl.dot(d_num, tl.trans(v), input_precision=PRECISION) + d_den[:, None]
            d_logits = p * d_p + tl.where(n[None, :] == arg[:, None], d_max[:, None], 0.0)
            dq += tl.dot(d_logits, k, input_precision=PRECISION) * scaling
        tl.store(DQ + pid * q_len * head_dim + t[:, None] * head_dim + e[None, :], dq.to(DQ.dtype.element_ty),
                 mask=t_ok[:, None] & e_ok[None, :])
        tl.store(DPHI_Q + pid * q_len * features + t[:, None] * features + f[None, :],
                 d_phi_q.to(DPHI_Q.dtype.element_ty), mask=t_ok[:, None] & f_ok[None, :])
        rows_out = pid * q_len + t
        tl.store(ROW_MAX + rows_out, row_max, mask=t_ok)
        tl.store(ARGMAX + rows_out, arg, mask=t_ok)
        tl.store(INV_DEN + rows_out, inv_den, mask=t_ok)
        tl.store(D_DEN + rows_out, d_den, mask=t_ok)
        tl.store(D_MAX + rows_out, d_max, mask=t_ok)
        tl.store(D_GAMMA + rows_out, d_gamma, mask=t_ok)
        s, z = _advance_state(s, z, phi_k, v_old)


@triton.jit
def _hybrid_backward_dkdv_window(
    Q, K, V, REAL, DO, ROW_MAX, ARGMAX, INV_DEN, D_DEN, D_MAX, DK, DV,
    q_len, kv_len, q_heads, groups, head_dim, dv, window, scaling,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (batch, KV head, block of keys): the softmax terms' gradient of those keys, from the query rows
    # whose window holds them, summed over the G query heads in a fixed order.
    pid = tl.program_id(0)
    kv_heads = q_heads // groups
    b = pid // kv_heads
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_D)
    d = tl.arange(0, BLOCK_V)
    e_ok = e < head_dim
    d_ok = d < dv
    n_ok = (n < kv_len) & (tl.load(REAL + b * kv_len + n, mask=n < kv_len, other=0.0) != 0)
    k = _load_rows(K + pid * kv_len * head_dim, n, n_ok, e, e_ok, head_dim)
    v = _load_rows(V + pid * kv_len * dv, n, n_ok, d, d_ok, dv)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    kept = kv_len - q_len
    lo = tl.maximum(n0 - kept, 0)  # query t (slot kept + t) sees slots (kept + t - window, kept + t]
    hi = tl.minimum(n0 + BLOCK_N - kept + window - 1, q_len)
    rows = tl.arange(0, CHUNK)
    for g in range(0, groups):
        h = b * q_heads + (pid % kv_heads) * groups + g
        for t0 in range(lo, hi, CHUNK):
            t = t0 + rows
            t_ok = t < hi
            slot = kept + t
            q = _load_rows(Q + h * q_len * head_dim, t, t_ok, e, e_ok, head_dim)
            d_num = _load_rows(DO + h * q_len * dv, t, t_ok, d, d_ok, dv)
            d_num *= tl.load(INV_DEN + h * q_len + t, mask=t_ok, other=0.0)[:, None]
            row_max = tl.load(ROW_MAX + h * q_len + t, mask=t_ok, other=0.0)
            arg = tl.load(ARGMAX + h * q_len + t, mask=t_ok, other=-1)
            d_den = tl.load(D_DEN + h * q_len + t, mask=t_ok, other=0.0)
            d_max = tl.load(D_MAX + h * q_len + t, mask=t_ok, other=0.0)
            inside = t_ok[:, None] & n_ok[None, :] & (n[None, :] <= slot[:, None]) & (n[None, :] > slot[:, None] - window)
            logits = tl.where(inside, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling, float("-inf"))
            p = tl.exp(logits - row_max[:, None])
            d_p = tl.dot(d_num, tl.trans(v), input_precision=PRECISION) + d_den[:, None]
            d_logits = p * d_p + tl.where(n[None, :] == arg[:, None], d_max[:, None], 0.0)
            dk += tl.dot(tl.trans(d_logits), q, input_precision=PRECISION) * scaling
            dv_acc += tl.dot(tl.trans(p), d_num, input_precision=PRECISION)
    tl.store(DK + pid * kv_len * head_dim + n[:, None] * head_dim + e[None, :], dk,
             mask=(n < kv_len)[:, None] & e_ok[None, :])
    tl.store(DV + pid * kv_len * dv + n[:, None] * dv + d[None, :], dv_acc, mask=(n < kv_len)[:, None] & d_ok[None, :])


def hybrid_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor,
    scaling: float,
    gamma: torch.Tensor,
    window: int,
    state: linear_ops.LinearState | None,
    grad_out: torch.Tensor,
    grad_state: linear_ops.LinearState,
    chunk_size: int = 64,
    value_block: int = 64,
) -> tuple[torch.Tensor, ...]:
    """Gradients of `hybrid_forward` w.r.t. query, key, value, phi_q, phi_k, gamma (fp32) and the initial state (fp32),
    given those of its output and final state; in the inputs' dtypes otherwise."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, features, dv = key.shape[1], key.shape[2], phi_k.shape[-1], value.shape[-1]
    groups = q_heads // kv_heads
    kept = kv_len - q_len
    delay = window - kept
    query, key, value, phi_q, phi_k, grad_out = (t.contiguous() for t in (query, key, value, phi_q, phi_k, grad_out))
    real = key_mask.reshape(batch, kv_len).float().contiguous()
    gamma32 = gamma.reshape(q_heads).float().contiguous()
    dtypes = (query.dtype, key.dtype, value.dtype, phi_q.dtype, phi_k.dtype)
    chunk = kernel_chunk(chunk_size, features, dv, *dtypes)
    blocks = dict(BLOCK_D=next_power_of_2(head_dim), BLOCK_V=next_power_of_2(dv))
    precision = dot_precision(max(dtypes, key=lambda t: t.itemsize))
    rows = lambda dtype=torch.float32: torch.empty(batch, q_heads, q_len, dtype=dtype, device=query.device)  # noqa: E731
    row_max, arg, inv_den, d_den, d_max, d_gamma = rows(), rows(torch.int32), rows(), rows(), rows(), rows()
    grad_q, grad_phi_q = torch.empty_like(query), torch.empty_like(phi_q)
    s_in, z_in = (inv_den, inv_den) if state is None else (state[0].float().contiguous(), state[1].float().contiguous())
    _hybrid_backward_dq[(batch * q_heads,)](
        query, key, value, phi_q, phi_k, real, gamma32, s_in, z_in, grad_out, grad_q, grad_phi_q,
        row_max, arg, inv_den, d_den, d_max, d_gamma,
        q_len, kv_len, q_heads, groups, head_dim, features, dv, window, scaling,
        HAS_STATE=state is not None, CHUNK=chunk, BLOCK_N=chunk, BLOCK_F=next_power_of_2(features), PRECISION=precision,
        EPS=linear_ops.EPS, **blocks,
    )
    grad_k = torch.empty(batch, kv_heads, kv_len, head_dim, dtype=torch.float32, device=query.device)
    grad_v = torch.empty(batch, kv_heads, kv_len, dv, dtype=torch.float32, device=query.device)
    _hybrid_backward_dkdv_window[(batch * kv_heads, triton.cdiv(kv_len, chunk))](
        query, key, value, real, grad_out, row_max, arg, inv_den, d_den, d_max, grad_k, grad_v,
        q_len, kv_len, q_heads, groups, head_dim, dv, window, scaling,
        CHUNK=chunk, BLOCK_N=chunk, PRECISION=precision, **blocks,
    )
    # Linear part: the linear kernel's dk/dv pass on the delayed keys, its numerator and normaliser weighted by gamma.
    # (copies in the inputs' dtypes; gamma-weighted output gradient and dv in fp32)
    def delayed(x):
        return torch.nn.functional.pad(x * key_mask.to(x.dtype), (0, 0, delay, 0))[:, :, :q_len].contiguous()

    delayed_k, delayed_v = delayed(phi_k), delayed(value)
    weighted_grad = (grad_out.float() * gamma32.view(1, -1, 1, 1)).contiguous()
    value_block = min(value_block, next_power_of_2(dv))
    value_blocks = triton.cdiv(dv, value_block)
    grad_k_parts = torch.empty(value_blocks, batch, kv_heads, q_len, features, dtype=torch.float32, device=query.device)
    grad_delayed_v = torch.empty(batch, kv_heads, q_len, dv, dtype=torch.float32, device=query.device)
    grad_s = torch.empty(batch, kv_heads, features, dv, dtype=torch.float32, device=query.device)
    grad_z = torch.empty(batch, kv_heads, features, dtype=torch.float32, device=query.device)
    _backward_dkdv[(batch * kv_heads, value_blocks)](
        phi_q, delayed_k, delayed_v, weighted_grad, inv_den, d_den * gamma32.view(1, -1, 1),
        grad_state[0].float().contiguous(), grad_state[1].float().contiguous(), grad_k_parts, grad_delayed_v,
        grad_s, grad_z, q_len, q_heads, groups, features, dv,
        CHUNK=kernel_chunk(chunk_size, features, dv, *dtypes, torch.float32), BLOCK_F=next_power_of_2(features),
        BLOCK_V=value_block,
    )

    def undelay(x):  # gradient of the delayed copy -> gradient of the key slots (slot j was row j + delay)
        return torch.nn.functional.pad(x[:, :, delay:], (0, 0, 0, kv_len - max(q_len - delay, 0)))[:, :, :kv_len] * key_mask

    grad_phi_k = undelay(grad_k_parts.sum(0))
    grad_v = grad_v + undelay(grad_delayed_v)
    return (grad_q, grad_k.to(key.dtype), grad_v.to(value.dtype), grad_phi_q, grad_phi_k.to(phi_k.dtype),
            d_gamma.sum((0, 2)), (grad_s, grad_z))


class _HybridAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k, scaling, window, chunk_size):
        state = None if state_kv is None else (state_kv, state_k)
        out, (s, z) = hybrid_forward(query, key, value, phi_q, phi_k, key_mask, scaling, gamma, window, state, chunk_size)
        ctx.save_for_backward(query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k)
        ctx.settings = (scaling, window, chunk_size)
        return out, s, z

    @staticmethod
    def backward(ctx, grad_out, grad_s, grad_z):
        query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k = ctx.saved_tensors
        scaling, window, chunk_size = ctx.settings
        state = None if state_kv is None else (state_kv, state_k)
        *grads, (grad_s0, grad_z0) = hybrid_backward(query, key, value, phi_q, phi_k, key_mask, scaling, gamma, window,
                                                     state, grad_out, (grad_s, grad_z), chunk_size)
        grad_q, grad_k, grad_v, grad_phi_q, grad_phi_k, grad_gamma = grads
        wants_state = ctx.needs_input_grad[7:9]
        return (
            grad_q, grad_k, grad_v, grad_phi_q, grad_phi_k, None, grad_gamma.to(gamma.dtype),
            grad_s0.to(state_kv.dtype) if wants_state[0] else None,
            grad_z0.to(state_k.dtype) if wants_state[1] else None,
            None, None, None,
        )


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
    """Differentiable `chunked_hybrid_attention` (continuing from `state`, which may require grad): Triton both ways."""
    state_kv, state_k = (None, None) if state is None else state
    out, s, z = _HybridAttention.apply(query, key, value, phi_q, phi_k, key_mask, gamma, state_kv, state_k, scaling,
                                       window, chunk_size)
    return out, (s, z)
