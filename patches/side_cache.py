"""Per-layer side state derived from the cached keys (block summaries, an indexer's own key cache), kept in
transformers' `DynamicCache` next to the keys it summarises, so a decode step folds in only the new keys.

A mechanism asks for it with `Mechanism(side_cache=True)` (one that evicts keys with `kept_keys` gets an
`EvictingLayer` from the same hook instead: streaming_cache.py). During cached inference the attention pre-hook
(recurrent_cache._before_attention) swaps the layer's `DynamicLayer` for a `SideCacheLayer`, a normal KV layer that
also holds `side: dict[name, state]`, and the attention call sees it as `ctx.cache_layer`. The mechanism then calls
`side_state(ctx, name, factory, key)`. Without a cache layer (no cache, training, a model class hf_attn_plus does not
patch) the same call builds the state from every key: the recompute path, same values, O(context) work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..registry import PREFIX, get_mechanism, in_dense_ends, options_from_config
from .streaming_cache import EvictingLayer, GroupEvictingLayer


class SideState(Protocol):
    """What a side state provides: it folds keys in cache-slot order and can follow the cache's batch edits."""

    covered: int  # cache slots folded in so far

    def extend(self, keys: torch.Tensor, key_pos: torch.Tensor) -> None:
        """Fold keys [B, Hkv, n, D] of slots covered..covered+n-1 with their positions [B, 1, 1, n] (-1: padding);
        advances `covered` by n."""

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension edit (beam reorder, repeat, select) to every tensor held."""


State = TypeVar("State", bound=SideState)


class SlotBuffer:
    """A tensor grown along its slot dimension by appends, with amortised O(1) cost per slot (capacity doubles), for
    side states that keep one entry per cache slot."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.length = 0
        self._data: torch.Tensor | None = None

    @property
    def value(self) -> torch.Tensor:
        if self._data is None:
            raise ValueError("SlotBuffer is empty: append to it first")
        return self._data.narrow(self.dim, 0, self.length)

    def append(self, new: torch.Tensor) -> None:
        filled = self.length + new.shape[self.dim]
        capacity = 0 if self._data is None else self._data.shape[self.dim]
        if filled > capacity:
            shape = list(new.shape)
            shape[self.dim] = max(filled, 2 * capacity)
            grown = new.new_empty(shape)
            if self._data is not None:
                grown.narrow(self.dim, 0, self.length).copy_(self.value)
            self._data = grown
        self._data.narrow(self.dim, self.length, new.shape[self.dim]).copy_(new)
        self.length = filled

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._data is not None:
            self._data = fn(self._data)


