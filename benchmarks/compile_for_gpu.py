"""Compile every Triton kernel for an NVIDIA target (default sm_90, H100) on a machine without a GPU.

The interpreter runs the kernels' arithmetic but checks nothing of the GPU compile: types, layouts, shared memory,
register pressure. This lowers each kernel through ptxas with the tile sizes the wrappers use, per input dtype and
key-set mode, and prints the shared memory each needs. Minutes on two CPU cores the first time (Triton caches).

    python benchmarks/compile_for_gpu.py [--arch 90] [--head-dim 128] [--index-dim 128]
        [--only sparse|linear|indexer|momentum|hybrid]
"""

from __future__ import annotations

import argparse
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_attn_plus.kernels._triton import tile_size
from hf_attn_plus.kernels.block_scoring import kernel as scoring
from hf_attn_plus.kernels.block_sparse_prefill import kernel as prefill
from hf_attn_plus.kernels.gated_delta import chunked as delta_chunked
from hf_attn_plus.kernels.gated_delta import momentum as delta_momentum
from hf_attn_plus.kernels.gated_delta import recurrent as delta_recurrent
from hf_attn_plus.kernels.gathered_attention import kernel as gathered
from hf_attn_plus.kernels.hybrid_attention import kernel as hybrid
from hf_attn_plus.kernels.indexer_topk import kernel as indexer
from hf_attn_plus.kernels.linear_attention import chunked as linear
from hf_attn_plus.kernels.selected_decode import kernel as decode

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def signature(fn, pointers: dict[str, str], constants: dict) -> dict[str, str]:
    """Pointer arguments as given, constexprs as such, the scale fp32, every other scalar i32."""
    return {
        name: "constexpr" if name in constants else pointers.get(name, "fp32" if name == "scaling" else "i32")
        for name in fn.arg_names
    }


# The key-set arguments of the attention kernels (kernels/key_sets.py) and their modes: a rule alone (sliding window
# with sinks; dilation), block lists (block_topk, block_sparse), token lists (topk), a model's dense restriction.
KEY_POINTERS = dict(QPOS="*i32", KEY_START="*i32", KEY_COUNT="*i32", RESTRICT="*u8", BLOCKS="*i32", TOKENS="*i32")
_RULE_ONLY = dict(
    HAS_RESTRICT=False, HAS_BLOCKS=False, HAS_TOKENS=False, BLOCK_STEPS=0, TOKEN_STEPS=0, SINKS=0, WINDOW=0,
    DILATION=0, RULE_BLOCK=1, LOCAL_BLOCKS=0, LIST_BLOCK=1,
)
KEY_MODES = {
    "window": dict(_RULE_ONLY, SINKS=4, WINDOW=1024),
    "dilated": dict(_RULE_ONLY, WINDOW=256, DILATION=16),
    "blocks": dict(_RULE_ONLY, HAS_BLOCKS=True, BLOCK_STEPS=5, SINKS=64, RULE_BLOCK=64, LOCAL_BLOCKS=1, LIST_BLOCK=64),
    "tokens": dict(_RULE_ONLY, HAS_TOKENS=True, TOKEN_STEPS=11, SINKS=4, WINDOW=64),
    "restrict": dict(_RULE_ONLY, HAS_RESTRICT=True, WINDOW=2**30),
}

SM90_SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90


def compile_and_report(fn, pointers: dict[str, str], constants: dict, target: GPUTarget, label: str) -> None:
    """Compile `fn` for `target` and print `label` with the shared memory it needs (flagged when over the sm_90
    limit), its warps and the compile time."""
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature(fn, pointers, constants), constants), target=target)
    shared = compiled.metadata.shared
    over = " OVER the sm_90 limit" if shared > SM90_SHARED_LIMIT else ""
    print(
        f"{label}: {shared} B shared{over}, {compiled.metadata.num_warps} warps, {time.perf_counter() - start:.0f} s",
        flush=True,
    )


