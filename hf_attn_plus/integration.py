"""The thin layer between the registry and transformers: registration, config persistence, switching."""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedConfig

from .attention import attention_forward, check_model_supported, mask_function
from .patches.convert import install_weights, patch_attention_classes, plan_weights
from .registry import PREFIX, all_mechanisms, get_mechanism

_BUILTIN_IMPLEMENTATIONS = ("sdpa", "eager")


def register_with_transformers() -> None:
    """Register every mechanism as `hf_attn_plus:<name>` for attention and for masks.

    Without the mask registration transformers hands the function `attention_mask=None` even for padded batches.
    """
    for mechanism in all_mechanisms():
        fn = functools.partial(attention_forward, mechanism=mechanism)
        AttentionInterface.register(mechanism.attn_implementation, fn)
        AttentionMaskInterface.register(mechanism.attn_implementation, mask_function)
    _teach_configs_the_options_attribute()


def _teach_configs_the_options_attribute() -> None:
    # A class default makes `from_pretrained(..., hf_attn_plus={...})` land on the config (transformers only routes
    # kwargs that name an existing config attribute there) without adding the key to configs that never set it.
    if not hasattr(PreTrainedConfig, "hf_attn_plus"):
        PreTrainedConfig.hf_attn_plus = None
    # transformers never serialises the implementation name; writing it makes a saved model reload with the same
    # mechanism, and makes loading without the plugin fail loudly instead of silently running dense attention.
    if getattr(PreTrainedConfig.to_dict, "_hf_attn_plus", False):
        return
    original = PreTrainedConfig.to_dict

    @functools.wraps(original)
    def to_dict(self: PreTrainedConfig) -> dict[str, Any]:
        output = original(self)
        implementation = getattr(self, "_attn_implementation_internal", None)
        if isinstance(implementation, str) and implementation.startswith(PREFIX):
            output["attn_implementation"] = implementation
        return output

    to_dict._hf_attn_plus = True
    PreTrainedConfig.to_dict = to_dict


def set_attention(model: torch.nn.Module, name: str, **options: Any) -> None:
    """Validate `options` for mechanism `name` and switch `model` (a PreTrainedModel or PeftModel) to it.

    `name` is a mechanism ('topk' or 'hf_attn_plus:topk') or 'sdpa' / 'eager' to go back to dense attention.
    A mechanism with weights (`attn_plus` of each attention layer) gets them here when the model lacks weights that
    fit it, initialised as `from_pretrained(..., attn_implementation=...)` initialises them; weights that fit (same
    mechanism and weight-shaping options) are kept. Dense attention and mechanisms without weights keep the layer's
    weights unused, so switching back restores them. Raises MechanismWeightsError, before changing anything, where
    the weights cannot be added.
    """
    config = model.config
    if name in _BUILTIN_IMPLEMENTATIONS:
        if options:
            raise ValueError(f"attention {name!r} takes no hf_attn_plus options, got {sorted(options)}")
        model.set_attn_implementation(name)
        config.hf_attn_plus = None
        return
    mechanism = get_mechanism(name)
    check_model_supported(config, model)
    planned = plan_weights(model, mechanism.name, mechanism.resolve_options(options))  # raise before any change
    config.hf_attn_plus = dict(options)
    model.set_attn_implementation(mechanism.attn_implementation)
    patch_attention_classes(model)
    install_weights(planned)
