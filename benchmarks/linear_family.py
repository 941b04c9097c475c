"""Linear-family cost against dense SDPA: attention-only prefill time by length, training (forward + backward) time of
the `linear` op (PyTorch chunked form, our Triton kernels, flash-linear-attention's kernels where installed), and
decode memory by length. `--feature-map-cost` instead measures the bytes and FLOPs behind the hedgehog fusion decision.

    PYTHONPATH=. python benchmarks/linear_family.py [--lengths 1024 4096] [--out benchmarks/results/x.json]
    PYTHONPATH=. python benchmarks/linear_family.py --feature-map-cost [--out benchmarks/results/hedgehog_fusion_cost.json]

Times are medians of a few runs of the attention math alone (no projections), batch 1, 8 query / 2 KV heads, head
dim 64, fp32 on CPU or bf16 on GPU. The Triton and fla timings need a GPU (the CPU interpreter measures nothing about
speed); without one, or without fla, the results say so. fla has no GQA in its linear-attention ops: it gets K and V
repeated to the query heads (done before timing) and keeps a state per query head. The results file names the device
and library versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from hf_attn_plus import linear_ops


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fla_linear_attention() -> tuple[dict[str, Callable] | None, str]:
    """fla's normalised linear attention (chunk and fused_chunk), as phi_q, phi_k, v [B, H, L, *] -> out, or why not."""
    if not torch.cuda.is_available():
        return None, f"flash-linear-attention {_version('flash-linear-attention') or 'not installed'}; its kernels need a GPU"
    try:
        from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn
    except ImportError as error:
        return None, f"flash-linear-attention not importable: {error}"

    def wrap(op):
        # fla: [B, T, H, *] layout, o = (s·q S) / (s·q z + 1e-10); scale s = 1 gives our form (our EPS is 1e-6).
        def run(phi_q, phi_k, v):
            return op(phi_q, phi_k, v, scale=1.0, normalize=True)[0]
        return run

    return {"fla_chunk": wrap(chunk_linear_attn), "fla_fused_chunk": wrap(fused_chunk_linear_attn)}, \
        f"flash-linear-attention {_version('flash-linear-attention')}"


def _fwd_bwd(op: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run() -> list[torch.Tensor]:
        return list(torch.autograd.grad(op(*leaves), leaves, grad_out))
    return run


def training_cases(phi_q, phi_k, v, q, k) -> tuple[dict[str, Callable], dict[str, float], str]:
    """Forward + backward of the linear op by every implementation available here, the largest gradient difference of
    each from the PyTorch chunked form, and what fla's status is."""
    grad_out = torch.randn(*phi_q.shape[:3], v.shape[-1], device=v.device, dtype=v.dtype)
    chunked = lambda a, b, c: linear_ops.chunked_linear_attention(a, b, c, chunk_size=64)[0]  # noqa: E731
    groups = phi_q.shape[1] // phi_k.shape[1]
    cases = {
        "sdpa_fwd_bwd": _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True),
                                 [q, k, v], grad_out),
        "linear_chunked_fwd_bwd": _fwd_bwd(chunked, [phi_q, phi_k, v], grad_out),
    }
    if phi_q.is_cuda:
        from hf_attn_plus.kernels.linear_attention import chunked as kernel

        cases["linear_kernel_fwd_bwd"] = _fwd_bwd(lambda a, b, c: kernel.linear_attention(a, b, c)[0],
                                                  [phi_q, phi_k, v], grad_out)
    fla, fla_status = fla_linear_attention()
    if fla is not None:
        # [B, H, L, *] -> [B, L, H, *], K and V repeated to the query heads; the group sum of their gradients is ours.
        layout = [t.repeat_interleave(r, 1).transpose(1, 2).contiguous() for t, r in ((phi_q, 1), (phi_k, groups), (v, groups))]
        fla_grad = grad_out.transpose(1, 2).contiguous()
        for name, op in fla.items():
            cases[f"{name}_fwd_bwd"] = _fwd_bwd(op, layout, fla_grad)
    reference = cases["linear_chunked_fwd_bwd"]()
    differences = {}
    for name, run in cases.items():
        if name.startswith("linear_kernel") or name.startswith("fla"):
            grads = run()
            if name.startswith("fla"):  # back to our layout, summed over each KV head's query heads
                grads = [g.transpose(1, 2) for g in grads]
                grads[1:] = [g.unflatten(1, (-1, groups)).sum(2) for g in grads[1:]]
            differences[name] = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads, reference))
    return cases, differences, fla_status


