"""Plots of a `compare` report (matplotlib is imported here only, so the core never needs it)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], out: str | Path) -> Path:
    """Four panels: attention error and perplexity change vs share of attention kept (one line per mechanism),
    prefill time and decode time per token vs context length (one line per setting)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install matplotlib (or hf_attn_plus[plots])") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    timed = report["settings"].get("speed_lengths", report["settings"]["lengths"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    by_mechanism: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in results:
        by_mechanism[row["mechanism"]].append(row)
    # One colour per mechanism in every panel; in the speed panels, line style tells its settings apart.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {m: "black" if m == "dense" else cycle[i % len(cycle)] for i, m in enumerate(sorted(by_mechanism))}
    dashes = ["-", "--", ":", "-."]
    quality = [
        (axes[0, 0], lambda r: sum(r["layer_error"]) / len(r["layer_error"]), "attention output rel. error (mean over layers)"),
        (axes[0, 1], lambda r: r["perplexity_delta"], "perplexity − dense perplexity"),
    ]
    for ax, value, ylabel in quality:
        for mechanism, rows in sorted(by_mechanism.items()):
            rows = sorted((r for r in rows if r["kept_fraction"] is not None), key=lambda r: r["kept_fraction"])
            style = dict(marker="*", markersize=12) if mechanism == "dense" else dict(marker="o")
            kept = [100 * r["kept_fraction"] for r in rows]
            ax.plot(kept, [value(r) for r in rows], label=mechanism, color=colour[mechanism], **style)
        ax.set_xlabel(f"attention kept at {report['settings']['quality_length']} tokens (% of dense pairs)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    timing = [
        (axes[1, 0], "prefill_ms", "prefill time (ms)"),
        (axes[1, 1], "decode_ms_per_token", "decode time per token (ms)"),
    ]
    for ax, key, ylabel in timing:
        for mechanism, rows in sorted(by_mechanism.items()):
            for i, row in enumerate(rows):
                ax.plot(
                    timed,
                    [row["speed"][str(n)][key] for n in timed],
                    color=colour[mechanism],
                    linestyle=dashes[i % len(dashes)],
                    linewidth=2.5 if mechanism == "dense" else 1.5,
                    marker=".",
                    label=row["label"],
                )
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[1, 0].legend(fontsize=6)
    env = report["environment"]
    title = f"{report['model']} — {env['device']}, torch {env['torch']}, transformers {env['transformers']}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