def compile_sparse(target: GPUTarget, head_dim: int) -> None:
    """The sparse-attention kernels (tile forward and backward, gathered attention) in every key-set mode."""
    import torch

    for dt, torch_name in TORCH_DTYPES.items():
        tile = tile_size(getattr(torch, torch_name))
        x = f"*{dt}"
        common = dict(Q=x, K=x, V=x, COUNTS="*i32", LSE="*fp32", **KEY_POINTERS)
        kernels = [
            (decode._forward_kernel, dict(common, TILES="*i32", O="*fp32")),
            (prefill._backward_dq_kernel, dict(common, TILES="*i32", DO=x, DELTA="*fp32", DQ=x)),
            (prefill._backward_dkdv_kernel, dict(common, ROW_BLOCKS="*i32", DO=x, DELTA="*fp32", DK=x, DV=x)),
        ]
        for fn, pointers in kernels:
            for label, mode in KEY_MODES.items():
                constants = dict(
                    GROUP=4, UPCAST=False, BLOCK_M=tile, BLOCK_N=tile, BLOCK_D=head_dim, BLOCK_DV=head_dim,
                    **mode,
                )
                compile_and_report(fn, pointers, constants, target, f"{dt} {fn.fn.__name__} {label} tile={tile}")
        # Gathered attention: BLOCK_M 16 is a decode call (one query, a GQA group of rows), the tile size prefill.
        gathered_common = dict(Q=x, K=x, V=x, SPANS="*i32", SLOTS="*i32", LOGW="*fp32", LSE="*fp32", **KEY_POINTERS)
        gathered_kernels = [
            # (HAS_WEIGHTS, BLOCK_M, HAS_RESTRICT): prefill, santa decode, DeepSeek-V3.2's restricted prefill
            (
                gathered._forward_kernel, dict(gathered_common, O=x),
                ((False, tile, False), (True, 16, False), (False, tile, True)),
            ),
            (
                gathered._backward_kernel, dict(gathered_common, DO=x, DELTA="*fp32", DQ=x, DK="*fp32", DV="*fp32"),
                ((False, tile, False),),
            ),
        ]
        for fn, pointers, variants in gathered_kernels:
            for has_weights, block_m, has_restrict in variants:
                constants = dict(
                    HAS_RESTRICT=has_restrict, GROUP=4, HAS_WEIGHTS=has_weights, UPCAST=False, BLOCK_M=block_m,
                    BLOCK_N=tile, BLOCK_D=head_dim, BLOCK_DV=head_dim,
                )
                label = f"{dt} {fn.fn.__name__} weights={has_weights} restrict={has_restrict} rows={block_m} tile={tile}"
                compile_and_report(fn, pointers, constants, target, label)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--index-dim", type=int, default=128, help="indexer_topk index_dim (DeepSeek-V3.2: 128)")
    parser.add_argument("--only", choices=["sparse", "linear", "indexer", "momentum", "hybrid"], default=None,
                        help="compile only this family's kernels")
    args = parser.parse_args()
    if args.only == "linear":
        compile_linear(GPUTarget("cuda", args.arch, 32), args.head_dim)
        return
    if args.only == "indexer":
        compile_indexer(GPUTarget("cuda", args.arch, 32), args.index_dim)
        return
    if args.only == "momentum":
        compile_momentum_delta(GPUTarget("cuda", args.arch, 32), args.head_dim)
        return
    if args.only == "hybrid":
        compile_hybrid(GPUTarget("cuda", args.arch, 32), args.head_dim)
        return
    target = GPUTarget("cuda", args.arch, 32)
    if args.only == "sparse":
        compile_sparse(target, args.head_dim)
        return
    compile_sparse(target, args.head_dim)
    compile_gated_delta(target, args.head_dim)
    compile_momentum_delta(target, args.head_dim)
    constants = dict(GROUP=4, BLOCK_M=16, BLOCK_B=64, BLOCK_D=args.head_dim)
    pointers = dict(Q="*bf16", KMIN="*bf16", KMAX="*bf16", S="*fp32")
    compile_and_report(scoring._quest_scores_kernel, pointers, constants, target, "bf16 _quest_scores_kernel")
    compile_linear(target, args.head_dim)
    compile_hybrid(target, args.head_dim)
    compile_indexer(target, args.index_dim)


def compile_linear(target: GPUTarget, head_dim: int) -> None:
    """Chunked linear attention forward and backward at the chunk the wrappers pick for chunk_size 64; value dim = head
    dim; features F = head dim (elu/relu; hedgehog with m = head dim / 2) and 2 x head dim (hedgehog's default)."""
    import torch

    from hf_attn_plus import linear_ops

    f32 = "*fp32"
    for dt, torch_name in TORCH_DTYPES.items():
        x = f"*{dt}"
        kernels = [  # (kernel, pointer types, whether it walks chunks forward rebuilding the state)
            (linear._chunked_forward, dict(Q=x, K=x, V=x, S_IN=f32, Z_IN=f32, O=x, S_OUT=f32, Z_OUT=f32), True),
            (linear._backward_dq, dict(Q=x, K=x, V=x, S_IN=f32, Z_IN=f32, DO=x, DQ=x, INV_DEN=f32, D_DEN=f32), True),
            (linear._backward_dkdv, dict(Q=x, K=x, V=x, DO=x, INV_DEN=f32, D_DEN=f32, DS_OUT=f32, DZ_OUT=f32,
                                         DK_PARTS=f32, DV=x, DS_IN=f32, DZ_IN=f32), False),
        ]
        for features in (head_dim, 2 * head_dim):
            chunk = linear.kernel_chunk(64, features, head_dim, getattr(torch, torch_name))
            for fn, pointers, forward_walk in kernels:
                block_v = head_dim if forward_walk else min(64, head_dim)  # dk/dv: the wrapper's value blocks
                constants = dict(CHUNK=chunk, BLOCK_F=features, BLOCK_V=block_v)
                if forward_walk:
                    constants.update(HAS_STATE=True, EPS=linear_ops.EPS)
                label = f"{dt} {fn.fn.__name__} F={features} Dv={head_dim} chunk={chunk} block_v={block_v}"
                compile_and_report(fn, pointers, constants, target, label)