class _BytesMoved(TorchDispatchMode):
    """Bytes every non-view aten op reads and writes (its tensor inputs and outputs): the traffic of running the ops
    one by one, as eager PyTorch does, when nothing stays in cache."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


# H100 SXM peak rates (NVIDIA datasheet; the kernels' fp32 tl.dot runs as TF32), for a roofline reading of the counts.
H100_BYTES_PER_S = 3.35e12
H100_TF32_FLOPS = 495e12
H100_EXP_PER_S = 132 * 16 * 1.83e9  # 16 SFU results per clock per SM


def hedgehog_fusion_cost(length: int = 4096, head_dim: int = 128, feature_dim: int = 64, dv: int = 128,
                         groups: int = 4, chunk: int = 64, element_bytes: int = 2) -> dict:
    """Per token and query head: what the hedgehog map costs in eager PyTorch (measured), what the linear-attention
    kernels move and compute (counted from their code), and what fusing the map into them would change.

    Measured: `linear_ops.hedgehog_features` forward + backward for one head, bytes through a dispatch mode, FLOPs by
    FlopCounterMode; the key map counts 1/G (one key head per G query heads). Counted, F = 2m, per query head:
      forward    reads φq, φk, v, writes o;  2C(F + Dv) + 4 F Dv FLOPs (A, A v, φq S, S update)
      dq pass    reads φq, φk, v, dO, writes dφq and 2 floats;  forward's FLOPs + 2C Dv + 2C F + 2 F Dv
      dk/dv pass reads φq, dO, 2 floats; per KV head (1/G) φk, v, writes dφk, dv;  4C F + 4C Dv + 2 F Dv (+ 4 F Dv / G)
    Fused, each program would load x (D) instead of φ (F) and compute φ = [softmax(xW); softmax(-xW)] (2 D m FLOPs,
    2m exponentials) wherever it loads φ: φq and φk in the forward and dq passes (each query head's program rebuilds
    its KV head's keys), φq and, per KV head, φk in the dk/dv pass; plus the map's backward (dx = dproj Wᵀ, dW += xᵀ
    dproj, 4 D m) where dφ is formed. The alternative without touching the kernels is a one-pass map (torch.compile or
    one small kernel): forward reads x, writes φ; backward reads dφ, φ, x, writes dx.
    """
    m, d, f, c, g = feature_dim, head_dim, 2 * feature_dim, chunk, groups
    x = torch.randn(1, 1, length, d, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1, d, m, dtype=torch.bfloat16, requires_grad=True)
    with _BytesMoved() as fwd_bytes, FlopCounterMode(display=False) as fwd_flops:
        phi = linear_ops.hedgehog_features(x, weight)
    with _BytesMoved() as bwd_bytes, FlopCounterMode(display=False) as bwd_flops:
        phi.backward(torch.ones_like(phi))
    maps = 1 + 1 / g  # the query map per query head, the key map per KV head
    eager_bytes = (fwd_bytes.bytes + bwd_bytes.bytes) / length * maps
    eager_flops = (fwd_flops.get_total_flops() + bwd_flops.get_total_flops()) / length * maps
    one_pass_bytes = element_bytes * ((d + f) + (2 * f + 2 * d)) * maps
    forward_flops = 2 * c * (f + dv) + 4 * f * dv
    dq_flops = forward_flops + 2 * c * dv + 2 * c * f + 2 * f * dv
    dkdv_flops = 4 * c * f + 4 * c * dv + 2 * f * dv + 4 * f * dv / g
    kernel_bytes = element_bytes * ((2 * f + 2 * dv) + (3 * f + 2 * dv) + (f + dv + 2 * (f + dv) / g)) + 4 * 4
    phi_transfers = 3 + 2 + 2 / g + 1  # φq loaded in 3 passes, φk in fwd and dq and per KV head in dk/dv; dφq, dφk
    maps_built = 2 + 2 + 1 + 1 / g
    added_flops = 2 * d * m * maps_built + 4 * d * m * maps
    added_exps = 2 * m * maps_built
    saved_vs_eager = eager_bytes + element_bytes * (f - d) * phi_transfers
    saved_vs_one_pass = one_pass_bytes + element_bytes * (f - d) * phi_transfers
    added_ns = 1e9 * (added_flops / H100_TF32_FLOPS + added_exps / H100_EXP_PER_S)
    return {
        "shape": {"length": length, "head_dim": d, "feature_dim_m": m, "features_F": f, "dv": dv, "groups": g,
                  "chunk": c, "element_bytes": element_bytes},
        "per_token_and_query_head": {
            "hedgehog_map_eager_bytes_measured": round(eager_bytes),
            "hedgehog_map_eager_flops_measured": round(eager_flops),
            "hedgehog_map_one_pass_bytes": round(one_pass_bytes),
            "kernels_fwd_bwd_bytes": round(kernel_bytes),
            "kernels_fwd_bwd_flops": round(forward_flops + dq_flops + dkdv_flops),
            "fusion_flops_added": round(added_flops),
            "fusion_exps_added": round(added_exps),
        },
        "h100_roofline_ns_per_token_and_query_head": {
            "kernels_memory": round(1e9 * kernel_bytes / H100_BYTES_PER_S, 3),
            "kernels_compute": round(1e9 * (forward_flops + dq_flops + dkdv_flops) / H100_TF32_FLOPS, 3),
            "fusion_saves_vs_eager_map": round(1e9 * saved_vs_eager / H100_BYTES_PER_S, 3),
            "fusion_saves_vs_one_pass_map": round(1e9 * saved_vs_one_pass / H100_BYTES_PER_S, 3),
            "fusion_adds_in_kernel": round(added_ns, 3),
        },
    }


def first(out: torch.Tensor | tuple) -> torch.Tensor:
    """The output of an op that may also return its final state."""
    return out[0] if isinstance(out, tuple) else out


GATED_DELTA_NOTES = (
    "gated_delta_*: kernel = hf_attn_plus.kernels.gated_delta (chunked forward and backward), "
    "torch = linear_ops.chunked_gated_delta under autograd, sdpa = dense causal attention; fwd_bwd = forward + "
    "backward of sum(out * grad). fla = flash-linear-attention's chunk_gated_delta_rule on the same inputs with keys, "
    "values and gates repeated to the query heads (fla shares q/k heads across value heads, not the reverse), so it "
    "keeps a state per query head: G times the state work of the GQA kernel. None: not run here (needs CUDA / fla)."
)


def gated_delta_rows(q, k, v, qn, kn, log_alpha, beta) -> dict[str, float | None]:
    """Kernel forward and forward+backward of the gated delta rule against the PyTorch chunked form, SDPA and fla."""
    leaves = [qn, kn, v, log_alpha, beta]
    grad_out = torch.ones(*q.shape[:3], v.shape[-1], device=v.device, dtype=v.dtype)

    rows = {
        "gated_delta_torch_fwd_bwd": _median_seconds(
            _fwd_bwd(lambda *x: first(linear_ops.chunked_gated_delta(*x, chunk_size=64)), leaves, grad_out)),
        "sdpa_fwd_bwd": _median_seconds(_fwd_bwd(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), [q, k, v], grad_out)),
        "gated_delta_kernel_fwd": None, "gated_delta_kernel_fwd_bwd": None,
        "gated_delta_fla_fwd": None, "gated_delta_fla_fwd_bwd": None,
    }
    if not q.is_cuda:
        return rows
    from hf_attn_plus.kernels.gated_delta import chunked

    with torch.no_grad():
        rows["gated_delta_kernel_fwd"] = _median_seconds(lambda: chunked.chunked_forward(qn, kn, v, log_alpha, beta))
    rows["gated_delta_kernel_fwd_bwd"] = _median_seconds(_fwd_bwd(lambda *x: first(chunked.gated_delta(*x)), leaves, grad_out))
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return rows
    groups = q.shape[1] // k.shape[1]

    def per_query_head(x):  # [B, Hkv, L, ...] -> fla's [B, L, Hq, ...]
        return x.repeat_interleave(groups, 1).transpose(1, 2).contiguous()

    fla_leaves = [t.detach().clone() for t in (
        qn.transpose(1, 2).contiguous(), per_query_head(kn), per_query_head(v),
        per_query_head(log_alpha.to(q.dtype)), per_query_head(beta.to(q.dtype)))]  # gates as in fla's docs

    def fla(q, k, v, g, b):
        return chunk_gated_delta_rule(q, k, v, g, b, scale=1.0)[0]

    with torch.no_grad():
        rows["gated_delta_fla_fwd"] = _median_seconds(lambda: fla(*fla_leaves))
    rows["gated_delta_fla_fwd_bwd"] = _median_seconds(_fwd_bwd(fla, fla_leaves, grad_out.transpose(1, 2).contiguous()))
    return rows


MOMENTUM_DELTA_NOTES = (
    "momentum_delta_*: kernel = hf_attn_plus.kernels.gated_delta.momentum (chunked forward and backward), torch = "
    "linear_ops.chunked_momentum_delta under autograd; decode_step = one token on a (S, M) state, kernel = "
    "recurrent_forward, torch = linear_ops.recurrent_momentum_delta. mu = 0.5. None: not run here (needs CUDA)."
)


def momentum_delta_rows(q, qn, kn, v, log_alpha, beta) -> dict[str, float | None]:
    """Kernel forward, forward+backward and a decode step of the momentum delta rule against its PyTorch forms."""
    log_mu = torch.full_like(log_alpha, -0.6931)  # mu = 0.5, the projection's value at initialisation
    leaves = [qn, kn, v, log_alpha, beta, log_mu]
    grad_out = torch.ones(*q.shape[:3], v.shape[-1], device=v.device, dtype=v.dtype)
    state = tuple(torch.zeros(*kn.shape[:2], kn.shape[-1], v.shape[-1], device=v.device) for _ in range(2))
    step = [x[:, :, -1:] for x in leaves]
    with torch.no_grad():
        rows = {
            "momentum_delta_torch_fwd": _median_seconds(lambda: linear_ops.chunked_momentum_delta(*leaves, chunk_size=64)),
            "momentum_delta_torch_decode_step": _median_seconds(lambda: linear_ops.recurrent_momentum_delta(*step, state)),
        }
    rows["momentum_delta_torch_fwd_bwd"] = _median_seconds(
        _fwd_bwd(lambda *x: first(linear_ops.chunked_momentum_delta(*x, chunk_size=64)), leaves, grad_out))
    rows.update(momentum_delta_kernel_fwd=None, momentum_delta_kernel_fwd_bwd=None, momentum_delta_kernel_decode_step=None)
    if not q.is_cuda:
        return rows
    from hf_attn_plus.kernels.gated_delta import momentum

    with torch.no_grad():
        rows["momentum_delta_kernel_fwd"] = _median_seconds(lambda: momentum.chunked_forward(*leaves))
        rows["momentum_delta_kernel_decode_step"] = _median_seconds(lambda: momentum.recurrent_forward(*step, state))
    rows["momentum_delta_kernel_fwd_bwd"] = _median_seconds(
        _fwd_bwd(lambda *x: first(momentum.momentum_delta(*x)), leaves, grad_out))
    return rows


def hybrid_rows(q, k, v, phi_q, phi_k, key_mask, gamma, window) -> dict[str, float | None]:
    """The hybrid Triton kernels (forward; forward + backward) against the PyTorch chunked form under autograd. Kernel
    rows are None without CUDA."""
    scaling = q.shape[-1] ** -0.5
    leaves = [q, k, v, phi_q, phi_k]
    grad_out = torch.ones(*q.shape[:3], v.shape[-1], device=v.device, dtype=v.dtype)

    def op(attention):
        return lambda *x: attention(*x, key_mask, scaling, gamma, window, chunk_size=64)[0]

    rows = {
        "hybrid_torch_fwd_bwd": _median_seconds(_fwd_bwd(op(linear_ops.chunked_hybrid_attention), leaves, grad_out)),
        "hybrid_kernel_fwd": None, "hybrid_kernel_fwd_bwd": None,
    }
    if not q.is_cuda:
        return rows
    from hf_attn_plus.kernels.hybrid_attention import kernel

    with torch.no_grad():
        rows["hybrid_kernel_fwd"] = _median_seconds(lambda: op(kernel.hybrid_forward)(*leaves))
    rows["hybrid_kernel_fwd_bwd"] = _median_seconds(_fwd_bwd(op(kernel.hybrid_attention), leaves, grad_out))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--feature-map-cost", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.feature_map_cost:
        result = {"torch": torch.__version__, "cases": [hedgehog_fusion_cost(feature_dim=m) for m in (64, 128)]}
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q_heads, kv_heads, dim, window = 8, 2, 64, 64
    rows = []
    fla_status = None
    for length in args.lengths:
        q = torch.randn(1, q_heads, length, dim, device=device, dtype=dtype)
        k = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
        v = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
        phi_q, phi_k = linear_ops.elu_features(q), linear_ops.elu_features(k)
        gamma = torch.full((q_heads,), 0.5, device=device)
        key_mask = torch.ones(1, 1, length, 1, device=device)
        log_alpha = torch.full((1, kv_heads, length), -0.02, device=device)
        beta = torch.full((1, kv_heads, length), 0.5, device=device)
        qn, kn = F.normalize(q, dim=-1) / dim**0.5, F.normalize(k, dim=-1)
        cases = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "linear_chunked": lambda: linear_ops.chunked_linear_attention(phi_q, phi_k, v, chunk_size=64),
            "hybrid_chunked": lambda: linear_ops.chunked_hybrid_attention(
                q, k, v, phi_q, phi_k, key_mask, dim**-0.5, gamma, window, chunk_size=64),
            "gated_delta_chunked": lambda: linear_ops.chunked_gated_delta(qn, kn, v, log_alpha, beta, chunk_size=64),
        }
        with torch.no_grad():
            row = {"length": length, **{name: _median_seconds(fn) for name, fn in cases.items()}}
        row.update(gated_delta_rows(q, k, v, qn, kn, log_alpha, beta))
        row.update(momentum_delta_rows(q, qn, kn, v, log_alpha, beta))
        row.update(hybrid_rows(q, k, v, phi_q, phi_k, key_mask, gamma, window))
        train, differences, fla_status = training_cases(phi_q, phi_k, v, q, k)
        row.update({name: _median_seconds(fn) for name, fn in train.items()})
        row.update({f"{name}_max_grad_difference_vs_chunked": value for name, value in differences.items()})
        # Decode memory per layer: dense KV cache vs the linear state (elements).
        row["dense_kv_elements"] = 2 * kv_heads * length * dim
        row["linear_state_elements"] = kv_heads * dim * (dim + 1)
        row["hybrid_state_elements"] = row["linear_state_elements"] + 2 * kv_heads * window * dim
        rows.append(row)
        print(json.dumps(row))
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "fla": fla_status,
        "triton_kernels": "timed" if device == "cuda" else "not timed: need a GPU (the CPU interpreter measures nothing about speed)",
        "shape": {"batch": 1, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": dim, "hybrid_window": window},
        "seconds_and_elements": rows,
        "gated_delta_notes": GATED_DELTA_NOTES,
        "momentum_delta_notes": MOMENTUM_DELTA_NOTES,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
