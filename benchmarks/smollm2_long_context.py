"""SmolLM2-135M at its full context: prefill of an 8k-token prompt and greedy generation, per mechanism.

Each mechanism runs in its own process so its peak resident memory (ru_maxrss, model weights included) is its own.
The prompt is Python standard-library source (real text on every machine), tokenised with SmolLM2's tokenizer.

    python benchmarks/smollm2_long_context.py --out benchmarks/results/smollm2_long_context_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "sdpa": {},
    "sliding_window": dict(window=1024, sinks=4),
    "block_topk": dict(block_size=64, budget=14, sink_blocks=1, local_blocks=1, score="bound"),  # 16 blocks = 1024 keys
    "topk": dict(budget=512, window=256, sinks=4),
}


def prompt_ids(tokenizer, length: int):
    import torch

    text, source = "", Path(os.__file__).parent
    for path in sorted(source.glob("*.py")):
        text += path.read_text(errors="ignore")
        if len(text) > length * 6:
            break
    return torch.tensor([tokenizer(text).input_ids[:length]])


def run_one(name: str, length: int, new_tokens: int, threads: int) -> dict:
    import torch

    import hf_attn_plus
    from hf_attn_plus.smollm2 import load_smollm2

    torch.set_num_threads(threads)
    model, tokenizer = load_smollm2()
    model.eval()
    hf_attn_plus.set_attention(model, name, **SETTINGS[name])
    ids = prompt_ids(tokenizer, length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated = [int(token)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
            generated.append(int(token))
        decode = (time.perf_counter() - start) / max(1, new_tokens - 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(
        mechanism=name, options=SETTINGS[name], prompt_tokens=ids.shape[1], prefill_s=round(prefill, 2),
        decode_ms_per_token=round(decode * 1e3, 1), peak_rss_MB=round(peak / 1024), rss_growth_MB=round((peak - before) / 1024),
        tokens=generated,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanisms", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--length", type=int, default=8000)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.length, args.new_tokens, args.threads)))
        return
    rows = []
    for name in args.mechanisms:
        command = [sys.executable, __file__, "--one", name, "--length", str(args.length),
                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append(dict(mechanism=name, error=done.stderr.strip().splitlines()[-1]))
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    dense = next((r for r in rows if r["mechanism"] == "sdpa" and "tokens" in r), None)
    for row in rows:
        if dense and "tokens" in row:
            row["greedy_tokens_equal_sdpa"] = sum(a == b for a, b in zip(row["tokens"], dense["tokens"]))
    results = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads", command=" ".join(sys.argv), rows=rows)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
