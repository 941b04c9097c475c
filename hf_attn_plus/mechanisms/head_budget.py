"""head_budget (Budgeted Attention Allocation): per-head gates g_h(b) in [0, 1] conditioned on a requested budget b,
around any mechanism (`inner` with `inner_options`; 'dense' by default):

    g_h(b) = clamp((1 - (1 - b) * softplus(theta_h)) / ramp, 0, 1),   output of head h = g_h(b) * inner output of head h.

- b = 1 gives g = 1 for every head: exactly the ungated mechanism.
- Monotone by construction: g_h is non-decreasing in b for any theta, so a lower budget never enables a head that a
  higher budget disabled. Head h is off (g = 0) for b <= 1 - 1/softplus(theta_h): the steepest heads go first.
theta (one per query head and layer, `attn_plus.steepness`; softplus(theta) = 1 at initialisation, i.e. g = b) is
learned by the recipes: the language-modelling loss at sampled budgets plus a cost term `expected_cost(model, b)`.

Equivalently g_h(b) = clamp((b - t_h) / (ramp * (1 - t_h)), 0, 1) with the head's threshold t_h = 1 -
1/softplus(theta_h): the gate rises linearly from 0 at b = t_h to 1 at b = t_h + ramp * (1 - t_h) (at b = 1 with
the default ramp 1). A head is on for b > t_h whatever the ramp; the ramp sets how fast it then reaches full
strength. With the default every gate at budget b is at most b unless its threshold is below 0.

What a head costs is whether it runs, not how much its output is scaled, so the cost counts heads computed. That count
has no gradient, so training relaxes it the hard-concrete way (Louizos et al. 2018, L0 gates; Voita et al. 2019 for
attention heads): with `set_gate_noise(model, s)` and the model in training mode, each KV group's thresholds move by
one logistic draw of scale s (in budget units, shared by the group's heads) before the clamp. A group then runs with
probability sigmoid((b - min_h t_h) / s), differentiable and equally sharp at every budget, and the forward sees groups
switched fully off. Evaluation (and s = 0) is deterministic: exactly the formula above.

Learned thresholds bunch (on SmolLM2 most fell between 0.64 and 0.73), which makes the share computed a step in b.
`spread_thresholds(model)` projects them onto an even budget axis in their learned order, so that the exact gates at
any b compute within one KV group of b; the recipes can apply it after every optimizer step. Spread thresholds are
all >= 0, so with ramp 1 every gate at b is at most b (measured on SmolLM2 after 100 steps: ppl 21,800 at b = 0.5,
mean gate 0.08): a small ramp lets a group that is on run at nearly full strength (with ramp 0.1 the same run
gives 735 at b = 0.5: 100 LoRA steps do not teach SmolLM2 to lose half its KV groups).

Heads with g = 0 output zeros, unless option `fallback` names a mechanism without weights: then head h outputs
g_h * inner + (1 - g_h) * fallback. With inner 'dense' and a sliding-window fallback this is DuoAttention (Xiao et
al. 2024): retrieval heads read every key, streaming heads sinks and a window, and the budget is the share of KV
groups that read everything; budget 0 is the fallback exactly. A KV group whose query heads are all off does not run
the inner mechanism, and one whose gates are all 1 does not run the fallback: each runs on the other groups' heads only
(told their model indices, so per-head random draws do not change). Gathering those
heads copies their K/V, so in memory-bound decode the saving is smaller than the share of heads skipped. With a
fallback that evicts (`sliding_window` with evict=True) cached inference also keeps only its sinks and window of the
KV groups whose gates are all 0 (`evicted_groups`, patches/streaming_cache.GroupEvictingLayer): DuoAttention's
decode memory; those groups then read the fallback from there.

An inner mechanism with weights of its own (linear, hybrid, gated_delta, momentum_delta, indexer_topk) keeps them
beside the gates, as `attn_plus.inner`, and sees them as its layer's `attn_plus`; the attention hooks serve them (decode
state, hidden states). Those weights are per head and their decode state covers every head, so such an inner
mechanism runs on all heads and gated-off heads are only zeroed.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import run_delegate
from ..masking import context_of_evicting_layer
from ..options import Option, OptionError, float_option
from ..patches.attn_plus import (
    MODEL_FEATURES,
    AttentionShape,
    MechanismWeights,
    caches_latent,
    mechanism_weights,
    register_weights,
    runs_in,
    unwrapped,
    weights_class,
)
from ..patches.streaming_cache import GroupEvictingLayer
from ..registry import Mechanism, delegate, mechanism_option, register


@register_weights
class HeadGateWeights(MechanismWeights):
    """One layer's gate steepness theta_h per query head, and the inner mechanism's own weights if it has any."""

    mechanism = "head_budget"
    # The gates scale whatever the inner mechanism computes; inner weights, when there are any, decide (`hooked`).
    honours = frozenset(MODEL_FEATURES)

    def __init__(self, shape: AttentionShape, opts: SimpleNamespace, layer_idx: int) -> None:
        super().__init__(shape, opts, layer_idx)
        self.steepness = nn.Parameter(torch.empty(shape.q_heads))
        self.gate_noise = 0.0  # the training relaxation's scale (set_gate_noise); not a weight, never saved
        inner_weights = weights_class(opts.inner)
        inner_opts = None if inner_weights is None else delegate("head_budget", opts.inner, opts.inner_options)[1]
        self.inner = None if inner_weights is None else inner_weights(shape, inner_opts, layer_idx)
        HeadGateWeights.reset_parameters(self)

    def hooked(self) -> MechanismWeights:
        return self if self.inner is None else self.inner

    def fits(self, opts: SimpleNamespace) -> bool:
        if opts.inner != self.opts.inner:
            return False
        return self.inner is None or self.inner.fits(delegate("head_budget", opts.inner, opts.inner_options)[1])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.steepness.fill_(math.log(math.e - 1))  # softplus = 1: every gate starts at g = b

    def forward(self, budget: float | None, *inner_args: Any, ramp: float = 1.0, open_probability: bool = False,
                exact: bool = False) -> Any:
        """g_h(budget), [Hq], at option `ramp` (with `open_probability`, P(each KV group runs), [Hkv], `exact` as in
        group_open_probability; the ramp does not change it); with budget None, the inner
        weights' forward(*inner_args). Everything goes through forward so that adapters PEFT wrapped around the whole
        `attn_plus` (modules_to_save) answer with their trained copy."""
        if budget is None:
            return self.inner(*inner_args)
        if open_probability:
            return self.group_open_probability(budget, exact)
        slope = F.softplus(self.steepness)  # 1 / (1 - t_h)
        pre = 1 - (1 - budget) * slope
        if self.training and self.gate_noise > 0 and budget < 1:
            u = torch.rand(self.shape.kv_heads, 1, device=pre.device).clamp(1e-6, 1 - 1e-6)
            shift = (u.log() - (-u).log1p()) * self.gate_noise  # logistic, one per KV group: t_h -> t_h + shift
            pre = pre - (shift * slope.view(self.shape.kv_heads, -1)).flatten()
        return (pre / ramp).clamp(0.0, 1.0)

    def thresholds(self) -> torch.Tensor:
        """t_h, [Hq]: head h is off for budgets b <= t_h."""
        return 1 - 1 / F.softplus(self.steepness)

    def group_open_probability(self, budget: float, exact: bool = False) -> torch.Tensor:
        """P(a KV group runs) at `budget`, [Hkv]: under the training relaxation sigmoid((b - lowest t) / s),
        otherwise (or with `exact`) 0 or 1 (a group runs when one of its gates is above 0, i.e. b > its lowest
        threshold)."""
        margin = budget - self.thresholds().view(self.shape.kv_heads, -1).amin(dim=1)
        if exact or self.gate_noise <= 0 or budget >= 1:
            return (margin > 0).to(margin.dtype)
        return torch.sigmoid(margin / self.gate_noise)


class InnerWeights:
    """`attn_plus` as an inner mechanism with weights sees it: calls reach the inner weights through the layer's own,
    possibly PEFT-wrapped, `attn_plus`; `original_module` lets `unwrapped` find the inner weights the hooks serve."""

    def __init__(self, attn_plus: nn.Module, inner: MechanismWeights | None) -> None:
        self._attn_plus = attn_plus
        self.original_module = inner

    def __call__(self, *args: Any) -> Any:
        return self._attn_plus(None, *args)


class InnerAttention:
    """The attention module as an inner mechanism with weights sees it: everything of `module`, but its own weights
    (kept beside the gates) as `attn_plus`."""

    def __init__(self, module: nn.Module, weights: InnerWeights) -> None:
        self._module = module
        self.attn_plus = weights

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def attend(module, query, key, value, ctx, opts, scaling, dropout):
    gate_weights = mechanism_weights(module, "head_budget")  # a clear error when the layer has no gates
    gates = module.attn_plus(opts.budget, ramp=opts.ramp)  # through any adapter PEFT wrapped around the weights
    if isinstance(ctx.cache_layer, GroupEvictingLayer):
        return _attend_split_cache(ctx.cache_layer, gate_weights, gates, module, query, key, value, ctx, opts, scaling, dropout)
    return _attend_gated(gate_weights, gates, module, query, key, value, ctx, opts, scaling, dropout)


def _attend_gated(gate_weights, gates, module, query, key, value, ctx, opts, scaling, dropout):
    """g * inner + (1 - g) * fallback for the heads of `query` (gates [Hq] of those heads), on keys every head sees."""
    if weights_class(opts.inner) is not None:  # per-head weights and state: every head runs
        inner_module = InnerAttention(module, InnerWeights(module.attn_plus, gate_weights.inner))
        inner_heads = torch.ones_like(gates, dtype=torch.bool)
    else:
        # A gate clamped to 0 passes no gradient, so skipping its group changes neither outputs nor gradients (at
        # the kink, g = 0 exactly, the skipped head's subgradient is 0).
        inner_module, inner_heads = module, gates > 0
    out, probs = _run_on_groups(
        opts.inner, opts.inner_options, opts, inner_heads, inner_module, query, key, value, ctx, scaling, dropout
    )
    out = out * gates.view(1, -1, 1, 1).to(out.dtype)
    if opts.fallback == "none":
        return out, probs
    rest, _ = _run_on_groups(
        opts.fallback, opts.fallback_options, opts, gates < 1, module, query, key, value, ctx, scaling, dropout
    )
    # Heads mix two mechanisms, so no single attention-weight tensor describes them.
    return out + rest * (1 - gates).view(1, -1, 1, 1).to(rest.dtype), None


def _attend_split_cache(layer, gate_weights, gates, module, query, key, value, ctx, opts, scaling, dropout):
    """Cached inference with per-group eviction: `key` / `value` hold the kept groups only (every key), the evicted
    groups' sinks and window are in `layer.streaming`; their gates are 0, so they output the fallback."""
    group = query.shape[1] // layer.evicted.numel()
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    kept = _heads_of(layer.kept_groups.to(query.device), group)
    if kept.numel():
        kept_ctx = dataclasses.replace(ctx, query_heads=_named(ctx, kept), cache_layer=None)
        out_kept, _ = _attend_gated(gate_weights, gates[kept], module, query[:, kept], key, value, kept_ctx, opts, scaling, dropout)
        out = out.index_copy(1, kept, out_kept.to(out.dtype))
    evicted = _heads_of(layer.evicted_groups.to(query.device), group)
    stream_ctx = dataclasses.replace(context_of_evicting_layer(ctx, layer.streaming), query_heads=_named(ctx, evicted))
    out_evicted, _ = run_delegate(
        "head_budget", opts.fallback, opts.fallback_options, opts, module, query[:, evicted],
        layer.streaming.keys, layer.streaming.values, stream_ctx, scaling, dropout,
    )
    return out.index_copy(1, evicted, out_evicted.to(out.dtype)), None


