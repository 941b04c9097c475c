"""Quality sweep on SmolLM2-135M: the training-free selections at 5%, 10% and 25% of the context's keys per query,
through `hf-attn-plus compare` (perplexity on held-out stdlib text, needle retrieval at several depths, decode
agreement with dense, per-layer error, speed), plus Quest's regime (prefill dense, `apply_to='decode'`) at 10%.

A budget of n keys means what a query at the end of the context reads: sinks, window and chosen keys together
(`compare` also reports the share of all causal (query, key) pairs each setting attends, counted on the text).
`block_sparse` has no budget: its mass thresholds are swept instead. `santa` is left out: its prefill is exact (it
samples only in decode), so its perplexity is dense's. One length per run (quality and needle depths there; speed
there too unless `--speed-length` says otherwise: at 8k on one thread, timing a setting costs five prefills).

    python benchmarks/smollm2_quality_sweep.py --length 2048 --out docs/sweep_smollm2_2k

`--only NAME ...` keeps the settings of some mechanisms (dense always runs: the others are measured against it), so
a sweep can run as one process per core; `--merge A.json B.json ... --out STEM` then writes one report from them.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Sequence

SHARES = (0.05, 0.10, 0.25)
THRESHOLDS = (0.9,)


def settings(
    length: int, shares: Sequence[float], thresholds: Sequence[float], block_size: int, pool: int, decode_regime: bool,
    block_score: str = "mass", block_pool: int = 4,
) -> list[str]:
    # Most informative first: a sweep stopped early (compare writes its JSON after every setting) keeps these.
    specs, dilated = [], []
    scored = f",score=mass,pool_size={block_pool}" if block_score == "mass" else ",score=bound"
    for share in shares:
        keys = int(share * length)
        half = keys // 2
        specs += [
            f"topk:budget={keys - 68},window=64,sinks=4",
            f"block_topk:block_size={block_size},budget={max(1, keys // block_size - 2)},sink_blocks=1,local_blocks=1"
            + scored,
            f"sliding_window:window={keys - 4},sinks=4",
        ]
        dilated.append(f"dilated:window={half},dilation={max(1, math.ceil((length - half) / half))}")
    specs += [f"block_sparse:block_size=64,threshold={t},pool_size={pool}" for t in thresholds] + dilated
    if 0.10 in shares and decode_regime:
        keys = int(0.10 * length)
        specs += [
            f"topk:budget={keys - 68},window=64,sinks=4,apply_to=decode",
            f"block_topk:block_size={block_size},budget={keys // block_size - 2},sink_blocks=1,local_blocks=1"
            + scored + ",apply_to=decode",
        ]
    return specs


def merge(paths: Sequence[Path], out: Path) -> str:
    """One report from sweeps of the same model, text and settings, each with its own dense row (they must agree)."""
    from hf_attn_plus.compare import format_table

    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for path, report in zip(paths[1:], reports[1:]):
        dense, other = first["results"][0], report["results"][0]
        if report["settings"] != first["settings"] or abs(dense["perplexity"] - other["perplexity"]) > 1e-6 * dense["perplexity"]:
            raise ValueError(f"{path}: settings or dense perplexity differ from {paths[0]}; only sweeps of one text merge")
    merged = dict(first, results=[first["results"][0], *(row for r in reports for row in r["results"][1:])])
    Path(f"{out}.json").write_text(json.dumps(merged, indent=2))
    table = format_table(merged)
    Path(f"{out}.md").write_text(f"merged from {', '.join(str(p) for p in paths)}\n\n{table}\n")
    from hf_attn_plus.plots import plot_report

    plot_report(merged, f"{out}.png")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shares", type=float, nargs="+", default=SHARES, help="shares of the keys a query at the end reads")
    parser.add_argument("--thresholds", type=float, nargs="*", default=THRESHOLDS, help="block_sparse mass thresholds")
    parser.add_argument("--block-size", type=int, default=16, help="block_topk's block size (tokens)")
    parser.add_argument("--pool-size", type=int, default=8, help="block_sparse's pool_size (keys per mean key)")
    parser.add_argument("--block-score", default="mass", choices=("mass", "bound"), help="block_topk's score")
    parser.add_argument("--block-pool", type=int, default=4, help="block_topk's pool_size with --block-score mass")
    parser.add_argument(
        "--no-decode-regime", dest="decode_regime", action="store_false",
        help="leave out the apply_to='decode' settings (prefill dense) at 10 %%",
    )
    parser.add_argument("--speed-length", type=int, help="where to time prefill and decode (default: --length; 0: no timing)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="keep the settings of these mechanisms only")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="merge these sweep reports into --out")
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes .json, .png and the table as .md")
    args = parser.parse_args()
    if args.merge:
        print(merge(args.merge, args.out))
        return
    specs = settings(
        args.length, args.shares, args.thresholds, args.block_size, args.pool_size, args.decode_regime,
        args.block_score, args.block_pool,
    )
    if args.only:
        specs = [s for s in specs if s.split(":")[0] in args.only]
        if not specs:
            raise SystemExit(f"--only {' '.join(args.only)}: no setting of these mechanisms in this sweep")
    speed_length = args.length if args.speed_length is None else args.speed_length
    command = [
        sys.executable, "-m", "hf_attn_plus", "compare", "smollm2", "--lengths", str(args.length),
        "--samples", str(args.samples), "--threads", str(args.threads), "--json", f"{args.out}.json",
        "--plot", f"{args.out}.png", "--speed-lengths", *([str(speed_length)] if speed_length else []),
        "--mechanisms", *specs,
    ]
    print(" ".join(command), flush=True)
    table = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    Path(f"{args.out}.md").write_text(f"`{' '.join(command[1:])}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
