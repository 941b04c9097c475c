"""The one attention entry point transformers calls for every `hf_attn_plus:<name>` implementation.

It turns transformers' arguments (mask or None, GQA layout, cache-extended keys, DeepSeek-V3.2 `indices`) into an
AttentionContext, asks the mechanism which keys each query keeps, and runs the kernel or the reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask, sliding_window_overlay

from .chunked_attention import selected_attention
from .flex_attention import check_flex, flex_selected_attention
from .kernels.sparse_attention import decoding
from .masking import AttentionContext, TokenPositions, build_context, context_from_positions, indices_to_mask, visible_from_mask
from .patches.attn_plus import runs_in, weights_class
from .reference import default_scaling, length_scale
from .registry import Mechanism, OptionError, all_mechanisms, delegate, in_dense_ends, options_from_config
from .structure import DENSE, Selection

# The model's logit options (attention kwargs -> AttentionContext fields): the chunked reference applies them; a
# mechanism not computing through it refuses rather than silently leaving them out.
_LOGIT_OPTIONS = {"softcap": "softcap", "s_aux": "sinks"}
# `attend` mechanisms whose reference runs the chunked reference or hands over through run_mechanism (which checks
# the mechanism it hands over to); the others compute their own softmax.
_ATTEND_HONOURING_LOGIT_OPTIONS = ("head_budget", "santa", "stochastic_routing")
# `attend` mechanisms whose training path selects over the whole sequence, beyond the model's own sliding window.
_TRAINING_BEYOND_MODEL_WINDOW = ("lighthouse",)


# Called with (ctx, selection, query heads) after every selection the reference or FlexAttention runs: how
# `compare` counts what a data-dependent selection keeps on a model's real queries and keys (`observing_selections`).
_SELECTION_OBSERVERS: list[Callable[[AttentionContext, Selection, int], None]] = []


@contextlib.contextmanager
def observing_selections(observer: Callable[[AttentionContext, Selection, int], None]) -> Iterator[None]:
    """Calls `observer(ctx, selection, query_heads)` for each selection made inside the block (reference and flex
    backends; the Triton kernels select internally and are not observed)."""
    _SELECTION_OBSERVERS.append(observer)
    try:
        yield
    finally:
        _SELECTION_OBSERVERS.remove(observer)


def _selected(mechanism: Mechanism, query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: Any) -> Selection:
    with torch.no_grad():
        selection = mechanism.select(query, key, ctx, opts)
        for observer in _SELECTION_OBSERVERS:
            observer(ctx, selection, query.shape[1])
    return selection


class UnsupportedModelError(ValueError):
    """The model or layer asks for attention semantics hf_attn_plus does not implement."""


def check_model_supported(config: Any, model: torch.nn.Module | None = None) -> None:
    """Refuse what the mechanisms cannot honour: they replace the attention function of a decoder-only causal LM
    whose attention goes through transformers' AttentionInterface (`model`, when known, must declare it)."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"hf_attn_plus supports decoder-only causal LMs; model_type {model_type!r} is an encoder-decoder"
        )
    if not getattr(config, "is_causal", True):
        raise UnsupportedModelError(
            f"hf_attn_plus mechanisms are causal; this {model_type!r} config sets is_causal=False (bidirectional)"
        )
    if model is not None and not model.is_backend_compatible():  # a PeftModel forwards this to its base model
        raise UnsupportedModelError(
            f"hf_attn_plus replaces the attention function of transformers' AttentionInterface; {type(model).__name__} "
            f"(model_type {model_type!r}) does not compute its attention through it"
        )


# Models whose own code reads the 4-D mask (DeepSeek-V3.2's lightning indexer scores against it): they get
# transformers' dense mask, and positions are read off it.
DENSE_MASK_MODELS = ("deepseek_v32",)


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> TokenPositions | torch.Tensor:
    """The real-token positions of keys and queries (O(B * (q + kv)), once per forward for every layer), in place
    of transformers' [B, 1, q, kv] mask."""
    config = kwargs.get("config")
    if config is not None:
        check_model_supported(config)
    if isinstance(attention_mask, TokenPositions):  # made already, by generate() for a compilable cache
        return attention_mask
    device = kwargs.get("device", "cpu")
    if getattr(config, "model_type", None) in DENSE_MASK_MODELS:
        return sdpa_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            allow_is_causal_skip=False, device=device,
        )
    window = sliding_window_of(mask_function)
    if mask_function is not causal_mask_function and window is None:
        # Packed sequences, chunked attention and image-token overlays change who sees whom beyond causality,
        # padding and a window, which positions alone cannot express.
        raise UnsupportedModelError(
            f"hf_attn_plus supports causal attention with padding and the model's own sliding window only; this "
            f"{getattr(config, 'model_type', None)!r} model asks for the mask {mask_function!r} (packed sequences "
            "without an attention_mask, chunked attention or overlays)"
        )
    return TokenPositions.from_padding(
        attention_mask, batch_size, q_length, kv_length, q_offset, kv_offset, device, window
    )


