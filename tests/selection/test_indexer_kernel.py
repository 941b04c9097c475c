"""The Triton indexer scoring + top-k (kernels/indexer_topk) against its reference, and backend='kernel' of
indexer_topk against backend='reference' in tiny models (interpreter on CPU)."""

import pytest
import torch

import hf_attn_plus
from core.models import token_batch
from hf_attn_plus.kernels.indexer_topk import reference
from hf_attn_plus.kernels.indexer_topk.kernel import masked_scores_kernel
from hf_attn_plus.kernels.indexer_topk.wrapper import indexer_topk_indices, indexer_topk_keep
from hf_attn_plus.masking import AttentionContext, build_context
from hf_attn_plus.mechanisms.indexer_topk import indexer_loss
from hf_attn_plus.options import OptionError
from hf_attn_plus.selection import indexer_scores, sinks_and_window

from .test_indexer_topk_models import indexer_model


def context(batch: int, q_len: int, kv_len: int, padding: str) -> AttentionContext:
    """Causal visibility of the last q_len of kv_len keys; row 1 left- or right-padded by 5 keys."""
    real = torch.ones(batch, kv_len, dtype=torch.bool)
    if padding == "left":
        real[1, :5] = False
    elif padding == "right":
        real[1, -5:] = False
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return build_context(causal & real[:, None, None, :])


def index_inputs(batch, heads, q_len, kv_len, dim, seed=0, integers=False, dtype=torch.float32):
    """(index queries, index keys, head weights); `integers`: small integers, so every score is exact in fp32
    whatever the summation order, and ReLU zeros and equal sums make many exact ties."""
    g = torch.Generator().manual_seed(seed)
    if integers:
        draw = lambda *shape: torch.randint(-2, 3, shape, generator=g).float()  # noqa: E731
    else:
        draw = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    tensors = draw(batch, heads, q_len, dim), draw(batch, kv_len, dim), draw(batch, heads, q_len)
    return tuple(t.to(dtype) for t in tensors)


# (q_len, kv_len, padding): prefills of odd lengths, decode of 1..4 queries over a longer cache
SHAPES = [(41, 41, "left"), (17, 17, "right"), (1, 45, "left"), (3, 45, "right"), (4, 38, "none")]