class SideCacheLayer(DynamicLayer):
    """A `DynamicLayer` (same keys, values, masks) that also carries the side states of the mechanisms using it.

    Batch edits are applied to the side states too; `crop` and `reset` drop them (they are rebuilt from the keys on
    the next call: correct, only slower once).
    """

    def __init__(self) -> None:
        super().__init__()
        self.side: dict[str, Any] = {}

    @classmethod
    def replacing(cls, layer: DynamicLayer) -> SideCacheLayer:
        """A side-cache layer holding whatever `layer` holds (keys, values, lengths), with no side state yet."""
        side_layer = cls()
        side_layer.__dict__.update(layer.__dict__)
        side_layer.side = {}
        return side_layer

    def _map_side(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for state in self.side.values():
            state.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_side(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_side(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_side(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.side.clear()

    def reset(self) -> None:
        super().reset()
        self.side.clear()


def side_state(ctx: Any, name: str, factory: Callable[[], State], key: torch.Tensor) -> State:
    """The state `name` of this layer extended by the keys it has not folded yet: key [B, Hkv, kv, D] is the attention
    call's full key tensor (every cache slot), `ctx.key_pos` numbers them.

    With a cache layer the state persists across calls and a decode step folds only the new slots; without one,
    `factory()` is filled with every key. `name` must identify everything the state depends on (e.g. a block size).
    """
    layer = ctx.cache_layer
    state = None if layer is None else layer.side.get(name)
    kv_len = key.shape[2]
    if layer is not None and layer.get_seq_length() != kv_len:
        raise ValueError(f"hf_attn_plus side state {name!r}: the cache layer holds {layer.get_seq_length()} slots, the "
                         f"attention call {kv_len} keys; a side state must see the layer's full key tensor")
    if state is None or state.covered > kv_len:
        state = factory()
        if layer is not None:
            layer.side[name] = state
    if state.covered < kv_len:
        with torch.no_grad():
            state.extend(key[:, :, state.covered :].detach(), ctx.key_pos[..., state.covered :])
    return state


def cache_layer_for(module: nn.Module, cache: Any) -> DynamicLayer | None:
    """The cache layer at `module.layer_idx` a mechanism reads in cached inference, swapped in for the plain
    `DynamicLayer` there: a `SideCacheLayer` when the active mechanism declares `side_cache`, an `EvictingLayer`
    (streaming_cache.py) when its `kept_keys` asks for eviction, a `GroupEvictingLayer` when its `evicted_groups`
    names groups; else None (recompute path, plain cache). A layer that already evicts some groups is refused to any
    call that would read every group."""
    layer = _cache_layer_for(module, cache)
    layer_idx = module.layer_idx
    held = cache.layers[layer_idx] if isinstance(cache, DynamicCache) and len(cache.layers) > layer_idx else None
    if isinstance(held, GroupEvictingLayer) and layer is not held:
        raise ValueError(
            f"hf_attn_plus per-group eviction: cache layer {layer_idx} keeps only some KV groups' keys (groups "
            f"{held.evicted_groups.tolist()} evicted) and this call ({module.config._attn_implementation}) reads every "
            "group: start generation again with a fresh DynamicCache after changing the budget or the mechanism"
        )
    return layer


def _layers_up_to(cache: DynamicCache, layer_idx: int) -> list[DynamicLayer]:
    """The cache's layer list, grown with plain layers to hold `layer_idx`: a layer is swapped in before its first
    update, when the list may not reach it yet."""
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    return cache.layers


def _cache_layer_for(module: nn.Module, cache: Any) -> DynamicLayer | None:
    implementation = getattr(module.config, "_attn_implementation", None)
    if not (isinstance(implementation, str) and implementation.startswith(PREFIX)) or module.training:
        return None
    mechanism = get_mechanism(implementation)
    opts = options_from_config(mechanism, module.config)
    kept = mechanism.kept_keys(opts) if mechanism.kept_keys else None
    if kept is not None:
        return _evicting_layer(module, cache, opts, *kept)
    groups = mechanism.evicted_groups(module, opts) if mechanism.evicted_groups and cache is not None else None
    if groups is not None:
        return _group_evicting_layer(module, cache, *groups)
    if not isinstance(cache, DynamicCache) or not mechanism.side_cache:
        return None
    layer_idx = module.layer_idx
    layers = _layers_up_to(cache, layer_idx)
    if type(layers[layer_idx]) is DynamicLayer:  # sliding-window, recurrent or quantized layers are left alone
        layers[layer_idx] = SideCacheLayer.replacing(layers[layer_idx])
    return layers[layer_idx] if isinstance(layers[layer_idx], SideCacheLayer) else None


def _evicting_layer(module: nn.Module, cache: Any, opts: Any, sinks: int, window: int) -> EvictingLayer | None:
    """The layer's EvictingLayer; None without a cache, in a layer the `layers` / `dense_*` options keep the mechanism
    out of (it attends every key there), or in a layer with the model's own window (its cache already drops old keys)."""
    layers_option = opts.layers
    left_out = isinstance(layers_option, list) and module.layer_idx not in layers_option
    if cache is None or left_out or in_dense_ends(opts, module):
        return None
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"hf_attn_plus eviction (evict=True) keeps its keys in transformers' DynamicCache; got {type(cache).__name__}"
            " (use cache_implementation='dynamic', or evict=False)"
        )
    layer_idx = module.layer_idx
    layers = _layers_up_to(cache, layer_idx)
    layer = layers[layer_idx]
    if isinstance(layer, DynamicSlidingWindowLayer) or (layers_option == "sliding_attention"):
        return None
    if type(layer) is DynamicLayer:
        layers[layer_idx] = layer = EvictingLayer.replacing(layer, sinks, window)
    if not isinstance(layer, EvictingLayer) or (layer.sinks, layer.window) != (sinks, window):
        held = type(layer).__name__ if not isinstance(layer, EvictingLayer) else f"sinks={layer.sinks}, window={layer.window}"
        raise ValueError(
            f"hf_attn_plus eviction: cache layer {layer_idx} is {held}; evicting sinks={sinks}, window={window} needs a "
            "fresh DynamicCache (start generation again after changing the mechanism or its options)"
        )
    return layer


def _group_evicting_layer(
    module: nn.Module, cache: Any, evicted: torch.Tensor, sinks: int, window: int
) -> GroupEvictingLayer | None:
    """The layer's GroupEvictingLayer, made on its first cached call (None in a layer with the model's own window);
    refused on another cache or another split."""
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"hf_attn_plus per-group eviction (a fallback with evict=True) keeps its keys in transformers' DynamicCache; "
            f"got {type(cache).__name__} (use cache_implementation='dynamic', or evict=False)"
        )
    layer_idx = module.layer_idx
    layers = _layers_up_to(cache, layer_idx)
    layer = layers[layer_idx]
    if isinstance(layer, DynamicSlidingWindowLayer):  # the model's own window already drops old keys
        return None
    evicted = evicted.cpu()
    if type(layer) is DynamicLayer:
        layers[layer_idx] = layer = GroupEvictingLayer.replacing(layer, evicted, sinks, window)
    split = None
    if isinstance(layer, GroupEvictingLayer):
        split = (layer.evicted.tolist(), layer.streaming.sinks, layer.streaming.window)
    if split != (evicted.tolist(), sinks, window):
        raise ValueError(
            f"hf_attn_plus per-group eviction: cache layer {layer_idx} is {type(layer).__name__}"
            + ("" if split is None else f" evicting groups {split[0]} with sinks={split[1]}, window={split[2]}")
            + f"; this call evicts groups {evicted.tolist()} with sinks={sinks}, window={window}: start generation "
            "again with a fresh DynamicCache after changing the budget or the options"
        )
    return layer
