"""sliding_window: local attention with attention sinks (StreamingLLM). Query t sees the first `sinks` tokens and
the last `window` tokens (s > t - window)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernels.sparse_attention import selection_kernel
from ..masking import AttentionContext
from ..options import int_option
from ..registry import Mechanism, register
from ..selection import sinks_and_window


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> torch.Tensor:
    return sinks_and_window(ctx, opts.sinks, opts.window)


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
