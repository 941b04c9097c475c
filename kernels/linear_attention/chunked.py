"""Chunked causal linear attention in Triton: forward, backward (autograd Function), and the one-token decode step.

Equal to `hf_attn_plus.linear_ops.chunked_linear_attention` / `recurrent_linear_attention`. fp32 accumulation
throughout. Per chunk of C rows, with S, z the state before the chunk and A = tril(φq φkᵀ):
    num = A v + φq S,   den = rowsum(A) + φq z,   o = num / (den + EPS).

Forward: one program per (batch, query head) walks the chunks in order, keeping S [F, Dv] and z [F] of its KV head in
registers (with GQA the G query heads of a group each rebuild the same state; the first one writes it out).

Backward, two passes, both recomputing the chunk states instead of storing them: the states before every chunk would
be L/C · F · Dv fp32 per KV head, about twice the bytes of K and V themselves at C = 64, F = Dv = 128, kept for every
layer until the backward; rebuilding them costs one φkᵀ v product per chunk, the cheapest of the matmuls here.
- `_backward_dq`, per (batch, query head), chunks in order: rebuilds S, z and the output exactly as the forward, then
  dnum = dO / (den + EPS), dden = -rowsum(dO · o) / (den + EPS) and
  dφq = tril(dnum vᵀ + dden) φk + dnum Sᵀ + dden zᵀ. It writes 1 / (den + EPS) and dden per row (fp32) for pass 2.
- `_backward_dkdv`, per (batch, KV head, block of value columns), chunks in reverse carrying dS = Σ_later φqᵀ dnum and
  dz = Σ_later φqᵀ dden (started from the final state's gradient): dφk = Σ_g tril(dnum vᵀ + dden)ᵀ φq + v dSᵀ + dz,
  dv = Σ_g Aᵀ dnum + φk dS. The G query heads of a KV head are summed in registers by one program, in a fixed order:
  deterministic, no atomics. Splitting the value columns gives B·Hkv·⌈Dv/BLOCK_V⌉ programs instead of B·Hkv; each
  block's share of dφk goes to its own fp32 slice, summed in PyTorch (deterministic). dS, dz left after the first
  chunk are the gradient of the initial state.

Feature maps stay outside, in PyTorch autograd. Fusing hedgehog (φ = [softmax(xW); softmax(-xW)]) into these kernels
does not pay; measured and counted by `benchmarks/linear_family.py --feature-map-cost`
(results/hedgehog_fusion_cost.json), per token and query head, head dim 128, m = 64, Dv = 128, G = 4, bf16:
- the eager PyTorch map moves 5.5 KB forward + backward (measured), more than these kernels (3.1 KB); a one-pass map
  (torch.compile, or its own small kernel) would move 1.9 KB;
- fused, each pass would rebuild φ wherever it loads it (φk in every query head's program): +127 kFLOP (+34 %) and
  672 exponentials, and hold W and dW [D, m] beside the [F, Dv] fp32 state (64 KB at 128 · 128);
- at H100 peak rates that saves 1.6 ns against the eager map but 0.57 ns against a one-pass map, for 0.43 ns more work
  inside the kernels. Those run one program per (batch, head) sequentially over chunks, so with fewer programs than
  the 132 SMs the added work is not hidden (about × 132 / (B · Hq)): at B · Hq = 32 it costs 1.8 ns.
The bytes worth saving are the eager map's extra passes, which a one-pass map removes without touching these kernels.

Precision: tiles are upcast to fp32 before `tl.dot` (TF32 on sm_80+); the state never leaves fp32. The kernel chunk
is capped by `kernel_chunk` to fit shared memory; sm_90 compiles are checked at F · Dv = 128 · 128 and 256 · 128
(benchmarks/compile_for_gpu.py); larger states may exceed shared memory (Triton then raises OutOfResources).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_attn_plus import linear_ops


@triton.jit
def _load_rows(base, rows, rows_ok, cols, cols_ok, stride):
    """A [len(rows), len(cols)] tile of a row-major matrix as fp32, zeros outside."""
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _chunk_terms(q, k, v, s, z, causal):
    """A = tril(q kᵀ), the numerator A v + q S and the normaliser rowsum(A) + q z of one chunk."""
    within = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
    num = tl.dot(within, v) + tl.dot(q, s)
    den = tl.sum(within, axis=1) + tl.sum(q * z[None, :], axis=1)
    return within, num, den


@triton.jit
def _advance_state(s, z, k, v):
    """S += kᵀ v, z += Σ k over the chunk's rows."""
    return s + tl.dot(tl.trans(k), v), z + tl.sum(k, axis=0)


