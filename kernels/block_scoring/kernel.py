"""Quest bound of every key block for every query row: sum_d max(q_d*min_d, q_d*max_d) = relu(q)·max - relu(-q)·min.

One program per (batch*kv_head, row block, block tile) scores all query heads of the KV group against one read of
the group's summaries. Reference: hf_attn_plus.selection.quest_block_scores (empty blocks score as if their
bounds were 0; they are never candidates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import next_power_of_2, require_triton
from ..selected_decode.kernel import row_coordinates


@triton.jit
def _quest_scores_kernel(
    Q, KMIN, KMAX, S,
    sq_b, sq_h, sq_q, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    ss_b, ss_h, ss_q, ss_n,
    kv_heads, q_len, rows, num_blocks, head_dim,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    row_block = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_head = bh % kv_heads
    head, qi, row_ok = row_coordinates(kv_head, row_block, rows, q_len, GROUP, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    n = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    q = tl.load(
        Q + b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_q + d[None, :] * sq_d,
        mask=row_ok[:, None] & (d < head_dim)[None, :], other=0.0,
    ).to(tl.float32)
    bound_ptrs = b * sk_b + kv_head * sk_h + n[:, None] * sk_n + d[None, :] * sk_d
    bound_mask = (n < num_blocks)[:, None] & (d < head_dim)[None, :]
    kmin = tl.load(KMIN + bound_ptrs, mask=bound_mask, other=0.0).to(tl.float32)
    kmax = tl.load(KMAX + bound_ptrs, mask=bound_mask, other=0.0).to(tl.float32)
    kmin = tl.where(kmin == float("inf"), 0.0, kmin)
    kmax = tl.where(kmax == float("-inf"), 0.0, kmax)
    scores = tl.dot(tl.maximum(q, 0.0), tl.trans(kmax), input_precision="ieee")
    scores -= tl.dot(tl.maximum(-q, 0.0), tl.trans(kmin), input_precision="ieee")
    s_ptrs = S + b * ss_b + head[:, None] * ss_h + qi[:, None] * ss_q + n[None, :] * ss_n
    tl.store(s_ptrs, scores, mask=row_ok[:, None] & (n < num_blocks)[None, :])


def quest_scores_kernel(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_b: int = 64) -> torch.Tensor:
    """query [B, Hq, q, D], kmin/kmax [B, Hkv, num_blocks, D] -> fp32 scores [B, Hq, q, num_blocks]."""
    require_triton(query, kmin, kmax)
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, num_blocks = kmin.shape[1:3]
    group = q_heads // kv_heads
    block_m = next_power_of_2(group * q_len) if group * q_len <= 64 else 64
    block_b = min(block_b, next_power_of_2(num_blocks))
    kmin, kmax = kmin.contiguous(), kmax.contiguous()
    scores = torch.empty(batch, q_heads, q_len, num_blocks, dtype=torch.float32, device=query.device)
    grid = (batch * kv_heads, triton.cdiv(group * q_len, block_m), triton.cdiv(num_blocks, block_b))
    _quest_scores_kernel[grid](
        query, kmin, kmax, scores, *query.stride(), *kmin.stride(), *scores.stride(),
        kv_heads, q_len, group * q_len, num_blocks, head_dim,
        GROUP=group, BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_D=next_power_of_2(head_dim),
    )
    return scores