def compile_gated_delta(target: GPUTarget, head_dim: int) -> None:
    """The gated-delta kernels with the blocks their wrappers pick for Dk = Dv = head_dim (gates in fp32, as the
    mechanism passes them)."""
    import torch

    for dt, torch_name in TORCH_DTYPES.items():
        x = f"*{dt}"
        common = dict(Q=x, K=x, V=x, LOG_ALPHA="*fp32", BETA="*fp32")
        chunk = delta_chunked.chunk_tokens(64, getattr(torch, torch_name))
        precision = delta_chunked.dot_precision(getattr(torch, torch_name))
        kernels = [
            (delta_recurrent._recurrent_forward, dict(common, S_IN="*fp32", O=x, S_OUT="*fp32"), dict(HAS_STATE=True)),
            (delta_chunked._chunked_forward, dict(common, S_IN="*fp32", O=x, S_OUT="*fp32", S_CHUNKS="*fp32"),
             dict(HAS_STATE=True, SAVE_CHUNKS=True, CHUNK=chunk, PRECISION=precision)),
            (delta_chunked._chunked_backward,
             dict(common, S_CHUNKS="*fp32", DO=x, DS_OUT="*fp32", DQ="*fp32", DK="*fp32", DV=x,
                  DLOG_ALPHA="*fp32", DBETA="*fp32", DS_IN="*fp32"),
             dict(HAS_DS_OUT=True, CHUNK=chunk, PRECISION=precision)),
        ]
        for fn, pointers, constants in kernels:
            block_k, block_v = (delta_chunked.backward_blocks if fn is delta_chunked._chunked_backward
                                else delta_recurrent.state_blocks)(head_dim, head_dim)
            constants = dict(constants, BLOCK_K=block_k, BLOCK_V=block_v)
            label = f"{dt} {fn.fn.__name__} chunk={chunk} state block={block_k}x{block_v}"
            compile_and_report(fn, pointers, constants, target, label)


def compile_momentum_delta(target: GPUTarget, head_dim: int) -> None:
    """The momentum-delta kernels with the blocks their wrappers pick for Dk = Dv = head_dim (gates in fp32); the
    backward with its narrower state blocks (`backward_blocks`)."""
    import torch

    for dt, torch_name in TORCH_DTYPES.items():
        x = f"*{dt}"
        f32 = "*fp32"
        common = dict(Q=x, K=x, V=x, LOG_ALPHA=f32, BETA=f32, LOG_MU=f32)
        forward = dict(common, S_IN=f32, M_IN=f32, O=x, S_OUT=f32, M_OUT=f32)
        dtype = getattr(torch, torch_name)
        chunk = delta_chunked.chunk_tokens(64, dtype)
        precision = delta_chunked.dot_precision(dtype)
        kernels = [
            (delta_momentum._recurrent_forward, forward, dict(HAS_STATE=True)),
            (delta_momentum._chunked_forward, dict(forward, S_CHUNKS=f32, M_CHUNKS=f32),
             dict(HAS_STATE=True, SAVE_CHUNKS=True, CHUNK=chunk, PRECISION=precision)),
            (delta_momentum._chunked_backward,
             dict(common, S_CHUNKS=f32, M_CHUNKS=f32, DO=x, DS_OUT=f32, DM_OUT=f32, DQ=f32, DK=f32, DV=x,
                  DLOG_ALPHA=f32, DBETA=f32, DLOG_MU=f32, DS_IN=f32, DM_IN=f32),
             dict(CHUNK=chunk, PRECISION=precision)),
        ]
        for fn, pointers, constants in kernels:
            block_k, block_v = (delta_chunked.backward_blocks if fn is delta_momentum._chunked_backward
                                else delta_recurrent.state_blocks)(head_dim, head_dim)
            constants = dict(constants, BLOCK_K=block_k, BLOCK_V=block_v)
            label = f"{dt} momentum {fn.fn.__name__} chunk={chunk} state block={block_k}x{block_v}"
            compile_and_report(fn, pointers, constants, target, label)


