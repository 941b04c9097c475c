"""sliding_window: local attention with attention sinks (StreamingLLM). Query t sees the first `sinks` tokens and
the last `window` tokens (s > t - window): a position rule, so the reference reads one window of keys per query
chunk and a decode step reads sinks + window, whatever the context. With `evict=True` cached generation also keeps
only those keys (StreamingLLM's constant-memory cache, patches/streaming_cache.py): same tokens, flat memory."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext
from ..options import bool_option, int_option
from ..registry import Mechanism, register
from ..structure import PositionRule, Selection


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    return Selection(PositionRule(sinks=opts.sinks, window=opts.window))


def kept_keys(opts: SimpleNamespace) -> tuple[int, int] | None:
    return (opts.sinks, opts.window) if opts.evict else None


MECHANISM = register(
    Mechanism(
        name="sliding_window",
        family="sparse",
        summary="attention sinks + local window",
        options=(
            int_option("window", 1024, 1, "keys up to the query that are attended (s > t - window)"),
            int_option("sinks", 4, 0, "first real tokens always attended"),
            bool_option(
                "evict", False,
                "cached generation drops keys no later query attends, keeping sinks + window (needs a DynamicCache and a "
                "model class hf_attn_plus patches, see README: Supported models; layers with the model's own window keep their "
                "own cache, which already drops old keys)",
            ),
        ),
        select=select,
        kept_keys=kept_keys,
        kernel=selection_kernel(select),
    )
)
