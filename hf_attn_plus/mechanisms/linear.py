"""linear: kernel (feature-map) attention o_t = phi(q_t)ᵀ S_t / phi(q_t)ᵀ z_t with a constant-size decode state.

Feature maps: `elu` (elu+1), `relu`, `hedgehog` ([softmax(Wx); softmax(-Wx)], W learned per layer and head, identity at
initialisation) and `gaussian_rf` (Performer positive random features estimating exp(τ q·k); W ~ N(0, I) drawn from
`seed` and the layer index, stored as a buffer so a saved model reloads the same draw; `redraw()` draws anew).
Query heads have their own hedgehog W; keys use one W per KV head, so the state stays per KV head under GQA.
Math and the three forms: hf_attn_plus/linear_ops.py. Weights and decode cache: hf_attn_plus/patches/. Triton
(chunked forward and backward, decode step): hf_attn_plus/kernels/linear_attention/, used on GPU tensors or with
backend='kernel'.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from .. import linear_ops
from ..masking import AttentionContext
from ..options import OptionError, choice_option, int_option
from ..patches.attn_plus import AttentionShape, MechanismWeights, mechanism_weights, register_weights
from ..registry import Mechanism, register

FEATURE_MAPS = ("elu", "relu", "hedgehog", "gaussian_rf")
# Options that change the shape or meaning of the weights: the model must run with the ones they were built for.
WEIGHT_OPTIONS = ("feature_map", "feature_dim", "seed")


@register_weights
class LinearWeights(MechanismWeights):
    """Feature-map weights of one attention layer (`attn_plus` of the `linear` and `hybrid` mechanisms)."""

    mechanism = "linear"
    recurrent = True
    weight_options = WEIGHT_OPTIONS

    def __init__(self, shape: AttentionShape, opts: SimpleNamespace, layer_idx: int) -> None:
        super().__init__(shape, opts, layer_idx)
        dim = opts.feature_dim or shape.qk_dim
        if opts.feature_map == "hedgehog":
            self.q_map = nn.Parameter(torch.empty(shape.q_heads, shape.qk_dim, dim))
            self.k_map = nn.Parameter(torch.empty(shape.kv_heads, shape.qk_dim, dim))
        elif opts.feature_map == "gaussian_rf":
            self.register_buffer("random_features", torch.empty(shape.kv_heads, shape.qk_dim, dim))
        LinearWeights.reset_parameters(self)  # not the override: a subclass's own weights do not exist yet

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.opts.feature_map == "hedgehog":
            # Identity: phi starts as [softmax(x); softmax(-x)], a positive map that already ranks keys by q·k.
            eye = torch.eye(self.shape.qk_dim, self.q_map.shape[-1])
            self.q_map.copy_(eye.expand_as(self.q_map))
            self.k_map.copy_(eye.expand_as(self.k_map))
        elif self.opts.feature_map == "gaussian_rf":
            self.redraw()

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Draw new Gaussian random features (from `seed`, default the `seed` option and layer index)."""
        seed = self.opts.seed * 100_003 + self.layer_idx if seed is None else seed
        drawn = torch.randn(self.random_features.shape, generator=torch.Generator().manual_seed(seed))
        self.random_features.copy_(drawn)

    def forward(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(query) [B, Hq, q, F] and phi(key) [B, Hkv, kv, F]."""
        kind = self.opts.feature_map
        if kind == "elu":
            return linear_ops.elu_features(query), linear_ops.elu_features(key)
        if kind == "relu":
            return linear_ops.relu_features(query), linear_ops.relu_features(key)
        if kind == "hedgehog":
            return linear_ops.hedgehog_features(query, self.q_map), linear_ops.hedgehog_features(key, self.k_map)
        # exp(τ q·k) = exp((√τ q)·(√τ k)); query heads share their KV head's draw so the estimator stays unbiased.
        groups = query.shape[1] // key.shape[1]
        root = scaling**0.5
        weight = self.random_features
        phi_q = linear_ops.gaussian_rf_features(query * root, weight.repeat_interleave(groups, 0), True)
        return phi_q, linear_ops.gaussian_rf_features(key * root, weight, False)


def check_call(name: str, opts: SimpleNamespace, dropout: float) -> None:
    """Reject what the linear family does not implement instead of silently computing something else."""
    if opts.logit_scale != "none":
        raise OptionError(f"hf_attn_plus mechanism {name!r}: option 'logit_scale' got {opts.logit_scale!r}; allowed: 'none'")
    if dropout > 0:
        raise ValueError(f"hf_attn_plus mechanism {name!r} does not implement attention dropout (got {dropout})")


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
    check_call("linear", opts, dropout)
    weights = mechanism_weights(module, "linear")
    weights.check_options(opts)
    phi_q, phi_k = module.attn_plus(query, key, scaling)  # through any adapter PEFT wrapped around the weights
    phi_k = phi_k * linear_ops.causal_key_mask(ctx).to(phi_k.dtype)
    layer = weights.state_layer
    state = None if layer is None else layer.state
    if kernel_requested(opts, query):
        from ..kernels.linear_attention import chunked as kernel

        if torch.is_grad_enabled():
            out, state = kernel.linear_attention(phi_q, phi_k, value, state, opts.chunk_size)
        elif state is not None and query.shape[2] == 1:
            out = kernel.decode_step(phi_q, phi_k, value, state)  # updates the state in place
        else:
            out, state = kernel.chunked_forward(phi_q, phi_k, value, state, opts.chunk_size)
    else:
        out, state = linear_ops.chunked_linear_attention(phi_q, phi_k, value, state, opts.chunk_size)
    if layer is not None:
        layer.state = state
    return out, None


def kernel_requested(opts: SimpleNamespace, query: torch.Tensor) -> bool:
    """backend='kernel', or 'auto' on CUDA tensors (the linear family refuses logit scaling and dropout itself)."""
    return opts.backend == "kernel" or (opts.backend == "auto" and query.is_cuda)


FEATURE_OPTIONS = (
    choice_option("feature_map", "hedgehog", FEATURE_MAPS, "phi applied to queries and keys"),
    int_option("feature_dim", None, 1, "hedgehog / gaussian_rf: projection size m; None: the q/k head dim", True),
    int_option("seed", 0, 0, "gaussian_rf: seed of the random features (with the layer index)"),
    int_option("chunk_size", 64, 1, "tokens per chunk of the chunked parallel form"),
)

MECHANISM = register(
    Mechanism(
        name="linear",
        family="linear",
        summary="feature-map linear attention, O(1)-memory recurrent decode",
        options=FEATURE_OPTIONS,
        attend=attend,
        attend_has_kernel=True,
        training_free=False,
    )
)
