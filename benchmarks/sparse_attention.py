"""Sparse attention benchmark: dense SDPA vs FlexAttention (same block mask) vs our Triton kernels, same inputs.

Decode: one query token over a long cache. `ours` is the decode attention kernel alone over `budget` tokens of
fixed blocks given as block lists (the same blocks for FlexAttention), with bandwidth on the bytes it reads. `step` is a whole block_topk
decode step as backend="kernel" runs it in a model with a cache: the new key folded into the layer's block
summaries, Quest scores of every block, top blocks per query head, tiles of their union per KV group, decode
attention over the block lists; its bytes (`step_MB_read`: the listed K/V tiles, plus the summaries) are counted from the tiles actually read, since per-head choices read up to the GQA group size times the
budget; `group_step` is the same with choose_per='group' (a KV group's heads share `budget` blocks). `recompute_step`
is the per-head step without the side cache (bounds from every key). speedup_vs_sdpa = sdpa / step.
Prefill: causal attention with a share of the causal key blocks skipped per (head, query block); reports time and
TFLOP/s on the FLOPs of the kept blocks.
Stochastic: stochastic_routing prefill (forward) and training (forward + backward) over sinks + window + random
links, and santa decode (sampled keys with importance weights) through kernels/gathered_attention.
Indexer (indexer_topk's lightning indexer, decode and prefill): scoring + top-k of our Triton kernel vs the PyTorch
reference (scores, then selection.top_scoring), dense SDPA of the main attention at the same context for scale.

    python benchmarks/sparse_attention.py            # GPU: the full grid, results/sparse_attention_<device>.{json,md}
    python benchmarks/sparse_attention.py --smoke    # CPU: tiny shapes through the Triton interpreter
    python benchmarks/sparse_attention.py --parts decode   # one section (a GPU call is capped at 10 min)
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

from hf_attn_plus.chunked_attention import selected_attention  # noqa: E402
from hf_attn_plus.kernels.block_scoring import quest_scores  # noqa: E402
from hf_attn_plus.kernels.block_sparse_prefill.function import block_sparse_attention  # noqa: E402
from hf_attn_plus.kernels.gathered_attention.function import gathered_attention  # noqa: E402
from hf_attn_plus.kernel_inputs import fixed_spans, key_set, position_slots, sorted_lists, visibility  # noqa: E402
from hf_attn_plus.kernels.indexer_topk import reference as indexer_reference  # noqa: E402
from hf_attn_plus.kernels.indexer_topk.kernel import masked_scores_kernel  # noqa: E402
from hf_attn_plus.kernels.indexer_topk.wrapper import indexer_topk_keep  # noqa: E402
from hf_attn_plus.kernels.key_sets import KeySet  # noqa: E402
from hf_attn_plus.kernels.selected_decode.wrapper import decode_rows, default_splits, selected_decode  # noqa: E402
from hf_attn_plus.kernels.tile_lists import tiles_for  # noqa: E402
from hf_attn_plus.masking import AttentionContext, build_context  # noqa: E402
from hf_attn_plus.mechanisms import block_topk, santa, stochastic_routing  # noqa: E402
from hf_attn_plus.patches.side_cache import SideCacheLayer  # noqa: E402
from hf_attn_plus.reference import masked_attention  # noqa: E402
from hf_attn_plus.registry import get_mechanism  # noqa: E402
from hf_attn_plus.selection import kept_indices  # noqa: E402
from hf_attn_plus.structure import Selection, dense_keep  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PARTS = ("decode", "prefill", "stochastic", "indexer")

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
# stochastic_routing (window, sinks, links per query and head) and santa decode (samples, window, sinks).
STOCHASTIC_FULL = dict(
    window=64, sinks=4, links=16, samples=64, prefill_lengths=[8192, 32768, 131072], training_lengths=[8192, 32768],
    decode_contexts=[16384, 65536, 131072], flex_max_length=32768,
)
STOCHASTIC_TINY = dict(
    window=8, sinks=2, links=4, samples=8, prefill_lengths=[64], training_lengths=[48], decode_contexts=[128],
    flex_max_length=64,
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
    scaling = dim**-0.5
    itemsize = torch.finfo(dtype).bits // 8
    kv_bytes_per_token = 2 * kv_heads * dim * itemsize
    row = dict(mode="decode", context=context, budget=budget)
    # The same cache as a model's decode step sees it: a SideCacheLayer holding the keys, the step's visibility.
    layer = SideCacheLayer()
    layer.update(key, value)
    ctx = build_context(torch.ones(1, 1, 1, context, dtype=torch.bool, device=device), cache_layer=layer)

    # 1. Attention alone on a fixed choice shared by each KV group (sink, local and random blocks): the same blocks
    # for SDPA (all), FlexAttention and our decode kernel (as block lists).
    picks = torch.rand(1, kv_heads, num_blocks, device=device, generator=g)
    picks[..., 0] = picks[..., -1] = 2.0
    chosen = torch.zeros(1, kv_heads, num_blocks, dtype=torch.bool, device=device)
    chosen.scatter_(-1, picks.topk(budget // block, dim=-1).indices, True)
    head_chosen = chosen.repeat_interleave(heads // kv_heads, 1).unsqueeze(2)  # [1, Hq, 1, blocks]
    blocks = sorted_lists(kept_indices(head_chosen, num_blocks), ctx)
    keys = KeySet(visibility(ctx), blocks=blocks, block_size=block)
    splits = default_splits(kv_heads, device)
    tile = cfg["tile"]
    ours = lambda: selected_decode(query, key, value, keys, scaling, tile, splits)  # noqa: E731
    out = ours()
    row["ours_ms"] = milliseconds(ours, device)
    row["sdpa_ms"] = milliseconds(lambda: dense_sdpa(query, key, value, causal=False), device)
    row["sdpa_GBps"] = context * kv_bytes_per_token / row["sdpa_ms"] / 1e6
    tiles = tiles_for(keys, heads, kv_heads, context, decode_rows(query, key), tile)
    row["ours_GBps"] = attention_bytes(tiles, dim, itemsize) / row["ours_ms"] / 1e6
    run_flex, BlockMask, _ = flex
    if run_flex is not None:
        counts, indices = compact_blocks(head_chosen)
        # Eager flex (CPU) reads only mask_mod, compiled flex only the block lists on full blocks: give both.
        mask = BlockMask.from_kv_blocks(
            torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=(block, block), seq_lengths=(1, context),
            mask_mod=lambda b, h, q, kv: head_chosen[b, h, 0, kv // block],
        )
        flexed = lambda: run_flex(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True)  # noqa: E731
        row["flex_ms"] = milliseconds(flexed, device)
        row["max_abs_diff_vs_flex"] = (flexed().float() - out.float()).abs().max().item()

    # 2. The whole block_topk decode step as backend="kernel" runs it in a model: fold the new key into the layer's
    # block summaries, Quest-score every block for every query head, top blocks (per query head, or shared by a KV
    # group: choose_per='group', columns group_step_*), tiles of their union per KV group, decode attention. Per-
    # head choices read up to `group` times the budget: the bytes are counted from the tiles actually listed.
    mechanism = get_mechanism("block_topk")
    state_name = f"block_topk:block_size={block}"
    for choose_per, prefix in (("head", "step"), ("group", "group_step")):
        opts = mechanism.resolve_options(
            dict(block_size=block, budget=max(1, budget // block - 2), backend="kernel", choose_per=choose_per, score="bound")
        )

        def decode_step():
            state = layer.side.get(state_name)
            if state is not None:
                state.covered = context - 1  # the newest key arrives this step
            return mechanism.kernel(query, key, value, ctx, opts, scaling)

        stepped = decode_step()
        row[f"{prefix}_ms"] = milliseconds(decode_step, device)
        uncached = build_context(ctx.visible)
        selected = dense_keep(uncached, mechanism.select(query, key, uncached, opts), heads)
        reference = masked_attention(query, key, value, selected, scaling)[0]
        row[f"{prefix}_max_abs_diff_vs_reference"] = (stepped.float() - reference.float()).abs().max().item()
        summaries = layer.side[state_name]
        kmin, kmax = summaries.bounds
        step_chosen = block_topk.chosen_blocks(
            query, ctx, opts, kmin.shape[2], kv_heads, lambda queries: quest_scores(queries, kmin, kmax), kmin.shape[2]
        )
        step_keys = key_set(ctx, Selection(block_topk.fixed_rule(opts), block_size=block, blocks=step_chosen))
        step_tiles = tiles_for(step_keys, heads, kv_heads, context, decode_rows(query, key), tile)
        step_bytes = attention_bytes(step_tiles, dim, itemsize) + 2 * kv_heads * num_blocks * dim * itemsize
        row[f"{prefix}_tokens_read"] = int(step_tiles.counts.sum()) * tile // kv_heads
        row[f"{prefix}_MB_read"] = step_bytes / 1e6
        row[f"{prefix}_GBps"] = step_bytes / row[f"{prefix}_ms"] / 1e6
    # The per-head step without the side cache: block bounds recomputed from every key (the recompute path).
    recompute_ctx = build_context(ctx.visible)
    opts = mechanism.resolve_options(dict(block_size=block, budget=max(1, budget // block - 2), backend="kernel", score="bound"))
    row["recompute_step_ms"] = milliseconds(lambda: mechanism.kernel(query, key, value, recompute_ctx, opts, scaling), device)
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["step_ms"]
    row["group_speedup_vs_sdpa"] = row["sdpa_ms"] / row["group_step_ms"]
    return row


def attention_bytes(tiles, dim: int, itemsize: int) -> int:
    """Bytes the decode kernel reads: K and V of every listed tile per (batch, KV head, row block); positions (per
    sequence), the rows' block lists, the query, the output and the tile lists are negligible."""
    per_tile = tiles.block_n * 2 * dim * itemsize
    return int(tiles.counts.sum()) * per_tile


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
    # Ours: each query lists the chosen blocks of its query block (the kernel applies causality from positions).
    ctx = causal_positions(length, device)
    per_block = kept_indices(chosen, num_blocks)  # [1, heads, query blocks, num_blocks]
    query_block = torch.arange(length, device=device) // block
    lists = sorted_lists(lambda rows: per_block[:, :, query_block[rows]], ctx)  # per query chunk
    keys = KeySet(visibility(ctx), blocks=lists, block_size=block)
    scaling = dim**-0.5
    ours = lambda: block_sparse_attention(query, key, value, keys, scaling, tile, tile)  # noqa: E731
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


