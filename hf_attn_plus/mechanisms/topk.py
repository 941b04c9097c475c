"""topk: query-aware token selection. Query t attends to sinks, its local window and the `budget` other keys with
the largest q·k, each query head choosing its own keys; exact softmax over that set. Scoring is chunked over queries
(one q·k per key is inherent); the selection is a [B, Hq, q, budget] position list, built per query chunk when the
reference reaches it."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext
from ..options import int_option
from ..registry import Mechanism, register
from ..selection import grouped_scores, top_positions
from ..structure import PositionRule, Selection


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    rule = PositionRule(sinks=opts.sinks, window=opts.window)

    def tokens(rows: slice) -> torch.Tensor:  # per query chunk, when the reference reaches it
        def scores_of(chunk: slice, keys: slice) -> torch.Tensor:
            return grouped_scores(query[:, :, chunk], key[:, :, keys])

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
        ),
        select=select,
        kernel=selection_kernel(select),
    )
)
