"""StreamingLLM's constant-memory cache: a KV layer that evicts the keys no later query can attend.

A mechanism whose every future query reads only the first `sinks` real tokens and the last `window` keys
(sliding_window with `evict=True`) declares it with `Mechanism.kept_keys`; in cached inference the attention pre-hook
(recurrent_cache._before_attention) then swaps the layer's `DynamicLayer` for an `EvictingLayer`. Before each update
it drops what the new queries cannot see, so between steps it holds the head slots (left padding + sinks) and the
last `window - 1` slots: flat memory however long the generation runs.

Positions stay the real ones. The layer reports its logical length (every token it has seen) to the mask, so the
forward's TokenPositions number every slot ever written, and the evicted slots form one gap
[head, head + evicted) in slot order; the attention context drops the gap's positions (`key_gap`), and the chunked
reference maps a key's position to its slot around the gap. Batch edits (beams, repeats, selection) act on every
row alike, so the gap survives them; `crop` rolls back as far as no evicted key is needed again.

DuoAttention's variant evicts per KV group: a mechanism naming, with `Mechanism.evicted_groups`, the groups of a layer
that read only sinks + window (head_budget's groups whose gates are all 0, with a fallback that evicts) gets a
`GroupEvictingLayer`, which keeps every key of the other groups and an `EvictingLayer` for those.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class EvictingLayer(DynamicLayer):
    """A `DynamicLayer` that keeps the head slots and the last `window - 1` slots before each new update."""

    is_compileable = False

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__()
        self.sinks, self.window = sinks, window
        self.head: int | None = None  # slots kept at the start: set by the first attention call (left padding known)
        self.evicted = 0

    @classmethod
    def replacing(cls, layer: DynamicLayer, sinks: int, window: int) -> EvictingLayer:
        """An evicting layer holding whatever `layer` holds (nothing evicted yet)."""
        evicting = cls(sinks, window)
        evicting.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in ("sinks", "window", "head", "evicted")})
        return evicting

    def key_gap(self, key_start: torch.Tensor) -> tuple[int, int] | None:
        """The evicted slot range (first slot, count) of the keys this call receives, or None. The first call fixes
        the head: every sequence's sinks lie before it (key_start [B]: slot of each sequence's position 0)."""
        if self.head is None:
            self.head = int(key_start.max()) + self.sinks
        return (self.head, self.evicted) if self.evicted else None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_initialized and self.head is not None:
            # The new queries start after every held slot: they see at most the last window - 1 of them.
            held = self.keys.shape[-2]
            tail = max(self.head, held - (self.window - 1))
            if tail > self.head:
                self.keys = torch.cat((self.keys[..., : self.head, :], self.keys[..., tail:, :]), dim=-2)
                self.values = torch.cat((self.values[..., : self.head, :], self.values[..., tail:, :]), dim=-2)
                self.evicted += tail - self.head
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        """Tokens seen, evicted ones included: what generate's cache positions and the mask count."""
        return super().get_seq_length() + self.evicted

    def crop(self, tokens_to_remove: int) -> None:
        # After the rollback the next queries need the last window - 1 slots before them, none of them evicted.
        removed = -tokens_to_remove
        left = super().get_seq_length() - removed
        if removed > 0 and self.evicted and left - self.head < self.window - 1:
            raise ValueError(
                f"hf_attn_plus evicting cache: cannot remove {removed} tokens; {self.evicted} keys were evicted and "
                f"the queries after the rollback would need {self.window - 1 - (left - self.head)} of them "
                f"(at most {super().get_seq_length() - self.head - (self.window - 1)} tokens can be removed here)"
            )
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.head, self.evicted = None, 0


class GroupEvictingLayer(DynamicLayer):
    """DuoAttention's cache: every key of the KV groups that read the whole context, and of the other (`evicted`)
    groups only what an `EvictingLayer` keeps (head slots + the last `window - 1`). `update` returns the kept groups'
    keys and values (what the attention function receives); the evicted groups' are `streaming.keys` / `.values`,
    numbered by `streaming.key_gap`. Which groups are evicted is fixed when the layer is made: they must not read an
    evicted key again."""

    is_compileable = False

    def __init__(self, evicted: torch.Tensor, sinks: int, window: int) -> None:
        super().__init__()
        self.evicted = evicted.clone()  # [Hkv] bool
        self.kept_groups, self.evicted_groups = (~evicted).nonzero().flatten(), evicted.nonzero().flatten()
        self.streaming = EvictingLayer(sinks, window)

    @classmethod
    def replacing(cls, layer: DynamicLayer, evicted: torch.Tensor, sinks: int, window: int) -> GroupEvictingLayer:
        if layer.get_seq_length() > 0:
            raise ValueError(
                "hf_attn_plus per-group eviction must start from an empty cache layer (it holds "
                f"{layer.get_seq_length()} tokens): start generation again with a fresh DynamicCache"
            )
        return cls(evicted, sinks, window)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self.evicted_groups.to(key_states.device)
        self.streaming.update(key_states.index_select(1, groups), value_states.index_select(1, groups))
        kept = self.kept_groups.to(key_states.device)
        return super().update(key_states.index_select(1, kept), value_states.index_select(1, kept), *args, **kwargs)

    def get_seq_length(self) -> int:
        """Tokens seen (the streaming part counts evicted ones; the kept groups may be none)."""
        return self.streaming.get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        self.streaming.crop(tokens_to_remove)  # refuses first if it would need an evicted key
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.streaming.reorder_cache(beam_idx)
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.streaming.batch_repeat_interleave(repeats)
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.streaming.batch_select_indices(indices)
        super().batch_select_indices(indices)

    def reset(self) -> None:
        self.streaming.reset()
        super().reset()

    def memory_elements(self) -> int:
        """Elements held by keys and values of both parts: the evicted groups' stop growing after the prompt."""
        return sum(t.numel() for layer in (self, self.streaming) if layer.is_initialized for t in (layer.keys, layer.values))