def causal_positions(length: int, device: torch.device) -> AttentionContext:
    """Positions of one unpadded causal sequence (no [L, L] mask: 17 GB at 128K would not fit)."""
    pos = torch.arange(length, device=device)
    return AttentionContext(key_pos=pos.view(1, 1, 1, -1), query_pos=pos.view(1, 1, -1, 1))


def routing_case(cfg, scfg, length: int, training: bool, device, flex) -> dict:
    """stochastic_routing over one causal sequence: forward (prefill) or forward + backward (training)."""
    heads, kv_heads, dim, dtype = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [
        torch.randn(1, h, length, dim, device=device, dtype=dtype, generator=g).requires_grad_(training)
        for h in (heads, kv_heads, kv_heads)
    ]
    opts = stochastic_routing.MECHANISM.resolve_options({k: scfg[k] for k in ("window", "sinks", "links")})
    ctx = causal_positions(length, device)
    scaling = dim**-0.5

    def lists():
        with torch.no_grad():
            links = stochastic_routing.link_positions(ctx, heads, opts, layer=0)
            return fixed_spans(ctx, opts.sinks, opts.window), position_slots(ctx, links), links

    spans, slots, links = lists()
    ours = lambda: gathered_attention(*inputs, visibility(ctx), spans, slots, scaling)  # noqa: E731
    dense = lambda: dense_sdpa(*inputs, causal=True)  # noqa: E731

    def step(fn):
        if not training:
            with torch.no_grad():
                return fn()
        out = fn()
        out.backward(torch.ones_like(out))
        return out

    attended = opts.sinks + opts.window + opts.links
    row = dict(mode="routing_training" if training else "routing_prefill", length=length, attended=attended)
    out = step(ours)
    row["ours_ms"] = milliseconds(lambda: step(ours), device)
    row["ours_with_draw_ms"] = milliseconds(lambda: (lists(), step(ours)), device)
    row["sdpa_ms"] = milliseconds(lambda: step(dense), device)
    run_flex, _, _ = flex
    if run_flex is not None and length <= scfg["flex_max_length"]:
        from torch.nn.attention.flex_attention import create_block_mask

        head_links = links[0]  # [H, L, links]

        def routed(b, h, q, kv):
            linked = kv < 0
            for j in range(opts.links):
                linked = linked | (head_links[h, q, j] == kv)
            return (kv <= q) & ((q - kv < opts.window) | (kv < opts.sinks) | linked)

        block_mask = create_block_mask(routed, 1, heads, length, length, device=device.type)
        flexed = lambda: run_flex(*inputs, block_mask=block_mask, scale=scaling, enable_gqa=True)  # noqa: E731
        if device.type == "cuda" or not training:  # FlexAttention has no CPU backward
            row["flex_ms"] = milliseconds(lambda: step(flexed), device)
            with torch.no_grad():
                row["max_abs_diff_vs_flex"] = (flexed().float() - out.float()).abs().max().item()
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
    return row


