"""Per-block key min/max, extended as the KV cache grows instead of recomputed every step."""

from __future__ import annotations

from collections.abc import Callable

import torch

class BlockSummaries:
    """After every `extend`, over all keys folded so far: `bounds` equals selection.block_key_bounds (blocks of
    `block_size` real positions, numbered as selection.key_blocks does). The slots a block spans need no state: real
    keys are contiguous, so block j starts at slot key_start + j * block_size.

    A decode step updates the one block its new key falls in (or opens the next): O(new keys) work, amortised O(1)
    growth of the buffers. A side state of patches.side_cache (`covered`, `extend(keys, key_pos)`, `map_batch`).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.covered = 0  # cache slots folded in
        self.num_blocks = 0
        # [B, Hkv, capacity + 1, D]; the last slot absorbs padding keys (block -1), never read.
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    @property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) [B, Hkv, num_blocks, D]; blocks with no key yet hold +inf / -inf."""
        self._check_filled()
        return self._min[:, :, : self.num_blocks], self._max[:, :, : self.num_blocks]

    def extend(self, keys: torch.Tensor, key_pos: torch.Tensor) -> None:
        """Fold keys [B, Hkv, n, D] of cache slots covered..covered+n-1, real positions key_pos [B, 1, 1, n] (-1:
        padding), into the summaries."""
        batch, kv_heads, n, dim = keys.shape
        if self._min is not None and self._min.shape[:2] != keys.shape[:2]:
            raise ValueError(f"BlockSummaries hold [batch, kv heads] {list(self._min.shape[:2])}, got keys {list(keys.shape)}")
        blocks = torch.where(key_pos >= 0, key_pos // self.block_size, -1).reshape(batch, n)
        self.num_blocks = max(self.num_blocks, int(blocks.max()) + 1)
        capacity = -1 if self._min is None else self._min.shape[2] - 1
        if self.num_blocks > capacity:
            self._grow(keys, max(self.num_blocks, 2 * capacity))
        slot = torch.where(blocks < 0, self._min.shape[2] - 1, blocks)
        per_dim = slot[:, None, :, None].expand(batch, kv_heads, n, dim)
        self._min.scatter_reduce_(2, per_dim, keys, "amin")
        self._max.scatter_reduce_(2, per_dim, keys, "amax")
        self.covered += n

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._min is not None:
            self._min, self._max = fn(self._min), fn(self._max)

    def _check_filled(self) -> None:
        if self._min is None:
            raise ValueError("BlockSummaries is empty: extend it with keys first")

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        batch, kv_heads, _, dim = like.shape
        new_min = like.new_full((batch, kv_heads, capacity + 1, dim), float("inf"))
        new_max = like.new_full((batch, kv_heads, capacity + 1, dim), float("-inf"))
        if self._min is not None:
            old = self._min.shape[2] - 1
            new_min[:, :, :old], new_max[:, :, :old] = self._min[:, :, :old], self._max[:, :, :old]
        self._min, self._max = new_min, new_max


class RunMeans:
    """After every `extend`, over all keys folded so far: the mean key of every run of `run_size` consecutive real
    positions (run r holds positions r*run_size .. r*run_size + run_size - 1), equal to selection.pooled_blocks over
    selection.key_blocks(ctx, run_size); runs with no key yet are 0.

    A decode step adds its new key to one run's sum: O(new keys) work, so a step's estimate costs the scoring of the
    run means only, not a pass over the context. A side state of patches.side_cache, like BlockSummaries.
    """

    def __init__(self, run_size: int) -> None:
        self.run_size = run_size
        self.covered = 0
        self.num_runs = 0
        # [B, Hkv, capacity + 1, D] sums and [B, 1, capacity + 1, 1] counts; the last slot absorbs padding keys.
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def means(self, num_runs: int) -> torch.Tensor:
        """[B, Hkv, num_runs, D]: the first `num_runs` run means (runs past the folded keys are 0)."""
        if self._sums is None:
            raise ValueError("RunMeans is empty: extend it with keys first")
        held = min(num_runs, self.num_runs)
        means = self._sums[:, :, :held] / self._counts[:, :, :held].clamp(min=1)
        return torch.nn.functional.pad(means, (0, 0, 0, num_runs - held))

    def extend(self, keys: torch.Tensor, key_pos: torch.Tensor) -> None:
        """Fold keys [B, Hkv, n, D] of cache slots covered..covered+n-1, real positions key_pos [B, 1, 1, n] (-1:
        padding), into the run sums."""
        batch, kv_heads, n, dim = keys.shape
        if self._sums is not None and self._sums.shape[:2] != keys.shape[:2]:
            raise ValueError(f"RunMeans hold [batch, kv heads] {list(self._sums.shape[:2])}, got keys {list(keys.shape)}")
        runs = torch.where(key_pos >= 0, key_pos // self.run_size, -1).reshape(batch, n)
        self.num_runs = max(self.num_runs, int(runs.max()) + 1)
        if self._sums is None or self.num_runs > self._sums.shape[2] - 1:
            self._grow(keys, max(self.num_runs, 0 if self._sums is None else 2 * (self._sums.shape[2] - 1)))
        slot = torch.where(runs < 0, self._sums.shape[2] - 1, runs).reshape(batch, 1, n, 1)
        self._sums.scatter_add_(2, slot.expand(batch, kv_heads, n, dim), keys)
        self._counts.scatter_add_(2, slot, self._counts.new_ones(batch, 1, n, 1))
        self.covered += n

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._sums is not None:
            self._sums, self._counts = fn(self._sums), fn(self._counts)

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        batch, kv_heads, _, dim = like.shape
        sums = like.new_zeros(batch, kv_heads, capacity + 1, dim)
        counts = like.new_zeros(batch, 1, capacity + 1, 1)
        if self._sums is not None:
            old = self._sums.shape[2] - 1
            sums[:, :, :old], counts[:, :, :old] = self._sums[:, :, :old], self._counts[:, :, :old]
        self._sums, self._counts = sums, counts
