"""stochastic_routing (Stochastic Attention, connectome-inspired): every query attends to a sparse random
small-world graph: its local window (plus optional sinks) and `links` random long-range keys per query head, drawn
uniformly without replacement from the keys beyond the window. Few links per token still connect any two tokens
in few hops across layers.

The draw is counter-based and linear-time: query t of head h in layer l draws its links with Robert Floyd's sampling
algorithm from hashes of (seed, l, h, t, step j), O(links^2) per query whatever the context
(`selection.random_links`). Positions are real-token positions, so the graph does not depend on padding, batch
layout, sequence length or the KV cache (cached decode equals recomputation). A drawn key the model's own mask hides
(DeepSeek-V3.2's indexer choice) is dropped, not replaced.

With `resample=True` a training forward draws a new graph per optimisation step: the seed is mixed with the step
the training loop sets through `set_step(model, step)` (not a forward counter, so gradient-checkpoint recomputation
sees the same graph). Evaluation always uses the base seed.

The reference hands the window and sinks as a position rule and the links as token lists to the chunked reference
(hf_attn_plus.chunked_attention: per query chunk, the union of its rows' links, never a [q, kv] mask); the kernel (kernels/gathered_attention, backend option) reads the window and sinks as slot ranges and gathers the
listed links: O(q·(sinks + window + links)) work and memory.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..attention import attend_selection, use_kernel
from ..kernel_inputs import fixed_spans, position_slots, visibility
from ..masking import AttentionContext
from ..options import bool_option, int_option
from ..registry import Mechanism, register
from ..selection import counter_hash, random_links
from ..structure import PositionRule, Selection

STEP_ATTRIBUTE = "_hf_attn_plus_step"


def routing_graph(
    ctx: AttentionContext, q_heads: int, opts: SimpleNamespace, layer: int, step: int | None = None
) -> Selection:
    """Sinks + window (a rule) + `links` seeded random keys per head (token lists); `step` reseeds."""
    links = link_positions(ctx, q_heads, opts, layer, step)
    return Selection(PositionRule(sinks=opts.sinks, window=opts.window), tokens=links)


def link_positions(
    ctx: AttentionContext, q_heads: int, opts: SimpleNamespace, layer: int, step: int | None = None
) -> torch.Tensor:
    """Real positions of every query's long-range links, [B, q_heads, q, links] (-1: unused); `step` reseeds."""
    seed = opts.seed if step is None else int(counter_hash(opts.seed, step))
    return random_links(ctx, q_heads, opts.sinks, opts.window, opts.links, seed, layer)


def set_step(model: torch.nn.Module, step: int) -> None:
    """Set the training step that reseeds `resample=True` graphs, on every attention module of `model`."""
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "is_causal"):
            setattr(module, STEP_ATTRIBUTE, step)


def attend(module, query, key, value, ctx, opts, scaling, dropout):
    step = getattr(module, STEP_ATTRIBUTE, 0) if opts.resample and module.training else None
    layer = getattr(module, "layer_idx", 0)
    if use_kernel(MECHANISM, opts, query, dropout):
        from ..kernels.gathered_attention.function import gathered_attention

        with torch.no_grad():
            spans = fixed_spans(ctx, opts.sinks, opts.window)
            slots = position_slots(ctx, link_positions(ctx, query.shape[1], opts, layer, step))
        return gathered_attention(query, key, value, visibility(ctx), spans, slots, scaling), None
    with torch.no_grad():
        graph = routing_graph(ctx, query.shape[1], opts, layer, step)
    return attend_selection(module, query, key, value, ctx, graph, opts, scaling, dropout), None


MECHANISM = register(
    Mechanism(
        name="stochastic_routing",
        family="stochastic",
        summary="local window + seeded random long-range links per head (small-world graph)",
        options=(
            int_option("window", 64, 1, "keys up to the query always attended (s > t - window)"),
            int_option("links", 16, 0, "random long-range keys per query and head, beyond the window"),
            int_option("sinks", 0, 0, "first real tokens always attended"),
            int_option("seed", 0, 0, "fixes the random graph (with layer, head and positions)"),
            bool_option("resample", False, "training forwards draw a new graph per step set by set_step()"),
        ),
        attend=attend,
        attend_has_kernel=True,
        training_free=False,
    )
)
