"""hybrid (LoLCATs): exact softmax over the last `window` keys plus feature-map linear attention over all older keys,
in one normaliser, the linear terms weighted per head by γ_h = sigmoid(mixing_h) (learned, 0.5 at initialisation).

Decode keeps the window's key/value slots and the linear state of everything older: memory is constant in the
generated length. Feature maps and their options are those of `linear`; math in hf_attn_plus/linear_ops.py. Triton
(forward and backward; the forward is also the decode step): hf_attn_plus/kernels/hybrid_attention/, used on GPU
tensors or with backend='kernel'.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from .. import linear_ops
from ..masking import AttentionContext
from ..options import int_option
from ..patches.attn_plus import AttentionShape, mechanism_weights, register_weights
from ..registry import Mechanism, register
from .linear import FEATURE_OPTIONS, LinearWeights, check_call, kernel_requested


@register_weights
class HybridWeights(LinearWeights):
    """`linear`'s feature maps plus the per-head mixing of linear terms into the softmax window."""

    mechanism = "hybrid"

    def __init__(self, shape: AttentionShape, opts: SimpleNamespace, layer_idx: int) -> None:
        super().__init__(shape, opts, layer_idx)
        self.cache_window = opts.window
        self.mixing = nn.Parameter(torch.zeros(shape.q_heads))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.mixing.zero_()

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(query), phi(key) and the per-query-head weight γ [Hq] of the linear terms."""
        return *super().forward(query, key, scaling), torch.sigmoid(self.mixing)


def attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    scaling: float,
    dropout: float,
) -> tuple[torch.Tensor, None]:
    check_call("hybrid", opts, dropout)
    weights = mechanism_weights(module, "hybrid")
    weights.check_options(opts)
    phi_q, phi_k, gamma = module.attn_plus(query, key, scaling)  # through any adapter PEFT wrapped around them
    layer = weights.state_layer
    args = (query, key, value, phi_q, phi_k, linear_ops.causal_key_mask(ctx), scaling, gamma, opts.window,
            None if layer is None else layer.state, opts.chunk_size)
    if kernel_requested(opts, query):
        from ..kernels.hybrid_attention import kernel

        # Decode (one query) runs the same forward kernel: one chunk against the cached window and the state.
        out, state = (kernel.hybrid_attention if torch.is_grad_enabled() else kernel.hybrid_forward)(*args)
    else:
        out, state = linear_ops.chunked_hybrid_attention(*args)
    if layer is not None:
        layer.state = state
    return out, None


MECHANISM = register(
    Mechanism(
        name="hybrid",
        family="linear",
        summary="LoLCATs: softmax sliding window + linear attention for older keys, one normaliser",
        options=(int_option("window", 64, 1, "most recent keys attended with exact softmax"),) + FEATURE_OPTIONS,
        attend=attend,
        attend_has_kernel=True,
        training_free=False,
    )
)
