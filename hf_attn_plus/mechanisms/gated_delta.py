"""gated_delta (Gated DeltaNet): S_t = α_t S_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t, with L2-normalised
queries (times the model's τ) and keys. α_t = exp(-softplus(a_t)) (decay) and β_t = sigmoid(b_t) (write strength) come
from two small projections of the layer's input token, one value per KV head: the state [Dk, Dv] is kept per KV head.

Converting a softmax model, the delta rule reads the layer's own post-RoPE queries and keys, which were trained for
softmax and fit it badly: on SmolLM2 its outputs hold 1-3 % of dense attention's energy and, even best scaled per head,
leave 80-98 % of the error. So every query and key head passes through its own linear map first and every query head has
a learned gain; they start at the identity and 1 (the rule exactly as above), and attention transfer trains them with
the gates (README, Converting a model: the `gated_delta` rows).

Trained and prefilled chunk-parallel (UT transform), decoded recurrently on a constant-size state. Math:
hf_attn_plus/linear_ops.py. Triton (chunked forward, recurrent decode and backward): hf_attn_plus/kernels/gated_delta/,
used on GPU tensors or with backend='kernel'.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .. import linear_ops
from ..masking import AttentionContext
from ..options import int_option
from ..patches.attn_plus import AttentionShape, MechanismWeights, mechanism_weights, register_weights
from ..registry import Mechanism, register
from .linear import check_call, kernel_requested

# softplus(-4) ≈ 0.018: the state starts by keeping ~98% per token, a memory of about fifty tokens.
_DECAY_BIAS = -4.0


@register_weights
class GatedDeltaWeights(MechanismWeights):
    """The decay and write-strength projections of one attention layer, and the per-head query / key maps and query
    gains that fit the layer's softmax queries and keys to the delta rule."""

    mechanism = "gated_delta"
    recurrent = True
    reads_hidden_states = True

    def __init__(self, shape: AttentionShape, opts: SimpleNamespace, layer_idx: int) -> None:
        super().__init__(shape, opts, layer_idx)
        self.decay_proj = nn.Linear(shape.hidden, shape.kv_heads)
        self.write_proj = nn.Linear(shape.hidden, shape.kv_heads)
        self.q_map = nn.Parameter(torch.empty(shape.q_heads, shape.qk_dim, shape.qk_dim))
        self.k_map = nn.Parameter(torch.empty(shape.kv_heads, shape.qk_dim, shape.qk_dim))
        # log-space, so a gain cannot change sign and moves by factors
        self.log_q_gain = nn.Parameter(torch.empty(shape.q_heads))
        GatedDeltaWeights.reset_parameters(self)  # not the override: a subclass's own weights do not exist yet

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for proj, bias in ((self.decay_proj, _DECAY_BIAS), (self.write_proj, 0.0)):
            proj.weight.normal_(0.0, 0.02)
            proj.bias.fill_(bias)
        for head_map in (self.q_map, self.k_map):
            head_map.copy_(torch.eye(head_map.shape[-1]).expand_as(head_map))
        self.log_q_gain.zero_()

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, hidden_states: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised query and key, log α and β [B, Hkv, L]."""
        log_alpha = -F.softplus(self.decay_proj(hidden_states)).transpose(1, 2)
        beta = torch.sigmoid(self.write_proj(hidden_states)).transpose(1, 2)
        query, key = linear_ops.per_head_map(query, self.q_map), linear_ops.per_head_map(key, self.k_map)
        gain = (self.log_q_gain.exp() * scaling).to(query.dtype)[:, None, None]
        return F.normalize(query, dim=-1) * gain, F.normalize(key, dim=-1), log_alpha, beta


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
    check_call("gated_delta", opts, dropout)
    weights = mechanism_weights(module, "gated_delta")
    query, key, log_alpha, beta = module.attn_plus(query, key, weights.hidden_states, scaling)
    # Padding tokens neither decay nor write the state.
    real = linear_ops.causal_key_mask(ctx).squeeze(-1)
    layer = weights.state_layer
    state = None if layer is None or layer.state is None else layer.state[0]
    log_alpha, beta = log_alpha * real, beta * real
    if kernel_requested(opts, query):
        from ..kernels.gated_delta import gated_delta_attention as gated_delta_rule
    else:
        gated_delta_rule = linear_ops.chunked_gated_delta
    out, state = gated_delta_rule(query, key, value, log_alpha, beta, state, opts.chunk_size)
    if layer is not None:
        layer.state = (state,)
    return out, None


MECHANISM = register(
    Mechanism(
        name="gated_delta",
        family="linear",
        summary="Gated DeltaNet: decayed delta-rule state, chunked UT-transform prefill, recurrent decode",
        options=(int_option("chunk_size", 64, 1, "tokens per chunk of the chunked (UT transform) form"),),
        attend=attend,
        attend_has_kernel=True,
        training_free=False,
    )
)
