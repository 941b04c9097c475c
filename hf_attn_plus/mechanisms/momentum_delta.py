"""momentum_delta (MDN-style): the gated delta rule whose correction enters a momentum before the state,
M_t = μ_t M_{t-1} + β_t k_t (v_t - α_t S_{t-1}ᵀ k_t)ᵀ, S_t = α_t S_{t-1} + M_t, o_t = S_tᵀ q_t, so the update direction
carries a decayed memory of earlier updates; μ_t = sigmoid(m_t) from a third projection of the token (0.5 at
initialisation), μ = 0 being `gated_delta`. Chunk-parallel prefill and training, recurrent decode on (S, M).
Math: hf_attn_plus/linear_ops.py. Triton (chunked forward and backward, recurrent decode):
hf_attn_plus/kernels/gated_delta/momentum.py, used on GPU tensors or with backend='kernel'.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .. import linear_ops
from ..masking import AttentionContext
from ..patches.attn_plus import AttentionShape, mechanism_weights, register_weights
from ..registry import Mechanism, register
from .gated_delta import MECHANISM as GATED_DELTA
from .gated_delta import GatedDeltaWeights
from .linear import check_call, kernel_requested


@register_weights
class MomentumDeltaWeights(GatedDeltaWeights):
    """`gated_delta`'s decay and write projections plus the momentum projection."""

    mechanism = "momentum_delta"

    def __init__(self, shape: AttentionShape, opts: SimpleNamespace, layer_idx: int) -> None:
        super().__init__(shape, opts, layer_idx)
        self.momentum_proj = nn.Linear(shape.hidden, shape.kv_heads)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.momentum_proj.weight.normal_(0.0, 0.02)
        self.momentum_proj.bias.zero_()

    def forward(self, query: torch.Tensor, key: torch.Tensor, hidden_states: torch.Tensor, scaling: float):
        """`gated_delta`'s outputs and log μ [B, Hkv, L]."""
        log_mu = F.logsigmoid(self.momentum_proj(hidden_states)).transpose(1, 2)
        return *super().forward(query, key, hidden_states, scaling), log_mu


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
    check_call("momentum_delta", opts, dropout)
    weights = mechanism_weights(module, "momentum_delta")
    query, key, log_alpha, beta, log_mu = module.attn_plus(query, key, weights.hidden_states, scaling)
    # Padding keeps S and M (α = μ = 1, β = 0); M is zero before the first real token (left padding) and
    # nothing real follows right padding, so padding contributes nothing.
    real = linear_ops.causal_key_mask(ctx).squeeze(-1)
    layer = weights.state_layer
    if kernel_requested(opts, query):
        from ..kernels.gated_delta.momentum import momentum_delta_attention as momentum_delta_rule
    else:
        momentum_delta_rule = linear_ops.chunked_momentum_delta
    out, state = momentum_delta_rule(
        query, key, value, log_alpha * real, beta * real, log_mu * real,
        None if layer is None else layer.state, opts.chunk_size,
    )
    if layer is not None:
        layer.state = state
    return out, None


MECHANISM = register(
    Mechanism(
        name="momentum_delta",
        family="linear",
        summary="MDN-style momentum delta rule: gated delta updates through a decayed momentum",
        options=GATED_DELTA.options,
        attend=attend,
        attend_has_kernel=True,
        training_free=False,
    )
)
