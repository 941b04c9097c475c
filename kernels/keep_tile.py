"""In-kernel keep tests of key_sets' structured inputs, shared by every attention kernel (Triton device functions).

Tile kernels pass key_sets.KeySet.arguments() through unchanged as the argument group

    QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
    BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks, n_tokens,

with the constexprs HAS_RESTRICT, HAS_BLOCKS, HAS_TOKENS, BLOCK_STEPS, TOKEN_STEPS, SINKS, WINDOW, DILATION,
RULE_BLOCK, LOCAL_BLOCKS, LIST_BLOCK; kernels that only need visibility (gathered attention) take its first ten.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def query_positions(QPOS, b, qi, row_ok, sp_b, sp_q):
    """Real position of each row's query, -1 for rows outside the problem."""
    return tl.load(QPOS + b * sp_b + qi * sp_q, mask=row_ok, other=-1)


@triton.jit
def sees(t, n, KEY_START, KEY_COUNT, b, kv_len):
    """(key position s of slots n, whether query position t sees slot n), broadcast over t and n."""
    s = n - tl.load(KEY_START + b)
    seen = (t >= 0) & (s >= 0) & (s < tl.load(KEY_COUNT + b)) & (n < kv_len) & (s <= t)
    return s, seen


@triton.jit
def restricted(seen, RESTRICT, b, head, qi, n, sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT: tl.constexpr):
    """`seen` narrowed by the model-given dense mask, when there is one (broadcast over head/qi and n)."""
    if HAS_RESTRICT:
        ptrs = RESTRICT + b * sr_b + head * sr_h + qi * sr_q + n * sr_n
        seen = seen & (tl.load(ptrs, mask=seen, other=0) != 0)
    return seen


@triton.jit
def _lower_bound(LISTS, rows, value, length, stride, row_ok, STEPS: tl.constexpr):
    """Per row (offsets rows [M]), the first index of its ascending list whose entry is >= value: binary search,
    STEPS >= bit_length(length) halvings over [M] vectors."""
    lo = tl.zeros(rows.shape, tl.int32)
    hi = lo + length
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        probe = tl.load(LISTS + rows + mid * stride, mask=row_ok & active, other=0)
        below = probe < value
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def _listed(LISTS, rows, value, seen, length, stride, row_ok, STEPS: tl.constexpr):
    """Whether each value [M, N] (a tile's keys' blocks or positions) is in its row's ascending list, where `seen`.
    A row's entries within the range of its seen values are a contiguous run of its list, found by two binary
    searches per row; the tile then compares against the run's entries one at a time (the longest run of the rows:
    about listed / tiles entries, not the list's length). Rows seeing nothing in the tile read no run."""
    low = tl.min(tl.where(seen, value, 2147483647), 1)
    high = tl.max(tl.where(seen, value, -1), 1)
    first = _lower_bound(LISTS, rows, low, length, stride, row_ok, STEPS)
    stop = _lower_bound(LISTS, rows, high + 1, length, stride, row_ok, STEPS)
    hit = seen & False  # [M, N] like the comparisons it collects (a loop-carried value keeps one shape)
    for k in range(0, tl.max(stop - first, 0)):
        at = first + k
        entry = tl.load(LISTS + rows + at * stride, mask=row_ok & (at < stop), other=-1)
        hit = hit | (value == entry[:, None])
    return hit


@triton.jit
def kept_tile(
    b, head, qi, row_ok, n, kv_len,
    QPOS, KEY_START, KEY_COUNT, RESTRICT, sp_b, sp_q, sr_b, sr_h, sr_q, sr_n,
    BLOCKS, TOKENS, sb_b, sb_h, sb_q, sb_j, st_b, st_h, st_q, st_j, n_blocks, n_tokens,
    HAS_RESTRICT: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_TOKENS: tl.constexpr,
    BLOCK_STEPS: tl.constexpr, TOKEN_STEPS: tl.constexpr, SINKS: tl.constexpr, WINDOW: tl.constexpr,
    DILATION: tl.constexpr, RULE_BLOCK: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, LIST_BLOCK: tl.constexpr,
):
    """Keep mask [rows, keys] of rows (head, qi, row_ok) x slots n: seen, and kept by the rule or listed."""
    t = query_positions(QPOS, b, qi, row_ok, sp_b, sp_q)
    s, seen = sees(t[:, None], n[None, :], KEY_START, KEY_COUNT, b, kv_len)
    seen = restricted(seen, RESTRICT, b, head[:, None], qi[:, None], n[None, :], sr_b, sr_h, sr_q, sr_n, HAS_RESTRICT)
    distance = t[:, None] - s
    kept = (s < SINKS) | (distance < WINDOW)
    if DILATION > 0:
        kept = kept | (distance % DILATION == 0)
    if LOCAL_BLOCKS > 0:
        kept = kept | (s // RULE_BLOCK > t[:, None] // RULE_BLOCK - LOCAL_BLOCKS)
    if HAS_BLOCKS:
        rows = b * sb_b + head * sb_h + qi * sb_q
        kept = kept | _listed(BLOCKS, rows, s // LIST_BLOCK, seen, n_blocks, sb_j, row_ok, BLOCK_STEPS)
    if HAS_TOKENS:
        rows = b * st_b + head * st_h + qi * st_q
        kept = kept | _listed(TOKENS, rows, s, seen, n_tokens, st_j, row_ok, TOKEN_STEPS)
    return seen & kept
