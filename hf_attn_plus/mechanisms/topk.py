"""topk: query-aware token selection. Query t attends to sinks, its local window and the `budget` other keys with
the largest q·k, each query head choosing its own keys (`choose_per='head'`); exact softmax over that set. With
`choose_per='layer'` every head of the layer shares one choice: the keys with the largest dense attention summed over
the heads (softmax at 1/sqrt(head dim)), the best shared choice, so the ceiling of a head-shared selector such as
DSA's indexer (`indexer_topk`). Scoring is chunked over queries (one q·k per key and head is inherent); the selection
is a [B, Hq|1, q, budget] position list, built per query chunk when the reference reaches it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext, chunk_visible
from ..options import choice_option, int_option
from ..reference import attention_target, default_scaling
from ..registry import Mechanism, register
from ..selection import grouped_scores, top_positions
from ..structure import PositionRule, Selection


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    rule = PositionRule(sinks=opts.sinks, window=opts.window)

    def head_scores(chunk: slice, keys: slice) -> torch.Tensor:
        return grouped_scores(query[:, :, chunk], key[:, :, keys])

    def layer_scores(chunk: slice, keys: slice) -> torch.Tensor:
        # The softmax needs every visible key of the chunk, the window's included, not only the scored candidates.
        target = attention_target(query[:, :, chunk], key, chunk_visible(ctx, chunk), default_scaling(query))
        return target[..., keys]

    scores_of = layer_scores if opts.choose_per == "layer" else head_scores

    def tokens(rows: slice) -> torch.Tensor:  # per query chunk, when the reference reaches it
        return top_positions(ctx, scores_of, rule, opts.budget, query.shape[1], rows)

    return Selection(rule, tokens=tokens)


MECHANISM = register(
    Mechanism(
        name="topk",
        family="sparse",
        summary="query-aware top-k tokens + sinks + local window",
        options=(
            int_option("budget", 256, 1, "keys chosen by score, besides sinks and window"),
            int_option("sinks", 4, 0, "first real tokens always attended"),
            int_option("window", 64, 0, "most recent keys always attended"),
            choice_option(
                "choose_per", "head", ("head", "layer"),
                "'head': each query head its own top q·k; 'layer': one choice for all heads, the keys with the "
                "largest attention summed over heads (the ceiling of a head-shared indexer)",
            ),
        ),
        select=select,
        kernel=selection_kernel(select),
    )
)