def santa_case(cfg, scfg, context: int, device) -> dict:
    """One santa decode step over a cache of `context` keys: the whole kernel path (quantised-key proposal, draws,
    lists, gathered kernel), the kernel alone, santa's reference path and dense SDPA."""
    heads, kv_heads, dim, dtype = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    g = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(1, heads, 1, dim, device=device, dtype=dtype, generator=g)
    key = torch.randn(1, kv_heads, context, dim, device=device, dtype=dtype, generator=g)
    value = torch.randn(1, kv_heads, context, dim, device=device, dtype=dtype, generator=g)
    opts = santa.MECHANISM.resolve_options({k: scfg[k] for k in ("samples", "window", "sinks")})
    ctx = build_context(torch.ones(1, 1, 1, context, dtype=torch.bool, device=device))
    scaling = dim**-0.5

    def lists():
        slots, log_weights = santa.sampled_slots(query, key, ctx, opts, scaling, layer=0)
        return fixed_spans(ctx, opts.sinks, opts.window), slots, log_weights

    def reference():
        return selected_attention(query, key, value, ctx, santa.estimate(query, key, ctx, opts, scaling, layer=0), scaling)

    spans, slots, log_weights = lists()
    row = dict(mode="santa_decode", context=context, read=opts.sinks + opts.window + opts.samples)
    with torch.no_grad():
        def gather_only(spans=spans, slots=slots, log_weights=log_weights):
            return gathered_attention(query, key, value, visibility(ctx), spans, slots, scaling, log_weights)

        row["ours_kernel_ms"] = milliseconds(gather_only, device)
        row["ours_ms"] = milliseconds(lambda: gather_only(*lists()), device)
        row["reference_ms"] = milliseconds(reference, device)
        row["sdpa_ms"] = milliseconds(lambda: dense_sdpa(query, key, value, causal=False), device)
        row["max_abs_diff_vs_reference"] = (gather_only().float() - reference().float()).abs().max().item()
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
        ("decode", ["context", "budget", "sdpa_ms", "flex_ms", "ours_ms", "sdpa_GBps", "ours_GBps", "max_abs_diff_vs_flex", "step_ms", "step_tokens_read", "step_MB_read", "step_GBps", "recompute_step_ms", "step_max_abs_diff_vs_reference", "speedup_vs_sdpa", "group_step_ms", "group_step_tokens_read", "group_step_GBps", "group_step_max_abs_diff_vs_reference", "group_speedup_vs_sdpa"]),
        ("prefill", ["length", "skip_target", "skipped", "sdpa_ms", "flex_ms", "ours_ms", "sdpa_TFLOPs", "flex_TFLOPs", "ours_TFLOPs", "speedup_vs_sdpa", "max_abs_diff_vs_flex"]),
        *(
            (mode, ["length", "attended", "sdpa_ms", "flex_ms", "ours_ms", "ours_with_draw_ms", "speedup_vs_sdpa", "max_abs_diff_vs_flex"])
            for mode in ("routing_prefill", "routing_training")
        ),
        ("santa_decode", ["context", "read", "sdpa_ms", "reference_ms", "ours_ms", "ours_kernel_ms", "speedup_vs_sdpa", "max_abs_diff_vs_reference"]),
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
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS),
        help="which sections to run (a GPU call is capped at 10 min: run them one by one); partial runs write "
        "results files named after their parts",
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU here; run with --smoke for the CPU check")
    cfg = TINY if args.smoke else FULL
    flex = flex_runner(device)
    scfg = STOCHASTIC_TINY if args.smoke else STOCHASTIC_FULL
    icfg = INDEXER_TINY if args.smoke else INDEXER_FULL
    cases = {
        "decode": [
            lambda c=c, b=b: decode_case(cfg, c, b, device, flex)
            for c in cfg["contexts"] for b in cfg["budgets"] if b < c
        ],
        "prefill": [lambda n=n, s=s: prefill_case(cfg, n, s, device, flex) for n in cfg["lengths"] for s in cfg["skips"]],
        "stochastic": [
            *(
                lambda n=n, t=t: routing_case(cfg, scfg, n, t, device, flex)
                for t, lengths in ((False, scfg["prefill_lengths"]), (True, scfg["training_lengths"]))
                for n in lengths
            ),
            *(lambda c=c: santa_case(cfg, scfg, c, device) for c in scfg["decode_contexts"]),
        ],
        "indexer": [
            *(
                lambda c=c, q=q, b=b: indexer_case(cfg, icfg, q, c, b, device)
                for c in icfg["contexts"] for q in icfg["decode_queries"] for b in icfg["budgets"]
            ),
            *(lambda n=n, b=b: indexer_case(cfg, icfg, n, n, b, device) for n in icfg["lengths"] for b in icfg["budgets"]),
        ],
    }
    rows = []
    for part in (p for p in PARTS if p in args.parts):
        for case in cases[part]:
            rows.append(case())
            print(rows[-1], flush=True)
    env = environment(device, flex[2])
    stem = "sparse_attention_cpu_smoke" if args.smoke else "sparse_attention_" + env["device"].replace(" ", "_")
    if set(args.parts) != set(PARTS):
        stem += "_" + "-".join(p for p in PARTS if p in args.parts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(env, rows, cfg))
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