def _heads_of(groups: torch.Tensor, group: int) -> torch.Tensor:
    """Query head indices of KV `groups` ([n] long), `group` query heads each."""
    return (groups[:, None] * group + torch.arange(group, device=groups.device)).flatten()


def _named(ctx, heads: torch.Tensor) -> torch.Tensor:
    """The model's indices of the call's query heads `heads`."""
    return heads if ctx.query_heads is None else ctx.query_heads.to(heads.device)[heads]


def evicted_groups(module: nn.Module, opts: SimpleNamespace) -> tuple[torch.Tensor, int, int] | None:
    """DuoAttention's decode memory: KV groups whose gates are all 0 at the budget read only the fallback's keys, so
    with a fallback that evicts (`sliding_window` with evict=True) cached inference keeps only its sinks and window of
    them. None when no group is off, the fallback keeps every key, or the inner mechanism's weights need every head."""
    if opts.fallback == "none" or weights_class(opts.inner) is not None or not runs_in(opts, module):
        return None
    fallback, fallback_opts = delegate("head_budget", opts.fallback, opts.fallback_options)
    kept = fallback.kept_keys(fallback_opts) if fallback.kept_keys else None
    if kept is None:
        return None
    if caches_latent(module):
        raise ValueError(
            f"hf_attn_plus head_budget: fallback_options evict=True keeps some KV groups' keys only, but "
            f"{type(module).__name__} caches one MLA latent per token for every head; allowed here: evict=False"
        )
    with torch.no_grad():
        gates = module.attn_plus(opts.budget, ramp=opts.ramp)
    off = ~(gates > 0).view(mechanism_weights(module, "head_budget").shape.kv_heads, -1).any(dim=1)
    return (off, *kept) if bool(off.any()) else None


