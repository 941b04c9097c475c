"""From transformers' attention mask to what every mechanism selects over: real-token positions, never [q, kv].

Positions are counted over real (non-padding) keys, so a window, a sink or a block means the same thing for a
left-padded, right-padded or unpadded copy of a sequence, and for a cached decode step as for a full recompute.
Query t sees key s exactly when both are real positions and s <= t (and t - s < the model's own window in a
sliding-window layer); every selection rule is a function of (t, s) evaluated where it is needed (per query chunk,
per tile), so the context itself is O(B * (q + kv)). A sliding-window cache layer drops old keys: the call's first
real key then has position `key_first` > 0, never renumbered.

The mask function registered for `hf_attn_plus:*` (attention.mask_function) returns a `TokenPositions`, built once
per forward from the 2-D padding mask and shared by every layer. A 4-D mask handed in directly (DeepSeek-V3.2, whose
own indexer needs it, or a caller's own mask) still works through `build_context`, which reads positions off it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class TokenPositions:
    """What the hf_attn_plus mask function gives the layers in place of a [B, 1, q, kv] mask."""

    key_pos: torch.Tensor  # [B, kv] long: position of the key among the sequence's real keys (-1: padding)
    query_pos: torch.Tensor  # [B, q] long: position of the query (-1: a query that sees nothing)
    key_start: torch.Tensor  # [B] long: slot of the first real key (real keys are contiguous)
    key_count: torch.Tensor  # [B] long: real keys
    key_first: torch.Tensor  # [B] long: position of the first real key (0 unless a sliding cache dropped keys)
    window: int | None = None  # the model's own sliding window of these layers: t - s < window; None: none
    # [B, slots] long: the position of every slot the sequences have seen (-1: padding), for `trailing_keys`.
    slot_pos: torch.Tensor | None = None

    @classmethod
    def from_padding(
        cls,
        padding: torch.Tensor | None,
        batch: int,
        q_len: int,
        kv_len: int,
        q_offset: Any,
        kv_offset: int,
        device,
        window: int | None = None,
    ) -> TokenPositions:
        """Positions of the keys in slots kv_offset.. kv_offset+kv_len and of the queries in slots q_offset.. from a
        2-D padding mask [B, seen + q] (True/1 = real token; None: no padding). Real tokens must be contiguous.
        Slots count every token the sequence has seen (a sliding cache's kv_offset skips the dropped ones), so
        positions are the real ones."""
        total = max(kv_offset + kv_len, int(q_offset) + q_len)
        if padding is None:
            real = torch.ones(batch, total, dtype=torch.bool, device=device)
        else:
            real = padding.to(device=device, dtype=torch.bool).expand(batch, -1)
            # A static cache's slots past the mask hold no token yet.
            real = torch.nn.functional.pad(real, (0, max(0, total - real.shape[-1])), value=False)
        starts = (real[:, 1:] & ~real[:, :-1]).sum(-1) + real[:, 0]
        if bool((starts > 1).any()):
            row = int((starts > 1).nonzero()[0, 0])
            raise ValueError(
                f"hf_attn_plus: attention_mask row {row} has padding between real tokens; padding is allowed only "
                "before (left padding) or after (right padding) a sequence"
            )
        count = real.long().cumsum(-1)
        slot_pos = torch.where(real, count - 1, -1)
        key_pos = slot_pos[:, kv_offset : kv_offset + kv_len]
        q_slots = torch.arange(q_len, device=device) + q_offset
        start, key_count, first = _run_of_real(key_pos)
        return cls(key_pos, count[:, q_slots] - 1, start, key_count, first, window, slot_pos)

    def trailing_keys(self, kv_len: int) -> TokenPositions:
        """These positions for a layer whose keys are the last `kv_len` slots seen: transformers sizes the mask by
        the first layer of each type, so a recurrent layer (holding a window of slots) after a dense one, or a dense
        layer after a recurrent one, holds another number of keys than the mask describes."""
        if self.slot_pos is None or self.slot_pos.shape[-1] < kv_len:
            seen = None if self.slot_pos is None else self.slot_pos.shape[-1]
            raise ValueError(
                f"hf_attn_plus: a layer holds {kv_len} keys, the mask describes {self.key_pos.shape[-1]} of {seen} "
                "slots seen; layers of one type must keep the same keys or the last ones"
            )
        key_pos = self.slot_pos[:, self.slot_pos.shape[-1] - kv_len :]
        start, key_count, first = _run_of_real(key_pos)
        return dataclasses.replace(self, key_pos=key_pos, key_start=start, key_count=key_count, key_first=first)

    # generate() prepares the mask up front for compilable caches and calls .contiguous() on it; the model's mask
    # creation then sees a 4-D mask already made and hands it back to the mask function, which passes it through.
    ndim = 4

    def contiguous(self) -> TokenPositions:
        return self

    def dense_mask(self) -> torch.Tensor:
        """transformers' [B, 1, q, kv] bool mask of the same visibility, for a dense implementation run on these
        positions (a distillation teacher); O(q * kv)."""
        return sees(self.query_pos[:, None, :, None], self.key_pos[:, None, None, :], self.window)


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    key_pos: torch.Tensor  # [B, 1, 1, kv_len] long: index of the key among the sequence's real keys (-1: padding)
    query_pos: torch.Tensor  # [B, 1, q_len, 1] long: position of the query (-1: a query that sees nothing)
    # A model-side restriction [B, 1, q_len, kv_len] bool of what may be attended (DeepSeek-V3.2's indexer choice,
    # which that model hands over as a dense mask); None: none.
    restrict: torch.Tensor | None = None
    # The model's index of each query head passed in; None: all of them, in order. A wrapper that runs a mechanism
    # on a subset of heads (head_budget skipping gated-off heads) sets it, so per-head random draws stay the same.
    query_heads: torch.Tensor | None = None
    # The layer's SideCacheLayer (patches/side_cache.py) in cached inference when the mechanism declares `side_cache`;
    # None without a cache, in training, or on a model class hf_attn_plus does not patch. Side states describe the
    # call's full key tensor: a wrapper handing its delegate other keys (a head subset) must not pass it on.
    cache_layer: Any = None
    # [B] long: slot of the first real key, real keys per sequence and the first one's position (real keys are
    # contiguous: slot = key_start + position - key_first); read off key_pos when not given (a dense mask).
    key_start: torch.Tensor | None = None
    key_count: torch.Tensor | None = None
    key_first: torch.Tensor | None = None
    # (first slot, slots) of keys an evicting cache dropped (patches/streaming_cache.py): slots at or after the first
    # hold position key_start + slots later, and key_count still counts the dropped keys. None: no gap.
    key_gap: tuple[int, int] | None = None
    # The model's own sliding window of this layer (query t sees s only when t - s < window); None: none.
    window: int | None = None
    # The model's logit soft-capping (logits -> softcap * tanh(logits / softcap), Gemma 2) and learned sink logits
    # [Hq] (one per model query head, added to the softmax denominator, gpt-oss `s_aux`); None: none.
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.key_start is None:
            for name, value in zip(("key_start", "key_count", "key_first"), _run_of_real(self.batch_key_pos)):
                object.__setattr__(self, name, value)

    @property
    def key_end(self) -> torch.Tensor:
        """[B] long: one past the last real key's position."""
        return self.key_first + self.key_count

    def head_index(self, q_heads: int, device: torch.device) -> torch.Tensor:
        """The model's index of each of the `q_heads` query heads of this call, [1, q_heads, 1, 1] long."""
        heads = torch.arange(q_heads, device=device) if self.query_heads is None else self.query_heads.to(device)
        if heads.numel() != q_heads:
            raise ValueError(f"context names {heads.numel()} query heads, the call has {q_heads}")
        return heads.view(1, -1, 1, 1)

    @property
    def batch_key_pos(self) -> torch.Tensor:
        """[B, kv] long."""
        return self.key_pos[:, 0, 0]

    @property
    def batch_query_pos(self) -> torch.Tensor:
        """[B, q] long."""
        return self.query_pos[:, 0, :, 0]

    @functools.cached_property
    def visible(self) -> torch.Tensor:
        """Dense [B, 1, q_len, kv_len] visibility: the oracle of tests and of the mechanisms whose reference is still
        dense (O(q * kv); the sparse family never builds it)."""
        visible = sees(self.query_pos, self.key_pos, self.window)
        return visible if self.restrict is None else visible & self.restrict

    @property
    def distance(self) -> torch.Tensor:
        """query_pos - key_pos, [B, 1, q_len, kv_len]; meaningful where `visible` (dense: oracle use only)."""
        return self.query_pos - self.key_pos


def sees(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal visibility of real positions (broadcast): both real and key_pos <= query_pos, and within the model's
    own sliding `window` (query_pos - key_pos < window) when there is one."""
    visible = (key_pos >= 0) & (query_pos >= 0) & (key_pos <= query_pos)
    return visible if window is None else visible & (query_pos - key_pos < window)


def chunk_visible(ctx: AttentionContext, rows: slice) -> torch.Tensor:
    """Visibility [B, 1, rows, kv] of one query chunk (with the model's restriction, if any)."""
    visible = sees(ctx.query_pos[:, :, rows], ctx.key_pos, ctx.window)
    return visible if ctx.restrict is None else visible & ctx.restrict[:, :, rows]


def _without_gap(key_pos: torch.Tensor, gap: tuple[int, int] | None) -> torch.Tensor:
    """key_pos [..., kv] without the slots of an evicted `gap` (first slot, slots)."""
    if gap is None:
        return key_pos
    first, slots = gap
    return torch.cat((key_pos[..., :first], key_pos[..., first + slots :]), dim=-1)


def context_of_evicting_layer(ctx: AttentionContext, layer: Any) -> AttentionContext:
    """The context of the keys an EvictingLayer holds, from the context `ctx` of every key (no gap): the same queries,
    the evicted slots' positions dropped."""
    gap = layer.key_gap(ctx.key_start)
    return dataclasses.replace(ctx, key_pos=_without_gap(ctx.key_pos, gap), key_gap=gap, cache_layer=None)


def _run_of_real(key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot of the first real key, number of real keys, its position) per sequence of key_pos [B, kv]."""
    real = key_pos >= 0
    start = torch.where(real.any(-1), real.long().argmax(-1), 0)
    return start, real.sum(-1), key_pos.gather(-1, start[:, None])[:, 0].clamp(min=0)


def context_from_positions(positions: TokenPositions, cache_layer: Any = None) -> AttentionContext:
    """A layer's context from the forward's positions: views, nothing recomputed per layer (an evicting cache
    layer's keys drop the positions of its gap: O(keys held))."""
    gap = cache_layer.key_gap(positions.key_start) if hasattr(cache_layer, "key_gap") else None
    return AttentionContext(
        key_pos=_without_gap(positions.key_pos, gap)[:, None, None, :],
        key_gap=gap,
        query_pos=positions.query_pos[:, None, :, None],
        cache_layer=cache_layer,
        key_start=positions.key_start,
        key_count=positions.key_count,
        key_first=positions.key_first,
        window=positions.window,
    )


def visible_from_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean [B, 1, q_len, kv_len] visibility from a bool mask, an additive float mask, or None (causal)."""
    if attention_mask is None:
        # transformers skips the mask for plain causal attention; queries are the last q_len keys.
        q_idx = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_idx = torch.arange(kv_len, device=device)[None, :]
        return (k_idx <= q_idx).expand(batch, 1, q_len, kv_len)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if attention_mask.dim() != 4:
        raise ValueError(f"hf_attn_plus expects a 4-D attention mask [B, 1, q, kv], got shape {tuple(attention_mask.shape)}")
    # Same trim as transformers' own SDPA path: a static cache's mask can be longer than the keys handed over.
    return attention_mask[..., :kv_len].expand(batch, 1, q_len, kv_len)


def build_context(
    visible: torch.Tensor, restrict: torch.Tensor | None = None, cache_layer: Any = None
) -> AttentionContext:
    """A context read off a dense causal visibility mask (tests, DeepSeek-V3.2, a caller's own 4-D mask);
    `restrict` (e.g. DeepSeek-V3.2's indexer choice) narrows what may be attended without renumbering the sequence.
    The mask must be causal and padding-only: anything else it hides is kept as a restriction."""
    key_valid = visible.any(dim=2, keepdim=True)
    key_pos = torch.where(key_valid, key_valid.cumsum(-1) - 1, -1)
    # Causal attention always sees its own token last, so the newest visible key is the query itself.
    query_pos = torch.where(visible, key_pos, -1).amax(dim=-1, keepdim=True)
    ctx = AttentionContext(key_pos=key_pos, query_pos=query_pos, cache_layer=cache_layer)
    implied = sees(query_pos, key_pos)
    if restrict is not None:
        visible = visible & restrict
    if not torch.equal(implied.expand_as(visible), visible):
        ctx = dataclasses.replace(ctx, restrict=visible)
    return ctx


def indices_to_mask(indices: torch.Tensor, kv_len: int) -> torch.Tensor:
    """DeepSeek-V3.2 indexer output [B, q_len, topk] -> bool [B, 1, q_len, kv_len]; negative indices are unused slots."""
    indices = indices.long()
    chosen = torch.zeros(*indices.shape[:-1], kv_len + 1, dtype=torch.bool, device=indices.device)
    chosen.scatter_(-1, torch.where(indices < 0, kv_len, indices), True)
    return chosen[..., :kv_len].unsqueeze(1)
