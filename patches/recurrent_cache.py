"""O(1)-memory decode for linear-family mechanisms inside transformers' own `DynamicCache`.

The same hooks hand a mechanism the attention module's input hidden states when its weights read them (gates), and
give mechanisms declaring `side_cache` their `SideCacheLayer` (side_cache.py) as `module.attn_plus_cache_layer`.

The model code calls `past_key_values.update(key, value, layer_idx)` and hands the result to the attention function;
it never learns that a layer keeps a state. A forward-pre-hook on each patched attention module swaps the cache's
layer for a `RecurrentStateLayer` before the first update, the way qwen3_next / olmo_hybrid put a
`LinearAttentionLayer` there: it returns only the keys the mechanism still needs (the newest ones, plus a hybrid's
window), and the mechanism's `attend` reads and writes the running state it keeps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..registry import PREFIX, get_mechanism, options_from_config
from .attn_plus import MechanismWeights, runs_in, unwrapped
from .side_cache import cache_layer_for


class RecurrentStateLayer(DynamicLayer):
    """One layer's decode memory: the mechanism's fixed-size `state` and the last `window` key/value slots.

    `keys`/`values` hold at most `window` slots (none for pure linear attention), so memory does not grow with the
    number of generated tokens. Masks are sized to exactly the slots `update` returns: `get_mask_sizes` reports the
    kept slots plus the new tokens, offset by the tokens already folded into the state.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, window: int = 0) -> None:
        super().__init__()
        self.window = window
        self.state: tuple[torch.Tensor, ...] | None = None  # written by the mechanism after each forward
        self.seen = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        start = max(keys.shape[-2] - self.window, 0) if self.window else keys.shape[-2]
        self.keys, self.values = keys[..., start:, :], values[..., start:, :]
        return keys, values

    def kept_slots(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.kept_slots()
        return kept + query_length, self.seen - kept

    def reset(self) -> None:
        super().reset()
        self.state = None
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back (no assisted/speculative decoding)")

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.state is not None:
            self.state = tuple(fn(tensor) for tensor in self.state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def memory_elements(self) -> int:
        """Elements held (window slots + state): what must not grow with generated length."""
        held = [self.keys, self.values] if self.is_initialized else []
        return sum(t.numel() for t in held + list(self.state or ()))


def _state_layer(cache: Any, layer_idx: int, window: int) -> RecurrentStateLayer:
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"hf_attn_plus recurrent mechanisms decode with transformers' DynamicCache; got {type(cache).__name__} "
            "(use cache_implementation='dynamic' or leave the cache to generate())"
        )
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, RecurrentStateLayer):
        if layer.window != window:
            raise ValueError(f"cache layer {layer_idx} keeps a window of {layer.window} slots, the mechanism needs {window}")
        return layer
    if layer.get_seq_length() > 0:
        raise ValueError(
            f"cache layer {layer_idx} already holds keys from another attention implementation; a recurrent mechanism "
            "must start from an empty cache"
        )
    cache.layers[layer_idx] = RecurrentStateLayer(window)
    return cache.layers[layer_idx]


def _before_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values", args[3] if len(args) > 3 else None)
    module.attn_plus_cache_layer = cache_layer_for(module, cache)  # read by attention_forward into ctx.cache_layer
    weights = unwrapped(module.attn_plus)
    if not isinstance(weights, MechanismWeights):
        return
    served = weights.hooked()
    if served.reads_hidden_states:  # gates computed from the token, which the attention function does not receive
        served.hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if not served.recurrent:
        return
    # Weights of the running mechanism in a layer its `layers` / `dense_*` options leave out (kept from an earlier
    # choice) stay unused: that layer runs the model's own attention and keeps its own cache layer.
    active = module.config._attn_implementation == PREFIX + weights.mechanism and runs_in(
        options_from_config(get_mechanism(weights.mechanism), module.config), module
    )
    served.state_layer = _state_layer(cache, module.layer_idx, served.cache_window) if active and cache is not None else None


def _after_attention(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module.attn_plus_cache_layer = None
    weights = unwrapped(module.attn_plus)
    if isinstance(weights, MechanismWeights):
        served = weights.hooked()
        served.state_layer = served.hidden_states = None


def install_state_hooks(attention: nn.Module) -> None:
    attention.register_forward_pre_hook(_before_attention, with_kwargs=True)
    attention.register_forward_hook(_after_attention, with_kwargs=True, always_call=True)
