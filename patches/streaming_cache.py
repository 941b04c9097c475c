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
