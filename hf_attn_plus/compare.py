"""Dense attention vs hf_attn_plus mechanisms on one model and one text: what a mechanism costs and what it buys.

Quality is measured on `samples` windows of the longest context length: perplexity, next-token agreement with
dense (in the prefill, and over cached decode steps fed dense's greedy tokens), and each attention layer's output
error when fed the dense model's inputs (so errors do not compound and each layer is judged on its own). "Keys kept"
is the share of the causal (query, key) pairs the selections keep, counted on the model's own queries and keys over
the quality windows (a mass threshold keeps what the text makes it keep). Retrieval is a needle-in-a-haystack copy
task over the context lengths. Speed and peak memory are measured for prefill and for cached decode at every length
(or at `speed_lengths`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers

from .demo import Subject
from .integration import set_attention
from .attention import observing_selections
from .masking import AttentionContext, build_context
from .structure import Selection, dense_keep, kept_pairs
from .measure import speed
from .options import OptionError
from .registry import PREFIX, all_mechanisms, get_mechanism

DENSE = "dense"

# Settings for the default comparison, sized for contexts of 512 tokens: each keeps roughly 1/8 and 1/4 of the
# causal (query, key) pairs there (the registry defaults are sized for real LLM contexts and would cover a short one entirely).
# A training-free mechanism missing here is compared with its registry defaults.
SWEEP: dict[str, tuple[dict[str, Any], ...]] = {
    "sliding_window": ({"window": 28}, {"window": 60}),
    "topk": ({"budget": 12, "window": 16}, {"budget": 44, "window": 16}),
    "block_topk": ({"block_size": 16, "budget": 1}, {"block_size": 16, "budget": 3}),
    "dilated": ({"window": 8, "dilation": 12}, {"window": 16, "dilation": 5}),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One attention setting to compare: 'dense' or a mechanism name with options."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


_LITERALS = {"None": None, "null": None, "True": True, "true": True, "False": False, "false": False}


def _parse_value(text: str) -> Any:
    if text in _LITERALS:
        return _LITERALS[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str) -> Spec:
    """'topk:budget=64,window=32' -> Spec, validated by the mechanism's option schema (OptionError if invalid)."""
    name, _, rest = text.removeprefix(PREFIX).partition(":")
    if name == DENSE:
        if rest:
            raise OptionError(f"'dense' takes no options, got {rest!r}")
        return Spec(DENSE)
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise OptionError(f"mechanism option {item!r} in {text!r} is not of the form option=value")
        options[key.strip()] = _parse_value(value.strip())
    get_mechanism(name).resolve_options(options)
    return Spec(name, options)


def default_specs(model: torch.nn.Module) -> list[Spec]:
    """Dense, the model's own mechanism if it was converted, and a sweep of every training-free mechanism."""
    specs = [Spec(DENSE)]
    own = getattr(model.config, "_attn_implementation", None) or ""
    if own.startswith(PREFIX):
        specs.append(Spec(own.removeprefix(PREFIX), dict(model.config.hf_attn_plus or {})))
    for mechanism in all_mechanisms():
        if mechanism.training_free:
            specs += [Spec(mechanism.name, dict(o)) for o in SWEEP.get(mechanism.name, ({},))]
    return specs


def apply(model: torch.nn.Module, spec: Spec) -> None:
    if spec.name == DENSE:
        set_attention(model, "sdpa")
    else:
        set_attention(model, spec.name, **spec.options)


def _count_kept(counts: list[int], ctx: AttentionContext, selection: Selection, heads: int) -> None:
    kept, visible = kept_pairs(ctx, selection, heads)
    counts[0] += kept
    counts[1] += visible


def measured_fraction(spec: Spec, counts: Sequence[int], num_layers: int) -> float:
    """Kept share of visible pairs from counts over the selecting layers, with `dense_first` / `dense_last`
    layers (which do not select) counted whole."""
    return _with_dense_layers(get_mechanism(spec.name).resolve_options(spec.options), counts[0] / counts[1], num_layers)


def _with_dense_layers(opts: Any, share: float, num_layers: int) -> float:
    """The share over all layers when the `dense_first` + `dense_last` layers keep every pair and the rest `share`."""
    dense = opts.dense_first + opts.dense_last
    return (dense + (num_layers - dense) * share) / num_layers


def kept_fraction(spec: Spec, length: int, num_layers: int | None = None) -> float | None:
    """Share of the causally visible (query, key) pairs a mechanism attends at `length`, i.e. of dense attention's
    work; None if it is not a key selection. Measured on random queries and keys: for score-based selection this
    counts how many keys are kept, not which. With `num_layers`, the layers `dense_first` / `dense_last` keep dense
    count whole (averaged over the layers)."""
    if spec.name == DENSE:
        return 1.0
    mechanism = get_mechanism(spec.name)
    if mechanism.select is None:
        return None
    opts = mechanism.resolve_options(spec.options)
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 1, 1, length, 16, generator=generator)
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    ctx = build_context(visible)
    share = float(dense_keep(ctx, mechanism.select(query, key, ctx, opts)).sum() / visible.sum())
    return share if num_layers is None else _with_dense_layers(opts, share, num_layers)


