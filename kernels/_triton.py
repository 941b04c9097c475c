"""Triton, imported lazily: the package and its reference paths work without it; a kernel asked for explains."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error when a kernel is requested but cannot run here."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "hf_attn_plus kernels need Triton: pip install 'hf_attn_plus[kernels]', or use backend='reference'"
        ) from error
    on_cpu = [t for t in tensors if not t.is_cuda]
    if on_cpu and not interpreting():
        raise RuntimeError(
            "hf_attn_plus Triton kernels got CPU tensors; they run on CPU only under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported). Use backend='reference' on CPU."
        )


def next_power_of_2(n: int, minimum: int = 16) -> int:
    """tl.dot needs every dimension >= 16 and tl.arange a power of two."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def tile_size(dtype: torch.dtype) -> int:
    """Rows and keys per tile: 64 for 16-bit inputs; 32 for fp32, whose 64-wide tiles at head dim 128 need more shared
    memory than an H100 has and stall ptxas (seen compiling for sm_90 with benchmarks/compile_for_gpu.py)."""
    return 32 if dtype == torch.float32 else 64
