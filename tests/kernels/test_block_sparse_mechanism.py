"""block_sparse: threshold semantics of the shared block ranking, dense at threshold 1, subsets as it falls,
and a choice that is causal (cached decode equals recompute) and padding-invariant."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus
from hf_attn_plus import OptionError
from hf_attn_plus.masking import build_context, visible_from_mask
from hf_attn_plus.registry import get_mechanism
from hf_attn_plus.selection import mass_ranked_blocks
from hf_attn_plus.structure import dense_keep
from hf_attn_plus.tiny import tiny_config

MECHANISM = get_mechanism("block_sparse")


def test_kept_mass_is_the_smallest_ranked_prefix_reaching_threshold():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, 9, generator=g) * 3
    candidates = torch.rand(3, 2, 5, 9, generator=g) < 0.7
    candidates[..., 0] = True
    mass = torch.softmax(logits.masked_fill(~candidates, float("-inf")), -1)
    for threshold in (0.3, 0.7, 0.95):
        kept = mass_ranked_blocks(logits, candidates, threshold)
        assert (kept <= candidates).all()
        kept_mass = (mass * kept).sum(-1)
        assert (kept_mass >= threshold - 1e-6).all()
        smallest_kept = mass.masked_fill(~kept, float("inf")).amin(-1)
        assert (kept_mass - smallest_kept < threshold).all()  # no kept block could be dropped
    assert torch.equal(mass_ranked_blocks(logits, candidates, 1.0), candidates)


def padded_problem(seed=0, batch=2, q_heads=4, kv_heads=2, length=37, dim=16):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, length, dim, generator=g)
    key = torch.randn(batch, kv_heads, length, dim, generator=g)
    visible = visible_from_mask(None, batch, length, length, "cpu").clone()
    visible[1, ..., :6] = False
    visible[1, :, :6, :] = False
    return query, key, build_context(visible)


def test_threshold_one_is_dense_and_lower_thresholds_keep_subsets():
    query, key, ctx = padded_problem()
    keeps = [
        dense_keep(ctx, MECHANISM.select(query, key, ctx, MECHANISM.resolve_options(dict(block_size=4, threshold=t))), query.shape[1])
        for t in (1.0, 0.9, 0.6, 0.2)
    ]
    assert torch.equal(keeps[0], ctx.visible.expand_as(keeps[0]))
    for larger, smaller in zip(keeps, keeps[1:]):
        assert (smaller <= larger).all() and smaller.sum() < larger.sum()
    assert (keeps[-1].sum(-1) > 0).sum() == ctx.visible.any(-1).sum() * 4  # every real query keeps keys


def test_threshold_above_one_is_rejected():
    with pytest.raises(OptionError, match="threshold.*<= 1.0"):
        MECHANISM.resolve_options(dict(threshold=1.5))


def test_choice_ignores_later_tokens_and_padding():
    """Selection for the first 25 tokens is the same with 12 more tokens after them, or with right padding."""
    query, key, _ = padded_problem(seed=2)
    query, key = query[:1], key[:1]
    opts = MECHANISM.resolve_options(dict(block_size=4, threshold=0.5, sink_blocks=0))
    full_ctx = build_context(visible_from_mask(None, 1, 37, 37, "cpu"))
    full = dense_keep(full_ctx, MECHANISM.select(query, key, full_ctx, opts), query.shape[1])
    prefix_ctx = build_context(visible_from_mask(None, 1, 25, 25, "cpu"))
    prefix = dense_keep(prefix_ctx, MECHANISM.select(query[:, :, :25], key[:, :, :25], prefix_ctx, opts), query.shape[1])
    assert torch.equal(full[..., :25, :25], prefix)
    assert full[..., :25, :25].sum() < prefix_ctx.visible.sum() * 4  # it is sparse
    right_padded = visible_from_mask(None, 1, 37, 37, "cpu").clone()
    right_padded[..., 25:] = False  # keys after the prompt are padding; padding queries see the prompt
    padded_ctx = build_context(right_padded)
    padded = dense_keep(padded_ctx, MECHANISM.select(query, key, padded_ctx, opts), query.shape[1])
    assert torch.equal(padded[..., :25, :25], prefix)


def brute_force_blocks(query, key, ctx, opts):
    """Kept ranked blocks per (batch, head, query) by loops: mean key of each run of min(pool_size, block_size)
    positions, a block's logit the logsumexp of its runs', softmax over the blocks the query ranks, then the
    smallest prefix by mass that reaches the threshold."""
    size, run_len = opts.block_size, min(opts.pool_size, opts.block_size)
    runs, group = size // run_len, query.shape[1] // key.shape[1]
    kept = set()
    for b in range(query.shape[0]):
        pos = ctx.key_pos[b, 0, 0]
        for h in range(query.shape[1]):
            for i, t in enumerate(ctx.query_pos[b, 0, :, 0].tolist()):
                if t < 0:
                    continue
                ranked = [j for j in range(opts.sink_blocks, t // size - opts.local_blocks + 1)]
                if not ranked:
                    continue
                logits = []
                for j in ranked:
                    means = [key[b, h // group, (pos // run_len == j * runs + r)].mean(0) for r in range(runs)]
                    logits.append(torch.logsumexp(torch.stack([query[b, h, i] @ m for m in means]) * query.shape[-1] ** -0.5, 0))
                mass = torch.softmax(torch.stack(logits), 0)
                order = mass.argsort(descending=True).tolist()
                total = 0.0
                for n in order:
                    if total >= opts.threshold:
                        break
                    kept.add((b, h, i, ranked[n]))
                    total += float(mass[n])
    return kept


def ranked_kept(ctx, selection, opts, heads):
    """The (batch, head, query, block) of every kept block outside the sink and local ones, from the dense oracle."""
    keep = dense_keep(ctx, selection, heads)
    kept = set()
    for b, h, i, s in keep.nonzero().tolist():
        t, j = int(ctx.query_pos[b, 0, i, 0]), int(ctx.key_pos[b, 0, 0, s]) // opts.block_size
        if opts.sink_blocks <= j <= t // opts.block_size - opts.local_blocks:
            kept.add((b, h, i, j))
    return kept


@pytest.mark.parametrize("pool", [1, 2, 4, 8])
def test_choice_equals_brute_force_over_pooled_runs(pool):
    query, key, ctx = padded_problem(seed=3)
    opts = MECHANISM.resolve_options(dict(block_size=4, threshold=0.7, pool_size=pool))
    chosen = ranked_kept(ctx, MECHANISM.select(query, key, ctx, opts), opts, query.shape[1])
    assert chosen == brute_force_blocks(query, key, ctx, opts)
    assert chosen  # something was ranked in


def test_one_run_per_key_keeps_the_exact_mass_prefix():
    """pool_size=1 ranks blocks by their exact attention mass among the ranked blocks."""
    query, key, ctx = padded_problem(seed=4)
    opts = MECHANISM.resolve_options(dict(block_size=4, threshold=0.8, pool_size=1, sink_blocks=0))
    keep = dense_keep(ctx, MECHANISM.select(query, key, ctx, opts), query.shape[1])
    probs = torch.softmax((query @ key.repeat_interleave(2, 1).transpose(-1, -2) / 4).masked_fill(~ctx.visible, -torch.inf), -1)
    blocks = torch.where(ctx.key_pos >= 0, ctx.key_pos // 4, -1)
    for b, h, i in [(0, 0, 36), (0, 3, 30), (1, 1, 36), (1, 2, 22)]:
        t = int(ctx.query_pos[b, 0, i, 0])
        ranked = list(range(0, t // 4))
        mass = torch.stack([probs[b, h, i][blocks[b, 0, 0] == j].sum() for j in ranked])
        share = mass / mass.sum()
        kept = torch.tensor([bool(keep[b, h, i][blocks[b, 0, 0] == j].all()) for j in ranked])
        assert share[kept].sum() >= 0.8 - 1e-6
        assert share[kept].sum() - share[kept].min() < 0.8  # the smallest prefix: no kept block could go
        assert share[kept].min() >= share[~kept].max()  # kept in order of exact mass


def test_pools_must_divide_the_block_and_set_attention_says_so_before_any_forward():
    """block_sparse, and block_topk with the mass score (the bound reads no runs, so any pool passes there)."""
    from hf_attn_plus.mechanisms.block_topk import MECHANISM as BLOCK_TOPK

    with pytest.raises(OptionError, match="'block_sparse': option 'pool_size' got 4, which does not divide block_size=6"):
        MECHANISM.resolve_options(dict(block_size=6, pool_size=4))
    with pytest.raises(OptionError, match="'block_topk': option 'pool_size' got 4, which does not divide block_size=6"):
        BLOCK_TOPK.resolve_options(dict(block_size=6))
    assert BLOCK_TOPK.resolve_options(dict(block_size=6, score="bound")).pool_size == 4
    assert MECHANISM.resolve_options(dict(block_size=6, pool_size=3)).pool_size == 3
    assert MECHANISM.resolve_options(dict(block_size=6, pool_size=8)).pool_size == 8  # one mean key per block
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(OptionError, match="got 4, which does not divide block_size=6"):
        hf_attn_plus.set_attention(model, "block_topk", block_size=6)
    assert model.config._attn_implementation == "sdpa"  # refused before any change
