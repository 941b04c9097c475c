"""Evaluate a converted model: held-out perplexity of the dense teacher and of the model on its mechanism, at each
value of one option (`--grid options.budget=0.25,0.5,1`), and passkey retrieval at several depths (the needle test
of `hf-attn-plus compare`: a 5-digit number planted at 10 %, 50 % and 90 % of a held-out haystack).

    python recipes/evaluate.py --config recipes/smollm2/head_budget.yaml --adapter runs/smollm2/head_budget/final \
        --grid options.budget=0.25,0.5,0.75,1.0 --needle-length 1536 --json out.json

`model` (in the config or `--set model=...`) is a saved model (e.g. a recipe's `final` or `merged`); `--adapter`
loads a PEFT adapter onto it first (`hf_attn_plus.adapters.load_adapter`, so adapter copies of plugin weights load
too). The held-out blocks are the recipes' (`data.*`: every 10th document, never trained on). For `head_budget` each
row also gives the mean gate, the share of heads on (gate > 0) and the share of heads computed (a KV group runs when
one of its heads is on: the cost the recipe trains against).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import yaml

from common import argument_parser, dense_teacher, load_config, load_corpus, load_model, perplexity, setup, write_report

from hf_attn_plus.adapters import load_adapter
from hf_attn_plus.compare import NEEDLE_DEPTHS, needle_batch, needle_score
from hf_attn_plus.mechanisms.head_budget import expected_cost, head_gates


def parse_grid(text: str | None) -> tuple[str | None, list[Any]]:
    """'options.budget=0.25,0.5' -> ('budget', [0.25, 0.5]); only mechanism options can be swept."""
    if text is None:
        return None, [None]
    key, sep, values = text.partition("=")
    if not sep or not key.startswith("options.") or not values:
        raise ValueError(f"--grid expects options.<name>=V1,V2,... (e.g. options.budget=0.25,0.5), got {text!r}")
    return key.removeprefix("options."), [yaml.safe_load(v) for v in values.split(",")]


def main() -> dict[str, Any]:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="a PEFT adapter directory to load onto the model")
    parser.add_argument("--grid", help="one option to sweep: options.<name>=V1,V2,...")
    parser.add_argument("--needle-length", type=int, default=1536, help="tokens of the passkey test (0: skip it)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set, args.stage)
    key, values = parse_grid(args.grid)
    started = time.time()
    accelerator = setup(cfg)
    lengths = {"data.seq_len": cfg.data.seq_len, "--needle-length": args.needle_length}
    model, tokenizer = load_model(cfg, accelerator, lengths)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    model.eval()
    corpus = load_corpus(cfg.data, tokenizer, accelerator)
    eval_blocks = corpus.eval_blocks(cfg.data.seq_len, cfg.data.eval_blocks)
    needles = None
    if args.needle_length:
        haystack = corpus.eval_blocks(args.needle_length, 1)[0]
        needles = needle_batch(tokenizer, haystack, args.needle_length, seed=args.needle_length)

    def measure() -> dict[str, float]:
        row = {f"ppl@{cfg.data.seq_len}": perplexity(accelerator, model, eval_blocks)}
        if needles is not None:
            row[f"needle@{args.needle_length}"] = needle_score(model, *(t.to(accelerator.device) for t in needles))
        return row

    with dense_teacher(model):
        dense = measure()
    accelerator.print(f"dense: {dense}")
    base_options = dict(model.config.hf_attn_plus)
    rows = []
    for value in values:
        options = base_options if key is None else {**base_options, key: value}
        model.config.hf_attn_plus = options
        with torch.no_grad():
            row = {"options": options, **measure()}
            if cfg.mechanism == "head_budget":
                budget = float(options.get("budget", 1.0))
                gates = head_gates(model, budget, float(options.get("ramp", 1.0)))
                # A KV group runs when one of its heads is on, so heads computed >= heads on (gate > 0).
                row["mean gate"], row["heads on"] = float(gates.mean()), float((gates > 0).float().mean())
                row["heads computed"] = float(expected_cost(model, budget))
        rows.append(row)
        accelerator.print(f"{cfg.mechanism} {options}: {row}")
    report = {
        "model": cfg.model,
        "adapter": args.adapter,
        "mechanism": cfg.mechanism,
        "data": f"{cfg.data.source}: {cfg.data.eval_blocks} held-out blocks of {cfg.data.seq_len} tokens",
        "needle": {"length": args.needle_length, "depths": list(NEEDLE_DEPTHS)} if needles is not None else None,
        "dense (adapters off)": dense,
        "results": rows,
        "wall_seconds": round(time.time() - started, 1),
    }
    write_report(accelerator, args.json, report)
    return report


if __name__ == "__main__":
    main()