# ---------------------------------------------------------------------------------------------------------- quality


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    modules = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not modules:
        raise ValueError(f"no '*.self_attn' attention modules found in {type(model).__name__}")
    return modules


@torch.no_grad()
def _dense_attention_io(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input hidden states, attention output) of every attention module in a dense forward."""
    captured = []

    def hook(module, args, kwargs, output):
        captured.append((kwargs["hidden_states"], output[0]))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _attention_modules(model)]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def _layer_errors(model: torch.nn.Module, ids: torch.Tensor, dense_io: list) -> list[float]:
    """Relative error ||out - dense|| / ||dense|| per layer, each layer fed the dense model's input."""
    errors = []
    modules = _attention_modules(model)

    def make_hooks(inputs: torch.Tensor, reference: torch.Tensor):
        def pre(module, args, kwargs):
            return args, {**kwargs, "hidden_states": inputs}

        def post(module, args, kwargs, output):
            errors.append(float((output[0] - reference).norm() / reference.norm().clamp_min(1e-30)))

        return pre, post

    handles = []
    for module, (inputs, reference) in zip(modules, dense_io):
        pre, post = make_hooks(inputs, reference)
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return errors


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


@torch.no_grad()
def cached_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int, forced: torch.Tensor | None = None):
    """Greedy predictions [B, steps] after `prompt`, decoding with a KV cache. With `forced` [B, steps] the model is
    fed those tokens instead of its own (teacher forcing), so every step is judged on the same history."""
    out = model(prompt, use_cache=True)
    cache, predicted = out.past_key_values, [out.logits[:, -1].argmax(-1)]
    for step in range(steps - 1):
        token = predicted[-1] if forced is None else forced[:, step]
        out = model(token[:, None], past_key_values=cache, use_cache=True)
        predicted.append(out.logits[:, -1].argmax(-1))
    return torch.stack(predicted, 1)


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(float(loss))


# -------------------------------------------------------------------------------------------------------- retrieval

NEEDLE_DEPTHS = (0.1, 0.5, 0.9)


