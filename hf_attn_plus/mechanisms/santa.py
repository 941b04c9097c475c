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
backend: the block-sparse kernel over the visible keys). The reference computes q·k for every key and expresses the
estimator as log-weights log a_s inside one softmax. The kernel path (kernels/gathered_attention) makes the same
draws in PyTorch (π still needs q·k̃ for every quantised key) and then reads the full-precision K/V rows of the
sinks, the window and the drawn keys only, each draw listed with its importance log-weight.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..attention import attend_selection, logit_scale, use_kernel
from ..kernel_inputs import attend_kernel, fixed_spans, visibility
from ..masking import AttentionContext
from ..options import int_option
from ..patches.side_cache import SlotBuffer, side_state
from ..reference import masked_attention
from ..registry import Mechanism, register
from ..selection import counter_uniform, grouped_scores, sinks_and_window
from ..structure import DENSE, Selection


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


def draws(
    query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace, scaling: float, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling both paths share: (exact [B, 1, q, kv], rest R [B, 1, q, kv], sampled [B, 1, q, 1] (R larger than
    the budget), drawn slots [B, Hq, q, samples], proposal π [B, Hq, q, kv] float64)."""
    batch, q_heads, q_len, kv_len = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    exact = sinks_and_window(ctx, opts.sinks, opts.window)
    rest = ctx.visible & ~exact
    sampled = rest.sum(-1, keepdim=True) > opts.samples
    proposal_logits = grouped_scores(query.float(), quantized_keys(key, ctx, opts.bits)) * scaling
    proposal = torch.softmax(proposal_logits.double().masked_fill(~rest, float("-inf")), dim=-1).nan_to_num(0.0)
    cdf = proposal.cumsum(-1)
    heads = ctx.head_index(q_heads, query.device)
    indices = torch.arange(opts.samples, device=query.device)
    u = counter_uniform(opts.seed, layer, heads, ctx.query_pos, indices) * cdf[..., -1:]
    drawn = torch.searchsorted(cdf.contiguous(), u.expand(batch, q_heads, q_len, -1).contiguous(), right=True)
    return exact, rest, sampled, drawn.clamp(max=kv_len - 1), proposal


def importance_log_weights(
    query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace, scaling: float, layer: int
) -> torch.Tensor:
    """log a_s [B, Hq, q, kv]: 0 on exactly read keys, log(c_s / (n π_s)) on drawn keys, -inf elsewhere."""
    exact, rest, sampled, drawn, proposal = draws(query, key, ctx, opts, scaling, layer)
    counts = torch.zeros_like(proposal).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=proposal.dtype))
    weights = counts / (opts.samples * proposal)
    weights = torch.where(rest & sampled, weights, (exact | rest).to(weights.dtype))
    return weights.log().float()


def sampled_slots(
    query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace, scaling: float, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same estimate as listed keys for the gathered-attention kernel: (slots [B, Hq, q, samples] int32, -1
    unused; log-weights [B, Hq, q, samples]). Each draw is listed with log(1 / (n π_s)), so a key drawn c_s times
    adds up to the reference's c_s / (n π_s); a row whose R fits the budget lists R with weight 1."""
    _, rest, sampled, drawn, proposal = draws(query, key, ctx, opts, scaling, layer)
    kv_len = key.shape[2]
    log_weights = -torch.log(opts.samples * proposal.gather(-1, drawn))
    by_slot = torch.where(rest, torch.arange(kv_len, device=key.device), kv_len)
    by_slot = F.pad(by_slot, (0, max(0, opts.samples - kv_len)), value=kv_len)
    rest_slots = by_slot.topk(opts.samples, dim=-1, largest=False).values
    slots = torch.where(sampled, drawn, torch.where(rest_slots < kv_len, rest_slots, -1))
    return slots.to(torch.int32), torch.where(sampled, log_weights, 0.0).float()


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
        log_weights = importance_log_weights(query, key, ctx, opts, scaling, layer)
    beta = logit_scale(module, ctx.visible, opts)
    return masked_attention(query, key, value, log_weights > float("-inf"), scaling, beta, dropout, log_weights)


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
