"""Lightning-indexer scores I[t, s] = sum_j w[t, j] * relu(q_j[t] · k[s]) per (batch, query row block, key tile),
with the selection's exclusions applied, written as fp32 scores or as sortable top-k keys.

Program (batch, row block, split) reads each index-key tile of its split once for all rows and all indexer heads
(heads are packed into the rows of one tl.dot when the row block is short, as in decode; tiles without a candidate
for any row, e.g. above the causal diagonal, skip the products), then:
- SORTABLE=False: stores the fp32 scores, -inf where the key is not a top-k candidate (the dense reference view);
- SORTABLE=True: turns each score into an int64 key that sorts like (score, key index), so the largest keys are the
  best scores with exact ties going to the most recent key (selection.top_scoring's rule); -1 marks a non-candidate.
  TOP_ONLY=False stores every tile's keys; TOP_ONLY=True keeps a running top BLOCK_N of the split (bitonic step:
  max of the best set sorted descending and the new tile sorted ascending is the top half of their union) and
  stores only those: BLOCK_N (>= budget) keys per split instead of one per key.
Candidates are the visible keys that are neither sinks (key_pos < sinks) nor in the local window
(query_pos - key_pos < window): selection.sinks_and_window's complement, computed from positions here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import interpreting, next_power_of_2, require_triton, tile_size
from ...masking import AttentionContext

# Low 31 bits of a sortable key: the key index; bits 31..62: the score's order-preserving 32-bit pattern.
INDEX_BITS = 31
# Largest running top-k set a program keeps (16-bit inputs; half that for fp32, whose 256-key tiles need 192 KiB of
# shared memory on sm_90); larger budgets store every key.
MAX_TOP = 256


def max_top(dtype: torch.dtype) -> int:
    return MAX_TOP // 2 if dtype == torch.float32 else MAX_TOP


@triton.jit
def _weighted_relu_scores(
    IQ, W, IK, b, q_start, n,
    sq_b, sq_h, sq_q, sq_d, sw_b, sw_h, sw_q, sk_b, sk_n, sk_d,
    index_heads, q_len, kv_len, dim,
    HEADS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] scores of rows q_start.. against keys n; HEADS indexer heads per dot."""
    d = tl.arange(0, BLOCK_D)
    k = tl.load(
        IK + b * sk_b + n[:, None] * sk_n + d[None, :] * sk_d, mask=(n < kv_len)[:, None] & (d < dim)[None, :], other=0.0
    )
    if UPCAST:
        k = k.to(tl.float32)
    r = tl.arange(0, HEADS * BLOCK_M)  # dot row r: indexer head r // BLOCK_M of query q_start + r % BLOCK_M
    qi = q_start + r % BLOCK_M
    scores = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for first_head in range(0, index_heads, HEADS):
        head = first_head + r // BLOCK_M
        ok = (head < index_heads) & (qi < q_len)
        q = tl.load(
            IQ + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
            mask=ok[:, None] & (d < dim)[None, :], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        w = tl.load(W + b * sw_b + head * sw_h + qi * sw_q, mask=ok, other=0.0).to(tl.float32)
        per_head = tl.maximum(tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0) * w[:, None]
        scores += tl.sum(tl.reshape(per_head, [HEADS, BLOCK_M, BLOCK_N]), axis=0)
    # -0.0 (a zero ReLU times a negative weight) must tie with 0.0 in the sortable keys as in the reference's float
    # comparison. Adding it to the +0.0 accumulator already gives +0.0 in IEEE arithmetic; explicit, so no
    # compiler rewrite of `0 + x` can bring a -0.0 back.
    return tl.where(scores == 0.0, 0.0, scores)


@triton.jit
def _indexer_kernel(
    IQ, W, IK, VIS, KPOS, QPOS, OUT,
    sq_b, sq_h, sq_q, sq_d,
    sw_b, sw_h, sw_q,
    sk_b, sk_n, sk_d,
    sv_b, sv_q, sv_n,
    skp_b, skp_n,
    sqp_b, sqp_q,
    so_b, so_q, so_n,
    index_heads, q_len, kv_len, dim, sinks, window, num_tiles, tiles_per_split,
    SORTABLE: tl.constexpr, TOP_ONLY: tl.constexpr, HEADS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    q_start = tl.program_id(1) * BLOCK_M
    split = tl.program_id(2)
    qi = q_start + tl.arange(0, BLOCK_M)
    q_ok = qi < q_len
    qpos = tl.load(QPOS + b * sqp_b + qi * sqp_q, mask=q_ok, other=-1)
    best = tl.full([BLOCK_M, BLOCK_N], -1, tl.int64)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, num_tiles)):
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        inside = q_ok[:, None] & n_ok[None, :]
        visible = tl.load(VIS + b * sv_b + qi[:, None] * sv_q + n[None, :] * sv_n, mask=inside, other=0) != 0
        kpos = tl.load(KPOS + b * skp_b + n * skp_n, mask=n_ok, other=-1)
        fixed = (kpos[None, :] < sinks) | (qpos[:, None] - kpos[None, :] < window)
        candidate = visible & ~fixed
        scores = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if tl.max(candidate.to(tl.int32)) > 0:  # skips the products of tiles above the causal diagonal
            scores = _weighted_relu_scores(
                IQ, W, IK, b, q_start, n, sq_b, sq_h, sq_q, sq_d, sw_b, sw_h, sw_q, sk_b, sk_n, sk_d,
                index_heads, q_len, kv_len, dim, HEADS, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D,
            )
        out_ptrs = OUT + b * so_b + qi[:, None] * so_q + n[None, :] * so_n
        if SORTABLE:
            # IEEE bits -> an unsigned 32-bit pattern in score order, shifted above the 31 index bits.
            bits = scores.to(tl.int32, bitcast=True).to(tl.int64)
            ordered = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
            keys = tl.where(candidate, (ordered << 31) | n[None, :].to(tl.int64), -1)
            if TOP_ONLY:
                best = tl.maximum(tl.sort(best, dim=1, descending=True), tl.sort(keys, dim=1))
            else:
                tl.store(out_ptrs, keys, mask=inside)
        else:
            tl.store(out_ptrs, tl.where(candidate, scores, float("-inf")), mask=inside)
    if TOP_ONLY:
        c = split * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(OUT + b * so_b + qi[:, None] * so_q + c[None, :] * so_n, best, mask=q_ok[:, None])


