"""Per-block elementwise min/max of keys, extended as the KV cache grows instead of recomputed every step."""

from __future__ import annotations

import torch


class BlockSummaries:
    """Equals selection.block_key_bounds(all keys so far, their blocks, num_blocks) after every `extend`.

    Blocks are numbered by real (non-padding) key position, as selection.key_blocks does, so a decode step updates
    the one block its new key falls in (or opens the next): O(new keys) work, amortised O(1) growth of the buffers.
    """

    def __init__(self) -> None:
        self.num_blocks = 0
        # [B, Hkv, capacity + 1, D]; the last slot absorbs padding keys (block -1) and is never read.
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    @property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) [B, Hkv, num_blocks, D]; blocks with no key yet hold +inf / -inf."""
        if self._min is None:
            raise ValueError("BlockSummaries is empty: extend it with keys first")
        return self._min[:, :, : self.num_blocks], self._max[:, :, : self.num_blocks]

    def extend(self, keys: torch.Tensor, blocks: torch.Tensor) -> None:
        """Fold new keys [B, Hkv, n, D] with their block indices [B, 1, 1, n] (-1: padding) into the summaries."""
        batch, kv_heads, n, dim = keys.shape
        self.num_blocks = max(self.num_blocks, int(blocks.max()) + 1)
        capacity = 0 if self._min is None else self._min.shape[2] - 1
        if self.num_blocks > capacity:
            self._grow(keys, max(self.num_blocks, 2 * capacity))
        scratch = self._min.shape[2] - 1
        slot = torch.where(blocks < 0, scratch, blocks).reshape(batch, 1, n, 1).expand(batch, kv_heads, n, dim)
        self._min.scatter_reduce_(2, slot, keys, "amin")
        self._max.scatter_reduce_(2, slot, keys, "amax")

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        batch, kv_heads, _, dim = like.shape
        new_min = like.new_full((batch, kv_heads, capacity + 1, dim), float("inf"))
        new_max = like.new_full((batch, kv_heads, capacity + 1, dim), float("-inf"))
        if self._min is not None:
            old = self._min.shape[2] - 1
            new_min[:, :, :old] = self._min[:, :, :old]
            new_max[:, :, :old] = self._max[:, :, :old]
        self._min, self._max = new_min, new_max
