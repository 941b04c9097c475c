"""Sparse attention benchmark: dense SDPA vs FlexAttention (same block mask) vs our Triton kernels, same inputs.

Decode: one query token over a long cache, reading `budget` tokens of selected KV blocks; reports time and the
achieved bandwidth on the bytes each method must read (ours_with_scoring adds block_topk's Quest scoring of every
block from min/max summaries and the top-block choice, i.e. a whole decode step of the mechanism; model_path is
what backend="kernel" runs inside a model today: the reference selection, then the kernel). Prefill: causal attention with a share of the causal key
blocks skipped per (head, query block); reports time and TFLOP/s on the FLOPs of the kept blocks.
Indexer (indexer_topk's lightning indexer, decode and prefill): scoring + top-k of our Triton kernel vs the PyTorch
reference (scores, then selection.top_scoring), dense SDPA of the main attention at the same context for scale.

    python benchmarks/sparse_attention.py            # GPU: the full grid, results/sparse_attention_<device>.{json,md}
    python benchmarks/sparse_attention.py --smoke    # CPU: tiny shapes through the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from hf_attn_plus.kernels.block_scoring.kernel import quest_scores_kernel as quest_scores  # noqa: E402
from hf_attn_plus.kernels.block_sparse_prefill.function import block_sparse_attention  # noqa: E402
from hf_attn_plus.kernels.indexer_topk import reference as indexer_reference  # noqa: E402
from hf_attn_plus.kernels.indexer_topk.kernel import masked_scores_kernel  # noqa: E402
from hf_attn_plus.kernels.indexer_topk.wrapper import indexer_topk_keep  # noqa: E402
from hf_attn_plus.kernels.selected_decode.kernel import tile_attention_forward  # noqa: E402
from hf_attn_plus.kernels.selected_decode.wrapper import default_splits  # noqa: E402
from hf_attn_plus.kernels.tile_lists import tiles_from_usage  # noqa: E402
from hf_attn_plus.kernels._triton import next_power_of_2  # noqa: E402
from hf_attn_plus.masking import build_context  # noqa: E402
from hf_attn_plus.registry import get_mechanism  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# (name, shapes) of each mode; model-like GQA shapes on GPU, interpreter-sized ones for the smoke run.
FULL = dict(
    heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, decode_block=64, prefill_block=128, tile=64,
    contexts=[4096, 16384, 65536, 131072], budgets=[256, 1024, 2048, 4096],
    lengths=[8192, 32768, 65536, 131072], skips=[0.5, 0.9, 0.95],
)
TINY = dict(
    heads=4, kv_heads=2, head_dim=16, dtype=torch.float16, decode_block=16, prefill_block=16, tile=16,
    contexts=[128, 256], budgets=[32, 64], lengths=[64, 192], skips=[0.5, 0.9],
)

# Indexer shapes: DeepSeek-V3.2's lightning indexer (64 heads of dim 128) on GPU; tiny ones for the smoke run.
INDEXER_FULL = dict(
    index_heads=64, index_dim=128, sinks=4, window=64, contexts=[16384, 65536, 131072], budgets=[256, 2048],
    decode_queries=[1, 4], lengths=[4096, 16384],
)
INDEXER_TINY = dict(index_heads=2, index_dim=16, sinks=2, window=8, contexts=[128], budgets=[16, 64], decode_queries=[1], lengths=[48])
# The reference materialises fp32 scores per indexer head: skipped above this many bytes.
INDEXER_REFERENCE_BYTES = 8 << 30


def milliseconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()  # the interpreter has no warm-up to speak of; one timed call is the smoke check
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def dense_sdpa(query, key, value, causal: bool):
    """SDPA with GQA (flash / memory-efficient backends on GPU); repeated KV heads where GQA is not supported."""
    try:
        if query.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=True)
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=True)
    except RuntimeError:
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal)


def flex_runner(device: torch.device):
    """flex_attention (compiled on GPU, eager on CPU), or the reason it is unavailable."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as error:
        return None, None, f"unavailable: {error}"
    fn = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    return fn, BlockMask, "compiled" if device.type == "cuda" else "eager"