def _row_block(q_len: int, dtype: torch.dtype) -> int:
    """Query rows per program: all of a short (decode) call, else a tile."""
    return next_power_of_2(q_len, minimum=1) if q_len <= 16 else tile_size(dtype)


def block_shapes(q_len: int, index_heads: int, dtype: torch.dtype, top: int | None) -> tuple[int, int, int]:
    """(BLOCK_M query rows, HEADS indexer heads per dot, BLOCK_N keys per tile) of a launch; `top`: the running
    top-k width (None: every key stored)."""
    block_m = _row_block(q_len, dtype)
    if top:
        block_m = min(block_m, max(1, 4096 // top))  # the sort works on BLOCK_M x top int64 keys in registers
    # Short row blocks (decode) pack several indexer heads into one dot: >= 16 rows, at most 64.
    heads = max(16 // block_m, min(next_power_of_2(index_heads, minimum=1), max(1, 64 // block_m)))
    return block_m, heads, top or tile_size(dtype)


def _launch(
    index_query: torch.Tensor,
    index_key: torch.Tensor,
    head_weights: torch.Tensor,
    ctx: AttentionContext,
    sinks: int,
    window: int,
    sortable: bool,
    top: int | None,
    splits: int | None,
) -> torch.Tensor:
    require_triton(index_query, index_key, head_weights)
    batch, index_heads, q_len, dim = index_query.shape
    kv_len = index_key.shape[1]
    block_m, heads, block_n = block_shapes(q_len, index_heads, index_query.dtype, top)
    num_tiles = triton.cdiv(kv_len, block_n)
    row_blocks = triton.cdiv(q_len, block_m)
    tiles_per_split = triton.cdiv(num_tiles, splits or num_tiles) if top else 1
    splits = triton.cdiv(num_tiles, tiles_per_split)
    columns = splits * block_n if top else kv_len
    out = torch.empty(batch, q_len, columns, device=index_query.device, dtype=torch.int64 if sortable else torch.float32)
    visible = ctx.visible[:, 0].view(torch.uint8)
    key_pos, query_pos = ctx.key_pos[:, 0, 0], ctx.query_pos[:, 0, :, 0]
    _indexer_kernel[(batch, row_blocks, splits)](
        index_query, head_weights, index_key, visible, key_pos, query_pos, out,
        *index_query.stride(), *head_weights.stride(), *index_key.stride(), *visible.stride(),
        *key_pos.stride(), *query_pos.stride(), *out.stride(),
        index_heads, q_len, kv_len, dim, sinks, window, num_tiles, tiles_per_split,
        SORTABLE=sortable, TOP_ONLY=top is not None, HEADS=heads,
        UPCAST=interpreting() and index_query.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_power_of_2(dim),
    )
    return out


def masked_scores_kernel(
    index_query: torch.Tensor, index_key: torch.Tensor, head_weights: torch.Tensor, ctx: AttentionContext, sinks: int, window: int
) -> torch.Tensor:
    """fp32 indexer scores [B, q, kv], -inf where a key is not a top-k candidate (hidden, sink or window)."""
    return _launch(index_query, index_key, head_weights, ctx, sinks, window, sortable=False, top=None, splits=None)


def candidate_keys_kernel(
    index_query: torch.Tensor,
    index_key: torch.Tensor,
    head_weights: torch.Tensor,
    ctx: AttentionContext,
    sinks: int,
    window: int,
    budget: int,
    splits: int | None = None,
    top_only: bool | None = None,
) -> torch.Tensor:
    """Sortable keys [B, q, n] (-1: none) whose `budget` largest are exactly the reference's top-k candidates.

    top_only (default: when next_power_of_2(budget) <= max_top(dtype) and a split covers several tiles) keeps a running
    top-next_power_of_2(budget) per split of `splits` (default: enough programs to fill the GPU) instead of every key.
    """
    top = next_power_of_2(budget)
    if splits is None:
        batch, index_heads, q_len, _ = index_query.shape
        programs = batch * triton.cdiv(q_len, block_shapes(q_len, index_heads, index_query.dtype, top)[0])
        target = 4 * torch.cuda.get_device_properties(index_query.device).multi_processor_count if index_query.is_cuda else 2
        splits = max(1, target // programs)
    if top_only is None:
        top_only = top <= max_top(index_query.dtype) and triton.cdiv(index_key.shape[1], top) >= 2 * splits
    return _launch(index_query, index_key, head_weights, ctx, sinks, window, True, top if top_only else None, splits)
