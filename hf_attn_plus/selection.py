"""Which keys a query sees: the shared pieces that windows, sinks, dilation, top-k and block selection plug into.

Every selection mechanism builds its structure.Selection from these chunk by chunk over queries (`query_chunks`,
`top_positions` / `chunk_candidates` with `top_scoring`, `chunk_seen_blocks`), so no [q, kv] score or mask exists at once. The one dense
[B, 1, q_len, kv_len] mask left, `sinks_and_window`, serves the indexer kernel's glue and its reference
(kernels/indexer_topk) and tests. Query head h reads KV head h // groups, the layout of transformers' `repeat_kv`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .masking import AttentionContext, chunk_visible
from .structure import PositionRule


# Rows per query chunk when a selection scores every key: keeps a chunk's [B, H, rows, kv] scores near this size,
# and a chunk well below the sequence, so no tensor of one head's [q, kv] size exists even at moderate lengths.
SCORE_ELEMENTS = 2**23
MAX_SCORE_ROWS = 64


def query_chunks(batch: int, heads: int, rows: slice, kv_len: int) -> list[slice]:
    """Sub-ranges of the query rows `rows` (start and stop given) that a selection walks so that no [q, kv] score
    matrix exists at once."""
    step = max(1, min(MAX_SCORE_ROWS, SCORE_ELEMENTS // max(1, batch * heads * kv_len)))
    return [slice(lo, min(lo + step, rows.stop)) for lo in range(rows.start, rows.stop, step)]


def all_rows(rows: slice, q_len: int) -> slice:
    """`rows` with its start and stop made explicit for q_len queries."""
    start, stop, _ = rows.indices(q_len)
    return slice(start, stop)


def kept_indices(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Bool [..., n] with at most `width` True per row -> their indices [..., width] (largest first, -1 unused)."""
    index = torch.arange(keep.shape[-1], device=keep.device)
    width = min(width, keep.shape[-1])
    return torch.where(keep, index, -1).topk(width, dim=-1).values if width else keep.new_zeros(*keep.shape[:-1], 0).long()