def _run_on_groups(name, options, common, heads, module, query, key, value, ctx, scaling, dropout):
    """Mechanism `name` on the KV groups holding one of `heads` ([Hq] bool) only: output [B, Hq, q, Dv] with zeros
    for the heads of the other groups, and its attention weights (None when it has none). The heads that run are
    told their model indices (ctx.query_heads), so per-head random draws do not depend on which groups run."""
    q_heads, kv_heads = query.shape[1], key.shape[1]
    group = q_heads // kv_heads
    groups_on = heads.view(kv_heads, group).any(dim=1)
    if bool(groups_on.all()):
        return run_delegate("head_budget", name, options, common, module, query, key, value, ctx, scaling, dropout)
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    kv_on = groups_on.nonzero().flatten()
    if not kv_on.numel():
        return out, None
    heads_on = _heads_of(kv_on, group)
    out_on, probs_on = run_delegate(
        "head_budget", name, options, common, module, query[:, heads_on], key[:, kv_on], value[:, kv_on],
        dataclasses.replace(ctx, query_heads=_named(ctx, heads_on)), scaling, dropout,
    )
    out = out.index_copy(1, heads_on, out_on.to(out.dtype))
    if probs_on is None:
        return out, None
    probs = probs_on.new_zeros(probs_on.shape[0], q_heads, *probs_on.shape[2:])
    return out, probs.index_copy(1, heads_on, probs_on)


