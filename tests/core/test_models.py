"""Model-level properties on tiny random-init Llama, Qwen2, Qwen3, DeepSeek-V3 (MLA), DeepSeek-V3.2 (indexer) and
the other decoder families of `hf_attn_plus.tiny.FAMILIES` (Mistral, Mixtral, Phi3, OLMo2, Qwen MoE, Granite)."""

import functools

import pytest
import torch

from .models import (
    COVERING, MECHANISMS, MODEL_TYPES, SPARSE, left_pad, right_pad, tiny_model, token_batch, with_mechanism,
)

ATOL = 2e-5


@pytest.mark.parametrize("arch", MODEL_TYPES)
@pytest.mark.parametrize("name", MECHANISMS)
def test_covering_budget_equals_sdpa(arch, name):
    model = tiny_model(arch)
    ids = token_batch(2, 29)
    dense_logits = model(ids).logits
    dense_tokens = model.generate(ids[:, :11], max_new_tokens=8, do_sample=False)
    with_mechanism(model, name, COVERING[name])
    torch.testing.assert_close(model(ids).logits, dense_logits, atol=ATOL, rtol=1e-4)
    assert torch.equal(model.generate(ids[:, :11], max_new_tokens=8, do_sample=False), dense_tokens)


@pytest.mark.parametrize("arch", MODEL_TYPES)
@pytest.mark.parametrize("name", MECHANISMS)
def test_sparse_budget_changes_output(arch, name):
    """The sparse settings used below really drop keys; otherwise the other tests would prove nothing."""
    model = tiny_model(arch)
    ids = token_batch(1, 29)
    dense_logits = model(ids).logits
    sparse_logits = with_mechanism(model, name, SPARSE[name])(ids).logits
    assert (sparse_logits - dense_logits)[:, 12:].abs().max() > 1e-3


@pytest.mark.parametrize("arch", MODEL_TYPES)
@pytest.mark.parametrize("name", MECHANISMS)
@pytest.mark.parametrize("pad", [left_pad, right_pad])
def test_padded_equals_unpadded(arch, name, pad):
    model = with_mechanism(tiny_model(arch), name, SPARSE[name])
    sequences = [token_batch(1, 19, seed=1)[0], token_batch(1, 12, seed=2)[0]]
    ids, mask, positions = pad(sequences)
    logits = model(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(logits).all()  # padding rows see nothing at all under left padding
    for row, seq in enumerate(sequences):
        alone = model(seq[None]).logits[0]
        real = mask[row].bool()
        torch.testing.assert_close(logits[row][real], alone, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", MODEL_TYPES)
@pytest.mark.parametrize("name", MECHANISMS)
def test_cached_generation_equals_recompute(arch, name):
    """Each decode step with the KV cache gives the logits a full uncached forward gives at that position."""
    # DeepSeek-V3.2's own indexer breaks ties among its many exactly-zero ReLU scores differently for different
    # key counts, so even transformers' SDPA path differs cached vs uncached; an indexer budget covering the
    # context takes it out of this test (its indices are tested against SDPA above and below).
    overrides = {"index_topk": 64} if arch == "deepseek_v32" else {}
    model = with_mechanism(tiny_model(arch, **overrides), name, SPARSE[name])
    ids, mask, _ = left_pad([token_batch(1, 15, seed=3)[0], token_batch(1, 9, seed=4)[0]])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    generated = out.sequences.shape[1] - ids.shape[1]  # fewer than 10 when every row ended (random-init EOS)
    full_mask = torch.cat([mask, torch.ones(2, generated, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    recomputed = model(out.sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    width = ids.shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, recomputed[:, width - 1 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_sampling_with_cache_equals_without(arch, name):
    model = with_mechanism(tiny_model(arch), name, SPARSE[name])
    ids = token_batch(2, 13, seed=5)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("arch", MODEL_TYPES)
def test_covering_budget_gradients_equal_sdpa(arch):
    ids = token_batch(2, 21, seed=6)
    grads = []
    for name in (None, "topk"):
        model = tiny_model(arch).train()
        if name:
            with_mechanism(model, name, COVERING[name])
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", MODEL_TYPES)
@pytest.mark.parametrize("name", MECHANISMS)
def test_sparse_training_step_with_padding(arch, name):
    model = with_mechanism(tiny_model(arch), name, SPARSE[name]).train()
    ids, mask, positions = left_pad([token_batch(1, 17, seed=8)[0], token_batch(1, 6, seed=9)[0]])
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, position_ids=positions, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    q_proj = next(p for n, p in model.named_parameters() if "layers.1.self_attn" in n and p.grad is not None)
    assert q_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])
@pytest.mark.parametrize(
    "check",
    [
        test_covering_budget_equals_sdpa,
        test_sparse_budget_changes_output,
        functools.partial(test_padded_equals_unpadded, pad=left_pad),
        functools.partial(test_padded_equals_unpadded, pad=right_pad),
        test_cached_generation_equals_recompute,
        test_sampling_with_cache_equals_without,
        test_sparse_training_step_with_padding,
    ],
    ids=["covering", "sparse", "left_pad", "right_pad", "cached", "sampling", "training"],
)
def test_topk_with_one_choice_per_layer(arch, check):
    """topk choose_per='layer' (one choice shared by every head) keeps the model-level properties of topk."""
    check(arch, "topk/layer")


def test_deepseek_v32_indexer_indices_are_honoured():
    """V3.2's own indexer (top-12 here) restricts every mechanism, as in transformers' SDPA path."""
    ids = token_batch(2, 29)
    indexed = tiny_model("deepseek_v32")
    unrestricted = tiny_model("deepseek_v32", index_topk=64)
    assert (indexed(ids).logits - unrestricted(ids).logits).abs().max() > 1e-3
    with_mechanism(indexed, "topk", COVERING["topk"])
    with_mechanism(unrestricted, "topk", COVERING["topk"])
    assert (indexed(ids).logits - unrestricted(ids).logits).abs().max() > 1e-3