def compact_blocks(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return chosen.sum(-1, dtype=torch.int32), order.contiguous()


def decode_case(cfg, context: int, budget: int, device, flex) -> dict:
    heads, kv_heads, dim, dtype, block = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"], cfg["decode_block"]
    g = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(1, heads, 1, dim, device=device, dtype=dtype, generator=g)
    key = torch.randn(1, kv_heads, context, dim, device=device, dtype=dtype, generator=g)
    value = torch.randn(1, kv_heads, context, dim, device=device, dtype=dtype, generator=g)
    num_blocks = triton.cdiv(context, block)
    # One selection per KV group (what one read per group serves): sink block, local block and random others.
    picks = torch.rand(1, kv_heads, num_blocks, device=device, generator=g)
    picks[..., 0] = picks[..., -1] = 2.0
    chosen = torch.zeros(1, kv_heads, num_blocks, dtype=torch.bool, device=device)
    chosen.scatter_(-1, picks.topk(budget // block, dim=-1).indices, True)
    scaling = dim**-0.5
    tiles = tiles_from_usage(chosen.unsqueeze(2), next_power_of_2(heads // kv_heads), block)
    splits = default_splits(kv_heads, device)
    ours = lambda: tile_attention_forward(query, key, value, None, tiles, scaling, splits)[0]  # noqa: E731
    itemsize = torch.finfo(dtype).bits // 8
    kv_bytes_per_token = 2 * kv_heads * dim * itemsize
    row = dict(mode="decode", context=context, budget=budget)
    out = ours()
    row["ours_ms"] = milliseconds(ours, device)
    row["sdpa_ms"] = milliseconds(lambda: dense_sdpa(query, key, value, causal=False), device)
    row["ours_GBps"] = budget * kv_bytes_per_token / row["ours_ms"] / 1e6
    row["sdpa_GBps"] = context * kv_bytes_per_token / row["sdpa_ms"] / 1e6
    run_flex, BlockMask, _ = flex
    if run_flex is not None:
        head_chosen = chosen.repeat_interleave(heads // kv_heads, 1).unsqueeze(2)  # [1, Hq, 1 q block, blocks]
        counts, indices = compact_blocks(head_chosen)
        # Eager flex (CPU) reads only mask_mod, compiled flex only the block lists on full blocks: give both.
        mask = BlockMask.from_kv_blocks(
            torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=(block, block), seq_lengths=(1, context),
            mask_mod=lambda b, h, q, kv: head_chosen[b, h, 0, kv // block],
        )
        flexed = lambda: run_flex(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True)  # noqa: E731
        row["flex_ms"] = milliseconds(flexed, device)
        row["max_abs_diff_vs_flex"] = (flexed().float() - out.float()).abs().max().item()
    # The whole block_topk decode step given the (incrementally kept) block summaries: Quest scores of every block
    # for every query head, top blocks per head, their union per KV group as tile lists, then the attention.
    kmin, kmax = key.reshape(1, kv_heads, num_blocks, block, dim).aminmax(dim=3)
    group_rows = next_power_of_2(heads // kv_heads)

    def ours_with_scoring():
        scores = quest_scores(query, kmin, kmax).reshape(1, kv_heads, heads // kv_heads, num_blocks)
        top = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(budget // block, -1).indices, True)
        step_tiles = tiles_from_usage(top.any(dim=2, keepdim=True), group_rows, block)
        return tile_attention_forward(query, key, value, None, step_tiles, scaling, splits)[0]

    row["ours_with_scoring_ms"] = milliseconds(ours_with_scoring, device)
    # What backend="kernel" runs today inside a model: the reference block_topk selection (bounds recomputed from
    # every key, per-token keep mask) and then the kernel.
    mechanism = get_mechanism("block_topk")
    opts = mechanism.resolve_options(dict(block_size=block, budget=max(1, budget // block - 2), backend="kernel"))
    ctx = build_context(torch.ones(1, 1, 1, context, dtype=torch.bool, device=device))
    row["model_path_ms"] = milliseconds(lambda: mechanism.kernel(query, key, value, ctx, opts, scaling), device)
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
    return row


def prefill_case(cfg, length: int, skip: float, device, flex) -> dict:
    heads, kv_heads, dim, dtype = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    block, tile = cfg["prefill_block"], cfg["tile"]
    g = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(1, heads, length, dim, device=device, dtype=dtype, generator=g)
    key = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype, generator=g)
    value = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype, generator=g)
    num_blocks = length // block
    causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=device).tril()
    below = causal & ~torch.eye(num_blocks, dtype=torch.bool, device=device)
    # Keep the diagonal and the sink column; of the rest keep a random share so `skip` of causal blocks go.
    droppable = below.clone()
    droppable[:, 0] = False
    keep_share = max(0.0, 1 - skip * causal.sum().item() / max(droppable.sum().item(), 1))
    chosen = causal & ~(droppable & (torch.rand(1, heads, num_blocks, num_blocks, device=device, generator=g) >= keep_share))
    skipped = 1 - chosen.sum().item() / (heads * causal.sum().item())
    # Our tiles: rows of a KV group are (head, query); each selection block splits into (block / tile)^2 tiles.
    per = block // tile
    usage = chosen.reshape(1, kv_heads, heads // kv_heads * num_blocks, num_blocks)
    usage = usage.repeat_interleave(per, dim=2).repeat_interleave(per, dim=3)
    tiles = tiles_from_usage(usage, tile, tile)
    scaling = dim**-0.5
    ours = lambda: block_sparse_attention(query, key, value, None, scaling, tiles=tiles)  # noqa: E731
    flops_per_pair = 4 * block * block * dim  # QK^T and PV of one block pair
    diagonal = heads * num_blocks
    kept_flops = (chosen.sum().item() - diagonal / 2) * flops_per_pair
    dense_flops = heads * (num_blocks * num_blocks / 2) * flops_per_pair
    row = dict(mode="prefill", length=length, skip_target=skip, skipped=round(skipped, 3))
    with torch.no_grad():
        out = ours()
        row["ours_ms"] = milliseconds(ours, device)
        row["sdpa_ms"] = milliseconds(lambda: dense_sdpa(query, key, value, causal=True), device)
        row["ours_TFLOPs"] = kept_flops / row["ours_ms"] / 1e9
        row["sdpa_TFLOPs"] = dense_flops / row["sdpa_ms"] / 1e9
        run_flex, BlockMask, _ = flex
        if run_flex is not None:
            eye = torch.eye(num_blocks, dtype=torch.bool, device=device)
            partial_counts, partial_idx = compact_blocks(chosen & eye)
            full_counts, full_idx = compact_blocks(chosen & ~eye)
            mask = BlockMask.from_kv_blocks(
                partial_counts, partial_idx, full_counts, full_idx, BLOCK_SIZE=block,
                mask_mod=lambda b, h, q, kv: (q >= kv) & chosen[0, h, q // block, kv // block],
                seq_lengths=(length, length),
            )
            flexed = lambda: run_flex(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True)  # noqa: E731
            row["flex_ms"] = milliseconds(flexed, device)
            row["flex_TFLOPs"] = kept_flops / row["flex_ms"] / 1e9
            row["max_abs_diff_vs_flex"] = (flexed().float() - out.float()).abs().max().item()
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
    return row


def indexer_case(cfg, icfg, q_len: int, context: int, budget: int, device) -> dict:
    """Scoring + top-k of q_len queries (the last q_len positions) over `context` keys, batch 1."""
    heads, dim, dtype = icfg["index_heads"], icfg["index_dim"], cfg["dtype"]
    g = torch.Generator(device=device).manual_seed(0)
    index_query = torch.randn(1, heads, q_len, dim, device=device, dtype=dtype, generator=g)
    index_key = torch.randn(1, context, dim, device=device, dtype=dtype, generator=g)
    head_weights = torch.randn(1, heads, q_len, device=device, dtype=dtype, generator=g)
    causal = torch.ones(q_len, context, dtype=torch.bool, device=device).tril(context - q_len)
    ctx = build_context(causal.expand(1, 1, q_len, context))
    inputs = (index_query, index_key, head_weights, ctx)
    rules = dict(budget=budget, sinks=icfg["sinks"], window=icfg["window"])
    mode = "indexer_decode" if q_len <= 16 else "indexer_prefill"
    row = dict(mode=mode, queries=q_len, context=context, budget=budget, index_heads=heads, index_dim=dim)
    with torch.no_grad():
        keep = indexer_topk_keep(*inputs, **rules)
        row["ours_ms"] = milliseconds(lambda: indexer_topk_keep(*inputs, **rules), device)
        row["ours_scores_only_ms"] = milliseconds(
            lambda: masked_scores_kernel(*inputs, icfg["sinks"], icfg["window"]), device
        )
        row["ours_index_key_GBps"] = context * dim * (torch.finfo(dtype).bits // 8) / row["ours_ms"] / 1e6
        if heads * q_len * context * 4 <= INDEXER_REFERENCE_BYTES:
            row["reference_ms"] = milliseconds(lambda: indexer_reference.select(*inputs, **rules), device)
            row["same_selection"] = bool(torch.equal(keep, indexer_reference.select(*inputs, **rules)))
            row["speedup_vs_reference"] = row["reference_ms"] / row["ours_ms"]
        # The main attention this selection replaces: dense SDPA over the whole context.
        query = torch.randn(1, cfg["heads"], q_len, cfg["head_dim"], device=device, dtype=dtype, generator=g)
        key = torch.randn(1, cfg["kv_heads"], context, cfg["head_dim"], device=device, dtype=dtype, generator=g)
        row["sdpa_ms"] = milliseconds(lambda: dense_sdpa(query, key, key, causal=q_len > 1), device)
    return row


def environment(device: torch.device, flex_mode: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return dict(
        device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1", flex_attention=flex_mode,
    )


INDEXER_COLUMNS = [
    "queries", "context", "budget", "index_heads", "index_dim", "reference_ms", "ours_ms", "ours_scores_only_ms",
    "ours_index_key_GBps", "speedup_vs_reference", "same_selection", "sdpa_ms",
]


def markdown(env: dict, rows: list[dict], cfg: dict) -> str:
    lines = [
        "# Sparse attention benchmark",
        "",
        "Device: {device}; torch {torch}; triton {triton}; Triton interpreter: {triton_interpreter}; "
        "FlexAttention: {flex_attention}.".format(**env),
        f"Shapes: batch 1, {cfg['heads']} query heads, {cfg['kv_heads']} KV heads, head dim {cfg['head_dim']}, "
        f"{str(cfg['dtype']).removeprefix('torch.')}.",
        "",
    ]
    if env["triton_interpreter"]:
        lines += [
            "Smoke run on CPU through the Triton interpreter: it checks that every method runs on the same inputs and",
            "agrees with FlexAttention; its times say nothing about GPU speed. The GPU figures are outstanding.",
            "Short prefills cannot reach high skip targets: the diagonal and sink blocks are always kept.",
            "",
        ]
    for mode, columns in (
        ("decode", ["context", "budget", "sdpa_ms", "flex_ms", "ours_ms", "ours_with_scoring_ms", "model_path_ms", "sdpa_GBps", "ours_GBps", "speedup_vs_sdpa", "max_abs_diff_vs_flex"]),
        ("prefill", ["length", "skip_target", "skipped", "sdpa_ms", "flex_ms", "ours_ms", "sdpa_TFLOPs", "flex_TFLOPs", "ours_TFLOPs", "speedup_vs_sdpa", "max_abs_diff_vs_flex"]),
        ("indexer_decode", INDEXER_COLUMNS),
        ("indexer_prefill", INDEXER_COLUMNS),
    ):
        lines += [f"## {mode}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in (r for r in rows if r["mode"] == mode):
            cells = [row.get(c, "-") for c in columns]
            lines.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU here; run with --smoke for the CPU check")
    cfg = TINY if args.smoke else FULL
    flex = flex_runner(device)
    rows = []
    for context in cfg["contexts"]:
        for budget in (b for b in cfg["budgets"] if b < context):
            rows.append(decode_case(cfg, context, budget, device, flex))
            print(rows[-1], flush=True)
    for length in cfg["lengths"]:
        for skip in cfg["skips"]:
            rows.append(prefill_case(cfg, length, skip, device, flex))
            print(rows[-1], flush=True)
    icfg = INDEXER_TINY if args.smoke else INDEXER_FULL
    for context in icfg["contexts"]:
        for q_len in icfg["decode_queries"]:
            for budget in icfg["budgets"]:
                rows.append(indexer_case(cfg, icfg, q_len, context, budget, device))
                print(rows[-1], flush=True)
    for length in icfg["lengths"]:
        for budget in icfg["budgets"]:
            rows.append(indexer_case(cfg, icfg, length, length, budget, device))
            print(rows[-1], flush=True)
    env = environment(device, flex[2])
    stem = "sparse_attention_cpu_smoke" if args.smoke else "sparse_attention_" + env["device"].replace(" ", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(env, rows, cfg))
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