def expected_cost(model: nn.Module, budget: float, exact: bool = False) -> torch.Tensor:
    """Expected share of query heads computed at `budget`, over layers: a KV group's heads all run or none does, so
    this is the mean over groups of P(group runs). Differentiable under the training relaxation (set_gate_noise);
    with no noise or with `exact`, the share the deterministic gates compute (what evaluation runs; no gradient). An inner mechanism with weights runs every head (only
    zeroing gated-off ones): there the share is of heads kept, not of compute saved."""
    return torch.cat([gates(budget, open_probability=True, exact=exact) for gates in _gate_weights(model)]).mean()


def head_gates(model: nn.Module, budget: float, ramp: float = 1.0) -> torch.Tensor:
    """Every layer's gates at `budget` and option `ramp`, concatenated."""
    return torch.cat([gates(budget, ramp=ramp) for gates in _gate_weights(model)])


@torch.no_grad()
def spread_thresholds(model: nn.Module) -> None:
    """Put the model's KV groups evenly on the budget axis, keeping the order training gave them: the group with the
    r-th lowest threshold (its lowest head's, of G groups over all layers) moves to (r + 1) / (G + 1), and each of its
    heads' thresholds maps affinely from [the group's lowest, 1) onto [that, 1). Afterwards the exact gates at any
    budget b compute a share of KV groups within 1/G of b. Learned thresholds alone bunch (measured on SmolLM2:
    most between 0.64 and 0.73), so the share computed is a step in b that no cost on it can hold; the recipes apply
    this after every optimizer step (`head_budget.spread_thresholds`), so training sees the gates evaluation runs."""
    layers = _gate_weights(model)  # the copies that answer, so an adapter's trained gates are the ones moved
    thresholds = [gates.thresholds().view(gates.shape.kv_heads, -1) for gates in layers]
    lowest = torch.cat([t.amin(dim=1) for t in thresholds])
    count = lowest.numel()
    rank = torch.empty_like(lowest).scatter_(0, lowest.argsort(stable=True), torch.arange(count, dtype=lowest.dtype))
    placed = ((rank + 1) / (count + 1)).split([t.shape[0] for t in thresholds])
    for gates, t, new_lowest in zip(layers, thresholds, placed):
        old_lowest, new_lowest = t.amin(dim=1, keepdim=True), new_lowest[:, None]
        moved = new_lowest + (t - old_lowest) * (1 - new_lowest) / (1 - old_lowest)
        slope = 1 / (1 - moved.flatten())  # softplus(theta) = 1 / (1 - t)
        gates.steepness.copy_(slope + torch.log(-torch.expm1(-slope)))  # softplus's inverse


