"""What the attention kernels read instead of a [q, kv] keep mask: positions, a rule's integers and sorted lists.

A key slot n holds real position s = n - key_start (real when 0 <= s < key_count: a sequence's real keys are one
contiguous run of slots); query row i has real position query_pos[i] (-1: sees nothing). Query t sees key s when
s <= t. Among those, `KeySet` keeps s when its rule keeps (t, s) (FlexAttention's mask_mod, evaluated per tile in the
kernel: sinks, window, dilation, local blocks) or when s // list_block_size is in the row's sorted block list or s
in its sorted token list (a binary search per key of a tile). Memory is O(B * (q + kv)) plus the lists,
O(q * listed); an optional dense `restrict` is only for a mask a model hands over (DeepSeek-V3.2's indexer).

Kernels take these as one fixed group of arguments (`arguments()`), so every kernel signature lists them in the same
order: see keep_tile.py.
"""

from __future__ import annotations

import dataclasses

import torch

# Unused list entries: larger than any position, so they sort after the used ones and never match.
UNUSED = 2**31 - 1
# A window this long covers any context that fits int32 positions (a rule's "every key").
EVERY = 2**30


@dataclasses.dataclass(frozen=True)
class Visibility:
    query_pos: torch.Tensor  # [B, q] int32
    key_start: torch.Tensor  # [B] int32
    key_count: torch.Tensor  # [B] int32
    restrict: torch.Tensor | None = None  # [B, H|1, q, kv] bool, or None

    def arguments(self, shape: tuple[int, int, int, int]) -> tuple:
        """(QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n) for queries of `shape`
        [B, Hq, q, kv]; RESTRICT is a stand-in pointer when there is none."""
        qpos = self.query_pos
        if self.restrict is None:
            return (qpos, self.key_start, self.key_count, qpos, *qpos.stride(), 0, 0, 0, 0)
        # Broadcast dims keep stride 0 (a shared mask is never copied per head); bool is read as bytes.
        restrict = self.restrict.expand(shape).view(torch.uint8)
        return (qpos, self.key_start, self.key_count, restrict, *qpos.stride(), *restrict.stride())


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """hf_attn_plus.structure.PositionRule's integers (window clamped to EVERY)."""

    sinks: int = 0
    window: int = 0
    dilation: int = 0
    block_size: int = 1
    local_blocks: int = 0

    def near_start(self, t: torch.Tensor) -> torch.Tensor:
        """First position of the contiguous run the rule keeps up to each t (window, local blocks), as PositionRule."""
        start = t + 1
        if self.window:
            start = torch.minimum(start, t - self.window + 1)
        if self.local_blocks:
            start = torch.minimum(start, (t // self.block_size - self.local_blocks + 1) * self.block_size)
        return start


@dataclasses.dataclass(frozen=True)
class KeySet:
    visibility: Visibility
    rule: KeyRule = KeyRule()
    blocks: torch.Tensor | None = None  # [B, H|1, q, n] int32, ascending per row, UNUSED padded
    block_size: int = 1  # of the listed blocks
    tokens: torch.Tensor | None = None  # [B, H|1, q, n] int32 positions, ascending per row, UNUSED padded

    def arguments(self, shape: tuple[int, int, int, int]) -> tuple[tuple, dict]:
        """(the visibility arguments, then BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks,
        n_tokens; the constexprs) in the order every tile kernel's signature lists them."""
        batch, q_heads, q_len, _ = shape
        stand_in = self.visibility.query_pos
        lists, constants = [], {}
        for name, listed in (("BLOCK", self.blocks), ("TOKEN", self.tokens)):
            if listed is None:
                lists.append((stand_in, (0, 0, 0, 0), 0))
            else:
                listed = listed.expand(batch, q_heads, q_len, -1)
                lists.append((listed, listed.stride(), listed.shape[-1]))
            # Binary-search steps: enough to narrow a list of n entries to one.
            constants[f"{name}_STEPS"] = 0 if listed is None else listed.shape[-1].bit_length()
        (blocks, block_strides, n_blocks), (tokens, token_strides, n_tokens) = lists
        rule = self.rule
        constants.update(
            HAS_RESTRICT=self.visibility.restrict is not None, HAS_BLOCKS=self.blocks is not None,
            HAS_TOKENS=self.tokens is not None, SINKS=rule.sinks, WINDOW=min(rule.window, EVERY),
            DILATION=rule.dilation, RULE_BLOCK=rule.block_size, LOCAL_BLOCKS=rule.local_blocks,
            LIST_BLOCK=self.block_size,
        )
        arguments = (
            *self.visibility.arguments(shape), blocks, tokens, *block_strides, *token_strides, n_blocks, n_tokens
        )
        return arguments, constants