def sliding_window_of(mask_function: Callable) -> int | None:
    """w when `mask_function` is exactly transformers' `sliding_window_causal_mask_function(w)` (its window overlay
    and causality, no packing or overlay on top); else None."""
    if getattr(mask_function, "__qualname__", None) != and_masks(causal_mask_function).__qualname__:
        return None
    parts = mask_function.__closure__[0].cell_contents
    overlay = sliding_window_overlay(1)
    if len(parts) != 2 or parts[1] is not causal_mask_function or parts[0].__code__ is not overlay.__code__:
        return None
    return parts[0].__closure__[0].cell_contents


def _check_call(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    if not getattr(module, "is_causal", True):
        raise UnsupportedModelError(f"hf_attn_plus mechanisms are causal; {type(module).__name__} is not causal")


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
    opts = options_from_config(mechanism, module.config)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    scaling = default_scaling(query) if scaling is None else scaling

    # Set by the patched attention classes' pre-hook for mechanisms declaring `side_cache` or `kept_keys`
    # (patches/side_cache.py).
    cache_layer = getattr(module, "attn_plus_cache_layer", None)
    if mechanism.kept_keys and mechanism.kept_keys(opts) and not hasattr(module, "attn_plus_cache_layer"):
        raise UnsupportedModelError(
            f"hf_attn_plus {mechanism.name!r} with evict=True needs an attention class hf_attn_plus patches (README: "
            f"Supported models); {type(module).__name__} is not, so its cache cannot evict"
        )
    if isinstance(attention_mask, TokenPositions):
        if attention_mask.key_pos.shape[-1] != kv_len and not hasattr(cache_layer, "key_gap"):
            attention_mask = attention_mask.trailing_keys(kv_len)
        ctx = context_from_positions(attention_mask, cache_layer)
        window = kwargs.get("sliding_window")
        if window is not None and window != ctx.window:
            raise UnsupportedModelError(
                f"{type(module).__name__} (layer {module.layer_idx}) passes sliding_window={window} but its mask has "
                f"window {ctx.window}; hf_attn_plus applies the mask's window and refuses to guess"
            )
    else:  # a dense mask (DeepSeek-V3.2, a caller's own) or None (plain causal)
        visible = visible_from_mask(attention_mask, batch, q_len, kv_len, query.device)
        indices = kwargs.get("indices")
        restrict = None if indices is None else indices_to_mask(indices, kv_len)
        ctx = build_context(visible, restrict, cache_layer)
    logit_options = {field: kwargs[name] for name, field in _LOGIT_OPTIONS.items() if kwargs.get(name) is not None}
    if logit_options:
        ctx = dataclasses.replace(ctx, **logit_options)

    if not runs_in_layer(mechanism, opts, module, ctx):
        return own_attention(module, query, key, value, ctx, scaling, dropout)
    out, probs = run_mechanism(mechanism, opts, module, query, key, value, ctx, scaling, dropout)
    return out.transpose(1, 2).contiguous(), probs


def runs_in_layer(mechanism: Mechanism, opts: Any, module: torch.nn.Module, ctx: AttentionContext) -> bool:
    """Whether the common `layers` option puts `mechanism` in this layer (a layer is 'sliding_attention' when its
    mask has the model's own window) and `dense_first` / `dense_last` leave it to the mechanism."""
    if in_dense_ends(opts, module):
        return False
    layers = opts.layers
    if layers == "all":
        return True
    if isinstance(layers, str):
        if weights_class(mechanism.name) is not None:
            # Its weights were built in the layers of this type by the config, before any mask existed: the same
            # choice here (a window the config does not declare is refused where the weights cannot honour it).
            return runs_in(opts, module)
        return layers == ("full_attention" if ctx.window is None else "sliding_attention")
    count = module.config.num_hidden_layers
    if max(layers, default=0) >= count:
        raise OptionError(
            f"hf_attn_plus mechanism {mechanism.name!r}: option 'layers' got {layers!r}; "
            f"allowed: layer indices < {count}"
        )
    return module.layer_idx in layers


def own_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own exact attention on a layer the mechanism does not run in -> (output [B, q, Hq, Dv], None):
    transformers' SDPA over the layer's visibility, or the chunked reference where the layer soft-caps its logits or
    has sinks (SDPA has neither)."""
    if ctx.softcap is None and ctx.sinks is None:
        return sdpa_attention_forward(module, query, key, value, ctx.visible, scaling=scaling, dropout=dropout)
    out = selected_attention(query, key, value, ctx, Selection(DENSE), scaling, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None


def run_mechanism(
    mechanism: Mechanism,
    opts: Any,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One mechanism on a built context -> (output [B, Hq, q, Dv], probabilities or None); wrappers that hand over
    to another mechanism (lighthouse at inference) call this with that mechanism's options."""
    if ctx.softcap is not None or ctx.sinks is not None or ctx.window is not None:
        opts = _reference_for_model_features(mechanism, opts, module, ctx)
    if opts.apply_to == "decode":
        if mechanism.select is None:
            raise OptionError(
                f"hf_attn_plus mechanism {mechanism.name!r}: apply_to='decode' is for mechanisms that select keys; this "
                "one computes its own attention (its state is built in prefill): use apply_to='all'"
            )
        if not decoding(query, key, value):
            return attend_selection(module, query, key, value, ctx, Selection(DENSE), opts, scaling, dropout), None
    if opts.backend == "flex":
        return flex_attention_call(mechanism, opts, query, key, value, ctx, scaling, dropout), None
    if mechanism.attend_has_kernel:
        return mechanism.attend(module, query, key, value, ctx, opts, scaling, dropout)
    kernel = use_kernel(mechanism, opts, query, dropout)  # raises for backend='kernel' where there is no kernel
    if kernel and ctx.key_gap is not None:  # the kernels number slots as key_start + position
        if opts.backend == "kernel":
            raise OptionError(
                f"hf_attn_plus mechanism {mechanism.name!r}: backend='kernel' does not read an evicting cache "
                "(evict=True); use backend='auto' (the reference reads sinks + window per step) or 'reference'"
            )
        kernel = False
    if mechanism.attend is not None:
        return mechanism.attend(module, query, key, value, ctx, opts, scaling, dropout)
    if kernel:
        return mechanism.kernel(query, key, value, ctx, opts, scaling), None
    selection = _selected(mechanism, query, key, ctx, opts)
    return attend_selection(module, query, key, value, ctx, selection, opts, scaling, dropout), None


def _reference_for_model_features(
    mechanism: Mechanism, opts: Any, module: torch.nn.Module, ctx: AttentionContext
) -> Any:
    """`opts` with backend='reference' for a layer with logit soft-capping, sinks or the model's own sliding window
    (the kernels implement none of them: untested with a window); raises where the call cannot honour them."""
    asked = (("logit soft-capping (softcap)", ctx.softcap), ("learned attention sinks (s_aux)", ctx.sinks))
    logit_features = [what for what, value in asked if value is not None]
    honouring = [m.name for m in all_mechanisms() if m.select is not None or m.name in _ATTEND_HONOURING_LOGIT_OPTIONS]
    if logit_features and mechanism.name not in honouring:
        raise UnsupportedModelError(
            f"hf_attn_plus mechanism {mechanism.name!r} does not implement the model's {' and '.join(logit_features)}; "
            f"mechanisms that do: {', '.join(honouring)}"
        )
    if ctx.window is not None and mechanism.family == "linear":
        # Its state sums every earlier key; past the window it would silently attend keys the model does not.
        raise UnsupportedModelError(
            f"hf_attn_plus mechanism {mechanism.name!r} keeps a state over every earlier key and does not implement "
            f"the model's own sliding window (window {ctx.window} in layer {module.layer_idx}); "
            "set option layers='full_attention' to keep it out of windowed layers"
        )
    if ctx.window is not None and module.training and mechanism.name in _TRAINING_BEYOND_MODEL_WINDOW:
        raise UnsupportedModelError(
            f"hf_attn_plus mechanism {mechanism.name!r} trains on a selection over the whole sequence, beyond the "
            f"model's own sliding window (window {ctx.window} in layer {module.layer_idx}); "
            "set option layers='full_attention' to keep it out of windowed layers"
        )
    features = logit_features + ([] if ctx.window is None else [f"the model's own sliding window ({ctx.window})"])
    if opts.backend == "flex" or (opts.backend == "kernel" and mechanism.has_kernel):
        raise OptionError(
            f"hf_attn_plus mechanism {mechanism.name!r}: backend={opts.backend!r} does not implement "
            f"{' and '.join(features)} "
            f"of layer {module.layer_idx}; use backend='auto' or 'reference' (or option 'layers' to keep the mechanism "
            "out of such layers)"
        )
    return SimpleNamespace(**{**vars(opts), "backend": "reference"})


def flex_attention_call(
    mechanism: Mechanism, opts: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    ctx: AttentionContext, scaling: float, dropout: float,
) -> torch.Tensor:
    """backend='flex': the mechanism's selection run by FlexAttention (flex_attention.py)."""
    if mechanism.select is None:
        raise OptionError(
            f"hf_attn_plus mechanism {mechanism.name!r}: backend='flex' runs mechanisms that select keys (sliding_window, "
            "dilated, block_topk, block_sparse, ...); this one computes its own attention: use 'auto', 'reference' or "
            "'kernel'"
        )
    selection = _selected(mechanism, query, key, ctx, opts)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    check_flex(selection, ctx, needs_grad, query.device, **{
        f"logit_scale={opts.logit_scale!r}": opts.logit_scale != "none", f"attention dropout={dropout}": dropout > 0,
    })
    return flex_selected_attention(query, key, value, ctx, selection, scaling)


def run_delegate(
    owner: str,
    name: str,
    options: dict[str, Any],
    common: Any,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a wrapper mechanism `owner` hands over to: 'dense' (exact attention, with the wrapper's own common options
    `common`) or the registered mechanism `name` with `options`."""
    if name == "dense":
        return attend_selection(module, query, key, value, ctx, Selection(DENSE), common, scaling, dropout), None
    mechanism, opts = delegate(owner, name, options)
    return run_mechanism(mechanism, opts, module, query, key, value, ctx, scaling, dropout)


def attend_selection(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ctx: AttentionContext,
    selection: Selection,
    opts: Any,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Exact softmax over a selection's keys (chunked, no [q, kv] tensor) with the common `logit_scale` option
    applied: the path of every `select` mechanism."""
    return selected_attention(query, key, value, ctx, selection, scaling, length_beta(module, opts), dropout)


def length_beta(module: torch.nn.Module, opts: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """beta(count) of the common `logit_scale` option for rows attending `count` keys ([..., 1] float); None when off."""
    if opts.logit_scale == "none":
        return None
    train_length = opts.train_length or module.config.max_position_embeddings
    return lambda count: length_scale(count, train_length, opts.logit_scale_c)


def use_kernel(mechanism: Mechanism, opts: Any, query: torch.Tensor, dropout: float) -> bool:
    """Whether this call runs `mechanism`'s Triton kernel under the `backend` option (also for `attend` mechanisms
    that dispatch their own kernel); raises for a forced kernel that does not exist or cannot honour the call."""
    # Also called by `attend_has_kernel` mechanisms that dispatch their own kernel (stochastic_routing, santa).
    # The kernels implement exact attention without logit scaling or attention dropout: `auto` takes the reference
    # whenever either is asked for, and a forced kernel refuses rather than silently skipping it.
    unsupported = []
    if opts.logit_scale != "none":
        unsupported.append(f"logit_scale={opts.logit_scale!r}")
    if dropout > 0:
        unsupported.append(f"attention dropout={dropout}")
    if opts.backend in ("reference", "flex"):  # flex: run_mechanism took it before any kernel was considered
        return False
    if opts.backend == "kernel":
        if not mechanism.has_kernel:
            raise OptionError(
                f"hf_attn_plus mechanism {mechanism.name!r} has no kernel; option 'backend' allowed here: "
                "'auto', 'reference'" + (", 'flex'" if mechanism.select is not None else "")
            )
        if unsupported:
            raise OptionError(
                f"hf_attn_plus mechanism {mechanism.name!r}: backend='kernel' does not implement "
                f"{' or '.join(unsupported)}; use backend='reference'"
            )
        return True
    return mechanism.has_kernel and query.is_cuda and not unsupported
