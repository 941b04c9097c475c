"""Mechanism weights for a model that already exists: what `set_attention` adds to a model built or loaded without
the weights its new mechanism needs.

They are initialised the way `from_pretrained(..., attn_implementation=...)` initialises weights missing from a
checkpoint: built on the meta device, materialised in the layer's device and dtype, then the owning model's own
`_initialize_weights` applied children first (torch.nn.init guarded as transformers guards it). From the same RNG
state, both give the same values.

Weights that already fit the new mechanism and options (`MechanismWeights.fits`) are kept; any others are replaced.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import guard_torch_init_functions
from transformers.utils import logging

from ..registry import all_mechanisms
from .attn_plus import PATCH_OF, MechanismWeights, MechanismWeightsError, check_honoured, runs_in, unwrapped, weights_class
from .recurrent_cache import install_state_hooks

logger = logging.get_logger(__name__)

_PATCHED_CLASSES = tuple(PATCH_OF.values())
__all__ = ["MechanismWeightsError", "install_weights", "patch_attention_classes", "plan_weights"]


PlannedWeights = list[tuple[nn.Module, PreTrainedModel, MechanismWeights]]


def _attention_layers(module: nn.Module, owner: PreTrainedModel | None) -> Iterator[tuple[nn.Module, PreTrainedModel]]:
    """Attention modules of a patchable class, patched or not, in module order, each with its innermost
    PreTrainedModel (whose `_initialize_weights` from_pretrained would run on it)."""
    for child in module.children():
        child_owner = child if isinstance(child, PreTrainedModel) else owner
        if isinstance(child, _PATCHED_CLASSES) or type(child) in PATCH_OF:
            yield child, child_owner
        else:
            yield from _attention_layers(child, child_owner)


def _adapted(weights: nn.Module | None) -> bool:
    # PEFT layers (LoRA's base_layer, modules_to_save's original_module) inside or around `attn_plus`.
    return weights is not None and any(
        hasattr(m, "get_base_layer") or hasattr(m, "original_module") for m in weights.modules()
    )


def _without_weights() -> str:
    return ", ".join(m.name for m in all_mechanisms() if weights_class(m.name) is None)


def plan_weights(model: nn.Module, mechanism: str, opts: SimpleNamespace) -> PlannedWeights:
    """New weights, on the meta device, for every attention layer of `model` that `opts.layers` selects and whose
    weights do not fit `mechanism` with `opts` (layers left out keep theirs, unused). Changes nothing; raises
    MechanismWeightsError when a layer cannot get them or they cannot honour the layer's model features."""
    built = weights_class(mechanism)
    model_type = model.config.model_type
    if built is None or model_type in built.models_bringing_own:
        return []
    layers = list(_attention_layers(model, None))
    if not layers:
        raise MechanismWeightsError(
            f"hf_attn_plus {mechanism!r} adds weights to every attention layer, and hf_attn_plus builds them only in "
            f"{', '.join(cls.__name__ for cls in PATCH_OF)}; this {model_type!r} model has none of those (its "
            f"attention class is not patched for mechanism weights). Mechanisms without weights run on it: "
            f"{_without_weights()}"
        )
    planned = []
    for attention, owner in layers:
        if not runs_in(opts, attention):
            continue
        slot = getattr(attention, "attn_plus", None)
        current = unwrapped(slot)
        if current is not None and current.mechanism == mechanism and current.fits(opts):
            continue
        if _adapted(slot):
            raise MechanismWeightsError(
                f"layer {attention.layer_idx}'s {current.mechanism!r} weights (attn_plus) are adapted by PEFT (LoRA or "
                f"modules_to_save); replacing them with {mechanism!r} weights would detach the adapter's tensors. "
                "merge_and_unload() first, or set the mechanism on the base model before get_peft_model"
            )
        shape = PATCH_OF.get(type(attention), type(attention)).attn_plus_shape(attention)
        with torch.device("meta"):
            weights = built(shape, opts, attention.layer_idx)
        check_honoured(attention, weights)
        planned.append((attention, owner, weights))
    return planned


def install_weights(planned: PlannedWeights) -> None:
    """Put each planned weights module in its layer and initialise it as from_pretrained initialises missing keys.

    The weights take the device, dtype and requires_grad of the layer's output projection: a PEFT model's base
    weights are frozen, and so are the weights added to it."""
    for attention, owner, weights in planned:
        _patch(attention)
        replaced = unwrapped(attention.attn_plus)
        if replaced is not None:
            logger.warning(
                f"hf_attn_plus: layer {attention.layer_idx}'s {replaced.mechanism!r} weights are replaced by new "
                f"{weights.mechanism!r} weights"
            )
        like = attention.o_proj.weight
        weights = weights.to(dtype=like.dtype).to_empty(device=like.device)
        with torch.no_grad(), guard_torch_init_functions():
            weights.apply(owner._initialize_weights)
        attention.attn_plus = weights.requires_grad_(like.requires_grad)


def patch_attention_classes(model: nn.Module) -> None:
    """Swap in the patched class (and its cache hooks) on attention modules built before the patch mapping applied
    (a model constructed directly rather than by from_pretrained / from_config): side caches and eviction need the
    hooks. The patched class computes exactly what the original does."""
    for attention, _ in _attention_layers(model, None):
        _patch(attention)


def _patch(attention: nn.Module) -> None:
    if type(attention) in PATCH_OF:
        attention.__class__ = PATCH_OF[type(attention)]
        attention.attn_plus = None
        install_state_hooks(attention)