def set_gate_noise(model: nn.Module, scale: float) -> None:
    """The training relaxation's logistic scale on every layer's gates (0 = deterministic gates in training too)."""
    if scale < 0:
        raise ValueError(f"gate noise scale got {scale}; allowed: a number >= 0")
    for gates in model.modules():
        if isinstance(gates, HeadGateWeights):  # the adapter's trained copies (modules_to_save) too
            gates.gate_noise = float(scale)


def _gate_weights(model: nn.Module) -> list[nn.Module]:
    """Each layer's `attn_plus` holding gates, to be called (not read), so an adapter's trained copy (PEFT
    modules_to_save) is the one that answers."""
    found = [m.attn_plus for m in model.modules() if isinstance(unwrapped(getattr(m, "attn_plus", None)), HeadGateWeights)]
    if not found:
        raise ValueError("the model has no head_budget gates: load it with attn_implementation 'hf_attn_plus:head_budget'")
    return found


def _check(opts: SimpleNamespace) -> None:
    if opts.fallback != "none":
        delegate("head_budget", opts.fallback, opts.fallback_options)  # a bad fallback option is named up front
    elif opts.fallback_options:
        raise OptionError(
            f"hf_attn_plus mechanism 'head_budget': fallback_options={opts.fallback_options!r} with fallback 'none'; "
            "allowed: fallback_options only with a fallback mechanism"
        )


MECHANISM = register(
    Mechanism(
        name="head_budget",
        family="learned",
        summary="learned per-head gates, monotone in a requested budget, around any mechanism",
        options=(
            float_option("budget", 1.0, 0.0, "requested share of compute; 1 is the ungated mechanism", maximum=1.0),
            float_option(
                "ramp", 1.0, 0.0, "share of the way from a head's threshold to budget 1 over which its gate rises to 1",
                maximum=1.0, above=True,
            ),
            mechanism_option("inner", "head_budget", "the mechanism whose heads are gated"),
            Option("inner_options", {}, "a dict of the inner mechanism's options", lambda v: isinstance(v, dict)),
            mechanism_option(
                "fallback", "head_budget",
                "what a head computes for the rest of its gate: g * inner + (1 - g) * fallback (DuoAttention's "
                "streaming heads: a sliding window); 'none' = zeros, and a group whose gates are all 0 costs nothing",
                default="none",
                # A fallback with weights would need a second set of them beside the inner mechanism's.
                qualifies=lambda name: weights_class(name) is None,
                qualification="without weights of its own",
            ),
            Option("fallback_options", {}, "a dict of the fallback mechanism's options", lambda v: isinstance(v, dict)),
        ),
        check=_check,
        attend=attend,
        evicted_groups=evicted_groups,
        training_free=False,
    )
)
