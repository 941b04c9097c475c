"""Long-context benchmark: the sparse family against dense SDPA on one SmolLM2-shaped attention layer.

Shapes are SmolLM2-135M's attention (9 query / 3 KV heads, head dim 64), batch 1, fp32, random inputs.
- prefill: the registered attention function as transformers calls it (query/key/value in, output out; the q/k/v
  projections are the same for every row and left out), at each length; time (untraced calls) and peak tensor
  memory the call allocates (one more, traced call, up to `--memory-up-to`; hf_attn_plus.measure.TensorMemoryPeak:
  storage created and alive during the call; for SDPA that is its output, its internal tiles are not seen);
- decode: ms per generated token of a one-layer SmolLM2-shaped model (vocabulary 256) with a DynamicCache holding
  `context` tokens, prefilled with SDPA then switched to the mechanism (the side caches build on the first step);
- decode_call: one attention call of a new query over the cached keys alone (no model, no cache append);
- train: forward + backward of the attention call at one length.
Ratios are against SDPA measured in the same run. Results name the machine.

    python benchmarks/long_context.py --out benchmarks/results/long_context_cpu.json
    python benchmarks/long_context.py --lengths 4096 --mechanisms sliding_window --parts prefill   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_attn_plus
from hf_attn_plus.attention import mask_function
from hf_attn_plus.measure import TensorMemoryPeak
from hf_attn_plus.patches.side_cache import SideCacheLayer

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SETTINGS = {
    "sliding_window": dict(window=1024, sinks=4),
    "dilated": dict(window=1024, dilation=16),
    # Quest's bound (one min/max pair per block): 32 blocks = 2048 keys
    "block_topk": dict(block_size=64, budget=30, sink_blocks=1, local_blocks=1, score="bound"),
    # the heads of a GQA group share their blocks: one KV read of 2048 keys serves the group's 3 query heads
    "block_topk/group": dict(block_size=64, budget=30, sink_blocks=1, local_blocks=1, choose_per="group", score="bound"),
    # the default score, the pooled mass estimate over 4-key runs (16 mean keys per 64-token block)
    "block_topk/mass": dict(block_size=64, budget=30, sink_blocks=1, local_blocks=1, score="mass", pool_size=4),
    "topk": dict(budget=1024, window=64, sinks=4),
    "block_sparse": dict(block_size=64, threshold=0.9),
}
PARTS = ("prefill", "decode", "decode_call", "train")


def mechanism_of(setting: str) -> str:
    """'block_topk/group' -> 'block_topk': a setting is a mechanism, or one with a variant of its options."""
    return setting.split("/")[0]


def machine() -> str:
    if DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}, {DTYPE}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, {DTYPE}"


def layer_config(max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=Q_HEADS * HEAD_DIM, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        intermediate_size=1536, num_hidden_layers=1, vocab_size=256, max_position_embeddings=max_positions,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


class _Module(torch.nn.Module):
    """What the attention function reads from a transformers attention module."""

    def __init__(self, config: LlamaConfig, options: dict) -> None:
        super().__init__()
        config.hf_attn_plus = options
        self.config, self.is_causal, self.layer_idx = config, True, 0
        self.num_key_value_groups = Q_HEADS // KV_HEADS


def attention_call(name: str, length: int, cached: bool = False):
    """(function of (q, k, v) -> output, the module) for `name` ('sdpa' or a mechanism). `cached`: the call sees a
    cache layer holding k and v, as a decode step does, so side states (block summaries) persist across calls."""
    config = layer_config(max(length, 8192))
    if name == "sdpa":
        module = _Module(config, {})
        return lambda q, k, v: sdpa_attention_forward(module, q, k, v, None, scaling=HEAD_DIM**-0.5)[0]
    mechanism = hf_attn_plus.get_mechanism(mechanism_of(name))
    fn = AttentionInterface()[mechanism.attn_implementation]
    module = _Module(config, dict(SETTINGS[name], backend=BACKEND))

    def run(q, k, v):
        if cached and mechanism.side_cache and getattr(module, "attn_plus_cache_layer", None) is None:
            layer = DynamicLayer()
            layer.update(k, v)
            module.attn_plus_cache_layer = SideCacheLayer.replacing(layer)
        positions = mask_function(1, q.shape[2], k.shape[2], k.shape[2] - q.shape[2], 0, config=config, device=q.device)
        return fn(module, q, k, v, positions, scaling=HEAD_DIM**-0.5)[0]

    return run


DEVICE = torch.device("cpu")
DTYPE = torch.float32
# 'reference': the chunked PyTorch path on any device. The Triton kernels ('auto' on CUDA) still read a dense keep
# mask, which does not fit at 64k+.
BACKEND = "auto"


def inputs(length: int, requires_grad: bool = False):
    g = torch.Generator().manual_seed(length)
    shapes = ((1, Q_HEADS, length, HEAD_DIM), (1, KV_HEADS, length, HEAD_DIM), (1, KV_HEADS, length, HEAD_DIM))
    return [torch.randn(s, generator=g).to(DEVICE, DTYPE).requires_grad_(requires_grad) for s in shapes]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn) -> int:
    """Peak bytes allocated during fn beyond what was live before (CUDA: the allocator's own count)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with TensorMemoryPeak() as tracker:
        fn()
    return tracker.peak


def prefill(names: list[str], lengths: list[int], repeat: int, memory_up_to: int) -> list[dict]:
    rows = []
    for length in lengths:
        q, k, v = inputs(length)
        for name in ["sdpa", *names]:
            call = attention_call(name, length)
            compile_s = None
            try:
                with torch.no_grad():
                    if BACKEND == "flex" and name != "sdpa":  # the first call of a shape compiles
                        compile_s = timed(lambda: call(q, k, v), 1)
                    seconds = timed(lambda: call(q, k, v), repeat if length <= 16384 else 1)
                    # a call of its own: the tracer costs microseconds per op, which would count against many ops
                    memory = peak_bytes(lambda: call(q, k, v)) if length <= memory_up_to else None
            except torch.OutOfMemoryError as error:  # recorded, and the other rows still run
                rows.append(dict(part="prefill", mechanism=name, length=length, error=str(error).splitlines()[0]))
                _report(rows[-1])
                continue
            rows.append(dict(part="prefill", mechanism=name, length=length, seconds=seconds, peak_MB=_mb(memory)))
            if compile_s is not None:
                rows[-1]["first_call_s"] = compile_s
            _report(rows[-1])
    return _with_ratios(rows, "length")


def decode(names: list[str], contexts: list[int], steps: int) -> list[dict]:
    rows = []
    for context in contexts:
        torch.manual_seed(0)
        # from_config: the class hf_attn_plus patches (side caches for block summaries)
        model = AutoModelForCausalLM.from_config(layer_config(context + steps + 8)).eval().to(DEVICE, DTYPE)
        ids = torch.randint(3, 256, (1, context), device=DEVICE)
        for name in ["sdpa", *names]:
            hf_attn_plus.set_attention(model, "sdpa")
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                if name != "sdpa":
                    hf_attn_plus.set_attention(model, mechanism_of(name), **SETTINGS[name])
                token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)  # builds side states
                _sync()
                start = time.perf_counter()
                for _ in range(steps):
                    token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
                _sync()
                ms = (time.perf_counter() - start) / steps * 1e3
            rows.append(dict(part="decode", mechanism=name, context=context, ms_per_token=ms))
            _report(rows[-1])
    return _with_ratios(rows, "context", key="ms_per_token")