@triton.jit
def _load_state(S, Z, base, f, f_ok, d, d_ok, dv, features, HAS_STATE: tl.constexpr,
                BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    if HAS_STATE:
        s = _load_rows(S + base * features * dv, f, f_ok, d, d_ok, dv)
        z = tl.load(Z + base * features + f, mask=f_ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
        z = tl.zeros([BLOCK_F], dtype=tl.float32)
    return s, z


@triton.jit
def _chunked_forward(
    Q, K, V, S_IN, Z_IN, O, S_OUT, Z_OUT,
    length, q_heads, groups, features, dv,
    HAS_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // q_heads
    h = pid % q_heads
    state_base = b * (q_heads // groups) + h // groups
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_V)
    f_ok = f < features
    d_ok = d < dv
    s, z = _load_state(S_IN, Z_IN, state_base, f, f_ok, d, d_ok, dv, features, HAS_STATE, BLOCK_F, BLOCK_V)
    q_base = Q + pid * length * features
    k_base = K + state_base * length * features
    v_base = V + state_base * length * dv
    o_base = O + pid * length * dv
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    for start in range(0, length, CHUNK):
        t = start + rows
        t_ok = t < length
        q = _load_rows(q_base, t, t_ok, f, f_ok, features)
        k = _load_rows(k_base, t, t_ok, f, f_ok, features)
        v = _load_rows(v_base, t, t_ok, d, d_ok, dv)
        _, num, den = _chunk_terms(q, k, v, s, z, causal)
        out = num / (den[:, None] + EPS)
        tl.store(o_base + t[:, None] * dv + d[None, :], out.to(O.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
        s, z = _advance_state(s, z, k, v)
    if h % groups == 0:
        tl.store(S_OUT + state_base * features * dv + f[:, None] * dv + d[None, :], s, mask=f_ok[:, None] & d_ok[None, :])
        tl.store(Z_OUT + state_base * features + f, z, mask=f_ok)


@triton.jit
def _backward_dq(
    Q, K, V, S_IN, Z_IN, DO, DQ, INV_DEN, D_DEN,
    length, q_heads, groups, features, dv,
    HAS_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // q_heads
    h = pid % q_heads
    state_base = b * (q_heads // groups) + h // groups
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, BLOCK_V)
    f_ok = f < features
    d_ok = d < dv
    s, z = _load_state(S_IN, Z_IN, state_base, f, f_ok, d, d_ok, dv, features, HAS_STATE, BLOCK_F, BLOCK_V)
    k_base = K + state_base * length * features
    v_base = V + state_base * length * dv
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    for start in range(0, length, CHUNK):
        t = start + rows
        t_ok = t < length
        q = _load_rows(Q + pid * length * features, t, t_ok, f, f_ok, features)
        k = _load_rows(k_base, t, t_ok, f, f_ok, features)
        v = _load_rows(v_base, t, t_ok, d, d_ok, dv)
        grad_out = _load_rows(DO + pid * length * dv, t, t_ok, d, d_ok, dv)
        _, num, den = _chunk_terms(q, k, v, s, z, causal)
        inv_den = 1.0 / (den + EPS)
        d_num = grad_out * inv_den[:, None]
        d_den = -tl.sum(d_num * num, axis=1) * inv_den  # -rowsum(dO · o) / (den + EPS)
        d_within = tl.where(causal, tl.dot(d_num, tl.trans(v)) + d_den[:, None], 0.0)
        dq = tl.dot(d_within, k) + tl.dot(d_num, tl.trans(s)) + d_den[:, None] * z[None, :]
        tl.store(DQ + pid * length * features + t[:, None] * features + f[None, :], dq.to(DQ.dtype.element_ty),
                 mask=t_ok[:, None] & f_ok[None, :])
        tl.store(INV_DEN + pid * length + t, inv_den, mask=t_ok)
        tl.store(D_DEN + pid * length + t, d_den, mask=t_ok)
        s, z = _advance_state(s, z, k, v)


@triton.jit
def _backward_dkdv(
    Q, K, V, DO, INV_DEN, D_DEN, DS_OUT, DZ_OUT, DK_PARTS, DV, DS_IN, DZ_IN,
    length, q_heads, groups, features, dv,
    CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # DS_OUT / DZ_OUT: gradient of the final state (inputs); DS_IN / DZ_IN: gradient of the initial state (outputs).
    pid = tl.program_id(0)
    v_block = tl.program_id(1)
    kv_heads = q_heads // groups
    b = pid // kv_heads
    first = (v_block == 0).to(tl.float32)  # the value-independent terms (dden, dz) go to block 0's share of dφk
    f = tl.arange(0, BLOCK_F)
    d = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = f < features
    d_ok = d < dv
    ds = _load_rows(DS_OUT + pid * features * dv, f, f_ok, d, d_ok, dv)
    dz = tl.load(DZ_OUT + pid * features + f, mask=f_ok, other=0.0)
    k_base = K + pid * length * features
    v_base = V + pid * length * dv
    dk_base = DK_PARTS + (v_block * tl.num_programs(0) + pid) * length * features
    rows = tl.arange(0, CHUNK)
    causal_t = rows[:, None] <= rows[None, :]  # transposed: [key row, query row]
    chunks = tl.cdiv(length, CHUNK)
    for i in range(0, chunks):
        t = (chunks - 1 - i) * CHUNK + rows
        t_ok = t < length
        k = _load_rows(k_base, t, t_ok, f, f_ok, features)
        v = _load_rows(v_base, t, t_ok, d, d_ok, dv)
        dk = tl.dot(v, tl.trans(ds)) + first * dz[None, :]
        dv_acc = tl.dot(k, ds)
        for g in range(0, groups):
            h = b * q_heads + (pid % kv_heads) * groups + g
            q = _load_rows(Q + h * length * features, t, t_ok, f, f_ok, features)
            grad_out = _load_rows(DO + h * length * dv, t, t_ok, d, d_ok, dv)
            inv_den = tl.load(INV_DEN + h * length + t, mask=t_ok, other=0.0)
            d_den = tl.load(D_DEN + h * length + t, mask=t_ok, other=0.0)
            d_num = grad_out * inv_den[:, None]
            within_t = tl.where(causal_t, tl.dot(k, tl.trans(q)), 0.0)
            d_within_t = tl.where(causal_t, tl.dot(v, tl.trans(d_num)) + first * d_den[None, :], 0.0)
            dk += tl.dot(d_within_t, q)
            dv_acc += tl.dot(within_t, d_num)
            ds += tl.dot(tl.trans(q), d_num)
            dz += tl.sum(q * d_den[:, None], axis=0)
        tl.store(dk_base + t[:, None] * features + f[None, :], dk, mask=t_ok[:, None] & f_ok[None, :])
        tl.store(DV + pid * length * dv + t[:, None] * dv + d[None, :], dv_acc.to(DV.dtype.element_ty),
                 mask=t_ok[:, None] & d_ok[None, :])
    tl.store(DS_IN + pid * features * dv + f[:, None] * dv + d[None, :], ds, mask=f_ok[:, None] & d_ok[None, :])
    tl.store(DZ_IN + pid * features + f, dz, mask=f < features * (v_block == 0))


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


def kernel_chunk(chunk_size: int, features: int, dv: int, *inputs: torch.dtype) -> int:
    """Rows per chunk in the kernels (any chunking gives the same result): the option's, capped so the fp32 state and
    the chunk tiles fit sm_90's 227 KB of shared memory (benchmarks/compile_for_gpu.py: at F = 256, Dv = 128 with
    16-bit inputs the dq pass needs 336 KB with 64-row chunks, 148 KB with 32; fp32 inputs need about twice the tiles:
    288 KB at F = Dv = 128 with 64 rows)."""
    block_f, block_v = _blocks(features, dv)
    cap = 64 if block_f * block_v <= 128 * 128 else 32 if block_f * block_v <= 256 * 128 else 16
    if max(dtype.itemsize for dtype in inputs) > 2:
        cap = max(16, cap // 2)
    return min(cap, max(16, triton.next_power_of_2(chunk_size)))


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
        HAS_STATE=state is not None, CHUNK=kernel_chunk(chunk_size, features, dv, phi_q.dtype, phi_k.dtype, value.dtype),
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


def chunked_backward(
    phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor, state: linear_ops.LinearState | None,
    grad_out: torch.Tensor, grad_state: linear_ops.LinearState, chunk_size: int = 64, value_block: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, linear_ops.LinearState]:
    """Gradients of `chunked_forward` w.r.t. phi_q, phi_k, value and the initial state (fp32), given those of its
    output and final state. `value_block`: value columns per dφk/dv program (power of two, >= 16)."""
    batch, q_heads, length, features = phi_q.shape
    kv_heads, dv = phi_k.shape[1], value.shape[-1]
    phi_q, phi_k, value, grad_out = (t.contiguous() for t in (phi_q, phi_k, value, grad_out))
    block_f, block_v = _blocks(features, dv)
    chunk = kernel_chunk(chunk_size, features, dv, phi_q.dtype, phi_k.dtype, value.dtype)
    groups = q_heads // kv_heads
    grad_q = torch.empty_like(phi_q)
    inv_den = torch.empty(batch, q_heads, length, dtype=torch.float32, device=value.device)
    grad_den = torch.empty_like(inv_den)
    # without a state the kernel reads none: any fp32 pointer does
    s_in, z_in = (inv_den, inv_den) if state is None else (state[0].float().contiguous(), state[1].float().contiguous())
    _backward_dq[(batch * q_heads,)](
        phi_q, phi_k, value, s_in, z_in, grad_out, grad_q, inv_den, grad_den, length, q_heads, groups, features, dv,
        HAS_STATE=state is not None, CHUNK=chunk, BLOCK_F=block_f, BLOCK_V=block_v, EPS=linear_ops.EPS,
    )
    value_block = min(value_block, block_v)
    value_blocks = triton.cdiv(dv, value_block)
    grad_k_parts = torch.empty(value_blocks, batch, kv_heads, length, features, dtype=torch.float32, device=value.device)
    grad_v = torch.empty_like(value)
    grad_s = torch.empty(batch, kv_heads, features, dv, dtype=torch.float32, device=value.device)
    grad_z = torch.empty(batch, kv_heads, features, dtype=torch.float32, device=value.device)
    _backward_dkdv[(batch * kv_heads, value_blocks)](
        phi_q, phi_k, value, grad_out, inv_den, grad_den, grad_state[0].float().contiguous(),
        grad_state[1].float().contiguous(), grad_k_parts, grad_v, grad_s, grad_z, length, q_heads, groups, features, dv,
        CHUNK=chunk, BLOCK_F=block_f, BLOCK_V=value_block,
    )
    return grad_q, grad_k_parts.sum(0).to(phi_k.dtype), grad_v, (grad_s, grad_z)


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, value, state_kv, state_k, chunk_size):
        state = None if state_kv is None else (state_kv, state_k)
        out, (s, z) = chunked_forward(phi_q, phi_k, value, state, chunk_size)
        ctx.save_for_backward(phi_q, phi_k, value, state_kv, state_k)
        ctx.chunk_size = chunk_size
        return out, s, z

    @staticmethod
    def backward(ctx, grad_out, grad_s, grad_z):
        phi_q, phi_k, value, state_kv, state_k = ctx.saved_tensors
        state = None if state_kv is None else (state_kv, state_k)
        grad_q, grad_k, grad_v, (grad_s0, grad_z0) = chunked_backward(
            phi_q, phi_k, value, state, grad_out, (grad_s, grad_z), ctx.chunk_size)
        wants_state = ctx.needs_input_grad[3:5]
        return (
            grad_q, grad_k, grad_v,
            grad_s0.to(state_kv.dtype) if wants_state[0] else None,
            grad_z0.to(state_k.dtype) if wants_state[1] else None,
            None,
        )


def linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor,
    state: linear_ops.LinearState | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, linear_ops.LinearState]:
    """Differentiable `chunked_linear_attention` (continuing from `state`, which may require grad): Triton both ways."""
    state_kv, state_k = (None, None) if state is None else state
    out, s, z = _LinearAttention.apply(phi_q, phi_k, value, state_kv, state_k, chunk_size)
    return out, (s, z)
