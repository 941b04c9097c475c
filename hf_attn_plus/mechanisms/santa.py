"""santa (Stochastic Sparse Attention for memory-bound decode): a decode query reads its sinks and local window
exactly and only a random sample of the other KV entries, drawn with probabilities from a cheap estimate of q·k.

Estimator. Let F be the exact set (sinks + window), R the other visible keys, w_s = exp(τ q·k_s) and π the
proposal over R: π_s ∝ exp(τ q·k̃_s) with k̃ the key quantised to `bits` bits (symmetric, per key). Draw n = `samples`
indices i.i.d. from π; c_s counts the draws of s and a_s = c_s / (n π_s), so E[a_s] = 1 for every s in R. Then

    N̂ = Σ_F w_s v_s + Σ_R a_s w_s v_s,   Ẑ = Σ_F w_s + Σ_R a_s w_s,   output ô = N̂ / Ẑ.

N̂ and Ẑ are unbiased for the dense numerator N and normaliser Z. ô is their ratio (self-normalised importance
sampling): consistent, with bias O(1/n) (first order: E[ô] - o ≈ (o Var(Ẑ) - Cov(N̂, Ẑ)) / Z², o = N / Z the dense
output), which vanishes when π equals the true attention restricted to R. A row whose R has at most `samples` keys
reads R exactly (dense).
In cached decode the quantised keys are a side state of the layer's cache (`QuantizedKeys`: int8 codes and one
scale per key), so a step quantises only its new key and the proposal reads one byte per key element.
Draws come from a counter-based hash of (seed, layer, head, query position, draw), so they are padding- and
batch-invariant and differ at every decode step.

Only decode queries (q_len == 1) sample; prefill and multi-token steps run exact dense attention (with the kernel
backend: the block-sparse kernel over the visible keys). The reference expresses the estimator as a `Selection`
(`estimate`): F as a PositionRule, each distinct drawn key listed once with its log-weight log a_s, run by the
chunked reference as one softmax; per step its work is the proposal's q·k̃ over every key (inherent to π) plus
O(samples), with no visibility mask beyond R. The kernel path (kernels/gathered_attention) makes the same
draws in PyTorch (π still needs q·k̃ for every quantised key) and then reads the full-precision K/V rows of the
sinks, the window and the drawn keys only, each draw listed with its importance log-weight.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..attention import attend_selection, length_beta, use_kernel
from ..chunked_attention import selected_attention
from ..kernel_inputs import attend_kernel, fixed_spans, visibility
from ..masking import AttentionContext
from ..options import int_option
from ..patches.side_cache import SlotBuffer, side_state
from ..registry import Mechanism, register
from ..selection import chunk_visible, counter_uniform, grouped_scores
from ..structure import DENSE, PositionRule, Selection


def quantize_codes(key: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-key quantisation of fp32 keys [..., D] to `bits` <= 8 bits: (int8 codes [..., D], scale [..., 1])."""
    levels = 2 ** (bits - 1) - 1
    scale = key.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(key.dtype).tiny) / levels
    return torch.round(key / scale).to(torch.int8), scale


def quantize(key: torch.Tensor, bits: int) -> torch.Tensor:
    """The dequantised keys: what a low-precision key cache would give back."""
    codes, scale = quantize_codes(key, bits)
    return codes.to(key.dtype) * scale


class QuantizedKeys:
    """The quantised keys of every cache slot as codes and scales, grown by quantising only the keys a call adds; a
    side state of the layer's SideCacheLayer. Dequantising gives exactly `quantize` of all keys."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._codes = SlotBuffer(dim=2)
        self._scales = SlotBuffer(dim=2)

    @property
    def covered(self) -> int:
        return self._codes.length

    def dequantized(self) -> torch.Tensor:
        return self._codes.value.float() * self._scales.value

    def extend(self, keys: torch.Tensor, key_pos: torch.Tensor) -> None:
        codes, scale = quantize_codes(keys.float(), self.bits)
        self._codes.append(codes)
        self._scales.append(scale)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._codes.map_batch(fn)
        self._scales.map_batch(fn)


def quantized_keys(key: torch.Tensor, ctx: AttentionContext, bits: int) -> torch.Tensor:
    """Dequantised keys [B, Hkv, kv, D] fp32: from the layer's side state in cached decode, else quantised now."""
    if ctx.cache_layer is None:
        return quantize(key.float(), bits)
    return side_state(ctx, f"santa:bits={bits}", lambda: QuantizedKeys(bits), key).dequantized()


def exact_rule(opts: SimpleNamespace) -> PositionRule:
    """F: the sinks and the window, read exactly."""
    return PositionRule(sinks=opts.sinks, window=opts.window)


