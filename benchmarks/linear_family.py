"""Linear-family cost against dense SDPA: attention-only prefill time by length, and decode memory by length.

    PYTHONPATH=. python benchmarks/linear_family.py [--lengths 1024 4096] [--out benchmarks/results/x.json]

Times are medians of a few runs of the attention math alone (no projections), batch 1, 8 query / 2 KV heads, head
dim 64, fp32 on CPU or bf16 on GPU. The results file names the device and library versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

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


GATED_DELTA_NOTES = (
    "gated_delta_*: kernel = hf_attn_plus.kernels.gated_delta (chunked forward and backward), "
    "torch = linear_ops.chunked_gated_delta under autograd, sdpa = dense causal attention; fwd_bwd = forward + "
    "backward of sum(out * grad). fla = flash-linear-attention's chunk_gated_delta_rule on the same inputs with keys, "
    "values and gates repeated to the query heads (fla shares q/k heads across value heads, not the reverse), so it "
    "keeps a state per query head: G times the state work of the GQA kernel. None: not run here (needs CUDA / fla)."
)


def _fwd_bwd(fn, leaves):
    def run():
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def gated_delta_rows(q, k, v, qn, kn, log_alpha, beta) -> dict[str, float | None]:
    """Kernel forward and forward+backward of the gated delta rule against the PyTorch chunked form, SDPA and fla."""
    leaves = [t.detach().clone().requires_grad_() for t in (qn, kn, v, log_alpha, beta)]
    dense = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    rows = {
        "gated_delta_torch_fwd_bwd": _median_seconds(
            _fwd_bwd(lambda *x: linear_ops.chunked_gated_delta(*x, chunk_size=64), leaves)),
        "sdpa_fwd_bwd": _median_seconds(
            _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), dense)),
        "gated_delta_kernel_fwd": None, "gated_delta_kernel_fwd_bwd": None,
        "gated_delta_fla_fwd": None, "gated_delta_fla_fwd_bwd": None,
    }
    if not q.is_cuda:
        return rows
    from hf_attn_plus.kernels.gated_delta import chunked

    with torch.no_grad():
        rows["gated_delta_kernel_fwd"] = _median_seconds(lambda: chunked.chunked_forward(qn, kn, v, log_alpha, beta))
    rows["gated_delta_kernel_fwd_bwd"] = _median_seconds(_fwd_bwd(chunked.gated_delta, leaves))
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return rows
    groups = q.shape[1] // k.shape[1]

    def per_query_head(x):  # [B, Hkv, L, ...] -> fla's [B, L, Hq, ...]
        return x.repeat_interleave(groups, 1).transpose(1, 2).contiguous()

    fla_leaves = [t.detach().clone().requires_grad_() for t in (
        qn.transpose(1, 2).contiguous(), per_query_head(kn), per_query_head(v),
        per_query_head(log_alpha.to(q.dtype)), per_query_head(beta.to(q.dtype)))]  # gates as in fla's docs

    def fla(q, k, v, g, b):
        return chunk_gated_delta_rule(q, k, v, g, b, scale=1.0)[0]

    with torch.no_grad():
        rows["gated_delta_fla_fwd"] = _median_seconds(lambda: fla(*fla_leaves))
    rows["gated_delta_fla_fwd_bwd"] = _median_seconds(_fwd_bwd(fla, fla_leaves))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q_heads, kv_heads, dim, window = 8, 2, 64, 64
    rows = []
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
        "shape": {"batch": 1, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": dim, "hybrid_window": window},
        "seconds_and_elements": rows,
        "gated_delta_notes": GATED_DELTA_NOTES,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