def needle_batch(tokenizer, haystack: torch.Tensor, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of `length` tokens, one per depth: haystack text with "The secret number is N." inserted at that
    depth, ending with the question "The secret number is" followed by N. Returns (ids [D, length], bool mask of
    the answer positions [D, length]). Scoring predicts the answer tokens teacher-forced."""
    rng = random.Random(seed)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows, answer_masks = [], []
    for depth in NEEDLE_DEPTHS:
        number = str(rng.randrange(10000, 100000))
        needle = encode(f"\nThe secret number is {number}.\n")
        question = encode("\n# The secret number is")
        answer = encode(f" {number}")
        filler = length - len(needle) - len(question) - len(answer)
        if filler < 1:
            raise ValueError(
                f"context length {length} is too short for the needle test: it needs more than "
                f"{length - filler} tokens with this tokenizer; pass larger --lengths"
            )
        cut = int(filler * depth)
        hay = haystack[:filler].tolist()
        rows.append(hay[:cut] + needle + hay[cut:] + question + answer)
        answer_masks.append([False] * (length - len(answer)) + [True] * len(answer))
    return torch.tensor(rows), torch.tensor(answer_masks)


@torch.no_grad()
def needle_score(model: torch.nn.Module, ids: torch.Tensor, answer: torch.Tensor) -> float:
    """Share of answer tokens the model predicts (greedy, teacher-forced); 1.0 = perfect retrieval."""
    predicted = model(ids).logits[:, :-1].argmax(-1)
    return float((predicted == ids[:, 1:])[answer[:, 1:]].float().mean())


# ------------------------------------------------------------------------------------------------------- the report


def compare(
    subject: Subject,
    specs: Sequence[Spec],
    lengths: Sequence[int] = (128, 256, 512),
    samples: int = 2,
    decode_tokens: int = 16,
    repeats: int = 2,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    speed_lengths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run every spec on the same windows of `subject.text`; returns the JSON-ready report (see module docstring).
    `on_result(report)` gets the report of the specs measured so far after each one (hours-long sweeps keep what
    finished). `speed_lengths`: where to time prefill and decode (default `lengths`; empty: quality only, for
    sweeps whose timing at full length would cost more than their quality passes)."""
    from tqdm.auto import tqdm

    if decode_tokens < 2:
        raise ValueError(f"decode_tokens must be >= 2 (one prefill prediction, then decode steps), got {decode_tokens}")
    device = torch.device(device)
    model = subject.model.to(device)
    lengths = sorted(set(lengths))
    speed_lengths = lengths if speed_lengths is None else sorted(set(speed_lengths))
    quality_length = lengths[-1]
    stream = torch.tensor(subject.tokenizer(subject.text, add_special_tokens=False)["input_ids"])
    needed = (samples + 1) * quality_length
    if stream.numel() < needed:
        raise ValueError(
            f"the text has {stream.numel()} tokens; {needed} are needed for {samples} samples of {quality_length} "
            "plus a haystack: pass a longer --data file or smaller --lengths/--samples"
        )
    windows = stream[: samples * quality_length].view(samples, quality_length).to(device)
    haystack = stream[samples * quality_length :]
    needles = {n: needle_batch(subject.tokenizer, haystack, n, seed=n) for n in lengths}
    specs = [Spec(DENSE), *(s for s in specs if s.name != DENSE)]  # dense first: the others are measured against it

    settings = {
        "lengths": lengths,
        "speed_lengths": speed_lengths,
        "quality_length": quality_length,
        "samples": samples,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "needle_depths": list(NEEDLE_DEPTHS),
        "text_tokens": int(stream.numel()),
    }
    original = model.config._attn_implementation, model.config.hf_attn_plus
    results = []
    steps = len(specs) * (2 + len(lengths) + len(speed_lengths))
    bar = tqdm(total=steps, desc="compare", disable=None if progress is None else not progress)  # None: on a tty
    try:
        for spec in specs:
            bar.set_postfix_str(spec.label)
            apply(model, spec)
            counts = [0, 0]  # kept, visible (query, key) pairs over every layer's selection on this text
            with observing_selections(functools.partial(_count_kept, counts)):
                logits = _logits(model, windows)
            if spec.name == DENSE:
                dense_logits, dense_io = logits, _dense_attention_io(model, windows)
                dense_tokens = cached_decode(model, windows, decode_tokens)
                errors = [0.0] * len(dense_io)
            else:
                errors = _layer_errors(model, windows, dense_io)
            decoded = cached_decode(model, windows, decode_tokens, forced=dense_tokens)
            bar.update(2)
            row: dict[str, Any] = {
                "label": spec.label,
                "mechanism": spec.name,
                "options": spec.options,
                # What the selections kept on this text in the prefill (data-dependent for block_sparse's threshold);
                # settings that do not select in the prefill (apply_to='decode') report their decode-time share.
                "kept_fraction": (
                    measured_fraction(spec, counts, model.config.num_hidden_layers)
                    if counts[1] else kept_fraction(spec, quality_length, model.config.num_hidden_layers)
                ),
                "kept_measured": bool(counts[1]),
                "perplexity": _perplexity(logits, windows),
                "agreement": float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()),
                # Decode steps only (the first prediction comes from the prefill): mechanisms that differ from dense
                # only when decoding from a cache show it here.
                "decode_agreement": float((decoded == dense_tokens)[:, 1:].float().mean()),
                "layer_error": errors,
                "needle": {},
                "speed": {},
            }
            for n in lengths:
                ids, answer = needles[n]
                row["needle"][str(n)] = needle_score(model, ids.to(device), answer.to(device))
                bar.update(1)
            for n in speed_lengths:
                row["speed"][str(n)] = speed(model, stream[:n][None].to(device), decode_tokens, repeats)
                bar.update(1)
            results.append(row)
            if on_result is not None:
                on_result(_report(subject, device, settings, results))
    finally:
        bar.close()
        model.set_attn_implementation(original[0])
        model.config.hf_attn_plus = original[1]
    return _report(subject, device, settings, results)


def _report(subject: Subject, device: torch.device, settings: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    dense_ppl = results[0]["perplexity"]
    for row in results:
        row["perplexity_delta"] = row["perplexity"] - dense_ppl
    return {"model": subject.name, "environment": environment(device), "settings": settings, "results": results}


def environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table: one row per spec, quality at the longest length, speed at the longest timed length (no
    speed columns when nothing was timed)."""
    settings = report["settings"]
    timed = settings.get("speed_lengths", settings["lengths"])  # reports written before speed_lengths existed
    head = [
        "attention",
        "keys kept",
        "ppl",
        "Δppl",
        "agree",
        "decode agree",
        "attn err (mean/max)",
        "needle " + "/".join(str(x) for x in settings["lengths"]),
    ]
    if timed:
        n = timed[-1]
        head += [f"prefill ms @{n}", f"decode ms/tok @{n}", f"prefill MB @{n}"]
    rows = []
    for r in report["results"]:
        errors = r["layer_error"]
        rows.append(
            [
                r["label"],
                "n/a" if r["kept_fraction"] is None else f"{r['kept_fraction']:.0%}",
                f"{r['perplexity']:.2f}",
                f"{r['perplexity_delta']:+.2f}",
                f"{r['agreement']:.1%}",
                f"{r['decode_agreement']:.1%}",
                f"{statistics.mean(errors):.3f}/{max(errors):.3f}",
                "/".join(f"{r['needle'][str(x)]:.2f}" for x in settings["lengths"]),
            ]
        )
        if timed:
            s = r["speed"][str(n)]
            rows[-1] += [f"{s['prefill_ms']:.1f}", f"{s['decode_ms_per_token']:.2f}", f"{s['prefill_peak_mb']:.1f}"]
    return markdown_table(head, rows)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