def draws(
    query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace, scaling: float, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling both paths share: (rest R [B, 1, q, kv], sampled [B, 1, q, 1] (R larger than the budget), drawn
    slots [B, Hq, q, samples], proposal π [B, Hq, q, kv] float64). R comes from positions, alongside the proposal's
    q·k̃ of every key (the one O(context) part of a step, inherent to the proposal)."""
    batch, q_heads, q_len, kv_len = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    rest = chunk_visible(ctx, slice(None)) & ~exact_rule(opts).keep(ctx.query_pos, ctx.key_pos)
    sampled = rest.sum(-1, keepdim=True) > opts.samples
    proposal_logits = grouped_scores(query.float(), quantized_keys(key, ctx, opts.bits)) * scaling
    proposal = torch.softmax(proposal_logits.double().masked_fill(~rest, float("-inf")), dim=-1).nan_to_num(0.0)
    cdf = proposal.cumsum(-1)
    heads = ctx.head_index(q_heads, query.device)
    indices = torch.arange(opts.samples, device=query.device)
    u = counter_uniform(opts.seed, layer, heads, ctx.query_pos, indices) * cdf[..., -1:]
    drawn = torch.searchsorted(cdf.contiguous(), u.expand(batch, q_heads, q_len, -1).contiguous(), right=True)
    return rest, sampled, drawn.clamp(max=kv_len - 1), proposal


def rest_slots(rest: torch.Tensor, samples: int) -> torch.Tensor:
    """The slots of R [B, 1, q, kv] in order, [B, 1, q, samples] (-1 unused): what a row whose R fits the budget
    reads exactly, with weight 1."""
    kv_len = rest.shape[-1]
    by_slot = torch.where(rest, torch.arange(kv_len, device=rest.device), kv_len)
    by_slot = F.pad(by_slot, (0, max(0, samples - kv_len)), value=kv_len)
    slots = by_slot.topk(samples, dim=-1, largest=False).values
    return torch.where(slots < kv_len, slots, -1)


def estimate(
    query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace, scaling: float, layer: int
) -> Selection:
    """The estimator as a selection: the rule reads F with weight 1; each distinct drawn key s is listed once with
    log a_s = log(c_s / (n π_s)) (c_s: its draws); a row whose R fits the budget lists R with weight 1."""
    rest, sampled, drawn, proposal = draws(query, key, ctx, opts, scaling, layer)
    drawn = drawn.sort(dim=-1).values
    first = drawn != F.pad(drawn[..., :-1], (1, 0), value=-1)  # the first of each run of equal draws
    run = first.cumsum(-1) - 1
    ones = torch.ones_like(drawn, dtype=proposal.dtype)
    draw_counts = torch.zeros_like(ones).scatter_add_(-1, run, ones)
    log_weights = torch.log(draw_counts.gather(-1, run) / (opts.samples * proposal.gather(-1, drawn)))
    slots = torch.where(sampled, torch.where(first, drawn, -1), rest_slots(rest, opts.samples))
    positions = ctx.key_pos.expand(*slots.shape[:3], -1).gather(-1, slots.clamp(min=0))
    tokens = torch.where(slots >= 0, positions, -1)
    return Selection(exact_rule(opts), tokens=tokens, log_weights=torch.where(sampled & first, log_weights, 0.0).float())


def sampled_slots(
    query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace, scaling: float, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same estimate as listed keys for the gathered-attention kernel: (slots [B, Hq, q, samples] int32, -1
    unused; log-weights [B, Hq, q, samples]). Each draw is listed with log(1 / (n π_s)), so a key drawn c_s times
    adds up to the reference's c_s / (n π_s); a row whose R fits the budget lists R with weight 1."""
    rest, sampled, drawn, proposal = draws(query, key, ctx, opts, scaling, layer)
    log_weights = -torch.log(opts.samples * proposal.gather(-1, drawn))
    slots = torch.where(sampled, drawn, rest_slots(rest, opts.samples))
    return slots.to(torch.int32), torch.where(sampled, log_weights, 0.0).float()


def context_scaled(module: torch.nn.Module, query: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> torch.Tensor:
    """The query with the `logit_scale` option's beta applied, beta counted over every key the query sees (the
    estimate stands for dense attention over them), not over the keys read: logits * beta == (beta * q) . k."""
    beta = length_beta(module, opts)
    if beta is None:
        return query
    return query * beta(chunk_visible(ctx, slice(None)).sum(-1, keepdim=True).float()).to(query.dtype)


def attend(module, query, key, value, ctx, opts, scaling, dropout):
    with_kernel = use_kernel(MECHANISM, opts, query, dropout)
    if query.shape[2] > 1:
        if with_kernel:
            return attend_kernel(query, key, value, ctx, Selection(DENSE), scaling), None
        return attend_selection(module, query, key, value, ctx, Selection(DENSE), opts, scaling, dropout), None
    layer = getattr(module, "layer_idx", 0)
    if with_kernel:
        from ..kernels.gathered_attention.function import gathered_attention

        with torch.no_grad():
            slots, log_weights = sampled_slots(query, key, ctx, opts, scaling, layer)
            spans = fixed_spans(ctx, opts.sinks, opts.window)
        return gathered_attention(query, key, value, visibility(ctx), spans, slots, scaling, log_weights), None
    with torch.no_grad():
        selection = estimate(query, key, ctx, opts, scaling, layer)
    return selected_attention(context_scaled(module, query, ctx, opts), key, value, ctx, selection, scaling, dropout=dropout), None


MECHANISM = register(
    Mechanism(
        name="santa",
        family="stochastic",
        summary="decode: exact sinks/window + importance-sampled other keys (quantised-key proposal); prefill dense",
        options=(
            int_option("samples", 64, 1, "keys drawn (with replacement) per decode query and head beyond sinks/window"),
            int_option("window", 16, 0, "most recent keys read exactly"),
            int_option("sinks", 4, 0, "first real tokens read exactly"),
            int_option("bits", 4, 2, "bits of the quantised keys that give the sampling probabilities", maximum=8),
            int_option("seed", 0, 0, "fixes the draws (with layer, head, position)"),
        ),
        attend=attend,
        attend_has_kernel=True,
        side_cache=True,
    )
)