def compile_hybrid(target: GPUTarget, head_dim: int) -> None:
    """The hybrid kernels at the chunk their wrappers pick for chunk_size 64: q/k dim = value dim = head dim, features
    F = head dim and 2 x head dim (hedgehog's default), and DeepSeek-V3's MLA shape (q/k 192, v 128, F 192 -> 256). The
    backward's linear part is the linear kernel's `_backward_dkdv` on its own pointer types (fp32 γ·dO and dv)."""
    import torch

    from hf_attn_plus import linear_ops

    f32 = "*fp32"
    for dt, torch_name in TORCH_DTYPES.items():
        x = f"*{dt}"
        dtype = getattr(torch, torch_name)
        inputs = dict(Q=x, K=x, V=x, PHI_Q=x, PHI_K=x, REAL=f32, GAMMA=f32, S_IN=f32, Z_IN=f32)
        rows = dict(ROW_MAX=f32, ARGMAX="*i32", INV_DEN=f32, D_DEN=f32, D_MAX=f32)
        for qk_dim, features, dv in ((head_dim, head_dim, head_dim), (head_dim, 2 * head_dim, head_dim), (192, 192, 128)):
            chunk = linear.kernel_chunk(64, features, dv, dtype)
            blocks = dict(CHUNK=chunk, BLOCK_N=chunk, BLOCK_D=triton.next_power_of_2(qk_dim),
                          BLOCK_V=triton.next_power_of_2(dv), PRECISION=delta_chunked.dot_precision(dtype))
            with_state = dict(blocks, HAS_STATE=True, BLOCK_F=triton.next_power_of_2(features), EPS=linear_ops.EPS)
            kernels = [
                (hybrid._hybrid_forward, dict(inputs, O=x, S_OUT=f32, Z_OUT=f32), with_state),
                (hybrid._hybrid_backward_dq, dict(inputs, DO=x, DQ=x, DPHI_Q=x, D_GAMMA=f32, **rows), with_state),
                (hybrid._hybrid_backward_dkdv_window, dict(Q=x, K=x, V=x, REAL=f32, DO=x, DK=f32, DV=f32, **rows), blocks),
                (linear._backward_dkdv, dict(Q=x, K=x, V=x, DO=f32, INV_DEN=f32, D_DEN=f32, DS_OUT=f32, DZ_OUT=f32,
                                             DK_PARTS=f32, DV=f32, DS_IN=f32, DZ_IN=f32),
                 dict(CHUNK=linear.kernel_chunk(64, features, dv, dtype, torch.float32),
                      BLOCK_F=triton.next_power_of_2(features), BLOCK_V=min(64, triton.next_power_of_2(dv)))),
            ]
            for fn, pointers, constants in kernels:
                label = f"{dt} {fn.fn.__name__} Dqk={qk_dim} F={features} Dv={dv} chunk={constants['CHUNK']}"
                compile_and_report(fn, pointers, constants, target, label)


def compile_indexer(target: GPUTarget, index_dim: int, index_heads: int = 64) -> None:
    """The indexer kernel in its three outputs with the wrapper's block shapes, for decode (1 query) and prefill."""
    import torch

    fn = indexer._indexer_kernel
    for dt, torch_name in TORCH_DTYPES.items():
        x = f"*{dt}"
        dtype = getattr(torch, torch_name)
        for q_len in (1, 4096):
            for sortable, top in ((False, None), (True, None), (True, indexer.max_top(dtype))):
                rows, heads, keys = indexer.block_shapes(q_len, index_heads, dtype, top)
                pointers = dict(IQ=x, W=x, IK=x, VIS="*u8", KPOS="*i64", QPOS="*i64", OUT="*i64" if sortable else "*fp32")
                constants = dict(
                    SORTABLE=sortable, TOP_ONLY=top is not None, HEADS=heads, UPCAST=False,
                    BLOCK_M=rows, BLOCK_N=keys, BLOCK_D=index_dim,
                )
                output = "scores" if not sortable else f"running top {top}" if top else "keys"
                label = f"{dt} _indexer_kernel {output} rows={rows} heads/dot={heads} keys/tile={keys}"
                compile_and_report(fn, pointers, constants, target, label)


if __name__ == "__main__":
    main()
