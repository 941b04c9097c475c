"""Vectorised selection equals a brute-force, loop-per-query reading of MECHANISMS.md on random inputs."""

import itertools

import pytest
import torch

import hf_attn_plus
from hf_attn_plus.masking import build_context, visible_from_mask
from hf_attn_plus.structure import dense_keep

BATCH, Q_HEADS, KV_HEADS, DIM = 3, 4, 2, 8


def padded_inputs(kv_len: int, q_len: int, seed: int):
    """Random q/k and a causal mask with left padding (row 0), right padding (row 1) and none (row 2)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, Q_HEADS, q_len, DIM, generator=g)
    key = torch.randn(BATCH, KV_HEADS, kv_len, DIM, generator=g)
    valid = torch.ones(BATCH, kv_len, dtype=torch.bool)
    valid[0, :5] = False
    valid[1, kv_len - 2 :] = False
    q_idx = torch.arange(kv_len - q_len, kv_len)[:, None]
    causal = torch.arange(kv_len)[None, :] <= q_idx
    mask = (causal[None] & valid[:, None, :]).unsqueeze(1)
    return query, key, valid, mask


def brute_force(query, key, valid, q_len, rule):
    """keep[b, h, i, s] from per-query loops; `rule(b, h, i, j, visible, pos)` returns the kept key indices."""
    batch, heads, _, _ = query.shape
    kv_len = key.shape[2]
    keep = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b, h, i in itertools.product(range(batch), range(heads), range(q_len)):
        j = kv_len - q_len + i
        if not valid[b, j]:
            continue  # a padding query; checked separately
        visible = [s for s in range(j + 1) if valid[b, s]]
        pos = {s: n for n, s in enumerate(s for s in range(kv_len) if valid[b, s])}
        for s in rule(b, h, i, j, visible, pos):
            keep[b, h, i, s] = True
    return keep


def score(query, key, b, h, i, s):
    return float(query[b, h, i] @ key[b, h // (Q_HEADS // KV_HEADS), s])


def window_and_sinks(visible, pos, j, sinks, window):
    return {s for s in visible if pos[s] < sinks or pos[j] - pos[s] < window}


def top(candidates, budget, value):
    return set(sorted(candidates, key=value, reverse=True)[:budget])


CASES = {
    "sliding_window": dict(window=4, sinks=2),
    "topk": dict(budget=3, sinks=1, window=2),
    "topk/layer": dict(budget=3, sinks=1, window=2, choose_per="layer"),
    "block_topk/bound": dict(block_size=3, budget=2, sink_blocks=1, local_blocks=1, score="bound"),
    "block_topk/bound-group": dict(block_size=3, budget=2, sink_blocks=1, local_blocks=1, score="bound", choose_per="group"),
    "block_topk": dict(block_size=4, budget=2, sink_blocks=1, local_blocks=1, pool_size=2),  # default score: mass
    "block_topk/mass-group": dict(block_size=4, budget=1, sink_blocks=0, local_blocks=1, score="mass", pool_size=1,
                                  choose_per="group"),
    "dilated": dict(dilation=3, window=2),
}


def rule_for(name, opts, query, key):
    def sliding_window(b, h, i, j, visible, pos):
        return window_and_sinks(visible, pos, j, opts["sinks"], opts["window"])

    def topk(b, h, i, j, visible, pos):
        fixed = window_and_sinks(visible, pos, j, opts["sinks"], opts["window"])
        rest = [s for s in visible if s not in fixed]
        if opts.get("choose_per") == "layer":  # dense attention over the visible keys, summed over every head
            def mass(s):
                logits = [torch.tensor([score(query, key, b, head, i, v) for v in visible]) / DIM**0.5 for head in range(Q_HEADS)]
                return sum(float(torch.softmax(row, 0)[visible.index(s)]) for row in logits)

            return fixed | top(rest, opts["budget"], mass)
        return fixed | top(rest, opts["budget"], lambda s: score(query, key, b, h, i, s))

    def block_topk(b, h, i, j, visible, pos):
        size = opts["block_size"]
        members = {}
        for s, p in pos.items():  # all real keys, including the query's future within its own block
            members.setdefault(p // size, []).append(s)
        kv = key[b, h // (Q_HEADS // KV_HEADS)]

        def head_bound(head, blk):
            keys = kv[members[blk]]
            q = query[b, head, i]
            if opts.get("score", "mass") == "mass":  # logsumexp over the block's runs of q·(mean key of the run) / sqrt(D)
                runs = keys.split(min(opts["pool_size"], size))
                logits = torch.stack([q @ run.mean(0) for run in runs]) / q.shape[-1] ** 0.5
                return float(torch.logsumexp(logits, 0))
            return float(torch.maximum(q * keys.min(0).values, q * keys.max(0).values).sum())

        group = Q_HEADS // KV_HEADS
        heads = range(h - h % group, h - h % group + group) if opts.get("choose_per") == "group" else [h]

        def bound(blk):
            return max(head_bound(head, blk) for head in heads)

        seen = sorted({pos[s] // size for s in visible})
        qb = pos[j] // size
        fixed = {blk for blk in seen if blk < opts["sink_blocks"] or qb - blk < opts["local_blocks"]}
        chosen = fixed | top([blk for blk in seen if blk not in fixed], opts["budget"], bound)
        return {s for s in visible if pos[s] // size in chosen}

    def dilated(b, h, i, j, visible, pos):
        d = pos[j]
        return {s for s in visible if d - pos[s] < opts["window"] or (d - pos[s]) % opts["dilation"] == 0}

    return locals()[name.split("/")[0]]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kv_len,q_len", [(23, 23), (23, 1), (17, 3)])
def test_selection_matches_brute_force(name, kv_len, q_len):
    query, key, valid, mask = padded_inputs(kv_len, q_len, seed=kv_len * 7 + q_len)
    mechanism = hf_attn_plus.get_mechanism(name.split("/")[0])
    opts = mechanism.resolve_options(CASES[name])
    ctx = build_context(visible_from_mask(mask, BATCH, q_len, kv_len, "cpu"))
    keep = dense_keep(ctx, mechanism.select(query, key, ctx, opts), Q_HEADS)
    expected = brute_force(query, key, valid, q_len, rule_for(name, CASES[name], query, key))
    real_query = valid[:, kv_len - q_len :][:, None, :, None]
    assert torch.equal(keep & real_query, expected)
    # A padding query sees nothing under left padding, so it must keep nothing.
    assert not keep[0, :, : max(0, 5 - (kv_len - q_len))].any()


def test_selection_is_sparse_when_budget_is_small():
    """Guards the brute force against agreeing trivially: these options drop most keys."""
    query, key, valid, mask = padded_inputs(23, 23, seed=0)
    ctx = build_context(visible_from_mask(mask, BATCH, 23, 23, "cpu"))
    for name, opts in CASES.items():
        mechanism = hf_attn_plus.get_mechanism(name.split("/")[0])
        keep = dense_keep(ctx, mechanism.select(query, key, ctx, mechanism.resolve_options(opts)), Q_HEADS)
        assert keep.expand(BATCH, Q_HEADS, 23, 23)[2, :, -1].sum(-1).max() < 23 * 0.7, name


def test_kept_pairs_counts_the_dense_oracle_chunk_by_chunk(monkeypatch):
    import hf_attn_plus.structure as structure
    from hf_attn_plus.masking import build_context, visible_from_mask
    from hf_attn_plus.registry import get_mechanism

    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(2, 4, 29, 8, generator=g), torch.randn(2, 2, 29, 8, generator=g)
    visible = visible_from_mask(None, 2, 29, 29, "cpu").clone()
    visible[1, ..., :5] = False
    visible[1, :, :5, :] = False
    ctx = build_context(visible)
    mechanism = get_mechanism("block_sparse")
    selection = mechanism.select(query, key, ctx, mechanism.resolve_options(dict(block_size=4, threshold=0.5)))
    monkeypatch.setattr(structure, "COUNT_ELEMENTS", 2 * 4 * 29 * 3)  # three query rows per chunk
    expected = (int(structure.dense_keep(ctx, selection, 4).sum()), int(visible.sum()) * 4)
    assert structure.kept_pairs(ctx, selection, 4) == expected
    assert expected[0] < expected[1]
