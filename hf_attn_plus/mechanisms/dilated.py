"""dilated (RAT+ "train dense, infer sparse"): a local window, then every `dilation`-th key back from the query.
Cuts FLOPs and KV reads by about the dilation factor; dilation=1 is dense attention. A position rule: the reference
reads the window as one view and the dilated keys as one strided view per residue class of the query position."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..kernel_inputs import selection_kernel
from ..masking import AttentionContext
from ..options import int_option
from ..registry import Mechanism, register
from ..structure import PositionRule, Selection


def select(query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace) -> Selection:
    return Selection(PositionRule(window=opts.window, dilation=opts.dilation))


MECHANISM = register(
    Mechanism(
        name="dilated",
        family="sparse",
        summary="local window + every dilation-th key",
        options=(
            int_option("dilation", 2, 1, "stride between attended keys beyond the window"),
            int_option("window", 256, 1, "most recent keys always attended"),
        ),
        select=select,
        kernel=selection_kernel(select),
    )
)
