"""Rank a converted model's layers by how far its mechanism's attention output lies from dense attention's: relative
MSE ||student - teacher||^2 / ||teacher||^2 per layer, each layer fed the dense model's hidden states (as attention
transfer trains them). Measured on training blocks, never the held-out ones, so a choice of layers made from it is not
fitted to the evaluation. The worst layers are the ones to leave on the model's own attention (the common `layers`
option) when a linearised model cannot close its gap everywhere.

    python recipes/layer_errors.py --config recipes/smollm2/hybrid.yaml --set model=runs/smollm2/hybrid/final \
        --keep-dense 6 --json runs/hybrid_layer_errors.json

Prints (and writes with --json) the errors, the layers worst first, and the `options.layers` value that keeps the
`--keep-dense` worst layers dense.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common import argument_parser, load_config, load_corpus, load_model, setup, write_report

from hf_attn_plus.distill import attention_pairs


def layer_errors(model: torch.nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Relative MSE of each layer's mechanism output against dense attention on the same inputs, layer order."""
    with torch.no_grad(), attention_pairs(model) as pairs:
        model.get_decoder()(input_ids=input_ids, use_cache=False)
    return [
        float((pairs[i].student.float() - pairs[i].teacher.float()).pow(2).mean() / pairs[i].teacher.float().pow(2).mean())
        for i in sorted(pairs)
    ]


def main() -> dict[str, Any]:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8, help="training blocks of data.seq_len tokens to measure on")
    parser.add_argument("--seed", type=int, default=1, help="which training blocks (a permutation seed)")
    parser.add_argument("--keep-dense", type=int, default=0, help="how many of the worst layers the printed `layers` leaves dense")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set, args.stage)
    accelerator = setup(cfg)
    model, tokenizer = load_model(cfg, accelerator, {"data.seq_len": cfg.data.seq_len})
    blocks = load_corpus(cfg.data, tokenizer, accelerator).train_blocks(cfg.data.seq_len)
    if not 0 < args.blocks <= len(blocks):
        raise ValueError(f"--blocks={args.blocks}: allowed 1 to the {len(blocks)} training blocks")
    if not 0 <= args.keep_dense < model.config.num_hidden_layers:
        raise ValueError(f"--keep-dense={args.keep_dense}: allowed 0 to {model.config.num_hidden_layers - 1}")
    chosen = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))[: args.blocks]
    errors = layer_errors(model.eval(), blocks[chosen].to(accelerator.device))
    worst_first = sorted(range(len(errors)), key=lambda i: -errors[i])
    dense = set(worst_first[: args.keep_dense])
    report = {
        "model": cfg.model,
        "mechanism": cfg.mechanism,
        "blocks": f"{args.blocks} training blocks of {cfg.data.seq_len} tokens (permutation seed {args.seed})",
        "relative_mse": [round(e, 4) for e in errors],
        "worst_first": worst_first,
        "keep_dense": sorted(dense),
        "layers": [i for i in range(len(errors)) if i not in dense],
    }
    accelerator.print(json.dumps(report))
    write_report(accelerator, args.json, report)
    return report


if __name__ == "__main__":
    main()
