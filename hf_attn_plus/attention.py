"""The one attention entry point transformers calls for every `hf_attn_plus:<name>` implementation.

It turns transformers' arguments (mask or None, GQA layout, cache-extended keys, DeepSeek-V3.2 `indices`) into an
AttentionContext, asks the mechanism which keys each query keeps, and runs the kernel or the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import sdpa_mask

from .masking import build_context, indices_to_mask, visible_from_mask
from .reference import default_scaling, log_length_scale, masked_attention
from .registry import Mechanism, OptionError, options_from_config

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "deepseek_v3", "deepseek_v32")

# Keyword arguments that change attention semantics in ways no mechanism here implements; ignoring them would
# silently compute something else.
_UNSUPPORTED_KWARGS = {
    "s_aux": "learned attention sinks (gpt-oss style)",
    "softcap": "logit soft-capping",
}


class UnsupportedModelError(ValueError):
    """The model or layer asks for attention semantics hf_attn_plus does not implement."""


def check_model_supported(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"hf_attn_plus does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def mask_function(*args: Any, **kwargs: Any) -> torch.Tensor:
    """transformers' SDPA boolean mask, always materialised: positions are read from it, so it is never skipped."""
    config = kwargs.get("config")
    if config is not None:
        check_model_supported(config)
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _check_call(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    if not getattr(module, "is_causal", True):
        raise UnsupportedModelError(f"hf_attn_plus mechanisms are causal; {type(module).__name__} is not causal")
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(f"hf_attn_plus does not implement {what} (`{name}` passed by {type(module).__name__})")
    if kwargs.get("sliding_window") is not None:
        # The model's own sliding-window cache drops old keys, which would renumber the positions that sinks,
        # windows and blocks are defined on.
        raise UnsupportedModelError(
            f"hf_attn_plus does not yet support layers with the model's own sliding window "
            f"(sliding_window={kwargs['sliding_window']} in {type(module).__name__}); use a config without it"
        )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    mechanism: Mechanism,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query [B, Hq, q, D], key/value [B, Hkv, kv, D|Dv] -> (output [B, q, Hq, Dv], probabilities or None)."""
    _check_call(module, kwargs)
    config = module.config
    opts = options_from_config(mechanism, config)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    scaling = default_scaling(query) if scaling is None else scaling

    visible = visible_from_mask(attention_mask, batch, q_len, kv_len, query.device)
    indices = kwargs.get("indices")
    ctx = build_context(visible, None if indices is None else indices_to_mask(indices, kv_len))

    if mechanism.attend is not None:
        out, probs = mechanism.attend(module, query, key, value, ctx, opts, scaling, dropout)
        return out.transpose(1, 2).contiguous(), probs
    if _use_kernel(mechanism, opts, query, dropout):
        out = mechanism.kernel(query, key, value, ctx, opts, scaling)
        return out.transpose(1, 2).contiguous(), None

    with torch.no_grad():
        keep = mechanism.select(query, key, ctx, opts)
    beta = None
    if opts.logit_scale == "log":
        train_length = opts.train_length or config.max_position_embeddings
        beta = log_length_scale(keep, train_length, opts.logit_scale_c)
    out, probs = masked_attention(query, key, value, keep, scaling, beta, dropout)
    return out.transpose(1, 2).contiguous(), probs


def _use_kernel(mechanism: Mechanism, opts: Any, query: torch.Tensor, dropout: float) -> bool:
    # The kernels implement exact attention without logit scaling or attention dropout: `auto` takes the reference
    # whenever either is asked for, and a forced kernel refuses rather than silently skipping it.
    unsupported = []
    if opts.logit_scale != "none":
        unsupported.append(f"logit_scale={opts.logit_scale!r}")
    if dropout > 0:
        unsupported.append(f"attention dropout={dropout}")
    if opts.backend == "reference":
        return False
    if opts.backend == "kernel":
        if mechanism.kernel is None:
            raise OptionError(
                f"hf_attn_plus mechanism {mechanism.name!r} has no kernel; option 'backend' allowed here: "
                "'auto', 'reference'"
            )
        if unsupported:
            raise OptionError(
                f"hf_attn_plus mechanism {mechanism.name!r}: backend='kernel' does not implement "
                f"{' or '.join(unsupported)}; use backend='reference'"
            )
        return True
    return mechanism.kernel is not None and query.is_cuda and not unsupported