@pytest.mark.parametrize("q_len,kv_len,padding", SHAPES[1:4])
def test_scores_equal_reference(q_len, kv_len, padding):
    ctx = context(2, q_len, kv_len, padding)
    inputs = index_inputs(2, 3, q_len, kv_len, 8)
    expected = reference.masked_scores(*inputs, ctx, 2, 3)
    torch.testing.assert_close(masked_scores_kernel(*inputs, ctx, 2, 3), expected, atol=1e-5, rtol=1e-5)
    # Half inputs: exact products, fp32 sums, so tight against the fp32 reference of the same (rounded) inputs; the
    # half-precision formula (selection.indexer_scores on fp16 tensors) differs by fp16 rounding: stated 2e-2.
    for dtype in (torch.float16, torch.bfloat16):
        half = tuple(t.to(dtype) for t in inputs)
        got = masked_scores_kernel(*half, ctx, 2, 3)
        torch.testing.assert_close(got, reference.masked_scores(*half, ctx, 2, 3), atol=1e-5, rtol=1e-5)
        if dtype == torch.float16:
            candidates = ctx.visible & ~sinks_and_window(ctx, 2, 3)
            formula = indexer_scores(*half).float().masked_fill(~candidates, float("-inf"))[:, 0]
            torch.testing.assert_close(got, formula, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("q_len,kv_len,padding", SHAPES)
@pytest.mark.parametrize("integers", [False, True], ids=["random", "ties"])
def test_selection_equals_reference_exactly(q_len, kv_len, padding, integers):
    """Every key's sortable key, then torch.topk; prefills also in query chunks of 8. At 41 keys the first 32-row
    block skips the products of the tile above the diagonal."""
    ctx = context(2, q_len, kv_len, padding)
    inputs = index_inputs(2, 3, q_len, kv_len, 8, seed=q_len, integers=integers)
    for budget, chunk in ((1, None), (6, 8)):
        keep = indexer_topk_keep(*inputs, ctx, budget, 2, 3, top_only=False, query_chunk=chunk)
        assert torch.equal(keep, reference.select(*inputs, ctx, budget, 2, 3)), budget


@pytest.mark.parametrize(
    "q_len,kv_len,padding,integers,splits",
    [(1, 45, "left", False, 1), (1, 45, "left", True, 3), (3, 38, "right", True, 2)],
)
def test_running_top_k_per_split_equals_reference_exactly(q_len, kv_len, padding, integers, splits):
    """A running top-16 over 16-key tiles (several per split), merged across splits by torch.topk."""
    ctx = context(2, q_len, kv_len, padding)
    inputs = index_inputs(2, 3, q_len, kv_len, 8, seed=kv_len, integers=integers)
    keep = indexer_topk_keep(*inputs, ctx, 6, 2, 3, splits=splits, top_only=True)
    assert torch.equal(keep, reference.select(*inputs, ctx, 6, 2, 3))


def test_tie_inputs_tie_at_the_cut_and_the_index_list_is_compact():
    """The integer inputs really exercise the tie-break: many rows have more tied keys at the cut than slots left."""
    ctx = context(2, 19, 19, "left")
    inputs = index_inputs(2, 3, 19, 19, 8, seed=19, integers=True)
    scores = reference.masked_scores(*inputs, ctx, 2, 3)
    budget = 6
    cut = scores.topk(budget, dim=-1).values[..., -1:]
    above = (scores > cut).sum(-1, keepdim=True)
    split_ties = ((scores == cut) & (cut > float("-inf"))).sum(-1, keepdim=True) > budget - above
    assert split_ties.sum() >= 5
    indices = indexer_topk_indices(*inputs, ctx, budget, 2, 3, top_only=False)
    assert indices.shape == (2, 19, budget)
    chosen = indices >= 0
    # Every listed key is a candidate, listed once; rows with fewer candidates than the budget list all of them.
    assert torch.isfinite(scores.gather(-1, indices.clamp(min=0)))[chosen].all()
    assert all(len(set(row[row >= 0].tolist())) == int((row >= 0).sum()) for row in indices.flatten(0, 1))
    assert torch.equal(chosen.sum(-1), torch.isfinite(scores).sum(-1).clamp(max=budget))


@pytest.mark.parametrize(
    "arch, routing", [("llama", {}), ("qwen3", {}), ("deepseek_v3", {}), ("qwen3", dict(active_heads=1, router_block=2))]
)
def test_kernel_backend_equals_reference_in_models(arch, routing):
    """Logits of a left-padded batch and cached greedy generation (decode through the kernels) are the reference's;
    also with MISA routing (one of the two indexer heads per query)."""
    model = indexer_model(arch, budget=3, window=2, sinks=1, **routing)
    ids = token_batch(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    results = {}
    for backend in ("reference", "kernel"):
        hf_attn_plus.set_attention(
            model, "indexer_topk", index_heads=2, index_dim=4, budget=3, window=2, sinks=1, backend=backend, **routing
        )
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        generated = model.generate(
            ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
        results[backend] = logits[mask.bool()], generated.sequences, torch.stack(generated.logits)
    torch.testing.assert_close(results["kernel"][0], results["reference"][0], atol=2e-5, rtol=1e-4)
    assert torch.equal(results["kernel"][1], results["reference"][1])
    torch.testing.assert_close(results["kernel"][2], results["reference"][2], atol=2e-5, rtol=1e-4)


def test_kernel_backend_training_keeps_reference_scores_and_differentiates_the_attention():
    """Training forwards: reference scores (the KL needs them), the sparse kernel with its backward for attention."""
    ids = token_batch(2, 12)
    results = {}
    for backend in ("reference", "kernel"):
        model = indexer_model("llama", budget=3, window=2, sinks=1, backend=backend).train()
        out = model(input_ids=ids, labels=ids)
        (out.loss + indexer_loss(model)).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = out.logits.detach(), indexer_loss(model).detach(), grads
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results["kernel"], results["reference"]
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and any(".attn_plus." in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)


def test_forced_kernel_refuses_what_it_does_not_implement():
    model = indexer_model("llama", budget=3, backend="kernel", logit_scale="log")
    with pytest.raises(OptionError, match="backend='kernel' does not implement logit_scale='log'"):
        model(input_ids=token_batch(1, 8))