def decode_call(names: list[str], contexts: list[int], steps: int) -> list[dict]:
    """One attention call of a single new query over `context` cached keys, without the model or the cache append
    (transformers' DynamicCache copies every key per step, which dominates the model-level decode row on CPU). The
    call sees a cache layer holding the keys, so block_topk's block summaries persist across calls as in decode (a
    step folds in one key)."""
    rows = []
    for context in contexts:
        q, k, v = inputs(context + 1)
        q = q[:, :, -1:]
        for name in ["sdpa", *names]:
            call = attention_call(name, context + 1, cached=True)
            with torch.no_grad():
                call(q, k, v)
                ms = timed(lambda: call(q, k, v), steps) * 1e3
            rows.append(dict(part="decode_call", mechanism=name, context=context, ms_per_token=ms))
            _report(rows[-1])
    return _with_ratios(rows, "context", key="ms_per_token")


def train(names: list[str], length: int) -> list[dict]:
    rows = []
    for name in ["sdpa", *names]:
        q, k, v = inputs(length, requires_grad=True)
        call = attention_call(name, length)

        def step():
            call(q, k, v).float().square().mean().backward()

        seconds = timed(step, 1)
        for x in (q, k, v):
            x.grad = None  # the traced step allocates its gradients as the timed one did
        memory = peak_bytes(step)  # traced apart from the timed step, as in prefill
        rows.append(dict(part="train", mechanism=name, length=length, seconds=seconds, peak_MB=_mb(memory)))
        _report(rows[-1])
    return _with_ratios(rows, "length")


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 1)


def _with_ratios(rows: list[dict], by: str, key: str = "seconds") -> list[dict]:
    dense = {r[by]: r for r in rows if r["mechanism"] == "sdpa"}
    for r in rows:
        base = dense.get(r[by])
        if base is None or key not in r or key not in base:
            continue
        r["speedup_vs_sdpa"] = round(base[key] / r[key], 2)
        if r.get("peak_MB") is not None and base.get("peak_MB"):
            r["memory_vs_sdpa"] = round(r["peak_MB"] / base["peak_MB"], 2)
    return rows


def _report(row: dict) -> None:
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanisms", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--decode-contexts", nargs="+", type=int, default=[8192, 32768])
    parser.add_argument("--train-length", type=int, default=16384)
    parser.add_argument("--train-mechanisms", nargs="+", default=["sliding_window", "block_topk"])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-up-to", type=int, default=32768, help="longest prefill whose memory is traced")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per context")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "kernel", "flex"))
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, DTYPE, BACKEND
    DEVICE, BACKEND = torch.device(args.device), args.backend
    DTYPE = getattr(torch, args.dtype or ("bfloat16" if DEVICE.type == "cuda" else "float32"))
    results = dict(machine=machine(), backend=BACKEND, settings=SETTINGS, command=" ".join(sys.argv), rows=[])
    if "prefill" in args.parts:
        results["rows"] += prefill(args.mechanisms, args.lengths, args.repeat, args.memory_up_to)
    if "decode" in args.parts:
        results["rows"] += decode(args.mechanisms, args.decode_contexts, args.steps)
    if "decode_call" in args.parts:
        results["rows"] += decode_call(args.mechanisms, args.decode_contexts, args.steps)
    if "train" in args.parts:
        results["rows"] += train(args.train_mechanisms, args.train_length)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
