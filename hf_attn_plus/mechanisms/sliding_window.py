"""sliding_window: local attention with attention sinks (StreamingLLM). Query t sees the first `sinks` tokens and
the last `window` tokens (s > t - window): a position rule, so the reference reads one window of keys per query
chunk and a decode step reads sinks + window, whatever the context."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext
from ..options import int_option
from ..registry import Mechanism, register
from ..structure import PositionRule, Selection


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    return Selection(PositionRule(sinks=opts.sinks, window=opts.window))


MECHANISM = register(
    Mechanism(
        name="sliding_window",
        family="sparse",
        summary="attention sinks + local window",
        options=(
            int_option("window", 1024, 1, "keys up to the query that are attended (s > t - window)"),
            int_option("sinks", 4, 0, "first real tokens always attended"),
        ),
        select=select,
        kernel=selection_kernel(select),
    )
)
