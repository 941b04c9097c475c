"""head_budget (Budgeted Attention Allocation): per-head gates g_h(b) in [0, 1] conditioned on a requested budget b,
around any mechanism (`inner` with `inner_options`; 'dense' by default):

    g_h(b) = clamp(1 - (1 - b) * softplus(theta_h), 0, 1),   output of head h = g_h(b) * inner output of head h.

- b = 1 gives g = 1 for every head: exactly the ungated mechanism.
- Monotone by construction: g_h is non-decreasing in b for any theta, so a lower budget never enables a head that a
  higher budget disabled. Head h is off (g = 0) for b <= 1 - 1/softplus(theta_h): the steepest heads go first.
theta (one per query head and layer, `attn_plus.steepness`; softplus(theta) = 1 at initialisation, i.e. g = b) is
learned by the recipes: the language-modelling loss at sampled budgets plus a cost term `expected_cost(model, b)`.

Heads with g = 0 output zeros. A KV group whose query heads are all off is not computed: the inner mechanism runs on
the other groups' heads only (told their model indices, so per-head random draws do not change). Gathering those
heads copies their K/V, so in memory-bound decode the saving is smaller than the share of heads skipped.

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
from ..options import Option, float_option
from ..patches.attn_plus import (
    MODEL_FEATURES,
    AttentionShape,
    MechanismWeights,
    mechanism_weights,
    register_weights,
    unwrapped,
    weights_class,
)
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

    def forward(self, budget: float | None, *inner_args: Any) -> Any:
        """g_h(budget), [Hq]; with budget None, the inner weights' forward(*inner_args), so that adapters PEFT wrapped
        around the whole `attn_plus` (modules_to_save) reach the inner weights too."""
        if budget is None:
            return self.inner(*inner_args)
        return (1 - (1 - budget) * F.softplus(self.steepness)).clamp(0.0, 1.0)


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
    gates = module.attn_plus(opts.budget)  # through any adapter PEFT wrapped around the weights
    if weights_class(opts.inner) is not None:  # per-head weights and state: every head runs
        out, probs = run_delegate(
            "head_budget", opts.inner, opts.inner_options, opts,
            InnerAttention(module, InnerWeights(module.attn_plus, gate_weights.inner)),
            query, key, value, ctx, scaling, dropout,
        )
        return out * gates.view(1, -1, 1, 1).to(out.dtype), probs
    q_heads, kv_heads = query.shape[1], key.shape[1]
    # A KV group runs only when one of its query heads is on. A gate clamped to 0 passes no gradient, so skipping
    # changes neither outputs nor gradients (at the kink, g = 0 exactly, the skipped head's subgradient is 0).
    groups_on = (gates > 0).view(kv_heads, q_heads // kv_heads).any(dim=1)
    if bool(groups_on.all()):
        out, probs = run_delegate(
            "head_budget", opts.inner, opts.inner_options, opts, module, query, key, value, ctx, scaling, dropout
        )
        return out * gates.view(1, -1, 1, 1).to(out.dtype), probs
    kv_on = groups_on.nonzero().flatten()
    group = q_heads // kv_heads
    heads_on = (kv_on[:, None] * group + torch.arange(group, device=kv_on.device)).flatten()
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    probs = None
    if heads_on.numel():
        named = heads_on if ctx.query_heads is None else ctx.query_heads.to(heads_on.device)[heads_on]
        out_on, probs_on = run_delegate(
            "head_budget", opts.inner, opts.inner_options, opts, module, query[:, heads_on], key[:, kv_on],
            value[:, kv_on], dataclasses.replace(ctx, query_heads=named), scaling, dropout,
        )
        out = out.index_copy(1, heads_on, out_on.to(out.dtype))
        if probs_on is not None:
            probs = probs_on.new_zeros(probs_on.shape[0], q_heads, *probs_on.shape[2:])
            probs = probs.index_copy(1, heads_on, probs_on)
    return out * gates.view(1, -1, 1, 1).to(out.dtype), probs


def expected_cost(model: nn.Module, budget: float) -> torch.Tensor:
    """Mean gate over heads and layers at `budget` (differentiable): the share of heads' attention still computed."""
    return head_gates(model, budget).mean()


def head_gates(model: nn.Module, budget: float) -> torch.Tensor:
    """Every layer's gates at `budget`, concatenated. Gates are read through each layer's `attn_plus`, so an
    adapter's trained copy (modules_to_save) is the one used."""
    gates = [
        m.attn_plus(budget) for m in model.modules()
        if isinstance(unwrapped(getattr(m, "attn_plus", None)), HeadGateWeights)
    ]
    if not gates:
        raise ValueError("the model has no head_budget gates: load it with attn_implementation 'hf_attn_plus:head_budget'")
    return torch.cat(gates)


MECHANISM = register(
    Mechanism(
        name="head_budget",
        family="learned",
        summary="learned per-head gates, monotone in a requested budget, around any mechanism",
        options=(
            float_option("budget", 1.0, 0.0, "requested share of compute; 1 is the ungated mechanism", maximum=1.0),
            mechanism_option("inner", "head_budget", "the mechanism whose heads are gated"),
            Option("inner_options", {}, "a dict of the inner mechanism's options", lambda v: isinstance(v, dict)),
        ),
        attend=attend,
        training_free=False,
    )
)