def stack_lists(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Index lists of consecutive query chunks [B, H, rows, n_i] -> one [B, H, q, max n_i] int32 (-1 padded): half
    the memory of int64 for what can be O(q * kv / block_size) entries."""
    width = max(c.shape[-1] for c in chunks)
    return torch.cat([F.pad(c.int(), (0, width - c.shape[-1]), value=-1) for c in chunks], dim=2)


def grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """q·k for every query head against its KV head without materialising repeated keys: [B, Hq, q_len, kv_len].
    A KV group's query heads are stacked as rows of one matmul against their KV head (no broadcast copy of keys)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    rows = query.reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, dim)
    return (rows @ key.transpose(-1, -2)).reshape(batch, q_heads, q_len, key.shape[2])


def sinks_and_window(ctx: AttentionContext, sinks: int, window: int) -> torch.Tensor:
    """The first `sinks` real tokens and the last `window` tokens up to the query (s > t - window), dense [B, 1, q,
    kv]: for the indexer kernel's keep mask and tests; mechanisms use PositionRule(sinks, window)."""
    return ctx.visible & ((ctx.key_pos < sinks) | (ctx.distance < window))


def top_scoring(scores: torch.Tensor, candidates: torch.Tensor, budget: int) -> torch.Tensor:
    """Per row, the `budget` candidates with the largest scores (fewer when fewer candidates exist).

    Exact ties at the cut (e.g. the zeros of ReLU indexer scores) go to the most recent keys, so the choice depends
    on scores and positions only, never on padding or on how many keys the call holds (cached == uncached).
    """
    k = min(budget, scores.shape[-1])
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    masked = scores.masked_fill(~candidates, float("-inf"))
    cut = masked.topk(k, dim=-1).values[..., -1:]
    above = candidates & (masked > cut)
    tied = candidates & (masked == cut)
    room = k - above.sum(-1, keepdim=True)
    if bool((tied.sum(-1, keepdim=True) <= room).all()):  # every tied key fits (the usual case): no tie-break
        return above | tied
    tied_from_the_end = tied.flip(-1).cumsum(-1).flip(-1)
    return above | (tied & (tied_from_the_end <= room))


def top_indices(scores: torch.Tensor, candidates: torch.Tensor, budget: int) -> torch.Tensor:
    """The indices [..., budget] of the candidates top_scoring(scores, candidates, budget) chooses, in no particular
    order (-1 unused), from one top-k. Exact ties crossing the cut go through `top_scoring`. `scores` is
    overwritten (non-candidates set to -inf): one chunk's scores are the largest tensor a selection holds."""
    k = min(budget, scores.shape[-1])
    if k == 0:
        return scores.new_zeros(*scores.shape[:-1], 0, dtype=torch.long)
    masked = scores.masked_fill_(~candidates, float("-inf"))
    values, index = masked.topk(k, dim=-1, sorted=False)
    cut = values.amin(-1, keepdim=True)
    # Unambiguous unless keys tied at a finite cut outnumber the places left for them.
    ambiguous = (cut > float("-inf")) & ((masked == cut).sum(-1, keepdim=True) > (values == cut).sum(-1, keepdim=True))
    if bool(ambiguous.any()):
        return kept_indices(top_scoring(masked, candidates, budget), budget)
    return torch.where(values > float("-inf"), index, -1)


def top_positions(
    ctx: AttentionContext,
    scores_of: Callable[[slice, slice], torch.Tensor],
    rule: PositionRule,
    budget: int,
    heads: int,
    rows: slice = slice(None),
) -> torch.Tensor:
    """Per query of `rows` and head, the real positions [B, H, rows, budget] (any order, -1 unused) of the `budget` visible keys
    the rule does not keep that score highest (ties: most recent, as `top_scoring`); `scores_of(chunk, keys)` gives
    one query chunk's scores [B, H, chunk, keys] against the key slots `keys` (`heads` sizes the chunks). Built chunk
    by chunk: at most one chunk's scores exist at once, and only against the slots up to the chunk's last candidate
    (a causal prefill chunk's future is never scored: half the scoring and top-k work on average)."""
    lists = []
    q_len, kv_len = ctx.query_pos.shape[2], ctx.key_pos.shape[-1]
    for rows in query_chunks(ctx.key_pos.shape[0], heads, all_rows(rows, q_len), kv_len):
        candidates = chunk_candidates(ctx, rows, rule)
        seen = candidates.flatten(0, -2).any(0).nonzero()
        keys = slice(0, int(seen.max()) + 1 if seen.numel() else 0)
        scores = scores_of(rows, keys)
        index = top_indices(scores, candidates[..., keys].expand_as(scores), budget)
        key_pos = ctx.key_pos[..., keys].expand(*index.shape[:-1], keys.stop)
        lists.append(torch.where(index >= 0, key_pos.gather(-1, index.clamp(min=0)), -1))
    return stack_lists(lists)


def chunk_candidates(ctx: AttentionContext, rows: slice, rule: PositionRule) -> torch.Tensor:
    """Bool [B, 1, rows, kv]: the visible keys of the queries of `rows` that `rule` does not keep (what a top-k
    chooses among)."""
    return chunk_visible(ctx, rows) & ~rule.keep(ctx.query_pos[:, :, rows], ctx.key_pos)


def chosen_positions(ctx: AttentionContext, chosen: torch.Tensor, budget: int) -> torch.Tensor:
    """The real positions of the keys `chosen` (bool [B, H, rows, kv], at most `budget` per row) -> [B, H, rows,
    min(budget, kv)] (largest first, -1 unused)."""
    return torch.where(chosen, ctx.key_pos, -1).topk(min(budget, ctx.key_pos.shape[-1]), dim=-1).values


def key_blocks(ctx: AttentionContext, block_size: int) -> torch.Tensor:
    """Block index of every key by its real position, [B, 1, 1, kv_len]; padding keys get -1."""
    return torch.where(ctx.key_pos >= 0, ctx.key_pos // block_size, -1)


def block_key_bounds(key: torch.Tensor, blocks: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of each block's keys, [B, Hkv, num_blocks, D] each (empty blocks: +inf / -inf)."""
    batch, kv_heads, kv_len, dim = key.shape
    # Padding keys go to an extra slot that is dropped afterwards.
    slot = torch.where(blocks < 0, num_blocks, blocks).reshape(batch, 1, kv_len, 1).expand(batch, kv_heads, kv_len, dim)
    shape = (batch, kv_heads, num_blocks + 1, dim)
    kmin = key.new_full(shape, float("inf")).scatter_reduce(2, slot, key, "amin", include_self=True)
    kmax = key.new_full(shape, float("-inf")).scatter_reduce(2, slot, key, "amax", include_self=True)
    return kmin[:, :, :num_blocks], kmax[:, :, :num_blocks]


def quest_block_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest upper bound sum_d max(q_d*min_d, q_d*max_d) of q·k over each block, [B, Hq, q_len, num_blocks].

    max(q*lo, q*hi) is q*hi for q >= 0 and q*lo for q < 0, so the bound is relu(q)·max - relu(-q)·min: two matmuls.
    Empty blocks have infinite bounds; their rows are never candidates, so they are zeroed to keep matmuls finite.
    """
    kmin = torch.nan_to_num(kmin, posinf=0.0)
    kmax = torch.nan_to_num(kmax, neginf=0.0)
    return grouped_scores(query.clamp(min=0), kmax) - grouped_scores((-query).clamp(min=0), kmin)


def fixed_blocks(query_pos: torch.Tensor, num_blocks: int, block_size: int, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """Blocks always attended from each query position [..., q, 1]: the first `sink_blocks` and the `local_blocks`
    ending at the query's block -> bool [..., q, num_blocks]."""
    index = torch.arange(num_blocks, device=query_pos.device)
    return (index < sink_blocks) | (query_pos // block_size - index < local_blocks)


def chunk_seen_blocks(ctx: AttentionContext, rows: slice, num_blocks: int, block_size: int) -> torch.Tensor:
    """Whether each query of a chunk sees any key of each block, [B, 1, rows, num_blocks]: by position alone
    (block j is seen from t when j * block_size <= t), or through the model's restriction when there is one.
    Under the model's own sliding window only blocks whole inside it count: a block across the window's start would
    be scored on keys the query does not see (and a sliding cache has dropped)."""
    t = ctx.query_pos[:, :, rows]
    index = torch.arange(num_blocks, device=t.device)
    seen = (index <= t // block_size) & (t >= 0)
    if ctx.window is not None:
        seen = seen & (index * block_size > t - ctx.window)
    if ctx.restrict is None:
        return seen
    visible = chunk_visible(ctx, rows)
    slot = torch.where(ctx.key_pos < 0, num_blocks, ctx.key_pos // block_size).expand_as(visible)
    counts = visible.new_zeros(*visible.shape[:-1], num_blocks + 1, dtype=torch.float32)
    return seen & (counts.scatter_add_(-1, slot, visible.float())[..., :num_blocks] > 0)


def pooled_blocks(x: torch.Tensor, blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Mean of x [B, H, n, D] over each block, blocks [B, n] (-1: excluded) -> [B, H, num_blocks, D] (empty: 0)."""
    batch, heads, n, dim = x.shape
    slot = torch.where(blocks < 0, num_blocks, blocks).reshape(batch, 1, n, 1)
    sums = x.new_zeros(batch, heads, num_blocks + 1, dim).scatter_add_(2, slot.expand(batch, heads, n, dim), x)
    counts = x.new_zeros(batch, 1, num_blocks + 1, 1).scatter_add_(2, slot, x.new_ones(batch, 1, n, 1))
    return (sums / counts.clamp(min=1))[:, :, :num_blocks]


_LOW32 = 0xFFFFFFFF


def _mul_low32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """Low 32 bits of x * constant for x < 2**32, with every intermediate below 2**63 (int64 never overflows)."""
    high, low = constant >> 16, constant & 0xFFFF
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _LOW32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # The "lowbias32" integer finaliser (C. Wellons): full avalanche on 32-bit words.
    x = x ^ (x >> 16)
    x = _mul_low32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_low32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_hash(seed: int, *coords: torch.Tensor | int) -> torch.Tensor:
    """A 32-bit hash (int64 in [0, 2**32)) of seed and integer coordinates, broadcast over their shapes.

    Counter-based randomness: the value for (seed, layer, head, position, ...) never depends on batch layout,
    padding or sequence length, so stochastic choices stay padding- and cache-invariant.
    """
    device = next((c.device for c in coords if isinstance(c, torch.Tensor)), None)
    h = _mix32(torch.tensor(seed & _LOW32, device=device))
    for coord in coords:
        h = _mix32(h ^ _mix32((torch.as_tensor(coord, device=device) + 0x9E3779B9) & _LOW32))
    return h


def counter_uniform(seed: int, *coords: torch.Tensor | int) -> torch.Tensor:
    """Uniform float64 in (0, 1) from `counter_hash`."""
    return (counter_hash(seed, *coords).double() + 0.5) / 2.0**32


def random_links(
    ctx: AttentionContext, q_heads: int, sinks: int, window: int, links: int, seed: int, layer: int
) -> torch.Tensor:
    """Real positions of each query's long-range links, [B, q_heads, q, links] (-1: unused slot).

    The far keys of the query at position t are the positions sinks..t-window (neither sink nor in the window); it
    draws min(links, their number) of them uniformly without replacement with Robert Floyd's algorithm: for
    j = n-links .. n-1, r = hash(seed, layer, head, t, j) mod (j+1) joins the set, or j if r already did. O(links^2)
    work per query, independent of the context; positions only (ctx.query_pos, -1 for a query that sees nothing, and
    the model's head index ctx.head_index), so padding-, batch- and cache-invariant.
    """
    t = ctx.query_pos[..., 0]  # [B, 1, q]
    heads = ctx.head_index(q_heads, t.device)[..., 0]
    count = (t - window - sinks + 1).clamp(min=0)
    chosen = torch.full((*t.shape[:1], q_heads, t.shape[-1], links), -1, dtype=torch.long, device=t.device)
    for i in range(links):
        j = count - links + i
        r = counter_hash(seed, layer, heads, t, j) % (j + 1).clamp(min=1)
        taken = (chosen[..., :i] == r.unsqueeze(-1)).any(-1)
        chosen[..., i] = torch.where(j >= 0, torch.where(taken, j, r), -1)
    return torch.where(chosen >= 0, chosen + sinks, -1)


def indexer_scores(index_query: torch.Tensor, index_key: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    """DSA lightning-indexer scores I[t, s] = sum_j w[t, j] * relu(q_j[t] · k[s]), [B, 1, q, kv].

    index_query [B, Hi, q, Di] (Hi small indexer heads), index_key [B, kv, Di] (one key shared by the indexer heads),
    head_weights [B, Hi, q] (w[t, j], produced from the query token).
    """
    per_head = torch.relu(index_query @ index_key.unsqueeze(1).transpose(-1, -2))
    return (per_head * head_weights.unsqueeze(-1)).sum(dim=1, keepdim=True)


def routed_indexer_heads(
    index_query: torch.Tensor,
    index_key: torch.Tensor,
    head_weights: torch.Tensor,
    ctx: AttentionContext,
    active_heads: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MISA router: per query, the `active_heads` indexer heads (of index_query [B, Hi, q, Di], head_weights
    [B, Hi, q]) with the largest w[t, j] * max_b relu(q_j[t] · mean_b(k)), b over the complete blocks of
    `block_size` real keys before the query's own block; ties go to the lower head. Only those heads then score
    tokens: -> (index_query [B, A, q, Di], head_weights [B, A, q]).

    Blocks before the query's block are complete and fully visible in a cached decode step as in a full forward, so
    routing is cache- and padding-invariant; a query with no complete block routes by head order.
    """
    if active_heads >= index_query.shape[1]:
        return index_query, head_weights
    batch, kv_len = index_key.shape[:2]
    blocks = key_blocks(ctx, block_size).view(batch, kv_len)
    num_blocks = max(int(blocks.max()) + 1, 1)
    means = pooled_blocks(index_key.unsqueeze(1), blocks, num_blocks)  # [B, 1, nb, Di]
    usable = torch.arange(num_blocks, device=blocks.device) < ctx.query_pos // block_size  # [B, 1, q, nb]
    affinity = torch.relu(index_query @ means.transpose(-1, -2)).masked_fill(~usable, 0.0)
    router = head_weights * affinity.amax(dim=-1)
    chosen = router.sort(dim=1, descending=True, stable=True).indices[:, :active_heads]
    routed_query = index_query.gather(1, chosen.unsqueeze(-1).expand(-1, -1, -1, index_query.shape[-1]))
    return routed_query, head_weights.gather(1, chosen)


def mass_ranked_blocks(logits: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row, candidates taken in decreasing estimated attention mass (softmax of `logits` over the candidates)
    until the kept share reaches `threshold` (S2O-style early stop): a block is kept while the mass ranked before
    it is below the threshold: any threshold > 0 keeps the best block, threshold=1 keeps every candidate."""
    logits = logits.float().masked_fill(~candidates, float("-inf"))
    mass = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without candidates
    ranked, order = mass.sort(dim=-1, descending=True)
    kept_ranked = (ranked.cumsum(-1) - ranked < threshold) | (threshold >= 1.0)
    return torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, order, kept_ranked) & candidates
