"""How well a key scorer picks what SmolLM2-135M's attention reads: per layer, over held-out 512-token blocks and
queries with at least 80 earlier keys, the share of the dense target p_t (attention summed over heads) held by the
sinks + window, by the scorer's top-`budget` other keys, and by the exact top-`budget` (the most any choice of that
size holds), and the recall of the exact set. Scorers: a saved indexer_topk model's indexer (`--model`), or forms
built from the layer's own post-RoPE q and k with no training (`--forms`): the DSA form sum_h relu(q_h · k), the
plain sum of q_h · k, max_h q_h · k, and max_h log p_h.

    python benchmarks/indexer_selection_quality.py --forms --out benchmarks/results/indexer_selection_forms_cpu.json
    python benchmarks/indexer_selection_quality.py --model runs/smollm2/indexer_topk_wide/final \
        --set options.index_heads=16 --set options.index_dim=64 --out benchmarks/results/indexer_selection_wide_cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
from common import load_config, load_corpus, load_model, setup  # noqa: E402

from hf_attn_plus.masking import chunk_visible  # noqa: E402
from hf_attn_plus.reference import attention_target  # noqa: E402
from hf_attn_plus.registry import get_mechanism  # noqa: E402
from hf_attn_plus.selection import top_scoring  # noqa: E402
from hf_attn_plus.structure import PositionRule  # noqa: E402

# The modules, not the names their package re-exports (hf_attn_plus.mechanisms.topk is a Mechanism there).
indexer_topk = importlib.import_module("hf_attn_plus.mechanisms.indexer_topk")
topk = importlib.import_module("hf_attn_plus.mechanisms.topk")
RECIPE = Path(__file__).parents[1] / "recipes" / "smollm2" / "indexer_topk.yaml"
MIN_KEYS = 80  # queries with fewer earlier keys have hardly any choice beyond the sinks + window


class Tally:
    """Sums per (scorer, layer) of the three masses and the recall, over counted queries."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], list[float]] = {}

    def add(self, name: str, layer: int, target, scores, ctx, rule: PositionRule, budget: int) -> None:
        rows = slice(0, target.shape[2])
        counted = (ctx.query_pos[:, 0, :, 0] >= MIN_KEYS)[:, None]  # [B, 1, q]
        visible = chunk_visible(ctx, rows)
        kept = visible & rule.keep(ctx.query_pos, ctx.key_pos)
        candidates = visible & ~kept
        chosen = top_scoring(scores, candidates, budget)
        exact = top_scoring(target, candidates, budget)
        total = self.sums.setdefault((name, layer), [0.0, 0.0, 0.0, 0.0, 0.0])
        for i, value in enumerate(((target * kept).sum(-1), (target * chosen).sum(-1), (target * exact).sum(-1),
                                   (chosen & exact).sum(-1) / budget)):
            total[i] += value[counted].sum().item()
        total[4] += counted.sum().item()

    def report(self) -> dict:
        names = sorted({name for name, _ in self.sums})
        out = {}
        for name in names:
            layers = {layer: [v / s[4] for v in s[:4]] for (n, layer), s in sorted(self.sums.items()) if n == name}
            keys = ("rule_mass", "chosen_mass", "exact_top_mass", "recall")
            per_layer = {layer: dict(zip(keys, [round(v, 4) for v in values])) for layer, values in layers.items()}
            mean = {k: round(sum(row[k] for row in per_layer.values()) / len(per_layer), 4) for k in keys}
            out[name] = dict(mean=mean, layers=per_layer)
        return out


def form_scores(query, key, ctx, scaling) -> dict[str, torch.Tensor]:
    """Scores [B, 1, q, kv] of each form from the exact post-RoPE q [B, Hq, q, D] and k [B, Hkv, kv, D]."""
    keys = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = (query.float() @ keys.transpose(-1, -2)) * scaling
    masked = logits.masked_fill(~chunk_visible(ctx, slice(0, query.shape[2])), float("-inf"))
    return {
        "sum_h relu(q_h.k) (DSA form, the layer's own q and k)": logits.relu().sum(1, keepdim=True),
        "sum_h q_h.k": logits.sum(1, keepdim=True),
        "max_h q_h.k": logits.amax(1, keepdim=True),
        "max_h log p_h": (masked - masked.logsumexp(-1, keepdim=True)).amax(1, keepdim=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved indexer_topk model (a recipe's final/)")
    parser.add_argument("--forms", action="store_true", help="score the untrained forms on SmolLM2 itself")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (options of the saved model)")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if bool(args.model) == args.forms:
        raise SystemExit("give exactly one of --model DIR or --forms")
    overrides = [*args.set, "options.stage=sparse"]
    cfg = load_config(str(RECIPE), [f"model={args.model}", *overrides] if args.model else overrides)
    if args.forms:
        cfg.mechanism = "topk"
        cfg.options = dict(budget=cfg.options["budget"], window=cfg.options["window"], sinks=cfg.options["sinks"])
    accelerator = setup(cfg)
    model, tokenizer = load_model(cfg, accelerator, {"data.seq_len": cfg.data.seq_len})
    model.eval()
    blocks = load_corpus(cfg.data, tokenizer, accelerator).eval_blocks(cfg.data.seq_len, args.blocks)
    budget, rule, tally = cfg.options["budget"], PositionRule(sinks=cfg.options["sinks"], window=cfg.options["window"]), Tally()

    def target_of(query, key, ctx):  # SmolLM2 scales its logits by 1 / sqrt(head dim)
        return attention_target(query.float(), key.float(), chunk_visible(ctx, slice(0, query.shape[2])), query.shape[-1] ** -0.5)

    if args.forms:
        select = topk.select

        def spy(query, key, ctx, opts):
            layer = spy.calls % model.config.num_hidden_layers  # select does not see the module: layers run in order
            spy.calls += 1
            target = target_of(query, key, ctx)
            for name, scores in form_scores(query, key, ctx, query.shape[-1] ** -0.5).items():
                tally.add(name, layer, target, scores, ctx, rule, budget)
            return select(query, key, ctx, opts)

        spy.calls = 0
        object.__setattr__(get_mechanism("topk"), "select", spy)
    else:
        inputs_of = indexer_topk.indexer_inputs

        def spy(module, query, key, ctx, opts):
            inputs = inputs_of(module, query, key, ctx, opts)
            scores = indexer_topk.fp32_indexer_scores(*inputs)
            tally.add("indexer", module.layer_idx, target_of(query, key, ctx), scores, ctx, rule, budget)
            return inputs

        indexer_topk.indexer_inputs = spy
    with torch.no_grad():
        for block in blocks:
            model(input_ids=block[None])
    report = tally.report()
    for name, row in report.items():
        print(name, row["mean"])
    if args.out:
        results = dict(
            machine=f"{platform.machine()}, {os.cpu_count()} cores", command="python " + " ".join(sys.argv),
            model=args.model or "smollm2", options=cfg.options, blocks=args.blocks, min_keys=MIN_KEYS, scorers=report,
        )
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
