"""Mechanism weights on attention modules: per-architecture classes swapped in at load time via transformers' patch
mapping (`transformers.monkey_patching.register_patch_mapping`, present since transformers 5.17).

Each patched class is the original attention class plus, when `config._attn_implementation` names a mechanism that
registered weights here, a submodule `attn_plus` holding them (so `model.layers.0.self_attn.attn_plus.*`, and training
only the new weights means training parameters whose name contains `.attn_plus.`). The original module's code,
parameters and state-dict keys are untouched, so with dense attention the patched model computes exactly what the
original does. Because the class is swapped during `from_pretrained` / `from_config`, `attn_plus` exists before the
checkpoint is read and its saved weights load like any other. A model built without them gets them from
`set_attention` (convert.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.cohere2.modeling_cohere2 import Cohere2Attention
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention
from transformers.models.granite.modeling_granite import GraniteAttention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.mixtral.modeling_mixtral import MixtralAttention
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention
from transformers.models.phi3.modeling_phi3 import Phi3Attention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention
from transformers.monkey_patching import get_patch_mapping, register_patch_mapping

from ..registry import PREFIX, get_mechanism, in_dense_ends, options_from_config

# The model features a layer's attention may add to causal softmax attention, by the key mechanism weights declare
# them under (`MechanismWeights.honours`).
WINDOW, SOFTCAP, SINKS = "window", "softcap", "sinks"
MODEL_FEATURES = (WINDOW, SOFTCAP, SINKS)


class MechanismWeightsError(ValueError):
    """A model cannot get the weights its mechanism needs, or they cannot honour what the model's layer computes
    (raised by set_attention before anything changes, or while the model is built)."""


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    hidden: int
    q_heads: int
    kv_heads: int  # heads of the key/value tensors the attention function receives (MLA: expanded, = q_heads)
    qk_dim: int
    v_dim: int


class MechanismWeights(nn.Module):
    """Base of every mechanism's `attn_plus` submodule.

    `recurrent`: decode keeps a fixed-size state in a `RecurrentStateLayer` instead of the KV cache;
    `cache_window`: key/value slots that layer keeps besides the state (a hybrid's softmax window);
    `reads_hidden_states`: the attention module's input is left in `hidden_states` during its forward.
    """

    mechanism: str = ""
    recurrent: bool = False
    reads_hidden_states: bool = False
    # Options that shape or seed the weights: the model must run with the values they were built for.
    weight_options: tuple[str, ...] = ()
    # Model types whose attention brings these weights itself: the mechanism adds none there.
    models_bringing_own: tuple[str, ...] = ()
    # The model features (MODEL_FEATURES) the computation with these weights reproduces; in a layer with any other,
    # the weights are refused when built rather than computing something else than the model (a linear state over
    # every earlier key knows no window, no soft-capped logits and no sink logit).
    honours: frozenset[str] = frozenset()

    def __init__(self, shape: AttentionShape, opts: SimpleNamespace, layer_idx: int) -> None:
        super().__init__()
        self.shape, self.opts, self.layer_idx = shape, opts, layer_idx
        self.cache_window = 0
        # Set by hooks for the duration of the attention module's forward, else None.
        self.state_layer = None
        self.hidden_states = None

    def reset_parameters(self) -> None:
        """Initialise parameters and buffers; called at construction and by transformers for missing keys."""

    def hooked(self) -> MechanismWeights:
        """The weights the attention hooks serve (decode state, hidden states): these, or a wrapped mechanism's."""
        return self

    def fits(self, opts: SimpleNamespace) -> bool:
        """Whether these weights were built for `opts` (same value of every option in `weight_options`)."""
        return all(getattr(opts, name) == getattr(self.opts, name) for name in self.weight_options)

    def check_options(self, opts: SimpleNamespace) -> None:
        """Raise if the options that shaped these weights differ from the ones the model now runs with."""
        for name in self.weight_options:
            if getattr(opts, name) != getattr(self.opts, name):
                raise ValueError(
                    f"hf_attn_plus {self.mechanism!r}: option {name!r} is {getattr(opts, name)!r} but layer "
                    f"{self.layer_idx}'s weights were built for {getattr(self.opts, name)!r}; call "
                    f"hf_attn_plus.set_attention(model, {self.mechanism!r}, **options) to rebuild them"
                )


_WEIGHTS: dict[str, type[MechanismWeights]] = {}


def register_weights(weights_class: type[MechanismWeights]) -> type[MechanismWeights]:
    """Declare that mechanism `weights_class.mechanism` adds weights: patched attention classes will build them."""
    _WEIGHTS[weights_class.mechanism] = weights_class
    return weights_class


def weights_class(mechanism: str) -> type[MechanismWeights] | None:
    """The weights class mechanism `mechanism` registered, or None when it adds no weights."""
    return _WEIGHTS.get(mechanism)


def _mechanism_name(config: Any) -> str | None:
    implementation = getattr(config, "_attn_implementation", None)
    if isinstance(implementation, str) and implementation.startswith(PREFIX):
        return implementation.removeprefix(PREFIX)
    return None


def attach(attention: nn.Module, config: Any) -> None:
    """Give `attention` (a patched attention module) the `attn_plus` weights its config's mechanism asks for: in the
    layers its `layers` option selects; raises MechanismWeightsError where they cannot honour the layer."""
    name = _mechanism_name(config)
    opts = options_from_config(get_mechanism(name), config) if name in _WEIGHTS else None
    if opts is None or not runs_in(opts, attention):
        attention.attn_plus = None
        return
    weights = _WEIGHTS[name](attention.attn_plus_shape(), opts, attention.layer_idx)
    check_honoured(attention, weights)
    attention.attn_plus = weights


def own_window(attention: nn.Module) -> int | None:
    """The model's own sliding window in `attention`'s layer, read from the config as the model's mask reads it:
    per layer through `layer_types` where the config has them, else one `sliding_window` for every layer (Mistral,
    Mixtral, Phi3); None: no window. Known when the weights are built, before any mask exists."""
    config = attention.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[attention.layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def layer_kind(attention: nn.Module) -> str:
    """'sliding_attention' or 'full_attention': the layer's type as the common `layers` option names it."""
    return "full_attention" if own_window(attention) is None else "sliding_attention"


def runs_in(opts: Any, attention: nn.Module) -> bool:
    """Whether the common `layers` option (validated: 'all', a layer type or a list of indices) selects this layer
    and `dense_first` / `dense_last` leave it to the mechanism."""
    if in_dense_ends(opts, attention):
        return False
    layers = opts.layers
    if layers == "all":
        return True
    if isinstance(layers, str):
        return layers == layer_kind(attention)
    return attention.layer_idx in layers


# Logit options a family's attention passes to the attention function, by feature: what it is in a given layer
# (None where this layer or config leaves it off).
_LOGIT_FEATURES = {
    SOFTCAP: lambda attention: None if attention.attn_logit_softcapping is None
    else f"logit soft-capping (softcap={attention.attn_logit_softcapping})",
    SINKS: lambda attention: "learned attention sinks (s_aux)",
}


def layer_features(attention: nn.Module) -> dict[str, str]:
    """The model features of `attention`'s layer (patched or patchable class) beyond causal softmax attention, each
    described for an error message."""
    features = {}
    window = own_window(attention)
    if window is not None:
        features[WINDOW] = f"the model's own sliding window ({window})"
    for feature in PATCH_OF.get(type(attention), type(attention)).attn_plus_logit_features:
        described = _LOGIT_FEATURES[feature](attention)
        if described is not None:
            features[feature] = described
    return features


def check_honoured(attention: nn.Module, weights: MechanismWeights) -> None:
    """Raise MechanismWeightsError when `weights` (or a wrapper's inner weights) cannot reproduce a model feature of
    `attention`'s layer: saying which, where, and what is allowed instead."""
    computing = weights.hooked()
    features = layer_features(attention)
    refused = [feature for feature in features if feature not in computing.honours]
    if not refused:
        return
    inner = "" if computing is weights else f" (its inner mechanism {computing.mechanism!r})"
    logit = [feature for feature in refused if feature != WINDOW]
    layer_types = getattr(attention.config, "layer_types", None) or ()
    if not logit and any(kind != "sliding_attention" for kind in layer_types):
        allowed = (
            "set option layers='full_attention' to run it only in the layers without the model's own window (the "
            "others keep the model's own attention)"
        )
    else:  # in every layer (logit options; one window for all layers): no choice of layers helps
        able = sorted(name for name, cls in _WEIGHTS.items() if set(refused) <= cls.honours)
        allowed = (
            f"every layer has it; mechanisms with weights that implement it: {', '.join(able) or 'none'} (a wrapper's "
            "inner mechanism must implement it too), or any mechanism without weights"
        )
    raise MechanismWeightsError(
        f"hf_attn_plus {weights.mechanism!r}{inner} does not implement "
        f"{' and '.join(features[feature] for feature in refused)} of layer {attention.layer_idx} "
        f"({type(attention).__name__}, model_type {attention.config.model_type!r}); {allowed}"
    )


def unwrapped(weights: nn.Module | None) -> nn.Module | None:
    """`attn_plus` itself when PEFT wrapped it (LoRA on its parameters or `modules_to_save` wrap the module)."""
    while not isinstance(weights, MechanismWeights) and weights is not None:
        inner = weights.get_base_layer() if hasattr(weights, "get_base_layer") else getattr(weights, "original_module", None)
        if inner is weights:
            break
        weights = inner
    return weights


def mechanism_weights(attention: nn.Module, mechanism: str) -> MechanismWeights:
    """The `attn_plus` of `attention` for `mechanism`, or a clear error saying how to get it.

    Call `attention.attn_plus(...)` rather than this object's methods for anything that reads trainable weights, so
    that adapters wrapped around it take part.
    """
    weights = unwrapped(getattr(attention, "attn_plus", None))
    if weights is None or weights.mechanism != mechanism:
        raise ValueError(
            f"hf_attn_plus {mechanism!r} needs its weights in `{type(attention).__name__}.attn_plus`, which this layer "
            f"does not have. Import hf_attn_plus before loading the model with attn_implementation='{PREFIX}{mechanism}' "
            f"(patched classes: {', '.join(PATCHED)}), or switch the loaded model with "
            f"hf_attn_plus.set_attention(model, {mechanism!r}, **options), which adds them"
        )
    return weights


# ----------------------------------------------------------------------------------------------------------------------
# Per-architecture classes


def _patched(base: type[nn.Module], shape: Any, logit_features: tuple[str, ...] = ()) -> type[nn.Module]:
    """`base` with `attn_plus` weights: `shape(self)` gives their AttentionShape; `logit_features` (keys of
    _LOGIT_FEATURES) are the logit options `base` passes to the attention function."""
    from .recurrent_cache import install_state_hooks  # imports this module's MechanismWeights

    def __init__(self: nn.Module, config: Any, layer_idx: int) -> None:
        base.__init__(self, config, layer_idx)
        attach(self, config)
        install_state_hooks(self)

    attributes = {"__init__": __init__, "attn_plus_shape": shape, "attn_plus_logit_features": logit_features}
    return type(f"HfAttnPlus{base.__name__}", (base,), attributes)


def _gqa_shape(self: nn.Module) -> AttentionShape:
    config = self.config
    return AttentionShape(
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, self.head_dim, self.head_dim
    )


def _mla_shape(self: nn.Module) -> AttentionShape:
    # MLA expands its latent into per-head keys and values before attention; a feature map is nonlinear in the key,
    # so the state cannot stay in latent space and is kept per expanded head.
    return AttentionShape(self.hidden_size, self.num_heads, self.num_heads, self.qk_head_dim, self.v_head_dim)


def caches_latent(attention: nn.Module) -> bool:
    """Whether the layer's cache holds MLA's latent, one per token shared by every head (DeepSeek-V3), rather than
    per-KV-group keys and values."""
    return getattr(type(attention), "attn_plus_shape", None) is _mla_shape


PATCHED = {
    base.__name__: _patched(base, shape, logit_features)
    for base, shape, logit_features in (
        (LlamaAttention, _gqa_shape, ()),
        (Qwen2Attention, _gqa_shape, ()),
        (Qwen3Attention, _gqa_shape, ()),
        (DeepseekV3Attention, _mla_shape, ()),
        # GQA families without logit options. Mechanisms receive q and k after the model's own q/k norms (OLMo2,
        # Gemma 3) and RoPE, and the model's `scaling` (Granite's multiplier, Gemma's query_pre_attn_scalar); layers
        # with the model's own sliding window (`layer_types`) are refused by weights that cannot honour it.
        *((cls, _gqa_shape, ()) for cls in (
            MistralAttention, MixtralAttention, Phi3Attention, Olmo2Attention, Qwen2MoeAttention, Qwen3MoeAttention,
            GraniteAttention, Gemma3Attention, Cohere2Attention,
        )),
        # Logit soft-capping (Gemma 2) and learned sink logits (gpt-oss): only weights that honour them build there.
        (Gemma2Attention, _gqa_shape, (SOFTCAP,)),
        (GptOssAttention, _gqa_shape, (SINKS,)),
    )
}
# Original class -> patched class: set_attention patches in place modules built before the mapping applied.
PATCH_OF = {patched.__base__: patched for patched in PATCHED.values()}


def _register_patches() -> None:
    # Keys are regexes searched in every class name: anchored, or `LlamaAttention` would also replace
    # `DiffLlamaAttention`.
    mapping = {f"^{name}$": patched for name, patched in PATCHED.items()}
    existing = get_patch_mapping()
    for key, patched in mapping.items():
        if existing.get(key) not in (None, patched):
            raise RuntimeError(f"hf_attn_plus cannot patch {key}: {existing[key].__name__} is registered for it")
    register_patch_mapping({key: patched for key, patched in mapping.items() if key not in existing})


def _make_patch_context_exception_safe() -> None:
    # transformers' `apply_patches` (around every from_pretrained / from_config model construction) puts the original
    # classes back only when its block exits normally: a construction that raises (weights refusing a layer's model
    # feature, in `attach`) would leave every patched class in transformers' modules for good, so that classes built
    # directly afterwards are patched too. Same context, its restore run on any exit.
    import transformers.modeling_utils as modeling_utils
    from transformers import monkey_patching

    original = monkey_patching.apply_patches
    if getattr(original, "_hf_attn_plus", False) or not hasattr(original, "__wrapped__"):
        return  # done already, or not the generator context this wraps (nothing known to restore)

    @contextlib.contextmanager
    def apply_patches(*args: Any, **kwargs: Any) -> Iterator[None]:
        steps = original.__wrapped__(*args, **kwargs)
        next(steps)
        try:
            yield
        finally:
            next(steps, None)  # resumes it after its `yield`: the restore, whether the block raised or not

    apply_patches._hf_attn_plus = True
    monkey_patching.apply_patches = modeling_utils.apply_patches = apply_patches


def _teach_transformers_to_initialise_mechanism_weights() -> None:
    # from_pretrained builds modules on the meta device and initialises missing keys with the model's `_init_weights`,
    # which knows nothing of these modules: without this they would hold uninitialised memory.
    if getattr(PreTrainedModel._initialize_weights, "_hf_attn_plus", False):
        return
    original = PreTrainedModel._initialize_weights

    def _initialize_weights(self: PreTrainedModel, module: nn.Module, is_custom_code: bool = False) -> None:
        if isinstance(module, MechanismWeights):
            tensors = [*module.parameters(), *module.buffers()]
            if tensors and all(getattr(t, "_is_hf_initialized", False) for t in tensors):
                module._is_hf_initialized = True
            if not getattr(module, "_is_hf_initialized", False):
                # A checkpoint from before a weight existed: initialise the module, then put back what it loaded.
                kept = [(t, t.detach().clone()) for t in tensors if getattr(t, "_is_hf_initialized", False)]
                with torch.no_grad():
                    module.reset_parameters()
                    for tensor, value in kept:
                        tensor.copy_(value)
                module._is_hf_initialized = True
            return
        original(self, module, is_custom_code)

    _initialize_weights._hf_attn_plus = True
    PreTrainedModel._initialize_weights = _initialize_weights


def _make_alias_module_listings_safe() -> None:
    # transformers 5.17's `apply_patches` (run by every from_pretrained once any patch mapping exists) calls dir() on
    # each transformers module; its legacy alias modules (e.g. models.aria.image_processing_aria_fast) import their
    # target inside dir(), so a missing optional dependency (torchvision) made every from_pretrained fail. An alias
    # whose target cannot be imported holds no attention class: list it as empty.
    for name, module in list(sys.modules.items()):
        listing = vars(module).get("__dir__") if name.startswith("transformers") and module is not None else None
        if listing is None or getattr(listing, "_hf_attn_plus", False):
            continue

        def safe_listing(listing=listing) -> list[str]:
            try:
                return listing()
            except ImportError:
                return []

        safe_listing._hf_attn_plus = True
        module.__dir__ = safe_listing


def _make_lazy_module_listing_linear() -> None:
    # With any patch mapping registered, every from_pretrained / from_config lists all transformers modules, and
    # `_LazyModule.__dir__` is quadratic in the exported names: ~2 s per model load here, even for a tiny model.
    # Same listing, same order, in linear time.
    from transformers.utils.import_utils import _LazyModule

    if getattr(_LazyModule.__dir__, "_hf_attn_plus", False):
        return

    def __dir__(self: _LazyModule) -> list[str]:
        result = list(types.ModuleType.__dir__(self))
        seen = set(result)
        for attr in self.__all__:
            if attr not in seen:
                seen.add(attr)
                result.append(attr)
        return result

    __dir__._hf_attn_plus = True
    _LazyModule.__dir__ = __dir__


_register_patches()
_make_patch_context_exception_safe()
_make_alias_module_listings_safe()
_make_lazy_module_listing_linear()
_teach_transformers_to_initialise_mechanism_weights()
